//! The AIB image template: reading every input form, validating it as Azure would under its API
//! version, normalizing it (canonical names, defaults), and the typed model the build uses.
//!
//! Data flow: bytes → [`crate::json`] (located, comments allowed) → input form detection (bare
//! template, REST body, ARM deployment + parameters, REST spec example) → [`check::walk`]
//! (schema: names, case, types, versions) → [`rules::check`] (documented AIB rules) →
//! [`defaults::apply`] → [`model::ImageTemplate`].

pub mod check;
pub mod defaults;
pub mod model;
pub mod rules;
pub mod schema;
pub mod version;

use crate::arm::{self, ArmContext};
use crate::diag::{Diagnostic, SourceFile};
use crate::json::{self, Node, Span};
pub use model::ImageTemplate;
pub use version::ApiVersion;

/// The biggest template file kiln reads. Real templates are kilobytes.
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// How the file presented the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputForm {
    /// A resource object with `type: Microsoft.VirtualMachineImages/imageTemplates`.
    Bare,
    /// A REST request body (no `type`/`apiVersion`): the API version comes from `--api-version`.
    RestBody,
    /// An ARM deployment template whose `resources` hold image templates.
    ArmDeployment,
    /// An example file from the REST API specs (`parameters` + `responses`).
    RestExample,
}

impl InputForm {
    /// A stable name for JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            InputForm::Bare => "template",
            InputForm::RestBody => "restBody",
            InputForm::ArmDeployment => "armDeployment",
            InputForm::RestExample => "restExample",
        }
    }
}

/// What `load` needs besides the file.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `--api-version`: used when the file does not say (REST bodies).
    pub api_version: Option<String>,
    /// ARM parameter values (`--parameters` file entries, then `-p` overrides).
    pub parameters: Vec<(String, serde_json::Value)>,
    /// What `resourceGroup()`, `subscription()` and `deployment()` return.
    pub arm: ArmContext,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            api_version: None,
            parameters: Vec::new(),
            arm: ArmContext {
                subscription_id: "00000000-0000-0000-0000-000000000000".into(),
                resource_group: "kiln".into(),
                resource_group_location: "local".into(),
                deployment_name: "kiln".into(),
                tenant_id: "00000000-0000-0000-0000-000000000000".into(),
            },
        }
    }
}

/// One image template found in a file, validated.
#[derive(Debug, Clone)]
pub struct TemplateReport {
    /// Where it sits in the file (`resources[1]`, or empty for a bare template).
    pub location: String,
    /// The resource name, when known.
    pub name: Option<String>,
    /// The API version it was validated under.
    pub api_version: ApiVersion,
    /// The API version as the file wrote it (may be a preview or unknown version).
    pub api_version_text: String,
    /// Its diagnostics (paths relative to the template).
    pub diagnostics: Vec<Diagnostic>,
    /// The template as AIB would store it: canonical names, defaults filled, read-only fields
    /// dropped.
    pub normalized: serde_json::Value,
    /// The typed template, when it is valid.
    pub model: Option<ImageTemplate>,
}

impl TemplateReport {
    /// No errors.
    pub fn is_valid(&self) -> bool {
        !self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// A file read and validated.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file (for rendering locations).
    pub source: SourceFile,
    /// How the file presented its template(s), when it was recognised.
    pub form: Option<InputForm>,
    /// Problems with the file itself (parse errors, ARM expressions, no template).
    pub diagnostics: Vec<Diagnostic>,
    /// The image templates in it.
    pub templates: Vec<TemplateReport>,
}

impl Document {
    /// Valid: at least one template, and no errors anywhere.
    pub fn is_valid(&self) -> bool {
        !self.templates.is_empty()
            && !self.diagnostics.iter().any(Diagnostic::is_error)
            && self.templates.iter().all(TemplateReport::is_valid)
    }

    /// Every diagnostic, file-level first, then each template's.
    pub fn all_diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .chain(self.templates.iter().flat_map(|t| t.diagnostics.iter()))
    }
}

fn looks_like_bicep(name: &str, text: &str) -> bool {
    if name.to_ascii_lowercase().ends_with(".bicep") {
        return true;
    }
    text.lines().map(str::trim_start).any(|l| {
        [
            "param ",
            "resource ",
            "targetScope",
            "module ",
            "var ",
            "output ",
            "@description(",
            "@secure()",
            "import ",
        ]
        .iter()
        .any(|k| l.starts_with(k))
    }) && !text.trim_start().starts_with(['{', '['])
}

/// Reads and validates one file. `name` is shown in messages.
pub fn load(name: &str, bytes: &[u8], opts: &LoadOptions) -> Document {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t.to_string(),
        Err(e) => {
            let good = e.valid_up_to();
            let text = String::from_utf8_lossy(bytes).into_owned();
            // Offsets into the lossy text match up to the first bad byte.
            let source = SourceFile::new(name, text);
            let binary = bytes.iter().take(4096).filter(|b| **b == 0).count() > 0;
            let msg = if binary {
                format!("this is a binary file, not a JSON template (invalid UTF-8 at byte {good})")
            } else {
                format!(
                    "the file is not valid UTF-8 (at byte {good}); ARM templates are UTF-8 JSON"
                )
            };
            let d = Diagnostic::error("InvalidJson", "", Some(Span::new(good, good + 1)), msg)
                .with_fix("save the file as UTF-8 JSON");
            return Document {
                source,
                form: None,
                diagnostics: vec![d],
                templates: vec![],
            };
        }
    };
    let source = SourceFile::new(name, text);
    let mut doc = Document {
        source,
        form: None,
        diagnostics: Vec::new(),
        templates: Vec::new(),
    };
    if bytes.len() > MAX_FILE_BYTES {
        doc.diagnostics.push(Diagnostic::error(
            "InvalidJson",
            "",
            None,
            format!(
                "the file is {} bytes; kiln reads templates up to {} MiB",
                bytes.len(),
                MAX_FILE_BYTES >> 20
            ),
        ));
        return doc;
    }
    let parsed = match json::parse(&doc.source.text) {
        Ok(p) => p,
        Err(e) => {
            if looks_like_bicep(name, &doc.source.text) {
                doc.diagnostics.push(
                    Diagnostic::error("BicepNotSupported", "", Some(Span::new(0, 1)), "this is a Bicep file; kiln reads JSON templates")
                        .with_fix(format!("compile it first: `az bicep build --file {name}` (or `bicep build {name}`), then give kiln the .json")),
                );
            } else {
                doc.diagnostics.push(Diagnostic::error("InvalidJson", "", Some(e.span), format!("not valid JSON: {}", e.message)).with_fix(
                    "fix the syntax at this position (kiln accepts // and /* */ comments and trailing commas, as ARM does)",
                ));
            }
            return doc;
        }
    };
    for n in &parsed.notes {
        doc.diagnostics.push(
            Diagnostic::warning(
                "TrailingComma",
                "",
                Some(n.span),
                format!(
                    "{}: accepted by kiln, rejected by strict JSON parsers",
                    n.message
                ),
            )
            .with_fix("remove the comma"),
        );
    }
    let root = parsed.root;
    if root.as_object().is_none() {
        doc.diagnostics.push(
            Diagnostic::error(
                "NotATemplate",
                "",
                Some(Span::new(root.span.start, root.span.start + 1)),
                format!(
                    "the file holds a JSON {}, not an image template object",
                    root.value.kind()
                ),
            )
            .with_fix("give an image template, a REST body, or an ARM deployment template"),
        );
        return doc;
    }
    if arm::is_deployment_template(&root) {
        doc.form = Some(InputForm::ArmDeployment);
        let (resources, diags) = arm::evaluate_image_templates(&root, &opts.parameters, &opts.arm);
        for d in diags {
            let sev_err = true;
            // kiln reports "no image template here" under one code, whatever the form.
            let code = if d.code == "NoImageTemplate" {
                "NotATemplate"
            } else {
                d.code
            };
            let mut dd = Diagnostic::error(code, "", Some(d.span), d.message).with_fix(d.fix);
            if !sev_err {
                dd.severity = crate::diag::Severity::Warning;
            }
            doc.diagnostics.push(dd);
        }
        if resources.is_empty() && !doc.diagnostics.iter().any(Diagnostic::is_error) {
            doc.diagnostics.push(
                Diagnostic::error("NotATemplate", "resources", root.get("resources").map(|r| r.span), "this ARM deployment template deploys no Microsoft.VirtualMachineImages/imageTemplates resource")
                    .with_fix("give the file that defines the image template"),
            );
        }
        let arm_resources: Vec<&Node> = root
            .get("resources")
            .and_then(Node::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        for r in resources {
            let idx = arm_resources.iter().position(|n| n.span == r.node.span);
            let location =
                idx.map_or_else(|| "resources".to_string(), |i| format!("resources[{i}]"));
            let report = validate_resource(&r.node, &r.unresolved, location, opts, true);
            doc.templates.push(report);
        }
        return doc;
    }
    // A REST API spec example: `{"parameters": {"api-version": …, "<body>": {…}}, "responses": …}`.
    if let (Some(params), true) = (root.get("parameters"), root.get("responses").is_some()) {
        doc.form = Some(InputForm::RestExample);
        let api = params
            .get("api-version")
            .and_then(Node::as_str)
            .map(str::to_string);
        let body = params.as_object().and_then(|m| {
            m.iter().find(|(_, v)| {
                v.get("properties").is_some()
                    || (v.get("location").is_some() && v.get("identity").is_some())
            })
        });
        match body {
            Some((k, body)) => {
                let mut o = opts.clone();
                if let Some(api) = api {
                    o.api_version = Some(api);
                }
                let report = validate_resource(body, &[], format!("parameters.{}", k.name), &o, false);
                doc.templates.push(report);
            }
            None => doc.diagnostics.push(
                Diagnostic::error("NotATemplate", "parameters", Some(params.span), "this REST API example's request has no image template body (it documents a GET/LIST operation)")
                    .with_fix("use an example of a PUT (create) request, or the template itself"),
            ),
        }
        return doc;
    }
    match root.get_ci("type").and_then(|(_, t)| t.as_str()) {
        // Microsoft's quickstarts write the bare namespace and submit with
        // `az resource create --resource-type Microsoft.VirtualMachineImages/imageTemplates`.
        Some(t)
            if t.eq_ignore_ascii_case("Microsoft.VirtualMachineImages/imageTemplates")
                || t.eq_ignore_ascii_case("Microsoft.VirtualMachineImages") =>
        {
            doc.form = Some(InputForm::Bare);
            let report = validate_resource(&root, &[], String::new(), opts, true);
            doc.templates.push(report);
        }
        Some(t) => {
            let span = root.get_ci("type").map(|(_, v)| v.span);
            doc.diagnostics.push(
                Diagnostic::error("NotATemplate", "type", span, format!("this is a `{t}` resource, not Microsoft.VirtualMachineImages/imageTemplates"))
                    .with_fix("give kiln an image template"),
            );
        }
        None if root.get_ci("properties").is_some() || root.get_ci("identity").is_some() || root.get_ci("location").is_some() => {
            doc.form = Some(InputForm::RestBody);
            let report = validate_resource(&root, &[], String::new(), opts, true);
            doc.templates.push(report);
        }
        None => doc.diagnostics.push(
            Diagnostic::error("NotATemplate", "", Some(Span::new(root.span.start, root.span.start + 1)), "no image template here: expected `type: Microsoft.VirtualMachineImages/imageTemplates`, a REST body with `properties`, or an ARM deployment template")
                .with_fix("give the image template JSON"),
        ),
    }
    doc
}

fn validate_resource(
    node: &Node,
    unresolved: &[Span],
    location: String,
    opts: &LoadOptions,
    file_api: bool,
) -> TemplateReport {
    let mut diags = Vec::new();
    let unres = |n: &Node| unresolved.contains(&n.span);
    // The API version: the resource's own `apiVersion`, else the option, else the default.
    let own = if file_api {
        node.get_ci("apiVersion").filter(|(_, v)| !unres(v))
    } else {
        None
    };
    let (text, span) =
        match own.and_then(|(_, v)| v.as_str().map(|s| (s.to_string(), Some(v.span)))) {
            Some(x) => x,
            None => (
                opts.api_version
                    .clone()
                    .unwrap_or_else(|| ApiVersion::DEFAULT.as_str().to_string()),
                None,
            ),
        };
    let api = match ApiVersion::parse(&text) {
        Some(v) => v,
        None if check::find_placeholder(&text).is_some() => {
            let v = opts
                .api_version
                .as_deref()
                .and_then(ApiVersion::parse)
                .unwrap_or(ApiVersion::DEFAULT);
            diags.push(
                Diagnostic::error("UnresolvedPlaceholder", "apiVersion", span, format!(
                    "apiVersion still holds the documentation placeholder `{text}`; checking the template as {v}"
                ))
                .with_fix("set apiVersion to a GA version such as 2022-07-01"),
            );
            v
        }
        None if version::PREVIEW_VERSIONS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(text.trim())) =>
        {
            diags.push(
                Diagnostic::error("LegacyPreviewShape", "apiVersion", span, format!(
                    "API version {text} is a preview version; kiln builds the GA shapes (2020-02-14 to 2025-10-01) and checks this template as 2020-02-14"
                ))
                .with_fix("set apiVersion to a GA version, e.g. 2022-07-01, and add the `identity` GA templates require"),
            );
            ApiVersion::V2020_02_14
        }
        None => {
            let guess = ApiVersion::at_or_before(&text).unwrap_or(ApiVersion::DEFAULT);
            let all: Vec<&str> = ApiVersion::ALL.iter().map(|v| v.as_str()).collect();
            diags.push(
                Diagnostic::error(
                    "UnsupportedApiVersion",
                    "apiVersion",
                    span,
                    format!("`{text}` is not an AIB API version; checking the template as {guess}"),
                )
                .with_fix(format!("use one of {}", all.join(", "))),
            );
            guess
        }
    };
    let arm_envelope = location.starts_with("resources");
    let mut walked = check::walk(node, api, unresolved, arm_envelope);
    rules::check(&mut walked, api);
    diags.append(&mut walked.diagnostics);
    let mut normalized = walked.normalized;
    if let Some(o) = normalized.as_object_mut() {
        o.remove("apiVersion");
        if file_api {
            o.insert(
                "apiVersion".into(),
                serde_json::Value::String(api.as_str().into()),
            );
        }
    }
    defaults::apply(&mut normalized, api);
    let name = normalized
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string);
    let has_errors = diags.iter().any(Diagnostic::is_error);
    let model = if has_errors {
        None
    } else {
        match serde_json::from_value::<ImageTemplate>(normalized.clone()) {
            Ok(m) => Some(m),
            Err(e) => {
                diags.push(Diagnostic::error(
                    "InvalidType",
                    "",
                    None,
                    format!("the template does not fit kiln's model: {e}"),
                ));
                None
            }
        }
    };
    // Stable order: by position in the file, then code.
    diags.sort_by_key(|d| (d.span.map_or(usize::MAX, |s| s.start), d.code));
    TemplateReport {
        location,
        name,
        api_version: api,
        api_version_text: text,
        diagnostics: diags,
        normalized,
        model,
    }
}
