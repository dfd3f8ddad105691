//! Writing a [`Batch`]: every change in one transaction.

use std::collections::BTreeSet;

use meshsync_crdt::SavedShard;

use super::*;

/// One batch of changes to persist together.
#[derive(Default)]
pub struct Batch {
    pub mesh: Option<MeshId>,
    pub membership: Option<Vec<u8>>,
    pub folders: Vec<(FolderId, PathBuf)>,
    pub shards: Vec<(FolderId, u16, SavedShard)>,
    /// Summaries of shards as the saves in `shards` leave them (any save in `shards` removes
    /// the summary its shard had).
    pub summaries: Vec<(FolderId, u16, ShardSummary)>,
    pub lists: Vec<(ChunkListHash, Vec<ChunkRef>)>,
    pub local: Vec<(FolderId, String, Option<LocalFile>)>,
    /// Chunks placed (`Some`) in a file, or no longer (`None`), by chunk, folder root and path:
    /// in order (a file's old places are taken away before its new ones are set).
    pub places: Vec<(ChunkId, Arc<PathBuf>, String, Option<Placed>)>,
    /// Meta entries to set (see [`MetaKey`] and [`Batch::put`]).
    pub meta: Vec<(&'static str, Vec<u8>)>,
    /// Encoded sealed changes by author and sequence number.
    pub sealed: Vec<(DeviceId, u64, Vec<u8>)>,
    /// Old versions to keep (`Some`) or to forget (`None`), by folder, path and version.
    pub versions: Vec<(FolderId, String, u64, Option<Vec<u8>>)>,
    /// Surveys to save, by folder, each counting the local files as this batch leaves them.
    pub surveys: Vec<(FolderId, Vec<u8>)>,
}

impl Batch {
    /// Sets the meta entry `key` to `value` when the batch commits (a later put of the same
    /// key in one batch wins).
    pub fn put<T: Serialize>(&mut self, key: &MetaKey<T>, value: &T) {
        match postcard::to_stdvec(value) {
            Ok(bytes) => self.meta.push((key.name, bytes)),
            Err(error) => tracing::error!(key = key.name, %error, "state entry does not encode"),
        }
    }

    /// Whether committing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.mesh.is_none()
            && self.membership.is_none()
            && self.folders.is_empty()
            && self.shards.is_empty()
            && self.summaries.is_empty()
            && self.lists.is_empty()
            && self.local.is_empty()
            && self.places.is_empty()
            && self.meta.is_empty()
            && self.sealed.is_empty()
            && self.versions.is_empty()
            && self.surveys.is_empty()
    }
}

/// A commit that takes this long logs its phases (at debug level): where a big one's time
/// goes, table by table.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

impl State {
    /// Writes a batch in one transaction (nothing at all for an empty one: no fsync).
    pub fn commit(&self, batch: Batch) -> Result<(), StateError> {
        use std::sync::atomic::Ordering;
        if batch.is_empty() {
            return Ok(());
        }
        let changes_local = !batch.local.is_empty();
        let committed = self.commit_txn(batch);
        if committed.is_err() && changes_local {
            self.local_lost.store(true, Ordering::Relaxed);
        }
        committed
    }

    fn commit_txn(&self, batch: Batch) -> Result<(), StateError> {
        // A batch with places writes the journal (or the table): held across the transaction.
        let mut writer = (!batch.places.is_empty()).then(|| self.places_writer());
        let mut next = writer.as_deref().copied().unwrap_or_default();
        let written;
        let mut took = crate::phases::Phases::default();
        let (shards, lists, places, local) = (
            batch.shards.len(),
            batch.lists.len(),
            batch.places.len(),
            batch.local.len(),
        );
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            if let Some(mesh) = batch.mesh {
                meta.insert("mesh", &mesh.as_bytes()[..])
                    .map_err(|e| self.err(e))?;
            }
            if let Some(log) = &batch.membership {
                meta.insert("membership", &log[..])
                    .map_err(|e| self.err(e))?;
            }
            for (key, value) in &batch.meta {
                meta.insert(*key, &value[..]).map_err(|e| self.err(e))?;
            }
            let mut folders = txn.open_table(FOLDERS).map_err(|e| self.err(e))?;
            for (id, path) in &batch.folders {
                let path = path.to_string_lossy();
                folders
                    .insert(id.as_str(), path.as_ref())
                    .map_err(|e| self.err(e))?;
            }
            let mut shards = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            let mut pieces = txn.open_table(SHARD_PIECES).map_err(|e| self.err(e))?;
            let mut summaries = txn.open_table(SHARD_SUMMARIES).map_err(|e| self.err(e))?;
            for (folder, shard, saved) in &batch.shards {
                let folder = folder.as_str();
                // Whatever described the shard's save before no longer does.
                summaries
                    .remove((folder, *shard))
                    .map_err(|e| self.err(e))?;
                match saved {
                    SavedShard::Whole(bytes) => {
                        shards
                            .insert((folder, *shard), &bytes[..])
                            .map_err(|e| self.err(e))?;
                        pieces
                            .retain_in((folder, *shard, 0)..=(folder, *shard, u32::MAX), |_, _| {
                                false
                            })
                            .map_err(|e| self.err(e))?;
                    }
                    SavedShard::Piece(n, bytes) => {
                        pieces
                            .insert((folder, *shard, *n), &bytes[..])
                            .map_err(|e| self.err(e))?;
                    }
                }
            }
            for (folder, shard, summary) in &batch.summaries {
                let heads: Vec<[u8; 32]> = summary.heads.iter().map(|h| h.0).collect();
                let bytes =
                    postcard::to_stdvec(&(heads, summary.len as u64)).map_err(|e| self.err(e))?;
                summaries
                    .insert((folder.as_str(), *shard), &bytes[..])
                    .map_err(|e| self.err(e))?;
            }
            took.mark("meta, shards");
            let mut lists = txn.open_table(LISTS).map_err(|e| self.err(e))?;
            // In key order: each lookup and insert lands next to the last.
            let mut sorted: Vec<&(ChunkListHash, Vec<ChunkRef>)> = batch.lists.iter().collect();
            sorted.sort_by_key(|(hash, _)| hash.0);
            for (hash, list) in sorted {
                // Named by their content: one held already is the same (rewriting it would
                // still rewrite its page, at a random spot of a big table).
                if lists.get(&hash.0[..]).map_err(|e| self.err(e))?.is_some() {
                    continue;
                }
                let bytes = postcard::to_stdvec(list).map_err(|e| self.err(e))?;
                lists
                    .insert(&hash.0[..], &bytes[..])
                    .map_err(|e| self.err(e))?;
            }
            took.mark("lists");
            let mut sealed = txn.open_table(SEALED).map_err(|e| self.err(e))?;
            for (author, seq, blob) in &batch.sealed {
                sealed
                    .insert((&author.as_bytes()[..], *seq), &blob[..])
                    .map_err(|e| self.err(e))?;
            }
            let mut versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
            for (folder, path, version, entry) in &batch.versions {
                let key = (folder.as_str(), path.as_str(), *version);
                match entry {
                    Some(entry) => {
                        versions.insert(key, &entry[..]).map_err(|e| self.err(e))?;
                    }
                    None => {
                        versions.remove(key).map_err(|e| self.err(e))?;
                    }
                }
            }
            took.mark("sealed, versions");
            written = self.write_places(&txn, &mut next, &batch.places)?;
            took.mark("places");
            let mut local = txn.open_table(LOCAL).map_err(|e| self.err(e))?;
            for (folder, path, file) in &batch.local {
                match file {
                    Some(file) => {
                        let bytes = postcard::to_stdvec(file).map_err(|e| self.err(e))?;
                        local
                            .insert((folder.as_str(), path.as_str()), &bytes[..])
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        local
                            .remove((folder.as_str(), path.as_str()))
                            .map_err(|e| self.err(e))?;
                    }
                }
            }
            self.drop_and_save_surveys(&txn, &batch)?;
            took.mark("local");
        }
        txn.commit().map_err(|e| self.err(e))?;
        took.mark("commit");
        if took.total() >= SLOW_COMMIT {
            tracing::debug!(shards, lists, places, local, took = %took, "state commit's phases");
        }
        if let Some(writer) = writer.as_deref_mut() {
            *writer = next;
        }
        self.note_places(written);
        Ok(())
    }

    /// A saved survey no longer counts what a folder holds once that changes: dropped by a
    /// batch that changes the folder's local files; one the batch saves counts what the batch
    /// leaves.
    fn drop_and_save_surveys(
        &self,
        txn: &redb::WriteTransaction,
        batch: &Batch,
    ) -> Result<(), StateError> {
        if batch.local.is_empty() && batch.surveys.is_empty() {
            return Ok(());
        }
        let mut surveys = txn.open_table(SURVEYS).map_err(|e| self.err(e))?;
        let changed: BTreeSet<&FolderId> = batch.local.iter().map(|(f, _, _)| f).collect();
        for folder in changed {
            surveys.remove(folder.as_str()).map_err(|e| self.err(e))?;
        }
        if !self.local_lost.load(std::sync::atomic::Ordering::Relaxed) {
            for (folder, bytes) in &batch.surveys {
                surveys
                    .insert(folder.as_str(), &bytes[..])
                    .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }
}
