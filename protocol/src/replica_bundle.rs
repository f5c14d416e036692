//! The replica bundle: a verifier's shared secrets (signing key, seed master secret, and the
//! pins nodes hold) sealed under a passphrase, so that a new verifier replica can import them.
//!
//! # Layout
//! ```text
//! magic "HMBUNDLE" (8) | version u8 | iterations u32 BE | salt (16) | nonce (12) | ciphertext || tag (16)
//! ```
//! - key = PBKDF2-HMAC-SHA256(passphrase, salt, iterations), 32 bytes;
//! - AEAD = ChaCha20-Poly1305 with that key and nonce; the AAD is every header byte before the
//!   ciphertext (magic, version, iterations, salt and nonce), so none can be changed unseen;
//! - the plaintext is the postcard encoding of the [`BundleContents`] fields, in order.
//!
//! # Refusals
//! [`open`] checks the size ([`BUNDLE_MAX_BYTES`]), the magic, the version and the iteration
//! count ([`PBKDF2_MIN_ITERATIONS`]..=[`PBKDF2_MAX_ITERATIONS`]) in [`SealedBundle::parse`],
//! before the KDF runs: a crafted file cannot make it spin for long. A wrong passphrase and a
//! damaged file are the same [`BundleError::Decrypt`]. The decrypted plaintext is decoded by
//! [`BundleContents::from_plaintext`], which enforces the bounds on every field.
//!
//! Pure: the caller supplies the randomness (salt and nonce, both fresh from the OS RNG for
//! every [`seal`]) and does all file IO. The derived key and every plaintext buffer are
//! zeroized when dropped.

use std::fmt;
use std::num::NonZeroU32;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::pbkdf2;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::wire::BoundedVec;

/// The first 8 bytes of every bundle file.
pub const BUNDLE_MAGIC: [u8; 8] = *b"HMBUNDLE";
/// The layout version this build writes and reads.
pub const BUNDLE_VERSION: u8 = 1;
/// Largest bundle file accepted.
pub const BUNDLE_MAX_BYTES: usize = 16 * 1024;
/// The PBKDF2 iteration count [`seal`] callers should pass (OWASP 2023 for PBKDF2-HMAC-SHA256).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
/// Fewest PBKDF2 iterations [`seal`] writes and [`open`] accepts.
pub const PBKDF2_MIN_ITERATIONS: u32 = 100_000;
/// Most PBKDF2 iterations [`seal`] writes and [`open`] accepts: a crafted file cannot make
/// [`open`] spin for more than a few seconds.
pub const PBKDF2_MAX_ITERATIONS: u32 = 10_000_000;
/// Shortest passphrase [`seal`] accepts, in bytes.
pub const MIN_PASSPHRASE_BYTES: usize = 16;
/// Most public signing keys a bundle carries.
pub const MAX_SIGNING_KEYS: usize = 16;
/// Longest PKCS#8 document a bundle carries (an Ed25519 one is 48 or 83 bytes).
pub const MAX_PKCS8_BYTES: usize = 256;

/// Bytes of the header: magic, version, iterations, salt and nonce (the AAD).
const HEADER_LEN: usize = 8 + 1 + 4 + SALT_LEN + NONCE_LEN;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// The Poly1305 tag.
const TAG_LEN: usize = 16;
/// Shortest plaintext that can decode: a 1-byte PKCS#8 (length varint and byte), the master
/// secret, the TLS pin, and one signing key (count varint and key).
const MIN_PLAINTEXT_BYTES: usize = 2 + 32 + 32 + 1 + 32;
/// Longest plaintext that can decode: [`MAX_PKCS8_BYTES`] (its length is a 2-byte varint),
/// the two 32-byte fields and [`MAX_SIGNING_KEYS`] keys (their count is a 1-byte varint).
const MAX_PLAINTEXT_BYTES: usize = 2 + MAX_PKCS8_BYTES + 32 + 32 + 1 + MAX_SIGNING_KEYS * 32;

/// What replicas share. Secrets are zeroized on drop; `Debug` redacts them.
///
/// `PartialEq` is not constant-time: compare bundles in tests and tools, not against input
/// an attacker times.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleContents {
    /// The Ed25519 signing key as a PKCS#8 document (1..=[`MAX_PKCS8_BYTES`] bytes).
    pub signing_pkcs8: Zeroizing<Vec<u8>>,
    /// The seed master secret.
    pub master_secret: Zeroizing<[u8; 32]>,
    /// `verifier_tls_spki_sha256` of `pins.json`: SHA-256 of the verifier's TLS SPKI.
    pub verifier_tls_pin: [u8; 32],
    /// `signing_keys` of `pins.json`: the public signing keys nodes accept
    /// (1..=[`MAX_SIGNING_KEYS`]).
    pub signing_keys: Vec<[u8; 32]>,
}

impl fmt::Debug for BundleContents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self.signing_keys.iter().map(hex::encode).collect();
        f.debug_struct("BundleContents")
            .field(
                "signing_pkcs8",
                &format_args!("<redacted, {} bytes>", self.signing_pkcs8.len()),
            )
            .field("master_secret", &format_args!("<redacted>"))
            .field(
                "verifier_tls_pin",
                &format_args!("{}", hex::encode(self.verifier_tls_pin)),
            )
            .field("signing_keys", &keys)
            .finish()
    }
}

/// Why a bundle could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// The file is over [`BUNDLE_MAX_BYTES`] (its length).
    #[error("bundle of {0} bytes exceeds {BUNDLE_MAX_BYTES}")]
    TooLarge(usize),
    /// The file does not start with [`BUNDLE_MAGIC`]: not a replica bundle.
    #[error("not a replica bundle (bad magic)")]
    BadMagic,
    /// The layout version is not [`BUNDLE_VERSION`].
    #[error("unsupported bundle version {0}")]
    UnsupportedVersion(u8),
    /// The PBKDF2 iteration count is outside
    /// [`PBKDF2_MIN_ITERATIONS`]..=[`PBKDF2_MAX_ITERATIONS`].
    #[error("PBKDF2 iteration count {0} outside {PBKDF2_MIN_ITERATIONS}..={PBKDF2_MAX_ITERATIONS}")]
    BadIterations(u32),
    /// The passphrase is shorter than [`MIN_PASSPHRASE_BYTES`].
    #[error("passphrase shorter than {MIN_PASSPHRASE_BYTES} bytes")]
    WeakPassphrase,
    /// Authentication failed: wrong passphrase or damaged file.
    #[error("cannot decrypt the bundle: wrong passphrase or damaged file")]
    Decrypt,
    /// The file is truncated, or the contents break a bound or do not decode (the reason).
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// The cryptographic library refused an operation.
    #[error("cryptographic failure")]
    Crypto,
}

/// The plaintext as written: the fields of [`BundleContents`], borrowed.
#[derive(Serialize)]
struct PlaintextRef<'a> {
    signing_pkcs8: &'a [u8],
    master_secret: &'a [u8; 32],
    verifier_tls_pin: &'a [u8; 32],
    signing_keys: &'a [[u8; 32]],
}

/// The plaintext as read: the same layout as [`PlaintextRef`]. The collections are bounded by
/// what fits in [`MAX_PLAINTEXT_BYTES`] (so decoding never allocates more than that); the
/// tighter bounds are checked after decoding, with a reason each.
#[derive(Deserialize)]
struct PlaintextOwned {
    signing_pkcs8: BoundedVec<u8, MAX_PLAINTEXT_BYTES>,
    master_secret: [u8; 32],
    verifier_tls_pin: [u8; 32],
    signing_keys: BoundedVec<[u8; 32], { MAX_PLAINTEXT_BYTES / 32 }>,
}

impl BundleContents {
    /// Decodes the decrypted plaintext (the other fuzzed decoder), enforcing the bounds:
    /// a PKCS#8 of 1..=[`MAX_PKCS8_BYTES`] bytes, 1..=[`MAX_SIGNING_KEYS`] signing keys, no
    /// trailing bytes, and the canonical encoding only.
    pub fn from_plaintext(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_PLAINTEXT_BYTES {
            return Err(malformed(format!(
                "plaintext of {} bytes exceeds {MAX_PLAINTEXT_BYTES}",
                bytes.len()
            )));
        }
        let (plain, rest) = postcard::take_from_bytes::<PlaintextOwned>(bytes)
            .map_err(|e| malformed(format!("plaintext does not decode: {e}")))?;
        let PlaintextOwned {
            signing_pkcs8,
            mut master_secret,
            verifier_tls_pin,
            signing_keys,
        } = plain;
        let contents = Self {
            signing_pkcs8: Zeroizing::new(signing_pkcs8.into_inner()),
            master_secret: Zeroizing::new(master_secret),
            verifier_tls_pin,
            signing_keys: signing_keys.into_inner(),
        };
        master_secret.zeroize();
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} trailing bytes after the plaintext",
                rest.len()
            )));
        }
        contents.check_bounds()?;
        if *contents.to_plaintext() != *bytes {
            return Err(malformed("non-canonical plaintext encoding".into()));
        }
        Ok(contents)
    }

    /// Encodes the plaintext that [`seal`] encrypts, into a buffer zeroized on drop.
    pub fn to_plaintext(&self) -> Zeroizing<Vec<u8>> {
        let plain = PlaintextRef {
            signing_pkcs8: &self.signing_pkcs8,
            master_secret: &self.master_secret,
            verifier_tls_pin: &self.verifier_tls_pin,
            signing_keys: &self.signing_keys,
        };
        // Invariant: postcard fails only on a full buffer or a sequence of unknown length;
        // the buffer has the exact size and every sequence here is a slice. Sizing it first
        // means it is never reallocated, so no copy of the secrets is left behind.
        #[allow(clippy::expect_used)]
        let len = postcard::serialize_with_flavor(&plain, postcard::ser_flavors::Size::default())
            .expect("slices have a known length");
        let mut out = Zeroizing::new(vec![0u8; len]);
        #[allow(clippy::expect_used)]
        postcard::to_slice(&plain, &mut out).expect("the buffer has the exact size");
        out
    }

    /// The bounds [`BundleContents::from_plaintext`] enforces (and [`seal`] checks first).
    fn check_bounds(&self) -> Result<(), BundleError> {
        let pkcs8 = self.signing_pkcs8.len();
        if pkcs8 == 0 {
            return Err(malformed("empty signing key PKCS#8".into()));
        }
        if pkcs8 > MAX_PKCS8_BYTES {
            return Err(malformed(format!(
                "signing key PKCS#8 of {pkcs8} bytes exceeds {MAX_PKCS8_BYTES}"
            )));
        }
        let keys = self.signing_keys.len();
        if keys == 0 {
            return Err(malformed("no signing keys".into()));
        }
        if keys > MAX_SIGNING_KEYS {
            return Err(malformed(format!(
                "{keys} signing keys exceed {MAX_SIGNING_KEYS}"
            )));
        }
        Ok(())
    }
}

fn malformed(reason: String) -> BundleError {
    BundleError::Malformed(reason)
}

fn check_iterations(iterations: u32) -> Result<NonZeroU32, BundleError> {
    if !(PBKDF2_MIN_ITERATIONS..=PBKDF2_MAX_ITERATIONS).contains(&iterations) {
        return Err(BundleError::BadIterations(iterations));
    }
    NonZeroU32::new(iterations).ok_or(BundleError::BadIterations(iterations))
}

/// The parsed, still-encrypted file (the fuzzed decoder; no KDF runs here).
pub struct SealedBundle<'a> {
    /// PBKDF2 iteration count, within [`PBKDF2_MIN_ITERATIONS`]..=[`PBKDF2_MAX_ITERATIONS`].
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 16],
    /// ChaCha20-Poly1305 nonce.
    pub nonce: [u8; 12],
    /// Every byte before the ciphertext: the AAD.
    header: &'a [u8],
    /// Ciphertext and tag.
    ciphertext: &'a [u8],
}

impl fmt::Debug for SealedBundle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBundle")
            .field("iterations", &self.iterations)
            .field("salt", &format_args!("{}", hex::encode(self.salt)))
            .field("nonce", &format_args!("{}", hex::encode(self.nonce)))
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl<'a> SealedBundle<'a> {
    /// Parses the file layout, in this order: size ([`BundleError::TooLarge`]), magic,
    /// version, iteration bounds, then the length of the rest (at least the shortest
    /// plaintext and the tag). Decrypts nothing.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BundleError> {
        if bytes.len() > BUNDLE_MAX_BYTES {
            return Err(BundleError::TooLarge(bytes.len()));
        }
        let truncated = || malformed(format!("truncated bundle of {} bytes", bytes.len()));
        let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(if BUNDLE_MAGIC.starts_with(bytes) {
                truncated()
            } else {
                BundleError::BadMagic
            });
        };
        if *magic != BUNDLE_MAGIC {
            return Err(BundleError::BadMagic);
        }
        let Some((&version, rest)) = rest.split_first() else {
            return Err(truncated());
        };
        if version != BUNDLE_VERSION {
            return Err(BundleError::UnsupportedVersion(version));
        }
        let Some((iterations, rest)) = rest.split_first_chunk::<4>() else {
            return Err(truncated());
        };
        let iterations = u32::from_be_bytes(*iterations);
        check_iterations(iterations)?;
        let Some((salt, rest)) = rest.split_first_chunk::<SALT_LEN>() else {
            return Err(truncated());
        };
        let Some((nonce, ciphertext)) = rest.split_first_chunk::<NONCE_LEN>() else {
            return Err(truncated());
        };
        if ciphertext.len() < MIN_PLAINTEXT_BYTES + TAG_LEN {
            return Err(truncated());
        }
        Ok(Self {
            iterations,
            salt: *salt,
            nonce: *nonce,
            header: &bytes[..HEADER_LEN],
            ciphertext,
        })
    }

    /// PBKDF2-HMAC-SHA256 of the passphrase under this file's salt and iteration count.
    fn derive_key(&self, passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>, BundleError> {
        Ok(derive_key(
            passphrase,
            &self.salt,
            check_iterations(self.iterations)?,
        ))
    }

    /// Authenticates and decrypts with `key`, then decodes the plaintext.
    fn decrypt(&self, key: &[u8; 32]) -> Result<BundleContents, BundleError> {
        let key = aead_key(key)?;
        let mut buf = Zeroizing::new(self.ciphertext.to_vec());
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(self.header),
                &mut buf,
            )
            .map_err(|_| BundleError::Decrypt)?;
        BundleContents::from_plaintext(plain)
    }
}

fn derive_key(
    passphrase: &[u8],
    salt: &[u8; SALT_LEN],
    iterations: NonZeroU32,
) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        passphrase,
        &mut key[..],
    );
    key
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, BundleError> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| BundleError::Crypto)
}

/// Seals `contents` under `passphrase`. `salt` and `nonce` must be fresh from the OS RNG for
/// every call; `iterations` is normally [`PBKDF2_ITERATIONS`].
///
/// Refuses, before the KDF runs: `iterations` out of bounds ([`BundleError::BadIterations`]),
/// a passphrase shorter than [`MIN_PASSPHRASE_BYTES`] ([`BundleError::WeakPassphrase`]), and
/// contents [`open`] would refuse ([`BundleError::Malformed`]).
pub fn seal(
    contents: &BundleContents,
    passphrase: &[u8],
    salt: [u8; 16],
    nonce: [u8; 12],
    iterations: u32,
) -> Result<Vec<u8>, BundleError> {
    let rounds = check_iterations(iterations)?;
    if passphrase.len() < MIN_PASSPHRASE_BYTES {
        return Err(BundleError::WeakPassphrase);
    }
    contents.check_bounds()?;
    let plaintext = contents.to_plaintext();
    // Sized up front so it is never reallocated (which would leave plaintext behind), and
    // zeroized if sealing fails with the plaintext still in it.
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN));
    out.extend_from_slice(&BUNDLE_MAGIC);
    out.push(BUNDLE_VERSION);
    out.extend_from_slice(&iterations.to_be_bytes());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&plaintext);
    let key = aead_key(&derive_key(passphrase, &salt, rounds))?;
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&*header),
            body,
        )
        .map_err(|_| BundleError::Crypto)?;
    out.extend_from_slice(tag.as_ref());
    if out.len() > BUNDLE_MAX_BYTES {
        return Err(BundleError::TooLarge(out.len()));
    }
    // `out` now holds only ciphertext; the empty vector left behind is dropped.
    Ok(std::mem::take(&mut *out))
}

/// Opens a bundle file: [`SealedBundle::parse`] (every refusal there comes before the KDF),
/// then PBKDF2, then authenticated decryption ([`BundleError::Decrypt`] for a wrong
/// passphrase or a damaged file), then [`BundleContents::from_plaintext`].
///
/// A passphrase shorter than [`MIN_PASSPHRASE_BYTES`] cannot have sealed a bundle, so it is
/// refused as [`BundleError::WeakPassphrase`] after the parse, without running the KDF.
pub fn open(bytes: &[u8], passphrase: &[u8]) -> Result<BundleContents, BundleError> {
    let sealed = SealedBundle::parse(bytes)?;
    if passphrase.len() < MIN_PASSPHRASE_BYTES {
        return Err(BundleError::WeakPassphrase);
    }
    let key = sealed.derive_key(passphrase)?;
    sealed.decrypt(&key)
}

/// Fuzz property (shared by `protocol/fuzz` and `protocol/tests/fuzz_loops.rs`; not part of
/// the stable API): feeds `data` to both decoders ([`SealedBundle::parse`] and
/// [`BundleContents::from_plaintext`]; never [`open`], whose KDF is slow) and panics if what
/// they accept breaks a bound or does not re-encode to the same bytes. Returns whether either
/// accepted.
#[doc(hidden)]
pub fn fuzz_decoders(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(sealed) = SealedBundle::parse(data) {
        assert!(data.len() <= BUNDLE_MAX_BYTES, "size bound");
        assert!(
            check_iterations(sealed.iterations).is_ok(),
            "iteration bound"
        );
        assert_eq!(sealed.header.len(), HEADER_LEN, "header length");
        let mut again = sealed.header.to_vec();
        again.extend_from_slice(sealed.ciphertext);
        assert_eq!(again, data, "header and ciphertext are the whole file");
        assert_eq!(&sealed.header[..8], &BUNDLE_MAGIC, "magic");
        assert_eq!(sealed.header[8], BUNDLE_VERSION, "version");
        assert_eq!(
            sealed.header[9..13],
            sealed.iterations.to_be_bytes(),
            "iterations"
        );
        assert_eq!(sealed.header[13..29], sealed.salt, "salt");
        assert_eq!(sealed.header[29..41], sealed.nonce, "nonce");
        assert!(sealed.ciphertext.len() >= TAG_LEN, "room for the tag");
        accepted = true;
    }
    if let Ok(contents) = BundleContents::from_plaintext(data) {
        assert!(
            (1..=MAX_PKCS8_BYTES).contains(&contents.signing_pkcs8.len()),
            "PKCS#8 bound"
        );
        assert!(
            (1..=MAX_SIGNING_KEYS).contains(&contents.signing_keys.len()),
            "signing key bound"
        );
        assert_eq!(
            &contents.to_plaintext()[..],
            data,
            "plaintext must be canonical"
        );
        accepted = true;
    }
    accepted
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::attestation::SigningKey;
    use crate::secret::SigningSeed;

    const PASSPHRASE: &[u8] = b"correct horse battery staple";
    const SALT: [u8; 16] = [0x5A; 16];
    const NONCE: [u8; 12] = [0x4E; 12];
    const SEED: [u8; 32] = [0x11; 32];
    const MASTER: [u8; 32] = [0xC3; 32];

    /// The sealed [`golden_contents`]: `seal(&golden_contents(), PASSPHRASE, SALT, NONCE,
    /// PBKDF2_MIN_ITERATIONS)`, printed once with `hex::encode` (from the failing assertion of
    /// `golden_bytes` with an empty constant) and pasted here, split by field. Checked once
    /// independently: Python's `hashlib.pbkdf2_hmac("sha256", ...)` and `cryptography`'s
    /// `ChaCha20Poly1305(key).decrypt(nonce, ciphertext || tag, header)` give the plaintext
    /// `30 || PKCS#8 || c3*32 || 70*32 || 02 || public key || 22*32`. It must never change:
    /// files sealed by older builds must keep opening.
    const GOLDEN_HEX: &str = concat!(
        "484d42554e444c45",                 // magic "HMBUNDLE"
        "01",                               // version
        "000186a0",                         // iterations 100 000
        "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", // salt
        "4e4e4e4e4e4e4e4e4e4e4e4e",         // nonce
        // ciphertext (178 bytes)
        "3cee5b850aec27fbc855f188c9b90c8684a4f5bc4bb4f523b02f8106d53ad1eb",
        "31b5dee1f5ca8c49298d7fe35d137d0647671e28c23fa8da1786a97eef787b40",
        "4499acbb5ae47fd38fc1c347a600f714b007cf37cbbe08459f234c09b8097254",
        "df1b3bd2bb110b8be1ec39fb5649ee38a056914d4d20631650941e06fc76dd26",
        "cfae27b8770958ec64c5c27e8d40bed2728afe3703e23952979e27493f173164",
        "fa8407b688520628b2b648726e9476de75fe",
        "b865f1f1152af8ead5aeab9d81eb95a2", // tag
    );

    /// Ed25519 PKCS#8 v1 (RFC 8410) of [`SEED`]: the fixed prefix, then the seed.
    fn golden_pkcs8() -> Vec<u8> {
        let mut der = hex::decode("302e020100300506032b657004220420").expect("hex");
        der.extend_from_slice(&SEED);
        der
    }

    fn golden_contents() -> BundleContents {
        let public = SigningKey::from_seed(&SigningSeed::from_bytes(SEED))
            .verifying_key()
            .0;
        BundleContents {
            signing_pkcs8: Zeroizing::new(golden_pkcs8()),
            master_secret: Zeroizing::new(MASTER),
            verifier_tls_pin: [0x70; 32],
            signing_keys: vec![public, [0x22; 32]],
        }
    }

    fn golden() -> Vec<u8> {
        hex::decode(GOLDEN_HEX).expect("golden hex")
    }

    /// A sealed file with `iterations` written over the header (it will not decrypt).
    fn with_iterations(iterations: u32) -> Vec<u8> {
        let mut file = golden();
        file[9..13].copy_from_slice(&iterations.to_be_bytes());
        file
    }

    #[test]
    fn round_trip() {
        let contents = golden_contents();
        let file = seal(
            &contents,
            b"another long passphrase",
            [1; 16],
            [2; 12],
            PBKDF2_MIN_ITERATIONS + 1,
        )
        .expect("seal");
        assert_eq!(
            file.len(),
            HEADER_LEN + contents.to_plaintext().len() + TAG_LEN
        );
        let opened = open(&file, b"another long passphrase").expect("open");
        assert_eq!(opened, contents);
        let parsed = SealedBundle::parse(&file).expect("parse");
        assert_eq!(parsed.iterations, PBKDF2_MIN_ITERATIONS + 1);
        assert_eq!((parsed.salt, parsed.nonce), ([1; 16], [2; 12]));
    }

    #[test]
    fn round_trip_at_the_bounds() {
        let big = BundleContents {
            signing_pkcs8: Zeroizing::new(vec![0xAB; MAX_PKCS8_BYTES]),
            master_secret: Zeroizing::new([0; 32]),
            verifier_tls_pin: [0xFF; 32],
            signing_keys: vec![[0x99; 32]; MAX_SIGNING_KEYS],
        };
        assert_eq!(big.to_plaintext().len(), MAX_PLAINTEXT_BYTES);
        let small = BundleContents {
            signing_pkcs8: Zeroizing::new(vec![1]),
            signing_keys: vec![[0x98; 32]],
            ..big.clone()
        };
        assert_eq!(small.to_plaintext().len(), MIN_PLAINTEXT_BYTES);
        for contents in [big, small] {
            let file =
                seal(&contents, PASSPHRASE, SALT, NONCE, PBKDF2_MIN_ITERATIONS).expect("seal");
            assert_eq!(open(&file, PASSPHRASE).expect("open"), contents);
            assert!(fuzz_decoders(&file) && fuzz_decoders(&contents.to_plaintext()));
        }
    }

    #[test]
    fn golden_bytes() {
        let file = seal(
            &golden_contents(),
            PASSPHRASE,
            SALT,
            NONCE,
            PBKDF2_MIN_ITERATIONS,
        )
        .expect("seal");
        assert_eq!(hex::encode(&file), GOLDEN_HEX);
        let opened = open(&golden(), PASSPHRASE).expect("open");
        assert_eq!(opened, golden_contents());
        // The key inside is a real Ed25519 key, the first of the pinned signing keys.
        let key = SigningKey::from_pkcs8(&opened.signing_pkcs8).expect("PKCS#8");
        assert_eq!(key.verifying_key().0, opened.signing_keys[0]);
    }

    #[test]
    fn wrong_passphrase() {
        assert_eq!(
            open(&golden(), b"correct horse battery stapler"),
            Err(BundleError::Decrypt)
        );
        assert_eq!(open(&golden(), b"short"), Err(BundleError::WeakPassphrase));
    }

    /// Every single-byte change of the golden file (xor 0x01 and 0xFF at every position) is
    /// an error. Flips that leave the salt and iteration count as they are give the same key,
    /// so those decrypt with the golden key derived once (the path `open` takes after its
    /// KDF); the others (salt and in-bounds iteration flips) run the whole `open`.
    #[test]
    fn every_byte_flip_is_refused() {
        let start = Instant::now();
        let file = golden();
        let key = SealedBundle::parse(&file)
            .expect("parse")
            .derive_key(PASSPHRASE)
            .expect("key");
        let mut full_opens = 0;
        for i in 0..file.len() {
            for mask in [0x01u8, 0xFF] {
                let mut bad = file.clone();
                bad[i] ^= mask;
                let result = match SealedBundle::parse(&bad) {
                    Err(e) => Err(e),
                    Ok(p) if p.salt == SALT && p.iterations == PBKDF2_MIN_ITERATIONS => {
                        p.decrypt(&key)
                    }
                    Ok(p) => {
                        // Bound the runtime: no flip used here may raise the count much.
                        assert!(p.iterations <= 2 * PBKDF2_MIN_ITERATIONS, "flip at {i}");
                        full_opens += 1;
                        open(&bad, PASSPHRASE)
                    }
                };
                let err = result.expect_err("a changed byte must be refused");
                let as_expected = match i {
                    0..8 => err == BundleError::BadMagic,
                    8 => err == BundleError::UnsupportedVersion(BUNDLE_VERSION ^ mask),
                    9..13 => matches!(err, BundleError::BadIterations(_) | BundleError::Decrypt),
                    _ => err == BundleError::Decrypt,
                };
                assert!(as_expected, "flip {mask:#04x} at {i}: {err:?}");
            }
        }
        // Salt flips (16 positions, two masks) and the two in-bounds iteration flips.
        assert_eq!(full_opens, 2 * SALT_LEN + 2);
        eprintln!("every_byte_flip_is_refused: {:?}", start.elapsed());
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let file = golden();
        let key = SealedBundle::parse(&file)
            .expect("parse")
            .derive_key(PASSPHRASE)
            .expect("key");
        for len in 0..file.len() {
            let cut = &file[..len];
            let result = SealedBundle::parse(cut).and_then(|p| p.decrypt(&key));
            match result {
                Err(BundleError::Malformed(_)) => {
                    assert!(len < HEADER_LEN + MIN_PLAINTEXT_BYTES + TAG_LEN, "at {len}")
                }
                Err(BundleError::Decrypt) => {
                    assert!(
                        len >= HEADER_LEN + MIN_PLAINTEXT_BYTES + TAG_LEN,
                        "at {len}"
                    )
                }
                other => panic!("truncation to {len}: {other:?}"),
            }
        }
        // One of them through the whole `open`.
        assert_eq!(
            open(&file[..file.len() - 1], PASSPHRASE),
            Err(BundleError::Decrypt)
        );
        for extra in [&[0u8][..], &[0; 16], &file[HEADER_LEN..]] {
            let mut long = file.clone();
            long.extend_from_slice(extra);
            let parsed = SealedBundle::parse(&long).expect("parse");
            assert_eq!(parsed.decrypt(&key), Err(BundleError::Decrypt));
        }
    }

    #[test]
    fn too_large() {
        let mut file = golden();
        file.resize(BUNDLE_MAX_BYTES, 0);
        assert!(matches!(
            SealedBundle::parse(&file),
            Ok(p) if p.ciphertext.len() == BUNDLE_MAX_BYTES - HEADER_LEN
        ));
        file.push(0);
        let len = BUNDLE_MAX_BYTES + 1;
        assert_eq!(
            SealedBundle::parse(&file).err(),
            Some(BundleError::TooLarge(len))
        );
        assert_eq!(
            open(&file, PASSPHRASE).err(),
            Some(BundleError::TooLarge(len))
        );
        // Size comes first: also over garbage.
        assert_eq!(
            open(&vec![0; len], PASSPHRASE).err(),
            Some(BundleError::TooLarge(len))
        );
    }

    #[test]
    fn iteration_bounds_in_seal() {
        let contents = golden_contents();
        for n in [
            0,
            1,
            PBKDF2_MIN_ITERATIONS - 1,
            PBKDF2_MAX_ITERATIONS + 1,
            u32::MAX,
        ] {
            assert_eq!(
                seal(&contents, PASSPHRASE, SALT, NONCE, n),
                Err(BundleError::BadIterations(n))
            );
        }
    }

    /// Refused in `SealedBundle::parse`, so before the KDF: `u32::MAX` iterations would take
    /// an hour if the KDF ran, and the test would not end in a second.
    #[test]
    fn iteration_bounds_in_open_before_the_kdf() {
        let start = Instant::now();
        for n in [
            0,
            1,
            PBKDF2_MIN_ITERATIONS - 1,
            PBKDF2_MAX_ITERATIONS + 1,
            u32::MAX,
        ] {
            let file = with_iterations(n);
            assert_eq!(
                SealedBundle::parse(&file).err(),
                Some(BundleError::BadIterations(n))
            );
            assert_eq!(
                open(&file, PASSPHRASE).err(),
                Some(BundleError::BadIterations(n))
            );
        }
        assert!(start.elapsed().as_secs() < 1, "no KDF ran");
        // The bounds themselves are accepted by the parser.
        for n in [
            PBKDF2_MIN_ITERATIONS,
            PBKDF2_ITERATIONS,
            PBKDF2_MAX_ITERATIONS,
        ] {
            assert_eq!(
                SealedBundle::parse(&with_iterations(n))
                    .expect("parse")
                    .iterations,
                n
            );
        }
    }

    #[test]
    fn weak_passphrase() {
        let contents = golden_contents();
        for len in [0, 1, MIN_PASSPHRASE_BYTES - 1] {
            let pass = vec![b'p'; len];
            assert_eq!(
                seal(&contents, &pass, SALT, NONCE, PBKDF2_MIN_ITERATIONS),
                Err(BundleError::WeakPassphrase)
            );
            assert_eq!(open(&golden(), &pass), Err(BundleError::WeakPassphrase));
        }
        let pass = vec![b'p'; MIN_PASSPHRASE_BYTES];
        let file =
            seal(&contents, &pass, SALT, NONCE, PBKDF2_MIN_ITERATIONS).expect("16 bytes is enough");
        assert_eq!(open(&file, &pass).expect("open"), contents);
    }

    #[test]
    fn version_and_magic() {
        for v in [0, 2, 0xFF] {
            let mut file = golden();
            file[8] = v;
            assert_eq!(
                SealedBundle::parse(&file).err(),
                Some(BundleError::UnsupportedVersion(v))
            );
            assert_eq!(
                open(&file, PASSPHRASE).err(),
                Some(BundleError::UnsupportedVersion(v))
            );
        }
        let mut file = golden();
        file[..8].copy_from_slice(b"HMBUNDLF");
        assert_eq!(open(&file, PASSPHRASE).err(), Some(BundleError::BadMagic));
        assert_eq!(
            SealedBundle::parse(b"-----BEGIN").err(),
            Some(BundleError::BadMagic)
        );
        assert_eq!(SealedBundle::parse(b"X").err(), Some(BundleError::BadMagic));
        assert!(matches!(
            SealedBundle::parse(b"HMBUN"),
            Err(BundleError::Malformed(_))
        ));
        // Magic before version: both wrong reports the magic.
        file[8] = 9;
        assert_eq!(
            SealedBundle::parse(&file).err(),
            Some(BundleError::BadMagic)
        );
    }

    fn malformed_reason(bytes: &[u8]) -> String {
        match BundleContents::from_plaintext(bytes) {
            Err(BundleError::Malformed(reason)) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// A plaintext as `PlaintextRef` writes it, without the bounds `to_plaintext` callers get.
    fn raw_plaintext(pkcs8: &[u8], keys: &[[u8; 32]]) -> Vec<u8> {
        postcard::to_allocvec(&PlaintextRef {
            signing_pkcs8: pkcs8,
            master_secret: &MASTER,
            verifier_tls_pin: &[0x70; 32],
            signing_keys: keys,
        })
        .expect("encode")
    }

    #[test]
    fn from_plaintext_bounds() {
        let key = [[0x22; 32]];
        let good = raw_plaintext(&golden_pkcs8(), &key);
        assert!(BundleContents::from_plaintext(&good).is_ok());

        assert!(malformed_reason(&raw_plaintext(&[], &key)).contains("empty"));
        let ok = raw_plaintext(&[7; MAX_PKCS8_BYTES], &key);
        assert!(BundleContents::from_plaintext(&ok).is_ok());
        let long = raw_plaintext(&[7; MAX_PKCS8_BYTES + 1], &key);
        assert!(malformed_reason(&long).contains("257 bytes exceeds 256"));
        assert!(malformed_reason(&raw_plaintext(&golden_pkcs8(), &[])).contains("no signing"));
        let ok = raw_plaintext(&golden_pkcs8(), &[[3; 32]; MAX_SIGNING_KEYS]);
        assert!(BundleContents::from_plaintext(&ok).is_ok());
        let many = raw_plaintext(&golden_pkcs8(), &[[3; 32]; MAX_SIGNING_KEYS + 1]);
        assert!(malformed_reason(&many).contains("17 signing keys"));

        let mut trailing = good.clone();
        trailing.push(0);
        assert!(malformed_reason(&trailing).contains("1 trailing bytes"));
        // An overlong varint for the PKCS#8 length (0x30 as [0xB0, 0x00]) decodes to the
        // same value, and is refused as non-canonical.
        let mut overlong = vec![good[0] | 0x80, 0x00];
        overlong.extend_from_slice(&good[1..]);
        assert!(malformed_reason(&overlong).contains("non-canonical"));
        for len in 0..good.len() {
            malformed_reason(&good[..len]);
        }
        assert!(malformed_reason(&vec![0; MAX_PLAINTEXT_BYTES + 1]).contains("exceeds"));

        // `seal` refuses what `from_plaintext` would.
        let mut contents = golden_contents();
        contents.signing_keys.clear();
        assert!(matches!(
            seal(&contents, PASSPHRASE, SALT, NONCE, PBKDF2_MIN_ITERATIONS),
            Err(BundleError::Malformed(_))
        ));
        contents.signing_keys = vec![[0; 32]; MAX_SIGNING_KEYS + 1];
        assert!(matches!(
            seal(&contents, PASSPHRASE, SALT, NONCE, PBKDF2_MIN_ITERATIONS),
            Err(BundleError::Malformed(_))
        ));
        let mut contents = golden_contents();
        contents.signing_pkcs8 = Zeroizing::new(Vec::new());
        assert!(matches!(
            seal(&contents, PASSPHRASE, SALT, NONCE, PBKDF2_MIN_ITERATIONS),
            Err(BundleError::Malformed(_))
        ));
        contents.signing_pkcs8 = Zeroizing::new(vec![1; MAX_PKCS8_BYTES + 1]);
        assert!(matches!(
            seal(&contents, PASSPHRASE, SALT, NONCE, PBKDF2_MIN_ITERATIONS),
            Err(BundleError::Malformed(_))
        ));
    }

    #[test]
    fn debug_redacts_secrets() {
        let contents = golden_contents();
        let debug = format!("{contents:?}");
        let pretty = format!("{contents:#?}");
        for shown in [&debug, &pretty] {
            for secret in [&MASTER[..], &SEED[..], &golden_pkcs8()[..]] {
                assert!(!shown.contains(&hex::encode(secret)), "{shown}");
                assert!(!shown.contains(&hex::encode_upper(secret)), "{shown}");
                // As a byte list, the way a derived Debug prints it.
                let list = format!("{:?}", &secret[..8]);
                assert!(!shown.contains(&list[1..list.len() - 1]), "{shown}");
            }
            assert!(shown.contains("redacted"), "{shown}");
        }
        // The public pins are shown.
        assert!(debug.contains(&hex::encode([0x70; 32])), "{debug}");
        assert!(
            debug.contains(&hex::encode(contents.signing_keys[0])),
            "{debug}"
        );
    }

    #[test]
    fn fuzz_property_accepts_valid_input() {
        assert!(fuzz_decoders(&golden()));
        assert!(fuzz_decoders(&golden_contents().to_plaintext()));
        assert!(!fuzz_decoders(b""));
    }
}
