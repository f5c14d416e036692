use super::*;
use crate::wire::BoundedVec;

const NOW: u64 = 1_800_000_000;

fn verifier_key(b: u8) -> SigningKey {
    SigningKey::from_seed(&SigningSeed::from_bytes([b; 32]))
}

fn node_spki() -> Vec<u8> {
    verifier_key(0x42).verifying_key().to_spki_der()
}

fn sample(key: &SigningKey) -> Attestation {
    let spki = node_spki();
    Attestation {
        version: ATTESTATION_VERSION,
        node_id: NodeId::from_spki(&spki),
        spki: BoundedVec::new(spki).expect("fits"),
        name: NodeName::new("node-a").expect("valid"),
        segments: BoundedVec::new(vec![SegmentName::new("payments").expect("valid")])
            .expect("fits"),
        measurement: Measurement([0x5A; 32]),
        serial: 3,
        not_before: UnixTime::from_secs(NOW - 10),
        not_after: UnixTime::from_secs(NOW + 300),
        verifier_key_id: key.key_id(),
    }
}

fn pinned(key: &SigningKey) -> KeySet {
    KeySet::new(vec![key.verifying_key()]).expect("fits")
}

fn at(secs: u64) -> UnixTime {
    UnixTime::from_secs(secs)
}

#[test]
fn issue_and_verify() {
    let key = verifier_key(1);
    let env = sample(&key).sign(&key).expect("sign");
    let v = verify_attestation(&env, &pinned(&key), at(NOW), 0).expect("valid");
    assert_eq!(v.get(), &sample(&key));
    assert_eq!(v.check_peer(&node_spki()), Ok(()));
    assert_eq!(v.check_serial(None), Ok(()));
    assert_eq!(v.check_serial(Some(3)), Ok(()));
    assert_eq!(v.check_serial(Some(2)), Ok(()));
}

#[test]
fn golden_envelope() {
    let key = verifier_key(1);
    let env = sample(&key).sign(&key).expect("sign");
    assert_eq!(env[0], ENVELOPE_VERSION);
    assert_eq!(&env[1..9], &key.key_id().0);
    let payload_len = u16::from_be_bytes([env[73], env[74]]) as usize;
    assert_eq!(env.len(), ENVELOPE_HEADER_LEN + payload_len);
    // Ed25519 is deterministic, so the whole envelope is a fixed string.
    assert_eq!(
        hex::encode(&env),
        include_str!("golden_attestation.hex").trim()
    );
}

#[test]
fn each_refusal_has_its_own_reason() {
    let key = verifier_key(1);
    let keys = pinned(&key);
    let env = sample(&key).sign(&key).expect("sign");

    // Oversized: refused on length alone.
    let mut big = env.clone();
    big.resize(ENVELOPE_HEADER_LEN + MAX_ATTESTATION_PAYLOAD + 1, 0);
    assert!(matches!(
        verify_attestation(&big, &keys, at(NOW), 0),
        Err(SignedRefusal::Oversized { .. })
    ));

    // Bad signature: one flipped bit of the signature.
    let mut bad_sig = env.clone();
    bad_sig[9] ^= 1;
    assert_eq!(
        verify_attestation(&bad_sig, &keys, at(NOW), 0),
        Err(SignedRefusal::BadSignature)
    );

    // Unknown key id: signed by a key that is not pinned.
    let rogue = verifier_key(2);
    let rogue_env = sample(&rogue).sign(&rogue).expect("sign");
    assert_eq!(
        verify_attestation(&rogue_env, &keys, at(NOW), 0),
        Err(SignedRefusal::UnknownKeyId(rogue.key_id()))
    );

    // A pinned key id on the envelope but the rogue key's signature.
    let mut spoofed = rogue_env.clone();
    spoofed[1..9].copy_from_slice(&key.key_id().0);
    assert_eq!(
        verify_attestation(&spoofed, &keys, at(NOW), 0),
        Err(SignedRefusal::BadSignature)
    );

    // Signature over other bytes: a valid signature of another payload spliced in.
    let mut other = sample(&key);
    other.serial = 4;
    let other_env = other.sign(&key).expect("sign");
    let mut spliced = env.clone();
    spliced[9..73].copy_from_slice(&other_env[9..73]);
    assert_eq!(
        verify_attestation(&spliced, &keys, at(NOW), 0),
        Err(SignedRefusal::BadSignature)
    );

    // Signature over the same payload as another kind of document (domain separation).
    let cross = seal(
        DocumentKind::RevocationList,
        &key,
        &env[ENVELOPE_HEADER_LEN..],
    )
    .expect("seal");
    assert_eq!(
        verify_attestation(&cross, &keys, at(NOW), 0),
        Err(SignedRefusal::BadSignature)
    );

    // Expired and not yet valid (and the leeway).
    assert_eq!(
        verify_attestation(&env, &keys, at(NOW + 300), 0),
        Err(SignedRefusal::Expired {
            not_after: at(NOW + 300)
        })
    );
    assert!(verify_attestation(&env, &keys, at(NOW + 300), 5).is_ok());
    assert_eq!(
        verify_attestation(&env, &keys, at(NOW - 11), 0),
        Err(SignedRefusal::NotYetValid {
            not_before: at(NOW - 10)
        })
    );
    assert!(verify_attestation(&env, &keys, at(NOW - 11), 1).is_ok());

    // SPKI is not the TLS peer's.
    let v = verify_attestation(&env, &keys, at(NOW), 0).expect("valid");
    let other_spki = verifier_key(0x43).verifying_key().to_spki_der();
    assert_eq!(v.check_peer(&other_spki), Err(SignedRefusal::SpkiMismatch));
    assert_eq!(
        v.check_peer(&node_spki()[..43]),
        Err(SignedRefusal::SpkiMismatch)
    );

    // Lower serial than one already accepted.
    assert_eq!(
        v.check_serial(Some(4)),
        Err(SignedRefusal::Rollback { got: 3, highest: 4 })
    );

    // Node id not the hash of the SPKI (signed by the verifier by mistake or with a stolen key).
    let mut lying = sample(&key);
    lying.node_id = NodeId::from_bytes([9; 32]);
    let lying_env = lying.sign(&key).expect("sign");
    assert_eq!(
        verify_attestation(&lying_env, &keys, at(NOW), 0),
        Err(SignedRefusal::NodeIdMismatch)
    );

    // Payload names another key than the envelope.
    let mut mismatched = sample(&key);
    mismatched.verifier_key_id = rogue.key_id();
    let mismatched_env = mismatched.sign(&key).expect("sign");
    assert_eq!(
        verify_attestation(&mismatched_env, &keys, at(NOW), 0),
        Err(SignedRefusal::KeyIdMismatch {
            inner: rogue.key_id(),
            outer: key.key_id()
        })
    );

    // Unknown payload version.
    let mut v9 = sample(&key);
    v9.version = 9;
    assert_eq!(
        verify_attestation(&v9.sign(&key).expect("sign"), &keys, at(NOW), 0),
        Err(SignedRefusal::UnknownPayloadVersion(9))
    );

    // Envelope version, truncation and trailing bytes.
    let mut v2 = env.clone();
    v2[0] = 2;
    assert_eq!(
        verify_attestation(&v2, &keys, at(NOW), 0),
        Err(SignedRefusal::UnknownVersion(2))
    );
    let mut trailing = env.clone();
    trailing.push(0);
    assert_eq!(
        verify_attestation(&trailing, &keys, at(NOW), 0),
        Err(SignedRefusal::TrailingBytes(1))
    );
}

#[test]
fn truncation_at_every_offset_is_refused() {
    let key = verifier_key(1);
    let env = sample(&key).sign(&key).expect("sign");
    for cut in 0..env.len() {
        let got = verify_attestation(&env[..cut], &pinned(&key), at(NOW), 0);
        assert_eq!(got, Err(SignedRefusal::Truncated), "cut at {cut}");
    }
}

/// The decoder is never reached for unsigned bytes: garbage with a bad signature is a
/// signature failure, and the same garbage properly signed is a payload failure.
#[test]
fn payload_is_decoded_only_after_the_signature() {
    let key = verifier_key(1);
    let garbage = [0xFFu8; 40];
    let mut unsigned = seal(DocumentKind::Attestation, &key, &garbage).expect("seal");
    unsigned[10] ^= 1;
    assert_eq!(
        verify_attestation(&unsigned, &pinned(&key), at(NOW), 0),
        Err(SignedRefusal::BadSignature)
    );
    let signed = seal(DocumentKind::Attestation, &key, &garbage).expect("seal");
    assert!(matches!(
        verify_attestation(&signed, &pinned(&key), at(NOW), 0),
        Err(SignedRefusal::Payload(_))
    ));
}

/// A signed but non-canonical payload (overlong varint in the serial) is refused: there is
/// exactly one byte string per attestation.
#[test]
fn non_canonical_signed_payload_is_refused() {
    let key = verifier_key(1);
    let a = sample(&key);
    let canonical = postcard::to_allocvec(&a).expect("encode");
    // Locate the serial (3): it follows version, node id, spki, name, segments, measurement.
    let prefix = postcard::to_allocvec(&(
        a.version,
        a.node_id,
        &a.spki,
        &a.name,
        &a.segments,
        a.measurement,
    ))
    .expect("encode");
    assert_eq!(canonical[prefix.len()], 3);
    let mut overlong = canonical[..prefix.len()].to_vec();
    overlong.extend_from_slice(&[0x83, 0x00]);
    overlong.extend_from_slice(&canonical[prefix.len() + 1..]);
    assert_eq!(
        postcard::from_bytes::<Attestation>(&overlong).expect("postcard accepts it"),
        a
    );
    let env = seal(DocumentKind::Attestation, &key, &overlong).expect("seal");
    assert_eq!(
        verify_attestation(&env, &pinned(&key), at(NOW), 0),
        Err(SignedRefusal::Payload(DecodeError::NonCanonical))
    );
}

#[test]
fn key_set_rotation_accepts_current_and_next() {
    let current = verifier_key(1);
    let next = verifier_key(2);
    let keys = KeySet::new(vec![current.verifying_key(), next.verifying_key()]).expect("fits");
    for k in [&current, &next] {
        let env = sample(k).sign(k).expect("sign");
        assert!(verify_attestation(&env, &keys, at(NOW), 0).is_ok());
    }
    assert!(KeySet::new(vec![current.verifying_key(); 5]).is_err());
}

#[test]
fn spki_round_trip() {
    let vk = verifier_key(7).verifying_key();
    let der = vk.to_spki_der();
    assert_eq!(der.len(), 44);
    assert_eq!(VerifyingKey::from_spki_der(&der), Some(vk));
    assert_eq!(VerifyingKey::from_spki_der(&der[..43]), None);
    let mut wrong_oid = der.clone();
    wrong_oid[8] = 0x71; // 1.3.101.113 is Ed448
    assert_eq!(VerifyingKey::from_spki_der(&wrong_oid), None);
}

fn list(key: &SigningKey, version: u64, revoked: &[u8]) -> RevocationList {
    RevocationList {
        version,
        issued_at: at(NOW),
        verifier_key_id: key.key_id(),
        revoked: BoundedVec::new(
            revoked
                .iter()
                .map(|b| RevokedNode {
                    node_id: NodeId::from_bytes([*b; 32]),
                    revoked_at: at(NOW),
                    until: at(NOW + 300),
                })
                .collect(),
        )
        .expect("fits"),
    }
}

#[test]
fn revocation_lists_are_versioned_and_never_roll_back() {
    let key = verifier_key(1);
    let keys = pinned(&key);
    let v5 = list(&key, 5, &[1, 2]).sign(&key).expect("sign");
    let v6 = list(&key, 6, &[1, 2, 3]).sign(&key).expect("sign");

    let RevocationUpdate::Newer(l) = verify_revocation_list(&v5, &keys, None).expect("first")
    else {
        panic!("a first list is newer");
    };
    assert!(l.is_revoked(&NodeId::from_bytes([2; 32])));
    assert!(!l.is_revoked(&NodeId::from_bytes([3; 32])));
    assert!(matches!(
        verify_revocation_list(&v6, &keys, Some((5, &v5))),
        Ok(RevocationUpdate::Newer(_))
    ));
    assert_eq!(
        verify_revocation_list(&v5, &keys, Some((5, &v5))),
        Ok(RevocationUpdate::Same)
    );
    assert_eq!(
        verify_revocation_list(&v5, &keys, Some((6, &v6))),
        Err(SignedRefusal::Rollback { got: 5, highest: 6 })
    );
    // Same version, different content: a reused version number is a rollback too.
    let forked = list(&key, 6, &[1]).sign(&key).expect("sign");
    assert_eq!(
        verify_revocation_list(&forked, &keys, Some((6, &v6))),
        Err(SignedRefusal::Rollback { got: 6, highest: 6 })
    );
    // An attestation envelope is not a revocation list, even from the right key.
    let att = sample(&key).sign(&key).expect("sign");
    assert_eq!(
        verify_revocation_list(&att, &keys, None),
        Err(SignedRefusal::BadSignature)
    );
    // A list from an unpinned key.
    let rogue = verifier_key(2);
    let rogue_list = list(&rogue, 99, &[]).sign(&rogue).expect("sign");
    assert_eq!(
        verify_revocation_list(&rogue_list, &keys, Some((6, &v6))),
        Err(SignedRefusal::UnknownKeyId(rogue.key_id()))
    );
}

#[test]
fn large_revocation_list_fits_its_cap() {
    let key = verifier_key(1);
    let mut l = list(&key, 1, &[]);
    l.revoked = BoundedVec::new(
        (0..MAX_REVOKED)
            .map(|i| RevokedNode {
                node_id: NodeId::from_bytes([(i % 251) as u8; 32]),
                revoked_at: at(NOW),
                until: at(NOW + 300),
            })
            .collect(),
    )
    .expect("fits");
    let env = l.sign(&key).expect("a full list must still be signable");
    assert!(matches!(
        verify_revocation_list(&env, &pinned(&key), None),
        Ok(RevocationUpdate::Newer(_))
    ));
}
