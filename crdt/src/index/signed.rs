//! Signed changes: every Automerge change of a shard is signed by the device that made it, over
//! the change's hash (which covers its actor, sequence number, dependencies and operations) in
//! this mesh, folder and shard. The actor names the device ([`actor_for`]), and every record a
//! change puts must be that device's own: so a member can only relay another device's changes
//! as they were made — never replay an old record of someone else's in a change of its own,
//! nor make a change that claims another device's actor. The signatures travel with the
//! changes ([`ShardChange::signature`]) and are saved beside each shard's document.
//!
//! # Removed devices
//! When an admin removes a device, it names the removed device's last changes it holds, per
//! folder and shard ([`Cutoff`], in the membership log). From then on every replica refuses
//! that device's later changes, whatever epoch their records claim — and a replica that took
//! some before it heard of the removal (from the device itself, or relayed by a member that had
//! not heard either) drops them, with every change made on top of them
//! ([`FolderIndex::drop_past_cutoffs`]): its own such records it writes again.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{ActorId, AutoCommit, ChangeHash};
use serde::{Deserialize, Serialize};

use super::*;
use crate::membership::{ChangeMark, Cutoff, FolderTag};

const CHANGE_CONTEXT: &str = "meshsync index change v1";
/// Starts a saved shard: its document, then the signatures of its changes.
const SAVED_MAGIC: [u8; 4] = *b"MSI2";
/// Starts a piece of a saved shard: changes since the save before, with their signatures.
const PIECE_MAGIC: [u8; 4] = *b"MSP1";
/// The first bytes of a bare Automerge document (a shard saved before changes were signed).
const AUTOMERGE_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// The device an index actor belongs to ([`actor_for`]: its ID, then an incarnation).
pub fn actor_device(actor: &ActorId) -> Option<(DeviceId, u32)> {
    let bytes = actor.to_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let device = DeviceId::from_bytes(bytes[..32].try_into().expect("32 bytes")).ok()?;
    let incarnation = u32::from_be_bytes(bytes[32..].try_into().expect("4 bytes"));
    Some((device, incarnation))
}

/// What a folder's ID is called in the membership log (which storage peers read): a hash, so
/// that the log never shows a folder's name.
pub fn folder_tag(mesh: &MeshId, folder: &FolderId) -> FolderTag {
    let mut hasher = blake3::Hasher::new_derive_key("meshsync folder tag v1");
    hasher.update(mesh.as_bytes());
    hasher.update(folder.as_str().as_bytes());
    FolderTag(*hasher.finalize().as_bytes())
}

fn signed_change(mesh: &MeshId, folder: &FolderId, shard: u16, hash: &ChangeHash) -> Vec<u8> {
    postcard::to_stdvec(&(mesh, folder, shard, hash.0)).expect("change names always encode")
}

pub(super) fn sign_change(
    keys: &DeviceKeys,
    mesh: &MeshId,
    folder: &FolderId,
    shard: u16,
    hash: &ChangeHash,
) -> Signature {
    keys.sign(CHANGE_CONTEXT, &signed_change(mesh, folder, shard, hash))
}

/// A change's signer, as [`verify_change`] found it.
pub(super) struct Signer {
    pub(super) device: DeviceId,
    /// The incarnation of the device the change's actor names.
    pub(super) incarnation: u32,
    /// The device's key, decompressed: it checks the change's records too.
    pub(super) key: ed25519_dalek::VerifyingKey,
}

/// Checks that `change` is signed by the device its actor names.
pub(super) fn verify_change(
    mesh: &MeshId,
    folder: &FolderId,
    shard: u16,
    change: &automerge::Change,
    signature: &Signature,
) -> Result<Signer, IndexError> {
    let bad = || IndexError::BadChangeSignature {
        change: change.hash().to_string(),
    };
    let (device, incarnation) = actor_device(change.actor_id()).ok_or_else(bad)?;
    let key = device.verifying_key().map_err(|_| bad())?;
    verify_by(
        &key,
        CHANGE_CONTEXT,
        &signed_change(mesh, folder, shard, &change.hash()),
        signature,
    )
    .map_err(|_| bad())?;
    Ok(Signer {
        device,
        incarnation,
        key,
    })
}

#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(with = "serde_bytes")]
    doc: Vec<u8>,
    signatures: Vec<([u8; 32], Signature)>,
}

/// A shard as saved: its document and its changes' signatures.
pub(super) fn encode_saved(doc: Vec<u8>, signatures: &HashMap<ChangeHash, Signature>) -> Vec<u8> {
    let mut signatures: Vec<([u8; 32], Signature)> =
        signatures.iter().map(|(h, s)| (h.0, *s)).collect();
    signatures.sort_by_key(|(h, _)| *h);
    let mut out = SAVED_MAGIC.to_vec();
    postcard::to_io(&Saved { doc, signatures }, &mut out).expect("a saved shard always encodes");
    out
}

/// Inverse of [`encode_saved`].
pub(super) fn decode_saved(
    bytes: &[u8],
) -> Result<(AutoCommit, HashMap<ChangeHash, Signature>), IndexError> {
    if bytes.starts_with(&AUTOMERGE_MAGIC) {
        return Err(IndexError::Load(
            "this shard was saved by a meshsync from before index changes were signed, and \
             cannot be relayed to peers: move the home aside and pair this device again (the \
             folders' files are not touched)"
                .into(),
        ));
    }
    let body = bytes
        .strip_prefix(&SAVED_MAGIC)
        .ok_or_else(|| IndexError::Load("not a saved shard".into()))?;
    let saved: Saved = postcard::from_bytes(body).map_err(|e| IndexError::Load(e.to_string()))?;
    let doc = AutoCommit::load(&saved.doc).map_err(|e| IndexError::Load(e.to_string()))?;
    let signatures = saved
        .signatures
        .into_iter()
        .map(|(h, s)| (ChangeHash(h), s))
        .collect();
    Ok((doc, signatures))
}

#[derive(Serialize, Deserialize)]
struct Piece {
    /// The changes' raw bytes, one after another.
    #[serde(with = "serde_bytes")]
    changes: Vec<u8>,
    signatures: Vec<([u8; 32], Signature)>,
}

/// A piece of a saved shard: `changes` and their signatures.
pub(super) fn encode_piece(
    changes: &[automerge::Change],
    signatures: &HashMap<ChangeHash, Signature>,
) -> Vec<u8> {
    let piece = Piece {
        changes: changes
            .iter()
            .flat_map(|c| c.raw_bytes())
            .copied()
            .collect(),
        signatures: changes
            .iter()
            .filter_map(|c| Some((c.hash().0, *signatures.get(&c.hash())?)))
            .collect(),
    };
    let mut out = PIECE_MAGIC.to_vec();
    postcard::to_io(&piece, &mut out).expect("a piece always encodes");
    out
}

/// Adds a piece of a saved shard (see [`encode_piece`]) to `doc` and `signatures`.
pub(super) fn load_piece(
    doc: &mut AutoCommit,
    signatures: &mut HashMap<ChangeHash, Signature>,
    bytes: &[u8],
) -> Result<(), IndexError> {
    let body = bytes
        .strip_prefix(&PIECE_MAGIC)
        .ok_or_else(|| IndexError::Load("not a piece of a saved shard".into()))?;
    let piece: Piece = postcard::from_bytes(body).map_err(|e| IndexError::Load(e.to_string()))?;
    doc.load_incremental(&piece.changes)
        .map_err(|e| IndexError::Load(e.to_string()))?;
    signatures.extend(
        piece
            .signatures
            .into_iter()
            .map(|(h, s)| (ChangeHash(h), s)),
    );
    Ok(())
}

/// What [`FolderIndex::drop_past_cutoffs`] took out.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Paths whose state may have changed.
    pub paths: BTreeSet<String>,
    /// How many changes were dropped.
    pub changes: usize,
    /// This replica's own records that were dropped (they were made on top of a removed
    /// device's late change), newest per path: the caller writes them again.
    pub own: Vec<FileRecord>,
}

impl FolderIndex {
    /// The cutoff a removed `device` has in this folder, if an admin named one.
    pub(super) fn cutoff_of<'v>(
        &self,
        view: &'v MembershipView,
        device: &DeviceId,
    ) -> Option<&'v Cutoff> {
        view.cutoffs
            .get(&(*device, folder_tag(&self.mesh, &self.folder)))
    }

    /// The marks naming `device`'s last change per shard and incarnation that this replica
    /// holds: what a removal of `device` puts in the log for this folder. Unloaded shards are
    /// read from their saves (and not kept).
    pub fn last_changes_of(
        &mut self,
        device: &DeviceId,
    ) -> Result<(FolderTag, Vec<ChangeMark>), IndexError> {
        let mut marks: BTreeMap<(u16, u32), ChangeMark> = BTreeMap::new();
        let mut note = |shard: u16, doc: &mut AutoCommit| {
            for change in doc.get_changes(&[]) {
                let Some((author, incarnation)) = actor_device(change.actor_id()) else {
                    continue;
                };
                if author != *device {
                    continue;
                }
                let mark = ChangeMark {
                    shard,
                    incarnation,
                    seq: change.seq(),
                    hash: change.hash().0,
                };
                let slot = marks.entry((shard, incarnation)).or_insert(mark);
                if mark.seq > slot.seq {
                    *slot = mark;
                }
            }
        };
        for (&shard, s) in self.shards.iter_mut() {
            note(shard, &mut s.doc);
        }
        for &shard in self.cold.keys() {
            note(shard, &mut self.read_cold(shard)?.doc);
        }
        Ok((
            folder_tag(&self.mesh, &self.folder),
            marks.into_values().collect(),
        ))
    }

    /// Takes out every change a removed device made after its cutoff, with every change that
    /// depends on one, by rebuilding the shards that hold any from the changes that remain.
    /// Cheap when no removal names a cutoff for this folder.
    pub fn drop_past_cutoffs(&mut self, view: &MembershipView) -> Result<Dropped, IndexError> {
        let tag = folder_tag(&self.mesh, &self.folder);
        let cutoffs: HashMap<DeviceId, &Cutoff> = view
            .cutoffs
            .iter()
            .filter(|((_, t), _)| *t == tag)
            .map(|((device, _), cutoff)| (*device, cutoff))
            .collect();
        let mut dropped = Dropped::default();
        if cutoffs.is_empty() {
            return Ok(dropped);
        }
        self.held.retain(|a| {
            let Some((device, incarnation)) = actor_device(a.change.actor_id()) else {
                return false;
            };
            cutoffs
                .get(&device)
                .is_none_or(|c| c.admits(a.shard, incarnation, a.change.seq(), &a.change.hash()))
        });
        let me = actor_device(&self.actor).map(|(d, _)| d);
        let late = |shard: u16| {
            let cutoffs = &cutoffs;
            move |change: &automerge::Change| {
                actor_device(change.actor_id()).is_some_and(|(device, inc)| {
                    cutoffs
                        .get(&device)
                        .is_some_and(|c| !c.admits(shard, inc, change.seq(), &change.hash()))
                })
            }
        };
        for (&shard, s) in self.shards.iter_mut() {
            s.rebuild_without(&self.actor, me, late(shard), &mut dropped)?;
        }
        // An unloaded shard is read back, and kept only if it lost changes.
        let unloaded: Vec<u16> = self.cold.keys().copied().collect();
        for shard in unloaded {
            let mut s = self.read_cold(shard)?;
            let before = dropped.changes;
            s.rebuild_without(&self.actor, me, late(shard), &mut dropped)?;
            if dropped.changes > before {
                s.used = true;
                self.cold.remove(&shard);
                self.shards.insert(shard, s);
            }
        }
        dropped.newest_own_only();
        Ok(dropped)
    }
}

impl Dropped {
    pub(super) fn merge(&mut self, other: Dropped) {
        self.paths.extend(other.paths);
        self.changes += other.changes;
        self.own.extend(other.own);
        self.newest_own_only();
    }

    /// Keeps, of this replica's own dropped records, the newest per path.
    pub(super) fn newest_own_only(&mut self) {
        let mut newest: BTreeMap<String, FileRecord> = BTreeMap::new();
        for record in self.own.drain(..) {
            if newest
                .get(&record.path)
                .is_none_or(|r| r.version < record.version)
            {
                newest.insert(record.path.clone(), record);
            }
        }
        self.own = newest.into_values().collect();
    }
}

impl Shard {
    /// Rebuilds this shard's document without the changes `is_root` picks and every change
    /// that depends on one (the signatures of what leaves go too), noting in `dropped` the paths
    /// they touched and the records of this replica's device (`me`) among them.
    pub(super) fn rebuild_without(
        &mut self,
        actor: &ActorId,
        me: Option<DeviceId>,
        is_root: impl Fn(&automerge::Change) -> bool,
        dropped: &mut Dropped,
    ) -> Result<(), IndexError> {
        let changes = self.doc.get_changes(&[]);
        let mut out: HashSet<ChangeHash> = HashSet::new();
        for change in &changes {
            // Changes come in causal order: a dependent follows what it depends on.
            if is_root(change) || change.deps().iter().any(|d| out.contains(d)) {
                out.insert(change.hash());
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        let (gone, keep): (Vec<automerge::Change>, Vec<automerge::Change>) =
            changes.into_iter().partition(|c| out.contains(&c.hash()));
        for change in &gone {
            let mine = me.is_some() && actor_device(change.actor_id()).map(|(d, _)| d) == me;
            for op in change.decode().operations {
                let Ok(path) = admit_op(&op) else { continue };
                if let (true, automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(b))) =
                    (mine, &op.action)
                {
                    dropped.own.extend(FileRecord::decode(&path, b).ok());
                }
                dropped.paths.insert(path);
            }
        }
        let mut doc = AutoCommit::new().with_actor(actor.clone());
        doc.apply_changes(keep)?;
        self.signatures.retain(|h, _| !out.contains(h));
        self.sent = doc.get_heads();
        self.doc = doc;
        self.saved = None; // what was saved still holds the dropped changes
        self.compact_heads = Vec::new();
        self.durable = None;
        dropped.changes += out.len();
        Ok(())
    }
}
