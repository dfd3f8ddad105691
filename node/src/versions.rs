//! Old versions: overwritten and deleted files stay restorable for a retention period
//! (`retention` in config.toml, default 30 days).
//!
//! - Whenever a file this device holds is replaced or deleted — by a local edit or by a
//!   version from another device — its old record (size, mtime, mode, chunk list) is kept in
//!   the state database. When the change came from another device, the old chunks that the
//!   new version does not reuse are first read from the file on disk, sealed, and put in this
//!   device's chunk store (`HOME/chunks`), so it can restore without anyone's help. A local
//!   edit has already destroyed the old bytes: those come back from a storage peer (which got
//!   them when they were current) or from another device's store.
//! - `meshsync versions PATH` lists them; `meshsync restore PATH [--version N]` writes one back
//!   (temp file, fsync, rename), and the next scan publishes it as the newest version
//!   (`device::history`).
//! - Past retention, versions are forgotten; chunks nothing references any more leave this
//!   device's store, and the device tells the storage peers it reaches (a signed release), which
//!   delete them and give the space back (`device::history::gc`).
//!
//! This module is the bookkeeping (what a kept version is, how it is recorded and preserved);
//! it needs nothing from the running device.

use std::collections::HashSet;

use meshsync_crdt::{ChunkId, ChunkListHash, FileKind, FolderId};
use serde::{Deserialize, Serialize};

use crate::chunks::{content, ChunkStore};
use crate::disk::FolderRoot;
use crate::state::{Batch, LocalFile, State};

/// Default retention of old versions.
pub const DEFAULT_RETENTION_SECS: u64 = 30 * 86_400;

/// One kept version of a path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionEntry {
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub list_hash: ChunkListHash,
    /// Unix seconds when a newer version (or a delete) replaced it.
    pub replaced_at: u64,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records `old` (what this device held at `path`) as a kept version.
pub fn record(batch: &mut Batch, folder: &FolderId, path: &str, old: &LocalFile) {
    if old.kind != FileKind::File || old.version == 0 {
        return;
    }
    let entry = VersionEntry {
        size: old.size,
        mtime_ns: old.mtime_ns,
        mode: old.mode,
        list_hash: old.list_hash,
        replaced_at: now_secs(),
    };
    if let Ok(bytes) = postcard::to_stdvec(&entry) {
        batch
            .versions
            .push((folder.clone(), path.to_string(), old.version, Some(bytes)));
    }
}

/// Before files are replaced by versions from elsewhere: reads the chunks of each old file
/// that its replacement does not reuse (and the store does not hold yet), checks them, seals
/// them and stores them, with one fsync for the lot.
pub fn preserve(
    store: &std::sync::Mutex<ChunkStore>,
    keys: &meshsync_crdt::KeyRing,
    root: &FolderRoot,
    olds: &[(String, LocalFile, HashSet<ChunkId>)],
) -> anyhow::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut seen = HashSet::new();
    let wanted: Vec<ChunkId> = (olds.iter())
        .flat_map(|(_, old, keep)| {
            old.chunks
                .iter()
                .map(|c| c.id)
                .filter(|id| !keep.contains(id))
        })
        .filter(|id| seen.insert(*id))
        .collect();
    // The store is held only to look and to put: whoever reads old versions from it (a
    // materialise preparing files) is not kept waiting while these are read and sealed.
    let mut missing: HashSet<ChunkId> = (store.lock().expect("store lock").missing(&wanted)?)
        .into_iter()
        .collect();
    let mut sealed: Vec<(ChunkId, Vec<u8>)> = Vec::new();
    for (rel, old, _) in olds {
        if !old.chunks.iter().any(|c| missing.contains(&c.id)) {
            continue;
        }
        let Ok(file) = root.open_read(rel) else {
            continue;
        };
        for c in &old.chunks {
            if !missing.remove(&c.id) {
                continue;
            }
            // Sealed in the epoch whose key made its ID; bytes that are that chunk in no
            // epoch were edited since the scan: that version's bytes are gone.
            let chunk = content::seal_chunk_in(keys, &c.id, c.len as usize, |slot| {
                file.read_exact_at(slot, c.offset)
            });
            if let Ok(Some(chunk)) = chunk {
                sealed.push((c.id, chunk));
            }
        }
    }
    if sealed.is_empty() {
        return Ok(0);
    }
    let refs: Vec<(ChunkId, &[u8])> = sealed.iter().map(|(id, d)| (*id, &d[..])).collect();
    Ok(store.lock().expect("store lock").put_batch(&refs)?)
}

/// Kept versions of `path`, newest first: (number, version, entry).
pub fn versions_of(
    state: &State,
    folder: &FolderId,
    rel: &str,
) -> anyhow::Result<Vec<(usize, u64, VersionEntry)>> {
    let mut out: Vec<(u64, VersionEntry)> = state
        .versions(folder)?
        .into_iter()
        .filter(|(p, _, _)| p == rel)
        .filter_map(|(_, v, bytes)| Some((v, postcard::from_bytes(&bytes).ok()?)))
        .collect();
    out.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, (v, e))| (i + 1, v, e))
        .collect())
}
