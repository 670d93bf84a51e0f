//! `kiln build` end to end against real QEMU and the `tiny` test guest (TCG here): the example
//! template builds to a fixed VHD whose content is checked, and each failure mode fails cleanly —
//! the right error, logs kept, and no QEMU left behind.

use anyhow::{ensure, Context, Result};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn kiln_bin() -> PathBuf {
    // The kiln binary of this workspace, built by `cargo build --workspace` (scripts/test.sh).
    let exe = std::env::current_exe().expect("test exe");
    let target = exe.ancestors().nth(2).expect("target/debug").to_path_buf();
    let bin = target.join("kiln");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p kiln-engine` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// One KILN_HOME for the whole test binary, with `tiny` imported as kiln:tiny:gen1/gen2.
fn home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let img = kiln_tests::image("tiny").expect("tiny test guest");
        let home = kiln_tests::scratch_dir("kiln-build-tests");
        let _ = std::fs::remove_dir_all(&home);
        for (sku, gen) in [("gen1", "V1"), ("gen2", "V2")] {
            kiln_tests::inspect::import_image(
                &home,
                "tiny",
                sku,
                &["--hyper-v-generation", gen],
                &img.disk,
            );
        }
        // An image that never boots: for the SSH-timeout case.
        let dead = home.join("dead.raw");
        std::fs::File::create(&dead)
            .and_then(|f| f.set_len(16 << 20))
            .expect("dead disk");
        kiln_tests::inspect::import_image(&home, "dead", "gen1", &[], &dead);
        home
    })
}

/// A tiny HTTP/1.0 file server on 127.0.0.1 for scriptUri/sourceUri (404 for missing files).
fn serve(dir: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                match std::fs::read(dir.join(&path)) {
                    Ok(body) if !path.contains("..") => {
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(&body);
                    }
                    _ => {
                        let _ = s.write_all(
                            b"HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
                        );
                    }
                }
            });
        }
    });
    port
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

struct Case {
    dir: PathBuf,
    files: PathBuf,
    port: u16,
}

impl Case {
    fn new(label: &str) -> Case {
        let dir = home()
            .join("cases")
            .join(format!("{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = dir.join("files");
        std::fs::create_dir_all(&files).expect("case dir");
        let port = serve(files.clone());
        Case { dir, files, port }
    }

    fn file(&self, name: &str, content: &str) -> (String, String) {
        let p = self.files.join(name);
        std::fs::write(&p, content).expect("write");
        (format!("http://127.0.0.1:{}/{name}", self.port), sha256(&p))
    }

    fn template(
        &self,
        offer: &str,
        sku: &str,
        customize: serde_json::Value,
        name: &str,
    ) -> PathBuf {
        self.template_with(
            "2022-07-01",
            offer,
            sku,
            customize,
            serde_json::json!({}),
            name,
        )
    }

    /// A template of `api` whose properties get the fields of `more` (validate, errorHandling…).
    fn template_with(
        &self,
        api: &str,
        offer: &str,
        sku: &str,
        customize: serde_json::Value,
        more: serde_json::Value,
        name: &str,
    ) -> PathBuf {
        let mut t = serde_json::json!({
            "type": "Microsoft.VirtualMachineImages/imageTemplates",
            "apiVersion": api,
            "name": name,
            "location": "westus2",
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
            "properties": {
                "buildTimeoutInMinutes": 30,
                "vmProfile": {"vmSize": "Standard_B1ms"},
                "source": {"type": "PlatformImage", "publisher": "kiln", "offer": offer, "sku": sku, "version": "latest"},
                "customize": customize,
                "distribute": [{"type": "VHD", "runOutputName": "out", "uri": self.dir.join("out.vhd").display().to_string()}]
            }
        });
        if let (Some(props), Some(extra)) = (t["properties"].as_object_mut(), more.as_object()) {
            for (k, v) in extra {
                props.insert(k.clone(), v.clone());
            }
        }
        let p = self.dir.join("template.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&t).expect("json")).expect("write template");
        p
    }

    fn build(&self, template: &Path, extra: &[&str]) -> Output {
        Command::new(kiln_bin())
            .env("KILN_HOME", home())
            .env("NO_COLOR", "1")
            .args(["build", "--output", "json", "--accel", "tcg"])
            .args(extra)
            .arg(template)
            .stdin(Stdio::null())
            .output()
            .expect("kiln build")
    }
}

fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn result(out: &Output) -> serde_json::Value {
    events(out)
        .into_iter()
        .find(|e| e["event"] == "result")
        .unwrap_or_default()
}

/// No QEMU process mentions the run's directory.
fn assert_no_qemu(run_dir: &str) {
    assert!(!run_dir.is_empty(), "no run dir");
    let out = Command::new("pgrep")
        .args(["-f", run_dir])
        .output()
        .expect("pgrep");
    assert!(
        out.stdout.is_empty(),
        "QEMU left running for {run_dir}: pids {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn step_started(ev: &[serde_json::Value], prefix: &str) -> bool {
    ev.iter().any(|e| {
        e["event"] == "stepStarted" && e["step"].as_str().unwrap_or("").starts_with(prefix)
    })
}

/// Reads a file from the ext4 root partition (GPT partition 2) of a raw/fixed-VHD disk image.
fn read_from_disk(disk: &Path, guest_path: &str, scratch: &Path) -> Result<String> {
    let out = Command::new("sfdisk").args(["-J"]).arg(disk).output()?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("sfdisk -J")?;
    let parts = j["partitiontable"]["partitions"]
        .as_array()
        .context("partitions")?
        .clone();
    let root = parts
        .iter()
        .find(|p| {
            p["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("0FC63DAF-8483-4772-8E79-3D69D8477DE4"))
        })
        .context("no Linux partition")?;
    let (start, size) = (
        root["start"].as_u64().context("start")?,
        root["size"].as_u64().context("size")?,
    );
    let part = scratch.join("root.ext4");
    let st = Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", part.display()))
        .args([
            "bs=512",
            &format!("skip={start}"),
            &format!("count={size}"),
            "conv=sparse",
            "status=none",
        ])
        .status()?;
    ensure!(st.success(), "dd failed");
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {guest_path}")])
        .arg(&part)
        .output()?;
    let _ = std::fs::remove_file(&part);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tiny_builds_to_a_fixed_vhd_with_the_changes_inside() -> Result<()> {
    let c = Case::new("ok");
    let (script, script_sha) = c.file("setup.sh", "#!/bin/sh\nset -e\necho \"from scriptUri\" | sudo tee /etc/kiln-script >/dev/null\necho script-ran\n");
    let (motd, motd_sha) = c.file("motd", "built by kiln\n");
    let (deprov, deprov_sha) = c.file(
        "deprovision.sh",
        "#!/bin/sh\necho custom-deprovision > /var/lib/kiln-deprovisioned\nsync\n",
    );
    let t = c.template(
        "tiny",
        "gen1",
        serde_json::json!([
            {"type": "Shell", "name": "inline", "inline": ["echo inline-ran", "echo hello | sudo tee /etc/kiln-inline >/dev/null"]},
            {"type": "Shell", "name": "uri", "scriptUri": script, "sha256Checksum": script_sha.to_uppercase()},
            {"type": "File", "name": "motd", "sourceUri": motd, "sha256Checksum": motd_sha, "destination": "/tmp/motd"},
            {"type": "Shell", "name": "move", "inline": ["sudo cp /tmp/motd /etc/motd"]},
            {"type": "File", "name": "deprov", "sourceUri": deprov, "sha256Checksum": deprov_sha, "destination": "/tmp/DeprovisioningScript.sh"}
        ]),
        "tiny-ok",
    );
    let t0 = Instant::now();
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Succeeded",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("tiny build took {:.1}s", t0.elapsed().as_secs_f64());
    let ev = events(&out);
    let lines: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str())
        .collect();
    assert!(
        lines.contains(&"inline-ran") && lines.contains(&"script-ran"),
        "guest output streamed: {lines:?}"
    );
    // The runOutput, in Azure's shape.
    let ro = &r["runOutputs"][0];
    assert_eq!(
        ro["type"],
        "Microsoft.VirtualMachineImages/imageTemplates/runOutputs"
    );
    assert_eq!(ro["name"], "out");
    assert!(ro["id"].as_str().unwrap_or("").ends_with(
        "/providers/Microsoft.VirtualMachineImages/imageTemplates/tiny-ok/runOutputs/out"
    ));
    assert_eq!(ro["properties"]["provisioningState"], "Succeeded");
    let vhd = c.dir.join("out.vhd");
    assert_eq!(
        ro["properties"]["artifactUri"],
        format!("file://{}", vhd.display())
    );
    // A fixed VHD: footer verified independently, size a whole MiB.
    let footer = kiln_images::vhd::verify_fixed(&vhd).map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = footer;
    let len = std::fs::metadata(&vhd)?.len();
    ensure!(
        (len - 512) % (1 << 20) == 0,
        "VHD size {len} is not a whole MiB + footer"
    );
    // The customizers' changes are in the image.
    ensure!(read_from_disk(&vhd, "/etc/kiln-inline", &c.dir)?.trim() == "hello");
    ensure!(read_from_disk(&vhd, "/etc/kiln-script", &c.dir)?.trim() == "from scriptUri");
    ensure!(read_from_disk(&vhd, "/etc/motd", &c.dir)? == "built by kiln\n");
    ensure!(
        read_from_disk(&vhd, "/var/lib/kiln-deprovisioned", &c.dir)?.trim() == "custom-deprovision",
        "the deprovision override ran"
    );
    // Logs are kept with the run; the overlay and the key are not.
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let log = std::fs::read_to_string(run_dir.join("customization.log"))?;
    ensure!(
        log.contains("(telemetry) Starting provisioner shell")
            && log.contains("(telemetry) ending provisioner shell"),
        "AIB-style log"
    );
    ensure!(run_dir.join("console.log").exists() && run_dir.join("events.jsonl").exists());
    ensure!(
        !run_dir.join("os.qcow2").exists(),
        "overlay deleted after success"
    );
    ensure!(
        !run_dir.join("id_ed25519").exists(),
        "ephemeral key deleted"
    );
    assert_no_qemu(&run_dir.display().to_string());
    Ok(())
}

#[test]
fn a_checksum_mismatch_fails_before_the_vm_boots() {
    let c = Case::new("sha");
    let (script, _) = c.file("s.sh", "echo should-not-run\n");
    let wrong = "0".repeat(64);
    let t = c.template(
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "scriptUri": script, "sha256Checksum": wrong}]),
        "tiny-sha",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Failed",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains(&wrong) && err.contains(&sha256(&c.files.join("s.sh"))),
        "names both hashes: {err}"
    );
    let ev = events(&out);
    assert!(
        !step_started(&ev, "Start VM"),
        "nothing may boot after a checksum mismatch"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_missing_script_uri_is_a_clear_error() {
    let c = Case::new("404");
    let url = format!("http://127.0.0.1:{}/nope.sh", c.port);
    let t = c.template(
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "scriptUri": url}]),
        "tiny-404",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(r["runState"], "Failed");
    let err = r["error"].as_str().unwrap_or("");
    assert!(err.contains("404") && err.contains("nope.sh"), "{err}");
    assert!(!step_started(&events(&out), "Start VM"));
}

#[test]
fn a_failing_shell_step_fails_the_build_and_leaves_no_qemu() {
    let c = Case::new("exit3");
    let t = c.template(
        "tiny",
        "gen1",
        serde_json::json!([
            {"type": "Shell", "name": "fails", "inline": ["echo before", "exit 3", "echo after"]},
            {"type": "Shell", "name": "never", "inline": ["echo never-runs"]}
        ]),
        "tiny-exit3",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(r["runState"], "Failed");
    let err = r["error"].as_str().unwrap_or("");
    assert!(err.contains("exit code 3"), "{err}");
    let ev = events(&out);
    let lines: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str())
        .collect();
    assert!(
        lines.contains(&"before") && !lines.contains(&"after") && !lines.contains(&"never-runs"),
        "{lines:?}"
    );
    let run_dir = r["runDir"].as_str().unwrap_or("").to_string();
    assert!(
        Path::new(&run_dir).join("os.qcow2").exists(),
        "the disk is kept for inspection after a failure"
    );
    assert_no_qemu(&run_dir);
}

#[test]
fn a_file_destination_outside_tmp_is_rejected_before_anything_runs() {
    let c = Case::new("dest");
    let (f, sha) = c.file("f", "x");
    let t = c.template("tiny", "gen1", serde_json::json!([{"type": "File", "sourceUri": f, "sha256Checksum": sha, "destination": "/etc/f"}]), "tiny-dest");
    let out = Command::new(kiln_bin())
        .env("KILN_HOME", home())
        .env("NO_COLOR", "1")
        .args(["build"])
        .arg(&t)
        .output()
        .expect("kiln");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BadFileDestination") && err.contains("nothing was built"),
        "{err}"
    );
}

#[test]
fn a_guest_that_never_answers_ssh_times_out_cleanly() {
    let c = Case::new("nossh");
    let t = c.template(
        "dead",
        "gen1",
        serde_json::json!([{"type": "Shell", "inline": ["true"]}]),
        "dead",
    );
    let t0 = Instant::now();
    let out = c.build(&t, &["--ssh-timeout", "8"]);
    let r = result(&out);
    assert_eq!(r["runState"], "Failed");
    let err = r["error"].as_str().unwrap_or("");
    assert!(err.to_lowercase().contains("ssh"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
}

#[test]
fn the_build_timeout_is_enforced_with_aibs_wording() {
    let c = Case::new("timeout");
    let t = c.template(
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "inline": ["sleep 600"]}]),
        "tiny-timeout",
    );
    let out = c.build(&t, &["--timeout-seconds", "25"]);
    let r = result(&out);
    assert_eq!(r["runState"], "Failed");
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("Timeout waiting for microservice to complete: 'context deadline exceeded'"),
        "{err}"
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
}

#[test]
fn ctrl_c_during_customizing_cancels_and_leaves_no_qemu() {
    let c = Case::new("cancel");
    let t = c.template("tiny", "gen1", serde_json::json!([{"type": "Shell", "name": "long", "inline": ["echo started-long", "sleep 600"]}]), "tiny-cancel");
    let mut child = Command::new(kiln_bin())
        .env("KILN_HOME", home())
        .args(["build", "--output", "json", "--accel", "tcg"])
        .arg(&t)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while !seen.contains("started-long") && Instant::now() < deadline {
        let n = stdout.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains("started-long"),
        "the long step never started: {seen}"
    );
    let run_dir = seen
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "runStarted")
        .and_then(|e| e["runDir"].as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("\"runState\":\"Canceled\""), "{rest}");
    assert_no_qemu(&run_dir);
}

/// The reboot happens while the step still runs (`sleep` after `reboot`): the connection drops
/// mid-script, kiln waits for the QMP RESET and reconnects, and the next step runs in the new
/// boot. (A script whose last line is `reboot` can end with exit 0 before the guest goes down; the
/// next step may then still run in the old boot — a race no client can see coming, which made
/// this test flaky when it used a bare `sudo reboot`.)
#[test]
fn a_reboot_inside_a_shell_step_is_followed_by_a_reconnect() {
    let c = Case::new("reboot");
    let t = c.template("tiny", "gen2", serde_json::json!([
        {"type": "Shell", "name": "before", "inline": ["cat /proc/sys/kernel/random/boot_id > ~/boot1", "sync", "sudo reboot", "sleep 120"]},
        {"type": "Shell", "name": "after", "inline": ["b1=$(cat ~/boot1); b2=$(cat /proc/sys/kernel/random/boot_id); echo \"boot ids $b1 $b2\"; test \"$b1\" != \"$b2\""]}
    ]), "tiny-reboot");
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Succeeded",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ev = events(&out);
    assert!(ev.iter().any(
        |e| e["event"] == "output" && e["line"].as_str().unwrap_or("").starts_with("boot ids ")
    ));
    assert!(
        ev.iter()
            .any(|e| e["event"] == "info" && e["message"] == "the guest rebooted; reconnecting"),
        "kiln saw the reboot"
    );
}

/// A child process killed if the test fails before it ends (a kept VM must not outlive the test).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn output_lines(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str().map(str::to_string))
        .collect()
}

fn phases(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter()
        .filter(|e| e["event"] == "phase")
        .filter_map(|e| e["subState"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn validations_run_after_the_customizers_and_a_failure_stops_distribution() {
    let c = Case::new("validate-fail");
    let (check, check_sha) = c.file(
        "check.sh",
        "#!/bin/sh\nset -e\ntest \"$(cat /etc/kiln-custom)\" = customized\necho check-passed\n",
    );
    let (payload, payload_sha) = c.file("payload.txt", "validator file\n");
    let t = c.template_with(
        "2022-07-01",
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "name": "custom", "inline": ["echo customized | sudo tee /etc/kiln-custom >/dev/null"]}]),
        serde_json::json!({"validate": {"inVMValidations": [
            {"type": "Shell", "name": "check", "scriptUri": check, "sha256Checksum": check_sha},
            {"type": "File", "name": "payload", "sourceUri": payload, "sha256Checksum": payload_sha, "destination": "/tmp/payload.txt"},
            {"type": "Shell", "name": "payload-there", "inline": ["grep -q 'validator file' /tmp/payload.txt", "echo payload-checked"]},
            {"type": "Shell", "name": "fails", "inline": ["echo failing-validation", "exit 4"]},
            {"type": "Shell", "name": "never", "inline": ["echo never-runs"]}
        ]}}),
        "tiny-validate-fail",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Failed",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("validation") && err.contains("fails") && err.contains("exit code 4"),
        "{err}"
    );
    let ev = events(&out);
    let lines = output_lines(&ev);
    for l in ["check-passed", "payload-checked", "failing-validation"] {
        assert!(lines.iter().any(|x| x == l), "{l} missing from {lines:?}");
    }
    assert!(
        !lines.iter().any(|x| x == "never-runs"),
        "validation stops at the first failure: {lines:?}"
    );
    assert_eq!(
        phases(&ev),
        ["Building", "Customizing", "Validating"],
        "runSubState sequence"
    );
    assert!(
        !step_started(&ev, "Deprovision") && !step_started(&ev, "Export"),
        "nothing is generalized or distributed"
    );
    assert!(
        !c.dir.join("out.vhd").exists(),
        "no VHD after a failed validation"
    );
    assert_eq!(r["runOutputs"].as_array().map(Vec::len), Some(0));
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
}

#[test]
fn continue_distribute_on_failure_distributes_but_reports_failed() -> Result<()> {
    let c = Case::new("validate-continue");
    let t = c.template_with(
        "2022-07-01",
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "name": "custom", "inline": ["echo customized | sudo tee /etc/kiln-custom >/dev/null"]}]),
        serde_json::json!({"validate": {"continueDistributeOnFailure": true, "inVMValidations": [
            {"type": "Shell", "name": "fails", "inline": ["exit 5"]},
            {"type": "Shell", "name": "after", "inline": ["echo second-validation-ran"]}
        ]}}),
        "tiny-validate-continue",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Failed",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1));
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("validation") && err.contains("exit code 5"),
        "{err}"
    );
    let ev = events(&out);
    assert!(output_lines(&ev)
        .iter()
        .any(|l| l == "second-validation-ran"));
    assert_eq!(
        phases(&ev),
        ["Building", "Customizing", "Validating", "Distributing"]
    );
    assert_eq!(
        r["runOutputs"].as_array().map(Vec::len),
        Some(1),
        "distributed anyway"
    );
    let vhd = c.dir.join("out.vhd");
    kiln_images::vhd::verify_fixed(&vhd).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(read_from_disk(&vhd, "/etc/kiln-custom", &c.dir)?.trim() == "customized");
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
    Ok(())
}

#[test]
fn source_validation_only_validates_the_source_and_distributes_nothing() {
    let c = Case::new("validate-source");
    let t = c.template_with(
        "2022-07-01",
        "tiny",
        "gen1",
        serde_json::json!([{"type": "Shell", "name": "skipped", "inline": ["echo customized | sudo tee /etc/kiln-custom >/dev/null"]}]),
        serde_json::json!({"validate": {"sourceValidationOnly": true, "inVMValidations": [
            {"type": "Shell", "name": "pristine", "inline": ["test ! -e /etc/kiln-custom", "echo source-validated"]}
        ]}}),
        "tiny-validate-source",
    );
    let out = c.build(&t, &[]);
    let r = result(&out);
    assert_eq!(
        r["runState"],
        "Succeeded",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ev = events(&out);
    assert!(output_lines(&ev).iter().any(|l| l == "source-validated"));
    assert!(
        !step_started(&ev, "Customize")
            && !step_started(&ev, "Deprovision")
            && !step_started(&ev, "Export")
    );
    assert!(ev.iter().any(|e| e["event"] == "warning"
        && e["message"]
            .as_str()
            .unwrap_or("")
            .contains("sourceValidationOnly")));
    assert!(!c.dir.join("out.vhd").exists());
    assert_eq!(r["runOutputs"].as_array().map(Vec::len), Some(0));
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
}

#[test]
fn error_handling_abort_keeps_the_vm_reachable_until_canceled() {
    let c = Case::new("abort");
    let t = c.template_with(
        "2023-07-01",
        "tiny",
        "gen1",
        serde_json::json!([
            {"type": "Shell", "name": "breaks", "inline": ["echo evidence | sudo tee /etc/kiln-evidence >/dev/null", "exit 7"]}
        ]),
        serde_json::json!({"errorHandling": {"onCustomizerError": "abort", "onValidationError": "cleanup"}}),
        "tiny-abort",
    );
    let mut child = KillOnDrop(
        Command::new(kiln_bin())
            .env("KILN_HOME", home())
            .env("NO_COLOR", "1")
            .args(["build", "--output", "json", "--accel", "tcg"])
            .arg(&t)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kiln"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    // Read events until the VM is reported kept (the run has finished Failed by then).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(&mut stdout);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
            if tx.send(std::mem::take(&mut line)).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let seen_all = |seen: &[serde_json::Value]| {
        ["vmKept", "runFinished"]
            .iter()
            .all(|k| seen.iter().any(|e| e["event"] == *k))
    };
    while !seen_all(&seen) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => seen.extend(serde_json::from_str::<serde_json::Value>(&l).ok()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    let kept = seen.iter().find(|e| e["event"] == "vmKept").cloned();
    let Some(kept) = kept else {
        panic!("no vmKept event: {seen:?}")
    };
    let finished = seen
        .iter()
        .find(|e| e["event"] == "runFinished")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        finished["runState"], "Failed",
        "the run is reported Failed while the VM is kept: {seen:?}"
    );
    assert_eq!(kept["reason"], "errorHandling abort");
    let run_dir = kept["runDir"].as_str().unwrap_or("").to_string();
    let key = kept["keyPath"].as_str().unwrap_or("").to_string();
    // The kept VM answers over SSH with the printed key, and holds the failed step's state.
    let ssh = Command::new("ssh")
        .args([
            "-i",
            &key,
            "-p",
            &kept["sshPort"].to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
        ])
        .arg(format!("{}@127.0.0.1", kept["user"].as_str().unwrap_or("")))
        .arg("cat /etc/kiln-evidence")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    let ssh_ok = String::from_utf8_lossy(&ssh.stdout).trim() == "evidence";
    let _ = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status();
    let mut rest = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(120)) {
        rest.push(l);
    }
    let status = child.0.wait().expect("wait");
    assert!(
        ssh_ok,
        "ssh into the kept VM: {} {}",
        String::from_utf8_lossy(&ssh.stdout),
        String::from_utf8_lossy(&ssh.stderr)
    );
    assert_eq!(status.code(), Some(1), "a failed run: {rest:?}");
    assert_no_qemu(&run_dir);
    assert!(
        !Path::new(&key).exists(),
        "the kept key is removed when the VM stops"
    );
    assert!(
        Path::new(&run_dir).join("os.qcow2").exists()
            && Path::new(&run_dir).join("customization.log").exists(),
        "staging kept"
    );
}
