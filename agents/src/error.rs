//! Error types. Every message names the guest (`user@address`) and, where there is one, the
//! command or path involved.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::communicator::{ExitStatus, HostKeyFingerprint};

/// Why one connection attempt failed. Carried by [`ConnectError::Timeout`] as the last failure
/// seen, so a timeout says what was actually going wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum AttemptFailure {
    /// Nothing listens on the port (TCP RST to our SYN).
    Refused,
    /// The TCP connection could not be made for another reason.
    Tcp(std::io::Error),
    /// TCP connected but the peer closed or reset it before or during the SSH handshake; under
    /// QEMU user networking this is what "sshd not up yet" looks like.
    ClosedEarly(String),
    /// TCP connected but no SSH banner arrived within this time.
    BannerTimeout(Duration),
    /// The banner arrived but key exchange and authentication did not finish within this time.
    HandshakeTimeout(Duration),
    /// The server rejected our key.
    AuthRejected {
        /// Methods the server said may continue, e.g. `publickey,password`.
        remaining: String,
    },
    /// A protocol-level failure reported by the SSH library.
    Protocol(String),
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::Refused => f.write_str("connection refused"),
            AttemptFailure::Tcp(e) => write!(f, "TCP connect failed: {e}"),
            AttemptFailure::ClosedEarly(d) => {
                write!(
                    f,
                    "connection closed by the server during the handshake ({d})"
                )
            }
            AttemptFailure::BannerTimeout(d) => {
                write!(f, "TCP connected but no SSH banner within {d:?}")
            }
            AttemptFailure::HandshakeTimeout(d) => {
                write!(f, "SSH handshake did not finish within {d:?}")
            }
            AttemptFailure::AuthRejected { remaining } => {
                write!(f, "authentication rejected (server allows: {remaining})")
            }
            AttemptFailure::Protocol(d) => write!(f, "SSH protocol error: {d}"),
        }
    }
}

/// Failure to establish a session ([`crate::SshCommunicator::connect`] and `reconnect`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The deadline passed before a session was established.
    #[error(
        "timed out after {elapsed:?} waiting for SSH on {user}@{addr} ({attempts} attempts); \
         last error: {last}"
    )]
    Timeout {
        /// Address dialled.
        addr: String,
        /// User we tried to log in as.
        user: String,
        /// Attempts started.
        attempts: u32,
        /// Time waited.
        elapsed: Duration,
        /// The most recent attempt's failure.
        last: AttemptFailure,
    },
    /// The server kept rejecting our key for longer than the configured auth grace period.
    #[error(
        "SSH authentication as {user} on {addr} was rejected ({attempts} attempts over {elapsed:?}) \
         with the {key_type} key; server allows: {remaining}"
    )]
    AuthRejected {
        /// Address dialled.
        addr: String,
        /// User we tried to log in as.
        user: String,
        /// The key's algorithm, e.g. `ssh-ed25519`.
        key_type: String,
        /// Attempts that reached authentication.
        attempts: u32,
        /// Time from the first rejection to giving up.
        elapsed: Duration,
        /// Methods the server offered instead.
        remaining: String,
    },
    /// The server's host key differs from the pinned one. Never retried.
    #[error(
        "host key mismatch for {addr}: expected {expected}, the server presented {actual} \
         (if the guest was reinstalled this is expected; otherwise something else answers on \
         that port)"
    )]
    HostKeyMismatch {
        /// Address dialled.
        addr: String,
        /// The pinned fingerprint.
        expected: HostKeyFingerprint,
        /// What the server presented.
        actual: HostKeyFingerprint,
    },
    /// The caller's interrupt future fired with [`crate::Interrupt::Aborted`].
    #[error("stopped waiting for SSH on {user}@{addr} after {elapsed:?}: {reason}")]
    Aborted {
        /// Address dialled.
        addr: String,
        /// User we tried to log in as.
        user: String,
        /// Time waited.
        elapsed: Duration,
        /// The caller's reason.
        reason: String,
    },
    /// The caller's interrupt future fired with [`crate::Interrupt::Cancelled`].
    #[error("cancelled while waiting for SSH on {user}@{addr} after {elapsed:?}")]
    Cancelled {
        /// Address dialled.
        addr: String,
        /// User we tried to log in as.
        user: String,
        /// Time waited.
        elapsed: Duration,
    },
    /// Waiting for a WinRM endpoint failed.
    #[error(
        "waiting for WinRM on {endpoint} as {user} ({attempts} attempts over {elapsed:?}): {failure}"
    )]
    WinRm {
        /// The endpoint URL.
        endpoint: String,
        /// The user.
        user: String,
        /// Attempts started.
        attempts: u32,
        /// Time waited.
        elapsed: Duration,
        /// What ended the wait.
        failure: WinRmWaitFailure,
    },
    /// A failure that retrying cannot fix (e.g. no common algorithm with the server).
    #[error("cannot connect to {user}@{addr}: {failure}")]
    Fatal {
        /// Address dialled.
        addr: String,
        /// User we tried to log in as.
        user: String,
        /// What went wrong.
        failure: AttemptFailure,
    },
}

/// Why waiting for a WinRM endpoint ended without a session (see [`ConnectError::WinRm`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum WinRmWaitFailure {
    /// The deadline passed; the last attempt's error is given.
    Timeout(String),
    /// A failure retrying cannot fix (certificate mismatch, NTLM refused, credentials still
    /// rejected after the grace period).
    Fatal(String),
    /// The caller's interrupt fired with [`crate::Interrupt::Aborted`].
    Aborted(String),
    /// The caller's interrupt fired with [`crate::Interrupt::Cancelled`].
    Cancelled,
}

impl fmt::Display for WinRmWaitFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WinRmWaitFailure::Timeout(last) => write!(f, "timed out; last error: {last}"),
            WinRmWaitFailure::Fatal(d) => f.write_str(d),
            WinRmWaitFailure::Aborted(r) => write!(f, "stopped waiting: {r}"),
            WinRmWaitFailure::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Failure of an operation on an established connection ([`crate::Communicator`] methods).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// The connection dropped (guest rebooted or died, sshd killed, keepalives unanswered).
    /// [`crate::Communicator::reconnect`] can wait for the guest to come back.
    #[error("lost the connection to {target} while running `{command}`: {detail}")]
    ConnectionLost {
        /// `user@address`.
        target: String,
        /// The command (shortened) that was running or about to run.
        command: String,
        /// What the transport reported.
        detail: String,
    },
    /// The server refused to open a channel or to run the command.
    #[error("{target} refused to run `{command}`: {detail}")]
    Rejected {
        /// `user@address`.
        target: String,
        /// The command (shortened).
        command: String,
        /// What the server or library said.
        detail: String,
    },
    /// The command exceeded [`crate::ExecOptions::timeout`] and was killed.
    #[error("`{command}` on {target} did not finish within {after:?} and was killed")]
    Timeout {
        /// `user@address`.
        target: String,
        /// The command (shortened).
        command: String,
        /// The timeout.
        after: Duration,
    },
    /// The guest-side write of an upload failed.
    #[error("upload of {dest} to {target} failed ({status}): {stderr}")]
    UploadFailed {
        /// `user@address`.
        target: String,
        /// Destination path in the guest.
        dest: String,
        /// Exit status of the guest-side writer.
        status: ExitStatus,
        /// What the guest-side writer printed on stderr (trimmed).
        stderr: String,
    },
    /// The number of bytes read locally, sent, or written in the guest differs from the length
    /// promised.
    #[error("upload of {dest} to {target}: expected {expected} bytes, {detail}")]
    SizeMismatch {
        /// `user@address`.
        target: String,
        /// Destination path in the guest.
        dest: String,
        /// The length the caller promised.
        expected: u64,
        /// What was found instead.
        detail: String,
    },
    /// Reading a guest file failed.
    #[error("download of {src} from {target} failed ({status}): {stderr}")]
    DownloadFailed {
        /// `user@address`.
        target: String,
        /// Source path in the guest.
        src: String,
        /// Exit status of the guest-side reader.
        status: ExitStatus,
        /// What the guest-side reader printed on stderr (trimmed).
        stderr: String,
    },
    /// Local I/O (reading an upload's source, writing a download's destination) failed.
    #[error("{what}: {source}")]
    LocalIo {
        /// What was being done, naming paths.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Waiting for the guest again failed.
    #[error(transparent)]
    Reconnect(#[from] ConnectError),
    /// [`crate::Communicator::close`] was called earlier.
    #[error("the connection to {target} was closed")]
    Closed {
        /// `user@address`.
        target: String,
    },
}

/// Failure to generate, save or load a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Key generation or encoding failed inside the key library.
    #[error("{what}: {detail}")]
    Crypto {
        /// What was being done.
        what: String,
        /// The library's message.
        detail: String,
    },
    /// Reading or writing a key file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key file could not be parsed (or is encrypted).
    #[error("cannot load the private key {}: {detail}", path.display())]
    Parse {
        /// The key file.
        path: PathBuf,
        /// The library's message.
        detail: String,
    },
}
