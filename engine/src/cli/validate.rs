//! `kiln validate`.

use super::output::{color_stderr, Format, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use kiln_engine::diag::{Diagnostic, SourceFile};
use kiln_engine::template::{self, Document, LoadOptions};
use kiln_engine::{arm, json};
use serde_json::{json, Value as J};
use std::path::PathBuf;

/// Arguments of `kiln validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Template files: bare templates, REST bodies, ARM deployment templates, REST examples.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// An ARM parameters file for deployment templates.
    #[arg(long)]
    pub parameters: Option<PathBuf>,
    /// An ARM parameter value, `name=value` (repeatable; overrides --parameters).
    #[arg(short = 'p', long = "parameter", value_name = "NAME=VALUE")]
    pub parameter: Vec<String>,
    /// The API version for REST bodies that do not name one (default 2022-02-14).
    #[arg(long)]
    pub api_version: Option<String>,
    /// `resourceGroup().name` for ARM expressions.
    #[arg(long, default_value = "kiln")]
    pub resource_group: String,
    /// `resourceGroup().location` for ARM expressions.
    #[arg(long, default_value = "local")]
    pub location: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
    /// Print the template as AIB would store it: canonical names, defaults filled, read-only
    /// fields dropped.
    #[arg(long)]
    pub print_normalized: bool,
}

fn usage_error(msg: &str) -> u8 {
    eprintln!("error: {msg}");
    EXIT_USAGE
}

/// Reads the options shared by every command that loads templates.
pub fn load_options(
    parameters: Option<&PathBuf>,
    pairs: &[String],
    api_version: Option<String>,
    resource_group: &str,
    location: &str,
) -> Result<LoadOptions, String> {
    let mut opts = LoadOptions {
        api_version,
        ..LoadOptions::default()
    };
    opts.arm.resource_group = resource_group.to_string();
    opts.arm.resource_group_location = location.to_string();
    if let Ok(sub) = std::env::var("KILN_SUBSCRIPTION_ID") {
        if !sub.is_empty() {
            opts.arm.subscription_id = sub;
        }
    }
    if let Some(p) = parameters {
        let bytes = std::fs::read(p)
            .map_err(|e| format!("cannot read the parameters file {}: {e}", p.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("the parameters file {} is not UTF-8", p.display()))?;
        let src = SourceFile::new(p.display().to_string(), text);
        let parsed = json::parse(&src.text).map_err(|e| {
            let (l, c) = src.line_col(e.span.start);
            format!(
                "the parameters file {}:{l}:{c} is not valid JSON: {}",
                p.display(),
                e.message
            )
        })?;
        let list = arm::parse_parameters_file(&parsed.root).map_err(|d| {
            let (l, c) = src.line_col(d.span.start);
            format!("{}:{l}:{c}: {} ({})", p.display(), d.message, d.fix)
        })?;
        opts.parameters.extend(list);
    }
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("-p {pair}: expected NAME=VALUE"));
        };
        opts.parameters.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        opts.parameters
            .push((k.to_string(), J::String(v.to_string())));
    }
    Ok(opts)
}

fn diag_json(src: &SourceFile, prefix: &str, d: &Diagnostic) -> J {
    let (line, column) = match d.span {
        Some(s) => {
            let (l, c) = src.line_col(s.start);
            (json!(l), json!(c))
        }
        None => (J::Null, J::Null),
    };
    json!({
        "severity": d.severity.as_str(),
        "code": d.code,
        "path": join_path(prefix, &d.path),
        "line": line,
        "column": column,
        "message": d.message,
        "fix": d.fix,
    })
}

fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// The JSON report of one file.
pub fn document_json(doc: &Document, with_normalized: bool) -> J {
    let mut diags: Vec<J> = doc
        .diagnostics
        .iter()
        .map(|d| diag_json(&doc.source, "", d))
        .collect();
    let mut templates = Vec::new();
    for t in &doc.templates {
        diags.extend(
            t.diagnostics
                .iter()
                .map(|d| diag_json(&doc.source, &t.location, d)),
        );
        let mut tj = json!({
            "location": t.location,
            "name": t.name,
            "apiVersion": t.api_version.as_str(),
            "valid": t.is_valid(),
        });
        if with_normalized {
            tj["normalized"] = t.normalized.clone();
        }
        templates.push(tj);
    }
    json!({
        "file": doc.source.name,
        "valid": doc.is_valid(),
        "form": doc.form.map(|f| f.as_str()),
        "apiVersion": doc.templates.first().map(|t| t.api_version.as_str()),
        "diagnostics": diags,
        "templates": templates,
    })
}

/// Runs `kiln validate`.
pub fn run(a: Args) -> u8 {
    let opts = match load_options(
        a.parameters.as_ref(),
        &a.parameter,
        a.api_version.clone(),
        &a.resource_group,
        &a.location,
    ) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    let color = color_stderr();
    let mut docs = Vec::new();
    for f in &a.files {
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => return usage_error(&format!("cannot read {}: {e}", f.display())),
        };
        docs.push(template::load(&f.display().to_string(), &bytes, &opts));
    }
    let all_valid = docs.iter().all(Document::is_valid);
    match a.output {
        Format::Json => {
            let out = if docs.len() == 1 {
                document_json(&docs[0], a.print_normalized)
            } else {
                json!({ "valid": all_valid, "files": docs.iter().map(|d| document_json(d, a.print_normalized)).collect::<Vec<_>>() })
            };
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Format::Human => {
            for doc in &docs {
                for d in &doc.diagnostics {
                    eprintln!("{}", doc.source.render(d, color));
                }
                for t in &doc.templates {
                    for d in &t.diagnostics {
                        let mut d = d.clone();
                        d.path = join_path(&t.location, &d.path);
                        eprintln!("{}", doc.source.render(&d, color));
                    }
                }
                let errors = doc.all_diagnostics().filter(|d| d.is_error()).count();
                let warnings = doc.all_diagnostics().count() - errors;
                let api = doc
                    .templates
                    .first()
                    .map(|t| format!(" (API version {})", t.api_version))
                    .unwrap_or_default();
                if doc.is_valid() {
                    eprintln!("{}: valid{api}, {warnings} warning(s)", doc.source.name);
                } else {
                    eprintln!(
                        "{}: invalid{api}: {errors} error(s), {warnings} warning(s)",
                        doc.source.name
                    );
                }
            }
            if a.print_normalized {
                let all: Vec<&J> = docs
                    .iter()
                    .flat_map(|d| d.templates.iter().map(|t| &t.normalized))
                    .collect();
                let out = if all.len() == 1 {
                    all[0].clone()
                } else {
                    J::Array(all.into_iter().cloned().collect())
                };
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
        }
    }
    if all_valid {
        EXIT_OK
    } else {
        EXIT_INVALID
    }
}
