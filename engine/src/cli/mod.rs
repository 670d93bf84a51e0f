//! Subcommands of the `kiln` binary.

pub mod bench;
pub mod build;
pub mod doctor;
pub mod group;
pub mod image;
pub mod output;
pub mod res;
pub mod sig;
pub mod template;
pub mod validate;
