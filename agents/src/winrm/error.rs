//! Errors of the WinRM protocol layer. Every message names the endpoint (`https://host:5986/wsman`)
//! and, where there is one, the WS-Man operation.

use super::encryption::FramingError;
use super::ntlm::NtlmError;
use super::wsman::{Fault, ResponseError};
use crate::communicator::HostKeyFingerprint;

/// Why a WinRM request or connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WinRmError {
    /// TCP connect or the TLS handshake failed; retrying may help (the guest is booting).
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect {
        /// The endpoint URL.
        endpoint: String,
        /// What failed.
        detail: String,
        /// The connection was actively refused.
        refused: bool,
    },
    /// The server's TLS certificate differs from the pinned one. Never retried.
    #[error(
        "TLS certificate mismatch for {endpoint}: expected {expected}, the server presented \
         {actual} (if the guest was reinstalled this is expected; otherwise something else \
         answers on that port)"
    )]
    CertificateMismatch {
        /// The endpoint URL.
        endpoint: String,
        /// The pinned fingerprint.
        expected: HostKeyFingerprint,
        /// What the server presented.
        actual: HostKeyFingerprint,
    },
    /// The server refused our credentials (HTTP 401 after authenticating).
    #[error("{endpoint} rejected {scheme} authentication as {user}: {detail}")]
    AuthRejected {
        /// The endpoint URL.
        endpoint: String,
        /// The user.
        user: String,
        /// `Basic` or `Negotiate (NTLM)`.
        scheme: &'static str,
        /// What the server said.
        detail: String,
    },
    /// The NTLM handshake or message sealing failed.
    #[error("NTLM with {endpoint} failed: {source}")]
    Ntlm {
        /// The endpoint URL.
        endpoint: String,
        /// The NTLM failure.
        source: NtlmError,
    },
    /// A sealed response could not be opened.
    #[error("cannot decrypt the {action} response from {endpoint}: {source}")]
    Decrypt {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// What was wrong.
        source: FramingError,
    },
    /// The server answered an HTTP status that is neither success nor a SOAP fault.
    #[error("{action} on {endpoint}: HTTP {status}: {body}")]
    Http {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The server answered with a SOAP fault.
    #[error("{action} on {endpoint} failed: {fault}")]
    Fault {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// The parsed fault.
        fault: Box<Fault>,
    },
    /// The response was not what the operation returns.
    #[error("{action} on {endpoint}: {source}")]
    Response {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// What was wrong.
        source: ResponseError,
    },
    /// The connection broke during a request (guest rebooted or died), or no answer came in time.
    #[error("{action} on {endpoint}: connection lost: {detail}")]
    ConnectionLost {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// What the transport reported.
        detail: String,
    },
    /// A request envelope exceeds the configured `MaxEnvelopeSize`.
    #[error("{action} request to {endpoint} is {size} bytes, over MaxEnvelopeSize {max}")]
    EnvelopeTooLarge {
        /// The endpoint URL.
        endpoint: String,
        /// The WS-Man operation.
        action: &'static str,
        /// The envelope's size.
        size: usize,
        /// The limit.
        max: u32,
    },
}

impl WinRmError {
    /// The fault, when the server sent one.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            WinRmError::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }

    /// True when trying again later may succeed (the guest is not up yet, or went away).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WinRmError::Connect { .. } | WinRmError::ConnectionLost { .. }
        ) || matches!(self, WinRmError::Http { status, .. } if *status >= 500)
    }
}
