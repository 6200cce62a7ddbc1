//! The node's identity: one ed25519 key pair. Its public key, in lowercase hex, is the Matrix
//! server name; the same key signs events and (in the mesh) is the libp2p identity.

use std::{fmt, path::Path};

use ed25519_dalek::{SigningKey, VerifyingKey};
use ruma::{serde::Base64, signatures::Ed25519KeyPair, OwnedServerName, OwnedServerSigningKeyId};

/// The fixed key version: every node has exactly one key, so the id never changes.
pub const KEY_VERSION: &str = "p2p";

/// File name of the key (32-byte ed25519 seed) inside the data directory.
pub const KEY_FILE: &str = "signing.key";

/// A node's key pair and the names derived from it.
pub struct Identity {
    signing_key: SigningKey,
    key_pair: Ed25519KeyPair,
    server_name: OwnedServerName,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file exists but does not hold a 32-byte seed.
    #[error("key file {0} is not a 32-byte ed25519 seed")]
    Malformed(String),
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The public key named by a self-certifying server name (64 lowercase hex chars), if it is one.
pub fn public_key_of_server_name(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in name.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl Identity {
    /// An identity from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing_key = SigningKey::from_bytes(&seed);
        let public = signing_key.verifying_key().to_bytes();
        let key_pair = key_pair_from_seed(&seed, KEY_VERSION);
        let server_name = OwnedServerName::try_from(hex(&public)).expect("64 hex chars are a valid server name");
        Self { signing_key, key_pair, server_name }
    }

    /// A fresh random identity.
    pub fn generate() -> Self {
        Self::from_seed(rand::random())
    }

    /// Load the key from `dir/signing.key`, creating it (mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(KEY_FILE);
        let io = |source| IdentityError::Io { path: path.display().to_string(), source };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; 32] =
                    bytes.try_into().map_err(|_| IdentityError::Malformed(path.display().to_string()))?;
                Ok(Self::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                let tmp = dir.join(format!("{KEY_FILE}.tmp"));
                write_private(&tmp, &id.signing_key.to_bytes()).map_err(io)?;
                std::fs::rename(&tmp, &path).map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The Matrix server name: lowercase hex of the public key.
    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    /// The key pair, for `ruma::signatures`.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key_pair
    }

    /// `ed25519:p2p`.
    pub fn key_id(&self) -> OwnedServerSigningKeyId {
        OwnedServerSigningKeyId::try_from(format!("ed25519:{KEY_VERSION}")).expect("static key id is valid")
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// The public key as unpadded base64, as in `/_matrix/key/v2/server`.
    pub fn public_key_base64(&self) -> Base64 {
        Base64::new(self.public_key().to_bytes().to_vec())
    }

    /// The 32-byte secret seed (for deriving the libp2p identity from the same key).
    pub fn seed(&self) -> [u8; 32] {
        self.signing_key.to_bytes()
    }
}

/// A `ruma::signatures` key pair from a 32-byte ed25519 seed, with key version `version`
/// (the key id is `ed25519:<version>`).
pub fn key_pair_from_seed(seed: &[u8; 32], version: &str) -> Ed25519KeyPair {
    let public = SigningKey::from_bytes(seed).verifying_key().to_bytes();
    Ed25519KeyPair::new(ed25519_dalek::pkcs8::ALGORITHM_OID, seed, Some(&public), version.to_owned())
        .expect("a 32-byte seed with its own public key is a valid key pair")
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_named_by_hex() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.server_name(), b.server_name());
        assert_eq!(a.server_name().as_str().len(), 64);
        assert_eq!(public_key_of_server_name(a.server_name().as_str()).unwrap(), a.public_key().to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn server_name_parsing_rejects_non_keys() {
        assert!(public_key_of_server_name("example.org").is_none());
        assert!(public_key_of_server_name(&"A".repeat(64)).is_none());
    }
}
