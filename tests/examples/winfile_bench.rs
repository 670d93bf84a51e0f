//! "Windows file delivery": the same file sent to the WinRS test server over NTLM-sealed HTTP
//! on 127.0.0.1, two ways, interleaved: kiln's WinRM-chunked upload (base64 appended to a
//! temporary file by `cmd.exe echo` lines, then one decoding PowerShell: the way Packer's WinRM
//! communicator uploads) and kiln's HTTP pull (the per-build file endpoint,
//! engine/src/fabric/files.rs, fetched by kiln's pull script, which the test server's shim
//! performs as one HTTP GET). Both end with the guest's size and SHA-256 check; every delivered
//! file is compared with the source.
//!
//! `cargo run --release -p kiln-tests --example winfile_bench -- [--mib N] [--reps R] [--json]`
//! (default 32 MiB, 3 repetitions). `cargo xtask bench` runs it as the `winfile`
//! micro-benchmark. The Linux shim starts `/bin/sh` per chunk where Windows starts `cmd.exe`,
//! so the baseline is this protocol's cost on this machine, not Windows'.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_agents::winrm::{Security, WinRmCommunicator, WinRmConfig};
use kiln_agents::Communicator;
use kiln_engine::fabric::files::{self, FileServer};
use kiln_tests::winrs_server::{Stats, WinrsAuth, WinrsServer, WinrsServerConfig};
use serde_json::json;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

fn summary(v: &[f64]) -> serde_json::Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": median(v), "min": min, "max": max, "samples": v})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (mut mib, mut reps, mut as_json) = (32u64, 3usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().context("--mib N")?.parse()?,
            "--reps" => reps = args.next().context("--reps R")?.parse()?,
            "--json" => as_json = true,
            other => bail!("unknown argument {other} (--mib N, --reps R, --json)"),
        }
    }
    ensure!(mib > 0 && reps > 0, "--mib and --reps must be positive");
    let len = mib << 20;
    let dir = std::env::temp_dir().join(format!("kiln-winfile-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(&dir, len, reps).await;
    let _ = std::fs::remove_dir_all(&dir);
    let v = r?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{mib} MiB to the WinRS test server (HTTP + NTLM, sealed), {reps} interleaved repetition(s):\n  WinRM chunked upload: {:.2} MB/s (median {:.2} s; {} commands, {} WS-Man requests per upload)\n  kiln HTTP pull:       {:.1} MB/s (median {:.3} s)\n  pull / chunked: {:.0}x",
            g("chunkedMBps"),
            v["chunked"]["median"].as_f64().unwrap_or(f64::NAN),
            v["chunkedCommands"],
            v["chunkedRequests"],
            g("pullMBps"),
            v["pull"]["median"].as_f64().unwrap_or(f64::NAN),
            g("ratio")
        );
    }
    Ok(())
}

async fn run(dir: &std::path::Path, len: u64, reps: usize) -> Result<serde_json::Value> {
    let src = dir.join("payload.bin");
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data)?;
    let server =
        WinrsServer::start(WinrsServerConfig::new(WinrsAuth::HttpNtlm, "kiln", "pw")).await?;
    let guest = WinRmCommunicator::connect(
        WinRmConfig::new(server.addr(), "kiln", "pw", Security::HttpNtlm),
        std::future::pending(),
    )
    .await?;
    let endpoint = FileServer::start_tcp("127.0.0.1:0".parse()?, Arc::new(|_| {})).await?;
    let (mut chunked, mut pull) = (Vec::new(), Vec::new());
    let (mut commands, mut requests) = (0u64, 0u64);
    for i in 0..reps {
        // alternate which goes first, so neither always runs on a warmer machine
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let dest = dir.join(format!("dest-{which}.bin"));
            let dest_s = dest.to_str().context("temp path")?;
            let took: Duration = if which == 0 {
                let (c0, r0) = (
                    Stats::get(&server.stats().commands),
                    Stats::get(&server.stats().requests),
                );
                let mut f = tokio::fs::File::open(&src).await?;
                let t = Instant::now();
                guest.upload(&mut f, len, dest_s, 0o644).await?;
                let took = t.elapsed();
                commands = Stats::get(&server.stats().commands) - c0;
                requests = Stats::get(&server.stats().requests) - r0;
                took
            } else {
                files::deliver(&guest, &endpoint, &src, dest_s)
                    .await?
                    .duration
            };
            ensure!(
                std::fs::read(&dest)? == data,
                "{} delivered different bytes",
                if which == 0 {
                    "the chunked upload"
                } else {
                    "the pull"
                }
            );
            std::fs::remove_file(&dest)?;
            if which == 0 { &mut chunked } else { &mut pull }.push(took.as_secs_f64());
        }
    }
    guest.close().await?;
    server.stop().await;
    let mbps = |s: f64| len as f64 / 1e6 / s;
    let (cm, pm) = (median(&chunked), median(&pull));
    Ok(json!({
        "bytes": len,
        "reps": reps,
        "server": "kiln's WinRS test server (tests/winrs_server.rs) on 127.0.0.1, HTTP + NTLMv2, every body sealed",
        "chunked": summary(&chunked),
        "pull": summary(&pull),
        "chunkedMBps": mbps(cm),
        "pullMBps": mbps(pm),
        "ratio": cm / pm,
        "chunkedCommands": commands,
        "chunkedRequests": requests,
    }))
}
