//! Export to a fixed VHD, what AIB's VHD distributor produces and Azure accepts.
//!
//! [`export_fixed_vhd`]:
//! 1. reads the source's virtual size (a qcow2 header directly, anything else through
//!    `qemu-img info`) and rounds it **up** to a whole MiB (Azure rejects other
//!    sizes; qemu-img's `force_size=on` keeps the size exactly and does not round);
//! 2. when padding is needed, puts a temporary qcow2 overlay of the rounded size on the source
//!    (the source itself is never resized or written);
//! 3. runs `qemu-img convert -O vpc -o subformat=fixed,force_size=on` into a hidden temporary
//!    file beside the destination (qemu writes it sparse);
//! 4. verifies the footer itself ([`crate::vhd::verify_fixed`]) and that it records exactly the
//!    rounded size, then fsyncs and moves the file into place atomically.
//!
//! Any error removes the temporary overlay and the partial VHD.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::ImageError;
use crate::format::DiskFormat;
use crate::fsutil::{self, RemoveOnDrop};
use crate::size::{round_up_to_mib, Bytes, GIB};
use crate::time::unix_now;
use crate::tool::{ConvertRequest, ConvertTarget, ImageTool};
use crate::vhd::{self, Footer, VhdError};

/// The largest fixed VHD qemu-img writes: 2040 GiB (it refuses 2041 GiB with "Disk size is too
/// large, max size is 2040 GiB").
pub const MAX_FIXED_VHD_SIZE: u64 = 2040 * GIB;

/// How far a footer timestamp may stray from the export's own clock, in seconds.
const TIMESTAMP_SLACK: u64 = 3600;

/// Progress of a long operation, in bytes of the virtual disk, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes done so far (estimated from qemu-img's percentage).
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The virtual size in a qcow2 header: the big-endian `size` field at byte 24, after the magic
/// `QFI\xfb`, the version, the backing file offset and length and the cluster bits (qemu's
/// docs/interop/qcow2.rst, versions 2 and 3). `None` when the file does not start with the
/// magic or is a version this does not know.
pub fn qcow2_virtual_size(path: &Path) -> io::Result<Option<u64>> {
    use std::io::Read;
    let mut head = [0u8; 32];
    let mut f = fs::File::open(path)?;
    match f.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let be32 = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if head[..4] != *b"QFI\xfb" || !matches!(be32(4), 2 | 3) {
        return Ok(None);
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&head[24..32]);
    Ok(Some(u64::from_be_bytes(size)))
}

/// One export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// The disk to export (typically the build's qcow2 overlay). Never modified.
    pub source: PathBuf,
    /// Its format.
    pub source_format: DiskFormat,
    /// Where the VHD goes. Its directory must exist.
    pub dest: PathBuf,
    /// Replace an existing `dest`. When false, an existing file is an error, checked atomically
    /// at the final step too.
    pub overwrite: bool,
}

/// What an export produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The VHD written.
    pub path: PathBuf,
    /// The source's virtual size in bytes.
    pub source_virtual_size: u64,
    /// The VHD's virtual size: the source's rounded up to a whole MiB.
    pub virtual_size: u64,
    /// Whether padding was needed (the source was not a whole number of MiB).
    pub padded: bool,
    /// The file's length: `virtual_size + 512`.
    pub file_len: u64,
    /// Bytes actually allocated on disk (the file is sparse).
    pub allocated_bytes: u64,
    /// The verified footer.
    pub footer: Footer,
    /// How long the export took.
    pub elapsed: Duration,
}

/// An export failed. Partial files have been removed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// qemu-img failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The VHD qemu-img wrote failed kiln's footer verification.
    #[error("exported VHD failed verification: {0}")]
    Vhd(#[from] VhdError),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The destination exists and `overwrite` was not set.
    #[error("{} already exists; pass overwrite to replace it", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// Source and destination are the same file.
    #[error("{} is both the source and the destination of the export", path.display())]
    SameFile {
        /// The file.
        path: PathBuf,
    },
    /// The source has no data.
    #[error("{} has a virtual size of 0 bytes; there is nothing to export", path.display())]
    Empty {
        /// The source.
        path: PathBuf,
    },
    /// The rounded size exceeds what a fixed VHD can hold.
    #[error(
        "{} is {}, which rounds to {}; a fixed VHD holds at most {}",
        path.display(), Bytes(*size), Bytes(*rounded), Bytes(MAX_FIXED_VHD_SIZE)
    )]
    TooLarge {
        /// The source.
        path: PathBuf,
        /// Its virtual size.
        size: u64,
        /// The MiB-rounded size.
        rounded: u64,
    },
    /// The footer is a valid Azure VHD footer but not the one this export asked for.
    #[error("{}: footer {field} is {found}, expected {expected}", path.display())]
    Mismatch {
        /// The VHD.
        path: PathBuf,
        /// The footer field.
        field: &'static str,
        /// What the export asked for.
        expected: String,
        /// What the footer holds.
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn exists(path: &Path) -> Result<bool, ExportError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Export `request.source` to a fixed, whole-MiB, footer-verified VHD at `request.dest`.
/// `progress` sees the conversion advance in bytes of the (rounded) virtual disk.
pub fn export_fixed_vhd(
    tool: &dyn ImageTool,
    request: &ExportRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let started_unix = unix_now();
    let ExportRequest {
        source,
        source_format,
        dest,
        overwrite,
    } = request;

    if exists(dest)? {
        if !overwrite {
            return Err(ExportError::DestinationExists { path: dest.clone() });
        }
        let same = fs::canonicalize(dest).ok() == fs::canonicalize(source).ok();
        if same {
            return Err(ExportError::SameFile { path: dest.clone() });
        }
    }

    let dir = fsutil::parent_dir(dest);
    if !fs::metadata(&dir).map_err(io_err(&dir))?.is_dir() {
        return Err(io_err(&dir)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "the export destination's parent is not a directory",
        )));
    }

    // A qcow2 source (the build's overlay) records its size in its header: reading it here
    // saves a `qemu-img info` process (~10–30 ms, a third of a small export). Anything else, a
    // header we do not recognise or one we cannot read asks qemu-img (whose error then names
    // the problem).
    let header_size = match source_format {
        DiskFormat::Qcow2 => qcow2_virtual_size(source).ok().flatten(),
        _ => None,
    };
    let size = match header_size {
        Some(size) => size,
        None => tool.info(source, Some(*source_format))?.virtual_size,
    };
    if size == 0 {
        return Err(ExportError::Empty {
            path: source.clone(),
        });
    }
    let rounded = match round_up_to_mib(size) {
        Some(r) if r <= MAX_FIXED_VHD_SIZE => r,
        r => {
            return Err(ExportError::TooLarge {
                path: source.clone(),
                size,
                rounded: r.unwrap_or(u64::MAX),
            })
        }
    };
    let padded = rounded != size;

    let tmp = RemoveOnDrop::new(fsutil::temp_sibling(dest, "export"));
    let overlay = if padded {
        let guard = RemoveOnDrop::new(fsutil::temp_sibling(dest, "pad.qcow2"));
        tool.create_overlay(source, *source_format, guard.path(), Some(rounded))?;
        Some(guard)
    } else {
        None
    };
    let convert = ConvertRequest {
        source: overlay
            .as_ref()
            .map_or_else(|| source.clone(), |g| g.path().to_path_buf()),
        source_format: if padded {
            DiskFormat::Qcow2
        } else {
            *source_format
        },
        dest: tmp.path().to_path_buf(),
        target: ConvertTarget::FixedVhd,
    };
    progress(Progress {
        done: 0,
        total: rounded,
    });
    tool.convert(&convert, &mut |fraction| {
        progress(Progress {
            done: ((rounded as f64) * fraction) as u64,
            total: rounded,
        })
    })?;
    drop(overlay);

    let footer = vhd::verify_fixed(tmp.path())?;
    check_expected(tmp.path(), &footer, rounded, started_unix)?;

    fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(io_err(tmp.path()))?;
    publish(tmp, dest, *overwrite)?;
    fsutil::sync_dir(&dir).map_err(io_err(&dir))?;

    let meta = fs::metadata(dest).map_err(io_err(dest))?;
    Ok(ExportReport {
        path: dest.clone(),
        source_virtual_size: size,
        virtual_size: rounded,
        padded,
        file_len: meta.len(),
        allocated_bytes: fsutil::allocated_bytes(&meta),
        footer,
        elapsed: started.elapsed(),
    })
}

/// The footer must describe exactly the disk this export asked for, created during it.
fn check_expected(
    path: &Path,
    footer: &Footer,
    rounded: u64,
    started_unix: u64,
) -> Result<(), ExportError> {
    let mismatch = |field, expected: String, found: String| ExportError::Mismatch {
        path: path.to_path_buf(),
        field,
        expected,
        found,
    };
    if footer.current_size != rounded {
        return Err(mismatch(
            "current size",
            Bytes(rounded).to_string(),
            Bytes(footer.current_size).to_string(),
        ));
    }
    if footer.original_size != rounded {
        return Err(mismatch(
            "original size",
            Bytes(rounded).to_string(),
            Bytes(footer.original_size).to_string(),
        ));
    }
    let ts = footer.timestamp_unix();
    let (lo, hi) = (
        started_unix.saturating_sub(TIMESTAMP_SLACK),
        unix_now() + TIMESTAMP_SLACK,
    );
    if ts < lo || ts > hi {
        return Err(mismatch(
            "timestamp",
            format!(
                "between {} and {}",
                crate::time::rfc3339(lo),
                crate::time::rfc3339(hi)
            ),
            crate::time::rfc3339(ts),
        ));
    }
    Ok(())
}

/// Move the verified temporary file onto `dest`: `rename` when overwriting, otherwise a hard
/// link (which fails atomically if `dest` appeared meanwhile) followed by removing the
/// temporary name.
fn publish(mut tmp: RemoveOnDrop, dest: &Path, overwrite: bool) -> Result<(), ExportError> {
    if !overwrite {
        match fs::hard_link(tmp.path(), dest) {
            Ok(()) => {
                // `tmp` is dropped here and removes the temporary name; dest keeps the data.
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ExportError::DestinationExists {
                    path: dest.to_path_buf(),
                })
            }
            // Filesystems without hard links: fall back to check-then-rename.
            Err(_) => {
                if exists(dest)? {
                    return Err(ExportError::DestinationExists {
                        path: dest.to_path_buf(),
                    });
                }
            }
        }
    }
    fs::rename(tmp.path(), dest).map_err(io_err(dest))?;
    tmp.disarm();
    Ok(())
}
