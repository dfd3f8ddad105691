//! `/meshsync/chunks/1`: have/want and bulk chunk transfer.
//!
//! The client sends `Want` frames of up to [`BATCH`] chunk IDs and keeps two batches in flight
//! per stream, so the server always has the next batch queued while it streams the current one;
//! it opens [`STREAMS_PER_PEER`] streams to each peer, so the server reads and seals one batch
//! while it sends another.
//! The server answers every wanted ID in order with one frame: `[status][id][data]`, status 0
//! for a sealed chunk, 1 for "I don't have it", and 2 for a chunk in the clear.
//!
//! **In the clear** (inside the Noise channel, which is encrypted and authenticated): a `Want`
//! followed by the byte [`PLAIN_OK`] asks for chunks unsealed, and a source answers so only to
//! a peer it knows holds the mesh key ([`ChunkSource::holds_key`]: a device of the mesh, never
//! a storage peer) — sealing a chunk for a reader that holds the key to open it protects
//! nothing, and costs the server a seal and a second hash of the data (it must never seal other
//! bytes under a chunk's key and nonce) and the receiver an open. A peer that does not know the
//! flag reads the `Want` without it (postcard ignores what follows) and answers sealed. Either
//! way the receiver checks that the plaintext hashes to the ID it asked for.
//!
//! **Hints**: after [`PLAIN_OK`] a `Want` may carry a [`Near`], where the asker expects the
//! server to hold each chunk (a file of a synced folder, named as the index names it). A
//! server that keeps its chunks' places keyed by chunk looks each one up at a random spot of
//! a big table: at a million files, ~2 ms of disk a chunk. A file's own record, keyed by its
//! path, is read in the order the asker writes its files. A hint spares only that lookup: the
//! server reads the chunk there if its own record of that file says the chunk is in it, and
//! looks it up as usual otherwise. Hints go only to the peers the asker names as readers
//! (the other devices): a storage peer must not learn a file's name.
//!
//! [`fetch`] spreads the wanted chunks over several peers at once (one worker and stream per
//! peer, drawing batches from a shared queue), hands each received chunk to a bounded channel
//! (so a slow consumer slows the transfer rather than filling memory), and survives dropped
//! connections: unanswered IDs go back to the queue and the worker reconnects. The transport
//! never looks inside a chunk: the receiver authenticates it (AEAD) and may ask again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use meshsync_crdt::ChunkId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::frame::{self, FrameError};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshsync/chunks/1");
/// Chunk IDs per `Want` frame.
pub const BATCH: usize = 64;
/// The largest chunk served or accepted (FastCDC chunks are far smaller).
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;
/// The longest path a [`Near`] names (a longer one goes without a hint).
pub const MAX_NEAR_PATH: usize = 512;
/// The longest folder ID a [`Near`] names.
const MAX_NEAR_FOLDER: usize = 64;
const MAX_WANT_FRAME: usize =
    16 + BATCH * 33 + 1 + 16 + MAX_NEAR_FOLDER + BATCH * (3 + MAX_NEAR_PATH);
const IDLE: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const RECONNECTS: usize = 5;
/// Streams a fetch opens to each peer: while the peer reads and seals one `Want` on one, it
/// sends what it has for another. (Bulk sync bench (f): 196–206 MB/s with one, 238–253 with
/// two, 229–234 with four.)
const STREAMS_PER_PEER: usize = 2;

const HAVE: u8 = 0;
const MISSING: u8 = 1;
const HAVE_PLAIN: u8 = 2;
/// Follows a `Want`'s bytes: the asker takes chunks in the clear.
pub const PLAIN_OK: u8 = 1;

/// A batch of wanted chunk IDs.
#[derive(Serialize, Deserialize, Debug)]
pub struct Want {
    pub ids: Vec<ChunkId>,
}

/// Where the asker expects the chunks of a `Want` to lie on the server (see the module docs):
/// one path, or none, for each ID in order, all in one folder.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Near {
    pub folder: String,
    pub paths: Vec<Option<String>>,
}

impl Near {
    /// Checks a received `Near` against the `Want` it came with (hostile input: the frame's
    /// bound holds its size, this its shape).
    fn check(&self, ids: usize) -> Result<(), FrameError> {
        let long = self.paths.iter().flatten().any(|p| p.len() > MAX_NEAR_PATH);
        if self.paths.len() != ids || self.folder.len() > MAX_NEAR_FOLDER || long {
            return Err(FrameError::Malformed(format!(
                "hints for {} of {ids} chunks, or a name too long",
                self.paths.len()
            )));
        }
        Ok(())
    }
}

/// Where the asker of a fetch expects each chunk to lie, by ID: sent with each `Want` as a
/// [`Near`], to the peers in `readers` only. The names are the mesh's secret: a peer left out
/// (a storage peer) gets no hints, since it would read them even if its answer ignores them.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub folder: String,
    pub paths: std::collections::HashMap<ChunkId, String>,
    pub readers: std::collections::HashSet<PeerId>,
}

impl Hints {
    /// The `Near` of a `Want` of `ids`; `None` if it names nothing.
    fn near(&self, ids: &[ChunkId]) -> Option<Near> {
        if self.paths.is_empty() || self.folder.len() > MAX_NEAR_FOLDER {
            return None;
        }
        let paths: Vec<Option<String>> = ids
            .iter()
            .map(|id| {
                self.paths
                    .get(id)
                    .filter(|p| p.len() <= MAX_NEAR_PATH)
                    .cloned()
            })
            .collect();
        paths.iter().any(Option::is_some).then(|| Near {
            folder: self.folder.clone(),
            paths,
        })
    }
}

/// A chunk as a source answers it (`B`: `Bytes` as a source hands it out, `Vec<u8>` as a
/// fetch receives it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<B = bytes::Bytes> {
    Sealed(B),
    /// In the clear, for a peer that holds the mesh key (see the module docs).
    Plain(B),
}

impl<B: AsRef<[u8]>> Answer<B> {
    /// The bytes as sent, sealed or not.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Answer::Sealed(b) | Answer::Plain(b) => b.as_ref(),
        }
    }

    /// The same answer in another buffer.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Answer<C> {
        match self {
            Answer::Sealed(b) => Answer::Sealed(f(b)),
            Answer::Plain(b) => Answer::Plain(f(b)),
        }
    }
}

/// Where a node's chunks come from when it serves them. Called on a blocking thread.
/// `Bytes`, so that a store holding chunks in memory (or mapped) can hand them out uncopied.
pub trait ChunkSource: Send + Sync + 'static {
    /// Chunk `id`, sealed.
    fn get(&self, id: &ChunkId) -> Option<bytes::Bytes>;

    /// The chunks of one `Want`, in order, sealed: a source can share its lookups across them
    /// (one index read, each file opened once); by default, one `get` each.
    fn get_many(&self, ids: &[ChunkId]) -> Vec<Option<bytes::Bytes>> {
        ids.iter().map(|id| self.get(id)).collect()
    }

    /// Whether `peer` holds the mesh key, so may be sent chunks in the clear. By default no
    /// one does (a storage peer holds no key).
    fn holds_key(&self, _peer: &PeerId) -> bool {
        false
    }

    /// The chunks of one `Want` from a peer that [`holds_key`](Self::holds_key) and asked for
    /// them in the clear: each plain where the source can read it so, else sealed. By
    /// default, all sealed.
    fn get_many_plain(&self, ids: &[ChunkId]) -> Vec<Option<Answer>> {
        sealed(self.get_many(ids))
    }

    /// As [`get_many_plain`](Self::get_many_plain), with the asker's hints of where each
    /// chunk lies (checked against the source's own records, never trusted). By default,
    /// the hints are not used.
    fn get_many_near(&self, ids: &[ChunkId], near: &Near) -> Vec<Option<Answer>> {
        let _ = near;
        self.get_many_plain(ids)
    }
}

/// Chunks as [`ChunkSource::get_many`] gives them, as answers.
fn sealed(chunks: Vec<Option<bytes::Bytes>>) -> Vec<Option<Answer>> {
    let chunks = chunks.into_iter();
    chunks.map(|chunk| chunk.map(Answer::Sealed)).collect()
}

/// A chunk as received, not yet authenticated: sealed, or in the clear for the receiver to
/// check against its ID.
#[derive(Debug)]
pub struct Fetched {
    pub peer: PeerId,
    pub id: ChunkId,
    pub answer: Answer<Received>,
}

/// A received chunk's bytes. Its buffer goes back to the fetch that read it when this is
/// dropped, and the fetch reads a later chunk into it: memory already written, where a new
/// buffer would be zero-filled first (3.7 % of the receiving daemon's CPU in the bulk sync
/// bench) — the buffer keeps the length it grew to, the chunk's is kept beside it.
pub struct Received {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Pool>,
}

impl Received {
    /// The bytes alone (their buffer does not go back).
    pub fn into_vec(mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.truncate(self.len);
        buf
    }
}

impl From<Vec<u8>> for Received {
    fn from(buf: Vec<u8>) -> Received {
        Received {
            len: buf.len(),
            buf,
            pool: None,
        }
    }
}

impl std::ops::Deref for Received {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Received {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Received {
    fn eq(&self, other: &Received) -> bool {
        **self == **other
    }
}

impl Eq for Received {}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Received({} bytes)", self.len)
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

/// A fetch's spare buffers (see [`Received`]).
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Spare buffers a fetch keeps: enough for the chunks in the sink's channel and in flight.
const POOL_KEEPS: usize = 256;
/// A larger buffer is not kept (chunks are at most 128 KiB; a rare larger answer is not worth
/// holding on to).
const POOL_LARGEST: usize = 1 << 20;

impl Pool {
    /// A buffer of at least `len` written bytes (zero-filling only what it lacks).
    fn take(&self, len: usize) -> Received {
        let spare = self.0.lock().ok().and_then(|mut spare| spare.pop());
        let mut buf = spare.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Received {
            buf,
            len,
            pool: Some(self.clone()),
        }
    }

    /// Keeps `buf` for a later chunk, if there is room. Called from `Received`'s drop: never
    /// panics (a poisoned lock only loses the buffer).
    fn give(&self, buf: Vec<u8>) {
        let Ok(mut spare) = self.0.lock() else {
            return;
        };
        if spare.len() < POOL_KEEPS && buf.len() <= POOL_LARGEST {
            spare.push(buf);
        }
    }
}

/// What a [`fetch`] achieved.
#[derive(Debug, Default)]
pub struct FetchReport {
    pub received: usize,
    pub bytes: u64,
    /// IDs that no peer had, or that could not be fetched before every peer failed.
    pub missing: Vec<ChunkId>,
    /// Streams that broke and were resumed.
    pub reconnects: usize,
}

/// Splits a response frame into status, ID and data.
pub fn decode_response_header(frame: &[u8]) -> Result<(u8, ChunkId, &[u8]), FrameError> {
    if frame.len() < 33 {
        return Err(FrameError::Malformed(
            "chunk response shorter than its header".into(),
        ));
    }
    let status = frame[0];
    if ![HAVE, MISSING, HAVE_PLAIN].contains(&status) {
        return Err(FrameError::Malformed(format!(
            "unknown chunk status {status}"
        )));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&frame[1..33]);
    Ok((status, ChunkId(id), &frame[33..]))
}

/// Reads one answer: header, then the chunk straight into a buffer from `pool` (see
/// [`Received`]), refusing an oversized length before reading it. (Not `read_to_end`: at the
/// end of a full buffer it grows it once more, copying the chunk, and zeroes the new half —
/// about a tenth of the receiving daemon's CPU in the bulk sync bench.)
async fn read_response(
    stream: &mut libp2p::Stream,
    pool: &Pool,
) -> Result<(u8, ChunkId, Received), FrameError> {
    use futures::AsyncReadExt;
    let mut header = [0u8; 37];
    stream
        .read_exact(&mut header)
        .await
        .map_err(FrameError::of_read)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(33..=33 + MAX_CHUNK).contains(&len) {
        return Err(FrameError::TooLarge {
            len,
            limit: 33 + MAX_CHUNK,
        });
    }
    let (status, id, _) = decode_response_header(&header[4..])?;
    let mut data = pool.take(len - 33);
    let at = ..data.len;
    stream
        .read_exact(&mut data.buf[at])
        .await
        .map_err(FrameError::of_read)?;
    Ok((status, id, data))
}

/// Starts serving chunks from `source` on `/meshsync/chunks/1` (in a task, until the
/// transport stops).
pub fn start_serving(
    transport: &crate::Transport,
    source: Arc<dyn ChunkSource>,
) -> Result<(), crate::TransportError> {
    let incoming = transport
        .control()
        .accept(PROTOCOL)
        .map_err(|_| crate::TransportError::Setup(format!("{PROTOCOL} is already served")))?;
    tokio::spawn(serve(incoming, source, transport.clone()));
    Ok(())
}

/// Serves chunks from `source` on every incoming stream from an allowed peer.
pub async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    source: Arc<dyn ChunkSource>,
    transport: crate::Transport,
) {
    let limit = crate::limit::InboundLimit::default();
    while let Some((peer, stream)) = incoming.next().await {
        if !transport.allowed().contains(&peer) {
            tracing::warn!(%peer, "chunk stream from a non-member refused");
            continue;
        }
        let Some(place) = limit.admit(peer) else {
            tracing::warn!(%peer, "too many chunk streams from one peer; closing the new one");
            continue;
        };
        let source = source.clone();
        let counters = transport.counters(&peer);
        tokio::spawn(async move {
            let _place = place;
            if let Err(error) = serve_stream(stream, peer, source, counters).await {
                tracing::info!(%peer, %error, "chunk stream closed");
            }
        });
    }
}

async fn serve_stream(
    mut stream: libp2p::Stream,
    peer: PeerId,
    source: Arc<dyn ChunkSource>,
    counters: Arc<crate::Counters>,
) -> Result<(), FrameError> {
    while let Some(bytes) = frame::read_frame(&mut stream, MAX_WANT_FRAME, IDLE).await? {
        let (want, rest) = postcard::take_from_bytes::<Want>(&bytes)
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if want.ids.len() > BATCH {
            return Err(FrameError::Malformed(format!(
                "want of {} IDs (limit {BATCH})",
                want.ids.len()
            )));
        }
        let near = match rest {
            [PLAIN_OK, near @ ..] if !near.is_empty() => {
                let near: Near = postcard::from_bytes(near)
                    .map_err(|e| FrameError::Malformed(format!("hints: {e}")))?;
                near.check(want.ids.len())?;
                Some(near)
            }
            _ => None,
        };
        let plain = rest.first() == Some(&PLAIN_OK) && source.holds_key(&peer);
        let source = source.clone();
        let found = tokio::task::spawn_blocking(move || {
            let found = match (plain, near) {
                (true, Some(near)) => source.get_many_near(&want.ids, &near),
                (true, None) => source.get_many_plain(&want.ids),
                (false, _) => sealed(source.get_many(&want.ids)),
            };
            (want.ids.into_iter())
                .zip(found.into_iter().chain(std::iter::repeat(None)))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
        for (id, data) in found {
            let (status, data) = match &data {
                Some(Answer::Sealed(data)) if data.len() <= MAX_CHUNK => (HAVE, &data[..]),
                Some(Answer::Plain(data)) if data.len() <= MAX_CHUNK => (HAVE_PLAIN, &data[..]),
                _ => (MISSING, &[][..]),
            };
            let mut header = [0u8; 37];
            header[..4].copy_from_slice(&((33 + data.len()) as u32).to_be_bytes());
            header[4] = status;
            header[5..].copy_from_slice(&id.0);
            stream.write_all(&header).await?;
            stream.write_all(data).await?;
            counters.bytes_out.fetch_add(
                (header.len() + data.len()) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        stream.flush().await?;
    }
    Ok(())
}

struct Shared {
    queue: VecDeque<ChunkId>,
    hints: Arc<Hints>,
    /// Which peers said they lack an ID.
    lacking: BTreeMap<ChunkId, BTreeSet<PeerId>>,
    missing: Vec<ChunkId>,
    report: FetchReport,
}

/// Fetches `wants` from `peers` at once, sending each chunk to `sink` as it arrives.
pub async fn fetch(
    transport: &crate::Transport,
    peers: Vec<PeerId>,
    wants: Vec<ChunkId>,
    sink: mpsc::Sender<Fetched>,
) -> FetchReport {
    fetch_near(transport, peers, wants, Hints::default(), sink).await
}

/// [`fetch`], telling each peer where it probably holds each chunk (`hints`; see the module
/// docs). The wants are asked for in the order given: in the order of the files they
/// are in, the server reads its records and files in that order too.
pub async fn fetch_near(
    transport: &crate::Transport,
    peers: Vec<PeerId>,
    wants: Vec<ChunkId>,
    hints: Hints,
    sink: mpsc::Sender<Fetched>,
) -> FetchReport {
    let peers: Vec<PeerId> = peers
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let pool = Pool::default();
    let shared = Arc::new(Mutex::new(Shared {
        queue: wants.into_iter().collect(),
        hints: Arc::new(hints),
        lacking: BTreeMap::new(),
        missing: Vec::new(),
        report: FetchReport::default(),
    }));
    if peers.is_empty() {
        let mut s = shared.lock().expect("fetch state lock");
        let all: Vec<ChunkId> = s.queue.drain(..).collect();
        s.report.missing = all;
        return std::mem::take(&mut s.report);
    }
    // Workers stop when the queue is empty; one that fails puts its IDs back, so go round
    // again while work remains and some peer is still reachable.
    for _ in 0..RECONNECTS {
        let workers: Vec<_> = peers
            .iter()
            .flat_map(|&peer| std::iter::repeat_n(peer, STREAMS_PER_PEER))
            .map(|peer| {
                tokio::spawn(worker(
                    transport.clone(),
                    peer,
                    peers.len(),
                    shared.clone(),
                    sink.clone(),
                    pool.clone(),
                ))
            })
            .collect();
        let mut any_alive = false;
        for worker in workers {
            any_alive |= matches!(worker.await, Ok(true));
        }
        let empty = shared.lock().expect("fetch state lock").queue.is_empty();
        if empty || !any_alive {
            break;
        }
    }
    let mut s = shared.lock().expect("fetch state lock");
    let mut missing = std::mem::take(&mut s.missing);
    missing.extend(s.queue.drain(..));
    s.report.missing = missing;
    std::mem::take(&mut s.report)
}

/// Takes up to [`BATCH`] IDs this peer has not said it lacks.
fn take_batch(shared: &Mutex<Shared>, peer: &PeerId, peer_count: usize) -> Vec<ChunkId> {
    let mut s = shared.lock().expect("fetch state lock");
    let mut batch = Vec::with_capacity(BATCH);
    let mut skipped = Vec::new();
    while batch.len() < BATCH {
        let Some(id) = s.queue.pop_front() else { break };
        let lacking = s.lacking.get(&id);
        if lacking.is_some_and(|l| l.len() >= peer_count) {
            s.missing.push(id);
        } else if lacking.is_some_and(|l| l.contains(peer)) {
            skipped.push(id);
        } else {
            batch.push(id);
        }
    }
    let stuck = batch.is_empty() && !skipped.is_empty();
    for id in skipped {
        s.queue.push_back(id);
    }
    if stuck {
        // Only IDs this peer lacks are left; others will take them.
        return Vec::new();
    }
    batch
}

fn give_back(shared: &Mutex<Shared>, ids: impl IntoIterator<Item = ChunkId>) {
    let mut s = shared.lock().expect("fetch state lock");
    for id in ids {
        s.queue.push_front(id);
    }
}

/// One peer's share of a fetch. Returns whether the peer stayed reachable.
async fn worker(
    transport: crate::Transport,
    peer: PeerId,
    peer_count: usize,
    shared: Arc<Mutex<Shared>>,
    sink: mpsc::Sender<Fetched>,
    pool: Pool,
) -> bool {
    let mut failures = 0;
    let mut control = transport.control();
    let hints = shared.lock().expect("fetch state lock").hints.clone();
    let hints = hints.readers.contains(&peer).then_some(hints);
    loop {
        // After a dropped connection, redial at the addresses that worked before.
        transport.dial_peer(peer, Vec::new()).await;
        let opened = tokio::time::timeout(REPLY, control.open_stream(peer, PROTOCOL)).await;
        let opened = opened.unwrap_or_else(|_| {
            Err(libp2p_stream::OpenStreamError::Io(std::io::Error::other(
                "timed out",
            )))
        });
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) => {
                failures += 1;
                tracing::info!(%peer, %error, "cannot open chunk stream");
                if failures >= RECONNECTS {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100 * failures as u64)).await;
                continue;
            }
        };
        let mut in_flight: VecDeque<Vec<ChunkId>> = VecDeque::new();
        // Raced against each read only (the other awaits here are not safe to cancel: a
        // chunk taken off its batch could be dropped on its way to the sink).
        let cut = transport.cut_off(peer);
        tokio::pin!(cut);
        let result: Result<(), FrameError> = async {
            loop {
                while in_flight.len() < 2 {
                    let batch = take_batch(&shared, &peer, peer_count);
                    if batch.is_empty() {
                        break;
                    }
                    let mut frame = frame::encode(&Want { ids: batch.clone() });
                    frame.push(PLAIN_OK);
                    if let Some(near) = hints.as_ref().and_then(|h| h.near(&batch)) {
                        frame.extend(frame::encode(&near));
                    }
                    in_flight.push_back(batch);
                    frame::write_frame(&mut stream, &frame).await?;
                }
                let Some(batch) = in_flight.front_mut() else {
                    return Ok(());
                };
                while !batch.is_empty() {
                    let (status, id, data) = tokio::select! {
                        biased;
                        read = tokio::time::timeout(REPLY, read_response(&mut stream, &pool)) => {
                            read.map_err(|_| FrameError::Timeout(REPLY))??
                        }
                        () = &mut cut => return Err(FrameError::Closed),
                    };
                    if batch.first() != Some(&id) {
                        return Err(FrameError::Malformed("chunk answered out of order".into()));
                    }
                    batch.remove(0);
                    if status == MISSING {
                        let mut s = shared.lock().expect("fetch state lock");
                        s.lacking.entry(id).or_default().insert(peer);
                        s.queue.push_back(id);
                        continue;
                    }
                    {
                        let mut s = shared.lock().expect("fetch state lock");
                        s.report.received += 1;
                        s.report.bytes += data.len() as u64;
                    }
                    transport
                        .counters(&peer)
                        .bytes_in
                        .fetch_add(data.len() as u64 + 37, std::sync::atomic::Ordering::Relaxed);
                    let answer = match status {
                        HAVE_PLAIN => Answer::Plain(data),
                        _ => Answer::Sealed(data), // HAVE: MISSING was handled above
                    };
                    let fetched = Fetched { peer, id, answer };
                    if sink.send(fetched).await.is_err() {
                        return Ok(()); // the consumer is gone: nothing more to do
                    }
                }
                in_flight.pop_front();
            }
        }
        .await;
        match result {
            Ok(()) => {
                let _ = stream.close().await;
                return true;
            }
            Err(error) => {
                tracing::info!(%peer, %error, "chunk stream broke; resuming");
                give_back(&shared, in_flight.into_iter().flatten());
                shared.lock().expect("fetch state lock").report.reconnects += 1;
                failures += 1;
                if failures >= RECONNECTS {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100 * failures as u64)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_back_from_a_larger_chunk_holds_a_smaller_one_at_its_own_length() {
        let pool = Pool::default();
        let mut big = pool.take(100_000);
        big.buf[..100_000].fill(7);
        drop(big); // back to the pool, 100,000 bytes written
        let mut small = pool.take(40_000);
        assert_eq!(small.len(), 40_000);
        assert_eq!(
            small.buf.len(),
            100_000,
            "the same buffer, not zero-filled again"
        );
        small.buf[..40_000].fill(1);
        assert!(small.iter().all(|&b| b == 1));
        assert_eq!(small.into_vec(), vec![1; 40_000]);
        // into_vec kept its buffer: the pool is empty again, and a larger chunk gets a new one.
        let larger = pool.take(200_000);
        assert_eq!((larger.len(), larger.buf.len()), (200_000, 200_000));
        assert_eq!(Received::from(vec![3; 5]), Received::from(vec![3; 5]));
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_ordinary_buffers() {
        let pool = Pool::default();
        drop(pool.take(POOL_LARGEST + 1));
        assert_eq!(pool.0.lock().unwrap().len(), 0, "too large to keep");
        let held: Vec<Received> = (0..POOL_KEEPS + 10).map(|_| pool.take(1_000)).collect();
        drop(held);
        assert_eq!(pool.0.lock().unwrap().len(), POOL_KEEPS);
        assert!(pool.0.lock().unwrap().iter().all(|b| b.len() == 1_000));
    }
}
