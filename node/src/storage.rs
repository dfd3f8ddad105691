//! The storage peer (`meshsync init --storage`, then `meshsync up`): an always-on node that
//! stores and serves the mesh's data and can read none of it.
//!
//! It never receives a mesh key. It holds the signed membership log in the clear (public keys
//! and roles, names sealed) to know whom to serve, and everything else sealed:
//! - **sealed changes** ([`SealedChange`]) in the state database, by author and sequence
//!   number. Each is checked before it is stored: right mesh, author a writing member, author's
//!   signature over the ciphertext valid. Unsigned, wrongly signed, or removed-author data is
//!   refused.
//! - **sealed chunks** in the chunk store ([`ChunkStore`]: pack files + redb index), served to
//!   members over `/meshsync/chunks/1` exactly as devices serve theirs. It cannot check a
//!   chunk's content (that needs the key); devices do, and fetch a bad one elsewhere.
//!
//! Devices talk to it on `/meshsync/sealed/1` ([`StoreRequest`]); membership changes travel on
//! `/meshsync/doc/1` as between devices, but a storage peer is never sent folder state.
//! Strangers and removed devices are refused by the transport gate before any of this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::{
    ChunkId, DeviceId, DeviceKeys, MembershipLog, MeshId, Role, SealedChange, SignedHead,
};
use meshsync_transport::chunks::{self, ChunkSource};
use meshsync_transport::{rpc, Multiaddr, PeerId, Transport};
use serde::{Deserialize, Serialize};
/// Bytes that encode as one length and a copy (not one element at a time).
pub use serde_bytes::ByteBuf;
use tokio::sync::Mutex;

use crate::daemon::{self, SyncChanges, SyncReply, SyncRequest};
use crate::home::Home;
use crate::state::{Batch, State};
use crate::store::ChunkStore;

/// The largest sealed chunk accepted: a 256 KiB chunk, padded, with its tag.
pub const MAX_SEALED_CHUNK: usize = 300 * 1024;
/// How much one reply of sealed changes carries at most (about).
const REPLY_BUDGET: usize = 8 * 1024 * 1024;
const RELEASE_CONTEXT: &str = "meshsync chunk release v1";

/// A request on `/meshsync/sealed/1`.
#[derive(Serialize, Deserialize, Debug)]
pub enum StoreRequest {
    /// What the storage peer holds; `mine` is the asking device's own latest signed head, so
    /// the storage peer can tell whether it is up to date for that device.
    Heads { mine: Option<SignedHead> },
    /// Sealed changes after these sequence numbers (per author).
    Get { after: BTreeMap<DeviceId, u64> },
    /// Store these encoded sealed changes.
    Put(Vec<ByteBuf>),
    /// Which of these chunks are not held.
    Missing(Vec<ChunkId>),
    /// Store these sealed chunks.
    PutChunks(Vec<(ChunkId, ByteBuf)>),
    /// Forget chunks nothing references any more.
    Release(SignedRelease),
}

#[derive(Serialize, Deserialize, Debug)]
pub enum StoreReply {
    Heads(BTreeMap<DeviceId, u64>),
    Changes { blobs: Vec<ByteBuf>, more: bool },
    Stored(usize),
    Missing(Vec<ChunkId>),
    Released { chunks: usize, bytes: u64 },
    Refused(String),
}

/// A device's signed list of chunks that nothing it knows references any more (old versions
/// past their retention).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SignedRelease {
    pub mesh: MeshId,
    pub author: DeviceId,
    pub time: u64,
    pub chunks: Vec<ChunkId>,
    signature: meshsync_crdt::Signature,
}

impl SignedRelease {
    pub fn sign(mesh: MeshId, author: &DeviceKeys, chunks: Vec<ChunkId>) -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut release = SignedRelease {
            mesh,
            author: author.device_id(),
            time,
            chunks,
            signature: meshsync_crdt::Signature::from_bytes(&[0; 64]),
        };
        release.signature = author.sign(RELEASE_CONTEXT, &release.signed_bytes());
        release
    }

    fn signed_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&(&self.mesh, &self.author, &self.time, &self.chunks))
            .expect("releases always encode")
    }

    pub fn verify(&self) -> bool {
        meshsync_crdt::keys::verify(
            &self.author,
            RELEASE_CONTEXT,
            &self.signed_bytes(),
            &self.signature,
        )
        .is_ok()
    }
}

/// The running storage peer.
pub struct Storage {
    home: Home,
    keys: Arc<DeviceKeys>,
    state: State,
    log: Option<MembershipLog>,
    store: Arc<StdMutex<ChunkStore>>,
    /// Highest sequence number held per author.
    held: BTreeMap<DeviceId, u64>,
    sealed_count: u64,
    sealed_bytes: u64,
    /// The latest head each device said it has (signed), and when.
    claimed: BTreeMap<DeviceId, u64>,
    transport: Transport,
}

pub type SharedStorage = Arc<Mutex<Storage>>;

struct StoreSource(Arc<StdMutex<ChunkStore>>);

impl ChunkSource for StoreSource {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        let store = self.0.lock().ok()?;
        match store.get(id) {
            Ok(found) => found.map(Into::into),
            Err(error) => {
                tracing::warn!(?id, %error, "cannot read a stored chunk");
                None
            }
        }
    }
}

/// Starts a storage peer on `home` (made with `meshsync init --storage`).
pub async fn start(
    home: Home,
    listen: Vec<Multiaddr>,
    mdns: bool,
) -> anyhow::Result<SharedStorage> {
    let keys = Arc::new(home.load_keys()?);
    home.config()?; // a bad config.toml stops the start with its reason
    let state = State::open(home.path())?;
    let loaded = state.load()?;
    let log = match (loaded.mesh, loaded.membership) {
        (Some(mesh), Some(bytes)) => Some(
            MembershipLog::load(mesh, &bytes)
                .with_context(|| format!("loading the membership log of mesh {mesh}"))?,
        ),
        _ => None,
    };
    let store = ChunkStore::open(&home.path().join("chunks"))?;
    let (held, sealed_count, sealed_bytes) = state.sealed_summary()?;
    let transport = daemon::start_transport(&keys, listen, mdns).await?;
    if let Some(log) = &log {
        transport
            .set_allowed(daemon::other_members(log, &keys.device_id()))
            .await;
    }
    daemon::dial_all(&transport, daemon::static_addrs(&home, &state)).await;
    let store = Arc::new(StdMutex::new(store));
    let storage = Arc::new(Mutex::new(Storage {
        home,
        keys,
        state,
        log,
        store: store.clone(),
        held,
        sealed_count,
        sealed_bytes,
        claimed: BTreeMap::new(),
        transport: transport.clone(),
    }));

    chunks::start_serving(&transport, Arc::new(StoreSource(store)))?;
    let s = storage.clone();
    rpc::serve(&transport, rpc::DOC, move |peer, request| {
        let s = s.clone();
        async move {
            let request: SyncRequest = postcard::from_bytes(&request).ok()?;
            let reply = handle_doc(&s, peer, request).await;
            postcard::to_stdvec(&reply).ok()
        }
    })?;
    let s = storage.clone();
    rpc::serve(&transport, rpc::SEALED, move |peer, request| {
        let s = s.clone();
        async move {
            let reply = match postcard::from_bytes::<StoreRequest>(&request) {
                Ok(request) => handle_sealed(&s, peer, request).await,
                Err(error) => StoreReply::Refused(format!("malformed request: {error}")),
            };
            postcard::to_stdvec(&reply).ok()
        }
    })?;
    // Learn membership changes (new devices, removals) from the devices it meets.
    let s = storage.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (transport, heads) = {
                let mut st = s.lock().await;
                let transport = st.transport.clone();
                let Some(log) = &mut st.log else { continue };
                (transport, daemon::to_heads(&log.heads()))
            };
            for peer in transport.connected_peers().await {
                let request = SyncRequest::Pull {
                    membership: heads.clone(),
                    folders: vec![],
                };
                if let Ok(SyncReply::Changes(changes)) =
                    daemon::request(&transport, peer, &request).await
                {
                    if let Err(error) = apply_membership(&s, changes).await {
                        tracing::warn!(%peer, error = format!("{error:#}"), "refused membership changes");
                    }
                }
            }
        }
    });
    Ok(storage)
}

async fn apply_membership(s: &SharedStorage, changes: SyncChanges) -> anyhow::Result<()> {
    if changes.membership.is_empty() {
        return Ok(());
    }
    let mut st = s.lock().await;
    let st = &mut *st;
    let Some(log) = &mut st.log else {
        return Ok(());
    };
    if log.apply(&changes.membership)? > 0 {
        st.state.commit(Batch {
            membership: Some(log.save()),
            ..Batch::default()
        })?;
        st.transport
            .set_allowed(daemon::other_members(log, &st.keys.device_id()))
            .await;
    }
    Ok(())
}

async fn handle_doc(s: &SharedStorage, peer: PeerId, request: SyncRequest) -> SyncReply {
    match request {
        // Only membership: a storage peer has no folder state, and is never sent any.
        SyncRequest::Pull { membership, .. } => {
            let mut st = s.lock().await;
            let Some(log) = &mut st.log else {
                return SyncReply::Refused("this storage peer has not joined a mesh".into());
            };
            SyncReply::Changes(SyncChanges {
                membership: log.changes_since(&daemon::from_heads(&membership)),
                ..SyncChanges::default()
            })
        }
        SyncRequest::Push(changes) => {
            let changes = SyncChanges {
                membership: changes.membership,
                ..SyncChanges::default()
            };
            match apply_membership(s, changes).await {
                Ok(()) => SyncReply::Ok,
                Err(error) => {
                    tracing::warn!(%peer, error = format!("{error:#}"), "refused membership changes");
                    SyncReply::Refused(error.to_string())
                }
            }
        }
        SyncRequest::ChunkLists(_) => SyncReply::ChunkLists(vec![]),
    }
}

/// The role of `peer` in the mesh, if it is a member.
fn role_of(st: &Storage, peer: &PeerId) -> Option<Role> {
    let device = DeviceId::from_peer_id(peer)?;
    st.log.as_ref()?.view().members.get(&device).map(|m| m.role)
}

async fn handle_sealed(s: &SharedStorage, peer: PeerId, request: StoreRequest) -> StoreReply {
    match request {
        StoreRequest::Heads { mine } => {
            let mut st = s.lock().await;
            if let (Some(head), Some(log)) = (mine, &st.log) {
                let from_peer = DeviceId::from_peer_id(&peer) == Some(head.author);
                if from_peer && head.mesh == log.mesh() && head.verify().is_ok() {
                    st.claimed.insert(head.author, head.seq);
                }
            }
            StoreReply::Heads(st.held.clone())
        }
        StoreRequest::Get { after } => {
            let st = s.lock().await;
            let mut blobs = Vec::new();
            let mut size = 0;
            let mut more = false;
            for (author, held) in &st.held {
                let from = after.get(author).copied().unwrap_or(0);
                if *held <= from {
                    continue;
                }
                if size >= REPLY_BUDGET {
                    more = true;
                    break;
                }
                match st.state.sealed_after(author, from, REPLY_BUDGET - size) {
                    Ok(found) => {
                        let got = found.len() as u64;
                        size += found.iter().map(|(_, b)| b.len()).sum::<usize>();
                        blobs.extend(found.into_iter().map(|(_, b)| ByteBuf::from(b)));
                        if from + got < *held {
                            more = true;
                        }
                    }
                    Err(error) => return StoreReply::Refused(error.to_string()),
                }
            }
            StoreReply::Changes { blobs, more }
        }
        StoreRequest::Put(blobs) => put_changes(s, peer, blobs).await,
        StoreRequest::Missing(ids) => {
            let st = s.lock().await;
            let store = st.store.lock().expect("store lock");
            match store.missing(&ids[..ids.len().min(16_384)]) {
                Ok(missing) => StoreReply::Missing(missing),
                Err(error) => StoreReply::Refused(error.to_string()),
            }
        }
        StoreRequest::PutChunks(chunks) => {
            let store = {
                let st = s.lock().await;
                if role_of(&st, &peer) != Some(Role::Device) {
                    tracing::warn!(%peer, "chunks from a device that may not write refused");
                    return StoreReply::Refused("only writing members may store chunks".into());
                }
                st.store.clone()
            };
            if chunks.iter().any(|(_, data)| data.len() > MAX_SEALED_CHUNK) {
                return StoreReply::Refused("a chunk is larger than any sealed chunk".into());
            }
            let stored = tokio::task::spawn_blocking(move || {
                let refs: Vec<(ChunkId, &[u8])> =
                    chunks.iter().map(|(id, d)| (*id, &d[..])).collect();
                store.lock().expect("store lock").put_batch(&refs)
            })
            .await;
            match stored {
                Ok(Ok(n)) => StoreReply::Stored(n),
                Ok(Err(error)) => StoreReply::Refused(error.to_string()),
                Err(error) => StoreReply::Refused(error.to_string()),
            }
        }
        StoreRequest::Release(release) => {
            let store = {
                let st = s.lock().await;
                let Some(log) = &st.log else {
                    return StoreReply::Refused("not in a mesh".into());
                };
                let writer = log
                    .view()
                    .members
                    .get(&release.author)
                    .is_some_and(|m| m.role == Role::Device);
                if release.mesh != log.mesh() || !writer || !release.verify() {
                    tracing::warn!(%peer, "release refused: not signed by a writing member");
                    return StoreReply::Refused("release not signed by a writing member".into());
                }
                st.store.clone()
            };
            let removed = tokio::task::spawn_blocking(move || {
                store.lock().expect("store lock").remove(&release.chunks)
            })
            .await;
            match removed {
                Ok(Ok((chunks, bytes))) => {
                    tracing::info!(%peer, chunks, bytes, "released chunks deleted");
                    StoreReply::Released { chunks, bytes }
                }
                Ok(Err(error)) => StoreReply::Refused(error.to_string()),
                Err(error) => StoreReply::Refused(error.to_string()),
            }
        }
    }
}

/// Checks and stores sealed changes: each must be for this mesh and signed by a member who
/// may write; anything else is refused (and the rest of the batch still stored).
async fn put_changes(s: &SharedStorage, peer: PeerId, blobs: Vec<ByteBuf>) -> StoreReply {
    let mut st = s.lock().await;
    let st = &mut *st;
    let Some(log) = &st.log else {
        return StoreReply::Refused("this storage peer has not joined a mesh".into());
    };
    let mut batch = Batch::default();
    let mut in_batch = BTreeSet::new();
    let mut refused = Vec::new();
    for blob in blobs {
        let blob = blob.into_vec();
        let sealed = match SealedChange::decode(&blob) {
            Ok(sealed) => sealed,
            Err(error) => {
                refused.push(error.to_string());
                continue;
            }
        };
        if let Err(error) = sealed.check_author(&log.mesh(), log.view()) {
            refused.push(error.to_string());
            continue;
        }
        if !in_batch.insert((sealed.author, sealed.seq))
            || st
                .state
                .has_sealed(&sealed.author, sealed.seq)
                .unwrap_or(false)
        {
            continue; // already held
        }
        st.sealed_count += 1;
        st.sealed_bytes += blob.len() as u64;
        batch.sealed.push((sealed.author, sealed.seq, blob));
    }
    let stored = batch.sealed.len();
    let authors: BTreeSet<DeviceId> = batch.sealed.iter().map(|(a, _, _)| *a).collect();
    if stored > 0 {
        if let Err(error) = st.state.commit(batch) {
            return StoreReply::Refused(error.to_string());
        }
        // What it holds of an author is the run from 1 without a gap: a change that arrived
        // ahead of an earlier one is kept but not counted (or served) until the gap fills.
        for author in authors {
            let held = st.held.entry(author).or_insert(0);
            while st.state.has_sealed(&author, *held + 1).unwrap_or(false) {
                *held += 1;
            }
        }
    }
    if !refused.is_empty() {
        tracing::warn!(%peer, refused = ?refused, "sealed changes refused");
        return StoreReply::Refused(refused.join("; "));
    }
    StoreReply::Stored(stored)
}

impl Storage {
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn device_id(&self) -> DeviceId {
        self.keys.device_id()
    }

    /// What `meshsync status` shows on a storage peer: how much it holds, and for which
    /// devices it is up to date — all without a key.
    pub async fn status(&self) -> serde_json::Value {
        let connected: std::collections::BTreeSet<PeerId> =
            self.transport.connected_peers().await.into_iter().collect();
        let traffic = self.transport.traffic();
        let me = self.keys.device_id();
        let (chunks, chunk_bytes, disk_bytes) = {
            let store = self.store.lock().expect("store lock");
            let count = store.count().unwrap_or(0);
            let (held, disk) = store.disk_usage().unwrap_or((0, 0));
            (count, held, disk)
        };
        let members: Vec<serde_json::Value> = self
            .log
            .iter()
            .flat_map(|log| log.view().members.values())
            .filter(|m| m.device != me)
            .map(|m| {
                let peer = m.device.to_peer_id();
                let (bytes_in, bytes_out) = traffic.get(&peer).copied().unwrap_or((0, 0));
                let held = self.held.get(&m.device).copied().unwrap_or(0);
                let claimed = self.claimed.get(&m.device).copied();
                serde_json::json!({
                    "id": m.device.to_string(),
                    "role": m.role.to_string(),
                    "connected": connected.contains(&peer),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "held_changes": held,
                    "device_changes": claimed,
                    "up_to_date": m.role != Role::Device || claimed.is_some_and(|c| held >= c),
                })
            })
            .collect();
        serde_json::json!({
            "device_id": me.to_string(),
            "role": "storage",
            "mesh_id": self.log.as_ref().map(|l| l.mesh().to_string()),
            "listen": self.transport.listen_addrs().await.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "peers": members,
            "folders": [],
            "holds": {
                "chunks": chunks,
                "chunk_bytes": chunk_bytes,
                "disk_bytes": disk_bytes,
                "sealed_changes": self.sealed_count,
                "sealed_bytes": self.sealed_bytes,
            },
        })
    }

    /// Members, as a storage peer sees them (no names: they are sealed).
    pub async fn devices(&self) -> serde_json::Value {
        let connected: std::collections::BTreeSet<PeerId> =
            self.transport.connected_peers().await.into_iter().collect();
        let me = self.keys.device_id();
        serde_json::json!(self
            .log
            .iter()
            .flat_map(|log| log.view().members.values())
            .map(|m| serde_json::json!({
                "id": m.device.to_string(),
                "name": "(sealed)",
                "role": m.role.to_string(),
                "admin": m.admin,
                "this_device": m.device == me,
                "connected": m.device == me || connected.contains(&m.device.to_peer_id()),
            }))
            .collect::<Vec<_>>())
    }
}

/// Answers the CLI on a storage peer.
pub async fn handle_control(
    s: &SharedStorage,
    request: crate::control::Request,
) -> anyhow::Result<serde_json::Value> {
    use crate::control::Request;
    match request {
        Request::Status => Ok(s.lock().await.status().await),
        Request::Devices => Ok(s.lock().await.devices().await),
        Request::Join { code } => {
            let (mesh, addrs) = {
                let st = s.lock().await;
                if st.log.is_some() {
                    anyhow::bail!("this storage peer already belongs to a mesh");
                }
                daemon::join(&st.home, &st.state, &st.keys, &code).await?
            };
            let mut st = s.lock().await;
            let bytes = st
                .state
                .load()?
                .membership
                .context("no membership after joining")?;
            let log = MembershipLog::load(mesh, &bytes)?;
            st.transport
                .set_allowed(daemon::other_members(&log, &st.keys.device_id()))
                .await;
            st.log = Some(log);
            for addr in addrs {
                if let Ok(addr) = addr.parse::<Multiaddr>() {
                    let _ = st.transport.dial(addr).await;
                }
            }
            Ok(serde_json::json!({ "mesh": mesh.to_string() }))
        }
        other => anyhow::bail!(
            "a storage peer holds no folders and no key: {} is for devices",
            request_name(&other)
        ),
    }
}

fn request_name(request: &crate::control::Request) -> &'static str {
    use crate::control::Request;
    match request {
        Request::Invite { .. } => "`invite`",
        Request::FolderAdd { .. } | Request::FolderList | Request::FolderRemove { .. } => {
            "`folder`"
        }
        Request::Scan { .. } => "`scan`",
        Request::Conflicts => "`conflicts`",
        Request::Ignore { .. } => "`ignore`",
        Request::Versions { .. } | Request::Restore { .. } => "`versions`/`restore`",
        Request::Gc => "`gc`",
        _ => "this command",
    }
}
