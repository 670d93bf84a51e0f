//! [`QemuImg`]: the [`ImageTool`] that runs the real `qemu-img`.
//!
//! Commands are argv vectors handed to [`std::process::Command`], never a shell. Paths are made
//! safe for qemu's filename parser: a relative path gets a `./` prefix, so a name such as
//! `nbd:x` or `json:{...}` is never taken for a protocol, and backing files are recorded as
//! absolute paths (qemu resolves a relative backing path against the overlay's directory, not
//! the working directory).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use serde::Deserialize;

use crate::error::ImageError;
use crate::format::DiskFormat;
use crate::size::SECTOR;
use crate::tool::{CheckReport, ConvertRequest, ConvertTarget, ImageInfo, ImageTool};

/// qemu-img's exit status when a format has no consistency check (raw, vpc).
const CHECK_UNSUPPORTED: i32 = 63;

/// Runs the real `qemu-img`.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
}

impl Default for QemuImg {
    fn default() -> QemuImg {
        QemuImg::new()
    }
}

impl QemuImg {
    /// `qemu-img` found on `PATH`.
    pub fn new() -> QemuImg {
        QemuImg::with_program("qemu-img")
    }

    /// A specific qemu-img binary.
    pub fn with_program(program: impl Into<PathBuf>) -> QemuImg {
        QemuImg {
            program: program.into(),
        }
    }

    /// The program this runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The first line of `qemu-img --version`, e.g. `qemu-img version 10.0.2 (...)`. A cheap way
    /// to find out early whether qemu-img is installed.
    pub fn version(&self) -> Result<String, ImageError> {
        let out = self.run("--version", &self.program, vec!["--version".into()])?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    fn command(&self, args: &[OsString]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(args).env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    fn spawn_error(&self, path: &Path, source: io::Error) -> ImageError {
        if source.kind() == io::ErrorKind::NotFound {
            ImageError::QemuImgNotFound {
                program: self.program.clone(),
            }
        } else {
            ImageError::Spawn {
                program: self.program.clone(),
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// Run to completion; stdout on success, [`ImageError::Failed`] with stderr otherwise.
    fn run(
        &self,
        op: &'static str,
        path: &Path,
        args: Vec<OsString>,
    ) -> Result<Vec<u8>, ImageError> {
        let out = self
            .command(&args)
            .output()
            .map_err(|e| self.spawn_error(path, e))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(failed(op, path, out.status, &out.stderr))
        }
    }
}

fn failed(op: &'static str, path: &Path, status: ExitStatus, stderr: &[u8]) -> ImageError {
    ImageError::Failed {
        op,
        path: path.to_path_buf(),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_string(),
    }
}

/// `path` as an argument qemu's filename parser takes literally.
pub(crate) fn path_arg(path: &Path) -> OsString {
    if path.is_absolute() {
        path.as_os_str().to_os_string()
    } else {
        let mut s = OsString::from("./");
        s.push(path.as_os_str());
        s
    }
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// argv for `qemu-img info`.
pub(crate) fn info_args(path: &Path, format: Option<DiskFormat>) -> Vec<OsString> {
    // -U (force-share): info only reads headers, so it must work on an image a VM holds open.
    let mut args = vec![os("info"), os("--output=json"), os("-U")];
    if let Some(f) = format {
        args.extend([os("-f"), os(f.qemu_name())]);
    }
    args.push(path_arg(path));
    args
}

/// argv for creating a qcow2 overlay; `backing` must already be absolute.
pub(crate) fn overlay_args(
    backing: &Path,
    backing_format: DiskFormat,
    overlay: &Path,
    size: Option<u64>,
) -> Vec<OsString> {
    let mut args = vec![
        os("create"),
        os("-q"),
        os("-f"),
        os("qcow2"),
        os("-b"),
        path_arg(backing),
        os("-F"),
        os(backing_format.qemu_name()),
        path_arg(overlay),
    ];
    if let Some(size) = size {
        args.push(os(size.to_string()));
    }
    args
}

/// argv for `qemu-img resize`.
pub(crate) fn resize_args(path: &Path, format: DiskFormat, new_size: u64) -> Vec<OsString> {
    vec![
        os("resize"),
        os("-q"),
        os("-f"),
        os(format.qemu_name()),
        path_arg(path),
        os(new_size.to_string()),
    ]
}

/// argv for `qemu-img convert` with progress output (`-p`).
pub(crate) fn convert_args(req: &ConvertRequest) -> Vec<OsString> {
    let mut args = vec![
        os("convert"),
        os("-p"),
        os("-f"),
        os(req.source_format.qemu_name()),
        os("-O"),
        os(req.target.format().qemu_name()),
    ];
    if req.target == ConvertTarget::FixedVhd {
        args.extend([os("-o"), os("subformat=fixed,force_size=on")]);
    }
    args.extend([path_arg(&req.source), path_arg(&req.dest)]);
    args
}

/// argv for `qemu-img check`.
pub(crate) fn check_args(path: &Path, format: DiskFormat) -> Vec<OsString> {
    vec![
        os("check"),
        os("--output=json"),
        os("-f"),
        os(format.qemu_name()),
        path_arg(path),
    ]
}

/// One `-p` progress item, `    (12.34/100%)`, as a fraction.
pub(crate) fn parse_progress(item: &str) -> Option<f64> {
    let pct: f64 = item
        .trim()
        .strip_prefix('(')?
        .strip_suffix("/100%)")?
        .parse()
        .ok()?;
    pct.is_finite().then(|| (pct / 100.0).clamp(0.0, 1.0))
}

#[derive(Deserialize)]
struct InfoJson {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_filename_format: Option<String>,
}

/// Parse `qemu-img info --output=json`.
pub(crate) fn parse_info(json: &[u8], path: &Path) -> Result<ImageInfo, ImageError> {
    let raw: InfoJson = serde_json::from_slice(json).map_err(|source| ImageError::Parse {
        op: "info",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_file: raw
            .full_backing_filename
            .or(raw.backing_filename)
            .map(PathBuf::from),
        backing_format: raw.backing_filename_format,
    })
}

#[derive(Deserialize)]
struct CheckJson {
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
    #[serde(default, rename = "check-errors")]
    check_errors: u64,
    #[serde(rename = "image-end-offset")]
    image_end_offset: Option<u64>,
}

fn check_aligned(path: &Path, size: u64) -> Result<(), ImageError> {
    if size % SECTOR == 0 {
        Ok(())
    } else {
        Err(ImageError::UnalignedSize {
            path: path.to_path_buf(),
            size,
        })
    }
}

fn refuse_existing(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(ImageError::DestinationExists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl ImageTool for QemuImg {
    fn info(&self, path: &Path, format: Option<DiskFormat>) -> Result<ImageInfo, ImageError> {
        let out = self.run("info", path, info_args(path, format))?;
        parse_info(&out, path)
    }

    fn create_overlay(
        &self,
        backing: &Path,
        backing_format: DiskFormat,
        overlay: &Path,
        size: Option<u64>,
    ) -> Result<(), ImageError> {
        if overlay == backing {
            return Err(ImageError::OverlayIsBacking {
                path: overlay.to_path_buf(),
            });
        }
        if let Some(size) = size {
            check_aligned(overlay, size)?;
        }
        refuse_existing(overlay)?;
        let backing_abs = fs::canonicalize(backing).map_err(|source| ImageError::Io {
            path: backing.to_path_buf(),
            source,
        })?;
        self.run(
            "create",
            overlay,
            overlay_args(&backing_abs, backing_format, overlay, size),
        )?;
        Ok(())
    }

    fn resize(&self, path: &Path, format: DiskFormat, new_size: u64) -> Result<(), ImageError> {
        check_aligned(path, new_size)?;
        let current = self.info(path, Some(format))?.virtual_size;
        if new_size < current {
            return Err(ImageError::Shrink {
                path: path.to_path_buf(),
                current,
                requested: new_size,
            });
        }
        if new_size == current {
            return Ok(());
        }
        self.run("resize", path, resize_args(path, format, new_size))?;
        Ok(())
    }

    fn convert(
        &self,
        request: &ConvertRequest,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ImageError> {
        refuse_existing(&request.dest)?;
        let mut child = self
            .command(&convert_args(request))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(&request.source, e))?;
        // From here on qemu-img may have created the destination: remove it unless we succeed.
        let mut partial = crate::fsutil::RemoveOnDrop::new(request.dest.clone());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut last = -1.0;
        let (stderr_text, wait) = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut e) = stderr {
                    let _ = e.read_to_end(&mut buf);
                }
                buf
            });
            if let Some(out) = stdout {
                last = read_progress(out, progress);
            }
            let wait = child.wait();
            (reader.join().unwrap_or_default(), wait)
        });
        let status = wait.map_err(|e| self.spawn_error(&request.source, e))?;
        if !status.success() {
            return Err(failed("convert", &request.source, status, &stderr_text));
        }
        partial.disarm();
        if last < 1.0 {
            progress(1.0);
        }
        Ok(())
    }

    fn check(&self, path: &Path, format: DiskFormat) -> Result<CheckReport, ImageError> {
        let out = self
            .command(&check_args(path, format))
            .output()
            .map_err(|e| self.spawn_error(path, e))?;
        match out.status.code() {
            // 0: clean, 2: corruptions, 3: leaks; all print the JSON report.
            Some(0) | Some(2) | Some(3) => {
                let raw: CheckJson =
                    serde_json::from_slice(&out.stdout).map_err(|source| ImageError::Parse {
                        op: "check",
                        path: path.to_path_buf(),
                        source,
                    })?;
                Ok(CheckReport {
                    corruptions: raw.corruptions,
                    leaks: raw.leaks,
                    check_errors: raw.check_errors,
                    image_end_offset: raw.image_end_offset,
                })
            }
            Some(CHECK_UNSUPPORTED) => Err(ImageError::CheckUnsupported {
                path: path.to_path_buf(),
                format,
            }),
            _ => Err(failed("check", path, out.status, &out.stderr)),
        }
    }
}

/// Read qemu-img's `-p` stream (items separated by `\r` or `\n`) and report rising fractions;
/// returns the last one reported (-1 if none).
fn read_progress(mut out: impl Read, progress: &mut dyn FnMut(f64)) -> f64 {
    let mut last = -1.0_f64;
    let mut item = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(f) = parse_progress(&String::from_utf8_lossy(&item)) {
                    if f > last {
                        last = f;
                        progress(f);
                    }
                }
                item.clear();
            } else if item.len() < 64 {
                item.push(b);
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn info_argv_passes_format_and_force_share() {
        assert_eq!(
            argv(info_args(Path::new("/d/a.vhd"), Some(DiskFormat::Vpc))),
            ["info", "--output=json", "-U", "-f", "vpc", "/d/a.vhd"]
        );
        assert_eq!(
            argv(info_args(Path::new("a.qcow2"), None)),
            ["info", "--output=json", "-U", "./a.qcow2"]
        );
    }

    #[test]
    fn relative_paths_never_look_like_protocols() {
        assert_eq!(
            path_arg(Path::new("nbd:evil")),
            OsString::from("./nbd:evil")
        );
        assert_eq!(path_arg(Path::new("json:{}")), OsString::from("./json:{}"));
        assert_eq!(path_arg(Path::new("-x")), OsString::from("./-x"));
        assert_eq!(path_arg(Path::new("/abs/p")), OsString::from("/abs/p"));
    }

    #[test]
    fn overlay_argv_has_explicit_backing_format() {
        assert_eq!(
            argv(overlay_args(
                Path::new("/src/base.raw"),
                DiskFormat::Raw,
                Path::new("/w/ov.qcow2"),
                Some(11 << 20)
            )),
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "/src/base.raw",
                "-F",
                "raw",
                "/w/ov.qcow2",
                "11534336"
            ]
        );
        assert_eq!(
            argv(overlay_args(
                Path::new("/b"),
                DiskFormat::Qcow2,
                Path::new("/o"),
                None
            ))
            .len(),
            9
        );
    }

    #[test]
    fn convert_argv_for_fixed_vhd_forces_size() {
        let req = ConvertRequest {
            source: "/w/disk.qcow2".into(),
            source_format: DiskFormat::Qcow2,
            dest: "/out/x.vhd".into(),
            target: ConvertTarget::FixedVhd,
        };
        assert_eq!(
            argv(convert_args(&req)),
            [
                "convert",
                "-p",
                "-f",
                "qcow2",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
                "/w/disk.qcow2",
                "/out/x.vhd"
            ]
        );
        let req = ConvertRequest {
            target: ConvertTarget::Qcow2,
            ..req
        };
        assert!(!argv(convert_args(&req)).contains(&"-o".to_string()));
    }

    #[test]
    fn resize_and_check_argv() {
        assert_eq!(
            argv(resize_args(Path::new("/a"), DiskFormat::Qcow2, 1024)),
            ["resize", "-q", "-f", "qcow2", "/a", "1024"]
        );
        assert_eq!(
            argv(check_args(Path::new("/a"), DiskFormat::Qcow2)),
            ["check", "--output=json", "-f", "qcow2", "/a"]
        );
    }

    #[test]
    fn parses_progress_items() {
        assert_eq!(parse_progress("    (0.00/100%)"), Some(0.0));
        assert_eq!(parse_progress("    (45.50/100%)"), Some(0.455));
        assert_eq!(parse_progress("(100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress("Formatting 'x'"), None);
        assert_eq!(parse_progress("(NaN/100%)"), None);
    }

    #[test]
    fn progress_stream_reports_rising_fractions_only() {
        let stream: &[u8] =
            b"    (0.00/100%)\r    (50.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n";
        let mut seen = Vec::new();
        let last = read_progress(stream, &mut |f| seen.push(f));
        assert_eq!(seen, [0.0, 0.5, 1.0]);
        assert_eq!(last, 1.0);
    }

    #[test]
    fn parses_info_json_of_an_overlay() {
        let json = br#"{"backing-filename-format":"raw","virtual-size":104857600,
            "filename":"ov.qcow2","format":"qcow2","actual-size":200704,
            "full-backing-filename":"/tmp/qx/big.raw","backing-filename":"big.raw"}"#;
        let info = parse_info(json, Path::new("ov.qcow2")).expect("parses");
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.disk_format(), Some(DiskFormat::Qcow2));
        assert_eq!(info.virtual_size, 104_857_600);
        assert_eq!(info.actual_size, Some(200_704));
        assert_eq!(info.backing_file, Some(PathBuf::from("/tmp/qx/big.raw")));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn bad_info_json_names_the_file() {
        let err = parse_info(b"{}", Path::new("/x/y.qcow2")).expect_err("missing fields");
        assert!(err.to_string().contains("/x/y.qcow2"), "{err}");
    }

    #[test]
    fn missing_program_says_how_to_install() {
        let tool = QemuImg::with_program("/nonexistent/qemu-img-kiln-test");
        let err = tool
            .info(Path::new("/tmp/whatever.qcow2"), None)
            .expect_err("no such program");
        assert!(matches!(err, ImageError::QemuImgNotFound { .. }), "{err:?}");
        assert!(
            err.to_string().contains("apt-get install qemu-utils"),
            "{err}"
        );
    }
}
