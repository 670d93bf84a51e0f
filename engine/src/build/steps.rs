//! The steps of a Linux build, in order (see [`plan`]): resolve the source, prepare the disk,
//! fetch artifacts (checksums verified before boot), provisioning media, start the VM, connect,
//! customizers, deprovision, shut down, export, record.

use super::context::{Artifact, BuildCx, Provisioning, ResolvedSource};
use super::events::{Event, OutStream, SubState};
use super::fetch::{self, FetchContext, FetchRequest};
use super::runner::{Outcome, Step};
use super::{ovf, seed, BuildError};
use crate::fabric::{self, Fabric, FabricConfig};
use crate::template::model::{Customizer, FileCopy, ShellScript, Source, Validator};
use async_trait::async_trait;
use kiln_images::catalog::Catalog;
use kiln_images::{DiskFormat, ImageTool, QemuImg};
use std::path::{Path, PathBuf};
use std::time::Duration;

const GIB: u64 = 1 << 30;
/// AIB's advice for big File customizer payloads.
const FILE_WARN_BYTES: u64 = 20 * 1024 * 1024;
/// The build user, as on AIB's build VM.
pub const BUILD_USER: &str = "packer";

/// Plans the steps for `cx.template`. Unsupported features fail here, before anything boots.
pub fn plan(cx: &BuildCx) -> Result<Vec<Box<dyn Step>>, BuildError> {
    let os = crate::build::steps_windows::target_os(cx);
    if os.windows {
        return crate::build::steps_windows::plan(cx);
    }
    let p = &cx.template.properties;
    let source_only = p
        .validate
        .as_ref()
        .is_some_and(|v| v.source_validation_only);
    if source_only && !p.customize.is_empty() {
        cx.events.warn(format!(
            "validate.sourceValidationOnly is true: the source image is validated as it is; the {} customizer(s) are not run and nothing is distributed",
            p.customize.len()
        ));
    }
    for c in p.customize.iter().filter(|_| !source_only) {
        if !matches!(c, Customizer::Shell(_) | Customizer::File(_)) {
            return Err(BuildError::Template(format!(
                "customizer type {} needs a Windows source, but this is a Linux build ({})",
                c.kind(),
                os.reason
            )));
        }
    }
    let validations: &[Validator] = p
        .validate
        .as_ref()
        .map(|v| v.in_vm_validations.as_slice())
        .unwrap_or_default();
    for (i, v) in validations.iter().enumerate() {
        if matches!(v, Validator::PowerShell(_)) {
            return Err(BuildError::Template(format!(
                "properties.validate.inVMValidations[{i}]: PowerShell validations need a Windows source, but this is a Linux build ({})",
                os.reason
            )));
        }
    }
    let continue_on_failure = p
        .validate
        .as_ref()
        .is_some_and(|v| v.continue_distribute_on_failure);
    let abort = |which: fn(&crate::template::model::ErrorHandling) -> &str| {
        p.error_handling
            .as_ref()
            .is_some_and(|e| which(e).eq_ignore_ascii_case("abort"))
    };
    let abort_customizer = abort(|e| &e.on_customizer_error);
    let abort_validation = abort(|e| &e.on_validation_error);
    let mut steps: Vec<Box<dyn Step>> = vec![
        Box::new(ResolveSource),
        Box::new(PrepareDisk),
        Box::new(FetchArtifacts),
        Box::new(ProvisioningMedia),
        Box::new(crate::build::steps_vm::StartVm),
        Box::new(crate::build::steps_vm::Connect),
    ];
    let validate = |steps: &mut Vec<Box<dyn Step>>| {
        for (i, v) in validations.iter().enumerate() {
            steps.push(Box::new(crate::build::steps_vm::Validate {
                index: i,
                validator: v.clone(),
                continue_on_failure: continue_on_failure && !source_only,
                abort_on_error: abort_validation,
            }));
        }
    };
    if source_only {
        // `sourceValidationOnly`: the source image itself is validated; no customization, no
        // generalization, nothing distributed.
        validate(&mut steps);
        steps.push(Box::new(crate::build::steps_vm::Shutdown {
            phase: SubState::Validating,
        }));
        return Ok(steps);
    }
    for (i, c) in p.customize.iter().enumerate() {
        steps.push(Box::new(crate::build::steps_vm::Customize {
            index: i,
            customizer: c.clone(),
            abort_on_error: abort_customizer,
        }));
    }
    validate(&mut steps);
    let phase = if validations.is_empty() {
        SubState::Customizing
    } else {
        SubState::Validating
    };
    steps.push(Box::new(crate::build::steps_vm::Deprovision { phase }));
    steps.push(Box::new(crate::build::steps_vm::Shutdown { phase }));
    steps.push(Box::new(crate::build::steps_distribute::ExportDisk));
    steps.push(Box::new(crate::build::steps_distribute::Distribute));
    steps.push(Box::new(Record));
    Ok(steps)
}

/// The template's source, as the dry-run prints it.
pub fn describe_source(cx: &BuildCx) -> serde_json::Value {
    match &cx.template.properties.source {
        Source::PlatformImage {
            publisher,
            offer,
            sku,
            version,
            ..
        } => serde_json::json!({
            "type": "PlatformImage",
            "urn": format!("{publisher}:{offer}:{sku}:{version}"),
            "resolvedThrough": "kiln's local image catalog (`kiln image list`)",
        }),
        Source::ManagedImage { image_id } => {
            serde_json::json!({"type": "ManagedImage", "imageId": image_id, "resolvedThrough": "kiln's state store"})
        }
        Source::SharedImageVersion { image_version_id } => {
            serde_json::json!({"type": "SharedImageVersion", "imageVersionId": image_version_id, "resolvedThrough": "kiln's state store"})
        }
    }
}

/// Resolves `source`: PlatformImage through the local catalog, the others through the store.
pub struct ResolveSource;

#[async_trait]
impl Step for ResolveSource {
    fn name(&self) -> String {
        "Resolve source".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        describe_source(cx)
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let Source::PlatformImage {
            publisher,
            offer,
            sku,
            version,
            ..
        } = &cx.template.properties.source
        else {
            // ManagedImage, SharedImageVersion: through the state store.
            cx.source = Some(crate::build::steps_source::resolve(cx)?);
            return Ok(());
        };
        let catalog = Catalog::in_kiln_home(&cx.options.kiln_home);
        let r = catalog
            .resolve(publisher, offer, sku, version)
            .map_err(|e| BuildError::Source(e.to_string()))?;
        cx.events.info(format!(
            "source {publisher}:{offer}:{sku}:{version} → {} ({:?}, {} MiB) at {}",
            r.exact_version,
            r.entry.meta.hyper_v_generation,
            r.entry.meta.virtual_size >> 20,
            r.entry.disk.display()
        ));
        cx.source = Some(ResolvedSource {
            disk: r.entry.disk.clone(),
            format: DiskFormat::Qcow2,
            generation: r.entry.meta.hyper_v_generation,
            exact_version: Some(r.exact_version),
            virtual_size: r.entry.meta.virtual_size,
            provisioning: r.entry.meta.provisioning.clone(),
            lease: None,
        });
        Ok(())
    }
}

/// A qcow2 overlay on the source (copy-on-write: the source is never touched), grown to
/// `osDiskSizeGB` when that is larger.
pub struct PrepareDisk;

#[async_trait]
impl Step for PrepareDisk {
    fn name(&self) -> String {
        "Prepare disk".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let gb = cx.template.properties.vm_profile.os_disk_size_gb;
        serde_json::json!({
            "overlay": "qcow2 copy-on-write overlay on the source (the source is never modified)",
            "osDiskSizeGB": if gb == 0 { serde_json::json!("the source's size") } else { serde_json::json!(gb) },
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let src = cx
            .source
            .clone()
            .ok_or_else(|| BuildError::Source("no source resolved".into()))?;
        let want = u64::from(cx.template.properties.vm_profile.os_disk_size_gb) * GIB;
        let size = if want == 0 || want == src.virtual_size {
            None
        } else if want < src.virtual_size {
            return Err(BuildError::Disk {
                what: "vmProfile.osDiskSizeGB".into(),
                detail: format!(
                    "{} GB ({want} bytes) is smaller than the source image's {} bytes ({:.2} GiB); disks can only grow",
                    want / GIB,
                    src.virtual_size,
                    src.virtual_size as f64 / GIB as f64
                ),
            });
        } else {
            Some(want)
        };
        let overlay = cx.run_dir.join("os.qcow2");
        let tool = QemuImg::new();
        let o = overlay.clone();
        tokio::task::spawn_blocking(move || tool.create_overlay(&src.disk, src.format, &o, size))
            .await
            .map_err(|e| BuildError::Vm(e.to_string()))?
            .map_err(|e| BuildError::Disk {
                what: "creating the overlay".into(),
                detail: e.to_string(),
            })?;
        if let Some(s) = size {
            cx.events.info(format!(
                "OS disk grown to {} GiB (copy-on-write overlay)",
                s / GIB
            ));
        }
        cx.overlay = Some(overlay);
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, outcome: Outcome) {
        // After success the overlay has been exported; after a failure it stays for inspection.
        if outcome == Outcome::Succeeded {
            if let Some(o) = cx.overlay.take() {
                let _ = std::fs::remove_file(o);
            }
        }
    }
}

fn artifact_requests(cx: &BuildCx) -> Vec<FetchRequest> {
    let mut reqs = Vec::new();
    let source_only = cx
        .template
        .properties
        .validate
        .as_ref()
        .is_some_and(|v| v.source_validation_only);
    let customize = if source_only {
        &[][..]
    } else {
        cx.template.properties.customize.as_slice()
    };
    for (i, c) in customize.iter().enumerate() {
        let label = |kind: &str, name: &Option<String>| {
            format!(
                "properties.customize[{i}] ({kind}{})",
                name.as_ref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default()
            )
        };
        match c {
            Customizer::Shell(ShellScript {
                name,
                script_uri: Some(u),
                sha256_checksum,
                ..
            }) => reqs.push(FetchRequest {
                uri: u.clone(),
                expected_sha256: Some(sha256_checksum.clone()).filter(|s| !s.is_empty()),
                label: label("Shell", name),
            }),
            Customizer::PowerShell(crate::template::model::PowerShellScript {
                name,
                script_uri: Some(u),
                sha256_checksum,
                ..
            }) => reqs.push(FetchRequest {
                uri: u.clone(),
                expected_sha256: Some(sha256_checksum.clone()).filter(|s| !s.is_empty()),
                label: label("PowerShell", name),
            }),
            Customizer::File(FileCopy {
                name,
                source_uri,
                sha256_checksum,
                ..
            }) => reqs.push(FetchRequest {
                uri: source_uri.clone(),
                expected_sha256: Some(sha256_checksum.clone()).filter(|s| !s.is_empty()),
                label: label("File", name),
            }),
            _ => {}
        }
    }
    let validations = cx
        .template
        .properties
        .validate
        .as_ref()
        .map(|v| v.in_vm_validations.as_slice())
        .unwrap_or_default();
    for (i, v) in validations.iter().enumerate() {
        let label = |kind: &str, name: &Option<String>| {
            format!(
                "properties.validate.inVMValidations[{i}] ({kind}{})",
                name.as_ref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default()
            )
        };
        let (uri, sha, l) = match v {
            Validator::Shell(ShellScript {
                name,
                script_uri: Some(u),
                sha256_checksum,
                ..
            }) => (u, sha256_checksum, label("Shell", name)),
            Validator::File(FileCopy {
                name,
                source_uri,
                sha256_checksum,
                ..
            }) => (source_uri, sha256_checksum, label("File", name)),
            Validator::PowerShell(crate::template::model::PowerShellScript {
                name,
                script_uri: Some(u),
                sha256_checksum,
                ..
            }) => (u, sha256_checksum, label("PowerShell", name)),
            _ => continue,
        };
        reqs.push(FetchRequest {
            uri: uri.clone(),
            expected_sha256: Some(sha.clone()).filter(|s| !s.is_empty()),
            label: l,
        });
    }
    reqs
}

/// Fetches every scriptUri/sourceUri once and verifies every checksum — before the VM boots, so a
/// bad checksum means nothing ran.
pub struct FetchArtifacts;

#[async_trait]
impl Step for FetchArtifacts {
    fn name(&self) -> String {
        "Fetch artifacts".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let reqs: Vec<serde_json::Value> = artifact_requests(cx)
            .iter()
            .map(|r| serde_json::json!({"for": r.label, "uri": r.uri, "sha256": r.expected_sha256.clone().unwrap_or_else(|| "(none given: not verified)".into())}))
            .collect();
        serde_json::json!({"when": "on the host, before the VM boots; a checksum mismatch fails the build before anything runs", "artifacts": reqs})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let reqs = artifact_requests(cx);
        if reqs.is_empty() {
            return Ok(());
        }
        let dest = cx.run_dir.join("artifacts");
        std::fs::create_dir_all(&dest)
            .map_err(BuildError::io(format!("creating {}", dest.display())))?;
        let fctx = FetchContext {
            template_dir: cx.template_dir.clone(),
            dest_dir: dest,
            timeout: Duration::from_secs(300),
            max_bytes: 8 * GIB,
        };
        let fetched = fetch::fetch_all(&reqs, &fctx).await?;
        for f in fetched {
            let verified = reqs
                .iter()
                .any(|r| r.uri == f.uri && r.expected_sha256.is_some());
            cx.events.info(format!(
                "fetched {} ({} bytes, sha256 {}{})",
                f.uri,
                f.size,
                f.sha256,
                if verified {
                    ", verified"
                } else {
                    ", no checksum given"
                }
            ));
            cx.artifacts.insert(
                f.uri.clone(),
                Artifact {
                    path: f.path,
                    size: f.size,
                    sha256: f.sha256,
                },
            );
        }
        for c in &cx.template.properties.customize {
            if let Customizer::File(FileCopy {
                source_uri,
                destination,
                ..
            }) = c
            {
                if let Some(a) = cx.artifacts.get(source_uri) {
                    if a.size > FILE_WARN_BYTES {
                        cx.events.warn(format!(
                            "File {source_uri} → {destination} is {} MB; AIB advises: \"The file customizer is only suitable for small file downloads, < 20MB. For larger file downloads, use a script or inline command\"",
                            a.size / 1_000_000
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The hostname the build VM gets (AIB's build VMs are named like this too).
pub const BUILD_HOSTNAME: &str = "aibvm";
/// The build VM's NIC MAC with Azure provisioning (IMDS reports it; QEMU's first-NIC default).
pub const AZURE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The provisioning method: `--provisioning`, else the catalog image's preferred one.
pub fn choose_provisioning(cx: &BuildCx) -> Result<(Provisioning, String), BuildError> {
    use kiln_images::catalog::ProvisioningMethod as M;
    if let Some(p) = cx.options.provisioning {
        if p == Provisioning::Unattend {
            return Err(BuildError::Template(
                "--provisioning unattend is for Windows builds (Unattend.xml for Windows Setup); this build's source is Linux: use azure, nocloud or none".into(),
            ));
        }
        return Ok((p, "--provisioning".into()));
    }
    let supported = cx
        .source
        .as_ref()
        .map(|s| s.provisioning.clone())
        .unwrap_or_default();
    for m in &supported {
        match m {
            M::NoCloud => {
                return Ok((
                    Provisioning::NoCloud,
                    "the catalog image's preferred method".into(),
                ))
            }
            M::Azure => {
                return Ok((
                    Provisioning::Azure,
                    "the catalog image's preferred method".into(),
                ))
            }
            M::Unattend => {}
        }
    }
    if supported.is_empty() {
        return Ok((Provisioning::NoCloud, "the default".into()));
    }
    Err(BuildError::Template(format!(
        "the source image supports only {supported:?} provisioning, which needs a Windows build (not supported yet); pass --provisioning azure|nocloud|none to override"
    )))
}

/// The VM size name the build uses (the template's, else AIB's default for the generation).
pub fn vm_size_name(cx: &BuildCx) -> String {
    let gen2 = cx
        .source
        .as_ref()
        .is_some_and(|s| s.generation == kiln_images::catalog::HyperVGeneration::V2);
    match cx.template.properties.vm_profile.vm_size.as_str() {
        "" if gen2 => crate::template::defaults::DEFAULT_VM_SIZE_GEN2.to_string(),
        "" => crate::template::defaults::DEFAULT_VM_SIZE_GEN1.to_string(),
        s => s.to_string(),
    }
}

/// A fresh ed25519 key for this build and the media that give it to the build user: a NoCloud
/// seed, or (Azure) `ovf-env.xml` on a CD plus this build's emulated fabric.
pub struct ProvisioningMedia;

#[async_trait]
impl Step for ProvisioningMedia {
    fn name(&self) -> String {
        "Provisioning media".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({
            "media": "NoCloud seed (vfat, label cidata)",
            "hostname": "aibvm",
            "user": BUILD_USER,
            "credential": "a fresh ed25519 key pair for this build (public key in the seed; the private key is deleted when the build ends)",
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let (method, why) = choose_provisioning(cx)?;
        cx.events
            .info(format!("provisioning: {} ({why})", method.as_str()));
        cx.provisioning = Some(method);
        let keys = kiln_agents::generate_ed25519(&format!("kiln-build-{}", cx.run_id))
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        let key_path = cx.run_dir.join("id_ed25519");
        kiln_agents::write_private_key(&keys.private, &key_path)
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        match method {
            Provisioning::NoCloud => {
                let seed_path = cx.run_dir.join("seed.img");
                let cfg = seed::SeedConfig {
                    instance_id: format!("kiln-{}", cx.run_id),
                    hostname: BUILD_HOSTNAME.into(),
                    user: BUILD_USER.into(),
                    ssh_public_key: keys.public_line.clone(),
                    extra_user_data: None,
                };
                seed::write_nocloud_vfat(&seed_path, &cfg)
                    .map_err(|e| BuildError::Vm(format!("writing the NoCloud seed: {e}")))?;
                cx.seed = Some(seed_path);
            }
            Provisioning::Azure => {
                let iso = cx.run_dir.join("ovf-env.iso");
                let env = ovf::OvfEnv {
                    hostname: BUILD_HOSTNAME.into(),
                    user: BUILD_USER.into(),
                    ssh_public_key: keys.public_line.clone(),
                    custom_data_base64: None,
                };
                ovf::write_media(&iso, &env).map_err(|e| {
                    BuildError::Vm(format!("writing the Azure provisioning media: {e}"))
                })?;
                cx.cdrom = Some(iso);
                start_fabric(cx, BUILD_HOSTNAME, &keys.public_line, "Linux")?;
            }
            Provisioning::Unattend => {
                return Err(BuildError::Template(
                    "unattend provisioning needs a Windows build".into(),
                ))
            }
            Provisioning::None => {
                cx.events.warn("--provisioning none: no provisioning media; the image must accept the build user's key by itself");
            }
        }
        cx.keys = Some(keys);
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        // The key never outlives the build; the media hold only the public key. The fabric
        // stops (its socket is removed) after the VM has (this cleanup runs after StartVm's).
        let _ = std::fs::remove_file(cx.run_dir.join("id_ed25519"));
        if let Some(s) = cx.seed.take() {
            let _ = std::fs::remove_file(s);
        }
        if let Some(c) = cx.cdrom.take() {
            let _ = std::fs::remove_file(c);
        }
        cx.fabric = None;
    }
}

/// Starts this build's emulated Azure fabric (wireserver, IMDS, DHCP; docs/provisioning.md) for
/// a VM named `hostname` of `os_type` (`Linux`: `public_key` is the build user's key;
/// `Windows`: none, the password is only on the provisioning media).
pub(crate) fn start_fabric(
    cx: &mut BuildCx,
    hostname: &str,
    public_key: &str,
    os_type: &str,
) -> Result<(), BuildError> {
    let vm_id = fabric::uuid_from(&format!("kiln-vm/{}/{}", cx.template_name, cx.run_id));
    let mut cfg = FabricConfig::new(vm_id, hostname, BUILD_USER, public_key, AZURE_MAC);
    cfg.os_type = os_type.into();
    if !cx.template.location.is_empty() {
        cfg.location = cx.template.location.clone();
    }
    cfg.vm_size = vm_size_name(cx);
    cfg.resource_group = cx
        .run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| cx.options.resource_group.clone());
    cfg.subscription_id = cx.options.subscription_id.clone();
    cfg.token_command = cx.options.identity_token_command.clone();
    let (socket, own_dir) = fabric::socket_path_for(&cx.run_dir, &cx.run_id);
    let events = cx.events.clone();
    let sink: fabric::EventSink = std::sync::Arc::new(move |e: fabric::FabricEvent| {
        events.emit(Event::Fabric {
            endpoint: e.endpoint.as_str().into(),
            method: e.method,
            target: e.target,
            status: e.status,
            agent: e.agent,
            health: e.health.map(|h| h.to_string()),
            error: e.error,
        })
    });
    let f = Fabric::start(&socket, own_dir.as_deref(), cfg, sink)
        .map_err(|e| BuildError::Vm(e.to_string()))?;
    cx.events.info(format!(
        "Azure fabric for this build on {} (wireserver 168.63.129.16, IMDS 169.254.169.254; vmId {})",
        f.socket_path().display(),
        f.config().vm_id
    ));
    cx.fabric = Some(f);
    Ok(())
}

/// Where a VHD distributor writes: its `uri` (a local path or file:// URI, 2022-07-01+), else the
/// run's directory (AIB's staging storage account).
pub fn vhd_destination(
    cx: &BuildCx,
    run_output_name: &str,
    uri: Option<&str>,
) -> Result<PathBuf, BuildError> {
    match uri.filter(|u| !u.is_empty()) {
        None => Ok(cx.run_dir.join(format!("{run_output_name}.vhd"))),
        Some(u) => {
            let path = if let Some(p) = u.strip_prefix("file://") {
                PathBuf::from(p)
            } else if u.contains("://") {
                return Err(BuildError::Template(format!(
                    "VHD uri `{u}`: kiln writes VHDs to local paths (a path or file:// URI); upload to Azure Storage afterwards, e.g. with `az storage blob upload`"
                )));
            } else {
                let p = Path::new(u);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    cx.template_dir.join(p)
                }
            };
            Ok(
                if path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("vhd"))
                {
                    path
                } else {
                    path.join(format!("{run_output_name}.vhd"))
                },
            )
        }
    }
}

/// Records each distributor's runOutput, in Azure's shape.
pub struct Record;

/// The runOutput resource of a VHD distributor.
pub fn vhd_run_output(
    subscription: &str,
    rg: &str,
    template: &str,
    name: &str,
    path: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "id": format!("/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.VirtualMachineImages/imageTemplates/{template}/runOutputs/{name}"),
        "name": name,
        "type": "Microsoft.VirtualMachineImages/imageTemplates/runOutputs",
        "properties": {
            "artifactUri": format!("file://{}", path.display()),
            "provisioningState": "Succeeded"
        }
    })
}

#[async_trait]
impl Step for Record {
    fn name(&self) -> String {
        "Record runOutputs".into()
    }
    fn phase(&self) -> SubState {
        SubState::Distributing
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({"file": cx.run_dir.join("runOutputs.json").display().to_string()})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        for e in cx.exports.clone() {
            let ro = vhd_run_output(
                &cx.options.subscription_id,
                &cx.options.resource_group,
                &cx.template_name,
                &e.run_output_name,
                &e.path,
            );
            cx.events.emit(Event::RunOutput {
                run_output: ro.clone(),
            });
            cx.run_outputs.push(ro);
        }
        let list = serde_json::json!({ "value": cx.run_outputs });
        let path = cx.run_dir.join("runOutputs.json");
        let tmp = cx.run_dir.join("runOutputs.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap_or_default())
            .map_err(BuildError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(BuildError::io(format!("writing {}", path.display())))?;
        Ok(())
    }
}

/// Turns a chunk stream into line events (keeps partial lines until their newline).
pub struct LineSplitter {
    step: String,
    buf: [Vec<u8>; 2],
}

impl LineSplitter {
    /// For `step`.
    pub fn new(step: String) -> LineSplitter {
        LineSplitter {
            step,
            buf: [Vec::new(), Vec::new()],
        }
    }

    /// Feeds a chunk; emits complete lines.
    pub fn feed(&mut self, cx_events: &super::events::Reporter, stream: OutStream, data: &[u8]) {
        let i = usize::from(stream == OutStream::Stderr);
        self.buf[i].extend_from_slice(data);
        while let Some(pos) = self.buf[i].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf[i].drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim_end_matches('\r')
                .to_string();
            cx_events.emit(Event::Output {
                step: self.step.clone(),
                stream,
                line: text,
            });
        }
    }

    /// Emits what is left.
    pub fn finish(&mut self, cx_events: &super::events::Reporter) {
        for (i, stream) in [(0, OutStream::Stdout), (1, OutStream::Stderr)] {
            if !self.buf[i].is_empty() {
                let text = String::from_utf8_lossy(&self.buf[i]).to_string();
                self.buf[i].clear();
                cx_events.emit(Event::Output {
                    step: self.step.clone(),
                    stream,
                    line: text,
                });
            }
        }
    }
}
