//! The device's background tasks, started once by [`spawn_all`]:
//!
//! - **watch**: folder watcher events, debounced (the folders holding the changed paths are
//!   rescanned once their changes settle for 50 ms, at most 500 ms late);
//! - **on connect**: a member that connects is pulled from at once (a NAS or laptop coming
//!   back syncs without waiting for the next round);
//! - **rounds**, every 0.5 s: pull from every connected member; every 1 s, catch up paths
//!   whose winner is not on disk (after a restart, or chunks that were unavailable); every 5 s
//!   while a member is missing, redial the static addresses; at start and then every 30 s, or
//!   less often for big folders (walks cost at most 1 % of a core), rescan every folder as a
//!   safety net; every 5 min, forget versions past the retention.

use std::collections::BTreeMap;
use std::time::Duration;

use meshsync_crdt::FolderId;
use meshsync_transport::PeerId;
use tokio::sync::mpsc::UnboundedReceiver;

use super::scan::{self, Rescan, ScanOptions, Scope};
use super::{history, materialise, members, sync, Shared};
use crate::net;

/// Quiet time before a changed folder is rescanned.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// The longest a changed folder waits for its rescan while changes keep coming.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// One round of the periodic loop.
const ROUND: Duration = Duration::from_millis(500);

/// Starts every background task of `device`; `changed` receives the folders the watchers saw
/// change.
pub(crate) fn spawn_all(device: &Shared, changed: UnboundedReceiver<Rescan>) {
    tokio::spawn(watch(device.clone(), changed));
    tokio::spawn(pull_on_connect(device.clone()));
    tokio::spawn(rounds(device.clone()));
}

async fn watch(device: Shared, mut changed: UnboundedReceiver<Rescan>) {
    while let Some(first) = changed.recv().await {
        let mut pending: BTreeMap<FolderId, Scope> = BTreeMap::new();
        add(&mut pending, first);
        let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
        loop {
            tokio::select! {
                more = changed.recv() => match more {
                    Some(rescan) => add(&mut pending, rescan),
                    None => return,
                },
                _ = tokio::time::sleep(DEBOUNCE) => break,
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        for (id, scope) in pending {
            if let Err(error) = scan::scan_in(&device, &id, ScanOptions::default(), scope).await {
                tracing::warn!(folder = %id, %error, "scan after change failed");
            }
        }
    }
}

/// Folds one more rescan into the pending ones (a whole-folder one takes in the rest).
fn add(pending: &mut BTreeMap<FolderId, Scope>, rescan: Rescan) {
    /// Past this many folders, one walk of everything is cheaper than listing each.
    const MAX_DIRS: usize = 10_000;
    let Some(scope) = pending.get_mut(&rescan.folder) else {
        pending.insert(rescan.folder, rescan.scope);
        return;
    };
    *scope = match (std::mem::take(scope), rescan.scope) {
        (Scope::Dirs(mut dirs), Scope::Dirs(more)) if dirs.len() + more.len() <= MAX_DIRS => {
            dirs.extend(more);
            Scope::Dirs(dirs)
        }
        _ => Scope::All,
    };
}

async fn pull_on_connect(device: Shared) {
    let mut events = device.lock().await.transport.subscribe();
    loop {
        match events.recv().await {
            Ok(meshsync_transport::Event::Disconnected { peer }) => {
                device.lock().await.saw(&peer, true);
            }
            Ok(meshsync_transport::Event::Connected { peer, .. }) => {
                let transport = device.lock().await.transport.clone();
                if !transport.allowed().contains(&peer) {
                    continue; // a removed device, let in only to hear of it
                }
                device.lock().await.saw(&peer, false);
                if let Err(error) = sync::pull(&device, peer).await {
                    tracing::info!(%peer, %error, "pull on connect failed");
                    // Refused: maybe because this device was removed. Ask.
                    match members::ask_if_removed(&device, peer).await {
                        Ok(true) => return,
                        Ok(false) => {}
                        Err(error) => tracing::debug!(%peer, %error, "no removal notice"),
                    }
                }
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn rounds(device: Shared) {
    let mut tick = 0u64;
    let catching_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = device.lock().await.state.clone();
    loop {
        tokio::time::sleep(ROUND).await;
        tick += 1;
        // The first whole scan comes from `watch_all`, once the watchers are there; each
        // whole scan sets when the next is due.
        if tokio::time::Instant::now() >= device.lock().await.next_full_scan {
            if let Err(error) = scan::scan_all(&device, ScanOptions::default()).await {
                tracing::warn!(%error, "scan failed");
            }
        }
        if tick.is_multiple_of(10) {
            redial_static_peers(&device).await;
        }
        if tick.is_multiple_of(4) {
            if let Err(error) = members::rotate_if_needed(&device).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "starting a new key epoch failed"
                );
            }
        }
        if let Err(error) = super::folder::compact_quiet_indexes(&device).await {
            tracing::warn!(error = format!("{error:#}"), "compacting an index failed");
        }
        let journal = state.clone();
        match tokio::task::spawn_blocking(move || journal.fold_places_when_quiet()).await {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(places)) => tracing::debug!(places, "folded the journal of chunk places"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "folding the journal of chunk places failed");
            }
        }
        if tick.is_multiple_of(600) {
            if let Err(error) = history::gc(&device).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "forgetting old versions failed"
                );
            }
        }
        let transport = device.lock().await.transport.clone();
        let peers: Vec<PeerId> = transport.connected_peers().await;
        for peer in &peers {
            if let Err(error) = sync::pull(&device, *peer).await {
                tracing::info!(%peer, %error, "pull failed");
            }
        }
        // In its own task, one at a time: a file whose content is slow to come must not hold
        // up the next round's pulls.
        if let (Some(peer), true) = (peers.first(), tick.is_multiple_of(2)) {
            if !catching_up.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (device, peer, flag) = (device.clone(), *peer, catching_up.clone());
                tokio::spawn(async move {
                    catch_up(&device, peer).await;
                    flag.store(false, std::sync::atomic::Ordering::Release);
                });
            }
        }
    }
}

/// Whatever the index wants that is not on disk yet is retried. Not while a materialise is
/// under way: it is writing what just arrived, and walking the index for what it will write
/// anyway took a tenth of both cores while changes streamed in (at 50k files).
async fn catch_up(device: &Shared, peer: PeerId) {
    let gate = device.lock().await.materialising.clone();
    if gate.try_lock().is_err() {
        return;
    }
    let needs = device.lock().await.needs();
    for (folder, paths) in needs {
        if let Err(error) = materialise::materialise(device, peer, &folder, paths).await {
            tracing::info!(%folder, error = format!("{error:#}"), "catching up failed");
        }
    }
}

/// Dials the static addresses again while some member is not connected: a NAS or laptop that
/// restarted comes back without anyone running a command.
async fn redial_static_peers(device: &Shared) {
    let (transport, addrs, members) = {
        let d = device.lock().await;
        let members = net::other_members(&d.log, &d.keys.device_id()).len();
        (
            d.transport.clone(),
            net::static_addrs(&d.home, &d.state),
            members,
        )
    };
    if transport.connected_peers().await.len() < members {
        net::dial_all(&transport, addrs).await;
    }
}
