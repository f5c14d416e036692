//! QUIC transport settings per path: what a data connection may assume about the way to its
//! peer.
//!
//! quinn's defaults fit the Internet: packets start at 1 200 bytes, path-MTU discovery probes
//! up to 1 452-byte UDP payloads, and up to 10 datagrams leave in one GSO `sendmsg`. Between
//! two nodes on one host (the loopback interface, MTU 65 536) those settings made per-packet
//! work the sender's bottleneck: at 1 452 bytes a 1 GiB transfer is 740 000 packets, each
//! framed, sealed, acknowledged and tracked on its own.
//!
//! A peer reached over loopback therefore gets [`PathKind::Loopback`]: discovery may go up to
//! [`LOOPBACK_MAX_UDP_PAYLOAD`] (64 KiB datagrams, 45× fewer packets) and GSO is off. Why off:
//! quinn 0.11 puts up to 10 datagrams of the current MTU into one GSO send without capping the
//! batch at the kernel's 64 KiB limit, and quinn-udp drops the send the kernel then refuses
//! (`EMSGSIZE`) without a word. Measured with GSO on: a 16 000-byte MTU moved 7 MB/s (every
//! batch lost), and at 65 507 bytes the lost batches looked like an MTU black hole, so quinn
//! fell back to 1 200-byte packets. A single 64 KiB datagram per `sendmsg` carries as much as
//! a full GSO batch of small ones. Discovery still probes before it uses a size, so a loopback
//! with a smaller MTU is found out, never assumed.
//!
//! Between loopback peers nothing but the receiving node's own UDP socket buffer holds data in
//! flight, and a sender at 1.5 GB/s fills it within milliseconds whenever the receiving node is
//! not scheduled; the kernel then drops whole 64 KiB datagrams. With the default 208 KiB buffer
//! 26 % of the packets of a 1 GiB transfer were lost (with 4 MiB, 0–4 % in bursts). So the
//! loopback receive windows are capped at the socket's receive buffer: a sender waits for
//! window instead of losing datagrams. Measured (1 GiB, same runs): 0 losses at 208 KiB and at
//! 4 MiB, throughput unchanged within the noise (208 KiB: 994–1 167 vs 1 055–1 225 MB/s;
//! 4 MiB: 1 548–1 623 vs 1 414–1 606 MB/s after the first transfer).
//!
//! Every other peer gets [`PathKind::Network`]: quinn's packet sizing, right for the 1 500-byte
//! paths between clouds, and windows sized for long fat links (their buffers are in the path).
//!
//! Measured (`benches/`, 1 GiB over one stream): 642 MB/s and 2.34 CPU-s/GiB in the two nodes
//! with 1 452-byte packets; 1 150 MB/s with 64 KiB datagrams alone (A/B, same mesh build
//! otherwise); 1 418–1 460 MB/s and 0.91 CPU-s/GiB with the splice and allocator changes made
//! with them (three full runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_transport::quic::transport_config;
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::config::Congestion;

/// The largest UDP payload a node accepts (QUIC's own maximum), advertised to peers as
/// `max_udp_payload_size`. A sender still sends no more than its path-MTU discovery confirmed.
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// Upper bound of path-MTU discovery to a loopback peer: the default loopback MTU (65 536)
/// minus an IPv6 header (40) and the UDP header (8). It fits IPv4 too (19 bytes to spare).
pub const LOOPBACK_MAX_UDP_PAYLOAD: u16 = 65_488;

// Checked at compile time: the bound fits the loopback MTU with an IPv6 header, an IPv4
// datagram's 16-bit length, and what the node accepts.
const _: () = {
    const LO_MTU: u32 = 65_536;
    assert!(LOOPBACK_MAX_UDP_PAYLOAD as u32 + 40 + 8 <= LO_MTU);
    assert!(LOOPBACK_MAX_UDP_PAYLOAD as u32 + 20 + 8 <= u16::MAX as u32);
    assert!(LOOPBACK_MAX_UDP_PAYLOAD <= MAX_UDP_PAYLOAD);
};

/// What a data connection may assume about its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// The peer is on this host: the loopback interface, 64 KiB datagrams.
    Loopback,
    /// Anything else: quinn's Internet defaults.
    Network,
}

impl PathKind {
    /// The kind of path to `peer` (IPv4-mapped IPv6 addresses count as their IPv4 address).
    pub fn of(peer: SocketAddr) -> Self {
        if peer.ip().to_canonical().is_loopback() {
            PathKind::Loopback
        } else {
            PathKind::Network
        }
    }
}

/// Flow-control window of one stream on a network path.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Flow-control window of a connection on a network path.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Smallest loopback window: two full datagrams.
pub const MIN_LOOPBACK_WINDOW: u32 = 2 * 65_536;

/// Receive windows `(stream, connection)` for a path, given the receive buffer the node's UDP
/// socket obtained (0: unknown).
pub fn receive_windows(kind: PathKind, udp_recv_buffer: usize) -> (u32, u32) {
    match kind {
        PathKind::Network => (STREAM_WINDOW, CONNECTION_WINDOW),
        PathKind::Loopback if udp_recv_buffer == 0 => (STREAM_WINDOW, CONNECTION_WINDOW),
        PathKind::Loopback => {
            let cap = u32::try_from(udp_recv_buffer)
                .unwrap_or(u32::MAX)
                .clamp(MIN_LOOPBACK_WINDOW, CONNECTION_WINDOW);
            // One stream never takes the whole connection window: a stream whose app reads
            // slowly must not starve the control stream (renewals) of credit.
            (STREAM_WINDOW.min(cap / 2), cap)
        }
    }
}

/// Transport parameters of data connections, one per path kind.
#[derive(Debug, Clone)]
pub struct Transports {
    network: Arc<TransportConfig>,
    loopback: Arc<TransportConfig>,
}

impl Transports {
    /// Both kinds, with the configured congestion controller and the receive buffer the
    /// node's UDP socket obtained (0: unknown).
    pub fn new(congestion: Congestion, udp_recv_buffer: usize) -> Self {
        let make = |kind| Arc::new(data_transport(congestion, kind, udp_recv_buffer));
        Transports {
            network: make(PathKind::Network),
            loopback: make(PathKind::Loopback),
        }
    }

    /// The settings for a connection with `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Arc<TransportConfig> {
        self.for_kind(PathKind::of(peer))
    }

    /// The settings for a path kind.
    pub fn for_kind(&self, kind: PathKind) -> Arc<TransportConfig> {
        match kind {
            PathKind::Loopback => self.loopback.clone(),
            PathKind::Network => self.network.clone(),
        }
    }
}

/// The path's windows and packet sizing (see the module docs) and the configured congestion
/// controller.
fn data_transport(
    congestion: Congestion,
    kind: PathKind,
    udp_recv_buffer: usize,
) -> TransportConfig {
    let mut t = transport_config(Duration::from_secs(30), Duration::from_secs(5));
    let (stream, connection) = receive_windows(kind, udp_recv_buffer);
    t.stream_receive_window(VarInt::from_u32(stream));
    t.receive_window(VarInt::from_u32(connection));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    if kind == PathKind::Loopback {
        let mut mtud = MtuDiscoveryConfig::default();
        mtud.upper_bound(LOOPBACK_MAX_UDP_PAYLOAD);
        t.mtu_discovery_config(Some(mtud));
        t.enable_segmentation_offload(false);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_of_both_families_are_loopback_paths() {
        for a in [
            "127.0.0.1:7000",
            "127.255.0.9:1",
            "[::1]:7000",
            "[::ffff:127.0.0.1]:7000",
        ] {
            assert_eq!(
                PathKind::of(a.parse().expect("address")),
                PathKind::Loopback,
                "{a}"
            );
        }
    }

    #[test]
    fn every_other_address_is_a_network_path() {
        for a in [
            "10.0.0.1:7000",
            "192.168.1.1:7000",
            "0.0.0.0:7000",
            "[::]:7000",
            "[fe80::1]:7000",
            "[::ffff:10.0.0.1]:7000",
            "[2001:db8::1]:7000",
        ] {
            assert_eq!(
                PathKind::of(a.parse().expect("address")),
                PathKind::Network,
                "{a}"
            );
        }
    }

    #[test]
    fn loopback_windows_never_exceed_the_socket_buffer() {
        let net = (STREAM_WINDOW, CONNECTION_WINDOW);
        assert_eq!(receive_windows(PathKind::Network, 212_992), net);
        assert_eq!(receive_windows(PathKind::Network, 0), net);
        assert_eq!(
            receive_windows(PathKind::Loopback, 0),
            net,
            "unknown: no cap"
        );
        assert_eq!(
            receive_windows(PathKind::Loopback, 212_992),
            (106_496, 212_992)
        );
        assert_eq!(
            receive_windows(PathKind::Loopback, 4 << 20),
            (2 << 20, 4 << 20)
        );
        assert_eq!(
            receive_windows(PathKind::Loopback, 16 << 20),
            (8 << 20, 16 << 20)
        );
        assert_eq!(receive_windows(PathKind::Loopback, 1 << 30), net);
        assert_eq!(
            receive_windows(PathKind::Loopback, 1000),
            (MIN_LOOPBACK_WINDOW / 2, MIN_LOOPBACK_WINDOW)
        );
        assert_eq!(receive_windows(PathKind::Loopback, usize::MAX), net);
    }

    #[test]
    fn each_kind_gets_its_own_settings() {
        let t = Transports::new(Congestion::Bbr, 212_992);
        let lo = t.for_peer("127.0.0.1:1".parse().expect("address"));
        let net = t.for_peer("10.1.2.3:1".parse().expect("address"));
        assert!(Arc::ptr_eq(&lo, &t.for_kind(PathKind::Loopback)));
        assert!(Arc::ptr_eq(&net, &t.for_kind(PathKind::Network)));
        assert!(!Arc::ptr_eq(&lo, &net));
        // quinn has no getters; its Debug output names every field.
        let (lo, net) = (format!("{lo:?}"), format!("{net:?}"));
        assert!(lo.contains("upper_bound: 65488"), "{lo}");
        assert!(lo.contains("enable_segmentation_offload: false"), "{lo}");
        assert!(net.contains("upper_bound: 1452"), "{net}");
        assert!(net.contains("enable_segmentation_offload: true"), "{net}");
        assert!(lo.contains("stream_receive_window: 106496"), "{lo}");
        assert!(lo.contains(" receive_window: 212992"), "{lo}");
        assert!(net.contains("stream_receive_window: 8388608"), "{net}");
    }
}
