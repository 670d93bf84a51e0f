//! `kiln doctor`: every host prerequisite, the accelerator probe, and the fix for each problem.

use super::output::{Format, EXIT_INVALID, EXIT_OK};
use kiln_engine::vm::{doctor, CheckState};

/// Runs `kiln doctor`.
pub fn run(output: Format) -> u8 {
    let home = kiln_engine::home::kiln_home();
    let _ = std::fs::create_dir_all(&home);
    let report = doctor(&home);
    match output {
        Format::Json => {
            let checks: Vec<serde_json::Value> = report
                .checks
                .iter()
                .map(|c| serde_json::json!({"name": c.name, "state": format!("{:?}", c.state), "detail": c.detail, "fix": c.fix}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"ok": report.ok(), "kilnHome": home, "checks": checks})
                )
                .unwrap_or_default()
            );
        }
        Format::Human => {
            println!("KILN_HOME {}", home.display());
            for c in &report.checks {
                let mark = match c.state {
                    CheckState::Ok => "ok  ",
                    CheckState::Warning => "WARN",
                    _ => "FAIL",
                };
                println!("[{mark}] {:<22} {}", c.name, c.detail);
                if let Some(f) = &c.fix {
                    println!("       fix: {f}");
                }
            }
        }
    }
    if report.ok() {
        EXIT_OK
    } else {
        EXIT_INVALID
    }
}
