//! The fixed token layout: its constants, the decoded fields, encode and decode, and
//! minting.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::schedule::{Epoch, Generation};
use crate::ids::{NodeId, ServiceId};
use crate::secret::StreamKey;

/// Token format version this build mints and accepts.
pub const TOKEN_VERSION: u8 = 1;
/// Algorithm byte for HMAC-SHA256 tags.
pub const ALG_HMAC_SHA256: u8 = 1;
/// Offset of the tag: everything before it is MAC'd.
pub const TAG_OFFSET: usize = 134;
/// Length of an encoded token.
pub const TOKEN_LEN: usize = TAG_OFFSET + 32;
/// Largest request header a token may announce (docs/design.md, "Token layout").
pub const MAX_HEADER_LEN: u32 = 64 * 1024;

/// The fields of a token, as minted or as decoded (before any check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFields {
    /// Seed generation the key came from.
    pub generation: Generation,
    /// Epoch the key belongs to.
    pub epoch: Epoch,
    /// The minting node (must be the TLS peer).
    pub src: NodeId,
    /// The verifying node (must be the receiver).
    pub dst: NodeId,
    /// The service the stream is for.
    pub service: ServiceId,
    /// The raw QUIC stream id, `u64::from(stream.id())`.
    pub stream_id: u64,
    /// Length of the request header following the token.
    pub header_len: u32,
    /// SHA-256 of the request header.
    pub header_hash: [u8; 32],
}

/// A decoded token: fields plus tag. Decoding checks nothing but the length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopToken {
    /// Version byte as received.
    pub version: u8,
    /// Algorithm byte as received.
    pub alg: u8,
    /// The fields.
    pub fields: TokenFields,
    /// The MAC tag.
    pub tag: [u8; 32],
}

impl HopToken {
    /// Parses the fixed layout. Never fails on content; [`verify_token`](super::verify_token) judges it.
    pub fn decode(raw: &[u8; TOKEN_LEN]) -> Self {
        let u32_at = |o: usize| u32::from_be_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_be_bytes(b)
        };
        let id_at = |o: usize| {
            let mut b = [0u8; 32];
            b.copy_from_slice(&raw[o..o + 32]);
            b
        };
        Self {
            version: raw[0],
            alg: raw[1],
            fields: TokenFields {
                generation: Generation(u64_at(2)),
                epoch: Epoch(u64_at(10)),
                src: NodeId::from_bytes(id_at(18)),
                dst: NodeId::from_bytes(id_at(50)),
                service: ServiceId::from_u64(u64_at(82)),
                stream_id: u64_at(90),
                header_len: u32_at(98),
                header_hash: id_at(102),
            },
            tag: id_at(TAG_OFFSET),
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; TOKEN_LEN] {
        let mut out = encode_unsigned(self.version, self.alg, &self.fields);
        out[TAG_OFFSET..].copy_from_slice(&self.tag);
        out
    }
}

fn encode_unsigned(version: u8, alg: u8, f: &TokenFields) -> [u8; TOKEN_LEN] {
    let mut out = [0u8; TOKEN_LEN];
    out[0] = version;
    out[1] = alg;
    out[2..10].copy_from_slice(&f.generation.0.to_be_bytes());
    out[10..18].copy_from_slice(&f.epoch.0.to_be_bytes());
    out[18..50].copy_from_slice(f.src.as_bytes());
    out[50..82].copy_from_slice(f.dst.as_bytes());
    out[82..90].copy_from_slice(&f.service.as_u64().to_be_bytes());
    out[90..98].copy_from_slice(&f.stream_id.to_be_bytes());
    out[98..102].copy_from_slice(&f.header_len.to_be_bytes());
    out[102..TAG_OFFSET].copy_from_slice(&f.header_hash);
    out
}

pub(super) fn mac(key: &StreamKey) -> Hmac<Sha256> {
    // Invariant: HMAC accepts keys of any length.
    #[allow(clippy::expect_used)]
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length")
}

/// What a sender needs to mint a token for one stream.
#[derive(Clone, Debug)]
pub struct MintRequest<'a> {
    /// Generation of the key.
    pub generation: Generation,
    /// Epoch of the key.
    pub epoch: Epoch,
    /// This node.
    pub src: NodeId,
    /// The peer that will verify.
    pub dst: NodeId,
    /// Target service.
    pub service: ServiceId,
    /// Raw QUIC stream id the token will travel on.
    pub stream_id: u64,
    /// The request header that follows the token.
    pub header: &'a [u8],
}

/// A header longer than [`MAX_HEADER_LEN`] cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request header of {0} bytes exceeds the 64 KiB cap")]
pub struct HeaderTooLong(pub usize);

/// Mints the token for one stream. Call with the stream key for `req.generation` and
/// `req.epoch` on this connection; write the result, then the header, as the stream's first
/// bytes.
pub fn mint_token(
    req: &MintRequest<'_>,
    key: &StreamKey,
) -> Result<[u8; TOKEN_LEN], HeaderTooLong> {
    let header_len = u32::try_from(req.header.len())
        .ok()
        .filter(|len| *len <= MAX_HEADER_LEN)
        .ok_or(HeaderTooLong(req.header.len()))?;
    let fields = TokenFields {
        generation: req.generation,
        epoch: req.epoch,
        src: req.src,
        dst: req.dst,
        service: req.service,
        stream_id: req.stream_id,
        header_len,
        header_hash: Sha256::digest(req.header).into(),
    };
    let mut out = encode_unsigned(TOKEN_VERSION, ALG_HMAC_SHA256, &fields);
    let mut m = mac(key);
    m.update(&out[..TAG_OFFSET]);
    out[TAG_OFFSET..].copy_from_slice(&m.finalize().into_bytes());
    Ok(out)
}
