//! The `kiln` command line. Thin: parses arguments, calls the engine, renders its results.
//! Logs and diagnostics go to stderr, data (JSON, normalized templates) to stdout.
//!
//! Exit codes: 0 success / valid; 1 the input is invalid or the build failed; 2 usage or I/O
//! error (bad flags, unreadable files).

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build Azure VM Image Builder templates locally with QEMU"
)]
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
    /// Images: the local PlatformImage catalog (import) and managed images (list, show, delete).
    #[command(subcommand)]
    Image(cli::image::Command),
    /// Resource groups (az group).
    #[command(subcommand)]
    Group(cli::group::Command),
    /// Image templates as resources (az image builder): create, run, cancel, outputs.
    #[command(subcommand)]
    Template(cli::template::Command),
    /// Galleries, image definitions and versions (az sig).
    #[command(subcommand)]
    Sig(cli::sig::Command),
    /// The default subscription (az account).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Internal: QEMU runs this per guest connection to the emulated Azure fabric; it relays
    /// stdin/stdout to the build's fabric socket.
    #[command(name = "__fabric-connect", hide = true)]
    FabricConnect {
        /// The build's fabric socket.
        socket: std::path::PathBuf,
        /// `wire` or `imds`.
        endpoint: String,
    },
    /// kiln's own code paths timed one at a time, for `cargo xtask bench` (docs/bench.md).
    #[command(subcommand, name = "__bench", hide = true)]
    Bench(cli::bench::Command),
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Show the default subscription: KILN_SUBSCRIPTION_ID, else one generated once.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate(a) => cli::validate::run(a),
        Command::Image(c) => cli::image::run(c),
        Command::Build(a) => cli::build::run(a),
        Command::Doctor { output } => cli::doctor::run(output),
        Command::Group(c) => cli::group::run(c),
        Command::Template(c) => cli::template::run(c),
        Command::Sig(c) => cli::sig::run(c),
        Command::Account(AccountCommand::Show) => cli::group::account_show(),
        Command::FabricConnect { socket, endpoint } => {
            match kiln_engine::fabric::relay(&socket, &endpoint) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("kiln __fabric-connect {}: {e}", socket.display());
                    1
                }
            }
        }
        Command::Bench(c) => cli::bench::run(c),
    };
    ExitCode::from(code)
}
