//! The sans-IO core of hopmesh.
//!
//! Everything here is a pure function of its inputs: parsers work on byte slices, every
//! time-dependent function takes `now`, and nothing depends on tokio, quinn or sockets (a
//! test in `tests/purity.rs` checks the dependency tree). The node and verifier crates own
//! all IO and call into this crate for every security decision, which returns a permit or a
//! refusal.
//!
//! What this crate does **not** do: open sockets, read clocks or files, spawn tasks, or
//! decide what to do with a refusal (close, audit, report): that is the caller's job.
//!
//! # Layout
//! - [`ids`]: node ids, service ids, verifier key ids, validated names.
//! - [`secret`]: secret newtypes (redacted, zeroized, constant-time equality).
//! - [`time`]: `UnixTime` and the `Clock` trait.
//! - [`codes`]: every QUIC application error code hopmesh sends.
//! - [`hop_token`]: key schedule, token layout, mint and verify, keyrings, forgery meter.
//! - [`attestation`]: signed envelopes, attestations, revocation lists, pinned key sets.
//! - [`wire`]: hardened postcard decoding and bounded collections.
//! - [`frame`]: length-delimited frames with caps and a version byte.
//! - [`control`]: control-stream messages and the stream request header.
//! - [`enrollment`]: node-to-verifier requests, responses and pushes.
//! - [`flow_seal`]: end-to-end keys and records of relayed flows (what relays cannot read).
//! - [`socks5`]: SOCKS5 (RFC 1928) and username/password (RFC 1929) parsing and encoding.
//! - [`policy`]: the policy file model and its compilation into routing tables.
//! - [`routing`]: per-node egress and ingress tables, `may_route` and `may_serve`.
//! - [`audit_aggregate`]: one audit record per (source, reason) and interval, with a count.

#![forbid(unsafe_code)]

pub mod attestation;
pub mod audit_aggregate;
pub mod codes;
pub mod control;
pub mod enrollment;
pub mod flow_seal;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod hop_token;
pub mod ids;
pub mod policy;
pub mod replica_bundle;
pub mod routing;
pub mod secret;
pub mod socks5;
pub mod table_sync;
pub mod time;
pub mod wire;
