//! A real storage peer (in this process, on loopback TCP with Noise) against members and
//! others speaking `/meshsync/sealed/1` to it directly: it stores only sealed changes signed by
//! a writing member, refuses unsigned, forged, strangers' and removed devices' data, takes
//! chunks only from writing members, and lets removed devices in nowhere.

mod common;

use std::time::Duration;

use meshsync_crdt::{
    Action, DeviceKeys, Epoch, MembershipLog, MeshKey, Role, SealedChange, SealedName,
};
use meshsync_node::home::Home;
use meshsync_node::net::Network;
use meshsync_node::protocol::{ByteBuf, SignedRelease, StoreReply, StoreRequest};
use meshsync_node::state::{Batch, State};
use meshsync_node::storage_peer as storage;
use meshsync_transport::{rpc, Config, Multiaddr, Transport};

async fn ask(client: &Transport, storage: &DeviceKeys, request: &StoreRequest) -> StoreReply {
    let peer = storage.device_id().to_peer_id();
    let bytes = rpc::request(
        client,
        peer,
        rpc::SEALED,
        &postcard::to_stdvec(request).unwrap(),
    )
    .await
    .unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

async fn client(keys: &DeviceKeys, storage: &DeviceKeys, at: &Multiaddr) -> (Transport, bool) {
    let t = Transport::start(Config::tcp_and_quic(keys.libp2p_keypair(), "127.0.0.1")).unwrap();
    let peer = storage.device_id().to_peer_id();
    t.set_allowed([peer]).await;
    t.dial(at.clone()).await.unwrap();
    let connected = t.wait_connected(peer, Duration::from_secs(5)).await;
    // Give the storage peer's gate its moment to refuse.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = t.connected_peers().await.contains(&peer);
    (t, connected && still)
}

fn name(key: &MeshKey, log: &MembershipLog, device: &DeviceKeys, text: &str) -> SealedName {
    SealedName::seal(key, &log.mesh(), &device.device_id(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_peer_stores_only_what_writing_members_signed() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::locate(Some(dir.path().join("s"))).unwrap();
    let s_keys = home.init("nas", Role::Storage).unwrap();
    let (admin, reader, gone, stranger) = (
        DeviceKeys::generate(),
        DeviceKeys::generate(),
        DeviceKeys::generate(),
        DeviceKeys::generate(),
    );
    let key = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&admin, "laptop", &key);
    for (device, role) in [
        (&s_keys, Role::Storage),
        (&reader, Role::ReadOnly),
        (&gone, Role::Device),
    ] {
        let action = Action::Add {
            device: device.device_id(),
            role,
            name: name(&key, &log, device, "member"),
            kem: Some(device.kem_public()),
            wrapped: None,
        };
        log.append(&admin, action).unwrap();
    }
    // Sealed by `gone` while it was a member, then it is removed.
    let before_removal = SealedChange::seal(mesh, &key, &gone, 1, b"written before removal");
    log.append(
        &admin,
        Action::Remove {
            device: gone.device_id(),
            wraps: vec![],
            chain: vec![],
            wipe: false,
        },
    )
    .unwrap();
    State::open(home.path())
        .unwrap()
        .commit(Batch {
            mesh: Some(mesh),
            membership: Some(log.save()),
            ..Batch::default()
        })
        .unwrap();

    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
    let s = storage::start(home, Network::tcp(vec![listen], false))
        .await
        .unwrap();
    let at = s.lock().await.transport().wait_listening().await[0].clone();

    let (a, in_a) = client(&admin, &s_keys, &at).await;
    assert!(in_a, "a member is let in");
    let good = SealedChange::seal(mesh, &key, &admin, 1, b"an index change");
    let mut forged = SealedChange::seal(mesh, &key, &admin, 2, b"another");
    forged.tamper();
    let theirs = SealedChange::seal(mesh, &key, &stranger, 1, b"not a member");
    let read_only = SealedChange::seal(mesh, &key, &reader, 1, b"read-only members do not write");
    let put =
        |blobs: Vec<Vec<u8>>| StoreRequest::Put(blobs.into_iter().map(ByteBuf::from).collect());

    match ask(&a, &s_keys, &put(vec![good.encode()])).await {
        StoreReply::Stored(1) => {}
        other => panic!("a member's signed change was not stored: {other:?}"),
    }
    for (what, blob) in [
        (
            "a change whose ciphertext was altered after signing",
            forged.encode(),
        ),
        ("a stranger's change", theirs.encode()),
        ("a read-only member's change", read_only.encode()),
        ("a removed device's change", before_removal.encode()),
        ("garbage", b"not a sealed change at all".to_vec()),
    ] {
        match ask(&a, &s_keys, &put(vec![blob])).await {
            StoreReply::Refused(_) => {}
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    match ask(
        &a,
        &s_keys,
        &StoreRequest::Heads {
            mine: Some(good.head()),
        },
    )
    .await
    {
        StoreReply::Heads(held) => {
            assert_eq!(held.len(), 1, "{held:?}");
            assert_eq!(held.get(&admin.device_id()), Some(&1));
        }
        other => panic!("{other:?}"),
    }
    match ask(
        &a,
        &s_keys,
        &StoreRequest::Get {
            after: Default::default(),
        },
    )
    .await
    {
        StoreReply::Changes { blobs, more } => {
            assert!(!more);
            assert_eq!(blobs.len(), 1);
            assert_eq!(SealedChange::decode(&blobs[0]).unwrap(), good);
        }
        other => panic!("{other:?}"),
    }
    let chunk = vec![(
        meshsync_crdt::ChunkId([9; 32]),
        ByteBuf::from(vec![1u8; 1000]),
    )];
    assert!(matches!(
        ask(&a, &s_keys, &StoreRequest::PutChunks(chunk.clone())).await,
        StoreReply::Stored(1)
    ));
    let oversized = vec![(
        meshsync_crdt::ChunkId([8; 32]),
        ByteBuf::from(vec![0u8; storage::MAX_SEALED_CHUNK + 1]),
    )];
    assert!(matches!(
        ask(&a, &s_keys, &StoreRequest::PutChunks(oversized)).await,
        StoreReply::Refused(_)
    ));

    // A read-only member is let in (it may read) but may not store chunks.
    let (r, in_r) = client(&reader, &s_keys, &at).await;
    assert!(in_r);
    assert!(matches!(
        ask(&r, &s_keys, &StoreRequest::PutChunks(chunk)).await,
        StoreReply::Refused(_)
    ));
    // A forged release (signed by someone else than its claimed author) deletes nothing.
    let mut release = SignedRelease::sign(mesh, &stranger, vec![meshsync_crdt::ChunkId([9; 32])]);
    release.author = admin.device_id();
    assert!(matches!(
        ask(&a, &s_keys, &StoreRequest::Release(release)).await,
        StoreReply::Refused(_)
    ));
    assert!(matches!(
        ask(&a, &s_keys, &StoreRequest::Missing(vec![meshsync_crdt::ChunkId([9; 32])])).await,
        StoreReply::Missing(m) if m.is_empty()
    ));

    // The removed device and a stranger do not get past the handshake.
    let (_, in_gone) = client(&gone, &s_keys, &at).await;
    assert!(!in_gone, "a removed device was let in");
    let (_, in_stranger) = client(&stranger, &s_keys, &at).await;
    assert!(!in_stranger, "a stranger was let in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_deletes_a_chunk_only_when_no_other_author_references_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::locate(Some(dir.path().join("s"))).unwrap();
    let s_keys = home.init("nas", Role::Storage).unwrap();
    let (laptop, desktop) = (DeviceKeys::generate(), DeviceKeys::generate());
    let key = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&laptop, "laptop", &key);
    common::add_members(
        &mut log,
        &laptop,
        &key,
        &[(&s_keys, Role::Storage), (&desktop, Role::Device)],
    );
    common::commit_mesh(home.path(), &mut log);
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
    let s = storage::start(home, Network::tcp(vec![listen], false))
        .await
        .unwrap();
    let at = s.lock().await.transport().wait_listening().await[0].clone();
    let (l, _) = client(&laptop, &s_keys, &at).await;
    let (d, _) = client(&desktop, &s_keys, &at).await;
    let shared = meshsync_crdt::ChunkId([5; 32]);
    let missing = StoreRequest::Missing(vec![shared]);
    // The laptop pushes the chunk; the desktop, which has the same chunk in a file of its own,
    // finds it held and pushes nothing.
    assert!(
        matches!(ask(&l, &s_keys, &missing).await, StoreReply::Missing(m) if m == vec![shared])
    );
    let put = StoreRequest::PutChunks(vec![(shared, ByteBuf::from(vec![3u8; 2000]))]);
    assert!(matches!(
        ask(&l, &s_keys, &put).await,
        StoreReply::Stored(1)
    ));
    assert!(matches!(ask(&d, &s_keys, &missing).await, StoreReply::Missing(m) if m.is_empty()));
    // The laptop's version expires: its release leaves the desktop's chunk in place.
    let release =
        |keys: &DeviceKeys| StoreRequest::Release(SignedRelease::sign(mesh, keys, vec![shared]));
    assert!(matches!(
        ask(&l, &s_keys, &release(&laptop)).await,
        StoreReply::Released { chunks: 0, .. }
    ));
    assert!(matches!(ask(&l, &s_keys, &missing).await, StoreReply::Missing(m) if m.is_empty()));
    // The laptop asked again, so it references it again; once both let go, it is deleted.
    ask(&l, &s_keys, &release(&laptop)).await;
    assert!(matches!(
        ask(&d, &s_keys, &release(&desktop)).await,
        StoreReply::Released { chunks: 1, .. }
    ));
    assert!(
        matches!(ask(&d, &s_keys, &missing).await, StoreReply::Missing(m) if m == vec![shared])
    );
}
