//! The state database: layout checks and shard summaries.

use super::*;

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
