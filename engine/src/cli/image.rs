//! `kiln image import|list|show|delete`: the local PlatformImage catalog (kiln's stand-in for the
//! Azure Marketplace; a `PlatformImage` source resolves against it) and the managed images of the
//! state store (made by ManagedImage distributors; a `ManagedImage` source uses them).

use super::output::{Format, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use kiln_engine::store::{ids, ImageRow, Store};
use kiln_images::catalog::{
    Catalog, CatalogEntry, HyperVGeneration, ImportRequest, OsType, ProvisioningMethod,
};
use kiln_images::QemuImg;
use serde_json::json;
use std::path::PathBuf;

/// `kiln image …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Import a disk (qcow2, raw, VHD, VHDX) as publisher:offer:sku:version.
    Import(ImportArgs),
    /// List the catalog (PlatformImage) and the managed images (ManagedImage), each saying which.
    List {
        /// Only managed images of this resource group (catalog images are listed without it).
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "human")]
        output: Format,
    },
    /// Show a managed image (Azure's GET images JSON), or a catalog image by --urn.
    Show(Which),
    /// Delete a managed image (its row and files).
    Delete(Which),
}

/// Names one image.
#[derive(Debug, clap::Args)]
pub struct Which {
    /// Resource group of a managed image.
    #[arg(short = 'g', long)]
    pub resource_group: Option<String>,
    /// Name of a managed image.
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// Resource ID of a managed image.
    #[arg(long)]
    pub ids: Option<String>,
    /// publisher:offer:sku:version of a catalog image (show only).
    #[arg(long)]
    pub urn: Option<String>,
}

/// A managed image in Azure's `GET …/images/NAME` shape.
pub fn managed_json(i: &ImageRow) -> serde_json::Value {
    let size = std::fs::metadata(&i.disk)
        .map(|m| m.len().saturating_sub(512))
        .unwrap_or(0);
    json!({
        "id": i.id, "name": i.name, "type": "Microsoft.Compute/images", "location": i.location, "tags": i.tags,
        "properties": {
            "storageProfile": {
                "osDisk": {"osType": i.os_type, "osState": "Generalized", "blobUri": format!("file://{}", i.disk.display()), "diskSizeGB": size.div_ceil(1 << 30), "caching": "ReadWrite", "storageAccountType": "Standard_LRS"},
                "dataDisks": [], "zoneResilient": false
            },
            "provisioningState": "Succeeded",
            "hyperVGeneration": i.hyper_v_generation,
        },
        "kiln": {"provisioning": i.provisioning, "sourceRun": i.source_run},
    })
}

fn which_id(store: &Store, w: &Which) -> Result<String, u8> {
    if let Some(id) = &w.ids {
        return Ok(id.clone());
    }
    match (&w.resource_group, &w.name) {
        (Some(g), Some(n)) => {
            let sub = super::res::subscription(store)?;
            Ok(ids::image_id(&sub, g, n))
        }
        _ => {
            eprintln!("error: name the managed image with --ids ID, or -g RESOURCE_GROUP -n NAME");
            Err(EXIT_USAGE)
        }
    }
}

/// `kiln image import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Publisher, e.g. Canonical.
    #[arg(long)]
    pub publisher: String,
    /// Offer.
    #[arg(long)]
    pub offer: String,
    /// SKU.
    #[arg(long)]
    pub sku: String,
    /// Version, Major.Minor.Build.
    #[arg(long)]
    pub version: String,
    /// V1 (BIOS) or V2 (UEFI).
    #[arg(long, default_value = "V1", value_parser = ["V1", "V2"])]
    pub hyper_v_generation: String,
    /// Linux or Windows.
    #[arg(long, default_value = "Linux", value_parser = ["Linux", "Windows"])]
    pub os_type: String,
    /// How the image provisions its admin user, preferred first (nocloud, azure, unattend).
    #[arg(long, value_delimiter = ',')]
    pub provisioning: Vec<String>,
    /// Record the disk's SHA-256.
    #[arg(long)]
    pub sha256: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
    /// The disk file.
    pub disk: PathBuf,
}

fn entry_json(e: &CatalogEntry) -> serde_json::Value {
    json!({
        "kind": "PlatformImage",
        "urn": format!("{}:{}:{}:{}", e.meta.publisher, e.meta.offer, e.meta.sku, e.meta.version),
        "meta": e.meta,
        "disk": e.disk,
    })
}

/// Runs `kiln image …`.
pub fn run(cmd: Command) -> u8 {
    let catalog = Catalog::in_kiln_home(&kiln_engine::home::kiln_home());
    match cmd {
        Command::Show(w) => {
            if let Some(urn) = &w.urn {
                let parts: Vec<&str> = urn.split(':').collect();
                let found = catalog.list().ok().and_then(|l| {
                    l.into_iter().find(|e| {
                        parts
                            == [
                                e.meta.publisher.as_str(),
                                e.meta.offer.as_str(),
                                e.meta.sku.as_str(),
                                e.meta.version.as_str(),
                            ]
                    })
                });
                return match found {
                    Some(e) => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&entry_json(&e)).unwrap_or_default()
                        );
                        EXIT_OK
                    }
                    None => {
                        eprintln!("error: no catalog image {urn} (`kiln image list`)");
                        EXIT_INVALID
                    }
                };
            }
            let store = match super::res::open() {
                Ok(s) => s,
                Err(c) => return c,
            };
            let id = match which_id(&store, &w) {
                Ok(i) => i,
                Err(c) => return c,
            };
            match store.image(&id) {
                Ok(Some(i)) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&managed_json(&i)).unwrap_or_default()
                    );
                    EXIT_OK
                }
                Ok(None) => {
                    eprintln!("error: ResourceNotFound: the managed image {id} was not found");
                    EXIT_INVALID
                }
                Err(e) => super::res::fail(&e),
            }
        }
        Command::Delete(w) => {
            if w.urn.is_some() {
                eprintln!("error: catalog images are not deleted by kiln; remove their directory under KILN_HOME/catalog");
                return EXIT_USAGE;
            }
            let store = match super::res::open() {
                Ok(s) => s,
                Err(c) => return c,
            };
            let id = match which_id(&store, &w) {
                Ok(i) => i,
                Err(c) => return c,
            };
            match store.delete_image(&id) {
                Ok(i) => {
                    eprintln!("deleted the managed image {} ({})", i.id, i.disk.display());
                    EXIT_OK
                }
                Err(e) => super::res::fail(&e),
            }
        }
        Command::List {
            resource_group,
            output,
        } => match catalog.list() {
            Ok(list) => {
                let store = match super::res::open() {
                    Ok(s) => s,
                    Err(c) => return c,
                };
                let sub = match super::res::subscription(&store) {
                    Ok(s) => s,
                    Err(c) => return c,
                };
                let managed = match store.images(&sub, resource_group.as_deref()) {
                    Ok(m) => m,
                    Err(e) => return super::res::fail(&e),
                };
                let list = if resource_group.is_some() {
                    Vec::new()
                } else {
                    list
                };
                match output {
                    Format::Json => {
                        let mut all: Vec<serde_json::Value> = list.iter().map(entry_json).collect();
                        all.extend(managed.iter().map(|i| {
                            let mut v = managed_json(i);
                            v["kind"] = json!("ManagedImage");
                            v
                        }));
                        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default())
                    }
                    Format::Human => {
                        if !managed.is_empty() {
                            println!(
                                "{:<14} {:<24} {:<16} {:<4} {:<12} ID",
                                "KIND", "NAME", "RESOURCE GROUP", "GEN", "LOCATION"
                            );
                            for i in &managed {
                                println!(
                                    "{:<14} {:<24} {:<16} {:<4} {:<12} {}",
                                    "ManagedImage",
                                    i.name,
                                    i.resource_group,
                                    i.hyper_v_generation,
                                    i.location,
                                    i.id
                                );
                            }
                            println!();
                        }
                        println!(
                            "{:<14} {:<12} {:<16} {:<12} {:<16} {:<4} {:<8} SIZE",
                            "KIND", "PUBLISHER", "OFFER", "SKU", "VERSION", "GEN", "OS"
                        );
                        for e in &list {
                            let m = &e.meta;
                            println!(
                                "{:<14} {:<12} {:<16} {:<12} {:<16} {:<4} {:<8} {} MiB",
                                "PlatformImage",
                                m.publisher,
                                m.offer,
                                m.sku,
                                m.version,
                                format!("{:?}", m.hyper_v_generation),
                                format!("{:?}", m.os_type),
                                m.virtual_size >> 20
                            );
                        }
                    }
                }
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
        },
        Command::Import(a) => {
            let generation = if a.hyper_v_generation == "V2" {
                HyperVGeneration::V2
            } else {
                HyperVGeneration::V1
            };
            let os = if a.os_type == "Windows" {
                OsType::Windows
            } else {
                OsType::Linux
            };
            let mut req = ImportRequest::new(
                &a.publisher,
                &a.offer,
                &a.sku,
                &a.version,
                generation,
                os,
                &a.disk,
            );
            req.compute_sha256 = a.sha256;
            if !a.provisioning.is_empty() {
                let mut methods = Vec::new();
                for p in &a.provisioning {
                    methods.push(match p.to_ascii_lowercase().as_str() {
                        "nocloud" => ProvisioningMethod::NoCloud,
                        "azure" => ProvisioningMethod::Azure,
                        "unattend" => ProvisioningMethod::Unattend,
                        other => {
                            eprintln!("error: --provisioning {other}: expected nocloud, azure or unattend");
                            return EXIT_USAGE;
                        }
                    });
                }
                req.provisioning = methods;
            }
            let tool = QemuImg::new();
            match catalog.import(&tool, &req, &mut |_| {}) {
                Ok(e) => {
                    match a.output {
                        Format::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(&entry_json(&e)).unwrap_or_default()
                        ),
                        Format::Human => eprintln!(
                            "imported {}:{}:{}:{} ({:?}, {} MiB) into {}",
                            e.meta.publisher,
                            e.meta.offer,
                            e.meta.sku,
                            e.meta.version,
                            e.meta.hyper_v_generation,
                            e.meta.virtual_size >> 20,
                            e.dir.display()
                        ),
                    }
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_INVALID
                }
            }
        }
    }
}
