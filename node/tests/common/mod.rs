//! What the in-process protocol tests share: a mesh built by hand and written into a home.
#![allow(dead_code)]

pub mod mallory;

use std::path::Path;

use meshsync_crdt::{Action, DeviceKeys, MembershipLog, MeshKey, Role, SealedName};
use meshsync_node::state::{Batch, State};

/// Adds each of `members` to `log` (signed by `admin`), the mesh key wrapped to those whose
/// role holds it.
pub fn add_members(
    log: &mut MembershipLog,
    admin: &DeviceKeys,
    key: &MeshKey,
    members: &[(&DeviceKeys, Role)],
) {
    let mesh = log.mesh();
    for (keys, role) in members {
        let device = keys.device_id();
        let wrapped = role
            .holds_mesh_key()
            .then(|| key.wrap_for(&mesh, &device, &keys.kem_public()).unwrap());
        let action = Action::Add {
            device,
            role: *role,
            name: SealedName::seal(key, &mesh, &device, "member"),
            kem: Some(keys.kem_public()),
            wrapped,
        };
        log.append(admin, action).unwrap();
    }
}

/// Writes `log` as the mesh of the home at `home` (before its node starts).
pub fn commit_mesh(home: &Path, log: &mut MembershipLog) {
    State::open(home)
        .unwrap()
        .commit(Batch {
            mesh: Some(log.mesh()),
            membership: Some(log.save()),
            ..Batch::default()
        })
        .unwrap();
}

/// `len` reproducible pseudo-random bytes (incompressible, so chunking splits them).
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
