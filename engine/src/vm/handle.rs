//! A running VM: [`Vm`].

use super::accel::Accel;
use super::console::{Console, Found};
use super::port::PortReservation;
use super::process::{ChildProc, Tie};
use super::qemu::{argv, find_qemu, Firmware, Launch, VmSpec};
use super::qmp::{EventKind, Qmp, QmpError, QmpEvent};
use super::shutdown::{
    GuestShutdown, ShutdownEvent, ShutdownReport, ShutdownRung, ShutdownTimeouts,
};
use super::VmError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// How long QEMU may take from exec to its QMP greeting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `start` retries when another program takes the picked port first.
const PORT_ATTEMPTS: u32 = 8;
/// How long a QMP command may take to be answered.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the console is read while waiting for a pattern.
const CONSOLE_POLL: Duration = Duration::from_millis(100);
/// Console lines quoted in errors.
const ERROR_TAIL_LINES: usize = 40;

/// What the VM has been through, from its QMP events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmStatus {
    /// RESET events seen (guest reboots, and resets kiln requested); one reboot of a
    /// BIOS guest is two (SeaBIOS resets again on a warm reset)
    pub resets: u64,
    /// POWERDOWN events seen (ACPI power-button presses delivered)
    pub powerdowns: u64,
    /// the SHUTDOWN event, once QEMU sent one
    pub shutdown: Option<ShutdownEvent>,
    /// whether the VM is paused (a STOP not followed by RESUME)
    pub paused: bool,
    /// the last disk I/O error QEMU reported
    pub io_error: Option<String>,
    /// whether the guest reported a panic (GUEST_PANICKED)
    pub guest_panicked: bool,
    /// the QMP connection ended (QEMU exited): every event before that is counted here
    pub qmp_closed: bool,
}

impl VmStatus {
    fn apply(&mut self, ev: &QmpEvent) {
        match &ev.kind {
            EventKind::Reset { .. } => self.resets += 1,
            EventKind::Powerdown => self.powerdowns += 1,
            EventKind::Shutdown { guest, reason } => {
                self.shutdown = Some(ShutdownEvent {
                    guest: *guest,
                    reason: reason.clone(),
                })
            }
            EventKind::Stop => self.paused = true,
            EventKind::Resume => self.paused = false,
            EventKind::BlockIoError {
                device,
                operation,
                action,
                nospace,
                reason,
            } => {
                self.io_error = Some(format!(
                    "{operation} error on {device}: {reason}{} (QEMU's action: {action})",
                    if *nospace {
                        " (the host file system is full)"
                    } else {
                        ""
                    }
                ))
            }
            EventKind::GuestPanicked => self.guest_panicked = true,
            EventKind::Other => {}
        }
    }
}

/// A running QEMU.
///
/// QEMU never outlives this handle: dropping it kills QEMU (SIGKILL) and reaps it. It
/// never outlives kiln either: QEMU gets SIGKILL from the kernel when kiln dies, however
/// it dies. QEMU runs in its own process group, so a Ctrl-C at the terminal reaches kiln
/// only, and kiln decides how QEMU stops.
pub struct Vm {
    name: String,
    run_dir: PathBuf,
    accel: Accel,
    port: PortReservation,
    qmp: Qmp,
    console: Console,
    stderr_path: PathBuf,
    stderr_start: u64,
    status: watch::Receiver<VmStatus>,
    tracker: JoinHandle<()>,
    started: Instant,
    detachable: bool,
    proc: ChildProc,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("pid", &self.proc.pid())
            .field("ssh_port", &self.port.port())
            .field("run_dir", &self.run_dir)
            .finish_non_exhaustive()
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn read_since(p: &Path, start: u64) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(p) {
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.take(64 << 10).read_to_end(&mut s);
        }
    }
    String::from_utf8_lossy(&s).trim_end().to_string()
}

impl Vm {
    /// Starts QEMU for `spec` and returns once it answered `qmp_capabilities`.
    ///
    /// Creates the run directory, copies the UEFI variable store template there unless
    /// the build already has its copy (a second boot keeps its NVRAM), picks the SSH port
    /// (retrying when another program takes it first), and reports QEMU's stderr when it
    /// fails. Must be called within a tokio runtime.
    pub async fn start(spec: VmSpec) -> Result<Vm, VmError> {
        let name = spec.name.clone();
        let qemu = match &spec.qemu {
            Some(q) => q.clone(),
            None => find_qemu()?,
        };
        let run_dir_err = |path: &Path, source| VmError::RunDir {
            name: name.clone(),
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(|e| run_dir_err(&spec.run_dir, e))?;
        if let Firmware::Uefi { vars_template, .. } = &spec.firmware {
            let vars = spec.uefi_vars_path();
            if !vars.exists() {
                copy_vars(vars_template, &vars).map_err(|e| run_dir_err(&vars, e))?;
            }
        }
        let console_path = spec.console_path();
        let stderr_path = spec.stderr_path();
        let console_start = file_len(&console_path);

        let tie = if spec.detachable {
            Tie::Detachable
        } else {
            Tie::DiesWithKiln
        };
        let mut last_stderr = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            let port = match spec.ssh_port {
                Some(p) => PortReservation::fixed(p),
                None => PortReservation::pick().map_err(|e| VmError::Spawn {
                    name: name.clone(),
                    qemu: qemu.clone(),
                    source: e,
                })?,
            };
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(|e| VmError::Spawn {
                    name: name.clone(),
                    qemu: qemu.clone(),
                    source: e,
                })?;
            let mut theirs = OwnedFd::from(theirs);
            if theirs.as_raw_fd() < 3 {
                // fds 0-2 are the child's stdio; move ours out of the way (F_DUPFD_CLOEXEC ≥ 3)
                theirs = theirs.try_clone().map_err(|e| VmError::Spawn {
                    name: name.clone(),
                    qemu: qemu.clone(),
                    source: e,
                })?;
            }
            let launch = Launch {
                ssh_port: port.port(),
                qmp_fd: theirs.as_raw_fd(),
            };
            let stderr_file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stderr_path)
                .map_err(|e| run_dir_err(&stderr_path, e))?;
            let stderr_start = stderr_file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut cmd = Command::new(&qemu);
            cmd.args(argv(&spec, &launch))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr_file);
            let proc = ChildProc::spawn(cmd, Some(theirs), tie, &format!("kiln-qemu-{name}"))
                .map_err(|e| VmError::Spawn {
                    name: name.clone(),
                    qemu: qemu.clone(),
                    source: e,
                })?;
            let spawn_err = |e| VmError::Spawn {
                name: name.clone(),
                qemu: qemu.clone(),
                source: e,
            };
            ours.set_nonblocking(true).map_err(spawn_err)?;
            let stream = tokio::net::UnixStream::from_std(ours).map_err(spawn_err)?;
            let qmp = match tokio::time::timeout(START_TIMEOUT, Qmp::handshake(stream)).await {
                Ok(Ok(qmp)) => qmp,
                Ok(Err(e)) => {
                    // usually QEMU exited (the socket closed): get its status and words
                    let status = wait_exit(&proc, Duration::from_secs(5)).await;
                    let stderr = read_since(&stderr_path, stderr_start);
                    if status.is_some()
                        && spec.ssh_port.is_none()
                        && stderr.contains("Could not set up host forwarding rule")
                    {
                        last_stderr = stderr;
                        continue;
                    }
                    drop(proc);
                    return Err(VmError::StartFailed {
                        name,
                        run_dir: spec.run_dir.clone(),
                        status: match status {
                            Some(st) => st.to_string(),
                            None => format!("QMP failed: {e}"),
                        },
                        stderr,
                    });
                }
                Err(_) => {
                    drop(proc);
                    return Err(VmError::StartTimeout {
                        name,
                        run_dir: spec.run_dir.clone(),
                        waited: START_TIMEOUT,
                        stderr: read_since(&stderr_path, stderr_start),
                    });
                }
            };
            let (status_tx, status_rx) = watch::channel(VmStatus::default());
            let tracker = tokio::spawn(track(qmp.events(), status_tx));
            return Ok(Vm {
                name,
                run_dir: spec.run_dir.clone(),
                accel: spec.accel,
                port,
                qmp,
                console: Console::new(console_path, console_start),
                stderr_path,
                stderr_start,
                status: status_rx,
                tracker,
                started: Instant::now(),
                detachable: spec.detachable,
                proc,
            });
        }
        Err(VmError::NoFreePort {
            name,
            run_dir: spec.run_dir.clone(),
            attempts: PORT_ATTEMPTS,
            stderr: last_stderr,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The accelerator it runs under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The host port (on 127.0.0.1) forwarded to the guest's port 22.
    pub fn ssh_port(&self) -> u16 {
        self.port.port()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// When [`Vm::start`] returned.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// The QMP session, for commands this type has no method for.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// QMP events from now on (see [`Vm::status`] for what was seen so far).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.qmp.events()
    }

    /// What the VM has been through so far.
    pub fn status(&self) -> VmStatus {
        self.status.borrow().clone()
    }

    /// A receiver that changes with every event kiln tracks.
    pub fn status_watch(&self) -> watch::Receiver<VmStatus> {
        self.status.clone()
    }

    /// RESET events seen. One guest reboot may be more than one RESET (SeaBIOS resets
    /// the machine again on a warm reset), so compare counts with `>` (see
    /// [`Vm::wait_reset_since`]).
    pub fn reboot_count(&self) -> u64 {
        self.status.borrow().resets
    }

    /// QEMU's exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.proc.status()
    }

    /// Resolves with QEMU's exit status when it exits (at once if it has). Independent of
    /// `self`'s lifetime.
    pub fn exited(&self) -> impl std::future::Future<Output = ExitStatus> + Send + 'static {
        let mut rx = self.proc.watch();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(st) => st.unwrap_or_else(|| ExitStatus::from_raw(libc::SIGKILL)),
                // the reaper is gone without a status: only if it panicked
                Err(_) => ExitStatus::from_raw(libc::SIGKILL),
            }
        }
    }

    /// The serial console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// `run_dir/console.log`.
    pub fn console_log_path(&self) -> &Path {
        self.console.path()
    }

    /// The console's last `n` lines from this boot (cleaned for display; empty if the file
    /// cannot be read).
    pub fn console_tail(&self, n: usize) -> String {
        self.console.tail(n).unwrap_or_default()
    }

    /// Whether `pattern` appeared on the console during this boot.
    pub fn console_contains(&self, pattern: &str) -> bool {
        self.console.contains(pattern).unwrap_or(false)
    }

    /// The guest's kernel panic line, if it panicked during this boot.
    pub fn console_panic(&self) -> Option<String> {
        self.console.panic_line().ok().flatten()
    }

    /// What QEMU wrote on stderr since this start.
    pub fn stderr(&self) -> String {
        read_since(&self.stderr_path, self.stderr_start)
    }

    /// Waits until `pattern` appears on the console (this boot), and returns the time since
    /// [`Vm::start`]. Fails early when the kernel panics, the VM pauses, or QEMU exits.
    pub async fn wait_for_console(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<Duration, VmError> {
        let begin = Instant::now();
        let mut scanner = self.console.scanner();
        let mut status = self.status.clone();
        let mut exit = self.proc.watch();
        let waiting_for = || format!("`{pattern}` on the console");
        loop {
            let found = scanner.scan(pattern).map_err(|e| VmError::Console {
                name: self.name.clone(),
                path: self.console.path().to_path_buf(),
                source: e,
            })?;
            match found {
                Some(Found::Pattern) => return Ok(self.started.elapsed()),
                Some(Found::Panic(line)) => {
                    return Err(VmError::GuestPanic {
                        name: self.name.clone(),
                        run_dir: self.run_dir.clone(),
                        line,
                        console: self.console_tail(ERROR_TAIL_LINES),
                    })
                }
                None => {}
            }
            if let Some(st) = self.exit_status() {
                // one last read: the line may have been written just before the exit
                if let Ok(Some(Found::Pattern)) = scanner.scan(pattern) {
                    return Ok(self.started.elapsed());
                }
                return Err(self.exited_error(st, waiting_for()));
            }
            let s = self.status();
            if s.paused {
                return Err(VmError::Paused {
                    name: self.name.clone(),
                    run_dir: self.run_dir.clone(),
                    reason: s
                        .io_error
                        .unwrap_or_else(|| "QMP STOP event; see QEMU's stderr".into()),
                    waiting_for: waiting_for(),
                    stderr: self.stderr(),
                });
            }
            let left = timeout.saturating_sub(begin.elapsed());
            if left.is_zero() {
                return Err(VmError::ConsoleTimeout {
                    name: self.name.clone(),
                    run_dir: self.run_dir.clone(),
                    pattern: pattern.to_string(),
                    waited: timeout,
                    console: self.console_tail(ERROR_TAIL_LINES),
                });
            }
            wake(CONSOLE_POLL.min(left), &mut status, &mut exit).await;
        }
    }

    /// Resolves, with the reason, once waiting for this guest is pointless: QEMU exited,
    /// the guest kernel panicked (console line or GUEST_PANICKED), or the VM paused.
    /// Independent of `self`'s lifetime; pass it to waits that should end early
    /// (e.g. an SSH connect loop).
    pub fn watch(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut exit = self.proc.watch();
        let mut status = self.status.clone();
        let mut scanner = self.console.scanner();
        async move {
            loop {
                if let Some(st) = *exit.borrow_and_update() {
                    return format!("QEMU exited ({st})");
                }
                let s = status.borrow_and_update().clone();
                if s.guest_panicked {
                    return "the guest reported a panic (GUEST_PANICKED)".into();
                }
                if s.paused {
                    return format!(
                        "the VM paused ({})",
                        s.io_error.unwrap_or_else(|| "QMP STOP event".into())
                    );
                }
                if let Ok(Some(line)) = scanner.scan_panic() {
                    return format!("kernel panic on the serial console: {line}");
                }
                wake(CONSOLE_POLL * 2, &mut status, &mut exit).await;
            }
        }
    }

    /// Waits up to `timeout` for a RESET event beyond the first `seen` (a reboot after
    /// [`Vm::reboot_count`] returned `seen`). False on timeout or when QEMU exits first.
    pub async fn wait_reset_since(&self, seen: u64, timeout: Duration) -> bool {
        let mut status = self.status.clone();
        let mut exit = self.proc.watch();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if status.borrow_and_update().resets > seen {
                return true;
            }
            if exit.borrow_and_update().is_some() {
                // the tracker may still be folding the last events in
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), status.wait_for(|s| s.qmp_closed))
                        .await;
                return self.reboot_count() > seen;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            wake(left, &mut status, &mut exit).await;
        }
    }

    /// Leaves QEMU running after this handle (and kiln) is gone, for a user to inspect
    /// (`--keep-vm-on-error`), and returns its pid. Only for a VM started with
    /// [`VmSpec::detachable`]; any other is killed as on drop, and `None` is returned.
    pub fn detach(mut self) -> Option<u32> {
        if !self.detachable {
            return None;
        }
        self.proc.detach();
        Some(self.proc.pid())
    }

    fn exited_error(&self, status: ExitStatus, waiting_for: String) -> VmError {
        VmError::Exited {
            name: self.name.clone(),
            run_dir: self.run_dir.clone(),
            status,
            waiting_for,
            console: self.console_tail(ERROR_TAIL_LINES),
            stderr: self.stderr(),
        }
    }

    /// Runs a QMP command with kiln's command timeout.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        match tokio::time::timeout(QMP_TIMEOUT, self.qmp.execute(command, arguments)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(VmError::Qmp {
                name: self.name.clone(),
                command: command.to_string(),
                source,
            }),
            Err(_) => Err(VmError::QmpTimeout {
                name: self.name.clone(),
                command: command.to_string(),
                waited: QMP_TIMEOUT,
            }),
        }
    }

    /// Presses the ACPI power button (QMP `system_powerdown`); does not wait.
    pub async fn system_powerdown(&self) -> Result<(), VmError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    /// QMP `quit`, then waits up to `timeout` for QEMU to exit.
    pub async fn quit(&self, timeout: Duration) -> Result<ExitStatus, VmError> {
        match self.execute("quit", None).await {
            // QEMU may exit before its reply is read
            Ok(_)
            | Err(VmError::Qmp {
                source: QmpError::Disconnected,
                ..
            }) => {}
            Err(e) if self.exit_status().is_none() => return Err(e),
            Err(_) => {}
        }
        match wait_exit(&self.proc, timeout).await {
            Some(st) => Ok(st),
            None => Err(VmError::QmpTimeout {
                name: self.name.clone(),
                command: "quit (QEMU still running)".into(),
                waited: timeout,
            }),
        }
    }

    /// SIGKILL, then waits (up to 10 s) for QEMU to be reaped.
    pub async fn kill(&self) -> Result<ExitStatus, VmError> {
        self.kill_within(Duration::from_secs(10)).await
    }

    async fn kill_within(&self, timeout: Duration) -> Result<ExitStatus, VmError> {
        let _ = self.proc.kill();
        wait_exit(&self.proc, timeout)
            .await
            .ok_or_else(|| VmError::Unkillable {
                name: self.name.clone(),
                run_dir: self.run_dir.clone(),
                pid: self.pid(),
                waited: timeout,
            })
    }

    /// Stops the VM as gently as it will go: the caller's `guest` command, then the ACPI
    /// power button, then QMP `quit`, then SIGKILL, each waiting for QEMU to exit (see
    /// [`ShutdownTimeouts`]). Returns the rung that worked, for the log. Fails only when
    /// QEMU survives SIGKILL.
    pub async fn shutdown_ladder(
        &self,
        guest: Option<GuestShutdown<'_>>,
        timeouts: impl Into<ShutdownTimeouts>,
    ) -> Result<ShutdownReport, VmError> {
        let timeouts: ShutdownTimeouts = timeouts.into();
        let begin = Instant::now();
        let mut notes = Vec::new();
        let mut guest_error = None;
        if let Some(st) = self.exit_status() {
            return Ok(self
                .report(begin, ShutdownRung::AlreadyExited, st, None, notes)
                .await);
        }

        if let Some(cmd) = guest {
            let exited = self.exited();
            tokio::pin!(exited);
            let mut cmd = Some(cmd);
            let guest_begin = Instant::now();
            let mut deadline = tokio::time::Instant::now() + timeouts.guest;
            let hard_deadline = deadline;
            loop {
                tokio::select! {
                    st = &mut exited => return Ok(self.report(begin, ShutdownRung::Guest, st, guest_error, notes).await),
                    r = async { match cmd.as_mut() { Some(c) => c.await, None => std::future::pending().await } } => {
                        cmd = None;
                        if let Err(e) = r {
                            guest_error = Some(e);
                            deadline = hard_deadline.min(tokio::time::Instant::now() + timeouts.guest_error_grace);
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            if let Some(st) = self.exit_status() {
                // exited right at the deadline, before kiln pressed anything
                return Ok(self
                    .report(begin, ShutdownRung::Guest, st, guest_error, notes)
                    .await);
            }
            notes.push(format!(
                "the guest did not shut down within {:.1} s of the guest command",
                guest_begin.elapsed().as_secs_f64()
            ));
        }

        match self.system_powerdown().await {
            Ok(()) => {
                let end = Instant::now() + timeouts.acpi;
                let mut presses = 1;
                loop {
                    let left = end.saturating_duration_since(Instant::now());
                    let step = if timeouts.acpi_repeat.is_zero() {
                        left
                    } else {
                        left.min(timeouts.acpi_repeat)
                    };
                    if let Some(st) = wait_exit(&self.proc, step).await {
                        return Ok(self
                            .report(begin, ShutdownRung::Acpi, st, guest_error, notes)
                            .await);
                    }
                    if Instant::now() >= end {
                        break;
                    }
                    // a guest still starting its ACPI handler loses earlier presses
                    if self.system_powerdown().await.is_ok() {
                        presses += 1;
                    }
                }
                notes.push(format!(
                    "the guest ignored the ACPI power button ({presses} presses in {:.0} s)",
                    timeouts.acpi.as_secs_f64()
                ));
            }
            Err(e) => {
                if let Some(st) = self.exit_status() {
                    return Ok(self
                        .report(begin, ShutdownRung::Acpi, st, guest_error, notes)
                        .await);
                }
                notes.push(format!("system_powerdown failed: {e}"));
            }
        }

        match self.quit(timeouts.quit).await {
            Ok(st) => {
                return Ok(self
                    .report(begin, ShutdownRung::Quit, st, guest_error, notes)
                    .await)
            }
            Err(e) => notes.push(format!("quit failed: {e}")),
        }

        let st = self.kill_within(timeouts.kill).await?;
        Ok(self
            .report(begin, ShutdownRung::Kill, st, guest_error, notes)
            .await)
    }

    /// The ladder's report, once the events QEMU sent before exiting are folded in.
    async fn report(
        &self,
        begin: Instant,
        rung: ShutdownRung,
        exit_status: ExitStatus,
        guest_command_error: Option<String>,
        notes: Vec<String>,
    ) -> ShutdownReport {
        let mut status = self.status.clone();
        // QEMU has exited, so its socket is at EOF and the tracker is about to finish
        let _ =
            tokio::time::timeout(Duration::from_secs(2), status.wait_for(|s| s.qmp_closed)).await;
        ShutdownReport {
            rung,
            exit_status,
            shutdown_event: self.status().shutdown,
            guest_command_error,
            notes,
            elapsed: begin.elapsed(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.tracker.abort();
        // then `proc` is dropped: it kills and reaps QEMU (unless detached)
    }
}

/// Sleeps up to `max`, waking early when the status or the exit watch changes. A closed
/// channel (the tracker or the reaper finished) no longer wakes it, so this never spins.
async fn wake(
    max: Duration,
    status: &mut watch::Receiver<VmStatus>,
    exit: &mut watch::Receiver<Option<ExitStatus>>,
) {
    let sleep = tokio::time::sleep(max);
    tokio::pin!(sleep);
    let (mut status_open, mut exit_open) = (true, true);
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            r = status.changed(), if status_open => match r {
                Ok(()) => return,
                Err(_) => status_open = false,
            },
            r = exit.changed(), if exit_open => match r {
                Ok(()) => return,
                Err(_) => exit_open = false,
            },
        }
    }
}

/// Waits (asynchronously) up to `timeout` for the child to be reaped.
async fn wait_exit(proc: &ChildProc, timeout: Duration) -> Option<ExitStatus> {
    let mut rx = proc.watch();
    let got = match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
        Ok(Ok(st)) => *st,
        _ => None,
    };
    got.or_else(|| proc.status())
}

/// Folds QMP events into the status watch until the connection ends.
async fn track(mut events: broadcast::Receiver<QmpEvent>, tx: watch::Sender<VmStatus>) {
    loop {
        match events.recv().await {
            Ok(ev) => {
                tx.send_modify(|s| s.apply(&ev));
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    tx.send_modify(|s| s.qmp_closed = true);
}

/// Copies the UEFI variable store template (writable, whatever the template's mode).
fn copy_vars(template: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = to.with_extension("fd.tmp");
    std::fs::copy(template, &tmp).map_err(|e| {
        std::io::Error::new(e.kind(), format!("copying {}: {e}", template.display()))
    })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(name: &str, kind: EventKind) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            kind,
            data: json!({}),
            timestamp: None,
        }
    }

    #[test]
    fn status_folds_events() {
        let mut s = VmStatus::default();
        for e in [
            ev(
                "RESET",
                EventKind::Reset {
                    guest: true,
                    reason: "guest-reset".into(),
                },
            ),
            ev(
                "RESET",
                EventKind::Reset {
                    guest: true,
                    reason: "guest-reset".into(),
                },
            ),
            ev("POWERDOWN", EventKind::Powerdown),
            ev("STOP", EventKind::Stop),
            ev(
                "BLOCK_IO_ERROR",
                EventKind::BlockIoError {
                    device: "os".into(),
                    operation: "write".into(),
                    action: "stop".into(),
                    nospace: true,
                    reason: "No space left on device".into(),
                },
            ),
        ] {
            s.apply(&e);
        }
        assert_eq!(s.resets, 2);
        assert_eq!(s.powerdowns, 1);
        assert!(s.paused);
        assert_eq!(s.io_error.as_deref(), Some("write error on os: No space left on device (the host file system is full) (QEMU's action: stop)"));
        s.apply(&ev("RESUME", EventKind::Resume));
        s.apply(&ev(
            "SHUTDOWN",
            EventKind::Shutdown {
                guest: true,
                reason: "guest-shutdown".into(),
            },
        ));
        assert!(!s.paused);
        assert_eq!(
            s.shutdown,
            Some(ShutdownEvent {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
    }

    #[test]
    fn vars_copy_is_writable_and_atomic() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kiln-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tpl = dir.join("VARS.fd");
        std::fs::write(&tpl, b"vars").unwrap();
        std::fs::set_permissions(&tpl, std::fs::Permissions::from_mode(0o444)).unwrap();
        let to = dir.join("OVMF_VARS.fd");
        copy_vars(&tpl, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"vars");
        assert_eq!(
            std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let err = copy_vars(&dir.join("missing"), &to).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
