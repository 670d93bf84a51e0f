//! `kiln build --dry-run`: the plan a build would run, printed without booting anything.
//!
//! The plan comes from the same [`super::steps::plan`] the build runs; each step describes
//! itself ([`super::runner::Step::describe`]), so the printed plan cannot drift from the real one.

use super::context::BuildCx;
use super::events::{Event, Reporter, SubState};
use super::runner::FailurePolicy;
use super::{BuildError, BuildRequest};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One planned step.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedStep {
    /// 1-based position.
    pub index: usize,
    /// The step's name, as the build's events name it.
    pub name: String,
    /// Its AIB sub-state.
    pub phase: SubState,
    /// What a failure does.
    pub on_failure: &'static str,
    /// The step's own description.
    pub details: serde_json::Value,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunPlan {
    /// The template's name.
    pub template: String,
    /// `Linux` or `Windows`, and why.
    pub os: String,
    /// Why kiln chose that OS.
    pub os_reason: String,
    /// The build's deadline in minutes.
    pub build_timeout_in_minutes: u64,
    /// What the dry run did not do.
    pub notes: Vec<String>,
    /// Warnings the planner emitted.
    pub warnings: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<PlannedStep>,
}

/// Plans `req` as [`super::run_build`] would, without creating the run directory or booting.
pub fn dry_run(req: BuildRequest) -> Result<DryRunPlan, BuildError> {
    let warnings = Arc::new(Mutex::new(Vec::<String>::new()));
    let w = warnings.clone();
    let listener: super::events::Listener = Arc::new(move |e: &Event| {
        if let Event::Warning { message } = e {
            if let Ok(mut v) = w.lock() {
                v.push(message.clone());
            }
        }
    });
    let id = "dryrun".to_string();
    let run_dir = req.options.run_dir.clone().unwrap_or_else(|| {
        req.options
            .kiln_home
            .join("staging")
            .join(super::staging_name(
                &req.options.resource_group,
                &req.name,
                "<run id>",
            ))
    });
    let minutes = u64::from(req.template.properties.build_timeout_in_minutes.max(1));
    let events = Reporter::detached(Some(listener));
    let cx = BuildCx::new(
        req,
        id,
        run_dir,
        events,
        Instant::now() + Duration::from_secs(minutes * 60),
        minutes,
    );
    let os = super::steps_windows::target_os(&cx);
    let plan = super::steps::plan(&cx)?;
    let steps = plan
        .iter()
        .enumerate()
        .map(|(i, s)| PlannedStep {
            index: i + 1,
            name: s.name(),
            phase: s.phase(),
            on_failure: match s.failure_policy() {
                FailurePolicy::Stop => "stop",
                FailurePolicy::Abort => "abort",
                FailurePolicy::Continue => "continue",
            },
            details: s.describe(&cx),
        })
        .collect();
    let warnings = warnings.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(DryRunPlan {
        template: cx.template_name.clone(),
        os: if os.windows { "Windows".into() } else { "Linux".into() },
        os_reason: os.reason,
        build_timeout_in_minutes: minutes,
        notes: vec![
            "dry run: nothing was fetched, booted or recorded; the source was not resolved (the OS comes from the image catalog or the state store when they know the image, else from the template)".into(),
            "ports, the run id and the per-build credentials are chosen when the build runs".into(),
        ],
        warnings,
        steps,
    })
}

/// The plan as text, for humans: each step with its phase and details, scripts in full.
pub fn render_text(p: &DryRunPlan) -> String {
    let mut out = format!(
        "kiln build --dry-run: {} ({} build: {})\n",
        p.template, p.os, p.os_reason
    );
    out.push_str(&format!(
        "buildTimeoutInMinutes: {}\n",
        p.build_timeout_in_minutes
    ));
    for n in &p.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for s in &p.steps {
        out.push_str(&format!(
            "\n{:>2}. {}  [{:?}, on failure: {}]\n",
            s.index, s.name, s.phase, s.on_failure
        ));
        render_value(&mut out, &s.details, 6);
    }
    out
}

fn render_value(out: &mut String, v: &serde_json::Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if s.contains('\n') => {
                        out.push_str(&format!("{pad}{k}: |\n"));
                        for line in s.trim_end_matches('\n').lines() {
                            out.push_str(&format!("{pad}    {line}\n"));
                        }
                    }
                    serde_json::Value::Object(_) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render_value(out, v, indent + 2);
                    }
                    serde_json::Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        for x in a {
                            out.push_str(&format!("{pad}  -\n"));
                            render_value(out, x, indent + 4);
                        }
                    }
                    serde_json::Value::Array(a)
                        if a.iter().all(|x| x.is_string()) && !a.is_empty() =>
                    {
                        out.push_str(&format!("{pad}{k}:\n"));
                        for x in a {
                            out.push_str(&format!("{pad}  - {}\n", scalar(x)));
                        }
                    }
                    other => out.push_str(&format!("{pad}{k}: {}\n", scalar(other))),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
