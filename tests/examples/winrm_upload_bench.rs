//! Upload throughput over WinRM against the WinRS test server on 127.0.0.1: kiln's chunked
//! base64 upload (cmd.exe `echo` lines + one decoding PowerShell) on both transports, next to a
//! plain HTTP pull of the same bytes (what the Windows File customizer will do instead).
//!
//! `cargo run -p kiln-tests --example winrm_upload_bench [MIB]` (default 4 MiB). The numbers are
//! for this machine and the Linux test server (its shim does no process start per chunk the way
//! cmd.exe would); they show the protocol's cost, not Windows'.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kiln_agents::winrm::{CertPolicy, Security, WinRmCommunicator, WinRmConfig};
use kiln_agents::Communicator;
use kiln_tests::winrs_server::{Stats, WinrsAuth, WinrsServer, WinrsServerConfig};

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

async fn http_pull(data: Bytes) -> Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = data.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let d = served.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let d = d.clone();
                    async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(d))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/file")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let body = send
        .send_request(req)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let took = started.elapsed();
    anyhow::ensure!(body == data, "HTTP pull returned different bytes");
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(4);
    let len = mib * 1024 * 1024;
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let dir = std::env::temp_dir().join(format!("kiln-winrm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("payload: {mib} MiB");
    for (auth, security) in [
        (
            WinrsAuth::HttpsBasic,
            Security::HttpsBasic(CertPolicy::TrustOnFirstUse),
        ),
        (WinrsAuth::HttpNtlm, Security::HttpNtlm),
    ] {
        let server = WinrsServer::start(WinrsServerConfig::new(auth.clone(), "kiln", "pw")).await?;
        let guest = WinRmCommunicator::connect(
            WinRmConfig::new(server.addr(), "kiln", "pw", security),
            std::future::pending(),
        )
        .await?;
        let dest = dir.join(format!("{auth:?}.bin"));
        let before = Stats::get(&server.stats().requests);
        let mut r = &data[..];
        let up = guest
            .upload(&mut r, len as u64, dest.to_str().unwrap(), 0o644)
            .await?;
        anyhow::ensure!(std::fs::read(&dest)? == data, "upload corrupted");
        let requests = Stats::get(&server.stats().requests) - before;
        println!(
            "WinRM upload {auth:?}: {:.2} s, {:.2} MiB/s, {} commands, {} WS-Man requests",
            up.duration.as_secs_f64(),
            mib_s(len, up.duration),
            Stats::get(&server.stats().commands),
            requests
        );
        guest.close().await?;
    }
    let took = http_pull(Bytes::from(data.clone())).await?;
    println!(
        "plain HTTP pull (one GET on 127.0.0.1): {:.3} s, {:.1} MiB/s",
        took.as_secs_f64(),
        mib_s(len, took)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
