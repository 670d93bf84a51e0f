//! kiln's NTLMv2 and NTLM session security against the MS-NLMP §4.2.4 test vectors
//! (`tests/data/ntlm/ms-nlmp-4.2.4.txt`) and masterzen/winrm's fixtures generated with
//! bodgit/ntlmssp (`tests/data/ntlm/masterzen-bodgit.txt`).

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_agents::winrm::ntlm::{self, Session};

fn vectors() -> HashMap<String, Vec<u8>> {
    load("ms-nlmp-4.2.4.txt")
}

fn load(file: &str) -> HashMap<String, Vec<u8>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ntlm")
        .join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut m = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not `name = hex`", p.display(), n + 1));
        let v = v.trim();
        let bytes = (0..v.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v[i..i + 2], 16).unwrap())
            .collect();
        m.insert(k.trim().to_string(), bytes);
    }
    m
}

fn text(v: &[u8]) -> String {
    let u: Vec<u16> = v
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&u).unwrap()
}

fn arr<const N: usize>(v: &[u8]) -> [u8; N] {
    v.try_into().unwrap()
}

#[test]
fn ntlmv2_response_and_keys() {
    let v = vectors();
    let (user, domain, password) = (text(&v["user"]), text(&v["domain"]), text(&v["password"]));
    assert_eq!(ntlm::nt_hash(&password).to_vec(), v["nt_hash"]);
    let owf = ntlm::ntowfv2(&password, &user, &domain);
    assert_eq!(owf.to_vec(), v["ntowfv2"]);

    let sc: [u8; 8] = arr(&v["server_challenge"]);
    let cc: [u8; 8] = arr(&v["client_challenge"]);
    let ts = u64::from_le_bytes(arr(&v["timestamp"]));
    let temp = ntlm::ntlmv2_temp(ts, &cc, &v["target_info"]);
    assert_eq!(temp, v["temp"]);
    let (nt, base) = ntlm::ntlmv2_response(&owf, &sc, &temp);
    assert_eq!(nt[..16].to_vec(), v["nt_proof_str"]);
    assert_eq!(nt[16..].to_vec(), v["temp"]);
    assert_eq!(base.to_vec(), v["session_base_key"]);
    assert_eq!(
        ntlm::lmv2_response(&owf, &sc, &cc).to_vec(),
        v["lmv2_response"]
    );

    let rsk: [u8; 16] = arr(&v["random_session_key"]);
    assert_eq!(ntlm::sign_key(&rsk, true).to_vec(), v["client_sign_key"]);
    assert_eq!(ntlm::seal_key(&rsk, true).to_vec(), v["client_seal_key"]);
}

#[test]
fn authenticate_message_carries_the_vectors() {
    // A CHALLENGE built from the 4.2.4.3 values, answered by kiln's initiator with the fixed
    // client challenge and random session key: the message must carry 4.2.4.2's values.
    let v = vectors();
    let mut ch = b"NTLMSSP\0".to_vec();
    ch.extend_from_slice(&2u32.to_le_bytes());
    let info = &v["target_info"];
    let name = &v["domain"];
    let flags: u32 = 0xe28a8233; // 4.2.4.3's flags: KEY_EXCH, 128, SEAL, SIGN, ESS, TARGET_INFO...
    let name_off = 56u32;
    let info_off = name_off + name.len() as u32;
    ch.extend_from_slice(&(name.len() as u16).to_le_bytes());
    ch.extend_from_slice(&(name.len() as u16).to_le_bytes());
    ch.extend_from_slice(&name_off.to_le_bytes());
    ch.extend_from_slice(&flags.to_le_bytes());
    ch.extend_from_slice(&v["server_challenge"]);
    ch.extend_from_slice(&[0; 8]);
    ch.extend_from_slice(&(info.len() as u16).to_le_bytes());
    ch.extend_from_slice(&(info.len() as u16).to_le_bytes());
    ch.extend_from_slice(&info_off.to_le_bytes());
    ch.extend_from_slice(&[6, 0, 0x70, 0x17, 0, 0, 0, 15]);
    ch.extend_from_slice(name);
    ch.extend_from_slice(info);

    let mut creds = ntlm::Credentials::new(&text(&v["user"]), &text(&v["password"]));
    creds.domain = text(&v["domain"]);
    let init = ntlm::Initiator::new(creds);
    let rnd = ntlm::Randomness {
        client_challenge: arr(&v["client_challenge"]),
        session_key: arr(&v["random_session_key"]),
        now: 0,
    };
    let (auth, mut session) = init.authenticate(&ch, rnd).unwrap();
    let field = |at: usize| {
        let len = u16::from_le_bytes([auth[at], auth[at + 1]]) as usize;
        let off = u32::from_le_bytes(auth[at + 4..at + 8].try_into().unwrap()) as usize;
        auth[off..off + len].to_vec()
    };
    assert_eq!(field(12), v["lmv2_response"]);
    let nt = field(20);
    assert_eq!(nt[..16].to_vec(), v["nt_proof_str"]);
    assert_eq!(nt[16..].to_vec(), v["temp"]);
    assert_eq!(field(52), v["encrypted_session_key"]);

    let (sealed, sig) = session.wrap(&v["plaintext"]);
    assert_eq!(sealed, v["client_sealed"]);
    assert_eq!(sig.to_vec(), v["client_signature"]);
    // And the session's other direction opens the server's sealed message.
    assert_eq!(
        session
            .unwrap(&v["server_sealed"], &v["server_signature"])
            .unwrap(),
        v["plaintext"]
    );
}

#[test]
fn gss_wrap_both_directions() {
    let v = vectors();
    let rsk: [u8; 16] = arr(&v["random_session_key"]);
    let mut client = Session::new(rsk, true, true);
    let (sealed, sig) = client.wrap(&v["plaintext"]);
    assert_eq!(sealed, v["client_sealed"]);
    assert_eq!(sig.to_vec(), v["client_signature"]);

    let mut server = Session::new(rsk, true, false);
    let (sealed, sig) = server.wrap(&v["plaintext"]);
    assert_eq!(sealed, v["server_sealed"]);
    assert_eq!(sig.to_vec(), v["server_signature"]);
    assert_eq!(
        server
            .unwrap(&v["client_sealed"], &v["client_signature"])
            .unwrap(),
        v["plaintext"]
    );
    // The same message again (sequence number 0 replayed) is refused.
    assert!(server
        .unwrap(&v["client_sealed"], &v["client_signature"])
        .is_err());
}

#[test]
fn sealing_matches_bodgit_ntlmssp_with_and_without_key_exchange() {
    let v = load("masterzen-bodgit.txt");
    let key: [u8; 16] = arr(&v["seal_session_key"]);
    for (kx, name) in [(true, "seal_128_keyexch"), (false, "seal_128_no_keyexch")] {
        let mut client = Session::new(key, kx, true);
        let (sealed, sig) = client.wrap(&v["seal_plaintext"]);
        assert_eq!(sealed, v[&format!("{name}_ciphertext")], "{name}");
        assert_eq!(sig.to_vec(), v[&format!("{name}_signature")], "{name}");
        let mut server = Session::new(key, kx, false);
        assert_eq!(
            server
                .unwrap(
                    &v[&format!("{name}_ciphertext")],
                    &v[&format!("{name}_signature")]
                )
                .unwrap(),
            v["seal_plaintext"]
        );
    }
}

#[test]
fn mic_av_flags_and_nt_response_match_bodgit_ntlmssp() {
    let v = load("masterzen-bodgit.txt");
    let user = String::from_utf8(v["mic_user"].clone()).unwrap();
    let password = String::from_utf8(v["mic_password"].clone()).unwrap();
    for case in ["flags_absent", "flags_present"] {
        let init = ntlm::Initiator::new(ntlm::Credentials::new(&user, &password));
        let rnd = ntlm::Randomness {
            client_challenge: arr(&v[&format!("{case}_client_challenge")]),
            session_key: [0x42; 16], // unused: the challenge grants no KEY_EXCH
            now: 0,                  // unused: the challenge carries a timestamp
        };
        let (auth, _) = init
            .authenticate(&v[&format!("{case}_challenge")], rnd)
            .unwrap();
        let len = u16::from_le_bytes([auth[20], auth[21]]) as usize;
        let off = u32::from_le_bytes(auth[24..28].try_into().unwrap()) as usize;
        assert_eq!(
            auth[off..off + len].to_vec(),
            v[&format!("{case}_nt_response")],
            "{case}"
        );
        // With a server timestamp the LM response is all zeros and a MIC is present.
        let lm_len = u16::from_le_bytes([auth[12], auth[13]]) as usize;
        let lm_off = u32::from_le_bytes(auth[16..20].try_into().unwrap()) as usize;
        assert_eq!(auth[lm_off..lm_off + lm_len], [0u8; 24], "{case}");
        assert_ne!(auth[72..88], [0u8; 16], "{case}: MIC");
    }
}
