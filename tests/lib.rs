//! Shared fixtures for kiln integration tests.
//!
//! - [`image`]: the test guest images (`tiny`, `debian`), built through the same code as
//!   `cargo xtask images` when the cache lacks them;
//! - [`Key`], [`Seed`]: a fresh ed25519 key (ssh-keygen) and a NoCloud seed carrying it,
//!   shaped like the user-data kiln generates;
//! - [`Vm`]: a QEMU guest under TCG (BIOS or UEFI) on its own copy-on-write overlay, with
//!   its SSH port forwarded to a free host port; killed on drop;
//! - [`ssh`]: runs commands with the OpenSSH client;
//! - [`winrs_server`]: a WinRS (WS-Man Windows Remote Shell) server for Linux, with NTLM sealing
//!   and HTTPS, running received commands through a documented shim;
//! - [`winrs_wu`]: the Windows Update Agent emulation the shim runs for kiln's WindowsUpdate rounds.

pub mod guest;
pub mod inspect;
pub mod winrs_server;
pub mod winrs_wu;

pub use guest::*;

/// A fresh per-process scratch directory `<tmp>/<prefix>-<pid>` for a test binary's shared
/// KILN_HOME. Test binaries cannot clean up after their statics, so each start removes the
/// directories of earlier runs of the same prefix whose process is gone (a running one — another
/// test binary of the same kind — is left alone): a run leaves at most its own behind.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
