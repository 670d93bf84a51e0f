//! The job every contender does, and what they share: the source image, the files served over
//! HTTP, the build VM's shape.

use super::util::{pseudo_random, serve, sha256_hex};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The build VM's shape for every contender: kiln's `Standard_B1ms` (1 vCPU, 2 GiB).
pub const VM_SIZE: &str = "Standard_B1ms";
pub const CPUS: u32 = 1;
pub const MEMORY_MIB: u32 = 2048;

/// The Shell inline step: writes a file.
pub const INLINE: &str = "echo inline-ran > /tmp/bench-inline";
/// Where the File step puts the 5 MiB payload.
pub const PAYLOAD_DEST: &str = "/tmp/payload.bin";
/// The payload's size.
pub const PAYLOAD_BYTES: usize = 5 << 20;
/// AIB's deprovisioning override path.
pub const DEPROVISION_DEST: &str = "/tmp/DeprovisioningScript.sh";

/// The scriptUri script: checks the payload arrived, writes a file.
const SETUP_SH: &str = "#!/bin/sh\nset -e\ntest \"$(wc -c < /tmp/payload.bin)\" -eq 5242880\necho from-scripturi > /tmp/bench-script\necho script-ran\n";
/// The deprovisioning override: what a minimal generalization does on this guest (host keys
/// gone, a marker), then sync. Runs as root.
const DEPROVISION_SH: &str = "#!/bin/sh\nrm -f /etc/dropbear/dropbear_*_host_key /etc/ssh/ssh_host_*\necho deprovisioned > /var/lib/bench-deprovisioned\nsync\n";

/// Everything shared by the contenders.
pub struct Ctx {
    /// The repository root.
    pub repo: PathBuf,
    /// Scratch: `target/bench-work/`.
    pub work: PathBuf,
    /// The kiln binary under test.
    pub kiln: PathBuf,
    /// The KILN_HOME with the source imported.
    pub kiln_home: PathBuf,
    /// The source image (the cached tiny guest, qcow2; never written).
    pub source: PathBuf,
    /// The directory served over HTTP.
    pub files: PathBuf,
    /// The HTTP server's port.
    pub port: u16,
    pub payload_sha: String,
    pub script_sha: String,
    pub deprov_sha: String,
}

impl Ctx {
    /// Writes the job's files, starts the HTTP server and imports the source into a KILN_HOME.
    pub fn new(
        repo: &Path,
        work: &Path,
        kiln: &Path,
        source: &Path,
        source_version: &str,
    ) -> Result<Ctx> {
        let files = work.join("files");
        std::fs::create_dir_all(&files)?;
        let payload = pseudo_random(PAYLOAD_BYTES, 0xb3_7c4);
        std::fs::write(files.join("payload.bin"), &payload)?;
        std::fs::write(files.join("setup.sh"), SETUP_SH)?;
        std::fs::write(files.join("deprovision.sh"), DEPROVISION_SH)?;
        let port = serve(files.clone())?;
        let kiln_home = work.join("kiln-home");
        let _ = std::fs::remove_dir_all(&kiln_home);
        std::fs::create_dir_all(&kiln_home)?;
        super::util::run_ok(
            std::process::Command::new(kiln)
                .env("KILN_HOME", &kiln_home)
                .args([
                    "image",
                    "import",
                    "--publisher",
                    "kiln",
                    "--offer",
                    "tiny",
                    "--sku",
                    "gen1",
                    "--version",
                    source_version,
                    "--hyper-v-generation",
                    "V1",
                ])
                .arg(source),
        )
        .context("importing the tiny guest into the bench's KILN_HOME")?;
        Ok(Ctx {
            repo: repo.to_path_buf(),
            work: work.to_path_buf(),
            kiln: kiln.to_path_buf(),
            kiln_home,
            source: source.to_path_buf(),
            files,
            port,
            payload_sha: sha256_hex(&payload),
            script_sha: sha256_hex(SETUP_SH.as_bytes()),
            deprov_sha: sha256_hex(DEPROVISION_SH.as_bytes()),
        })
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// The AIB template of the job, exporting to `vhd`.
    pub fn aib_template(&self, name: &str, vhd: &Path) -> serde_json::Value {
        json!({
            "type": "Microsoft.VirtualMachineImages/imageTemplates",
            "apiVersion": "2022-07-01",
            "name": name,
            "location": "westus2",
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
            "properties": {
                "buildTimeoutInMinutes": 30,
                "vmProfile": {"vmSize": VM_SIZE},
                "source": {"type": "PlatformImage", "publisher": "kiln", "offer": "tiny", "sku": "gen1", "version": "latest"},
                "customize": [
                    {"type": "Shell", "name": "inline", "inline": [INLINE]},
                    {"type": "File", "name": "payload", "sourceUri": self.url("payload.bin"), "sha256Checksum": self.payload_sha, "destination": PAYLOAD_DEST},
                    {"type": "Shell", "name": "script", "scriptUri": self.url("setup.sh"), "sha256Checksum": self.script_sha},
                    {"type": "File", "name": "deprovision", "sourceUri": self.url("deprovision.sh"), "sha256Checksum": self.deprov_sha, "destination": DEPROVISION_DEST}
                ],
                "distribute": [{"type": "VHD", "runOutputName": "out", "uri": vhd.display().to_string()}]
            }
        })
    }

    /// Packer 1.6.6's qemu builder doing the same job with the best settings it allows.
    /// Packer cannot fetch provisioner files from URLs: it gets the same files from disk.
    pub fn packer_template(
        &self,
        out_dir: &Path,
        key: &Path,
        seed_iso: &Path,
        console: &Path,
        vhd: &Path,
        port: u16,
    ) -> serde_json::Value {
        let f = |n: &str| self.files.join(n).display().to_string();
        json!({
            "builders": [{
                "type": "qemu",
                "accelerator": "tcg",
                "machine_type": "pc",
                "cpus": CPUS,
                "memory": MEMORY_MIB,
                "iso_url": self.source.display().to_string(),
                "iso_checksum": "none",
                "disk_image": true,
                "use_backing_file": false,
                "skip_resize_disk": true,
                "skip_compaction": true,
                "format": "qcow2",
                "disk_interface": "virtio",
                "net_device": "virtio-net",
                "headless": true,
                "disable_vnc": true,
                "boot_wait": "0s",
                "vm_name": "disk.qcow2",
                "output_directory": out_dir.display().to_string(),
                "communicator": "ssh",
                "ssh_username": super::guest::USER,
                "ssh_private_key_file": key.display().to_string(),
                "ssh_timeout": "5m",
                "host_port_min": port,
                "host_port_max": port,
                "shutdown_command": "sudo poweroff",
                "qemuargs": [["-cpu", "max"], ["-cdrom", seed_iso.display().to_string()], ["-serial", format!("file:{}", console.display())]]
            }],
            "provisioners": [
                {"type": "shell", "inline": [INLINE]},
                {"type": "file", "source": f("payload.bin"), "destination": PAYLOAD_DEST},
                {"type": "shell", "script": f("setup.sh")},
                {"type": "file", "source": f("deprovision.sh"), "destination": DEPROVISION_DEST},
                {"type": "shell", "inline": [format!("sudo sh {DEPROVISION_DEST}")]}
            ],
            "post-processors": [{
                "type": "shell-local",
                "inline": [format!("qemu-img convert -O vpc -o subformat=fixed,force_size {} {}", out_dir.join("disk.qcow2").display(), vhd.display())]
            }]
        })
    }
}
