//! Materialise: bring files on disk in line with the index, in three stages.
//!
//! 1. [`plan`] (pure): which paths get a conflict copy, a write, a delete, in which order.
//! 2. [`fetch`]: chunk lists, temp files filled from local chunks, the rest fetched from every
//!    connected peer and checked.
//! 3. [`commit`]: flush, install (rename into place, links, directories, deletes; a local edit
//!    made since the last scan is kept as a conflict copy), then record the new local state.
//!
//! Replaced and deleted files stay restorable: before anything is installed, the chunks the new
//! version does not reuse are sealed into this device's chunk store ([`crate::versions`]).
//! A big plan is carried out in batches of its steps, in its order, each recorded as it is
//! done. One materialise runs at a time per device, so a catch-up never fetches what a pull is
//! already fetching. The device lock is held only to plan and to record, never across the
//! network or the disk work.

pub mod commit;
mod direct;
pub mod fetch;
pub mod plan;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex as StdMutex};

use anyhow::Context;
use meshsync_crdt::{ChunkId, DeviceId, FolderId, KeyRing};
use meshsync_transport::{PeerId, Transport};
use tracing::Instrument;

use super::ignore::Rules;
use super::{Device, Shared};
use crate::chunks::ChunkStore;
use crate::disk::FolderRoot;
use crate::phases::Phases;
use crate::state::{in_sync, Batch, LocalFile};
use commit::Installed;
use fetch::Lists;
use plan::{Plan, Step, Work};

/// What one materialise works with, taken from the device under its lock.
struct Job {
    root: Arc<FolderRoot>,
    transport: Transport,
    keys: KeyRing,
    store: Arc<StdMutex<ChunkStore>>,
    me: DeviceId,
    /// The other devices (told where chunks lie; see `fetch::fetch`).
    readers: Arc<StdMutex<std::collections::HashSet<PeerId>>>,
    plan: Plan,
}

/// Brings the files at `paths` of `folder` in line with the index, fetching what is missing
/// from `from` (chunk lists) and every connected peer (chunks).
#[tracing::instrument(skip_all, fields(%folder, peer = %from))]
pub(crate) async fn materialise(
    device: &Shared,
    from: PeerId,
    folder: &FolderId,
    paths: BTreeSet<String>,
) -> anyhow::Result<()> {
    let gate = device.lock().await.materialising.clone();
    let _one_at_a_time = gate.lock().await;
    let Some(mut job) = device.lock().await.job(folder, paths)? else {
        return Ok(());
    };
    let plan = std::mem::take(&mut job.plan);
    let olds = Arc::new(plan.olds);
    let mut work = plan.work;
    while !work.is_empty() {
        let rest = work.split_off(work.len().min(BATCH));
        let slice = std::mem::replace(&mut work, rest);
        write_batch(device, from, folder, &job, slice, olds.clone()).await?;
    }
    Ok(())
}

/// How many steps of a plan are carried out at a time, in the plan's order: a new device of
/// a big folder writes (and records, and shows) its files a batch at a time, with a bounded
/// number of temp files, instead of all at the end.
const BATCH: usize = 5_000;

/// Carries out `work`, the next steps of `job`'s plan: chunk lists, temp files filled from
/// local sources and peers (while the versions they replace are kept), flushed, installed,
/// recorded.
async fn write_batch(
    device: &Shared,
    from: PeerId,
    folder: &FolderId,
    job: &Job,
    work: Vec<Work>,
    olds: Arc<std::collections::HashMap<String, LocalFile>>,
) -> anyhow::Result<()> {
    let mut took = Phases::default();
    let work = Arc::new(work);
    let lists =
        Arc::new(fetch::chunk_lists(device, &job.transport, (from, folder), &work, &olds).await?);
    took.mark("lists");
    let held = device.lock().await.held_chunks(&lists);
    took.mark("held");
    // The versions about to be replaced are kept while the new ones are put together and the
    // missing chunks arrive: it reads only the files still in place, which nothing here
    // touches before the install.
    let keeping = keep_meanwhile(job, folder, &work, &lists, olds);
    let assembly = {
        let (root, work, lists, keys) = (
            job.root.clone(),
            work.clone(),
            lists.clone(),
            job.keys.clone(),
        );
        blocking(move || fetch::prepare(&root, &work, &lists, &held, &keys)).await?
    };
    took.mark("prepare");
    // Temp files this materialise made: removed if it fails before installing them.
    let temps: Vec<(String, u64)> = assembly
        .pending
        .values()
        .map(|p| (p.tmp.clone(), p.ino))
        .collect();
    let to = (job.root.clone(), folder, &work[..]);
    let readers = job.readers.lock().expect("readers lock").clone();
    let from = (&job.transport, &job.keys, &readers);
    let fetched = fetch::fetch(from, to, assembly).await;
    let mut assembly = match fetched {
        Ok(assembly) => assembly,
        Err(error) => {
            commit::remove_temps(&job.root, &temps);
            return Err(error);
        }
    };
    took.mark("fetch");
    let mut flushed = BTreeSet::new();
    for (i, flush) in std::mem::take(&mut assembly.flushes) {
        let flushed_ok = match flush.await {
            Ok(result) => result.context("flushing a written file"),
            Err(error) => Err(error.into()),
        };
        if let Err(error) = flushed_ok {
            commit::remove_temps(&job.root, &temps);
            return Err(error);
        }
        flushed.insert(i);
    }
    let kept = match keeping.await {
        Ok(kept) => kept,
        Err(error) => Err(error.into()),
    };
    took.mark("keep");
    let batch = match kept {
        Ok(batch) => batch,
        Err(error) => {
            commit::remove_temps(&job.root, &temps);
            return Err(error);
        }
    };
    let installed = {
        let (root, work, lists, keys, me) = (
            job.root.clone(),
            work.clone(),
            lists.clone(),
            job.keys.clone(),
            job.me,
        );
        blocking(move || {
            let mut took = Phases::default();
            if let Err(error) = commit::flush(&root, &assembly, &flushed) {
                commit::remove_temps(&root, &temps);
                return Err(error);
            }
            took.mark("flush");
            let installed = commit::install(&root, &work, assembly, &lists, &keys, &me);
            took.mark("install");
            tracing::debug!(files = work.len(), took = %took, "installed");
            Ok((installed, batch))
        })
        .await?
    };
    took.mark("installing");
    let recorded = device.lock().await.record_materialised(folder, installed);
    took.mark("record");
    tracing::debug!(files = work.len(), took = %took, "materialised");
    recorded
}

/// [`materialise`] in a task of its own, for a caller that must not wait for content (a
/// peer waiting for an answer, the pull round, a storage exchange). What fails is retried by
/// the catch-up, which retries whatever the index wants that is not on disk.
pub(crate) fn spawn(device: &Shared, from: PeerId, folder: FolderId, paths: BTreeSet<String>) {
    let device = device.clone();
    tokio::spawn(
        async move {
            if let Err(error) = materialise(&device, from, &folder, paths).await {
                tracing::info!(%folder, error = format!("{error:#}"), "writing what arrived failed; retried by the catch-up");
            }
        }
        .in_current_span(),
    );
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// [`keep_replaced`] on a blocking thread, giving back the batch of old records it made.
fn keep_meanwhile(
    job: &Job,
    folder: &FolderId,
    work: &Arc<Vec<Work>>,
    lists: &Arc<Lists>,
    olds: Arc<std::collections::HashMap<String, LocalFile>>,
) -> tokio::task::JoinHandle<anyhow::Result<Batch>> {
    let (store, keys, root, folder) = (
        job.store.clone(),
        job.keys.clone(),
        job.root.clone(),
        folder.clone(),
    );
    let (work, lists) = (work.clone(), lists.clone());
    tokio::task::spawn_blocking(move || {
        let mut batch = Batch::default();
        keep_replaced(
            &store, &keys, &root, &folder, &work, &olds, &lists, &mut batch,
        )
        .map(|()| batch)
    })
}

/// Files about to be replaced or deleted by another device's version stay restorable: the
/// chunks the new version does not reuse go into this device's store first, and the old
/// records into `batch`.
#[allow(clippy::too_many_arguments)]
fn keep_replaced(
    store: &StdMutex<ChunkStore>,
    keys: &KeyRing,
    root: &FolderRoot,
    folder: &FolderId,
    work: &[Work],
    olds: &std::collections::HashMap<String, LocalFile>,
    lists: &Lists,
    batch: &mut Batch,
) -> anyhow::Result<()> {
    let replaced: Vec<(String, LocalFile, HashSet<ChunkId>)> = work
        .iter()
        .filter_map(|w| {
            let old = olds.get(&w.path)?;
            let deleted = w.step == Step::Delete;
            if !deleted && old.list_hash == w.record.chunks {
                return None;
            }
            let keep = lists
                .get(&w.record.chunks)
                .filter(|_| !deleted)
                .map(|l| l.iter().map(|c| c.id).collect())
                .unwrap_or_default();
            Some((w.path.clone(), old.clone(), keep))
        })
        .collect();
    if replaced.is_empty() {
        return Ok(());
    }
    let stored = crate::versions::preserve(store, keys, root, &replaced)?;
    tracing::debug!(stored, "chunks of replaced versions kept");
    for (rel, old, _) in &replaced {
        crate::versions::record(batch, folder, rel, old);
    }
    Ok(())
}

impl Device {
    /// Plans a materialise of `paths` and takes what it needs; `None` if there is nothing to
    /// do.
    fn job(&mut self, folder: &FolderId, paths: BTreeSet<String>) -> anyhow::Result<Option<Job>> {
        let Some(f) = self.folders.get_mut(folder) else {
            return Ok(None);
        };
        let looked_up = paths.iter().chain(f.problems.keys());
        f.index.warm(looked_up.map(String::as_str))?;
        // A path reported as not written that is in sync by now (written, or no longer
        // wanted) is no problem any more.
        let (index, local) = (&f.index, &f.local);
        f.problems.retain(|path, _| {
            index
                .get(path)
                .is_some_and(|state| !in_sync(local.get(path), &state.winner))
        });
        let root = f.root()?;
        let rules = Rules::load(&root);
        let mut plan = plan::plan(&f.index, &f.local, &rules, paths, |name| {
            root.entry(name).ok().flatten().is_some()
        });
        // Replaced files' chunks are read to keep them (see `keep_replaced`).
        super::serve::with_chunks(&self.state, plan.olds.values_mut());
        if plan.work.is_empty() {
            return Ok(None);
        }
        Ok(Some(Job {
            root: Arc::new(root),
            transport: self.transport.clone(),
            keys: self.key_ring(),
            store: self.store.clone(),
            me: self.keys.device_id(),
            readers: self.readers.clone(),
            plan,
        }))
    }

    /// Records what a materialise installed: local state, chunk map, kept versions, chunk
    /// lists, unavailable paths — one commit.
    fn record_materialised(
        &mut self,
        folder: &FolderId,
        (installed, mut batch): (Installed, Batch),
    ) -> anyhow::Result<()> {
        let Some(f) = self.folders.get_mut(folder) else {
            return Ok(());
        };
        batch.lists.extend(installed.lists);
        for path in installed.unavailable {
            if f.unavailable.insert(path.clone()) {
                tracing::warn!(%path, "file unavailable: no source has intact chunks for it; not written");
            }
        }
        f.problems.extend(installed.problems);
        if installed.kept_edit {
            let _ = self.changes.send(crate::device::scan::Rescan {
                folder: folder.clone(),
                scope: Default::default(),
            });
        }
        let mut map = self.chunk_map.lock().expect("chunk map lock");
        for (path, file) in installed.updates {
            f.unavailable.remove(&path);
            f.problems.remove(&path);
            f.set_local(folder, &mut map, &mut batch, path, file);
        }
        drop(map);
        self.state.commit(batch)?;
        Ok(())
    }
}
