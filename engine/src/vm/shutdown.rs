//! The shutdown ladder's types; the ladder itself is [`super::Vm::shutdown_ladder`].
//!
//! Each rung asks more firmly and waits for QEMU to exit (not just for a SHUTDOWN event:
//! the process gone means the disk is flushed and closed):
//!
//! 1. **guest**: the caller's command inside the guest (`shutdown -h now` over SSH, or
//!    the template's own); its session often ends in an error as sshd goes away, so only
//!    QEMU's exit counts. If the command itself fails, kiln waits
//!    [`ShutdownTimeouts::guest_error_grace`] more, not the whole
//!    [`ShutdownTimeouts::guest`].
//! 2. **ACPI**: QMP `system_powerdown`, the power button, pressed again every
//!    [`ShutdownTimeouts::acpi_repeat`] (a guest whose ACPI handler has not started yet
//!    loses a press).
//! 3. **quit**: QMP `quit`; QEMU exits at once (the guest's unflushed writes are lost).
//! 4. **kill**: SIGKILL.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

/// The caller's guest-side shutdown (e.g. `shutdown -h now` over SSH); its error, if any,
/// is reported in [`ShutdownReport::guest_command_error`].
pub type GuestShutdown<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The rung at which QEMU exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownRung {
    /// QEMU had already exited before the ladder began.
    AlreadyExited,
    /// The guest shut down after the caller's guest command.
    Guest,
    /// The guest shut down after the ACPI power button.
    Acpi,
    /// QEMU exited on QMP `quit`.
    Quit,
    /// QEMU was killed with SIGKILL.
    Kill,
}

impl std::fmt::Display for ShutdownRung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShutdownRung::AlreadyExited => "QEMU had already exited",
            ShutdownRung::Guest => "the guest shut down on the guest command",
            ShutdownRung::Acpi => "the guest shut down on the ACPI power button (system_powerdown)",
            ShutdownRung::Quit => "QEMU quit on QMP `quit` (the guest did not shut down)",
            ShutdownRung::Kill => "QEMU was killed (SIGKILL)",
        })
    }
}

/// How long each rung waits for QEMU to exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownTimeouts {
    /// after starting the guest command
    pub guest: Duration,
    /// after the guest command returned an error (bounded by `guest`)
    pub guest_error_grace: Duration,
    /// after the first `system_powerdown`
    pub acpi: Duration,
    /// how often the power button is pressed again during `acpi`: a guest whose ACPI
    /// handler is not running yet (still booting, or just rebooted) loses a press; zero
    /// presses once
    pub acpi_repeat: Duration,
    /// after `quit`
    pub quit: Duration,
    /// after SIGKILL, before giving up with [`super::VmError::Unkillable`]
    pub kill: Duration,
}

impl Default for ShutdownTimeouts {
    /// guest 5 min (Windows may install updates while shutting down), grace 30 s,
    /// ACPI 2 min pressing every 15 s, quit 10 s, kill 10 s.
    fn default() -> Self {
        ShutdownTimeouts {
            guest: Duration::from_secs(300),
            guest_error_grace: Duration::from_secs(30),
            acpi: Duration::from_secs(120),
            acpi_repeat: Duration::from_secs(15),
            quit: Duration::from_secs(10),
            kill: Duration::from_secs(10),
        }
    }
}

impl From<Duration> for ShutdownTimeouts {
    /// Every waiting rung gets `d` (the guest rung, and ACPI pressing every 15 s), the
    /// grace after a failed guest command is at most 30 s, quit and kill 10 s each.
    fn from(d: Duration) -> Self {
        ShutdownTimeouts {
            guest: d,
            guest_error_grace: d.min(Duration::from_secs(30)),
            acpi: d,
            acpi_repeat: Duration::from_secs(15),
            quit: Duration::from_secs(10),
            kill: Duration::from_secs(10),
        }
    }
}

/// A QMP SHUTDOWN event's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownEvent {
    /// whether the guest initiated it
    pub guest: bool,
    /// QEMU's reason (`guest-shutdown`, `host-qmp-quit`, `host-signal`, ...)
    pub reason: String,
}

/// What the ladder did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// the rung at which QEMU exited
    pub rung: ShutdownRung,
    /// QEMU's exit status
    pub exit_status: ExitStatus,
    /// the SHUTDOWN event QEMU sent, if any (none after SIGKILL)
    pub shutdown_event: Option<ShutdownEvent>,
    /// the guest command's error, if it returned one
    pub guest_command_error: Option<String>,
    /// what else went wrong on the way (a QMP command that failed, ...)
    pub notes: Vec<String>,
    /// how long the ladder took
    pub elapsed: Duration,
}

impl std::fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {:.1} s ({}",
            self.rung,
            self.elapsed.as_secs_f64(),
            self.exit_status
        )?;
        if let Some(e) = &self.shutdown_event {
            write!(
                f,
                "; SHUTDOWN {} by the {}",
                e.reason,
                if e.guest { "guest" } else { "host" }
            )?;
        }
        f.write_str(")")?;
        if let Some(e) = &self.guest_command_error {
            write!(f, "; the guest command failed: {e}")?;
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}
