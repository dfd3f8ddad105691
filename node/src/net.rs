//! The network side shared by both kinds of node (device and storage peer): which transport to
//! start, which peers may connect, and which addresses to dial besides what mDNS finds.

use std::collections::HashSet;

use meshsync_crdt::{DeviceId, DeviceKeys, MembershipLog, Role};
use meshsync_transport::{Config, Multiaddr, PeerId, Transport};

use crate::home::Home;
use crate::state::{State, PEER_ADDRS};

/// The port a node listens on when it is given no address (TCP and QUIC).
pub const DEFAULT_PORT: u16 = 22000;

/// How a node reaches the others.
#[derive(Clone, Debug)]
pub struct Network {
    /// Addresses to listen on; empty: TCP and QUIC on every interface, port 22000 (or any
    /// free port if that one is taken).
    pub listen: Vec<Multiaddr>,
    /// Announce and look for nodes on the LAN.
    pub mdns: bool,
    /// libp2p's in-memory transport (with the same Noise and Yamux upgrades) instead of TCP
    /// and QUIC: many nodes in one process, for simulations and tests.
    pub memory: bool,
    /// With `memory`: slow and lossy links (simulations).
    pub shape: Option<meshsync_transport::shape::LinkShape>,
}

impl Network {
    /// TCP and QUIC on `listen` (see [`Network::listen`]).
    pub fn tcp(listen: Vec<Multiaddr>, mdns: bool) -> Network {
        Network {
            listen,
            mdns,
            memory: false,
            shape: None,
        }
    }

    /// The in-memory transport at a fresh address.
    pub fn memory() -> Network {
        Network {
            listen: Vec::new(),
            mdns: false,
            memory: true,
            shape: None,
        }
    }

    /// The IP the pairing endpoint listens on: the node's own listen IP (loopback when it is),
    /// else every interface.
    pub fn pair_ip(&self) -> String {
        if self.memory {
            return "127.0.0.1".into();
        }
        self.listen
            .iter()
            .flat_map(|a| a.iter())
            .find_map(|p| match p {
                meshsync_transport::Protocol::Ip4(ip) => Some(ip.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "0.0.0.0".to_string())
    }
}

/// Starts the node's transport as `network` says.
pub fn start_transport(keys: &DeviceKeys, network: &Network) -> anyhow::Result<Transport> {
    if network.memory {
        let config = Config {
            shape: network.shape,
            ..Config::memory(keys.libp2p_keypair())
        };
        return Ok(Transport::start(config)?);
    }
    let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), "0.0.0.0");
    config.mdns = network.mdns;
    if !network.listen.is_empty() {
        config.listen = network.listen.clone();
        return Ok(Transport::start(config)?);
    }
    config.listen = vec![
        format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}").parse()?,
        format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1").parse()?,
    ];
    match Transport::start(config) {
        Ok(t) => Ok(t),
        Err(error) => {
            tracing::warn!(%error, "default port {DEFAULT_PORT} taken; using any free port");
            let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), "0.0.0.0");
            config.mdns = network.mdns;
            Ok(Transport::start(config)?)
        }
    }
}

/// The peer IDs of every member but `me`: who may connect.
pub fn other_members(log: &MembershipLog, me: &DeviceId) -> Vec<PeerId> {
    log.view()
        .members
        .keys()
        .filter(|d| *d != me)
        .map(|d| d.to_peer_id())
        .collect()
}

/// The other devices of the mesh (not storage peers): they hold the mesh key.
pub fn key_holders(log: &MembershipLog, me: &DeviceId) -> HashSet<PeerId> {
    let view = log.view();
    (view.members.iter())
        .filter(|(d, m)| *d != me && m.role == Role::Device)
        .map(|(d, _)| d.to_peer_id())
        .collect()
}

/// Removed devices that accepted remote wipe when they joined: let through the door, should
/// they come back, to hear of their removal and nothing else.
pub fn notice_peers(log: &MembershipLog) -> Vec<PeerId> {
    let view = log.view();
    view.removed
        .keys()
        .filter(|d| view.accepts_wipe.contains(d))
        .map(|d| d.to_peer_id())
        .collect()
}

/// The addresses to dial besides what mDNS finds: `peers` from config.toml and the
/// addresses of the inviter this home joined through.
pub fn static_addrs(home: &Home, state: &State) -> Vec<Multiaddr> {
    let mut addrs: Vec<String> = home.config().map(|c| c.peers).unwrap_or_default();
    addrs.extend(state.get(&PEER_ADDRS).unwrap_or_default());
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

/// Dials each of `addrs` (failures are logged: the peer may be off).
pub async fn dial_all(transport: &Transport, addrs: Vec<Multiaddr>) {
    for addr in addrs {
        if let Err(error) = transport.dial(addr.clone()).await {
            tracing::debug!(%addr, %error, "cannot dial static peer");
        }
    }
}

/// Dials the addresses an invite named (`Multiaddr` text; unparsable ones are skipped).
pub async fn dial_text(transport: &Transport, addrs: &[String]) {
    dial_all(
        transport,
        addrs.iter().filter_map(|a| a.parse().ok()).collect(),
    )
    .await;
}
