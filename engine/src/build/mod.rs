//! The build: a template in, a fixed VHD and runOutputs out.
//!
//! [`run_build`] plans a flat list of [`runner::Step`]s from the template (see [`steps`]), runs
//! them under the build deadline and a cancel token, and records the result in the run's
//! directory: `customization.log`, `events.jsonl`, `console.log`, `qemu.stderr`,
//! `runOutputs.json`, the exported VHDs.

pub mod context;
pub mod dry_run;
pub mod events;
pub mod fetch;
pub mod iso;
pub mod ovf;
pub mod runner;
pub mod seed;
pub mod sizes;
pub mod steps;
pub mod steps_distribute;
pub mod steps_source;
pub mod steps_vm;
pub mod steps_windows;
pub mod time;

use context::{BuildCx, BuildOptions};
use events::{Event, Listener, Reporter};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::template::{ApiVersion, ImageTemplate};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The template can't be built as it is.
    #[error("{0}")]
    Template(String),
    /// The source image could not be resolved.
    #[error("source: {0}")]
    Source(String),
    /// Preparing or exporting a disk failed.
    #[error("{what}: {detail}")]
    Disk {
        /// What was being done.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// Fetching or verifying an artifact failed.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// The build VM failed.
    #[error("build VM: {0}")]
    Vm(String),
    /// The guest could not be reached.
    #[error("{0}")]
    Connect(String),
    /// A customizer failed.
    #[error("{step} failed: {message}")]
    Step {
        /// The step's name.
        step: String,
        /// What happened.
        message: String,
    },
    /// An in-VM validation failed.
    #[error("validation {step} failed: {message}")]
    Validation {
        /// The step's name.
        step: String,
        /// What happened.
        message: String,
    },
    /// The build ran past `buildTimeoutInMinutes`.
    #[error(
        "[ERROR] Failed while waiting for packerizer: Timeout waiting for microservice to complete: 'context deadline exceeded' (buildTimeoutInMinutes: {minutes})"
    )]
    Timeout {
        /// The deadline in minutes.
        minutes: u64,
    },
    /// The user cancelled.
    #[error("the build was canceled")]
    Canceled,
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl BuildError {
    /// An I/O error naming what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
        let what = what.into();
        move |source| BuildError::Io { what, source }
    }
}

/// What to build.
pub struct BuildRequest {
    /// The validated, defaulted template.
    pub template: ImageTemplate,
    /// Its API version.
    pub api_version: ApiVersion,
    /// Its name (`--name`, else the file's `name`, else the file stem).
    pub name: String,
    /// Where relative script URIs resolve.
    pub template_dir: PathBuf,
    /// Options.
    pub options: BuildOptions,
}

/// The result of a build.
#[derive(Debug)]
pub struct BuildResult {
    /// The run's id.
    pub run_id: String,
    /// The run's directory.
    pub run_dir: PathBuf,
    /// `Succeeded`, `PartiallySucceeded`, `Failed` or `Canceled` (AIB's runState).
    pub run_state: &'static str,
    /// The run's message (why it failed, or which distributors failed).
    pub message: String,
    /// The source's exactVersion (a resolved `latest`).
    pub exact_version: Option<String>,
    /// The runOutputs, Azure-shaped.
    pub run_outputs: Vec<serde_json::Value>,
    /// The error, if it failed.
    pub error: Option<BuildError>,
}

fn run_id() -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = Sha256::digest(format!("{nanos}-{}", std::process::id()).as_bytes());
    h.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Names the staging directory as AIB names the staging resource group: `IT_<rg>_<template>_<id>`.
pub fn staging_name(resource_group: &str, template: &str, id: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    format!("IT_{}_{}_{}", clean(resource_group), clean(template), id)
}

/// Runs a build to the end. Never panics on a failed build: the result says what happened, the
/// run's directory keeps the logs, and no QEMU is left running (unless `keep_vm_on_error`).
pub async fn run_build(
    req: BuildRequest,
    listener: Option<Listener>,
    cancel: CancellationToken,
) -> Result<BuildResult, BuildError> {
    let id = req.options.run_id.clone().unwrap_or_else(run_id);
    let run_dir = req.options.run_dir.clone().unwrap_or_else(|| {
        req.options.kiln_home.join("staging").join(staging_name(
            &req.options.resource_group,
            &req.name,
            &id,
        ))
    });
    std::fs::create_dir_all(&run_dir).map_err(BuildError::io(format!(
        "creating the run directory {}",
        run_dir.display()
    )))?;
    let events = Reporter::in_dir(&run_dir, listener).map_err(BuildError::io(format!(
        "creating the logs in {}",
        run_dir.display()
    )))?;
    let minutes = u64::from(req.template.properties.build_timeout_in_minutes.max(1));
    let budget = req
        .options
        .timeout_override
        .unwrap_or(Duration::from_secs(minutes * 60));
    let started = Instant::now();
    let req_name = req.name.clone();
    let mut cx = BuildCx::new(
        req,
        id.clone(),
        run_dir.clone(),
        events.clone(),
        started + budget,
        budget.as_secs().div_ceil(60),
    );
    events.emit(Event::RunStarted {
        run_id: id.clone(),
        template: req_name,
        run_dir: run_dir.display().to_string(),
    });
    let plan = steps::plan(&cx)?;
    let result = runner::run_steps(plan, &mut cx, &cancel).await;
    let (state, message) = match &result {
        Ok(()) if !cx.partial_failures.is_empty() => {
            ("PartiallySucceeded", cx.partial_failures.join("; "))
        }
        Ok(()) => ("Succeeded", String::new()),
        Err(BuildError::Canceled) => ("Canceled", "the build was canceled".to_string()),
        Err(e) => ("Failed", e.to_string()),
    };
    events.emit(Event::RunFinished {
        run_state: state.into(),
        message: message.clone(),
        seconds: started.elapsed().as_secs_f64(),
    });
    if let Some(kept) = cx.kept_vm.take() {
        wait_kept_vm(kept, &events, &cancel).await;
    }
    let exact_version = cx.source.as_ref().and_then(|s| s.exact_version.clone());
    Ok(BuildResult {
        run_id: id,
        run_dir,
        run_state: state,
        message,
        exact_version,
        run_outputs: cx.run_outputs,
        error: result.err(),
    })
}

/// A kept build VM runs until the run is canceled (Ctrl-C, `kiln template cancel`) or the VM
/// exits; then it is stopped through the shutdown ladder and its key removed. QEMU never outlives
/// the kiln process that owns it, so nothing is orphaned.
async fn wait_kept_vm(kept: context::KeptVm, events: &Reporter, cancel: &CancellationToken) {
    let v = kept.vm;
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = v.exited() => {}
    }
    let timeouts = crate::vm::ShutdownTimeouts {
        guest: Duration::from_secs(1),
        acpi: Duration::from_secs(5),
        ..Default::default()
    };
    match v.shutdown_ladder(None, timeouts).await {
        Ok(r) => events.info(format!("kept build VM stopped: {}", r.rung)),
        Err(e) => events.warn(format!("stopping the kept build VM: {e}")),
    }
    let _ = std::fs::remove_file(&kept.key_path);
}

#[cfg(test)]
mod tests {
    #[test]
    fn staging_names() {
        assert_eq!(
            super::staging_name("my rg", "t1", "abcd"),
            "IT_my_rg_t1_abcd"
        );
    }
}
