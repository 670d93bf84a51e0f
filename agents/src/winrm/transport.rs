//! HTTP transport of WS-Man envelopes: one kept-alive HTTP/1.1 connection (hyper's
//! single-connection client), either
//!
//! - HTTPS (5986) with Basic authentication on every request, the server certificate pinned on
//!   first use (as SSH host keys are), or
//! - HTTP (5985) with NTLMv2 (`Authorization: Negotiate`) authenticating the connection, then
//!   every body sealed with the NTLM session ([`super::encryption`]).
//!
//! **Invariant:** over plain HTTP a SOAP body is never sent or accepted unsealed: a request is
//! only ever written through [`super::encryption::seal`], and a response that is not
//! `multipart/encrypted` is an error, not a fallback.
//!
//! NTLM authenticates a TCP connection, not a request, so this owns the connection (no pool);
//! a connection the server closed while idle is re-established (and re-authenticated) before the
//! next request, never in the middle of one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;

use super::encryption;
use super::error::WinRmError;
use super::ntlm::{self, Credentials, Initiator, Randomness, Session};
use super::wsman;
use crate::communicator::HostKeyFingerprint;

/// Transport and authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// HTTPS with Basic authentication. The certificate is checked by [`CertPolicy`], not by a
    /// CA (guests have self-signed listener certificates).
    HttpsBasic(CertPolicy),
    /// HTTP with NTLMv2 and message sealing.
    HttpNtlm,
}

/// How to treat the server's TLS certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertPolicy {
    /// Accept the certificate the server presents first (the server must still prove it holds
    /// its key) and pin it for every later connection of the same communicator.
    TrustOnFirstUse,
    /// Accept only a certificate with this fingerprint (`SHA256:` + unpadded base64 of the DER).
    Pinned(HostKeyFingerprint),
}

/// Where and as whom.
#[derive(Clone)]
pub struct TransportConfig {
    /// The address to dial (e.g. QEMU's host-forwarded `127.0.0.1:PORT`).
    pub addr: SocketAddr,
    /// Host name for the URL, `Host` header and TLS SNI (default: the address's IP).
    pub host: String,
    /// Transport and authentication.
    pub security: Security,
    /// User name (`user`, `DOMAIN\user` or `user@domain` for NTLM).
    pub user: String,
    /// Password.
    pub password: String,
    /// Limit for TCP connect + TLS handshake.
    pub connect_timeout: Duration,
    /// Limit for one request beyond the envelope's `OperationTimeout`.
    pub request_slack: Duration,
}

impl std::fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("addr", &self.addr)
            .field("host", &self.host)
            .field("security", &self.security)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl TransportConfig {
    /// The endpoint URL, e.g. `http://127.0.0.1:5985/wsman`.
    pub fn endpoint(&self) -> String {
        let scheme = match self.security {
            Security::HttpsBasic(_) => "https",
            Security::HttpNtlm => "http",
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}/wsman", self.addr.port())
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.addr.port())
    }
}

/// `SHA256:` + unpadded base64 of a certificate's DER, in the form of SSH host key fingerprints.
pub fn cert_fingerprint(der: &[u8]) -> HostKeyFingerprint {
    let digest = Sha256::digest(der);
    HostKeyFingerprint(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

/// Accepts the pinned certificate (or, unpinned, any), records what it saw, and still checks the
/// handshake signatures so the server proves it holds the certificate's key.
#[derive(Debug)]
struct PinningVerifier {
    expected: Option<HostKeyFingerprint>,
    seen: Arc<Mutex<Option<HostKeyFingerprint>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = cert_fingerprint(end_entity.as_ref());
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp.clone());
        }
        match &self.expected {
            Some(e) if *e != fp => Err(rustls::Error::General(format!(
                "certificate {fp} is not the pinned {e}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One authenticated HTTP connection.
pub struct Transport {
    config: TransportConfig,
    endpoint: String,
    sender: SendRequest<Full<Bytes>>,
    conn_task: tokio::task::JoinHandle<()>,
    /// NTLM session of this connection (HTTP only).
    session: Option<Session>,
    /// The certificate seen on the TLS handshake (HTTPS only).
    certificate: Option<HostKeyFingerprint>,
    /// The `Server` header of the first response, if any.
    server: Option<String>,
    /// A request was started and its future dropped before the response was read: the
    /// connection (and an NTLM session's sequence numbers) is out of step and must be replaced.
    in_flight: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// All values of a header, joined with `, ` (Windows sends `WWW-Authenticate: Negotiate` and
/// `WWW-Authenticate: Kerberos` as separate lines).
fn header_str(
    resp: &hyper::Response<hyper::body::Incoming>,
    name: hyper::header::HeaderName,
) -> String {
    resp.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ")
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else if s.is_empty() {
        "(empty body)".into()
    } else {
        s.to_string()
    }
}

impl Transport {
    /// Connect (TCP, TLS) and authenticate (NTLM handshake; Basic is sent per request).
    pub async fn connect(config: TransportConfig) -> Result<Transport, WinRmError> {
        let endpoint = config.endpoint();
        let conn_err = |detail: String, refused: bool| WinRmError::Connect {
            endpoint: endpoint.clone(),
            detail,
            refused,
        };
        let tcp = tokio::time::timeout(config.connect_timeout, TcpStream::connect(config.addr))
            .await
            .map_err(|_| {
                conn_err(
                    format!("TCP connect timed out after {:?}", config.connect_timeout),
                    false,
                )
            })?
            .map_err(|e| {
                let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
                conn_err(e.to_string(), refused)
            })?;
        let _ = tcp.set_nodelay(true);

        let mut certificate = None;
        let (sender, conn_task) = match &config.security {
            Security::HttpNtlm => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| conn_err(format!("HTTP handshake: {e}"), false))?;
                (
                    sender,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }
            Security::HttpsBasic(policy) => {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let seen = Arc::new(Mutex::new(None));
                let expected = match policy {
                    CertPolicy::TrustOnFirstUse => None,
                    CertPolicy::Pinned(fp) => Some(fp.clone()),
                };
                let verifier = PinningVerifier {
                    expected: expected.clone(),
                    seen: seen.clone(),
                    provider: provider.clone(),
                };
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| conn_err(format!("TLS configuration: {e}"), false))?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth();
                let name = ServerName::try_from(config.host.clone()).map_err(|e| {
                    conn_err(format!("bad TLS server name {:?}: {e}", config.host), false)
                })?;
                let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
                let handshake =
                    tokio::time::timeout(config.connect_timeout, connector.connect(name, tcp))
                        .await;
                let seen_fp = seen.lock().ok().and_then(|g| g.clone());
                let stream = match handshake {
                    Err(_) => {
                        return Err(conn_err(
                            format!("TLS handshake timed out after {:?}", config.connect_timeout),
                            false,
                        ))
                    }
                    Ok(Err(e)) => {
                        if let (Some(expected), Some(actual)) = (expected, seen_fp) {
                            if expected != actual {
                                return Err(WinRmError::CertificateMismatch {
                                    endpoint,
                                    expected,
                                    actual,
                                });
                            }
                        }
                        return Err(conn_err(format!("TLS handshake: {e}"), false));
                    }
                    Ok(Ok(s)) => s,
                };
                certificate = seen_fp;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| conn_err(format!("HTTP handshake: {e}"), false))?;
                (
                    sender,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }
        };
        let mut config = config;
        // Pin what was seen, so that a reconnect of this transport (idle keep-alive closed,
        // abandoned request) accepts only the same certificate.
        if let (Security::HttpsBasic(CertPolicy::TrustOnFirstUse), Some(fp)) =
            (&config.security, &certificate)
        {
            config.security = Security::HttpsBasic(CertPolicy::Pinned(fp.clone()));
        }
        let mut t = Transport {
            config,
            endpoint,
            sender,
            conn_task,
            session: None,
            certificate,
            server: None,
            in_flight: false,
        };
        if t.config.security == Security::HttpNtlm {
            t.ntlm_handshake().await?;
        }
        Ok(t)
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The certificate fingerprint seen on the TLS handshake.
    pub fn certificate(&self) -> Option<&HostKeyFingerprint> {
        self.certificate.as_ref()
    }

    /// The server's `Server` header, e.g. `Microsoft-HTTPAPI/2.0`.
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// True once hyper has seen the connection close.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    fn lost(&self, action: &'static str, detail: impl Into<String>) -> WinRmError {
        WinRmError::ConnectionLost {
            endpoint: self.endpoint.clone(),
            action,
            detail: detail.into(),
        }
    }

    async fn round_trip(
        &mut self,
        action: &'static str,
        headers: Vec<(hyper::header::HeaderName, String)>,
        body: Vec<u8>,
        limit: Duration,
    ) -> Result<(StatusCode, String, String, Vec<u8>), WinRmError> {
        let mut req = Request::post("/wsman").header(HOST, self.config.host_header());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .header(CONTENT_LENGTH, body.len().to_string())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.lost(action, format!("building the request: {e}")))?;
        let fut = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let ctype = header_str(&resp, CONTENT_TYPE);
            let www = header_str(&resp, WWW_AUTHENTICATE);
            let server = header_str(&resp, hyper::header::SERVER);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the response body: {e}"))?
                .to_bytes()
                .to_vec();
            Ok::<_, String>((status, ctype, www, server, body))
        };
        let (status, ctype, www, server, body) = match tokio::time::timeout(limit, fut).await {
            Err(_) => return Err(self.lost(action, format!("no response within {limit:?}"))),
            Ok(Err(e)) => return Err(self.lost(action, e)),
            Ok(Ok(r)) => r,
        };
        if self.server.is_none() && !server.is_empty() {
            self.server = Some(server);
        }
        Ok((status, ctype, www, body))
    }

    async fn ntlm_handshake(&mut self) -> Result<(), WinRmError> {
        const ACTION: &str = "NTLM handshake";
        let creds = Credentials::new(&self.config.user, &self.config.password);
        let user = self.config.user.clone();
        let init = Initiator::new(creds);
        let b64 = base64::engine::general_purpose::STANDARD;
        let limit = self.config.connect_timeout + self.config.request_slack;
        let (status, _, www, body) = self
            .round_trip(
                ACTION,
                vec![(
                    AUTHORIZATION,
                    format!("Negotiate {}", b64.encode(init.negotiate_message())),
                )],
                Vec::new(),
                limit,
            )
            .await?;
        let token = www
            .split(',')
            .map(str::trim)
            .find_map(|h| {
                h.strip_prefix("Negotiate ")
                    .or_else(|| h.strip_prefix("NTLM "))
            })
            .map(str::trim);
        let token = match (status, token) {
            (StatusCode::UNAUTHORIZED, Some(t)) => t.to_string(),
            _ => {
                return Err(WinRmError::AuthRejected {
                    endpoint: self.endpoint.clone(),
                    user,
                    scheme: "Negotiate (NTLM)",
                    detail: format!(
                        "expected HTTP 401 with an NTLM challenge, got HTTP {status} \
                         (WWW-Authenticate: {www:?}): {}",
                        snippet(&body)
                    ),
                })
            }
        };
        let challenge = b64.decode(token).map_err(|e| WinRmError::Ntlm {
            endpoint: self.endpoint.clone(),
            source: ntlm::NtlmError::Malformed {
                message: "CHALLENGE",
                detail: format!("not base64: {e}"),
            },
        })?;
        let (auth, session) =
            init.authenticate(&challenge, Randomness::fresh())
                .map_err(|source| WinRmError::Ntlm {
                    endpoint: self.endpoint.clone(),
                    source,
                })?;
        let (status, _, _, body) = self
            .round_trip(
                ACTION,
                vec![(AUTHORIZATION, format!("Negotiate {}", b64.encode(auth)))],
                Vec::new(),
                limit,
            )
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(WinRmError::AuthRejected {
                endpoint: self.endpoint.clone(),
                user,
                scheme: "Negotiate (NTLM)",
                detail: format!("HTTP 401 after AUTHENTICATE: {}", snippet(&body)),
            });
        }
        if !status.is_success() {
            return Err(WinRmError::Http {
                endpoint: self.endpoint.clone(),
                action: ACTION,
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        self.session = Some(session);
        Ok(())
    }

    /// POST one envelope and return the response envelope. An HTTP 500 carrying a SOAP fault
    /// becomes [`WinRmError::Fault`].
    pub async fn post(
        &mut self,
        action: &'static str,
        envelope: &str,
        header: &wsman::Header,
    ) -> Result<Vec<u8>, WinRmError> {
        if envelope.len() > header.max_envelope_size as usize {
            return Err(WinRmError::EnvelopeTooLarge {
                endpoint: self.endpoint.clone(),
                action,
                size: envelope.len(),
                max: header.max_envelope_size,
            });
        }
        if self.sender.is_closed() || self.in_flight {
            // Idle keep-alive closed by the server, or an abandoned request: nothing of this
            // request was sent, so reconnecting is safe.
            let fresh = Transport::connect(self.config.clone()).await?;
            let server = self.server.take();
            *self = fresh;
            if self.server.is_none() {
                self.server = server;
            }
        }
        let limit = header.operation_timeout + self.config.request_slack;
        let soap = "application/soap+xml;charset=UTF-8".to_string();
        let (headers, body) = match &self.config.security {
            Security::HttpsBasic(_) => {
                let cred = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", self.config.user, self.config.password));
                (
                    vec![
                        (AUTHORIZATION, format!("Basic {cred}")),
                        (CONTENT_TYPE, soap),
                    ],
                    envelope.as_bytes().to_vec(),
                )
            }
            Security::HttpNtlm => {
                let session = self
                    .session
                    .as_mut()
                    .expect("an NTLM transport is authenticated before use");
                (
                    vec![(CONTENT_TYPE, encryption::CONTENT_TYPE.to_string())],
                    encryption::seal(session, envelope.as_bytes()),
                )
            }
        };
        self.in_flight = true;
        let (status, ctype, _, body) = self.round_trip(action, headers, body, limit).await?;
        self.in_flight = false;
        if status == StatusCode::UNAUTHORIZED {
            return Err(WinRmError::AuthRejected {
                endpoint: self.endpoint.clone(),
                user: self.config.user.clone(),
                scheme: match self.config.security {
                    Security::HttpsBasic(_) => "Basic",
                    Security::HttpNtlm => "Negotiate (NTLM)",
                },
                detail: format!("HTTP 401: {}", snippet(&body)),
            });
        }
        let plain = match &self.config.security {
            Security::HttpsBasic(_) => body,
            Security::HttpNtlm => {
                if body.is_empty() && !status.is_success() {
                    return Err(WinRmError::Http {
                        endpoint: self.endpoint.clone(),
                        action,
                        status: status.as_u16(),
                        body: snippet(&body),
                    });
                }
                if !encryption::is_encrypted(&ctype) {
                    return Err(WinRmError::Decrypt {
                        endpoint: self.endpoint.clone(),
                        action,
                        source: encryption::FramingError::Malformed(format!(
                            "HTTP {status} response is {ctype:?}, not sealed; refusing a \
                             plaintext body over HTTP"
                        )),
                    });
                }
                let session = self.session.as_mut().expect("authenticated");
                encryption::unseal(session, &body).map_err(|source| WinRmError::Decrypt {
                    endpoint: self.endpoint.clone(),
                    action,
                    source,
                })?
            }
        };
        if status.is_success() {
            return Ok(plain);
        }
        if let Some(fault) = wsman::parse_fault(&plain) {
            return Err(WinRmError::Fault {
                endpoint: self.endpoint.clone(),
                action,
                fault: Box::new(fault),
            });
        }
        Err(WinRmError::Http {
            endpoint: self.endpoint.clone(),
            action,
            status: status.as_u16(),
            body: snippet(&plain),
        })
    }
}
