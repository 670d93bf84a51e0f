//! The runner: a build is a flat list of typed steps. A step's cleanup is registered the moment
//! it starts, and cleanups run in reverse order whatever happened (success, failure, timeout,
//! cancellation), like Packer's multistep — but the steps share a typed [`BuildCx`] instead of a
//! string-keyed state bag, and cancellation is a token.

use super::context::BuildCx;
use super::events::{Event, SubState};
use super::BuildError;
use async_trait::async_trait;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the run ended, as cleanups see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step succeeded.
    Succeeded,
    /// A step failed (or the deadline passed).
    Failed,
    /// The user cancelled.
    Canceled,
    /// A step failed under `errorHandling: abort`: cleanups keep the build VM, its key and the
    /// staging directory for debugging.
    Aborted,
}

/// What a failed step does to the rest of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Stop, run the cleanups, fail the run (AIB's `cleanup`, the default).
    Stop,
    /// Stop and keep the build VM and staging for debugging (AIB's `errorHandling: abort`).
    Abort,
    /// Go on with the remaining steps; the run still ends Failed with this error
    /// (`validate.continueDistributeOnFailure`).
    Continue,
}

/// One step of a build.
#[async_trait]
pub trait Step: Send {
    /// Its name in events and logs, e.g. `Customize: Shell "setup"`.
    fn name(&self) -> String;
    /// The AIB sub-state it belongs to.
    fn phase(&self) -> SubState;
    /// What a failure of this step does to the run (default: stop and clean up).
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::Stop
    }
    /// What the step will do, as `kiln build --dry-run` prints it: a JSON object of its details
    /// (scripts as they will be sent, transport, timeouts…), computed from the step itself and
    /// the context before anything runs.
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({})
    }
    /// Does the work.
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError>;
    /// Undoes or releases what `run` set up. Called (in reverse order) for every step whose `run`
    /// started, even when it failed half-way.
    async fn cleanup(&mut self, _cx: &mut BuildCx, _outcome: Outcome) {}
}

/// Runs `steps` in order under the context's deadline and cancel token. Returns the first error
/// (a [`FailurePolicy::Continue`] step's error is returned after the remaining steps ran).
pub async fn run_steps(
    steps: Vec<Box<dyn Step>>,
    cx: &mut BuildCx,
    cancel: &CancellationToken,
) -> Result<(), BuildError> {
    let mut started: Vec<Box<dyn Step>> = Vec::new();
    let mut result = Ok(());
    let mut deferred: Option<BuildError> = None;
    let mut aborted = false;
    let mut phase: Option<SubState> = None;
    for (index, mut step) in steps.into_iter().enumerate() {
        if cancel.is_cancelled() {
            result = Err(BuildError::Canceled);
            break;
        }
        if phase != Some(step.phase()) {
            phase = Some(step.phase());
            cx.sub_state = step.phase();
            cx.events.emit(Event::Phase {
                sub_state: step.phase(),
            });
        }
        let name = step.name();
        cx.events.emit(Event::StepStarted {
            index,
            step: name.clone(),
        });
        cx.current_step = name.clone();
        let t0 = Instant::now();
        let deadline = cx.deadline;
        let timeout_minutes = cx.timeout_minutes;
        let r = tokio::select! {
            r = step.run(cx) => r,
            _ = cancel.cancelled() => Err(BuildError::Canceled),
            _ = tokio::time::sleep_until(deadline.into()) => Err(BuildError::Timeout { minutes: timeout_minutes }),
        };
        cx.events.emit(Event::StepFinished {
            index,
            step: name.clone(),
            ok: r.is_ok(),
            seconds: t0.elapsed().as_secs_f64(),
            error: r.as_ref().err().map(|e| e.to_string()),
        });
        let policy = step.failure_policy();
        started.push(step);
        if let Err(e) = r {
            let step_error = !matches!(e, BuildError::Canceled | BuildError::Timeout { .. });
            match policy {
                FailurePolicy::Continue if step_error => {
                    cx.events.warn(format!("{name} failed; continuing (validate.continueDistributeOnFailure): the run will be reported Failed"));
                    deferred.get_or_insert(e);
                    continue;
                }
                FailurePolicy::Abort if step_error => aborted = true,
                _ => {}
            }
            result = Err(e);
            break;
        }
    }
    if let (Ok(()), Some(e)) = (&result, deferred) {
        result = Err(e);
    }
    let outcome = match &result {
        Ok(()) => Outcome::Succeeded,
        Err(BuildError::Canceled) => Outcome::Canceled,
        Err(_) if aborted => Outcome::Aborted,
        Err(_) => Outcome::Failed,
    };
    cx.outcome = Some(outcome);
    for mut step in started.into_iter().rev() {
        step.cleanup(cx, outcome).await;
    }
    result
}
