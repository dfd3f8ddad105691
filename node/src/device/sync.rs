//! `/meshsync/doc/2` between devices: the server ([`serve`]), pulling from a peer ([`pull`]),
//! pushing this device's new changes ([`push_to_devices`]), and admitting what arrives
//! ([`apply_changes`]): every membership and index change passes `meshsync-crdt`'s gate
//! (signatures, authority, versions) before it is kept, then the changed paths are
//! materialised.
//!
//! A storage peer is sent membership only — never a path, a size or a chunk list — and its
//! folder state, should it send any, is ignored.

use std::collections::BTreeSet;

use meshsync_crdt::index::{shard_of, ShardChange};
use meshsync_crdt::{ChunkListHash, FolderId};
use meshsync_transport::{rpc, PeerId, Transport};
use tracing::Instrument;

use super::{materialise, Device, Shared};
use crate::phases::Phases;
use crate::protocol::{self, from_heads, to_heads, SyncChanges, SyncReply, SyncRequest};
use crate::state::Batch;

/// At most this many chunk lists are answered per request.
const MAX_LISTS_PER_REQUEST: usize = 10_000;
/// About how many bytes of index changes one answer to a pull carries (a message may be at
/// most `rpc::MAX_MESSAGE`, 64 MiB; a new device of a million-file folder lacks some 150 MB).
/// Smaller answers also keep each apply, and the device lock it holds, short.
const PULL_BUDGET: usize = 8 * 1024 * 1024;

/// Answers `/meshsync/doc/2` for `device`.
pub(crate) fn serve(device: &Shared, transport: &Transport) -> anyhow::Result<()> {
    let device = device.clone();
    protocol::serve(
        transport,
        rpc::DOC,
        SyncReply::Refused,
        move |peer, request| {
            let device = device.clone();
            async move { handle(&device, peer, request).await }
                .instrument(tracing::info_span!("doc", %peer))
        },
    )
}

async fn handle(device: &Shared, peer: PeerId, request: SyncRequest) -> SyncReply {
    match request {
        SyncRequest::Pull {
            membership,
            folders,
        } => SyncReply::Changes(device.lock().await.changes_for(&peer, membership, folders)),
        SyncRequest::Push(changes) => match apply_changes(device, peer, changes).await {
            Ok(()) => SyncReply::Ok,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "refused pushed changes");
                SyncReply::Refused(error.to_string())
            }
        },
        SyncRequest::ChunkLists(hashes) => {
            let state = match lists_state(device, &peer).await {
                Ok(state) => state,
                Err(refused) => return refused,
            };
            // Read without the device lock (thousands at a time during a first sync).
            let unique: BTreeSet<_> = hashes.into_iter().take(MAX_LISTS_PER_REQUEST).collect();
            match state.chunk_lists(&unique) {
                Ok(lists) => SyncReply::ChunkLists(lists),
                Err(error) => SyncReply::Refused(format!("cannot read chunk lists: {error}")),
            }
        }
        SyncRequest::ListsSince(asked) => {
            let asked = asked
                .into_iter()
                .map(|(hash, base)| (hash, base, String::new()));
            answer_lists(device, &peer, None, asked.collect()).await
        }
        SyncRequest::ListsIn { folder, asked } => {
            answer_lists(device, &peer, Some(folder), asked).await
        }
    }
}

/// The answer to `ListsSince` or `ListsIn` (`folder`: the folder of the paths named).
async fn answer_lists(
    device: &Shared,
    peer: &PeerId,
    folder: Option<FolderId>,
    mut asked: Vec<(ChunkListHash, Option<ChunkListHash>, String)>,
) -> SyncReply {
    let state = match lists_state(device, peer).await {
        Ok(state) => state,
        Err(refused) => return refused,
    };
    asked.truncate(MAX_LISTS_PER_REQUEST);
    // Blocking reads and diffs, thousands at a time during a first sync.
    let answer =
        tokio::task::spawn_blocking(move || super::lists::answer(&state, folder.as_ref(), &asked));
    match answer.await {
        Ok(Ok(lists)) => SyncReply::Lists(lists),
        Ok(Err(error)) => SyncReply::Refused(format!("cannot read chunk lists: {error}")),
        Err(error) => SyncReply::Refused(format!("cannot answer: {error}")),
    }
}

/// The state to read chunk lists from for `peer`, read without the device lock; refused to a
/// storage peer.
async fn lists_state(device: &Shared, peer: &PeerId) -> Result<crate::state::State, SyncReply> {
    let d = device.lock().await;
    if d.is_storage(peer) {
        return Err(SyncReply::Refused(
            "chunk lists are not for storage peers".into(),
        ));
    }
    Ok(d.state.clone())
}

impl Device {
    /// What `peer` lacks after the heads it sent (membership only for a storage peer).
    fn changes_for(
        &mut self,
        peer: &PeerId,
        membership: protocol::Heads,
        folders: Vec<(FolderId, std::collections::BTreeMap<u16, protocol::Heads>)>,
    ) -> SyncChanges {
        let mut changes = SyncChanges {
            membership: self.log.changes_since(&from_heads(&membership)),
            heads: self.sealing.heads(),
            ..SyncChanges::default()
        };
        if self.is_storage(peer) {
            changes.heads.clear();
            return changes;
        }
        // One answer per folder, however often a request names it; at most about
        // `PULL_BUDGET` bytes of changes, the rest at the next pull.
        let folders: std::collections::BTreeMap<_, _> = folders.into_iter().collect();
        let mut budget = PULL_BUDGET;
        for (id, heads) in folders {
            if let Some(folder) = self.folders.get_mut(&id) {
                if budget == 0 {
                    changes.more = true;
                    break;
                }
                let heads = heads.iter().map(|(s, h)| (*s, from_heads(h))).collect();
                let (slice, more) = match folder.index.changes_since_within(&heads, budget) {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::warn!(folder = %id, %error, "cannot read the index to answer a pull");
                        continue;
                    }
                };
                let bytes: usize = slice.iter().map(ShardChange::size).sum();
                budget = budget.saturating_sub(bytes);
                changes.more |= more;
                changes.folders.push((id, slice));
            }
        }
        changes
    }

    /// The `Pull` this device sends `peer`: its heads (membership only for a storage peer).
    fn pull_request(&mut self, peer: &PeerId) -> SyncRequest {
        let folders = if self.is_storage(peer) {
            Vec::new()
        } else {
            self.folders
                .iter_mut()
                .map(|(id, f)| {
                    let heads = f
                        .index
                        .heads()
                        .into_iter()
                        .map(|(s, h)| (s, to_heads(&h)))
                        .collect();
                    (id.clone(), heads)
                })
                .collect()
        };
        SyncRequest::Pull {
            membership: to_heads(&self.log.heads()),
            folders,
        }
    }
}

/// Pulls what `peer` has that this device lacks, and applies it. With a storage peer, that is
/// membership, then the sealed exchange in its own task (one at a time), so a long push does
/// not hold up the pulls from the other devices.
#[tracing::instrument(skip_all, fields(%peer))]
pub(crate) async fn pull(device: &Shared, peer: PeerId) -> anyhow::Result<()> {
    let (transport, request, storage) = {
        let mut d = device.lock().await;
        (
            d.transport.clone(),
            d.pull_request(&peer),
            d.is_storage(&peer),
        )
    };
    let mut request = request;
    loop {
        match protocol::doc(&transport, peer, &request).await? {
            SyncReply::Changes(changes) => {
                let more = changes.more;
                apply_changes(device, peer, changes).await?;
                let next = device.lock().await.pull_request(&peer);
                // Pulling again only while the last answer moved this device on: a peer
                // that keeps saying "more" without giving anything new is not followed.
                if !more || same_heads(&next, &request) {
                    break;
                }
                request = next;
            }
            SyncReply::Refused(reason) => anyhow::bail!("peer refused: {reason}"),
            _ => anyhow::bail!("unexpected reply"),
        }
    }
    if storage {
        let device = device.clone();
        tokio::spawn(
            async move {
                if let Err(error) = super::storage::sync_with_storage(&device, peer).await {
                    tracing::info!(
                        error = format!("{error:#}"),
                        "exchange with storage peer failed"
                    );
                }
            }
            .in_current_span(),
        );
    }
    Ok(())
}

fn same_heads(a: &SyncRequest, b: &SyncRequest) -> bool {
    postcard::to_stdvec(a).ok() == postcard::to_stdvec(b).ok()
}

/// Admits changes from `peer`, persists them, and starts materialising what changed.
pub(crate) async fn apply_changes(
    device: &Shared,
    peer: PeerId,
    changes: SyncChanges,
) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    let (changed, allowed, transport) = {
        let mut d = device.lock().await;
        let locked = began.elapsed();
        let (changed, allowed) = d.admit(&peer, changes)?;
        let paths: usize = changed.iter().map(|(_, p)| p.len()).sum();
        tracing::debug!(paths, ?locked, took = ?began.elapsed(), "admitted");
        (changed, allowed, d.transport.clone())
    };
    if let Some(allowed) = allowed {
        // A device that left and told this one hears the answer before it is cut off.
        transport.set_allowed_answering(allowed, peer).await;
    }
    // Written in their own task: content may be slow to come, and neither the peer waiting
    // for this answer nor this device's next pulls (storage exchanges among them) may wait
    // for it. What fails is retried by the catch-up.
    for (folder, paths) in changed {
        materialise::spawn(device, peer, folder, paths);
    }
    Ok(())
}

/// The paths that changed, per folder.
pub(crate) type Changed = Vec<(FolderId, BTreeSet<String>)>;

impl Device {
    /// Admits `changes` into the log and the indexes and commits them in one batch. Returns the
    /// changed paths and, if membership changed, who may connect now.
    fn admit(
        &mut self,
        peer: &PeerId,
        changes: SyncChanges,
    ) -> anyhow::Result<(Changed, Option<Vec<PeerId>>)> {
        let mut took = Phases::default();
        let mut batch = Batch::default();
        let mut allowed = None;
        if !changes.membership.is_empty() && self.log.apply(&changes.membership)? > 0 {
            batch.membership = Some(self.log.save());
            allowed = Some(self.membership_changed());
        }
        let mesh = self.log.mesh();
        let view = self.log.view().clone();
        self.sealing
            .saw_heads(&mesh, &view, changes.heads, &mut batch);
        let kept_before = batch.sealed.len();
        self.sealing
            .keep_forwarded(&mesh, &view, &self.state, changes.sealed, &mut batch);
        // The chunk lists in the sealed copies kept just now (those this device had already
        // came with their lists before).
        let kept = batch.sealed[kept_before..].iter();
        let lists = super::storage::lists_in_forwarded(self, kept.map(|(_, _, b)| &b[..]));
        batch.lists.extend(lists);
        // The lists a push carries, if it changes a folder this device syncs (a push from a
        // storage peer carries none; a folder not synced here gets nothing stored).
        let synced = |(id, _): &(FolderId, _)| self.folders.contains_key(id);
        if !self.is_storage(peer) && changes.folders.iter().any(synced) {
            let lists = super::lists::received(&self.state, changes.lists, &batch.lists);
            batch.lists.extend(lists);
        }
        took.mark("lists");
        let mut changed = Vec::new();
        if allowed.is_some() {
            self.drop_past_cutoffs(&view, &mut batch, &mut changed)?;
        }
        // Storage peers have no folder state to give.
        let folders = if self.is_storage(peer) {
            Vec::new()
        } else {
            changes.folders
        };
        for (id, folder_changes) in folders {
            let Some(folder) = self.folders.get_mut(&id) else {
                continue;
            };
            folder.heard = true; // a member that syncs it answered, with changes or none
            if folder_changes.is_empty() {
                continue;
            }
            let report = folder.index.apply(&view, folder_changes)?;
            took.mark("apply");
            note_refused(&id, *peer, &report.refused);
            if report.dropped.changes > 0 {
                let mut map = self.chunk_map.lock().expect("chunk map lock");
                let (keys, epoch) = (&self.keys, view.epoch);
                super::cutoff::settle_dropped(
                    &id,
                    folder,
                    keys,
                    epoch,
                    &mut map,
                    &mut batch,
                    &report.dropped,
                )?;
            }
            let shards: BTreeSet<u16> = report.paths.iter().map(|p| shard_of(&id, p)).collect();
            folder.save_shards(&id, shards, &mut batch);
            took.mark("save");
            changed.push((id, report.paths));
        }
        self.commit(batch)?;
        took.mark("commit");
        if !changed.is_empty() {
            tracing::debug!(took = %took, "admit's phases");
        }
        Ok((changed, allowed))
    }
}

/// Logs the changes a folder's index left out (the rest was applied; see
/// `FolderIndex::apply`).
pub(super) fn note_refused(folder: &FolderId, from: PeerId, refused: &[meshsync_crdt::IndexError]) {
    for error in refused.iter().take(10) {
        tracing::warn!(%folder, %from, %error, "refused a change");
    }
    if refused.len() > 10 {
        tracing::warn!(%folder, %from, "refused {} more changes", refused.len() - 10);
    }
}

/// Sends `push` to every connected device (storage peers get the sealed form, in their own
/// exchange), in the background: a peer that misses it pulls later.
pub(crate) fn push_to_devices(transport: Transport, storage: BTreeSet<PeerId>, push: SyncRequest) {
    tokio::spawn(
        async move {
            for peer in transport.connected_peers().await {
                if storage.contains(&peer) {
                    continue;
                }
                // Once more at once if it fails: a stream opened on a connection that was
                // closing fails although another connection to the peer is up.
                let mut sent = protocol::doc(&transport, peer, &push).await;
                if sent.is_err() {
                    sent = protocol::doc(&transport, peer, &push).await;
                }
                if let Err(error) = sent {
                    tracing::info!(%peer, %error, "push failed; the peer will pull");
                }
            }
        }
        .in_current_span(),
    );
}
