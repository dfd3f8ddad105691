//! A storage peer that serves an author's change N without the ones before it is reported as
//! stale, and what it served is not taken: a real device (in process, in-memory transport)
//! against a hostile storage peer speaking `/meshsync/sealed/1` with real sealed changes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use meshsync_crdt::{DeviceKeys, Epoch, FolderId, MembershipLog, MeshKey, Role, SealedChange};
use meshsync_node::device;
use meshsync_node::home::Home;
use meshsync_node::net::Network;
use meshsync_node::protocol::{
    self, ByteBuf, SealedPayload, StoreReply, StoreRequest, SyncChanges, SyncReply, SyncRequest,
};
use meshsync_transport::{rpc, Config, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_peer_serving_only_change_n_is_reported_and_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::locate(Some(dir.path().join("b"))).unwrap();
    let b = home.init("bob", Role::Device).unwrap();
    let (a, s) = (DeviceKeys::generate(), DeviceKeys::generate());
    let key = MeshKey::generate(Epoch(0));
    let (mut log, mesh) = MembershipLog::create(&a, "alice", &key);
    common::add_members(
        &mut log,
        &a,
        &key,
        &[(&b, Role::Device), (&s, Role::Storage)],
    );
    common::commit_mesh(home.path(), &mut log);
    let bob = device::start(home, Network::memory()).await.unwrap();

    // Alice's third change, really signed by her; the storage peer holds (or shows) only it.
    let payload = postcard::to_stdvec(&SealedPayload {
        folder: FolderId::new("docs").unwrap(),
        changes: vec![],
        lists: vec![],
    })
    .unwrap();
    let third = SealedChange::seal(mesh, &key, &a, 3, &payload).encode();
    let storage = Transport::start(Config::memory(s.libp2p_keypair())).unwrap();
    storage.set_allowed([b.device_id().to_peer_id()]).await;
    protocol::serve(
        &storage,
        rpc::DOC,
        SyncReply::Refused,
        |_, request| async move {
            match request {
                SyncRequest::Pull { .. } => SyncReply::Changes(SyncChanges::default()),
                _ => SyncReply::Ok,
            }
        },
    )
    .unwrap();
    let author = a.device_id();
    protocol::serve(
        &storage,
        rpc::SEALED,
        StoreReply::Refused,
        move |_, request| {
            let third = third.clone();
            async move {
                match request {
                    StoreRequest::Heads { .. } => StoreReply::Heads(BTreeMap::from([(author, 3)])),
                    StoreRequest::Get { .. } => StoreReply::Changes {
                        blobs: vec![ByteBuf::from(third)],
                        more: false,
                    },
                    _ => StoreReply::Stored(0),
                }
            }
        },
    )
    .unwrap();
    let bob_addr = bob.lock().await.transport().wait_listening().await[0].clone();
    storage.dial(bob_addr).await.unwrap();

    let start = Instant::now();
    let reported = loop {
        let status = device::status::status(&bob).await;
        let reports: Vec<String> = status
            .storage
            .iter()
            .flat_map(|s| s.stale_reports.clone())
            .collect();
        if !reports.is_empty() || start.elapsed() > Duration::from_secs(20) {
            break reports;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        reported
            .iter()
            .any(|r| r.contains("skipped") && r.contains("1..2")),
        "{reported:?}"
    );
    // Not taken: what bob applied of alice did not move past the gap.
    let status = device::status::status(&bob).await;
    let holds = &status.storage[0];
    assert_eq!(holds.id, s.device_id().to_string());
    let applied = bob
        .lock()
        .await
        .state()
        .sealed_after(&author, 0, usize::MAX)
        .unwrap();
    assert!(applied.is_empty(), "a change after a gap was kept");
}
