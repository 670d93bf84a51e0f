//! The four contenders, each doing the job once: kiln, the hand-rolled floor, Packer's qemu
//! builder, virt-customize + virt-sysprep.

use super::guest::{self, Key, Vm};
use super::job::{self, Ctx, CPUS, MEMORY_MIB};
use super::util::{self, secs, Lines, RssPoll, Watch};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The names, in the order they run within a round.
pub const NAMES: &[&str] = &["kiln", "floor", "packer", "virt-customize"];

/// One run of one contender.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub contender: String,
    pub round: usize,
    pub ok: bool,
    pub error: Option<String>,
    /// Wall seconds, start to the VHD on disk.
    pub total: f64,
    /// Named phases in order, seconds.
    pub phases: Vec<(String, f64)>,
    /// Contender-specific measurements.
    pub extra: Value,
}

impl RunResult {
    pub fn to_json(&self) -> Value {
        json!({
            "contender": self.contender, "round": self.round, "ok": self.ok, "error": self.error,
            "totalSeconds": self.total,
            "phases": self.phases.iter().map(|(k, v)| json!({"phase": k, "seconds": v})).collect::<Vec<_>>(),
            "extra": self.extra,
        })
    }
}

/// Runs contender `name` once; a failure is recorded, not raised.
pub fn run(ctx: &Ctx, name: &str, round: usize) -> RunResult {
    let dir = ctx.work.join(name).join(format!("round-{round}"));
    let _ = std::fs::remove_dir_all(&dir);
    let r = std::fs::create_dir_all(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| match name {
            "kiln" => kiln(ctx, &dir, round),
            "floor" => floor(ctx, &dir),
            "packer" => packer(ctx, &dir),
            "virt-customize" => virt(ctx, &dir),
            other => bail!("unknown contender {other}"),
        });
    let mut res = match r {
        Ok(r) => r,
        Err(e) => RunResult {
            contender: name.into(),
            round,
            ok: false,
            error: Some(format!("{e:#}")),
            total: 0.0,
            phases: vec![],
            extra: Value::Null,
        },
    };
    res.contender = name.into();
    res.round = round;
    // keep the logs, drop the big files
    for f in ["out.vhd", "overlay.qcow2", "work.qcow2"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("packer-out"));
    res
}

fn check_vhd(vhd: &Path, source_virtual: u64) -> Result<()> {
    let len = std::fs::metadata(vhd)
        .with_context(|| format!("{} missing", vhd.display()))?
        .len();
    ensure!(
        len == source_virtual + 512,
        "{}: {len} bytes, expected a fixed VHD of {source_virtual} + 512",
        vhd.display()
    );
    Ok(())
}

fn source_virtual_size(ctx: &Ctx) -> Result<u64> {
    let out = util::run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&ctx.source),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["virtual-size"].as_u64().context("virtual-size")
}

/// One `kiln build` of the AIB template, with the events' arrival times, the console's
/// `KILN-READY` line (the guest's sshd listening) and the engine's peak RSS.
pub fn kiln(ctx: &Ctx, dir: &Path, round: usize) -> Result<RunResult> {
    let vhd = dir.join("out.vhd");
    let template = dir.join("template.json");
    std::fs::write(
        &template,
        serde_json::to_vec_pretty(&ctx.aib_template(&format!("bench-{round}"), &vhd))?,
    )?;
    let t0 = Instant::now();
    let mut p = Lines::spawn(
        Command::new(&ctx.kiln)
            .env("KILN_HOME", &ctx.kiln_home)
            .env("NO_COLOR", "1")
            .args(["build", "--output", "json", "--accel", "tcg"])
            .arg(&template),
        &dir.join("kiln.stderr"),
    )?;
    let rss = RssPoll::start(p.child.id());
    let lines = p.lines.clone();
    let watch = Watch::start(
        Box::new(move || {
            lines.lock().unwrap().iter().find_map(|(_, l)| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["event"] == "runStarted")
                    .then(|| PathBuf::from(v["runDir"].as_str().unwrap_or("")).join("console.log"))
            })
        }),
        "KILN-READY",
    );
    let st = p.wait()?;
    let t_end = Instant::now();
    let ready = watch.finish();
    let peak_kb = rss.finish();
    let lines = p.snapshot();
    std::fs::write(
        dir.join("events.jsonl"),
        lines
            .iter()
            .map(|(t, l)| format!("{{\"t\":{:.4},\"e\":{l}}}\n", secs(t0, *t)))
            .collect::<String>(),
    )?;
    let events: Vec<(Instant, Value)> = lines
        .iter()
        .filter_map(|(t, l)| Some((*t, serde_json::from_str::<Value>(l).ok()?)))
        .collect();
    let result = events
        .iter()
        .find(|(_, e)| e["event"] == "result")
        .map(|(_, e)| e.clone())
        .unwrap_or_default();
    if !st.success() || result["runState"] != "Succeeded" {
        bail!(
            "kiln build failed ({st}): {}; logs in {}",
            result["error"],
            dir.display()
        );
    }
    check_vhd(&vhd, source_virtual_size(ctx)?)?;
    let total = secs(t0, t_end);
    let step = |prefix: &str| -> f64 {
        events
            .iter()
            .filter(|(_, e)| {
                e["event"] == "stepFinished" && e["step"].as_str().unwrap_or("").starts_with(prefix)
            })
            .map(|(_, e)| e["seconds"].as_f64().unwrap_or(0.0))
            .sum()
    };
    let customizers: Vec<(String, f64)> = events
        .iter()
        .filter(|(_, e)| {
            e["event"] == "stepFinished"
                && e["step"].as_str().unwrap_or("").starts_with("Customize: ")
        })
        .map(|(_, e)| {
            (
                e["step"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches("Customize: ")
                    .to_string(),
                e["seconds"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let prepare = step("Resolve source")
        + step("Prepare disk")
        + step("Fetch artifacts")
        + step("Provisioning media");
    let boot = step("Start VM") + step("Connect");
    let deprov = step("Deprovision");
    let shutdown = step("Shutdown");
    // "Export disk" (formerly "Export VHD").
    let export = step("Export ");
    let record = step("Record runOutputs") + step("Distribute");
    let guest_time = boot + customizers.iter().map(|c| c.1).sum::<f64>() + deprov + shutdown;
    let mut phases = vec![
        ("prepare".to_string(), prepare),
        ("boot→SSH ready".to_string(), boot),
    ];
    phases.extend(
        customizers
            .iter()
            .map(|(n, s)| (format!("customize {n}"), *s)),
    );
    phases.extend([
        ("deprovision".to_string(), deprov),
        ("shutdown".to_string(), shutdown),
        ("export".to_string(), export),
        ("record".to_string(), record),
    ]);
    let connected = events
        .iter()
        .find(|(_, e)| {
            e["event"] == "stepFinished" && e["step"].as_str().unwrap_or("").starts_with("Connect")
        })
        .map(|(t, _)| *t);
    let lag = match (ready, connected) {
        (Some(r), Some(c)) => Some(c.saturating_duration_since(r).as_secs_f64()),
        _ => None,
    };
    let ssh_info = events.iter().find_map(|(_, e)| {
        e["message"]
            .as_str()
            .filter(|m| m.starts_with("SSH ready"))
            .map(str::to_string)
    });
    // "…; banner after 15.012s, key exchange + login 0.412s; …": the guest-CPU-bound part of the lag
    let handshake = ssh_info.as_deref().and_then(|m| {
        m.split("key exchange + login ")
            .nth(1)?
            .split('s')
            .next()?
            .parse::<f64>()
            .ok()
    });
    let internal_total = events
        .iter()
        .find(|(_, e)| e["event"] == "runFinished")
        .and_then(|(_, e)| e["seconds"].as_f64())
        .unwrap_or(0.0);
    Ok(RunResult {
        contender: "kiln".into(),
        round,
        ok: true,
        error: None,
        total,
        phases,
        extra: json!({
            "engineOverheadSeconds": total - guest_time - export,
            "guestSeconds": guest_time,
            "internalTotalSeconds": internal_total,
            "readinessLagSeconds": lag,
            "handshakeSeconds": handshake,
            "pollLagSeconds": lag.zip(handshake).map(|(l, h)| l - h),
            "sshReady": ssh_info,
            "peakRssKiB": peak_kb,
            "runDir": result["runDir"],
        }),
    })
}

/// The floor: the minimum with QEMU, OpenSSH (one multiplexed connection) and qemu-img.
pub fn floor(ctx: &Ctx, dir: &Path) -> Result<RunResult> {
    let t0 = Instant::now();
    let disk = dir.join("overlay.qcow2");
    guest::overlay(&ctx.source, &disk)?;
    let key = Key::generate(dir, "key")?;
    let seed = guest::seed_vfat(dir, "seed", &key.public)?;
    // the artifacts, fetched over HTTP and checked on the host, as kiln does
    for (name, sha) in [
        ("payload.bin", &ctx.payload_sha),
        ("setup.sh", &ctx.script_sha),
        ("deprovision.sh", &ctx.deprov_sha),
    ] {
        let body = util::http_get(ctx.port, name)?;
        ensure!(&util::sha256_hex(&body) == sha, "{name}: checksum mismatch");
        std::fs::write(dir.join(name), body)?;
    }
    let t_prep = Instant::now();
    let mut vm = Vm::start(dir, "floor", &disk, &seed, CPUS, MEMORY_MIB)?;
    let console = vm.console.clone();
    let watch = Watch::start(Box::new(move || Some(console.clone())), "KILN-READY");
    let r = (|| -> Result<RunResult> {
        let t_ssh = vm.wait_ssh(&key, Duration::from_secs(300))?;
        let ready = watch.finish();
        let mut phases = vec![
            ("prepare".to_string(), secs(t0, t_prep)),
            ("boot→SSH ready".to_string(), secs(t_prep, t_ssh)),
        ];
        let mut t = t_ssh;
        let mut mark = |name: &str, phases: &mut Vec<(String, f64)>| {
            let now = Instant::now();
            phases.push((name.to_string(), secs(t, now)));
            t = now;
        };
        vm.run(&key, job::INLINE, None)?;
        mark("customize Shell \"inline\"", &mut phases);
        vm.run(
            &key,
            &format!("cat > {}", job::PAYLOAD_DEST),
            Some(&dir.join("payload.bin")),
        )?;
        mark("customize File \"payload\"", &mut phases);
        vm.run(
            &key,
            "cat > /tmp/setup.sh && sh -e /tmp/setup.sh && rm -f /tmp/setup.sh",
            Some(&dir.join("setup.sh")),
        )?;
        mark("customize Shell \"script\"", &mut phases);
        vm.run(
            &key,
            &format!("cat > {}", job::DEPROVISION_DEST),
            Some(&dir.join("deprovision.sh")),
        )?;
        mark("customize File \"deprovision\"", &mut phases);
        // deprovision and poweroff in the same connection (new ones fail once host keys are gone)
        let _ = vm.run(
            &key,
            &format!("sudo sh {} && sudo poweroff", job::DEPROVISION_DEST),
            None,
        );
        mark("deprovision", &mut phases);
        let st = vm.wait_exit(Duration::from_secs(120))?;
        ensure!(st.success(), "QEMU exit status {st}");
        mark("shutdown", &mut phases);
        let vhd = dir.join("out.vhd");
        util::run_ok(
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
                .arg(&disk)
                .arg(&vhd),
        )?;
        mark("export", &mut phases);
        let total = secs(t0, t);
        check_vhd(&vhd, source_virtual_size(ctx)?)?;
        let lag = ready.map(|r| t_ssh.saturating_duration_since(r).as_secs_f64());
        Ok(RunResult {
            contender: "floor".into(),
            round: 0,
            ok: true,
            error: None,
            total,
            phases,
            extra: json!({"readinessLagSeconds": lag}),
        })
    })();
    vm.stop(&key);
    r
}

/// Packer 1.6.6's qemu builder (see [`Ctx::packer_template`]); phases from its UI lines.
pub fn packer(ctx: &Ctx, dir: &Path) -> Result<RunResult> {
    let t0 = Instant::now();
    let key = Key::generate(dir, "key")?;
    let seed = guest::seed_iso(dir, "seed", &key.public)?;
    let out_dir = dir.join("packer-out");
    let vhd = dir.join("out.vhd");
    let port = util::free_port()?;
    let template = dir.join("packer.json");
    std::fs::write(
        &template,
        serde_json::to_vec_pretty(&ctx.packer_template(
            &out_dir,
            &key.private,
            &seed,
            &dir.join("console.log"),
            &vhd,
            port,
        ))?,
    )?;
    let t_prep = Instant::now();
    let mut p = Lines::spawn(
        Command::new("packer")
            .env("CHECKPOINT_DISABLE", "1")
            .env("PACKER_CACHE_DIR", ctx.work.join("packer-cache"))
            .env("PACKER_CONFIG_DIR", ctx.work.join("packer-config"))
            .env("PACKER_NO_COLOR", "1")
            .args(["build", "-machine-readable", "-color=false"])
            .arg(&template),
        &dir.join("packer.stderr"),
    )?;
    let st = p.wait()?;
    let t_end = Instant::now();
    let lines = p.snapshot();
    std::fs::write(
        dir.join("packer.out"),
        lines
            .iter()
            .map(|(t, l)| format!("{:.3} {l}\n", secs(t0, *t)))
            .collect::<String>(),
    )?;
    if !st.success() {
        bail!(
            "packer build failed ({st}); see {}",
            dir.join("packer.out").display()
        );
    }
    check_vhd(&vhd, source_virtual_size(ctx)?)?;
    let at = |needle: &str| {
        lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    };
    let marks = [
        ("prepare (copy disk)", at("Starting VM")),
        ("boot→SSH ready", at("Connected to SSH!")),
        (
            "provisioners (customize + deprovision)",
            at("Gracefully halting"),
        ),
        ("shutdown", at("Running post-processor")),
        ("export (shell-local qemu-img)", Some(t_end)),
    ];
    let mut phases = vec![(
        "prepare (key, seed, template)".to_string(),
        secs(t0, t_prep),
    )];
    let mut prev = t_prep;
    for (name, t) in marks {
        if let Some(t) = t {
            phases.push((name.to_string(), secs(prev, t)));
            prev = t;
        }
    }
    Ok(RunResult {
        contender: "packer".into(),
        round: 0,
        ok: true,
        error: None,
        total: secs(t0, t_end),
        phases,
        extra: json!({"version": packer_version()}),
    })
}

pub fn packer_version() -> String {
    Command::new("packer")
        .arg("version")
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// virt-customize (inline, upload, script, deprovision script) + virt-sysprep + qemu-img,
/// with no guest boot; libguestfs forced to TCG (KVM hangs here).
pub fn virt(ctx: &Ctx, dir: &Path) -> Result<RunResult> {
    let t0 = Instant::now();
    let disk = dir.join("work.qcow2");
    guest::overlay(&ctx.source, &disk)?;
    for (name, sha) in [
        ("payload.bin", &ctx.payload_sha),
        ("setup.sh", &ctx.script_sha),
        ("deprovision.sh", &ctx.deprov_sha),
    ] {
        let body = util::http_get(ctx.port, name)?;
        ensure!(&util::sha256_hex(&body) == sha, "{name}: checksum mismatch");
        std::fs::write(dir.join(name), body)?;
    }
    let t1 = Instant::now();
    let lg = |c: &mut Command| {
        c.env("LIBGUESTFS_BACKEND", "direct")
            .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
            .env("LIBGUESTFS_CACHEDIR", ctx.work.join("guestfs-cache"));
    };
    let mut vc = Command::new("virt-customize");
    lg(&mut vc);
    vc.arg("-a")
        .arg(&disk)
        .args(["--no-network", "--run-command", job::INLINE, "--upload"])
        .arg(format!(
            "{}:{}",
            dir.join("payload.bin").display(),
            job::PAYLOAD_DEST
        ))
        .arg("--run")
        .arg(dir.join("setup.sh"))
        .arg("--upload")
        .arg(format!(
            "{}:{}",
            dir.join("deprovision.sh").display(),
            job::DEPROVISION_DEST
        ))
        .args(["--run-command", &format!("sh {}", job::DEPROVISION_DEST)]);
    util::run_ok(&mut vc)?;
    let t2 = Instant::now();
    let mut vs = Command::new("virt-sysprep");
    lg(&mut vs);
    vs.arg("-a")
        .arg(&disk)
        .args(["--operations", "defaults,-ssh-userdir"]);
    util::run_ok(&mut vs)?;
    let t3 = Instant::now();
    let vhd = dir.join("out.vhd");
    util::run_ok(
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
            .arg(&disk)
            .arg(&vhd),
    )?;
    let t4 = Instant::now();
    check_vhd(&vhd, source_virtual_size(ctx)?)?;
    Ok(RunResult {
        contender: "virt-customize".into(),
        round: 0,
        ok: true,
        error: None,
        total: secs(t0, t4),
        phases: vec![
            ("prepare (overlay, fetch)".into(), secs(t0, t1)),
            (
                "virt-customize (customize + deprovision script)".into(),
                secs(t1, t2),
            ),
            ("virt-sysprep".into(), secs(t2, t3)),
            ("export".into(), secs(t3, t4)),
        ],
        extra: Value::Null,
    })
}
