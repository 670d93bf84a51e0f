//! NTLMv2 authentication and session security (MS-NLMP), both sides.
//!
//! - [`Initiator`]: the client: NEGOTIATE, then AUTHENTICATE for the server's CHALLENGE (NTLMv2
//!   response, MIC when the server sent a timestamp, a random exported session key sent
//!   RC4-encrypted under KEY_EXCH).
//! - [`Acceptor`]: the server side, used by kiln's WinRS test server: CHALLENGE, then checks the
//!   client's NTLMv2 proof (and MIC) against a configured user and password.
//! - [`Session`]: message sealing and signing with extended session security and 128-bit keys
//!   (RC4 + HMAC-MD5, sequence numbers per direction), what WinRM's HTTP message encryption uses.
//!
//! Only what WinRM needs is implemented: NTLMv2 with extended session security, SIGN, SEAL and
//! 128-bit keys are required from the peer (anything weaker is refused, so a body is never sent
//! in plaintext); NTLMv1, LM, anonymous and connectionless mode are not supported.
//! The crypto is checked against the MS-NLMP §4.2.4 test vectors
//! (`agents/tests/data/ntlm/ms-nlmp-4.2.4.txt`).

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use md4::{Digest as _, Md4};
use md5::Md5;
use rc4::{Rc4, StreamCipher};

/// NEGOTIATE flags (MS-NLMP §2.2.2.5).
pub mod flags {
    /// Unicode strings.
    pub const UNICODE: u32 = 0x0000_0001;
    /// OEM strings.
    pub const OEM: u32 = 0x0000_0002;
    /// Ask for the server's realm.
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    /// Message integrity.
    pub const SIGN: u32 = 0x0000_0010;
    /// Message confidentiality.
    pub const SEAL: u32 = 0x0000_0020;
    /// NTLM authentication.
    pub const NTLM: u32 = 0x0000_0200;
    /// Always sign.
    pub const ALWAYS_SIGN: u32 = 0x0000_8000;
    /// The target is a server (CHALLENGE).
    pub const TARGET_TYPE_SERVER: u32 = 0x0002_0000;
    /// Extended session security (NTLM2 keys).
    pub const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    /// TargetInfo is present (CHALLENGE).
    pub const TARGET_INFO: u32 = 0x0080_0000;
    /// The Version field is present.
    pub const VERSION: u32 = 0x0200_0000;
    /// 128-bit session keys.
    pub const N128: u32 = 0x2000_0000;
    /// Key exchange (a random exported session key).
    pub const KEY_EXCH: u32 = 0x4000_0000;
    /// 56-bit session keys.
    pub const N56: u32 = 0x8000_0000;
}

/// What kiln's client asks for.
pub const CLIENT_FLAGS: u32 = flags::UNICODE
    | flags::REQUEST_TARGET
    | flags::SIGN
    | flags::SEAL
    | flags::NTLM
    | flags::ALWAYS_SIGN
    | flags::EXTENDED_SESSIONSECURITY
    | flags::VERSION
    | flags::N128
    | flags::KEY_EXCH
    | flags::N56;

/// What either side insists on: without these there is no 128-bit sealing.
pub const REQUIRED_FLAGS: u32 =
    flags::SIGN | flags::SEAL | flags::EXTENDED_SESSIONSECURITY | flags::N128 | flags::UNICODE;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
/// Version field: Windows 10.0 build 19041, NTLM revision 15.
const VERSION: [u8; 8] = [10, 0, 0x61, 0x4a, 0, 0, 0, 15];

/// AV pair ids (MS-NLMP §2.2.2.1).
pub mod av {
    /// End of list.
    pub const EOL: u16 = 0;
    /// NetBIOS computer name.
    pub const NB_COMPUTER_NAME: u16 = 1;
    /// NetBIOS domain name.
    pub const NB_DOMAIN_NAME: u16 = 2;
    /// DNS computer name.
    pub const DNS_COMPUTER_NAME: u16 = 3;
    /// DNS domain name.
    pub const DNS_DOMAIN_NAME: u16 = 4;
    /// Flags (0x2: a MIC is present).
    pub const FLAGS: u16 = 6;
    /// Server time (FILETIME).
    pub const TIMESTAMP: u16 = 7;
}

/// Why an NTLM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    /// A message is truncated or malformed.
    #[error("malformed NTLM {message} message: {detail}")]
    Malformed {
        /// NEGOTIATE, CHALLENGE or AUTHENTICATE.
        message: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The peer did not agree to what message sealing needs.
    #[error(
        "the NTLM peer did not negotiate {missing} (flags 0x{flags:08x}); kiln requires NTLMv2 \
         with 128-bit signing and sealing and never sends WinRM bodies in plaintext"
    )]
    Weak {
        /// The negotiated flags.
        flags: u32,
        /// The missing capabilities, named.
        missing: String,
    },
    /// The client's proof does not match the password (acceptor).
    #[error("NTLM authentication of {user:?} failed: {detail}")]
    BadCredentials {
        /// The user named in AUTHENTICATE.
        user: String,
        /// Which check failed.
        detail: String,
    },
    /// A sealed message's signature did not verify.
    #[error("NTLM signature check failed on sealed message (sequence number {seq})")]
    BadSignature {
        /// The sequence number expected.
        seq: u32,
    },
}

fn malformed(message: &'static str, detail: impl Into<String>) -> NtlmError {
    NtlmError::Malformed {
        message,
        detail: detail.into(),
    }
}

fn missing_flags(flags: u32) -> Option<String> {
    missing_of(flags, true)
}

/// The capabilities of `REQUIRED_FLAGS` absent from `flags`; `unicode: false` leaves UNICODE
/// out (a NEGOTIATE may offer only OEM strings, e.g. ntlm-auth's, and the server then picks).
fn missing_of(flags: u32, unicode: bool) -> Option<String> {
    let names = [
        (if unicode { flags::UNICODE } else { 0 }, "UNICODE"),
        (flags::SIGN, "SIGN"),
        (flags::SEAL, "SEAL"),
        (flags::EXTENDED_SESSIONSECURITY, "EXTENDED_SESSIONSECURITY"),
        (flags::N128, "128-bit keys"),
    ];
    let missing: Vec<&str> = names
        .iter()
        .filter(|(f, _)| *f != 0 && flags & f == 0)
        .map(|(_, n)| *n)
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn from_utf16(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// HMAC-MD5 over the concatenation of `parts`.
pub fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut m = <Hmac<Md5> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn rc4(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut c = Rc4::new_from_slice(key).expect("RC4 takes 1..=256 byte keys");
    let mut out = data.to_vec();
    c.apply_keystream(&mut out);
    out
}

/// NTOWFv1: MD4 of the UTF-16LE password (the "NT hash").
pub fn nt_hash(password: &str) -> [u8; 16] {
    Md4::digest(utf16(password)).into()
}

/// NTOWFv2 = HMAC_MD5(NT hash, UTF-16LE(UPPERCASE(user) + domain)).
pub fn ntowfv2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let who = utf16(&format!("{}{}", user.to_uppercase(), domain));
    hmac_md5(&nt_hash(password), &[&who])
}

/// The NTLMv2 client "temp" blob: header, timestamp, client challenge, AV pairs.
pub fn ntlmv2_temp(timestamp: u64, client_challenge: &[u8; 8], target_info: &[u8]) -> Vec<u8> {
    let mut t = vec![1, 1, 0, 0, 0, 0, 0, 0];
    t.extend_from_slice(&timestamp.to_le_bytes());
    t.extend_from_slice(client_challenge);
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(target_info);
    t.extend_from_slice(&[0; 4]);
    t
}

/// NtChallengeResponse (NTProofStr + temp) and SessionBaseKey for NTLMv2.
pub fn ntlmv2_response(
    ntowf: &[u8; 16],
    server_challenge: &[u8; 8],
    temp: &[u8],
) -> (Vec<u8>, [u8; 16]) {
    let proof = hmac_md5(ntowf, &[server_challenge, temp]);
    let base = hmac_md5(ntowf, &[&proof]);
    let mut resp = proof.to_vec();
    resp.extend_from_slice(temp);
    (resp, base)
}

/// LMv2 response: HMAC_MD5(NTOWFv2, server + client challenge) + client challenge.
pub fn lmv2_response(
    ntowf: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> [u8; 24] {
    let h = hmac_md5(ntowf, &[server_challenge, client_challenge]);
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&h);
    out[16..].copy_from_slice(client_challenge);
    out
}

const C2S_SIGN: &[u8] = b"session key to client-to-server signing key magic constant\0";
const S2C_SIGN: &[u8] = b"session key to server-to-client signing key magic constant\0";
const C2S_SEAL: &[u8] = b"session key to client-to-server sealing key magic constant\0";
const S2C_SEAL: &[u8] = b"session key to server-to-client sealing key magic constant\0";

/// SIGNKEY for one direction (extended session security).
pub fn sign_key(exported_session_key: &[u8; 16], client_to_server: bool) -> [u8; 16] {
    md5(&[
        exported_session_key,
        if client_to_server { C2S_SIGN } else { S2C_SIGN },
    ])
}

/// SEALKEY for one direction (extended session security, 128-bit).
pub fn seal_key(exported_session_key: &[u8; 16], client_to_server: bool) -> [u8; 16] {
    md5(&[
        exported_session_key,
        if client_to_server { C2S_SEAL } else { S2C_SEAL },
    ])
}

/// One direction of a session: its RC4 state (continuous across messages), signing key and
/// sequence number.
struct Direction {
    rc4: Rc4,
    sign_key: [u8; 16],
    seq: u32,
}

impl Direction {
    fn new(exported: &[u8; 16], client_to_server: bool) -> Self {
        Direction {
            rc4: Rc4::new_from_slice(&seal_key(exported, client_to_server))
                .expect("16-byte RC4 key"),
            sign_key: sign_key(exported, client_to_server),
            seq: 0,
        }
    }

    /// Checksum for `msg` at the current sequence number, RC4-encrypted under KEY_EXCH.
    fn checksum(&mut self, msg: &[u8], key_exch: bool) -> [u8; 8] {
        let mac = hmac_md5(&self.sign_key, &[&self.seq.to_le_bytes(), msg]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&mac[..8]);
        if key_exch {
            self.rc4.apply_keystream(&mut c);
        }
        c
    }
}

/// An established NTLM security context: seals outgoing and unseals incoming messages.
pub struct Session {
    outgoing: Direction,
    incoming: Direction,
    key_exch: bool,
    /// The exported session key (exposed for tests and diagnostics, never logged).
    exported: [u8; 16],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("out_seq", &self.outgoing.seq)
            .field("in_seq", &self.incoming.seq)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session from the exported session key; `client` selects which direction is outgoing.
    pub fn new(exported_session_key: [u8; 16], key_exch: bool, client: bool) -> Self {
        Session {
            outgoing: Direction::new(&exported_session_key, client),
            incoming: Direction::new(&exported_session_key, !client),
            key_exch,
            exported: exported_session_key,
        }
    }

    /// The exported session key.
    pub fn exported_session_key(&self) -> &[u8; 16] {
        &self.exported
    }

    /// Seal `msg`: returns (ciphertext, 16-byte signature). GSS_WrapEx of MS-NLMP §3.4.6.
    pub fn wrap(&mut self, msg: &[u8]) -> (Vec<u8>, [u8; 16]) {
        let mut sealed = msg.to_vec();
        self.outgoing.rc4.apply_keystream(&mut sealed);
        let checksum = self.outgoing.checksum(msg, self.key_exch);
        let mut sig = [0u8; 16];
        sig[..4].copy_from_slice(&1u32.to_le_bytes());
        sig[4..12].copy_from_slice(&checksum);
        sig[12..].copy_from_slice(&self.outgoing.seq.to_le_bytes());
        self.outgoing.seq = self.outgoing.seq.wrapping_add(1);
        (sealed, sig)
    }

    /// Unseal `sealed` and verify `signature` (version, checksum and sequence number).
    pub fn unwrap(&mut self, sealed: &[u8], signature: &[u8]) -> Result<Vec<u8>, NtlmError> {
        let seq = self.incoming.seq;
        if signature.len() != 16 {
            return Err(NtlmError::BadSignature { seq });
        }
        let mut msg = sealed.to_vec();
        self.incoming.rc4.apply_keystream(&mut msg);
        let checksum = self.incoming.checksum(&msg, self.key_exch);
        let ok = signature[..4] == 1u32.to_le_bytes()
            && signature[4..12] == checksum
            && signature[12..] == seq.to_le_bytes();
        self.incoming.seq = seq.wrapping_add(1);
        if ok {
            Ok(msg)
        } else {
            Err(NtlmError::BadSignature { seq })
        }
    }
}

/// The current time as a Windows FILETIME (100 ns since 1601-01-01).
pub fn filetime_now() -> u64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (unix.as_secs() + 11_644_473_600) * 10_000_000 + u64::from(unix.subsec_nanos() / 100)
}

/// AV pairs as (id, value).
pub fn parse_av_pairs(mut b: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, NtlmError> {
    let mut out = Vec::new();
    loop {
        if b.len() < 4 {
            return Err(malformed("CHALLENGE", "TargetInfo without MsvAvEOL"));
        }
        let id = u16::from_le_bytes([b[0], b[1]]);
        let len = usize::from(u16::from_le_bytes([b[2], b[3]]));
        if id == av::EOL {
            return Ok(out);
        }
        let v = b
            .get(4..4 + len)
            .ok_or_else(|| malformed("CHALLENGE", "AV pair runs past TargetInfo"))?;
        out.push((id, v.to_vec()));
        b = &b[4 + len..];
    }
}

/// Encode AV pairs, adding MsvAvEOL.
pub fn encode_av_pairs(pairs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, v) in pairs {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(&[0; 4]);
    out
}

fn field<'a>(
    msg: &'a [u8],
    at: usize,
    what: &'static str,
    name: &str,
) -> Result<&'a [u8], NtlmError> {
    let hdr = msg
        .get(at..at + 8)
        .ok_or_else(|| malformed(what, format!("truncated before the {name} field")))?;
    let len = usize::from(u16::from_le_bytes([hdr[0], hdr[1]]));
    let off = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len == 0 {
        return Ok(&[]);
    }
    msg.get(off..off + len)
        .ok_or_else(|| malformed(what, format!("{name} runs past the message")))
}

fn check_header(msg: &[u8], ty: u32, what: &'static str) -> Result<(), NtlmError> {
    if msg.len() < 12 || &msg[..8] != SIGNATURE {
        return Err(malformed(what, "no NTLMSSP signature"));
    }
    let t = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]);
    if t != ty {
        return Err(malformed(what, format!("message type {t}, expected {ty}")));
    }
    Ok(())
}

fn u32_at(msg: &[u8], at: usize, what: &'static str) -> Result<u32, NtlmError> {
    msg.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| malformed(what, "truncated"))
}

/// Lays out a message: fixed header, then the payload fields in order.
struct Builder {
    head: Vec<u8>,
    payload: Vec<u8>,
    fields: Vec<(usize, Vec<u8>)>,
}

impl Builder {
    fn new(ty: u32, head_len: usize) -> Self {
        let mut head = vec![0u8; head_len];
        head[..8].copy_from_slice(SIGNATURE);
        head[8..12].copy_from_slice(&ty.to_le_bytes());
        Builder {
            head,
            payload: Vec::new(),
            fields: Vec::new(),
        }
    }
    fn field(&mut self, at: usize, data: Vec<u8>) {
        self.fields.push((at, data));
    }
    fn finish(mut self) -> Vec<u8> {
        let base = self.head.len();
        for (at, data) in std::mem::take(&mut self.fields) {
            let off = (base + self.payload.len()) as u32;
            let len = data.len() as u16;
            self.head[at..at + 2].copy_from_slice(&len.to_le_bytes());
            self.head[at + 2..at + 4].copy_from_slice(&len.to_le_bytes());
            self.head[at + 4..at + 8].copy_from_slice(&off.to_le_bytes());
            self.payload.extend_from_slice(&data);
        }
        self.head.extend_from_slice(&self.payload);
        self.head
    }
}

/// A parsed CHALLENGE message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Negotiated flags.
    pub flags: u32,
    /// The server's 8-byte nonce.
    pub server_challenge: [u8; 8],
    /// Raw TargetInfo (AV pairs).
    pub target_info: Vec<u8>,
    /// TargetName, decoded.
    pub target_name: String,
}

/// Parse a CHALLENGE message.
pub fn parse_challenge(msg: &[u8]) -> Result<Challenge, NtlmError> {
    const W: &str = "CHALLENGE";
    check_header(msg, 2, W)?;
    let flags = u32_at(msg, 20, W)?;
    let server_challenge: [u8; 8] = msg
        .get(24..32)
        .ok_or_else(|| malformed(W, "truncated before ServerChallenge"))?
        .try_into()
        .expect("8 bytes");
    let target_name = from_utf16(field(msg, 12, W, "TargetName")?);
    let target_info = if flags & flags::TARGET_INFO != 0 {
        field(msg, 40, W, "TargetInfo")?.to_vec()
    } else {
        Vec::new()
    };
    Ok(Challenge {
        flags,
        server_challenge,
        target_info,
        target_name,
    })
}

/// Client credentials.
#[derive(Clone)]
pub struct Credentials {
    /// User name (`user`, or split from `DOMAIN\user` / `user@domain` by the caller).
    pub user: String,
    /// Domain; empty for a local account.
    pub domain: String,
    /// Password.
    pub password: String,
    /// Our workstation name (informational).
    pub workstation: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Split `DOMAIN\user` or `user@domain`; a bare name is a local account.
    pub fn new(user: &str, password: &str) -> Self {
        let (domain, user) = if let Some((d, u)) = user.split_once('\\') {
            (d.to_string(), u.to_string())
        } else if let Some((u, d)) = user.split_once('@') {
            (d.to_string(), u.to_string())
        } else {
            (String::new(), user.to_string())
        };
        Credentials {
            user,
            domain,
            password: password.to_string(),
            workstation: "KILN".into(),
        }
    }
}

/// The client side of one NTLM handshake.
pub struct Initiator {
    creds: Credentials,
    negotiate: Vec<u8>,
}

/// Inputs that are random in real use, fixed in tests.
#[derive(Clone, Copy, Debug)]
pub struct Randomness {
    /// Client challenge.
    pub client_challenge: [u8; 8],
    /// Exported session key (sent under KEY_EXCH).
    pub session_key: [u8; 16],
    /// FILETIME to use when the server sent none.
    pub now: u64,
}

impl Randomness {
    /// Fresh random values and the current time.
    pub fn fresh() -> Self {
        Randomness {
            client_challenge: rand::random(),
            session_key: rand::random(),
            now: filetime_now(),
        }
    }
}

impl Initiator {
    /// Start a handshake; [`Initiator::negotiate_message`] is the first token.
    pub fn new(creds: Credentials) -> Self {
        let mut b = Builder::new(1, 40);
        b.head[12..16].copy_from_slice(&CLIENT_FLAGS.to_le_bytes());
        b.head[32..40].copy_from_slice(&VERSION);
        // DomainName (16) and Workstation (24) fields stay empty.
        let negotiate = b.finish();
        Initiator { creds, negotiate }
    }

    /// The NEGOTIATE message.
    pub fn negotiate_message(&self) -> &[u8] {
        &self.negotiate
    }

    /// Answer the server's CHALLENGE: the AUTHENTICATE message and the established session.
    pub fn authenticate(
        &self,
        challenge_msg: &[u8],
        rnd: Randomness,
    ) -> Result<(Vec<u8>, Session), NtlmError> {
        let ch = parse_challenge(challenge_msg)?;
        if let Some(missing) = missing_flags(ch.flags) {
            return Err(NtlmError::Weak {
                flags: ch.flags,
                missing,
            });
        }
        let flags = ch.flags & CLIENT_FLAGS;
        let key_exch = flags & flags::KEY_EXCH != 0;
        let mut pairs = parse_av_pairs(&ch.target_info)?;
        let server_time = pairs
            .iter()
            .find(|(id, _)| *id == av::TIMESTAMP)
            .map(|(_, v)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v[..8.min(v.len())]);
                u64::from_le_bytes(b)
            });
        // With a server timestamp the client must send a MIC and say so in MsvAvFlags.
        let with_mic = server_time.is_some();
        if with_mic {
            let mut found = false;
            for (id, v) in pairs.iter_mut() {
                if *id == av::FLAGS && v.len() == 4 {
                    let f = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) | 2;
                    *v = f.to_le_bytes().to_vec();
                    found = true;
                }
            }
            if !found {
                pairs.push((av::FLAGS, 2u32.to_le_bytes().to_vec()));
            }
        }
        let target_info = encode_av_pairs(&pairs);
        let timestamp = server_time.unwrap_or(rnd.now);

        let ntowf = ntowfv2(&self.creds.password, &self.creds.user, &self.creds.domain);
        let temp = ntlmv2_temp(timestamp, &rnd.client_challenge, &target_info);
        let (nt, base_key) = ntlmv2_response(&ntowf, &ch.server_challenge, &temp);
        let lm = if with_mic {
            [0u8; 24]
        } else {
            lmv2_response(&ntowf, &ch.server_challenge, &rnd.client_challenge)
        };
        // NTLMv2: KeyExchangeKey = SessionBaseKey.
        let (exported, enc_key) = if key_exch {
            (rnd.session_key, rc4(&base_key, &rnd.session_key))
        } else {
            (base_key, Vec::new())
        };

        let mut b = Builder::new(3, 88);
        b.head[60..64].copy_from_slice(&flags.to_le_bytes());
        b.head[64..72].copy_from_slice(&VERSION);
        b.field(28, utf16(&self.creds.domain));
        b.field(36, utf16(&self.creds.user));
        b.field(44, utf16(&self.creds.workstation));
        b.field(12, lm.to_vec());
        b.field(20, nt);
        b.field(52, enc_key);
        let mut msg = b.finish();
        if with_mic {
            let mic = hmac_md5(&exported, &[&self.negotiate, challenge_msg, &msg]);
            msg[72..88].copy_from_slice(&mic);
        }
        Ok((msg, Session::new(exported, key_exch, true)))
    }
}

/// The server side of one NTLM handshake, for kiln's WinRS test server.
pub struct Acceptor {
    user: String,
    password: String,
    computer: String,
    server_challenge: [u8; 8],
    negotiate: Vec<u8>,
    challenge: Vec<u8>,
    flags: u32,
}

/// A successful authentication.
#[derive(Debug)]
pub struct Accepted {
    /// User name as the client sent it.
    pub user: String,
    /// Domain as the client sent it.
    pub domain: String,
    /// Whether the client sent a MIC (it was verified).
    pub mic: bool,
    /// The session for sealing.
    pub session: Session,
}

impl Acceptor {
    /// An acceptor for one local account. `computer` names the server in TargetInfo.
    pub fn new(user: &str, password: &str, computer: &str) -> Self {
        Acceptor {
            user: user.to_string(),
            password: password.to_string(),
            computer: computer.to_string(),
            server_challenge: rand::random(),
            negotiate: Vec::new(),
            challenge: Vec::new(),
            flags: 0,
        }
    }

    /// Answer a NEGOTIATE with a CHALLENGE (TargetInfo with names and a timestamp, so clients
    /// send a MIC).
    pub fn challenge(&mut self, negotiate: &[u8]) -> Result<Vec<u8>, NtlmError> {
        const W: &str = "NEGOTIATE";
        check_header(negotiate, 1, W)?;
        let client = u32_at(negotiate, 12, W)?;
        if let Some(missing) = missing_of(client, false) {
            return Err(NtlmError::Weak {
                flags: client,
                missing,
            });
        }
        // OEM is echoed when offered: clients that offered only OEM (ntlm-auth) take it back out
        // of the flags by subtraction when the server also sets UNICODE, as Windows does.
        let offered = flags::UNICODE
            | flags::OEM
            | flags::SIGN
            | flags::SEAL
            | flags::NTLM
            | flags::ALWAYS_SIGN
            | flags::EXTENDED_SESSIONSECURITY
            | flags::VERSION
            | flags::N128
            | flags::KEY_EXCH
            | flags::N56
            | flags::REQUEST_TARGET;
        // Strings are always Unicode (what Windows answers an OEM-only NEGOTIATE with).
        self.flags =
            (client & offered) | flags::UNICODE | flags::TARGET_INFO | flags::TARGET_TYPE_SERVER;
        let name = utf16(&self.computer);
        let info = encode_av_pairs(&[
            (av::NB_DOMAIN_NAME, name.clone()),
            (av::NB_COMPUTER_NAME, name.clone()),
            (av::DNS_DOMAIN_NAME, name.clone()),
            (av::DNS_COMPUTER_NAME, name.clone()),
            (av::TIMESTAMP, filetime_now().to_le_bytes().to_vec()),
        ]);
        let mut b = Builder::new(2, 56);
        b.head[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b.head[24..32].copy_from_slice(&self.server_challenge);
        b.head[48..56].copy_from_slice(&VERSION);
        b.field(12, name);
        b.field(40, info);
        self.negotiate = negotiate.to_vec();
        self.challenge = b.finish();
        Ok(self.challenge.clone())
    }

    /// Check an AUTHENTICATE message against the configured account.
    pub fn accept(&self, auth: &[u8]) -> Result<Accepted, NtlmError> {
        const W: &str = "AUTHENTICATE";
        check_header(auth, 3, W)?;
        let nt = field(auth, 20, W, "NtChallengeResponse")?;
        let flags = u32_at(auth, 60, W)?;
        let text = |b: &[u8]| {
            if flags & flags::UNICODE != 0 {
                from_utf16(b)
            } else {
                b.iter().map(|c| char::from(*c)).collect()
            }
        };
        let domain = text(field(auth, 28, W, "DomainName")?);
        let user = text(field(auth, 36, W, "UserName")?);
        let enc_key = field(auth, 52, W, "EncryptedRandomSessionKey")?;
        let bad = |detail: &str| NtlmError::BadCredentials {
            user: user.clone(),
            detail: detail.to_string(),
        };
        if !user.eq_ignore_ascii_case(&self.user) {
            return Err(bad("unknown user"));
        }
        if nt.len() < 16 + 28 {
            return Err(bad(
                "not an NTLMv2 response (NTLMv1 and anonymous are refused)",
            ));
        }
        if let Some(missing) = missing_of(flags, false) {
            return Err(NtlmError::Weak { flags, missing });
        }
        let ntowf = ntowfv2(&self.password, &user, &domain);
        let (proof, temp) = nt.split_at(16);
        let (expect, base_key) = ntlmv2_response(&ntowf, &self.server_challenge, temp);
        if expect[..16] != *proof {
            return Err(bad("wrong password (NTProofStr mismatch)"));
        }
        let key_exch = flags & flags::KEY_EXCH != 0;
        let exported: [u8; 16] = if key_exch {
            if enc_key.len() != 16 {
                return Err(malformed(W, "KEY_EXCH without a 16-byte session key"));
            }
            rc4(&base_key, enc_key).try_into().expect("16 bytes")
        } else {
            base_key
        };
        // MsvAvFlags bit 0x2 in the client's AV pairs (temp[28..]) announces a MIC.
        let pairs = parse_av_pairs(&temp[28..]).unwrap_or_default();
        let mic = pairs.iter().any(|(id, v)| {
            *id == av::FLAGS
                && v.len() == 4
                && u32::from_le_bytes([v[0], v[1], v[2], v[3]]) & 2 != 0
        });
        if mic {
            let sent = auth
                .get(72..88)
                .ok_or_else(|| malformed(W, "MIC announced but the message is too short"))?;
            let mut zeroed = auth.to_vec();
            zeroed[72..88].fill(0);
            let want = hmac_md5(&exported, &[&self.negotiate, &self.challenge, &zeroed]);
            if want != sent {
                return Err(bad(
                    "MIC mismatch (message tampered with, or wrong session key)",
                ));
            }
        }
        Ok(Accepted {
            user,
            domain,
            mic,
            session: Session::new(exported, key_exch, false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_and_sealing_round_trip_both_ways() {
        let init = Initiator::new(Credentials::new("kiln", "s3cret!"));
        let mut acc = Acceptor::new("KILN", "s3cret!", "WINRS-TEST");
        let ch = acc.challenge(init.negotiate_message()).unwrap();
        let (auth, mut client) = init.authenticate(&ch, Randomness::fresh()).unwrap();
        let mut server = acc.accept(&auth).unwrap();
        assert!(server.mic);
        for i in 0..3 {
            let msg = format!("request {i}");
            let (c, s) = client.wrap(msg.as_bytes());
            assert_eq!(server.session.unwrap(&c, &s).unwrap(), msg.as_bytes());
            let (c, s) = server.session.wrap(b"response");
            assert_eq!(client.unwrap(&c, &s).unwrap(), b"response");
        }
        // A replayed or tampered message fails.
        let (mut c, s) = client.wrap(b"x");
        c[0] ^= 1;
        assert!(server.session.unwrap(&c, &s).is_err());
    }

    #[test]
    fn wrong_password_and_tampering_are_refused() {
        let init = Initiator::new(Credentials::new("kiln", "wrong"));
        let mut acc = Acceptor::new("kiln", "right", "S");
        let ch = acc.challenge(init.negotiate_message()).unwrap();
        let (auth, _) = init.authenticate(&ch, Randomness::fresh()).unwrap();
        assert!(matches!(
            acc.accept(&auth),
            Err(NtlmError::BadCredentials { .. })
        ));

        let init = Initiator::new(Credentials::new("kiln", "right"));
        let mut acc = Acceptor::new("kiln", "right", "S");
        let ch = acc.challenge(init.negotiate_message()).unwrap();
        let (mut auth, _) = init.authenticate(&ch, Randomness::fresh()).unwrap();
        // Flip a flag bit (drop KEY_EXCH): the MIC no longer matches.
        auth[63] ^= 0x40;
        assert!(acc.accept(&auth).is_err());
    }

    #[test]
    fn weak_peers_are_refused() {
        let init = Initiator::new(Credentials::new("u", "p"));
        let mut acc = Acceptor::new("u", "p", "S");
        let mut ch = acc.challenge(init.negotiate_message()).unwrap();
        let f = u32::from_le_bytes(ch[20..24].try_into().unwrap()) & !flags::SEAL;
        ch[20..24].copy_from_slice(&f.to_le_bytes());
        let err = init.authenticate(&ch, Randomness::fresh()).unwrap_err();
        assert!(err.to_string().contains("SEAL"), "{err}");
    }
}
