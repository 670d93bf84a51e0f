//! `cargo xtask <task>`: developer tasks for kiln.
//!
//! images [--only NAME]... [--force] [--quiet]
//!     Build (or find in the cache) the test guest images and print where they are:
//!     one `NAME PATH` line per image on stdout, or just the disk path with a single
//!     `--only`. Progress goes to stderr. See docs/test-guests.md.

use anyhow::{bail, Result};
use std::process::ExitCode;
use xtask::images;

fn usage() -> &'static str {
    "usage: cargo xtask images [--only NAME]... [--force] [--quiet]\n\
     \n\
     images   build or find the test guest images (tiny, debian) and print their disk paths\n\
     \x20        --only NAME  only this image (repeatable); with one, prints the bare path\n\
     \x20        --force      rebuild even when cached\n\
     \x20        --quiet      no progress lines\n\
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("images") => images_cmd(&args[1..]),
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
