//! Properties checked on arbitrary input, shared by the cargo-fuzz targets in
//! `protocol/fuzz/` and the bounded proptest loops in `protocol/tests/fuzz_loops.rs`, so
//! nightly fuzzing and stable CI exercise exactly the same assertions.
//!
//! Each function panics if a property is broken, and otherwise returns whether the input was
//! accepted (so loops can check that the mutation strategies reach the accepting paths).
//! Not part of the stable API.

use crate::attestation::{
    Attestation, DocumentKind, KeySet, MAX_ATTESTATION_PAYLOAD, MAX_REVOCATION_PAYLOAD,
    RevocationList, RevocationUpdate, SigningKey, seal, verify_attestation, verify_revocation_list,
};
use crate::control::{PeerMessage, StreamHeader};
use crate::enrollment::{NodeRequest, PUSH_CAP, Push, REQUEST_CAP, VerifierResponse};
use crate::frame::{CONTROL_CAP, decode_frame, encode_frame};
use crate::hop_token::{
    ConnectionKeys, EpochLength, GateContext, HopToken, PairIds, PairKeyring, TOKEN_LEN,
    verify_token,
};
use crate::ids::{NodeId, NodeName};
use crate::policy::{NodeDirectory, Policy};
use crate::routing::IngressTable;
use crate::secret::{ConnectionBinding, SigningSeed};
use crate::socks5;
use crate::table_sync::{
    Entries, MAX_TABLE_BYTES, SyncedTable, TableAssembler, TableEntry, digest, split,
};
use crate::time::UnixTime;

fn test_key() -> SigningKey {
    SigningKey::from_seed(&SigningSeed::from_bytes([0x5E; 32]))
}

/// Token: the fixed layout round-trips, and arbitrary bytes never verify.
pub fn token(data: &[u8]) -> bool {
    let Some(raw) = data.first_chunk::<TOKEN_LEN>() else {
        return false;
    };
    assert_eq!(
        &HopToken::decode(raw).encode(),
        raw,
        "token layout must round-trip"
    );
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let keyring = PairKeyring::new(PairIds::new(a, b));
    let binding = ConnectionBinding::from_bytes([3; 32]);
    let now = UnixTime::from_secs(1_800_000_000);
    let gate = GateContext {
        local: b,
        peer: a,
        stream_id: 0,
        epoch_len: EpochLength::DEFAULT,
        now,
    };
    let keys = ConnectionKeys {
        keyring: &keyring,
        binding: &binding,
        now,
        grace: 10,
        cache: None,
    };
    assert!(
        verify_token(raw, &gate, &keys, &IngressTable::default()).is_err(),
        "no key is held, so nothing may verify"
    );
    true
}

/// Frames (peer control, verifier requests, responses, pushes) and stream headers: whatever decodes re-encodes to exactly the bytes consumed.
pub fn frame(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(Some((msg, used))) = decode_frame::<PeerMessage>(data, CONTROL_CAP) {
        assert_eq!(
            msg.to_frame().ok().as_deref(),
            Some(&data[..used]),
            "frame must be canonical"
        );
        accepted = true;
    }
    if let Ok(Some((msg, used))) = decode_frame::<NodeRequest>(data, REQUEST_CAP) {
        assert_eq!(
            encode_frame(&msg, REQUEST_CAP).ok().as_deref(),
            Some(&data[..used])
        );
        accepted = true;
    }
    if let Ok(Some((msg, used))) = decode_frame::<VerifierResponse>(data, REQUEST_CAP) {
        assert_eq!(
            encode_frame(&msg, REQUEST_CAP).ok().as_deref(),
            Some(&data[..used])
        );
        accepted = true;
    }
    if let Ok(Some((msg, used))) = decode_frame::<Push>(data, PUSH_CAP) {
        assert_eq!(
            encode_frame(&msg, PUSH_CAP).ok().as_deref(),
            Some(&data[..used])
        );
        accepted = true;
    }
    if let Ok(h) = StreamHeader::decode(data) {
        assert_eq!(
            h.encode().ok().as_deref(),
            Some(data),
            "header must be canonical"
        );
        accepted = true;
    }
    accepted
}

/// Attestation: unsigned bytes never verify; signed payloads decode only if canonical.
pub fn attestation(data: &[u8]) -> bool {
    let key = test_key();
    let keys = KeySet::new(vec![key.verifying_key()]).unwrap_or_default();
    let now = UnixTime::from_secs(1_800_000_000);
    assert!(
        verify_attestation(data, &keys, now, 0).is_err(),
        "unsigned bytes must not verify"
    );
    if data.len() > MAX_ATTESTATION_PAYLOAD {
        return false;
    }
    let Ok(env) = seal(DocumentKind::Attestation, &key, data) else {
        return false;
    };
    // Any validity window: check the decode path at the attestation's own not_before.
    let Ok(a) = postcard::from_bytes::<Attestation>(data) else {
        assert!(verify_attestation(&env, &keys, now, 0).is_err());
        return false;
    };
    match verify_attestation(&env, &keys, a.not_before, 0) {
        Ok(v) => {
            assert_eq!(
                postcard::to_allocvec(v.get()).ok().as_deref(),
                Some(data),
                "accepted payload must be canonical"
            );
            true
        }
        Err(_) => false,
    }
}

/// Revocation list: unsigned bytes never verify; signed payloads decode only if canonical.
pub fn revocation_list(data: &[u8]) -> bool {
    let key = test_key();
    let keys = KeySet::new(vec![key.verifying_key()]).unwrap_or_default();
    assert!(
        verify_revocation_list(data, &keys, None).is_err(),
        "unsigned bytes must not verify"
    );
    if data.len() > MAX_REVOCATION_PAYLOAD {
        return false;
    }
    let Ok(env) = seal(DocumentKind::RevocationList, &key, data) else {
        return false;
    };
    match verify_revocation_list(&env, &keys, None) {
        Ok(RevocationUpdate::Newer(list)) => {
            assert_eq!(
                postcard::to_allocvec(&list).ok().as_deref(),
                Some(data),
                "accepted list must be canonical"
            );
            let _: &RevocationList = &list;
            true
        }
        Ok(RevocationUpdate::Same) => unreachable!("no current list was given"),
        Err(_) => false,
    }
}

/// SOCKS greeting and username/password: accepted messages re-encode to the bytes consumed.
pub fn socks_greeting(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(Some((g, used))) = socks5::parse_greeting(data) {
        assert!(used <= 257);
        assert_eq!(socks5::encode_greeting(&g.methods), &data[..used]);
        accepted = true;
    }
    if let Ok(Some((c, used))) = socks5::parse_userpass(data) {
        assert!(used <= 513);
        assert_eq!(
            socks5::encode_userpass(&c.username, &c.password),
            &data[..used]
        );
        accepted = true;
    }
    accepted
}

/// SOCKS request and reply: accepted requests re-encode to the bytes consumed; every error
/// has a defined response.
pub fn socks_request(data: &[u8]) -> bool {
    let accepted = match socks5::parse_request(data) {
        Ok(Some((r, used))) => {
            assert!(used <= 262);
            assert_ne!(r.port, 0);
            assert_eq!(socks5::encode_request(&r), &data[..used]);
            true
        }
        Ok(None) => false,
        Err(e) => {
            let _ = e.response();
            false
        }
    };
    if let Ok(Some((_, used))) = socks5::parse_reply(data) {
        assert!(used <= 262 && used <= data.len());
    }
    accepted
}

/// Policy: never panics; an accepted policy compiles, and every compiled table only names
/// enrolled nodes and never lets a node route to itself.
pub fn policy(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(p) = Policy::parse(text) else {
        return false;
    };
    let directory: NodeDirectory = p
        .nodes
        .keys()
        .map(|n: &NodeName| (n.clone(), NodeId::from_spki(n.as_str().as_bytes())))
        .collect();
    let ids: std::collections::BTreeSet<NodeId> = directory.values().copied().collect();
    for (node, table) in p.compile(&directory) {
        for route in table.egress.routes() {
            assert!(ids.contains(&route.serving_node));
            assert_ne!(route.serving_node, node, "a node must not route to itself");
        }
        for entry in table.ingress.entries() {
            assert!(entry.allowed_peers.is_subset(&ids));
            assert!(!entry.allowed_peers.contains(&node));
        }
        assert!(table.peers.is_subset(&ids));
    }
    true
}

/// A node's table in a segment where `peers + 1` nodes each serve one service and every node
/// may use every service (`allow s -> s`): per peer a `Peer` (with `addresses` advertised
/// addresses), a `Route` and an `Allowed`, plus the node's own `Service`. Node ids are
/// `[i as bytes; ...]`, deterministic. For tests and fuzzing.
pub fn segment_entries(peers: u32, addresses: usize) -> Entries {
    use crate::enrollment::{Address, PeerInfo};
    use crate::ids::{SegmentName, ServiceName};
    use crate::routing::{Backend, EgressRoute, MeshName};
    use crate::wire::BoundedVec;

    let id = |i: u32| {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[31] = 1;
        NodeId::from_bytes(b)
    };
    let name = |i: u32| MeshName {
        service: ServiceName::new(&format!("svc-{i}")).expect("label"),
        segment: SegmentName::new("seg").expect("label"),
    };
    let mut out = Entries::new();
    let mut put = |e: TableEntry| {
        out.insert(e.key(), e);
    };
    let own = name(0);
    put(TableEntry::Service {
        service: own.service_id(),
        name: own.clone(),
        backend: Backend {
            host: "127.0.0.1".into(),
            port: 8080,
        },
    });
    for i in 1..=peers {
        let addrs: Vec<Address> = (0..addresses)
            .map(|a| Address::truncated(&format!("10.{}.{}.{a}:4433", i >> 8, i & 0xFF)))
            .collect();
        put(TableEntry::Peer(PeerInfo {
            node_id: id(i),
            name: NodeName::new(&format!("node-{i}")).expect("label"),
            addresses: BoundedVec::new(addrs).expect("at most MAX_ADDRESSES"),
        }));
        let n = name(i);
        put(TableEntry::Route(EgressRoute {
            service: n.service_id(),
            name: n,
            serving_node: id(i),
            via: None,
        }));
        put(TableEntry::Allowed {
            service: own.service_id(),
            peer: id(i),
        });
    }
    out
}

/// Table sync: `data` read as a sequence of push frames; every `TablePart` goes through one
/// [`TableAssembler`] and every update it yields through a [`SyncedTable`]. Never panics,
/// never buffers more than [`MAX_TABLE_BYTES`]; an accepted update re-splits into exactly the
/// parts it came in, and an applied one leaves the table with the update's digest. Returns
/// whether an update was applied.
pub fn table_sync(data: &[u8]) -> bool {
    let mut assembler = TableAssembler::new();
    let mut held: Option<SyncedTable> = None;
    let mut parts: Vec<Push> = Vec::new();
    let mut applied = false;
    let mut rest = data;
    while let Ok(Some((push, used))) = decode_frame::<Push>(rest, PUSH_CAP) {
        rest = &rest[used..];
        let Push::TablePart(part) = push else {
            continue;
        };
        parts.push(Push::TablePart(part.clone()));
        let r = assembler.push(&part);
        assert!(
            assembler.buffered() <= MAX_TABLE_BYTES,
            "assembler over its cap"
        );
        match r {
            Ok(None) => continue,
            Ok(Some(update)) => {
                assert_eq!(
                    split(&update).ok().as_ref(),
                    Some(&parts),
                    "an accepted update re-splits into the parts it came in"
                );
                if let Ok(next) = SyncedTable::apply_to(held.as_ref(), &update) {
                    assert_eq!(next.digest(), update.digest);
                    assert_eq!(next.digest(), digest(next.entries()));
                    assert_eq!(next.version(), update.version);
                    held = Some(next);
                    applied = true;
                }
            }
            Err(e) => {
                assert!(!e.reason().is_empty());
                assert!(
                    !assembler.is_assembling(),
                    "an error drops what was buffered"
                );
            }
        }
        if !assembler.is_assembling() {
            parts.clear();
        }
    }
    applied
}

/// Relayed-flow records and answers: arbitrary bytes never open as a record (the key is the
/// fuzzer's, but without the tag nothing authenticates), a record that opens re-seals to the
/// same bytes, and an answer that decodes re-encodes canonically and never verifies unsigned.
pub fn flow_record(data: &[u8]) -> bool {
    use crate::flow_seal::{FlowAnswer, record_len};
    let mut accepted = false;
    let (_, mut opener) = crate::flow_seal::fuzzing_pair([0x5E; 32]);
    let mut buf = data.to_vec();
    match record_len(&buf) {
        Ok(Some(n)) if n <= buf.len() => {
            assert!(
                opener.open(&mut buf).is_err(),
                "arbitrary bytes must not authenticate"
            );
        }
        Ok(_) => assert!(matches!(opener.open(&mut buf), Ok(None))),
        Err(_) => assert!(opener.open(&mut buf).is_err()),
    }
    // A genuine record of the fuzzer's bytes opens to them, exactly once.
    let (mut sealer, mut opener2) = crate::flow_seal::fuzzing_pair([0x5F; 32]);
    let payload = &data[..data.len().min(crate::flow_seal::MAX_RECORD_PAYLOAD)];
    let mut wire = Vec::new();
    sealer.seal_data(payload, &mut wire);
    let mut copy = wire.clone();
    if let Ok(Some(o)) = opener2.open(&mut copy) {
        assert_eq!(&copy[o.payload], payload);
        assert_eq!(o.used, wire.len());
        accepted = true;
    }
    assert!(
        opener2.open(&mut wire.clone()).is_err(),
        "a record opens once"
    );
    if let Some(prefix) = data.first_chunk::<4>()
        && let Ok(len) = FlowAnswer::body_len(*prefix)
        && let Some(body) = data.get(4..4 + len)
        && let Ok(answer) = FlowAnswer::from_body(body)
    {
        assert_eq!(
            answer.to_frame().ok().as_deref(),
            Some(&data[..4 + len]),
            "answer must be canonical"
        );
        accepted = true;
    }
    accepted
}
