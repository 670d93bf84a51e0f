//! A transparent wrapper around the TCP stream that notes when the server's first bytes arrive
//! and what its SSH identification line says, without touching the protocol.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest pre-banner text we look through for the `SSH-` line (RFC 4253 allows other lines
/// before it; the identification line itself is at most 255 bytes).
const MAX_CAPTURE: usize = 8 * 1024;

/// What the probe saw; shared with the connect loop while the handshake runs.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// When the first byte from the server arrived.
    pub(crate) first_byte: OnceLock<Instant>,
    /// The server's identification line, e.g. `SSH-2.0-dropbear_2022.83`.
    pub(crate) server_id: OnceLock<String>,
}

/// `S` with reads observed by a [`Probe`] until the identification line has been seen.
pub(crate) struct Probed<S> {
    inner: S,
    probe: Arc<Probe>,
    /// Partial line under inspection; `None` once capture is over.
    pending: Option<Vec<u8>>,
}

impl<S> Probed<S> {
    pub(crate) fn new(inner: S, probe: Arc<Probe>) -> Self {
        Probed {
            inner,
            probe,
            pending: Some(Vec::new()),
        }
    }

    fn observe(&mut self, new: &[u8]) {
        let Some(pending) = self.pending.as_mut() else {
            return;
        };
        if new.is_empty() {
            return;
        }
        let _ = self.probe.first_byte.set(Instant::now());
        for &b in new {
            if b == b'\n' {
                if pending.starts_with(b"SSH-") {
                    let line = String::from_utf8_lossy(pending);
                    let _ = self
                        .probe
                        .server_id
                        .set(line.trim_end_matches('\r').to_string());
                    self.pending = None;
                    return;
                }
                pending.clear();
            } else {
                pending.push(b);
            }
            if pending.len() > MAX_CAPTURE {
                self.pending = None;
                return;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Probed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if this.pending.is_some() {
                let new = buf.filled().get(before..).unwrap_or_default().to_vec();
                this.observe(&new);
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Probed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn feed(chunks: &[&[u8]]) -> Arc<Probe> {
        let (mut tx, rx) = tokio::io::duplex(64);
        let probe = Arc::new(Probe::default());
        let mut probed = Probed::new(rx, probe.clone());
        let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in owned {
                tx.write_all(&c).await.unwrap();
                tx.flush().await.unwrap();
            }
        });
        let mut all = Vec::new();
        probed.read_to_end(&mut all).await.unwrap();
        writer.await.unwrap();
        // The wrapper must not alter the byte stream.
        assert_eq!(all, chunks.concat());
        probe
    }

    #[tokio::test]
    async fn captures_the_identification_line_split_across_reads() {
        let p = feed(&[b"SSH-2.0-Open", b"SSH_9.2\r", b"\nbinary\x00\x01"]).await;
        assert_eq!(
            p.server_id.get().map(String::as_str),
            Some("SSH-2.0-OpenSSH_9.2")
        );
        assert!(p.first_byte.get().is_some());
    }

    #[tokio::test]
    async fn skips_pre_banner_lines() {
        let p = feed(&[b"hello there\r\nSSH-2.0-dropbear_2022.83\r\n"]).await;
        assert_eq!(
            p.server_id.get().map(String::as_str),
            Some("SSH-2.0-dropbear_2022.83")
        );
    }

    #[tokio::test]
    async fn silent_peer_leaves_nothing() {
        let p = feed(&[]).await;
        assert!(p.first_byte.get().is_none());
        assert!(p.server_id.get().is_none());
    }
}
