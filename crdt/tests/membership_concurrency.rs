//! Property test: concurrent membership changes by two admins — removing each other, a
//! removal beside an add or a re-add, grants and revocations, each on its own replica — are
//! exchanged in random orders and pieces, and every replica ends with the same members, the same
//! removed devices, the same epoch and the same ignored entries. Once the admins have rotated
//! keys where the log says the mesh needs it, every member holds the same current key and no
//! removed device holds it.

use std::collections::BTreeSet;

use meshsync_crdt::{Action, DeviceKeys, Epoch, MembershipLog, MeshKey, Role, SealedName};
use proptest::prelude::*;

mod common;
use common::shuffle;

#[derive(Clone, Debug)]
enum Op {
    /// Replica `by` adds (or re-adds) or removes one of a few outside devices.
    Outsider { by: usize, add: bool, device: usize },
    /// Replica `by` removes replica `replica` (maybe the other admin).
    Remove { by: usize, replica: usize },
    /// Replica `by` grants or revokes admin to replica `replica`.
    Admin {
        by: usize,
        replica: usize,
        grant: bool,
    },
    /// Changes from one replica to another, shuffled by `seed`, in pieces.
    Deliver {
        from: usize,
        to: usize,
        seed: u64,
        pieces: u8,
    },
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        // Mostly the two admins act (anyone may try; a non-admin's entries are ignored).
        3 => (0usize..2, any::<bool>(), 0usize..3).prop_map(|(by, add, device)| Op::Outsider { by, add, device }),
        1 => (0..replicas, any::<bool>(), 0usize..3).prop_map(|(by, add, device)| Op::Outsider { by, add, device }),
        3 => (0usize..2, 0..replicas).prop_map(|(by, replica)| Op::Remove { by, replica }),
        1 => (0..replicas, 0..replicas, any::<bool>()).prop_map(|(by, replica, grant)| Op::Admin { by, replica, grant }),
        4 => (0..replicas, 0..replicas, any::<u64>(), 1u8..4).prop_map(
            |(from, to, seed, pieces)| Op::Deliver { from, to, seed, pieces }
        ),
    ]
}

struct Replica {
    keys: DeviceKeys,
    log: MembershipLog,
}

fn deliver(replicas: &mut [Replica], from: usize, to: usize, seed: u64, pieces: u8) {
    if from == to {
        return;
    }
    let heads = replicas[to].log.heads();
    let mut changes = replicas[from].log.changes_since(&heads);
    shuffle(&mut changes, seed);
    let size = changes.len().div_ceil(pieces as usize).max(1);
    for piece in changes.chunks(size) {
        replicas[to]
            .log
            .apply(piece)
            .expect("a replica's membership changes are admitted");
    }
}

fn run(replica_count: usize, ops: Vec<Op>) {
    let creator = DeviceKeys::generate();
    let key0 = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&creator, "r0", &key0);
    let others: Vec<DeviceKeys> = (1..replica_count).map(|_| DeviceKeys::generate()).collect();
    for keys in &others {
        let action = Action::Add {
            device: keys.device_id(),
            role: Role::Device,
            name: SealedName::seal(&key0, &mesh, &keys.device_id(), "replica"),
            kem: Some(keys.kem_public()),
            wrapped: key0
                .wrap_for(&mesh, &keys.device_id(), &keys.kem_public())
                .ok(),
        };
        log.append(&creator, action).unwrap();
    }
    let second_admin = Action::SetAdmin {
        device: others[0].device_id(),
        admin: true,
    };
    log.append(&creator, second_admin).unwrap();
    let outsiders: Vec<DeviceKeys> = (0..3).map(|_| DeviceKeys::generate()).collect();
    let initial = log.changes_since(&[]);
    let mut replicas: Vec<Replica> = std::iter::once(creator)
        .chain(others)
        .map(|keys| {
            let mut log = MembershipLog::empty(mesh);
            log.apply(&initial).unwrap();
            Replica { keys, log }
        })
        .collect();

    for op in ops {
        match op {
            Op::Outsider { by, add, device } => {
                let r = &mut replicas[by];
                let outsider = &outsiders[device];
                let ring = r.log.key_ring(&r.keys);
                if !add {
                    let _ = r.log.remove(&r.keys, outsider.device_id(), &ring);
                    continue;
                }
                let Some(key) = ring.current() else { continue };
                let action = Action::Add {
                    device: outsider.device_id(),
                    role: Role::Device,
                    name: SealedName::seal(key, &mesh, &outsider.device_id(), "outsider"),
                    kem: Some(outsider.kem_public()),
                    wrapped: key
                        .wrap_for(&mesh, &outsider.device_id(), &outsider.kem_public())
                        .ok(),
                };
                let _ = r.log.append(&r.keys, action);
            }
            Op::Remove { by, replica } => {
                let device = replicas[replica].keys.device_id();
                let r = &mut replicas[by];
                if device != r.keys.device_id() {
                    let ring = r.log.key_ring(&r.keys);
                    if r.log.remove(&r.keys, device, &ring).is_ok() {
                        // Its cutoff in one folder, as this remover saw it.
                        let mark = meshsync_crdt::membership::ChangeMark {
                            shard: by as u16,
                            incarnation: 0,
                            seq: (10 * by + replica) as u64,
                            hash: [by as u8; 32],
                        };
                        let folder = meshsync_crdt::membership::FolderTag([7; 32]);
                        r.log.cut_off(&r.keys, device, folder, vec![mark]).unwrap();
                    }
                }
            }
            Op::Admin { by, replica, grant } => {
                let device = replicas[replica].keys.device_id();
                let r = &mut replicas[by];
                let _ = r.log.append(
                    &r.keys,
                    Action::SetAdmin {
                        device,
                        admin: grant,
                    },
                );
            }
            Op::Deliver {
                from,
                to,
                seed,
                pieces,
            } => deliver(&mut replicas, from, to, seed, pieces),
        }
    }

    // Everything to everyone; then every admin that sees the mesh needs a rotation signs one,
    // and around again (of concurrent rotations one counts; the next look may ask for more).
    let everything = |replicas: &mut Vec<Replica>| {
        for from in 0..replica_count {
            for to in 0..replica_count {
                deliver(replicas, from, to, 7, 1);
            }
        }
    };
    everything(&mut replicas);
    everything(&mut replicas);
    for _ in 0..6 {
        let mut rotated = false;
        for r in replicas.iter_mut() {
            let me = r.keys.device_id();
            if r.log.view().is_admin(&me) && r.log.view().needs_rotation() {
                let ring = r.log.key_ring(&r.keys);
                rotated |= r.log.rotate(&r.keys, &ring).is_ok();
            }
        }
        everything(&mut replicas);
        everything(&mut replicas);
        if !rotated {
            break;
        }
    }

    let first = replicas[0].log.view().clone();
    for r in &replicas[1..] {
        let view = r.log.view();
        assert_eq!(first.members, view.members, "members differ");
        assert_eq!(first.removed, view.removed, "removed devices differ");
        assert_eq!(first.epoch, view.epoch, "epochs differ");
        assert_eq!(first.cutoffs, view.cutoffs, "cutoffs differ");
        let ignored = |v: &meshsync_crdt::MembershipView| -> BTreeSet<_> {
            v.ignored.keys().copied().collect()
        };
        assert_eq!(ignored(&first), ignored(view), "ignored entries differ");
    }
    assert!(first.members.values().any(|m| m.admin), "no admin left");
    if first
        .members
        .values()
        .any(|m| m.admin && replicas.iter().any(|r| r.keys.device_id() == m.device))
    {
        assert!(
            !first.needs_rotation(),
            "the admins left the mesh needing a rotation"
        );
        let current: Vec<Option<[u8; 32]>> = replicas
            .iter()
            .map(|r| {
                r.log
                    .key_ring(&r.keys)
                    .get(first.epoch)
                    .map(|k| *k.chunk_key().as_bytes())
            })
            .collect();
        for (r, key) in replicas.iter().zip(&current) {
            let member = first.is_member(&r.keys.device_id());
            assert_eq!(
                member,
                key.is_some(),
                "a member lacks the current key, or a removed device holds it"
            );
        }
        let held: BTreeSet<_> = current.iter().flatten().collect();
        assert!(held.len() <= 1, "members hold different keys for one epoch");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_membership_changes_resolve_identically(
        (replicas, ops) in (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 1..50)))
    ) {
        run(replicas, ops);
    }
}
