//! WinRM message encryption over HTTP (MS-WSMV §2.2.9.1.1, "Negotiate/SPNEGO"): a SOAP body
//! sealed with the NTLM session and framed as
//! `multipart/encrypted;protocol="application/HTTP-SPNEGO-session-encrypted"`.
//!
//! ```text
//! --Encrypted Boundary\r\n
//! \tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n
//! \tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=<plaintext length>\r\n
//! --Encrypted Boundary\r\n
//! \tContent-Type: application/octet-stream\r\n
//! <u32 LE signature length = 16><signature><sealed bytes>--Encrypted Boundary--\r\n
//! ```
//!
//! Byte-for-byte what pywinrm and Windows exchange. Both directions use this module: kiln's
//! client and kiln's test server.

use super::ntlm::{NtlmError, Session};

/// The MIME protocol of NTLM/Kerberos-sealed WinRM bodies.
pub const PROTOCOL: &str = "application/HTTP-SPNEGO-session-encrypted";
/// The `Content-Type` header of a sealed body.
pub const CONTENT_TYPE: &str = "multipart/encrypted;protocol=\"application/HTTP-SPNEGO-session-encrypted\";boundary=\"Encrypted Boundary\"";
const BOUNDARY: &[u8] = b"--Encrypted Boundary";
const END: &[u8] = b"--Encrypted Boundary--\r\n";

/// Why a sealed body could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The body is not the expected multipart framing.
    #[error("malformed encrypted body: {0}")]
    Malformed(String),
    /// The decrypted length differs from the announced `Length=`.
    #[error("decrypted {actual} bytes but the body announced {announced}")]
    Length {
        /// `Length=` of the header part.
        announced: usize,
        /// What decrypting produced.
        actual: usize,
    },
    /// The signature did not verify.
    #[error(transparent)]
    Ntlm(#[from] NtlmError),
}

/// True if a `Content-Type` header announces a sealed body.
pub fn is_encrypted(content_type: &str) -> bool {
    content_type
        .to_ascii_lowercase()
        .starts_with("multipart/encrypted")
        && content_type.contains(PROTOCOL)
}

/// Seal `plaintext` (a SOAP envelope) into a multipart body.
pub fn seal(session: &mut Session, plaintext: &[u8]) -> Vec<u8> {
    let (sealed, sig) = session.wrap(plaintext);
    let mut out = Vec::with_capacity(plaintext.len() + 256);
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"\r\n\tContent-Type: ");
    out.extend_from_slice(PROTOCOL.as_bytes());
    out.extend_from_slice(
        b"\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=",
    );
    out.extend_from_slice(plaintext.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"\r\n\tContent-Type: application/octet-stream\r\n");
    out.extend_from_slice(&(sig.len() as u32).to_le_bytes());
    out.extend_from_slice(&sig);
    out.extend_from_slice(&sealed);
    out.extend_from_slice(END);
    out
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Open a multipart body sealed by the peer (one part pair; WinRM over NTLM never sends more).
pub fn unseal(session: &mut Session, body: &[u8]) -> Result<Vec<u8>, FramingError> {
    let bad = |m: &str| FramingError::Malformed(m.to_string());
    if !body.starts_with(BOUNDARY) {
        return Err(bad("does not start with --Encrypted Boundary"));
    }
    let second = find(body, BOUNDARY, BOUNDARY.len()).ok_or_else(|| bad("no second boundary"))?;
    let header = String::from_utf8_lossy(&body[BOUNDARY.len()..second]);
    if !header.contains(PROTOCOL) {
        return Err(bad(
            "first part is not application/HTTP-SPNEGO-session-encrypted",
        ));
    }
    let announced: usize = header
        .split("Length=")
        .nth(1)
        .map(|s| s.trim().trim_end_matches(['\r', '\n']))
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no Length= in OriginalContent"))?;
    const OCTET: &[u8] = b"\tContent-Type: application/octet-stream\r\n";
    let mut at = second + BOUNDARY.len();
    if body.get(at..at + 2) == Some(b"\r\n") {
        at += 2;
    }
    if body.get(at..at + OCTET.len()) != Some(OCTET) {
        return Err(bad("second part is not application/octet-stream"));
    }
    at += OCTET.len();
    let payload = if body.ends_with(END) {
        &body[at..body.len() - END.len()]
    } else {
        return Err(bad("no closing --Encrypted Boundary--"));
    };
    if payload.len() < 4 {
        return Err(bad("payload shorter than its signature length"));
    }
    let sig_len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    let sig = payload
        .get(4..4 + sig_len)
        .ok_or_else(|| bad("signature runs past the payload"))?;
    let plain = session.unwrap(&payload[4 + sig_len..], sig)?;
    if plain.len() != announced {
        return Err(FramingError::Length {
            announced,
            actual: plain.len(),
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_pywinrms() {
        let key = [0x55u8; 16];
        let mut c = Session::new(key, true, true);
        let mut s = Session::new(key, true, false);
        let body = seal(&mut c, b"<s:Envelope/>");
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(
            "--Encrypted Boundary\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=13\r\n--Encrypted Boundary\r\n\tContent-Type: application/octet-stream\r\n\x10\0\0\0"
        ));
        assert!(body.ends_with(b"--Encrypted Boundary--\r\n"));
        assert!(
            !text.contains("Envelope"),
            "the envelope must not appear in clear"
        );
        assert_eq!(unseal(&mut s, &body).unwrap(), b"<s:Envelope/>");
        assert!(is_encrypted(CONTENT_TYPE));
        assert!(!is_encrypted("application/soap+xml;charset=UTF-8"));
    }

    #[test]
    fn tampered_length_and_framing_are_refused() {
        let key = [1u8; 16];
        let mut c = Session::new(key, true, true);
        let mut s = Session::new(key, true, false);
        let body = seal(&mut c, b"hello");
        let at = find(&body, b"Length=5", 0).unwrap();
        let mut forged = body.clone();
        forged[at + 7] = b'6';
        assert!(matches!(
            unseal(&mut s, &forged),
            Err(FramingError::Length {
                announced: 6,
                actual: 5
            })
        ));
        assert!(unseal(&mut s, b"garbage").is_err());
    }
}
