//! Defaults, applied as AIB applies them, to a normalized template.

use super::version::ApiVersion;
use serde_json::{json, Map, Value as J};

/// The default build timeout (for `buildTimeoutInMinutes: 0` or absent).
pub const DEFAULT_BUILD_TIMEOUT_MINUTES: i64 = 240;
/// WindowsRestart's default restart command (Packer's).
pub const DEFAULT_RESTART_COMMAND: &str = "shutdown /r /f /t 0 /c \"packer restart\"";
/// WindowsRestart's default timeout.
pub const DEFAULT_RESTART_TIMEOUT: &str = "5m";
/// WindowsUpdate's default search criteria.
pub const DEFAULT_UPDATE_SEARCH: &str = "BrowseOnly=0 and IsInstalled=0";
/// WindowsUpdate's `updateLimit` for 0.
pub const DEFAULT_UPDATE_LIMIT: i64 = 1000;
/// vmSize for Gen1 (BIOS) sources when `vmSize` is empty.
pub const DEFAULT_VM_SIZE_GEN1: &str = "Standard_D1_v2";
/// vmSize for Gen2 (UEFI) sources when `vmSize` is empty.
pub const DEFAULT_VM_SIZE_GEN2: &str = "Standard_D2ds_v4";

fn set_default(o: &mut Map<String, J>, k: &str, v: J) {
    let empty = match o.get(k) {
        None | Some(J::Null) => true,
        Some(J::String(s)) => s.is_empty(),
        Some(J::Number(n)) => n.as_i64() == Some(0) && k == "updateLimit",
        _ => false,
    };
    if empty {
        o.insert(k.to_string(), v);
    }
}

fn script_defaults(o: &mut Map<String, J>, powershell: bool) {
    if o.contains_key("scriptUri") || o.contains_key("sourceUri") {
        set_default(o, "sha256Checksum", json!(""));
    }
    if powershell {
        o.entry("runElevated").or_insert(json!(false));
        o.entry("runAsSystem").or_insert(json!(false));
        match o.get("validExitCodes") {
            Some(J::Array(a)) if !a.is_empty() => {}
            _ => {
                o.insert("validExitCodes".into(), json!([0]));
            }
        }
    }
}

/// Fills in every default AIB applies. Leaves values it does not understand alone (the template
/// is validated before).
pub fn apply(t: &mut J, api: ApiVersion) {
    let Some(props) = t.get_mut("properties").and_then(J::as_object_mut) else {
        return;
    };
    match props.get("buildTimeoutInMinutes").and_then(J::as_i64) {
        None | Some(0) => {
            props.insert(
                "buildTimeoutInMinutes".into(),
                json!(DEFAULT_BUILD_TIMEOUT_MINUTES),
            );
        }
        _ => {}
    }
    let vm = props.entry("vmProfile").or_insert_with(|| json!({}));
    if let Some(vm) = vm.as_object_mut() {
        vm.entry("vmSize").or_insert(json!(""));
        vm.entry("osDiskSizeGB").or_insert(json!(0));
    }
    if api >= ApiVersion::V2023_07_01 {
        let eh = props.entry("errorHandling").or_insert_with(|| json!({}));
        if let Some(eh) = eh.as_object_mut() {
            eh.entry("onCustomizerError").or_insert(json!("cleanup"));
            eh.entry("onValidationError").or_insert(json!("cleanup"));
        }
    }
    for c in props
        .get_mut("customize")
        .and_then(J::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(o) = c.as_object_mut() else { continue };
        match o.get("type").and_then(J::as_str).unwrap_or("") {
            "Shell" | "File" => script_defaults(o, false),
            "PowerShell" => script_defaults(o, true),
            "WindowsRestart" => {
                set_default(o, "restartCommand", json!(DEFAULT_RESTART_COMMAND));
                o.entry("restartCheckCommand").or_insert(json!(""));
                set_default(o, "restartTimeout", json!(DEFAULT_RESTART_TIMEOUT));
            }
            "WindowsUpdate" => {
                set_default(o, "searchCriteria", json!(DEFAULT_UPDATE_SEARCH));
                o.entry("filters").or_insert(json!([]));
                match o.get("updateLimit").and_then(J::as_i64) {
                    None | Some(0) => {
                        o.insert("updateLimit".into(), json!(DEFAULT_UPDATE_LIMIT));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if let Some(v) = props.get_mut("validate").and_then(J::as_object_mut) {
        v.entry("continueDistributeOnFailure")
            .or_insert(json!(false));
        v.entry("sourceValidationOnly").or_insert(json!(false));
        for c in v
            .get_mut("inVMValidations")
            .and_then(J::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(o) = c.as_object_mut() {
                let ps = o.get("type").and_then(J::as_str) == Some("PowerShell");
                script_defaults(o, ps);
            }
        }
    }
    for d in props
        .get_mut("distribute")
        .and_then(J::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(o) = d.as_object_mut() else { continue };
        if o.get("type").and_then(J::as_str) != Some("SharedImage") {
            continue;
        }
        o.entry("excludeFromLatest").or_insert(json!(false));
        if o.contains_key("replicationRegions") {
            o.entry("storageAccountType")
                .or_insert(json!("Standard_LRS"));
        }
        for r in o
            .get_mut("targetRegions")
            .and_then(J::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_object_mut() {
                r.entry("replicaCount").or_insert(json!(1));
                r.entry("storageAccountType")
                    .or_insert(json!("Standard_LRS"));
            }
        }
        if let Some(v) = o.get_mut("versioning").and_then(J::as_object_mut) {
            if v.get("scheme").and_then(J::as_str) == Some("Latest") {
                v.entry("major").or_insert(json!(-1));
            }
        }
        if api >= ApiVersion::V2025_10_01 {
            o.entry("replicationMode").or_insert(json!("Full"));
        }
    }
}
