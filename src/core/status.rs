//! Node status and the server key document.

use serde_json::{json, Value as JsonValue};

use super::{Core, Error, Result};
use crate::store::Tree;

const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

fn base58(bytes: &[u8]) -> String {
    let mut digits: Vec<u8> = Vec::new();
    for &b in bytes {
        let mut carry = b as u32;
        for d in digits.iter_mut() {
            carry += (*d as u32) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    std::iter::repeat_n('1', zeros).chain(digits.iter().rev().map(|&d| BASE58[d as usize] as char)).collect()
}

/// The libp2p peer id of an ed25519 public key: base58 of the identity multihash of the
/// protobuf-encoded key (libp2p's peer-id spec). The mesh uses the same key, so this is the
/// node's peer id.
pub fn peer_id_of(public: &[u8; 32]) -> String {
    let mut mh = vec![0x00, 36, 0x08, 0x01, 0x12, 0x20];
    mh.extend_from_slice(public);
    base58(&mh)
}

impl Core {
    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> String {
        peer_id_of(&self.identity.public_key().to_bytes())
    }

    /// `GET /_outpost/v1/status`.
    pub fn status(&self) -> Result<JsonValue> {
        let count = |t: Tree| -> Result<usize> { Ok(self.store.scan_prefix(t, b"", usize::MAX)?.len()) };
        Ok(json!({
            "server_name": self.server_name(),
            "peer_id": self.peer_id(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.now_ms().saturating_sub(self.started_ms) / 1000,
            "counts": {
                "users": count(Tree::Users)?,
                "rooms": count(Tree::Rooms)?,
                "stream_position": self.visible_pos(),
                "flushes": self.flush_count(),
            },
            "store_bytes": self.store_size(),
        }))
    }

    /// The self-signed key document of `/_matrix/key/v2/server`.
    pub fn server_keys(&self) -> JsonValue {
        let key_id = self.identity.key_id().to_string();
        let doc = json!({
            "server_name": self.server_name(),
            "verify_keys": { key_id: { "key": self.identity.public_key_base64().encode() } },
            "old_verify_keys": {},
            "valid_until_ts": self.now_ms() + 7 * 24 * 3600 * 1000,
        });
        let mut obj = match ruma::canonical_json::to_canonical_value(&doc) {
            Ok(ruma::CanonicalJsonValue::Object(o)) => o,
            _ => return doc,
        };
        if let Err(e) = ruma::signatures::sign_json(self.server_name().as_str(), self.identity.key_pair(), &mut obj) {
            tracing::error!(error = %e, "cannot sign the key document");
            return doc;
        }
        serde_json::to_value(obj).map_err(|e| Error::Internal(e.to_string())).unwrap_or(doc)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base58_matches_known_values() {
        assert_eq!(super::base58(b"hello world"), "StV1DL6CwTryKyV");
        assert_eq!(super::base58(&[0, 0, 1]), "112");
    }
}
