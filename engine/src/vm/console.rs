//! The guest's serial console, as QEMU writes it to `run_dir/console.log`.
//!
//! QEMU appends to the file, so one run directory can hold several boots; a [`Console`]
//! sees only the bytes written since its VM started.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The line a Linux kernel prints when it panics.
pub const KERNEL_PANIC: &str = "Kernel panic";

/// How much of the end of the log [`Console::tail`] reads at most.
const TAIL_WINDOW: u64 = 256 << 10;

/// One VM's view of its console log.
#[derive(Clone, Debug)]
pub struct Console {
    path: PathBuf,
    start: u64,
}

impl Console {
    /// The console at `path`, from byte `start` on (the file's length when the VM started).
    pub fn new(path: PathBuf, start: u64) -> Console {
        Console { path, start }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything this VM wrote so far (lossy UTF-8; empty when there is no file yet).
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        self.read_from(self.start, u64::MAX)
    }

    fn read_from(&self, from: u64, max: u64) -> io::Result<Vec<u8>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        if len <= from {
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// The last `n` lines (at most the last 256 KiB), cleaned for display: `\r` and other
    /// control characters except tab removed, invalid UTF-8 replaced.
    pub fn tail(&self, n: usize) -> io::Result<String> {
        let len = match std::fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(e),
        };
        let from = self.start.max(len.saturating_sub(TAIL_WINDOW));
        let bytes = self.read_from(from, TAIL_WINDOW)?;
        Ok(last_lines(&bytes, n))
    }

    /// Whether `pattern` occurs in what this VM wrote so far.
    pub fn contains(&self, pattern: &str) -> io::Result<bool> {
        Ok(find(&self.read_all()?, pattern.as_bytes()).is_some())
    }

    /// The first kernel panic line, if the guest panicked.
    pub fn panic_line(&self) -> io::Result<Option<String>> {
        Ok(panic_line(&self.read_all()?))
    }

    /// An incremental reader from this VM's start.
    pub(crate) fn scanner(&self) -> Scanner {
        Scanner {
            console: self.clone(),
            pos: self.start,
            window: Vec::new(),
        }
    }
}

/// Reads only what was appended since the last call, and finds patterns that straddle
/// two reads.
pub(crate) struct Scanner {
    console: Console,
    pos: u64,
    /// the bytes not yet known to be irrelevant: from the start of the last incomplete
    /// line (bounded)
    window: Vec<u8>,
}

/// What a scan found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    Pattern,
    Panic(String),
}

impl Scanner {
    /// Reads the new bytes and looks for `pattern` and a kernel panic. A panic wins over
    /// the pattern when it comes first (or is what the pattern matched).
    pub(crate) fn scan(&mut self, pattern: &str) -> io::Result<Option<Found>> {
        let new = self.console.read_from(self.pos, 16 << 20)?;
        self.pos += new.len() as u64;
        self.window.extend_from_slice(&new);
        let hit = find(&self.window, pattern.as_bytes());
        let panic = find(&self.window, KERNEL_PANIC.as_bytes());
        let found = match (hit, panic) {
            (Some(h), Some(p)) if p <= h => Some(Found::Panic(line_at(&self.window, p))),
            (Some(_), _) => Some(Found::Pattern),
            (None, Some(p)) => Some(Found::Panic(line_at(&self.window, p))),
            (None, None) => None,
        };
        // keep the last (incomplete) line plus enough bytes for a straddling match
        let keep = pattern.len().max(KERNEL_PANIC.len());
        let cut = match self.window.iter().rposition(|&b| b == b'\n') {
            Some(i) => (i + 1).min(self.window.len().saturating_sub(keep)),
            None => self.window.len().saturating_sub(keep.max(4096)),
        };
        self.window.drain(..cut);
        Ok(found)
    }
}

impl Scanner {
    /// Reads the new bytes and returns the kernel panic line, if one appeared.
    pub(crate) fn scan_panic(&mut self) -> io::Result<Option<String>> {
        Ok(match self.scan(KERNEL_PANIC)? {
            Some(Found::Panic(line)) => Some(line),
            // (a match of the panic marker itself is reported as `Panic`)
            Some(Found::Pattern) => Some(KERNEL_PANIC.to_string()),
            None => None,
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The (cleaned) line that contains byte `at`.
fn line_at(bytes: &[u8], at: usize) -> String {
    let start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| at + i);
    clean(&bytes[start..end]).trim().to_string()
}

/// The first kernel panic line in `bytes`.
pub(crate) fn panic_line(bytes: &[u8]) -> Option<String> {
    find(bytes, KERNEL_PANIC.as_bytes()).map(|p| line_at(bytes, p))
}

fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect()
}

fn last_lines(bytes: &[u8], n: usize) -> String {
    let text = clean(bytes);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<&str> = text.split('\n').collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn tmp(name: &str) -> Tmp {
        Tmp(std::env::temp_dir().join(format!("kiln-console-{name}-{}", std::process::id())))
    }
    fn append(p: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn tail_sees_only_this_boot_and_cleans_lines() {
        let t = tmp("tail");
        append(&t.0, b"old boot\nKILN-READY ssh\n");
        let start = std::fs::metadata(&t.0).unwrap().len();
        let c = Console::new(t.0.clone(), start);
        assert_eq!(c.tail(5).unwrap(), "");
        assert!(
            !c.contains("KILN-READY").unwrap(),
            "the previous boot's line must not count"
        );
        append(&t.0, b"\x1b[0mSeaBIOS\r\nline 2\r\nline 3\n\xffbad\n");
        assert_eq!(c.tail(2).unwrap(), "line 3\n\u{fffd}bad");
        assert_eq!(
            c.tail(10).unwrap(),
            "[0mSeaBIOS\nline 2\nline 3\n\u{fffd}bad"
        );
        assert!(c.contains("line 2").unwrap());
        assert_eq!(c.panic_line().unwrap(), None);
    }

    #[test]
    fn a_missing_log_is_empty() {
        let c = Console::new("/nonexistent/kiln/console.log".into(), 0);
        assert_eq!(c.tail(3).unwrap(), "");
        assert!(!c.contains("x").unwrap());
    }

    #[test]
    fn panics_are_found_with_their_line() {
        let log = b"[    1.0] Run /init\n[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n[    1.3] ---[ end\n";
        assert_eq!(panic_line(log).unwrap(), "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)");
    }

    #[test]
    fn scanner_finds_patterns_split_across_reads() {
        let t = tmp("scan");
        let c = Console::new(t.0.clone(), 0);
        let mut s = c.scanner();
        assert_eq!(s.scan("KILN-READY ssh").unwrap(), None);
        append(&t.0, b"booting\nKILN-RE");
        assert_eq!(s.scan("KILN-READY ssh").unwrap(), None);
        append(&t.0, b"ADY ssh port=22\n");
        assert_eq!(s.scan("KILN-READY ssh").unwrap(), Some(Found::Pattern));
        // many lines in between do not make the window grow without bound
        for _ in 0..1000 {
            append(&t.0, b"noise noise noise noise\n");
        }
        assert_eq!(s.scan("never").unwrap(), None);
        assert!(s.window.len() < 100, "window kept {} bytes", s.window.len());
    }

    #[test]
    fn scan_panic_returns_the_line() {
        let t = tmp("scanpanic2");
        let c = Console::new(t.0.clone(), 0);
        let mut s = c.scanner();
        append(&t.0, b"ok\n[ 2.5] Kernel pan");
        assert_eq!(s.scan_panic().unwrap(), None);
        append(&t.0, b"ic - not syncing: oops\n");
        assert_eq!(
            s.scan_panic().unwrap().as_deref(),
            Some("[ 2.5] Kernel panic - not syncing: oops")
        );
    }

    #[test]
    fn scanner_reports_a_panic_before_the_pattern() {
        let t = tmp("scanpanic");
        let c = Console::new(t.0.clone(), 0);
        let mut s = c.scanner();
        append(
            &t.0,
            b"x\nKernel panic - not syncing: Attempted to kill init!\nKILN-READY\n",
        );
        assert_eq!(
            s.scan("KILN-READY").unwrap(),
            Some(Found::Panic(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
    }
}
