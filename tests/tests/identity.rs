//! Two devices made by the real binary in their own homes: the admin creates a mesh, adds the
//! other device with the mesh key wrapped to its on-disk X25519 key, and only that device can
//! open it; a third device cannot.

use meshsync_crdt::{Action, DeviceId, Epoch, MembershipLog, MeshKey, Role};
use meshsync_node::home::Home;
use meshsync_tests::meshsync_ok;

#[test]
fn keys_made_by_init_pair_through_the_membership_log() {
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<_> = ["admin", "laptop", "stranger"]
        .iter()
        .map(|name| {
            let path = dir.path().join(name);
            meshsync_ok(&path, &["init", "--name", name]);
            Home::locate(Some(path)).unwrap()
        })
        .collect();
    let keys: Vec<_> = homes.iter().map(|h| h.load_keys().unwrap()).collect();
    // The ID the binary prints is the ID of the keys on disk.
    for (home, keys) in homes.iter().zip(&keys) {
        let printed: DeviceId = meshsync_ok(home.path(), &["id"]).trim().parse().unwrap();
        assert_eq!(printed, keys.device_id());
    }

    let epoch0 = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&keys[0], "admin", &epoch0);
    let laptop = keys[1].device_id();
    let wrapped = epoch0
        .wrap_for(&mesh, &laptop, &keys[1].kem_public())
        .unwrap();
    log.append(
        &keys[0],
        Action::Add {
            device: laptop,
            role: Role::Device,
            name: meshsync_crdt::SealedName::unreadable("laptop"),
            kem: Some(keys[1].kem_public()),
            wrapped: Some(wrapped),
        },
    )
    .unwrap();

    // The laptop receives the log as bytes, verifies it, and finds its key.
    let mut received = MembershipLog::empty(mesh);
    received.apply(&log.changes_since(&[])).unwrap();
    let view = received.view();
    assert!(view.is_member(&laptop));
    let wraps = view.wraps_for(&laptop);
    assert_eq!(wraps.len(), 1);
    let key = wraps[0].unwrap_with(&mesh, &keys[1]).unwrap();
    assert_eq!(key.index_key().as_bytes(), epoch0.index_key().as_bytes());
    // Nobody else can open it, not even with the wrap in hand.
    assert!(wraps[0].unwrap_with(&mesh, &keys[2]).is_err());
    assert!(!view.is_member(&keys[2].device_id()));
}
