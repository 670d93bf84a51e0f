//! `kiln __bench …` (hidden): runs one of kiln's own code paths on its own so that
//! `cargo xtask bench` can time it beside its baseline (docs/bench.md). Each prints one JSON
//! object on stdout with the time measured inside the process (no process start-up).
//!
//! Not a user interface: the names and the output may change with the benchmark.

use super::output::{EXIT_INVALID, EXIT_OK};
use kiln_agents::{Communicator, ConnectConfig, SshCommunicator};
use kiln_engine::build::fetch::{self, FetchContext, FetchRequest};
use kiln_images::export::{export_fixed_vhd, ExportRequest};
use kiln_images::{DiskFormat, ImageTool, QemuImg};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `kiln __bench …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The artifact fetch of a local file (read, SHA-256, copy, fsync), as for a scriptUri;
    /// and, separately, SHA-256 alone over the same 64 KiB reads.
    Sha256 {
        /// The file to hash.
        file: PathBuf,
        /// Where the fetch copies it (a scratch directory, emptied afterwards).
        #[arg(long)]
        scratch: PathBuf,
    },
    /// Source preparation: the qcow2 overlay `Prepare disk` creates on a qcow2 source.
    Prepare {
        /// The source disk (qcow2).
        source: PathBuf,
        /// The overlay to create.
        overlay: PathBuf,
    },
    /// The VHD export of a qcow2 disk (`export_fixed_vhd`).
    Export {
        /// The disk (qcow2).
        source: PathBuf,
        /// The fixed VHD to write.
        dest: PathBuf,
    },
    /// Upload `--bytes` bytes through kiln's SSH communicator (one session, as in a build).
    Upload {
        /// The guest's sshd, e.g. 127.0.0.1:2222.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// The user.
        #[arg(long)]
        user: String,
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
        /// How many bytes.
        #[arg(long)]
        bytes: u64,
        /// The file in the guest.
        #[arg(long)]
        dest: String,
    },
}

/// Runs it; prints the JSON result or the error.
pub fn run(c: Command) -> u8 {
    match run_inner(c) {
        Ok(v) => {
            println!("{v}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("kiln __bench: {e}");
            EXIT_INVALID
        }
    }
}

fn run_inner(c: Command) -> Result<serde_json::Value, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match c {
        Command::Sha256 { file, scratch } => {
            std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
            let ctx = FetchContext {
                template_dir: scratch.clone(),
                dest_dir: scratch.clone(),
                timeout: Duration::from_secs(60),
                max_bytes: u64::MAX,
            };
            let req = FetchRequest {
                uri: file.display().to_string(),
                expected_sha256: None,
                label: "bench".into(),
            };
            let t = Instant::now();
            let f = rt
                .block_on(fetch::fetch(&req, &ctx))
                .map_err(|e| e.to_string())?;
            let fetch_s = t.elapsed().as_secs_f64();
            let _ = std::fs::remove_file(&f.path);
            // SHA-256 alone, same crate and read size as the fetch.
            let t = Instant::now();
            let hash = hash_only(&file)?;
            let hash_s = t.elapsed().as_secs_f64();
            if hash != f.sha256 {
                return Err(format!(
                    "hash mismatch between the fetch ({}) and the plain hash ({hash})",
                    f.sha256
                ));
            }
            Ok(
                json!({"bytes": f.size, "sha256": f.sha256, "fetchSeconds": fetch_s, "hashSeconds": hash_s}),
            )
        }
        Command::Prepare { source, overlay } => {
            let tool = QemuImg::new();
            let t = Instant::now();
            tool.create_overlay(&source, DiskFormat::Qcow2, &overlay, None)
                .map_err(|e| e.to_string())?;
            Ok(json!({"seconds": t.elapsed().as_secs_f64()}))
        }
        Command::Export { source, dest } => {
            let tool = QemuImg::new();
            let req = ExportRequest {
                source,
                source_format: DiskFormat::Qcow2,
                dest,
                overwrite: true,
            };
            let r = export_fixed_vhd(&tool, &req, &mut |_| {}).map_err(|e| e.to_string())?;
            Ok(
                json!({"seconds": r.elapsed.as_secs_f64(), "fileLen": r.file_len, "allocatedBytes": r.allocated_bytes, "virtualSize": r.virtual_size}),
            )
        }
        Command::Upload {
            addr,
            user,
            key,
            bytes,
            dest,
        } => rt.block_on(async move {
            let key = kiln_agents::load_private_key(&key).map_err(|e| e.to_string())?;
            let mut config = ConnectConfig::new(addr, user, key);
            config.timeout = Duration::from_secs(120);
            let t = Instant::now();
            let guest = SshCommunicator::connect(config, std::future::pending())
                .await
                .map_err(|e| e.to_string())?;
            let connect_s = t.elapsed().as_secs_f64();
            let mut reader = Pattern { left: bytes };
            let t = Instant::now();
            let up = guest
                .upload(&mut reader, bytes, &dest, 0o644)
                .await
                .map_err(|e| e.to_string())?;
            let upload_s = t.elapsed().as_secs_f64();
            let _ = guest.close().await;
            Ok(json!({"bytes": up.bytes, "connectSeconds": connect_s, "uploadSeconds": upload_s}))
        }),
    }
}

fn hash_only(path: &std::path::Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `left` bytes of a fixed non-zero pattern (no allocation of the whole payload).
struct Pattern {
    left: u64,
}

impl tokio::io::AsyncRead for Pattern {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        let fill = buf.initialize_unfilled_to(n);
        for (i, b) in fill.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        buf.advance(n);
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}
