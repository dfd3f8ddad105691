//! Unloading shards and reading them back (see [`super::cold`]).

use super::tests::{update, world, World};
use super::*;

/// Where a test persists shards' saves, as the node's state does.
type Store = std::sync::Arc<std::sync::Mutex<BTreeMap<u16, Vec<Vec<u8>>>>>;

/// A loader that reads `store`.
fn loader_of(store: &Store) -> ShardLoader {
    let reads = store.clone();
    std::sync::Arc::new(move |shard| {
        (reads.lock().unwrap().get(&shard).cloned()).ok_or_else(|| format!("no shard {shard}"))
    })
}

/// An index of 4,000 paths in 40 folders, compacted, whose saves sit in a shared store that
/// its loader reads, with every shard unloaded.
fn unloaded_index() -> (World, FolderIndex, Store) {
    let w = world();
    let store = Store::default();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone()).with_loader(loader_of(&store));
    let updates = (0..4000)
        .map(|i| update(&format!("d{}/{i}", i % 40), 1))
        .collect();
    a.write(&w.admin, Epoch(0), updates).unwrap();
    a.take_local_changes();
    let saves = a.compact(usize::MAX).unwrap();
    let ids: Vec<u16> = saves.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        a.unload_unused(),
        0,
        "nothing is unloaded before its save is persisted"
    );
    for (id, saved) in saves {
        let SavedShard::Whole(bytes) = saved else {
            panic!("compaction saves whole")
        };
        store.lock().unwrap().insert(id, vec![bytes]);
    }
    a.confirm_saved(ids);
    a.warm(["d0/0"]).unwrap();
    assert!(a.unload_unused() > 100);
    assert_eq!(
        a.loaded_shards(),
        1,
        "a shard used since the last round stays"
    );
    assert_eq!(a.unload_unused(), 1);
    assert_eq!(a.loaded_shards(), 0);
    (w, a, store)
}

#[test]
fn unloaded_shards_answer_as_if_loaded_and_a_change_loads_only_what_it_touches() {
    let (w, mut a, _store) = unloaded_index();
    let mut twin = FolderIndex::new(w.log.mesh(), w.folder.clone());
    twin.apply_all(w.log.view(), a.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    assert_eq!(
        a.loaded_shards(),
        0,
        "serving a catch-up keeps nothing loaded"
    );
    assert_eq!(a.len(), 4000);
    assert_eq!(a.heads(), twin.heads());
    assert_eq!(a.get("d7/407"), twin.get("d7/407"));
    let mut all: Vec<(String, PathState)> = a.iter().collect::<Result<_, _>>().unwrap();
    all.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected: Vec<(String, PathState)> = twin.iter().map(Result::unwrap).collect();
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(all, expected);
    assert!(a.save_shard(shard_of(&w.folder, "d7/407")).is_none());

    // The twin changes one folder; applying it loads that folder's shards only, and both
    // write on in agreement.
    let before = twin.heads();
    twin.write(
        &w.admin,
        Epoch(0),
        vec![update("d3/3", 2), update("d3/43", 2)],
    )
    .unwrap();
    let report = a
        .apply_all(w.log.view(), twin.changes_since(&before).unwrap())
        .unwrap();
    assert_eq!(report.paths.len(), 2);
    assert!(
        a.loaded_shards() <= 2,
        "{} shards loaded",
        a.loaded_shards()
    );
    assert_eq!(a.get("d3/3").unwrap().winner.version, 2);
    assert_eq!(a.paths_changed_since(&before).unwrap().len(), 2);
    a.write(&w.admin, Epoch(0), vec![update("d5/5", 3)])
        .unwrap();
    assert_eq!(a.get("d5/5").unwrap().winner.version, 2);
    twin.apply_all(w.log.view(), a.take_local_changes())
        .unwrap();
    assert_eq!(a.heads(), twin.heads());
    let (_, marks) = a.last_changes_of(&w.admin.device_id()).unwrap();
    assert!(marks.len() > 100, "marks in unloaded shards too");
}

#[test]
fn a_shard_that_cannot_be_read_back_is_an_error_not_an_empty_shard() {
    let (w, mut a, store) = unloaded_index();
    let shard = shard_of(&w.folder, "d1/1");
    store.lock().unwrap().remove(&shard);
    assert!(a.warm(["d1/1"]).is_err());
    assert!(a
        .write(&w.admin, Epoch(0), vec![update("d1/1", 2)])
        .is_err());
    assert!(a.iter().any(|item| item.is_err()));
    assert!(a.changes_since(&BTreeMap::new()).is_err());
    // A save of another shard in its place is refused too.
    let other = store.lock().unwrap()[&shard_of(&w.folder, "d2/2")].clone();
    store.lock().unwrap().insert(shard, other);
    assert!(a.warm(["d1/1"]).is_err());
    assert_eq!(a.len(), 4000);
}

#[test]
fn a_replica_that_only_takes_peers_changes_unloads_them_too() {
    let (w, mut a, _) = unloaded_index();
    let store = Store::default();
    let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone()).with_loader(loader_of(&store));
    b.apply_all(w.log.view(), a.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    let saves = b.compact(usize::MAX).unwrap();
    let ids: Vec<u16> = saves.iter().map(|(id, _)| *id).collect();
    for (id, saved) in saves {
        let SavedShard::Whole(bytes) = saved else {
            panic!("compaction saves whole")
        };
        store.lock().unwrap().insert(id, vec![bytes]);
    }
    b.confirm_saved(ids);
    b.unload_unused(); // the shards the changes went into were used
    b.unload_unused();
    assert_eq!(b.loaded_shards(), 0);
    assert_eq!(b.get("d7/407").unwrap().winner.version, 1);
}

#[test]
fn a_changed_shard_nothing_uses_is_saved_whole_and_unloaded_without_being_loaded_again() {
    let (w, mut a, store) = unloaded_index();
    a.write(
        &w.admin,
        Epoch(0),
        vec![update("d3/3", 2), update("d3/43", 2)],
    )
    .unwrap();
    a.take_local_changes();
    assert!(a.loose_shards() >= 1);
    a.unload_unused(); // a round passes: the shards were used by the write
    let saves = a.compact(usize::MAX).unwrap();
    assert!(!saves.is_empty());
    assert!(a.loose_shards() >= 1, "saved only, not loaded again");
    let ids: Vec<u16> = saves.iter().map(|(id, _)| *id).collect();
    for (id, saved) in saves {
        let SavedShard::Whole(bytes) = saved else {
            panic!("compaction saves whole")
        };
        store.lock().unwrap().insert(id, vec![bytes]);
    }
    assert_eq!(a.unload_unused(), 0, "not before the saves are confirmed");
    a.confirm_saved(ids);
    assert!(a.unload_unused() >= 1);
    assert_eq!(a.loaded_shards(), 0);
    assert_eq!(a.get("d3/43").unwrap().winner.version, 2);
}

#[test]
fn an_index_started_from_summaries_loads_nothing_and_answers_as_the_index_it_was() {
    let (w, mut a, store) = unloaded_index();
    // What the caller keeps beside each whole save.
    let ids: Vec<u16> = store.lock().unwrap().keys().copied().collect();
    let summaries: Vec<(u16, ShardSummary)> = ids
        .iter()
        .map(|&id| (id, a.summary(id).expect("a whole save, unchanged")))
        .collect();
    let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone()).with_loader(loader_of(&store));
    b.start_unloaded(summaries.clone()).unwrap();
    assert_eq!(b.loaded_shards(), 0);
    assert_eq!((b.len(), b.heads()), (a.len(), a.heads()));
    assert_eq!(b.get("d5/1205").unwrap().winner.version, 1);
    assert_eq!(
        b.changes_since(&BTreeMap::new()).unwrap().len(),
        a.changes_since(&BTreeMap::new()).unwrap().len()
    );
    // A change: its shard is loaded, changed, and has no summary until saved again.
    b.write(&w.admin, Epoch(0), vec![update("d5/1205", 2)])
        .unwrap();
    let shard = shard_of(&w.folder, "d5/1205");
    assert_eq!(b.loaded_shards(), 1);
    assert_eq!(b.summary(shard), None);
    let saved = b.compact(usize::MAX).unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!(b.summary(shard).unwrap().heads, b.heads()[&shard]);

    // A summary that is not its shard's (kept from before a later save): an error when read.
    let mut stale = FolderIndex::new(w.log.mesh(), w.folder.clone()).with_loader(loader_of(&store));
    let (first, mut wrong) = summaries[0].clone();
    wrong.heads = summaries[1].1.heads.clone();
    stale.start_unloaded([(first, wrong)]).unwrap();
    assert!(stale.warm_shards([first]).is_err());
    assert!(matches!(
        FolderIndex::new(w.log.mesh(), w.folder.clone())
            .start_unloaded([(SHARDS, summaries[0].1.clone())]),
        Err(IndexError::BadShard(_))
    ));
}

#[test]
fn a_shard_saved_in_pieces_is_saved_whole_before_it_goes_and_a_start_leaves_it_unloaded() {
    let (w, mut a, store) = unloaded_index();
    a.write(&w.admin, Epoch(0), vec![update("d3/3", 2)])
        .unwrap();
    a.take_local_changes();
    let shard = shard_of(&w.folder, "d3/3");
    let Some(SavedShard::Piece(1, piece)) = a.save_shard(shard) else {
        panic!("a small change after a whole save is saved as a piece")
    };
    store.lock().unwrap().get_mut(&shard).unwrap().push(piece);
    let summary = a.summary(shard).expect("its saves cover it as it is");
    assert_eq!(summary.heads, a.heads()[&shard]);
    a.unload_unused(); // a round passes: the shard was used by the write
    assert_eq!(a.unload_unused(), 0, "not before its piece is confirmed");
    a.confirm_saved([shard]);

    // A start from the summaries (the piece's included: a daemon stopped before the shard
    // was saved whole) loads nothing until asked, then reads whole and piece back.
    let summaries: Vec<(u16, ShardSummary)> = (store.lock().unwrap().keys())
        .map(|&id| (id, a.summary(id).unwrap()))
        .collect();
    let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone()).with_loader(loader_of(&store));
    b.start_unloaded(summaries).unwrap();
    assert_eq!(b.loaded_shards(), 0);
    assert_eq!(b.heads(), a.heads());
    assert_eq!(b.get("d3/3").unwrap().winner.version, 2);

    a.warm(["d3/3"]).unwrap(); // looked at once more (what the node's survey does after a change)
    assert_eq!(a.unload_unused(), 0, "used this round");
    assert_eq!(a.unload_unused(), 0, "not with a piece to read back");
    let saves = a.compact(usize::MAX).unwrap();
    assert!(matches!(saves[..], [(s, SavedShard::Whole(_))] if s == shard));
    assert_eq!(
        a.loose_shards(),
        1,
        "saved whole, not loaded again: it is about to go"
    );
    assert_eq!(
        a.unload_unused(),
        0,
        "not before its whole save is confirmed"
    );
    let SavedShard::Whole(whole) = &saves[0].1 else {
        unreachable!()
    };
    *store.lock().unwrap().get_mut(&shard).unwrap() = vec![whole.clone()];
    a.confirm_saved([shard]);
    assert_eq!(a.unload_unused(), 1);
    assert_eq!(a.loaded_shards(), 0);
    assert_eq!(a.get("d3/3").unwrap().winner.version, 2, "read back whole");

    // One that stays in use round after round is compacted (saved whole, held compactly).
    a.write(&w.admin, Epoch(0), vec![update("d3/3", 3)])
        .unwrap();
    a.take_local_changes();
    let Some(SavedShard::Piece(1, piece)) = a.save_shard(shard) else {
        panic!("a piece")
    };
    store.lock().unwrap().get_mut(&shard).unwrap().push(piece);
    a.confirm_saved([shard]);
    for _ in 0..super::saved::HOT_ROUNDS {
        a.warm(["d3/3"]).unwrap();
        a.unload_unused();
    }
    a.warm(["d3/3"]).unwrap();
    let saves = a.compact(usize::MAX).unwrap();
    assert!(matches!(saves[..], [(s, SavedShard::Whole(_))] if s == shard));
    assert_eq!(a.loose_shards(), 0);
    let SavedShard::Whole(whole) = &saves[0].1 else {
        unreachable!()
    };
    *store.lock().unwrap().get_mut(&shard).unwrap() = vec![whole.clone()];
    a.confirm_saved([shard]);

    // Two pieces: read back change by change, they would cost more than a whole save does.
    for version in 4..6 {
        a.write(&w.admin, Epoch(0), vec![update("d3/3", version)])
            .unwrap();
        a.take_local_changes();
        let Some(SavedShard::Piece(_, piece)) = a.save_shard(shard) else {
            panic!("a piece")
        };
        store.lock().unwrap().get_mut(&shard).unwrap().push(piece);
        a.confirm_saved([shard]);
    }
    a.unload_unused();
    assert_eq!(a.unload_unused(), 0, "not with pieces to read back");
    let saves = a.compact(usize::MAX).unwrap();
    assert!(matches!(saves[..], [(s, SavedShard::Whole(_))] if s == shard));
    assert_eq!(
        a.loose_shards(),
        1,
        "saved whole, not loaded again: it is about to go"
    );
    a.confirm_saved([shard]);
    assert_eq!(a.unload_unused(), 1);
}

#[test]
fn after_a_save_that_was_not_persisted_the_next_save_is_whole() {
    let (w, mut a, _) = unloaded_index();
    let shard = shard_of(&w.folder, "d3/3");
    let same: Vec<String> = (0..4000)
        .filter(|i| i % 40 == 3)
        .map(|i| format!("d3/{i}"))
        .filter(|p| shard_of(&w.folder, p) == shard)
        .take(3)
        .collect();
    for (i, path) in same.iter().enumerate() {
        a.write(&w.admin, Epoch(0), vec![update(path, 2)]).unwrap();
        a.take_local_changes();
        let saved = a.save_shard(shard);
        match i {
            0 => assert!(matches!(saved, Some(SavedShard::Piece(1, _)))),
            // The commit that held this piece failed.
            1 => a.saves_lost([shard]),
            _ => assert!(
                matches!(saved, Some(SavedShard::Whole(_))),
                "a piece after the lost one would leave its changes out"
            ),
        }
    }
    assert_eq!(a.unload_unused(), 0, "not confirmed: it stays");
}
