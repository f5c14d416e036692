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
//! Every other peer gets [`PathKind::Network`], quinn's defaults, which are right for the
//! 1 500-byte paths between clouds.
//!
//! Measured (`benches/`, 1 GiB over one stream, same run): 1 452-byte packets 642 MB/s and
//! 2.34 CPU-s/GiB in the two nodes; 64 KiB datagrams (with the splice and allocator changes of
//! the same issue) 1 451 MB/s and 0.90 CPU-s/GiB.

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

/// Transport parameters of data connections, one per path kind.
#[derive(Debug, Clone)]
pub struct Transports {
    network: Arc<TransportConfig>,
    loopback: Arc<TransportConfig>,
}

impl Transports {
    /// Both kinds, with the configured congestion controller.
    pub fn new(congestion: Congestion) -> Self {
        Transports {
            network: Arc::new(data_transport(congestion, PathKind::Network)),
            loopback: Arc::new(data_transport(congestion, PathKind::Loopback)),
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

/// Windows sized for throughput, the configured congestion controller, and the path's packet
/// sizing (see the module docs).
fn data_transport(congestion: Congestion, kind: PathKind) -> TransportConfig {
    let mut t = transport_config(Duration::from_secs(30), Duration::from_secs(5));
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
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
    fn each_kind_gets_its_own_settings() {
        let t = Transports::new(Congestion::Bbr);
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
    }
}
