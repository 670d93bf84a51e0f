//! QEMU test guests: images, keys, NoCloud seeds, VMs and SSH.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use xtask::images::Image;

/// The test guest image `name` ("tiny" or "debian"), built first if not cached. Callers
/// in one process share one build; other processes wait on xtask's lock.
pub fn image(name: &str) -> Result<Image> {
    type Slot = Arc<Mutex<Option<Image>>>;
    static LOCKS: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    let slot = {
        let mut map = LOCKS.get_or_init(Default::default).lock().unwrap();
        map.entry(name.to_string()).or_default().clone()
    };
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(img) = guard.as_ref() {
        return Ok(img.clone());
    }
    let img =
        xtask::images::ensure(name, &xtask::images::Options::default()).with_context(|| {
            format!("getting test guest image `{name}` (cargo xtask images --only {name})")
        })?;
    *guard = Some(img.clone());
    Ok(img)
}

/// A scratch directory removed on drop (kept when `KILN_KEEP_TEST_DIRS` is set).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> Result<TestDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("kiln-test-{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(TestDir { path })
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("KILN_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// An ed25519 key pair made with `ssh-keygen -t ed25519 -N ''`.
pub struct Key {
    pub private: PathBuf,
    pub public: String,
}

impl Key {
    pub fn generate(dir: &Path, name: &str) -> Result<Key> {
        let private = dir.join(name);
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("kiln-test-{name}"))
                .arg("-f")
                .arg(&private),
        )?;
        let public = fs::read_to_string(private.with_extension("pub"))?
            .trim()
            .to_string();
        Ok(Key { private, public })
    }
}

/// The seed's filesystem.
#[derive(Clone, Copy, Debug)]
pub enum SeedFormat {
    /// ISO 9660 with Joliet + Rock Ridge, volume `cidata` (genisoimage)
    Iso,
    /// FAT, label `CIDATA` (mkfs.vfat + mcopy)
    Vfat,
}

/// A NoCloud seed volume.
pub struct Seed {
    pub path: PathBuf,
    pub format: SeedFormat,
}

/// The user-data kiln generates for its build user.
pub fn user_data(user: &str, public_key: &str) -> String {
    format!(
        "#cloud-config\nusers:\n  - name: {user}\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/sh\n    ssh_authorized_keys: [{public_key}]\n"
    )
}

impl Seed {
    /// Writes meta-data + user-data into a seed image in `dir`.
    pub fn create(
        dir: &Path,
        name: &str,
        format: SeedFormat,
        instance_id: &str,
        hostname: &str,
        user_data: &str,
    ) -> Result<Seed> {
        let src = dir.join(format!("{name}-files"));
        fs::create_dir_all(&src)?;
        fs::write(
            src.join("meta-data"),
            format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n"),
        )?;
        fs::write(src.join("user-data"), user_data)?;
        let path;
        match format {
            SeedFormat::Iso => {
                path = dir.join(format!("{name}.iso"));
                run_ok(
                    Command::new("genisoimage")
                        .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
                        .arg(&path)
                        .arg(src.join("meta-data"))
                        .arg(src.join("user-data")),
                )?;
            }
            SeedFormat::Vfat => {
                path = dir.join(format!("{name}.img"));
                run_ok(
                    Command::new("mkfs.vfat")
                        .args(["-n", "CIDATA", "-C"])
                        .arg(&path)
                        .arg("2048"),
                )?;
                run_ok(
                    Command::new("mcopy")
                        .env("MTOOLS_SKIP_CHECK", "1")
                        .arg("-i")
                        .arg(&path)
                        .arg(src.join("meta-data"))
                        .arg(src.join("user-data"))
                        .arg("::/"),
                )?;
            }
        }
        Ok(Seed { path, format })
    }
}

/// Creates `path` as a qcow2 overlay on the (never modified) cached image.
pub fn overlay(image: &Image, path: &Path) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&image.disk)
            .arg("-F")
            .arg(&image.format)
            .arg(path),
    )?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, `-machine pc` (Hyper-V Gen1)
    Bios,
    /// OVMF, `-machine q35` (Hyper-V Gen2)
    Uefi,
}

/// How the seed is attached.
#[derive(Clone, Copy, Debug)]
pub enum SeedAttach {
    /// a CD on the machine's IDE/SATA controller (PIIX IDE on pc, AHCI on q35)
    Cdrom,
    /// a second virtio-blk disk
    VirtioDisk,
}

pub struct VmConfig<'a> {
    pub firmware: Firmware,
    pub disk: &'a Path,
    pub seed: Option<(&'a Seed, SeedAttach)>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// where console.log, qemu.stderr and the UEFI vars go
    pub dir: &'a Path,
    /// label for the log files
    pub name: &'a str,
}

/// Ports handed out by this process (so concurrent tests never pick the same one).
fn pick_port() -> Result<u16> {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let used = USED.get_or_init(Default::default);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if used.lock().unwrap().insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// At most this many guests run at once in this process (TCG wants a core each).
fn vm_slots() -> &'static (Mutex<usize>, Condvar) {
    static SLOTS: OnceLock<(Mutex<usize>, Condvar)> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let n = std::env::var("KILN_TEST_VMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .max(1)
            });
        (Mutex::new(n), Condvar::new())
    })
}

/// Holds one of the [`vm_slots`] until dropped.
pub struct VmSlot(());

impl VmSlot {
    pub fn acquire() -> VmSlot {
        let (m, cv) = vm_slots();
        let mut free = m.lock().unwrap();
        while *free == 0 {
            free = cv.wait(free).unwrap();
        }
        *free -= 1;
        VmSlot(())
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let (m, cv) = vm_slots();
        *m.lock().unwrap() += 1;
        cv.notify_one();
    }
}

/// A running QEMU guest; killed (and reaped) on drop.
pub struct Vm {
    child: Option<Child>,
    pub port: u16,
    pub console: PathBuf,
    pub stderr: PathBuf,
    pub started: Instant,
    pub name: String,
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        for attempt in 0..5 {
            let port = pick_port()?;
            let mut vm = Self::spawn(cfg, port)?;
            // QEMU exits at once when the host port is taken (another process won the race)
            let deadline = Instant::now() + Duration::from_millis(1500);
            let mut port_taken = false;
            while Instant::now() < deadline {
                if let Some(status) = vm.child.as_mut().unwrap().try_wait()? {
                    let err = fs::read_to_string(&vm.stderr).unwrap_or_default();
                    if err.contains("host forwarding") && attempt < 4 {
                        port_taken = true;
                        break;
                    }
                    bail!("QEMU exited at start ({status}): {err}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !port_taken {
                return Ok(vm);
            }
        }
        bail!("could not find a free port for QEMU")
    }

    fn spawn(cfg: &VmConfig, port: u16) -> Result<Vm> {
        let console = cfg.dir.join(format!("{}-console.log", cfg.name));
        let stderr = cfg.dir.join(format!("{}-qemu.stderr", cfg.name));
        let mut c = Command::new("qemu-system-x86_64");
        match cfg.firmware {
            Firmware::Bios => {
                c.args(["-machine", "pc,accel=tcg"]);
            }
            Firmware::Uefi => {
                let vars = cfg.dir.join(format!("{}-OVMF_VARS.fd", cfg.name));
                if !vars.exists() {
                    fs::copy(OVMF_VARS, &vars)
                        .with_context(|| format!("copying {OVMF_VARS} (package ovmf)"))?;
                }
                c.args(["-machine", "q35,accel=tcg"]);
                c.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
                ));
                c.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
            }
        }
        c.args([
            "-cpu",
            "max",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        c.arg("-m")
            .arg(cfg.memory_mib.to_string())
            .arg("-smp")
            .arg(cfg.cpus.to_string());
        c.arg("-drive").arg(format!(
            "file={},format=qcow2,if=none,id=os,discard=unmap",
            cfg.disk.display()
        ));
        c.args(["-device", "virtio-blk-pci,drive=os,bootindex=0"]);
        if let Some((seed, attach)) = cfg.seed {
            c.arg("-drive").arg(format!(
                "file={},format=raw,if=none,id=seed,readonly=on",
                seed.path.display()
            ));
            match attach {
                SeedAttach::Cdrom => c.args(["-device", "ide-cd,drive=seed"]),
                SeedAttach::VirtioDisk => c.args(["-device", "virtio-blk-pci,drive=seed"]),
            };
        }
        c.arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"));
        // romfile= : no iPXE option ROM (faster, and firmware never tries PXE)
        c.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        c.args(["-device", "virtio-rng-pci"]);
        c.arg("-serial").arg(format!("file:{}", console.display()));
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?);
        let child = c
            .spawn()
            .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;
        Ok(Vm {
            child: Some(child),
            port,
            console,
            stderr,
            started: Instant::now(),
            name: cfg.name.to_string(),
        })
    }

    /// The serial console so far (for failure messages).
    pub fn console_tail(&self, max: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.console) {
            let _ = f.read_to_string(&mut s);
        }
        let s: String = s
            .chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect();
        let start = s.len().saturating_sub(max);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        format!(
            "--- {} console (last {} bytes) ---\n{}\n--- qemu stderr ---\n{}",
            self.name,
            max,
            &s[start..],
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    pub fn ssh_command(&self, user: &str, key: &Key) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i").arg(&key.private);
        for o in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "ConnectTimeout=5",
            "ServerAliveInterval=5",
            "ServerAliveCountMax=6",
            "LogLevel=ERROR",
        ] {
            c.arg("-o").arg(o);
        }
        c.arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{user}@127.0.0.1"));
        c.stdin(Stdio::null());
        c
    }

    /// Runs `command` over SSH and returns its output (whatever the exit status).
    pub fn ssh(&self, user: &str, key: &Key, command: &str) -> Result<Output> {
        let out = self
            .ssh_command(user, key)
            .arg(command)
            .output()
            .context("running ssh (package openssh-client)")?;
        Ok(out)
    }

    /// Runs `command` over SSH; fails unless it exits 0. Returns stdout.
    pub fn ssh_ok(&self, user: &str, key: &Key, command: &str) -> Result<String> {
        let out = self.ssh(user, key, command)?;
        if !out.status.success() {
            bail!(
                "`{command}` failed over ssh ({}):\nstdout: {}\nstderr: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.console_tail(3000)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls until `ssh user@guest true` succeeds; returns the time since QEMU started.
    pub fn wait_ssh(&mut self, user: &str, key: &Key, timeout: Duration) -> Result<Duration> {
        let deadline = self.started + timeout;
        let mut last_err = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "QEMU exited ({status}) before SSH answered\n{}",
                    self.console_tail(4000)
                );
            }
            let out = self
                .ssh_command(user, key)
                .args(["-o", "ConnectTimeout=3", "true"])
                .output()?;
            if out.status.success() {
                return Ok(self.started.elapsed());
            }
            last_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "no SSH login as {user} within {timeout:?} (last error: {last_err})\n{}",
            self.console_tail(4000)
        )
    }

    /// Waits for QEMU to exit by itself (guest poweroff).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the guest did not power off within {timeout:?}\n{}",
            self.console_tail(3000)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
