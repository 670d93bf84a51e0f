//! The Azure fabric, emulated for one build: the wireserver (168.63.129.16) and IMDS
//! (169.254.169.254) that Azure images' provisioning agents (cloud-init's Azure datasource,
//! the Azure Linux agent) talk to.
//!
//! It runs inside kiln, one server per build, on a Unix socket in that build's directory.
//! QEMU's user network forwards each guest TCP connection to the two addresses
//! (`guestfwd=tcp:168.63.129.16:80-cmd:…`) to a fresh `kiln __fabric-connect SOCKET wire|imds`
//! process ([`relay`]) that only copies bytes between its stdin/stdout and the socket; the
//! server answers. Every request becomes a [`FabricEvent`]; the health report
//! (`POST /machine?comp=health`) is the guest's "provisioning finished" signal, watched through
//! [`Fabric::health`].
//!
//! Invariant: a build's fabric serves only that build — its socket path is in the relay
//! command line of that build's QEMU only, its answers come from that build's
//! [`FabricConfig`], and it stops (socket removed) when the build's handle drops.
//!
//! Hardening: request heads ≤ 16 KiB, bodies ≤ 256 KiB, 15 s to send a request, at most
//! [`MAX_CONNECTIONS`] at once, one request per connection, 4xx for anything malformed;
//! nothing a guest sends can panic the server or hold the build.

pub mod dhcp;
pub mod files;
pub mod http;
pub mod imds;
pub mod tap;
pub mod wire;

use http::Response;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

/// Connections served at the same time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Requests logged one by one; after that only health reports and errors are.
pub const MAX_LOGGED_REQUESTS: u64 = 500;
/// How long the identity token command may run.
pub const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a token command may print.
pub const TOKEN_MAX_BYTES: usize = 64 * 1024;

/// The wireserver's address.
pub const WIRESERVER: &str = "168.63.129.16";
/// IMDS's address.
pub const IMDS: &str = "169.254.169.254";
/// The QEMU user network that holds both (slirp forwards only inside its network).
pub const NETWORK: &str = "168.0.0.0/7";
/// The virtual gateway.
pub const GATEWAY: &str = "168.63.129.1";
/// The virtual DNS server.
pub const DNS: &str = "168.63.129.3";
/// The first (and only) DHCP address: the guest's.
pub const GUEST_IP: &str = "168.63.129.100";
/// The SMBIOS chassis asset tag Azure sets (cloud-init's ds-identify and waagent look for it).
pub const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => {}
            c => o.push(c),
        }
    }
    o
}

/// What this build's fabric answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricConfig {
    /// The VM's id (IMDS `vmId`; also the SMBIOS system UUID, `-uuid`).
    pub vm_id: String,
    /// The goal state's container id.
    pub container_id: String,
    /// The goal state's incarnation.
    pub incarnation: u32,
    /// The computer name.
    pub hostname: String,
    /// The admin (build) user.
    pub user: String,
    /// Its SSH public key line (IMDS `publicKeys`, which win over ovf-env's); empty for a
    /// Windows VM (a password, on the provisioning media only).
    pub public_key: String,
    /// IMDS `osType`: `Linux` or `Windows`.
    pub os_type: String,
    /// IMDS `location`.
    pub location: String,
    /// IMDS `vmSize`.
    pub vm_size: String,
    /// IMDS `resourceGroupName`.
    pub resource_group: String,
    /// IMDS `subscriptionId`.
    pub subscription_id: String,
    /// The NIC's MAC (IMDS `network.interface[0].macAddress`; must match QEMU's NIC).
    pub mac: [u8; 6],
    /// The guest's address (what slirp's DHCP hands out first).
    pub guest_ip: String,
    /// The subnet's address.
    pub subnet_address: String,
    /// The subnet's prefix length.
    pub subnet_prefix: u8,
    /// The identity token command (argv), if configured.
    pub token_command: Option<Vec<String>>,
}

impl FabricConfig {
    /// `vm_id` and the other identifiers for one build; network as [`NETWORK`].
    pub fn new(
        vm_id: String,
        hostname: &str,
        user: &str,
        public_key: &str,
        mac: [u8; 6],
    ) -> FabricConfig {
        FabricConfig {
            container_id: container_from(&vm_id),
            vm_id,
            incarnation: 1,
            hostname: hostname.into(),
            user: user.into(),
            public_key: public_key.trim().into(),
            os_type: "Linux".into(),
            location: "westus2".into(),
            vm_size: "Standard_D2s_v3".into(),
            resource_group: "kiln".into(),
            subscription_id: "00000000-0000-0000-0000-000000000000".into(),
            mac,
            guest_ip: GUEST_IP.into(),
            subnet_address: "168.0.0.0".into(),
            subnet_prefix: 7,
            token_command: None,
        }
    }

    /// The DHCP lease kiln's DHCP gives the guest ([`tap`]): the address slirp would give,
    /// plus option 245 and routes to the wireserver and IMDS, as Azure's DHCP does.
    pub fn lease(&self) -> dhcp::Lease {
        let ip = |s: &str, d: &str| {
            s.parse::<std::net::Ipv4Addr>()
                .unwrap_or_else(|_| d.parse().expect("a valid constant address"))
        };
        dhcp::Lease {
            server: ip(GATEWAY, GATEWAY),
            client: ip(&self.guest_ip, GUEST_IP),
            prefix: self.subnet_prefix,
            dns: ip(DNS, DNS),
            lease_secs: 86400,
            wireserver: ip(WIRESERVER, WIRESERVER),
            routes: vec![(ip(WIRESERVER, WIRESERVER), 32), (ip(IMDS, IMDS), 32)],
        }
    }

    /// The deployment's name in the configuration documents.
    pub fn deployment_name(&self) -> String {
        self.vm_id.replace('-', "")
    }

    /// A fixed configuration for tests.
    pub fn example() -> FabricConfig {
        FabricConfig::new(
            "b61f93d0-e1ed-40b2-b067-22c243233448".into(),
            "aibvm",
            "packer",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE kiln",
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        )
    }
}

fn container_from(vm_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("container/{vm_id}").as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// A UUID (version 4 layout) from `seed`.
pub fn uuid_from(seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h: Vec<u8> = Sha256::digest(seed.as_bytes())
        .iter()
        .take(16)
        .copied()
        .collect();
    h[6] = (h[6] & 0x0f) | 0x40;
    h[8] = (h[8] & 0x3f) | 0x80;
    let x: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// A parsed health report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `Ready` or `NotReady`.
    pub state: String,
    /// e.g. `Provisioning`, `ProvisioningFailed`.
    pub sub_status: Option<String>,
    /// The agent's description.
    pub description: Option<String>,
}

impl Health {
    /// `Ready`.
    pub fn is_ready(&self) -> bool {
        self.state.eq_ignore_ascii_case("ready")
    }
    /// `NotReady` with `ProvisioningFailed`.
    pub fn is_failure(&self) -> bool {
        !self.is_ready()
            && self
                .sub_status
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("ProvisioningFailed"))
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.state)?;
        if let Some(s) = &self.sub_status {
            write!(f, "/{s}")?;
        }
        if let Some(d) = &self.description {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// The latest health report and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The report.
    pub health: Health,
    /// `x-ms-agent-name` or the user agent.
    pub agent: String,
    /// When it arrived.
    pub at: Instant,
    /// How many reports arrived so far.
    pub count: u64,
}

/// Which endpoint a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// The wireserver, 168.63.129.16:80.
    Wire,
    /// IMDS, 169.254.169.254:80.
    Imds,
    /// kiln's DHCP server ([`tap`]), at the gateway's address.
    Dhcp,
    /// The per-build file endpoint ([`files`]), 10.0.2.100:80; served by a
    /// [`files::FileServer`], never by the fabric.
    Files,
}

impl Endpoint {
    /// `wire` / `imds`.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Wire => "wire",
            Endpoint::Imds => "imds",
            Endpoint::Dhcp => "dhcp",
            Endpoint::Files => "files",
        }
    }
    /// The guest-side address.
    pub fn address(self) -> &'static str {
        match self {
            Endpoint::Wire => WIRESERVER,
            Endpoint::Imds => IMDS,
            Endpoint::Dhcp => GATEWAY,
            Endpoint::Files => files::GUEST_ADDR,
        }
    }
    /// Parses `wire` / `imds`.
    pub fn parse(s: &str) -> Option<Endpoint> {
        match s {
            "wire" => Some(Endpoint::Wire),
            "imds" => Some(Endpoint::Imds),
            "files" => Some(Endpoint::Files),
            _ => None,
        }
    }
}

/// One request the fabric answered (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricEvent {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The method (empty if the request was unreadable).
    pub method: String,
    /// Path and query, clipped to 200 characters.
    pub target: String,
    /// The status answered (0: none, the client went away).
    pub status: u16,
    /// Who asked.
    pub agent: String,
    /// The health report, for `comp=health`.
    pub health: Option<Health>,
    /// Why the request was refused, for 4xx/5xx from malformed input.
    pub error: Option<String>,
}

/// Receives the fabric's events.
pub type EventSink = Arc<dyn Fn(FabricEvent) + Send + Sync>;

/// Why the fabric could not start.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// Binding the socket failed.
    #[error("starting the Azure fabric emulation on {path}: {source}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running fabric. Dropping it stops the server and removes its socket.
pub struct Fabric {
    socket: PathBuf,
    own_dir: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
    health: watch::Receiver<Option<HealthReport>>,
    config: Arc<FabricConfig>,
    tap: crate::vm::NetTap,
    tap_task: tokio::task::JoinHandle<()>,
}

/// The socket for a build in `run_dir`: `run_dir/fabric.sock`, or — when that path is too long
/// for a Unix socket (108 bytes) — a private directory under the temp dir named after the run.
pub fn socket_path_for(run_dir: &Path, run_id: &str) -> (PathBuf, Option<PathBuf>) {
    let p = run_dir.join("fabric.sock");
    if p.as_os_str().len() <= 100 {
        return (p, None);
    }
    let dir = std::env::temp_dir().join(format!("kiln-fabric-{run_id}-{}", std::process::id()));
    (dir.join("fabric.sock"), Some(dir))
}

/// Binds a Unix socket only the owner can use (0600), replacing a stale socket file; `own_dir`,
/// if given, is created (0700) to hold it. Shared by the fabric and the file endpoint.
pub(crate) fn bind_private_socket(
    socket: &Path,
    own_dir: Option<&Path>,
) -> Result<UnixListener, FabricError> {
    let bind_err = |source| FabricError::Bind {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(d) = own_dir {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(bind_err)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(bind_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    }
    Ok(listener)
}

impl Fabric {
    /// Starts serving `config` on `socket` (replacing a stale socket file there). `own_dir`, if
    /// given, is a directory created (0700) for the socket and removed on drop.
    pub fn start(
        socket: &Path,
        own_dir: Option<&Path>,
        config: FabricConfig,
        sink: EventSink,
    ) -> Result<Fabric, FabricError> {
        let listener = bind_private_socket(socket, own_dir)?;
        let dir = socket.parent().unwrap_or(Path::new("."));
        let listeners = tap::Listeners::bind(dir).map_err(|source| FabricError::Bind {
            path: dir.join(tap::FILE_NAMES[0]),
            source,
        })?;
        let tap_paths = listeners.paths.clone();
        let (tx, rx) = watch::channel(None);
        let config = Arc::new(config);
        let tap_task = tokio::spawn(tap::run(listeners, config.lease(), sink.clone()));
        let task = tokio::spawn(serve(listener, config.clone(), sink, Arc::new(tx)));
        Ok(Fabric {
            socket: socket.to_path_buf(),
            own_dir: own_dir.map(Path::to_path_buf),
            task,
            health: rx,
            config,
            tap: tap_paths,
            tap_task,
        })
    }

    /// The socket the relays connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// What it answers with.
    pub fn config(&self) -> &FabricConfig {
        &self.config
    }

    /// The latest health report, as a watch.
    pub fn health(&self) -> watch::Receiver<Option<HealthReport>> {
        self.health.clone()
    }

    /// The sockets of this build's DHCP tap ([`tap`]), for [`crate::vm::VmSpec::net_tap`].
    pub fn net_tap(&self) -> &crate::vm::NetTap {
        &self.tap
    }

    /// The `-netdev user` options that route the guest's fabric traffic to this fabric through
    /// `kiln_exe __fabric-connect`: the network, DHCP and the two guestfwd rules, each in
    /// QEMU's `key=value` form with commas doubled.
    pub fn netdev_options(&self, kiln_exe: &Path) -> Vec<String> {
        let mut v = vec![
            format!("net={NETWORK}"),
            format!("host={GATEWAY}"),
            format!("dns={DNS}"),
            format!("dhcpstart={}", self.config.guest_ip),
        ];
        for ep in [Endpoint::Wire, Endpoint::Imds] {
            let cmd = relay_command(kiln_exe, &self.socket, ep);
            let escaped = crate::vm::qemu::escape(std::ffi::OsStr::new(&cmd));
            v.push(format!(
                "guestfwd=tcp:{}:80-cmd:{}",
                ep.address(),
                escaped.to_string_lossy()
            ));
        }
        v
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.task.abort();
        self.tap_task.abort();
        let _ = std::fs::remove_file(&self.socket);
        tap::Listeners::remove(&self.tap);
        if let Some(d) = &self.own_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Quotes one word for g_shell_parse_argv (how libslirp splits a `cmd:`), POSIX-style.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The command QEMU runs for each guest connection to `ep`.
pub fn relay_command(kiln_exe: &Path, socket: &Path, ep: Endpoint) -> String {
    format!(
        "{} __fabric-connect {} {}",
        shell_quote(&kiln_exe.to_string_lossy()),
        shell_quote(&socket.to_string_lossy()),
        ep.as_str()
    )
}

async fn serve(
    listener: UnixListener,
    cfg: Arc<FabricConfig>,
    sink: EventSink,
    health: Arc<watch::Sender<Option<HealthReport>>>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let counter = Arc::new(AtomicU64::new(0));
    let refused = AtomicU64::new(0);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let n = refused.fetch_add(1, Ordering::Relaxed);
            if n == 0 || n.is_power_of_two() {
                sink(FabricEvent {
                    endpoint: Endpoint::Wire,
                    method: String::new(),
                    target: String::new(),
                    status: 503,
                    agent: String::new(),
                    health: None,
                    error: Some(format!(
                        "more than {MAX_CONNECTIONS} connections at once: closed {} so far",
                        n + 1
                    )),
                });
            }
            drop(stream);
            continue;
        };
        let (cfg, sink, health, counter) =
            (cfg.clone(), sink.clone(), health.clone(), counter.clone());
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, &cfg, &sink, &health, &counter).await;
        });
    }
}

/// Reads the relay's one-line preamble (`wire` / `imds`).
async fn read_preamble(s: &mut UnixStream) -> Option<Endpoint> {
    let mut line = Vec::new();
    let read = async {
        let mut b = [0u8; 1];
        while line.len() < 8 {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            if b[0] == b'\n' {
                return Endpoint::parse(std::str::from_utf8(&line).ok()?);
            }
            line.push(b[0]);
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

async fn serve_connection(
    mut s: UnixStream,
    cfg: &FabricConfig,
    sink: &EventSink,
    health: &watch::Sender<Option<HealthReport>>,
    counter: &AtomicU64,
) {
    let Some(ep) = read_preamble(&mut s).await else {
        return;
    };
    let req = match http::read_request(&mut s, http::READ_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            let status = e.status();
            if let Some(st) = status {
                let _ = http::write_response(&mut s, &Response::text(st, format!("{e}\n")), false)
                    .await;
            }
            if status.is_some() && counter.fetch_add(1, Ordering::Relaxed) < MAX_LOGGED_REQUESTS {
                sink(FabricEvent {
                    endpoint: ep,
                    method: String::new(),
                    target: String::new(),
                    status: status.unwrap_or(0),
                    agent: String::new(),
                    health: None,
                    error: Some(e.to_string()),
                });
            }
            return;
        }
    };
    let (resp, h) = match ep {
        Endpoint::Wire => wire::answer(cfg, &req),
        Endpoint::Imds => match imds::answer(cfg, &req) {
            imds::TokenAnswer::Now(r) => (r, None),
            imds::TokenAnswer::RunCommand(params) => (run_token_command(cfg, &params).await, None),
        },
        // No relay connects for DHCP (`Endpoint::parse` never names it).
        Endpoint::Dhcp => (Response::text(404, "not an HTTP endpoint\n"), None),
        Endpoint::Files => (Response::text(404, "not served here\n"), None),
    };
    let _ = http::write_response(&mut s, &resp, req.method == "HEAD").await;
    let _ = s.shutdown().await;
    let agent = req.agent();
    if let Some(h) = &h {
        let at = Instant::now();
        health.send_modify(|cur| {
            let count = cur.as_ref().map(|c| c.count).unwrap_or(0) + 1;
            *cur = Some(HealthReport {
                health: h.clone(),
                agent: agent.clone(),
                at,
                count,
            });
        });
    }
    if h.is_some() || counter.fetch_add(1, Ordering::Relaxed) < MAX_LOGGED_REQUESTS {
        let mut target = format!(
            "{}{}{}",
            req.path,
            if req.query.is_empty() { "" } else { "?" },
            req.query
        );
        if target.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|i| target.is_char_boundary(*i))
                .unwrap_or(0);
            target.truncate(cut);
            target.push('…');
        }
        let error = if resp.status >= 400 {
            Some(
                String::from_utf8_lossy(&resp.body)
                    .chars()
                    .take(200)
                    .collect(),
            )
        } else {
            None
        };
        sink(FabricEvent {
            endpoint: ep,
            method: req.method.clone(),
            target,
            status: resp.status,
            agent,
            health: h,
            error,
        });
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs the `--identity-token-command` (no shell) with the request's parameters in
/// `KILN_IDENTITY_<NAME>` variables and serves its stdout (JSON) as the token response.
async fn run_token_command(cfg: &FabricConfig, params: &[(String, String)]) -> Response {
    let Some(argv) = cfg.token_command.as_ref().filter(|a| !a.is_empty()) else {
        return Response::json(
            500,
            &serde_json::json!({"error": "unknown_error", "error_description": "kiln: no identity token command"}),
        );
    };
    let fail = |why: String| {
        Response::json(
            500,
            &serde_json::json!({"error": "unknown_error", "error_description": format!("kiln: the identity token command `{}` failed: {why}", argv.join(" "))}),
        )
    };
    let mut c = tokio::process::Command::new(&argv[0]);
    c.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in params {
        let name: String = k
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        if !name.is_empty() && name.len() <= 40 {
            c.env(format!("KILN_IDENTITY_{name}"), percent_decode(v));
        }
    }
    let out = match tokio::time::timeout(TOKEN_COMMAND_TIMEOUT, c.output()).await {
        Err(_) => {
            return fail(format!(
                "no answer within {}s",
                TOKEN_COMMAND_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return fail(e.to_string()),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        return fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(300)
                .collect::<String>()
        ));
    }
    if out.stdout.len() > TOKEN_MAX_BYTES {
        return fail(format!("it printed more than {TOKEN_MAX_BYTES} bytes"));
    }
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) if v.is_object() => Response::json(200, &v),
        _ => fail("its output is not a JSON object".into()),
    }
}

/// `kiln __fabric-connect SOCKET ENDPOINT`: what QEMU runs per guest connection. Copies stdin
/// to the socket and the socket to stdout; nothing else.
pub fn relay(socket: &Path, endpoint: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let ep = Endpoint::parse(endpoint).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("unknown endpoint `{endpoint}` (wire, imds, files)"),
        )
    })?;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.write_all(format!("{}\n", ep.as_str()).as_bytes())?;
    let mut up = s.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
