//! The exchange with storage peers, run when one connects and on every pull round (one at a
//! time): give it the membership, ask what it holds and check that against the signed heads
//! this device has seen (stale or rolled-back storage is reported), push this device's sealed
//! changes and the sealed chunks they name that it lacks, then pull and apply other authors'
//! sealed changes. The sealing and bookkeeping are [`crate::storage_client`].

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use meshsync_crdt::index::shard_of;
use meshsync_crdt::{
    ChunkId, ChunkListHash, DeviceId, FolderId, KeyRing, MembershipView, SealedChange,
};
use meshsync_transport::{PeerId, Transport};

use super::{materialise, Device, Shared};
use crate::chunks::{content, ChunkRef};
use crate::control::StorageReport;
use crate::protocol::{
    self, to_heads, ByteBuf, SealedPayload, StoreReply, StoreRequest, SyncChanges, SyncReply,
    SyncRequest,
};
use crate::state::Batch;
use crate::storage_client::{push_chunks, PUSH_BUDGET};

/// One exchange with a storage peer: push what it lacks of this device, pull what this device
/// lacks of others, and check that it is not serving an older state.
pub async fn sync_with_storage(device: &Shared, peer: PeerId) -> anyhow::Result<()> {
    let gate = device.lock().await.sealing.exchange_gate();
    let Ok(_one) = gate.try_lock() else {
        return Ok(()); // an exchange is under way
    };
    let storage = DeviceId::from_peer_id(&peer).context("storage peer without a device ID")?;
    let (transport, me, mine, seq, applied) = {
        let d = device.lock().await;
        let me = d.keys.device_id();
        (
            d.transport.clone(),
            me,
            d.sealing.heads.get(&me).cloned(),
            d.sealing.seq,
            d.sealing.applied.clone(),
        )
    };
    // Membership first, so the storage peer knows every device this one may send it to.
    let membership = {
        let mut d = device.lock().await;
        let heads = to_heads(&d.log.heads());
        (!d.sealing.membership_given(&storage, &heads)).then(|| (heads, d.log.changes_since(&[])))
    };
    if let Some((heads, changes)) = membership {
        let push = SyncRequest::Push(SyncChanges {
            membership: changes,
            ..Default::default()
        });
        if let SyncReply::Ok = protocol::doc(&transport, peer, &push).await? {
            device.lock().await.sealing.gave_membership(storage, heads);
        }
    }
    let StoreReply::Heads(held) =
        protocol::sealed(&transport, peer, &StoreRequest::Heads { mine }).await?
    else {
        anyhow::bail!("unexpected storage reply");
    };
    let mine_held = {
        let mut d = device.lock().await;
        let d = &mut *d;
        // Written only when something changed: this runs every half second.
        let before = postcard::to_stdvec(&d.sealing.storage.get(&storage)).unwrap_or_default();
        d.sealing.check_storage(me, storage, &held);
        if postcard::to_stdvec(&d.sealing.storage.get(&storage)).unwrap_or_default() != before {
            let mut batch = Batch::default();
            d.sealing.persist(&mut batch);
            d.state.commit(batch)?;
        }
        d.sealing.have(&d.state)?
    };
    // This device's sealed changes, and those others gave it, that the storage peer lacks.
    for (author, have) in &mine_held {
        let theirs = held.get(author).copied().unwrap_or(0);
        if theirs >= *have {
            continue;
        }
        push(device, &transport, peer, author, theirs, *author != me).await?;
        if *author == me {
            let mut d = device.lock().await;
            let view = d.sealing.storage.entry(storage).or_default();
            view.held.insert(me, seq);
            let most = view.most_held.entry(me).or_insert(0);
            *most = (*most).max(seq);
        }
    }
    let wanted = held
        .iter()
        .any(|(author, n)| *author != me && *n > applied.get(author).copied().unwrap_or(0));
    if wanted {
        pull(device, &transport, peer).await?;
    }
    Ok(())
}

/// Sends the storage peer `author`'s sealed changes after number `from` that this device
/// holds, each preceded by the sealed chunks it names that the storage peer lacks. Another
/// author's changes (`forwarded`) go only with every chunk they name: held by the storage peer
/// without them, they would look pushed to their author, who would then never send the chunks.
async fn push(
    device: &Shared,
    transport: &Transport,
    peer: PeerId,
    author: &DeviceId,
    from: u64,
    forwarded: bool,
) -> anyhow::Result<()> {
    let mut from = from;
    loop {
        let (blobs, key, served) = {
            let d = device.lock().await;
            let blobs: Vec<Vec<u8>> = d
                .state
                .sealed_after(author, from, PUSH_BUDGET)?
                .into_iter()
                .map(|(_, blob)| blob)
                .collect();
            (blobs, d.key_ring(), d.served())
        };
        if blobs.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<ChunkId> = Vec::new();
        let mut seen = BTreeSet::new();
        for blob in &blobs {
            let sealed = SealedChange::decode(blob)?;
            from = from.max(sealed.seq);
            let Ok(plain) = open_sealed(&key, &sealed) else {
                continue; // an epoch whose key this device does not hold
            };
            let payload: SealedPayload = postcard::from_bytes(&plain)?;
            for (_, list) in payload.lists {
                for c in list {
                    if seen.insert(c.id) {
                        ids.push(c.id);
                    }
                }
            }
        }
        for group in ids.chunks(8192) {
            let StoreReply::Missing(missing) =
                protocol::sealed(transport, peer, &StoreRequest::Missing(group.to_vec())).await?
            else {
                anyhow::bail!("unexpected storage reply");
            };
            let lacking = push_chunks(transport, peer, served.clone(), missing).await?;
            if forwarded && lacking > 0 {
                return Ok(()); // its author (or this device, once it holds the files) sends them
            }
        }
        let blobs = blobs.into_iter().map(ByteBuf::from).collect();
        protocol::sealed(transport, peer, &StoreRequest::Put(blobs)).await?;
    }
}

/// Fetches, checks, opens and applies other authors' sealed changes from a storage peer.
async fn pull(device: &Shared, transport: &Transport, peer: PeerId) -> anyhow::Result<()> {
    loop {
        let after = {
            let d = device.lock().await;
            let mut after = d.sealing.applied.clone();
            after.insert(d.keys.device_id(), u64::MAX);
            after
        };
        let StoreReply::Changes { blobs, more } =
            protocol::sealed(transport, peer, &StoreRequest::Get { after }).await?
        else {
            anyhow::bail!("unexpected storage reply");
        };
        if blobs.is_empty() {
            return Ok(());
        }
        let blobs = blobs.into_iter().map(ByteBuf::into_vec).collect();
        let before = device.lock().await.sealing.applied.clone();
        let changed = apply_sealed(device, peer, blobs).await?;
        if device.lock().await.sealing.applied == before {
            return Ok(()); // nothing usable (a gap, or forged changes): reported, not retried now
        }
        // Written in their own task: content may be slow to come (from this storage peer or
        // any device), and the exchange must not wait for it — this device's next change
        // reaches the storage peer on the next round, not after every file is written.
        for (folder, paths) in changed {
            materialise::spawn(device, peer, folder, paths);
        }
        if !more {
            return Ok(());
        }
    }
}

/// Admits sealed changes: each must be for this mesh, signed by a writing member, and open
/// under this device's key; its index changes then pass the same gate as a peer's.
async fn apply_sealed(
    device: &Shared,
    peer: PeerId,
    blobs: Vec<Vec<u8>>,
) -> anyhow::Result<Vec<(FolderId, BTreeSet<String>)>> {
    let mut d = device.lock().await;
    let d = &mut *d;
    let key = d.key_ring();
    let mesh = d.log.mesh();
    let view = d.log.view().clone();
    let me = d.keys.device_id();
    let mut batch = Batch::default();
    let mut changed: BTreeMap<FolderId, BTreeSet<String>> = BTreeMap::new();
    let mut decoded: Vec<(SealedChange, Vec<u8>)> = Vec::new();
    for blob in blobs {
        match SealedChange::decode(&blob) {
            Ok(sealed) if sealed.author != me => decoded.push((sealed, blob)),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%peer, %error, "unreadable sealed change from storage refused")
            }
        }
    }
    decoded.sort_by_key(|(sealed, _)| (sealed.author, sealed.seq));
    let storage = DeviceId::from_peer_id(&peer);
    let mut stopped: BTreeSet<DeviceId> = BTreeSet::new();
    for (sealed, blob) in decoded {
        let applied = d.sealing.applied.get(&sealed.author).copied().unwrap_or(0);
        if sealed.seq <= applied || stopped.contains(&sealed.author) {
            continue;
        }
        // Only an unbroken run counts: a storage peer that skips changes (or serves a forged
        // one) is reported, and nothing after the gap is taken from it.
        let problem = if sealed.seq != applied + 1 {
            Some(format!(
                "skipped {}'s changes {}..{} (served change {})",
                sealed.author.short(),
                applied + 1,
                sealed.seq - 1,
                sealed.seq
            ))
        } else {
            match sealed.check_author(&mesh, &view) {
                Ok(()) => None,
                // Made by a device that may not write now (removed since, or made read-only):
                // the storage peer rightly kept it, and this device refuses it. Not the
                // storage peer's fault, so not reported; a removed device's changes are
                // passed for good (the peer stops serving them), a read-only one's wait.
                Err(meshsync_crdt::SealedError::NotAWriter(author)) => {
                    tracing::debug!(%author, seq = sealed.seq, "sealed change of a device that may not write: refused");
                    if view.removed.contains_key(&author) {
                        d.sealing.applied.insert(author, sealed.seq);
                    } else {
                        stopped.insert(author);
                    }
                    continue;
                }
                Err(error) => Some(format!("served a change not signed by its author: {error}")),
            }
        };
        if let Some(problem) = problem {
            if let Some(storage) = storage {
                d.sealing.report(storage, problem);
            }
            stopped.insert(sealed.author);
            continue;
        }
        // Signed by its author: it counts as applied whatever its content turns out to be.
        d.sealing.applied.insert(sealed.author, sealed.seq);
        let head = sealed.head();
        if d.sealing
            .heads
            .get(&sealed.author)
            .is_none_or(|h| h.seq < head.seq)
        {
            d.sealing.heads.insert(sealed.author, head);
        }
        let plain = match open_sealed(&key, &sealed) {
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
        batch.sealed.push((sealed.author, sealed.seq, blob));
        d.sealing.changed();
        if let Some(paths) = admit(d, &view, &payload, &mut batch)? {
            changed.entry(payload.folder).or_default().extend(paths);
        }
    }
    d.sealing.persist(&mut batch);
    d.commit(batch)?;
    Ok(changed.into_iter().collect())
}

/// Admits one payload's index changes and chunk lists into `batch`; `None` if this device
/// does not sync that folder (the blob is kept for when it does).
fn admit(
    d: &mut Device,
    view: &MembershipView,
    payload: &SealedPayload,
    batch: &mut Batch,
) -> anyhow::Result<Option<BTreeSet<String>>> {
    let Some(folder) = d.folders.get_mut(&payload.folder) else {
        return Ok(None);
    };
    folder.heard = true;
    for (hash, list) in &payload.lists {
        if content::valid_list(hash, list) {
            batch.lists.push((*hash, list.clone()));
        }
    }
    let report = folder.index.apply(view, payload.changes.clone())?;
    for error in &report.refused {
        tracing::warn!(folder = %payload.folder, %error, "refused a change from a sealed change");
    }
    if report.dropped.changes > 0 {
        let mut map = d.chunk_map.lock().expect("chunk map lock");
        super::cutoff::settle_dropped(
            &payload.folder,
            folder,
            &d.keys,
            view.epoch,
            &mut map,
            batch,
            &report.dropped,
        )?;
    }
    let shards: BTreeSet<u16> = report
        .paths
        .iter()
        .map(|p| shard_of(&payload.folder, p))
        .collect();
    folder.save_shards(&payload.folder, shards, batch);
    Ok(Some(report.paths))
}

/// The chunk lists of folders this device syncs in sealed changes a member pushed along with
/// the same changes in the clear (`SyncChanges::sealed`, kept to pass on to storage peers,
/// checked by `Sealing::keep_forwarded`). Stored with the changes, they spare the catch-up
/// asking that member for the same lists again (a 256 MiB file's list is ~250 KB). Each must
/// match its hash (a record names a list by hash, so no other list is ever used); a blob that
/// does not open or decode is skipped, and its lists are asked for as before.
pub(super) fn lists_in_forwarded<'b>(
    d: &Device,
    blobs: impl IntoIterator<Item = &'b [u8]>,
) -> Vec<(ChunkListHash, Vec<ChunkRef>)> {
    let keys = d.key_ring();
    let mut lists = Vec::new();
    for blob in blobs {
        let Ok(sealed) = SealedChange::decode(blob) else {
            continue;
        };
        let Ok(plain) = open_sealed(&keys, &sealed) else {
            continue;
        };
        let Ok(payload) = postcard::from_bytes::<SealedPayload>(&plain) else {
            continue;
        };
        if !d.folders.contains_key(&payload.folder) {
            continue;
        }
        for (hash, list) in payload.lists {
            if content::valid_list(&hash, &list) {
                lists.push((hash, list));
            }
        }
    }
    lists
}

/// Opens `sealed` with this device's key of its epoch.
fn open_sealed(keys: &KeyRing, sealed: &SealedChange) -> anyhow::Result<Vec<u8>> {
    let key = keys
        .get(sealed.epoch)
        .with_context(|| format!("no mesh key of epoch {} here", sealed.epoch))?;
    Ok(sealed.open(key)?)
}

/// Replays every kept sealed change for `folder` (just added on this device) into its index.
pub(crate) fn replay(d: &mut Device, folder: &FolderId) -> anyhow::Result<()> {
    let key = d.key_ring();
    if key.is_empty() {
        return Ok(());
    }
    let mesh = d.log.mesh();
    let view = d.log.view().clone();
    let (authors, _, _) = d.state.sealed_summary()?;
    let mut batch = Batch::default();
    for author in authors.keys() {
        for (_, blob) in d.state.sealed_after(author, 0, usize::MAX)? {
            let Ok(sealed) = SealedChange::decode(&blob) else {
                continue;
            };
            if sealed.check_author(&mesh, &view).is_err() {
                continue;
            }
            let Ok(plain) = open_sealed(&key, &sealed) else {
                continue;
            };
            let Ok(payload) = postcard::from_bytes::<SealedPayload>(&plain) else {
                continue;
            };
            if payload.folder == *folder {
                admit(d, &view, &payload, &mut batch)?;
            }
        }
    }
    d.commit(batch)?;
    Ok(())
}

impl Device {
    /// This device's view of the storage peers, for `meshsync status`: each `connected: false`
    /// until the transport is asked (see `status::status`).
    pub(crate) fn storage_reports(&self) -> Vec<StorageReport> {
        let me = self.keys.device_id();
        self.log
            .view()
            .members
            .values()
            .filter(|m| m.role == meshsync_crdt::Role::Storage)
            .map(|m| {
                let view = self
                    .sealing
                    .storage
                    .get(&m.device)
                    .cloned()
                    .unwrap_or_default();
                let held = view.held.get(&me).copied().unwrap_or(0);
                StorageReport {
                    id: m.device.to_string(),
                    connected: false,
                    holds_my_changes: held,
                    holds: view.held.iter().map(|(a, n)| (a.to_string(), *n)).collect(),
                    my_changes: self.sealing.seq,
                    holds_latest: held >= self.sealing.seq,
                    stale_reports: view.reports,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_pair;
    use super::*;

    /// The sealed copies a member pushes along with its changes carry the chunk lists those
    /// changes name: a member that syncs the folder takes them (checked against their
    /// hashes), so it need not ask for them again; one that does not sync it, or a copy
    /// tampered with, gives none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunk_lists_come_out_of_the_sealed_copies_pushed_along_with_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, fa, fb) = test_pair(dir.path()).await;
        // Incompressible, several chunks.
        let data = crate::chunks::content::test_bytes(600_000, 3);
        std::fs::write(fa.join("big.bin"), &data).unwrap();
        let folder = crate::device::folder::add(&a, &fa, None).await.unwrap();
        let options = super::super::scan::ScanOptions {
            requested: true,
            ..Default::default()
        };
        super::super::scan::scan(&a, &folder, options)
            .await
            .unwrap();

        let blobs = {
            let d = a.lock().await;
            let me = d.keys.device_id();
            d.state.sealed_after(&me, 0, usize::MAX).unwrap()
        };
        assert!(!blobs.is_empty(), "a sealed its first scan");
        let blobs: Vec<Vec<u8>> = blobs.into_iter().map(|(_, blob)| blob).collect();

        // b does not sync the folder yet: nothing is taken.
        assert!(lists_in_forwarded(&*b.lock().await, blobs.iter().map(|b| &b[..])).is_empty());
        crate::device::folder::add(&b, &fb, Some(folder))
            .await
            .unwrap();
        let lists = lists_in_forwarded(&*b.lock().await, blobs.iter().map(|b| &b[..]));
        let whole: Vec<_> = (lists.iter())
            .filter(|(_, list)| content::list_size(list) == data.len() as u64)
            .collect();
        assert_eq!(whole.len(), 1, "big.bin's list, once: {lists:?}");
        let (hash, list) = whole[0];
        assert!(list.len() > 1 && content::valid_list(hash, list));
        let at_a = a.lock().await.state.chunk_list(hash).unwrap();
        assert_eq!(at_a.as_ref(), Some(list), "the very list a recorded");

        // A copy with one byte of its sealed payload changed does not open: no list from it.
        let tampered: Vec<Vec<u8>> = (blobs.iter())
            .map(|blob| {
                let mut blob = blob.clone();
                let middle = blob.len() / 2;
                blob[middle] ^= 1;
                blob
            })
            .collect();
        assert!(lists_in_forwarded(&*b.lock().await, tampered.iter().map(|b| &b[..])).is_empty());
    }
}
