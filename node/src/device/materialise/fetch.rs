//! Getting the bytes of the files a plan writes: their chunk lists, a temp file per file filled
//! with the chunks this device already holds (read from current local files and re-checked, or
//! from its own store of old versions),
//! then the rest fetched from every connected peer and written into place as it arrives, so
//! memory holds only what is in flight, never whole files.
//!
//! A chunk that fails its check (altered on a storage peer's disk, or a bad peer) is refused,
//! logged, and asked again from the other sources, up to three rounds. File I/O and chunk
//! opening run on blocking threads.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use meshsync_crdt::{ChunkId, ChunkListHash, FileKind, FolderId, KeyRing};
use meshsync_transport::chunks::{self, Fetched};
use meshsync_transport::{PeerId, Transport};

use super::direct::{Sink, Spare};
use super::plan::Work;
use crate::chunks::{content, ChunkRef};
use crate::device::folder::TEMP_PREFIX;
use crate::device::serve::FileAt;
use crate::device::{lists, Device, Shared};
use crate::disk::{parent_of, FolderRoot};
use crate::protocol::{self, SentList, SyncReply, SyncRequest};
use crate::state::LocalFile;

/// Files at least this big get their own fsync; smaller ones share one `syncfs` per batch.
pub(super) const OWN_FSYNC: u64 = 4 << 20;
/// At most this many temp files are held open while chunks arrive.
const OPEN_WHILE_RECEIVING: usize = 64;
/// At most this many of them are written direct at once (each gathers what lands up to 32
/// MiB ahead of the point it has written, in memory taken as chunks land).
const DIRECT_AT_ONCE: usize = 4;

/// How many chunks in a row one task copies from files here into a file being assembled.
const COPY_RUN: usize = 64;

/// A file of up to this many chunks is named to the peers with each of its missing chunks
/// (see [`Assembly::missing`]).
const NAMED_UP_TO: usize = 128;

/// The longest symlink target written (Linux's `PATH_MAX` less its terminator).
const MAX_LINK: u64 = 4095;

/// Chunk lists by their hash.
pub(super) type Lists = HashMap<ChunkListHash, Vec<ChunkRef>>;

/// A file being assembled: its temp file, final size, and how many chunks it still lacks.
pub(super) struct Pending {
    /// The temp file's path in the folder (beside the target).
    pub(super) tmp: String,
    /// The temp file's inode (0 for a link, made only when it is renamed into place): how it
    /// is found again if its folder moves meanwhile.
    pub(super) ino: u64,
    pub(super) size: u64,
    /// How many chunks its list holds, and how many of them it still lacks.
    chunks: usize,
    pub(super) left: usize,
    /// For a symlink: its target, assembled in memory (it is never a file on disk).
    pub(super) link: Option<Vec<u8>>,
    /// To be opened for writes around the page cache when its first chunk arrives (see
    /// [`super::direct`]): a big file none of whose chunks were found here. Cleared once it is
    /// opened, so a file put aside and opened again goes on as usual.
    direct: bool,
}

/// Every file being assembled (by its step's position in the plan) and where each missing
/// chunk goes.
#[derive(Default)]
pub(super) struct Assembly {
    pub(super) pending: HashMap<usize, Pending>,
    wanted_at: HashMap<ChunkId, Vec<(usize, u64)>>,
    /// Big files already complete, being flushed while the rest arrives.
    pub(super) flushes: Vec<(usize, tokio::task::JoinHandle<std::io::Result<()>>)>,
    /// Steps that could not be prepared, and why (e.g. a parent that is a symlink here).
    pub(super) problems: Vec<(usize, String)>,
    /// Steps whose temp file could no longer be written (its folder moved or became a link
    /// meanwhile): reported, not installed, their temp file removed.
    pub(super) broken: std::collections::BTreeSet<usize>,
}

/// Where this device already holds chunks: current files (re-checked when read), link
/// targets, and its own chunk store (old versions it kept, opened and checked like any chunk).
#[derive(Default)]
pub(super) struct Held {
    files: HashMap<ChunkId, Vec<(FileAt, ChunkRef)>>,
    links: HashMap<ChunkId, Vec<u8>>,
    store: Option<Arc<std::sync::Mutex<crate::chunks::ChunkStore>>>,
}

impl Held {
    /// Chunk `c` from a current file here, else from this device's store: checked against
    /// its ID either way (a file may have been edited since it was scanned).
    /// `open` keeps the file read last (chunks in a row mostly come from the same file).
    fn chunk<'a>(
        &'a self,
        c: &ChunkRef,
        keys: &KeyRing,
        open: &mut Option<(&'a FileAt, std::fs::File)>,
    ) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let in_file = self
            .files
            .get(&c.id)
            .into_iter()
            .flatten()
            .find_map(|(src, at)| {
                if open.as_ref().is_none_or(|(was, _)| *was != src) {
                    *open = Some((src, src.open()?));
                }
                let (_, file) = open.as_ref()?;
                let mut data = vec![0u8; at.len as usize];
                file.read_exact_at(&mut data, at.offset).ok()?;
                content::key_of(keys, &c.id, &data).map(|_| data)
            });
        in_file.or_else(|| {
            let sealed = self.store.as_ref()?.lock().ok()?.get(&c.id).ok()??;
            let plain = content::open_chunk_in(keys, None, &c.id, sealed).ok()?;
            (plain.len() == c.len as usize).then(|| plain.to_vec())
        })
    }
}

impl Device {
    /// Where this device holds the chunks of `lists` now.
    pub(super) fn held_chunks(&self, lists: &Lists) -> Held {
        let mut held = Held {
            store: Some(self.store.clone()),
            ..Held::default()
        };
        let ids = lists.values().flatten().map(|c| &c.id);
        for (id, places) in crate::device::serve::places_of(&self.state, ids) {
            let places = places.into_iter().map(|p| (p.at, p.chunk));
            held.files.insert(id, places.collect());
        }
        let map = self.chunk_map.lock().expect("chunk map lock");
        for c in lists.values().flatten() {
            if let Some(target) = map.links.get(&c.id) {
                held.links.insert(c.id, target.clone());
            }
        }
        held
    }
}

/// The chunk lists of the files `work` writes (in `folder`): from this device's state, else
/// asked of `from`, then of the other connected members (each checked against its hash; a
/// list that does not match is ignored), naming a file that has each in the index.
pub(super) async fn chunk_lists(
    device: &Shared,
    transport: &Transport,
    (from, folder): (PeerId, &FolderId),
    work: &[Work],
    olds: &HashMap<String, LocalFile>,
) -> anyhow::Result<Lists> {
    // Each wanted list, with the list of the version it replaces here (the answer can then
    // be the pieces that differ from it) and the path of the first file to have it.
    let mut wanted: BTreeMap<ChunkListHash, (Option<ChunkListHash>, &str)> = BTreeMap::new();
    for w in work.iter().filter(|w| w.needs_content()) {
        let base = olds.get(&w.path).map(|old| old.list_hash);
        wanted.entry(w.record.chunks).or_insert((base, &w.path));
    }
    let (state, readers) = {
        let d = device.lock().await;
        let readers = d.readers.lock().expect("readers lock").clone();
        (d.state.clone(), readers)
    };
    let mut lists: Lists = state
        .chunk_lists(wanted.keys())
        .unwrap_or_default()
        .into_iter()
        .collect();
    // From `from` first, then from the other devices: the peer a catch-up asks may lack a
    // list that a third device has (it may be waiting for it too). Never a storage peer: it
    // holds no lists, and a request names files.
    let mut others = transport.connected_peers().await;
    others.retain(|p| *p != from);
    let devices = std::iter::once(from)
        .chain(others)
        .filter(|p| readers.contains(p));
    for peer in devices {
        // In the order of the files (the plan's, by path): the peer reads its records so.
        let mut asked: Vec<(ChunkListHash, Option<ChunkListHash>, String)> = wanted
            .iter()
            .filter(|(h, _)| !lists.contains_key(h))
            .map(|(h, (base, path))| (*h, *base, path.to_string()))
            .collect();
        if asked.is_empty() {
            break;
        }
        asked.sort_by(|a, b| a.2.cmp(&b.2));
        // Without the paths where the peer does not know `ListsIn` (an older version refuses
        // what it cannot read).
        let by_hash = SyncRequest::ListsSince(asked.iter().map(|a| (a.0, a.1)).collect());
        let ask = SyncRequest::ListsIn {
            folder: folder.clone(),
            asked,
        };
        let got = match protocol::doc(transport, peer, &ask).await {
            Ok(SyncReply::Refused(_)) => protocol::doc(transport, peer, &by_hash).await,
            answer => answer,
        };
        let Ok(SyncReply::Lists(got)) = got else {
            continue; // unreachable, refused, or not a list: ask the next
        };
        let asked = |s: &SentList| wanted.contains_key(&s.hash);
        let got = got.into_iter().filter(asked).collect();
        // Put together against this device's copies of the bases (blocking reads).
        let s = state.clone();
        let got = tokio::task::spawn_blocking(move || lists::received(&s, got, &[])).await?;
        lists.extend(got);
    }
    Ok(lists)
}

/// The temp name step `i` assembles `rel` in: in the same folder, so the rename is atomic,
/// and short whatever the file's name (a name may already use the whole 255-byte limit).
pub(super) fn temp_rel(rel: &str, i: usize) -> String {
    let name = format!("{TEMP_PREFIX}{}-{i}", std::process::id());
    match parent_of(rel) {
        "" => name,
        parent => format!("{parent}/{name}"),
    }
}

/// Gives every file or link `work` writes a temp file (links: a buffer) filled with the
/// chunks this device already holds, and notes where each missing chunk goes. Blocking.
pub(super) fn prepare(
    root: &FolderRoot,
    work: &[Work],
    lists: &Lists,
    held: &Held,
    keys: &KeyRing,
) -> anyhow::Result<Assembly> {
    let mut assembly = Assembly::default();
    for (i, w) in work.iter().enumerate() {
        if !w.needs_content() {
            continue;
        }
        let Some(list) = lists.get(&w.record.chunks) else {
            // Asked again on the next pull, of whichever peer that is.
            let why = "no peer has given an intact chunk list for it yet".to_string();
            assembly.problems.push((i, why));
            continue;
        };
        let size = content::list_size(list);
        if size != w.record.size || (w.record.kind == FileKind::Symlink && size > MAX_LINK) {
            // The signed record and its list disagree (or a link target no system allows).
            let why = format!(
                "its chunk list holds {size} bytes, the signed record {}",
                w.record.size
            );
            assembly.problems.push((i, why));
            continue;
        }
        let tmp = temp_rel(&w.path, i);
        let pending = if w.record.kind == FileKind::Symlink {
            Ok(assembly.prepare_link(i, tmp, list, held))
        } else {
            assembly.prepare_file(root, i, tmp, list, held, keys)
        };
        match pending {
            Ok(pending) => {
                assembly.pending.insert(i, pending);
            }
            // This path cannot be written here (its parent is a link or a file, the disk is
            // full, …): reported, and the rest of the batch goes on.
            Err(error) => assembly.problems.push((i, format!("{error:#}"))),
        }
    }
    Ok(assembly)
}

impl Assembly {
    /// The chunks still missing, in the order of the first file each goes in (the plan's,
    /// by path), with the path of that file for a peer to read it from if its own record of
    /// the file holds it (see `chunks::Near`; only for files of a few chunks, whose records
    /// the peer reads: [`MAX_NAMED_RECORD`](crate::state::MAX_NAMED_RECORD)).
    fn missing(&self, folder: &FolderId, work: &[Work]) -> (Vec<ChunkId>, chunks::Hints) {
        let mut first: Vec<(usize, u64, ChunkId)> = (self.wanted_at.iter())
            .filter_map(|(id, at)| at.iter().min().map(|&(i, offset)| (i, offset, *id)))
            .collect();
        first.sort_unstable();
        let few = |i: &usize| self.pending.get(i).is_some_and(|p| p.chunks <= NAMED_UP_TO);
        let paths = (first.iter())
            .filter(|(i, _, _)| few(i))
            .filter_map(|(i, _, id)| Some((*id, work.get(*i)?.path.clone())))
            .collect();
        let hints = chunks::Hints {
            folder: folder.as_str().to_string(),
            paths,
            readers: HashSet::new(),
        };
        (first.into_iter().map(|(_, _, id)| id).collect(), hints)
    }

    fn want(&mut self, id: ChunkId, i: usize, offset: u64) {
        self.wanted_at.entry(id).or_default().push((i, offset));
    }

    fn prepare_link(&mut self, i: usize, tmp: String, list: &[ChunkRef], held: &Held) -> Pending {
        let size = content::list_size(list);
        let mut link = vec![0u8; size as usize];
        let mut left = 0;
        for c in list {
            let at = c.range().start as usize..c.range().end as usize;
            match (held.links.get(&c.id), link.get_mut(at)) {
                (Some(data), Some(slot)) if data.len() == slot.len() => slot.copy_from_slice(data),
                _ => {
                    self.want(c.id, i, c.offset);
                    left += 1;
                }
            }
        }
        Pending {
            tmp,
            ino: 0,
            size,
            chunks: list.len(),
            left,
            link: Some(link),
            direct: false,
        }
    }

    /// Makes the temp file `tmp` and fills it with the chunks of `list` held here; if that
    /// fails part way (a full disk), the temp file goes again.
    fn prepare_file(
        &mut self,
        root: &FolderRoot,
        i: usize,
        tmp: String,
        list: &[ChunkRef],
        held: &Held,
        keys: &KeyRing,
    ) -> anyhow::Result<Pending> {
        // Its folder made if missing; a leftover of this process (same PID, step) goes.
        let file = root.create_fresh(&tmp)?;
        let size = content::list_size(list);
        let filled = fill(&file, size, list, held, keys).and_then(|copied| {
            let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
            Ok((copied, ino))
        });
        let (copied, ino) = match filled {
            Ok(filled) => filled,
            Err(error) => {
                drop(file);
                let _ = root.remove_file(&tmp);
                return Err(error).with_context(|| format!("filling its temp file {tmp}"));
            }
        };
        let mut left = 0usize;
        for (c, copied) in list.iter().zip(copied) {
            if !copied {
                self.want(c.id, i, c.offset);
                left += 1;
            }
        }
        Ok(Pending {
            tmp,
            ino,
            size,
            chunks: list.len(),
            left,
            link: None,
            direct: size >= OWN_FSYNC && left == list.len(),
        })
    }

    /// Opens each fetched chunk and writes it wherever it is wanted; a big file that becomes
    /// complete starts its own flush. A chunk that fails its check marks its sender bad.
    /// Blocking (runs until the fetch ends).
    fn receive(
        &mut self,
        root: &FolderRoot,
        mut rx: tokio::sync::mpsc::Receiver<Fetched>,
        keys: &KeyRing,
        bad_sources: &mut BTreeSet<PeerId>,
    ) -> anyhow::Result<()> {
        // Chunks of several files arrive interleaved: their handles are kept (a few at a
        // time; a complete file's is let go of), not opened again for every chunk.
        let mut open: HashMap<usize, Sink> = HashMap::new();
        let mut spare = Spare::default();
        while let Some(chunk) = rx.blocking_recv() {
            let opened = content::accept_received(keys, &chunk.id, chunk.answer);
            let plain = match opened {
                Ok(plain) => plain,
                Err(error) => {
                    tracing::warn!(peer = %chunk.peer, %error, "bad chunk refused; asking other sources");
                    bad_sources.insert(chunk.peer);
                    continue;
                }
            };
            for (i, offset) in self.wanted_at.remove(&chunk.id).unwrap_or_default() {
                if self.broken.contains(&i) {
                    continue;
                }
                let Some(p) = self.pending.get(&i) else {
                    continue;
                };
                if p.link.is_none() && !open.contains_key(&i) {
                    if open.len() >= OPEN_WHILE_RECEIVING {
                        // The few direct files stay open (put aside, they would go on as
                        // usual): the many small ones make the crowd.
                        self.put_aside(&mut open, &mut spare, |sink| !sink.is_direct());
                    }
                    self.open_sink(root, i, &mut open);
                }
                let Some(p) = self.pending.get_mut(&i) else {
                    continue;
                };
                if let Some(link) = &mut p.link {
                    let at = offset as usize..offset as usize + plain.len();
                    if let Some(slot) = link.get_mut(at) {
                        slot.copy_from_slice(&plain);
                    }
                } else {
                    let written = match open.get_mut(&i) {
                        Some(sink) => sink
                            .write_at(&plain, offset, &mut spare)
                            .with_context(|| format!("writing into {}", p.tmp)),
                        None => Err(anyhow::anyhow!(
                            "its temp file {} is no longer where it was made (its folder moved or became a link)",
                            p.tmp
                        )),
                    };
                    if let Err(error) = written {
                        // This file only: the rest of the batch goes on.
                        open.remove(&i);
                        self.problems.push((i, format!("{error:#}")));
                        self.broken.insert(i);
                        continue;
                    }
                }
                p.left -= 1;
                if p.left == 0 {
                    let finished = open.remove(&i).map(|sink| sink.finish(&mut spare));
                    let finished = finished.unwrap_or(Ok(()));
                    if let Err(error) = finished {
                        let why = format!("writing into {}: {error}", p.tmp);
                        self.problems.push((i, why));
                        self.broken.insert(i);
                        continue;
                    }
                }
                if p.left == 0 && p.link.is_none() && p.size >= OWN_FSYNC {
                    // A big file is flushed on its own as soon as it is complete, while the
                    // rest of the batch is still arriving.
                    if let Ok(file) = root.open_read(&p.tmp) {
                        self.flushes
                            .push((i, tokio::task::spawn_blocking(move || file.sync_data())));
                    }
                }
            }
        }
        // What is still gathered is written: a later round or pull goes on from it.
        self.put_aside(&mut open, &mut spare, |_| true);
        Ok(())
    }

    /// Opens step `i`'s temp file to receive chunks: direct if it is to be and few others
    /// are, else as usual (from then on).
    fn open_sink(&mut self, root: &FolderRoot, i: usize, open: &mut HashMap<usize, Sink>) {
        let Some(p) = self.pending.get_mut(&i) else {
            return;
        };
        let Ok(file) = root.open_write(&p.tmp) else {
            return; // reported at its write
        };
        let direct_now = open.values().filter(|s| s.is_direct()).count();
        let direct = (p.direct && direct_now < DIRECT_AT_ONCE)
            .then(|| root.open_write_direct(&p.tmp).ok())
            .flatten();
        if p.direct && direct.is_none() {
            tracing::debug!(tmp = %p.tmp, direct_now, "not direct");
        }
        p.direct = false;
        let sink = match direct {
            Some(direct) => Sink::direct(file, direct),
            None => Sink::plain(file),
        };
        open.insert(i, sink);
    }

    /// Writes out and closes the open temp files `which` picks; those that were direct go on
    /// as usual.
    fn put_aside(
        &mut self,
        open: &mut HashMap<usize, Sink>,
        spare: &mut Spare,
        which: impl Fn(&Sink) -> bool,
    ) {
        for (i, sink) in open.extract_if(|_, sink| which(sink)) {
            if let Err(error) = sink.finish(spare) {
                let tmp = self.pending.get(&i).map_or("", |p| p.tmp.as_str());
                self.problems
                    .push((i, format!("writing into {tmp}: {error}")));
                self.broken.insert(i);
            }
        }
    }
}

/// Sizes `file` (a fresh temp file) to `size` and writes into it every chunk of `list` this
/// device holds; which ones it wrote, in list order.
fn fill(
    file: &std::fs::File,
    size: u64,
    list: &[ChunkRef],
    held: &Held,
    keys: &KeyRing,
) -> std::io::Result<Vec<bool>> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    if size >= OWN_FSYNC {
        // A big file's blocks reserved at once: its many writes then only fill them.
        crate::disk::preallocate(file, size);
    }
    file.set_len(size)?;
    // Read, checked and written on every core, a run of chunks at a time (a 1 MiB edit
    // of a 256 MiB file copies the other 255 MiB from the file it replaces). A big file's
    // runs start going to disk as they are written: its flush then waits for little.
    let copied: Vec<Vec<bool>> = list
        .par_chunks(COPY_RUN)
        .map(|run| {
            let mut open = None;
            let copied = run
                .iter()
                .map(|c| match held.chunk(c, keys, &mut open) {
                    Some(data) => file.write_all_at(&data, c.offset).map(|()| true),
                    None => Ok(false),
                })
                .collect::<std::io::Result<Vec<bool>>>()?;
            if let (Some(first), Some(last)) = (run.first(), run.last()) {
                if size >= OWN_FSYNC && copied.contains(&true) {
                    let end = last.range().end;
                    crate::disk::start_writeback(file, first.offset, end - first.offset);
                }
            }
            Ok(copied)
        })
        .collect::<std::io::Result<_>>()?;
    Ok(copied.into_iter().flatten().collect())
}

/// Fetches every chunk `assembly` still lacks (for `work`, in `folder`) from the connected
/// peers, in up to three rounds (a round that refused no bad chunk ends it: what is missing
/// has no source now). Where each chunk lies is told to the other devices (`readers`) only.
pub(super) async fn fetch(
    (transport, keys, readers): (&Transport, &KeyRing, &HashSet<PeerId>),
    (root, folder, work): (Arc<FolderRoot>, &FolderId, &[Work]),
    mut assembly: Assembly,
) -> anyhow::Result<Assembly> {
    let mut bad_sources: BTreeSet<PeerId> = BTreeSet::new();
    for _round in 0..3 {
        let (missing, mut hints) = assembly.missing(folder, work);
        hints.readers = readers.clone();
        if missing.is_empty() {
            break;
        }
        let peers: Vec<PeerId> = transport
            .connected_peers()
            .await
            .into_iter()
            .filter(|p| !bad_sources.contains(p))
            .collect();
        if peers.is_empty() {
            break;
        }
        let bad_before = bad_sources.len();
        let (sink, rx) = tokio::sync::mpsc::channel::<Fetched>(64);
        let fetcher = transport.clone();
        let task =
            tokio::spawn(
                async move { chunks::fetch_near(&fetcher, peers, missing, hints, sink).await },
            );
        let (keys, root) = (Arc::new(keys.clone()), root.clone());
        let (back, bad, received) = tokio::task::spawn_blocking(move || {
            let mut bad = bad_sources;
            let received = assembly.receive(&root, rx, &keys, &mut bad);
            (assembly, bad, received)
        })
        .await?;
        (assembly, bad_sources) = (back, bad);
        received?;
        let report = task.await?;
        if !report.missing.is_empty() {
            tracing::warn!(
                missing = report.missing.len(),
                "some chunks are not available yet"
            );
        }
        if bad_sources.len() == bad_before {
            break;
        }
    }
    Ok(assembly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::materialise::plan::tests::{two_devices, update};
    use crate::device::materialise::plan::Step;
    use meshsync_crdt::{Epoch, FolderId, FolderIndex, MeshKey};

    #[test]
    fn a_temp_file_that_cannot_be_filled_goes_again() {
        let (a, _, log) = two_devices();
        let mut record = FolderIndex::new(log.mesh(), FolderId::random())
            .write(&a, Epoch(0), vec![update("dir/x", 1, false)])
            .unwrap()
            .remove(0);
        let dir = tempfile::tempdir().unwrap();
        let data = b"a chunk this device holds";
        std::fs::write(dir.path().join("held"), data).unwrap();
        let key = MeshKey::generate(Epoch(0));
        let keys = KeyRing::of([key.clone()]);
        let id = content::chunk_id(&key.chunk_id_key(), data);
        let len = data.len() as u32;
        // Written where no file can reach (past the largest offset a write takes): the write
        // fails after the temp file is made, as on a full disk.
        let list = vec![ChunkRef {
            id,
            offset: 1 << 63,
            len,
        }];
        record.size = u64::from(len);
        let lists: Lists = [(record.chunks, list)].into_iter().collect();
        let at = FileAt {
            root: Arc::new(dir.path().to_path_buf()),
            rel: "held".into(),
        };
        let held = Held {
            files: [(id, vec![(at, ChunkRef { id, offset: 0, len })])].into(),
            ..Held::default()
        };
        let work = [Work {
            path: "dir/x".into(),
            record,
            step: Step::Write,
            before: None,
        }];
        let root = FolderRoot::open(dir.path()).unwrap();
        let assembly = prepare(&root, &work, &lists, &held, &keys).unwrap();

        assert!(assembly.pending.is_empty());
        assert_eq!(assembly.problems.len(), 1, "{:?}", assembly.problems);
        assert!(assembly.problems[0].1.contains("temp file"));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
