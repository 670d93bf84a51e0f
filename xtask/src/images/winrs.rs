//! The `winrs` guest: the tiny guest with kiln's WinRS test server inside — **a Linux guest
//! that speaks WinRS**, labelled as such in its catalog metadata, so that kiln's Windows build
//! (unattend media, WinRM over NTLM-sealed HTTP, PowerShell / File / WindowsRestart, Sysprep,
//! shutdown) runs end to end against a real QEMU VM here, where no Windows image exists.
//!
//! What it adds to the tiny guest (docs/test-guests.md):
//! - `kiln-winrs-server` (tests/bin/kiln-winrs-server.rs) at /usr/bin, stripped, with the
//!   shared libraries it needs (copied like dropbear's);
//! - the kernel modules for kiln's Windows provisioning media, a removable USB stick on
//!   qemu-xhci: `xhci_pci`, `usb_storage`, `sd_mod` (vfat is already there); AHCI and e1000
//!   (the Windows device defaults) are the tiny guest's own;
//! - its own `rcS` (scripts/guest/winrs/rcS): reads Unattend.xml from the stick (or Azure's
//!   DVD), sets the computer name, starts the server on 5985 with the answer file's build
//!   account, and with Azure's `ovf-env.xml` reports Ready to the wireserver.
//!
//! The server binary: `$KILN_WINRS_SERVER` when set (the integration tests pass cargo's
//! `CARGO_BIN_EXE_kiln-winrs-server`), else `cargo build -p kiln-tests --bin kiln-winrs-server`
//! in this workspace. Its sources (tests/winrs_server.rs, tests/bin/kiln-winrs-server.rs,
//! agents/src, Cargo.lock and the two manifests) are part of the recipe hash.

use super::tiny::{self, Extras};
use super::util::{self, cmd, run, Progress};
use super::{BuildCtx, Recipe};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const RCS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/guest/winrs/rcS"
));

/// The label every consumer sees: this is not Windows.
pub const DESCRIPTION: &str =
    "kiln winrs test guest: a LINUX guest (busybox, the tiny guest) speaking WinRS on 5985 \
    (kiln-winrs-server, NTLM sealed) with a documented shim for kiln's Windows commands; \
    catalogued as osType Windows only so that kiln plans a Windows build against it. Not Windows.";

pub struct Winrs;

fn workspace() -> Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf())
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The server program to put in the guest.
fn server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_WINRS_SERVER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("$KILN_WINRS_SERVER={} is not a file", p.display());
        }
        return Ok(p);
    }
    let ws = workspace()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(cmd(
        cargo,
        &["build", "-q", "-p", "kiln-tests", "--bin", "kiln-winrs-server"],
    )
    .current_dir(&ws))
    .context("building kiln-winrs-server for the winrs guest (set $KILN_WINRS_SERVER to use a built one)")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    Ok(target.join("debug").join("kiln-winrs-server"))
}

impl Recipe for Winrs {
    fn hash_input(&self) -> Result<Vec<u8>> {
        let mut input = tiny::tiny_hash_input()?;
        input.extend_from_slice(b"\0recipe winrs\0");
        input.extend_from_slice(util::normalized_source(include_str!("winrs.rs")).as_bytes());
        input.extend_from_slice(b"\0file rcS\0");
        input.extend_from_slice(RCS.as_bytes());
        // The server by its sources (not its bytes: `cargo build` and `cargo test` link it with
        // different dependency features), so a cache hit needs no cargo build.
        let ws = workspace()?;
        let mut files = vec![
            ws.join("Cargo.lock"),
            ws.join("tests/Cargo.toml"),
            ws.join("agents/Cargo.toml"),
            ws.join("tests/winrs_server.rs"),
            ws.join("tests/winrs_wu.rs"),
            ws.join("tests/bin/kiln-winrs-server.rs"),
        ];
        rust_files(&ws.join("agents/src"), &mut files)?;
        files.sort();
        for f in files {
            let rel = f.strip_prefix(&ws).unwrap_or(&f).display().to_string();
            let body = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            input.extend_from_slice(format!("\0server-source {rel}\0").as_bytes());
            input.extend_from_slice(&body);
        }
        Ok(input)
    }

    fn build(&self, ctx: &BuildCtx, p: &mut Progress) -> Result<()> {
        let bin = server_binary()?;
        p.done(&format!("server {}", bin.display()));
        tiny::Tiny.build_with(
            ctx,
            p,
            &Extras {
                name: "winrs",
                title: "kiln winrs (Linux guest speaking WinRS)",
                hostname: "kiln-winrs",
                modules: &["xhci_pci", "usb_storage", "sd_mod"],
                files: vec![("etc/init.d/rcS", RCS, 0o755)],
                binaries: vec![(bin, "usr/bin/kiln-winrs-server")],
                meta: serde_json::json!({
                    "name": "winrs",
                    "description": DESCRIPTION,
                    "label": "Linux guest speaking WinRS (test double for Windows; not Windows)",
                    "osType": "Windows",
                    "actualOs": "Linux (busybox)",
                    "provisioning": ["unattend"],
                    "defaultAdminUser": null,
                    "buildUser": "packer (from Unattend.xml)",
                    "readyMarker": "KILN-WINRM-READY",
                    "winrm": {
                        "server": "kiln-winrs-server (tests/bin/kiln-winrs-server.rs)",
                        "port": 5985,
                        "auth": "NTLMv2, every body sealed",
                        "credentials": "the LocalAccount of the Unattend.xml on the removable provisioning media",
                        "shim": "tests/winrs_server.rs module docs: PowerShell payloads are POSIX sh; C:\\ is /var/lib/kiln-winrs/c",
                    },
                    "ssh": null,
                    "controllers": {
                        "disk": ["virtio-blk", "virtio-scsi", "ide", "ahci"],
                        "nic": ["virtio-net", "e1000", "e1000e"],
                        "provisioningMedia": ["usb-storage on qemu-xhci (removable)"]
                    },
                    "seed": {"labels": ["UNATTEND"], "filesystems": ["vfat"], "file": "Unattend.xml"},
                }),
            },
        )
    }
}
