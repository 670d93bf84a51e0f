//! The steps that need the build VM: start it, connect, customize, deprovision, shut down.

use super::context::{AccelChoice, BuildCx, KeptVm};
use super::events::{Event, OutStream, SubState};
use super::runner::{FailurePolicy, Outcome, Step};
use super::steps::{LineSplitter, BUILD_USER};
use super::{sizes, BuildError};
use crate::template::model::{Customizer, FileCopy, ShellScript, Validator};
use crate::vm;
use async_trait::async_trait;
use kiln_agents::{
    Communicator, ConnectConfig, ExecOptions, Interrupt, InterruptFuture, SshCommunicator, Stream,
};
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

/// What waagent logs each time it failed to find the wireserver through DHCP (not on its first
/// look, which always says "WireServer endpoint is not found" before checking the route).
pub const WAAGENT_NO_ENDPOINT: &str = "WireProtocol endpoint is None";

/// With Azure provisioning, how long to wait after SSH connects for the Ready health report.
pub const AZURE_READY_WAIT: Duration = Duration::from_secs(120);

/// Where AIB looks for a user's deprovisioning override on Linux.
pub const DEPROVISION_OVERRIDE: &str = "/tmp/DeprovisioningScript.sh";

/// Ends a wait for the guest early: QEMU exited, or the kernel panicked on the console.
pub(crate) fn interrupt_for(cx: &BuildCx) -> InterruptFuture<'static> {
    let Some(v) = cx.vm.as_ref() else {
        return Box::pin(std::future::pending());
    };
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
    let seen = tokio::time::timeout(timeout, rx.wait_for(|s| s.resets > before))
        .await
        .is_ok_and(|r| r.is_ok());
    seen
}

/// The build VM's shape, as the dry-run prints it.
pub fn describe_vm(cx: &BuildCx, forward: &str, devices: Devices) -> serde_json::Value {
    let shape = |size: &str| {
        sizes::lookup(size, &cx.options.vm_sizes)
            .map(|s| format!("{size}: {} vCPU, {} MiB", s.vcpus, s.memory_mib))
            .unwrap_or_else(|e| e)
    };
    let (size, shape) = match cx.template.properties.vm_profile.vm_size.as_str() {
        "" => (
            "(default by the source's generation)".to_string(),
            format!(
                "Gen1 {}; Gen2 {}",
                shape(crate::template::defaults::DEFAULT_VM_SIZE_GEN1),
                shape(crate::template::defaults::DEFAULT_VM_SIZE_GEN2)
            ),
        ),
        s => (s.to_string(), shape(s)),
    };
    serde_json::json!({
        "vmSize": size,
        "shape": shape,
        "accelerator": format!("{:?}", cx.options.accel),
        "firmware": "BIOS/pc for Gen1 sources, UEFI/q35 for Gen2",
        "network": format!("QEMU user-mode network; {forward}"),
        "devices": devices.describe(),
    })
}

/// A failure policy in words.
pub fn describe_policy(p: FailurePolicy) -> &'static str {
    match p {
        FailurePolicy::Stop => "stop the build (cleanup)",
        FailurePolicy::Abort => "stop and keep the build VM (errorHandling abort)",
        FailurePolicy::Continue => {
            "record the failure and go on (continueDistributeOnFailure); the run ends Failed"
        }
    }
}

fn describe_shell(cx: &BuildCx, s: &ShellScript) -> serde_json::Value {
    let script = match &s.script_uri {
        Some(u) => {
            serde_json::json!({"scriptUri": u, "sha256": Some(s.sha256_checksum.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| "(none given: not verified)".into()), "fetched": "by the host before boot"})
        }
        None => serde_json::json!({"inline": s.inline.join("\n") + "\n"}),
    };
    serde_json::json!({
        "script": script,
        "command": format!("/bin/sh -e /tmp/kiln-script-{}-<n>.sh", cx.run_id),
        "runAs": BUILD_USER,
        "success": "exit status 0 (a reboot during the script counts as success; the next step reconnects)",
    })
}

fn describe_file(f: &FileCopy) -> serde_json::Value {
    serde_json::json!({
        "sourceUri": f.source_uri,
        "sha256": Some(f.sha256_checksum.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| "(none given: not verified)".into()),
        "destination": f.destination,
    })
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
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        describe_vm(
            cx,
            "127.0.0.1:<free port> → guest 22 (SSH)",
            Devices::linux(cx),
        )
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        start_vm(cx, Vec::new(), Devices::linux(cx)).await
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, outcome: Outcome) {
        stop_vm(cx, outcome).await
    }
}

/// Boots the build VM (the work of [`StartVm`]); `extra_netdev` adds user-network options (e.g.
/// a Windows build's WinRM `hostfwd`).
/// The build VM's device models: the guest OS's defaults, with the `--disk-bus` and
/// `--nic-model` overrides applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Devices {
    /// the OS disk's controller
    pub disk_bus: vm::DiskBus,
    /// the NIC
    pub nic_model: vm::NicModel,
    /// how the provisioning media (seed) is attached
    pub seed_attach: vm::SeedAttach,
    /// how the provisioning CD (Azure's ovf-env.xml) is attached
    pub cdrom_attach: vm::CdromAttach,
}

impl Devices {
    /// Linux: virtio everything (the seed a second virtio disk), unless overridden.
    pub fn linux(cx: &BuildCx) -> Devices {
        Devices {
            disk_bus: cx.options.disk_bus.unwrap_or_default(),
            nic_model: cx.options.nic_model.unwrap_or_default(),
            seed_attach: vm::SeedAttach::VirtioDisk,
            cdrom_attach: vm::CdromAttach::LinuxCloud,
        }
    }
    /// Windows: an AHCI disk and an e1000 NIC unless overridden (Azure's Windows images carry
    /// Hyper-V drivers, not virtio ones; AHCI and Intel e1000 drivers are inbox), and the
    /// unattend media as a removable USB stick (Windows Setup searches removable media for
    /// `Unattend.xml`), Azure's provisioning CD as an ATAPI DVD drive.
    pub fn windows(cx: &BuildCx) -> Devices {
        Devices {
            disk_bus: cx.options.disk_bus.unwrap_or(vm::DiskBus::Ahci),
            nic_model: cx.options.nic_model.unwrap_or(vm::NicModel::E1000),
            seed_attach: vm::SeedAttach::UsbRemovable,
            cdrom_attach: vm::CdromAttach::Atapi,
        }
    }
    /// For `--dry-run`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "diskBus": self.disk_bus.as_str(),
            "nicModel": self.nic_model.as_str(),
            "provisioningMedia": match self.seed_attach {
                vm::SeedAttach::VirtioDisk => "read-only virtio disk",
                vm::SeedAttach::UsbRemovable => "read-only removable USB stick (usb-storage,removable=on on qemu-xhci)",
            },
            "azureProvisioningCd": match self.cdrom_attach {
                vm::CdromAttach::LinuxCloud => "IDE CD-ROM on Gen1, read-only virtio disk on Gen2",
                vm::CdromAttach::Atapi => "ATAPI DVD drive (ide-cd) on both generations",
            },
        })
    }
}

pub(crate) async fn start_vm(
    cx: &mut BuildCx,
    extra_netdev: Vec<String>,
    devices: Devices,
) -> Result<(), BuildError> {
    {
        let src = cx
            .source
            .clone()
            .ok_or_else(|| BuildError::Vm("no source".into()))?;
        let gen2 = src.generation == HyperVGeneration::V2;
        let size_name = super::steps::vm_size_name(cx);
        let shape =
            sizes::lookup(&size_name, &cx.options.vm_sizes).map_err(BuildError::Template)?;
        let request = match cx.options.accel {
            AccelChoice::Auto => vm::AccelRequest::Auto,
            AccelChoice::Kvm => vm::AccelRequest::Kvm,
            AccelChoice::Tcg => vm::AccelRequest::Tcg,
        };
        let (accel, warning) = vm::choose_accel(request)
            .await
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        if let Some(w) = warning {
            cx.events.warn(w.to_string());
        }
        if accel == vm::Accel::Tcg {
            cx.events.warn("the build VM runs under TCG (software emulation): expect it to be 10-50x slower than with KVM");
        }
        let firmware = if gen2 {
            vm::Firmware::uefi_default().map_err(|e| BuildError::Vm(e.to_string()))?
        } else {
            vm::Firmware::Bios
        };
        let overlay = cx
            .overlay
            .clone()
            .ok_or_else(|| BuildError::Vm("no disk".into()))?;
        let (mut extra_netdev_options, mut smbios, mut uuid, mut mac, mut net_tap) =
            (extra_netdev, Vec::new(), None, None, None);
        if let Some(f) = &cx.fabric {
            // As on Azure: the chassis asset tag and system UUID agents check, the NIC's MAC
            // that IMDS reports, and the fabric's addresses routed to this build's fabric.
            let exe = std::env::current_exe().map_err(|e| {
                BuildError::Vm(format!(
                    "finding kiln's own executable for the fabric relay: {e}"
                ))
            })?;
            extra_netdev_options.extend(f.netdev_options(&exe));
            smbios.push(format!("type=3,asset={}", crate::fabric::AZURE_ASSET_TAG));
            uuid = Some(f.config().vm_id.clone());
            // Azure's DHCP (option 245, routes to the wireserver and IMDS) from the fabric.
            net_tap = Some(f.net_tap().clone());
            mac = Some(
                f.config()
                    .mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        }
        let spec = vm::VmSpec {
            name: format!("{}-{}", cx.template_name, cx.run_id),
            run_dir: cx.run_dir.clone(),
            disk: overlay,
            disk_bus: devices.disk_bus,
            nic_model: devices.nic_model,
            firmware,
            cpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            accel,
            seed_disk: cx.seed.clone(),
            seed_attach: devices.seed_attach,
            cdrom: cx.cdrom.clone(),
            cdrom_attach: devices.cdrom_attach,
            mac,
            extra_netdev_options,
            net_tap,
            smbios,
            uuid,
            ssh_port: None,
            qemu: None,
            // QEMU dies with kiln; --keep-vm-on-error keeps kiln waiting instead.
            detachable: false,
        };
        cx.events.info(format!(
            "{size_name}: {} vCPU, {} MiB, {} ({}), accelerator {accel:?}, disk {}, NIC {}",
            shape.vcpus,
            shape.memory_mib,
            if gen2 { "Gen2" } else { "Gen1" },
            if gen2 { "UEFI/q35" } else { "BIOS/pc" },
            devices.disk_bus.as_str(),
            devices.nic_model.as_str()
        ));
        let v = vm::Vm::start(spec)
            .await
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        if cx.windows.is_some() {
            // A Windows build reaches the guest over WinRM (its forward is logged by WinStartVm).
            cx.events.info(format!("QEMU pid {}", v.pid()));
        } else {
            cx.events.info(format!(
                "QEMU pid {} , SSH forwarded on 127.0.0.1:{}",
                v.pid(),
                v.ssh_port()
            ));
        }
        cx.vm = Some(v);
        Ok(())
    }
}

/// Stops the build VM, or keeps it (the cleanup of [`StartVm`]).
pub(crate) async fn stop_vm(cx: &mut BuildCx, outcome: Outcome) {
    {
        let Some(v) = cx.vm.take() else { return };
        let keep = match outcome {
            Outcome::Aborted => Some("errorHandling abort"),
            Outcome::Failed if cx.options.keep_vm_on_error => Some("--keep-vm-on-error"),
            _ => None,
        };
        if let (Some(reason), None) = (keep, v.exit_status()) {
            // QEMU dies with kiln (so no VM is ever orphaned): the run keeps it until canceled.
            if cx.windows.is_some() {
                crate::build::steps_windows::keep_vm(cx, v, reason);
                return;
            }
            let kept = cx.run_dir.join("id_ed25519.kept");
            if let Some(k) = &cx.keys {
                if let Err(e) = kiln_agents::write_private_key(&k.private, &kept) {
                    cx.events.warn(format!("writing {}: {e}", kept.display()));
                }
            }
            cx.events.emit(Event::VmKept {
                reason: reason.into(),
                pid: v.pid(),
                ssh_port: v.ssh_port(),
                user: BUILD_USER.into(),
                key_path: kept.display().to_string(),
                run_dir: cx.run_dir.display().to_string(),
            });
            cx.events.warn(format!(
                "{reason}: the build VM is still running (QEMU pid {}). Reach it with\n    ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {BUILD_USER}@127.0.0.1\n  Cancel the run (Ctrl-C here) to stop it. The staging directory stays for inspection; delete it when done:\n    rm -rf {}",
                v.pid(),
                kept.display(),
                v.ssh_port(),
                cx.run_dir.display()
            ));
            cx.kept_vm = Some(KeptVm {
                vm: v,
                key_path: kept,
            });
            return;
        }
        // Whatever happened, QEMU does not outlive the build.
        let timeouts = vm::ShutdownTimeouts {
            guest: Duration::from_secs(1),
            acpi: Duration::from_secs(5),
            ..Default::default()
        };
        match v.shutdown_ladder(None, timeouts).await {
            Ok(r) if outcome != Outcome::Succeeded && r.rung != vm::ShutdownRung::AlreadyExited => {
                cx.events.info(format!("build VM stopped: {}", r.rung))
            }
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
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({
            "transport": "SSH",
            "address": "127.0.0.1:<the VM's forwarded port> → guest port 22",
            "user": BUILD_USER,
            "auth": "publickey (the build's ed25519 key); host key pinned on first connection",
            "timeoutSeconds": cx.options.ssh_timeout.as_secs(),
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let v = cx
            .vm
            .as_ref()
            .ok_or_else(|| BuildError::Vm("no VM".into()))?;
        let keys = cx
            .keys
            .as_ref()
            .ok_or_else(|| BuildError::Vm("no key".into()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], v.ssh_port()));
        let mut config = ConnectConfig::new(addr, BUILD_USER, keys.private.clone());
        config.timeout = cx.options.ssh_timeout;
        let started = v.started_at();
        let vm_name = format!("{}-{}", cx.template_name, cx.run_id);
        let health = cx.fabric.as_ref().map(|f| f.health());
        let base = interrupt_for(cx);
        let interrupt: InterruptFuture<'static> = match health.clone() {
            None => base,
            Some(rx) => {
                // Azure agents install the key late (waagent only after it has talked to the
                // fabric): keep retrying a rejected key for longer; a ProvisioningFailed health
                // report ends the wait at once instead.
                config.auth_grace = config.auth_grace.max(Duration::from_secs(300));
                let console = v.console_log_path().to_path_buf();
                let events = cx.events.clone();
                let name = vm_name.clone();
                Box::pin(async move {
                    // waagent that looks for the wireserver through DHCP (option 245 / a host
                    // route) never finds it behind QEMU's DHCP: say so instead of a silent wait.
                    let hint = async {
                        loop {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            if vm::Console::new(console.clone(), 0)
                                .contains(WAAGENT_NO_ENDPOINT)
                                .unwrap_or(false)
                            {
                                events.warn(format!(
                                    "build VM {name}: the Azure Linux agent cannot find the wireserver (\"{WAAGENT_NO_ENDPOINT}\" on the console): it looks for it through DHCP option 245 or a host route to 168.63.129.16, which kiln's DHCP gives (DHCP events in events.jsonl): check that the image's network uses DHCP on its first NIC and keeps the lease's routes; see docs/provisioning.md (waagent-provisioned images)"
                                ));
                                std::future::pending::<()>().await;
                            }
                        }
                    };
                    let failed = provisioning_failure(rx);
                    tokio::select! {
                        i = base => i,
                        why = failed => Interrupt::Aborted(format!("Azure provisioning failed: {why}")),
                        _ = hint => Interrupt::Aborted(String::new()),
                    }
                })
            }
        };
        let connected = SshCommunicator::connect(config, interrupt).await;
        let failure = health
            .as_ref()
            .and_then(|rx| rx.borrow().clone())
            .filter(|h| h.health.is_failure());
        if let Some(h) = failure {
            return Err(BuildError::Connect(format!(
                "build VM {vm_name}: Azure provisioning failed: {} reported {} {:.1}s after QEMU started (health report NotReady/ProvisioningFailed; see console.log and customization.log in {})",
                h.agent,
                h.health,
                h.at.saturating_duration_since(started).as_secs_f64(),
                cx.run_dir.display()
            )));
        }
        let guest = connected.map_err(|e| {
            let tail = cx
                .vm
                .as_ref()
                .map(|v| v.console_tail(15))
                .unwrap_or_default();
            BuildError::Connect(format!(
                "SSH to the build VM {vm_name}: {e}\n  last console lines:\n{tail}"
            ))
        })?;
        let rep = guest.connect_report();
        let connected_s = rep
            .authenticated
            .saturating_duration_since(started)
            .as_secs_f64();
        // The banner is the guest's sshd answering; banner → authenticated is key exchange and
        // login, bounded by the guest's CPU (cargo xtask bench reads both: docs/bench.md).
        let banner = rep
            .banner
            .map(|b| {
                format!(
                    "; banner after {:.3}s, key exchange + login {:.3}s",
                    b.saturating_duration_since(started).as_secs_f64(),
                    rep.authenticated.saturating_duration_since(b).as_secs_f64()
                )
            })
            .unwrap_or_default();
        cx.events.info(format!(
            "SSH ready {connected_s:.1}s after QEMU started ({} attempts{banner}; host key {} pinned)",
            rep.attempts,
            rep.host_key.as_ref().map(|h| h.0.clone()).unwrap_or_default()
        ));
        cx.guest = Some(Box::new(guest));
        await_provisioned(cx, started, connected_s, &vm_name).await
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        if let Some(g) = cx.guest.take() {
            let _ = g.close().await;
        }
    }
}

/// Resolves when the fabric receives a ProvisioningFailed (NotReady) health report, with
/// "<agent> reported <health>"; never otherwise.
pub(crate) async fn provisioning_failure(
    mut rx: tokio::sync::watch::Receiver<Option<crate::fabric::HealthReport>>,
) -> String {
    loop {
        if let Some(h) = rx.borrow_and_update().clone() {
            if h.health.is_failure() {
                return format!("{} reported {}", h.agent, h.health);
            }
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Records how the build VM was provisioned (the `provisioned` event); with Azure provisioning,
/// once the communicator is connected, waits up to [`AZURE_READY_WAIT`] for the agent's Ready
/// health report (a ProvisioningFailed one fails the build). `connected_s`: seconds from QEMU's
/// start to the connection.
pub(crate) async fn await_provisioned(
    cx: &mut BuildCx,
    started: std::time::Instant,
    connected_s: f64,
    vm_name: &str,
) -> Result<(), BuildError> {
    let method = cx
        .provisioning
        .map(|p| p.as_str())
        .unwrap_or("none")
        .to_string();
    let Some(mut rx) = cx.fabric.as_ref().map(|f| f.health()) else {
        cx.events.emit(Event::Provisioned {
            method,
            agent: None,
            ready_seconds: None,
            connected_seconds: connected_s,
            health: None,
        });
        return Ok(());
    };
    // The Ready health report is the agent's own "provisioning finished". cloud-init sends
    // it before SSH works; waagent after creating the user, possibly just after SSH works.
    let ready = tokio::time::timeout(
        AZURE_READY_WAIT,
        rx.wait_for(|h| {
            h.as_ref()
                .is_some_and(|h| h.health.is_ready() || h.health.is_failure())
        }),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let last = rx.borrow().clone();
    match (ready, &last) {
        (_, Some(h)) if h.health.is_failure() => {
            return Err(BuildError::Connect(format!(
                "build VM {vm_name}: Azure provisioning failed: {} reported {}",
                h.agent, h.health
            )));
        }
        (true, Some(h)) => {
            cx.events.emit(Event::Provisioned {
                method,
                agent: Some(h.agent.clone()),
                ready_seconds: Some(h.at.saturating_duration_since(started).as_secs_f64()),
                connected_seconds: connected_s,
                health: Some(h.health.to_string()),
            });
        }
        _ => {
            cx.events.warn(format!(
                "build VM {vm_name}: connected, but no agent reported Ready to the fabric within {}s of connecting{}; continuing",
                AZURE_READY_WAIT.as_secs(),
                last.as_ref().map(|h| format!(" (last health report: {} from {})", h.health, h.agent)).unwrap_or_else(|| " (no health report at all)".into())
            ));
            cx.events.emit(Event::Provisioned {
                method,
                agent: None,
                ready_seconds: None,
                connected_seconds: connected_s,
                health: last.map(|h| h.health.to_string()),
            });
        }
    }
    Ok(())
}

/// After a guest reboot (a RESET since the last one handled), waits for the guest and
/// reconnects. `lost`: the connection is known to be gone, so a reboot must follow.
pub(crate) async fn recover_after_reboot(
    cx: &mut BuildCx,
    step: &str,
    lost: bool,
) -> Result<bool, BuildError> {
    let v = cx
        .vm
        .as_ref()
        .ok_or_else(|| BuildError::Vm("no VM".into()))?;
    let rebooted = if lost {
        wait_reset_since(v, cx.resets_seen, Duration::from_secs(60)).await
    } else {
        v.reboot_count() > cx.resets_seen
    };
    if !rebooted {
        if lost {
            return Err(BuildError::Step {
                step: step.into(),
                message: "the connection to the build VM was lost and the VM did not reboot".into(),
            });
        }
        return Ok(false);
    }
    cx.resets_seen = v.reboot_count();
    cx.events.info("the guest rebooted; reconnecting");
    let interrupt = interrupt_for(cx);
    let guest = cx
        .guest
        .as_ref()
        .ok_or_else(|| BuildError::Connect("not connected".into()))?;
    let rep = guest
        .reconnect(interrupt)
        .await
        .map_err(|e| BuildError::Connect(format!("reconnecting after the reboot: {e}")))?;
    cx.events.info(format!(
        "reconnected after {:.1}s",
        rep.wait().as_secs_f64()
    ));
    Ok(true)
}

fn lost(e: &kiln_agents::CommError) -> bool {
    matches!(e, kiln_agents::CommError::ConnectionLost { .. })
}

/// Uploads `local` to `dest`, reconnecting once if the guest rebooted in between.
async fn upload(
    cx: &mut BuildCx,
    step: &str,
    data: &[u8],
    dest: &str,
    mode: u32,
) -> Result<kiln_agents::UploadOutcome, BuildError> {
    recover_after_reboot(cx, step, false).await?;
    for attempt in 0..2 {
        let guest = cx
            .guest
            .as_ref()
            .ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let mut body = data;
        match guest.upload(&mut body, data.len() as u64, dest, mode).await {
            Ok(o) => return Ok(o),
            Err(e) if lost(&e) && attempt == 0 => {
                recover_after_reboot(cx, step, true).await?;
            }
            Err(e) => {
                return Err(BuildError::Step {
                    step: step.into(),
                    message: e.to_string(),
                })
            }
        }
    }
    Err(BuildError::Step {
        step: step.into(),
        message: format!("uploading {dest} failed twice"),
    })
}

/// Printed on stderr by the runner before the script starts (and filtered out of the output):
/// tells a reboot *during* the script from a connection that died before it ran.
const STARTED_MARKER: &[u8] = b"__kiln_step_started__\n";

/// Runs `script` under `/bin/sh -e` (as root with `as_root`), streaming output. A reboot during
/// the script (AIB's only way to reboot Linux) counts as the step's success; the next step
/// reconnects. A connection lost before the script started (a reboot from the previous step
/// still in progress) reconnects and runs the script.
async fn run_script(
    cx: &mut BuildCx,
    step: &str,
    script: &str,
    as_root: bool,
) -> Result<(), BuildError> {
    let path = format!(
        "/tmp/kiln-script-{}-{}.sh",
        cx.run_id,
        step.bytes().map(u32::from).sum::<u32>()
    );
    let sudo = if as_root { "sudo -n " } else { "" };
    let cmd = format!("printf '__kiln_step_started__\\n' >&2; {sudo}/bin/sh -e {path}; rc=$?; rm -f {path}; exit $rc");
    for attempt in 0..2 {
        upload(cx, step, script.as_bytes(), &path, 0o755).await?;
        let events = cx.events.clone();
        let mut lines = LineSplitter::new(step.to_string());
        let mut started = false;
        let mut pending: Vec<u8> = Vec::new();
        let guest = cx
            .guest
            .as_ref()
            .ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let result = {
            let mut sink = |s: Stream, d: &[u8]| {
                if s == Stream::Stderr && !started {
                    pending.extend_from_slice(d);
                    if let Some(pos) = pending
                        .windows(STARTED_MARKER.len())
                        .position(|w| w == STARTED_MARKER)
                    {
                        started = true;
                        let mut rest = pending[..pos].to_vec();
                        rest.extend_from_slice(&pending[pos + STARTED_MARKER.len()..]);
                        pending.clear();
                        lines.feed(&events, OutStream::Stderr, &rest);
                    }
                    return;
                }
                lines.feed(
                    &events,
                    if s == Stream::Stdout {
                        OutStream::Stdout
                    } else {
                        OutStream::Stderr
                    },
                    d,
                )
            };
            guest.exec(&cmd, ExecOptions::default(), &mut sink).await
        };
        if !pending.is_empty() {
            lines.feed(&events, OutStream::Stderr, &pending);
        }
        lines.finish(&events);
        match result {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                return Err(BuildError::Step {
                    step: step.into(),
                    message: format!("the script ended with {}", o.status),
                })
            }
            Err(e) if lost(&e) && started => {
                recover_after_reboot(cx, step, true).await?;
                return Ok(());
            }
            Err(e) if lost(&e) && attempt == 0 => {
                recover_after_reboot(cx, step, true).await?;
            }
            Err(e) => {
                return Err(BuildError::Step {
                    step: step.into(),
                    message: e.to_string(),
                })
            }
        }
    }
    Err(BuildError::Step {
        step: step.into(),
        message: "the connection was lost twice before the script could start".into(),
    })
}

/// One customizer.
pub struct Customize {
    /// Its index in `customize`.
    pub index: usize,
    /// The customizer.
    pub customizer: Customizer,
    /// `errorHandling.onCustomizerError` is `abort`.
    pub abort_on_error: bool,
}

#[async_trait]
impl Step for Customize {
    fn name(&self) -> String {
        let n = self.customizer.name();
        format!(
            "Customize: {}{}",
            self.customizer.kind(),
            n.map(|n| format!(" \"{n}\""))
                .unwrap_or_else(|| format!(" #{}", self.index))
        )
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let mut d = match &self.customizer {
            Customizer::Shell(s) => describe_shell(cx, s),
            Customizer::File(f) => describe_file(f),
            other => {
                serde_json::json!({"unsupported": format!("{} needs a Windows build", other.kind())})
            }
        };
        d["onFailure"] = serde_json::json!(describe_policy(self.failure_policy()));
        d
    }
    fn failure_policy(&self) -> FailurePolicy {
        if self.abort_on_error {
            FailurePolicy::Abort
        } else {
            FailurePolicy::Stop
        }
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        match &self.customizer {
            Customizer::Shell(s) => run_shell(cx, &step, s).await,
            Customizer::File(f) => run_file(cx, &step, f).await,
            other => Err(BuildError::Step {
                step,
                message: format!("{} is not supported on Linux", other.kind()),
            }),
        }
    }
}

/// A Shell customizer or validator: its inline lines or its fetched `scriptUri`, as the build user.
async fn run_shell(cx: &mut BuildCx, step: &str, s: &ShellScript) -> Result<(), BuildError> {
    match s {
        ShellScript {
            script_uri: Some(uri),
            ..
        } => {
            let a = cx
                .artifacts
                .get(uri)
                .cloned()
                .ok_or_else(|| BuildError::Step {
                    step: step.into(),
                    message: format!("{uri} was not fetched"),
                })?;
            let text = std::fs::read_to_string(&a.path)
                .map_err(BuildError::io(format!("reading {}", a.path.display())))?;
            run_script(cx, step, &text, false).await
        }
        ShellScript { inline, .. } => {
            let text = inline.join("\n") + "\n";
            run_script(cx, step, &text, false).await
        }
    }
}

/// A File customizer or validator: the fetched `sourceUri` uploaded to `destination`.
async fn run_file(cx: &mut BuildCx, step: &str, f: &FileCopy) -> Result<(), BuildError> {
    let FileCopy {
        source_uri,
        destination,
        ..
    } = f;
    let a = cx
        .artifacts
        .get(source_uri)
        .cloned()
        .ok_or_else(|| BuildError::Step {
            step: step.into(),
            message: format!("{source_uri} was not fetched"),
        })?;
    let data =
        std::fs::read(&a.path).map_err(BuildError::io(format!("reading {}", a.path.display())))?;
    let up = upload(cx, step, &data, destination, 0o644).await?;
    cx.events.info(format!(
        "uploaded {} bytes to {destination} in {:.2}s",
        up.bytes,
        up.duration.as_secs_f64()
    ));
    Ok(())
}

/// One in-VM validation (`validate.inVMValidations[index]`), run in the build VM after the
/// customizers and before generalization, as AIB does.
pub struct Validate {
    /// Its index in `inVMValidations`.
    pub index: usize,
    /// The validator.
    pub validator: Validator,
    /// `validate.continueDistributeOnFailure`: a failure is recorded and the build goes on.
    pub continue_on_failure: bool,
    /// `errorHandling.onValidationError` is `abort`.
    pub abort_on_error: bool,
}

#[async_trait]
impl Step for Validate {
    fn name(&self) -> String {
        let (kind, n) = match &self.validator {
            Validator::Shell(s) => ("Shell", s.name.clone()),
            Validator::PowerShell(p) => ("PowerShell", p.name.clone()),
            Validator::File(f) => ("File", f.name.clone()),
        };
        format!(
            "Validate: {kind}{}",
            n.filter(|n| !n.is_empty())
                .map(|n| format!(" \"{n}\""))
                .unwrap_or_else(|| format!(" #{}", self.index))
        )
    }
    fn phase(&self) -> SubState {
        SubState::Validating
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let mut d = match &self.validator {
            Validator::Shell(s) => describe_shell(cx, s),
            Validator::File(f) => describe_file(f),
            Validator::PowerShell(_) => {
                serde_json::json!({"unsupported": "PowerShell validations need a Windows build"})
            }
        };
        d["onFailure"] = serde_json::json!(describe_policy(self.failure_policy()));
        d
    }
    fn failure_policy(&self) -> FailurePolicy {
        if self.continue_on_failure {
            FailurePolicy::Continue
        } else if self.abort_on_error {
            FailurePolicy::Abort
        } else {
            FailurePolicy::Stop
        }
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        let r = match &self.validator {
            Validator::Shell(s) => run_shell(cx, &step, s).await,
            Validator::File(f) => run_file(cx, &step, f).await,
            Validator::PowerShell(_) => Err(BuildError::Step {
                step: step.clone(),
                message: "PowerShell validations need a Windows build VM".into(),
            }),
        };
        r.map_err(|e| match e {
            BuildError::Step { step, message } => BuildError::Validation { step, message },
            other => other,
        })
    }
}

/// Generalizes: the user's `/tmp/DeprovisioningScript.sh` if present, else AIB's default
/// (`waagent -force -deprovision+user`), as root, in the same connection (deprovisioning deletes
/// host keys and the build user, so a new connection would fail).
pub struct Deprovision {
    /// The sub-state it reports: Customizing, or Validating when validations ran before it
    /// (runSubState never goes back).
    pub phase: SubState,
}

#[async_trait]
impl Step for Deprovision {
    fn name(&self) -> String {
        "Deprovision".into()
    }
    fn phase(&self) -> SubState {
        self.phase
    }
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({
            "runAs": "root (sudo -n), in the existing connection",
            "override": format!("{DEPROVISION_OVERRIDE} (run with /bin/sh instead of the default when it exists in the guest)"),
            "script": DEFAULT_DEPROVISION,
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        recover_after_reboot(cx, &step, false).await?;
        let guest = cx
            .guest
            .as_ref()
            .ok_or_else(|| BuildError::Connect("not connected".into()))?;
        let (o, _) = guest
            .exec_collect(
                &format!("test -f {DEPROVISION_OVERRIDE}"),
                ExecOptions::default(),
            )
            .await
            .map_err(|e| BuildError::Step {
                step: step.clone(),
                message: e.to_string(),
            })?;
        let script = if o.status.success() {
            cx.events.info(format!(
                "running the deprovisioning override {DEPROVISION_OVERRIDE}"
            ));
            format!("/bin/sh {DEPROVISION_OVERRIDE}\n")
        } else {
            cx.events.info("running the default deprovisioning: waagent -force -deprovision+user && export HISTSIZE=0 && sync");
            format!("{DEFAULT_DEPROVISION}\n")
        };
        run_script(cx, &step, &script, true).await
    }
}

/// Shuts the VM down with the ladder (guest shutdown → ACPI → quit → kill) and flushes the disk.
pub struct Shutdown {
    /// The sub-state it reports (as for [`Deprovision`]).
    pub phase: SubState,
}

#[async_trait]
impl Step for Shutdown {
    fn name(&self) -> String {
        "Shutdown".into()
    }
    fn phase(&self) -> SubState {
        self.phase
    }
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({"ladder": "guest command (`sudo -n poweroff`, 120 s) → ACPI powerdown (60 s) → QMP quit → kill"})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let guest = cx.guest.take();
        let Some(v) = cx.vm.take() else {
            return Err(BuildError::Vm("no VM".into()));
        };
        let guest_cmd: Option<vm::GuestShutdown<'static>> = guest.map(|g| {
            let fut: vm::GuestShutdown<'static> = Box::pin(async move {
                let r = g
                    .exec_collect(
                        "sudo -n poweroff || sudo -n shutdown -h now",
                        ExecOptions {
                            timeout: Some(Duration::from_secs(10)),
                            ..Default::default()
                        },
                    )
                    .await;
                let _ = g.close().await;
                match r {
                    // A failed command (e.g. the build user was deprovisioned, so sudo refuses)
                    // certainly did not shut down: go straight to ACPI.
                    Ok((o, out)) if !o.status.success() => Err(format!(
                        "`poweroff` in the guest: {} {}",
                        o.status,
                        out.stderr_lossy().trim()
                    )),
                    Ok(_) | Err(kiln_agents::CommError::ConnectionLost { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            });
            fut
        });
        let timeouts = vm::ShutdownTimeouts {
            guest: Duration::from_secs(120),
            guest_error_grace: Duration::from_secs(2),
            acpi: Duration::from_secs(60),
            ..Default::default()
        };
        let report = v
            .shutdown_ladder(guest_cmd, timeouts)
            .await
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        let rung = report.rung;
        cx.vm = Some(v);
        cx.events.info(format!("build VM stopped: {rung}"));
        Ok(())
    }
}
