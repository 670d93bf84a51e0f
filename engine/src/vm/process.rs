//! QEMU as a child process that cannot outlive kiln.
//!
//! - The child is forked from a dedicated thread that lives exactly as long as the child
//!   is unreaped, and (unless spawned [`Tie::Detachable`]) it asks the kernel
//!   (`PR_SET_PDEATHSIG`) for SIGKILL when that thread goes away. So if kiln dies, even
//!   by SIGKILL or `std::process::exit`, its QEMUs die with it. (The parent-death signal
//!   follows the forking *thread*, which is why it may not be a tokio worker or a
//!   `spawn_blocking` thread that could exit first.)
//! - Every live child is in a process-wide registry, so [`kill_all`] can stop them all
//!   (a forced exit).
//! - The child gets its own process group, so a Ctrl-C at the terminal reaches kiln only
//!   and kiln decides how QEMU stops (the shutdown ladder, or a kill).
//! - Signals and reaping never race with pid reuse: the thread waits with
//!   `waitid(WNOWAIT)` (the pid stays a zombie, so it cannot be reused), then reaps under
//!   the same lock that [`ChildProc::kill`] takes before signalling.
//! - Dropping a [`ChildProc`] kills the child and waits (boundedly) for it to be reaped.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

struct Shared {
    pid: Pid,
    /// `Some` once the child has been reaped.
    status: Mutex<Option<ExitStatus>>,
    cv: Condvar,
    tx: watch::Sender<Option<ExitStatus>>,
}

impl Shared {
    /// Sends `signal` unless the child has already been reaped (then does nothing).
    fn signal(&self, signal: Signal) -> io::Result<()> {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if status.is_none() {
            // unreaped: the pid is ours (alive or a zombie), never someone else's
            match kill(self.pid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }
}

/// Whether the child dies with kiln.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tie {
    /// SIGKILL from the kernel when kiln dies (the default for VMs).
    DiesWithKiln,
    /// No parent-death signal, so [`ChildProc::detach`] can leave it running after kiln
    /// exits; it is still killed on drop unless detached.
    Detachable,
}

type Registry = Mutex<Vec<(u64, Weak<Shared>)>>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(Default::default)
}

/// SIGKILLs every child this process spawned that is neither reaped nor detached.
/// Does not wait. For a forced exit; everything else stops VMs through their handles.
pub(crate) fn kill_all() {
    kill_where(|_| true);
}

fn kill_where(select: impl Fn(u64) -> bool) {
    let reg = registry().lock().unwrap_or_else(PoisonError::into_inner);
    for (key, weak) in reg.iter() {
        if let (true, Some(sh)) = (select(*key), weak.upgrade()) {
            let _ = sh.signal(Signal::SIGKILL);
        }
    }
}

/// A running (or exited) child process; see the module documentation.
pub(crate) struct ChildProc {
    pid: Pid,
    /// this child's registry key
    key: u64,
    detached: bool,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The read end of the child's stderr when it was `Stdio::piped()`.
    stderr: Option<ChildStderr>,
    /// How long `Drop` waits for the killed child to be reaped.
    pub(crate) drop_wait: Duration,
}

impl ChildProc {
    /// Spawns `cmd`. `inherit` is a descriptor the child keeps open under the same number
    /// (everything else kiln has open is close-on-exec); it must be ≥ 3, and is closed in
    /// kiln once the child runs.
    pub(crate) fn spawn(
        mut cmd: Command,
        inherit: Option<OwnedFd>,
        tie: Tie,
        thread_name: &str,
    ) -> io::Result<ChildProc> {
        let parent = std::process::id() as libc::pid_t;
        let tied = tie == Tie::DiesWithKiln;
        let fd: Option<RawFd> = inherit.as_ref().map(AsRawFd::as_raw_fd);
        if fd.is_some_and(|fd| fd < 3) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an inherited descriptor must not be 0, 1 or 2",
            ));
        }
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid, fcntl, _exit) on plain integers; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if tied {
                    let sig = libc::SIGKILL as libc::c_ulong;
                    if libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // kiln died between fork and prctl: the signal would never come
                    if libc::getppid() != parent {
                        libc::_exit(127);
                    }
                }
                if let Some(fd) = fd {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.process_group(0);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                drop(inherit);
                let shared = Arc::new(Shared {
                    pid: Pid::from_raw(child.id() as i32),
                    status: Mutex::new(None),
                    cv: Condvar::new(),
                    tx: watch::Sender::new(None),
                });
                let _ = started_tx.send(Ok((shared.clone(), child.stderr.take())));
                reap(child, &shared);
            })?;
        match started_rx.recv() {
            Ok(Ok((shared, stderr))) => {
                static KEYS: AtomicU64 = AtomicU64::new(0);
                let key = KEYS.fetch_add(1, Ordering::Relaxed);
                let mut reg = registry().lock().unwrap_or_else(PoisonError::into_inner);
                reg.retain(|(_, w)| w.strong_count() > 0);
                reg.push((key, Arc::downgrade(&shared)));
                Ok(ChildProc {
                    pid: shared.pid,
                    key,
                    detached: false,
                    shared,
                    thread: Some(thread),
                    stderr,
                    drop_wait: Duration::from_secs(5),
                })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other(
                "the thread that starts QEMU ended before reporting",
            )),
        }
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The child's stderr, when it was `Stdio::piped()` (once).
    pub(crate) fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.stderr.take()
    }

    /// The exit status, once the child has exited and been reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        *self
            .shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `signal` unless the child has already been reaped (then does nothing).
    pub(crate) fn signal(&self, signal: Signal) -> io::Result<()> {
        self.shared.signal(signal)
    }

    /// SIGKILL (unless already reaped).
    pub(crate) fn kill(&self) -> io::Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Blocks until the child is reaped or `timeout` passes.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self
            .shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .shared
            .cv
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }

    /// A receiver that turns `Some` when the child has been reaped.
    pub(crate) fn watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.shared.tx.subscribe()
    }

    /// Leaves the child running: `Drop` and [`kill_all`] no longer touch it. It still dies
    /// with kiln unless spawned [`Tie::Detachable`]. While kiln runs, the thread still
    /// reaps it when it exits.
    pub(crate) fn detach(&mut self) {
        self.detached = true;
        let mut reg = registry().lock().unwrap_or_else(PoisonError::into_inner);
        reg.retain(|(k, _)| *k != self.key);
    }
}

/// Waits for the child to exit without reaping it, then reaps it under the lock.
fn reap(mut child: Child, shared: &Shared) {
    loop {
        match waitid(
            Id::Pid(shared.pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            // ECHILD: not ours to wait for any more; `child.wait` below says what it can
            Err(_) => break,
        }
    }
    let mut status = shared.status.lock().unwrap_or_else(PoisonError::into_inner);
    // `wait` fails only when something else in the process reaped our child; report
    // it as killed rather than leave waiters hanging
    let st = child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
    *status = Some(st);
    shared.tx.send_replace(Some(st));
    shared.cv.notify_all();
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let mut reg = registry().lock().unwrap_or_else(PoisonError::into_inner);
        reg.retain(|(k, _)| *k != self.key);
        drop(reg);
        let _ = self.kill();
        if self.wait_timeout(self.drop_wait).is_some() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // else: the thread reaps the child whenever the kernel lets it go
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn alive(pid: u32) -> bool {
        // a reaped process has no /proc entry (a zombie still has one)
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn exit_status_is_reported_and_the_child_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let p = ChildProc::spawn(cmd, None, Tie::DiesWithKiln, "test-exit").unwrap();
        let st = p.wait_timeout(Duration::from_secs(10)).expect("sh exits");
        assert_eq!(st.code(), Some(7));
        assert!(!alive(p.pid()));
        assert_eq!(*p.watch().borrow(), Some(st));
    }

    #[test]
    fn drop_kills_and_reaps() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = ChildProc::spawn(cmd, None, Tie::DiesWithKiln, "test-drop").unwrap();
        let pid = p.pid();
        assert!(alive(pid));
        assert_eq!(p.wait_timeout(Duration::from_millis(50)), None);
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!alive(pid), "pid {pid} survived the drop");
    }

    #[test]
    fn kill_after_exit_is_harmless() {
        let p =
            ChildProc::spawn(Command::new("true"), None, Tie::DiesWithKiln, "test-true").unwrap();
        let st = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(st.success());
        p.kill().unwrap();
        p.signal(Signal::SIGTERM).unwrap();
    }

    #[test]
    fn the_child_has_its_own_process_group_and_the_inherited_fd() {
        use std::io::Read;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = OwnedFd::from(b);
        let n = fd.as_raw_fd();
        // bash: dash's `>&N` takes one digit only, and the descriptor may well be ≥ 10 when
        // tests run in parallel
        let mut cmd = Command::new("bash");
        // writes "<pgid> <pid>" through the inherited descriptor
        cmd.args(["-c", &format!("echo $(ps -o pgid= -p $$) $$ >&{n}")]);
        let p = ChildProc::spawn(cmd, Some(fd), Tie::DiesWithKiln, "test-fd").unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)).unwrap().success());
        let mut got = String::new();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.read_to_string(&mut got).unwrap(); // EOF: kiln's copy of the child's end is closed
        let ids: Vec<&str> = got.split_whitespace().collect();
        assert_eq!(ids.len(), 2, "{got:?}");
        assert_eq!(ids[0], ids[1], "process group = own pid");
        assert_eq!(ids[1], p.pid().to_string());
    }

    fn sleeper(tie: Tie) -> ChildProc {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        ChildProc::spawn(cmd, None, tie, "test-sleep").unwrap()
    }

    #[test]
    fn kill_all_reaches_registered_children_only() {
        let (a, b) = (sleeper(Tie::DiesWithKiln), sleeper(Tie::DiesWithKiln));
        let mut c = sleeper(Tie::Detachable);
        c.detach();
        let registered: Vec<u64> = registry().lock().unwrap().iter().map(|(k, _)| *k).collect();
        assert!(registered.contains(&a.key) && registered.contains(&b.key));
        assert!(
            !registered.contains(&c.key),
            "a detached child leaves the registry"
        );
        // (other tests' children run in this process too: kill only this test's)
        kill_where(|k| k == a.key || k == b.key || k == c.key);
        for p in [&a, &b] {
            let st = p.wait_timeout(Duration::from_secs(10)).expect("killed");
            assert_eq!(st.signal(), Some(libc::SIGKILL));
        }
        assert_eq!(c.wait_timeout(Duration::from_millis(100)), None);
        assert!(alive(c.pid()));
        // clean up the detached one by hand
        kill(c.pid, Signal::SIGKILL).unwrap();
        assert!(c.wait_timeout(Duration::from_secs(10)).is_some());
    }

    #[test]
    fn a_detached_child_survives_its_handle() {
        let mut p = sleeper(Tie::Detachable);
        let pid = p.pid;
        let st = p.watch();
        p.detach();
        drop(p);
        assert!(alive(pid.as_raw() as u32), "detached: still running");
        assert_eq!(*st.borrow(), None);
        kill(pid, Signal::SIGKILL).unwrap();
        let t = Instant::now();
        while alive(pid.as_raw() as u32) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !alive(pid.as_raw() as u32),
            "the reaper thread still reaps it"
        );
    }

    #[test]
    fn spawn_errors_are_returned() {
        let err = ChildProc::spawn(
            Command::new("/nonexistent/kiln-no-such-program"),
            None,
            Tie::DiesWithKiln,
            "test-missing",
        )
        .err()
        .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
