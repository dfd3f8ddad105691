//! The door: a `NetworkBehaviour` that refuses every connection whose authenticated peer is not
//! in the allowed set, right after the Noise (or QUIC TLS) handshake and before any protocol
//! runs. The set is shared ([`Allowed`]) and updated live; the swarm task disconnects peers that
//! leave it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Who may connect: the current members (or, for a pairing endpoint, anyone).
#[derive(Clone, Debug, Default)]
pub struct Allowed {
    inner: Arc<RwLock<AllowedInner>>,
}

#[derive(Debug, Default)]
struct AllowedInner {
    anyone: bool,
    peers: HashSet<PeerId>,
    /// Removed devices let through the door for one thing only: to be told of their removal
    /// (see [`Allowed::set_notice`]). Not members: [`Allowed::contains`] says no.
    notice: HashSet<PeerId>,
}

impl Allowed {
    /// An allowed set that admits anybody who completes the handshake: only for the short-lived
    /// pairing endpoint, which serves nothing but `/meshsync/pair/1`.
    pub fn anyone() -> Self {
        let allowed = Allowed::default();
        allowed.inner.write().expect("allowed lock").anyone = true;
        allowed
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        let inner = self.inner.read().expect("allowed lock");
        inner.anyone || inner.peers.contains(peer)
    }

    /// Whether the door lets `peer` in: a member, or a removed device to be told of it.
    pub fn admits(&self, peer: &PeerId) -> bool {
        let inner = self.inner.read().expect("allowed lock");
        inner.anyone || inner.peers.contains(peer) || inner.notice.contains(peer)
    }

    /// Whether `peer` is let in only to be told of its removal.
    pub fn is_notice(&self, peer: &PeerId) -> bool {
        let inner = self.inner.read().expect("allowed lock");
        inner.notice.contains(peer) && !inner.peers.contains(peer)
    }

    /// Replaces the removed devices let in to hear of their removal (and nothing else: every
    /// protocol but the one that tells them refuses them, and the node neither pulls from nor
    /// fetches from them).
    pub fn set_notice(&self, peers: impl IntoIterator<Item = PeerId>) {
        self.inner.write().expect("allowed lock").notice = peers.into_iter().collect();
    }

    /// Replaces the set; returns the peers that were removed.
    pub fn set(&self, peers: impl IntoIterator<Item = PeerId>) -> Vec<PeerId> {
        let mut inner = self.inner.write().expect("allowed lock");
        let new: HashSet<PeerId> = peers.into_iter().collect();
        let removed = inner.peers.difference(&new).copied().collect();
        inner.peers = new;
        removed
    }

    pub fn peers(&self) -> Vec<PeerId> {
        self.inner
            .read()
            .expect("allowed lock")
            .peers
            .iter()
            .copied()
            .collect()
    }
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0} is not a member of this mesh")]
pub struct NotAMember(pub PeerId);

/// Events the gate reports.
#[derive(Debug)]
pub enum GateEvent {
    Refused { peer: PeerId, addr: Multiaddr },
}

/// The members-only gate.
pub struct Gate {
    allowed: Allowed,
    events: VecDeque<GateEvent>,
}

impl Gate {
    pub fn new(allowed: Allowed) -> Self {
        Gate {
            allowed,
            events: VecDeque::new(),
        }
    }

    fn check(&mut self, peer: PeerId, addr: &Multiaddr) -> Result<(), ConnectionDenied> {
        if self.allowed.admits(&peer) {
            Ok(())
        } else {
            self.events.push_back(GateEvent::Refused {
                peer,
                addr: addr.clone(),
            });
            Err(ConnectionDenied::new(NotAMember(peer)))
        }
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = GateEvent;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, remote_addr)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, addr)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(event) => Poll::Ready(ToSwarm::GenerateEvent(event)),
            None => Poll::Pending,
        }
    }
}
