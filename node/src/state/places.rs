//! Where chunks lie in current files ([`PLACES`], keyed by chunk), and the journal in front of
//! it.
//!
//! Keyed by chunk, the table takes every file's places at random spots: at a million files a
//! 1,000-file change (the old places removed, the new ones set) rewrote ~17 MB of its pages,
//! ~130 ms of the commit that a peer waits for before it hears of the change. So a commit
//! appends a change's places to a journal instead (one row, a few pages), and they are
//! folded into the table later, off the path a change takes
//! ([`State::fold_places_when_quiet`], from the daemon's background rounds). What the journal
//! holds is also kept in memory, latest per place, and every lookup sees it. A batch with many
//! places (a first scan's or a first sync's slice), or one that comes while much is unfolded,
//! folds the journal and writes its own places straight into the table, in the same commit:
//! memory stays bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use super::*;

/// Places not folded yet: their journal rows by number, each a batch's places in order.
pub(super) const PLACE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("chunk_places_log");

/// A batch with more places than this writes them straight into the table…
const JOURNAL_BATCH: usize = 10_000;
/// …as does any batch while the journal holds more places than this (memory: ~150 bytes each).
const JOURNAL_MAX: usize = 50_000;

/// One place as a journal row keeps it: chunk, folder root, path, and where (`None`: gone).
type Entry = ([u8; 32], Vec<u8>, String, Option<Placed>);
/// A place: chunk, folder root, path.
type Key = ([u8; 32], Vec<u8>, String);

/// The journal's state in memory, shared by every clone of the [`State`].
#[derive(Default)]
pub(super) struct Journal {
    /// Held by whatever writes the journal or the table (a commit with places, a fold), across
    /// its transaction: the next row's number.
    writer: Mutex<u64>,
    /// The latest unfolded change of each place.
    unfolded: RwLock<BTreeMap<Key, Option<Placed>>>,
    /// The next row's number when [`State::fold_places_when_quiet`] last looked.
    seen: std::sync::atomic::AtomicU64,
}

impl Journal {
    /// Reads the unfolded rows back (at open).
    pub(super) fn load(txn: &redb::WriteTransaction) -> Result<Journal, String> {
        let log = txn.open_table(PLACE_LOG).map_err(|e| e.to_string())?;
        let mut unfolded = BTreeMap::new();
        let mut next = 0;
        for row in log.iter().map_err(|e| e.to_string())? {
            let (n, bytes) = row.map_err(|e| e.to_string())?;
            next = n.value() + 1;
            let entries: Vec<Entry> =
                postcard::from_bytes(bytes.value()).map_err(|e| e.to_string())?;
            for (chunk, root, path, placed) in entries {
                unfolded.insert((chunk, root, path), placed);
            }
        }
        Ok(Journal {
            writer: Mutex::new(next),
            unfolded: RwLock::new(unfolded),
            seen: Default::default(),
        })
    }
}

/// What a commit did with its batch's places, to note in memory once it is durable.
pub(super) enum Written {
    None,
    /// Appended as a journal row.
    Journal(Vec<Entry>),
    /// Into the table, with every row before them: nothing is unfolded any more.
    Folded,
}

impl State {
    /// Writes `places` (in order) within `txn`: as a journal row, or, if there are many or the
    /// journal holds many, into the table after folding the journal. `next` is the writer's
    /// guard (the next row's number), held until the commit is done and noted.
    pub(super) fn write_places(
        &self,
        txn: &redb::WriteTransaction,
        next: &mut u64,
        places: &[(ChunkId, Arc<PathBuf>, String, Option<Placed>)],
    ) -> Result<Written, StateError> {
        if places.is_empty() {
            return Ok(Written::None);
        }
        let mut entries: Vec<Entry> = places
            .iter()
            .map(|(id, root, path, placed)| {
                let root = root.as_os_str().as_bytes().to_vec();
                (id.0, root, path.clone(), *placed)
            })
            .collect();
        let held = self.journal.unfolded.read().expect("journal lock").len();
        if entries.len() <= JOURNAL_BATCH && held + entries.len() <= JOURNAL_MAX {
            let bytes = postcard::to_stdvec(&entries).map_err(|e| self.err(e))?;
            let mut log = txn.open_table(PLACE_LOG).map_err(|e| self.err(e))?;
            log.insert(*next, &bytes[..]).map_err(|e| self.err(e))?;
            *next += 1;
            return Ok(Written::Journal(entries));
        }
        self.fold_in(txn)?;
        // In key order (stable: a place taken away then set again stays in that order), each
        // insert lands next to the last instead of anywhere in the table.
        entries.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        let mut table = txn.open_table(PLACES).map_err(|e| self.err(e))?;
        for entry in &entries {
            self.put_place(&mut table, entry)?;
        }
        Ok(Written::Folded)
    }

    /// Notes in memory what [`State::write_places`] wrote, once its commit is durable.
    pub(super) fn note_places(&self, written: Written) {
        let unfolded = || self.journal.unfolded.write().expect("journal lock");
        match written {
            Written::None => {} // most commits: the lookups' lock is not taken
            Written::Journal(entries) => {
                let mut unfolded = unfolded();
                for (chunk, root, path, placed) in entries {
                    unfolded.insert((chunk, root, path), placed);
                }
            }
            Written::Folded => unfolded().clear(),
        }
    }

    /// The writer's guard: see [`Journal::writer`].
    pub(super) fn places_writer(&self) -> std::sync::MutexGuard<'_, u64> {
        self.journal.writer.lock().expect("journal lock")
    }

    /// Folds every journal row into the table (in order) and empties the journal, within
    /// `txn` (whose caller holds the writer's guard).
    pub(super) fn fold_in(&self, txn: &redb::WriteTransaction) -> Result<usize, StateError> {
        let mut log = txn.open_table(PLACE_LOG).map_err(|e| self.err(e))?;
        let mut table = txn.open_table(PLACES).map_err(|e| self.err(e))?;
        let mut folded = 0;
        for row in log.iter().map_err(|e| self.err(e))? {
            let (_, bytes) = row.map_err(|e| self.err(e))?;
            let entries: Vec<Entry> =
                postcard::from_bytes(bytes.value()).map_err(|e| self.err(e))?;
            for entry in &entries {
                self.put_place(&mut table, entry)?;
            }
            folded += entries.len();
        }
        log.retain(|_, _| false).map_err(|e| self.err(e))?;
        Ok(folded)
    }

    fn put_place(
        &self,
        table: &mut redb::Table<PlaceKey, &[u8]>,
        (chunk, root, path, placed): &Entry,
    ) -> Result<(), StateError> {
        let key = (&chunk[..], &root[..], path.as_str());
        match placed {
            Some(placed) => {
                let bytes = postcard::to_stdvec(placed).map_err(|e| self.err(e))?;
                table.insert(key, &bytes[..]).map_err(|e| self.err(e))?;
            }
            None => {
                table.remove(key).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Folds the journal into the table if it holds anything and took no row since the last
    /// call (a commit with places waits for a fold: one is not started while changes come);
    /// returns how many places. Called from the daemon's background rounds.
    pub fn fold_places_when_quiet(&self) -> Result<usize, StateError> {
        let writer = self.places_writer();
        let seen = self
            .journal
            .seen
            .swap(*writer, std::sync::atomic::Ordering::Relaxed);
        if seen != *writer {
            return Ok(0);
        }
        self.fold_places_held()
    }

    /// Folds the journal into the table, if it holds anything; returns how many places.
    #[cfg(test)]
    pub(super) fn fold_places(&self) -> Result<usize, StateError> {
        let _writer = self.places_writer();
        self.fold_places_held()
    }

    /// Folds the journal into the table, if it holds anything, the writer's guard held by
    /// the caller; returns how many places.
    fn fold_places_held(&self) -> Result<usize, StateError> {
        if self
            .journal
            .unfolded
            .read()
            .expect("journal lock")
            .is_empty()
        {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let folded = self.fold_in(&txn)?;
        txn.commit().map_err(|e| self.err(e))?;
        self.note_places(Written::Folded);
        Ok(folded)
    }

    /// Where the chunks `ids` lie in current files, for each that lies somewhere (one read).
    pub fn places<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Result<HashMap<ChunkId, Vec<Place>>, StateError> {
        let ids: Vec<&ChunkId> = ids.into_iter().collect();
        // What the journal holds for them, read before the table: a fold in between leaves
        // them in both, which reads the same.
        let unfolded: BTreeMap<Key, Option<Placed>> = {
            let all = self.journal.unfolded.read().expect("journal lock");
            let mut some = BTreeMap::new();
            if !all.is_empty() {
                for id in &ids {
                    let from = (id.0, Vec::new(), String::new());
                    let of_id = all.range(from..).take_while(|((c, _, _), _)| *c == id.0);
                    some.extend(of_id.map(|(k, v)| (k.clone(), *v)));
                }
            }
            some
        };
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PLACES).map_err(|e| self.err(e))?;
        let mut out: HashMap<ChunkId, Vec<Place>> = Default::default();
        for id in ids {
            if out.contains_key(id) {
                continue;
            }
            let from: PlaceKey = (&id.0[..], &[], "");
            let mut found: BTreeMap<(Vec<u8>, String), Placed> = BTreeMap::new();
            for row in table.range(from..).map_err(|e| self.err(e))? {
                let (key, value) = row.map_err(|e| self.err(e))?;
                let (chunk, root, rel) = key.value();
                if chunk != &id.0[..] {
                    break;
                }
                let Ok(placed) = postcard::from_bytes::<Placed>(value.value()) else {
                    continue;
                };
                found.insert((root.to_vec(), rel.to_string()), placed);
            }
            let from = (id.0, Vec::new(), String::new());
            for ((chunk, root, rel), placed) in unfolded.range(from..) {
                if *chunk != id.0 {
                    break;
                }
                let at = (root.clone(), rel.clone());
                match placed {
                    Some(placed) => found.insert(at, *placed),
                    None => found.remove(&at),
                };
            }
            if !found.is_empty() {
                let places = found.into_iter().map(|((root, rel), placed)| {
                    (
                        PathBuf::from(std::ffi::OsStr::from_bytes(&root)),
                        rel,
                        placed,
                    )
                });
                out.insert(*id, places.collect());
            }
        }
        Ok(out)
    }

    /// Where the chunks of `wanted` lie by the record of the file each is named with (in
    /// `folder`): a chunk that file's record holds, at its place there — the same record
    /// [`PLACES`] is written from, in the same commits. Keyed by path, the records are read
    /// in the order given (an asker's files in order take neighbouring rows), where a chunk's
    /// place in [`PLACES`] is anywhere in the table. A record held without its chunk list, or
    /// not read ([`State::named_records`]), places nothing: its chunks are looked up as usual.
    pub fn places_in_files(
        &self,
        folder: &str,
        wanted: &[(ChunkId, &str)],
    ) -> Result<HashMap<ChunkId, Vec<Place>>, StateError> {
        let root = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let folders = txn.open_table(FOLDERS).map_err(|e| self.err(e))?;
            let Some(root) = folders.get(folder).map_err(|e| self.err(e))? else {
                return Ok(HashMap::new());
            };
            PathBuf::from(root.value())
        };
        let records = self.named_records(folder, wanted.iter().map(|(_, path)| *path))?;
        let mut out: HashMap<ChunkId, Vec<Place>> = HashMap::new();
        for ((id, path), file) in wanted.iter().zip(records) {
            let Some(file) = file.filter(|f| f.kind == meshsync_crdt::FileKind::File) else {
                continue;
            };
            if let Some(c) = file.chunks.iter().find(|c| c.id == *id) {
                let placed = Placed {
                    offset: c.offset,
                    len: c.len,
                    size: file.size,
                    mtime_ns: file.mtime_ns,
                };
                let at = (root.clone(), path.to_string(), placed);
                out.entry(*id).or_default().push(at);
            }
        }
        Ok(out)
    }

    /// Whether any chunk's place is recorded (a state from before they were kept here has
    /// none: the device fills them in from its local files once).
    pub fn has_places(&self) -> Result<bool, StateError> {
        if !self
            .journal
            .unfolded
            .read()
            .expect("journal lock")
            .is_empty()
        {
            return Ok(true);
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PLACES).map_err(|e| self.err(e))?;
        let first = table.first().map_err(|e| self.err(e))?;
        Ok(first.is_some())
    }
}
