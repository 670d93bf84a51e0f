//! `cargo xtask <task>`: developer tasks for kiln.
//!
//! images [--only NAME]... [--force] [--quiet]
//!     Build (or find in the cache) the test guest images and print where they are:
//!     one `NAME PATH` line per image on stdout, or just the disk path with a single
//!     `--only`. Progress goes to stderr. See docs/test-guests.md.
//!
//! bench [--runs N] [--only NAME]... [--quick] [--release|--debug] [--out DIR] [--no-install]
//!     kiln beside the floor, Packer and virt-customize on the same job, plus micro-benchmarks;
//!     writes BENCH.md and bench/<date>.json. See docs/bench.md.
//!
//! windows-e2e --image WIN.vhd [--template F] [--generation V1|V2] [--dry-run] [--keep]
//!     A Windows build end to end with a real Windows image (KVM host); see docs/windows.md.

use anyhow::{bail, Result};
use std::process::ExitCode;
use xtask::{bench, images, windows_e2e};

fn usage() -> &'static str {
    "usage: cargo xtask images [--only NAME]... [--force] [--quiet]\n\
     \x20      cargo xtask bench [--runs N] [--only NAME]... [--quick] [--release|--debug] [--out DIR] [--no-install]\n\
     \x20      cargo xtask windows-e2e --image WIN.vhd [--template F] [--generation V1|V2] [--dry-run] [--keep]\n\
     \n\
     images   build or find the test guest images (tiny, debian) and print their disk paths\n\
     \x20        --only NAME  only this image (repeatable); with one, prints the bare path\n\
     \x20        --force      rebuild even when cached\n\
     \x20        --quiet      no progress lines\n\
     \n\
     bench    run kiln, the hand-rolled floor, Packer and virt-customize on the same job\n\
     \x20        (interleaved) and the micro-benchmarks; write BENCH.md + bench/<date>.json\n\
     \x20        --runs N     rounds of the contenders (default 3; 1 with --quick)\n\
     \x20        --only NAME  kiln, floor, packer, virt-customize, prep, export, sha256,\n\
     \x20                     upload, concurrency, winfile (repeatable, or comma-separated)\n\
     \x20        --quick      the CI smoke: kiln + floor, micro-benchmarks at small sizes,\n\
     \x20                     debug kiln, report under target/bench-work/quick/\n\
     \x20        --out DIR    where BENCH.md and bench/ go (default: the repository root)\n\
     \x20        --no-install fail instead of apt-get installing packer / libguestfs-tools\n\
     \x20        --render F   only re-render BENCH.md from a raw result <out>/bench/<date>.json\n\
     \n\
     windows-e2e  import a generalized Windows disk into a temporary KILN_HOME and build\n\
     \x20        scripts/windows/e2e-template.json (or --template F) with it on a KVM host;\n\
     \x20        prints a report (steps, seconds, failures with exit codes, logs)\n\
     \x20        --dry-run    check the arguments and template, print the commands and\n\
     \x20                     kiln's plan of the build; run nothing\n\
     \x20        --keep       keep the temporary KILN_HOME (logs, exported VHD)\n\
     \n\
     Cache: ${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/guests/\n\
     Host packages: sudo scripts/setup-host.sh\n"
}

fn images_cmd(args: &[String]) -> Result<()> {
    let mut only: Vec<String> = Vec::new();
    let mut opts = images::Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => match it.next() {
                Some(n) => only.extend(n.split(',').map(str::to_string)),
                None => bail!("--only needs an image name"),
            },
            s if s.starts_with("--only=") => only.extend(s[7..].split(',').map(str::to_string)),
            "--force" => opts.force = true,
            "--quiet" | "-q" => opts.quiet = true,
            "-h" | "--help" => {
                print!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    for n in &only {
        if !images::NAMES.contains(&n.as_str()) {
            bail!("unknown image `{n}` (known: {})", images::NAMES.join(", "));
        }
    }
    let names: Vec<String> = if only.is_empty() {
        images::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        only.clone()
    };
    for n in &names {
        let img = images::ensure(n, &opts)?;
        if only.len() == 1 {
            println!("{}", img.disk.display());
        } else {
            println!("{} {}", n, img.disk.display());
        }
    }
    Ok(())
}

fn bench_cmd(args: &[String]) -> Result<()> {
    let mut opts = bench::Options {
        runs: 0,
        only: Vec::new(),
        quick: false,
        release: true,
        out: None,
        no_install: false,
        command: format!("cargo xtask bench {}", args.join(" "))
            .trim()
            .to_string(),
    };
    let mut release: Option<bool> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                opts.runs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--runs needs a positive number"))?
            }
            "--only" => match it.next() {
                Some(n) => opts.only.extend(n.split(',').map(str::to_string)),
                None => bail!("--only needs a name"),
            },
            s if s.starts_with("--only=") => {
                opts.only.extend(s[7..].split(',').map(str::to_string))
            }
            "--quick" => opts.quick = true,
            "--release" => release = Some(true),
            "--debug" => release = Some(false),
            "--out" => {
                opts.out = Some(
                    it.next()
                        .ok_or_else(|| anyhow::anyhow!("--out needs a directory"))?
                        .into(),
                )
            }
            "--no-install" => opts.no_install = true,
            "--render" => {
                let json = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--render needs a bench/<date>.json"))?;
                println!(
                    "{}",
                    bench::report::render(std::path::Path::new(json))?.display()
                );
                return Ok(());
            }
            "-h" | "--help" => {
                print!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    opts.release = release.unwrap_or(!opts.quick);
    if opts.runs == 0 {
        opts.runs = if opts.quick { 1 } else { 3 };
    }
    let md = bench::run(&opts)?;
    println!("{}", md.display());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("images") => images_cmd(&args[1..]),
        Some("bench") => bench_cmd(&args[1..]),
        Some("windows-e2e") => {
            let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_else(|| ".".into());
            windows_e2e::parse(&args[1..], &repo).and_then(|a| windows_e2e::run(&a, &repo))
        }
        Some("-h") | Some("--help") | None => {
            print!("{}", usage());
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task `{other}`\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
