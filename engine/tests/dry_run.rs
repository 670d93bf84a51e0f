//! `kiln build --dry-run`: every corpus template that validates gets a plan from the build's own
//! planner; for Windows and Linux templates the key details are asserted.

use kiln_engine::build::context::{AccelChoice, BuildOptions};
use kiln_engine::build::dry_run::{dry_run, render_text, DryRunPlan};
use kiln_engine::build::BuildRequest;
use kiln_engine::template::{self, LoadOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/templates")
}

fn options(home: &Path) -> BuildOptions {
    BuildOptions {
        kiln_home: home.to_path_buf(),
        resource_group: "rg".into(),
        subscription_id: "00000000-0000-0000-0000-000000000000".into(),
        accel: AccelChoice::Auto,
        keep_vm_on_error: false,
        ssh_timeout: Duration::from_secs(1200),
        vm_sizes: Default::default(),
        timeout_override: None,
        provisioning: None,
        identity_token_command: None,
        disk_bus: None,
        nic_model: None,
        run_id: None,
        run_dir: None,
    }
}

fn empty_home(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-dryrun-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Plans every template of `file` (None when the file does not validate).
fn plans(file: &str, home: &Path) -> Option<Vec<DryRunPlan>> {
    plans_with(file, options(home))
}

/// [`plans`] with the given options.
fn plans_with(file: &str, opts: BuildOptions) -> Option<Vec<DryRunPlan>> {
    let bytes = std::fs::read(corpus_dir().join(file)).expect("corpus file");
    let doc = template::load(file, &bytes, &LoadOptions::default());
    if !doc.is_valid() {
        return None;
    }
    Some(
        doc.templates
            .iter()
            .map(|t| {
                let req = BuildRequest {
                    template: t.model.clone().expect("a valid template has a model"),
                    api_version: t.api_version,
                    name: t.name.clone().unwrap_or_else(|| file.to_string()),
                    template_dir: corpus_dir(),
                    options: opts.clone(),
                };
                dry_run(req).unwrap_or_else(|e| panic!("{file}: dry run failed: {e}"))
            })
            .collect(),
    )
}

fn step<'a>(p: &'a DryRunPlan, name: &str) -> &'a serde_json::Value {
    &p.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no step {name:?} in {:?}",
                p.steps.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
        .details
}

#[test]
fn every_valid_corpus_template_gets_a_plan() {
    let home = empty_home("all");
    let mut planned = 0;
    let mut windows = 0;
    for e in std::fs::read_dir(corpus_dir()).expect("shared/corpus/templates beside the checkout") {
        let file = e.unwrap().file_name().to_string_lossy().into_owned();
        let Some(ps) = plans(&file, &home) else {
            continue;
        };
        for p in ps {
            planned += 1;
            windows += usize::from(p.os == "Windows");
            let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names.first(), Some(&"Resolve source"), "{file}");
            assert_eq!(
                names.last(),
                Some(&"Record runOutputs"),
                "{file}: {names:?}"
            );
            let connect = if p.os == "Windows" {
                "Connect (WinRM)"
            } else {
                "Connect (SSH)"
            };
            assert!(names.contains(&connect), "{file}: {names:?}");
            assert!(
                names.contains(&if p.os == "Windows" {
                    "Sysprep"
                } else {
                    "Deprovision"
                }),
                "{file}: {names:?}"
            );
            for (i, s) in p.steps.iter().enumerate() {
                assert_eq!(s.index, i + 1);
                assert!(
                    s.details.as_object().is_some_and(|o| !o.is_empty()),
                    "{file}: step {} has no details",
                    s.name
                );
            }
            let text = render_text(&p);
            assert!(
                text.contains("nothing was fetched, booted or recorded"),
                "{file}"
            );
        }
    }
    // The corpus expectations list 8 files that validate: 6 Windows, 2 Linux.
    assert_eq!(planned, 8, "templates planned");
    assert_eq!(windows, 6, "Windows plans");
    // Nothing was written to kiln's home.
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "a dry run wrote into KILN_HOME"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn windows_plan_of_the_2025_rest_example() {
    let home = empty_home("rest");
    let file = "Azure__azure-rest-api-specs__specification__imagebuilder__resource-manager__Microsoft.VirtualMachineImages__ImageBuilder__stable__2025-10-01__examples__CreateImageTemplateWindows.json";
    let p = plans(file, &home).expect("valid").remove(0);
    assert_eq!(p.os, "Windows");
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Resolve source",
            "Prepare disk",
            "Fetch artifacts",
            "Provisioning media (answer file)",
            "Start VM",
            "Connect (WinRM)",
            "Customize: PowerShell \"PowerShell (inline) Customizer Example\"",
            "Customize: PowerShell \"PowerShell (inline) Customizer Elevated user Example\"",
            "Customize: PowerShell \"PowerShell (inline) Customizer Elevated Local System user Example\"",
            "Customize: PowerShell \"PowerShell (script) Customizer Example\"",
            "Customize: PowerShell \"PowerShell (script) Customizer Elevated Local System user Example\"",
            "Customize: PowerShell \"PowerShell (script) Customizer Elevated Local System user Example\"",
            "Customize: WindowsRestart \"Restart Customizer Example\"",
            "Customize: WindowsUpdate \"Windows Update Customizer Example\"",
            "Sysprep",
            "Shutdown",
            "Export disk",
            "Distribute",
            "Record runOutputs",
        ]
    );
    // Windows: devices with inbox drivers, the unattend media on removable USB.
    let devices = &step(&p, "Start VM")["devices"];
    assert_eq!(devices["diskBus"], "ahci", "{devices}");
    assert_eq!(devices["nicModel"], "e1000", "{devices}");
    assert!(
        devices["provisioningMedia"]
            .as_str()
            .unwrap()
            .contains("removable USB stick"),
        "{devices}"
    );
    let c = step(&p, "Connect (WinRM)");
    assert_eq!(c["transport"], "WinRM");
    assert!(c["auth"]
        .as_str()
        .unwrap()
        .contains("NTLMv2 with message sealing"));
    assert_eq!(c["timeoutSeconds"], 1200);
    // Inline PowerShell: joined into one file with progress records off.
    let ps = &p.steps[6].details;
    let inline = ps["script"]["inline"].as_str().unwrap();
    assert!(
        inline.starts_with("$ProgressPreference = 'SilentlyContinue'\n"),
        "{inline}"
    );
    assert!(inline.contains("Powershell command-1"), "{inline}");
    assert!(
        ps["command"]
            .as_str()
            .unwrap()
            .contains("-ExecutionPolicy Bypass")
            && ps["command"].as_str().unwrap().contains("-NoProfile")
    );
    assert_eq!(ps["validExitCodes"], serde_json::json!([0]));
    assert!(ps["elevation"].as_str().unwrap().starts_with("none"));
    // runElevated / runAsSystem: through the scheduled-task runner, the password never shown.
    let el = &p.steps[7].details;
    assert!(el["elevation"].as_str().unwrap().starts_with("runElevated"));
    let cmd = el["command"].as_str().unwrap();
    assert!(
        cmd.contains("kiln-elevated.ps1")
            && cmd.contains("-User 'packer'")
            && cmd.contains("<the build password>"),
        "{cmd}"
    );
    let sys = &p.steps[8].details;
    assert!(sys["elevation"]
        .as_str()
        .unwrap()
        .starts_with("runAsSystem"));
    assert!(sys["command"].as_str().unwrap().contains("-AsSystem"));
    // scriptUri with validExitCodes.
    let su = &p.steps[9].details;
    assert_eq!(
        su["script"]["scriptUri"],
        "https://example.com/path/to/script.ps1"
    );
    assert_eq!(su["validExitCodes"], serde_json::json!([0, 1]));
    let fetch = step(&p, "Fetch artifacts");
    assert_eq!(fetch["artifacts"].as_array().unwrap().len(), 3, "{fetch}");
    // WindowsRestart: the template's command, check and timeout.
    let r = step(
        &p,
        "Customize: WindowsRestart \"Restart Customizer Example\"",
    );
    assert_eq!(
        r["restartCommand"],
        "shutdown /f /r /t 0 /c \"packer restart\""
    );
    assert_eq!(
        r["restartCheckCommand"],
        "powershell -command \"& {Write-Output 'restarted.'}\""
    );
    assert_eq!(r["restartTimeout"], "10m (600 s)");
    assert_eq!(r["acceptedExitCodes"], serde_json::json!([0, 1115, 1190]));
    // WindowsUpdate: criteria, the bare filter read as include: (with a warning), limit.
    let u = step(
        &p,
        "Customize: WindowsUpdate \"Windows Update Customizer Example\"",
    );
    assert_eq!(u["searchCriteria"], "BrowseOnly=0 and IsInstalled=0");
    assert_eq!(u["filters"], serde_json::json!(["include:$_.BrowseOnly"]));
    assert_eq!(u["updateLimit"], 100);
    assert!(u["round"].as_str().unwrap().contains("-UpdateLimit 100"));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("filters[0]") && w.contains("include:")),
        "{:?}",
        p.warnings
    );
    let s = step(&p, "Sysprep");
    assert!(s["override"]
        .as_str()
        .unwrap()
        .starts_with(r"c:\DeprovisioningScript.ps1"));
    assert!(s["script"]
        .as_str()
        .unwrap()
        .contains("Sysprep.exe /oobe /generalize /quiet /quit"));
    let media = step(&p, "Provisioning media (answer file)");
    assert!(media["password"].as_str().unwrap().contains("never logged"));
    assert_eq!(media["provisioning"], "unattend (the default for Windows)");
    assert!(media["media"].as_str().unwrap().contains("USB stick"));
    // --provisioning azure: Azure's DVD and the fabric; nocloud cannot carry the password.
    let azure = plans_with(
        file,
        BuildOptions {
            provisioning: Some(kiln_engine::build::context::Provisioning::Azure),
            ..options(&home)
        },
    )
    .expect("valid")
    .remove(0);
    let media = step(&azure, "Provisioning media (answer file)");
    assert_eq!(media["provisioning"], "azure (--provisioning)");
    let m = media["media"].as_str().unwrap();
    assert!(
        m.contains("ovf-env.xml")
            && m.contains("WindowsProvisioningConfigurationSet")
            && m.contains("ATAPI DVD"),
        "{m}"
    );
    let nocloud = plans_with(
        file,
        BuildOptions {
            provisioning: Some(kiln_engine::build::context::Provisioning::NoCloud),
            ..options(&home)
        },
    )
    .expect("valid")
    .remove(0);
    let media = step(&nocloud, "Provisioning media (answer file)");
    assert!(
        media["error"]
            .as_str()
            .unwrap()
            .contains("cannot provision a Windows build"),
        "{media}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn windows_plan_of_a_community_template() {
    let home = empty_home("lenvolk");
    let p = plans(
        "lenvolk__images-using-azure-image-builder__02__demos__Code__ImageBuilder-ARM.json",
        &home,
    )
    .expect("valid")
    .remove(0);
    assert_eq!(p.os, "Windows");
    assert!(
        p.os_reason.contains("MicrosoftWindowsServer"),
        "{}",
        p.os_reason
    );
    let r = step(&p, "Customize: WindowsRestart #1");
    assert_eq!(
        r["restartCommand"], "shutdown /r /f /t 0 /c \"packer restart\"",
        "the default"
    );
    assert_eq!(r["restartTimeout"], "5m (300 s)");
    let f = step(&p, "Customize: File \"downloadBuildArtifacts\"");
    assert_eq!(f["destination"], r"c:\ImageBuilder\index.html");
    assert!(f["rule"].as_str().unwrap().contains("must already exist"));
    let u = step(&p, "Customize: WindowsUpdate #4");
    assert_eq!(u["searchCriteria"], "IsInstalled=0");
    assert_eq!(
        u["filters"],
        serde_json::json!(["exclude:$_.Title -like '*Preview*'", "include:$true"])
    );
    assert_eq!(u["updateLimit"], 20);
    assert!(
        u["round"]
            .as_str()
            .unwrap()
            .contains("@('exclude:$_.Title -like ''*Preview*''', 'include:$true')"),
        "{}",
        u["round"]
    );
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn linux_plan_keeps_ssh_and_deprovision() {
    let home = empty_home("linux");
    let p = plans("Azure__azure-rest-api-specs__specification__imagebuilder__resource-manager__Microsoft.VirtualMachineImages__ImageBuilder__stable__2025-10-01__examples__CreateImageTemplateLinux.json", &home)
        .expect("valid")
        .remove(0);
    assert_eq!(p.os, "Linux");
    assert_eq!(step(&p, "Connect (SSH)")["transport"], "SSH");
    let devices = &step(&p, "Start VM")["devices"];
    assert_eq!(
        (&devices["diskBus"], &devices["nicModel"]),
        (&"virtio".into(), &"virtio-net-pci".into()),
        "Linux stays virtio: {devices}"
    );
    assert_eq!(devices["provisioningMedia"], "read-only virtio disk");
    let d = step(&p, "Deprovision");
    assert!(d["script"]
        .as_str()
        .unwrap()
        .contains("-force -deprovision+user"));
    assert_eq!(
        d["override"].as_str().unwrap().split(' ').next(),
        Some("/tmp/DeprovisioningScript.sh")
    );
    assert!(!step(&p, "Distribute")["distributors"]
        .as_array()
        .unwrap()
        .is_empty());
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn cli_dry_run_prints_json_and_writes_nothing() {
    let home = empty_home("cli");
    let file = corpus_dir()
        .join("lenvolk__images-using-azure-image-builder__02__demos__Code__ImageTemplate.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--dry-run", "--output", "json"])
        .arg(&file)
        .env("KILN_HOME", &home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["os"], "Windows");
    assert!(v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "Connect (WinRM)"));
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--dry-run"])
        .arg(&file)
        .env("KILN_HOME", &home)
        .output()
        .unwrap();
    assert!(text.status.success());
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(
        t.contains("Connect (WinRM)") && t.contains("transport: WinRM"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "kiln build --dry-run wrote into KILN_HOME"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

const IDENTITY: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id";

/// Plans a bare template built from `source`, `customize` and `validate` (JSON fragments).
fn plan_json(source: &str, customize: &str, validate: &str) -> Result<DryRunPlan, String> {
    let json = format!(
        r#"{{"location": "westus2", "identity": {{"type": "UserAssigned", "userAssignedIdentities": {{"{IDENTITY}": {{}}}}}},
            "properties": {{"source": {source}, "customize": {customize}{validate}, "distribute": [{{"type": "VHD", "runOutputName": "out"}}]}}}}"#
    );
    let doc = template::load("t.json", json.as_bytes(), &LoadOptions::default());
    if !doc.is_valid() {
        let d: Vec<String> = doc
            .all_diagnostics()
            .map(|d| format!("{}: {}", d.code, d.message))
            .collect();
        panic!("test template invalid: {d:?}\n{json}");
    }
    let t = &doc.templates[0];
    let home = empty_home("json");
    let req = BuildRequest {
        template: t.model.clone().unwrap(),
        api_version: t.api_version,
        name: "t".into(),
        template_dir: corpus_dir(),
        options: options(&home),
    };
    let r = dry_run(req).map_err(|e| e.to_string());
    std::fs::remove_dir_all(&home).unwrap();
    r
}

const WIN: &str = r#"{"type": "PlatformImage", "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2022-datacenter", "version": "latest"}"#;
const UBUNTU: &str = r#"{"type": "PlatformImage", "publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts-gen2", "version": "latest"}"#;

#[test]
fn windows_planning_refuses_what_cannot_run() {
    let e = plan_json(WIN, r#"[{"type": "Shell", "inline": ["echo hi"]}]"#, "").unwrap_err();
    assert!(
        e.contains("properties.customize[0]")
            && e.contains("Shell customizer cannot run on a Windows build VM"),
        "{e}"
    );
    // (A restartTimeout that is not a duration never gets here: `kiln validate` reports
    // BadRestartTimeout.)
    let e = plan_json(WIN, "[]", r#", "validate": {"inVMValidations": [{"type": "Shell", "name": "v", "inline": ["true"]}]}"#).unwrap_err();
    assert!(
        e.contains("inVMValidations[0]") && e.contains("Shell validation"),
        "{e}"
    );
}

#[test]
fn the_os_follows_the_source_then_the_customizers() {
    // An Ubuntu source with only Shell steps: Linux.
    let p = plan_json(UBUNTU, r#"[{"type": "Shell", "inline": ["echo hi"]}]"#, "").unwrap();
    assert_eq!(p.os, "Linux");
    // Not in the catalog, not a Windows publisher, but a PowerShell step: Windows (and said why).
    let p = plan_json(
        UBUNTU,
        r#"[{"type": "PowerShell", "inline": ["Write-Output hi"], "runElevated": true}]"#,
        "",
    )
    .unwrap();
    assert_eq!(p.os, "Windows");
    assert!(
        p.os_reason.contains("PowerShell customizer"),
        "{}",
        p.os_reason
    );
    let p = plan_json(WIN, "[]", "").unwrap();
    assert_eq!(p.os, "Windows");
    assert!(
        p.os_reason.contains("MicrosoftWindowsServer"),
        "{}",
        p.os_reason
    );
}

#[test]
fn windows_validations_and_source_only() {
    let v = r#", "validate": {"continueDistributeOnFailure": true, "inVMValidations": [{"type": "PowerShell", "name": "check", "inline": ["exit 5"], "validExitCodes": [5]}]}"#;
    let p = plan_json(WIN, r#"[{"type": "PowerShell", "inline": ["a", "b"]}]"#, v).unwrap();
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    let i = names
        .iter()
        .position(|n| *n == "Validate: PowerShell \"check\"")
        .expect("validation step");
    assert!(
        names[i - 1].starts_with("Customize: PowerShell") && names[i + 1] == "Sysprep",
        "{names:?}"
    );
    let s = &p.steps[i];
    assert_eq!(format!("{:?}", s.phase), "Validating");
    assert_eq!(s.on_failure, "continue");
    assert_eq!(s.details["validExitCodes"], serde_json::json!([5]));
    assert!(s.details["uploadedTo"]
        .as_str()
        .unwrap()
        .contains("-validate-0.ps1"));
    // Inline lines are joined, one per line.
    let c = &p.steps[i - 1].details["script"]["inline"];
    assert_eq!(c, "$ProgressPreference = 'SilentlyContinue'\na\nb\nif ($LASTEXITCODE) { exit $LASTEXITCODE }\n");
    // sourceValidationOnly: validate the source, no customizers, no sysprep, nothing distributed.
    let only = r#", "validate": {"sourceValidationOnly": true, "inVMValidations": [{"type": "PowerShell", "name": "check", "inline": ["exit 0"]}]}"#;
    let p = plan_json(WIN, "[]", only).unwrap();
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"Shutdown"), "{names:?}");
    assert!(
        !names.contains(&"Sysprep") && !names.contains(&"Distribute"),
        "{names:?}"
    );
}

#[test]
fn a_stored_managed_image_decides_the_os() {
    use kiln_engine::store::{ImageRow, Store};
    let home = empty_home("store");
    let sub = "00000000-0000-0000-0000-000000000000";
    let store = Store::open(&home).unwrap();
    store
        .create_group(sub, "rg", "westus2", &serde_json::json!({}), None)
        .unwrap();
    let id = |name: &str| {
        format!("/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/images/{name}")
    };
    for (name, os) in [("win", "Windows"), ("lin", "Linux")] {
        store
            .insert_image(&ImageRow {
                id: id(name),
                subscription: sub.into(),
                resource_group: "rg".into(),
                name: name.into(),
                location: "westus2".into(),
                os_type: os.into(),
                hyper_v_generation: "V2".into(),
                disk: home.join(format!("{name}.vhd")),
                tags: serde_json::json!({}),
                source_run: None,
                created: "2026-01-01T00:00:00Z".into(),
                provisioning: Vec::new(),
            })
            .unwrap();
    }
    drop(store);
    let plan = |image: &str, customize: &str| {
        let json = format!(
            r#"{{"location": "westus2", "identity": {{"type": "UserAssigned", "userAssignedIdentities": {{"{IDENTITY}": {{}}}}}},
                "properties": {{"source": {{"type": "ManagedImage", "imageId": "{}"}}, "customize": {customize}, "distribute": [{{"type": "VHD", "runOutputName": "out"}}]}}}}"#,
            id(image)
        );
        let doc = template::load("t.json", json.as_bytes(), &LoadOptions::default());
        assert!(doc.is_valid(), "{json}");
        let t = &doc.templates[0];
        let req = BuildRequest {
            template: t.model.clone().unwrap(),
            api_version: t.api_version,
            name: "t".into(),
            template_dir: corpus_dir(),
            options: options(&home),
        };
        dry_run(req).map_err(|e| e.to_string())
    };
    let p = plan("win", "[]").unwrap();
    assert_eq!(p.os, "Windows");
    assert!(
        p.os_reason.contains("in kiln's store has osType Windows"),
        "{}",
        p.os_reason
    );
    // A Linux image with a PowerShell step: refused before anything runs, saying why.
    let e = plan(
        "lin",
        r#"[{"type": "PowerShell", "inline": ["Write-Output hi"]}]"#,
    )
    .unwrap_err();
    assert!(
        e.contains("needs a Windows source") && e.contains("osType Linux"),
        "{e}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn disk_bus_and_nic_model_override_the_defaults() {
    use kiln_engine::vm::{DiskBus, NicModel};
    let home = empty_home("devices");
    let opts = BuildOptions {
        disk_bus: Some(DiskBus::Virtio),
        nic_model: Some(NicModel::E1000e),
        ..options(&home)
    };
    let win = "Azure__azure-rest-api-specs__specification__imagebuilder__resource-manager__Microsoft.VirtualMachineImages__ImageBuilder__stable__2025-10-01__examples__CreateImageTemplateWindows.json";
    let lin = "Azure__azure-rest-api-specs__specification__imagebuilder__resource-manager__Microsoft.VirtualMachineImages__ImageBuilder__stable__2025-10-01__examples__CreateImageTemplateLinux.json";
    for file in [win, lin] {
        let p = plans_with(file, opts.clone()).expect("valid").remove(0);
        let devices = &step(&p, "Start VM")["devices"];
        assert_eq!(devices["diskBus"], "virtio", "{}: {devices}", p.os);
        assert_eq!(devices["nicModel"], "e1000e", "{}: {devices}", p.os);
    }
    std::fs::remove_dir_all(&home).unwrap();
}
