//! Micro-benches of the protocol hot paths, each beside an in-run baseline.
//!
//! Targets (issue "Foundation", 2-core machine): token verify ≤ 2 µs, attestation verify
//! ≤ 100 µs.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use hopmesh_protocol::attestation::{
    ATTESTATION_VERSION, Attestation, KeySet, SigningKey, verify_attestation,
};
use hopmesh_protocol::control::{PeerMessage, StreamHeader};
use hopmesh_protocol::hop_token::{
    ConnectionKeys, Epoch, EpochLength, GateContext, Generation, GenerationGrant, KeyLookup,
    MintRequest, PairIds, PairKeyring, StreamKeySource, mint_token, verify_token,
};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName, SegmentName, ServiceName};
use hopmesh_protocol::routing::{Backend, IngressEntry, IngressTable, MeshName};
use hopmesh_protocol::secret::{ConnectionBinding, EpochKey, PairSeed, SigningSeed, StreamKey};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use sha2::Sha256;

const NOW: u64 = 1_800_000_005;

/// A per-connection cache as the node keeps it: the stream key for the current epoch.
struct Cached(StreamKey, Generation, Epoch);

impl StreamKeySource for Cached {
    fn stream_key(&self, g: Generation, e: Epoch) -> KeyLookup {
        if g == self.1 && e == self.2 {
            KeyLookup::Valid(self.0.clone())
        } else {
            KeyLookup::Unknown
        }
    }
}

fn token_benches(c: &mut Criterion) {
    let a = NodeId::from_bytes([0xA1; 32]);
    let b = NodeId::from_bytes([0xB2; 32]);
    let pair = PairIds::new(a, b);
    let seed = PairSeed::from_bytes([0x11; 32]);
    let mut keyring = PairKeyring::new(pair);
    keyring
        .insert(GenerationGrant {
            generation: Generation(1),
            seed: seed.clone(),
            valid_from: UnixTime::from_secs(NOW - 100),
            valid_until: UnixTime::from_secs(NOW + 200),
        })
        .expect("grant");
    let binding = ConnectionBinding::from_bytes([0x33; 32]);
    let now = UnixTime::from_secs(NOW);
    let epoch = EpochLength::DEFAULT.epoch_at(now);
    let name = MeshName {
        service: ServiceName::new("api").expect("label"),
        segment: SegmentName::new("payments").expect("label"),
    };
    let ingress = IngressTable::from_entries([IngressEntry {
        service: name.service_id(),
        name: name.clone(),
        backend: Backend {
            host: "127.0.0.1".into(),
            port: 80,
        },
        allowed_peers: [a].into(),
        relayed: Default::default(),
    }]);
    let header = StreamHeader {
        origin: a,
        service: name.service_id(),
        route: BoundedVec::empty(),
        assertion: None,
    }
    .encode()
    .expect("encode");
    let epoch_key = EpochKey::derive(&seed, &pair, epoch);
    let stream_key = StreamKey::derive(&binding, &epoch_key);
    let req = MintRequest {
        generation: Generation(1),
        epoch,
        src: a,
        dst: b,
        service: name.service_id(),
        stream_id: 4,
        header: &header,
    };
    let token = mint_token(&req, &stream_key).expect("mint");
    let gate = GateContext {
        local: b,
        peer: a,
        stream_id: 4,
        epoch_len: EpochLength::DEFAULT,
        now,
    };

    let mut g = c.benchmark_group("hop_token");
    g.bench_function("baseline_hmac_sha256_134B", |bench| {
        bench.iter(|| {
            let mut m =
                <Hmac<Sha256> as KeyInit>::new_from_slice(stream_key.expose()).expect("key");
            m.update(black_box(&token[..134]));
            black_box(m.finalize())
        })
    });
    g.bench_function("epoch_key_derive", |bench| {
        bench.iter(|| EpochKey::derive(black_box(&seed), &pair, epoch))
    });
    g.bench_function("stream_key_derive", |bench| {
        bench.iter(|| StreamKey::derive(black_box(&binding), &epoch_key))
    });
    g.bench_function("mint", |bench| {
        bench.iter(|| mint_token(black_box(&req), &stream_key))
    });
    let cached = Cached(stream_key.clone(), Generation(1), epoch);
    g.bench_function("verify_cached_key", |bench| {
        bench.iter(|| {
            let permit = verify_token(black_box(&token), &gate, &cached, &ingress).expect("valid");
            permit.check_header(&header).expect("header")
        })
    });
    let keys = ConnectionKeys {
        keyring: &keyring,
        binding: &binding,
        now,
        grace: 10,
        cache: None,
    };
    g.bench_function("verify_full_derivation", |bench| {
        bench.iter(|| {
            let permit = verify_token(black_box(&token), &gate, &keys, &ingress).expect("valid");
            permit.check_header(&header).expect("header")
        })
    });
    let mut forged = token;
    forged[150] ^= 1;
    g.bench_function("verify_forged_cached_key", |bench| {
        bench.iter(|| {
            verify_token(black_box(&forged), &gate, &cached, &ingress).expect_err("forged")
        })
    });
    g.finish();
}

fn attestation_benches(c: &mut Criterion) {
    let key = SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]));
    let spki = SigningKey::from_seed(&SigningSeed::from_bytes([2; 32]))
        .verifying_key()
        .to_spki_der();
    let att = Attestation {
        version: ATTESTATION_VERSION,
        node_id: NodeId::from_spki(&spki),
        spki: BoundedVec::new(spki).expect("fits"),
        name: NodeName::new("node-a").expect("label"),
        segments: BoundedVec::new(vec![SegmentName::new("payments").expect("label")])
            .expect("fits"),
        measurement: Measurement([5; 32]),
        serial: 1,
        not_before: UnixTime::from_secs(NOW - 10),
        not_after: UnixTime::from_secs(NOW + 300),
        verifier_key_id: key.key_id(),
    };
    let env = att.sign(&key).expect("sign");
    let keys = KeySet::new(vec![key.verifying_key()]).expect("fits");
    let msg = [7u8; 200];
    let sig = key.sign_raw(&msg);
    let vk = key.verifying_key();

    let mut g = c.benchmark_group("attestation");
    g.bench_function("baseline_ed25519_verify_200B", |bench| {
        bench.iter(|| vk.verify(black_box(&msg), &sig))
    });
    g.bench_function("verify", |bench| {
        bench.iter(|| {
            verify_attestation(black_box(&env), &keys, UnixTime::from_secs(NOW), 0).expect("valid")
        })
    });
    g.bench_function("issue", |bench| {
        bench.iter(|| black_box(&att).sign(&key).expect("sign"))
    });
    g.finish();
}

fn frame_benches(c: &mut Criterion) {
    let msg = PeerMessage::Hello {
        attestation: BoundedVec::new(vec![0xAB; 300]).expect("fits"),
    };
    let frame = msg.to_frame().expect("encode");
    let mut g = c.benchmark_group("frame");
    g.bench_function("baseline_postcard_encode", |bench| {
        bench.iter(|| postcard::to_allocvec(black_box(&msg)))
    });
    g.bench_function("encode", |bench| {
        bench.iter(|| black_box(&msg).to_frame().expect("encode"))
    });
    g.bench_function("decode", |bench| {
        bench.iter(|| {
            PeerMessage::from_frame(black_box(&frame))
                .expect("decode")
                .expect("whole")
        })
    });
    g.finish();
}

criterion_group!(benches, token_benches, attestation_benches, frame_benches);
criterion_main!(benches);
