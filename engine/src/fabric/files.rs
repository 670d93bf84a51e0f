//! The per-build file endpoint: how a Windows build VM receives the bytes of a File customizer
//! without WinRM's base64 chunking.
//!
//! Same plumbing as the fabric: a server inside kiln on a Unix socket in the build's directory,
//! reached from the guest at [`GUEST_ADDR`]:[`GUEST_PORT`] through QEMU's user network
//! (`guestfwd=tcp:10.0.2.100:80-cmd:kiln __fabric-connect SOCKET files`). The host offers a
//! file ([`FileServer::offer`]) and gets a one-time URL `http://10.0.2.100/f/<token>` (256
//! random bits); the guest pulls it with kiln's script (`powershell::pull_file`), checks size
//! and SHA-256 against what the host computed, and only then moves it to the destination.
//! [`deliver`] is the whole host side, and tells "the guest never reached the endpoint"
//! (the caller then falls back to the WinRM upload, loudly) from "the bytes arrived wrong".
//!
//! Invariants: the server serves only what its build offered; a token works once (the first
//! GET claims it, any later one is a 404, as is an unknown token); every answer is bounded
//! (head ≤ 16 KiB, 15 s to send it, [`MAX_CONNECTIONS`] at once, a stalled reader is cut off
//! after [`WRITE_STALL`]); the socket is removed when the server drops.

use super::http;
use super::FabricError;
use kiln_agents::winrm::powershell;
use kiln_agents::{CommError, Communicator, ExecOptions, ExitStatus};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// The guest-side address of the endpoint on QEMU's default user network (10.0.2.0/24).
pub const GUEST_ADDR: &str = "10.0.2.100";
/// The guest-side address when the build's network is the emulated Azure fabric's
/// (168.0.0.0/7).
pub const GUEST_ADDR_AZURE_NET: &str = "168.63.129.20";
/// The guest-side port.
pub const GUEST_PORT: u16 = 80;
/// Connections served at the same time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A write that makes no progress for this long ends the transfer.
pub const WRITE_STALL: Duration = Duration::from_secs(60);
/// The URL path prefix of a token.
pub const PREFIX: &str = "/f/";

/// One request the endpoint answered (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    /// The method (empty if the request was unreadable).
    pub method: String,
    /// The path, with the token shortened to its first 8 characters.
    pub target: String,
    /// The status answered (0: none).
    pub status: u16,
    /// The offered file's name, for a valid token.
    pub name: Option<String>,
    /// Bytes of the body sent.
    pub bytes: u64,
    /// Why the request was refused or the transfer broke off.
    pub error: Option<String>,
}

/// Receives the endpoint's events.
pub type FileSink = Arc<dyn Fn(FileEvent) + Send + Sync>;

/// What became of an offered token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// Not asked for yet.
    Waiting,
    /// A GET claimed it; `complete` once every byte was written.
    Claimed {
        /// Bytes sent.
        sent: u64,
        /// All `len` bytes went out.
        complete: bool,
    },
    /// Never offered (or revoked before use).
    Unknown,
}

/// A file offered under a one-time token.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The token (64 hex characters).
    pub token: String,
    /// The URL the guest pulls.
    pub url: String,
    /// The file's size when offered (exactly this many bytes are served).
    pub len: u64,
    /// Its SHA-256 when offered, upper-case hex (as Get-FileHash prints it).
    pub sha256: String,
}

struct Offered {
    path: PathBuf,
    name: String,
    len: u64,
}

#[derive(Default)]
struct Tokens {
    waiting: HashMap<String, Offered>,
    claimed: HashMap<String, (u64, bool)>,
}

struct Shared {
    tokens: Mutex<Tokens>,
    sink: FileSink,
    preamble: bool,
    refused: std::sync::atomic::AtomicU64,
}

/// A running endpoint. Dropping it stops the server and removes its socket.
pub struct FileServer {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
    own_dir: Option<PathBuf>,
    base_url: String,
}

/// The socket for a build in `run_dir`: `run_dir/files.sock`, or a private directory under the
/// temp dir when that path is too long for a Unix socket.
pub fn socket_path_for(run_dir: &Path, run_id: &str) -> (PathBuf, Option<PathBuf>) {
    let p = run_dir.join("files.sock");
    if p.as_os_str().len() <= 100 {
        return (p, None);
    }
    let dir = std::env::temp_dir().join(format!("kiln-files-{run_id}-{}", std::process::id()));
    (dir.join("files.sock"), Some(dir))
}

fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// SHA-256 (upper-case hex) and length of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize().iter().map(|b| format!("{b:02X}")).collect()))
}

impl FileServer {
    /// Serves on `socket` for relays (`kiln __fabric-connect SOCKET files`); the guest's URLs
    /// are `http://{guest_addr}/f/<token>`. `own_dir`, if given, is created (0700) for the
    /// socket and removed on drop.
    pub fn start(
        socket: &Path,
        own_dir: Option<&Path>,
        guest_addr: &str,
        sink: FileSink,
    ) -> Result<FileServer, FabricError> {
        let listener = Arc::new(super::bind_private_socket(socket, own_dir)?);
        let (shared, task) = serve(sink, true, move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        });
        Ok(FileServer {
            shared,
            task,
            socket: Some(socket.to_path_buf()),
            own_dir: own_dir.map(Path::to_path_buf),
            base_url: format!("http://{guest_addr}"),
        })
    }

    /// Serves on a TCP listener bound to `addr` (no relay preamble): the same endpoint for
    /// host-side tests and the benchmark, where the "guest" is the WinRS test server.
    pub async fn start_tcp(addr: SocketAddr, sink: FileSink) -> std::io::Result<FileServer> {
        let listener = Arc::new(tokio::net::TcpListener::bind(addr).await?);
        let local = listener.local_addr()?;
        let (shared, task) = serve(sink, false, move || {
            let l = listener.clone();
            async move {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        });
        Ok(FileServer {
            shared,
            task,
            socket: None,
            own_dir: None,
            base_url: format!("http://{local}"),
        })
    }

    /// The socket the relays connect to (None for a TCP endpoint).
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// `http://ADDR[:PORT]`, what the guest's URLs start with.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The `-netdev user` option that routes `guest_addr`:80 to this endpoint through
    /// `kiln_exe __fabric-connect SOCKET files` (commas doubled).
    pub fn netdev_option(&self, kiln_exe: &Path, guest_addr: &str) -> Option<String> {
        let socket = self.socket.as_ref()?;
        let cmd = super::relay_command(kiln_exe, socket, super::Endpoint::Files);
        let escaped = crate::vm::qemu::escape(std::ffi::OsStr::new(&cmd));
        Some(format!(
            "guestfwd=tcp:{guest_addr}:{GUEST_PORT}-cmd:{}",
            escaped.to_string_lossy()
        ))
    }

    /// Offers `path` (logged as `name`) under a fresh one-time token; hashes it now.
    pub fn offer(&self, path: &Path, name: &str) -> std::io::Result<Offer> {
        let (len, sha256) = hash_file(path)?;
        let token = random_token()?;
        self.lock().waiting.insert(
            token.clone(),
            Offered {
                path: path.to_path_buf(),
                name: name.to_string(),
                len,
            },
        );
        Ok(Offer {
            url: format!("{}{PREFIX}{token}", self.base_url),
            token,
            len,
            sha256,
        })
    }

    /// What became of `token`.
    pub fn state(&self, token: &str) -> TokenState {
        let t = self.lock();
        if t.waiting.contains_key(token) {
            TokenState::Waiting
        } else if let Some((sent, complete)) = t.claimed.get(token) {
            TokenState::Claimed {
                sent: *sent,
                complete: *complete,
            }
        } else {
            TokenState::Unknown
        }
    }

    /// Withdraws an unused offer (a later GET is a 404).
    pub fn revoke(&self, token: &str) {
        self.lock().waiting.remove(token);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.shared.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
        if let Some(d) = &self.own_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The endpoint's state and its accept loop: each connection `accept` yields (from a Unix
/// socket's or a TCP listener's accept) is served by [`spawn_connection`]; `preamble`: the
/// connections come through the relay, which sends one first.
fn serve<S, F, Fut>(
    sink: FileSink,
    preamble: bool,
    mut accept: F,
) -> (Arc<Shared>, tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
{
    let shared = Arc::new(Shared {
        tokens: Mutex::default(),
        sink,
        preamble,
        refused: Default::default(),
    });
    let s2 = shared.clone();
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(stream) = accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            spawn_connection(&s2, &permits, stream);
        }
    });
    (shared, task)
}

fn spawn_connection<S>(shared: &Arc<Shared>, permits: &Arc<Semaphore>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        // reported at 1, 2, 4, 8… so that a flood cannot flood the log
        let n = shared
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            (shared.sink)(FileEvent {
                method: String::new(),
                target: String::new(),
                status: 503,
                name: None,
                bytes: 0,
                error: Some(format!(
                    "more than {MAX_CONNECTIONS} connections at once: closed {n} so far"
                )),
            });
        }
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let ev = serve_connection(&mut stream, &shared).await;
        let _ = stream.shutdown().await;
        if let Some(ev) = ev {
            (shared.sink)(ev);
        }
    });
}

async fn read_preamble<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut line = Vec::new();
    let read = async {
        let mut b = [0u8; 1];
        while line.len() < 8 {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            if b[0] == b'\n' {
                return Some(line == b"files");
            }
            line.push(b[0]);
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn shorten(path: &str) -> String {
    match path.strip_prefix(PREFIX) {
        Some(t) if t.len() > 8 => format!("{PREFIX}{}…", &t[..8]),
        _ => path.chars().take(80).collect(),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, status: u16, why: &str) {
    let _ = http::write_response(s, &http::Response::text(status, format!("{why}\n")), false).await;
}

/// Serves one request; returns the event to report (None: nothing worth reporting).
async fn serve_connection<S>(s: &mut S, shared: &Shared) -> Option<FileEvent>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if shared.preamble && !read_preamble(s).await {
        return None;
    }
    let req = match http::read_request(s, http::READ_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            let st = e.status()?;
            refuse(s, st, &e.to_string()).await;
            return Some(FileEvent {
                method: String::new(),
                target: String::new(),
                status: st,
                name: None,
                bytes: 0,
                error: Some(e.to_string()),
            });
        }
    };
    let mut ev = FileEvent {
        method: req.method.clone(),
        target: shorten(&req.path),
        status: 0,
        name: None,
        bytes: 0,
        error: None,
    };
    if req.method != "GET" {
        refuse(s, 405, "only GET").await;
        ev.status = 405;
        ev.error = Some("only GET is served".into());
        return Some(ev);
    }
    let token = req.path.strip_prefix(PREFIX).unwrap_or("");
    let offered = {
        let mut t = shared.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let o = t.waiting.remove(token);
        if o.is_some() {
            t.claimed.insert(token.to_string(), (0, false));
        }
        (o, t.claimed.contains_key(token))
    };
    let o = match offered {
        (Some(o), _) => o,
        (None, used) => {
            refuse(s, 404, "no such file").await;
            ev.status = 404;
            ev.error = Some(
                if used {
                    "the token was already used"
                } else {
                    "unknown token"
                }
                .into(),
            );
            return Some(ev);
        }
    };
    ev.name = Some(o.name.clone());
    let mut file = match tokio::fs::File::open(&o.path).await {
        Ok(f) => f,
        Err(e) => {
            refuse(s, 500, "the host cannot read the file").await;
            ev.status = 500;
            ev.error = Some(format!("{}: {e}", o.path.display()));
            return Some(ev);
        }
    };
    ev.status = 200;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        o.len
    );
    let r: Result<(), String> = async {
        tokio::time::timeout(WRITE_STALL, s.write_all(head.as_bytes()))
            .await
            .map_err(|_| "the client stopped reading".to_string())?
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256 * 1024];
        while ev.bytes < o.len {
            let want = (o.len - ev.bytes).min(buf.len() as u64) as usize;
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(|e| format!("{}: {e}", o.path.display()))?;
            if n == 0 {
                return Err(format!(
                    "{} shrank after it was offered: {} of {} bytes sent",
                    o.path.display(),
                    ev.bytes,
                    o.len
                ));
            }
            tokio::time::timeout(WRITE_STALL, s.write_all(&buf[..n]))
                .await
                .map_err(|_| format!("the client stopped reading for {}s", WRITE_STALL.as_secs()))?
                .map_err(|e| e.to_string())?;
            ev.bytes += n as u64;
        }
        s.flush().await.map_err(|e| e.to_string())
    }
    .await;
    let complete = r.is_ok();
    if let Err(e) = r {
        ev.error = Some(e);
    }
    shared
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .claimed
        .insert(token.to_string(), (ev.bytes, complete));
    Some(ev)
}

/// Which way the bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The guest pulled them from the file endpoint.
    Pull,
    /// The communicator's upload (WinRM: base64 chunks), the fallback.
    Upload,
}

/// How a delivery went.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Which way.
    pub via: Via,
    /// Bytes delivered.
    pub bytes: u64,
    /// Their SHA-256 (upper-case hex), as the guest confirmed it.
    pub sha256: String,
    /// From offering to the guest's confirmation.
    pub duration: Duration,
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The host cannot read the source.
    #[error("reading {path}: {source}")]
    Source {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The guest never fetched the URL: the endpoint is unreachable from it (the caller may
    /// fall back to another way of delivering).
    #[error("the guest did not reach kiln's file endpoint for {dest} ({url}): {detail}")]
    Unreachable {
        /// The destination in the guest.
        dest: String,
        /// The URL tried (token shortened).
        url: String,
        /// The guest's error output or exit status.
        detail: String,
    },
    /// The bytes did not arrive intact (short, altered) or could not be put in place.
    #[error("delivering {src} to {dest} in the guest failed: {detail}")]
    Failed {
        /// The host file.
        src: String,
        /// The destination in the guest.
        dest: String,
        /// What the guest and the endpoint report.
        detail: String,
    },
    /// The fallback upload failed.
    #[error("uploading {src} to {dest} (the fallback): {source}")]
    Upload {
        /// The host file.
        src: String,
        /// The destination in the guest.
        dest: String,
        /// The cause.
        source: CommError,
    },
    /// The guest command could not run.
    #[error("delivering {src} to {dest}: {source}")]
    Comm {
        /// The host file.
        src: String,
        /// The destination in the guest.
        dest: String,
        /// The cause.
        source: CommError,
    },
}

/// Delivers `src` to `dest` in the guest: offers it under a one-time token, has the guest pull
/// and verify it (`powershell::pull_file`), and checks the guest's `<size> <SHA-256>` against
/// the host's. Unused tokens are revoked before returning.
pub async fn deliver(
    guest: &dyn Communicator,
    server: &FileServer,
    src: &Path,
    dest: &str,
) -> Result<Delivered, DeliverError> {
    let started = Instant::now();
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| src.display().to_string());
    let offer = server
        .offer(src, &name)
        .map_err(|source| DeliverError::Source {
            path: src.to_path_buf(),
            source,
        })?;
    let mut d = deliver_offer(guest, server, &offer, src, dest).await?;
    d.duration = started.elapsed();
    Ok(d)
}

/// The part of [`deliver`] after the offer: the guest pulls `offer.url`; `src` only names the
/// file in errors.
pub async fn deliver_offer(
    guest: &dyn Communicator,
    server: &FileServer,
    offer: &Offer,
    src: &Path,
    dest: &str,
) -> Result<Delivered, DeliverError> {
    let started = Instant::now();
    let srcs = src.display().to_string();
    let tmp = format!("{dest}.kiln-pull");
    let script = powershell::pull_file(&offer.url, &tmp, dest, offer.len, &offer.sha256);
    let line = powershell::command_line(&script);
    let r = guest.exec_collect(&line, ExecOptions::default()).await;
    let state = server.state(&offer.token);
    server.revoke(&offer.token);
    let (o, c) = r.map_err(|source| DeliverError::Comm {
        src: srcs.clone(),
        dest: dest.to_string(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&c.stdout).trim().to_string();
    let stderr = c.stderr_lossy().trim().to_string();
    if o.status != ExitStatus::Code(0) {
        if state == TokenState::Waiting {
            return Err(DeliverError::Unreachable {
                dest: dest.to_string(),
                url: redact(&offer.url),
                detail: format!("exit {}: {}", o.status, clip(&stderr)),
            });
        }
        let served = match state {
            TokenState::Claimed {
                sent,
                complete: true,
            } => format!("the endpoint sent all {sent} bytes"),
            TokenState::Claimed { sent, .. } => {
                format!("the endpoint sent {sent} of {} bytes", offer.len)
            }
            _ => "the endpoint has no record of the transfer".into(),
        };
        return Err(DeliverError::Failed {
            src: srcs,
            dest: dest.to_string(),
            detail: format!(
                "the guest's check failed (exit {}): {}; {served}",
                o.status,
                clip(if stderr.is_empty() { &stdout } else { &stderr })
            ),
        });
    }
    let mut words = stdout.split_whitespace();
    let size: Option<u64> = words.next().and_then(|w| w.parse().ok());
    let hash = words.next().unwrap_or("").to_ascii_uppercase();
    if size != Some(offer.len) || hash != offer.sha256 {
        return Err(DeliverError::Failed {
            src: srcs,
            dest: dest.to_string(),
            detail: format!(
                "the guest reports {:?} (size SHA-256), expected {} {}",
                clip(&stdout),
                offer.len,
                offer.sha256
            ),
        });
    }
    Ok(Delivered {
        via: Via::Pull,
        bytes: offer.len,
        sha256: offer.sha256.clone(),
        duration: started.elapsed(),
    })
}

/// What a Windows File step does: [`deliver`] through `server`; when there is no endpoint, or
/// the guest never reached it ([`DeliverError::Unreachable`]), `warn` is told why and the bytes
/// go through the communicator's upload instead (which checks size and SHA-256 in the guest).
/// Any other failure is returned as it is: bytes that arrived wrong are not sent again.
pub async fn deliver_or_upload(
    guest: &dyn Communicator,
    server: Option<&FileServer>,
    src: &Path,
    dest: &str,
    warn: &(dyn Fn(String) + Send + Sync),
) -> Result<Delivered, DeliverError> {
    match server {
        Some(server) => match deliver(guest, server, src, dest).await {
            Ok(d) => return Ok(d),
            Err(e @ DeliverError::Unreachable { .. }) => warn(format!(
                "{e}\n  falling back to the WinRM upload for {dest} (base64 chunks, far slower)"
            )),
            Err(e) => return Err(e),
        },
        None => warn(format!(
            "no file endpoint in this build: {dest} goes through the WinRM upload (base64 chunks, far slower)"
        )),
    }
    let started = Instant::now();
    let source_err = |source| DeliverError::Source {
        path: src.to_path_buf(),
        source,
    };
    let (len, sha256) = hash_file(src).map_err(source_err)?;
    let mut f = tokio::fs::File::open(src).await.map_err(source_err)?;
    guest
        .upload(&mut f, len, dest, 0o644)
        .await
        .map_err(|source| DeliverError::Upload {
            src: src.display().to_string(),
            dest: dest.to_string(),
            source,
        })?;
    Ok(Delivered {
        via: Via::Upload,
        bytes: len,
        sha256,
        duration: started.elapsed(),
    })
}

/// A URL with its token cut to 8 characters (tokens are not logged whole).
fn redact(url: &str) -> String {
    match url.find(PREFIX) {
        Some(i) => {
            let t = &url[i + PREFIX.len()..];
            let cut = (0..=t.len().min(8))
                .rev()
                .find(|k| t.is_char_boundary(*k))
                .unwrap_or(0);
            format!("{}{PREFIX}{}…", &url[..i], &t[..cut])
        }
        None => url.to_string(),
    }
}

fn clip(s: &str) -> String {
    let mut o: String = s.chars().take(400).collect();
    if o.len() < s.len() {
        o.push('…');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (FileSink, Arc<Mutex<Vec<FileEvent>>>) {
        let ev = Arc::new(Mutex::new(Vec::new()));
        let e2 = ev.clone();
        (Arc::new(move |e| e2.lock().unwrap().push(e)), ev)
    }

    async fn get(sock: &Path, preamble: &str, raw: &str) -> (u16, Vec<u8>) {
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        s.write_all(preamble.as_bytes()).await.unwrap();
        let _ = s.write_all(raw.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| out[i + 4..].to_vec())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn tokens_work_once_and_only_for_offered_files() {
        let dir = std::env::temp_dir().join(format!("kiln-files-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("payload.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let (sink, events) = sink();
        let server = FileServer::start(&dir.join("files.sock"), None, GUEST_ADDR, sink).unwrap();
        let sock = server.socket_path().unwrap().to_path_buf();
        let offer = server.offer(&src, "payload.bin").unwrap();
        assert_eq!(offer.len, data.len() as u64);
        assert_eq!(
            offer.sha256,
            Sha256::digest(&data)
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect::<String>()
        );
        assert!(
            offer.url.starts_with("http://10.0.2.100/f/"),
            "{}",
            offer.url
        );
        assert_eq!(offer.token.len(), 64);
        assert_eq!(server.state(&offer.token), TokenState::Waiting);
        let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 10.0.2.100\r\n\r\n");
        let path = format!("{PREFIX}{}", offer.token);
        // wrong token, wrong preamble, wrong method: refused, the offer stays
        let (st, _) = get(
            &sock,
            "files\n",
            &req(&format!("{PREFIX}{}", "0".repeat(64))),
        )
        .await;
        assert_eq!(st, 404);
        let (st, _) = get(&sock, "files\n", &req("/f/../payload.bin")).await;
        assert_eq!(st, 404);
        let (st, _) = get(&sock, "wire\n", &req(&path)).await;
        assert_eq!(
            st, 0,
            "a connection without the files preamble gets nothing"
        );
        let (st, _) = get(
            &sock,
            "files\n",
            &format!("POST {path} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert_eq!(st, 405);
        let (st, _) = get(&sock, "files\n", "GARBAGE\r\n\r\n").await;
        assert_eq!(st, 400);
        assert_eq!(server.state(&offer.token), TokenState::Waiting);
        // the first GET gets the bytes
        let (st, body) = get(&sock, "files\n", &req(&path)).await;
        assert_eq!(st, 200);
        assert!(body == data, "the body differs ({} bytes)", body.len());
        assert_eq!(
            server.state(&offer.token),
            TokenState::Claimed {
                sent: data.len() as u64,
                complete: true
            }
        );
        // and then it is gone
        let (st, _) = get(&sock, "files\n", &req(&path)).await;
        assert_eq!(st, 404);
        // a revoked offer is gone too
        let o2 = server.offer(&src, "payload.bin").unwrap();
        server.revoke(&o2.token);
        let (st, _) = get(&sock, "files\n", &req(&format!("{PREFIX}{}", o2.token))).await;
        assert_eq!(st, 404);
        assert_eq!(server.state(&o2.token), TokenState::Unknown);
        let ev = events.lock().unwrap().clone();
        assert!(ev.iter().any(|e| e.status == 200
            && e.bytes == data.len() as u64
            && e.name.as_deref() == Some("payload.bin")
            && !e.target.contains(&offer.token)));
        assert!(ev
            .iter()
            .any(|e| e.status == 404 && e.error.as_deref() == Some("the token was already used")));
        // a file that shrank after the offer is cut short, and recorded as incomplete
        let o3 = server.offer(&src, "payload.bin").unwrap();
        std::fs::write(&src, &data[..1000]).unwrap();
        let (st, body) = get(&sock, "files\n", &req(&format!("{PREFIX}{}", o3.token))).await;
        assert_eq!((st, body.len()), (200, 1000));
        assert_eq!(
            server.state(&o3.token),
            TokenState::Claimed {
                sent: 1000,
                complete: false
            }
        );
        drop(server);
        assert!(!sock.exists(), "the socket is removed on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_reported_sparingly() {
        let dir = std::env::temp_dir().join(format!("kiln-files-limit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (sink, events) = sink();
        let server = FileServer::start(&dir.join("files.sock"), None, GUEST_ADDR, sink).unwrap();
        let sock = server.socket_path().unwrap().to_path_buf();
        // idle clients hold every slot (each waits up to 5 s for its preamble)
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            let mut b = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut b))
                .await
                .expect("closed at once")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        let refused: Vec<String> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.status == 503)
            .filter_map(|e| e.error.clone())
            .collect();
        assert_eq!(refused.len(), 2, "reported at 1 and 2, not 3: {refused:?}");
        assert!(refused[1].contains("closed 2 so far"), "{refused:?}");
        // the slots come back
        drop(idle);
        let src = dir.join("p");
        std::fs::write(&src, b"hello").unwrap();
        let offer = server.offer(&src, "p").unwrap();
        let mut ok = false;
        for _ in 0..50 {
            let (st, body) = get(
                &sock,
                "files\n",
                &format!("GET {PREFIX}{} HTTP/1.1\r\n\r\n", offer.token),
            )
            .await;
            if st == 200 {
                assert_eq!(body, b"hello");
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "the endpoint serves again once the idle clients left");
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn netdev_option_routes_the_guest_address_to_the_relay() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let dir = std::env::temp_dir().join(format!("kiln-files-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sink, _) = sink();
        let server = FileServer::start(&dir.join("files.sock"), None, GUEST_ADDR, sink).unwrap();
        let opt = server
            .netdev_option(Path::new("/usr/bin/kiln"), GUEST_ADDR)
            .unwrap();
        assert_eq!(
            opt,
            format!(
                "guestfwd=tcp:10.0.2.100:80-cmd:/usr/bin/kiln __fabric-connect {} files",
                dir.join("files.sock").display()
            )
        );
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
