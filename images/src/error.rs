//! Errors of qemu-img operations.

use std::io;
use std::path::PathBuf;

use crate::format::DiskFormat;
use crate::size::Bytes;

/// A qemu-img operation failed. Every variant names the file it was about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The qemu-img program is not installed (or not where kiln was told to look).
    #[error(
        "qemu-img not found (tried `{}`): install it with `apt-get install qemu-utils` \
         (Debian/Ubuntu) or `dnf install qemu-img` (Fedora/RHEL)",
        program.display()
    )]
    QemuImgNotFound {
        /// The program kiln tried to run.
        program: PathBuf,
    },
    /// qemu-img could not be started for another reason (permissions, resource limits).
    #[error("could not run `{}` for {}: {source}", program.display(), path.display())]
    Spawn {
        /// The program kiln tried to run.
        program: PathBuf,
        /// The image the command was about.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// qemu-img ran and failed.
    #[error("qemu-img {op} failed for {} ({status}): {stderr}", path.display())]
    Failed {
        /// The qemu-img subcommand (`info`, `create`, `convert`, ...).
        op: &'static str,
        /// The image the command was about.
        path: PathBuf,
        /// How it exited, e.g. `exit status: 1`.
        status: String,
        /// What qemu-img wrote on stderr, trimmed.
        stderr: String,
    },
    /// qemu-img's JSON output was not what kiln expects.
    #[error("could not read `qemu-img {op}` output for {}: {source}", path.display())]
    Parse {
        /// The qemu-img subcommand.
        op: &'static str,
        /// The image the command was about.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A resize asked for a smaller disk; kiln only grows disks.
    #[error(
        "refusing to shrink {}: it is {current} and {requested} was asked for; disks only grow",
        path.display(),
        current = Bytes(*current),
        requested = Bytes(*requested)
    )]
    Shrink {
        /// The image.
        path: PathBuf,
        /// Its current virtual size in bytes.
        current: u64,
        /// The requested (smaller) size in bytes.
        requested: u64,
    },
    /// A size that qemu-img would round or reject: sizes must be whole 512-byte sectors.
    #[error("size {} for {} is not a multiple of 512 bytes", Bytes(*size), path.display())]
    UnalignedSize {
        /// The image.
        path: PathBuf,
        /// The size asked for.
        size: u64,
    },
    /// The output file already exists; kiln never lets qemu-img overwrite a file.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    DestinationExists {
        /// The existing file.
        path: PathBuf,
    },
    /// An overlay was asked to be created on top of itself.
    #[error("overlay {} would be its own backing file", path.display())]
    OverlayIsBacking {
        /// The path given for both.
        path: PathBuf,
    },
    /// `qemu-img check` does not support this format (raw and VHD have nothing to check).
    #[error("qemu-img cannot check {} images ({})", format, path.display())]
    CheckUnsupported {
        /// The image.
        path: PathBuf,
        /// Its format.
        format: DiskFormat,
    },
    /// A filesystem operation on an image failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The image tool was asked something it cannot do (the fake reports unknown images so).
    #[error("{}: {message}", path.display())]
    Other {
        /// The image.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl ImageError {
    /// The file the error is about (the program for [`ImageError::QemuImgNotFound`]).
    pub fn path(&self) -> &std::path::Path {
        match self {
            ImageError::QemuImgNotFound { program } => program,
            ImageError::Spawn { path, .. }
            | ImageError::Failed { path, .. }
            | ImageError::Parse { path, .. }
            | ImageError::Shrink { path, .. }
            | ImageError::UnalignedSize { path, .. }
            | ImageError::DestinationExists { path }
            | ImageError::OverlayIsBacking { path }
            | ImageError::CheckUnsupported { path, .. }
            | ImageError::Io { path, .. }
            | ImageError::Other { path, .. } => path,
        }
    }
}
