//! [`SshCommunicator`]: the [`Communicator`] over SSH, on russh.
//!
//! One SSH session carries every command of a build (a channel per command). File transfer is
//! `cat` on an exec channel's stdin, so it works against dropbear and busybox guests that have
//! no SFTP server, and the guest's own `wc -c` confirms the size written.

mod connect;
mod exec;
mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use russh::client;
use russh::keys::PrivateKey;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::communicator::{
    Communicator, ConnectReport, ExecOptions, ExecOutcome, HostKeyFingerprint, Interrupt,
    InterruptFuture, OutputSink, UploadOutcome,
};
use crate::error::{CommError, ConnectError};
use connect::{Client, Shared};
use exec::{Out, Run, RunError};

/// How to treat the server's host key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Accept whatever key the server presents and report it in
    /// [`ConnectReport::host_key`]. Right for a freshly provisioned guest, whose keys were made at
    /// first boot; [`SshCommunicator::reconnect`] then pins the key seen here.
    TrustOnFirstUse,
    /// Accept only this key; anything else fails at once with
    /// [`ConnectError::HostKeyMismatch`].
    Pinned(HostKeyFingerprint),
}

/// SSH-level liveness checks on an idle session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a keepalive after this long without hearing from the server.
    pub interval: Duration,
    /// Declare the connection lost after this many unanswered keepalives.
    pub max: usize,
}

impl Default for Keepalive {
    /// 5 s × 3: a guest that stops answering is noticed within about 20 s.
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(5),
            max: 3,
        }
    }
}

/// Everything needed to reach one guest.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    /// The guest's sshd, e.g. QEMU's host-forwarded `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// The user to log in as.
    pub user: String,
    /// The client key (ed25519, RSA, ECDSA). RSA signs with the best SHA-2 hash the server
    /// announces, falling back to SHA-1 only for servers that announce nothing.
    pub key: Arc<PrivateKey>,
    /// How long to keep trying. Default 20 minutes, Azure Image Builder's SSH wait.
    pub timeout: Duration,
    /// Host key check. Default [`HostKeyPolicy::TrustOnFirstUse`].
    pub host_key: HostKeyPolicy,
    /// Keepalives on the established session. Default `Some(Keepalive::default())`.
    pub keepalive: Option<Keepalive>,
    /// How long to keep retrying after the server first rejects our key. Early in boot sshd
    /// can be up before cloud-init (or the Azure agent) has installed the key; a wrong key fails
    /// after this grace instead of retrying until the timeout. Default 60 s.
    pub auth_grace: Duration,
    /// Per attempt: time from TCP connect to the server's first byte. Default 15 s.
    pub banner_timeout: Duration,
    /// Per attempt: time after `banner_timeout` for key exchange and authentication.
    /// Default 60 s (a TCG guest can be slow at crypto).
    pub handshake_timeout: Duration,
}

impl ConnectConfig {
    /// A config with the defaults described on each field.
    pub fn new(addr: SocketAddr, user: impl Into<String>, key: PrivateKey) -> Self {
        ConnectConfig {
            addr,
            user: user.into(),
            key: Arc::new(key),
            timeout: Duration::from_secs(20 * 60),
            host_key: HostKeyPolicy::TrustOnFirstUse,
            keepalive: Some(Keepalive::default()),
            auth_grace: Duration::from_secs(60),
            banner_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(60),
        }
    }

    fn target(&self) -> String {
        format!("{}@{}", self.user, self.addr)
    }
}

/// One authenticated session.
pub(crate) struct Conn {
    handle: client::Handle<Client>,
    shared: Arc<Shared>,
    /// Present when commands on this session must run one at a time (see [`Conn::new`]).
    serial: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Conn {
    /// Wrap an established session.
    ///
    /// dropbear (2022.83, the tiny test guest's server) mishandles concurrent session channels:
    /// when one channel's command exits while another channel is between its open and its exec
    /// request, it closes the new channel unstarted, or dies on an internal assertion
    /// (`!channel->sent_close`) and drops the whole connection. So against dropbear, commands
    /// are serialised. OpenSSH runs them concurrently.
    fn new(est: connect::Established) -> Conn {
        let dropbear = est
            .server_id
            .as_deref()
            .is_some_and(|id| id.contains("dropbear"));
        Conn {
            handle: est.handle,
            shared: est.shared,
            serial: dropbear.then(|| Arc::new(tokio::sync::Mutex::new(()))),
        }
    }

    /// Why the session is gone, or `fallback` if russh did not say.
    fn loss_reason(&self, fallback: &str) -> String {
        self.shared.reason().unwrap_or_else(|| fallback.to_string())
    }
}

struct State {
    /// `None` after `close`.
    conn: Option<Arc<Conn>>,
    report: ConnectReport,
}

/// A [`Communicator`] over one reused SSH session.
pub struct SshCommunicator {
    /// With `host_key` pinned to the key seen at the first connect.
    config: ConnectConfig,
    target: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for SshCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCommunicator")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Shorten a command for error messages: first line, at most 80 characters.
fn short(cmd: &str) -> String {
    let line = cmd.lines().next().unwrap_or("");
    let mut s: String = line.chars().take(80).collect();
    if s.len() < cmd.len() {
        s.push('…');
    }
    s
}

/// Quote `s` as one POSIX shell word.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest-side command of an upload: `$1` is the destination. A new file is created under
/// umask 077 and only then given `mode`, so it is never briefly readable by others; the size
/// that actually landed on disk is reported before `chmod` (which may take read permission
/// away) by `stat -c %s`, which reads the inode only. `wc -c` is the fallback where `stat` is
/// missing or not GNU/busybox-like: busybox's `wc -c` reads the whole file back, which cost a
/// quarter of a 256 MiB upload's time in the tiny TCG guest (1.6 s per 16 MiB; BENCH.md).
fn upload_command(dest: &str, mode: u32) -> String {
    format!(
        "sh -c 'umask 077 && cat > \"$1\" && {{ stat -c %s \"$1\" 2>/dev/null || wc -c < \"$1\"; }} && chmod {:o} \"$1\"' kiln-upload {}",
        mode & 0o7777,
        sh_quote(dest)
    )
}

fn download_command(src: &str) -> String {
    format!("sh -c 'exec cat -- \"$1\"' kiln-download {}", sh_quote(src))
}

fn trimmed(buf: &[u8]) -> String {
    String::from_utf8_lossy(buf).trim().to_string()
}

impl SshCommunicator {
    /// Wait for the guest's sshd and log in.
    ///
    /// Retries on a short, growing schedule (20 ms up to 1 s between attempts; see
    /// `ssh/connect.rs`) until `config.timeout`, and returns as soon as authentication succeeds.
    /// `interrupt` ends the wait early: resolve it with [`Interrupt::Aborted`] when QEMU exits
    /// or the console shows a panic, or [`Interrupt::Cancelled`] on Ctrl-C; pass
    /// `std::future::pending()` if nothing can interrupt.
    pub async fn connect(
        mut config: ConnectConfig,
        interrupt: impl Future<Output = Interrupt> + Send,
    ) -> Result<SshCommunicator, ConnectError> {
        let (est, report) = connect::establish(&config, interrupt).await?;
        if let Some(fp) = &report.host_key {
            config.host_key = HostKeyPolicy::Pinned(fp.clone());
        }
        let conn = Arc::new(Conn::new(est));
        Ok(SshCommunicator {
            target: config.target(),
            config,
            state: Mutex::new(State {
                conn: Some(conn),
                report,
            }),
        })
    }

    /// Wait for the guest again (e.g. after a reboot) with the same settings, the host key
    /// pinned to the one seen at the first connect, and a fresh `timeout`. Later calls use the
    /// new session. Works after [`Communicator::close`] too.
    pub async fn reconnect_with(
        &self,
        interrupt: impl Future<Output = Interrupt> + Send,
    ) -> Result<ConnectReport, ConnectError> {
        let (est, report) = connect::establish(&self.config, interrupt).await?;
        let conn = Arc::new(Conn::new(est));
        let old = {
            let mut state = self.lock();
            state.report = report.clone();
            state.conn.replace(conn)
        };
        if let Some(old) = old {
            // Usually already dead; if not, say goodbye so the guest frees it.
            let _ = old
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
        Ok(report)
    }

    /// True while the session is up as far as the client knows (a dead peer is noticed by
    /// keepalives or the next command).
    pub fn is_connected(&self) -> bool {
        self.lock()
            .conn
            .as_ref()
            .is_some_and(|c| !c.handle.is_closed())
    }

    /// The settings in use, host key pinned after the first connect.
    pub fn config(&self) -> &ConnectConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave `State` half-updated (each update is a
        // single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conn(&self, command: &str) -> Result<Arc<Conn>, CommError> {
        let conn = self.lock().conn.clone();
        let conn = conn.ok_or_else(|| CommError::Closed {
            target: self.target.clone(),
        })?;
        if conn.handle.is_closed() {
            return Err(CommError::ConnectionLost {
                target: self.target.clone(),
                command: short(command),
                detail: conn.loss_reason("the connection closed"),
            });
        }
        Ok(conn)
    }

    fn run_error(&self, command: &str, e: RunError, what: &str) -> CommError {
        let target = self.target.clone();
        let command = short(command);
        match e {
            RunError::Lost(detail) => CommError::ConnectionLost {
                target,
                command,
                detail,
            },
            RunError::Rejected(detail) => CommError::Rejected {
                target,
                command,
                detail,
            },
            RunError::NotStarted => CommError::Rejected {
                target,
                command,
                detail: "the server closed the channel without starting the command".into(),
            },
            RunError::Timeout(after) => CommError::Timeout {
                target,
                command,
                after,
            },
            RunError::StdinRead(source) => CommError::LocalIo {
                what: format!("reading local data for {what}"),
                source,
            },
            RunError::StdinShort(n) => CommError::LocalIo {
                what: format!("reading local data for {what}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the source ended after {n} bytes"),
                ),
            },
            RunError::StdinLong => CommError::LocalIo {
                what: format!("reading local data for {what}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the source holds more bytes than the length given",
                ),
            },
            RunError::LocalWrite(source) => CommError::LocalIo {
                what: format!("writing local data for {what}"),
                source,
            },
        }
    }
}

#[async_trait]
impl Communicator for SshCommunicator {
    fn target(&self) -> String {
        self.target.clone()
    }

    fn connect_report(&self) -> ConnectReport {
        self.lock().report.clone()
    }

    async fn exec(
        &self,
        cmd: &str,
        opts: ExecOptions<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, CommError> {
        let conn = self.conn(cmd)?;
        // Shorten the reader's object lifetime to this call (the `&mut` makes it invariant).
        let stdin = opts
            .stdin
            .map(|r| -> &mut (dyn AsyncRead + Send + Unpin) { r });
        let run = Run {
            cmd,
            stdin,
            stdin_len: None,
            timeout: opts.timeout,
        };
        let ran = exec::run(&conn, run, &mut Out::Sink(sink))
            .await
            .map_err(|e| self.run_error(cmd, e, &format!("the stdin of `{}`", short(cmd))))?;
        Ok(ExecOutcome {
            status: ran.status,
            stdout_bytes: ran.stdout_bytes,
            stderr_bytes: ran.stderr_bytes,
            stdin_bytes: ran.stdin_bytes,
            duration: ran.duration,
        })
    }

    async fn upload(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        len: u64,
        dest: &str,
        mode: u32,
    ) -> Result<UploadOutcome, CommError> {
        let cmd = upload_command(dest, mode);
        let conn = self.conn(&cmd)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let run = Run {
            cmd: &cmd,
            stdin: Some(reader),
            stdin_len: Some(len),
            timeout: None,
        };
        let ran = exec::run(
            &conn,
            run,
            &mut Out::Capture {
                stdout: &mut stdout,
                stderr: &mut stderr,
            },
        )
        .await
        .map_err(|e| self.run_error(&cmd, e, &format!("the upload to {dest}")))?;
        let target = self.target.clone();
        let dest = dest.to_string();
        if !ran.status.success() {
            return Err(CommError::UploadFailed {
                target,
                dest,
                status: ran.status,
                stderr: trimmed(&stderr),
            });
        }
        if !ran.stdin_complete || ran.stdin_bytes != len {
            return Err(CommError::SizeMismatch {
                target,
                dest,
                expected: len,
                detail: format!("the guest stopped reading after {} bytes", ran.stdin_bytes),
            });
        }
        match trimmed(&stdout).parse::<u64>() {
            Ok(n) if n == len => Ok(UploadOutcome {
                bytes: n,
                duration: ran.duration,
            }),
            Ok(n) => Err(CommError::SizeMismatch {
                target,
                dest,
                expected: len,
                detail: format!("but the file in the guest has {n}"),
            }),
            Err(_) => Err(CommError::SizeMismatch {
                target,
                dest,
                expected: len,
                detail: format!("and the guest's `wc -c` printed {:?}", trimmed(&stdout)),
            }),
        }
    }

    async fn download(
        &self,
        src: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<u64, CommError> {
        let cmd = download_command(src);
        let conn = self.conn(&cmd)?;
        let mut stderr = Vec::new();
        let run = Run {
            cmd: &cmd,
            stdin: None,
            stdin_len: None,
            timeout: None,
        };
        let ran = exec::run(
            &conn,
            run,
            &mut Out::Download {
                writer: &mut *writer,
                stderr: &mut stderr,
            },
        )
        .await
        .map_err(|e| self.run_error(&cmd, e, &format!("the download of {src}")))?;
        if !ran.status.success() {
            return Err(CommError::DownloadFailed {
                target: self.target.clone(),
                src: src.to_string(),
                status: ran.status,
                stderr: trimmed(&stderr),
            });
        }
        tokio::io::AsyncWriteExt::flush(writer)
            .await
            .map_err(|source| CommError::LocalIo {
                what: format!("writing local data for the download of {src}"),
                source,
            })?;
        Ok(ran.stdout_bytes)
    }

    async fn reconnect(&self, interrupt: InterruptFuture<'_>) -> Result<ConnectReport, CommError> {
        Ok(self.reconnect_with(interrupt).await?)
    }

    async fn close(&self) -> Result<(), CommError> {
        let conn = self.lock().conn.take();
        if let Some(conn) = conn {
            // Best effort: a dead session has nobody to say goodbye to.
            let _ = conn
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        for s in [
            "plain",
            "with space",
            "it's",
            "'",
            "a'b'c",
            "$HOME `x` \"q\" \\ ; | &",
            "",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }

    #[test]
    fn upload_command_shape() {
        assert_eq!(
            upload_command("/tmp/it's here", 0o100755),
            "sh -c 'umask 077 && cat > \"$1\" && { stat -c %s \"$1\" 2>/dev/null || \
             wc -c < \"$1\"; } && chmod 755 \"$1\"' kiln-upload '/tmp/it'\\''s here'"
        );
    }

    #[test]
    fn short_commands_for_messages() {
        assert_eq!(short("echo hi"), "echo hi");
        assert_eq!(short("line1\nline2"), "line1…");
        assert_eq!(short(&"x".repeat(100)).chars().count(), 81);
    }
}
