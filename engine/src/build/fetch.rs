//! Fetching customizer artifacts on the host, checksum verified, before the VM boots.
//!
//! AIB downloads a Shell/PowerShell customizer's `scriptUri` and a File customizer's
//! `sourceUri` and checks `sha256Checksum`. kiln does it on the host, for all artifacts up
//! front, so nothing unverified reaches the guest and a bad URI fails the build before a
//! VM is started.
//!
//! Accepted locations: `https://` and `http://` URLs (redirects followed), `file:///abs`
//! URIs, absolute paths and paths relative to the template's directory. Each artifact is
//! streamed to a temporary file in the run's artifacts directory while it is hashed, then
//! renamed into place once its size and checksum are known to be right; on any error no
//! file of it is left behind.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// AIB's advice for the File customizer: files over 20 MB should be downloaded inside the
/// VM instead. [`Fetched::size`] lets the engine warn; this module does not.
pub const FILE_CUSTOMIZER_ADVISED_MAX_BYTES: u64 = 20 * 1000 * 1000;

/// One artifact to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// `scriptUri` / `sourceUri` as written in the template.
    pub uri: String,
    /// `sha256Checksum`: 64 hexadecimal digits in any case. `None` or `""` (AIB's
    /// default) means the content is not verified.
    pub expected_sha256: Option<String>,
    /// Where the URI comes from, for messages, e.g.
    /// `properties.customize[1] (Shell "setup")`.
    pub label: String,
}

/// Where and how to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchContext {
    /// Relative paths are resolved against this directory (the template's).
    pub template_dir: PathBuf,
    /// The run's artifacts directory (created if missing); fetched files land here.
    pub dest_dir: PathBuf,
    /// The longest an HTTP fetch may wait without progress: for the connection, for the
    /// response headers, and for each further piece of the body.
    pub timeout: Duration,
    /// The largest artifact accepted, in bytes.
    pub max_bytes: u64,
}

/// A fetched, verified artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The URI as requested.
    pub uri: String,
    /// The file in [`FetchContext::dest_dir`] holding the content.
    pub path: PathBuf,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
    /// Size in bytes (compare with [`FILE_CUSTOMIZER_ADVISED_MAX_BYTES`]).
    pub size: u64,
}

/// Why an artifact could not be fetched. Every variant names the request's label and URI.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URI has a scheme kiln does not fetch from.
    #[error("{label}: cannot fetch {uri}: unsupported scheme \"{scheme}\" (kiln fetches https://, http://, file:// and local paths)")]
    UnsupportedScheme {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The scheme, as written.
        scheme: String,
    },
    /// The URI cannot be parsed or used.
    #[error("{label}: cannot fetch {uri}: invalid URI: {reason}")]
    InvalidUri {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The expected checksum is not a SHA-256 hex digest.
    #[error("{label}: invalid sha256Checksum {value:?} for {uri}: expected 64 hexadecimal digits")]
    InvalidChecksum {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The checksum given.
        value: String,
    },
    /// The server answered with a status other than success.
    #[error("{label}: cannot fetch {uri}: HTTP {status}")]
    Http {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The status and its reason, e.g. `404 Not Found`.
        status: String,
    },
    /// Connecting failed: name resolution, refused connection, TLS handshake or
    /// certificate verification.
    #[error("{label}: cannot connect to fetch {uri}: {message}")]
    Connect {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The cause, with its chain of sources.
        message: String,
    },
    /// No progress within [`FetchContext::timeout`].
    #[error("{label}: fetching {uri} timed out: no progress for {after:?}")]
    Timeout {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The timeout.
        after: Duration,
    },
    /// The transfer failed after it started.
    #[error("{label}: fetching {uri} failed: {message}")]
    Transfer {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The cause, with its chain of sources.
        message: String,
    },
    /// A local file does not exist.
    #[error("{label}: cannot fetch {uri}: file not found: {}", path.display())]
    NotFound {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The resolved path.
        path: PathBuf,
    },
    /// The artifact is larger than [`FetchContext::max_bytes`].
    #[error("{label}: cannot fetch {uri}: {} is larger than the limit of {limit} bytes", size.map_or("the content".to_string(), |s| format!("its size ({s} bytes)")))]
    TooBig {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The limit.
        limit: u64,
        /// The announced or actual size, when known.
        size: Option<u64>,
    },
    /// The content's SHA-256 is not the expected one.
    #[error("{label}: sha256Checksum mismatch for {uri}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// The expected checksum, lower-case.
        expected: String,
        /// The content's checksum, lower-case.
        actual: String,
    },
    /// Reading a local file or writing the artifacts directory failed.
    #[error("{label}: cannot fetch {uri}: {action} {}: {source}", path.display())]
    Io {
        /// The request's label.
        label: String,
        /// The URI.
        uri: String,
        /// What was being done: `cannot read`, `cannot write`, ….
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl FetchError {
    /// The label of the request that failed.
    pub fn label(&self) -> &str {
        match self {
            FetchError::UnsupportedScheme { label, .. }
            | FetchError::InvalidUri { label, .. }
            | FetchError::InvalidChecksum { label, .. }
            | FetchError::Http { label, .. }
            | FetchError::Connect { label, .. }
            | FetchError::Timeout { label, .. }
            | FetchError::Transfer { label, .. }
            | FetchError::NotFound { label, .. }
            | FetchError::TooBig { label, .. }
            | FetchError::ChecksumMismatch { label, .. }
            | FetchError::Io { label, .. } => label,
        }
    }

    /// The URI of the request that failed.
    pub fn uri(&self) -> &str {
        match self {
            FetchError::UnsupportedScheme { uri, .. }
            | FetchError::InvalidUri { uri, .. }
            | FetchError::InvalidChecksum { uri, .. }
            | FetchError::Http { uri, .. }
            | FetchError::Connect { uri, .. }
            | FetchError::Timeout { uri, .. }
            | FetchError::Transfer { uri, .. }
            | FetchError::NotFound { uri, .. }
            | FetchError::TooBig { uri, .. }
            | FetchError::ChecksumMismatch { uri, .. }
            | FetchError::Io { uri, .. } => uri,
        }
    }
}

/// Fetches one artifact into `ctx.dest_dir` and verifies it.
pub async fn fetch(req: &FetchRequest, ctx: &FetchContext) -> Result<Fetched, FetchError> {
    let source = resolve(req, &ctx.template_dir)?;
    let expected = expected_checksum(req)?;
    Fetcher::new(ctx)
        .get(req, &source, expected.as_deref())
        .await
}

/// Fetches all artifacts into `ctx.dest_dir`, one after the other, and verifies each.
///
/// Every URI and checksum is checked before anything is fetched. The same location
/// (after resolving relative paths) is fetched once; each request naming it has its own
/// checksum checked. The result has one entry per request, in order (duplicates share
/// the file). On the first error, the files this call fetched are removed.
pub async fn fetch_all(
    reqs: &[FetchRequest],
    ctx: &FetchContext,
) -> Result<Vec<Fetched>, FetchError> {
    let mut plans = Vec::with_capacity(reqs.len());
    for req in reqs {
        let source = resolve(req, &ctx.template_dir)?;
        let expected = expected_checksum(req)?;
        plans.push((source, expected));
    }
    let mut fetcher = Fetcher::new(ctx);
    let mut out = Vec::with_capacity(reqs.len());
    for (req, (source, expected)) in reqs.iter().zip(plans) {
        match fetcher.get(req, &source, expected.as_deref()).await {
            Ok(f) => out.push(f),
            Err(e) => {
                for p in &fetcher.created {
                    let _ = tokio::fs::remove_file(p).await;
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Where an artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Http(reqwest::Url),
    File(PathBuf),
}

impl Source {
    /// The identity used to fetch a location once.
    fn key(&self) -> String {
        match self {
            Source::Http(u) => u.as_str().to_string(),
            Source::File(p) => {
                format!(
                    "file:{}",
                    std::fs::canonicalize(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                )
            }
        }
    }

    /// The last path segment, for the artifact's file name.
    fn base_name(&self) -> String {
        let raw = match self {
            Source::Http(u) => u
                .path_segments()
                .and_then(|mut s| s.next_back())
                .unwrap_or("")
                .to_string(),
            Source::File(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let clean: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        let clean = clean.trim_start_matches('.').to_string();
        if clean.is_empty() {
            "artifact".to_string()
        } else {
            clean
        }
    }
}

/// Resolves a request's URI: its scheme, or a local path.
fn resolve(req: &FetchRequest, template_dir: &Path) -> Result<Source, FetchError> {
    let uri = req.uri.as_str();
    let invalid = |reason: String| FetchError::InvalidUri {
        label: req.label.clone(),
        uri: req.uri.clone(),
        reason,
    };
    if uri.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if let Some(scheme) = scheme_of(uri) {
        return match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let url = reqwest::Url::parse(uri).map_err(|e| invalid(e.to_string()))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(invalid("no host".into()));
                }
                Ok(Source::Http(url))
            }
            "file" => {
                let url = reqwest::Url::parse(uri).map_err(|e| invalid(e.to_string()))?;
                let path = url.to_file_path().map_err(|()| {
                    invalid(
                        "a file URI must be file:///absolute/path (no host other than localhost)"
                            .into(),
                    )
                })?;
                Ok(Source::File(path))
            }
            _ => Err(FetchError::UnsupportedScheme {
                label: req.label.clone(),
                uri: req.uri.clone(),
                scheme: scheme.to_string(),
            }),
        };
    }
    let path = Path::new(uri);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        template_dir.join(path)
    };
    // `components` drops inner `.` components (`..` stays: it may cross a symbolic link)
    Ok(Source::File(path.components().collect()))
}

/// The scheme of `uri` (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`, then
/// `:` before any `/`), if it has one.
fn scheme_of(uri: &str) -> Option<&str> {
    let colon = uri.find(':')?;
    let scheme = &uri[..colon];
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .then_some(scheme)
}

/// The expected checksum, lower-case, or `None` when not verified.
fn expected_checksum(req: &FetchRequest) -> Result<Option<String>, FetchError> {
    match req.expected_sha256.as_deref() {
        None | Some("") => Ok(None),
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(v.to_ascii_lowercase()))
        }
        Some(v) => Err(FetchError::InvalidChecksum {
            label: req.label.clone(),
            uri: req.uri.clone(),
            value: v.to_string(),
        }),
    }
}

/// Lower-case hex of a digest (sha2 0.11's output does not implement `LowerHex`).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// The message of an error and its sources, without repeats.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Removes a temporary file when dropped, unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A temporary file being written while its content is hashed and counted.
struct Sink<'a> {
    req: &'a FetchRequest,
    file: tokio::fs::File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl Sink<'_> {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(FetchError::TooBig {
                label: self.req.label.clone(),
                uri: self.req.uri.clone(),
                limit: self.limit,
                size: None,
            });
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| self.io("cannot write", e))
    }

    fn io(&self, action: &'static str, source: io::Error) -> FetchError {
        FetchError::Io {
            label: self.req.label.clone(),
            uri: self.req.uri.clone(),
            action,
            path: self.path.clone(),
            source,
        }
    }
}

struct Fetcher<'a> {
    ctx: &'a FetchContext,
    client: Option<reqwest::Client>,
    /// Location key → (final path, sha256, size).
    done: HashMap<String, (PathBuf, String, u64)>,
    /// Files this call published, removed on failure.
    created: Vec<PathBuf>,
}

impl<'a> Fetcher<'a> {
    fn new(ctx: &'a FetchContext) -> Self {
        Fetcher {
            ctx,
            client: None,
            done: HashMap::new(),
            created: Vec::new(),
        }
    }

    async fn get(
        &mut self,
        req: &FetchRequest,
        source: &Source,
        expected: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let key = source.key();
        let (path, sha256, size) = match self.done.get(&key) {
            Some(d) => d.clone(),
            None => {
                let d = self.download(req, source, &key, expected).await?;
                self.created.push(d.0.clone());
                self.done.insert(key, d.clone());
                d
            }
        };
        // A second request for the same location may expect another checksum.
        if let Some(exp) = expected {
            if exp != sha256 {
                return Err(mismatch(req, exp, &sha256));
            }
        }
        Ok(Fetched {
            uri: req.uri.clone(),
            path,
            sha256,
            size,
        })
    }

    /// Fetches `source` into a temporary file, verifies it and renames it into place.
    async fn download(
        &mut self,
        req: &FetchRequest,
        source: &Source,
        key: &str,
        expected: Option<&str>,
    ) -> Result<(PathBuf, String, u64), FetchError> {
        let dest_dir = &self.ctx.dest_dir;
        let io_err = |action, path: &Path, source| FetchError::Io {
            label: req.label.clone(),
            uri: req.uri.clone(),
            action,
            path: path.to_path_buf(),
            source,
        };
        tokio::fs::create_dir_all(dest_dir)
            .await
            .map_err(|e| io_err("cannot create", dest_dir, e))?;
        let name = format!(
            "{}-{}",
            &hex(&Sha256::digest(key.as_bytes()))[..16],
            source.base_name()
        );
        let final_path = dest_dir.join(&name);

        // Open the source first: a missing file or an HTTP error leaves nothing behind.
        let mut body = self.open(req, source).await?;

        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dest_dir.join(format!(".{name}.part-{}-{seq}", std::process::id()));
        let mut guard = TempGuard(None);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .await
            .map_err(|e| io_err("cannot create", &tmp, e))?;
        guard.0 = Some(tmp.clone());
        let mut sink = Sink {
            req,
            file,
            path: tmp.clone(),
            hasher: Sha256::new(),
            size: 0,
            limit: self.ctx.max_bytes,
        };
        match &mut body {
            Body::File(f, path) => {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f
                        .read(&mut buf)
                        .await
                        .map_err(|e| io_err("cannot read", path, e))?;
                    if n == 0 {
                        break;
                    }
                    sink.write(&buf[..n]).await?;
                }
            }
            Body::Http(resp) => loop {
                let chunk = tokio::time::timeout(self.ctx.timeout, resp.chunk())
                    .await
                    .map_err(|_| timeout(req, self.ctx.timeout))?
                    .map_err(|e| http_error(req, self.ctx.timeout, &e))?;
                match chunk {
                    Some(bytes) => sink.write(&bytes).await?,
                    None => break,
                }
            },
        }
        sink.file
            .flush()
            .await
            .map_err(|e| sink.io("cannot write", e))?;
        sink.file
            .sync_all()
            .await
            .map_err(|e| sink.io("cannot write", e))?;
        let Sink {
            file, hasher, size, ..
        } = sink;
        drop(file);
        let actual = hex(&hasher.finalize());
        if let Some(exp) = expected {
            if exp != actual {
                return Err(mismatch(req, exp, &actual));
            }
        }
        tokio::fs::rename(&tmp, &final_path)
            .await
            .map_err(|e| io_err("cannot rename into place", &final_path, e))?;
        guard.0 = None;
        Ok((final_path, actual, size))
    }

    /// Opens the source: a local file (size checked) or an HTTP response (status and
    /// announced length checked).
    async fn open(&mut self, req: &FetchRequest, source: &Source) -> Result<Body, FetchError> {
        let limit = self.ctx.max_bytes;
        let too_big = |size| FetchError::TooBig {
            label: req.label.clone(),
            uri: req.uri.clone(),
            limit,
            size: Some(size),
        };
        match source {
            Source::File(path) => {
                let io_err = |e: io::Error| {
                    if e.kind() == io::ErrorKind::NotFound {
                        FetchError::NotFound {
                            label: req.label.clone(),
                            uri: req.uri.clone(),
                            path: path.clone(),
                        }
                    } else {
                        FetchError::Io {
                            label: req.label.clone(),
                            uri: req.uri.clone(),
                            action: "cannot read",
                            path: path.clone(),
                            source: e,
                        }
                    }
                };
                let f = tokio::fs::File::open(path).await.map_err(io_err)?;
                let meta = f.metadata().await.map_err(io_err)?;
                if meta.is_dir() {
                    return Err(io_err(io::Error::other("is a directory")));
                }
                if meta.len() > limit {
                    return Err(too_big(meta.len()));
                }
                Ok(Body::File(f, path.clone()))
            }
            Source::Http(url) => {
                let client = self.client(req)?;
                let resp = tokio::time::timeout(self.ctx.timeout, client.get(url.clone()).send())
                    .await
                    .map_err(|_| timeout(req, self.ctx.timeout))?
                    .map_err(|e| http_error(req, self.ctx.timeout, &e))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(FetchError::Http {
                        label: req.label.clone(),
                        uri: req.uri.clone(),
                        status: status.to_string(),
                    });
                }
                if let Some(len) = resp.content_length() {
                    if len > limit {
                        return Err(too_big(len));
                    }
                }
                Ok(Body::Http(resp))
            }
        }
    }

    /// The HTTP client, built on first use.
    fn client(&mut self, req: &FetchRequest) -> Result<reqwest::Client, FetchError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let client = reqwest::Client::builder()
            .connect_timeout(self.ctx.timeout)
            .read_timeout(self.ctx.timeout)
            .redirect(reqwest::redirect::Policy::limited(10))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Connect {
                label: req.label.clone(),
                uri: req.uri.clone(),
                message: format!("cannot set up the HTTP client: {}", chain(&e)),
            })?;
        self.client = Some(client.clone());
        Ok(client)
    }
}

enum Body {
    File(tokio::fs::File, PathBuf),
    Http(reqwest::Response),
}

fn mismatch(req: &FetchRequest, expected: &str, actual: &str) -> FetchError {
    FetchError::ChecksumMismatch {
        label: req.label.clone(),
        uri: req.uri.clone(),
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}

fn timeout(req: &FetchRequest, after: Duration) -> FetchError {
    FetchError::Timeout {
        label: req.label.clone(),
        uri: req.uri.clone(),
        after,
    }
}

fn http_error(req: &FetchRequest, after: Duration, e: &reqwest::Error) -> FetchError {
    let (label, uri) = (req.label.clone(), req.uri.clone());
    // reqwest's own message ("error sending request for url (…)") repeats the URI: the
    // causes say more.
    let message = match std::error::Error::source(e) {
        Some(cause) => chain(cause),
        None => chain(e),
    };
    if e.is_timeout() {
        FetchError::Timeout { label, uri, after }
    } else if e.is_connect() {
        FetchError::Connect {
            label,
            uri,
            message,
        }
    } else {
        FetchError::Transfer {
            label,
            uri,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const SCRIPT: &[u8] = b"#!/bin/sh\necho hello from kiln\n";

    /// A tiny HTTP/1.1 server on 127.0.0.1 for the tests:
    /// `/files/NAME` (200 with the file), `/redirect/NAME` (302 to `/files/NAME`),
    /// `/slow-headers` (nothing for 30 s), `/slow-body` (a partial body, then nothing),
    /// `/unsized` (a body without Content-Length), anything else 404.
    struct Server {
        base: String,
        hits: Arc<Mutex<HashMap<String, usize>>>,
    }

    impl Server {
        async fn start(files: &[(&str, Vec<u8>)]) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let files: Arc<HashMap<String, Vec<u8>>> = Arc::new(
                files
                    .iter()
                    .map(|(n, b)| (n.to_string(), b.clone()))
                    .collect(),
            );
            let hits = Arc::new(Mutex::new(HashMap::new()));
            let h = hits.clone();
            tokio::spawn(async move {
                loop {
                    let (conn, _) = listener.accept().await.unwrap();
                    tokio::spawn(serve(conn, files.clone(), h.clone()));
                }
            });
            Server { base, hits }
        }

        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }

        fn hits(&self, path: &str) -> usize {
            self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
        }
    }

    async fn serve(
        mut conn: TcpStream,
        files: Arc<HashMap<String, Vec<u8>>>,
        hits: Arc<Mutex<HashMap<String, usize>>>,
    ) {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
            if req[0] == 0x16 {
                // a TLS ClientHello: answer in plain HTTP, as a plain server would
                let _ = conn
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
        }
        let head = String::from_utf8_lossy(&req).to_string();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        *hits.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
        let respond = |status: &str, extra: &str, body: &[u8]| {
            let mut r = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        };
        let bytes = if let Some(name) = path.strip_prefix("/files/") {
            match files.get(name) {
                Some(b) => respond("200 OK", "", b),
                None => respond("404 Not Found", "", b"no such file\n"),
            }
        } else if let Some(name) = path.strip_prefix("/redirect/") {
            respond("302 Found", &format!("Location: /files/{name}\r\n"), b"")
        } else if path == "/slow-headers" {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        } else if path == "/slow-body" {
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        } else if path == "/unsized" {
            let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            r.extend_from_slice(&[b'x'; 5000]);
            r
        } else {
            respond("404 Not Found", "", b"not found\n")
        };
        let _ = conn.write_all(&bytes).await;
        let _ = conn.shutdown().await;
    }

    fn sha(b: &[u8]) -> String {
        hex(&Sha256::digest(b))
    }

    /// A fresh directory with a `template/` (holding `scripts/setup.sh`) and an empty
    /// `artifacts/` location.
    fn setup(tag: &str) -> (TmpDir, FetchContext) {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let root =
            std::env::temp_dir().join(format!("kiln-fetch-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("template/scripts")).unwrap();
        std::fs::write(root.join("template/scripts/setup.sh"), SCRIPT).unwrap();
        let ctx = FetchContext {
            template_dir: root.join("template"),
            dest_dir: root.join("artifacts"),
            // Generous, so that a loaded host never turns a test's fetch into a timeout; the
            // timeout test sets its own.
            timeout: Duration::from_secs(15),
            max_bytes: 1 << 20,
        };
        (TmpDir(root), ctx)
    }

    /// A scratch directory removed when dropped.
    struct TmpDir(PathBuf);

    impl std::ops::Deref for TmpDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TmpDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn req(uri: &str, sha: Option<&str>) -> FetchRequest {
        FetchRequest {
            uri: uri.to_string(),
            expected_sha256: sha.map(str::to_string),
            label: "properties.customize[1] (Shell \"setup\")".to_string(),
        }
    }

    fn dest_files(ctx: &FetchContext) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(&ctx.dest_dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    #[test]
    fn hex_is_lowercase_sha256() {
        assert_eq!(
            sha(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn http_with_uppercase_checksum() {
        let srv = Server::start(&[("setup.sh", SCRIPT.to_vec())]).await;
        let (_root, ctx) = setup("http");
        let upper = sha(SCRIPT).to_ascii_uppercase();
        let f = fetch(&req(&srv.url("/files/setup.sh"), Some(&upper)), &ctx)
            .await
            .unwrap();
        assert_eq!(f.sha256, sha(SCRIPT));
        assert_eq!(f.size, SCRIPT.len() as u64);
        assert_eq!(f.uri, srv.url("/files/setup.sh"));
        assert_eq!(std::fs::read(&f.path).unwrap(), SCRIPT);
        assert_eq!(f.path.parent().unwrap(), ctx.dest_dir);
        assert!(f
            .path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-setup.sh"));
        assert_eq!(dest_files(&ctx).len(), 1, "no temporary file left");
    }

    #[tokio::test]
    async fn http_redirect_is_followed() {
        let srv = Server::start(&[("setup.sh", SCRIPT.to_vec())]).await;
        let (_root, ctx) = setup("redirect");
        let f = fetch(
            &req(&srv.url("/redirect/setup.sh"), Some(&sha(SCRIPT))),
            &ctx,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&f.path).unwrap(), SCRIPT);
        assert_eq!(srv.hits("/redirect/setup.sh"), 1);
        assert_eq!(srv.hits("/files/setup.sh"), 1);
    }

    #[tokio::test]
    async fn http_404() {
        let srv = Server::start(&[]).await;
        let (_root, ctx) = setup("404");
        let uri = srv.url("/files/missing.sh");
        let err = fetch(&req(&uri, None), &ctx).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::Http { status, .. } if status == "404 Not Found"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("404 Not Found") && msg.contains(&uri), "{msg}");
        assert!(
            msg.starts_with("properties.customize[1] (Shell \"setup\"): "),
            "{msg}"
        );
        assert_eq!(err.uri(), uri);
        assert!(dest_files(&ctx).is_empty());
    }

    #[tokio::test]
    async fn checksum_mismatch_names_both_and_leaves_nothing() {
        let srv = Server::start(&[("setup.sh", SCRIPT.to_vec())]).await;
        let (root, ctx) = setup("mismatch");
        let wrong = sha(b"something else");
        let err = fetch(&req(&srv.url("/files/setup.sh"), Some(&wrong)), &ctx)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{msg}");
        assert!(msg.contains(&wrong) && msg.contains(&sha(SCRIPT)), "{msg}");
        assert!(dest_files(&ctx).is_empty(), "{:?}", dest_files(&ctx));

        // the same for a local file
        let err = fetch(
            &req("scripts/setup.sh", Some(&wrong.to_ascii_uppercase())),
            &ctx,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&wrong) && msg.contains(&sha(SCRIPT)), "{msg}");
        assert!(dest_files(&ctx).is_empty());
        drop(root);
    }

    #[tokio::test]
    async fn local_paths_file_uri_relative_and_absolute() {
        let (root, ctx) = setup("local");
        let abs = root.join("template/scripts/setup.sh");
        let uris = [
            "scripts/setup.sh".to_string(),
            "./scripts/../scripts/setup.sh".to_string(),
            abs.display().to_string(),
            format!("file://{}", abs.display()),
            format!("FILE://localhost{}", abs.display()),
        ];
        for uri in &uris {
            let f = fetch(&req(uri, Some(&sha(SCRIPT))), &ctx).await.unwrap();
            assert_eq!(std::fs::read(&f.path).unwrap(), SCRIPT, "{uri}");
            assert_eq!(f.sha256, sha(SCRIPT));
        }
        // an empty checksum is AIB's "not verified"
        let f = fetch(&req("scripts/setup.sh", Some("")), &ctx)
            .await
            .unwrap();
        assert_eq!(f.size, SCRIPT.len() as u64);
        assert!(
            !dest_files(&ctx).iter().any(|n| n.starts_with('.')),
            "{:?}",
            dest_files(&ctx)
        );
    }

    #[tokio::test]
    async fn file_not_found_and_bad_file_uris() {
        let (root, ctx) = setup("notfound");
        let err = fetch(&req("scripts/nope.sh", None), &ctx)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FetchError::NotFound { path, .. } if *path == root.join("template/scripts/nope.sh")),
            "{err:?}"
        );
        assert!(err.to_string().contains("file not found"), "{err}");
        let err = fetch(&req("file://server/share/x.sh", None), &ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::InvalidUri { .. }), "{err:?}");
        let err = fetch(&req("scripts", None), &ctx).await.unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(dest_files(&ctx).is_empty());
    }

    #[tokio::test]
    async fn unknown_scheme_is_named() {
        let (_root, ctx) = setup("scheme");
        for (uri, scheme) in [
            ("ftp://example.com/x.sh", "ftp"),
            ("s3://bucket/key", "s3"),
            ("C:\\scripts\\x.ps1", "C"),
        ] {
            let err = fetch(&req(uri, None), &ctx).await.unwrap_err();
            assert!(
                matches!(&err, FetchError::UnsupportedScheme { scheme: s, .. } if s == scheme),
                "{err:?}"
            );
            assert!(err.to_string().contains(&format!("\"{scheme}\"")), "{err}");
        }
    }

    #[tokio::test]
    async fn invalid_checksum_fails_before_fetching() {
        let srv = Server::start(&[("setup.sh", SCRIPT.to_vec())]).await;
        let (_root, ctx) = setup("badsum");
        let reqs = [
            req(&srv.url("/files/setup.sh"), None),
            req("scripts/setup.sh", Some("abc")),
        ];
        let err = fetch_all(&reqs, &ctx).await.unwrap_err();
        assert!(matches!(err, FetchError::InvalidChecksum { .. }), "{err:?}");
        assert_eq!(srv.hits("/files/setup.sh"), 0);
    }

    #[tokio::test]
    async fn timeouts_headers_and_body() {
        let srv = Server::start(&[]).await;
        let (_root, mut ctx) = setup("timeout");
        ctx.timeout = Duration::from_millis(500);
        for path in ["/slow-headers", "/slow-body"] {
            let started = std::time::Instant::now();
            let err = fetch(&req(&srv.url(path), None), &ctx).await.unwrap_err();
            assert!(matches!(err, FetchError::Timeout { .. }), "{path}: {err:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{path}");
            assert!(err.to_string().contains("timed out"), "{err}");
        }
        assert!(dest_files(&ctx).is_empty(), "{:?}", dest_files(&ctx));
    }

    #[tokio::test]
    async fn connection_refused_and_tls_failure_are_connect_errors() {
        let srv = Server::start(&[("setup.sh", SCRIPT.to_vec())]).await;
        let (_root, ctx) = setup("connect");
        // A port nobody listens on, held for the whole test: a TCP socket bound but never put
        // in the listening state answers connections with RST (a freed port could be taken by
        // another process on a busy machine).
        let (_held, port) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket");
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, std::ptr::addr_of!(addr).cast(), len),
                0,
                "bind"
            );
            let mut len2 = len;
            assert_eq!(
                libc::getsockname(fd, std::ptr::addr_of_mut!(addr).cast(), &mut len2),
                0,
                "getsockname"
            );
            (
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd),
                u16::from_be(addr.sin_port),
            )
        };
        let err = fetch(&req(&format!("http://127.0.0.1:{port}/x.sh"), None), &ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
        assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
        // https to a plain HTTP server: the TLS handshake fails
        let https = srv.url("/files/setup.sh").replace("http://", "https://");
        let err = fetch(&req(&https, None), &ctx).await.unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&https), "{err}");
        assert!(dest_files(&ctx).is_empty());
    }

    #[tokio::test]
    async fn too_big_announced_and_streamed() {
        let srv = Server::start(&[("big.bin", vec![7u8; 5000])]).await;
        let (root, mut ctx) = setup("big");
        ctx.max_bytes = 4096;
        let err = fetch(&req(&srv.url("/files/big.bin"), None), &ctx)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::TooBig {
                    size: Some(5000),
                    limit: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = fetch(&req(&srv.url("/unsized"), None), &ctx)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::TooBig { size: None, .. }),
            "{err:?}"
        );
        std::fs::write(root.join("template/big.bin"), vec![0u8; 5000]).unwrap();
        let err = fetch(&req("big.bin", None), &ctx).await.unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::TooBig {
                    size: Some(5000),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("4096"), "{err}");
        assert!(dest_files(&ctx).is_empty(), "{:?}", dest_files(&ctx));
        // at the limit is fine
        ctx.max_bytes = 5000;
        let f = fetch(&req(&srv.url("/unsized"), None), &ctx).await.unwrap();
        assert_eq!(f.size, 5000);
    }

    #[tokio::test]
    async fn same_uri_fetched_once() {
        let srv = Server::start(&[
            ("setup.sh", SCRIPT.to_vec()),
            ("other.sh", b"echo other\n".to_vec()),
        ])
        .await;
        let (_root, ctx) = setup("dedup");
        let u = srv.url("/files/setup.sh");
        let reqs = [
            req(&u, Some(&sha(SCRIPT))),
            req(&srv.url("/files/other.sh"), None),
            req(&u, None),
            req("scripts/setup.sh", None),
            req("./scripts/setup.sh", None),
        ];
        let got = fetch_all(&reqs, &ctx).await.unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(srv.hits("/files/setup.sh"), 1);
        assert_eq!(got[0].path, got[2].path);
        assert_ne!(got[0].path, got[1].path);
        assert_eq!(got[3].path, got[4].path, "same resolved path");
        assert_eq!(got[0].sha256, got[3].sha256);
        assert_eq!(dest_files(&ctx).len(), 3, "{:?}", dest_files(&ctx));
        let uris: Vec<_> = got.iter().map(|f| f.uri.as_str()).collect();
        assert_eq!(
            uris,
            reqs.iter().map(|r| r.uri.as_str()).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn dedup_checks_each_requests_checksum_and_cleans_up() {
        let srv = Server::start(&[
            ("setup.sh", SCRIPT.to_vec()),
            ("other.sh", b"echo other\n".to_vec()),
        ])
        .await;
        let (_root, ctx) = setup("dedup-mismatch");
        let u = srv.url("/files/setup.sh");
        let wrong = sha(b"x");
        let reqs = [
            req(&srv.url("/files/other.sh"), None),
            req(&u, Some(&sha(SCRIPT))),
            FetchRequest {
                label: "properties.customize[3] (File)".into(),
                ..req(&u, Some(&wrong))
            },
        ];
        let err = fetch_all(&reqs, &ctx).await.unwrap_err();
        assert_eq!(err.label(), "properties.customize[3] (File)");
        assert!(err.to_string().contains(&wrong), "{err}");
        assert_eq!(srv.hits("/files/setup.sh"), 1);
        assert!(dest_files(&ctx).is_empty(), "{:?}", dest_files(&ctx));
    }
}
