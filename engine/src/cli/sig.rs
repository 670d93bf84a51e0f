//! `kiln sig …`: local Azure Compute Galleries, shaped like `az sig`. Image versions are made by
//! SharedImage distributors; these verbs create galleries and definitions and show versions.

use super::output::EXIT_OK;
use super::res::{self, Out};
use kiln_engine::store::{ids, DefinitionRow, GalleryRow, Store, StoreError, VersionRow};
use serde_json::{json, Value};

/// A gallery: `-g RG -r GALLERY`.
#[derive(Debug, clap::Args)]
pub struct GalleryRef {
    /// Resource group.
    #[arg(short = 'g', long)]
    resource_group: String,
    /// Gallery name.
    #[arg(short = 'r', long = "gallery-name")]
    gallery_name: String,
}

/// An image definition: `-g RG -r GALLERY -i DEF`.
#[derive(Debug, clap::Args)]
pub struct DefRef {
    #[command(flatten)]
    gallery: GalleryRef,
    /// Definition name.
    #[arg(short = 'i', long = "gallery-image-definition")]
    definition: String,
}

/// `kiln sig …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a gallery (idempotent).
    Create {
        #[command(flatten)]
        at: GalleryRef,
        /// Location (default: the resource group's).
        #[arg(short = 'l', long)]
        location: Option<String>,
    },
    /// Show a gallery.
    Show {
        #[command(flatten)]
        at: GalleryRef,
    },
    /// List galleries.
    List {
        /// Resource group (default: all).
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// Image definitions.
    #[command(subcommand, name = "image-definition")]
    ImageDefinition(DefCommand),
    /// Image versions.
    #[command(subcommand, name = "image-version")]
    ImageVersion(VersionCommand),
}

/// `kiln sig image-definition …`.
#[derive(Debug, clap::Subcommand)]
pub enum DefCommand {
    /// Create an image definition in an existing gallery.
    Create {
        #[command(flatten)]
        at: DefRef,
        /// Publisher.
        #[arg(short = 'p', long)]
        publisher: String,
        /// Offer.
        #[arg(short = 'f', long)]
        offer: String,
        /// SKU.
        #[arg(short = 's', long)]
        sku: String,
        /// Linux or Windows.
        #[arg(long, value_parser = ["Linux", "Windows"])]
        os_type: String,
        /// V1 or V2.
        #[arg(long, default_value = "V1", value_parser = ["V1", "V2"])]
        hyper_v_generation: String,
        /// Location (default: the gallery's).
        #[arg(short = 'l', long)]
        location: Option<String>,
    },
    /// List the definitions of a gallery.
    List {
        #[command(flatten)]
        at: GalleryRef,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// Show a definition.
    Show {
        #[command(flatten)]
        at: DefRef,
    },
}

/// `kiln sig image-version …`.
#[derive(Debug, clap::Subcommand)]
pub enum VersionCommand {
    /// List the versions of a definition.
    List {
        #[command(flatten)]
        at: DefRef,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// Show a version (`latest` resolves to the highest version not excluded from latest).
    Show {
        #[command(flatten)]
        at: DefRef,
        /// The version.
        #[arg(short = 'e', long = "gallery-image-version")]
        version: String,
    },
    /// Delete a version: its record and its replica files in every region. Refused while a
    /// build boots from it.
    Delete {
        #[command(flatten)]
        at: DefRef,
        /// The version (exact: `1.0.2`).
        #[arg(short = 'e', long = "gallery-image-version")]
        version: String,
    },
}

fn gallery_json(g: &GalleryRow) -> Value {
    json!({
        "id": g.id, "name": g.name, "type": "Microsoft.Compute/galleries", "location": g.location,
        "properties": {"identifier": {"uniqueName": format!("{}-{}", g.subscription, g.name.to_ascii_uppercase())}, "provisioningState": "Succeeded"}
    })
}

fn definition_json(d: &DefinitionRow) -> Value {
    json!({
        "id": d.id, "name": d.name, "type": "Microsoft.Compute/galleries/images", "location": d.location,
        "properties": {
            "identifier": {"publisher": d.publisher, "offer": d.offer, "sku": d.sku},
            "osType": d.os_type, "osState": "Generalized", "hyperVGeneration": d.hyper_v_generation,
            "provisioningState": "Succeeded"
        }
    })
}

/// A version in `GET galleries/…/versions/…`'s shape; the local files are under
/// `storageProfile.osDiskImage.source.uri` (the first replica) and `kiln.replicas`.
pub fn version_json(v: &VersionRow) -> Value {
    let size = v
        .replicas
        .first()
        .and_then(|r| std::fs::metadata(&r.disk).ok())
        .map(|m| (m.len().saturating_sub(512)) >> 30)
        .unwrap_or(0);
    json!({
        "id": v.id, "name": v.name, "type": "Microsoft.Compute/galleries/images/versions", "location": v.location,
        "tags": v.tags,
        "properties": {
            "publishingProfile": {
                "targetRegions": v.replicas.iter().map(|r| json!({"name": r.region, "regionalReplicaCount": r.replica_count, "storageAccountType": r.storage_account_type})).collect::<Vec<_>>(),
                "replicaCount": v.replicas.first().map(|r| r.replica_count).unwrap_or(1),
                "excludeFromLatest": v.exclude_from_latest,
                "publishedDate": v.created,
                "storageAccountType": v.replicas.first().map(|r| r.storage_account_type.clone()).unwrap_or_else(|| "Standard_LRS".into()),
            },
            "storageProfile": {"osDiskImage": {"sizeInGB": size, "hostCaching": "ReadWrite", "source": {"uri": v.replicas.first().map(|r| format!("file://{}", r.disk.display()))}}},
            "provisioningState": "Succeeded",
        },
        "kiln": {"replicas": v.replicas.iter().map(|r| json!({"region": r.region, "path": r.disk})).collect::<Vec<_>>(), "sourceRun": v.source_run, "provisioning": v.provisioning},
    })
}

fn definition(store: &Store, sub: &str, at: &DefRef) -> Result<DefinitionRow, StoreError> {
    let (rg, gallery, def) = (
        &at.gallery.resource_group,
        &at.gallery.gallery_name,
        &at.definition,
    );
    store.require_group(sub, rg)?;
    store.definition(&ids::definition_id(sub, rg, gallery, def))?.ok_or_else(|| StoreError::NotFound {
        code: "ResourceNotFound",
        message: format!("The Resource 'Microsoft.Compute/galleries/{gallery}/images/{def}' under resource group '{rg}' was not found."),
    })
}

/// Runs `kiln sig …`.
pub fn run(cmd: Command) -> u8 {
    let store = match res::open() {
        Ok(s) => s,
        Err(c) => return c,
    };
    let sub = match res::subscription(&store) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let r: Result<(), StoreError> = (|| {
        match cmd {
            Command::Create {
                at:
                    GalleryRef {
                        resource_group,
                        gallery_name,
                    },
                location,
            } => {
                let g = store.require_group(&sub, &resource_group)?;
                let gal = store.create_gallery(
                    &sub,
                    &resource_group,
                    &gallery_name,
                    location.as_deref().unwrap_or(&g.location),
                )?;
                res::print(&gallery_json(&gal));
            }
            Command::Show {
                at:
                    GalleryRef {
                        resource_group,
                        gallery_name,
                    },
            } => {
                store.require_group(&sub, &resource_group)?;
                let g = store.gallery(&ids::gallery_id(&sub, &resource_group, &gallery_name))?.ok_or_else(|| StoreError::NotFound {
                    code: "ResourceNotFound",
                    message: format!("The Resource 'Microsoft.Compute/galleries/{gallery_name}' under resource group '{resource_group}' was not found."),
                })?;
                res::print(&gallery_json(&g));
            }
            Command::List {
                resource_group,
                output,
            } => {
                let gs = store.galleries(&sub, resource_group.as_deref())?;
                match output {
                    Out::Json => {
                        res::print(&json!(gs.iter().map(gallery_json).collect::<Vec<_>>()))
                    }
                    Out::Table => res::table(
                        &["Name", "ResourceGroup", "Location"],
                        &gs.iter()
                            .map(|g| {
                                vec![g.name.clone(), g.resource_group.clone(), g.location.clone()]
                            })
                            .collect::<Vec<_>>(),
                    ),
                }
            }
            Command::ImageDefinition(DefCommand::Create {
                at:
                    DefRef {
                        gallery:
                            GalleryRef {
                                resource_group,
                                gallery_name,
                            },
                        definition,
                    },
                publisher,
                offer,
                sku,
                os_type,
                hyper_v_generation,
                location,
            }) => {
                store.require_group(&sub, &resource_group)?;
                let gid = ids::gallery_id(&sub, &resource_group, &gallery_name);
                let g = store.gallery(&gid)?.ok_or_else(|| StoreError::NotFound {
                    code: "ParentResourceNotFound",
                    message: format!("the gallery {gid} was not found; create it with `kiln sig create -g {resource_group} -r {gallery_name}`"),
                })?;
                let d = store.create_definition(&DefinitionRow {
                    id: ids::definition_id(&sub, &resource_group, &gallery_name, &definition),
                    gallery_key: g.id.clone(),
                    name: definition.clone(),
                    location: location.unwrap_or(g.location),
                    publisher,
                    offer,
                    sku,
                    os_type,
                    hyper_v_generation,
                })?;
                res::print(&definition_json(&d));
            }
            Command::ImageDefinition(DefCommand::List {
                at:
                    GalleryRef {
                        resource_group,
                        gallery_name,
                    },
                output,
            }) => {
                store.require_group(&sub, &resource_group)?;
                let ds =
                    store.definitions(&ids::gallery_id(&sub, &resource_group, &gallery_name))?;
                match output {
                    Out::Json => {
                        res::print(&json!(ds.iter().map(definition_json).collect::<Vec<_>>()))
                    }
                    Out::Table => res::table(
                        &[
                            "Name",
                            "Publisher",
                            "Offer",
                            "Sku",
                            "OsType",
                            "HyperVGeneration",
                        ],
                        &ds.iter()
                            .map(|d| {
                                vec![
                                    d.name.clone(),
                                    d.publisher.clone(),
                                    d.offer.clone(),
                                    d.sku.clone(),
                                    d.os_type.clone(),
                                    d.hyper_v_generation.clone(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    ),
                }
            }
            Command::ImageDefinition(DefCommand::Show { at }) => {
                res::print(&definition_json(&definition(&store, &sub, &at)?));
            }
            Command::ImageVersion(VersionCommand::List { at, output }) => {
                let d = definition(&store, &sub, &at)?;
                let vs = store.versions(&d.id)?;
                match output {
                    Out::Json => {
                        res::print(&json!(vs.iter().map(version_json).collect::<Vec<_>>()))
                    }
                    Out::Table => res::table(
                        &["Name", "ExcludeFromLatest", "Regions", "PublishedDate"],
                        &vs.iter()
                            .map(|v| {
                                vec![
                                    v.name.clone(),
                                    v.exclude_from_latest.to_string(),
                                    v.replicas
                                        .iter()
                                        .map(|r| r.region.clone())
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    v.created.clone(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    ),
                }
            }
            Command::ImageVersion(VersionCommand::Show { at, version }) => {
                let d = definition(&store, &sub, &at)?;
                let v = store.version(&format!("{}/versions/{version}", d.id))?.ok_or_else(|| StoreError::NotFound {
                    code: "ResourceNotFound",
                    message: format!("The Resource 'Microsoft.Compute/galleries/{}/images/{}/versions/{version}' under resource group '{}' was not found.", at.gallery.gallery_name, at.definition, at.gallery.resource_group),
                })?;
                res::print(&version_json(&v));
            }
            Command::ImageVersion(VersionCommand::Delete { at, version }) => {
                let d = definition(&store, &sub, &at)?;
                let v = store.delete_version(&format!("{}/versions/{version}", d.id))?;
                eprintln!(
                    "deleted the image version {} ({} replica file(s))",
                    v.id,
                    v.replicas.len()
                );
            }
        }
        Ok(())
    })();
    match r {
        Ok(()) => EXIT_OK,
        Err(e) => res::fail(&e),
    }
}
