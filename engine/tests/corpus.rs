//! The real-world corpus: every file in `shared/corpus/templates` is validated and compared with
//! the checked-in expectation in `tests/data/corpus-expectations.txt` (each reasoned from the AIB
//! spec, with the reasoning beside it). The distinct error codes must match exactly; warnings
//! listed there must appear.

use kiln_engine::template::{self, LoadOptions};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.join("../../shared/corpus/templates")
}

struct Expect {
    file: String,
    valid: bool,
    errors: BTreeSet<String>,
    warnings: BTreeSet<String>,
}

fn expectations() -> Vec<Expect> {
    let text = include_str!("data/corpus-expectations.txt");
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (file, verdict) = line
            .split_once(" => ")
            .unwrap_or_else(|| panic!("bad expectation line: {line}"));
        let mut words = verdict.split_whitespace();
        let valid = match words.next() {
            Some("valid") => true,
            Some("invalid") => false,
            other => panic!("bad verdict {other:?} in: {line}"),
        };
        let mut errors = BTreeSet::new();
        let mut warnings = BTreeSet::new();
        for w in words {
            if let Some(ws) = w.strip_prefix("warn=") {
                warnings.extend(ws.split(',').map(str::to_string));
            } else {
                errors.extend(w.split(',').map(str::to_string));
            }
        }
        out.push(Expect {
            file: file.to_string(),
            valid,
            errors,
            warnings,
        });
    }
    out
}

#[test]
fn every_corpus_file_has_an_expectation() {
    let exp: BTreeSet<String> = expectations().into_iter().map(|e| e.file).collect();
    let files: BTreeSet<String> = std::fs::read_dir(corpus_dir())
        .expect("shared/corpus/templates beside the checkout")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(files.len(), 90, "the corpus has 90 files");
    assert_eq!(exp, files, "expectations and corpus files differ");
}

#[test]
fn corpus_verdicts_match_expectations() {
    let mut failures = Vec::new();
    for e in expectations() {
        let bytes = std::fs::read(corpus_dir().join(&e.file)).expect("corpus file");
        let doc = template::load(&e.file, &bytes, &LoadOptions::default());
        let errors: BTreeSet<String> = doc
            .all_diagnostics()
            .filter(|d| d.is_error())
            .map(|d| d.code.to_string())
            .collect();
        let warnings: BTreeSet<String> = doc
            .all_diagnostics()
            .filter(|d| !d.is_error())
            .map(|d| d.code.to_string())
            .collect();
        let missing_warnings: Vec<&String> = e.warnings.difference(&warnings).collect();
        if doc.is_valid() != e.valid || errors != e.errors || !missing_warnings.is_empty() {
            let detail: Vec<String> = doc
                .all_diagnostics()
                .map(|d| {
                    let (l, c) = d
                        .span
                        .map(|s| doc.source.line_col(s.start))
                        .unwrap_or((0, 0));
                    format!(
                        "    {}[{}] {}:{} {}: {}",
                        d.severity.as_str(),
                        d.code,
                        l,
                        c,
                        d.path,
                        d.message
                    )
                })
                .collect();
            failures.push(format!(
                "{}\n  expected {} {:?} warn {:?}\n  got      {} {:?} warn {:?}\n{}",
                e.file,
                if e.valid { "valid" } else { "invalid" },
                e.errors,
                e.warnings,
                if doc.is_valid() { "valid" } else { "invalid" },
                errors,
                warnings,
                detail.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus file(s) differ:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
