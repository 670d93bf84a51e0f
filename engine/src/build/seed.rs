//! The NoCloud seed that gives the build VM its user and SSH key.
//!
//! AIB's build VM has one admin user, `packer`, with passwordless sudo and an SSH key
//! (no password). kiln gives a generic cloud image the same user through a NoCloud seed:
//! a small raw disk image holding a FAT filesystem labelled `CIDATA` with the files
//! `meta-data` and `user-data` (cloud-init's NoCloud datasource, and the tiny test guest's
//! `/usr/lib/kiln/nocloud`, find it by that label).
//!
//! The generated `user-data` stays within the restricted YAML subset the tiny test guest
//! parses (`scripts/guest/tiny/nocloud.awk`): a block list of users, `key: value` lines,
//! block lists of keys, values plain or quoted without escapes. It is also ordinary
//! `#cloud-config` for real cloud-init. Every value taken from [`SeedConfig`] is checked
//! and quoted where YAML would otherwise misread it, so no input can change the
//! document's structure.

use std::fs;
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// What the seed gives the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedConfig {
    /// cloud-init's `instance-id`: a new value makes cloud-init treat the boot as a first
    /// boot (per-instance modules run again).
    pub instance_id: String,
    /// The guest's host name (`local-hostname`); a DNS label or dotted name.
    pub hostname: String,
    /// The build user, created with passwordless sudo and a locked password: `packer`,
    /// like AIB's build VM.
    pub user: String,
    /// The build user's SSH public key: one OpenSSH `authorized_keys` line without
    /// options (`ssh-ed25519 AAAA… comment`).
    pub ssh_public_key: String,
    /// More top-level `#cloud-config` keys, appended verbatim after kiln's own. A leading
    /// `#cloud-config` line is dropped. It must not set the keys kiln writes (`users`,
    /// `ssh_pwauth`, `disable_root`); for the tiny test guest it must also stay within its
    /// YAML subset (the guest ignores top-level keys it does not know).
    pub extra_user_data: Option<String>,
}

/// Why a seed could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A [`SeedConfig`] field has a value the seed cannot carry safely.
    #[error("seed: invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The [`SeedConfig`] field.
        field: &'static str,
        /// The value given (possibly shortened).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building the FAT filesystem failed.
    #[error("seed: cannot build the FAT filesystem: {0}")]
    Fat(#[source] io::Error),
    /// Writing or publishing the image file failed.
    #[error("seed: cannot write {}: {source}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The FAT volume label NoCloud looks for (11 bytes, space padded).
pub const VOLUME_LABEL: [u8; 11] = *b"CIDATA     ";

/// The smallest seed image written (a FAT12 volume, no partition table).
pub const MIN_IMAGE_BYTES: u64 = 2 * 1024 * 1024;

/// The build user's login shell: `/bin/sh` exists on every guest (the tiny test guest
/// has no bash, and dropbear refuses shells it does not know).
pub const SHELL: &str = "/bin/sh";

/// Top-level keys kiln writes in `user-data`; `extra_user_data` may not repeat them.
const OWN_KEYS: [&str; 3] = ["users", "ssh_pwauth", "disable_root"];

/// The `meta-data` file: `instance-id` and `local-hostname`.
///
/// ```text
/// instance-id: kiln-0123abcd
/// local-hostname: kiln-build
/// ```
pub fn meta_data(cfg: &SeedConfig) -> Result<String, SeedError> {
    check_instance_id(&cfg.instance_id)?;
    check_hostname(&cfg.hostname)?;
    Ok(format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        scalar("instance_id", &cfg.instance_id)?,
        scalar("hostname", &cfg.hostname)?
    ))
}

/// The `user-data` file: `#cloud-config` creating the build user with passwordless sudo,
/// a locked password and the SSH key, password logins off and root logins disabled, then
/// `extra_user_data`.
///
/// ```text
/// #cloud-config
/// users:
///   - name: packer
///     sudo: ALL=(ALL) NOPASSWD:ALL
///     shell: /bin/sh
///     lock_passwd: true
///     ssh_authorized_keys:
///       - 'ssh-ed25519 AAAA… kiln-build'
/// ssh_pwauth: false
/// disable_root: true
/// ```
pub fn user_data(cfg: &SeedConfig) -> Result<String, SeedError> {
    check_user(&cfg.user)?;
    let key = check_key(&cfg.ssh_public_key)?;
    let mut out = String::from("#cloud-config\n");
    out.push_str("users:\n");
    out.push_str(&format!("  - name: {}\n", scalar("user", &cfg.user)?));
    out.push_str("    sudo: ALL=(ALL) NOPASSWD:ALL\n");
    out.push_str(&format!("    shell: {SHELL}\n"));
    out.push_str("    lock_passwd: true\n");
    out.push_str("    ssh_authorized_keys:\n");
    out.push_str(&format!("      - {}\n", quoted("ssh_public_key", key)?));
    out.push_str("ssh_pwauth: false\n");
    out.push_str("disable_root: true\n");
    if let Some(extra) = &cfg.extra_user_data {
        out.push_str(&extra_part(extra)?);
    }
    Ok(out)
}

/// Writes the NoCloud seed image to `path`: a raw disk image (at least
/// [`MIN_IMAGE_BYTES`], no partition table) holding a FAT filesystem labelled `CIDATA`
/// with `meta-data` and `user-data`. Attach it to the VM as a plain raw disk.
///
/// The volume ID is derived from the instance ID and host name, so the same
/// configuration gives the same image. The image is built in memory and published
/// atomically: it is written to a temporary file next to `path`, synced, and renamed
/// over `path`; on any error no file is left behind (and an earlier `path` is untouched).
pub fn write_nocloud_vfat(path: &Path, cfg: &SeedConfig) -> Result<(), SeedError> {
    let meta = meta_data(cfg)?;
    let user = user_data(cfg)?;
    let image = build_image(&meta, &user, volume_id(cfg))?;
    publish(path, &image)
}

/// Builds the FAT image in memory.
fn build_image(meta: &str, user: &str, volume_id: u32) -> Result<Vec<u8>, SeedError> {
    const MIB: u64 = 1024 * 1024;
    // Room for the two files (FAT12 clusters are small) plus slack, rounded to a MiB.
    let content = (meta.len() + user.len()) as u64;
    let size = MIN_IMAGE_BYTES.max((content + content / 4 + MIB).div_ceil(MIB) * MIB);
    let len = usize::try_from(size).map_err(|_| {
        SeedError::Fat(io::Error::new(
            io::ErrorKind::InvalidInput,
            "seed too large",
        ))
    })?;
    let mut disk = Cursor::new(vec![0u8; len]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(VOLUME_LABEL)
            .volume_id(volume_id),
    )
    .map_err(SeedError::Fat)?;
    disk.set_position(0);
    {
        let fs =
            fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(SeedError::Fat)?;
        {
            let root = fs.root_dir();
            for (name, text) in [("meta-data", meta), ("user-data", user)] {
                let mut file = root.create_file(name).map_err(SeedError::Fat)?;
                file.truncate().map_err(SeedError::Fat)?;
                file.write_all(text.as_bytes()).map_err(SeedError::Fat)?;
                file.flush().map_err(SeedError::Fat)?;
            }
        }
        fs.unmount().map_err(SeedError::Fat)?;
    }
    Ok(disk.into_inner())
}

/// A FAT volume ID derived from the configuration (the library's default is a fixed
/// `1234-5678`).
fn volume_id(cfg: &SeedConfig) -> u32 {
    let mut h = Sha256::new();
    h.update(cfg.instance_id.as_bytes());
    h.update([0u8]);
    h.update(cfg.hostname.as_bytes());
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Removes a temporary file when dropped, unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it to `path`.
fn publish(path: &Path, bytes: &[u8]) -> Result<(), SeedError> {
    let io_err = |source| SeedError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut guard = TempGuard(None);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err)?;
    guard.0 = Some(tmp.clone());
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err)?;
    guard.0 = None;
    Ok(())
}

// ---- validation and quoting ---------------------------------------------------------

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> SeedError {
    let mut v: String = value.chars().take(80).collect();
    if v.len() < value.len() {
        v.push('…');
    }
    SeedError::Invalid {
        field,
        value: v,
        reason: reason.into(),
    }
}

fn check_instance_id(id: &str) -> Result<(), SeedError> {
    if id.is_empty() {
        return Err(invalid("instance_id", id, "must not be empty"));
    }
    if id.chars().any(|c| c.is_control()) || id.trim() != id {
        return Err(invalid(
            "instance_id",
            id,
            "must be one line without control characters or surrounding spaces",
        ));
    }
    Ok(())
}

fn check_hostname(h: &str) -> Result<(), SeedError> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.is_empty() || h.len() > 253 || !h.split('.').all(ok_label) {
        return Err(invalid(
            "hostname",
            h,
            "must be a host name: dot-separated labels of letters, digits and inner hyphens",
        ));
    }
    Ok(())
}

fn check_user(u: &str) -> Result<(), SeedError> {
    let b = u.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if !ok {
        return Err(invalid(
            "user",
            u,
            "must be a user name: a lower-case letter or _, then up to 31 of a-z 0-9 _ -",
        ));
    }
    Ok(())
}

/// Checks one OpenSSH public key line and returns it trimmed.
fn check_key(key: &str) -> Result<&str, SeedError> {
    let k = key.trim();
    if k.is_empty() {
        return Err(invalid("ssh_public_key", key, "must not be empty"));
    }
    if k.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(
            "ssh_public_key",
            key,
            "must be a single line without control characters",
        ));
    }
    let mut fields = k.split_whitespace();
    let kind = fields.next().unwrap_or("");
    let blob = fields.next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if !known
        || !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-@.".contains(&b))
    {
        return Err(invalid(
            "ssh_public_key",
            key,
            "must start with the key type (ssh-…, ecdsa-…, sk-…); options are not allowed",
        ));
    }
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=';
    if blob.is_empty() || !blob.bytes().all(b64) {
        return Err(invalid(
            "ssh_public_key",
            key,
            "the key type must be followed by the base64 key",
        ));
    }
    Ok(k)
}

/// YAML 1.1 words that plain would make a boolean or null.
fn is_special_word(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "y" | "n" | "yes" | "no" | "true" | "false" | "on" | "off" | "null" | "~"
    )
}

/// A scalar value: plain when YAML reads it back as the same string, else quoted.
fn scalar(field: &'static str, s: &str) -> Result<String, SeedError> {
    let first_ok = s
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'/' || b == b'_');
    let plain = first_ok
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && !is_special_word(s);
    if plain {
        Ok(s.to_string())
    } else {
        quoted(field, s)
    }
}

/// A quoted scalar the tiny guest's parser reads back unchanged (it strips the quotes
/// and does no unescaping): single quotes, or double quotes when the value has a single
/// quote and nothing a double-quoted scalar would unescape.
fn quoted(field: &'static str, s: &str) -> Result<String, SeedError> {
    if !s.contains('\'') {
        Ok(format!("'{s}'"))
    } else if !s.contains('"') && !s.contains('\\') {
        Ok(format!("\"{s}\""))
    } else {
        Err(invalid(
            field,
            s,
            "cannot be quoted for the guest: it has both quote kinds (or a quote and a backslash)",
        ))
    }
}

/// Checks `extra_user_data` and returns it ready to append (newline terminated).
fn extra_part(extra: &str) -> Result<String, SeedError> {
    let mut lines = extra.lines().peekable();
    if lines
        .peek()
        .is_some_and(|l| l.trim_end().eq_ignore_ascii_case("#cloud-config"))
    {
        lines.next();
    }
    let mut out = String::new();
    for line in lines {
        let key = line.split(':').next().unwrap_or("").trim_end();
        let top_level = !line.starts_with([' ', '\t', '#', '-']) && line.contains(':');
        if top_level && OWN_KEYS.contains(&key.trim_matches(['"', '\''])) {
            return Err(invalid(
                "extra_user_data",
                line,
                format!("sets `{key}`, which kiln's own user-data sets"),
            ));
        }
        if line.trim() == "---" || line.trim() == "..." {
            return Err(invalid(
                "extra_user_data",
                line,
                "must be part of the one #cloud-config document (no document markers)",
            ));
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHr8m1mQ6mR3yqVn0c6g8aQW0hP3bG6lQm1s0x9Jw1Zk kiln-build";

    fn cfg() -> SeedConfig {
        SeedConfig {
            instance_id: "kiln-0123abcd".into(),
            hostname: "kiln-build".into(),
            user: "packer".into(),
            ssh_public_key: KEY.into(),
            extra_user_data: None,
        }
    }

    #[test]
    fn meta_data_text() {
        assert_eq!(
            meta_data(&cfg()).unwrap(),
            "instance-id: kiln-0123abcd\nlocal-hostname: kiln-build\n"
        );
    }

    #[test]
    fn meta_data_quotes_what_yaml_would_misread() {
        let mut c = cfg();
        c.instance_id = "12345".into();
        c.hostname = "no".into();
        assert_eq!(
            meta_data(&c).unwrap(),
            "instance-id: '12345'\nlocal-hostname: 'no'\n"
        );
        c.instance_id = "i-1: #x".into();
        c.hostname = "Build.example.com".into();
        assert_eq!(
            meta_data(&c).unwrap(),
            "instance-id: 'i-1: #x'\nlocal-hostname: Build.example.com\n"
        );
    }

    #[test]
    fn user_data_text() {
        let expected = format!(
            "#cloud-config\n\
             users:\n  \
               - name: packer\n    \
                 sudo: ALL=(ALL) NOPASSWD:ALL\n    \
                 shell: /bin/sh\n    \
                 lock_passwd: true\n    \
                 ssh_authorized_keys:\n      \
                   - '{KEY}'\n\
             ssh_pwauth: false\n\
             disable_root: true\n"
        );
        assert_eq!(user_data(&cfg()).unwrap(), expected);
    }

    #[test]
    fn key_comment_cannot_break_yaml() {
        let mut c = cfg();
        c.ssh_public_key = "  ssh-ed25519 AAAA1234 it's me: #1  \n".into();
        let ud = user_data(&c).unwrap();
        assert!(
            ud.contains("      - \"ssh-ed25519 AAAA1234 it's me: #1\"\n"),
            "{ud}"
        );
        c.ssh_public_key = "ssh-ed25519 AAAA1234 o'k \"x\"".into();
        assert!(matches!(
            user_data(&c),
            Err(SeedError::Invalid {
                field: "ssh_public_key",
                ..
            })
        ));
        c.ssh_public_key = "ssh-ed25519 AAAA1234 a\nusers: []".into();
        assert!(matches!(
            user_data(&c),
            Err(SeedError::Invalid {
                field: "ssh_public_key",
                ..
            })
        ));
        c.ssh_public_key = "command=\"x\" ssh-ed25519 AAAA1234".into();
        assert!(user_data(&c).is_err());
        c.ssh_public_key = "ssh-ed25519".into();
        assert!(user_data(&c).is_err());
        c.ssh_public_key = "ecdsa-sha2-nistp256 AAAAE2Vj+/= host".into();
        assert!(user_data(&c)
            .unwrap()
            .contains("      - 'ecdsa-sha2-nistp256 AAAAE2Vj+/= host'\n"));
    }

    #[test]
    fn invalid_fields_are_rejected() {
        for (user, host, id) in [
            ("Packer", "h", "i"),
            ("pa cker", "h", "i"),
            ("", "h", "i"),
            ("packer", "-h", "i"),
            ("packer", "h_1", "i"),
            ("packer", "a..b", "i"),
            ("packer", "h", ""),
            ("packer", "h", "a\nb"),
        ] {
            let mut c = cfg();
            c.user = user.into();
            c.hostname = host.into();
            c.instance_id = id.into();
            let dir = tmpdir("invalid");
            let img = dir.join("seed.img");
            let err = write_nocloud_vfat(&img, &c).unwrap_err();
            assert!(
                matches!(err, SeedError::Invalid { .. }),
                "{user:?} {host:?} {id:?}: {err}"
            );
            assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        }
    }

    #[test]
    fn extra_user_data_is_appended() {
        let mut c = cfg();
        c.extra_user_data =
            Some("#cloud-config\nruncmd:\n  - [touch, /tmp/x]\ntimezone: UTC".into());
        let ud = user_data(&c).unwrap();
        assert!(
            ud.ends_with("disable_root: true\nruncmd:\n  - [touch, /tmp/x]\ntimezone: UTC\n"),
            "{ud}"
        );
        assert_eq!(ud.matches("#cloud-config").count(), 1);
        c.extra_user_data = Some("users:\n  - default\n".into());
        assert!(matches!(
            user_data(&c),
            Err(SeedError::Invalid {
                field: "extra_user_data",
                ..
            })
        ));
        c.extra_user_data = Some("a: 1\n---\nb: 2\n".into());
        assert!(user_data(&c).is_err());
    }

    /// Runs the tiny guest's parser (scripts/guest/tiny/nocloud.awk) on the generated
    /// files and checks the records it produces.
    #[test]
    fn tiny_guest_parser_reads_the_seed() {
        let awk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest/tiny/nocloud.awk");
        let dir = tmpdir("awk");
        let mut c = cfg();
        c.ssh_public_key = "ssh-ed25519 AAAA1234 it's: #me".into();
        c.extra_user_data = Some("runcmd:\n  - [touch, /tmp/x]\n".into());
        fs::write(dir.join("meta-data"), meta_data(&c).unwrap()).unwrap();
        fs::write(dir.join("user-data"), user_data(&c).unwrap()).unwrap();
        let run = |doc: &str, file: &str| {
            let out = Command::new("awk")
                .arg("-v")
                .arg(format!("doc={doc}"))
                .arg("-f")
                .arg(&awk)
                .arg(dir.join(file))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().replace('\x1f', "|")
        };
        assert_eq!(run("meta", "meta-data"), "hostname|kiln-build\n");
        assert_eq!(
            run("user", "user-data"),
            "user|packer|yes|/bin/sh||\nkey|packer|ssh-ed25519 AAAA1234 it's: #me\n"
        );
    }

    /// A scratch directory removed when dropped.
    struct TmpDir(PathBuf);

    impl std::ops::Deref for TmpDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TmpDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmpdir(tag: &str) -> TmpDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d =
            std::env::temp_dir().join(format!("kiln-seed-test-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }

    fn tool(prog: &str, args: &[&str]) -> String {
        let out = Command::new(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        assert!(out.status.success(), "{prog} {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn vfat_image_is_a_cidata_volume() {
        let dir = tmpdir("vfat");
        let img = dir.join("seed.img");
        let c = cfg();
        write_nocloud_vfat(&img, &c).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), MIN_IMAGE_BYTES);
        let p = img.to_str().unwrap();

        let blkid = tool("blkid", &["-p", "-o", "export", p]);
        assert!(blkid.lines().any(|l| l == "LABEL=CIDATA"), "{blkid}");
        assert!(blkid.lines().any(|l| l == "TYPE=vfat"), "{blkid}");
        let id = volume_id(&c);
        let uuid = format!("UUID={:04X}-{:04X}", id >> 16, id & 0xffff);
        assert!(blkid.lines().any(|l| l == uuid), "{blkid} lacks {uuid}");

        assert_eq!(
            tool("mtype", &["-i", p, "::user-data"]),
            user_data(&c).unwrap()
        );
        assert_eq!(
            tool("mtype", &["-i", p, "::meta-data"]),
            meta_data(&c).unwrap()
        );
        let dir_listing = tool("mdir", &["-i", p, "-b", "::"]);
        assert_eq!(dir_listing, "::/meta-data\n::/user-data\n");

        tool("fsck.vfat", &["-n", p]);
        // only the image: no temporary file left next to it
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("seed.img")]);
    }

    #[test]
    fn large_user_data_gets_a_larger_image() {
        let dir = tmpdir("large");
        let img = dir.join("seed.img");
        let mut c = cfg();
        c.extra_user_data = Some(format!(
            "write_files:\n  - content: '{}'\n    path: /x\n",
            "x".repeat(3 << 20)
        ));
        write_nocloud_vfat(&img, &c).unwrap();
        assert!(fs::metadata(&img).unwrap().len() >= 4 << 20);
        let p = img.to_str().unwrap();
        assert_eq!(
            tool("mtype", &["-i", p, "::user-data"]).len(),
            user_data(&c).unwrap().len()
        );
        tool("fsck.vfat", &["-n", p]);
    }

    #[test]
    fn publish_replaces_atomically_and_leaves_nothing_on_error() {
        let dir = tmpdir("atomic");
        let img = dir.join("seed.img");
        fs::write(&img, b"old").unwrap();
        write_nocloud_vfat(&img, &cfg()).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), MIN_IMAGE_BYTES);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        // renaming onto a directory fails after the temporary file was written
        let blocked = dir.join("blocked.img");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"").unwrap();
        let err = write_nocloud_vfat(&blocked, &cfg()).unwrap_err();
        assert!(matches!(err, SeedError::Io { .. }), "{err}");
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked.img", "seed.img"]);

        // a missing directory: nothing is created
        let err = write_nocloud_vfat(&dir.join("nope/seed.img"), &cfg()).unwrap_err();
        assert!(err.to_string().contains("nope/seed.img"), "{err}");
    }

    #[test]
    fn same_config_same_image() {
        let dir = tmpdir("det");
        write_nocloud_vfat(&dir.join("a.img"), &cfg()).unwrap();
        write_nocloud_vfat(&dir.join("b.img"), &cfg()).unwrap();
        assert_eq!(
            fs::read(dir.join("a.img")).unwrap(),
            fs::read(dir.join("b.img")).unwrap()
        );
        let mut c = cfg();
        c.instance_id = "kiln-other".into();
        assert_ne!(volume_id(&c), volume_id(&cfg()));
    }
}
