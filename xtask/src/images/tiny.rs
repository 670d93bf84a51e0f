//! The `tiny` guest: a 128 MiB GPT disk that boots with BIOS (SeaBIOS, `-machine pc`)
//! and UEFI (OVMF, `-machine q35`), reaches SSH in seconds under TCG and behaves like a
//! cloud image: it reads a NoCloud seed on every boot for its users and keys.
//!
//! Layout: ESP (FAT16, 40 MiB: kernel, initrd, syslinux, systemd-boot, and the
//! uncompressed-kernel fast path of pvh.rs) + ext4 root (`kiln-root`, persistent:
//! busybox, dropbear, sftp-server, scp, a tiny setuid sudo). The initrd (busybox +
//! kernel modules) only loads modules and switch_roots; busybox init then runs
//! `/etc/init.d/rcS` from the root. Guest files: `scripts/guest/tiny/`.

use super::disk::{self, BootEntry, DiskTools, FastBoot, Layout};
use super::pvh;
use super::util::{
    self, cmd, copy_file, host_file, mkdir_mode, run, symlink, tool, write_file, Progress,
};
use super::{BuildCtx, Recipe};
use anyhow::{bail, Context, Result};
use std::path::Path;

macro_rules! guest_file {
    ($p:literal) => {
        (
            $p,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/guest/tiny/",
                $p
            )),
        )
    };
}

/// The guest-side files, embedded (their content is part of the recipe hash).
const FILES: &[(&str, &str)] = &[
    guest_file!("init"),
    guest_file!("inittab"),
    guest_file!("rcS"),
    guest_file!("rcK"),
    guest_file!("nocloud"),
    guest_file!("nocloud.awk"),
    guest_file!("udhcpc.script"),
    guest_file!("shutdown"),
    guest_file!("acpi-power-button"),
    guest_file!("profile"),
    guest_file!("cmdline"),
    guest_file!("sudo.c"),
    guest_file!("pvhboot.c"),
    guest_file!("pvhboot.ld"),
    guest_file!("efiboot.c"),
];

/// The recipe code is part of the recipe too (constants, layout, file list, disk and
/// PVH packing code).
const RECIPE_SOURCE: &[&str] = &[
    include_str!("tiny.rs"),
    include_str!("disk.rs"),
    include_str!("pvh.rs"),
];

const LAYOUT: Layout = Layout {
    total_mib: 128,
    esp_mib: 40,
};

/// Kernel modules loaded by the initrd (with their dependencies, resolved on the host):
/// disks on virtio-blk, virtio-scsi, IDE (PIIX) and AHCI; CDs; ext4, ISO 9660 and vfat
/// for the root and the NoCloud seed; virtio-net, e1000 and e1000e NICs; the virtio rng;
/// the ACPI power button (+ evdev for acpid).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "ata_piix",
    "ahci",
    "ext4",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "nls_iso8859_1",
    "virtio_net",
    "e1000",
    "e1000e",
    "virtio_rng",
    "button",
    "evdev",
];

/// Host packages whose files end up in the image (besides the kernel).
const PACKAGES: &[&str] = &[
    "busybox-static",
    "dropbear-bin",
    "openssh-sftp-server",
    "openssh-client",
    "libc6",
    "libc6-dev",
    "gcc",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
    "libcrypt1",
    "kmod",
    "cpio",
    "gzip",
    "lz4",
    "xz-utils",
    "syslinux-common",
    "gnu-efi",
    "binutils",
];

/// Binaries copied with the shared libraries they need: (host path, image path).
const BINARIES: &[(&str, &str)] = &[
    ("/usr/sbin/dropbear", "usr/sbin/dropbear"),
    ("/usr/bin/dropbearkey", "usr/bin/dropbearkey"),
    ("/usr/lib/openssh/sftp-server", "usr/lib/sftp-server"), // dropbear's SFTPSERVER_PATH
    ("/usr/bin/scp", "usr/bin/scp"),
];

pub struct Tiny;

/// What a variant of the tiny guest adds (see `winrs.rs`): the plain tiny guest has none.
pub(crate) struct Extras {
    /// Image name and catalog offer.
    pub name: &'static str,
    /// Boot menu title.
    pub title: &'static str,
    /// The hostname written to `/etc/hostname` (the guest may change it at boot).
    pub hostname: &'static str,
    /// More kernel modules, loaded by the initrd unconditionally (`extra_modules`).
    pub modules: &'static [&'static str],
    /// Files written into the root after the tiny guest's own: (image path, content, mode).
    pub files: Vec<(&'static str, &'static str, u32)>,
    /// Programs copied (stripped) with the shared libraries they need: (host path, image path).
    pub binaries: Vec<(std::path::PathBuf, &'static str)>,
    /// Catalog metadata that replaces the tiny guest's (same keys) or adds to it.
    pub meta: serde_json::Value,
}

/// `linux-image-amd64` depends on the versioned kernel package: returns
/// (package name, kernel release), e.g. ("linux-image-6.1.0-56-amd64", "6.1.0-56-amd64").
pub(crate) fn kernel(meta_package: &str) -> Result<(String, String)> {
    let dpkg = tool("dpkg-query", "dpkg")?;
    let out = std::process::Command::new(dpkg)
        .args(["-W", "-f=${Depends}", meta_package])
        .output()?;
    let deps = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || deps.trim().is_empty() {
        bail!(
            "missing Debian package `{meta_package}` (the kernel); {}",
            util::SETUP_HINT
        );
    }
    for dep in deps.split(',') {
        let name = dep.split_whitespace().next().unwrap_or("");
        if let Some(rel) = name.strip_prefix("linux-image-") {
            if rel.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                return Ok((name.to_string(), rel.to_string()));
            }
        }
    }
    bail!("cannot find the kernel package in the dependencies of {meta_package}: {deps}")
}

impl Recipe for Tiny {
    fn hash_input(&self) -> Result<Vec<u8>> {
        let (kpkg, _) = kernel("linux-image-amd64")?;
        let mut pkgs: Vec<String> = PACKAGES.iter().map(|s| s.to_string()).collect();
        pkgs.extend(DiskTools::packages());
        pkgs.push(kpkg);
        let mut input = Vec::new();
        for src in RECIPE_SOURCE {
            input.extend_from_slice(super::util::normalized_source(src).as_bytes());
        }
        for (name, body) in FILES {
            input.extend_from_slice(format!("\0file {name}\0").as_bytes());
            input.extend_from_slice(body.as_bytes());
        }
        for v in util::package_versions(&pkgs)? {
            input.extend_from_slice(format!("\0pkg {v}").as_bytes());
        }
        Ok(input)
    }

    fn build(&self, ctx: &BuildCtx, p: &mut Progress) -> Result<()> {
        self.build_with(
            ctx,
            p,
            &Extras {
                name: "tiny",
                title: "kiln tiny",
                hostname: "kiln-tiny",
                modules: &[],
                files: Vec::new(),
                binaries: Vec::new(),
                meta: serde_json::json!({}),
            },
        )
    }
}

/// The recipe-independent part of the hash input (recipe code, guest files, host packages).
pub(crate) fn tiny_hash_input() -> Result<Vec<u8>> {
    Tiny.hash_input()
}

impl Tiny {
    /// Builds the tiny guest, plus what `x` adds.
    pub(crate) fn build_with(&self, ctx: &BuildCtx, p: &mut Progress, x: &Extras) -> Result<()> {
        let t = DiskTools::find()?;
        let busybox = host_file("/bin/busybox", "busybox-static")?;
        let cc = tool("cc", "gcc")?;
        let modprobe = tool("modprobe", "kmod")?;
        let ldd = tool("ldd", "libc-bin")?;
        tool("cpio", "cpio")?;
        tool("gzip", "gzip")?;
        host_file("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev")?;
        for (src, _) in BINARIES {
            let pkg = if src.contains("dropbear") {
                "dropbear-bin"
            } else if src.contains("sftp") {
                "openssh-sftp-server"
            } else {
                "openssh-client"
            };
            host_file(src, pkg)?;
        }
        let (_, krel) = kernel("linux-image-amd64")?;
        let vmlinuz = host_file(&format!("/boot/vmlinuz-{krel}"), "linux-image-amd64")?;
        p.done(&format!("host tools checked (kernel {krel})"));

        let work = &ctx.work;
        let root = work.join("root");
        stage_root(ctx, &root, &busybox, &cc, &ldd, x)?;
        p.done("root filesystem staged");

        let initrd = work.join("initrd.img");
        stage_initrd(work, &initrd, &busybox, &modprobe, &krel, x.modules)?;
        p.done(&format!(
            "initrd packed ({} KiB)",
            std::fs::metadata(&initrd)?.len() / 1024
        ));

        // BIOS fast path: the uncompressed kernel through its PVH entry (see pvh.rs)
        let vmlinux = pvh::extract_vmlinux(&vmlinuz)?;
        let kimg = work.join("vmlinux.kimg");
        let entry = pvh::kernel_image(&vmlinux, work, &kimg)?;
        drop(vmlinux);
        let shim = work.join("pvhboot.elf");
        pvh::build_shim(&cc, file("pvhboot.c"), file("pvhboot.ld"), work, &shim)?;
        let efiboot = work.join("efiboot.efi");
        pvh::build_efi(&cc, file("efiboot.c"), work, &efiboot)?;
        p.done(&format!(
            "PVH kernel image ({} KiB, entry {entry:#x})",
            std::fs::metadata(&kimg)?.len() / 1024
        ));

        let cmdline = file("cmdline").trim().to_string();
        let esp = work.join("esp.img");
        let boot = BootEntry {
            title: x.title,
            kernel: &vmlinuz,
            initrd: &initrd,
            cmdline: &cmdline,
            fast: Some(FastBoot {
                kimg: &kimg,
                pvhboot: &shim,
                efiboot: &efiboot,
            }),
        };
        let volid = &util::uuid_from(&ctx.hash, "esp-volid").replace('-', "")[..8];
        disk::build_esp(&t, work, &esp, LAYOUT.esp_mib, "KILN-ESP", volid, &boot)?;
        let rootimg = work.join("root.img");
        disk::build_root(
            &t,
            &root,
            &rootimg,
            LAYOUT.root_mib(),
            "kiln-root",
            &util::uuid_from(&ctx.hash, "rootfs"),
            &[],
        )?;
        p.done("ESP and ext4 root built");

        let raw = work.join("disk.raw");
        disk::assemble(&t, &raw, &LAYOUT, &esp, &rootimg, "kiln-root", &ctx.hash)?;
        let qcow = ctx.out.join("disk.qcow2");
        disk::to_qcow2(&t, &raw, &qcow, false)?;
        p.done("GPT disk assembled (qcow2)");

        let mut meta = super::base_meta(&t, x.name, ctx, &qcow)?;
        let extra = serde_json::json!({
            "name": "tiny",
            "description": "kiln tiny test guest: busybox + dropbear on a persistent ext4 root, BIOS and UEFI",
            "defaultAdminUser": "root",
            "buildUser": "packer",
            "provisioning": ["nocloud"],
            "readyMarker": "KILN-READY ssh",
            "kernel": krel,
            "kernelCmdline": cmdline,
            "biosBoot": "syslinux -> mboot.c32 -> pvhboot (uncompressed kernel, PVH entry); label bzimage = plain bzImage",
            "uefiBoot": "systemd-boot -> efiboot (uncompressed kernel, 64-bit boot protocol); entry kiln.conf = bzImage (EFI stub)",
            "ssh": {"server": "dropbear", "sftp": true, "port": 22},
            "sudo": "kiln tiny sudo: members of group sudo or wheel, no password",
            "shutdown": ["poweroff", "shutdown -P now", "ACPI power button"],
            "controllers": {
                "disk": ["virtio-blk", "virtio-scsi", "ide", "ahci"],
                "cdrom": ["ide", "ahci", "virtio-scsi"],
                "nic": ["virtio-net", "e1000", "e1000e"]
            },
            "seed": {"labels": ["cidata", "CIDATA"], "filesystems": ["iso9660", "vfat"]},
            "hostPackages": util::package_versions(&{
                let mut v: Vec<String> = PACKAGES.iter().map(|s| s.to_string()).collect();
                v.push(kernel("linux-image-amd64")?.0);
                v
            })?,
        });
        for (k, v) in extra.as_object().unwrap() {
            meta.insert(k.clone(), v.clone());
        }
        for (k, v) in x.meta.as_object().into_iter().flatten() {
            meta.insert(k.clone(), v.clone());
        }
        write_file(
            &ctx.out.join("meta.json"),
            serde_json::to_string_pretty(&meta)? + "\n",
            0o644,
        )?;
        Ok(())
    }
}

fn file(name: &str) -> &'static str {
    FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .expect("guest file")
}

/// The persistent root: merged-/usr layout, busybox applets as relative symlinks.
fn stage_root(
    ctx: &BuildCtx,
    root: &Path,
    busybox: &Path,
    cc: &Path,
    ldd: &Path,
    x: &Extras,
) -> Result<()> {
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "usr/local/bin",
        "usr/local/sbin",
    ] {
        mkdir_mode(&root.join(d), 0o755)?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(target, &root.join(link))?;
    }
    for (d, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("mnt", 0o755),
        ("etc/init.d", 0o755),
        ("etc/dropbear", 0o700),
        ("etc/skel", 0o755),
        ("etc/acpi/PWRF", 0o755),
        ("home", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib/kiln", 0o755),
    ] {
        mkdir_mode(&root.join(d), mode)?;
    }
    symlink("/run", &root.join("var/run"))?;

    // busybox and its applets
    copy_file(busybox, &root.join("usr/bin/busybox"), 0o755)?;
    let list = run(cmd(busybox, &["--list-full"]))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (dir, name) = applet.rsplit_once('/').unwrap_or(("bin", applet));
        if name == "busybox" {
            continue; // the binary itself
        }
        let (dir, target) = match dir {
            "bin" | "usr/bin" => ("usr/bin", "busybox"),
            "sbin" | "usr/sbin" => ("usr/sbin", "../bin/busybox"),
            other => bail!("unexpected busybox applet path {other}/{name}"),
        };
        symlink(target, &root.join(dir).join(name))?;
    }

    // dropbear, sftp-server, scp and their shared libraries
    let mut libs = std::collections::BTreeSet::new();
    let extra = x.binaries.iter().map(|(s, d)| (s.as_path(), *d, true));
    for (src, dest, strip) in BINARIES
        .iter()
        .map(|(s, d)| (Path::new(*s), *d, false))
        .chain(extra)
    {
        copy_file(src, &root.join(dest), 0o755)?;
        if strip {
            run(cmd("strip", &["--strip-debug"]).arg(root.join(dest)))
                .with_context(|| format!("stripping {}", src.display()))?;
        }
        let out = run(cmd(ldd, &[src]))?;
        for line in out.lines() {
            let path = if let Some((_, rhs)) = line.split_once("=>") {
                rhs.split_whitespace().next().unwrap_or("")
            } else {
                line.split_whitespace().next().unwrap_or("")
            };
            if path.starts_with('/') {
                libs.insert(path.to_string());
            }
        }
    }
    for lib in &libs {
        // /lib and /lib64 are symlinks into /usr in the image
        let rel = lib.trim_start_matches('/');
        let rel = rel.strip_prefix("usr/").unwrap_or(rel);
        copy_file(Path::new(lib), &root.join("usr").join(rel), 0o755)?;
    }

    // sudo: a small static setuid binary (see sudo.c)
    let src = ctx.work.join("sudo.c");
    write_file(&src, file("sudo.c"), 0o644)?;
    let sudo = root.join("usr/bin/sudo");
    run(cmd(cc, &["-static", "-O2", "-s", "-Wall", "-o"])
        .arg(&sudo)
        .arg(&src))
    .context("compiling the tiny guest's sudo (needs gcc and libc6-dev)")?;
    std::fs::set_permissions(&sudo, std::os::unix::fs::PermissionsExt::from_mode(0o4755))?;

    // guest scripts
    for (name, dest, mode) in [
        ("inittab", "etc/inittab", 0o644),
        ("rcS", "etc/init.d/rcS", 0o755),
        ("rcK", "etc/init.d/rcK", 0o755),
        ("nocloud", "usr/lib/kiln/nocloud", 0o755),
        ("nocloud.awk", "usr/lib/kiln/nocloud.awk", 0o644),
        ("udhcpc.script", "usr/share/udhcpc/default.script", 0o755),
        ("shutdown", "usr/sbin/shutdown", 0o755),
        ("acpi-power-button", "etc/acpi/PWRF/00000080", 0o755),
        ("profile", "etc/profile", 0o644),
    ] {
        write_file(&root.join(dest), file(name), mode)?;
    }
    for (dest, body, mode) in &x.files {
        write_file(&root.join(dest), body, *mode)?;
    }

    // accounts: root is the default user (top-level ssh_authorized_keys); the build
    // user (packer) comes from the NoCloud seed. "*" = no password but not locked.
    let etc = root.join("etc");
    write_file(
        &etc.join("passwd"),
        "root:*:0:0:root:/root:/bin/sh\nnobody:*:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    )?;
    write_file(
        &etc.join("group"),
        "root:x:0:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\nwheel:x:10:\nsudo:x:27:\nusers:x:100:\nnogroup:x:65534:\n",
        0o644,
    )?;
    write_file(
        &etc.join("shells"),
        "/bin/sh\n/bin/ash\n/usr/bin/sh\n/usr/bin/ash\n",
        0o644,
    )?;
    write_file(&etc.join("hostname"), format!("{}\n", x.hostname), 0o644)?;
    write_file(
        &etc.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            x.hostname
        ),
        0o644,
    )?;
    write_file(
        &etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
        0o644,
    )?;
    write_file(&etc.join("resolv.conf"), "", 0o644)?;
    write_file(
        &etc.join("fstab"),
        "LABEL=kiln-root / ext4 rw,noatime 0 1\n",
        0o644,
    )?;
    write_file(
        &etc.join("os-release"),
        format!(
            "PRETTY_NAME=\"kiln tiny test guest\"\nNAME=\"kiln tiny\"\nID=kiln-tiny\nVERSION_ID=\"{}\"\nHOME_URL=\"https://github.com/\"\n",
            super::version_from_hash(&ctx.hash)
        ),
        0o644,
    )?;
    write_file(
        &root.join("var/lib/kiln/recipe"),
        format!("{}\n", ctx.hash),
        0o644,
    )?;
    Ok(())
}

/// The initrd: busybox, /init and the kernel modules in dependency order.
fn stage_initrd(
    work: &Path,
    out: &Path,
    busybox: &Path,
    modprobe: &Path,
    krel: &str,
    extra_modules: &[&str],
) -> Result<()> {
    let dir = work.join("initrd");
    copy_file(busybox, &dir.join("bin/busybox"), 0o755)?;
    write_file(&dir.join("init"), file("init"), 0o755)?;
    // dep_<module>="<.ko files in load order>" for the initrd's /init (see scripts/guest/tiny/init)
    let mut deps = String::from(
        "# generated by xtask images: kernel modules and their dependencies, in load order\n",
    );
    for m in MODULES.iter().chain(extra_modules) {
        let out = run(cmd(modprobe, &["-S", krel, "--show-depends", m]))
            .with_context(|| format!("resolving kernel module {m} for {krel}"))?;
        let mut files = Vec::new();
        for line in out.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("insmod") {
                continue; // "builtin X"
            }
            let path = w.next().unwrap_or("");
            let base = Path::new(path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let dest = dir.join("lib/modules").join(&base);
            if !dest.exists() {
                copy_file(Path::new(path), &dest, 0o644)?;
            }
            files.push(base);
        }
        deps.push_str(&format!("dep_{m}=\"{}\"\n", files.join(" ")));
    }
    deps.push_str(&format!("extra_modules=\"{}\"\n", extra_modules.join(" ")));
    write_file(&dir.join("modules.dep"), deps, 0o644)?;
    let script = format!(
        "cd '{}' && find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc -R 0:0 --reproducible | gzip -9n > '{}'",
        dir.display(),
        out.display()
    );
    run(cmd("sh", &["-c", &script])).context("packing the initrd (cpio, gzip)")?;
    Ok(())
}
