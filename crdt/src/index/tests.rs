use super::*;
use crate::keys::Signature;
use crate::membership::{Action, MembershipLog, Role};
use crate::MeshKey;

pub(crate) fn update(path: &str, content: u8) -> FileUpdate {
    FileUpdate {
        path: path.into(),
        kind: FileKind::File,
        size: u64::from(content),
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000 + i64::from(content),
        deleted: false,
        chunks: ChunkListHash([content; 32]),
    }
}

impl FolderIndex {
    /// [`FolderIndex::apply`], with its first refusal (if any) as the error.
    pub(crate) fn apply_all(
        &mut self,
        view: &MembershipView,
        changes: Vec<ShardChange>,
    ) -> Result<ApplyReport, IndexError> {
        let mut report = self.apply(view, changes)?;
        match report.refused.is_empty() {
            true => Ok(report),
            false => Err(report.refused.remove(0)),
        }
    }
}

pub(crate) struct World {
    pub(crate) admin: DeviceKeys,
    pub(crate) laptop: DeviceKeys,
    pub(crate) log: MembershipLog,
    pub(crate) folder: FolderId,
}

/// The admin removes the laptop (no keys wrapped: the index tests need only the view).
pub(crate) fn remove_laptop(w: &mut World) {
    w.log
        .append(
            &w.admin,
            Action::Remove {
                device: w.laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
}

pub(crate) fn world() -> World {
    let admin = DeviceKeys::generate();
    let laptop = DeviceKeys::generate();
    let (mut log, _) = MembershipLog::create(&admin, "admin", &MeshKey::generate(Epoch(0)));
    log.append(
        &admin,
        Action::Add {
            device: laptop.device_id(),
            role: Role::Device,
            name: crate::SealedName::unreadable("laptop"),
            kem: Some(laptop.kem_public()),
            wrapped: None,
        },
    )
    .unwrap();
    World {
        admin,
        laptop,
        log,
        folder: FolderId::new("docs").unwrap(),
    }
}

#[test]
fn an_old_record_bundled_ahead_of_the_newer_one_it_replaces_rolls_nothing_back() {
    let w = world();
    let mesh = w.log.mesh();
    let mut author = FolderIndex::new(mesh, w.folder.clone());
    author
        .write(&w.admin, Epoch(0), vec![update("p", 1)])
        .unwrap();
    let first = author.take_local_changes();
    let old = author.get("p").unwrap().winner;
    author
        .write(&w.admin, Epoch(0), vec![update("p", 2)])
        .unwrap();
    let second = author.take_local_changes();
    // A member holding both replays the author's first, genuinely signed record "over" the
    // second: its change replaces the second's value and depends on the second's change.
    // (The author's own keys, stolen: no other member may put the author's record.)
    let mut replayer =
        FolderIndex::new(mesh, w.folder.clone()).with_actor(actor_for(&w.admin.device_id(), 9));
    replayer.apply_all(w.log.view(), first.clone()).unwrap();
    replayer.apply_all(w.log.view(), second.clone()).unwrap();
    replayer.take_local_changes();
    let replay = forge(&mut replayer, &w.admin, "p", &old);
    // The victim has the first version, gets the replay before the second arrives, then
    // the second: it must end on version 2.
    let mut victim = FolderIndex::new(mesh, w.folder.clone());
    let first_again = first.clone();
    victim.apply_all(w.log.view(), first).unwrap();
    victim.apply_all(w.log.view(), replay.clone()).unwrap();
    assert_eq!(
        victim.get("p").unwrap().winner.version,
        1,
        "held, not applied"
    );
    // The held replay is refused once it can be checked; the second version lands.
    let report = victim.apply(w.log.view(), second.clone()).unwrap();
    assert!(
        matches!(report.refused[..], [IndexError::StaleVersion { .. }]),
        "{report:?}"
    );
    let state = victim.get("p").unwrap();
    assert_eq!(state.winner.version, 2);
    assert!(state.losers.is_empty(), "{:?}", state.losers);
    // Sent together, the replay is refused outright.
    let mut fresh = FolderIndex::new(mesh, w.folder.clone());
    let mut all = first_again;
    all.extend(second);
    all.extend(replay);
    assert!(matches!(
        fresh.apply_all(w.log.view(), all),
        Err(IndexError::StaleVersion { .. })
    ));
}

#[test]
fn many_shards_and_repeated_deliveries_admit_honest_successors() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    let ups: Vec<FileUpdate> = (0..30)
        .map(|i| update(&format!("keep{i}.txt"), i as u8 + 1))
        .collect();
    a.write(&w.admin, Epoch(0), ups).unwrap();
    let first = a.take_local_changes();
    b.apply_all(w.log.view(), first.clone()).unwrap();
    let dels: Vec<FileUpdate> = (0..25)
        .map(|i| {
            let mut u = update(&format!("keep{i}.txt"), 0);
            u.deleted = true;
            u
        })
        .collect();
    a.write(&w.admin, Epoch(0), dels).unwrap();
    let second = a.take_local_changes();
    b.apply_all(w.log.view(), second.clone()).unwrap();
    b.apply_all(w.log.view(), second.clone()).unwrap();
    let heads = BTreeMap::new();
    let all = a.changes_since(&heads).unwrap();
    b.apply_all(w.log.view(), all).unwrap();
}

#[test]
fn a_version_may_not_jump_ahead() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    a.write(&w.admin, Epoch(0), vec![update("a.txt", 1)])
        .unwrap();
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    // A member signs version u64::MAX of a.txt (its own index lets it: it builds the
    // record by hand). Every replica refuses it; nothing is wedged.
    let mut forged =
        FolderIndex::new(mesh, w.folder.clone()).with_actor(actor_for(&w.laptop.device_id(), 0));
    forged
        .apply_all(w.log.view(), b.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    let mut record = forged.get("a.txt").unwrap().winner;
    record.version = u64::MAX;
    record.author = w.laptop.device_id();
    let bytes = signed_bytes(&mesh, &w.folder, "a.txt", &record.stored_fields());
    record.signature = w.laptop.sign(SIGNING_CONTEXT, &bytes);
    forged.take_local_changes();
    let refused = b.apply_all(
        w.log.view(),
        forge(&mut forged, &w.laptop, "a.txt", &record),
    );
    assert!(
        matches!(refused, Err(IndexError::VersionJump { .. })),
        "{refused:?}"
    );
    // The honest next version still goes through.
    a.write(&w.admin, Epoch(0), vec![update("a.txt", 2)])
        .unwrap();
    b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    assert_eq!(b.get("a.txt").unwrap().winner.version, 2);
}

#[test]
fn the_daemons_own_files_cannot_be_named_by_a_record() {
    for path in [
        ".meshsync-folder",
        ".meshsync/ignore.local",
        "a/.meshsync-tmp-1-2",
        ".meshsync",
        "sub/.meshsync/ignore",
    ] {
        assert!(validate_path(path).is_err(), "{path}");
    }
    assert!(validate_path(SHARED_RULES_PATH).is_ok());
    assert!(validate_path("docs/meshsync.txt").is_ok());
    // A link at the shared rules path is refused at admission.
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut link = update(SHARED_RULES_PATH, 1);
    link.kind = FileKind::Symlink;
    assert!(a.write(&w.admin, Epoch(0), vec![link]).is_err());
}

#[test]
fn write_get_and_sync_between_two_replicas() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    a.write(
        &w.admin,
        Epoch(0),
        vec![update("a.txt", 1), update("dir/b.txt", 2)],
    )
    .unwrap();
    let report = b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    assert_eq!(report.paths.len(), 2);
    assert_eq!(b.get("dir/b.txt").unwrap().winner.size, 2);
    assert!(a.take_local_changes().is_empty());
    // One-file change: one small Automerge change.
    b.write(&w.laptop, Epoch(0), vec![update("a.txt", 3)])
        .unwrap();
    let change = b.take_local_changes();
    let wire: usize = change.iter().map(|c| c.change.len()).sum();
    assert!(wire < 400, "one-file change took {wire} bytes");
    a.apply_all(w.log.view(), change).unwrap();
    let state = a.get("a.txt").unwrap();
    assert_eq!(state.winner.version, 2);
    assert!(state.losers.is_empty());
}

#[test]
fn concurrent_edits_keep_both_and_identical_ones_do_not_conflict() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    a.write(&w.admin, Epoch(0), vec![update("x", 1), update("same", 1)])
        .unwrap();
    b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    a.write(&w.admin, Epoch(0), vec![update("x", 2), update("same", 9)])
        .unwrap();
    b.write(&w.laptop, Epoch(0), vec![update("x", 3), update("same", 9)])
        .unwrap();
    let to_b = a.take_local_changes();
    let to_a = b.take_local_changes();
    a.apply_all(w.log.view(), to_a).unwrap();
    b.apply_all(w.log.view(), to_b).unwrap();
    let (sa, sb) = (a.get("x").unwrap(), b.get("x").unwrap());
    assert_eq!(sa, sb, "both replicas pick the same winner");
    assert_eq!(sa.losers.len(), 1);
    assert_ne!(sa.winner.chunks, sa.losers[0].chunks);
    assert!(a.get("same").unwrap().losers.is_empty());
    assert_eq!(a.conflicts().unwrap().len(), 1);
    // Resolving: a write that has seen both replaces both.
    a.write(&w.admin, Epoch(0), vec![update("x", 4)]).unwrap();
    b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    assert!(b.get("x").unwrap().losers.is_empty());
    assert_eq!(b.get("x").unwrap().winner.version, 3);
}

/// Puts `record` as it is, in a change signed by `keys` (as whatever actor `index` has).
pub(crate) fn forge(
    index: &mut FolderIndex,
    keys: &DeviceKeys,
    path: &str,
    record: &FileRecord,
) -> Vec<ShardChange> {
    let shard = shard_of(&index.folder, path);
    let (mesh, folder) = (index.mesh, index.folder.clone());
    let s = index.shard_mut(shard);
    s.doc.put(ROOT, path, record.encode()).unwrap();
    let hash = s.doc.commit().unwrap();
    s.signatures.insert(
        hash,
        signed::sign_change(keys, &mesh, &folder, shard, &hash),
    );
    index.take_local_changes()
}

#[test]
fn forged_signature_is_rejected() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    let mut record = a
        .write(&w.admin, Epoch(0), vec![update("f", 1)])
        .unwrap()
        .remove(0);
    a.take_local_changes();
    record.size = 1_000_000; // altered after signing
    record.version = 2;
    let changes = forge(&mut a, &w.admin, "f", &record);
    assert!(matches!(
        b.apply_all(w.log.view(), changes),
        Err(IndexError::BadSignature { .. })
    ));
    assert!(b.get("f").is_none(), "nothing applied");
}

#[test]
fn a_change_already_held_is_dropped_unchecked_and_a_new_one_is_still_checked() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    a.write(&w.admin, Epoch(0), vec![update("f", 1)]).unwrap();
    let changes = a.take_local_changes();
    b.apply_all(w.log.view(), changes.clone()).unwrap();
    let held = b.get("f").unwrap();
    // The same change again, its signature garbled: this replica holds it already (checked
    // when it came first), so it is dropped before any check, not refused, and changes nothing.
    let garbled: Vec<ShardChange> = changes
        .iter()
        .map(|c| ShardChange {
            signature: Signature::from_bytes(&[7; 64]),
            ..c.clone()
        })
        .collect();
    let report = b.apply(w.log.view(), garbled).unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert!(report.paths.is_empty());
    assert_eq!(b.get("f").unwrap(), held);
    // A change it does not hold, garbled the same way, is checked and refused.
    a.write(&w.admin, Epoch(0), vec![update("g", 2)]).unwrap();
    let new: Vec<ShardChange> = (a.take_local_changes().into_iter())
        .map(|c| ShardChange {
            signature: Signature::from_bytes(&[7; 64]),
            ..c
        })
        .collect();
    let refused = b.apply_all(w.log.view(), new);
    assert!(
        matches!(refused, Err(IndexError::BadChangeSignature { .. })),
        "{refused:?}"
    );
    assert!(b.get("g").is_none());
}

#[test]
fn one_bad_change_leaves_the_rest_of_the_batch_applied() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    a.write(&w.admin, Epoch(0), vec![update("good", 1)])
        .unwrap();
    let mut batch = a.take_local_changes();
    let mut record = a
        .write(&w.admin, Epoch(0), vec![update("bad", 2)])
        .unwrap()
        .remove(0);
    a.take_local_changes();
    record.size = 7; // altered after signing
    batch.extend(forge(&mut a, &w.admin, "bad", &record));
    a.write(&w.admin, Epoch(0), vec![update("also-good", 3)])
        .unwrap();
    batch.extend(a.take_local_changes());
    let report = b.apply(w.log.view(), batch).unwrap();
    assert!(
        matches!(report.refused[..], [IndexError::BadSignature { .. }]),
        "{report:?}"
    );
    assert!(b.get("good").is_some());
    assert!(b.get("bad").is_none());
    // "also-good" was written after "bad" on the same replica: in another shard it does not
    // depend on it and lands; in the same shard it would wait for it (held, never applied).
    if shard_of(&w.folder, "also-good") != shard_of(&w.folder, "bad") {
        assert!(b.get("also-good").is_some());
    }
}

#[test]
fn wrong_mesh_or_folder_is_rejected() {
    let w = world();
    let mut elsewhere = FolderIndex::new(MeshId::random(), w.folder.clone());
    elsewhere
        .write(&w.admin, Epoch(0), vec![update("f", 1)])
        .unwrap();
    let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone());
    assert!(matches!(
        b.apply_all(w.log.view(), elsewhere.take_local_changes()),
        Err(IndexError::BadChangeSignature { .. })
    ));
    let mut other_folder = FolderIndex::new(w.log.mesh(), FolderId::new("other").unwrap());
    other_folder
        .write(&w.admin, Epoch(0), vec![update("f", 1)])
        .unwrap();
    assert!(b
        .apply_all(w.log.view(), other_folder.take_local_changes())
        .is_err());
    assert!(b.is_empty());
}

#[test]
fn removed_stranger_and_read_only_authors_are_rejected() {
    let mut w = world();
    let mesh = w.log.mesh();
    let stranger = DeviceKeys::generate();
    let reader = DeviceKeys::generate();
    w.log
        .append(
            &w.admin,
            Action::Add {
                device: reader.device_id(),
                role: Role::ReadOnly,
                name: crate::SealedName::unreadable("reader"),
                kem: None,
                wrapped: None,
            },
        )
        .unwrap();
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    for keys in [&stranger, &reader] {
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        a.write(keys, Epoch(0), vec![update("f", 1)]).unwrap();
        assert!(matches!(
            b.apply_all(w.log.view(), a.take_local_changes()),
            Err(IndexError::NotAWriter { .. })
        ));
    }
    // The laptop writes before removal (kept) and after (refused).
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    a.write(&w.laptop, Epoch(0), vec![update("before", 1)])
        .unwrap();
    let before = a.take_local_changes();
    remove_laptop(&mut w);
    b.apply_all(w.log.view(), before).unwrap();
    a.write(&w.laptop, Epoch(1), vec![update("after", 1)])
        .unwrap();
    assert!(matches!(
        b.apply_all(w.log.view(), a.take_local_changes()),
        Err(IndexError::NotAWriter { .. })
    ));
    assert!(b.get("before").is_some());
    assert!(b.get("after").is_none());
}

#[test]
fn replaying_an_old_version_is_rejected() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    let old = a
        .write(&w.admin, Epoch(0), vec![update("f", 1)])
        .unwrap()
        .remove(0);
    a.write(&w.admin, Epoch(0), vec![update("f", 2)]).unwrap();
    b.apply_all(w.log.view(), a.take_local_changes()).unwrap();
    // Another member re-puts the old, validly signed record over the new one: not its own
    // record, so not its to put.
    let mut evil =
        FolderIndex::new(mesh, w.folder.clone()).with_actor(actor_for(&w.laptop.device_id(), 0));
    evil.apply_all(w.log.view(), b.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    evil.take_local_changes();
    let changes = forge(&mut evil, &w.laptop, "f", &old);
    assert!(matches!(
        b.apply_all(w.log.view(), changes),
        Err(IndexError::NotTheSigner { .. })
    ));
    // The author's own keys, stolen, do it: a replay.
    let mut evil =
        FolderIndex::new(mesh, w.folder.clone()).with_actor(actor_for(&w.admin.device_id(), 9));
    evil.apply_all(w.log.view(), b.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    evil.take_local_changes();
    let changes = forge(&mut evil, &w.admin, "f", &old);
    assert!(matches!(
        b.apply_all(w.log.view(), changes.clone()),
        Err(IndexError::StaleVersion { .. })
    ));
    assert_eq!(b.get("f").unwrap().winner.version, 2);
    // Re-applying changes already held changes nothing.
    let heads = b.heads();
    b.apply_all(w.log.view(), a.changes_since(&BTreeMap::new()).unwrap())
        .unwrap();
    assert_eq!(b.heads(), heads);
}

#[test]
fn bad_paths_and_garbage_are_refused() {
    let w = world();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
    for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a"] {
        assert!(
            a.write(&w.admin, Epoch(0), vec![update(bad, 1)]).is_err(),
            "{bad}"
        );
    }
    for garbage in [
        vec![],
        vec![1, 2, 3],
        vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0],
    ] {
        let result = a.apply_all(
            w.log.view(),
            vec![ShardChange {
                shard: 0,
                change: garbage,
                signature: Signature::from_bytes(&[0; 64]),
            }],
        );
        assert!(result.is_err());
    }
    assert!(decode_changes(&[0xff; 10]).is_err());
}

#[test]
fn unknown_heads_and_shards_from_a_peer_are_harmless() {
    let w = world();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
    a.write(&w.admin, Epoch(0), vec![update("x", 1)]).unwrap();
    let mut heads = BTreeMap::new();
    heads.insert(shard_of(&w.folder, "x"), vec![ChangeHash([3; 32])]);
    heads.insert(SHARDS + 5, vec![ChangeHash([4; 32])]);
    assert_eq!(a.changes_since(&heads).unwrap().len(), 1);
}

#[test]
fn save_and_load_keep_everything() {
    let w = world();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
    let updates: Vec<FileUpdate> = (0..500)
        .map(|i| update(&format!("d/{i}"), (i % 200) as u8))
        .collect();
    a.write(&w.admin, Epoch(0), updates).unwrap();
    let saved = a.save().unwrap();
    let b = FolderIndex::load(w.log.mesh(), w.folder.clone(), saved).unwrap();
    assert_eq!(b.len(), 500);
    assert_eq!(b.get("d/77"), a.get("d/77"));
}

/// What a device persists of each shard as it saves: a whole save replaces the shard's
/// earlier saves, a piece follows them (as the node's state keeps them).
fn persist(store: &mut BTreeMap<u16, Vec<Vec<u8>>>, index: &mut FolderIndex) {
    for (shard, saved) in index.save_shards(&(0..SHARDS).collect()) {
        match saved {
            SavedShard::Whole(bytes) => {
                store.insert(shard, vec![bytes]);
            }
            SavedShard::Piece(n, bytes) => {
                let saves = store.get_mut(&shard).expect("a piece follows a whole");
                assert_eq!(saves.len(), n as usize, "pieces are numbered in order");
                saves.push(bytes);
            }
        }
    }
}

/// Saving several shards at once (on every core) gives what each shard's own save would:
/// only the shards asked for, only those with something new.
#[test]
fn shards_saved_together_are_those_asked_for_with_changes() {
    let (w, mut a, _) = saved_index(300);
    let s7 = shard_of(&w.folder, "d/7");
    // Another path of the index, in another shard (the folder ID places paths).
    let elsewhere = (0..300)
        .map(|i| format!("d/{i}"))
        .find(|p| shard_of(&w.folder, p) != s7)
        .unwrap();
    let s8 = shard_of(&w.folder, &elsewhere);
    let other = (0..SHARDS).find(|s| ![s7, s8].contains(s)).unwrap();
    a.write(
        &w.admin,
        Epoch(0),
        vec![update("d/7", 2), update(&elsewhere, 2)],
    )
    .unwrap();
    let saved = a.save_shards(&[s7, other].into_iter().collect());
    let shards: Vec<u16> = saved.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        shards,
        vec![s7],
        "the second path's shard was not asked for; the other has nothing new"
    );
    assert!(matches!(saved[0].1, SavedShard::Piece(1, _)));
    assert!(a.save_shards(&[s7].into_iter().collect()).is_empty());
    assert!(matches!(a.save_shard(s8), Some(SavedShard::Piece(1, _))));
}

fn stored(store: &BTreeMap<u16, Vec<Vec<u8>>>) -> Vec<(u16, Vec<u8>)> {
    store
        .iter()
        .flat_map(|(shard, saves)| saves.iter().map(|bytes| (*shard, bytes.clone())))
        .collect()
}

/// An index of `n` paths `d/0`, `d/1`, …, written once and persisted.
fn saved_index(n: usize) -> (World, FolderIndex, BTreeMap<u16, Vec<Vec<u8>>>) {
    let w = world();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
    let mut store = BTreeMap::new();
    let updates = (0..n).map(|i| update(&format!("d/{i}"), 1)).collect();
    a.write(&w.admin, Epoch(0), updates).unwrap();
    persist(&mut store, &mut a);
    (w, a, store)
}

#[test]
fn a_shard_is_saved_whole_then_in_pieces_and_loads_the_same() {
    let (w, mut a, mut store) = saved_index(300);
    let mesh = w.log.mesh();
    let wholes = store.len();
    assert!(
        store.values().all(|saves| saves.len() == 1),
        "first saves are whole"
    );
    // Small changes after it are saved as pieces, and a shard with nothing new not at all.
    for round in 2..6u8 {
        a.write(
            &w.admin,
            Epoch(0),
            vec![update("d/7", round), update("d/8", round)],
        )
        .unwrap();
        persist(&mut store, &mut a);
    }
    let pieces: usize = store.values().map(|saves| saves.len() - 1).sum();
    assert_eq!(store.len(), wholes);
    assert!(pieces >= 4, "changes saved as pieces ({pieces})");
    assert!(
        a.save_shard(shard_of(&w.folder, "d/7")).is_none(),
        "nothing new"
    );
    // A whole and its pieces load as the index was, and the loaded index goes on in pieces.
    let mut b = FolderIndex::load(mesh, w.folder.clone(), stored(&store)).unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(b.get("d/7"), a.get("d/7"));
    assert_eq!(b.get("d/8").unwrap().winner.version, 5);
    b.write(&w.admin, Epoch(0), vec![update("d/7", 9)]).unwrap();
    persist(&mut store, &mut b);
    let c = FolderIndex::load(mesh, w.folder.clone(), stored(&store)).unwrap();
    assert_eq!(c.get("d/7"), b.get("d/7"));
    // Pieces that grow as big as the whole make the next save whole again.
    let shard = shard_of(&w.folder, "d/7");
    let mut wholes_again = 0;
    for round in 0..200u32 {
        let paths: Vec<FileUpdate> = (0..300)
            .map(|i| format!("d/{i}"))
            .filter(|p| shard_of(&w.folder, p) == shard)
            .map(|p| update(&p, (round % 250) as u8 + 2))
            .collect();
        b.write(&w.admin, Epoch(0), paths).unwrap();
        if let Some(SavedShard::Whole(_)) = b.save_shard(shard) {
            wholes_again += 1;
        }
    }
    assert!(
        wholes_again >= 1,
        "pieces are compacted into a whole now and then"
    );
    assert!(wholes_again < 100, "but not every time ({wholes_again})");
}

#[test]
fn compacting_a_changed_shard_keeps_its_records_and_saves_it_whole() {
    let (w, mut a, mut store) = saved_index(200);
    let mesh = w.log.mesh();
    a.write(&w.admin, Epoch(0), vec![update("d/3", 2)]).unwrap();
    persist(&mut store, &mut a);
    let touched = store.len();
    assert_eq!(
        a.loose_shards(),
        touched,
        "every shard was written since its load"
    );
    let (heads, d3) = (a.heads(), a.get("d/3"));
    // A few at a time: what is left stays loose until a later round.
    assert!(touched > 2, "{touched} shards");
    let first = a.compact(2).unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(a.loose_shards(), touched - 2);
    let rest = a.compact(usize::MAX).unwrap();
    assert_eq!(first.len() + rest.len(), touched);
    assert_eq!(a.loose_shards(), 0);
    assert!(
        a.compact(usize::MAX).unwrap().is_empty(),
        "nothing left to do"
    );
    assert_eq!((a.heads(), a.get("d/3")), (heads, d3));
    // The saves are whole and replace the pieces: they load as the index is.
    for (shard, saved) in first.into_iter().chain(rest) {
        let SavedShard::Whole(bytes) = saved else {
            panic!("a compacted shard is saved whole");
        };
        store.insert(shard, vec![bytes]);
    }
    let mut b = FolderIndex::load(mesh, w.folder.clone(), stored(&store)).unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(b.get("d/3").unwrap().winner.version, 2);
    // It goes on writing, and saving in pieces, as before.
    a.write(&w.admin, Epoch(0), vec![update("d/4", 3)]).unwrap();
    let shard = shard_of(&w.folder, "d/4");
    assert!(matches!(a.save_shard(shard), Some(SavedShard::Piece(1, _))));
    assert_eq!(a.loose_shards(), 1);
    // Only quiet shards, while another keeps changing: "d/4"'s shard changed again after the
    // heads were taken, "e/5"'s did not.
    a.write(&w.admin, Epoch(0), vec![update("e/5", 3)]).unwrap();
    let quiet = a.heads();
    a.write(&w.admin, Epoch(0), vec![update("d/4", 4)]).unwrap();
    let other = shard_of(&w.folder, "e/5");
    assert_ne!(shard, other, "two shards");
    let compacted: Vec<u16> = a
        .compact_unchanged(usize::MAX, &quiet)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(compacted, vec![other]);
    assert_eq!(a.loose_shards(), 1);
    assert_eq!(a.get("d/4").unwrap().winner.version, 3);
}

#[test]
fn twins_do_not_split_replicas() {
    // A device's stolen keys can make a second change under its actor ID and sequence number.
    // Whichever a replica gets first, every replica ends with the twin of lower hash, without
    // failing the rest of the batch; a replica's own write on top of the twin that lost is
    // handed back to be written again.
    let w = world();
    let mesh = w.log.mesh();
    let actor = actor_for(&w.admin.device_id(), 0);
    let mut a = FolderIndex::new(mesh, w.folder.clone()).with_actor(actor.clone());
    a.write(&w.admin, Epoch(0), vec![update("p", 1)]).unwrap();
    let genuine = a.take_local_changes();
    let mut twin_maker = FolderIndex::new(mesh, w.folder.clone()).with_actor(actor);
    twin_maker
        .write(&w.admin, Epoch(0), vec![update("p", 2)])
        .unwrap();
    let twin = twin_maker.take_local_changes();
    assert_eq!(genuine[0].shard, twin[0].shard);
    assert_ne!(genuine[0].change, twin[0].change);
    let mut other = FolderIndex::new(mesh, w.folder.clone());
    other
        .write(&w.laptop, Epoch(0), vec![update("elsewhere/q", 3)])
        .unwrap();
    let q = other.take_local_changes();
    // In another shard: the laptop writes on top in `p`'s shard below, as another replica of
    // it (the same actor, so the same shard would make that write a twin of this one).
    assert_ne!(q[0].shard, genuine[0].shard);
    let replica = |first: &[ShardChange], second: &[ShardChange]| {
        let mut r = FolderIndex::new(mesh, w.folder.clone());
        r.apply(w.log.view(), first.to_vec()).unwrap();
        // The replica writes on top of what it got first (as the laptop).
        let on_top = r.write(&w.laptop, Epoch(0), vec![update("p", 7)]).unwrap();
        r.take_local_changes();
        let mut batch = second.to_vec();
        batch.extend(q.clone());
        let report = r.apply(w.log.view(), batch).unwrap();
        assert!(
            report
                .refused
                .iter()
                .all(|e| matches!(e, IndexError::Equivocation { .. })),
            "{report:?}"
        );
        assert!(r.get("elsewhere/q").is_some());
        (r, on_top, report.dropped)
    };
    let (mut b, _, b_dropped) = replica(&genuine, &twin);
    let (mut c, _, c_dropped) = replica(&twin, &genuine);
    let kept = |r: &mut FolderIndex| {
        r.changes_since(&BTreeMap::new())
            .unwrap()
            .iter()
            .any(|c| c.change == genuine[0].change)
    };
    // Sizes tell the twins apart; the replica whose first twin lost dropped its own write.
    let genuine_hash = automerge::Change::from_bytes(genuine[0].change.clone())
        .unwrap()
        .hash();
    let twin_hash = automerge::Change::from_bytes(twin[0].change.clone())
        .unwrap()
        .hash();
    let genuine_wins = genuine_hash < twin_hash;
    assert_eq!(kept(&mut b), genuine_wins);
    assert_eq!(kept(&mut c), genuine_wins);
    let (loser_side, winner_side) = if genuine_wins {
        (&c_dropped, &b_dropped)
    } else {
        (&b_dropped, &c_dropped)
    };
    assert_eq!(winner_side.changes, 0);
    assert!(loser_side.changes >= 2, "{loser_side:?}");
    assert_eq!(loser_side.own.len(), 1);
    assert_eq!(loser_side.own[0].path, "p");
}

#[test]
fn a_new_replica_takes_a_big_index_in_slices() {
    let w = world();
    let mesh = w.log.mesh();
    let mut a = FolderIndex::new(mesh, w.folder.clone());
    let files: Vec<_> = (0..400)
        .map(|i| update(&format!("dir/f{i}.txt"), 1))
        .collect();
    a.write(&w.admin, Epoch(0), files).unwrap();
    a.take_local_changes();
    let mut b = FolderIndex::new(mesh, w.folder.clone());
    let (mut rounds, mut more) = (0, true);
    while more {
        let (slice, left) = a.changes_since_within(&b.heads(), 4096).unwrap();
        assert!(!slice.is_empty(), "each slice carries something");
        let bytes: usize = slice.iter().map(|c| c.change.len()).sum();
        let shards: BTreeSet<u16> = slice.iter().map(|c| c.shard).collect();
        assert!(bytes <= 4096 || shards.len() == 1, "over budget: {bytes}");
        b.apply_all(w.log.view(), slice).unwrap();
        (more, rounds) = (left, rounds + 1);
    }
    assert!(rounds > 2, "a small budget takes several slices ({rounds})");
    assert_eq!(b.heads(), a.heads());
    assert_eq!(b.get("dir/f399.txt").unwrap().winner.version, 1);
    let (rest, more) = a.changes_since_within(&b.heads(), 4096).unwrap();
    assert!(rest.is_empty() && !more);
}

#[test]
fn paths_changed_since_names_what_changed_across_a_compaction() {
    let (w, mut a, _) = saved_index(50);
    let before = a.heads();
    a.write(&w.admin, Epoch(0), vec![update("d/3", 2), update("new", 1)])
        .unwrap();
    let mid = a.heads();
    a.compact(usize::MAX).unwrap();
    a.write(&w.admin, Epoch(0), vec![update("d/7", 2)]).unwrap();
    let from_before = a.paths_changed_since(&before).unwrap();
    let from_mid = a.paths_changed_since(&mid).unwrap();
    assert_eq!(
        from_before,
        ["d/3", "d/7", "new"].map(String::from).into(),
        "{from_before:?}"
    );
    assert_eq!(from_mid, ["d/7"].map(String::from).into());
}

#[test]
fn the_files_of_one_folder_share_a_few_shards_and_a_huge_write_is_split_into_changes_peers_accept()
{
    let w = world();
    let shards_of = |paths: &mut dyn Iterator<Item = String>| -> BTreeSet<u16> {
        paths.map(|p| shard_of(&w.folder, &p)).collect()
    };
    // A change to a thousand files in ten folders touches at most forty shards (by path
    // alone it was about six hundred); one folder's files fill all four of its own.
    let ten = shards_of(&mut (0..1000).map(|i| format!("src/m{}/f{i}.rs", i / 100)));
    assert!(ten.len() <= 10 * DIR_SHARDS as usize, "{}", ten.len());
    let one = shards_of(&mut (0..500).map(|i| format!("photos/IMG_{i:04}.jpg")));
    assert_eq!(one.len(), DIR_SHARDS as usize);
    // Folders are spread over every shard.
    let folders = shards_of(&mut (0..4000).map(|d| format!("d{d}/x")));
    assert!(folders.len() > 900, "{}", folders.len());

    // More records for one shard than one change may hold: written as several changes, and a
    // peer takes them all.
    let target = shard_of(&w.folder, "big/0");
    let paths: Vec<String> = (0..)
        .map(|i| format!("big/{i}"))
        .filter(|p| shard_of(&w.folder, p) == target)
        .take(MAX_RECORDS_PER_CHANGE + 10)
        .collect();
    let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
    let updates = paths.iter().map(|p| update(p, 1)).collect();
    a.write(&w.admin, Epoch(0), updates).unwrap();
    let changes = a.take_local_changes();
    assert_eq!(changes.len(), 2, "split in two");
    assert!(changes.iter().all(|c| c.shard == target));
    let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone());
    let report = b.apply_all(w.log.view(), changes).unwrap();
    assert_eq!(report.paths.len(), paths.len());
    assert_eq!(b.len(), paths.len());
}
