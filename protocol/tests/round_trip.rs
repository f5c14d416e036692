//! Round trips of every wire type with structured arbitrary values: `decode(encode(x)) == x`.

use hopmesh_protocol::attestation::{
    ATTESTATION_VERSION, Attestation, KeySet, RevocationList, RevocationUpdate, RevokedNode,
    SigningKey, verify_attestation, verify_revocation_list,
};
use hopmesh_protocol::control::{GoodbyeReason, PeerMessage, StreamHeader, StreamStatus};
use hopmesh_protocol::enrollment::{PUSH_CAP, Push};
use hopmesh_protocol::frame::{decode_frame, encode_frame};
use hopmesh_protocol::fuzzing::segment_entries;
use hopmesh_protocol::hop_token::{Epoch, Generation, HopToken, TOKEN_LEN, TokenFields};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName, SegmentName, ServiceId};
use hopmesh_protocol::secret::SigningSeed;
use hopmesh_protocol::socks5::{self, Command, Request, TargetAddr};
use hopmesh_protocol::table_sync::{
    SyncedTable, TableAssembler, TableUpdate, diff, digest, entries_of, split,
};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use proptest::prelude::*;

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId::from_bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token(version: u8, alg: u8, g: u64, e: u64, src in node_id(), dst in node_id(), s: u64, sid: u64,
             len: u32, hash: [u8; 32], tag: [u8; 32]) {
        let t = HopToken {
            version,
            alg,
            fields: TokenFields {
                generation: Generation(g),
                epoch: Epoch(e),
                src,
                dst,
                service: ServiceId::from_u64(s),
                stream_id: sid,
                header_len: len,
                header_hash: hash,
            },
            tag,
        };
        let wire: [u8; TOKEN_LEN] = t.encode();
        prop_assert_eq!(HopToken::decode(&wire), t);
    }

    #[test]
    fn peer_message(bytes in prop::collection::vec(any::<u8>(), 0..1000), which in 0..3u8) {
        let m = match which {
            0 => PeerMessage::Hello { attestation: BoundedVec::new(bytes).expect("fits") },
            1 => PeerMessage::Renewal { attestation: BoundedVec::new(bytes).expect("fits") },
            _ => PeerMessage::Goodbye { reason: GoodbyeReason::PolicyChanged },
        };
        let frame = m.to_frame().expect("encode");
        prop_assert_eq!(PeerMessage::from_frame(&frame), Ok(Some((m, frame.len()))));
    }

    #[test]
    fn stream_header(origin in node_id(), s: u64, route in prop::collection::vec(node_id(), 0..=4)) {
        let h = StreamHeader { origin, service: ServiceId::from_u64(s), route: BoundedVec::new(route).expect("fits"), assertion: None };
        prop_assert_eq!(StreamHeader::decode(&h.encode().expect("encode")), Ok(h));
    }

    #[test]
    fn stream_status(b: u8) {
        let s = StreamStatus::from_byte(b);
        prop_assert_eq!(StreamStatus::from_byte(s.to_byte()), s);
    }

    #[test]
    fn attestation(node_seed: [u8; 32], serial: u64, nb in 0u64..1 << 40, ttl in 1u64..1 << 20, m: [u8; 32],
                   segs in prop::collection::vec("[a-z][a-z0-9]{0,20}", 0..16)) {
        let key = SigningKey::from_seed(&SigningSeed::from_bytes([9; 32]));
        let spki = SigningKey::from_seed(&SigningSeed::from_bytes(node_seed)).verifying_key().to_spki_der();
        let a = Attestation {
            version: ATTESTATION_VERSION,
            node_id: NodeId::from_spki(&spki),
            spki: BoundedVec::new(spki).expect("fits"),
            name: NodeName::new("n").expect("label"),
            segments: BoundedVec::new(segs.iter().map(|s| SegmentName::new(s).expect("label")).collect()).expect("fits"),
            measurement: Measurement(m),
            serial,
            not_before: UnixTime::from_secs(nb),
            not_after: UnixTime::from_secs(nb + ttl),
            verifier_key_id: key.key_id(),
        };
        let env = a.sign(&key).expect("sign");
        let keys = KeySet::new(vec![key.verifying_key()]).expect("fits");
        let v = verify_attestation(&env, &keys, UnixTime::from_secs(nb), 0).expect("valid");
        prop_assert_eq!(v.get(), &a);
    }

    #[test]
    fn revocation_list(version: u64, entries in prop::collection::vec((any::<[u8; 32]>(), any::<u64>(), any::<u64>()), 0..50)) {
        let key = SigningKey::from_seed(&SigningSeed::from_bytes([9; 32]));
        let l = RevocationList {
            version,
            issued_at: UnixTime::from_secs(5),
            verifier_key_id: key.key_id(),
            revoked: BoundedVec::new(entries.into_iter().map(|(n, a, b)| RevokedNode {
                node_id: NodeId::from_bytes(n),
                revoked_at: UnixTime::from_secs(a),
                until: UnixTime::from_secs(b),
            }).collect()).expect("fits"),
        };
        let env = l.sign(&key).expect("sign");
        let keys = KeySet::new(vec![key.verifying_key()]).expect("fits");
        prop_assert_eq!(verify_revocation_list(&env, &keys, None), Ok(RevocationUpdate::Newer(l)));
    }

    #[test]
    fn socks_request(a: [u8; 16], d in "[a-zA-Z0-9.-]{1,255}", port in 1u16.., which in 0..3u8) {
        let target = match which {
            0 => TargetAddr::Ipv4([a[0], a[1], a[2], a[3]].into()),
            1 => TargetAddr::Ipv6(a.into()),
            _ => TargetAddr::Domain(d),
        };
        let r = Request { command: Command::Connect, target, port };
        let wire = socks5::encode_request(&r);
        prop_assert_eq!(socks5::parse_request(&wire), Ok(Some((r, wire.len()))));
    }

    #[test]
    fn table_updates(old in 0u32..300, new in 0u32..300, addrs in 0usize..4, version in 0u64..1 << 60) {
        let (a, b) = (segment_entries(old, addrs), segment_entries(new, addrs));
        let snapshot = TableUpdate::snapshot(version, &a).expect("fits");
        let delta = TableUpdate::delta(version, version + 1, diff(&a, &b), digest(&b)).expect("fits");
        let mut assembler = TableAssembler::new();
        let mut held: Option<SyncedTable> = None;
        for update in [&snapshot, &delta] {
            let mut got = None;
            for p in split(update).expect("split") {
                let frame = encode_frame(&p, PUSH_CAP).expect("fits");
                let (back, _) = decode_frame::<Push>(&frame, PUSH_CAP).expect("decode").expect("whole");
                prop_assert_eq!(&back, &p);
                let Push::TablePart(part) = back else { panic!("a table part") };
                got = assembler.push(&part).expect("in order");
            }
            prop_assert_eq!(got.as_ref(), Some(update));
            held = Some(SyncedTable::apply_to(held.as_ref(), update).expect("applies"));
        }
        let held = held.expect("held");
        prop_assert_eq!(held.entries(), &b);
        let (table, peers) = held.table();
        prop_assert_eq!(entries_of(&table, &peers), b);
    }
}
