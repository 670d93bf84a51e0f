//! Subcommands of the `kiln` binary.

pub mod output;
pub mod validate;
