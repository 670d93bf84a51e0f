//! Boots the test guests (tiny and debian, BIOS and UEFI) under TCG, logs in over SSH
//! with a fresh key delivered by a NoCloud seed, writes files (as the user and through
//! sudo), powers off from inside the guest, boots the same overlay again with a new key
//! and a new seed, and checks that the files are still there.

use anyhow::{ensure, Context, Result};
use kiln_tests::*;
use std::time::{Duration, Instant};

struct Case {
    image: &'static str,
    firmware: Firmware,
    seed_format: SeedFormat,
    seed_attach: SeedAttach,
    memory_mib: u32,
    cpus: u32,
    ssh_timeout: Duration,
    poweroff_timeout: Duration,
}

fn token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("kiln-{}-{}", std::process::id(), t.as_nanos())
}

fn boot_write_reboot_check(case: Case) -> Result<()> {
    let label = format!("{}-{:?}", case.image, case.firmware).to_lowercase();
    let img = image(case.image)?;
    let dir = TestDir::new(&label)?;
    let disk = dir.path.join("overlay.qcow2");
    overlay(&img, &disk)?;
    let _slot = VmSlot::acquire();
    let user = "packer";
    let token = token();

    // --- first boot: provision, write, power off from inside ---------------------
    let key1 = Key::generate(&dir.path, "key1")?;
    let seed1 = Seed::create(
        &dir.path,
        "seed1",
        case.seed_format,
        &format!("{label}-1"),
        "kiln-test",
        &user_data(user, &key1.public),
    )?;
    let cfg = VmConfig {
        firmware: case.firmware,
        disk: &disk,
        seed: Some((&seed1, case.seed_attach)),
        memory_mib: case.memory_mib,
        cpus: case.cpus,
        dir: &dir.path,
        name: "boot1",
    };
    let mut vm = Vm::start(&cfg)?;
    let t1 = vm.wait_ssh(user, &key1, case.ssh_timeout)?;
    eprintln!("[{label}] boot 1: SSH after {:.1}s", t1.as_secs_f64());

    let out = vm.ssh_ok(
        user,
        &key1,
        &format!(
            "set -e; echo {token} > ~/kiln-persist; echo {token} | sudo tee /var/lib/kiln-persist >/dev/null; \
             test -d /tmp && test -w /tmp; sudo id -u; id -un; sync"
        ),
    )?;
    ensure!(
        out.lines().collect::<Vec<_>>() == ["0", user],
        "sudo/id output was {out:?}"
    );

    if case.image == "tiny" {
        // tiny boots the uncompressed kernel by default (pvhboot / efiboot), not the bzImage
        let cmdline = vm.ssh_ok(user, &key1, "cat /proc/cmdline")?;
        let want = if case.firmware == Firmware::Bios {
            "kiln.boot=pvh"
        } else {
            "kiln.boot=efiboot"
        };
        ensure!(
            cmdline.split_whitespace().any(|w| w == want),
            "expected {want} in /proc/cmdline: {cmdline}"
        );
    }

    let t = Instant::now();
    // the session may end with an error when sshd goes away: only QEMU's exit counts
    let _ = vm.ssh(user, &key1, "sudo poweroff");
    let status = vm
        .wait_exit(case.poweroff_timeout)
        .context("`sudo poweroff` must power the VM off")?;
    ensure!(
        status.success(),
        "QEMU exit status after poweroff: {status}\n{}",
        vm.console_tail(2000)
    );
    eprintln!("[{label}] poweroff took {:.1}s", t.elapsed().as_secs_f64());
    drop(vm);

    // --- second boot: a new key through a new seed; the files must have persisted --
    let key2 = Key::generate(&dir.path, "key2")?;
    let seed2 = Seed::create(
        &dir.path,
        "seed2",
        case.seed_format,
        &format!("{label}-2"),
        "kiln-test",
        &user_data(user, &key2.public),
    )?;
    let cfg = VmConfig {
        seed: Some((&seed2, case.seed_attach)),
        name: "boot2",
        ..cfg
    };
    let mut vm = Vm::start(&cfg)?;
    let t2 = vm.wait_ssh(user, &key2, case.ssh_timeout)?;
    eprintln!("[{label}] boot 2: SSH after {:.1}s", t2.as_secs_f64());
    let out = vm.ssh_ok(user, &key2, "cat ~/kiln-persist /var/lib/kiln-persist")?;
    ensure!(
        out == format!("{token}\n{token}\n"),
        "files written before the poweroff did not persist: got {out:?}, want {token:?} twice"
    );

    if case.image == "debian" {
        // what Azure Image Builder runs last on Linux
        vm.ssh_ok(
            user,
            &key2,
            "sudo /usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync",
        )
        .context("waagent -force -deprovision+user")?;
    }
    Ok(())
}

fn tiny(firmware: Firmware, seed_format: SeedFormat, seed_attach: SeedAttach) -> Case {
    Case {
        image: "tiny",
        firmware,
        seed_format,
        seed_attach,
        memory_mib: 512,
        cpus: 1,
        ssh_timeout: Duration::from_secs(180),
        poweroff_timeout: Duration::from_secs(60),
    }
}

fn debian(firmware: Firmware, seed_format: SeedFormat, seed_attach: SeedAttach) -> Case {
    Case {
        image: "debian",
        firmware,
        seed_format,
        seed_attach,
        memory_mib: 1024,
        cpus: 2,
        ssh_timeout: Duration::from_secs(480),
        poweroff_timeout: Duration::from_secs(180),
    }
}

#[test]
fn tiny_bios_provisions_and_persists() -> Result<()> {
    // seed as a FAT volume on a second virtio disk
    boot_write_reboot_check(tiny(
        Firmware::Bios,
        SeedFormat::Vfat,
        SeedAttach::VirtioDisk,
    ))
}

#[test]
fn tiny_uefi_provisions_and_persists() -> Result<()> {
    // seed as an ISO on a SATA (AHCI) CD
    boot_write_reboot_check(tiny(Firmware::Uefi, SeedFormat::Iso, SeedAttach::Cdrom))
}

#[test]
fn debian_bios_provisions_and_persists() -> Result<()> {
    // seed as an ISO on an IDE CD (the cloud kernel has ata_piix)
    boot_write_reboot_check(debian(Firmware::Bios, SeedFormat::Iso, SeedAttach::Cdrom))
}

#[test]
fn debian_uefi_provisions_and_persists() -> Result<()> {
    // q35's CD is AHCI, which the cloud kernel lacks: seed as a FAT virtio disk
    boot_write_reboot_check(debian(
        Firmware::Uefi,
        SeedFormat::Vfat,
        SeedAttach::VirtioDisk,
    ))
}
