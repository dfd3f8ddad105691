//! One simulated device: a real device engine on its own home and folder, running on a tokio
//! runtime of its own, so that a crash is an abrupt stop — the runtime is shut down with every
//! task of the device in whatever state it was (mid-scan, mid-transfer, mid-commit) — and a
//! restart is `device::start` on the same home, as after a power cut.

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, Instant};

use meshsync_crdt::{FolderId, Role};
use meshsync_node::device::{self, folder, members, mesh, scan, Shared};
use meshsync_node::home::Home;
use meshsync_node::net::Network;
use meshsync_transport::shape::LinkShape;
use meshsync_transport::PeerId;

pub(super) struct Node {
    home: PathBuf,
    /// Slow and lossy links, if this node has them.
    shape: Option<LinkShape>,
    pub folder: PathBuf,
    pub peer: PeerId,
    /// The device and the runtime it runs on; `None` while crashed.
    running: Option<(Shared, tokio::runtime::Runtime)>,
}

impl Node {
    /// A fresh device at `dir/home{i}` with its folder at `dir/folder{i}` (not yet in a mesh).
    pub async fn create(dir: &Path, i: usize, shape: Option<LinkShape>) -> anyhow::Result<Node> {
        let home = dir.join(format!("home{i}"));
        Home::locate(Some(home.clone()))?.init(&format!("node{i}"), Role::Device)?;
        let folder = dir.join(format!("folder{i}"));
        std::fs::create_dir_all(&folder)?;
        let mut node = Node {
            home,
            shape,
            folder,
            peer: PeerId::random(),
            running: None,
        };
        node.start().await?;
        Ok(node)
    }

    /// Starts the device on its home (again).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let home = Home::locate(Some(self.home.clone()))?;
        let device = rt
            .spawn(device::start(
                home,
                Network {
                    shape: self.shape,
                    ..Network::memory()
                },
            ))
            .await??;
        self.peer = device.lock().await.transport().local_peer_id();
        self.running = Some((device, rt));
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The running device. Panics if crashed: the schedule never acts on a crashed node.
    pub fn device(&self) -> &Shared {
        &self.running.as_ref().expect("the node is running").0
    }

    /// Runs `work` on this node's runtime (so what it spawns dies with a crash).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (_, rt) = self.running.as_ref().expect("the node is running");
        rt.spawn(work).await?
    }

    /// Stops the device abruptly, and waits until nothing of it is left (its database closed)
    /// so it can start again on the same home.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        let Some((device, rt)) = self.running.take() else {
            return Ok(());
        };
        let gone: Weak<_> = std::sync::Arc::downgrade(&device);
        drop(device);
        rt.shutdown_background();
        let since = Instant::now();
        while gone.strong_count() > 0 {
            if since.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("a crashed device was still held after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Writes `rel` and has it scanned.
    pub async fn write(&self, folder: &FolderId, rel: &str, content: &[u8]) -> anyhow::Result<()> {
        let path = self.folder.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        self.scan(folder).await
    }

    pub async fn scan(&self, folder: &FolderId) -> anyhow::Result<()> {
        let (device, folder) = (self.device().clone(), folder.clone());
        self.run(async move {
            scan::scan(&device, &folder, requested()).await?;
            Ok(())
        })
        .await
    }

    /// An invite to the mesh, made by this node.
    pub async fn invite(&self) -> anyhow::Result<String> {
        let device = self.device().clone();
        self.run(async move { mesh::invite(&device, Role::Device, Duration::from_secs(600)).await })
            .await
    }

    /// Joins the mesh with `code` and adds its folder (`id`, or a new one).
    pub async fn join(&self, code: String, id: Option<FolderId>) -> anyhow::Result<FolderId> {
        let (device, path) = (self.device().clone(), self.folder.clone());
        self.run(async move {
            if !code.is_empty() {
                mesh::join(&device, &code).await?;
            }
            folder::add(&device, &path, id).await
        })
        .await
    }

    /// Removes the member whose device ID starts with `prefix` (this node must be an admin).
    pub async fn remove(&self, who: &Node) -> anyhow::Result<()> {
        let device = self.device().clone();
        let prefix = who.device_id().await;
        self.run(async move {
            members::remove(&device, &prefix, false).await?;
            Ok(())
        })
        .await
    }

    pub async fn device_id(&self) -> String {
        self.device().lock().await.keys().device_id().to_string()
    }

    pub async fn status(&self) -> meshsync_node::control::DeviceStatus {
        device::status::status(self.device()).await
    }
}

fn requested() -> scan::ScanOptions {
    scan::ScanOptions {
        requested: true,
        ..Default::default()
    }
}

/// A storage peer of the mesh: it stores and serves what devices seal, and can read nothing.
pub(super) struct StorageNode {
    pub home: PathBuf,
    pub peer: PeerId,
    storage: meshsync_node::storage_peer::SharedStorage,
    rt: Option<tokio::runtime::Runtime>,
}

impl StorageNode {
    /// A storage peer at `dir/storage`, joined with `code` (an invite for the storage role).
    pub async fn create(dir: &Path, code: String) -> anyhow::Result<StorageNode> {
        let path = dir.join("storage");
        let home = Home::locate(Some(path.clone()))?;
        home.init("storage", Role::Storage)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let storage = rt
            .spawn(async move {
                {
                    let state = meshsync_node::state::State::open(home.path())?;
                    let keys = home.open_for_daemon()?;
                    meshsync_node::pairing::join(&home, &state, &keys, &code, false).await?;
                }
                meshsync_node::storage_peer::start(home, Network::memory()).await
            })
            .await??;
        let peer = storage.lock().await.transport().local_peer_id();
        Ok(StorageNode {
            home: path,
            peer,
            storage,
            rt: Some(rt),
        })
    }

    pub async fn transport(&self) -> meshsync_transport::Transport {
        self.storage.lock().await.transport().clone()
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Node {
    /// An invite for a storage peer, made by this node.
    pub async fn invite_storage(&self) -> anyhow::Result<String> {
        let device = self.device().clone();
        self.run(
            async move { mesh::invite(&device, Role::Storage, Duration::from_secs(600)).await },
        )
        .await
    }
}

impl Drop for Node {
    /// A run that ends early (an error) drops its nodes inside the async harness, where a
    /// runtime may not block: each is shut down in the background.
    fn drop(&mut self) {
        if let Some((_, rt)) = self.running.take() {
            rt.shutdown_background();
        }
    }
}
