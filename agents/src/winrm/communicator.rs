//! [`WinRmCommunicator`]: the [`Communicator`] over WinRS.
//!
//! One connection and one shell serve every command of a build; commands run one at a time.
//! `exec` sends the command line as a WinRS Command (run by `cmd.exe`, so `powershell
//! -EncodedCommand …` from [`super::powershell::command_line`] is the usual form), streams every
//! Receive's chunks to the sink as they arrive, and releases the command with Signal terminate.
//! Upload is the slow, universal path: base64 chunks appended by PowerShell, then a size and
//! SHA-256 check in the guest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::WinRmError;
use super::powershell;
use super::shell::{ShellClient, WsmanSettings};
use super::transport::{CertPolicy, Security, Transport, TransportConfig};
use super::wsman::{self, OutStream, Signal};
use crate::communicator::{
    Communicator, ConnectReport, ExecOptions, ExecOutcome, ExitStatus, Interrupt, InterruptFuture,
    OutputSink, Stream, UploadOutcome,
};
use crate::error::{CommError, ConnectError, WinRmWaitFailure};

/// Everything needed to reach one Windows guest.
#[derive(Clone, Debug)]
pub struct WinRmConfig {
    /// Address, host name, transport security and credentials.
    pub transport: TransportConfig,
    /// WS-Man header settings.
    pub wsman: WsmanSettings,
    /// How long to keep trying to connect. Default 20 minutes (as for SSH).
    pub timeout: Duration,
    /// How long to keep retrying after the server first rejects our credentials (the password
    /// may be applied late in first boot). Default 60 s.
    pub auth_grace: Duration,
}

impl WinRmConfig {
    /// A config with the defaults described on each field: TCP connect timeout 10 s, requests
    /// bounded by their OperationTimeout plus 60 s.
    pub fn new(
        addr: std::net::SocketAddr,
        user: impl Into<String>,
        password: impl Into<String>,
        security: Security,
    ) -> Self {
        WinRmConfig {
            transport: TransportConfig {
                addr,
                host: addr.ip().to_string(),
                security,
                user: user.into(),
                password: password.into(),
                connect_timeout: Duration::from_secs(10),
                request_slack: Duration::from_secs(60),
            },
            wsman: WsmanSettings::default(),
            timeout: Duration::from_secs(20 * 60),
            auth_grace: Duration::from_secs(60),
        }
    }
}

struct Live {
    client: ShellClient,
    shell_id: String,
}

struct Inner {
    live: Option<Live>,
    closed: bool,
    report: ConnectReport,
    config: WinRmConfig,
}

/// A [`Communicator`] over one WinRS shell.
pub struct WinRmCommunicator {
    target: String,
    endpoint: String,
    inner: Arc<tokio::sync::Mutex<Inner>>,
    report: std::sync::Mutex<ConnectReport>,
}

impl std::fmt::Debug for WinRmCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WinRmCommunicator")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn retry_delay(elapsed: Duration) -> Duration {
    (elapsed / 5).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

/// Establish a transport and a shell, retrying until `config.timeout`.
async fn establish(
    config: &WinRmConfig,
    mut interrupt: InterruptFuture<'_>,
) -> Result<(Live, ConnectReport), ConnectError> {
    let started = Instant::now();
    let endpoint = config.transport.endpoint();
    let user = config.transport.user.clone();
    let mut attempts = 0u32;
    let mut first_tcp: Option<Instant> = None;
    let mut first_rejection: Option<Instant> = None;
    let fail = |attempts, failure| ConnectError::WinRm {
        endpoint: endpoint.clone(),
        user: user.clone(),
        attempts,
        elapsed: started.elapsed(),
        failure,
    };
    loop {
        attempts += 1;
        let attempt = async {
            let transport = Transport::connect(config.transport.clone()).await?;
            let connected = Instant::now();
            let mut client = ShellClient::new(transport, config.wsman.clone());
            let shell_id = client.create_shell().await?;
            Ok::<_, WinRmError>((client, shell_id, connected))
        };
        let remaining = config.timeout.saturating_sub(started.elapsed());
        let outcome = tokio::select! {
            i = &mut interrupt => {
                return Err(fail(attempts, match i {
                    Interrupt::Cancelled => WinRmWaitFailure::Cancelled,
                    Interrupt::Aborted(r) => WinRmWaitFailure::Aborted(r),
                }));
            }
            r = tokio::time::timeout(remaining, attempt) => r,
        };
        let last = match outcome {
            Err(_) => "the attempt did not finish before the deadline".to_string(),
            Ok(Ok((client, shell_id, connected))) => {
                let now = Instant::now();
                let report = ConnectReport {
                    started,
                    first_tcp_connect: Some(first_tcp.unwrap_or(connected)),
                    tcp_connected: connected,
                    banner: Some(connected),
                    authenticated: now,
                    attempts,
                    server_id: client.transport.server().map(str::to_string),
                    host_key: client.transport.certificate().cloned(),
                };
                return Ok((Live { client, shell_id }, report));
            }
            Ok(Err(e)) => {
                if !matches!(e, WinRmError::Connect { .. }) {
                    first_tcp.get_or_insert_with(Instant::now);
                }
                match &e {
                    WinRmError::CertificateMismatch { .. } | WinRmError::Ntlm { .. } => {
                        return Err(fail(attempts, WinRmWaitFailure::Fatal(e.to_string())));
                    }
                    WinRmError::AuthRejected { .. } => {
                        let since = *first_rejection.get_or_insert_with(Instant::now);
                        if since.elapsed() >= config.auth_grace {
                            return Err(fail(attempts, WinRmWaitFailure::Fatal(e.to_string())));
                        }
                    }
                    _ => {}
                }
                e.to_string()
            }
        };
        let elapsed = started.elapsed();
        if elapsed >= config.timeout {
            return Err(fail(attempts, WinRmWaitFailure::Timeout(last)));
        }
        let delay = retry_delay(elapsed).min(config.timeout - elapsed);
        tokio::select! {
            i = &mut interrupt => {
                return Err(fail(attempts, match i {
                    Interrupt::Cancelled => WinRmWaitFailure::Cancelled,
                    Interrupt::Aborted(r) => WinRmWaitFailure::Aborted(r),
                }));
            }
            _ = tokio::time::sleep(delay) => {}
        }
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

/// Releases (Signal terminate) a command whose `exec` future was dropped before it finished.
struct Abandon {
    inner: Arc<tokio::sync::Mutex<Inner>>,
    command_id: Option<String>,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let Some(id) = self.command_id.take() else {
            return;
        };
        let inner = self.inner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut g = inner.lock().await;
                if let Some(live) = g.live.as_mut() {
                    let shell = live.shell_id.clone();
                    let _ = live.client.signal(&shell, &id, Signal::Terminate).await;
                }
            });
        }
    }
}

impl WinRmCommunicator {
    /// Wait for the guest's WinRM listener, authenticate and open a shell.
    pub async fn connect(
        config: WinRmConfig,
        interrupt: impl std::future::Future<Output = Interrupt> + Send,
    ) -> Result<WinRmCommunicator, ConnectError> {
        let mut config = config;
        let (live, report) = establish(&config, Box::pin(interrupt)).await?;
        // Pin the certificate seen now for every reconnect.
        if let (Security::HttpsBasic(CertPolicy::TrustOnFirstUse), Some(fp)) =
            (&config.transport.security, report.host_key.clone())
        {
            config.transport.security = Security::HttpsBasic(CertPolicy::Pinned(fp));
        }
        let endpoint = config.transport.endpoint();
        let target = format!("{}@{}", config.transport.user, endpoint);
        Ok(WinRmCommunicator {
            target,
            endpoint,
            report: std::sync::Mutex::new(report.clone()),
            inner: Arc::new(tokio::sync::Mutex::new(Inner {
                live: Some(live),
                closed: false,
                report,
                config,
            })),
        })
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn comm_err(&self, command: &str, e: WinRmError) -> CommError {
        if e.is_transient() {
            CommError::ConnectionLost {
                target: self.target.clone(),
                command: short(command),
                detail: e.to_string(),
            }
        } else {
            CommError::Rejected {
                target: self.target.clone(),
                command: short(command),
                detail: e.to_string(),
            }
        }
    }

    fn live<'a>(&self, g: &'a mut Inner, command: &str) -> Result<&'a mut Live, CommError> {
        if g.closed {
            return Err(CommError::Closed {
                target: self.target.clone(),
            });
        }
        g.live.as_mut().ok_or_else(|| CommError::ConnectionLost {
            target: self.target.clone(),
            command: short(command),
            detail: "no connection (an earlier failure dropped it; reconnect first)".into(),
        })
    }

    /// Run `cmd` with stdin from `stdin`, delivering output to `sink`.
    async fn run(
        &self,
        cmd: &str,
        opts: ExecOptions<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, CommError> {
        let started = Instant::now();
        let deadline = opts.timeout.map(|t| started + t);
        // cmd.exe runs the first line of a command line and silently drops the rest, and takes
        // at most 8191 characters: refuse both here, with the reason.
        let bad = if cmd.contains(['\n', '\r']) {
            Some("it spans several lines; cmd.exe would run only the first (send scripts through powershell::command_line)".to_string())
        } else if cmd.chars().count() > MAX_COMMAND_LINE {
            Some(format!(
                "it is {} characters; cmd.exe takes at most {MAX_COMMAND_LINE}",
                cmd.chars().count()
            ))
        } else {
            None
        };
        if let Some(detail) = bad {
            return Err(CommError::Rejected {
                target: self.target.clone(),
                command: short(cmd),
                detail: format!("not a valid WinRS command line: {detail}"),
            });
        }
        let mut g = self.inner.lock().await;
        let live = self.live(&mut g, cmd)?;
        let command_id = match live.client.command(&live.shell_id, cmd, &[]).await {
            Ok(id) => id,
            Err(e) if e.fault().and_then(|f| f.wsman_code) == Some(wsman::SHELL_NOT_FOUND) => {
                // The shell timed out or the service restarted: open a new one, once.
                live.shell_id = live
                    .client
                    .create_shell()
                    .await
                    .map_err(|e| self.comm_err(cmd, e))?;
                live.client
                    .command(&live.shell_id, cmd, &[])
                    .await
                    .map_err(|e| self.comm_err(cmd, e))?
            }
            Err(e) => {
                let err = self.comm_err(cmd, e);
                if matches!(err, CommError::ConnectionLost { .. }) {
                    g.live = None;
                }
                return Err(err);
            }
        };
        let mut abandon = Abandon {
            inner: self.inner.clone(),
            command_id: Some(command_id.clone()),
        };
        let shell = live.shell_id.clone();
        let result = self
            .pump(live, &shell, &command_id, cmd, opts, deadline, sink)
            .await;
        match result {
            Ok((status, out, err, inb)) => {
                let _ = live
                    .client
                    .signal(&shell, &command_id, Signal::Terminate)
                    .await;
                abandon.command_id = None;
                Ok(ExecOutcome {
                    status,
                    stdout_bytes: out,
                    stderr_bytes: err,
                    stdin_bytes: inb,
                    duration: started.elapsed(),
                })
            }
            Err(e) => {
                abandon.command_id = None;
                match &e {
                    CommError::ConnectionLost { .. } => g.live = None,
                    _ => {
                        let _ = live
                            .client
                            .signal(&shell, &command_id, Signal::Terminate)
                            .await;
                    }
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        live: &mut Live,
        shell: &str,
        command_id: &str,
        cmd: &str,
        opts: ExecOptions<'_>,
        deadline: Option<Instant>,
        sink: &mut dyn OutputSink,
    ) -> Result<(ExitStatus, u64, u64, u64), CommError> {
        let mut stdin_bytes = 0u64;
        if let Some(stdin) = opts.stdin {
            let chunk = live.client.max_send_chunk().min(64 * 1024);
            let mut buf = vec![0u8; chunk];
            loop {
                let n = read_full(stdin, &mut buf)
                    .await
                    .map_err(|source| CommError::LocalIo {
                        what: format!("reading stdin for `{}` on {}", short(cmd), self.target),
                        source,
                    })?;
                let end = n < buf.len();
                live.client
                    .send(shell, command_id, &buf[..n], end)
                    .await
                    .map_err(|e| self.comm_err(cmd, e))?;
                stdin_bytes += n as u64;
                if end {
                    break;
                }
            }
        }
        let (mut out, mut err) = (0u64, 0u64);
        let op = live.client.settings().operation_timeout;
        loop {
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(CommError::Timeout {
                            target: self.target.clone(),
                            command: short(cmd),
                            after: opts.timeout.unwrap_or_default(),
                        });
                    }
                    // Whole seconds, at least one: the server's OperationTimeout granularity.
                    Some(op.min(Duration::from_secs(left.as_secs().max(1))))
                }
                None => None,
            };
            let r = live
                .client
                .receive(shell, command_id, wait)
                .await
                .map_err(|e| self.comm_err(cmd, e))?;
            let Some(r) = r else { continue };
            for (s, data) in &r.chunks {
                let stream = match s {
                    OutStream::Stdout => {
                        out += data.len() as u64;
                        Stream::Stdout
                    }
                    OutStream::Stderr => {
                        err += data.len() as u64;
                        Stream::Stderr
                    }
                };
                sink.output(stream, data);
            }
            if r.done() {
                let status = r
                    .exit_code
                    .map(ExitStatus::Code)
                    .unwrap_or(ExitStatus::Unknown);
                return Ok((status, out, err, stdin_bytes));
            }
        }
    }

    /// Run a PowerShell script and collect its output; errors if it fails.
    async fn powershell_ok(
        &self,
        script: &str,
        what: impl Fn(ExitStatus, String) -> CommError,
    ) -> Result<Vec<u8>, CommError> {
        let line = powershell::command_line(script);
        let (o, c) = self.exec_collect(&line, ExecOptions::default()).await?;
        if !o.status.success() {
            return Err(what(o.status, c.stderr_lossy().trim().to_string()));
        }
        Ok(c.stdout)
    }
}

async fn read_full(
    r: &mut (dyn AsyncRead + Send + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// The command line limit of cmd.exe (WinRS runs commands through it).
const MAX_COMMAND_LINE: usize = 8191;

/// The largest multiple of 3 bytes whose chunk command line fits cmd.exe's limit and the
/// envelope size.
fn upload_chunk_size(tmp: &str, max_envelope: u32) -> usize {
    let fixed = powershell::upload_chunk_cmd(tmp, "", false).len();
    let by_line = MAX_COMMAND_LINE.saturating_sub(fixed);
    let by_envelope = (max_envelope as usize).saturating_sub(4096 + fixed);
    (by_line.min(by_envelope) / 4 * 3).max(3)
}

#[async_trait]
impl Communicator for WinRmCommunicator {
    fn target(&self) -> String {
        self.target.clone()
    }

    fn connect_report(&self) -> ConnectReport {
        self.report
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    async fn exec(
        &self,
        cmd: &str,
        opts: ExecOptions<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, CommError> {
        self.run(cmd, opts, sink).await
    }

    /// Chunked base64 through PowerShell (`mode` has no meaning on Windows and is ignored).
    async fn upload(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        len: u64,
        dest: &str,
        _mode: u32,
    ) -> Result<UploadOutcome, CommError> {
        let started = Instant::now();
        let tmp = format!("{dest}.kiln-upload");
        let fail = |status: ExitStatus, stderr: String| CommError::UploadFailed {
            target: self.target.clone(),
            dest: dest.to_string(),
            status,
            stderr,
        };
        if let Some(c) = powershell::cmd_unsafe(&tmp) {
            return Err(fail(
                ExitStatus::Unknown,
                format!("the path contains {c:?}, which cmd.exe cannot take in quotes"),
            ));
        }
        let max_env = self.inner.lock().await.config.wsman.max_envelope_size;
        let chunk = upload_chunk_size(&tmp, max_env);
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        let mut buf = vec![0u8; chunk];
        loop {
            let n = read_full(reader, &mut buf)
                .await
                .map_err(|source| CommError::LocalIo {
                    what: format!("upload to {dest} on {}", self.target),
                    source,
                })?;
            if n == 0 {
                break;
            }
            let first = sent == 0;
            sent += n as u64;
            if sent > len {
                return Err(CommError::SizeMismatch {
                    target: self.target.clone(),
                    dest: dest.to_string(),
                    expected: len,
                    detail: "the reader yielded more".into(),
                });
            }
            hasher.update(&buf[..n]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
            let line = powershell::upload_chunk_cmd(&tmp, &b64, first);
            let (o, c) = self.exec_collect(&line, ExecOptions::default()).await?;
            if !o.status.success() {
                return Err(fail(o.status, c.stderr_lossy().trim().to_string()));
            }
        }
        if sent != len {
            return Err(CommError::SizeMismatch {
                target: self.target.clone(),
                dest: dest.to_string(),
                expected: len,
                detail: format!("the reader yielded {sent}"),
            });
        }
        let out = self
            .powershell_ok(&powershell::upload_decode(&tmp, dest), fail)
            .await?;
        let text = String::from_utf8_lossy(&out);
        let mut words = text.split_whitespace();
        let size: Option<u64> = words.next().and_then(|w| w.parse().ok());
        let hash = words.next().unwrap_or("").to_ascii_lowercase();
        let want: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if size != Some(len) || hash != want {
            return Err(CommError::SizeMismatch {
                target: self.target.clone(),
                dest: dest.to_string(),
                expected: len,
                detail: format!(
                    "the guest reports {:?} (size SHA-256), expected {len} {want}",
                    text.trim()
                ),
            });
        }
        Ok(UploadOutcome {
            bytes: len,
            duration: started.elapsed(),
        })
    }

    async fn download(
        &self,
        src: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<u64, CommError> {
        let out = self
            .powershell_ok(&powershell::download(src), |status, stderr| {
                CommError::DownloadFailed {
                    target: self.target.clone(),
                    src: src.to_string(),
                    status,
                    stderr,
                }
            })
            .await?;
        let text: String = String::from_utf8_lossy(&out).split_whitespace().collect();
        let data = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| CommError::DownloadFailed {
                target: self.target.clone(),
                src: src.to_string(),
                status: ExitStatus::Code(0),
                stderr: format!("the guest's output is not base64: {e}"),
            })?;
        let what = || format!("download of {src} from {}", self.target);
        writer
            .write_all(&data)
            .await
            .map_err(|source| CommError::LocalIo {
                what: what(),
                source,
            })?;
        writer.flush().await.map_err(|source| CommError::LocalIo {
            what: what(),
            source,
        })?;
        Ok(data.len() as u64)
    }

    async fn reconnect(&self, interrupt: InterruptFuture<'_>) -> Result<ConnectReport, CommError> {
        let mut g = self.inner.lock().await;
        if g.closed {
            return Err(CommError::Closed {
                target: self.target.clone(),
            });
        }
        g.live = None;
        let (live, report) = establish(&g.config, interrupt).await?;
        g.live = Some(live);
        g.report = report.clone();
        if let Ok(mut r) = self.report.lock() {
            *r = report.clone();
        }
        Ok(report)
    }

    async fn close(&self) -> Result<(), CommError> {
        let mut g = self.inner.lock().await;
        g.closed = true;
        if let Some(mut live) = g.live.take() {
            let shell = live.shell_id.clone();
            live.client
                .delete_shell(&shell)
                .await
                .map_err(|e| self.comm_err("(delete shell)", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_chunks_fit_cmd_exe() {
        let tmp = "C:\\Users\\kiln\\file.bin.kiln-upload";
        let n = upload_chunk_size(tmp, 153_600);
        assert_eq!(n / 3 * 3, n);
        let line = powershell::upload_chunk_cmd(tmp, &"A".repeat(n / 3 * 4), false);
        assert!(line.len() <= MAX_COMMAND_LINE, "{}", line.len());
        let line = powershell::upload_chunk_cmd(tmp, &"A".repeat(n / 3 * 4 + 4), false);
        assert!(line.len() > MAX_COMMAND_LINE - 4);
        assert!(
            upload_chunk_size(tmp, 6000) < n,
            "a small envelope limits the chunk"
        );
    }
}
