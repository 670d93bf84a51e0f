//! One command on one session channel: stdin pumped concurrently with output, exit status
//! taken from wherever it arrives (after EOF, usually), and the channel closed if we are dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedMutexGuard;

use super::Conn;
use crate::communicator::{ExitStatus, OutputSink, Stream};

/// Stdin is sent in chunks of this size: large enough that per-chunk overhead vanishes, small
/// enough that a multi-GB upload never sits in memory.
const CHUNK: usize = 256 * 1024;

/// Cap on the stdout/stderr kept in memory by [`Out::Capture`] and [`Out::Download`].
const CAPTURE_CAP: usize = 64 * 1024;

/// Where a run's output goes.
pub(crate) enum Out<'a> {
    /// Everything to the caller's sink.
    Sink(&'a mut dyn OutputSink),
    /// Keep the first [`CAPTURE_CAP`] bytes of each stream (upload bookkeeping).
    Capture {
        stdout: &'a mut Vec<u8>,
        stderr: &'a mut Vec<u8>,
    },
    /// Stdout into a local writer, stderr kept.
    Download {
        writer: &'a mut (dyn AsyncWrite + Send + Unpin),
        stderr: &'a mut Vec<u8>,
    },
}

fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = CAPTURE_CAP.saturating_sub(buf.len());
    buf.extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
}

impl Out<'_> {
    async fn deliver(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        match (self, stream) {
            (Out::Sink(s), stream) => s.output(stream, data),
            (Out::Capture { stdout, .. }, Stream::Stdout) => keep(stdout, data),
            (Out::Capture { stderr, .. }, Stream::Stderr)
            | (Out::Download { stderr, .. }, Stream::Stderr) => keep(stderr, data),
            (Out::Download { writer, .. }, Stream::Stdout) => writer.write_all(data).await?,
        }
        Ok(())
    }
}

/// What to run.
pub(crate) struct Run<'a> {
    pub(crate) cmd: &'a str,
    pub(crate) stdin: Option<&'a mut (dyn AsyncRead + Send + Unpin)>,
    /// Stdin must yield exactly this many bytes (uploads).
    pub(crate) stdin_len: Option<u64>,
    pub(crate) timeout: Option<Duration>,
}

/// How a run that reached the end of its channel went.
pub(crate) struct Ran {
    pub(crate) status: ExitStatus,
    pub(crate) stdout_bytes: u64,
    pub(crate) stderr_bytes: u64,
    pub(crate) stdin_bytes: u64,
    /// Stdin was read to its end (or to `stdin_len`) and EOF sent.
    pub(crate) stdin_complete: bool,
    pub(crate) duration: Duration,
}

/// Why a run did not reach the end of its channel.
pub(crate) enum RunError {
    /// The session died; the detail says why, as far as we know.
    Lost(String),
    /// The server refused the channel or the exec request.
    Rejected(String),
    /// The timeout passed; the command was signalled and its channel closed.
    Timeout(Duration),
    /// Reading stdin failed locally.
    StdinRead(std::io::Error),
    /// Stdin ended before `stdin_len` bytes (payload: bytes read).
    StdinShort(u64),
    /// Stdin had more than `stdin_len` bytes.
    StdinLong,
    /// Writing downloaded data locally failed.
    LocalWrite(std::io::Error),
    /// The server closed the channel before acknowledging the exec request: nothing ran.
    NotStarted,
}

enum PumpEnd {
    Done,
    SendFailed,
    Read(std::io::Error),
    Short(u64),
    Long,
}

/// How long the pump holds a packet back waiting for the server's window to allow a full one
/// (see [`Pacer`]) before sending what the window allows.
const FULL_PACKET_WAIT: Duration = Duration::from_millis(5);

/// Sends stdin in whole packets where the server's window allows them.
///
/// russh sends as soon as any window is open, so a packet goes out for every `WINDOW_ADJUST`,
/// however small. Against a server with a small window that adjusts in small steps this
/// settles into small packets for good: dropbear (24 KiB window, an adjust per 8 KiB its
/// command has consumed) answers each 8 KiB packet with an 8 KiB adjust, and a slow guest pays
/// per packet (strace of 16 MiB: kiln 1 997 `sendto`, 1 939 of them 8 KiB, against OpenSSH's
/// 697 writes of 24 KiB; docs/bench.md). OpenSSH's client keeps whole-window packets because it
/// reads every pending adjust before it writes. The pacer does the same on purpose: it waits
/// (woken by russh's `WindowAdjusted` messages, at most [`FULL_PACKET_WAIT`]) until the window
/// holds a full packet — the smaller of the server's maximum packet and the window it opened
/// with — or the rest of the input. Servers with large windows (OpenSSH: 2 MiB) never wait.
struct Pacer<'a> {
    adjusted: &'a tokio::sync::Notify,
    /// A full packet: set from the window when the first data goes out.
    full: Option<usize>,
}

impl Pacer<'_> {
    /// Waits until `want` bytes (at most a full packet) can go out in one packet, or a little
    /// while; returns how many to send now. `open` says how much the window allows now (russh's
    /// `writable_packet_size`). When the window is still shut after the wait, a full packet is
    /// handed over anyway: russh then waits for the window itself.
    async fn ready<F, Fut>(&mut self, open: F, want: usize) -> usize
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = usize>,
    {
        let full = match self.full {
            Some(f) => f,
            None => {
                let f = open().await.max(1);
                self.full = Some(f);
                f
            }
        };
        let goal = want.min(full);
        let deadline = tokio::time::Instant::now() + FULL_PACKET_WAIT;
        loop {
            let notified = self.adjusted.notified();
            let now = open().await;
            if now >= goal {
                return goal;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return if now == 0 { goal } else { now };
            }
        }
    }
}

async fn pump(
    wr: &ChannelWriteHalf<Msg>,
    stdin: Option<&mut (dyn AsyncRead + Send + Unpin)>,
    exact: Option<u64>,
    sent: &AtomicU64,
    adjusted: &tokio::sync::Notify,
) -> PumpEnd {
    if let Some(r) = stdin {
        let mut pacer = Pacer {
            adjusted,
            full: None,
        };
        let mut total: u64 = 0;
        loop {
            let want = match exact {
                Some(len) => usize::try_from(len - total)
                    .unwrap_or(usize::MAX)
                    .min(CHUNK),
                None => CHUNK,
            };
            if want == 0 {
                // The promised length is reached; the reader must be exhausted too.
                let mut extra = [0u8; 1];
                match r.read(&mut extra).await {
                    Ok(0) => break,
                    Ok(_) => return PumpEnd::Long,
                    Err(e) => return PumpEnd::Read(e),
                }
            }
            let mut buf = vec![0u8; want];
            let n = match r.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => return PumpEnd::Read(e),
            };
            if n == 0 {
                if exact.is_some() {
                    return PumpEnd::Short(total);
                }
                break;
            }
            buf.truncate(n);
            // `Vec` → `Bytes` is zero-copy, and so are its slices.
            let buf = bytes::Bytes::from(buf);
            let mut off = 0;
            while off < n {
                let k = pacer.ready(|| wr.writable_packet_size(), n - off).await;
                if wr.data_bytes(buf.slice(off..off + k)).await.is_err() {
                    return PumpEnd::SendFailed;
                }
                off += k;
                total += k as u64;
                sent.store(total, Ordering::Relaxed);
            }
        }
    }
    match wr.eof().await {
        Ok(()) => PumpEnd::Done,
        Err(_) => PumpEnd::SendFailed,
    }
}

/// How long to wait for a command to end after we EOF or signal it, before closing the channel
/// regardless.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// End a channel whose run we are abandoning: EOF its stdin (`kill == false`) or send it a KILL
/// signal, wait up to [`TEARDOWN_GRACE`] for the server to close it, then close it ourselves.
///
/// Closing at once while the command still runs is not enough: dropbear then mis-attributes the
/// command's later exit to the next channel it opens, which closes without an exit status
/// (seen with dropbear 2022.83). Letting the command end first avoids that; where the signal is
/// refused (OpenSSH for root logins) the grace period bounds the wait.
async fn teardown(rd: &mut ChannelReadHalf, wr: &ChannelWriteHalf<Msg>, kill: bool) {
    let _ = if kill {
        wr.signal(Sig::KILL).await
    } else {
        wr.eof().await
    };
    let drained = async {
        while let Some(msg) = rd.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(TEARDOWN_GRACE, drained).await;
    // A no-op if the channel is already closed.
    let _ = wr.close().await;
}

/// Owns the channel while a run uses it. If the caller drops the run's future half-way, the
/// guard (still armed) KILLs the command and closes the channel in the background, so the
/// remote command does not outlive its caller.
struct Guard {
    rd: Option<ChannelReadHalf>,
    wr: Option<ChannelWriteHalf<Msg>>,
    armed: bool,
    /// The session's one-command-at-a-time permit, where it has one; a background teardown
    /// keeps it until the channel is gone.
    permit: Option<OwnedMutexGuard<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let (Some(mut rd), Some(wr), Ok(rt)) = (
            self.rd.take(),
            self.wr.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            let permit = self.permit.take();
            rt.spawn(async move {
                teardown(&mut rd, &wr, true).await;
                drop(permit);
            });
        }
    }
}

fn signal_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(s) => return s.clone(),
    }
    .to_string()
}

/// Attempts at starting a command whose channel the server closes before acknowledging the
/// exec request (see [`run`]).
const START_ATTEMPTS: u32 = 5;

/// Run one command to the end of its channel.
///
/// Stdin is not touched until the server has acknowledged the exec request. If the server
/// closes the channel before that, the command never ran, so it is retried on a new channel:
/// dropbear (2022.83 and current) closes a fresh session channel when *another* channel's
/// child exits between the channel's open and its exec request (its SIGCHLD handling runs
/// `check_close` on every channel, and a session without a child counts as finished).
pub(crate) async fn run(conn: &Conn, mut run: Run<'_>, out: &mut Out<'_>) -> Result<Ran, RunError> {
    let started = Instant::now();
    let deadline = run.timeout.map(|t| started + t);
    let mut attempt = 1;
    loop {
        let stdin = run
            .stdin
            .as_deref_mut()
            .map(|r| -> &mut (dyn AsyncRead + Send + Unpin) { r });
        match run_once(conn, run.cmd, stdin, run.stdin_len, deadline, out).await {
            Err(RunError::NotStarted) if attempt < START_ATTEMPTS => attempt += 1,
            Err(RunError::NotStarted) => {
                return Err(RunError::Rejected(format!(
                "the server closed the channel without starting the command ({attempt} attempts)"
            )))
            }
            Err(RunError::Timeout(_)) => {
                return Err(RunError::Timeout(run.timeout.unwrap_or_default()))
            }
            Ok(mut ran) => {
                ran.duration = started.elapsed();
                return Ok(ran);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_once(
    conn: &Conn,
    cmd: &str,
    stdin: Option<&mut (dyn AsyncRead + Send + Unpin)>,
    stdin_len: Option<u64>,
    deadline: Option<Instant>,
    out: &mut Out<'_>,
) -> Result<Ran, RunError> {
    let started = Instant::now();
    let lost = |fallback: &str| RunError::Lost(conn.loss_reason(fallback));
    let permit = match &conn.serial {
        Some(m) => Some(m.clone().lock_owned().await),
        None => None,
    };
    let ch = conn.handle.channel_open_session().await.map_err(|e| {
        if conn.handle.is_closed() {
            lost(&e.to_string())
        } else {
            RunError::Rejected(format!("cannot open a session channel: {e}"))
        }
    })?;
    ch.exec(true, cmd).await.map_err(|e| lost(&e.to_string()))?;
    let (rd, wr) = ch.split();
    let mut guard = Guard {
        rd: Some(rd),
        wr: Some(wr),
        armed: true,
        permit,
    };
    let Guard {
        rd: Some(rd),
        wr: Some(wr),
        armed,
        ..
    } = &mut guard
    else {
        return Err(RunError::Rejected(
            "internal: channel halves missing".into(),
        ));
    };
    let wr: &ChannelWriteHalf<Msg> = wr;

    let sent = AtomicU64::new(0);
    let adjusted = tokio::sync::Notify::new();
    let pumping = pump(wr, stdin, stdin_len, &sent, &adjusted);
    tokio::pin!(pumping);
    let mut stdin_complete = false;
    let mut pump_over = false;
    // Whether the server has acknowledged the exec request (or shown other signs of running it).
    let mut acked = false;

    let timer = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timer);

    let mut status: Option<ExitStatus> = None;
    let mut closed = false;
    let (mut stdout_bytes, mut stderr_bytes) = (0u64, 0u64);
    // On failure: the error, and whether to KILL the command (else its stdin gets EOF).
    let failure: Option<(RunError, bool)> = loop {
        tokio::select! {
            end = &mut pumping, if acked && !pump_over => {
                pump_over = true;
                match end {
                    PumpEnd::Done => stdin_complete = true,
                    // The channel is going away; its messages will say why.
                    PumpEnd::SendFailed => {}
                    PumpEnd::Read(e) => break Some((RunError::StdinRead(e), false)),
                    PumpEnd::Short(n) => break Some((RunError::StdinShort(n), false)),
                    PumpEnd::Long => break Some((RunError::StdinLong, false)),
                }
            }
            msg = rd.wait() => match msg {
                None => break None,
                Some(ChannelMsg::Success) => acked = true,
                Some(ChannelMsg::Failure) if !acked => {
                    break Some((RunError::Rejected("the server refused the exec request".into()), false));
                }
                Some(ChannelMsg::Data { data }) => {
                    acked = true;
                    stdout_bytes += data.len() as u64;
                    if let Err(e) = out.deliver(Stream::Stdout, &data).await {
                        break Some((RunError::LocalWrite(e), true));
                    }
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    // Extended type 1 (SSH_EXTENDED_DATA_STDERR) is the only one defined.
                    acked = true;
                    stderr_bytes += data.len() as u64;
                    if let Err(e) = out.deliver(Stream::Stderr, &data).await {
                        break Some((RunError::LocalWrite(e), true));
                    }
                }
                // Usually arrives after Eof: never stop reading at Eof.
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    acked = true;
                    status = Some(ExitStatus::Code(exit_status as i32));
                }
                Some(ChannelMsg::ExitSignal { signal_name: sig, .. }) => {
                    acked = true;
                    status = Some(ExitStatus::Signal(signal_name(&sig)));
                }
                Some(ChannelMsg::Close) => {
                    closed = true;
                    break None;
                }
                Some(ChannelMsg::WindowAdjusted { .. }) => adjusted.notify_one(),
                Some(_) => {}
            },
            () = &mut timer => break Some((RunError::Timeout(Duration::ZERO), true)),
        }
    };
    // The stdin pump is not polled again, so it sends nothing more.
    if let Some((err, kill)) = failure {
        // Wait for the command to end before the next one starts (see `teardown`).
        teardown(rd, wr, kill).await;
        *armed = false;
        return Err(err);
    }
    *armed = false;
    if closed && !acked {
        return Err(RunError::NotStarted);
    }
    if !closed && status.is_none() {
        // The channel vanished without Close and without a status: the session is gone.
        return Err(lost("the connection closed"));
    }
    Ok(Ran {
        status: status.unwrap_or(ExitStatus::Unknown),
        stdout_bytes,
        stderr_bytes,
        stdin_bytes: sent.load(Ordering::Relaxed),
        stdin_complete,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    const K: usize = 1024;

    fn window(n: usize) -> Arc<AtomicUsize> {
        Arc::new(AtomicUsize::new(n))
    }

    async fn ready(p: &mut Pacer<'_>, w: &Arc<AtomicUsize>, want: usize) -> (usize, Duration) {
        let t = Instant::now();
        let n = p
            .ready(
                || {
                    let w = w.clone();
                    async move { w.load(Ordering::SeqCst) }
                },
                want,
            )
            .await;
        (n, t.elapsed())
    }

    #[tokio::test]
    async fn small_adjusts_are_gathered_into_a_full_packet() {
        let adjusted = Arc::new(tokio::sync::Notify::new());
        let mut p = Pacer {
            adjusted: &adjusted,
            full: None,
        };
        let w = window(24 * K);
        // The window it opened with is a full packet: sent at once.
        assert_eq!(ready(&mut p, &w, 256 * K).await.0, 24 * K);
        // Then dropbear-style 8 KiB adjusts: the pacer waits for all three.
        w.store(8 * K, Ordering::SeqCst);
        let (w2, a2) = (w.clone(), adjusted.clone());
        let adjuster = tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_micros(300)).await;
                w2.fetch_add(8 * K, Ordering::SeqCst);
                a2.notify_one();
            }
        });
        assert_eq!(ready(&mut p, &w, 256 * K).await.0, 24 * K);
        adjuster.await.unwrap();
    }

    #[tokio::test]
    async fn a_window_that_stays_small_is_used_after_a_short_wait() {
        let adjusted = tokio::sync::Notify::new();
        let mut p = Pacer {
            adjusted: &adjusted,
            full: Some(24 * K),
        };
        let w = window(8 * K);
        let (n, took) = ready(&mut p, &w, 256 * K).await;
        assert_eq!(n, 8 * K);
        assert!(took >= FULL_PACKET_WAIT, "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // A shut window: a full packet is handed to russh, which waits for the window.
        w.store(0, Ordering::SeqCst);
        assert_eq!(ready(&mut p, &w, 256 * K).await.0, 24 * K);
    }

    #[tokio::test]
    async fn the_tail_and_large_windows_never_wait() {
        let adjusted = tokio::sync::Notify::new();
        // OpenSSH: 2 MiB window, 32 KiB packets: a full packet is always there.
        let mut p = Pacer {
            adjusted: &adjusted,
            full: None,
        };
        let w = window(32 * K);
        for _ in 0..3 {
            let (n, took) = ready(&mut p, &w, 256 * K).await;
            assert_eq!(n, 32 * K);
            assert!(took < FULL_PACKET_WAIT, "{took:?}");
        }
        // The last bytes of the input go as soon as they fit.
        let w = window(8 * K);
        let (n, took) = ready(&mut p, &w, 1000).await;
        assert_eq!(n, 1000);
        assert!(took < FULL_PACKET_WAIT, "{took:?}");
    }
}
