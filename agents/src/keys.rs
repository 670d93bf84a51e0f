//! Client keys: per-build ephemeral key pairs, and loading user-supplied keys.

use std::io::Write;
use std::path::Path;

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

use crate::communicator::HostKeyFingerprint;
use crate::error::KeyError;

/// A freshly generated key pair.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private half, ready for [`crate::ConnectConfig::key`].
    pub private: PrivateKey,
    /// The public half as one `authorized_keys` line without a trailing newline, e.g.
    /// `ssh-ed25519 AAAAC3Nza… kiln-build-42`; this is what goes into cloud-init's
    /// `ssh_authorized_keys` or ovf-env.xml.
    pub public_line: String,
}

/// Generate an ed25519 key pair for one build. `comment` ends up in the public line (use
/// something that names the build, so a leftover key in an image can be traced).
pub fn generate_ed25519(comment: &str) -> Result<KeyPair, KeyError> {
    let mut private =
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|e| KeyError::Crypto {
            what: "generating an ed25519 key".into(),
            detail: e.to_string(),
        })?;
    private.set_comment(comment);
    let public_line = private
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Crypto {
            what: "encoding an ed25519 public key".into(),
            detail: e.to_string(),
        })?;
    Ok(KeyPair {
        private,
        public_line,
    })
}

/// Write `key` to `path` in OpenSSH format with mode 0600 (so `ssh -i` accepts it for debugging
/// a kept VM). An existing file is replaced and its mode tightened.
pub fn write_private_key(key: &PrivateKey, path: &Path) -> Result<(), KeyError> {
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Crypto {
            what: format!("encoding the private key for {}", path.display()),
            detail: e.to_string(),
        })?;
    let io = |what: &'static str| {
        move |source| KeyError::Io {
            what,
            path: path.into(),
            source,
        }
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(io("cannot create the key file"))?;
    #[cfg(unix)]
    {
        // `mode` only applies when the file is created; an existing file keeps its bits.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot restrict the mode of"))?;
    }
    file.write_all(text.as_bytes())
        .map_err(io("cannot write the key file"))?;
    file.sync_all().map_err(io("cannot sync the key file"))?;
    Ok(())
}

/// Load an unencrypted OpenSSH or PEM private key (ed25519, RSA, ECDSA) from `path`.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyError> {
    russh::keys::load_secret_key(path, None).map_err(|e| KeyError::Parse {
        path: path.into(),
        detail: e.to_string(),
    })
}

/// The SHA-256 fingerprint of a public key, as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PublicKey) -> HostKeyFingerprint {
    HostKeyFingerprint(key.fingerprint(HashAlg::Sha256).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_through_a_0600_file() {
        let pair = generate_ed25519("kiln-test").unwrap();
        assert!(
            pair.public_line.starts_with("ssh-ed25519 AAAA"),
            "{}",
            pair.public_line
        );
        assert!(
            pair.public_line.ends_with(" kiln-test"),
            "{}",
            pair.public_line
        );
        assert!(!pair.public_line.contains('\n'));

        let dir = std::env::temp_dir().join(format!("kiln-agents-keytest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id_ed25519");
        // A pre-existing, world-readable file must end up 0600 too.
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        write_private_key(&pair.private, &path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let loaded = load_private_key(&path).unwrap();
        assert_eq!(loaded.public_key().to_openssh().unwrap(), pair.public_line);
        assert_eq!(
            fingerprint(loaded.public_key()),
            fingerprint(pair.private.public_key())
        );
        assert!(fingerprint(loaded.public_key()).0.starts_with("SHA256:"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = generate_ed25519("a").unwrap();
        let b = generate_ed25519("a").unwrap();
        assert_ne!(a.public_line, b.public_line);
    }

    #[test]
    fn loading_garbage_names_the_path() {
        let path = std::env::temp_dir().join(format!("kiln-agents-badkey-{}", std::process::id()));
        std::fs::write(&path, "not a key").unwrap();
        let err = load_private_key(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
