//! Independent WinRM clients against kiln's WinRS test server, to show the server speaks the
//! protocol as Windows does (and not merely as kiln's own client expects):
//!
//! - pywinrm 0.5.0 from PyPI with pyspnego (NTLM) in the venv that `scripts/setup-host.sh`
//!   creates (`$KILN_PYWINRM_VENV`, default `~/.cache/kiln/pywinrm-venv`);
//! - Debian's `python3-winrm` 0.3.0 (NTLM through requests-ntlm 1.1 and ntlm-auth), run by
//!   `/usr/bin/python3`.
//!
//! Each runs `tests/py/winrm_client.py` over HTTPS + Basic and over HTTP + NTLM with message
//! encryption forced on. Missing Python packages fail the test with the command that installs
//! them; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::winrs_server::{Stats, WinrsAuth, WinrsServer, WinrsServerConfig};
use serde_json::Value;

const USER: &str = "vagrant";
const PASSWORD: &str = "S3cret-p@ss";

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("KILN_PYWINRM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/kiln/pywinrm-venv")
        });
    venv.join("bin/python")
}

fn require(python: &Path, what: &str) {
    let ok = std::process::Command::new(python)
        .args(["-c", "import winrm"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{what}: `{} -c 'import winrm'` failed. Install the WinRM test clients with \
         `sudo scripts/setup-host.sh` (Debian's python3-winrm and a pywinrm venv).",
        python.display()
    );
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/winrm_client.py")
}

/// An OpenSSL configuration that also loads the legacy provider: Debian's ntlm-auth (under
/// python3-winrm 0.3.0) takes MD4 from `hashlib`, which OpenSSL 3 serves only from there.
fn openssl_legacy_conf() -> PathBuf {
    let p = std::env::temp_dir().join(format!("kiln-openssl-legacy-{}.cnf", std::process::id()));
    std::fs::write(
        &p,
        "openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n\
         [provider_sect]\ndefault = default_sect\nlegacy = legacy_sect\n\
         [default_sect]\nactivate = 1\n[legacy_sect]\nactivate = 1\n",
    )
    .unwrap();
    p
}

async fn run_client(python: &Path, server: &WinrsServer, transport: &str) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(python)
            .env("OPENSSL_CONF", openssl_legacy_conf())
            .arg(script())
            .args([&server.endpoint(), transport, USER, PASSWORD])
            // pywinrm 0.3.0 lets a CA bundle named in the environment override
            // server_cert_validation='ignore' (its transport.py re-reads `verify` from
            // requests' environment settings), which would refuse the self-signed certificate.
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finished within 5 minutes")
    .expect("the Python client ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {transport} against {}: {}\nserver's last authentication error: {:?}\n\
         stdout: {stdout}\nstderr: {stderr}",
        python.display(),
        server.endpoint(),
        out.status,
        server.stats().last_auth_error.lock().unwrap()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn check(v: &Value, who: &str) {
    let r = |k: &str| &v[k];
    assert_eq!(r("echo")["status"], 0, "{who}: {v}");
    assert_eq!(r("echo")["stdout"], "hello world\n", "{who}: {v}");
    assert_eq!(r("exit7")["status"], 7, "{who}: {v}");
    assert_eq!(r("exit7")["stdout"], "out", "{who}: {v}");
    assert_eq!(r("exit7")["stderr"], "err", "{who}: {v}");
    assert_eq!(r("slow")["stdout"], "slept\n", "{who}: {v}");
    assert_eq!(r("ps")["stdout"], "from-powershell\n", "{who}: {v}");
    assert_eq!(r("ps")["status"], 0, "{who}: {v}");
    if !v["stdin"].is_null() {
        assert_eq!(v["stdin"]["stdout"], "stdin through Send\n", "{who}: {v}");
        assert_eq!(v["stdin"]["status"], 0, "{who}: {v}");
    }
}

async fn against_both_transports(python: &Path, who: &str) -> Vec<Value> {
    let mut results = Vec::new();
    for (auth, transport) in [
        (WinrsAuth::HttpsBasic, "basic"),
        (WinrsAuth::HttpNtlm, "ntlm"),
    ] {
        let server = WinrsServer::start(WinrsServerConfig::new(auth.clone(), USER, PASSWORD))
            .await
            .unwrap();
        let v = run_client(python, &server, transport).await;
        check(&v, &format!("{who} over {transport}"));
        let s = server.stats();
        assert!(
            Stats::get(&s.operation_timeouts) >= 1,
            "{who}: the slow command saw OperationTimeout faults and the client polled again"
        );
        assert!(Stats::get(&s.signals) >= 1 && Stats::get(&s.shells_deleted) >= 1);
        if auth == WinrsAuth::HttpNtlm {
            assert!(Stats::get(&s.ntlm_logons) >= 1, "{who}");
            assert_eq!(Stats::get(&s.plaintext_refused), 0, "{who}");
            assert_eq!(
                Stats::get(&s.sealed_requests),
                Stats::get(&s.requests),
                "{who}: every request sealed"
            );
        }
        results.push(v);
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywinrm_from_pypi_against_the_test_server() {
    let python = venv_python();
    require(&python, "pywinrm venv");
    let v = against_both_transports(&python, "pywinrm (PyPI)").await;
    assert_eq!(v[0]["version"], "0.5.0");
    assert!(
        !v[0]["stdin"].is_null(),
        "pywinrm 0.5 has send_command_input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_python3_winrm_against_the_test_server() {
    let python = PathBuf::from("/usr/bin/python3");
    require(&python, "Debian's python3-winrm");
    against_both_transports(&python, "python3-winrm (Debian)").await;
}

/// The other direction: kiln's NTLM client (NEGOTIATE, AUTHENTICATE with NTLMv2 and MIC, sealing
/// and unsealing with sequence numbers) against pyspnego's NTLM acceptor
/// (`tests/py/ntlm_acceptor.py`), which shares no code with kiln.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kilns_ntlm_client_against_pyspnegos_acceptor() {
    use kiln_agents::winrm::shell::ShellClient;
    use kiln_agents::winrm::transport::Transport;
    use kiln_agents::winrm::{Security, WinRmConfig, WinRmError, WsmanSettings};
    use tokio::io::AsyncBufReadExt;

    let python = venv_python();
    require(&python, "pywinrm venv (pyspnego)");
    let creds = std::env::temp_dir().join(format!("kiln-ntlm-users-{}", std::process::id()));
    std::fs::write(&creds, format!(":{USER}:{PASSWORD}\n")).unwrap();
    let mut child = tokio::process::Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/ntlm_acceptor.py"))
        .env("NTLM_USER_FILE", &creds)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the acceptor started")
        .unwrap()
        .unwrap();
    let port: u16 = first.strip_prefix("PORT ").unwrap().parse().unwrap();
    let addr = ([127, 0, 0, 1], port).into();

    let cfg = WinRmConfig::new(addr, USER, PASSWORD, Security::HttpNtlm);
    let transport = Transport::connect(cfg.transport.clone()).await.unwrap();
    let mut client = ShellClient::new(transport, WsmanSettings::default());
    assert_eq!(client.create_shell().await.unwrap(), "PYSPNEGO-SHELL");
    // A second sealed exchange on the same session: a sealed fault, parsed.
    let err = client.delete_shell("PYSPNEGO-SHELL").await.unwrap_err();
    match &err {
        WinRmError::Fault { fault, .. } => {
            assert_eq!(
                fault.reason.as_deref(),
                Some("only Create is answered here")
            )
        }
        other => panic!("{other}"),
    }
    for want in ["/transfer/Create", "/transfer/Delete"] {
        let line = lines.next_line().await.unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["action"].as_str().unwrap().ends_with(want), "{v}");
        assert!(v["user"].as_str().unwrap().contains(USER), "{v}");
    }

    let bad = WinRmConfig::new(addr, USER, "not the password", Security::HttpNtlm);
    let err = Transport::connect(bad.transport).await.unwrap_err();
    assert!(matches!(err, WinRmError::AuthRejected { .. }), "{err}");
    child.kill().await.unwrap();
    let _ = std::fs::remove_file(&creds);
}
