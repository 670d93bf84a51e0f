//! Diagnostics: what is wrong with a template, where, and how to fix it.
//!
//! The codes are stable and documented in `docs/diagnostics.md`; tests assert on them.

use crate::json::{LineIndex, Span};
use std::fmt::Write as _;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The template cannot be used as it is.
    Error,
    /// Accepted, but probably not what the author meant, or normalized by kiln.
    Warning,
}

impl Severity {
    /// `error` / `warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem found in a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The stable code (`NoCustomizerScript`, `BadSha256Checksum`, …).
    pub code: &'static str,
    /// The JSON path inside the image template (`properties.customize[2].sha256Checksum`), or
    /// inside the file for problems outside the template.
    pub path: String,
    /// The location in the file, when known.
    pub span: Option<Span>,
    /// What is wrong, and the rule.
    pub message: String,
    /// How to fix it.
    pub fix: Option<String>,
}

impl Diagnostic {
    /// An error.
    pub fn error(
        code: &'static str,
        path: impl Into<String>,
        span: Option<Span>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            path: path.into(),
            span,
            message: message.into(),
            fix: None,
        }
    }

    /// A warning.
    pub fn warning(
        code: &'static str,
        path: impl Into<String>,
        span: Option<Span>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            code,
            path: path.into(),
            span,
            message: message.into(),
            fix: None,
        }
    }

    /// Adds the fix.
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A source file, kept for rendering locations.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The name shown to users (the path as given).
    pub name: String,
    /// The text (lossily decoded if it was not UTF-8).
    pub text: String,
    index: LineIndex,
}

impl SourceFile {
    /// Wraps `text` named `name`.
    pub fn new(name: impl Into<String>, text: String) -> SourceFile {
        let index = LineIndex::new(&text);
        SourceFile {
            name: name.into(),
            text,
            index,
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        self.index.line_col(&self.text, offset)
    }

    /// Renders a diagnostic like rustc does: header, location, snippet with a caret, fix.
    pub fn render(&self, d: &Diagnostic, color: bool) -> String {
        let (red, yellow, blue, bold, reset) = if color {
            (
                "\x1b[31;1m",
                "\x1b[33;1m",
                "\x1b[34;1m",
                "\x1b[1m",
                "\x1b[0m",
            )
        } else {
            ("", "", "", "", "")
        };
        let sev = match d.severity {
            Severity::Error => format!("{red}error{reset}"),
            Severity::Warning => format!("{yellow}warning{reset}"),
        };
        let mut out = String::new();
        let _ = writeln!(out, "{sev}[{}]{bold}: {}{reset}", d.code, d.message);
        match d.span {
            Some(span) => {
                let (line, col) = self.line_col(span.start);
                let _ = writeln!(
                    out,
                    "  {blue}-->{reset} {}:{line}:{col}  at {}",
                    self.name,
                    display_path(&d.path)
                );
                let text = self.index.line_text(&self.text, line);
                // Long lines (minified JSON) are cut around the column.
                let chars: Vec<char> = text.chars().collect();
                let (from, prefix) = if col > 80 { (col - 40, "…") } else { (1, "") };
                let shown: String = chars.iter().skip(from - 1).take(120).collect();
                let (end_line, end_col) = self.line_col(span.end.max(span.start + 1) - 1);
                let width = if end_line == line {
                    (end_col + 1).saturating_sub(col).clamp(1, 80)
                } else {
                    1
                };
                let gutter = line.to_string().len();
                let _ = writeln!(out, "  {blue}{:gutter$} |{reset}", "");
                let _ = writeln!(out, "  {blue}{line} |{reset} {prefix}{shown}");
                let pad = " ".repeat(col - from + prefix.chars().count());
                let carets = "^".repeat(width);
                let mark = if d.is_error() { red } else { yellow };
                let _ = writeln!(
                    out,
                    "  {blue}{:gutter$} |{reset} {pad}{mark}{carets}{reset}",
                    ""
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {blue}-->{reset} {}  at {}",
                    self.name,
                    display_path(&d.path)
                );
            }
        }
        if let Some(fix) = &d.fix {
            let _ = writeln!(out, "  {blue}={reset} {bold}fix{reset}: {fix}");
        }
        out
    }
}

fn display_path(p: &str) -> &str {
    if p.is_empty() {
        "(document root)"
    } else {
        p
    }
}

/// A JSON path under construction, rendered as `properties.customize[2].inline[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonPath(String);

impl JsonPath {
    /// The empty path (the template resource itself).
    pub fn root() -> JsonPath {
        JsonPath(String::new())
    }

    /// Appends a property name.
    pub fn key(&self, k: &str) -> JsonPath {
        let simple = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        let mut s = self.0.clone();
        if simple {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(k);
        } else {
            let _ = write!(s, "[{}]", serde_json::Value::String(k.to_string()));
        }
        JsonPath(s)
    }

    /// Appends an array index.
    pub fn index(&self, i: usize) -> JsonPath {
        JsonPath(format!("{}[{i}]", self.0))
    }

    /// The rendered path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = JsonPath::root()
            .key("properties")
            .key("customize")
            .index(2)
            .key("sha256Checksum");
        assert_eq!(p.as_str(), "properties.customize[2].sha256Checksum");
        let q = JsonPath::root()
            .key("identity")
            .key("userAssignedIdentities")
            .key("/subscriptions/x");
        assert_eq!(
            q.as_str(),
            "identity.userAssignedIdentities[\"/subscriptions/x\"]"
        );
    }

    #[test]
    fn render_has_location_caret_and_fix() {
        let src = SourceFile::new("t.json", "{\n  \"a\": \"bad\"\n}".into());
        let d = Diagnostic::error("X", "a", Some(Span::new(9, 14)), "a is bad")
            .with_fix("make it good");
        let r = src.render(&d, false);
        assert!(r.contains("error[X]: a is bad"), "{r}");
        assert!(r.contains("t.json:2:8"), "{r}");
        assert!(r.contains("       ^^^^^"), "{r}");
        assert!(r.contains("fix: make it good"), "{r}");
    }
}
