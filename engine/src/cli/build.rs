//! `kiln build`: one command from an AIB template to a fixed VHD and its runOutput.

use super::output::{color_stderr, Format, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use super::validate::load_options;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_engine::build::events::{Event, Listener};
use kiln_engine::resources::run::{execute_run, start_run, RunSettings};
use kiln_engine::resources::{self, CreateRequest};
use kiln_engine::template;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `kiln build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The template (bare, REST body, ARM deployment).
    pub template: PathBuf,
    /// An ARM parameters file.
    #[arg(long)]
    pub parameters: Option<PathBuf>,
    /// An ARM parameter, NAME=VALUE (repeatable).
    #[arg(short = 'p', long = "parameter", value_name = "NAME=VALUE")]
    pub parameter: Vec<String>,
    /// The API version for REST bodies.
    #[arg(long)]
    pub api_version: Option<String>,
    /// The template's name (default: its `name`, else the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// The resource group (names the staging directory `IT_<rg>_<template>_<id>`).
    #[arg(long, short = 'g', default_value = "kiln")]
    pub resource_group: String,
    /// Output: human (progress on stderr, runOutput JSON on stdout) or json (events as JSON lines).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
    /// How the build VM runs (accelerator, provisioning, devices, timeouts).
    #[command(flatten)]
    pub run: super::template::RunFlags,
    /// Print the plan (every step with its phase and details: transport, scripts as sent,
    /// restarts, distributors) and exit without fetching, booting or recording anything.
    #[arg(long)]
    pub dry_run: bool,
}

fn render_human(pb: &ProgressBar, e: &Event, color: bool) {
    let (y, d, r) = if color {
        ("\x1b[33;1m", "\x1b[2m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    match e {
        Event::RunStarted {
            run_id,
            template,
            run_dir,
        } => pb.println(format!(
            "==> kiln: building {template} (run {run_id})\n    logs: {run_dir}"
        )),
        Event::Phase { sub_state } => pb.set_prefix(format!("{sub_state:?}")),
        Event::StepStarted { step, .. } => {
            pb.set_message(step.clone());
            pb.println(format!("==> {step}"));
        }
        Event::StepFinished {
            ok: false,
            error: Some(err),
            step,
            ..
        } => pb.println(format!("==> {step}: FAILED: {err}")),
        Event::StepFinished { .. } => {}
        Event::Output { line, .. } => pb.println(format!("    {d}{line}{r}")),
        Event::Info { message } => pb.println(format!("    {message}")),
        Event::Warning { message } => pb.println(format!("{y}WARNING{r}: {message}")),
        Event::Progress { what, done, total } if *total > 0 => {
            pb.set_message(format!("{what} {}%", done * 100 / total))
        }
        Event::Progress { .. } | Event::RunOutput { .. } | Event::VmKept { .. } => {}
        Event::Fabric { .. } | Event::Provisioned { .. } => {
            if let Some(line) = fabric_line(e) {
                pb.println(line)
            }
        }
        Event::RunFinished {
            run_state,
            seconds,
            message,
        } => pb.println(format!(
            "==> run {run_state} in {seconds:.1}s{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        )),
    }
}

/// Runs `kiln build`.
pub fn run(a: Args) -> u8 {
    let mut opts = match load_options(
        a.parameters.as_ref(),
        &a.parameter,
        a.api_version.clone(),
        &a.resource_group,
        "local",
    ) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    // A dry run records nothing: no store.
    let store = if a.dry_run {
        None
    } else {
        let store = match super::res::open() {
            Ok(s) => s,
            Err(c) => return c,
        };
        opts.arm.subscription_id = match super::res::subscription(&store) {
            Ok(s) => s,
            Err(c) => return c,
        };
        Some(store)
    };
    let bytes = match std::fs::read(&a.template) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", a.template.display());
            return EXIT_USAGE;
        }
    };
    let doc = template::load(&a.template.display().to_string(), &bytes, &opts);
    let color = color_stderr();
    if !doc.is_valid() {
        for d in doc.all_diagnostics() {
            eprintln!("{}", doc.source.render(d, color));
        }
        eprintln!("{}: invalid template; nothing was built", doc.source.name);
        return EXIT_INVALID;
    }
    let t = match doc.templates.as_slice() {
        [t] => t,
        ts => match a
            .name
            .as_ref()
            .and_then(|n| ts.iter().find(|t| t.name.as_deref() == Some(n)))
        {
            Some(t) => t,
            None => {
                eprintln!(
                    "error: the file holds {} image templates; pick one with --name",
                    ts.len()
                );
                return EXIT_USAGE;
            }
        },
    };
    let Some(model) = t.model.clone() else {
        eprintln!("error: internal: a valid template without a model");
        return EXIT_INVALID;
    };
    let name = a
        .name
        .clone()
        .or_else(|| t.name.clone())
        .unwrap_or_else(|| {
            a.template
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "template".into())
        });
    let template_dir = a
        .template
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let template_dir = std::fs::canonicalize(&template_dir).unwrap_or(template_dir);
    let settings = match a.run.settings() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if a.dry_run {
        return dry_run(
            &a,
            model,
            t.api_version,
            name,
            template_dir,
            &opts.arm.subscription_id,
            settings,
        );
    }
    let Some(store) = store else {
        return EXIT_USAGE;
    };
    // The one-shot path records into the store too: the template (created, or replaced when the
    // file changed), the run, its runOutputs.
    let sub = opts.arm.subscription_id.clone();
    if let Err(e) = store.group(&sub, &a.resource_group).and_then(|g| match g {
        Some(g) => Ok(g),
        None => store.create_group(
            &sub,
            &a.resource_group,
            &model.location,
            &serde_json::json!({}),
            None,
        ),
    }) {
        return super::res::fail(&e);
    }
    let submitted = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    let req = CreateRequest {
        subscription: sub,
        resource_group: a.resource_group.clone(),
        name,
        submitted,
        normalized: t.normalized.clone(),
        model,
        api_version: t.api_version,
        template_dir,
    };
    let row = match resources::register_for_build(&store, req) {
        Ok(r) => r,
        Err(e) => return super::res::fail(&e),
    };
    let run = match start_run(&store, &row, i64::from(std::process::id())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };

    let json = a.output == Format::Json;
    let (pb, listener) = listener(json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            let _ = store.finish_run(
                &run.id,
                "Failed",
                &format!("cannot start the async runtime: {e}"),
            );
            return EXIT_USAGE;
        }
    };
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        spawn_signal_handler(cancel.clone());
        execute_run(
            Arc::new(Mutex::new(store)),
            &row,
            &run,
            settings,
            Some(listener),
            cancel.clone(),
        )
        .await
    });
    pb.finish_and_clear();
    match result {
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_INVALID
        }
        Ok(r) => {
            if !json {
                for ro in &r.run_outputs {
                    println!("{}", serde_json::to_string_pretty(ro).unwrap_or_default());
                }
            } else {
                println!(
                    "{}",
                    serde_json::json!({"event": "result", "runId": r.run_id, "runState": r.run_state, "runDir": r.run_dir, "runOutputs": r.run_outputs, "message": r.message, "error": r.error.as_ref().map(|e| e.to_string())})
                );
            }
            if r.run_state == "Succeeded" {
                EXIT_OK
            } else {
                if !json {
                    eprintln!(
                        "build {}: {}\n    logs kept in {}",
                        r.run_state,
                        r.message,
                        r.run_dir.display()
                    );
                }
                if r.run_state == "Canceled" {
                    130
                } else {
                    EXIT_INVALID
                }
            }
        }
    }
}

/// `--dry-run`: the plan from the build's own planner, as text or JSON on stdout.
fn dry_run(
    a: &Args,
    model: template::model::ImageTemplate,
    api_version: template::ApiVersion,
    name: String,
    template_dir: PathBuf,
    subscription: &str,
    settings: RunSettings,
) -> u8 {
    use kiln_engine::build::{dry_run, BuildRequest};
    use std::io::Write;
    let options = settings.into_options(
        kiln_engine::home::kiln_home(),
        &a.resource_group,
        subscription,
        None,
    );
    let req = BuildRequest {
        template: model,
        api_version,
        name,
        template_dir,
        options,
    };
    match dry_run::dry_run(req) {
        Ok(plan) => {
            let text = if a.output == Format::Json {
                serde_json::to_string_pretty(&plan).unwrap_or_default() + "\n"
            } else {
                dry_run::render_text(&plan)
            };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(text.as_bytes());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_INVALID
        }
    }
}

/// The event renderer of a build: JSON lines on stdout, or progress on stderr.
pub fn listener(json: bool) -> (ProgressBar, Listener) {
    let color = color_stderr();
    let pb = ProgressBar::new_spinner();
    if json || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix:.bold} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
    }
    let hidden = pb.is_hidden();
    let pb2 = pb.clone();
    let listener: Listener = Arc::new(move |e: &Event| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else if hidden {
            // No terminal (CI, pipes): plain lines on stderr, no bars.
            eprint!("{}", plain(e, color));
        } else {
            render_human(&pb2, e, color);
        }
    });
    (pb, listener)
}

/// Ctrl-C or SIGTERM (`kiln template cancel`) cancels the build; a second one exits at once.
pub fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        let first = tokio::select! {
            r = tokio::signal::ctrl_c() => r.is_ok().then_some("Ctrl-C"),
            r = term.recv() => r.map(|_| "SIGTERM"),
        };
        if let Some(what) = first {
            eprintln!(
                "\n==> {what}: canceling the build (cleaning up; press Ctrl-C again to force)"
            );
            cancel.cancel();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("==> forced exit");
            std::process::exit(130);
        }
    });
}

/// One event as plain text lines (no terminal).
fn plain(e: &Event, color: bool) -> String {
    let mut out = String::new();
    let (y, r) = if color {
        ("\x1b[33;1m", "\x1b[0m")
    } else {
        ("", "")
    };
    match e {
        Event::RunStarted {
            run_id,
            template,
            run_dir,
        } => out.push_str(&format!(
            "==> kiln: building {template} (run {run_id})\n    logs: {run_dir}\n"
        )),
        Event::StepStarted { step, .. } => out.push_str(&format!("==> {step}\n")),
        Event::StepFinished {
            ok: false,
            error: Some(err),
            step,
            ..
        } => out.push_str(&format!("==> {step}: FAILED: {err}\n")),
        Event::Output { line, .. } => out.push_str(&format!("    {line}\n")),
        Event::Info { message } => out.push_str(&format!("    {message}\n")),
        Event::Warning { message } => out.push_str(&format!("{y}WARNING{r}: {message}\n")),
        Event::Fabric { .. } | Event::Provisioned { .. } => {
            if let Some(line) = fabric_line(e) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        Event::RunFinished {
            run_state,
            seconds,
            message,
        } => out.push_str(&format!(
            "==> run {run_state} in {seconds:.1}s{}\n",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        )),
        _ => {}
    }
    out
}

/// Health reports, refused requests and the provisioning outcome (not every fabric request).
fn fabric_line(e: &Event) -> Option<String> {
    match e {
        Event::Fabric { health: Some(h), agent, .. } => Some(format!("    health report from {}: {h}", if agent.is_empty() { "the guest" } else { agent })),
        // kiln's DHCP (Azure's options): each lease given, and requests it dropped.
        Event::Fabric { endpoint, method, target, agent, error: None, .. } if endpoint == "dhcp" && target.starts_with("ACK") => {
            Some(format!("    DHCP {method} from {agent}: {target}"))
        }
        Event::Fabric { endpoint, error: Some(err), .. } if endpoint == "dhcp" => Some(format!("    DHCP: {err}")),
        Event::Fabric { endpoint, method, target, status, error: Some(err), .. } if *status >= 400 && *status != 404 => {
            Some(format!("    fabric {endpoint}: {} {target} -> {status}: {err}", if method.is_empty() { "-" } else { method }))
        }
        Event::Provisioned { method, agent, ready_seconds, connected_seconds, .. } => Some(format!(
            "    provisioned ({method}){}{}; SSH connected {connected_seconds:.1}s after QEMU started",
            agent.as_ref().map(|a| format!(" by {a}")).unwrap_or_default(),
            ready_seconds.map(|s| format!(", health Ready after {s:.1}s")).unwrap_or_default()
        )),
        _ => None,
    }
}
