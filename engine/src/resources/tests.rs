//! Templates as resources: the JSON has Azure's field names and shapes (compared with the REST
//! spec's examples), immutability, staging rules, deletion.

use super::*;
use crate::template::{self, LoadOptions};
use std::collections::BTreeSet;
use std::path::Path;

fn spec(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/spec")
        .join(p)
}

fn tmp_store(label: &str) -> (Store, PathBuf) {
    let d = std::env::temp_dir().join(format!("kiln-resources-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    (Store::open(&d).unwrap(), d)
}

fn request(file: &Path, sub: &str, rg: &str, name: &str) -> CreateRequest {
    let bytes = std::fs::read(file).unwrap();
    let mut opts = LoadOptions::default();
    opts.arm.subscription_id = sub.into();
    opts.arm.resource_group = rg.into();
    let doc = template::load(&file.display().to_string(), &bytes, &opts);
    assert!(
        doc.is_valid(),
        "{}: {:?}",
        file.display(),
        doc.all_diagnostics().collect::<Vec<_>>()
    );
    let t = &doc.templates[0];
    CreateRequest {
        subscription: sub.into(),
        resource_group: rg.into(),
        name: name.into(),
        submitted: serde_json::from_slice(&bytes).unwrap(),
        normalized: t.normalized.clone(),
        model: t.model.clone().unwrap(),
        api_version: t.api_version,
        template_dir: PathBuf::from("/"),
    }
}

/// Every property name the 2025-10-01 spec defines.
fn spec_names() -> BTreeSet<String> {
    let s: Value =
        serde_json::from_slice(&std::fs::read(spec("2025-10-01/imagebuilder.json")).unwrap())
            .unwrap();
    let mut names = BTreeSet::new();
    fn walk(v: &Value, names: &mut BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Object(p)) = o.get("properties") {
                    names.extend(p.keys().cloned());
                }
                for x in o.values() {
                    walk(x, names);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, names)),
            _ => {}
        }
    }
    walk(&s["definitions"], &mut names);
    // ARM envelope fields (from the common types the spec references).
    names.extend(
        [
            "id",
            "name",
            "type",
            "location",
            "tags",
            "identity",
            "properties",
            "systemData",
        ]
        .map(String::from),
    );
    names
}

/// `example`'s keys all appear in `ours` with the same JSON kinds (recursively), and every key of
/// `ours` is a name the spec defines (maps of user keys are not descended into).
fn same_shape(path: &str, example: &Value, ours: &Value, names: &BTreeSet<String>) {
    const MAPS: [&str; 5] = [
        "tags",
        "userAssignedIdentities",
        "artifactTags",
        "managedResourceTags",
        "identity",
    ];
    match (example, ours) {
        (Value::Object(e), Value::Object(o)) => {
            for (k, ev) in e {
                let ov = o
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} missing from kiln's JSON: {ours}"));
                if !MAPS.contains(&k.as_str()) {
                    same_shape(&format!("{path}.{k}"), ev, ov, names);
                }
            }
            for (k, ov) in o {
                assert!(names.contains(k), "{path}.{k} is not a field of the spec");
                if !MAPS.contains(&k.as_str()) && !e.contains_key(k) {
                    same_shape(&format!("{path}.{k}"), ov, ov, names);
                }
            }
        }
        (Value::Array(e), Value::Array(o)) => {
            if let (Some(e0), Some(o0)) = (e.first(), o.first()) {
                same_shape(&format!("{path}[0]"), e0, o0, names);
            }
        }
        (e, o) => {
            let kind = |v: &Value| std::mem::discriminant(v);
            assert!(
                kind(e) == kind(o) || e.is_null() || o.is_null(),
                "{path}: example {e} vs kiln {o}"
            );
        }
    }
}

#[test]
fn template_and_run_output_json_have_azures_shape() {
    let (store, dir) = tmp_store("shape");
    let sub = "00000000-0000-0000-0000-00000000000a";
    store
        .create_group(sub, "myResourceGroup", "westus", &json!({}), None)
        .unwrap();
    store
        .create_group(sub, "source_rg", "westus", &json!({}), None)
        .unwrap();
    store
        .create_group(sub, "rg1", "westus", &json!({}), None)
        .unwrap();
    // The example's source image exists (a published managed image).
    store
        .insert_image(&crate::store::ImageRow {
            id: ids::image_id(
                "00000000-0000-0000-0000-000000000000",
                "rg1",
                "source_image",
            ),
            subscription: "00000000-0000-0000-0000-000000000000".into(),
            resource_group: "rg1".into(),
            name: "source_image".into(),
            location: "westus".into(),
            os_type: "Linux".into(),
            hyper_v_generation: "V1".into(),
            disk: dir.join("x.vhd"),
            tags: json!({}),
            source_run: None,
            created: "2026-01-01T00:00:00Z".into(),
            provisioning: vec!["nocloud".into()],
        })
        .unwrap();
    let req = request(
        &spec("2025-10-01/examples/CreateImageTemplateLinux.json"),
        sub,
        "myResourceGroup",
        "myImageTemplate",
    );
    let t = create_template(&store, req).unwrap();
    assert_eq!(
        t.provisioning_state, "Succeeded",
        "{:?}",
        t.provisioning_error
    );
    // A run, with its outputs.
    let run = store
        .insert_run(&t.id, "r1", &dir.join("r1"), i64::from(std::process::id()))
        .unwrap();
    store.set_run_sub_state(&run.id, "Customizing").unwrap();
    let ours = template_json(&store, &t).unwrap();
    assert_eq!(ours["properties"]["lastRunStatus"]["runState"], "Running");
    assert_eq!(
        ours["properties"]["lastRunStatus"]["runSubState"],
        "Customizing"
    );
    assert!(ours["properties"]["exactStagingResourceGroup"]
        .as_str()
        .unwrap()
        .contains("/resourceGroups/IT_myResourceGroup_myImageTemplate_"));
    let names = spec_names();
    let get: Value = serde_json::from_slice(
        &std::fs::read(spec("2025-10-01/examples/GetImageTemplate.json")).unwrap(),
    )
    .unwrap();
    same_shape("template", &get["responses"]["200"]["body"], &ours, &names);

    for (name, id) in [
        ("myManagedImageOutput", "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Compute/images/output_managed_image"),
        ("mySharedImageOutput", "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Compute/galleries/Gallery1/images/SharedImageOutput/versions/1.2.3"),
    ] {
        store
            .put_run_output(&run.id, &crate::store::RunOutputRow { name: name.into(), artifact_id: Some(id.into()), artifact_uri: None, provisioning_state: "Succeeded".into() })
            .unwrap();
    }
    store.finish_run(&run.id, "Succeeded", "").unwrap();
    let list = json!({ "value": run_outputs_json(&store, &t).unwrap() });
    let ex: Value = serde_json::from_slice(
        &std::fs::read(spec("2025-10-01/examples/ListRunOutputs.json")).unwrap(),
    )
    .unwrap();
    let mut ex_body = ex["responses"]["200"]["body"].clone();
    ex_body.as_object_mut().unwrap().remove("nextLink"); // kiln never pages
    let mut names = names;
    names.extend(["value".to_string()]);
    same_shape("runOutputs", &ex_body, &list, &names);
    let one: Value = serde_json::from_slice(
        &std::fs::read(spec("2025-10-01/examples/GetRunOutput.json")).unwrap(),
    )
    .unwrap();
    same_shape(
        "runOutput",
        &one["responses"]["200"]["body"],
        &list["value"][0],
        &names,
    );
    let shown = template_json(&store, &t).unwrap();
    assert_eq!(
        shown["properties"]["lastRunStatus"]["runState"],
        "Succeeded"
    );
    assert!(shown["properties"]["lastRunStatus"]["endTime"]
        .as_str()
        .unwrap()
        .starts_with("20"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn templates_are_immutable_and_sources_checked() {
    let (store, dir) = tmp_store("immutable");
    let sub = "sub";
    store
        .create_group(sub, "rg", "westus", &json!({}), None)
        .unwrap();
    let file = spec("2022-02-14/examples/CreateImageTemplateLinux.json");
    // The example's ManagedImage source does not exist here: created, but Failed, as AIB does.
    let t = create_template(&store, request(&file, sub, "rg", "t1")).unwrap();
    assert_eq!(t.provisioning_state, "Failed");
    assert_eq!(
        t.provisioning_error.as_ref().unwrap()["provisioningErrorCode"],
        "BadManagedImageSource"
    );
    let e = super::run::start_run(&store, &t, 1).unwrap_err();
    assert!(e.to_string().contains("provisioningState Failed"), "{e}");
    // The same PUT again: unchanged. Another body: AIB's error.
    create_template(&store, request(&file, sub, "rg", "t1")).unwrap();
    let mut req = request(&file, sub, "rg", "t1");
    req.normalized["properties"]["buildTimeoutInMinutes"] = json!(77);
    let e = create_template(&store, req).unwrap_err();
    assert_eq!(e.code(), "TemplateImmutable");
    assert!(
        e.to_string()
            .contains("Update/Upgrade of image templates is currently not supported"),
        "{e}"
    );
    // Under 2024-02-01, vmProfile and distribute may change.
    assert_eq!(
        updatable_properties(ApiVersion::parse("2024-02-01").unwrap()),
        ["vmProfile", "distribute"]
    );
    assert!(updatable_properties(ApiVersion::parse("2022-07-01").unwrap()).is_empty());
    // A missing group.
    assert_eq!(
        create_template(&store, request(&file, sub, "nope", "t2"))
            .unwrap_err()
            .code(),
        "ResourceGroupNotFound"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn staging_rules_and_delete() {
    let (store, dir) = tmp_store("staging");
    let sub = "sub";
    store
        .create_group(sub, "rg", "westus", &json!({}), None)
        .unwrap();
    let file = spec("2022-02-14/examples/CreateImageTemplateLinux.json");
    let with_staging = |name: &str, staging: &str| {
        let mut r = request(&file, sub, "rg", name);
        r.normalized["properties"]["source"] = json!({"type": "PlatformImage", "publisher": "p", "offer": "o", "sku": "s", "version": "latest"});
        r.normalized["properties"]["stagingResourceGroup"] = json!(staging);
        r.model = serde_json::from_value(r.normalized.clone()).unwrap();
        r
    };
    // Default: IT_<rg>_<template>_<id>, created, and deleted with the template.
    let mut plain = with_staging("plain", "");
    plain.normalized["properties"]
        .as_object_mut()
        .unwrap()
        .remove("stagingResourceGroup");
    plain.model = serde_json::from_value(plain.normalized.clone()).unwrap();
    let t = create_template(&store, plain).unwrap();
    assert!(
        t.staging_rg.starts_with("IT_rg_plain_") && t.staging_created,
        "{}",
        t.staging_rg
    );
    let sdir = staging_dir(&store, &t).unwrap();
    assert!(sdir.is_dir());
    // A new named group: kiln creates it, and deletes it with the template.
    let t2 = create_template(
        &store,
        with_staging("named", "/subscriptions/sub/resourceGroups/stage1"),
    )
    .unwrap();
    assert_eq!(
        t2.provisioning_state, "Succeeded",
        "{:?}",
        t2.provisioning_error
    );
    assert!(store.group(sub, "stage1").unwrap().is_some());
    // Used by another template: refused.
    let t3 = create_template(
        &store,
        with_staging("third", "/subscriptions/sub/resourceGroups/stage1"),
    )
    .unwrap();
    assert_eq!(
        t3.provisioning_error.unwrap()["provisioningErrorCode"],
        "BadStagingResourceGroup"
    );
    // An existing, non-empty group: refused; an existing empty one: used and kept on delete.
    store
        .create_group(sub, "full", "westus", &json!({}), None)
        .unwrap();
    std::fs::create_dir_all(store.staging_root().join("full")).unwrap();
    std::fs::write(store.staging_root().join("full/x"), b"x").unwrap();
    let t4 = create_template(
        &store,
        with_staging("fourth", "/subscriptions/sub/resourceGroups/full"),
    )
    .unwrap();
    assert_eq!(
        t4.provisioning_error.unwrap()["provisioningErrorCode"],
        "BadStagingResourceGroup"
    );
    store
        .create_group(sub, "empty", "westus", &json!({}), None)
        .unwrap();
    let t5 = create_template(
        &store,
        with_staging("fifth", "/subscriptions/sub/resourceGroups/empty"),
    )
    .unwrap();
    assert_eq!(t5.provisioning_state, "Succeeded");
    assert!(!t5.staging_created);
    std::fs::write(staging_dir(&store, &t5).unwrap().join("leftover"), b"x").unwrap();
    delete_template(&store, &t5).unwrap();
    assert!(
        store.group(sub, "empty").unwrap().is_some(),
        "the user's group stays"
    );
    assert!(
        !store.staging_root().join("empty/leftover").exists(),
        "its contents go"
    );
    // A running template cannot be deleted.
    store
        .insert_run(&t.id, "r", &sdir.join("r"), i64::from(std::process::id()))
        .unwrap();
    assert_eq!(delete_template(&store, &t).unwrap_err().code(), "Conflict");
    store.finish_run("r", "Failed", "x").unwrap();
    delete_template(&store, &t).unwrap();
    assert!(!sdir.exists());
    delete_template(&store, &t2).unwrap();
    assert!(
        store.group(sub, "stage1").unwrap().is_none(),
        "the group kiln made goes"
    );
    assert!(
        store.staging_root().join("full/x").exists(),
        "other staging untouched"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn from_2024_02_01_vm_profile_and_distribute_may_change() {
    let (store, dir) = tmp_store("update");
    let sub = "sub";
    store
        .create_group(sub, "rg", "westus", &json!({}), None)
        .unwrap();
    let file = spec("2022-02-14/examples/CreateImageTemplateLinux.json");
    let mk = |api: &str, size: &str| {
        let mut r = request(&file, sub, "rg", "t");
        r.api_version = ApiVersion::parse(api).unwrap();
        r.normalized["properties"]["source"] = json!({"type": "PlatformImage", "publisher": "p", "offer": "o", "sku": "s", "version": "latest"});
        r.normalized["properties"]["vmProfile"]["vmSize"] = json!(size);
        r.model = serde_json::from_value(r.normalized.clone()).unwrap();
        r
    };
    let t = create_template(&store, mk("2024-02-01", "Standard_D2s_v3")).unwrap();
    let t2 = create_template(&store, mk("2024-02-01", "Standard_D4s_v3")).unwrap();
    assert_eq!(
        t2.normalized["properties"]["vmProfile"]["vmSize"],
        "Standard_D4s_v3"
    );
    assert_eq!(t2.staging_rg, t.staging_rg, "an update keeps the staging");
    // Under an older API version the same change is refused.
    assert_eq!(
        create_template(&store, mk("2022-07-01", "Standard_D8s_v3"))
            .unwrap_err()
            .code(),
        "TemplateImmutable"
    );
    let _ = std::fs::remove_dir_all(dir);
}
