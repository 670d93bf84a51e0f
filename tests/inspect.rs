//! Looking into what a build produced: the `kiln` binary next to the tests, the Linux root
//! partition of an exported disk, files in it through debugfs (no mounting).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>/kiln`, built by `cargo build` (scripts/test.sh builds it first).
pub fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.ancestors().nth(2).expect("target/debug").join("kiln")
}

/// `kiln image import` of `disk` into `home`'s catalog as publisher `kiln`, `offer`, `sku`,
/// version 1.0.0, with `extra` flags (generation, osType, provisioning…); panics with kiln's
/// stderr if it fails.
pub fn import_image(home: &Path, offer: &str, sku: &str, extra: &[&str], disk: &Path) {
    let out = Command::new(kiln_bin())
        .env("KILN_HOME", home)
        .args([
            "image",
            "import",
            "--publisher",
            "kiln",
            "--offer",
            offer,
            "--sku",
            sku,
            "--version",
            "1.0.0",
        ])
        .args(extra)
        .arg(disk)
        .output()
        .expect("kiln image import");
    assert!(
        out.status.success(),
        "kiln image import {offer}/{sku}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// debugfs's stdout, then its stderr (where "File not found by ext2_lookup" goes).
pub fn debugfs(part: &Path, req: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .args(["-R", req])
        .arg(part)
        .output()
        .expect("debugfs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Extracts the Linux root partition of a raw/fixed-VHD disk into `dest`.
pub fn root_partition(disk: &Path, dest: &Path) {
    let out = Command::new("sfdisk")
        .arg("-J")
        .arg(disk)
        .output()
        .expect("sfdisk");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk json");
    let p = j["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| {
            p["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("0FC63DAF-8483-4772-8E79-3D69D8477DE4"))
        })
        .expect("a Linux partition")
        .clone();
    let st = Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", dest.display()))
        .args([
            "bs=512",
            &format!("skip={}", p["start"]),
            &format!("count={}", p["size"]),
            "conv=sparse",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(st.success());
}
