//! `meshsync up`: the daemon. It owns the home's state database, runs the transport, answers
//! the CLI on a Unix control socket, and keeps the folders in sync:
//!
//! - **scan**: walk a folder, chunk what changed (size or mtime differ from the last scan),
//!   sign new index records, persist, push the changes to connected members;
//! - **pull/push** (`/meshsync/doc/1`): membership and index changes since the other side's
//!   heads; every change is admitted by `meshsync-crdt` (signatures, authority) first;
//! - **materialise**: for each path whose winning record differs from the local copy, fetch the
//!   chunk list and the missing chunks (from every connected member), open and check each
//!   chunk, write a temp file in the same folder, fsync, rename into place, set mode and mtime.
//!
//! Chunks are served from the synced files themselves (no second copy): the node remembers
//! where each chunk of each current file lies, re-checks its ID when reading, and seals it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::index::{shard_of, FileUpdate, ShardChange};
use meshsync_crdt::{
    ChunkId, ChunkListHash, DeviceKeys, Epoch, FileKind, FileRecord, FolderId, FolderIndex,
    MembershipLog, MeshId, MeshKey, SignedHead,
};
use meshsync_transport::chunks::{self, ChunkSource, Fetched};
use meshsync_transport::{rpc, Config, Multiaddr, PeerId, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::content::{self, ChunkRef};
use crate::home::Home;
use crate::state::{Batch, LocalFile, State};

const MARKER: &str = ".meshsync-folder";
pub(crate) const DEFAULT_PORT: u16 = 22000;

type Heads = Vec<[u8; 32]>;
/// One path to bring in line: (relative path, version to write, is a conflict copy, the
/// (size, mtime) this node last saw there).
type Work = (String, FileRecord, bool, Option<(u64, i64)>);
/// A chunk list on the wire: (chunk ID, offset, length) per chunk.
pub(crate) type WireList = Vec<(ChunkId, u64, u32)>;

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum SyncRequest {
    Pull {
        membership: Heads,
        folders: Vec<(FolderId, BTreeMap<u16, Heads>)>,
    },
    Push(SyncChanges),
    ChunkLists(Vec<ChunkListHash>),
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub(crate) struct SyncChanges {
    pub(crate) membership: Vec<Vec<u8>>,
    pub(crate) folders: Vec<(FolderId, Vec<ShardChange>)>,
    /// The latest signed head of every author the sender knows (see `SignedHead`).
    #[serde(default)]
    pub(crate) heads: Vec<SignedHead>,
    /// The sender's sealed form of the same changes, for the receiver to pass on to storage
    /// peers the sender may never meet.
    #[serde(default)]
    pub(crate) sealed: Vec<serde_bytes::ByteBuf>,
}

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum SyncReply {
    Changes(SyncChanges),
    Ok,
    ChunkLists(Vec<(ChunkListHash, WireList)>),
    Refused(String),
}

/// What the inviter sends a joiner after a successful handshake.
#[derive(Serialize, Deserialize, Debug)]
pub struct JoinPayload {
    pub mesh: MeshId,
    pub membership: Vec<Vec<u8>>,
    pub inviter_addrs: Vec<String>,
}

pub(crate) fn to_heads(hashes: &[automerge::ChangeHash]) -> Heads {
    hashes.iter().map(|h| h.0).collect()
}

pub(crate) fn from_heads(heads: &Heads) -> Vec<automerge::ChangeHash> {
    heads.iter().map(|h| automerge::ChangeHash(*h)).collect()
}

pub(crate) struct Folder {
    pub(crate) path: PathBuf,
    pub(crate) index: FolderIndex,
    pub(crate) local: BTreeMap<String, LocalFile>,
    /// Deletions the mass-delete guard is holding back.
    held_deletes: usize,
    /// Paths the index wants whose content no source could give intact (never written).
    unavailable: BTreeSet<String>,
}

impl Folder {
    /// Records what this device now holds at `path` (`None`: nothing): in memory, in the
    /// chunk map it serves from, and in `batch`.
    fn set_local(
        &mut self,
        id: &FolderId,
        map: &mut ChunkMap,
        batch: &mut Batch,
        path: String,
        file: Option<LocalFile>,
    ) {
        match &file {
            Some(file) => {
                map.remember(self.path.join(&path), file);
                self.local.insert(path.clone(), file.clone());
            }
            None => {
                map.forget(&self.path.join(&path));
                self.local.remove(&path);
            }
        }
        batch.local.push((id.clone(), path, file));
    }
}

/// Where the chunks of current files lie on disk, for serving them.
#[derive(Default)]
struct ChunkMap {
    /// Every current file (and offset, length) holding each chunk.
    locations: HashMap<ChunkId, Vec<(PathBuf, u64, u32)>>,
    /// Size and mtime of each file when its chunks were recorded, and its chunks: a file that
    /// no longer matches is not served from (its chunks may have moved).
    files: HashMap<PathBuf, (u64, i64, Vec<ChunkId>)>,
    /// Symlink targets, served from memory (reading the link's path would follow it).
    links: HashMap<ChunkId, Vec<u8>>,
}

impl ChunkMap {
    /// Records where the chunks of a current local file (or link) can be read from, in place
    /// of what that path held before.
    fn remember(&mut self, path: PathBuf, file: &LocalFile) {
        self.forget(&path);
        if file.kind == FileKind::Symlink {
            use std::os::unix::ffi::OsStrExt;
            let Ok(target) = std::fs::read_link(&path) else {
                return;
            };
            let bytes = target.as_os_str().as_bytes();
            for (id, offset, len) in &file.chunks {
                if let Some(part) =
                    bytes.get(*offset as usize..(*offset + u64::from(*len)) as usize)
                {
                    self.links.insert(*id, part.to_vec());
                }
            }
            return;
        }
        for (id, offset, len) in &file.chunks {
            self.locations
                .entry(*id)
                .or_default()
                .push((path.clone(), *offset, *len));
        }
        let ids = file.chunks.iter().map(|c| c.0).collect();
        self.files.insert(path, (file.size, file.mtime_ns, ids));
    }

    /// Forgets what `path` held (deleted, or about to be re-recorded).
    fn forget(&mut self, path: &Path) {
        let Some((_, _, ids)) = self.files.remove(path) else {
            return;
        };
        for id in ids {
            if let Some(places) = self.locations.get_mut(&id) {
                places.retain(|(p, _, _)| p != path);
                if places.is_empty() {
                    self.locations.remove(&id);
                }
            }
        }
    }
}

/// Where a chunk lies: file, offset, length, and the (size, mtime) recorded for the file.
type Place = (PathBuf, u64, u32, Option<(u64, i64)>);

#[derive(Clone)]
pub(crate) struct Served {
    map: Arc<StdMutex<ChunkMap>>,
    key: Arc<StdMutex<Option<MeshKey>>>,
    /// Old versions' chunks, already sealed.
    store: Arc<StdMutex<crate::store::ChunkStore>>,
}

impl ChunkSource for Served {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        use std::os::unix::fs::FileExt;
        let key = self.key.lock().ok()?.clone()?;
        let places: Vec<Place> = {
            let map = self.map.lock().ok()?;
            if let Some(target) = map.links.get(id) {
                let sealed = content::seal_chunk(&key.chunk_key(), key.epoch(), id, target);
                return Some(sealed.into());
            }
            map.locations
                .get(id)
                .into_iter()
                .flatten()
                .map(|(path, offset, len)| {
                    let recorded = map.files.get(path).map(|(size, mtime, _)| (*size, *mtime));
                    (path.clone(), *offset, *len, recorded)
                })
                .collect()
        };
        for (path, offset, len, recorded) in places {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            // The file may have changed since it was scanned: serve only from one that is
            // still the size and age it was when its chunks were recorded (the receiver checks
            // every chunk's hash anyway; this keeps a stale one off the wire without hashing
            // twice).
            let Ok(meta) = file.metadata() else { continue };
            let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
            if recorded != Some((meta.len(), mtime_ns)) {
                continue;
            }
            let sealed =
                content::seal_chunk_from(&key.chunk_key(), key.epoch(), id, len as usize, |slot| {
                    file.read_exact_at(slot, offset)
                });
            if let Ok(sealed) = sealed {
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

/// The running node.
pub struct Node {
    pub(crate) home: Home,
    pub(crate) keys: Arc<DeviceKeys>,
    pub(crate) state: State,
    pub(crate) log: MembershipLog,
    pub(crate) key: Arc<StdMutex<Option<MeshKey>>>,
    pub(crate) folders: BTreeMap<FolderId, Folder>,
    chunk_map: Arc<StdMutex<ChunkMap>>,
    pub(crate) transport: Transport,
    /// Folder watchers (kept alive) and where they report.
    watchers: Vec<notify::RecommendedWatcher>,
    changes: tokio::sync::mpsc::UnboundedSender<FolderId>,
    materialising: Arc<Mutex<()>>,
    /// The IP the pairing endpoint listens on: the daemon's own (loopback when it is).
    pair_ip: String,
    /// This device's side of storage peers: its sealed changes, what it applied, what it saw.
    pub(crate) sealing: crate::sealing::Sealing,
    /// Sealed chunks of old versions this device keeps (`HOME/chunks`).
    pub(crate) store: Arc<StdMutex<crate::store::ChunkStore>>,
}

pub type Shared = Arc<Mutex<Node>>;

fn unix_nanos(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Opens the home's state, creating a new mesh (this device its first admin) if it has none.
pub fn open_state(home: &Home, keys: &DeviceKeys) -> anyhow::Result<(State, MembershipLog)> {
    let state = State::open(home.path())?;
    let loaded = state.load()?;
    let log = match (loaded.mesh, loaded.membership) {
        (Some(mesh), Some(bytes)) => MembershipLog::load(mesh, &bytes)
            .with_context(|| format!("loading the membership log of mesh {mesh}"))?,
        _ => {
            let name = home.config()?.name;
            let (mut log, mesh) = MembershipLog::create(keys, &name, &MeshKey::generate(Epoch(0)));
            state.commit(Batch {
                mesh: Some(mesh),
                membership: Some(log.save()),
                ..Batch::default()
            })?;
            log
        }
    };
    Ok((state, log))
}

/// The peer IDs of every member but `me`: who may connect.
pub(crate) fn other_members(log: &MembershipLog, me: &meshsync_crdt::DeviceId) -> Vec<PeerId> {
    log.view()
        .members
        .keys()
        .filter(|d| *d != me)
        .map(|d| d.to_peer_id())
        .collect()
}

fn current_key(log: &MembershipLog, keys: &DeviceKeys) -> Option<MeshKey> {
    let me = keys.device_id();
    log.view()
        .wraps_for(&me)
        .last()
        .and_then(|w| w.unwrap_with(&log.mesh(), keys).ok())
}

/// Joins the mesh of an invite code, writing the result into the state. Works with the daemon
/// stopped (the CLI calls it) or running (the daemon calls it).
pub async fn join(
    home: &Home,
    state: &State,
    keys: &DeviceKeys,
    code: &str,
) -> anyhow::Result<(MeshId, Vec<String>)> {
    let loaded = state.load()?;
    if !loaded.folders.is_empty() {
        anyhow::bail!("this device already syncs folders in its own mesh; join with a fresh home (--home) instead");
    }
    let name = home.config()?.name;
    let (invite, payload) = meshsync_transport::pair::join(keys, &name, code).await?;
    let payload: JoinPayload =
        postcard::from_bytes(&payload).context("the inviter sent an unreadable reply")?;
    if payload.mesh != invite.mesh {
        anyhow::bail!("the inviter answered for another mesh");
    }
    let mut log = MembershipLog::empty(payload.mesh);
    log.apply(&payload.membership)
        .context("the inviter's membership log does not verify")?;
    if !log.view().is_member(&keys.device_id()) {
        anyhow::bail!("the inviter did not add this device");
    }
    state.commit(Batch {
        mesh: Some(payload.mesh),
        membership: Some(log.save()),
        meta: vec![(
            "peer_addrs".into(),
            postcard::to_stdvec(&payload.inviter_addrs)?,
        )],
        ..Batch::default()
    })?;
    Ok((payload.mesh, payload.inviter_addrs))
}

/// Starts the node: state, transport, protocol handlers. Returns the shared handle.
pub async fn start(home: Home, listen: Vec<Multiaddr>, mdns: bool) -> anyhow::Result<Shared> {
    let keys = Arc::new(home.load_keys()?);
    home.config()?; // a bad config.toml stops the start with its reason
    let (state, log) = open_state(&home, &keys)?;
    let loaded = state.load()?;
    let key = Arc::new(StdMutex::new(current_key(&log, &keys)));
    let chunk_map = Arc::new(StdMutex::new(ChunkMap::default()));
    let mut folders = BTreeMap::new();
    for (id, path) in loaded.folders {
        let shards = loaded.shards.get(&id).cloned().unwrap_or_default();
        let index = FolderIndex::load(log.mesh(), id.clone(), shards)?
            .with_actor(meshsync_crdt::index::actor_for(&keys.device_id(), 0));
        let local = loaded.local.get(&id).cloned().unwrap_or_default();
        {
            let mut map = chunk_map.lock().expect("chunk map lock");
            for (rel, file) in &local {
                map.remember(path.join(rel), file);
            }
        }
        remove_temp_files(&path);
        folders.insert(
            id,
            Folder {
                path,
                index,
                local,
                held_deletes: 0,
                unavailable: BTreeSet::new(),
            },
        );
    }

    let pair_ip = listen
        .iter()
        .flat_map(|a| a.iter())
        .find_map(|p| match p {
            meshsync_transport::Protocol::Ip4(ip) => Some(ip.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "0.0.0.0".to_string());
    let transport = start_transport(&keys, listen, mdns).await?;
    let members = other_members(&log, &keys.device_id());
    transport.set_allowed(members).await;
    dial_all(&transport, static_addrs(&home, &state)).await;

    let sealing = crate::sealing::Sealing::load(&state)?;
    let store = Arc::new(StdMutex::new(crate::store::ChunkStore::open(
        &home.path().join("chunks"),
    )?));
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel::<FolderId>();
    let node = Arc::new(Mutex::new(Node {
        home,
        keys,
        state,
        log,
        key: key.clone(),
        folders,
        chunk_map: chunk_map.clone(),
        transport: transport.clone(),
        watchers: Vec::new(),
        changes,
        materialising: Arc::new(Mutex::new(())),
        pair_ip,
        sealing,
        store: store.clone(),
    }));
    {
        let mut n = node.lock().await;
        let folders: Vec<(FolderId, PathBuf)> = n.folder_list();
        for (id, path) in folders {
            n.watch(&id, &path);
        }
    }
    // Debounce: a folder is rescanned once its changes settle for 50 ms (at most 500 ms late).
    let watched = node.clone();
    tokio::spawn(async move {
        while let Some(first) = changed.recv().await {
            let mut pending: BTreeSet<FolderId> = BTreeSet::from([first]);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            loop {
                let quiet = tokio::time::sleep(Duration::from_millis(50));
                tokio::select! {
                    more = changed.recv() => match more {
                        Some(id) => { pending.insert(id); }
                        None => return,
                    },
                    _ = quiet => break,
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            for id in pending {
                if let Err(error) = scan(&watched, &id).await {
                    tracing::warn!(folder = %id, %error, "scan after change failed");
                }
            }
        }
    });

    chunks::start_serving(
        &transport,
        Arc::new(Served {
            map: chunk_map,
            key,
            store: store.clone(),
        }),
    )?;
    let handler_node = node.clone();
    rpc::serve(&transport, rpc::DOC, move |peer, request| {
        let node = handler_node.clone();
        async move {
            let request: SyncRequest = postcard::from_bytes(&request).ok()?;
            let reply = handle(&node, peer, request).await;
            postcard::to_stdvec(&reply).ok()
        }
    })?;

    // A member that connects is pulled from at once (a NAS or laptop coming back syncs without
    // waiting for the next round).
    let connecting = node.clone();
    let mut events = transport.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(meshsync_transport::Event::Connected { peer, .. }) => {
                    if let Err(error) = pull(&connecting, peer).await {
                        tracing::info!(%peer, %error, "pull on connect failed");
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });

    // Pull from every connected member now and then. Folders are rescanned once at start
    // (changes made while the daemon was stopped) and then every 30 s as a safety net; the
    // watcher triggers everything else.
    let looping = node.clone();
    tokio::spawn(async move {
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tick += 1;
            if tick == 1 || tick.is_multiple_of(60) {
                if let Err(error) = scan_all(&looping).await {
                    tracing::warn!(%error, "scan failed");
                }
            }
            if tick.is_multiple_of(10) {
                redial_static_peers(&looping).await;
            }
            if tick.is_multiple_of(600) {
                if let Err(error) = crate::versions::gc(&looping).await {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "forgetting old versions failed"
                    );
                }
            }
            let peers: Vec<PeerId> = {
                let n = looping.lock().await;
                n.transport.connected_peers().await
            };
            for peer in &peers {
                if let Err(error) = pull(&looping, *peer).await {
                    tracing::info!(%peer, %error, "pull failed");
                }
            }
            // Whatever the index wants that is not on disk yet (after a restart, or chunks
            // that were unavailable before) is retried.
            if let (Some(peer), true) = (peers.first(), tick.is_multiple_of(2)) {
                let needs = looping.lock().await.needs();
                for (folder, paths) in needs {
                    if let Err(error) = materialise(&looping, *peer, &folder, paths).await {
                        tracing::info!(%folder, error = format!("{error:#}"), "catching up failed");
                    }
                }
            }
        }
    });
    Ok(node)
}

/// The addresses to dial besides what mDNS finds: `peers` from config.toml and the
/// addresses of the inviter this home joined through.
pub(crate) fn static_addrs(home: &Home, state: &State) -> Vec<Multiaddr> {
    let mut addrs: Vec<String> = home.config().map(|c| c.peers).unwrap_or_default();
    if let Ok(Some(bytes)) = state.meta("peer_addrs") {
        addrs.extend(postcard::from_bytes::<Vec<String>>(&bytes).unwrap_or_default());
    }
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

/// Dials each of `addrs` (failures are logged: the peer may be off).
pub(crate) async fn dial_all(transport: &Transport, addrs: Vec<Multiaddr>) {
    for addr in addrs {
        if let Err(error) = transport.dial(addr.clone()).await {
            tracing::debug!(%addr, %error, "cannot dial static peer");
        }
    }
}

/// Dials the static addresses again while some member is not connected: a NAS or laptop that
/// restarted comes back without anyone running a command.
async fn redial_static_peers(node: &Shared) {
    let (transport, addrs, members) = {
        let n = node.lock().await;
        let members = other_members(&n.log, &n.keys.device_id()).len();
        (
            n.transport.clone(),
            static_addrs(&n.home, &n.state),
            members,
        )
    };
    if transport.connected_peers().await.len() < members {
        dial_all(&transport, addrs).await;
    }
}

pub(crate) async fn start_transport(
    keys: &DeviceKeys,
    listen: Vec<Multiaddr>,
    mdns: bool,
) -> anyhow::Result<Transport> {
    let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), "0.0.0.0");
    config.mdns = mdns;
    if !listen.is_empty() {
        config.listen = listen;
        return Ok(Transport::start(config)?);
    }
    config.listen = vec![
        format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}").parse()?,
        format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1").parse()?,
    ];
    match Transport::start(config) {
        Ok(t) => Ok(t),
        Err(error) => {
            tracing::warn!(%error, "default port {DEFAULT_PORT} taken; using any free port");
            let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), "0.0.0.0");
            config.mdns = mdns;
            Ok(Transport::start(config)?)
        }
    }
}

async fn handle(node: &Shared, peer: PeerId, request: SyncRequest) -> SyncReply {
    match request {
        SyncRequest::Pull {
            membership,
            folders,
        } => {
            let mut n = node.lock().await;
            let mut changes = SyncChanges {
                membership: n.log.changes_since(&from_heads(&membership)),
                heads: n.sealing.heads(),
                ..SyncChanges::default()
            };
            if n.is_storage(&peer) {
                // A storage peer gets membership only: never a path, a size or a chunk list.
                changes.heads.clear();
                return SyncReply::Changes(changes);
            }
            for (id, heads) in folders {
                if let Some(folder) = n.folders.get_mut(&id) {
                    let heads = heads.iter().map(|(s, h)| (*s, from_heads(h))).collect();
                    changes
                        .folders
                        .push((id, folder.index.changes_since(&heads)));
                }
            }
            SyncReply::Changes(changes)
        }
        SyncRequest::Push(changes) => match apply_changes(node, peer, changes).await {
            Ok(()) => SyncReply::Ok,
            Err(error) => {
                tracing::warn!(%peer, error = format!("{error:#}"), "refused pushed changes");
                SyncReply::Refused(error.to_string())
            }
        },
        SyncRequest::ChunkLists(hashes) => {
            let n = node.lock().await;
            if n.is_storage(&peer) {
                return SyncReply::Refused("chunk lists are not for storage peers".into());
            }
            let mut out = Vec::new();
            for hash in hashes.into_iter().take(10_000) {
                if let Ok(Some(list)) = n.state.chunk_list(&hash) {
                    out.push((hash, list.iter().map(|c| (c.id, c.offset, c.len)).collect()));
                }
            }
            SyncReply::ChunkLists(out)
        }
    }
}

pub(crate) async fn request(
    transport: &Transport,
    peer: PeerId,
    request: &SyncRequest,
) -> anyhow::Result<SyncReply> {
    let bytes = rpc::request(transport, peer, rpc::DOC, &postcard::to_stdvec(request)?).await?;
    Ok(postcard::from_bytes(&bytes)?)
}

async fn pull(node: &Shared, peer: PeerId) -> anyhow::Result<()> {
    let (transport, req) = {
        let mut n = node.lock().await;
        let membership = to_heads(&n.log.heads());
        if n.is_storage(&peer) {
            // Membership only, then the sealed exchange.
            let req = SyncRequest::Pull {
                membership,
                folders: vec![],
            };
            let transport = n.transport.clone();
            drop(n);
            if let SyncReply::Changes(changes) = request(&transport, peer, &req).await? {
                apply_changes(node, peer, changes).await?;
            }
            // In its own task (one at a time): a long push must not hold up the pulls from
            // the other devices.
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(error) = crate::sealing::sync_with_storage(&node, peer).await {
                    tracing::info!(%peer, error = format!("{error:#}"), "exchange with storage peer failed");
                }
            });
            return Ok(());
        }
        let folders = n
            .folders
            .iter_mut()
            .map(|(id, f)| {
                let heads = f
                    .index
                    .heads()
                    .into_iter()
                    .map(|(s, h)| (s, to_heads(&h)))
                    .collect();
                (id.clone(), heads)
            })
            .collect();
        (
            n.transport.clone(),
            SyncRequest::Pull {
                membership,
                folders,
            },
        )
    };
    match request(&transport, peer, &req).await? {
        SyncReply::Changes(changes) => apply_changes(node, peer, changes).await,
        SyncReply::Refused(reason) => anyhow::bail!("peer refused: {reason}"),
        _ => anyhow::bail!("unexpected reply"),
    }
}

/// Admits changes from `peer`, persists them, and materialises what changed.
async fn apply_changes(node: &Shared, peer: PeerId, changes: SyncChanges) -> anyhow::Result<()> {
    let mut changed: Vec<(FolderId, BTreeSet<String>)> = Vec::new();
    {
        let mut n = node.lock().await;
        let n = &mut *n;
        let mut batch = Batch::default();
        if !changes.membership.is_empty() && n.log.apply(&changes.membership)? > 0 {
            batch.membership = Some(n.log.save());
            let me = n.keys.device_id();
            let members = other_members(&n.log, &me);
            n.transport.set_allowed(members).await;
            *n.key.lock().expect("key lock") = current_key(&n.log, &n.keys);
        }
        n.sealing
            .saw_heads(&n.log.mesh(), changes.heads, &mut batch);
        let view = n.log.view().clone();
        crate::sealing::keep_forwarded(
            &mut n.sealing,
            &n.log.mesh(),
            &view,
            &n.state,
            changes.sealed,
            &mut batch,
        );
        // Storage peers have no folder state to give.
        let folders = if n.is_storage(&peer) {
            Vec::new()
        } else {
            changes.folders
        };
        for (id, folder_changes) in folders {
            let Some(folder) = n.folders.get_mut(&id) else {
                continue;
            };
            if folder_changes.is_empty() {
                continue;
            }
            let report = folder.index.apply(&view, folder_changes)?;
            let shards: BTreeSet<u16> = report.paths.iter().map(|p| shard_of(&id, p)).collect();
            for shard in shards {
                if let Some(bytes) = folder.index.save_shard(shard) {
                    batch.shards.push((id.clone(), shard, bytes));
                }
            }
            changed.push((id, report.paths));
        }
        n.state.commit(batch)?;
    }
    for (folder, paths) in changed {
        materialise(node, peer, &folder, paths).await?;
    }
    Ok(())
}

/// Removes temp files left by a daemon that was killed while writing (they never carry a
/// final name, so nothing is lost).
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".meshsync-tmp-") {
            let _ = std::fs::remove_file(&path);
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_temp_files(&path);
        }
    }
}

/// Files at least this big get their own fsync; smaller ones share one `syncfs` per batch.
const OWN_FSYNC: u64 = 4 << 20;

/// A file being assembled: its temp file, final size, and how many chunks it still lacks.
struct Pending {
    tmp: PathBuf,
    size: u64,
    left: usize,
    /// For a symlink: its target, assembled in memory (it is never a file on disk).
    link: Option<Vec<u8>>,
}

/// Brings the files at `paths` in line with the index; one at a time per node, so a catch-up
/// never fetches what a pull is already fetching.
pub(crate) async fn materialise(
    node: &Shared,
    from: PeerId,
    folder: &FolderId,
    paths: BTreeSet<String>,
) -> anyhow::Result<()> {
    let gate = node.lock().await.materialising.clone();
    let _one_at_a_time = gate.lock().await;
    materialise_now(node, from, folder, paths).await
}

async fn materialise_now(
    node: &Shared,
    from: PeerId,
    folder: &FolderId,
    paths: BTreeSet<String>,
) -> anyhow::Result<()> {
    // What to do, decided under the lock.
    let (root, transport, work, olds, store) = {
        let n = node.lock().await;
        let Some(f) = n.folders.get(folder) else {
            return Ok(());
        };
        // Conflict copies first (a loser may be the file about to be overwritten), then
        // writes in path order (folders before their files), then deletes deepest first, so a
        // rename's new file is written from the old one's chunks before the old one goes.
        let mut copies = Vec::new();
        let mut writes = Vec::new();
        let mut deletes = Vec::new();
        let rules = ignore_rules(&f.path);
        for path in paths {
            let is_dir = f
                .index
                .get(&path)
                .is_some_and(|s| s.winner.kind == FileKind::Directory);
            if path != IGNORE_FILE && rules.matched_path_or_any_parents(&path, is_dir).is_ignore() {
                continue;
            }
            let Some(state) = f.index.get(&path) else {
                continue;
            };
            for loser in &state.losers {
                if loser.deleted || loser.kind != FileKind::File {
                    continue;
                }
                let name = conflict_name(&path, loser);
                if !f.local.contains_key(&name) && !f.path.join(&name).exists() {
                    copies.push((name, loser.clone()));
                }
            }
            let w = state.winner;
            let local = f.local.get(&path);
            if local.is_some_and(|l| l.version == w.version && l.list_hash == w.chunks) {
                continue;
            }
            if w.deleted {
                if local.is_some() {
                    deletes.push((path, w));
                }
            } else {
                writes.push((path, w));
            }
        }
        deletes.reverse();
        let local_of = |p: &str| f.local.get(p).map(|l| (l.size, l.mtime_ns));
        let work: Vec<Work> = copies
            .into_iter()
            .map(|(p, r)| (p, r, true, None))
            .chain(writes.into_iter().chain(deletes).map(|(p, r)| {
                let before = local_of(&p);
                (p, r, false, before)
            }))
            .collect();
        let olds: HashMap<String, LocalFile> = work
            .iter()
            .filter(|(_, _, copy, _)| !copy)
            .filter_map(|(p, _, _, _)| Some((p.clone(), f.local.get(p)?.clone())))
            .filter(|(_, old)| old.kind == FileKind::File)
            .collect();
        (
            f.path.clone(),
            n.transport.clone(),
            work,
            olds,
            n.store.clone(),
        )
    };
    if work.is_empty() {
        return Ok(());
    }
    // Chunk lists of the files to write.
    let wanted: Vec<ChunkListHash> = work
        .iter()
        .filter(|(_, w, _, _)| !w.deleted && w.kind != FileKind::Directory)
        .map(|(_, w, _, _)| w.chunks)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut lists: HashMap<ChunkListHash, Vec<ChunkRef>> = HashMap::new();
    {
        let n = node.lock().await;
        for hash in &wanted {
            if let Ok(Some(list)) = n.state.chunk_list(hash) {
                lists.insert(*hash, list);
            }
        }
    }
    let wanted: Vec<ChunkListHash> = wanted
        .into_iter()
        .filter(|h| !lists.contains_key(h))
        .collect();
    if !wanted.is_empty() {
        if let SyncReply::ChunkLists(got) =
            request(&transport, from, &SyncRequest::ChunkLists(wanted)).await?
        {
            for (hash, list) in got {
                let refs: Vec<ChunkRef> = list
                    .into_iter()
                    .map(|(id, offset, len)| ChunkRef { id, offset, len })
                    .collect();
                if content::chunk_list_hash(&refs) == hash {
                    lists.insert(hash, refs);
                } else {
                    tracing::warn!(peer = %from, "chunk list does not match its hash; ignored");
                }
            }
        }
    }
    // Chunks we do not hold in any current local file.
    let (key, have) = {
        let n = node.lock().await;
        let key = n.mesh_key()?;
        let map = n.chunk_map.lock().expect("chunk map lock");
        let have: HashMap<ChunkId, Vec<(PathBuf, u64, u32)>> = lists
            .values()
            .flatten()
            .filter_map(|c| map.locations.get(&c.id).map(|l| (c.id, l.clone())))
            .collect();
        let have_links: HashMap<ChunkId, Vec<u8>> = lists
            .values()
            .flatten()
            .filter_map(|c| map.links.get(&c.id).map(|l| (c.id, l.clone())))
            .collect();
        (key, (have, have_links))
    };
    let (have, have_links) = have;
    // Every file to write gets a temp file now, filled with the chunks this node already has
    // (read from current local files before anything is renamed or deleted, and re-checked);
    // fetched chunks are written into place as they arrive, so memory holds only what is in
    // flight, never whole files.
    let mut pending: HashMap<usize, Pending> = HashMap::new();
    let mut wanted_at: HashMap<ChunkId, Vec<(usize, u64)>> = HashMap::new();
    let id_key = key.chunk_id_key();
    for (i, (rel, w, _, _)) in work.iter().enumerate() {
        if w.deleted || w.kind == FileKind::Directory {
            continue;
        }
        let Some(list) = lists.get(&w.chunks) else {
            continue;
        };
        let target = root.join(rel);
        if w.kind == FileKind::Symlink {
            let size: u64 = list.iter().map(|c| u64::from(c.len)).sum();
            let mut link = vec![0u8; size as usize];
            let mut left = 0;
            for c in list {
                let at = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
                match (have_links.get(&c.id), link.get_mut(at)) {
                    (Some(data), Some(slot)) if data.len() == slot.len() => {
                        slot.copy_from_slice(data)
                    }
                    _ => {
                        wanted_at.entry(c.id).or_default().push((i, c.offset));
                        left += 1;
                    }
                }
            }
            let name = target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("link");
            let tmp = target
                .parent()
                .context("link has no parent folder")?
                .join(format!(".meshsync-tmp-{}-{i}-{name}", std::process::id()));
            pending.insert(
                i,
                Pending {
                    tmp,
                    size,
                    left,
                    link: Some(link),
                },
            );
            continue;
        }
        let dir = target.parent().context("file has no parent folder")?;
        std::fs::create_dir_all(dir)?;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file");
        let tmp = dir.join(format!(".meshsync-tmp-{}-{i}-{name}", std::process::id()));
        let size: u64 = list.iter().map(|c| u64::from(c.len)).sum();
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.set_len(size)?;
        let mut left = 0usize;
        for c in list {
            let local = have
                .get(&c.id)
                .into_iter()
                .flatten()
                .find_map(|(src, offset, len)| {
                    use std::os::unix::fs::FileExt;
                    let mut data = vec![0u8; *len as usize];
                    std::fs::File::open(src)
                        .ok()?
                        .read_exact_at(&mut data, *offset)
                        .ok()?;
                    (content::chunk_id(&id_key, &data) == c.id).then_some(data)
                });
            match local {
                Some(data) => {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&data, c.offset)?;
                }
                None => {
                    wanted_at.entry(c.id).or_default().push((i, c.offset));
                    left += 1;
                }
            }
        }
        pending.insert(
            i,
            Pending {
                tmp,
                size,
                left,
                link: None,
            },
        );
    }
    let mut flushes = Vec::new();
    // Fetch rounds: a chunk that fails its check (altered on a storage peer's disk, or a bad
    // peer) is refused, logged, and asked again from the other sources.
    let mut bad_sources: BTreeSet<PeerId> = BTreeSet::new();
    for _round in 0..3 {
        let missing: Vec<ChunkId> = wanted_at.keys().copied().collect();
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
        let (sink, mut rx) = tokio::sync::mpsc::channel::<Fetched>(64);
        let fetcher = transport.clone();
        let task = tokio::spawn(async move { chunks::fetch(&fetcher, peers, missing, sink).await });
        let mut last_open: Option<(usize, std::fs::File)> = None;
        while let Some(chunk) = rx.recv().await {
            let plain = match content::open_chunk(
                &key.chunk_key(),
                &id_key,
                key.epoch(),
                &chunk.id,
                chunk.data,
            ) {
                Ok(plain) => plain,
                Err(error) => {
                    tracing::warn!(peer = %chunk.peer, %error, "bad chunk refused; asking other sources");
                    bad_sources.insert(chunk.peer);
                    continue;
                }
            };
            for (i, offset) in wanted_at.remove(&chunk.id).unwrap_or_default() {
                use std::os::unix::fs::FileExt;
                if let Some(p) = pending.get_mut(&i) {
                    match &mut p.link {
                        Some(link) => {
                            let at = offset as usize..offset as usize + plain.len();
                            if let Some(slot) = link.get_mut(at) {
                                slot.copy_from_slice(&plain);
                            }
                        }
                        None => {
                            // Chunks of one file mostly arrive together: keep its handle.
                            if last_open.as_ref().is_none_or(|(at, _)| *at != i) {
                                let file = std::fs::OpenOptions::new()
                                    .write(true)
                                    .open(&p.tmp)
                                    .with_context(|| format!("opening {}", p.tmp.display()))?;
                                last_open = Some((i, file));
                            }
                            if let Some((_, file)) = &last_open {
                                file.write_all_at(&plain, offset)
                                    .with_context(|| format!("writing into {}", p.tmp.display()))?;
                            }
                        }
                    }
                    p.left -= 1;
                    if p.left == 0 && p.link.is_none() && p.size >= OWN_FSYNC {
                        // A big file is flushed on its own as soon as it is complete, while
                        // the rest of the batch is still arriving.
                        let file = std::fs::File::open(&p.tmp)
                            .with_context(|| format!("opening {}", p.tmp.display()))?;
                        flushes.push((i, tokio::task::spawn_blocking(move || file.sync_data())));
                    }
                }
            }
        }
        drop(last_open);
        let report = task.await?;
        if !report.missing.is_empty() {
            tracing::warn!(
                missing = report.missing.len(),
                "some chunks are not available yet"
            );
        }
        if bad_sources.len() == bad_before {
            break; // nothing was refused: what is missing has no source now
        }
    }
    // Before anything is renamed into place, its data must be on disk: big files are flushed
    // one by one (most already while the batch was arriving), and the many small ones with one
    // flush of the file system, instead of one fsync each.
    let mut flushed = BTreeSet::new();
    for (i, flush) in flushes {
        flush.await?.context("flushing a written file")?;
        flushed.insert(i);
    }
    let mut flush_all = false;
    for (i, p) in &pending {
        if p.left > 0 || p.link.is_some() || flushed.contains(i) {
            continue;
        }
        if p.size >= OWN_FSYNC {
            let file = std::fs::File::open(&p.tmp)?;
            tokio::task::spawn_blocking(move || file.sync_data())
                .await?
                .context("flushing a written file")?;
        } else {
            flush_all = true;
        }
    }
    if flush_all {
        let dir = std::fs::File::open(&root)?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(std::io::Error::last_os_error()).context("flushing written files");
        }
    }
    // Files about to be replaced or deleted by another device's version stay restorable: the
    // chunks the new version does not reuse go into this device's store first.
    let replaced: Vec<(String, LocalFile, std::collections::HashSet<ChunkId>)> = work
        .iter()
        .filter_map(|(rel, w, _, _)| {
            let old = olds.get(rel)?;
            if !w.deleted && old.list_hash == w.chunks {
                return None;
            }
            let keep = lists
                .get(&w.chunks)
                .filter(|_| !w.deleted)
                .map(|l| l.iter().map(|c| c.id).collect())
                .unwrap_or_default();
            Some((rel.clone(), old.clone(), keep))
        })
        .collect();
    if !replaced.is_empty() {
        let stored = crate::versions::preserve(&store, &key, &root, &replaced)?;
        tracing::debug!(stored, "chunks of replaced versions kept");
    }
    let mut batch = Batch::default();
    for (rel, old, _) in &replaced {
        crate::versions::record(&mut batch, folder, rel, old);
    }
    let mut updates: Vec<(String, Option<LocalFile>)> = Vec::new();
    let mut touched_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut unavailable: Vec<String> = Vec::new();
    let me = node.lock().await.keys.device_id();
    for (i, (rel, w, conflict_copy, before)) in work.into_iter().enumerate() {
        let target = root.join(&rel);
        let prepared = pending.remove(&i);
        if !conflict_copy && !keep_local_edit(&root, &rel, before, &w, &key, &me)? {
            if let Some(p) = prepared {
                let _ = std::fs::remove_file(&p.tmp);
            }
            continue;
        }
        if w.deleted {
            if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir(&target);
            } else {
                let _ = std::fs::remove_file(&target);
            }
            updates.push((rel.clone(), None));
            continue;
        }
        if w.kind == FileKind::Directory {
            std::fs::create_dir_all(&target)?;
            updates.push((
                rel.clone(),
                Some(LocalFile {
                    kind: FileKind::Directory,
                    size: 0,
                    mtime_ns: 0,
                    mode: w.mode,
                    chunks: vec![],
                    version: w.version,
                    list_hash: w.chunks,
                }),
            ));
            continue;
        }
        let (Some(p), Some(list)) = (prepared, lists.get(&w.chunks)) else {
            continue;
        };
        if p.left > 0 {
            // Never written wrong: reported, and retried on a later pull.
            let _ = std::fs::remove_file(&p.tmp);
            unavailable.push(rel.clone());
            continue;
        }
        if let Some(link) = &p.link {
            use std::os::unix::ffi::OsStrExt;
            let _ = std::fs::remove_file(&p.tmp);
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(link), &p.tmp)
                .with_context(|| format!("creating link {}", p.tmp.display()))?;
            std::fs::rename(&p.tmp, &target)
                .with_context(|| format!("renaming {}", p.tmp.display()))?;
            batch.lists.push((w.chunks, list.clone()));
            if !conflict_copy {
                let mtime_ns = std::fs::symlink_metadata(&target)?
                    .modified()
                    .map(unix_nanos)
                    .unwrap_or(0);
                updates.push((
                    rel.clone(),
                    Some(LocalFile {
                        kind: FileKind::Symlink,
                        size: p.size,
                        mtime_ns,
                        mode: 0o777,
                        chunks: list.iter().map(|c| (c.id, c.offset, c.len)).collect(),
                        version: w.version,
                        list_hash: w.chunks,
                    }),
                ));
            }
            continue;
        }
        std::fs::set_permissions(&p.tmp, std::fs::Permissions::from_mode(w.mode & 0o7777))?;
        let mtime = std::time::UNIX_EPOCH + Duration::from_nanos(w.mtime_ns.max(0) as u64);
        std::fs::File::options()
            .write(true)
            .open(&p.tmp)?
            .set_modified(mtime)?;
        std::fs::rename(&p.tmp, &target)?;
        if let Some(dir) = target.parent() {
            touched_dirs.insert(dir.to_path_buf());
        }
        batch.lists.push((w.chunks, list.clone()));
        if conflict_copy {
            // A plain new file from here on: the next scan records and syncs it.
            tracing::warn!(path = %rel, "concurrent edit kept as a conflict copy");
            continue;
        }
        let mtime_ns = std::fs::metadata(&target)?
            .modified()
            .map(unix_nanos)
            .unwrap_or(w.mtime_ns);
        updates.push((
            rel.clone(),
            Some(LocalFile {
                kind: FileKind::File,
                size: p.size,
                mtime_ns,
                mode: w.mode,
                chunks: list.iter().map(|c| (c.id, c.offset, c.len)).collect(),
                version: w.version,
                list_hash: w.chunks,
            }),
        ));
    }
    for p in pending.values() {
        let _ = std::fs::remove_file(&p.tmp);
    }
    for dir in touched_dirs {
        std::fs::File::open(&dir)?.sync_all()?;
    }
    let mut n = node.lock().await;
    let n = &mut *n;
    let Some(f) = n.folders.get_mut(folder) else {
        return Ok(());
    };
    for path in unavailable {
        if f.unavailable.insert(path.clone()) {
            tracing::warn!(folder = %folder, %path, "file unavailable: no source has intact chunks for it; not written");
        }
    }
    let mut map = n.chunk_map.lock().expect("chunk map lock");
    for (path, file) in updates {
        f.unavailable.remove(&path);
        f.set_local(folder, &mut map, &mut batch, path, file);
    }
    drop(map);
    n.state.commit(batch)?;
    Ok(())
}

/// Before the index's version replaces or deletes `rel`, checks that the file on disk is still
/// what this node last scanned or wrote. If it was edited since (and not yet scanned), the edit
/// is concurrent with the incoming version: it is moved aside as a conflict copy, so nothing is
/// lost, or — for a delete — the file is kept. Returns whether to go ahead.
fn keep_local_edit(
    root: &Path,
    rel: &str,
    before: Option<(u64, i64)>,
    incoming: &FileRecord,
    key: &MeshKey,
    me: &meshsync_crdt::DeviceId,
) -> anyhow::Result<bool> {
    let target = root.join(rel);
    let Ok(meta) = std::fs::symlink_metadata(&target) else {
        return Ok(true);
    };
    if !meta.is_file() {
        return Ok(true);
    }
    let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
    if before == Some((meta.len(), mtime_ns)) {
        return Ok(true);
    }
    let file = std::fs::File::open(&target)?;
    let refs = content::chunk_stream(
        std::io::BufReader::new(file),
        &key.chunk_id_key(),
        |_, _| {},
    )?;
    if !incoming.deleted && content::chunk_list_hash(&refs) == incoming.chunks {
        return Ok(true); // the same edit made here: no conflict
    }
    if incoming.deleted {
        tracing::warn!(path = rel, "deleted elsewhere but edited here: keeping it");
        return Ok(false);
    }
    let copy = conflict_name_for(rel, mtime_ns, me);
    std::fs::rename(&target, root.join(&copy))?;
    tracing::warn!(path = rel, copy = %copy, "edited here and elsewhere at once: local version kept as a conflict copy");
    Ok(true)
}

/// `name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` for a losing version of `path`.
pub fn conflict_name(path: &str, loser: &FileRecord) -> String {
    conflict_name_for(path, loser.mtime_ns, &loser.author)
}

/// The conflict-copy name of a version of `path` modified at `mtime_ns` by `device`.
pub fn conflict_name_for(path: &str, mtime_ns: i64, device: &meshsync_crdt::DeviceId) -> String {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let stamp = format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    let device = device.short();
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    match file.rfind('.') {
        Some(i) if i > 0 => format!(
            "{dir}{}.sync-conflict-{stamp}-{device}{}",
            &file[..i],
            &file[i..]
        ),
        _ => format!("{dir}{file}.sync-conflict-{stamp}-{device}"),
    }
}

/// The path a conflict copy was made from (`a/b.sync-conflict-…-DEV.txt` → `a/b.txt`).
fn original_of_conflict(copy: &str) -> String {
    let Some(start) = copy.find(".sync-conflict-") else {
        return copy.to_string();
    };
    let rest = &copy[start + ".sync-conflict-".len()..];
    // YYYYMMDD-HHMMSS-DEVICE (7 characters), then the extension if any.
    let ext = rest.get(23..).unwrap_or("");
    format!("{}{ext}", &copy[..start])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Rescans every folder.
pub async fn scan_all(node: &Shared) -> anyhow::Result<()> {
    let ids: Vec<FolderId> = node.lock().await.folders.keys().cloned().collect();
    for id in ids {
        scan(node, &id).await?;
    }
    Ok(())
}

/// `meshsync scan`: rescans every folder now, taking files written a moment ago too (a
/// file that changes while it is read is still left for the next scan).
pub async fn scan_all_requested(node: &Shared) -> anyhow::Result<()> {
    let ids: Vec<FolderId> = node.lock().await.folders.keys().cloned().collect();
    for id in ids {
        scan_with(node, &id, false, true).await?;
    }
    Ok(())
}

/// One scanned path's new state.
struct Scanned {
    path: String,
    file: Option<LocalFile>,
    refs: Vec<ChunkRef>,
}

/// Rescans one folder, records what changed, and pushes it to connected members.
pub async fn scan(node: &Shared, id: &FolderId) -> anyhow::Result<usize> {
    scan_with(node, id, false, false).await
}

/// A scan that would delete at least this many files, and more than half of the folder, is
/// held back until the user confirms (`meshsync scan --allow-deletes`): an emptied or
/// half-unmounted folder must not wipe every other device.
const MASS_DELETE_MIN: usize = 10;

/// [`scan`], optionally confirming a mass delete the guard held back; `requested` (by the
/// user) also takes files modified in the last moments, which the watcher leaves to settle.
pub async fn scan_with(
    node: &Shared,
    id: &FolderId,
    allow_mass_delete: bool,
    requested: bool,
) -> anyhow::Result<usize> {
    let (root, local, key) = {
        let n = node.lock().await;
        let f = n
            .folders
            .get(id)
            .with_context(|| format!("no folder {id}"))?;
        (f.path.clone(), f.local.clone(), n.mesh_key()?)
    };
    if !root.join(MARKER).exists() {
        anyhow::bail!(
            "{} has no {MARKER} marker: is the disk mounted? Not scanning, so nothing is deleted",
            root.display()
        );
    }
    let id_key = key.chunk_id_key();
    let (scanned, unsettled) =
        tokio::task::spawn_blocking(move || scan_tree(&root, &local, &id_key, !requested))
            .await??;
    if unsettled {
        let n = node.lock().await;
        let (changes, id) = (n.changes.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            let _ = changes.send(id);
        });
    }
    let files_here = {
        let n = node.lock().await;
        n.folders
            .get(id)
            .map(|f| {
                f.local
                    .values()
                    .filter(|l| l.kind == FileKind::File)
                    .count()
            })
            .unwrap_or(0)
    };
    let deletes = scanned.iter().filter(|s| s.file.is_none()).count();
    let held = deletes >= MASS_DELETE_MIN && deletes * 2 > files_here && !allow_mass_delete;
    let scanned: Vec<Scanned> = if held {
        tracing::warn!(folder = %id, deletes, files_here, "mass delete held back; run `meshsync scan --allow-deletes {id}` if it is intended");
        scanned.into_iter().filter(|s| s.file.is_some()).collect()
    } else {
        scanned
    };
    {
        let mut n = node.lock().await;
        if let Some(f) = n.folders.get_mut(id) {
            f.held_deletes = if held { deletes } else { 0 };
        }
    }
    if scanned.is_empty() {
        return Ok(0);
    }
    let count = scanned.len();
    let mut n = node.lock().await;
    let n = &mut *n;
    let epoch = n.log.view().epoch;
    let keys = n.keys.clone();
    let f = n
        .folders
        .get_mut(id)
        .context("folder removed while scanning")?;
    let updates: Vec<FileUpdate> = scanned
        .iter()
        .map(|s| match &s.file {
            Some(file) => FileUpdate {
                path: s.path.clone(),
                kind: file.kind,
                size: file.size,
                mode: file.mode,
                mtime_ns: file.mtime_ns,
                deleted: false,
                chunks: file.list_hash,
            },
            None => FileUpdate {
                path: s.path.clone(),
                kind: f
                    .local
                    .get(&s.path)
                    .map(|l| l.kind)
                    .unwrap_or(FileKind::File),
                size: 0,
                mode: 0,
                mtime_ns: unix_nanos(std::time::SystemTime::now()),
                deleted: true,
                chunks: ChunkListHash::default(),
            },
        })
        .collect();
    // A file whose content already is the index's winner (we just wrote it, or a peer made
    // the same edit) needs no new record: only the local state is updated.
    let mut same = Vec::new();
    let mut kept_updates = Vec::new();
    let mut kept_scanned = Vec::new();
    for (update, scan) in updates.into_iter().zip(scanned) {
        let current = f.index.get(&update.path).map(|s| s.winner);
        let base = f.local.get(&update.path).map(|l| l.version).unwrap_or(0);
        if current
            .as_ref()
            .is_some_and(|w| w.version > base && scan.file.is_some() && base > 0)
        {
            // A newer version waits to be written here; writing it will keep this edit as a
            // conflict copy. Recording the edit now would silently supersede that version.
            continue;
        }
        match (&current, &scan.file) {
            (Some(w), Some(file))
                if !w.deleted
                    && w.chunks == file.list_hash
                    && w.mode == file.mode
                    && w.kind == file.kind =>
            {
                same.push((scan, w.version));
            }
            (Some(w), None) if w.deleted => same.push((scan, w.version)),
            _ => {
                kept_updates.push(update);
                kept_scanned.push(scan);
            }
        }
    }
    let (updates, scanned) = (kept_updates, kept_scanned);
    let records = f.index.write(&keys, epoch, updates)?;
    let mut batch = Batch::default();
    let mut map = n.chunk_map.lock().expect("chunk map lock");
    for (scan, record) in scanned.into_iter().zip(&records) {
        // What this device held before the edit stays restorable (its bytes come back from
        // a storage peer or another device: the edit already overwrote them here).
        if let Some(old) = f.local.get(&scan.path) {
            if scan
                .file
                .as_ref()
                .is_none_or(|new| new.list_hash != old.list_hash)
            {
                crate::versions::record(&mut batch, id, &scan.path, old);
            }
        }
        let file = scan.file.map(|file| LocalFile {
            version: record.version,
            ..file
        });
        if let Some(file) = &file {
            batch.lists.push((file.list_hash, scan.refs));
        }
        f.set_local(id, &mut map, &mut batch, scan.path, file);
    }
    for (scan, version) in same {
        let file = scan.file.map(|file| LocalFile { version, ..file });
        f.set_local(id, &mut map, &mut batch, scan.path, file);
    }
    drop(map);
    let shards: BTreeSet<u16> = records.iter().map(|r| shard_of(id, &r.path)).collect();
    for shard in shards {
        if let Some(bytes) = f.index.save_shard(shard) {
            batch.shards.push((id.clone(), shard, bytes));
        }
    }
    let changes = f.index.take_local_changes();
    if !changes.is_empty() {
        // The same changes, sealed for storage peers, with the chunk lists they name.
        let lists: Vec<(ChunkListHash, WireList)> = batch
            .lists
            .iter()
            .map(|(hash, refs)| {
                (
                    *hash,
                    refs.iter().map(|c| (c.id, c.offset, c.len)).collect(),
                )
            })
            .collect();
        n.sealing
            .seal(&n.keys, &key, n.log.mesh(), id, &changes, lists, &mut batch)?;
    }
    // Sent along with the push for the other devices to forward, unless that makes it big
    // (they would get it from a storage peer, or never need it).
    let sealed_blobs: Vec<Vec<u8>> = if batch.sealed.iter().map(|(_, _, b)| b.len()).sum::<usize>()
        <= crate::sealing::SEAL_BUDGET
    {
        batch.sealed.iter().map(|(_, _, b)| b.clone()).collect()
    } else {
        Vec::new()
    };
    n.state.commit(batch)?;
    if changes.is_empty() {
        return Ok(count);
    }
    let transport = n.transport.clone();
    let push = SyncRequest::Push(SyncChanges {
        membership: vec![],
        folders: vec![(id.clone(), changes)],
        heads: n.sealing.heads(),
        sealed: sealed_blobs
            .into_iter()
            .map(serde_bytes::ByteBuf::from)
            .collect(),
    });
    let storage: BTreeSet<PeerId> = n.storage_peers().into_iter().collect();
    tokio::spawn(async move {
        for peer in transport.connected_peers().await {
            if storage.contains(&peer) {
                continue; // storage peers get the sealed form, in their own exchange
            }
            if let Err(error) = request(&transport, peer, &push).await {
                tracing::info!(%peer, %error, "push failed; the peer will pull");
            }
        }
    });
    Ok(count)
}

/// The folder's ignore rules, shared with every device (synced like a file).
pub const IGNORE_FILE: &str = ".meshsync/ignore";
/// Rules for this device only (never synced).
pub const LOCAL_IGNORE_FILE: &str = ".meshsync/ignore.local";

/// The gitignore-syntax rules of a folder: the shared file, then this device's overrides
/// (which may re-include with `!pattern`). Bad lines are logged and skipped.
pub fn ignore_rules(root: &Path) -> ignore::gitignore::Gitignore {
    let mut builder = ignore::gitignore::GitignoreBuilder::new(root);
    for file in [IGNORE_FILE, LOCAL_IGNORE_FILE] {
        let path = root.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            if let Err(error) = builder.add_line(Some(path.clone()), line) {
                tracing::warn!(file = %path.display(), %error, "ignore rule skipped");
            }
        }
    }
    builder.build().unwrap_or_else(|error| {
        tracing::warn!(%error, "ignore rules unusable; ignoring nothing");
        ignore::gitignore::Gitignore::empty()
    })
}

/// Files modified more recently than this are still being written: they wait for a rescan.
const SETTLE: Duration = Duration::from_millis(40);

/// Walks `root`; returns what changed since `local`, and whether some file was left for later
/// because it is still being written.
fn scan_tree(
    root: &Path,
    local: &BTreeMap<String, LocalFile>,
    id_key: &meshsync_crdt::keys::ChunkIdKey,
    wait_settle: bool,
) -> anyhow::Result<(Vec<Scanned>, bool)> {
    use std::os::unix::fs::MetadataExt;
    let rules = ignore_rules(root);
    let now = std::time::SystemTime::now();
    let mut unsettled = false;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // The daemon's own files are never synced, except the folder's shared ignore
            // rules in `.meshsync/ignore`.
            if dir == root && name == ".meshsync" {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
                continue;
            }
            let in_own_dir = dir == root.join(".meshsync");
            if (name.starts_with(".meshsync") || in_own_dir) && !(in_own_dir && name == "ignore") {
                continue;
            }
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().to_string();
            let meta = std::fs::symlink_metadata(&path)?;
            seen.insert(rel.clone());
            if rel != IGNORE_FILE
                && rules
                    .matched_path_or_any_parents(&rel, meta.is_dir())
                    .is_ignore()
            {
                continue; // ignored: neither recorded nor deleted
            }
            let mode = meta.mode() & 0o7777;
            if meta.is_dir() {
                stack.push(path.clone());
                if local
                    .get(&rel)
                    .is_none_or(|l| l.kind != FileKind::Directory)
                {
                    out.push(Scanned {
                        path: rel,
                        file: Some(LocalFile {
                            kind: FileKind::Directory,
                            size: 0,
                            mtime_ns: 0,
                            mode,
                            chunks: vec![],
                            version: 0,
                            list_hash: ChunkListHash::default(),
                        }),
                        refs: vec![],
                    });
                }
                continue;
            }
            if meta.file_type().is_symlink() {
                // Synced as a link, never followed: its content is the target path.
                use std::os::unix::ffi::OsStrExt;
                let target = std::fs::read_link(&path)?;
                let bytes = target.as_os_str().as_bytes().to_vec();
                let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
                let refs = content::chunk_stream(&bytes[..], id_key, |_, _| {})?;
                let list_hash = content::chunk_list_hash(&refs);
                if local
                    .get(&rel)
                    .is_some_and(|l| l.kind == FileKind::Symlink && l.list_hash == list_hash)
                {
                    continue;
                }
                out.push(Scanned {
                    path: rel,
                    file: Some(LocalFile {
                        kind: FileKind::Symlink,
                        size: bytes.len() as u64,
                        mtime_ns,
                        mode: 0o777,
                        chunks: refs.iter().map(|c| (c.id, c.offset, c.len)).collect(),
                        version: 0,
                        list_hash,
                    }),
                    refs,
                });
                continue;
            }
            if !meta.is_file() {
                continue; // sockets, devices, fifos: not synced
            }
            let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if wait_settle && now.duration_since(modified).is_ok_and(|age| age < SETTLE) {
                // Still being written: recording it now would publish a torn version.
                unsettled = true;
                continue;
            }
            if let Some(l) = local.get(&rel) {
                if l.kind == FileKind::File
                    && l.size == meta.len()
                    && l.mtime_ns == mtime_ns
                    && l.mode == mode
                {
                    continue;
                }
            }
            let file = std::fs::File::open(&path)?;
            // A write in progress can keep mtime still while the size grows: if the file is
            // not exactly what it was when we started reading, it is not settled yet (checked
            // after every block, so a growing file costs one block, not a whole pass).
            let unchanged = || {
                file.metadata().is_ok_and(|now| {
                    now.len() == meta.len() && now.modified().ok() == meta.modified().ok()
                })
            };
            let refs = content::chunk_file(&file, id_key, unchanged)?;
            let size: u64 = refs.iter().flatten().map(|c| u64::from(c.len)).sum();
            // …and the path must still name the file that was read (not one renamed over it).
            let replaced = std::fs::symlink_metadata(&path).map_or(true, |after| {
                after.ino() != meta.ino() || after.modified().ok() != meta.modified().ok()
            });
            let Some(refs) = refs.filter(|_| size == meta.len() && !replaced) else {
                unsettled = true;
                continue;
            };
            out.push(Scanned {
                path: rel,
                file: Some(LocalFile {
                    kind: FileKind::File,
                    size,
                    mtime_ns,
                    mode,
                    chunks: refs.iter().map(|c| (c.id, c.offset, c.len)).collect(),
                    version: 0,
                    list_hash: content::chunk_list_hash(&refs),
                }),
                refs,
            });
        }
    }
    let ignored = |rel: &str, file: &LocalFile| {
        rel != IGNORE_FILE
            && rules
                .matched_path_or_any_parents(rel, file.kind == FileKind::Directory)
                .is_ignore()
    };
    for (rel, _) in local
        .iter()
        .filter(|(rel, file)| !seen.contains(*rel) && !ignored(rel, file))
    {
        out.push(Scanned {
            path: rel.clone(),
            file: None,
            refs: vec![],
        });
    }
    Ok((out, unsettled))
}

impl Node {
    /// Adds a folder: `id` joins an existing mesh folder or creates a new one.
    pub fn add_folder(&mut self, path: &Path, id: Option<FolderId>) -> anyhow::Result<FolderId> {
        let path = std::fs::canonicalize(path)
            .with_context(|| format!("{} does not exist", path.display()))?;
        if !path.is_dir() {
            anyhow::bail!("{} is not a folder", path.display());
        }
        let probe = path.join(".meshsync-probe");
        std::fs::write(&probe, b"")
            .with_context(|| format!("{} is not writable", path.display()))?;
        let _ = std::fs::remove_file(&probe);
        if self.folders.values().any(|f| f.path == path) {
            anyhow::bail!("{} is already synced", path.display());
        }
        let id = id.unwrap_or_else(FolderId::random);
        if self.folders.contains_key(&id) {
            anyhow::bail!("folder {id} is already on this device");
        }
        std::fs::write(path.join(MARKER), format!("meshsync folder {id}\n"))?;
        let index = FolderIndex::new(self.log.mesh(), id.clone())
            .with_actor(meshsync_crdt::index::actor_for(&self.keys.device_id(), 0));
        self.state.commit(Batch {
            folders: vec![(id.clone(), path.clone())],
            ..Batch::default()
        })?;
        self.watch(&id, &path);
        self.folders.insert(
            id.clone(),
            Folder {
                path,
                index,
                local: BTreeMap::new(),
                held_deletes: 0,
                unavailable: BTreeSet::new(),
            },
        );
        // Changes to this folder that came through storage peers before it was added here.
        crate::sealing::replay(self, &id)?;
        Ok(id)
    }

    /// Watches a folder; changes outside `.meshsync*` files trigger a debounced rescan.
    fn watch(&mut self, id: &FolderId, path: &Path) {
        use notify::Watcher;
        let tx = self.changes.clone();
        let id = id.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // The daemon's own files do not trigger a scan; the shared ignore rules do.
            let ours = event.paths.iter().all(|p| {
                !p.ends_with(IGNORE_FILE)
                    && p.components()
                        .any(|c| c.as_os_str().to_string_lossy().starts_with(".meshsync"))
            });
            if !ours && !matches!(event.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(id.clone());
            }
        };
        match notify::recommended_watcher(handler) {
            Ok(mut watcher) => match watcher.watch(path, notify::RecursiveMode::Recursive) {
                Ok(()) => self.watchers.push(watcher),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot watch; relying on periodic scans")
                }
            },
            Err(error) => tracing::warn!(%error, "no file watcher; relying on periodic scans"),
        }
    }

    /// Paths whose winning version is not on disk here yet.
    fn needs(&self) -> Vec<(FolderId, BTreeSet<String>)> {
        self.folders
            .iter()
            .filter_map(|(id, f)| {
                let rules = ignore_rules(&f.path);
                let paths: BTreeSet<String> = f
                    .index
                    .iter()
                    .filter(|(path, state)| {
                        let is_dir = state.winner.kind == FileKind::Directory;
                        if path != IGNORE_FILE
                            && rules.matched_path_or_any_parents(path, is_dir).is_ignore()
                        {
                            return false;
                        }
                        let w = &state.winner;
                        match f.local.get(path) {
                            Some(l) => !(l.version == w.version && l.list_hash == w.chunks),
                            None => !w.deleted,
                        }
                    })
                    .map(|(path, _)| path)
                    .collect();
                (!paths.is_empty()).then(|| (id.clone(), paths))
            })
            .collect()
    }

    pub fn folder_list(&self) -> Vec<(FolderId, PathBuf)> {
        self.folders
            .iter()
            .map(|(id, f)| (id.clone(), f.path.clone()))
            .collect()
    }

    /// Reads and seals chunks of current local files (what this node serves).
    pub(crate) fn served(&self) -> Served {
        Served {
            map: self.chunk_map.clone(),
            key: self.key.clone(),
            store: self.store.clone(),
        }
    }

    /// The mesh's storage peers.
    pub(crate) fn storage_peers(&self) -> Vec<PeerId> {
        self.log
            .view()
            .members
            .values()
            .filter(|m| m.role == meshsync_crdt::Role::Storage)
            .map(|m| m.device.to_peer_id())
            .collect()
    }

    /// The current mesh key (a device that joined holds one; a fresh home's is made at start).
    pub(crate) fn mesh_key(&self) -> anyhow::Result<MeshKey> {
        self.key
            .lock()
            .expect("key lock")
            .clone()
            .context("this device holds no mesh key")
    }

    /// Whether `peer` is a storage peer of the mesh (sent no folder state, ever).
    pub(crate) fn is_storage(&self, peer: &PeerId) -> bool {
        meshsync_crdt::DeviceId::from_peer_id(peer)
            .and_then(|d| self.log.view().members.get(&d).map(|m| m.role))
            == Some(meshsync_crdt::Role::Storage)
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn keys(&self) -> &DeviceKeys {
        &self.keys
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Members of the mesh, for `meshsync devices`.
    /// A member's name, opened with the mesh key (the log holds it sealed).
    fn member_name(&self, m: &meshsync_crdt::Member) -> String {
        let key = self.key.lock().ok().and_then(|k| k.clone());
        key.and_then(|k| m.name.open(&k, &self.log.mesh(), &m.device))
            .unwrap_or_else(|| "(name sealed under another key)".into())
    }

    pub async fn devices(&self) -> serde_json::Value {
        let connected: BTreeSet<PeerId> =
            self.transport.connected_peers().await.into_iter().collect();
        let me = self.keys.device_id();
        let view = self.log.view();
        serde_json::json!(view
            .members
            .values()
            .map(|m| serde_json::json!({
                "id": m.device.to_string(),
                "name": self.member_name(m),
                "role": m.role.to_string(),
                "admin": m.admin,
                "this_device": m.device == me,
                "connected": m.device == me || connected.contains(&m.device.to_peer_id()),
            }))
            .collect::<Vec<_>>())
    }

    /// Conflict copies, for `meshsync conflicts`: those the index calls for (concurrent
    /// records) and those on disk (including local edits moved aside), one entry per copy.
    pub fn conflicts(&self) -> serde_json::Value {
        let mut out: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
        for (id, f) in &self.folders {
            for state in f.index.conflicts() {
                let path = state.winner.path.clone();
                for loser in &state.losers {
                    let copy = conflict_name(&path, loser);
                    out.insert(
                        (id.to_string(), copy.clone()),
                        serde_json::json!({
                            "folder": id.to_string(),
                            "path": path,
                            "copy": copy,
                            "author": loser.author.to_string(),
                            "on_disk": f.path.join(&copy).exists(),
                        }),
                    );
                }
            }
            for rel in f.local.keys().filter(|p| p.contains(".sync-conflict-")) {
                let key = (id.to_string(), rel.clone());
                if out.contains_key(&key) {
                    continue;
                }
                let original = original_of_conflict(rel);
                out.insert(
                    key,
                    serde_json::json!({
                        "folder": id.to_string(),
                        "path": original,
                        "copy": rel,
                        "on_disk": true,
                    }),
                );
            }
        }
        serde_json::json!(out.into_values().collect::<Vec<_>>())
    }

    /// Adds ignore patterns to a folder (shared, or this device's overrides) and returns the
    /// folder's rules as they now stand.
    pub fn add_ignore(
        &self,
        id: &FolderId,
        patterns: &[String],
        local: bool,
    ) -> anyhow::Result<serde_json::Value> {
        use std::io::Write;
        let f = self.folders.get(id).with_context(|| {
            format!("no folder {id} on this device (see `meshsync folder list`)")
        })?;
        for pattern in patterns {
            ignore::gitignore::GitignoreBuilder::new(&f.path)
                .add_line(None, pattern)
                .with_context(|| format!("{pattern:?} is not a valid ignore pattern"))?;
        }
        let file = f.path.join(if local {
            LOCAL_IGNORE_FILE
        } else {
            IGNORE_FILE
        });
        if !patterns.is_empty() {
            std::fs::create_dir_all(f.path.join(".meshsync"))?;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?;
            for pattern in patterns {
                writeln!(out, "{pattern}")?;
            }
            out.sync_all()?;
        }
        let read = |name: &str| std::fs::read_to_string(f.path.join(name)).unwrap_or_default();
        Ok(serde_json::json!({
            "folder": id.to_string(),
            "shared": read(IGNORE_FILE).lines().collect::<Vec<_>>(),
            "local": read(LOCAL_IGNORE_FILE).lines().collect::<Vec<_>>(),
        }))
    }

    /// Stops syncing a folder on this device (its files stay where they are).
    pub fn remove_folder(&mut self, id: &FolderId) -> anyhow::Result<PathBuf> {
        let folder = self.folders.remove(id).with_context(|| {
            format!("no folder {id} on this device (see `meshsync folder list`)")
        })?;
        self.state.remove_folder(id)?;
        let mut map = self.chunk_map.lock().expect("chunk map lock");
        let gone: Vec<PathBuf> = map
            .files
            .keys()
            .filter(|path| path.starts_with(&folder.path))
            .cloned()
            .collect();
        for path in gone {
            map.forget(&path);
        }
        Ok(folder.path)
    }

    /// The status report of `meshsync status --json`.
    pub async fn status(&self) -> serde_json::Value {
        let connected: BTreeSet<PeerId> =
            self.transport.connected_peers().await.into_iter().collect();
        let traffic = self.transport.traffic();
        let me = self.keys.device_id();
        let peers: Vec<serde_json::Value> = self
            .log
            .view()
            .members
            .values()
            .filter(|m| m.device != me)
            .map(|m| {
                let peer = m.device.to_peer_id();
                let (bytes_in, bytes_out) = traffic.get(&peer).copied().unwrap_or((0, 0));
                serde_json::json!({
                    "id": m.device.to_string(),
                    "name": self.member_name(m),
                    "role": m.role.to_string(),
                    "connected": connected.contains(&peer),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                })
            })
            .collect();
        let folders: Vec<serde_json::Value> = self
            .folders
            .iter()
            .map(|(id, f)| {
                let mut need_files = 0u64;
                let mut need_bytes = 0u64;
                let mut conflicts = 0u64;
                let rules = ignore_rules(&f.path);
                for (path, state) in f.index.iter() {
                    let is_dir = state.winner.kind == FileKind::Directory;
                    if path != IGNORE_FILE
                        && rules.matched_path_or_any_parents(&path, is_dir).is_ignore()
                    {
                        continue;
                    }
                    if !state.losers.is_empty() {
                        conflicts += 1;
                    }
                    let w = &state.winner;
                    let local = f.local.get(&path);
                    let synced = match local {
                        Some(l) => l.version == w.version && l.list_hash == w.chunks,
                        None => w.deleted,
                    };
                    if !synced {
                        need_files += 1;
                        need_bytes += w.size;
                    }
                }
                serde_json::json!({
                    "id": id.to_string(),
                    "path": f.path.display().to_string(),
                    "in_sync": need_files == 0,
                    "need_files": need_files,
                    "need_bytes": need_bytes,
                    "local_files": f.local.values().filter(|l| l.kind == FileKind::File).count(),
                    "conflicts": conflicts,
                    "held_deletes": f.held_deletes,
                    "unavailable": f.unavailable.iter().collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "device_id": me.to_string(),
            "mesh_id": self.log.mesh().to_string(),
            "listen": self.transport.listen_addrs().await.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "peers": peers,
            "folders": folders,
            "storage": crate::sealing::status(self, &connected),
        })
    }

    /// Starts an invite: a pairing endpoint whose join adds the device to the log (signed by
    /// this admin) and wraps the mesh key to it.
    pub async fn invite(
        node: &Shared,
        role: meshsync_crdt::Role,
        valid_for: Duration,
    ) -> anyhow::Result<String> {
        let (keys, mesh, addrs, pair_ip) = {
            let n = node.lock().await;
            if !n.log.view().is_admin(&n.keys.device_id()) {
                anyhow::bail!("only an admin device can invite; this device is not an admin");
            }
            let addrs: Vec<String> = n
                .transport
                .listen_addrs()
                .await
                .iter()
                .map(|a| a.to_string())
                .collect();
            (n.keys.clone(), n.log.mesh(), addrs, n.pair_ip.clone())
        };
        let joined = node.clone();
        let handle = tokio::runtime::Handle::current();
        let inviter = meshsync_transport::pair::Inviter::start(
            &keys,
            mesh,
            role,
            valid_for,
            &pair_ip,
            move |joiner| {
                let node = joined.clone();
                let addrs = addrs.clone();
                tokio::task::block_in_place(|| {
                    handle.block_on(async move {
                        let mut n = node.lock().await;
                        let n = &mut *n;
                        let key = n.key.lock().map_err(|e| e.to_string())?.clone();
                        let Some(key) = key else {
                            return Err("this device holds no mesh key".to_string());
                        };
                        let name = meshsync_crdt::SealedName::seal(
                            &key,
                            &n.log.mesh(),
                            &joiner.device,
                            &joiner.name,
                        );
                        let wrapped = match (joiner.role.holds_mesh_key(), Some(&key)) {
                            (true, Some(key)) => Some(
                                key.wrap_for(&n.log.mesh(), &joiner.device, &joiner.kem)
                                    .map_err(|e| e.to_string())?,
                            ),
                            _ => None,
                        };
                        n.log
                            .append(
                                &n.keys,
                                meshsync_crdt::Action::Add {
                                    device: joiner.device,
                                    role: joiner.role,
                                    name,
                                    kem: Some(joiner.kem),
                                    wrapped,
                                },
                            )
                            .map_err(|e| e.to_string())?;
                        n.state
                            .commit(Batch {
                                membership: Some(n.log.save()),
                                ..Batch::default()
                            })
                            .map_err(|e| e.to_string())?;
                        let me = n.keys.device_id();
                        let members = other_members(&n.log, &me);
                        n.transport.set_allowed(members).await;
                        // Tell the connected members now (a new member is let in everywhere).
                        let push = SyncRequest::Push(SyncChanges {
                            membership: n.log.changes_since(&[]),
                            ..SyncChanges::default()
                        });
                        let transport = n.transport.clone();
                        tokio::spawn(async move {
                            for peer in transport.connected_peers().await {
                                let _ = request(&transport, peer, &push).await;
                            }
                        });
                        let payload = JoinPayload {
                            mesh: n.log.mesh(),
                            membership: n.log.changes_since(&[]),
                            inviter_addrs: addrs,
                        };
                        postcard::to_stdvec(&payload).map_err(|e| e.to_string())
                    })
                })
            },
        )
        .await?;
        let code = inviter.invite.code();
        // Keep the pairing endpoint alive until it is used or expires.
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + valid_for;
            while !inviter.used() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(inviter);
        });
        Ok(code)
    }

    /// Applies a join made through the running daemon: reload the log and dial the inviter.
    pub async fn joined(node: &Shared, mesh: MeshId, addrs: Vec<String>) -> anyhow::Result<()> {
        let mut n = node.lock().await;
        let bytes = n
            .state
            .load()?
            .membership
            .context("no membership after joining")?;
        n.log = MembershipLog::load(mesh, &bytes)?;
        let keys = n.keys.clone();
        *n.key.lock().expect("key lock") = current_key(&n.log, &keys);
        let me = keys.device_id();
        let members = other_members(&n.log, &me);
        n.transport.set_allowed(members).await;
        for addr in addrs {
            if let Ok(addr) = addr.parse::<Multiaddr>() {
                let _ = n.transport.dial(addr).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_follow_the_syncthing_pattern_and_map_back() {
        let device = DeviceKeys::generate().device_id();
        // 2026-11-28 01:02:03 UTC
        let mtime = 1_795_827_723_000_000_000;
        let name = conflict_name_for("docs/report.final.pdf", mtime, &device);
        assert_eq!(
            name,
            format!(
                "docs/report.final.sync-conflict-20261128-010203-{}.pdf",
                device.short()
            )
        );
        assert_eq!(original_of_conflict(&name), "docs/report.final.pdf");
        let bare = conflict_name_for("Makefile", mtime, &device);
        assert_eq!(
            bare,
            format!("Makefile.sync-conflict-20261128-010203-{}", device.short())
        );
        assert_eq!(original_of_conflict(&bare), "Makefile");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
