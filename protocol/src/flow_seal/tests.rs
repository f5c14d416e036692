use super::*;

use crate::attestation::{ATTESTATION_VERSION, Attestation, KeySet, SigningKey};
use crate::hop_token::EpochLength;
use crate::ids::{Measurement, NodeName, SegmentName, ServiceId};
use crate::secret::SigningSeed;

const NOW: UnixTime = UnixTime::from_secs(1_800_000_000);

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&SigningSeed::from_bytes([seed; 32]))
}

/// An attestation by verifier key 1 for node key `seed`, and the node's id.
fn attested(seed: u8) -> (Vec<u8>, NodeId) {
    let node = key(seed);
    let spki = node.verifying_key().to_spki_der();
    let id = NodeId::from_spki(&spki);
    let env = Attestation {
        version: ATTESTATION_VERSION,
        node_id: id,
        spki: BoundedVec::new(spki).expect("fits"),
        name: NodeName::new(&format!("n{seed}")).expect("name"),
        segments: BoundedVec::new(vec![SegmentName::new("s").expect("s")]).expect("fits"),
        measurement: Measurement([0; 32]),
        serial: 1,
        not_before: NOW.minus(10),
        not_after: NOW.plus(300),
        verifier_key_id: key(1).key_id(),
    }
    .sign(&key(1))
    .expect("sign");
    (env, id)
}

fn keyset() -> KeySet {
    KeySet::new(vec![key(1).verifying_key()]).expect("keys")
}

fn rng() -> ring::rand::SystemRandom {
    ring::rand::SystemRandom::new()
}

/// Origin node key 2, serving node key 3: the assertion, the answer, and both ends' keys.
struct Flow {
    assertion: FlowAssertion,
    answer: FlowAnswer,
    origin: (Sealer, Opener),
    serving: (Sealer, Opener),
}

fn flow(limits: SealLimits) -> Flow {
    let (origin_att, _) = attested(2);
    let (serving_att, serving_id) = attested(3);
    let e_o = Ephemeral::generate(&rng()).expect("ephemeral");
    let epoch = EpochLength::DEFAULT.epoch_at(NOW);
    let assertion = FlowAssertion::sign(
        &key(2),
        &origin_att,
        serving_id,
        ServiceId::from_u64(7),
        epoch,
        [9; 16],
        e_o.public(),
    )
    .expect("sign");
    let e_s = Ephemeral::generate(&rng()).expect("ephemeral");
    let answer = FlowAnswer::sign(&key(3), &serving_att, &assertion, e_s.public()).expect("sign");
    let th = answer
        .verify(&keyset(), &assertion, &serving_id, NOW)
        .expect("answer verifies");
    let serving_th = transcript(&assertion, &serving_att, &e_s.public());
    assert_eq!(th, serving_th, "both ends compute one transcript");
    let origin = e_o
        .agree(&answer.ephemeral, &th, true, limits)
        .expect("agree");
    let serving = e_s
        .agree(&assertion.ephemeral, &serving_th, false, limits)
        .expect("agree");
    Flow {
        assertion,
        answer,
        origin,
        serving,
    }
}

/// Opens every record in `wire`, returning (kind, payload) pairs.
fn open_all(
    opener: &mut Opener,
    mut wire: Vec<u8>,
) -> Result<Vec<(RecordKind, Vec<u8>)>, SealError> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let Some(o) = opener.open(&mut wire)? else {
            panic!("a whole record was expected");
        };
        out.push((o.kind, wire[o.payload.clone()].to_vec()));
        wire.drain(..o.used);
    }
    Ok(out)
}

#[test]
fn both_directions_round_trip_and_are_independent() {
    let mut f = flow(SealLimits::default());
    let mut up = Vec::new();
    f.origin.0.seal_data(b"GET / HTTP/1.1\r\n\r\n", &mut up);
    f.origin
        .0
        .seal(RecordKind::End, &[], &mut up)
        .expect("seal");
    assert_eq!(
        open_all(&mut f.serving.1, up.clone()).expect("opens"),
        vec![
            (RecordKind::Data, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            (RecordKind::End, vec![])
        ]
    );
    assert!(f.serving.1.ended());
    // The plaintext never appears on the wire.
    assert!(!up.windows(3).any(|w| w == b"GET"));
    let mut down = Vec::new();
    f.serving
        .0
        .seal(RecordKind::Status, &[0], &mut down)
        .expect("seal");
    f.serving.0.seal_data(&[5; 40_000], &mut down);
    let opened = open_all(&mut f.origin.1, down).expect("opens");
    assert_eq!(opened[0], (RecordKind::Status, vec![0]));
    let data: Vec<u8> = opened[1..].iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(data, vec![5; 40_000]);
    assert_eq!(opened.len(), 1 + 3, "40 000 bytes are three 16 KiB records");
    // A direction's records do not open as the other's (each has its own key).
    let mut f = flow(SealLimits::default());
    let mut up = Vec::new();
    f.origin.0.seal_data(b"x", &mut up);
    assert_eq!(f.origin.1.open(&mut up), Err(SealError::BadRecord));
}

#[test]
fn an_empty_write_is_one_empty_record_that_still_proves_the_key() {
    let mut f = flow(SealLimits::default());
    let mut up = Vec::new();
    f.origin.0.seal_data(&[], &mut up);
    assert_eq!(up.len(), RECORD_OVERHEAD);
    assert_eq!(
        open_all(&mut f.serving.1, up).expect("opens"),
        vec![(RecordKind::Data, vec![])]
    );
}

#[test]
fn every_modified_byte_is_refused() {
    let mut f = flow(SealLimits::default());
    let mut wire = Vec::new();
    f.origin.0.seal_data(b"secret marker", &mut wire);
    for i in 0..wire.len() {
        for bit in [0x01, 0x80] {
            let mut g = flow(SealLimits::default());
            let mut w = Vec::new();
            g.origin.0.seal_data(b"secret marker", &mut w);
            w[i] ^= bit;
            let got = g.serving.1.open(&mut w);
            assert!(
                matches!(
                    got,
                    Err(SealError::BadRecord | SealError::BadLength(_)) | Ok(None)
                ),
                "byte {i} bit {bit:#x}: {got:?}"
            );
            // A lengthened prefix waits for bytes that never authenticate: still nothing opens.
            assert!(!matches!(got, Ok(Some(_))));
        }
    }
}

#[test]
fn dropped_reordered_and_foreign_records_are_refused() {
    let mut f = flow(SealLimits::default());
    let (mut r1, mut r2) = (Vec::new(), Vec::new());
    f.origin.0.seal_data(b"one", &mut r1);
    f.origin.0.seal_data(b"two", &mut r2);
    // r1 dropped (or r2 first): the sequence number is in the nonce.
    assert_eq!(f.serving.1.open(&mut r2), Err(SealError::BadRecord));
    // A relay that made up its own keys (it cannot know the flow's).
    let mut g = flow(SealLimits::default());
    let mut f = flow(SealLimits::default());
    let mut forged = Vec::new();
    g.origin.0.seal_data(b"injected", &mut forged);
    assert_eq!(f.serving.1.open(&mut forged), Err(SealError::BadRecord));
}

#[test]
fn nothing_opens_after_end() {
    let mut f = flow(SealLimits::default());
    let mut w = Vec::new();
    f.origin.0.seal(RecordKind::End, &[], &mut w).expect("seal");
    f.origin.0.seal_data(b"late", &mut w);
    assert_eq!(
        open_all(&mut f.serving.1, w),
        Err(SealError::AfterEnd),
        "bytes after the half-close are refused"
    );
}

#[test]
fn key_updates_move_both_ends_and_forget_the_old_key() {
    let mut f = flow(SealLimits::default());
    let mut w = Vec::new();
    f.origin.0.seal_data(b"before", &mut w);
    f.origin.0.key_update(&mut w);
    f.origin.0.seal_data(b"after", &mut w);
    assert_eq!(f.origin.0.generation(), 1);
    let opened = open_all(&mut f.serving.1, w).expect("opens");
    assert_eq!(
        opened,
        vec![
            (RecordKind::Data, b"before".to_vec()),
            (RecordKind::KeyUpdate, vec![]),
            (RecordKind::Data, b"after".to_vec()),
        ]
    );
    assert_eq!(f.serving.1.generation(), 1);
    // A record under the old key (as if replayed from generation 0) no longer opens.
    let mut g = flow(SealLimits::default());
    let mut old = Vec::new();
    g.origin.0.seal_data(b"zero", &mut old);
    open_all(&mut g.serving.1, old.clone()).expect("opens once");
    let mut w = Vec::new();
    g.origin.0.key_update(&mut w);
    open_all(&mut g.serving.1, w).expect("update opens");
    assert_eq!(g.serving.1.open(&mut old), Err(SealError::BadRecord));
}

#[test]
fn the_sender_rekeys_before_the_record_limit_and_the_receiver_enforces_it() {
    let limits = SealLimits { records_per_key: 4 };
    let mut f = flow(limits);
    let mut w = Vec::new();
    for i in 0..10u8 {
        f.origin.0.seal_data(&[i], &mut w);
    }
    let opened = open_all(&mut f.serving.1, w).expect("opens");
    let data: Vec<u8> = opened
        .iter()
        .filter(|(k, _)| *k == RecordKind::Data)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data, (0..10).collect::<Vec<u8>>());
    let updates = opened
        .iter()
        .filter(|(k, _)| *k == RecordKind::KeyUpdate)
        .count();
    // Three data records and the update under each key.
    assert_eq!(updates, 3);
    assert_eq!(f.origin.0.generation(), 3);
    // A sender that ignores the limit (seal_one skips the check): refused past the edge.
    let mut g = flow(limits);
    let mut w = Vec::new();
    for _ in 0..4 {
        g.origin.0.seal_one(RecordKind::Data, b"x", &mut w);
    }
    let mut edge = Vec::new();
    g.origin.0.seal_one(RecordKind::Data, b"x", &mut edge);
    open_all(&mut g.serving.1, w).expect("four records under one key open");
    assert_eq!(g.serving.1.open(&mut edge), Err(SealError::KeyExhausted));
}

#[test]
fn record_lengths_are_checked_before_anything_is_buffered() {
    assert_eq!(record_len(&[]), Ok(None));
    assert_eq!(record_len(&[0]), Ok(None));
    assert_eq!(record_len(&[0, 0]), Err(SealError::BadLength(0)));
    assert_eq!(record_len(&[0, 16]), Err(SealError::BadLength(16)));
    assert_eq!(record_len(&[0, 17]), Ok(Some(19)));
    let max = MAX_RECORD_PAYLOAD + 1 + TAG_LEN;
    assert_eq!(
        record_len(&(max as u16).to_be_bytes()),
        Ok(Some(max + RECORD_HEADER_LEN))
    );
    assert_eq!(
        record_len(&(max as u16 + 1).to_be_bytes()),
        Err(SealError::BadLength(max + 1))
    );
    let mut f = flow(SealLimits::default());
    let mut w = Vec::new();
    assert_eq!(
        f.origin
            .0
            .seal(RecordKind::Data, &vec![0; MAX_RECORD_PAYLOAD + 1], &mut w),
        Err(SealError::MalformedRecord)
    );
    assert!(w.is_empty());
    f.origin
        .0
        .seal(RecordKind::Data, &vec![0; MAX_RECORD_PAYLOAD], &mut w)
        .expect("the largest record");
    assert_eq!(w.len(), MAX_RECORD_PAYLOAD + RECORD_OVERHEAD);
    // A partial record is not an error: more bytes are needed.
    let mut part = w[..100].to_vec();
    assert_eq!(f.serving.1.open(&mut part), Ok(None));
    assert!(f.serving.1.open(&mut w).expect("opens").is_some());
}

#[test]
fn kinds_must_fit_their_payload() {
    for (kind, payload) in [
        (RecordKind::Status, &[][..]),
        (RecordKind::Status, &[0, 0][..]),
        (RecordKind::End, &[1][..]),
        (RecordKind::KeyUpdate, &[1][..]),
    ] {
        let mut f = flow(SealLimits::default());
        let mut w = Vec::new();
        f.origin.0.seal_one(kind, payload, &mut w);
        assert_eq!(
            f.serving.1.open(&mut w),
            Err(SealError::MalformedRecord),
            "{kind:?} {payload:?}"
        );
    }
    // An unknown kind byte, authenticated: still refused.
    let mut o = Opener {
        dir: Direction::new(Zeroizing::new([1; 32]), SealLimits::default()),
        ended: false,
    };
    let s = Sealer {
        dir: Direction::new(Zeroizing::new([1; 32]), SealLimits::default()),
    };
    let mut w = Vec::new();
    let start = w.len();
    w.extend_from_slice(&(1u16 + 1 + TAG_LEN as u16).to_be_bytes());
    w.extend_from_slice(&[b'a', 9]);
    let nonce = s.dir.nonce();
    let header = [w[start], w[start + 1]];
    let tag = s
        .dir
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(header), &mut w[start + 2..])
        .expect("seal");
    w.extend_from_slice(tag.as_ref());
    assert_eq!(o.open(&mut w), Err(SealError::MalformedRecord));
}

#[test]
fn record_golden_bytes() {
    let mut s = Sealer {
        dir: Direction::new(Zeroizing::new([0x42; 32]), SealLimits::default()),
    };
    let mut w = Vec::new();
    s.seal_data(b"hi", &mut w);
    assert_eq!(
        hex::encode(&w),
        include_str!("golden_record.hex").trim(),
        "record layout or key schedule changed"
    );
    let mut o = Opener {
        dir: Direction::new(Zeroizing::new([0x42; 32]), SealLimits::default()),
        ended: false,
    };
    let opened = o.open(&mut w).expect("opens").expect("whole");
    assert_eq!(&w[opened.payload], b"hi");
}

#[test]
fn answers_prove_the_serving_node_and_this_flow() {
    let f = flow(SealLimits::default());
    let (_, serving_id) = attested(3);
    let (_, origin_id) = attested(2);
    let keys = keyset();
    assert!(
        f.answer
            .verify(&keys, &f.assertion, &serving_id, NOW)
            .is_ok()
    );
    // From another node than the flow's (a relay answering with its own attestation).
    assert_eq!(
        f.answer.verify(&keys, &f.assertion, &origin_id, NOW),
        Err(SealError::AnswerWrongNode)
    );
    let (relay_att, relay_id) = attested(4);
    let relay_answer = FlowAnswer::sign(&key(4), &relay_att, &f.assertion, [8; 32]).expect("sign");
    assert_eq!(
        relay_answer.verify(&keys, &f.assertion, &serving_id, NOW),
        Err(SealError::AnswerWrongNode)
    );
    assert!(
        relay_answer
            .verify(&keys, &f.assertion, &relay_id, NOW)
            .is_ok()
    );
    // The relay swaps in its own public key: the signature no longer holds.
    let mut swapped = f.answer.clone();
    swapped.ephemeral = [8; 32];
    assert_eq!(
        swapped.verify(&keys, &f.assertion, &serving_id, NOW),
        Err(SealError::AnswerBadSignature)
    );
    // An answer to another flow (another assertion, a replayed answer).
    let other = flow(SealLimits::default());
    assert_eq!(
        f.answer.verify(&keys, &other.assertion, &serving_id, NOW),
        Err(SealError::AnswerBadSignature)
    );
    // Signed by a key the attestation does not name.
    let (serving_att, _) = attested(3);
    let forged = FlowAnswer::sign(&key(4), &serving_att, &f.assertion, [8; 32]).expect("sign");
    assert_eq!(
        forged.verify(&keys, &f.assertion, &serving_id, NOW),
        Err(SealError::AnswerBadSignature)
    );
    // An expired attestation.
    assert!(matches!(
        f.answer
            .verify(&keys, &f.assertion, &serving_id, NOW.plus(10_000)),
        Err(SealError::AnswerAttestation(_))
    ));
}

#[test]
fn answer_frames_round_trip_and_are_capped() {
    let f = flow(SealLimits::default());
    let frame = f.answer.to_frame().expect("fits a control frame");
    let prefix = *frame.first_chunk::<4>().expect("prefix");
    let len = FlowAnswer::body_len(prefix).expect("len");
    assert_eq!(len + 4, frame.len());
    assert_eq!(FlowAnswer::from_body(&frame[4..]), Ok(f.answer.clone()));
    assert!(matches!(
        FlowAnswer::body_len([0, 0, 0x10, 1]),
        Err(SealError::AnswerMalformed(DecodeError::TooLarge { .. }))
    ));
    assert!(matches!(
        FlowAnswer::from_body(&frame[4..frame.len() - 1]),
        Err(SealError::AnswerMalformed(_))
    ));
}

#[test]
fn answer_golden_bytes() {
    let a = FlowAnswer {
        serving_attestation: BoundedVec::new(vec![0xAA, 0xBB]).expect("fits"),
        ephemeral: [0x11; 32],
        signature: BoundedVec::new(vec![0x22; 64]).expect("fits"),
    };
    let frame = a.to_frame().expect("encode");
    let mut want = vec![0, 0, 0, 101, 1, 2, 0xAA, 0xBB];
    want.extend_from_slice(&[0x11; 32]);
    want.push(64);
    want.extend_from_slice(&[0x22; 64]);
    assert_eq!(frame, want);
    assert_eq!(FlowAnswer::from_body(&frame[4..]), Ok(a));
}

#[test]
fn low_order_public_keys_are_refused() {
    let e = Ephemeral::generate(&rng()).expect("ephemeral");
    assert_eq!(
        e.agree(&[0; 32], &[0; 32], true, SealLimits::default())
            .map(|_| ()),
        Err(SealError::Agreement)
    );
}
