//! `/meshsync/peers/1`: members tell each other where the other members listen, so that once A
//! has paired with B and with C, B and C find each other with no help from the user (and
//! without multicast, which some networks drop).

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use crate::{frame, rpc, Transport};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshsync/peers/1");
const ROUND: Duration = Duration::from_secs(2);
const MAX_PEERS: usize = 1024;

/// Connected members and their announced listen addresses.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct PeerList {
    pub peers: Vec<(Vec<u8>, Vec<String>)>,
}

/// Serves the peer list and, every couple of seconds, asks connected members for theirs and
/// dials the members it does not yet reach.
pub fn spawn_exchange(transport: Transport) {
    let server = transport.clone();
    let result = rpc::serve(&transport, PROTOCOL, move |_peer, _request| {
        let server = server.clone();
        async move {
            let peers = server
                .connected()
                .await
                .into_iter()
                .filter(|(peer, _)| server.allowed().contains(peer))
                .take(MAX_PEERS)
                .map(|(peer, addrs)| {
                    (
                        peer.to_bytes(),
                        addrs.iter().map(|a| a.to_string()).collect(),
                    )
                })
                .collect();
            Some(frame::encode(&PeerList { peers }))
        }
    });
    if let Err(error) = result {
        tracing::warn!(%error, "peer exchange not started");
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ROUND).await;
            let me = transport.local_peer_id();
            for peer in transport.connected_peers().await {
                let Ok(reply) = rpc::request(&transport, peer, PROTOCOL, &[]).await else {
                    continue;
                };
                let Ok(list) = frame::decode::<PeerList>(&reply) else {
                    tracing::info!(%peer, "malformed peer list ignored");
                    continue;
                };
                for (bytes, addrs) in list.peers.into_iter().take(MAX_PEERS) {
                    let Ok(other) = PeerId::from_bytes(&bytes) else {
                        continue;
                    };
                    if other == me || !transport.allowed().contains(&other) {
                        continue;
                    }
                    let addrs: Vec<Multiaddr> =
                        addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    if !addrs.is_empty() {
                        transport.dial_peer(other, addrs).await;
                    }
                }
            }
        }
    });
}
