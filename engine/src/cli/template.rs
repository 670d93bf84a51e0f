//! `kiln template …`: image templates as resources, shaped like `az image builder`.

use super::build::{listener, spawn_signal_handler};
use super::output::{color_stderr, Format, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use super::res::{self, Out};
use super::validate::load_options;
use kiln_engine::build::context::AccelChoice;
use kiln_engine::build::sizes;
use kiln_engine::resources::run::{execute_run, start_run, RunSettings};
use kiln_engine::resources::{self, CreateRequest};
use kiln_engine::store::{RunRow, Store, StoreError, TemplateRow};
use kiln_engine::template;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Build flags shared by `kiln build`, `template run` and the detached worker.
#[derive(Debug, Clone, clap::Args)]
pub struct RunFlags {
    /// Accelerator: auto (KVM if it really runs a guest, else TCG with a warning), kvm, tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// On failure, keep the build VM running and print how to reach it.
    #[arg(long)]
    pub keep_vm_on_error: bool,
    /// A JSON file of extra VM sizes: {"Standard_X": {"vcpus": 2, "memoryMiB": 4096}}.
    #[arg(long)]
    pub vm_size_map: Option<PathBuf>,
    /// How long to wait for SSH, in seconds (AIB: 1200).
    #[arg(long, default_value_t = 1200)]
    pub ssh_timeout: u64,
    /// How the build VM is provisioned: azure (ovf-env.xml CD + emulated wireserver/IMDS, as on
    /// Azure; Linux and Windows), nocloud (cloud-init seed; Linux), unattend (Unattend.xml on a
    /// USB stick; Windows), none (Linux). Default: the catalog image's preferred method.
    #[arg(long, value_parser = ["azure", "nocloud", "unattend", "none"])]
    pub provisioning: Option<String>,
    /// With azure provisioning: a program (split on white space, run without a shell) whose
    /// stdout (a JSON token response) IMDS serves at /metadata/identity/oauth2/token; the
    /// request's parameters are in KILN_IDENTITY_<NAME> variables. Without it the endpoint
    /// answers an Azure-shaped error.
    #[arg(long, value_name = "PROGRAM")]
    pub identity_token_command: Option<String>,
    /// The build VM's OS disk controller: virtio (virtio-blk), ahci (SATA), ide. Default: virtio
    /// for Linux sources, ahci for Windows sources (Azure's Windows images carry Hyper-V
    /// drivers, not virtio ones; Windows has inbox AHCI drivers).
    #[arg(long, value_parser = ["virtio", "ahci", "sata", "ide"])]
    pub disk_bus: Option<String>,
    /// The build VM's NIC model: virtio-net-pci, e1000, e1000e. Default: virtio-net-pci for
    /// Linux sources, e1000 for Windows sources (Windows has an inbox Intel e1000 driver).
    #[arg(long, value_parser = ["virtio-net-pci", "virtio", "e1000", "e1000e"])]
    pub nic_model: Option<String>,
    /// Override buildTimeoutInMinutes, in seconds (for tests and experiments).
    #[arg(long, hide = true)]
    pub timeout_seconds: Option<u64>,
}

impl RunFlags {
    /// The build settings these flags ask for (a bad --vm-size-map file: usage error).
    pub(crate) fn settings(&self) -> Result<RunSettings, u8> {
        let mut vm_sizes = std::collections::BTreeMap::new();
        if let Some(p) = &self.vm_size_map {
            match std::fs::read(p).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<std::collections::BTreeMap<String, sizes::VmShape>>(&b)
                    .map_err(|e| e.to_string())
            }) {
                Ok(m) => vm_sizes = m,
                Err(e) => {
                    eprintln!("error: --vm-size-map {}: {e}", p.display());
                    return Err(EXIT_USAGE);
                }
            }
        }
        Ok(RunSettings {
            accel: match self.accel.as_str() {
                "kvm" => AccelChoice::Kvm,
                "tcg" => AccelChoice::Tcg,
                _ => AccelChoice::Auto,
            },
            keep_vm_on_error: self.keep_vm_on_error,
            ssh_timeout: Duration::from_secs(self.ssh_timeout),
            vm_sizes,
            timeout_override: self.timeout_seconds.map(Duration::from_secs),
            provisioning: self
                .provisioning
                .as_deref()
                .and_then(kiln_engine::build::context::Provisioning::parse),
            identity_token_command: self
                .identity_token_command
                .as_ref()
                .map(|c| {
                    c.split_ascii_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .filter(|v| !v.is_empty()),
            disk_bus: self
                .disk_bus
                .as_deref()
                .and_then(kiln_engine::vm::DiskBus::parse),
            nic_model: self
                .nic_model
                .as_deref()
                .and_then(kiln_engine::vm::NicModel::parse),
        })
    }

    fn argv(&self) -> Vec<String> {
        let mut v = vec![
            "--accel".to_string(),
            self.accel.clone(),
            "--ssh-timeout".into(),
            self.ssh_timeout.to_string(),
        ];
        if self.keep_vm_on_error {
            v.push("--keep-vm-on-error".into());
        }
        if let Some(p) = &self.vm_size_map {
            v.push("--vm-size-map".into());
            v.push(p.display().to_string());
        }
        if let Some(s) = self.timeout_seconds {
            v.push("--timeout-seconds".into());
            v.push(s.to_string());
        }
        if let Some(p) = &self.provisioning {
            v.push("--provisioning".into());
            v.push(p.clone());
        }
        if let Some(c) = &self.identity_token_command {
            v.push("--identity-token-command".into());
            v.push(c.clone());
        }
        if let Some(b) = &self.disk_bus {
            v.push("--disk-bus".into());
            v.push(b.clone());
        }
        if let Some(n) = &self.nic_model {
            v.push("--nic-model".into());
            v.push(n.clone());
        }
        v
    }
}

/// A template named by resource group and name.
#[derive(Debug, Clone, clap::Args)]
pub struct Named {
    /// Resource group.
    #[arg(short = 'g', long)]
    pub resource_group: String,
    /// Template name.
    #[arg(short = 'n', long)]
    pub name: String,
}

/// `kiln template …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create an image template from a file (AIB's PUT: immutable once created).
    Create {
        #[command(flatten)]
        named: Named,
        /// The template file (bare template, REST body, ARM deployment).
        #[arg(short = 'f', long = "image-template")]
        file: PathBuf,
        /// An ARM parameters file.
        #[arg(long)]
        parameters: Option<PathBuf>,
        /// An ARM parameter, NAME=VALUE (repeatable).
        #[arg(long = "parameter", value_name = "NAME=VALUE")]
        parameter: Vec<String>,
        /// The API version for REST bodies.
        #[arg(long)]
        api_version: Option<String>,
    },
    /// Show a template (Azure's GET imageTemplates JSON, lastRunStatus included).
    Show {
        #[command(flatten)]
        named: Named,
    },
    /// List templates.
    List {
        /// Resource group (default: all).
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// Delete a template and the staging it created.
    Delete {
        #[command(flatten)]
        named: Named,
    },
    /// Run a template's build.
    Run {
        #[command(flatten)]
        named: Named,
        /// Start the build in a detached kiln process and return.
        #[arg(long)]
        no_wait: bool,
        /// Events: human (progress on stderr) or json (JSON lines on stdout).
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
        #[command(flatten)]
        flags: RunFlags,
    },
    /// Cancel the run in progress.
    Cancel {
        #[command(flatten)]
        named: Named,
        /// Return once the cancel was sent, without waiting for the run to end.
        #[arg(long)]
        no_wait: bool,
    },
    /// The template's runs, newest first (kiln's addition: AIB keeps only the last).
    ShowRuns {
        #[command(flatten)]
        named: Named,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// The runOutputs of the last run.
    #[command(subcommand)]
    Output(OutputCommand),
    /// (internal) executes a run started by `run --no-wait`.
    #[command(hide = true)]
    RunWorker {
        /// The run.
        #[arg(long)]
        run_id: String,
        #[command(flatten)]
        flags: RunFlags,
    },
}

/// `kiln template output …`.
#[derive(Debug, clap::Subcommand)]
pub enum OutputCommand {
    /// List the runOutputs (Azure's `{"value": [...]}`).
    List {
        #[command(flatten)]
        named: Named,
    },
    /// Show one runOutput.
    Show {
        #[command(flatten)]
        named: Named,
        /// The runOutputName.
        #[arg(long)]
        output_name: String,
    },
}

fn run_json(r: &RunRow) -> Value {
    json!({
        "runId": r.id, "runState": r.run_state, "runSubState": r.run_sub_state, "message": r.message,
        "startTime": r.start_time, "endTime": r.end_time, "pid": r.pid, "runDir": r.run_dir, "exactVersion": r.exact_version,
    })
}

fn require(store: &Store, sub: &str, n: &Named) -> Result<TemplateRow, u8> {
    store
        .require_template(sub, &n.resource_group, &n.name)
        .map_err(|e| res::fail(&e))
}

/// Runs `kiln template …`.
pub fn run(cmd: Command) -> u8 {
    let store = match res::open() {
        Ok(s) => s,
        Err(c) => return c,
    };
    let sub = match res::subscription(&store) {
        Ok(s) => s,
        Err(c) => return c,
    };
    match cmd {
        Command::Create { named, file, parameters, parameter, api_version } => create(&store, &sub, &named, &file, parameters.as_ref(), &parameter, api_version),
        Command::Show { named } => match require(&store, &sub, &named) {
            Ok(t) => match resources::template_json(&store, &t) {
                Ok(v) => {
                    res::print(&v);
                    EXIT_OK
                }
                Err(e) => res::fail(&e),
            },
            Err(c) => c,
        },
        Command::List { resource_group, output } => {
            if let Some(rg) = &resource_group {
                if let Err(e) = store.require_group(&sub, rg) {
                    return res::fail(&e);
                }
            }
            let list = match store.templates(&sub, resource_group.as_deref()) {
                Ok(l) => l,
                Err(e) => return res::fail(&e),
            };
            match output {
                Out::Json => {
                    let mut values = Vec::new();
                    for t in &list {
                        match resources::template_json(&store, t) {
                            Ok(v) => values.push(v),
                            Err(e) => return res::fail(&e),
                        }
                    }
                    res::print(&json!({ "value": values }));
                }
                Out::Table => {
                    let rows = list
                        .iter()
                        .map(|t| {
                            let last = resources::last_run(&store, t).ok().flatten();
                            vec![
                                t.name.clone(),
                                t.resource_group.clone(),
                                t.location.clone(),
                                t.provisioning_state.clone(),
                                last.as_ref().map(|r| r.run_state.clone()).unwrap_or_default(),
                                last.as_ref().map(|r| r.run_sub_state.clone()).unwrap_or_default(),
                            ]
                        })
                        .collect::<Vec<_>>();
                    res::table(&["Name", "ResourceGroup", "Location", "ProvisioningState", "RunState", "RunSubState"], &rows);
                }
            }
            EXIT_OK
        }
        Command::Delete { named } => match require(&store, &sub, &named) {
            Ok(t) => match resources::delete_template(&store, &t) {
                Ok(removed) => {
                    for d in removed {
                        eprintln!("removed the staging directory {}", d.display());
                    }
                    EXIT_OK
                }
                Err(e) => res::fail(&e),
            },
            Err(c) => c,
        },
        Command::Run { named, no_wait, output, flags } => match require(&store, &sub, &named) {
            Ok(t) => {
                if no_wait {
                    run_detached(&store, &t, &flags)
                } else {
                    run_foreground(store, &t, &flags, output)
                }
            }
            Err(c) => c,
        },
        Command::RunWorker { run_id, flags } => run_worker(store, &run_id, &flags),
        Command::Cancel { named, no_wait } => match require(&store, &sub, &named) {
            Ok(t) => cancel(&store, &t, no_wait),
            Err(c) => c,
        },
        Command::ShowRuns { named, output } => match require(&store, &sub, &named) {
            Ok(t) => match store.runs_of(&t.id) {
                Ok(runs) => {
                    match output {
                        Out::Json => res::print(&json!(runs.iter().map(run_json).collect::<Vec<_>>())),
                        Out::Table => res::table(
                            &["RunId", "RunState", "RunSubState", "StartTime", "EndTime", "Message"],
                            &runs.iter().map(|r| vec![r.id.clone(), r.run_state.clone(), r.run_sub_state.clone(), r.start_time.clone(), r.end_time.clone().unwrap_or_default(), r.message.clone()]).collect::<Vec<_>>(),
                        ),
                    }
                    EXIT_OK
                }
                Err(e) => res::fail(&e),
            },
            Err(c) => c,
        },
        Command::Output(OutputCommand::List { named }) => match require(&store, &sub, &named) {
            Ok(t) => match resources::run_outputs_json(&store, &t) {
                Ok(v) => {
                    res::print(&json!({ "value": v }));
                    EXIT_OK
                }
                Err(e) => res::fail(&e),
            },
            Err(c) => c,
        },
        Command::Output(OutputCommand::Show { named, output_name }) => match require(&store, &sub, &named) {
            Ok(t) => match resources::run_outputs_json(&store, &t) {
                Ok(v) => match v.into_iter().find(|o| o["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(&output_name))) {
                    Some(o) => {
                        res::print(&o);
                        EXIT_OK
                    }
                    None => res::fail(&StoreError::NotFound {
                        code: "ResourceNotFound",
                        message: format!("The Resource 'Microsoft.VirtualMachineImages/imageTemplates/{}/runOutputs/{output_name}' under resource group '{}' was not found.", t.name, t.resource_group),
                    }),
                },
                Err(e) => res::fail(&e),
            },
            Err(c) => c,
        },
    }
}

fn create(
    store: &Store,
    sub: &str,
    named: &Named,
    file: &PathBuf,
    parameters: Option<&PathBuf>,
    pairs: &[String],
    api_version: Option<String>,
) -> u8 {
    let group = match store.require_group(sub, &named.resource_group) {
        Ok(g) => g,
        Err(e) => return res::fail(&e),
    };
    let mut opts = match load_options(
        parameters,
        pairs,
        api_version,
        &named.resource_group,
        &group.location,
    ) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    opts.arm.subscription_id = sub.to_string();
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return EXIT_USAGE;
        }
    };
    let doc = template::load(&file.display().to_string(), &bytes, &opts);
    if !doc.is_valid() {
        let color = color_stderr();
        for d in doc.all_diagnostics() {
            eprintln!("{}", doc.source.render(d, color));
        }
        eprintln!("{}: invalid template; nothing was created", doc.source.name);
        return EXIT_INVALID;
    }
    let t = match doc.templates.as_slice() {
        [t] => t,
        ts => match ts
            .iter()
            .find(|t| t.name.as_deref() == Some(named.name.as_str()))
        {
            Some(t) => t,
            None => {
                eprintln!(
                    "error: the file holds {} image templates and none is named {}",
                    ts.len(),
                    named.name
                );
                return EXIT_USAGE;
            }
        },
    };
    let Some(model) = t.model.clone() else {
        eprintln!("error: internal: a valid template without a model");
        return EXIT_INVALID;
    };
    let dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let template_dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let submitted = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let req = CreateRequest {
        subscription: sub.to_string(),
        resource_group: group.name.clone(),
        name: named.name.clone(),
        submitted,
        normalized: t.normalized.clone(),
        model,
        api_version: t.api_version,
        template_dir,
    };
    match resources::create_template(store, req) {
        Ok(row) => {
            match resources::template_json(store, &row) {
                Ok(v) => res::print(&v),
                Err(e) => return res::fail(&e),
            }
            if row.provisioning_state != "Succeeded" {
                eprintln!(
                    "error: the template was created in provisioningState {}: {}",
                    row.provisioning_state,
                    row.provisioning_error
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                );
                return EXIT_INVALID;
            }
            EXIT_OK
        }
        Err(e) => res::fail(&e),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            EXIT_USAGE
        })
}

fn exit_for(state: &str) -> u8 {
    match state {
        "Succeeded" => EXIT_OK,
        "Canceled" => 130,
        _ => EXIT_INVALID,
    }
}

fn run_foreground(store: Store, t: &TemplateRow, flags: &RunFlags, output: Format) -> u8 {
    let settings = match flags.settings() {
        Ok(s) => s,
        Err(c) => return c,
    };
    let run = match start_run(&store, t, i64::from(std::process::id())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let json = output == Format::Json;
    let (pb, l) = listener(json);
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        spawn_signal_handler(cancel.clone());
        execute_run(
            Arc::new(Mutex::new(store)),
            t,
            &run,
            settings,
            Some(l),
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
            if json {
                println!(
                    "{}",
                    json!({"event": "result", "runId": r.run_id, "runState": r.run_state, "runDir": r.run_dir, "runOutputs": r.run_outputs, "message": r.message})
                );
            } else {
                res::print(&json!({ "value": r.run_outputs }));
                if r.run_state != "Succeeded" {
                    eprintln!(
                        "run {}: {}\n    logs kept in {}",
                        r.run_state,
                        r.message,
                        r.run_dir.display()
                    );
                }
            }
            exit_for(r.run_state)
        }
    }
}

fn run_detached(store: &Store, t: &TemplateRow, flags: &RunFlags) -> u8 {
    if let Err(c) = flags.settings() {
        return c;
    }
    let run = match start_run(store, t, i64::from(std::process::id())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let log = run.run_dir.join("worker.log");
    let spawned = (|| -> std::io::Result<std::process::Child> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["template", "run-worker", "--run-id", &run.id])
            .args(flags.argv())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        use std::os::unix::process::CommandExt;
        // Its own session: the worker outlives this command and the terminal.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        cmd.spawn()
    })();
    match spawned {
        Ok(child) => {
            if let Err(e) = store.set_run_owner(&run.id, i64::from(child.id())) {
                eprintln!("error: {e}");
            }
            eprintln!(
                "run {} of {} started in the background (kiln pid {}); log: {}",
                run.id,
                t.name,
                child.id(),
                log.display()
            );
            eprintln!("    watch: kiln template show -g {} -n {}    cancel: kiln template cancel -g {} -n {}", t.resource_group, t.name, t.resource_group, t.name);
            EXIT_OK
        }
        Err(e) => {
            let _ = store.finish_run(
                &run.id,
                "Failed",
                &format!("could not start the kiln worker: {e}"),
            );
            eprintln!("error: could not start the kiln worker process: {e}");
            EXIT_USAGE
        }
    }
}

fn run_worker(store: Store, run_id: &str, flags: &RunFlags) -> u8 {
    let settings = match flags.settings() {
        Ok(s) => s,
        Err(c) => return c,
    };
    let run = match store.run(run_id) {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("error: no run {run_id}");
            return EXIT_USAGE;
        }
        Err(e) => return res::fail(&e),
    };
    if let Err(e) = store.set_run_owner(run_id, i64::from(std::process::id())) {
        return res::fail(&e);
    }
    let t = match store.template(&run.template_key) {
        Ok(Some(t)) => t,
        _ => {
            let _ = store.finish_run(
                run_id,
                "Failed",
                "the template was deleted before the run started",
            );
            return EXIT_INVALID;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let (_pb, l) = listener(false);
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        spawn_signal_handler(cancel.clone());
        execute_run(
            Arc::new(Mutex::new(store)),
            &t,
            &run,
            settings,
            Some(l),
            cancel.clone(),
        )
        .await
    });
    match result {
        Ok(r) => exit_for(r.run_state),
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_INVALID
        }
    }
}

fn cancel(store: &Store, t: &TemplateRow, no_wait: bool) -> u8 {
    let runs = match store.runs_of(&t.id) {
        Ok(r) => r,
        Err(e) => return res::fail(&e),
    };
    let Some(run) = runs.into_iter().find(RunRow::is_active) else {
        return res::fail(&StoreError::Conflict {
            code: "NoRunInProgress",
            message: format!("the template {} has no run in progress to cancel", t.id),
        });
    };
    if let Err(e) = store.set_run_canceling(&run.id) {
        return res::fail(&e);
    }
    if let Some(pid) = run.pid {
        if kiln_engine::store::runs::owner_alive(Some(pid), run.pid_start) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    eprintln!(
        "canceling run {} (kiln pid {})",
        run.id,
        run.pid.unwrap_or(0)
    );
    if no_wait {
        return EXIT_OK;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match store.run(&run.id) {
            Ok(Some(r)) if !r.is_active() => {
                res::print(&r.last_run_status());
                return EXIT_OK;
            }
            Ok(Some(r)) if !kiln_engine::store::runs::owner_alive(r.pid, r.pid_start) => {
                let _ = store.recover();
            }
            Ok(_) => {}
            Err(e) => return res::fail(&e),
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: run {} did not end within 10 minutes of the cancel",
                run.id
            );
            return EXIT_INVALID;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
