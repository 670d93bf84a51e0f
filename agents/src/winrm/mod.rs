//! WinRM: a Windows Remote Shell (WS-Man) client for Windows guests.
//!
//! - [`wsman`]: the envelopes (Create, Command, Send, Receive, Signal, Delete) and the parsers of
//!   responses and SOAP faults;
//! - [`xml`]: the namespace-resolved XML tree they are read with.

pub mod ntlm;
pub mod powershell;
pub mod wsman;
pub mod xml;
