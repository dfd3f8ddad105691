//! The device engine as a library: two real devices in one process, each with its own home
//! and folder on disk, over libp2p's in-memory transport (Noise and Yamux as on TCP). One
//! invites, the other joins, and a file written on one arrives on the other — what the
//! simulations build on.

use std::time::{Duration, Instant};

use meshsync_crdt::Role;
use meshsync_node::device::{self, mesh, scan, Shared};
use meshsync_node::home::Home;
use meshsync_node::net::Network;

async fn device(dir: &std::path::Path, name: &str) -> Shared {
    let home = Home::locate(Some(dir.join(name))).unwrap();
    home.init(name, Role::Device).unwrap();
    device::start(home, Network::memory()).await.unwrap()
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

    let code = mesh::invite(&a, Role::Device, Duration::from_secs(60))
        .await
        .unwrap();
    mesh::join(&b, &code).await.unwrap();
    let folder = a.lock().await.add_folder(&fa, None).unwrap();
    b.lock()
        .await
        .add_folder(&fb, Some(folder.clone()))
        .unwrap();

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
