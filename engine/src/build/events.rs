//! What a build tells the world while it runs. The engine emits [`Event`]s; the CLI renders them
//! (progress bars, or JSON lines with `--output json`), and the engine itself keeps them with the
//! run: `events.jsonl` (every event) and `customization.log` (AIB's log, in AIB's style).

use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// AIB's `lastRunStatus.runSubState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SubState {
    /// Waiting to start.
    Queued,
    /// Preparing the source, the disk and the build VM.
    Building,
    /// Running customizers (and generalizing).
    Customizing,
    /// Running inVMValidations.
    Validating,
    /// Exporting and publishing.
    Distributing,
}

/// A stream of guest command output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One thing that happened in a build.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    /// The run began.
    #[serde(rename_all = "camelCase")]
    RunStarted {
        /// The run's id.
        run_id: String,
        /// The template's name.
        template: String,
        /// The run's directory (AIB's staging resource group).
        run_dir: String,
    },
    /// The run entered a new AIB sub-state.
    #[serde(rename_all = "camelCase")]
    Phase {
        /// The sub-state.
        sub_state: SubState,
    },
    /// A step started.
    #[serde(rename_all = "camelCase")]
    StepStarted {
        /// Position in the plan.
        index: usize,
        /// The step's name.
        step: String,
    },
    /// A step finished.
    #[serde(rename_all = "camelCase")]
    StepFinished {
        /// Position in the plan.
        index: usize,
        /// The step's name.
        step: String,
        /// Whether it succeeded.
        ok: bool,
        /// How long it took.
        seconds: f64,
        /// Why it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Output of a guest command (one line, or a fragment at the end).
    #[serde(rename_all = "camelCase")]
    Output {
        /// The step that ran it.
        step: String,
        /// Which stream.
        stream: OutStream,
        /// The text.
        line: String,
    },
    /// Something the user should see.
    #[serde(rename_all = "camelCase")]
    Info {
        /// The message.
        message: String,
    },
    /// Something the user must not miss (TCG fallback, large files…).
    #[serde(rename_all = "camelCase")]
    Warning {
        /// The message.
        message: String,
    },
    /// Progress of a long operation (export).
    #[serde(rename_all = "camelCase")]
    Progress {
        /// What is progressing.
        what: String,
        /// Done so far.
        done: u64,
        /// Total.
        total: u64,
    },
    /// The emulated Azure fabric answered (or refused) a guest request.
    #[serde(rename_all = "camelCase")]
    Fabric {
        /// `wire`, `imds` or `dhcp` (kiln's DHCP server; then `method` is the request's
        /// type, `target` the reply, `status` 0 and `agent` the client's MAC).
        endpoint: String,
        /// The method (empty when the request was unreadable).
        method: String,
        /// Path and query.
        target: String,
        /// The status answered.
        status: u16,
        /// Who asked (`x-ms-agent-name` or User-Agent).
        agent: String,
        /// For a health report: `Ready`, `NotReady/Provisioning`, `NotReady/ProvisioningFailed (…)`.
        #[serde(skip_serializing_if = "Option::is_none")]
        health: Option<String>,
        /// Why the request was refused.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The build VM is provisioned and connected.
    #[serde(rename_all = "camelCase")]
    Provisioned {
        /// `azure`, `nocloud`, `unattend`, `none`.
        method: String,
        /// The agent whose health report said Ready (Azure), if one did.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        /// Seconds from QEMU's start to the Ready health report (Azure), if one came.
        #[serde(skip_serializing_if = "Option::is_none")]
        ready_seconds: Option<f64>,
        /// Seconds from QEMU's start to an authenticated SSH session (Windows: WinRM).
        connected_seconds: f64,
        /// The last health report (Azure), if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        health: Option<String>,
    },
    /// A distributor's runOutput was recorded.
    #[serde(rename_all = "camelCase")]
    RunOutput {
        /// The runOutput resource, in Azure's shape.
        run_output: serde_json::Value,
    },
    /// The build VM was kept running after a failure (`errorHandling: abort` or
    /// `--keep-vm-on-error`): how to reach it. Canceling the run stops it.
    #[serde(rename_all = "camelCase")]
    VmKept {
        /// Why it was kept.
        reason: String,
        /// QEMU's pid.
        pid: u32,
        /// The SSH port forwarded on 127.0.0.1.
        ssh_port: u16,
        /// The build user.
        user: String,
        /// The private key that reaches it (deleted when the VM stops).
        key_path: String,
        /// The staging directory, kept until the user deletes it.
        run_dir: String,
    },
    /// The run ended.
    #[serde(rename_all = "camelCase")]
    RunFinished {
        /// AIB's runState: Succeeded, Failed, Canceled.
        run_state: String,
        /// The message (error, if failed).
        message: String,
        /// Total seconds.
        seconds: f64,
    },
}

/// Receives events (the CLI's renderer).
pub type Listener = Arc<dyn Fn(&Event) + Send + Sync>;

/// Fans events out to the run's files and a listener. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Mutex<Sinks>>,
    listener: Option<Listener>,
}

struct Sinks {
    jsonl: Option<BufWriter<File>>,
    log: Option<BufWriter<File>>,
}

fn stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::build::time::rfc3339(secs)
        .replace('T', " ")
        .replace('Z', "")
        .replace('-', "/")
}

impl Reporter {
    /// A reporter that only calls `listener` (tests, dry runs).
    pub fn detached(listener: Option<Listener>) -> Reporter {
        Reporter {
            inner: Arc::new(Mutex::new(Sinks {
                jsonl: None,
                log: None,
            })),
            listener,
        }
    }

    /// A reporter writing `events.jsonl` and `customization.log` into `run_dir`.
    pub fn in_dir(run_dir: &Path, listener: Option<Listener>) -> std::io::Result<Reporter> {
        let jsonl = BufWriter::new(File::create(run_dir.join("events.jsonl"))?);
        let log = BufWriter::new(File::create(run_dir.join("customization.log"))?);
        Ok(Reporter {
            inner: Arc::new(Mutex::new(Sinks {
                jsonl: Some(jsonl),
                log: Some(log),
            })),
            listener,
        })
    }

    /// Emits an event.
    pub fn emit(&self, e: Event) {
        if let Ok(mut s) = self.inner.lock() {
            if let Some(w) = s.jsonl.as_mut() {
                let mut v = serde_json::to_value(&e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("time".into(), serde_json::Value::String(stamp()));
                }
                let _ = writeln!(w, "{v}");
                let _ = w.flush();
            }
            if let Some(w) = s.log.as_mut() {
                for line in log_lines(&e) {
                    let _ = writeln!(w, "[{}] {line}", stamp());
                }
                let _ = w.flush();
            }
        }
        if let Some(l) = &self.listener {
            l(&e);
        }
    }

    /// Shorthand for an info event.
    pub fn info(&self, m: impl Into<String>) {
        self.emit(Event::Info { message: m.into() });
    }

    /// Shorthand for a warning event.
    pub fn warn(&self, m: impl Into<String>) {
        self.emit(Event::Warning { message: m.into() });
    }
}

/// AIB's customization.log is Packer's log: `PACKER OUT` for what Packer shows, `PACKER ERR` for
/// its own log lines with `(telemetry)` markers around each provisioner. kiln writes the same
/// shape so that users' log-scraping habits carry over.
fn log_lines(e: &Event) -> Vec<String> {
    match e {
        Event::RunStarted { run_id, template, run_dir } => vec![
            format!("PACKER OUT ==> kiln: run {run_id} of template {template}"),
            format!("PACKER ERR [INFO] staging directory {run_dir}"),
        ],
        Event::Phase { sub_state } => vec![format!("PACKER ERR [INFO] runSubState {sub_state:?}")],
        Event::StepStarted { step, .. } => {
            let mut v = vec![format!("PACKER ERR [INFO] (telemetry) Starting {}", telemetry_name(step))];
            v.push(format!("PACKER OUT ==> kiln: {step}"));
            v
        }
        Event::StepFinished { step, ok, seconds, error, .. } => {
            let mut v = Vec::new();
            if let Some(err) = error {
                // Step errors already start with "<step> failed: " (BuildError::Step).
                if err.starts_with(&format!("{step} failed: ")) {
                    v.push(format!("PACKER OUT ==> kiln: {err}"));
                } else {
                    v.push(format!("PACKER OUT ==> kiln: {step} failed: {err}"));
                }
            }
            v.push(format!("PACKER ERR [INFO] (telemetry) ending {} ({}, {seconds:.1}s)", telemetry_name(step), if *ok { "ok" } else { "error" }));
            v
        }
        Event::Output { stream, line, .. } => vec![format!(
            "PACKER {}     kiln: {line}",
            if *stream == OutStream::Stdout { "OUT" } else { "ERR" }
        )],
        Event::Info { message } => vec![format!("PACKER OUT ==> kiln: {message}")],
        Event::Warning { message } => vec![format!("PACKER OUT ==> kiln: WARNING: {message}")],
        Event::Progress { .. } => vec![],
        Event::Fabric { endpoint, method, target, status, agent, health, error } => {
            let mut v = vec![format!(
                "PACKER ERR [INFO] fabric {endpoint}: {} {target} -> {status}{}{}",
                if method.is_empty() { "-" } else { method },
                if agent.is_empty() { String::new() } else { format!(" ({agent})") },
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            )];
            if let Some(h) = health {
                v.push(format!("PACKER OUT ==> kiln: health report from {}: {h}", if agent.is_empty() { "the guest" } else { agent }));
            }
            v
        }
        Event::Provisioned { method, agent, ready_seconds, connected_seconds, health } => vec![format!(
            "PACKER OUT ==> kiln: provisioned ({method}){}{}; connected {connected_seconds:.1}s after QEMU started{}",
            agent.as_ref().map(|a| format!(" by {a}")).unwrap_or_default(),
            ready_seconds.map(|s| format!(", Ready after {s:.1}s")).unwrap_or_default(),
            health.as_ref().map(|h| format!(", last health report {h}")).unwrap_or_default()
        )],
        Event::RunOutput { run_output } => vec![format!("PACKER OUT ==> kiln: runOutput {run_output}")],
        Event::VmKept { reason, pid, ssh_port, user, key_path, run_dir } => vec![format!(
            "PACKER OUT ==> kiln: {reason}: the build VM is kept running (QEMU pid {pid}); ssh -i {key_path} -p {ssh_port} {user}@127.0.0.1; staging kept in {run_dir}"
        )],
        Event::RunFinished { run_state, message, seconds } => {
            vec![format!("PACKER OUT ==> kiln: run {run_state} after {seconds:.1}s{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
        }
    }
}

/// `Customize: Shell "setup"` → `provisioner shell`, the way Packer's telemetry names them.
fn telemetry_name(step: &str) -> String {
    let lower = step.to_ascii_lowercase();
    for (k, v) in [
        ("shell", "provisioner shell"),
        ("file", "provisioner file"),
        ("powershell", "provisioner powershell"),
    ] {
        if lower.starts_with(&format!("customize: {k}"))
            || lower.starts_with(&format!("validate: {k}"))
        {
            return v.to_string();
        }
    }
    lower
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_is_named_once_in_the_log() {
        let failed = |error: &str| {
            log_lines(&Event::StepFinished {
                index: 3,
                step: "Customize: PowerShell \"x\"".into(),
                ok: false,
                seconds: 1.0,
                error: Some(error.into()),
            })
        };
        assert_eq!(
            failed("Customize: PowerShell \"x\" failed: exited with 7")[0],
            "PACKER OUT ==> kiln: Customize: PowerShell \"x\" failed: exited with 7"
        );
        assert_eq!(
            failed("no VM")[0],
            "PACKER OUT ==> kiln: Customize: PowerShell \"x\" failed: no VM"
        );
    }
}
