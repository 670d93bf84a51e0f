//! The typed image template, as kiln's build uses it: deserialized from the normalized template
//! (canonical names, defaults applied), so every field here has the value AIB would use.

use serde::Deserialize;
use std::collections::BTreeMap;

/// An image template (the resource).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageTemplate {
    /// The resource name, when the file gives one.
    #[serde(default)]
    pub name: Option<String>,
    /// The Azure region (recorded; local builds run here).
    pub location: String,
    /// Resource tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The template's identity.
    pub identity: Identity,
    /// The template's properties.
    pub properties: Properties,
}

/// `identity`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// `UserAssigned` or `None`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Identity resource IDs.
    #[serde(default)]
    pub user_assigned_identities: BTreeMap<String, serde_json::Value>,
}

/// `properties`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Properties {
    /// Where the build starts from.
    pub source: Source,
    /// Customizers, run in order.
    #[serde(default)]
    pub customize: Vec<Customizer>,
    /// The validate phase.
    #[serde(default)]
    pub validate: Option<Validate>,
    /// Where the result goes.
    pub distribute: Vec<Distributor>,
    /// What to do with the build VM on failure.
    #[serde(default)]
    pub error_handling: Option<ErrorHandling>,
    /// The whole build's deadline in minutes (defaults applied: 240 for 0).
    pub build_timeout_in_minutes: u32,
    /// The build VM.
    #[serde(default)]
    pub vm_profile: VmProfile,
    /// A resource group for the build's staging resources.
    #[serde(default)]
    pub staging_resource_group: Option<String>,
    /// Image optimization (2024-02-01+).
    #[serde(default)]
    pub optimize: Option<serde_json::Value>,
    /// Extra data disks (2025-10-01).
    #[serde(default)]
    pub additional_data_disks: Vec<DataDisk>,
    /// Run on creation (2024-02-01+).
    #[serde(default)]
    pub auto_run: Option<serde_json::Value>,
    /// Tags for staging resources (2024-02-01+).
    #[serde(default)]
    pub managed_resource_tags: BTreeMap<String, String>,
}

/// `source`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Source {
    /// A Marketplace image (kiln: the local catalog).
    #[serde(rename_all = "camelCase")]
    PlatformImage {
        /// Publisher.
        publisher: String,
        /// Offer.
        offer: String,
        /// SKU.
        sku: String,
        /// Version or `latest`.
        version: String,
        /// Marketplace plan.
        #[serde(default)]
        plan_info: Option<PlanInfo>,
    },
    /// A managed image.
    #[serde(rename_all = "camelCase")]
    ManagedImage {
        /// Its resource ID.
        image_id: String,
    },
    /// A gallery image version.
    #[serde(rename_all = "camelCase")]
    SharedImageVersion {
        /// Its resource ID (may end in `versions/latest`).
        image_version_id: String,
    },
}

/// `planInfo`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanInfo {
    /// Plan name.
    pub plan_name: String,
    /// Plan product.
    pub plan_product: String,
    /// Plan publisher.
    pub plan_publisher: String,
}

/// Where a script comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// Fetched from a URI (checksum verified first when given).
    Uri {
        /// The URI or path.
        uri: String,
        /// Lower-case hex SHA-256, if given.
        sha256: Option<String>,
    },
    /// Lines given in the template.
    Inline(Vec<String>),
}

/// A Shell step (customizer or validator): exactly one of `script_uri` and `inline`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShellScript {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// The script's URI.
    #[serde(default)]
    pub script_uri: Option<String>,
    /// Its checksum ("" = none).
    #[serde(default)]
    pub sha256_checksum: String,
    /// Inline lines.
    #[serde(default)]
    pub inline: Vec<String>,
}

/// A PowerShell step (customizer or validator).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PowerShellScript {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// The script's URI.
    #[serde(default)]
    pub script_uri: Option<String>,
    /// Its checksum ("" = none).
    #[serde(default)]
    pub sha256_checksum: String,
    /// Inline lines.
    #[serde(default)]
    pub inline: Vec<String>,
    /// Run with an elevated token.
    pub run_elevated: bool,
    /// Run as SYSTEM (needs run_elevated).
    pub run_as_system: bool,
    /// Exit codes that count as success.
    pub valid_exit_codes: Vec<i64>,
}

/// A File step: one file copied into the VM (customizer, or validator from 2022-07-01).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileCopy {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Where to fetch it.
    pub source_uri: String,
    /// Its checksum ("" = none).
    #[serde(default)]
    pub sha256_checksum: String,
    /// Absolute destination path in the VM.
    pub destination: String,
}

/// A customizer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Customizer {
    /// A shell script on Linux.
    Shell(ShellScript),
    /// A PowerShell script on Windows.
    PowerShell(PowerShellScript),
    /// Copies one file into the VM.
    File(FileCopy),
    /// Restarts Windows.
    #[serde(rename_all = "camelCase")]
    WindowsRestart {
        /// Display name.
        #[serde(default)]
        name: Option<String>,
        /// The command that restarts.
        restart_command: String,
        /// A command run once the VM is back.
        restart_check_command: String,
        /// How long to wait (`5m`).
        restart_timeout: String,
    },
    /// Installs Windows updates.
    #[serde(rename_all = "camelCase")]
    WindowsUpdate {
        /// Display name.
        #[serde(default)]
        name: Option<String>,
        /// The Windows Update search criteria.
        search_criteria: String,
        /// include:/exclude: filters.
        #[serde(default)]
        filters: Vec<String>,
        /// Maximum updates per round (1000 for 0).
        update_limit: u32,
    },
}

impl Customizer {
    /// The AIB type name.
    pub fn kind(&self) -> &'static str {
        match self {
            Customizer::Shell(_) => "Shell",
            Customizer::PowerShell(_) => "PowerShell",
            Customizer::File(_) => "File",
            Customizer::WindowsRestart { .. } => "WindowsRestart",
            Customizer::WindowsUpdate { .. } => "WindowsUpdate",
        }
    }

    /// Its display name, if the template gives one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Customizer::Shell(s) => s.name.as_deref(),
            Customizer::PowerShell(s) => s.name.as_deref(),
            Customizer::File(f) => f.name.as_deref(),
            Customizer::WindowsRestart { name, .. } | Customizer::WindowsUpdate { name, .. } => {
                name.as_deref()
            }
        }
    }

    /// The script of a Shell or PowerShell customizer.
    pub fn script(&self) -> Option<Script> {
        let (uri, sha, inline) = match self {
            Customizer::Shell(s) => (&s.script_uri, &s.sha256_checksum, &s.inline),
            Customizer::PowerShell(s) => (&s.script_uri, &s.sha256_checksum, &s.inline),
            _ => return None,
        };
        Some(match uri {
            Some(u) => Script::Uri {
                uri: u.clone(),
                sha256: Some(sha.to_ascii_lowercase()).filter(|s| !s.is_empty()),
            },
            None => Script::Inline(inline.clone()),
        })
    }
}

/// `validate`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Validate {
    /// Distribute even when validation fails (the run still fails).
    pub continue_distribute_on_failure: bool,
    /// Validate the source image only.
    pub source_validation_only: bool,
    /// The validations.
    #[serde(default, rename = "inVMValidations")]
    pub in_vm_validations: Vec<Validator>,
}

/// An in-VM validation: the same shapes as the customizers of the same type.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Validator {
    /// A shell script.
    Shell(ShellScript),
    /// A PowerShell script.
    PowerShell(PowerShellScript),
    /// A file copied in (2022-07-01+).
    File(FileCopy),
}

/// A distributor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Distributor {
    /// A managed image.
    #[serde(rename_all = "camelCase")]
    ManagedImage {
        /// The runOutput's name.
        run_output_name: String,
        /// Tags for the artifact.
        #[serde(default)]
        artifact_tags: BTreeMap<String, String>,
        /// The image's resource ID.
        image_id: String,
        /// Its region.
        location: String,
    },
    /// A gallery image version.
    #[serde(rename_all = "camelCase")]
    SharedImage {
        /// The runOutput's name.
        run_output_name: String,
        /// Tags for the artifact.
        #[serde(default)]
        artifact_tags: BTreeMap<String, String>,
        /// The image definition (or explicit version) ID.
        gallery_image_id: String,
        /// Regions (deprecated form).
        #[serde(default)]
        replication_regions: Vec<String>,
        /// Regions with replica counts (2022-07-01+).
        #[serde(default)]
        target_regions: Vec<TargetRegion>,
        /// Keep the version out of `latest`.
        exclude_from_latest: bool,
        /// Storage type (with replicationRegions).
        #[serde(default)]
        storage_account_type: Option<String>,
        /// Version numbering (2022-07-01+).
        #[serde(default)]
        versioning: Option<Versioning>,
        /// Full or Shallow (2025-10-01).
        #[serde(default)]
        replication_mode: Option<String>,
    },
    /// A fixed VHD.
    #[serde(rename_all = "camelCase")]
    #[serde(rename = "VHD")]
    Vhd {
        /// The runOutput's name.
        run_output_name: String,
        /// Tags for the artifact.
        #[serde(default)]
        artifact_tags: BTreeMap<String, String>,
        /// Where to write it (2022-07-01+; default: the staging directory).
        #[serde(default)]
        uri: Option<String>,
    },
}

impl Distributor {
    /// The runOutput name.
    pub fn run_output_name(&self) -> &str {
        match self {
            Distributor::ManagedImage {
                run_output_name, ..
            }
            | Distributor::SharedImage {
                run_output_name, ..
            }
            | Distributor::Vhd {
                run_output_name, ..
            } => run_output_name,
        }
    }
}

/// A SharedImage target region.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRegion {
    /// Region name.
    pub name: String,
    /// Replicas.
    pub replica_count: u32,
    /// Storage type.
    pub storage_account_type: String,
}

/// SharedImage `versioning`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "scheme")]
pub enum Versioning {
    /// Next version after the gallery's latest (within `major` when ≥ 0).
    Latest {
        /// -1 = unset.
        major: i64,
    },
    /// The source image's version.
    Source,
}

/// `vmProfile`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmProfile {
    /// Azure VM size ("" = by generation: Standard_D1_v2 Gen1, Standard_D2ds_v4 Gen2).
    #[serde(default)]
    pub vm_size: String,
    /// OS disk size in GB (0 = the source's size).
    #[serde(default, rename = "osDiskSizeGB")]
    pub os_disk_size_gb: u32,
    /// Build-VM identities.
    #[serde(default)]
    pub user_assigned_identities: Vec<String>,
    /// Network placement.
    #[serde(default)]
    pub vnet_config: Option<serde_json::Value>,
}

/// `errorHandling`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorHandling {
    /// `cleanup` or `abort`.
    pub on_customizer_error: String,
    /// `cleanup` or `abort`.
    pub on_validation_error: String,
}

/// An additional data disk.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataDisk {
    /// Size in GB.
    #[serde(rename = "sizeGB", default)]
    pub size_gb: u32,
}
