//! Every way the node refuses a stream, a SOCKS client or a connection, in one place.
//!
//! Each refusal has a stable `reason()` (the counter label and the audit `reason` field) and,
//! where it ends a QUIC stream or connection, a `code()` from the one code table
//! ([`hopmesh_protocol::codes`], as [`codes`] `VarInt`s). The strings are part of the
//! node's interface (metrics, audit records, `ctl show`): never rename one.

use hopmesh_protocol::control::{FlowRefusal, StreamStatus};
use hopmesh_protocol::enrollment::ReportKind;
use hopmesh_protocol::hop_token::TokenRefusal;
use hopmesh_protocol::routing::RouteRefusal;
use hopmesh_transport::quic::codes;
use quinn::VarInt;

use crate::state::{PeerRefusal, SelfRefusal};

/// Why the stream gate refused an inbound stream. Every one resets the stream with the
/// generic [`codes::STREAM_REFUSED`]: the peer learns nothing about which check failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateRefusal {
    /// The stream ended before the whole token arrived.
    TokenTruncated,
    /// The token did not arrive within the deadline.
    TokenTimeout,
    /// This node may not serve right now (no attestation, expired, no routes).
    SelfNotPermitted(SelfRefusal),
    /// The token failed a check (see [`TokenRefusal`]).
    Token(TokenRefusal),
    /// The header did not arrive within the deadline.
    HeaderTruncated,
    /// The header does not decode, or disagrees with the token.
    BadHeader,
    /// A direct stream whose header names another origin than the TLS peer.
    OriginNotPeer,
    /// A relayed stream without the origin's flow assertion.
    FlowMissing,
    /// The flow assertion does not verify, is stale or replayed.
    Flow(FlowRefusal),
    /// The flow assertion's origin is not the header's (or, at a relay, not the TLS peer).
    FlowOriginMismatch,
    /// No routing table yet.
    NoRoutes,
    /// Policy does not let that origin reach the service through that relay.
    OriginNotAllowedViaRelay,
}

impl GateRefusal {
    /// Stable reason name (counter label, audit `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TokenTruncated => "token_truncated",
            Self::TokenTimeout => "token_timeout",
            Self::SelfNotPermitted(_) => "self_not_permitted",
            Self::Token(t) => t.reason(),
            Self::HeaderTruncated => "header_truncated",
            Self::BadHeader => "bad_header",
            Self::OriginNotPeer => "origin_not_peer",
            Self::FlowMissing => "flow_missing",
            Self::Flow(f) => f.reason(),
            Self::FlowOriginMismatch => "flow_origin_mismatch",
            Self::NoRoutes => "no_routes",
            Self::OriginNotAllowedViaRelay => "origin_not_allowed_via_relay",
        }
    }

    /// The stream reset code (always the generic refusal).
    pub fn code(&self) -> VarInt {
        codes::STREAM_REFUSED
    }
}

/// Why a SOCKS client was refused before any byte reached the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocksRefusal {
    /// The client is not on a loopback address.
    NonLoopbackSource,
    /// `socks_max_clients` clients are being served already.
    ClientLimit,
    /// The handshake did not finish within the deadline.
    HandshakeTimeout,
    /// No method both sides accept.
    NoAcceptableMethod,
    /// Wrong RFC 1929 username or password.
    AuthFailed,
    /// BIND or UDP ASSOCIATE.
    CommandNotSupported,
    /// Data arrived before our reply.
    PipelinedData,
    /// This node may not initiate right now.
    SelfNotPermitted(SelfRefusal),
    /// No routing table yet.
    NoRoutes,
    /// The target is not a mesh name this node may reach.
    Route(RouteRefusal),
    /// The first hop could not be reached.
    PeerUnreachable,
    /// No token could be minted for the first hop.
    Mint(MintRefusal),
}

impl SocksRefusal {
    /// Stable reason name (counter label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NonLoopbackSource => "socks_non_loopback_source",
            Self::ClientLimit => "socks_clients_limit",
            Self::HandshakeTimeout => "socks_handshake_timeout",
            Self::NoAcceptableMethod => "socks_no_acceptable_method",
            Self::AuthFailed => "socks_auth_failed",
            Self::CommandNotSupported => "socks_command_not_supported",
            Self::PipelinedData => "socks_pipelined_data",
            Self::SelfNotPermitted(_) => "self_not_permitted",
            Self::NoRoutes => "no_routes",
            Self::Route(r) => r.reason(),
            Self::PeerUnreachable => "peer_unreachable",
            Self::Mint(m) => m.reason(),
        }
    }

    /// The text of the `socks_refused` audit record for a refused route.
    pub fn audit_text(&self) -> String {
        match self {
            Self::SelfNotPermitted(e) => format!("self: {e}"),
            Self::NoRoutes => "no routes".into(),
            Self::Route(r) => r.to_string(),
            Self::NonLoopbackSource => "non_loopback_source".into(),
            other => other.reason().into(),
        }
    }

    /// Whether the refusal is counted (refusals of our own state are audited only).
    pub fn counted(&self) -> bool {
        !matches!(self, Self::SelfNotPermitted(_) | Self::NoRoutes)
    }
}

/// Why the far end refused an outbound stream, as the origin learns it: the status byte the
/// serving node (or a relay) sent instead of "connected", a reset before any status, or no
/// status within the deadline. With `socks_reply = "early"` the app was already told
/// "succeeded", so the origin counts and audits these (the app sees a reset connection); with
/// `after_connect` they become the SOCKS reply and are counted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteRefusal {
    /// A status other than "connected".
    Status(StreamStatus),
    /// The stream was reset before a status arrived (a gate refusal on the way, generic by
    /// design, or the connection failed).
    Reset,
    /// No status within the deadline.
    Timeout,
    /// A relayed flow sealed end to end failed before its status: the serving node's answer
    /// did not verify (not the flow's serving node, a changed key) or a record did not open
    /// (`crate::sealed`); the reason.
    Sealed(&'static str),
}

impl RemoteRefusal {
    /// Stable reason name (counter label, audit `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Status(StreamStatus::NotAllowed) => "remote_not_allowed",
            Self::Status(StreamStatus::HostUnreachable) => "remote_backend_unreachable",
            Self::Status(StreamStatus::ConnectionRefused) => "remote_backend_refused",
            Self::Status(StreamStatus::TimedOut) => "remote_backend_timeout",
            Self::Status(StreamStatus::GeneralFailure | StreamStatus::Connected) => {
                "remote_general_failure"
            }
            Self::Reset => "remote_reset",
            Self::Timeout => "remote_status_timeout",
            Self::Sealed(reason) => reason,
        }
    }

    /// The status this amounts to (the SOCKS reply in `after_connect` mode).
    pub fn status(&self) -> StreamStatus {
        match self {
            Self::Status(s) => *s,
            // The refusal is generic by design: the origin learns only "not allowed".
            Self::Reset => StreamStatus::NotAllowed,
            Self::Timeout => StreamStatus::TimedOut,
            Self::Sealed(_) => StreamStatus::GeneralFailure,
        }
    }
}

/// Why no token could be minted for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MintRefusal {
    /// No current seed for the pair (policy gives none, or the verifier has not sent one).
    NoSeedForPeer,
    /// The stream header is over the token's 64 KiB cap (our own headers never are).
    HeaderTooLong,
}

impl MintRefusal {
    /// Stable reason name (counter label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSeedForPeer => "no_seed_for_peer",
            Self::HeaderTooLong => "header_too_long",
        }
    }
}

/// Why the node closes a peer connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Our own attestation is not valid: fail closed.
    OwnAttestationInvalid,
    /// The peer is no longer authorized (revoked, not in the table, or we cannot serve).
    NotAuthorized(PeerRefusal),
    /// The peer's attestation expired without a renewal.
    PeerAttestationExpired,
    /// The peer sent a renewal that does not verify.
    BadRenewal,
    /// The peer is gone from our routing table.
    PolicyChanged,
    /// The peer is on a new revocation list.
    Revoked,
    /// The peer's Hello attestation did not verify.
    AttestationRefused,
    /// The peer's first control message was not a Hello.
    ExpectedHello,
    /// The control stream broke protocol.
    ControlStream,
    /// Too many forged tokens on the connection.
    ForgedTokens,
    /// A token under a compromised generation (or impersonation): see [`ReportKind`].
    Abuse(ReportKind),
    /// A control message (a renewal) could not be written within its deadline.
    ControlStalled,
    /// The peer opened a newer connection past the per-peer cap; this, its oldest, goes.
    Replaced,
    /// Orderly shutdown.
    Shutdown,
}

impl CloseReason {
    /// Stable reason text (audit `reason`, QUIC close reason bytes).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OwnAttestationInvalid => "own attestation invalid",
            Self::NotAuthorized(e) => e.reason(),
            Self::PeerAttestationExpired => "peer attestation expired",
            Self::BadRenewal => "bad renewal",
            Self::PolicyChanged => "policy_changed",
            Self::Revoked => "revoked",
            Self::AttestationRefused => "attestation refused",
            Self::ExpectedHello => "expected hello",
            Self::ControlStream => "control stream",
            Self::ForgedTokens => "forged tokens",
            Self::Abuse(kind) => kind.as_str(),
            Self::ControlStalled => "control stream stalled",
            Self::Replaced => "replaced by a newer connection",
            Self::Shutdown => "shutdown",
        }
    }

    /// The QUIC connection close code: the one mapping from reasons to codes.
    pub fn code(&self) -> VarInt {
        match self {
            Self::NotAuthorized(PeerRefusal::Suspended) => codes::ABUSE,
            Self::OwnAttestationInvalid
            | Self::NotAuthorized(_)
            | Self::PeerAttestationExpired
            | Self::BadRenewal
            | Self::Revoked
            | Self::AttestationRefused => codes::REVOKED,
            Self::PolicyChanged => codes::POLICY,
            Self::ExpectedHello | Self::ControlStream => codes::BAD_REQUEST,
            Self::ForgedTokens | Self::Abuse(_) => codes::ABUSE,
            Self::ControlStalled => codes::CONTROL_STALLED,
            Self::Replaced => VarInt::from_u32(hopmesh_protocol::codes::CONNECTION_REPLACED),
            Self::Shutdown => codes::SHUTDOWN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_keep_their_strings_and_codes() {
        let cases = [
            (
                CloseReason::OwnAttestationInvalid,
                "own attestation invalid",
                0x4810,
            ),
            (
                CloseReason::NotAuthorized(PeerRefusal::Revoked),
                "peer_revoked",
                0x4810,
            ),
            (
                CloseReason::NotAuthorized(PeerRefusal::NotAPeer),
                "not_a_peer",
                0x4810,
            ),
            (
                CloseReason::PeerAttestationExpired,
                "peer attestation expired",
                0x4810,
            ),
            (
                CloseReason::NotAuthorized(PeerRefusal::Suspended),
                "peer_suspended",
                0x4811,
            ),
            (CloseReason::BadRenewal, "bad renewal", 0x4810),
            (CloseReason::PolicyChanged, "policy_changed", 0x4813),
            (CloseReason::Revoked, "revoked", 0x4810),
            (
                CloseReason::AttestationRefused,
                "attestation refused",
                0x4810,
            ),
            (CloseReason::ExpectedHello, "expected hello", 0x4802),
            (CloseReason::ControlStream, "control stream", 0x4802),
            (CloseReason::ForgedTokens, "forged tokens", 0x4811),
            (
                CloseReason::Abuse(ReportKind::CompromisedKeyUse),
                "compromised_key_use",
                0x4811,
            ),
            (
                CloseReason::Abuse(ReportKind::Impersonation),
                "impersonation",
                0x4811,
            ),
            (
                CloseReason::ControlStalled,
                "control stream stalled",
                0x4814,
            ),
            (
                CloseReason::Replaced,
                "replaced by a newer connection",
                0x4815,
            ),
            (CloseReason::Shutdown, "shutdown", 0x4812),
        ];
        for (r, reason, code) in cases {
            assert_eq!(r.reason(), reason, "{r:?}");
            assert_eq!(r.code(), VarInt::from_u32(code), "{r:?}");
        }
    }

    #[test]
    fn gate_refusals_keep_their_strings_and_are_generic_on_the_wire() {
        let cases = [
            (GateRefusal::TokenTruncated, "token_truncated"),
            (GateRefusal::TokenTimeout, "token_timeout"),
            (
                GateRefusal::SelfNotPermitted(SelfRefusal::Expired),
                "self_not_permitted",
            ),
            (GateRefusal::HeaderTruncated, "header_truncated"),
            (GateRefusal::BadHeader, "bad_header"),
            (GateRefusal::OriginNotPeer, "origin_not_peer"),
            (GateRefusal::FlowMissing, "flow_missing"),
            (GateRefusal::Flow(FlowRefusal::Replayed), "flow_replayed"),
            (GateRefusal::FlowOriginMismatch, "flow_origin_mismatch"),
            (GateRefusal::NoRoutes, "no_routes"),
            (
                GateRefusal::OriginNotAllowedViaRelay,
                "origin_not_allowed_via_relay",
            ),
        ];
        for (r, reason) in cases {
            assert_eq!(r.reason(), reason);
            assert_eq!(r.code(), VarInt::from_u32(0x4801));
        }
    }

    #[test]
    fn remote_refusals_keep_their_strings_and_statuses() {
        let cases = [
            (
                RemoteRefusal::Status(StreamStatus::NotAllowed),
                "remote_not_allowed",
                StreamStatus::NotAllowed,
            ),
            (
                RemoteRefusal::Status(StreamStatus::HostUnreachable),
                "remote_backend_unreachable",
                StreamStatus::HostUnreachable,
            ),
            (
                RemoteRefusal::Status(StreamStatus::ConnectionRefused),
                "remote_backend_refused",
                StreamStatus::ConnectionRefused,
            ),
            (
                RemoteRefusal::Status(StreamStatus::TimedOut),
                "remote_backend_timeout",
                StreamStatus::TimedOut,
            ),
            (
                RemoteRefusal::Status(StreamStatus::GeneralFailure),
                "remote_general_failure",
                StreamStatus::GeneralFailure,
            ),
            (
                RemoteRefusal::Reset,
                "remote_reset",
                StreamStatus::NotAllowed,
            ),
            (
                RemoteRefusal::Timeout,
                "remote_status_timeout",
                StreamStatus::TimedOut,
            ),
        ];
        for (r, reason, status) in cases {
            assert_eq!(r.reason(), reason, "{r:?}");
            assert_eq!(r.status(), status, "{r:?}");
        }
    }

    #[test]
    fn socks_refusals_keep_their_strings() {
        assert_eq!(
            SocksRefusal::NonLoopbackSource.reason(),
            "socks_non_loopback_source"
        );
        assert_eq!(SocksRefusal::ClientLimit.reason(), "socks_clients_limit");
        assert_eq!(
            SocksRefusal::NonLoopbackSource.audit_text(),
            "non_loopback_source"
        );
        assert_eq!(
            SocksRefusal::Route(RouteRefusal::IpLiteral).reason(),
            "ip_literal"
        );
        assert_eq!(
            SocksRefusal::Route(RouteRefusal::IpLiteral).audit_text(),
            "IP literals are not routed"
        );
        assert_eq!(SocksRefusal::NoRoutes.audit_text(), "no routes");
        assert_eq!(
            SocksRefusal::SelfNotPermitted(SelfRefusal::Expired).audit_text(),
            "self: this node's attestation expired"
        );
        assert!(!SocksRefusal::NoRoutes.counted());
        let no_seed = SocksRefusal::Mint(MintRefusal::NoSeedForPeer);
        assert!(no_seed.counted());
        assert_eq!(no_seed.reason(), "no_seed_for_peer");
        assert_eq!(SocksRefusal::PeerUnreachable.reason(), "peer_unreachable");
    }
}
