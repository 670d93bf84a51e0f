//! The `debian` guest: a Debian 12 cloud-style image, as close to an Azure Marketplace
//! Debian image as Debian's own packages allow: systemd, openssh-server, sudo,
//! cloud-init (NoCloud and Azure datasources), the Azure Linux agent (`waagent`), the
//! cloud kernel, a 2 GiB GPT disk that boots with BIOS and UEFI, ext4 root.
//!
//! Built with mmdebstrap (chroot mode, as root) into a directory, customized by
//! `scripts/guest/debian/customize.sh` inside the chroot, then packed without mounting:
//! `mkfs.ext4 -d`, a FAT ESP with syslinux + systemd-boot (see `disk.rs`), sfdisk, and a
//! zstd-compressed qcow2. Downloaded .debs are kept in `<cache>/debs/bookworm/` so that
//! rebuilds download only the package indexes.
//!
//! Note: the guest's package versions come from the mirror at build time and are not
//! part of the cache key (only the recipe and the host tools are); `--force` rebuilds
//! with current packages.
//!
//! Variants ([`Variant`]) share this recipe and differ only in the packages left out, a
//! `variant.sh` run in the chroot after `customize.sh` (from `scripts/guest/<name>/`) and
//! their catalog metadata: `debian-azure` (cloud-init with only its Azure datasource) and
//! `debian-waagent` (no cloud-init: the Azure Linux agent provisions).

use super::disk::{self, BootEntry, DiskTools, Layout};
use super::util::{self, cmd, host_file, run, run_streamed, tool, write_file, Progress};
use super::{BuildCtx, Recipe};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

macro_rules! guest_file {
    ($p:literal) => {
        (
            $p,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/guest/debian/",
                $p
            )),
        )
    };
}

const FILES: &[(&str, &str)] = &[
    guest_file!("customize.sh"),
    guest_file!("esp-sync"),
    guest_file!("90_kiln.cfg"),
    guest_file!("cmdline"),
    guest_file!("initramfs-modules"),
];

/// The recipe code (this file and the disk assembly) is part of the recipe.
const RECIPE_SOURCE: &[&str] = &[include_str!("debian.rs"), include_str!("disk.rs")];

const LAYOUT: Layout = Layout {
    total_mib: 2048,
    esp_mib: 127,
};

const SUITE: &str = "bookworm";

/// The apt sources of the image (also what mmdebstrap downloads from).
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// Installed on top of `--variant=minbase` (essential + apt).
const INCLUDE: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "openssh-server",
    "openssh-sftp-server",
    "sudo",
    "cloud-init",
    "cloud-guest-utils",
    "waagent",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "iproute2",
    "iputils-ping",
    "ca-certificates",
    "curl",
    "locales",
    "e2fsprogs",
    "dosfstools",
    "procps",
    "less",
    "python3",
    "zstd",
];

/// Host packages whose versions shape the image.
const HOST_PACKAGES: &[&str] = &["mmdebstrap", "qemu-utils"];

/// Guest packages whose versions are recorded in meta.json.
const REPORTED: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd",
    "openssh-server",
    "sudo",
    "cloud-init",
    "waagent",
    "python3",
];

/// One image built from this recipe.
pub struct Variant {
    /// The image's name (cache directory, catalog offer).
    pub name: &'static str,
    /// meta.json `description`.
    pub description: &'static str,
    /// Packages of [`INCLUDE`] left out.
    pub without: &'static [&'static str],
    /// Packages added to [`INCLUDE`].
    pub with: &'static [&'static str],
    /// `variant.sh`, run in the chroot after `customize.sh`.
    pub script: Option<&'static str>,
    /// meta.json `provisioning`, preferred first.
    pub provisioning: &'static [&'static str],
}

/// The plain image: cloud-init (NoCloud, then Azure) and waagent.
pub const PLAIN: Variant = Variant {
    name: "debian",
    description: "kiln debian test guest: Debian 12 cloud-style (cloud-init NoCloud+Azure, waagent), BIOS and UEFI",
    without: &[],
    with: &[],
    script: None,
    provisioning: &["nocloud", "azure"],
};

/// cloud-init with only the Azure datasource, as on Azure Marketplace images.
pub const AZURE: Variant = Variant {
    name: "debian-azure",
    description: "kiln debian-azure test guest: Debian 12 with cloud-init's Azure datasource only (and waagent for extensions), BIOS and UEFI",
    without: &[],
    with: &[],
    script: Some(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/guest/debian-azure/variant.sh"))),
    provisioning: &["azure"],
};

/// No cloud-init: waagent provisions (`Provisioning.Agent=waagent`).
pub const WAAGENT: Variant = Variant {
    name: "debian-waagent",
    description: "kiln debian-waagent test guest: Debian 12 without cloud-init, provisioned by the Azure Linux agent (Provisioning.Agent=waagent), BIOS and UEFI",
    without: &["cloud-init", "cloud-guest-utils"],
    // waagent ejects the provisioning DVD after copying ovf-env.xml (and crashes without it)
    with: &["eject"],
    script: Some(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/guest/debian-waagent/variant.sh"))),
    provisioning: &["azure"],
};

pub struct Debian(pub &'static Variant);

impl Recipe for Debian {
    fn hash_input(&self) -> Result<Vec<u8>> {
        let mut pkgs: Vec<String> = HOST_PACKAGES.iter().map(|s| s.to_string()).collect();
        pkgs.extend(DiskTools::packages());
        let mut input = Vec::new();
        for src in RECIPE_SOURCE {
            input.extend_from_slice(super::util::normalized_source(src).as_bytes());
        }
        for (name, body) in FILES {
            input.extend_from_slice(format!("\0file {name}\0").as_bytes());
            input.extend_from_slice(body.as_bytes());
        }
        for v in util::package_versions(&pkgs)? {
            input.extend_from_slice(format!("\0pkg {v}").as_bytes());
        }
        let v = self.0;
        if v.name != PLAIN.name {
            input.extend_from_slice(
                format!(
                    "\0variant {} without {:?} with {:?} provisioning {:?}\0",
                    v.name, v.without, v.with, v.provisioning
                )
                .as_bytes(),
            );
            input.extend_from_slice(v.script.unwrap_or_default().as_bytes());
        }
        Ok(input)
    }

    fn build(&self, ctx: &BuildCtx, p: &mut Progress) -> Result<()> {
        let t = DiskTools::find()?;
        let mmdebstrap = tool("mmdebstrap", "mmdebstrap")?;
        p.done("host tools checked");

        let work = &ctx.work;
        let rootfs = work.join("rootfs");
        let debs = ctx.cache_root.join("debs").join(SUITE);
        std::fs::create_dir_all(&debs)?;
        let files = work.join("kiln");
        for (name, body) in FILES {
            write_file(&files.join(name), body, 0o755)?;
        }
        if let Some(script) = self.0.script {
            write_file(&files.join("variant.sh"), script, 0o755)?;
        }
        let cached = std::fs::read_dir(&debs).map(|d| d.count()).unwrap_or(0);
        p.note(&format!(
            "mmdebstrap {SUITE} ({cached} cached .debs in {})",
            debs.display()
        ));

        let mut c = cmd(
            &mmdebstrap,
            &["--variant=minbase", "--mode=root", "--format=directory"],
        );
        let include: Vec<&str> = INCLUDE
            .iter()
            .copied()
            .filter(|p| !self.0.without.contains(p))
            .chain(self.0.with.iter().copied())
            .collect();
        c.arg(format!("--include={}", include.join(",")));
        for opt in [
            "path-exclude=/usr/share/man/*",
            "path-exclude=/usr/share/doc/*",
            "path-include=/usr/share/doc/*/copyright",
            "path-exclude=/usr/share/info/*",
        ] {
            c.arg(format!("--dpkgopt={opt}"));
        }
        c.arg("--aptopt=Acquire::Retries \"3\"");
        c.arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/");
        c.arg(format!(
            "--setup-hook=sync-in '{}' /var/cache/apt/archives/",
            debs.display()
        ));
        c.arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives '{}'",
            debs.display()
        ));
        c.arg(format!(
            "--customize-hook=copy-in '{}' /tmp",
            files.display()
        ));
        c.arg("--customize-hook=chroot \"$1\" sh /tmp/kiln/customize.sh");
        if self.0.script.is_some() {
            c.arg("--customize-hook=chroot \"$1\" sh /tmp/kiln/variant.sh");
        }
        c.arg("--customize-hook=rm -rf \"$1\"/tmp/kiln");
        c.arg(SUITE).arg(&rootfs);
        for s in SOURCES {
            c.arg(s);
        }
        run_streamed(
            &mut c,
            &format!("[images] {}:   ", self.0.name),
            &work.join("mmdebstrap.log"),
        )
        .context("mmdebstrap (needs the Debian mirror; see the log)")?;
        remove_partial_debs(&debs);
        p.done("mmdebstrap + customize");

        let krel = newest_kernel(&rootfs)?;
        let vmlinuz = rootfs.join("boot").join(format!("vmlinuz-{krel}"));
        let initrd = rootfs.join("boot").join(format!("initrd.img-{krel}"));
        host_file(initrd.to_str().unwrap(), "initramfs-tools (in the image)")?;
        let cmdline = file("cmdline").trim().to_string();
        let esp = work.join("esp.img");
        let boot = BootEntry {
            title: "Debian GNU/Linux 12 (kiln)",
            kernel: &vmlinuz,
            initrd: &initrd,
            cmdline: &cmdline,
            fast: None,
        };
        let volid = &util::uuid_from(&ctx.hash, "esp-volid").replace('-', "")[..8];
        disk::build_esp(&t, work, &esp, LAYOUT.esp_mib, "KILN-ESP", volid, &boot)?;
        let versions = guest_versions(&rootfs)?;
        let rootimg = work.join("root.img");
        disk::build_root(
            &t,
            &rootfs,
            &rootimg,
            LAYOUT.root_mib(),
            "kiln-root",
            &util::uuid_from(&ctx.hash, "rootfs"),
            &[],
        )?;
        // the tree is no longer needed: free the space before the disk copies
        let _ = std::fs::remove_dir_all(&rootfs);
        p.done(&format!("ESP and ext4 root built (kernel {krel})"));

        let raw = work.join("disk.raw");
        disk::assemble(&t, &raw, &LAYOUT, &esp, &rootimg, "kiln-root", &ctx.hash)?;
        let _ = std::fs::remove_file(&rootimg);
        let qcow = ctx.out.join("disk.qcow2");
        disk::to_qcow2(&t, &raw, &qcow, true)?;
        p.done("GPT disk assembled (qcow2, zstd)");

        let mut meta = super::base_meta(&t, self.0.name, ctx, &qcow)?;
        let extra = serde_json::json!({
            "name": self.0.name,
            "description": self.0.description,
            "defaultAdminUser": "debian",
            "buildUser": "packer",
            "provisioning": self.0.provisioning,
            "deprovision": "/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync",
            "kernel": krel,
            "kernelCmdline": cmdline,
            "ssh": {"server": "openssh", "sftp": true, "port": 22},
            "suite": SUITE,
            "aptSources": SOURCES,
            "controllers": {
                "disk": ["virtio-blk", "virtio-scsi", "ide"],
                "cdrom": ["ide"],
                "nic": ["virtio-net", "e1000"],
                "note": "linux-image-cloud-amd64 has no AHCI: on q35 attach the seed as a virtio disk"
            },
            "seed": {"labels": ["cidata", "CIDATA"], "filesystems": ["iso9660", "vfat"]},
            "guestPackages": versions,
            "hostPackages": util::package_versions(&HOST_PACKAGES.iter().map(|s| s.to_string()).collect::<Vec<_>>())?,
        });
        for (k, v) in extra.as_object().unwrap() {
            meta.insert(k.clone(), v.clone());
        }
        write_file(
            &ctx.out.join("meta.json"),
            serde_json::to_string_pretty(&meta)? + "\n",
            0o644,
        )?;
        Ok(())
    }
}

fn file(name: &str) -> &'static str {
    FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .expect("guest file")
}

/// The newest `vmlinuz-<release>` under rootfs/boot.
fn newest_kernel(rootfs: &Path) -> Result<String> {
    let mut rels: Vec<String> = std::fs::read_dir(rootfs.join("boot"))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    rels.sort_by_key(|r| version_key(r));
    match rels.pop() {
        Some(r) => Ok(r),
        None => bail!("no kernel in {}/boot", rootfs.display()),
    }
}

fn version_key(rel: &str) -> Vec<u64> {
    rel.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// Versions of the interesting guest packages, from the image's dpkg database.
fn guest_versions(rootfs: &Path) -> Result<Vec<String>> {
    let dpkg = tool("dpkg-query", "dpkg")?;
    let admindir: PathBuf = rootfs.join("var/lib/dpkg");
    let out = run(cmd(&dpkg, &["-W", "-f=${Package}=${Version}\n"])
        .arg(format!("--admindir={}", admindir.display()))
        .args(REPORTED))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// apt may leave partial downloads in the cache directory.
fn remove_partial_debs(debs: &Path) {
    let _ = std::fs::remove_dir_all(debs.join("partial"));
    let _ = std::fs::remove_file(debs.join("lock"));
}
