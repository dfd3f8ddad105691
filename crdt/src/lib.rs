//! meshsync's replicated state, and the identities and keys it is built on.
//!
//! This crate knows Automerge and signatures, never sockets or files on disk:
//!
//! - [`id`]: [`DeviceId`] (an Ed25519 public key in a human-checkable form, convertible to a
//!   libp2p `PeerId`), [`MeshId`], [`FolderId`], [`Epoch`].
//! - [`keys`]: [`DeviceKeys`], the per-epoch [`MeshKey`] and its subkeys, HPKE [`WrappedKey`]s.
//! - [`membership`]: the signed membership log. Who is a member is a pure function of the set
//!   of entries, so every replica that holds the same entries agrees.
//! - [`index`]: the file index, sharded over many small Automerge documents, holding signed
//!   [`FileRecord`]s; concurrent versions of a path surface as a winner plus conflict losers.
//! - [`name`]: [`SealedName`], a device name in the log that only members can read.
//! - [`sealed`]: [`SealedChange`], the AEAD-sealed, signed form of a state change that storage
//!   peers hold without being able to read it.
//!
//! Nothing enters a replica before its signature and authority are checked: see
//! [`membership::MembershipLog::apply`] and [`index::FolderIndex::apply`].

mod bounds;
pub mod id;
pub mod index;
pub mod keys;
pub mod membership;
pub mod name;
pub mod sealed;

pub use id::{ChunkId, DeviceId, DeviceIdError, Epoch, FolderId, IdError, MeshId};
pub use index::{
    ChunkListHash, FileKind, FileRecord, FolderIndex, IndexError, PathState, SavedShard,
};
pub use keys::{DeviceKeys, KemPublicKey, KeyError, MeshKey, SealedKey, Signature, WrappedKey};
pub use membership::{
    Action, KeyRing, Member, MembershipError, MembershipLog, MembershipView, Role,
};
pub use name::SealedName;
pub use sealed::{SealedChange, SealedError, SignedHead};

/// `N` bytes from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}
