//! `kiln build` of a **Windows** template end to end against a real QEMU VM: the `winrs` test
//! guest, a Linux guest speaking WinRS (xtask/src/images/winrs.rs), imported with osType
//! Windows so that kiln plans its Windows steps. kiln writes the unattend media, the guest's
//! init reads the build account from it and serves WinRM (NTLM, sealed) on 5985; PowerShell
//! (direct and runElevated, validExitCodes), File, WindowsRestart (a real reboot: QMP RESET, a
//! new boot id, WinRM reconnected, the restart check), WindowsUpdate rounds (against the guest's
//! Windows Update Agent emulation, tests/winrs_wu.rs), Sysprep's control flow (also with a
//! `c:\DeprovisioningScript.ps1` override) and the shutdown run through kiln, then the disk is
//! exported to a fixed VHD and inspected; with `--provisioning azure` the guest reads Azure's
//! DVD (ovf-env.xml + Unattend.xml) and reports Ready to kiln's emulated fabric. The "PowerShell"
//! payloads are POSIX sh, as the shim documents (tests/winrs_server.rs); `C:\` is
//! /var/lib/kiln-winrs/c in the guest.

use kiln_tests::inspect::{debugfs, kiln_bin, root_partition};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// One KILN_HOME for the test binary, with the winrs guest imported as kiln:winrs:gen1 (BIOS)
/// and kiln:winrs:gen2 (UEFI, q35) with the osType its catalog metadata gives (Windows).
fn home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        // The server program inside the guest is this workspace's (built by cargo for this test).
        std::env::set_var("KILN_WINRS_SERVER", env!("CARGO_BIN_EXE_kiln-winrs-server"));
        let img = kiln_tests::image("winrs").expect("winrs test guest");
        assert_eq!(img.meta["osType"], "Windows", "{}", img.meta);
        assert!(
            img.meta["description"]
                .as_str()
                .is_some_and(|d| d.contains("LINUX guest") && d.contains("WinRS")),
            "the guest is labelled as what it is: {}",
            img.meta
        );
        let home = kiln_tests::scratch_dir("kiln-wguest-tests");
        let _ = std::fs::remove_dir_all(&home);
        for (sku, generation) in [("gen1", "V1"), ("gen2", "V2")] {
            let os_type = img.meta["osType"].as_str().unwrap_or("Linux");
            kiln_tests::inspect::import_image(
                &home,
                "winrs",
                sku,
                &[
                    "--hyper-v-generation",
                    generation,
                    "--provisioning",
                    "unattend",
                    "--os-type",
                    os_type,
                ],
                &img.disk,
            );
        }
        home
    })
}

/// A tiny HTTP/1.0 file server on 127.0.0.1 for sourceUri.
fn serve(dir: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
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
                    let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                }
            }
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

/// One build's directory, files served over HTTP, and its template.
struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(label: &str) -> Case {
        let dir = home().join("cases").join(label);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("files")).expect("case dir");
        Case { dir }
    }

    fn template(&self, name: &str, sku: &str, customize: serde_json::Value) -> PathBuf {
        let t = serde_json::json!({
            "type": "Microsoft.VirtualMachineImages/imageTemplates",
            "apiVersion": "2022-07-01",
            "name": name,
            "location": "westus2",
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
            "properties": {
                "buildTimeoutInMinutes": 40,
                "vmProfile": {"vmSize": "Standard_B1ms"},
                "source": {"type": "PlatformImage", "publisher": "kiln", "offer": "winrs", "sku": sku, "version": "latest"},
                "customize": customize,
                "distribute": [{"type": "VHD", "runOutputName": "out", "uri": self.dir.join("out.vhd").display().to_string()}]
            }
        });
        let p = self.dir.join("template.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&t).expect("json")).expect("write template");
        p
    }

    /// `kiln build` with `flags`: the run must end in `state` (else every line of output is
    /// shown); prints how long the `label` build took; the output and its result event.
    fn expect(
        &self,
        template: &Path,
        flags: &[&str],
        state: &str,
        label: &str,
    ) -> (Output, serde_json::Value) {
        let t0 = Instant::now();
        let out = self.build_with(template, flags);
        let r = result(&out);
        assert_eq!(
            r["runState"],
            state,
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "winrs guest {label} took {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        (out, r)
    }

    fn build_with(&self, template: &Path, flags: &[&str]) -> Output {
        Command::new(kiln_bin())
            .env("KILN_HOME", home())
            .env("NO_COLOR", "1")
            .args(["build", "--output", "json", "--accel", "tcg"])
            .args(flags)
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

fn infos(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter()
        .filter(|e| e["event"] == "info")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// The output lines of the step whose name starts with `step`.
fn output_of(ev: &[serde_json::Value], step: &str) -> Vec<String> {
    ev.iter()
        .filter(|e| e["event"] == "output" && e["step"].as_str().unwrap_or("").starts_with(step))
        .filter_map(|e| e["line"].as_str().map(str::to_string))
        .collect()
}

fn value_after(lines: &[String], prefix: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_default()
        .trim()
        .to_string()
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

const C: &str = "/var/lib/kiln-winrs/c";

#[test]
fn a_windows_build_runs_end_to_end_in_the_winrs_guest() {
    let c = Case::new("ok");
    let payload = "payload delivered by the File customizer\nline two\n";
    let pf = c.dir.join("files").join("payload.txt");
    std::fs::write(&pf, payload).expect("payload");
    let port = serve(c.dir.join("files"));
    let t = c.template(
        "winrs-ok",
        "gen1",
        serde_json::json!([
            {"type": "PowerShell", "name": "prepare", "validExitCodes": [0, 5], "inline": [
                format!("mkdir -p {C}/kiln"),
                "echo boot-before=$(cat /proc/sys/kernel/random/boot_id)",
                "echo host=$(hostname)",
                "exit 5"
            ]},
            {"type": "PowerShell", "name": "elevated", "runElevated": true, "inline": [
                "echo elevated-out",
                "echo elevated-err >&2",
                format!("id -u > {C}/kiln/elevated-uid")
            ]},
            {"type": "PowerShell", "name": "system", "runElevated": true, "runAsSystem": true, "inline": [
                "echo as-system"
            ]},
            {"type": "File", "name": "payload", "sourceUri": format!("http://127.0.0.1:{port}/payload.txt"),
             "sha256Checksum": sha256(&pf), "destination": r"C:\kiln\payload.txt"},
            {"type": "WindowsRestart", "restartTimeout": "15m"},
            {"type": "PowerShell", "name": "after restart", "inline": [
                "echo boot-after=$(cat /proc/sys/kernel/random/boot_id)",
                format!("echo payload-sha=$(sha256sum {C}/kiln/payload.txt | cut -d' ' -f1)"),
                format!("echo after-restart > {C}/kiln/after-restart")
            ]}
        ]),
    );
    let (out, r) = c.expect(&t, &[], "Succeeded", "Windows build");
    let ev = events(&out);
    let info = infos(&ev);

    // PowerShell: exit 5 accepted by validExitCodes; the computer name came from Unattend.xml.
    let prep = output_of(&ev, "Customize: PowerShell \"prepare\"");
    let before = value_after(&prep, "boot-before=");
    assert_eq!(before.len(), 36, "{prep:?}");
    let host = value_after(&prep, "host=");
    assert!(
        host.starts_with("kiln-"),
        "the computer name from the answer file: {prep:?}"
    );
    // runElevated: the runner was uploaded and called; stderr merged into the streamed output.
    let el = output_of(&ev, "Customize: PowerShell \"elevated\"");
    assert!(
        el.contains(&"elevated-out".to_string()) && el.contains(&"elevated-err".to_string()),
        "{el:?}"
    );
    assert!(
        info.iter()
            .any(|m| m.contains("elevated (scheduled task as packer")),
        "{info:?}"
    );
    assert_eq!(
        output_of(&ev, "Customize: PowerShell \"system\""),
        ["as-system"]
    );
    assert!(
        info.iter()
            .any(|m| m.contains("as SYSTEM (scheduled task)")),
        "{info:?}"
    );
    // Shutdown: the guest's own `shutdown /s` powered it off (not kiln's ACPI fallback).
    assert!(
        info.iter()
            .any(|m| m == "build VM stopped: the guest shut down on the guest command"),
        "{info:?}"
    );
    // File: the guest pulled the bytes from the build's file endpoint (no WinRM fallback).
    assert!(
        info.iter()
            .any(|m| m.starts_with("delivered ") && m.contains("through kiln's file endpoint")),
        "{info:?}"
    );
    assert!(
        !ev.iter().any(|e| e["event"] == "warning"
            && e["message"].as_str().unwrap_or("").contains("falling back")),
        "no fallback to the WinRM upload"
    );
    // WindowsRestart: a real reboot (QMP RESET, another boot id), WinRM reconnected, the check.
    assert!(
        info.iter()
            .any(|m| m.contains("reboot verified (QMP RESET)")),
        "{info:?}"
    );
    assert_eq!(
        info.iter()
            .filter(|m| m.starts_with("reconnected after"))
            .count(),
        1,
        "one reboot, one reconnection: {info:?}"
    );
    assert!(
        !info.iter().any(|m| m == "the guest rebooted; reconnecting"),
        "the reboot was handled by the restart step alone: {info:?}"
    );
    assert!(
        !info.iter().any(|m| m.contains("SSH forwarded")),
        "a Windows build talks WinRM: {info:?}"
    );
    let restart = output_of(&ev, "Customize: WindowsRestart");
    assert!(
        restart.contains(&format!("{host} restarted.")),
        "the restart check ran: {restart:?}"
    );
    let after = output_of(&ev, "Customize: PowerShell \"after restart\"");
    let after_boot = value_after(&after, "boot-after=");
    assert_eq!(after_boot.len(), 36, "{after:?}");
    assert_ne!(
        before, after_boot,
        "the guest rebooted: its boot id changed"
    );
    assert_eq!(
        value_after(&after, "payload-sha="),
        sha256(&pf),
        "the File step's bytes, read in the guest"
    );
    // Sysprep: the control flow, ImageState progression polled to the end.
    let sp = output_of(&ev, "Sysprep");
    let states: Vec<&String> = sp
        .iter()
        .filter(|l| l.starts_with("IMAGE_STATE_"))
        .collect();
    assert!(
        states.first().is_some_and(|s| *s == "IMAGE_STATE_COMPLETE")
            && states.iter().any(|s| *s == "IMAGE_STATE_UNDEPLOYABLE")
            && states
                .last()
                .is_some_and(|s| *s == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"),
        "{sp:?}"
    );
    assert!(
        sp.iter()
            .any(|l| l.contains("service RdAgent is not installed")),
        "{sp:?}"
    );
    assert!(
        sp.iter()
            .any(|l| l.contains(r"removed C:\Windows\Panther\unattend.xml")),
        "the cached answer file: {sp:?}"
    );
    assert!(
        info.iter().any(|m| m.starts_with("build VM stopped: ")),
        "{info:?}"
    );

    // The AIB-style log has the same story.
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let log =
        std::fs::read_to_string(run_dir.join("customization.log")).expect("customization.log");
    for want in [
        "elevated-err",
        "reboot verified (QMP RESET)",
        "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE",
        &format!("{host} restarted."),
    ] {
        assert!(log.contains(want), "customization.log lacks {want:?}");
    }
    let console = std::fs::read_to_string(run_dir.join("console.log")).expect("console.log");
    assert_eq!(
        console.matches("KILN-WINRM-READY").count(),
        2,
        "two boots, WinRS up in each"
    );
    assert!(
        !run_dir.join("unattend.img").exists(),
        "the provisioning media is deleted"
    );
    assert_no_qemu(&run_dir.display().to_string());

    // The exported fixed VHD holds what happened in the guest.
    let vhd = c.dir.join("out.vhd");
    kiln_images::vhd::verify_fixed(&vhd).expect("a fixed VHD");
    let part = c.dir.join("root.ext4");
    root_partition(&vhd, &part);
    let cat = |p: &str| debugfs(&part, &format!("cat {p}"));
    assert_eq!(cat(&format!("{C}/kiln/payload.txt")).0, payload);
    assert_eq!(cat(&format!("{C}/kiln/elevated-uid")).0.trim(), "0");
    assert_eq!(
        cat(&format!("{C}/kiln/after-restart")).0.trim(),
        "after-restart"
    );
    let state = cat(&format!("{C}/Windows/Setup/State/State.ini")).0;
    assert!(
        state.contains("ImageState=IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"),
        "{state:?}"
    );
    let (o, e) = cat(&format!("{C}/Windows/Panther/unattend.xml"));
    assert!(
        o.is_empty() && e.contains("not found"),
        "no answer file (password) left in the image: {o:?} {e:?}"
    );
    let _ = std::fs::remove_file(&part);
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// On Gen2 (UEFI, q35): the guest boots and finds the unattend stick there too.
#[test]
fn an_exit_code_outside_valid_exit_codes_fails_the_build_naming_the_step() {
    let c = Case::new("bad-exit");
    let t = c.template(
        "winrs-bad-exit",
        "gen2",
        serde_json::json!([
            {"type": "PowerShell", "name": "bad exit", "validExitCodes": [0, 1], "inline": ["echo before", "exit 7"]},
            {"type": "PowerShell", "name": "never", "inline": ["echo never-runs"]}
        ]),
    );
    let (out, r) = c.expect(&t, &[], "Failed", "failing build");
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("Customize: PowerShell \"bad exit\"")
            && err.contains("exited with 7")
            && err.contains("[0, 1]"),
        "{err}"
    );
    let ev = events(&out);
    assert_eq!(
        output_of(&ev, "Customize: PowerShell \"bad exit\""),
        ["before"]
    );
    assert!(
        !ev.iter()
            .any(|e| e["event"] == "stepStarted"
                && e["step"].as_str().unwrap_or("").contains("never")),
        "stops at the failure"
    );
    assert_eq!(out.status.code(), Some(1));
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let log =
        std::fs::read_to_string(run_dir.join("customization.log")).expect("customization.log");
    assert!(
        log.contains("kiln: Customize: PowerShell \"bad exit\" failed: the script exited with 7")
            && !log.contains("failed: Customize: PowerShell"),
        "the failure named once in customization.log:\n{log}"
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn a_file_destination_without_its_directory_fails_naming_it() {
    let c = Case::new("no-dir");
    let pf = c.dir.join("files").join("f.txt");
    std::fs::write(&pf, "x").expect("file");
    let port = serve(c.dir.join("files"));
    let t = c.template(
        "winrs-no-dir",
        "gen1",
        serde_json::json!([
            {"type": "File", "name": "nowhere", "sourceUri": format!("http://127.0.0.1:{port}/f.txt"),
             "sha256Checksum": sha256(&pf), "destination": r"C:\no-such-dir\f.txt"}
        ]),
    );
    let (out, r) = c.expect(
        &t,
        &[],
        "Failed",
        "build with a File destination missing its directory",
    );
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("Customize: File \"nowhere\"")
            && err.contains(r"C:\no-such-dir\f.txt")
            && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !infos(&events(&out))
            .iter()
            .any(|m| m.starts_with("uploaded ")),
        "nothing uploaded"
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// WindowsUpdate through kiln's rounds against the guest's Windows Update emulation
/// (tests/winrs_wu.rs): round 1 installs one update (updateLimit 1) that needs a reboot, kiln
/// reboots the guest (verified), round 2 installs the other, and the step ends when nothing
/// selectable is pending. The Preview update is excluded by the filters, the driver by the
/// search criteria.
#[test]
fn windows_update_runs_two_rounds_with_a_reboot_until_nothing_is_pending() {
    let c = Case::new("wu");
    let t = c.template(
        "winrs-wu",
        "gen1",
        serde_json::json!([
            {"type": "PowerShell", "name": "catalogue", "inline": [
                format!("mkdir -p {C}/kiln-wu"),
                format!("cat > {C}/kiln-wu/pending <<'EOF'"),
                "KB5000001|Security Updates|2026-11 Cumulative Update for Microsoft server operating system (KB5000001)|reboot",
                "KB5000002|Definition Updates|Security Intelligence Update for Microsoft Defender Antivirus (KB5000002)",
                "KB5000003|Updates|2026-11 Cumulative Update Preview for .NET Framework (KB5000003)",
                "KB5000004|Drivers|Fake Network Adapter driver (KB5000004)|driver",
                "EOF",
                "echo boot-before=$(cat /proc/sys/kernel/random/boot_id)"
            ]},
            {"type": "WindowsUpdate", "searchCriteria": "IsInstalled=0 and Type='Software'",
             "filters": ["exclude:$_.Title -like '*Preview*'", "include:$true"], "updateLimit": 1},
            {"type": "PowerShell", "name": "after", "inline": [
                "echo boot-after=$(cat /proc/sys/kernel/random/boot_id)",
                format!("sed 's/^/installed: /' {C}/kiln-wu/installed"),
                format!("sed 's/^/pending: /' {C}/kiln-wu/pending")
            ]}
        ]),
    );
    let (out, r) = c.expect(&t, &[], "Succeeded", "WindowsUpdate build");
    let ev = events(&out);
    let info = infos(&ev);
    let wu = output_of(&ev, "Customize: WindowsUpdate");
    let kb1 = "2026-11 Cumulative Update for Microsoft server operating system (KB5000001)";
    let kb2 = "Security Intelligence Update for Microsoft Defender Antivirus (KB5000002)";
    let preview = "2026-11 Cumulative Update Preview for .NET Framework (KB5000003)";
    let round1 = [
        "kiln-wu: searching: IsInstalled=0 and Type='Software'".to_string(),
        format!("kiln-wu: selected: {kb1}"),
        format!("kiln-wu: skipped (filters): {preview}"),
        "kiln-wu: downloading 1 update(s)".into(),
        "kiln-wu: installing 1 update(s)".into(),
        format!("kiln-wu: result 2 (HRESULT 0x00000000): {kb1}"),
        "kiln-wu: a reboot is required".into(),
    ];
    let round2 = [
        "kiln-wu: searching: IsInstalled=0 and Type='Software'".to_string(),
        format!("kiln-wu: selected: {kb2}"),
        format!("kiln-wu: skipped (filters): {preview}"),
        "kiln-wu: downloading 1 update(s)".into(),
        "kiln-wu: installing 1 update(s)".into(),
        format!("kiln-wu: result 2 (HRESULT 0x00000000): {kb2}"),
    ];
    let kiln_wu: Vec<String> = wu
        .iter()
        .filter(|l| l.starts_with("kiln-wu: "))
        .cloned()
        .collect();
    assert_eq!(kiln_wu, [&round1[..], &round2[..]].concat(), "{wu:?}");
    for want in [
        "Windows Update round 1 of at most 10",
        "Windows Update round 2 of at most 10",
        "Windows Update: nothing left after 2 round(s)",
    ] {
        assert!(info.iter().any(|m| m == want), "{want}: {info:?}");
    }
    assert!(
        !info.iter().any(|m| m.starts_with("Windows Update round 3")),
        "{info:?}"
    );
    assert!(
        info.iter()
            .any(|m| m.contains("reboot verified (QMP RESET)")),
        "{info:?}"
    );
    assert_eq!(
        info.iter()
            .filter(|m| m.starts_with("reconnected after"))
            .count(),
        1,
        "one reboot between the two rounds: {info:?}"
    );
    let before = value_after(
        &output_of(&ev, "Customize: PowerShell \"catalogue\""),
        "boot-before=",
    );
    let after = output_of(&ev, "Customize: PowerShell \"after\"");
    let after_boot = value_after(&after, "boot-after=");
    assert_eq!(before.len(), 36, "{after:?}");
    assert_ne!(before, after_boot, "the guest rebooted between the rounds");
    let installed: Vec<&String> = after
        .iter()
        .filter(|l| l.starts_with("installed: "))
        .collect();
    assert!(
        installed.len() == 2
            && installed[0].starts_with("installed: KB5000001|")
            && installed[1].starts_with("installed: KB5000002|"),
        "{after:?}"
    );
    let pending: Vec<&String> = after
        .iter()
        .filter(|l| l.starts_with("pending: "))
        .collect();
    assert!(
        pending.len() == 2
            && pending[0].starts_with("pending: KB5000003|")
            && pending[1].starts_with("pending: KB5000004|"),
        "the Preview (filters) and the driver (searchCriteria) are left: {after:?}"
    );
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let log =
        std::fs::read_to_string(run_dir.join("customization.log")).expect("customization.log");
    for want in [
        format!("kiln-wu: result 2 (HRESULT 0x00000000): {kb1}"),
        format!("kiln-wu: result 2 (HRESULT 0x00000000): {kb2}"),
        "kiln-wu: a reboot is required".to_string(),
    ] {
        assert!(log.contains(&want), "customization.log lacks {want:?}");
    }
    assert_no_qemu(&run_dir.display().to_string());
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// The WindowsUpdate guard: an update failing in two rounds (a reboot between them) stops the
/// step with an error naming it, instead of rebooting until the round limit.
#[test]
fn an_update_failing_in_two_rounds_fails_the_step_naming_it() {
    let c = Case::new("wu-fail");
    let t = c.template(
        "winrs-wu-fail",
        "gen1",
        serde_json::json!([
            {"type": "PowerShell", "name": "catalogue", "inline": [
                format!("mkdir -p {C}/kiln-wu"),
                format!("echo 'KB5000009|Updates|Broken update (KB5000009)|fail' > {C}/kiln-wu/pending")
            ]},
            {"type": "WindowsUpdate"},
            {"type": "PowerShell", "name": "never", "inline": ["echo never-runs"]}
        ]),
    );
    let (out, r) = c.expect(&t, &[], "Failed", "failing WindowsUpdate build");
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("Customize: WindowsUpdate")
            && err.contains("round 2: an update failed in two rounds: Broken update (KB5000009)"),
        "{err}"
    );
    let ev = events(&out);
    let wu = output_of(&ev, "Customize: WindowsUpdate");
    let fails = wu
        .iter()
        .filter(|l| *l == "kiln-wu: result 4 (HRESULT 0x80070643): Broken update (KB5000009)")
        .count();
    assert_eq!(fails, 2, "{wu:?}");
    assert!(
        wu.contains(&"kiln-wu: some updates failed; another round retries them once".to_string()),
        "{wu:?}"
    );
    let info = infos(&ev);
    assert!(
        info.iter()
            .any(|m| m.contains("reboot verified (QMP RESET)")),
        "{info:?}"
    );
    assert!(
        !ev.iter()
            .any(|e| e["event"] == "stepStarted"
                && e["step"].as_str().unwrap_or("").contains("never")),
        "stops at the failure"
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// Sysprep with `c:\DeprovisioningScript.ps1` written by a customizer: kiln's wrapper runs it
/// instead of the default (no service waits, no ImageState poll), prints it first, and still
/// removes kiln's cached answer file (the build password) before it; the exported disk shows
/// what the script did.
#[test]
fn a_deprovisioning_script_override_runs_instead_of_the_default_sysprep() {
    let c = Case::new("deprov");
    let t = c.template(
        "winrs-deprov",
        "gen1",
        serde_json::json!([
            {"type": "PowerShell", "name": "write override", "inline": [
                format!("mkdir -p {C}/kiln"),
                format!("cat > {C}/DeprovisioningScript.ps1 <<'EOF'"),
                "echo custom-deprovisioning-ran",
                format!("echo custom > {C}/kiln/deprovisioned"),
                "EOF"
            ]}
        ]),
    );
    let (out, r) = c.expect(&t, &[], "Succeeded", "build with a deprovisioning override");
    let ev = events(&out);
    let sp = output_of(&ev, "Sysprep");
    let at = |want: &str| {
        sp.iter()
            .position(|l| l == want)
            .unwrap_or_else(|| panic!("no {want:?} in {sp:?}"))
    };
    let removed = at(r">>> removed C:\Windows\Panther\unattend.xml");
    let banner = at(r">>> Running the deprovisioning script c:\DeprovisioningScript.ps1 :");
    let printed = at("    echo custom-deprovisioning-ran");
    let ran = at("custom-deprovisioning-ran");
    assert!(
        removed < banner && banner < printed && printed < ran,
        "{sp:?}"
    );
    assert!(
        !sp.iter().any(|l| l.starts_with("IMAGE_STATE_")
            || l.contains("Sysprepping VM")
            || l.contains("service RdAgent")),
        "the default did not run: {sp:?}"
    );
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let log =
        std::fs::read_to_string(run_dir.join("customization.log")).expect("customization.log");
    assert!(
        log.contains("Running the deprovisioning script")
            && log.contains("custom-deprovisioning-ran"),
        "customization.log tells it"
    );
    assert_no_qemu(&run_dir.display().to_string());
    let vhd = c.dir.join("out.vhd");
    kiln_images::vhd::verify_fixed(&vhd).expect("a fixed VHD");
    let part = c.dir.join("root.ext4");
    root_partition(&vhd, &part);
    let cat = |p: &str| debugfs(&part, &format!("cat {p}"));
    assert_eq!(cat(&format!("{C}/kiln/deprovisioned")).0.trim(), "custom");
    let (o, e) = cat(&format!("{C}/Windows/Setup/State/State.ini"));
    assert!(
        o.is_empty() && e.contains("not found"),
        "no default sysprep: {o:?} {e:?}"
    );
    let (o, e) = cat(&format!("{C}/Windows/Panther/unattend.xml"));
    assert!(
        o.is_empty() && e.contains("not found"),
        "no answer file (password) left in the image: {o:?} {e:?}"
    );
    let _ = std::fs::remove_file(&part);
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// `--provisioning azure` on Gen2 (q35): Azure's DVD (ovf-env.xml's
/// WindowsProvisioningConfigurationSet beside Unattend.xml) on an ATAPI drive, this build's
/// fabric: the guest (playing Windows Setup and the guest agent) takes the account from the
/// DVD, reaches IMDS (osType Windows) and reports Ready to the wireserver, which kiln records;
/// File goes through the file endpoint on the Azure network. NoCloud is refused for Windows
/// before anything boots.
#[test]
fn azure_provisioning_of_a_windows_build_goes_through_the_dvd_and_the_fabric() {
    let c = Case::new("azure");
    let pf = c.dir.join("files").join("p.txt");
    std::fs::write(&pf, "over the Azure network\n").expect("payload");
    let port = serve(c.dir.join("files"));
    let t = c.template(
        "winrs-azure",
        "gen2",
        serde_json::json!([
            {"type": "PowerShell", "name": "imds", "inline": [
                "echo host=$(hostname)",
                "echo os=$(wget -q -O - --header 'Metadata: true' 'http://169.254.169.254/metadata/instance/compute/osType?api-version=2021-02-01&format=text')",
                "echo keys=$(wget -q -O - --header 'Metadata: true' 'http://169.254.169.254/metadata/instance/compute/publicKeys?api-version=2021-02-01')",
                "echo usb=$(ls /sys/bus/usb/devices 2>/dev/null | wc -l)",
                format!("mkdir -p {C}/kiln")
            ]},
            {"type": "File", "name": "payload", "sourceUri": format!("http://127.0.0.1:{port}/p.txt"),
             "sha256Checksum": sha256(&pf), "destination": r"C:\kiln\p.txt"},
            {"type": "PowerShell", "name": "check", "inline": [format!("cat {C}/kiln/p.txt")]}
        ]),
    );

    // NoCloud cannot carry a Windows password: refused before the VM starts.
    let (out, r) = c.expect(
        &t,
        &["--provisioning", "nocloud"],
        "Failed",
        "NoCloud-provisioned build (refused)",
    );
    let err = r["error"].as_str().unwrap_or("");
    assert!(
        err.contains("cannot provision a Windows build") && err.contains("azure"),
        "{err}"
    );
    assert!(
        !events(&out)
            .iter()
            .any(|e| e["event"] == "stepStarted" && e["step"] == "Start VM"),
        "nothing booted"
    );

    let (out, r) = c.expect(
        &t,
        &["--provisioning", "azure"],
        "Succeeded",
        "Azure-provisioned build",
    );
    let ev = events(&out);
    let info = infos(&ev);
    assert!(
        info.iter()
            .any(|m| m == "provisioning: azure (--provisioning)"),
        "{info:?}"
    );
    let p = ev
        .iter()
        .find(|e| e["event"] == "provisioned")
        .expect("provisioned event");
    assert_eq!(p["method"], "azure", "{p}");
    assert_eq!(p["health"], "Ready", "{p}");
    assert!(
        p["agent"].as_str().unwrap_or("").contains("kiln-winrs"),
        "{p}"
    );
    assert!(
        ev.iter().any(|e| e["event"] == "fabric"
            && e["target"]
                .as_str()
                .unwrap_or("")
                .contains("comp=goalstate")),
        "the guest fetched the goal state"
    );
    let imds = output_of(&ev, "Customize: PowerShell \"imds\"");
    assert!(value_after(&imds, "host=").starts_with("kiln-"), "{imds:?}");
    assert_eq!(value_after(&imds, "os="), "Windows", "{imds:?}");
    assert_eq!(value_after(&imds, "keys="), "[]", "{imds:?}");
    assert_eq!(
        value_after(&imds, "usb="),
        "0",
        "no USB stick: the DVD carried the answer file {imds:?}"
    );
    assert_eq!(
        output_of(&ev, "Customize: PowerShell \"check\""),
        ["over the Azure network"]
    );
    assert!(
        info.iter()
            .any(|m| m.contains("file endpoint: GET /f/") && m.contains("-> 200")),
        "File went through the file endpoint: {info:?}"
    );
    let run_dir = PathBuf::from(r["runDir"].as_str().unwrap_or(""));
    let console = std::fs::read_to_string(run_dir.join("console.log")).expect("console.log");
    assert!(
        console.contains("Azure provisioning document /run/dvd/ovf-env.xml on /dev/sr0")
            && console.contains("answer file /run/dvd/Unattend.xml on /dev/sr0 (DVD)")
            && console.contains("health report sent: Ready"),
        "{console}"
    );
    assert!(
        !run_dir.join("ovf-env.iso").exists(),
        "the DVD (it holds the password) is deleted"
    );
    assert_no_qemu(r["runDir"].as_str().unwrap_or(""));
    let _ = std::fs::remove_dir_all(&c.dir);
}
