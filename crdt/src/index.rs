//! The file index of one folder: signed [`FileRecord`]s in many small Automerge documents.
//!
//! # Layout
//! A folder's index is split into [`SHARDS`] shards by a hash of the path; each shard is its own
//! Automerge document, created on first write, whose root map holds `path -> record bytes`.
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
//! it replaces. One bad operation refuses the batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{transaction::Transactable, ActorId, AutoCommit, ChangeHash, ReadDoc, ROOT};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, Epoch, FolderId, MeshId};
use crate::keys::{verify, DeviceKeys, Signature};
use crate::membership::MembershipView;

/// Shards per folder. Fixed, so every replica puts a path in the same shard.
pub const SHARDS: u16 = 1024;
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
        verify(
            &self.author,
            SIGNING_CONTEXT,
            &signed_bytes(mesh, folder, &self.path, &self.stored_fields()),
            &self.signature,
        )
        .map_err(|_| IndexError::BadSignature {
            path: self.path.clone(),
            author: self.author,
        })
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
    pub change: Vec<u8>,
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Paths whose state may have changed.
    pub paths: BTreeSet<String>,
    /// Shards that received changes.
    pub shards: usize,
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

/// The shard a path of `folder` lives in.
pub fn shard_of(folder: &FolderId, path: &str) -> u16 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(folder.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(path.as_bytes());
    let hash = hasher.finalize();
    u16::from_le_bytes([hash.as_bytes()[0], hash.as_bytes()[1]]) % SHARDS
}

struct Shard {
    doc: AutoCommit,
    /// Heads at the last [`FolderIndex::take_local_changes`].
    sent: Vec<ChangeHash>,
}

/// A peer's shard change whose every operation passed admission: its puts are (path, record,
/// the operations it replaces).
struct Admitted {
    shard: u16,
    change: automerge::Change,
    puts: Vec<(String, FileRecord, Vec<automerge::legacy::OpId>)>,
}

/// The most changes held while their dependencies are missing (the oldest go first)…
const MAX_HELD_CHANGES: usize = 10_000;
/// …and the most bytes they may take.
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// The index of one folder on one replica.
pub struct FolderIndex {
    mesh: MeshId,
    folder: FolderId,
    actor: ActorId,
    shards: BTreeMap<u16, Shard>,
    /// Peers' changes whose dependencies have not arrived (see [`FolderIndex::apply`]).
    held: Vec<Admitted>,
}

impl FolderIndex {
    pub fn new(mesh: MeshId, folder: FolderId) -> Self {
        FolderIndex {
            mesh,
            folder,
            actor: ActorId::random(),
            shards: BTreeMap::new(),
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
        })
    }

    /// The current state of `path`, if it has a record.
    pub fn get(&self, path: &str) -> Option<PathState> {
        let shard = self.shards.get(&shard_of(&self.folder, path))?;
        path_state(&shard.doc, path)
    }

    /// Every path with a record, with its state, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (String, PathState)> + '_ {
        self.shards.values().flat_map(|shard| {
            shard.doc.keys(ROOT).filter_map(|path| {
                let state = path_state(&shard.doc, &path)?;
                Some((path, state))
            })
        })
    }

    /// Number of paths with a record (deleted ones included).
    pub fn len(&self) -> usize {
        self.shards.values().map(|s| s.doc.length(ROOT)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Paths with concurrent versions of different content.
    pub fn conflicts(&self) -> Vec<PathState> {
        let mut out: Vec<PathState> = self
            .iter()
            .filter(|(_, state)| !state.losers.is_empty())
            .map(|(_, state)| state)
            .collect();
        out.sort_by(|a, b| a.winner.path.cmp(&b.winner.path));
        out
    }

    /// Signs and records new versions of paths, written by `keys` in `epoch`. Signing runs on
    /// every core; each touched shard gets one Automerge change.
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
        for shard in by_shard.keys() {
            self.shard_mut(*shard);
        }
        self.shards
            .par_iter_mut()
            .filter_map(|(id, shard)| Some((shard, by_shard.get(id)?)))
            .try_for_each(|(shard, records)| -> Result<(), IndexError> {
                for record in records {
                    shard.doc.put(ROOT, record.path.as_str(), record.encode())?;
                }
                shard.doc.commit();
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
                out.push(ShardChange {
                    shard: id,
                    change: change.raw_bytes().to_vec(),
                });
            }
            shard.sent = heads;
        }
        out
    }

    /// Each non-empty shard's heads: what a peer compares to find what to send.
    pub fn heads(&mut self) -> BTreeMap<u16, Vec<ChangeHash>> {
        self.shards
            .iter_mut()
            .map(|(id, shard)| (*id, shard.doc.get_heads()))
            .collect()
    }

    /// The changes that a replica with `their_heads` lacks.
    pub fn changes_since(
        &mut self,
        their_heads: &BTreeMap<u16, Vec<ChangeHash>>,
    ) -> Vec<ShardChange> {
        let mut out = Vec::new();
        for (&id, shard) in self.shards.iter_mut() {
            let theirs = their_heads.get(&id).cloned().unwrap_or_default();
            if shard.doc.get_heads() == theirs {
                continue;
            }
            // Heads we do not know cannot be used as a base; what we resend is deduplicated.
            let known: Vec<ChangeHash> = theirs
                .into_iter()
                .filter(|h| shard.doc.get_change_by_hash(h).is_some())
                .collect();
            for change in shard.doc.get_changes(&known) {
                out.push(ShardChange {
                    shard: id,
                    change: change.raw_bytes().to_vec(),
                });
            }
        }
        out
    }

    /// Admits changes from a peer (see the module docs). Nothing of the batch is applied
    /// unless all of it passes. A change whose dependencies have not arrived is held here (not
    /// handed to Automerge) and checked again once they have: only then can the versions it
    /// replaces be compared with its own, so an old signed record bundled with an unseen newer
    /// one can never roll a path back.
    pub fn apply(
        &mut self,
        view: &MembershipView,
        changes: Vec<ShardChange>,
    ) -> Result<ApplyReport, IndexError> {
        let decoded: Vec<Admitted> = changes
            .into_par_iter()
            .map(|c| self.admit_change(view, c))
            .collect::<Result<_, _>>()?;
        let held_before = self.held.len();
        let mut pending = std::mem::take(&mut self.held);
        pending.extend(decoded);
        let ready = self.ready(&pending);
        let ready_refs: Vec<&Admitted> = pending
            .iter()
            .zip(&ready)
            .filter(|(_, r)| **r)
            .map(|(a, _)| a)
            .collect();
        if let Err(failure) = self.check_versions(&ready_refs) {
            let (at, error) = *failure;
            let failed = ready_refs[at].change.hash();
            let from_before = pending[..held_before]
                .iter()
                .any(|a| a.change.hash() == failed);
            if !from_before {
                pending.truncate(held_before);
                self.held = pending;
                return Err(error);
            }
            // A change held from an earlier batch that turns out stale (a replay that waited
            // for the version it would roll back) is dropped; the rest is checked again.
            drop(error);
            pending.retain(|a| a.change.hash() != failed);
            self.held = pending;
            return self.apply(view, Vec::new());
        }
        let mut report = ApplyReport::default();
        let mut by_shard: BTreeMap<u16, Vec<automerge::Change>> = BTreeMap::new();
        let mut held_hashes: BTreeSet<ChangeHash> = BTreeSet::new();
        for (admitted, is_ready) in pending.into_iter().zip(ready) {
            if !is_ready {
                if held_hashes.insert(admitted.change.hash()) {
                    self.held.push(admitted);
                }
                continue;
            }
            report
                .paths
                .extend(admitted.puts.into_iter().map(|(path, _, _)| path));
            by_shard
                .entry(admitted.shard)
                .or_default()
                .push(admitted.change);
        }
        // Bounded: what waits longest goes first (a peer re-sends what this replica lacks).
        let mut bytes: usize = self.held.iter().map(|a| a.change.raw_bytes().len()).sum();
        while self.held.len() > MAX_HELD_CHANGES || bytes > MAX_HELD_BYTES {
            bytes -= self.held.remove(0).change.raw_bytes().len();
        }
        report.shards = by_shard.len();
        for shard in by_shard.keys() {
            self.shard_mut(*shard);
        }
        let mut work: Vec<(&mut Shard, Vec<automerge::Change>)> = Vec::new();
        for (id, shard) in self.shards.iter_mut() {
            if let Some(changes) = by_shard.remove(id) {
                work.push((shard, changes));
            }
        }
        work.into_par_iter()
            .try_for_each(|(shard, changes)| shard.doc.apply_changes(changes))?;
        Ok(report)
    }

    /// Decodes and checks one change of a peer: every operation puts a well-formed record,
    /// signed by a device that may write, in the right shard.
    fn admit_change(&self, view: &MembershipView, c: ShardChange) -> Result<Admitted, IndexError> {
        if c.shard >= SHARDS {
            return Err(IndexError::BadShard(c.shard));
        }
        if c.change.len() > MAX_CHANGE_BYTES {
            return Err(IndexError::TooLarge(c.change.len()));
        }
        let change = crate::bounds::bounded_change(&c.change, MAX_CHANGE_BYTES, MAX_OPS_PER_CHANGE)
            .map_err(IndexError::Load)?;
        let mut puts = Vec::new();
        for op in change.decode().operations {
            let path = admit_op(&op)?;
            if shard_of(&self.folder, &path) != c.shard {
                return Err(IndexError::ForbiddenOp(format!(
                    "{path:?} does not belong in shard {}",
                    c.shard
                )));
            }
            let automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(bytes)) = &op.action
            else {
                unreachable!("admit_op accepts only byte puts");
            };
            let record = FileRecord::decode(&path, bytes)?;
            record.verify(&self.mesh, &self.folder)?;
            if path == SHARED_RULES_PATH && !record.deleted && record.kind != FileKind::File {
                return Err(IndexError::ForbiddenOp(format!(
                    "{path:?} may only be a regular file"
                )));
            }
            if !view.may_write(&record.author, record.epoch) {
                return Err(IndexError::NotAWriter {
                    path,
                    author: record.author,
                    epoch: record.epoch,
                });
            }
            puts.push((path, record, op.pred.iter().cloned().collect()));
        }
        Ok(Admitted {
            shard: c.shard,
            change,
            puts,
        })
    }

    /// Which of `pending` can be applied now: every dependency is in its shard's document, or
    /// is another change of `pending` that can.
    fn ready(&mut self, pending: &[Admitted]) -> Vec<bool> {
        let mut ready = vec![false; pending.len()];
        let missing: Vec<Vec<ChangeHash>> = pending
            .iter()
            .map(|a| match self.shards.get_mut(&a.shard) {
                Some(shard) => shard.doc.get_missing_deps(a.change.deps()),
                None => a.change.deps().to_vec(),
            })
            .collect();
        loop {
            let arrived: BTreeSet<ChangeHash> = pending
                .iter()
                .zip(&ready)
                .filter(|(_, r)| **r)
                .map(|(a, _)| a.change.hash())
                .collect();
            let mut grew = false;
            for (i, deps) in missing.iter().enumerate() {
                if !ready[i] && deps.iter().all(|d| arrived.contains(d)) {
                    ready[i] = true;
                    grew = true;
                }
            }
            if !grew {
                return ready;
            }
        }
    }

    /// A put must outrank every value it replaces — in the document or in this batch — (no
    /// rollback by replaying), and may not jump a path's version ahead (no wedging it at the
    /// top of the range). On failure, the position of the offending change in `ready`.
    fn check_versions(&self, ready: &[&Admitted]) -> Result<(), Box<(usize, IndexError)>> {
        // Versions of the values this batch puts, by shard and operation ID (counters are per
        // shard document).
        let mut batch_ops: HashMap<(u16, u64, ActorId), u64> = HashMap::new();
        // How many puts this batch makes per path: an honest author's version is one above
        // the highest it replaces, so no version may run far ahead of what is known here plus
        // these (and a slack for what may still be on its way).
        let mut puts_per_path: HashMap<&str, u64> = HashMap::new();
        for admitted in ready {
            let start = admitted.change.start_op().get();
            for (i, (path, record, _)) in admitted.puts.iter().enumerate() {
                let id = (
                    admitted.shard,
                    start + i as u64,
                    admitted.change.actor_id().clone(),
                );
                batch_ops.insert(id, record.version);
                *puts_per_path.entry(path.as_str()).or_default() += 1;
            }
        }
        ready.par_iter().enumerate().try_for_each(|(at, admitted)| {
            self.check_puts(admitted, &batch_ops, &puts_per_path)
                .map_err(|e| Box::new((at, e)))
        })
    }

    fn check_puts(
        &self,
        admitted: &Admitted,
        batch_ops: &HashMap<(u16, u64, ActorId), u64>,
        puts_per_path: &HashMap<&str, u64>,
    ) -> Result<(), IndexError> {
        let shard = self.shards.get(&admitted.shard);
        for (path, record, preds) in &admitted.puts {
            let values = match shard {
                Some(shard) => shard.doc.get_all(ROOT, path.as_str())?,
                None => Vec::new(),
            };
            let known = values
                .iter()
                .filter_map(|(value, _)| value_record(path, value))
                .map(|r| r.version)
                .max()
                .unwrap_or(0);
            let most = known
                .saturating_add(puts_per_path.get(path.as_str()).copied().unwrap_or(1))
                .saturating_add(MAX_VERSION_SLACK);
            if record.version > most {
                return Err(IndexError::VersionJump {
                    path: path.clone(),
                    version: record.version,
                    most,
                });
            }
            let mut replaced: Vec<u64> = Vec::new();
            for (value, id) in values {
                let automerge::ObjId::Id(counter, actor, _) = &id else {
                    continue;
                };
                if preds.iter().any(|p| p.0 == *counter && p.1 == *actor) {
                    replaced.extend(value_record(path, &value).map(|r| r.version));
                }
            }
            for pred in preds {
                replaced.extend(batch_ops.get(&(admitted.shard, pred.0, pred.1.clone())));
            }
            if let Some(&old) = replaced.iter().max() {
                if record.version <= old {
                    return Err(IndexError::StaleVersion {
                        path: path.clone(),
                        version: record.version,
                        replaced: old,
                    });
                }
            }
        }
        Ok(())
    }

    /// One shard, saved, if it exists.
    pub fn save_shard(&mut self, shard: u16) -> Option<Vec<u8>> {
        self.shards.get_mut(&shard).map(|s| s.doc.save())
    }

    /// Every non-empty shard, saved (compressed, with history).
    pub fn save(&mut self) -> Vec<(u16, Vec<u8>)> {
        self.shards
            .par_iter_mut()
            .map(|(id, shard)| (*id, shard.doc.save()))
            .collect()
    }

    /// Loads saved shards, in parallel. The records were checked when they were admitted and
    /// the saved bytes carry Automerge's own hash checks.
    pub fn load(
        mesh: MeshId,
        folder: FolderId,
        saved: Vec<(u16, Vec<u8>)>,
    ) -> Result<Self, IndexError> {
        let actor = ActorId::random();
        let shards = saved
            .into_par_iter()
            .map(|(id, bytes)| {
                if id >= SHARDS {
                    return Err(IndexError::BadShard(id));
                }
                let doc = AutoCommit::load(&bytes)
                    .map_err(|e| IndexError::Load(e.to_string()))?
                    .with_actor(actor.clone());
                Ok((id, doc))
            })
            .collect::<Result<Vec<_>, IndexError>>()?
            .into_iter()
            .map(|(id, mut doc)| {
                let sent = doc.get_heads();
                (id, Shard { doc, sent })
            })
            .collect();
        Ok(FolderIndex {
            mesh,
            folder,
            actor,
            shards,
            held: Vec::new(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Action, MembershipLog, Role};
    use crate::MeshKey;

    pub(crate) fn update(path: &str, content: u8) -> FileUpdate {
        FileUpdate {
            path: path.into(),
            kind: FileKind::File,
            size: u64::from(content),
            mode: 0o644,
            mtime_ns: 1_700_000_000_000_000_000 + i64::from(content),
            deleted: false,
            chunks: ChunkListHash([content; 32]),
        }
    }

    struct World {
        admin: DeviceKeys,
        laptop: DeviceKeys,
        log: MembershipLog,
        folder: FolderId,
    }

    fn world() -> World {
        let admin = DeviceKeys::generate();
        let laptop = DeviceKeys::generate();
        let (mut log, _) = MembershipLog::create(&admin, "admin", &MeshKey::generate(Epoch(0)));
        log.append(
            &admin,
            Action::Add {
                device: laptop.device_id(),
                role: Role::Device,
                name: crate::SealedName::unreadable("laptop"),
                kem: Some(laptop.kem_public()),
                wrapped: None,
            },
        )
        .unwrap();
        World {
            admin,
            laptop,
            log,
            folder: FolderId::new("docs").unwrap(),
        }
    }

    #[test]
    fn an_old_record_bundled_ahead_of_the_newer_one_it_replaces_rolls_nothing_back() {
        let w = world();
        let mesh = w.log.mesh();
        let mut author = FolderIndex::new(mesh, w.folder.clone());
        author
            .write(&w.admin, Epoch(0), vec![update("p", 1)])
            .unwrap();
        let first = author.take_local_changes();
        let old = author.get("p").unwrap().winner;
        author
            .write(&w.admin, Epoch(0), vec![update("p", 2)])
            .unwrap();
        let second = author.take_local_changes();
        // A member holding both replays the author's first, genuinely signed record "over" the
        // second: its change replaces the second's value and depends on the second's change.
        let mut replayer = FolderIndex::new(mesh, w.folder.clone());
        replayer.apply(w.log.view(), first.clone()).unwrap();
        replayer.apply(w.log.view(), second.clone()).unwrap();
        let shard = replayer.shard_mut(shard_of(&w.folder, "p"));
        shard.doc.put(ROOT, "p", old.encode()).unwrap();
        shard.doc.commit();
        let replay = replayer.take_local_changes();
        // The victim has the first version, gets the replay before the second arrives, then
        // the second: it must end on version 2.
        let mut victim = FolderIndex::new(mesh, w.folder.clone());
        let first_again = first.clone();
        victim.apply(w.log.view(), first).unwrap();
        victim.apply(w.log.view(), replay.clone()).unwrap();
        assert_eq!(
            victim.get("p").unwrap().winner.version,
            1,
            "held, not applied"
        );
        victim.apply(w.log.view(), second.clone()).unwrap();
        let state = victim.get("p").unwrap();
        assert_eq!(state.winner.version, 2);
        assert!(state.losers.is_empty(), "{:?}", state.losers);
        // Sent together, the replay is refused outright.
        let mut fresh = FolderIndex::new(mesh, w.folder.clone());
        let mut all = first_again;
        all.extend(second);
        all.extend(replay);
        assert!(matches!(
            fresh.apply(w.log.view(), all),
            Err(IndexError::StaleVersion { .. })
        ));
    }

    #[test]
    fn many_shards_and_repeated_deliveries_admit_honest_successors() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        let ups: Vec<FileUpdate> = (0..30)
            .map(|i| update(&format!("keep{i}.txt"), i as u8 + 1))
            .collect();
        a.write(&w.admin, Epoch(0), ups).unwrap();
        let first = a.take_local_changes();
        b.apply(w.log.view(), first.clone()).unwrap();
        let dels: Vec<FileUpdate> = (0..25)
            .map(|i| {
                let mut u = update(&format!("keep{i}.txt"), 0);
                u.deleted = true;
                u
            })
            .collect();
        a.write(&w.admin, Epoch(0), dels).unwrap();
        let second = a.take_local_changes();
        b.apply(w.log.view(), second.clone()).unwrap();
        b.apply(w.log.view(), second.clone()).unwrap();
        let heads = BTreeMap::new();
        let all = a.changes_since(&heads);
        b.apply(w.log.view(), all).unwrap();
    }

    #[test]
    fn a_version_may_not_jump_ahead() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        a.write(&w.admin, Epoch(0), vec![update("a.txt", 1)])
            .unwrap();
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        b.apply(w.log.view(), a.take_local_changes()).unwrap();
        // A member signs version u64::MAX of a.txt (its own index lets it: it builds the
        // record by hand). Every replica refuses it; nothing is wedged.
        let mut forged = FolderIndex::new(mesh, w.folder.clone());
        forged
            .apply(w.log.view(), b.changes_since(&BTreeMap::new()))
            .unwrap();
        let mut record = forged.get("a.txt").unwrap().winner;
        record.version = u64::MAX;
        record.author = w.laptop.device_id();
        let bytes = signed_bytes(&mesh, &w.folder, "a.txt", &record.stored_fields());
        record.signature = w.laptop.sign(SIGNING_CONTEXT, &bytes);
        let shard = forged.shard_mut(shard_of(&w.folder, "a.txt"));
        shard.doc.put(ROOT, "a.txt", record.encode()).unwrap();
        shard.doc.commit();
        let refused = b.apply(w.log.view(), forged.take_local_changes());
        assert!(
            matches!(refused, Err(IndexError::VersionJump { .. })),
            "{refused:?}"
        );
        // The honest next version still goes through.
        a.write(&w.admin, Epoch(0), vec![update("a.txt", 2)])
            .unwrap();
        b.apply(w.log.view(), a.take_local_changes()).unwrap();
        assert_eq!(b.get("a.txt").unwrap().winner.version, 2);
    }

    #[test]
    fn the_daemons_own_files_cannot_be_named_by_a_record() {
        for path in [
            ".meshsync-folder",
            ".meshsync/ignore.local",
            "a/.meshsync-tmp-1-2",
            ".meshsync",
            "sub/.meshsync/ignore",
        ] {
            assert!(validate_path(path).is_err(), "{path}");
        }
        assert!(validate_path(SHARED_RULES_PATH).is_ok());
        assert!(validate_path("docs/meshsync.txt").is_ok());
        // A link at the shared rules path is refused at admission.
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut link = update(SHARED_RULES_PATH, 1);
        link.kind = FileKind::Symlink;
        assert!(a.write(&w.admin, Epoch(0), vec![link]).is_err());
    }

    #[test]
    fn write_get_and_sync_between_two_replicas() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        a.write(
            &w.admin,
            Epoch(0),
            vec![update("a.txt", 1), update("dir/b.txt", 2)],
        )
        .unwrap();
        let report = b.apply(w.log.view(), a.take_local_changes()).unwrap();
        assert_eq!(report.paths.len(), 2);
        assert_eq!(b.get("dir/b.txt").unwrap().winner.size, 2);
        assert!(a.take_local_changes().is_empty());
        // One-file change: one small Automerge change.
        b.write(&w.laptop, Epoch(0), vec![update("a.txt", 3)])
            .unwrap();
        let change = b.take_local_changes();
        let wire: usize = change.iter().map(|c| c.change.len()).sum();
        assert!(wire < 400, "one-file change took {wire} bytes");
        a.apply(w.log.view(), change).unwrap();
        let state = a.get("a.txt").unwrap();
        assert_eq!(state.winner.version, 2);
        assert!(state.losers.is_empty());
    }

    #[test]
    fn concurrent_edits_keep_both_and_identical_ones_do_not_conflict() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        a.write(&w.admin, Epoch(0), vec![update("x", 1), update("same", 1)])
            .unwrap();
        b.apply(w.log.view(), a.take_local_changes()).unwrap();
        a.write(&w.admin, Epoch(0), vec![update("x", 2), update("same", 9)])
            .unwrap();
        b.write(&w.laptop, Epoch(0), vec![update("x", 3), update("same", 9)])
            .unwrap();
        let to_b = a.take_local_changes();
        let to_a = b.take_local_changes();
        a.apply(w.log.view(), to_a).unwrap();
        b.apply(w.log.view(), to_b).unwrap();
        let (sa, sb) = (a.get("x").unwrap(), b.get("x").unwrap());
        assert_eq!(sa, sb, "both replicas pick the same winner");
        assert_eq!(sa.losers.len(), 1);
        assert_ne!(sa.winner.chunks, sa.losers[0].chunks);
        assert!(a.get("same").unwrap().losers.is_empty());
        assert_eq!(a.conflicts().len(), 1);
        // Resolving: a write that has seen both replaces both.
        a.write(&w.admin, Epoch(0), vec![update("x", 4)]).unwrap();
        b.apply(w.log.view(), a.take_local_changes()).unwrap();
        assert!(b.get("x").unwrap().losers.is_empty());
        assert_eq!(b.get("x").unwrap().winner.version, 3);
    }

    fn forge(index: &mut FolderIndex, path: &str, record: &FileRecord) -> Vec<ShardChange> {
        let shard = shard_of(&index.folder, path);
        let s = index.shard_mut(shard);
        s.doc.put(ROOT, path, record.encode()).unwrap();
        s.doc.commit();
        index.take_local_changes()
    }

    #[test]
    fn forged_signature_is_rejected() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        let mut record = a
            .write(&w.admin, Epoch(0), vec![update("f", 1)])
            .unwrap()
            .remove(0);
        a.take_local_changes();
        record.size = 1_000_000; // altered after signing
        record.version = 2;
        let changes = forge(&mut a, "f", &record);
        assert!(matches!(
            b.apply(w.log.view(), changes),
            Err(IndexError::BadSignature { .. })
        ));
        assert!(b.get("f").is_none(), "nothing applied");
    }

    #[test]
    fn wrong_mesh_or_folder_is_rejected() {
        let w = world();
        let mut elsewhere = FolderIndex::new(MeshId::random(), w.folder.clone());
        elsewhere
            .write(&w.admin, Epoch(0), vec![update("f", 1)])
            .unwrap();
        let mut b = FolderIndex::new(w.log.mesh(), w.folder.clone());
        assert!(matches!(
            b.apply(w.log.view(), elsewhere.take_local_changes()),
            Err(IndexError::BadSignature { .. })
        ));
        let mut other_folder = FolderIndex::new(w.log.mesh(), FolderId::new("other").unwrap());
        other_folder
            .write(&w.admin, Epoch(0), vec![update("f", 1)])
            .unwrap();
        assert!(b
            .apply(w.log.view(), other_folder.take_local_changes())
            .is_err());
        assert!(b.is_empty());
    }

    #[test]
    fn removed_stranger_and_read_only_authors_are_rejected() {
        let mut w = world();
        let mesh = w.log.mesh();
        let stranger = DeviceKeys::generate();
        let reader = DeviceKeys::generate();
        w.log
            .append(
                &w.admin,
                Action::Add {
                    device: reader.device_id(),
                    role: Role::ReadOnly,
                    name: crate::SealedName::unreadable("reader"),
                    kem: None,
                    wrapped: None,
                },
            )
            .unwrap();
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        for keys in [&stranger, &reader] {
            let mut a = FolderIndex::new(mesh, w.folder.clone());
            a.write(keys, Epoch(0), vec![update("f", 1)]).unwrap();
            assert!(matches!(
                b.apply(w.log.view(), a.take_local_changes()),
                Err(IndexError::NotAWriter { .. })
            ));
        }
        // The laptop writes before removal (kept) and after (refused).
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        a.write(&w.laptop, Epoch(0), vec![update("before", 1)])
            .unwrap();
        let before = a.take_local_changes();
        w.log
            .append(
                &w.admin,
                Action::Remove {
                    device: w.laptop.device_id(),
                    wraps: vec![],
                },
            )
            .unwrap();
        b.apply(w.log.view(), before).unwrap();
        a.write(&w.laptop, Epoch(1), vec![update("after", 1)])
            .unwrap();
        assert!(matches!(
            b.apply(w.log.view(), a.take_local_changes()),
            Err(IndexError::NotAWriter { .. })
        ));
        assert!(b.get("before").is_some());
        assert!(b.get("after").is_none());
    }

    #[test]
    fn replaying_an_old_version_is_rejected() {
        let w = world();
        let mesh = w.log.mesh();
        let mut a = FolderIndex::new(mesh, w.folder.clone());
        let mut b = FolderIndex::new(mesh, w.folder.clone());
        let old = a
            .write(&w.admin, Epoch(0), vec![update("f", 1)])
            .unwrap()
            .remove(0);
        a.write(&w.admin, Epoch(0), vec![update("f", 2)]).unwrap();
        b.apply(w.log.view(), a.take_local_changes()).unwrap();
        // A buggy or hostile member re-puts the old, validly signed record over the new one.
        let mut evil = FolderIndex::new(mesh, w.folder.clone());
        evil.apply(w.log.view(), b.changes_since(&BTreeMap::new()))
            .unwrap();
        evil.take_local_changes();
        let changes = forge(&mut evil, "f", &old);
        assert!(matches!(
            b.apply(w.log.view(), changes.clone()),
            Err(IndexError::StaleVersion { .. })
        ));
        assert_eq!(b.get("f").unwrap().winner.version, 2);
        // Re-applying changes already held changes nothing.
        let heads = b.heads();
        b.apply(w.log.view(), a.changes_since(&BTreeMap::new()))
            .unwrap();
        assert_eq!(b.heads(), heads);
    }

    #[test]
    fn bad_paths_and_garbage_are_refused() {
        let w = world();
        let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a"] {
            assert!(
                a.write(&w.admin, Epoch(0), vec![update(bad, 1)]).is_err(),
                "{bad}"
            );
        }
        for garbage in [
            vec![],
            vec![1, 2, 3],
            vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0],
        ] {
            let result = a.apply(
                w.log.view(),
                vec![ShardChange {
                    shard: 0,
                    change: garbage,
                }],
            );
            assert!(result.is_err());
        }
        assert!(decode_changes(&[0xff; 10]).is_err());
    }

    #[test]
    fn unknown_heads_and_shards_from_a_peer_are_harmless() {
        let w = world();
        let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
        a.write(&w.admin, Epoch(0), vec![update("x", 1)]).unwrap();
        let mut heads = BTreeMap::new();
        heads.insert(shard_of(&w.folder, "x"), vec![ChangeHash([3; 32])]);
        heads.insert(SHARDS + 5, vec![ChangeHash([4; 32])]);
        assert_eq!(a.changes_since(&heads).len(), 1);
    }

    #[test]
    fn save_and_load_keep_everything() {
        let w = world();
        let mut a = FolderIndex::new(w.log.mesh(), w.folder.clone());
        let updates: Vec<FileUpdate> = (0..500)
            .map(|i| update(&format!("d/{i}"), (i % 200) as u8))
            .collect();
        a.write(&w.admin, Epoch(0), updates).unwrap();
        let saved = a.save();
        let b = FolderIndex::load(w.log.mesh(), w.folder.clone(), saved).unwrap();
        assert_eq!(b.len(), 500);
        assert_eq!(b.get("d/77"), a.get("d/77"));
    }
}
