//! The file index of one folder: signed [`FileRecord`]s in many small Automerge documents.
//!
//! # Layout
//! A folder's index is split into [`SHARDS`] shards; each shard is its own Automerge document,
//! created on first write, whose root map holds `path -> record bytes`. A path's shard is
//! picked by its parent folder, then spread by its name over [`DIR_SHARDS`] neighbouring shards
//! ([`shard_of`]): the files of one folder, which are so often changed together (a build, a
//! checkout, a camera import), touch a few shards rather than one shard each, and a folder of
//! a hundred thousand files still fills four shards, not one.
//! A record is ~150 bytes: version, kind, size, mode, mtime, deleted flag, the hash of its chunk
//! list (the list itself lives outside Automerge, content-addressed), author, epoch and the
//! author's Ed25519 signature over all of that plus mesh ID, folder ID and path.
//!
//! Sharding is what makes the index scale: one Automerge document with a million keys is slow to
//! load and costly to merge into, while a thousand documents of a thousand keys each load in
//! parallel, take a peer's change by touching only the shards it names, and keep the cost of a
//! one-file change at one small Automerge change (a few hundred bytes).
//!
//! # Concurrency
//! A write that has seen the current value of a path replaces it; concurrent writes both stay
//! (Automerge keeps them as a conflict). [`FolderIndex::get`] returns a deterministic winner —
//! highest version, then latest mtime, then highest author ID — and the other versions as
//! losers for the node to keep as conflict copies. Versions with identical content are not
//! conflicts.
//!
//! # Admission
//! [`FolderIndex::apply`] checks every operation of every incoming change before any of it is
//! applied: it must put a record under its path in the right shard, signed by a device that may
//! write in the record's epoch, for this mesh and folder, with a version higher than every value
//! it replaces. One bad operation refuses its change (and what depends on it, which waits for
//! it in vain); the rest of the batch is applied.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{transaction::Transactable, ActorId, AutoCommit, ChangeHash, ReadDoc, ROOT};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, Epoch, FolderId, MeshId};
use crate::keys::{verify_by, DeviceKeys, Signature};
use crate::membership::MembershipView;

/// Shards per folder. Fixed, so every replica puts a path in the same shard.
pub const SHARDS: u16 = 1024;
/// The shards the entries of one folder (directory) are spread over.
pub const DIR_SHARDS: u16 = 4;
/// The most records one Automerge change of one shard holds (and at most a quarter of
/// [`MAX_CHANGE_BYTES`] of paths and records): a write of more — a first scan of a huge folder,
/// a device's own records written again after a cutoff — is split, so every change stays far
/// within what peers accept ([`MAX_OPS_PER_CHANGE`], [`MAX_CHANGE_BYTES`]).
pub const MAX_RECORDS_PER_CHANGE: usize = 20_000;
const SIGNING_CONTEXT: &str = "meshsync file record v1";
/// The largest encoded change the index accepts (a batch of many records is still far below).
pub const MAX_CHANGE_BYTES: usize = 16 * 1024 * 1024;
/// The most operations one shard change from a peer may hold (a shard holds about a
/// thousand paths at a million files; a first scan writes each once).
pub const MAX_OPS_PER_CHANGE: usize = 200_000;
const MAX_PATH_BYTES: usize = 4096;

/// What kind of entry a path is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

/// The BLAKE3 hash of a file's chunk list (kept outside the index, content-addressed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct ChunkListHash(pub [u8; 32]);

impl std::fmt::Debug for ChunkListHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChunkListHash({})",
            data_encoding::HEXLOWER.encode(&self.0[..6])
        )
    }
}

/// What a device says about one path when it writes: the content of a new version.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FileUpdate {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub deleted: bool,
    pub chunks: ChunkListHash,
}

impl From<&FileRecord> for FileUpdate {
    /// The same content, to write again as a new version.
    fn from(r: &FileRecord) -> Self {
        FileUpdate {
            path: r.path.clone(),
            kind: r.kind,
            size: r.size,
            mode: r.mode,
            mtime_ns: r.mtime_ns,
            deleted: r.deleted,
            chunks: r.chunks,
        }
    }
}

/// One signed version of one path.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FileRecord {
    pub path: String,
    pub version: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub deleted: bool,
    pub chunks: ChunkListHash,
    pub author: DeviceId,
    pub epoch: Epoch,
    pub signature: Signature,
}

impl FileRecord {
    /// Whether two versions have the same content (and so are no conflict).
    pub fn same_content(&self, other: &FileRecord) -> bool {
        self.kind == other.kind
            && self.deleted == other.deleted
            && self.size == other.size
            && self.mode == other.mode
            && self.chunks == other.chunks
    }

    fn sort_key(&self) -> (u64, i64, DeviceId, ChunkListHash) {
        (self.version, self.mtime_ns, self.author, self.chunks)
    }

    /// Checks the author's signature over this record in `mesh` and `folder`.
    pub fn verify(&self, mesh: &MeshId, folder: &FolderId) -> Result<(), IndexError> {
        let key = self
            .author
            .verifying_key()
            .map_err(|_| self.bad_signature())?;
        self.verify_by(&key, mesh, folder)
    }

    /// [`FileRecord::verify`] with the author's key already decompressed (`key` must be
    /// `self.author`'s): a change's records are all its signer's.
    pub(crate) fn verify_by(
        &self,
        key: &ed25519_dalek::VerifyingKey,
        mesh: &MeshId,
        folder: &FolderId,
    ) -> Result<(), IndexError> {
        debug_assert_eq!(key.as_bytes(), self.author.as_bytes());
        verify_by(
            key,
            SIGNING_CONTEXT,
            &signed_bytes(mesh, folder, &self.path, &self.stored_fields()),
            &self.signature,
        )
        .map_err(|_| self.bad_signature())
    }

    fn bad_signature(&self) -> IndexError {
        IndexError::BadSignature {
            path: self.path.clone(),
            author: self.author,
        }
    }

    fn stored_fields(&self) -> Fields {
        Fields {
            version: self.version,
            kind: self.kind,
            size: self.size,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            deleted: self.deleted,
            chunks: self.chunks,
            author: self.author,
            epoch: self.epoch,
        }
    }

    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&Stored {
            fields: self.stored_fields(),
            signature: self.signature,
        })
        .expect("records always encode")
    }

    fn decode(path: &str, bytes: &[u8]) -> Result<Self, IndexError> {
        let stored: Stored = postcard::from_bytes(bytes).map_err(|e| IndexError::Malformed {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let f = stored.fields;
        Ok(FileRecord {
            path: path.to_string(),
            version: f.version,
            kind: f.kind,
            size: f.size,
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            deleted: f.deleted,
            chunks: f.chunks,
            author: f.author,
            epoch: f.epoch,
            signature: stored.signature,
        })
    }
}

/// The signed fields of a record; path, folder and mesh are signed too but stored implicitly.
#[derive(Serialize, Deserialize)]
struct Fields {
    version: u64,
    kind: FileKind,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    deleted: bool,
    chunks: ChunkListHash,
    author: DeviceId,
    epoch: Epoch,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    fields: Fields,
    signature: Signature,
}

fn signed_bytes(mesh: &MeshId, folder: &FolderId, path: &str, fields: &Fields) -> Vec<u8> {
    postcard::to_stdvec(&(mesh, folder, path, fields)).expect("records always encode")
}

/// The state of one path: the version that wins, and concurrent versions that lost.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PathState {
    pub winner: FileRecord,
    /// Concurrent versions with other content, to keep as conflict copies. Sorted.
    pub losers: Vec<FileRecord>,
}

/// One Automerge change to one shard, as it travels between devices.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ShardChange {
    pub shard: u16,
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
    /// The signature of the device the change's actor names (see [`signed`]).
    pub signature: Signature,
}

impl ShardChange {
    /// About how many bytes it takes in a message (the change and its signature).
    pub fn size(&self) -> usize {
        self.change.len() + 64
    }
}

/// Encodes a batch of shard changes of one folder (the plaintext of a sealed index change).
pub fn encode_changes(folder: &FolderId, changes: &[ShardChange]) -> Vec<u8> {
    postcard::to_stdvec(&(folder, changes)).expect("changes always encode")
}

/// Inverse of [`encode_changes`].
pub fn decode_changes(bytes: &[u8]) -> Result<(FolderId, Vec<ShardChange>), IndexError> {
    if bytes.len() > MAX_CHANGE_BYTES {
        return Err(IndexError::TooLarge(bytes.len()));
    }
    let (folder, changes): (FolderId, Vec<ShardChange>) =
        postcard::from_bytes(bytes).map_err(|e| IndexError::Malformed {
            path: String::new(),
            reason: e.to_string(),
        })?;
    let folder = FolderId::new(folder.as_str()).map_err(|e| IndexError::Malformed {
        path: String::new(),
        reason: e.to_string(),
    })?;
    Ok((folder, changes))
}

/// Why the index refused something.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("record for {path:?} could not be decoded: {reason}")]
    Malformed { path: String, reason: String },
    #[error("record for {path:?} has a bad signature (claims author {author:?})")]
    BadSignature { path: String, author: DeviceId },
    #[error("change {change} is not signed by the device its actor names")]
    BadChangeSignature { change: String },
    #[error("record for {path:?} is by {author:?}, but the change putting it is {signer:?}'s")]
    NotTheSigner {
        path: String,
        author: DeviceId,
        signer: DeviceId,
    },
    #[error("device {device} signed two different changes numbered {seq} in one shard (its keys may be in someone else's hands: remove it); the one with the lower hash is kept")]
    Equivocation { device: String, seq: u64 },
    #[error("change {change} of removed device {device:?} comes after its cutoff")]
    PastCutoff { device: DeviceId, change: String },
    #[error("record for {path:?} is by {author:?}, who may not write in epoch {epoch}")]
    NotAWriter {
        path: String,
        author: DeviceId,
        epoch: Epoch,
    },
    #[error("record for {path:?} has version {version}, not above the version {replaced} it replaces (a replay?)")]
    StaleVersion {
        path: String,
        version: u64,
        replaced: u64,
    },
    #[error("record for {path:?} has version {version}, above the {most} any honest author could reach (a jump)")]
    VersionJump {
        path: String,
        version: u64,
        most: u64,
    },
    #[error("path {0:?} has reached the highest version number")]
    VersionsExhausted(String),
    #[error("change holds an operation the index does not allow: {0}")]
    ForbiddenOp(String),
    #[error("path {0:?} is not a valid relative path")]
    BadPath(String),
    #[error("shard {0} does not exist")]
    BadShard(u16),
    #[error("change of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("index document is damaged: {0}")]
    Document(#[from] automerge::AutomergeError),
    #[error("saved shard could not be loaded: {0}")]
    Load(String),
}

/// What an [`FolderIndex::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Paths whose state may have changed.
    pub paths: BTreeSet<String>,
    /// Shards that received changes.
    pub shards: usize,
    /// Changes left out, and why (see [`FolderIndex::apply`]).
    pub refused: Vec<IndexError>,
    /// Changes taken out again: the twin that lost (see [`FolderIndex::apply`]).
    pub dropped: Dropped,
}

/// How far a record's version may run ahead of the versions this replica knows of its path
/// (see [`FolderIndex::apply`]).
pub const MAX_VERSION_SLACK: u64 = 1 << 32;

/// The one path under the reserved `.meshsync*` names that records may name: the folder's
/// shared ignore rules (a regular file).
pub const SHARED_RULES_PATH: &str = ".meshsync/ignore";

/// Checks that a path is relative, normalised, names no parent, and names none of the
/// daemon's own files: every component starting with `.meshsync` is reserved (the folder
/// marker, temp files, this device's local rules), except [`SHARED_RULES_PATH`].
pub fn validate_path(path: &str) -> Result<(), IndexError> {
    let reserved =
        path != SHARED_RULES_PATH && path.split('/').any(|part| part.starts_with(".meshsync"));
    let ok = !path.is_empty()
        && path.len() <= MAX_PATH_BYTES
        && !path.starts_with('/')
        && !path.contains('\0')
        && !reserved
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(IndexError::BadPath(path.to_string()))
    }
}

/// The Automerge actor a device writes its index changes as.
///
/// A device keeps one actor for as long as its database lives: the first change from an actor
/// that a shard has never seen costs that shard a re-encoding (and memory), so a fresh random
/// actor per start would make every restart expensive for every peer. `incarnation` must change
/// whenever the database is lost or restored from a backup, so that a device never reuses
/// sequence numbers its peers already hold.
pub fn actor_for(device: &DeviceId, incarnation: u32) -> ActorId {
    let mut bytes = device.as_bytes().to_vec();
    bytes.extend_from_slice(&incarnation.to_be_bytes());
    ActorId::from(bytes)
}

/// The shard a path of `folder` lives in: one of the [`DIR_SHARDS`] neighbouring shards its
/// parent folder's name picks, by its own name (see "Layout" above).
pub fn shard_of(folder: &FolderId, path: &str) -> u16 {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let pick = |what: u8, part: &str| -> u16 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(folder.as_str().as_bytes());
        hasher.update(&[0, what]);
        hasher.update(part.as_bytes());
        let hash = hasher.finalize();
        u16::from_le_bytes([hash.as_bytes()[0], hash.as_bytes()[1]])
    };
    let first = pick(0, dir) % SHARDS;
    (first + pick(1, name) % DIR_SHARDS) % SHARDS
}

struct Shard {
    doc: AutoCommit,
    /// Heads at the last [`FolderIndex::take_local_changes`].
    sent: Vec<ChangeHash>,
    /// Each change's signature (see [`signed`]).
    signatures: std::collections::HashMap<ChangeHash, Signature>,
    /// What was last saved of it (`None`: the next save is whole; see [`SavedShard`]).
    saved: Option<SaveMark>,
    /// The heads it had when it was last loaded from a whole save: changed since, it takes
    /// more memory than it needs (see [`FolderIndex::compact`]).
    compact_heads: Vec<ChangeHash>,
    /// The heads of its last save (whole or piece) that the caller confirmed persisted (see
    /// [`FolderIndex::confirm_saved`]): only while they are its heads may it be unloaded.
    durable: Option<Vec<ChangeHash>>,
    /// Whether it was used since the last [`FolderIndex::unload_unused`].
    used: bool,
    /// How many rounds in a row (calls of [`FolderIndex::unload_unused`]) found it used.
    busy_rounds: u8,
}

impl Shard {
    fn outgoing(&self, id: u16, change: &automerge::Change) -> Option<ShardChange> {
        Some(ShardChange {
            shard: id,
            change: change.raw_bytes().to_vec(),
            signature: *self.signatures.get(&change.hash())?,
        })
    }
}

/// The index of one folder on one replica.
pub struct FolderIndex {
    mesh: MeshId,
    folder: FolderId,
    actor: ActorId,
    /// The shards in memory…
    shards: BTreeMap<u16, Shard>,
    /// …and those unloaded, read back from their saves when needed (see [`cold`]).
    cold: BTreeMap<u16, cold::Cold>,
    loader: Option<cold::ShardLoader>,
    /// Peers' changes whose dependencies have not arrived (see [`FolderIndex::apply`]).
    held: Vec<admit::Admitted>,
}

impl FolderIndex {
    pub fn new(mesh: MeshId, folder: FolderId) -> Self {
        FolderIndex {
            mesh,
            folder,
            actor: ActorId::random(),
            shards: BTreeMap::new(),
            cold: BTreeMap::new(),
            loader: None,
            held: Vec::new(),
        }
    }

    /// Makes this replica write as `actor` (see [`actor_for`]).
    pub fn with_actor(mut self, actor: ActorId) -> Self {
        for shard in self.shards.values_mut() {
            shard.doc.set_actor(actor.clone());
        }
        self.actor = actor;
        self
    }

    pub fn folder(&self) -> &FolderId {
        &self.folder
    }

    pub fn mesh(&self) -> MeshId {
        self.mesh
    }

    fn shard_mut(&mut self, shard: u16) -> &mut Shard {
        let actor = &self.actor;
        self.shards.entry(shard).or_insert_with(|| Shard {
            doc: AutoCommit::new().with_actor(actor.clone()),
            sent: Vec::new(),
            signatures: Default::default(),
            saved: None,
            compact_heads: Vec::new(),
            durable: None,
            used: true,
            busy_rounds: 0,
        })
    }

    /// The current state of `path`, if it has a record. A path of an unloaded shard is read
    /// from its save, which is slow and, if the save cannot be read, says `None`: a caller
    /// that looks up many paths, or acts on a path having no record, calls
    /// [`FolderIndex::warm`] first (which reports that failure).
    pub fn get(&self, path: &str) -> Option<PathState> {
        let id = shard_of(&self.folder, path);
        match self.shards.get(&id) {
            Some(shard) => path_state(&shard.doc, path),
            None if self.cold.contains_key(&id) => path_state(&self.read_cold(id).ok()?.doc, path),
            None => None,
        }
    }

    /// Every path with a record, with its state, in no particular order; unloaded shards are
    /// read from their saves one at a time (and not kept).
    ///
    /// One pass over each shard's map: only a path with concurrent values is looked up again
    /// for all of them (a lookup per path made `status` and the catch-up walk cost a search of
    /// the shard for every file).
    pub fn iter(&self) -> impl Iterator<Item = Result<(String, PathState), IndexError>> + '_ {
        let loaded = self
            .shards
            .values()
            .flat_map(|shard| shard_paths(&shard.doc).map(Ok));
        let unloaded = self.cold.keys().flat_map(|&id| match self.read_cold(id) {
            Ok(shard) => shard_paths(&shard.doc).map(Ok).collect::<Vec<_>>(),
            Err(error) => vec![Err(error)],
        });
        loaded.chain(unloaded)
    }

    /// Number of paths with a record (deleted ones included).
    pub fn len(&self) -> usize {
        let loaded: usize = self.shards.values().map(|s| s.doc.length(ROOT)).sum();
        loaded + self.cold.values().map(|c| c.len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Paths with concurrent versions of different content.
    pub fn conflicts(&self) -> Result<Vec<PathState>, IndexError> {
        let mut out = Vec::new();
        for item in self.iter() {
            let (_, state) = item?;
            if !state.losers.is_empty() {
                out.push(state);
            }
        }
        out.sort_by(|a, b| a.winner.path.cmp(&b.winner.path));
        Ok(out)
    }

    /// Signs and records new versions of paths, written by `keys` in `epoch` (as the actor
    /// [`actor_for`] gives `keys`' device, incarnation 0, unless [`FolderIndex::with_actor`]
    /// set one of that device). Signing runs on every core; each touched shard gets one
    /// Automerge change, signed too.
    pub fn write(
        &mut self,
        keys: &DeviceKeys,
        epoch: Epoch,
        updates: Vec<FileUpdate>,
    ) -> Result<Vec<FileRecord>, IndexError> {
        for update in &updates {
            validate_path(&update.path)?;
            if update.path == SHARED_RULES_PATH && !update.deleted && update.kind != FileKind::File
            {
                return Err(IndexError::ForbiddenOp(format!(
                    "{SHARED_RULES_PATH:?} may only be a regular file"
                )));
            }
        }
        let author = keys.device_id();
        if actor_device(&self.actor).map(|(d, _)| d) != Some(author) {
            let actor = actor_for(&author, 0);
            for shard in self.shards.values_mut() {
                shard.doc.set_actor(actor.clone());
            }
            self.actor = actor;
        }
        self.warm(updates.iter().map(|u| u.path.as_str()))?;
        let records: Vec<FileRecord> = updates
            .into_par_iter()
            .map(|u| {
                let highest = self.get_all(&u.path).iter().map(|r| r.version).max();
                let version = highest
                    .unwrap_or(0)
                    .checked_add(1)
                    .ok_or_else(|| IndexError::VersionsExhausted(u.path.clone()))?;
                let mut record = FileRecord {
                    path: u.path,
                    version,
                    kind: u.kind,
                    size: u.size,
                    mode: u.mode,
                    mtime_ns: u.mtime_ns,
                    deleted: u.deleted,
                    chunks: u.chunks,
                    author,
                    epoch,
                    signature: Signature::from_bytes(&[0; 64]),
                };
                let bytes = signed_bytes(
                    &self.mesh,
                    &self.folder,
                    &record.path,
                    &record.stored_fields(),
                );
                record.signature = keys.sign(SIGNING_CONTEXT, &bytes);
                Ok(record)
            })
            .collect::<Result<_, IndexError>>()?;
        let mut by_shard: BTreeMap<u16, Vec<&FileRecord>> = BTreeMap::new();
        for record in &records {
            by_shard
                .entry(shard_of(&self.folder, &record.path))
                .or_default()
                .push(record);
        }
        for (shard, records) in by_shard.iter_mut() {
            self.shard_mut(*shard);
            // In key order, as Automerge keeps a map's keys: each put lands next to the last
            // one instead of anywhere in the shard's columns (a first scan's puts, in the
            // order a directory lists its files, took 15–30 % longer).
            records.sort_by(|a, b| a.path.cmp(&b.path));
        }
        let (mesh, folder) = (self.mesh, &self.folder);
        self.shards
            .par_iter_mut()
            .filter_map(|(id, shard)| Some((id, shard, by_shard.get(id)?)))
            .try_for_each(|(id, shard, records)| -> Result<(), IndexError> {
                let commit = |shard: &mut Shard| {
                    if let Some(hash) = shard.doc.commit() {
                        let signature = signed::sign_change(keys, &mesh, folder, *id, &hash);
                        shard.signatures.insert(hash, signature);
                    }
                };
                let (mut count, mut bytes) = (0, 0);
                for record in records {
                    let encoded = record.encode();
                    let size = record.path.len() + encoded.len();
                    if count == MAX_RECORDS_PER_CHANGE || bytes + size > MAX_CHANGE_BYTES / 4 {
                        commit(shard);
                        (count, bytes) = (0, 0);
                    }
                    shard.doc.put(ROOT, record.path.as_str(), encoded)?;
                    (count, bytes) = (count + 1, bytes + size);
                }
                commit(shard);
                Ok(())
            })?;
        Ok(records)
    }

    /// Every current version of `path` (more than one while a conflict is open).
    fn get_all(&self, path: &str) -> Vec<FileRecord> {
        match self.shards.get(&shard_of(&self.folder, path)) {
            Some(shard) => all_records(&shard.doc, path),
            None => Vec::new(),
        }
    }

    /// The changes made here since the last call: what to send to peers and storage peers.
    pub fn take_local_changes(&mut self) -> Vec<ShardChange> {
        let mut out = Vec::new();
        for (&id, shard) in self.shards.iter_mut() {
            let heads = shard.doc.get_heads();
            if heads == shard.sent {
                continue;
            }
            for change in shard.doc.get_changes(&shard.sent) {
                if change.actor_id() != &self.actor {
                    continue; // a peer's change, applied here: not ours to announce
                }
                out.extend(shard.outgoing(id, &change));
            }
            shard.sent = heads;
        }
        out
    }

    /// Each non-empty shard's heads: what a peer compares to find what to send.
    pub fn heads(&mut self) -> BTreeMap<u16, Vec<ChangeHash>> {
        let mut heads: BTreeMap<u16, Vec<ChangeHash>> = self
            .shards
            .iter_mut()
            .map(|(id, shard)| (*id, shard.doc.get_heads()))
            .collect();
        heads.extend(self.cold.iter().map(|(id, c)| (*id, c.heads.clone())));
        heads
    }

    /// The paths whose records changed since the index had `since` (as [`Self::heads`] gave
    /// them): what a cache of per-path facts must look at again. `None` when that cannot be
    /// told (a shard no longer holds those heads: rebuilt without a revoked device's changes);
    /// then everything must be.
    pub fn paths_changed_since(
        &mut self,
        since: &BTreeMap<u16, Vec<ChangeHash>>,
    ) -> Option<BTreeSet<String>> {
        if since
            .keys()
            .any(|id| !self.shards.contains_key(id) && !self.cold.contains_key(id))
        {
            return None;
        }
        let moved: Vec<u16> = (self.cold.iter())
            .filter(|(id, c)| since.get(id) != Some(&c.heads))
            .map(|(id, _)| *id)
            .collect();
        self.warm_shards(moved).ok()?;
        let mut paths = BTreeSet::new();
        for (id, shard) in self.shards.iter_mut() {
            let old = since.get(id).map_or(&[][..], Vec::as_slice);
            if shard.doc.get_heads() == old {
                continue;
            }
            if old
                .iter()
                .any(|h| shard.doc.get_change_by_hash(h).is_none())
            {
                return None;
            }
            for change in shard.doc.get_changes(old) {
                for op in change.decode().operations {
                    if let automerge::legacy::Key::Map(path) = op.key {
                        paths.insert(path.to_string());
                    }
                }
            }
        }
        Some(paths)
    }

    /// The changes that a replica with `their_heads` lacks.
    pub fn changes_since(
        &mut self,
        their_heads: &BTreeMap<u16, Vec<ChangeHash>>,
    ) -> Result<Vec<ShardChange>, IndexError> {
        Ok(self.changes_since_within(their_heads, usize::MAX)?.0)
    }

    /// The changes that a replica with `their_heads` lacks, whole shards at a time, stopping
    /// before the shard that would take them past `budget` bytes (at least one shard is
    /// given). Returns them and whether more remain: a new replica of a million-file folder
    /// lacks far more than one message may carry, and takes it in slices. Unloaded shards
    /// are read from their saves and not kept.
    pub fn changes_since_within(
        &mut self,
        their_heads: &BTreeMap<u16, Vec<ChangeHash>>,
        budget: usize,
    ) -> Result<(Vec<ShardChange>, bool), IndexError> {
        let mut out: Vec<ShardChange> = Vec::new();
        let mut bytes = 0usize;
        let ids: BTreeSet<u16> = self
            .shards
            .keys()
            .chain(self.cold.keys())
            .copied()
            .collect();
        for id in ids {
            let theirs = their_heads.get(&id).cloned().unwrap_or_default();
            let mine = match (self.shards.get_mut(&id), self.cold.get(&id)) {
                (Some(shard), _) => shard.changes_since(id, theirs),
                (None, Some(cold)) if cold.heads == theirs => continue,
                (None, _) => self.read_cold(id)?.changes_since(id, theirs),
            };
            let size: usize = mine.iter().map(ShardChange::size).sum();
            if !out.is_empty() && bytes.saturating_add(size) > budget {
                return Ok((out, true));
            }
            bytes += size;
            out.extend(mine);
        }
        Ok((out, false))
    }
}

impl Shard {
    /// This shard's changes that a replica with `theirs` as its heads lacks.
    fn changes_since(&mut self, id: u16, theirs: Vec<ChangeHash>) -> Vec<ShardChange> {
        if self.doc.get_heads() == theirs {
            return Vec::new();
        }
        // Heads we do not know cannot be used as a base; what we resend is deduplicated.
        let known: Vec<ChangeHash> = theirs
            .into_iter()
            .filter(|h| self.doc.get_change_by_hash(h).is_some())
            .collect();
        let changes = self.doc.get_changes(&known);
        changes
            .iter()
            .filter_map(|c| self.outgoing(id, c))
            .collect()
    }
}

/// Checks that an operation only puts bytes under a valid path at the root; returns the path.
fn admit_op(op: &automerge::legacy::Op) -> Result<String, IndexError> {
    if op.obj != automerge::legacy::ObjectId::Root || op.insert {
        return Err(IndexError::ForbiddenOp(
            "operation outside the path map".into(),
        ));
    }
    let automerge::legacy::Key::Map(path) = &op.key else {
        return Err(IndexError::ForbiddenOp("list operation".into()));
    };
    if !matches!(
        op.action,
        automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(_))
    ) {
        return Err(IndexError::ForbiddenOp(format!(
            "{path:?}: only signed records may be written (deletes are tombstone records)"
        )));
    }
    validate_path(path)?;
    Ok(path.to_string())
}

fn value_record(path: &str, value: &automerge::Value<'_>) -> Option<FileRecord> {
    match value {
        automerge::Value::Scalar(scalar) => match scalar.as_ref() {
            automerge::ScalarValue::Bytes(bytes) => FileRecord::decode(path, bytes).ok(),
            _ => None,
        },
        automerge::Value::Object(_) => None,
    }
}

fn all_records(doc: &AutoCommit, path: &str) -> Vec<FileRecord> {
    doc.get_all(ROOT, path)
        .unwrap_or_default()
        .iter()
        .filter_map(|(value, _)| value_record(path, value))
        .collect()
}

/// Every path of a shard's document, with its state.
fn shard_paths(doc: &AutoCommit) -> impl Iterator<Item = (String, PathState)> + '_ {
    doc.map_range(ROOT, ..).filter_map(|item| {
        let path = item.key.into_owned();
        let state = match item.conflict {
            true => path_state(doc, &path)?,
            false => match &item.value {
                automerge::ValueRef::Scalar(automerge::ScalarValueRef::Bytes(bytes)) => PathState {
                    winner: FileRecord::decode(&path, bytes).ok()?,
                    losers: Vec::new(),
                },
                _ => return None,
            },
        };
        Some((path, state))
    })
}

fn path_state(doc: &AutoCommit, path: &str) -> Option<PathState> {
    let mut records = all_records(doc, path);
    records.sort_by_key(|r| std::cmp::Reverse(r.sort_key()));
    let mut records = records.into_iter();
    let winner = records.next()?;
    let mut losers: Vec<FileRecord> = Vec::new();
    for record in records {
        if !record.same_content(&winner) && !losers.iter().any(|l| l.same_content(&record)) {
            losers.push(record);
        }
    }
    Some(PathState { winner, losers })
}

mod admit;
pub mod cold;
#[cfg(feature = "forge")]
mod forge;
mod saved;
pub mod signed;

pub use cold::{ShardLoader, ShardSummary};
use saved::SaveMark;
pub use saved::SavedShard;
pub use signed::{actor_device, folder_tag, Dropped};
#[cfg(test)]
mod cold_tests;
#[cfg(test)]
mod signed_tests;
#[cfg(test)]
mod tests;
