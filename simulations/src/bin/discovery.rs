//! `cargo run --release -p meshsync-simulations --bin discovery -- [N...]`: how long N in-memory
//! members, each told only node 0's address, take to connect all-to-all (default 16 64).

use std::time::Duration;

use meshsync_simulations::Mesh;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![16, 64]
    } else {
        sizes
    };
    for n in sizes {
        let mesh = Mesh::start(n).await;
        match mesh.wait_full_mesh(Duration::from_secs(120)).await {
            Some(took) => println!(
                "{n} members: full mesh ({} connections) in {:.2} s",
                n * (n - 1) / 2,
                took.as_secs_f64()
            ),
            None => println!(
                "{n} members: only {} of {} ordered pairs after 120 s",
                mesh.connected_pairs().await,
                n * (n - 1)
            ),
        }
    }
}
