//! [`FakeImageTool`]: an in-memory [`ImageTool`] for tests of code that uses images, so they run
//! without qemu-img.
//!
//! It keeps a table of images (path → [`ImageInfo`]), records every call, and can be told to
//! fail the next call of an operation. Outputs are real files so callers' filesystem logic is
//! exercised: overlays and qcow2/raw conversions write a small placeholder, and a
//! [`ConvertTarget::FixedVhd`] conversion writes a genuine sparse fixed VHD (data + footer) whose
//! size is the source's exact virtual size, like qemu-img's `force_size=on`.

use std::collections::HashMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::ImageError;
use crate::format::DiskFormat;
use crate::tool::{CheckReport, ConvertRequest, ConvertTarget, ImageInfo, ImageTool};
use crate::vhd::{Footer, FOOTER_LEN};

/// One call made to a [`FakeImageTool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// [`ImageTool::info`].
    Info {
        /// The image.
        path: PathBuf,
        /// The format passed.
        format: Option<DiskFormat>,
    },
    /// [`ImageTool::create_overlay`].
    CreateOverlay {
        /// The backing file.
        backing: PathBuf,
        /// Its format.
        backing_format: DiskFormat,
        /// The overlay.
        overlay: PathBuf,
        /// The size asked for.
        size: Option<u64>,
    },
    /// [`ImageTool::resize`].
    Resize {
        /// The image.
        path: PathBuf,
        /// Its format.
        format: DiskFormat,
        /// The size asked for.
        new_size: u64,
    },
    /// [`ImageTool::convert`].
    Convert(ConvertRequest),
    /// [`ImageTool::check`].
    Check {
        /// The image.
        path: PathBuf,
        /// Its format.
        format: DiskFormat,
    },
}

/// A change applied to the footer bytes of the next fixed VHD the fake writes.
pub type FooterTamper = fn(&mut [u8; FOOTER_LEN]);

#[derive(Default)]
struct State {
    images: HashMap<PathBuf, ImageInfo>,
    calls: Vec<FakeCall>,
    failures: HashMap<&'static str, String>,
    tamper: Option<FooterTamper>,
    next_id: u8,
}

/// An [`ImageTool`] that pretends. See the module documentation.
#[derive(Default)]
pub struct FakeImageTool {
    state: Mutex<State>,
}

const PLACEHOLDER: &[u8] = b"kiln fake image\n";

impl FakeImageTool {
    /// A fake with no images.
    pub fn new() -> FakeImageTool {
        FakeImageTool::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the table usable for the test's assertions.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declare an image at `path` (the file itself is not touched).
    pub fn add_image(&self, path: impl Into<PathBuf>, format: DiskFormat, virtual_size: u64) {
        self.state().images.insert(
            path.into(),
            ImageInfo {
                format: format.qemu_name().to_string(),
                virtual_size,
                actual_size: None,
                backing_file: None,
                backing_format: None,
            },
        );
    }

    /// What the fake knows about `path`.
    pub fn image(&self, path: &Path) -> Option<ImageInfo> {
        self.state().images.get(path).cloned()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.state().calls.clone()
    }

    /// Make the next call of `op` (`info`, `create`, `resize`, `convert`, `check`) fail with
    /// [`ImageError::Failed`] carrying `stderr`.
    pub fn fail_next(&self, op: &'static str, stderr: impl Into<String>) {
        self.state().failures.insert(op, stderr.into());
    }

    /// Apply `tamper` to the footer of the next fixed VHD written (to test verification).
    pub fn tamper_next_vhd_footer(&self, tamper: FooterTamper) {
        self.state().tamper = Some(tamper);
    }

    fn begin(
        &self,
        op: &'static str,
        path: &Path,
        call: FakeCall,
    ) -> Result<MutexGuard<'_, State>, ImageError> {
        let mut st = self.state();
        st.calls.push(call);
        if let Some(stderr) = st.failures.remove(op) {
            return Err(ImageError::Failed {
                op,
                path: path.to_path_buf(),
                status: "exit status: 1".to_string(),
                stderr,
            });
        }
        Ok(st)
    }
}

fn lookup(st: &State, path: &Path) -> Result<ImageInfo, ImageError> {
    st.images
        .get(path)
        .cloned()
        .ok_or_else(|| ImageError::Other {
            path: path.to_path_buf(),
            message: "the fake image tool has no such image".to_string(),
        })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<fs::File, ImageError> {
    let mut f = fs::File::create_new(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ImageError::DestinationExists {
                path: path.to_path_buf(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    f.write_all(bytes).map_err(io_err(path))?;
    Ok(f)
}

impl ImageTool for FakeImageTool {
    fn info(&self, path: &Path, format: Option<DiskFormat>) -> Result<ImageInfo, ImageError> {
        let st = self.begin(
            "info",
            path,
            FakeCall::Info {
                path: path.to_path_buf(),
                format,
            },
        )?;
        lookup(&st, path)
    }

    fn create_overlay(
        &self,
        backing: &Path,
        backing_format: DiskFormat,
        overlay: &Path,
        size: Option<u64>,
    ) -> Result<(), ImageError> {
        let mut st = self.begin(
            "create",
            overlay,
            FakeCall::CreateOverlay {
                backing: backing.to_path_buf(),
                backing_format,
                overlay: overlay.to_path_buf(),
                size,
            },
        )?;
        let base = lookup(&st, backing)?;
        write_new(overlay, PLACEHOLDER)?;
        st.images.insert(
            overlay.to_path_buf(),
            ImageInfo {
                format: "qcow2".to_string(),
                virtual_size: size.unwrap_or(base.virtual_size),
                actual_size: Some(PLACEHOLDER.len() as u64),
                backing_file: Some(backing.to_path_buf()),
                backing_format: Some(backing_format.qemu_name().to_string()),
            },
        );
        Ok(())
    }

    fn resize(&self, path: &Path, format: DiskFormat, new_size: u64) -> Result<(), ImageError> {
        let mut st = self.begin(
            "resize",
            path,
            FakeCall::Resize {
                path: path.to_path_buf(),
                format,
                new_size,
            },
        )?;
        let current = lookup(&st, path)?.virtual_size;
        if new_size % 512 != 0 {
            return Err(ImageError::UnalignedSize {
                path: path.to_path_buf(),
                size: new_size,
            });
        }
        if new_size < current {
            return Err(ImageError::Shrink {
                path: path.to_path_buf(),
                current,
                requested: new_size,
            });
        }
        if let Some(info) = st.images.get_mut(path) {
            info.virtual_size = new_size;
        }
        Ok(())
    }

    fn convert(
        &self,
        request: &ConvertRequest,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ImageError> {
        let mut st = self.begin(
            "convert",
            &request.source,
            FakeCall::Convert(request.clone()),
        )?;
        let source = lookup(&st, &request.source)?;
        let dest = &request.dest;
        progress(0.0);
        if request.target == ConvertTarget::FixedVhd {
            let size = source.virtual_size;
            st.next_id = st.next_id.wrapping_add(1);
            let mut footer =
                Footer::new_fixed(size, [st.next_id.max(1); 16], crate::time::unix_now())
                    .to_bytes();
            if let Some(tamper) = st.tamper.take() {
                tamper(&mut footer);
            }
            let mut f = write_new(dest, &[])?;
            f.set_len(size).map_err(io_err(dest))?;
            f.seek(SeekFrom::Start(size)).map_err(io_err(dest))?;
            f.write_all(&footer).map_err(io_err(dest))?;
        } else {
            write_new(dest, PLACEHOLDER)?;
        }
        progress(0.5);
        st.images.insert(
            dest.clone(),
            ImageInfo {
                format: request.target.format().qemu_name().to_string(),
                virtual_size: source.virtual_size,
                actual_size: None,
                backing_file: None,
                backing_format: None,
            },
        );
        progress(1.0);
        Ok(())
    }

    fn check(&self, path: &Path, format: DiskFormat) -> Result<CheckReport, ImageError> {
        let st = self.begin(
            "check",
            path,
            FakeCall::Check {
                path: path.to_path_buf(),
                format,
            },
        )?;
        lookup(&st, path)?;
        match format {
            DiskFormat::Qcow2 | DiskFormat::Vhdx => Ok(CheckReport::default()),
            DiskFormat::Raw | DiskFormat::Vpc => Err(ImageError::CheckUnsupported {
                path: path.to_path_buf(),
                format,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_follows_the_trait_contract() {
        let fake = FakeImageTool::new();
        let p = Path::new("/nonexistent/a.qcow2");
        fake.add_image(p, DiskFormat::Qcow2, 1 << 20);
        assert_eq!(
            fake.info(p, None).map(|i| i.virtual_size).ok(),
            Some(1 << 20)
        );
        assert!(matches!(
            fake.resize(p, DiskFormat::Qcow2, 512),
            Err(ImageError::Shrink {
                current: 1048576,
                requested: 512,
                ..
            })
        ));
        assert!(matches!(
            fake.resize(p, DiskFormat::Qcow2, (2 << 20) + 1),
            Err(ImageError::UnalignedSize { .. })
        ));
        assert!(fake.resize(p, DiskFormat::Qcow2, 2 << 20).is_ok());
        assert_eq!(fake.image(p).map(|i| i.virtual_size), Some(2 << 20));
        assert!(fake.info(Path::new("/nonexistent/other"), None).is_err());

        fake.fail_next("check", "boom");
        let err = fake.check(p, DiskFormat::Qcow2).expect_err("injected");
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(
            fake.check(p, DiskFormat::Qcow2).is_ok(),
            "failure is one-shot"
        );
        assert!(matches!(
            fake.check(p, DiskFormat::Raw),
            Err(ImageError::CheckUnsupported { .. })
        ));
        assert_eq!(fake.calls().len(), 8);
        assert!(matches!(
            &fake.calls()[0],
            FakeCall::Info { format: None, .. }
        ));
    }
}
