//! What a VM is made of ([`VmSpec`]), the QEMU command line for it ([`argv`], a pure
//! function), and where QEMU and the UEFI firmware live on the host.

use super::accel::Accel;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The serial console log in the run directory (QEMU appends to it).
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's standard error in the run directory (appended to by every start).
pub const QEMU_STDERR: &str = "qemu.stderr";
/// The build's own copy of the UEFI variable store, in the run directory.
pub const UEFI_VARS: &str = "OVMF_VARS.fd";

/// The Debian package that provides `qemu-system-x86_64`.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The Debian package that provides `qemu-img`.
pub const QEMU_IMG_PACKAGE: &str = "qemu-utils";
/// The Debian package that provides the OVMF UEFI firmware.
pub const OVMF_PACKAGE: &str = "ovmf";

/// The firmware, which also fixes the machine type: Hyper-V generation 1 VMs boot BIOS on
/// a PC (`-machine pc`), generation 2 boot UEFI on a Q35 (`-machine q35`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS on `-machine pc` (Hyper-V Gen1).
    Bios,
    /// OVMF on `-machine q35` (Hyper-V Gen2).
    Uefi {
        /// the firmware code, mapped read-only (e.g. `/usr/share/OVMF/OVMF_CODE_4M.fd`)
        code: PathBuf,
        /// the pristine variable store; each build boots its own copy ([`UEFI_VARS`])
        vars_template: PathBuf,
    },
}

impl Firmware {
    /// UEFI with the firmware [`find_ovmf`] finds.
    pub fn uefi_default() -> Result<Firmware, Missing> {
        let ovmf = find_ovmf()?;
        Ok(Firmware::Uefi {
            code: ovmf.code,
            vars_template: ovmf.vars,
        })
    }
}

/// The controller the OS disk is attached to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci` (the default; Linux guests carry the driver).
    #[default]
    Virtio,
    /// A SATA disk (`ide-hd`) on an `ahci` controller kiln adds (`sata0`), on both machine
    /// types. Windows has an inbox AHCI driver (storahci).
    Ahci,
    /// An IDE disk (`ide-hd`) on the machine's first IDE bus (`ide.0`, unit 0): PIIX IDE on
    /// `pc`; on `q35` `ide.0` is the ICH9 controller's first port, which is AHCI.
    Ide,
}

impl DiskBus {
    /// `virtio`, `ahci`, `ide` (the CLI's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Ahci => "ahci",
            DiskBus::Ide => "ide",
        }
    }
    /// Parses `virtio`, `ahci` (or `sata`), `ide`.
    pub fn parse(s: &str) -> Option<DiskBus> {
        match s {
            "virtio" => Some(DiskBus::Virtio),
            "ahci" | "sata" => Some(DiskBus::Ahci),
            "ide" => Some(DiskBus::Ide),
            _ => None,
        }
    }
}

/// The NIC's device model (always on the one user-mode netdev, without an option ROM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NicModel {
    /// `virtio-net-pci` (the default).
    #[default]
    VirtioNet,
    /// `e1000` (Intel 82540EM; Windows has an inbox driver).
    E1000,
    /// `e1000e` (Intel 82574L).
    E1000e,
}

impl NicModel {
    /// The QEMU device name, which is also the CLI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::VirtioNet => "virtio-net-pci",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
        }
    }
    /// Parses `virtio-net-pci` (or `virtio`), `e1000`, `e1000e`.
    pub fn parse(s: &str) -> Option<NicModel> {
        match s {
            "virtio-net-pci" | "virtio" => Some(NicModel::VirtioNet),
            "e1000" => Some(NicModel::E1000),
            "e1000e" => Some(NicModel::E1000e),
            _ => None,
        }
    }
}

/// How [`VmSpec::seed_disk`] is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeedAttach {
    /// A read-only second `virtio-blk-pci` disk (the default; cloud-init finds it by label).
    #[default]
    VirtioDisk,
    /// A read-only USB stick with the removable bit set (`usb-storage,removable=on`) on a
    /// `qemu-xhci` controller kiln adds: removable media, which Windows Setup searches for
    /// `Unattend.xml` (Windows has inbox xHCI and USB mass-storage drivers).
    UsbRemovable,
}

/// How [`VmSpec::cdrom`] is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CdromAttach {
    /// An IDE `ide-cd` on `pc` (Hyper-V Gen1's DVD); on `q35` a read-only virtio disk, whose
    /// driver Linux cloud kernels have while many lack AHCI.
    #[default]
    LinuxCloud,
    /// An ATAPI `ide-cd` on both machine types (on `q35` the ICH9 AHCI controller's second
    /// port): a DVD drive, as Windows expects (inbox ATAPI/AHCI drivers).
    Atapi,
}

/// Everything needed to start one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// A label for messages, process listings (`-name`) and thread names.
    pub name: String,
    /// Where `console.log`, `qemu.stderr` and the UEFI variables go; created if missing.
    pub run_dir: PathBuf,
    /// The OS disk: a qcow2 overlay kiln made for this build (the boot disk, on
    /// [`VmSpec::disk_bus`]).
    pub disk: PathBuf,
    /// The OS disk's controller (default virtio).
    pub disk_bus: DiskBus,
    /// The NIC's model (default virtio-net-pci).
    pub nic_model: NicModel,
    /// BIOS or UEFI (and with it the machine type).
    pub firmware: Firmware,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// KVM or TCG; see [`super::choose_accel`].
    pub accel: Accel,
    /// A raw image (NoCloud seed, ovf-env or unattend media) attached read-only, as
    /// [`VmSpec::seed_attach`] says (default: a second virtio disk).
    pub seed_disk: Option<PathBuf>,
    /// How the seed disk is attached.
    pub seed_attach: SeedAttach,
    /// An ISO image attached read-only as a CD-ROM (Azure's provisioning media), as
    /// [`VmSpec::cdrom_attach`] says: by default an IDE `ide-cd` on `pc` (Hyper-V Gen1's DVD;
    /// `/dev/sr0`), a read-only virtio disk on `q35`, whose AHCI many cloud kernels lack
    /// (agents find the media by file-system type or as `vd[b-z]`).
    pub cdrom: Option<PathBuf>,
    /// How the CD-ROM is attached.
    pub cdrom_attach: CdromAttach,
    /// The NIC's MAC address (`52:54:00:12:34:56` form); `None` leaves QEMU's default, which is
    /// that address for the first NIC.
    pub mac: Option<String>,
    /// More `-netdev user` options appended verbatim (e.g. `guestfwd=...`), each already
    /// in QEMU's `key=value` form with commas in values doubled.
    pub extra_netdev_options: Vec<String>,
    /// A host process's view of the user network's frames (kiln's DHCP for Azure
    /// provisioning): see [`NetTap`].
    pub net_tap: Option<NetTap>,
    /// `-smbios` arguments, each verbatim (e.g. `type=1,serial=ds=nocloud`).
    pub smbios: Vec<String>,
    /// The VM's SMBIOS UUID (`-uuid`).
    pub uuid: Option<String>,
    /// The host port forwarded to the guest's port 22; `None` picks a free one.
    pub ssh_port: Option<u16>,
    /// The QEMU binary; `None` uses [`find_qemu`].
    pub qemu: Option<PathBuf>,
    /// Allow [`super::Vm::detach`] (`--keep-vm-on-error`): QEMU is then not killed by the
    /// kernel when kiln dies, so a kiln crash leaves this VM running. Default false.
    pub detachable: bool,
}

/// Three Unix sockets a host process listens on before QEMU starts, tied to the user netdev
/// by two `filter-redirector`s: every frame the guest sends goes to `from_guest` instead of
/// to slirp (`queue=rx`, `outdev`); frames written to `to_network` continue to slirp
/// (`indev` of the same filter) and frames written to `to_guest` reach the guest (`queue=tx`,
/// `indev`). Each frame is a 4-byte big-endian length and the Ethernet frame (no vnet
/// header: slirp has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetTap {
    /// Frames from the guest.
    pub from_guest: PathBuf,
    /// Frames for slirp.
    pub to_network: PathBuf,
    /// Frames for the guest.
    pub to_guest: PathBuf,
}

impl VmSpec {
    /// A spec with 2 vCPUs, 2 GiB, no seed, no extras, a free SSH port and QEMU from
    /// `PATH`.
    pub fn new(
        name: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        disk: impl Into<PathBuf>,
        firmware: Firmware,
        accel: Accel,
    ) -> VmSpec {
        VmSpec {
            name: name.into(),
            run_dir: run_dir.into(),
            disk: disk.into(),
            disk_bus: DiskBus::default(),
            nic_model: NicModel::default(),
            firmware,
            cpus: 2,
            memory_mib: 2048,
            accel,
            seed_disk: None,
            seed_attach: SeedAttach::default(),
            cdrom: None,
            cdrom_attach: CdromAttach::default(),
            mac: None,
            extra_netdev_options: Vec::new(),
            net_tap: None,
            smbios: Vec::new(),
            uuid: None,
            ssh_port: None,
            qemu: None,
            detachable: false,
        }
    }

    /// `run_dir/console.log`
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join(CONSOLE_LOG)
    }

    /// `run_dir/qemu.stderr`
    pub fn stderr_path(&self) -> PathBuf {
        self.run_dir.join(QEMU_STDERR)
    }

    /// `run_dir/OVMF_VARS.fd` (used with UEFI only)
    pub fn uefi_vars_path(&self) -> PathBuf {
        self.run_dir.join(UEFI_VARS)
    }
}

/// What is decided at launch time rather than in the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// the host port forwarded to the guest's SSH port
    pub ssh_port: u16,
    /// the descriptor number of QEMU's end of the QMP socket pair (inherited by QEMU)
    pub qmp_fd: i32,
}

/// The QEMU arguments (without the program name) for `spec`. Pure: touches no files.
///
/// Notes on the shape:
/// - `-nodefaults -no-user-config -display none`: only the devices listed here exist.
/// - The serial console goes to a file chardev (`append=on`, so a second boot in the same
///   run directory keeps the first one's log); QMP runs on an inherited, already
///   connected socket (`-chardev socket,fd=N`), so there is no socket path (nothing to
///   outgrow the 108-byte `sun_path` limit, nothing to poll for, nothing stale).
/// - The NIC has no option ROM (`romfile=`): no iPXE, faster firmware, no PXE attempts.
/// - Paths inside `key=value` options have commas doubled, QEMU's escape.
/// - No `-no-reboot`: guests reboot during builds (Windows updates, kernel updates);
///   the RESET events are counted instead.
pub fn argv(spec: &VmSpec, launch: &Launch) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&OsStr]| {
        let mut s = OsString::new();
        for p in parts {
            s.push(p);
        }
        a.push(s);
    };
    let s = |x: &str| OsString::from(x);

    push(&[s("-name").as_os_str()]);
    push(&[s("guest=").as_os_str(), &escape(OsStr::new(&spec.name))]);
    let (machine, cpu) = (
        match spec.firmware {
            Firmware::Bios => "pc",
            Firmware::Uefi { .. } => "q35",
        },
        match spec.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        },
    );
    for arg in [
        "-machine",
        machine,
        "-accel",
        spec.accel.as_str(),
        "-cpu",
        cpu,
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &spec.memory_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ] {
        push(&[s(arg).as_os_str()]);
    }
    if let Some(uuid) = &spec.uuid {
        push(&[s("-uuid").as_os_str()]);
        push(&[s(uuid).as_os_str()]);
    }
    for entry in &spec.smbios {
        push(&[s("-smbios").as_os_str()]);
        push(&[s(entry).as_os_str()]);
    }
    if let Firmware::Uefi { code, .. } = &spec.firmware {
        push(&[s("-drive").as_os_str()]);
        push(&[
            s("if=pflash,format=raw,unit=0,readonly=on,file=").as_os_str(),
            &escape(code.as_os_str()),
        ]);
        push(&[s("-drive").as_os_str()]);
        push(&[
            s("if=pflash,format=raw,unit=1,file=").as_os_str(),
            &escape(spec.uefi_vars_path().as_os_str()),
        ]);
    }
    push(&[s("-drive").as_os_str()]);
    push(&[
        s("file=").as_os_str(),
        &escape(spec.disk.as_os_str()),
        s(",format=qcow2,if=none,id=os,discard=unmap").as_os_str(),
    ]);
    let os_devices: &[&str] = match spec.disk_bus {
        DiskBus::Virtio => &["-device", "virtio-blk-pci,drive=os,bootindex=0"],
        DiskBus::Ahci => &[
            "-device",
            "ahci,id=sata0",
            "-device",
            "ide-hd,drive=os,bus=sata0.0,bootindex=0",
        ],
        DiskBus::Ide => &["-device", "ide-hd,drive=os,bus=ide.0,unit=0,bootindex=0"],
    };
    for arg in os_devices {
        push(&[s(arg).as_os_str()]);
    }
    if let Some(seed) = &spec.seed_disk {
        push(&[s("-drive").as_os_str()]);
        push(&[
            s("file=").as_os_str(),
            &escape(seed.as_os_str()),
            s(",format=raw,if=none,id=seed,readonly=on").as_os_str(),
        ]);
        let seed_devices: &[&str] = match spec.seed_attach {
            SeedAttach::VirtioDisk => &["-device", "virtio-blk-pci,drive=seed"],
            SeedAttach::UsbRemovable => &[
                "-device",
                "qemu-xhci,id=xhci0",
                "-device",
                "usb-storage,bus=xhci0.0,drive=seed,removable=on",
            ],
        };
        for arg in seed_devices {
            push(&[s(arg).as_os_str()]);
        }
    }
    if let Some(cd) = &spec.cdrom {
        push(&[s("-drive").as_os_str()]);
        push(&[
            s("file=").as_os_str(),
            &escape(cd.as_os_str()),
            s(",format=raw,if=none,id=cd0,media=cdrom,readonly=on").as_os_str(),
        ]);
        push(&[s("-device").as_os_str()]);
        push(&[s(match (&spec.firmware, spec.cdrom_attach) {
            (Firmware::Bios, _) => "ide-cd,drive=cd0,bus=ide.1,unit=0",
            (Firmware::Uefi { .. }, CdromAttach::LinuxCloud) => "virtio-blk-pci,drive=cd0",
            (Firmware::Uefi { .. }, CdromAttach::Atapi) => "ide-cd,drive=cd0,bus=ide.1",
        })
        .as_os_str()]);
    }
    let mut netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:22", launch.ssh_port);
    for opt in &spec.extra_netdev_options {
        netdev.push(',');
        netdev.push_str(opt);
    }
    let model = spec.nic_model.as_str();
    let nic = match &spec.mac {
        Some(mac) => format!("{model},netdev=n0,romfile=,mac={mac}"),
        None => format!("{model},netdev=n0,romfile="),
    };
    for arg in [
        "-netdev",
        &netdev,
        "-device",
        &nic,
        "-device",
        "virtio-rng-pci",
    ] {
        push(&[s(arg).as_os_str()]);
    }
    if let Some(tap) = &spec.net_tap {
        for (id, path) in [
            ("tapg", &tap.from_guest),
            ("tapn", &tap.to_network),
            ("tapi", &tap.to_guest),
        ] {
            push(&[s("-chardev").as_os_str()]);
            push(&[
                s(&format!("socket,id={id},path=")).as_os_str(),
                &escape(path.as_os_str()),
            ]);
        }
        for arg in [
            "-object",
            "filter-redirector,id=tap0,netdev=n0,queue=rx,outdev=tapg,indev=tapn",
            "-object",
            "filter-redirector,id=tap1,netdev=n0,queue=tx,indev=tapi",
        ] {
            push(&[s(arg).as_os_str()]);
        }
    }
    push(&[s("-chardev").as_os_str()]);
    push(&[
        s("file,id=console,append=on,path=").as_os_str(),
        &escape(spec.console_path().as_os_str()),
    ]);
    for arg in ["-serial", "chardev:console"] {
        push(&[s(arg).as_os_str()]);
    }
    for arg in [
        "-chardev",
        &format!("socket,id=qmp,fd={}", launch.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
    ] {
        push(&[s(arg).as_os_str()]);
    }
    a
}

/// Doubles commas, QEMU's escape for a value inside a `key=value,...` option.
pub fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// A host program or file kiln needs is not installed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} not found (looked in {searched}); install the Debian package `{package}`: apt-get install {package}")]
pub struct Missing {
    /// what is missing, e.g. `qemu-system-x86_64`
    pub what: String,
    /// where kiln looked
    pub searched: String,
    /// the Debian package that provides it
    pub package: &'static str,
}

/// `qemu-system-x86_64` on `PATH` (or `/usr/libexec/qemu-kvm`, its name on RHEL).
pub fn find_qemu() -> Result<PathBuf, Missing> {
    find_program(
        "qemu-system-x86_64",
        &["/usr/libexec/qemu-kvm"],
        QEMU_PACKAGE,
    )
}

/// `qemu-img` on `PATH`.
pub fn find_qemu_img() -> Result<PathBuf, Missing> {
    find_program("qemu-img", &[], QEMU_IMG_PACKAGE)
}

fn find_program(name: &str, fallbacks: &[&str], package: &'static str) -> Result<PathBuf, Missing> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for dir in &dirs {
        let p = dir.join(name);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    for f in fallbacks {
        if is_executable(Path::new(f)) {
            return Ok(PathBuf::from(f));
        }
    }
    let mut searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    searched.extend(fallbacks.iter().map(|f| f.to_string()));
    Err(Missing {
        what: name.to_string(),
        searched: format!("PATH: {}", searched.join(":")),
        package,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A matching pair of OVMF files: code and the variable-store template of the same size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ovmf {
    /// the firmware code
    pub code: PathBuf,
    /// the pristine variable store
    pub vars: PathBuf,
}

/// Where distributions install OVMF (code, vars), in order of preference: the 4 MiB
/// builds first (Debian ≥ 12 and Ubuntu ≥ 22.04 ship both; new ones only 4M).
/// Secure-boot variants (`.secboot`, `.ms`) are not used: they need SMM and enrolled
/// keys.
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2-ovmf/x64/OVMF_CODE.fd",
        "/usr/share/edk2-ovmf/x64/OVMF_VARS.fd",
    ),
    (
        "/usr/share/qemu/ovmf-x86_64-code.bin",
        "/usr/share/qemu/ovmf-x86_64-vars.bin",
    ),
];

/// The first complete pair of [`OVMF_CANDIDATES`].
pub fn find_ovmf() -> Result<Ovmf, Missing> {
    find_ovmf_in(OVMF_CANDIDATES, |p| p.is_file())
}

/// The first pair in `candidates` whose two files both exist.
pub fn find_ovmf_in(
    candidates: &[(&str, &str)],
    exists: impl Fn(&Path) -> bool,
) -> Result<Ovmf, Missing> {
    for (code, vars) in candidates {
        if exists(Path::new(code)) && exists(Path::new(vars)) {
            return Ok(Ovmf {
                code: code.into(),
                vars: vars.into(),
            });
        }
    }
    Err(Missing {
        what: "the OVMF UEFI firmware (needed for Hyper-V generation 2 images)".into(),
        searched: candidates
            .iter()
            .map(|(c, _)| *c)
            .collect::<Vec<_>>()
            .join(", "),
        package: OVMF_PACKAGE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(firmware: Firmware, accel: Accel) -> VmSpec {
        VmSpec::new(
            "build-1",
            "/run/kiln/b1",
            "/run/kiln/b1/os.qcow2",
            firmware,
            accel,
        )
    }

    fn uefi() -> Firmware {
        Firmware::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        }
    }

    const LAUNCH: Launch = Launch {
        ssh_port: 40022,
        qmp_fd: 7,
    };

    fn line(spec: &VmSpec) -> String {
        argv(spec, &LAUNCH)
            .iter()
            .map(|a| a.to_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// (what, spec, the exact command line)
    #[test]
    fn argv_table() {
        let common_tail = "-drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap \
             -device virtio-blk-pci,drive=os,bootindex=0 \
             -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci \
             -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
             -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control";
        let cases: Vec<(&str, VmSpec, String)> = vec![
            (
                "BIOS under TCG",
                spec(Firmware::Bios, Accel::Tcg),
                format!(
                    "-name guest=build-1 -machine pc -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none {common_tail}"
                ),
            ),
            (
                "BIOS under KVM",
                spec(Firmware::Bios, Accel::Kvm),
                format!(
                    "-name guest=build-1 -machine pc -accel kvm -cpu host -smp 2 -m 2048 -nodefaults -no-user-config -display none {common_tail}"
                ),
            ),
            (
                "UEFI: q35, read-only code, the build's own vars copy",
                spec(uefi(), Accel::Tcg),
                format!(
                    "-name guest=build-1 -machine q35 -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                     -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                     -drive if=pflash,format=raw,unit=1,file=/run/kiln/b1/OVMF_VARS.fd {common_tail}"
                ),
            ),
            (
                "seed, smbios, uuid, netdev extras, size",
                VmSpec {
                    seed_disk: Some("/run/kiln/b1/seed.img".into()),
                    smbios: vec!["type=1,serial=ds=nocloud".into(), "type=11,value=kiln".into()],
                    uuid: Some("6f1c8a52-6a4e-4c1b-9d0e-2f3a4b5c6d7e".into()),
                    extra_netdev_options: vec!["guestfwd=tcp:10.0.2.100:80-cmd:true".into()],
                    cpus: 1,
                    memory_mib: 3584,
                    ..spec(Firmware::Bios, Accel::Tcg)
                },
                "-name guest=build-1 -machine pc -accel tcg -cpu max -smp 1 -m 3584 -nodefaults -no-user-config -display none \
                 -uuid 6f1c8a52-6a4e-4c1b-9d0e-2f3a4b5c6d7e -smbios type=1,serial=ds=nocloud -smbios type=11,value=kiln \
                 -drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap \
                 -device virtio-blk-pci,drive=os,bootindex=0 \
                 -drive file=/run/kiln/b1/seed.img,format=raw,if=none,id=seed,readonly=on -device virtio-blk-pci,drive=seed \
                 -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22,guestfwd=tcp:10.0.2.100:80-cmd:true \
                 -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci \
                 -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
                 -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
            (
                "Azure provisioning CD on pc, MAC, DHCP tap",
                VmSpec {
                    cdrom: Some("/run/kiln/b1/ovf,env.iso".into()),
                    mac: Some("52:54:00:12:34:56".into()),
                    net_tap: Some(NetTap {
                        from_guest: "/run/kiln/b1/dhcp-o.sock".into(),
                        to_network: "/run/kiln/b1/dhcp-n.sock".into(),
                        to_guest: "/run/kiln/b,1/dhcp-g.sock".into(),
                    }),
                    ..spec(Firmware::Bios, Accel::Tcg)
                },
                "-name guest=build-1 -machine pc -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                     -drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap -device virtio-blk-pci,drive=os,bootindex=0 \
                     -drive file=/run/kiln/b1/ovf,,env.iso,format=raw,if=none,id=cd0,media=cdrom,readonly=on -device ide-cd,drive=cd0,bus=ide.1,unit=0 \
                     -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56 -device virtio-rng-pci \
                     -chardev socket,id=tapg,path=/run/kiln/b1/dhcp-o.sock -chardev socket,id=tapn,path=/run/kiln/b1/dhcp-n.sock \
                     -chardev socket,id=tapi,path=/run/kiln/b,,1/dhcp-g.sock \
                     -object filter-redirector,id=tap0,netdev=n0,queue=rx,outdev=tapg,indev=tapn \
                     -object filter-redirector,id=tap1,netdev=n0,queue=tx,indev=tapi \
                     -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
                     -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
            (
                "Windows devices on pc: AHCI disk, e1000 NIC, unattend media as a removable USB stick",
                VmSpec {
                    disk_bus: DiskBus::Ahci,
                    nic_model: NicModel::E1000,
                    seed_disk: Some("/run/kiln/b1/unattend.img".into()),
                    seed_attach: SeedAttach::UsbRemovable,
                    ..spec(Firmware::Bios, Accel::Tcg)
                },
                "-name guest=build-1 -machine pc -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                 -drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap \
                 -device ahci,id=sata0 -device ide-hd,drive=os,bus=sata0.0,bootindex=0 \
                 -drive file=/run/kiln/b1/unattend.img,format=raw,if=none,id=seed,readonly=on \
                 -device qemu-xhci,id=xhci0 -device usb-storage,bus=xhci0.0,drive=seed,removable=on \
                 -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device e1000,netdev=n0,romfile= -device virtio-rng-pci \
                 -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
                 -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
            (
                "Windows Azure provisioning CD on q35: an ATAPI drive on the ICH9 controller",
                VmSpec {
                    disk_bus: DiskBus::Ahci,
                    nic_model: NicModel::E1000,
                    cdrom: Some("/run/kiln/b1/ovf-env.iso".into()),
                    cdrom_attach: CdromAttach::Atapi,
                    ..spec(uefi(), Accel::Tcg)
                },
                "-name guest=build-1 -machine q35 -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                 -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                 -drive if=pflash,format=raw,unit=1,file=/run/kiln/b1/OVMF_VARS.fd \
                 -drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap \
                 -device ahci,id=sata0 -device ide-hd,drive=os,bus=sata0.0,bootindex=0 \
                 -drive file=/run/kiln/b1/ovf-env.iso,format=raw,if=none,id=cd0,media=cdrom,readonly=on -device ide-cd,drive=cd0,bus=ide.1 \
                 -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device e1000,netdev=n0,romfile= -device virtio-rng-pci \
                 -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
                 -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
            (
                "IDE disk and e1000e NIC (with MAC) on q35",
                VmSpec {
                    disk_bus: DiskBus::Ide,
                    nic_model: NicModel::E1000e,
                    mac: Some("52:54:00:12:34:56".into()),
                    ..spec(uefi(), Accel::Tcg)
                },
                "-name guest=build-1 -machine q35 -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                 -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                 -drive if=pflash,format=raw,unit=1,file=/run/kiln/b1/OVMF_VARS.fd \
                 -drive file=/run/kiln/b1/os.qcow2,format=qcow2,if=none,id=os,discard=unmap \
                 -device ide-hd,drive=os,bus=ide.0,unit=0,bootindex=0 \
                 -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device e1000e,netdev=n0,romfile=,mac=52:54:00:12:34:56 -device virtio-rng-pci \
                 -chardev file,id=console,append=on,path=/run/kiln/b1/console.log -serial chardev:console \
                 -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
            (
                "commas in names and paths are doubled",
                VmSpec {
                    name: "a,b".into(),
                    run_dir: "/tmp/x,y".into(),
                    disk: "/tmp/x,y/os.qcow2".into(),
                    seed_disk: Some("/s,eed".into()),
                    ..spec(uefi(), Accel::Tcg)
                },
                "-name guest=a,,b -machine q35 -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-user-config -display none \
                 -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                 -drive if=pflash,format=raw,unit=1,file=/tmp/x,,y/OVMF_VARS.fd \
                 -drive file=/tmp/x,,y/os.qcow2,format=qcow2,if=none,id=os,discard=unmap -device virtio-blk-pci,drive=os,bootindex=0 \
                 -drive file=/s,,eed,format=raw,if=none,id=seed,readonly=on -device virtio-blk-pci,drive=seed \
                 -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci \
                 -chardev file,id=console,append=on,path=/tmp/x,,y/console.log -serial chardev:console \
                 -chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control"
                    .to_string(),
            ),
        ];
        for (what, spec, want) in cases {
            let want: Vec<&str> = want.split_whitespace().collect();
            assert_eq!(line(&spec).split(' ').collect::<Vec<_>>(), want, "{what}");
        }
    }

    #[test]
    fn device_names_parse_back() {
        for b in [DiskBus::Virtio, DiskBus::Ahci, DiskBus::Ide] {
            assert_eq!(DiskBus::parse(b.as_str()), Some(b));
        }
        assert_eq!(DiskBus::parse("sata"), Some(DiskBus::Ahci));
        assert_eq!(DiskBus::parse("scsi"), None);
        for n in [NicModel::VirtioNet, NicModel::E1000, NicModel::E1000e] {
            assert_eq!(NicModel::parse(n.as_str()), Some(n));
        }
        assert_eq!(NicModel::parse("virtio"), Some(NicModel::VirtioNet));
        assert_eq!(NicModel::parse("rtl8139"), None);
        let d = VmSpec::new("x", "/r", "/r/d", Firmware::Bios, Accel::Tcg);
        assert_eq!(
            (d.disk_bus, d.nic_model, d.seed_attach),
            (DiskBus::Virtio, NicModel::VirtioNet, SeedAttach::VirtioDisk),
            "Linux defaults stay virtio"
        );
    }

    #[test]
    fn argv_keeps_non_utf8_paths_and_spaces_as_one_argument() {
        use std::os::unix::ffi::OsStrExt;
        let mut s = spec(Firmware::Bios, Accel::Tcg);
        s.disk = PathBuf::from(OsStr::from_bytes(b"/tmp/with space/\xff.qcow2"));
        let a = argv(&s, &LAUNCH);
        let i = a
            .iter()
            .position(|x| x.as_bytes().starts_with(b"file=/tmp/with space/"))
            .expect("the disk argument");
        assert_eq!(
            a[i].as_bytes(),
            b"file=/tmp/with space/\xff.qcow2,format=qcow2,if=none,id=os,discard=unmap"
        );
    }

    #[test]
    fn ovmf_pairs_must_be_complete() {
        let cands = [("/a/CODE_4M", "/a/VARS_4M"), ("/a/CODE", "/a/VARS")];
        let have = |files: &'static [&'static str]| {
            move |p: &Path| files.iter().any(|f| Path::new(f) == p)
        };
        assert_eq!(
            find_ovmf_in(
                &cands,
                have(&["/a/CODE_4M", "/a/VARS_4M", "/a/CODE", "/a/VARS"])
            )
            .unwrap()
            .code,
            PathBuf::from("/a/CODE_4M")
        );
        // a 4M code without its 4M vars must not be paired with the 2M vars
        assert_eq!(
            find_ovmf_in(&cands, have(&["/a/CODE_4M", "/a/CODE", "/a/VARS"])).unwrap(),
            Ovmf {
                code: "/a/CODE".into(),
                vars: "/a/VARS".into()
            }
        );
        let err = find_ovmf_in(&cands, have(&["/a/CODE_4M"])).unwrap_err();
        assert_eq!(err.package, "ovmf");
        assert!(err.to_string().contains("apt-get install ovmf"), "{err}");
    }

    #[test]
    fn missing_programs_name_the_package() {
        let err =
            find_program("kiln-no-such-program", &["/nonexistent/x"], QEMU_PACKAGE).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("kiln-no-such-program not found (looked in PATH: "),
            "{msg}"
        );
        assert!(
            msg.ends_with(
                "install the Debian package `qemu-system-x86`: apt-get install qemu-system-x86"
            ),
            "{msg}"
        );
    }
}
