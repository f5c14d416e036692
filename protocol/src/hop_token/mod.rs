//! Hop tokens: the per-stream credential that changes every epoch (docs/design.md, "Key schedule" and "Token layout").
//!
//! Key schedule, all pure and clock-free:
//!
//! ```text
//! S(a,b,g)    32-byte pair seed from the verifier          (PairSeed)
//! K(a,b,g,e)  HKDF-SHA256(ikm = S, info = "hopmesh/epoch/v1" ‖ e ‖ lo ‖ hi)   (EpochKey)
//! X           TLS exporter, label EXPORTER_LABEL, context ALPN ‖ lo ‖ hi     (ConnectionBinding)
//! key         HKDF-Extract(salt = X, ikm = K)                                 (StreamKey)
//! tag         HMAC-SHA256(key, token[..TAG_OFFSET])
//! ```
//!
//! Token layout (big-endian, fixed, [`TOKEN_LEN`] bytes):
//!
//! ```text
//! off len field
//!   0   1 version (1)
//!   1   1 alg (1 = HMAC-SHA256)
//!   2   8 generation
//!  10   8 epoch
//!  18  32 src node id
//!  50  32 dst node id
//!  82   8 dst service id
//!  90   8 QUIC stream id (raw u64)
//!  98   4 header length
//! 102  32 SHA-256(request header)
//! 134  32 tag
//! ```
//!
//! **The header hash is carried in the token, under the MAC** (docs/design.md, "Token
//! layout"), rather than only mixed into the MAC input. The receiver can then authenticate
//! the token from its fixed 166 bytes *before* it reads up to 64 KiB of
//! header, and a header that does not match is a distinct, final refusal
//! (`HeaderHashMismatch`) instead of an indistinguishable bad MAC. The security argument is
//! unchanged: the tag still covers the header through its hash.
//!
//! Why single use without a replay cache: QUIC never reuses a stream id within a connection
//! and the exporter differs per connection; both are under the MAC.
//!
//! # Layout
//! - `schedule`: epochs, epoch length, generations, the node pair, key derivation.
//! - `token`: the fixed token layout, encode and decode, minting.
//! - `verify`: [`verify_token`], the gate context, permits, refusals, [`ConnectionKeys`].
//! - `keyring`: [`PairKeyring`], generation grants, grant refusals.
//! - `key_cache`: [`StreamKeyCache`], one key derivation per connection and epoch.
//! - `forgery`: [`ForgeryMeter`] and [`ForgeryLedger`], the forged-token limit per peer.
//!
//! The submodules are private; every item is re-exported here, at `hop_token::X`.

mod forgery;
mod key_cache;
mod keyring;
mod schedule;
mod token;
mod verify;

pub use forgery::{
    FORGERY_SUSPENSION_SECS, FORGERY_WINDOW_SECS, ForgeryLedger, ForgeryLimitExceeded,
    ForgeryMeter, ForgeryVerdict, MAX_FORGED_PER_WINDOW, MAX_SUSPENSION_SECS, MAX_TRACKED_PEERS,
    STRIKE_MEMORY_SECS,
};
pub use key_cache::StreamKeyCache;
pub use keyring::{
    GenerationGrant, GrantRefusal, MAX_COMPROMISED_GENERATIONS, MAX_LIVE_GENERATIONS, PairKeyring,
    SeedLookup,
};
pub use schedule::{
    BadEpochLength, EPOCH_KEY_LABEL, EXPORTER_LABEL, Epoch, EpochLength, Generation,
    PAIR_SEED_LABEL, PairIds, exporter_context,
};
pub use token::{
    ALG_HMAC_SHA256, HeaderTooLong, HopToken, MAX_HEADER_LEN, MintRequest, TAG_OFFSET, TOKEN_LEN,
    TOKEN_VERSION, TokenFields, mint_token,
};
pub use verify::{
    ConnectionKeys, EPOCH_WINDOW, GateContext, KeyLookup, STREAM_REFUSED_CODE, StreamKeySource,
    StreamPermit, TokenPermit, TokenRefusal, verify_token,
};

#[cfg(test)]
mod tests;
