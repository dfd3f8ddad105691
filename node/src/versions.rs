//! Old versions: overwritten and deleted files stay restorable for a retention period
//! (`retention` in config.toml, default 30 days).
//!
//! - Whenever a file this device holds is replaced or deleted — by a local edit or by a
//!   version from another device — its old record (size, mtime, mode, chunk list) is kept in
//!   the state database. When the change came from another device, the old chunks that the
//!   new version does not reuse are first read from the file on disk, sealed, and put in this
//!   device's chunk store (`HOME/chunks`), so it can restore without anyone's help. A local
//!   edit has already destroyed the old bytes: those come back from a storage peer (which got
//!   them when they were current) or from another device's store.
//! - `meshsync versions PATH` lists them; `meshsync restore PATH [--version N]` writes one back
//!   (temp file, fsync, rename), and the next scan publishes it as the newest version.
//! - Past retention, versions are forgotten; chunks nothing references any more leave this
//!   device's store, and the device tells the storage peers it reaches (a signed release), which
//!   delete them and give the space back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use meshsync_crdt::{ChunkId, ChunkListHash, FileKind, FolderId};
use meshsync_transport::chunks::{self, Fetched};
use meshsync_transport::PeerId;
use serde::{Deserialize, Serialize};

use crate::content;
use crate::daemon::Shared;
use crate::state::{Batch, LocalFile};
use crate::storage::{SignedRelease, StoreReply, StoreRequest};
use crate::store::ChunkStore;

/// Default retention of old versions.
pub const DEFAULT_RETENTION_SECS: u64 = 30 * 86_400;

/// One kept version of a path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionEntry {
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub list_hash: ChunkListHash,
    /// Unix seconds when a newer version (or a delete) replaced it.
    pub replaced_at: u64,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records `old` (what this device held at `path`) as a kept version.
pub fn record(batch: &mut Batch, folder: &FolderId, path: &str, old: &LocalFile) {
    if old.kind != FileKind::File || old.version == 0 {
        return;
    }
    let entry = VersionEntry {
        size: old.size,
        mtime_ns: old.mtime_ns,
        mode: old.mode,
        list_hash: old.list_hash,
        replaced_at: now_secs(),
    };
    if let Ok(bytes) = postcard::to_stdvec(&entry) {
        batch
            .versions
            .push((folder.clone(), path.to_string(), old.version, Some(bytes)));
    }
}

/// Before files are replaced by versions from elsewhere: reads the chunks of each old file
/// that its replacement does not reuse (and the store does not hold yet), checks them, seals
/// them and stores them, with one fsync for the lot.
pub fn preserve(
    store: &std::sync::Mutex<ChunkStore>,
    key: &meshsync_crdt::MeshKey,
    root: &Path,
    olds: &[(String, LocalFile, HashSet<ChunkId>)],
) -> anyhow::Result<usize> {
    use std::os::unix::fs::FileExt;
    let id_key = key.chunk_id_key();
    let mut sealed: Vec<(ChunkId, Vec<u8>)> = Vec::new();
    let mut seen = HashSet::new();
    {
        let store = store.lock().expect("store lock");
        for (rel, old, keep) in olds {
            let Ok(file) = std::fs::File::open(root.join(rel)) else {
                continue;
            };
            let wanted: Vec<ChunkId> = old
                .chunks
                .iter()
                .map(|c| c.0)
                .filter(|id| !keep.contains(id) && seen.insert(*id))
                .collect();
            let missing: HashSet<ChunkId> = store.missing(&wanted)?.into_iter().collect();
            for (id, offset, len) in &old.chunks {
                if !missing.contains(id) {
                    continue;
                }
                let mut plain = vec![0u8; *len as usize];
                if file.read_exact_at(&mut plain, *offset).is_err()
                    || content::chunk_id(&id_key, &plain) != *id
                {
                    continue; // edited since it was scanned: that version's bytes are gone
                }
                sealed.push((
                    *id,
                    content::seal_chunk(&key.chunk_key(), key.epoch(), id, &plain),
                ));
            }
        }
    }
    if sealed.is_empty() {
        return Ok(0);
    }
    let refs: Vec<(ChunkId, &[u8])> = sealed.iter().map(|(id, d)| (*id, &d[..])).collect();
    Ok(store.lock().expect("store lock").put_batch(&refs)?)
}

/// The synced folder and relative path of `path` (which may no longer exist).
fn locate(n: &crate::daemon::Node, path: &Path) -> anyhow::Result<(FolderId, PathBuf, String)> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    // The parent may be a symlinked temp dir: resolve what exists.
    let (dir, name) = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => (dir.to_path_buf(), name.to_owned()),
        _ => anyhow::bail!("{} is not a file path", path.display()),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let absolute = dir.join(name);
    for (id, f) in &n.folders {
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

/// Kept versions of `path`, newest first: (number, version, entry).
fn versions_of(
    n: &crate::daemon::Node,
    folder: &FolderId,
    rel: &str,
) -> anyhow::Result<Vec<(usize, u64, VersionEntry)>> {
    let mut out: Vec<(u64, VersionEntry)> = n
        .state
        .versions(folder)?
        .into_iter()
        .filter(|(p, _, _)| p == rel)
        .filter_map(|(_, v, bytes)| Some((v, postcard::from_bytes(&bytes).ok()?)))
        .collect();
    out.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, (v, e))| (i + 1, v, e))
        .collect())
}

/// `meshsync versions PATH`.
pub async fn list(node: &Shared, path: &Path) -> anyhow::Result<serde_json::Value> {
    let n = node.lock().await;
    let (folder, _, rel) = locate(&n, path)?;
    let store = n.store.lock().expect("store lock");
    let mut out = Vec::new();
    for (number, version, entry) in versions_of(&n, &folder, &rel)? {
        let list = n.state.chunk_list(&entry.list_hash)?.unwrap_or_default();
        let ids: Vec<ChunkId> = list.iter().map(|c| c.id).collect();
        let here = store.missing(&ids)?.is_empty();
        out.push(serde_json::json!({
            "number": number,
            "version": version,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
            "replaced_at": entry.replaced_at,
            "stored_here": here,
        }));
    }
    Ok(serde_json::json!({
        "folder": folder.to_string(),
        "path": rel,
        "versions": out,
    }))
}

/// `meshsync restore PATH [--version N]`: writes version N (1 = the newest kept) back in
/// place, from this device's store, its current files, or any connected peer.
pub async fn restore(
    node: &Shared,
    path: &Path,
    number: Option<usize>,
) -> anyhow::Result<serde_json::Value> {
    let number = number.unwrap_or(1);
    let (folder, root, rel, entry, list, key, transport, served) = {
        let n = node.lock().await;
        let (folder, root, rel) = locate(&n, path)?;
        let versions = versions_of(&n, &folder, &rel)?;
        if versions.is_empty() {
            anyhow::bail!("no kept versions of {rel} (see `meshsync versions`)");
        }
        let Some((_, _, entry)) = versions.into_iter().find(|(i, _, _)| *i == number) else {
            anyhow::bail!("{rel} has no version {number} (see `meshsync versions`)");
        };
        let list = n
            .state
            .chunk_list(&entry.list_hash)?
            .context("the chunk list of that version is not known here")?;
        let key = n.mesh_key()?;
        (
            folder,
            root,
            rel,
            entry,
            list,
            key,
            n.transport.clone(),
            n.served(),
        )
    };
    let size: u64 = list.iter().map(|c| u64::from(c.len)).sum();
    let target = root.join(&rel);
    let dir = target.parent().context("no parent folder")?.to_path_buf();
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".meshsync-tmp-{}-restore", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    file.set_len(size)?;
    let id_key = key.chunk_id_key();
    let open = |id: &ChunkId, sealed: Vec<u8>| {
        content::open_chunk(&key.chunk_key(), &id_key, key.epoch(), id, sealed)
    };
    // This device first: its store, then its current files.
    let mut wanted: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    let mut from_here = 0usize;
    {
        use meshsync_transport::chunks::ChunkSource;
        use std::os::unix::fs::FileExt;
        for c in &list {
            let local = served.get(&c.id).map(|b| b.to_vec());
            match local.map(|sealed| open(&c.id, sealed)) {
                Some(Ok(plain)) => {
                    file.write_all_at(&plain, c.offset)?;
                    from_here += 1;
                }
                _ => wanted.entry(c.id).or_default().push(c.offset),
            }
        }
    }
    let mut from_peers = 0usize;
    if !wanted.is_empty() {
        use std::os::unix::fs::FileExt;
        let peers: Vec<PeerId> = transport.connected_peers().await;
        let (sink, mut rx) = tokio::sync::mpsc::channel::<Fetched>(64);
        let ids: Vec<ChunkId> = wanted.keys().copied().collect();
        let fetcher = transport.clone();
        let task = tokio::spawn(async move { chunks::fetch(&fetcher, peers, ids, sink).await });
        while let Some(chunk) = rx.recv().await {
            let Ok(plain) = open(&chunk.id, chunk.data) else {
                tracing::warn!(peer = %chunk.peer, "bad chunk refused during restore");
                continue;
            };
            for offset in wanted.remove(&chunk.id).unwrap_or_default() {
                file.write_all_at(&plain, offset)?;
                from_peers += 1;
            }
        }
        task.await?;
    }
    if !wanted.is_empty() {
        drop(file);
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!(
            "{} of the version's chunks are on no device or storage peer reachable now; nothing was changed",
            wanted.len()
        );
    }
    // Into place: fsync, mode, rename, fsync of the folder.
    file.sync_all()?;
    drop(file);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
    }
    std::fs::rename(&tmp, &target)?;
    std::fs::File::open(&dir)?.sync_all()?;
    crate::daemon::scan(node, &folder).await?;
    Ok(serde_json::json!({
        "folder": folder.to_string(),
        "path": rel,
        "number": number,
        "size": size,
        "chunks_from_this_device": from_here,
        "chunks_from_peers": from_peers,
    }))
}

/// Forgets versions past retention; removes chunks nothing references from this device's
/// store, and asks the connected storage peers to delete them too (signed).
pub async fn gc(node: &Shared) -> anyhow::Result<serde_json::Value> {
    let (release, freed, expired, transport, storage_peers, mesh, keys) = {
        let mut n = node.lock().await;
        let n = &mut *n;
        let retention = n.home.config()?.retention_secs()?;
        let now = now_secs();
        let mut batch = Batch::default();
        let mut expired_lists: BTreeSet<ChunkListHash> = BTreeSet::new();
        let mut kept_lists: BTreeSet<ChunkListHash> = BTreeSet::new();
        let mut expired = 0usize;
        for id in n.folders.keys() {
            for (path, version, bytes) in n.state.versions(id)? {
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
            return Ok(serde_json::json!({
                "expired_versions": 0,
                "unreferenced_chunks": 0,
                "freed_here_bytes": 0,
                "storage_peers": [],
            }));
        }
        for f in n.folders.values() {
            for (_, state) in f.index.iter() {
                for record in std::iter::once(&state.winner).chain(&state.losers) {
                    if !record.deleted {
                        kept_lists.insert(record.chunks);
                    }
                }
            }
            for file in f.local.values() {
                kept_lists.insert(file.list_hash);
            }
        }
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        for hash in &kept_lists {
            for c in n.state.chunk_list(hash)?.unwrap_or_default() {
                referenced.insert(c.id);
            }
        }
        let mut release: Vec<ChunkId> = Vec::new();
        for hash in &expired_lists {
            for c in n.state.chunk_list(hash)?.unwrap_or_default() {
                if !referenced.contains(&c.id) && !release.contains(&c.id) {
                    release.push(c.id);
                }
            }
        }
        n.state.commit(batch)?;
        let unreferenced: Vec<ChunkId> = {
            let store = n.store.lock().expect("store lock");
            store
                .ids()?
                .into_iter()
                .filter(|id| !referenced.contains(id))
                .collect()
        };
        let (_, freed) = n.store.lock().expect("store lock").remove(&unreferenced)?;
        let storage_peers = n.storage_peers();
        (
            release,
            freed,
            expired,
            n.transport.clone(),
            storage_peers,
            n.log.mesh(),
            n.keys.clone(),
        )
    };
    let connected: BTreeSet<PeerId> = transport.connected_peers().await.into_iter().collect();
    let mut released = Vec::new();
    if !release.is_empty() {
        for peer in storage_peers.into_iter().filter(|p| connected.contains(p)) {
            for group in release.chunks(16_384) {
                let request =
                    StoreRequest::Release(SignedRelease::sign(mesh, &keys, group.to_vec()));
                let reply = crate::sealing::ask(&transport, peer, &request).await;
                match reply {
                    Ok(StoreReply::Released { chunks, bytes }) => {
                        released.push(serde_json::json!({
                            "storage_peer": meshsync_crdt::DeviceId::from_peer_id(&peer).map(|d| d.to_string()),
                            "chunks": chunks,
                            "bytes": bytes,
                        }));
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%peer, %error, "release refused"),
                }
            }
        }
    }
    if expired > 0 {
        tracing::info!(
            expired,
            released = release.len(),
            freed,
            "old versions past retention forgotten"
        );
    }
    Ok(serde_json::json!({
        "expired_versions": expired,
        "unreferenced_chunks": release.len(),
        "freed_here_bytes": freed,
        "storage_peers": released,
    }))
}
