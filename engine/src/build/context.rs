//! The typed build context every step reads and writes: no string-keyed state bag.

use super::events::{Reporter, SubState};
use super::runner::Outcome;
use super::sizes::VmShape;
use crate::template::{ApiVersion, ImageTemplate};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Which accelerator the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when it really runs a guest, else TCG with a loud warning.
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG (software emulation).
    Tcg,
}

/// How the build VM gets its build user and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// A cloud-init NoCloud seed (vfat, label `cidata`).
    NoCloud,
    /// As on Azure: `ovf-env.xml` on a CD-ROM plus the emulated fabric (wireserver, IMDS),
    /// SMBIOS asset tag and system UUID.
    Azure,
    /// Windows: `Unattend.xml` on a removable USB stick, read by Windows Setup.
    Unattend,
    /// Nothing: the image must accept the build's key by itself.
    None,
}

impl Provisioning {
    /// `nocloud`, `azure`, `unattend`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provisioning::NoCloud => "nocloud",
            Provisioning::Azure => "azure",
            Provisioning::Unattend => "unattend",
            Provisioning::None => "none",
        }
    }
    /// Parses `nocloud`, `azure`, `unattend`, `none`.
    pub fn parse(s: &str) -> Option<Provisioning> {
        match s {
            "nocloud" => Some(Provisioning::NoCloud),
            "azure" => Some(Provisioning::Azure),
            "unattend" => Some(Provisioning::Unattend),
            "none" => Some(Provisioning::None),
            _ => None,
        }
    }
}

/// Options of one build (from the CLI).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// kiln's state directory.
    pub kiln_home: PathBuf,
    /// The resource group the template lives in (names the staging directory).
    pub resource_group: String,
    /// The subscription for ARM-shaped IDs.
    pub subscription_id: String,
    /// The accelerator.
    pub accel: AccelChoice,
    /// Keep the VM running after a failure and say how to reach it.
    pub keep_vm_on_error: bool,
    /// How long to wait for SSH (AIB: 20 minutes).
    pub ssh_timeout: Duration,
    /// Extra VM sizes.
    pub vm_sizes: BTreeMap<String, VmShape>,
    /// Overrides the template's buildTimeoutInMinutes (tests), in seconds.
    pub timeout_override: Option<Duration>,
    /// The run's id (the state store allocates it; default: a fresh one).
    pub run_id: Option<String>,
    /// The run's directory (a template's staging directory holds its runs; default:
    /// `KILN_HOME/staging/IT_<rg>_<template>_<run id>`).
    pub run_dir: Option<PathBuf>,
    /// `--provisioning`: overrides the catalog image's preferred method.
    pub provisioning: Option<Provisioning>,
    /// `--identity-token-command`: argv of a program whose stdout IMDS serves as the managed
    /// identity token (Azure provisioning only).
    pub identity_token_command: Option<Vec<String>>,
    /// `--disk-bus`: the OS disk's controller (default: virtio for Linux, AHCI for Windows).
    pub disk_bus: Option<crate::vm::DiskBus>,
    /// `--nic-model`: the NIC's model (default: virtio-net-pci for Linux, e1000 for Windows).
    pub nic_model: Option<crate::vm::NicModel>,
}

/// A resolved source image.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    /// The disk to put the overlay on (never modified).
    pub disk: PathBuf,
    /// Its format for qemu.
    pub format: kiln_images::DiskFormat,
    /// V1 (BIOS) or V2 (UEFI).
    pub generation: kiln_images::catalog::HyperVGeneration,
    /// `exactVersion` to record.
    pub exact_version: Option<String>,
    /// The admin user the image expects (the build user is `packer` regardless).
    pub virtual_size: u64,
    /// The provisioning methods the catalog image supports, preferred first.
    pub provisioning: Vec<kiln_images::catalog::ProvisioningMethod>,
    /// A stored (managed or gallery) image's shared lease, held while the build lives so that
    /// `kiln image delete` / `sig image-version delete` refuse to remove it (`store::lease`).
    pub lease: Option<std::sync::Arc<std::fs::File>>,
}

/// A customizer artifact fetched on the host.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Local path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// An exported VHD.
#[derive(Debug, Clone)]
pub struct ExportedVhd {
    /// The distributor's runOutputName.
    pub run_output_name: String,
    /// Where it is.
    pub path: PathBuf,
}

/// Everything the steps share.
pub struct BuildCx {
    /// The template, typed and defaulted.
    pub template: ImageTemplate,
    /// Its API version.
    pub api_version: ApiVersion,
    /// The template's name.
    pub template_name: String,
    /// The directory relative URIs resolve against.
    pub template_dir: PathBuf,
    /// Options.
    pub options: BuildOptions,
    /// The run's id.
    pub run_id: String,
    /// The run's directory (AIB's staging resource group).
    pub run_dir: PathBuf,
    /// Events out.
    pub events: Reporter,
    /// The whole build's deadline.
    pub deadline: Instant,
    /// The deadline in minutes, for messages.
    pub timeout_minutes: u64,
    /// AIB's current runSubState.
    pub sub_state: SubState,
    /// The step running now.
    pub current_step: String,
    /// How the run ended (set before cleanups run).
    pub outcome: Option<Outcome>,
    /// The source, once resolved.
    pub source: Option<ResolvedSource>,
    /// The overlay the VM boots from.
    pub overlay: Option<PathBuf>,
    /// Artifacts by URI.
    pub artifacts: BTreeMap<String, Artifact>,
    /// The ephemeral key pair.
    pub keys: Option<kiln_agents::KeyPair>,
    /// The provisioning method chosen.
    pub provisioning: Option<Provisioning>,
    /// The provisioning seed image (NoCloud), attached as a disk.
    pub seed: Option<PathBuf>,
    /// The provisioning CD (Azure's ovf-env.xml).
    pub cdrom: Option<PathBuf>,
    /// The emulated Azure fabric of this build.
    pub fabric: Option<crate::fabric::Fabric>,
    /// A Windows build's file endpoint (File customizers are pulled from it by the guest).
    pub files: Option<crate::fabric::files::FileServer>,
    /// The build VM.
    pub vm: Option<crate::vm::Vm>,
    /// The guest connection.
    pub guest: Option<Box<dyn kiln_agents::Communicator>>,
    /// Guest reboots (QMP RESET events) already handled by reconnecting.
    pub resets_seen: u64,
    /// Exported VHDs.
    pub exports: Vec<ExportedVhd>,
    /// runOutputs recorded.
    pub run_outputs: Vec<serde_json::Value>,
    /// Distributors that failed while others succeeded (the run is then PartiallySucceeded).
    pub partial_failures: Vec<String>,
    /// The build VM kept after a failure (`errorHandling: abort`, `--keep-vm-on-error`); the
    /// build stops it when the run is canceled or the VM exits.
    pub kept_vm: Option<KeptVm>,
    /// A Windows build's password, computer name and WinRM port (set by its provisioning steps).
    pub windows: Option<super::steps_windows::WindowsState>,
}

impl BuildCx {
    /// The context at the start of a run of `req`: nothing resolved, booted or recorded yet.
    pub fn new(
        req: super::BuildRequest,
        run_id: String,
        run_dir: PathBuf,
        events: Reporter,
        deadline: Instant,
        timeout_minutes: u64,
    ) -> BuildCx {
        BuildCx {
            template: req.template,
            api_version: req.api_version,
            template_name: req.name,
            template_dir: req.template_dir,
            options: req.options,
            run_id,
            run_dir,
            events,
            deadline,
            timeout_minutes,
            sub_state: SubState::Queued,
            current_step: String::new(),
            outcome: None,
            source: None,
            overlay: None,
            artifacts: Default::default(),
            keys: None,
            provisioning: None,
            seed: None,
            cdrom: None,
            fabric: None,
            files: None,
            vm: None,
            guest: None,
            resets_seen: 0,
            exports: Vec::new(),
            run_outputs: Vec::new(),
            kept_vm: None,
            partial_failures: Vec::new(),
            windows: None,
        }
    }
}

/// A build VM kept running after a failure, for debugging.
pub struct KeptVm {
    /// The VM.
    pub vm: crate::vm::Vm,
    /// A copy of the build's private key that reaches it (removed when the VM stops).
    pub key_path: PathBuf,
}
