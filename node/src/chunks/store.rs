//! The chunk store: sealed chunks in append-only pack files, indexed by a redb database.
//!
//! Why packs: redb rounds a large value up to a power-of-two region, so CDC-sized chunks stored
//! one per value took about 2.5× their size on disk (measured for the design). Appending sealed
//! chunks to pack files and keeping only `chunk ID → (pack, offset, length)` in redb keeps the
//! store within a few percent of the ciphertext it holds (see `disk_usage` and the test), and a
//! read is one `pread` of exactly the chunk.
//!
//! Crash safety: a batch is appended to the current pack and fsynced *before* the redb
//! transaction that indexes it commits, so the index never names bytes that are not on disk. A
//! crash in between leaves only unindexed bytes at a pack's end, which the next open truncates.
//! Many chunks share one fsync and one commit (`put_batch`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use meshsync_crdt::ChunkId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const CHUNKS: TableDefinition<&[u8], (u64, u64, u32)> = TableDefinition::new("chunks");
const PACKS: TableDefinition<u64, u64> = TableDefinition::new("pack_lengths");
/// Batches at least this big are written with O_DIRECT.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment of direct writes.
const ALIGN: usize = 4096;
/// A pack is closed once it reaches this size.
const PACK_LIMIT: u64 = 256 * 1024 * 1024;

/// Why the store failed. The store itself stays consistent.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chunk index: {0}")]
    Db(String),
    #[error(
        "chunk {0:?} is indexed but its pack is shorter than the index says: the store is damaged"
    )]
    Truncated(ChunkId),
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Sealed chunks of one node.
pub struct ChunkStore {
    dir: PathBuf,
    db: Database,
    /// The pack being appended to, and its committed length.
    pack: u64,
    pack_file: File,
    pack_len: u64,
}

/// redb's page cache for a database (its default is 1 GiB, and it fills with every page a
/// daemon ever touches: at 100k files the state database alone is several hundred MB, so a
/// daemon's memory grew with every change it took). The B-tree's inner pages fit in this;
/// leaves come from the operating system's page cache, which is not the daemon's memory.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The chunk store's own database holds only where each chunk lies in its packs (the bytes
/// are in the pack files): a smaller cache does.
const STORE_CACHE_BYTES: usize = 8 * 1024 * 1024;

impl ChunkStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<ChunkStore, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(dir.join("packs")).map_err(io(dir))?;
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(dir.join("index.redb"))
            .map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        let (pack, pack_len) = {
            txn.open_table(CHUNKS).map_err(db_err)?;
            let packs = txn.open_table(PACKS).map_err(db_err)?;
            let last = packs.last().map_err(db_err)?;
            match last {
                Some((pack, len)) => (pack.value(), len.value()),
                None => (0, 0),
            }
        };
        txn.commit().map_err(db_err)?;
        let path = Self::pack_path(dir, pack);
        let pack_file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        // Bytes past the committed length were appended by a batch whose index never
        // committed: drop them.
        pack_file.set_len(pack_len).map_err(io(&path))?;
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            db,
            pack,
            pack_file,
            pack_len,
        })
    }

    fn pack_path(dir: &Path, pack: u64) -> PathBuf {
        dir.join("packs").join(format!("{pack:08}.pack"))
    }

    /// Stores sealed chunks with one fsync and one index commit. Chunks already held are
    /// skipped. Returns how many were new.
    pub fn put_batch(&mut self, chunks: &[(ChunkId, &[u8])]) -> Result<usize, StoreError> {
        let mut new = Vec::with_capacity(chunks.len());
        {
            let read = self.db.begin_read().map_err(db_err)?;
            let table = read.open_table(CHUNKS).map_err(db_err)?;
            let mut seen = std::collections::HashSet::new();
            for (id, data) in chunks {
                if seen.insert(*id) && table.get(&id.0[..]).map_err(db_err)?.is_none() {
                    new.push((*id, *data));
                }
            }
        }
        if new.is_empty() {
            return Ok(0);
        }
        if self.pack_len >= PACK_LIMIT {
            self.roll()?;
        }
        let path = Self::pack_path(&self.dir, self.pack);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let total: usize = new.iter().map(|(_, d)| d.len()).sum();
        // Big batches bypass the page cache (O_DIRECT): a storage peer writes far more than
        // it reads back soon, and cached copies would only crowd out what is. Direct writes
        // start and end on 4 KiB boundaries; the zeros between batches are never indexed.
        let direct = total >= DIRECT_MIN;
        let start = if direct {
            self.pack_len.next_multiple_of(ALIGN as u64)
        } else {
            self.pack_len
        };
        let mut entries = Vec::with_capacity(new.len());
        let mut offset = start;
        for (id, data) in &new {
            entries.push((*id, offset, data.len() as u32));
            offset += data.len() as u64;
        }
        if direct {
            let padded = total.next_multiple_of(ALIGN);
            let mut raw = vec![0u8; padded + ALIGN];
            let at = raw.as_ptr().align_offset(ALIGN);
            let buf = &mut raw[at..at + padded];
            let mut pos = 0;
            for (_, data) in &new {
                buf[pos..pos + data.len()].copy_from_slice(data);
                pos += data.len();
            }
            write_at(&path, buf, start, true)
                .or_else(|_| write_at(&path, buf, start, false))
                .map_err(io)?;
            offset = start + padded as u64;
        } else {
            let mut buf = Vec::with_capacity(total);
            for (_, data) in &new {
                buf.extend_from_slice(data);
            }
            self.pack_file.write_all(&buf).map_err(io)?;
            self.pack_file.sync_data().map_err(io)?;
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(CHUNKS).map_err(db_err)?;
            for (id, offset, len) in &entries {
                table
                    .insert(&id.0[..], (self.pack, *offset, *len))
                    .map_err(db_err)?;
            }
            let mut packs = txn.open_table(PACKS).map_err(db_err)?;
            packs.insert(self.pack, offset).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.pack_len = offset;
        Ok(entries.len())
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        self.pack += 1;
        let path = Self::pack_path(&self.dir, self.pack);
        self.pack_file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path, source })?;
        self.pack_file.set_len(0).map_err(|source| StoreError::Io {
            path: Self::pack_path(&self.dir, self.pack),
            source,
        })?;
        self.pack_len = 0;
        Ok(())
    }

    /// A sealed chunk, if held.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        let Some(entry) = table.get(&id.0[..]).map_err(db_err)? else {
            return Ok(None);
        };
        let (pack, offset, len) = entry.value();
        let path = Self::pack_path(&self.dir, pack);
        let file = if pack == self.pack {
            None
        } else {
            Some(File::open(&path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?)
        };
        let file = file.as_ref().unwrap_or(&self.pack_file);
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, offset).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Truncated(*id)
            } else {
                StoreError::Io { path, source }
            }
        })?;
        Ok(Some(data))
    }

    /// Which of `ids` the store does not hold.
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        let mut out = Vec::new();
        for id in ids {
            if table.get(&id.0[..]).map_err(db_err)?.is_none() {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Forgets chunks and gives their space back to the file system: the index forgets them
    /// first (one commit), then their bytes are punched out of the packs, so a crash in
    /// between leaves only unindexed bytes, never an index naming zeros. Returns how many
    /// chunks and bytes of ciphertext were removed.
    pub fn remove(&mut self, ids: &[ChunkId]) -> Result<(usize, u64), StoreError> {
        let mut gone = Vec::new();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(CHUNKS).map_err(db_err)?;
            for id in ids {
                if let Some(entry) = table.remove(&id.0[..]).map_err(db_err)? {
                    gone.push(entry.value());
                }
            }
        }
        txn.commit().map_err(db_err)?;
        let mut bytes = 0;
        for (pack, offset, len) in &gone {
            bytes += u64::from(*len);
            let path = Self::pack_path(&self.dir, *pack);
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
            // SAFETY: fallocate only reads its integer arguments and the open descriptor.
            let punched = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    *offset as libc::off_t,
                    libc::off_t::from(*len),
                )
            };
            if punched != 0 {
                // The file system cannot punch holes: the chunk is forgotten, its bytes stay
                // until the pack is rewritten. Not an error for the caller.
                tracing::debug!(path = %path.display(), "cannot punch a hole: {}", std::io::Error::last_os_error());
            }
        }
        Ok((gone.len(), bytes))
    }

    /// Every chunk held.
    pub fn ids(&self) -> Result<Vec<ChunkId>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            if let Ok(id) = <[u8; 32]>::try_from(key.value()) {
                out.push(ChunkId(id));
            }
        }
        Ok(out)
    }

    /// The length of every chunk held (what anyone with the disk can see of them).
    pub fn sizes(&self) -> Result<Vec<u32>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (_, value) = entry.map_err(db_err)?;
            out.push(value.value().2);
        }
        Ok(out)
    }

    /// How many chunks are held.
    pub fn count(&self) -> Result<u64, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        table.len().map_err(db_err)
    }

    /// (bytes of ciphertext held, bytes on disk for packs and index).
    pub fn disk_usage(&self) -> Result<(u64, u64), StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(CHUNKS).map_err(db_err)?;
        let mut held = 0u64;
        for entry in table.iter().map_err(db_err)? {
            let (_, value) = entry.map_err(db_err)?;
            held += u64::from(value.value().2);
        }
        let mut disk = 0u64;
        for entry in walk(&self.dir) {
            disk += entry;
        }
        Ok((held, disk))
    }
}

/// Writes `buf` at `offset` of the pack at `path` and flushes it; `direct` bypasses the page
/// cache (then `buf`, `offset` and its length must be 4 KiB-aligned).
fn write_at(path: &Path, buf: &[u8], offset: u64, direct: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path)?;
    file.write_all_at(buf, offset)?;
    file.sync_data()
}

/// Sizes on disk (allocated blocks) of every file under `dir`.
fn walk(dir: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(meta.blocks() * 512);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::content::{chunk_stream, seal_chunk};
    use meshsync_crdt::{Epoch, MeshKey};

    #[test]
    fn a_cdc_workload_stays_within_ten_percent_of_its_ciphertext() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ChunkStore::open(dir.path()).unwrap();
        let key = MeshKey::generate(Epoch(0));
        let mut data = vec![0u8; 64 << 20];
        blake3::Hasher::new()
            .update(b"cdc")
            .finalize_xof()
            .fill(&mut data);
        let mut sealed: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        chunk_stream(&data[..], &key.chunk_id_key(), |chunk, plain| {
            sealed.push((
                chunk.id,
                seal_chunk(&key.chunk_key(), Epoch(0), &chunk.id, plain),
            ));
        })
        .unwrap();
        for batch in sealed.chunks(100) {
            let refs: Vec<(ChunkId, &[u8])> = batch.iter().map(|(id, d)| (*id, &d[..])).collect();
            store.put_batch(&refs).unwrap();
        }
        let (held, disk) = store.disk_usage().unwrap();
        let ratio = disk as f64 / held as f64;
        eprintln!("chunk store: {disk} bytes on disk for {held} bytes of ciphertext ({ratio:.4}x)");
        assert!(
            ratio < 1.10,
            "disk {disk} for {held} bytes of ciphertext: {ratio:.3}x"
        );
        let (id, bytes) = &sealed[sealed.len() / 2];
        assert_eq!(store.get(id).unwrap().as_deref(), Some(&bytes[..]));
    }

    #[test]
    fn reopening_keeps_committed_chunks_and_drops_uncommitted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkId([1; 32]);
        {
            let mut store = ChunkStore::open(dir.path()).unwrap();
            assert_eq!(store.put_batch(&[(a, b"first"), (a, b"first")]).unwrap(), 1);
            assert_eq!(
                store.put_batch(&[(a, b"first")]).unwrap(),
                0,
                "deduplicated"
            );
        }
        // A crash after appending but before indexing leaves trailing garbage.
        let pack = ChunkStore::pack_path(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&pack).unwrap();
        file.write_all(b"half-written batch").unwrap();
        drop(file);
        let mut store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(&pack).unwrap().len(), 5);
        assert_eq!(store.get(&a).unwrap().unwrap(), b"first");
        let b = ChunkId([2; 32]);
        store.put_batch(&[(b, b"second")]).unwrap();
        assert_eq!(store.get(&b).unwrap().unwrap(), b"second");
        assert!(store.get(&ChunkId([3; 32])).unwrap().is_none());
    }

    #[test]
    fn removed_chunks_give_their_disk_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ChunkStore::open(dir.path()).unwrap();
        let chunks: Vec<(ChunkId, Vec<u8>)> = (0..64u8)
            .map(|i| (ChunkId([i; 32]), vec![i; 256 * 1024]))
            .collect();
        let refs: Vec<(ChunkId, &[u8])> = chunks.iter().map(|(id, d)| (*id, &d[..])).collect();
        store.put_batch(&refs).unwrap();
        let (_, before) = store.disk_usage().unwrap();
        let gone: Vec<ChunkId> = chunks.iter().take(48).map(|(id, _)| *id).collect();
        assert_eq!(store.remove(&gone).unwrap(), (48, 48 * 256 * 1024));
        let (held, after) = store.disk_usage().unwrap();
        assert_eq!(held, 16 * 256 * 1024);
        assert!(
            after < before - 40 * 256 * 1024,
            "disk {before} -> {after} bytes after removing 12 MiB"
        );
        assert!(store.get(&gone[0]).unwrap().is_none());
        assert_eq!(
            store.missing(&[gone[0], chunks[60].0]).unwrap(),
            vec![gone[0]]
        );
        assert_eq!(store.get(&chunks[60].0).unwrap().unwrap(), chunks[60].1);
        assert_eq!(store.count().unwrap(), 16);
    }
}
