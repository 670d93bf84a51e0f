//! The fabric relay as QEMU runs it: `kiln __fabric-connect SOCKET wire|imds` with the guest
//! connection on stdin/stdout, in front of a build's fabric server.

use kiln_engine::fabric::{Fabric, FabricConfig, FabricEvent};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.ancestors().nth(2).expect("target/debug").join("kiln")
}

/// Runs one relay with `request` on its stdin; returns its stdout and exit status.
fn relay(sock: &std::path::Path, ep: &str, request: &[u8]) -> (String, bool) {
    let mut child = Command::new(kiln_bin())
        .arg("__fabric-connect")
        .arg(sock)
        .arg(ep)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    let req = request.to_vec();
    // QEMU keeps the guest's side open while the guest waits for the answer
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&req);
        std::thread::sleep(std::time::Duration::from_millis(300));
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let st = child.wait().expect("wait");
    writer.join().expect("writer");
    (out, st.success())
}

#[test]
fn the_relay_carries_guest_requests_to_the_builds_fabric() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = std::env::temp_dir().join(format!("kiln-fabric-relay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let events: Arc<Mutex<Vec<FabricEvent>>> = Arc::default();
    let e2 = events.clone();
    let sock = dir.join("fabric.sock");
    let fabric = rt
        .block_on(async {
            Fabric::start(
                &sock,
                None,
                FabricConfig::example(),
                Arc::new(move |e| e2.lock().unwrap().push(e)),
            )
        })
        .expect("fabric");
    let (out, ok) = relay(
        &sock,
        "wire",
        b"GET /?comp=versions HTTP/1.1\r\nHost: 168.63.129.16\r\n\r\n",
    );
    assert!(
        ok && out.starts_with("HTTP/1.1 200 OK\r\n")
            && out.contains("<Version>2012-11-30</Version>"),
        "{out}"
    );
    let (out, ok) = relay(&sock, "imds", b"GET /metadata/instance/compute/vmId?api-version=2021-08-01&format=text HTTP/1.1\r\nMetadata: true\r\n\r\n");
    assert!(
        ok && out.ends_with("\r\n\r\nb61f93d0-e1ed-40b2-b067-22c243233448"),
        "{out}"
    );
    // a hostile body: refused, the relay ends
    let mut big =
        b"POST /machine?comp=health HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 4 << 20));
    let (out, _) = relay(&sock, "wire", &big);
    assert!(out.starts_with("HTTP/1.1 413 "), "{out}");
    let (out, ok) = relay(&sock, "nonsense", b"GET / HTTP/1.1\r\n\r\n");
    assert!(!ok && out.is_empty());
    let got: Vec<(String, u16)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.endpoint.as_str().to_string(), e.status))
        .collect();
    assert_eq!(
        got,
        vec![
            ("wire".to_string(), 200),
            ("imds".to_string(), 200),
            ("wire".to_string(), 413)
        ]
    );
    drop(fabric);
    // without a fabric the relay fails at once (QEMU then closes the guest connection)
    let (out, ok) = relay(&sock, "wire", b"GET / HTTP/1.1\r\n\r\n");
    assert!(!ok && out.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
