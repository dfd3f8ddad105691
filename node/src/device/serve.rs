//! Serving chunks (`/meshsync/chunks/1`) from the synced files themselves, so a device keeps no
//! second copy of its folders.
//!
//! The state records every current file holding each chunk, and the size and mtime each file
//! had when its chunks were recorded ([`ChunkMap::record`], [`places`]); [`Served`] reads a
//! chunk from a file that still matches and falls back to the chunk store (old versions,
//! sealed). Symlink targets are served from memory. To another device of the mesh that asks
//! for it so, a chunk read from a file goes in the clear, as read (inside the Noise channel;
//! it holds the key anyway, and checks every chunk against its ID: a file edited since its
//! scan, same size and mtime, fails that check there and is fetched elsewhere or at the next
//! scan's version). To anyone else, and to storage peers, it is sealed — and hashed again
//! first, so a file edited since its scan never has other bytes sealed under a chunk's key
//! and nonce. The chunk server calls [`Served`] on a blocking thread (the `ChunkSource`
//! contract), never holding the device lock.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};

use meshsync_crdt::{ChunkId, FileKind, KeyRing};
use meshsync_transport::chunks::{Answer, ChunkSource, Near};
use meshsync_transport::PeerId;

use crate::chunks::{content, ChunkRef, ChunkStore};
use crate::disk::FolderRoot;
use crate::state::{Batch, LocalFile, Placed, State};

/// A synced file: its folder and its path there. It is read only through the folder's
/// [`FolderRoot`] (no symlink followed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileAt {
    pub(crate) root: Arc<PathBuf>,
    pub(crate) rel: String,
}

impl FileAt {
    /// Opens the file for reading through the folder's door.
    pub(crate) fn open(&self) -> Option<std::fs::File> {
        FolderRoot::open(&self.root).ok()?.open_read(&self.rel).ok()
    }
}

/// Where the chunks of current files lie: recorded in the state ([`State::places`]: at a million
/// files, a map in memory took ~600 bytes per file), except link targets, which are few and
/// served from memory.
pub(crate) struct ChunkMap {
    /// Symlink targets, served from memory.
    pub(crate) links: HashMap<ChunkId, Vec<u8>>,
    /// Where the places are recorded, and the chunk lists of local files held without theirs
    /// are read (see [`LocalFile::without_chunks`]).
    state: State,
}

impl ChunkMap {
    pub(crate) fn new(state: State) -> ChunkMap {
        ChunkMap {
            links: HashMap::new(),
            state,
        }
    }

    /// Records in `batch` that the file (or link) at `at` holds `file` now (`None`: nothing),
    /// in place of `old`. Either may come without its chunk list (as `Folder::local` holds
    /// files): it is read from the state, or from `batch` if recorded there.
    pub(crate) fn record(
        &mut self,
        at: &FileAt,
        old: Option<&LocalFile>,
        file: Option<&LocalFile>,
        batch: &mut Batch,
    ) {
        if let Some(old) = old {
            for c in self.chunks_of(old, batch).iter() {
                batch
                    .places
                    .push((c.id, at.root.clone(), at.rel.clone(), None));
            }
        }
        let Some(file) = file else { return };
        let chunks = self.chunks_of(file, batch);
        match file.kind {
            FileKind::Symlink => {
                let target = FolderRoot::open(&at.root).and_then(|root| root.read_link(&at.rel));
                let Ok(bytes) = target else {
                    return;
                };
                for c in chunks.iter() {
                    let range = c.range().start as usize..c.range().end as usize;
                    if let Some(part) = bytes.get(range) {
                        self.links.insert(c.id, part.to_vec());
                    }
                }
            }
            FileKind::File => {
                for c in chunks.iter() {
                    let placed = Placed {
                        offset: c.offset,
                        len: c.len,
                        size: file.size,
                        mtime_ns: file.mtime_ns,
                    };
                    batch
                        .places
                        .push((c.id, at.root.clone(), at.rel.clone(), Some(placed)));
                }
            }
            FileKind::Directory => {}
        }
    }

    /// `file`'s chunk list: its own, or, for a file held without it, the one recorded under
    /// its list hash — in the state, or else in `batch` (a list recorded in this very batch:
    /// rare, so looked for last, the batch may hold tens of thousands).
    fn chunks_of<'a>(&self, file: &'a LocalFile, batch: &Batch) -> Cow<'a, [ChunkRef]> {
        if !lacks_list(file) {
            return Cow::Borrowed(&file.chunks);
        }
        match self.state.chunk_list(&file.list_hash) {
            Ok(Some(list)) => Cow::Owned(list),
            Ok(None) => batch
                .lists
                .iter()
                .rev()
                .find(|(hash, _)| *hash == file.list_hash)
                .map_or(Cow::Borrowed(&[]), |(_, list)| Cow::Owned(list.clone())),
            Err(error) => {
                tracing::warn!(%error, "cannot read a local file's chunk list");
                Cow::Borrowed(&[])
            }
        }
    }
}

/// Whether `file` is held without the chunk list it has (see [`LocalFile::without_chunks`]).
fn lacks_list(file: &LocalFile) -> bool {
    file.chunks.is_empty() && file.size > 0 && file.kind != FileKind::Directory
}

/// Gives each of `files` held without its chunk list that list back, from the state (one read).
pub(crate) fn with_chunks<'a>(state: &State, files: impl IntoIterator<Item = &'a mut LocalFile>) {
    let files: Vec<&mut LocalFile> = files.into_iter().filter(|f| lacks_list(f)).collect();
    let hashes: Vec<_> = files.iter().map(|f| f.list_hash).collect();
    let lists: HashMap<_, _> = match state.chunk_lists(&hashes) {
        Ok(lists) => lists.into_iter().collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot read local files' chunk lists");
            return;
        }
    };
    for file in files {
        if let Some(list) = lists.get(&file.list_hash) {
            file.chunks = list.clone();
        }
    }
}

/// Where a chunk lies: the file, the chunk's place in it, and the (size, mtime) the file had
/// when its chunks were recorded.
pub(crate) struct Place {
    pub(crate) at: FileAt,
    pub(crate) chunk: ChunkRef,
    pub(crate) recorded: (u64, i64),
}

/// Where each of `ids` lies in current files, by the state's record.
pub(crate) fn places_of<'a>(
    state: &State,
    ids: impl IntoIterator<Item = &'a ChunkId>,
) -> HashMap<ChunkId, Vec<Place>> {
    let found = match state.places(ids) {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "cannot read where chunks lie");
            return HashMap::new();
        }
    };
    found
        .into_iter()
        .map(|(id, rows)| (id, to_places(id, rows)))
        .collect()
}

/// Chunk `id`'s places as the state gives them.
fn to_places(id: ChunkId, rows: Vec<crate::state::Place>) -> Vec<Place> {
    rows.into_iter()
        .map(|(root, rel, placed)| Place {
            at: FileAt {
                root: Arc::new(root),
                rel,
            },
            chunk: ChunkRef {
                id,
                offset: placed.offset,
                len: placed.len,
            },
            recorded: (placed.size, placed.mtime_ns),
        })
        .collect()
}

/// Nanoseconds since the Unix epoch (0 before it or when unknown).
pub(crate) fn unix_nanos(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The chunk source a device serves: its current files, then its chunk store.
#[derive(Clone)]
pub struct Served {
    pub(crate) map: Arc<StdMutex<ChunkMap>>,
    /// The state, which records where the chunks of current files lie.
    pub(crate) state: State,
    /// Every mesh key this device holds (a chunk is sealed with its own epoch's).
    pub(crate) keys: Arc<StdMutex<KeyRing>>,
    /// The other devices of the mesh: they hold the mesh key, so are sent chunks in the clear
    /// when they ask (inside the Noise channel; see `meshsync_transport::chunks`).
    pub(crate) readers: Arc<StdMutex<HashSet<PeerId>>>,
    /// Old versions' chunks, already sealed.
    pub(crate) store: Arc<StdMutex<ChunkStore>>,
}

impl Served {
    /// The chunks of one `Want`, each from a link target, a current file still as scanned, or
    /// the chunk store (which holds them sealed). `plain`: links and files are read in the
    /// clear (not sealed, and not hashed again: the reader checks every chunk against its ID);
    /// else sealed. One read of where the chunks lie for the whole `Want` (first in the
    /// records of the files `near` names, see [`State::places_in_files`]), and each file
    /// opened (and its size and age checked) once for all of its chunks in it.
    fn answer(&self, ids: &[ChunkId], plain: bool, near: Option<&Near>) -> Vec<Option<Answer>> {
        let Ok(ring) = self.keys.lock().map(|k| k.clone()) else {
            return vec![None; ids.len()];
        };
        let links: Vec<Option<Vec<u8>>> = match self.map.lock() {
            Ok(map) => ids.iter().map(|id| map.links.get(id).cloned()).collect(),
            Err(_) => return vec![None; ids.len()],
        };
        let places = self.places(ids, near);
        let mut files: HashMap<(Arc<PathBuf>, String), Option<std::fs::File>> = HashMap::new();
        (ids.iter().zip(links))
            .map(|(id, link)| match link {
                Some(target) if plain => Some(Answer::Plain(target.into())),
                Some(target) => {
                    let key = content::key_of(&ring, id, &target)?;
                    let sealed = content::seal_chunk(&key.chunk_key(), key.epoch(), id, &target);
                    Some(Answer::Sealed(sealed.into()))
                }
                None => {
                    let (here, named) =
                        places.get(id).map_or((&[][..], false), |(places, named)| {
                            (places.as_slice(), *named)
                        });
                    from_files(&ring, id, here, &mut files, plain)
                        .or_else(|| {
                            // A named file that no longer holds it: wherever else it lies.
                            if !named {
                                return None;
                            }
                            let elsewhere = places_of(&self.state, [id]).remove(id)?;
                            from_files(&ring, id, &elsewhere, &mut files, plain)
                        })
                        .or_else(|| {
                            let sealed = self.store.lock().ok()?.get(id).ok().flatten()?;
                            Some(Answer::Sealed(sealed.into()))
                        })
                }
            })
            .collect()
    }

    /// Where each of `ids` lies: in the file `near` names with it if that file's record holds
    /// it (`true`: so found), else by the state's record of chunks' places.
    fn places(&self, ids: &[ChunkId], near: Option<&Near>) -> HashMap<ChunkId, (Vec<Place>, bool)> {
        let named: Vec<(ChunkId, &str)> = near.map_or_else(Vec::new, |near| {
            let paths = near.paths.iter().map(Option::as_deref);
            let named = ids
                .iter()
                .zip(paths)
                .filter_map(|(id, path)| Some((*id, path?)));
            named.collect()
        });
        let mut found: HashMap<ChunkId, (Vec<Place>, bool)> = HashMap::new();
        if let Some(near) = near.filter(|_| !named.is_empty()) {
            match self.state.places_in_files(&near.folder, &named) {
                Ok(in_files) => {
                    let in_files = in_files.into_iter();
                    found.extend(in_files.map(|(id, rows)| (id, (to_places(id, rows), true))));
                }
                Err(error) => tracing::warn!(%error, "cannot read the named files' records"),
            }
        }
        let rest = ids.iter().filter(|id| !found.contains_key(id));
        found.extend(
            places_of(&self.state, rest)
                .into_iter()
                .map(|(id, p)| (id, (p, false))),
        );
        found
    }
}

impl ChunkSource for Served {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        self.get_many(std::slice::from_ref(id)).pop().flatten()
    }

    fn get_many(&self, ids: &[ChunkId]) -> Vec<Option<bytes::Bytes>> {
        let answers = self.answer(ids, false, None).into_iter();
        answers
            .map(|answer| match answer? {
                Answer::Sealed(sealed) => Some(sealed),
                Answer::Plain(_) => None, // never: asked for sealed
            })
            .collect()
    }

    fn holds_key(&self, peer: &PeerId) -> bool {
        self.readers.lock().is_ok_and(|r| r.contains(peer))
    }

    fn get_many_plain(&self, ids: &[ChunkId]) -> Vec<Option<Answer>> {
        self.answer(ids, true, None)
    }

    fn get_many_near(&self, ids: &[ChunkId], near: &Near) -> Vec<Option<Answer>> {
        self.answer(ids, true, Some(near))
    }
}

/// Chunk `id` from the first of `places` whose file is still as scanned: in the clear
/// (`plain`), or sealed. `files`: the files opened so far, each checked once (`None`: gone,
/// or changed since its chunks were recorded).
fn from_files(
    ring: &KeyRing,
    id: &ChunkId,
    places: &[Place],
    files: &mut HashMap<(Arc<PathBuf>, String), Option<std::fs::File>>,
    plain: bool,
) -> Option<Answer> {
    use std::os::unix::fs::FileExt;
    for Place {
        at,
        chunk,
        recorded,
    } in places
    {
        let file = files
            .entry((at.root.clone(), at.rel.clone()))
            .or_insert_with(|| {
                // The file may have changed since it was scanned: a file no longer the
                // size and age it had when its chunks were recorded is not even read.
                let file = at.open()?;
                let meta = file.metadata().ok()?;
                let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
                (*recorded == (meta.len(), mtime_ns)).then_some(file)
            });
        let Some(file) = file else { continue };
        if plain {
            // Not hashed again: the reader does, and a changed file only fails its check.
            match crate::disk::read_at(file, chunk.offset, chunk.len as usize) {
                Ok(data) => return Some(Answer::Plain(data.into())),
                Err(_) => continue,
            }
        }
        // Re-hashed before sealing (which also finds the epoch whose key made its ID): the
        // same chunk key and nonce never seal other bytes.
        let sealed = content::seal_chunk_in(ring, id, chunk.len as usize, |slot| {
            file.read_exact_at(slot, chunk.offset)
        });
        if let Ok(Some(sealed)) = sealed {
            return Some(Answer::Sealed(sealed.into()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshsync_crdt::{ChunkListHash, FolderId};

    fn file(chunks: &[(u8, u64, u32)], size: u64, mtime_ns: i64) -> LocalFile {
        LocalFile {
            kind: FileKind::File,
            size,
            mtime_ns,
            mode: 0o644,
            chunks: chunks
                .iter()
                .map(|&(id, offset, len)| ChunkRef {
                    id: ChunkId([id; 32]),
                    offset,
                    len,
                })
                .collect(),
            version: 1,
            list_hash: ChunkListHash::default(),
        }
    }

    #[test]
    fn where_chunks_lie_is_kept_in_the_state_and_follows_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        assert!(!state.has_places().unwrap());
        let root = Arc::new(dir.path().join("folder"));
        let at = |rel: &str| FileAt {
            root: root.clone(),
            rel: rel.into(),
        };
        let mut map = ChunkMap::new(state.clone());
        let v1 = file(&[(1, 0, 100), (2, 100, 50)], 150, 7);
        let other = file(&[(2, 0, 50)], 50, 9);
        let mut batch = Batch::default();
        map.record(&at("a/x"), None, Some(&v1), &mut batch);
        map.record(&at("y"), None, Some(&other), &mut batch);
        state.commit(batch).unwrap();
        assert!(state.has_places().unwrap());
        let found = places_of(&state, &[ChunkId([1; 32]), ChunkId([2; 32])]);
        let one = &found[&ChunkId([1; 32])];
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].at.rel.as_str(), one[0].chunk.offset), ("a/x", 0));
        assert_eq!(one[0].recorded, (150, 7));
        let mut two: Vec<(String, u64)> = found[&ChunkId([2; 32])]
            .iter()
            .map(|p| (p.at.rel.clone(), p.chunk.offset))
            .collect();
        two.sort();
        assert_eq!(two, [("a/x".into(), 100), ("y".into(), 0)]);

        // A new version keeps chunk 2 at another offset and drops chunk 1; "y" is deleted.
        let v2 = file(&[(3, 0, 10), (2, 10, 50)], 60, 8);
        let mut batch = Batch::default();
        map.record(&at("a/x"), Some(&v1), Some(&v2), &mut batch);
        map.record(&at("y"), Some(&other), None, &mut batch);
        state.commit(batch).unwrap();
        let found = places_of(&state, &[ChunkId([1; 32]), ChunkId([2; 32])]);
        assert!(!found.contains_key(&ChunkId([1; 32])), "chunk 1 is gone");
        let two = &found[&ChunkId([2; 32])];
        assert_eq!(two.len(), 1);
        assert_eq!((two[0].chunk.offset, two[0].recorded), (10, (60, 8)));

        // Files held without their chunk lists (as `Folder::local` holds them): the lists are
        // read from the batch or the state, so their places still follow them.
        let v3 = file(&[(4, 0, 20), (5, 20, 40)], 60, 9);
        let hash = |f: &LocalFile| content::chunk_list_hash(&f.chunks);
        let (v2, v3) = (
            LocalFile {
                list_hash: hash(&v2),
                ..v2
            },
            LocalFile {
                list_hash: hash(&v3),
                ..v3
            },
        );
        let mut batch = Batch::default();
        batch.lists.push((v2.list_hash, v2.chunks.clone()));
        state.commit(batch).unwrap();
        let mut batch = Batch::default();
        batch.lists.push((v3.list_hash, v3.chunks.clone()));
        let (old, new) = (v2.without_chunks(), v3.without_chunks());
        map.record(&at("a/x"), Some(&old), Some(&new), &mut batch);
        state.commit(batch).unwrap();
        let found = places_of(&state, &[2, 3, 4, 5].map(|i| ChunkId([i; 32])));
        let mut ids: Vec<u8> = found.keys().map(|id| id.0[0]).collect();
        ids.sort();
        assert_eq!(ids, [4, 5], "v2's chunks gone, v3's placed");

        // A folder no longer synced takes its places along.
        let id = FolderId::new("f").unwrap();
        state.remove_folder(&id, &root).unwrap();
        assert!(!state.has_places().unwrap());
    }

    #[test]
    fn a_named_file_serves_a_chunk_only_if_its_own_record_holds_it() {
        use meshsync_crdt::{Epoch, MeshKey};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        let state = State::open(&dir.path().join("home")).unwrap();
        let root = dir.path().join("folder");
        std::fs::create_dir(&root).unwrap();
        let key = MeshKey::generate(Epoch(0));
        let data = b"a chunk of a synced file";
        let id = content::chunk_id(&key.chunk_id_key(), data);
        let secret = b"an ignored file, never synced";
        let secret_id = content::chunk_id(&key.chunk_id_key(), secret);
        std::fs::write(root.join("secret"), secret).unwrap();
        // "a" and "b" hold the same chunk; only b's place is recorded by chunk.
        let record = |rel: &str| {
            std::fs::write(root.join(rel), data).unwrap();
            let meta = std::fs::metadata(root.join(rel)).unwrap();
            let chunk = (0, 0, data.len() as u32);
            let mut f = file(&[chunk], meta.len(), unix_nanos(meta.modified().unwrap()));
            f.chunks[0].id = id;
            f
        };
        let (a, b) = (record("a"), record("b"));
        let folder = FolderId::new("f").unwrap();
        let mut map = ChunkMap::new(state.clone());
        let mut batch = Batch::default();
        batch.folders.push((folder.clone(), root.clone()));
        batch.local.push((folder.clone(), "a".into(), Some(a)));
        let at_b = FileAt {
            root: Arc::new(root.clone()),
            rel: "b".into(),
        };
        map.record(&at_b, None, Some(&b), &mut batch);
        state.commit(batch).unwrap();
        let served = Served {
            map: Arc::new(StdMutex::new(map)),
            state: state.clone(),
            keys: Arc::new(StdMutex::new(KeyRing::of([key]))),
            readers: Default::default(),
            store: Arc::new(StdMutex::new(
                ChunkStore::open(&dir.path().join("store")).unwrap(),
            )),
        };
        let near = |folder: &str, path: &str| Near {
            folder: folder.into(),
            paths: vec![Some(path.into())],
        };
        let plain = |bytes: &[u8]| vec![Some(Answer::Plain(bytes.to_vec().into()))];

        // Read where its record says, b's place aside: b gone, the named file still serves.
        std::fs::rename(root.join("b"), dir.path().join("b moved")).unwrap();
        assert_eq!(served.get_many_plain(&[id]), vec![None]);
        assert_eq!(served.get_many_near(&[id], &near("f", "a")), plain(data));
        // Named where no record of this device holds it: an ignored file, a path out of the
        // folder, another folder, a file whose record holds other chunks.
        for (folder, path, id) in [
            ("f", "secret", secret_id),
            ("f", "../folder/secret", secret_id),
            ("g", "a", id),
            ("f", "a", secret_id),
        ] {
            let answer = served.get_many_near(&[id], &near(folder, path));
            assert_eq!(answer, vec![None], "{folder}/{path}");
        }
        // The named file changed since its record: not read; the chunk comes from where else
        // it lies (b, back in place).
        std::fs::rename(dir.path().join("b moved"), root.join("b")).unwrap();
        std::fs::write(root.join("a"), b"the same length, other bytes!!!").unwrap();
        assert_eq!(served.get_many_near(&[id], &near("f", "a")), plain(data));
    }
}
