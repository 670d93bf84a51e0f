//! The fabric over a real Unix socket, with well-behaved and hostile clients.

use super::*;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    fabric: Fabric,
    events: Arc<Mutex<Vec<FabricEvent>>>,
    _dir: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("kiln-fabric-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    let sink: EventSink = Arc::new(move |e| e2.lock().unwrap().push(e));
    let fabric = Fabric::start(
        &dir.join("fabric.sock"),
        None,
        FabricConfig::example(),
        sink,
    )
    .unwrap();
    Setup {
        fabric,
        events,
        _dir: dir,
    }
}

/// Sends `preamble` + `raw`, returns (status, body) of the answer ("" if none).
async fn exchange(sock: &Path, preamble: &str, raw: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(preamble.as_bytes()).await.unwrap();
    // a server that closes early makes later writes fail: that is fine here
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn agents_get_answers_and_health_reports_are_seen() {
    let s = setup("agents");
    let sock = s.fabric.socket_path().to_path_buf();
    let (st, body) = exchange(&sock, "wire\n", b"GET /machine/?comp=goalstate HTTP/1.1\r\nHost: 168.63.129.16\r\nx-ms-agent-name: WALinuxAgent\r\nx-ms-version: 2012-11-30\r\n\r\n").await;
    assert_eq!(st, 200);
    assert!(body.contains("<GoalState"), "{body}");
    let (st, body) = exchange(&sock, "imds\n", b"GET /metadata/instance?api-version=2021-08-01&extended=true HTTP/1.1\r\nMetadata: true\r\nUser-Agent: Cloud-Init/22.4.2\r\n\r\n").await;
    assert_eq!(st, 200);
    assert!(
        body.contains("\"vmId\":\"b61f93d0-e1ed-40b2-b067-22c243233448\""),
        "{body}"
    );
    let mut health = s.fabric.health();
    assert!(health.borrow().is_none());
    let report = "<Health><State>Ready</State></Health>";
    let req = format!("POST /machine?comp=health HTTP/1.1\r\nContent-Length: {}\r\nx-ms-agent-name: WALinuxAgent\r\n\r\n{report}", report.len());
    assert_eq!(exchange(&sock, "wire\n", req.as_bytes()).await.0, 200);
    health.wait_for(|h| h.is_some()).await.unwrap();
    let h = health.borrow().clone().unwrap();
    assert_eq!(
        (h.health.state.as_str(), h.agent.as_str(), h.count),
        ("Ready", "WALinuxAgent", 1)
    );
    let ev = s.events.lock().unwrap().clone();
    assert_eq!(ev.len(), 3);
    assert_eq!(
        (
            ev[0].endpoint,
            ev[0].method.as_str(),
            ev[0].target.as_str(),
            ev[0].status,
            ev[0].agent.as_str()
        ),
        (
            Endpoint::Wire,
            "GET",
            "/machine/?comp=goalstate",
            200,
            "WALinuxAgent"
        )
    );
    assert_eq!(
        (ev[1].endpoint, ev[1].agent.as_str()),
        (Endpoint::Imds, "Cloud-Init/22.4.2")
    );
    assert_eq!(
        ev[2].health.as_ref().map(|h| h.state.as_str()),
        Some("Ready")
    );
}

#[tokio::test]
async fn hostile_clients_get_4xx_and_the_fabric_keeps_serving() {
    let s = setup("hostile");
    let sock = s.fabric.socket_path().to_path_buf();
    // a 100 MB body is refused from its Content-Length, without reading it
    let started = Instant::now();
    let (st, _) = exchange(
        &sock,
        "wire\n",
        b"POST /machine?comp=health HTTP/1.1\r\nContent-Length: 104857600\r\n\r\nxxxx",
    )
    .await;
    assert_eq!(st, 413);
    // ...also when the client really sends megabytes
    let mut big =
        b"POST /machine?comp=telemetrydata HTTP/1.1\r\nContent-Length: 8388608\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 8 << 20));
    assert_eq!(exchange(&sock, "wire\n", &big).await.0, 413);
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    head.extend(std::iter::repeat_n(b'h', 1 << 20));
    assert_eq!(exchange(&sock, "wire\n", &head).await.0, 431);
    assert_eq!(
        exchange(&sock, "wire\n", b"\x00\x01\x02 garbage\r\n\r\n")
            .await
            .0,
        400
    );
    assert_eq!(
        exchange(&sock, "wire\n", b"GET /../../etc/shadow HTTP/1.1\r\n\r\n")
            .await
            .0,
        404
    );
    assert_eq!(
        exchange(&sock, "imds\n", b"GET /metadata/instance HTTP/1.1\r\n\r\n")
            .await
            .0,
        400
    );
    assert_eq!(exchange(&sock, "imds\n", b"PUT /metadata/instance?api-version=2021-08-01 HTTP/1.1\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n").await.0, 405);
    assert_eq!(
        exchange(
            &sock,
            "wire\n",
            b"DELETE /machine?comp=goalstate HTTP/1.1\r\n\r\n"
        )
        .await
        .0,
        405
    );
    // an unknown preamble is closed without an answer
    assert_eq!(
        exchange(&sock, "ftp\n", b"GET / HTTP/1.1\r\n\r\n").await.0,
        0
    );
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "refusals do not wait for the read timeout"
    );
    // more idle connections than the server serves at once: the extra ones are closed…
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 8 {
        let mut c = UnixStream::connect(&sock).await.unwrap();
        // the extra ones may already be closed by the server
        let _ = c.write_all(b"wire\nGET / HT").await;
        idle.push(c);
    }
    // …and once they go away the fabric answers again
    drop(idle);
    let mut ok = false;
    for _ in 0..50 {
        if exchange(&sock, "wire\n", b"GET /?comp=versions HTTP/1.1\r\n\r\n")
            .await
            .0
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the fabric answers after a connection flood");
    let ev = s.events.lock().unwrap().clone();
    assert!(ev.iter().any(|e| e.status == 413 && e.error.as_deref().is_some_and(|m| m.contains("104857600"))), "{ev:?}");
    assert!(
        ev.iter().any(|e| e.status == 503),
        "the flood is reported: {ev:?}"
    );
}

#[tokio::test]
async fn the_token_command_output_is_served() {
    let dir = std::env::temp_dir().join(format!("kiln-fabric-test-token-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = FabricConfig::example();
    cfg.token_command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "printf '{\"access_token\":\"t0k\",\"resource\":\"%s\"}' \"$KILN_IDENTITY_RESOURCE\""
            .into(),
    ]);
    let f = Fabric::start(&dir.join("f.sock"), None, cfg, Arc::new(|_| {})).unwrap();
    let (st, body) = exchange(f.socket_path(), "imds\n", b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F HTTP/1.1\r\nMetadata: true\r\n\r\n").await;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["access_token"].as_str(), v["resource"].as_str()),
        (Some("t0k"), Some("https://management.azure.com/"))
    );
    drop(f);
    let mut cfg = FabricConfig::example();
    cfg.token_command = Some(vec!["/bin/false".into()]);
    let f = Fabric::start(&dir.join("g.sock"), None, cfg, Arc::new(|_| {})).unwrap();
    let (st, body) = exchange(f.socket_path(), "imds\n", b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=x HTTP/1.1\r\nMetadata: true\r\n\r\n").await;
    assert_eq!(st, 500);
    assert!(
        body.contains("identity token command `/bin/false` failed"),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dropping_the_fabric_removes_its_socket() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = setup("drop");
        let p = s.fabric.socket_path().to_path_buf();
        assert!(p.exists());
        drop(s.fabric);
        assert!(!p.exists());
    });
}

#[test]
fn netdev_options_quote_and_escape_the_relay_command() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = setup("netdev");
        let opts = s.fabric.netdev_options(Path::new("/opt/my kiln,x/kiln"));
        assert_eq!(&opts[..4], ["net=168.0.0.0/7", "host=168.63.129.1", "dns=168.63.129.3", "dhcpstart=168.63.129.100"]);
        let sock = s.fabric.socket_path().display().to_string();
        assert_eq!(opts[4], format!("guestfwd=tcp:168.63.129.16:80-cmd:'/opt/my kiln,,x/kiln' __fabric-connect {sock} wire"));
        assert_eq!(opts[5], format!("guestfwd=tcp:169.254.169.254:80-cmd:'/opt/my kiln,,x/kiln' __fabric-connect {sock} imds"));
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    });
}

#[test]
fn long_run_directories_get_a_short_socket() {
    let (p, own) = socket_path_for(Path::new("/r"), "abcd");
    assert_eq!((p, own), (PathBuf::from("/r/fabric.sock"), None));
    let long = PathBuf::from("/").join("x".repeat(120));
    let (p, own) = socket_path_for(&long, "abcd");
    assert!(p.as_os_str().len() < 100 && own.is_some() && p.starts_with(own.unwrap()));
}

#[test]
fn xml_and_ids() {
    assert_eq!(xml_escape("a<b>&\"'\u{1}c"), "a&lt;b&gt;&amp;&quot;&apos;c");
    let u = uuid_from("x");
    assert_eq!((u.len(), &u[14..15]), (36, "4"));
    assert_eq!(uuid_from("x"), u);
    assert_ne!(uuid_from("y"), u);
    assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
}

/// Writes frames as QEMU's filter-redirector does: length, then the frame.
async fn write_frames(s: &mut UnixStream, frames: &[Vec<u8>]) {
    let mut buf = Vec::new();
    for f in frames {
        buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
        buf.extend_from_slice(f);
    }
    s.write_all(&buf).await.unwrap();
}

async fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let n = tokio::time::timeout(Duration::from_secs(20), s.read_u32())
        .await
        .expect("a frame in time")
        .unwrap();
    let mut f = vec![0; n as usize];
    s.read_exact(&mut f).await.unwrap();
    f
}

#[tokio::test]
async fn dhcp_tap_answers_dhcp_and_passes_the_rest() {
    let s = setup("dhcp-tap");
    let tap = s.fabric.net_tap().clone();
    // QEMU connects all three at start; frames for slirp are read later (a full queue drops).
    let mut guest = UnixStream::connect(&tap.from_guest).await.unwrap();
    let mut to_guest = UnixStream::connect(&tap.to_guest).await.unwrap();
    let arp = [
        &[0xff; 6][..],
        &[0x52, 0x54, 0, 0x12, 0x34, 0x56],
        &[0x08, 0x06],
        &[7; 28],
    ]
    .concat();
    let discover = dhcp::tests::request(1, &[], [0; 4]);
    write_frames(&mut guest, &[arp.clone(), discover]).await;
    let offer = read_frame(&mut to_guest).await;
    let dhcp::Frame::Other = dhcp::classify(&offer) else {
        panic!("a reply, not a request")
    };
    assert_eq!(offer[14 + 20 + 8], 2, "BOOTREPLY");
    assert!(
        offer.windows(6).any(|w| w == [245, 4, 168, 63, 129, 16]),
        "option 245"
    );
    let mut network = UnixStream::connect(&tap.to_network).await.unwrap();
    assert_eq!(
        read_frame(&mut network).await,
        arp,
        "the ARP frame goes on to slirp unchanged"
    );

    // A guest that floods: slirp's side unread, thousands of frames and DHCP requests. kiln
    // keeps reading (dropping what does not fit) and still answers.
    drop(network);
    let mut flood = vec![arp.clone(); 20_000];
    flood.extend(std::iter::repeat_n(
        dhcp::tests::request(1, &[], [0; 4]),
        500,
    ));
    write_frames(&mut guest, &flood).await;
    // Malformed DHCP is dropped and logged.
    let mut bad = dhcp::tests::request(1, &[], [0; 4]);
    let cookie = 14 + 20 + 8 + 236;
    bad[cookie] = 0;
    write_frames(&mut guest, &[bad]).await;
    // Replies that did not fit the guest's queue were dropped (a guest resends); the rest
    // arrive.
    let mut offers = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), to_guest.read_u32()).await {
        let mut f = vec![0; n as usize];
        to_guest.read_exact(&mut f).await.unwrap();
        assert!(f.windows(3).any(|w| w == [53, 1, 2]), "only OFFERs");
        offers += 1;
    }
    assert!((60..=500).contains(&offers), "{offers} offers");
    write_frames(
        &mut guest,
        &[dhcp::tests::request(3, &[50, 4, 168, 63, 129, 100], [0; 4])],
    )
    .await;
    let ack = read_frame(&mut to_guest).await;
    assert!(
        ack.windows(3).any(|w| w == [53, 1, 5]),
        "the REQUEST after the flood is acknowledged"
    );

    // A broken stream (an impossible length) is closed; QEMU's next connection works.
    guest.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), guest.read_to_end(&mut rest)).await;
    let mut guest = UnixStream::connect(&tap.from_guest).await.unwrap();
    write_frames(&mut guest, &[dhcp::tests::request(1, &[], [0; 4])]).await;
    loop {
        let f = read_frame(&mut to_guest).await;
        if f.windows(3).any(|w| w == [53, 1, 2]) {
            break;
        }
    }
    let ev = s.events.lock().unwrap().clone();
    let dhcp_ev: Vec<_> = ev.iter().filter(|e| e.endpoint == Endpoint::Dhcp).collect();
    assert_eq!(dhcp_ev[0].method, "DISCOVER");
    assert!(
        dhcp_ev[0].target.starts_with("OFFER 168.63.129.100"),
        "{:?}",
        dhcp_ev[0]
    );
    assert_eq!(dhcp_ev[0].agent, "52:54:00:12:34:56");
    assert!(dhcp_ev.iter().any(
        |e| e.error.as_deref() == Some("malformed DHCP request dropped: no DHCP magic cookie")
    ));
    assert!(dhcp_ev.iter().any(|e| e
        .error
        .as_deref()
        .is_some_and(|m| m.contains("frame stream is broken"))));
    assert!(
        dhcp_ev.len() < 120,
        "the flood is not logged request by request ({})",
        dhcp_ev.len()
    );
    drop(s);
    assert!(
        !tap.from_guest.exists() && !tap.to_guest.exists(),
        "sockets removed with the fabric"
    );
}
