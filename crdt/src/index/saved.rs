//! Saving and loading a folder's index: each shard saved whole, then in pieces (the changes
//! since), loaded whole then piece by piece; and compacting in memory a shard that took
//! changes since it was loaded.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ActorId, AutoCommit, ChangeHash};
use rayon::prelude::*;

use super::{signed, FolderIndex, IndexError, Shard, SHARDS};
use crate::id::{FolderId, MeshId};

/// What the saves of a shard hold so far: a whole document, then pieces.
pub(super) struct SaveMark {
    /// The heads the last save (whole or piece) covered.
    pub(super) heads: Vec<ChangeHash>,
    /// How many pieces follow the whole.
    pub(super) pieces: u32,
    /// Their bytes, together.
    pub(super) piece_bytes: usize,
    /// The whole's bytes.
    pub(super) whole_bytes: usize,
}

/// A shard used this many rounds in a row (and in this one) stays in memory, and is held
/// compactly: one change keeps its shards in use for two or three rounds (admitted, written,
/// rescanned, surveyed), and they are unloaded after it.
pub(super) const HOT_ROUNDS: u8 = 8;

/// At most this many pieces follow a shard's whole save before the next save is whole again.
const MAX_PIECES: u32 = 64;

/// Pieces of a shard may add up to this much, or the whole's size if larger, before the next
/// save is whole again: loading costs at most about twice what the shard's whole would, and
/// saving a shard again whole happens after it grew by half (amortised: each record is
/// saved whole a few times, not once per change of its shard).
const PIECE_BYTES_FLOOR: usize = 64 * 1024;

/// A shard's state to persist (see [`FolderIndex::save_shard`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavedShard {
    /// All of the shard: it replaces what was saved before, pieces included.
    Whole(Vec<u8>),
    /// The changes since the last save, the shard's piece number `.0` after its whole:
    /// loaded after the whole and the pieces before it.
    Piece(u32, Vec<u8>),
}

impl FolderIndex {
    /// What to persist of one shard (with its changes' signatures) since its last save, if
    /// anything: the changes since then as a piece, or the whole shard when it has none saved
    /// yet or its pieces have grown as big as its whole (see [`PIECE_BYTES_FLOOR`]). A save of
    /// a whole Automerge document costs in proportion to the shard, a piece in proportion to
    /// the change: at a million files a 1,000-file change touches most shards, and saving each
    /// whole cost more than the change itself.
    pub fn save_shard(&mut self, shard: u16) -> Option<SavedShard> {
        self.shards.get_mut(&shard)?.save()
    }

    /// [`FolderIndex::save_shard`] of each of `ids`, on every core: what to persist of those
    /// that changed since their last save, by shard. (A first scan's slice touches most of the
    /// 1,024 shards: saved one after the other, that was 0.1–0.5 s of the slice.)
    pub fn save_shards(&mut self, ids: &BTreeSet<u16>) -> Vec<(u16, SavedShard)> {
        self.shards
            .par_iter_mut()
            .filter(|(id, _)| ids.contains(id))
            .filter_map(|(id, shard)| Some((*id, shard.save()?)))
            .collect()
    }

    /// Shards changed since they were loaded: each change applied to an Automerge document
    /// leaves it holding its operations in a form about three times the size of the same
    /// document loaded from its save (at a million files, ~600 MB against ~230 MB). Shards
    /// changed since [`FolderIndex::compact`] last came by.
    pub fn loose_shards(&mut self) -> usize {
        self.shards
            .values_mut()
            .filter_map(|s| s.is_loose().then_some(()))
            .count()
    }

    /// Saves up to `max` changed shards whole and loads each again from that save, which
    /// holds it in the least memory; returns the saves, for the caller to persist (they also
    /// replace the shards' pieces). Meant for when the index is quiet: a shard that changes
    /// again grows again.
    pub fn compact(&mut self, max: usize) -> Result<Vec<(u16, SavedShard)>, IndexError> {
        self.compact_where(max, |_, _| true)
    }

    /// [`Self::compact`], of the shards whose heads are still those in `unchanged` (the
    /// quiet ones, while others take a stream of changes).
    pub fn compact_unchanged(
        &mut self,
        max: usize,
        unchanged: &BTreeMap<u16, Vec<ChangeHash>>,
    ) -> Result<Vec<(u16, SavedShard)>, IndexError> {
        self.compact_where(max, |id, heads| unchanged.get(&id) == Some(heads))
    }

    /// Compacts up to `max` loose shards that `pick` (given a shard and its heads) takes, on
    /// every core. With a loader to read shards back:
    /// - one whose saves are persisted as it is, and are a whole alone (see
    ///   [`Shard::may_go`]), is left alone unless it stays in use (see [`HOT_ROUNDS`]): it
    ///   is about to be unloaded as it is;
    /// - one that does not stay in use is only saved whole: loading it again from that save
    ///   would be work thrown away (it is about to be unloaded).
    fn compact_where(
        &mut self,
        max: usize,
        pick: impl Fn(u16, &Vec<ChangeHash>) -> bool,
    ) -> Result<Vec<(u16, SavedShard)>, IndexError> {
        let unloads = self.loader.is_some();
        let picked: Vec<(u16, &mut Shard)> = self
            .shards
            .iter_mut()
            .filter_map(|(id, shard)| {
                let heads = shard.doc.get_heads();
                let loose = heads != shard.compact_heads;
                let leaving = unloads && !shard.stays_in_use() && shard.may_go(&heads);
                (loose && !leaving && pick(*id, &heads)).then_some((*id, shard))
            })
            .take(max)
            .collect();
        picked
            .into_par_iter()
            .map(|(id, shard)| {
                let doc = shard.doc.save();
                let stays = !unloads || shard.stays_in_use();
                if stays {
                    let actor = shard.doc.get_actor().clone();
                    let fresh =
                        AutoCommit::load(&doc).map_err(|e| IndexError::Load(e.to_string()))?;
                    shard.doc = fresh.with_actor(actor);
                    shard.compact_heads = shard.doc.get_heads();
                }
                shard.durable = None; // until the caller confirms the save is persisted
                let bytes = signed::encode_saved(doc, &shard.signatures);
                shard.saved_whole(bytes.len());
                Ok((id, SavedShard::Whole(bytes)))
            })
            .collect()
    }

    /// Every non-empty shard, saved whole (compressed, with history); unloaded ones are read
    /// from their saves.
    pub fn save(&mut self) -> Result<Vec<(u16, Vec<u8>)>, IndexError> {
        let ids: Vec<u16> = self.cold.keys().copied().collect();
        self.warm_shards(ids)?;
        Ok(self
            .shards
            .par_iter_mut()
            .map(|(id, shard)| (*id, shard.save_whole()))
            .collect())
    }

    /// Loads saved shards, in parallel: for each shard its whole save, then its pieces in
    /// order (see [`FolderIndex::save_shard`]), as `(shard, bytes)` in that order. The records
    /// were checked when they were admitted and the saved bytes carry Automerge's own hash
    /// checks.
    pub fn load(
        mesh: MeshId,
        folder: FolderId,
        saved: Vec<(u16, Vec<u8>)>,
    ) -> Result<Self, IndexError> {
        let actor = ActorId::random();
        let mut by_shard: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
        for (id, bytes) in saved {
            if id >= SHARDS {
                return Err(IndexError::BadShard(id));
            }
            by_shard.entry(id).or_default().push(bytes);
        }
        let shards = by_shard
            .into_par_iter()
            .map(|(id, saves)| Ok((id, Shard::from_saves(&actor, saves)?)))
            .collect::<Result<BTreeMap<u16, Shard>, IndexError>>()?;
        Ok(FolderIndex {
            mesh,
            folder,
            actor,
            shards,
            cold: BTreeMap::new(),
            loader: None,
            held: Vec::new(),
        })
    }
}

impl Shard {
    /// A shard from its whole save, then its pieces in order.
    pub(super) fn from_saves(actor: &ActorId, saves: Vec<Vec<u8>>) -> Result<Shard, IndexError> {
        let mut saves = saves.into_iter();
        let whole = saves
            .next()
            .ok_or_else(|| IndexError::Load("a shard with no save".into()))?;
        let whole_bytes = whole.len();
        let (mut doc, mut signatures) = signed::decode_saved(&whole)?;
        let (mut pieces, mut piece_bytes) = (0, 0);
        for piece in saves {
            signed::load_piece(&mut doc, &mut signatures, &piece)?;
            pieces += 1;
            piece_bytes += piece.len();
        }
        let mut doc = doc.with_actor(actor.clone());
        let heads = doc.get_heads();
        // Pieces are applied as changes: such a shard is not held compactly.
        let compact_heads = if pieces == 0 {
            heads.clone()
        } else {
            Vec::new()
        };
        Ok(Shard {
            doc,
            sent: heads.clone(),
            signatures,
            saved: Some(SaveMark {
                heads: heads.clone(),
                pieces,
                piece_bytes,
                whole_bytes,
            }),
            // Read from its saves: as it is, it is persisted.
            durable: Some(heads),
            compact_heads,
            used: false,
            busy_rounds: 0,
        })
    }
}

impl Shard {
    /// Whether it was used this round and the [`HOT_ROUNDS`] before (see
    /// [`FolderIndex::unload_unused`]): it is not about to be unloaded.
    fn stays_in_use(&self) -> bool {
        self.used && self.busy_rounds >= HOT_ROUNDS
    }

    /// Whether it may be unloaded as it is, with `heads`: its saves are persisted as it is
    /// (see [`FolderIndex::confirm_saved`]), and are a whole alone. A piece is read back
    /// change by change, some twenty times slower per record than a whole save: measured on
    /// the shards of a million-file folder after a few dozen 1,000-file changes (~1,000
    /// records, 20–80 changes each), a whole loads in 3.2–3.7 ms, one piece of a 25-record
    /// change adds 1.2–1.9 ms, and the same shard saved whole again loads in 3.1–3.7 ms. The
    /// next change that touches the shard reads it back on the path that change waits for;
    /// the whole save is background work once the shard is quiet.
    pub(super) fn may_go(&self, heads: &Vec<ChangeHash>) -> bool {
        self.durable.as_ref() == Some(heads)
            && (self.saved.as_ref()).is_some_and(|mark| mark.pieces == 0)
    }

    fn is_loose(&mut self) -> bool {
        self.doc.get_heads() != self.compact_heads
    }

    /// See [`FolderIndex::save_shard`].
    fn save(&mut self) -> Option<SavedShard> {
        let heads = self.doc.get_heads();
        if let Some(mark) = &mut self.saved {
            if mark.heads == heads {
                return None;
            }
            if mark.pieces < MAX_PIECES {
                let changes = self.doc.get_changes(&mark.heads);
                let piece = signed::encode_piece(&changes, &self.signatures);
                if mark.piece_bytes + piece.len() <= mark.whole_bytes.max(PIECE_BYTES_FLOOR) {
                    mark.pieces += 1;
                    mark.piece_bytes += piece.len();
                    mark.heads = heads;
                    return Some(SavedShard::Piece(mark.pieces, piece));
                }
            }
        }
        Some(SavedShard::Whole(self.save_whole()))
    }

    /// The whole shard, saved; what follows it is saved as pieces.
    fn save_whole(&mut self) -> Vec<u8> {
        let bytes = signed::encode_saved(self.doc.save(), &self.signatures);
        self.saved_whole(bytes.len());
        bytes
    }

    /// Notes that the shard as it is now was saved whole, in `whole_bytes`.
    fn saved_whole(&mut self, whole_bytes: usize) {
        self.saved = Some(SaveMark {
            heads: self.doc.get_heads(),
            pieces: 0,
            piece_bytes: 0,
            whole_bytes,
        });
    }
}
