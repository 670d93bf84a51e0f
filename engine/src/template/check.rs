//! The structural walk: every property of the template checked against the schema of its API
//! version (names, case, types, enum values, versions, read-only and unknown fields), producing
//! the normalized template (canonical names and values) and a map from JSON path to location.

use super::schema::{self, discriminator, fields, legacy_field, legacy_variant, Field, Obj, Ty};
use super::version::ApiVersion;
use crate::diag::{Diagnostic, JsonPath, Severity};
use crate::json::{Node, Span, Value};
use serde_json::{Map, Value as J};
use std::collections::{HashMap, HashSet};

/// The result of the structural walk.
#[derive(Debug, Clone)]
pub struct Walked {
    /// The template with canonical names and values; read-only, unknown and legacy fields dropped.
    pub normalized: J,
    /// JSON path (canonical) → span of the value in the file.
    pub spans: HashMap<String, Span>,
    /// JSON paths whose values came from ARM expressions that could not be evaluated.
    pub unresolved_paths: HashSet<String>,
    /// What the walk found.
    pub diagnostics: Vec<Diagnostic>,
}

/// Walks `root` (the image template resource) under `api`. `unresolved` are spans of values that
/// ARM evaluation could not compute: they are carried through unchecked.
///
/// `arm_envelope`: the template came from an ARM deployment, whose resource envelope keys
/// (`Name`, `Type`, `Location`…) ARM itself matches ignoring case.
pub fn walk(root: &Node, api: ApiVersion, unresolved: &[Span], arm_envelope: bool) -> Walked {
    let mut w = Walker {
        api,
        arm_envelope,
        unresolved: unresolved.iter().map(|s| (s.start, s.end)).collect(),
        diags: Vec::new(),
        spans: HashMap::new(),
        unresolved_paths: HashSet::new(),
    };
    let normalized = w
        .object(root, &JsonPath::root(), Obj::Root)
        .unwrap_or(J::Null);
    Walked {
        normalized,
        spans: w.spans,
        unresolved_paths: w.unresolved_paths,
        diagnostics: w.diags,
    }
}

struct Walker {
    api: ApiVersion,
    arm_envelope: bool,
    unresolved: HashSet<(usize, usize)>,
    diags: Vec<Diagnostic>,
    spans: HashMap<String, Span>,
    unresolved_paths: HashSet<String>,
}

/// Fields whose strings are scripts or PowerShell, where `<` is normal text.
const SCRIPT_FIELDS: &[&str] = &[
    "inline",
    "restartCommand",
    "restartCheckCommand",
    "searchCriteria",
    "filters",
];

fn kind_name(obj: Obj) -> &'static str {
    match obj {
        Obj::Root => "the image template",
        Obj::Identity => "identity",
        Obj::Properties => "properties",
        Obj::Source => "the source",
        Obj::PlanInfo => "planInfo",
        Obj::Customizer => "a customizer",
        Obj::Validate => "validate",
        Obj::Validator => "an inVMValidations entry",
        Obj::Distributor => "a distributor",
        Obj::TargetRegion => "a targetRegions entry",
        Obj::Versioning => "versioning",
        Obj::VmProfile => "vmProfile",
        Obj::VnetConfig => "vnetConfig",
        Obj::ErrorHandling => "errorHandling",
        Obj::Optimize => "optimize",
        Obj::VmBoot => "optimize.vmBoot",
        Obj::Workload => "optimize.workload",
        Obj::DataDisk => "an additionalDataDisks entry",
        Obj::AutoRun => "autoRun",
        Obj::ReadOnly => "a read-only object",
    }
}

fn bad_type_code(obj: Obj) -> &'static str {
    match obj {
        Obj::Source => "BadSourceType",
        Obj::Customizer => "BadCustomizerType",
        Obj::Validator => "BadValidatorType",
        Obj::Distributor => "BadDistributeType",
        _ => "InvalidValue",
    }
}

/// Finds `<name>`-style documentation placeholders in `s`.
pub fn find_placeholder(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(off) = s[i..].find('<') {
        let start = i + off;
        let mut j = start + 1;
        if j < b.len() && b[j].is_ascii_alphabetic() {
            while j < b.len()
                && (b[j].is_ascii_alphanumeric() || matches!(b[j], b' ' | b'_' | b'-' | b'.'))
            {
                j += 1;
            }
            if j < b.len() && b[j] == b'>' {
                return Some(&s[start..=j]);
            }
        }
        i = start + 1;
    }
    None
}

fn closest<'a>(name: &str, fields: &'a [Field]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    fields
        .iter()
        .filter(|f| !f.read_only && f.ty != Ty::ArmOnly)
        .map(|f| (edit_distance(&lower, &f.name.to_ascii_lowercase()), f.name))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Walker {
    fn case_severity(&self) -> Severity {
        if self.api.strict() {
            Severity::Error
        } else {
            Severity::Warning
        }
    }

    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn is_unresolved(&self, n: &Node) -> bool {
        self.unresolved.contains(&(n.span.start, n.span.end))
    }

    fn type_error(&mut self, path: &JsonPath, n: &Node, expected: &str) {
        self.push(
            Diagnostic::error(
                "InvalidType",
                path.as_str(),
                Some(n.span),
                format!("`{}` must be {expected}, not {}", path, n.value.kind()),
            )
            .with_fix(format!("write {expected} here")),
        );
    }

    fn placeholder(&mut self, path: &JsonPath, field: &str, n: &Node, s: &str) {
        if SCRIPT_FIELDS.contains(&field) {
            return;
        }
        if let Some(ph) = find_placeholder(s) {
            self.push(
                Diagnostic::error(
                    "UnresolvedPlaceholder",
                    path.as_str(),
                    Some(n.span),
                    format!("`{path}` still holds the documentation placeholder `{ph}`"),
                )
                .with_fix(format!(
                    "replace `{ph}` with a real value (the template was copied from an example)"
                )),
            );
        }
    }

    fn object(&mut self, node: &Node, path: &JsonPath, obj: Obj) -> Option<J> {
        self.spans.insert(path.as_str().to_string(), node.span);
        if self.is_unresolved(node) {
            self.unresolved_paths.insert(path.as_str().to_string());
            return Some(node.to_json());
        }
        let Some(members) = node.as_object() else {
            self.type_error(path, node, "an object");
            return None;
        };
        let case_sev = self.case_severity();

        // The discriminator decides which properties the object has.
        let mut variant: Option<&'static str> = None;
        let mut disc_name: Option<&'static str> = None;
        if let Some((dname, allowed)) = discriminator(obj) {
            disc_name = Some(dname);
            match node.get_ci(dname) {
                None => {
                    let code = if obj == Obj::Versioning {
                        "InvalidValue"
                    } else {
                        bad_type_code(obj)
                    };
                    self.push(
                        Diagnostic::error(
                            code,
                            path.as_str(),
                            Some(Span::new(node.span.start, node.span.start + 1)),
                            format!(
                                "{} has no `{dname}`: it must be one of {}",
                                kind_name(obj),
                                allowed.join(", ")
                            ),
                        )
                        .with_fix(format!("add \"{dname}\": \"{}\"", allowed[0])),
                    );
                    return Some(node.to_json());
                }
                Some((_, dv)) if self.is_unresolved(dv) => {
                    self.unresolved_paths.insert(path.as_str().to_string());
                    return Some(node.to_json());
                }
                Some((_, dv)) => {
                    let tpath = path.key(dname);
                    self.spans.insert(tpath.as_str().to_string(), dv.span);
                    let Some(s) = dv.as_str() else {
                        self.type_error(&tpath, dv, "a string");
                        return Some(node.to_json());
                    };
                    if let Some(exact) = allowed.iter().find(|a| **a == s) {
                        variant = Some(exact);
                    } else if let Some(ci) = allowed.iter().find(|a| a.eq_ignore_ascii_case(s)) {
                        self.push(Diagnostic {
                            severity: case_sev,
                            code: "WrongCase",
                            path: tpath.as_str().into(),
                            span: Some(dv.span),
                            message: format!("`{s}` is written `{ci}`{}", self.case_note()),
                            fix: Some(format!("write \"{ci}\"")),
                        });
                        variant = Some(ci);
                    } else if let Some(ga) = legacy_variant(obj, s) {
                        self.push(
                            Diagnostic::error(
                                "LegacyPreviewShape",
                                tpath.as_str(),
                                Some(dv.span),
                                format!(
                                    "{} type `{s}` existed only in preview API versions",
                                    kind_name(obj)
                                ),
                            )
                            .with_fix(ga),
                        );
                        return Some(node.to_json());
                    } else {
                        self.push(
                            Diagnostic::error(
                                bad_type_code(obj),
                                tpath.as_str(),
                                Some(dv.span),
                                format!(
                                    "{} type `{s}` is not one of {}",
                                    kind_name(obj),
                                    allowed.join(", ")
                                ),
                            )
                            .with_fix(format!("use one of {}", allowed.join(", "))),
                        );
                        return Some(node.to_json());
                    }
                    if obj == Obj::Validator
                        && variant == Some("File")
                        && self.api < ApiVersion::V2022_07_01
                    {
                        self.push(
                            Diagnostic::error("UnsupportedValidatorType", tpath.as_str(), Some(dv.span), format!(
                                "the File validator needs API version 2022-07-01 or later; this template uses {}",
                                self.api
                            ))
                            .with_fix("set apiVersion to 2022-07-01 or later, or validate with a Shell/PowerShell script"),
                        );
                        return Some(node.to_json());
                    }
                }
            }
        }

        let flds = fields(obj, variant);
        let mut out = Map::new();
        let mut seen: HashSet<&'static str> = HashSet::new();
        for (key, val) in members {
            let field = flds
                .iter()
                .find(|f| f.name == key.name)
                .or_else(|| flds.iter().find(|f| f.name.eq_ignore_ascii_case(&key.name)));
            let Some(fl) = field.copied() else {
                if let Some(ga) = legacy_field(obj, &key.name) {
                    self.push(
                        Diagnostic::error(
                            "LegacyPreviewShape",
                            path.key(&key.name).as_str(),
                            Some(key.span),
                            format!(
                                "`{}` is a preview-era property of {}",
                                key.name,
                                kind_name(obj)
                            ),
                        )
                        .with_fix(ga),
                    );
                    continue;
                }
                let hint = match closest(&key.name, &flds) {
                    Some(c) => format!("did you mean `{c}`? "),
                    None => String::new(),
                };
                let known: Vec<&str> = flds
                    .iter()
                    .filter(|f| !f.read_only && f.ty != Ty::ArmOnly && f.since <= self.api)
                    .map(|f| f.name)
                    .collect();
                let what = match variant {
                    Some(v) => format!("{} of type {v}", kind_name(obj)),
                    None => kind_name(obj).to_string(),
                };
                let (sev, tail) = if self.api.strict() {
                    (
                        Severity::Error,
                        "from API version 2024-02-01 Azure rejects unknown properties".to_string(),
                    )
                } else {
                    (
                        Severity::Warning,
                        format!("API version {} ignores it", self.api),
                    )
                };
                self.push(Diagnostic {
                    severity: sev,
                    code: "UnknownField",
                    path: path.key(&key.name).as_str().into(),
                    span: Some(key.span),
                    message: format!("`{}` is not a property of {what} ({tail})", key.name),
                    fix: Some(format!(
                        "{hint}remove it; known properties: {}",
                        known.join(", ")
                    )),
                });
                continue;
            };
            let vpath = path.key(fl.name);
            if key.name != fl.name && !(self.arm_envelope && obj == Obj::Root) {
                self.push(Diagnostic {
                    severity: case_sev,
                    code: "WrongCase",
                    path: vpath.as_str().into(),
                    span: Some(key.span),
                    message: format!(
                        "property `{}` is written `{}`{}",
                        key.name,
                        fl.name,
                        self.case_note()
                    ),
                    fix: Some(format!("rename it to \"{}\"", fl.name)),
                });
            }
            if !seen.insert(fl.name) {
                self.push(
                    Diagnostic::warning(
                        "DuplicateKey",
                        vpath.as_str(),
                        Some(key.span),
                        format!(
                            "`{}` appears more than once in {}; the last one wins",
                            fl.name,
                            kind_name(obj)
                        ),
                    )
                    .with_fix("keep only one"),
                );
            }
            if fl.read_only {
                self.push(
                    Diagnostic::warning(
                        "ReadOnlyField",
                        vpath.as_str(),
                        Some(key.span),
                        format!(
                            "`{}` is read-only: the service sets it, and kiln ignores it",
                            fl.name
                        ),
                    )
                    .with_fix("remove it (it was probably copied from a GET response)"),
                );
                continue;
            }
            if self.api < fl.since || fl.until.is_some_and(|u| self.api > u) {
                self.push(
                    Diagnostic::error(
                        "FeatureNotInApiVersion",
                        vpath.as_str(),
                        Some(key.span),
                        format!(
                            "`{}` is not in API version {}: it exists from {}",
                            fl.name, self.api, fl.since
                        ),
                    )
                    .with_fix(format!(
                        "set apiVersion to {} or later, or remove `{}`",
                        fl.since, fl.name
                    )),
                );
                continue;
            }
            if fl.ty == Ty::ArmOnly {
                continue;
            }
            if Some(fl.name) == disc_name {
                if let Some(v) = variant {
                    out.insert(fl.name.into(), J::String(v.into()));
                }
                continue;
            }
            if let Some(v) = self.value(val, &vpath, &fl) {
                out.insert(fl.name.into(), v);
            }
        }
        for fl in &flds {
            if fl.required && fl.since <= self.api && !seen.contains(fl.name) {
                let code = if obj == Obj::PlanInfo {
                    "BadPIRSource"
                } else {
                    "MissingRequiredField"
                };
                self.push(
                    Diagnostic::error(
                        code,
                        path.key(fl.name).as_str(),
                        Some(Span::new(node.span.start, node.span.start + 1)),
                        format!(
                            "{} has no `{}`, which is required",
                            match variant {
                                Some(v) => format!("{} of type {v}", kind_name(obj)),
                                None => kind_name(obj).to_string(),
                            },
                            fl.name
                        ),
                    )
                    .with_fix(format!("add \"{}\"", fl.name)),
                );
            }
        }
        Some(J::Object(out))
    }

    fn case_note(&self) -> String {
        if self.api.strict() {
            " (from API version 2024-02-01 names and values are case-sensitive)".into()
        } else {
            format!(" (API version {} accepts it; kiln normalizes it)", self.api)
        }
    }

    fn value(&mut self, n: &Node, path: &JsonPath, fl: &Field) -> Option<J> {
        self.spans.insert(path.as_str().to_string(), n.span);
        if self.is_unresolved(n) {
            self.unresolved_paths.insert(path.as_str().to_string());
            return Some(n.to_json());
        }
        match fl.ty {
            Ty::Str => match &n.value {
                Value::String(s) => {
                    self.placeholder(path, fl.name, n, s);
                    Some(J::String(s.clone()))
                }
                _ => {
                    self.type_error(path, n, "a string");
                    None
                }
            },
            Ty::Bool => match &n.value {
                Value::Bool(b) => Some(J::Bool(*b)),
                _ => {
                    self.type_error(path, n, "true or false");
                    None
                }
            },
            Ty::Int => match &n.value {
                Value::Number(num) if num.as_i64().is_some_and(|i| i32::try_from(i).is_ok()) => {
                    Some(J::Number(num.clone()))
                }
                Value::Number(_) => {
                    self.type_error(path, n, "a 32-bit integer");
                    None
                }
                _ => {
                    self.type_error(path, n, "an integer");
                    None
                }
            },
            Ty::StrList | Ty::IntList => {
                let Some(items) = n.as_array() else {
                    self.type_error(
                        path,
                        n,
                        if fl.ty == Ty::StrList {
                            "an array of strings"
                        } else {
                            "an array of integers"
                        },
                    );
                    return None;
                };
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    let ip = path.index(i);
                    self.spans.insert(ip.as_str().to_string(), it.span);
                    if self.is_unresolved(it) {
                        self.unresolved_paths.insert(ip.as_str().to_string());
                        out.push(it.to_json());
                        continue;
                    }
                    match (&it.value, fl.ty) {
                        (Value::String(s), Ty::StrList) => {
                            self.placeholder(&ip, fl.name, it, s);
                            out.push(J::String(s.clone()));
                        }
                        (Value::Number(num), Ty::IntList) if num.as_i64().is_some() => {
                            out.push(J::Number(num.clone()))
                        }
                        _ => self.type_error(
                            &ip,
                            it,
                            if fl.ty == Ty::StrList {
                                "a string"
                            } else {
                                "an integer"
                            },
                        ),
                    }
                }
                Some(J::Array(out))
            }
            Ty::StrMap => {
                let Some(m) = n.as_object() else {
                    self.type_error(path, n, "an object of string values");
                    return None;
                };
                let mut out = Map::new();
                for (k, v) in m {
                    let kp = path.key(&k.name);
                    self.spans.insert(kp.as_str().to_string(), v.span);
                    match &v.value {
                        Value::String(s) => {
                            if !self.is_unresolved(v) {
                                self.placeholder(&kp, fl.name, v, s);
                            }
                            out.insert(k.name.clone(), J::String(s.clone()));
                        }
                        _ if self.is_unresolved(v) => {
                            out.insert(k.name.clone(), v.to_json());
                        }
                        _ => self.type_error(&kp, v, "a string"),
                    }
                }
                Some(J::Object(out))
            }
            Ty::Enum(allowed) => {
                let Some(s) = n.as_str() else {
                    self.type_error(path, n, "a string");
                    return None;
                };
                if let Some(a) = allowed.iter().find(|a| **a == s) {
                    Some(J::String((*a).into()))
                } else if let Some(a) = allowed.iter().find(|a| a.eq_ignore_ascii_case(s)) {
                    let sev = self.case_severity();
                    self.push(Diagnostic {
                        severity: sev,
                        code: "WrongCase",
                        path: path.as_str().into(),
                        span: Some(n.span),
                        message: format!("`{s}` is written `{a}`{}", self.case_note()),
                        fix: Some(format!("write \"{a}\"")),
                    });
                    Some(J::String((*a).into()))
                } else {
                    self.push(
                        Diagnostic::error(
                            "InvalidValue",
                            path.as_str(),
                            Some(n.span),
                            format!(
                                "`{path}` is `{s}`, but must be one of {}",
                                allowed.join(", ")
                            ),
                        )
                        .with_fix(format!("use one of {}", allowed.join(", "))),
                    );
                    None
                }
            }
            Ty::Obj(k) => self.object(n, path, k),
            Ty::List(k) => {
                let Some(items) = n.as_array() else {
                    self.type_error(path, n, "an array of objects");
                    return None;
                };
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    if let Some(v) = self.object(it, &path.index(i), k) {
                        out.push(v);
                    }
                }
                Some(J::Array(out))
            }
            Ty::IdentityMap => {
                let Some(m) = n.as_object() else {
                    self.type_error(path, n, "an object mapping identity resource IDs to {}");
                    return None;
                };
                let mut out = Map::new();
                for (k, v) in m {
                    let kp = path.key(&k.name);
                    self.spans.insert(kp.as_str().to_string(), k.span);
                    if self.unresolved.contains(&(k.span.start, k.span.end)) {
                        // An identity ID from an ARM expression that could not be evaluated.
                        self.unresolved_paths.insert(kp.as_str().to_string());
                    } else if let Some(ph) = find_placeholder(&k.name) {
                        self.push(
                            Diagnostic::error(
                                "UnresolvedPlaceholder",
                                kp.as_str(),
                                Some(k.span),
                                format!(
                                "the identity ID still holds the documentation placeholder `{ph}`"
                            ),
                            )
                            .with_fix(format!("replace `{ph}` with a real value")),
                        );
                    }
                    match v.as_object() {
                        Some(inner) => {
                            for (ik, _) in inner {
                                let known = ["principalId", "clientId"]
                                    .iter()
                                    .any(|r| r.eq_ignore_ascii_case(&ik.name));
                                if known {
                                    self.push(
                                        Diagnostic::warning("ReadOnlyField", kp.key(&ik.name).as_str(), Some(ik.span), format!(
                                            "`{}` of an identity is read-only: Azure fills it in; kiln ignores it",
                                            ik.name
                                        ))
                                        .with_fix("write the identity as \"<identity ID>\": {}"),
                                    );
                                } else {
                                    self.push(Diagnostic {
                                        severity: self.case_severity(),
                                        code: "UnknownField",
                                        path: kp.key(&ik.name).as_str().into(),
                                        span: Some(ik.span),
                                        message: format!(
                                            "`{}` is not a property of a user-assigned identity",
                                            ik.name
                                        ),
                                        fix: Some(
                                            "write the identity as \"<identity ID>\": {}".into(),
                                        ),
                                    });
                                }
                            }
                        }
                        None if self.is_unresolved(v) => {}
                        None => self.type_error(&kp, v, "an empty object {}"),
                    }
                    out.insert(k.name.clone(), J::Object(Map::new()));
                }
                Some(J::Object(out))
            }
            Ty::ArmOnly => None,
        }
    }
}

/// The schema module, re-exported for the rule checks.
pub use schema::STORAGE_TYPES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(
            find_placeholder("/subscriptions/<subscriptionID>/rg"),
            Some("<subscriptionID>")
        );
        assert_eq!(find_placeholder("<region 1>"), Some("<region 1>"));
        assert_eq!(find_placeholder("a < b > c"), None);
        assert_eq!(find_placeholder("<1abc>"), None);
        assert_eq!(find_placeholder("x<"), None);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("inlne", "inline"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
