//! Templates as resources against real QEMU and the `tiny` test guest (TCG here): one run
//! distributes to a ManagedImage, a gallery version and a VHD from one export; a second template
//! builds on the ManagedImage, a third on `…/versions/latest`; automatic versions increase and
//! `excludeFromLatest` is honoured; a failing distributor makes the run PartiallySucceeded;
//! `template cancel` while Customizing leaves the run Canceled and no QEMU; a kiln killed
//! mid-run is found by the next kiln command, which marks the run Failed and cleans its files.
//!
//! Five VM boots in all (three in the chain, one each for cancel and kill).

use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe.ancestors().nth(2).expect("target/debug").join("kiln");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p kiln-engine` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

struct Home {
    dir: PathBuf,
    sub: String,
}

/// One KILN_HOME for the test binary: tiny imported as kiln:tiny:gen1, resource group `rg`
/// (westus2), gallery `gal` with definition `def` (V1), and a second storage directory for the
/// region `eastus`.
fn home() -> &'static Home {
    static HOME: OnceLock<Home> = OnceLock::new();
    HOME.get_or_init(|| {
        let img = kiln_tests::image("tiny").expect("tiny test guest");
        let dir = kiln_tests::scratch_dir("kiln-resources-tests");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("home");
        std::fs::write(
            dir.join("regions.json"),
            serde_json::to_vec(&json!({"eastus": dir.join("east").display().to_string()}))
                .expect("json"),
        )
        .expect("regions");
        let run = |args: &[&str]| {
            let out = Command::new(kiln_bin())
                .env("KILN_HOME", &dir)
                .env_remove("KILN_SUBSCRIPTION_ID")
                .args(args)
                .output()
                .expect("kiln");
            assert!(
                out.status.success(),
                "kiln {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        };
        let disk = img.disk.display().to_string();
        run(&[
            "image",
            "import",
            "--publisher",
            "kiln",
            "--offer",
            "tiny",
            "--sku",
            "gen1",
            "--version",
            "1.0.0",
            &disk,
        ]);
        let acct: Value =
            serde_json::from_slice(&run(&["account", "show"]).stdout).expect("account json");
        let sub = acct["id"].as_str().expect("id").to_string();
        assert_eq!(acct["subscriptionSource"], "generated");
        run(&["group", "create", "-n", "rg", "-l", "westus2"]);
        run(&["sig", "create", "-g", "rg", "-r", "gal"]);
        run(&[
            "sig",
            "image-definition",
            "create",
            "-g",
            "rg",
            "-r",
            "gal",
            "-i",
            "def",
            "-p",
            "kiln",
            "-f",
            "tiny",
            "-s",
            "gen1",
            "--os-type",
            "Linux",
        ]);
        Home { dir, sub }
    })
}

fn kiln(args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .env("KILN_HOME", &home().dir)
        .env("NO_COLOR", "1")
        .env_remove("KILN_SUBSCRIPTION_ID")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kiln")
}

fn ok_json(args: &[&str]) -> Value {
    let out = kiln(args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kiln {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn id(kind: &str) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/rg/providers/{kind}",
        home().sub
    )
}

fn create(name: &str, source: Value, customize: Value, distribute: Value) {
    let t = json!({
        "type": "Microsoft.VirtualMachineImages/imageTemplates",
        "apiVersion": "2022-07-01",
        "location": "westus2",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {id("Microsoft.ManagedIdentity/userAssignedIdentities/aib"): {}}},
        "properties": {
            "buildTimeoutInMinutes": 30,
            "vmProfile": {"vmSize": "Standard_B1ms"},
            "source": source,
            "customize": customize,
            "distribute": distribute,
        }
    });
    let p = home().dir.join(format!("{name}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(&t).expect("json")).expect("write");
    let shown = ok_json(&[
        "template",
        "create",
        "-g",
        "rg",
        "-n",
        name,
        "-f",
        &p.display().to_string(),
    ]);
    assert_eq!(
        shown["properties"]["provisioningState"], "Succeeded",
        "{shown}"
    );
}

fn show(name: &str) -> Value {
    ok_json(&["template", "show", "-g", "rg", "-n", name])
}

/// Runs in the foreground with JSON events; returns (result event, guest output lines).
fn run_fg(name: &str) -> (Value, Vec<String>) {
    let out = kiln(&[
        "template", "run", "-g", "rg", "-n", name, "--accel", "tcg", "--output", "json",
    ]);
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let result = events
        .iter()
        .find(|e| e["event"] == "result")
        .cloned()
        .unwrap_or_else(|| panic!("no result: {}", String::from_utf8_lossy(&out.stderr)));
    let lines = events
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str().map(str::to_string))
        .collect();
    (result, lines)
}

/// `sig image-version VERB -g rg -r gal -i def [EXTRA…]`.
fn sig_version<'a>(verb: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "sig",
        "image-version",
        verb,
        "-g",
        "rg",
        "-r",
        "gal",
        "-i",
        "def",
    ];
    args.extend_from_slice(extra);
    args
}

fn versions() -> Vec<Value> {
    ok_json(&sig_version("list", &[]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn qemu_naming(dir: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-f", dir])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits (generously: the machine is loaded) until the latest run of `name` satisfies `f`.
fn wait_for(name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = show(name);
        let l = &s["properties"]["lastRunStatus"];
        if l.is_object() && f(l) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: never {what}: {}",
            s["properties"]["lastRunStatus"]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn one_export_many_distributors_and_templates_built_on_them() {
    let h = home();
    let vhd = h.dir.join("out1.vhd");
    let def = id("Microsoft.Compute/galleries/gal/images/def");
    let img1 = id("Microsoft.Compute/images/img1");
    // 1. PlatformImage → ManagedImage + SharedImage (two regions, two storage dirs) + VHD.
    create(
        "t1",
        json!({"type": "PlatformImage", "publisher": "kiln", "offer": "tiny", "sku": "gen1", "version": "latest"}),
        json!([{"type": "Shell", "name": "mark", "inline": ["echo one > /tmp/stage1"]}]),
        json!([
            {"type": "ManagedImage", "runOutputName": "mi", "imageId": img1, "location": "westus2", "artifactTags": {"built": "t1"}},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": def, "artifactTags": {"k": "v"},
             "targetRegions": [{"name": "westus2", "replicaCount": 2, "storageAccountType": "Standard_ZRS"}, {"name": "eastus", "replicaCount": 1, "storageAccountType": "Standard_LRS"}]},
            {"type": "VHD", "runOutputName": "vhd", "uri": vhd.display().to_string()}
        ]),
    );
    let (r, _) = run_fg("t1");
    assert_eq!(r["runState"], "Succeeded", "{r}");
    let run_dir = r["runDir"].as_str().unwrap_or("").to_string();
    assert!(run_dir.contains("/staging/IT_rg_t1_"), "{run_dir}");
    assert!(
        !Path::new(&run_dir).join("export.vhd").exists(),
        "the staging export is gone"
    );
    let events = std::fs::read_to_string(Path::new(&run_dir).join("events.jsonl")).expect("events");
    assert_eq!(
        events.matches("\"step\":\"Export disk\"").count(),
        2,
        "one export (started + finished), shared by three distributors"
    );
    // runOutputs, Azure-shaped.
    let outs = ok_json(&["template", "output", "list", "-g", "rg", "-n", "t1"]);
    let outs = outs["value"].as_array().expect("value");
    assert_eq!(outs.len(), 3);
    assert_eq!(outs[0]["properties"]["artifactId"], img1.as_str());
    assert_eq!(
        outs[1]["properties"]["artifactId"],
        format!("{def}/versions/0.0.1")
    );
    assert_eq!(
        outs[2]["properties"]["artifactUri"],
        format!("file://{}", vhd.display())
    );
    let one = ok_json(&[
        "template",
        "output",
        "show",
        "-g",
        "rg",
        "-n",
        "t1",
        "--output-name",
        "sig",
    ]);
    assert_eq!(
        one["type"],
        "Microsoft.VirtualMachineImages/imageTemplates/runOutputs"
    );
    let s = show("t1");
    assert_eq!(s["properties"]["lastRunStatus"]["runState"], "Succeeded");
    assert_eq!(s["properties"]["source"]["exactVersion"], "1.0.0");
    kiln_images::vhd::verify_fixed(&vhd).expect("a fixed VHD");
    // The managed image and the version, with their records.
    let imgs = ok_json(&["image", "list", "--output", "json"]);
    let mi = imgs
        .as_array()
        .expect("list")
        .iter()
        .find(|i| i["kind"] == "ManagedImage")
        .cloned()
        .expect("a managed image listed");
    assert_eq!(mi["id"], img1.as_str());
    assert_eq!(mi["tags"]["built"], "t1");
    assert_eq!(
        mi["kiln"]["provisioning"][0], "nocloud",
        "the image remembers how its build provisioned, first: {mi}"
    );
    assert_eq!(
        mi["properties"]["storageProfile"]["osDisk"]["osType"],
        "Linux"
    );
    assert!(imgs
        .as_array()
        .expect("list")
        .iter()
        .any(|i| i["kind"] == "PlatformImage"));
    let v = versions();
    assert_eq!(v.len(), 1);
    let regions = &v[0]["properties"]["publishingProfile"]["targetRegions"];
    assert_eq!(
        regions,
        &json!([{"name": "westus2", "regionalReplicaCount": 2, "storageAccountType": "Standard_ZRS"}, {"name": "eastus", "regionalReplicaCount": 1, "storageAccountType": "Standard_LRS"}])
    );
    assert_eq!(v[0]["tags"]["k"], "v");
    let paths: Vec<PathBuf> = v[0]["kiln"]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| PathBuf::from(r["path"].as_str().unwrap_or("")))
        .collect();
    assert!(
        paths[1].starts_with(h.dir.join("east")),
        "eastus lives in its own directory: {paths:?}"
    );
    let (m0, m1) = (
        std::fs::metadata(&paths[0]).expect("west"),
        std::fs::metadata(&paths[1]).expect("east"),
    );
    assert!(
        m0.ino() != m1.ino() || m0.dev() != m1.dev(),
        "two storage directories: real copies"
    );
    assert_eq!(m0.len(), m1.len());
    assert_eq!(m0.mode() & 0o222, 0, "published files are read-only");
    // No leftovers from atomic publishing.
    let partial = Command::new("find")
        .arg(&h.dir)
        .args(["-name", "*.partial-*"])
        .output()
        .expect("find");
    assert!(
        partial.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&partial.stdout)
    );

    // Immutability: the same name with other properties is AIB's error.
    let p = h.dir.join("t1.json");
    let mut changed: Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    changed["properties"]["buildTimeoutInMinutes"] = json!(31);
    let p2 = h.dir.join("t1-changed.json");
    std::fs::write(&p2, serde_json::to_vec(&changed).expect("json")).expect("write");
    let out = kiln(&[
        "template",
        "create",
        "-g",
        "rg",
        "-n",
        "t1",
        "-f",
        &p2.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Update/Upgrade of image templates is currently not supported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. ManagedImage source (detached run) → an automatic version excluded from latest.
    create(
        "t2",
        json!({"type": "ManagedImage", "imageId": img1}),
        json!([{"type": "Shell", "name": "check", "inline": ["cat /tmp/stage1", "echo two > /tmp/stage2", "sleep 3"]}]),
        json!([{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": def, "replicationRegions": ["westus2"], "excludeFromLatest": true}]),
    );
    let out = kiln(&[
        "template",
        "run",
        "-g",
        "rg",
        "-n",
        "t2",
        "--no-wait",
        "--accel",
        "tcg",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // While t2 boots from img1, img1 cannot be deleted (the build's lease on its disk).
    wait_for("t2", "Customizing", |l| {
        l["runSubState"] == "Customizing" || l["runState"] != "Running"
    });
    let refused = kiln(&["image", "delete", "--ids", &img1]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("OperationNotAllowed"),
        "deleting a running build's source is refused: {err}"
    );
    let s = wait_for("t2", "finished", |l| l["runState"] != "Running");
    let runs = ok_json(&["template", "show-runs", "-g", "rg", "-n", "t2"]);
    let run_dir = runs[0]["runDir"].as_str().unwrap_or("").to_string();
    let log =
        std::fs::read_to_string(Path::new(&run_dir).join("customization.log")).unwrap_or_default();
    assert_eq!(
        s["properties"]["lastRunStatus"]["runState"], "Succeeded",
        "{s}\n{log}"
    );
    assert!(
        log.contains("kiln: one"),
        "the ManagedImage source carries t1's change: {log}"
    );
    let v = versions();
    assert_eq!(
        v.iter()
            .map(|v| v["name"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["0.0.1", "0.0.2"],
        "automatic versions increase"
    );
    assert_eq!(
        v[1]["properties"]["publishingProfile"]["excludeFromLatest"],
        true
    );
    let latest = ok_json(&sig_version("show", &["-e", "latest"]));
    assert_eq!(latest["name"], "0.0.1", "excludeFromLatest is honoured");

    // 3. …/versions/latest (= 0.0.1: without t2's change) → an automatic version, and an explicit
    //    version that exists (fails: the run is PartiallySucceeded).
    create(
        "t3",
        json!({"type": "SharedImageVersion", "imageVersionId": format!("{def}/versions/latest")}),
        json!([{"type": "Shell", "name": "check", "inline": ["cat /tmp/stage1", "test ! -e /tmp/stage2 && echo no-stage2"]}]),
        json!([
            {"type": "SharedImage", "runOutputName": "auto", "galleryImageId": def, "replicationRegions": ["westus2"], "versioning": {"scheme": "Latest", "major": -1}},
            {"type": "SharedImage", "runOutputName": "explicit", "galleryImageId": format!("{def}/versions/0.0.1"), "replicationRegions": ["westus2"]}
        ]),
    );
    let (r, lines) = run_fg("t3");
    assert_eq!(r["runState"], "PartiallySucceeded", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("already exists"),
        "{r}"
    );
    assert!(
        lines.iter().any(|l| l == "one") && lines.iter().any(|l| l == "no-stage2"),
        "latest resolved to 0.0.1: {lines:?}"
    );
    let s = show("t3");
    assert_eq!(
        s["properties"]["source"]["exactVersion"],
        format!("{def}/versions/0.0.1")
    );
    assert_eq!(
        s["properties"]["lastRunStatus"]["runState"],
        "PartiallySucceeded"
    );
    let outs = ok_json(&["template", "output", "list", "-g", "rg", "-n", "t3"]);
    assert_eq!(
        outs["value"][0]["properties"]["artifactId"],
        format!("{def}/versions/0.0.3"),
        "the next version after 0.0.2, excluded ones included"
    );
    assert_eq!(
        outs["value"][1]["properties"]["provisioningState"],
        "Failed"
    );
    assert_eq!(versions().len(), 3);

    // Deleting a template removes its staging, and only that.
    let t1_staging = show("t1")["properties"]["exactStagingResourceGroup"]
        .as_str()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let t2_staging = show("t2")["properties"]["exactStagingResourceGroup"]
        .as_str()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let out = kiln(&["template", "delete", "-g", "rg", "-n", "t1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.dir.join("staging").join(&t1_staging).exists());
    assert!(h.dir.join("staging").join(&t2_staging).exists());
    assert!(
        kiln(&["image", "show", "--ids", &img1]).status.success(),
        "the artifacts stay"
    );
    // Deleting a version removes its record and replica files; then the managed image.
    let v2 = versions()[1].clone();
    let out = kiln(&sig_version("delete", &["-e", "0.0.2"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        versions()
            .iter()
            .map(|v| v["name"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["0.0.1", "0.0.3"]
    );
    for r in v2["kiln"]["replicas"].as_array().expect("replicas") {
        let p = PathBuf::from(r["path"].as_str().unwrap_or(""));
        assert!(!p.exists(), "{} removed", p.display());
    }
    let out = kiln(&["image", "delete", "--ids", &img1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!kiln(&["image", "show", "--ids", &img1]).status.success());
}

fn long_template(name: &str) {
    create(
        name,
        json!({"type": "PlatformImage", "publisher": "kiln", "offer": "tiny", "sku": "gen1", "version": "latest"}),
        json!([{"type": "Shell", "name": "long", "inline": ["echo started-long", "sleep 600"]}]),
        json!([{"type": "VHD", "runOutputName": "vhd"}]),
    );
}

#[test]
fn cancel_while_customizing_leaves_the_run_canceled_and_no_qemu() {
    long_template("tcancel");
    let out = kiln(&[
        "template",
        "run",
        "-g",
        "rg",
        "-n",
        "tcancel",
        "--no-wait",
        "--accel",
        "tcg",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second run while one is in progress: AIB's conflict.
    let again = kiln(&["template", "run", "-g", "rg", "-n", "tcancel", "--no-wait"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already in progress"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    wait_for("tcancel", "Customizing", |l| {
        l["runSubState"] == "Customizing" || l["runState"] != "Running"
    });
    let runs = ok_json(&["template", "show-runs", "-g", "rg", "-n", "tcancel"]);
    let run_dir = runs[0]["runDir"].as_str().unwrap_or("").to_string();
    // Customizing is reached before the long step's output: wait for that output too.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(Path::new(&run_dir).join("customization.log"))
        .unwrap_or_default()
        .contains("started-long")
    {
        assert!(Instant::now() < deadline, "the long step never started");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!qemu_naming(&run_dir).is_empty(), "the build VM runs");
    let status = ok_json(&["template", "cancel", "-g", "rg", "-n", "tcancel"]);
    assert_eq!(status["runState"], "Canceled", "{status}");
    assert_eq!(
        show("tcancel")["properties"]["lastRunStatus"]["runState"],
        "Canceled"
    );
    assert_eq!(qemu_naming(&run_dir), "", "no QEMU left");
    let no_run = kiln(&["template", "cancel", "-g", "rg", "-n", "tcancel"]);
    assert!(String::from_utf8_lossy(&no_run.stderr).contains("NoRunInProgress"));
}

#[test]
fn a_killed_kiln_is_recovered_by_the_next_command() {
    long_template("tkill");
    let mut child = Command::new(kiln_bin())
        .env("KILN_HOME", &home().dir)
        .args([
            "template", "run", "-g", "rg", "-n", "tkill", "--accel", "tcg", "--output", "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln");
    wait_for("tkill", "Customizing", |l| {
        l["runSubState"] == "Customizing" || l["runState"] != "Running"
    });
    let runs = ok_json(&["template", "show-runs", "-g", "rg", "-n", "tkill"]);
    let run_dir = runs[0]["runDir"].as_str().unwrap_or("").to_string();
    assert_eq!(
        runs[0]["pid"],
        child.id(),
        "the foreground kiln owns the run"
    );
    assert!(Path::new(&run_dir).join("os.qcow2").exists());
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // Any kiln command recovers it.
    // (Other tests' kiln commands may get there first: the state is what counts.)
    let out = kiln(&["group", "list"]);
    assert!(out.status.success());
    let s = show("tkill");
    assert_eq!(
        s["properties"]["lastRunStatus"]["runState"], "Failed",
        "{s}"
    );
    assert!(s["properties"]["lastRunStatus"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("ended without finishing"));
    // QEMU dies with its parent (PDEATHSIG) or is killed by the recovery; give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu_naming(&run_dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemu_naming(&run_dir), "", "no QEMU left");
    assert!(
        !Path::new(&run_dir).join("os.qcow2").exists(),
        "the run's disk is cleaned"
    );
    assert!(
        Path::new(&run_dir).join("customization.log").exists(),
        "its log is kept"
    );
    // The template can run again (the dead run no longer blocks it).
    let again = kiln(&[
        "template",
        "run",
        "-g",
        "rg",
        "-n",
        "tkill",
        "--no-wait",
        "--accel",
        "tcg",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let out = kiln(&["template", "cancel", "-g", "rg", "-n", "tkill"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
