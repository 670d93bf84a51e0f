//! WinRM: a Windows Remote Shell (WS-Man) client for Windows guests.
//!
//! - [`WinRmCommunicator`]: the [`crate::Communicator`] over WinRS;
//! - [`transport`]: HTTPS + Basic (certificate pinned on first use) or HTTP + NTLMv2 with every
//!   body sealed ([`encryption`], [`ntlm`]);
//! - [`shell`]: the WinRS operations on one connection;
//! - [`wsman`]: the envelopes (Create, Command, Send, Receive, Signal, Delete) and the parsers of
//!   responses and SOAP faults, read through [`xml`];
//! - [`powershell`]: `-EncodedCommand` lines and the upload scripts.
//!
//! **Invariants:** over plain HTTP no SOAP body is ever sent or accepted in plaintext; NTLM
//! without 128-bit sealing is refused; a Receive's OperationTimeout fault is "poll again", never
//! an error; a request larger than `MaxEnvelopeSize` is refused before it is sent.

mod communicator;
pub mod encryption;
mod error;
pub mod ntlm;
pub mod powershell;
pub mod shell;
pub mod transport;
pub mod wsman;
pub mod xml;

pub use communicator::{WinRmCommunicator, WinRmConfig};
pub use error::WinRmError;
pub use shell::WsmanSettings;
pub use transport::{cert_fingerprint, CertPolicy, Security, TransportConfig};
