use super::update::tests::{small_assembler, small_parts, split_small};
use super::*;
use crate::enrollment::{PUSH_CAP, Push};
use crate::frame::encode_frame;
use crate::fuzzing::segment_entries;
use crate::ids::{NodeId, ServiceId};
use crate::wire::BoundedVec;

fn parts_of(pushes: Vec<Push>) -> Vec<TablePart> {
    pushes
        .into_iter()
        .map(|p| match p {
            Push::TablePart(t) => t,
            other => panic!("not a table part: {other:?}"),
        })
        .collect()
}

fn assemble(a: &mut TableAssembler, parts: &[TablePart]) -> Result<TableUpdate, TableSyncError> {
    let (last, init) = parts.split_last().expect("some parts");
    for p in init {
        assert_eq!(a.push(p)?, None, "not complete before the last part");
    }
    Ok(a.push(last)?.expect("complete with the last part"))
}

fn allowed(s: u64, p: u8) -> TableEntry {
    TableEntry::Allowed {
        service: ServiceId::from_u64(s),
        peer: NodeId::from_bytes([p; 32]),
    }
}

fn entries(list: &[TableEntry]) -> Entries {
    list.iter().map(|e| (e.key(), e.clone())).collect()
}

/// A table held at version 1 with three `Allowed` entries.
fn held() -> SyncedTable {
    let e = entries(&[allowed(1, 1), allowed(1, 2), allowed(2, 1)]);
    let t = SyncedTable::from_update(&TableUpdate::snapshot(1, &e).expect("fits")).expect("ok");
    assert_eq!(t.entries(), &e);
    t
}

#[test]
fn a_snapshot_round_trips_through_parts_to_the_same_table() {
    let e = segment_entries(20, 2);
    let update = TableUpdate::snapshot(7, &e).expect("fits");
    let parts = parts_of(split(&update).expect("split"));
    assert_eq!(parts.len(), 1);
    let got = assemble(&mut TableAssembler::new(), &parts).expect("assembled");
    assert_eq!(got, update);
    let t = SyncedTable::from_update(&got).expect("applies");
    assert_eq!(t.version(), 7);
    assert_eq!(t.entries(), &e);
    assert_eq!(t.digest(), digest(&e));
    assert_eq!(t.peer_count(), 20);
    let (table, peers) = t.table();
    assert_eq!(table.peers.len(), 20);
    assert_eq!(peers.len(), 20);
    assert_eq!(entries_of(&table, &peers), e);
}

#[test]
fn a_2000_peer_table_splits_into_several_parts_and_reassembles_whole() {
    let e = segment_entries(2_000, 1);
    let update = TableUpdate::snapshot(1, &e).expect("fits");
    let pushes = split(&update).expect("split");
    let total: usize = pushes
        .iter()
        .map(|p| {
            encode_frame(p, PUSH_CAP)
                .expect("every part fits a push frame")
                .len()
        })
        .sum();
    assert!(total > 64 * 1024, "larger than one frame: {total}");
    let parts = parts_of(pushes);
    assert!(parts.len() >= 3, "{} parts", parts.len());
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(
            (p.part, p.parts, p.version),
            (i as u32, parts.len() as u32, 1)
        );
    }
    let mut a = TableAssembler::new();
    let t = SyncedTable::from_update(&assemble(&mut a, &parts).expect("whole")).expect("ok");
    assert!(!a.is_assembling());
    assert_eq!(t.peer_count(), 2_000);
    assert_eq!(t.table().1.len(), 2_000);
    assert_eq!(t.entries(), &e);
}

#[test]
fn a_delta_from_diff_turns_the_old_table_into_the_new() {
    let old = segment_entries(50, 1);
    let mut new = segment_entries(60, 2);
    new.retain(|k, _| !matches!(k, TableKey::Peer(id) if id.as_bytes()[3] == 7));
    let held =
        SyncedTable::from_update(&TableUpdate::snapshot(3, &old).expect("fits")).expect("ok");
    let changes = diff(&old, &new);
    assert!(changes.iter().any(|c| matches!(c, TableChange::Remove(_))));
    assert!(changes.len() < new.len() + 1);
    let delta = TableUpdate::delta(3, 4, changes, digest(&new)).expect("fits");
    let parts = parts_of(split(&delta).expect("split"));
    let delta = assemble(&mut TableAssembler::new(), &parts).expect("whole");
    let next = held.apply(&delta).expect("applies");
    assert_eq!(next.entries(), &new);
    assert_eq!(next.version(), 4);
    assert_eq!(next.peer_count(), 59);
    assert_eq!(next.digest(), digest(&new));
    assert!(diff(&new, &new).is_empty());
    // In place gives the same.
    let mut inplace = held.clone();
    inplace.apply_in_place(&delta).expect("applies");
    assert_eq!(inplace, next);
}

#[test]
fn the_digest_is_order_free_and_incremental() {
    let e = segment_entries(30, 1);
    let by_hand = e.values().rev().fold(TableDigest::EMPTY, |d, x| d.with(x));
    assert_eq!(by_hand, digest(&e));
    let first = e.values().next().expect("some");
    assert_eq!(digest(&e).without(first).with(first), digest(&e));
    assert_ne!(digest(&e).without(first), digest(&e));
    assert_eq!(digest(&Entries::new()), TableDigest::EMPTY);
}

// Assembly errors, each past its edge.

fn three_parts() -> Vec<TablePart> {
    let update = TableUpdate::snapshot(9, &segment_entries(3, 1)).expect("fits");
    let parts = small_parts(&update, 64);
    assert!(parts.len() >= 3, "{}", parts.len());
    parts
}

fn small() -> TableAssembler {
    small_assembler(64, 1 << 20, 64)
}

#[test]
fn in_order_parts_assemble_with_small_limits() {
    let parts = three_parts();
    let u = assemble(&mut small(), &parts).expect("whole");
    assert_eq!(u.version, 9);
}

#[test]
fn a_gap_is_refused_and_drops_the_buffer() {
    let parts = three_parts();
    let mut a = small();
    a.push(&parts[0]).expect("first");
    assert_eq!(
        a.push(&parts[2]),
        Err(TableSyncError::Gap {
            expected: 1,
            got: 2
        })
    );
    assert!(!a.is_assembling());
    assert_eq!(a.buffered(), 0);
    // The rest of that update is refused too; a fresh one from part 0 is taken.
    assert_eq!(a.push(&parts[1]).map_err(|e| e.reason()), Err("part_gap"));
    assemble(&mut a, &parts).expect("a whole update after the error");
}

#[test]
fn reordered_and_duplicated_parts_are_refused() {
    let parts = three_parts();
    // A first part that is not part 0.
    let mut a = small();
    assert_eq!(
        a.push(&parts[1]),
        Err(TableSyncError::Gap {
            expected: 0,
            got: 1
        })
    );
    // 0, 2, 1: the 2 is a gap.
    a.push(&parts[0]).expect("first");
    assert_eq!(a.push(&parts[2]).map_err(|e| e.reason()), Err("part_gap"));
    // 0, 1, 1: a duplicate.
    a.push(&parts[0]).expect("first");
    a.push(&parts[1]).expect("second");
    let e = a.push(&parts[1]).expect_err("duplicate");
    assert_eq!(
        e,
        TableSyncError::Duplicate {
            expected: 2,
            got: 1
        }
    );
    assert_eq!(e.reason(), "part_duplicate");
    // 0, 1, 0: an earlier part again.
    a.push(&parts[0]).expect("first");
    a.push(&parts[1]).expect("second");
    assert_eq!(
        a.push(&parts[0]).map_err(|e| e.reason()),
        Err("part_duplicate")
    );
    assert!(!a.is_assembling());
}

#[test]
fn a_part_of_another_version_inside_an_update_is_refused() {
    let parts = three_parts();
    let mut other = parts[1].clone();
    other.version = 10;
    let mut a = small();
    a.push(&parts[0]).expect("first");
    let e = a.push(&other).expect_err("mixed");
    assert_eq!(
        e,
        TableSyncError::MixedVersion {
            expected: 9,
            got: 10
        }
    );
    assert_eq!(e.reason(), "mixed_version");
    // Another part count is another update too.
    let mut other = parts[1].clone();
    other.parts += 1;
    a.push(&parts[0]).expect("first");
    assert_eq!(a.push(&other).map_err(|e| e.reason()), Err("mixed_version"));
    // And a part 0 of another update.
    let mut next = parts[0].clone();
    next.version = 11;
    a.push(&parts[0]).expect("first");
    assert_eq!(a.push(&next).map_err(|e| e.reason()), Err("mixed_version"));
}

#[test]
fn the_part_count_is_checked_against_max_table_parts() {
    let part = |parts: u32| TablePart {
        version: 1,
        part: 0,
        parts,
        bytes: BoundedVec::new(vec![0; TABLE_PART_BYTES]).expect("fits"),
    };
    let mut a = TableAssembler::new();
    assert_eq!(
        a.push(&part(MAX_TABLE_PARTS + 1)),
        Err(TableSyncError::TooManyParts {
            parts: MAX_TABLE_PARTS + 1
        })
    );
    assert_eq!(a.buffered(), 0);
    // At the limit a first part is taken.
    assert_eq!(a.push(&part(MAX_TABLE_PARTS)), Ok(None));
    assert_eq!(a.buffered(), TABLE_PART_BYTES);
    assert_eq!(
        TableSyncError::TooManyParts { parts: 0 }.reason(),
        "too_many_parts"
    );
}

#[test]
fn the_assembler_never_buffers_past_its_byte_cap() {
    // Limits: 4-byte parts, at most 10 bytes, 3 parts (12 bytes) allowed by count.
    let part = |i: u32, len: usize| TablePart {
        version: 1,
        part: i,
        parts: 3,
        bytes: BoundedVec::new(vec![1; len]).expect("fits"),
    };
    let mut a = small_assembler(4, 10, 3);
    a.push(&part(0, 4)).expect("0");
    a.push(&part(1, 4)).expect("1");
    // 8 + 3 = 11 > 10.
    assert_eq!(
        a.push(&part(2, 3)),
        Err(TableSyncError::TooLarge { len: 11 })
    );
    assert_eq!(a.buffered(), 0);
    // 8 + 2 = 10 is at the cap: taken (and then not an update).
    a.push(&part(0, 4)).expect("0");
    a.push(&part(1, 4)).expect("1");
    assert_eq!(
        a.push(&part(2, 2)).map_err(|e| e.reason()),
        Err("bad_bytes")
    );
    // With the real limits: the biggest update the count allows is exactly the byte cap.
    assert_eq!(MAX_TABLE_PARTS as usize * TABLE_PART_BYTES, MAX_TABLE_BYTES);
}

#[test]
fn malformed_parts_are_refused() {
    let part = |part: u32, parts: u32, len: usize| TablePart {
        version: 1,
        part,
        parts,
        bytes: BoundedVec::new(vec![1; len]).expect("fits"),
    };
    let mut a = small_assembler(4, 100, 10);
    for bad in [
        part(0, 0, 4), // no parts
        part(2, 2, 4), // index past the count
        part(0, 2, 3), // a short part that is not the last
        part(0, 1, 0), // an empty last part
        part(0, 1, 5), // over the part size
    ] {
        assert_eq!(
            a.push(&bad),
            Err(TableSyncError::BadPart {
                part: bad.part,
                parts: bad.parts,
                len: bad.bytes.len()
            }),
            "{bad:?}"
        );
        assert_eq!(
            TableSyncError::BadPart {
                part: 0,
                parts: 0,
                len: 0
            }
            .reason(),
            "bad_part"
        );
    }
    // Middle part short: refused after the first, and the buffer is dropped.
    a.push(&part(0, 3, 4)).expect("0");
    assert_eq!(
        a.push(&part(1, 3, 2)).map_err(|e| e.reason()),
        Err("bad_part")
    );
    assert!(!a.is_assembling());
}

#[test]
fn bad_bytes_and_a_version_that_disagrees_with_the_parts_are_refused() {
    let update = TableUpdate::snapshot(9, &segment_entries(2, 1)).expect("fits");
    let mut parts = parts_of(split(&update).expect("split"));
    assert_eq!(parts.len(), 1);
    // Trailing garbage.
    let mut bytes = parts[0].bytes.to_vec();
    bytes.push(0);
    let mut bad = parts[0].clone();
    bad.bytes = BoundedVec::new(bytes).expect("fits");
    let mut a = TableAssembler::new();
    assert!(matches!(a.push(&bad), Err(TableSyncError::BadBytes(_))));
    // Cut short.
    let mut bytes = parts[0].bytes.to_vec();
    bytes.pop();
    bad.bytes = BoundedVec::new(bytes).expect("fits");
    assert_eq!(a.push(&bad).map_err(|e| e.reason()), Err("bad_bytes"));
    // A part version that is not the update's.
    parts[0].version = 8;
    assert_eq!(
        a.push(&parts[0]),
        Err(TableSyncError::PartVersionMismatch { outer: 8, inner: 9 })
    );
    assert_eq!(
        TableSyncError::PartVersionMismatch { outer: 0, inner: 0 }.reason(),
        "part_version_mismatch"
    );
}

#[test]
fn split_refuses_an_update_over_the_byte_cap_whole() {
    let update = TableUpdate::snapshot(1, &segment_entries(3, 1)).expect("fits");
    let len = crate::wire::encode_capped(&update, usize::MAX)
        .expect("encode")
        .len();
    assert!(split_small(&update, 16, len).is_ok());
    assert_eq!(
        split_small(&update, 16, len - 1),
        Err(TableSyncError::TooLarge { len })
    );
}

#[test]
fn split_refuses_a_table_over_max_table_bytes_with_the_real_limits() {
    // 4 000 peers with four 261-byte addresses each: over 4 MB per 4 000; 16 000 of them
    // pass 16 MiB while staying under MAX_TABLE_PEERS.
    let long = |i: u32, a: usize| {
        crate::enrollment::Address::truncated(&format!("{i}-{a}-{}", "x".repeat(300)))
    };
    let mut e = segment_entries(16_000, 0);
    for entry in e.values_mut() {
        if let TableEntry::Peer(p) = entry {
            let i = u32::from_be_bytes(p.node_id.as_bytes()[..4].try_into().expect("4"));
            p.addresses = BoundedVec::new((0..4).map(|a| long(i, a)).collect()).expect("4");
        }
    }
    let update = TableUpdate::snapshot(1, &e).expect("under the peer and entry limits");
    let r = split(&update);
    assert!(
        matches!(r, Err(TableSyncError::TooLarge { len }) if len > MAX_TABLE_BYTES),
        "{:?}",
        r.map(|p| p.len())
    );
    assert_eq!(TableSyncError::TooLarge { len: 0 }.reason(), "too_large");
}

// Application errors: nothing changes on any of them.

#[test]
fn a_delta_on_the_wrong_base_or_without_a_table_is_refused() {
    let t = held();
    let before = t.clone();
    let d = TableUpdate::delta(2, 3, vec![], t.digest()).expect("fits");
    assert_eq!(
        t.apply(&d),
        Err(TableSyncError::WrongBase {
            base: 2,
            held: Some(1)
        })
    );
    assert_eq!(
        SyncedTable::from_update(&d),
        Err(TableSyncError::WrongBase {
            base: 2,
            held: None
        })
    );
    assert_eq!(
        SyncedTable::apply_to(None, &d).map_err(|e| e.reason()),
        Err("wrong_base")
    );
    // On the right base it applies (an empty delta keeps the digest).
    let ok = TableUpdate::delta(1, 2, vec![], t.digest()).expect("fits");
    assert_eq!(t.apply(&ok).map(|n| n.version()), Ok(2));
    assert_eq!(t, before);
}

#[test]
fn a_delta_must_move_the_version_forward() {
    let mut t = held();
    assert_eq!(
        TableUpdate::delta(1, 1, vec![], t.digest()),
        Err(TableSyncError::NotNewer {
            base: 1,
            version: 1
        })
    );
    // One that claims it (decoded from the wire) is refused on apply.
    let mut d = TableUpdate::delta(1, 2, vec![], t.digest()).expect("fits");
    d.version = 1;
    let before = t.clone();
    assert_eq!(
        t.apply_in_place(&d).map_err(|e| e.reason()),
        Err("not_newer")
    );
    assert_eq!(t, before);
}

#[test]
fn removing_a_missing_key_undoes_the_whole_delta() {
    let mut t = held();
    let before = t.clone();
    let d = TableUpdate::delta(
        1,
        2,
        vec![
            TableChange::Put(allowed(3, 3)),
            TableChange::Remove(allowed(1, 1).key()),
            TableChange::Put(allowed(1, 2)),
            TableChange::Remove(allowed(9, 9).key()),
        ],
        TableDigest::EMPTY,
    )
    .expect("fits");
    assert_eq!(
        t.apply_in_place(&d),
        Err(TableSyncError::RemoveMissing(allowed(9, 9).key()))
    );
    assert_eq!(t, before, "atomic: nothing of the delta stays");
    assert_eq!(t.digest(), digest(t.entries()));
    // Removing an existing key works.
    let mut want = t.entries().clone();
    want.remove(&allowed(1, 1).key());
    let d = TableUpdate::delta(
        1,
        2,
        vec![TableChange::Remove(allowed(1, 1).key())],
        digest(&want),
    )
    .expect("fits");
    assert_eq!(t.apply(&d).map(|n| n.entries().clone()), Ok(want));
}

#[test]
fn a_digest_mismatch_undoes_the_whole_update() {
    let mut t = held();
    let before = t.clone();
    let mut want = t.entries().clone();
    let e = allowed(4, 4);
    want.insert(e.key(), e.clone());
    let wrong = digest(&want).without(&allowed(1, 1));
    let d = TableUpdate::delta(1, 2, vec![TableChange::Put(e.clone())], wrong).expect("fits");
    let err = t.apply_in_place(&d).expect_err("mismatch");
    assert_eq!(
        err,
        TableSyncError::DigestMismatch {
            expected: wrong,
            got: digest(&want)
        }
    );
    assert_eq!(err.reason(), "digest_mismatch");
    assert_eq!(t, before);
    // A snapshot with a wrong digest is refused too.
    let mut s = TableUpdate::snapshot(5, &want).expect("fits");
    s.digest = wrong;
    assert_eq!(t.apply(&s).map_err(|e| e.reason()), Err("digest_mismatch"));
    // With the right digest it applies.
    let d = TableUpdate::delta(1, 2, vec![TableChange::Put(e)], digest(&want)).expect("fits");
    t.apply_in_place(&d).expect("applies");
    assert_eq!(t.entries(), &want);
}

#[test]
fn a_snapshot_replaces_whatever_is_held_and_may_not_remove() {
    let t = held();
    let e = entries(&[allowed(7, 7)]);
    let s = TableUpdate::snapshot(0, &e).expect("fits");
    // A snapshot of a lower version replaces (the verifier restarted).
    let n = t.apply(&s).expect("applies");
    assert_eq!((n.version(), n.entries()), (0, &e));
    let mut bad = s.clone();
    let mut changes = bad.changes.to_vec();
    changes.push(TableChange::Remove(allowed(7, 7).key()));
    bad.changes = BoundedVec::new(changes).expect("fits");
    assert_eq!(t.apply(&bad), Err(TableSyncError::RemoveInSnapshot));
    assert_eq!(
        TableSyncError::RemoveInSnapshot.reason(),
        "remove_in_snapshot"
    );
}

#[test]
fn a_table_over_max_table_peers_is_refused_whole() {
    let at = segment_entries(MAX_TABLE_PEERS as u32, 0);
    assert_eq!(check_entries(&at), Ok(()));
    let s = TableUpdate::snapshot(1, &at).expect("at the limit");
    let t = SyncedTable::from_update(&s).expect("at the limit");
    assert_eq!(t.peer_count(), MAX_TABLE_PEERS);
    let over = segment_entries(MAX_TABLE_PEERS as u32 + 1, 0);
    let want = TableSyncError::TooManyPeers {
        peers: MAX_TABLE_PEERS + 1,
    };
    assert_eq!(TableUpdate::snapshot(1, &over), Err(want.clone()));
    assert_eq!(want.reason(), "too_many_peers");
    // A snapshot built by hand (as decoded from the wire) is refused at the node.
    let mut s = s;
    let extra = over
        .values()
        .find(|e| !at.contains_key(&e.key()) && matches!(e, TableEntry::Peer(_)));
    let mut changes = s.changes.to_vec();
    changes.push(TableChange::Put(extra.expect("the extra peer").clone()));
    s.changes = BoundedVec::new(changes).expect("fits");
    assert_eq!(SyncedTable::from_update(&s), Err(want.clone()));
    // And a delta that adds the one peer too many.
    let mut t = t;
    let before = t.clone();
    let d = TableUpdate::delta(
        1,
        2,
        vec![TableChange::Put(extra.expect("peer").clone())],
        TableDigest::EMPTY,
    )
    .expect("fits");
    assert_eq!(t.apply_in_place(&d), Err(want));
    assert_eq!(t, before);
}

#[test]
fn too_many_changes_are_refused_when_building_and_decoding() {
    let n = MAX_TABLE_CHANGES + 1;
    let changes: Vec<TableChange> = (0..n)
        .map(|i| TableChange::Remove(TableKey::Service(ServiceId::from_u64(i as u64))))
        .collect();
    let want = TableSyncError::TooManyChanges { changes: n };
    assert_eq!(
        TableUpdate::delta(1, 2, changes.clone(), TableDigest::EMPTY),
        Err(want.clone())
    );
    assert_eq!(want.reason(), "too_many_changes");
    // The decoder refuses the declared length before building the list.
    let bytes =
        postcard::to_allocvec(&(1u64, Some(1u64), TableDigest::EMPTY, changes)).expect("encode");
    let mut a = TableAssembler::new();
    let parts: Vec<TablePart> = bytes
        .chunks(TABLE_PART_BYTES)
        .enumerate()
        .map(|(i, c)| TablePart {
            version: 1,
            part: i as u32,
            parts: bytes.len().div_ceil(TABLE_PART_BYTES) as u32,
            bytes: BoundedVec::new(c.to_vec()).expect("fits"),
        })
        .collect();
    assert!(matches!(
        assemble(&mut a, &parts),
        Err(TableSyncError::BadBytes(_))
    ));
    // One fewer decodes.
    let ok = TableUpdate::delta(
        1,
        2,
        (0..MAX_TABLE_CHANGES)
            .map(|i| TableChange::Remove(TableKey::Service(ServiceId::from_u64(i as u64))))
            .collect(),
        TableDigest::EMPTY,
    )
    .expect("at the limit");
    let parts = parts_of(split(&ok).expect("split"));
    assert_eq!(assemble(&mut a, &parts), Ok(ok));
}

#[test]
fn table_update_golden_bytes() {
    let u = TableUpdate {
        version: 2,
        base: Some(1),
        digest: TableDigest([0xAB; 32]),
        changes: BoundedVec::new(vec![
            TableChange::Remove(TableKey::Service(ServiceId::from_u64(5))),
            TableChange::Put(allowed(6, 7)),
        ])
        .expect("fits"),
    };
    let bytes = postcard::to_allocvec(&u).expect("encode");
    let mut want = vec![2, 1, 1];
    want.extend([0xAB; 32]);
    // Two changes: Remove (1) of Service (2) 5; Put (0) of Allowed (3) 6, [7; 32].
    want.extend([2, 1, 2, 5, 0, 3, 6]);
    want.extend([7; 32]);
    assert_eq!(bytes, want);
    assert_eq!(
        crate::wire::decode_canonical::<TableUpdate>(&bytes, MAX_TABLE_BYTES),
        Ok(u)
    );
    // The entry hash is pinned too: the verifier and every node must agree on it.
    assert_eq!(
        digest(&entries(&[allowed(6, 7)])).to_string(),
        // SHA-256("hopmesh/table-entry/v1\0" || [3, 6, 7 x 32]), checked with Python hashlib.
        "2cf545b6306a439e15e176289b39f4be3cfebce346a99dceb7d98689090b3023"
    );
}
