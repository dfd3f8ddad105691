//! Scanning: from what is on disk to signed index records.
//!
//! 1. [`walk`] (on a blocking thread) lists what changed since the last scan: files whose size,
//!    mtime or mode differ are chunked; files still being written are left for a rescan
//!    ([`SETTLE`]); the daemon's own files and ignored paths are skipped; vanished paths become
//!    deletions. Symlinks are recorded as links (their target is their content), never followed.
//! 2. [`mass_delete_held`] holds back a scan that would delete most of a folder.
//! 3. [`classify`] decides per path whether it needs a new record, is already the index's
//!    winner, or must wait for a newer version to be written first.
//! 4. The new records are signed, committed with the local state and the sealed form for
//!    storage peers, and pushed to connected devices.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use meshsync_crdt::index::{shard_of, FileUpdate, ShardChange};
use meshsync_crdt::{ChunkListHash, FileKind, FileRecord, FolderId, MeshKey};

use super::conflict::conflict_name_for;
use super::folder::{RecentDeletes, ScanUnderWay, MARKER};
use super::serve::unix_nanos;
use super::walk::{held_mark, walk_in_slices, Handover, HeldInTable};
pub use super::walk::{walk, Scanned, Scope, Walked, SETTLE, TRUNCATE_SETTLE};
use super::{sync, Device, Shared};
use crate::disk::{parent_of, FolderRoot};
use crate::protocol::{ByteBuf, SyncChanges, SyncRequest};
use crate::state::{Batch, LocalFile};

/// A scan that would delete at least this many files, and more than half of the folder, is
/// held back until the user confirms (`meshsync scan --allow-deletes`): an emptied or
/// half-unmounted folder must not wipe every other device.
pub const MASS_DELETE_MIN: usize = 10;

/// How a scan was asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanOptions {
    /// Confirm a mass delete the guard held back.
    pub allow_mass_delete: bool,
    /// Asked by the user (`meshsync scan`): take files modified in the last moments too, which
    /// the watcher leaves to settle (a file that changes while it is read is still left).
    pub requested: bool,
}

/// Rescans every folder (the watcher's and the periodic scans).
pub async fn scan_all(device: &Shared, options: ScanOptions) -> anyhow::Result<()> {
    let ids: Vec<FolderId> = device.lock().await.folders.keys().cloned().collect();
    for id in ids {
        scan(device, &id, options).await?;
    }
    Ok(())
}

/// Rescans one folder, records what changed, and pushes it to connected devices. Returns how
/// many paths changed.
pub async fn scan(device: &Shared, id: &FolderId, options: ScanOptions) -> anyhow::Result<usize> {
    scan_in(device, id, options, Scope::All).await
}

/// Rescans the part of one folder `scope` names (see [`scan`]). While the mass-delete guard
/// holds deletions back, every scan looks at all of the folder: a scan of a few folders would
/// see only their share of the deletions, too few to hold, and record them.
///
/// A whole scan, whatever asked for it, puts off the next safety-net walk (see
/// [`safety_net_wait`]); none starts while one is under way.
#[tracing::instrument(skip_all, fields(folder = %id))]
pub async fn scan_in(
    device: &Shared,
    id: &FolderId,
    options: ScanOptions,
    scope: Scope,
) -> anyhow::Result<usize> {
    if !matches!(scope, Scope::All) {
        return scan_scope(device, id, options, scope).await;
    }
    let began = tokio::time::Instant::now();
    device.lock().await.next_full_scan = began + FULL_SCAN_UNDER_WAY;
    let scanned = scan_scope(device, id, options, scope).await;
    device.lock().await.next_full_scan =
        tokio::time::Instant::now() + safety_net_wait(began.elapsed());
    scanned
}

/// How long until the next safety-net walk of every folder, after one that took `took`: 30 s,
/// or long enough that the walks cost at most 1 % of a core (at a million files a walk takes
/// seconds; the watcher's targeted rescans see the changes in between).
pub fn safety_net_wait(took: Duration) -> Duration {
    const EVERY: Duration = Duration::from_secs(30);
    EVERY.max(took * 100)
}

/// While a whole scan runs, the next safety-net walk is put off by this much (the scan's end
/// sets the real time).
const FULL_SCAN_UNDER_WAY: Duration = Duration::from_secs(24 * 3600);

async fn scan_scope(
    device: &Shared,
    id: &FolderId,
    options: ScanOptions,
    scope: Scope,
) -> anyhow::Result<usize> {
    let (path, holding) = {
        let d = device.lock().await;
        let f = d.folder(id)?;
        (f.path.clone(), f.held_deletes > 0)
    };
    let scope = match (scope, holding) {
        (Scope::Dirs(_), true) | (Scope::All, _) => Scope::All,
        (dirs, false) => {
            tokio::task::spawn_blocking(move || {
                Ok::<_, anyhow::Error>(dirs.there(&FolderRoot::open(&path)?))
            })
            .await??
        }
    };
    // The mass-delete guard weighs deletions against the files held before this scan
    // recorded any.
    let (root, held, key, files_here, stopping, _under_way) = {
        let d = device.lock().await;
        let f = d.folder(id)?;
        let held = HeldInTable {
            state: d.state.clone(),
            folder: id.clone(),
        };
        let stopping = d.stopping();
        (
            f.path.clone(),
            held,
            d.mesh_key()?,
            f.file_count(),
            stopping,
            matches!(scope, Scope::All).then(|| ScanUnderWay::new(f)),
        )
    };
    if !root.join(MARKER).exists() {
        anyhow::bail!(
            "{} has no {MARKER} marker: is the disk mounted? Not scanning, so nothing is deleted",
            root.display()
        );
    }
    let id_key = key.chunk_id_key();
    let wait_settle = !options.requested;
    let retry = Rescan {
        folder: id.clone(),
        scope: scope.clone(),
    };
    // Changed files are recorded a slice at a time while the walk goes on (reading and hashing
    // on every core, recording mostly on one: they overlap); deletions come at the end.
    let (slices, mut found) = tokio::sync::mpsc::channel::<Vec<Scanned>>(1);
    let walking = tokio::task::spawn_blocking(move || {
        let door = FolderRoot::open(&root)?;
        let walked = walk_in_slices(
            &door,
            &held,
            &id_key,
            wait_settle,
            &scope,
            Handover {
                slice: RECORD_SLICE,
                stopping: &stopping,
                take: &mut |slice| slices.blocking_send(slice).is_ok(),
            },
        )?;
        // What a killed daemon was writing goes (the first scan after a start walks it all).
        for temp in &walked.left_behind {
            if let Err(error) = door.remove_file(temp) {
                tracing::warn!(%temp, %error, "cannot remove a temp file a killed daemon left");
            }
        }
        Ok::<_, anyhow::Error>(walked)
    });
    let began = Instant::now();
    let mut count = 0;
    while let Some(slice) = found.recv().await {
        count += slice.len();
        device.lock().await.record_and_push(id, slice, &key)?;
    }
    let walked = walking.await??;
    let mut d = device.lock().await;
    if let Some(delay) = walked.retry_after {
        let changes = d.changes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = changes.send(retry);
        });
    }
    let f = d
        .folders
        .get_mut(id)
        .context("folder removed while scanning")?;
    let deletes = walked.changed.iter().filter(|s| s.file.is_none()).count();
    let held = guard(
        &mut f.recent_deletes,
        deletes,
        files_here,
        options.allow_mass_delete,
        Instant::now(),
    );
    f.held_deletes = if held { deletes } else { 0 };
    let scanned: Vec<Scanned> = if held {
        tracing::warn!(
            deletes,
            files_here,
            "mass delete held back; run `meshsync scan --allow-deletes {id}` if it is intended"
        );
        walked
            .changed
            .into_iter()
            .filter(|s| s.file.is_some())
            .collect()
    } else {
        walked.changed
    };
    let count = count + scanned.len();
    // Recorded a slice at a time, the device let go of in between: a first scan of a million
    // files holds the lock, and the memory of its records, seals and push, for a slice only,
    // and each push stays well within a message.
    let mut scanned = scanned.into_iter();
    loop {
        let slice: Vec<Scanned> = scanned.by_ref().take(RECORD_SLICE).collect();
        if slice.is_empty() {
            break;
        }
        d.record_and_push(id, slice, &key)?;
        if !scanned.as_slice().is_empty() {
            drop(d);
            d = device.lock().await;
        }
    }
    tracing::debug!(changed = count, took = ?began.elapsed(), "scanned");
    Ok(count)
}

/// How many scanned paths are recorded, committed and pushed together. Each slice is one
/// Automerge change of every shard it touches, in every device's history: smaller slices cost
/// every device more (slices of 2,000 made a first scan's history 25 times as many changes),
/// and a smaller first slice, to start recording sooner, made a first scan of 100,000 files
/// slower (18,031–22,412 files/s against 26,067–26,739 with 50,000).
const RECORD_SLICE: usize = 50_000;

/// A rescan the watcher (or a scan that found a file still being written) asks for.
#[derive(Clone, Debug)]
pub struct Rescan {
    pub folder: FolderId,
    pub scope: Scope,
}

/// Whether the guard holds back a scan's `deletes` in a folder of `files_here` files, counting
/// the deletions recorded lately (`recent`) with them; deletions it lets through join
/// `recent`. The user's confirmation starts the count afresh (what was confirmed does not
/// count either).
fn guard(
    recent: &mut RecentDeletes,
    deletes: usize,
    files_here: usize,
    allowed: bool,
    now: Instant,
) -> bool {
    if allowed {
        recent.clear();
    }
    let before = recent.count(now);
    let held = deletes > 0 && mass_delete_held(deletes + before, files_here + before, allowed);
    if !held && !allowed {
        recent.add(now, deletes);
    }
    held
}

/// Whether the guard holds back `deletes` in a folder of `files_here` files: at least
/// [`MASS_DELETE_MIN`] and more than half, unless the user allowed it. A scan counts the
/// deletions recorded lately with its own (and those files with the folder's).
pub fn mass_delete_held(deletes: usize, files_here: usize, allowed: bool) -> bool {
    !allowed && deletes >= MASS_DELETE_MIN && deletes * 2 > files_here
}

/// What a scanned path needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// A new signed record.
    Record,
    /// Nothing new: this content already is the index's winner (just written here, or the
    /// same edit made elsewhere); only the local state takes that version. (Not when other
    /// versions stand concurrent with the winner: a file touched here then is recorded anew,
    /// which settles the conflict — how "keep the original" works.)
    Same(u64),
    /// A newer version waits to be written here; writing it will keep this edit as a conflict
    /// copy. Recording the edit now would silently supersede that version. (A newer
    /// *deletion* does not wait: an edit made here outlives a delete made elsewhere, so the
    /// edit is recorded over it and comes back everywhere.)
    Wait,
    /// This device never had a version of the path, yet holds other content there than the
    /// index's winner (two folders merged, or a file made on both sides while apart): the
    /// local file is not a successor of a version it never saw. It is moved aside as a
    /// conflict copy (recorded by the next scan) and the winner is written in its place.
    Conflict,
}

/// Decides what the scanned state `found` of a path needs, given the index's `winner` there and
/// the version this device last held (`base`, 0 if none); `conflicted`: other versions stand
/// concurrent with the winner.
pub fn classify(
    found: Option<&LocalFile>,
    winner: Option<&FileRecord>,
    base: u64,
    conflicted: bool,
) -> Decision {
    let Some(w) = winner else {
        return Decision::Record;
    };
    if w.version > base && found.is_some() && base > 0 && !w.deleted {
        return Decision::Wait;
    }
    let settles_conflict = conflicted && base > 0;
    match found {
        Some(file)
            if !w.deleted
                && !settles_conflict
                && w.chunks == file.list_hash
                && w.mode & 0o777 == file.mode
                && w.kind == file.kind =>
        {
            Decision::Same(w.version)
        }
        Some(file) if base == 0 && !w.deleted && file.kind != FileKind::Directory => {
            Decision::Conflict
        }
        None if w.deleted => Decision::Same(w.version),
        _ => Decision::Record,
    }
}

/// The index update for a scanned path (`previous`: the kind it had, for a deletion).
fn update_for(scan: &Scanned, previous: Option<FileKind>) -> FileUpdate {
    match &scan.file {
        Some(file) => FileUpdate {
            path: scan.path.clone(),
            kind: file.kind,
            size: file.size,
            mode: file.mode,
            mtime_ns: file.mtime_ns,
            deleted: false,
            chunks: file.list_hash,
        },
        None => FileUpdate {
            path: scan.path.clone(),
            kind: previous.unwrap_or(FileKind::File),
            size: 0,
            mode: 0,
            mtime_ns: unix_nanos(std::time::SystemTime::now()),
            deleted: true,
            chunks: ChunkListHash::default(),
        },
    }
}

impl Device {
    /// Records one slice of a scan ([`Device::record_scan`]) and pushes what it signed to the
    /// connected devices.
    fn record_and_push(
        &mut self,
        id: &FolderId,
        scanned: Vec<Scanned>,
        key: &MeshKey,
    ) -> anyhow::Result<()> {
        if let Some(push) = self.record_scan(id, scanned, key)? {
            let storage = self.storage_peers().into_iter().collect();
            sync::push_to_devices(self.transport.clone(), storage, push);
        }
        Ok(())
    }

    /// Signs records for the scanned paths that need one, updates the local state of the
    /// others, commits (with the sealed form for storage peers) and returns the push for the
    /// connected devices, if anything new was signed.
    fn record_scan(
        &mut self,
        id: &FolderId,
        scanned: Vec<Scanned>,
        key: &MeshKey,
    ) -> anyhow::Result<Option<SyncRequest>> {
        let epoch = self.log.view().epoch;
        let f = self
            .folders
            .get_mut(id)
            .context("folder removed while scanning")?;
        let began = Instant::now();
        let paths = scanned.len();
        let mut same = Vec::new();
        let mut new = Vec::new();
        let mut concurrent = Vec::new();
        f.index.warm(scanned.iter().map(|s| s.path.as_str()))?;
        let warmed = began.elapsed();
        let mut stale_dirs = BTreeSet::new();
        for scan in scanned {
            // The walk read what the state holds; memory can only differ from it after a
            // commit that failed (memory is then ahead): the state's view is the one to trust,
            // or the folder would be rescanned in a loop until a restart.
            let stale = || -> anyhow::Result<bool> {
                Ok(f.local.get(&scan.path).map(held_mark) != scan.was
                    && (self.state.local_file(id, &scan.path)?.as_ref()).map(held_mark) != scan.was)
            };
            if stale()? {
                // This device wrote the path while the walk looked (a peer's version): what
                // the walk saw is stale, and recording it would undo that version. Look again.
                stale_dirs.insert(parent_of(&scan.path).to_string());
                continue;
            }
            let state = f.index.get(&scan.path);
            let conflicted = state.as_ref().is_some_and(|s| !s.losers.is_empty());
            let winner = state.map(|s| s.winner);
            let local = f.local.get(&scan.path);
            let base = local.map(|l| l.version).unwrap_or(0);
            match classify(scan.file.as_ref(), winner.as_ref(), base, conflicted) {
                Decision::Record => new.push((update_for(&scan, local.map(|l| l.kind)), scan)),
                Decision::Same(version) => same.push((scan, version)),
                Decision::Wait => {}
                Decision::Conflict => concurrent.push(scan),
            }
        }
        if !stale_dirs.is_empty() {
            let _ = self.changes.send(Rescan {
                folder: id.clone(),
                scope: Scope::Dirs(stale_dirs),
            });
        }
        if !concurrent.is_empty() {
            keep_aside(&f.path, &concurrent, &self.keys.device_id());
            // The copies are recorded by a rescan.
            let _ = self.changes.send(Rescan {
                folder: id.clone(),
                scope: Scope::All,
            });
        }
        let (updates, new): (Vec<FileUpdate>, Vec<Scanned>) = new.into_iter().unzip();
        let classified = began.elapsed();
        let records = f.index.write(&self.keys, epoch, updates)?;
        let written = began.elapsed();
        let mut batch = Batch::default();
        let mut map = self.chunk_map.lock().expect("chunk map lock");
        // For each new list, the list of the version it replaces (what the others most likely
        // hold, so the new one can go to them as the pieces that differ).
        let mut bases = HashMap::new();
        for (scan, record) in new.into_iter().zip(&records) {
            // What this device held before the edit stays restorable (its bytes come back from
            // a storage peer or another device: the edit already overwrote them here).
            if let Some(old) = f.local.get(&scan.path) {
                let replaced = scan
                    .file
                    .as_ref()
                    .is_none_or(|new| new.list_hash != old.list_hash);
                if replaced {
                    crate::versions::record(&mut batch, id, &scan.path, old);
                }
                if let Some(new) = &scan.file {
                    bases.insert(new.list_hash, old.list_hash);
                }
            }
            let file = scan.file.map(|file| LocalFile {
                version: record.version,
                ..file
            });
            // A folder has no content, so no list (its list hash is the zero hash).
            if let Some(file) = file.as_ref().filter(|f| f.kind != FileKind::Directory) {
                batch.lists.push((file.list_hash, scan.refs));
            }
            f.set_local(id, &mut map, &mut batch, scan.path, file);
        }
        for (scan, version) in same {
            let file = scan.file.map(|file| LocalFile { version, ..file });
            f.set_local(id, &mut map, &mut batch, scan.path, file);
        }
        drop(map);
        let kept = began.elapsed();
        let shards: BTreeSet<u16> = records.iter().map(|r| shard_of(id, &r.path)).collect();
        f.save_shards(id, shards, &mut batch);
        let changes = f.index.take_local_changes();
        let saved = began.elapsed();
        let push = if changes.is_empty() {
            None
        } else {
            // The same changes, sealed for storage peers, with the chunk lists they name.
            let mesh = self.log.mesh();
            let lists = batch.lists.clone();
            self.sealing
                .seal(&self.keys, key, mesh, id, &changes, lists, &mut batch)?;
            Some(self.push_of(id, changes, &batch, &bases))
        };
        let sealed = began.elapsed();
        self.commit(batch)?;
        tracing::debug!(
            paths,
            signed = records.len(),
            ?warmed,
            ?classified,
            ?written,
            ?kept,
            ?saved,
            ?sealed,
            took = ?began.elapsed(),
            "recorded a scan's slice"
        );
        Ok(push)
    }

    /// The push of `changes`, just sealed into `batch`: with the sealed copies for the other
    /// devices to forward to storage peers, unless the mesh has none or that makes it big
    /// (they would get them from a storage peer, or never need them); without them, with the
    /// chunk lists themselves, a changed file's as the pieces that differ from the list of
    /// the version it replaces (`bases`).
    fn push_of(
        &self,
        id: &FolderId,
        changes: Vec<ShardChange>,
        batch: &Batch,
        bases: &HashMap<ChunkListHash, ChunkListHash>,
    ) -> SyncRequest {
        let sealed_size: usize = batch.sealed.iter().map(|(_, _, b)| b.len()).sum();
        let forward =
            !self.storage_peers().is_empty() && sealed_size <= crate::storage_client::SEAL_BUDGET;
        let (sealed, lists) = if forward {
            let sealed = (batch.sealed.iter())
                .map(|(_, _, b)| ByteBuf::from(b.clone()))
                .collect();
            (sealed, Vec::new())
        } else {
            let lists = super::lists::to_send(&self.state, &batch.lists, bases);
            (Vec::new(), lists)
        };
        SyncRequest::Push(SyncChanges {
            membership: vec![],
            folders: vec![(id.clone(), changes)],
            heads: self.sealing.heads(),
            sealed,
            more: false,
            lists,
        })
    }
}

/// Moves local files that are concurrent with the index's winner aside as conflict copies
/// (through the folder's door); the winner is then written in their place by the catch-up.
fn keep_aside(root: &std::path::Path, concurrent: &[Scanned], me: &meshsync_crdt::DeviceId) {
    let Ok(root) = FolderRoot::open(root) else {
        return;
    };
    for scan in concurrent {
        let Some(file) = &scan.file else { continue };
        let copy = conflict_name_for(&scan.path, file.mtime_ns, me);
        match root.rename_new(&scan.path, &copy) {
            Ok(()) => {
                tracing::warn!(path = %scan.path, copy = %copy, "another device's version came first: this one kept as a conflict copy")
            }
            Err(error) => {
                tracing::warn!(path = %scan.path, %error, "cannot keep a concurrent file aside")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshsync_crdt::{DeviceKeys, Epoch, FolderIndex, MeshId};
    use std::time::Duration;

    /// The temp files a killed daemon left go with the next scan's walk; this process's own
    /// (a materialise under way) stay, and nothing of them is recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_removes_the_temp_files_a_killed_daemon_left() {
        use crate::device::folder::TEMP_PREFIX;
        let dir = tempfile::tempdir().unwrap();
        let device = super::super::test_device(dir.path(), "a").await;
        let root = dir.path().join("A");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/kept.txt"), "a file").unwrap();
        let killed = format!("d/e/{TEMP_PREFIX}{}-7", std::process::id() + 1);
        let own = format!("d/{TEMP_PREFIX}{}-3", std::process::id());
        std::fs::write(root.join(&killed), "half written").unwrap();
        std::fs::write(root.join(&own), "being written").unwrap();
        let id = crate::device::folder::add(&device, &root, None)
            .await
            .unwrap();
        let asked = ScanOptions {
            requested: true,
            ..Default::default()
        };
        scan(&device, &id, asked).await.unwrap();
        assert!(
            !root.join(&killed).exists(),
            "a killed daemon's temp file is gone"
        );
        assert!(root.join(&own).exists(), "this process's own is left");
        assert!(root.join("d/e/kept.txt").exists());
        let d = device.lock().await;
        assert!(d.state.local_file(&id, "d/e/kept.txt").unwrap().is_some());
        assert!(d.state.local_file(&id, &killed).unwrap().is_none());
        assert!(d.state.local_file(&id, &own).unwrap().is_none());
    }

    /// A commit that failed leaves memory ahead of the state, which the walk reads. A scan
    /// then trusts the state: the path is recorded again (and the state catches up), not
    /// taken as written meanwhile and rescanned over and over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_trusts_the_state_when_memory_is_ahead_of_it() {
        use crate::home::Home;
        use crate::net::Network;
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path().join("a"))).unwrap();
        home.init("a", meshsync_crdt::Role::Device).unwrap();
        let device = super::super::start(home, Network::memory()).await.unwrap();
        let root = dir.path().join("A");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.txt"), "first").unwrap();
        let id = crate::device::folder::add(&device, &root, None)
            .await
            .unwrap();
        let asked = ScanOptions {
            requested: true,
            ..Default::default()
        };
        scan(&device, &id, asked).await.unwrap();
        let recorded = |d: &Device| d.state.local_file(&id, "a.txt").unwrap().unwrap();
        let first = recorded(&*device.lock().await);

        // What a materialise would have set in memory, its commit lost.
        {
            let mut d = device.lock().await;
            let f = d.folders.get_mut(&id).unwrap();
            let ahead = LocalFile {
                version: first.version + 1,
                list_hash: ChunkListHash([9; 32]),
                ..first.without_chunks()
            };
            f.local.insert("a.txt".into(), ahead);
        }
        std::fs::write(root.join("a.txt"), "edited here").unwrap();
        let changed = scan(&device, &id, asked).await.unwrap();
        assert_eq!(changed, 1);
        let d = device.lock().await;
        let now = recorded(&d);
        assert_eq!(now.size, "edited here".len() as u64);
        assert_ne!(now.list_hash, first.list_hash);
        let f = d.folder(&id).unwrap();
        assert_eq!(f.local.get("a.txt").map(held_mark), Some(held_mark(&now)));
    }

    #[test]
    fn the_safety_net_walks_at_most_one_percent_of_the_time() {
        assert_eq!(
            safety_net_wait(Duration::from_millis(40)),
            Duration::from_secs(30)
        );
        assert_eq!(
            safety_net_wait(Duration::from_secs(6)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn mass_delete_guard_holds_most_of_a_folder_only() {
        assert!(mass_delete_held(10, 12, false));
        assert!(!mass_delete_held(10, 12, true), "allowed by the user");
        assert!(!mass_delete_held(9, 9, false), "fewer than ten files");
        assert!(
            !mass_delete_held(10, 20, false),
            "half the folder is not more than half"
        );
        assert!(mass_delete_held(11, 20, false));
    }

    #[test]
    fn a_mass_delete_seen_in_slices_is_still_held() {
        let mut recent = RecentDeletes::default();
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        // 30 files; the watcher sees 8 of 25 deletions go, then the other 17.
        assert!(!guard(&mut recent, 8, 30, false, t0), "8 alone are few");
        assert!(guard(&mut recent, 17, 22, false, later(1)), "8 + 17 of 30");
        assert!(guard(&mut recent, 17, 22, false, later(2)), "still held");
        // Confirmed by the user: through, and the count starts afresh.
        assert!(!guard(&mut recent, 17, 22, true, later(3)));
        assert!(
            !guard(&mut recent, 4, 5, false, later(4)),
            "4 after the confirmation"
        );
        // A minute on, earlier deletions no longer count.
        let mut recent = RecentDeletes::default();
        assert!(!guard(&mut recent, 9, 30, false, t0));
        assert!(!guard(&mut recent, 9, 21, false, later(61)), "9, not 18");
        assert!(
            !guard(&mut recent, 0, 12, false, later(62)),
            "nothing to hold"
        );
    }

    fn record(version: u64, chunks: ChunkListHash, deleted: bool) -> FileRecord {
        let keys = DeviceKeys::generate();
        let mut index = FolderIndex::new(MeshId::from_bytes([1; 16]), FolderId::random());
        for _ in 0..version {
            index
                .write(
                    &keys,
                    Epoch(0),
                    vec![FileUpdate {
                        path: "p".into(),
                        kind: FileKind::File,
                        size: 1,
                        mode: 0o644,
                        mtime_ns: 1,
                        deleted,
                        chunks,
                    }],
                )
                .unwrap();
        }
        index.get("p").unwrap().winner
    }

    fn file(list_hash: ChunkListHash) -> LocalFile {
        LocalFile {
            kind: FileKind::File,
            size: 1,
            mtime_ns: 1,
            mode: 0o644,
            chunks: vec![],
            version: 0,
            list_hash,
        }
    }

    #[test]
    fn classify_records_new_content_and_recognises_the_winner() {
        let a = ChunkListHash([1; 32]);
        let b = ChunkListHash([2; 32]);
        assert_eq!(classify(Some(&file(a)), None, 0, false), Decision::Record);
        let w = record(1, a, false);
        assert_eq!(
            classify(Some(&file(a)), Some(&w), 0, false),
            Decision::Same(1)
        );
        // A peer's setuid or setgid bits are not written here: the file is still the same.
        let mut suid = w.clone();
        suid.mode = 0o106_644;
        assert_eq!(
            classify(Some(&file(a)), Some(&suid), 0, false),
            Decision::Same(1)
        );
        assert_eq!(
            classify(Some(&file(b)), Some(&w), 1, false),
            Decision::Record
        );
        // Never had a version here, other content: not a successor, a conflict.
        assert_eq!(
            classify(Some(&file(b)), Some(&w), 0, false),
            Decision::Conflict
        );
        // A newer version (2) waits to be written over the version this device had (1): the
        // local edit must not supersede it.
        let newer = record(2, a, false);
        assert_eq!(
            classify(Some(&file(b)), Some(&newer), 1, false),
            Decision::Wait
        );
        // A deletion that is already the winner needs no new record.
        let deleted = record(1, ChunkListHash::default(), true);
        assert_eq!(classify(None, Some(&deleted), 1, false), Decision::Same(1));
        assert_eq!(classify(None, Some(&w), 1, false), Decision::Record);
        // A newer deletion (2, say a rename elsewhere) over the version this device edited (1):
        // the edit is recorded over the delete rather than waiting for a delete that keeps it.
        let deleted_later = record(2, ChunkListHash::default(), true);
        assert_eq!(
            classify(Some(&file(b)), Some(&deleted_later), 1, false),
            Decision::Record
        );
        // The winner touched here while versions stand concurrent with it: recorded anew (it
        // settles the conflict); a device that never had a version just takes the winner's.
        assert_eq!(
            classify(Some(&file(a)), Some(&w), 1, true),
            Decision::Record
        );
        assert_eq!(
            classify(Some(&file(a)), Some(&w), 0, true),
            Decision::Same(1)
        );
    }
}
