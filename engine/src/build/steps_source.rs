//! ManagedImage and SharedImageVersion sources: resolved through kiln's state store (managed
//! images and gallery image versions published by earlier runs). The stored file is a fixed VHD;
//! the build boots a qcow2 overlay on it, so the stored image is never modified.

use super::context::{BuildCx, ResolvedSource};
use super::BuildError;
use crate::store::{ids::ResourceId, Store};
use crate::template::model::Source;
use kiln_images::catalog::HyperVGeneration;
use kiln_images::{DiskFormat, ImageTool, QemuImg};
use std::path::Path;

/// Normalizes a region name as Azure does (`West US 2` → `westus2`).
pub fn region_key(region: &str) -> String {
    region
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

fn generation(s: &str) -> HyperVGeneration {
    if s.eq_ignore_ascii_case("V2") {
        HyperVGeneration::V2
    } else {
        HyperVGeneration::V1
    }
}

fn virtual_size(disk: &Path) -> Result<u64, BuildError> {
    QemuImg::new()
        .info(disk, Some(DiskFormat::Vpc))
        .map(|i| i.virtual_size)
        .map_err(|e| BuildError::Source(format!("reading {}: {e}", disk.display())))
}

/// The shared lease on a stored image's disk, held for the build (see `store::lease`).
fn take_lease(disk: &Path, id: &str) -> Result<std::sync::Arc<std::fs::File>, BuildError> {
    crate::store::lease::shared(disk)
        .map(std::sync::Arc::new)
        .map_err(|e| BuildError::Source(format!("source {id}: {}: {e}", disk.display())))
}

/// Resolves a ManagedImage or SharedImageVersion source. (PlatformImage sources resolve through
/// the catalog in `steps::ResolveSource`.)
pub fn resolve(cx: &BuildCx) -> Result<ResolvedSource, BuildError> {
    let store =
        Store::open(&cx.options.kiln_home).map_err(|e| BuildError::Source(e.to_string()))?;
    match &cx.template.properties.source {
        Source::ManagedImage { image_id } => {
            let parsed = ResourceId::parse(image_id).filter(|r| r.kind() == "microsoft.compute/images").ok_or_else(|| {
                BuildError::Source(format!("ManagedImage imageId `{image_id}` is not a managed image resource ID (/subscriptions/…/resourceGroups/…/providers/Microsoft.Compute/images/NAME)"))
            })?;
            let img = store.image(image_id).map_err(|e| BuildError::Source(e.to_string()))?.ok_or_else(|| {
                BuildError::Source(format!(
                    "ManagedImage source {image_id}: no such image in kiln's image store (resource group {}); `kiln image list` shows the managed images, which a ManagedImage distributor creates",
                    parsed.resource_group
                ))
            })?;
            let lease = take_lease(&img.disk, &img.id)?;
            cx.events.info(format!(
                "source ManagedImage {} ({}) at {}",
                img.id,
                img.hyper_v_generation,
                img.disk.display()
            ));
            Ok(ResolvedSource {
                provisioning: super::steps_distribute::parse_stored_provisioning(&img.provisioning),
                virtual_size: virtual_size(&img.disk)?,
                disk: img.disk,
                format: DiskFormat::Vpc,
                generation: generation(&img.hyper_v_generation),
                exact_version: None,
                lease: Some(lease),
            })
        }
        Source::SharedImageVersion { image_version_id } => {
            let parsed = ResourceId::parse(image_version_id).filter(|r| r.kind() == "microsoft.compute/galleries/images/versions").ok_or_else(|| {
                BuildError::Source(format!(
                    "SharedImageVersion imageVersionId `{image_version_id}` is not an image version resource ID (…/providers/Microsoft.Compute/galleries/G/images/D/versions/X.Y.Z or …/versions/latest)"
                ))
            })?;
            let def_id = image_version_id
                .trim()
                .trim_end_matches('/')
                .rsplit_once("/")
                .and_then(|(a, _)| a.rsplit_once('/'))
                .map(|(a, _)| a.to_string())
                .unwrap_or_default();
            let def = store.definition(&def_id).map_err(|e| BuildError::Source(e.to_string()))?.ok_or_else(|| {
                BuildError::Source(format!("SharedImageVersion source: the image definition {def_id} does not exist in kiln's store (`kiln sig image-definition list`)"))
            })?;
            let latest = parsed.name().eq_ignore_ascii_case("latest");
            let v = store.version(image_version_id).map_err(|e| BuildError::Source(e.to_string()))?.ok_or_else(|| {
                BuildError::Source(if latest {
                    format!("SharedImageVersion source {image_version_id}: the image definition has no version that is not excluded from latest")
                } else {
                    format!("SharedImageVersion source {image_version_id}: no such image version (`kiln sig image-version list`)")
                })
            })?;
            let want = region_key(&cx.template.location);
            let replica = v.replicas.iter().find(|r| region_key(&r.region) == want).ok_or_else(|| {
                BuildError::Source(format!(
                    "SharedImageVersion source {}: the version is not replicated to the template's region `{}` (replicated to: {}); add the region to the distributor's targetRegions",
                    v.id,
                    cx.template.location,
                    v.replicas.iter().map(|r| r.region.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            let lease = take_lease(&replica.disk, &v.id)?;
            cx.events.info(format!(
                "source SharedImageVersion {} ({}) at {}",
                v.id,
                def.hyper_v_generation,
                replica.disk.display()
            ));
            Ok(ResolvedSource {
                provisioning: super::steps_distribute::parse_stored_provisioning(&v.provisioning),
                virtual_size: virtual_size(&replica.disk)?,
                disk: replica.disk.clone(),
                format: DiskFormat::Vpc,
                generation: generation(&def.hyper_v_generation),
                exact_version: Some(v.id.clone()),
                lease: Some(lease),
            })
        }
        Source::PlatformImage { .. } => Err(BuildError::Source(
            "PlatformImage sources resolve through the catalog".into(),
        )),
    }
}
