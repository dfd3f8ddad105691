//! What a storage peer answers: `/meshsync/doc/2` (membership only) and `/meshsync/sealed/1`
//! (sealed changes, sealed chunks, signed releases). Every request is checked against the
//! membership log: only members get in (the transport gate), only writing members may store,
//! and every sealed change must carry its author's valid signature.

use std::collections::{BTreeMap, BTreeSet};

use meshsync_crdt::{ChunkId, DeviceId, Role, SealedChange, SignedHead};
use meshsync_transport::{rpc, PeerId, Transport};

use super::{apply_membership, SharedStorage, Storage, MAX_SEALED_CHUNK, REPLY_BUDGET};
use crate::protocol::{
    self, ByteBuf, SignedRelease, StoreReply, StoreRequest, SyncChanges, SyncReply, SyncRequest,
};
use crate::state::Batch;

/// Serves both protocols for `storage`.
pub(super) fn start(storage: &SharedStorage, transport: &Transport) -> anyhow::Result<()> {
    let s = storage.clone();
    protocol::serve(
        transport,
        rpc::DOC,
        SyncReply::Refused,
        move |peer, request| {
            let s = s.clone();
            async move { handle_doc(&s, peer, request).await }
        },
    )?;
    let s = storage.clone();
    protocol::serve(
        transport,
        rpc::SEALED,
        StoreReply::Refused,
        move |peer, request| {
            let s = s.clone();
            async move { handle_sealed(&s, peer, request).await }
        },
    )
}

async fn handle_doc(s: &SharedStorage, peer: PeerId, request: SyncRequest) -> SyncReply {
    match request {
        // Only membership: a storage peer has no folder state, and is never sent any.
        SyncRequest::Pull { membership, .. } => {
            let mut st = s.lock().await;
            let Some(log) = &mut st.log else {
                return SyncReply::Refused("this storage peer has not joined a mesh".into());
            };
            SyncReply::Changes(SyncChanges {
                membership: log.changes_since(&protocol::from_heads(&membership)),
                ..SyncChanges::default()
            })
        }
        SyncRequest::Push(changes) => {
            let changes = SyncChanges {
                membership: changes.membership,
                ..SyncChanges::default()
            };
            match apply_membership(s, changes, Some(peer)).await {
                Ok(()) => SyncReply::Ok,
                Err(error) => {
                    tracing::warn!(%peer, error = format!("{error:#}"), "refused membership changes");
                    SyncReply::Refused(error.to_string())
                }
            }
        }
        SyncRequest::ChunkLists(_) | SyncRequest::ListsSince(_) | SyncRequest::ListsIn { .. } => {
            SyncReply::Refused("a storage peer holds no chunk lists".into())
        }
    }
}

/// The role of `peer` in the mesh, if it is a member.
fn role_of(st: &Storage, peer: &PeerId) -> Option<Role> {
    let device = DeviceId::from_peer_id(peer)?;
    st.log.as_ref()?.view().members.get(&device).map(|m| m.role)
}

async fn handle_sealed(s: &SharedStorage, peer: PeerId, request: StoreRequest) -> StoreReply {
    let answered = match request {
        StoreRequest::Heads { mine } => Ok(heads(s, peer, mine).await),
        StoreRequest::Get { after } => get_changes(&*s.lock().await, &after),
        StoreRequest::Put(blobs) => Ok(put_changes(s, peer, blobs).await),
        StoreRequest::Missing(ids) => missing(s, peer, ids).await,
        StoreRequest::PutChunks(chunks) => put_chunks(s, peer, chunks).await,
        StoreRequest::Release(release) => release_chunks(s, peer, release).await,
    };
    answered.unwrap_or_else(StoreReply::Refused)
}

/// What it holds per author; notes the asking device's own signed head (for `status`).
async fn heads(s: &SharedStorage, peer: PeerId, mine: Option<SignedHead>) -> StoreReply {
    let mut st = s.lock().await;
    if let (Some(head), Some(log)) = (mine, &st.log) {
        let from_peer = DeviceId::from_peer_id(&peer) == Some(head.author);
        if from_peer && head.mesh == log.mesh() && head.verify().is_ok() {
            st.claimed.insert(head.author, head.seq);
        }
    }
    StoreReply::Heads(st.held.clone())
}

/// Sealed changes after `after` (per author), about [`REPLY_BUDGET`] at most per reply.
fn get_changes(st: &Storage, after: &BTreeMap<DeviceId, u64>) -> Result<StoreReply, String> {
    let mut blobs = Vec::new();
    let mut size = 0;
    let mut more = false;
    for (author, held) in &st.held {
        let from = after.get(author).copied().unwrap_or(0);
        if *held <= from {
            continue;
        }
        if size >= REPLY_BUDGET {
            more = true;
            break;
        }
        let found = st
            .state
            .sealed_after(author, from, REPLY_BUDGET - size)
            .map_err(|e| e.to_string())?;
        let got = found.len() as u64;
        size += found.iter().map(|(_, b)| b.len()).sum::<usize>();
        blobs.extend(found.into_iter().map(|(_, b)| ByteBuf::from(b)));
        if from + got < *held {
            more = true;
        }
    }
    Ok(StoreReply::Changes { blobs, more })
}

/// Which of `ids` are not held. The asking writer references them all from now on (it will
/// push the missing ones; the held ones it shares with whoever pushed them).
async fn missing(s: &SharedStorage, peer: PeerId, ids: Vec<ChunkId>) -> Result<StoreReply, String> {
    let ids = &ids[..ids.len().min(16_384)];
    let st = s.lock().await;
    if let (Some(writer), true) = (
        DeviceId::from_peer_id(&peer),
        role_of(&st, &peer) == Some(Role::Device),
    ) {
        st.state
            .add_chunk_refs(&writer, ids)
            .map_err(|e| e.to_string())?;
    }
    let missing = st.store.lock().expect("store lock").missing(ids);
    missing.map(StoreReply::Missing).map_err(|e| e.to_string())
}

/// Stores sealed chunks from a writing member (each no bigger than any sealed chunk).
async fn put_chunks(
    s: &SharedStorage,
    peer: PeerId,
    chunks: Vec<(ChunkId, ByteBuf)>,
) -> Result<StoreReply, String> {
    let store = {
        let st = s.lock().await;
        if role_of(&st, &peer) != Some(Role::Device) {
            tracing::warn!(%peer, "chunks from a device that may not write refused");
            return Err("only writing members may store chunks".into());
        }
        st.store.clone()
    };
    if chunks.iter().any(|(_, data)| data.len() > MAX_SEALED_CHUNK) {
        return Err("a chunk is larger than any sealed chunk".into());
    }
    if let Some(writer) = DeviceId::from_peer_id(&peer) {
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        let st = s.lock().await;
        st.state
            .add_chunk_refs(&writer, &ids)
            .map_err(|e| e.to_string())?;
    }
    let stored = tokio::task::spawn_blocking(move || {
        let refs: Vec<(ChunkId, &[u8])> = chunks.iter().map(|(id, d)| (*id, &d[..])).collect();
        store.lock().expect("store lock").put_batch(&refs)
    })
    .await
    .map_err(|e| e.to_string())?;
    stored.map(StoreReply::Stored).map_err(|e| e.to_string())
}

/// Deletes the chunks of a release signed by a writing member of this mesh.
async fn release_chunks(
    s: &SharedStorage,
    peer: PeerId,
    release: SignedRelease,
) -> Result<StoreReply, String> {
    let store = {
        let st = s.lock().await;
        let Some(log) = &st.log else {
            return Err("not in a mesh".into());
        };
        let writer = log
            .view()
            .members
            .get(&release.author)
            .is_some_and(|m| m.role == Role::Device);
        if release.mesh != log.mesh() || !writer || !release.verify() {
            tracing::warn!(%peer, "release refused: not signed by a writing member");
            return Err("release not signed by a writing member".into());
        }
        // Only what no other author still references goes.
        let unreferenced = st
            .state
            .drop_chunk_refs(&release.author, &release.chunks)
            .map_err(|e| e.to_string())?;
        (st.store.clone(), unreferenced)
    };
    let (store, unreferenced) = store;
    let removed = tokio::task::spawn_blocking(move || {
        store.lock().expect("store lock").remove(&unreferenced)
    })
    .await
    .map_err(|e| e.to_string())?;
    let (chunks, bytes) = removed.map_err(|e| e.to_string())?;
    tracing::info!(%peer, chunks, bytes, "released chunks deleted");
    Ok(StoreReply::Released { chunks, bytes })
}

/// Checks and stores sealed changes: each must be for this mesh and signed by a member who
/// may write; anything else is refused (and the rest of the batch still stored).
async fn put_changes(s: &SharedStorage, peer: PeerId, blobs: Vec<ByteBuf>) -> StoreReply {
    let mut st = s.lock().await;
    let st = &mut *st;
    let Some(log) = &st.log else {
        return StoreReply::Refused("this storage peer has not joined a mesh".into());
    };
    let mut batch = Batch::default();
    let mut in_batch = BTreeSet::new();
    let mut refused = Vec::new();
    for blob in blobs {
        let blob = blob.into_vec();
        let sealed = match SealedChange::decode(&blob) {
            Ok(sealed) => sealed,
            Err(error) => {
                refused.push(error.to_string());
                continue;
            }
        };
        if let Err(error) = sealed.check_author(&log.mesh(), log.view()) {
            refused.push(error.to_string());
            continue;
        }
        if !in_batch.insert((sealed.author, sealed.seq))
            || st
                .state
                .has_sealed(&sealed.author, sealed.seq)
                .unwrap_or(false)
        {
            continue; // already held
        }
        st.sealed_count += 1;
        st.sealed_bytes += blob.len() as u64;
        batch.sealed.push((sealed.author, sealed.seq, blob));
    }
    let stored = batch.sealed.len();
    let authors: BTreeSet<DeviceId> = batch.sealed.iter().map(|(a, _, _)| *a).collect();
    if stored > 0 {
        if let Err(error) = st.state.commit(batch) {
            return StoreReply::Refused(error.to_string());
        }
        // What it holds of an author is the run from 1 without a gap: a change that arrived
        // ahead of an earlier one is kept but not counted (or served) until the gap fills.
        for author in authors {
            let held = st.held.entry(author).or_insert(0);
            while st.state.has_sealed(&author, *held + 1).unwrap_or(false) {
                *held += 1;
            }
        }
    }
    if !refused.is_empty() {
        tracing::warn!(%peer, refused = ?refused, "sealed changes refused");
        return StoreReply::Refused(refused.join("; "));
    }
    StoreReply::Stored(stored)
}
