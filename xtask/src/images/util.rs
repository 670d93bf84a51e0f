//! Small helpers for the image recipes: running host tools with clear errors, finding
//! tools and files (naming the Debian package that provides them), package versions,
//! progress lines, hashing and a cross-process build lock.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The command that installs every host package the recipes need.
pub const SETUP_HINT: &str = "run `sudo scripts/setup-host.sh` to install the host packages";

/// Prints one line per finished phase: `[images] tiny: rootfs staged  0.4s (total 1.2s)`.
pub struct Progress {
    name: String,
    start: Instant,
    last: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(name: &str, quiet: bool) -> Self {
        let now = Instant::now();
        Progress {
            name: name.to_string(),
            start: now,
            last: now,
            quiet,
        }
    }

    /// Reports that a phase has finished.
    pub fn done(&mut self, what: &str) {
        let now = Instant::now();
        if !self.quiet {
            eprintln!(
                "[images] {}: {:<40} {:>6.1}s (total {:.1}s)",
                self.name,
                what,
                (now - self.last).as_secs_f64(),
                (now - self.start).as_secs_f64()
            );
        }
        self.last = now;
    }

    /// A line without timing (e.g. "building, this takes about a minute").
    pub fn note(&self, what: &str) {
        if !self.quiet {
            eprintln!("[images] {}: {}", self.name, what);
        }
    }

    pub fn total(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Finds an executable on PATH or in the sbin directories (which a non-root PATH may
/// lack), or fails naming the package that provides it.
pub fn tool(name: &str, package: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("missing tool `{name}` (Debian package `{package}`); {SETUP_HINT}")
}

/// Checks that a file a recipe reads from the host exists, or fails naming its package.
pub fn host_file(path: &str, package: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if !p.exists() {
        bail!("missing file {path} (Debian package `{package}`); {SETUP_HINT}");
    }
    Ok(p)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim_end();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// Runs a command to completion, capturing its output; fails with the command line and
/// the end of its output.
pub fn run(cmd: impl BorrowMut<Command>) -> Result<String> {
    run_stdin(cmd, None)
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_stdin(mut cmd: impl BorrowMut<Command>, input: Option<&[u8]>) -> Result<String> {
    let cmd: &mut Command = cmd.borrow_mut();
    let what = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{what}`"))?;
    if !out.status.success() {
        let mut msg = format!("`{what}` failed ({})", out.status);
        let (o, e) = (tail(&out.stdout, 2000), tail(&out.stderr, 4000));
        if !o.is_empty() {
            msg.push_str(&format!("\n--- stdout ---\n{o}"));
        }
        if !e.is_empty() {
            msg.push_str(&format!("\n--- stderr ---\n{e}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with its output streamed to our stderr, with each line prefixed (for
/// long steps such as mmdebstrap, so that progress stays visible).
pub fn run_streamed(cmd: &mut Command, prefix: &str, log: &Path) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let what = describe(cmd);
    let mut logf = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let t1 = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t2 = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    let mut last = Vec::new();
    for l in rx {
        let _ = writeln!(logf, "{l}");
        if l.starts_with("I: ") || l.starts_with("E: ") || l.starts_with("W: ") {
            eprintln!("{prefix}{l}");
        }
        last.push(l);
        if last.len() > 40 {
            last.remove(0);
        }
    }
    let _ = (t1.join(), t2.join());
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "`{what}` failed ({status}); full log: {}\n{}",
            log.display(),
            last.join("\n")
        );
    }
    Ok(())
}

/// `Command::new(program)` with the given arguments.
pub fn cmd<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Exact installed versions (`dpkg-query -W`) of the given packages, as `name=version`
/// lines; fails naming the packages that are not installed.
pub fn package_versions(packages: &[String]) -> Result<Vec<String>> {
    let dpkg = tool("dpkg-query", "dpkg")?;
    let out = Command::new(dpkg)
        .arg("-W")
        .arg("-f=${Package}=${Version}=${db:Status-Abbrev}\n")
        .args(packages)
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    let mut versions = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(3, '=');
        let (p, v, s) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        // the package name may carry an architecture qualifier in the output
        let p = p.split(':').next().unwrap_or(p);
        if s.starts_with("ii") {
            found.push(p.to_string());
            versions.push(format!("{p}={v}"));
        }
    }
    let missing: Vec<&String> = packages.iter().filter(|p| !found.contains(p)).collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        bail!(
            "missing Debian package(s): {}; {SETUP_HINT}",
            names.join(", ")
        );
    }
    versions.sort();
    versions.dedup();
    Ok(versions)
}

/// Recipe source for hashing, with white space normalized so that reformatting
/// (rustfmt) does not trigger a rebuild.
pub fn normalized_source(src: &str) -> String {
    src.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// A UUID-shaped string derived from a hash (for stable partition and fs UUIDs).
pub fn uuid_from(hash_hex: &str, salt: &str) -> String {
    let h = sha256_hex(format!("{hash_hex}/{salt}").as_bytes());
    // version 4 / variant 1 bits, so tools accept it as a random UUID
    let v = format!("4{}", &h[13..16]);
    let var = ["8", "9", "a", "b"][usize::from_str_radix(&h[16..17], 16).unwrap_or(0) % 4];
    format!(
        "{}-{}-{}-{}{}-{}",
        &h[0..8],
        &h[8..12],
        v,
        var,
        &h[17..20],
        &h[20..32]
    )
}

/// A directory-based lock (mkdir is atomic) held by this process until dropped. A lock
/// left by a process that no longer exists is taken over.
pub struct DirLock {
    path: PathBuf,
}

impl DirLock {
    pub fn acquire(path: PathBuf, what: &str, progress: &Progress) -> Result<DirLock> {
        let started = Instant::now();
        let mut announced = false;
        loop {
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(DirLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = fs::read_to_string(path.join("pid")).unwrap_or_default();
                    let pid = pid.trim();
                    let alive = !pid.is_empty() && Path::new("/proc").join(pid).exists();
                    let age = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default();
                    // a lock without pid file yet is fresh unless it is old
                    if (!pid.is_empty() && !alive)
                        || (pid.is_empty() && age > Duration::from_secs(30))
                    {
                        let _ = fs::remove_dir_all(&path);
                        continue;
                    }
                    if !announced {
                        progress.note(&format!("waiting for another build of {what} (pid {pid})"));
                        announced = true;
                    }
                    if started.elapsed() > Duration::from_secs(3600) {
                        bail!("timed out waiting for the lock {}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(anyhow!(e).context(format!("creating lock {}", path.display())))
                }
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes a directory tree when dropped (work directories), unless `KILN_KEEP_WORK` is
/// set (for debugging a recipe).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KILN_KEEP_WORK").is_some() {
            eprintln!("[images] keeping work dir {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Writes a file, creating parent directories, with the given mode.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}

/// Copies a host file (following symlinks) to `dest`, creating parents, with `mode`.
pub fn copy_file(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn symlink(target: &str, link: &Path) -> Result<()> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent)?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("symlink {} -> {target}", link.display()))
}

/// Fails unless we run as root (the recipes need root-owned files, setuid bits and, for
/// debian, mmdebstrap's chroot mode).
pub fn require_root() -> Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("building test guests needs root (file ownership, setuid sudo, mmdebstrap chroot)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_tool_and_package() {
        let e = tool("kiln-no-such-tool", "kiln-no-such-package")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`kiln-no-such-tool`")
                && e.contains("`kiln-no-such-package`")
                && e.contains("setup-host.sh"),
            "{e}"
        );
    }

    #[test]
    fn missing_package_is_named() {
        let e = package_versions(&["kiln-no-such-package".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kiln-no-such-package") && e.contains("setup-host.sh"),
            "{e}"
        );
    }

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let a = uuid_from("abc", "disk");
        assert_eq!(a, uuid_from("abc", "disk"));
        assert_ne!(a, uuid_from("abc", "esp"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }
}
