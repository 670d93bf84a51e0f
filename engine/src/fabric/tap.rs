//! kiln's DHCP server on the guest's network, so the guest gets what Azure's DHCP gives
//! ([`super::dhcp`]: option 245 and routes to the wireserver and IMDS) while QEMU's user
//! network (slirp) keeps everything else — its TCP/IP stack, `hostfwd` (SSH) and
//! `guestfwd` (the fabric).
//!
//! QEMU `filter-redirector`s on the user netdev ([`crate::vm::NetTap`]) hand kiln every frame
//! the guest sends (`queue=rx`, `outdev`) on one Unix socket, each as a 4-byte big-endian
//! length and the Ethernet frame. kiln answers DHCP requests itself and writes the replies
//! to a second socket, whose frames QEMU delivers to the guest (`queue=tx`, `indev`); every
//! other frame goes back unchanged on a third socket, whose frames continue to slirp
//! (`indev` of the `queue=rx` filter). slirp's own DHCP server never sees a request.
//!
//! QEMU writes to the first socket from its main loop and blocks while it is full, so kiln
//! never waits on a write while holding a frame it has read: frames queue (bounded) between
//! the reader and the two writers, and are dropped when a queue is full, as a congested
//! network would (TCP resends them).

use super::dhcp::{self, Frame, Lease};
use super::{Endpoint, EventSink, FabricEvent};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// The largest frame QEMU hands over (a 64 KiB GSO frame and headers); a longer length is a
/// broken stream, which kiln closes.
pub const MAX_FRAME: usize = 70 * 1024;
/// Frames queued towards slirp before kiln drops them.
pub const QUEUE_FRAMES: usize = 4096;
/// DHCP exchanges (and, counted apart, errors) logged one by one; after that only each
/// power of two.
pub const MAX_LOGGED: u64 = 64;

/// The three sockets' file names, next to the fabric's socket.
pub const FILE_NAMES: [&str; 3] = ["dhcp-o.sock", "dhcp-n.sock", "dhcp-g.sock"];

/// The listening sockets of one build's DHCP tap.
pub(super) struct Listeners {
    pub paths: crate::vm::NetTap,
    guest: UnixListener,
    network: UnixListener,
    inject: UnixListener,
}

impl Listeners {
    /// Binds the three sockets in `dir` (stale files there are replaced).
    pub fn bind(dir: &Path) -> std::io::Result<Listeners> {
        let [o, n, g] = FILE_NAMES.map(|f| dir.join(f));
        let bind = |p: &PathBuf| -> std::io::Result<UnixListener> {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p)?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
            Ok(l)
        };
        Ok(Listeners {
            guest: bind(&o)?,
            network: bind(&n)?,
            inject: bind(&g)?,
            paths: crate::vm::NetTap {
                from_guest: o,
                to_network: n,
                to_guest: g,
            },
        })
    }

    /// Removes the socket files.
    pub fn remove(paths: &crate::vm::NetTap) {
        for p in [&paths.from_guest, &paths.to_network, &paths.to_guest] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves DHCP from `lease` until aborted.
pub(super) async fn run(l: Listeners, lease: Lease, sink: EventSink) {
    let (net_tx, net_rx) = mpsc::channel::<Vec<u8>>(QUEUE_FRAMES);
    let (guest_tx, guest_rx) = mpsc::channel::<Vec<u8>>(64);
    tokio::join!(
        read_guest(l.guest, net_tx, guest_tx, Arc::new(lease), sink),
        write_frames(l.network, net_rx),
        write_frames(l.inject, guest_rx),
    );
}

fn event(method: &str, target: String, agent: String, error: Option<String>) -> FabricEvent {
    FabricEvent {
        endpoint: Endpoint::Dhcp,
        method: method.into(),
        target,
        status: 0,
        agent,
        health: None,
        error,
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What kiln does with one guest frame: the frame for slirp, or the reply for the guest
/// and the event to log.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the frame on to slirp.
    Pass,
    /// Send this frame to the guest.
    Reply(Vec<u8>, FabricEvent),
    /// Drop the frame (a DHCP request kiln does not answer), logging this.
    Drop(FabricEvent),
}

/// Decides what happens to one frame the guest sent.
pub fn handle(frame: &[u8], lease: &Lease) -> Verdict {
    match dhcp::classify(frame) {
        Frame::Other => Verdict::Pass,
        Frame::Malformed(why) => Verdict::Drop(event(
            "",
            String::new(),
            mac_str(&frame_src(frame)),
            Some(format!("malformed DHCP request dropped: {why}")),
        )),
        Frame::Dhcp(req) => {
            let agent = mac_str(&req.mac);
            match dhcp::answer(&req, lease) {
                Some((kind, reply)) => {
                    let target = match kind {
                        dhcp::MessageType::Nak => {
                            format!("NAK (asked for {})", req.requested.unwrap_or(req.ciaddr))
                        }
                        k => format!(
                            "{} {} (wireserver {}, {} routes)",
                            k.as_str(),
                            lease.client,
                            lease.wireserver,
                            lease.routes.len() + 1
                        ),
                    };
                    Verdict::Reply(reply, event(req.kind.as_str(), target, agent, None))
                }
                None => Verdict::Drop(event(req.kind.as_str(), "no reply".into(), agent, None)),
            }
        }
    }
}

fn frame_src(frame: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    if let Some(s) = frame.get(6..12) {
        m.copy_from_slice(s);
    }
    m
}

async fn read_guest(
    listener: UnixListener,
    net: mpsc::Sender<Vec<u8>>,
    guest: mpsc::Sender<Vec<u8>>,
    lease: Arc<Lease>,
    sink: EventSink,
) {
    // Exchanges and errors are counted apart, so a flood of one does not hide the other.
    let (mut exchanges, mut errors) = (0u64, 0u64);
    let mut log = |e: FabricEvent| {
        let n = if e.error.is_some() {
            &mut errors
        } else {
            &mut exchanges
        };
        *n += 1;
        if *n <= MAX_LOGGED || n.is_power_of_two() {
            sink(e);
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let mut r = BufReader::with_capacity(256 * 1024, stream);
        while let Ok(n) = r.read_u32().await {
            let len = n as usize;
            if len > MAX_FRAME {
                log(event(
                    "",
                    String::new(),
                    String::new(),
                    Some(format!(
                        "QEMU's frame stream is broken (a {len}-byte frame); reconnecting"
                    )),
                ));
                break;
            }
            let mut frame = vec![0u8; len];
            if r.read_exact(&mut frame).await.is_err() {
                break;
            }
            match handle(&frame, &lease) {
                Verdict::Pass => {
                    let _ = net.try_send(frame);
                }
                Verdict::Reply(reply, e) => {
                    log(e);
                    let _ = guest.try_send(reply);
                }
                Verdict::Drop(e) => log(e),
            }
        }
    }
}

async fn write_frames(listener: UnixListener, mut rx: mpsc::Receiver<Vec<u8>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let mut buf = Vec::with_capacity(MAX_FRAME + 4);
        loop {
            let Some(frame) = rx.recv().await else { return };
            buf.clear();
            buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            buf.extend_from_slice(&frame);
            // Whatever else is queued goes in the same write.
            while buf.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(f) => {
                        buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
                        buf.extend_from_slice(&f);
                    }
                    Err(_) => break,
                }
            }
            if stream.write_all(&buf).await.is_err() {
                break;
            }
        }
    }
}
