//! What a node pins about its verifier: the TLS key and the attestation signing keys.

use hopmesh_protocol::attestation::{KeySet, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The verifier pins, as printed by `hopmesh-verifier init` (JSON, hex strings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    /// SHA-256 of the verifier's TLS SPKI.
    pub verifier_tls_spki_sha256: String,
    /// Ed25519 public keys that sign attestations and revocation lists (current, next).
    pub signing_keys: Vec<String>,
}

/// Why pins are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinsError {
    /// A value is not hex of the right length.
    #[error("pins: {0} must be 64 hex digits")]
    BadHex(&'static str),
    /// No signing key, or more than 4.
    #[error("pins: need 1 to 4 signing keys")]
    KeyCount,
}

fn hex32(s: &str, what: &'static str) -> Result<[u8; 32], PinsError> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(PinsError::BadHex(what));
    }
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(chunk).map_err(|_| PinsError::BadHex(what))?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| PinsError::BadHex(what))?;
    }
    Ok(out)
}

impl Pins {
    /// The TLS pin.
    pub fn tls_pin(&self) -> Result<[u8; 32], PinsError> {
        hex32(&self.verifier_tls_spki_sha256, "verifier_tls_spki_sha256")
    }

    /// The pinned signing keys, as a set.
    pub fn key_set(&self) -> Result<KeySet, PinsError> {
        KeySet::new(self.signing_keys()?).map_err(|_| PinsError::KeyCount)
    }

    /// The pinned signing keys (at least one).
    pub fn signing_keys(&self) -> Result<Vec<VerifyingKey>, PinsError> {
        if self.signing_keys.is_empty() {
            return Err(PinsError::KeyCount);
        }
        self.signing_keys
            .iter()
            .map(|k| hex32(k, "signing_keys[]").map(VerifyingKey))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_refuse_garbage() {
        let p = Pins {
            verifier_tls_spki_sha256: "ab".repeat(32),
            signing_keys: vec!["01".repeat(32)],
        };
        assert_eq!(p.tls_pin(), Ok([0xAB; 32]));
        assert!(
            p.key_set()
                .expect("keys")
                .get(&VerifyingKey([1; 32]).key_id())
                .is_some()
        );
        let bad = Pins {
            verifier_tls_spki_sha256: "zz".repeat(32),
            signing_keys: vec![],
        };
        assert!(bad.tls_pin().is_err());
        assert_eq!(bad.key_set(), Err(PinsError::KeyCount));
    }
}
