//! `kiln image import|list`: the local PlatformImage catalog (kiln's stand-in for the Azure
//! Marketplace). A template's `PlatformImage` source resolves against it.

use super::output::{Format, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use kiln_images::catalog::{Catalog, CatalogEntry, HyperVGeneration, ImportRequest, OsType, ProvisioningMethod};
use kiln_images::QemuImg;
use serde_json::json;
use std::path::PathBuf;

/// `kiln image …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Import a disk (qcow2, raw, VHD, VHDX) as publisher:offer:sku:version.
    Import(ImportArgs),
    /// List the catalog.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
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
        Command::List { output } => match catalog.list() {
            Ok(list) => {
                match output {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&list.iter().map(entry_json).collect::<Vec<_>>()).unwrap_or_default()),
                    Format::Human => {
                        println!("{:<12} {:<16} {:<12} {:<16} {:<4} {:<8} SIZE", "PUBLISHER", "OFFER", "SKU", "VERSION", "GEN", "OS");
                        for e in &list {
                            let m = &e.meta;
                            println!(
                                "{:<12} {:<16} {:<12} {:<16} {:<4} {:<8} {} MiB",
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
            let generation = if a.hyper_v_generation == "V2" { HyperVGeneration::V2 } else { HyperVGeneration::V1 };
            let os = if a.os_type == "Windows" { OsType::Windows } else { OsType::Linux };
            let mut req = ImportRequest::new(&a.publisher, &a.offer, &a.sku, &a.version, generation, os, &a.disk);
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
                        Format::Json => println!("{}", serde_json::to_string_pretty(&entry_json(&e)).unwrap_or_default()),
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
