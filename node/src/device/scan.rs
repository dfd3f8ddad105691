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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::index::{shard_of, FileUpdate};
use meshsync_crdt::keys::ChunkIdKey;
use meshsync_crdt::{ChunkListHash, FileKind, FileRecord, FolderId, MeshKey};

use super::conflict::conflict_name_for;
use super::folder::MARKER;
use super::ignore::{is_own_file, Rules, IGNORE_FILE};
use super::serve::unix_nanos;
use super::{sync, Device, Shared};
use crate::chunks::{content, ChunkRef};
use crate::disk::{parent_of, Entry, FolderRoot, Kind};
use crate::protocol::{ByteBuf, SyncChanges, SyncRequest};
use crate::state::{Batch, LocalFile};

/// Files modified more recently than this are still being written: they wait for a rescan.
pub const SETTLE: Duration = Duration::from_millis(40);

/// A file that was just emptied (a program rewriting it in place truncates it first) waits
/// this long before its empty state is believed: publishing it would give every other device
/// an empty "version" for a moment. Ordinary saves keep the [`SETTLE`] latency.
pub const TRUNCATE_SETTLE: Duration = Duration::from_secs(1);

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

/// One scanned path's new state (`file: None`: it is gone).
#[derive(Debug)]
pub struct Scanned {
    pub path: String,
    pub file: Option<LocalFile>,
    pub refs: Vec<ChunkRef>,
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Walked {
    pub changed: Vec<Scanned>,
    /// Some file was left for later because it is still being written: rescan after this.
    pub retry_after: Option<Duration>,
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
#[tracing::instrument(skip_all, fields(folder = %id))]
pub async fn scan(device: &Shared, id: &FolderId, options: ScanOptions) -> anyhow::Result<usize> {
    scan_in(device, id, options, Scope::All).await
}

/// Rescans the part of one folder `scope` names (see [`scan`]).
pub async fn scan_in(
    device: &Shared,
    id: &FolderId,
    options: ScanOptions,
    scope: Scope,
) -> anyhow::Result<usize> {
    let path = device.lock().await.folder(id)?.path.clone();
    // The folders a targeted scan lists, as they are on disk now (a gone one gives way to the
    // nearest ancestor still there).
    let scope = match scope {
        Scope::All => Scope::All,
        Scope::Dirs(dirs) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                Ok::<_, anyhow::Error>(Scope::Dirs(scope_dirs(&FolderRoot::open(&path)?, &dirs)))
            })
            .await??
        }
    };
    let (root, local, key) = {
        let d = device.lock().await;
        let f = d.folder(id)?;
        (f.path.clone(), local_in(&f.local, &scope), d.mesh_key()?)
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
    let walked = tokio::task::spawn_blocking(move || {
        walk(
            &FolderRoot::open(&root)?,
            &local,
            &id_key,
            wait_settle,
            &scope,
        )
    })
    .await??;
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
    let held = mass_delete_held(deletes, f.file_count(), options.allow_mass_delete);
    f.held_deletes = if held { deletes } else { 0 };
    let scanned: Vec<Scanned> = if held {
        tracing::warn!(
            deletes,
            files_here = f.file_count(),
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
    let count = scanned.len();
    if count == 0 {
        return Ok(0);
    }
    if let Some(push) = d.record_scan(id, scanned, &key)? {
        let storage = d.storage_peers().into_iter().collect();
        sync::push_to_devices(d.transport.clone(), storage, push);
    }
    Ok(count)
}

/// A rescan the watcher (or a scan that found a file still being written) asks for.
#[derive(Clone, Debug)]
pub struct Rescan {
    pub folder: FolderId,
    pub scope: Scope,
}

/// What a walk of `scope` compares against: all this device holds, or what it holds in and
/// under the scope's folders (not a copy of a million entries for a change of a few).
fn local_in(local: &BTreeMap<String, LocalFile>, scope: &Scope) -> BTreeMap<String, LocalFile> {
    let Scope::Dirs(dirs) = scope else {
        return local.clone();
    };
    if dirs.contains("") {
        return local.clone();
    }
    let mut out = BTreeMap::new();
    for dir in dirs {
        let below = format!("{dir}/");
        out.extend(
            local
                .range::<String, _>(below.clone()..)
                .take_while(|(rel, _)| rel.starts_with(&below))
                .map(|(rel, file)| (rel.clone(), file.clone())),
        );
    }
    out
}

/// Whether the guard holds back a scan's `deletes` in a folder of `files_here` files: at least
/// [`MASS_DELETE_MIN`] and more than half, unless the user allowed it.
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
        let mut same = Vec::new();
        let mut new = Vec::new();
        let mut concurrent = Vec::new();
        for scan in scanned {
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
        if !concurrent.is_empty() {
            keep_aside(&f.path, &concurrent, &self.keys.device_id());
            // The copies are recorded by a rescan.
            let _ = self.changes.send(Rescan {
                folder: id.clone(),
                scope: Scope::All,
            });
        }
        let (updates, new): (Vec<FileUpdate>, Vec<Scanned>) = new.into_iter().unzip();
        let records = f.index.write(&self.keys, epoch, updates)?;
        let mut batch = Batch::default();
        let mut map = self.chunk_map.lock().expect("chunk map lock");
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
            }
            let file = scan.file.map(|file| LocalFile {
                version: record.version,
                ..file
            });
            if let Some(file) = &file {
                batch.lists.push((file.list_hash, scan.refs));
            }
            f.set_local(id, &mut map, &mut batch, scan.path, file);
        }
        for (scan, version) in same {
            let file = scan.file.map(|file| LocalFile { version, ..file });
            f.set_local(id, &mut map, &mut batch, scan.path, file);
        }
        drop(map);
        let shards: BTreeSet<u16> = records.iter().map(|r| shard_of(id, &r.path)).collect();
        for shard in shards {
            if let Some(bytes) = f.index.save_shard(shard) {
                batch.shards.push((id.clone(), shard, bytes));
            }
        }
        let changes = f.index.take_local_changes();
        if changes.is_empty() {
            self.state.commit(batch)?;
            return Ok(None);
        }
        // The same changes, sealed for storage peers, with the chunk lists they name.
        let lists = batch.lists.clone();
        let mesh = self.log.mesh();
        self.sealing
            .seal(&self.keys, key, mesh, id, &changes, lists, &mut batch)?;
        // Sent along with the push for the other devices to forward, unless that makes it big
        // (they would get it from a storage peer, or never need it).
        let sealed_size: usize = batch.sealed.iter().map(|(_, _, b)| b.len()).sum();
        let sealed = if sealed_size <= crate::storage_client::SEAL_BUDGET {
            batch
                .sealed
                .iter()
                .map(|(_, _, b)| ByteBuf::from(b.clone()))
                .collect()
        } else {
            Vec::new()
        };
        self.state.commit(batch)?;
        Ok(Some(SyncRequest::Push(SyncChanges {
            membership: vec![],
            folders: vec![(id.clone(), changes)],
            heads: self.sealing.heads(),
            sealed,
        })))
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

/// Walks the folder; returns what changed since `local`, and whether some file was left for
/// later because it is still being written (only when `wait_settle`). Everything is read
/// through the folder's door: a link is recorded as a link, never followed.
pub fn walk(
    root: &FolderRoot,
    local: &BTreeMap<String, LocalFile>,
    id_key: &ChunkIdKey,
    wait_settle: bool,
    scope: &Scope,
) -> anyhow::Result<Walked> {
    let rules = Rules::load(root);
    let mut walked = Walked::default();
    let mut seen = BTreeSet::new();
    // Folders that could not be read: what this device had under them is not taken as deleted.
    let mut unreadable: Vec<String> = Vec::new();
    let (mut stack, only) = match scope {
        Scope::All => (vec![String::new()], false),
        Scope::Dirs(dirs) => (scope_dirs(root, dirs).into_iter().collect(), true),
    };
    // A targeted walk: each folder listed, with the names it holds and whether each is a folder.
    let mut listed: Vec<(String, BTreeMap<String, bool>)> = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    while let Some(dir) = stack.pop() {
        if !done.insert(dir.clone()) {
            continue;
        }
        let entries = match root.read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if !dir.is_empty() => {
                tracing::warn!(%dir, %error, "cannot read a folder; its files are left as they were");
                unreadable.push(format!("{dir}/"));
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if only {
            let names = entries
                .iter()
                .map(|(name, e)| (name.clone(), e.kind == Kind::Dir))
                .collect();
            listed.push((dir.clone(), names));
        }
        for (name, entry) in entries {
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let rules_not_a_file = rel == IGNORE_FILE && entry.kind != Kind::File;
            if is_own_file(&rel) || rules_not_a_file {
                // The daemon's own files (temp files come and go) are never synced; the
                // `.meshsync/` folder is entered only for the shared ignore rules.
                if rel == ".meshsync" && entry.kind == Kind::Dir {
                    stack.push(rel);
                }
                continue;
            }
            seen.insert(rel.clone());
            let is_dir = entry.kind == Kind::Dir;
            if rules.ignores(&rel, is_dir) {
                continue; // ignored: neither recorded nor deleted
            }
            // A targeted walk enters only folders this device did not know as folders: what
            // is under a known one did not change unless the watcher named it too.
            let known_dir = local
                .get(&rel)
                .is_some_and(|l| l.kind == FileKind::Directory);
            if is_dir && !(only && known_dir) {
                stack.push(rel.clone());
            }
            match examine(root, &rel, &entry, local.get(&rel), id_key, wait_settle)? {
                Examined::Unchanged => {}
                Examined::Unsettled(after) => {
                    walked.retry_after = Some(walked.retry_after.map_or(after, |a| a.min(after)));
                }
                Examined::Changed(file, refs) => walked.changed.push(Scanned {
                    path: rel,
                    file: Some(file),
                    refs,
                }),
            }
        }
    }
    let gone: Vec<&String> = match only {
        false => local.keys().filter(|rel| !seen.contains(*rel)).collect(),
        true => listed
            .iter()
            .flat_map(|(dir, names)| gone_under(local, dir, names))
            .collect(),
    };
    for rel in gone {
        let is_dir = local[rel].kind == FileKind::Directory;
        let under_unreadable = unreadable.iter().any(|dir| rel.starts_with(dir.as_str()));
        if !under_unreadable && !rules.ignores(rel, is_dir) && !is_own_file(rel) {
            walked.changed.push(Scanned {
                path: rel.clone(),
                file: None,
                refs: vec![],
            });
        }
    }
    Ok(walked)
}

/// Which part of a folder a scan looks at.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// All of it (the first scan, `meshsync scan`, the periodic safety net).
    #[default]
    All,
    /// These folders, by relative path ("" is the top), as the watcher named them: what each
    /// holds, and all of what is under a folder this device did not know as one. A million-file
    /// folder's change of a few files costs a listing of their folders, not a walk of it all.
    Dirs(BTreeSet<String>),
}

/// The folders of a targeted walk that are there: one that is gone (or is no longer a
/// folder) is replaced by its nearest ancestor that is, whose listing shows it gone.
fn scope_dirs(root: &FolderRoot, dirs: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in dirs {
        let mut dir = dir.as_str();
        while !dir.is_empty()
            && root
                .entry(dir)
                .ok()
                .flatten()
                .is_none_or(|e| e.kind != Kind::Dir)
        {
            dir = parent_of(dir);
        }
        out.insert(dir.to_string());
    }
    out
}

/// What this device held in `dir` that its listing (`names`: name → is a folder) no longer
/// shows: children not there, and everything under a child that is no longer a folder.
fn gone_under<'a>(
    local: &'a BTreeMap<String, LocalFile>,
    dir: &str,
    names: &BTreeMap<String, bool>,
) -> Vec<&'a String> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut gone = Vec::new();
    let mut from = prefix.clone();
    let mut include = true;
    loop {
        let lower = match include {
            true => Included(from.clone()),
            false => Excluded(from.clone()),
        };
        let Some((rel, _)) = local.range::<String, _>((lower, Unbounded)).next() else {
            break;
        };
        let Some(rest) = rel.strip_prefix(&prefix) else {
            break;
        };
        match rest.split_once('/') {
            None => {
                if !names.contains_key(rest) {
                    gone.push(rel);
                }
                (from, include) = (rel.clone(), false);
            }
            Some((child, _)) => {
                // Deeper: all of the child's subtree is gone if the child is not a folder now;
                // else it is the child's own listing's business.
                let child = format!("{prefix}{child}");
                let end = format!("{child}0"); // just past every "child/…"
                if names.get(&child[prefix.len()..]) != Some(&true) {
                    gone.extend(
                        local
                            .range::<String, _>((
                                Included(format!("{child}/")),
                                Excluded(end.clone()),
                            ))
                            .map(|(rel, _)| rel),
                    );
                }
                (from, include) = (end, true);
            }
        }
    }
    gone
}

/// What [`examine`] found at one path.
enum Examined {
    Unchanged,
    /// Still being written: left for a rescan after this long.
    Unsettled(Duration),
    Changed(LocalFile, Vec<ChunkRef>),
}

/// Looks at one entry against what this device last recorded there (`known`).
fn examine(
    root: &FolderRoot,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
    wait_settle: bool,
) -> anyhow::Result<Examined> {
    match entry.kind {
        Kind::Dir => {
            if known.is_some_and(|l| l.kind == FileKind::Directory) {
                return Ok(Examined::Unchanged);
            }
            // A real mtime, so a conflict copy of this folder is named by a real date.
            let dir = LocalFile {
                mtime_ns: entry.mtime_ns,
                ..LocalFile::directory(entry.mode, 0, ChunkListHash::default())
            };
            Ok(Examined::Changed(dir, vec![]))
        }
        Kind::Symlink => examine_link(root, rel, entry, known, id_key),
        Kind::File => examine_file(root, rel, entry, known, id_key, wait_settle),
        Kind::Other => Ok(Examined::Unchanged), // sockets, devices, fifos: not synced
    }
}

fn examine_file(
    root: &FolderRoot,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
    wait_settle: bool,
) -> anyhow::Result<Examined> {
    let age = unix_nanos(std::time::SystemTime::now()).saturating_sub(entry.mtime_ns);
    if wait_settle && (0..SETTLE.as_nanos() as i64).contains(&age) {
        // Still being written: recording it now would publish a torn version.
        return Ok(Examined::Unsettled(SETTLE));
    }
    let emptied = entry.len == 0 && known.is_some_and(|l| l.kind == FileKind::File && l.size > 0);
    if wait_settle && emptied && (0..TRUNCATE_SETTLE.as_nanos() as i64).contains(&age) {
        // Just truncated: most likely rewritten in place right now.
        let left = TRUNCATE_SETTLE.saturating_sub(Duration::from_nanos(age as u64));
        return Ok(Examined::Unsettled(left.max(SETTLE)));
    }
    let same = known.is_some_and(|l| {
        l.kind == FileKind::File
            && l.size == entry.len
            && l.mtime_ns == entry.mtime_ns
            && l.mode == entry.mode
    });
    if same {
        return Ok(Examined::Unchanged);
    }
    let Ok(file) = root.open_read(rel) else {
        return Ok(Examined::Unsettled(SETTLE)); // replaced meanwhile (by a link, or gone)
    };
    // A write in progress can keep mtime still while the size grows: if the file is not
    // exactly what it was when we started reading, it is not settled yet (checked after every
    // block, so a growing file costs one block, not a whole pass).
    let unchanged = || {
        file.metadata().is_ok_and(|now| {
            now.len() == entry.len && now.modified().map(unix_nanos).ok() == Some(entry.mtime_ns)
        })
    };
    let refs = content::chunk_file(&file, id_key, unchanged)?;
    let size: u64 = refs.iter().flatten().map(|c| u64::from(c.len)).sum();
    // …and the path must still name the file that was read (not one renamed over it).
    let after = root.entry(rel).ok().flatten();
    let replaced = after.is_none_or(|a| a.ino != entry.ino || a.mtime_ns != entry.mtime_ns);
    let Some(refs) = refs.filter(|_| size == entry.len && !replaced) else {
        return Ok(Examined::Unsettled(SETTLE));
    };
    let file = LocalFile {
        kind: FileKind::File,
        size,
        mtime_ns: entry.mtime_ns,
        mode: entry.mode,
        chunks: refs.clone(),
        version: 0,
        list_hash: content::chunk_list_hash(&refs),
    };
    Ok(Examined::Changed(file, refs))
}

/// A symlink is synced as a link, never followed: its content is the target path.
fn examine_link(
    root: &FolderRoot,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
) -> anyhow::Result<Examined> {
    let Ok(target) = root.read_link(rel) else {
        return Ok(Examined::Unsettled(SETTLE)); // replaced meanwhile
    };
    let refs = content::chunk_stream(&target[..], id_key, |_, _| {})?;
    let list_hash = content::chunk_list_hash(&refs);
    if known.is_some_and(|l| l.kind == FileKind::Symlink && l.list_hash == list_hash) {
        return Ok(Examined::Unchanged);
    }
    let link = LocalFile {
        kind: FileKind::Symlink,
        size: target.len() as u64,
        mtime_ns: entry.mtime_ns,
        mode: 0o777,
        chunks: refs.clone(),
        version: 0,
        list_hash,
    };
    Ok(Examined::Changed(link, refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshsync_crdt::{DeviceKeys, Epoch, FolderIndex, MeshId};

    fn id_key() -> ChunkIdKey {
        MeshKey::generate(Epoch(0)).chunk_id_key()
    }

    fn local_of(walked: &Walked) -> BTreeMap<String, LocalFile> {
        walked
            .changed
            .iter()
            .filter_map(|s| Some((s.path.clone(), s.file.clone()?)))
            .collect()
    }

    #[test]
    fn walk_finds_new_changed_and_gone_paths_and_skips_own_and_ignored_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join(MARKER), "m").unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join(".meshsync")).unwrap();
        std::fs::write(root.join(".meshsync/ignore"), "*.tmp\n").unwrap();
        std::fs::write(root.join(".meshsync/ignore.local"), "").unwrap();
        std::fs::write(root.join("sub/a.txt"), "hello").unwrap();
        std::fs::write(root.join("junk.tmp"), "x").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root.join("link")).unwrap();
        let key = id_key();
        let door = FolderRoot::open(root).unwrap();
        let first = walk(&door, &BTreeMap::new(), &key, false, &Scope::All).unwrap();
        let paths: BTreeSet<&str> = first.changed.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            BTreeSet::from([".meshsync/ignore", "sub", "sub/a.txt", "link"])
        );
        let link = first.changed.iter().find(|s| s.path == "link").unwrap();
        assert_eq!(link.file.as_ref().unwrap().kind, FileKind::Symlink);
        assert_eq!(link.file.as_ref().unwrap().size, "sub/a.txt".len() as u64);

        // Nothing changed: nothing to record.
        let local = local_of(&first);
        assert!(walk(&door, &local, &key, false, &Scope::All)
            .unwrap()
            .changed
            .is_empty());

        // An edit, a deletion.
        std::fs::write(root.join("sub/a.txt"), "hello, world").unwrap();
        std::fs::remove_file(root.join("link")).unwrap();
        let second = walk(&door, &local, &key, false, &Scope::All).unwrap();
        let edited = second
            .changed
            .iter()
            .find(|s| s.path == "sub/a.txt")
            .unwrap();
        assert_eq!(edited.file.as_ref().unwrap().size, 12);
        let gone = second.changed.iter().find(|s| s.path == "link").unwrap();
        assert!(gone.file.is_none());
        assert_eq!(second.changed.len(), 2);
    }

    /// What a walk reports, as (path, still there) pairs.
    fn changes(walked: &Walked) -> BTreeSet<(String, bool)> {
        walked
            .changed
            .iter()
            .map(|s| (s.path.clone(), s.file.is_some()))
            .collect()
    }

    #[test]
    fn a_walk_of_the_folders_the_watcher_named_finds_what_a_full_walk_finds_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a/deep", "b/deep", "c", "gone/inner", "was_dir"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "top.txt",
            "a/1",
            "a/deep/2",
            "b/3",
            "b/deep/4",
            "c/5",
            "c-x",
            "c.y",
            "c0",
            "gone/6",
            "gone/inner/7",
            "was_dir/8",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let (key, door) = (id_key(), FolderRoot::open(root).unwrap());
        let local = local_of(&walk(&door, &BTreeMap::new(), &key, false, &Scope::All).unwrap());

        // In "a": an edit, a new file, a new folder with a file; "gone" removed whole; "was_dir"
        // became a file; in "c": a file removed (its siblings c-x, c.y, c0 stay).
        std::fs::write(root.join("a/1"), "edited").unwrap();
        std::fs::write(root.join("a/new"), "n").unwrap();
        std::fs::create_dir_all(root.join("a/fresh/sub")).unwrap();
        std::fs::write(root.join("a/fresh/sub/9"), "9").unwrap();
        std::fs::remove_dir_all(root.join("gone")).unwrap();
        std::fs::remove_dir_all(root.join("was_dir")).unwrap();
        std::fs::write(root.join("was_dir"), "now a file").unwrap();
        std::fs::remove_file(root.join("c/5")).unwrap();
        // Changed too, but not named by the watcher: a targeted walk does not look there.
        std::fs::write(root.join("b/deep/4"), "unnamed").unwrap();

        let full = changes(&walk(&door, &local, &key, false, &Scope::All).unwrap());
        let named = Scope::Dirs(BTreeSet::from([
            "a".to_string(),
            "gone/inner".to_string(), // gone: its nearest ancestor there is listed instead
            "c".to_string(),
        ]));
        let targeted = changes(&walk(&door, &local, &key, false, &named).unwrap());
        let mut expected = full.clone();
        expected.remove(&("b/deep/4".to_string(), true));
        assert_eq!(targeted, expected);
        for change in [
            ("a/1", true),
            ("a/new", true),
            ("a/fresh/sub/9", true),
            ("gone", false),
            ("gone/6", false),
            ("gone/inner/7", false),
            ("was_dir", true),
            ("was_dir/8", false),
            ("c/5", false),
        ] {
            assert!(
                targeted.contains(&(change.0.to_string(), change.1)),
                "{change:?}"
            );
        }
        assert!(!targeted
            .iter()
            .any(|(p, _)| p.starts_with("c-") || p.starts_with("c.") || p == "c0"));
    }

    #[test]
    fn walk_leaves_a_file_just_written_for_later_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fresh.txt"), "x").unwrap();
        let key = id_key();
        let door = FolderRoot::open(dir.path()).unwrap();
        let waited = walk(&door, &BTreeMap::new(), &key, true, &Scope::All).unwrap();
        assert_eq!(waited.retry_after, Some(SETTLE));
        assert!(waited.changed.is_empty());
        let asked = walk(&door, &BTreeMap::new(), &key, false, &Scope::All).unwrap();
        assert_eq!(asked.retry_after, None);
        assert_eq!(asked.changed.len(), 1);
    }

    #[test]
    fn a_file_just_emptied_is_not_published_until_it_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let key = id_key();
        let door = FolderRoot::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("big.bin"), vec![7u8; 100_000]).unwrap();
        let first = walk(&door, &BTreeMap::new(), &key, false, &Scope::All).unwrap();
        let local = local_of(&first);
        // Rewritten in place: truncated first (the file is empty for a moment).
        std::fs::File::create(dir.path().join("big.bin")).unwrap();
        std::thread::sleep(SETTLE * 2); // older than an ordinary save's settle time
        let waited = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert!(waited.changed.is_empty(), "{:?}", waited.changed);
        let after = waited.retry_after.unwrap();
        assert!(after > SETTLE && after <= TRUNCATE_SETTLE, "{after:?}");
        // Still empty a second later: it really is empty now.
        std::thread::sleep(TRUNCATE_SETTLE);
        let later = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert_eq!(later.changed.len(), 1);
        assert_eq!(later.changed[0].file.as_ref().unwrap().size, 0);
        // An ordinary save is not held longer than before.
        std::fs::write(dir.path().join("small.txt"), "x").unwrap();
        std::thread::sleep(SETTLE * 2);
        let saved = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert!(saved.changed.iter().any(|s| s.path == "small.txt"));
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
