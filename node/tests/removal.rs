//! Removing a device (a stolen laptop): three real devices in one process over the in-memory
//! transport (and a fourth, the stolen laptop). After `remove`, the removed device is disconnected and let in nowhere, the new
//! content the others write is sealed under a key it never held (shown by running the real
//! decryption code with every key it holds, on a chunk and on a sealed index change), a record it signs for the new epoch is refused
//! even when a member relays it, and the devices that stay keep syncing.

mod common;

use std::time::Duration;

use common::mallory::{eventually, mesh, stolen, Mallory};
use meshsync_crdt::FileKind;
use meshsync_node::chunks::content;
use meshsync_node::device::members;
use meshsync_node::protocol::{self, SyncRequest};
use meshsync_transport::chunks::{Answer, ChunkSource};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_cut_off_and_reads_nothing_new() {
    // v (admin), m and r stay; a fourth device, a writer, plays the stolen laptop.
    let mesh = mesh().await;
    let (thief, ft) = mesh.join_device("thief", "T").await;
    assert!(eventually(|| ft.join("seed.txt").exists()).await);
    let (v_peer, r_peer, r_id) = {
        let (v, t) = (mesh.v.lock().await, thief.lock().await);
        (
            v.transport().local_peer_id(),
            t.transport().local_peer_id(),
            t.keys().device_id(),
        )
    };
    // While it is a member, a change it signs (relayed by m) is taken: the harness below can
    // tell a refusal from a failure to deliver.
    let thief_keys = stolen(thief.lock().await.keys());
    let mut relay = Mallory::new(&mesh.m, &mesh.v, &mesh.folder)
        .await
        .writing_as(&thief_keys);
    let record = relay
        .record("from-the-laptop.txt", FileKind::File, "seed.txt")
        .await
        .forge_signature(&thief_keys, &relay.log.mesh(), &mesh.folder);
    let changes = relay.forge(&[record]);
    relay.push(changes).await;
    assert!(eventually(|| mesh.fv.join("from-the-laptop.txt").exists()).await);

    let prefix: String = r_id.to_string().chars().take(7).collect();
    let removed = members::remove(&mesh.v, &prefix, false).await.unwrap();
    assert_eq!(removed.device_id, r_id.to_string());
    assert_eq!(removed.name, "thief");
    assert_eq!(removed.epoch, 1);
    assert_eq!(removed.rekeyed, 2, "the new key goes to m and r");

    // Cut off: v and m drop r within seconds and keep it out.
    let v_transport = mesh.v.lock().await.transport().clone();
    let m_transport = mesh.m.lock().await.transport().clone();
    let r_transport = thief.lock().await.transport().clone();
    let mut dropped = false;
    for _ in 0..100 {
        let (v_peers, m_peers) = (
            v_transport.connected_peers().await,
            m_transport.connected_peers().await,
        );
        if !v_peers.contains(&r_peer) && !m_peers.contains(&r_peer) {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped, "the removed device is still connected");
    let pull = SyncRequest::Pull {
        membership: Vec::new(),
        folders: Vec::new(),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        protocol::doc(&r_transport, v_peer, &pull).await.is_err(),
        "the removed device still gets answers"
    );

    // Those who stay keep syncing, under the new key.
    mesh.still_syncs().await;
    let secret = b"written after the removal: for v and m only".to_vec();
    mesh.write_on_m("after.txt", &secret).await;
    assert!(!ft.join("after.txt").exists());
    let v_ring = {
        let v = mesh.v.lock().await;
        v.log().key_ring(v.keys())
    };
    assert_eq!(v_ring.current().unwrap().epoch().0, 1);

    // The new file's chunk: m's chunk server sends it to v, a device, in the clear (inside
    // Noise); sealed, as m serves it to anyone else and pushes it to storage peers, it opens
    // with v's keys and with none of the keys the removed device holds.
    let mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let list_hash = mallory.chunks_of("after.txt");
    let list = mesh
        .v
        .lock()
        .await
        .state()
        .chunk_list(&list_hash)
        .unwrap()
        .unwrap();
    let (sink, mut got) = tokio::sync::mpsc::channel(8);
    let m_peer = m_transport.local_peer_id();
    let ids: Vec<_> = list.iter().map(|c| c.id).collect();
    meshsync_transport::chunks::fetch(&v_transport, vec![m_peer], ids, sink).await;
    let fetched = got.recv().await.expect("m serves the chunk");
    assert!(
        matches!(fetched.answer, Answer::Plain(_)),
        "a device is sent chunks in the clear"
    );
    let sealed = mesh.m.lock().await.served().get(&fetched.id).unwrap();
    let plain = content::accept_received(&v_ring, &fetched.id, fetched.answer).unwrap();
    assert_eq!(&*plain, &secret[..]);
    let r_ring = {
        let t = thief.lock().await;
        t.log().key_ring(t.keys())
    };
    assert!(r_ring.get(meshsync_crdt::Epoch(1)).is_none());
    assert!(r_ring.get(meshsync_crdt::Epoch(0)).is_some());
    for key in r_ring.newest_first() {
        let opened = content::open_chunk(
            &key.chunk_key(),
            &key.chunk_id_key(),
            key.epoch(),
            &fetched.id,
            sealed.to_vec(),
        );
        assert!(opened.is_err(), "epoch {} opens it", key.epoch());
    }
    let plain = content::open_chunk_in(&v_ring, None, &fetched.id, sealed.to_vec()).unwrap();
    assert_eq!(&*plain, &secret[..]);
    // Nor the sealed index change m made for storage peers (names, sizes, chunk lists).
    let (m_id, sealed) = {
        let m = mesh.m.lock().await;
        let me = m.keys().device_id();
        (me, m.state().sealed_after(&me, 0, usize::MAX).unwrap())
    };
    let (_, newest) = sealed.last().expect("m sealed its changes");
    let newest = meshsync_crdt::SealedChange::decode(newest).unwrap();
    assert_eq!((newest.author, newest.epoch.0), (m_id, 1));
    for key in r_ring.newest_first() {
        assert!(newest.open(key).is_err(), "epoch {} opens it", key.epoch());
    }
    assert!(newest.open(v_ring.current().unwrap()).is_ok());

    // A change the removed device signs afterwards, relayed by m, is refused: whether its
    // record claims the new epoch or the old one it could still sign in (its cutoff).
    assert_eq!(removed.cut_off, 1);
    let mut relay = Mallory::new(&mesh.m, &mesh.v, &mesh.folder)
        .await
        .writing_as(&thief_keys);
    for (path, epoch) in [("from-the-thief.txt", 1), ("claims-epoch-0.txt", 0)] {
        let mut record = relay.record(path, FileKind::File, "seed.txt").await;
        record.epoch = meshsync_crdt::Epoch(epoch);
        let record = record.forge_signature(&thief_keys, &relay.log.mesh(), &mesh.folder);
        let changes = relay.forge(&[record]);
        relay.push(changes).await;
    }
    mesh.still_syncs().await;
    assert!(!mesh.fv.join("from-the-thief.txt").exists());
    assert!(!mesh.fv.join("claims-epoch-0.txt").exists());

    // A device that joins after the removal is wrapped only the new key, and still gets the
    // files written before it (their chunks sealed in epoch 0, whose key it reads through the
    // chain the removal holds).
    let (_late, fl) = mesh.join_device("late", "L").await;
    let seed = fl.join("seed.txt");
    assert!(
        eventually(|| std::fs::read(&seed).is_ok_and(|d| d == b"seed content from m")).await,
        "a file of epoch 0 never reached the late joiner"
    );
    let after = fl.join("after.txt");
    assert!(eventually(|| std::fs::read(&after).is_ok_and(|d| d == secret)).await);
}

/// Who each device lets in: `allowed[i]` for `devices[i]`.
async fn partition(devices: &[&meshsync_node::device::Shared], allowed: &[Vec<usize>]) {
    let mut peers = Vec::new();
    for d in devices {
        peers.push(d.lock().await.transport().local_peer_id());
    }
    for (d, allow) in devices.iter().zip(allowed) {
        let transport = d.lock().await.transport().clone();
        transport
            .set_allowed(allow.iter().map(|&i| peers[i]).collect::<Vec<_>>())
            .await;
    }
    for (i, d) in devices.iter().enumerate() {
        let transport = d.lock().await.transport().clone();
        for &j in &allowed[i] {
            let theirs = devices[j].lock().await.transport().clone();
            transport
                .dial_peer(peers[j], theirs.listen_addrs().await)
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_removed_device_made_through_a_member_that_had_not_heard_are_dropped_everywhere()
{
    // The stolen laptop t reaches only m, which has not heard of its removal: m takes what t
    // writes (a new file and an overwrite of seed.txt, claiming the old epoch as they may) and
    // writes on top. When m meets v again, v refuses t's late changes, m drops them with what
    // was built on them and writes its own again: every replica ends without them.
    let mesh = mesh().await;
    let (thief, ft) = mesh.join_device("thief", "T").await;
    assert!(eventually(|| ft.join("seed.txt").exists()).await);
    let (v, m, r) = (&mesh.v, &mesh.m, &mesh.r);
    let all = [v, m, r, &thief];
    // v and r on one side; m and t on the other.
    partition(&all, &[vec![2], vec![3], vec![0], vec![1]]).await;
    let prefix: String = {
        let t = thief.lock().await;
        t.keys().device_id().to_string().chars().take(7).collect()
    };
    let removed = members::remove(v, &prefix, false).await.unwrap();
    assert_eq!(removed.cut_off, 1);
    partition(&all, &[vec![2], vec![3], vec![0], vec![1]]).await; // the removal re-allowed m

    std::fs::write(
        ft.join("late.txt"),
        b"written by the thief after its removal",
    )
    .unwrap();
    std::fs::write(ft.join("seed.txt"), b"overwritten by the thief").unwrap();
    meshsync_node::device::scan::scan(&thief, &mesh.folder, common::mallory::requested())
        .await
        .unwrap();
    assert!(
        eventually(|| std::fs::read(mesh.fm.join("seed.txt"))
            .is_ok_and(|d| d == b"overwritten by the thief"))
        .await,
        "m (unaware) never took the thief's change"
    );
    assert!(mesh.fm.join("late.txt").exists());
    // m writes on top, unaware.
    std::fs::write(
        mesh.fm.join("late.txt"),
        b"m's edit on top of the thief's file",
    )
    .unwrap();
    std::fs::write(mesh.fm.join("mine.txt"), b"m's own, made while apart").unwrap();
    meshsync_node::device::scan::scan(m, &mesh.folder, common::mallory::requested())
        .await
        .unwrap();

    // m meets v and r again; t stays out.
    partition(&all, &[vec![1, 2], vec![0, 2], vec![0, 1], vec![]]).await;
    let seed_back = |root: &std::path::Path| {
        std::fs::read(root.join("seed.txt")).is_ok_and(|d| d == b"seed content from m")
    };
    assert!(
        eventually(|| seed_back(&mesh.fm)).await,
        "m kept the thief's overwrite"
    );
    assert!(seed_back(&mesh.fv));
    let mine = |root: &std::path::Path| {
        std::fs::read(root.join("mine.txt")).is_ok_and(|d| d == b"m's own, made while apart")
    };
    assert!(
        eventually(|| mine(&mesh.fv)).await,
        "m's own write was lost"
    );
    // m's edit of the thief's file is m's own write: written again, it reaches v too.
    let edit = |root: &std::path::Path| {
        std::fs::read(root.join("late.txt"))
            .is_ok_and(|d| d == b"m's edit on top of the thief's file")
    };
    assert!(eventually(|| edit(&mesh.fv)).await, "m's edit was lost");
    assert!(edit(&mesh.fm));
    mesh.still_syncs().await;
}
