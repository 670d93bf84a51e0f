//! Image templates as resources, with AIB's semantics, on top of the [`crate::store`]:
//! creation (immutability, staging resource group rules, source checks), the Azure-shaped JSON
//! of `GET imageTemplates` and `runOutputs`, deletion (the staging it created, and only that),
//! and runs ([`run`]).

pub mod run;

use crate::store::{ids, RunRow, Store, StoreError, TemplateRow};
use crate::template::model::Source;
use crate::template::{ApiVersion, ImageTemplate};
use serde_json::{json, Value};
use std::path::PathBuf;

/// What a template creation needs.
pub struct CreateRequest {
    /// Subscription.
    pub subscription: String,
    /// Resource group (must exist).
    pub resource_group: String,
    /// Template name.
    pub name: String,
    /// The file's text as submitted.
    pub submitted: Value,
    /// The normalized template.
    pub normalized: Value,
    /// The typed template.
    pub model: ImageTemplate,
    /// Its API version.
    pub api_version: ApiVersion,
    /// Where relative script paths resolve.
    pub template_dir: PathBuf,
}

/// The properties that may change after creation under `api` (AIB: from 2024-02-01, `tags`,
/// `vmProfile` and `distribute` through PATCH; before, none).
pub fn updatable_properties(api: ApiVersion) -> &'static [&'static str] {
    if api.as_str() >= "2024-02-01" {
        &["vmProfile", "distribute"]
    } else {
        &[]
    }
}

fn immutable_view(normalized: &Value, api: ApiVersion) -> Value {
    let mut v = normalized.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("apiVersion");
        o.remove("name");
        if api.as_str() >= "2024-02-01" {
            o.remove("tags");
        }
        if let Some(p) = o.get_mut("properties").and_then(Value::as_object_mut) {
            for k in updatable_properties(api) {
                p.remove(*k);
            }
        }
    }
    v
}

fn error_value(code: &str, message: &str) -> Value {
    json!({"provisioningErrorCode": code, "message": message})
}

/// Checks `stagingResourceGroup` by AIB's rules. Returns (staging group name, created by kiln).
fn staging_for(store: &Store, req: &CreateRequest) -> Result<(String, bool), (String, String)> {
    let given = req
        .model
        .properties
        .staging_resource_group
        .clone()
        .filter(|s| !s.trim().is_empty());
    let Some(given) = given else {
        return Ok((
            crate::build::staging_name(&req.resource_group, &req.name, &crate::store::short_id()),
            true,
        ));
    };
    let bad = |m: String| ("BadStagingResourceGroup".to_string(), m);
    let id = ids::ResourceId::parse(&format!("{given}/providers/x/y/z"))
        .filter(|_| given.trim_matches('/').split('/').count() == 4)
        .ok_or_else(|| bad(format!("stagingResourceGroup `{given}` is not a resource group ID (/subscriptions/SUB/resourceGroups/NAME)")))?;
    if !id.subscription.eq_ignore_ascii_case(&req.subscription) {
        return Err(bad(format!(
            "stagingResourceGroup `{given}` must be in the template's subscription {}",
            req.subscription
        )));
    }
    let name = id.resource_group;
    if let Ok(Some(other)) = store.template_with_staging(&name) {
        return Err(bad(format!("the staging resource group `{name}` is already used by the image template {other}; each template needs its own")));
    }
    match store.group(&req.subscription, &name) {
        Ok(Some(g)) => {
            if !crate::build::steps_source::region_key(&g.location)
                .eq(&crate::build::steps_source::region_key(&req.model.location))
            {
                return Err(bad(format!("the staging resource group `{name}` is in `{}`; it must be in the template's region `{}`", g.location, req.model.location)));
            }
            let contents = store
                .group_contents(&req.subscription, &name)
                .unwrap_or_default();
            let dir = store.staging_root().join(&name);
            let dir_empty = std::fs::read_dir(&dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true);
            if !contents.is_empty() || !dir_empty {
                return Err(bad(format!("the staging resource group `{name}` exists and is not empty; AIB needs an empty or new resource group")));
            }
            Ok((g.name, false))
        }
        _ => Ok((name, true)),
    }
}

fn check_source(store: &Store, model: &ImageTemplate) -> Option<(String, String)> {
    match &model.properties.source {
        Source::ManagedImage { image_id } => match store.image(image_id) {
            Ok(Some(_)) => None,
            _ => Some(("BadManagedImageSource".into(), format!("the source managed image {image_id} does not exist (`kiln image list` shows managed images)"))),
        },
        Source::SharedImageVersion { image_version_id } => {
            let latest = image_version_id.trim_end_matches('/').rsplit('/').next().is_some_and(|v| v.eq_ignore_ascii_case("latest"));
            let def_id = image_version_id.trim().trim_end_matches('/').rsplit_once('/').and_then(|(a, _)| a.rsplit_once('/')).map(|(a, _)| a.to_string()).unwrap_or_default();
            let ok = if latest { matches!(store.definition(&def_id), Ok(Some(_))) } else { matches!(store.version(image_version_id), Ok(Some(_))) };
            (!ok).then(|| ("BadSharedImageVersionSource".into(), format!("the source image version {image_version_id} does not exist (`kiln sig image-version list`)")))
        }
        Source::PlatformImage { .. } => None,
    }
}

/// Creates a template (AIB's PUT). An existing template with the same properties is returned
/// unchanged; with other properties it is an error (templates are immutable), except the
/// properties [`updatable_properties`] allows. Source and staging problems create the template in
/// `provisioningState: Failed` with AIB's `provisioningError`, as AIB does.
pub fn create_template(store: &Store, req: CreateRequest) -> Result<TemplateRow, StoreError> {
    store.require_group(&req.subscription, &req.resource_group)?;
    if req.name.is_empty()
        || req.name.len() > 64
        || !req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(StoreError::Conflict {
            code: "InvalidTemplateName",
            message: format!(
                "image template name `{}`: 1-64 of A-Z a-z 0-9 - _ .",
                req.name
            ),
        });
    }
    let id = ids::template_id(&req.subscription, &req.resource_group, &req.name);
    if let Some(old) = store.template(&id)? {
        let api = req.api_version;
        if immutable_view(&old.normalized, api) != immutable_view(&req.normalized, api) {
            return Err(StoreError::Conflict {
                code: "TemplateImmutable",
                message: format!(
                    "Update/Upgrade of image templates is currently not supported. Please change the name of the template you are submitting. (the template {id} exists with other properties{}; delete it first with `kiln template delete -g {} -n {}`, or create the new one under another name)",
                    if updatable_properties(api).is_empty() { String::new() } else { format!("; under {} only tags, vmProfile and distribute may change", api.as_str()) },
                    req.resource_group,
                    req.name
                ),
            });
        }
        if old.normalized != req.normalized {
            if store.runs_of(&id)?.iter().any(RunRow::is_active) {
                return Err(StoreError::Conflict {
                    code: "Conflict",
                    message: format!(
                        "the template {id} is running; update it when the run has ended"
                    ),
                });
            }
            let mut row = old.clone();
            row.normalized = req.normalized;
            row.submitted = req.submitted;
            row.api_version = req.api_version.as_str().to_string();
            store.update_template(&row)?;
            return store.template(&id)?.ok_or_else(|| StoreError::NotFound {
                code: "ResourceNotFound",
                message: id,
            });
        }
        return Ok(old);
    }
    let mut error = check_source(store, &req.model);
    let (staging_rg, staging_created) = match staging_for(store, &req) {
        Ok(s) => s,
        Err(e) => {
            error = error.or(Some(e));
            (String::new(), false)
        }
    };
    let row = TemplateRow {
        id: id.clone(),
        subscription: req.subscription.clone(),
        resource_group: req.resource_group.clone(),
        name: req.name.clone(),
        location: req.model.location.clone(),
        api_version: req.api_version.as_str().to_string(),
        submitted: req.submitted,
        normalized: req.normalized,
        template_dir: req.template_dir,
        staging_rg: staging_rg.clone(),
        staging_created,
        provisioning_state: if error.is_some() {
            "Failed".into()
        } else {
            "Succeeded".into()
        },
        provisioning_error: error.map(|(c, m)| error_value(&c, &m)),
    };
    store.insert_template(&row)?;
    if row.provisioning_state == "Succeeded" {
        // The staging "resource group": a directory; a group row when kiln made a named one.
        if !staging_rg.is_empty() {
            let _ = std::fs::create_dir_all(store.staging_root().join(&staging_rg));
            if staging_created
                && req
                    .model
                    .properties
                    .staging_resource_group
                    .as_deref()
                    .is_some_and(|s| !s.is_empty())
            {
                store.create_group(
                    &req.subscription,
                    &staging_rg,
                    &req.model.location,
                    &json!({"createdBy": "kiln"}),
                    Some(&id),
                )?;
            }
        }
    }
    store.template(&id)?.ok_or_else(|| StoreError::NotFound {
        code: "ResourceNotFound",
        message: id,
    })
}

/// `kiln build FILE`, the one-shot path: creates the template, or replaces the stored one's
/// properties when the file changed (a divergence from AIB, where templates are immutable: a
/// one-shot build is not the resource API). Refused while the template runs.
pub fn register_for_build(store: &Store, req: CreateRequest) -> Result<TemplateRow, StoreError> {
    let id = ids::template_id(&req.subscription, &req.resource_group, &req.name);
    let Some(old) = store.template(&id)? else {
        return create_template(store, req);
    };
    if old.normalized == req.normalized
        && old.provisioning_state == "Succeeded"
        && old.template_dir == req.template_dir
    {
        return Ok(old);
    }
    if store.runs_of(&id)?.iter().any(RunRow::is_active) {
        return Err(StoreError::Conflict { code: "Conflict", message: format!("the template {id} is running; wait for the run to end or cancel it (`kiln template cancel -g {} -n {}`)", req.resource_group, req.name) });
    }
    let error = check_source(store, &req.model);
    let mut row = old;
    row.location = req.model.location.clone();
    row.normalized = req.normalized;
    row.submitted = req.submitted;
    row.api_version = req.api_version.as_str().to_string();
    row.template_dir = req.template_dir;
    if row.staging_rg.is_empty() {
        row.staging_rg =
            crate::build::staging_name(&req.resource_group, &req.name, &crate::store::short_id());
        row.staging_created = true;
        let _ = std::fs::create_dir_all(store.staging_root().join(&row.staging_rg));
    }
    row.provisioning_state = if error.is_some() {
        "Failed".into()
    } else {
        "Succeeded".into()
    };
    row.provisioning_error = error.map(|(c, m)| error_value(&c, &m));
    store.update_template(&row)?;
    store.template(&id)?.ok_or_else(|| StoreError::NotFound {
        code: "ResourceNotFound",
        message: id,
    })
}

/// The staging directory of a template.
pub fn staging_dir(store: &Store, t: &TemplateRow) -> Option<PathBuf> {
    (!t.staging_rg.is_empty()).then(|| store.staging_root().join(&t.staging_rg))
}

/// The latest run of a template.
pub fn last_run(store: &Store, t: &TemplateRow) -> Result<Option<RunRow>, StoreError> {
    Ok(store.runs_of(&t.id)?.into_iter().next())
}

/// `GET imageTemplates/{name}`: Azure's shape (read-only fields included).
pub fn template_json(store: &Store, t: &TemplateRow) -> Result<Value, StoreError> {
    let n = &t.normalized;
    let mut props = n.get("properties").cloned().unwrap_or_else(|| json!({}));
    let last = last_run(store, t)?;
    if let Some(p) = props.as_object_mut() {
        if let (Some(exact), Some(src)) = (
            last.as_ref().and_then(|r| r.exact_version.clone()),
            p.get_mut("source").and_then(Value::as_object_mut),
        ) {
            src.insert("exactVersion".into(), json!(exact));
        }
        p.insert("provisioningState".into(), json!(t.provisioning_state));
        if let Some(e) = &t.provisioning_error {
            p.insert("provisioningError".into(), e.clone());
        }
        if let Some(r) = &last {
            p.insert("lastRunStatus".into(), r.last_run_status());
        }
        if !t.staging_rg.is_empty() {
            p.insert(
                "exactStagingResourceGroup".into(),
                json!(ids::group_id(&t.subscription, &t.staging_rg)),
            );
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("id".into(), json!(t.id));
    out.insert("name".into(), json!(t.name));
    out.insert(
        "location".into(),
        n.get("location").cloned().unwrap_or(json!(t.location)),
    );
    out.insert(
        "type".into(),
        json!("Microsoft.VirtualMachineImages/imageTemplates"),
    );
    if let Some(tags) = n
        .get("tags")
        .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
    {
        out.insert("tags".into(), tags.clone());
    }
    if let Some(i) = n.get("identity") {
        out.insert("identity".into(), i.clone());
    }
    out.insert("properties".into(), props);
    Ok(Value::Object(out))
}

/// One runOutput resource.
pub fn run_output_json(t: &TemplateRow, o: &crate::store::RunOutputRow) -> Value {
    let mut props = serde_json::Map::new();
    if let Some(a) = &o.artifact_id {
        props.insert("artifactId".into(), json!(a));
    }
    if let Some(u) = &o.artifact_uri {
        props.insert("artifactUri".into(), json!(u));
    }
    props.insert("provisioningState".into(), json!(o.provisioning_state));
    json!({
        "id": format!("{}/runOutputs/{}", t.id, o.name),
        "name": o.name,
        "type": "Microsoft.VirtualMachineImages/imageTemplates/runOutputs",
        "properties": Value::Object(props),
    })
}

/// `GET …/runOutputs`: the outputs of the latest run.
pub fn run_outputs_json(store: &Store, t: &TemplateRow) -> Result<Vec<Value>, StoreError> {
    let Some(r) = last_run(store, t)? else {
        return Ok(Vec::new());
    };
    Ok(store
        .run_outputs(&r.id)?
        .iter()
        .map(|o| run_output_json(t, o))
        .collect())
}

/// Deletes a template and the staging it created (and only that): a staging group kiln created
/// goes with its directory; a staging group the user gave is emptied and kept. Refused while a
/// run is in progress. Returns the removed directories.
pub fn delete_template(store: &Store, t: &TemplateRow) -> Result<Vec<PathBuf>, StoreError> {
    if let Some(r) = store.runs_of(&t.id)?.into_iter().find(RunRow::is_active) {
        return Err(StoreError::Conflict {
            code: "Conflict",
            message: format!("the template {} has a run in progress ({}); cancel it first with `kiln template cancel -g {} -n {}`", t.id, r.id, t.resource_group, t.name),
        });
    }
    let mut removed = Vec::new();
    if let Some(dir) = staging_dir(store, t) {
        if dir.exists() {
            if t.staging_created {
                std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io {
                    what: format!("removing the staging directory {}", dir.display()),
                    source,
                })?;
            } else {
                // The user's group: its contents go, the group stays.
                for e in std::fs::read_dir(&dir)
                    .map_err(|source| StoreError::Io {
                        what: format!("reading {}", dir.display()),
                        source,
                    })?
                    .flatten()
                {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
            removed.push(dir);
        }
    }
    store.delete_template_rows(&t.id)?;
    if t.staging_created {
        if let Ok(Some(g)) = store.group(&t.subscription, &t.staging_rg) {
            if g.managed_by
                .as_deref()
                .is_some_and(|m| ids::key(m) == ids::key(&t.id))
            {
                store.delete_group(&t.subscription, &t.staging_rg)?;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
