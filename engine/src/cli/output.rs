//! Output conventions shared by the subcommands.

use std::io::IsTerminal;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text on stderr.
    Human,
    /// One JSON document on stdout.
    Json,
}

/// Whether to color stderr: a terminal, and `NO_COLOR` unset (https://no-color.org).
pub fn color_stderr() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the input is invalid, or the build failed.
pub const EXIT_INVALID: u8 = 1;
/// Exit code: usage or I/O error.
pub const EXIT_USAGE: u8 = 2;
