//! BIOS fast path for the tiny guest: boot the uncompressed kernel through its PVH
//! entry instead of letting the bzImage decompress itself.
//!
//! Debian's kernel is XZ-compressed; under TCG its decompressor needs ~6 s of CPU
//! before Linux prints a line. Here the vmlinux ELF is extracted on the host, each
//! PT_LOAD segment is LZ4-compressed (trailing zeros dropped) into a "KILNVMLX" image,
//! and `scripts/guest/tiny/pvhboot.c` (a Multiboot kernel started by syslinux's
//! mboot.c32) unpacks it and jumps to the kernel's XEN_ELFNOTE_PHYS32_ENTRY, as QEMU's
//! own direct PVH boot does.
//!
//! UEFI has the same problem; `scripts/guest/tiny/efiboot.c` (gnu-efi, started by
//! systemd-boot) loads the same image and enters the kernel through the 64-bit boot
//! protocol (`startup_64`, the ELF entry) with a zero page it fills itself.
//!
//! KILNVMLX layout (little endian): "KILNVMLX", u32 version (1), u32 PVH entry,
//! u32 segment count, u32 64-bit entry (ELF e_entry), then per segment {u32 paddr, u32 memsz, u32 datasz,
//! u32 offset, u32 size} (the LZ4 frame at `offset` decompresses to `datasz` bytes;
//! the rest up to `memsz` is zero), then the frames, 16-byte aligned.

use super::util::{cmd, run, tool, write_file};
use anyhow::{bail, Context, Result};
use std::path::Path;

const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The vmlinux ELF inside an XZ-compressed bzImage (via the host's `xz`).
pub fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let magic = [0xfd, b'7', b'z', b'X', b'Z', 0];
    let Some(at) = data.windows(6).position(|w| w == magic) else {
        bail!(
            "{} has no XZ payload (the PVH path expects Debian's XZ kernel)",
            bzimage.display()
        );
    };
    let xz = tool("xz", "xz-utils")?;
    let out = std::process::Command::new(xz)
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            let mut stdin = child.stdin.take().unwrap();
            let payload = data[at..].to_vec();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&payload);
            });
            let out = child.wait_with_output();
            let _ = writer.join();
            out
        })
        .context("running xz")?;
    // xz complains about the bytes after the stream; the ELF is what matters
    let elf = out.stdout;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        bail!(
            "the kernel payload of {} is not an ELF64 vmlinux",
            bzimage.display()
        );
    }
    Ok(elf)
}

/// Writes the KILNVMLX image for `elf`; returns the PVH entry point.
pub fn kernel_image(elf: &[u8], work: &Path, out: &Path) -> Result<u32> {
    let lz4 = tool("lz4", "lz4")?;
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    let mut entry = None;
    let mut segs: Vec<(u32, u32, u32, Vec<u8>)> = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (ptype, off, paddr, filesz, memsz) = (
            u32_at(elf, ph),
            u64_at(elf, ph + 8) as usize,
            u64_at(elf, ph + 24),
            u64_at(elf, ph + 32) as usize,
            u64_at(elf, ph + 40),
        );
        match ptype {
            1 => {
                let mut data = &elf[off..off + filesz];
                while let [rest @ .., 0] = data {
                    data = rest;
                }
                let raw = work.join(format!("seg{i}.bin"));
                let lz = work.join(format!("seg{i}.lz4"));
                std::fs::write(&raw, data)?;
                run(cmd(&lz4, &["-q", "-9", "-BD", "-f"]).arg(&raw).arg(&lz))?;
                let _ = std::fs::remove_file(&raw);
                let bytes = std::fs::read(&lz)?;
                if paddr > u32::MAX as u64 || memsz > u32::MAX as u64 {
                    bail!("kernel segment above 4 GiB");
                }
                segs.push((paddr as u32, memsz as u32, data.len() as u32, bytes));
            }
            4 => {
                // notes: namesz, descsz, type, name (4-aligned), desc (4-aligned)
                let mut p = off;
                while p + 12 <= off + filesz {
                    let (namesz, descsz, ntype) = (
                        u32_at(elf, p) as usize,
                        u32_at(elf, p + 4) as usize,
                        u32_at(elf, p + 8),
                    );
                    let name = &elf[p + 12..p + 12 + namesz];
                    let desc = p + 12 + namesz.div_ceil(4) * 4;
                    if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                        entry = Some(if descsz >= 8 {
                            u64_at(elf, desc) as u32
                        } else {
                            u32_at(elf, desc)
                        });
                    }
                    p = desc + descsz.div_ceil(4) * 4;
                }
            }
            _ => {}
        }
    }
    let Some(entry) = entry else {
        bail!("the kernel has no PVH entry note (CONFIG_PVH)")
    };
    let header = 24 + 20 * segs.len();
    let mut offset = header.div_ceil(16) * 16;
    let mut image = Vec::new();
    image.extend_from_slice(b"KILNVMLX");
    let entry64 = u64_at(elf, 0x18);
    if entry64 > u32::MAX as u64 {
        bail!("the kernel's ELF entry {entry64:#x} is not a physical address");
    }
    for v in [1u32, entry, segs.len() as u32, entry64 as u32] {
        image.extend_from_slice(&v.to_le_bytes());
    }
    let mut blobs = Vec::new();
    for (paddr, memsz, datasz, bytes) in &segs {
        for v in [*paddr, *memsz, *datasz, offset as u32, bytes.len() as u32] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        blobs.extend_from_slice(bytes);
        while blobs.len() % 16 != 0 {
            blobs.push(0);
        }
        offset = header.div_ceil(16) * 16 + blobs.len();
    }
    image.resize(header.div_ceil(16) * 16, 0);
    image.extend_from_slice(&blobs);
    write_file(out, image, 0o644)?;
    Ok(entry)
}

/// Compiles pvhboot.c (32-bit, freestanding) into a Multiboot ELF.
pub fn build_shim(
    cc: &Path,
    source: &str,
    linker_script: &str,
    work: &Path,
    out: &Path,
) -> Result<()> {
    let src = work.join("pvhboot.c");
    let ld = work.join("pvhboot.ld");
    write_file(&src, source, 0o644)?;
    write_file(&ld, linker_script, 0o644)?;
    run(cmd(
        cc,
        &[
            "-m32",
            "-ffreestanding",
            "-fno-pic",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-nostdlib",
            "-static",
            "-O2",
            "-Wall",
            "-Wl,--build-id=none",
            "-Wl,-n",
            "-Wl,--no-warn-rwx-segments",
        ],
    )
    .arg(format!("-Wl,-T,{}", ld.display()))
    .arg("-o")
    .arg(out)
    .arg(&src))
    .context("compiling pvhboot (gcc -m32 -ffreestanding)")?;
    Ok(())
}

/// Compiles efiboot.c with gnu-efi into an EFI application.
pub fn build_efi(cc: &Path, source: &str, work: &Path, out: &Path) -> Result<()> {
    const GNU_EFI: &str = "gnu-efi";
    let crt0 = super::util::host_file("/usr/lib/crt0-efi-x86_64.o", GNU_EFI)?;
    let lds = super::util::host_file("/usr/lib/elf_x86_64_efi.lds", GNU_EFI)?;
    super::util::host_file("/usr/include/efi/efi.h", GNU_EFI)?;
    let ld = tool("ld", "binutils")?;
    let objcopy = tool("objcopy", "binutils")?;
    let src = work.join("efiboot.c");
    let obj = work.join("efiboot.o");
    let so = work.join("efiboot.so");
    write_file(&src, source, 0o644)?;
    run(cmd(
        cc,
        &[
            "-O2",
            "-fno-stack-protector",
            "-fpic",
            "-fshort-wchar",
            "-mno-red-zone",
            "-ffreestanding",
            "-Wall",
            "-I/usr/include/efi",
            "-I/usr/include/efi/x86_64",
            "-DGNU_EFI_USE_MS_ABI",
            "-c",
        ],
    )
    .arg(&src)
    .arg("-o")
    .arg(&obj))
    .context("compiling efiboot (gnu-efi)")?;
    run(cmd(
        &ld,
        &[
            "-nostdlib",
            "-znocombreloc",
            "-shared",
            "-Bsymbolic",
            "-L/usr/lib",
            "-T",
        ],
    )
    .arg(&lds)
    .arg(&crt0)
    .arg(&obj)
    .arg("-o")
    .arg(&so)
    .args(["-lefi", "-lgnuefi"]))
    .context("linking efiboot (gnu-efi)")?;
    run(cmd(
        &objcopy,
        &[
            "-j",
            ".text",
            "-j",
            ".sdata",
            "-j",
            ".data",
            "-j",
            ".dynamic",
            "-j",
            ".dynsym",
            "-j",
            ".rel",
            "-j",
            ".rela",
            "-j",
            ".reloc",
            "--target=efi-app-x86_64",
        ],
    )
    .arg(&so)
    .arg(out))
    .context("objcopy efiboot to PE")?;
    Ok(())
}
