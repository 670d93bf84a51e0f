//! Disk assembly without mounting anything: a GPT disk whose first partition is an EFI
//! system partition that boots both ways (syslinux for BIOS through `gptmbr.bin` and the
//! partition's LegacyBIOSBootable attribute; systemd-boot as the UEFI fallback loader
//! `\EFI\BOOT\BOOTX64.EFI`), and whose second partition is an ext4 root built with
//! `mkfs.ext4 -d`.

use super::util::{cmd, host_file, run, run_stdin, tool, write_file};
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Host tools used for disks, resolved once (so a missing one is reported up front).
pub struct DiskTools {
    pub sfdisk: PathBuf,
    pub mkfs_vfat: PathBuf,
    pub mkfs_ext4: PathBuf,
    pub syslinux: PathBuf,
    pub mcopy: PathBuf,
    pub mmd: PathBuf,
    pub dd: PathBuf,
    pub qemu_img: PathBuf,
    pub gptmbr: PathBuf,
    pub sd_boot: PathBuf,
    pub mboot: PathBuf,
    pub libcom32: PathBuf,
}

impl DiskTools {
    pub fn find() -> Result<DiskTools> {
        Ok(DiskTools {
            sfdisk: tool("sfdisk", "fdisk")?,
            mkfs_vfat: tool("mkfs.vfat", "dosfstools")?,
            mkfs_ext4: tool("mkfs.ext4", "e2fsprogs")?,
            syslinux: tool("syslinux", "syslinux")?,
            mcopy: tool("mcopy", "mtools")?,
            mmd: tool("mmd", "mtools")?,
            dd: tool("dd", "coreutils")?,
            qemu_img: tool("qemu-img", "qemu-utils")?,
            gptmbr: host_file("/usr/lib/syslinux/mbr/gptmbr.bin", "syslinux-common")?,
            sd_boot: host_file(
                "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
                "systemd-boot-efi",
            )?,
            mboot: host_file(
                "/usr/lib/syslinux/modules/bios/mboot.c32",
                "syslinux-common",
            )?,
            libcom32: host_file(
                "/usr/lib/syslinux/modules/bios/libcom32.c32",
                "syslinux-common",
            )?,
        })
    }

    /// Debian packages whose versions shape the disk (part of every recipe hash).
    pub fn packages() -> Vec<String> {
        [
            "fdisk",
            "dosfstools",
            "e2fsprogs",
            "syslinux",
            "syslinux-common",
            "mtools",
            "systemd-boot-efi",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Partition sizes: ESP at 1 MiB, root right after it, 1 MiB left at the end for the
/// backup GPT.
pub struct Layout {
    pub total_mib: u64,
    pub esp_mib: u64,
}

impl Layout {
    pub fn root_offset_mib(&self) -> u64 {
        1 + self.esp_mib
    }
    pub fn root_mib(&self) -> u64 {
        self.total_mib - 1 - self.esp_mib - 1
    }
}

/// What both boot loaders start.
pub struct BootEntry<'a> {
    pub title: &'a str,
    /// kernel and initrd as copied onto the ESP
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// Fast path (see pvh.rs): when set, both loaders start the uncompressed kernel by
    /// default; the bzImage stays available (syslinux label `bzimage`, systemd-boot
    /// entry `kiln.conf`).
    pub fast: Option<FastBoot<'a>>,
}

/// The uncompressed-kernel boot files.
pub struct FastBoot<'a> {
    /// KILNVMLX kernel image
    pub kimg: &'a Path,
    /// Multiboot ELF for mboot.c32 (BIOS)
    pub pvhboot: &'a Path,
    /// EFI application for systemd-boot (UEFI)
    pub efiboot: &'a Path,
}

/// Builds a FAT ESP image holding the kernel, the initrd, syslinux and systemd-boot.
pub fn build_esp(
    t: &DiskTools,
    work: &Path,
    out: &Path,
    size_mib: u64,
    label: &str,
    volid: &str,
    boot: &BootEntry,
) -> Result<()> {
    let fat = if size_mib >= 64 { "32" } else { "16" };
    run(cmd(
        &t.mkfs_vfat,
        &[
            "-C",
            "-F",
            fat,
            "-n",
            label,
            "-i",
            volid,
            out.to_str().unwrap(),
            &(size_mib * 1024).to_string(),
        ],
    ))?;
    // BIOS: ldlinux.sys + the FAT boot sector, written through mtools (no mount)
    run(cmd(&t.syslinux, &["--install", out.to_str().unwrap()]))?;

    let cfg_dir = work.join("esp-cfg");
    fs::create_dir_all(&cfg_dir)?;
    let bzimage_label = format!(
        "LABEL bzimage\n  MENU LABEL {} (bzImage)\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {}\n",
        boot.title, boot.cmdline
    );
    let syslinux_cfg = match boot.fast {
        None => format!(
            "# kiln: BIOS boot (syslinux from the ESP, reached through gptmbr.bin)\n\
             DEFAULT bzimage\nPROMPT 0\nTIMEOUT 0\n{bzimage_label}"
        ),
        Some(_) => format!(
            "# kiln: BIOS boot (syslinux from the ESP, reached through gptmbr.bin).\n\
             # Default: mboot.c32 -> pvhboot.elf, which loads the uncompressed kernel and enters\n\
             # it through its PVH entry (no XZ decompression under TCG). \"bzimage\" is the\n\
             # ordinary path (type it at the boot: prompt with PROMPT 1 to use it).\n\
             DEFAULT kiln\nPROMPT 0\nTIMEOUT 0\n\
             LABEL kiln\n  MENU LABEL {} (PVH)\n  KERNEL mboot.c32\n  \
             APPEND pvhboot.elf {} kiln.boot=pvh --- vmlinux.kimg --- initrd.img\n{bzimage_label}",
            boot.title, boot.cmdline
        ),
    };
    write_file(&cfg_dir.join("syslinux.cfg"), syslinux_cfg, 0o644)?;
    let default_entry = if boot.fast.is_some() {
        "kiln-fast.conf"
    } else {
        "kiln.conf"
    };
    write_file(
        &cfg_dir.join("loader.conf"),
        format!("default {default_entry}\ntimeout 0\neditor no\nconsole-mode keep\n"),
        0o644,
    )?;
    write_file(
        &cfg_dir.join("kiln-fast.conf"),
        format!(
            "title {} (uncompressed kernel)\nefi /EFI/kiln/efiboot.efi\noptions {} kiln.boot=efiboot\n",
            boot.title, boot.cmdline
        ),
        0o644,
    )?;
    write_file(
        &cfg_dir.join("kiln.conf"),
        format!(
            "title {}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {}\n",
            boot.title, boot.cmdline
        ),
        0o644,
    )?;

    let img = out.to_str().unwrap();
    let mut mmd = cmd(
        &t.mmd,
        &[
            "-i",
            img,
            "::/EFI",
            "::/EFI/BOOT",
            "::/EFI/kiln",
            "::/loader",
            "::/loader/entries",
        ],
    );
    mmd.env("MTOOLS_SKIP_CHECK", "1");
    run(&mut mmd)?;
    let mut copies: Vec<(PathBuf, &str)> = vec![
        (boot.kernel.to_path_buf(), "::/vmlinuz"),
        (boot.initrd.to_path_buf(), "::/initrd.img"),
        (cfg_dir.join("syslinux.cfg"), "::/syslinux.cfg"),
        (t.sd_boot.clone(), "::/EFI/BOOT/BOOTX64.EFI"),
        (cfg_dir.join("loader.conf"), "::/loader/loader.conf"),
        (cfg_dir.join("kiln.conf"), "::/loader/entries/kiln.conf"),
    ];
    if let Some(fast) = &boot.fast {
        copies.push((fast.pvhboot.to_path_buf(), "::/pvhboot.elf"));
        copies.push((fast.kimg.to_path_buf(), "::/vmlinux.kimg"));
        copies.push((fast.efiboot.to_path_buf(), "::/EFI/kiln/efiboot.efi"));
        copies.push((
            cfg_dir.join("kiln-fast.conf"),
            "::/loader/entries/kiln-fast.conf",
        ));
        copies.push((t.mboot.clone(), "::/mboot.c32"));
        copies.push((t.libcom32.clone(), "::/libcom32.c32"));
    }
    for (src, dest) in copies {
        let mut c = cmd(&t.mcopy, &["-o", "-i", img]);
        c.arg(&src).arg(dest).env("MTOOLS_SKIP_CHECK", "1");
        run(&mut c).with_context(|| format!("copying {} onto the ESP", src.display()))?;
    }
    Ok(())
}

/// Creates the ext4 root filesystem image from a directory.
pub fn build_root(
    t: &DiskTools,
    dir: &Path,
    out: &Path,
    size_mib: u64,
    label: &str,
    uuid: &str,
    extra: &[&str],
) -> Result<()> {
    let mut c = cmd(
        &t.mkfs_ext4,
        &["-q", "-F", "-t", "ext4", "-L", label, "-U", uuid],
    );
    c.arg("-E").arg(format!("root_owner=0:0,hash_seed={uuid}"));
    c.args(extra);
    c.arg("-d").arg(dir).arg(out).arg(format!("{size_mib}M"));
    run(&mut c).context("mkfs.ext4 -d (building the root filesystem)")?;
    Ok(())
}

/// Writes the GPT, the BIOS boot code and both partition images into a sparse raw disk.
pub fn assemble(
    t: &DiskTools,
    out: &Path,
    layout: &Layout,
    esp: &Path,
    root: &Path,
    root_name: &str,
    hash: &str,
) -> Result<()> {
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(layout.total_mib * MIB)?;
    drop(f);
    let s = |mib: u64| mib * MIB / SECTOR;
    let script = format!(
        "label: gpt\nlabel-id: {}\nfirst-lba: 2048\n\
         start={}, size={}, type={ESP_TYPE}, uuid={}, name=\"EFI system partition\", attrs=\"LegacyBIOSBootable\"\n\
         start={}, size={}, type={LINUX_FS_TYPE}, uuid={}, name=\"{root_name}\"\n",
        super::util::uuid_from(hash, "disk"),
        s(1),
        s(layout.esp_mib),
        super::util::uuid_from(hash, "esp"),
        s(layout.root_offset_mib()),
        s(layout.root_mib()),
        super::util::uuid_from(hash, "root"),
    );
    let mut c = cmd(&t.sfdisk, &["--no-reread", "--no-tell-kernel", "-q"]);
    c.arg(out);
    run_stdin(&mut c, Some(script.as_bytes())).context("sfdisk (writing the GPT)")?;

    let o = format!("of={}", out.display());
    run(cmd(
        &t.dd,
        &[
            &format!("if={}", t.gptmbr.display()),
            &o,
            "bs=440",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    ))?;
    run(cmd(
        &t.dd,
        &[
            &format!("if={}", esp.display()),
            &o,
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    ))?;
    run(cmd(
        &t.dd,
        &[
            &format!("if={}", root.display()),
            &o,
            "bs=1M",
            &format!("seek={}", layout.root_offset_mib()),
            "conv=notrunc,sparse",
            "status=none",
        ],
    ))?;
    Ok(())
}

/// Converts the raw disk to qcow2 (optionally compressed with zstd).
pub fn to_qcow2(t: &DiskTools, raw: &Path, out: &Path, compress: bool) -> Result<()> {
    let mut c = cmd(&t.qemu_img, &["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if compress {
        c.args(["-c", "-o", "compression_type=zstd", "-m", "4"]);
    }
    c.arg(raw).arg(out);
    run(&mut c).context("qemu-img convert")?;
    Ok(())
}

/// Virtual size of a disk image, from `qemu-img info`.
pub fn virtual_size(t: &DiskTools, disk: &Path) -> Result<u64> {
    let out = run(cmd(
        &t.qemu_img,
        &["info", "--output=json", disk.to_str().unwrap()],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info: no virtual-size")
}
