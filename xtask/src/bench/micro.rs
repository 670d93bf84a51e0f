//! Micro-benchmarks, each beside its baseline, interleaved within one run.

use super::contenders;
use super::guest::{self, Key, Vm};
use super::job::{Ctx, CPUS, MEMORY_MIB};
use super::util::{self, run_ok, secs, stats};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Sizes and repetitions (small with `--quick`).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub reps: usize,
    pub sha_bytes: u64,
    pub upload_bytes: u64,
    /// Repetitions of the upload (each moves `upload_bytes` three times: kiln, ssh, scp).
    pub upload_reps: usize,
    pub concurrency: &'static [usize],
    /// Windows file delivery: bytes and repetitions (each moves the bytes twice).
    pub winfile_bytes: u64,
    pub winfile_reps: usize,
    /// Build the Windows file-delivery benchmark in release mode (as kiln).
    pub release: bool,
}

pub const NAMES: &[&str] = &[
    "prep",
    "export",
    "sha256",
    "upload",
    "concurrency",
    "winfile",
];

fn kiln_bench(ctx: &Ctx, args: &[&std::ffi::OsStr]) -> Result<Value> {
    let out = run_ok(Command::new(&ctx.kiln).arg("__bench").args(args))?;
    serde_json::from_slice(&out.stdout).context("kiln __bench output")
}

fn summary(v: &[f64]) -> Value {
    match stats(v) {
        Some((med, min, max)) => json!({"median": med, "min": min, "max": max, "samples": v}),
        None => Value::Null,
    }
}

fn med(v: &[f64]) -> f64 {
    stats(v).map(|s| s.0).unwrap_or(f64::NAN)
}

/// Two sources with the tiny guest's content: 1 GiB and 64 GiB (sparse) virtual size.
fn sources(ctx: &Ctx, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let s1 = dir.join("src-1g.qcow2");
    let s64 = dir.join("src-64g.qcow2");
    for (p, size) in [(&s1, "1G"), (&s64, "64G")] {
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "qcow2"])
                    .arg(&ctx.source)
                    .arg(&tmp),
            )?;
            run_ok(
                Command::new("qemu-img")
                    .args(["resize", "-q", "-f", "qcow2"])
                    .arg(&tmp)
                    .arg(size),
            )?;
            std::fs::rename(&tmp, p)?;
        }
    }
    Ok((s1, s64))
}

/// Source preparation (kiln's overlay step) on a 1 GiB and a 64 GiB source.
pub fn prep(ctx: &Ctx, dir: &Path, sz: Sizes) -> Result<Value> {
    let (s1, s64) = sources(ctx, dir)?;
    let (mut a, mut b, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    let ov = dir.join("prep-overlay.qcow2");
    for _ in 0..sz.reps.max(3) * 2 {
        for (src, acc) in [(&s1, &mut a), (&s64, &mut b)] {
            let _ = std::fs::remove_file(&ov);
            let v = kiln_bench(ctx, &["prepare".as_ref(), src.as_os_str(), ov.as_os_str()])?;
            acc.push(v["seconds"].as_f64().unwrap_or(f64::NAN));
        }
        let _ = std::fs::remove_file(&ov);
        let (t, _) = util::timed(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&s64)
                .arg(&ov),
        )?;
        bare.push(t);
    }
    let _ = std::fs::remove_file(&ov);
    Ok(
        json!({"kiln1GiB": summary(&a), "kiln64GiB": summary(&b), "bareQemuImgCreate64GiB": summary(&bare), "ratio64to1": med(&b) / med(&a)}),
    )
}

/// kiln's VHD export vs bare `qemu-img convert` of the same 1 GiB disk; and bytes written.
pub fn export(ctx: &Ctx, dir: &Path, sz: Sizes) -> Result<Value> {
    let (s1, _) = sources(ctx, dir)?;
    let (mut k, mut kw, mut q, mut kb, mut qb) = (Vec::new(), Vec::new(), Vec::new(), 0u64, 0u64);
    let (dk, dq) = (dir.join("export-kiln.vhd"), dir.join("export-bare.vhd"));
    for _ in 0..sz.reps.max(5) {
        let _ = std::fs::remove_file(&dk);
        let t = Instant::now();
        let v = kiln_bench(ctx, &["export".as_ref(), s1.as_os_str(), dk.as_os_str()])?;
        // The export as a build runs it (inside the engine: qemu-img convert, footer check,
        // fsync, rename); the process wall adds kiln's own start and exit, which a build pays
        // once, not per export.
        k.push(v["seconds"].as_f64().unwrap_or(f64::NAN));
        kw.push(secs(t, Instant::now()));
        kb = util::allocated(&dk);
        let _ = std::fs::remove_file(&dq);
        let (t, _) = util::timed(
            Command::new("qemu-img")
                .args([
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "vpc",
                    "-o",
                    "subformat=fixed,force_size",
                ])
                .arg(&s1)
                .arg(&dq),
        )?;
        q.push(t);
        qb = util::allocated(&dq);
    }
    let len = std::fs::metadata(&dk)?.len();
    let _ = std::fs::remove_file(&dk);
    let _ = std::fs::remove_file(&dq);
    Ok(
        json!({"virtualBytes": len - 512, "kiln": summary(&k), "kilnProcessWall": summary(&kw), "bareQemuImg": summary(&q), "ratio": med(&k) / med(&q), "kilnBytesWritten": kb, "bareBytesWritten": qb}),
    )
}

/// SHA-256 of one file: kiln's fetch path (read + hash + copy + fsync), kiln's hash alone, and
/// `sha256sum`. Throughputs in MB/s; the file is read once first so all run from the page cache.
pub fn sha256(ctx: &Ctx, dir: &Path, sz: Sizes) -> Result<Value> {
    let f = dir.join(format!("sha-{}.bin", sz.sha_bytes));
    util::write_random_file(&f, sz.sha_bytes)?;
    let scratch = dir.join("sha-scratch");
    let _ = run_ok(
        Command::new("cat")
            .arg(&f)
            .stdout(std::process::Stdio::null()),
    );
    let (mut fetch, mut hash, mut sum) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sz.reps {
        let (t, out) = util::timed(Command::new("sha256sum").arg(&f))?;
        sum.push(t);
        let want = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let v = kiln_bench(
            ctx,
            &[
                "sha256".as_ref(),
                f.as_os_str(),
                "--scratch".as_ref(),
                scratch.as_os_str(),
            ],
        )?;
        ensure!(
            v["sha256"] == want.as_str(),
            "kiln and sha256sum disagree on {}",
            f.display()
        );
        fetch.push(v["fetchSeconds"].as_f64().unwrap_or(f64::NAN));
        hash.push(v["hashSeconds"].as_f64().unwrap_or(f64::NAN));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mbps = |s: f64| sz.sha_bytes as f64 / 1e6 / s;
    Ok(json!({
        "bytes": sz.sha_bytes,
        "kilnHash": summary(&hash), "kilnFetch": summary(&fetch), "sha256sum": summary(&sum),
        "kilnHashMBps": mbps(med(&hash)), "kilnFetchMBps": mbps(med(&fetch)), "sha256sumMBps": mbps(med(&sum)),
    }))
}

/// Uploads through kiln's communicator vs OpenSSH (`ssh cat >`, `scp`) to the same guest (the
/// tiny guest's dropbear), into a tmpfs so the guest's disk does not bound it.
pub fn upload(ctx: &Ctx, dir: &Path, sz: Sizes) -> Result<Value> {
    let disk = dir.join("upload-overlay.qcow2");
    guest::overlay(&ctx.source, &disk)?;
    let key = Key::generate(dir, "upload-key")?;
    let seed = guest::seed_vfat(dir, "upload-seed", &key.public)?;
    let mut vm = Vm::start(dir, "upload", &disk, &seed, CPUS, MEMORY_MIB.max(1024))?;
    let r = (|| -> Result<Value> {
        vm.wait_ssh(&key, Duration::from_secs(300))?;
        vm.run(&key, "sudo mkdir -p /run/bench && sudo mount -t tmpfs -o size=600m tmpfs /run/bench && sudo chmod 1777 /run/bench", None)?;
        let payload = dir.join("upload.bin");
        util::write_random_file(&payload, sz.upload_bytes)?;
        let (mut k, mut kc, mut s, mut c) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let addr = format!("127.0.0.1:{}", vm.port);
        for _ in 0..sz.upload_reps {
            let v = kiln_bench(
                ctx,
                &[
                    "upload".as_ref(),
                    "--addr".as_ref(),
                    addr.as_ref(),
                    "--user".as_ref(),
                    guest::USER.as_ref(),
                    "--key".as_ref(),
                    key.private.as_os_str(),
                    "--bytes".as_ref(),
                    sz.upload_bytes.to_string().as_ref(),
                    "--dest".as_ref(),
                    "/run/bench/kiln.bin".as_ref(),
                ],
            )?;
            k.push(v["uploadSeconds"].as_f64().unwrap_or(f64::NAN));
            kc.push(v["connectSeconds"].as_f64().unwrap_or(f64::NAN));
            vm.run(&key, "rm -f /run/bench/kiln.bin", None)?;
            let t = Instant::now();
            vm.run(&key, "cat > /run/bench/ssh.bin", Some(&payload))?;
            s.push(secs(t, Instant::now()));
            vm.run(&key, "rm -f /run/bench/ssh.bin", None)?;
            let mut scp = Command::new("scp");
            scp.arg("-i").arg(&key.private);
            for o in [
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "BatchMode=yes",
                "IdentitiesOnly=yes",
                "LogLevel=ERROR",
            ] {
                scp.arg("-o").arg(o);
            }
            scp.arg("-o")
                .arg(format!("ControlPath={}", dir.join("upload.ctl").display()));
            scp.arg("-P")
                .arg(vm.port.to_string())
                .arg(&payload)
                .arg(format!("{}@127.0.0.1:/run/bench/scp.bin", guest::USER));
            let (t, _) = util::timed(&mut scp)?;
            c.push(t);
            vm.run(&key, "rm -f /run/bench/scp.bin", None)?;
        }
        let mbps = |x: f64| sz.upload_bytes as f64 / 1e6 / x;
        Ok(json!({
            "bytes": sz.upload_bytes, "server": "dropbear (tiny guest), TCG",
            "kiln": summary(&k), "kilnConnect": summary(&kc), "opensshCat": summary(&s), "scp": summary(&c),
            "kilnMBps": mbps(med(&k)), "opensshCatMBps": mbps(med(&s)), "scpMBps": mbps(med(&c)),
            "ratioToOpensshCat": med(&s) / med(&k),
        }))
    })();
    vm.stop(&key);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(dir.join("upload.bin"));
    r
}

/// N kiln builds at once vs one: the wall time until all are done.
pub fn concurrency(ctx: &Ctx, dir: &Path, sz: Sizes, single_median: Option<f64>) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let single = match single_median {
        Some(s) => s,
        None => {
            let r = contenders::run(ctx, "kiln", 900);
            ensure!(r.ok, "single kiln build failed: {:?}", r.error);
            r.total
        }
    };
    out.insert("single".into(), json!(single));
    for &n in sz.concurrency {
        let t = Instant::now();
        let results: Vec<Result<contenders::RunResult>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let d = dir.join(format!("conc-{n}-{i}"));
                    let _ = std::fs::remove_dir_all(&d);
                    let _ = std::fs::create_dir_all(&d);
                    sc.spawn(move || {
                        let r = contenders::kiln(ctx, &d, 1000 + n * 10 + i);
                        let _ = std::fs::remove_file(d.join("out.vhd"));
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a build thread panicked")))
                })
                .collect()
        });
        let mut each = Vec::new();
        let mut rss = Vec::new();
        for r in results {
            let r = r?;
            each.push(r.total);
            rss.push(r.extra["peakRssKiB"].as_f64().unwrap_or(0.0));
        }
        let wall = secs(t, Instant::now());
        out.insert(
            n.to_string(),
            json!({"wall": wall, "perBuild": summary(&each), "peakRssKiB": summary(&rss), "wallRatioToSingle": wall / single, "throughputRatio": (n as f64 * single) / wall}),
        );
    }
    Ok(Value::Object(out))
}

/// Windows file delivery to the WinRS test server over NTLM-sealed HTTP: kiln's WinRM-chunked
/// upload (Packer's way) beside kiln's HTTP pull from the per-build file endpoint, interleaved
/// (tests/examples/winfile_bench.rs, which needs kiln-tests' WinRS server and so runs as a cargo
/// example rather than `kiln __bench`).
pub fn winfile(ctx: &Ctx, sz: Sizes) -> Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(&ctx.repo).args([
        "run",
        "-q",
        "-p",
        "kiln-tests",
        "--example",
        "winfile_bench",
    ]);
    if sz.release {
        c.arg("--release");
    }
    c.args(["--", "--json", "--mib"])
        .arg((sz.winfile_bytes >> 20).max(1).to_string())
        .arg("--reps")
        .arg(sz.winfile_reps.to_string());
    let out = run_ok(&mut c)?;
    let mut v: Value = serde_json::from_slice(&out.stdout).context("winfile_bench output")?;
    v["command"] = json!(format!(
        "cargo run{} -p kiln-tests --example winfile_bench -- --mib {} --reps {}",
        if sz.release { " --release" } else { "" },
        (sz.winfile_bytes >> 20).max(1),
        sz.winfile_reps
    ));
    v["build"] = json!(if sz.release { "release" } else { "debug" });
    Ok(v)
}
