//! Subcommands of the `kiln` binary.

pub mod bench;
pub mod build;
pub mod doctor;
pub mod image;
pub mod output;
pub mod validate;
