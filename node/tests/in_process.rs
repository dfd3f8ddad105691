//! The device engine as a library: two real devices in one process, each with its own home
//! and folder on disk, over libp2p's in-memory transport (Noise and Yamux as on TCP). One
//! invites, the other joins, and a file written on one arrives on the other — what the
//! simulations build on.

use std::time::{Duration, Instant};

use meshsync_crdt::Role;
use meshsync_node::device::{self, folder, mesh, scan, Shared};
use meshsync_node::home::Home;
use meshsync_node::net::Network;

async fn device(dir: &std::path::Path, name: &str) -> Shared {
    let home = Home::locate(Some(dir.join(name))).unwrap();
    home.init(name, Role::Device).unwrap();
    device::start(home, Network::memory()).await.unwrap()
}

/// `joiner` joins `admin`'s mesh as a device.
async fn pair(admin: &Shared, joiner: &Shared) {
    let code = mesh::invite(admin, Role::Device, Duration::from_secs(60))
        .await
        .unwrap();
    mesh::join(joiner, &code).await.unwrap();
}

/// `b` joins `a`'s mesh, and both sync a folder: `fa` on `a`, `fb` on `b`.
async fn pair_and_share(
    a: &Shared,
    fa: &std::path::Path,
    b: &Shared,
    fb: &std::path::Path,
) -> meshsync_crdt::FolderId {
    pair(a, b).await;
    let folder = folder::add(a, fa, None).await.unwrap();
    folder::add(b, fb, Some(folder.clone())).await.unwrap();
    folder
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_in_one_process_pair_and_sync_over_the_memory_transport() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (fa, fb) = (dir.path().join("A"), dir.path().join("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();

    let folder = pair_and_share(&a, &fa, &b, &fb).await;

    std::fs::write(fa.join("hello.txt"), b"from a, in process").unwrap();
    let options = scan::ScanOptions {
        requested: true,
        ..Default::default()
    };
    scan::scan(&a, &folder, options).await.unwrap();
    eventually("the file reaches b", || {
        std::fs::read(fb.join("hello.txt")).is_ok_and(|d| d == b"from a, in process")
    })
    .await;
    let status = device::status::status(&b).await;
    assert_eq!(status.peers.len(), 1);
    assert!(status.peers[0].connected, "{status:?}");
    assert!(status.peers[0].bytes_in > 0, "{status:?}");
}

/// A quiet index leaves memory shard by shard and answers from its saves in the state: a device
/// that joins afterwards is sent every record, and an edit reaches devices whose shards were
/// all unloaded (each loads back only the shards the edit touches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloaded_index_shards_serve_a_late_joiner_and_take_new_edits() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (fa, fb, fc) = (
        dir.path().join("A"),
        dir.path().join("B"),
        dir.path().join("C"),
    );
    for f in [&fa, &fb, &fc] {
        std::fs::create_dir_all(f).unwrap();
    }
    for i in 0..300 {
        let sub = fa.join(format!("d{}", i % 30));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let folder = pair_and_share(&a, &fa, &b, &fb).await;
    let options = scan::ScanOptions {
        requested: true,
        ..Default::default()
    };
    scan::scan(&a, &folder, options).await.unwrap();
    let has = |root: &std::path::Path, i: usize, text: &str| {
        std::fs::read_to_string(root.join(format!("d{}/f{i}", i % 30))).is_ok_and(|t| t == text)
    };
    eventually("b has every file", || {
        (0..300).all(|i| has(&fb, i, &format!("file {i}")))
    })
    .await;
    for (d, name) in [(&a, "a"), (&b, "b")] {
        eventually(&format!("{name}'s index unloaded"), || {
            d.try_lock().is_ok_and(|d| d.index_shards_in_memory() == 0)
        })
        .await;
    }

    let c = device(dir.path(), "c").await;
    pair(&a, &c).await;
    folder::add(&c, &fc, Some(folder.clone())).await.unwrap();
    eventually("c, joining late, has every file", || {
        (0..300).all(|i| has(&fc, i, &format!("file {i}")))
    })
    .await;

    std::fs::write(fa.join("d7/f7"), "edited on a").unwrap();
    scan::scan(&a, &folder, options).await.unwrap();
    eventually("the edit reaches b and c", || {
        has(&fb, 7, "edited on a") && has(&fc, 7, "edited on a")
    })
    .await;
    let loaded = b.lock().await.index_shards_in_memory();
    assert!(loaded <= 4, "the edit loaded {loaded} of b's shards");
}
