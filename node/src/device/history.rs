//! Old versions on a running device: `meshsync versions` lists them, `meshsync restore` writes
//! one back (from this device's store and files first, then any connected peer), `meshsync gc`
//! forgets those past the retention and releases their chunks here and on the storage peers.
//! The bookkeeping itself (what a kept version is) is [`crate::versions`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use meshsync_crdt::{ChunkId, ChunkListHash, DeviceId, FolderId, KeyRing};
use meshsync_transport::chunks::{self, ChunkSource, Fetched};
use meshsync_transport::{PeerId, Transport};

use super::folder::TEMP_PREFIX;
use super::scan::{self, ScanOptions};
use super::serve::Served;
use super::{Device, Shared};
use crate::chunks::{content, ChunkRef};
use crate::control::{GcReport, Released, Restored, VersionInfo, VersionList};
use crate::disk::{parent_of, set_mode, FolderRoot};
use crate::protocol::{self, SignedRelease, StoreReply, StoreRequest};
use crate::state::Batch;
use crate::versions::{now_secs, versions_of, VersionEntry};

/// The synced folder, its root, and the relative path of `path` (which may no longer exist).
fn locate(d: &Device, path: &Path) -> anyhow::Result<(FolderId, PathBuf, String)> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    // The parent may be a symlinked temp dir: resolve what exists.
    let (dir, name) = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => (dir.to_path_buf(), name.to_owned()),
        _ => anyhow::bail!(
            "{} is not a file path; give the path of a file inside a synced folder",
            path.display()
        ),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let absolute = dir.join(name);
    for (id, f) in &d.folders {
        if let Ok(rel) = absolute.strip_prefix(&f.path) {
            let rel = rel.to_string_lossy().to_string();
            if !rel.is_empty() {
                return Ok((id.clone(), f.path.clone(), rel));
            }
        }
    }
    anyhow::bail!(
        "{} is not inside a synced folder (see `meshsync folder list`)",
        path.display()
    )
}

/// `meshsync versions PATH`.
pub async fn list(device: &Shared, path: &Path) -> anyhow::Result<VersionList> {
    let d = device.lock().await;
    let (folder, _, rel) = locate(&d, path)?;
    let store = d.store.lock().expect("store lock");
    let mut versions = Vec::new();
    for (number, version, entry) in versions_of(&d.state, &folder, &rel)? {
        let list = d.state.chunk_list(&entry.list_hash)?.unwrap_or_default();
        let ids: Vec<ChunkId> = list.iter().map(|c| c.id).collect();
        versions.push(VersionInfo {
            number,
            version,
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            replaced_at: entry.replaced_at,
            stored_here: store.missing(&ids)?.is_empty(),
        });
    }
    Ok(VersionList {
        folder: folder.to_string(),
        path: rel,
        versions,
    })
}

/// What a restore works with, taken under the device lock.
struct RestoreJob {
    folder: FolderId,
    root: PathBuf,
    rel: String,
    number: usize,
    entry: VersionEntry,
    list: Vec<ChunkRef>,
    keys: KeyRing,
    transport: Transport,
    served: Served,
}

impl Device {
    fn restore_job(&self, path: &Path, number: usize) -> anyhow::Result<RestoreJob> {
        let (folder, root, rel) = locate(self, path)?;
        let versions = versions_of(&self.state, &folder, &rel)?;
        if versions.is_empty() {
            anyhow::bail!("no kept versions of {rel} (see `meshsync versions`)");
        }
        let Some((_, _, entry)) = versions.into_iter().find(|(i, _, _)| *i == number) else {
            anyhow::bail!("{rel} has no version {number} (see `meshsync versions`)");
        };
        let list = self
            .state
            .chunk_list(&entry.list_hash)?
            .context("the chunk list of that version is not known here")?;
        Ok(RestoreJob {
            folder,
            root,
            rel,
            number,
            entry,
            list,
            keys: self.key_ring(),
            transport: self.transport.clone(),
            served: self.served(),
        })
    }
}

/// A restored version being assembled in its temp file.
struct Assembling {
    tmp: String,
    file: std::fs::File,
    /// Offsets still to fill, per chunk.
    wanted: HashMap<ChunkId, Vec<u64>>,
    from_here: usize,
    from_peers: usize,
}

/// `meshsync restore PATH [--version N]`: writes version N (1 = the newest kept) back in
/// place, from this device's store, its current files, or any connected peer.
pub async fn restore(
    device: &Shared,
    path: &Path,
    number: Option<usize>,
) -> anyhow::Result<Restored> {
    let job = device.lock().await.restore_job(path, number.unwrap_or(1))?;
    let root = Arc::new(FolderRoot::open(&job.root)?);
    let (list, key, served, door, rel) = (
        job.list.clone(),
        job.keys.clone(),
        job.served.clone(),
        root.clone(),
        job.rel.clone(),
    );
    let mut assembling =
        tokio::task::spawn_blocking(move || assemble_here(&door, &rel, &list, &key, &served))
            .await??;
    if !assembling.wanted.is_empty() {
        let peers: Vec<PeerId> = job.transport.connected_peers().await;
        let (sink, rx) = tokio::sync::mpsc::channel::<Fetched>(64);
        let ids: Vec<ChunkId> = assembling.wanted.keys().copied().collect();
        let fetcher = job.transport.clone();
        let task = tokio::spawn(async move { chunks::fetch(&fetcher, peers, ids, sink).await });
        let (keys, door) = (job.keys.clone(), root.clone());
        assembling = tokio::task::spawn_blocking(move || {
            fill_fetched(&door, &mut assembling, rx, &keys).map(|()| assembling)
        })
        .await??;
        task.await?;
    }
    let size = content::list_size(&job.list);
    let (mode, rel) = (job.entry.mode, job.rel.clone());
    let (from_here, from_peers) = (assembling.from_here, assembling.from_peers);
    tokio::task::spawn_blocking(move || install(&root, assembling, &rel, mode)).await??;
    scan::scan(device, &job.folder, ScanOptions::default()).await?;
    Ok(Restored {
        folder: job.folder.to_string(),
        path: job.rel,
        number: job.number,
        size,
        chunks_from_this_device: from_here,
        chunks_from_peers: from_peers,
    })
}

/// Starts the temp file beside `rel` and fills what this device holds (its store, then its
/// current files). Blocking.
fn assemble_here(
    root: &FolderRoot,
    rel: &str,
    list: &[ChunkRef],
    keys: &KeyRing,
    served: &Served,
) -> anyhow::Result<Assembling> {
    use std::os::unix::fs::FileExt;
    let dir = parent_of(rel);
    root.create_dir_all(dir)?;
    let name = format!("{TEMP_PREFIX}{}-restore", std::process::id());
    let tmp = if dir.is_empty() {
        name
    } else {
        format!("{dir}/{name}")
    };
    let _ = root.remove_file(&tmp);
    let file = root.create_new(&tmp)?;
    file.set_len(content::list_size(list))?;
    let mut assembling = Assembling {
        tmp,
        file,
        wanted: HashMap::new(),
        from_here: 0,
        from_peers: 0,
    };
    // A batch at a time, as a peer asks: one lookup of places and one open of each file per
    // batch, and never the whole version in memory.
    for batch in list.chunks(chunks::BATCH) {
        let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
        for (c, answer) in batch.iter().zip(served.get_many_plain(&ids)) {
            let local = answer.map(|answer| {
                content::accept_received(keys, &c.id, answer.map(|b| Vec::from(b).into()))
            });
            match local {
                Some(Ok(plain)) => {
                    assembling.file.write_all_at(&plain, c.offset)?;
                    assembling.from_here += 1;
                }
                _ => assembling.wanted.entry(c.id).or_default().push(c.offset),
            }
        }
    }
    Ok(assembling)
}

/// Writes fetched chunks into place (a bad one is refused). Blocking.
fn fill_fetched(
    _root: &FolderRoot,
    assembling: &mut Assembling,
    mut rx: tokio::sync::mpsc::Receiver<Fetched>,
    keys: &KeyRing,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    while let Some(chunk) = rx.blocking_recv() {
        let Ok(plain) = content::accept_received(keys, &chunk.id, chunk.answer) else {
            tracing::warn!(peer = %chunk.peer, "bad chunk refused during restore");
            continue;
        };
        for offset in assembling.wanted.remove(&chunk.id).unwrap_or_default() {
            assembling.file.write_all_at(&plain, offset)?;
            assembling.from_peers += 1;
        }
    }
    Ok(())
}

/// Into place if complete: fsync, mode, rename, fsync of the folder; else nothing changes.
/// Blocking.
fn install(root: &FolderRoot, assembling: Assembling, rel: &str, mode: u32) -> anyhow::Result<()> {
    let Assembling {
        tmp, file, wanted, ..
    } = assembling;
    if !wanted.is_empty() {
        drop(file);
        let _ = root.remove_file(&tmp);
        anyhow::bail!(
            "{} of the version's chunks are on no device or storage peer reachable now; nothing was changed. Try again when a device or storage peer that holds them is connected (see `meshsync status`)",
            wanted.len()
        );
    }
    set_mode(&file, mode)?;
    file.sync_all()?;
    drop(file);
    root.rename(&tmp, rel)?;
    root.sync_dir(parent_of(rel))?;
    Ok(())
}

/// What gc leaves to tell the storage peers.
struct Release {
    chunks: Vec<ChunkId>,
    freed: u64,
    expired: usize,
    transport: Transport,
    storage_peers: Vec<PeerId>,
    mesh: meshsync_crdt::MeshId,
    keys: std::sync::Arc<meshsync_crdt::DeviceKeys>,
}

impl Device {
    /// Forgets versions past retention, removes chunks nothing references from this device's
    /// store, and returns what to release on the storage peers; `None` if nothing expired.
    fn forget_expired(&mut self) -> anyhow::Result<Option<Release>> {
        let retention = self.home.config()?.retention_secs()?;
        let now = now_secs();
        let mut batch = Batch::default();
        let mut expired_lists: BTreeSet<ChunkListHash> = BTreeSet::new();
        let mut kept_lists: BTreeSet<ChunkListHash> = BTreeSet::new();
        let mut expired = 0usize;
        for id in self.folders.keys() {
            for (path, version, bytes) in self.state.versions(id)? {
                let Ok(entry) = postcard::from_bytes::<VersionEntry>(&bytes) else {
                    continue;
                };
                if entry.replaced_at.saturating_add(retention) <= now {
                    expired_lists.insert(entry.list_hash);
                    batch.versions.push((id.clone(), path, version, None));
                    expired += 1;
                } else {
                    kept_lists.insert(entry.list_hash);
                }
            }
        }
        if expired == 0 {
            // The usual case, every few minutes: no walk over the whole index.
            return Ok(None);
        }
        kept_lists.extend(self.current_lists()?);
        let referenced = self.chunks_of(&kept_lists)?;
        let mut release: Vec<ChunkId> = Vec::new();
        for c in self.chunks_of_lists(&expired_lists)? {
            if !referenced.contains(&c) && !release.contains(&c) {
                release.push(c);
            }
        }
        self.state.commit(batch)?;
        let freed = {
            let mut store = self.store.lock().expect("store lock");
            let unreferenced: Vec<ChunkId> = store
                .ids()?
                .into_iter()
                .filter(|id| !referenced.contains(id))
                .collect();
            store.remove(&unreferenced)?.1
        };
        Ok(Some(Release {
            chunks: release,
            freed,
            expired,
            transport: self.transport.clone(),
            storage_peers: self.storage_peers(),
            mesh: self.log.mesh(),
            keys: self.keys.clone(),
        }))
    }

    /// The chunk lists of every live record (winners and conflicting versions) and every file
    /// this device holds.
    fn current_lists(&self) -> anyhow::Result<BTreeSet<ChunkListHash>> {
        let mut lists = BTreeSet::new();
        for f in self.folders.values() {
            for item in f.index.iter() {
                let (_, state) = item?;
                for record in std::iter::once(&state.winner).chain(&state.losers) {
                    if !record.deleted {
                        lists.insert(record.chunks);
                    }
                }
            }
            lists.extend(f.local.values().map(|file| file.list_hash));
        }
        Ok(lists)
    }

    fn chunks_of(&self, lists: &BTreeSet<ChunkListHash>) -> anyhow::Result<HashSet<ChunkId>> {
        Ok(self.chunks_of_lists(lists)?.into_iter().collect())
    }

    /// Every chunk the known `lists` name, in order.
    fn chunks_of_lists(&self, lists: &BTreeSet<ChunkListHash>) -> anyhow::Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for hash in lists {
            out.extend(
                self.state
                    .chunk_list(hash)?
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.id),
            );
        }
        Ok(out)
    }
}

/// Forgets versions past retention; removes chunks nothing references from this device's
/// store, and asks the connected storage peers to delete them too (signed).
pub async fn gc(device: &Shared) -> anyhow::Result<GcReport> {
    let Some(release) = device.lock().await.forget_expired()? else {
        return Ok(GcReport {
            expired_versions: 0,
            unreferenced_chunks: 0,
            freed_here_bytes: 0,
            storage_peers: vec![],
        });
    };
    let connected: BTreeSet<PeerId> = release
        .transport
        .connected_peers()
        .await
        .into_iter()
        .collect();
    let mut released = Vec::new();
    for peer in release
        .storage_peers
        .iter()
        .filter(|p| connected.contains(p))
    {
        for group in release.chunks.chunks(16_384) {
            let request = StoreRequest::Release(SignedRelease::sign(
                release.mesh,
                &release.keys,
                group.to_vec(),
            ));
            match protocol::sealed(&release.transport, *peer, &request).await {
                Ok(StoreReply::Released { chunks, bytes }) => released.push(Released {
                    storage_peer: DeviceId::from_peer_id(peer).map(|d| d.to_string()),
                    chunks,
                    bytes,
                }),
                Ok(_) => {}
                Err(error) => tracing::warn!(%peer, %error, "release refused"),
            }
        }
    }
    tracing::info!(
        expired = release.expired,
        released = release.chunks.len(),
        freed = release.freed,
        "old versions past retention forgotten"
    );
    Ok(GcReport {
        expired_versions: release.expired,
        unreferenced_chunks: release.chunks.len(),
        freed_here_bytes: release.freed,
        storage_peers: released,
    })
}
