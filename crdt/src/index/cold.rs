//! Unloading cold shards. At a million files the index is ~240 MB in memory, most of it in
//! shards nothing has touched for a while: a change touches the few shards of the folders it
//! is in. A shard whose saves (whole, then pieces) the caller confirmed persisted, and unused
//! since the last round, can be unloaded ([`FolderIndex::unload_unused`]) without being saved
//! again: a shard a change touched once costs no whole save when it goes. What the index keeps of
//! it is its heads and size, so comparing heads with a peer, counting paths and saving need
//! nothing back. Whatever reads or changes its records loads it again from its save, through
//! the [`ShardLoader`] the caller gave: [`FolderIndex::warm`] before a batch of lookups, and
//! every writing call (write, apply) loads what it touches itself. A full pass (`iter`,
//! serving a peer's catch-up, looking for a removed device's changes) reads unloaded shards one
//! at a time and does not keep them.

use std::collections::BTreeSet;
use std::sync::Arc;

use automerge::{ChangeHash, ReadDoc, ROOT};
use rayon::prelude::*;

use super::{shard_of, FolderIndex, IndexError, Shard};

/// Reads a shard's saves back (its whole save, then its pieces in order) from where the caller
/// persisted what [`FolderIndex::save_shard`] and [`FolderIndex::compact`] gave.
pub type ShardLoader = Arc<dyn Fn(u16) -> Result<Vec<Vec<u8>>, String> + Send + Sync>;

/// What an index keeps of a shard it holds unloaded: its heads and number of paths as its
/// saves (whole, then pieces) have them. Kept by the caller beside those saves ([`FolderIndex::summary`]), it
/// lets an index start with the shard unloaded ([`FolderIndex::start_unloaded`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSummary {
    pub heads: Vec<ChangeHash>,
    pub len: usize,
}

/// What the index keeps of an unloaded shard.
pub(super) struct Cold {
    pub(super) heads: Vec<ChangeHash>,
    /// Its number of paths.
    pub(super) len: usize,
}

impl FolderIndex {
    /// Lets this index unload shards (see [`FolderIndex::unload_unused`]), reading them back
    /// with `loader`. Without one, every shard stays in memory.
    pub fn with_loader(mut self, loader: ShardLoader) -> Self {
        self.loader = Some(loader);
        self
    }

    /// Loads the shards that hold `paths`, on every core: lookups of them are then quick, and
    /// a shard that cannot be read is reported here.
    pub fn warm<'p>(&mut self, paths: impl IntoIterator<Item = &'p str>) -> Result<(), IndexError> {
        let ids: BTreeSet<u16> = paths
            .into_iter()
            .map(|p| shard_of(&self.folder, p))
            .collect();
        self.warm_shards(ids)
    }

    /// Loads the shards `ids` that are unloaded, and marks all of them used.
    pub(super) fn warm_shards(
        &mut self,
        ids: impl IntoIterator<Item = u16>,
    ) -> Result<(), IndexError> {
        let mut unloaded = Vec::new();
        for id in ids {
            match self.shards.get_mut(&id) {
                Some(shard) => shard.used = true,
                None if self.cold.contains_key(&id) => unloaded.push(id),
                None => {}
            }
        }
        let loaded: Vec<(u16, Shard)> = unloaded
            .into_par_iter()
            .map(|id| Ok((id, self.read_cold(id)?)))
            .collect::<Result<_, IndexError>>()?;
        for (id, mut shard) in loaded {
            shard.used = true;
            self.cold.remove(&id);
            self.shards.insert(id, shard);
        }
        Ok(())
    }

    /// Reads the unloaded shard `id` from its save (the index does not keep it).
    pub(super) fn read_cold(&self, id: u16) -> Result<Shard, IndexError> {
        let loader = self
            .loader
            .as_ref()
            .ok_or_else(|| IndexError::Load(format!("shard {id} is unloaded and no loader")))?;
        let saves = loader(id).map_err(IndexError::Load)?;
        let shard = Shard::from_saves(&self.actor, saves)?;
        if self.cold.get(&id).map(|c| &c.heads) != shard.durable.as_ref() {
            return Err(IndexError::Load(format!(
                "shard {id} read back is not the shard that was unloaded"
            )));
        }
        Ok(shard)
    }

    /// Notes that the last saves of `ids` ([`FolderIndex::compact`]'s whole saves, or
    /// [`FolderIndex::save_shard`]'s wholes and pieces) are persisted: those shards may be
    /// unloaded, and read back from their saves.
    pub fn confirm_saved(&mut self, ids: impl IntoIterator<Item = u16>) {
        for id in ids {
            if let Some(shard) = self.shards.get_mut(&id) {
                shard.durable = shard.saved.as_ref().map(|mark| mark.heads.clone());
            }
        }
    }

    /// Notes that the last saves of `ids` were not persisted (the commit that held them
    /// failed): their next saves are whole, so that no piece is ever persisted after one that
    /// never reached the disk (read back, such a shard would lack the lost piece's changes).
    pub fn saves_lost(&mut self, ids: impl IntoIterator<Item = u16>) {
        for id in ids {
            if let Some(shard) = self.shards.get_mut(&id) {
                shard.saved = None;
                shard.durable = None;
            }
        }
    }

    /// Unloads every shard whose saves, as it is, are persisted (see
    /// [`FolderIndex::confirm_saved`]) and cheap to read back (a whole and at most one piece;
    /// [`FolderIndex::compact`] saves the others whole), that has nothing unsent and was not
    /// used since the last call; returns how many. Does nothing without a loader.
    pub fn unload_unused(&mut self) -> usize {
        if self.loader.is_none() {
            return 0;
        }
        let (actor, cold) = (&self.actor, &mut self.cold);
        let before = cold.len();
        self.shards.retain(|&id, shard| {
            let heads = shard.doc.get_heads();
            let unload = !shard.used && shard.may_go(&heads) && !shard.has_unsent(actor);
            shard.busy_rounds = match shard.used {
                true => shard.busy_rounds.saturating_add(1),
                false => 0,
            };
            shard.used = false;
            if unload {
                let len = shard.doc.length(ROOT);
                cold.insert(id, Cold { heads, len });
            }
            !unload
        });
        cold.len() - before
    }

    /// How many shards are in memory.
    pub fn loaded_shards(&self) -> usize {
        self.shards.len()
    }

    /// Shard `id` as its last save (whole or piece) left it, if it has not changed since:
    /// what to keep beside that save (in the same commit) for a later start to leave the shard
    /// unloaded. `None` for a shard with changes not saved yet.
    pub fn summary(&mut self, id: u16) -> Option<ShardSummary> {
        if let Some(cold) = self.cold.get(&id) {
            return Some(ShardSummary {
                heads: cold.heads.clone(),
                len: cold.len,
            });
        }
        let shard = self.shards.get_mut(&id)?;
        let heads = shard.doc.get_heads();
        let mark = shard.saved.as_ref()?;
        (mark.heads == heads).then(|| ShardSummary {
            heads,
            len: shard.doc.length(ROOT),
        })
    }

    /// Takes shards whose saves were not loaded, by their summaries: they stay unloaded until
    /// something reads them, through the loader (which must be set). A summary that is not
    /// its shard's (the caller kept a stale one) is found when the shard is read back: an
    /// error, never another shard's records. Shards already loaded are left as they are.
    pub fn start_unloaded(
        &mut self,
        shards: impl IntoIterator<Item = (u16, ShardSummary)>,
    ) -> Result<(), IndexError> {
        for (id, summary) in shards {
            if id >= super::SHARDS {
                return Err(IndexError::BadShard(id));
            }
            if !self.shards.contains_key(&id) {
                let (heads, len) = (summary.heads, summary.len);
                self.cold.insert(id, Cold { heads, len });
            }
        }
        Ok(())
    }
}

impl Shard {
    /// Whether it holds changes of `actor` (this replica's) that
    /// [`FolderIndex::take_local_changes`] has not given out yet. Peers' changes applied here
    /// are not this replica's to announce.
    fn has_unsent(&mut self, actor: &automerge::ActorId) -> bool {
        if self.doc.get_heads() == self.sent {
            return false;
        }
        let unsent = self.doc.get_changes(&self.sent);
        unsent.iter().any(|c| c.actor_id() == actor)
    }
}
