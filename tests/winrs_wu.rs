//! The Windows Update Agent, emulated for the `winrs` test guest (a Linux guest speaking WinRS).
//!
//! kiln's WindowsUpdate step uploads `C:\Windows\Temp\kiln-windows-update.ps1` (the real round
//! script, scripts/windows/kiln-windows-update.ps1) and a one-line round script calling it
//!
//! ```text
//! & (Join-Path $env:SystemRoot 'Temp\kiln-windows-update.ps1') -SearchCriteria '…' -Filters @('…', …) -UpdateLimit N
//! exit $LASTEXITCODE
//! ```
//!
//! and runs that as SYSTEM through the elevated runner. The shim ([`round`], called by
//! `winrs_server::shim_windows_script`) recognises exactly that call and runs one round of this
//! emulation instead of the WUA COM API, following the real script's **output contract**: the
//! same `kiln-wu: …` lines in the same order (`searching:`, `skipped (filters):`, `selected:`,
//! `downloading`/`installing N update(s)`, `result <OperationResultCode> (HRESULT 0x…): <title>`,
//! `failed in two rounds, stopping: …`, `a reboot is required`, `more updates remain beyond the
//! limit of N`, `some updates failed; another round retries them once`, `no updates to install,
//! but a reboot is pending`, `no Windows updates to install`) and the same exit codes (0 nothing
//! left, 101 reboot and run another round, 102 the same update failed in two rounds, 1 anything
//! else).
//!
//! # The guest's "update catalogue" (state files under `C:\`, i.e. `/var/lib/kiln-winrs/c`)
//!
//! | file | meaning |
//! |---|---|
//! | `C:\kiln-wu\pending` | the updates the search offers: one a line, `KB<n>\|<category>\|<title>\|<flags>`; flags (comma-separated, optional): `reboot` (installing it requires a reboot), `fail` (its installation fails: result 4, HRESULT 0x80070643), `browse-only` (`BrowseOnly` is true), `driver` (`Type='Driver'`); `#` lines are comments |
//! | `C:\kiln-wu\installed` | installed updates, appended in the same format (a successful install moves the line there) |
//! | `C:\kiln-wu\reboot-pending` | the boot id (`/proc/sys/kernel/random/boot_id`) of the boot that installed a `reboot` update: a reboot is pending while that boot lasts (Windows' `RebootPending` registry key, cleared by the reboot) |
//! | `C:\Windows\Temp\kiln-windows-update-failed.txt` | the real script's state file: the ids (here the KB) of the updates that failed in the last round |
//!
//! # What is honoured
//!
//! - `searchCriteria`: `and`-joined terms `IsInstalled=0|1` (0: `pending`, 1: `installed`),
//!   `BrowseOnly=0|1`, `IsHidden=0|1` (no update is hidden), `Type='Software'|'Driver'`; anything
//!   else (`or`, other properties) makes the search fail: the round prints the script's
//!   `search failed` line and exits 1 — never a silent "nothing to install".
//! - `filters` (first match wins, no match: not installed, as the script): `$true`, `$false`,
//!   `$_.BrowseOnly`, `-not $_.BrowseOnly`, `$_.Title -like|-notlike|-eq|-ne '<pattern>'`
//!   (PowerShell's case-insensitive wildcards `*` and `?`); any other expression fails the round
//!   (exit 1) naming it.
//! - `updateLimit`: at most that many installed per round; more selected means exit 101.
//!
//! Not emulated (only a real Windows host shows them): the COM API itself, downloads, EULAs,
//! `CanRequestUserInput`, the TiWorker wait, real result codes and HRESULTs, the registry keys
//! other than through `reboot-pending`, the update object's other properties.

use std::path::Path;

/// The real script's name, as kiln uploads it to `C:\Windows\Temp`.
pub const SCRIPT: &str = "kiln-windows-update.ps1";

/// One round's parameters, as kiln's round script passes them.
#[derive(Debug, PartialEq, Eq)]
pub struct RoundCall {
    /// `-SearchCriteria`.
    pub criteria: String,
    /// `-Filters`.
    pub filters: Vec<String>,
    /// `-UpdateLimit`.
    pub limit: u32,
}

/// Parse a PowerShell single-quoted literal at the start of `s`; returns it and the rest.
fn literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let body = s.strip_prefix('\'')?;
    let mut out = String::new();
    let mut it = body.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if c == '\'' {
            if it.peek().map(|(_, c)| *c) == Some('\'') {
                it.next();
                out.push('\'');
                continue;
            }
            return Some((out, &body[i + 1..]));
        }
        out.push(c);
    }
    None
}

/// Recognise kiln's round script (its text without the BOM and wrapper lines). `None`: not it.
pub fn parse_round(text: &str) -> Option<RoundCall> {
    let lines: Vec<&str> = text
        .trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let [call, "exit $LASTEXITCODE"] = lines.as_slice() else {
        return None;
    };
    let rest = call.strip_prefix("& (Join-Path $env:SystemRoot ")?;
    let (script, rest) = literal(rest)?;
    if !script.eq_ignore_ascii_case(&format!(r"Temp\{SCRIPT}")) {
        return None;
    }
    let rest = rest.trim_start().strip_prefix(")")?.trim_start();
    let (criteria, rest) = literal(rest.strip_prefix("-SearchCriteria ")?)?;
    let mut rest = rest.trim_start().strip_prefix("-Filters @(")?;
    let mut filters = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(')') {
            rest = r;
            break;
        }
        let (f, r) = literal(rest)?;
        filters.push(f);
        rest = r.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    let limit = rest
        .trim_start()
        .strip_prefix("-UpdateLimit ")?
        .trim()
        .parse()
        .ok()?;
    Some(RoundCall {
        criteria,
        filters,
        limit,
    })
}

/// One fake update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// `KB<n>` (also its UpdateID here).
    pub kb: String,
    /// Category name.
    pub category: String,
    /// Title.
    pub title: String,
    /// Flags: `reboot`, `fail`, `browse-only`, `driver`.
    pub flags: Vec<String>,
}

impl Update {
    fn parse(line: &str) -> Option<Update> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut p = line.splitn(4, '|');
        Some(Update {
            kb: p.next()?.trim().to_string(),
            category: p.next().unwrap_or("").trim().to_string(),
            title: p.next().unwrap_or("").trim().to_string(),
            flags: p
                .next()
                .unwrap_or("")
                .split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .filter(|f| !f.is_empty())
                .collect(),
        })
    }
    fn line(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.kb,
            self.category,
            self.title,
            self.flags.join(",")
        )
    }
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn read_updates(p: &Path) -> Vec<Update> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(Update::parse)
        .collect()
}

/// PowerShell's `-like`: case-insensitive, `*` any run, `?` one character.
pub fn like(text: &str, pattern: &str) -> bool {
    fn go(t: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(&t[i..], rest)),
            Some(('?', rest)) => !t.is_empty() && go(&t[1..], rest),
            Some((c, rest)) => t.first() == Some(c) && go(&t[1..], rest),
        }
    }
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    go(&t, &p)
}

/// Evaluates a filter's expression over `u`; `Err`: not emulated.
pub fn eval(expr: &str, u: &Update) -> Result<bool, String> {
    let e = expr.trim();
    match e.to_ascii_lowercase().as_str() {
        "$true" => return Ok(true),
        "$false" => return Ok(false),
        "$_.browseonly" => return Ok(u.has("browse-only")),
        "-not $_.browseonly" | "!$_.browseonly" => return Ok(!u.has("browse-only")),
        _ => {}
    }
    let lower = e.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("$_.title ") {
        let rest = rest.trim_start();
        for op in ["-notlike", "-like", "-eq", "-ne"] {
            if let Some(r) = rest.strip_prefix(op) {
                // The literal from the original (its case kept; comparisons are case-insensitive).
                let start = e.len() - r.len();
                if let Some((pat, tail)) = literal(&e[start..]) {
                    if tail.trim().is_empty() {
                        return Ok(match op {
                            "-like" => like(&u.title, &pat),
                            "-notlike" => !like(&u.title, &pat),
                            "-eq" => u.title.to_lowercase() == pat.to_lowercase(),
                            _ => u.title.to_lowercase() != pat.to_lowercase(),
                        });
                    }
                }
            }
        }
    }
    Err(format!(
        "the filter expression '{e}' is not emulated by the winrs guest's Windows Update emulation"
    ))
}

/// The script's Test-Selected: the first filter whose expression matches decides.
fn selected(filters: &[String], u: &Update) -> Result<bool, String> {
    for f in filters {
        let Some((action, expr)) = f.split_once(':') else {
            return Err(format!("kiln-wu: filter '{f}' is not ACTION:EXPRESSION"));
        };
        if eval(expr, u)? {
            return match action.trim().to_ascii_lowercase().as_str() {
                "include" => Ok(true),
                "exclude" => Ok(false),
                _ => Err(format!(
                    "kiln-wu: filter '{f}': the action must be include or exclude"
                )),
            };
        }
    }
    Ok(false)
}

/// The search: which list, and a per-update predicate. `Err`: the criteria are not emulated.
fn search(root: &Path, criteria: &str) -> Result<Vec<Update>, String> {
    let mut installed = false;
    let mut browse: Option<bool> = None;
    let mut hidden = false;
    let mut driver: Option<bool> = None;
    for term in criteria.split(" and ") {
        let t: String = term.chars().filter(|c| !c.is_whitespace()).collect();
        let t = t.to_ascii_lowercase();
        match t.as_str() {
            "isinstalled=0" => installed = false,
            "isinstalled=1" => installed = true,
            "browseonly=0" => browse = Some(false),
            "browseonly=1" => browse = Some(true),
            "ishidden=0" => hidden = false,
            "ishidden=1" => hidden = true,
            "type='software'" => driver = Some(false),
            "type='driver'" => driver = Some(true),
            _ => {
                return Err(format!(
                "the search criterion '{}' is not emulated by the winrs guest's Windows Update emulation",
                term.trim()
            ))
            }
        }
    }
    let list = read_updates(&root.join(if installed {
        "kiln-wu/installed"
    } else {
        "kiln-wu/pending"
    }));
    Ok(list
        .into_iter()
        .filter(|_| !hidden)
        .filter(|u| browse.is_none_or(|b| u.has("browse-only") == b))
        .filter(|u| driver.is_none_or(|d| u.has("driver") == d))
        .collect())
}

/// One round against the drive root `root` (`C:\`), in the boot `boot_id`: the lines it prints
/// and its exit code, the state files updated as the module docs say.
pub fn run_round(root: &Path, boot_id: &str, call: &RoundCall) -> (String, i32) {
    let mut out = String::new();
    let mut say = |l: &str| {
        out.push_str(l);
        out.push('\n');
    };
    let limit = if call.limit == 0 { 1000 } else { call.limit } as usize;
    say(&format!("kiln-wu: searching: {}", call.criteria));
    let found = match search(root, &call.criteria) {
        Ok(f) => f,
        Err(e) => {
            say(&format!("kiln-wu: search failed ({e})"));
            say("kiln-wu: the search failed (not retried: the emulation's answer cannot change)");
            return (out, 1);
        }
    };
    let reboot_file = root.join("kiln-wu/reboot-pending");
    let reboot_pending =
        || std::fs::read_to_string(&reboot_file).is_ok_and(|b| b.trim() == boot_id.trim());
    let mut todo: Vec<Update> = Vec::new();
    let mut more = false;
    for u in found {
        match selected(&call.filters, &u) {
            Ok(false) => {
                say(&format!("kiln-wu: skipped (filters): {}", u.title));
                continue;
            }
            Ok(true) => {}
            Err(e) => {
                // The real script throws (ErrorActionPreference Stop): PowerShell's error, exit 1.
                say(&e);
                return (out, 1);
            }
        }
        if todo.len() >= limit {
            more = true;
            continue;
        }
        say(&format!("kiln-wu: selected: {}", u.title));
        todo.push(u);
    }
    if todo.is_empty() {
        if reboot_pending() {
            say("kiln-wu: no updates to install, but a reboot is pending");
            return (out, 101);
        }
        say("kiln-wu: no Windows updates to install");
        return (out, 0);
    }
    say(&format!("kiln-wu: downloading {} update(s)", todo.len()));
    say(&format!("kiln-wu: installing {} update(s)", todo.len()));
    let state = root.join("Windows/Temp/kiln-windows-update-failed.txt");
    let failed_before: Vec<String> = std::fs::read_to_string(&state)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    let pending_path = root.join("kiln-wu/pending");
    let mut pending = read_updates(&pending_path);
    let mut installed_lines = String::new();
    let mut failed_now = Vec::new();
    let mut twice = Vec::new();
    let mut reboot = false;
    for u in &todo {
        let (code, hresult) = if u.has("fail") {
            (4, 0x8007_0643u32)
        } else {
            (2, 0)
        };
        say(&format!(
            "kiln-wu: result {code} (HRESULT 0x{hresult:08X}): {}",
            u.title
        ));
        if code >= 4 {
            failed_now.push(u.kb.clone());
            if failed_before.contains(&u.kb) {
                twice.push(u.title.clone());
            }
        } else {
            reboot |= u.has("reboot");
            pending.retain(|p| p.kb != u.kb);
            installed_lines.push_str(&u.line());
            installed_lines.push('\n');
        }
    }
    let write = |p: &Path, body: &str| -> std::io::Result<()> {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, body)
    };
    let mut pending_text: String = pending.iter().map(|u| u.line() + "\n").collect();
    if pending_text.is_empty() {
        pending_text = "# nothing pending\n".into();
    }
    let installed_path = root.join("kiln-wu/installed");
    let mut installed = std::fs::read_to_string(&installed_path).unwrap_or_default();
    installed.push_str(&installed_lines);
    let mut failed_text = failed_now.join("\n");
    if !failed_text.is_empty() {
        failed_text.push('\n');
    }
    let res = write(&pending_path, &pending_text)
        .and_then(|()| write(&installed_path, &installed))
        .and_then(|()| write(&state, &failed_text))
        .and_then(|()| {
            if reboot {
                write(&reboot_file, &format!("{}\n", boot_id.trim()))
            } else {
                Ok(())
            }
        });
    if let Err(e) = res {
        say(&format!(
            "kiln-wu (winrs emulation): writing the state files under {}: {e}",
            root.display()
        ));
        return (out, 1);
    }
    if !twice.is_empty() {
        say(&format!(
            "kiln-wu: failed in two rounds, stopping: {}",
            twice.join("; ")
        ));
        return (out, 102);
    }
    if reboot || reboot_pending() {
        say("kiln-wu: a reboot is required");
        return (out, 101);
    }
    if more {
        say(&format!(
            "kiln-wu: more updates remain beyond the limit of {limit}"
        ));
        return (out, 101);
    }
    if !failed_now.is_empty() {
        say("kiln-wu: some updates failed; another round retries them once");
        return (out, 101);
    }
    (out, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_round_script_is_recognised() {
        let s = "& (Join-Path $env:SystemRoot 'Temp\\kiln-windows-update.ps1') -SearchCriteria 'IsInstalled=0' -Filters @('exclude:$_.Title -like ''*Preview*''', 'include:$true') -UpdateLimit 20\nexit $LASTEXITCODE\n";
        assert_eq!(
            parse_round(s),
            Some(RoundCall {
                criteria: "IsInstalled=0".into(),
                filters: vec![
                    "exclude:$_.Title -like '*Preview*'".into(),
                    "include:$true".into()
                ],
                limit: 20
            })
        );
        assert_eq!(parse_round("echo hi\nexit $LASTEXITCODE"), None);
        // What the engine generates (its quoting of `'` included) is what the shim recognises.
        let e = kiln_engine::build::steps_windows::windows_update_script(
            "IsInstalled=0 and Type='Software'",
            &[
                "exclude:$_.Title -like '*Preview*'".into(),
                "$_.BrowseOnly".into(),
            ],
            0,
        );
        assert_eq!(
            parse_round(&e),
            Some(RoundCall {
                criteria: "IsInstalled=0 and Type='Software'".into(),
                filters: vec![
                    "exclude:$_.Title -like '*Preview*'".into(),
                    "include:$_.BrowseOnly".into()
                ],
                limit: 1000
            }),
            "{e}"
        );
    }

    #[test]
    fn like_is_powershells_wildcard() {
        assert!(like("2024-01 Preview of X", "*preview*"));
        assert!(like("KB1", "K?1"));
        assert!(!like("KB12", "K?1"));
        assert!(!like("Security", "*Preview*"));
    }

    fn root(name: &str) -> std::path::PathBuf {
        let r = std::env::temp_dir().join(format!("kiln-wu-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&r);
        std::fs::create_dir_all(r.join("kiln-wu")).unwrap();
        r
    }

    fn call(limit: u32) -> RoundCall {
        RoundCall {
            criteria: "BrowseOnly=0 and IsInstalled=0".into(),
            filters: vec![
                "exclude:$_.Title -like '*Preview*'".into(),
                "include:$true".into(),
            ],
            limit,
        }
    }

    #[test]
    fn rounds_install_up_to_the_limit_and_ask_for_reboots() {
        let r = root("rounds");
        std::fs::write(
            r.join("kiln-wu/pending"),
            "# comment\nKB1|Security Updates|Security Update (KB1)|reboot\nKB2|Definition Updates|Defender (KB2)\nKB3|Updates|Preview of Y (KB3)\n",
        )
        .unwrap();
        let (o, c) = run_round(&r, "boot-a", &call(1));
        assert_eq!(c, 101, "{o}");
        assert!(
            o.contains("kiln-wu: selected: Security Update (KB1)\n"),
            "{o}"
        );
        assert!(
            o.contains("kiln-wu: skipped (filters): Preview of Y (KB3)\n"),
            "{o}"
        );
        assert!(
            o.contains("kiln-wu: result 2 (HRESULT 0x00000000): Security Update (KB1)\n"),
            "{o}"
        );
        assert!(o.ends_with("kiln-wu: a reboot is required\n"), "{o}");
        // Same boot: still pending a reboot after the next install.
        let (o, c) = run_round(&r, "boot-a", &call(1));
        assert_eq!(c, 101, "{o}");
        // Another boot: KB2 installed, nothing needs a reboot, nothing left beyond the filters.
        let (o, c) = run_round(&r, "boot-b", &call(1));
        assert_eq!(c, 0, "{o}");
        assert!(o.contains("kiln-wu: no Windows updates to install"), "{o}");
        let inst = std::fs::read_to_string(r.join("kiln-wu/installed")).unwrap();
        assert!(
            inst.contains("KB1|") && inst.contains("KB2|") && !inst.contains("KB3"),
            "{inst}"
        );
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn an_update_failing_twice_stops_with_102_naming_it() {
        let r = root("fail");
        std::fs::write(r.join("kiln-wu/pending"), "KB9|Updates|Broken (KB9)|fail\n").unwrap();
        let (o, c) = run_round(&r, "a", &call(0));
        assert_eq!(c, 101, "{o}");
        assert!(
            o.contains("kiln-wu: result 4 (HRESULT 0x80070643): Broken (KB9)"),
            "{o}"
        );
        assert!(
            o.ends_with("kiln-wu: some updates failed; another round retries them once\n"),
            "{o}"
        );
        let (o, c) = run_round(&r, "b", &call(0));
        assert_eq!(c, 102, "{o}");
        assert!(
            o.ends_with("kiln-wu: failed in two rounds, stopping: Broken (KB9)\n"),
            "{o}"
        );
        let _ = std::fs::remove_dir_all(&r);
    }

    #[test]
    fn what_is_not_emulated_fails_the_round() {
        let r = root("unknown");
        std::fs::write(r.join("kiln-wu/pending"), "KB1|Updates|X (KB1)\n").unwrap();
        let mut c = call(0);
        c.criteria = "IsInstalled=0 or IsHidden=1".into();
        let (o, code) = run_round(&r, "a", &c);
        assert_eq!(code, 1, "{o}");
        assert!(o.contains("not emulated"), "{o}");
        let mut c = call(0);
        c.filters = vec!["include:$_.AutoSelectOnWebSites".into()];
        let (o, code) = run_round(&r, "a", &c);
        assert_eq!(code, 1, "{o}");
        assert!(
            o.contains("'$_.AutoSelectOnWebSites' is not emulated"),
            "{o}"
        );
        let _ = std::fs::remove_dir_all(&r);
    }
}
