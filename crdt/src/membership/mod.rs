//! The signed membership log: who belongs to the mesh, in which role, and who may change that.
//!
//! The log is a set of [`SignedEntry`]s held in one Automerge document, each under the hex of
//! its own BLAKE3 hash, so a replayed entry lands on the same key and changes nothing. Each entry
//! names the entries its signer had seen (`parents`), which makes the log a causal graph.
//!
//! [`MembershipView::evaluate`] is a pure function of that set, so every replica holding the
//! same entries computes the same members. The rules:
//!
//! 1. The genesis entry has no parents and is signed by the creator, whose key and nonce
//!    derive the mesh ID; the creator is the first admin.
//! 2. Entries are applied in a deterministic topological order (parents first, then by hash).
//!    An entry counts only if its signer is an admin at that point; anything signed by an
//!    unknown, removed or non-admin key is ignored, with the reason kept in
//!    [`MembershipView::ignored`].
//! 3. A removal (or demotion) beats what is concurrent with it: an `Add` of the same device
//!    that neither precedes nor follows the removal causally is ignored, and so is anything the
//!    removed (demoted) device signed concurrently with it. A re-add that causally follows the
//!    removal is honoured.
//! 4. The last admin cannot be removed or demoted, and a storage peer cannot be an admin.
//! 5. Every counted removal starts a new mesh-key epoch.
//!
//! Entries reach the document only through [`MembershipLog::append`] (which signs) or
//! [`MembershipLog::apply`], which refuses any change holding anything but well-formed,
//! correctly signed entries of this mesh under their own hash.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{transaction::Transactable, ActorId, AutoCommit, ChangeHash, ReadDoc, ROOT};
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, Epoch, MeshId};
use crate::keys::{verify, DeviceKeys, KemPublicKey, MeshKey, SealedKey, Signature, WrappedKey};
use crate::name::SealedName;

const SIGNING_CONTEXT: &str = "meshsync membership entry v1";

/// The most membership changes taken in one message (a mesh's whole history is far less).
pub const MAX_MEMBERSHIP_CHANGES: usize = 10_000;
/// The largest membership change taken (one entry is a few hundred bytes).
pub const MAX_MEMBERSHIP_CHANGE_BYTES: usize = 1024 * 1024;
/// The most entries one membership change may put.
pub const MAX_MEMBERSHIP_OPS: usize = 1_000;
/// The most parents an entry may name (it names the heads its signer had seen: a handful).
pub const MAX_PARENTS: usize = 256;
/// Entries larger than this are refused: a membership entry is small (keys and a name).
const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// What a member may do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug, PartialOrd, Ord)]
pub enum Role {
    /// A full device: holds the mesh key, reads and writes folders.
    Device,
    /// Holds the mesh key and reads, but others refuse its signed changes.
    ReadOnly,
    /// Stores and serves ciphertext; never holds a mesh key.
    Storage,
}

impl Role {
    pub fn holds_mesh_key(self) -> bool {
        matches!(self, Role::Device | Role::ReadOnly)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Device => "device",
            Role::ReadOnly => "read-only",
            Role::Storage => "storage",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device" => Ok(Role::Device),
            "read-only" | "readonly" => Ok(Role::ReadOnly),
            "storage" => Ok(Role::Storage),
            other => Err(format!(
                "unknown role {other:?}: use device, read-only or storage"
            )),
        }
    }
}

/// What an entry does.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Action {
    /// Creates the mesh; the signer becomes its first admin and a full device.
    Genesis {
        nonce: [u8; 16],
        name: SealedName,
        kem: KemPublicKey,
        /// The epoch-0 mesh key, wrapped to the creator.
        wrapped: Option<WrappedKey>,
    },
    Add {
        device: DeviceId,
        role: Role,
        name: SealedName,
        kem: Option<KemPublicKey>,
        /// The current mesh key wrapped to the new device (full devices only).
        wrapped: Option<WrappedKey>,
    },
    /// Removes a device and starts a new epoch, whose key is wrapped to every remaining device;
    /// `chain` holds every older epoch's key sealed under the new one. `wipe`: the device is
    /// asked to erase what it holds if it ever comes back (it does so only if it accepted
    /// remote wipe when it joined, see [`Action::WipePolicy`]).
    Remove {
        device: DeviceId,
        wraps: Vec<WrappedKey>,
        chain: Vec<SealedKey>,
        wipe: bool,
    },
    SetRole {
        device: DeviceId,
        role: Role,
    },
    SetAdmin {
        device: DeviceId,
        admin: bool,
    },
    /// Renames a member (signed by an admin, or by the member itself).
    SetName {
        device: DeviceId,
        name: SealedName,
    },
    /// Starts key epoch `epoch` without removing anyone: a fresh key wrapped to every member
    /// that holds keys, older keys chained. An admin signs one when the log says the mesh
    /// needs it ([`MembershipView::needs_rotation`]): after concurrent removals, or when a
    /// member lacks the current key. Counts only if it starts the very next epoch, so of two
    /// concurrent rotations one counts.
    Rotate {
        epoch: Epoch,
        wraps: Vec<WrappedKey>,
        chain: Vec<SealedKey>,
    },
    /// Whether this device accepts remote wipe (signed by the device itself, when it joins).
    WipePolicy {
        device: DeviceId,
        accepts: bool,
    },
    /// The last index changes of a removed `device` that count in one folder (an admin signs
    /// one per folder it holds, with the removal): every later change the device signs there
    /// is refused, whatever epoch it claims. Counts only once the device is removed.
    Cutoff {
        device: DeviceId,
        folder: FolderTag,
        last: Vec<ChangeMark>,
    },
}

/// One membership change, before signing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Entry {
    pub mesh: MeshId,
    pub parents: Vec<EntryHash>,
    pub signer: DeviceId,
    /// Unix seconds when it was signed; informational only.
    pub time: u64,
    pub action: Action,
}

/// An entry with its signer's signature over its encoding.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SignedEntry {
    entry: Vec<u8>,
    signature: Signature,
}

/// The BLAKE3 hash of an encoded [`SignedEntry`]; its key in the log.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryHash(pub [u8; 32]);

impl EntryHash {
    fn of(encoded: &[u8]) -> Self {
        EntryHash(*blake3::hash(encoded).as_bytes())
    }

    pub fn to_hex(self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl std::fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EntryHash({})", &self.to_hex()[..12])
    }
}

/// Why a membership operation or an incoming change was refused.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("membership change could not be decoded: {0}")]
    Malformed(String),
    #[error("membership change holds an entry with a bad signature (signer {0:?})")]
    BadSignature(DeviceId),
    #[error("membership change holds an entry for another mesh ({0})")]
    WrongMesh(MeshId),
    #[error("membership change does something other than add entries: {0}")]
    ForbiddenOp(String),
    #[error("this device is not an admin of the mesh; ask an admin to run this")]
    NotAdmin,
    #[error("the membership document is damaged: {0}")]
    Document(#[from] automerge::AutomergeError),
    #[error("the saved membership log belongs to mesh {found}, not {expected}")]
    SavedForOtherMesh { expected: MeshId, found: MeshId },
    #[error("the membership log has no valid genesis entry for mesh {0}")]
    NoGenesis(MeshId),
}

impl SignedEntry {
    fn sign(keys: &DeviceKeys, entry: &Entry) -> Self {
        let bytes = postcard::to_stdvec(entry).expect("entries always encode");
        let signature = keys.sign(SIGNING_CONTEXT, &bytes);
        SignedEntry {
            entry: bytes,
            signature,
        }
    }

    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries always encode")
    }

    /// Decodes and checks the signature; does not judge authority (that needs the whole log).
    fn decode_verified(bytes: &[u8], mesh: &MeshId) -> Result<Entry, MembershipError> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(MembershipError::Malformed(format!(
                "entry of {} bytes",
                bytes.len()
            )));
        }
        let signed: SignedEntry =
            postcard::from_bytes(bytes).map_err(|e| MembershipError::Malformed(e.to_string()))?;
        let entry: Entry = postcard::from_bytes(&signed.entry)
            .map_err(|e| MembershipError::Malformed(e.to_string()))?;
        if entry.mesh != *mesh {
            return Err(MembershipError::WrongMesh(entry.mesh));
        }
        verify(
            &entry.signer,
            SIGNING_CONTEXT,
            &signed.entry,
            &signed.signature,
        )
        .map_err(|_| MembershipError::BadSignature(entry.signer))?;
        Ok(entry)
    }
}

impl MeshId {
    /// The mesh ID that a genesis entry by `creator` with `nonce` must carry.
    pub fn for_genesis(creator: &DeviceId, nonce: &[u8; 16]) -> MeshId {
        let mut hasher = blake3::Hasher::new_derive_key("meshsync 2026-11 mesh id");
        hasher.update(creator.as_bytes());
        hasher.update(nonce);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        MeshId::from_bytes(id)
    }
}

/// A member as the log says it is now.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Member {
    pub device: DeviceId,
    /// Sealed under the mesh key: storage peers read the log but not the names.
    pub name: SealedName,
    pub role: Role,
    pub admin: bool,
    pub kem: Option<KemPublicKey>,
}

/// Why an entry did not count.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Ignored {
    NotAdmin(DeviceId),
    RemovalBeatsConcurrentAdd,
    SignedConcurrentlyWithOwnRemoval(DeviceId),
    NotAMember(DeviceId),
    AlreadyMember(DeviceId),
    LastAdmin,
    StorageCannotBeAdmin,
    BadGenesis,
    MissingParents,
    /// A rotation that does not start the next epoch (another one did first).
    StaleRotation,
    /// A cutoff for a device that is not removed.
    NotRemoved(DeviceId),
}

/// The members of the mesh as computed from one set of entries.
#[derive(Clone, Debug, Default)]
pub struct MembershipView {
    pub members: BTreeMap<DeviceId, Member>,
    /// Removed devices and the epoch their removal started.
    pub removed: BTreeMap<DeviceId, Epoch>,
    /// The current mesh-key epoch.
    pub epoch: Epoch,
    pub ignored: BTreeMap<EntryHash, Ignored>,
    /// Wrapped mesh keys from counted entries.
    pub wraps: Vec<WrappedKey>,
    /// Devices that accepted remote wipe when they joined.
    pub accepts_wipe: BTreeSet<DeviceId>,
    /// Removed devices' cutoffs, per folder ([`Action::Cutoff`]).
    pub cutoffs: BTreeMap<(DeviceId, FolderTag), Cutoff>,
}

impl MembershipView {
    pub fn is_member(&self, device: &DeviceId) -> bool {
        self.members.contains_key(device)
    }

    pub fn is_admin(&self, device: &DeviceId) -> bool {
        self.members.get(device).is_some_and(|m| m.admin)
    }

    /// Whether `device` may sign file records made in `epoch`: a full device now, or one that
    /// was a full device then and was removed only later.
    pub fn may_write(&self, device: &DeviceId, epoch: Epoch) -> bool {
        match self.members.get(device) {
            Some(member) => member.role == Role::Device,
            None => self.removed.get(device).is_some_and(|&at| epoch < at),
        }
    }

    /// Whether an admin should start a new key epoch: no key counts for the current epoch
    /// (concurrent removals), or a member that holds keys lacks it (added concurrently with a
    /// removal). Every replica with the same entries says the same.
    pub fn needs_rotation(&self) -> bool {
        let current = |device: &DeviceId| {
            self.wraps
                .iter()
                .any(|w| w.recipient == *device && w.epoch == self.epoch)
        };
        let keyed = self.wraps.iter().any(|w| w.epoch == self.epoch);
        !keyed
            || self
                .members
                .values()
                .filter(|m| m.role.holds_mesh_key() && m.kem.is_some())
                .any(|m| !current(&m.device))
    }

    /// Mesh keys wrapped to `device`, newest epoch last.
    pub fn wraps_for(&self, device: &DeviceId) -> Vec<&WrappedKey> {
        let mut wraps: Vec<&WrappedKey> = self
            .wraps
            .iter()
            .filter(|w| w.recipient == *device)
            .collect();
        wraps.sort_by_key(|w| w.epoch);
        wraps
    }
}

/// The membership log of one mesh: its Automerge document, the verified entries it holds, and
/// the view computed from them.
pub struct MembershipLog {
    mesh: MeshId,
    doc: AutoCommit,
    entries: BTreeMap<EntryHash, Entry>,
    /// Verified entries whose Automerge change waits for its dependencies.
    pending: BTreeMap<EntryHash, Entry>,
    view: MembershipView,
}

impl MembershipLog {
    /// Creates a new mesh with `creator` as its first admin. Returns the log and the mesh ID.
    pub fn create(creator: &DeviceKeys, name: &str, epoch0: &crate::MeshKey) -> (Self, MeshId) {
        let nonce: [u8; 16] = crate::random_bytes();
        let mesh = MeshId::for_genesis(&creator.device_id(), &nonce);
        let name = SealedName::seal(epoch0, &mesh, &creator.device_id(), name);
        let wrapped = epoch0
            .wrap_for(&mesh, &creator.device_id(), &creator.kem_public())
            .ok();
        let mut log = MembershipLog::empty(mesh);
        log.insert(
            creator,
            Entry {
                mesh,
                parents: vec![],
                signer: creator.device_id(),
                time: unix_now(),
                action: Action::Genesis {
                    nonce,
                    name,
                    kem: creator.kem_public(),
                    wrapped,
                },
            },
        );
        (log, mesh)
    }

    /// An empty log for `mesh`, to be filled by [`MembershipLog::apply`] (a joining device).
    pub fn empty(mesh: MeshId) -> Self {
        MembershipLog {
            mesh,
            doc: AutoCommit::new().with_actor(ActorId::random()),
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
            view: MembershipView::default(),
        }
    }

    /// Loads a saved log, re-verifying every entry in it.
    pub fn load(mesh: MeshId, saved: &[u8]) -> Result<Self, MembershipError> {
        let doc = AutoCommit::load(saved)?.with_actor(ActorId::random());
        let mut log = MembershipLog {
            mesh,
            doc,
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
            view: MembershipView::default(),
        };
        for key in log.doc.keys(ROOT).collect::<Vec<_>>() {
            let Some((automerge::Value::Scalar(value), _)) = log.doc.get(ROOT, &key)? else {
                return Err(MembershipError::Malformed(format!(
                    "entry {key} is not bytes"
                )));
            };
            let automerge::ScalarValue::Bytes(bytes) = value.as_ref() else {
                return Err(MembershipError::Malformed(format!(
                    "entry {key} is not bytes"
                )));
            };
            let entry = match SignedEntry::decode_verified(bytes, &mesh) {
                Err(MembershipError::WrongMesh(found)) => {
                    return Err(MembershipError::SavedForOtherMesh {
                        expected: mesh,
                        found,
                    })
                }
                other => other?,
            };
            log.entries.insert(EntryHash::of(bytes), entry);
        }
        log.view = MembershipView::evaluate(&mesh, &log.entries);
        Ok(log)
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    pub fn mesh(&self) -> MeshId {
        self.mesh
    }

    pub fn view(&self) -> &MembershipView {
        &self.view
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Encoded Automerge changes the holder of `heads` lacks (all of them for `&[]`).
    pub fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        // Heads from a peer may name changes this replica never saw: they cannot be a base.
        let known: Vec<ChangeHash> = heads
            .iter()
            .filter(|h| self.doc.get_change_by_hash(h).is_some())
            .copied()
            .collect();
        self.doc
            .get_changes(&known)
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// Signs `action` as `signer` and adds it, if `signer` is an admin now.
    pub fn append(
        &mut self,
        signer: &DeviceKeys,
        action: Action,
    ) -> Result<EntryHash, MembershipError> {
        if !self.view.is_admin(&signer.device_id()) {
            return Err(MembershipError::NotAdmin);
        }
        Ok(self.append_unchecked(signer, action))
    }

    /// Signs and adds an entry without asking whether the signer may; the evaluation still
    /// decides whether it counts. For tests of exactly that.
    #[doc(hidden)]
    pub fn append_unchecked(&mut self, signer: &DeviceKeys, action: Action) -> EntryHash {
        let entry = Entry {
            mesh: self.mesh,
            parents: self.frontier(),
            signer: signer.device_id(),
            time: unix_now(),
            action,
        };
        self.insert(signer, entry)
    }

    fn insert(&mut self, signer: &DeviceKeys, entry: Entry) -> EntryHash {
        let encoded = SignedEntry::sign(signer, &entry).encode();
        let hash = EntryHash::of(&encoded);
        self.doc
            .put(ROOT, hash.to_hex(), encoded)
            .expect("putting into the root map cannot fail");
        self.doc.commit();
        self.entries.insert(hash, entry);
        self.view = MembershipView::evaluate(&self.mesh, &self.entries);
        hash
    }

    /// The entries no other entry names as a parent: what a new entry follows.
    fn frontier(&self) -> Vec<EntryHash> {
        let named: BTreeSet<&EntryHash> = self.entries.values().flat_map(|e| &e.parents).collect();
        self.entries
            .keys()
            .filter(|h| !named.contains(h))
            .copied()
            .collect()
    }

    /// Refuses entries that could never count, before they are stored: one signed by a key
    /// that is not and never was a member (the mesh's creator, or a device some such key
    /// added — in this log or in the same batch), or naming more than [`MAX_PARENTS`] parents.
    /// Without this, anyone who got a change in could fill every replica with junk entries
    /// that evaluation would ignore but everyone would keep.
    fn admit_signers(&self, new_entries: &[(EntryHash, Entry)]) -> Result<(), MembershipError> {
        let mut known: BTreeSet<DeviceId> = self.view.members.keys().copied().collect();
        known.extend(self.view.removed.keys().copied());
        let all = || {
            self.entries
                .values()
                .chain(self.pending.values())
                .chain(new_entries.iter().map(|(_, e)| e))
        };
        for entry in all() {
            if let Action::Genesis { nonce, .. } = &entry.action {
                if entry.parents.is_empty()
                    && MeshId::for_genesis(&entry.signer, nonce) == self.mesh
                {
                    known.insert(entry.signer);
                }
            }
        }
        // Devices added by known signers become known, to a fixed point (bounded by the
        // number of entries).
        loop {
            let grown: Vec<DeviceId> = all()
                .filter(|e| known.contains(&e.signer))
                .filter_map(|e| match &e.action {
                    Action::Add { device, .. } if !known.contains(device) => Some(*device),
                    _ => None,
                })
                .collect();
            if grown.is_empty() {
                break;
            }
            known.extend(grown);
        }
        for (_, entry) in new_entries {
            if entry.parents.len() > MAX_PARENTS {
                return Err(MembershipError::ForbiddenOp(format!(
                    "an entry names {} parents (at most {MAX_PARENTS})",
                    entry.parents.len()
                )));
            }
            if !known.contains(&entry.signer) {
                return Err(MembershipError::ForbiddenOp(format!(
                    "an entry signed by {}, which never was a member",
                    entry.signer.short()
                )));
            }
        }
        Ok(())
    }

    /// Applies changes from a peer (at most [`MAX_MEMBERSHIP_CHANGES`], each plain, at most
    /// [`MAX_MEMBERSHIP_CHANGE_BYTES`] and [`MAX_MEMBERSHIP_OPS`] operations), after checking
    /// each of them: every operation must put a
    /// well-formed, correctly signed entry of this mesh under its own hash. One bad change
    /// refuses the whole batch and leaves the log untouched.
    pub fn apply(&mut self, changes: &[Vec<u8>]) -> Result<usize, MembershipError> {
        let mut decoded = Vec::with_capacity(changes.len());
        let mut new_entries = Vec::new();
        if changes.len() > MAX_MEMBERSHIP_CHANGES {
            return Err(MembershipError::Malformed(format!(
                "{} membership changes at once (at most {MAX_MEMBERSHIP_CHANGES})",
                changes.len()
            )));
        }
        for raw in changes {
            let change =
                crate::bounds::bounded_change(raw, MAX_MEMBERSHIP_CHANGE_BYTES, MAX_MEMBERSHIP_OPS)
                    .map_err(MembershipError::Malformed)?;
            for op in change.decode().operations {
                let forbidden = |what: &str| MembershipError::ForbiddenOp(what.to_string());
                if op.obj != automerge::legacy::ObjectId::Root || op.insert {
                    return Err(forbidden("operation outside the entry map"));
                }
                let automerge::legacy::Key::Map(key) = &op.key else {
                    return Err(forbidden("list operation"));
                };
                let automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(bytes)) =
                    &op.action
                else {
                    return Err(forbidden("an operation other than adding an entry"));
                };
                let hash = EntryHash::of(bytes);
                if hash.to_hex() != key.as_str() {
                    return Err(forbidden("entry stored under a key that is not its hash"));
                }
                new_entries.push((hash, SignedEntry::decode_verified(bytes, &self.mesh)?));
            }
            decoded.push(change);
        }
        self.admit_signers(&new_entries)?;
        let before = self.entries.len();
        self.doc.apply_changes(decoded)?;
        // A change whose dependencies have not arrived waits inside Automerge; its entries
        // count only once the document holds them.
        self.pending.extend(new_entries);
        let arrived: Vec<EntryHash> = self
            .pending
            .keys()
            .filter(|h| matches!(self.doc.get(ROOT, h.to_hex()), Ok(Some(_))))
            .copied()
            .collect();
        for hash in arrived {
            if let Some(entry) = self.pending.remove(&hash) {
                self.entries.insert(hash, entry);
            }
        }
        self.view = MembershipView::evaluate(&self.mesh, &self.entries);
        Ok(self.entries.len() - before)
    }

    /// The verified entries, by hash (for inspection and tests).
    pub fn entries(&self) -> &BTreeMap<EntryHash, Entry> {
        &self.entries
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

mod cutoff;
mod evaluate;
mod manage;

pub use cutoff::{ChangeMark, Cutoff, FolderTag};
pub use manage::KeyRing;

#[cfg(test)]
mod tests;
