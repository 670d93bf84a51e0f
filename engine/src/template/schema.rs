//! The AIB template schema as data: which properties each object has, in which API versions,
//! with which types. Derived from the swagger files (2022-02-14, 2025-10-01) and the release notes
//! summarised in `shared/reference/aib-schema.md`.

use super::version::ApiVersion::{self, *};

/// The JSON shape a property must have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ty {
    /// A string.
    Str,
    /// A boolean.
    Bool,
    /// An integer.
    Int,
    /// An array of strings.
    StrList,
    /// An array of integers.
    IntList,
    /// An object whose values are strings (tags).
    StrMap,
    /// A string from a fixed set (compared exactly; a case-insensitive match is `WrongCase`).
    Enum(&'static [&'static str]),
    /// A nested object.
    Obj(Obj),
    /// An array of nested objects.
    List(Obj),
    /// `identity.userAssignedIdentities`: a map from identity ID to an object of read-only fields.
    IdentityMap,
    /// ARM resource plumbing (`dependsOn`, `comments`…): accepted, not part of the template.
    ArmOnly,
}

/// The object kinds of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obj {
    /// The resource: `type`, `apiVersion`, `name`, `location`, `tags`, `identity`, `properties`.
    Root,
    /// `identity`.
    Identity,
    /// `properties`.
    Properties,
    /// `properties.source` (discriminated by `type`).
    Source,
    /// `source.planInfo`.
    PlanInfo,
    /// `properties.customize[]` (discriminated by `type`).
    Customizer,
    /// `properties.validate`.
    Validate,
    /// `validate.inVMValidations[]` (discriminated by `type`).
    Validator,
    /// `properties.distribute[]` (discriminated by `type`).
    Distributor,
    /// SharedImage `targetRegions[]`.
    TargetRegion,
    /// SharedImage `versioning` (discriminated by `scheme`).
    Versioning,
    /// `properties.vmProfile`.
    VmProfile,
    /// `vmProfile.vnetConfig`.
    VnetConfig,
    /// `properties.errorHandling`.
    ErrorHandling,
    /// `properties.optimize`.
    Optimize,
    /// `optimize.vmBoot`.
    VmBoot,
    /// `optimize.workload`.
    Workload,
    /// `properties.additionalDataDisks[]`.
    DataDisk,
    /// `properties.autoRun`.
    AutoRun,
    /// `properties.provisioningError` etc.: read-only objects, never walked.
    ReadOnly,
}

/// One property of an object kind.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The exact (canonical) name.
    pub name: &'static str,
    /// Its shape.
    pub ty: Ty,
    /// The first API version that has it.
    pub since: ApiVersion,
    /// The last API version that has it, if it was removed.
    pub until: Option<ApiVersion>,
    /// Required by the API in this version range (see [`required_in`] for version-dependent cases).
    pub required: bool,
    /// Read-only: set by the service, ignored on input.
    pub read_only: bool,
}

const fn f(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        since: V2020_02_14,
        until: None,
        required: false,
        read_only: false,
    }
}
const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        since: V2020_02_14,
        until: None,
        required: true,
        read_only: false,
    }
}
const fn since(name: &'static str, ty: Ty, v: ApiVersion) -> Field {
    Field {
        name,
        ty,
        since: v,
        until: None,
        required: false,
        read_only: false,
    }
}
const fn ro(name: &'static str) -> Field {
    Field {
        name,
        ty: Ty::Obj(Obj::ReadOnly),
        since: V2020_02_14,
        until: None,
        required: false,
        read_only: true,
    }
}

/// Enabled/Disabled states.
pub const STATES: &[&str] = &["Enabled", "Disabled"];
/// errorHandling values (lower case, as AIB defines them).
pub const ON_ERROR: &[&str] = &["cleanup", "abort"];
/// identity.type values.
pub const IDENTITY_TYPES: &[&str] = &["UserAssigned", "None"];
/// storageAccountType values in 2025-10-01 (Premium_LRS is checked per version).
pub const STORAGE_TYPES: &[&str] = &["Standard_LRS", "Standard_ZRS", "Premium_LRS"];
/// SharedImage replicationMode.
pub const REPLICATION_MODES: &[&str] = &["Full", "Shallow"];

/// Source types.
pub const SOURCE_TYPES: &[&str] = &["PlatformImage", "ManagedImage", "SharedImageVersion"];
/// Customizer types.
pub const CUSTOMIZER_TYPES: &[&str] = &[
    "Shell",
    "PowerShell",
    "File",
    "WindowsRestart",
    "WindowsUpdate",
];
/// Validator types (File from 2022-07-01).
pub const VALIDATOR_TYPES: &[&str] = &["Shell", "PowerShell", "File"];
/// Distributor types.
pub const DISTRIBUTOR_TYPES: &[&str] = &["ManagedImage", "SharedImage", "VHD"];
/// Versioning schemes.
pub const VERSIONING_SCHEMES: &[&str] = &["Latest", "Source"];

/// The discriminator property of a discriminated kind, and its allowed values.
pub fn discriminator(obj: Obj) -> Option<(&'static str, &'static [&'static str])> {
    match obj {
        Obj::Source => Some(("type", SOURCE_TYPES)),
        Obj::Customizer => Some(("type", CUSTOMIZER_TYPES)),
        Obj::Validator => Some(("type", VALIDATOR_TYPES)),
        Obj::Distributor => Some(("type", DISTRIBUTOR_TYPES)),
        Obj::Versioning => Some(("scheme", VERSIONING_SCHEMES)),
        _ => None,
    }
}

/// The properties of `obj` (for a discriminated kind, of the `variant` given in canonical case;
/// `None` gives only the base properties).
pub fn fields(obj: Obj, variant: Option<&str>) -> Vec<Field> {
    use Ty::{ArmOnly, Bool, Enum, IdentityMap, Int, IntList, List, Str, StrList, StrMap};
    let script = [
        f("scriptUri", Str),
        f("sha256Checksum", Str),
        f("inline", StrList),
    ];
    let elevated = [
        f("runElevated", Bool),
        f("runAsSystem", Bool),
        f("validExitCodes", IntList),
    ];
    let file = [
        f("sourceUri", Str),
        f("sha256Checksum", Str),
        f("destination", Str),
    ];
    let mut v: Vec<Field> = match obj {
        Obj::Root => vec![
            f("type", Str),
            f("apiVersion", Str),
            f("name", Str),
            req("location", Str),
            f("tags", StrMap),
            req("identity", Ty::Obj(Obj::Identity)),
            f("properties", Ty::Obj(Obj::Properties)),
            ro("id"),
            ro("systemData"),
            f("dependsOn", ArmOnly),
            f("comments", ArmOnly),
            f("condition", ArmOnly),
            f("metadata", ArmOnly),
            f("scope", ArmOnly),
        ],
        Obj::Identity => vec![
            f("type", Enum(IDENTITY_TYPES)),
            f("userAssignedIdentities", IdentityMap),
            ro("principalId"),
            ro("tenantId"),
        ],
        Obj::Properties => vec![
            req("source", Ty::Obj(Obj::Source)),
            f("customize", List(Obj::Customizer)),
            since("optimize", Ty::Obj(Obj::Optimize), V2022_07_01),
            since("validate", Ty::Obj(Obj::Validate), V2022_02_14),
            req("distribute", List(Obj::Distributor)),
            since("errorHandling", Ty::Obj(Obj::ErrorHandling), V2023_07_01),
            f("buildTimeoutInMinutes", Int),
            f("vmProfile", Ty::Obj(Obj::VmProfile)),
            since("additionalDataDisks", List(Obj::DataDisk), V2025_10_01),
            since("stagingResourceGroup", Str, V2022_02_14),
            since("autoRun", Ty::Obj(Obj::AutoRun), V2024_02_01),
            since("managedResourceTags", StrMap, V2024_02_01),
            ro("provisioningState"),
            ro("provisioningError"),
            ro("lastRunStatus"),
            ro("exactStagingResourceGroup"),
        ],
        Obj::Source => {
            let mut b = vec![f("type", Str)];
            match variant {
                Some("PlatformImage") => b.extend([
                    f("publisher", Str),
                    f("offer", Str),
                    f("sku", Str),
                    f("version", Str),
                    f("planInfo", Ty::Obj(Obj::PlanInfo)),
                    ro("exactVersion"),
                ]),
                Some("ManagedImage") => b.push(req("imageId", Str)),
                Some("SharedImageVersion") => {
                    b.extend([req("imageVersionId", Str), ro("exactVersion")])
                }
                _ => {}
            }
            b
        }
        Obj::PlanInfo => vec![
            req("planName", Str),
            req("planProduct", Str),
            req("planPublisher", Str),
        ],
        Obj::Customizer => {
            let mut b = vec![f("type", Str), f("name", Str)];
            match variant {
                Some("Shell") => b.extend(script),
                Some("PowerShell") => {
                    b.extend(script);
                    b.extend(elevated);
                }
                Some("File") => b.extend(file),
                Some("WindowsRestart") => b.extend([
                    f("restartCommand", Str),
                    f("restartCheckCommand", Str),
                    f("restartTimeout", Str),
                ]),
                Some("WindowsUpdate") => b.extend([
                    f("searchCriteria", Str),
                    f("filters", StrList),
                    f("updateLimit", Int),
                ]),
                _ => {}
            }
            b
        }
        Obj::Validate => vec![
            f("continueDistributeOnFailure", Bool),
            f("sourceValidationOnly", Bool),
            f("inVMValidations", List(Obj::Validator)),
        ],
        Obj::Validator => {
            let mut b = vec![f("type", Str), f("name", Str)];
            match variant {
                Some("Shell") => b.extend(script),
                Some("PowerShell") => {
                    b.extend(script);
                    b.extend(elevated);
                }
                Some("File") => b.extend(file),
                _ => {}
            }
            b
        }
        Obj::Distributor => {
            let mut b = vec![
                f("type", Str),
                req("runOutputName", Str),
                f("artifactTags", StrMap),
            ];
            match variant {
                Some("ManagedImage") => b.extend([req("imageId", Str), req("location", Str)]),
                Some("SharedImage") => b.extend([
                    f("galleryImageId", Str),
                    f("replicationRegions", StrList),
                    f("excludeFromLatest", Bool),
                    f("storageAccountType", Enum(STORAGE_TYPES)),
                    since("targetRegions", List(Obj::TargetRegion), V2022_07_01),
                    since("versioning", Ty::Obj(Obj::Versioning), V2022_07_01),
                    since("replicationMode", Enum(REPLICATION_MODES), V2025_10_01),
                ]),
                Some("VHD") => b.push(since("uri", Str, V2022_07_01)),
                _ => {}
            }
            b
        }
        Obj::TargetRegion => vec![
            req("name", Str),
            f("replicaCount", Int),
            f("storageAccountType", Enum(STORAGE_TYPES)),
        ],
        Obj::Versioning => {
            let mut b = vec![f("scheme", Str)];
            if variant == Some("Latest") {
                b.push(f("major", Int));
            }
            b
        }
        Obj::VmProfile => vec![
            f("vmSize", Str),
            f("osDiskSizeGB", Int),
            since("userAssignedIdentities", StrList, V2021_10_01),
            f("vnetConfig", Ty::Obj(Obj::VnetConfig)),
        ],
        Obj::VnetConfig => vec![
            f("subnetId", Str),
            since("proxyVmSize", Str, V2021_10_01),
            since("containerInstanceSubnetId", Str, V2024_02_01),
        ],
        Obj::ErrorHandling => vec![
            f("onCustomizerError", Enum(ON_ERROR)),
            f("onValidationError", Enum(ON_ERROR)),
        ],
        Obj::Optimize => vec![
            f("vmBoot", Ty::Obj(Obj::VmBoot)),
            since("workload", Ty::Obj(Obj::Workload), V2025_10_01),
        ],
        Obj::VmBoot => vec![f("state", Enum(STATES))],
        Obj::Workload => vec![
            f("state", Enum(STATES)),
            f("scriptUri", Str),
            f("sha256Checksum", Str),
        ],
        Obj::DataDisk => vec![f("sizeGB", Int)],
        Obj::AutoRun => vec![f("state", Enum(STATES))],
        Obj::ReadOnly => vec![],
    };
    // The File validator and all its properties exist from 2022-07-01 only.
    if obj == Obj::Validator && variant == Some("File") {
        for fl in v.iter_mut() {
            fl.since = fl.since.max(V2022_07_01);
        }
    }
    v
}

/// Legacy (preview-era) property names, with the GA shape to use instead.
pub fn legacy_field(obj: Obj, name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    match (obj, n.as_str()) {
        (Obj::VnetConfig, "name" | "subnetname" | "resourcegroupname") => Some(
            "vnetConfig.name/subnetName/resourceGroupName were preview fields; GA templates give the subnet's full resource ID in vnetConfig.subnetId",
        ),
        (Obj::Customizer | Obj::Validator, "script") => {
            Some("`script` was a preview field; GA templates use `scriptUri` (a URL to the script) or `inline` (an array of lines)")
        }
        (Obj::Source, "sourceuri") => Some("the ISO source's sourceURI was preview-only; GA sources are PlatformImage, ManagedImage or SharedImageVersion"),
        _ => None,
    }
}

/// Legacy (preview-era) discriminator values, with the GA replacement.
pub fn legacy_variant(obj: Obj, value: &str) -> Option<&'static str> {
    match (obj, value.to_ascii_lowercase().as_str()) {
        (Obj::Source, "iso") => Some(
            "the ISO source (RHEL ISO images) was removed before GA; use a PlatformImage (e.g. publisher RedHat, offer RHEL) or your own ManagedImage/SharedImageVersion",
        ),
        (Obj::Source, "platformimagesource" | "managedimagesource") => Some("use PlatformImage, ManagedImage or SharedImageVersion"),
        _ => None,
    }
}
