//! A device's side of storage peers.
//!
//! - **Sealing**: every batch of this device's index changes is also sealed
//!   ([`SealedChange`]: padded, encrypted under the index key, signed, numbered 1, 2, … per
//!   author) together with the chunk lists it names, and kept in the state database until
//!   storage peers have it.
//! - **Push**: on meeting a storage peer, the device asks what it holds, sends the sealed
//!   chunks it lacks (read from the current files and sealed on the way out), then the sealed
//!   changes after the last one it holds.
//! - **Pull**: then it fetches every other author's sealed changes it has not applied, checks
//!   and opens them, admits their index changes through the same gate as a peer's, keeps the
//!   blobs (a folder added later is replayed from them), and writes the files, fetching chunks
//!   from the storage peer and any connected device.
//! - **Stale storage**: devices pass each other the latest signed head of every author they
//!   know. A storage peer that holds less of an author than a head this device has seen, or
//!   less than it held before, is reported (log and `meshsync status`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use meshsync_crdt::index::{shard_of, ShardChange};
use meshsync_crdt::{
    ChunkId, ChunkListHash, DeviceId, DeviceKeys, FolderId, MeshId, MeshKey, SealedChange,
    SignedHead,
};
use meshsync_transport::chunks::ChunkSource;
use meshsync_transport::{rpc, PeerId, Transport};
use serde::{Deserialize, Serialize};

use crate::content::ChunkRef;
use crate::daemon::{Shared, WireList};
use crate::state::{Batch, State};
use crate::storage::{ByteBuf, StoreReply, StoreRequest};

/// What one sealed change holds: one folder's index changes and the chunk lists they name.
#[derive(Serialize, Deserialize)]
struct SealedPayload {
    folder: FolderId,
    changes: Vec<ShardChange>,
    lists: Vec<(ChunkListHash, WireList)>,
}

/// About how much plaintext one sealed change holds (a large batch becomes several).
pub const SEAL_BUDGET: usize = 4 * 1024 * 1024;

/// How much of a push goes in one request.
const PUSH_BUDGET: usize = 4 * 1024 * 1024;

/// What this device knows of one storage peer.
#[derive(Default, Clone, Serialize, Deserialize)]
pub struct StorageView {
    /// The most the storage peer ever said it held, per author.
    pub most_held: BTreeMap<DeviceId, u64>,
    /// What it holds now, per author.
    #[serde(skip)]
    pub held: BTreeMap<DeviceId, u64>,
    /// Stale states noticed (newest last, at most 20).
    pub reports: Vec<String>,
    /// Authors it is behind a signed head of: (exchanges in a row, that head's number).
    #[serde(skip)]
    behind: BTreeMap<DeviceId, (u32, u64)>,
}

/// A device's sealing state (see the module docs).
#[derive(Default)]
pub struct Sealing {
    /// This device's last sealed change number.
    pub seq: u64,
    /// The highest change number applied per other author.
    pub applied: BTreeMap<DeviceId, u64>,
    /// The latest signed head seen per author.
    pub heads: BTreeMap<DeviceId, SignedHead>,
    /// Storage peers met.
    pub storage: BTreeMap<DeviceId, StorageView>,
    /// One exchange with storage peers at a time.
    gate: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The membership heads last given to each storage peer (this run).
    membership_sent: BTreeMap<DeviceId, Vec<[u8; 32]>>,
    /// What this device holds of each author (the run from 1), while no sealed change was
    /// added since it was counted.
    have: Option<BTreeMap<DeviceId, u64>>,
}

fn meta<T: for<'de> Deserialize<'de> + Default>(state: &State, key: &str) -> anyhow::Result<T> {
    Ok(match state.meta(key)? {
        Some(bytes) => postcard::from_bytes(&bytes).with_context(|| format!("state {key}"))?,
        None => T::default(),
    })
}

impl Sealing {
    pub fn load(state: &State) -> anyhow::Result<Sealing> {
        Ok(Sealing {
            seq: meta(state, "sealed_seq")?,
            applied: meta(state, "sealed_applied")?,
            heads: meta(state, "seen_heads")?,
            storage: meta(state, "storage_views")?,
            gate: Default::default(),
            membership_sent: BTreeMap::new(),
            have: None,
        })
    }

    /// Every signed head known, to pass to other devices.
    pub fn heads(&self) -> Vec<SignedHead> {
        self.heads.values().cloned().collect()
    }

    /// Keeps the newest valid head per author of `heads` (from another device).
    pub fn saw_heads(&mut self, mesh: &MeshId, heads: Vec<SignedHead>, batch: &mut Batch) {
        let mut changed = false;
        for head in heads {
            // Only a newer head is worth a signature check (this runs on every pull).
            let newer = self
                .heads
                .get(&head.author)
                .is_none_or(|h| h.seq < head.seq);
            if newer && head.mesh == *mesh && head.verify().is_ok() {
                self.heads.insert(head.author, head);
                changed = true;
            }
        }
        if changed {
            batch.meta.push((
                "seen_heads".into(),
                postcard::to_stdvec(&self.heads).unwrap_or_default(),
            ));
        }
    }

    /// Seals one batch of this device's changes to `folder` as its next sealed changes, into
    /// `batch` (committed with the index change itself). A big batch (a first scan of a large
    /// folder) becomes several sealed changes of at most about [`SEAL_BUDGET`] each: the chunk
    /// lists first, then the index changes, so a device applying them in order always has the
    /// lists of the records it admits.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &mut self,
        keys: &DeviceKeys,
        key: &MeshKey,
        mesh: MeshId,
        folder: &FolderId,
        changes: &[ShardChange],
        lists: Vec<(ChunkListHash, WireList)>,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let mut payloads = Vec::new();
        let mut group: Vec<(ChunkListHash, WireList)> = Vec::new();
        let mut size = 0;
        for (hash, list) in lists {
            size += 40 + list.len() * 48;
            group.push((hash, list));
            if size >= SEAL_BUDGET {
                payloads.push((std::mem::take(&mut group), Vec::new()));
                size = 0;
            }
        }
        let mut part: Vec<ShardChange> = Vec::new();
        for change in changes {
            size += change.change.len() + 8;
            part.push(change.clone());
            if size >= SEAL_BUDGET {
                payloads.push((std::mem::take(&mut group), std::mem::take(&mut part)));
                size = 0;
            }
        }
        if !group.is_empty() || !part.is_empty() {
            payloads.push((group, part));
        }
        self.have = None;
        for (lists, changes) in payloads {
            let payload = postcard::to_stdvec(&SealedPayload {
                folder: folder.clone(),
                changes,
                lists,
            })?;
            self.seq += 1;
            let sealed = SealedChange::seal(mesh, key, keys, self.seq, &payload);
            self.heads.insert(keys.device_id(), sealed.head());
            batch
                .sealed
                .push((keys.device_id(), self.seq, sealed.encode()));
        }
        batch
            .meta
            .push(("sealed_seq".into(), postcard::to_stdvec(&self.seq)?));
        batch.meta.push((
            "seen_heads".into(),
            postcard::to_stdvec(&self.heads).unwrap_or_default(),
        ));
        Ok(())
    }

    /// Compares what a storage peer holds with what this device knows; returns new reports.
    ///
    /// - *Rolled back*: it holds less of an author than it said it held before.
    /// - *Behind a signed head*: it holds less of another author than a head this device has
    ///   seen signed by that author, three exchanges in a row (one exchange behind is just a
    ///   push still on its way). It may only not have met that author since; it is reported
    ///   either way, since it is serving an older state than one a member signed.
    fn check_storage(
        &mut self,
        me: DeviceId,
        storage: DeviceId,
        held: &BTreeMap<DeviceId, u64>,
    ) -> Vec<String> {
        let view = self.storage.entry(storage).or_default();
        let mut reports = Vec::new();
        for (author, most) in &view.most_held {
            let now = held.get(author).copied().unwrap_or(0);
            if now < *most {
                reports.push(format!(
                    "storage peer {} rolled back: it holds {}'s changes up to {now}, but held up to {most} before",
                    storage.short(),
                    author.short()
                ));
            }
        }
        for (author, head) in &self.heads {
            let now = held.get(author).copied().unwrap_or(0);
            let most = view.most_held.get(author).copied().unwrap_or(0);
            if *author == me || now >= head.seq || now < most {
                view.behind.remove(author);
                continue;
            }
            let count = view.behind.entry(*author).or_insert((0, 0));
            if count.1 != head.seq {
                *count = (0, head.seq);
            }
            count.0 += 1;
            if count.0 == 3 {
                reports.push(format!(
                    "storage peer {} serves an older state: {} signed change {} but it holds up to {now}",
                    storage.short(),
                    author.short(),
                    head.seq
                ));
            }
        }
        for (author, n) in held {
            let most = view.most_held.entry(*author).or_insert(0);
            *most = (*most).max(*n);
        }
        view.held = held.clone();
        for report in &reports {
            tracing::warn!("{report}");
        }
        view.reports.extend(reports.iter().cloned());
        let excess = view.reports.len().saturating_sub(20);
        view.reports.drain(..excess);
        reports
    }

    fn persist(&self, batch: &mut Batch) {
        batch.meta.push((
            "sealed_applied".into(),
            postcard::to_stdvec(&self.applied).unwrap_or_default(),
        ));
        batch.meta.push((
            "storage_views".into(),
            postcard::to_stdvec(&self.storage).unwrap_or_default(),
        ));
        batch.meta.push((
            "seen_heads".into(),
            postcard::to_stdvec(&self.heads).unwrap_or_default(),
        ));
    }
}

pub(crate) async fn ask(
    transport: &Transport,
    peer: PeerId,
    request: &StoreRequest,
) -> anyhow::Result<StoreReply> {
    let bytes = rpc::request(transport, peer, rpc::SEALED, &postcard::to_stdvec(request)?).await?;
    let reply: StoreReply = postcard::from_bytes(&bytes).context("unreadable storage reply")?;
    if let StoreReply::Refused(reason) = &reply {
        anyhow::bail!("storage peer refused: {reason}");
    }
    Ok(reply)
}

/// One exchange with a storage peer: push what it lacks of this device, pull what this device
/// lacks of others, and check that it is not serving an older state.
pub async fn sync_with_storage(node: &Shared, peer: PeerId) -> anyhow::Result<()> {
    let gate = node.lock().await.sealing.gate.clone();
    let Ok(_one) = gate.try_lock() else {
        return Ok(()); // an exchange is under way
    };
    let storage = DeviceId::from_peer_id(&peer).context("storage peer without a device ID")?;
    let (transport, me, mine, seq, applied) = {
        let n = node.lock().await;
        let me = n.keys.device_id();
        (
            n.transport.clone(),
            me,
            n.sealing.heads.get(&me).cloned(),
            n.sealing.seq,
            n.sealing.applied.clone(),
        )
    };
    // Membership first, so the storage peer knows every device this one may send it to.
    let membership = {
        let mut n = node.lock().await;
        let heads = crate::daemon::to_heads(&n.log.heads());
        (n.sealing.membership_sent.get(&storage) != Some(&heads))
            .then(|| (heads, n.log.changes_since(&[])))
    };
    if let Some((heads, changes)) = membership {
        let push = crate::daemon::SyncRequest::Push(crate::daemon::SyncChanges {
            membership: changes,
            ..Default::default()
        });
        if let crate::daemon::SyncReply::Ok =
            crate::daemon::request(&transport, peer, &push).await?
        {
            node.lock()
                .await
                .sealing
                .membership_sent
                .insert(storage, heads);
        }
    }
    let StoreReply::Heads(held) = ask(&transport, peer, &StoreRequest::Heads { mine }).await?
    else {
        anyhow::bail!("unexpected storage reply");
    };
    let mine_held = {
        let mut n = node.lock().await;
        let n = &mut *n;
        // Written only when something changed: this runs every half second.
        let before = postcard::to_stdvec(&n.sealing.storage.get(&storage)).unwrap_or_default();
        n.sealing.check_storage(me, storage, &held);
        if postcard::to_stdvec(&n.sealing.storage.get(&storage)).unwrap_or_default() != before {
            let mut batch = Batch::default();
            n.sealing.persist(&mut batch);
            n.state.commit(batch)?;
        }
        match &n.sealing.have {
            Some(have) => have.clone(),
            None => {
                let (have, _, _) = n.state.sealed_summary()?;
                n.sealing.have = Some(have.clone());
                have
            }
        }
    };
    // This device's sealed changes, and those others gave it, that the storage peer lacks.
    for (author, have) in &mine_held {
        let theirs = held.get(author).copied().unwrap_or(0);
        if theirs >= *have {
            continue;
        }
        push(node, &transport, peer, author, theirs).await?;
        if *author == me {
            let mut n = node.lock().await;
            let view = n.sealing.storage.entry(storage).or_default();
            view.held.insert(me, seq);
            let most = view.most_held.entry(me).or_insert(0);
            *most = (*most).max(seq);
        }
    }
    let wanted = held
        .iter()
        .any(|(author, n)| *author != me && *n > applied.get(author).copied().unwrap_or(0));
    if wanted {
        pull(node, &transport, peer).await?;
    }
    Ok(())
}

/// Sends the storage peer `author`'s sealed changes after number `from` that this device
/// holds, each preceded by the sealed chunks it names that the storage peer lacks.
async fn push(
    node: &Shared,
    transport: &Transport,
    peer: PeerId,
    author: &DeviceId,
    from: u64,
) -> anyhow::Result<()> {
    let mut from = from;
    loop {
        let (blobs, key, served) = {
            let n = node.lock().await;
            let blobs: Vec<Vec<u8>> = n
                .state
                .sealed_after(author, from, PUSH_BUDGET)?
                .into_iter()
                .map(|(_, blob)| blob)
                .collect();
            (blobs, n.mesh_key()?, n.served())
        };
        if blobs.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<ChunkId> = Vec::new();
        let mut seen = BTreeSet::new();
        for blob in &blobs {
            let sealed = SealedChange::decode(blob)?;
            from = from.max(sealed.seq);
            let Ok(plain) = sealed.open(&key) else {
                continue; // another epoch: its chunks went with it
            };
            let payload: SealedPayload = postcard::from_bytes(&plain)?;
            for (_, list) in payload.lists {
                for (id, _, _) in list {
                    if seen.insert(id) {
                        ids.push(id);
                    }
                }
            }
        }
        for group in ids.chunks(8192) {
            let StoreReply::Missing(missing) =
                ask(transport, peer, &StoreRequest::Missing(group.to_vec())).await?
            else {
                anyhow::bail!("unexpected storage reply");
            };
            push_chunks(transport, peer, &served, missing).await?;
        }
        let blobs = blobs.into_iter().map(ByteBuf::from).collect();
        ask(transport, peer, &StoreRequest::Put(blobs)).await?;
    }
}

/// Reads, seals and sends chunks, about 4 MiB a request, three requests in flight.
async fn push_chunks(
    transport: &Transport,
    peer: PeerId,
    served: &crate::daemon::Served,
    ids: Vec<ChunkId>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(ChunkId, ByteBuf)>>(2);
    let served = served.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::new();
        let mut size = 0;
        for id in ids {
            // A chunk no current file holds any more (edited since) is skipped: the newer
            // version's change brings its own chunks.
            let Some(sealed) = served.get(&id) else {
                continue;
            };
            size += sealed.len();
            batch.push((id, ByteBuf::from(sealed.to_vec())));
            if size >= PUSH_BUDGET {
                if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return;
                }
                size = 0;
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
    });
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some(batch) = rx.recv().await {
        while in_flight.len() >= 3 {
            if let Some(done) = in_flight.join_next().await {
                done??;
            }
        }
        let transport = transport.clone();
        in_flight.spawn(async move {
            ask(&transport, peer, &StoreRequest::PutChunks(batch))
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    reader.await?;
    Ok(())
}

/// Fetches, checks, opens and applies other authors' sealed changes from a storage peer.
async fn pull(node: &Shared, transport: &Transport, peer: PeerId) -> anyhow::Result<()> {
    loop {
        let after = {
            let n = node.lock().await;
            let mut after = n.sealing.applied.clone();
            after.insert(n.keys.device_id(), u64::MAX);
            after
        };
        let StoreReply::Changes { blobs, more } =
            ask(transport, peer, &StoreRequest::Get { after }).await?
        else {
            anyhow::bail!("unexpected storage reply");
        };
        if blobs.is_empty() {
            return Ok(());
        }
        let blobs = blobs.into_iter().map(ByteBuf::into_vec).collect();
        let changed = apply_sealed(node, peer, blobs).await?;
        for (folder, paths) in changed {
            crate::daemon::materialise(node, peer, &folder, paths).await?;
        }
        if !more {
            return Ok(());
        }
    }
}

/// Admits sealed changes: each must be for this mesh, signed by a writing member, and open
/// under this device's key; its index changes then pass the same gate as a peer's.
async fn apply_sealed(
    node: &Shared,
    peer: PeerId,
    blobs: Vec<Vec<u8>>,
) -> anyhow::Result<Vec<(FolderId, BTreeSet<String>)>> {
    let mut n = node.lock().await;
    let n = &mut *n;
    let key = n.mesh_key()?;
    let mesh = n.log.mesh();
    let view = n.log.view().clone();
    let me = n.keys.device_id();
    let mut batch = Batch::default();
    let mut changed: BTreeMap<FolderId, BTreeSet<String>> = BTreeMap::new();
    for blob in blobs {
        let sealed = match SealedChange::decode(&blob) {
            Ok(sealed) => sealed,
            Err(error) => {
                tracing::warn!(%peer, %error, "unreadable sealed change from storage refused");
                continue;
            }
        };
        if sealed.author == me {
            continue;
        }
        // Seen, whatever comes of it: it is not asked for again.
        let applied = n.sealing.applied.entry(sealed.author).or_insert(0);
        *applied = (*applied).max(sealed.seq);
        if let Err(error) = sealed.check_author(&mesh, &view) {
            tracing::warn!(%peer, %error, "sealed change from storage refused");
            continue;
        }
        let plain = match sealed.open(&key) {
            Ok(plain) => plain,
            Err(error) => {
                tracing::warn!(%peer, %error, "sealed change from storage does not open");
                continue;
            }
        };
        let Ok(payload) = postcard::from_bytes::<SealedPayload>(&plain) else {
            tracing::warn!(%peer, "sealed change holds an unreadable payload");
            continue;
        };
        let applied = n.sealing.applied.entry(sealed.author).or_insert(0);
        *applied = (*applied).max(sealed.seq);
        let head = sealed.head();
        if n.sealing
            .heads
            .get(&sealed.author)
            .is_none_or(|h| h.seq < head.seq)
        {
            n.sealing.heads.insert(sealed.author, head);
        }
        batch.sealed.push((sealed.author, sealed.seq, blob));
        n.sealing.have = None;
        if let Some(paths) = admit(n, &view, &payload, &mut batch)? {
            changed.entry(payload.folder).or_default().extend(paths);
        }
    }
    n.sealing.persist(&mut batch);
    n.state.commit(batch)?;
    Ok(changed.into_iter().collect())
}

/// Admits one payload's index changes and chunk lists into `batch`; `None` if this device
/// does not sync that folder (the blob is kept for when it does).
fn admit(
    n: &mut crate::daemon::Node,
    view: &meshsync_crdt::MembershipView,
    payload: &SealedPayload,
    batch: &mut Batch,
) -> anyhow::Result<Option<BTreeSet<String>>> {
    let Some(folder) = n.folders.get_mut(&payload.folder) else {
        return Ok(None);
    };
    for (hash, list) in &payload.lists {
        let refs: Vec<ChunkRef> = list
            .iter()
            .map(|(id, offset, len)| ChunkRef {
                id: *id,
                offset: *offset,
                len: *len,
            })
            .collect();
        if crate::content::chunk_list_hash(&refs) == *hash {
            batch.lists.push((*hash, refs));
        }
    }
    let report = folder.index.apply(view, payload.changes.clone())?;
    let shards: BTreeSet<u16> = report
        .paths
        .iter()
        .map(|p| shard_of(&payload.folder, p))
        .collect();
    for shard in shards {
        if let Some(bytes) = folder.index.save_shard(shard) {
            batch.shards.push((payload.folder.clone(), shard, bytes));
        }
    }
    Ok(Some(report.paths))
}

/// Keeps sealed changes another device sent along with its changes (checked like a storage
/// peer checks them), to pass on to storage peers. Their content arrived in the clear form.
pub fn keep_forwarded(
    sealing: &mut Sealing,
    mesh: &MeshId,
    view: &meshsync_crdt::MembershipView,
    state: &State,
    blobs: Vec<ByteBuf>,
    batch: &mut Batch,
) {
    for blob in blobs.into_iter().take(64) {
        let blob = blob.into_vec();
        let Ok(sealed) = SealedChange::decode(&blob) else {
            continue;
        };
        if sealed.check_author(mesh, view).is_err()
            || state.has_sealed(&sealed.author, sealed.seq).unwrap_or(true)
        {
            continue;
        }
        batch.sealed.push((sealed.author, sealed.seq, blob));
        sealing.have = None;
    }
}

/// Replays every kept sealed change for `folder` (just added on this device) into its index.
pub fn replay(n: &mut crate::daemon::Node, folder: &FolderId) -> anyhow::Result<()> {
    let Some(key) = n.key.lock().expect("key lock").clone() else {
        return Ok(());
    };
    let mesh = n.log.mesh();
    let view = n.log.view().clone();
    let (authors, _, _) = n.state.sealed_summary()?;
    let mut batch = Batch::default();
    for author in authors.keys() {
        for (_, blob) in n.state.sealed_after(author, 0, usize::MAX)? {
            let Ok(sealed) = SealedChange::decode(&blob) else {
                continue;
            };
            if sealed.check_author(&mesh, &view).is_err() {
                continue;
            }
            let Ok(plain) = sealed.open(&key) else {
                continue;
            };
            let Ok(payload) = postcard::from_bytes::<SealedPayload>(&plain) else {
                continue;
            };
            if payload.folder == *folder {
                admit(n, &view, &payload, &mut batch)?;
            }
        }
    }
    n.state.commit(batch)?;
    Ok(())
}

/// This device's view of the storage peers, for `meshsync status`.
pub fn status(n: &crate::daemon::Node, connected: &BTreeSet<PeerId>) -> serde_json::Value {
    let me = n.keys.device_id();
    let storage: Vec<serde_json::Value> = n
        .log
        .view()
        .members
        .values()
        .filter(|m| m.role == meshsync_crdt::Role::Storage)
        .map(|m| {
            let view = n
                .sealing
                .storage
                .get(&m.device)
                .cloned()
                .unwrap_or_default();
            let held = view.held.get(&me).copied().unwrap_or(0);
            serde_json::json!({
                "id": m.device.to_string(),
                "connected": connected.contains(&m.device.to_peer_id()),
                "holds_my_changes": held,
                "holds": view.held.iter().map(|(a, n)| (a.to_string(), *n)).collect::<BTreeMap<_, _>>(),
                "my_changes": n.sealing.seq,
                "holds_latest": held >= n.sealing.seq,
                "stale_reports": view.reports,
            })
        })
        .collect();
    serde_json::json!(storage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshsync_crdt::Epoch;

    fn head(author: &DeviceKeys, mesh: MeshId, seq: u64) -> SignedHead {
        SealedChange::seal(mesh, &MeshKey::generate(Epoch(0)), author, seq, b"x").head()
    }

    #[test]
    fn a_storage_peer_behind_a_signed_head_is_reported_after_three_exchanges_and_a_rollback_at_once(
    ) {
        let (me, other, storage) = (
            DeviceKeys::generate(),
            DeviceKeys::generate(),
            DeviceKeys::generate().device_id(),
        );
        let mesh = MeshId::for_genesis(&me.device_id(), &[3; 16]);
        let mut sealing = Sealing::default();
        let mut batch = Batch::default();
        sealing.saw_heads(&mesh, vec![head(&other, mesh, 5)], &mut batch);
        // A forged head (signature of another number) is not believed.
        let mut forged = head(&other, mesh, 6);
        forged.seq = 9;
        sealing.saw_heads(&mesh, vec![forged], &mut batch);
        assert_eq!(sealing.heads[&other.device_id()].seq, 5);

        let behind = BTreeMap::from([(other.device_id(), 3)]);
        let me_id = me.device_id();
        assert!(sealing.check_storage(me_id, storage, &behind).is_empty());
        assert!(sealing.check_storage(me_id, storage, &behind).is_empty());
        let third = sealing.check_storage(me_id, storage, &behind);
        assert_eq!(third.len(), 1, "{third:?}");
        assert!(third[0].contains("older state"), "{third:?}");
        assert!(
            sealing.check_storage(me_id, storage, &behind).is_empty(),
            "reported once"
        );
        // Caught up, then back: a rollback, reported at once.
        let caught_up = BTreeMap::from([(other.device_id(), 5)]);
        assert!(sealing.check_storage(me_id, storage, &caught_up).is_empty());
        let rolled = sealing.check_storage(me_id, storage, &behind);
        assert!(
            rolled.iter().any(|r| r.contains("rolled back")),
            "{rolled:?}"
        );
        assert_eq!(sealing.storage[&storage].reports.len(), 2);
        // This device's own changes not pushed yet are no report.
        let mut mine = Sealing::default();
        mine.heads.insert(me_id, head(&me, mesh, 2));
        for _ in 0..4 {
            assert!(mine
                .check_storage(me_id, storage, &BTreeMap::new())
                .is_empty());
        }
    }

    #[test]
    fn a_big_batch_is_sealed_as_several_changes_lists_first() {
        let keys = DeviceKeys::generate();
        let mesh = MeshId::for_genesis(&keys.device_id(), &[4; 16]);
        let key = MeshKey::generate(Epoch(0));
        let folder = FolderId::new("big").unwrap();
        let changes: Vec<ShardChange> = (0..40u16)
            .map(|shard| ShardChange {
                shard,
                change: vec![shard as u8; 150_000],
            })
            .collect();
        let lists: Vec<(ChunkListHash, WireList)> = (0..100u32)
            .map(|i| {
                let mut hash = [0u8; 32];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                (ChunkListHash(hash), vec![(ChunkId(hash), 0, 1); 300])
            })
            .collect();
        let mut sealing = Sealing::default();
        let mut batch = Batch::default();
        sealing
            .seal(&keys, &key, mesh, &folder, &changes, lists, &mut batch)
            .unwrap();
        assert!(
            batch.sealed.len() >= 2,
            "{} sealed changes",
            batch.sealed.len()
        );
        assert_eq!(sealing.seq, batch.sealed.len() as u64);
        let open_key = key.clone();
        let (mut seen_changes, mut seen_lists, mut changes_started) = (0, 0, false);
        for (i, (author, seq, blob)) in batch.sealed.iter().enumerate() {
            assert_eq!((*author, *seq), (keys.device_id(), i as u64 + 1));
            assert!(blob.len() < meshsync_crdt::sealed::MAX_SEALED_BYTES / 4);
            let sealed = SealedChange::decode(blob).unwrap();
            let payload: SealedPayload =
                postcard::from_bytes(&sealed.open(&open_key).unwrap()).unwrap();
            if !payload.changes.is_empty() {
                changes_started = true;
            }
            assert!(
                payload.lists.is_empty() || !changes_started || !payload.changes.is_empty(),
                "lists come before or with the changes"
            );
            seen_changes += payload.changes.len();
            seen_lists += payload.lists.len();
        }
        assert_eq!((seen_changes, seen_lists), (40, 100));
        assert_eq!(sealing.heads[&keys.device_id()].seq, sealing.seq);
    }
}
