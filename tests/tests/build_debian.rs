//! `kiln build` on the realistic `debian` guest (systemd, cloud-init, waagent) with AIB's default
//! Linux generalization, `waagent -force -deprovision+user`, and what it must have removed from
//! the exported image.

use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.ancestors().nth(2).expect("target/debug").join("kiln")
}

/// debugfs's stdout, then its stderr (where "File not found by ext2_lookup" goes).
fn debugfs(part: &Path, req: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .args(["-R", req])
        .arg(part)
        .output()
        .expect("debugfs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Extracts the Linux root partition of a raw/fixed-VHD disk into `dest`.
fn root_partition(disk: &Path, dest: &Path) {
    let out = Command::new("sfdisk")
        .arg("-J")
        .arg(disk)
        .output()
        .expect("sfdisk");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk json");
    let p = j["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| {
            p["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("0FC63DAF-8483-4772-8E79-3D69D8477DE4"))
        })
        .expect("a Linux partition")
        .clone();
    let st = Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", dest.display()))
        .args([
            "bs=512",
            &format!("skip={}", p["start"]),
            &format!("count={}", p["size"]),
            "conv=sparse",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(st.success());
}

#[test]
fn debian_builds_with_the_default_waagent_deprovision() {
    let img = kiln_tests::image("debian").expect("debian test guest");
    let dir = kiln_tests::scratch_dir("kiln-build-debian");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let home = dir.join("home");
    kiln_tests::inspect::import_image(&home, "debian", "gen1", &[], &img.disk);
    let vhd = dir.join("debian.vhd");
    let t = serde_json::json!({
        "type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01", "name": "debian-waagent", "location": "westus2",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
        "properties": {
            "vmProfile": {"vmSize": "Standard_D2s_v3"},
            "source": {"type": "PlatformImage", "publisher": "kiln", "offer": "debian", "sku": "gen1", "version": "latest"},
            "customize": [{"type": "Shell", "name": "mark", "inline": ["id -un", "echo built-by-kiln | sudo tee /etc/kiln-debian"]}],
            "distribute": [{"type": "VHD", "runOutputName": "vhd", "uri": vhd.display().to_string()}]
        }
    });
    let tp = dir.join("t.json");
    std::fs::write(&tp, serde_json::to_vec(&t).expect("json")).expect("write");
    let out = Command::new(kiln_bin())
        .env("KILN_HOME", &home)
        .args(["build", "--output", "json", "--accel", "tcg"])
        .arg(&tp)
        .output()
        .expect("build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("running the default deprovisioning: waagent -force -deprovision+user"),
        "{stdout}"
    );
    kiln_images::vhd::verify_fixed(&vhd).expect("a fixed VHD");
    let part = dir.join("root.ext4");
    root_partition(&vhd, &part);
    // The customizer's change is in the image…
    assert_eq!(
        debugfs(&part, "cat /etc/kiln-debian").0.trim(),
        "built-by-kiln"
    );
    // …and what waagent -deprovision+user removes is gone: the build user and its home, the
    // agent's state, the DHCP leases, resolv.conf.
    let passwd = debugfs(&part, "cat /etc/passwd").0;
    assert!(
        passwd.contains("root:") && !passwd.contains("packer:"),
        "the build user is deleted: {passwd}"
    );
    assert!(
        !debugfs(&part, "ls -l /home").0.contains("packer"),
        "its home is deleted"
    );
    let agent: Vec<String> = debugfs(&part, "ls /var/lib/waagent")
        .0
        .split_whitespace()
        .filter(|w| w.chars().any(|c| c.is_alphabetic()))
        .map(str::to_string)
        .collect();
    assert!(agent.is_empty(), "agent state removed, found {agent:?}");
    // dhclient may rewrite its lease file (DUID only) before the VM stops; no lease may remain.
    let leases = debugfs(&part, "cat /var/lib/dhcp/dhclient.eth0.leases").0;
    assert!(!leases.contains("lease {"), "DHCP leases removed: {leases}");
    assert!(
        debugfs(&part, "stat /etc/resolv.conf")
            .1
            .contains("not found"),
        "resolv.conf removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
