//! kiln's WS-Man envelopes against the request/response pairs recorded in pywinrm's test suite
//! (`tests/data/pywinrm/`, see its README for the source).

use std::path::PathBuf;
use std::time::Duration;

use kiln_agents::winrm::wsman::{self, Header, OutStream, ResponseError, ShellOptions, Signal};
use kiln_agents::winrm::{powershell, xml};

const SHELL: &str = "11111111-1111-1111-1111-111111111113";
const CMD: &str = "11111111-1111-1111-1111-111111111114";
const CMD_STDIN: &str = "11111111-1111-1111-1111-111111111111";

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pywinrm")
        .join(format!("{name}.xml"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// pywinrm's fixed header values.
fn header() -> Header {
    Header {
        to: "http://windows-host:5985/wsman".into(),
        message_id: "11111111-1111-1111-1111-111111111111".into(),
        max_envelope_size: 153600,
        operation_timeout: Duration::from_secs(20),
        locale: "en-US".into(),
    }
}

fn assert_same(name: &str, ours: &str) {
    let theirs = xml::canonical(&xml::parse(&data(name)).unwrap());
    let ours = xml::canonical(
        &xml::parse(ours.as_bytes()).unwrap_or_else(|e| panic!("{name}: ours unparsable: {e}")),
    );
    assert_eq!(
        ours, theirs,
        "{name}: kiln's envelope differs from pywinrm's"
    );
}

#[test]
fn requests_match_pywinrm() {
    let h = header();
    let pywinrm_shell = ShellOptions {
        codepage: 437,
        ..ShellOptions::default()
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "open_shell_request",
            wsman::create_shell(&h, &pywinrm_shell),
        ),
        ("close_shell_request", wsman::delete_shell(&h, SHELL)),
        (
            "run_cmd_with_args_request",
            wsman::command(&h, SHELL, "ipconfig", &["/all"]),
        ),
        (
            "run_cmd_wo_args_request",
            wsman::command(&h, SHELL, "hostname", &[]),
        ),
        (
            "run_ps_request",
            wsman::command(
                &h,
                SHELL,
                &format!(
                    "powershell -encodedcommand {}",
                    powershell::encode_command(r#"Write-Error "Error""#)
                ),
                &[],
            ),
        ),
        (
            "cleanup_cmd_request",
            wsman::signal(&h, SHELL, CMD, Signal::Terminate),
        ),
        ("get_cmd_ps_output_request", wsman::receive(&h, SHELL, CMD)),
        ("run_cmd_req_input", wsman::command(&h, SHELL, "cmd", &[])),
        (
            "run_cmd_send_input",
            wsman::send(
                &h,
                SHELL,
                CMD_STDIN,
                b"echo \"hello world\" && exit\r\n",
                false,
            ),
        ),
        (
            "run_cmd_send_input_get_output",
            wsman::receive(&h, SHELL, CMD_STDIN),
        ),
        (
            "stdin_cmd_cleanup",
            wsman::signal(&h, SHELL, CMD_STDIN, Signal::Terminate),
        ),
    ];
    for (name, ours) in cases {
        assert_same(name, &ours);
    }
    // The comparison sees a one-option difference (kiln's default code page is 65001).
    let theirs = xml::canonical(&xml::parse(&data("open_shell_request")).unwrap());
    let ours = wsman::create_shell(&h, &ShellOptions::default());
    assert_ne!(xml::canonical(&xml::parse(ours.as_bytes()).unwrap()), theirs);
}

#[test]
fn responses_parse() {
    assert_eq!(
        wsman::parse_create_response(&data("open_shell_response")).unwrap(),
        SHELL
    );
    assert_eq!(
        wsman::parse_command_response(&data("run_cmd_ps_response")).unwrap(),
        CMD
    );
    assert_eq!(
        wsman::parse_command_response(&data("run_cmd_req_input_response")).unwrap(),
        CMD_STDIN
    );
    for empty in [
        "close_shell_response",
        "cleanup_cmd_response",
        "run_cmd_send_input_response",
        "stdin_cmd_cleanup_response",
    ] {
        wsman::parse_empty_response(&data(empty)).unwrap_or_else(|e| panic!("{empty}: {e}"));
    }

    let r = wsman::parse_receive_response(&data("get_cmd_output_response"), CMD).unwrap();
    assert!(r.done());
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.ended, vec![OutStream::Stdout, OutStream::Stderr]);
    assert_eq!(r.chunks.len(), 2);
    assert!(r.chunks.iter().all(|(s, _)| *s == OutStream::Stdout));
    let stdout: Vec<u8> = r.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
    let stdout = String::from_utf8(stdout).unwrap();
    assert!(stdout.starts_with("\r\nWindows IP Configuration\r\n\r\n"));
    assert!(stdout.contains("Host Name . . . . . . . . . . . . : WINDOWS-HOST"));

    // A Receive for another command sees nothing of this one.
    let other = wsman::parse_receive_response(&data("get_cmd_output_response"), SHELL).unwrap();
    assert!(other.chunks.is_empty() && other.exit_code.is_none());

    let r = wsman::parse_receive_response(
        &data("get_ps_output_response"),
        "11111111-1111-1111-1111-111111111124",
    )
    .unwrap();
    assert_eq!(r.exit_code, Some(1));
    assert!(r.chunks.iter().all(|(s, _)| *s == OutStream::Stderr));
    let stderr: Vec<u8> = r.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
    let stderr = String::from_utf8(stderr).unwrap();
    assert!(stderr.starts_with("#< CLIXML\r\n<Objs Version=\"1.1.0.1\""));
    assert!(stderr.contains("Write-Error \"Error\""));

    let r =
        wsman::parse_receive_response(&data("run_cmd_send_input_get_output_response"), CMD_STDIN)
            .unwrap();
    assert_eq!(r.exit_code, Some(0));
    let out: Vec<u8> = r.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
    assert!(String::from_utf8(out).unwrap().contains("hello world"));
}

fn fault(name: &str) -> wsman::Fault {
    match wsman::parse_create_response(&data(name)) {
        Err(ResponseError::Fault(f)) => {
            assert_eq!(wsman::parse_fault(&data(name)).as_ref(), Some(&*f));
            *f
        }
        other => panic!("{name}: expected a fault, got {other:?}"),
    }
}

#[test]
fn faults_parse_into_typed_fields() {
    let f = fault("wsman_fault_must_understand");
    assert_eq!(f.code.as_deref(), Some("s:MustUnderstand"));
    assert_eq!(f.subcode, None);
    assert_eq!(f.reason.as_deref(), Some("Test reason."));
    assert_eq!(f.wsman_code, None);
    assert!(!f.is_operation_timeout());

    let f = fault("wsman_fault_no_reason");
    assert_eq!(f.code.as_deref(), Some("s:Unknown"));
    assert_eq!(f.reason, None);
    assert!(f.to_string().starts_with("(no error message in fault)"));

    let f = fault("wsman_fault_known_fault");
    assert!(f.is_operation_timeout());
    assert_eq!(f.wsman_code, Some(wsman::OPERATION_TIMED_OUT));
    assert_eq!(f.subcode.as_deref(), Some("w:TimedOut"));
    assert_eq!(f.machine.as_deref(), Some("server2022.domain.test"));

    let f = fault("wsman_fault_with_wsmanfault");
    assert_eq!(f.code.as_deref(), Some("s:Sender"));
    assert_eq!(f.subcode.as_deref(), Some("w:SchemaValidationError"));
    assert_eq!(f.wsman_code, Some(0x80338041));
    assert_eq!(f.message.as_deref(), Some("Detail message."));
    assert_eq!(f.reason.as_deref(), Some("Reason text."));
    assert!(f.to_string().contains("WSManFault 2150858817 (0x80338041)"));

    let f = fault("wsman_fault_wmi_error_detail");
    assert_eq!(f.subcode.as_deref(), Some("w:InternalError"));
    assert_eq!(f.wsman_code, None);
    assert_eq!(f.wmi_error, Some(0x803381A6));
}
