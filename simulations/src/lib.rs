//! Simulations: many real meshsync nodes in one process, each a full libp2p swarm with Noise
//! and Yamux over libp2p's in-memory transport, so mesh-wide behaviour (discovery, state
//! spreading) can be measured at sizes a handful of machines cannot reach.
//!
//! - [`sim`]: the real device engine on many nodes under a seeded schedule of partitions and
//!   concurrent edits, with the checks that no write is lost and every folder converges
//!   (`meshsync-sim`).
//!
//! [`Mesh::start`] makes `n` members that all allow one another, each told only the address of
//! node 0 (as if each had paired with it); peer exchange must do the rest.

pub mod plot;
pub mod sim;

use std::time::{Duration, Instant};

use meshsync_crdt::DeviceKeys;
use meshsync_transport::{Config, PeerId, Transport};

/// `n` in-memory nodes of one mesh.
pub struct Mesh {
    pub keys: Vec<DeviceKeys>,
    pub nodes: Vec<Transport>,
}

impl Mesh {
    /// Starts `n` members; every node but the first dials only the first.
    pub async fn start(n: usize) -> Mesh {
        let keys: Vec<DeviceKeys> = (0..n).map(|_| DeviceKeys::generate()).collect();
        let ids: Vec<PeerId> = keys.iter().map(|k| k.device_id().to_peer_id()).collect();
        let mut nodes = Vec::with_capacity(n);
        for (i, k) in keys.iter().enumerate() {
            let node = Transport::start(Config::memory(k.libp2p_keypair()))
                .expect("in-memory transport starts");
            node.set_allowed(
                ids.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p),
            )
            .await;
            nodes.push(node);
        }
        let first = nodes[0].wait_listening().await;
        for node in &nodes[1..] {
            for addr in &first {
                let _ = node.dial(addr.clone()).await;
            }
        }
        Mesh { keys, nodes }
    }

    /// How many (ordered) pairs of nodes are connected.
    pub async fn connected_pairs(&self) -> usize {
        let mut pairs = 0;
        for node in &self.nodes {
            pairs += node.connected().await.len();
        }
        pairs
    }

    /// Waits until every node is connected to every other; returns how long that took.
    pub async fn wait_full_mesh(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let want = self.nodes.len() * (self.nodes.len() - 1);
        while start.elapsed() < timeout {
            if self.connected_pairs().await >= want {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}
