//! Shared plumbing of the resource verbs (`group`, `template`, `sig`, `image`, `account`):
//! opening the store (with crash recovery), printing JSON, rendering store errors.

use super::output::{EXIT_INVALID, EXIT_USAGE};
use kiln_engine::store::{Store, StoreError};

/// `--output` of the resource verbs: json (az's default) or table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Out {
    /// Azure's JSON on stdout.
    Json,
    /// A table on stdout.
    Table,
}

/// Opens the store in KILN_HOME and recovers runs whose kiln process died (said on stderr).
pub fn open() -> Result<Store, u8> {
    let store = Store::open(&kiln_engine::home::kiln_home()).map_err(|e| fail(&e))?;
    match store.recover() {
        Ok(list) => {
            for r in list {
                eprintln!(
                    "kiln: run {} of {} was left in progress by a kiln process that died: marked Failed{}{}",
                    r.run_id,
                    r.template_key,
                    if r.killed.is_empty() { String::new() } else { format!(", killed leftover QEMU (pids {:?})", r.killed) },
                    if r.removed.is_empty() { String::new() } else { format!(", removed {} staging file(s)", r.removed.len()) }
                );
            }
        }
        Err(e) => eprintln!("kiln: warning: crash recovery failed: {e}"),
    }
    Ok(store)
}

/// The default subscription.
pub fn subscription(store: &Store) -> Result<String, u8> {
    store.subscription().map(|s| s.0).map_err(|e| fail(&e))
}

/// Prints a store error on stderr (`error: CODE: message`) and returns the exit code.
pub fn fail(e: &StoreError) -> u8 {
    eprintln!("error: {e}");
    match e {
        StoreError::Db { .. } | StoreError::Io { .. } | StoreError::TooNew { .. } => EXIT_USAGE,
        _ => EXIT_INVALID,
    }
}

/// Prints a JSON value on stdout.
pub fn print(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    println!("{}", line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

/// Parses `KEY=VALUE` tags.
pub fn tags(pairs: &[String]) -> Result<serde_json::Value, u8> {
    let mut m = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
        if k.is_empty() {
            eprintln!("error: --tags {p}: expected KEY=VALUE");
            return Err(EXIT_USAGE);
        }
        m.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    Ok(serde_json::Value::Object(m))
}
