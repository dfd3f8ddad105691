//! meshsync's transport: a members-only libp2p mesh on the LAN.
//!
//! This crate knows libp2p and bytes, never files. A [`Transport`] is one libp2p node:
//!
//! - **Transports**: TCP + Noise + Yamux and QUIC, or libp2p's in-memory transport (with the
//!   same Noise + Yamux upgrade) for simulations of many nodes in one process. Noise runs
//!   `Noise_XX_25519_AESGCM_SHA256` where both sides offer it ([`noise_config`]), else the
//!   stock `Noise_XX_25519_ChaChaPoly_SHA256`.
//! - **Members only** ([`gate`]): a connection from a peer outside the [`Allowed`] set is
//!   refused right after the handshake, before any protocol runs, and logged with its device ID.
//!   Removing a peer from the set disconnects it. Connections are limited per peer and in total.
//! - **Discovery**: mDNS on the LAN (optional), static addresses ([`Transport::dial`]), and
//!   [`peers`] exchange among members. No relay, DHT or bootstrap node.
//! - **Protocols**, all on libp2p streams with [`frame`]s that carry a size limit and a
//!   timeout: `/meshsync/doc/2` ([`rpc`]: one request, one reply, for state exchange),
//!   `/meshsync/chunks/1` ([`chunks`]), `/meshsync/peers/1` ([`peers`]) and `/meshsync/pair/1`
//!   ([`pair`], served only by a separate, short-lived pairing endpoint).
//!
//! ```no_run
//! # async fn demo(keys: meshsync_crdt::DeviceKeys) -> Result<(), meshsync_transport::TransportError> {
//! use meshsync_transport::{Config, Transport};
//! let transport = Transport::start(Config::tcp_and_quic(keys.libp2p_keypair(), "127.0.0.1"))?;
//! transport.allowed().set([/* members' peer IDs */]);
//! # Ok(()) }
//! ```

pub mod chunks;
pub mod frame;
pub mod gate;
pub mod limit;
pub mod pair;
pub mod peers;
pub mod rpc;
pub mod shape;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, noise, tcp, yamux, Swarm};
use meshsync_crdt::DeviceId;
use tokio::sync::{mpsc, oneshot};

pub use gate::Allowed;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId, StreamProtocol};

/// Why the transport could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("could not set up the transport: {0}")]
    Setup(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("the transport has stopped")]
    Stopped,
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
    #[error("cannot open a stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
}

/// How to build a [`Transport`].
pub struct Config {
    pub keypair: libp2p::identity::Keypair,
    pub listen: Vec<Multiaddr>,
    /// Use the in-memory transport instead of TCP and QUIC.
    pub memory: bool,
    pub mdns: bool,
    /// Who may connect; shared, so the caller can update it live.
    pub allowed: Allowed,
    pub max_connections_per_peer: u32,
    pub max_connections: u32,
    /// Serve and use `/meshsync/peers/1` (off for pairing endpoints).
    pub peer_exchange: bool,
    /// With the in-memory transport: slow and lossy links (simulations).
    pub shape: Option<shape::LinkShape>,
}

impl Config {
    /// TCP and QUIC on `ip`, on ports the system picks.
    pub fn tcp_and_quic(keypair: libp2p::identity::Keypair, ip: &str) -> Self {
        let listen = vec![
            format!("/ip4/{ip}/tcp/0")
                .parse()
                .expect("valid TCP multiaddr"),
            format!("/ip4/{ip}/udp/0/quic-v1")
                .parse()
                .expect("valid QUIC multiaddr"),
        ];
        Config {
            keypair,
            listen,
            memory: false,
            mdns: false,
            allowed: Allowed::default(),
            max_connections_per_peer: 4,
            max_connections: 256,
            peer_exchange: true,
            shape: None,
        }
    }

    /// The in-memory transport at a random address (for simulations).
    pub fn memory(keypair: libp2p::identity::Keypair) -> Self {
        let port = rand_port() | 1;
        Config {
            listen: vec![format!("/memory/{port}")
                .parse()
                .expect("valid memory multiaddr")],
            memory: true,
            ..Config::tcp_and_quic(keypair, "127.0.0.1")
        }
    }
}

/// A random memory-transport port.
fn rand_port() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    u64::from_le_bytes(bytes) >> 16
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: gate::Gate,
    limits: libp2p::connection_limits::Behaviour,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

/// Something that happened on the mesh.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        peer: PeerId,
        addr: Multiaddr,
    },
    Disconnected {
        peer: PeerId,
    },
    /// A non-member completed a handshake and was refused.
    Refused {
        peer: PeerId,
        addr: Multiaddr,
    },
    Listening {
        addr: Multiaddr,
    },
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    DialPeer(PeerId, Vec<Multiaddr>),
    Disconnect(PeerId),
    Connected(oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
}

/// Bytes that crossed the wire with each peer (meshsync protocol payloads).
#[derive(Default)]
pub struct Counters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// How long a peer that a request of its own cut off keeps its connection, for the answer
/// (see [`Transport::set_allowed_answering`]).
pub const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// A running libp2p node: a handle to its swarm task.
#[derive(Clone)]
pub struct Transport {
    local: PeerId,
    allowed: Allowed,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    events: Arc<tokio::sync::broadcast::Sender<Event>>,
    /// Peers this node has just cut off (see [`Transport::cut_off`]).
    cuts: Arc<tokio::sync::broadcast::Sender<PeerId>>,
    counters: Arc<std::sync::Mutex<HashMap<PeerId, Arc<Counters>>>>,
}

impl Transport {
    /// Builds the swarm, starts listening, and runs it on the current tokio runtime.
    pub fn start(config: Config) -> Result<Transport, TransportError> {
        let local = config.keypair.public().to_peer_id();
        let allowed = config.allowed.clone();
        let mut swarm = build_swarm(&config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| TransportError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        let control = swarm.behaviour().stream.new_control();
        let (commands, command_rx) = mpsc::channel(64);
        let (events, _) = tokio::sync::broadcast::channel(256);
        let events = Arc::new(events);
        let transport = Transport {
            local,
            allowed,
            control,
            commands,
            events: events.clone(),
            cuts: Arc::new(tokio::sync::broadcast::channel(64).0),
            counters: Arc::default(),
        };
        tokio::spawn(run_swarm(
            swarm,
            command_rx,
            events,
            transport.allowed.clone(),
        ));
        if config.peer_exchange {
            peers::spawn_exchange(transport.clone());
        }
        Ok(transport)
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// The shared set of peers allowed to connect. Removing a peer disconnects it.
    pub fn allowed(&self) -> &Allowed {
        &self.allowed
    }

    /// Replaces the allowed set and disconnects every peer that left it.
    pub async fn set_allowed(&self, peers: impl IntoIterator<Item = PeerId>) {
        for peer in self.allowed.set(peers) {
            self.disconnect(peer).await;
        }
    }

    /// [`set_allowed`](Self::set_allowed) for a membership change that a request from `asking`
    /// brought: if it cuts `asking` off (a device that left, telling this node so), the gate
    /// shuts at once (no new connection of it gets in, and every protocol handler refuses its
    /// streams) but its connection is closed [`ANSWER_GRACE`] later, so the answer it waits
    /// for still reaches it.
    pub async fn set_allowed_answering(
        &self,
        peers: impl IntoIterator<Item = PeerId>,
        asking: PeerId,
    ) {
        for peer in self.allowed.set(peers) {
            if peer == asking {
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ANSWER_GRACE).await;
                    this.disconnect(peer).await;
                });
            } else {
                self.disconnect(peer).await;
            }
        }
    }

    /// Resolves once this node cuts `peer` off (disallows or disconnects it). A request
    /// waiting on a stream to `peer` races this, so it ends at once instead of at its timeout:
    /// a closing connection waits for its streams, and a reply will not come. (A connection
    /// the other side closes ends its streams by itself.) Watches from the moment it is called.
    pub fn cut_off(&self, peer: PeerId) -> impl std::future::Future<Output = ()> + Send + 'static {
        use tokio::sync::broadcast::error::RecvError;
        let mut cuts = self.cuts.subscribe();
        async move {
            loop {
                match cuts.recv().await {
                    Ok(p) if p == peer => return,
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                    _ => {}
                }
            }
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A handle for opening and accepting protocol streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Dials an address (a static peer). Resolves when the dial was started.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), TransportError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial(addr.clone(), tx))
            .await
            .map_err(|_| TransportError::Stopped)?;
        rx.await
            .map_err(|_| TransportError::Stopped)?
            .map_err(|reason| TransportError::Listen { addr, reason })
    }

    /// Dials a known peer at any of `addrs` unless already connected.
    pub async fn dial_peer(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.commands.send(Command::DialPeer(peer, addrs)).await;
    }

    /// Closes every connection to `peer` without changing who is allowed (it may come back).
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.cuts.send(peer);
        let _ = self.commands.send(Command::Disconnect(peer)).await;
    }

    /// The peers connected now.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        self.connected().await.into_iter().map(|(p, _)| p).collect()
    }

    /// Connected members with the listen addresses they announced (a removed device let in
    /// only to hear of its removal is not one).
    pub async fn connected(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Connected(tx)).await.is_err() {
            return Vec::new();
        }
        let mut peers = rx.await.unwrap_or_default();
        peers.retain(|(peer, _)| self.allowed.contains(peer));
        peers
    }

    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Waits until at least one listen address is up and returns them all.
    pub async fn wait_listening(&self) -> Vec<Multiaddr> {
        for _ in 0..200 {
            let addrs = self.listen_addrs().await;
            if !addrs.is_empty() {
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Vec::new()
    }

    /// Waits until `peer` is connected, for at most `timeout`.
    pub async fn wait_connected(&self, peer: PeerId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.connected_peers().await.contains(&peer) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Byte counters for `peer` (payload bytes of meshsync protocols).
    pub fn counters(&self, peer: &PeerId) -> Arc<Counters> {
        self.counters
            .lock()
            .expect("counters lock")
            .entry(*peer)
            .or_default()
            .clone()
    }

    /// Totals per peer: (bytes in, bytes out).
    pub fn traffic(&self) -> BTreeMap<PeerId, (u64, u64)> {
        self.counters
            .lock()
            .expect("counters lock")
            .iter()
            .map(|(p, c)| {
                (
                    *p,
                    (
                        c.bytes_in.load(Ordering::Relaxed),
                        c.bytes_out.load(Ordering::Relaxed),
                    ),
                )
            })
            .collect()
    }
}

/// The Noise handshake a node offers: libp2p's XX handshake with AES-256-GCM as the channel's
/// cipher (`/noise-aesgcm`), and the stock one with ChaChaPoly (`/noise`), through a patched
/// libp2p-noise (`vendor/libp2p-noise/PATCHES.md`). A node whose CPU has AES instructions
/// proposes AES-GCM first when it dials: in the bulk sync bench, ChaChaPoly on the channel was
/// about a fifth of both daemons' CPU, AES-GCM there about a twentieth. One without proposes
/// ChaChaPoly first (faster in software). Either way both are accepted.
pub fn noise_config(key: &libp2p::identity::Keypair) -> Result<noise::Config, noise::Error> {
    Ok(noise::Config::new(key)?.with_aes_gcm(aes_in_hardware()))
}

/// Whether this CPU has AES and carry-less multiplication instructions (for GCM).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The largest body of a Yamux data frame: the most one Noise frame carries (65,535 bytes less
/// libp2p-noise's 1,024 reserved), so a bulk write goes out as few frames as the channel
/// allows. Yamux's default is 16 KiB: a 40 KB chunk was three frames, each its own wake-up of
/// the connection task, Noise frame and window accounting. (Bulk sync bench (f): see
/// `vendor/libp2p-yamux/PATCHES.md`.)
const YAMUX_SPLIT: usize = 65_535 - 1_024;

fn build_swarm(config: &Config) -> Result<Swarm<Behaviour>, TransportError> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
    // Yamux 0.13 tunes each stream's receive window itself (up to the connection's budget),
    // so there is no window to set here; see the transport benchmark for what it achieves.
    let mut yamux_config = yamux::Config::default();
    yamux_config.set_split_send_size(YAMUX_SPLIT);
    let behaviour = |key: &libp2p::identity::Keypair| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
        let limits = libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_established(Some(config.max_connections))
            .with_max_pending_incoming(Some(64));
        let mdns = if config.mdns {
            // Ask again every 30 s (libp2p's default is 5 min, and it stops asking early
            // once anything answered: a first dial that failed would wait that long).
            let mdns_config = mdns::Config {
                query_interval: Duration::from_secs(30),
                ttl: Duration::from_secs(90),
                ..mdns::Config::default()
            };
            Some(mdns::tokio::Behaviour::new(
                mdns_config,
                key.public().to_peer_id(),
            )?)
        } else {
            None
        };
        Ok(Behaviour {
            gate: gate::Gate::new(config.allowed.clone()),
            limits: libp2p::connection_limits::Behaviour::new(limits),
            identify: identify::Behaviour::new(
                identify::Config::new("/meshsync/1".into(), key.public())
                    .with_agent_version(format!("meshsync/{}", env!("CARGO_PKG_VERSION"))),
            ),
            mdns: Toggle::from(mdns),
            stream: libp2p_stream::Behaviour::new(),
        })
    };
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(300));
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone()).with_tokio();
    let shape = config.shape;
    let swarm = if config.memory {
        builder
            .with_other_transport(|key| {
                use libp2p::core::upgrade::Version;
                use libp2p::Transport as _;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libp2p::core::transport::MemoryTransport::default()
                        .map(move |stream, _| match shape {
                            Some(shape) => {
                                futures::future::Either::Left(shape::Shaped::new(stream, shape))
                            }
                            None => futures::future::Either::Right(stream),
                        })
                        .upgrade(Version::V1)
                        .authenticate(noise_config(key)?)
                        .multiplex(yamux_config.clone())
                        .boxed(),
                )
            })
            .map_err(|e| setup(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(idle)
            .build()
    } else {
        let yamux_for_tcp = yamux_config.clone();
        builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise_config,
                move || yamux_for_tcp.clone(),
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(idle)
            .build()
    };
    Ok(swarm)
}

async fn run_swarm(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    events: Arc<tokio::sync::broadcast::Sender<Event>>,
    allowed: Allowed,
) {
    let mut announced: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    // The concrete addresses being listened on (0.0.0.0 expanded to each interface).
    let mut listening: Vec<Multiaddr> = Vec::new();
    // Addresses that worked or were announced, kept across disconnections for redials.
    let mut known: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { break };
                match command {
                    Command::Dial(addr, reply) => {
                        let _ = reply.send(swarm.dial(addr).map_err(|e| e.to_string()));
                    }
                    Command::DialPeer(peer, mut addrs) => {
                        if addrs.is_empty() {
                            addrs = known.get(&peer).cloned().unwrap_or_default();
                        }
                        if !swarm.is_connected(&peer) && allowed.contains(&peer) && peer != *swarm.local_peer_id() && !addrs.is_empty() {
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
                            if let Err(error) = swarm.dial(opts) {
                                tracing::debug!(%peer, %error, "dial failed");
                            }
                        }
                    }
                    Command::Disconnect(peer) => {
                        tracing::info!(peer = %describe(&peer), "disconnecting");
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                    Command::Connected(reply) => {
                        let peers = swarm.connected_peers().map(|p| (*p, announced.get(p).cloned().unwrap_or_default())).collect();
                        let _ = reply.send(peers);
                    }
                    Command::ListenAddrs(reply) => {
                        let _ = reply.send(listening.clone());
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    if !listening.contains(&address) {
                        listening.push(address.clone());
                    }
                    let _ = events.send(Event::Listening { addr: address });
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    if endpoint.is_dialer() {
                        let addrs = known.entry(peer_id).or_default();
                        if !addrs.contains(endpoint.get_remote_address()) {
                            addrs.push(endpoint.get_remote_address().clone());
                        }
                    }
                    tracing::info!(peer = %describe(&peer_id), addr = %endpoint.get_remote_address(), "connected");
                    let _ = events.send(Event::Connected { peer: peer_id, addr: endpoint.get_remote_address().clone() });
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    announced.remove(&peer_id);
                    let _ = events.send(Event::Disconnected { peer: peer_id });
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gate(gate::GateEvent::Refused { peer, addr })) => {
                    tracing::warn!(peer = %describe(&peer), %addr, "refused a connection from a non-member");
                    let _ = events.send(Event::Refused { peer, addr });
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(|a| !is_unspecified(a)).collect();
                    let entry = known.entry(peer_id).or_default();
                    for addr in &addrs {
                        if !entry.contains(addr) {
                            entry.push(addr.clone());
                        }
                    }
                    announced.insert(peer_id, addrs);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                    for (peer, addr) in found {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                    for (peer, addrs) in by_peer {
                        if allowed.contains(&peer) && !swarm.is_connected(&peer) {
                            tracing::info!(peer = %describe(&peer), "found a member by mDNS");
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
                            let _ = swarm.dial(opts);
                        }
                    }
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    listening.retain(|a| *a != address);
                }
                SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                    tracing::debug!(%send_back_addr, %error, "incoming connection failed");
                }
                _ => {}
            }
        }
    }
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| {
        matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
    })
}

/// A peer as a person reads it: its device ID when it has one.
pub fn describe(peer: &PeerId) -> String {
    match DeviceId::from_peer_id(peer) {
        Some(device) => device.to_string(),
        None => peer.to_string(),
    }
}
