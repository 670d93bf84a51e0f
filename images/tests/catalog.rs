//! The local PlatformImage catalog with the real qemu-img.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{list_names, qemu_img, qemu_io, raw_disk, sha256sum, TempDir, MIB};
use kiln_images::catalog::{
    Catalog, CatalogError, HyperVGeneration, ImportRequest, OsType, PlanInfo, ProvisioningMethod,
};
use kiln_images::export::{export_fixed_vhd, ExportRequest};
use kiln_images::{DiskFormat, ImageTool, QemuImg};

fn req(publisher: &str, offer: &str, sku: &str, version: &str, disk: &Path) -> ImportRequest {
    ImportRequest::new(
        publisher,
        offer,
        sku,
        version,
        HyperVGeneration::V2,
        OsType::Linux,
        disk,
    )
}

fn import(
    cat: &Catalog,
    r: &ImportRequest,
) -> Result<kiln_images::catalog::CatalogEntry, CatalogError> {
    cat.import(&QemuImg::new(), r, &mut |_| {})
}

/// A small raw disk whose first sector is filled with `tag`, so entries can be told apart.
fn tagged_disk(dir: &TempDir, name: &str, tag: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    raw_disk(&p, 2 * MIB, &[(0, tag, 512)]);
    p
}

fn first_byte(entry_disk: &Path) -> u8 {
    let dir = TempDir::new("peek");
    let raw = dir.join("peek.raw");
    let out = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &entry_disk.to_string_lossy(),
        &raw.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::read_at(&raw, 0, 1)[0]
}

#[test]
fn latest_is_the_numerically_highest_version() {
    let home = TempDir::new("cat-latest");
    let cat = Catalog::in_kiln_home(home.path());
    for (v, tag) in [("1.0.9", 9u8), ("1.2.0", 120), ("1.0.10", 10)] {
        let disk = tagged_disk(&home, &format!("{v}.raw"), tag);
        let e = import(
            &cat,
            &req("Canonical", "UbuntuServer", "22_04-lts", v, &disk),
        )
        .expect("import");
        assert_eq!(e.meta.version, v);
        assert_eq!(
            e.disk,
            cat.root()
                .join("canonical/ubuntuserver/22_04-lts")
                .join(v)
                .join("disk.qcow2")
        );
    }
    let r = cat
        .resolve("Canonical", "UbuntuServer", "22_04-lts", "latest")
        .expect("latest");
    assert_eq!(r.exact_version, "1.2.0");
    assert_eq!(r.requested_version, "latest");
    assert_eq!(first_byte(&r.entry.disk), 120);

    let r = cat
        .resolve("Canonical", "UbuntuServer", "22_04-lts", "1.0.10")
        .expect("exact");
    assert_eq!(r.exact_version, "1.0.10");
    assert_eq!(first_byte(&r.entry.disk), 10);

    // Without 1.2.0, 1.0.10 beats 1.0.9 (a lexical sort would pick 1.0.9).
    for (v, tag) in [("1.0.9", 9u8), ("1.0.10", 10)] {
        let disk = tagged_disk(&home, &format!("b{v}.raw"), tag);
        import(
            &cat,
            &req("Canonical", "UbuntuServer", "20_04-lts", v, &disk),
        )
        .expect("import");
    }
    let r = cat
        .resolve("Canonical", "UbuntuServer", "20_04-lts", "LATEST")
        .expect("latest");
    assert_eq!(r.exact_version, "1.0.10");

    let listed: Vec<(String, String)> = cat
        .list()
        .expect("list")
        .into_iter()
        .map(|e| (e.meta.sku, e.meta.version))
        .collect();
    let expect = [
        ("20_04-lts", "1.0.9"),
        ("20_04-lts", "1.0.10"),
        ("22_04-lts", "1.0.9"),
        ("22_04-lts", "1.0.10"),
        ("22_04-lts", "1.2.0"),
    ];
    assert_eq!(listed, expect.map(|(s, v)| (s.to_string(), v.to_string())));
}

#[test]
fn lookups_ignore_case_and_names_are_kept_as_given() {
    let home = TempDir::new("cat-case");
    let cat = Catalog::new(home.join("catalog"));
    let disk = tagged_disk(&home, "d.raw", 1);
    import(
        &cat,
        &req(
            "MicrosoftWindowsServer",
            "WindowsServer",
            "2022-Datacenter-G2",
            "20348.2113.231109",
            &disk,
        ),
    )
    .expect("import");
    let r = cat
        .resolve(
            "microsoftwindowsserver",
            "WINDOWSSERVER",
            "2022-datacenter-g2",
            "latest",
        )
        .expect("case-insensitive");
    assert_eq!(r.entry.meta.publisher, "MicrosoftWindowsServer");
    assert_eq!(r.entry.meta.offer, "WindowsServer");
    assert_eq!(r.entry.meta.sku, "2022-Datacenter-G2");
    assert_eq!(r.exact_version, "20348.2113.231109");

    // A differently-cased import of the same version is the same image.
    let err = import(
        &cat,
        &req(
            "microsoftwindowsserver",
            "windowsserver",
            "2022-DATACENTER-G2",
            "20348.2113.231109",
            &disk,
        ),
    )
    .expect_err("duplicate");
    assert!(matches!(err, CatalogError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(cat.list().expect("list").len(), 1);
}

#[test]
fn a_missing_image_says_how_to_import_it() {
    let home = TempDir::new("cat-missing");
    let cat = Catalog::new(home.join("catalog"));
    let err = cat
        .resolve("Canonical", "UbuntuServer", "22_04-lts", "latest")
        .expect_err("empty");
    let msg = err.to_string();
    assert!(
        msg.contains("kiln image import --publisher Canonical --offer UbuntuServer --sku 22_04-lts --version 1.0.0 DISK"),
        "{msg}"
    );
    assert!(msg.contains(&cat.root().display().to_string()), "{msg}");

    let disk = tagged_disk(&home, "d.raw", 1);
    import(
        &cat,
        &req("Canonical", "UbuntuServer", "22_04-lts", "1.0.9", &disk),
    )
    .expect("import");
    let err = cat
        .resolve("Canonical", "UbuntuServer", "22_04-lts", "1.0.10")
        .expect_err("absent version");
    let msg = err.to_string();
    assert!(
        msg.contains("kiln image import --publisher Canonical --offer UbuntuServer --sku 22_04-lts --version 1.0.10 DISK"),
        "{msg}"
    );
    assert!(msg.contains("this SKU has versions 1.0.9"), "{msg}");
    let err = cat
        .resolve("Canonical", "UbuntuServer", "22_04-lts", "1.0")
        .expect_err("bad version");
    assert!(
        matches!(err, CatalogError::InvalidVersion { .. }),
        "{err:?}"
    );
}

#[test]
fn duplicate_imports_are_refused_and_the_entry_is_intact() {
    let home = TempDir::new("cat-dup");
    let cat = Catalog::new(home.join("catalog"));
    let first = tagged_disk(&home, "first.raw", 0x0f);
    let second = tagged_disk(&home, "second.raw", 0x5e);
    let e = import(&cat, &req("P", "O", "S", "1.0.1", &first)).expect("import");
    let sum = sha256sum(&e.disk);

    let err = import(&cat, &req("P", "O", "S", "1.0.1", &second)).expect_err("duplicate");
    assert!(err.to_string().contains("already exists"), "{err}");
    // Same number, other spelling: Azure's ordering says equal, so it is the same version.
    let err = import(&cat, &req("P", "O", "S", "1.00.01", &second)).expect_err("same number");
    match &err {
        CatalogError::AlreadyExists { existing, .. } => assert_eq!(existing, "1.0.1"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sha256sum(&e.disk), sum);
    assert_eq!(first_byte(&e.disk), 0x0f);
    assert!(list_names(&cat.root().join(".staging")).is_empty());
}

#[test]
fn concurrent_imports_of_one_version_have_one_winner() {
    let home = TempDir::new("cat-race");
    let cat = Arc::new(Catalog::new(home.join("catalog")));
    let n = 4;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let disk = tagged_disk(&home, &format!("d{i}.raw"), i as u8 + 1);
            let (cat, barrier) = (Arc::clone(&cat), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                import(&cat, &req("Race", "Offer", "Sku", "2.0.0", &disk))
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, CatalogError::AlreadyExists { .. }), "{e:?}");
        }
    }
    let entries = cat.list().expect("list");
    assert_eq!(entries.len(), 1);
    let report = QemuImg::new()
        .check(&entries[0].disk, DiskFormat::Qcow2)
        .expect("check");
    assert!(report.is_clean());
    assert!(
        list_names(&cat.root().join(".staging")).is_empty(),
        "staging cleaned up"
    );
    assert_eq!(list_names(&entries[0].dir), ["disk.qcow2", "meta.json"]);
}

#[test]
fn qcow2_raw_fixed_and_dynamic_vhd_and_vhdx_all_import() {
    let home = TempDir::new("cat-formats");
    let cat = Catalog::new(home.join("catalog"));
    let raw = home.join("src.raw");
    raw_disk(&raw, 4 * MIB, &[(0, 0x61, 512), (3 * MIB, 0x62, 4096)]);
    let path = |n: &str| home.join(n).to_string_lossy().into_owned();
    let raw_s = raw.to_string_lossy().into_owned();
    for (fmt, name) in [
        ("qcow2", "src.qcow2"),
        ("vpc", "dynamic.vhd"),
        ("vhdx", "src.vhdx"),
    ] {
        let out = qemu_img(&["convert", "-f", "raw", "-O", fmt, &raw_s, &path(name)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let fixed = home.join("fixed.vhd");
    export_fixed_vhd(
        &QemuImg::new(),
        &ExportRequest {
            source: raw.clone(),
            source_format: DiskFormat::Raw,
            dest: fixed.clone(),
            overwrite: false,
        },
        &mut |_| {},
    )
    .expect("export");

    let cases = [
        ("src.raw", "1.0.1", "raw"),
        ("src.qcow2", "1.0.2", "qcow2"),
        ("fixed.vhd", "1.0.3", "vpc"),
        ("dynamic.vhd", "1.0.4", "vpc"),
        ("src.vhdx", "1.0.5", "vhdx"),
    ];
    for (name, version, detected) in cases {
        let disk = home.join(name);
        let before = sha256sum(&disk);
        let mut seen = Vec::new();
        let e = cat
            .import(
                &QemuImg::new(),
                &req("Fmt", "Test", "All", version, &disk),
                &mut |p| seen.push(p),
            )
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(e.meta.source_format, detected, "{name}");
        assert_eq!(e.meta.disk_format, "qcow2");
        assert_eq!(sha256sum(&disk), before, "{name} must not change");
        assert!(
            seen.last().is_some_and(|p| p.done == p.total),
            "{name}: {seen:?}"
        );
        let info = QemuImg::new()
            .info(&e.disk, Some(DiskFormat::Qcow2))
            .expect("info");
        assert_eq!(info.backing_file, None, "{name}: stored images stand alone");
        assert_eq!(info.virtual_size, e.meta.virtual_size);
        // Guest-visible content equals the raw source (dynamic VHD is CHS-rounded: extra zeros).
        assert!(
            common::same_content(&raw, "raw", &e.disk, "qcow2"),
            "{name}"
        );
    }
    // qemu's dynamic VHD without force_size rounds the size up to a CHS geometry.
    let dynamic = cat.resolve("fmt", "test", "all", "1.0.4").expect("resolve");
    assert_eq!(dynamic.entry.meta.virtual_size, 4_212_736);
    let fixed_entry = cat.resolve("fmt", "test", "all", "1.0.3").expect("resolve");
    assert_eq!(fixed_entry.entry.meta.virtual_size, 4 * MIB);
}

#[test]
fn stored_images_are_read_only_with_full_metadata() {
    let home = TempDir::new("cat-meta");
    let cat = Catalog::new(home.join("catalog"));
    let disk = tagged_disk(&home, "d.raw", 7);
    let mut r = req(
        "Canonical",
        "UbuntuServer",
        "22_04-lts-gen2",
        "22.04.202311010",
        &disk,
    );
    r.compute_sha256 = true;
    r.default_admin_user = Some("azureuser".into());
    r.plan_info = Some(PlanInfo {
        plan_name: "n".into(),
        plan_product: "p".into(),
        plan_publisher: "q".into(),
    });
    let e = import(&cat, &r).expect("import");
    // The directory is the numeric form; meta keeps the spelling.
    assert_eq!(
        e.dir.file_name().and_then(|n| n.to_str()),
        Some("22.4.202311010")
    );
    assert_eq!(e.meta.version, "22.04.202311010");
    assert_eq!(
        e.meta.source_sha256.as_deref(),
        Some(sha256sum(&disk).as_str())
    );
    assert_eq!(e.meta.virtual_size, 2 * MIB);
    assert_eq!(
        e.meta.provisioning,
        [ProvisioningMethod::NoCloud, ProvisioningMethod::Azure]
    );
    for f in [&e.disk, &e.dir.join("meta.json")] {
        let mode = fs::metadata(f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o444, "{}", f.display());
    }
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(e.dir.join("meta.json")).expect("read")).expect("json");
    assert_eq!(json["hyperVGeneration"], "V2");
    assert_eq!(json["osType"], "Linux");
    assert_eq!(
        json["provisioning"],
        serde_json::json!(["nocloud", "azure"])
    );
    assert_eq!(json["defaultAdminUser"], "azureuser");
    assert_eq!(json["planInfo"]["planPublisher"], "q");
    assert_eq!(json["virtualSize"], 2 * MIB);
    assert!(
        json["createdTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 20),
        "{json}"
    );

    let r = cat
        .resolve(
            "canonical",
            "ubuntuserver",
            "22_04-LTS-gen2",
            "22.4.202311010",
        )
        .expect("numeric lookup");
    assert_eq!(r.exact_version, "22.04.202311010");

    // A build overlay on a catalog image leaves the catalog image untouched.
    let sum = sha256sum(&e.disk);
    let ov = home.join("build.qcow2");
    QemuImg::new()
        .create_overlay(&e.disk, DiskFormat::Qcow2, &ov, Some(4 * MIB))
        .expect("overlay");
    qemu_io(&ov, "qcow2", "write -P 0xee 0 64k");
    assert_eq!(sha256sum(&e.disk), sum);
    assert_eq!(first_byte(&e.disk), 7);
}

#[test]
fn invalid_requests_and_failed_imports_leave_no_trace() {
    let home = TempDir::new("cat-invalid");
    let cat = Catalog::new(home.join("catalog"));
    let disk = tagged_disk(&home, "d.raw", 1);
    for v in ["1.0", "latest", "1.0.x", "1.0.0.0", ""] {
        let err = import(&cat, &req("P", "O", "S", v, &disk)).expect_err(v);
        assert!(
            matches!(err, CatalogError::InvalidVersion { .. }),
            "{v}: {err:?}"
        );
    }
    for (p, o, s) in [
        ("../x", "O", "S"),
        ("P", "a/b", "S"),
        ("P", "O", ""),
        (".hidden", "O", "S"),
    ] {
        let err = import(&cat, &req(p, o, s, "1.0.0", &disk)).expect_err(p);
        assert!(matches!(err, CatalogError::InvalidName { .. }), "{err:?}");
    }
    assert!(!cat.root().exists(), "nothing was created");

    let bogus = home.join("bogus.qcow2");
    fs::write(&bogus, vec![0x5au8; 4096]).expect("write");
    let mut r = req("P", "O", "S", "1.0.0", &bogus);
    r.disk_format = Some(DiskFormat::Qcow2);
    let err = import(&cat, &r).expect_err("not qcow2");
    assert!(err.to_string().contains("bogus.qcow2"), "{err}");
    assert!(cat.list().expect("list").is_empty());
    assert!(list_names(&cat.root().join(".staging")).is_empty());

    let err =
        import(&cat, &req("P", "O", "S", "1.0.0", &home.join("absent.raw"))).expect_err("absent");
    assert!(err.to_string().contains("absent.raw"), "{err}");
}
