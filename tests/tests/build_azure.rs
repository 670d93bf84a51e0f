//! `kiln build` with Azure provisioning (ovf-env.xml CD + the emulated wireserver and IMDS) on
//! the two Azure-style test guests: `debian-azure` (cloud-init's Azure datasource only) and
//! `debian-waagent` (no cloud-init; the Azure Linux agent provisions). Each must come up with
//! the build user and the build's key, run customizers with sudo, be generalized by
//! `waagent -deprovision+user` (which removes the user Azure provisioned) and be exported.

use kiln_tests::inspect::{debugfs, kiln_bin, root_partition};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

struct Built {
    stdout: String,
    events: Vec<Value>,
}

/// Imports `image` (with `import_args`), builds `customize` with `build_args`, checks the run
/// succeeded and the VHD is a fixed VHD.
fn build(
    dir: &Path,
    image: &str,
    sku: &str,
    import_args: &[&str],
    build_args: &[&str],
    customize: Value,
) -> Built {
    let img = kiln_tests::image(image).expect("test guest");
    let home = dir.join("home");
    kiln_tests::inspect::import_image(&home, image, sku, import_args, &img.disk);
    let vhd = dir.join("out.vhd");
    let t = serde_json::json!({
        "type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01", "name": format!("{image}-az"), "location": "westeurope",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
        "properties": {
            "vmProfile": {"vmSize": "Standard_D2s_v3"},
            "source": {"type": "PlatformImage", "publisher": "kiln", "offer": image, "sku": sku, "version": "latest"},
            "customize": customize,
            "distribute": [{"type": "VHD", "runOutputName": "vhd", "uri": vhd.display().to_string()}]
        }
    });
    let tp = dir.join("t.json");
    std::fs::write(&tp, serde_json::to_vec(&t).expect("json")).expect("write");
    let out = Command::new(kiln_bin())
        .env("KILN_HOME", &home)
        .args(["build", "--output", "json", "--accel", "tcg"])
        .args(build_args)
        .arg(&tp)
        .output()
        .expect("build");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kiln_images::vhd::verify_fixed(&vhd).expect("a fixed VHD");
    let events = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    Built { stdout, events }
}

fn outputs(b: &Built, step: &str) -> Vec<String> {
    b.events
        .iter()
        .filter(|e| e["event"] == "output" && e["step"].as_str().is_some_and(|s| s.contains(step)))
        .filter_map(|e| e["line"].as_str().map(str::to_string))
        .collect()
}

/// The provisioning event: Azure, Ready reported by `agent_like`, connected.
fn check_provisioned(b: &Built, agent_like: &str) {
    let p = b
        .events
        .iter()
        .find(|e| e["event"] == "provisioned")
        .unwrap_or_else(|| panic!("a provisioned event: {}", b.stdout));
    assert_eq!(p["method"], "azure", "{p}");
    assert_eq!(p["health"], "Ready", "{p}");
    assert!(
        p["agent"].as_str().is_some_and(|a| a.contains(agent_like)),
        "{p}"
    );
    assert!(
        p["readySeconds"].as_f64().is_some() && p["connectedSeconds"].as_f64().is_some(),
        "{p}"
    );
    // the fabric's requests are events too: the agent read the goal state
    assert!(b.events.iter().any(|e| e["event"] == "fabric"
        && e["target"]
            .as_str()
            .is_some_and(|t| t.contains("comp=goalstate"))
        && e["status"] == 200));
}

/// What the exported disk must (not) hold after `waagent -deprovision+user`.
fn check_image(dir: &Path) {
    let part = dir.join("root.ext4");
    root_partition(&dir.join("out.vhd"), &part);
    assert_eq!(
        debugfs(&part, "cat /etc/kiln-azure").0.trim(),
        "built-by-kiln"
    );
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
}

/// The customizer every build runs: who we are, sudo, the key we came in with, IMDS.
fn customizers() -> Vec<Value> {
    vec![
        serde_json::json!({"type": "Shell", "name": "check", "inline": [
            "id -un",
            "sudo -n true && echo sudo-ok",
            "grep -q kiln-build- ~/.ssh/authorized_keys && echo key-ok",
            "curl -sS -H Metadata:true 'http://169.254.169.254/metadata/instance/compute/osProfile/adminUsername?api-version=2021-08-01&format=text'; echo",
            "echo built-by-kiln | sudo tee /etc/kiln-azure"
        ]}),
    ]
}

fn check_customizer(b: &Built) {
    let out = outputs(b, "check");
    for want in ["packer", "sudo-ok", "key-ok", "built-by-kiln"] {
        assert!(
            out.iter().filter(|l| l.trim() == want).count() >= 1,
            "`{want}` in {out:?}"
        );
    }
    assert_eq!(
        out.iter().filter(|l| l.trim() == "packer").count(),
        2,
        "id -un and IMDS adminUsername: {out:?}"
    );
    // waagent itself removed the user Azure provisioned (named in ovf-env.xml); kiln's
    // fallback for NoCloud-provisioned VMs had nothing left to do
    assert!(
        b.stdout
            .contains("packer account and entire home directory will be deleted"),
        "{}",
        b.stdout
    );
    assert!(
        !b.stdout.contains("kiln: removing the build user packer"),
        "{}",
        b.stdout
    );
}

#[test]
fn debian_azure_cloud_init_provisions_through_the_fabric_and_survives_hostile_requests() {
    let dir = kiln_tests::TestDir::new("build-azure-ci").expect("dir");
    let mut customize = customizers();
    // A guest that abuses the fabric (100 MB body, bad paths, a connection flood, the token
    // endpoint without a token command) gets HTTP errors; the build goes on.
    customize.push(serde_json::json!({"type": "Shell", "name": "hostile", "inline": [
        "head -c 100000000 /dev/zero > /tmp/big",
        "curl -s -o /dev/null -w 'big=%{http_code}\\n' -m 120 -X POST --data-binary @/tmp/big 'http://168.63.129.16/machine?comp=health' || echo big=reset",
        "rm -f /tmp/big",
        "curl -s -o /dev/null -w 'path=%{http_code}\\n' -m 30 --path-as-is 'http://168.63.129.16/../../etc/shadow'",
        "curl -s -o /dev/null -w 'method=%{http_code}\\n' -m 30 -X DELETE 'http://168.63.129.16/machine?comp=goalstate'",
        "curl -s -o /dev/null -w 'noheader=%{http_code}\\n' -m 30 'http://169.254.169.254/metadata/instance?api-version=2021-08-01'",
        "for i in $(seq 60); do curl -s -o /dev/null -m 20 'http://168.63.129.16/?comp=versions' & done; wait",
        "curl -sS -m 30 -H Metadata:true 'http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/'; echo",
        "curl -s -o /dev/null -w 'after=%{http_code}\\n' -m 30 'http://168.63.129.16/?comp=versions'"
    ]}));
    let b = build(
        &dir.path,
        "debian-azure",
        "gen1",
        &[],
        &["--provisioning", "azure"],
        Value::Array(customize),
    );
    check_provisioned(&b, "Cloud-Init");
    check_customizer(&b);
    let h = outputs(&b, "hostile");
    assert!(
        h.iter()
            .any(|l| l == "big=413" || l == "big=reset" || l == "big=000"),
        "{h:?}"
    );
    for want in ["path=404", "method=405", "noheader=400", "after=200"] {
        assert!(h.iter().any(|l| l == want), "`{want}` in {h:?}");
    }
    assert!(
        h.iter().any(|l| l.contains("\"error\":\"invalid_request\"")
            && l.contains("--identity-token-command")),
        "{h:?}"
    );
    assert!(
        b.events
            .iter()
            .any(|e| e["event"] == "fabric" && e["status"] == 413),
        "the 100 MB body was refused by size"
    );
    check_image(&dir.path);
}

#[test]
fn debian_waagent_provisions_through_the_fabric_from_the_catalogs_preference() {
    let dir = kiln_tests::TestDir::new("build-azure-wa").expect("dir");
    let mut customize = customizers();
    // The image is unchanged (no route of its own to the wireserver): waagent found it in the
    // lease kiln's DHCP gave, as on Azure — option 245 and the classless static routes.
    customize.push(serde_json::json!({"type": "Shell", "name": "lease", "inline": [
        "grep -rqs 168.63.129.16 /etc/network /etc/systemd/network && echo image-has-route || echo image-has-no-route",
        "ip -4 route show 168.63.129.16",
        "ip -4 route show 169.254.169.254",
        "grep -h unknown-245 /var/lib/dhcp/dhclient.*leases | sort -u"
    ]}));
    // provisioning comes from the catalog entry, not a build flag
    let b = build(
        &dir.path,
        "debian-waagent",
        "gen1",
        &["--provisioning", "azure"],
        &[],
        Value::Array(customize),
    );
    let lease = outputs(&b, "lease");
    for want in [
        "image-has-no-route",
        "168.63.129.16 via 168.63.129.1 dev eth0",
        "169.254.169.254 via 168.63.129.1 dev eth0",
        "option unknown-245 a8:3f:81:10;",
    ] {
        assert!(
            lease.iter().any(|l| l.trim().starts_with(want)),
            "`{want}` in {lease:?}"
        );
    }
    // kiln's DHCP answered the guest (slirp's never saw a request)
    assert!(
        b.events.iter().any(|e| e["event"] == "fabric"
            && e["endpoint"] == "dhcp"
            && e["method"] == "REQUEST"
            && e["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("ACK 168.63.129.100"))),
        "{}",
        b.stdout
    );
    assert!(
        b.stdout
            .contains("provisioning: azure (the catalog image's preferred method)"),
        "{}",
        b.stdout
    );
    check_provisioned(&b, "WALinuxAgent");
    // waagent's own path: it reported NotReady/Provisioning first, then Ready
    assert!(
        b.events.iter().any(|e| e["event"] == "fabric"
            && e["health"]
                .as_str()
                .is_some_and(|h| h.starts_with("NotReady/Provisioning"))),
        "{}",
        b.stdout
    );
    check_customizer(&b);
    check_image(&dir.path);
}

#[test]
fn debian_azure_gen2_finds_the_provisioning_media_on_a_virtio_disk() {
    // q35 (Gen2/UEFI): the media are a read-only virtio disk (Debian's cloud kernel has no AHCI)
    let dir = kiln_tests::TestDir::new("build-azure-g2").expect("dir");
    let mut customize = customizers();
    customize.push(serde_json::json!({"type": "Shell", "name": "media", "inline": ["lsblk -n -o NAME,FSTYPE | grep iso9660"]}));
    // The build VM's identity gets the token the --identity-token-command prints, for the
    // resource the guest asked for.
    let token_cmd = dir.path.join("token.sh");
    std::fs::write(
        &token_cmd,
        "#!/bin/sh\nprintf '{\"access_token\":\"kiln-test-%s\",\"token_type\":\"Bearer\"}' \"$KILN_IDENTITY_RESOURCE\"\n",
    )
    .expect("token command");
    std::fs::set_permissions(
        &token_cmd,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    customize.push(serde_json::json!({"type": "Shell", "name": "token", "inline": [
        "curl -sS -m 30 -H Metadata:true 'http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net'; echo"
    ]}));
    let token_arg = token_cmd.display().to_string();
    let b = build(
        &dir.path,
        "debian-azure",
        "gen2",
        &["--hyper-v-generation", "V2"],
        &[
            "--provisioning",
            "azure",
            "--identity-token-command",
            &token_arg,
        ],
        Value::Array(customize),
    );
    assert!(
        outputs(&b, "token")
            .iter()
            .any(|l| l.contains("\"access_token\":\"kiln-test-https://vault.azure.net\"")),
        "{}",
        b.stdout
    );
    check_provisioned(&b, "Cloud-Init");
    check_customizer(&b);
    assert!(
        outputs(&b, "media")
            .iter()
            .any(|l| l.starts_with("vdb") && l.contains("iso9660")),
        "{}",
        b.stdout
    );
    check_image(&dir.path);
}
