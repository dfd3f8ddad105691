//! Managing who is in the mesh (admins only): removing a device. A removal is a signed entry
//! in the membership log that starts a new key epoch: a fresh mesh key, wrapped to every
//! member that stays, with the older keys sealed under it (so what was written before stays
//! readable to them and to devices that join later). From then on this device writes with the
//! new key, lets the removed device in no more, and drops its connection; every other member
//! and storage peer does the same as soon as it learns of the entry (pushed at once, or pulled
//! within the second).

use meshsync_crdt::{DeviceId, Member};

use super::{sync, Device, Shared};
use crate::control::Removed;
use crate::protocol::{SyncChanges, SyncRequest};
use crate::state::Batch;

/// `meshsync remove WHO`.
pub async fn remove(device: &Shared, who: &str) -> anyhow::Result<Removed> {
    let (removed, allowed, push, transport) = {
        let mut d = device.lock().await;
        let member = d.member_named(who)?;
        if member.device == d.keys.device_id() {
            anyhow::bail!("this is this device; to take it out of the mesh, run `meshsync leave`");
        }
        let name = d.member_name(&member);
        let ring = d.key_ring();
        let keys = d.keys.clone();
        let key = d.log.remove(&keys, member.device, &ring)?;
        let saved = d.log.save();
        d.state.commit(Batch {
            membership: Some(saved),
            ..Batch::default()
        })?;
        let allowed = d.membership_changed();
        let rekeyed = d
            .log
            .view()
            .members
            .values()
            .filter(|m| m.role.holds_mesh_key() && m.device != keys.device_id())
            .count();
        let push = SyncRequest::Push(SyncChanges {
            membership: d.log.changes_since(&[]),
            ..SyncChanges::default()
        });
        let removed = Removed {
            device_id: member.device.to_string(),
            name,
            epoch: key.epoch().0,
            rekeyed,
        };
        (removed, allowed, push, d.transport.clone())
    };
    tracing::warn!(device = %removed.device_id, name = %removed.name, epoch = removed.epoch, "device removed; new key epoch");
    transport.set_allowed(allowed).await;
    sync::push_to_devices(transport, Default::default(), push);
    Ok(removed)
}

impl Device {
    /// The current member `who` names: its device ID, a unique prefix of it, or its name.
    pub(crate) fn member_named(&self, who: &str) -> anyhow::Result<Member> {
        let who = who.trim();
        let members: Vec<&Member> = self.log.view().members.values().collect();
        if let Ok(id) = who.parse::<DeviceId>() {
            if let Some(m) = members.iter().find(|m| m.device == id) {
                return Ok((*m).clone());
            }
        }
        let by_prefix: Vec<&&Member> = members
            .iter()
            .filter(|m| !who.is_empty() && m.device.to_string().starts_with(&who.to_uppercase()))
            .collect();
        let by_name: Vec<&&Member> = members
            .iter()
            .filter(|m| self.member_name(m) == who)
            .collect();
        match (by_prefix.as_slice(), by_name.as_slice()) {
            ([one], _) | ([], [one]) => Ok((**one).clone()),
            ([], []) => anyhow::bail!("no member of this mesh is called or starts with {who:?} (see `meshsync devices`)"),
            _ => anyhow::bail!("{who:?} names more than one member; give more of the device ID (see `meshsync devices`)"),
        }
    }
}
