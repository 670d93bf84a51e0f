//! The tiny guest's NoCloud parser (scripts/guest/tiny/nocloud.awk), run with the host's
//! busybox awk (the same binary the guest uses) on the YAML subset it documents.

use std::path::PathBuf;
use std::process::Command;

fn parse(doc: &str, text: &str) -> Vec<Vec<String>> {
    let awk = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest/tiny/nocloud.awk");
    let dir = std::env::temp_dir().join(format!(
        "kiln-nocloud-{}-{doc}-{}",
        std::process::id(),
        text.len()
    ));
    std::fs::write(&dir, text).unwrap();
    let out = Command::new("busybox")
        .args(["awk", "-v", &format!("doc={doc}"), "-f"])
        .arg(&awk)
        .arg(&dir)
        .output()
        .expect("busybox (package busybox-static) runs");
    let _ = std::fs::remove_file(&dir);
    assert!(
        out.status.success(),
        "awk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\u{1f}').map(str::to_string).collect())
        .collect()
}

fn rec(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|s| s.to_string()).collect()
}

#[test]
fn kiln_user_data() {
    let got = parse(
        "user",
        "#cloud-config\nusers:\n  - name: packer\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    ssh_authorized_keys: [ssh-ed25519 AAAAC3 packer@kiln]\n",
    );
    assert_eq!(
        got,
        vec![
            rec(&["user", "packer", "yes", "", "", ""]),
            rec(&["key", "packer", "ssh-ed25519 AAAAC3 packer@kiln"])
        ]
    );
}

#[test]
fn block_lists_quotes_groups_and_top_level_keys() {
    let got = parse(
        "user",
        "#cloud-config\r\nhostname: \"vm1\"\r\nusers:\r\n- default\r\n- name: bob\r\n  groups: adm, users\r\n  shell: /bin/ash\r\n  sudo: false\r\n  ssh_authorized_keys:\r\n  - 'ssh-ed25519 AAAAB bob@x'\r\n  - ssh-rsa AAAAC bob2\r\n  lock_passwd: true\r\nssh_authorized_keys:\r\n  - ssh-ed25519 ROOT root@h\r\n",
    );
    assert_eq!(
        got,
        vec![
            rec(&["hostname", "vm1"]),
            rec(&["user", "bob", "no", "/bin/ash", "", "adm,users"]),
            rec(&["key", "bob", "ssh-ed25519 AAAAB bob@x"]),
            rec(&["key", "bob", "ssh-rsa AAAAC bob2"]),
            rec(&["key", "root", "ssh-ed25519 ROOT root@h"]),
        ]
    );
}

#[test]
fn sudo_as_a_list_and_unknown_keys() {
    let got = parse(
        "user",
        "#cloud-config\nusers:\n  - name: ann\n    sudo:\n      - ALL=(ALL) NOPASSWD:ALL\n    passwd: x\n    groups: [wheel]\n",
    );
    assert_eq!(
        got,
        vec![
            rec(&["warn", "users: key 'passwd' is not supported, ignored"]),
            rec(&["user", "ann", "yes", "", "", "wheel"]),
        ]
    );
}

#[test]
fn meta_data_and_non_cloud_config() {
    assert_eq!(
        parse(
            "meta",
            "instance-id: i-1\nlocal-hostname: kiln-vm\npublic-keys:\n  - ssh-ed25519 MD\n"
        ),
        vec![
            rec(&["hostname", "kiln-vm"]),
            rec(&["key", "root", "ssh-ed25519 MD"])
        ]
    );
    assert_eq!(
        parse("user", "#!/bin/sh\necho hi\n"),
        vec![rec(&[
            "warn",
            "user-data does not start with #cloud-config: ignored"
        ])]
    );
}
