//! Sixteen real nodes in one process: each knows only node 0, and peer exchange must connect
//! every member to every other.

use std::time::Duration;

use meshsync_simulations::Mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_members_knowing_one_peer_form_a_full_mesh() {
    let mesh = Mesh::start(16).await;
    let took = mesh.wait_full_mesh(Duration::from_secs(60)).await;
    assert!(
        took.is_some(),
        "only {} of {} ordered pairs connected",
        mesh.connected_pairs().await,
        16 * 15
    );
}
