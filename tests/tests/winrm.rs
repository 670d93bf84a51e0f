//! kiln's WinRM communicator against the WinRS test server (tests/winrs_server.rs), over both
//! transports: HTTPS + Basic with the certificate pinned on first use, and HTTP + NTLMv2 with
//! every body sealed. The server is a Linux stand-in for Windows' WinRM service (see its module
//! docs for the command shim); independent clients check it in winrm_clients.rs.

use std::time::Duration;

use kiln_agents::winrm::{CertPolicy, WsmanSettings};
use kiln_agents::winrm::{Security, WinRmCommunicator, WinRmConfig};
use kiln_agents::{CommError, Communicator, ConnectError, ExecOptions, Stream, WinRmWaitFailure};
use kiln_tests::winrs_server::{Stats, TestCert, WinrsAuth, WinrsServer, WinrsServerConfig};

const USER: &str = "kiln";
const PASSWORD: &str = "Pa55w.rd-with:colon";

fn security(auth: &WinrsAuth) -> Security {
    match auth {
        WinrsAuth::HttpsBasic => Security::HttpsBasic(CertPolicy::TrustOnFirstUse),
        WinrsAuth::HttpNtlm => Security::HttpNtlm,
    }
}

fn config(server: &WinrsServer) -> WinRmConfig {
    let mut c = WinRmConfig::new(server.addr(), USER, PASSWORD, security(server.auth()));
    c.timeout = Duration::from_secs(60);
    c
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-winrm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pending() -> std::future::Pending<kiln_agents::Interrupt> {
    std::future::pending()
}

async fn exercise(auth: WinrsAuth) {
    let server = WinrsServer::start(WinrsServerConfig::new(auth.clone(), USER, PASSWORD))
        .await
        .unwrap();
    let mut cfg = config(&server);
    // Short Receive timeouts: a quiet command makes the server answer with the OperationTimeout
    // fault, which the client must treat as "poll again".
    cfg.wsman = WsmanSettings {
        operation_timeout: Duration::from_secs(1),
        ..WsmanSettings::default()
    };
    let guest = WinRmCommunicator::connect(cfg, pending()).await.unwrap();
    let report = guest.connect_report();
    if auth == WinrsAuth::HttpsBasic {
        assert_eq!(
            report.host_key.as_ref(),
            Some(&server.cert().unwrap().fingerprint()),
            "the certificate seen is reported"
        );
    }

    // Exit code, stdout and stderr kept apart.
    let (o, c) = guest
        .exec_collect("echo hello; echo oops >&2; exit 3", ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(o.status, kiln_agents::ExitStatus::Code(3));
    assert_eq!(c.stdout_lossy(), "hello\n");
    assert_eq!(c.stderr_lossy(), "oops\n");
    assert_eq!((o.stdout_bytes, o.stderr_bytes), (6, 5));

    // Output is streamed while the command runs: the command waits for a file that the sink
    // creates only when it has seen the first line. Without live streaming this would run into
    // the exec timeout.
    let dir = tmpdir(&format!("{auth:?}"));
    let flag = dir.join("flag");
    let script = format!(
        "echo first; while [ ! -e '{f}' ]; do sleep 0.05; done; echo second",
        f = flag.display()
    );
    let mut seen = String::new();
    let mut sink = |s: Stream, d: &[u8]| {
        assert_eq!(s, Stream::Stdout);
        seen.push_str(&String::from_utf8_lossy(d));
        if seen.contains("first") {
            std::fs::write(&flag, b"").unwrap();
        }
    };
    let opts = ExecOptions {
        timeout: Some(Duration::from_secs(120)),
        ..ExecOptions::default()
    };
    let o = guest.exec(&script, opts, &mut sink).await.unwrap();
    assert!(o.status.success());
    assert_eq!(seen, "first\nsecond\n");

    // A quiet command outlasts several OperationTimeouts.
    let before = Stats::get(&server.stats().operation_timeouts);
    let (o, c) = guest
        .exec_collect("sleep 3; echo slept", ExecOptions::default())
        .await
        .unwrap();
    assert!(o.status.success());
    assert_eq!(c.stdout_lossy(), "slept\n");
    assert!(
        Stats::get(&server.stats().operation_timeouts) > before,
        "the server sent OperationTimeout faults and the client polled again"
    );

    // stdin through Send, larger than one Send envelope.
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut reader = &input[..];
    let (o, c) = guest
        .exec_collect(
            "cat",
            ExecOptions {
                stdin: Some(&mut reader),
                timeout: Some(Duration::from_secs(120)),
            },
        )
        .await
        .unwrap();
    assert!(o.status.success());
    assert_eq!(o.stdin_bytes, input.len() as u64);
    assert!(c.stdout == input, "stdin came back intact through cat");

    // Upload (chunked base64 through the PowerShell path) and download.
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let dest = dir.join("it's uploaded.bin");
    let dest_s = dest.to_str().unwrap();
    let mut r = &data[..];
    let up = guest
        .upload(&mut r, data.len() as u64, dest_s, 0o644)
        .await
        .unwrap();
    assert_eq!(up.bytes, data.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let mut back = Vec::new();
    let n = guest.download(dest_s, &mut back).await.unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(back, data);
    // An empty file, and a path cmd.exe cannot quote.
    let empty = dir.join("empty");
    let mut nothing: &[u8] = &[];
    guest
        .upload(&mut nothing, 0, empty.to_str().unwrap(), 0o644)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&empty).unwrap(), b"");
    let mut r = &data[..];
    let err = guest
        .upload(&mut r, data.len() as u64, "/tmp/100%", 0o644)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cmd.exe"), "{err}");
    // A reader that yields less than promised is an error.
    let mut short = &data[..10];
    let err = guest
        .upload(&mut short, 11, dest_s, 0o644)
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::SizeMismatch { .. }), "{err}");

    // Command lines cmd.exe would mangle are refused before anything is sent.
    for bad in ["echo a\necho b", &"x".repeat(8192)] {
        let err = guest
            .exec_collect(bad, ExecOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, CommError::Rejected { .. }), "{err}");
        assert!(err.to_string().contains("cmd.exe"), "{err}");
    }

    // exec timeout: the command is killed (Signal terminate) and the error says so.
    let signals = Stats::get(&server.stats().signals);
    let err = guest
        .exec_collect(
            "sleep 60",
            ExecOptions {
                timeout: Some(Duration::from_secs(2)),
                ..ExecOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::Timeout { .. }), "{err}");
    assert!(Stats::get(&server.stats().signals) > signals);
    // ... and the shell is still usable.
    let (o, _) = guest
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap();
    assert!(o.status.success());

    guest.close().await.unwrap();
    assert_eq!(Stats::get(&server.stats().shells_deleted), 1);
    assert_eq!(server.open_shells(), 0);
    let err = guest
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::Closed { .. }));

    let s = server.stats();
    if auth == WinrsAuth::HttpNtlm {
        assert_eq!(Stats::get(&s.plaintext_refused), 0);
        assert_eq!(
            Stats::get(&s.sealed_requests),
            Stats::get(&s.requests),
            "every WS-Man request over HTTP arrived sealed"
        );
        assert!(Stats::get(&s.ntlm_logons) >= 1);
        assert!(Stats::get(&s.ntlm_mics) >= 1, "kiln sends a MIC");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_basic_exec_stream_stdin_upload_timeout() {
    exercise(WinrsAuth::HttpsBasic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ntlm_sealed_exec_stream_stdin_upload_timeout() {
    exercise(WinrsAuth::HttpNtlm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_responses_fit_max_envelope_size() {
    for auth in [WinrsAuth::HttpsBasic, WinrsAuth::HttpNtlm] {
        let server = WinrsServer::start(WinrsServerConfig::new(auth, USER, PASSWORD))
            .await
            .unwrap();
        let mut cfg = config(&server);
        cfg.wsman.max_envelope_size = 8192;
        let guest = WinRmCommunicator::connect(cfg, pending()).await.unwrap();
        let (o, c) = guest
            .exec_collect(
                "head -c 200000 /dev/zero | tr '\\0' x",
                ExecOptions::default(),
            )
            .await
            .unwrap();
        assert!(o.status.success());
        assert_eq!(c.stdout.len(), 200_000);
        assert!(c.stdout.iter().all(|b| *b == b'x'));
        let max = Stats::get(&server.stats().max_response);
        assert!(max <= 8192, "largest response {max} > MaxEnvelopeSize");
        assert!(Stats::get(&server.stats().receives) >= 200_000 / 8192);
        // A request over MaxEnvelopeSize is refused before it is sent.
        let long = format!("echo {}", "y".repeat(7500));
        let err = guest
            .exec_collect(&long, ExecOptions::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("MaxEnvelopeSize"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_rejected_after_the_grace_period() {
    for auth in [WinrsAuth::HttpsBasic, WinrsAuth::HttpNtlm] {
        let server = WinrsServer::start(WinrsServerConfig::new(auth.clone(), USER, PASSWORD))
            .await
            .unwrap();
        let mut cfg = WinRmConfig::new(server.addr(), USER, "wrong", security(&auth));
        cfg.auth_grace = Duration::from_millis(300);
        let err = WinRmCommunicator::connect(cfg, pending())
            .await
            .unwrap_err();
        match &err {
            ConnectError::WinRm {
                failure: WinRmWaitFailure::Fatal(d),
                ..
            } => assert!(d.contains("rejected"), "{auth:?}: {d}"),
            other => panic!("{auth:?}: {other}"),
        }
        assert!(err.to_string().contains(&server.endpoint()), "{err}");
        assert!(Stats::get(&server.stats().auth_failures) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_times_out_naming_the_endpoint() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let mut cfg = WinRmConfig::new(addr, USER, PASSWORD, Security::HttpNtlm);
    cfg.timeout = Duration::from_secs(2);
    let err = WinRmCommunicator::connect(cfg, pending())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ConnectError::WinRm {
                failure: WinRmWaitFailure::Timeout(_),
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("http://127.0.0.1:{}/wsman", addr.port())),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_reconnect_and_certificate_pinning() {
    let cert = TestCert::generate().unwrap();
    let mut scfg = WinrsServerConfig::new(WinrsAuth::HttpsBasic, USER, PASSWORD);
    scfg.cert = Some(cert.clone());
    let server = WinrsServer::start(scfg.clone()).await.unwrap();
    scfg.bind = server.addr();
    let guest = WinRmCommunicator::connect(config(&server), pending())
        .await
        .unwrap();
    let (o, _) = guest
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap();
    assert!(o.status.success());

    // "Reboot": the server goes away (connections dropped, shells lost) ...
    server.stop().await;
    let err = guest
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::ConnectionLost { .. }), "{err}");
    // ... and comes back on the same port with the same certificate.
    let restart = scfg.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        WinrsServer::start(restart).await.unwrap()
    });
    let report = guest.reconnect(Box::pin(pending())).await.unwrap();
    let server = server.await.unwrap();
    assert_eq!(report.host_key, Some(cert.fingerprint()));
    let (o, c) = guest
        .exec_collect("echo back", ExecOptions::default())
        .await
        .unwrap();
    assert!(o.status.success());
    assert_eq!(c.stdout_lossy(), "back\n");
    assert_eq!(Stats::get(&server.stats().shells_created), 1, "a new shell");

    // Something else answers with another certificate: refused at once, not retried.
    server.stop().await;
    let mut other = scfg.clone();
    other.cert = Some(TestCert::generate().unwrap());
    let _impostor = WinrsServer::start(other).await.unwrap();
    let err = guest.reconnect(Box::pin(pending())).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("certificate mismatch"), "{text}");
    assert!(text.contains(&cert.fingerprint().0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_certificate_is_enforced_on_first_connect() {
    let server = WinrsServer::start(WinrsServerConfig::new(
        WinrsAuth::HttpsBasic,
        USER,
        PASSWORD,
    ))
    .await
    .unwrap();
    let mut cfg = config(&server);
    let pinned = server.cert().unwrap().fingerprint();
    cfg.transport.security = Security::HttpsBasic(CertPolicy::Pinned(pinned));
    let guest = WinRmCommunicator::connect(cfg.clone(), pending())
        .await
        .unwrap();
    guest.close().await.unwrap();

    let wrong = TestCert::generate().unwrap().fingerprint();
    cfg.transport.security = Security::HttpsBasic(CertPolicy::Pinned(wrong));
    let err = WinRmCommunicator::connect(cfg, pending())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::WinRm {
                failure: WinRmWaitFailure::Fatal(_),
                attempts: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_exec_releases_its_command_and_the_connection_recovers() {
    for auth in [WinrsAuth::HttpsBasic, WinrsAuth::HttpNtlm] {
        let server = WinrsServer::start(WinrsServerConfig::new(auth.clone(), USER, PASSWORD))
            .await
            .unwrap();
        let mut cfg = config(&server);
        cfg.wsman.operation_timeout = Duration::from_secs(5);
        let guest = WinRmCommunicator::connect(cfg, pending()).await.unwrap();
        let dir = tmpdir(&format!("drop-{auth:?}"));
        let started = dir.join("started");
        // Abandon the exec while its Receive is waiting on the server (the response to that
        // request is never read: an NTLM session's sequence numbers are now out of step).
        let cmd = format!("touch '{}'; sleep 60", started.display());
        let mut exec = Box::pin(guest.exec_collect(&cmd, ExecOptions::default()));
        let appeared = async {
            while !started.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            r = &mut exec => panic!("{auth:?}: the exec ended: {r:?}"),
            r = tokio::time::timeout(Duration::from_secs(120), appeared) => {
                r.expect("the command started");
            }
        }
        // Let the client get into its Receive wait (the command prints nothing for a minute),
        // then drop the exec there.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut exec)
                .await
                .is_err(),
            "{auth:?}: the exec ended early"
        );
        drop(exec);
        // The next command works (on a fresh connection where needed) ...
        let (o, c) = guest
            .exec_collect("echo after", ExecOptions::default())
            .await
            .unwrap();
        assert!(o.status.success(), "{auth:?}");
        assert_eq!(c.stdout_lossy(), "after\n");
        // ... and the abandoned command was released with Signal terminate.
        let mut signals = 0;
        for _ in 0..100 {
            signals = Stats::get(&server.stats().signals);
            if signals >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            signals >= 2,
            "{auth:?}: {signals} signals (abandoned + finished)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_program_serves_kilns_client() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-winrs-server"))
        .args([
            "--auth",
            "https-basic",
            "--listen",
            "127.0.0.1:0",
            "--user",
            USER,
        ])
        .env("KILN_WINRS_PASSWORD", PASSWORD)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the server printed its endpoint")
        .unwrap()
        .unwrap();
    let (endpoint, fingerprint) = line.split_once(' ').expect("endpoint and fingerprint");
    let port: u16 = endpoint
        .trim_start_matches("https://127.0.0.1:")
        .trim_end_matches("/wsman")
        .parse()
        .unwrap();
    let mut cfg = WinRmConfig::new(
        ([127, 0, 0, 1], port).into(),
        USER,
        PASSWORD,
        Security::HttpsBasic(CertPolicy::Pinned(kiln_agents::HostKeyFingerprint(
            fingerprint.to_string(),
        ))),
    );
    cfg.timeout = Duration::from_secs(60);
    let guest = WinRmCommunicator::connect(cfg, pending()).await.unwrap();
    let (o, c) = guest
        .exec_collect("echo from the program", ExecOptions::default())
        .await
        .unwrap();
    assert!(o.status.success());
    assert_eq!(c.stdout_lossy(), "from the program\n");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_reconnecting_by_itself_keeps_the_pinned_certificate() {
    use kiln_agents::winrm::shell::ShellClient;
    use kiln_agents::winrm::transport::Transport;
    use kiln_agents::winrm::WinRmError;

    let mut scfg = WinrsServerConfig::new(WinrsAuth::HttpsBasic, USER, PASSWORD);
    let server = WinrsServer::start(scfg.clone()).await.unwrap();
    scfg.bind = server.addr();
    let cfg = config(&server); // trust on first use
    let transport = Transport::connect(cfg.transport.clone()).await.unwrap();
    let mut client = ShellClient::new(transport, WsmanSettings::default());
    client.create_shell().await.unwrap();

    // The server goes away and something with another certificate takes the port; the idle
    // connection closes, and the next request reconnects on its own.
    server.stop().await;
    // The old listener may linger a moment after stop (its task is dropped asynchronously):
    // retry the bind on the same port for a while instead of failing on "Address in use".
    let mut tries = 0;
    let _impostor = loop {
        match WinrsServer::start(scfg.clone()).await {
            Ok(s) => break s,
            Err(e) if tries < 100 && format!("{e:#}").contains("in use") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restarting on {}: {e:#}", scfg.bind),
        }
    };
    for _ in 0..100 {
        if client.transport.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.transport.is_closed());
    let err = client.create_shell().await.unwrap_err();
    assert!(
        matches!(err, WinRmError::CertificateMismatch { .. }),
        "{err}"
    );
}
