use sha2::{Digest, Sha256};

use super::*;
use crate::ids::{NodeId, SegmentName, ServiceId, ServiceName};
use crate::routing::{Backend, IngressEntry, IngressTable, MeshName, ServeRefusal};
use crate::secret::{ConnectionBinding, EpochKey, MasterSecret, PairSeed, StreamKey};
use crate::time::UnixTime;

const NOW: u64 = 1_800_000_005; // epoch 180_000_000 at E = 10 s

struct Fixture {
    a: NodeId,
    b: NodeId,
    keyring: PairKeyring,
    binding: ConnectionBinding,
    ingress: IngressTable,
    service: ServiceId,
}

fn fixture() -> Fixture {
    let a = NodeId::from_bytes([0xA1; 32]);
    let b = NodeId::from_bytes([0xB2; 32]);
    let mut keyring = PairKeyring::new(PairIds::new(a, b));
    keyring
        .insert(GenerationGrant {
            generation: Generation(7),
            seed: PairSeed::from_bytes([0x11; 32]),
            valid_from: UnixTime::from_secs(NOW - 100),
            valid_until: UnixTime::from_secs(NOW + 200),
        })
        .expect("grant");
    let name = MeshName {
        service: ServiceName::new("api").expect("valid"),
        segment: SegmentName::new("payments").expect("valid"),
    };
    let service = name.service_id();
    let ingress = IngressTable::from_entries([IngressEntry {
        service,
        name,
        backend: Backend {
            host: "127.0.0.1".into(),
            port: 8080,
        },
        allowed_peers: [a].into(),
        relayed: std::collections::BTreeSet::new(),
    }]);
    Fixture {
        a,
        b,
        keyring,
        binding: ConnectionBinding::from_bytes([0x33; 32]),
        ingress,
        service,
    }
}

impl Fixture {
    /// A mints for B on stream 4 at `now`.
    fn mint_at(&self, now: u64, header: &[u8]) -> [u8; TOKEN_LEN] {
        let epoch = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(now));
        self.mint_with(Generation(7), epoch, 4, header, &self.binding)
    }

    fn mint_with(
        &self,
        g: Generation,
        epoch: Epoch,
        stream_id: u64,
        header: &[u8],
        binding: &ConnectionBinding,
    ) -> [u8; TOKEN_LEN] {
        let (SeedLookup::Valid(seed) | SeedLookup::Compromised(seed)) =
            self.keyring.lookup(g, UnixTime::from_secs(NOW), 10)
        else {
            panic!("fixture generation missing");
        };
        let key = StreamKey::derive(
            binding,
            &EpochKey::derive(seed, &self.keyring.pair(), epoch),
        );
        mint_token(
            &MintRequest {
                generation: g,
                epoch,
                src: self.a,
                dst: self.b,
                service: self.service,
                stream_id,
                header,
            },
            &key,
        )
        .expect("mint")
    }

    /// B verifies at `now` a token that arrived on `stream_id` of the connection with `binding`.
    fn verify_on(
        &self,
        token: &[u8; TOKEN_LEN],
        now: u64,
        stream_id: u64,
        binding: &ConnectionBinding,
    ) -> Result<TokenPermit, TokenRefusal> {
        let gate = GateContext {
            local: self.b,
            peer: self.a,
            stream_id,
            epoch_len: EpochLength::DEFAULT,
            now: UnixTime::from_secs(now),
        };
        let keys = ConnectionKeys {
            keyring: &self.keyring,
            binding,
            now: UnixTime::from_secs(now),
            grace: 10,
            cache: None,
        };
        verify_token(token, &gate, &keys, &self.ingress)
    }

    fn verify(&self, token: &[u8; TOKEN_LEN], now: u64) -> Result<TokenPermit, TokenRefusal> {
        self.verify_on(token, now, 4, &self.binding)
    }
}

#[test]
fn mint_then_verify_accepts_and_checks_header() {
    let f = fixture();
    let token = f.mint_at(NOW, b"header");
    let permit = f.verify(&token, NOW).expect("accepted");
    assert_eq!(permit.header_len(), 6);
    let stream = permit.check_header(b"header").expect("header matches");
    assert_eq!(stream.fields().src, f.a);
    let crate::routing::Admission::Serve(serve) = stream.admission() else {
        panic!("served locally");
    };
    assert_eq!(serve.backend.port, 8080);

    let permit = f.verify(&token, NOW).expect("accepted");
    assert_eq!(
        permit.check_header(b"HEADER").map(|_| ()),
        Err(TokenRefusal::HeaderHashMismatch)
    );
    let permit = f.verify(&token, NOW).expect("accepted");
    assert_eq!(
        permit.check_header(b"header+").map(|_| ()),
        Err(TokenRefusal::HeaderHashMismatch)
    );
}

/// The key schedule recomputed with ring's independent HKDF and HMAC.
#[test]
fn key_schedule_matches_an_independent_implementation() {
    use ring::{hkdf, hmac};
    let f = fixture();
    let epoch = Epoch(180_000_000);
    let pair = f.keyring.pair();

    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut info = EPOCH_KEY_LABEL.to_vec();
    info.extend_from_slice(&epoch.0.to_be_bytes());
    info.extend_from_slice(pair.lo().as_bytes());
    info.extend_from_slice(pair.hi().as_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&[0x11; 32]);
    let mut k = [0u8; 32];
    prk.expand(&[&info], Len32)
        .expect("expand")
        .fill(&mut k)
        .expect("fill");
    let ours = EpochKey::derive(&PairSeed::from_bytes([0x11; 32]), &pair, epoch);
    assert_eq!(ours.expose(), &k);

    // HKDF-Extract(salt = X, ikm = K) is HMAC(X, K).
    let stream_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[0x33; 32]), &k);
    let ours = StreamKey::derive(&f.binding, &ours);
    assert_eq!(ours.expose().as_slice(), stream_key.as_ref());

    let token = f.mint_with(Generation(7), epoch, 4, b"hdr", &f.binding);
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, stream_key.as_ref()),
        &token[..TAG_OFFSET],
    );
    assert_eq!(&token[TAG_OFFSET..], tag.as_ref());
    let decoded = HopToken::decode(&token);
    assert_eq!(
        decoded.fields.header_hash,
        <[u8; 32]>::from(Sha256::digest(b"hdr"))
    );
    assert_eq!(decoded.encode(), token);
}

/// Golden bytes: a change here breaks interoperability with every deployed node.
#[test]
fn golden_token() {
    let f = fixture();
    let token = f.mint_with(Generation(7), Epoch(180_000_000), 4, b"hdr", &f.binding);
    let hex = hex::encode(token);
    let want = concat!(
        "0101",                                                             // version, alg
        "0000000000000007",                                                 // generation
        "000000000aba9500",                                                 // epoch 180_000_000
        "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1", // src
        "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2", // dst
    );
    assert_eq!(&hex[..want.len()], want);
    assert_eq!(
        &hex[want.len()..want.len() + 16],
        format!("{:016x}", f.service.as_u64())
    );
    assert_eq!(
        &hex[want.len() + 16..want.len() + 40],
        "000000000000000400000003"
    );
    assert_eq!(hex, GOLDEN_TOKEN_HEX);
}

const GOLDEN_TOKEN_HEX: &str = include_str!("golden_token.hex");

#[test]
fn every_single_bit_flip_is_refused() {
    let f = fixture();
    let token = f.mint_at(NOW, b"header");
    for bit in 0..TOKEN_LEN * 8 {
        let mut bad = token;
        bad[bit / 8] ^= 1 << (bit % 8);
        let refusal = f
            .verify(&bad, NOW)
            .map(|_| ())
            .expect_err("a flipped bit must be refused");
        // The flipped field decides which check trips first; none may be a policy decision.
        assert!(
            !matches!(refusal, TokenRefusal::PolicyRefused(_)),
            "bit {bit}: {refusal:?}"
        );
    }
}

#[test]
fn epoch_window_is_plus_minus_one() {
    let f = fixture();
    let now = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(NOW));
    for (delta, ok) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
        let e = Epoch(now.0.checked_add_signed(delta).expect("no overflow"));
        let token = f.mint_with(Generation(7), e, 4, b"", &f.binding);
        let got = f.verify(&token, NOW);
        if ok {
            assert!(got.is_ok(), "e{delta:+} must be accepted: {got:?}");
        } else {
            assert_eq!(
                got.map(|_| ()),
                Err(TokenRefusal::EpochOutOfWindow {
                    token: e.0,
                    now: now.0
                }),
                "e{delta:+}"
            );
        }
    }
}

#[test]
fn replay_on_another_connection_fails_the_mac() {
    let f = fixture();
    let token = f.mint_at(NOW, b"h");
    let other = ConnectionBinding::from_bytes([0x34; 32]);
    assert_eq!(
        f.verify_on(&token, NOW, 4, &other).map(|_| ()),
        Err(TokenRefusal::BadMac)
    );
}

#[test]
fn replay_on_another_stream_is_refused() {
    let f = fixture();
    let token = f.mint_at(NOW, b"h");
    assert_eq!(
        f.verify_on(&token, NOW, 8, &f.binding).map(|_| ()),
        Err(TokenRefusal::StreamIdMismatch {
            token: 4,
            actual: 8
        })
    );
    // Rewriting the stream id to match the new stream breaks the MAC.
    let mut rewritten = token;
    rewritten[90..98].copy_from_slice(&8u64.to_be_bytes());
    assert_eq!(
        f.verify_on(&rewritten, NOW, 8, &f.binding).map(|_| ()),
        Err(TokenRefusal::BadMac)
    );
}

#[test]
fn impersonation_and_misdelivery_are_refused() {
    let f = fixture();
    let token = f.mint_at(NOW, b"h");
    let gate = GateContext {
        local: f.b,
        peer: NodeId::from_bytes([0xC3; 32]), // the TLS peer is C, the token claims A
        stream_id: 4,
        epoch_len: EpochLength::DEFAULT,
        now: UnixTime::from_secs(NOW),
    };
    let keys = ConnectionKeys {
        keyring: &f.keyring,
        binding: &f.binding,
        now: UnixTime::from_secs(NOW),
        grace: 10,
        cache: None,
    };
    let got = verify_token(&token, &gate, &keys, &f.ingress).map(|_| ());
    assert_eq!(
        got,
        Err(TokenRefusal::SrcNotPeer {
            claimed: f.a,
            peer: gate.peer
        })
    );
    assert!(got.expect_err("refused").closes_connection());

    let gate = GateContext {
        local: NodeId::from_bytes([0xD4; 32]),
        peer: f.a,
        ..gate
    };
    assert_eq!(
        verify_token(&token, &gate, &keys, &f.ingress).map(|_| ()),
        Err(TokenRefusal::DstNotSelf(f.b))
    );
}

#[test]
fn compromised_generation_with_valid_mac_is_reported() {
    let mut f = fixture();
    let token = f.mint_at(NOW, b"h");
    assert!(f.keyring.mark_compromised(Generation(7)));
    let got = f.verify(&token, NOW).map(|_| ());
    assert_eq!(got, Err(TokenRefusal::CompromisedKeyUse(7)));
    assert!(got.expect_err("refused").closes_connection());
    // A forgery under the compromised generation is a bad MAC, not key use.
    let mut forged = token;
    forged[TAG_OFFSET] ^= 1;
    assert_eq!(
        f.verify(&forged, NOW).map(|_| ()),
        Err(TokenRefusal::BadMac)
    );
    // Minting never picks a compromised generation, and it cannot be re-granted.
    assert!(f.keyring.minting(UnixTime::from_secs(NOW)).is_none());
    let again = GenerationGrant {
        generation: Generation(7),
        seed: PairSeed::from_bytes([0x11; 32]),
        valid_from: UnixTime::from_secs(NOW - 100),
        valid_until: UnixTime::from_secs(NOW + 200),
    };
    assert_eq!(f.keyring.insert(again), Err(GrantRefusal::Compromised(7)));
}

#[test]
fn unknown_generation_policy_version_and_header_length() {
    let f = fixture();
    let epoch = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(NOW));
    // Generation 8 was never granted: the token is refused before any MAC work.
    let mut token = f.mint_at(NOW, b"h");
    token[2..10].copy_from_slice(&8u64.to_be_bytes());
    assert_eq!(
        f.verify(&token, NOW).map(|_| ()),
        Err(TokenRefusal::UnknownGeneration(8))
    );

    let mut v2 = f.mint_at(NOW, b"h");
    v2[0] = 2;
    assert_eq!(
        f.verify(&v2, NOW).map(|_| ()),
        Err(TokenRefusal::WrongVersion(2))
    );
    let mut alg = f.mint_at(NOW, b"h");
    alg[1] = 9;
    assert_eq!(
        f.verify(&alg, NOW).map(|_| ()),
        Err(TokenRefusal::UnknownAlgorithm(9))
    );
    let mut long = f.mint_at(NOW, b"h");
    long[98..102].copy_from_slice(&(MAX_HEADER_LEN + 1).to_be_bytes());
    assert_eq!(
        f.verify(&long, NOW).map(|_| ()),
        Err(TokenRefusal::HeaderTooLong(MAX_HEADER_LEN + 1))
    );

    // A valid token for a service B does not serve: policy refuses it.
    let SeedLookup::Valid(seed) = f.keyring.lookup(Generation(7), UnixTime::from_secs(NOW), 0)
    else {
        panic!("seed");
    };
    let key = StreamKey::derive(
        &f.binding,
        &EpochKey::derive(seed, &f.keyring.pair(), epoch),
    );
    let req = MintRequest {
        generation: Generation(7),
        epoch,
        src: f.a,
        dst: f.b,
        service: ServiceId::from_u64(42),
        stream_id: 4,
        header: b"",
    };
    let token = mint_token(&req, &key).expect("mint");
    assert_eq!(
        f.verify(&token, NOW).map(|_| ()),
        Err(TokenRefusal::PolicyRefused(ServeRefusal::UnknownService))
    );
    assert_eq!(
        mint_token(
            &MintRequest {
                header: &vec![0; 64 * 1024 + 1],
                ..req
            },
            &key
        )
        .map(|_| ()),
        Err(HeaderTooLong(64 * 1024 + 1))
    );
}

#[test]
fn generation_outside_its_window_is_unknown() {
    let f = fixture();
    // Valid until NOW+200 with 10 s grace: at NOW+215 the seed is gone.
    let later = NOW + 215;
    let epoch = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(later));
    let token = f.mint_with(Generation(7), epoch, 4, b"", &f.binding);
    assert_eq!(
        f.verify(&token, later).map(|_| ()),
        Err(TokenRefusal::UnknownGeneration(7))
    );
    assert!(f.verify(&token, NOW + 205).is_ok(), "inside the grace");
}

#[test]
fn refusal_reasons_are_distinct_and_classified() {
    let all = [
        TokenRefusal::WrongVersion(0),
        TokenRefusal::UnknownAlgorithm(0),
        TokenRefusal::HeaderTooLong(0),
        TokenRefusal::StreamIdMismatch {
            token: 0,
            actual: 1,
        },
        TokenRefusal::SrcNotPeer {
            claimed: NodeId::from_bytes([0; 32]),
            peer: NodeId::from_bytes([1; 32]),
        },
        TokenRefusal::DstNotSelf(NodeId::from_bytes([0; 32])),
        TokenRefusal::EpochOutOfWindow { token: 0, now: 5 },
        TokenRefusal::UnknownGeneration(0),
        TokenRefusal::CompromisedKeyUse(0),
        TokenRefusal::BadMac,
        TokenRefusal::PolicyRefused(ServeRefusal::PeerNotAllowed),
        TokenRefusal::HeaderHashMismatch,
    ];
    let reasons: std::collections::BTreeSet<_> = all.iter().map(TokenRefusal::reason).collect();
    assert_eq!(reasons.len(), all.len());
    assert!(TokenRefusal::BadMac.is_forgery());
    assert!(!TokenRefusal::EpochOutOfWindow { token: 0, now: 5 }.is_forgery());
    assert!(!TokenRefusal::PolicyRefused(ServeRefusal::PeerNotAllowed).closes_connection());
}

#[test]
fn epoch_length_bounds() {
    assert_eq!(EpochLength::from_secs(0), Err(BadEpochLength(0)));
    assert_eq!(EpochLength::from_secs(61), Err(BadEpochLength(61)));
    assert_eq!(EpochLength::from_secs(1).map(EpochLength::as_secs), Ok(1));
    assert_eq!(EpochLength::from_secs(60).map(EpochLength::as_secs), Ok(60));
    let e = EpochLength::from_secs(7).expect("valid");
    assert_eq!(e.epoch_at(UnixTime::from_secs(13)), Epoch(1));
    assert_eq!(e.epoch_at(UnixTime::from_secs(14)), Epoch(2));
}

#[test]
fn pair_ids_are_order_independent() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    assert_eq!(PairIds::new(a, b), PairIds::new(b, a));
    assert_eq!(PairIds::new(b, a).lo(), a);
    assert!(PairIds::new(a, b).contains(&b));
    assert_eq!(
        exporter_context(b"hopmesh/1", &PairIds::new(b, a)),
        [b"hopmesh/1".as_slice(), &[1; 32], &[2; 32]].concat()
    );
}

#[test]
fn keyring_minting_pruning_and_conflicts() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let mut ring = PairKeyring::new(PairIds::new(a, b));
    let grant = |g: u64, from: u64| GenerationGrant {
        generation: Generation(g),
        seed: PairSeed::from_bytes([g as u8; 32]),
        valid_from: UnixTime::from_secs(from),
        valid_until: UnixTime::from_secs(from + 300),
    };
    ring.insert(grant(1, 0)).expect("g1");
    ring.insert(grant(2, 300)).expect("g2");
    ring.insert(grant(2, 300))
        .expect("identical re-grant is a no-op");
    assert_eq!(
        ring.insert(grant(2, 301)),
        Err(GrantRefusal::Conflicting(2))
    );
    assert_eq!(
        ring.insert(GenerationGrant {
            valid_until: UnixTime::from_secs(300),
            ..grant(3, 300)
        }),
        Err(GrantRefusal::EmptyWindow(3))
    );
    // Before g2 starts we mint with g1; after, with g2 (the newest valid one).
    assert_eq!(
        ring.minting(UnixTime::from_secs(299)).map(|g| g.generation),
        Some(Generation(1))
    );
    assert_eq!(
        ring.minting(UnixTime::from_secs(300)).map(|g| g.generation),
        Some(Generation(2))
    );
    assert!(ring.minting(UnixTime::from_secs(600)).is_none());
    // Only MAX_LIVE_GENERATIONS live generations are kept; compromised ones are kept apart.
    ring.mark_compromised(Generation(1));
    for g in 3..10 {
        ring.insert(grant(g, g * 300)).expect("grant");
    }
    let held: Vec<_> = ring.generations().collect();
    assert_eq!(
        held.iter().filter(|(_, bad)| !bad).count(),
        MAX_LIVE_GENERATIONS
    );
    assert!(held.contains(&(Generation(1), true)));
    assert!(held.contains(&(Generation(9), false)));
    assert!(
        !ring.mark_compromised(Generation(2)),
        "pruned generations are gone"
    );
    ring.mark_all_compromised();
    assert!(ring.generations().all(|(_, bad)| bad));
}

#[test]
fn forgery_meter_closes_after_three_in_a_minute() {
    let mut m = ForgeryMeter::default();
    let t = |s: u64| UnixTime::from_secs(1000 + s);
    assert!(m.record(t(0)).is_ok());
    assert!(m.record(t(10)).is_ok());
    assert!(m.record(t(20)).is_ok());
    assert_eq!(m.record(t(30)), Err(ForgeryLimitExceeded));
    // Spread out over more than a minute, forgeries do not accumulate.
    let mut m = ForgeryMeter::default();
    for i in 0..10 {
        assert!(m.record(t(i * 25)).is_ok(), "forgery {i}");
    }
}

#[test]
fn generations_compose_and_pair_seeds_derive() {
    let g = Generation::compose(6_000_000, 3);
    assert_eq!((g.slot(), g.reissues()), (6_000_000, 3));
    assert!(Generation::compose(5, 1) > Generation::compose(5, 0));
    assert!(Generation::compose(6, 0) > Generation::compose(5, 9));
    let master = MasterSecret::from_bytes([9; 32]);
    let ab = PairIds::new(NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
    let ac = PairIds::new(NodeId::from_bytes([1; 32]), NodeId::from_bytes([3; 32]));
    let s1 = PairSeed::derive(&master, &ab, g);
    assert_eq!(
        s1,
        PairSeed::derive(&master, &PairIds::new(ab.hi(), ab.lo()), g)
    );
    assert_ne!(
        s1,
        PairSeed::derive(&master, &ab, Generation::compose(6_000_000, 4))
    );
    assert_ne!(s1, PairSeed::derive(&master, &ac, g));
    assert_ne!(
        s1,
        PairSeed::derive(&MasterSecret::from_bytes([8; 32]), &ab, g)
    );
}

#[test]
fn key_cache_derives_once_per_epoch_and_never_hides_a_compromise() {
    let mut f = fixture();
    let cache = std::sync::Mutex::new(StreamKeyCache::default());
    let verify_cached = |f: &Fixture, token: &[u8; TOKEN_LEN], now: u64, stream_id: u64| {
        let gate = GateContext {
            local: f.b,
            peer: f.a,
            stream_id,
            epoch_len: EpochLength::DEFAULT,
            now: UnixTime::from_secs(now),
        };
        let keys = ConnectionKeys {
            keyring: &f.keyring,
            binding: &f.binding,
            now: UnixTime::from_secs(now),
            grace: 10,
            cache: Some(&cache),
        };
        verify_token(token, &gate, &keys, &f.ingress).map(|_| ())
    };
    // Many streams in one epoch: one derivation; the cached key verifies like a fresh one.
    for stream_id in [4u64, 8, 12, 16] {
        let epoch = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(NOW));
        let token = f.mint_with(Generation(7), epoch, stream_id, b"h", &f.binding);
        assert_eq!(verify_cached(&f, &token, NOW, stream_id), Ok(()));
    }
    let derivations = || cache.lock().expect("lock").derivations();
    assert_eq!(derivations(), 1);
    // The next epoch needs its own key.
    let later = NOW + EpochLength::DEFAULT.as_secs();
    let token = f.mint_at(later, b"h");
    assert_eq!(verify_cached(&f, &token, later, 4), Ok(()));
    assert_eq!(derivations(), 2);
    // Nor a generation that is no longer valid: its key is still cached, but unknown now.
    let expired = NOW + 200 + 60;
    assert_eq!(
        verify_cached(&f, &f.mint_at(expired, b"h"), expired, 4),
        Err(TokenRefusal::UnknownGeneration(7))
    );
    // A cached key must not outlive a compromise mark: the keyring is asked on every stream.
    assert!(f.keyring.mark_compromised(Generation(7)));
    assert_eq!(
        verify_cached(&f, &token, later, 4),
        Err(TokenRefusal::CompromisedKeyUse(7))
    );
}

#[test]
fn key_cache_replaces_the_oldest_of_four_slots_and_matches_the_seed() {
    let mut c = StreamKeyCache::default();
    let seed = PairSeed::from_bytes([0x11; 32]);
    let key = |b: u8| StreamKey::from_bytes([b; 32]);
    for e in 0..4u64 {
        c.get_or_derive(Generation(1), Epoch(e), &seed, || key(e as u8));
    }
    assert_eq!(c.derivations(), 4);
    // All four are served from the cache (the closure would give a different key).
    for e in 0..4u64 {
        let k = c.get_or_derive(Generation(1), Epoch(e), &seed, || key(0xFF));
        assert_eq!(k.expose(), &[e as u8; 32]);
    }
    assert_eq!(c.derivations(), 4);
    // Another seed under the same generation and epoch is never served the cached key.
    let other = PairSeed::from_bytes([0x12; 32]);
    let k = c.get_or_derive(Generation(1), Epoch(3), &other, || key(0xCC));
    assert_eq!(k.expose(), &[0xCC; 32]);
    // That evicted epoch 0 (the oldest); a different generation is a different key.
    let k = c.get_or_derive(Generation(1), Epoch(0), &seed, || key(0xAA));
    assert_eq!(k.expose(), &[0xAA; 32]);
    let k = c.get_or_derive(Generation(2), Epoch(3), &seed, || key(0xBB));
    assert_eq!(k.expose(), &[0xBB; 32]);
    assert_eq!(c.derivations(), 7);
}
