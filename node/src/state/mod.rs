//! The node's persisted state in one redb database (`HOME/state.redb`): which mesh it belongs
//! to, the membership log, its folders, each folder's index shards, chunk lists, what each
//! synced file looked like when last scanned or written, and peers' addresses.
//!
//! Everything a batch changes is written in one transaction, so a crash leaves the state as it
//! was before or after the batch, never between.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsync_crdt::index::ShardSummary;
use meshsync_crdt::{ChunkId, ChunkListHash, DeviceId, FolderId, MeshId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::chunks::ChunkRef;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// How the index in this home puts paths into shards (`meshsync_crdt::index::shard_of`):
/// 2 since shards follow folders. Kept in [`META`] under [`LAYOUT_KEY`].
pub const INDEX_LAYOUT: u32 = 2;
const LAYOUT_KEY: &str = "index-layout";
const FOLDERS: TableDefinition<&str, &str> = TableDefinition::new("folders");
const SHARDS: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("shards");
/// Pieces saved after a shard's whole save, by folder, shard and number (see
/// [`meshsync_crdt::SavedShard`]).
const SHARD_PIECES: TableDefinition<(&str, u16, u32), &[u8]> = TableDefinition::new("shard_pieces");
/// Each shard's heads and size as its whole save has them, written with that save and removed
/// by any later save of the shard (see [`meshsync_crdt::index::ShardSummary`]): a start leaves
/// a shard that has one unloaded, without reading its save.
const SHARD_SUMMARIES: TableDefinition<(&str, u16), &[u8]> =
    TableDefinition::new("shard_summaries");
const LISTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunk_lists");
const LOCAL: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("local_files");
/// The largest record of a local file [`State::named_records`] reads (a file of about two
/// hundred chunks): a bigger one is not decoded for an asker that names it.
pub const MAX_NAMED_RECORD: usize = 8 * 1024;
/// Where each chunk of each current file lies, for serving it and for reusing it when another
/// file is written: (chunk ID, folder root, path in the folder) → [`Placed`]. Kept here, not in
/// memory: at a million files the map in memory took ~600 bytes per file.
const PLACES: TableDefinition<PlaceKey, &[u8]> = TableDefinition::new("chunk_places");
/// (chunk ID, folder root, path in the folder).
type PlaceKey<'a> = (&'a [u8], &'a [u8], &'a str);
/// Sealed changes by (author, sequence number): a device's own (to push to storage peers), or
/// on a storage peer every member's.
const SEALED: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("sealed_changes");
/// On a storage peer: which writing member references each stored chunk, (chunk, author) →
/// nothing. A chunk is deleted on a signed release only when no author references it any more.
const CHUNK_REFS: TableDefinition<(&[u8], &[u8]), ()> = TableDefinition::new("chunk_refs");
/// Replaced and deleted file versions a device keeps restorable: (folder, path, version) →
/// the record and when it was replaced.
const VERSIONS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("versions");
/// Each folder's survey (what it needs and holds, see `device::survey`) as it was when saved:
/// a start takes it up from there instead of reading every shard of the index. Removed by
/// any commit that changes what the device holds in that folder, so one is only ever read
/// beside the local files it counted.
const SURVEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("saved_surveys");

/// Why the state database failed.
#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {reason}")]
pub struct StateError {
    pub path: PathBuf,
    pub reason: String,
}

/// What a synced path looked like when this node last scanned or wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFile {
    pub kind: meshsync_crdt::FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub chunks: Vec<ChunkRef>,
    /// The index version this local copy corresponds to.
    pub version: u64,
    pub list_hash: ChunkListHash,
}

impl LocalFile {
    /// The same without its chunk list, as `Folder::local` holds files (~90 bytes a file
    /// less; the list is in the state under `list_hash`, read when needed).
    pub fn without_chunks(&self) -> LocalFile {
        LocalFile {
            chunks: Vec::new(),
            ..*self
        }
    }

    /// A directory's local state (directories carry no content).
    pub fn directory(mode: u32, version: u64, list_hash: ChunkListHash) -> LocalFile {
        LocalFile {
            kind: meshsync_crdt::FileKind::Directory,
            size: 0,
            mtime_ns: 0,
            mode,
            chunks: vec![],
            version,
            list_hash,
        }
    }

    /// Whether this copy is the index's `winner` (same version and content).
    pub fn is(&self, winner: &meshsync_crdt::FileRecord) -> bool {
        self.version == winner.version && self.list_hash == winner.chunks
    }
}

/// Whether what this device holds at a path (`None`: nothing) is in sync with the index's
/// winning record there: the one definition `status`, catch-up and materialise share.
pub fn in_sync(local: Option<&LocalFile>, winner: &meshsync_crdt::FileRecord) -> bool {
    match local {
        Some(local) => local.is(winner),
        None => winner.deleted,
    }
}

/// A typed entry of the state's meta table: the key is named once, with the type stored under
/// it (postcard-encoded). Define one `const` per entry beside the code that owns it.
pub struct MetaKey<T> {
    name: &'static str,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> MetaKey<T> {
    pub const fn new(name: &'static str) -> Self {
        MetaKey {
            name,
            _type: std::marker::PhantomData,
        }
    }
}

/// The static addresses of the inviter this home joined through (dialed besides `peers`).
pub const PEER_ADDRS: MetaKey<Vec<String>> = MetaKey::new("peer_addrs");

/// Where one chunk lies in one current file, and the file's size and mtime when its chunks
/// were recorded (a file that no longer matches is not read from: its chunks may have moved).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub len: u32,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A chunk's place: the folder's root, the file's path in it, and where in the file.
pub type Place = (PathBuf, String, Placed);

/// Each folder's saved shards: each shard's whole save, then its pieces in order.
pub type ShardSaves = BTreeMap<FolderId, Vec<(u16, Vec<u8>)>>;

/// Everything loaded at start.
pub struct Loaded {
    pub mesh: Option<MeshId>,
    pub membership: Option<Vec<u8>>,
    pub folders: BTreeMap<FolderId, PathBuf>,
    /// Each folder's saved shards, not those in `summaries`.
    pub shards: ShardSaves,
    /// Each folder's shards whose save was not read: their summaries (their saves are read
    /// when the index needs them).
    pub summaries: BTreeMap<FolderId, Vec<(u16, ShardSummary)>>,
    pub local: BTreeMap<FolderId, BTreeMap<String, LocalFile>>,
    /// Each folder's saved survey, if it has one (see [`Batch::surveys`]).
    pub surveys: BTreeMap<FolderId, Vec<u8>>,
}

/// The state database; clones share it (the chunk server reads where chunks lie).
#[derive(Clone)]
pub struct State {
    path: PathBuf,
    db: Arc<Database>,
    /// Whether a commit that changed local files failed since the state was opened: the
    /// device's memory then holds files the state does not, and no survey is saved (it would
    /// count them).
    local_lost: Arc<std::sync::atomic::AtomicBool>,
    /// Chunk places committed and not yet folded into their table (see [`places`]).
    journal: Arc<places::Journal>,
}

impl State {
    pub fn open(home: &Path) -> Result<State, StateError> {
        let path = home.join("state.redb");
        let db = redb::Builder::new()
            .set_cache_size(crate::chunks::store::CACHE_BYTES)
            .create(&path)
            .map_err(|e| StateError {
                path: path.clone(),
                reason: format!("{e} (is another `meshsync up` running on this home?)"),
            })?;
        let mut state = State {
            path,
            db: Arc::new(db),
            local_lost: Default::default(),
            journal: Default::default(),
        };
        let txn = state.db.begin_write().map_err(|e| state.err(e))?;
        {
            txn.open_table(META).map_err(|e| state.err(e))?;
            txn.open_table(FOLDERS).map_err(|e| state.err(e))?;
            txn.open_table(SHARDS).map_err(|e| state.err(e))?;
            txn.open_table(SHARD_PIECES).map_err(|e| state.err(e))?;
            txn.open_table(SHARD_SUMMARIES).map_err(|e| state.err(e))?;
            txn.open_table(LISTS).map_err(|e| state.err(e))?;
            txn.open_table(LOCAL).map_err(|e| state.err(e))?;
            txn.open_table(PLACES).map_err(|e| state.err(e))?;
            txn.open_table(SEALED).map_err(|e| state.err(e))?;
            txn.open_table(VERSIONS).map_err(|e| state.err(e))?;
            txn.open_table(CHUNK_REFS).map_err(|e| state.err(e))?;
            txn.open_table(SURVEYS).map_err(|e| state.err(e))?;
            state.check_layout(&txn)?;
            state.journal = Arc::new(places::Journal::load(&txn).map_err(|e| state.err(e))?);
        }
        txn.commit().map_err(|e| state.err(e))?;
        Ok(state)
    }

    /// Checks that the index this home holds puts paths in shards the way this build does
    /// ([`INDEX_LAYOUT`]); a home with no index yet is marked as this build's.
    fn check_layout(&self, txn: &redb::WriteTransaction) -> Result<(), StateError> {
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let layout = meta
            .get(LAYOUT_KEY)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec());
        let empty = redb::ReadableTableMetadata::is_empty(
            &txn.open_table(SHARDS).map_err(|e| self.err(e))?,
        );
        match layout {
            Some(layout) if layout == INDEX_LAYOUT.to_le_bytes() => Ok(()),
            None if empty.map_err(|e| self.err(e))? => {
                meta.insert(LAYOUT_KEY, &INDEX_LAYOUT.to_le_bytes()[..])
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
            _ => Err(self.err(
                "this home's index was written by another version of meshsync, which puts \
                 files into index shards differently; its devices cannot sync with this one. \
                 Make a new home (`meshsync init`, then pair it again): the files in your \
                 folders are not touched",
            )),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The saves of one shard of `folder`'s index: its whole save, then its pieces in order.
    pub fn shard_saves(&self, folder: &FolderId, shard: u16) -> Result<Vec<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let whole = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
        let whole = whole
            .get((folder.as_str(), shard))
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(format!("shard {shard} of folder {folder} is not saved")))?;
        let mut saves = vec![whole.value().to_vec()];
        let pieces = txn.open_table(SHARD_PIECES).map_err(|e| self.err(e))?;
        let key = |n| (folder.as_str(), shard, n);
        for row in pieces
            .range(key(0)..=key(u32::MAX))
            .map_err(|e| self.err(e))?
        {
            saves.push(row.map_err(|e| self.err(e))?.1.value().to_vec());
        }
        Ok(saves)
    }

    /// What this device holds at `path` in `folder`, as last committed.
    pub fn local_file(
        &self,
        folder: &FolderId,
        path: &str,
    ) -> Result<Option<LocalFile>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LOCAL).map_err(|e| self.err(e))?;
        let Some(bytes) = table
            .get((folder.as_str(), path))
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        Ok(Some(
            postcard::from_bytes(bytes.value()).map_err(|e| self.err(e))?,
        ))
    }

    /// What this device holds at each of `paths` in `folder`, as last committed, in one read
    /// (in the order given: neighbouring paths, neighbouring rows). A record larger than
    /// [`MAX_NAMED_RECORD`] bytes is not read (`None`): a big file's chunk list, decoded for
    /// an asker that may name it again and again.
    pub fn named_records<'a>(
        &self,
        folder: &str,
        paths: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Option<LocalFile>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LOCAL).map_err(|e| self.err(e))?;
        let mut out: Vec<Option<LocalFile>> = Vec::new();
        let mut last = None;
        for path in paths {
            if last != Some(path) {
                let row = table.get((folder, path)).map_err(|e| self.err(e))?;
                let file = row
                    .filter(|row| row.value().len() <= MAX_NAMED_RECORD)
                    .and_then(|row| postcard::from_bytes::<LocalFile>(row.value()).ok());
                out.push(file);
            } else {
                out.push(out.last().cloned().flatten());
            }
            last = Some(path);
        }
        Ok(out)
    }

    /// What this device holds in `folder`, in path order from `from` on, handed to `each`
    /// until it says stop (`false`). Each call reads its own snapshot: a walk asks a folder at
    /// a time, so it never holds a copy of a million entries, nor an old snapshot for long.
    pub fn local_from(
        &self,
        folder: &FolderId,
        from: std::ops::Bound<&str>,
        each: &mut dyn FnMut(&str, LocalFile) -> bool,
    ) -> Result<(), StateError> {
        use std::ops::Bound;
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LOCAL).map_err(|e| self.err(e))?;
        let lower = match from {
            Bound::Included(path) => Bound::Included((folder.as_str(), path)),
            Bound::Excluded(path) => Bound::Excluded((folder.as_str(), path)),
            Bound::Unbounded => Bound::Included((folder.as_str(), "")),
        };
        let rows = table
            .range::<(&str, &str)>((lower, Bound::Unbounded))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (key, bytes) = row.map_err(|e| self.err(e))?;
            let (in_folder, path) = key.value();
            if in_folder != folder.as_str() {
                break;
            }
            let file: LocalFile = postcard::from_bytes(bytes.value()).map_err(|e| self.err(e))?;
            if !each(path, file) {
                break;
            }
        }
        Ok(())
    }

    /// What a folder's index reads its unloaded shards back with ([`Self::shard_saves`]).
    pub fn shard_loader(&self, folder: &FolderId) -> meshsync_crdt::index::ShardLoader {
        let (state, folder) = (self.clone(), folder.clone());
        Arc::new(move |shard| state.shard_saves(&folder, shard).map_err(|e| e.to_string()))
    }

    pub fn load(&self) -> Result<Loaded, StateError> {
        let e = |x: &dyn std::fmt::Display| self.err(x);
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let meta = txn.open_table(META).map_err(|x| e(&x))?;
        let mesh = match meta.get("mesh").map_err(|x| e(&x))? {
            Some(v) => {
                let bytes: [u8; 16] = v.value().try_into().map_err(|_| e(&"bad mesh id"))?;
                Some(MeshId::from_bytes(bytes))
            }
            None => None,
        };
        let membership = meta
            .get("membership")
            .map_err(|x| e(&x))?
            .map(|v| v.value().to_vec());
        let mut folders = BTreeMap::new();
        for row in txn
            .open_table(FOLDERS)
            .map_err(|x| e(&x))?
            .iter()
            .map_err(|x| e(&x))?
        {
            let (id, path) = row.map_err(|x| e(&x))?;
            let id = FolderId::new(id.value()).map_err(|x| e(&x))?;
            folders.insert(id, PathBuf::from(path.value()));
        }
        // A summarised shard's saves are read when the index needs it.
        let summaries = self.summaries(&txn)?;
        let shards = self.unsummarised_saves(&txn, &folders, &summaries)?;
        // Rows come in key order; collected, not inserted one by one, each folder's map is
        // built with full nodes (inserting in order leaves every node half empty: at a
        // million files, ~110 MB more).
        let mut local: BTreeMap<FolderId, Vec<(String, LocalFile)>> = BTreeMap::new();
        for row in txn
            .open_table(LOCAL)
            .map_err(|x| e(&x))?
            .iter()
            .map_err(|x| e(&x))?
        {
            let (key, bytes) = row.map_err(|x| e(&x))?;
            let (folder, path) = key.value();
            let folder = FolderId::new(folder).map_err(|x| e(&x))?;
            let file: LocalFile = postcard::from_bytes(bytes.value()).map_err(|x| e(&x))?;
            local
                .entry(folder)
                .or_default()
                .push((path.to_string(), file.without_chunks()));
        }
        let local = local
            .into_iter()
            .map(|(folder, files)| (folder, files.into_iter().collect()))
            .collect();
        let mut surveys = BTreeMap::new();
        let saved = txn.open_table(SURVEYS).map_err(|x| e(&x))?;
        for folder in folders.keys() {
            if let Some(bytes) = saved.get(folder.as_str()).map_err(|x| e(&x))? {
                surveys.insert(folder.clone(), bytes.value().to_vec());
            }
        }
        Ok(Loaded {
            mesh,
            membership,
            folders,
            shards,
            summaries,
            local,
            surveys,
        })
    }

    /// The saves of each folder's shards that have no summary: each shard's whole save, then
    /// its pieces in order. Each is read by its key: walking the tables would read every
    /// shard's save (at a million files, most of a start's reads were of saves it then
    /// skipped).
    fn unsummarised_saves(
        &self,
        txn: &redb::ReadTransaction,
        folders: &BTreeMap<FolderId, PathBuf>,
        summaries: &BTreeMap<FolderId, Vec<(u16, ShardSummary)>>,
    ) -> Result<ShardSaves, StateError> {
        let e = |x: &dyn std::fmt::Display| self.err(x);
        let summarised = |folder: &FolderId, shard: u16| {
            (summaries.get(folder))
                .is_some_and(|s| s.binary_search_by_key(&shard, |(id, _)| *id).is_ok())
        };
        let whole = txn.open_table(SHARDS).map_err(|x| e(&x))?;
        let pieces = txn.open_table(SHARD_PIECES).map_err(|x| e(&x))?;
        let mut shards = ShardSaves::new();
        for folder in folders.keys() {
            let mut saves = Vec::new();
            for shard in 0..meshsync_crdt::index::SHARDS {
                if summarised(folder, shard) {
                    continue;
                }
                let key = (folder.as_str(), shard);
                if let Some(bytes) = whole.get(key).map_err(|x| e(&x))? {
                    saves.push((shard, bytes.value().to_vec()));
                }
            }
            // Pieces come after every whole save, in key order: by shard, then by number.
            let shards_read: Vec<u16> = saves.iter().map(|(shard, _)| *shard).collect();
            for shard in shards_read {
                let key = |n| (folder.as_str(), shard, n);
                for row in pieces.range(key(0)..=key(u32::MAX)).map_err(|x| e(&x))? {
                    saves.push((shard, row.map_err(|x| e(&x))?.1.value().to_vec()));
                }
            }
            if !saves.is_empty() {
                shards.insert(folder.clone(), saves);
            }
        }
        Ok(shards)
    }

    /// The shards' summaries (each describes its shard's saves, whole and pieces), per folder,
    /// in shard order.
    fn summaries(
        &self,
        txn: &redb::ReadTransaction,
    ) -> Result<BTreeMap<FolderId, Vec<(u16, ShardSummary)>>, StateError> {
        let e = |x: &dyn std::fmt::Display| self.err(x);
        let mut summaries: BTreeMap<FolderId, Vec<(u16, ShardSummary)>> = BTreeMap::new();
        for row in txn
            .open_table(SHARD_SUMMARIES)
            .map_err(|x| e(&x))?
            .iter()
            .map_err(|x| e(&x))?
        {
            let (key, bytes) = row.map_err(|x| e(&x))?;
            let (folder, shard) = key.value();
            let folder = FolderId::new(folder).map_err(|x| e(&x))?;
            let (heads, len): (Vec<[u8; 32]>, u64) =
                postcard::from_bytes(bytes.value()).map_err(|x| e(&x))?;
            let summary = ShardSummary {
                heads: heads.into_iter().map(automerge::ChangeHash).collect(),
                len: usize::try_from(len).map_err(|x| e(&x))?,
            };
            summaries.entry(folder).or_default().push((shard, summary));
        }
        Ok(summaries)
    }

    /// The synced folders and their paths, without loading their index (for
    /// `meshsync service install`, which must name every folder the daemon may write).
    pub fn folders(&self) -> Result<BTreeMap<FolderId, PathBuf>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(FOLDERS).map_err(|e| self.err(e))?;
        let mut folders = BTreeMap::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (id, path) = row.map_err(|e| self.err(e))?;
            let id = FolderId::new(id.value()).map_err(|e| self.err(e))?;
            folders.insert(id, PathBuf::from(path.value()));
        }
        Ok(folders)
    }

    /// The chunk list stored under `hash`, if one is.
    pub fn chunk_list(&self, hash: &ChunkListHash) -> Result<Option<Vec<ChunkRef>>, StateError> {
        Ok(self.chunk_lists([hash])?.pop().map(|(_, list)| list))
    }

    /// The chunk lists stored under `hashes`, for each that is (one read transaction).
    pub fn chunk_lists<'a>(
        &self,
        hashes: impl IntoIterator<Item = &'a ChunkListHash>,
    ) -> Result<Vec<(ChunkListHash, Vec<ChunkRef>)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LISTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for hash in hashes {
            if let Some(bytes) = table.get(&hash.0[..]).map_err(|e| self.err(e))? {
                let list = postcard::from_bytes(bytes.value()).map_err(|e| self.err(e))?;
                out.push((*hash, list));
            }
        }
        Ok(out)
    }

    /// The value stored under `key`, or its default when none is.
    pub fn get<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: &MetaKey<T>,
    ) -> Result<T, StateError> {
        match self.meta(key.name)? {
            Some(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| self.err(format!("{}: {e}", key.name)))
            }
            None => Ok(T::default()),
        }
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// For each author, the highest sequence number held with every number before it (what
    /// a peer may ask for after); the number of sealed changes; their total size.
    pub fn sealed_summary(&self) -> Result<(BTreeMap<DeviceId, u64>, u64, u64), StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SEALED).map_err(|e| self.err(e))?;
        let (mut heads, mut count, mut bytes) = (BTreeMap::new(), 0, 0);
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            count += 1;
            bytes += value.value().len() as u64;
            let (author, seq) = key.value();
            let Ok(author) = <[u8; 32]>::try_from(author) else {
                continue;
            };
            let Ok(author) = DeviceId::from_bytes(author) else {
                continue;
            };
            // Keys come in order: the run from 1 grows only while there is no gap.
            let head = heads.entry(author).or_insert(0);
            if seq == *head + 1 {
                *head = seq;
            }
        }
        Ok((heads, count, bytes))
    }

    /// Notes that `author` references each of `ids` (a storage peer's bookkeeping).
    pub fn add_chunk_refs(&self, author: &DeviceId, ids: &[ChunkId]) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut refs = txn.open_table(CHUNK_REFS).map_err(|e| self.err(e))?;
            for id in ids {
                refs.insert((&id.0[..], &author.as_bytes()[..]), ())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Drops `author`'s references to `ids`; returns those no author references any more.
    pub fn drop_chunk_refs(
        &self,
        author: &DeviceId,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut unreferenced = Vec::new();
        {
            let mut refs = txn.open_table(CHUNK_REFS).map_err(|e| self.err(e))?;
            for id in ids {
                refs.remove((&id.0[..], &author.as_bytes()[..]))
                    .map_err(|e| self.err(e))?;
                let low: (&[u8], &[u8]) = (&id.0[..], &[][..]);
                let still = refs
                    .range(low..)
                    .map_err(|e| self.err(e))?
                    .next()
                    .transpose()
                    .map_err(|e| self.err(e))?
                    .is_some_and(|(key, _)| key.value().0 == &id.0[..]);
                if !still {
                    unreferenced.push(*id);
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(unreferenced)
    }

    pub fn has_sealed(&self, author: &DeviceId, seq: u64) -> Result<bool, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SEALED).map_err(|e| self.err(e))?;
        Ok(table
            .get((&author.as_bytes()[..], seq))
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// `author`'s sealed changes numbered `after + 1`, `after + 2`, … up to the first gap, up
    /// to about `max_bytes`.
    pub fn sealed_after(
        &self,
        author: &DeviceId,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SEALED).map_err(|e| self.err(e))?;
        let key = &author.as_bytes()[..];
        let mut out = Vec::new();
        let mut size = 0;
        let first = after.saturating_add(1);
        let rows = table
            .range((key, first)..=(key, u64::MAX))
            .map_err(|e| self.err(e))?;
        for (expected, row) in (first..).zip(rows) {
            let (k, value) = row.map_err(|e| self.err(e))?;
            let seq = k.value().1;
            if seq != expected {
                break;
            }
            size += value.value().len();
            out.push((seq, value.value().to_vec()));
            if size >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Every kept version of every path of `folder`: (path, version, encoded entry).
    pub fn versions(&self, folder: &FolderId) -> Result<Vec<(String, u64, Vec<u8>)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table
            .range((folder.as_str(), "", 0)..)
            .map_err(|e| self.err(e))?
        {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let (f, path, version) = key.value();
            if f != folder.as_str() {
                break;
            }
            out.push((path.to_string(), version, value.value().to_vec()));
        }
        Ok(out)
    }

    /// Forgets a folder at `root`: its path, shards, local file states and where its files'
    /// chunks lie.
    pub fn remove_folder(&self, id: &FolderId, root: &Path) -> Result<(), StateError> {
        let _writer = self.places_writer();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        self.fold_in(&txn)?;
        {
            let mut folders = txn.open_table(FOLDERS).map_err(|e| self.err(e))?;
            folders.remove(id.as_str()).map_err(|e| self.err(e))?;
            let mut shards = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            shards
                .retain_in((id.as_str(), 0)..=(id.as_str(), u16::MAX), |_, _| false)
                .map_err(|e| self.err(e))?;
            let mut pieces = txn.open_table(SHARD_PIECES).map_err(|e| self.err(e))?;
            pieces
                .retain_in(
                    (id.as_str(), 0, 0)..=(id.as_str(), u16::MAX, u32::MAX),
                    |_, _| false,
                )
                .map_err(|e| self.err(e))?;
            let mut summaries = txn.open_table(SHARD_SUMMARIES).map_err(|e| self.err(e))?;
            summaries
                .retain_in((id.as_str(), 0)..=(id.as_str(), u16::MAX), |_, _| false)
                .map_err(|e| self.err(e))?;
            let mut surveys = txn.open_table(SURVEYS).map_err(|e| self.err(e))?;
            surveys.remove(id.as_str()).map_err(|e| self.err(e))?;
            let root = root.as_os_str().as_bytes();
            let mut places = txn.open_table(PLACES).map_err(|e| self.err(e))?;
            places
                .retain(|(_, at, _), _| at != root)
                .map_err(|e| self.err(e))?;
            let mut local = txn.open_table(LOCAL).map_err(|e| self.err(e))?;
            let keys: Vec<String> = local
                .iter()
                .map_err(|e| self.err(e))?
                .filter_map(|row| row.ok())
                .filter(|(k, _)| k.value().0 == id.as_str())
                .map(|(k, _)| k.value().1.to_string())
                .collect();
            for path in keys {
                local
                    .remove((id.as_str(), path.as_str()))
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        self.note_places(places::Written::Folded);
        Ok(())
    }
}

mod commit;
mod places;
#[cfg(test)]
mod tests;

pub use commit::Batch;
