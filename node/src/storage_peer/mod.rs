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
//! `/meshsync/doc/2` as between devices, but a storage peer is never sent folder state.
//! Strangers and removed devices are refused by the transport gate before any of this.

mod serve;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::{ChunkId, DeviceId, DeviceKeys, MembershipLog, Role};
use meshsync_transport::chunks::{self, ChunkSource};
use meshsync_transport::{PeerId, Transport};
use tokio::sync::Mutex;

use crate::chunks::ChunkStore;
use crate::control::{
    self, DeviceInfo, Holdings, Joined, Request, StorageMember, StoragePeerStatus,
};
use crate::home::Home;
use crate::net::{self, Network};
use crate::pairing;
use crate::protocol::{self, to_heads, SyncChanges, SyncReply, SyncRequest};
use crate::state::{Batch, State};

/// The largest sealed chunk accepted: a 256 KiB chunk, padded, with its tag.
pub const MAX_SEALED_CHUNK: usize = 300 * 1024;
/// How much one reply of sealed changes carries at most (about).
const REPLY_BUDGET: usize = 8 * 1024 * 1024;

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
pub async fn start(home: Home, network: Network) -> anyhow::Result<SharedStorage> {
    let keys = Arc::new(home.open_for_daemon()?);
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
    let transport = net::start_transport(&keys, &network)?;
    if let Some(log) = &log {
        transport
            .set_allowed(net::other_members(log, &keys.device_id()))
            .await;
        transport.allowed().set_notice(net::notice_peers(log));
    }
    net::dial_all(&transport, net::static_addrs(&home, &state)).await;
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
    serve::start(&storage, &transport)?;
    serve_removal_notice(&storage, &transport)?;
    tokio::spawn(learn_membership(storage.clone()));
    Ok(storage)
}

/// Tells a removed device that comes back of its removal, as a device does (a NAS may be the
/// only node a stolen laptop still reaches).
fn serve_removal_notice(s: &SharedStorage, transport: &Transport) -> anyhow::Result<()> {
    let s = s.clone();
    meshsync_transport::rpc::serve_notice(transport, protocol::REMOVED, move |peer, _| {
        let s = s.clone();
        async move {
            let notice = match meshsync_crdt::DeviceId::from_peer_id(&peer) {
                Some(id) => s
                    .lock()
                    .await
                    .log
                    .as_ref()
                    .map(|log| log.removal_notice(&id))
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            let notice: Vec<protocol::ByteBuf> =
                notice.into_iter().map(protocol::ByteBuf::from).collect();
            postcard::to_stdvec(&notice).ok()
        }
    })?;
    Ok(())
}

/// Learns membership changes (new devices, removals) from the devices it meets, every second.
async fn learn_membership(s: SharedStorage) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (transport, heads) = {
            let mut st = s.lock().await;
            let transport = st.transport.clone();
            let Some(log) = &mut st.log else { continue };
            (transport, to_heads(&log.heads()))
        };
        for peer in transport.connected_peers().await {
            let request = SyncRequest::Pull {
                membership: heads.clone(),
                folders: vec![],
            };
            if let Ok(SyncReply::Changes(changes)) = protocol::doc(&transport, peer, &request).await
            {
                if let Err(error) = apply_membership(&s, changes, None).await {
                    tracing::warn!(%peer, error = format!("{error:#}"), "refused membership changes");
                }
            }
        }
    }
}

/// Admits membership changes and lets in whoever may connect now; a device that left and
/// told this storage peer so itself (`asking`) hears the answer before it is cut off.
async fn apply_membership(
    s: &SharedStorage,
    changes: SyncChanges,
    asking: Option<PeerId>,
) -> anyhow::Result<()> {
    if changes.membership.is_empty() {
        return Ok(());
    }
    let allowed = {
        let mut st = s.lock().await;
        let st = &mut *st;
        let Some(log) = &mut st.log else {
            return Ok(());
        };
        if log.apply(&changes.membership)? == 0 {
            return Ok(());
        }
        st.state.commit(Batch {
            membership: Some(log.save()),
            ..Batch::default()
        })?;
        st.transport.allowed().set_notice(net::notice_peers(log));
        (
            st.transport.clone(),
            net::other_members(log, &st.keys.device_id()),
        )
    };
    match asking {
        Some(asking) => allowed.0.set_allowed_answering(allowed.1, asking).await,
        None => allowed.0.set_allowed(allowed.1).await,
    }
    Ok(())
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
    fn status(
        &self,
        connected: &std::collections::BTreeSet<PeerId>,
        listen: Vec<String>,
    ) -> StoragePeerStatus {
        let traffic = self.transport.traffic();
        let me = self.keys.device_id();
        let holds = {
            let store = self.store.lock().expect("store lock");
            let (chunk_bytes, disk_bytes) = store.disk_usage().unwrap_or((0, 0));
            Holdings {
                chunks: store.count().unwrap_or(0),
                chunk_bytes,
                disk_bytes,
                sealed_changes: self.sealed_count,
                sealed_bytes: self.sealed_bytes,
            }
        };
        let peers = self
            .log
            .iter()
            .flat_map(|log| log.view().members.values())
            .filter(|m| m.device != me)
            .map(|m| {
                let peer = m.device.to_peer_id();
                let (bytes_in, bytes_out) = traffic.get(&peer).copied().unwrap_or((0, 0));
                let held = self.held.get(&m.device).copied().unwrap_or(0);
                let claimed = self.claimed.get(&m.device).copied();
                StorageMember {
                    id: m.device.to_string(),
                    role: m.role.to_string(),
                    connected: connected.contains(&peer),
                    bytes_in,
                    bytes_out,
                    held_changes: held,
                    device_changes: claimed,
                    up_to_date: m.role != Role::Device || claimed.is_some_and(|c| held >= c),
                }
            })
            .collect();
        StoragePeerStatus {
            device_id: me.to_string(),
            role: "storage".into(),
            mesh_id: self.log.as_ref().map(|l| l.mesh().to_string()),
            listen,
            peers,
            holds,
        }
    }

    /// Members, as a storage peer sees them (no names: they are sealed).
    fn devices(&self, connected: &std::collections::BTreeSet<PeerId>) -> Vec<DeviceInfo> {
        let me = self.keys.device_id();
        self.log
            .iter()
            .flat_map(|log| log.view().members.values())
            .map(|m| DeviceInfo {
                id: m.device.to_string(),
                name: "(sealed)".into(),
                role: m.role.to_string(),
                admin: m.admin,
                this_device: m.device == me,
                connected: m.device == me || connected.contains(&m.device.to_peer_id()),
                last_seen: None,
                addresses: Vec::new(),
                epoch: log_epoch(self.log.as_ref(), &m.device),
                removed_in: None,
                remote_wipe: false,
            })
            .collect()
    }
}

/// The newest key epoch wrapped to `device` in `log`.
fn log_epoch(
    log: Option<&meshsync_crdt::MembershipLog>,
    device: &meshsync_crdt::DeviceId,
) -> Option<u64> {
    log?.view().wraps_for(device).last().map(|w| w.epoch.0)
}

/// Answers the CLI on a storage peer.
pub async fn handle_control(
    s: &SharedStorage,
    request: Request,
) -> anyhow::Result<serde_json::Value> {
    let transport = s.lock().await.transport.clone();
    let connected = transport.connected_peers().await.into_iter().collect();
    match request {
        Request::Status => {
            let listen = transport
                .listen_addrs()
                .await
                .iter()
                .map(|a| a.to_string())
                .collect();
            let status = s.lock().await.status(&connected, listen);
            control::reply(control::Status::Storage(status))
        }
        Request::Devices => control::reply(s.lock().await.devices(&connected)),
        Request::Join { code, .. } => {
            let (home, keys) = {
                let st = s.lock().await;
                if st.log.is_some() {
                    anyhow::bail!("this storage peer already belongs to a mesh; for another mesh, make a new one in an empty home with `meshsync --home DIR init --storage`");
                }
                (st.home.clone(), st.keys.clone())
            };
            let payload = pairing::handshake(&home, &keys, &code).await?;
            let (mesh, addrs, allowed) = {
                let mut st = s.lock().await;
                let (log, addrs) = pairing::commit(&st.state, &keys, payload, false)?;
                let allowed = net::other_members(&log, &keys.device_id());
                let mesh = log.mesh();
                st.log = Some(log);
                (mesh, addrs, allowed)
            };
            transport.set_allowed(allowed).await;
            net::dial_text(&transport, &addrs).await;
            control::reply(Joined {
                mesh: mesh.to_string(),
            })
        }
        other => anyhow::bail!(
            "a storage peer holds no folders and no key: {} is for devices; run it with a device's --home",
            other.command()
        ),
    }
}
