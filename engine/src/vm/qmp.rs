//! A QMP (QEMU Machine Protocol) client.
//!
//! QMP is line-delimited JSON. On connect QEMU sends a greeting (`{"QMP": {...}}`); the
//! client answers `qmp_capabilities`; then every command (`{"execute": ..., "id": n}`)
//! gets exactly one reply carrying the same `id` (`{"return": ...}` or `{"error": ...}`),
//! and asynchronous events (`{"event": ..., "data": ..., "timestamp": ...}`) may arrive
//! at any time, also between a command and its reply.
//!
//! [`Qmp`] owns a reader task that routes replies to the waiting [`Qmp::execute`] call by
//! `id` and broadcasts events to every [`Qmp::events`] receiver. Commands can be issued
//! concurrently. When the connection ends (QEMU exited), pending and later commands fail
//! with [`QmpError::Disconnected`] and event receivers see the channel close.

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// How many events a slow [`Qmp::events`] receiver may fall behind before it loses some.
const EVENT_CAPACITY: usize = 1024;

/// The longest line kiln accepts from QEMU (a `query-*` reply is a few KiB).
const MAX_LINE: usize = 16 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading from or writing to the socket failed: {0}
    #[error("QMP socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The connection ended (QEMU exited or closed the monitor).
    #[error("the QMP connection closed (QEMU exited?)")]
    Disconnected,
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("QEMU rejected `{command}`: {desc} ({class})")]
    Command {
        /// the command that failed
        command: String,
        /// QMP's error class, e.g. `GenericError`, `CommandNotFound`
        class: String,
        /// QEMU's description
        desc: String,
    },
}

/// QEMU's version from the QMP greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    /// major, e.g. 10
    pub major: u64,
    /// minor
    pub minor: u64,
    /// micro
    pub micro: u64,
    /// the distribution's package string, e.g. `Debian 1:10.0.2+ds-2`
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// the event name as QEMU sent it, e.g. `SHUTDOWN`
    pub name: String,
    /// the typed reading of the events kiln acts on
    pub kind: EventKind,
    /// the event's `data` object (`Null` when absent)
    pub data: Value,
    /// when QEMU emitted it (QEMU's host clock), if given
    pub timestamp: Option<SystemTime>,
}

/// The events kiln acts on; everything else is [`EventKind::Other`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The VM shut down (QEMU exits next unless run with `-no-shutdown`).
    Shutdown {
        /// true when the guest asked for it (ACPI poweroff, `poweroff` inside the guest)
        guest: bool,
        /// QEMU's reason, e.g. `guest-shutdown`, `host-qmp-quit`, `host-signal`
        reason: String,
    },
    /// The VM was reset (a guest reboot, or `system_reset`).
    Reset {
        /// true when the guest asked for it
        guest: bool,
        /// QEMU's reason, e.g. `guest-reset`
        reason: String,
    },
    /// An ACPI power-button press was delivered (`system_powerdown`).
    Powerdown,
    /// The VM stopped running (paused: by a command, an I/O error policy, or a KVM error).
    Stop,
    /// The VM runs again after a [`EventKind::Stop`].
    Resume,
    /// A disk I/O error; with QEMU's default policy an ENOSPC pauses the VM.
    BlockIoError {
        /// the block device (`qdev` or `device` field)
        device: String,
        /// `read` or `write`
        operation: String,
        /// what QEMU did: `report`, `ignore` or `stop`
        action: String,
        /// true when the host file system is full
        nospace: bool,
        /// QEMU's description of the error
        reason: String,
    },
    /// The guest reported a panic (pvpanic / Hyper-V crash MSRs).
    GuestPanicked,
    /// Any other event (see `name` and `data`).
    Other,
}

impl QmpEvent {
    /// Reads an event object (`{"event": ..., "data": ..., "timestamp": ...}`).
    fn from_json(obj: &Map<String, Value>) -> Option<QmpEvent> {
        let name = obj.get("event")?.as_str()?.to_string();
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        let s = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let b = |k: &str| data.get(k).and_then(Value::as_bool).unwrap_or(false);
        let kind = match name.as_str() {
            "SHUTDOWN" => EventKind::Shutdown {
                guest: b("guest"),
                reason: s("reason"),
            },
            "RESET" => EventKind::Reset {
                guest: b("guest"),
                reason: s("reason"),
            },
            "POWERDOWN" => EventKind::Powerdown,
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "GUEST_PANICKED" => EventKind::GuestPanicked,
            "BLOCK_IO_ERROR" => EventKind::BlockIoError {
                device: if s("qom-path").is_empty() {
                    s("device")
                } else {
                    s("qom-path")
                },
                operation: s("operation"),
                action: s("action"),
                nospace: b("nospace"),
                reason: s("reason"),
            },
            _ => EventKind::Other,
        };
        let timestamp = obj.get("timestamp").and_then(|t| {
            let secs = t.get("seconds")?.as_u64()?;
            let micros = t.get("microseconds")?.as_u64()?;
            UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
        });
        Some(QmpEvent {
            name,
            kind,
            data,
            timestamp,
        })
    }
}

type Reply = Result<Value, QmpError>;

struct Shared {
    /// Replies awaited by id; `None` once the connection ended.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    /// `None` once the connection ended (receivers then see `Closed`).
    events: Mutex<Option<broadcast::Sender<QmpEvent>>>,
    /// Subscribed before capabilities negotiation; handed to the first `events()` call.
    first: Mutex<Option<broadcast::Receiver<QmpEvent>>>,
}

impl Shared {
    fn close(&self) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for (_, tx) in pending.into_iter().flatten() {
            let _ = tx.send(Err(QmpError::Disconnected));
        }
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected, negotiated QMP session. Dropping it stops its reader task.
pub struct Qmp {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Writer>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Reads the greeting from `stream`, starts the reader task and negotiates
    /// capabilities (`qmp_capabilities`). QEMU sends events from the negotiation on; the
    /// first [`Qmp::events`] receiver was subscribed before it, so it misses none.
    ///
    /// Must be called within a tokio runtime. Has no timeout of its own: wrap it in
    /// `tokio::time::timeout`.
    pub async fn handshake<S>(stream: S) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read);
        let greeting = loop {
            let line = read_line(&mut lines).await?.ok_or(QmpError::Disconnected)?;
            if line.trim().is_empty() {
                continue;
            }
            break parse_object(&line)?;
        };
        let version = parse_greeting(&greeting)?;
        let (events, first) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            events: Mutex::new(Some(events)),
            first: Mutex::new(Some(first)),
        });
        let reader = tokio::spawn(read_loop(lines, shared.clone()));
        let qmp = Qmp {
            shared,
            writer: tokio::sync::Mutex::new(Box::new(write)),
            next_id: AtomicU64::new(1),
            version,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version as announced in the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// A receiver of every event from now on (the first call: from the capabilities
    /// negotiation on). After the connection ends it reports `RecvError::Closed`, once
    /// the events before that are read.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        if let Some(first) = self
            .shared
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return first;
        }
        match self
            .shared
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            Some(tx) => tx.subscribe(),
            // a receiver whose sender is already gone: reports Closed at once
            None => broadcast::channel(1).1,
        }
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns its `return`
    /// value. Cancel-safe: dropping the future forgets the reply.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            pending
                .as_mut()
                .ok_or(QmpError::Disconnected)?
                .insert(id, tx);
        }
        let _forget = ForgetOnDrop {
            shared: &self.shared,
            id,
        };
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            let written = async {
                w.write_all(line.as_bytes()).await?;
                w.flush().await
            }
            .await;
            if let Err(e) = written {
                // a closed socket is the common case: QEMU is gone
                return Err(if self.is_closed() || is_disconnect(&e) {
                    QmpError::Disconnected
                } else {
                    QmpError::Io(e)
                });
            }
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Disconnected),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close();
    }
}

/// Removes a pending reply slot when `execute` is cancelled.
struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            p.remove(&self.id);
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected | UnexpectedEof
    )
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Option<String>, QmpError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await.map_err(|e| {
            if is_disconnect(&e) {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            }
        })?;
        if chunk.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Protocol(
                    "the connection ended in the middle of a line".into(),
                ))
            };
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&chunk[..=i]);
                r.consume(i + 1);
                break;
            }
            None => {
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                r.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| QmpError::Protocol("a line that is not UTF-8".into()))
}

fn parse_object(line: &str) -> Result<Map<String, Value>, QmpError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(QmpError::Protocol(format!(
            "expected a JSON object, got {}",
            line.trim()
        ))),
        Err(e) => Err(QmpError::Protocol(format!(
            "invalid JSON ({e}): {}",
            line.trim()
        ))),
    }
}

fn parse_greeting(obj: &Map<String, Value>) -> Result<QemuVersion, QmpError> {
    let qmp = obj.get("QMP").ok_or_else(|| {
        QmpError::Protocol(format!(
            "expected the QMP greeting, got {}",
            Value::Object(obj.clone())
        ))
    })?;
    let v = &qmp["version"];
    let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
    Ok(QemuVersion {
        major: n("major"),
        minor: n("minor"),
        micro: n("micro"),
        package: v["package"].as_str().unwrap_or_default().trim().to_string(),
    })
}

async fn read_loop<R: AsyncRead + Unpin>(mut lines: BufReader<R>, shared: Arc<Shared>) {
    loop {
        let line = match read_line(&mut lines).await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => break,
        };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(obj) = parse_object(&line) else {
            // QEMU only ever sends JSON objects; skip anything else rather than give up
            continue;
        };
        if obj.contains_key("event") {
            if let Some(ev) = QmpEvent::from_json(&obj) {
                if let Some(tx) = shared
                    .events
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                {
                    // no receivers is fine
                    let _ = tx.send(ev);
                }
            }
            continue;
        }
        let Some(id) = obj.get("id").and_then(Value::as_u64) else {
            // a reply without our id (kiln always sends one): nobody waits for it
            continue;
        };
        let reply = if let Some(ret) = obj.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = obj.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("Unknown").to_string(),
                desc: err["desc"].as_str().unwrap_or_default().to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "a reply with neither `return` nor `error`: {}",
                line.trim()
            )))
        };
        let tx = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(|p| p.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }
    shared.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;
    use tokio::sync::broadcast::error::RecvError;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU monitor: the test drives it line by line.
    struct Fake {
        r: BufReader<tokio::net::unix::OwnedReadHalf>,
        w: tokio::net::unix::OwnedWriteHalf,
    }

    impl Fake {
        async fn send(&mut self, line: &str) {
            self.w
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .unwrap();
        }
        /// Reads the next command and returns (execute, id, arguments).
        async fn recv(&mut self) -> (String, Value, Value) {
            let mut line = String::new();
            self.r.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            (
                v["execute"].as_str().unwrap().to_string(),
                v["id"].clone(),
                v["arguments"].clone(),
            )
        }
        async fn reply(&mut self, id: &Value, ret: Value) {
            self.send(&json!({"return": ret, "id": id}).to_string())
                .await;
        }
    }

    fn event(name: &str, data: Value) -> String {
        json!({"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": name, "data": data}).to_string()
    }

    /// A negotiated client and the fake server behind it.
    async fn connect() -> (Qmp, Fake) {
        let (client, server) = UnixStream::pair().unwrap();
        let (r, w) = server.into_split();
        let mut fake = Fake {
            r: BufReader::new(r),
            w,
        };
        let server = tokio::spawn(async move {
            fake.send(GREETING).await;
            let (cmd, id, _) = fake.recv().await;
            assert_eq!(cmd, "qmp_capabilities");
            fake.reply(&id, json!({})).await;
            fake
        });
        let qmp = Qmp::handshake(client).await.unwrap();
        (qmp, server.await.unwrap())
    }

    #[tokio::test]
    async fn greeting_gives_the_version() {
        let (qmp, _fake) = connect().await;
        assert_eq!(
            qmp.version(),
            &QemuVersion {
                major: 10,
                minor: 0,
                micro: 2,
                package: "Debian 1:10.0.2+ds-2".into()
            }
        );
        assert_eq!(qmp.version().to_string(), "10.0.2 (Debian 1:10.0.2+ds-2)");
    }

    #[tokio::test]
    async fn events_between_a_command_and_its_reply_are_delivered_in_order() {
        let (qmp, mut fake) = connect().await;
        let mut events = qmp.events();
        let server = tokio::spawn(async move {
            let (cmd, id, args) = fake.recv().await;
            assert_eq!(cmd, "query-status");
            assert_eq!(args, Value::Null, "no `arguments` key when there are none");
            fake.send(&event(
                "RESET",
                json!({"guest": true, "reason": "guest-reset"}),
            ))
            .await;
            fake.send(&event("STOP", Value::Null)).await;
            fake.reply(&id, json!({"status": "running", "running": true}))
                .await;
            fake.send(&event(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            ))
            .await;
            fake
        });
        let ret = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(ret["status"], "running");
        let _fake = server.await.unwrap();
        let e1 = events.recv().await.unwrap();
        assert_eq!(
            e1.kind,
            EventKind::Reset {
                guest: true,
                reason: "guest-reset".into()
            }
        );
        assert_eq!(
            e1.timestamp,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_250))
        );
        assert_eq!(events.recv().await.unwrap().kind, EventKind::Stop);
        assert_eq!(
            events.recv().await.unwrap().kind,
            EventKind::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
    }

    #[tokio::test]
    async fn events_right_after_negotiation_reach_the_first_receiver() {
        let (client, server) = UnixStream::pair().unwrap();
        let (r, w) = server.into_split();
        let mut fake = Fake {
            r: BufReader::new(r),
            w,
        };
        let server = tokio::spawn(async move {
            fake.send(GREETING).await;
            let (_, id, _) = fake.recv().await;
            fake.reply(&id, json!({})).await;
            // a guest that reboots at once: the event follows the reply immediately
            fake.send(&event(
                "RESET",
                json!({"guest": true, "reason": "guest-reset"}),
            ))
            .await;
            fake
        });
        let qmp = Qmp::handshake(client).await.unwrap();
        let _fake = server.await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await; // the reader has broadcast it by now
        let mut first = qmp.events();
        assert!(matches!(
            first.recv().await.unwrap().kind,
            EventKind::Reset { .. }
        ));
        // later receivers start from now
        let mut later = qmp.events();
        assert!(matches!(
            later.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn concurrent_commands_get_their_own_replies_out_of_order() {
        let (qmp, mut fake) = connect().await;
        let server = tokio::spawn(async move {
            let (c1, id1, a1) = fake.recv().await;
            let (c2, id2, a2) = fake.recv().await;
            // answer in reverse order, each echoing its argument
            fake.reply(&id2, json!({"cmd": c2, "x": a2["x"]})).await;
            fake.reply(&id1, json!({"cmd": c1, "x": a1["x"]})).await;
            fake
        });
        let (r1, r2) = tokio::join!(
            qmp.execute("human-monitor-command", Some(json!({"x": 1}))),
            qmp.execute("query-block", Some(json!({"x": 2}))),
        );
        let _fake = server.await.unwrap();
        assert_eq!(r1.unwrap(), json!({"cmd": "human-monitor-command", "x": 1}));
        assert_eq!(r2.unwrap(), json!({"cmd": "query-block", "x": 2}));
    }

    #[tokio::test]
    async fn error_replies_name_the_command() {
        let (qmp, mut fake) = connect().await;
        let server = tokio::spawn(async move {
            let (_, id, _) = fake.recv().await;
            fake.send(&json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": id}).to_string())
                .await;
            fake
        });
        let err = qmp.execute("nope", None).await.unwrap_err();
        let _fake = server.await.unwrap();
        match &err {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(
                    (command.as_str(), class.as_str()),
                    ("nope", "CommandNotFound")
                );
                assert!(desc.contains("has not been found"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "QEMU rejected `nope`: The command nope has not been found (CommandNotFound)"
        );
    }

    #[tokio::test]
    async fn disconnect_fails_pending_and_later_commands_and_closes_events() {
        let (qmp, mut fake) = connect().await;
        let mut events = qmp.events();
        let server = tokio::spawn(async move {
            let _ = fake.recv().await;
            fake.send(&event(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            ))
            .await;
            drop(fake); // QEMU exits without replying
        });
        assert!(matches!(
            qmp.execute("quit", None).await,
            Err(QmpError::Disconnected)
        ));
        server.await.unwrap();
        assert!(matches!(
            events.recv().await.unwrap().kind,
            EventKind::Shutdown { .. }
        ));
        assert!(matches!(events.recv().await, Err(RecvError::Closed)));
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(QmpError::Disconnected)
        ));
        assert!(matches!(qmp.events().recv().await, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn a_reply_split_across_writes_and_blank_lines_are_handled() {
        let (qmp, mut fake) = connect().await;
        let server = tokio::spawn(async move {
            let (_, id, _) = fake.recv().await;
            let reply = json!({"return": {"big": "x".repeat(100_000)}, "id": id}).to_string();
            let (a, b) = reply.split_at(5000);
            fake.w.write_all(b"\r\n").await.unwrap();
            fake.w.write_all(a.as_bytes()).await.unwrap();
            fake.w.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            fake.w.write_all(format!("{b}\n").as_bytes()).await.unwrap();
            fake
        });
        let ret = qmp.execute("query-big", None).await.unwrap();
        let _fake = server.await.unwrap();
        assert_eq!(ret["big"].as_str().unwrap().len(), 100_000);
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qmp_is_a_protocol_error() {
        for first in ["SSH-2.0-OpenSSH_9.2", r#"{"hello": 1}"#, "[1,2]"] {
            let (client, mut server) = UnixStream::pair().unwrap();
            server
                .write_all(format!("{first}\n").as_bytes())
                .await
                .unwrap();
            let err = Qmp::handshake(client).await.unwrap_err();
            assert!(matches!(err, QmpError::Protocol(_)), "{first}: {err:?}");
        }
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        assert!(matches!(
            Qmp::handshake(client).await.unwrap_err(),
            QmpError::Disconnected
        ));
    }

    #[tokio::test]
    async fn a_cancelled_command_does_not_disturb_the_next() {
        let (qmp, mut fake) = connect().await;
        let first =
            tokio::time::timeout(Duration::from_millis(50), qmp.execute("slow", None)).await;
        assert!(first.is_err(), "the fake never answers `slow`");
        let (cmd, id_slow, _) = fake.recv().await;
        assert_eq!(cmd, "slow");
        let server = tokio::spawn(async move {
            let (_, id, _) = fake.recv().await;
            // the late reply to the cancelled command comes first and must be dropped
            fake.reply(&id_slow, json!("late")).await;
            fake.reply(&id, json!("fresh")).await;
            fake
        });
        assert_eq!(qmp.execute("fast", None).await.unwrap(), json!("fresh"));
        let _fake = server.await.unwrap();
        assert!(qmp
            .shared
            .pending
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn event_kinds_are_read_from_data() {
        let cases = [
            (event("POWERDOWN", Value::Null), EventKind::Powerdown),
            (event("RESUME", Value::Null), EventKind::Resume),
            (
                event("GUEST_PANICKED", json!({"action": "pause"})),
                EventKind::GuestPanicked,
            ),
            (
                event("NIC_RX_FILTER_CHANGED", json!({"path": "/x"})),
                EventKind::Other,
            ),
            (
                event(
                    "BLOCK_IO_ERROR",
                    json!({"device": "", "qom-path": "/machine/peripheral-anon/device[0]/virtio-backend", "operation": "write", "action": "stop", "nospace": true, "reason": "No space left on device"}),
                ),
                EventKind::BlockIoError {
                    device: "/machine/peripheral-anon/device[0]/virtio-backend".into(),
                    operation: "write".into(),
                    action: "stop".into(),
                    nospace: true,
                    reason: "No space left on device".into(),
                },
            ),
        ];
        for (line, want) in cases {
            let obj = parse_object(&line).unwrap();
            assert_eq!(QmpEvent::from_json(&obj).unwrap().kind, want, "{line}");
        }
    }
}
