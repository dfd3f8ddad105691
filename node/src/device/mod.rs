//! A device: the engine behind `meshsync up` on a laptop, desktop or server. It owns the home's
//! state database, runs the transport, and keeps the folders in sync. Nothing here is global:
//! a test or a simulation can run many [`Device`]s in one process (see [`net::Network::memory`]).
//!
//! ```no_run
//! # async fn demo(home: meshsync_node::home::Home) -> anyhow::Result<()> {
//! use meshsync_node::{device, net::Network};
//! let device = device::start(home, Network::memory()).await?;
//! let status = device::status::status(&device).await;
//! # Ok(()) }
//! ```
//!
//! Where things live (each module's doc says more):
//! - [`tasks`]: the background loops (watcher debounce, pull rounds, catch-up, redial, gc);
//! - [`mesh`]: membership and keys: open or create the mesh, invite, apply a join;
//! - [`folder`]: a synced folder (its index and local state), add/remove, watching;
//! - [`ignore`]: the one answer to "is this path ignored / one of the daemon's own files";
//! - [`scan`]: disk → signed index records (classification and the mass-delete guard are pure);
//! - [`sync`]: `/meshsync/doc/2` server and client: pull, push, admit peers' changes;
//! - [`lists`]: chunk lists between devices, a changed file's as the pieces that differ;
//! - [`materialise`]: index → disk, as `plan` (pure), `fetch` (chunks into temp files) and
//!   `commit` (flush, rename, delete, record);
//! - [`conflict`]: conflict-copy names;
//! - [`serve`]: which file holds each chunk, serving chunks from the synced files;
//! - [`storage`]: the exchange with storage peers (push sealed, pull sealed, stale reports);
//! - [`history`]: `versions`, `restore` and `gc` on a running device;
//! - [`status`]: the typed reports behind `status`, `devices`, `conflicts`;
//! - [`control`]: the control-socket requests a device answers.
//!
//! Concurrency: one `tokio::sync::Mutex` around the [`Device`] (the *device lock*); see
//! ARCHITECTURE.md "Tasks and locks" for every task, every lock, and their order.

pub mod conflict;
pub mod control;
mod cutoff;
pub mod folder;
pub mod history;
pub mod ignore;
mod lists;
pub mod materialise;
pub mod members;
pub mod mesh;
pub mod resolve;
pub mod scan;
pub mod serve;
pub mod status;
pub mod storage;
pub mod survey;
pub mod sync;
pub mod tasks;
pub mod walk;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex as StdMutex};

use meshsync_crdt::{DeviceKeys, FolderId, KeyRing, MembershipLog};
use meshsync_transport::{chunks, PeerId, Transport};
use tokio::sync::Mutex;

use crate::chunks::ChunkStore;
use crate::home::Home;
use crate::net::{self, Network};
use crate::state::State;
use crate::storage_client::Sealing;
use folder::Folder;
use serve::{ChunkMap, Served};

/// A running device (see the module docs). Other code holds it as [`Shared`].
pub struct Device {
    pub(crate) home: Home,
    pub(crate) keys: Arc<DeviceKeys>,
    pub(crate) state: State,
    pub(crate) log: MembershipLog,
    /// Every mesh key this device holds, by epoch (empty until it holds one), shared with the
    /// chunk server.
    pub(crate) keys_ring: Arc<StdMutex<KeyRing>>,
    /// The other devices of the mesh (they hold the key: the chunk server sends them chunks
    /// in the clear), shared with the chunk server.
    pub(crate) readers: Arc<StdMutex<HashSet<PeerId>>>,
    pub(crate) folders: BTreeMap<FolderId, Folder>,
    /// Where each chunk of each current file lies (the chunk server reads it without the
    /// device lock).
    pub(crate) chunk_map: Arc<StdMutex<ChunkMap>>,
    pub(crate) transport: Transport,
    /// Each folder's watcher, kept alive while the folder is synced (`None` while it is set up
    /// on a thread of its own, or if it could not be: see [`Device::watch`]).
    watchers: Arc<StdMutex<BTreeMap<FolderId, Option<notify::RecommendedWatcher>>>>,
    pub(crate) changes: tokio::sync::mpsc::UnboundedSender<scan::Rescan>,
    /// One materialise at a time, so a catch-up never fetches what a pull is fetching.
    pub(crate) materialising: Arc<Mutex<()>>,
    /// The IP the pairing endpoint listens on.
    pub(crate) pair_ip: String,
    /// This device's side of storage peers: its sealed changes, what it applied, what it saw.
    pub(crate) sealing: Sealing,
    /// Sealed chunks of old versions this device keeps (`HOME/chunks`).
    pub(crate) store: Arc<StdMutex<ChunkStore>>,
    /// When each member was last connected (Unix seconds), kept across restarts.
    pub(crate) last_seen: BTreeMap<meshsync_crdt::DeviceId, u64>,
    /// When this device last started a key epoch on its own (see
    /// `members::rotate_if_needed`).
    pub(crate) rotated_at: Option<std::time::Instant>,
    /// When the next safety-net walk of every folder is due (each whole scan sets it: see
    /// `scan::scan_in`).
    pub(crate) next_full_scan: tokio::time::Instant,
    /// Told once the device must stop (it wiped itself after its removal): `meshsync up`
    /// ends.
    pub(crate) stop: Arc<tokio::sync::Notify>,
    /// Set once `meshsync up` is stopping: a scan's walk on a blocking thread (which the
    /// runtime waits for as it shuts down) gives up at its next folder, so a stop does not
    /// wait for a start-up walk of a million files (20 s with a cold page cache).
    pub(crate) stopping: Arc<AtomicBool>,
}

/// The device behind its lock, as every task and handler holds it.
pub type Shared = Arc<Mutex<Device>>;

/// In the background, for each folder: sets up the watcher (see [`Device::watch`]), then has
/// the folder scanned whole: that scan sees whatever changed while the daemon was down or
/// before its watcher was there, and removes the temp files a killed daemon left on the way.
async fn watch_all(device: &Shared) {
    let (folders, tx) = {
        let d = device.lock().await;
        (d.folder_list(), d.changes.clone())
    };
    let device = device.clone();
    tokio::spawn(async move {
        for (folder, path) in folders {
            let watching = device.lock().await.watch(&folder, &path);
            watching.ready().await;
            let _ = tx.send(scan::Rescan {
                folder,
                scope: scan::Scope::All,
            });
        }
    });
}

/// A device named `name` with a fresh home under `dir`, started on the in-memory network.
#[cfg(test)]
pub(crate) async fn test_device(dir: &std::path::Path, name: &str) -> Shared {
    let home = Home::locate(Some(dir.join(name))).unwrap();
    home.init(name, meshsync_crdt::Role::Device).unwrap();
    start(home, Network::memory()).await.unwrap()
}

/// Devices `a` and `b` in one mesh (b joined with a's invite), each with an empty folder
/// (`dir/A`, `dir/B`) to sync, not yet added.
#[cfg(test)]
pub(crate) async fn test_pair(
    dir: &std::path::Path,
) -> (Shared, Shared, std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (test_device(dir, "a").await, test_device(dir, "b").await);
    let role = meshsync_crdt::Role::Device;
    let code = mesh::invite(&a, role, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    mesh::join(&b, &code).await.unwrap();
    let (fa, fb) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    (a, b, fa, fb)
}

/// Starts a device on `home`: state, transport, protocol handlers, background tasks.
pub async fn start(home: Home, network: Network) -> anyhow::Result<Shared> {
    let keys = Arc::new(home.open_for_daemon()?);
    let (state, log) = mesh::open_state(&home, &keys)?;
    let ring = Arc::new(StdMutex::new(log.key_ring(&keys)));
    let readers = Arc::new(StdMutex::new(net::key_holders(&log, &keys.device_id())));
    let chunk_map = Arc::new(StdMutex::new(ChunkMap::new(state.clone())));
    let folders = folder::load_all(&state, &log, &keys, &chunk_map)?;
    let transport = net::start_transport(&keys, &network)?;
    transport
        .set_allowed(net::other_members(&log, &keys.device_id()))
        .await;
    transport.allowed().set_notice(net::notice_peers(&log));
    net::dial_all(&transport, net::static_addrs(&home, &state)).await;
    let sealing = Sealing::load(&state)?;
    let last_seen = state.get(&status::LAST_SEEN)?;
    let store = Arc::new(StdMutex::new(ChunkStore::open(
        &home.path().join("chunks"),
    )?));
    let (changes, changed) = tokio::sync::mpsc::unbounded_channel::<scan::Rescan>();
    let device = Arc::new(Mutex::new(Device {
        home,
        keys,
        state,
        log,
        keys_ring: ring.clone(),
        readers: readers.clone(),
        folders,
        chunk_map: chunk_map.clone(),
        transport: transport.clone(),
        watchers: Arc::default(),
        changes,
        materialising: Arc::new(Mutex::new(())),
        pair_ip: network.pair_ip(),
        sealing,
        store: store.clone(),
        last_seen,
        rotated_at: None,
        next_full_scan: tokio::time::Instant::now()
            + scan::safety_net_wait(std::time::Duration::ZERO),
        stop: Arc::new(tokio::sync::Notify::new()),
        stopping: Arc::new(AtomicBool::new(false)),
    }));
    watch_all(&device).await;
    chunks::start_serving(
        &transport,
        Arc::new(Served {
            map: chunk_map,
            state: device.lock().await.state.clone(),
            keys: ring,
            readers,
            store,
        }),
    )?;
    sync::serve(&device, &transport)?;
    members::serve_notice(&device, &transport)?;
    tasks::spawn_all(&device, changed);
    Ok(device)
}

impl Device {
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn keys(&self) -> &DeviceKeys {
        &self.keys
    }

    /// Told when the device must stop (see `members::wipe`).
    pub fn stopped(&self) -> Arc<tokio::sync::Notify> {
        self.stop.clone()
    }

    /// The flag to set when the device stops: a scan's walk in progress gives up before its
    /// next folder.
    pub fn stopping(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The membership log as this device holds it.
    pub fn log(&self) -> &MembershipLog {
        &self.log
    }

    /// A digest of this device's replicated state: the heads of its membership log and of
    /// every shard of every folder's index. Two devices with the same digest hold the same
    /// state.
    pub fn replica_digest(&mut self) -> String {
        let mut hasher = blake3::Hasher::new();
        for head in self.log.heads() {
            hasher.update(&head.0);
        }
        for (id, folder) in self.folders.iter_mut() {
            hasher.update(id.as_str().as_bytes());
            for (shard, heads) in folder.index.heads() {
                hasher.update(&shard.to_le_bytes());
                for head in heads {
                    hasher.update(&head.0);
                }
            }
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Reads and seals chunks of current local files and kept versions (what this device
    /// serves).
    pub fn served(&self) -> Served {
        Served {
            map: self.chunk_map.clone(),
            state: self.state.clone(),
            keys: self.keys_ring.clone(),
            readers: self.readers.clone(),
            store: self.store.clone(),
        }
    }
}
