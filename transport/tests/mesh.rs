//! Real libp2p nodes on loopback (and in memory): members connect and exchange state over TCP
//! and QUIC; strangers and removed members get nothing through; a chunk transfer survives a
//! killed connection; invites work once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use meshsync_crdt::{ChunkId, DeviceKeys, MeshId, Role};
use meshsync_transport::chunks::{self, Answer, ChunkSource, Fetched};
use meshsync_transport::pair::{self, Inviter, PairError};
use meshsync_transport::{rpc, Config, Event, Transport};
use tokio::sync::mpsc;

fn node(keys: &DeviceKeys) -> Transport {
    Transport::start(Config::tcp_and_quic(keys.libp2p_keypair(), "127.0.0.1")).unwrap()
}

fn peer(keys: &DeviceKeys) -> PeerId {
    keys.device_id().to_peer_id()
}

async fn addr(t: &Transport, quic: bool) -> Multiaddr {
    t.wait_listening().await;
    t.listen_addrs()
        .await
        .into_iter()
        .find(|a| a.to_string().contains("quic") == quic)
        .expect("listening")
}

/// Three nodes, each allowing the other two.
async fn three_members() -> [(DeviceKeys, Transport); 3] {
    let keys: [DeviceKeys; 3] = std::array::from_fn(|_| DeviceKeys::generate());
    let ids: Vec<PeerId> = keys.iter().map(peer).collect();
    let nodes: Vec<Transport> = keys.iter().map(node).collect();
    for (i, t) in nodes.iter().enumerate() {
        t.set_allowed(
            ids.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p),
        )
        .await;
    }
    let mut nodes = nodes.into_iter();
    keys.map(|k| (k, nodes.next().expect("three nodes")))
}

fn echo_upper(t: &Transport) {
    rpc::serve(t, rpc::DOC, |_peer, request| async move {
        Some(request.to_ascii_uppercase())
    })
    .unwrap();
}

/// Two members on the in-memory transport, `a` answering `/meshsync/doc/2` in upper case;
/// returns `a`'s keys, `a` and `b` (not yet connected).
async fn memory_pair() -> (DeviceKeys, Transport, Transport) {
    let (ka, kb) = (DeviceKeys::generate(), DeviceKeys::generate());
    let a = Transport::start(Config::memory(ka.libp2p_keypair())).unwrap();
    let b = Transport::start(Config::memory(kb.libp2p_keypair())).unwrap();
    a.set_allowed([peer(&kb)]).await;
    b.set_allowed([peer(&ka)]).await;
    echo_upper(&a);
    (ka, a, b)
}

#[tokio::test]
async fn members_exchange_state_over_tcp_and_quic() {
    for quic in [false, true] {
        let (ka, kb) = (DeviceKeys::generate(), DeviceKeys::generate());
        let (a, b) = (node(&ka), node(&kb));
        a.set_allowed([peer(&kb)]).await;
        b.set_allowed([peer(&ka)]).await;
        echo_upper(&a);
        b.dial(addr(&a, quic).await).await.unwrap();
        assert!(
            b.wait_connected(peer(&ka), Duration::from_secs(10)).await,
            "quic={quic}"
        );
        let reply = rpc::request(&b, peer(&ka), rpc::DOC, b"heads please")
            .await
            .unwrap();
        assert_eq!(reply, b"HEADS PLEASE");
        let traffic = b.traffic();
        assert!(traffic[&peer(&ka)].0 > 0 && traffic[&peer(&ka)].1 > 0);
    }
}

#[tokio::test]
async fn in_memory_transport_connects_real_nodes() {
    let (ka, a, b) = memory_pair().await;
    let addrs = a.wait_listening().await;
    b.dial(addrs[0].clone()).await.unwrap();
    assert!(b.wait_connected(peer(&ka), Duration::from_secs(5)).await);
    assert_eq!(
        rpc::request(&b, peer(&ka), rpc::DOC, b"x").await.unwrap(),
        b"X"
    );
}

#[tokio::test]
async fn a_stranger_with_a_valid_key_gets_no_protocol_through() {
    let (ka, kc) = (DeviceKeys::generate(), DeviceKeys::generate());
    let (a, stranger) = (node(&ka), node(&kc));
    let mut events = a.subscribe();
    echo_upper(&a);
    // The stranger would happily talk to A; A has never heard of it.
    stranger.set_allowed([peer(&ka)]).await;
    stranger.dial(addr(&a, false).await).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Refused { peer: p, .. }) = events.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("A reports the refusal");
    assert_eq!(refused, peer(&kc));
    assert!(rpc::request(&stranger, peer(&ka), rpc::DOC, b"hello")
        .await
        .is_err());
    assert!(!a.connected().await.iter().any(|(p, _)| *p == peer(&kc)));
}

#[tokio::test]
async fn a_removed_member_is_cut_off_and_cannot_come_back() {
    let (ka, kb) = (DeviceKeys::generate(), DeviceKeys::generate());
    let (a, b) = (node(&ka), node(&kb));
    a.set_allowed([peer(&kb)]).await;
    b.set_allowed([peer(&ka)]).await;
    echo_upper(&a);
    let a_addr = addr(&a, false).await;
    b.dial(a_addr.clone()).await.unwrap();
    assert!(b.wait_connected(peer(&ka), Duration::from_secs(10)).await);
    a.set_allowed(Vec::<PeerId>::new()).await;
    let gone = async {
        while b.connected().await.iter().any(|(p, _)| *p == peer(&ka)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("B is disconnected");
    b.dial(a_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rpc::request(&b, peer(&ka), rpc::DOC, b"again")
        .await
        .is_err());
}

struct MemorySource(HashMap<ChunkId, bytes::Bytes>);

impl ChunkSource for MemorySource {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        self.0.get(id).cloned()
    }
}

fn chunks(count: usize, size: usize, seed: u8) -> HashMap<ChunkId, Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut data = vec![0u8; size];
            let mut xof = blake3::Hasher::new()
                .update(&[seed])
                .update(&i.to_le_bytes())
                .finalize_xof();
            xof.fill(&mut data);
            (ChunkId(*blake3::hash(&data).as_bytes()), data)
        })
        .collect()
}

#[tokio::test]
async fn a_transfer_from_two_peers_resumes_after_its_connection_is_killed() {
    let [(ka, a), (kb, b), (_kc, c)] = three_members().await;
    let data = chunks(400, 128 * 1024, 1); // 50 MiB
    let source: Arc<dyn ChunkSource> = Arc::new(MemorySource(
        data.iter()
            .map(|(k, v)| (*k, bytes::Bytes::from(v.clone())))
            .collect(),
    ));
    for server in [&a, &b] {
        chunks::start_serving(server, source.clone()).unwrap();
    }
    c.dial(addr(&a, false).await).await.unwrap();
    c.dial(addr(&b, true).await).await.unwrap();
    assert!(c.wait_connected(peer(&ka), Duration::from_secs(10)).await);
    assert!(c.wait_connected(peer(&kb), Duration::from_secs(10)).await);

    let mut wants: Vec<ChunkId> = data.keys().copied().collect();
    wants.push(ChunkId([9; 32])); // nobody has this one
    let (sink, mut received) = mpsc::channel::<Fetched>(8);
    let fetcher = c.clone();
    let peers = vec![peer(&ka), peer(&kb)];
    let task = tokio::spawn(async move { chunks::fetch(&fetcher, peers, wants, sink).await });
    let mut got: HashMap<ChunkId, PeerId> = HashMap::new();
    let mut killed = false;
    while let Some(fetched) = received.recv().await {
        assert_eq!(
            blake3::hash(fetched.answer.bytes()).as_bytes(),
            &fetched.id.0,
            "chunk intact"
        );
        got.insert(fetched.id, fetched.peer);
        if got.len() == 60 && !killed {
            // Kill both connections mid-transfer.
            c.disconnect(peer(&ka)).await;
            c.disconnect(peer(&kb)).await;
            killed = true;
        }
    }
    let report = task.await.unwrap();
    assert!(killed);
    assert_eq!(got.len(), 400, "every chunk arrived: {report:?}");
    assert_eq!(report.missing, vec![ChunkId([9; 32])]);
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(got.values().any(|p| *p == peer(&ka)) && got.values().any(|p| *p == peer(&kb)));
}

/// Answers every chunk of `MemorySource` in the clear to `reader` alone (its sealed form here:
/// the bytes reversed).
struct ReaderSource {
    plain: HashMap<ChunkId, bytes::Bytes>,
    reader: PeerId,
    /// Each `Want`'s IDs and hints, as `get_many_near` got them.
    nears: std::sync::Mutex<Vec<(Vec<ChunkId>, chunks::Near)>>,
}

impl ReaderSource {
    fn new(plain: HashMap<ChunkId, bytes::Bytes>, reader: PeerId) -> ReaderSource {
        let nears = Default::default();
        ReaderSource {
            plain,
            reader,
            nears,
        }
    }
}

impl ChunkSource for ReaderSource {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        let plain = self.plain.get(id)?;
        Some(plain.iter().rev().copied().collect())
    }

    fn holds_key(&self, peer: &PeerId) -> bool {
        *peer == self.reader
    }

    fn get_many_plain(&self, ids: &[ChunkId]) -> Vec<Option<chunks::Answer>> {
        let plain = ids.iter().map(|id| self.plain.get(id).cloned());
        plain.map(|p| p.map(chunks::Answer::Plain)).collect()
    }

    fn get_many_near(&self, ids: &[ChunkId], near: &chunks::Near) -> Vec<Option<chunks::Answer>> {
        self.nears
            .lock()
            .unwrap()
            .push((ids.to_vec(), near.clone()));
        self.get_many_plain(ids)
    }
}

async fn fetch_all(from: &Transport, server: PeerId, wants: Vec<ChunkId>) -> Vec<Fetched> {
    let (sink, mut received) = mpsc::channel::<Fetched>(8);
    let fetcher = from.clone();
    let task =
        tokio::spawn(async move { chunks::fetch(&fetcher, vec![server], wants, sink).await });
    let mut got = Vec::new();
    while let Some(fetched) = received.recv().await {
        got.push(fetched);
    }
    task.await.unwrap();
    got
}

#[tokio::test]
async fn chunks_go_in_the_clear_only_to_a_key_holder_that_asks() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let [(ka, a), (kb, b), (_kc, c)] = three_members().await;
    let data = chunks(10, 1000, 2);
    let plain: HashMap<ChunkId, bytes::Bytes> = (data.iter())
        .map(|(k, v)| (*k, bytes::Bytes::from(v.clone())))
        .collect();
    let reader = peer(&kb);
    chunks::start_serving(&a, Arc::new(ReaderSource::new(plain, reader))).unwrap();
    for t in [&b, &c] {
        t.dial(addr(&a, false).await).await.unwrap();
        assert!(t.wait_connected(peer(&ka), Duration::from_secs(10)).await);
    }
    let wants: Vec<ChunkId> = data.keys().copied().collect();

    // b holds the key and asks (every fetch does): in the clear, as they are.
    let got = fetch_all(&b, peer(&ka), wants.clone()).await;
    assert_eq!(got.len(), 10);
    for f in &got {
        assert_eq!(f.answer, Answer::Plain(data[&f.id].clone().into()));
    }
    // c asks too, but holds no key (a storage peer, say): sealed.
    let got = fetch_all(&c, peer(&ka), wants.clone()).await;
    assert_eq!(got.len(), 10);
    for f in &got {
        let reversed = data[&f.id].iter().rev().copied().collect::<Vec<u8>>();
        assert_eq!(f.answer, Answer::Sealed(reversed.into()));
    }
    // A `Want` without the flag (a peer that does not know it): sealed, even to b.
    let mut stream = b
        .control()
        .open_stream(peer(&ka), chunks::PROTOCOL)
        .await
        .unwrap();
    let want = meshsync_transport::frame::encode(&chunks::Want {
        ids: wants[..1].to_vec(),
    });
    meshsync_transport::frame::write_frame(&mut stream, &want)
        .await
        .unwrap();
    let mut header = [0u8; 37];
    stream.read_exact(&mut header).await.unwrap();
    let (status, id, _) = chunks::decode_response_header(&header[4..]).unwrap();
    assert_eq!((status, id), (0, wants[0]), "status 0: sealed");
    stream.close().await.unwrap();
}

#[tokio::test]
async fn hints_reach_the_source_with_each_want_and_a_malformed_one_closes_the_stream() {
    use futures::AsyncReadExt;
    let [(ka, a), (kb, b), (_kc, c)] = three_members().await;
    let data = chunks(150, 100, 3);
    let plain: HashMap<ChunkId, bytes::Bytes> = (data.iter())
        .map(|(k, v)| (*k, bytes::Bytes::from(v.clone())))
        .collect();
    let source = Arc::new(ReaderSource::new(plain, peer(&kb)));
    chunks::start_serving(&a, source.clone()).unwrap();
    for t in [&b, &c] {
        t.dial(addr(&a, false).await).await.unwrap();
        assert!(t.wait_connected(peer(&ka), Duration::from_secs(10)).await);
    }
    let wants: Vec<ChunkId> = data.keys().copied().collect();
    // Every other chunk named, with a path no hint may carry among them.
    let mut paths: HashMap<ChunkId, String> = (wants.iter().step_by(2))
        .enumerate()
        .map(|(i, id)| (*id, format!("dir/file-{i}")))
        .collect();
    paths.insert(wants[2], "x".repeat(chunks::MAX_NEAR_PATH + 1));
    let hints = chunks::Hints {
        folder: "photos".into(),
        paths: paths.clone(),
        readers: [peer(&ka)].into(),
    };
    let fetch = |t: &Transport, hints: chunks::Hints| {
        let (sink, mut received) = mpsc::channel::<Fetched>(8);
        let (fetcher, wants) = (t.clone(), wants.clone());
        let server = peer(&ka);
        async move {
            let task = tokio::spawn(async move {
                chunks::fetch_near(&fetcher, vec![server], wants, hints, sink).await
            });
            let mut got = Vec::new();
            while let Some(fetched) = received.recv().await {
                got.push(fetched);
            }
            task.await.unwrap();
            got
        }
    };

    let got = fetch(&b, hints.clone()).await;
    assert_eq!(got.len(), 150);
    assert!(got.iter().all(|f| matches!(f.answer, Answer::Plain(_))));
    let nears = std::mem::take(&mut *source.nears.lock().unwrap());
    assert_eq!(nears.len(), 3, "150 IDs, in three `Want`s");
    let mut named = 0;
    for (ids, near) in &nears {
        assert_eq!(near.folder, "photos");
        assert_eq!(near.paths.len(), ids.len());
        for (id, path) in ids.iter().zip(&near.paths) {
            match path {
                Some(path) => {
                    assert_eq!(Some(path), paths.get(id));
                    named += 1;
                }
                None => assert!(!paths.contains_key(id) || *id == wants[2]),
            }
        }
    }
    assert_eq!(
        named, 74,
        "every named chunk but the one whose path is too long"
    );

    // Hints for other readers than this source: not sent (it would pass them on).
    let elsewhere = chunks::Hints {
        readers: [peer(&kb)].into(),
        ..hints.clone()
    };
    let got = fetch(&b, elsewhere).await;
    assert_eq!(got.len(), 150);
    assert!(source.nears.lock().unwrap().is_empty());

    // Hints to a source that will not answer in the clear (c holds no key): not passed on.
    let got = fetch(&c, hints).await;
    assert_eq!(got.len(), 150);
    assert!(got.iter().all(|f| matches!(f.answer, Answer::Sealed(_))));
    assert!(source.nears.lock().unwrap().is_empty());

    // Hints that do not fit their `Want` (two paths for one ID): the stream is closed.
    let mut stream = b
        .control()
        .open_stream(peer(&ka), chunks::PROTOCOL)
        .await
        .unwrap();
    let mut want = meshsync_transport::frame::encode(&chunks::Want {
        ids: wants[..1].to_vec(),
    });
    want.push(chunks::PLAIN_OK);
    want.extend(meshsync_transport::frame::encode(&chunks::Near {
        folder: "photos".into(),
        paths: vec![Some("a".into()), Some("b".into())],
    }));
    meshsync_transport::frame::write_frame(&mut stream, &want)
        .await
        .unwrap();
    let mut header = [0u8; 37];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut header));
    assert!(read.await.unwrap().is_err(), "no answer: closed");
    assert!(source.nears.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_invite_works_once_and_wrong_or_expired_codes_change_nothing() {
    let (inviter_keys, joiner_keys, other_keys) = (
        DeviceKeys::generate(),
        DeviceKeys::generate(),
        DeviceKeys::generate(),
    );
    let mesh = MeshId::random();
    let joined = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = joined.clone();
    let inviter = Inviter::start(
        &inviter_keys,
        mesh,
        Role::Device,
        Duration::from_secs(600),
        "127.0.0.1",
        move |joiner| {
            seen.lock().unwrap().push(joiner.clone());
            Ok(format!("welcome {}", joiner.name).into_bytes())
        },
    )
    .await
    .unwrap();
    let code = inviter.invite.code();

    // A wrong secret: same everything, other code.
    let mut forged = pair::Invite::parse(&code).unwrap();
    let other = Inviter::start(
        &other_keys,
        mesh,
        Role::Device,
        Duration::from_secs(600),
        "127.0.0.1",
        |_| Ok(vec![]),
    )
    .await
    .unwrap();
    let mut wrong = pair::Invite::parse(&other.invite.code()).unwrap();
    wrong.inviter = forged.inviter;
    wrong.addrs = forged.addrs.clone();
    wrong.mesh = forged.mesh;
    assert!(matches!(
        pair::join(&joiner_keys, "laptop", &wrong.code()).await,
        Err(PairError::Handshake)
    ));
    assert!(
        joined.lock().unwrap().is_empty(),
        "a wrong code changes nothing"
    );

    assert!(matches!(
        pair::join(&joiner_keys, "laptop", "hello").await,
        Err(PairError::NotAnInvite)
    ));
    let mut damaged = code.clone();
    damaged.truncate(code.len() - 3);
    assert!(matches!(
        pair::join(&joiner_keys, "laptop", &damaged).await,
        Err(PairError::Damaged)
    ));
    forged.expires = 1;
    assert!(matches!(
        pair::join(&joiner_keys, "laptop", &forged.code()).await,
        Err(PairError::Damaged | PairError::Expired)
    ));

    let (invite, payload) = pair::join(&joiner_keys, "laptop", &code).await.unwrap();
    assert_eq!(payload, b"welcome laptop");
    assert_eq!(invite.mesh, mesh);
    {
        let joined = joined.lock().unwrap();
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].device, joiner_keys.device_id());
        assert_eq!(
            joined[0].kem,
            joiner_keys.kem_public(),
            "the handshake proved the wrapping key"
        );
    }
    assert!(inviter.used());
    // Used once: refused.
    assert!(pair::join(&other_keys, "thief", &code).await.is_err());
    assert_eq!(joined.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn members_introduced_by_a_common_peer_find_each_other() {
    let [(_ka, a), (_kb, b), (kc, c)] = three_members().await;
    // B and C know only A's address (as after pairing with A).
    let a_addr = addr(&a, false).await;
    b.dial(a_addr.clone()).await.unwrap();
    c.dial(a_addr).await.unwrap();
    assert!(
        b.wait_connected(peer(&kc), Duration::from_secs(15)).await,
        "B found C through A's peer list"
    );
}

#[tokio::test]
async fn replicated_state_travels_over_doc_protocol() {
    use meshsync_crdt::{Action, Epoch, MembershipLog, MeshKey};
    let (ka, kb) = (DeviceKeys::generate(), DeviceKeys::generate());
    let (mut log, mesh) = MembershipLog::create(&ka, "a", &MeshKey::generate(Epoch(0)));
    log.append(
        &ka,
        Action::Add {
            device: kb.device_id(),
            role: Role::Device,
            name: meshsync_crdt::SealedName::unreadable("b"),
            kem: Some(kb.kem_public()),
            wrapped: None,
        },
    )
    .unwrap();
    let log = Arc::new(tokio::sync::Mutex::new(log));
    let (a, b) = (node(&ka), node(&kb));
    a.set_allowed([peer(&kb)]).await;
    b.set_allowed([peer(&ka)]).await;
    let served = log.clone();
    rpc::serve(&a, rpc::DOC, move |_peer, request| {
        let served = served.clone();
        async move {
            // The request: the heads the asker has; the reply: the changes it lacks.
            let heads: Vec<Vec<u8>> = postcard::from_bytes(&request).ok()?;
            let heads: Vec<automerge::ChangeHash> = heads
                .iter()
                .filter_map(|h| h.as_slice().try_into().ok())
                .collect();
            let changes = served.lock().await.changes_since(&heads);
            Some(postcard::to_stdvec(&changes).unwrap())
        }
    })
    .unwrap();
    b.dial(addr(&a, true).await).await.unwrap();
    assert!(b.wait_connected(peer(&ka), Duration::from_secs(10)).await);
    let mut replica = MembershipLog::empty(mesh);
    let request = postcard::to_stdvec(&Vec::<Vec<u8>>::new()).unwrap();
    let reply = rpc::request(&b, peer(&ka), rpc::DOC, &request)
        .await
        .unwrap();
    let changes: Vec<Vec<u8>> = postcard::from_bytes(&reply).unwrap();
    replica.apply(&changes).unwrap();
    assert!(replica.view().is_member(&kb.device_id()));
    assert_eq!(replica.view().members, log.lock().await.view().members);
}

#[tokio::test]
async fn a_member_opening_stream_after_stream_gets_the_extra_ones_closed() {
    use meshsync_transport::{frame, limit::MAX_STREAMS_PER_PEER};
    let (ka, a, b) = memory_pair().await;
    b.dial(a.wait_listening().await[0].clone()).await.unwrap();
    assert!(b.wait_connected(peer(&ka), Duration::from_secs(5)).await);
    // B opens streams and sends nothing on them: each would hold a task and a timer on A.
    let mut control = b.control();
    let mut idle = Vec::new();
    for _ in 0..MAX_STREAMS_PER_PEER + 8 {
        idle.push(control.open_stream(peer(&ka), rpc::DOC).await.unwrap());
    }
    // The ones past the limit are closed by A at once: a request on them gets no answer.
    let mut last = idle.pop().unwrap();
    frame::write_frame(&mut last, b"hello").await.ok();
    let answer = frame::read_frame(&mut last, 1024, Duration::from_secs(5)).await;
    assert!(!matches!(answer, Ok(Some(_))), "{answer:?}");
    // One that got a place is served.
    let mut first = idle.remove(0);
    frame::write_frame(&mut first, b"hello").await.unwrap();
    let answer = frame::read_frame(&mut first, 1024, Duration::from_secs(5)).await;
    assert_eq!(answer.unwrap().unwrap(), b"HELLO");
    // Closing them gives the places back.
    drop(idle);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rpc::request(&b, peer(&ka), rpc::DOC, b"x").await.unwrap(),
        b"X"
    );
}

type NoiseSession =
    libp2p::noise::Output<multistream_select::Negotiated<libp2p::tcp::tokio::TcpStream>>;

/// Both ends of a real TCP connection on loopback after the Noise handshake, negotiated as
/// libp2p's upgrade does it (multistream-select, then the chosen handshake).
async fn noise_pair(
    dialer: libp2p::noise::Config,
    listener: libp2p::noise::Config,
) -> (NoiseSession, NoiseSession) {
    use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
    use libp2p::core::UpgradeInfo;
    use libp2p::tcp::tokio::TcpStream;
    use multistream_select::{dialer_select_proto, listener_select_proto, Version};
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = socket.local_addr().unwrap();
    let accept = async {
        let io = TcpStream(socket.accept().await.unwrap().0);
        let (name, io) = listener_select_proto(io, listener.protocol_info())
            .await
            .unwrap();
        listener.upgrade_inbound(io, name).await.unwrap().1
    };
    let dial = async {
        let io = TcpStream(tokio::net::TcpStream::connect(to).await.unwrap());
        let (name, io) = dialer_select_proto(io, dialer.protocol_info(), Version::V1)
            .await
            .unwrap();
        dialer.upgrade_outbound(io, name).await.unwrap().1
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(dial, accept)
    })
    .await
    .expect("handshake in time")
}

/// What each side of a real TCP connection on loopback negotiated: the Noise protocol name.
async fn noise_between(
    dialer: libp2p::noise::Config,
    listener: libp2p::noise::Config,
) -> (&'static str, &'static str) {
    let (dialer, listener) = noise_pair(dialer, listener).await;
    (dialer.protocol(), listener.protocol())
}

#[tokio::test]
async fn noise_carries_writes_of_every_size_intact_with_either_cipher() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::noise::Config as Noise;
    let key = || DeviceKeys::generate().libp2p_keypair();
    // Small writes are gathered into a frame, long ones sealed straight from the caller's
    // buffer (the patched path), longer than a frame split: every size around those edges,
    // interleaved the way a muxer writes (a 12-byte header, then a body).
    let sizes = [
        1, 12, 2047, 12, 2048, 12, 2049, 12, 16384, 0, 64511, 64512, 65535, 200_000, 3, 12, 40_000,
    ];
    let data: Vec<u8> = (0..sizes.iter().sum::<usize>())
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    for prefer_aes in [true, false] {
        let (mut dialer, mut listener) = noise_pair(
            Noise::new(&key()).unwrap().with_aes_gcm(prefer_aes),
            Noise::new(&key()).unwrap().with_aes_gcm(prefer_aes),
        )
        .await;
        let write = async {
            let mut at = 0;
            for size in sizes {
                dialer.write_all(&data[at..at + size]).await.unwrap();
                at += size;
            }
            dialer.flush().await.unwrap();
            dialer.close().await.unwrap();
        };
        // Read in pieces of odd sizes, smaller and larger than a frame (a frame's cleartext
        // is kept and read out across several reads, into a buffer reused for every frame).
        let read = async {
            let mut got = Vec::new();
            let mut piece = vec![0u8; 70_001];
            for len in [1usize, 7, 4_093, 70_001].iter().cycle() {
                match listener.read(&mut piece[..*len]).await.unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&piece[..n]),
                }
            }
            got
        };
        let ((), got) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
                .await
                .expect("transfer in time");
        assert_eq!(got.len(), data.len(), "aes {prefer_aes}");
        assert!(got == data, "aes {prefer_aes}: the bytes differ");
    }
}

#[tokio::test]
async fn noise_runs_aes_gcm_where_both_offer_it_and_chachapoly_with_a_stock_peer() {
    use libp2p::noise::{Config as Noise, PROTOCOL_AESGCM, PROTOCOL_CHACHA};
    let key = || DeviceKeys::generate().libp2p_keypair();
    let ours = |prefer| Noise::new(&key()).unwrap().with_aes_gcm(prefer);
    let stock = || Noise::new(&key()).unwrap();
    // Both offer it, the dialer prefers it.
    let both = (PROTOCOL_AESGCM, PROTOCOL_AESGCM);
    assert_eq!(noise_between(ours(true), ours(false)).await, both);
    // A dialer that prefers ChaChaPoly (no AES instructions) gets it.
    let chacha = (PROTOCOL_CHACHA, PROTOCOL_CHACHA);
    assert_eq!(noise_between(ours(false), ours(true)).await, chacha);
    // A peer with the stock crate connects either way.
    assert_eq!(noise_between(ours(true), stock()).await, chacha);
    assert_eq!(noise_between(stock(), ours(true)).await, chacha);
    // What a node offers: AES-GCM first where this CPU has AES instructions (x86-64 here).
    let offered: Vec<_> = libp2p::core::UpgradeInfo::protocol_info(
        &meshsync_transport::noise_config(&key()).unwrap(),
    )
    .collect();
    assert_eq!(offered.len(), 2);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes") {
        assert_eq!(offered[0], PROTOCOL_AESGCM);
    }
}
