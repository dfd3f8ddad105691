//! Admitting a peer's index changes: a change a loaded shard already holds is dropped unchecked;
//! in any other, each operation must put a well-formed record, signed by a device that may
//! write, in the right shard ([`FolderIndex::admit_change`]); a change whose dependencies have
//! not arrived is held ([`FolderIndex::ready`]); and no put may replace a version at least as
//! new as its own, or jump a path's version ahead ([`FolderIndex::check_versions`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{ActorId, ChangeHash, ReadDoc, ROOT};
use rayon::prelude::*;

use super::*;

/// A peer's shard change, decoded within bounds, not yet checked.
struct Decoded {
    shard: u16,
    change: automerge::Change,
    signature: Signature,
}

/// Decodes a peer's shard change within the bounds every change must keep.
fn decode_change(c: ShardChange) -> Result<Decoded, IndexError> {
    if c.shard >= SHARDS {
        return Err(IndexError::BadShard(c.shard));
    }
    if c.change.len() > MAX_CHANGE_BYTES {
        return Err(IndexError::TooLarge(c.change.len()));
    }
    let change = crate::bounds::bounded_change(&c.change, MAX_CHANGE_BYTES, MAX_OPS_PER_CHANGE)
        .map_err(IndexError::Load)?;
    Ok(Decoded {
        shard: c.shard,
        change,
        signature: c.signature,
    })
}

/// A peer's shard change whose every operation passed admission: its puts are (path, record,
/// the operations it replaces).
pub(super) struct Admitted {
    pub(super) shard: u16,
    pub(super) change: automerge::Change,
    signature: Signature,
    puts: Vec<(String, FileRecord, Vec<automerge::legacy::OpId>)>,
}

/// The most changes held while their dependencies are missing (the oldest go first)…
const MAX_HELD_CHANGES: usize = 10_000;
/// …and the most bytes they may take.
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// Applies admitted `changes` to one shard. Automerge takes a batch whole or not at all, and
/// refuses one holding a change that reuses another's actor ID and sequence number: a twin,
/// which only the device the actor names can sign — so its keys are in someone else's hands.
/// If the batch is refused, each change is applied alone. Of two twins every replica keeps the
/// one with the lower hash, so they cannot split the mesh: a replica holding the other drops it
/// (with what was built on it, see [`Shard::rebuild_without`]) and takes the lower one.
fn apply_to(
    shard: &mut Shard,
    actor: &ActorId,
    me: Option<DeviceId>,
    changes: Vec<automerge::Change>,
) -> (Vec<IndexError>, Dropped) {
    let mut dropped = Dropped::default();
    if shard.doc.apply_changes(changes.clone()).is_ok() {
        return (Vec::new(), dropped);
    }
    let mut refused = Vec::new();
    for change in changes {
        let Err(error) = shard.doc.apply_changes([change.clone()]) else {
            continue;
        };
        let twin = shard
            .doc
            .get_changes(&[])
            .into_iter()
            .find(|c| c.actor_id() == change.actor_id() && c.seq() == change.seq());
        let signer = actor_device(change.actor_id()).map(|(d, _)| d);
        let Some(twin) = twin else {
            refused.push(IndexError::ForbiddenOp(format!(
                "change {} refused by the document: {error}",
                change.hash()
            )));
            continue;
        };
        let equivocation = IndexError::Equivocation {
            device: signer.map_or_else(|| "?".into(), |d| d.to_string()),
            seq: change.seq(),
        };
        let lower = change.hash() < twin.hash();
        if lower {
            let gone = twin.hash();
            let rebuilt = shard.rebuild_without(actor, me, |c| c.hash() == gone, &mut dropped);
            if let Err(error) = rebuilt.and_then(|()| Ok(shard.doc.apply_changes([change])?)) {
                refused.push(error);
                continue;
            }
        }
        refused.push(equivocation);
    }
    dropped.newest_own_only();
    (refused, dropped)
}

impl FolderIndex {
    /// Admits changes from a peer (see the module docs). Each change stands alone: one that
    /// fails admission is left out and named in [`ApplyReport::refused`] — with every change
    /// that depends on it, which waits for it in vain — and the rest is applied, so one bad
    /// change (or a member relaying one) never blocks the folder. A change whose dependencies
    /// have not arrived is held here (not handed to Automerge) and checked again once they
    /// have: only then can the versions it replaces be compared with its own, so an old signed
    /// record bundled with an unseen newer one can never roll a path back. A change this
    /// replica already has is skipped. `Err` only if the document itself fails.
    pub fn apply(
        &mut self,
        view: &MembershipView,
        changes: Vec<ShardChange>,
    ) -> Result<ApplyReport, IndexError> {
        let mut report = ApplyReport::default();
        let decoded: Vec<Result<Decoded, IndexError>> =
            changes.into_par_iter().map(decode_change).collect();
        let mut fresh = Vec::with_capacity(decoded.len());
        for result in decoded {
            match result {
                Ok(decoded) => fresh.push(decoded),
                Err(error) => report.refused.push(error),
            }
        }
        // A change a loaded shard already holds is dropped before its signatures are checked
        // (they are most of admission's cost). A peer resends whole shards when it does not
        // know this replica's heads yet: at a million files, a change just made here came
        // back whole from the peer it was pushed to, ~9,000 signatures a change. Nothing is
        // loaded for this: what a peer sends makes this replica read shards only once checked.
        fresh.retain(|d| !self.holds(d.shard, &d.change.hash()));
        let mut pending = std::mem::take(&mut self.held);
        let admitted: Vec<Result<Admitted, IndexError>> = fresh
            .into_par_iter()
            .map(|d| self.admit_change(view, d))
            .collect();
        for result in admitted {
            match result {
                Ok(admitted) => pending.push(admitted),
                Err(error) => report.refused.push(error),
            }
        }
        let touched: BTreeSet<u16> = pending.iter().map(|a| a.shard).collect();
        if let Err(error) = self.warm_shards(touched) {
            self.held = pending; // checked again with the next changes
            return Err(error);
        }
        let mut seen = BTreeSet::new();
        pending.retain(|a| seen.insert(a.change.hash()) && !self.has_change(a));
        let ready = loop {
            let ready = self.ready(&pending);
            let ready_refs: Vec<&Admitted> = pending
                .iter()
                .zip(&ready)
                .filter(|(_, r)| **r)
                .map(|(a, _)| a)
                .collect();
            let failures = self.check_versions(&ready_refs);
            if failures.is_empty() {
                break ready;
            }
            // Leave out what failed (stale replays, jumps) and look again: what depended on
            // it is no longer ready.
            let failed: BTreeSet<ChangeHash> = failures
                .iter()
                .map(|(at, _)| ready_refs[*at].change.hash())
                .collect();
            report
                .refused
                .extend(failures.into_iter().map(|(_, error)| error));
            pending.retain(|a| !failed.contains(&a.change.hash()));
        };
        let mut by_shard: BTreeMap<u16, Vec<automerge::Change>> = BTreeMap::new();
        let mut signatures: Vec<(u16, ChangeHash, Signature)> = Vec::new();
        for (admitted, is_ready) in pending.into_iter().zip(ready) {
            if !is_ready {
                self.held.push(admitted);
                continue;
            }
            signatures.push((admitted.shard, admitted.change.hash(), admitted.signature));
            report
                .paths
                .extend(admitted.puts.into_iter().map(|(path, _, _)| path));
            by_shard
                .entry(admitted.shard)
                .or_default()
                .push(admitted.change);
        }
        // Bounded: what waits longest goes first (a peer re-sends what this replica lacks).
        let mut bytes: usize = self.held.iter().map(|a| a.change.raw_bytes().len()).sum();
        while self.held.len() > MAX_HELD_CHANGES || bytes > MAX_HELD_BYTES {
            bytes -= self.held.remove(0).change.raw_bytes().len();
        }
        report.shards = by_shard.len();
        for shard in by_shard.keys() {
            self.shard_mut(*shard);
        }
        let mut work: Vec<(&mut Shard, Vec<automerge::Change>)> = Vec::new();
        for (id, shard) in self.shards.iter_mut() {
            if let Some(changes) = by_shard.remove(id) {
                work.push((shard, changes));
            }
        }
        let (actor, me) = (&self.actor, actor_device(&self.actor).map(|(d, _)| d));
        let results: Vec<(Vec<IndexError>, Dropped)> = work
            .into_par_iter()
            .map(|(shard, changes)| apply_to(shard, actor, me, changes))
            .collect();
        for (refused, dropped) in results {
            report.refused.extend(refused);
            report.paths.extend(dropped.paths.iter().cloned());
            report.dropped.merge(dropped);
        }
        for (id, hash, signature) in signatures {
            let shard = self
                .shards
                .get_mut(&id)
                .expect("a shard that took changes exists");
            if shard.doc.get_change_by_hash(&hash).is_some() {
                shard.signatures.insert(hash, signature);
            }
        }
        Ok(report)
    }

    /// Whether this replica's document already holds `admitted`.
    fn has_change(&mut self, admitted: &Admitted) -> bool {
        self.holds(admitted.shard, &admitted.change.hash())
    }

    /// Whether shard `id` is loaded and holds the change `hash`.
    fn holds(&mut self, id: u16, hash: &ChangeHash) -> bool {
        (self.shards.get_mut(&id)).is_some_and(|shard| shard.doc.get_change_by_hash(hash).is_some())
    }

    /// Checks one decoded change of a peer: it is signed by the device its actor names (and
    /// not past that device's cutoff, if it was removed), and every operation puts a
    /// well-formed record of that device's, who may write, in the right shard.
    fn admit_change(&self, view: &MembershipView, d: Decoded) -> Result<Admitted, IndexError> {
        let Decoded {
            shard,
            change,
            signature,
        } = d;
        let signed::Signer {
            device: signer,
            incarnation,
            key,
        } = signed::verify_change(&self.mesh, &self.folder, shard, &change, &signature)?;
        if let Some(cutoff) = self.cutoff_of(view, &signer) {
            if !cutoff.admits(shard, incarnation, change.seq(), &change.hash()) {
                return Err(IndexError::PastCutoff {
                    device: signer,
                    change: change.hash().to_string(),
                });
            }
        }
        let mut puts = Vec::new();
        for op in change.decode().operations {
            let path = admit_op(&op)?;
            if shard_of(&self.folder, &path) != shard {
                return Err(IndexError::ForbiddenOp(format!(
                    "{path:?} does not belong in shard {}",
                    shard
                )));
            }
            let automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(bytes)) = &op.action
            else {
                unreachable!("admit_op accepts only byte puts");
            };
            let record = FileRecord::decode(&path, bytes)?;
            if record.author != signer {
                record.verify(&self.mesh, &self.folder)?;
                return Err(IndexError::NotTheSigner {
                    path,
                    author: record.author,
                    signer,
                });
            }
            record.verify_by(&key, &self.mesh, &self.folder)?;
            if path == SHARED_RULES_PATH && !record.deleted && record.kind != FileKind::File {
                return Err(IndexError::ForbiddenOp(format!(
                    "{path:?} may only be a regular file"
                )));
            }
            if !view.may_write(&record.author, record.epoch) {
                return Err(IndexError::NotAWriter {
                    path,
                    author: record.author,
                    epoch: record.epoch,
                });
            }
            puts.push((path, record, op.pred.iter().cloned().collect()));
        }
        Ok(Admitted {
            shard,
            change,
            signature,
            puts,
        })
    }

    /// Which of `pending` can be applied now: every dependency is in its shard's document, or
    /// is another change of `pending` that can.
    fn ready(&mut self, pending: &[Admitted]) -> Vec<bool> {
        let mut ready = vec![false; pending.len()];
        let missing: Vec<Vec<ChangeHash>> = pending
            .iter()
            .map(|a| match self.shards.get_mut(&a.shard) {
                Some(shard) => shard.doc.get_missing_deps(a.change.deps()),
                None => a.change.deps().to_vec(),
            })
            .collect();
        loop {
            let arrived: BTreeSet<ChangeHash> = pending
                .iter()
                .zip(&ready)
                .filter(|(_, r)| **r)
                .map(|(a, _)| a.change.hash())
                .collect();
            let mut grew = false;
            for (i, deps) in missing.iter().enumerate() {
                if !ready[i] && deps.iter().all(|d| arrived.contains(d)) {
                    ready[i] = true;
                    grew = true;
                }
            }
            if !grew {
                return ready;
            }
        }
    }

    /// A put must outrank every value it replaces — in the document or in this batch — (no
    /// rollback by replaying), and may not jump a path's version ahead (no wedging it at the
    /// top of the range). Returns the position in `ready` of each offending change, and why.
    fn check_versions(&self, ready: &[&Admitted]) -> Vec<(usize, IndexError)> {
        // Versions of the values this batch puts, by shard and operation ID (counters are per
        // shard document).
        let mut batch_ops: HashMap<(u16, u64, ActorId), u64> = HashMap::new();
        // How many puts this batch makes per path: an honest author's version is one above
        // the highest it replaces, so no version may run far ahead of what is known here plus
        // these (and a slack for what may still be on its way).
        let mut puts_per_path: HashMap<&str, u64> = HashMap::new();
        for admitted in ready {
            let start = admitted.change.start_op().get();
            for (i, (path, record, _)) in admitted.puts.iter().enumerate() {
                let id = (
                    admitted.shard,
                    start + i as u64,
                    admitted.change.actor_id().clone(),
                );
                batch_ops.insert(id, record.version);
                *puts_per_path.entry(path.as_str()).or_default() += 1;
            }
        }
        ready
            .par_iter()
            .enumerate()
            .filter_map(|(at, admitted)| {
                self.check_puts(admitted, &batch_ops, &puts_per_path)
                    .err()
                    .map(|e| (at, e))
            })
            .collect()
    }

    fn check_puts(
        &self,
        admitted: &Admitted,
        batch_ops: &HashMap<(u16, u64, ActorId), u64>,
        puts_per_path: &HashMap<&str, u64>,
    ) -> Result<(), IndexError> {
        let shard = self.shards.get(&admitted.shard);
        for (path, record, preds) in &admitted.puts {
            let values = match shard {
                Some(shard) => shard.doc.get_all(ROOT, path.as_str())?,
                None => Vec::new(),
            };
            let known = values
                .iter()
                .filter_map(|(value, _)| value_record(path, value))
                .map(|r| r.version)
                .max()
                .unwrap_or(0);
            let most = known
                .saturating_add(puts_per_path.get(path.as_str()).copied().unwrap_or(1))
                .saturating_add(MAX_VERSION_SLACK);
            if record.version > most {
                return Err(IndexError::VersionJump {
                    path: path.clone(),
                    version: record.version,
                    most,
                });
            }
            let mut replaced: Vec<u64> = Vec::new();
            for (value, id) in values {
                let automerge::ObjId::Id(counter, actor, _) = &id else {
                    continue;
                };
                if preds.iter().any(|p| p.0 == *counter && p.1 == *actor) {
                    replaced.extend(value_record(path, &value).map(|r| r.version));
                }
            }
            for pred in preds {
                replaced.extend(batch_ops.get(&(admitted.shard, pred.0, pred.1.clone())));
            }
            if let Some(&old) = replaced.iter().max() {
                if record.version <= old {
                    return Err(IndexError::StaleVersion {
                        path: path.clone(),
                        version: record.version,
                        replaced: old,
                    });
                }
            }
        }
        Ok(())
    }
}
