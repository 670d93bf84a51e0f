//! The [`ImageTool`] trait: everything kiln asks of qemu-img, so callers can test with a fake.

use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::format::DiskFormat;

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format qemu-img opened it as (`raw`, `qcow2`, `vpc`, ...). When the format was probed,
    /// a *fixed* VHD reads as `raw`: it has no header, only a footer.
    pub format: String,
    /// The disk size the guest sees, in bytes. qemu rounds raw files up to whole 512-byte
    /// sectors: a 10485767-byte raw file reports 10486272.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when qemu-img knows.
    pub actual_size: Option<u64>,
    /// The backing file, resolved against the image's directory (qemu's
    /// `full-backing-filename`, else `backing-filename`).
    pub backing_file: Option<PathBuf>,
    /// The backing file's format as recorded in the image.
    pub backing_format: Option<String>,
}

impl ImageInfo {
    /// [`ImageInfo::format`] as a [`DiskFormat`], if kiln handles it.
    pub fn disk_format(&self) -> Option<DiskFormat> {
        DiskFormat::from_qemu_name(&self.format)
    }
}

/// The output format of a conversion, with the options kiln always uses for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTarget {
    /// `-O raw`.
    Raw,
    /// `-O qcow2`: a standalone image (backing chains are flattened).
    Qcow2,
    /// `-O vpc -o subformat=fixed,force_size=on`: a fixed VHD whose footer records exactly the
    /// source's virtual size (no CHS rounding). qemu-img does *not* round to a whole MiB; see
    /// [`crate::export`] for the export that does.
    FixedVhd,
}

impl ConvertTarget {
    /// The format of the file produced.
    pub fn format(self) -> DiskFormat {
        match self {
            ConvertTarget::Raw => DiskFormat::Raw,
            ConvertTarget::Qcow2 => DiskFormat::Qcow2,
            ConvertTarget::FixedVhd => DiskFormat::Vpc,
        }
    }
}

/// One `qemu-img convert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertRequest {
    /// The image read. Opened read-only; never modified.
    pub source: PathBuf,
    /// Its format, always given explicitly (probing misreads fixed VHDs as raw).
    pub source_format: DiskFormat,
    /// The file written. Must not exist yet.
    pub dest: PathBuf,
    /// What to write.
    pub target: ConvertTarget,
}

/// What `qemu-img check` found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Corrupted metadata entries: the image is damaged.
    pub corruptions: u64,
    /// Leaked clusters: space is wasted, data is fine.
    pub leaks: u64,
    /// Errors that stopped the check from looking everywhere.
    pub check_errors: u64,
    /// Where the image's data ends in the file, when the format reports it.
    pub image_end_offset: Option<u64>,
}

impl CheckReport {
    /// No corruptions, no leaks, and the check looked everywhere.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// Disk image operations kiln needs. [`crate::QemuImg`] runs the real qemu-img;
/// [`crate::fake::FakeImageTool`] stands in for it in tests. No method starts a VM.
///
/// Formats are passed explicitly wherever qemu-img would otherwise probe: probing reads fixed
/// VHDs as raw and is unsafe for raw images.
pub trait ImageTool: Send + Sync {
    /// Describe `path`. `format: None` lets qemu-img probe it.
    fn info(&self, path: &Path, format: Option<DiskFormat>) -> Result<ImageInfo, ImageError>;

    /// Create a qcow2 overlay at `overlay` backed by `backing` (recorded with an absolute path
    /// and its explicit format, `-F`). `size: None` keeps the backing file's virtual size; a
    /// larger size reads as zeros past the backing file's end. The backing file is never
    /// modified; `overlay` must not exist.
    fn create_overlay(
        &self,
        backing: &Path,
        backing_format: DiskFormat,
        overlay: &Path,
        size: Option<u64>,
    ) -> Result<(), ImageError>;

    /// Grow `path` to `new_size` bytes (a multiple of 512). Equal is a no-op; smaller is
    /// [`ImageError::Shrink`].
    fn resize(&self, path: &Path, format: DiskFormat, new_size: u64) -> Result<(), ImageError>;

    /// Convert an image. `progress` receives the completed fraction, 0.0 to 1.0, as it rises.
    fn convert(
        &self,
        request: &ConvertRequest,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ImageError>;

    /// Check an image's metadata for consistency. Raw and VHD images give
    /// [`ImageError::CheckUnsupported`].
    fn check(&self, path: &Path, format: DiskFormat) -> Result<CheckReport, ImageError>;
}
