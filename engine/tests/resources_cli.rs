//! The resource verbs as a user runs them, without booting anything: groups, galleries,
//! definitions, template create/show/list/delete, the errors, and `kiln build` recording its
//! (failed) run in the store.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Output};

struct Home(PathBuf);

impl Home {
    fn new(label: &str) -> Home {
        let d = std::env::temp_dir().join(format!("kiln-res-cli-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("home");
        Home(d)
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", &self.0)
            .env("NO_COLOR", "1")
            .env(
                "KILN_SUBSCRIPTION_ID",
                "11111111-2222-3333-4444-555555555555",
            )
            .args(args)
            .output()
            .expect("run kiln")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    fn fails(&self, args: &[&str], code: i32, text: &str) {
        let out = self.kiln(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "kiln {args:?}: {err}");
        assert!(
            err.contains(text),
            "kiln {args:?}: expected `{text}` in: {err}"
        );
    }

    fn template(&self, name: &str, source: Value, distribute: Value) -> String {
        let t = json!({
            "type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01", "location": "westus2",
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {"/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
            "properties": {"source": source, "customize": [{"type": "Shell", "inline": ["true"]}], "distribute": distribute}
        });
        let p = self.0.join(format!("{name}.json"));
        std::fs::write(&p, serde_json::to_vec(&t).expect("json")).expect("write");
        p.display().to_string()
    }
}

const SUB: &str = "11111111-2222-3333-4444-555555555555";

#[test]
fn groups_galleries_templates_from_the_command_line() {
    let h = Home::new("verbs");
    let acct = h.json(&["account", "show"]);
    assert_eq!(acct["id"], SUB);
    assert_eq!(acct["subscriptionSource"], "KILN_SUBSCRIPTION_ID");
    h.fails(
        &["template", "list", "-g", "rg"],
        1,
        "ResourceGroupNotFound",
    );
    let g = h.json(&[
        "group", "create", "-n", "rg", "-l", "westus2", "--tags", "team=img",
    ]);
    assert_eq!(g["id"], format!("/subscriptions/{SUB}/resourceGroups/rg"));
    assert_eq!(g["tags"]["team"], "img");
    h.fails(
        &["group", "create", "-n", "RG", "-l", "eastus"],
        1,
        "InvalidResourceGroupLocation",
    );
    h.json(&["sig", "create", "-g", "rg", "-r", "gal"]);
    h.fails(
        &[
            "sig",
            "image-definition",
            "create",
            "-g",
            "rg",
            "-r",
            "nope",
            "-i",
            "d",
            "-p",
            "p",
            "-f",
            "o",
            "-s",
            "s",
            "--os-type",
            "Linux",
        ],
        1,
        "ParentResourceNotFound",
    );
    let d = h.json(&[
        "sig",
        "image-definition",
        "create",
        "-g",
        "rg",
        "-r",
        "gal",
        "-i",
        "d",
        "-p",
        "p",
        "-f",
        "o",
        "-s",
        "s",
        "--os-type",
        "Linux",
        "--hyper-v-generation",
        "V2",
    ]);
    assert_eq!(d["properties"]["hyperVGeneration"], "V2");
    assert_eq!(
        d["properties"]["identifier"],
        json!({"publisher": "p", "offer": "o", "sku": "s"})
    );
    assert_eq!(
        h.json(&[
            "sig",
            "image-version",
            "list",
            "-g",
            "rg",
            "-r",
            "gal",
            "-i",
            "d"
        ]),
        json!([])
    );

    let plat = json!({"type": "PlatformImage", "publisher": "none", "offer": "none", "sku": "none", "version": "latest"});
    let vhd = json!([{"type": "VHD", "runOutputName": "v"}]);
    let f = h.template("t1", plat.clone(), vhd.clone());
    let t = h.json(&["template", "create", "-g", "rg", "-n", "t1", "-f", &f]);
    assert_eq!(t["id"], format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.VirtualMachineImages/imageTemplates/t1"));
    assert_eq!(t["properties"]["provisioningState"], "Succeeded");
    assert!(t["properties"].get("lastRunStatus").is_none(), "never run");
    // Same body again: fine. Another body: AIB's error.
    h.json(&["template", "create", "-g", "rg", "-n", "t1", "-f", &f]);
    let f2 = h.template(
        "t1b",
        plat.clone(),
        json!([{"type": "VHD", "runOutputName": "other"}]),
    );
    h.fails(
        &["template", "create", "-g", "rg", "-n", "t1", "-f", &f2],
        1,
        "TemplateImmutable",
    );
    // A ManagedImage source that does not exist: created Failed, with AIB's provisioningError.
    let f3 = h.template("t3", json!({"type": "ManagedImage", "imageId": format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/images/none")}), vhd.clone());
    let out = h.kiln(&["template", "create", "-g", "rg", "-n", "t3", "-f", &f3]);
    assert_eq!(out.status.code(), Some(1));
    let t3: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(t3["properties"]["provisioningState"], "Failed");
    assert_eq!(
        t3["properties"]["provisioningError"]["provisioningErrorCode"],
        "BadManagedImageSource"
    );
    h.fails(
        &["template", "run", "-g", "rg", "-n", "t3"],
        1,
        "provisioningState Failed",
    );
    let list = h.json(&["template", "list", "-g", "rg"]);
    assert_eq!(list["value"].as_array().map(Vec::len), Some(2));
    h.fails(
        &["template", "cancel", "-g", "rg", "-n", "t1"],
        1,
        "NoRunInProgress",
    );
    assert_eq!(
        h.json(&["template", "output", "list", "-g", "rg", "-n", "t1"]),
        json!({"value": []})
    );
    h.fails(
        &["group", "delete", "-n", "rg", "--yes"],
        1,
        "ResourceGroupNotEmpty",
    );
    let staging = t["properties"]["exactStagingResourceGroup"]
        .as_str()
        .expect("staging")
        .rsplit('/')
        .next()
        .expect("name")
        .to_string();
    assert!(h.0.join("staging").join(&staging).is_dir());
    assert!(h
        .kiln(&["template", "delete", "-g", "rg", "-n", "t1"])
        .status
        .success());
    assert!(!h.0.join("staging").join(&staging).exists());
    h.fails(
        &["template", "show", "-g", "rg", "-n", "t1"],
        1,
        "ResourceNotFound",
    );
}

#[test]
fn kiln_build_records_its_run() {
    let h = Home::new("build");
    // No such catalog image: the run fails in Building, before anything boots, and is recorded.
    let f = h.template("oneshot", json!({"type": "PlatformImage", "publisher": "none", "offer": "none", "sku": "none", "version": "latest"}), json!([{"type": "VHD", "runOutputName": "v"}]));
    let out = h.kiln(&[
        "build", "-g", "rg", "--name", "oneshot", "--output", "json", &f,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = h.json(&["template", "show", "-g", "rg", "-n", "oneshot"]);
    assert_eq!(t["properties"]["lastRunStatus"]["runState"], "Failed");
    assert_eq!(t["properties"]["lastRunStatus"]["runSubState"], "Building");
    assert!(t["properties"]["lastRunStatus"]["endTime"]
        .as_str()
        .is_some());
    let runs = h.json(&["template", "show-runs", "-g", "rg", "-n", "oneshot"]);
    assert_eq!(runs.as_array().map(Vec::len), Some(1));
    // The group was created for the one-shot build, in the template's location.
    assert_eq!(
        h.json(&["group", "show", "-n", "rg"])["location"],
        "westus2"
    );
}
