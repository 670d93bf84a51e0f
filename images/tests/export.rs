//! Fixed-VHD export with the real qemu-img (and the fake, for failure paths), and the footer
//! validator on real and corrupted files.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{qemu_info_json, qemu_io, raw_disk, read_at, sha256sum, TempDir, MIB};
use kiln_images::export::{
    export_fixed_vhd, ExportError, ExportRequest, Progress, MAX_FIXED_VHD_SIZE,
};
use kiln_images::fake::{FakeCall, FakeImageTool};
use kiln_images::size::GIB;
use kiln_images::vhd::{self, DiskType, FooterError, Geometry, VhdError, FOOTER_LEN};
use kiln_images::{ConvertRequest, ConvertTarget, DiskFormat, ImageTool, QemuImg};

fn request(source: &Path, format: DiskFormat, dest: &Path) -> ExportRequest {
    ExportRequest {
        source: source.to_path_buf(),
        source_format: format,
        dest: dest.to_path_buf(),
        overwrite: false,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn whole_mib_source_exports_unpadded_with_every_footer_field_right() {
    let dir = TempDir::new("exp-aligned");
    let raw = dir.join("disk.raw");
    raw_disk(
        &raw,
        8 * MIB,
        &[
            (0, 0x11, 4096),
            (5 * MIB + 3, 0x22, 1000),
            (8 * MIB - 512, 0x33, 512),
        ],
    );
    let vhd_path = dir.join("out.vhd");
    let report = export_fixed_vhd(
        &QemuImg::new(),
        &request(&raw, DiskFormat::Raw, &vhd_path),
        &mut |_| {},
    )
    .expect("export");

    assert!(!report.padded);
    assert_eq!(report.source_virtual_size, 8 * MIB);
    assert_eq!(report.virtual_size, 8 * MIB);
    assert_eq!(report.file_len, 8 * MIB + 512);
    assert_eq!(report.path, vhd_path);

    // Read the footer independently of the report.
    let (f, len) = vhd::read_footer(&vhd_path).expect("footer");
    assert_eq!(len, 8 * MIB + 512);
    assert_eq!(f.features, 2);
    assert_eq!(f.file_format_version, 0x0001_0000);
    assert_eq!(f.data_offset, u64::MAX);
    assert_eq!(f.disk_type, DiskType::Fixed);
    assert_eq!(f.current_size, 8 * MIB);
    assert_eq!(f.original_size, 8 * MIB);
    assert_eq!(
        f.creator_app_str(),
        "qem2",
        "force_size=on marks the footer qem2"
    );
    assert_eq!(
        f.geometry,
        Geometry::MAX,
        "qemu's force_size writes the max-CHS marker"
    );
    assert_ne!(f.unique_id, [0; 16]);
    assert!(!f.saved_state);
    let ts = f.timestamp_unix();
    assert!(
        ts + 600 >= now_unix() && ts <= now_unix() + 600,
        "timestamp {ts}"
    );
    let raw_footer: [u8; FOOTER_LEN] = read_at(&vhd_path, 8 * MIB, FOOTER_LEN)
        .try_into()
        .expect("512");
    assert_eq!(vhd::checksum(&raw_footer), f.checksum);
    assert_eq!(report.footer, f);

    // The data region is the disk, byte for byte.
    assert_eq!(
        read_at(&vhd_path, 0, 8 * MIB as usize),
        fs::read(&raw).expect("raw")
    );
    // qemu-img itself agrees on the size (with -f vpc: probing would say raw).
    assert_eq!(qemu_info_json(&vhd_path, "vpc")["virtual-size"], 8 * MIB);
    assert_eq!(
        dir.names(),
        ["disk.raw", "out.vhd"],
        "no temporary files left"
    );
}

#[test]
fn non_mib_source_is_padded_up_to_the_next_mib() {
    let dir = TempDir::new("exp-pad");
    let raw = dir.join("odd.raw");
    let len = 10 * MIB + 7;
    raw_disk(&raw, len, &[(0, 0x41, 512), (10 * MIB, 0x42, 7)]);
    let before = sha256sum(&raw);
    let vhd_path = dir.join("odd.vhd");
    let report = export_fixed_vhd(
        &QemuImg::new(),
        &request(&raw, DiskFormat::Raw, &vhd_path),
        &mut |_| {},
    )
    .expect("export");

    assert!(report.padded);
    assert_eq!(
        report.source_virtual_size,
        10 * MIB + 512,
        "qemu sees whole sectors"
    );
    assert_eq!(report.virtual_size, 11 * MIB);
    assert_eq!(fs::metadata(&vhd_path).expect("meta").len(), 11 * MIB + 512);
    let f = vhd::verify_fixed(&vhd_path).expect("valid azure vhd");
    assert_eq!((f.current_size, f.original_size), (11 * MIB, 11 * MIB));
    assert_eq!(qemu_info_json(&vhd_path, "vpc")["virtual-size"], 11 * MIB);

    // Content: the source's bytes, then zeros up to 11 MiB.
    assert_eq!(read_at(&vhd_path, 0, 512), vec![0x41; 512]);
    assert_eq!(
        read_at(&vhd_path, 10 * MIB, 8),
        [0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0]
    );
    assert!(read_at(&vhd_path, 10 * MIB + 7, (MIB - 7) as usize)
        .iter()
        .all(|&b| b == 0));

    // The source was neither resized nor written, and the padding overlay is gone.
    assert_eq!(sha256sum(&raw), before);
    assert_eq!(fs::metadata(&raw).expect("meta").len(), len);
    assert_eq!(dir.names(), ["odd.raw", "odd.vhd"]);
}

#[test]
fn qemu_force_size_alone_keeps_a_non_mib_size() {
    // The qemu-img quirk the export works around: force_size records the exact size.
    let dir = TempDir::new("exp-quirk");
    let raw = dir.join("odd.raw");
    raw_disk(&raw, 10 * MIB + 7, &[]);
    let out = dir.join("plain.vhd");
    QemuImg::new()
        .convert(
            &ConvertRequest {
                source: raw,
                source_format: DiskFormat::Raw,
                dest: out.clone(),
                target: ConvertTarget::FixedVhd,
            },
            &mut |_| {},
        )
        .expect("convert");
    let err = vhd::verify_fixed(&out).expect_err("not a whole MiB");
    assert!(
        matches!(err, VhdError::Footer { source: FooterError::SizeNotMibMultiple { current_size }, .. } if current_size == 10 * MIB + 512),
        "{err:?}"
    );
    assert!(err.to_string().contains("plain.vhd"), "{err}");
}

#[test]
fn export_contains_overlay_writes_and_the_base_stays_untouched() {
    let dir = TempDir::new("exp-cow");
    let base = dir.join("base.raw");
    raw_disk(&base, 4 * MIB, &[(0, 0x11, 4096), (3 * MIB, 0x22, 4096)]);
    let base_sum = sha256sum(&base);
    let ov = dir.join("work.qcow2");
    let tool = QemuImg::new();
    tool.create_overlay(&base, DiskFormat::Raw, &ov, Some(6 * MIB))
        .expect("overlay");
    qemu_io(&ov, "qcow2", "write -P 0xab 1M 64k");
    qemu_io(&ov, "qcow2", "write -P 0xcd 5M 4k");

    let vhd_path = dir.join("image.vhd");
    let report = export_fixed_vhd(
        &tool,
        &request(&ov, DiskFormat::Qcow2, &vhd_path),
        &mut |_| {},
    )
    .expect("export");
    assert_eq!(report.virtual_size, 6 * MIB);
    assert!(!report.padded);

    assert_eq!(read_at(&vhd_path, 0, 4096), vec![0x11; 4096], "base data");
    assert_eq!(
        read_at(&vhd_path, MIB, 65536),
        vec![0xab; 65536],
        "overlay write"
    );
    assert_eq!(
        read_at(&vhd_path, 3 * MIB, 4096),
        vec![0x22; 4096],
        "base data"
    );
    assert_eq!(
        read_at(&vhd_path, 5 * MIB, 4096),
        vec![0xcd; 4096],
        "write past the base's end"
    );
    assert_eq!(sha256sum(&base), base_sum, "base unchanged");
    assert_eq!(read_at(&base, MIB, 16), vec![0; 16]);
}

#[test]
fn export_is_sparse_and_reports_allocated_bytes() {
    let dir = TempDir::new("exp-sparse");
    let raw = dir.join("big.raw");
    raw_disk(&raw, 64 * MIB, &[(32 * MIB, 0x77, 4096)]);
    let vhd_path = dir.join("big.vhd");
    let report = export_fixed_vhd(
        &QemuImg::new(),
        &request(&raw, DiskFormat::Raw, &vhd_path),
        &mut |_| {},
    )
    .expect("export");
    let meta = fs::metadata(&vhd_path).expect("meta");
    assert_eq!(report.file_len, 64 * MIB + 512);
    assert_eq!(report.allocated_bytes, meta.blocks() * 512);
    assert!(
        report.allocated_bytes >= 4096,
        "the written block is allocated"
    );
    assert!(
        report.allocated_bytes < MIB,
        "zeros are holes: {} bytes allocated",
        report.allocated_bytes
    );
}

#[test]
fn export_progress_rises_to_the_total() {
    let dir = TempDir::new("exp-progress");
    let raw = dir.join("p.raw");
    raw_disk(&raw, 16 * MIB, &[(0, 1, MIB as usize)]);
    let mut seen: Vec<Progress> = Vec::new();
    export_fixed_vhd(
        &QemuImg::new(),
        &request(&raw, DiskFormat::Raw, &dir.join("p.vhd")),
        &mut |p| seen.push(p),
    )
    .expect("export");
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(seen.first().map(|p| p.done), Some(0));
    assert_eq!(
        seen.last(),
        Some(&Progress {
            done: 16 * MIB,
            total: 16 * MIB
        })
    );
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert!(seen.iter().all(|p| p.total == 16 * MIB));
}

#[test]
fn existing_destination_is_kept_unless_overwrite() {
    let dir = TempDir::new("exp-exists");
    let raw = dir.join("d.raw");
    raw_disk(&raw, 2 * MIB, &[(0, 0x5e, 512)]);
    let dest = dir.join("d.vhd");
    fs::write(&dest, b"someone else's file").expect("write");
    let tool = QemuImg::new();
    let err = export_fixed_vhd(&tool, &request(&raw, DiskFormat::Raw, &dest), &mut |_| {})
        .expect_err("exists");
    assert!(
        matches!(err, ExportError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(&dest).expect("read"), b"someone else's file");

    let req = ExportRequest {
        overwrite: true,
        ..request(&raw, DiskFormat::Raw, &dest)
    };
    export_fixed_vhd(&tool, &req, &mut |_| {}).expect("overwrite");
    vhd::verify_fixed(&dest).expect("replaced by a valid VHD");
    assert_eq!(dir.names(), ["d.raw", "d.vhd"]);

    let same = ExportRequest {
        overwrite: true,
        ..request(&dest, DiskFormat::Vpc, &dest)
    };
    let err = export_fixed_vhd(&tool, &same, &mut |_| {}).expect_err("same file");
    assert!(matches!(err, ExportError::SameFile { .. }), "{err:?}");
}

fn corrupt_copy(src: &Path, dest: &Path, edit: impl FnOnce(&mut fs::File, u64)) {
    fs::copy(src, dest).expect("copy");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)
        .expect("open");
    let len = f.metadata().expect("meta").len();
    edit(&mut f, len - FOOTER_LEN as u64);
}

fn reseal(f: &mut fs::File, footer_at: u64) {
    let mut bytes = [0u8; FOOTER_LEN];
    use std::io::Read;
    f.seek(SeekFrom::Start(footer_at)).expect("seek");
    f.read_exact(&mut bytes).expect("read");
    let sum = vhd::checksum(&bytes);
    f.seek(SeekFrom::Start(footer_at + 64)).expect("seek");
    f.write_all(&sum.to_be_bytes()).expect("write");
}

#[test]
fn corrupt_footers_on_real_files_each_get_their_error() {
    let dir = TempDir::new("exp-corrupt");
    let raw = dir.join("c.raw");
    raw_disk(&raw, 3 * MIB, &[(0, 9, 512)]);
    let good = dir.join("good.vhd");
    export_fixed_vhd(
        &QemuImg::new(),
        &request(&raw, DiskFormat::Raw, &good),
        &mut |_| {},
    )
    .expect("export");
    vhd::verify_fixed(&good).expect("good");

    let footer_error = |path: &Path| match vhd::verify_fixed(path) {
        Err(VhdError::Footer { path: p, source }) => {
            assert_eq!(p, path);
            source
        }
        other => panic!("{}: expected a footer error, got {other:?}", path.display()),
    };

    let p = dir.join("cookie.vhd");
    corrupt_copy(&good, &p, |f, at| {
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.write_all(b"conectiX"))
            .expect("write");
    });
    assert_eq!(
        footer_error(&p),
        FooterError::BadCookie {
            found: "conectiX".into()
        }
    );

    let p = dir.join("checksum.vhd");
    corrupt_copy(&good, &p, |f, at| {
        f.seek(SeekFrom::Start(at + 64))
            .and_then(|_| f.write_all(&[0, 0, 0, 0]))
            .expect("write");
    });
    assert!(matches!(
        footer_error(&p),
        FooterError::BadChecksum { stored: 0, .. }
    ));

    let p = dir.join("dynamic.vhd");
    corrupt_copy(&good, &p, |f, at| {
        f.seek(SeekFrom::Start(at + 60))
            .and_then(|_| f.write_all(&3u32.to_be_bytes()))
            .expect("write");
        f.seek(SeekFrom::Start(at + 16))
            .and_then(|_| f.write_all(&512u64.to_be_bytes()))
            .expect("write");
        reseal(f, at);
    });
    assert_eq!(
        footer_error(&p),
        FooterError::NotFixed {
            found: DiskType::Dynamic
        }
    );

    let p = dir.join("size.vhd");
    corrupt_copy(&good, &p, |f, at| {
        for off in [40, 48] {
            f.seek(SeekFrom::Start(at + off))
                .and_then(|_| f.write_all(&(4 * MIB).to_be_bytes()))
                .expect("write");
        }
        reseal(f, at);
    });
    assert_eq!(
        footer_error(&p),
        FooterError::FileLength {
            file_len: 3 * MIB + 512,
            current_size: 4 * MIB
        }
    );

    let p = dir.join("odd.vhd");
    corrupt_copy(&good, &p, |f, at| {
        f.seek(SeekFrom::Start(at + 48))
            .and_then(|_| f.write_all(&(3 * MIB - 512).to_be_bytes()))
            .expect("write");
        reseal(f, at);
    });
    assert!(matches!(
        footer_error(&p),
        FooterError::SizeNotMibMultiple { .. }
    ));

    // Trailing junk after the footer: the last 512 bytes are no longer a footer.
    let p = dir.join("appended.vhd");
    corrupt_copy(&good, &p, |f, _| {
        f.seek(SeekFrom::End(0))
            .and_then(|_| f.write_all(&[0u8; 512]))
            .expect("write");
    });
    assert!(matches!(footer_error(&p), FooterError::BadCookie { .. }));

    let tiny = dir.join("tiny.vhd");
    fs::write(&tiny, b"conectix").expect("write");
    assert!(matches!(
        vhd::verify_fixed(&tiny),
        Err(VhdError::TooShort { len: 8, .. })
    ));
    let err = vhd::verify_fixed(&dir.join("absent.vhd")).expect_err("absent");
    assert!(err.to_string().contains("absent.vhd"), "{err}");
}

#[test]
fn a_bad_footer_from_the_tool_fails_the_export_and_leaves_nothing() {
    let dir = TempDir::new("exp-tamper");
    let src = dir.join("src.qcow2");
    let dest = dir.join("out.vhd");
    let fake = FakeImageTool::new();
    fake.add_image(&src, DiskFormat::Qcow2, 4 * MIB);

    fake.tamper_next_vhd_footer(|b| b[100] ^= 0xff);
    let err = export_fixed_vhd(&fake, &request(&src, DiskFormat::Qcow2, &dest), &mut |_| {})
        .expect_err("bad checksum");
    assert!(
        matches!(
            &err,
            ExportError::Vhd(VhdError::Footer {
                source: FooterError::BadChecksum { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(dir.names().is_empty(), "{:?}", dir.names());

    fake.tamper_next_vhd_footer(|b| {
        b[60..64].copy_from_slice(&3u32.to_be_bytes());
        b[16..24].copy_from_slice(&512u64.to_be_bytes());
        let sum = vhd::checksum(b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
    });
    let err = export_fixed_vhd(&fake, &request(&src, DiskFormat::Qcow2, &dest), &mut |_| {})
        .expect_err("dynamic");
    assert!(err.to_string().contains("fixed (2)"), "{err}");
    assert!(dir.names().is_empty(), "{:?}", dir.names());

    // A footer valid for Azure but not from this export: timestamp 2000-01-01.
    fake.tamper_next_vhd_footer(|b| {
        b[24..28].copy_from_slice(&0u32.to_be_bytes());
        let sum = vhd::checksum(b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
    });
    let err = export_fixed_vhd(&fake, &request(&src, DiskFormat::Qcow2, &dest), &mut |_| {})
        .expect_err("stale timestamp");
    assert!(
        matches!(
            &err,
            ExportError::Mismatch {
                field: "timestamp",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("2000-01-01T00:00:00Z"), "{err}");
    assert!(dir.names().is_empty(), "{:?}", dir.names());

    export_fixed_vhd(&fake, &request(&src, DiskFormat::Qcow2, &dest), &mut |_| {})
        .expect("clean run works");
    assert_eq!(dir.names(), ["out.vhd"]);
}

#[test]
fn fake_export_pads_through_a_temporary_overlay_and_cleans_up_on_failure() {
    let dir = TempDir::new("exp-fake");
    let src = dir.join("src.raw");
    let dest = dir.join("out.vhd");
    let fake = FakeImageTool::new();
    fake.add_image(&src, DiskFormat::Raw, 10 * MIB + 512);

    fake.fail_next("convert", "qemu-img: simulated failure");
    let err = export_fixed_vhd(&fake, &request(&src, DiskFormat::Raw, &dest), &mut |_| {})
        .expect_err("convert fails");
    assert!(err.to_string().contains("simulated failure"), "{err}");
    assert!(dir.names().is_empty(), "overlay removed: {:?}", dir.names());

    let report = export_fixed_vhd(&fake, &request(&src, DiskFormat::Raw, &dest), &mut |_| {})
        .expect("export");
    assert_eq!(report.virtual_size, 11 * MIB);
    let calls = fake.calls();
    let overlay = calls.iter().rev().find_map(|c| match c {
        FakeCall::CreateOverlay {
            backing,
            backing_format,
            overlay,
            size,
        } => {
            assert_eq!(backing, &src);
            assert_eq!(*backing_format, DiskFormat::Raw);
            assert_eq!(*size, Some(11 * MIB));
            Some(overlay.clone())
        }
        _ => None,
    });
    let overlay = overlay.expect("an overlay was made");
    assert!(calls.iter().any(|c| matches!(c,
        FakeCall::Convert(r) if r.source == overlay && r.source_format == DiskFormat::Qcow2 && r.target == ConvertTarget::FixedVhd)));
    assert!(
        !calls.iter().any(|c| matches!(c, FakeCall::Resize { .. })),
        "the source is never resized"
    );
    assert_eq!(dir.names(), ["out.vhd"]);
}

#[test]
fn sizes_out_of_range_are_refused_before_any_work() {
    let dir = TempDir::new("exp-range");
    let fake = FakeImageTool::new();
    let huge = dir.join("huge.qcow2");
    fake.add_image(&huge, DiskFormat::Qcow2, MAX_FIXED_VHD_SIZE + 1);
    let err = export_fixed_vhd(
        &fake,
        &request(&huge, DiskFormat::Qcow2, &dir.join("h.vhd")),
        &mut |_| {},
    )
    .expect_err("too large");
    assert!(
        matches!(err, ExportError::TooLarge { rounded, .. } if rounded == MAX_FIXED_VHD_SIZE + MIB)
    );
    assert!(err.to_string().contains("2040 GiB"), "{err}");
    let empty = dir.join("empty.qcow2");
    fake.add_image(&empty, DiskFormat::Qcow2, 0);
    let err = export_fixed_vhd(
        &fake,
        &request(&empty, DiskFormat::Qcow2, &dir.join("e.vhd")),
        &mut |_| {},
    )
    .expect_err("empty");
    assert!(matches!(err, ExportError::Empty { .. }), "{err:?}");
    assert!(!fake
        .calls()
        .iter()
        .any(|c| matches!(c, FakeCall::Convert(_) | FakeCall::CreateOverlay { .. })));
    // The exact limit is accepted (checked with the fake: a real 2040 GiB file is too big for a test).
    let max = dir.join("max.qcow2");
    fake.add_image(&max, DiskFormat::Qcow2, 2040 * GIB);
    let report = export_fixed_vhd(
        &fake,
        &request(&max, DiskFormat::Qcow2, &dir.join("m.vhd")),
        &mut |_| {},
    )
    .expect("2040 GiB is the limit");
    assert_eq!(report.virtual_size, 2040 * GIB);
    assert_eq!(report.footer.geometry, Geometry::MAX);
}

#[test]
fn qcow2_header_size_matches_qemu_img_info() {
    // The export reads a qcow2 source's size from its header instead of running `qemu-img info`.
    let dir = TempDir::new("exp-q2size");
    for (i, (size, compat)) in [
        (MIB, "1.1"),
        (10 * MIB + 512, "1.1"),
        (3 * GIB + 7 * 512, "0.10"),
        (64 * GIB, "1.1"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.join(&format!("d{i}.qcow2"));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("compat={compat}"))
            .arg(&p)
            .arg(size.to_string())
            .status()
            .expect("qemu-img create");
        assert!(st.success());
        let want = qemu_info_json(&p, "qcow2")["virtual-size"].as_u64();
        assert_eq!(want, Some(size));
        assert_eq!(
            kiln_images::export::qcow2_virtual_size(&p).expect("read"),
            Some(size),
            "{compat} {size}"
        );
    }
    // Not qcow2 (a raw disk, a short file): no answer, so the export asks qemu-img.
    let raw = dir.join("r.raw");
    raw_disk(&raw, MIB, &[]);
    assert_eq!(
        kiln_images::export::qcow2_virtual_size(&raw).expect("read"),
        None
    );
    let short = dir.join("short");
    fs::write(&short, b"QFI").expect("write");
    assert_eq!(
        kiln_images::export::qcow2_virtual_size(&short).expect("read"),
        None
    );
}
