//! The steps that need the build VM: start it, connect, customize, deprovision, shut down.

use super::context::{AccelChoice, BuildCx};
use super::events::{OutStream, SubState};
use super::runner::{Outcome, Step};
use super::steps::{LineSplitter, BUILD_USER};
use super::{sizes, BuildError};
use crate::template::model::{Customizer, FileCopy, ShellScript};
use crate::vm;
use async_trait::async_trait;
use kiln_agents::{Communicator, ConnectConfig, ExecOptions, Interrupt, InterruptFuture, SshCommunicator, Stream};
use kiln_images::catalog::HyperVGeneration;
use std::time::Duration;

/// AIB's default deprovisioning for Linux, `waagent -force -deprovision+user && export
/// HISTSIZE=0 && sync`, with waagent found as the seed's script finds it.
///
/// waagent's `+user` deletes the user named in `/var/lib/waagent/ovf-env.xml`, the one Azure
/// provisioned. A NoCloud-provisioned build VM has no ovf-env.xml, so waagent keeps the build
/// user; kiln then removes `packer` (and cloud-init's sudoers entry for it) itself, so the image
/// ends as it would on Azure: without the build user or its authorized key.
pub const DEFAULT_DEPROVISION: &str = r#"WAAGENT=/usr/sbin/waagent
[ -x "$WAAGENT" ] || WAAGENT=$(command -v waagent || true)
if [ -n "$WAAGENT" ]; then "$WAAGENT" -force -deprovision+user && export HISTSIZE=0 && sync
else echo 'kiln: waagent not found: skipping waagent -deprovision+user (the image has no Azure Linux agent)'; export HISTSIZE=0; fi
if id packer >/dev/null 2>&1; then
  echo 'kiln: removing the build user packer (waagent removes only the user named in ovf-env.xml)'
  if command -v userdel >/dev/null 2>&1; then userdel -f -r packer 2>/dev/null || userdel -f packer
  elif command -v deluser >/dev/null 2>&1; then deluser --remove-home packer
  else
    home=$(awk -F: '$1 == "packer" {print $6}' /etc/passwd)
    for f in /etc/passwd /etc/shadow /etc/group; do if [ -f "$f" ]; then sed -i '/^packer:/d' "$f"; fi; done
    if [ -n "$home" ] && [ "$home" != / ]; then rm -rf "$home"; fi
  fi
  rm -f /etc/sudoers.d/90-cloud-init-users
fi
sync"#;

/// Where AIB looks for a user's deprovisioning override on Linux.
pub const DEPROVISION_OVERRIDE: &str = "/tmp/DeprovisioningScript.sh";

/// Ends a wait for the guest early: QEMU exited, or the kernel panicked on the console.
fn interrupt_for(cx: &BuildCx) -> InterruptFuture<'static> {
    let Some(v) = cx.vm.as_ref() else { return Box::pin(std::future::pending()) };
    let exited = v.exited();
    let console = v.console_log_path().to_path_buf();
    Box::pin(async move {
        let panicked = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(Some(line)) = vm::Console::new(console.clone(), 0).panic_line() {
                    return line;
                }
            }
        };
        tokio::select! {
            st = exited => Interrupt::Aborted(format!("QEMU exited ({st})")),
            line = panicked => Interrupt::Aborted(format!("the guest kernel panicked: {line}")),
        }
    })
}

/// Waits until the VM has reset more than `before` times (a guest reboot).
async fn wait_reset_since(v: &vm::Vm, before: u64, timeout: Duration) -> bool {
    let mut rx = v.status_watch();
    let seen = tokio::time::timeout(timeout, rx.wait_for(|s| s.resets > before)).await.is_ok_and(|r| r.is_ok());
    seen
}

/// Boots the build VM on the overlay, with the seed attached.
pub struct StartVm;

#[async_trait]
impl Step for StartVm {
    fn name(&self) -> String {
        "Start VM".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let src = cx.source.clone().ok_or_else(|| BuildError::Vm("no source".into()))?;
        let gen2 = src.generation == HyperVGeneration::V2;
        let size_name = match cx.template.properties.vm_profile.vm_size.as_str() {
            "" if gen2 => crate::template::defaults::DEFAULT_VM_SIZE_GEN2.to_string(),
            "" => crate::template::defaults::DEFAULT_VM_SIZE_GEN1.to_string(),
            s => s.to_string(),
        };
        let shape = sizes::lookup(&size_name, &cx.options.vm_sizes).map_err(BuildError::Template)?;
        let request = match cx.options.accel {
            AccelChoice::Auto => vm::AccelRequest::Auto,
            AccelChoice::Kvm => vm::AccelRequest::Kvm,
            AccelChoice::Tcg => vm::AccelRequest::Tcg,
        };
        let (accel, warning) = vm::choose_accel(request).await.map_err(|e| BuildError::Vm(e.to_string()))?;
        if let Some(w) = warning {
            cx.events.warn(w.to_string());
        }
        if accel == vm::Accel::Tcg {
            cx.events.warn("the build VM runs under TCG (software emulation): expect it to be 10-50x slower than with KVM");
        }
        let firmware = if gen2 { vm::Firmware::uefi_default().map_err(|e| BuildError::Vm(e.to_string()))? } else { vm::Firmware::Bios };
        let overlay = cx.overlay.clone().ok_or_else(|| BuildError::Vm("no disk".into()))?;
        let spec = vm::VmSpec {
            name: format!("{}-{}", cx.template_name, cx.run_id),
            run_dir: cx.run_dir.clone(),
            disk: overlay,
            firmware,
            cpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            accel,
            seed_disk: cx.seed.clone(),
            extra_netdev_options: Vec::new(),
            smbios: Vec::new(),
            uuid: None,
            ssh_port: None,
            qemu: None,
            // QEMU dies with kiln; --keep-vm-on-error keeps kiln waiting instead.
            detachable: false,
        };
        cx.events.info(format!(
            "{size_name}: {} vCPU, {} MiB, {} ({}), accelerator {accel:?}",
            shape.vcpus,
            shape.memory_mib,
            if gen2 { "Gen2" } else { "Gen1" },
            if gen2 { "UEFI/q35" } else { "BIOS/pc" }
        ));
        let v = vm::Vm::start(spec).await.map_err(|e| BuildError::Vm(e.to_string()))?;
        cx.events.info(format!("QEMU pid {} , SSH forwarded on 127.0.0.1:{}", v.pid(), v.ssh_port()));
        cx.vm = Some(v);
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, outcome: Outcome) {
        let Some(v) = cx.vm.take() else { return };
        if outcome == Outcome::Failed && cx.options.keep_vm_on_error && v.exit_status().is_none() {
            // QEMU dies with kiln (so no VM is ever orphaned): kiln stays until the user is done.
            let kept = cx.run_dir.join("id_ed25519.kept");
            if let Some(k) = &cx.keys {
                let _ = kiln_agents::write_private_key(&k.private, &kept);
            }
            cx.events.warn(format!(
                "--keep-vm-on-error: the build VM is still running (QEMU pid {}). Reach it with\n    ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {BUILD_USER}@127.0.0.1\n  Press Ctrl-C here to stop it and clean up.",
                v.pid(),
                kept.display(),
                v.ssh_port()
            ));
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = v.exited() => {}
            }
            let _ = std::fs::remove_file(&kept);
        }
        // Whatever happened, QEMU does not outlive the build.
        let timeouts = vm::ShutdownTimeouts { guest: Duration::from_secs(1), acpi: Duration::from_secs(5), ..Default::default() };
        match v.shutdown_ladder(None, timeouts).await {
            Ok(r) if outcome != Outcome::Succeeded && r.rung != vm::ShutdownRung::AlreadyExited => cx.events.info(format!("build VM stopped: {}", r.rung)),
            Ok(_) => {}
            Err(e) => cx.events.warn(format!("stopping the build VM: {e}")),
        }
    }
}

/// Waits for SSH (20 minutes by default, as AIB), ending early if QEMU exits or the guest panics.
pub struct Connect;

#[async_trait]
impl Step for Connect {
    fn name(&self) -> String {
        "Connect (SSH)".into()
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let v = cx.vm.as_ref().ok_or_else(|| BuildError::Vm("no VM".into()))?;
        let keys = cx.keys.as_ref().ok_or_else(|| BuildError::Vm("no key".into()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], v.ssh_port()));
        let mut config = ConnectConfig::new(addr, BUILD_USER, keys.private.clone());
        config.timeout = cx.options.ssh_timeout;
        let started = v.started_at();
        let interrupt = interrupt_for(cx);
        let guest = SshCommunicator::connect(config, interrupt).await.map_err(|e| {
            let tail = cx.vm.as_ref().map(|v| v.console_tail(15)).unwrap_or_default();
            BuildError::Connect(format!("SSH to the build VM: {e}\n  last console lines:\n{tail}"))
        })?;
        let rep = guest.connect_report();
        // The banner is the guest's sshd answering; banner → authenticated is key exchange and
        // login, bounded by the guest's CPU (cargo xtask bench reads both: docs/bench.md).
        let banner = rep.banner.map(|b| format!("; banner after {:.3}s, key exchange + login {:.3}s", b.saturating_duration_since(started).as_secs_f64(), rep.authenticated.saturating_duration_since(b).as_secs_f64())).unwrap_or_default();
        cx.events.info(format!(
            "SSH ready {:.1}s after QEMU started ({} attempts{banner}; host key {} pinned)",
            rep.authenticated.saturating_duration_since(started).as_secs_f64(),
            rep.attempts,
            rep.host_key.as_ref().map(|h| h.0.clone()).unwrap_or_default()
        ));
        cx.guest = Some(Box::new(guest));
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        if let Some(g) = cx.guest.take() {
            let _ = g.close().await;
        }
    }
}

/// After a guest reboot (a RESET since the last one handled), waits for the guest and
/// reconnects. `lost`: the connection is known to be gone, so a reboot must follow.
async fn recover_after_reboot(cx: &mut BuildCx, step: &str, lost: bool) -> Result<bool, BuildError> {
    let v = cx.vm.as_ref().ok_or_else(|| BuildError::Vm("no VM".into()))?;
    let rebooted = if lost {
        wait_reset_since(v, cx.resets_seen, Duration::from_secs(60)).await
    } else {
        v.reboot_count() > cx.resets_seen
    };
    if !rebooted {
        if lost {
            return Err(BuildError::Step { step: step.into(), message: "the connection to the build VM was lost and the VM did not reboot".into() });
        }
        return Ok(false);
    }
    cx.resets_seen = v.reboot_count();
    cx.events.info("the guest rebooted; reconnecting");
    let interrupt = interrupt_for(cx);
    let guest = cx.guest.as_ref().ok_or_else(|| BuildError::Connect("not connected".into()))?;
    let rep = guest.reconnect(interrupt).await.map_err(|e| BuildError::Connect(format!("reconnecting after the reboot: {e}")))?;
    cx.events.info(format!("reconnected after {:.1}s", rep.wait().as_secs_f64()));
    Ok(true)
}

fn lost(e: &kiln_agents::CommError) -> bool {
    matches!(e, kiln_agents::CommError::ConnectionLost { .. })
}

/// Uploads `local` to `dest`, reconnecting once if the guest rebooted in between.
async fn upload(cx: &mut BuildCx, step: &str, data: &[u8], dest: &str, mode: u32) -> Result<kiln_agents::UploadOutcome, BuildError> {
    recover_after_reboot(cx, step, false).await?;
    for attempt in 0..2 {
        let guest = cx.guest.as_ref().ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let mut body = data;
        match guest.upload(&mut body, data.len() as u64, dest, mode).await {
            Ok(o) => return Ok(o),
            Err(e) if lost(&e) && attempt == 0 => {
                recover_after_reboot(cx, step, true).await?;
            }
            Err(e) => return Err(BuildError::Step { step: step.into(), message: e.to_string() }),
        }
    }
    Err(BuildError::Step { step: step.into(), message: format!("uploading {dest} failed twice") })
}

/// Printed on stderr by the runner before the script starts (and filtered out of the output):
/// tells a reboot *during* the script from a connection that died before it ran.
const STARTED_MARKER: &[u8] = b"__kiln_step_started__\n";

/// Runs `script` under `/bin/sh -e` (as root with `as_root`), streaming output. A reboot during
/// the script (AIB's only way to reboot Linux) counts as the step's success; the next step
/// reconnects. A connection lost before the script started (a reboot from the previous step
/// still in progress) reconnects and runs the script.
async fn run_script(cx: &mut BuildCx, step: &str, script: &str, as_root: bool) -> Result<(), BuildError> {
    let path = format!("/tmp/kiln-script-{}-{}.sh", cx.run_id, step.bytes().map(u32::from).sum::<u32>());
    let sudo = if as_root { "sudo -n " } else { "" };
    let cmd = format!("printf '__kiln_step_started__\\n' >&2; {sudo}/bin/sh -e {path}; rc=$?; rm -f {path}; exit $rc");
    for attempt in 0..2 {
        upload(cx, step, script.as_bytes(), &path, 0o755).await?;
        let events = cx.events.clone();
        let mut lines = LineSplitter::new(step.to_string());
        let mut started = false;
        let mut pending: Vec<u8> = Vec::new();
        let guest = cx.guest.as_ref().ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let result = {
            let mut sink = |s: Stream, d: &[u8]| {
                if s == Stream::Stderr && !started {
                    pending.extend_from_slice(d);
                    if let Some(pos) = pending.windows(STARTED_MARKER.len()).position(|w| w == STARTED_MARKER) {
                        started = true;
                        let mut rest = pending[..pos].to_vec();
                        rest.extend_from_slice(&pending[pos + STARTED_MARKER.len()..]);
                        pending.clear();
                        lines.feed(&events, OutStream::Stderr, &rest);
                    }
                    return;
                }
                lines.feed(&events, if s == Stream::Stdout { OutStream::Stdout } else { OutStream::Stderr }, d)
            };
            guest.exec(&cmd, ExecOptions::default(), &mut sink).await
        };
        if !pending.is_empty() {
            lines.feed(&events, OutStream::Stderr, &pending);
        }
        lines.finish(&events);
        match result {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => return Err(BuildError::Step { step: step.into(), message: format!("the script ended with {}", o.status) }),
            Err(e) if lost(&e) && started => {
                recover_after_reboot(cx, step, true).await?;
                return Ok(());
            }
            Err(e) if lost(&e) && attempt == 0 => {
                recover_after_reboot(cx, step, true).await?;
            }
            Err(e) => return Err(BuildError::Step { step: step.into(), message: e.to_string() }),
        }
    }
    Err(BuildError::Step { step: step.into(), message: "the connection was lost twice before the script could start".into() })
}

/// One customizer.
pub struct Customize {
    /// Its index in `customize`.
    pub index: usize,
    /// The customizer.
    pub customizer: Customizer,
}

#[async_trait]
impl Step for Customize {
    fn name(&self) -> String {
        let n = self.customizer.name();
        format!("Customize: {}{}", self.customizer.kind(), n.map(|n| format!(" \"{n}\"")).unwrap_or_else(|| format!(" #{}", self.index)))
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        match &self.customizer {
            Customizer::Shell(ShellScript { script_uri: Some(uri), .. }) => {
                let a = cx.artifacts.get(uri).cloned().ok_or_else(|| BuildError::Step { step: step.clone(), message: format!("{uri} was not fetched") })?;
                let text = std::fs::read_to_string(&a.path).map_err(BuildError::io(format!("reading {}", a.path.display())))?;
                run_script(cx, &step, &text, false).await
            }
            Customizer::Shell(ShellScript { inline, .. }) => {
                let text = inline.join("\n") + "\n";
                run_script(cx, &step, &text, false).await
            }
            Customizer::File(FileCopy { source_uri, destination, .. }) => {
                let a = cx.artifacts.get(source_uri).cloned().ok_or_else(|| BuildError::Step { step: step.clone(), message: format!("{source_uri} was not fetched") })?;
                let data = std::fs::read(&a.path).map_err(BuildError::io(format!("reading {}", a.path.display())))?;
                let up = upload(cx, &step, &data, destination, 0o644).await?;
                cx.events.info(format!("uploaded {} bytes to {destination} in {:.2}s", up.bytes, up.duration.as_secs_f64()));
                Ok(())
            }
            other => Err(BuildError::Step { step, message: format!("{} is not supported on Linux", other.kind()) }),
        }
    }
}

/// Generalizes: the user's `/tmp/DeprovisioningScript.sh` if present, else AIB's default
/// (`waagent -force -deprovision+user`), as root, in the same connection (deprovisioning deletes
/// host keys and the build user, so a new connection would fail).
pub struct Deprovision;

#[async_trait]
impl Step for Deprovision {
    fn name(&self) -> String {
        "Deprovision".into()
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        recover_after_reboot(cx, &step, false).await?;
        let guest = cx.guest.as_ref().ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let (o, _) = guest
            .exec_collect(&format!("test -f {DEPROVISION_OVERRIDE}"), ExecOptions::default())
            .await
            .map_err(|e| BuildError::Step { step: step.clone(), message: e.to_string() })?;
        let script = if o.status.success() {
            cx.events.info(format!("running the deprovisioning override {DEPROVISION_OVERRIDE}"));
            format!("/bin/sh {DEPROVISION_OVERRIDE}\n")
        } else {
            cx.events.info("running the default deprovisioning: waagent -force -deprovision+user && export HISTSIZE=0 && sync");
            format!("{DEFAULT_DEPROVISION}\n")
        };
        run_script(cx, &step, &script, true).await
    }
}

/// Shuts the VM down with the ladder (guest shutdown → ACPI → quit → kill) and flushes the disk.
pub struct Shutdown;

#[async_trait]
impl Step for Shutdown {
    fn name(&self) -> String {
        "Shutdown".into()
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let guest = cx.guest.take();
        let Some(v) = cx.vm.take() else { return Err(BuildError::Vm("no VM".into())) };
        let guest_cmd: Option<vm::GuestShutdown<'static>> = guest.map(|g| {
            let fut: vm::GuestShutdown<'static> = Box::pin(async move {
                let r = g
                    .exec_collect("sudo -n poweroff || sudo -n shutdown -h now", ExecOptions { timeout: Some(Duration::from_secs(10)), ..Default::default() })
                    .await;
                let _ = g.close().await;
                match r {
                    // A failed command (e.g. the build user was deprovisioned, so sudo refuses)
                    // certainly did not shut down: go straight to ACPI.
                    Ok((o, out)) if !o.status.success() => Err(format!("`poweroff` in the guest: {} {}", o.status, out.stderr_lossy().trim())),
                    Ok(_) | Err(kiln_agents::CommError::ConnectionLost { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            });
            fut
        });
        let timeouts = vm::ShutdownTimeouts { guest: Duration::from_secs(120), guest_error_grace: Duration::from_secs(2), acpi: Duration::from_secs(60), ..Default::default() };
        let report = v.shutdown_ladder(guest_cmd, timeouts).await.map_err(|e| BuildError::Vm(e.to_string()))?;
        let rung = report.rung;
        cx.vm = Some(v);
        cx.events.info(format!("build VM stopped: {rung}"));
        Ok(())
    }
}
