//! A device's side of storage peers: the bookkeeping and the sealing, which need nothing from
//! the running device (the exchange itself, which does, is `device::storage`).
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

use std::collections::BTreeMap;

use meshsync_crdt::index::ShardChange;
use meshsync_crdt::{
    ChunkId, ChunkListHash, DeviceId, DeviceKeys, FolderId, MembershipView, MeshId, MeshKey,
    SealedChange, SignedHead,
};
use meshsync_transport::chunks::ChunkSource;
use meshsync_transport::{PeerId, Transport};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chunks::ChunkRef;
use crate::protocol::{self, ByteBuf, SealedPayload, StoreRequest};
use crate::state::{Batch, MetaKey, State};

/// This device's last sealed change number.
const SEALED_SEQ: MetaKey<u64> = MetaKey::new("sealed_seq");
/// The highest change number applied per other author.
const SEALED_APPLIED: MetaKey<BTreeMap<DeviceId, u64>> = MetaKey::new("sealed_applied");
/// The latest signed head seen per author.
const SEEN_HEADS: MetaKey<BTreeMap<DeviceId, SignedHead>> = MetaKey::new("seen_heads");
/// What this device knows of each storage peer.
const STORAGE_VIEWS: MetaKey<BTreeMap<DeviceId, StorageView>> = MetaKey::new("storage_views");

/// At most this many signed heads are looked at per message (one per member is the honest
/// number).
const MAX_HEADS: usize = 4096;

/// About how much plaintext one sealed change holds (a large batch becomes several).
pub const SEAL_BUDGET: usize = 4 * 1024 * 1024;

/// The most sealed changes one push may bring along to be passed on (the rest are skipped).
pub const MAX_FORWARDED: usize = 64;

/// How much of a push goes in one request.
pub(crate) const PUSH_BUDGET: usize = 4 * 1024 * 1024;

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

impl Sealing {
    pub fn load(state: &State) -> anyhow::Result<Sealing> {
        Ok(Sealing {
            seq: state.get(&SEALED_SEQ)?,
            applied: state.get(&SEALED_APPLIED)?,
            heads: state.get(&SEEN_HEADS)?,
            storage: state.get(&STORAGE_VIEWS)?,
            gate: Default::default(),
            membership_sent: BTreeMap::new(),
            have: None,
        })
    }

    /// Every signed head known, to pass to other devices.
    pub fn heads(&self) -> Vec<SignedHead> {
        self.heads.values().cloned().collect()
    }

    /// Keeps the newest valid head per author of `heads` (from another device); heads of
    /// devices that are not members are dropped unchecked.
    pub fn saw_heads(
        &mut self,
        mesh: &MeshId,
        view: &MembershipView,
        heads: Vec<SignedHead>,
        batch: &mut Batch,
    ) {
        let mut changed = false;
        for head in heads.into_iter().take(MAX_HEADS) {
            if !view.members.contains_key(&head.author) {
                continue;
            }
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
            batch.put(&SEEN_HEADS, &self.heads);
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
        lists: Vec<(ChunkListHash, Vec<ChunkRef>)>,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let mut payloads = Vec::new();
        let mut group: Vec<(ChunkListHash, Vec<ChunkRef>)> = Vec::new();
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
        // Numbered in order, then encoded, padded, encrypted and signed on every core.
        let first = self.seq + 1;
        let sealed: Vec<_> = (payloads.into_par_iter().enumerate())
            .map(|(n, (lists, changes))| {
                let payload = postcard::to_stdvec(&SealedPayload {
                    folder: folder.clone(),
                    changes,
                    lists,
                })?;
                let seq = first + n as u64;
                let sealed = SealedChange::seal(mesh, key, keys, seq, &payload);
                Ok((seq, sealed.head(), sealed.encode()))
            })
            .collect::<anyhow::Result<_>>()?;
        for (seq, head, encoded) in sealed {
            self.seq = seq;
            self.heads.insert(keys.device_id(), head);
            batch.sealed.push((keys.device_id(), seq, encoded));
        }
        batch.put(&SEALED_SEQ, &self.seq);
        batch.put(&SEEN_HEADS, &self.heads);
        Ok(())
    }

    /// Compares what a storage peer holds with what this device knows; returns new reports.
    ///
    /// - *Rolled back*: it holds less of an author than it said it held before.
    /// - *Behind a signed head*: it holds less of another author than a head this device has
    ///   seen signed by that author, three exchanges in a row (one exchange behind is just a
    ///   push still on its way). It may only not have met that author since; it is reported
    ///   either way, since it is serving an older state than one a member signed.
    pub(crate) fn check_storage(
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

    /// Notes a problem with what `storage` served (log, and `meshsync status`).
    pub(crate) fn report(&mut self, storage: DeviceId, problem: String) {
        let report = format!("storage peer {} {problem}", storage.short());
        tracing::warn!("{report}");
        let view = self.storage.entry(storage).or_default();
        if view.reports.last() != Some(&report) {
            view.reports.push(report);
        }
        let excess = view.reports.len().saturating_sub(20);
        view.reports.drain(..excess);
    }

    pub(crate) fn persist(&self, batch: &mut Batch) {
        batch.put(&SEALED_APPLIED, &self.applied);
        batch.put(&STORAGE_VIEWS, &self.storage);
        batch.put(&SEEN_HEADS, &self.heads);
    }

    /// One exchange with storage peers at a time: the gate to hold while exchanging.
    pub(crate) fn exchange_gate(&self) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.gate.clone()
    }

    /// What this device holds of each author (the run from 1), counted once per change.
    pub(crate) fn have(&mut self, state: &State) -> anyhow::Result<BTreeMap<DeviceId, u64>> {
        if let Some(have) = &self.have {
            return Ok(have.clone());
        }
        let (have, _, _) = state.sealed_summary()?;
        self.have = Some(have.clone());
        Ok(have)
    }

    /// Forgets the count of [`Sealing::have`] (a sealed change was added).
    pub(crate) fn changed(&mut self) {
        self.have = None;
    }

    /// Whether the membership with `heads` was already given to `storage` (this run).
    pub(crate) fn membership_given(&self, storage: &DeviceId, heads: &[[u8; 32]]) -> bool {
        self.membership_sent.get(storage).map(Vec::as_slice) == Some(heads)
    }

    pub(crate) fn gave_membership(&mut self, storage: DeviceId, heads: Vec<[u8; 32]>) {
        self.membership_sent.insert(storage, heads);
    }

    /// Keeps sealed changes another device sent along with its changes (checked like a storage
    /// peer checks them), to pass on to storage peers. Their content arrived in the clear form.
    pub fn keep_forwarded(
        &mut self,
        mesh: &MeshId,
        view: &MembershipView,
        state: &State,
        blobs: Vec<ByteBuf>,
        batch: &mut Batch,
    ) {
        for blob in blobs.into_iter().take(MAX_FORWARDED) {
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
            self.have = None;
        }
    }
}

/// Reads, seals and sends chunks, about 4 MiB a request, three requests in flight.
/// Pushes the sealed chunks `ids` that `served` holds; returns how many it does not hold.
pub(crate) async fn push_chunks(
    transport: &Transport,
    peer: PeerId,
    served: impl ChunkSource + 'static,
    ids: Vec<ChunkId>,
) -> anyhow::Result<usize> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(ChunkId, ByteBuf)>>(2);
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::new();
        let mut size = 0;
        let mut skipped = 0;
        for id in ids {
            // A chunk no current file holds any more (edited since) is skipped: the newer
            // version's change brings its own chunks.
            let Some(sealed) = served.get(&id) else {
                skipped += 1;
                continue;
            };
            size += sealed.len();
            batch.push((id, ByteBuf::from(sealed.to_vec())));
            if size >= PUSH_BUDGET {
                if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return skipped;
                }
                size = 0;
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
        skipped
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
            protocol::sealed(&transport, peer, &StoreRequest::PutChunks(batch))
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    Ok(reader.await?)
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
        let (mut log, mesh) =
            meshsync_crdt::MembershipLog::create(&me, "me", &MeshKey::generate(Epoch(0)));
        log.append(
            &me,
            meshsync_crdt::Action::Add {
                device: other.device_id(),
                role: meshsync_crdt::Role::Device,
                name: meshsync_crdt::SealedName::unreadable("other"),
                kem: Some(other.kem_public()),
                wrapped: None,
            },
        )
        .unwrap();
        let view = log.view().clone();
        let mut sealing = Sealing::default();
        let mut batch = Batch::default();
        sealing.saw_heads(&mesh, &view, vec![head(&other, mesh, 5)], &mut batch);
        // A forged head (signature of another number) is not believed.
        let mut forged = head(&other, mesh, 6);
        forged.seq = 9;
        sealing.saw_heads(&mesh, &view, vec![forged], &mut batch);
        assert_eq!(sealing.heads[&other.device_id()].seq, 5);
        // Nor is a stranger's, however well signed.
        let stranger = DeviceKeys::generate();
        sealing.saw_heads(&mesh, &view, vec![head(&stranger, mesh, 1)], &mut batch);
        assert!(!sealing.heads.contains_key(&stranger.device_id()));

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
                signature: meshsync_crdt::Signature::from_bytes(&[0; 64]),
            })
            .collect();
        let lists: Vec<(ChunkListHash, Vec<ChunkRef>)> = (0..100u32)
            .map(|i| {
                let mut hash = [0u8; 32];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                let chunk = ChunkRef {
                    id: ChunkId(hash),
                    offset: 0,
                    len: 1,
                };
                (ChunkListHash(hash), vec![chunk; 300])
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
