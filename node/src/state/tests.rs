//! The state database: layout checks and shard summaries.

use super::*;
use meshsync_crdt::SavedShard;

#[test]
fn a_home_whose_index_was_sharded_another_way_is_refused_with_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    // A fresh home is marked with this build's layout, and opens again once its index
    // holds shards.
    let state = State::open(home.path()).unwrap();
    let mut batch = Batch::default();
    let folder = FolderId::new("docs").unwrap();
    batch
        .shards
        .push((folder, 7, SavedShard::Whole(b"saved".to_vec())));
    state.commit(batch).unwrap();
    drop(state);
    drop(State::open(home.path()).unwrap());
    // An earlier home: shards saved, no layout named.
    let old = tempfile::tempdir().unwrap();
    {
        let db = Database::create(old.path().join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap();
        txn.open_table(SHARDS)
            .unwrap()
            .insert(("docs", 7), &b"saved shard"[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let refused = State::open(old.path()).err().expect("refused");
    assert!(
        refused.reason.contains("meshsync init"),
        "{}",
        refused.reason
    );
    // Nothing was changed in it: refused again the same way.
    assert!(State::open(old.path()).is_err());
}

/// A shard whose whole save has a summary is not read at start (its summary is given
/// instead); any later save of it, a piece included, takes the summary away, so a start
/// never trusts a summary of an older save.
#[test]
fn a_summarised_shard_is_not_read_at_start_until_a_later_save_takes_its_summary_away() {
    let home = tempfile::tempdir().unwrap();
    let state = State::open(home.path()).unwrap();
    let folder = FolderId::new("docs").unwrap();
    let summary = ShardSummary {
        heads: vec![automerge::ChangeHash([7; 32])],
        len: 12,
    };
    let mut batch = Batch::default();
    batch.folders.push((folder.clone(), PathBuf::from("/docs")));
    for shard in [3, 4] {
        let whole = SavedShard::Whole(format!("whole {shard}").into_bytes());
        batch.shards.push((folder.clone(), shard, whole));
    }
    batch.summaries.push((folder.clone(), 3, summary.clone()));
    state.commit(batch).unwrap();
    let loaded = state.load().unwrap();
    assert_eq!(loaded.summaries[&folder], vec![(3, summary.clone())]);
    assert_eq!(loaded.shards[&folder], vec![(4, b"whole 4".to_vec())]);
    // Its save is still there for the index to read when it needs it.
    assert_eq!(
        state.shard_saves(&folder, 3).unwrap(),
        vec![b"whole 3".to_vec()]
    );

    // A piece saved after the whole: the shard is read at start again, whole and piece.
    let mut batch = Batch::default();
    let piece = SavedShard::Piece(1, b"piece".to_vec());
    batch.shards.push((folder.clone(), 3, piece));
    state.commit(batch).unwrap();
    let loaded = state.load().unwrap();
    assert!(!loaded.summaries.contains_key(&folder));
    let three: Vec<_> = (loaded.shards[&folder].iter())
        .filter(|(shard, _)| *shard == 3)
        .map(|(_, bytes)| bytes.clone())
        .collect();
    assert_eq!(three, vec![b"whole 3".to_vec(), b"piece".to_vec()]);

    // Summarised again with a new whole save; gone with the folder.
    let mut batch = Batch::default();
    let whole = SavedShard::Whole(b"whole 3 again".to_vec());
    batch.shards.push((folder.clone(), 3, whole));
    batch.summaries.push((folder.clone(), 3, summary.clone()));
    state.commit(batch).unwrap();
    assert_eq!(state.load().unwrap().summaries[&folder], vec![(3, summary)]);
    state.remove_folder(&folder, Path::new("/nowhere")).unwrap();
    let loaded = state.load().unwrap();
    assert!(loaded.summaries.is_empty() && loaded.shards.is_empty());
}

/// A saved survey is read back at start until a commit changes what the device holds in its
/// folder (that commit drops it; one the same batch saves is kept); other folders' and other
/// kinds of change leave it.
#[test]
fn a_saved_survey_goes_with_the_first_change_to_its_folders_local_files() {
    let home = tempfile::tempdir().unwrap();
    let state = State::open(home.path()).unwrap();
    let (docs, music) = (
        FolderId::new("docs").unwrap(),
        FolderId::new("music").unwrap(),
    );
    let mut batch = Batch::default();
    batch.folders.push((docs.clone(), PathBuf::from("/docs")));
    batch.folders.push((music.clone(), PathBuf::from("/music")));
    batch.surveys.push((docs.clone(), b"docs survey".to_vec()));
    batch
        .surveys
        .push((music.clone(), b"music survey".to_vec()));
    state.commit(batch).unwrap();
    let surveys = |state: &State| state.load().unwrap().surveys;
    assert_eq!(surveys(&state)[&docs], b"docs survey");

    // A change to music's files drops music's survey only; a shard save drops none.
    let mut batch = Batch::default();
    batch.local.push((music.clone(), "song".into(), None));
    batch
        .shards
        .push((docs.clone(), 1, SavedShard::Whole(b"s".to_vec())));
    state.commit(batch).unwrap();
    assert_eq!(
        surveys(&state).into_keys().collect::<Vec<_>>(),
        vec![docs.clone()]
    );
    // Saved in the batch that changes the files: kept (it counts what the batch leaves).
    let mut batch = Batch::default();
    batch.local.push((music.clone(), "song".into(), None));
    batch.surveys.push((music.clone(), b"music again".to_vec()));
    state.commit(batch).unwrap();
    assert_eq!(surveys(&state)[&music], b"music again");
    // Kept across a reopen; gone with its folder.
    drop(state);
    let state = State::open(home.path()).unwrap();
    assert_eq!(surveys(&state).len(), 2);
    state.remove_folder(&docs, Path::new("/docs")).unwrap();
    assert!(!surveys(&state).contains_key(&docs));
}

fn placed(offset: u64) -> Option<Placed> {
    Some(Placed {
        offset,
        len: 10,
        size: 100,
        mtime_ns: 1,
    })
}

fn found(state: &State, chunk: u8) -> Vec<(String, u64)> {
    let id = ChunkId([chunk; 32]);
    let mut out: Vec<(String, u64)> = state
        .places([&id])
        .unwrap()
        .remove(&id)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, rel, p)| (rel, p.offset))
        .collect();
    out.sort();
    out
}

#[test]
fn chunk_places_are_journaled_seen_at_once_kept_across_a_restart_and_folded_in_order() {
    let home = tempfile::tempdir().unwrap();
    let root = Arc::new(home.path().join("folder"));
    let place = |chunk: u8, rel: &str, p: Option<Placed>| {
        (ChunkId([chunk; 32]), root.clone(), rel.to_string(), p)
    };
    let state = State::open(home.path()).unwrap();
    // A first batch, folded into the table; then a change journaled on top of it.
    let batch = Batch {
        places: vec![
            place(1, "a", placed(0)),
            place(1, "b", placed(5)),
            place(2, "c", placed(0)),
        ],
        ..Batch::default()
    };
    state.commit(batch).unwrap();
    assert_eq!(state.fold_places().unwrap(), 3);
    let batch = Batch {
        places: vec![
            place(1, "a", None),
            place(1, "d", placed(7)),
            place(2, "c", None),
            place(2, "c", placed(9)),
        ],
        ..Batch::default()
    };
    state.commit(batch).unwrap();
    let expected = |state: &State| {
        assert_eq!(
            found(state, 1),
            [("b".to_string(), 5), ("d".to_string(), 7)]
        );
        assert_eq!(found(state, 2), [("c".to_string(), 9)]);
        assert!(state.has_places().unwrap());
    };
    expected(&state);
    // The journal is read back at the next start.
    drop(state);
    let state = State::open(home.path()).unwrap();
    expected(&state);
    // Folded: the table holds the same, the journal nothing.
    assert_eq!(state.fold_places().unwrap(), 4);
    expected(&state);
    let txn = state.db.begin_read().unwrap();
    assert!(txn
        .open_table(places::PLACE_LOG)
        .unwrap()
        .first()
        .unwrap()
        .is_none());
    drop(txn);
    // A batch too big for the journal goes into the table after what the journal holds.
    let batch = Batch {
        places: vec![place(1, "b", None)],
        ..Batch::default()
    };
    state.commit(batch).unwrap();
    let batch = Batch {
        places: (0..10_001u64)
            .map(|i| place(3, &format!("many/{i}"), placed(i)))
            .chain([place(1, "b", placed(11))])
            .collect(),
        ..Batch::default()
    };
    state.commit(batch).unwrap();
    assert_eq!(
        found(&state, 1),
        [("b".to_string(), 11), ("d".to_string(), 7)]
    );
    assert_eq!(found(&state, 3).len(), 10_001);
    assert_eq!(state.fold_places().unwrap(), 0, "nothing left unfolded");
    // Forgetting the folder forgets its places, journaled or not.
    let batch = Batch {
        places: vec![place(4, "e", placed(0))],
        ..Batch::default()
    };
    state.commit(batch).unwrap();
    state
        .remove_folder(&FolderId::new("docs").unwrap(), &root)
        .unwrap();
    for chunk in 1..=4 {
        assert!(found(&state, chunk).is_empty());
    }
    assert!(!state.has_places().unwrap());
}
