//! The accelerator: KVM when a guest really runs under it, else TCG, loudly.
//!
//! `/dev/kvm` existing proves little: on some hosts (nested virtualization without the
//! right CPU features, some sandboxes) KVM opens fine but QEMU aborts setting up the vCPU
//! (`-cpu host`), or the vCPU fails or spins as soon as the firmware leaves real mode. So
//! [`probe_kvm`] boots a probe guest under KVM exactly as kiln would (`-cpu host`), through
//! SeaBIOS (which switches between real and protected mode on every BIOS call) into a
//! boot sector that writes to `isa-debug-exit`, and requires QEMU to exit with the status
//! that write produces, all within a deadline. A probe that hangs is killed.

use super::process::{ChildProc, Tie};
use super::qemu::{escape, find_qemu};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The accelerator a VM runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's emulator (`-accel tcg -cpu max`): works everywhere, 10–50× slower.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`, as QEMU spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for (`--accel auto|kvm|tcg`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccelRequest {
    /// KVM when usable, else TCG with a warning.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG, no probe.
    Tcg,
}

impl std::str::FromStr for AccelRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            _ => Err(format!(
                "unknown accelerator `{s}` (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// The result of running the probe guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelProbe {
    /// the accelerator probed
    pub accel: Accel,
    /// whether the probe guest ran to its end under it
    pub usable: bool,
    /// one sentence on what happened, for logs and `kiln doctor`
    pub detail: String,
    /// what the user can do about it, when unusable
    pub fix: Option<String>,
    /// how long the probe took
    pub elapsed: Duration,
}

/// The default deadline for [`probe_kvm`]: a working KVM finishes the probe in well
/// under half a second.
pub const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// `--accel kvm` was requested but KVM is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`--accel kvm` was requested but KVM is unusable: {detail}{}", fix.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct KvmUnusable {
    /// the probe's detail
    pub detail: String,
    /// the probe's fix
    pub fix: Option<String>,
}

/// A message the engine must show prominently (not bury in a debug log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelWarning(pub String);

impl From<AccelWarning> for String {
    fn from(w: AccelWarning) -> String {
        w.0
    }
}

impl std::fmt::Display for AccelWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Picks the accelerator for `requested`, probing KVM once per process (see
/// [`kvm_probe_cached`]; the first probe runs on a blocking thread, up to
/// [`KVM_PROBE_DEADLINE`]). `Auto` falls back to TCG with a warning for the user;
/// `Kvm` fails when KVM is unusable.
pub async fn choose_accel(
    requested: AccelRequest,
) -> Result<(Accel, Option<AccelWarning>), KvmUnusable> {
    if requested == AccelRequest::Tcg {
        return Ok((Accel::Tcg, None));
    }
    let probe = match tokio::task::spawn_blocking(|| kvm_probe_cached().clone()).await {
        Ok(p) => p,
        Err(e) => AccelProbe {
            accel: Accel::Kvm,
            usable: false,
            detail: format!("the KVM probe failed: {e}"),
            fix: None,
            elapsed: Duration::ZERO,
        },
    };
    choose_accel_with(requested, || probe)
}

/// [`choose_accel`] for synchronous callers (blocks up to [`KVM_PROBE_DEADLINE`] the
/// first time).
pub fn choose_accel_blocking(
    requested: AccelRequest,
) -> Result<(Accel, Option<AccelWarning>), KvmUnusable> {
    choose_accel_with(requested, || kvm_probe_cached().clone())
}

/// [`choose_accel`] with the probe supplied by the caller (called only when needed).
pub fn choose_accel_with(
    requested: AccelRequest,
    probe: impl FnOnce() -> AccelProbe,
) -> Result<(Accel, Option<AccelWarning>), KvmUnusable> {
    match requested {
        AccelRequest::Tcg => Ok((Accel::Tcg, None)),
        AccelRequest::Kvm => {
            let p = probe();
            if p.usable {
                Ok((Accel::Kvm, None))
            } else {
                Err(KvmUnusable {
                    detail: p.detail,
                    fix: p.fix,
                })
            }
        }
        AccelRequest::Auto => {
            let p = probe();
            if p.usable {
                return Ok((Accel::Kvm, None));
            }
            let mut msg = format!(
                "KVM is unusable: {}; falling back to TCG (software emulation, 10-50x slower: builds will take much longer)",
                p.detail
            );
            if let Some(fix) = &p.fix {
                msg.push_str(&format!(". To use KVM: {fix}"));
            }
            msg.push_str(". Pass `--accel tcg` to choose TCG without this warning.");
            Ok((Accel::Tcg, Some(AccelWarning(msg))))
        }
    }
}

/// [`probe_kvm`] with [`KVM_PROBE_DEADLINE`], run once per process.
pub fn kvm_probe_cached() -> &'static AccelProbe {
    static PROBE: OnceLock<AccelProbe> = OnceLock::new();
    PROBE.get_or_init(|| probe_kvm(KVM_PROBE_DEADLINE))
}

/// Checks `/dev/kvm`, then runs the probe guest under KVM. Returns within `deadline`
/// (plus a few milliseconds to reap a killed QEMU).
pub fn probe_kvm(deadline: Duration) -> AccelProbe {
    let start = Instant::now();
    let done = |usable: bool, detail: String, fix: Option<String>| AccelProbe {
        accel: Accel::Kvm,
        usable,
        detail,
        fix,
        elapsed: start.elapsed(),
    };
    if let Err((detail, fix)) = check_dev_kvm(Path::new("/dev/kvm"), &cpu_flags()) {
        return done(false, detail, Some(fix));
    }
    let p = probe_accel(Accel::Kvm, deadline.saturating_sub(start.elapsed()));
    done(p.usable, p.detail, p.fix)
}

/// The CPU's virtualization flag (`vmx`, `svm`) from /proc/cpuinfo, if any.
fn cpu_flags() -> Option<&'static str> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags"))?;
    flags
        .split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
        .map(|f| if f == "vmx" { "vmx" } else { "svm" })
}

/// Why `/dev/kvm` cannot be used (detail, fix), or `Ok` when it opens read-write.
fn check_dev_kvm(dev: &Path, virt_flag: &Option<&str>) -> Result<(), (String, String)> {
    let no_virt = "the CPU flags in /proc/cpuinfo show neither vmx nor svm, so hardware virtualization is \
                   not available here (off in the firmware, or this machine is itself a VM without nested \
                   virtualization)";
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(match virt_flag {
            Some(flag) => (
                format!("{} does not exist although the CPU has {flag}", dev.display()),
                format!("load the KVM module: modprobe kvm_{}", if *flag == "vmx" { "intel" } else { "amd" }),
            ),
            None => (
                format!("{} does not exist: {no_virt}", dev.display()),
                "enable virtualization (VT-x/AMD-V) in the firmware, or nested virtualization for this VM".into(),
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::MetadataExt;
            let group = std::fs::metadata(dev).map(|m| group_name(m.gid())).unwrap_or_else(|_| "kvm".into());
            Err((
                format!("permission denied opening {} read-write", dev.display()),
                format!("add your user to the `{group}` group (sudo usermod -aG {group} $USER) and log in again"),
            ))
        }
        Err(e) => Err((format!("cannot open {}: {e}", dev.display()), "see `dmesg` for KVM errors".into())),
    }
}

fn group_name(gid: u32) -> String {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            f.next()?;
            (f.next()?.parse::<u32>().ok()? == gid).then(|| name.to_string())
        })
        .unwrap_or_else(|| gid.to_string())
}

/// The value the probe's boot sector writes to `isa-debug-exit`; QEMU then exits with
/// `(value << 1) | 1`.
const PROBE_EXIT_VALUE: u8 = 0x21;

/// A 512-byte MBR: write 'K' to COM1, write [`PROBE_EXIT_VALUE`] to port 0xf4
/// (isa-debug-exit), then halt forever.
fn probe_boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let code = [
        0xBA,
        0xF8,
        0x03, // mov dx, 0x3f8
        0xB0,
        b'K', // mov al, 'K'
        0xEE, // out dx, al
        0xB0,
        PROBE_EXIT_VALUE, // mov al, PROBE_EXIT_VALUE
        0xE6,
        0xF4, // out 0xf4, al
        0xF4, // hlt
        0xEB,
        0xFD, // jmp back to hlt
    ];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// The probe guest's QEMU arguments.
fn probe_argv(accel: Accel, boot_sector: &Path) -> Vec<OsString> {
    let mut drive = OsString::from("file=");
    drive.push(escape(boot_sector.as_os_str()));
    // IDE: SeaBIOS does not boot a one-sector virtio disk, and QEMU refuses a read-only
    // IDE disk; the file is the probe's own scratch copy anyway
    drive.push(",format=raw,if=ide");
    let cpu = if accel == Accel::Kvm { "host" } else { "max" };
    let mut a: Vec<OsString> = [
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu,
        "-machine",
        "pc",
        "-m",
        "16",
        "-smp",
        "1",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    a.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
        ]
        .into_iter()
        .map(OsString::from),
    );
    a.push(drive);
    a
}

/// Runs the probe guest under `accel` (no `/dev/kvm` checks: see [`probe_kvm`]). Under
/// TCG this shows that QEMU can run a guest at all. Returns within `deadline` (plus a few
/// milliseconds to reap a killed QEMU).
pub fn probe_accel(accel: Accel, deadline: Duration) -> AccelProbe {
    let start = Instant::now();
    let (usable, detail, fix) = run_probe(accel, deadline, start);
    AccelProbe {
        accel,
        usable,
        detail,
        fix,
        elapsed: start.elapsed(),
    }
}

fn run_probe(accel: Accel, deadline: Duration, start: Instant) -> (bool, String, Option<String>) {
    let name = accel.as_str().to_uppercase();
    let qemu = match find_qemu() {
        Ok(q) => q,
        Err(e) => {
            return (
                false,
                e.to_string(),
                Some(format!("apt-get install {}", e.package)),
            )
        }
    };
    static N: AtomicUsize = AtomicUsize::new(0);
    let sector = std::env::temp_dir().join(format!(
        "kiln-accel-probe-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _cleanup = RemoveOnDrop(sector.clone());
    if let Err(e) = std::fs::write(&sector, probe_boot_sector()) {
        return (
            false,
            format!("cannot write the probe disk {}: {e}", sector.display()),
            None,
        );
    }
    let mut cmd = Command::new(&qemu);
    cmd.args(probe_argv(accel, &sector))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match ChildProc::spawn(cmd, None, Tie::DiesWithKiln, "kiln-accel-probe") {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {}: {e}", qemu.display()), None),
    };
    child.drop_wait = Duration::from_millis(200);
    let Some(reader) = child.take_stderr() else {
        return (false, "QEMU's stderr pipe is missing".into(), None);
    };
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    std::thread::Builder::new()
        .name("kiln-accel-probe-stderr".into())
        .spawn(move || {
            for line in BufReader::new(reader).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Some(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(None);
        })
        .ok();
    let mut stderr: Vec<String> = Vec::new();
    let end = start + deadline.saturating_sub(Duration::from_millis(50));
    let mut internal_error = false;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(l)) => {
                if l.contains("KVM internal error") || l.contains("emulation failure") {
                    internal_error = true;
                }
                stderr.push(l);
                if internal_error {
                    // QEMU pauses the VM and waits: nothing more will happen
                    break;
                }
            }
            Ok(None) => break, // stderr closed: QEMU exited
            Err(_) => break,   // deadline (or the reader thread is gone)
        }
    }
    let left = end.saturating_duration_since(Instant::now());
    let status = if internal_error {
        None
    } else {
        child.wait_timeout(left)
    };
    let said = summarize(&stderr);
    let elapsed = start.elapsed().as_secs_f64();
    let kvm_fix = || {
        Some("check `dmesg` for KVM errors; on a nested host enable nested virtualization with the host CPU model passed through, or use `--accel tcg`".to_string())
    };
    match status {
        Some(st) if st.code() == Some(((PROBE_EXIT_VALUE as i32) << 1) | 1) => (
            true,
            format!("a probe guest ran under {name} in {elapsed:.2} s"),
            None,
        ),
        Some(st) => (
            false,
            format!(
                "{}QEMU could not run a guest under {name} ({st}){}",
                if accel == Accel::Kvm {
                    "KVM is present but "
                } else {
                    ""
                },
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ),
            if accel == Accel::Kvm { kvm_fix() } else { None },
        ),
        None => {
            let _ = child.kill();
            let why = if internal_error {
                format!("the guest's vCPU failed ({said})")
            } else {
                format!(
                    "a guest did not run within {:.1} s (vCPU hung)",
                    deadline.as_secs_f64()
                )
            };
            (
                false,
                format!(
                    "{}{why}",
                    if accel == Accel::Kvm {
                        "KVM is present but "
                    } else {
                        ""
                    }
                ),
                if accel == Accel::Kvm { kvm_fix() } else { None },
            )
        }
    }
}

/// QEMU's error lines, without its program-name prefix and its CPUID warnings.
fn summarize(stderr: &[String]) -> String {
    let lines: Vec<&str> = stderr
        .iter()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("qemu-system-x86_64: ").unwrap_or(l))
        .filter(|l| {
            !l.is_empty() && !l.starts_with("warning: host doesn't support requested feature")
        })
        .filter(|l| !l.starts_with("extra data") && !is_register_dump(l))
        .take(3)
        .collect();
    lines.join("; ")
}

/// `EAX=00007b2e EBX=...`, `CS =0020 ...`, `Code=eb de ...`: QEMU's register dump.
fn is_register_dump(line: &str) -> bool {
    line.find('=').is_some_and(|i| {
        let key = line[..i].trim();
        key.len() <= 6 && key.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(usable: bool) -> AccelProbe {
        AccelProbe {
            accel: Accel::Kvm,
            usable,
            detail: if usable {
                "a probe guest ran under KVM in 0.20 s".into()
            } else {
                "KVM is present but a guest did not run within 2.0 s (vCPU hung)".into()
            },
            fix: (!usable).then(|| "use --accel tcg".into()),
            elapsed: Duration::from_millis(200),
        }
    }

    #[test]
    fn choose_accel_table() {
        // (request, kvm usable, expected accel or error, warning expected)
        let cases = [
            (AccelRequest::Auto, true, Some(Accel::Kvm), false),
            (AccelRequest::Auto, false, Some(Accel::Tcg), true),
            (AccelRequest::Kvm, true, Some(Accel::Kvm), false),
            (AccelRequest::Kvm, false, None, false),
            (AccelRequest::Tcg, true, Some(Accel::Tcg), false),
            (AccelRequest::Tcg, false, Some(Accel::Tcg), false),
        ];
        for (req, usable, want, warns) in cases {
            let got = choose_accel_with(req, || probe(usable));
            match (got, want) {
                (Ok((accel, warning)), Some(w)) => {
                    assert_eq!(accel, w, "{req:?} usable={usable}");
                    assert_eq!(warning.is_some(), warns, "{req:?} usable={usable}");
                    if let Some(w) = warning {
                        assert!(
                            w.0.contains("vCPU hung")
                                && w.0.contains("falling back to TCG")
                                && w.0.contains("use --accel tcg"),
                            "{w}"
                        );
                    }
                }
                (Err(e), None) => assert!(
                    e.to_string().starts_with(
                        "`--accel kvm` was requested but KVM is unusable: KVM is present"
                    ),
                    "{e}"
                ),
                (got, want) => panic!("{req:?} usable={usable}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn tcg_never_probes() {
        let r = choose_accel_with(AccelRequest::Tcg, || panic!("probed"));
        assert_eq!(r.unwrap(), (Accel::Tcg, None));
    }

    #[test]
    fn accel_request_parses() {
        assert_eq!("AUTO".parse(), Ok(AccelRequest::Auto));
        assert_eq!("kvm".parse(), Ok(AccelRequest::Kvm));
        assert_eq!("tcg".parse(), Ok(AccelRequest::Tcg));
        assert!("hvf"
            .parse::<AccelRequest>()
            .unwrap_err()
            .contains("expected auto, kvm or tcg"));
    }

    #[test]
    fn dev_kvm_problems_are_explained() {
        let dir = std::env::temp_dir().join(format!("kiln-kvm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("kvm-missing");
        let (d, f) = check_dev_kvm(&missing, &None).unwrap_err();
        assert!(
            d.contains("does not exist") && d.contains("neither vmx nor svm"),
            "{d}"
        );
        assert!(f.contains("nested virtualization"), "{f}");
        let (d, f) = check_dev_kvm(&missing, &Some("vmx")).unwrap_err();
        assert!(d.contains("although the CPU has vmx"), "{d}");
        assert_eq!(f, "load the KVM module: modprobe kvm_intel");
        let present = dir.join("kvm-present");
        std::fs::write(&present, b"").unwrap();
        assert!(check_dev_kvm(&present, &None).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn boot_sector_is_bootable_and_exits_through_debug_exit() {
        let s = probe_boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        assert_eq!(&s[6..10], &[0xB0, PROBE_EXIT_VALUE, 0xE6, 0xF4]);
    }

    #[test]
    fn stderr_summary_keeps_the_error_and_drops_noise() {
        let lines: Vec<String> = [
            "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]",
            "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069",
            "qemu-system-x86_64: target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            summarize(&lines),
            "error: failed to set MSR 0x10a to 0xc000069; target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."
        );
        let internal: Vec<String> = [
            "KVM internal error. Suberror: 1",
            "extra data[0]: 0x0000000000000001",
            "emulation failure",
            "EAX=00007b2e EBX=00008f98",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            summarize(&internal),
            "KVM internal error. Suberror: 1; emulation failure"
        );
    }
}
