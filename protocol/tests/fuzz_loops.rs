//! Bounded property loops over every decoder: the stable-toolchain twin of the cargo-fuzz
//! targets in `protocol/fuzz/`. Both call the same `hopmesh_protocol::fuzzing` properties.
//!
//! Inputs are arbitrary bytes and mutations (bit flips, truncation, insertion, overwrite) of
//! valid encodings, so the loops reach the accepting paths and not only early refusals; each
//! test also asserts that valid encodings are accepted, so a property that silently refused
//! everything would fail here.

use hopmesh_protocol::attestation::{
    ATTESTATION_VERSION, Attestation, RevocationList, RevokedNode, SigningKey,
};
use hopmesh_protocol::control::{GoodbyeReason, PeerMessage, StreamHeader};
use hopmesh_protocol::enrollment::{PUSH_CAP, Push};
use hopmesh_protocol::frame::encode_frame;
use hopmesh_protocol::fuzzing;
use hopmesh_protocol::ids::{KeyId, Measurement, NodeId, NodeName, SegmentName};
use hopmesh_protocol::replica_bundle::{
    self, BUNDLE_MAGIC, BUNDLE_VERSION, BundleContents, MAX_PKCS8_BYTES, MAX_SIGNING_KEYS,
    PBKDF2_MAX_ITERATIONS, PBKDF2_MIN_ITERATIONS, SealedBundle,
};
use hopmesh_protocol::secret::SigningSeed;
use hopmesh_protocol::socks5::{self, Command, Request, TargetAddr};
use hopmesh_protocol::table_sync::{TableUpdate, diff, digest, split};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use proptest::prelude::*;
use zeroize::Zeroizing;

const CASES: u32 = 512;

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Overwrite(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn mutate(mut data: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if data.is_empty() {
            break;
        }
        let n = data.len();
        match *m {
            Mutation::Flip(i, b) => data[i % n] ^= 1 << b,
            Mutation::Truncate(i) => data.truncate(i % n),
            Mutation::Insert(i, b) => data.insert(i % (n + 1), b),
            Mutation::Overwrite(i, b) => data[i % n] = b,
        }
    }
    data
}

/// A length in `0..=max + 1`, half of the time one of `0, 1, max, max + 1`.
fn near_bounds(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        prop_oneof![Just(0), Just(1), Just(max), Just(max + 1)],
        0..=max + 1,
    ]
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId::from_bytes)
}

fn attestation() -> impl Strategy<Value = Attestation> {
    (
        any::<[u8; 32]>(),
        label(),
        prop::collection::vec(label(), 0..4),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u32>(),
        1u64..100_000,
        any::<[u8; 8]>(),
    )
        .prop_map(|(seed, name, segs, m, serial, nb, ttl, kid)| {
            let spki = SigningKey::from_seed(&SigningSeed::from_bytes(seed))
                .verifying_key()
                .to_spki_der();
            Attestation {
                version: ATTESTATION_VERSION,
                node_id: NodeId::from_spki(&spki),
                spki: BoundedVec::new(spki).expect("44 bytes"),
                name: NodeName::new(&name).expect("label"),
                segments: BoundedVec::new(
                    segs.iter()
                        .map(|s| SegmentName::new(s).expect("label"))
                        .collect(),
                )
                .expect("fits"),
                measurement: Measurement(m),
                serial,
                not_before: UnixTime::from_secs(u64::from(nb)),
                not_after: UnixTime::from_secs(u64::from(nb) + ttl),
                verifier_key_id: KeyId(kid),
            }
        })
}

fn revocation_list() -> impl Strategy<Value = RevocationList> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec((node_id(), any::<u64>(), any::<u64>()), 0..20),
    )
        .prop_map(|(version, issued, entries)| RevocationList {
            version,
            issued_at: UnixTime::from_secs(issued),
            // The key id must match the fuzzing key for acceptance.
            verifier_key_id: SigningKey::from_seed(&SigningSeed::from_bytes([0x5E; 32])).key_id(),
            revoked: BoundedVec::new(
                entries
                    .into_iter()
                    .map(|(node_id, a, b)| RevokedNode {
                        node_id,
                        revoked_at: UnixTime::from_secs(a),
                        until: UnixTime::from_secs(b),
                    })
                    .collect(),
            )
            .expect("fits"),
        })
}

fn peer_message() -> impl Strategy<Value = PeerMessage> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|a| PeerMessage::Hello {
            attestation: BoundedVec::new(a).expect("fits")
        }),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|a| PeerMessage::Renewal {
            attestation: BoundedVec::new(a).expect("fits")
        }),
        prop_oneof![
            Just(GoodbyeReason::Shutdown),
            Just(GoodbyeReason::AttestationExpired),
            Just(GoodbyeReason::PolicyChanged)
        ]
        .prop_map(|reason| PeerMessage::Goodbye { reason }),
    ]
}

fn stream_header() -> impl Strategy<Value = StreamHeader> {
    (
        node_id(),
        any::<u64>(),
        prop::collection::vec(node_id(), 0..5),
    )
        .prop_map(|(origin, s, route)| StreamHeader {
            origin,
            service: hopmesh_protocol::ids::ServiceId::from_u64(s),
            route: BoundedVec::new(route).expect("fits"),
            assertion: None,
        })
}

fn socks_request() -> impl Strategy<Value = Request> {
    let target = prop_oneof![
        any::<[u8; 4]>().prop_map(|b| TargetAddr::Ipv4(b.into())),
        any::<[u8; 16]>().prop_map(|b| TargetAddr::Ipv6(b.into())),
        "[a-z0-9.-]{1,60}".prop_map(TargetAddr::Domain),
    ];
    let command = prop_oneof![
        Just(Command::Connect),
        Just(Command::Bind),
        Just(Command::UdpAssociate)
    ];
    (command, target, 1u16..).prop_map(|(command, target, port)| Request {
        command,
        target,
        port,
    })
}

const SAMPLE_POLICY: &str = r#"
suffix = "mesh"
[[segment]]
name = "s1"
[[segment]]
name = "s2"
[[node]]
name = "a"
segments = ["s1"]
[[node]]
name = "c"
segments = ["s2"]
[[service]]
name = "web"
segment = "s2"
node = "c"
backend = "127.0.0.1:80"
[[allow]]
from = "s1"
to = "s2"
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token_arbitrary(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let accepted = fuzzing::token(&data);
        prop_assert_eq!(accepted, data.len() >= hopmesh_protocol::hop_token::TOKEN_LEN);
    }

    #[test]
    fn frame_valid_and_mutated(msg in peer_message(), h in stream_header(), muts in prop::collection::vec(mutation(), 0..4)) {
        let frame = msg.to_frame().expect("encode");
        prop_assert!(fuzzing::frame(&frame), "a valid frame must be accepted");
        let header = h.encode().expect("encode");
        prop_assert!(fuzzing::frame(&header), "a valid header must be accepted");
        fuzzing::frame(&mutate(frame, &muts));
        fuzzing::frame(&mutate(header, &muts));
    }

    #[test]
    fn frame_arbitrary(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::frame(&data);
    }

    #[test]
    fn attestation_valid_and_mutated(a in attestation(), muts in prop::collection::vec(mutation(), 0..4)) {
        let payload = postcard::to_allocvec(&a).expect("encode");
        // Key id differs from the fuzzing key, so this is refused, but only after decoding.
        fuzzing::attestation(&payload);
        let mut own = a.clone();
        own.verifier_key_id = SigningKey::from_seed(&SigningSeed::from_bytes([0x5E; 32])).key_id();
        let payload = postcard::to_allocvec(&own).expect("encode");
        prop_assert!(fuzzing::attestation(&payload), "a valid attestation must be accepted");
        fuzzing::attestation(&mutate(payload, &muts));
    }

    #[test]
    fn revocation_valid_and_mutated(l in revocation_list(), muts in prop::collection::vec(mutation(), 0..4)) {
        let payload = postcard::to_allocvec(&l).expect("encode");
        prop_assert!(fuzzing::revocation_list(&payload), "a valid list must be accepted");
        fuzzing::revocation_list(&mutate(payload, &muts));
    }

    #[test]
    fn signed_arbitrary(data in prop::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::attestation(&data);
        fuzzing::revocation_list(&data);
    }

    #[test]
    fn socks_valid_and_mutated(r in socks_request(), methods in prop::collection::vec(any::<u8>(), 1..255),
                               user in prop::collection::vec(any::<u8>(), 1..255),
                               muts in prop::collection::vec(mutation(), 0..4)) {
        let wire = socks5::encode_request(&r);
        prop_assert!(fuzzing::socks_request(&wire), "a valid request must be accepted");
        fuzzing::socks_request(&mutate(wire, &muts));
        let greeting = socks5::encode_greeting(&methods);
        prop_assert!(fuzzing::socks_greeting(&greeting), "a valid greeting must be accepted");
        fuzzing::socks_greeting(&mutate(greeting, &muts));
        let auth = socks5::encode_userpass(&user, &user);
        prop_assert!(fuzzing::socks_greeting(&auth));
        fuzzing::socks_greeting(&mutate(auth, &muts));
    }

    #[test]
    fn socks_arbitrary(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::socks_greeting(&data);
        fuzzing::socks_request(&data);
    }

    #[test]
    fn table_sync_valid_and_mutated(old in 0u32..400, new in 0u32..400, addrs in 0usize..3,
                                    muts in prop::collection::vec(mutation(), 0..4)) {
        let (a, b) = (fuzzing::segment_entries(old, addrs), fuzzing::segment_entries(new, 1));
        let snapshot = TableUpdate::snapshot(5, &a).expect("fits");
        let delta = TableUpdate::delta(5, 6, diff(&a, &b), digest(&b)).expect("fits");
        let mut wire = Vec::new();
        for p in split(&snapshot).expect("split").iter().chain(&split(&delta).expect("split")) {
            wire.extend(encode_frame(p, PUSH_CAP).expect("a part fits a frame"));
        }
        prop_assert!(fuzzing::table_sync(&wire), "a valid snapshot and delta must apply");
        fuzzing::table_sync(&mutate(wire, &muts));
    }

    #[test]
    fn flow_record_arbitrary(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::flow_record(&data);
    }

    #[test]
    fn flow_record_valid_and_mutated(payload in prop::collection::vec(any::<u8>(), 0..300), muts in prop::collection::vec(mutation(), 1..4)) {
        let (mut sealer, mut opener) = hopmesh_protocol::flow_seal::fuzzing_pair([0x11; 32]);
        let mut wire = Vec::new();
        sealer.seal_data(&payload, &mut wire);
        let mutated = mutate(wire.clone(), &muts);
        let got = opener.open(&mut mutated.clone());
        // Only the genuine record (possibly with bytes after it) opens.
        if !mutated.starts_with(&wire) {
            prop_assert!(!matches!(got, Ok(Some(_))), "a modified record opened: {got:?}");
        }
        fuzzing::flow_record(&mutated);
    }

    #[test]
    fn table_sync_arbitrary(data in prop::collection::vec(any::<u8>(), 0..600), parts: u32, part: u32) {
        fuzzing::table_sync(&data);
        // Arbitrary bytes inside well-formed part frames reach the assembler's decoder.
        let p = Push::TablePart(hopmesh_protocol::table_sync::TablePart {
            version: 1, part: part % 3, parts: parts % 4, bytes: BoundedVec::new(data).expect("fits"),
        });
        fuzzing::table_sync(&encode_frame(&p, PUSH_CAP).expect("fits"));
    }

    #[test]
    fn replica_bundle_valid_mutated_and_arbitrary(
        data in prop::collection::vec(any::<u8>(), 0..1000),
        // Lengths at and one past each bound, on both sides: those past must be refused.
        pkcs8 in near_bounds(MAX_PKCS8_BYTES).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
        keys in near_bounds(MAX_SIGNING_KEYS).prop_flat_map(|n| prop::collection::vec(any::<[u8; 32]>(), n)),
        master: [u8; 32], pin: [u8; 32], salt: [u8; 16], nonce: [u8; 12],
        iterations in PBKDF2_MIN_ITERATIONS..=PBKDF2_MAX_ITERATIONS,
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        // Never `open` (its KDF is slow): the two decoders only, as the cargo-fuzz target.
        replica_bundle::fuzz_decoders(&data);
        let in_bounds = (1..=MAX_PKCS8_BYTES).contains(&pkcs8.len())
            && (1..=MAX_SIGNING_KEYS).contains(&keys.len());
        let contents = BundleContents {
            signing_pkcs8: Zeroizing::new(pkcs8),
            master_secret: Zeroizing::new(master),
            verifier_tls_pin: pin,
            signing_keys: keys,
        };
        let plain = contents.to_plaintext();
        if !in_bounds {
            prop_assert!(BundleContents::from_plaintext(&plain).is_err(), "out of bounds");
            prop_assert!(!replica_bundle::fuzz_decoders(&plain));
            replica_bundle::fuzz_decoders(&mutate(plain.to_vec(), &muts));
            return Ok(());
        }
        prop_assert_eq!(BundleContents::from_plaintext(&plain), Ok(contents));
        prop_assert!(replica_bundle::fuzz_decoders(&plain), "a valid plaintext must be accepted");
        // The real file layout around a ciphertext of the right length (random bytes: parsing
        // decrypts nothing), then arbitrary bytes behind a valid header.
        let mut header = BUNDLE_MAGIC.to_vec();
        header.push(BUNDLE_VERSION);
        header.extend_from_slice(&iterations.to_be_bytes());
        header.extend_from_slice(&salt);
        header.extend_from_slice(&nonce);
        let mut file = header.clone();
        file.extend_from_slice(&plain);
        file.extend_from_slice(&[0x7A; 16]);
        let parsed = SealedBundle::parse(&file).expect("a well-formed file must parse");
        prop_assert_eq!((parsed.iterations, parsed.salt, parsed.nonce), (iterations, salt, nonce));
        prop_assert!(replica_bundle::fuzz_decoders(&file));
        header.extend_from_slice(&data);
        replica_bundle::fuzz_decoders(&header);
        replica_bundle::fuzz_decoders(&mutate(plain.to_vec(), &muts));
        replica_bundle::fuzz_decoders(&mutate(file, &muts));
    }

    #[test]
    fn policy_mutated(muts in prop::collection::vec(mutation(), 0..6)) {
        prop_assert!(fuzzing::policy(SAMPLE_POLICY.as_bytes()));
        fuzzing::policy(&mutate(SAMPLE_POLICY.as_bytes().to_vec(), &muts));
    }

    #[test]
    fn policy_arbitrary(data in "[\\[\\]a-z0-9 =\"\\n.:,_-]{0,300}") {
        fuzzing::policy(data.as_bytes());
    }
}
