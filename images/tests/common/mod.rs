//! Helpers shared by the integration tests: temporary directories, disks with known content,
//! and the real qemu-img/qemu-io.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

pub const MIB: u64 = 1 << 20;

static N: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed (even with read-only files inside) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kiln-images-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Names in the directory (not recursive), sorted.
    pub fn names(&self) -> Vec<String> {
        list_names(&self.0)
    }
}

pub fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Drop for TempDir {
    fn drop(&mut self) {
        fn writable(p: &Path) {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        writable(&e.path());
                    }
                }
            }
        }
        writable(&self.0);
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A sparse raw disk of `len` bytes with `fill` bytes of `pattern` at each offset.
pub fn raw_disk(path: &Path, len: u64, writes: &[(u64, u8, usize)]) {
    let mut f = fs::File::create(path).expect("create raw disk");
    f.set_len(len).expect("set_len");
    for &(off, pattern, fill) in writes {
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&vec![pattern; fill]).expect("write");
    }
    f.sync_all().expect("sync");
}

/// `len` bytes of `path` at `off`.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read");
    buf
}

/// `sha256sum` of a file (an independent tool, not kiln's code).
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Run `qemu-io -c CMD -f FMT PATH` (writes into an image without a VM).
pub fn qemu_io(path: &Path, format: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(path)
        .output()
        .expect("qemu-io must be installed (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-io {cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run qemu-img directly, as an independent check of what kiln did.
pub fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (apt-get install qemu-utils)")
}

/// `qemu-img info --output=json` as a JSON value, read independently of kiln's parser.
pub fn qemu_info_json(path: &Path, format: &str) -> serde_json::Value {
    let p = path.to_string_lossy().into_owned();
    let out = qemu_img(&["info", "--output=json", "-f", format, &p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Whether two images hold the same guest-visible data (`qemu-img compare`, strict sizes off).
pub fn same_content(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> bool {
    let (a, b) = (
        a.to_string_lossy().into_owned(),
        b.to_string_lossy().into_owned(),
    );
    let out = qemu_img(&["compare", "-f", a_fmt, "-F", b_fmt, &a, &b]);
    out.status.success()
}
