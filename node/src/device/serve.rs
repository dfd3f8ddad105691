//! Serving chunks (`/meshsync/chunks/1`) from the synced files themselves, so a device keeps no
//! second copy of its folders.
//!
//! [`ChunkMap`] knows every current file holding each chunk, and the size and mtime each file
//! had when its chunks were recorded; [`Served`] reads a chunk from a file that still matches,
//! seals it, and falls back to the chunk store (old versions). Symlink targets are served from
//! memory. Every chunk read from a file is hashed again before it is sealed, so a file edited
//! since its scan never has other bytes sealed under a chunk's key and nonce. The chunk server
//! calls [`Served::get`] on a blocking thread (the `ChunkSource` contract), never holding the
//! device lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use meshsync_crdt::{ChunkId, FileKind, KeyRing};
use meshsync_transport::chunks::ChunkSource;

use crate::chunks::{content, ChunkRef, ChunkStore};
use crate::disk::FolderRoot;
use crate::state::LocalFile;

/// A synced file: its folder and its path there. It is read only through the folder's
/// [`FolderRoot`] (no symlink followed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileAt {
    pub(crate) root: Arc<PathBuf>,
    pub(crate) rel: String,
}

impl FileAt {
    /// The file's absolute path (the chunk map's key; never opened as such).
    fn key(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// Opens the file for reading through the folder's door.
    pub(crate) fn open(&self) -> Option<std::fs::File> {
        FolderRoot::open(&self.root).ok()?.open_read(&self.rel).ok()
    }
}

/// Where the chunks of current files lie on disk, for serving them.
#[derive(Default)]
pub(crate) struct ChunkMap {
    /// Every current file holding each chunk, and where in it.
    pub(crate) locations: HashMap<ChunkId, Vec<(FileAt, ChunkRef)>>,
    /// Size and mtime of each file when its chunks were recorded, and its chunks: a file that
    /// no longer matches is not served from (its chunks may have moved).
    files: HashMap<PathBuf, Recorded>,
    /// Symlink targets, served from memory.
    pub(crate) links: HashMap<ChunkId, Vec<u8>>,
}

/// What the chunk map recorded of one file.
struct Recorded {
    size: u64,
    mtime_ns: i64,
    chunks: Vec<ChunkId>,
}

impl ChunkMap {
    /// Records where the chunks of a current local file (or link) can be read from, in place
    /// of what that path held before.
    pub(crate) fn remember(&mut self, at: FileAt, file: &LocalFile) {
        let path = at.key();
        self.forget(&path);
        if file.kind == FileKind::Symlink {
            let target = FolderRoot::open(&at.root).and_then(|root| root.read_link(&at.rel));
            let Ok(bytes) = target else {
                return;
            };
            for c in &file.chunks {
                if let Some(part) = bytes.get(c.range().start as usize..c.range().end as usize) {
                    self.links.insert(c.id, part.to_vec());
                }
            }
            return;
        }
        for c in &file.chunks {
            self.locations
                .entry(c.id)
                .or_default()
                .push((at.clone(), *c));
        }
        let chunks = file.chunks.iter().map(|c| c.id).collect();
        self.files.insert(
            path,
            Recorded {
                size: file.size,
                mtime_ns: file.mtime_ns,
                chunks,
            },
        );
    }

    /// Forgets what `path` held (deleted, or about to be re-recorded).
    pub(crate) fn forget(&mut self, path: &Path) {
        let Some(recorded) = self.files.remove(path) else {
            return;
        };
        for id in recorded.chunks {
            if let Some(places) = self.locations.get_mut(&id) {
                places.retain(|(at, _)| at.key() != path);
                if places.is_empty() {
                    self.locations.remove(&id);
                }
            }
        }
    }

    /// Forgets every file under `root` (a folder no longer synced).
    pub(crate) fn forget_under(&mut self, root: &Path) {
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| path.starts_with(root))
            .cloned()
            .collect();
        for path in gone {
            self.forget(&path);
        }
    }

    /// The places holding `id`, each with the (size, mtime) recorded for its file.
    fn places(&self, id: &ChunkId) -> Vec<Place> {
        self.locations
            .get(id)
            .into_iter()
            .flatten()
            .map(|(at, chunk)| Place {
                at: at.clone(),
                chunk: *chunk,
                recorded: self.files.get(&at.key()).map(|r| (r.size, r.mtime_ns)),
            })
            .collect()
    }
}

/// Where a chunk lies: the file, the chunk's place in it, and the (size, mtime) the file had
/// when its chunks were recorded.
struct Place {
    at: FileAt,
    chunk: ChunkRef,
    recorded: Option<(u64, i64)>,
}

/// Nanoseconds since the Unix epoch (0 before it or when unknown).
pub(crate) fn unix_nanos(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The chunk source a device serves: its current files, then its chunk store.
#[derive(Clone)]
pub(crate) struct Served {
    pub(crate) map: Arc<StdMutex<ChunkMap>>,
    /// Every mesh key this device holds (a chunk is sealed with its own epoch's).
    pub(crate) keys: Arc<StdMutex<KeyRing>>,
    /// Old versions' chunks, already sealed.
    pub(crate) store: Arc<StdMutex<ChunkStore>>,
}

impl ChunkSource for Served {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        use std::os::unix::fs::FileExt;
        let ring = self.keys.lock().ok()?.clone();
        let places = {
            let map = self.map.lock().ok()?;
            if let Some(target) = map.links.get(id) {
                let key = content::key_of(&ring, id, target)?;
                let sealed = content::seal_chunk(&key.chunk_key(), key.epoch(), id, target);
                return Some(sealed.into());
            }
            map.places(id)
        };
        for Place {
            at,
            chunk,
            recorded,
        } in places
        {
            let Some(file) = at.open() else {
                continue;
            };
            // The file may have changed since it was scanned: a file no longer the size and age
            // it had when its chunks were recorded is not even read.
            let Ok(meta) = file.metadata() else { continue };
            let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
            if recorded != Some((meta.len(), mtime_ns)) {
                continue;
            }
            // Re-hashed before sealing (which also finds the epoch whose key made its ID): the
            // same chunk key and nonce never seal other bytes.
            let sealed = content::seal_chunk_in(&ring, id, chunk.len as usize, |slot| {
                file.read_exact_at(slot, chunk.offset)
            });
            if let Ok(Some(sealed)) = sealed {
                return Some(sealed.into());
            }
        }
        // Not in a current file: maybe an old version's, kept sealed in the store.
        self.store
            .lock()
            .ok()?
            .get(id)
            .ok()
            .flatten()
            .map(Into::into)
    }
}
