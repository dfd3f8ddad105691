//! The reports a device gives the CLI: `status`, `devices`, `conflicts` (typed, in
//! [`crate::control`]). Each is computed from the device's state under its lock, taken once;
//! the transport's view (connected peers, listen addresses) is asked after, without it.

use std::collections::{BTreeMap, BTreeSet};

use meshsync_crdt::FolderId;
use meshsync_transport::{PeerId, Transport};

use super::conflict::{conflict_name, original_of_conflict};
use super::folder::Folder;
use super::{Device, Shared};
use crate::control::{
    ConflictCopy, DeviceInfo, DeviceStatus, FolderStatus, NotWritten, PeerStatus,
};
use crate::state::MetaKey;

/// When each member was last connected (Unix seconds).
pub(crate) const LAST_SEEN: MetaKey<BTreeMap<meshsync_crdt::DeviceId, u64>> =
    MetaKey::new("last_seen");

/// What the transport says, asked without holding the device lock; peers by device ID, as
/// the reports name them.
struct NetView {
    connected: BTreeSet<String>,
    /// The addresses each connected peer is reached at.
    addrs: BTreeMap<String, Vec<String>>,
    listen: Vec<String>,
}

async fn net_view(transport: &Transport) -> NetView {
    let connected: Vec<(String, Vec<String>)> = (transport.connected().await.into_iter())
        .filter_map(|(peer, addrs)| {
            let device = meshsync_crdt::DeviceId::from_peer_id(&peer)?;
            Some((
                device.to_string(),
                addrs.iter().map(|a| a.to_string()).collect(),
            ))
        })
        .collect();
    NetView {
        connected: connected.iter().map(|(device, _)| device.clone()).collect(),
        addrs: connected.into_iter().collect(),
        listen: (transport.listen_addrs().await.iter())
            .map(|a| a.to_string())
            .collect(),
    }
}

/// `meshsync status`. The device lock is taken once: while a big folder's first scan runs,
/// each turn of it waits for a slice of the scan to be recorded (seconds at 50,000 files).
pub async fn status(device: &Shared) -> DeviceStatus {
    let (transport, mut status) = {
        let mut d = device.lock().await;
        (d.transport.clone(), d.status())
    };
    let net = net_view(&transport).await;
    status.listen = net.listen;
    for peer in &mut status.peers {
        peer.connected = net.connected.contains(&peer.id);
    }
    for report in &mut status.storage {
        report.connected = net.connected.contains(&report.id);
    }
    status
}

/// `meshsync devices` (the lock taken once, as for [`status`]).
pub async fn devices(device: &Shared) -> Vec<DeviceInfo> {
    let (transport, mut list) = {
        let d = device.lock().await;
        (d.transport.clone(), d.devices())
    };
    let net = net_view(&transport).await;
    for info in list.iter_mut().filter(|info| info.removed_in.is_none()) {
        info.connected = info.this_device || net.connected.contains(&info.id);
        info.addresses = match info.this_device {
            true => net.listen.clone(),
            false => net.addrs.get(&info.id).cloned().unwrap_or_default(),
        };
    }
    list
}

impl Device {
    /// The report, but for what the transport says (see [`status`]).
    fn status(&mut self) -> DeviceStatus {
        let traffic = self.transport.traffic();
        let me = self.keys.device_id();
        let peers = self
            .log
            .view()
            .members
            .values()
            .filter(|m| m.device != me)
            .map(|m| {
                let peer = m.device.to_peer_id();
                let (bytes_in, bytes_out) = traffic.get(&peer).copied().unwrap_or((0, 0));
                PeerStatus {
                    id: m.device.to_string(),
                    name: self.member_name(m),
                    role: m.role.to_string(),
                    connected: false,
                    bytes_in,
                    bytes_out,
                }
            })
            .collect();
        DeviceStatus {
            device_id: me.to_string(),
            mesh_id: self.log.mesh().to_string(),
            listen: Vec::new(),
            peers,
            folders: self
                .folders
                .iter_mut()
                .map(|(id, f)| folder_status(id, f))
                .collect(),
            storage: self.storage_reports(),
        }
    }

    /// The list, but for what the transport says (see [`devices`]).
    fn devices(&self) -> Vec<DeviceInfo> {
        let me = self.keys.device_id();
        let view = self.log.view();
        let mut list: Vec<DeviceInfo> = view
            .members
            .values()
            .map(|m| DeviceInfo {
                id: m.device.to_string(),
                name: self.member_name(m),
                role: m.role.to_string(),
                admin: m.admin,
                this_device: m.device == me,
                connected: false,
                last_seen: self.last_seen.get(&m.device).copied(),
                addresses: Vec::new(),
                epoch: view.wraps_for(&m.device).last().map(|w| w.epoch.0),
                removed_in: None,
                remote_wipe: view.accepts_wipe.contains(&m.device),
            })
            .collect();
        list.extend(view.removed.iter().map(|(device, epoch)| DeviceInfo {
            id: device.to_string(),
            name: String::new(),
            role: "removed".into(),
            admin: false,
            this_device: *device == me,
            connected: false,
            last_seen: self.last_seen.get(device).copied(),
            addresses: Vec::new(),
            epoch: None,
            removed_in: Some(epoch.0),
            remote_wipe: view.accepts_wipe.contains(device),
        }));
        list
    }

    /// Notes that `peer` is connected now (or was until now): `meshsync devices` shows when a
    /// member was last seen. Saved when a peer goes away.
    pub(crate) fn saw(&mut self, peer: &PeerId, gone: bool) {
        let Some(device) = meshsync_crdt::DeviceId::from_peer_id(peer) else {
            return;
        };
        self.last_seen.insert(device, crate::versions::now_secs());
        if gone {
            let mut batch = crate::state::Batch::default();
            batch.put(&LAST_SEEN, &self.last_seen);
            if let Err(error) = self.state.commit(batch) {
                tracing::warn!(%error, "saving when members were last seen failed");
            }
        }
    }

    /// Conflict copies, for `meshsync conflicts`: those the index calls for (concurrent
    /// records) and those on disk (including local edits moved aside), one entry per copy.
    pub fn conflicts(&self) -> anyhow::Result<Vec<ConflictCopy>> {
        let mut out: BTreeMap<(String, String), ConflictCopy> = BTreeMap::new();
        for (id, f) in &self.folders {
            let root = f.root().ok();
            let on_disk = |copy: &str| {
                root.as_ref()
                    .is_some_and(|r| r.entry(copy).ok().flatten().is_some())
            };
            for state in f.index.conflicts()? {
                let path = state.winner.path.clone();
                for loser in &state.losers {
                    let copy = conflict_name(&path, loser);
                    let on_disk = on_disk(&copy);
                    out.insert(
                        (id.to_string(), copy.clone()),
                        ConflictCopy {
                            folder: id.to_string(),
                            path: path.clone(),
                            copy,
                            author: Some(loser.author.to_string()),
                            on_disk,
                        },
                    );
                }
            }
            for rel in f.local.keys().filter(|p| p.contains(".sync-conflict-")) {
                out.entry((id.to_string(), rel.clone()))
                    .or_insert_with(|| ConflictCopy {
                        folder: id.to_string(),
                        path: original_of_conflict(rel),
                        copy: rel.clone(),
                        author: None,
                        on_disk: true,
                    });
            }
        }
        Ok(out.into_values().collect())
    }
}

/// One folder's line of `status`: in sync or what it still needs (ignored paths excepted).
fn folder_status(id: &FolderId, f: &mut Folder) -> FolderStatus {
    f.survey();
    let survey = f.last_survey().expect("just surveyed");
    let (need_files, need_bytes, conflicts) = (
        survey.needs.len() as u64,
        survey.need_bytes,
        survey.conflicted.len() as u64,
    );
    let local_files = survey.files;
    FolderStatus {
        id: id.to_string(),
        path: f.path.display().to_string(),
        in_sync: need_files == 0,
        need_files,
        need_bytes,
        local_files,
        conflicts,
        held_deletes: f.held_deletes,
        unavailable: f.unavailable.iter().cloned().collect(),
        waiting_for_peers: !f.heard && f.index.is_empty(),
        // Only the paths still needed (the survey's): looking each up in the index read a
        // whole cold shard per path, under the device lock (a first sync's failed batch of
        // 5,000 held it for seconds at every `status`).
        not_written: f
            .problems
            .iter()
            .filter(|(path, _)| survey.needs.contains_key(path.as_str()))
            .map(|(path, why)| NotWritten {
                path: path.clone(),
                why: why.clone(),
            })
            .collect(),
    }
}
