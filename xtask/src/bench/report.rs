//! BENCH.md and bench/<date>.json from one run's raw results.

use super::util::stats;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `2026-11-28T11:30:00Z`.
pub fn now_utc() -> String {
    sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

/// What the numbers were measured on.
pub fn machine(repo: &Path, release: bool) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let dirty = !sh(
        "git",
        &[
            "-C",
            &repo.display().to_string(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    json!({
        "cores": sh("nproc", &[]),
        "cpu": model,
        "memoryGiB": (mem as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": sh("uname", &["-r"]),
        "accelerator": "TCG (every contender forced to TCG: /dev/kvm exists here but a KVM guest hangs)",
        "qemu": sh("qemu-system-x86_64", &["--version"]).lines().next().unwrap_or("").to_string(),
        "qemuImg": sh("qemu-img", &["--version"]).lines().next().unwrap_or("").to_string(),
        "packer": super::contenders::packer_version(),
        "libguestfs": sh("virt-customize", &["--version"]),
        "openssh": Command::new("ssh").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string()).unwrap_or_default(),
        "kilnCommit": format!("{}{}", sh("git", &["-C", &repo.display().to_string(), "rev-parse", "--short", "HEAD"]), if dirty { " (with uncommitted changes)" } else { "" }),
        "kilnProfile": if release { "release" } else { "debug" },
    })
}

fn f(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn median(v: &[f64]) -> f64 {
    stats(v).map(|s| s.0).unwrap_or(f64::NAN)
}

/// Per contender: total seconds by round (successful runs only).
fn totals(raw: &Value) -> BTreeMap<String, BTreeMap<u64, f64>> {
    let mut m: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for r in raw["contenderRuns"].as_array().into_iter().flatten() {
        if r["ok"] == true {
            m.entry(r["contender"].as_str().unwrap_or("").to_string())
                .or_default()
                .insert(
                    r["round"].as_u64().unwrap_or(0),
                    r["totalSeconds"].as_f64().unwrap_or(f64::NAN),
                );
        }
    }
    m
}

/// Pairwise ratios `a/b` over the rounds both completed.
fn pair_ratios(t: &BTreeMap<String, BTreeMap<u64, f64>>, a: &str, b: &str) -> Vec<f64> {
    let (Some(ra), Some(rb)) = (t.get(a), t.get(b)) else {
        return vec![];
    };
    ra.iter()
        .filter_map(|(round, va)| rb.get(round).map(|vb| va / vb))
        .collect()
}

fn kiln_extra(raw: &Value, key: &str) -> Vec<f64> {
    raw["contenderRuns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["contender"] == "kiln" && r["ok"] == true)
        .filter_map(|r| r["extra"][key].as_f64())
        .collect()
}

/// The targets of issue #7: (what, measured, target, met).
pub fn targets(raw: &Value) -> Vec<(String, String, String, Option<bool>)> {
    let t = totals(raw);
    let m = &raw["micro"];
    let mut out = Vec::new();
    let mut add = |what: &str, val: f64, shown: String, target: &str, ok: fn(f64) -> bool| {
        let met = if val.is_nan() { None } else { Some(ok(val)) };
        out.push((
            what.to_string(),
            if val.is_nan() {
                "not measured".into()
            } else {
                shown
            },
            target.to_string(),
            met,
        ));
    };
    let kf = median(&pair_ratios(&t, "kiln", "floor"));
    add(
        "kiln end to end vs the floor",
        kf,
        format!("{}×", f(kf)),
        "≤ 1.05×",
        |v| v <= 1.05,
    );
    let kp = median(&pair_ratios(&t, "kiln", "packer"));
    add(
        "kiln end to end vs Packer",
        kp,
        format!("{}×", f(kp)),
        "≤ 0.6×",
        |v| v <= 0.6,
    );
    let oh = median(&kiln_extra(raw, "engineOverheadSeconds"));
    add(
        "engine overhead (total − guest − export)",
        oh,
        format!("{} s", f(oh)),
        "≤ 0.5 s",
        |v| v <= 0.5,
    );
    let lag = median(&kiln_extra(raw, "pollLagSeconds"));
    add(
        "readiness lag (guest sshd listening → kiln's login starts: lag − key exchange/login)",
        lag,
        format!("{} ms", f(lag * 1000.0)),
        "≤ 100 ms",
        |v| v <= 0.1,
    );
    let prep = m["prep"]["ratio64to1"].as_f64().unwrap_or(f64::NAN);
    add(
        "source prep 64 GiB / 1 GiB",
        prep,
        format!("{}×", f(prep)),
        "≤ 1.1×",
        |v| v <= 1.1,
    );
    let ex = m["export"]["ratio"].as_f64().unwrap_or(f64::NAN);
    add(
        "VHD export vs bare qemu-img convert",
        ex,
        format!("{}×", f(ex)),
        "≤ 1.1×",
        |v| v <= 1.1,
    );
    let sha = m["sha256"]["kilnHashMBps"].as_f64().unwrap_or(f64::NAN)
        / m["sha256"]["sha256sumMBps"].as_f64().unwrap_or(f64::NAN);
    add(
        "SHA-256 throughput vs sha256sum (kiln's hash)",
        sha,
        format!("{}×", f(sha)),
        "≥ 1×",
        |v| v >= 1.0,
    );
    let up = m["upload"]["ratioToOpensshCat"]
        .as_f64()
        .unwrap_or(f64::NAN);
    add(
        "SSH upload throughput vs OpenSSH `ssh cat >`",
        up,
        format!("{}×", f(up)),
        "≥ 0.8×",
        |v| v >= 0.8,
    );
    let wf = m["winfile"]["pullMBps"].as_f64().unwrap_or(f64::NAN);
    add(
        "Windows file delivery (HTTP pull from the file endpoint; issue #8)",
        wf,
        format!(
            "{} MB/s ({}× the WinRM-chunked upload)",
            f(wf),
            f(m["winfile"]["ratio"].as_f64().unwrap_or(f64::NAN))
        ),
        "≥ 3 MB/s",
        |v| v >= 3.0,
    );
    let rss = median(&kiln_extra(raw, "peakRssKiB")) * 1024.0 / 1e6;
    add(
        "engine peak RSS per build",
        rss,
        format!("{} MB", f(rss)),
        "≤ 30 MB",
        |v| v <= 30.0,
    );
    out
}

/// Phase name → seconds per run, for one contender (phases in first-seen order).
fn phases(raw: &Value, contender: &str) -> Vec<(String, Vec<f64>)> {
    let mut order: Vec<(String, Vec<f64>)> = Vec::new();
    for r in raw["contenderRuns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["contender"] == contender && r["ok"] == true)
    {
        for p in r["phases"].as_array().into_iter().flatten() {
            let name = p["phase"].as_str().unwrap_or("").to_string();
            let s = p["seconds"].as_f64().unwrap_or(f64::NAN);
            match order.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(s),
                None => order.push((name, vec![s])),
            }
        }
    }
    order
}

/// `median (min–max)` of a summary, in seconds.
fn sum_row(v: &Value) -> String {
    format!(
        "{} s ({}–{})",
        f(v["median"].as_f64().unwrap_or(f64::NAN)),
        f(v["min"].as_f64().unwrap_or(f64::NAN)),
        f(v["max"].as_f64().unwrap_or(f64::NAN))
    )
}

/// An error on one line, its last 400 characters (where the cause is).
fn one_line(e: &str) -> String {
    let s = e.replace('\n', " ⏎ ").replace('|', "\\|");
    let n = s.chars().count();
    if n > 400 {
        format!("…{}", s.chars().skip(n - 400).collect::<String>())
    } else {
        s
    }
}

/// Renders BENCH.md.
pub fn markdown(raw: &Value, json_name: &str) -> String {
    let mut s = String::new();
    let m = &raw["machine"];
    let _ = writeln!(s, "# kiln benchmarks\n");
    let _ = writeln!(s, "Generated by `cargo xtask bench` (docs/bench.md); raw results: [`{json_name}`]({json_name}).\n");
    let _ = writeln!(
        s,
        "- **Command**: `{}`",
        raw["command"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Date**: {} → {}",
        raw["started"].as_str().unwrap_or(""),
        raw["finished"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Machine**: {} cores ({}), {} GiB RAM, kernel {}",
        m["cores"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["memoryGiB"],
        m["kernel"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Accelerator**: {}",
        m["accelerator"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Tools**: {}; {}; {}; {}; {}",
        m["qemu"].as_str().unwrap_or(""),
        m["qemuImg"].as_str().unwrap_or(""),
        m["packer"].as_str().unwrap_or(""),
        m["libguestfs"].as_str().unwrap_or(""),
        m["openssh"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **kiln**: commit {}, {} build",
        m["kilnCommit"].as_str().unwrap_or(""),
        m["kilnProfile"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Load** (1/5/15-min load average; the machine is shared, which inflates absolute times — compare ratios within this run): before {}, after {}",
        raw["load"]["before"].as_str().unwrap_or(""),
        raw["load"]["after"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Job** (same source for every contender: the `tiny` test guest, {}; build VM {}): {}\n",
        raw["job"]["sourceVersion"].as_str().unwrap_or(""),
        raw["job"]["vm"].as_str().unwrap_or(""),
        raw["job"]["steps"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" → "))
            .unwrap_or_default()
    );

    // end to end
    let t = totals(raw);
    let _ = writeln!(
        s,
        "## End to end (wall seconds, {} interleaved round(s))\n",
        raw["runs"]
    );
    let _ = writeln!(s, "| contender | runs ok | median | min | max | ratio to kiln (median of per-round contender/kiln) |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for name in super::contenders::NAMES {
        let attempted = raw["contenderRuns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["contender"] == *name)
            .count();
        if attempted == 0 {
            continue;
        }
        let v: Vec<f64> = t
            .get(*name)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        let (med, min, max) = stats(&v).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let ratio = if *name == "kiln" {
            "1".to_string()
        } else {
            format!("{}×", f(median(&pair_ratios(&t, name, "kiln"))))
        };
        let _ = writeln!(
            s,
            "| {name} | {}/{attempted} | {} | {} | {} | {ratio} |",
            v.len(),
            f(med),
            f(min),
            f(max)
        );
    }
    let failures: Vec<String> = raw["contenderRuns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["ok"] != true)
        .map(|r| {
            format!(
                "- {} round {}: {}",
                r["contender"].as_str().unwrap_or(""),
                r["round"],
                one_line(r["error"].as_str().unwrap_or(""))
            )
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nFailed runs:\n{}", failures.join("\n"));
    }

    // targets
    let _ = writeln!(s, "\n## Targets (issues #7, #8)\n");
    let _ = writeln!(s, "| target | measured | wanted | |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (what, val, target, met) in targets(raw) {
        let mark = match met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "–",
        };
        let _ = writeln!(s, "| {what} | {val} | {target} | {mark} |");
    }

    // phases
    let _ = writeln!(s, "\n## Phases (median seconds over the successful runs)\n");
    for name in super::contenders::NAMES {
        let ph = phases(raw, name);
        if ph.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "**{name}**: {}\n",
            ph.iter()
                .map(|(n, v)| format!("{n} {}", f(median(v))))
                .collect::<Vec<_>>()
                .join(" · ")
        );
    }
    let oh = kiln_extra(raw, "engineOverheadSeconds");
    if !oh.is_empty() {
        let lag = kiln_extra(raw, "readinessLagSeconds");
        let floor_lag: Vec<f64> = raw["contenderRuns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["contender"] == "floor" && r["ok"] == true)
            .filter_map(|r| r["extra"]["readinessLagSeconds"].as_f64())
            .collect();
        let rss = kiln_extra(raw, "peakRssKiB");
        let _ = writeln!(
            s,
            "kiln: engine overhead (wall − guest steps Start VM…Shutdown − export) median {} s (min {}, max {}); console `KILN-READY` (sshd listening) → kiln's `Connect` step done: median {} ms, of which key exchange + login in the guest {} ms (the floor's OpenSSH poll with its ControlMaster login: {} ms); peak RSS median {} MiB.\n",
            f(median(&oh)),
            f(stats(&oh).map(|x| x.1).unwrap_or(f64::NAN)),
            f(stats(&oh).map(|x| x.2).unwrap_or(f64::NAN)),
            f(median(&lag) * 1000.0),
            f(median(&kiln_extra(raw, "handshakeSeconds")) * 1000.0),
            f(median(&floor_lag) * 1000.0),
            f(median(&rss) / 1024.0)
        );
    }

    // micro
    let mi = &raw["micro"];
    if mi.as_object().is_some_and(|o| !o.is_empty()) {
        let _ = writeln!(
            s,
            "## Micro-benchmarks (each beside its baseline, interleaved; median (min–max))\n"
        );
        let _ = writeln!(s, "| benchmark | kiln | baseline | ratio / note |");
        let _ = writeln!(s, "|---|---|---|---|");
        let p = &mi["prep"];
        if p.get("kiln1GiB").is_some() {
            let _ = writeln!(
                s,
                "| source prep (overlay), 1 GiB source | {} | – | |",
                sum_row(&p["kiln1GiB"])
            );
            let _ = writeln!(s, "| source prep (overlay), 64 GiB sparse source | {} | bare `qemu-img create -b`: {} | 64/1 = {}× |", sum_row(&p["kiln64GiB"]), sum_row(&p["bareQemuImgCreate64GiB"]), f(p["ratio64to1"].as_f64().unwrap_or(f64::NAN)));
        }
        let e = &mi["export"];
        if e.get("kiln").is_some() {
            let _ = writeln!(
                s,
                "| fixed VHD export of a 1 GiB disk (`export_fixed_vhd` in the engine: convert + footer check + fsync + rename; `kiln __bench` process wall {}) | {} | `qemu-img convert -O vpc` (process wall): {} | {}×; bytes written: kiln {} MiB, bare {} MiB |",
                if e.get("kilnProcessWall").is_some() { sum_row(&e["kilnProcessWall"]) } else { "–".to_string() },
                sum_row(&e["kiln"]),
                sum_row(&e["bareQemuImg"]),
                f(e["ratio"].as_f64().unwrap_or(f64::NAN)),
                e["kilnBytesWritten"].as_u64().unwrap_or(0) >> 20,
                e["bareBytesWritten"].as_u64().unwrap_or(0) >> 20
            );
        }
        let h = &mi["sha256"];
        if h.get("kilnHash").is_some() {
            let mib = h["bytes"].as_u64().unwrap_or(0) >> 20;
            let _ = writeln!(s, "| SHA-256 of {mib} MiB: kiln's hash (sha2, 64 KiB reads) | {} | `sha256sum`: {} | {} vs {} MB/s |", sum_row(&h["kilnHash"]), sum_row(&h["sha256sum"]), f(h["kilnHashMBps"].as_f64().unwrap_or(f64::NAN)), f(h["sha256sumMBps"].as_f64().unwrap_or(f64::NAN)));
            let _ = writeln!(s, "| SHA-256 of {mib} MiB: kiln's artifact fetch (hash + copy + fsync) | {} | `sha256sum`: {} | {} MB/s |", sum_row(&h["kilnFetch"]), sum_row(&h["sha256sum"]), f(h["kilnFetchMBps"].as_f64().unwrap_or(f64::NAN)));
        }
        let u = &mi["upload"];
        if u.get("kiln").is_some() {
            let mib = u["bytes"].as_u64().unwrap_or(0) >> 20;
            let _ = writeln!(
                s,
                "| SSH upload of {mib} MiB to the tiny guest's dropbear (tmpfs) | {} | `ssh cat >` (mux): {}; `scp`: {} | kiln {} MB/s, ssh cat {} MB/s, scp {} MB/s; ratio {}× |",
                sum_row(&u["kiln"]),
                sum_row(&u["opensshCat"]),
                sum_row(&u["scp"]),
                f(u["kilnMBps"].as_f64().unwrap_or(f64::NAN)),
                f(u["opensshCatMBps"].as_f64().unwrap_or(f64::NAN)),
                f(u["scpMBps"].as_f64().unwrap_or(f64::NAN)),
                f(u["ratioToOpensshCat"].as_f64().unwrap_or(f64::NAN))
            );
        }
        let w = &mi["winfile"];
        if w.get("pull").is_some() {
            let mib = w["bytes"].as_u64().unwrap_or(0) >> 20;
            let _ = writeln!(
                s,
                "| Windows file delivery of {mib} MiB to the WinRS test server (HTTP + NTLM sealed; `{}`): kiln's HTTP pull from the file endpoint | {} | WinRM-chunked upload (Packer's way): {} | pull {} MB/s, chunked {} MB/s ({} commands, {} WS-Man requests); {}× |",
                w["command"].as_str().unwrap_or("winfile_bench"),
                sum_row(&w["pull"]),
                sum_row(&w["chunked"]),
                f(w["pullMBps"].as_f64().unwrap_or(f64::NAN)),
                f(w["chunkedMBps"].as_f64().unwrap_or(f64::NAN)),
                w["chunkedCommands"],
                w["chunkedRequests"],
                f(w["ratio"].as_f64().unwrap_or(f64::NAN))
            );
        }
        let c = &mi["concurrency"];
        if let Some(o) = c.as_object() {
            for (n, v) in o.iter().filter(|(k, _)| *k != "single" && *k != "error") {
                let _ = writeln!(
                    s,
                    "| {n} concurrent kiln builds: wall until all done | {} | 1 build: {} | {}× the single wall; throughput {}× one build; per build {} s; peak RSS per build {} MiB |",
                    f(v["wall"].as_f64().unwrap_or(f64::NAN)),
                    f(c["single"].as_f64().unwrap_or(f64::NAN)),
                    f(v["wallRatioToSingle"].as_f64().unwrap_or(f64::NAN)),
                    f(v["throughputRatio"].as_f64().unwrap_or(f64::NAN)),
                    f(v["perBuild"]["median"].as_f64().unwrap_or(f64::NAN)),
                    f(v["peakRssKiB"]["median"].as_f64().unwrap_or(f64::NAN) / 1024.0)
                );
            }
        }
        for (k, v) in mi.as_object().into_iter().flatten() {
            if let Some(e) = v.get("error") {
                let _ = writeln!(
                    s,
                    "| {k} | failed: {} | | |",
                    one_line(e.as_str().unwrap_or(""))
                );
            }
        }
    }
    s
}

/// Re-renders `<out>/BENCH.md` from a raw result `<out>/bench/<date>.json` (after a change to
/// this renderer), keeping the hand-written analysis. Returns BENCH.md's path.
pub fn render(json_path: &Path) -> Result<PathBuf> {
    let raw: Value = serde_json::from_slice(
        &std::fs::read(json_path).with_context(|| format!("reading {}", json_path.display()))?,
    )
    .with_context(|| format!("parsing {}", json_path.display()))?;
    let out = json_path
        .parent()
        .and_then(Path::parent)
        .context("the JSON must be in <out>/bench/")?;
    let name = format!(
        "bench/{}",
        json_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    write_md(out, &raw, &name)
}

/// Starts BENCH.md's provisioning section.
pub const PROVISIONING_START: &str = "<!-- provisioning -->";
/// Ends it.
pub const PROVISIONING_END: &str = "<!-- /provisioning -->";

/// The provisioning section (issue #5) of `raw`, between its markers.
pub fn provisioning_md(raw: &Value, json_name: &str) -> String {
    let p = &raw["provisioning"];
    let mut s = String::new();
    let _ = writeln!(s, "{PROVISIONING_START}");
    let _ = writeln!(
        s,
        "## Azure provisioning vs NoCloud (issue #5)
"
    );
    let _ = writeln!(
        s,
        "`{}` at {} (kiln {}, {} build; load before {}, after {}; raw: [`{json_name}`]({json_name})). Same image — the `debian` test guest {} (cloud-init with both datasources, waagent), Gen1, {}, TCG — and one no-op customizer; `--provisioning azure` (ovf-env.xml CD, kiln's fabric and DHCP) beside `--provisioning nocloud`. The two builds of a pair run side by side (same host load), the first to start alternating. Seconds from QEMU's start to an authenticated SSH session (`connectedSeconds` of the `provisioned` event), for Azure also to the Ready health report. `cargo xtask bench --only provisioning [--runs N]` runs N pairs (default 3); not part of `--quick`.\n",
        raw["command"].as_str().unwrap_or(""),
        raw["started"].as_str().unwrap_or(""),
        raw["machine"]["kilnCommit"].as_str().unwrap_or("?"),
        raw["machine"]["kilnProfile"].as_str().unwrap_or("?"),
        raw["load"]["before"].as_str().unwrap_or(""),
        raw["load"]["after"].as_str().unwrap_or(""),
        p["imageVersion"].as_str().unwrap_or(""),
        p["vm"].as_str().unwrap_or("")
    );
    if let Some(e) = p.get("error") {
        let _ = writeln!(s, "Failed: {}\n", one_line(e.as_str().unwrap_or("")));
        let _ = writeln!(s, "{PROVISIONING_END}");
        return s;
    }
    let pairs = p["pairs"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(s, "| seconds | runs ok | median | min | max |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (what, k) in [
        ("azure: QEMU start → connected", "azureConnected"),
        ("azure: QEMU start → health Ready", "azureReady"),
        ("nocloud: QEMU start → connected", "nocloudConnected"),
    ] {
        let v = &p[k];
        let _ = writeln!(
            s,
            "| {what} | {}/{} | {} | {} | {} |",
            v["n"].as_u64().unwrap_or(0),
            pairs.len(),
            f(v["median"].as_f64().unwrap_or(f64::NAN)),
            f(v["min"].as_f64().unwrap_or(f64::NAN)),
            f(v["max"].as_f64().unwrap_or(f64::NAN))
        );
    }
    let _ = writeln!(
        s,
        "\n| pair | first | azure connected | azure Ready | nocloud connected | azure / nocloud |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let cell = |v: &Value, k: &str| match (v["ok"].as_bool(), v[k].as_f64()) {
        (Some(true), Some(x)) => f(x),
        (Some(false), _) => format!("failed: {}", one_line(v["error"].as_str().unwrap_or(""))),
        _ => "–".into(),
    };
    for pr in &pairs {
        let ratio = match (
            pr["azure"]["connectedSeconds"].as_f64(),
            pr["nocloud"]["connectedSeconds"].as_f64(),
        ) {
            (Some(a), Some(n)) => format!("{}×", f(a / n)),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {ratio} |",
            pr["round"].as_u64().unwrap_or(0) + 1,
            pr["first"].as_str().unwrap_or(""),
            cell(&pr["azure"], "connectedSeconds"),
            cell(&pr["azure"], "readySeconds"),
            cell(&pr["nocloud"], "connectedSeconds"),
        );
    }
    let ratio = p["ratioMedian"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "\nTarget: Azure ≤ {}× NoCloud (median of the pair ratios): measured {}× — {}.\n",
        f(p["target"].as_f64().unwrap_or(f64::NAN)),
        f(ratio),
        match p["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        }
    );
    let _ = writeln!(s, "{PROVISIONING_END}");
    s
}

/// The part of an old BENCH.md between the provisioning markers (with them), if any.
fn old_section(old: &str) -> Option<&str> {
    let a = old.find(PROVISIONING_START)?;
    let b = old[a..].find(PROVISIONING_END)? + a + PROVISIONING_END.len();
    Some(&old[a..b])
}

/// BENCH.md from `raw` and the old BENCH.md: a run of only `provisioning` replaces only its
/// section (the rest stays from the last full run), any other run keeps an old provisioning
/// section it did not measure; hand-written analysis (after `<!-- analysis -->`) stays.
pub fn compose(raw: &Value, name: &str, old: Option<&str>) -> String {
    let has_prov = raw.get("provisioning").is_some();
    let only_prov = has_prov
        && raw["contenderRuns"].as_array().is_none_or(|a| a.is_empty())
        && raw["micro"].as_object().is_none_or(|o| o.is_empty());
    let old_main = old.filter(|_| only_prov).map(|o| {
        let end = [o.find(PROVISIONING_START), o.find("<!-- analysis -->")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(o.len());
        o[..end].trim_end().to_string() + "\n"
    });
    let mut md = old_main.unwrap_or_else(|| markdown(raw, name));
    let section = if has_prov {
        Some(provisioning_md(raw, name))
    } else {
        old.and_then(old_section).map(|s| format!("{s}\n"))
    };
    if let Some(sec) = section {
        md.push('\n');
        md.push_str(&sec);
    }
    if let Some(i) = old.and_then(|o| o.find("<!-- analysis -->")) {
        md.push('\n');
        md.push_str(&old.unwrap_or("")[i..]);
    }
    md
}

fn write_md(out: &Path, raw: &Value, name: &str) -> Result<PathBuf> {
    let md_path = out.join("BENCH.md");
    let old = std::fs::read_to_string(&md_path).ok();
    let md = compose(raw, name, old.as_deref());
    std::fs::write(&md_path, md)?;
    Ok(md_path)
}

/// Writes `<out>/bench/<date>.json` and `<out>/BENCH.md`; returns BENCH.md's path. Analysis
/// written by hand below the generated part of an existing BENCH.md (after the line
/// `<!-- analysis -->`) is kept.
pub fn write(out: &Path, raw: &Value) -> Result<PathBuf> {
    let dir = out.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = raw["started"].as_str().unwrap_or("run").replace(':', "");
    let name = format!("bench/{stamp}.json");
    std::fs::write(out.join(&name), serde_json::to_vec_pretty(raw)?)?;
    write_md(out, raw, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(contender: &str, round: u64, total: f64, extra: Value) -> Value {
        json!({"contender": contender, "round": round, "ok": true, "totalSeconds": total,
               "phases": [{"phase": "boot→SSH ready", "seconds": total / 2.0}], "extra": extra})
    }

    fn raw() -> Value {
        let k = |oh: f64| json!({"engineOverheadSeconds": oh, "pollLagSeconds": 0.05, "readinessLagSeconds": 0.4, "handshakeSeconds": 0.35, "peakRssKiB": 20000});
        json!({
            "command": "cargo xtask bench", "started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:10:00Z",
            "runs": 2, "machine": {"cores": "2"}, "load": {"before": "1", "after": "1"}, "job": {},
            "contenderRuns": [
                run("kiln", 0, 20.0, k(0.2)), run("floor", 0, 19.0, json!({})), run("packer", 0, 40.0, json!({})),
                run("kiln", 1, 22.0, k(0.3)), run("floor", 1, 20.0, json!({})), run("packer", 1, 30.0, json!({})),
                {"contender": "virt-customize", "round": 0, "ok": false, "error": "boom\nsecond line"}
            ],
            "micro": {"prep": {"ratio64to1": 1.5}, "upload": {"error": "no guest"},
                "winfile": {"bytes": 33554432, "command": "cargo run -p kiln-tests --example winfile_bench -- --mib 32 --reps 3",
                    "pull": {"median": 0.2, "min": 0.19, "max": 0.3}, "chunked": {"median": 40.0, "min": 39.0, "max": 41.0},
                    "pullMBps": 167.77, "chunkedMBps": 0.84, "ratio": 200.0, "chunkedCommands": 5494, "chunkedRequests": 16482}}
        })
    }

    #[test]
    fn targets_use_per_round_ratios() {
        let t = targets(&raw());
        let get = |p: &str| t.iter().find(|x| x.0.starts_with(p)).unwrap().clone();
        // kiln/floor per round: 20/19 = 1.053, 22/20 = 1.1 → median 1.076: missed
        assert_eq!(get("kiln end to end vs the floor").3, Some(false));
        // kiln/packer: 0.5, 0.733 → median 0.617: missed
        assert_eq!(get("kiln end to end vs Packer").1, "0.62×");
        assert_eq!(get("engine overhead").3, Some(true));
        assert_eq!(get("readiness lag").3, Some(true));
        assert_eq!(get("source prep").3, Some(false));
        assert_eq!(get("VHD export").3, None, "not measured");
        assert_eq!(get("engine peak RSS").3, Some(true));
        let w = get("Windows file delivery");
        assert_eq!(
            (w.1.as_str(), w.3),
            ("168 MB/s (200× the WinRM-chunked upload)", Some(true))
        );
    }

    #[test]
    fn markdown_has_the_tables_failures_on_one_line_and_ratios() {
        let md = markdown(&raw(), "bench/x.json");
        assert!(
            md.contains("| kiln | 2/2 | 21.0 | 20.0 | 22.0 | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| floor | 2/2 | 19.5 | 19.0 | 20.0 | 0.93× |"),
            "{md}"
        );
        assert!(
            md.contains("- virt-customize round 0: boom ⏎ second line"),
            "{md}"
        );
        assert!(md.contains("| upload | failed: no guest |"), "{md}");
        assert!(
            md.contains("| Windows file delivery of 32 MiB to the WinRS test server (HTTP + NTLM sealed; `cargo run -p kiln-tests --example winfile_bench -- --mib 32 --reps 3`): kiln's HTTP pull from the file endpoint | 0.20 s (0.19–0.30) | WinRM-chunked upload (Packer's way): 40.0 s (39.0–41.0) | pull 168 MB/s, chunked 0.84 MB/s (5494 commands, 16482 WS-Man requests); 200× |"),
            "{md}"
        );
        assert!(md.contains("**missed**") && md.contains("| met |"));
    }

    fn prov_raw() -> Value {
        let pair = |r: u64, first: &str, a: f64, n: f64| {
            json!({"round": r, "first": first,
            "azure": {"ok": true, "connectedSeconds": a, "readySeconds": a - 40.0},
            "nocloud": {"ok": true, "connectedSeconds": n}})
        };
        let pairs = vec![
            pair(0, "azure", 220.0, 200.0),
            pair(1, "nocloud", 210.0, 200.0),
            json!({"round": 2, "first": "azure", "azure": {"ok": false, "error": "boom"}, "nocloud": {"ok": true, "connectedSeconds": 190.0}}),
        ];
        json!({
            "command": "cargo xtask bench --only provisioning", "started": "2026-01-02T00:00:00Z",
            "load": {"before": "1", "after": "2"}, "contenderRuns": [], "micro": {},
            "provisioning": super::super::provisioning::summarize(pairs, "/x/disk.qcow2", "1.0.7"),
        })
    }

    #[test]
    fn provisioning_section_has_pairs_ratios_and_the_target() {
        let md = provisioning_md(&prov_raw(), "bench/p.json");
        assert!(md.starts_with(PROVISIONING_START) && md.trim_end().ends_with(PROVISIONING_END));
        assert!(
            md.contains("`cargo xtask bench --only provisioning`"),
            "{md}"
        );
        assert!(
            md.contains("| azure: QEMU start → connected | 2/3 | 215 | 210 | 220 |"),
            "{md}"
        );
        assert!(
            md.contains("| nocloud: QEMU start → connected | 3/3 | 200 | 190 | 200 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | azure | 220 | 180 | 200 | 1.10× |"),
            "{md}"
        );
        assert!(
            md.contains("| 3 | azure | failed: boom | failed: boom | 190 | – |"),
            "{md}"
        );
        // pair ratios 1.1 and 1.05: median 1.075
        assert!(
            md.contains("Azure ≤ 1.20× NoCloud (median of the pair ratios): measured 1.08× — met."),
            "{md}"
        );
    }

    #[test]
    fn a_provisioning_run_replaces_only_its_section() {
        let full = compose(&raw(), "bench/x.json", None);
        let with_analysis = format!("{full}\n<!-- analysis -->\nhand-written\n");
        // provisioning only: the main part stays, the section is added before the analysis
        let a = compose(&prov_raw(), "bench/p.json", Some(&with_analysis));
        assert!(a.starts_with(full.trim_end()), "{a}");
        assert!(a.contains("| kiln | 2/2 | 21.0 | 20.0 | 22.0 | 1 |"));
        let (i, j) = (
            a.find(PROVISIONING_START).unwrap(),
            a.find("<!-- analysis -->").unwrap(),
        );
        assert!(i < j && a.ends_with("hand-written\n"), "{a}");
        // again: replaced, not duplicated
        let b = compose(&prov_raw(), "bench/p2.json", Some(&a));
        assert_eq!(b.matches(PROVISIONING_START).count(), 1, "{b}");
        assert!(
            b.contains("bench/p2.json") && !b.contains("bench/p.json"),
            "{b}"
        );
        // a full run without provisioning keeps the old section
        let c = compose(&raw(), "bench/y.json", Some(&b));
        assert!(
            c.contains("bench/y.json") && c.contains("bench/p2.json"),
            "{c}"
        );
        assert_eq!(c.matches(PROVISIONING_START).count(), 1, "{c}");
        assert!(c.ends_with("hand-written\n"), "{c}");
    }

    #[test]
    fn render_keeps_the_analysis() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let md = write(&dir, &raw()).unwrap();
        let text = std::fs::read_to_string(&md).unwrap();
        std::fs::write(&md, format!("{text}\n<!-- analysis -->\nhand-written\n")).unwrap();
        let again = render(&dir.join("bench/2026-01-01T000000Z.json")).unwrap();
        let text = std::fs::read_to_string(again).unwrap();
        assert!(
            text.starts_with("# kiln benchmarks")
                && text.ends_with("<!-- analysis -->\nhand-written\n")
        );
        assert_eq!(text.matches("# kiln benchmarks").count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
