//! The hand-rolled way to drive a build VM, with nothing but QEMU, OpenSSH and qemu-img: the
//! floor contender and the OpenSSH side of the upload benchmark use it.

use super::util::{free_port, run_ok};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The build user (as kiln's and AIB's build VM).
pub const USER: &str = "packer";

/// An ed25519 key made by ssh-keygen.
pub struct Key {
    pub private: PathBuf,
    pub public: String,
}

impl Key {
    pub fn generate(dir: &Path, name: &str) -> Result<Key> {
        let private = dir.join(name);
        let _ = std::fs::remove_file(&private);
        let _ = std::fs::remove_file(private.with_extension("pub"));
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
                .arg(&private),
        )?;
        let public = std::fs::read_to_string(dir.join(format!("{name}.pub")))?
            .trim()
            .to_string();
        Ok(Key { private, public })
    }
}

/// The user-data kiln generates (same user, sudo, shell, key).
pub fn user_data(public_key: &str) -> String {
    format!("#cloud-config\nusers:\n  - name: {USER}\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/sh\n    lock_passwd: true\n    ssh_authorized_keys:\n      - '{public_key}'\nssh_pwauth: false\ndisable_root: true\n")
}

fn seed_files(dir: &Path, name: &str, public_key: &str) -> Result<PathBuf> {
    let src = dir.join(format!("{name}-files"));
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("meta-data"),
        format!("instance-id: {name}\nlocal-hostname: bench\n"),
    )?;
    std::fs::write(src.join("user-data"), user_data(public_key))?;
    Ok(src)
}

/// A NoCloud seed as kiln makes it: a small FAT disk labelled CIDATA.
pub fn seed_vfat(dir: &Path, name: &str, public_key: &str) -> Result<PathBuf> {
    let src = seed_files(dir, name, public_key)?;
    let path = dir.join(format!("{name}.img"));
    let _ = std::fs::remove_file(&path);
    run_ok(
        Command::new("mkfs.vfat")
            .args(["-n", "CIDATA", "-C"])
            .arg(&path)
            .arg("1024"),
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
    Ok(path)
}

/// A NoCloud seed as an ISO labelled cidata (for Packer, which attaches it with `-cdrom`).
pub fn seed_iso(dir: &Path, name: &str, public_key: &str) -> Result<PathBuf> {
    let src = seed_files(dir, name, public_key)?;
    let path = dir.join(format!("{name}.iso"));
    run_ok(
        Command::new("genisoimage")
            .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
            .arg(&path)
            .arg(src.join("meta-data"))
            .arg(src.join("user-data")),
    )?;
    Ok(path)
}

/// A qcow2 overlay on `base` (which is never written).
pub fn overlay(base: &Path, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(path),
    )?;
    Ok(())
}

/// A running build VM: QEMU with the same machine as kiln's (BIOS `pc`, TCG, `-cpu max`,
/// virtio disk/net/rng, the seed as a second virtio disk, serial console to a file).
pub struct Vm {
    pub child: Child,
    pub port: u16,
    pub console: PathBuf,
    pub started: Instant,
    ctl: PathBuf,
}

impl Vm {
    pub fn start(
        dir: &Path,
        name: &str,
        disk: &Path,
        seed: &Path,
        cpus: u32,
        memory_mib: u32,
    ) -> Result<Vm> {
        let port = free_port()?;
        let console = dir.join(format!("{name}-console.log"));
        let _ = std::fs::remove_file(&console);
        let stderr = std::fs::File::create(dir.join(format!("{name}-qemu.stderr")))?;
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp"])
            .arg(cpus.to_string())
            .arg("-m")
            .arg(memory_mib.to_string())
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-drive",
            ])
            .arg(format!(
                "file={},format=qcow2,if=none,id=os,discard=unmap",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=os,bootindex=0", "-drive"])
            .arg(format!(
                "file={},format=raw,if=none,id=seed,readonly=on",
                seed.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=seed", "-netdev"])
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"))
            .args([
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
                "-device",
                "virtio-rng-pci",
                "-serial",
            ])
            .arg(format!("file:{}", console.display()));
        let started = Instant::now();
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Vm {
            child,
            port,
            console,
            started,
            ctl: dir.join(format!("{name}.ctl")),
        })
    }

    /// `ssh` through this VM's one multiplexed connection (the master is opened by `wait_ssh`).
    pub fn ssh(&self, key: &Key) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i").arg(&key.private);
        for o in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "LogLevel=ERROR",
            "ConnectTimeout=5",
        ] {
            c.arg("-o").arg(o);
        }
        c.arg("-o")
            .arg(format!("ControlPath={}", self.ctl.display()));
        c.arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{USER}@127.0.0.1"));
        c
    }

    /// Polls (every 50 ms) until a master connection is up and logged in; returns when.
    pub fn wait_ssh(&mut self, key: &Key, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({st}) before SSH answered; console {}",
                    self.console.display()
                );
            }
            let st = self
                .ssh(key)
                .args([
                    "-o",
                    "ControlMaster=yes",
                    "-o",
                    "ControlPersist=yes",
                    "true",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                return Ok(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no SSH login within {timeout:?}; console {}",
            self.console.display()
        )
    }

    /// Runs `cmd` in the guest with `stdin` from a file (or nothing); it must exit 0.
    pub fn run(&self, key: &Key, cmd: &str, stdin: Option<&Path>) -> Result<()> {
        let mut c = self.ssh(key);
        c.arg(cmd);
        match stdin {
            Some(p) => {
                c.stdin(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)
            }
            None => c.stdin(Stdio::null()),
        };
        let out = c.output()?;
        if !out.status.success() {
            bail!(
                "`{cmd}` in the guest failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("QEMU did not exit within {timeout:?}")
    }

    /// Closes the master connection (if any) and kills QEMU if it still runs.
    pub fn stop(&mut self, key: &Key) {
        let _ = self
            .ssh(key)
            .args(["-O", "exit"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        super::util::kill(&mut self.child);
    }
}
