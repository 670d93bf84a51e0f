//! The local PlatformImage catalog: kiln's stand-in for the Azure Marketplace.
//!
//! Layout under the catalog root (normally `$KILN_HOME/catalog`):
//!
//! ```text
//! <publisher>/<offer>/<sku>/<version>/disk.qcow2   the image, read-only once published
//!                                     meta.json    ImageMeta
//! .staging/                                        imports in progress
//! ```
//!
//! Azure matches publisher, offer and SKU ignoring case, so the directory names are their ASCII
//! lowercase forms and `meta.json` keeps the names exactly as given at import. A version
//! directory is named by the version's numeric form (`22.04.202311010` → `22.4.202311010`), so
//! spellings that Azure's numeric ordering treats as equal land in the same place; `meta.json`
//! keeps the spelling given, which [`Catalog::resolve`] reports as the exact version.
//!
//! Every import converts its disk into a standalone qcow2 (flattening any backing chain, so
//! nothing in the catalog points outside it), writes `meta.json` in a private staging
//! directory, and renames that directory into place. The rename is atomic and refuses a version
//! directory that already exists, so of two concurrent imports of one version exactly one wins
//! and the other gets [`CatalogError::AlreadyExists`].

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ImageError;
use crate::export::Progress;
use crate::format::DiskFormat;
use crate::fsutil::{self, RemoveOnDrop};
use crate::time::{rfc3339, unix_now};
use crate::tool::{ConvertRequest, ConvertTarget, ImageTool};
use crate::vhd;

/// The stored image's file name inside a version directory.
pub const DISK_FILE: &str = "disk.qcow2";
/// The metadata file's name inside a version directory.
pub const META_FILE: &str = "meta.json";
/// The version string that asks for the highest version.
pub const LATEST: &str = "latest";
const STAGING_DIR: &str = ".staging";

/// A Marketplace image version, `Major.Minor.Build`, ordered numerically (`1.0.10 > 1.0.9`).
/// Leading zeros are allowed (`22.04.202311010`) and do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Build.
    pub build: u32,
}

impl fmt::Display for ImageVersion {
    /// The numeric form, without leading zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

impl FromStr for ImageVersion {
    type Err = CatalogError;

    fn from_str(s: &str) -> Result<ImageVersion, CatalogError> {
        let invalid = |reason: &str| CatalogError::InvalidVersion {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        if s.eq_ignore_ascii_case(LATEST) {
            return Err(invalid(
                "`latest` only works for lookups; an image needs a real version",
            ));
        }
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 3 {
            return Err(invalid(
                "expected Major.Minor.Build, three integers such as 1.0.0",
            ));
        }
        let mut nums = [0u32; 3];
        for (n, part) in nums.iter_mut().zip(&parts) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    "each part must be a non-negative integer (digits only)",
                ));
            }
            *n = part
                .parse()
                .map_err(|_| invalid("each part must be at most 4294967295"))?;
        }
        Ok(ImageVersion {
            major: nums[0],
            minor: nums[1],
            build: nums[2],
        })
    }
}

/// The Hyper-V generation an image boots as: V1 BIOS, V2 UEFI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HyperVGeneration {
    /// Generation 1: BIOS boot.
    V1,
    /// Generation 2: UEFI boot.
    V2,
}

/// The operating system family of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsType {
    /// Linux.
    Linux,
    /// Windows.
    Windows,
}

/// A Marketplace purchase plan (AIB's `source.planInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanInfo {
    /// The plan's name.
    pub plan_name: String,
    /// The plan's product.
    pub plan_product: String,
    /// The plan's publisher.
    pub plan_publisher: String,
}

/// How a guest booted from the image can be provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisioningMethod {
    /// A cloud-init NoCloud seed (`cidata` volume).
    NoCloud,
    /// Azure's own path: `ovf-env.xml` and the WireServer (walinuxagent or cloud-init's Azure
    /// datasource).
    Azure,
    /// A Windows `unattend.xml`.
    Unattend,
}

/// `meta.json`: what kiln knows about a catalog image beyond its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMeta {
    /// The publisher as given at import.
    pub publisher: String,
    /// The offer as given at import.
    pub offer: String,
    /// The SKU as given at import.
    pub sku: String,
    /// The version as given at import (reported as AIB's `exactVersion`).
    pub version: String,
    /// The Hyper-V generation.
    pub hyper_v_generation: HyperVGeneration,
    /// The OS family.
    pub os_type: OsType,
    /// The purchase plan, if the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_info: Option<PlanInfo>,
    /// Provisioning methods the image supports, preferred first.
    pub provisioning: Vec<ProvisioningMethod>,
    /// The admin user the image expects, if it has a fixed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_admin_user: Option<String>,
    /// The disk's virtual size in bytes.
    pub virtual_size: u64,
    /// The stored disk's format (always `qcow2`).
    pub disk_format: String,
    /// The format of the file imported.
    pub source_format: String,
    /// The imported file's path, for the record.
    pub source_file: String,
    /// The imported file's SHA-256, lowercase hex, when it was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// When the import finished, RFC 3339 UTC.
    pub created_time: String,
}

/// What to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    /// Publisher, e.g. `Canonical`. ASCII letters, digits, `-`, `_`, `.`; starts with a letter
    /// or digit.
    pub publisher: String,
    /// Offer, e.g. `0001-com-ubuntu-server-jammy`. Same rules.
    pub offer: String,
    /// SKU, e.g. `22_04-lts-gen2`. Same rules.
    pub sku: String,
    /// `Major.Minor.Build`.
    pub version: String,
    /// The Hyper-V generation.
    pub hyper_v_generation: HyperVGeneration,
    /// The OS family.
    pub os_type: OsType,
    /// The disk file: qcow2, raw, VHD (fixed or dynamic) or VHDX. Never modified.
    pub disk: PathBuf,
    /// The disk's format; `None` detects it (qemu-img's probe, plus a footer check because
    /// qemu-img probes fixed VHDs as raw).
    pub disk_format: Option<DiskFormat>,
    /// The purchase plan.
    pub plan_info: Option<PlanInfo>,
    /// Provisioning methods, preferred first.
    pub provisioning: Vec<ProvisioningMethod>,
    /// The admin user the image expects.
    pub default_admin_user: Option<String>,
    /// Hash the source file (a full read) and record it in `meta.json`.
    pub compute_sha256: bool,
}

impl ImportRequest {
    /// A request with defaults: format detected, no plan, no fixed admin user, no hash, and
    /// provisioning `["nocloud", "azure"]` for Linux or `["unattend"]` for Windows.
    pub fn new(
        publisher: impl Into<String>,
        offer: impl Into<String>,
        sku: impl Into<String>,
        version: impl Into<String>,
        hyper_v_generation: HyperVGeneration,
        os_type: OsType,
        disk: impl Into<PathBuf>,
    ) -> ImportRequest {
        ImportRequest {
            publisher: publisher.into(),
            offer: offer.into(),
            sku: sku.into(),
            version: version.into(),
            hyper_v_generation,
            os_type,
            disk: disk.into(),
            disk_format: None,
            plan_info: None,
            provisioning: match os_type {
                OsType::Linux => vec![ProvisioningMethod::NoCloud, ProvisioningMethod::Azure],
                OsType::Windows => vec![ProvisioningMethod::Unattend],
            },
            default_admin_user: None,
            compute_sha256: false,
        }
    }
}

/// One published catalog image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Its `meta.json`.
    pub meta: ImageMeta,
    /// Its version directory.
    pub dir: PathBuf,
    /// Its disk (`dir/disk.qcow2`), qcow2, read-only: use it as an overlay's backing file.
    pub disk: PathBuf,
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image found.
    pub entry: CatalogEntry,
    /// The version asked for (`latest` or a version).
    pub requested_version: String,
    /// The version found, as given at import: AIB's `exactVersion`.
    pub exact_version: String,
}

/// An image's `publisher:offer:sku:version`, as Azure writes a Marketplace image URN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrn {
    /// Publisher.
    pub publisher: String,
    /// Offer.
    pub offer: String,
    /// SKU.
    pub sku: String,
    /// Version (or `latest`).
    pub version: String,
}

impl fmt::Display for ImageUrn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.publisher, self.offer, self.sku, self.version
        )
    }
}

/// A catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A publisher, offer or SKU kiln cannot store.
    #[error("invalid {field} \"{value}\": {reason}")]
    InvalidName {
        /// `publisher`, `offer` or `sku`.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A version that is not `Major.Minor.Build`.
    #[error("invalid image version \"{value}\": {reason}")]
    InvalidVersion {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such image in the catalog.
    #[error(
        "no image {urn} in the catalog at {}{}; import one with\n  \
         kiln image import --publisher {} --offer {} --sku {} --version {suggested} DISK",
        root.display(),
        available_note(available),
        urn.publisher,
        urn.offer,
        urn.sku
    )]
    NotFound {
        /// The image asked for.
        urn: Box<ImageUrn>,
        /// The version to put in the import command (`1.0.0` when `latest` was asked for).
        suggested: String,
        /// The catalog root.
        root: PathBuf,
        /// Versions of this SKU that do exist.
        available: Vec<String>,
    },
    /// The version is already in the catalog.
    #[error(
        "image {urn} already exists in the catalog at {} (as version \"{existing}\"); \
         catalog images are immutable, import a new version instead",
        path.display()
    )]
    AlreadyExists {
        /// The image given.
        urn: Box<ImageUrn>,
        /// The version as stored (may be spelled differently, e.g. `1.00.1` vs `1.0.1`).
        existing: String,
        /// The existing version directory.
        path: PathBuf,
    },
    /// The disk is in a format kiln does not import.
    #[error("{}: disk format \"{format}\" cannot be imported (use qcow2, raw, VHD or VHDX)", path.display())]
    UnsupportedFormat {
        /// The disk.
        path: PathBuf,
        /// What qemu-img called its format.
        format: String,
    },
    /// qemu-img failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A `meta.json` could not be read or written.
    #[error("{}: bad catalog metadata: {source}", path.display())]
    Meta {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

fn available_note(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!(" (this SKU has versions {})", available.join(", "))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check a publisher/offer/SKU: it becomes a directory name.
fn validate_name(field: &'static str, value: &str) -> Result<(), CatalogError> {
    let invalid = |reason| CatalogError::InvalidName {
        field,
        value: value.to_string(),
        reason,
    };
    let first = value
        .bytes()
        .next()
        .ok_or_else(|| invalid("must not be empty"))?;
    if value.len() > 255 {
        return Err(invalid("must be at most 255 characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("must start with an ASCII letter or digit"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "may contain only ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// The kiln catalog of PlatformImage sources, rooted at a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    root: PathBuf,
}

impl Catalog {
    /// A catalog rooted at `root` (created on first import).
    pub fn new(root: impl Into<PathBuf>) -> Catalog {
        Catalog { root: root.into() }
    }

    /// The catalog of a kiln home: `<kiln_home>/catalog`.
    pub fn in_kiln_home(kiln_home: &Path) -> Catalog {
        Catalog::new(kiln_home.join("catalog"))
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sku_dir(&self, publisher: &str, offer: &str, sku: &str) -> PathBuf {
        self.root
            .join(publisher.to_ascii_lowercase())
            .join(offer.to_ascii_lowercase())
            .join(sku.to_ascii_lowercase())
    }

    /// Import a disk as `publisher:offer:sku:version`. The disk is converted to a standalone
    /// qcow2 (the source file is only read); `progress` follows the conversion.
    pub fn import(
        &self,
        tool: &dyn ImageTool,
        request: &ImportRequest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<CatalogEntry, CatalogError> {
        validate_name("publisher", &request.publisher)?;
        validate_name("offer", &request.offer)?;
        validate_name("sku", &request.sku)?;
        let version: ImageVersion = request.version.parse()?;
        let sku_dir = self.sku_dir(&request.publisher, &request.offer, &request.sku);
        let version_dir = sku_dir.join(version.to_string());
        if version_dir.exists() {
            return Err(self.already_exists(request, &version_dir));
        }

        let disk = &request.disk;
        let source_format = match request.disk_format {
            Some(f) => f,
            None => detect_format(tool, disk)?,
        };
        let source_info = tool.info(disk, Some(source_format))?;

        let staging_root = self.root.join(STAGING_DIR);
        fs::create_dir_all(&staging_root).map_err(io_err(&staging_root))?;
        let staging = RemoveOnDrop::new(staging_root.join(fsutil::unique_suffix()));
        fs::create_dir(staging.path()).map_err(io_err(staging.path()))?;
        let stored = staging.path().join(DISK_FILE);

        let total = source_info.virtual_size;
        tool.convert(
            &ConvertRequest {
                source: disk.clone(),
                source_format,
                dest: stored.clone(),
                target: ConvertTarget::Qcow2,
            },
            &mut |f| {
                progress(Progress {
                    done: (total as f64 * f) as u64,
                    total,
                })
            },
        )?;
        let stored_info = tool.info(&stored, Some(DiskFormat::Qcow2))?;
        let source_sha256 = if request.compute_sha256 {
            Some(sha256_file(disk)?)
        } else {
            None
        };
        let meta = ImageMeta {
            publisher: request.publisher.clone(),
            offer: request.offer.clone(),
            sku: request.sku.clone(),
            version: request.version.clone(),
            hyper_v_generation: request.hyper_v_generation,
            os_type: request.os_type,
            plan_info: request.plan_info.clone(),
            provisioning: request.provisioning.clone(),
            default_admin_user: request.default_admin_user.clone(),
            virtual_size: stored_info.virtual_size,
            disk_format: DiskFormat::Qcow2.qemu_name().to_string(),
            source_format: source_format.qemu_name().to_string(),
            source_file: fs::canonicalize(disk)
                .unwrap_or_else(|_| disk.clone())
                .display()
                .to_string(),
            source_sha256,
            created_time: rfc3339(unix_now()),
        };
        let meta_path = staging.path().join(META_FILE);
        write_meta(&meta_path, &meta)?;
        for file in [&stored, &meta_path] {
            let f = fs::File::open(file).map_err(io_err(file))?;
            f.sync_all().map_err(io_err(file))?;
            fs::set_permissions(file, fs::Permissions::from_mode(0o444)).map_err(io_err(file))?;
        }

        self.publish(staging, &sku_dir, &version_dir, request)?;
        Ok(CatalogEntry {
            meta,
            disk: version_dir.join(DISK_FILE),
            dir: version_dir,
        })
    }

    fn publish(
        &self,
        mut staging: RemoveOnDrop,
        sku_dir: &Path,
        version_dir: &Path,
        request: &ImportRequest,
    ) -> Result<(), CatalogError> {
        fs::create_dir_all(sku_dir).map_err(io_err(sku_dir))?;
        match fs::rename(staging.path(), version_dir) {
            Ok(()) => staging.disarm(),
            Err(e) if is_exists_error(&e) => return Err(self.already_exists(request, version_dir)),
            Err(e) => return Err(io_err(version_dir)(e)),
        }
        fsutil::sync_dir(sku_dir).map_err(io_err(sku_dir))
    }

    fn already_exists(&self, request: &ImportRequest, version_dir: &Path) -> CatalogError {
        let existing = read_meta(&version_dir.join(META_FILE))
            .map(|m| m.version)
            .unwrap_or_else(|_| request.version.clone());
        CatalogError::AlreadyExists {
            urn: Box::new(ImageUrn {
                publisher: request.publisher.clone(),
                offer: request.offer.clone(),
                sku: request.sku.clone(),
                version: request.version.clone(),
            }),
            existing,
            path: version_dir.to_path_buf(),
        }
    }

    /// Every published image, sorted by publisher, offer, SKU (ignoring case) and version
    /// (numerically). Imports in progress are not listed.
    pub fn list(&self) -> Result<Vec<CatalogEntry>, CatalogError> {
        let mut entries = Vec::new();
        for publisher in subdirs(&self.root)? {
            for offer in subdirs(&publisher)? {
                for sku in subdirs(&offer)? {
                    for version in subdirs(&sku)? {
                        entries.push(load_entry(&version)?);
                    }
                }
            }
        }
        entries.sort_by_key(sort_key);
        Ok(entries)
    }

    /// Find `publisher:offer:sku:version`, ignoring ASCII case in the names. `version` is a
    /// `Major.Minor.Build` or `latest` (any case), which picks the numerically highest version.
    pub fn resolve(
        &self,
        publisher: &str,
        offer: &str,
        sku: &str,
        version: &str,
    ) -> Result<ResolvedImage, CatalogError> {
        validate_name("publisher", publisher)?;
        validate_name("offer", offer)?;
        validate_name("sku", sku)?;
        let sku_dir = self.sku_dir(publisher, offer, sku);
        let versions = versions_in(&sku_dir)?;
        let wanted = if version.eq_ignore_ascii_case(LATEST) {
            versions.last().copied()
        } else {
            let v: ImageVersion = version.parse()?;
            versions.contains(&v).then_some(v)
        };
        let Some(found) = wanted else {
            return Err(CatalogError::NotFound {
                urn: Box::new(ImageUrn {
                    publisher: publisher.to_string(),
                    offer: offer.to_string(),
                    sku: sku.to_string(),
                    version: version.to_string(),
                }),
                suggested: if version.eq_ignore_ascii_case(LATEST) {
                    "1.0.0".to_string()
                } else {
                    version.to_string()
                },
                root: self.root.clone(),
                available: versions.iter().map(ToString::to_string).collect(),
            });
        };
        let entry = load_entry(&sku_dir.join(found.to_string()))?;
        Ok(ResolvedImage {
            exact_version: entry.meta.version.clone(),
            requested_version: version.to_string(),
            entry,
        })
    }
}

fn sort_key(e: &CatalogEntry) -> (String, String, String, Option<ImageVersion>) {
    (
        e.meta.publisher.to_ascii_lowercase(),
        e.meta.offer.to_ascii_lowercase(),
        e.meta.sku.to_ascii_lowercase(),
        e.meta.version.parse().ok(),
    )
}

fn is_exists_error(e: &io::Error) -> bool {
    // rename(2) onto a non-empty directory: ENOTEMPTY (39) on Linux, EEXIST (17) elsewhere.
    e.kind() == io::ErrorKind::AlreadyExists || matches!(e.raw_os_error(), Some(17) | Some(39))
}

/// Visible subdirectories of `dir` (none if `dir` does not exist), sorted by name.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let is_dir = entry.file_type().map_err(io_err(&entry.path()))?.is_dir();
        if is_dir && !hidden {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The versions published under a SKU directory, ascending.
fn versions_in(sku_dir: &Path) -> Result<Vec<ImageVersion>, CatalogError> {
    let mut versions: Vec<ImageVersion> = subdirs(sku_dir)?
        .iter()
        .filter_map(|d| d.file_name()?.to_str()?.parse().ok())
        .collect();
    versions.sort();
    Ok(versions)
}

fn load_entry(dir: &Path) -> Result<CatalogEntry, CatalogError> {
    let meta = read_meta(&dir.join(META_FILE))?;
    Ok(CatalogEntry {
        meta,
        dir: dir.to_path_buf(),
        disk: dir.join(DISK_FILE),
    })
}

fn read_meta(path: &Path) -> Result<ImageMeta, CatalogError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| CatalogError::Meta {
        path: path.to_path_buf(),
        source,
    })
}

fn write_meta(path: &Path, meta: &ImageMeta) -> Result<(), CatalogError> {
    let mut json = serde_json::to_vec_pretty(meta).map_err(|source| CatalogError::Meta {
        path: path.to_path_buf(),
        source,
    })?;
    json.push(b'\n');
    let mut f = fs::File::create_new(path).map_err(io_err(path))?;
    f.write_all(&json).map_err(io_err(path))
}

/// Work out a disk's format: qemu-img's probe, corrected for fixed VHDs (probed as raw).
fn detect_format(tool: &dyn ImageTool, disk: &Path) -> Result<DiskFormat, CatalogError> {
    let probed = tool.info(disk, None)?;
    match probed.disk_format() {
        Some(DiskFormat::Raw) if vhd::has_vhd_cookie(disk).map_err(io_err(disk))? => {
            Ok(DiskFormat::Vpc)
        }
        Some(f) => Ok(f),
        None => Err(CatalogError::UnsupportedFormat {
            path: disk.to_path_buf(),
            format: probed.format,
        }),
    }
}

/// SHA-256 of a file, lowercase hex.
fn sha256_file(path: &Path) -> Result<String, CatalogError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ImageVersion {
        s.parse().expect("valid version")
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(v("1.0.10") > v("1.0.9"));
        assert!(v("1.2.0") > v("1.0.10"));
        assert!(v("10.0.0") > v("9.99.99"));
        assert_eq!(v("22.04.202311010"), v("22.4.202311010"));
        assert_eq!(v("22.04.202311010").to_string(), "22.4.202311010");
        let mut all = vec![v("1.0.10"), v("1.2.0"), v("1.0.9")];
        all.sort();
        assert_eq!(all, [v("1.0.9"), v("1.0.10"), v("1.2.0")]);
    }

    #[test]
    fn bad_versions_are_rejected_with_reasons() {
        for bad in [
            "",
            "1",
            "1.0",
            "1.0.0.0",
            "1.a.0",
            "1..0",
            "-1.0.0",
            "+1.0.0",
            "1.0. 1",
            "latest",
            "4294967296.0.0",
        ] {
            let err = bad.parse::<ImageVersion>().expect_err(bad);
            assert!(
                matches!(err, CatalogError::InvalidVersion { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(&format!("\"{bad}\"")), "{err}");
        }
    }

    #[test]
    fn names_must_be_safe_directory_names() {
        for ok in [
            "Canonical",
            "0001-com-ubuntu-server-jammy",
            "22_04-lts-gen2",
            "a.b",
        ] {
            validate_name("sku", ok).expect(ok);
        }
        for bad in ["", ".", "..", "../x", "a/b", "-x", "a b", "é", "a\0b"] {
            assert!(validate_name("sku", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn meta_json_uses_aib_casing() {
        let meta = ImageMeta {
            publisher: "Canonical".into(),
            offer: "UbuntuServer".into(),
            sku: "22_04-lts".into(),
            version: "1.0.0".into(),
            hyper_v_generation: HyperVGeneration::V2,
            os_type: OsType::Linux,
            plan_info: Some(PlanInfo {
                plan_name: "n".into(),
                plan_product: "p".into(),
                plan_publisher: "q".into(),
            }),
            provisioning: vec![ProvisioningMethod::NoCloud, ProvisioningMethod::Azure],
            default_admin_user: Some("azureuser".into()),
            virtual_size: 1 << 20,
            disk_format: "qcow2".into(),
            source_format: "raw".into(),
            source_file: "/x/disk.raw".into(),
            source_sha256: None,
            created_time: "2026-11-28T00:00:00Z".into(),
        };
        let json = serde_json::to_value(&meta).expect("serializes");
        assert_eq!(json["hyperVGeneration"], "V2");
        assert_eq!(json["osType"], "Linux");
        assert_eq!(json["planInfo"]["planName"], "n");
        assert_eq!(
            json["provisioning"],
            serde_json::json!(["nocloud", "azure"])
        );
        assert_eq!(json["defaultAdminUser"], "azureuser");
        assert!(json.get("sourceSha256").is_none());
        let back: ImageMeta = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, meta);
    }

    #[test]
    fn not_found_message_shows_the_import_command() {
        let err = CatalogError::NotFound {
            urn: Box::new(ImageUrn {
                publisher: "Canonical".into(),
                offer: "UbuntuServer".into(),
                sku: "22_04-lts".into(),
                version: "latest".into(),
            }),
            suggested: "1.0.0".into(),
            root: "/k/catalog".into(),
            available: vec![],
        };
        assert_eq!(
            err.to_string(),
            "no image Canonical:UbuntuServer:22_04-lts:latest in the catalog at /k/catalog; import one with\n  \
             kiln image import --publisher Canonical --offer UbuntuServer --sku 22_04-lts --version 1.0.0 DISK"
        );
    }
}
