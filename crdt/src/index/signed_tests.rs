//! Signed changes and removed devices' cutoffs.

use super::tests::{forge, remove_laptop, update, world, World};
use super::*;
use crate::membership::{Action, ChangeMark};

fn as_device(w: &World, keys: &DeviceKeys) -> FolderIndex {
    FolderIndex::new(w.log.mesh(), w.folder.clone()).with_actor(actor_for(&keys.device_id(), 0))
}

#[test]
fn a_member_cannot_put_another_devices_old_record_beside_the_current_one() {
    // The replay that made a spurious conflict copy: the laptop puts the admin's first record
    // of `p` as a fresh value (replacing nothing), next to the admin's second.
    let w = world();
    let mut admin = as_device(&w, &w.admin);
    let old = admin
        .write(&w.admin, Epoch(0), vec![update("p", 1)])
        .unwrap()
        .remove(0);
    admin
        .write(&w.admin, Epoch(0), vec![update("p", 2)])
        .unwrap();
    let mut victim = as_device(&w, &w.admin);
    victim
        .apply(w.log.view(), admin.take_local_changes())
        .unwrap();
    let mut laptop = as_device(&w, &w.laptop);
    let replay = forge(&mut laptop, &w.laptop, "p", &old);
    let report = victim.apply(w.log.view(), replay).unwrap();
    assert!(
        matches!(report.refused[..], [IndexError::NotTheSigner { .. }]),
        "{report:?}"
    );
    let state = victim.get("p").unwrap();
    assert_eq!(state.winner.version, 2);
    assert!(
        state.losers.is_empty(),
        "no conflict copy: {:?}",
        state.losers
    );
}

#[test]
fn a_change_must_carry_the_signature_of_the_device_its_actor_names() {
    let w = world();
    let mut b = as_device(&w, &w.admin);
    // The laptop's change, with the admin's actor: signed by the laptop.
    let mut posing = as_device(&w, &w.admin);
    let record = FileRecord {
        path: "x".into(),
        version: 1,
        kind: FileKind::File,
        size: 1,
        mode: 0o644,
        mtime_ns: 0,
        deleted: false,
        chunks: ChunkListHash([1; 32]),
        author: w.admin.device_id(),
        epoch: Epoch(0),
        signature: Signature::from_bytes(&[0; 64]),
    };
    let changes = forge(&mut posing, &w.laptop, "x", &record);
    let report = b.apply(w.log.view(), changes.clone()).unwrap();
    assert!(
        matches!(report.refused[..], [IndexError::BadChangeSignature { .. }]),
        "{report:?}"
    );
    // The genuine change with its signature cut off, or with another change's.
    let mut honest = as_device(&w, &w.laptop);
    honest
        .write(&w.laptop, Epoch(0), vec![update("y", 1)])
        .unwrap();
    let mut genuine = honest.take_local_changes();
    genuine[0].signature = Signature::from_bytes(&[0; 64]);
    let report = b.apply(w.log.view(), genuine.clone()).unwrap();
    assert!(matches!(
        report.refused[..],
        [IndexError::BadChangeSignature { .. }]
    ));
    genuine[0].signature = changes[0].signature;
    let report = b.apply(w.log.view(), genuine).unwrap();
    assert!(matches!(
        report.refused[..],
        [IndexError::BadChangeSignature { .. }]
    ));
    assert!(b.is_empty());
}

#[test]
fn signatures_are_saved_with_the_shard_and_relayed_from_it() {
    let w = world();
    let mut a = as_device(&w, &w.laptop);
    a.write(&w.laptop, Epoch(0), vec![update("f", 1), update("g", 2)])
        .unwrap();
    let mut b = as_device(&w, &w.admin);
    b.apply(w.log.view(), a.take_local_changes()).unwrap();
    let saved = b.save().unwrap();
    let mut reloaded = FolderIndex::load(w.log.mesh(), w.folder.clone(), saved).unwrap();
    let mut c = as_device(&w, &w.admin);
    let report = c
        .apply(
            w.log.view(),
            reloaded.changes_since(&BTreeMap::new()).unwrap(),
        )
        .unwrap();
    assert!(report.refused.is_empty(), "{report:?}");
    assert_eq!(c.get("g"), a.get("g"));
    // A shard saved before changes were signed is refused with a reason, not misread.
    let mut bare = AutoCommit::new();
    bare.put(ROOT, "f", vec![1u8]).unwrap();
    let error = FolderIndex::load(w.log.mesh(), w.folder.clone(), vec![(3, bare.save())])
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("pair this device again"),
        "{error}"
    );
}

#[test]
fn saves_and_pieces_read_as_bytes_are_the_ones_written_as_sequences_before() {
    // Earlier saves wrote their byte fields as sequences of `u8`; read as bytes now (one copy
    // instead of a byte at a time), the encoding must be the same.
    #[derive(Serialize)]
    struct OldSaved {
        doc: Vec<u8>,
        signatures: Vec<([u8; 32], Signature)>,
    }
    #[derive(Serialize)]
    struct OldPiece {
        changes: Vec<u8>,
        signatures: Vec<([u8; 32], Signature)>,
    }
    let w = world();
    let mut a = as_device(&w, &w.laptop);
    a.write(&w.laptop, Epoch(0), vec![update("f", 1)]).unwrap();
    let first = a.take_local_changes();
    a.write(&w.laptop, Epoch(0), vec![update("f", 2)]).unwrap();
    let second = a.take_local_changes();
    let mut b = as_device(&w, &w.admin);
    b.apply(w.log.view(), first).unwrap();
    let id = second[0].shard;
    let shard = b.shards.get_mut(&id).unwrap();
    let mut signatures: Vec<([u8; 32], Signature)> =
        shard.signatures.iter().map(|(h, s)| (h.0, *s)).collect();
    signatures.sort_by_key(|(h, _)| *h); // as saves order them
    let doc = shard.doc.save();
    let saved = signed::encode_saved(doc.clone(), &shard.signatures);
    let mut old_saved = saved[..4].to_vec(); // the magic
    let old = OldSaved {
        doc,
        signatures: signatures.clone(),
    };
    postcard::to_io(&old, &mut old_saved).unwrap();
    assert_eq!(old_saved, saved);
    let (mut doc, mut read) = signed::decode_saved(&old_saved).unwrap();
    let change = automerge::Change::try_from(&second[0].change[..]).unwrap();
    let mut signed = std::collections::HashMap::new();
    signed.insert(change.hash(), second[0].signature);
    let new_piece = signed::encode_piece(std::slice::from_ref(&change), &signed);
    let mut old_piece = new_piece[..4].to_vec(); // the magic
    let piece = OldPiece {
        changes: change.raw_bytes().to_vec(),
        signatures: vec![(change.hash().0, second[0].signature)],
    };
    postcard::to_io(&piece, &mut old_piece).unwrap();
    assert_eq!(old_piece, new_piece);
    signed::load_piece(&mut doc, &mut read, &old_piece).unwrap();
    assert_eq!(doc.get_heads(), vec![change.hash()]);
    assert_eq!(read.len(), signatures.len() + 1);
    let mut old_change = Vec::new();
    #[derive(Serialize)]
    struct OldShardChange {
        shard: u16,
        change: Vec<u8>,
        signature: Signature,
    }
    let old = OldShardChange {
        shard: id,
        change: second[0].change.clone(),
        signature: second[0].signature,
    };
    postcard::to_io(&old, &mut old_change).unwrap();
    assert_eq!(
        postcard::from_bytes::<ShardChange>(&old_change).unwrap(),
        second[0]
    );
}

/// The laptop's changes: `before` (the admin saw it), then `late` (made after its removal, or
/// at least never seen by the admin).
struct Removal {
    w: World,
    /// The membership log as it was before the removal.
    unaware: crate::membership::MembershipLog,
    before: Vec<ShardChange>,
    late: Vec<ShardChange>,
}

fn removal() -> Removal {
    let mut w = world();
    let mut laptop = as_device(&w, &w.laptop);
    laptop
        .write(&w.laptop, Epoch(0), vec![update("a", 1)])
        .unwrap();
    let before = laptop.take_local_changes();
    let mut admin = as_device(&w, &w.admin);
    admin.apply(w.log.view(), before.clone()).unwrap();
    // After its removal the stolen laptop signs more, claiming the old epoch, in the same
    // shard (its next sequence number) and in another.
    laptop
        .write(&w.laptop, Epoch(0), vec![update("a", 9), update("evil", 9)])
        .unwrap();
    let late = laptop.take_local_changes();
    let unaware = crate::membership::MembershipLog::load(w.log.mesh(), &w.log.save()).unwrap();
    remove_laptop(&mut w);
    let (tag, marks) = admin.last_changes_of(&w.laptop.device_id()).unwrap();
    assert_eq!(marks.len(), 1);
    w.log
        .cut_off(&w.admin, w.laptop.device_id(), tag, marks)
        .unwrap();
    Removal {
        w,
        unaware,
        before,
        late,
    }
}

#[test]
fn a_removed_devices_changes_after_its_cutoff_are_refused_whatever_epoch_they_claim() {
    let Removal {
        w, before, late, ..
    } = removal();
    let mut fresh = as_device(&w, &w.admin);
    let mut all = before.clone();
    all.extend(late.clone());
    let report = fresh.apply(w.log.view(), all).unwrap();
    assert_eq!(report.refused.len(), 2, "{report:?}");
    assert!(report
        .refused
        .iter()
        .all(|e| matches!(e, IndexError::PastCutoff { .. })));
    assert_eq!(
        fresh.get("a").unwrap().winner.size,
        1,
        "before the cutoff: kept"
    );
    assert!(fresh.get("evil").is_none());
    // A cutoff signed by someone who is not an admin counts for nothing.
    let mut w2 = removal().w;
    let stranger_mark = ChangeMark {
        shard: 0,
        incarnation: 0,
        seq: u64::MAX,
        hash: [0; 32],
    };
    let tag = folder_tag(&w2.log.mesh(), &w2.folder);
    w2.log.append_unchecked(
        &w2.laptop,
        Action::Cutoff {
            device: w2.laptop.device_id(),
            folder: tag,
            last: vec![stranger_mark],
        },
    );
    let cutoff = &w2.log.view().cutoffs[&(w2.laptop.device_id(), tag)];
    assert!(cutoff.last.values().all(|(seq, _)| *seq < u64::MAX));
}

#[test]
fn a_replica_that_took_late_changes_before_it_heard_drops_them_and_keeps_its_own_writes() {
    let Removal {
        w,
        unaware,
        before,
        late,
    } = removal();
    // A member that had not heard of the removal took the late changes, and wrote on top.
    let mut member = FolderIndex::new(w.log.mesh(), w.folder.clone());
    member.apply(unaware.view(), before).unwrap();
    member.apply(unaware.view(), late).unwrap();
    assert_eq!(member.get("a").unwrap().winner.size, 9);
    let mine = member
        .write(&w.admin, Epoch(0), vec![update("a", 5), update("mine", 5)])
        .unwrap();
    assert_eq!(mine.len(), 2);
    // It hears of the removal.
    let dropped = member.drop_past_cutoffs(w.log.view()).unwrap();
    assert!(dropped.changes >= 2, "{dropped:?}");
    assert!(member.get("evil").is_none());
    assert_eq!(
        member.get("a").unwrap().winner.size,
        1,
        "back to before the cutoff"
    );
    // Its own write on top of the late change is handed back to be written again.
    let own: Vec<&str> = dropped.own.iter().map(|r| r.path.as_str()).collect();
    assert!(own.contains(&"a"), "{own:?}");
    // Done once, it is cheap and changes nothing.
    let again = member.drop_past_cutoffs(w.log.view()).unwrap();
    assert_eq!(again.changes, 0);
}
