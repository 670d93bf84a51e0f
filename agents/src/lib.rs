//! kiln's guest communicators.
//!
//! A build step talks to its guest only through the [`Communicator`] trait: run a command with
//! its output streamed live, upload or download a file, wait for the guest to come back after a
//! reboot. [`SshCommunicator`] implements it on [russh](https://docs.rs/russh) (pinned);
//! [`WinRmCommunicator`] implements it over WinRM (WinRS) for Windows guests.
//!
//! **Architecture invariant:** this crate knows nothing about templates, build plans or QEMU.
//! Whatever decides that a wait is pointless (QEMU exited, a panic on the console) reaches
//! [`SshCommunicator::connect`] as an [`Interrupt`] future.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kiln_agents::{Communicator, ConnectConfig, ExecOptions, SshCommunicator, Stream};
//!
//! let keys = kiln_agents::generate_ed25519("kiln-build-1")?;
//! // ... put keys.public_line into the guest's provisioning media, boot it ...
//! let config = ConnectConfig::new("127.0.0.1:2222".parse()?, "azureuser", keys.private);
//! let guest = SshCommunicator::connect(config, std::future::pending()).await?;
//! let mut sink = |stream: Stream, chunk: &[u8]| eprint!("{stream:?}: {}", String::from_utf8_lossy(chunk));
//! let outcome = guest.exec("uname -a", ExecOptions::default(), &mut sink).await?;
//! assert!(outcome.status.success());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod communicator;
mod error;
mod keys;
mod ssh;
pub mod winrm;

pub use communicator::{
    Collected, Communicator, ConnectReport, ExecOptions, ExecOutcome, ExitStatus,
    HostKeyFingerprint, Interrupt, InterruptFuture, OutputSink, Stream, UploadOutcome,
};
pub use error::{AttemptFailure, CommError, ConnectError, KeyError, WinRmWaitFailure};
pub use keys::{fingerprint, generate_ed25519, load_private_key, write_private_key, KeyPair};
pub use ssh::{ConnectConfig, HostKeyPolicy, Keepalive, SshCommunicator};
pub use winrm::{WinRmCommunicator, WinRmConfig};

/// Key types from russh, re-exported so callers need no direct russh (or ssh-key) dependency.
pub use russh::keys::{PrivateKey, PublicKey};
