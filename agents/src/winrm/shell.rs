//! The WinRS operations on one [`Transport`]: each call writes one envelope with a fresh
//! MessageID, posts it and parses the answer.

use std::time::Duration;

use super::error::WinRmError;
use super::transport::Transport;
use super::wsman::{self, Header, Received, ShellOptions, Signal};

/// WS-Man header settings shared by every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsmanSettings {
    /// `MaxEnvelopeSize` in bytes. Default 153600 (what pywinrm sends; every Windows since
    /// 2008 R2 accepts it). Requests larger than this are refused before sending, and stdin and
    /// upload chunks are sized to fit.
    pub max_envelope_size: u32,
    /// `OperationTimeout` of a Receive: the server answers with the OperationTimeout fault when
    /// no output arrived within it, and the client polls again. Default 20 s (Windows' ceiling
    /// is `MaxTimeoutms`, 60 s).
    pub operation_timeout: Duration,
    /// `xml:lang` of Locale and DataLocale. Default `en-US`.
    pub locale: String,
    /// Options of the shells created.
    pub shell: ShellOptions,
}

impl Default for WsmanSettings {
    fn default() -> Self {
        WsmanSettings {
            max_envelope_size: 153_600,
            operation_timeout: Duration::from_secs(20),
            locale: "en-US".into(),
            shell: ShellOptions::default(),
        }
    }
}

/// Room left in an envelope for payload: the largest header and body framing kiln writes is
/// well under this.
const ENVELOPE_OVERHEAD: usize = 4096;

/// WinRS operations over one authenticated connection.
#[derive(Debug)]
pub struct ShellClient {
    /// The connection.
    pub transport: Transport,
    settings: WsmanSettings,
}

impl ShellClient {
    /// Wrap a connected transport.
    pub fn new(transport: Transport, settings: WsmanSettings) -> Self {
        ShellClient {
            transport,
            settings,
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &WsmanSettings {
        &self.settings
    }

    fn header(&self, operation_timeout: Option<Duration>) -> Header {
        Header {
            to: self.transport.endpoint().to_string(),
            message_id: wsman::new_message_id(),
            max_envelope_size: self.settings.max_envelope_size,
            operation_timeout: operation_timeout.unwrap_or(self.settings.operation_timeout),
            locale: self.settings.locale.clone(),
        }
    }

    fn response_err(&self, action: &'static str, source: wsman::ResponseError) -> WinRmError {
        match source {
            wsman::ResponseError::Fault(fault) => WinRmError::Fault {
                endpoint: self.transport.endpoint().to_string(),
                action,
                fault,
            },
            source => WinRmError::Response {
                endpoint: self.transport.endpoint().to_string(),
                action,
                source,
            },
        }
    }

    /// The largest stdin chunk (raw bytes) one Send envelope can carry.
    pub fn max_send_chunk(&self) -> usize {
        let room = (self.settings.max_envelope_size as usize).saturating_sub(ENVELOPE_OVERHEAD);
        (room / 4 * 3).max(1)
    }

    /// Create a shell; returns its ShellId.
    pub async fn create_shell(&mut self) -> Result<String, WinRmError> {
        let h = self.header(None);
        let env = wsman::create_shell(&h, &self.settings.shell);
        let resp = self.transport.post("Create", &env, &h).await?;
        wsman::parse_create_response(&resp).map_err(|e| self.response_err("Create", e))
    }

    /// Start a command; returns its CommandId.
    pub async fn command(
        &mut self,
        shell_id: &str,
        command: &str,
        arguments: &[&str],
    ) -> Result<String, WinRmError> {
        let h = self.header(None);
        let env = wsman::command(&h, shell_id, command, arguments);
        let resp = self.transport.post("Command", &env, &h).await?;
        wsman::parse_command_response(&resp).map_err(|e| self.response_err("Command", e))
    }

    /// Feed stdin (at most [`ShellClient::max_send_chunk`] bytes).
    pub async fn send(
        &mut self,
        shell_id: &str,
        command_id: &str,
        data: &[u8],
        end: bool,
    ) -> Result<(), WinRmError> {
        let h = self.header(None);
        let env = wsman::send(&h, shell_id, command_id, data, end);
        let resp = self.transport.post("Send", &env, &h).await?;
        wsman::parse_empty_response(&resp).map_err(|e| self.response_err("Send", e))
    }

    /// One Receive. `Ok(None)` when the server reported the OperationTimeout fault (no output
    /// within `operation_timeout`): poll again.
    pub async fn receive(
        &mut self,
        shell_id: &str,
        command_id: &str,
        operation_timeout: Option<Duration>,
    ) -> Result<Option<Received>, WinRmError> {
        let h = self.header(operation_timeout);
        let env = wsman::receive(&h, shell_id, command_id);
        match self.transport.post("Receive", &env, &h).await {
            Ok(resp) => wsman::parse_receive_response(&resp, command_id)
                .map(Some)
                .map_err(|e| self.response_err("Receive", e)),
            Err(e) if e.fault().is_some_and(|f| f.is_operation_timeout()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Signal a command.
    pub async fn signal(
        &mut self,
        shell_id: &str,
        command_id: &str,
        sig: Signal,
    ) -> Result<(), WinRmError> {
        let h = self.header(None);
        let env = wsman::signal(&h, shell_id, command_id, sig);
        let resp = self.transport.post("Signal", &env, &h).await?;
        wsman::parse_empty_response(&resp).map_err(|e| self.response_err("Signal", e))
    }

    /// Delete a shell.
    pub async fn delete_shell(&mut self, shell_id: &str) -> Result<(), WinRmError> {
        let h = self.header(None);
        let env = wsman::delete_shell(&h, shell_id);
        let resp = self.transport.post("Delete", &env, &h).await?;
        wsman::parse_empty_response(&resp).map_err(|e| self.response_err("Delete", e))
    }
}
