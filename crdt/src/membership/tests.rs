use super::*;
use crate::MeshKey;

struct Mesh {
    admin: DeviceKeys,
    log: MembershipLog,
}

fn mesh() -> Mesh {
    let admin = DeviceKeys::generate();
    let (log, _) = MembershipLog::create(&admin, "admin", &MeshKey::generate(Epoch(0)));
    Mesh { admin, log }
}

fn test_name(device: &DeviceKeys) -> SealedName {
    let mesh = MeshId::for_genesis(&device.device_id(), &[0; 16]);
    SealedName::seal(
        &MeshKey::generate(Epoch(0)),
        &mesh,
        &device.device_id(),
        "dev",
    )
}

fn add(device: &DeviceKeys, role: Role) -> Action {
    Action::Add {
        device: device.device_id(),
        role,
        name: test_name(device),
        kem: Some(device.kem_public()),
        wrapped: None,
    }
}

fn fork(log: &mut MembershipLog) -> MembershipLog {
    let mut copy = MembershipLog::empty(log.mesh());
    copy.apply(&log.changes_since(&[])).unwrap();
    copy
}

fn deliver(from: &mut MembershipLog, to: &mut MembershipLog) {
    let heads = to.heads();
    to.apply(&from.changes_since(&heads)).unwrap();
}

fn sync(a: &mut MembershipLog, b: &mut MembershipLog) {
    let to_b = a.changes_since(&b.heads());
    let to_a = b.changes_since(&a.heads());
    b.apply(&to_b).unwrap();
    a.apply(&to_a).unwrap();
}

#[test]
fn creator_is_admin_and_adds_and_removes_devices() {
    let mut m = mesh();
    let laptop = DeviceKeys::generate();
    m.log.append(&m.admin, add(&laptop, Role::Device)).unwrap();
    assert!(m.log.view().is_member(&laptop.device_id()));
    assert!(!m.log.view().is_admin(&laptop.device_id()));
    m.log
        .append(
            &m.admin,
            Action::Remove {
                device: laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    assert!(!m.log.view().is_member(&laptop.device_id()));
    assert_eq!(m.log.view().epoch, Epoch(1));
    assert_eq!(m.log.view().removed[&laptop.device_id()], Epoch(1));
    let saved = m.log.save();
    let loaded = MembershipLog::load(m.log.mesh(), &saved).unwrap();
    assert_eq!(loaded.view().members, m.log.view().members);
}

#[test]
fn non_admin_cannot_add_a_member() {
    let mut m = mesh();
    let laptop = DeviceKeys::generate();
    let stranger = DeviceKeys::generate();
    m.log.append(&m.admin, add(&laptop, Role::Device)).unwrap();
    assert!(matches!(
        m.log.append(&laptop, add(&stranger, Role::Device)),
        Err(MembershipError::NotAdmin)
    ));
    // Signed by the non-admin and delivered anyway: it is kept but does not count.
    let mut other = fork(&mut m.log);
    let hash = other.append_unchecked(&laptop, add(&stranger, Role::Device));
    deliver(&mut other, &mut m.log);
    assert!(!m.log.view().is_member(&stranger.device_id()));
    assert_eq!(
        m.log.view().ignored.get(&hash),
        Some(&Ignored::NotAdmin(laptop.device_id()))
    );
}

#[test]
fn unknown_signer_is_refused_before_it_is_stored() {
    let mut m = mesh();
    let stranger = DeviceKeys::generate();
    let mut other = fork(&mut m.log);
    other.append_unchecked(&stranger, add(&stranger, Role::Device));
    let heads = m.log.heads();
    let junk = other.changes_since(&heads);
    assert!(matches!(
        m.log.apply(&junk),
        Err(MembershipError::ForbiddenOp(_))
    ));
    assert!(!m.log.view().is_member(&stranger.device_id()));
    assert_eq!(m.log.view().members.len(), 1);
    assert_eq!(m.log.changes_since(&[]).len(), 1, "nothing of it was kept");
    // Many junk entries from fresh keys: each batch refused, the log does not grow.
    for _ in 0..50 {
        let key = DeviceKeys::generate();
        let mut other = fork(&mut m.log);
        other.append_unchecked(&key, add(&key, Role::Device));
        let heads = m.log.heads();
        assert!(m.log.apply(&other.changes_since(&heads)).is_err());
    }
    assert_eq!(m.log.changes_since(&[]).len(), 1);
    // A device the admin added, and what it signs later, still get in (it is a member).
    let laptop = DeviceKeys::generate();
    let mut other = fork(&mut m.log);
    other.append(&m.admin, add(&laptop, Role::Device)).unwrap();
    other.append_unchecked(&laptop, add(&stranger, Role::Device));
    deliver(&mut other, &mut m.log);
    assert!(m.log.view().is_member(&laptop.device_id()));
    assert!(
        !m.log.view().is_member(&stranger.device_id()),
        "not an admin's entry"
    );
}

#[test]
fn forged_signature_is_refused_at_the_door() {
    let mut m = mesh();
    let victim = DeviceKeys::generate();
    let mut other = fork(&mut m.log);
    // Forge: an entry claiming the admin as signer, signed by someone else.
    let forger = DeviceKeys::generate();
    let entry = Entry {
        mesh: other.mesh(),
        parents: other.frontier(),
        signer: m.admin.device_id(),
        time: 0,
        action: add(&victim, Role::Device),
    };
    let bytes = postcard::to_stdvec(&entry).unwrap();
    let forged = SignedEntry {
        signature: forger.sign(SIGNING_CONTEXT, &bytes),
        entry: bytes,
    }
    .encode();
    other
        .doc
        .put(ROOT, EntryHash::of(&forged).to_hex(), forged)
        .unwrap();
    other.doc.commit();
    let before = m.log.heads();
    let result = m.log.apply(
        &other
            .doc
            .get_changes(&before)
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect::<Vec<_>>(),
    );
    assert!(matches!(result, Err(MembershipError::BadSignature(_))));
    assert_eq!(m.log.heads(), before, "nothing was applied");
    assert!(!m.log.view().is_member(&victim.device_id()));
}

#[test]
fn wrong_mesh_is_refused() {
    let mut m = mesh();
    let mut elsewhere = self::mesh();
    let laptop = DeviceKeys::generate();
    elsewhere
        .log
        .append(&elsewhere.admin, add(&laptop, Role::Device))
        .unwrap();
    let changes = elsewhere.log.changes_since(&[]);
    assert!(matches!(
        m.log.apply(&changes),
        Err(MembershipError::WrongMesh(_))
    ));
    assert!(!m.log.view().is_member(&laptop.device_id()));
}

#[test]
fn removed_signer_is_ignored_after_and_concurrently_with_removal() {
    let mut m = mesh();
    let second_admin = DeviceKeys::generate();
    let newcomer = DeviceKeys::generate();
    let late = DeviceKeys::generate();
    m.log
        .append(&m.admin, add(&second_admin, Role::Device))
        .unwrap();
    m.log
        .append(
            &m.admin,
            Action::SetAdmin {
                device: second_admin.device_id(),
                admin: true,
            },
        )
        .unwrap();
    let mut theirs = fork(&mut m.log);
    // Concurrently: the admin removes the second admin, who adds a newcomer.
    m.log
        .append(
            &m.admin,
            Action::Remove {
                device: second_admin.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    theirs
        .append(&second_admin, add(&newcomer, Role::Device))
        .unwrap();
    sync(&mut m.log, &mut theirs);
    for log in [&m.log, &theirs] {
        assert!(!log.view().is_member(&second_admin.device_id()));
        assert!(!log.view().is_member(&newcomer.device_id()));
    }
    // After seeing its own removal, the removed device still signs: ignored too.
    let hash = theirs.append_unchecked(&second_admin, add(&late, Role::Device));
    sync(&mut m.log, &mut theirs);
    assert!(!m.log.view().is_member(&late.device_id()));
    assert_eq!(
        m.log.view().ignored.get(&hash),
        Some(&Ignored::NotAdmin(second_admin.device_id()))
    );
}

#[test]
fn removal_beats_concurrent_re_add_but_not_a_later_one() {
    let mut m = mesh();
    let other_admin = DeviceKeys::generate();
    let laptop = DeviceKeys::generate();
    m.log
        .append(&m.admin, add(&other_admin, Role::Device))
        .unwrap();
    m.log
        .append(
            &m.admin,
            Action::SetAdmin {
                device: other_admin.device_id(),
                admin: true,
            },
        )
        .unwrap();
    m.log.append(&m.admin, add(&laptop, Role::Device)).unwrap();
    let mut theirs = fork(&mut m.log);
    // The other admin removes and at once re-adds the laptop (re-add follows removal),
    // while the first admin removes it concurrently.
    theirs
        .append(
            &other_admin,
            Action::Remove {
                device: laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    m.log
        .append(
            &m.admin,
            Action::Remove {
                device: laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    let re_add = theirs
        .append(&other_admin, add(&laptop, Role::Device))
        .unwrap();
    sync(&mut m.log, &mut theirs);
    assert!(!m.log.view().is_member(&laptop.device_id()));
    assert_eq!(
        m.log.view().ignored.get(&re_add),
        Some(&Ignored::RemovalBeatsConcurrentAdd)
    );
    assert_eq!(m.log.view().members, theirs.view().members);
    // A re-add made after seeing every removal counts.
    theirs
        .append(&other_admin, add(&laptop, Role::Device))
        .unwrap();
    sync(&mut m.log, &mut theirs);
    assert!(m.log.view().is_member(&laptop.device_id()));
}

#[test]
fn replayed_entries_change_nothing() {
    let mut m = mesh();
    let laptop = DeviceKeys::generate();
    let old_add = m.log.append(&m.admin, add(&laptop, Role::Device)).unwrap();
    let all = m.log.changes_since(&[]);
    m.log
        .append(
            &m.admin,
            Action::Remove {
                device: laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    let heads = m.log.heads();
    let view = m.log.view().clone();
    // The same changes again, in any order.
    let mut again = all.clone();
    again.reverse();
    assert_eq!(m.log.apply(&again).unwrap(), 0);
    assert_eq!(m.log.heads(), heads);
    // The old "add" entry re-put by another replica under its key: same set, same view.
    let mut replayer = fork(&mut m.log);
    let bytes = match replayer.doc.get(ROOT, old_add.to_hex()).unwrap() {
        Some((automerge::Value::Scalar(v), _)) => match v.as_ref() {
            automerge::ScalarValue::Bytes(b) => b.clone(),
            _ => unreachable!(),
        },
        _ => unreachable!(),
    };
    replayer.doc.put(ROOT, old_add.to_hex(), bytes).unwrap();
    replayer.doc.commit();
    m.log.apply(&replayer.changes_since(&heads)).unwrap();
    assert_eq!(m.log.len(), 3);
    assert_eq!(m.log.view().members, view.members);
    assert!(!m.log.view().is_member(&laptop.device_id()));
}

#[test]
fn unknown_heads_from_a_peer_are_harmless() {
    let mut m = mesh();
    let bogus = [ChangeHash([7; 32]), ChangeHash([9; 32])];
    assert_eq!(
        m.log.changes_since(&bogus).len(),
        m.log.changes_since(&[]).len()
    );
}

#[test]
fn last_admin_stays_and_storage_cannot_be_admin() {
    let mut m = mesh();
    let nas = DeviceKeys::generate();
    m.log.append(&m.admin, add(&nas, Role::Storage)).unwrap();
    m.log
        .append(
            &m.admin,
            Action::SetAdmin {
                device: nas.device_id(),
                admin: true,
            },
        )
        .unwrap();
    assert!(!m.log.view().is_admin(&nas.device_id()));
    m.log
        .append(
            &m.admin,
            Action::Remove {
                device: m.admin.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
    assert!(m.log.view().is_admin(&m.admin.device_id()));
}

#[test]
fn a_second_genesis_cannot_take_over() {
    let mut m = mesh();
    let attacker = DeviceKeys::generate();
    let mut other = fork(&mut m.log);
    other.insert(
        &attacker,
        Entry {
            mesh: other.mesh(),
            parents: vec![],
            signer: attacker.device_id(),
            time: 0,
            action: Action::Genesis {
                nonce: [0; 16],
                name: test_name(&attacker),
                kem: attacker.kem_public(),
                wrapped: None,
            },
        },
    );
    let heads = m.log.heads();
    let takeover = other.changes_since(&heads);
    assert!(
        m.log.apply(&takeover).is_err(),
        "its signer never was a member"
    );
    assert!(!m.log.view().is_member(&attacker.device_id()));
    assert!(m.log.view().is_admin(&m.admin.device_id()));
}

#[test]
fn garbage_changes_are_refused_without_panic() {
    let mut m = mesh();
    for bytes in [vec![], vec![0u8; 10], vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]] {
        assert!(m.log.apply(&[bytes]).is_err());
    }
    // A change that deletes an entry.
    let mut other = fork(&mut m.log);
    let key = other.entries.keys().next().unwrap().to_hex();
    other.doc.delete(ROOT, key).unwrap();
    other.doc.commit();
    assert!(matches!(
        {
            let heads = m.log.heads();
            m.log.apply(&other.changes_since(&heads))
        },
        Err(MembershipError::ForbiddenOp(_))
    ));
}

#[test]
fn a_removal_rotates_the_key_for_those_who_stay_and_later_joiners_read_the_past() {
    let admin = DeviceKeys::generate();
    let key0 = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&admin, "admin", &key0);
    let (stays, stolen) = (DeviceKeys::generate(), DeviceKeys::generate());
    for device in [&stays, &stolen] {
        let wrapped = key0
            .wrap_for(&mesh, &device.device_id(), &device.kem_public())
            .unwrap();
        let action = Action::Add {
            device: device.device_id(),
            role: Role::Device,
            name: SealedName::seal(&key0, &mesh, &device.device_id(), "d"),
            kem: Some(device.kem_public()),
            wrapped: Some(wrapped),
        };
        log.append(&admin, action).unwrap();
    }
    let ring = log.key_ring(&admin);
    let key1 = log.remove(&admin, stolen.device_id(), &ring).unwrap();
    assert_eq!(log.view().epoch, Epoch(1));
    assert!(!log.view().is_member(&stolen.device_id()));
    let new_chunk_key = key1.chunk_key();
    // Those who stay hold both epochs; the removed device only what it had.
    for device in [&admin, &stays] {
        let ring = log.key_ring(device);
        assert_eq!(ring.current().unwrap().epoch(), Epoch(1));
        assert_eq!(
            ring.current().unwrap().chunk_key().as_bytes(),
            new_chunk_key.as_bytes()
        );
        assert!(ring.get(Epoch(0)).is_some());
    }
    let ring = log.key_ring(&stolen);
    assert!(ring.get(Epoch(1)).is_none());
    assert_eq!(ring.current().unwrap().epoch(), Epoch(0));
    // A device added in epoch 1 is wrapped only the new key, and reads epoch 0 through the
    // chain.
    let late = DeviceKeys::generate();
    let action = Action::Add {
        device: late.device_id(),
        role: Role::Device,
        name: SealedName::seal(&key1, &mesh, &late.device_id(), "late"),
        kem: Some(late.kem_public()),
        wrapped: Some(
            key1.wrap_for(&mesh, &late.device_id(), &late.kem_public())
                .unwrap(),
        ),
    };
    log.append(&admin, action).unwrap();
    let ring = log.key_ring(&late);
    assert_eq!(
        ring.get(Epoch(0)).unwrap().chunk_key().as_bytes(),
        key0.chunk_key().as_bytes()
    );
    // A non-admin cannot remove.
    let ring = log.key_ring(&stays);
    assert!(log.remove(&stays, late.device_id(), &ring).is_err());
}

#[test]
fn a_member_renames_and_removes_itself_but_nobody_else() {
    let admin = DeviceKeys::generate();
    let key0 = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&admin, "admin", &key0);
    let (a, b) = (DeviceKeys::generate(), DeviceKeys::generate());
    for device in [&a, &b] {
        log.append(&admin, add(device, Role::Device)).unwrap();
    }
    let name =
        |who: &DeviceKeys, text: &str| SealedName::seal(&key0, &mesh, &who.device_id(), text);
    log.rename(&a, a.device_id(), name(&a, "renamed")).unwrap();
    let seen = &log.view().members[&a.device_id()].name;
    assert_eq!(
        seen.open(&key0, &mesh, &a.device_id()).as_deref(),
        Some("renamed")
    );
    // a renaming b is not its to do: refused here, and ignored by every replica if forged.
    assert!(log.rename(&a, b.device_id(), name(&b, "hijacked")).is_err());
    let forged = log.append_unchecked(
        &a,
        Action::SetName {
            device: b.device_id(),
            name: name(&b, "hijacked"),
        },
    );
    assert!(log.view().ignored.contains_key(&forged));
    // a leaves: a new epoch, its key not wrapped to a.
    let ring = log.key_ring(&a);
    log.remove(&a, a.device_id(), &ring).unwrap();
    assert!(!log.view().is_member(&a.device_id()));
    assert_eq!(log.view().epoch, Epoch(1));
    assert!(log.key_ring(&b).get(Epoch(1)).is_some());
    assert!(log.key_ring(&a).get(Epoch(1)).is_none());
    // b cannot remove admin: not an admin.
    let ring = log.key_ring(&b);
    assert!(log.remove(&b, admin.device_id(), &ring).is_err());
}

#[test]
fn a_removal_notice_verifies_against_the_removed_devices_own_log() {
    let admin = DeviceKeys::generate();
    let key0 = MeshKey::generate(Epoch(0));
    let (mut log, _) = MembershipLog::create(&admin, "admin", &key0);
    let (gone, other) = (DeviceKeys::generate(), DeviceKeys::generate());
    for device in [&gone, &other] {
        log.append(&admin, add(device, Role::Device)).unwrap();
    }
    // What the removed device still holds: the log before its removal.
    let held = MembershipLog::load(log.mesh(), &log.save()).unwrap();
    let ring = log.key_ring(&admin);
    log.remove_with(&admin, gone.device_id(), &ring, true)
        .unwrap();
    let notice = log.removal_notice(&gone.device_id());
    assert_eq!(notice.len(), 1);
    assert_eq!(
        held.check_removal(&notice[0], &gone.device_id()),
        Some(true)
    );
    // Not for another device; nothing for a device that was not removed.
    assert_eq!(held.check_removal(&notice[0], &other.device_id()), None);
    assert!(log.removal_notice(&other.device_id()).is_empty());
    // A removal signed by a non-admin (forged onto the wire) orders nothing.
    let mut forged_log = MembershipLog::load(log.mesh(), &log.save()).unwrap();
    let forged = forged_log.append_unchecked(
        &other,
        Action::Remove {
            device: gone.device_id(),
            wraps: vec![],
            chain: vec![],
            wipe: true,
        },
    );
    assert!(forged_log.view().ignored.contains_key(&forged));
    let raw = forged_log.raw_entry(&forged).unwrap();
    assert_eq!(held.check_removal(&raw, &gone.device_id()), None);
    // Nor does one from another mesh, or garbage.
    let (mut elsewhere, _) = MembershipLog::create(&admin, "admin", &key0);
    elsewhere.append(&admin, add(&gone, Role::Device)).unwrap();
    let ring = elsewhere.key_ring(&admin);
    elsewhere
        .remove_with(&admin, gone.device_id(), &ring, true)
        .unwrap();
    let foreign = elsewhere.removal_notice(&gone.device_id());
    assert_eq!(held.check_removal(&foreign[0], &gone.device_id()), None);
    assert_eq!(held.check_removal(b"garbage", &gone.device_id()), None);
    // Added back, it is told nothing of its old removal.
    log.append(&admin, add(&gone, Role::Device)).unwrap();
    assert!(log.view().is_member(&gone.device_id()));
    assert!(log.removal_notice(&gone.device_id()).is_empty());
}

#[test]
fn a_new_entry_on_top_does_not_change_how_the_past_counts() {
    // Three concurrent entries that exclude one another in a ring: admin X makes Y an admin
    // (g) and Y then removes admin Z (rY), while Z removes X (r). Whether this settled
    // depended on the order the hashes give (one in four here), so try many meshes.
    let remove = |device: &DeviceKeys| Action::Remove {
        device: device.device_id(),
        wraps: vec![],
        chain: vec![],
        wipe: false,
    };
    let admin = |device: &DeviceKeys| Action::SetAdmin {
        device: device.device_id(),
        admin: true,
    };
    for _ in 0..32 {
        let Mesh { admin: x, log } = mesh();
        let mut xs = log;
        let (y, z) = (DeviceKeys::generate(), DeviceKeys::generate());
        xs.append(&x, add(&y, Role::Device)).unwrap();
        xs.append(&x, add(&z, Role::Device)).unwrap();
        xs.append(&x, admin(&z)).unwrap();
        let mut zs = fork(&mut xs);
        xs.append(&x, admin(&y)).unwrap();
        let mut ys = fork(&mut xs);
        ys.append(&y, remove(&z)).unwrap();
        zs.append(&z, remove(&x)).unwrap();
        sync(&mut xs, &mut ys);
        sync(&mut xs, &mut zs);
        sync(&mut xs, &mut ys);
        let past = xs.view().clone();
        // Entries that change nothing of the above, one and then two more.
        for _ in 0..3 {
            let own = Action::WipePolicy {
                device: x.device_id(),
                accepts: true,
            };
            xs.append_unchecked(&x, own);
            let now = xs.view();
            assert_eq!(past.members, now.members, "members changed");
            assert_eq!(past.removed, now.removed, "removed devices changed");
            assert_eq!(past.epoch, now.epoch, "the epoch changed");
        }
    }
}
