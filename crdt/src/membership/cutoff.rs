//! A removed device's cutoff: the last index changes of it that count, named by the admin who
//! removed it ([`Action::Cutoff`]). See `index::signed` for how replicas use it.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

/// A folder as the membership log names it: a hash of the mesh and folder IDs, so the log
/// (which storage peers read) never shows a folder's ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct FolderTag(pub [u8; 32]);

/// A device's last change in one shard of one folder, for one incarnation of its index actor.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ChangeMark {
    pub shard: u16,
    pub incarnation: u32,
    pub seq: u64,
    pub hash: [u8; 32],
}

/// A removed device's last change that counts in one shard and incarnation: its sequence
/// number, and its hash (or hashes, if two removals named different ones).
pub type LastChange = (u64, BTreeSet<[u8; 32]>);

/// The changes a removed device may still have made in one shard: per incarnation, the sequence
/// number of its last change that counts, and that change's hash (or hashes, if two removals
/// named different ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cutoff {
    pub last: BTreeMap<(u16, u32), LastChange>,
}

impl Cutoff {
    /// Adds what one removal names; of two, the later change counts.
    pub fn merge(&mut self, marks: &[ChangeMark]) {
        for mark in marks {
            let slot = self
                .last
                .entry((mark.shard, mark.incarnation))
                .or_insert_with(|| (mark.seq, BTreeSet::new()));
            if mark.seq > slot.0 {
                *slot = (mark.seq, BTreeSet::new());
            }
            if mark.seq == slot.0 {
                slot.1.insert(mark.hash);
            }
        }
    }

    /// Whether the change `seq` (hash `hash`) of `incarnation` in `shard` is one the removed
    /// device made before its removal.
    pub fn admits(&self, shard: u16, incarnation: u32, seq: u64, hash: &ChangeHash) -> bool {
        match self.last.get(&(shard, incarnation)) {
            Some((last, hashes)) => seq < *last || (seq == *last && hashes.contains(&hash.0)),
            None => false,
        }
    }
}
