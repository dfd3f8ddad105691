//! What a device does when it hears that a device was removed with a cutoff (see
//! `meshsync_crdt::index::signed`): the removed device's changes after its cutoff, which this
//! device may have taken before it heard, leave every folder's index, with whatever was made
//! on top of them; this device's own such records are written again, and files the dropped
//! changes alone had put here are taken away again (kept restorable as old versions).

use std::collections::BTreeSet;

use meshsync_crdt::index::{shard_of, Dropped, FileUpdate};
use meshsync_crdt::{DeviceKeys, Epoch, FileKind, FolderId};

use super::folder::Folder;
use super::serve::ChunkMap;
use super::sync::Changed;
use super::Device;
use crate::disk::{FolderRoot, Kind};
use crate::state::{Batch, LocalFile};

impl Device {
    /// Takes out of every folder's index the changes removed devices made after their cutoffs
    /// (taken before this device heard of the removal), and writes again this device's own
    /// records that were made on top of them. The paths they touched are then materialised
    /// back (what they wrote is replaced, and stays restorable as an old version).
    pub(super) fn drop_past_cutoffs(
        &mut self,
        view: &meshsync_crdt::MembershipView,
        batch: &mut Batch,
        changed: &mut Changed,
    ) -> anyhow::Result<()> {
        let epoch = view.epoch;
        for (id, folder) in self.folders.iter_mut() {
            let dropped = folder.index.drop_past_cutoffs(view)?;
            if dropped.changes == 0 {
                continue;
            }
            tracing::warn!(%id, changes = dropped.changes, paths = dropped.paths.len(),
                "dropped a removed device's changes made after its cutoff");
            let mut map = self.chunk_map.lock().expect("chunk map lock");
            settle_dropped(id, folder, &self.keys, epoch, &mut map, batch, &dropped)?;
            changed.push((id.clone(), dropped.paths));
        }
        Ok(())
    }
}

/// After changes left a folder's index (`dropped`: past a cutoff, or the twin that lost):
/// writes this device's own records among them again (`keys`, in `epoch`), saves the shards
/// they touched, and takes away what no record names any more.
pub(super) fn settle_dropped(
    id: &FolderId,
    folder: &mut Folder,
    keys: &DeviceKeys,
    epoch: Epoch,
    map: &mut ChunkMap,
    batch: &mut Batch,
    dropped: &Dropped,
) -> anyhow::Result<()> {
    // What follows looks every dropped path up: their shards are loaded at once.
    folder
        .index
        .warm(dropped.paths.iter().map(String::as_str))?;
    let updates: Vec<FileUpdate> = dropped.own.iter().map(FileUpdate::from).collect();
    let records = folder.index.write(keys, epoch, updates)?;
    for (old, new) in dropped.own.iter().zip(&records) {
        let here = folder.local.get(&old.path).filter(|l| l.is(old)).cloned();
        if let Some(file) = here {
            let file = LocalFile {
                version: new.version,
                ..file
            };
            folder.set_local(id, map, batch, old.path.clone(), Some(file));
        }
    }
    let shards: BTreeSet<u16> = dropped.paths.iter().map(|p| shard_of(id, p)).collect();
    folder.save_shards(id, shards, batch);
    forget_unrecorded(id, folder, map, batch, &dropped.paths);
    Ok(())
}

/// Takes away files (and empty folders) at `paths` that no record names any more, unless they
/// were changed here since they were written (the scanner then records them as this device's).
fn forget_unrecorded(
    id: &FolderId,
    folder: &mut Folder,
    map: &mut ChunkMap,
    batch: &mut Batch,
    paths: &BTreeSet<String>,
) {
    let gone: Vec<(String, LocalFile)> = paths
        .iter()
        .rev() // what a folder holds before the folder
        .filter(|p| folder.index.get(p).is_none())
        .filter_map(|p| Some((p.clone(), folder.local.get(p)?.clone())))
        .collect();
    if gone.is_empty() {
        return;
    }
    let Ok(root) = FolderRoot::open(&folder.path) else {
        return;
    };
    for (path, old) in gone {
        let removed = match root.entry(&path) {
            Ok(None) => true,
            Ok(Some(e)) if e.kind == Kind::Dir && old.kind == FileKind::Directory => {
                root.remove_dir(&path).is_ok()
            }
            Ok(Some(e))
                if e.kind != Kind::Dir && e.len == old.size && e.mtime_ns == old.mtime_ns =>
            {
                root.remove_file(&path).is_ok()
            }
            _ => false,
        };
        if removed {
            crate::versions::record(batch, id, &path, &old);
            folder.set_local(id, map, batch, path, None);
        }
    }
}
