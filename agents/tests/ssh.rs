//! `SshCommunicator` against real servers (OpenSSH `sshd` and `dropbear`) on 127.0.0.1.
//! See `support/mod.rs` for what the fixtures need.

mod support;

use std::future::pending;
use std::time::{Duration, Instant};

use kiln_agents::{
    AttemptFailure, CommError, Communicator, ConnectError, ExecOptions, ExitStatus,
    HostKeyFingerprint, HostKeyPolicy, Interrupt, Keepalive, SshCommunicator, Stream,
};
use support::{pseudo_random, sha256_hex, Kind, Server};

async fn connect(server: &Server) -> SshCommunicator {
    match SshCommunicator::connect(server.config(), pending()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "connect to {:?} failed: {e}\nserver log:\n{}",
            server.kind,
            server.log()
        ),
    }
}

async fn sh(c: &SshCommunicator, cmd: &str) -> (ExitStatus, String, String) {
    let (outcome, out) = c.exec_collect(cmd, ExecOptions::default()).await.unwrap();
    (outcome.status, out.stdout_lossy(), out.stderr_lossy())
}

// ---------------------------------------------------------------------------------------------
// Behaviour common to both servers, written once and instantiated per server below.

async fn exec_streams_and_exit_codes(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;

    let (status, out, err) = sh(&c, "echo out; echo err >&2; echo out2").await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out, "out\nout2\n");
    assert_eq!(err, "err\n");

    let (status, out, err) = sh(&c, "echo before; exit 3").await;
    assert_eq!(status, ExitStatus::Code(3));
    assert!(!status.success());
    assert_eq!((out.as_str(), err.as_str()), ("before\n", ""));

    let (status, _, _) = sh(&c, "kill -KILL $$").await;
    assert_eq!(status, ExitStatus::Signal("KILL".into()));

    // The sink sees chunks live and in order, with the right stream tags.
    let mut seen: Vec<(Stream, Vec<u8>)> = Vec::new();
    let mut sink = |s: Stream, d: &[u8]| seen.push((s, d.to_vec()));
    let outcome = c
        .exec(
            "printf a; sleep 0.2; printf b >&2; sleep 0.2; printf c",
            ExecOptions::default(),
            &mut sink,
        )
        .await
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!((outcome.stdout_bytes, outcome.stderr_bytes), (2, 1));
    let joined: Vec<(Stream, String)> = seen
        .iter()
        .map(|(s, d)| (*s, String::from_utf8_lossy(d).into_owned()))
        .collect();
    assert_eq!(
        joined,
        vec![
            (Stream::Stdout, "a".into()),
            (Stream::Stderr, "b".into()),
            (Stream::Stdout, "c".into())
        ]
    );
    c.close().await.unwrap();
}

async fn large_output_intact(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let data = pseudo_random(6 * 1024 * 1024 + 123, 7);
    let path = server.dir.join("big.bin");
    std::fs::write(&path, &data).unwrap();
    let cmd = format!("cat '{0}' && cat '{0}' >&2", path.display());
    let (outcome, out) = c.exec_collect(&cmd, ExecOptions::default()).await.unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
    assert_eq!(sha256_hex(&out.stderr), sha256_hex(&data));
}

async fn upload_is_byte_exact_with_mode(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let data = pseudo_random(24 * 1024 * 1024 + 5, 11);
    let src = server.dir.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let dest = server.dir.join("it's a dest.bin");
    let dest_str = dest.to_str().unwrap();

    let t = Instant::now();
    let up = c.upload_file(&src, dest_str, 0o640).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{kind:?}: uploaded {} MiB in {secs:.3} s = {:.0} MiB/s",
        data.len() >> 20,
        (data.len() as f64 / 1048576.0) / secs
    );
    assert_eq!(up.bytes, data.len() as u64);
    let written = std::fs::read(&dest).unwrap();
    assert_eq!(sha256_hex(&written), sha256_hex(&data));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dest).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o640);

    // Replacing an existing file with a shorter one truncates it; a zero-byte upload works.
    let up = c
        .upload(&mut &b"tiny"[..], 4, dest_str, 0o755)
        .await
        .unwrap();
    assert_eq!(up.bytes, 4);
    assert_eq!(std::fs::read(&dest).unwrap(), b"tiny");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dest).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o755);
    c.upload(&mut &b""[..], 0, dest_str, 0o600).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"");

    // And it comes back the same way.
    std::fs::write(&dest, &data).unwrap();
    let mut back = Vec::new();
    let n = c.download(dest_str, &mut back).await.unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
}

async fn upload_errors_are_clear(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let dest = format!("{}/no/such/dir/file", server.dir.display());
    let data = pseudo_random(3 * 1024 * 1024, 3);
    let err = c
        .upload(&mut &data[..], data.len() as u64, &dest, 0o644)
        .await
        .unwrap_err();
    let msg = err.to_string();
    match &err {
        CommError::UploadFailed {
            dest: d,
            status,
            stderr,
            target,
        } => {
            assert_eq!(d, &dest);
            assert!(!status.success());
            assert!(stderr.contains("no/such/dir/file"), "{stderr}");
            assert!(target.contains(&server.addr().to_string()), "{target}");
        }
        other => panic!("expected UploadFailed, got {other:?}"),
    }
    assert!(
        msg.contains(&dest) && msg.contains(&server.addr().to_string()),
        "{msg}"
    );

    // A reader shorter or longer than promised is refused, not silently truncated.
    let ok_dest = format!("{}/short", server.dir.display());
    let err = c
        .upload(&mut &b"abc"[..], 10, &ok_dest, 0o644)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommError::LocalIo { .. }),
        "{err:?}\nserver log:\n{}",
        server.log()
    );
    assert!(err.to_string().contains("ended after 3 bytes"), "{err}");
    let err = c
        .upload(&mut &b"abcdef"[..], 3, &ok_dest, 0o644)
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::LocalIo { .. }), "{err:?}");

    // Downloading a missing file names it.
    let err = c
        .download("/no/such/file", &mut Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::DownloadFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("/no/such/file"), "{err}");

    // The session survives all of that.
    assert_eq!(sh(&c, "echo still here").await.1, "still here\n");
}

async fn one_connection_for_all_commands(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        let (status, out, _) = sh(&c, "echo $SSH_CONNECTION").await;
        assert_eq!(status, ExitStatus::Code(0));
        assert!(out.starts_with("127.0.0.1 "), "{out}");
        seen.insert(out);
    }
    assert_eq!(seen.len(), 1, "commands used several connections: {seen:?}");
    // Concurrent commands share it too.
    let (a, b) = tokio::join!(sh(&c, "sleep 0.3; echo a"), sh(&c, "sleep 0.3; echo b"));
    assert_eq!((a.1.as_str(), b.1.as_str()), ("a\n", "b\n"));
}

async fn trust_on_first_use_reports_the_host_key(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let report = c.connect_report();
    assert_eq!(report.host_key.as_ref(), Some(&server.host_fp));
    let id = report.server_id.clone().unwrap_or_default();
    let expected = match kind {
        Kind::OpenSsh => "SSH-2.0-OpenSSH_",
        Kind::Dropbear => "SSH-2.0-dropbear",
    };
    assert!(id.starts_with(expected), "{id}");
    assert!(report.started <= report.tcp_connected);
    assert!(report
        .banner
        .is_some_and(|b| report.tcp_connected <= b && b <= report.authenticated));
    assert!(report.attempts >= 1);
    // Pinning what we saw is what later connects (and reconnects) use.
    assert_eq!(
        c.config().host_key,
        HostKeyPolicy::Pinned(server.host_fp.clone())
    );
}

async fn killed_server_is_connection_lost_then_reconnect(kind: Kind) {
    let mut server = Server::started(kind);
    let c = connect(&server).await;
    assert!(c.is_connected());

    let running = c.exec_collect("echo started; sleep 30", ExecOptions::default());
    let killer = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.kill();
        Instant::now()
    };
    let (result, killed_at) = tokio::join!(running, killer);
    let err = result.unwrap_err();
    let noticed = killed_at.elapsed();
    assert!(matches!(err, CommError::ConnectionLost { .. }), "{err:?}");
    assert!(err.to_string().contains("sleep 30"), "{err}");
    assert!(
        noticed < Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    assert!(!c.is_connected());

    // Further commands fail the same way, at once.
    let err = c
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::ConnectionLost { .. }), "{err:?}");

    // The guest "reboots": same host key, back a little later.
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.start();
    };
    let (report, ()) = tokio::join!(c.reconnect(Box::pin(pending())), restart);
    let report = report.unwrap();
    assert_eq!(report.host_key.as_ref(), Some(&server.host_fp));
    assert!(c.is_connected());
    assert_eq!(sh(&c, "echo back").await.1, "back\n");
}

async fn exec_timeout_kills_the_command(kind: Kind) {
    let server = Server::started(kind);
    let c = connect(&server).await;
    let pidfile = server.dir.join("sleeper.pid");
    let cmd = format!("echo $$ > '{}'; exec sleep 30", pidfile.display());
    let t = Instant::now();
    let err = c
        .exec_collect(
            &cmd,
            ExecOptions {
                timeout: Some(Duration::from_millis(500)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    // Where the KILL signal is refused (below), the channel is closed after a 2 s grace period.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(matches!(err, CommError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("sleep 30"), "{err}");
    // We send a KILL signal request before closing the channel. dropbear honours it. OpenSSH
    // refuses signal requests in sessions without privilege separation, which is every root
    // login (sshd logs "session signalling requires privilege separation"), so there the
    // command outlives the timeout; a non-root guest user (the Azure norm) is fine.
    if kind == Kind::Dropbear {
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        let gone = async {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the timed-out command (pid {pid}) is still running; server log:\n{}",
                    server.log()
                )
            });
    }
    // The session is still usable.
    assert_eq!(sh(&c, "echo alive").await.1, "alive\n");
}

async fn concurrent_short_commands_all_report_status(kind: Kind) {
    // dropbear closes a new session channel if another channel's command exits between the
    // new channel's open and its exec request; the communicator must retry such a channel
    // (nothing ran on it) instead of reporting an unknown exit status.
    let server = Server::started(kind);
    let c = connect(&server).await;
    let worker = |tag: &'static str| {
        let (c, server) = (&c, &server);
        async move {
            for i in 0..40 {
                let (outcome, out) = c
                    .exec_collect(&format!("echo {tag}{i}"), ExecOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("{tag}{i}: {e}\nserver log:\n{}", server.log()));
                assert_eq!(outcome.status, ExitStatus::Code(0), "{tag}{i}: {out:?}");
                assert_eq!(out.stdout_lossy(), format!("{tag}{i}\n"));
            }
        }
    };
    tokio::join!(worker("a"), worker("b"), worker("c"));
}

async fn dropped_exec_cleans_up(kind: Kind) {
    // A caller that gives up on an exec (drops the future, e.g. in a `select!`) must not leave
    // the session in a bad state.
    let server = Server::started(kind);
    let c = connect(&server).await;
    let pidfile = server.dir.join("dropped.pid");
    let cmd = format!("echo $$ > '{}'; exec sleep 30", pidfile.display());
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        c.exec_collect(&cmd, ExecOptions::default()),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the command should still have been running"
    );
    assert_eq!(sh(&c, "echo next").await.1, "next\n");
    if kind == Kind::Dropbear {
        // The KILL signal works here (see exec_timeout_kills_the_command for OpenSSH).
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        let gone = async {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .unwrap_or_else(|_| panic!("the abandoned command (pid {pid}) is still running"));
    }
}

macro_rules! both_servers {
    ($($name:ident),* $(,)?) => {
        mod openssh {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(Kind::OpenSsh).await })*
        }
        mod dropbear {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(Kind::Dropbear).await })*
        }
    };
}

both_servers!(
    exec_streams_and_exit_codes,
    large_output_intact,
    upload_is_byte_exact_with_mode,
    upload_errors_are_clear,
    one_connection_for_all_commands,
    trust_on_first_use_reports_the_host_key,
    killed_server_is_connection_lost_then_reconnect,
    exec_timeout_kills_the_command,
    concurrent_short_commands_all_report_status,
    dropped_exec_cleans_up,
);

// ---------------------------------------------------------------------------------------------
// Connecting: readiness, timeouts, refusals. OpenSSH unless the point is server-specific.

/// Forward connections accepted on `listener` to `upstream`.
async fn forward(listener: tokio::net::TcpListener, upstream: std::net::SocketAddr) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut u) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_greeting_after_refusals_is_not_dropped() {
    // A guest whose network answers before its sshd (the first connections are closed at once,
    // which switches the connect loop to its fast poll) and whose sshd then greets each
    // connection only after 1 s, as a loaded TCG guest's may. Dropping banner-less attempts
    // to make room for the fast poll's new ones would never let one reach its banner.
    let server = Server::started(Kind::OpenSsh);
    server.wait_listening().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = server.addr();
    let proxy = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            if n <= 3 {
                drop(s);
                continue;
            }
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                if let Ok(mut u) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
                }
            });
        }
    });
    let mut cfg = server.config();
    cfg.addr = addr;
    // Less than the fast poll's window, so a loop that keeps dropping young attempts fails.
    cfg.timeout = Duration::from_secs(20);
    let c = SshCommunicator::connect(cfg, pending()).await;
    proxy.abort();
    let c = c.expect("connected through the slow greeter");
    assert_eq!(sh(&c, "echo slow").await.1, "slow\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_a_late_server_and_is_prompt() {
    // The port starts answering 300 ms into the wait. To time our side exactly, sshd is already
    // up behind a forwarder whose bind is the moment the "guest" becomes reachable.
    let server = Server::started(Kind::OpenSsh);
    server.wait_listening().await;
    let port = support::free_port();
    let mut cfg = server.config();
    cfg.addr = ([127, 0, 0, 1], port).into();
    let connecting = SshCommunicator::connect(cfg, pending());
    let opener = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let bound = Instant::now();
        tokio::spawn(forward(listener, server.addr()));
        bound
    };
    let (c, bound) = tokio::join!(connecting, opener);
    let c = c.unwrap();
    let r = c.connect_report();
    let detect = r
        .first_tcp_connect
        .unwrap()
        .saturating_duration_since(bound);
    let ready = r.authenticated.saturating_duration_since(bound);
    eprintln!(
        "port opened at +{:?}; first TCP connect +{detect:?} later; authenticated +{ready:?} \
         later; {} attempts",
        bound - r.started,
        r.attempts
    );
    // The poll interval at 300 ms is 60 ms.
    // Typically ~45 ms; the bound leaves room for a loaded machine.
    assert!(
        detect < Duration::from_millis(150),
        "first TCP connect {detect:?} after the port opened"
    );
    assert!(
        ready < Duration::from_millis(500),
        "authenticated {ready:?} after the port opened"
    );
    assert!(
        r.attempts >= 4,
        "only {} attempts in 300 ms: backoff too slow",
        r.attempts
    );
    assert!(
        r.attempts <= 40,
        "{} attempts in 300 ms: backoff too aggressive",
        r.attempts
    );
    assert_eq!(sh(&c, "echo ok").await.1, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_before_sshd_starts() {
    let mut server = Server::new(Kind::OpenSsh);
    let connecting = SshCommunicator::connect(server.config(), pending());
    let starter = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.start();
        Instant::now()
    };
    let (c, spawned) = tokio::join!(connecting, starter);
    let c = c.unwrap();
    let ready = c
        .connect_report()
        .authenticated
        .saturating_duration_since(spawned);
    eprintln!("sshd spawned; authenticated {ready:?} later");
    // Includes sshd's own start-up, so only a loose bound.
    assert!(
        ready < Duration::from_secs(1),
        "authenticated {ready:?} after sshd was started"
    );
    assert_eq!(sh(&c, "echo ok").await.1, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_times_out_naming_the_address() {
    let port = support::free_port();
    let key = kiln_agents::generate_ed25519("t").unwrap().private;
    let mut cfg = kiln_agents::ConnectConfig::new(([127, 0, 0, 1], port).into(), "someone", key);
    cfg.timeout = Duration::from_millis(500);
    let t = Instant::now();
    let err = SshCommunicator::connect(cfg, pending()).await.unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(900),
        "{took:?}"
    );
    let msg = err.to_string();
    match err {
        ConnectError::Timeout {
            attempts,
            last: AttemptFailure::Refused,
            ..
        } => {
            // About 14 on an idle machine (20 ms polls, growing by elapsed/5); fixed 1 s polling
            // would make 1. Leave room for a loaded CI machine.
            assert!(attempts >= 4, "{attempts} attempts");
        }
        other => panic!("expected a Timeout after refusals, got {other:?}"),
    }
    assert!(msg.contains(&format!("someone@127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("connection refused"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_listener_is_a_banner_timeout() {
    // What a QEMU user-net port forward looks like while the guest's network is down: TCP
    // accepted, then nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.push(s);
        }
    });
    let key = kiln_agents::generate_ed25519("t").unwrap().private;
    let mut cfg = kiln_agents::ConnectConfig::new(addr, "u", key);
    cfg.timeout = Duration::from_millis(1200);
    cfg.banner_timeout = Duration::from_millis(300);
    let err = SshCommunicator::connect(cfg, pending()).await.unwrap_err();
    held.abort();
    match &err {
        ConnectError::Timeout {
            last: AttemptFailure::BannerTimeout(_),
            attempts,
            ..
        } => {
            // Hung attempts overlap instead of queueing behind each other.
            assert!(*attempts >= 4, "{attempts} attempts");
        }
        other => panic!("expected a banner timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("no SSH banner"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_attempt_does_not_delay_readiness() {
    // A proxy in front of sshd that swallows the first connection (as QEMU user-net does while
    // the guest boots) and forwards the rest.
    let server = Server::started(Kind::OpenSsh);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = server.addr();
    let proxy = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            if n == 1 {
                held.push(s);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
                }
            });
        }
    });
    let mut cfg = server.config();
    cfg.addr = addr;
    cfg.banner_timeout = Duration::from_secs(10);
    let t = Instant::now();
    let c = SshCommunicator::connect(cfg, pending()).await.unwrap();
    let took = t.elapsed();
    proxy.abort();
    assert!(
        took < Duration::from_secs(2),
        "took {took:?}: waited on the hung attempt"
    );
    assert!(c.connect_report().attempts >= 2);
    assert_eq!(sh(&c, "echo via proxy").await.1, "via proxy\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_rejected_not_retried_forever() {
    let server = Server::started(Kind::OpenSsh);
    let other = kiln_agents::generate_ed25519("stranger").unwrap().private;

    // No grace: the first rejection is final.
    let t = Instant::now();
    let err = SshCommunicator::connect(server.config_with_key(other.clone()), pending())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = err.to_string();
    assert!(
        matches!(err, ConnectError::AuthRejected { attempts: 1, .. }),
        "{err:?}"
    );
    assert!(
        msg.contains(&format!("as {} on {}", server.user, server.addr())),
        "{msg}"
    );
    assert!(
        msg.contains("ssh-ed25519") && msg.contains("publickey"),
        "{msg}"
    );

    // With a grace period (keys installed late by cloud-init), it retries, then gives up.
    let mut cfg = server.config_with_key(other);
    cfg.auth_grace = Duration::from_millis(800);
    let t = Instant::now();
    let err = SshCommunicator::connect(cfg, pending()).await.unwrap_err();
    let took = t.elapsed();
    match err {
        ConnectError::AuthRejected { attempts, .. } => assert!(attempts >= 2, "{attempts}"),
        other => panic!("expected AuthRejected, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_installed_during_the_grace_period_is_accepted() {
    let server = Server::started(Kind::OpenSsh);
    server.authorize("# nothing yet");
    let mut cfg = server.config();
    cfg.auth_grace = Duration::from_secs(10);
    let installer = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.authorize(&server.client.public_line);
    };
    let (c, ()) = tokio::join!(SshCommunicator::connect(cfg, pending()), installer);
    let c = c.unwrap();
    assert!(c.connect_report().attempts >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_host_key_mismatch_fails_at_once() {
    let server = Server::started(Kind::OpenSsh);
    let wrong = HostKeyFingerprint("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let mut cfg = server.config();
    cfg.host_key = HostKeyPolicy::Pinned(wrong.clone());
    let t = Instant::now();
    let err = SshCommunicator::connect(cfg, pending()).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = err.to_string();
    match err {
        ConnectError::HostKeyMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, server.host_fp);
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
    assert!(
        msg.contains(&server.addr().to_string()) && msg.contains(&server.host_fp.0),
        "{msg}"
    );

    // The right pin connects.
    let mut cfg = server.config();
    cfg.host_key = HostKeyPolicy::Pinned(server.host_fp.clone());
    SshCommunicator::connect(cfg, pending()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_ends_the_wait_promptly() {
    let port = support::free_port();
    let key = kiln_agents::generate_ed25519("t").unwrap().private;
    let cfg = kiln_agents::ConnectConfig::new(([127, 0, 0, 1], port).into(), "root", key);

    let t = Instant::now();
    let abort = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Interrupt::Aborted("QEMU exited with status 1".into())
    };
    let err = SshCommunicator::connect(cfg.clone(), abort)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(300),
        "{took:?}"
    );
    assert!(matches!(err, ConnectError::Aborted { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("QEMU exited with status 1") && msg.contains(&format!("127.0.0.1:{port}")),
        "{msg}"
    );

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cancel = async move {
        let _ = rx.await;
        Interrupt::Cancelled
    };
    let t = Instant::now();
    let (err, ()) = tokio::join!(SshCommunicator::connect(cfg, cancel), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tx.send(());
    });
    assert!(matches!(err.unwrap_err(), ConnectError::Cancelled { .. }));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_use_sha2_signatures() {
    // OpenSSH 8.8+ refuses ssh-rsa (SHA-1) signatures, so this only passes with rsa-sha2-*.
    for kind in [Kind::OpenSsh, Kind::Dropbear] {
        let server = Server::new(kind);
        let path = server.dir.join("id_rsa");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success());
        let key = kiln_agents::load_private_key(&path).unwrap();
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        server.authorize(public.trim());
        let mut server = server;
        server.start();
        let c = SshCommunicator::connect(server.config_with_key(key), pending())
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}\n{}", server.log()));
        assert_eq!(sh(&c, "echo rsa").await.1, "rsa\n");
    }
}

// ---------------------------------------------------------------------------------------------
// Established sessions: stdin, timeouts, liveness.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_feeds_stdin() {
    let server = Server::started(Kind::OpenSsh);
    let c = connect(&server).await;
    let data = pseudo_random(3 * 1024 * 1024, 5);
    let mut reader = &data[..];
    let (outcome, out) = c
        .exec_collect(
            "sha256sum",
            ExecOptions {
                stdin: Some(&mut reader),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(outcome.stdin_bytes, data.len() as u64);
    assert!(
        out.stdout_lossy().starts_with(&sha256_hex(&data)),
        "{}",
        out.stdout_lossy()
    );

    // A command that stops reading early does not hang the call.
    let big = pseudo_random(32 * 1024 * 1024, 6);
    let mut reader = &big[..];
    let t = Instant::now();
    let (outcome, out) = c
        .exec_collect(
            "head -c 10 >/dev/null; echo done",
            ExecOptions {
                stdin: Some(&mut reader),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(out.stdout_lossy(), "done\n");
    assert!(outcome.stdin_bytes < big.len() as u64);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_guest_is_detected_by_keepalives() {
    let server = Server::started(Kind::OpenSsh);
    let mut cfg = server.config();
    cfg.keepalive = Some(Keepalive {
        interval: Duration::from_millis(200),
        max: 2,
    });
    let c = SshCommunicator::connect(cfg, pending()).await.unwrap();
    let running = c.exec_collect("sleep 30", ExecOptions::default());
    let freezer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.freeze();
        Instant::now()
    };
    let (result, frozen_at) = tokio::join!(running, freezer);
    let noticed = frozen_at.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, CommError::ConnectionLost { .. }), "{err:?}");
    assert!(err.to_string().contains("keepalive"), "{err}");
    assert!(
        noticed < Duration::from_secs(3),
        "noticed after {noticed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_communicator_refuses_work() {
    let server = Server::started(Kind::Dropbear);
    let c = connect(&server).await;
    c.close().await.unwrap();
    let err = c
        .exec_collect("true", ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::Closed { .. }), "{err:?}");
    // reconnect revives it.
    c.reconnect(Box::pin(pending())).await.unwrap();
    assert_eq!(sh(&c, "echo again").await.1, "again\n");
}
