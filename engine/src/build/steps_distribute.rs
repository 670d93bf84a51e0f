//! Distribution: the built disk is exported ONCE to a fixed VHD in the run's directory
//! ([`ExportDisk`]); every distributor then publishes that one file ([`Distribute`]):
//!
//! - `ManagedImage`: into the image store (`KILN_HOME/artifacts/<region dir>/images/…`), usable as
//!   a later `ManagedImage` source; its resource group must exist.
//! - `SharedImage`: a gallery image version (gallery and image definition must exist), version
//!   number explicit or generated (`versioning` Latest/Source), one replica record per target
//!   region. A region is a storage directory (`KILN_HOME/regions.json`, default: all regions in
//!   `KILN_HOME/artifacts`); regions sharing a directory share one file, others get real copies.
//! - `VHD`: the file at the distributor's `uri` (or in the run's directory).
//!
//! Publishing is atomic: files are written under `…partial-<run id>` names, renamed, and only then
//! is the store row committed. A distributor that fails does not stop the others; some failing
//! and some succeeding makes the run `PartiallySucceeded`.

use super::context::{BuildCx, ExportedVhd};
use super::events::{Event, SubState};
use super::runner::{Outcome, Step};
use super::steps::vhd_destination;
use super::steps_source::region_key;
use super::BuildError;
use crate::store::{
    ids, parse_version, DefinitionRow, ImageRow, ReplicaRow, Store, StoreError, VersionRow,
};
use crate::template::model::{Distributor, Source, Versioning};
use async_trait::async_trait;
use kiln_images::catalog::HyperVGeneration;
use kiln_images::export::{export_fixed_vhd, ExportRequest};
use kiln_images::{DiskFormat, QemuImg};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The storage directory of a region: `KILN_HOME/regions.json` (`{"westus2": "/mnt/a"}`), else
/// `KILN_HOME/artifacts`.
pub fn region_root(home: &Path, region: &str) -> Result<PathBuf, BuildError> {
    let default = home.join("artifacts");
    let path = home.join("regions.json");
    let map: BTreeMap<String, String> = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            BuildError::Template(format!(
                "{}: {e} (expected {{\"region\": \"/directory\"}})",
                path.display()
            ))
        })?,
        Err(_) => return Ok(default),
    };
    Ok(map
        .iter()
        .find(|(k, _)| region_key(k) == region_key(region))
        .map(|(_, v)| PathBuf::from(v))
        .unwrap_or(default))
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Publishes `src` at `dest` atomically: a hard link when `link` (else, or across file systems,
/// a verified copy) under a temporary name holding the run id, made read-only when `read_only`,
/// then renamed.
pub fn publish_file(
    src: &Path,
    dest: &Path,
    run_id: &str,
    link: bool,
    read_only: bool,
) -> Result<(), BuildError> {
    let dir = dest
        .parent()
        .ok_or_else(|| BuildError::Template(format!("no directory in {}", dest.display())))?;
    std::fs::create_dir_all(dir).map_err(BuildError::io(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(
        "{}.partial-{run_id}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&tmp);
    let linked = link && std::fs::hard_link(src, &tmp).is_ok();
    if !linked {
        std::fs::copy(src, &tmp).map_err(BuildError::io(format!(
            "copying {} to {}",
            src.display(),
            tmp.display()
        )))?;
        kiln_images::vhd::verify_fixed(&tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            BuildError::Disk {
                what: format!("verifying {}", tmp.display()),
                detail: e.to_string(),
            }
        })?;
    }
    if read_only {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444));
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BuildError::Io {
            what: format!("publishing {}", dest.display()),
            source: e,
        }
    })
}

/// Exports the built disk once, to `export.vhd` in the run's directory (fixed, footer verified).
pub struct ExportDisk;

/// Where [`ExportDisk`] writes.
pub fn export_path(cx: &BuildCx) -> PathBuf {
    cx.run_dir.join("export.vhd")
}

#[async_trait]
impl Step for ExportDisk {
    fn name(&self) -> String {
        "Export disk".into()
    }
    fn phase(&self) -> SubState {
        SubState::Distributing
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({"to": export_path(cx).display().to_string(), "format": "fixed VHD (footer verified)"})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let overlay = cx.overlay.clone().ok_or_else(|| BuildError::Disk {
            what: "export".into(),
            detail: "no disk".into(),
        })?;
        let dest = export_path(cx);
        let req = ExportRequest {
            source: overlay,
            source_format: DiskFormat::Qcow2,
            dest: dest.clone(),
            overwrite: false,
        };
        let events = cx.events.clone();
        let report = tokio::task::spawn_blocking(move || {
            let tool = QemuImg::new();
            export_fixed_vhd(&tool, &req, &mut |p| {
                events.emit(Event::Progress {
                    what: "export".into(),
                    done: p.done,
                    total: p.total,
                })
            })
        })
        .await
        .map_err(|e| BuildError::Vm(e.to_string()))?
        .map_err(|e| BuildError::Disk {
            what: format!("exporting {}", dest.display()),
            detail: e.to_string(),
        })?;
        cx.events.info(format!(
            "exported {} : fixed VHD, {} MiB, {} MiB written, footer verified, {:.1}s",
            report.path.display(),
            report.virtual_size >> 20,
            report.allocated_bytes >> 20,
            report.elapsed.as_secs_f64()
        ));
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        // Every publication is a link or a copy: the staging export goes.
        let _ = std::fs::remove_file(export_path(cx));
    }
}

/// Publishes the exported disk to every distributor.
pub struct Distribute;

/// The runOutput resource of a distributor.
pub fn run_output(
    cx: &BuildCx,
    name: &str,
    artifact_id: Option<&str>,
    artifact_uri: Option<&str>,
    state: &str,
) -> Value {
    let mut props = serde_json::Map::new();
    if let Some(a) = artifact_id {
        props.insert("artifactId".into(), json!(a));
    }
    if let Some(u) = artifact_uri {
        props.insert("artifactUri".into(), json!(u));
    }
    props.insert("provisioningState".into(), json!(state));
    json!({
        "id": format!("{}/runOutputs/{name}", ids::template_id(&cx.options.subscription_id, &cx.options.resource_group, &cx.template_name)),
        "name": name,
        "type": "Microsoft.VirtualMachineImages/imageTemplates/runOutputs",
        "properties": Value::Object(props),
    })
}

fn store_err(e: StoreError) -> BuildError {
    BuildError::Template(e.to_string())
}

fn gen_name(g: HyperVGeneration) -> &'static str {
    match g {
        HyperVGeneration::V1 => "V1",
        HyperVGeneration::V2 => "V2",
    }
}

/// The next version after the definition's versions (within `major` when ≥ 0): patch + 1 of the
/// highest; `M.0.1` (M = major or 0) for the first.
pub fn next_latest(existing: &[(i64, i64, i64)], major: i64) -> (i64, i64, i64) {
    let best = existing
        .iter()
        .filter(|v| major < 0 || v.0 == major)
        .max()
        .copied();
    match best {
        Some((a, b, c)) => (a, b, c + 1),
        None => (major.max(0), 0, 1),
    }
}

/// The source's version as `X.Y.Z`, for `versioning: Source`.
pub fn source_version(source: &Source, exact: Option<&str>) -> Result<(i64, i64, i64), String> {
    let text = match source {
        Source::ManagedImage { .. } => return Err("versioning scheme Source needs a PlatformImage or SharedImageVersion source; a ManagedImage has no version".into()),
        Source::PlatformImage { .. } => exact.unwrap_or_default().to_string(),
        Source::SharedImageVersion { .. } => exact.unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string(),
    };
    parse_version(&text).ok_or_else(|| format!("versioning scheme Source: the source version `{text}` is not Major.Minor.Patch with integers; use scheme Latest"))
}

/// How builds from a stored image provision it: the method this build used first (it worked),
/// then the source's other methods; Windows builds `unattend`. Recorded with managed images and
/// gallery versions so that a build on them provisions as its parent did.
pub fn stored_provisioning(cx: &BuildCx) -> Vec<String> {
    use kiln_images::catalog::ProvisioningMethod as M;
    let mut out: Vec<M> = Vec::new();
    match cx.provisioning {
        Some(crate::build::context::Provisioning::NoCloud) => out.push(M::NoCloud),
        Some(crate::build::context::Provisioning::Azure) => out.push(M::Azure),
        _ => {}
    }
    if cx.windows.is_some() && !out.contains(&M::Unattend) {
        out.push(M::Unattend);
    }
    for m in cx.source.iter().flat_map(|s| s.provisioning.iter()) {
        if !out.contains(m) {
            out.push(*m);
        }
    }
    out.iter()
        .filter_map(|m| serde_json::to_value(m).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The stored form back: unknown names are skipped.
pub fn parse_stored_provisioning(
    names: &[String],
) -> Vec<kiln_images::catalog::ProvisioningMethod> {
    names
        .iter()
        .filter_map(|n| serde_json::from_value(serde_json::Value::String(n.clone())).ok())
        .collect()
}

impl Distribute {
    fn managed_image(
        cx: &BuildCx,
        store: &Store,
        export: &Path,
        image_id: &str,
        location: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, BuildError> {
        let id = ids::ResourceId::parse(image_id)
            .filter(|r| r.kind() == "microsoft.compute/images")
            .ok_or_else(|| BuildError::Template(format!("ManagedImage imageId `{image_id}` is not …/providers/Microsoft.Compute/images/NAME")))?;
        store
            .require_group(&id.subscription, &id.resource_group)
            .map_err(store_err)?;
        if store.image(image_id).map_err(store_err)?.is_some() {
            return Err(BuildError::Template(format!("the managed image {image_id} already exists; delete it (`kiln image delete --ids {image_id}`) or choose another imageId")));
        }
        let dir = region_root(&cx.options.kiln_home, location)?
            .join("images")
            .join(safe(&id.subscription))
            .join(safe(&id.resource_group))
            .join(safe(id.name()));
        let disk = dir.join("disk.vhd");
        publish_file(export, &disk, &cx.run_id, true, true)?;
        let gen = cx
            .source
            .as_ref()
            .map(|s| s.generation)
            .unwrap_or(HyperVGeneration::V1);
        let row = ImageRow {
            id: image_id.to_string(),
            subscription: id.subscription.clone(),
            resource_group: id.resource_group.clone(),
            name: id.name().to_string(),
            location: location.to_string(),
            // Set by the first Windows step: no second look at the source's store row.
            os_type: if cx.windows.is_some() {
                "Windows".into()
            } else {
                "Linux".into()
            },
            hyper_v_generation: gen_name(gen).into(),
            disk: disk.clone(),
            tags: json!(tags),
            source_run: Some(cx.run_id.clone()),
            created: crate::build::time::now_rfc3339(),
            provisioning: stored_provisioning(cx),
        };
        if let Err(e) = store.insert_image(&row) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(store_err(e));
        }
        cx.events.info(format!(
            "published managed image {image_id} ({})",
            disk.display()
        ));
        Ok(image_id.to_string())
    }

    #[allow(clippy::too_many_arguments)]
    fn shared_image(
        cx: &BuildCx,
        store: &Store,
        export: &Path,
        gallery_image_id: &str,
        regions: &[(String, i64, String)],
        exclude_from_latest: bool,
        versioning: Option<&Versioning>,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, BuildError> {
        let id = ids::ResourceId::parse(gallery_image_id).ok_or_else(|| {
            BuildError::Template(format!(
                "galleryImageId `{gallery_image_id}` is not a resource ID"
            ))
        })?;
        let (gallery, def, explicit) = match (id.kind().as_str(), id.segments.as_slice()) {
            ("microsoft.compute/galleries/images", [(_, g), (_, d)]) => (g.clone(), d.clone(), None),
            ("microsoft.compute/galleries/images/versions", [(_, g), (_, d), (_, v)]) => (g.clone(), d.clone(), Some(v.clone())),
            _ => {
                return Err(BuildError::Template(format!(
                    "galleryImageId `{gallery_image_id}` is not an image definition (…/galleries/G/images/D) or an image version (…/versions/X.Y.Z)"
                )))
            }
        };
        store
            .require_group(&id.subscription, &id.resource_group)
            .map_err(store_err)?;
        let gallery_id = ids::gallery_id(&id.subscription, &id.resource_group, &gallery);
        let g = store.gallery(&gallery_id).map_err(store_err)?.ok_or_else(|| {
            BuildError::Template(format!("the gallery {gallery_id} does not exist; create it with `kiln sig create -g {} -r {gallery}`", id.resource_group))
        })?;
        let def_id = ids::definition_id(&id.subscription, &id.resource_group, &gallery, &def);
        let d: DefinitionRow = store.definition(&def_id).map_err(store_err)?.ok_or_else(|| {
            BuildError::Template(format!(
                "the image definition {def_id} does not exist; create it with `kiln sig image-definition create -g {} -r {gallery} -i {def} -p PUBLISHER -f OFFER -s SKU --os-type Linux`",
                id.resource_group
            ))
        })?;
        let gen = cx
            .source
            .as_ref()
            .map(|s| s.generation)
            .unwrap_or(HyperVGeneration::V1);
        if !d.hyper_v_generation.eq_ignore_ascii_case(gen_name(gen)) {
            return Err(BuildError::Template(format!(
                "the image definition {def_id} is HyperVGeneration {}, the built image is {}: create a definition with --hyper-v-generation {}",
                d.hyper_v_generation,
                gen_name(gen),
                gen_name(gen)
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let existing: Vec<(i64, i64, i64)> = store
                .versions(&def_id)
                .map_err(store_err)?
                .iter()
                .map(|v| v.version)
                .collect();
            let version = match &explicit {
                Some(v) => {
                    let parsed = parse_version(v).ok_or_else(|| {
                        BuildError::Template(format!(
                            "image version `{v}`: expected Major.Minor.Patch (integers)"
                        ))
                    })?;
                    if existing.contains(&parsed) {
                        return Err(BuildError::Template(format!(
                            "the image version {gallery_image_id} already exists; gallery versions are immutable: give a new version, or the image definition ID for an automatic one"
                        )));
                    }
                    parsed
                }
                None => match versioning {
                    Some(Versioning::Source) => source_version(
                        &cx.template.properties.source,
                        cx.source.as_ref().and_then(|s| s.exact_version.as_deref()),
                    )
                    .map_err(BuildError::Template)?,
                    Some(Versioning::Latest { major }) => next_latest(&existing, *major),
                    None => next_latest(&existing, -1),
                },
            };
            let name = format!("{}.{}.{}", version.0, version.1, version.2);
            let version_id =
                ids::version_id(&id.subscription, &id.resource_group, &gallery, &def, &name);
            if explicit.is_none() && existing.contains(&version) {
                return Err(BuildError::Template(format!(
                    "the image version {version_id} (from the source's version) already exists"
                )));
            }
            // One file per storage directory; replicas sharing a directory share it.
            let mut by_root: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
            let mut replicas = Vec::new();
            let mut published = Vec::new();
            for (region, count, sat) in regions {
                let root = region_root(&cx.options.kiln_home, region)?;
                let disk = match by_root.get(&root) {
                    Some(d) => d.clone(),
                    None => {
                        let disk = root
                            .join("galleries")
                            .join(safe(&id.subscription))
                            .join(safe(&id.resource_group))
                            .join(safe(&gallery))
                            .join(safe(&def))
                            .join(&name)
                            .join("disk.vhd");
                        // The first storage directory links the export; each further one is a real copy.
                        if let Err(e) =
                            publish_file(export, &disk, &cx.run_id, by_root.is_empty(), true)
                        {
                            for p in &published {
                                let _ = std::fs::remove_file(p);
                            }
                            return Err(e);
                        }
                        published.push(disk.clone());
                        by_root.insert(root, disk.clone());
                        disk
                    }
                };
                replicas.push(ReplicaRow {
                    region: region.clone(),
                    replica_count: *count,
                    storage_account_type: sat.clone(),
                    disk,
                });
            }
            let row = VersionRow {
                id: version_id.clone(),
                definition_key: ids::key(&def_id),
                name: name.clone(),
                version,
                exclude_from_latest,
                location: g.location.clone(),
                tags: json!(tags),
                source_run: Some(cx.run_id.clone()),
                created: crate::build::time::now_rfc3339(),
                replicas,
                provisioning: stored_provisioning(cx),
            };
            match store.insert_version(&row) {
                Ok(()) => {
                    cx.events.info(format!(
                        "published image version {version_id}{} in {} region(s): {}",
                        if exclude_from_latest {
                            " (excluded from latest)"
                        } else {
                            ""
                        },
                        regions.len(),
                        regions
                            .iter()
                            .map(|r| r.0.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    return Ok(version_id);
                }
                Err(e) => {
                    for p in &published {
                        let _ = std::fs::remove_file(p);
                        if let Some(dir) = p.parent() {
                            let _ = std::fs::remove_dir(dir);
                        }
                    }
                    // Another run took this automatic version meanwhile: take the next one.
                    if explicit.is_none()
                        && !matches!(versioning, Some(Versioning::Source))
                        && e.code() == "Conflict"
                        && attempt < 5
                    {
                        continue;
                    }
                    return Err(store_err(e));
                }
            }
        }
    }
}

/// The regions of a SharedImage distributor: `targetRegions`, else `replicationRegions` (with
/// `storageAccountType`), else the template's location. (region, replicaCount, storageAccountType).
pub fn shared_image_regions(
    d: &Distributor,
    template_location: &str,
) -> Vec<(String, i64, String)> {
    let Distributor::SharedImage {
        replication_regions,
        target_regions,
        storage_account_type,
        ..
    } = d
    else {
        return Vec::new();
    };
    let sat = storage_account_type
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "Standard_LRS".into());
    if !target_regions.is_empty() {
        target_regions
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    i64::from(t.replica_count.max(1)),
                    if t.storage_account_type.is_empty() {
                        "Standard_LRS".into()
                    } else {
                        t.storage_account_type.clone()
                    },
                )
            })
            .collect()
    } else if !replication_regions.is_empty() {
        replication_regions
            .iter()
            .map(|r| (r.clone(), 1, sat.clone()))
            .collect()
    } else {
        vec![(template_location.to_string(), 1, sat)]
    }
}

#[async_trait]
impl Step for Distribute {
    fn name(&self) -> String {
        "Distribute".into()
    }
    fn phase(&self) -> SubState {
        SubState::Distributing
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let list: Vec<serde_json::Value> = cx
            .template
            .properties
            .distribute
            .iter()
            .map(|d| match d {
                Distributor::Vhd { run_output_name, uri, .. } => serde_json::json!({
                    "type": "VHD",
                    "runOutputName": run_output_name,
                    "publishesTo": vhd_destination(cx, run_output_name, uri.as_deref()).map(|p| p.display().to_string()).unwrap_or_else(|e| format!("error: {e}")),
                }),
                Distributor::ManagedImage { run_output_name, image_id, location, .. } => serde_json::json!({
                    "type": "ManagedImage",
                    "runOutputName": run_output_name,
                    "publishesTo": format!("kiln's image store: {image_id} ({location})"),
                }),
                Distributor::SharedImage { run_output_name, gallery_image_id, .. } => serde_json::json!({
                    "type": "SharedImage",
                    "runOutputName": run_output_name,
                    "publishesTo": format!("kiln's gallery store: a version of {gallery_image_id}"),
                }),
            })
            .collect();
        serde_json::json!({"distributors": list})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let export = export_path(cx);
        let distributors = cx.template.properties.distribute.clone();
        let to_store = distributors
            .iter()
            .any(|d| !matches!(d, Distributor::Vhd { .. }));
        let store = if to_store {
            Some(Store::open(&cx.options.kiln_home).map_err(store_err)?)
        } else {
            None
        };
        let mut failures: Vec<String> = Vec::new();
        for d in &distributors {
            let name = d.run_output_name().to_string();
            let r: Result<(Option<String>, Option<String>), BuildError> = match d {
                Distributor::Vhd { uri, .. } => (|| {
                    let dest = vhd_destination(cx, &name, uri.as_deref())?;
                    if dest.exists() {
                        return Err(BuildError::Disk {
                            what: format!("VHD distributor `{name}`"),
                            detail: format!(
                                "{} already exists; kiln does not overwrite",
                                dest.display()
                            ),
                        });
                    }
                    // Store artifacts are read-only links of the export: a user's VHD is a copy then.
                    publish_file(&export, &dest, &cx.run_id, !to_store, false)?;
                    cx.exports.push(ExportedVhd {
                        run_output_name: name.clone(),
                        path: dest.clone(),
                    });
                    Ok((None, None))
                })(),
                Distributor::ManagedImage {
                    image_id,
                    location,
                    artifact_tags,
                    ..
                } => {
                    let store = store
                        .as_ref()
                        .ok_or_else(|| BuildError::Template("no store".into()))?;
                    Self::managed_image(cx, store, &export, image_id, location, artifact_tags)
                        .map(|id| (Some(id), None))
                }
                Distributor::SharedImage {
                    gallery_image_id,
                    exclude_from_latest,
                    versioning,
                    artifact_tags,
                    ..
                } => {
                    let store = store
                        .as_ref()
                        .ok_or_else(|| BuildError::Template("no store".into()))?;
                    let regions = shared_image_regions(d, &cx.template.location);
                    Self::shared_image(
                        cx,
                        store,
                        &export,
                        gallery_image_id,
                        &regions,
                        *exclude_from_latest,
                        versioning.as_ref(),
                        artifact_tags,
                    )
                    .map(|id| (Some(id), None))
                }
            };
            match r {
                Ok((Some(artifact_id), _)) => {
                    let ro = run_output(cx, &name, Some(&artifact_id), None, "Succeeded");
                    cx.events.emit(Event::RunOutput {
                        run_output: ro.clone(),
                    });
                    cx.run_outputs.push(ro);
                }
                Ok((None, _)) => {} // VHDs: recorded by the Record step from cx.exports
                Err(e) => {
                    cx.events.warn(format!("distributor `{name}` failed: {e}"));
                    failures.push(format!("distributor `{name}`: {e}"));
                    let ro = run_output(cx, &name, None, None, "Failed");
                    cx.run_outputs.push(ro);
                }
            }
        }
        if failures.len() == distributors.len() && !failures.is_empty() {
            return Err(BuildError::Step {
                step: "Distribute".into(),
                message: failures.join("; "),
            });
        }
        cx.partial_failures.extend(failures);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_versions() {
        let v = [(0, 1, 1), (0, 1, 2), (1, 2, 0), (2, 1, 0)];
        // The documented example: unset/2 → 2.1.1, 1 → 1.2.1, 0 → 0.1.3.
        assert_eq!(next_latest(&v, -1), (2, 1, 1));
        assert_eq!(next_latest(&v, 2), (2, 1, 1));
        assert_eq!(next_latest(&v, 1), (1, 2, 1));
        assert_eq!(next_latest(&v, 0), (0, 1, 3));
        assert_eq!(next_latest(&v, 5), (5, 0, 1));
        assert_eq!(next_latest(&[], -1), (0, 0, 1));
    }

    #[test]
    fn source_versions() {
        let p = Source::PlatformImage {
            publisher: "p".into(),
            offer: "o".into(),
            sku: "s".into(),
            version: "latest".into(),
            plan_info: None,
        };
        assert_eq!(source_version(&p, Some("1.2.3")), Ok((1, 2, 3)));
        assert!(source_version(&p, Some("20.04.202301")).is_ok());
        assert!(source_version(&p, Some("1.2.3.4")).is_err());
        let s = Source::SharedImageVersion {
            image_version_id: "x".into(),
        };
        assert_eq!(source_version(&s, Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/galleries/g/images/d/versions/3.0.7")), Ok((3, 0, 7)));
        assert!(source_version(
            &Source::ManagedImage {
                image_id: "i".into()
            },
            None
        )
        .is_err());
    }

    #[test]
    fn regions_config() {
        let home = std::env::temp_dir().join(format!("kiln-regions-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        assert_eq!(
            region_root(&home, "westus").unwrap(),
            home.join("artifacts")
        );
        std::fs::write(home.join("regions.json"), r#"{"West US 2": "/tmp/r2"}"#).unwrap();
        assert_eq!(
            region_root(&home, "westus2").unwrap(),
            PathBuf::from("/tmp/r2")
        );
        assert_eq!(
            region_root(&home, "eastus").unwrap(),
            home.join("artifacts")
        );
        let _ = std::fs::remove_dir_all(home);
    }
}
