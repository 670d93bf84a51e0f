//! WS-Management envelopes of the Windows Remote Shell (MS-WSMV §3.1.4.1.x): the requests a
//! client sends (Create, Command, Send, Receive, Signal, Delete) and parsers for the responses
//! and SOAP faults.
//!
//! Requests are written as text in the element order pywinrm uses (checked against its recorded
//! envelopes in `agents/tests/data/pywinrm/`); responses are read through [`super::xml`], so
//! prefixes and element order do not matter.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;

use super::xml::{self, escape, Element};

/// Namespace URIs.
pub mod ns {
    /// SOAP 1.2 envelope.
    pub const SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
    /// WS-Addressing (2004/08).
    pub const ADDRESSING: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
    /// WS-Management (DMTF).
    pub const WSMAN: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
    /// Microsoft's WS-Management extensions (`p:DataLocale`).
    pub const WSMAN_MS: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
    /// Windows Remote Shell.
    pub const SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell";
    /// WS-Transfer.
    pub const TRANSFER: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer";
    /// The `WSManFault` detail element.
    pub const WSMAN_FAULT: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault";
    /// The `MSFT_WmiError` detail element.
    pub const WMI_ERROR: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/MSFT_WmiError";
    /// The `xml:` prefix.
    pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
}

/// The resource URI of the `cmd.exe` shell.
pub const RESOURCE_CMD: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
/// WS-Addressing's anonymous reply address.
pub const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";

/// `a:Action` URIs.
pub mod action {
    /// Create a shell.
    pub const CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
    /// Delete a shell.
    pub const DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
    /// Start a command.
    pub const COMMAND: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command";
    /// Feed stdin.
    pub const SEND: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Send";
    /// Fetch output.
    pub const RECEIVE: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive";
    /// Signal a command.
    pub const SIGNAL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal";
    /// The action of a WS-Management fault.
    pub const FAULT: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault";
}

/// `CommandState` URIs.
pub mod state {
    /// The command has ended; an `ExitCode` follows.
    pub const DONE: &str =
        "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done";
    /// The command is running.
    pub const RUNNING: &str =
        "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running";
    /// The command waits for input.
    pub const PENDING: &str =
        "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Pending";
}

/// The `WSManFault` code of a Receive that saw no output within `OperationTimeout`
/// (0x80338029, `ERROR_WSMAN_OPERATION_TIMEDOUT`): poll again, it is not an error.
pub const OPERATION_TIMED_OUT: u32 = 2_150_858_793;
/// The `WSManFault` code for an unknown shell (0x8033805B): the shell is gone (service restart,
/// reboot, idle timeout).
pub const SHELL_NOT_FOUND: u32 = 2_150_858_843;

/// Signals a client can send to a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Release (after Done) or kill the command.
    Terminate,
    /// Ctrl-C.
    CtrlC,
}

impl Signal {
    /// The signal's URI.
    pub fn uri(self) -> &'static str {
        match self {
            Signal::Terminate => {
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"
            }
            Signal::CtrlC => {
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_c"
            }
        }
    }
}

/// The header fields every request carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `a:To`: the endpoint URL, e.g. `http://host:5985/wsman`.
    pub to: String,
    /// `a:MessageID` without the `uuid:` prefix.
    pub message_id: String,
    /// `w:MaxEnvelopeSize` in bytes: the largest response the server may send.
    pub max_envelope_size: u32,
    /// `w:OperationTimeout`: how long a Receive may wait for output before the server answers
    /// with the [`OPERATION_TIMED_OUT`] fault.
    pub operation_timeout: Duration,
    /// `xml:lang` of `w:Locale` and `p:DataLocale`.
    pub locale: String,
}

/// A fresh random `a:MessageID` (a version 4 UUID, lower case).
pub fn new_message_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// An `xs:duration` for `OperationTimeout`: `PT20S`, `PT0.500S`.
pub fn duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("PT{}S", d.as_secs())
    } else {
        format!("PT{}.{:03}S", d.as_secs(), d.subsec_millis())
    }
}

/// Parse the `xs:duration` forms WS-Man uses (`PT60S`, `PT60.000S`, `PT1M30S`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let rest = s.trim().strip_prefix("PT")?;
    let mut total = 0f64;
    let mut num = String::new();
    for c in rest.chars() {
        match c {
            '0'..='9' | '.' => num.push(c),
            'H' | 'M' | 'S' => {
                let v: f64 = num.parse().ok()?;
                num.clear();
                total += v * match c {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
            }
            _ => return None,
        }
    }
    if !num.is_empty() || !total.is_finite() || total < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

const ENVELOPE_OPEN: &str = concat!(
    r#"<?xml version="1.0" encoding="utf-8"?>"#,
    "\n",
    r#"<env:Envelope xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd" xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" xmlns:env="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing">"#
);

fn envelope(
    h: &Header,
    action: &str,
    shell_id: Option<&str>,
    options: &[(&str, &str)],
    body: &str,
) -> String {
    let mut s = String::with_capacity(1500 + body.len());
    s.push_str(ENVELOPE_OPEN);
    s.push_str("<env:Header>");
    s.push_str(&format!("<a:To>{}</a:To>", escape(&h.to)));
    s.push_str(&format!(
        r#"<a:ReplyTo><a:Address mustUnderstand="true">{ANONYMOUS}</a:Address></a:ReplyTo>"#
    ));
    s.push_str(&format!(
        r#"<w:MaxEnvelopeSize mustUnderstand="true">{}</w:MaxEnvelopeSize>"#,
        h.max_envelope_size
    ));
    s.push_str(&format!(
        "<a:MessageID>uuid:{}</a:MessageID>",
        escape(&h.message_id)
    ));
    let lang = escape(&h.locale);
    s.push_str(&format!(
        r#"<w:Locale mustUnderstand="false" xml:lang="{lang}"/><p:DataLocale mustUnderstand="false" xml:lang="{lang}"/>"#
    ));
    s.push_str(&format!(
        "<w:OperationTimeout>{}</w:OperationTimeout>",
        duration(h.operation_timeout)
    ));
    s.push_str(&format!(
        r#"<w:ResourceURI mustUnderstand="true">{RESOURCE_CMD}</w:ResourceURI>"#
    ));
    s.push_str(&format!(
        r#"<a:Action mustUnderstand="true">{action}</a:Action>"#
    ));
    if let Some(id) = shell_id {
        s.push_str(&format!(
            r#"<w:SelectorSet><w:Selector Name="ShellId">{}</w:Selector></w:SelectorSet>"#,
            escape(id)
        ));
    }
    if !options.is_empty() {
        s.push_str("<w:OptionSet>");
        for (k, v) in options {
            s.push_str(&format!(
                r#"<w:Option Name="{}">{}</w:Option>"#,
                escape(k),
                escape(v)
            ));
        }
        s.push_str("</w:OptionSet>");
    }
    s.push_str("</env:Header><env:Body>");
    s.push_str(body);
    s.push_str("</env:Body></env:Envelope>");
    s
}

/// Options of a new shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellOptions {
    /// `WINRS_CODEPAGE`: 65001 (UTF-8) for kiln; pywinrm sends 437.
    pub codepage: u32,
    /// `WINRS_NOPROFILE`.
    pub no_profile: bool,
    /// `rsp:WorkingDirectory`.
    pub working_directory: Option<String>,
    /// `rsp:Environment` variables.
    pub environment: Vec<(String, String)>,
}

impl Default for ShellOptions {
    fn default() -> Self {
        ShellOptions {
            codepage: 65001,
            no_profile: false,
            working_directory: None,
            environment: Vec::new(),
        }
    }
}

fn bool_opt(b: bool) -> &'static str {
    if b {
        "TRUE"
    } else {
        "FALSE"
    }
}

/// Create: open a `cmd` shell with stdin, stdout and stderr streams.
pub fn create_shell(h: &Header, o: &ShellOptions) -> String {
    let codepage = o.codepage.to_string();
    let mut body = String::from(
        "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>",
    );
    if let Some(wd) = &o.working_directory {
        body.push_str(&format!(
            "<rsp:WorkingDirectory>{}</rsp:WorkingDirectory>",
            escape(wd)
        ));
    }
    if !o.environment.is_empty() {
        body.push_str("<rsp:Environment>");
        for (k, v) in &o.environment {
            body.push_str(&format!(
                r#"<rsp:Variable Name="{}">{}</rsp:Variable>"#,
                escape(k),
                escape(v)
            ));
        }
        body.push_str("</rsp:Environment>");
    }
    body.push_str("</rsp:Shell>");
    envelope(
        h,
        action::CREATE,
        None,
        &[
            ("WINRS_NOPROFILE", bool_opt(o.no_profile)),
            ("WINRS_CODEPAGE", &codepage),
        ],
        &body,
    )
}

/// Command: start `command` (with `arguments`, each its own `rsp:Arguments`) in the shell.
pub fn command(h: &Header, shell_id: &str, command: &str, arguments: &[&str]) -> String {
    let mut body = format!(
        "<rsp:CommandLine><rsp:Command>{}</rsp:Command>",
        escape(command)
    );
    for a in arguments {
        body.push_str(&format!("<rsp:Arguments>{}</rsp:Arguments>", escape(a)));
    }
    body.push_str("</rsp:CommandLine>");
    envelope(
        h,
        action::COMMAND,
        Some(shell_id),
        &[
            ("WINRS_CONSOLEMODE_STDIN", "TRUE"),
            ("WINRS_SKIP_CMD_SHELL", "FALSE"),
        ],
        &body,
    )
}

/// Send: feed `data` to the command's stdin; `end` closes it.
pub fn send(h: &Header, shell_id: &str, command_id: &str, data: &[u8], end: bool) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let body = format!(
        r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{}" End="{}">{b64}</rsp:Stream></rsp:Send>"#,
        escape(command_id),
        end
    );
    envelope(h, action::SEND, Some(shell_id), &[], &body)
}

/// Receive: ask for the command's stdout and stderr.
pub fn receive(h: &Header, shell_id: &str, command_id: &str) -> String {
    let body = format!(
        r#"<rsp:Receive><rsp:DesiredStream CommandId="{}">stdout stderr</rsp:DesiredStream></rsp:Receive>"#,
        escape(command_id)
    );
    envelope(h, action::RECEIVE, Some(shell_id), &[], &body)
}

/// Signal: terminate (release after Done, or kill) or Ctrl-C a command.
pub fn signal(h: &Header, shell_id: &str, command_id: &str, sig: Signal) -> String {
    let body = format!(
        r#"<rsp:Signal CommandId="{}"><rsp:Code>{}</rsp:Code></rsp:Signal>"#,
        escape(command_id),
        sig.uri()
    );
    envelope(h, action::SIGNAL, Some(shell_id), &[], &body)
}

/// Delete: close the shell.
pub fn delete_shell(h: &Header, shell_id: &str) -> String {
    envelope(h, action::DELETE, Some(shell_id), &[], "")
}

/// A SOAP fault as WinRM reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// `s:Code/s:Value`, e.g. `s:Receiver`.
    pub code: Option<String>,
    /// `s:Code/s:Subcode/s:Value`, e.g. `w:TimedOut`.
    pub subcode: Option<String>,
    /// `s:Reason/s:Text`, trimmed.
    pub reason: Option<String>,
    /// `f:WSManFault/@Code`, e.g. [`OPERATION_TIMED_OUT`].
    pub wsman_code: Option<u32>,
    /// `f:WSManFault/@Machine`.
    pub machine: Option<String>,
    /// `f:WSManFault/f:Message`, trimmed.
    pub message: Option<String>,
    /// `MSFT_WmiError/error_Code`.
    pub wmi_error: Option<u32>,
}

impl Fault {
    /// True for the Receive timeout that means "no output yet, poll again".
    pub fn is_operation_timeout(&self) -> bool {
        self.wsman_code == Some(OPERATION_TIMED_OUT)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self
            .reason
            .as_deref()
            .or(self.message.as_deref())
            .unwrap_or("(no error message in fault)");
        f.write_str(reason)?;
        let mut parts = Vec::new();
        if let Some(c) = &self.code {
            parts.push(c.clone());
        }
        if let Some(c) = &self.subcode {
            parts.push(c.clone());
        }
        if let Some(c) = self.wsman_code {
            parts.push(format!("WSManFault {c} (0x{c:08X})"));
        }
        if let Some(c) = self.wmi_error {
            parts.push(format!("WMI error {c} (0x{c:08X})"));
        }
        if !parts.is_empty() {
            write!(f, " [{}]", parts.join(", "))?;
        }
        Ok(())
    }
}

/// Why a response could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not well-formed XML.
    #[error("malformed response: {0}")]
    Xml(String),
    /// Not a SOAP envelope, or an expected element is missing.
    #[error("unexpected response: {0}")]
    Shape(String),
    /// The server answered with a SOAP fault.
    #[error("SOAP fault: {0}")]
    Fault(Box<Fault>),
}

fn body_of(doc: &[u8]) -> Result<Element, ResponseError> {
    let root = xml::parse(doc).map_err(ResponseError::Xml)?;
    if !root.is(ns::SOAP, "Envelope") {
        return Err(ResponseError::Shape(format!(
            "root element is {{{}}}{}, not a SOAP 1.2 Envelope",
            root.ns, root.name
        )));
    }
    let body = root
        .children
        .into_iter()
        .find(|c| c.is(ns::SOAP, "Body"))
        .ok_or_else(|| ResponseError::Shape("SOAP Envelope without a Body".into()))?;
    if let Some(f) = body.child(ns::SOAP, "Fault") {
        return Err(ResponseError::Fault(Box::new(fault_of(f))));
    }
    Ok(body)
}

fn nonempty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn fault_of(f: &Element) -> Fault {
    let text = |steps: &[(&str, &str)]| f.path(steps).and_then(|e| nonempty(&e.text));
    let wsf = f.path(&[(ns::SOAP, "Detail"), (ns::WSMAN_FAULT, "WSManFault")]);
    Fault {
        code: text(&[(ns::SOAP, "Code"), (ns::SOAP, "Value")]),
        subcode: text(&[
            (ns::SOAP, "Code"),
            (ns::SOAP, "Subcode"),
            (ns::SOAP, "Value"),
        ]),
        reason: text(&[(ns::SOAP, "Reason"), (ns::SOAP, "Text")]),
        wsman_code: wsf
            .and_then(|w| w.attr("Code"))
            .and_then(|c| c.trim().parse().ok()),
        machine: wsf.and_then(|w| w.attr("Machine")).map(str::to_string),
        message: wsf
            .and_then(|w| w.child(ns::WSMAN_FAULT, "Message"))
            .and_then(|m| nonempty(&m.text)),
        wmi_error: f
            .path(&[
                (ns::SOAP, "Detail"),
                (ns::WMI_ERROR, "MSFT_WmiError"),
                (ns::WMI_ERROR, "error_Code"),
            ])
            .and_then(|e| e.text.trim().parse().ok()),
    }
}

/// Parse a document that may be a SOAP fault (e.g. the body of an HTTP 500).
pub fn parse_fault(doc: &[u8]) -> Option<Fault> {
    match body_of(doc) {
        Err(ResponseError::Fault(f)) => Some(*f),
        _ => None,
    }
}

/// The ShellId of a Create response (`x:ResourceCreated//w:Selector[@Name=ShellId]`, or
/// `rsp:Shell/rsp:ShellId` on newer servers).
pub fn parse_create_response(doc: &[u8]) -> Result<String, ResponseError> {
    let body = body_of(doc)?;
    if let Some(rc) = body.child(ns::TRANSFER, "ResourceCreated") {
        if let Some(sel) = rc
            .find(ns::WSMAN, "SelectorSet")
            .and_then(|s| {
                s.children_named(ns::WSMAN, "Selector")
                    .find(|e| e.attr("Name") == Some("ShellId"))
            })
            .and_then(|e| nonempty(&e.text))
        {
            return Ok(sel);
        }
    }
    if let Some(id) = body
        .path(&[(ns::SHELL, "Shell"), (ns::SHELL, "ShellId")])
        .and_then(|e| nonempty(&e.text))
    {
        return Ok(id);
    }
    Err(ResponseError::Shape(
        "Create response carries no ShellId".into(),
    ))
}

/// The CommandId of a Command response.
pub fn parse_command_response(doc: &[u8]) -> Result<String, ResponseError> {
    let body = body_of(doc)?;
    body.path(&[(ns::SHELL, "CommandResponse"), (ns::SHELL, "CommandId")])
        .and_then(|e| nonempty(&e.text))
        .ok_or_else(|| ResponseError::Shape("Command response carries no CommandId".into()))
}

/// Check that a Send, Signal or Delete response is not a fault.
pub fn parse_empty_response(doc: &[u8]) -> Result<(), ResponseError> {
    body_of(doc).map(|_| ())
}

/// Which output stream a chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutStream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// One parsed Receive response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Decoded chunks in document order (empty `End="true"` markers are skipped).
    pub chunks: Vec<(OutStream, Vec<u8>)>,
    /// Streams whose `End="true"` marker was seen.
    pub ended: Vec<OutStream>,
    /// `Some(code)` once `CommandState` is Done.
    pub exit_code: Option<i32>,
    /// The `CommandState/@State` URI, if present.
    pub state: Option<String>,
}

impl Received {
    /// True when the command has ended.
    pub fn done(&self) -> bool {
        self.state.as_deref() == Some(state::DONE)
    }
}

/// Parse a Receive response for `command_id` (streams of other commands are ignored).
pub fn parse_receive_response(doc: &[u8], command_id: &str) -> Result<Received, ResponseError> {
    let body = body_of(doc)?;
    let rr = body
        .child(ns::SHELL, "ReceiveResponse")
        .ok_or_else(|| ResponseError::Shape("no rsp:ReceiveResponse in the Body".into()))?;
    let mut out = Received::default();
    let ours = |e: &Element| {
        e.attr("CommandId")
            .is_none_or(|id| id.eq_ignore_ascii_case(command_id))
    };
    for s in rr.children_named(ns::SHELL, "Stream").filter(|e| ours(e)) {
        let stream = match s.attr("Name") {
            Some("stdout") => OutStream::Stdout,
            Some("stderr") => OutStream::Stderr,
            other => {
                return Err(ResponseError::Shape(format!(
                    "rsp:Stream with unexpected Name {other:?}"
                )))
            }
        };
        let text: String = s.text.split_whitespace().collect();
        if !text.is_empty() {
            let data = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| ResponseError::Shape(format!("rsp:Stream is not base64: {e}")))?;
            out.chunks.push((stream, data));
        }
        if s.attr("End")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            out.ended.push(stream);
        }
    }
    if let Some(cs) = rr
        .children_named(ns::SHELL, "CommandState")
        .find(|e| ours(e))
    {
        out.state = cs.attr("State").map(str::to_string);
        if out.done() {
            let code = cs
                .child(ns::SHELL, "ExitCode")
                .map(|e| e.text.trim())
                .ok_or_else(|| {
                    ResponseError::Shape("CommandState Done without an ExitCode".into())
                })?;
            let v: i64 = code
                .parse()
                .map_err(|_| ResponseError::Shape(format!("ExitCode {code:?} is not a number")))?;
            // Windows exit codes are DWORDs; servers print them signed or unsigned.
            out.exit_code = Some(v as u32 as i32);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_secs(20)), "PT20S");
        assert_eq!(duration(Duration::from_millis(1500)), "PT1.500S");
        assert_eq!(parse_duration("PT60.000S"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("PT1M30S"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("P1D"), None);
        assert_eq!(parse_duration("PT5"), None);
    }

    #[test]
    fn message_ids_are_v4_uuids() {
        let id = new_message_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_message_id());
    }

    #[test]
    fn negative_and_dword_exit_codes() {
        let doc = |code: &str| {
            format!(
                r#"<s:Envelope xmlns:s="{}" xmlns:rsp="{}"><s:Body><rsp:ReceiveResponse><rsp:CommandState CommandId="C" State="{}"><rsp:ExitCode>{code}</rsp:ExitCode></rsp:CommandState></rsp:ReceiveResponse></s:Body></s:Envelope>"#,
                ns::SOAP,
                ns::SHELL,
                state::DONE
            )
        };
        let r = parse_receive_response(doc("3221225786").as_bytes(), "C").unwrap();
        assert_eq!(r.exit_code, Some(-1073741510));
        let r = parse_receive_response(doc("-1073741510").as_bytes(), "c").unwrap();
        assert_eq!(r.exit_code, Some(-1073741510));
        assert!(parse_receive_response(doc("x").as_bytes(), "C").is_err());
    }
}
