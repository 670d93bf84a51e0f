//! kiln's VM layer: QEMU processes, their QMP monitors and consoles, the accelerator
//! probe, and the host check.
//!
//! - [`accel`]: [`probe_kvm`] boots a real probe guest under KVM in a child QEMU within a
//!   deadline (a `/dev/kvm` that opens proves little); [`choose_accel`] turns
//!   `--accel auto|kvm|tcg` into an [`Accel`] and, when `auto` falls back to TCG, a
//!   warning the engine must show loudly.
//! - [`qemu`]: [`VmSpec`] and [`qemu::argv`], the pure function from a spec to QEMU's
//!   arguments (argv vectors, never a shell); [`find_qemu`], [`find_ovmf`].
//! - [`Vm`]: a running QEMU. [`Vm::start`] returns once QMP answered; then events and
//!   [`Vm::status`] (resets, SHUTDOWN, pauses, I/O errors), the console
//!   ([`Vm::wait_for_console`], [`Vm::console_tail`], kernel panics), [`Vm::exited`],
//!   [`Vm::watch`] (why waiting for the guest became pointless), and
//!   [`Vm::shutdown_ladder`] (guest command → ACPI → `quit` → SIGKILL, reporting the
//!   rung). QEMU never outlives its `Vm`, nor kiln: the kernel kills it when kiln dies
//!   (unless started [`VmSpec::detachable`] and then [`Vm::detach`]ed).
//! - [`qmp`]: the QMP client.
//! - [`doctor()`]: what `kiln doctor` reports about the host.
//!
//! Files in the run directory: `console.log` (serial console, appended: each `Vm` sees
//! its own boot), `qemu.stderr` (appended), `OVMF_VARS.fd` (UEFI only: the build's
//! variable store, kept across boots of the same build).

pub mod accel;
mod console;
pub mod doctor;
mod handle;
mod port;
mod process;
pub mod qemu;
pub mod qmp;
mod shutdown;

pub use accel::{
    choose_accel, choose_accel_blocking, choose_accel_with, kvm_probe_cached, probe_accel,
    probe_kvm, Accel, AccelProbe, AccelRequest, AccelWarning, KvmUnusable, KVM_PROBE_DEADLINE,
};
pub use console::{Console, KERNEL_PANIC};
pub use doctor::{doctor, CheckState, DoctorCheck, DoctorReport};
pub use handle::{Vm, VmStatus};
pub use qemu::{
    find_ovmf, find_qemu, find_qemu_img, CdromAttach, DiskBus, Firmware, Missing, NetTap, NicModel,
    Ovmf, SeedAttach, VmSpec,
};
pub use qmp::{EventKind, Qmp, QmpError, QmpEvent};
pub use shutdown::{GuestShutdown, ShutdownEvent, ShutdownReport, ShutdownRung, ShutdownTimeouts};

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// SIGKILLs every QEMU this process started that is still running and not detached,
/// without waiting. For a forced exit (a second Ctrl-C) that skips destructors; even
/// without it, the kernel kills kiln's QEMUs when kiln exits (see [`Vm`]).
pub fn kill_all_registered() {
    process::kill_all();
}

/// What went wrong with a VM. Every variant names the VM; those about QEMU's behaviour
/// carry its run directory and what QEMU printed on stderr.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A host program or file is missing.
    #[error(transparent)]
    Missing(#[from] Missing),
    /// The run directory (or a file in it) could not be prepared.
    #[error("VM {name}: cannot prepare {path}: {source}")]
    RunDir {
        /// the VM
        name: String,
        /// the directory or file
        path: PathBuf,
        /// the I/O error
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started at all.
    #[error("VM {name}: cannot start {qemu}: {source}")]
    Spawn {
        /// the VM
        name: String,
        /// the QEMU binary
        qemu: PathBuf,
        /// the I/O error
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited (or closed its monitor) before answering on QMP.
    #[error(
        "VM {name}: QEMU failed to start ({status}); run directory {run_dir}\nQEMU said:\n{stderr}"
    )]
    StartFailed {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// its exit status, or why QMP failed when it is still running
        status: String,
        /// QEMU's stderr from this start
        stderr: String,
    },
    /// Every host port kiln tried for the SSH forward was taken by the time QEMU bound it.
    #[error("VM {name}: no free host port for the SSH forward after {attempts} attempts; run directory {run_dir}\nQEMU said:\n{stderr}")]
    NoFreePort {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// how many ports were tried
        attempts: u32,
        /// QEMU's stderr from the last attempt
        stderr: String,
    },
    /// QEMU did not answer on QMP in time (it was killed).
    #[error("VM {name}: QEMU did not answer on QMP within {waited:?} (killed); run directory {run_dir}\nQEMU said:\n{stderr}")]
    StartTimeout {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// how long kiln waited
        waited: Duration,
        /// QEMU's stderr so far
        stderr: String,
    },
    /// A QMP command failed.
    #[error("VM {name}: QMP `{command}` failed: {source}")]
    Qmp {
        /// the VM
        name: String,
        /// the command
        command: String,
        /// why
        #[source]
        source: QmpError,
    },
    /// A QMP command got no answer in time.
    #[error("VM {name}: QMP `{command}` got no answer within {waited:?}")]
    QmpTimeout {
        /// the VM
        name: String,
        /// the command
        command: String,
        /// how long kiln waited
        waited: Duration,
    },
    /// QEMU exited while kiln was waiting for something else.
    #[error("VM {name}: QEMU exited ({status}) while waiting for {waiting_for}; run directory {run_dir}\n--- console (last lines) ---\n{console}\n--- QEMU stderr ---\n{stderr}")]
    Exited {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// QEMU's exit status
        status: ExitStatus,
        /// what kiln was waiting for
        waiting_for: String,
        /// the end of the console log
        console: String,
        /// QEMU's stderr from this start
        stderr: String,
    },
    /// The guest kernel panicked.
    #[error("VM {name}: the guest kernel panicked: {line}; run directory {run_dir}\n--- console (last lines) ---\n{console}")]
    GuestPanic {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// the panic line
        line: String,
        /// the end of the console log
        console: String,
    },
    /// The VM stopped running (paused) and will not continue by itself.
    #[error("VM {name}: the VM paused ({reason}) while waiting for {waiting_for}; run directory {run_dir}\n--- QEMU stderr ---\n{stderr}")]
    Paused {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// the I/O error, KVM error or other cause, as far as kiln knows it
        reason: String,
        /// what kiln was waiting for
        waiting_for: String,
        /// QEMU's stderr from this start
        stderr: String,
    },
    /// A console pattern did not appear in time.
    #[error("VM {name}: `{pattern}` did not appear on the console within {waited:?}; run directory {run_dir}\n--- console (last lines) ---\n{console}")]
    ConsoleTimeout {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// what kiln looked for
        pattern: String,
        /// how long it waited
        waited: Duration,
        /// the end of the console log
        console: String,
    },
    /// The console log could not be read.
    #[error("VM {name}: cannot read the console log {path}: {source}")]
    Console {
        /// the VM
        name: String,
        /// the log file
        path: PathBuf,
        /// the I/O error
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not exit even after SIGKILL (stuck in the kernel, e.g. on a hung NFS).
    #[error("VM {name}: QEMU (pid {pid}) did not exit within {waited:?} of SIGKILL; run directory {run_dir}")]
    Unkillable {
        /// the VM
        name: String,
        /// the run directory
        run_dir: PathBuf,
        /// QEMU's pid
        pid: u32,
        /// how long kiln waited after the signal
        waited: Duration,
    },
}
