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

    // The new file's chunk, as m's chunk server serves it, opens with v's keys and with none
    // of the keys the removed device holds.
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
            fetched.data.clone(),
        );
        assert!(opened.is_err(), "epoch {} opens it", key.epoch());
    }
    let plain = content::open_chunk_in(&v_ring, None, &fetched.id, fetched.data).unwrap();
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
