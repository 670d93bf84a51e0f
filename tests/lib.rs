//! Shared fixtures for kiln integration tests.
//!
//! - [`image`]: the test guest images (`tiny`, `debian`), built through the same code as
//!   `cargo xtask images` when the cache lacks them;
//! - [`Key`], [`Seed`]: a fresh ed25519 key (ssh-keygen) and a NoCloud seed carrying it,
//!   shaped like the user-data kiln generates;
//! - [`Vm`]: a QEMU guest under TCG (BIOS or UEFI) on its own copy-on-write overlay, with
//!   its SSH port forwarded to a free host port; killed on drop;
//! - [`ssh`]: runs commands with the OpenSSH client;
//! - [`winrs_server`]: a WinRS (WS-Man Windows Remote Shell) server for Linux, with NTLM sealing
//!   and HTTPS, running received commands through a documented shim.

pub mod guest;
pub mod inspect;
pub mod winrs_server;

pub use guest::*;
