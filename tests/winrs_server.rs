//! A WinRS (Windows Remote Shell over WS-Management) test server that runs on Linux.
//!
//! It implements the `cmd` shell resource the way Windows' WinRM service answers it:
//! Create (a ShellId), Command (a CommandId; the process starts at once), Send (stdin, `End`
//! closes it), Receive (stdout/stderr chunks as base64 `rsp:Stream`s, `End="true"` markers and
//! `CommandState Done` with the `ExitCode` once the process has exited and its output is
//! drained; the `w:TimedOut` fault with WSManFault code 2150858793 when nothing arrived within
//! the request's `OperationTimeout`), Signal (`terminate` kills the process group and releases
//! the command, `ctrl_c` sends SIGINT) and Delete. Receive responses are cut to fit the
//! client's `MaxEnvelopeSize`. Unknown shells get the 2150858843 fault.
//!
//! Transports: HTTPS with Basic authentication (a self-signed certificate made with rcgen) or
//! HTTP with NTLMv2 (`Authorization: Negotiate`/`NTLM`, the client's NTLMv2 proof and MIC
//! verified against the configured user and password) and every body sealed
//! (`multipart/encrypted`, MS-WSMV 2.2.9.1.1). A plaintext SOAP body over HTTP is refused with
//! HTTP 400 and counted in [`Stats::plaintext_refused`].
//!
//! # The Linux shim: what the received command lines run as
//!
//! WinRS hands a command line to `cmd.exe`. This server has no `cmd.exe` or PowerShell, so:
//!
//! 1. `powershell[.exe] … -EncodedCommand|-enc|-ec|-e <base64>` (case-insensitive): the UTF-16LE
//!    script is decoded, and the line `$ProgressPreference = 'SilentlyContinue'` (which kiln's
//!    command lines prepend) is dropped. If the script is one of kiln's WinRM file transfer
//!    scripts (`agents/src/winrm/powershell.rs`: decode the uploaded base64 lines into the
//!    destination and print `<size> <SHA-256>`; print a file as base64), the shim performs
//!    exactly that file operation natively; kiln's pull script (download a URL of kiln's file
//!    endpoint to a temporary file, check size and SHA-256, move it onto the destination,
//!    print `<size> <SHA-256>`) is performed as one HTTP GET ([`shim_pull`]).
//!    **Any other script is run by `/bin/sh -c`**:
//!    tests write their "PowerShell" payloads in POSIX shell.
//! 2. Any other command line (`rsp:Command` and its `rsp:Arguments` joined by spaces) is run by
//!    `/bin/sh -c` in place of `cmd.exe /c`. (kiln's upload chunks, `echo <base64> >> "<tmp>"`, mean
//!    the same in both.)
//!
//! Processes run in their own process group, with the server's environment and working
//! directory. Nothing else of Windows is emulated.
//!
//! ## kiln's fixed Windows commands (the `winrs` test guest)
//!
//! For kiln's Windows build steps to run end to end in the `winrs` test guest (a Linux VM,
//! xtask/src/images/winrs.rs), the shim maps the commands kiln itself sends to documented Linux
//! equivalents ([`shim_windows_line`], [`shim_windows_script`]); they are checked first, before
//! the rules above:
//!
//! | kiln sends | the shim runs |
//! |---|---|
//! | a drive path `X:\a\b` anywhere below (uploads, downloads, scripts) | `$KILN_WINRS_ROOT/x/a/b` ([`host_path`]; root `/var/lib/kiln-winrs`, so `C:\` is `/var/lib/kiln-winrs/c`; case-sensitive) |
//! | `shutdown /r …` (WindowsRestart's default `shutdown /r /f /t 0 /c "packer restart"`) | a real `reboot` of the guest through busybox init, 1 s later, started by the server itself in a process group of its own (never the command's, which the client's Signal/Delete kills); the command exits 0 |
//! | `shutdown /s …` (kiln's shutdown step) | a real `poweroff`, the same way |
//! | the default restartCheckCommand (`… [System.Net.Dns]::GetHostName() … restarted.`) | `echo "$(hostname) restarted."` (the hostname is the answer file's ComputerName) |
//! | `powershell … -File "<path>"` (a PowerShell customizer kiln uploaded) | the file's text without kiln's wrapper lines ([`unwrap_kiln_script`]: BOM, `$ProgressPreference …`, `if ($LASTEXITCODE) …`) under `/bin/sh -c`; its exit code |
//! | `powershell … -File "…\kiln-sysprep.ps1"` | [`sysprep_sh`]: the sysprep wrapper's control flow (`c:\DeprovisioningScript.ps1` run instead when present, by `sh`, after the cached answer files are removed; else the Azure-agent skip lines, cached answer files removed, `ImageState` in `C:\Windows\Setup\State\State.ini` polled from IMAGE_STATE_COMPLETE through IMAGE_STATE_UNDEPLOYABLE to IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE; no power-off, as `Sysprep.exe /quit`) |
//! | `-EncodedCommand` of the elevated runner call (`& '…\kiln-elevated.ps1' -ScriptPath '…' -AsSystem` or `-User '…' -Password '…'`; runElevated / runAsSystem) | the script (unwrapped) under `/bin/sh -c` as root (the guest's only account), stderr merged into stdout as the scheduled task's output file merges them, streamed; its exit code. Fails as PowerShell would when the runner was not uploaded first |
//! | `-EncodedCommand` of the elevated runner call whose script is kiln's Windows Update round (`& (Join-Path $env:SystemRoot 'Temp\kiln-windows-update.ps1') -SearchCriteria '…' -Filters @(…) -UpdateLimit N`) | [`windows_update_round`]: one round of the Windows Update Agent emulation ([`crate::winrs_wu`]: fake updates in `C:\kiln-wu\pending`, the script's `kiln-wu:` lines and exit codes 0/101/102/1), run when the command starts; fails as PowerShell would when `kiln-windows-update.ps1` was not uploaded |
//! | `-EncodedCommand` of the File step's directory check (`$d = Split-Path -Parent '…'; if ($d -and -not (Test-Path …)) { exit 3 }; exit 0`) | `[ -d <mapped parent> ] \|\| exit 3` |
//! | `echo <base64> >[>] "X:\…"` (upload chunks into a drive path) | the same `echo` into the mapped path |
//!
//! Not mapped (they fail in the guest): `runAsSystem`'s SYSTEM identity (everything runs as
//! root), anything else of Windows.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_agents::winrm::ntlm::{Acceptor, Session};
use kiln_agents::winrm::wsman::{self, ns};
use kiln_agents::winrm::xml::{self, escape, Element};
use kiln_agents::winrm::{encryption, powershell};
use kiln_agents::HostKeyFingerprint;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin};
use tokio::sync::watch;

/// How clients reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WinrsAuth {
    /// HTTPS, Basic authentication.
    HttpsBasic,
    /// HTTP, NTLMv2 with message sealing.
    HttpNtlm,
}

/// A self-signed certificate and its key (DER), reusable across restarts.
#[derive(Clone)]
pub struct TestCert {
    /// Certificate DER.
    pub cert: Vec<u8>,
    /// PKCS#8 private key DER.
    pub key: Vec<u8>,
}

impl TestCert {
    /// A fresh self-signed certificate for `localhost` and `127.0.0.1`.
    pub fn generate() -> Result<TestCert> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generating the test server's certificate")?;
        Ok(TestCert {
            cert: ck.cert.der().to_vec(),
            key: ck.signing_key.serialize_der(),
        })
    }

    /// Its fingerprint as kiln reports it.
    pub fn fingerprint(&self) -> HostKeyFingerprint {
        kiln_agents::winrm::cert_fingerprint(&self.cert)
    }
}

/// Server settings.
#[derive(Clone)]
pub struct WinrsServerConfig {
    /// Transport and authentication.
    pub auth: WinrsAuth,
    /// The one account.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub bind: SocketAddr,
    /// Upper bound of the OperationTimeout a Receive may wait (Windows: `MaxTimeoutms`, 60 s).
    pub max_operation_timeout: Duration,
    /// HTTPS certificate; generated when `None`.
    pub cert: Option<TestCert>,
}

impl WinrsServerConfig {
    /// Defaults: `127.0.0.1:0`, 60 s operation timeout cap, a fresh certificate.
    pub fn new(auth: WinrsAuth, user: &str, password: &str) -> Self {
        WinrsServerConfig {
            auth,
            user: user.into(),
            password: password.into(),
            bind: "127.0.0.1:0".parse().expect("valid address"),
            max_operation_timeout: Duration::from_secs(60),
            cert: None,
        }
    }
}

/// What the server saw; tests assert on these.
#[derive(Debug, Default)]
pub struct Stats {
    /// WS-Man requests handled (authenticated, parsed).
    pub requests: AtomicU64,
    /// Requests that arrived sealed (HTTP/NTLM).
    pub sealed_requests: AtomicU64,
    /// Plaintext SOAP bodies refused on HTTP.
    pub plaintext_refused: AtomicU64,
    /// NTLM handshakes that succeeded.
    pub ntlm_logons: AtomicU64,
    /// ... of which carried a verified MIC.
    pub ntlm_mics: AtomicU64,
    /// Authentication failures (Basic or NTLM).
    pub auth_failures: AtomicU64,
    /// OperationTimeout faults sent.
    pub operation_timeouts: AtomicU64,
    /// Receive responses sent.
    pub receives: AtomicU64,
    /// Largest response envelope (plaintext bytes).
    pub max_response: AtomicU64,
    /// Shells created.
    pub shells_created: AtomicU64,
    /// Commands started.
    pub commands: AtomicU64,
    /// Signals received.
    pub signals: AtomicU64,
    /// Shells deleted.
    pub shells_deleted: AtomicU64,
    /// Why the last authentication failed.
    pub last_auth_error: Mutex<Option<String>>,
}

impl Stats {
    /// Read a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

/// A running server; stopped (connections dropped, processes killed) on drop.
pub struct WinrsServer {
    addr: SocketAddr,
    auth: WinrsAuth,
    cert: Option<TestCert>,
    stats: Arc<Stats>,
    state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for WinrsServer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        self.state.kill_all();
    }
}

impl WinrsServer {
    /// Bind and serve in the background (on the current tokio runtime).
    pub async fn start(config: WinrsServerConfig) -> Result<WinrsServer> {
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding the WinRS test server to {}", config.bind))?;
        let addr = listener.local_addr()?;
        let cert = match (&config.auth, &config.cert) {
            (WinrsAuth::HttpsBasic, Some(c)) => Some(c.clone()),
            (WinrsAuth::HttpsBasic, None) => Some(TestCert::generate()?),
            (WinrsAuth::HttpNtlm, _) => None,
        };
        let tls = match &cert {
            Some(c) => {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let cfg = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![rustls::pki_types::CertificateDer::from(c.cert.clone())],
                        rustls::pki_types::PrivateKeyDer::Pkcs8(c.key.clone().into()),
                    )
                    .context("TLS configuration of the WinRS test server")?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
            }
            None => None,
        };
        let stats = Arc::new(Stats::default());
        let state = Arc::new(State {
            config: config.clone(),
            shells: Mutex::new(HashMap::new()),
            stats: stats.clone(),
            endpoint: format!(
                "{}://{addr}/wsman",
                if tls.is_some() { "https" } else { "http" }
            ),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let conn = Arc::new(tokio::sync::Mutex::new(ConnAuth::default()));
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        let conn = conn.clone();
                        async move { Ok::<_, Infallible>(st.handle(req, &conn).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acc) => {
                            if let Ok(s) = acc.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(WinrsServer {
            addr,
            auth: config.auth,
            cert,
            stats,
            state,
            task: Some(task),
        })
    }

    /// Stop serving and wait until the port is free again (a "reboot": connections drop, shells
    /// and their processes are gone).
    pub async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.state.kill_all();
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT/wsman`.
    pub fn endpoint(&self) -> String {
        self.state.endpoint.clone()
    }

    /// The transport.
    pub fn auth(&self) -> &WinrsAuth {
        &self.auth
    }

    /// The HTTPS certificate.
    pub fn cert(&self) -> Option<&TestCert> {
        self.cert.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Shells currently open.
    pub fn open_shells(&self) -> usize {
        self.state.shells.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Per-connection authentication state (NTLM authenticates the connection).
#[derive(Default)]
struct ConnAuth {
    acceptor: Option<Acceptor>,
    session: Option<Session>,
}

#[derive(Default)]
struct Output {
    chunks: VecDeque<(bool, Vec<u8>)>, // (is_stderr, data)
    exit: Option<i32>,
}

struct Command {
    output: Mutex<Output>,
    changed: watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pid: Option<i32>,
}

struct Shell {
    commands: HashMap<String, Arc<Command>>,
}

struct State {
    config: WinrsServerConfig,
    shells: Mutex<HashMap<String, Shell>>,
    stats: Arc<Stats>,
    endpoint: String,
}

fn guid() -> String {
    let b: [u8; 16] = rand_bytes();
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn rand_bytes() -> [u8; 16] {
    // Good enough for ids in a test server: time, a counter and the pid through SHA-256.
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(N.fetch_add(1, Ordering::SeqCst).to_le_bytes());
    h.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn kill_group(pid: Option<i32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

fn text_response(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

fn unauthorized(www: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(WWW_AUTHENTICATE, www)
        .header(hyper::header::CONTENT_LENGTH, "0")
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// A fault to send back.
struct FaultOut {
    code: &'static str,
    subcode: &'static str,
    wsman_code: u32,
    reason: String,
}

impl State {
    fn kill_all(&self) {
        if let Ok(mut shells) = self.shells.lock() {
            for (_, sh) in shells.drain() {
                for (_, c) in sh.commands {
                    kill_group(c.pid, libc::SIGKILL);
                }
            }
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &tokio::sync::Mutex<ConnAuth>,
    ) -> Response<Full<Bytes>> {
        let ctype = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let authz = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if req.uri().path() != "/wsman" {
            return text_response(StatusCode::NOT_FOUND, "only /wsman is served");
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => return text_response(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        match self.config.auth {
            WinrsAuth::HttpsBasic => {
                let ok = authz
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Basic "))
                    .and_then(|b| {
                        base64::engine::general_purpose::STANDARD
                            .decode(b.trim())
                            .ok()
                    })
                    .and_then(|b| String::from_utf8(b).ok())
                    .is_some_and(|s| {
                        s.split_once(':').is_some_and(|(u, p)| {
                            u.eq_ignore_ascii_case(&self.config.user) && p == self.config.password
                        })
                    });
                if !ok {
                    if authz.is_some() {
                        self.stats.auth_failures.fetch_add(1, Ordering::SeqCst);
                    }
                    return unauthorized("Basic realm=\"WSMAN\"");
                }
                let (status, out) = self.soap(&body).await;
                Response::builder()
                    .status(status)
                    .header(CONTENT_TYPE, "application/soap+xml;charset=UTF-8")
                    .body(Full::new(Bytes::from(out)))
                    .expect("valid response")
            }
            WinrsAuth::HttpNtlm => self.ntlm(conn, authz, &ctype, body).await,
        }
    }

    async fn ntlm(
        &self,
        conn: &tokio::sync::Mutex<ConnAuth>,
        authz: Option<String>,
        ctype: &str,
        body: Vec<u8>,
    ) -> Response<Full<Bytes>> {
        let mut c = conn.lock().await;
        if let Some(a) = authz {
            let (scheme, token) = match a.split_once(' ') {
                Some((s, t))
                    if s.eq_ignore_ascii_case("Negotiate") || s.eq_ignore_ascii_case("NTLM") =>
                {
                    (s.to_string(), t.trim().to_string())
                }
                _ => return unauthorized("Negotiate"),
            };
            let Ok(tok) = base64::engine::general_purpose::STANDARD.decode(&token) else {
                return text_response(StatusCode::BAD_REQUEST, "token is not base64");
            };
            if tok.len() < 12 || &tok[..8] != b"NTLMSSP\0" {
                // SPNEGO-wrapped or Kerberos tokens: not supported by this server.
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "only raw NTLM tokens are supported (no SPNEGO/Kerberos)",
                );
            }
            match tok[8] {
                1 => {
                    let mut acc =
                        Acceptor::new(&self.config.user, &self.config.password, "KILN-WINRS");
                    match acc.challenge(&tok) {
                        Ok(ch) => {
                            c.acceptor = Some(acc);
                            c.session = None;
                            let b64 = base64::engine::general_purpose::STANDARD.encode(ch);
                            return unauthorized(&format!("{scheme} {b64}"));
                        }
                        Err(e) => {
                            self.stats.auth_failures.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut l) = self.stats.last_auth_error.lock() {
                                *l = Some(e.to_string());
                            }
                            return text_response(StatusCode::UNAUTHORIZED, &e.to_string());
                        }
                    }
                }
                3 => {
                    let Some(acc) = c.acceptor.take() else {
                        return unauthorized("Negotiate");
                    };
                    match acc.accept(&tok) {
                        Ok(ok) => {
                            self.stats.ntlm_logons.fetch_add(1, Ordering::SeqCst);
                            if ok.mic {
                                self.stats.ntlm_mics.fetch_add(1, Ordering::SeqCst);
                            }
                            c.session = Some(ok.session);
                            if body.is_empty() {
                                return Response::builder()
                                    .status(StatusCode::OK)
                                    .header(hyper::header::CONTENT_LENGTH, "0")
                                    .body(Full::new(Bytes::new()))
                                    .expect("valid response");
                            }
                        }
                        Err(e) => {
                            self.stats.auth_failures.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut l) = self.stats.last_auth_error.lock() {
                                *l = Some(e.to_string());
                            }
                            return unauthorized("Negotiate");
                        }
                    }
                }
                _ => return text_response(StatusCode::BAD_REQUEST, "unexpected NTLM message"),
            }
        }
        let Some(session) = c.session.as_mut() else {
            return unauthorized("Negotiate");
        };
        if !encryption::is_encrypted(ctype) {
            self.stats.plaintext_refused.fetch_add(1, Ordering::SeqCst);
            return text_response(
                StatusCode::BAD_REQUEST,
                "plaintext SOAP over HTTP is refused: seal the body (multipart/encrypted)",
            );
        }
        let plain = match encryption::unseal(session, &body) {
            Ok(p) => p,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        self.stats.sealed_requests.fetch_add(1, Ordering::SeqCst);
        // Release the connection lock while a Receive waits: the client sends nothing else on
        // this connection meanwhile, and the session is needed again only to seal the answer.
        drop(c);
        let (status, out) = self.soap(&plain).await;
        let mut c = conn.lock().await;
        let Some(session) = c.session.as_mut() else {
            return unauthorized("Negotiate");
        };
        let sealed = encryption::seal(session, out.as_bytes());
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, encryption::CONTENT_TYPE)
            .body(Full::new(Bytes::from(sealed)))
            .expect("valid response")
    }

    fn envelope(&self, action: &str, relates_to: &str, body: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xml:lang="en-US" xmlns:s="{}" xmlns:a="{}" xmlns:x="{}" xmlns:w="{}" xmlns:rsp="{}" xmlns:p="{}"><s:Header><a:Action>{action}</a:Action><a:MessageID>uuid:{}</a:MessageID><a:To>{}</a:To><a:RelatesTo>{}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"#,
            ns::SOAP,
            ns::ADDRESSING,
            ns::TRANSFER,
            ns::WSMAN,
            ns::SHELL,
            ns::WSMAN_MS,
            guid(),
            wsman::ANONYMOUS,
            escape(relates_to)
        )
    }

    fn fault(&self, relates_to: &str, f: FaultOut) -> (StatusCode, String) {
        let body = format!(
            r#"<s:Fault><s:Code><s:Value>{}</s:Value><s:Subcode><s:Value>{}</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{}</s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="{}" Code="{}" Machine="kiln-winrs"><f:Message>{}</f:Message></f:WSManFault></s:Detail></s:Fault>"#,
            f.code,
            f.subcode,
            escape(&f.reason),
            ns::WSMAN_FAULT,
            f.wsman_code,
            escape(&f.reason)
        );
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            self.envelope(wsman::action::FAULT, relates_to, &body),
        )
    }

    /// Handle one plaintext SOAP request.
    async fn soap(&self, doc: &[u8]) -> (StatusCode, String) {
        self.stats.requests.fetch_add(1, Ordering::SeqCst);
        let (status, out) = match xml::parse(doc) {
            Ok(env) => self.dispatch(&env).await,
            Err(e) => self.fault(
                "",
                FaultOut {
                    code: "s:Sender",
                    subcode: "w:InvalidMessageInformationHeader",
                    wsman_code: 2150858817,
                    reason: format!("the request is not XML: {e}"),
                },
            ),
        };
        self.stats
            .max_response
            .fetch_max(out.len() as u64, Ordering::SeqCst);
        (status, out)
    }

    async fn dispatch(&self, env: &Element) -> (StatusCode, String) {
        let header = env.child(ns::SOAP, "Header");
        let h = |n: &str, name: &str| {
            header
                .and_then(|h| h.child(n, name))
                .map(|e| e.text_trim().to_string())
                .unwrap_or_default()
        };
        let action = h(ns::ADDRESSING, "Action");
        let msg_id = h(ns::ADDRESSING, "MessageID");
        let resource = h(ns::WSMAN, "ResourceURI");
        let max_env: usize = h(ns::WSMAN, "MaxEnvelopeSize").parse().unwrap_or(153_600);
        let op_timeout = wsman::parse_duration(&h(ns::WSMAN, "OperationTimeout"))
            .unwrap_or(Duration::from_secs(60))
            .min(self.config.max_operation_timeout);
        let shell_id = header
            .and_then(|h| h.child(ns::WSMAN, "SelectorSet"))
            .and_then(|s| {
                s.children_named(ns::WSMAN, "Selector")
                    .find(|e| e.attr("Name") == Some("ShellId"))
            })
            .map(|e| e.text_trim().to_string());
        let body = env.child(ns::SOAP, "Body");
        if resource != wsman::RESOURCE_CMD {
            return self.fault(
                &msg_id,
                FaultOut {
                    code: "s:Sender",
                    subcode: "w:DestinationUnreachable",
                    wsman_code: 2150858770,
                    reason: format!(
                        "unsupported ResourceURI {resource:?}; only the cmd shell is served"
                    ),
                },
            );
        }
        let no_shell = |id: &str| {
            FaultOut {
            code: "s:Sender",
            subcode: "w:InvalidSelectors",
            wsman_code: wsman::SHELL_NOT_FOUND,
            reason: format!("The request for the Windows Remote Shell with ShellId {id} failed because the shell was not found on the server."),
        }
        };
        match action.as_str() {
            wsman::action::CREATE => {
                let id = guid();
                if let Ok(mut s) = self.shells.lock() {
                    s.insert(
                        id.clone(),
                        Shell {
                            commands: HashMap::new(),
                        },
                    );
                }
                self.stats.shells_created.fetch_add(1, Ordering::SeqCst);
                let body = format!(
                    r#"<x:ResourceCreated><a:Address>{}</a:Address><a:ReferenceParameters><w:ResourceURI>{}</w:ResourceURI><w:SelectorSet><w:Selector Name="ShellId">{id}</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated><rsp:Shell><rsp:ShellId>{id}</rsp:ShellId><rsp:ResourceUri>{}</rsp:ResourceUri><rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>"#,
                    escape(&self.endpoint),
                    wsman::RESOURCE_CMD,
                    wsman::RESOURCE_CMD
                );
                (
                    StatusCode::OK,
                    self.envelope(
                        "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
                        &msg_id,
                        &body,
                    ),
                )
            }
            wsman::action::DELETE => {
                let id = shell_id.unwrap_or_default();
                let removed = self.shells.lock().ok().and_then(|mut s| s.remove(&id));
                match removed {
                    Some(sh) => {
                        for c in sh.commands.values() {
                            kill_group(c.pid, libc::SIGKILL);
                        }
                        self.stats.shells_deleted.fetch_add(1, Ordering::SeqCst);
                        (
                            StatusCode::OK,
                            self.envelope(
                                "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
                                &msg_id,
                                "",
                            ),
                        )
                    }
                    None => self.fault(&msg_id, no_shell(&id)),
                }
            }
            wsman::action::COMMAND => {
                let id = shell_id.unwrap_or_default();
                if !self
                    .shells
                    .lock()
                    .map(|s| s.contains_key(&id))
                    .unwrap_or(false)
                {
                    return self.fault(&msg_id, no_shell(&id));
                }
                let cl = body.and_then(|b| b.child(ns::SHELL, "CommandLine"));
                let mut line = cl
                    .and_then(|c| c.child(ns::SHELL, "Command"))
                    .map(|c| c.text_trim().to_string())
                    .unwrap_or_default();
                for a in cl
                    .into_iter()
                    .flat_map(|c| c.children_named(ns::SHELL, "Arguments"))
                {
                    line.push(' ');
                    line.push_str(&a.text);
                }
                let cmd = match start(&line) {
                    Ok(c) => c,
                    Err(e) => {
                        return self.fault(
                            &msg_id,
                            FaultOut {
                                code: "s:Receiver",
                                subcode: "w:InternalError",
                                wsman_code: 2147942402,
                                reason: format!("cannot start {line:?}: {e}"),
                            },
                        )
                    }
                };
                let cid = guid();
                if let Ok(mut s) = self.shells.lock() {
                    if let Some(sh) = s.get_mut(&id) {
                        sh.commands.insert(cid.clone(), cmd);
                    }
                }
                self.stats.commands.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::OK,
                    self.envelope(
                        "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandResponse",
                        &msg_id,
                        &format!("<rsp:CommandResponse><rsp:CommandId>{cid}</rsp:CommandId></rsp:CommandResponse>"),
                    ),
                )
            }
            wsman::action::SEND | wsman::action::RECEIVE | wsman::action::SIGNAL => {
                let id = shell_id.unwrap_or_default();
                let (el, attr_host) = match action.as_str() {
                    wsman::action::SEND => ("Send", "Stream"),
                    wsman::action::RECEIVE => ("Receive", "DesiredStream"),
                    _ => ("Signal", ""),
                };
                let op = body.and_then(|b| b.child(ns::SHELL, el));
                let cid_el = if attr_host.is_empty() {
                    op
                } else {
                    op.and_then(|o| o.child(ns::SHELL, attr_host))
                };
                let cid = cid_el
                    .and_then(|e| e.attr("CommandId"))
                    .unwrap_or_default()
                    .to_string();
                let cmd = {
                    let shells = match self.shells.lock() {
                        Ok(s) => s,
                        Err(_) => return self.fault(&msg_id, no_shell(&id)),
                    };
                    let Some(sh) = shells.get(&id) else {
                        return self.fault(&msg_id, no_shell(&id));
                    };
                    sh.commands
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&cid))
                        .map(|(_, v)| v.clone())
                };
                let Some(cmd) = cmd else {
                    return self.fault(
                        &msg_id,
                        FaultOut {
                            code: "s:Sender",
                            subcode: "w:InvalidParameter",
                            wsman_code: 2150858843,
                            reason: format!("no command {cid:?} in shell {id}"),
                        },
                    );
                };
                match el {
                    "Send" => {
                        let stream = cid_el.expect("Send carries a Stream");
                        let data: String = stream.text.split_whitespace().collect();
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(data.as_bytes())
                            .unwrap_or_default();
                        let end = stream
                            .attr("End")
                            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                        let mut stdin = cmd.stdin.lock().await;
                        if let Some(w) = stdin.as_mut() {
                            let _ = w.write_all(&data).await;
                            let _ = w.flush().await;
                        }
                        if end {
                            *stdin = None;
                        }
                        (
                            StatusCode::OK,
                            self.envelope(
                                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/SendResponse",
                                &msg_id,
                                "<rsp:SendResponse/>",
                            ),
                        )
                    }
                    "Signal" => {
                        self.stats.signals.fetch_add(1, Ordering::SeqCst);
                        let code = op
                            .and_then(|o| o.child(ns::SHELL, "Code"))
                            .map(|c| c.text_trim().to_string())
                            .unwrap_or_default();
                        if code == wsman::Signal::CtrlC.uri() {
                            kill_group(cmd.pid, libc::SIGINT);
                        } else {
                            kill_group(cmd.pid, libc::SIGKILL);
                            if let Ok(mut s) = self.shells.lock() {
                                if let Some(sh) = s.get_mut(&id) {
                                    sh.commands.retain(|k, _| !k.eq_ignore_ascii_case(&cid));
                                }
                            }
                        }
                        (
                            StatusCode::OK,
                            self.envelope(
                                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/SignalResponse",
                                &msg_id,
                                "<rsp:SignalResponse/>",
                            ),
                        )
                    }
                    _ => self.receive(&msg_id, &cid, &cmd, op_timeout, max_env).await,
                }
            }
            other => self.fault(
                &msg_id,
                FaultOut {
                    code: "s:Sender",
                    subcode: "a:ActionNotSupported",
                    wsman_code: 2150858771,
                    reason: format!("unsupported Action {other:?}"),
                },
            ),
        }
    }

    async fn receive(
        &self,
        msg_id: &str,
        cid: &str,
        cmd: &Command,
        wait: Duration,
        max_env: usize,
    ) -> (StatusCode, String) {
        let mut rx = cmd.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        // Raw bytes per response: what fits MaxEnvelopeSize after base64 and framing.
        let budget = (max_env.saturating_sub(2048) / 4 * 3).max(1);
        loop {
            rx.borrow_and_update();
            {
                let mut out = cmd.output.lock().expect("output lock");
                if !out.chunks.is_empty() || out.exit.is_some() {
                    let mut body = String::from("<rsp:ReceiveResponse>");
                    let mut used = 0usize;
                    while let Some((err, data)) = out.chunks.pop_front() {
                        let room = budget.saturating_sub(used);
                        if room == 0 {
                            out.chunks.push_front((err, data));
                            break;
                        }
                        let (now, later) = data.split_at(room.min(data.len()));
                        if !later.is_empty() {
                            out.chunks.push_front((err, later.to_vec()));
                        }
                        used += now.len();
                        body.push_str(&format!(
                            r#"<rsp:Stream Name="{}" CommandId="{cid}">{}</rsp:Stream>"#,
                            if err { "stderr" } else { "stdout" },
                            base64::engine::general_purpose::STANDARD.encode(now)
                        ));
                    }
                    match (out.exit, out.chunks.is_empty()) {
                        (Some(code), true) => body.push_str(&format!(
                            r#"<rsp:Stream Name="stdout" CommandId="{cid}" End="true"></rsp:Stream><rsp:Stream Name="stderr" CommandId="{cid}" End="true"></rsp:Stream><rsp:CommandState CommandId="{cid}" State="{}"><rsp:ExitCode>{code}</rsp:ExitCode></rsp:CommandState>"#,
                            wsman::state::DONE
                        )),
                        _ => body.push_str(&format!(
                            r#"<rsp:CommandState CommandId="{cid}" State="{}"/>"#,
                            wsman::state::RUNNING
                        )),
                    }
                    body.push_str("</rsp:ReceiveResponse>");
                    self.stats.receives.fetch_add(1, Ordering::SeqCst);
                    return (
                        StatusCode::OK,
                        self.envelope(
                            "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse",
                            msg_id,
                            &body,
                        ),
                    );
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                self.stats.operation_timeouts.fetch_add(1, Ordering::SeqCst);
                return self.fault(
                    msg_id,
                    FaultOut {
                        code: "s:Receiver",
                        subcode: "w:TimedOut",
                        wsman_code: wsman::OPERATION_TIMED_OUT,
                        reason: "The WS-Management service cannot complete the operation within the time specified in OperationTimeout.".into(),
                    },
                );
            }
        }
    }
}

/// What the shim runs for a command line (see the module docs).
#[derive(Debug, PartialEq, Eq)]
pub enum Shimmed {
    /// `/bin/sh -c <script>`.
    Sh(String),
    /// Decode the base64 lines of `tmp` into `dest`, delete `tmp`, print `<size> <SHA-256>`.
    DecodeAndHash(String, String),
    /// Print a file as base64.
    Base64(String),
    /// kiln's pull script (`powershell::pull_file`): GET `url` into `tmp`, check `size` and
    /// `sha256`, move onto `dest`, print `<size> <SHA-256>` (see [`shim_pull`]).
    Pull {
        /// The endpoint's one-time URL.
        url: String,
        /// The temporary file.
        tmp: String,
        /// The destination.
        dest: String,
        /// The size the host sent.
        size: u64,
        /// The SHA-256 the host computed (upper-case hex).
        sha256: String,
    },
}

/// Parse a PowerShell single-quoted literal at the start of `s`; returns it and the rest.
fn ps_literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let mut chars = s.char_indices();
    if chars.next()?.1 != '\'' {
        return None;
    }
    let mut out = String::new();
    let mut it = s[1..].char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if c == '\'' {
            if it.peek().map(|(_, c)| *c) == Some('\'') {
                it.next();
                out.push('\'');
                continue;
            }
            return Some((out, &s[1 + i + 1..]));
        }
        out.push(c);
    }
    None
}

/// Recognise kiln's own file-transfer scripts; anything else goes to `/bin/sh -c`.
pub fn shim_powershell(script: &str) -> Shimmed {
    let lines: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && *l != "$ProgressPreference = 'SilentlyContinue'"
                && *l != "$ErrorActionPreference = 'Stop'"
        })
        .collect();
    fn after<'a>(l: &'a str, prefix: &str) -> Option<(String, &'a str)> {
        l.strip_prefix(prefix).and_then(ps_literal)
    }
    if let [t, d, body @ ..] = lines.as_slice() {
        let want: Vec<&str> = powershell::UPLOAD_DECODE_BODY
            .lines()
            .map(str::trim)
            .collect();
        if body == want.as_slice() {
            if let (Some((tmp, r1)), Some((dest, r2))) = (after(t, "$t = "), after(d, "$d = ")) {
                if r1.trim().is_empty() && r2.trim().is_empty() {
                    return Shimmed::DecodeAndHash(host_path(&tmp), host_path(&dest));
                }
            }
        }
    }
    if let Some(p) = shim_pull(&lines) {
        return p;
    }
    if let [one] = lines.as_slice() {
        if let Some((p, rest)) = after(one, "[Convert]::ToBase64String([IO.File]::ReadAllBytes(") {
            if rest.trim() == "))" {
                return Shimmed::Base64(host_path(&p));
            }
        }
    }
    if let Some(mapped) = shim_windows_script(&lines) {
        return mapped;
    }
    Shimmed::Sh(
        script
            .lines()
            .filter(|l| l.trim() != "$ProgressPreference = 'SilentlyContinue'")
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Recognise kiln's pull script (`powershell::pull_file`, its lines trimmed, the preference
/// lines dropped): `$u`, `$t`, `$d` as single-quoted literals, `$s` a number, `$x` hex, then
/// exactly [`powershell::PULL_BODY`].
pub fn shim_pull(lines: &[&str]) -> Option<Shimmed> {
    let [u, t, d, size, x, body @ ..] = lines else {
        return None;
    };
    let want: Vec<&str> = powershell::PULL_BODY.lines().map(str::trim).collect();
    if body != want.as_slice() {
        return None;
    }
    let lit = |l: &str, prefix: &str| {
        l.strip_prefix(prefix)
            .and_then(ps_literal)
            .filter(|(_, rest)| rest.trim().is_empty())
            .map(|(v, _)| v)
    };
    let size: u64 = size.strip_prefix("$s = ")?.trim().parse().ok()?;
    let sha256 = lit(x, "$x = ")?;
    if !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(Shimmed::Pull {
        url: lit(u, "$u = ")?,
        tmp: host_path(&lit(t, "$t = ")?),
        dest: host_path(&lit(d, "$d = ")?),
        size,
        sha256,
    })
}

/// What kiln's pull script does, natively: one HTTP/1.1 GET of `url` (`http://host:port/path`)
/// streamed into `tmp` (removed if the transfer breaks off: status not 200, fewer bytes than
/// Content-Length), then the script's own check and move. Returns the output chunks and the
/// exit code the script would give (1: exception, 4: size or SHA-256 mismatch).
async fn pull_native(
    url: &str,
    tmp: &str,
    dest: &str,
    size: u64,
    sha256: &str,
) -> (Vec<(bool, Vec<u8>)>, i32) {
    let fail = |m: String| {
        let _ = std::fs::remove_file(tmp);
        (
            vec![(
                true,
                format!("Exception calling \"DownloadFile\" with \"2\" argument(s): \"{m}\"\r\n")
                    .into_bytes(),
            )],
            1,
        )
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return fail(format!("unsupported URL {url}"));
    };
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // A URL without a port means 80, as for WebClient.
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let mut tcp = match tokio::net::TcpStream::connect(&addr).await {
        Ok(t) => t,
        Err(e) => return fail(format!("Unable to connect to the remote server ({e})")),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    if let Err(e) = tcp.write_all(req.as_bytes()).await {
        return fail(e.to_string());
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 64 * 1024 {
            return fail("the response head is too large".into());
        }
        match tcp.read(&mut buf).await {
            Ok(0) => return fail("The underlying connection was closed".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return fail(e.to_string()),
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).into_owned();
    let status = text.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return fail(format!("The remote server returned an error: ({status})"));
    }
    let length: Option<u64> = text.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    let mut file = match tokio::fs::File::create(tmp).await {
        Ok(f) => f,
        Err(e) => return fail(e.to_string()),
    };
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut chunk = head[body_start..].to_vec();
    loop {
        if !chunk.is_empty() {
            hasher.update(&chunk);
            n += chunk.len() as u64;
            if let Err(e) = file.write_all(&chunk).await {
                return fail(e.to_string());
            }
        }
        match tcp.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => chunk = buf[..k].to_vec(),
            Err(e) => return fail(e.to_string()),
        }
    }
    if let Err(e) = file.flush().await {
        return fail(e.to_string());
    }
    drop(file);
    if length.is_some_and(|l| l != n) {
        return fail(format!(
            "The underlying connection was closed: {n} of {} bytes received",
            length.unwrap_or(0)
        ));
    }
    let h: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let line = format!("{n} {h}\r\n").into_bytes();
    if n != size || !h.eq_ignore_ascii_case(sha256) {
        let _ = std::fs::remove_file(tmp);
        return (
            vec![
                (
                    true,
                    format!("kiln: {dest}: received {n} bytes with SHA-256 {h}; the host sent {size} bytes with SHA-256 {sha256}\r\n").into_bytes(),
                ),
                (false, line),
            ],
            4,
        );
    }
    let _ = std::fs::remove_file(dest);
    if let Err(e) = std::fs::rename(tmp, dest) {
        return fail(e.to_string());
    }
    (vec![(false, line)], 0)
}

/// Runs [`pull_native`] in a task; the command finishes when it does.
fn pull(url: String, tmp: String, dest: String, size: u64, sha256: String) -> Arc<Command> {
    let (tx, _) = watch::channel(0u64);
    let cmd = Arc::new(Command {
        output: Mutex::new(Output::default()),
        changed: tx,
        stdin: tokio::sync::Mutex::new(None),
        pid: None,
    });
    let c = cmd.clone();
    tokio::spawn(async move {
        let (out, code) = pull_native(&url, &tmp, &dest, size, &sha256).await;
        if let Ok(mut o) = c.output.lock() {
            o.chunks
                .extend(out.into_iter().filter(|(_, d)| !d.is_empty()));
            o.exit = Some(code);
        }
        c.changed.send_modify(|v| *v += 1);
    });
    cmd
}

/// Map a WinRS command line to what the shim runs.
pub fn shim(line: &str) -> Shimmed {
    if let Some(mapped) = shim_windows_line(line) {
        return mapped;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    if let Some(first) = words.first() {
        let exe = first.to_ascii_lowercase();
        if exe == "powershell" || exe == "powershell.exe" {
            let flag = words.iter().position(|w| {
                matches!(
                    w.to_ascii_lowercase().as_str(),
                    "-encodedcommand" | "-enc" | "-ec" | "-e"
                )
            });
            if let Some(i) = flag {
                if let Some(script) = words.get(i + 1).and_then(|b| powershell::decode_command(b)) {
                    return shim_powershell(&script);
                }
            }
        }
    }
    Shimmed::Sh(line.to_string())
}

// ---- Windows guest mappings (the `winrs` test guest; see the module docs) -------------------

/// Where Windows drive paths live: `$KILN_WINRS_ROOT`, else `/var/lib/kiln-winrs` (drive `X:` is
/// its subdirectory `x`, so `C:\` is `/var/lib/kiln-winrs/c/`).
pub fn windows_root() -> String {
    std::env::var("KILN_WINRS_ROOT")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "/var/lib/kiln-winrs".to_string())
}

/// Maps a Windows drive path (`C:\Windows\Temp\x.ps1`, `c:/x`) to the guest's directory for
/// that drive (`<root>/c/Windows/Temp/x.ps1`); anything else is returned unchanged. Names keep
/// their case (the mapping is case-sensitive, unlike Windows).
pub fn host_path(p: &str) -> String {
    let b = p.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        let rest = p[2..].replace('\\', "/");
        let rest = rest.trim_start_matches('/');
        let drive = (b[0] as char).to_ascii_lowercase();
        if rest.is_empty() {
            return format!("{}/{drive}", windows_root());
        }
        return format!("{}/{drive}/{rest}", windows_root());
    }
    p.to_string()
}

/// A POSIX shell single-quoted word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What `shutdown /r` and `shutdown /s` become: the real reboot or poweroff of the guest (through
/// busybox init, so filesystems are synced), started a second later in its own session so the
/// command itself exits 0 first, as Windows' `shutdown /t 0` does.
const REBOOT_SH: &str = "setsid sh -c 'sleep 1; exec reboot' </dev/null >/dev/null 2>&1 &";
const POWEROFF_SH: &str = "setsid sh -c 'sleep 1; exec poweroff' </dev/null >/dev/null 2>&1 &";

/// kiln's wrapper around a PowerShell customizer's body (`powershell_file` in the engine): a
/// UTF-8 byte-order mark, `$ProgressPreference = 'SilentlyContinue'` first and
/// `if ($LASTEXITCODE) { exit $LASTEXITCODE }` last. Removed: the body is the POSIX sh payload.
pub fn unwrap_kiln_script(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .filter(|l| {
            let t = l.trim();
            t != "$ProgressPreference = 'SilentlyContinue'"
                && t != "if ($LASTEXITCODE) { exit $LASTEXITCODE }"
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A script file run through the shim: its unwrapped text, or a PowerShell-like failure.
fn script_file(path: &str) -> Shimmed {
    let host = host_path(path);
    match std::fs::read_to_string(&host) {
        Ok(t) => Shimmed::Sh(unwrap_kiln_script(&t)),
        Err(e) => Shimmed::Sh(format!(
            "echo {} >&2; exit 1",
            sh_quote(&format!(
                "The argument '{path}' to the -File parameter does not exist ({host}: {e})"
            ))
        )),
    }
}

/// kiln's sysprep wrapper (scripts/windows/kiln-sysprep.ps1) as POSIX sh with the same control
/// flow: `c:\DeprovisioningScript.ps1` runs instead when present (the cached answer files removed
/// first, the script printed, run by `sh`, its exit code returned); else the absent Azure agent
/// services are skipped with kiln's log line, the cached answer files are removed, "Sysprep"
/// moves `ImageState` in `C:\Windows\Setup\State\State.ini` from IMAGE_STATE_COMPLETE through
/// IMAGE_STATE_UNDEPLOYABLE to IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE in the background, and the
/// foreground polls it (every second, 120 s deadline, the stuck state reported) as the wrapper
/// polls the registry. Like `Sysprep.exe /quit`, it does not power off: kiln's shutdown step
/// does (`shutdown /s`).
pub fn sysprep_sh() -> String {
    let c = sh_quote(&host_path("C:"));
    format!(
        r#"C={c}
override="$C/DeprovisioningScript.ps1"
remove_answer_files() {{
	for f in Windows/system32/Sysprep/unattend.xml Windows/Panther/unattend.xml Windows/Panther/Unattend/unattend.xml; do
		if [ -f "$C/$f" ]; then
			rm -f "$C/$f"
			echo ">>> removed C:\\$(echo "$f" | tr / '\\')"
		fi
	done
}}
if [ -f "$override" ]; then
	remove_answer_files
	echo ">>> Running the deprovisioning script c:\DeprovisioningScript.ps1 :"
	sed 's/^/    /' "$override"
	sh "$override"
	code=$?
	echo ">>> kiln (winrs shim): no Windows account to disable on this Linux guest"
	exit $code
fi
for svc in RdAgent WindowsAzureTelemetryService WindowsAzureGuestAgent; do
	echo ">>> kiln: service $svc is not installed: not waiting for it (local build, no Azure fabric)"
done
remove_answer_files
echo ">>> kiln (winrs shim): no Windows account to disable on this Linux guest"
echo '>>> Sysprepping VM ...'
S="$C/Windows/Setup/State"
mkdir -p "$S"
state() {{ printf '[State]\r\nImageState=%s\r\n' "$1" >"$S/State.ini.tmp" && mv "$S/State.ini.tmp" "$S/State.ini"; }}
state IMAGE_STATE_COMPLETE
( sleep 1; state IMAGE_STATE_UNDEPLOYABLE; sleep 2; state IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE; sync ) </dev/null >/dev/null 2>&1 &
i=0
while :; do
	imageState=$(sed -n 's/^ImageState=\([A-Z_]*\).*/\1/p' "$S/State.ini")
	echo "$imageState"
	[ "$imageState" = IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE ] && break
	if [ $i -ge 120 ]; then
		echo ">>> kiln: sysprep did not finish within 120 seconds; ImageState stuck at $imageState"
		exit 1
	fi
	i=$((i + 1))
	sleep 1
done
echo '>>> Sysprep complete ...'
exit 0
"#
    )
}

/// kiln's fixed command lines for a Windows guest (not PowerShell scripts): `shutdown /r` and
/// `shutdown /s`, the default restart check, `powershell … -File "<path>"` (a script kiln
/// uploaded; `kiln-sysprep.ps1` is [`sysprep_sh`]) and the upload chunks' `echo` into a drive
/// path. `None`: not one of them.
pub fn shim_windows_line(line: &str) -> Option<Shimmed> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let first = words.first()?.to_ascii_lowercase();
    let has = |flag: &str| words.iter().any(|w| w.eq_ignore_ascii_case(flag));
    if first == "shutdown" || first == "shutdown.exe" {
        if has("/r") {
            return Some(Shimmed::Sh(REBOOT_SH.into()));
        }
        if has("/s") || has("/p") {
            return Some(Shimmed::Sh(POWEROFF_SH.into()));
        }
        return None;
    }
    if first == "powershell" || first == "powershell.exe" {
        // Packer's/AIB's default restartCheckCommand.
        if line.contains("[System.Net.Dns]::GetHostName()") && line.contains("restarted.") {
            return Some(Shimmed::Sh(r#"echo "$(hostname) restarted.""#.into()));
        }
        let i = words.iter().position(|w| w.eq_ignore_ascii_case("-File"))?;
        let rest = words[i + 1..].join(" ");
        let path = rest
            .strip_prefix('"')
            .and_then(|r| r.split_once('"'))
            .map(|(p, _)| p.to_string())
            .unwrap_or_else(|| words.get(i + 1).copied().unwrap_or("").to_string());
        let name = path.rsplit(['\\', '/']).next().unwrap_or("");
        if name.eq_ignore_ascii_case("kiln-sysprep.ps1") {
            return Some(Shimmed::Sh(sysprep_sh()));
        }
        return Some(script_file(&path));
    }
    if first == "echo" && words.len() >= 4 && (words[2] == ">" || words[2] == ">>") {
        let target = words[3..].join(" ");
        let target = target.trim_matches('"');
        if host_path(target) != target {
            return Some(Shimmed::Sh(format!(
                "echo {} {} {}",
                words[1],
                words[2],
                sh_quote(&host_path(target))
            )));
        }
    }
    None
}

/// kiln's fixed PowerShell scripts for a Windows guest (sent with `-EncodedCommand`; `lines` as
/// [`shim_powershell`] trims them): the File step's destination directory check, and the
/// elevated runner's invocation (`& '…\kiln-elevated.ps1' -ScriptPath '…' -AsSystem | -User '…'
/// -Password '…'`), which runs the script (unwrapped, as root: the guest has no other account)
/// with stderr merged into stdout, as the scheduled task's output file is, and its exit code.
/// `None`: not one of them.
pub fn shim_windows_script(lines: &[&str]) -> Option<Shimmed> {
    if let [one] = lines {
        if let Some((dest, rest)) = one
            .strip_prefix("$d = Split-Path -Parent ")
            .and_then(ps_literal)
        {
            if rest.trim_start().starts_with(
                "; if ($d -and -not (Test-Path -LiteralPath $d -PathType Container)) { exit 3 }",
            ) {
                let host = host_path(&dest);
                let dir = std::path::Path::new(&host)
                    .parent()
                    .map(|d| d.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if dir.is_empty() {
                    return Some(Shimmed::Sh("exit 0".into()));
                }
                return Some(Shimmed::Sh(format!(
                    "[ -d {} ] || exit 3; exit 0",
                    sh_quote(&dir)
                )));
            }
        }
    }
    if let [call, "exit $LASTEXITCODE"] = lines {
        let (runner, rest) = call.strip_prefix("& ").and_then(ps_literal)?;
        if !runner.to_ascii_lowercase().ends_with("kiln-elevated.ps1") {
            return None;
        }
        let (script, rest) = rest
            .trim_start()
            .strip_prefix("-ScriptPath ")
            .and_then(ps_literal)?;
        let rest = rest.trim();
        let system = rest == "-AsSystem";
        if !system {
            let (_user, r) = rest.strip_prefix("-User ").and_then(ps_literal)?;
            let (_password, r) = r
                .trim_start()
                .strip_prefix("-Password ")
                .and_then(ps_literal)?;
            if !r.trim().is_empty() {
                return None;
            }
        }
        if !std::path::Path::new(&host_path(&runner)).is_file() {
            return Some(Shimmed::Sh(format!(
                "echo {} >&2; exit 1",
                sh_quote(&format!(
                    "The term '{runner}' is not recognized (not uploaded)"
                ))
            )));
        }
        if let Some(round) = windows_update_round(&script) {
            return Some(round);
        }
        return Some(match script_file(&script) {
            Shimmed::Sh(body) => Shimmed::Sh(format!("exec 2>&1\n{body}")),
            other => other,
        });
    }
    None
}

/// kiln's Windows Update round script (uploaded to `script_path`, run through the elevated
/// runner) as one round of the Windows Update Agent emulation in [`crate::winrs_wu`]: the round
/// runs here, when the command starts (the guest's state files under `C:\kiln-wu`, the boot id
/// of this boot), and the command prints its `kiln-wu:` lines and exits with its code. Fails as
/// PowerShell would when kiln did not upload `C:\Windows\Temp\kiln-windows-update.ps1` first.
/// `None`: the script is not kiln's round script.
pub fn windows_update_round(script_path: &str) -> Option<Shimmed> {
    let text = std::fs::read_to_string(host_path(script_path)).ok()?;
    let call = crate::winrs_wu::parse_round(&unwrap_kiln_script(&text))?;
    let real = format!(r"C:\Windows\Temp\{}", crate::winrs_wu::SCRIPT);
    if !std::path::Path::new(&host_path(&real)).is_file() {
        return Some(Shimmed::Sh(format!(
            "echo {} >&2; exit 1",
            sh_quote(&format!(
                "The term '{real}' is not recognized (not uploaded)"
            ))
        )));
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let (out, code) =
        crate::winrs_wu::run_round(std::path::Path::new(&host_path("C:")), &boot_id, &call);
    Some(Shimmed::Sh(format!(
        "exec 2>&1\nprintf '%s' {}\nexit {code}",
        sh_quote(&out)
    )))
}

fn finished(out: Vec<(bool, Vec<u8>)>, code: i32) -> Arc<Command> {
    let (tx, _) = watch::channel(0);
    Arc::new(Command {
        output: Mutex::new(Output {
            chunks: out.into_iter().filter(|(_, d)| !d.is_empty()).collect(),
            exit: Some(code),
        }),
        changed: tx,
        stdin: tokio::sync::Mutex::new(None),
        pid: None,
    })
}

fn native(op: Shimmed) -> Arc<Command> {
    let res: std::io::Result<Vec<u8>> = (|| match op {
        Shimmed::DecodeAndHash(tmp, dest) => {
            let mut data = Vec::new();
            if let Ok(text) = std::fs::read_to_string(&tmp) {
                for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(l)
                        .map_err(|e| std::io::Error::other(format!("{tmp}: {e}")))?;
                    data.extend_from_slice(&b);
                }
                std::fs::remove_file(&tmp)?;
            }
            std::fs::write(&dest, &data)?;
            let h: String = Sha256::digest(&data)
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect();
            Ok(format!("{} {h}\r\n", data.len()).into_bytes())
        }
        Shimmed::Base64(p) => {
            let data = std::fs::read(p)?;
            Ok(format!(
                "{}\r\n",
                base64::engine::general_purpose::STANDARD.encode(data)
            )
            .into_bytes())
        }
        Shimmed::Sh(_) | Shimmed::Pull { .. } => unreachable!("handled by start"),
    })();
    match res {
        Ok(out) => finished(vec![(false, out)], 0),
        Err(e) => finished(vec![(true, format!("{e}\r\n").into_bytes())], 1),
    }
}

/// `shutdown /r` and `shutdown /s`: the server starts the delayed reboot or poweroff itself, in
/// a process group of its own, and the command finishes with exit 0 at once. (Run as the
/// command's own shell line, the backgrounded `setsid` child could still be in the command's
/// process group when the client ends the command and the server kills that group — on a slow
/// guest the reboot was then lost.)
fn power_action(script: &str) -> std::io::Result<Arc<Command>> {
    let action = if script == REBOOT_SH {
        "reboot"
    } else {
        "poweroff"
    };
    use std::os::unix::process::CommandExt as _;
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("sleep 1; exec {action}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    // Not waited for: the guest goes down with it.
    std::mem::forget(child);
    Ok(finished(Vec::new(), 0))
}

/// Start a command line through the shim.
fn start(line: &str) -> std::io::Result<Arc<Command>> {
    let script = match shim(line) {
        Shimmed::Sh(s) if s == REBOOT_SH || s == POWEROFF_SH => return power_action(&s),
        Shimmed::Sh(s) => s,
        Shimmed::Pull {
            url,
            tmp,
            dest,
            size,
            sha256,
        } => return Ok(pull(url, tmp, dest, size, sha256)),
        op => return Ok(native(op)),
    };
    let mut child: Child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().map(|p| p as i32);
    let (tx, _) = watch::channel(0u64);
    let cmd = Arc::new(Command {
        output: Mutex::new(Output::default()),
        changed: tx,
        stdin: tokio::sync::Mutex::new(child.stdin.take()),
        pid,
    });
    let mut readers = Vec::new();
    for (is_err, pipe) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let c = cmd.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut o) = c.output.lock() {
                            o.chunks.push_back((is_err, buf[..n].to_vec()));
                        }
                        c.changed.send_modify(|v| *v += 1);
                    }
                }
            }
        }));
    }
    let c = cmd.clone();
    tokio::spawn(async move {
        for r in readers {
            let _ = r.await;
        }
        let status = child.wait().await;
        let code = match status {
            Ok(s) => s.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + s.signal().unwrap_or(0)
            }),
            Err(_) => -1,
        };
        if let Ok(mut o) = c.output.lock() {
            o.exit = Some(code);
        }
        c.changed.send_modify(|v| *v += 1);
    });
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `KILN_WINRS_ROOT` for the whole test binary (the variable is process-wide).
    fn root() -> &'static str {
        static ROOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        ROOT.get_or_init(|| {
            let r = crate::scratch_dir("kiln-winrs-root");
            std::fs::create_dir_all(r.join("c/Windows/Temp")).unwrap();
            std::env::set_var("KILN_WINRS_ROOT", &r);
            r.to_string_lossy().into_owned()
        })
    }

    fn run_sh(script: &str) -> (i32, String) {
        let o = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    }

    #[test]
    fn drive_paths_map_below_the_root() {
        let r = root();
        assert_eq!(
            host_path(r"C:\Windows\Temp\a b.ps1"),
            format!("{r}/c/Windows/Temp/a b.ps1")
        );
        assert_eq!(host_path("d:/x"), format!("{r}/d/x"));
        assert_eq!(host_path("C:"), format!("{r}/c"));
        assert_eq!(host_path("/tmp/x"), "/tmp/x");
        assert_eq!(host_path("x:"), format!("{r}/x"));
        assert_eq!(host_path("ab"), "ab");
    }

    #[test]
    fn kilns_restart_shutdown_and_check_commands_map_to_the_guest() {
        use kiln_engine::build::steps_windows::{DEFAULT_RESTART_CHECK, DEFAULT_RESTART_COMMAND};
        assert_eq!(shim(DEFAULT_RESTART_COMMAND), Shimmed::Sh(REBOOT_SH.into()));
        assert_eq!(shim("shutdown /s /t 0 /f"), Shimmed::Sh(POWEROFF_SH.into()));
        assert_eq!(shim("shutdown /a"), Shimmed::Sh("shutdown /a".into()));
        let Shimmed::Sh(check) = shim(DEFAULT_RESTART_CHECK) else {
            panic!()
        };
        let (code, out) = run_sh(&check);
        assert_eq!(code, 0);
        assert!(out.trim_end().ends_with(" restarted."), "{out}");
    }

    #[test]
    fn uploaded_scripts_run_unwrapped_directly_and_elevated() {
        use kiln_engine::build::steps_windows::{
            direct_command, elevated_invocation, powershell_file, ps1_bytes, Elevation,
        };
        let r = root();
        let path = r"C:\Windows\Temp\kiln-t-customize-0.ps1";
        std::fs::write(
            host_path(path),
            ps1_bytes(&powershell_file("echo out\necho err >&2\nexit 7")),
        )
        .unwrap();
        let Shimmed::Sh(direct) = shim(&direct_command(path)) else {
            panic!()
        };
        assert_eq!(direct, "echo out\necho err >&2\nexit 7");
        assert_eq!(run_sh(&direct).0, 7);

        let runner = r"C:\Windows\Temp\kiln-elevated.ps1";
        let line = powershell::command_line(&elevated_invocation(
            runner,
            path,
            Elevation::BuildUser,
            "packer",
            "p'w",
        ));
        let Shimmed::Sh(missing) = shim(&line) else {
            panic!()
        };
        assert!(
            missing.contains("not recognized") && missing.ends_with("exit 1"),
            "{missing}"
        );
        std::fs::write(host_path(runner), "param()").unwrap();
        for e in [Elevation::BuildUser, Elevation::System] {
            let line =
                powershell::command_line(&elevated_invocation(runner, path, e, "packer", "p'w"));
            let Shimmed::Sh(el) = shim(&line) else {
                panic!()
            };
            assert_eq!(el, "exec 2>&1\necho out\necho err >&2\nexit 7");
            let o = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&el)
                .output()
                .unwrap();
            assert_eq!(
                (o.status.code(), o.stdout.as_slice(), o.stderr.len()),
                (Some(7), &b"out\nerr\n"[..], 0)
            );
        }
        let Shimmed::Sh(gone) = shim(&direct_command(r"C:\nope.ps1")) else {
            panic!()
        };
        assert_eq!(run_sh(&gone).0, 1);
        assert_eq!(
            shim(&powershell::upload_chunk_cmd(
                r"C:\x y\f.kiln-upload",
                "aGk=",
                false
            )),
            Shimmed::Sh(format!("echo aGk= >> '{r}/c/x y/f.kiln-upload'"))
        );
        assert_eq!(
            shim(&powershell::command_line(&powershell::upload_decode(
                r"C:\f.t", r"C:\f"
            ))),
            Shimmed::DecodeAndHash(format!("{r}/c/f.t"), format!("{r}/c/f"))
        );
    }

    #[test]
    fn the_file_steps_directory_check_maps_to_test_d() {
        use kiln_engine::build::steps_windows::destination_dir_check;
        let r = root();
        std::fs::create_dir_all(format!("{r}/c/there")).unwrap();
        let check = |d: &str| {
            let Shimmed::Sh(s) = shim(&powershell::command_line(&destination_dir_check(d))) else {
                panic!()
            };
            run_sh(&s).0
        };
        assert_eq!(check(r"C:\there\f.txt"), 0);
        assert_eq!(check(r"C:\not-there\f.txt"), 3);
    }

    #[test]
    fn the_sysprep_wrapper_runs_its_control_flow() {
        use kiln_engine::build::steps_windows::direct_command;
        // its own root: the override file must not leak into other tests
        let r = std::env::temp_dir().join(format!("kiln-winrs-sysprep-{}", std::process::id()));
        let c = r.join("c");
        std::fs::create_dir_all(c.join("Windows/Panther")).unwrap();
        std::fs::write(c.join("Windows/Panther/unattend.xml"), "<unattend/>").unwrap();
        let Shimmed::Sh(_) = shim(&direct_command(r"C:\Windows\Temp\kiln-sysprep.ps1")) else {
            panic!()
        };
        let script =
            sysprep_sh().replace(&sh_quote(&host_path("C:")), &sh_quote(&c.to_string_lossy()));
        let (code, out) = run_sh(&script);
        assert_eq!(code, 0, "{out}");
        let states: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("IMAGE_STATE_"))
            .collect();
        assert_eq!(states.first(), Some(&"IMAGE_STATE_COMPLETE"), "{out}");
        assert!(states.contains(&"IMAGE_STATE_UNDEPLOYABLE"), "{out}");
        assert_eq!(
            states.last(),
            Some(&"IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"),
            "{out}"
        );
        assert!(
            out.contains("service RdAgent is not installed")
                && out.contains(r">>> removed C:\Windows\Panther\unattend.xml")
                && out.contains(">>> Sysprep complete"),
            "{out}"
        );
        assert!(!c.join("Windows/Panther/unattend.xml").exists());
        std::fs::write(
            c.join("DeprovisioningScript.ps1"),
            "echo custom-deprovision\nexit 4\n",
        )
        .unwrap();
        std::fs::write(c.join("Windows/Panther/unattend.xml"), "<unattend/>").unwrap();
        let (code, out) = run_sh(&script);
        assert_eq!(code, 4, "{out}");
        assert!(
            !c.join("Windows/Panther/unattend.xml").exists()
                && out.contains(r">>> removed C:\Windows\Panther\unattend.xml"),
            "kiln's answer file goes with an override too: {out}"
        );
        assert!(
            out.contains("Running the deprovisioning script")
                && out.contains("    echo custom-deprovision")
                && out.contains("\ncustom-deprovision\n"),
            "{out}"
        );
        assert!(!out.contains("Sysprepping"), "{out}");
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn shim_maps_kilns_transfer_scripts_and_nothing_else() {
        let line = |s: &str| powershell::command_line(s);
        assert_eq!(
            shim(&line(&powershell::upload_decode(
                "/tmp/a b'c.t",
                "/tmp/a b'c"
            ))),
            Shimmed::DecodeAndHash("/tmp/a b'c.t".into(), "/tmp/a b'c".into())
        );
        // Chunks are plain cmd.exe `echo`, which sh runs as is.
        assert_eq!(
            shim(&powershell::upload_chunk_cmd("/tmp/x", "aGk=", true)),
            Shimmed::Sh("echo aGk= > \"/tmp/x\"".into())
        );
        assert_eq!(
            shim(&line(&powershell::download("/tmp/x"))),
            Shimmed::Base64("/tmp/x".into())
        );
        assert_eq!(
            shim(&line("echo hi; exit 3")),
            Shimmed::Sh("echo hi; exit 3".into())
        );
        assert_eq!(shim("ipconfig /all"), Shimmed::Sh("ipconfig /all".into()));
        assert_eq!(
            shim(&line(&powershell::pull_file(
                "http://127.0.0.1:9/f/ab'c",
                "/tmp/a b'c \"q\".kiln-pull",
                "/tmp/a b'c \"q\"",
                42,
                "00ff"
            ))),
            Shimmed::Pull {
                url: "http://127.0.0.1:9/f/ab'c".into(),
                tmp: "/tmp/a b'c \"q\".kiln-pull".into(),
                dest: "/tmp/a b'c \"q\"".into(),
                size: 42,
                sha256: "00FF".into()
            }
        );
        // a changed body is not kiln's pull script: it goes to sh
        let altered = powershell::pull_file("http://x/", "/t", "/d", 1, "00")
            .replace("$w.Proxy = $null", "$w.Proxy = $p");
        assert!(matches!(shim(&line(&altered)), Shimmed::Sh(_)));
        let enc = powershell::encode_command("echo x");
        assert_eq!(
            shim(&format!("PowerShell.exe -NoProfile -enc {enc}")),
            Shimmed::Sh("echo x".into())
        );
    }
}
