//! The VM layer against real QEMU (under TCG, so it runs on any host): the accelerator
//! probe, the tiny test guest booting BIOS and UEFI and powering off on ACPI, the
//! shutdown ladder's rungs, start failures, and that no QEMU outlives its `Vm`.
//!
//! The tiny guest comes from `KILN_TEST_TINY_IMAGE` when set, else from
//! `cargo xtask images --only tiny` (which builds it once and caches it).

use kiln_engine::vm::*;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The tiny guest prints this on the console once dropbear listens (scripts/guest/tiny/rcS).
const READY: &str = "KILN-READY ssh";
/// Boot-to-ready under TCG is ~5-10 s on an idle host; leave room for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);

fn tiny_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_TEST_TINY_IMAGE") {
            return PathBuf::from(p);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the engine crate sits in the workspace");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["xtask", "images", "--only", "tiny"])
            .current_dir(workspace)
            .output()
            .expect("running cargo xtask images --only tiny");
        assert!(
            out.status.success(),
            "cargo xtask images --only tiny failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("xtask prints the disk path")
                .trim(),
        );
        assert!(
            path.is_file(),
            "xtask printed {path:?}, which is not a file"
        );
        path
    })
    .clone()
}

/// A scratch directory, removed on drop unless `KILN_KEEP_TEST_DIRS` is set.
struct TestDir(PathBuf);

impl TestDir {
    fn new(label: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("kiln-vm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("KILN_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn qemu_img(args: &[&std::ffi::OsStr]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh qcow2 overlay on the tiny guest.
fn tiny_overlay(dir: &Path) -> PathBuf {
    let img = tiny_image();
    let ov = dir.join("os.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        img.as_os_str(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        ov.as_os_str(),
    ]);
    ov
}

/// A blank disk: the firmware finds nothing to boot.
fn blank_disk(dir: &Path) -> PathBuf {
    let p = dir.join("blank.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        p.as_os_str(),
        "64M".as_ref(),
    ]);
    p
}

fn spec(dir: &Path, name: &str, disk: PathBuf, firmware: Firmware) -> VmSpec {
    VmSpec {
        cpus: 1,
        memory_mib: 256,
        ..VmSpec::new(name, dir.join("run"), disk, firmware, Accel::Tcg)
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Boots tiny, checks the seed is attached read-only and the SSH forward reaches the
/// guest's sshd, then presses the power button: the ladder must report the ACPI rung.
async fn boot_and_power_off(label: &str, firmware: Firmware) {
    let dir = TestDir::new(label);
    let disk = tiny_overlay(&dir.0);
    let seed = dir.0.join("seed.img");
    std::fs::write(&seed, vec![0u8; 1 << 20]).unwrap();
    let spec = VmSpec {
        seed_disk: Some(seed),
        ..spec(&dir.0, label, disk, firmware.clone())
    };
    let t0 = Instant::now();
    let vm = Vm::start(spec.clone()).await.unwrap();
    let qmp_up = t0.elapsed();
    if let Firmware::Uefi { vars_template, .. } = &firmware {
        let vars = spec.uefi_vars_path();
        assert_eq!(
            std::fs::metadata(&vars).unwrap().len(),
            std::fs::metadata(vars_template).unwrap().len(),
            "the build's own UEFI vars"
        );
    }

    let blocks = vm.execute("query-block", None).await.unwrap();
    let ro = |dev: &str| {
        blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == dev)
            .unwrap_or_else(|| panic!("no block device {dev} in {blocks}"))["inserted"]["ro"]
            .as_bool()
    };
    assert_eq!(ro("os"), Some(false));
    assert_eq!(ro("seed"), Some(true), "the seed disk must be read-only");

    let ready = match vm.wait_for_console(READY, BOOT_TIMEOUT).await {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    eprintln!(
        "[{label}] QMP after {:.2} s, `{READY}` after {:.1} s (since start)",
        qmp_up.as_secs_f64(),
        ready.as_secs_f64()
    );
    assert!(vm.console_contains(READY));
    assert!(vm.console_tail(5).contains(READY), "{}", vm.console_tail(5));
    assert_eq!(vm.console_panic(), None);
    assert_eq!(vm.reboot_count(), 0);

    // the forward reaches dropbear
    let port = vm.ssh_port();
    let banner = tokio::time::timeout(Duration::from_secs(60), async move {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .expect("an SSH banner within 60 s");
    assert!(banner.starts_with("SSH-2.0-"), "banner {banner:?}");

    // the tiny guest prints its readiness line just before busybox init starts acpid,
    // so the first press can come too early: the ladder presses again every 5 s
    let timeouts = ShutdownTimeouts {
        acpi: Duration::from_secs(120),
        acpi_repeat: Duration::from_secs(5),
        ..ShutdownTimeouts::default()
    };
    let report = vm.shutdown_ladder(None, timeouts).await.unwrap();
    eprintln!("[{label}] {report}");
    assert_eq!(
        report.rung,
        ShutdownRung::Acpi,
        "{report}\n{}",
        vm.console_tail(20)
    );
    assert!(report.exit_status.success(), "{report}");
    assert_eq!(
        report.shutdown_event,
        Some(ShutdownEvent {
            guest: true,
            reason: "guest-shutdown".into()
        }),
        "{report}"
    );
    assert!(report.notes.is_empty(), "{report}");
    assert!(vm.status().powerdowns >= 1);
    assert!(
        !alive(vm.pid()),
        "QEMU must be reaped once the ladder returns"
    );
    assert!(
        vm.console_contains("kiln: shutting down"),
        "the guest ran its shutdown scripts"
    );
}

#[tokio::test]
async fn tiny_boots_bios_and_powers_off_on_acpi() {
    boot_and_power_off("bios", Firmware::Bios).await;
}

#[tokio::test]
async fn tiny_boots_uefi_and_powers_off_on_acpi() {
    boot_and_power_off("uefi", Firmware::uefi_default().unwrap()).await;
}

/// Nothing boots: the guest command fails at once (kiln waits only the grace period),
/// the firmware ignores the power button, and `quit` ends it.
#[tokio::test]
async fn a_guest_that_never_boots_is_stopped_by_quit() {
    let dir = TestDir::new("noboot");
    let vm = Vm::start(spec(&dir.0, "noboot", blank_disk(&dir.0), Firmware::Bios))
        .await
        .unwrap();
    // a running VM: the watch stays pending
    let watch = vm.watch();
    tokio::pin!(watch);
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut watch)
        .await
        .is_err());
    // a reset is seen (what a guest reboot looks like). SeaBIOS answers a warm reset
    // by resetting the machine once more (a hard reset re-initializes its shadowed
    // ROM), so one reboot of a BIOS guest is two RESET events: pinned here, because
    // callers must compare counts with `>`, never expect +1
    assert_eq!(vm.reboot_count(), 0);
    vm.execute("system_reset", None).await.unwrap();
    assert!(vm.wait_reset_since(0, Duration::from_secs(10)).await);
    assert!(
        vm.wait_reset_since(1, Duration::from_secs(10)).await,
        "SeaBIOS's second RESET after a warm reset"
    );
    let resets = vm.reboot_count();
    assert_eq!(resets, 2, "{:?}", vm.status());

    let timeouts = ShutdownTimeouts {
        guest: Duration::from_secs(300),
        guest_error_grace: Duration::from_secs(1),
        acpi: Duration::from_secs(3),
        acpi_repeat: Duration::from_secs(1),
        quit: Duration::from_secs(10),
        kill: Duration::from_secs(10),
    };
    let guest: GuestShutdown =
        Box::pin(async { Err("ssh: connect to host 127.0.0.1: Connection refused".to_string()) });
    let report = vm.shutdown_ladder(Some(guest), timeouts).await.unwrap();
    eprintln!("[noboot] {report}");
    assert_eq!(report.rung, ShutdownRung::Quit, "{report}");
    assert_eq!(
        report.guest_command_error.as_deref(),
        Some("ssh: connect to host 127.0.0.1: Connection refused")
    );
    assert!(
        report.elapsed >= Duration::from_secs(4),
        "grace + ACPI were waited: {report}"
    );
    assert!(
        report.elapsed < Duration::from_secs(60),
        "not the full guest timeout: {report}"
    );
    assert_eq!(
        report.shutdown_event,
        Some(ShutdownEvent {
            guest: false,
            reason: "host-qmp-quit".into()
        })
    );
    assert_eq!(report.notes.len(), 2, "{report}");
    assert!(report.notes[1].contains("presses in 3 s"), "{report}");
    assert!(
        report.to_string().starts_with("QEMU quit on QMP `quit`"),
        "{report}"
    );
    // the ladder on an exited VM
    let again = vm.shutdown_ladder(None, timeouts).await.unwrap();
    assert_eq!(again.rung, ShutdownRung::AlreadyExited);
    let why = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .unwrap();
    assert_eq!(why, "QEMU exited (exit status: 0)");
    assert!(!vm.wait_reset_since(resets, Duration::from_secs(5)).await);
}

/// Two VMs at once get different ports; dropping a running VM leaves no QEMU; a guest
/// command that ends QEMU stops the ladder at the guest rung (here the "command" is a
/// QMP `quit`, standing in for `shutdown -h now` over SSH); only a detachable VM survives
/// `detach`.
#[tokio::test]
async fn guest_rung_drop_and_concurrent_ports() {
    let dir = TestDir::new("drop");
    let a = Vm::start(spec(&dir.0, "a", blank_disk(&dir.0), Firmware::Bios))
        .await
        .unwrap();
    let dir_b = TestDir::new("drop-b");
    let b = Vm::start(spec(&dir_b.0, "b", blank_disk(&dir_b.0), Firmware::Bios))
        .await
        .unwrap();
    assert_ne!(a.ssh_port(), b.ssh_port());
    assert_ne!(a.pid(), b.pid());

    // drop while running: killed and reaped before drop returns
    let pid = a.pid();
    let exited = a.exited();
    assert!(alive(pid));
    let t = Instant::now();
    drop(a);
    assert!(!alive(pid), "QEMU pid {pid} survived its Vm");
    eprintln!(
        "[drop] killed and reaped in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let st = tokio::time::timeout(Duration::from_secs(5), exited)
        .await
        .expect("exited() resolves after the drop");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));

    // the guest rung: a "guest command" that makes QEMU exit
    let qmp_quit = async {
        b.qmp()
            .execute("quit", None)
            .await
            .map(|_| ())
            .or_else(|e| match e {
                QmpError::Disconnected => Ok(()),
                e => Err(e.to_string()),
            })
    };
    let report = b
        .shutdown_ladder(Some(Box::pin(qmp_quit)), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(report.rung, ShutdownRung::Guest, "{report}");
    assert!(report.elapsed < Duration::from_secs(10), "{report}");
    assert!(!alive(b.pid()));

    // detach: only a detachable VM survives its handle
    let c = Vm::start(spec(&dir.0, "c", blank_disk(&dir.0), Firmware::Bios))
        .await
        .unwrap();
    let pid_c = c.pid();
    assert_eq!(c.detach(), None, "not detachable: killed like a drop");
    assert!(!alive(pid_c));
    let dir_d = TestDir::new("detach");
    let d = Vm::start(VmSpec {
        detachable: true,
        ..spec(&dir_d.0, "d", blank_disk(&dir_d.0), Firmware::Bios)
    })
    .await
    .unwrap();
    let pid_d = d.pid();
    assert_eq!(d.detach(), Some(pid_d));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alive(pid_d), "a detached VM keeps running");
    let killed = Command::new("kill")
        .arg("-KILL")
        .arg(pid_d.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let t = Instant::now();
    while alive(pid_d) && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid_d),
        "kiln still reaps a detached QEMU that exits while it runs"
    );

    // the async accelerator choice agrees with the cached probe
    let (accel, warning) = choose_accel(AccelRequest::Auto).await.unwrap();
    assert_eq!(accel == Accel::Kvm, kvm_probe_cached().usable);
    assert_eq!(warning.is_some(), !kvm_probe_cached().usable);
    assert_eq!(
        choose_accel(AccelRequest::Tcg).await.unwrap(),
        (Accel::Tcg, None)
    );
}

#[tokio::test]
async fn start_failures_carry_qemu_stderr_and_the_run_dir() {
    let dir = TestDir::new("fail");
    let missing = dir.0.join("no-such-disk.qcow2");
    let err = Vm::start(spec(&dir.0, "broken", missing.clone(), Firmware::Bios))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::StartFailed { .. }), "{err:?}");
    assert!(
        msg.starts_with("VM broken: QEMU failed to start (exit status: 1)"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("run directory {}", dir.0.join("run").display())),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("Could not open '{}'", missing.display())),
        "{msg}"
    );

    // a fixed port that is taken is not retried, and the error says why
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let s = VmSpec {
        ssh_port: Some(port),
        ..spec(&dir.0, "taken", blank_disk(&dir.0), Firmware::Bios)
    };
    let msg = Vm::start(s).await.unwrap_err().to_string();
    assert!(
        msg.contains(&format!(
            "Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:22'"
        )),
        "{msg}"
    );

    let s = VmSpec {
        qemu: Some("/nonexistent/qemu-system-x86_64".into()),
        ..spec(&dir.0, "noqemu", blank_disk(&dir.0), Firmware::Bios)
    };
    let msg = Vm::start(s).await.unwrap_err().to_string();
    assert!(
        msg.starts_with("VM noqemu: cannot start /nonexistent/qemu-system-x86_64: "),
        "{msg}"
    );
}

#[test]
fn kvm_probe_returns_within_its_deadline_and_agrees_with_itself() {
    let deadline = Duration::from_secs(2);
    let slack = Duration::from_millis(500); // reaping a killed QEMU, a loaded host
    let t = Instant::now();
    let first = probe_kvm(deadline);
    let wall = t.elapsed();
    eprintln!(
        "[kvm] usable={} in {:.2} s: {}",
        first.usable,
        first.elapsed.as_secs_f64(),
        first.detail
    );
    assert!(wall <= deadline + slack, "the probe took {wall:?}");
    assert!(first.elapsed <= wall);
    assert_eq!(first.accel, Accel::Kvm);
    let second = probe_kvm(deadline);
    assert_eq!(
        first.usable, second.usable,
        "two probes disagree: {first:?} / {second:?}"
    );
    if !Path::new("/dev/kvm").exists() {
        assert!(!first.usable);
        assert!(
            first.detail.contains("/dev/kvm does not exist"),
            "{}",
            first.detail
        );
    }
    if first.usable {
        assert!(first.fix.is_none());
    } else {
        assert!(
            first.fix.is_some(),
            "an unusable KVM comes with a fix: {first:?}"
        );
    }

    // choose_accel follows the probe
    match choose_accel_blocking(AccelRequest::Auto) {
        Ok((Accel::Kvm, None)) => assert!(first.usable),
        Ok((Accel::Tcg, Some(w))) => {
            assert!(!first.usable);
            assert!(w.to_string().contains("falling back to TCG"), "{w}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        choose_accel_blocking(AccelRequest::Kvm).is_ok(),
        first.usable
    );
    assert_eq!(
        choose_accel_blocking(AccelRequest::Tcg).unwrap(),
        (Accel::Tcg, None)
    );
}

/// The probe guest itself works (so "KVM unusable" is about KVM, not the probe).
#[test]
fn the_probe_guest_runs_under_tcg() {
    let p = probe_accel(Accel::Tcg, Duration::from_secs(30));
    eprintln!("[tcg probe] {:.2} s: {}", p.elapsed.as_secs_f64(), p.detail);
    assert!(p.usable, "{p:?}");
    assert!(
        p.detail.starts_with("a probe guest ran under TCG in "),
        "{}",
        p.detail
    );
}

#[test]
fn doctor_reports_every_item() {
    let dir = TestDir::new("doctor");
    let r = doctor(&dir.0);
    eprintln!("{r}");
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "qemu-system-x86_64",
            "qemu-img",
            "OVMF (UEFI)",
            "free space",
            "KVM",
            "TCG"
        ]
    );
    let check = |n: &str| r.checks.iter().find(|c| c.name == n).unwrap();
    assert_eq!(check("qemu-system-x86_64").state, CheckState::Ok);
    assert!(
        check("qemu-system-x86_64")
            .detail
            .starts_with("QEMU emulator version "),
        "{r}"
    );
    assert!(
        check("qemu-img").detail.starts_with("qemu-img version "),
        "{r}"
    );
    assert_eq!(check("TCG").state, CheckState::Ok, "{r}");
    let kvm_ok = check("KVM").state == CheckState::Ok;
    assert_eq!(kvm_ok, kvm_probe_cached().usable, "{r}");
}

/// QEMU accepts every device model option's argv on both machine types and the devices are
/// there: the OS disk on its controller, the NIC's PCI id, the seed as removable USB media.
/// (It proves the command line, not how a guest OS drives these devices.) The disks are blank:
/// the firmware finds nothing to boot, which is all this needs.
#[tokio::test]
async fn device_models_are_accepted_by_qemu() {
    let dir = TestDir::new("devices");
    let seed = dir.0.join("seed.img");
    std::fs::write(&seed, vec![0u8; 1 << 20]).unwrap();
    // (firmware, disk bus, NIC, seed attach, the NIC's PCI device id)
    let cases = [
        (
            Firmware::Bios,
            DiskBus::Ahci,
            NicModel::E1000,
            SeedAttach::UsbRemovable,
            0x100e,
        ),
        (
            Firmware::Bios,
            DiskBus::Ide,
            NicModel::E1000e,
            SeedAttach::VirtioDisk,
            0x10d3,
        ),
        (
            Firmware::uefi_default().unwrap(),
            DiskBus::Ahci,
            NicModel::E1000e,
            SeedAttach::UsbRemovable,
            0x10d3,
        ),
        (
            Firmware::uefi_default().unwrap(),
            DiskBus::Ide,
            NicModel::E1000,
            SeedAttach::UsbRemovable,
            0x100e,
        ),
    ];
    for (i, (firmware, bus, nic, attach, nic_id)) in cases.into_iter().enumerate() {
        let what = format!("{firmware:?} {bus:?} {nic:?} {attach:?}");
        let q35 = matches!(firmware, Firmware::Uefi { .. });
        let run = dir.0.join(format!("r{i}"));
        std::fs::create_dir_all(&run).unwrap();
        let vm = Vm::start(VmSpec {
            disk_bus: bus,
            nic_model: nic,
            seed_disk: Some(seed.clone()),
            seed_attach: attach,
            ..spec(&run, &format!("dev{i}"), blank_disk(&run), firmware)
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let blocks = vm.execute("query-block", None).await.unwrap();
        let block = |dev: &str| {
            blocks
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["device"] == dev)
                .unwrap_or_else(|| panic!("{what}: no block device {dev}: {blocks}"))
                .clone()
        };
        assert_eq!(block("os")["inserted"]["ro"], false, "{what}");
        let s = block("seed");
        assert_eq!(s["inserted"]["ro"], true, "{what}: {s}");
        assert_eq!(
            s["removable"],
            attach == SeedAttach::UsbRemovable,
            "{what}: {s}"
        );
        let pci = vm.execute("query-pci", None).await.unwrap();
        let ids: Vec<(u64, u64)> = pci[0]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["id"]["vendor"].as_u64().unwrap(),
                    d["id"]["device"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(
            ids.contains(&(0x8086, nic_id)),
            "{what}: NIC not on the bus: {ids:x?}"
        );
        assert!(
            !ids.iter()
                .any(|&(v, d)| v == 0x1af4 && (d == 0x1000 || d == 0x1041)),
            "{what}: a virtio NIC is there too: {ids:x?}"
        );
        if bus == DiskBus::Ahci {
            // a second AHCI controller (ICH9 AHCI, 8086:2922): on q35 besides the built-in one
            let n = ids.iter().filter(|&&x| x == (0x8086, 0x2922)).count();
            assert_eq!(n, 1 + usize::from(q35), "{what}: {ids:x?}");
        }
        if attach == SeedAttach::UsbRemovable {
            // qemu-xhci is 1b36:000d
            assert!(ids.contains(&(0x1b36, 0x000d)), "{what}: no xHCI: {ids:x?}");
        }
        drop(vm);
    }
}
