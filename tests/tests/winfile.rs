//! File delivery to a Windows guest through kiln's per-build file endpoint
//! (engine/src/fabric/files.rs), against the WinRS test server over NTLM-sealed HTTP: the
//! server's shim performs kiln's pull script (`powershell::pull_file`) as one HTTP GET, so what
//! is tested here is the host side — offer, one-time token, the guest's `<size> <SHA-256>`
//! check, the error for a tampered, short or unreachable transfer — not Windows' WebClient.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_agents::winrm::{Security, WinRmCommunicator, WinRmConfig};
use kiln_agents::Communicator;
use kiln_engine::fabric::files::{self, DeliverError, FileEvent, FileServer, TokenState};
use kiln_tests::winrs_server::{WinrsAuth, WinrsServer, WinrsServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "kiln";
const PASSWORD: &str = "Pa55w.rd";

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-winfile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// GET `url` once; the status.
async fn get_status(url: &str) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_arrive_intact_once_and_bad_transfers_name_the_file() {
    let server = WinrsServer::start(WinrsServerConfig::new(WinrsAuth::HttpNtlm, USER, PASSWORD))
        .await
        .unwrap();
    let mut cfg = WinRmConfig::new(server.addr(), USER, PASSWORD, Security::HttpNtlm);
    cfg.timeout = Duration::from_secs(60);
    let guest = WinRmCommunicator::connect(cfg, std::future::pending())
        .await
        .unwrap();
    let events: Arc<Mutex<Vec<FileEvent>>> = Arc::default();
    let e2 = events.clone();
    let endpoint = FileServer::start_tcp(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |e| e2.lock().unwrap().push(e)),
    )
    .await
    .unwrap();

    // Paths with spaces and both quote characters on both sides.
    let dir = tmpdir("deliver");
    let guest_dir = dir.join("C drive's \"Temp\"");
    std::fs::create_dir_all(&guest_dir).unwrap();
    let src = dir.join("source file's.bin");
    let data = payload(3 << 20, 1);
    std::fs::write(&src, &data).unwrap();
    let dest = guest_dir.join("tool 1.bin");
    let dest_s = dest.to_str().unwrap();

    // 1. intact
    let d = files::deliver(&guest, &endpoint, &src, dest_s)
        .await
        .unwrap();
    assert_eq!(d.bytes, data.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == data, "the bytes differ");
    assert!(
        !guest_dir.join("tool 1.bin.kiln-pull").exists(),
        "the temporary file is gone"
    );
    {
        let ev = events.lock().unwrap();
        let ok: Vec<_> = ev.iter().filter(|e| e.status == 200).collect();
        assert_eq!(ok.len(), 1, "{ev:?}");
        assert_eq!(ok[0].bytes, data.len() as u64);
        assert_eq!(ok[0].name.as_deref(), Some("source file's.bin"));
    }

    // 2. a token works once
    let offer = endpoint.offer(&src, "again").unwrap();
    let again = dir.join("again.bin");
    files::deliver_offer(&guest, &endpoint, &offer, &src, again.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(get_status(&offer.url).await, 404, "a used token is refused");
    let mut wrong = offer.url.clone();
    wrong.truncate(wrong.len() - 4);
    wrong.push_str("0000");
    assert_eq!(get_status(&wrong).await, 404, "an unknown token is refused");

    // 3. tampered after the host hashed it: the guest's check fails, nothing lands at dest
    let offer = endpoint.offer(&src, "tampered").unwrap();
    let mut bad = data.clone();
    bad[12345] ^= 0xff;
    std::fs::write(&src, &bad).unwrap();
    let tampered = guest_dir.join("tampered.bin");
    let e = files::deliver_offer(&guest, &endpoint, &offer, &src, tampered.to_str().unwrap())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DeliverError::Failed { .. }), "{msg}");
    assert!(
        msg.contains("tampered.bin") && msg.contains("source file's.bin"),
        "{msg}"
    );
    assert!(msg.contains("SHA-256"), "{msg}");
    assert!(!tampered.exists(), "a bad file is not moved into place");
    assert!(!guest_dir.join("tampered.bin.kiln-pull").exists());

    // 4. short: the source shrank after the offer; the endpoint records the short transfer
    std::fs::write(&src, &data).unwrap();
    let offer = endpoint.offer(&src, "short").unwrap();
    std::fs::write(&src, &data[..1 << 20]).unwrap();
    let short = guest_dir.join("short.bin");
    let e = files::deliver_offer(&guest, &endpoint, &offer, &src, short.to_str().unwrap())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DeliverError::Failed { .. }), "{msg}");
    assert!(msg.contains("short.bin"), "{msg}");
    assert!(
        msg.contains(&format!("sent {} of {} bytes", 1 << 20, data.len())),
        "{msg}"
    );
    assert!(!short.exists());
    assert_eq!(
        endpoint.state(&offer.token),
        TokenState::Claimed {
            sent: 1 << 20,
            complete: false
        }
    );

    // 5. unreachable: the guest cannot connect; the token was never claimed
    std::fs::write(&src, &data).unwrap();
    let mut offer = endpoint.offer(&src, "unreachable").unwrap();
    let token = offer.token.clone();
    offer.url = format!("http://127.0.0.1:1{}{token}", files::PREFIX);
    let e = files::deliver_offer(&guest, &endpoint, &offer, &src, dest_s)
        .await
        .unwrap_err();
    assert!(matches!(e, DeliverError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("tool 1.bin"), "{e}");
    assert!(
        !e.to_string().contains(&token),
        "the token is not logged whole: {e}"
    );
    assert_eq!(
        endpoint.state(&token),
        TokenState::Unknown,
        "revoked after the attempt"
    );

    guest.close().await.unwrap();
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn kiln_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.ancestors().nth(2).expect("target/debug").join("kiln")
}

/// The path QEMU's `guestfwd=tcp:10.0.2.100:80-cmd:kiln __fabric-connect SOCKET files` takes:
/// the relay process with the guest's connection on stdin/stdout, in front of the build's
/// endpoint on its Unix socket. A token works once through it too.
#[test]
fn the_relay_carries_a_pull_to_the_builds_file_endpoint() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tmpdir("relay");
    let src = dir.join("payload.bin");
    let data = payload(1 << 20, 7);
    std::fs::write(&src, &data).unwrap();
    let sock = dir.join("files.sock");
    let server = rt
        .block_on(async { FileServer::start(&sock, None, files::GUEST_ADDR, Arc::new(|_| {})) })
        .unwrap();
    let offer = server.offer(&src, "payload.bin").unwrap();
    assert!(offer.url.starts_with("http://10.0.2.100/f/"));
    let path = offer.url.trim_start_matches("http://10.0.2.100");
    let get = |ep: &str| {
        let mut child = Command::new(kiln_bin())
            .arg("__fabric-connect")
            .arg(&sock)
            .arg(ep)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln");
        let mut stdin = child.stdin.take().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: 10.0.2.100\r\nConnection: close\r\n\r\n");
        // QEMU keeps the guest's side open while the guest reads
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(req.as_bytes());
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let _ = child.wait();
        writer.join().unwrap();
        out
    };
    let out = get("files");
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..head_end]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", data.len())),
        "{head}"
    );
    assert!(out[head_end..] == data[..], "the body differs");
    assert!(String::from_utf8_lossy(&get("files")).starts_with("HTTP/1.1 404"));
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A real guest behind QEMU's user network pulls a file the way a Windows build's File step
/// does: `guestfwd=tcp:10.0.2.100:80-cmd:kiln __fabric-connect SOCKET files` (the option
/// `FileServer::netdev_option` gives the build VM) in front of the build's endpoint. The guest
/// is the Linux `tiny` test guest (busybox wget and sha256sum standing in for WebClient and
/// Get-FileHash), booted by kiln's own VM layer under TCG.
#[test]
fn a_guest_pulls_through_qemus_guestfwd_relay() {
    use kiln_engine::vm::{self, VmSpec};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let img = kiln_tests::image("tiny").unwrap();
    let dir = kiln_tests::TestDir::new("winfile-guestfwd").unwrap();
    let disk = dir.path.join("overlay.qcow2");
    kiln_tests::overlay(&img, &disk).unwrap();
    let key = kiln_tests::Key::generate(&dir.path, "key").unwrap();
    let seed = kiln_tests::Seed::create(
        &dir.path,
        "seed",
        kiln_tests::SeedFormat::Vfat,
        "winfile-1",
        "kiln-test",
        &kiln_tests::user_data("packer", &key.public),
    )
    .unwrap();
    let src = dir.path.join("payload.bin");
    let data = payload(4 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    let _slot = kiln_tests::VmSlot::acquire();
    let events: Arc<Mutex<Vec<FileEvent>>> = Arc::default();
    let e2 = events.clone();
    rt.block_on(async {
        let server = FileServer::start(
            &dir.path.join("files.sock"),
            None,
            files::GUEST_ADDR,
            Arc::new(move |e| e2.lock().unwrap().push(e)),
        )
        .unwrap();
        let mut spec = VmSpec::new(
            "winfile-guestfwd",
            dir.path.join("vm"),
            &disk,
            vm::Firmware::Bios,
            vm::Accel::Tcg,
        );
        spec.cpus = 1;
        spec.memory_mib = 512;
        spec.seed_disk = Some(seed.path.clone());
        spec.extra_netdev_options = vec![server
            .netdev_option(&kiln_bin(), files::GUEST_ADDR)
            .unwrap()];
        let v = vm::Vm::start(spec).await.expect("QEMU starts");
        let port = v.ssh_port();
        let ssh = |cmd: &str| {
            let mut c = std::process::Command::new("ssh");
            c.arg("-i").arg(&key.private);
            for o in [
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "BatchMode=yes",
                "IdentitiesOnly=yes",
                "ConnectTimeout=5",
                "LogLevel=ERROR",
            ] {
                c.arg("-o").arg(o);
            }
            c.arg("-p")
                .arg(port.to_string())
                .arg("packer@127.0.0.1")
                .arg(cmd)
                .stdin(std::process::Stdio::null());
            c.output().unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(480);
        while !ssh("true").status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "no SSH; console:\n{}",
                v.console_tail(20)
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let offer = server.offer(&src, "payload.bin").unwrap();
        let t = std::time::Instant::now();
        let out = ssh(&format!(
            "wget -q -O /tmp/p.bin '{}' && stat -c %s /tmp/p.bin && sha256sum /tmp/p.bin",
            offer.url
        ));
        let took = t.elapsed();
        // for information only (TCG, loaded host; one SSH session included)
        eprintln!(
            "4 MiB through guestfwd + relay (incl. one ssh round trip): {:.2}s, {:.1} MB/s",
            took.as_secs_f64(),
            data.len() as f64 / 1e6 / took.as_secs_f64()
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "wget in the guest: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut words = text.split_whitespace();
        assert_eq!(words.next(), Some(data.len().to_string().as_str()));
        assert_eq!(
            words.next().map(str::to_ascii_uppercase),
            Some(offer.sha256.clone())
        );
        // once only, from the guest too
        let again = ssh(&format!("wget -q -O /tmp/q.bin '{}'", offer.url));
        assert!(!again.status.success(), "a used token is refused");
        assert_eq!(
            server.state(&offer.token),
            TokenState::Claimed {
                sent: data.len() as u64,
                complete: true
            }
        );
        drop(v);
    });
    let ev = events.lock().unwrap();
    assert!(ev.iter().any(|e| e.status == 200), "{ev:?}");
    assert!(ev.iter().any(|e| e.status == 404), "{ev:?}");
}

/// What a Windows File step does (`files::deliver_or_upload`): the pull when the endpoint
/// works; the WinRM upload, with a warning, when there is no endpoint or the guest cannot
/// reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_winrm_upload_is_the_loud_fallback() {
    let server = WinrsServer::start(WinrsServerConfig::new(WinrsAuth::HttpNtlm, USER, PASSWORD))
        .await
        .unwrap();
    let mut cfg = WinRmConfig::new(server.addr(), USER, PASSWORD, Security::HttpNtlm);
    cfg.timeout = Duration::from_secs(60);
    let guest = WinRmCommunicator::connect(cfg, std::future::pending())
        .await
        .unwrap();
    let dir = tmpdir("fallback");
    let src = dir.join("tool.bin");
    let data = payload(200_000, 9);
    std::fs::write(&src, &data).unwrap();
    let warnings: Arc<Mutex<Vec<String>>> = Arc::default();
    let w2 = warnings.clone();
    let warn = move |m: String| w2.lock().unwrap().push(m);

    // the endpoint works: pulled, no warning
    let endpoint = FileServer::start_tcp("127.0.0.1:0".parse().unwrap(), Arc::new(|_| {}))
        .await
        .unwrap();
    let dest = dir.join("pulled.bin");
    let d = files::deliver_or_upload(&guest, Some(&endpoint), &src, dest.to_str().unwrap(), &warn)
        .await
        .unwrap();
    assert_eq!(d.via, files::Via::Pull);
    assert!(std::fs::read(&dest).unwrap() == data);
    assert!(warnings.lock().unwrap().is_empty());

    // no endpoint: uploaded, said so
    let dest = dir.join("uploaded.bin");
    let d = files::deliver_or_upload(&guest, None, &src, dest.to_str().unwrap(), &warn)
        .await
        .unwrap();
    assert_eq!((d.via, d.bytes), (files::Via::Upload, data.len() as u64));
    assert!(std::fs::read(&dest).unwrap() == data);
    assert!(
        warnings.lock().unwrap()[0].contains("no file endpoint in this build"),
        "{:?}",
        warnings.lock().unwrap()
    );

    // an endpoint the guest cannot reach (its URLs point at a closed port): uploaded, said so
    let dead = FileServer::start(
        &dir.join("files.sock"),
        None,
        "127.0.0.1:1",
        Arc::new(|_| {}),
    )
    .unwrap();
    let dest = dir.join("fallback.bin");
    let d = files::deliver_or_upload(&guest, Some(&dead), &src, dest.to_str().unwrap(), &warn)
        .await
        .unwrap();
    assert_eq!(d.via, files::Via::Upload);
    assert!(std::fs::read(&dest).unwrap() == data);
    let w = warnings.lock().unwrap()[1].clone();
    assert!(
        w.contains("did not reach kiln's file endpoint") && w.contains("falling back"),
        "{w}"
    );
    assert!(w.contains("fallback.bin"), "{w}");

    guest.close().await.unwrap();
    server.stop().await;
    drop(dead);
    std::fs::remove_dir_all(&dir).unwrap();
}
