//! `--only provisioning`: the time from QEMU's start to provisioned-and-connected with Azure
//! provisioning (ovf-env.xml + the emulated fabric + kiln's DHCP) beside NoCloud, on the same
//! image (the `debian` test guest, which has both datasources), in pairs: the two builds of a
//! pair run side by side, so both see the same host load, and which one starts first
//! alternates. Each build's `provisioned` event gives `connectedSeconds` (QEMU start → an
//! authenticated SSH session) and, for Azure, `readySeconds` (→ the Ready health report).
//!
//! Not part of `--quick`: a Debian boot takes minutes under TCG.

use super::util;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The benchmark's name for `--only`.
pub const NAME: &str = "provisioning";
/// The two methods, in the order of the first pair.
pub const METHODS: [&str; 2] = ["azure", "nocloud"];
/// The build VM (2 vCPUs, as on Azure).
pub const VM_SIZE: &str = "Standard_D2s_v3";
/// The issue #5 target: Azure ≤ 1.2× NoCloud.
pub const TARGET: f64 = 1.2;

/// Runs `pairs` pairs with `kiln` on the `debian` guest; scratch in `work` (removed after).
pub fn run(kiln: &Path, work: &Path, pairs: usize) -> Result<Value> {
    let img = crate::images::ensure(
        "debian",
        &crate::images::Options {
            force: false,
            quiet: false,
        },
    )?;
    let dir = work.join("provisioning");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let home = dir.join("home");
    let st = Command::new(kiln)
        .env("KILN_HOME", &home)
        .args([
            "image",
            "import",
            "--publisher",
            "kiln",
            "--offer",
            "bench",
            "--sku",
            "gen1",
            "--version",
            "1.0.0",
        ])
        .arg(&img.disk)
        .stdout(Stdio::null())
        .status()
        .context("kiln image import")?;
    if !st.success() {
        bail!("kiln image import {} failed ({st})", img.disk.display());
    }
    let template = dir.join("t.json");
    std::fs::write(&template, serde_json::to_vec(&template_json())?)?;
    let mut out = Vec::new();
    for round in 0..pairs {
        let order = if round % 2 == 0 {
            METHODS
        } else {
            [METHODS[1], METHODS[0]]
        };
        super::log(format!(
            "provisioning pair {}/{pairs}: {} and {} side by side (load {})",
            round + 1,
            order[0],
            order[1],
            util::loadavg()
        ));
        let mut children = Vec::new();
        for m in order {
            let stdout = std::fs::File::create(dir.join(format!("{m}-{round}.jsonl")))?;
            let stderr = std::fs::File::create(dir.join(format!("{m}-{round}.err")))?;
            let child = Command::new(kiln)
                .env("KILN_HOME", &home)
                .args([
                    "build",
                    "--accel",
                    "tcg",
                    "--output",
                    "json",
                    "--provisioning",
                    m,
                ])
                .args(["--name", &format!("bench-{m}-{round}")])
                .arg(&template)
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting kiln build --provisioning {m}"))?;
            children.push((m, Instant::now(), child));
        }
        let mut pair = serde_json::Map::new();
        pair.insert("round".into(), json!(round));
        pair.insert("first".into(), json!(order[0]));
        for (m, t0, mut child) in children {
            let status = child.wait()?;
            let wall = util::secs(t0, Instant::now());
            let events =
                std::fs::read_to_string(dir.join(format!("{m}-{round}.jsonl"))).unwrap_or_default();
            let r = parse_build(&events, status.success(), wall, || {
                std::fs::read_to_string(dir.join(format!("{m}-{round}.err"))).unwrap_or_default()
            });
            match r["connectedSeconds"].as_f64() {
                Some(c) => super::log(format!("  {m}: connected {c:.1}s after QEMU started")),
                None => super::log(format!("  {m} FAILED: {}", r["error"])),
            }
            pair.insert(m.into(), r);
        }
        let _ = std::fs::remove_dir_all(home.join("staging"));
        out.push(Value::Object(pair));
    }
    let v = summarize(
        out,
        &img.disk.display().to_string(),
        img.meta["version"].as_str().unwrap_or(""),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(v)
}

/// The template both builds run: one no-op customizer, a VHD.
pub fn template_json() -> Value {
    json!({"type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01", "location": "westus2",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
        "properties": {"vmProfile": {"vmSize": VM_SIZE},
            "source": {"type": "PlatformImage", "publisher": "kiln", "offer": "bench", "sku": "gen1", "version": "latest"},
            "customize": [{"type": "Shell", "name": "noop", "inline": ["true"]}],
            "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}})
}

/// One build's result from its JSON event stream: the `provisioned` event's numbers, or why
/// there are none.
pub fn parse_build(events: &str, ok: bool, wall: f64, stderr: impl FnOnce() -> String) -> Value {
    let prov = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "provisioned");
    match (ok, prov) {
        (true, Some(p)) if p["connectedSeconds"].as_f64().is_some() => json!({
            "ok": true,
            "connectedSeconds": p["connectedSeconds"],
            "readySeconds": p["readySeconds"],
            "agent": p["agent"],
            "health": p["health"],
            "wallSeconds": wall,
        }),
        (ok, p) => {
            let err = stderr();
            let tail: String = err
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            json!({
                "ok": false,
                "wallSeconds": wall,
                "error": if !ok { format!("kiln build failed: {tail}") } else { format!("no provisioned event ({p:?})") },
            })
        }
    }
}

/// Medians, ranges and the per-pair ratios azure/nocloud of `connectedSeconds`.
pub fn summarize(pairs: Vec<Value>, image: &str, version: &str) -> Value {
    let col =
        |m: &str, k: &str| -> Vec<f64> { pairs.iter().filter_map(|p| p[m][k].as_f64()).collect() };
    let ratios: Vec<f64> = pairs
        .iter()
        .filter_map(|p| {
            Some(
                p["azure"]["connectedSeconds"].as_f64()?
                    / p["nocloud"]["connectedSeconds"].as_f64()?,
            )
        })
        .collect();
    let summary = |v: &[f64]| match util::stats(v) {
        Some((med, min, max)) => json!({"median": med, "min": min, "max": max, "n": v.len()}),
        None => json!({"n": 0}),
    };
    let ratio = util::stats(&ratios).map(|s| s.0);
    json!({
        "image": image,
        "imageVersion": version,
        "vm": VM_SIZE,
        "pairs": pairs,
        "azureConnected": summary(&col("azure", "connectedSeconds")),
        "azureReady": summary(&col("azure", "readySeconds")),
        "nocloudConnected": summary(&col("nocloud", "connectedSeconds")),
        "ratios": ratios,
        "ratioMedian": ratio,
        "target": TARGET,
        "met": ratio.map(|r| r <= TARGET),
    })
}
