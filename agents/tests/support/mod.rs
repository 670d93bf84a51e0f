//! Real SSH servers on 127.0.0.1 for the integration tests: OpenSSH's `sshd` and `dropbear`,
//! each with its own temporary host key, authorized key and port. Every process started here is
//! killed (with its whole process tree) when the fixture is dropped.
//!
//! Needs the Debian packages `openssh-server` (sshd, ssh-keygen) and `dropbear-bin` (dropbear,
//! dropbearkey), and root with the right to make mount namespaces (`unshare -m`, util-linux):
//! each server runs in a private mount namespace where the user's home directory is a fresh
//! temporary one (see `Server::isolated`).

#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln_agents::{ConnectConfig, HostKeyFingerprint, KeyPair, PrivateKey};

/// Which server implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OpenSsh,
    Dropbear,
}

/// A server fixture. Created stopped; `start` launches it.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    pub dir: PathBuf,
    pub user: String,
    pub client: KeyPair,
    /// The host key's fingerprint as the server's own tools print it.
    pub host_fp: HostKeyFingerprint,
    child: Option<Child>,
    log: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn current_user() -> String {
    run(Command::new("id").arg("-un")).trim().to_string()
}

/// A fresh temporary directory, removed by the fixture that owns it.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kiln-agents-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o700);
    dir
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

impl Server {
    /// Prepare keys and configuration without starting anything.
    pub fn new(kind: Kind) -> Server {
        let dir = temp_dir(match kind {
            Kind::OpenSsh => "sshd",
            Kind::Dropbear => "dropbear",
        });
        let port = free_port();
        let user = current_user();
        let client = kiln_agents::generate_ed25519("kiln-agents-test").unwrap();
        let host_key = dir.join("host_ed25519");
        let host_fp = match kind {
            Kind::OpenSsh => {
                run(Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f"])
                    .arg(&host_key));
                let line = run(Command::new("ssh-keygen")
                    .arg("-lf")
                    .arg(host_key.with_extension("pub")));
                line.split_whitespace().nth(1).unwrap().to_string()
            }
            Kind::Dropbear => {
                run(Command::new("dropbearkey")
                    .args(["-t", "ed25519", "-f"])
                    .arg(&host_key));
                let out = run(Command::new("dropbearkey")
                    .arg("-y")
                    .arg("-f")
                    .arg(&host_key));
                out.lines()
                    .find_map(|l| l.strip_prefix("Fingerprint: "))
                    .unwrap()
                    .trim()
                    .to_string()
            }
        };
        let server = Server {
            kind,
            port,
            log: dir.join("server.log"),
            dir,
            user,
            client,
            host_fp: HostKeyFingerprint(host_fp),
            child: None,
        };
        server.authorize(&server.client.public_line.clone());
        server
    }

    /// Prepare and start.
    pub fn started(kind: Kind) -> Server {
        let mut s = Server::new(kind);
        s.start();
        s
    }

    /// The `authorized_keys` file this server reads.
    fn authorized_keys(&self) -> PathBuf {
        match self.kind {
            Kind::OpenSsh => self.dir.join("authorized_keys"),
            Kind::Dropbear => self.dir.join("home/.ssh/authorized_keys"),
        }
    }

    /// Replace the authorized keys with `line`.
    pub fn authorize(&self, line: &str) {
        let path = self.authorized_keys();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::create_dir_all(self.dir.join("home")).unwrap();
        set_mode(&self.dir.join("home"), 0o700);
        set_mode(path.parent().unwrap(), 0o700);
        fs::write(&path, format!("{line}\n")).unwrap();
        set_mode(&path, 0o600);
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A connect config for this server with short test timeouts.
    pub fn config(&self) -> ConnectConfig {
        self.config_with_key(self.client.private.clone())
    }

    pub fn config_with_key(&self, key: PrivateKey) -> ConnectConfig {
        let mut c = ConnectConfig::new(self.addr(), self.user.clone(), key);
        c.timeout = Duration::from_secs(20);
        c.auth_grace = Duration::ZERO;
        c
    }

    /// `program` in a private mount namespace where the user's home directory is `dir/home`:
    /// guest commands then run without the host's dotfiles (a `.bashrc` that prints or stalls
    /// would break the tests), and dropbear, which has no `AuthorizedKeysFile` option, finds
    /// our `authorized_keys`.
    fn isolated(&self, program: &str) -> Command {
        let home = run(Command::new("sh")
            .arg("-c")
            .arg("getent passwd \"$(id -un)\" | cut -d: -f6"))
        .trim()
        .to_string();
        let mut c = Command::new("unshare");
        c.args(["-m", "--", "sh", "-c"])
            .arg("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"")
            .arg("sh")
            .arg(self.dir.join("home"))
            .arg(home)
            .arg(program);
        c
    }

    /// Launch the server process (again, after `kill`).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.kind {
            Kind::OpenSsh => {
                // Debian's sshd refuses to start without its privilege separation directory,
                // which only the init system creates.
                fs::create_dir_all("/run/sshd").unwrap();
                let config = self.dir.join("sshd_config");
                fs::write(
                    &config,
                    format!(
                        "Port {port}\n\
                         ListenAddress 127.0.0.1\n\
                         HostKey {dir}/host_ed25519\n\
                         AuthorizedKeysFile {dir}/authorized_keys\n\
                         PidFile none\n\
                         StrictModes no\n\
                         UsePAM no\n\
                         PubkeyAuthentication yes\n\
                         PasswordAuthentication no\n\
                         KbdInteractiveAuthentication no\n\
                         PermitRootLogin prohibit-password\n\
                         MaxStartups 100\n\
                         LogLevel ERROR\n",
                        port = self.port,
                        dir = self.dir.display()
                    ),
                )
                .unwrap();
                let mut c = self.isolated("/usr/sbin/sshd");
                c.arg("-D").arg("-e").arg("-f").arg(&config);
                c
            }
            Kind::Dropbear => {
                let mut c = self.isolated("/usr/sbin/dropbear");
                c.args(["-F", "-E", "-s", "-p"])
                    .arg(format!("127.0.0.1:{}", self.port))
                    .arg("-r")
                    .arg(self.dir.join("host_ed25519"))
                    .arg("-P")
                    .arg(self.dir.join("dropbear.pid"));
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("cannot start the SSH server"));
    }

    /// Wait until the server accepts TCP connections (at most 10 s).
    pub async fn wait_listening(&self) {
        let t = std::time::Instant::now();
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "server never listened:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process ids of the server and everything it started (sessions, shells, commands).
    fn tree(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let mut parents: Vec<(u32, u32)> = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the command name, which is in parentheses and may contain spaces.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            parents.push((pid, ppid));
        }
        let mut tree = vec![child.id()];
        let mut i = 0;
        while i < tree.len() {
            let p = tree[i];
            tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        tree
    }

    fn signal_tree(&self, sig: &str) {
        let pids = self.tree();
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
    }

    /// Kill the server and every session it has, like a guest that lost power.
    pub fn kill(&mut self) {
        self.signal_tree("KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Freeze the server and its sessions: TCP stays up, nothing answers.
    pub fn freeze(&self) {
        self.signal_tree("STOP");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
