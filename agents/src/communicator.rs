//! The [`Communicator`] trait: what a build step needs from a guest channel.
//!
//! # Why `async_trait`
//!
//! The engine keeps the guest connection as `Option<Box<dyn Communicator>>`, and both an SSH
//! client and (later) a WinRM client implement it, so the trait must be object safe. Native
//! `async fn` in traits is not (its futures are opaque, unnameable types), so every method has to
//! return a boxed future. `async_trait` writes exactly that (`Pin<Box<dyn Future + Send + 'a>>`)
//! without the boilerplate; one allocation per call is noise next to a network round trip.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::CommError;

/// Which output stream of a guest command a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
}

/// How a guest command ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// The command exited with this code.
    Code(i32),
    /// The command was killed by this signal (name without the `SIG` prefix, e.g. `"KILL"`).
    Signal(String),
    /// The channel closed without reporting how the command ended. Never treat this as success.
    Unknown,
}

impl ExitStatus {
    /// True only for `Code(0)`.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => f.write_str("unknown exit status (channel closed without one)"),
        }
    }
}

/// Receives a guest command's output as it arrives.
///
/// Chunks are delivered in arrival order; a chunk boundary carries no meaning (a line may be split
/// across two chunks). Implemented for every `FnMut(Stream, &[u8]) + Send` closure.
pub trait OutputSink: Send {
    /// Called once per chunk of output.
    fn output(&mut self, stream: Stream, data: &[u8]);
}

impl<F: FnMut(Stream, &[u8]) + Send> OutputSink for F {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        self(stream, data)
    }
}

/// An [`OutputSink`] that keeps everything in memory (tests, short probes like `uname -a`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl Collected {
    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl OutputSink for Collected {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(data),
            Stream::Stderr => self.stderr.extend_from_slice(data),
        }
    }
}

/// Options for [`Communicator::exec`].
#[derive(Default)]
pub struct ExecOptions<'a> {
    /// Data to feed to the command's stdin, then EOF. `None` sends EOF at once.
    pub stdin: Option<&'a mut (dyn AsyncRead + Send + Unpin)>,
    /// Kill the command (signal KILL, then close its channel) if it runs longer than this.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for ExecOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOptions")
            .field("stdin", &self.stdin.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What [`Communicator::exec`] reports once the command has ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How the command ended.
    pub status: ExitStatus,
    /// Bytes of stdout delivered to the sink.
    pub stdout_bytes: u64,
    /// Bytes of stderr delivered to the sink.
    pub stderr_bytes: u64,
    /// Bytes of stdin sent to the command (may be less than offered if it exited early).
    pub stdin_bytes: u64,
    /// From sending the request to seeing the channel close.
    pub duration: Duration,
}

/// What [`Communicator::upload`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    /// Bytes written, confirmed by the guest's own count of the file's size.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub duration: Duration,
}

/// A fingerprint of a server's host key, in OpenSSH's form: `SHA256:` followed by unpadded
/// base64, exactly what `ssh-keygen -lf key.pub` prints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostKeyFingerprint(pub String);

impl fmt::Display for HostKeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Timings of a successful connection, for boot→ready reporting.
///
/// All instants come from the same monotonic clock, so a caller can subtract its own
/// `Instant` taken when the VM started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectReport {
    /// When the connect (or reconnect) call began.
    pub started: Instant,
    /// The first time any attempt got a TCP connection (under QEMU user networking the host side
    /// accepts at once, so this says little about the guest).
    pub first_tcp_connect: Option<Instant>,
    /// When the winning attempt's TCP connection was established.
    pub tcp_connected: Instant,
    /// When the winning attempt saw the server's first bytes (the SSH identification banner).
    pub banner: Option<Instant>,
    /// When authentication succeeded; the guest was usable from here on.
    pub authenticated: Instant,
    /// How many attempts were started, the winning one included.
    pub attempts: u32,
    /// The server's identification string, e.g. `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3`.
    pub server_id: Option<String>,
    /// The host key the server proved it holds.
    pub host_key: Option<HostKeyFingerprint>,
}

impl ConnectReport {
    /// `authenticated - started`: how long the wait took.
    pub fn wait(&self) -> Duration {
        self.authenticated.saturating_duration_since(self.started)
    }
}

/// Why a wait (connect, reconnect) should end early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// The user asked to stop (Ctrl-C).
    Cancelled,
    /// Waiting longer is pointless, for the reason given (e.g. "QEMU exited with status 1",
    /// "kernel panic on the serial console").
    Aborted(String),
}

/// A future that resolves when a wait should end early; see [`Interrupt`].
///
/// Pass `Box::pin(std::future::pending())` when nothing can interrupt the wait.
pub type InterruptFuture<'a> = Pin<Box<dyn Future<Output = Interrupt> + Send + 'a>>;

/// A command channel into a guest: SSH today, WinRM later.
///
/// One implementation value is one logical connection to one guest, shared by all build steps.
/// Every method takes `&self`; implementations serialise internally where they must.
#[async_trait]
pub trait Communicator: Send + Sync {
    /// Who this talks to, e.g. `root@127.0.0.1:2222`; used in every error message.
    fn target(&self) -> String;

    /// Timings of the current connection.
    fn connect_report(&self) -> ConnectReport;

    /// Run `cmd` in the guest's shell, streaming its output to `sink` while it runs.
    ///
    /// A non-zero exit status is not an error: it is returned in [`ExecOutcome::status`].
    /// [`CommError::ConnectionLost`] means the guest went away (rebooted, crashed) and
    /// [`Communicator::reconnect`] may bring it back.
    ///
    /// Concurrent calls are allowed (an implementation may run them one at a time). Dropping
    /// the returned future abandons the command: the implementation stops it as far as the
    /// server allows.
    async fn exec(
        &self,
        cmd: &str,
        opts: ExecOptions<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, CommError>;

    /// Write exactly `len` bytes from `reader` to `dest` in the guest with permission bits
    /// `mode` (e.g. `0o755`), replacing any existing file. The guest confirms the size it wrote.
    ///
    /// The parent directory must exist. A reader that yields fewer or more than `len` bytes is
    /// an error. After a failure `dest` may hold partial data.
    async fn upload(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        len: u64,
        dest: &str,
        mode: u32,
    ) -> Result<UploadOutcome, CommError>;

    /// Copy the guest file `src` into `writer`; returns the number of bytes copied.
    async fn download(
        &self,
        src: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<u64, CommError>;

    /// Wait (with the implementation's configured deadline) until the guest answers again after
    /// the connection was lost, e.g. across a reboot. Replaces the connection used by later calls.
    async fn reconnect(&self, interrupt: InterruptFuture<'_>) -> Result<ConnectReport, CommError>;

    /// End the session politely. Later calls fail with [`CommError::Closed`].
    async fn close(&self) -> Result<(), CommError>;

    /// [`Communicator::exec`] that keeps the output in memory.
    async fn exec_collect(
        &self,
        cmd: &str,
        opts: ExecOptions<'_>,
    ) -> Result<(ExecOutcome, Collected), CommError> {
        let mut out = Collected::default();
        let outcome = self.exec(cmd, opts, &mut out).await?;
        Ok((outcome, out))
    }

    /// [`Communicator::upload`] of a local file; the length comes from its metadata.
    async fn upload_file(
        &self,
        local: &Path,
        dest: &str,
        mode: u32,
    ) -> Result<UploadOutcome, CommError> {
        let what = || format!("upload of {} to {dest}", local.display());
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|source| CommError::LocalIo {
                what: what(),
                source,
            })?;
        let len = file
            .metadata()
            .await
            .map_err(|source| CommError::LocalIo {
                what: what(),
                source,
            })?
            .len();
        self.upload(&mut file, len, dest, mode).await
    }
}
