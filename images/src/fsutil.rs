//! Small filesystem helpers: unique temporary names beside a destination, removal guards for
//! partial files, directory fsync, and allocated-size accounting.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name part unique across processes (pid), time, and threads of this process (counter).
pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos:09}-{n}", std::process::id())
}

/// A hidden path in `dest`'s directory, `.NAME.TAG-UNIQUE`, so a rename onto `dest` stays on one
/// filesystem and is atomic.
pub(crate) fn temp_sibling(dest: &Path, tag: &str) -> PathBuf {
    let dir = parent_dir(dest);
    let mut name = OsString::from(".");
    name.push(dest.file_name().unwrap_or_else(|| "kiln".as_ref()));
    name.push(format!(".{tag}-{}", unique_suffix()));
    dir.join(name)
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Bytes the filesystem actually allocated for a file (sparse files allocate less than their
/// length).
pub(crate) fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    // `blocks` counts 512-byte units whatever the filesystem block size is.
    meta.blocks().saturating_mul(512)
}

/// fsync a directory so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes a file or directory tree when dropped, unless disarmed: partial outputs never survive
/// an error or a panic.
pub(crate) struct RemoveOnDrop {
    path: Option<PathBuf>,
}

impl RemoveOnDrop {
    /// Guard `path`.
    pub(crate) fn new(path: PathBuf) -> RemoveOnDrop {
        RemoveOnDrop { path: Some(path) }
    }

    /// The guarded path.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or_else(|| Path::new(""))
    }

    /// Keep the path: it has been published (renamed away) or is wanted.
    pub(crate) fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {
                    make_writable_tree(&path);
                    let _ = fs::remove_dir_all(&path);
                }
                Ok(_) => {
                    let _ = fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
    }
}

/// Best effort: give the owner write permission on a tree so it can be removed.
fn make_writable_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if let Ok(m) = fs::symlink_metadata(&p) {
                if m.is_dir() {
                    make_writable_tree(&p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_sibling_is_hidden_and_beside_dest() {
        let t = temp_sibling(Path::new("/a/b/out.vhd"), "export");
        assert_eq!(t.parent(), Some(Path::new("/a/b")));
        let name = t.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(name.starts_with(".out.vhd.export-"), "{name}");
        assert_ne!(t, temp_sibling(Path::new("/a/b/out.vhd"), "export"));
        assert_eq!(
            temp_sibling(Path::new("x"), "t").parent(),
            Some(Path::new("."))
        );
    }
}
