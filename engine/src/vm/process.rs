//! QEMU as a child process that cannot outlive kiln.
//!
//! - The child is forked from a dedicated thread that lives exactly as long as the child
//!   is unreaped, and it asks the kernel (`PR_SET_PDEATHSIG`) for SIGKILL when that
//!   thread goes away. So if kiln dies, even by SIGKILL, its QEMUs die with it. (The
//!   parent-death signal follows the forking *thread*, which is why it may not be a tokio
//!   worker or a `spawn_blocking` thread that could exit first.)
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
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

struct Shared {
    /// `Some` once the child has been reaped.
    status: Mutex<Option<ExitStatus>>,
    cv: Condvar,
    tx: watch::Sender<Option<ExitStatus>>,
}

/// A running (or exited) child process; see the module documentation.
pub(crate) struct ChildProc {
    pid: Pid,
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
        thread_name: &str,
    ) -> io::Result<ChildProc> {
        let parent = std::process::id() as libc::pid_t;
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
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // kiln died between fork and prctl: the signal would never come
                if libc::getppid() != parent {
                    libc::_exit(127);
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
        let shared = Arc::new(Shared {
            status: Mutex::new(None),
            cv: Condvar::new(),
            tx: watch::Sender::new(None),
        });
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
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
                let pid = Pid::from_raw(child.id() as i32);
                let _ = started_tx.send(Ok((pid, child.stderr.take())));
                reap(child, pid, &sh);
            })?;
        match started_rx.recv() {
            Ok(Ok((pid, stderr))) => Ok(ChildProc {
                pid,
                shared,
                thread: Some(thread),
                stderr,
                drop_wait: Duration::from_secs(5),
            }),
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
        let status = self
            .shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if status.is_none() {
            // unreaped: the pid is ours (alive or a zombie), never someone else's
            match kill(self.pid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
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
}

/// Waits for the child to exit without reaping it, then reaps it under the lock.
fn reap(mut child: Child, pid: Pid, shared: &Shared) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
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
        let p = ChildProc::spawn(cmd, None, "test-exit").unwrap();
        let st = p.wait_timeout(Duration::from_secs(10)).expect("sh exits");
        assert_eq!(st.code(), Some(7));
        assert!(!alive(p.pid()));
        assert_eq!(*p.watch().borrow(), Some(st));
    }

    #[test]
    fn drop_kills_and_reaps() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = ChildProc::spawn(cmd, None, "test-drop").unwrap();
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
        let p = ChildProc::spawn(Command::new("true"), None, "test-true").unwrap();
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
        let mut cmd = Command::new("sh");
        // writes "<pgid> <pid>" through the inherited descriptor
        cmd.args(["-c", &format!("echo $(ps -o pgid= -p $$) $$ >&{n}")]);
        let p = ChildProc::spawn(cmd, Some(fd), "test-fd").unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)).unwrap().success());
        let mut got = String::new();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.read_to_string(&mut got).unwrap(); // EOF: kiln's copy of the child's end is closed
        let ids: Vec<&str> = got.split_whitespace().collect();
        assert_eq!(ids.len(), 2, "{got:?}");
        assert_eq!(ids[0], ids[1], "process group = own pid");
        assert_eq!(ids[1], p.pid().to_string());
    }

    #[test]
    fn spawn_errors_are_returned() {
        let err = ChildProc::spawn(
            Command::new("/nonexistent/kiln-no-such-program"),
            None,
            "test-missing",
        )
        .err()
        .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
