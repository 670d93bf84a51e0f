//! kiln's engine: reads Azure VM Image Builder templates exactly as Azure does, validates them with
//! located diagnostics, and (in later modules) plans and runs builds.
#![warn(missing_docs)]

pub mod arm;
pub mod build;
pub mod diag;
pub mod fabric;
pub mod home;
pub mod json;
pub mod resources;
pub mod store;
pub mod template;
pub mod vm;
