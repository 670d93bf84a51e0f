//! The `kiln` command line. Thin: parses arguments, calls the engine, renders its results.
//! Logs and diagnostics go to stderr, data (JSON, normalized templates) to stdout.
//!
//! Exit codes: 0 success / valid; 1 the input is invalid or the build failed; 2 usage or I/O
//! error (bad flags, unreadable files).

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Build Azure VM Image Builder templates locally with QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check image templates as Azure would, and report every problem with its location.
    Validate(cli::validate::Args),
    /// Build a template: boot the source, customize, generalize, export a fixed VHD.
    Build(cli::build::Args),
    /// Check the host: QEMU, qemu-img, OVMF, disk space, and whether KVM really runs a guest.
    Doctor {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: cli::output::Format,
    },
    /// The local PlatformImage catalog: import disks, list them.
    #[command(subcommand)]
    Image(cli::image::Command),
    /// kiln's own code paths timed one at a time, for `cargo xtask bench` (docs/bench.md).
    #[command(subcommand, name = "__bench", hide = true)]
    Bench(cli::bench::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate(a) => cli::validate::run(a),
        Command::Image(c) => cli::image::run(c),
        Command::Build(a) => cli::build::run(a),
        Command::Doctor { output } => cli::doctor::run(output),
        Command::Bench(c) => cli::bench::run(c),
    };
    ExitCode::from(code)
}
