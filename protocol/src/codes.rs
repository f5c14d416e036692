//! Every QUIC application error code hopmesh sends, in one table.
//!
//! The codes are plain `u32`s so this crate stays free of quinn; the transport wraps each one
//! in a `VarInt` under the same name (`hopmesh_transport::quic::codes`). All codes live in the
//! block `0x4800..=0x48FF` ([`RANGE_START`]..=[`RANGE_END`]): `0x480x` for a single stream,
//! `0x481x` for a whole connection. The values are on the wire: never renumber one.

/// First code of hopmesh's block.
pub const RANGE_START: u32 = 0x4800;
/// Last code of hopmesh's block.
pub const RANGE_END: u32 = 0x48FF;

/// Stream reset: refused by the gate (one generic code; the reason is audited locally).
pub const STREAM_REFUSED: u32 = 0x4801;
/// Stream reset or connection closed: a request or frame the receiver could not accept.
pub const BAD_REQUEST: u32 = 0x4802;
/// Stream reset: the local side failed (backend, internal error) mid-stream.
pub const INTERNAL: u32 = 0x4803;
/// Stream reset: a relay's write towards one hop made no progress within its deadline (the
/// hop gives no flow-control credit).
pub const STREAM_STALLED: u32 = 0x4804;
/// Connection closed: the peer's credentials are revoked or expired.
pub const REVOKED: u32 = 0x4810;
/// Connection closed: too many forged tokens or compromised key use.
pub const ABUSE: u32 = 0x4811;
/// Connection closed: orderly shutdown.
pub const SHUTDOWN: u32 = 0x4812;
/// Stream reset or connection closed: policy no longer allows the stream or the pair.
pub const POLICY: u32 = 0x4813;
/// Connection closed: a control message could not be written within its deadline (the peer
/// gives no flow-control credit or does not read its control stream).
pub const CONTROL_STALLED: u32 = 0x4814;
/// Connection closed: the peer opened more connections than the per-peer cap; its oldest goes.
pub const CONNECTION_REPLACED: u32 = 0x4815;

/// Every code with its constant's name, in numeric order.
pub const ALL: &[(u32, &str)] = &[
    (STREAM_REFUSED, "STREAM_REFUSED"),
    (BAD_REQUEST, "BAD_REQUEST"),
    (INTERNAL, "INTERNAL"),
    (STREAM_STALLED, "STREAM_STALLED"),
    (REVOKED, "REVOKED"),
    (ABUSE, "ABUSE"),
    (SHUTDOWN, "SHUTDOWN"),
    (POLICY, "POLICY"),
    (CONTROL_STALLED, "CONTROL_STALLED"),
    (CONNECTION_REPLACED, "CONNECTION_REPLACED"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_sorted_and_inside_the_block() {
        for pair in ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "not strictly increasing: {pair:?}");
        }
        for (code, name) in ALL {
            assert!(
                (RANGE_START..=RANGE_END).contains(code),
                "{name} = {code:#x} is outside {RANGE_START:#x}..={RANGE_END:#x}"
            );
        }
        let mut names: Vec<&str> = ALL.iter().map(|(_, n)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "duplicate name");
    }

    #[test]
    fn values_are_the_wire_values() {
        assert_eq!(
            ALL,
            &[
                (0x4801, "STREAM_REFUSED"),
                (0x4802, "BAD_REQUEST"),
                (0x4803, "INTERNAL"),
                (0x4804, "STREAM_STALLED"),
                (0x4810, "REVOKED"),
                (0x4811, "ABUSE"),
                (0x4812, "SHUTDOWN"),
                (0x4813, "POLICY"),
                (0x4814, "CONTROL_STALLED"),
                (0x4815, "CONNECTION_REPLACED"),
            ]
        );
    }
}
