//! The real qemu-img behind `QemuImg`: info, overlays, resize, convert, check.

mod common;

use std::fs;

use common::{qemu_io, raw_disk, read_at, sha256sum, TempDir, MIB};
use kiln_images::{ConvertRequest, ConvertTarget, DiskFormat, ImageError, ImageTool, QemuImg};

#[test]
fn version_names_qemu_img() {
    let v = QemuImg::new().version().expect("qemu-img is installed");
    assert!(v.starts_with("qemu-img version "), "{v}");
}

#[test]
fn info_rounds_raw_sizes_up_to_a_sector() {
    let dir = TempDir::new("info");
    let raw = dir.join("odd.raw");
    raw_disk(&raw, 10 * MIB + 7, &[]);
    let info = QemuImg::new()
        .info(&raw, Some(DiskFormat::Raw))
        .expect("info");
    assert_eq!(info.format, "raw");
    assert_eq!(info.disk_format(), Some(DiskFormat::Raw));
    assert_eq!(
        info.virtual_size,
        10 * MIB + 512,
        "qemu rounds raw up to 512 bytes"
    );
    assert_eq!(info.backing_file, None);
    assert_eq!(info.backing_format, None);
    assert!(info.actual_size.is_some());
}

#[test]
fn info_on_a_missing_file_names_it_and_keeps_stderr() {
    let dir = TempDir::new("missing");
    let path = dir.join("nope.qcow2");
    let err = QemuImg::new().info(&path, None).expect_err("missing");
    match &err {
        ImageError::Failed {
            op,
            path: p,
            stderr,
            ..
        } => {
            assert_eq!(*op, "info");
            assert_eq!(p, &path);
            assert!(stderr.contains("No such file"), "{stderr}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn overlay_records_absolute_backing_and_explicit_format() {
    let dir = TempDir::new("overlay");
    let base = dir.join("base.raw");
    raw_disk(&base, 4 * MIB, &[(0, 0x11, 4096)]);
    let ov = dir.join("ov.qcow2");
    let tool = QemuImg::new();
    tool.create_overlay(&base, DiskFormat::Raw, &ov, None)
        .expect("overlay");
    let info = tool.info(&ov, Some(DiskFormat::Qcow2)).expect("info");
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 4 * MIB);
    assert_eq!(
        info.backing_file,
        Some(fs::canonicalize(&base).expect("canon"))
    );
    assert_eq!(info.backing_format.as_deref(), Some("raw"));

    // A bigger overlay reads zeros past the backing file's end.
    let big = dir.join("big.qcow2");
    tool.create_overlay(&base, DiskFormat::Raw, &big, Some(8 * MIB))
        .expect("overlay");
    assert_eq!(tool.info(&big, None).expect("info").virtual_size, 8 * MIB);
}

#[test]
fn writing_through_an_overlay_leaves_the_source_unchanged() {
    let dir = TempDir::new("cow");
    let base = dir.join("base.raw");
    raw_disk(&base, 4 * MIB, &[(MIB, 0x22, 65536)]);
    let before = sha256sum(&base);
    let ov = dir.join("ov.qcow2");
    QemuImg::new()
        .create_overlay(&base, DiskFormat::Raw, &ov, None)
        .expect("overlay");
    qemu_io(&ov, "qcow2", "write -P 0xab 1M 64k");
    assert_eq!(sha256sum(&base), before, "the backing file must not change");
    assert_eq!(read_at(&base, MIB, 4), [0x22; 4]);
}

#[test]
fn overlay_refuses_an_existing_file_and_itself() {
    let dir = TempDir::new("exists");
    let base = dir.join("base.raw");
    raw_disk(&base, MIB, &[(0, 0x33, 512)]);
    let victim = dir.join("victim.qcow2");
    fs::write(&victim, b"precious").expect("write");
    let tool = QemuImg::new();
    let err = tool
        .create_overlay(&base, DiskFormat::Raw, &victim, None)
        .expect_err("exists");
    assert!(
        matches!(err, ImageError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(&victim).expect("read"), b"precious");
    let err = tool
        .create_overlay(&base, DiskFormat::Raw, &base, None)
        .expect_err("self");
    assert!(
        matches!(err, ImageError::OverlayIsBacking { .. }),
        "{err:?}"
    );
    assert_eq!(read_at(&base, 0, 4), [0x33; 4]);
}

#[test]
fn resize_grows_only() {
    let dir = TempDir::new("resize");
    let img = dir.join("d.qcow2");
    let tool = QemuImg::new();
    let out = common::qemu_img(&["create", "-q", "-f", "qcow2", &img.to_string_lossy(), "10M"]);
    assert!(out.status.success());

    tool.resize(&img, DiskFormat::Qcow2, 20 * MIB)
        .expect("grow");
    assert_eq!(tool.info(&img, None).expect("info").virtual_size, 20 * MIB);
    tool.resize(&img, DiskFormat::Qcow2, 20 * MIB)
        .expect("same size is a no-op");

    let err = tool
        .resize(&img, DiskFormat::Qcow2, 5 * MIB)
        .expect_err("shrink");
    match &err {
        ImageError::Shrink {
            current, requested, ..
        } => {
            assert_eq!((*current, *requested), (20 * MIB, 5 * MIB));
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("20971520 bytes (0.020 GiB)"), "{msg}");
    assert!(msg.contains("5242880 bytes (0.005 GiB)"), "{msg}");
    assert!(msg.contains("d.qcow2"), "{msg}");
    assert_eq!(tool.info(&img, None).expect("info").virtual_size, 20 * MIB);

    let err = tool
        .resize(&img, DiskFormat::Qcow2, 30 * MIB + 1)
        .expect_err("unaligned");
    assert!(matches!(err, ImageError::UnalignedSize { .. }), "{err:?}");
}

#[test]
fn convert_reports_rising_progress_and_never_overwrites() {
    let dir = TempDir::new("convert");
    let raw = dir.join("a.raw");
    raw_disk(&raw, 8 * MIB, &[(0, 0x44, 1 << 20), (7 * MIB, 0x55, 4096)]);
    let out = dir.join("a.qcow2");
    let tool = QemuImg::new();
    let req = ConvertRequest {
        source: raw.clone(),
        source_format: DiskFormat::Raw,
        dest: out.clone(),
        target: ConvertTarget::Qcow2,
    };
    let mut seen = Vec::new();
    tool.convert(&req, &mut |f| seen.push(f)).expect("convert");
    assert_eq!(seen.last().copied(), Some(1.0));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(common::same_content(&raw, "raw", &out, "qcow2"));

    let err = tool.convert(&req, &mut |_| {}).expect_err("exists");
    assert!(
        matches!(err, ImageError::DestinationExists { .. }),
        "{err:?}"
    );
}

#[test]
fn failed_convert_names_the_file_keeps_stderr_and_leaves_nothing() {
    let dir = TempDir::new("badconvert");
    let bogus = dir.join("bogus.qcow2");
    fs::write(&bogus, vec![0x5a; 4096]).expect("write");
    let out = dir.join("out.vhd");
    let err = QemuImg::new()
        .convert(
            &ConvertRequest {
                source: bogus.clone(),
                source_format: DiskFormat::Qcow2,
                dest: out.clone(),
                target: ConvertTarget::FixedVhd,
            },
            &mut |_| {},
        )
        .expect_err("not qcow2");
    match &err {
        ImageError::Failed {
            op, stderr, path, ..
        } => {
            assert_eq!(*op, "convert");
            assert_eq!(path, &bogus);
            assert!(stderr.contains("qcow2"), "{stderr}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!out.exists());
    assert_eq!(dir.names(), ["bogus.qcow2"]);
}

#[test]
fn check_is_clean_for_qcow2_and_unsupported_for_raw() {
    let dir = TempDir::new("check");
    let raw = dir.join("a.raw");
    raw_disk(&raw, MIB, &[]);
    let ov = dir.join("a.qcow2");
    let tool = QemuImg::new();
    tool.create_overlay(&raw, DiskFormat::Raw, &ov, None)
        .expect("overlay");
    let report = tool.check(&ov, DiskFormat::Qcow2).expect("check");
    assert!(report.is_clean(), "{report:?}");
    assert!(report.image_end_offset.is_some());
    let err = tool.check(&raw, DiskFormat::Raw).expect_err("raw");
    assert!(
        matches!(
            err,
            ImageError::CheckUnsupported {
                format: DiskFormat::Raw,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn corrupt_qcow2_is_reported_by_check() {
    let dir = TempDir::new("corrupt");
    let img = dir.join("c.qcow2");
    let p = img.to_string_lossy().into_owned();
    assert!(common::qemu_img(&["create", "-q", "-f", "qcow2", &p, "4M"])
        .status
        .success());
    qemu_io(&img, "qcow2", "write -P 0x66 0 64k");
    // Zero the refcount table offset's target: qemu-img check then finds leaks/corruptions.
    let json = common::qemu_info_json(&img, "qcow2");
    assert_eq!(json["format"], "qcow2");
    let header = read_at(&img, 48, 8);
    let refcount_table = u64::from_be_bytes(header.try_into().expect("8 bytes"));
    let mut f = fs::OpenOptions::new().write(true).open(&img).expect("open");
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(refcount_table)).expect("seek");
    f.write_all(&[0u8; 8]).expect("zero refcount table entry");
    drop(f);
    let report = QemuImg::new()
        .check(&img, DiskFormat::Qcow2)
        .expect("check runs");
    assert!(!report.is_clean(), "{report:?}");
}
