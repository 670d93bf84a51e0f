//! A deliberately small HTTP/1.1 server side for the fabric: one request per connection,
//! bounded head and body, every malformed input answered with a 4xx (never a panic).

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// The largest request body accepted (health reports and telemetry are a few KiB).
pub const MAX_BODY: usize = 256 * 1024;
/// How long a client may take to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// At most this many headers.
pub const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query string (without `?`), possibly empty.
    pub query: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (at most [`MAX_BODY`]).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Who is asking: `x-ms-agent-name` and `User-Agent` (cloud-init's Azure datasource sends
    /// `x-ms-agent-name: WALinuxAgent` too, so the user agent tells them apart), else `unknown`.
    pub fn agent(&self) -> String {
        let a = match (
            self.header("x-ms-agent-name").filter(|s| !s.is_empty()),
            self.header("user-agent").filter(|s| !s.is_empty()),
        ) {
            (Some(n), Some(u)) if !u.starts_with(n) => format!("{n} ({u})"),
            (Some(n), _) => n.to_string(),
            (None, Some(u)) => u.to_string(),
            (None, None) => "unknown".to_string(),
        };
        a.chars().filter(|c| !c.is_control()).take(120).collect()
    }
}

/// Why a request could not be read; each maps to a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The client closed before sending anything (not worth an answer).
    #[error("the client closed the connection")]
    Closed,
    /// Too slow.
    #[error("request timeout")]
    Timeout,
    /// The head was larger than [`MAX_HEAD`].
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body was larger than [`MAX_BODY`].
    #[error("request body of {0} bytes is larger than {MAX_BODY}")]
    BodyTooLarge(u64),
    /// Not HTTP/1.x or otherwise malformed.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A body without Content-Length (chunked): not supported.
    #[error("a body needs Content-Length")]
    LengthRequired,
    /// I/O failed.
    #[error("I/O: {0}")]
    Io(String),
}

impl ReadError {
    /// The status to answer with, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Timeout => Some(408),
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge(_) => Some(413),
            ReadError::Malformed(_) => Some(400),
            ReadError::LengthRequired => Some(411),
        }
    }
}

/// A parsed head: method, path, query, headers.
pub type Head = (String, String, String, Vec<(String, String)>);

/// Parses a request head (everything before the blank line).
pub fn parse_head(head: &[u8]) -> Result<Head, ReadError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ReadError::Malformed("the head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => {
            return Err(ReadError::Malformed(format!(
                "request line `{}`",
                first.chars().take(80).collect::<String>()
            )))
        }
    };
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ReadError::Malformed("bad method".into()));
    }
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(ReadError::Malformed(format!(
            "unsupported version `{}`",
            version.chars().take(20).collect::<String>()
        )));
    }
    // Absolute-form targets (a proxy-style request) are reduced to their path.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => target,
    };
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(ReadError::Malformed("bad request target".into()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(ReadError::HeadTooLarge);
        }
        let (n, v) = line
            .split_once(':')
            .ok_or_else(|| ReadError::Malformed("a header without `:`".into()))?;
        if n.is_empty() || n.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(ReadError::Malformed("bad header name".into()));
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((
        method.to_string(),
        path.to_string(),
        query.to_string(),
        headers,
    ))
}

/// Reads one request from `r`, within `timeout` overall ([`READ_TIMEOUT`] in the server).
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Request, ReadError> {
    match tokio::time::timeout(timeout, read_request_inner(r)).await {
        Ok(x) => x,
        Err(_) => Err(ReadError::Timeout),
    }
}

async fn read_request_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, ReadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find_head_end(&buf) {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::HeadTooLarge);
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Malformed("the connection closed inside the head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (head, sep) = head_end;
    if head > MAX_HEAD {
        return Err(ReadError::HeadTooLarge);
    }
    let (method, path, query, headers) = parse_head(&buf[..head])?;
    let mut body = buf[head + sep..].to_vec();
    let te = headers.iter().any(|(n, _)| n == "transfer-encoding");
    let lengths: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let length: u64 = match lengths.as_slice() {
        [] if te => return Err(ReadError::LengthRequired),
        [] => 0,
        [one] if !te => one
            .parse()
            .map_err(|_| ReadError::Malformed("bad Content-Length".into()))?,
        _ => {
            return Err(ReadError::Malformed(
                "conflicting Content-Length / Transfer-Encoding".into(),
            ))
        }
    };
    if length > MAX_BODY as u64 {
        return Err(ReadError::BodyTooLarge(length));
    }
    let length = length as usize;
    while body.len() < length {
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ReadError::Malformed(
                "the connection closed inside the body".into(),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// (end of the head, length of the separator)
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Content-Type.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a body.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }
    /// `200`, XML.
    pub fn xml(body: impl Into<String>) -> Response {
        Response::new(200, "text/xml; charset=utf-8", body.into())
    }
    /// `status`, JSON.
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response::new(status, "application/json; charset=utf-8", v.to_string())
    }
    /// `status`, plain text.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes `resp` and closes the write side (`Connection: close`).
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nServer: kiln-fabric\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    tokio::time::timeout(READ_TIMEOUT, async {
        w.write_all(&out).await?;
        w.flush().await?;
        w.shutdown().await
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "writing the response timed out",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Request, ReadError> {
        let mut r = bytes;
        read_request(&mut r, READ_TIMEOUT).await
    }

    #[tokio::test]
    async fn parses_requests_agents_send() {
        let r = read(b"GET /machine/?comp=goalstate HTTP/1.1\r\nHost: 168.63.129.16\r\nx-ms-agent-name: WALinuxAgent\r\nx-ms-version: 2012-11-30\r\n\r\n").await.unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query_param("comp")),
            ("GET", "/machine/", Some("goalstate"))
        );
        assert_eq!(r.agent(), "WALinuxAgent");
        let r = read(b"GET / HTTP/1.1\r\nx-ms-agent-name: WALinuxAgent\r\nUser-Agent: Cloud-Init/22.4.2\r\n\r\n").await.unwrap();
        assert_eq!(r.agent(), "WALinuxAgent (Cloud-Init/22.4.2)");
        let r = read(b"GET / HTTP/1.1\r\nx-ms-agent-name: WALinuxAgent\r\nUser-Agent: WALinuxAgent/2.7.3.0\r\n\r\n").await.unwrap();
        assert_eq!(r.agent(), "WALinuxAgent");
        let r = read(b"POST /machine?comp=health HTTP/1.1\r\nContent-Length: 5\r\nUser-Agent: Cloud-Init/22.4.2\r\n\r\nhello-and-more").await.unwrap();
        assert_eq!(
            (r.body.as_slice(), r.agent().as_str()),
            (&b"hello"[..], "Cloud-Init/22.4.2")
        );
        let r = read(
            b"GET http://169.254.169.254/metadata/instance?api-version=2021-08-01 HTTP/1.0\n\n",
        )
        .await
        .unwrap();
        assert_eq!(
            (r.path.as_str(), r.query_param("api-version")),
            ("/metadata/instance", Some("2021-08-01"))
        );
    }

    #[tokio::test]
    async fn hostile_requests_are_refused_with_a_status() {
        let cases: Vec<(Vec<u8>, Option<u16>)> = vec![
            (b"".to_vec(), None),
            (b"GARBAGE\r\n\r\n".to_vec(), Some(400)),
            (b"GET / HTTP/2.0\r\n\r\n".to_vec(), Some(400)),
            (b"get / HTTP/1.1\r\n\r\n".to_vec(), Some(400)),
            (b"GET relative HTTP/1.1\r\n\r\n".to_vec(), Some(400)),
            (b"GET / HTTP/1.1\r\nno-colon\r\n\r\n".to_vec(), Some(400)),
            (b"GET / HTTP/1.1\r\n\xff\xfe: x\r\n\r\n".to_vec(), Some(400)),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n".to_vec(),
                Some(413),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                Some(400),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
                Some(400),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
                Some(400),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    .to_vec(),
                Some(411),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
                Some(400),
            ),
            (b"GET / HTTP/1.1\r\nHost: x".to_vec(), Some(400)),
        ];
        for (bytes, want) in cases {
            let e = read(&bytes).await.unwrap_err();
            assert_eq!(
                e.status(),
                want,
                "{:?}: {e}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD * 4));
        assert_eq!(read(&huge).await.unwrap_err(), ReadError::HeadTooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 1) {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(read(&many).await.unwrap_err(), ReadError::HeadTooLarge);
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HT")
            .await
            .unwrap();
        let e = read_request(&mut server, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!((e.clone(), e.status()), (ReadError::Timeout, Some(408)));
        drop(client);
    }
}
