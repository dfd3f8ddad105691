//! Every message meshsync nodes send each other, in one place, and the one typed request
//! helper both protocols use.
//!
//! - `/meshsync/doc/2` ([`SyncRequest`] → [`SyncReply`]): between devices (and, membership
//!   only, with storage peers): pull changes since the asker's heads, push changes, fetch chunk
//!   lists by hash.
//! - `/meshsync/sealed/1` ([`StoreRequest`] → [`StoreReply`]): a device and a storage peer:
//!   sealed changes, sealed chunks, signed releases.
//! - [`JoinPayload`]: what an inviter gives a joiner at the end of pairing (`/meshsync/pair/1`
//!   runs in `meshsync-transport`).
//! - [`SealedPayload`]: what one sealed change holds once opened (it travels through storage
//!   peers, which cannot open it).
//!
//! Frames are postcard; the transport bounds their size before they are read. Chunks travel on
//! `/meshsync/chunks/1`, whose framing lives in `meshsync_transport::chunks`.
//!
//! ```no_run
//! # async fn demo(transport: &meshsync_transport::Transport, peer: meshsync_transport::PeerId)
//! # -> anyhow::Result<()> {
//! use meshsync_node::protocol::{self, SyncRequest};
//! let reply = protocol::doc(transport, peer, &SyncRequest::ChunkLists(vec![])).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use anyhow::Context;
use meshsync_crdt::index::ShardChange;
use meshsync_crdt::{ChunkId, ChunkListHash, DeviceId, DeviceKeys, FolderId, MeshId, SignedHead};
use meshsync_transport::{rpc, PeerId, Transport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
/// Bytes that encode as one length and a copy (not one element at a time).
pub use serde_bytes::ByteBuf;

use crate::chunks::delta::ListPiece;
use crate::chunks::ChunkRef;

/// Automerge change hashes, as they travel.
pub type Heads = Vec<[u8; 32]>;

pub fn to_heads(hashes: &[automerge::ChangeHash]) -> Heads {
    hashes.iter().map(|h| h.0).collect()
}

pub fn from_heads(heads: &Heads) -> Vec<automerge::ChangeHash> {
    heads.iter().map(|h| automerge::ChangeHash(*h)).collect()
}

/// A request on `/meshsync/doc/2`.
#[derive(Serialize, Deserialize, Debug)]
pub enum SyncRequest {
    /// Changes the asker lacks: membership since `membership`, and per folder per shard since
    /// the given heads.
    Pull {
        membership: Heads,
        folders: Vec<(FolderId, BTreeMap<u16, Heads>)>,
    },
    /// Changes the sender made or learned.
    Push(SyncChanges),
    /// The chunk lists with these hashes.
    ChunkLists(Vec<ChunkListHash>),
    /// The chunk lists with these hashes, each as pieces against the list named beside it
    /// where the answerer holds that one (the list of the version the asker replaces).
    ListsSince(Vec<(ChunkListHash, Option<ChunkListHash>)>),
    /// As `ListsSince`, each list with the path of a file of `folder` that has it in the
    /// index: the answerer takes it from its own record of that file where that record holds
    /// it (keyed by path: an asker's files in order are neighbouring rows), and looks the
    /// others up by hash.
    ListsIn {
        folder: FolderId,
        asked: Vec<(ChunkListHash, Option<ChunkListHash>, String)>,
    },
}

/// Changes between devices: admitted by the receiver's `meshsync-crdt` gate before use.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct SyncChanges {
    pub membership: Vec<Vec<u8>>,
    pub folders: Vec<(FolderId, Vec<ShardChange>)>,
    /// The latest signed head of every author the sender knows (see `SignedHead`).
    #[serde(default)]
    pub heads: Vec<SignedHead>,
    /// The sender's sealed form of the same changes, for the receiver to pass on to storage
    /// peers the sender may never meet.
    #[serde(default)]
    pub sealed: Vec<ByteBuf>,
    /// The answer to a pull stopped short of everything the puller lacks (a message has a
    /// size budget): pull again.
    #[serde(default)]
    pub more: bool,
    /// The chunk lists the changes name, when no sealed copy carries them (a mesh without
    /// storage peers): a changed file's list as pieces against its previous one.
    #[serde(default)]
    pub lists: Vec<SentList>,
}

/// A chunk list as it travels between devices: whole (no `base`, one `New` piece), or as
/// pieces against `base`, a list the receiver most likely holds (`chunks::delta`). The
/// receiver checks what it builds against `hash`, which a signed record names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SentList {
    pub hash: ChunkListHash,
    pub base: Option<ChunkListHash>,
    pub pieces: Vec<ListPiece>,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum SyncReply {
    Changes(SyncChanges),
    Ok,
    ChunkLists(Vec<(ChunkListHash, Vec<ChunkRef>)>),
    Refused(String),
    Lists(Vec<SentList>),
}

/// What the inviter sends a joiner after a successful handshake.
#[derive(Serialize, Deserialize, Debug)]
pub struct JoinPayload {
    pub mesh: MeshId,
    pub membership: Vec<Vec<u8>>,
    pub inviter_addrs: Vec<String>,
}

/// What one sealed change holds: one folder's index changes and the chunk lists they name.
#[derive(Serialize, Deserialize)]
pub struct SealedPayload {
    pub folder: FolderId,
    pub changes: Vec<ShardChange>,
    pub lists: Vec<(ChunkListHash, Vec<ChunkRef>)>,
}

/// A request on `/meshsync/sealed/1`.
#[derive(Serialize, Deserialize, Debug)]
pub enum StoreRequest {
    /// What the storage peer holds; `mine` is the asking device's own latest signed head, so
    /// the storage peer can tell whether it is up to date for that device.
    Heads { mine: Option<SignedHead> },
    /// Sealed changes after these sequence numbers (per author).
    Get { after: BTreeMap<DeviceId, u64> },
    /// Store these encoded sealed changes.
    Put(Vec<ByteBuf>),
    /// Which of these chunks are not held.
    Missing(Vec<ChunkId>),
    /// Store these sealed chunks.
    PutChunks(Vec<(ChunkId, ByteBuf)>),
    /// Forget chunks nothing references any more.
    Release(SignedRelease),
}

#[derive(Serialize, Deserialize, Debug)]
pub enum StoreReply {
    Heads(BTreeMap<DeviceId, u64>),
    Changes { blobs: Vec<ByteBuf>, more: bool },
    Stored(usize),
    Missing(Vec<ChunkId>),
    Released { chunks: usize, bytes: u64 },
    Refused(String),
}

const RELEASE_CONTEXT: &str = "meshsync chunk release v1";

/// A device's signed list of chunks that nothing it knows references any more (old versions
/// past their retention).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SignedRelease {
    pub mesh: MeshId,
    pub author: DeviceId,
    pub time: u64,
    pub chunks: Vec<ChunkId>,
    signature: meshsync_crdt::Signature,
}

impl SignedRelease {
    pub fn sign(mesh: MeshId, author: &DeviceKeys, chunks: Vec<ChunkId>) -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut release = SignedRelease {
            mesh,
            author: author.device_id(),
            time,
            chunks,
            signature: meshsync_crdt::Signature::from_bytes(&[0; 64]),
        };
        release.signature = author.sign(RELEASE_CONTEXT, &release.signed_bytes());
        release
    }

    fn signed_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&(&self.mesh, &self.author, &self.time, &self.chunks))
            .expect("releases always encode")
    }

    pub fn verify(&self) -> bool {
        meshsync_crdt::keys::verify(
            &self.author,
            RELEASE_CONTEXT,
            &self.signed_bytes(),
            &self.signature,
        )
        .is_ok()
    }
}

/// `/meshsync/removed/1`: a removed device that comes back asks, and is answered with the signed
/// entries that removed it (`Vec<ByteBuf>`, empty for anyone else), and nothing more.
pub const REMOVED: meshsync_transport::StreamProtocol =
    meshsync_transport::StreamProtocol::new("/meshsync/removed/1");

/// Sends one request on `protocol` and decodes the reply: the one request helper.
pub async fn request<Q: Serialize, R: DeserializeOwned>(
    transport: &Transport,
    peer: PeerId,
    protocol: meshsync_transport::StreamProtocol,
    request: &Q,
) -> anyhow::Result<R> {
    let bytes = rpc::request(
        transport,
        peer,
        protocol.clone(),
        &postcard::to_stdvec(request)?,
    )
    .await?;
    postcard::from_bytes(&bytes).with_context(|| format!("unreadable reply on {protocol}"))
}

/// A request on `/meshsync/doc/2`. One that fails within [`QUICK_FAILURE`] is tried again,
/// twice: the peer's libp2p-stream drops an inbound stream as it arrives while its accept
/// loop has one waiting already (at a million files, a batch's chunk lists were lost so, and
/// its 5,000 files left to the catch-up). Every doc request can be repeated: changes merge,
/// and the rest are reads.
pub async fn doc(
    transport: &Transport,
    peer: PeerId,
    message: &SyncRequest,
) -> anyhow::Result<SyncReply> {
    let mut tries = 1;
    loop {
        let began = std::time::Instant::now();
        match request(transport, peer, rpc::DOC, message).await {
            Err(error) if tries < 3 && began.elapsed() < QUICK_FAILURE => {
                tracing::debug!(%peer, %error, "doc request failed at once; again");
                tokio::time::sleep(std::time::Duration::from_millis(50 * tries)).await;
                tries += 1;
            }
            answer => return answer,
        }
    }
}

/// A doc request that fails sooner than this was most likely never read (see [`doc`]).
const QUICK_FAILURE: std::time::Duration = std::time::Duration::from_secs(1);

/// A request on `/meshsync/sealed/1`; a refusal is an error.
pub async fn sealed(
    transport: &Transport,
    peer: PeerId,
    message: &StoreRequest,
) -> anyhow::Result<StoreReply> {
    match request(transport, peer, rpc::SEALED, message).await? {
        StoreReply::Refused(reason) => anyhow::bail!("storage peer refused: {reason}"),
        reply => Ok(reply),
    }
}

/// Serves `protocol` with `handle` answering each decoded request; a request that does not
/// decode is answered with `refused(reason)`.
pub fn serve<Q, R, F, Fut>(
    transport: &Transport,
    protocol: meshsync_transport::StreamProtocol,
    refused: fn(String) -> R,
    handle: F,
) -> anyhow::Result<()>
where
    Q: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(PeerId, Q) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let name = protocol.to_string();
    rpc::serve(transport, protocol, move |peer, bytes| {
        let handle = handle.clone();
        let name = name.clone();
        async move {
            let reply = match postcard::from_bytes::<Q>(&bytes) {
                Ok(request) => handle(peer, request).await,
                Err(error) => {
                    tracing::info!(%peer, %error, "malformed request on {name}");
                    refused(format!("malformed request: {error}"))
                }
            };
            postcard::to_stdvec(&reply).ok()
        }
    })?;
    Ok(())
}
