//! `kiln doctor`: what the host has and lacks for running builds, each with its fix.

use super::accel::{probe_accel, probe_kvm, Accel, KVM_PROBE_DEADLINE};
use super::qemu::{find_ovmf, find_qemu, find_qemu_img};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Below this much free space in kiln's directory, doctor warns (an overlay grows to the
/// size of what the build writes, and an exported fixed VHD is the full disk size).
pub const LOW_DISK_SPACE: u64 = 20 << 30;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckState {
    /// present and working
    Ok,
    /// works, but not as it should (e.g. no KVM: builds run under slow TCG)
    Warning,
    /// missing or broken: some or all builds cannot run
    Missing,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoctorCheck {
    /// what was checked, e.g. `qemu-system-x86_64`
    pub name: String,
    /// the outcome
    pub state: CheckState,
    /// what was found (a version, paths, a probe result)
    pub detail: String,
    /// what to do, when not `Ok`
    pub fix: Option<String>,
}

/// Every check, in a fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoctorReport {
    /// the checks
    pub checks: Vec<DoctorCheck>,
}

impl DoctorReport {
    /// True when nothing is [`CheckState::Missing`].
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.state != CheckState::Missing)
    }
}

impl std::fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let state = match c.state {
                CheckState::Ok => "ok",
                CheckState::Warning => "warning",
                CheckState::Missing => "MISSING",
            };
            writeln!(f, "{state:<8} {:<width$}  {}", c.name, c.detail)?;
            if let Some(fix) = &c.fix {
                writeln!(f, "{:<8} {:<width$}  fix: {fix}", "", "")?;
            }
        }
        Ok(())
    }
}

/// Checks QEMU, qemu-img, OVMF, the free space under `dir` (kiln's home), KVM (a real
/// probe guest, up to [`KVM_PROBE_DEADLINE`]) and TCG (the same probe under emulation,
/// which shows QEMU can run a guest at all). Blocking; takes a few seconds at most.
pub fn doctor(dir: &Path) -> DoctorReport {
    let mut checks = vec![
        program_check("qemu-system-x86_64", find_qemu()),
        program_check("qemu-img", find_qemu_img()),
    ];
    checks.push(match find_ovmf() {
        Ok(o) => DoctorCheck {
            name: "OVMF (UEFI)".into(),
            state: CheckState::Ok,
            detail: format!("{} + {}", o.code.display(), o.vars.display()),
            fix: None,
        },
        Err(e) => DoctorCheck {
            name: "OVMF (UEFI)".into(),
            state: CheckState::Missing,
            detail: "not found: Hyper-V generation 2 (UEFI) images cannot boot".into(),
            fix: Some(format!("apt-get install {}", e.package)),
        },
    });
    checks.push(disk_check(dir));
    let kvm = probe_kvm(KVM_PROBE_DEADLINE);
    checks.push(DoctorCheck {
        name: "KVM".into(),
        state: if kvm.usable {
            CheckState::Ok
        } else {
            CheckState::Warning
        },
        detail: if kvm.usable {
            kvm.detail
        } else {
            format!(
                "{} (after {:.2} s); builds will run under TCG, 10-50x slower",
                kvm.detail,
                kvm.elapsed.as_secs_f64()
            )
        },
        fix: kvm.fix,
    });
    let tcg = probe_accel(Accel::Tcg, Duration::from_secs(10));
    checks.push(DoctorCheck {
        name: "TCG".into(),
        state: if tcg.usable {
            CheckState::Ok
        } else {
            CheckState::Missing
        },
        detail: tcg.detail,
        fix: if tcg.usable {
            None
        } else {
            Some("see the QEMU error above; reinstall qemu-system-x86".into())
        },
    });
    DoctorReport { checks }
}

fn program_check(name: &str, found: Result<PathBuf, super::Missing>) -> DoctorCheck {
    match found {
        Ok(path) => match version(&path) {
            Ok(v) => DoctorCheck {
                name: name.into(),
                state: CheckState::Ok,
                detail: format!("{v} ({})", path.display()),
                fix: None,
            },
            Err(e) => DoctorCheck {
                name: name.into(),
                state: CheckState::Missing,
                detail: format!("{} does not run: {e}", path.display()),
                fix: Some("reinstall it".into()),
            },
        },
        Err(e) => DoctorCheck {
            name: name.into(),
            state: CheckState::Missing,
            detail: "not found on PATH".into(),
            fix: Some(format!("apt-get install {}", e.package)),
        },
    }
}

/// The first line of `program --version`.
fn version(program: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Free bytes for unprivileged users on the file system holding `dir` (or its nearest
/// existing ancestor), and that directory.
pub fn free_space(dir: &Path) -> std::io::Result<(u64, PathBuf)> {
    let mut at = dir;
    while !at.exists() {
        at = match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if at == Path::new(".") {
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(at).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    Ok((free, at.to_path_buf()))
}

fn disk_check(dir: &Path) -> DoctorCheck {
    let name = "free space".to_string();
    match free_space(dir) {
        Ok((free, at)) => {
            let gib = free as f64 / (1u64 << 30) as f64;
            let detail = format!("{gib:.1} GiB free in {}", at.display());
            if free < LOW_DISK_SPACE {
                DoctorCheck {
                    name,
                    state: CheckState::Warning,
                    detail,
                    fix: Some(format!(
                        "free space there, or put kiln's home on a larger file system; a build needs room for its overlay and the exported VHD (the full disk size), {} GiB or more is comfortable",
                        LOW_DISK_SPACE >> 30
                    )),
                }
            } else {
                DoctorCheck {
                    name,
                    state: CheckState::Ok,
                    detail,
                    fix: None,
                }
            }
        }
        Err(e) => DoctorCheck {
            name,
            state: CheckState::Missing,
            detail: format!("cannot stat {}: {e}", dir.display()),
            fix: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_walks_up_to_an_existing_directory() {
        let (free, at) = free_space(Path::new("/tmp/kiln-doctor-does-not-exist/a/b")).unwrap();
        assert_eq!(at, PathBuf::from("/tmp"));
        assert!(free > 0);
    }

    #[test]
    fn report_renders_fixes_under_their_check() {
        let r = DoctorReport {
            checks: vec![
                DoctorCheck {
                    name: "qemu-img".into(),
                    state: CheckState::Ok,
                    detail: "qemu-img version 10.0.2".into(),
                    fix: None,
                },
                DoctorCheck {
                    name: "KVM".into(),
                    state: CheckState::Warning,
                    detail: "vCPU hung".into(),
                    fix: Some("use tcg".into()),
                },
                DoctorCheck {
                    name: "OVMF (UEFI)".into(),
                    state: CheckState::Missing,
                    detail: "not found".into(),
                    fix: Some("apt-get install ovmf".into()),
                },
            ],
        };
        assert!(!r.ok());
        assert_eq!(
            r.to_string(),
            "ok       qemu-img     qemu-img version 10.0.2\n\
             warning  KVM          vCPU hung\n\
             \x20                     fix: use tcg\n\
             MISSING  OVMF (UEFI)  not found\n\
             \x20                     fix: apt-get install ovmf\n"
        );
    }

    #[test]
    fn missing_programs_get_the_package() {
        let c = program_check(
            "qemu-img",
            Err(super::super::Missing {
                what: "qemu-img".into(),
                searched: "PATH".into(),
                package: "qemu-utils",
            }),
        );
        assert_eq!(c.state, CheckState::Missing);
        assert_eq!(c.fix.as_deref(), Some("apt-get install qemu-utils"));
    }
}
