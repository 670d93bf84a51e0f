//! Waiting for a guest's sshd: overlapping attempts on a short, growing schedule.
//!
//! # Schedule
//!
//! Attempt `n+1` starts `clamp(elapsed / 5, 20 ms, 1 s)` after attempt `n` started, where
//! `elapsed` is the time since the wait began. Early on that is a 20 ms poll; it grows
//! geometrically (×1.2 per attempt) and settles at one attempt a second. The time lost between
//! sshd becoming ready and our next attempt is therefore at most a fifth of the time already
//! waited, and never more than a second, which Packer's fixed 5 s polling cannot offer.
//!
//! # Overlap
//!
//! Under QEMU user networking the host side accepts every TCP connection at once and only then
//! tries the guest; while the guest's network is down such a connection hangs rather than being
//! refused (QEMU's SLIRP retries its SYN to the guest with a growing back-off, so a connection
//! opened before sshd listens may only get through seconds after it does). So a hung attempt
//! does not block the schedule: up to [`MAX_IN_FLIGHT`] attempts run at once, each bounded by the
//! banner and handshake timeouts, and the first to authenticate wins (the others are dropped).
//! When a start is due and all slots are taken, the oldest attempt that has not seen a banner
//! (and is at least [`DROP_AGE`] old) is dropped to make room, so a fresh connection reaches the guest at least once a second
//! (`cargo xtask bench` measured ~1.7 s of lag after sshd listened without this). No new attempt
//! starts while one is past the banner, so a live server is not flooded.
//!
//! # Answering guest
//!
//! An attempt that the far side closes (or refuses) before any banner means the guest's network
//! stack is up and only sshd is missing: through QEMU user networking that is the guest's TCP
//! RST coming back, within milliseconds. sshd is then usually moments away, so for
//! [`FAST_WINDOW`] after such an answer attempts start at least every [`FAST_POLL`] instead of
//! the growing schedule (one short-lived connection per poll, closed by the guest at once;
//! `cargo xtask bench` measured up to a second of lag with the growing schedule alone). After
//! the window the growing schedule resumes, so a host that keeps refusing for minutes is not
//! polled at this rate all along.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::probe::{Probe, Probed};
use super::{ConnectConfig, HostKeyPolicy};
use crate::communicator::{ConnectReport, HostKeyFingerprint, Interrupt};
use crate::error::{AttemptFailure, ConnectError};

/// The first retry delay.
pub(crate) const MIN_DELAY: Duration = Duration::from_millis(20);
/// The longest retry delay.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(1);
/// The poll interval while the guest answers but sshd does not listen yet (see the module docs).
pub(crate) const FAST_POLL: Duration = Duration::from_millis(50);
/// A banner-less attempt younger than this is never dropped to make room (see the module
/// docs): under load a TCG guest's sshd can take hundreds of milliseconds to greet a connection
/// it has accepted, and dropping such attempts every [`FAST_POLL`] would never let one finish
/// (`cargo xtask bench` saw 17 s of lag that way). Past the first seconds the growing schedule
/// lets each attempt live about four retry delays anyway. dropbear also refuses more than 5
/// unauthenticated connections from one address (all of QEMU user networking's come from one).
pub(crate) const DROP_AGE: Duration = Duration::from_secs(2);
/// How long the [`FAST_POLL`] rate lasts after the first banner-less close or refusal.
pub(crate) const FAST_WINDOW: Duration = Duration::from_secs(30);
/// After an authentication rejection, wait at least this long before trying again.
const AUTH_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Attempts allowed to run at once (see the module docs).
pub(crate) const MAX_IN_FLIGHT: usize = 4;

/// Delay between attempt starts after `elapsed` of waiting.
pub(crate) fn retry_delay(elapsed: Duration) -> Duration {
    (elapsed / 5).clamp(MIN_DELAY, MAX_DELAY)
}

/// Delay between attempt starts after `elapsed` of waiting, where the guest first answered
/// (closed or refused a banner-less attempt) at `answering` (as time since the wait began).
pub(crate) fn next_delay(elapsed: Duration, answering: Option<Duration>) -> Duration {
    let d = retry_delay(elapsed);
    match answering {
        Some(a) if elapsed.saturating_sub(a) < FAST_WINDOW => d.min(FAST_POLL),
        _ => d,
    }
}

/// State shared between a live session's handler (inside russh's task) and the communicator.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Why the session ended, once it has.
    pub(crate) disconnect: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn reason(&self) -> Option<String> {
        self.disconnect.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

/// Our russh client handler: host key policy and disconnect bookkeeping.
pub(crate) struct Client {
    expected: Option<HostKeyFingerprint>,
    seen: Arc<Mutex<Option<HostKeyFingerprint>>>,
    shared: Arc<Shared>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let fp = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => crate::keys::fingerprint(key),
            PublicKeyOrCertificate::Certificate(cert) => {
                HostKeyFingerprint(cert.public_key().fingerprint(HashAlg::Sha256).to_string())
            }
        };
        let ok = self.expected.as_ref().is_none_or(|e| *e == fp);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fp);
        }
        Ok(ok)
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                format!(
                    "the server disconnected ({:?}: {})",
                    info.reason_code, info.message
                )
            }
            client::DisconnectReason::Error(russh::Error::KeepaliveTimeout) => {
                "the guest stopped answering keepalives".to_string()
            }
            client::DisconnectReason::Error(e) => e.to_string(),
        };
        if let Ok(mut slot) = self.shared.disconnect.lock() {
            slot.get_or_insert(text);
        }
        match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// An authenticated session.
pub(crate) struct Established {
    pub(crate) handle: client::Handle<Client>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tcp_connected: Instant,
    pub(crate) banner: Option<Instant>,
    pub(crate) authenticated: Instant,
    pub(crate) server_id: Option<String>,
    pub(crate) host_key: Option<HostKeyFingerprint>,
}

/// A failed attempt.
struct Failed {
    failure: AttemptFailure,
    tcp_connected: Option<Instant>,
    /// The server's key did not match the pin: (expected, actual).
    mismatch: Option<(HostKeyFingerprint, HostKeyFingerprint)>,
    fatal: bool,
}

impl Failed {
    fn retry(failure: AttemptFailure, tcp_connected: Option<Instant>) -> Self {
        Failed {
            failure,
            tcp_connected,
            mismatch: None,
            fatal: false,
        }
    }
}

/// Everything one attempt needs, shared by all attempts of a wait.
struct AttemptCfg {
    config: ConnectConfig,
    russh: Arc<client::Config>,
    expected: Option<HostKeyFingerprint>,
}

pub(crate) fn russh_config(config: &ConnectConfig) -> client::Config {
    let mut c = client::Config {
        nodelay: true,
        ..Default::default()
    };
    if let Some(k) = &config.keepalive {
        c.keepalive_interval = Some(k.interval);
        c.keepalive_max = k.max;
        // russh only counts keepalives while it is waiting to read; a write blocked on a full
        // socket buffer (guest frozen mid-upload) is bounded by the inactivity timeout instead.
        // Any traffic, keepalive replies included, resets it, so a healthy idle session never
        // trips it.
        let misses = u32::try_from(k.max).unwrap_or(u32::MAX).saturating_add(2);
        c.inactivity_timeout = Some(k.interval.saturating_mul(misses));
    }
    c
}

async fn attempt(cfg: Arc<AttemptCfg>, probe: Arc<Probe>) -> Result<Established, Failed> {
    let addr = cfg.config.addr;
    let tcp = TcpStream::connect(addr).await.map_err(|e| {
        let failure = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            AttemptFailure::Refused
        } else {
            AttemptFailure::Tcp(e)
        };
        Failed::retry(failure, None)
    })?;
    let tcp_connected = Instant::now();
    let _ = tcp.set_nodelay(true);

    let shared = Arc::new(Shared::default());
    let seen = Arc::new(Mutex::new(None));
    let handler = Client {
        expected: cfg.expected.clone(),
        seen: seen.clone(),
        shared: shared.clone(),
    };
    let stream = Probed::new(tcp, probe.clone());
    let key: Arc<PrivateKey> = cfg.config.key.clone();
    let user = cfg.config.user.clone();
    let russh_cfg = cfg.russh.clone();

    let handshake = async move {
        let mut handle = client::connect_stream(russh_cfg, stream, handler).await?;
        let hash = if key.algorithm().is_rsa() {
            handle.best_supported_rsa_hash().await?.flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
            .await?;
        Ok::<_, russh::Error>((handle, auth))
    };
    let banner_timeout = cfg.config.banner_timeout;
    let handshake_timeout = cfg.config.handshake_timeout;
    let timer_probe = probe.clone();
    let timer = async move {
        tokio::time::sleep(banner_timeout).await;
        if timer_probe.first_byte.get().is_none() {
            return AttemptFailure::BannerTimeout(banner_timeout);
        }
        tokio::time::sleep(handshake_timeout).await;
        AttemptFailure::HandshakeTimeout(handshake_timeout)
    };

    let result = tokio::select! {
        r = handshake => r,
        failure = timer => return Err(Failed::retry(failure, Some(tcp_connected))),
    };
    let seen = seen.lock().ok().and_then(|g| g.clone());
    match result {
        Ok((handle, auth)) => match auth {
            client::AuthResult::Success => Ok(Established {
                handle,
                shared,
                tcp_connected,
                banner: probe.first_byte.get().copied(),
                authenticated: Instant::now(),
                server_id: probe.server_id.get().cloned(),
                host_key: seen,
            }),
            client::AuthResult::Failure {
                remaining_methods, ..
            } => {
                let remaining = remaining_methods
                    .iter()
                    .map(<&'static str>::from)
                    .collect::<Vec<_>>()
                    .join(",");
                Err(Failed::retry(
                    AttemptFailure::AuthRejected { remaining },
                    Some(tcp_connected),
                ))
            }
        },
        Err(e) => {
            if let (Some(expected), Some(actual)) = (cfg.expected.clone(), seen) {
                if expected != actual {
                    return Err(Failed {
                        failure: AttemptFailure::Protocol(e.to_string()),
                        tcp_connected: Some(tcp_connected),
                        mismatch: Some((expected, actual)),
                        fatal: true,
                    });
                }
            }
            Err(classify(e, tcp_connected))
        }
    }
}

fn classify(e: russh::Error, tcp_connected: Instant) -> Failed {
    use std::io::ErrorKind;
    let (failure, fatal) = match e {
        russh::Error::IO(io)
            if matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            ) =>
        {
            (AttemptFailure::ClosedEarly(io.to_string()), false)
        }
        russh::Error::Disconnect | russh::Error::HUP => {
            (AttemptFailure::ClosedEarly("disconnected".into()), false)
        }
        e @ russh::Error::NoCommonAlgo { .. } => (AttemptFailure::Protocol(e.to_string()), true),
        e => (AttemptFailure::Protocol(e.to_string()), false),
    };
    Failed {
        failure,
        tcp_connected: Some(tcp_connected),
        mismatch: None,
        fatal,
    }
}

/// Wait until the server at `config.addr` accepts our key, or until the deadline, a fatal
/// error, or `interrupt`.
pub(crate) async fn establish(
    config: &ConnectConfig,
    interrupt: impl Future<Output = Interrupt> + Send,
) -> Result<(Established, ConnectReport), ConnectError> {
    let started = Instant::now();
    let deadline = started + config.timeout;
    let expected = match &config.host_key {
        HostKeyPolicy::TrustOnFirstUse => None,
        HostKeyPolicy::Pinned(fp) => Some(fp.clone()),
    };
    let cfg = Arc::new(AttemptCfg {
        config: config.clone(),
        russh: Arc::new(russh_config(config)),
        expected,
    });
    let addr = config.addr.to_string();
    let user = config.user.clone();

    let mut set: JoinSet<Result<Established, Failed>> = JoinSet::new();
    let mut probes: HashMap<tokio::task::Id, Arc<Probe>> = HashMap::new();
    // In-flight attempts in start order, to drop the oldest banner-less one when slots run out.
    let mut started_order: Vec<(tokio::task::Id, tokio::task::AbortHandle, Instant)> = Vec::new();
    let mut attempts: u32 = 0;
    let mut last: Option<AttemptFailure> = None;
    let mut first_tcp: Option<Instant> = None;
    let mut first_auth_reject: Option<Instant> = None;
    let mut auth_attempts: u32 = 0;
    let mut next_launch = started;
    // When (since `started`) an attempt was first closed or refused before any banner.
    let mut answering: Option<Duration> = None;

    tokio::pin!(interrupt);
    let deadline_sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(deadline_sleep);

    loop {
        let room = set.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            why = &mut interrupt => {
                let elapsed = started.elapsed();
                return Err(match why {
                    Interrupt::Cancelled => ConnectError::Cancelled { addr, user, elapsed },
                    Interrupt::Aborted(reason) => ConnectError::Aborted { addr, user, elapsed, reason },
                });
            }
            () = &mut deadline_sleep => {
                let in_progress = if probes.values().any(|p| p.first_byte.get().is_some()) {
                    AttemptFailure::HandshakeTimeout(started.elapsed())
                } else {
                    AttemptFailure::BannerTimeout(started.elapsed())
                };
                return Err(ConnectError::Timeout {
                    addr,
                    user,
                    attempts,
                    elapsed: started.elapsed(),
                    last: last.unwrap_or(in_progress),
                });
            }
            Some(joined) = set.join_next_with_id(), if !set.is_empty() => {
                let (id, result) = match joined {
                    Ok((id, r)) => (id, r),
                    Err(e) => {
                        probes.remove(&e.id());
                        started_order.retain(|(i, _, _)| *i != e.id());
                        if !e.is_cancelled() {
                            last = Some(AttemptFailure::Protocol(format!("connection attempt failed: {e}")));
                        }
                        continue;
                    }
                };
                let banner_seen = probes.remove(&id).is_some_and(|p| p.first_byte.get().is_some());
                started_order.retain(|(i, _, _)| *i != id);
                match result {
                    Ok(est) => {
                        let report = ConnectReport {
                            started,
                            first_tcp_connect: first_tcp.or(Some(est.tcp_connected)),
                            tcp_connected: est.tcp_connected,
                            banner: est.banner,
                            authenticated: est.authenticated,
                            attempts,
                            server_id: est.server_id.clone(),
                            host_key: est.host_key.clone(),
                        };
                        // Dropping `set` aborts the attempts still running.
                        return Ok((est, report));
                    }
                    Err(failed) => {
                        if let Some(t) = failed.tcp_connected {
                            first_tcp = Some(first_tcp.map_or(t, |f| f.min(t)));
                        }
                        if !banner_seen
                            && matches!(failed.failure, AttemptFailure::Refused | AttemptFailure::ClosedEarly(_))
                        {
                            let now = Instant::now();
                            let since = now - started;
                            if answering.is_none() {
                                answering = Some(since);
                            }
                            next_launch = next_launch.min(now + next_delay(since, answering));
                        }
                        if let Some((expected, actual)) = failed.mismatch {
                            return Err(ConnectError::HostKeyMismatch { addr, expected, actual });
                        }
                        if failed.fatal {
                            return Err(ConnectError::Fatal { addr, user, failure: failed.failure });
                        }
                        if let AttemptFailure::AuthRejected { remaining } = &failed.failure {
                            auth_attempts += 1;
                            let first = *first_auth_reject.get_or_insert_with(Instant::now);
                            if first.elapsed() >= config.auth_grace {
                                return Err(ConnectError::AuthRejected {
                                    addr,
                                    user,
                                    key_type: config.key.algorithm().to_string(),
                                    attempts: auth_attempts,
                                    elapsed: first.elapsed(),
                                    remaining: remaining.clone(),
                                });
                            }
                            next_launch = next_launch.max(Instant::now() + AUTH_RETRY_DELAY);
                        }
                        last = Some(failed.failure);
                    }
                }
            }
            () = tokio::time::sleep_until(next_launch.into()) => {
                let now = Instant::now();
                next_launch = now + next_delay(now - started, answering);
                // A server that has sent its banner is alive; let that attempt finish.
                if probes.values().any(|p| p.first_byte.get().is_some()) {
                    continue;
                }
                if !room {
                    // Every slot holds an attempt without a banner: drop the oldest (stuck in
                    // SLIRP's SYN back-off) so a fresh connection reaches the guest now.
                    // Only one that has waited DROP_AGE: a younger one may be a connection the
                    // guest's sshd has accepted and is about to greet (slowly, under load).
                    if let Some(pos) = started_order.iter().position(|(id, _, at)| {
                        now.duration_since(*at) >= DROP_AGE
                            && probes.get(id).is_some_and(|p| p.first_byte.get().is_none())
                    }) {
                        let (id, handle, _) = started_order.remove(pos);
                        handle.abort();
                        probes.remove(&id);
                    } else {
                        continue;
                    }
                }
                let probe = Arc::new(Probe::default());
                let handle = set.spawn(attempt(cfg.clone(), probe.clone()));
                probes.insert(handle.id(), probe);
                started_order.push((handle.id(), handle, now));
                attempts += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_starts_at_tens_of_ms_and_caps_at_a_second() {
        assert_eq!(retry_delay(Duration::ZERO), MIN_DELAY);
        assert_eq!(retry_delay(Duration::from_millis(50)), MIN_DELAY);
        assert_eq!(
            retry_delay(Duration::from_millis(300)),
            Duration::from_millis(60)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(3)),
            Duration::from_millis(600)
        );
        assert_eq!(retry_delay(Duration::from_secs(1200)), MAX_DELAY);
    }

    #[test]
    fn an_answering_guest_is_polled_fast_for_a_while() {
        let s = Duration::from_secs;
        // Not answering yet: the growing schedule.
        assert_eq!(next_delay(s(10), None), MAX_DELAY);
        // Answering since 8 s: the fast poll, but never slower than the schedule.
        assert_eq!(next_delay(s(10), Some(s(8))), FAST_POLL);
        assert_eq!(next_delay(Duration::ZERO, Some(Duration::ZERO)), MIN_DELAY);
        // The window is over: back to the schedule.
        assert_eq!(next_delay(s(8) + FAST_WINDOW, Some(s(8))), MAX_DELAY);
    }

    #[test]
    fn schedule_is_geometric_then_flat() {
        // Simulate instant failures: count attempts in the first second and in a 20-minute wait.
        let count = |limit: Duration| {
            let mut t = Duration::ZERO;
            let mut n = 0u32;
            while t < limit {
                n += 1;
                t += retry_delay(t);
            }
            n
        };
        let first_second = count(Duration::from_secs(1));
        assert!(
            (15..=30).contains(&first_second),
            "{first_second} attempts in the first second"
        );
        let twenty_minutes = count(Duration::from_secs(1200));
        assert!(
            twenty_minutes < 1230,
            "{twenty_minutes} attempts in 20 minutes"
        );
    }

    #[test]
    fn keepalive_sets_an_inactivity_backstop() {
        let key = crate::keys::generate_ed25519("t").unwrap().private;
        let mut cfg = ConnectConfig::new("127.0.0.1:22".parse().unwrap(), "root", key);
        cfg.keepalive = Some(super::super::Keepalive {
            interval: Duration::from_secs(5),
            max: 3,
        });
        let r = russh_config(&cfg);
        assert_eq!(r.keepalive_interval, Some(Duration::from_secs(5)));
        assert_eq!(r.keepalive_max, 3);
        assert_eq!(r.inactivity_timeout, Some(Duration::from_secs(25)));
        cfg.keepalive = None;
        let r = russh_config(&cfg);
        assert_eq!(r.keepalive_interval, None);
        assert_eq!(r.inactivity_timeout, None);
    }
}
