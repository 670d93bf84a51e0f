//! `cargo xtask bench`: kiln beside the hand-rolled floor, Packer's qemu builder and
//! virt-customize, on the same job and the same source image, interleaved; plus
//! micro-benchmarks each beside its baseline. Writes BENCH.md and raw JSON. See docs/bench.md.

pub mod contenders;
pub mod guest;
pub mod job;
pub mod micro;
pub mod provisioning;
pub mod report;
pub mod util;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds of the contenders (each round runs every selected contender once, in turn).
    pub runs: usize,
    /// Contenders and micro-benchmarks to run (empty: all, or the quick set).
    pub only: Vec<String>,
    /// The cheap smoke: kiln + floor once, micro-benchmarks at small sizes, a debug kiln.
    pub quick: bool,
    /// Build kiln in release mode (default unless `--quick`).
    pub release: bool,
    /// Where BENCH.md and bench/*.json go.
    pub out: Option<PathBuf>,
    /// Do not apt-get install missing packages.
    pub no_install: bool,
    /// The command line as typed, for the report.
    pub command: String,
}

/// Every name `--only` accepts.
pub fn all_names() -> Vec<&'static str> {
    contenders::NAMES
        .iter()
        .chain(micro::NAMES.iter())
        .chain(std::iter::once(&provisioning::NAME))
        .copied()
        .collect()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn log(m: impl AsRef<str>) {
    eprintln!("bench: {}", m.as_ref());
}

/// Installs Debian packages that are missing (apt-get, as root or through sudo).
fn ensure_packages(pkgs: &[&str], no_install: bool) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Abbrev}", p])
                .output()
                .map(|o| o.stdout.starts_with(b"ii"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if no_install {
        bail!("missing packages {missing:?} (--no-install given)");
    }
    log(format!("installing {}", missing.join(" ")));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let mut c = if root {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    let st = c.status().context("running apt-get")?;
    if !st.success() {
        bail!(
            "apt-get install {} failed ({st}); try `apt-get update` first",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Builds kiln and returns the binary.
fn build_kiln(repo: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    log(format!(
        "building kiln ({})",
        if release { "release" } else { "debug" }
    ));
    let mut c = Command::new(cargo);
    c.current_dir(repo)
        .args(["build", "-q", "-p", "kiln-engine", "--bin", "kiln"]);
    if release {
        c.arg("--release");
    }
    let st = c.status().context("running cargo build")?;
    if !st.success() {
        bail!("cargo build of kiln failed ({st})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("kiln"))
}

fn selected(opts: &Options) -> Vec<String> {
    if !opts.only.is_empty() {
        return opts.only.clone();
    }
    if opts.quick {
        return [
            "kiln", "floor", "prep", "export", "sha256", "upload", "winfile",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    }
    all_names().iter().map(|s| s.to_string()).collect()
}

/// Runs the benchmark and writes the report. Returns the report's path.
pub fn run(opts: &Options) -> Result<PathBuf> {
    let repo = repo_root();
    let sel = selected(opts);
    for n in &sel {
        if !all_names().contains(&n.as_str()) {
            bail!(
                "unknown benchmark `{n}` (known: {})",
                all_names().join(", ")
            );
        }
    }
    let has = |n: &str| sel.iter().any(|s| s == n);
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "ssh",
        "ssh-keygen",
        "mkfs.vfat",
        "mcopy",
        "genisoimage",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing: run `sudo scripts/setup-host.sh`");
        }
    }
    let mut pkgs = Vec::new();
    if has("packer") {
        pkgs.push("packer");
    }
    if has("virt-customize") {
        pkgs.push("libguestfs-tools");
    }
    ensure_packages(&pkgs, opts.no_install)?;

    let tiny = crate::images::ensure(
        "tiny",
        &crate::images::Options {
            force: false,
            quiet: false,
        },
    )?;
    let version = tiny.meta["version"].as_str().unwrap_or("1.0.0").to_string();
    let kiln = build_kiln(&repo, opts.release)?;
    let work = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
        .join("bench-work");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(work.join("guestfs-cache"))?;
    let ctx = job::Ctx::new(&repo, &work, &kiln, &tiny.disk, &version)?;
    let started = report::now_utc();
    // the commit and tools as built and run, before anything can change them
    let machine = report::machine(&repo, opts.release);
    let load_before = util::loadavg();

    // --- contenders, interleaved -------------------------------------------------------
    let names: Vec<&str> = contenders::NAMES
        .iter()
        .copied()
        .filter(|n| has(n))
        .collect();
    let mut runs = Vec::new();
    if has("virt-customize") {
        // the first libguestfs launch builds its appliance (supermin): not part of the job
        log("warming libguestfs' appliance cache");
        let _ = Command::new("guestfish")
            .env("LIBGUESTFS_BACKEND", "direct")
            .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
            .env("LIBGUESTFS_CACHEDIR", work.join("guestfs-cache"))
            .args(["-a", "/dev/null", "run"])
            .output();
    }
    for round in 0..opts.runs {
        for name in &names {
            log(format!(
                "round {}/{}: {name} (load {})",
                round + 1,
                opts.runs,
                util::loadavg()
            ));
            let r = contenders::run(&ctx, name, round);
            match &r.error {
                None => log(format!("  {name}: {:.1}s", r.total)),
                Some(e) => log(format!("  {name} FAILED: {e}")),
            }
            runs.push(r);
        }
    }

    // --- Azure provisioning vs NoCloud (issue #5), pairs side by side ---------------------
    let prov = if has(provisioning::NAME) {
        match provisioning::run(&kiln, &work, opts.runs) {
            Ok(v) => Some(v),
            Err(e) => {
                log(format!("  provisioning FAILED: {e:#}"));
                Some(json!({"error": format!("{e:#}")}))
            }
        }
    } else {
        None
    };

    // --- micro-benchmarks ---------------------------------------------------------------
    let sizes = if opts.quick {
        micro::Sizes {
            reps: 1,
            sha_bytes: 64 << 20,
            upload_bytes: 16 << 20,
            upload_reps: 1,
            concurrency: &[2],
            winfile_bytes: 4 << 20,
            winfile_reps: 1,
            release: opts.release,
        }
    } else {
        micro::Sizes {
            reps: 3,
            sha_bytes: 1 << 30,
            // ≥ 5 interleaved reps at 64 MiB: single 256 MiB reps on this shared host swung
            // more than the effect being measured.
            upload_bytes: 64 << 20,
            upload_reps: 5,
            concurrency: &[2, 4],
            winfile_bytes: 32 << 20,
            winfile_reps: 3,
            release: opts.release,
        }
    };
    let mdir = work.join("micro");
    std::fs::create_dir_all(&mdir)?;
    let mut micro_out = serde_json::Map::new();
    let kiln_totals: Vec<f64> = runs
        .iter()
        .filter(|r| r.contender == "kiln" && r.ok)
        .map(|r| r.total)
        .collect();
    for name in micro::NAMES.iter().filter(|n| has(n)) {
        log(format!("micro: {name} (load {})", util::loadavg()));
        let r = match *name {
            "prep" => micro::prep(&ctx, &mdir, sizes),
            "export" => micro::export(&ctx, &mdir, sizes),
            "sha256" => micro::sha256(&ctx, &mdir, sizes),
            "upload" => micro::upload(&ctx, &mdir, sizes),
            "winfile" => micro::winfile(&ctx, sizes),
            "concurrency" => {
                micro::concurrency(&ctx, &mdir, sizes, util::stats(&kiln_totals).map(|s| s.0))
            }
            _ => unreachable!(),
        };
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                log(format!("  {name} FAILED: {e:#}"));
                json!({"error": format!("{e:#}")})
            }
        };
        micro_out.insert(name.to_string(), v);
    }

    let load_after = util::loadavg();
    let raw = json!({
        "command": opts.command,
        "started": started,
        "finished": report::now_utc(),
        "quick": opts.quick,
        "runs": opts.runs,
        "selected": sel,
        "machine": machine,
        "load": {"before": load_before, "after": load_after},
        "job": {
            "source": tiny.disk.display().to_string(), "sourceVersion": version,
            "vm": format!("{} ({} vCPU, {} MiB)", job::VM_SIZE, job::CPUS, job::MEMORY_MIB),
            "steps": ["Shell inline writing a file", "File 5 MiB (sourceUri http, sha256)", "Shell scriptUri (http, sha256)", "File /tmp/DeprovisioningScript.sh (deprovision override)", "deprovision", "shutdown", "fixed VHD"],
        },
        "contenderRuns": runs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "micro": Value::Object(micro_out),
    });
    let mut raw = raw;
    if let Some(p) = prov {
        raw["provisioning"] = p;
    }
    let out = match &opts.out {
        Some(o) => o.clone(),
        None if opts.quick => work.join("quick"),
        None => repo.clone(),
    };
    let md = report::write(&out, &raw)?;
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} round {}", r.contender, r.round + 1))
        .chain(
            raw["micro"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.get("error").is_some())
                .map(|(k, _)| k.clone()),
        )
        .chain(
            raw["provisioning"]["pairs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|p| {
                    provisioning::METHODS
                        .iter()
                        .filter(|m| p[**m]["ok"] != true)
                        .map(|m| {
                            format!(
                                "provisioning {m} pair {}",
                                p["round"].as_u64().unwrap_or(0) + 1
                            )
                        })
                        .collect::<Vec<_>>()
                }),
        )
        .chain(
            raw["provisioning"]
                .get("error")
                .map(|_| "provisioning".to_string()),
        )
        .collect();
    if !failed.is_empty() {
        bail!(
            "failed: {} (details in {})",
            failed.join(", "),
            md.display()
        );
    }
    Ok(md)
}
