//! Helpers for the benchmark: processes with timestamped output, a tiny HTTP server, console
//! watchers, RSS polling and statistics.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds between two instants (0 if `b` is before `a`).
pub fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs `cmd` and returns the wall time it took (it must exit 0).
pub fn timed(cmd: &mut Command) -> Result<(f64, Output)> {
    let t = Instant::now();
    let out = run_ok(cmd)?;
    Ok((t.elapsed().as_secs_f64(), out))
}

/// A child whose stdout lines are collected with their arrival time.
pub struct Lines {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Lines {
    /// Spawns `cmd` with stdout piped (stderr to `stderr_file`).
    pub fn spawn(cmd: &mut Command, stderr_file: &Path) -> Result<Lines> {
        let err = std::fs::File::create(stderr_file)
            .with_context(|| format!("creating {}", stderr_file.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let out = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push((Instant::now(), line));
            }
        });
        Ok(Lines {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// Waits for the process and its output; returns whether it succeeded.
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        let st = self.child.wait()?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(st)
    }

    /// A copy of the lines so far.
    pub fn snapshot(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }
}

/// Polls a file (a serial console log) for `needle`; `found()` is when it was first seen.
pub struct Watch {
    found: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Watches the file named by `path()` once it is known (`path` is polled too).
    pub fn start(path: Box<dyn Fn() -> Option<PathBuf> + Send>, needle: &'static str) -> Watch {
        let found = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, s2) = (found.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut file: Option<std::fs::File> = None;
            while !s2.load(Ordering::Relaxed) {
                if file.is_none() {
                    if let Some(p) = path() {
                        file = std::fs::File::open(p).ok();
                    }
                }
                if let Some(f) = file.as_mut() {
                    let mut chunk = Vec::new();
                    if f.read_to_end(&mut chunk).is_ok() && !chunk.is_empty() {
                        buf.extend_from_slice(&chunk);
                        if buf.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                            *f2.lock().unwrap() = Some(Instant::now());
                            return;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Watch {
            found,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops watching; returns when the needle was seen.
    pub fn finish(mut self) -> Option<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        *self.found.lock().unwrap()
    }
}

/// Polls `/proc/PID/status` for VmHWM (peak RSS, kB) until stopped; the largest value seen.
pub struct RssPoll {
    peak_kb: Arc<Mutex<u64>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssPoll {
    pub fn start(pid: u32) -> RssPoll {
        let peak_kb = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p2, s2) = (peak_kb.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            while !s2.load(Ordering::Relaxed) {
                let Ok(s) = std::fs::read_to_string(&path) else {
                    break;
                };
                if let Some(kb) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                {
                    let mut p = p2.lock().unwrap();
                    *p = (*p).max(kb);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssPoll {
            peak_kb,
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        *self.peak_kb.lock().unwrap()
    }
}

/// A tiny HTTP/1.0 file server on 127.0.0.1 (GET only), for scriptUri/sourceUri. Runs for the
/// life of the process.
pub fn serve(dir: PathBuf) -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding the HTTP server")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut s = s;
                // read the request head (it may arrive in pieces)
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&head);
                let path = req
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                match std::fs::read(dir.join(&path)) {
                    Ok(body) if !path.contains("..") => {
                        let _ = s.write_all(
                            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .as_bytes(),
                        );
                        let _ = s.write_all(&body);
                    }
                    _ => {
                        let _ = s.write_all(
                            b"HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
                        );
                    }
                }
            });
        }
    });
    Ok(port)
}

/// GET `http://127.0.0.1:port/path` with std only (the floor's download).
pub fn http_get(port: u16, path: &str) -> Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&all[..head_end]);
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET /{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(all[head_end + 4..].to_vec())
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Bytes allocated on disk for `path` (`du --block-size=1`).
pub fn allocated(path: &Path) -> u64 {
    Command::new("du")
        .args(["--block-size=1", "-s"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Median, min, max of `v` (NaN-free).
pub fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((med, s[0], s[n - 1]))
}

/// Deterministic pseudo-random bytes (xorshift), so payloads do not compress or dedupe.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` pseudo-random bytes to `path` in 8 MiB pieces (for the big micro-benchmark files).
pub fn write_random_file(path: &Path, len: u64) -> Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == len)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let chunk = pseudo_random(8 << 20, 0x5eed);
    let mut left = len;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        // vary each piece a little so no two are identical
        let mut piece = chunk[..n].to_vec();
        piece[..8.min(n)].copy_from_slice(&i.to_le_bytes()[..8.min(n)]);
        f.write_all(&piece)?;
        left -= n as u64;
        i += 1;
    }
    f.flush()?;
    Ok(())
}

/// SHA-256 hex of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The machine's 1-minute load average, as `uptime` shows it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Kills a process group leader's child if still running (best effort).
pub fn kill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        assert_eq!(stats(&[]), None);
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
    }

    #[test]
    fn pseudo_random_is_deterministic_and_not_constant() {
        let a = pseudo_random(1000, 7);
        assert_eq!(a.len(), 1000);
        assert_eq!(a, pseudo_random(1000, 7));
        assert_ne!(a, pseudo_random(1000, 8));
        assert!(a.iter().any(|b| *b != a[0]));
    }

    #[test]
    fn http_server_serves_files_and_404s() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f.txt"), b"hello").unwrap();
        let port = serve(dir.clone()).unwrap();
        assert_eq!(http_get(port, "f.txt").unwrap(), b"hello");
        let err = http_get(port, "missing").unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
