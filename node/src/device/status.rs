//! The reports a device gives the CLI: `status`, `devices`, `conflicts` (typed, in
//! [`crate::control`]). Each is computed from the device's state under its lock; the
//! transport's view (connected peers, listen addresses, traffic) is asked before.

use std::collections::{BTreeMap, BTreeSet};

use meshsync_crdt::{FileKind, FolderId};
use meshsync_transport::PeerId;

use super::conflict::{conflict_name, original_of_conflict};
use super::folder::Folder;
use super::ignore::Rules;
use super::{Device, Shared};
use crate::control::{
    ConflictCopy, DeviceInfo, DeviceStatus, FolderStatus, NotWritten, PeerStatus,
};
use crate::state::in_sync;

/// What the transport says, asked without holding the device lock.
struct NetView {
    connected: BTreeSet<PeerId>,
    listen: Vec<String>,
}

async fn net_view(device: &Shared) -> NetView {
    let transport = device.lock().await.transport.clone();
    NetView {
        connected: transport.connected_peers().await.into_iter().collect(),
        listen: transport
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect(),
    }
}

/// `meshsync status`.
pub async fn status(device: &Shared) -> DeviceStatus {
    let net = net_view(device).await;
    device.lock().await.status(&net.connected, net.listen)
}

/// `meshsync devices`.
pub async fn devices(device: &Shared) -> Vec<DeviceInfo> {
    let net = net_view(device).await;
    device.lock().await.devices(&net.connected)
}

impl Device {
    fn status(&self, connected: &BTreeSet<PeerId>, listen: Vec<String>) -> DeviceStatus {
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
                    connected: connected.contains(&peer),
                    bytes_in,
                    bytes_out,
                }
            })
            .collect();
        DeviceStatus {
            device_id: me.to_string(),
            mesh_id: self.log.mesh().to_string(),
            listen,
            peers,
            folders: self
                .folders
                .iter()
                .map(|(id, f)| folder_status(id, f))
                .collect(),
            storage: self.storage_reports(connected),
        }
    }

    fn devices(&self, connected: &BTreeSet<PeerId>) -> Vec<DeviceInfo> {
        let me = self.keys.device_id();
        self.log
            .view()
            .members
            .values()
            .map(|m| DeviceInfo {
                id: m.device.to_string(),
                name: self.member_name(m),
                role: m.role.to_string(),
                admin: m.admin,
                this_device: m.device == me,
                connected: m.device == me || connected.contains(&m.device.to_peer_id()),
            })
            .collect()
    }

    /// Conflict copies, for `meshsync conflicts`: those the index calls for (concurrent
    /// records) and those on disk (including local edits moved aside), one entry per copy.
    pub fn conflicts(&self) -> Vec<ConflictCopy> {
        let mut out: BTreeMap<(String, String), ConflictCopy> = BTreeMap::new();
        for (id, f) in &self.folders {
            let root = f.root().ok();
            let on_disk = |copy: &str| {
                root.as_ref()
                    .is_some_and(|r| r.entry(copy).ok().flatten().is_some())
            };
            for state in f.index.conflicts() {
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
        out.into_values().collect()
    }
}

/// One folder's line of `status`: in sync or what it still needs (ignored paths excepted).
fn folder_status(id: &FolderId, f: &Folder) -> FolderStatus {
    let rules = Rules::load_at(&f.path);
    let (mut need_files, mut need_bytes, mut conflicts) = (0u64, 0u64, 0u64);
    for (path, state) in f.index.iter() {
        if rules.ignores_record(&path, &state.winner) {
            continue;
        }
        if !state.losers.is_empty() {
            conflicts += 1;
        }
        if !in_sync(f.local.get(&path), &state.winner) {
            need_files += 1;
            need_bytes += state.winner.size;
        }
    }
    FolderStatus {
        id: id.to_string(),
        path: f.path.display().to_string(),
        in_sync: need_files == 0,
        need_files,
        need_bytes,
        local_files: f
            .local
            .values()
            .filter(|l| l.kind == FileKind::File)
            .count(),
        conflicts,
        held_deletes: f.held_deletes,
        unavailable: f.unavailable.iter().cloned().collect(),
        not_written: f
            .problems
            .iter()
            .filter(|(path, _)| {
                f.index
                    .get(path)
                    .is_some_and(|state| !in_sync(f.local.get(path.as_str()), &state.winner))
            })
            .map(|(path, why)| NotWritten {
                path: path.clone(),
                why: why.clone(),
            })
            .collect(),
    }
}
