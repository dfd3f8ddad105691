//! A synced folder on this device: its replicated index, what this device holds of it on disk,
//! and what it could not do (deletions held back, paths no source could give). Adding,
//! removing and watching folders.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use meshsync_crdt::{DeviceKeys, FileKind, FolderId, FolderIndex, MembershipLog};

use super::serve::{ChunkMap, FileAt};
use super::survey::{Surveyed, Touched};
use super::Device;
use crate::disk::{DiskError, FolderRoot};
use crate::state::{Batch, LocalFile, State};

/// The marker file that proves a folder is really there (an unmounted disk has none).
pub const MARKER: &str = ".meshsync-folder";

/// Prefix of the temp files a device assembles incoming files in.
pub const TEMP_PREFIX: &str = ".meshsync-tmp-";

/// Whether the file `name` is a temp file another process made: left by a daemon that was
/// killed while writing (this process's own carry its PID; only one daemon runs on a home).
pub fn left_by_a_killed_daemon(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
        && !name.starts_with(&format!("{TEMP_PREFIX}{}-", std::process::id()))
}

/// How long deletions this device recorded count towards the mass-delete guard.
const DELETE_WINDOW: Duration = Duration::from_secs(60);

/// Deletions this device recorded in the last [`DELETE_WINDOW`]: the watcher may see a disk
/// going away, or a slow `rm -r`, in slices each too small to hold; the guard adds them up.
#[derive(Default)]
pub(crate) struct RecentDeletes(VecDeque<(Instant, usize)>);

impl RecentDeletes {
    /// How many deletions were recorded in the window before `now`.
    pub(crate) fn count(&mut self, now: Instant) -> usize {
        while let Some(&(at, _)) = self.0.front() {
            if now.saturating_duration_since(at) < DELETE_WINDOW {
                break;
            }
            self.0.pop_front();
        }
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub(crate) fn add(&mut self, now: Instant, deletes: usize) {
        if deletes > 0 {
            self.0.push_back((now, deletes));
        }
    }

    /// The user confirmed: what came before no longer counts.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

pub(crate) struct Folder {
    pub(crate) path: PathBuf,
    /// The same path, shared by every entry of the chunk map.
    shared_path: Arc<PathBuf>,
    pub(crate) index: FolderIndex,
    pub(crate) local: BTreeMap<String, LocalFile>,
    /// Deletions the mass-delete guard is holding back.
    pub(crate) held_deletes: usize,
    /// Deletions recorded lately, which the guard adds to a scan's own.
    pub(crate) recent_deletes: RecentDeletes,
    /// Paths the index wants whose content no source could give intact (never written).
    pub(crate) unavailable: BTreeSet<String>,
    /// Paths that could not be written on this device, and why (a parent that is a link or a
    /// file here, a name this file system refuses, …). Retried; never blocks the others.
    pub(crate) problems: BTreeMap<String, String>,
    /// Whether this device has anything to go by: an index it held when loaded, or a member
    /// that syncs this folder has answered with its changes since. Until then an empty folder
    /// is "waiting for another device", not "in sync".
    pub(crate) heard: bool,
    /// How many entries `local` had when it was last built whole (see
    /// [`Folder::compact_local`]).
    local_built: usize,
    /// How many regular files `local` holds (counted as it changes: `status` and the
    /// mass-delete guard ask often, and at a million files a count is milliseconds).
    files: usize,
    /// What [`Folder::survey`] last found, kept up to date path by path (see [`survey`]).
    pub(super) surveyed: Option<Surveyed>,
    /// Paths whose local state changed since the last survey.
    pub(super) touched: Touched,
    /// Whether the state holds the survey as it is (see [`Folder::save_survey`]).
    pub(super) survey_saved: bool,
    /// Whether the index took no change over the last compaction round (a second).
    was_quiet: bool,
    /// The index heads at the last round of [`compact_quiet_indexes`]: a shard whose
    /// heads are the same at the next was quiet in between.
    quiet_heads: Option<BTreeMap<u16, Vec<automerge::ChangeHash>>>,
    /// How many shards took changes in the last compaction round's second (see
    /// [`compact_quiet_indexes`]).
    changed_last_round: usize,
    /// How many whole scans of the folder are under way (see [`ScanUnderWay`]).
    scans: Arc<AtomicUsize>,
}

/// Held by a whole scan of a folder while it runs: the folder's index is neither compacted
/// nor unloaded meanwhile. Its slices each touch nearly every shard; at a million files the
/// walk stalled on files read from disk, the index went quiet, and the compaction rounds saved
/// its 1,024 shards whole (4,397 whole saves, ~4 per shard, in a 181 s scan, ~18 s of a core
/// and their writes beside the walk's reads) or unloaded them, only for the next slice to make
/// them loose again or load ~900 of them back (0.5–0.8 s a slice). The index holds more memory
/// until the scan ends (a loose shard ~3× a compact one). Not held by the watcher's targeted
/// rescans: they come often (one for each batch a first sync writes) and touch few shards;
/// holding the rounds off for them left a receiver's shards in pieces (its state 2,264 B a file
/// at 100k against ~1,350–1,620).
pub(crate) struct ScanUnderWay(Arc<AtomicUsize>);

impl ScanUnderWay {
    pub(crate) fn new(folder: &Folder) -> ScanUnderWay {
        folder.scans.fetch_add(1, Ordering::Relaxed);
        ScanUnderWay(folder.scans.clone())
    }
}

impl Folder {
    /// Whether a whole scan of the folder is under way (see [`ScanUnderWay`]).
    fn scan_under_way(&self) -> bool {
        self.scans.load(Ordering::Relaxed) > 0
    }
}

impl Drop for ScanUnderWay {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Folder {
    pub(super) fn new(
        path: PathBuf,
        index: FolderIndex,
        local: BTreeMap<String, LocalFile>,
    ) -> Folder {
        let heard = !index.is_empty();
        let files = local.values().filter(|l| is_file(Some(l))).count();
        let local_built = local.len();
        Folder {
            shared_path: Arc::new(path.clone()),
            path,
            index,
            local,
            held_deletes: 0,
            recent_deletes: RecentDeletes::default(),
            unavailable: BTreeSet::new(),
            problems: BTreeMap::new(),
            heard,
            local_built,
            files,
            surveyed: None,
            touched: Touched::default(),
            survey_saved: false,
            was_quiet: false,
            quiet_heads: None,
            changed_last_round: 0,
            scans: Arc::default(),
        }
    }

    /// Puts in `batch` what changed of the index's `shards` since their last saves, each with
    /// its summary: once [`Device::commit`] has committed them, such a shard can be unloaded
    /// as it is (no whole save first), and a start leaves it unloaded.
    pub(crate) fn save_shards(
        &mut self,
        id: &FolderId,
        shards: impl IntoIterator<Item = u16>,
        batch: &mut Batch,
    ) {
        let shards: BTreeSet<u16> = shards.into_iter().collect();
        for (shard, saved) in self.index.save_shards(&shards) {
            if let Some(summary) = self.index.summary(shard) {
                batch.summaries.push((id.clone(), shard, summary));
            }
            batch.shards.push((id.clone(), shard, saved));
        }
    }

    /// Records what this device now holds at `path` (`None`: nothing): in memory, and in
    /// `batch` with where its chunks lie (see [`ChunkMap`]).
    pub(crate) fn set_local(
        &mut self,
        id: &FolderId,
        map: &mut ChunkMap,
        batch: &mut Batch,
        path: String,
        file: Option<LocalFile>,
    ) {
        let old = self.local.get(&path);
        map.record(&self.file_at(&path), old, file.as_ref(), batch);
        let was_file = is_file(old);
        match &file {
            Some(file) => {
                self.local.insert(path.clone(), file.without_chunks());
            }
            None => {
                self.local.remove(&path);
            }
        }
        self.files = self.files + usize::from(is_file(file.as_ref())) - usize::from(was_file);
        if self.surveyed.is_some() {
            self.touched.add(&path);
        }
        // The commit of `batch` drops the saved survey.
        self.survey_saved = false;
        batch.local.push((id.clone(), path, file));
    }

    /// Builds `local` again, with full nodes and its paths copied, once it grew by a quarter
    /// since it was last built. A map filled one path at a time in path order (a first scan, a
    /// first sync) leaves each node half empty, ~110 bytes a file more; and its paths were
    /// allocated among the many short-lived allocations of that scan or sync, so once those
    /// are freed the paths pin their pages: at a million files a daemon sat at ~500 MB after
    /// its first scan and sync against ~250 MB after a restart. Copied together, the paths
    /// fill pages of their own and the old ones can go back to the system.
    pub(crate) fn compact_local(&mut self) {
        let len = self.local.len();
        if len < self.local_built.max(8_000) * 5 / 4 {
            return;
        }
        self.local = std::mem::take(&mut self.local)
            .into_iter()
            .map(|(path, file)| (path.as_str().to_owned(), file))
            .collect();
        self.local_built = len;
    }

    /// `rel` in this folder, for the chunk map.
    pub(crate) fn file_at(&self, rel: &str) -> FileAt {
        FileAt {
            root: self.shared_path.clone(),
            rel: rel.to_string(),
        }
    }

    /// The door to this folder's files (see [`crate::disk`]).
    pub(crate) fn root(&self) -> Result<FolderRoot, DiskError> {
        FolderRoot::open(&self.path)
    }

    /// How many regular files this device holds in the folder.
    pub(crate) fn file_count(&self) -> usize {
        self.files
    }
}

/// Whether `local` is a regular file.
fn is_file(local: Option<&LocalFile>) -> bool {
    local.is_some_and(|l| l.kind == FileKind::File)
}

/// Loads every folder of the state and fills the chunk map from what each holds (the temp
/// files a killed daemon left are removed by the whole scan that follows each folder's watcher,
/// see [`Device::watch`]).
pub(crate) fn load_all(
    state: &State,
    log: &MembershipLog,
    keys: &DeviceKeys,
    chunk_map: &Arc<StdMutex<ChunkMap>>,
) -> anyhow::Result<BTreeMap<FolderId, Folder>> {
    let mut loaded = state.load()?;
    let mut folders = BTreeMap::new();
    let fill_places = !state.has_places()?;
    let mut batch = Batch::default();
    for (id, path) in loaded.folders {
        let shards = loaded.shards.remove(&id).unwrap_or_default();
        let read: BTreeSet<u16> = shards.iter().map(|(shard, _)| *shard).collect();
        let mut index = FolderIndex::load(log.mesh(), id.clone(), shards)?
            .with_actor(meshsync_crdt::index::actor_for(&keys.device_id(), 0))
            .with_loader(state.shard_loader(&id));
        // Shards whose saves are summarised start unloaded: their saves are read when
        // something needs them (at a million files, loading every shard took seconds).
        index.start_unloaded(loaded.summaries.remove(&id).unwrap_or_default())?;
        // Shards read with no summary beside their saves (a home from before there were
        // summaries, or saved where none was kept): summarised now, for the next start.
        for shard in read {
            if let Some(summary) = index.summary(shard) {
                batch.summaries.push((id.clone(), shard, summary));
            }
        }
        let local = loaded.local.remove(&id).unwrap_or_default();
        let mut folder = Folder::new(path, index, local);
        if let Some(saved) = loaded.surveys.remove(&id) {
            folder.resume_survey(&saved);
            if folder.surveyed.is_some() {
                tracing::info!(folder = %id, "took up the saved survey (the index is not read whole)");
            }
        }
        // Link targets are served from memory; where files' chunks lie is in the state,
        // except in a state from before it was: filled in once from the local files.
        let mut map = chunk_map.lock().expect("chunk map lock");
        for (rel, file) in &folder.local {
            if fill_places || file.kind == meshsync_crdt::FileKind::Symlink {
                map.record(&folder.file_at(rel), None, Some(file), &mut batch);
            }
        }
        drop(map);
        folders.insert(id, folder);
    }
    state.commit(batch)?;
    Ok(folders)
}

impl Device {
    /// Adds a folder: `id` joins an existing mesh folder or creates a new one.
    /// Its watcher is set up in the background: what a caller scans should wait for
    /// [`Watching::ready`] first, or a change made meanwhile may go unseen until the next
    /// safety-net walk.
    pub(crate) fn add_folder(
        &mut self,
        path: &Path,
        id: Option<FolderId>,
    ) -> anyhow::Result<(FolderId, Watching)> {
        let path = std::fs::canonicalize(path).with_context(|| {
            format!(
                "{} does not exist; create it, or check the path",
                path.display()
            )
        })?;
        if !path.is_dir() {
            anyhow::bail!(
                "{} is not a folder; give the path of a directory to sync",
                path.display()
            );
        }
        let probe = path.join(".meshsync-probe");
        std::fs::write(&probe, b"")
            .with_context(|| format!("{} is not writable by this user; fix its permissions (the daemon writes synced files there)", path.display()))?;
        let _ = std::fs::remove_file(&probe);
        if self.folders.values().any(|f| f.path == path) {
            anyhow::bail!(
                "{} is already synced (see `meshsync folder list`)",
                path.display()
            );
        }
        let id = id.unwrap_or_else(FolderId::random);
        if self.folders.contains_key(&id) {
            anyhow::bail!("folder {id} is already on this device (see `meshsync folder list`); give another --id");
        }
        std::fs::write(path.join(MARKER), format!("meshsync folder {id}\n"))?;
        let index = FolderIndex::new(self.log.mesh(), id.clone())
            .with_actor(meshsync_crdt::index::actor_for(&self.keys.device_id(), 0))
            .with_loader(self.state.shard_loader(&id));
        self.state.commit(Batch {
            folders: vec![(id.clone(), path.clone())],
            ..Batch::default()
        })?;
        let watching = self.watch(&id, &path);
        self.folders
            .insert(id.clone(), Folder::new(path, index, BTreeMap::new()));
        // Changes to this folder that came through storage peers before it was added here.
        super::storage::replay(self, &id)?;
        Ok((id, watching))
    }

    /// Stops syncing a folder on this device (its files stay where they are).
    pub fn remove_folder(&mut self, id: &FolderId) -> anyhow::Result<PathBuf> {
        let folder = self.folders.remove(id).with_context(|| no_folder(id))?;
        self.state.remove_folder(id, &folder.path)?;
        // Its watcher goes with it (or, still being set up, is dropped once it is).
        self.watchers.lock().expect("watchers lock").remove(id);
        Ok(folder.path)
    }

    /// Watches a folder: sets its watcher up (changes outside `.meshsync*` files then trigger
    /// a debounced rescan of the folders they were in, of everything when the watcher lost
    /// track) on a thread of its own, and returns at once; [`Watching::ready`] says when it is
    /// there. The set-up walks the whole folder (at a million files, seconds), so it runs
    /// neither under the device lock, which every `status` and sync waits for, nor on the
    /// runtime's blocking pool, which a stopping daemon waits for (notify's walk cannot be
    /// interrupted).
    pub(crate) fn watch(&self, id: &FolderId, path: &Path) -> Watching {
        let (tx, watchers) = (self.changes.clone(), self.watchers.clone());
        watchers
            .lock()
            .expect("watchers lock")
            .insert(id.clone(), None);
        let (id, path) = (id.clone(), path.to_path_buf());
        let (done, ready) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("watch set-up".into());
        let spawned = thread.spawn(move || {
            let began = std::time::Instant::now();
            let watcher = watcher_for(tx, id.clone(), &path);
            // Kept only while the folder is: `remove_folder` may have come meanwhile.
            if let Some(slot) = watchers.lock().expect("watchers lock").get_mut(&id) {
                *slot = watcher;
            }
            tracing::debug!(path = %path.display(), took = ?began.elapsed(), "watcher set up");
            let _ = done.send(());
        });
        if let Err(error) = spawned {
            // `done` went with the closure: `ready` says "there" at once.
            tracing::warn!(%error, "cannot set up a watcher; relying on periodic scans");
        }
        Watching(ready)
    }

    /// Starts a round of compaction (see [`compact_quiet_indexes`]): for each folder, how
    /// many of its shards whose heads did not move since the last round may be compacted
    /// this round: [`COMPACT_SHARDS`] when the whole index was quiet; while changes stream
    /// in, as many quiet shards as took changes the round before (4 to 16).
    pub(crate) fn compaction_round(&mut self) -> CompactionRound {
        let mut round = CompactionRound::default();
        for (id, f) in self.folders.iter_mut() {
            if f.scan_under_way() {
                // Its next slice would make every shard loose again (see [`ScanUnderWay`]);
                // quiet is counted afresh once the scan is done.
                f.quiet_heads = None;
                continue;
            }
            let heads = f.index.heads();
            f.was_quiet = f.quiet_heads.as_ref() == Some(&heads);
            if let Some(quiet) = f.quiet_heads.take() {
                // While changes stream in, as many as took changes the round before (quiet
                // now, most of them): the index keeps pace with the stream without holding the
                // lock longer than that stream's own work did.
                let max = if quiet == heads {
                    COMPACT_SHARDS
                } else {
                    f.changed_last_round
                        .clamp(COMPACT_SHARDS_BUSY, COMPACT_SHARDS_BUSY_MAX)
                };
                f.changed_last_round = heads
                    .iter()
                    .filter(|(id, h)| quiet.get(id) != Some(h))
                    .count();
                round.folders.push((id.clone(), max, quiet));
            }
            f.quiet_heads = Some(heads);
            f.compact_local();
        }
        round
    }

    /// One step of a compaction round: loads again, from their saves, up to `step` of each
    /// folder's quiet shards (see [`FolderIndex::compact`]); the saves replace what the state
    /// held of those shards. Returns how many it compacted, and whether the round has more.
    pub(crate) fn compact_step(
        &mut self,
        round: &mut CompactionRound,
        step: usize,
    ) -> anyhow::Result<(usize, bool)> {
        let mut batch = Batch::default();
        for (id, left, quiet) in round.folders.iter_mut() {
            let Some(f) = self.folders.get_mut(id) else {
                *left = 0;
                continue;
            };
            let asked = step.min(*left);
            let compacted = f.index.compact_unchanged(asked, quiet)?;
            *left = if compacted.len() < asked {
                0
            } else {
                *left - asked
            };
            if !compacted.is_empty() {
                tracing::debug!(folder = %id, shards = compacted.len(), "compacted");
            }
            for (shard, saved) in compacted {
                // Kept beside the whole save: a start leaves the shard unloaded.
                if let Some(summary) = f.index.summary(shard) {
                    batch.summaries.push((id.clone(), shard, summary));
                }
                batch.shards.push((id.clone(), shard, saved));
            }
        }
        let compacted = batch.shards.len();
        self.commit(batch)?;
        let more = round.folders.iter().any(|(_, left, _)| *left > 0);
        Ok((compacted, more))
    }

    /// Commits `batch`; the shard saves in it are then persisted, and the index may unload
    /// those shards as they are. If the commit fails, their next saves are whole.
    pub(crate) fn commit(&mut self, batch: Batch) -> anyhow::Result<()> {
        let saved: Vec<(FolderId, u16)> = (batch.shards.iter())
            .map(|(id, shard, _)| (id.clone(), *shard))
            .collect();
        let committed = self.state.commit(batch);
        for (id, f) in self.folders.iter_mut() {
            let here = saved
                .iter()
                .filter(|(of, _)| of == id)
                .map(|(_, shard)| *shard);
            match committed {
                Ok(()) => f.index.confirm_saved(here),
                Err(_) => f.index.saves_lost(here),
            }
        }
        Ok(committed?)
    }

    /// Ends a compaction round that compacted `compacted` shards: unloads the shards nothing
    /// used since the last round, and once every index is compact again, gives freed pages
    /// back to the system.
    pub(crate) fn finish_compaction(&mut self, compacted: usize) {
        // A folder quiet for a round has its survey saved for the next start.
        let mut batch = Batch::default();
        for (id, f) in self.folders.iter_mut() {
            if !f.survey_saved && f.was_quiet && f.quiet_heads == Some(f.index.heads()) {
                f.save_survey(id, &mut batch);
            }
        }
        if let Err(error) = self.commit(batch) {
            tracing::warn!(error = format!("{error:#}"), "saving the survey failed");
        }
        let mut unloaded = 0;
        for f in self.folders.values_mut() {
            if !f.scan_under_way() {
                unloaded += f.index.unload_unused();
            }
        }
        if unloaded > 0 || compacted > 0 {
            let (loaded, loose) = (self.folders.values_mut())
                .map(|f| (f.index.loaded_shards(), f.index.loose_shards()))
                .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
            tracing::debug!(unloaded, loaded, loose, "index shards in memory");
            if loose == 0 {
                // Every index is compact again, after a first scan, a sync or a stream of
                // changes.
                give_back_memory();
            }
        }
    }

    /// Paths whose winning version is not on disk here yet, per folder.
    pub(crate) fn needs(&mut self) -> Vec<(FolderId, BTreeSet<String>)> {
        self.folders
            .iter_mut()
            .map(|(id, f)| (id.clone(), f.needs()))
            .filter(|(_, paths)| !paths.is_empty())
            .collect()
    }

    pub fn folder_list(&self) -> Vec<(FolderId, PathBuf)> {
        self.folders
            .iter()
            .map(|(id, f)| (id.clone(), f.path.clone()))
            .collect()
    }

    /// How many shards of the folders' indexes are in memory (the others are unloaded until
    /// something needs them, see `meshsync_crdt::index::cold`).
    pub fn index_shards_in_memory(&self) -> usize {
        self.folders.values().map(|f| f.index.loaded_shards()).sum()
    }

    /// The folder `id`, or an error that says how to list them.
    pub(crate) fn folder(&self, id: &FolderId) -> anyhow::Result<&Folder> {
        self.folders.get(id).with_context(|| no_folder(id))
    }
}

/// Adds a folder (see [`Device::add_folder`]) and returns once its watcher is set up, which
/// it waits for without the device lock: what is scanned from then on misses no change.
pub async fn add(
    device: &super::Shared,
    path: &Path,
    id: Option<FolderId>,
) -> anyhow::Result<FolderId> {
    let (id, watching) = device.lock().await.add_folder(path, id)?;
    watching.ready().await;
    Ok(id)
}

/// A folder's watcher being set up (see [`Device::watch`]).
pub(crate) struct Watching(tokio::sync::oneshot::Receiver<()>);

impl Watching {
    /// Returns once the watcher is there (or could not be set up: periodic scans stand in).
    pub(crate) async fn ready(self) {
        let _ = self.0.await;
    }
}

/// A watcher of the folder `id` at `path` (`None`: it cannot be watched; periodic scans still
/// see its changes): changes outside `.meshsync*` files send a rescan of the folders they were
/// in to `tx` (of everything when the watcher lost track: its queue overflowed). Setting it up
/// lists every folder in it (the vendored notify: no `stat` of each file, and no event for
/// each file opened; see `vendor/notify/PATCHES.md`).
pub(crate) fn watcher_for(
    tx: tokio::sync::mpsc::UnboundedSender<super::scan::Rescan>,
    id: FolderId,
    path: &Path,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let root = path.to_path_buf();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // The daemon's own files do not trigger a scan; the shared ignore rules do.
        let ours = event.paths.iter().all(|p| {
            p.strip_prefix(&root)
                .is_ok_and(|rel| super::ignore::is_own_file(&rel.to_string_lossy()))
        });
        if ours || matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let mut dirs = BTreeSet::new();
        for path in &event.paths {
            match path.strip_prefix(&root) {
                Ok(rel) => match rel.to_str() {
                    Some(rel) => dirs.insert(crate::disk::parent_of(rel).to_string()),
                    None => continue, // not UTF-8: never synced
                },
                Err(_) => dirs.insert(String::new()),
            };
        }
        let scope = match event.need_rescan() || dirs.is_empty() {
            true => super::scan::Scope::All,
            false => super::scan::Scope::Dirs(dirs),
        };
        let _ = tx.send(super::scan::Rescan {
            folder: id.clone(),
            scope,
        });
    };
    // Links inside the folder are synced as links: the watcher never follows one out.
    let config = notify::Config::default().with_follow_symlinks(false);
    match notify::RecommendedWatcher::new(handler, config) {
        Ok(mut watcher) => match watcher.watch(path, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(watcher),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot watch; relying on periodic scans");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "no file watcher; relying on periodic scans");
            None
        }
    }
}

/// How many shards of a folder's index one round compacts (at a million files ~4 ms each, on
/// every core; the 1,024 shards of an index that took a first sync in ~16 s)…
const COMPACT_SHARDS: usize = 64;
/// …this many at a time, the device lock let go of in between (see
/// [`compact_quiet_indexes`]).
pub(crate) const COMPACT_STEP: usize = 8;

/// One compaction round's work left: per folder, how many shards it may still compact, and
/// the heads its quiet shards must still have.
#[derive(Default)]
pub(crate) struct CompactionRound {
    folders: Vec<(FolderId, usize, BTreeMap<u16, Vec<automerge::ChangeHash>>)>,
}

/// A round of compaction: shards that took changes are saved whole and loaded again from
/// that save (an Automerge document that took changes holds about three times the memory of
/// the same loaded from its save), a few at a time, the device lock let go of between steps.
/// A step holds it ~30 ms at a million files. Holding it for the whole round (up to 64
/// shards, or the ~40 a 1,000-file change touches) made a change that came meanwhile wait
/// 0.2–0.6 s for its scan or its admission.
pub(crate) async fn compact_quiet_indexes(device: &super::Shared) -> anyhow::Result<()> {
    let mut round = device.lock().await.compaction_round();
    let mut compacted = 0;
    loop {
        let mut d = device.lock().await;
        let (done, more) = d.compact_step(&mut round, COMPACT_STEP)?;
        compacted += done;
        if !more {
            d.finish_compaction(compacted);
            return Ok(());
        }
    }
}

/// The fewest quiet shards one round compacts while other shards of the index take changes
/// (~8 ms of lock at a million files); more if more took changes the round before.
const COMPACT_SHARDS_BUSY: usize = 4;
/// …and the most (~30 ms of lock; 64, as when quiet, slowed a stream of 1,000-file changes at
/// a million files from 0.80 to 0.93 s each).
const COMPACT_SHARDS_BUSY_MAX: usize = 16;

/// Gives the system back the pages that a burst of work freed (mimalloc, the daemon's
/// allocator, keeps a thread's free pages until that thread allocates again: the shards a
/// compaction or a sync replaced were loaded on the rayon threads, idle afterwards). Each
/// thread can only collect its own: every rayon thread is asked, then this one. Harmless
/// under another allocator (the tests'): mimalloc then holds nothing to give back.
fn give_back_memory() {
    let collect = || {
        // SAFETY: `mi_collect` only walks the calling thread's own heap (and the process-wide
        // arenas, under mimalloc's own locks); it takes no pointer.
        unsafe { libmimalloc_sys::mi_collect(true) }
    };
    rayon::broadcast(|_| collect());
    collect();
}

/// The error for a folder ID this device does not sync.
pub(crate) fn no_folder(id: &FolderId) -> String {
    format!("no folder {id} on this device (see `meshsync folder list`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(device: &Device, id: &FolderId) -> Option<bool> {
        let watchers = device.watchers.lock().unwrap();
        watchers.get(id).map(|watcher| watcher.is_some())
    }

    /// While a whole scan of a folder is under way, its index shards stay in memory and are
    /// not compacted (its slices each touch nearly all of them); once it ends, quiet rounds
    /// compact and unload them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_under_way_keeps_its_index_loaded_and_uncompacted() {
        let dir = tempfile::tempdir().unwrap();
        let device = super::super::test_device(dir.path(), "a").await;
        let root = dir.path().join("F");
        for i in 0..200 {
            let sub = root.join(format!("d{}", i % 20));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join(format!("f{i}")), format!("file {i}")).unwrap();
        }
        let id = add(&device, &root, None).await.unwrap();
        let options = super::super::scan::ScanOptions {
            requested: true,
            ..Default::default()
        };
        let under_way = ScanUnderWay::new(device.lock().await.folder(&id).unwrap());
        super::super::scan::scan(&device, &id, options)
            .await
            .unwrap();
        // Every file edited and scanned again: its shards saved whole, then a piece.
        for i in 0..200 {
            let file = root.join(format!("d{}/f{i}", i % 20));
            std::fs::write(file, format!("file {i}, edited")).unwrap();
        }
        super::super::scan::scan(&device, &id, options)
            .await
            .unwrap();
        let state = device.lock().await.state.clone();
        let in_pieces = || {
            (0..meshsync_crdt::index::SHARDS)
                .filter(|s| {
                    state
                        .shard_saves(&id, *s)
                        .is_ok_and(|saves| saves.len() > 1)
                })
                .count()
        };
        let (loaded, pieced) = (device.lock().await.index_shards_in_memory(), in_pieces());
        assert!(pieced > 0, "no shard saved in pieces");
        for _ in 0..4 {
            compact_quiet_indexes(&device).await.unwrap();
        }
        assert_eq!(device.lock().await.index_shards_in_memory(), loaded);
        assert_eq!(
            in_pieces(),
            pieced,
            "compacted (saved whole) while the scan ran"
        );
        drop(under_way);
        // A few rounds: one to see the index quiet, then up to 64 shards each (the daemon's
        // own rounds run too).
        for _ in 0..50 {
            if in_pieces() == 0 && device.lock().await.index_shards_in_memory() == 0 {
                return;
            }
            compact_quiet_indexes(&device).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{} shards still in pieces, the index not unloaded",
            in_pieces()
        );
    }

    /// A folder is watched once `folder::add` returns, and no more once it is removed — also
    /// when the removal comes while its watcher is still being set up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_folder_is_watched_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let device = super::super::test_device(dir.path(), "a").await;
        let root = dir.path().join("F");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let id = add(&device, &root, None).await.unwrap();
        assert_eq!(watched(&*device.lock().await, &id), Some(true));
        device.lock().await.remove_folder(&id).unwrap();
        assert_eq!(watched(&*device.lock().await, &id), None);

        let watching = {
            let mut d = device.lock().await;
            let (id, watching) = d.add_folder(&root, Some(id.clone())).unwrap();
            d.remove_folder(&id).unwrap();
            watching
        };
        watching.ready().await;
        assert_eq!(watched(&*device.lock().await, &id), None);
    }
}
