//! Test guest images (`cargo xtask images`): build, cache and locate them.
//!
//! Each image is built from a recipe (Rust code in this module + guest-side files under
//! `scripts/guest/<name>/`, embedded at compile time) into
//! `${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/guests/<name>-<hash>/`
//! holding `disk.qcow2` and `meta.json`. The hash covers the recipe and the exact
//! versions of the host packages the recipe copies from, so a change to either builds a
//! new image; an unchanged recipe is a cache hit that costs a few dpkg-query calls.
//!
//! Builds run in a work directory and are renamed into place atomically; a per-image
//! lock makes concurrent callers (parallel tests, two shells) wait for one build.

mod debian;
mod disk;
mod pvh;
mod tiny;
pub mod util;
mod winrs;

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use util::{DirLock, Progress};

/// The images this module can build.
pub const NAMES: &[&str] = &["tiny", "debian", "debian-azure", "debian-waagent", "winrs"];

/// How to get an image.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Rebuild even when the cache has the image.
    pub force: bool,
    /// No progress lines on stderr.
    pub quiet: bool,
}

/// A built image in the cache.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    /// `<cache>/guests/<name>-<hash>/`
    pub dir: PathBuf,
    /// The disk file (`disk.qcow2`).
    pub disk: PathBuf,
    /// Its format for QEMU (`-F`/`format=`): "qcow2".
    pub format: String,
    /// The catalog metadata (`meta.json`).
    pub meta: serde_json::Value,
    /// Whether this call found it in the cache.
    pub cached: bool,
}

/// What a recipe contributes: its hash inputs and its build.
pub(crate) trait Recipe {
    /// Everything that determines the image: recipe text, guest files, package versions.
    fn hash_input(&self) -> Result<Vec<u8>>;
    /// Builds into `out` (a fresh directory): must leave `disk.qcow2` and `meta.json`.
    fn build(&self, ctx: &BuildCtx, progress: &mut Progress) -> Result<()>;
}

/// Where a build works and writes.
pub(crate) struct BuildCtx {
    pub hash: String,
    pub work: PathBuf,
    pub out: PathBuf,
    pub cache_root: PathBuf,
}

/// The cache root: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("kiln")
}

fn recipe(name: &str) -> Result<Box<dyn Recipe>> {
    match name {
        "tiny" => Ok(Box::new(tiny::Tiny)),
        "winrs" => Ok(Box::new(winrs::Winrs)),
        "debian" => Ok(Box::new(debian::Debian(&debian::PLAIN))),
        "debian-azure" => Ok(Box::new(debian::Debian(&debian::AZURE))),
        "debian-waagent" => Ok(Box::new(debian::Debian(&debian::WAAGENT))),
        _ => bail!("unknown image `{name}` (known: {})", NAMES.join(", ")),
    }
}

/// Returns the image `name`, building it first if the cache lacks it (or `force`).
pub fn ensure(name: &str, opts: &Options) -> Result<Image> {
    let r = recipe(name)?;
    let mut progress = Progress::new(name, opts.quiet);
    let input = r.hash_input()?;
    let hash = util::sha256_hex(&input);
    let root = cache_root();
    let guests = root.join("guests");
    fs::create_dir_all(&guests).with_context(|| format!("creating {}", guests.display()))?;
    let dir = guests.join(format!("{name}-{}", &hash[..16]));

    if !opts.force {
        if let Some(img) = load(name, &dir, true)? {
            progress.done(&format!("cached {}", dir.display()));
            return Ok(img);
        }
    }

    let _lock = DirLock::acquire(guests.join(format!(".lock-{name}")), name, &progress)?;
    // someone else may have built it while we waited
    if !opts.force {
        if let Some(img) = load(name, &dir, true)? {
            progress.done(&format!(
                "cached {} (built by another process)",
                dir.display()
            ));
            return Ok(img);
        }
    }
    util::require_root()?;
    progress.note(&format!("building (recipe {})", &hash[..16]));

    let pid = std::process::id();
    let work = util::TempDir::new(root.join("work").join(format!("{name}-{pid}")))?;
    let out = util::TempDir::new(guests.join(format!(".tmp-{name}-{pid}")))?;
    let ctx = BuildCtx {
        hash: hash.clone(),
        work: work.path.clone(),
        out: out.path.clone(),
        cache_root: root.clone(),
    };
    r.build(&ctx, &mut progress)
        .with_context(|| format!("building image `{name}`"))?;

    for f in ["disk.qcow2", "meta.json"] {
        if !out.path.join(f).is_file() {
            bail!("recipe `{name}` left no {f}");
        }
    }
    if dir.exists() {
        let old = guests.join(format!(".old-{name}-{pid}"));
        fs::rename(&dir, &old)?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&out.path, &dir).with_context(|| format!("renaming into {}", dir.display()))?;
    prune(&guests, name, &dir);
    progress.done(&format!("built {}", dir.display()));
    progress.note(&format!("total {:.1}s", progress.total().as_secs_f64()));
    load(name, &dir, false)?.context("image vanished after the build")
}

/// Reads a finished image directory, if complete.
fn load(name: &str, dir: &Path, cached: bool) -> Result<Option<Image>> {
    let meta_path = dir.join("meta.json");
    let disk = dir.join("disk.qcow2");
    if !meta_path.is_file() || !disk.is_file() {
        return Ok(None);
    }
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path)?)
        .with_context(|| format!("parsing {}", meta_path.display()))?;
    let _ = fs::write(dir.join(LAST_USED), utc_now());
    Ok(Some(Image {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        disk,
        format: "qcow2".into(),
        meta,
        cached,
    }))
}

/// Removes builds of the same image with other recipe hashes that nobody used for
/// [`PRUNE_AFTER`]. Not at once: checkouts of different commits (branches, CI, another
/// developer's test binary) share the cache and each needs its own build.
fn prune(guests: &Path, name: &str, keep: &Path) {
    let Ok(entries) = fs::read_dir(guests) else {
        return;
    };
    let prefix = format!("{name}-");
    for e in entries.flatten() {
        let p = e.path();
        let file = e.file_name().to_string_lossy().into_owned();
        if p == keep || !file.starts_with(&prefix) || file.len() != prefix.len() + 16 {
            continue;
        }
        let unused_for = fs::metadata(p.join(LAST_USED))
            .or_else(|_| fs::metadata(p.join("meta.json")))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if unused_for.is_some_and(|d| d > PRUNE_AFTER) {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// Touched on every use of a build (its mtime is the last use).
const LAST_USED: &str = "last-used";
const PRUNE_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Version derived from the recipe hash: `1.0.<first 28 bits of the hash>` (stable for
/// a recipe, fits Azure's int32 version parts).
pub(crate) fn version_from_hash(hash: &str) -> String {
    let n = u32::from_str_radix(&hash[..7], 16).unwrap_or(0);
    format!("1.0.{n}")
}

/// Seconds since the epoch, as UTC `YYYY-MM-DDTHH:MM:SSZ` (no date crate needed).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // civil-from-days (Howard Hinnant)
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The catalog metadata common to both images; recipes add their specifics.
pub(crate) fn base_meta(
    t: &disk::DiskTools,
    offer: &str,
    ctx: &BuildCtx,
    disk: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    use serde_json::json;
    let size = disk::virtual_size(t, disk)?;
    let file_size = fs::metadata(disk)?.len();
    let sha = util::sha256_file(disk)?;
    let v = json!({
        "publisher": "kiln",
        "offer": offer,
        "skus": [
            {"name": "gen1", "hyperVGeneration": "V1", "firmware": "bios", "machine": "pc"},
            {"name": "gen2", "hyperVGeneration": "V2", "firmware": "uefi", "machine": "q35"}
        ],
        "version": version_from_hash(&ctx.hash),
        "hyperVGenerations": ["V1", "V2"],
        "osType": "Linux",
        "architecture": "x64",
        "disk": {
            "file": "disk.qcow2",
            "format": "qcow2",
            "virtualSizeBytes": size,
            "fileSizeBytes": file_size,
            "sha256": sha,
            "partitionTable": "gpt",
        },
        "recipeSha256": ctx.hash,
        "builtAt": utc_now(),
    });
    Ok(v.as_object().cloned().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_derived_from_the_hash() {
        assert_eq!(version_from_hash("0000010fffffffff"), "1.0.16");
        assert_eq!(
            version_from_hash("fffffff0"),
            format!("1.0.{}", 0x0fff_ffffu32)
        );
    }

    #[test]
    fn utc_timestamps_look_right() {
        let t = utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }

    #[test]
    fn unknown_images_are_rejected() {
        let e = ensure("nosuch", &Options::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown image `nosuch`") && e.contains("tiny"),
            "{e}"
        );
    }
}
