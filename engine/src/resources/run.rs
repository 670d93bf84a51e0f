//! Runs of a stored template: the run row is inserted first (one run at a time per template),
//! the build's events keep `lastRunStatus.runSubState` current, and the result (runState,
//! message, runOutputs, the source's exactVersion) is written when the build ends. The process
//! that executes the build owns the run (its PID is in the row); `kiln template cancel` signals
//! it, and a run whose owner died is marked Failed by the next `kiln` command.

use crate::build::context::{AccelChoice, BuildOptions};
use crate::build::events::{Event, Listener};
use crate::build::sizes::VmShape;
use crate::build::{run_build, BuildRequest, BuildResult};
use crate::store::{RunOutputRow, RunRow, Store, StoreError, TemplateRow};
use crate::template::{ApiVersion, ImageTemplate};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How to run (the CLI's flags).
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The accelerator.
    pub accel: AccelChoice,
    /// Keep the VM after a failure.
    pub keep_vm_on_error: bool,
    /// How long to wait for SSH.
    pub ssh_timeout: Duration,
    /// Extra VM sizes.
    pub vm_sizes: BTreeMap<String, VmShape>,
    /// Overrides buildTimeoutInMinutes.
    pub timeout_override: Option<Duration>,
    /// `--provisioning`: overrides the catalog image's preferred method.
    pub provisioning: Option<crate::build::context::Provisioning>,
    /// `--identity-token-command`: argv whose stdout IMDS serves as the identity token.
    pub identity_token_command: Option<Vec<String>>,
    /// `--disk-bus` (None: the guest OS's default).
    pub disk_bus: Option<crate::vm::DiskBus>,
    /// `--nic-model` (None: the guest OS's default).
    pub nic_model: Option<crate::vm::NicModel>,
}

impl RunSettings {
    /// The build's options: these settings for a template in `resource_group` of
    /// `subscription`; `run` names the run's id and directory (the store allocates them).
    pub fn into_options(
        self,
        kiln_home: std::path::PathBuf,
        resource_group: &str,
        subscription: &str,
        run: Option<(String, std::path::PathBuf)>,
    ) -> BuildOptions {
        let (run_id, run_dir) = run.map_or((None, None), |(i, d)| (Some(i), Some(d)));
        BuildOptions {
            kiln_home,
            resource_group: resource_group.to_string(),
            subscription_id: subscription.to_string(),
            accel: self.accel,
            keep_vm_on_error: self.keep_vm_on_error,
            ssh_timeout: self.ssh_timeout,
            vm_sizes: self.vm_sizes,
            timeout_override: self.timeout_override,
            provisioning: self.provisioning,
            identity_token_command: self.identity_token_command,
            disk_bus: self.disk_bus,
            nic_model: self.nic_model,
            run_id,
            run_dir,
        }
    }
}

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored template cannot be built.
    #[error("{0}")]
    Template(String),
}

/// Starts a run of `t` owned by `pid`: inserts its row (fails when another run is in progress,
/// or the template failed provisioning) and creates its directory in the template's staging.
pub fn start_run(store: &Store, t: &TemplateRow, pid: i64) -> Result<RunRow, RunError> {
    if t.provisioning_state != "Succeeded" {
        let why = t
            .provisioning_error
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(RunError::Template(format!(
            "the template {} is in provisioningState {} ({why}); delete it and create it again once the cause is fixed",
            t.id, t.provisioning_state
        )));
    }
    let staging = super::staging_dir(store, t).ok_or_else(|| {
        RunError::Template(format!("the template {} has no staging directory", t.id))
    })?;
    let run_id = crate::store::short_id();
    let run_dir = staging.join(&run_id);
    std::fs::create_dir_all(&run_dir).map_err(|source| StoreError::Io {
        what: format!("creating {}", run_dir.display()),
        source,
    })?;
    Ok(store.insert_run(&t.id, &run_id, &run_dir, pid)?)
}

fn model_of(t: &TemplateRow) -> Result<(ImageTemplate, ApiVersion), RunError> {
    let api = ApiVersion::parse(&t.api_version)
        .ok_or_else(|| RunError::Template(format!("unknown API version {}", t.api_version)))?;
    let model = serde_json::from_value::<ImageTemplate>(t.normalized.clone()).map_err(|e| {
        RunError::Template(format!(
            "the stored template {} does not fit kiln's model: {e}",
            t.id
        ))
    })?;
    Ok((model, api))
}

/// Executes a started run to its end and records the result. Never leaves the run marked
/// in progress: whatever happens, the row ends Succeeded, PartiallySucceeded, Failed or Canceled.
pub async fn execute_run(
    store: Arc<Mutex<Store>>,
    t: &TemplateRow,
    run: &RunRow,
    settings: RunSettings,
    listener: Option<Listener>,
    cancel: CancellationToken,
) -> Result<BuildResult, RunError> {
    let home = store
        .lock()
        .map(|s| s.home().to_path_buf())
        .map_err(|_| RunError::Template("store lock poisoned".into()))?;
    let finish = |state: &str, message: &str| {
        if let Ok(s) = store.lock() {
            let _ = s.finish_run(&run.id, state, message);
        }
    };
    let (model, api) = match model_of(t) {
        Ok(m) => m,
        Err(e) => {
            finish("Failed", &e.to_string());
            return Err(e);
        }
    };
    let run_id = run.id.clone();
    let s2 = store.clone();
    let inner = listener.clone();
    let tracking: Listener = Arc::new(move |e: &Event| {
        if let Event::Phase { sub_state } = e {
            if let Ok(s) = s2.lock() {
                let _ = s.set_run_sub_state(&run_id, &format!("{sub_state:?}"));
            }
        }
        if let Some(l) = &inner {
            l(e);
        }
    });
    let options = settings.into_options(
        home,
        &t.resource_group,
        &t.subscription,
        Some((run.id.clone(), run.run_dir.clone())),
    );
    let req = BuildRequest {
        template: model,
        api_version: api,
        name: t.name.clone(),
        template_dir: t.template_dir.clone(),
        options,
    };
    match run_build(req, Some(tracking), cancel).await {
        Err(e) => {
            finish("Failed", &e.to_string());
            Err(RunError::Template(e.to_string()))
        }
        Ok(r) => {
            if let Ok(s) = store.lock() {
                for ro in &r.run_outputs {
                    let props = &ro["properties"];
                    let row = RunOutputRow {
                        name: ro["name"].as_str().unwrap_or_default().to_string(),
                        artifact_id: props["artifactId"].as_str().map(str::to_string),
                        artifact_uri: props["artifactUri"].as_str().map(str::to_string),
                        provisioning_state: props["provisioningState"]
                            .as_str()
                            .unwrap_or("Succeeded")
                            .to_string(),
                    };
                    let _ = s.put_run_output(&r.run_id, &row);
                }
                if let Some(x) = &r.exact_version {
                    let _ = s.set_run_exact_version(&r.run_id, x);
                }
                let _ = s.finish_run(&r.run_id, r.run_state, &r.message);
            }
            Ok(r)
        }
    }
}
