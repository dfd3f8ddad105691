//! Property test: 3–5 replicas make random membership and file changes, exchange them in random
//! orders, in pieces and with duplicates, and end in identical state once everything is
//! delivered.

use std::collections::BTreeMap;

use meshsync_crdt::index::FileUpdate;
use meshsync_crdt::{
    Action, ChunkListHash, DeviceKeys, Epoch, FileKind, FolderId, FolderIndex, MembershipLog,
    MeshKey, Role, SealedName,
};
use proptest::prelude::*;

mod common;
use common::shuffle;

#[derive(Clone, Debug)]
enum Op {
    /// Replica writes `content` to one of a few paths (content 0 means delete).
    Write {
        replica: usize,
        path: u8,
        content: u8,
    },
    /// The admin (replica 0) adds or removes one of a few outside devices.
    Membership { add: bool, device: usize },
    /// The admin removes one of the other replicas.
    RemoveReplica { replica: usize },
    /// Changes from one replica to another, shuffled by `seed`, some sent twice.
    Deliver {
        from: usize,
        to: usize,
        seed: u64,
        pieces: u8,
        duplicate: bool,
    },
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..replicas, 0u8..6, 0u8..4).prop_map(|(replica, path, content)| Op::Write { replica, path, content }),
        1 => (any::<bool>(), 0usize..3).prop_map(|(add, device)| Op::Membership { add, device }),
        1 => (1..replicas).prop_map(|replica| Op::RemoveReplica { replica }),
        6 => (0..replicas, 0..replicas, any::<u64>(), 1u8..4, any::<bool>()).prop_map(
            |(from, to, seed, pieces, duplicate)| Op::Deliver { from, to, seed, pieces, duplicate }
        ),
    ]
}

struct Replica {
    keys: DeviceKeys,
    log: MembershipLog,
    index: FolderIndex,
}

fn deliver(
    replicas: &mut [Replica],
    from: usize,
    to: usize,
    seed: u64,
    pieces: u8,
    duplicate: bool,
) {
    if from == to {
        return;
    }
    let (log_changes, index_changes) = {
        let to_heads = replicas[to].log.heads();
        let to_index_heads = replicas[to].index.heads();
        let source = &mut replicas[from];
        (
            source.log.changes_since(&to_heads),
            source.index.changes_since(&to_index_heads).unwrap(),
        )
    };
    let mut log_changes = log_changes;
    let mut index_changes = index_changes;
    if duplicate {
        log_changes.extend(log_changes.clone().into_iter().take(2));
        index_changes.extend(index_changes.clone().into_iter().take(3));
    }
    shuffle(&mut log_changes, seed);
    shuffle(&mut index_changes, seed ^ 0x5555);
    let target = &mut replicas[to];
    // Membership first, as the node does: a record's author must be known to be admitted.
    for piece in log_changes.chunks(log_changes.len().div_ceil(pieces as usize).max(1)) {
        target
            .log
            .apply(piece)
            .expect("membership change from a replica is admitted");
    }
    let view = target.log.view().clone();
    for piece in index_changes.chunks(index_changes.len().div_ceil(pieces as usize).max(1)) {
        let report = target
            .index
            .apply(&view, piece.to_vec())
            .expect("the index document takes changes");
        assert!(report.refused.is_empty(), "{:?}", report.refused);
    }
}

fn run(replica_count: usize, ops: Vec<Op>) {
    let admin = DeviceKeys::generate();
    let key0 = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&admin, "r0", &key0);
    let others: Vec<DeviceKeys> = (1..replica_count).map(|_| DeviceKeys::generate()).collect();
    for keys in &others {
        log.append(
            &admin,
            Action::Add {
                device: keys.device_id(),
                role: Role::Device,
                name: SealedName::seal(&key0, &mesh, &keys.device_id(), "replica"),
                kem: Some(keys.kem_public()),
                wrapped: None,
            },
        )
        .unwrap();
    }
    let outsiders: Vec<DeviceKeys> = (0..3).map(|_| DeviceKeys::generate()).collect();
    let folder = FolderId::new("shared").unwrap();
    let initial = log.changes_since(&[]);
    let mut replicas: Vec<Replica> = std::iter::once(admin)
        .chain(others)
        .map(|keys| {
            let mut log = MembershipLog::empty(mesh);
            log.apply(&initial).unwrap();
            Replica {
                keys,
                log,
                index: FolderIndex::new(mesh, folder.clone()),
            }
        })
        .collect();

    for op in ops {
        match op {
            Op::Write {
                replica,
                path,
                content,
            } => {
                let r = &mut replicas[replica];
                let me = r.keys.device_id();
                if !r.log.view().is_member(&me) {
                    continue; // a removed device stops writing once it knows
                }
                let epoch = r.log.view().epoch;
                let update = FileUpdate {
                    path: format!("dir{}/file{}", path % 2, path),
                    kind: FileKind::File,
                    size: u64::from(content) * 100,
                    mode: 0o644,
                    mtime_ns: i64::from(content),
                    deleted: content == 0,
                    chunks: ChunkListHash([content; 32]),
                };
                r.index.write(&r.keys, epoch, vec![update]).unwrap();
            }
            Op::Membership { add, device } => {
                let r = &mut replicas[0];
                let outsider = &outsiders[device];
                let action = if add {
                    Action::Add {
                        device: outsider.device_id(),
                        role: Role::Device,
                        name: SealedName::seal(&key0, &mesh, &outsider.device_id(), "outsider"),
                        kem: None,
                        wrapped: None,
                    }
                } else {
                    Action::Remove {
                        device: outsider.device_id(),
                        wraps: vec![],
                        chain: vec![],
                        wipe: false,
                    }
                };
                let _ = r.log.append(&r.keys, action);
            }
            Op::RemoveReplica { replica } => {
                let device = replicas[replica].keys.device_id();
                let r = &mut replicas[0];
                let _ = r.log.append(
                    &r.keys,
                    Action::Remove {
                        device,
                        wraps: vec![],
                        chain: vec![],
                        wipe: false,
                    },
                );
            }
            Op::Deliver {
                from,
                to,
                seed,
                pieces,
                duplicate,
            } => deliver(&mut replicas, from, to, seed, pieces, duplicate),
        }
    }

    // Everything to everyone, twice around, so every replica has every change.
    for _ in 0..2 {
        for from in 0..replica_count {
            for to in 0..replica_count {
                deliver(&mut replicas, from, to, 7, 1, false);
            }
        }
    }

    let summary = |r: &mut Replica| {
        let view = r.log.view().clone();
        let files: BTreeMap<String, _> = r.index.iter().collect::<Result<_, _>>().unwrap();
        (
            view.members.clone(),
            view.removed.clone(),
            view.epoch,
            r.log.len(),
            files,
            r.index.heads(),
        )
    };
    let first = summary(&mut replicas[0]);
    for r in replicas.iter_mut().skip(1) {
        let other = summary(r);
        assert_eq!(first.0, other.0, "members differ");
        assert_eq!(first.1, other.1, "removed devices differ");
        assert_eq!(first.2, other.2, "epochs differ");
        assert_eq!(first.3, other.3, "membership entry counts differ");
        assert_eq!(first.4, other.4, "file index differs");
        assert_eq!(first.5, other.5, "shard heads differ");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(
        (replicas, ops) in (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 1..60)))
    ) {
        run(replicas, ops);
    }
}
