//! `kiln validate` as a user runs it: exit codes, JSON on stdout, diagnostics on stderr.

use std::path::PathBuf;
use std::process::Command;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("NO_COLOR", "1");
    c
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn the_shipped_examples_are_valid() {
    let out = kiln()
        .arg("validate")
        .arg(repo("examples/tiny-vhd.json"))
        .output()
        .expect("run kiln");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln()
        .arg("validate")
        .arg(repo("examples/arm-deployment.json"))
        .arg("--parameters")
        .arg(repo("examples/arm-deployment.parameters.json"))
        .args(["--output", "json", "--print-normalized"])
        .output()
        .expect("run kiln");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["valid"], true);
    assert_eq!(v["form"], "armDeployment");
    let n = &v["templates"][0]["normalized"];
    assert_eq!(n["name"], "kiln-example-debian");
    assert_eq!(n["location"], "local", "resourceGroup().location");
    assert_eq!(
        n["properties"]["distribute"][0]["runOutputName"],
        "kiln-example-debian-vhd"
    );
    assert_eq!(
        n["properties"]["distribute"][1]["imageId"],
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.Compute/images/kiln-example-debian-image"
    );
}

#[test]
fn a_missing_parameter_is_a_located_error_and_p_fixes_it() {
    let out = kiln()
        .arg("validate")
        .arg(repo("examples/arm-deployment.json"))
        .args(["--output", "json"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let d = v["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .find(|d| d["code"] == "MissingParameter")
        .expect("MissingParameter");
    assert!(
        d["line"].as_u64().is_some() && d["column"].as_u64().is_some(),
        "{d}"
    );
    assert!(
        d["message"]
            .as_str()
            .unwrap_or("")
            .contains("imageTemplateName"),
        "{d}"
    );
    let out = kiln()
        .arg("validate")
        .arg(repo("examples/arm-deployment.json"))
        .args(["-p", "imageTemplateName=x1"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_templates_exit_1_with_rustc_style_diagnostics() {
    let p = tmp("bad.json", br#"{
  "type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01",
  "location": "westus", "identity": {"type": "None"},
  "properties": {
    "source": {"type": "PlatformImage", "publisher": "a", "offer": "b", "sku": "c", "version": "latest"},
    "customize": [{"type": "Shell", "scriptUri": "https://x/s.sh", "sha256Checksum": "abc"}],
    "distribute": [{"type": "VHD", "runOutputName": "v"}]
  }
}"#);
    let out = kiln().arg("validate").arg(&p).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error[BadSha256Checksum]"), "{err}");
    assert!(err.contains("bad.json:6:86"), "{err}");
    assert!(
        err.contains("at properties.customize[0].sha256Checksum"),
        "{err}"
    );
    assert!(err.contains("= fix:"), "{err}");
    assert!(out.stdout.is_empty(), "data only on stdout");
}

#[test]
fn usage_and_io_errors_exit_2() {
    let out = kiln()
        .args(["validate", "/nonexistent/t.json"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = kiln().arg("validate").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let p = tmp("ok.json", b"{}");
    let out = kiln()
        .arg("validate")
        .arg(&p)
        .args(["-p", "novalue"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn garbage_never_panics() {
    for (name, bytes) in [
        ("g.bin", vec![0xffu8, 0xfe, 0, 1, 2, 3]),
        ("deep.json", b"[".repeat(50 * 1024 * 1024)),
    ] {
        let p = tmp(name, &bytes);
        let out = kiln().arg("validate").arg(&p).output().expect("run");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidJson"));
    }
}

#[test]
fn spec_examples_validate() {
    for v in ["2022-02-14", "2025-10-01"] {
        for ex in [
            "CreateImageTemplateLinux.json",
            "CreateImageTemplateWindows.json",
        ] {
            let p = repo(&format!("../shared/spec/{v}/examples/{ex}"));
            let out = kiln().arg("validate").arg(&p).output().expect("run");
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            // The body alone, as a REST body with the example's API version.
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
            let body = tmp(
                &format!("{v}-{ex}"),
                serde_json::to_string(&doc["parameters"]["parameters"])
                    .expect("body")
                    .as_bytes(),
            );
            let out = kiln()
                .arg("validate")
                .arg(&body)
                .args(["--api-version", v])
                .output()
                .expect("run");
            assert_eq!(
                out.status.code(),
                Some(0),
                "{v} {ex} body: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn image_import_and_list_use_kiln_home() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let disk = dir.join("d.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk");
    let home = dir.join("home");
    for v in ["1.0.9", "1.0.10"] {
        let out = kiln()
            .env("KILN_HOME", &home)
            .args([
                "image",
                "import",
                "--publisher",
                "Kiln",
                "--offer",
                "tiny",
                "--sku",
                "gen2",
                "--hyper-v-generation",
                "V2",
                "--version",
                v,
            ])
            .arg(&disk)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = kiln()
        .env("KILN_HOME", &home)
        .args(["image", "list", "--output", "json"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let urns: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["urn"].as_str())
        .collect();
    assert_eq!(
        urns,
        ["Kiln:tiny:gen2:1.0.9", "Kiln:tiny:gen2:1.0.10"],
        "numeric version order"
    );
    assert_eq!(v[0]["meta"]["hyperVGeneration"], "V2");
    // Catalog images are immutable.
    let out = kiln()
        .env("KILN_HOME", &home)
        .args([
            "image",
            "import",
            "--publisher",
            "kiln",
            "--offer",
            "tiny",
            "--sku",
            "gen2",
            "--version",
            "1.0.9",
        ])
        .arg(&disk)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let _ = std::fs::remove_dir_all(&dir);
}
