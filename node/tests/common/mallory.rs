//! Mallory: someone holding a member's stolen keys, speaking the wire protocol to a real
//! device. The mesh is three real devices in one process over the in-memory transport (Noise
//! and Yamux as on TCP), each with its own home and folder on disk: the victim `v` (an admin),
//! a full member `m` and a read-only member `r`. Mallory sends what she likes from `m`'s or
//! `r`'s transport, signed with their keys — records no honest device would write, built with
//! `meshsync-crdt`'s `forge` feature — and `m`'s real chunk server serves what her records
//! name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshsync_crdt::index::{actor_for, ShardChange};
use meshsync_crdt::{
    ChunkListHash, DeviceKeys, FileKind, FileRecord, FolderId, FolderIndex, MembershipLog, Role,
    Signature,
};
use meshsync_node::control::DeviceStatus;
use meshsync_node::device::{self, folder, mesh, scan, Shared};
use meshsync_node::home::Home;
use meshsync_node::net::Network;
use meshsync_node::protocol::{self, SyncChanges, SyncReply, SyncRequest};
use meshsync_transport::PeerId;

pub const LONG: Duration = Duration::from_secs(30);

/// The three devices and their folders.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub v: Shared,
    pub m: Shared,
    pub r: Shared,
    pub fv: PathBuf,
    pub fm: PathBuf,
    pub folder: FolderId,
    /// A directory beside the folders that nothing may ever write into.
    pub outside: PathBuf,
    honest: std::sync::atomic::AtomicUsize,
}

/// A fresh device with its home at `dir/name`.
pub async fn start(dir: &Path, name: &str) -> Shared {
    let home = Home::locate(Some(dir.join(name))).unwrap();
    home.init(name, Role::Device).unwrap();
    device::start(home, Network::memory()).await.unwrap()
}

pub fn requested() -> scan::ScanOptions {
    scan::ScanOptions {
        requested: true,
        ..Default::default()
    }
}

/// Waits (at most [`LONG`]) until `done` holds; false if it never did.
pub async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > LONG {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// `v`, `m` and `r` paired and syncing one folder, with `seed.txt` and `other.txt` written on
/// `m` and arrived on `v`.
pub async fn mesh() -> Mesh {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (v, m, r) = (
        start(dir.path(), "v").await,
        start(dir.path(), "m").await,
        start(dir.path(), "r").await,
    );
    for (joiner, role) in [(&m, Role::Device), (&r, Role::ReadOnly)] {
        let code = mesh::invite(&v, role, Duration::from_secs(60))
            .await
            .unwrap();
        mesh::join(joiner, &code).await.unwrap();
    }
    let (fv, fm, fr) = (
        dir.path().join("V"),
        dir.path().join("M"),
        dir.path().join("R"),
    );
    let outside = dir.path().join("outside");
    for path in [&fv, &fm, &fr, &outside] {
        std::fs::create_dir_all(path).unwrap();
    }
    let folder = folder::add(&v, &fv, None).await.unwrap();
    for (device, path) in [(&m, &fm), (&r, &fr)] {
        folder::add(device, path, Some(folder.clone()))
            .await
            .unwrap();
    }
    let mesh = Mesh {
        dir,
        v,
        m,
        r,
        fv,
        fm,
        folder,
        outside,
        honest: Default::default(),
    };
    mesh.write_on_m("seed.txt", b"seed content from m").await;
    mesh.write_on_m("other.txt", b"other content from m").await;
    mesh
}

impl Mesh {
    /// A new full device `name`, invited by `v`, syncing the folder at `dir/folder`.
    pub async fn join_device(&self, name: &str, folder: &str) -> (Shared, PathBuf) {
        let device = start(self.dir.path(), name).await;
        let code = mesh::invite(&self.v, Role::Device, Duration::from_secs(60))
            .await
            .unwrap();
        mesh::join(&device, &code).await.unwrap();
        let path = self.dir.path().join(folder);
        std::fs::create_dir_all(&path).unwrap();
        folder::add(&device, &path, Some(self.folder.clone()))
            .await
            .unwrap();
        (device, path)
    }

    /// Writes `name` on `m`, scans, and waits until `v` has it.
    pub async fn write_on_m(&self, name: &str, content: &[u8]) {
        std::fs::write(self.fm.join(name), content).unwrap();
        scan::scan(&self.m, &self.folder, requested())
            .await
            .unwrap();
        let at = self.fv.join(name);
        assert!(
            eventually(|| std::fs::read(&at).is_ok_and(|d| d == content)).await,
            "{name} never reached v"
        );
    }

    /// The honest sync still works: a new file written on `m` reaches `v`.
    pub async fn still_syncs(&self) {
        let n = self
            .honest
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("honest-{n}.txt");
        self.write_on_m(&name, format!("honest write {n}").as_bytes())
            .await;
        assert_eq!(
            std::fs::read_dir(&self.outside).unwrap().count(),
            0,
            "something was written outside the folders"
        );
    }

    pub async fn status(&self) -> DeviceStatus {
        device::status::status(&self.v).await
    }

    /// Waits until `v`'s status names `path` as not written or unavailable.
    pub async fn reported(&self, path: &str) -> DeviceStatus {
        let start = Instant::now();
        loop {
            let status = self.status().await;
            let f = &status.folders[0];
            if f.not_written.iter().any(|n| n.path == path)
                || f.unavailable.iter().any(|p| p == path)
            {
                return status;
            }
            assert!(start.elapsed() < LONG, "{path} never reported: {status:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A copy of a device's keys, as a thief who took its disk has them.
pub fn stolen(keys: &DeviceKeys) -> DeviceKeys {
    DeviceKeys::from_seeds(keys.signing_seed(), keys.kem_seed())
}

/// Mallory, sending from one member's transport with its keys.
pub struct Mallory {
    pub via: Shared,
    pub victim: PeerId,
    pub folder: FolderId,
    pub log: MembershipLog,
    /// Her own replica of the folder's index (fed by pulls from the victim), in which she
    /// forges.
    pub index: FolderIndex,
    /// The keys her changes are signed with (`via`'s, unless [`Mallory::writing_as`]).
    pub keys: DeviceKeys,
}

impl Mallory {
    /// Mallory with `via`'s keys, caught up with `victim`.
    pub async fn new(via: &Shared, victim: &Shared, folder: &FolderId) -> Mallory {
        let victim = victim.lock().await.transport().local_peer_id();
        let (mesh, keys) = {
            let d = via.lock().await;
            (d.log().mesh(), stolen(d.keys()))
        };
        let me = keys.device_id();
        let mut mallory = Mallory {
            via: via.clone(),
            victim,
            folder: folder.clone(),
            log: MembershipLog::empty(mesh),
            index: FolderIndex::new(mesh, folder.clone()).with_actor(actor_for(&me, 0xbad)),
            keys,
        };
        mallory.catch_up().await;
        mallory
    }

    /// Pulls everything the victim has into her log and index.
    pub async fn catch_up(&mut self) {
        let pull = SyncRequest::Pull {
            membership: Vec::new(),
            folders: vec![(self.folder.clone(), BTreeMap::new())],
        };
        let SyncReply::Changes(changes) = self.request(&pull).await else {
            panic!("the victim answers a member's pull");
        };
        self.log.apply(&changes.membership).unwrap();
        for (_, shard_changes) in changes.folders {
            let report = self.index.apply(self.log.view(), shard_changes).unwrap();
            assert!(report.refused.is_empty(), "{:?}", report.refused);
        }
        self.index.take_local_changes();
    }

    /// Mallory making changes as another device (whose keys she holds too), still sending
    /// from the member she came in through: a relay of that device's changes.
    pub fn writing_as(mut self, keys: &DeviceKeys) -> Mallory {
        self.index = self.index.with_actor(actor_for(&keys.device_id(), 0xbad));
        self.keys = stolen(keys);
        self
    }

    /// Mallory writing as incarnation `n` of her keys' device: 0 is the device's own actor,
    /// so her next change in a shard takes the sequence number the device's next one will.
    pub fn in_incarnation(mut self, n: u32) -> Mallory {
        self.index = self.index.with_actor(actor_for(&self.keys.device_id(), n));
        self
    }

    /// Puts each record as it is, one signed change per record (see `FolderIndex::forge_put`).
    pub fn forge(&mut self, records: &[FileRecord]) -> Vec<ShardChange> {
        self.index.forge_put(&self.keys, records)
    }

    /// Sends `request` to the victim. A connection closed under the request (the mesh may
    /// redial, and a duplicate connection goes) is no answer: it is sent again, a few times,
    /// so a refusal is never mistaken for a failure to deliver, nor the other way round.
    pub async fn request(&self, request: &SyncRequest) -> SyncReply {
        let transport = self.via.lock().await.transport().clone();
        let mut tries = 0;
        loop {
            match protocol::doc(&transport, self.victim, request).await {
                Ok(reply) => return reply,
                Err(error) if tries < 3 => {
                    tries += 1;
                    eprintln!("the victim did not answer ({error:#}); again");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(error) => panic!("the victim answers: {error:#}"),
            }
        }
    }

    /// Pushes index changes of the folder.
    pub async fn push(&self, changes: Vec<ShardChange>) -> SyncReply {
        let push = SyncChanges {
            folders: vec![(self.folder.clone(), changes)],
            ..SyncChanges::default()
        };
        self.request(&SyncRequest::Push(push)).await
    }

    /// A record of `path` with the content of `like` (a path the victim has), signed with her
    /// keys: version one above what she knows, unless `version` says otherwise.
    pub async fn record(&self, path: &str, kind: FileKind, like: &str) -> FileRecord {
        let content = self.index.get(like).expect("a known path").winner;
        let version = self.index.get(path).map_or(0, |s| s.winner.version) + 1;
        let record = FileRecord {
            path: path.into(),
            version,
            kind,
            size: content.size,
            mode: 0o644,
            mtime_ns: content.mtime_ns + 1,
            deleted: false,
            chunks: content.chunks,
            author: content.author,
            epoch: self.log.view().epoch,
            signature: Signature::from_bytes(&[0; 64]),
        };
        self.sign(record).await
    }

    pub async fn sign(&self, record: FileRecord) -> FileRecord {
        let d = self.via.lock().await;
        record.forge_signature(d.keys(), &self.log.mesh(), &self.folder)
    }

    /// The chunk-list hash of `path` as she knows it.
    pub fn chunks_of(&self, path: &str) -> ChunkListHash {
        self.index.get(path).expect("a known path").winner.chunks
    }
}
