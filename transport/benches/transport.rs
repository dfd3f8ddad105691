//! Transport throughput and latency: `cargo bench -p meshsync-transport --bench transport`.
//!
//! Prints, in one run on loopback: raw tokio TCP MB/s; a bare libp2p stream (TCP+Noise+Yamux,
//! one and four streams, and QUIC) MB/s; meshsync chunk transfer MB/s over each, from one peer
//! and from two peers at once; and p50/p99 latency of fetching one 4 KiB chunk. Chunk-transfer
//! figures are also given as a share of the bare-stream figure measured in the same run.
//! Sizes: `TRANSPORT_BENCH_MB` (default 512) per measurement.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use meshsync_crdt::{ChunkId, DeviceKeys};
use meshsync_transport::chunks::{self, ChunkSource, Fetched};
use meshsync_transport::{Config, Transport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

const RAW: StreamProtocol = StreamProtocol::new("/meshsync-bench/raw/1");
const CHUNK: usize = 256 * 1024;

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

async fn raw_tcp(total: u64) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let buf = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        socket.write_all(&buf).await.unwrap();
        sent += buf.len() as u64;
    }
    let got = server.await.unwrap();
    mb_per_s(got, start.elapsed())
}

struct Pair {
    server: Transport,
    client: Transport,
    server_keys: DeviceKeys,
}

async fn pair(quic: bool) -> Pair {
    let (ks, kc) = (DeviceKeys::generate(), DeviceKeys::generate());
    let server = Transport::start(Config::tcp_and_quic(ks.libp2p_keypair(), "127.0.0.1")).unwrap();
    let client = Transport::start(Config::tcp_and_quic(kc.libp2p_keypair(), "127.0.0.1")).unwrap();
    server.set_allowed([kc.device_id().to_peer_id()]).await;
    client.set_allowed([ks.device_id().to_peer_id()]).await;
    server.wait_listening().await;
    let addr: Multiaddr = server
        .listen_addrs()
        .await
        .into_iter()
        .find(|a| a.to_string().contains("quic") == quic)
        .unwrap();
    client.dial(addr).await.unwrap();
    assert!(
        client
            .wait_connected(ks.device_id().to_peer_id(), Duration::from_secs(10))
            .await
    );
    Pair {
        server,
        client,
        server_keys: ks,
    }
}

/// Bare libp2p streams: the client writes `total` bytes over `streams` streams at once.
async fn bare_streams(p: &Pair, total: u64, streams: usize) -> f64 {
    let mut incoming = p.server.control().accept(RAW).unwrap();
    let (done_tx, mut done_rx) = mpsc::channel::<u64>(streams);
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n as u64,
                    }
                }
                let _ = done.send(got).await;
            });
        }
    });
    let server_peer = p.server_keys.device_id().to_peer_id();
    let per_stream = total / streams as u64;
    let start = Instant::now();
    for _ in 0..streams {
        let mut control = p.client.control();
        tokio::spawn(async move {
            let mut stream = control.open_stream(server_peer, RAW).await.unwrap();
            let buf = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            while sent < per_stream {
                stream.write_all(&buf).await.unwrap();
                sent += buf.len() as u64;
            }
            stream.close().await.unwrap();
        });
    }
    let mut got = 0u64;
    for _ in 0..streams {
        got += done_rx.recv().await.unwrap();
    }
    let speed = mb_per_s(got, start.elapsed());
    drop(p.server.control().accept(RAW)); // unregister happens when `incoming` is dropped
    speed
}

struct MemorySource(HashMap<ChunkId, bytes::Bytes>);

impl ChunkSource for MemorySource {
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes> {
        self.0.get(id).cloned()
    }
}

/// `count` random chunks of `size` bytes, named by their hash.
fn make_chunks(count: usize, size: usize) -> Arc<MemorySource> {
    let map = (0..count)
        .map(|i| {
            let mut data = vec![0u8; size];
            blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut data);
            (
                ChunkId(*blake3::hash(&data).as_bytes()),
                bytes::Bytes::from(data),
            )
        })
        .collect();
    Arc::new(MemorySource(map))
}

async fn fetch_all(client: &Transport, peers: Vec<PeerId>, wants: Vec<ChunkId>) -> (u64, Duration) {
    let (sink, mut rx) = mpsc::channel::<Fetched>(16);
    let start = Instant::now();
    let fetcher = client.clone();
    let task = tokio::spawn(async move { chunks::fetch(&fetcher, peers, wants, sink).await });
    let mut bytes = 0u64;
    while let Some(fetched) = rx.recv().await {
        bytes += fetched.answer.bytes().len() as u64;
    }
    let report = task.await.unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    (bytes, start.elapsed())
}

fn serve(server: &Transport, source: Arc<MemorySource>) {
    chunks::start_serving(server, source).unwrap();
}

async fn chunks_from_one(quic: bool, source: &Arc<MemorySource>, wants: &[ChunkId]) -> f64 {
    let p = pair(quic).await;
    serve(&p.server, source.clone());
    let server_peer = p.server_keys.device_id().to_peer_id();
    let (bytes, took) = fetch_all(&p.client, vec![server_peer], wants.to_vec()).await;
    mb_per_s(bytes, took)
}

async fn chunks_from_two(quic: bool, source: &Arc<MemorySource>, wants: &[ChunkId]) -> f64 {
    let keys: Vec<DeviceKeys> = (0..3).map(|_| DeviceKeys::generate()).collect();
    let nodes: Vec<Transport> = keys
        .iter()
        .map(|k| Transport::start(Config::tcp_and_quic(k.libp2p_keypair(), "127.0.0.1")).unwrap())
        .collect();
    let ids: Vec<PeerId> = keys.iter().map(|k| k.device_id().to_peer_id()).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.set_allowed(
            ids.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p),
        )
        .await;
    }
    for server in &nodes[..2] {
        serve(server, source.clone());
        server.wait_listening().await;
        let addr = server
            .listen_addrs()
            .await
            .into_iter()
            .find(|a| a.to_string().contains("quic") == quic)
            .unwrap();
        nodes[2].dial(addr).await.unwrap();
    }
    for id in &ids[..2] {
        assert!(nodes[2].wait_connected(*id, Duration::from_secs(10)).await);
    }
    let (bytes, took) = fetch_all(&nodes[2], ids[..2].to_vec(), wants.to_vec()).await;
    mb_per_s(bytes, took)
}

#[tokio::main]
async fn main() {
    let total: u64 = std::env::var("TRANSPORT_BENCH_MB")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(512)
        * 1024
        * 1024;
    println!(
        "transport bench: {} MiB per measurement, loopback, {} cores",
        total >> 20,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "  raw tokio TCP:                          {:>8.0} MB/s",
        raw_tcp(total * 2).await
    );
    let source = make_chunks((total as usize).div_ceil(CHUNK), CHUNK);
    let wants: Vec<ChunkId> = source.0.keys().copied().collect();

    for quic in [false, true] {
        let name = if quic { "QUIC" } else { "TCP+Noise+Yamux" };
        // Each figure is the median of three runs, interleaved, so that a burst of other work
        // on this 2-core machine does not decide a ratio.
        let mut runs: [Vec<f64>; 4] = Default::default();
        for _ in 0..3 {
            runs[0].push(bare_streams(&pair(quic).await, total, 1).await);
            runs[1].push(bare_streams(&pair(quic).await, total, 4).await);
            runs[2].push(chunks_from_one(quic, &source, &wants).await);
            runs[3].push(chunks_from_two(quic, &source, &wants).await);
        }
        let [bare1, bare4, one, two] = runs.map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[1]
        });
        println!("  bare libp2p stream, {name:<16} 1 stream:  {bare1:>8.0} MB/s");
        println!("  bare libp2p stream, {name:<16} 4 streams: {bare4:>8.0} MB/s");
        println!(
            "  chunk transfer,     {name:<16} 1 peer:    {one:>8.0} MB/s  ({:.0}% of the bare 1-stream figure)",
            100.0 * one / bare1
        );
        println!(
            "  chunk transfer,     {name:<16} 2 peers:   {two:>8.0} MB/s  ({:.0}% of the bare 4-stream figure, {:.0}% of 1-stream)",
            100.0 * two / bare4,
            100.0 * two / bare1
        );
    }

    // Latency of one 4 KiB chunk, fetched on its own (stream open included).
    let small = make_chunks(1000, 4096);
    let ids: Vec<ChunkId> = small.0.keys().copied().collect();
    let p = pair(false).await;
    serve(&p.server, small);
    let server_peer = p.server_keys.device_id().to_peer_id();
    let mut times = Vec::with_capacity(ids.len());
    for id in ids {
        let start = Instant::now();
        let (bytes, _) = fetch_all(&p.client, vec![server_peer], vec![id]).await;
        assert_eq!(bytes, 4096);
        times.push(start.elapsed());
    }
    times.sort();
    let pct = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "  one 4 KiB chunk over TCP, 1,000 requests: p50 {:.0} µs, p99 {:.0} µs",
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
}
