//! Data-driven tests of every validation rule: each case edits a known-good template and asserts
//! the exact code and JSON path kiln reports (or that the template stays valid).

use kiln_engine::template::{self, LoadOptions};
use serde_json::{json, Value as J};

const SHA: &str = "2c0fd7d1d1b4e0bf1bfb7d08b8cbd0e4aefaf6bd5a5b8c9b4b9a0a1f4e2f3b7c";

fn base(api: &str) -> J {
    json!({
        "type": "Microsoft.VirtualMachineImages/imageTemplates",
        "apiVersion": api,
        "name": "kiln-test",
        "location": "westus2",
        "identity": {
            "type": "UserAssigned",
            "userAssignedIdentities": {
                "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}
            }
        },
        "properties": {
            "buildTimeoutInMinutes": 60,
            "vmProfile": { "vmSize": "Standard_D2s_v3", "osDiskSizeGB": 30 },
            "source": { "type": "PlatformImage", "publisher": "kiln", "offer": "tiny", "sku": "gen1", "version": "latest" },
            "customize": [
                { "type": "Shell", "name": "inline", "inline": ["echo hi > /tmp/hi"] },
                { "type": "Shell", "name": "uri", "scriptUri": "https://example.com/s.sh", "sha256Checksum": SHA },
                { "type": "File", "name": "file", "sourceUri": "https://example.com/f", "destination": "/tmp/f" }
            ],
            "distribute": [
                { "type": "VHD", "runOutputName": "vhd" },
                { "type": "ManagedImage", "runOutputName": "mi", "location": "westus2",
                  "imageId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/images/img" },
                { "type": "SharedImage", "runOutputName": "sig", "replicationRegions": ["westus2"],
                  "galleryImageId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d" }
            ]
        }
    })
}

fn set(v: &mut J, pointer: &str, value: J) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let p = if parent.is_empty() {
        &mut *v
    } else {
        v.pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent}"))
    };
    match p {
        J::Object(m) => {
            if value.is_null() {
                m.remove(key);
            } else {
                m.insert(key.to_string(), value);
            }
        }
        J::Array(a) => {
            let i: usize = key.parse().expect("index");
            if value.is_null() {
                a.remove(i);
            } else if i == a.len() {
                a.push(value);
            } else {
                a[i] = value;
            }
        }
        _ => panic!("{parent} is not a container"),
    }
}

/// Renames an object key, keeping its value.
fn rename(v: &mut J, pointer: &str, new_key: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let m = v
        .pointer_mut(parent)
        .and_then(J::as_object_mut)
        .expect("object");
    let val = m.remove(key).expect("key");
    m.insert(new_key.to_string(), val);
}

fn load(t: &J) -> template::Document {
    let text = serde_json::to_string_pretty(t).expect("json");
    template::load("case.json", text.as_bytes(), &LoadOptions::default())
}

fn codes(doc: &template::Document) -> Vec<String> {
    doc.all_diagnostics()
        .map(|d| format!("{}:{}@{}", d.severity.as_str(), d.code, d.path))
        .collect()
}

#[track_caller]
fn expect(t: &J, severity: &str, code: &str, path: &str) {
    let doc = load(t);
    let want = format!("{severity}:{code}@{path}");
    let got = codes(&doc);
    assert!(got.contains(&want), "expected {want}, got {got:?}");
    // Every reported diagnostic has a location in the file.
    for d in doc.all_diagnostics() {
        assert!(d.span.is_some(), "diagnostic without location: {d:?}");
    }
}

#[track_caller]
fn expect_valid(t: &J) {
    let doc = load(t);
    let errors: Vec<String> = codes(&doc)
        .into_iter()
        .filter(|c| c.starts_with("error"))
        .collect();
    assert!(doc.is_valid(), "expected valid, got {errors:?}");
}

#[test]
fn the_base_template_is_valid_in_every_ga_version() {
    for api in [
        "2020-02-14",
        "2021-10-01",
        "2022-02-14",
        "2022-07-01",
        "2023-07-01",
        "2024-02-01",
        "2025-10-01",
    ] {
        let doc = load(&base(api));
        assert!(doc.is_valid(), "{api}: {:?}", codes(&doc));
        assert_eq!(doc.templates[0].api_version.as_str(), api);
        assert!(doc.templates[0].model.is_some());
    }
}

#[test]
fn required_properties() {
    for (ptr, path) in [
        ("/location", "location"),
        ("/identity", "identity"),
        ("/properties/source", "properties.source"),
        ("/properties/distribute", "properties.distribute"),
    ] {
        let mut t = base("2022-07-01");
        set(&mut t, ptr, J::Null);
        expect(&t, "error", "MissingRequiredField", path);
    }
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute/0/runOutputName", J::Null);
    expect(
        &t,
        "error",
        "MissingRequiredField",
        "properties.distribute[0].runOutputName",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute/1/imageId", J::Null);
    expect(
        &t,
        "error",
        "MissingRequiredField",
        "properties.distribute[1].imageId",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties", J::Null);
    expect(&t, "error", "MissingRequiredField", "properties");
}

#[test]
fn discriminators() {
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/source/type", json!("Marketplace"));
    expect(&t, "error", "BadSourceType", "properties.source.type");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/source/type", json!("ISO"));
    expect(&t, "error", "LegacyPreviewShape", "properties.source.type");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/0/type", json!("Bash"));
    expect(
        &t,
        "error",
        "BadCustomizerType",
        "properties.customize[0].type",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/0/type", J::Null);
    expect(&t, "error", "BadCustomizerType", "properties.customize[0]");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute/0/type", json!("Blob"));
    expect(
        &t,
        "error",
        "BadDistributeType",
        "properties.distribute[0].type",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute", json!([]));
    expect(&t, "error", "BadDistributeType", "properties.distribute");
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/validate",
        json!({"inVMValidations": [{"type": "Python", "inline": ["x"]}]}),
    );
    expect(
        &t,
        "error",
        "BadValidatorType",
        "properties.validate.inVMValidations[0].type",
    );
}

#[test]
fn exactly_one_of_script_uri_and_inline() {
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/customize/0/scriptUri",
        json!("https://example.com/x.sh"),
    );
    expect(&t, "error", "NoCustomizerScript", "properties.customize[0]");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/0/inline", J::Null);
    expect(&t, "error", "NoCustomizerScript", "properties.customize[0]");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/0/inline", json!([]));
    expect(&t, "error", "NoCustomizerScript", "properties.customize[0]");
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/2/destination", J::Null);
    expect(
        &t,
        "error",
        "NoCustomizerScript",
        "properties.customize[2].destination",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/validate",
        json!({"inVMValidations": [{"type": "Shell", "name": "v"}]}),
    );
    expect(
        &t,
        "error",
        "NoValidatorScript",
        "properties.validate.inVMValidations[0]",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/customize/0/script",
        json!("https://example.com/x.sh"),
    );
    set(&mut t, "/properties/customize/0/inline", J::Null);
    expect(
        &t,
        "error",
        "LegacyPreviewShape",
        "properties.customize[0].script",
    );
}

#[test]
fn powershell_run_as_system_needs_run_elevated() {
    let ps = |extra: J| {
        let mut t = base("2022-07-01");
        let mut c = json!({"type": "PowerShell", "name": "ps", "inline": ["Write-Host hi"]});
        for (k, v) in extra.as_object().expect("obj") {
            c[k] = v.clone();
        }
        set(&mut t, "/properties/customize/3", c);
        t
    };
    expect(
        &ps(json!({"runAsSystem": true})),
        "error",
        "RunAsSystemWithoutElevated",
        "properties.customize[3].runAsSystem",
    );
    expect(
        &ps(json!({"runAsSystem": true, "runElevated": false})),
        "error",
        "RunAsSystemWithoutElevated",
        "properties.customize[3].runAsSystem",
    );
    expect_valid(&ps(
        json!({"runAsSystem": true, "runElevated": true, "validExitCodes": [0, 3010]}),
    ));
    expect(
        &ps(json!({"validExitCodes": ["0"]})),
        "error",
        "InvalidType",
        "properties.customize[3].validExitCodes[0]",
    );
    expect(
        &ps(json!({"runElevated": "true"})),
        "error",
        "InvalidType",
        "properties.customize[3].runElevated",
    );
}

#[test]
fn build_timeout_range() {
    for (v, ok) in [
        (0, true),
        (1, false),
        (5, false),
        (6, true),
        (240, true),
        (960, true),
        (961, false),
        (-1, false),
    ] {
        let mut t = base("2022-07-01");
        set(&mut t, "/properties/buildTimeoutInMinutes", json!(v));
        if ok {
            expect_valid(&t);
        } else {
            expect(
                &t,
                "error",
                "BadBuildTimeout",
                "properties.buildTimeoutInMinutes",
            );
        }
    }
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/buildTimeoutInMinutes", json!("60"));
    expect(
        &t,
        "error",
        "InvalidType",
        "properties.buildTimeoutInMinutes",
    );
}

#[test]
fn names_and_run_output_names() {
    let mut t = base("2022-07-01");
    set(&mut t, "/name", json!("my template"));
    expect(&t, "error", "BadName", "name");
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/0/runOutputName",
        json!("x".repeat(65)),
    );
    expect(
        &t,
        "error",
        "BadName",
        "properties.distribute[0].runOutputName",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/runOutputName",
        json!("VHD"),
    );
    expect(
        &t,
        "error",
        "DuplicateRunOutputName",
        "properties.distribute[2].runOutputName",
    );
}

#[test]
fn shared_image_replication_by_version() {
    // replicationRegions is required up to 2022-02-14, optional from 2022-07-01.
    for (api, required) in [
        ("2020-02-14", true),
        ("2022-02-14", true),
        ("2022-07-01", false),
        ("2025-10-01", false),
    ] {
        let mut t = base(api);
        set(
            &mut t,
            "/properties/distribute/2/replicationRegions",
            J::Null,
        );
        if required {
            expect(
                &t,
                "error",
                "BadSharedImageDistribute",
                "properties.distribute[2].replicationRegions",
            );
        } else {
            expect_valid(&t);
        }
    }
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/targetRegions",
        json!([{"name": "westus2", "replicaCount": 2}]),
    );
    expect(
        &t,
        "error",
        "BadSharedImageDistribute",
        "properties.distribute[2].targetRegions",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/replicationRegions",
        J::Null,
    );
    set(
        &mut t,
        "/properties/distribute/2/targetRegions",
        json!([{"name": "westus2", "replicaCount": 0}]),
    );
    expect(
        &t,
        "error",
        "InvalidValue",
        "properties.distribute[2].targetRegions[0].replicaCount",
    );
    let mut t = base("2022-02-14");
    set(
        &mut t,
        "/properties/distribute/2/targetRegions",
        json!([{"name": "westus2"}]),
    );
    expect(
        &t,
        "error",
        "FeatureNotInApiVersion",
        "properties.distribute[2].targetRegions",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/galleryImageId",
        json!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/x"),
    );
    expect(
        &t,
        "error",
        "BadSharedImageDistribute",
        "properties.distribute[2].galleryImageId",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute/2/galleryImageId", J::Null);
    expect(
        &t,
        "error",
        "BadSharedImageDistribute",
        "properties.distribute[2].galleryImageId",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/versioning",
        json!({"scheme": "Latest", "major": 2}),
    );
    expect_valid(&t);
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/distribute/2/versioning",
        json!({"scheme": "Newest"}),
    );
    expect(
        &t,
        "error",
        "InvalidValue",
        "properties.distribute[2].versioning.scheme",
    );
}

#[test]
fn features_by_api_version() {
    let cases: Vec<(&str, &str, J, &str)> = vec![
        (
            "2022-02-14",
            "/properties/distribute/0/uri",
            json!("https://x.blob.core.windows.net/c/a.vhd"),
            "properties.distribute[0].uri",
        ),
        (
            "2022-02-14",
            "/properties/errorHandling",
            json!({"onCustomizerError": "abort"}),
            "properties.errorHandling",
        ),
        (
            "2020-02-14",
            "/properties/validate",
            json!({"sourceValidationOnly": true}),
            "properties.validate",
        ),
        (
            "2020-02-14",
            "/properties/stagingResourceGroup",
            json!("/subscriptions/s/resourceGroups/st"),
            "properties.stagingResourceGroup",
        ),
        (
            "2020-02-14",
            "/properties/vmProfile/userAssignedIdentities",
            json!([]),
            "properties.vmProfile.userAssignedIdentities",
        ),
        (
            "2023-07-01",
            "/properties/autoRun",
            json!({"state": "Enabled"}),
            "properties.autoRun",
        ),
        (
            "2024-02-01",
            "/properties/additionalDataDisks",
            json!([{"sizeGB": 10}]),
            "properties.additionalDataDisks",
        ),
    ];
    for (api, ptr, v, path) in cases {
        let mut t = base(api);
        set(&mut t, ptr, v);
        expect(&t, "error", "FeatureNotInApiVersion", path);
    }
    // The File validator arrived in 2022-07-01.
    let file_validator = json!({"inVMValidations": [{"type": "File", "sourceUri": "https://example.com/f", "destination": "/tmp/f"}]});
    let mut t = base("2022-02-14");
    set(&mut t, "/properties/validate", file_validator.clone());
    expect(
        &t,
        "error",
        "UnsupportedValidatorType",
        "properties.validate.inVMValidations[0].type",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/validate", file_validator);
    expect_valid(&t);
    // The same properties are fine where they exist.
    let mut t = base("2025-10-01");
    set(
        &mut t,
        "/properties/distribute/0/uri",
        json!("file:///var/tmp/out.vhd"),
    );
    set(
        &mut t,
        "/properties/errorHandling",
        json!({"onCustomizerError": "abort", "onValidationError": "cleanup"}),
    );
    set(
        &mut t,
        "/properties/additionalDataDisks",
        json!([{"sizeGB": 10}]),
    );
    set(&mut t, "/properties/autoRun", json!({"state": "Disabled"}));
    expect_valid(&t);
}

#[test]
fn case_and_unknown_fields_follow_the_api_version() {
    // Before 2024-02-01: accepted, normalized, warned about.
    let mut t = base("2022-02-14");
    set(
        &mut t,
        "/properties/distribute/2/type",
        json!("sharedImage"),
    );
    rename(&mut t, "/properties/source/version", "Version");
    set(&mut t, "/properties/customize/0/runAsRoot", json!(true));
    expect(&t, "warning", "WrongCase", "properties.distribute[2].type");
    expect(&t, "warning", "WrongCase", "properties.source.version");
    expect(
        &t,
        "warning",
        "UnknownField",
        "properties.customize[0].runAsRoot",
    );
    expect_valid(&t);
    let doc = load(&t);
    let n = &doc.templates[0].normalized;
    assert_eq!(n["properties"]["distribute"][2]["type"], "SharedImage");
    assert_eq!(n["properties"]["source"]["version"], "latest");
    assert!(n["properties"]["customize"][0].get("runAsRoot").is_none());
    // From 2024-02-01: errors.
    let mut t = base("2024-02-01");
    set(
        &mut t,
        "/properties/distribute/2/type",
        json!("sharedImage"),
    );
    rename(&mut t, "/properties/source/version", "Version");
    set(&mut t, "/properties/customize/0/runAsRoot", json!(true));
    expect(&t, "error", "WrongCase", "properties.distribute[2].type");
    expect(&t, "error", "WrongCase", "properties.source.version");
    expect(
        &t,
        "error",
        "UnknownField",
        "properties.customize[0].runAsRoot",
    );
    // errorHandling values are lower case.
    let mut t = base("2024-02-01");
    set(
        &mut t,
        "/properties/errorHandling",
        json!({"onCustomizerError": "Abort"}),
    );
    expect(
        &t,
        "error",
        "WrongCase",
        "properties.errorHandling.onCustomizerError",
    );
    let mut t = base("2024-02-01");
    set(
        &mut t,
        "/properties/errorHandling",
        json!({"onCustomizerError": "keep"}),
    );
    expect(
        &t,
        "error",
        "InvalidValue",
        "properties.errorHandling.onCustomizerError",
    );
    // imageVersionID → imageVersionId
    let mut t = base("2022-02-14");
    set(
        &mut t,
        "/properties/source",
        json!({"type": "SharedImageVersion",
        "imageVersionID": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.0.0"}),
    );
    expect(
        &t,
        "warning",
        "WrongCase",
        "properties.source.imageVersionId",
    );
    expect_valid(&t);
}

#[test]
fn checksums_timeouts_and_destinations() {
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/customize/1/sha256Checksum",
        json!("abc"),
    );
    expect(
        &t,
        "error",
        "BadSha256Checksum",
        "properties.customize[1].sha256Checksum",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/customize/1/sha256Checksum",
        json!(SHA.to_uppercase()),
    );
    expect_valid(&t);
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/customize/1/sha256Checksum", json!(""));
    expect_valid(&t);
    for (v, ok) in [
        ("5m", true),
        ("1h30m", true),
        ("90s", true),
        ("5", false),
        ("five minutes", false),
        ("5M", false),
    ] {
        let mut t = base("2022-07-01");
        set(
            &mut t,
            "/properties/customize/3",
            json!({"type": "WindowsRestart", "restartTimeout": v}),
        );
        if ok {
            expect_valid(&t);
        } else {
            expect(
                &t,
                "error",
                "BadRestartTimeout",
                "properties.customize[3].restartTimeout",
            );
        }
    }
    for (d, ok) in [
        ("/tmp/x", true),
        ("/etc/motd", false),
        ("/tmp", false),
        ("relative/x", false),
        ("C:\\buildArtifacts\\x.html", true),
    ] {
        let mut t = base("2022-07-01");
        set(&mut t, "/properties/customize/2/destination", json!(d));
        if ok {
            expect_valid(&t);
        } else {
            expect(
                &t,
                "error",
                "BadFileDestination",
                "properties.customize[2].destination",
            );
        }
    }
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/customize/1/scriptUri",
        json!("ftp://example.com/s.sh"),
    );
    expect(
        &t,
        "error",
        "UnsupportedUriScheme",
        "properties.customize[1].scriptUri",
    );
}

#[test]
fn resource_id_shapes() {
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/source",
        json!({"type": "ManagedImage", "imageId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d"}),
    );
    expect(
        &t,
        "error",
        "BadManagedImageSource",
        "properties.source.imageId",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/source",
        json!({"type": "SharedImageVersion", "imageVersionId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d"}),
    );
    expect(
        &t,
        "error",
        "BadSharedImageVersionSource",
        "properties.source.imageVersionId",
    );
    // versions/latest from 2022-07-01 only.
    let latest = json!({"type": "SharedImageVersion", "imageVersionId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/latest"});
    let mut t = base("2022-02-14");
    set(&mut t, "/properties/source", latest.clone());
    expect(
        &t,
        "error",
        "BadSharedImageVersionSource",
        "properties.source.imageVersionId",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/source", latest);
    expect_valid(&t);
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/distribute/1/imageId", json!("myImage"));
    expect(
        &t,
        "error",
        "BadResourceId",
        "properties.distribute[1].imageId",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/vmProfile/vnetConfig",
        json!({"subnetId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v"}),
    );
    expect(
        &t,
        "error",
        "BadResourceId",
        "properties.vmProfile.vnetConfig.subnetId",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/vmProfile/userAssignedIdentities",
        json!(["/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/x"]),
    );
    expect(
        &t,
        "error",
        "BadResourceId",
        "properties.vmProfile.userAssignedIdentities[0]",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/stagingResourceGroup",
        json!("my-staging-rg"),
    );
    expect(
        &t,
        "error",
        "BadStagingResourceGroup",
        "properties.stagingResourceGroup",
    );
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/properties/source/planInfo",
        json!({"planName": "p", "planProduct": "q"}),
    );
    expect(
        &t,
        "error",
        "BadPIRSource",
        "properties.source.planInfo.planPublisher",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/source/sku", J::Null);
    expect(&t, "error", "BadPIRSource", "properties.source.sku");
}

#[test]
fn identities() {
    let mut t = base("2022-07-01");
    set(&mut t, "/identity/userAssignedIdentities", json!({}));
    expect(
        &t,
        "error",
        "BadIdentity",
        "identity.userAssignedIdentities",
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/identity/type", json!("SystemAssigned"));
    expect(&t, "error", "InvalidValue", "identity.type");
    let mut t = base("2022-07-01");
    set(
        &mut t,
        "/identity/userAssignedIdentities",
        json!({"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/x": {}}),
    );
    expect(&t, "error", "BadResourceId", "identity.userAssignedIdentities[\"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/x\"]");
}

#[test]
fn placeholders_and_read_only_fields() {
    let mut t = base("2022-07-01");
    set(&mut t, "/location", json!("<region>"));
    set(&mut t, "/properties/distribute/1/imageId", json!("/subscriptions/<subscriptionID>/resourceGroups/rg/providers/Microsoft.Compute/images/img"));
    set(
        &mut t,
        "/properties/customize/0/inline",
        json!(["echo '<html>' > /tmp/index.html"]),
    );
    expect(&t, "error", "UnresolvedPlaceholder", "location");
    expect(
        &t,
        "error",
        "UnresolvedPlaceholder",
        "properties.distribute[1].imageId",
    );
    let doc = load(&t);
    assert!(
        !codes(&doc).iter().any(|c| c.contains("customize[0]")),
        "inline scripts may contain <tags>"
    );
    assert!(
        !codes(&doc).iter().any(|c| c.contains("BadResourceId")),
        "a placeholder is reported once"
    );
    let mut t = base("2022-07-01");
    set(&mut t, "/properties/provisioningState", json!("Succeeded"));
    set(
        &mut t,
        "/properties/lastRunStatus",
        json!({"runState": "Succeeded"}),
    );
    set(&mut t, "/properties/source/exactVersion", json!("1.0.0"));
    expect(
        &t,
        "warning",
        "ReadOnlyField",
        "properties.provisioningState",
    );
    expect(&t, "warning", "ReadOnlyField", "properties.lastRunStatus");
    expect(
        &t,
        "warning",
        "ReadOnlyField",
        "properties.source.exactVersion",
    );
    expect_valid(&t);
    let doc = load(&t);
    assert!(doc.templates[0].normalized["properties"]
        .get("provisioningState")
        .is_none());
}

#[test]
fn preview_and_unknown_api_versions() {
    let mut t = base("2019-05-01-preview");
    set(&mut t, "/identity", J::Null);
    expect(&t, "error", "LegacyPreviewShape", "apiVersion");
    expect(&t, "error", "MissingRequiredField", "identity");
    let t = base("2023-01-01");
    expect(&t, "error", "UnsupportedApiVersion", "apiVersion");
}

#[test]
fn rest_bodies_take_the_api_version_option() {
    let mut t = base("2022-07-01");
    set(&mut t, "/type", J::Null);
    set(&mut t, "/apiVersion", J::Null);
    set(
        &mut t,
        "/properties/distribute/0/uri",
        json!("/var/tmp/x.vhd"),
    );
    let text = serde_json::to_string(&t).expect("json");
    // Default 2022-02-14: VHD uri does not exist there.
    let doc = template::load("body.json", text.as_bytes(), &LoadOptions::default());
    assert_eq!(doc.form, Some(template::InputForm::RestBody));
    assert!(codes(&doc)
        .contains(&"error:FeatureNotInApiVersion@properties.distribute[0].uri".to_string()));
    let opts = LoadOptions {
        api_version: Some("2022-07-01".into()),
        ..LoadOptions::default()
    };
    let doc = template::load("body.json", text.as_bytes(), &opts);
    assert!(doc.is_valid(), "{:?}", codes(&doc));
}

#[test]
fn defaults_are_applied_as_aib_does() {
    let mut t = base("2023-07-01");
    set(&mut t, "/properties/buildTimeoutInMinutes", json!(0));
    set(
        &mut t,
        "/properties/customize/3",
        json!({"type": "PowerShell", "inline": ["x"]}),
    );
    set(
        &mut t,
        "/properties/customize/4",
        json!({"type": "WindowsRestart"}),
    );
    set(
        &mut t,
        "/properties/customize/5",
        json!({"type": "WindowsUpdate", "updateLimit": 0}),
    );
    let doc = load(&t);
    assert!(doc.is_valid(), "{:?}", codes(&doc));
    let p = &doc.templates[0].normalized["properties"];
    assert_eq!(p["buildTimeoutInMinutes"], 240);
    assert_eq!(p["customize"][3]["validExitCodes"], json!([0]));
    assert_eq!(p["customize"][3]["runElevated"], false);
    assert_eq!(
        p["customize"][4]["restartCommand"],
        "shutdown /r /f /t 0 /c \"packer restart\""
    );
    assert_eq!(p["customize"][4]["restartTimeout"], "5m");
    assert_eq!(p["customize"][5]["updateLimit"], 1000);
    assert_eq!(
        p["customize"][5]["searchCriteria"],
        "BrowseOnly=0 and IsInstalled=0"
    );
    assert_eq!(
        p["errorHandling"],
        json!({"onCustomizerError": "cleanup", "onValidationError": "cleanup"})
    );
    assert_eq!(p["distribute"][2]["excludeFromLatest"], false);
    assert_eq!(p["distribute"][2]["storageAccountType"], "Standard_LRS");
    let m = doc.templates[0].model.as_ref().expect("model");
    assert_eq!(m.properties.build_timeout_in_minutes, 240);
    assert_eq!(m.properties.vm_profile.os_disk_size_gb, 30);
}

#[test]
fn locations_point_at_the_value() {
    let text = "{\n  \"type\": \"Microsoft.VirtualMachineImages/imageTemplates\",\n  \"apiVersion\": \"2022-07-01\",\n  \"location\": \"westus\",\n  // a comment\n  \"identity\": {\"type\": \"None\"},\n  \"properties\": {\n    \"buildTimeoutInMinutes\": 3,\n    \"source\": {\"type\": \"PlatformImage\", \"publisher\": \"a\", \"offer\": \"b\", \"sku\": \"c\", \"version\": \"latest\"},\n    \"distribute\": [{\"type\": \"VHD\", \"runOutputName\": \"v\"},],\n  }\n}\n";
    let doc = template::load("t.json", text.as_bytes(), &LoadOptions::default());
    let d = doc
        .all_diagnostics()
        .find(|d| d.code == "BadBuildTimeout")
        .expect("timeout error");
    assert_eq!(doc.source.line_col(d.span.expect("span").start), (8, 30));
    let commas = doc
        .all_diagnostics()
        .filter(|d| d.code == "TrailingComma")
        .count();
    assert_eq!(commas, 2);
}

#[test]
fn malformed_files_fail_cleanly() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage.bin",
            vec![0u8, 159, 146, 150, 0, 1, 2, 255],
            "InvalidJson",
        ),
        (
            "latin1.json",
            b"{\"location\": \"caf\xe9\"}".to_vec(),
            "InvalidJson",
        ),
        ("deep.json", b"[".repeat(50 * 1024 * 1024), "InvalidJson"),
        ("empty.json", b"".to_vec(), "InvalidJson"),
        ("array.json", b"[1, 2]".to_vec(), "NotATemplate"),
        (
            "main.bicep",
            b"param location string = resourceGroup().location\nresource x 'y' = {}\n".to_vec(),
            "BicepNotSupported",
        ),
        (
            "other.json",
            b"{\"type\": \"Microsoft.Compute/images\", \"location\": \"x\"}".to_vec(),
            "NotATemplate",
        ),
    ];
    for (name, bytes, code) in cases {
        let t0 = std::time::Instant::now();
        let doc = template::load(name, &bytes, &LoadOptions::default());
        assert!(!doc.is_valid(), "{name}");
        assert!(
            doc.all_diagnostics().any(|d| d.code == code),
            "{name}: {:?}",
            codes(&doc)
        );
        assert!(
            t0.elapsed().as_secs() < 10,
            "{name} took {:?}",
            t0.elapsed()
        );
    }
}
