//! Telling systemd how the daemon is doing (`sd_notify`, for a `Type=notify` unit such as
//! `meshsync service install` writes): `READY=1` once the node listens and its control socket
//! answers, a `STATUS=` line (peers, folders in sync) every few seconds, `WATCHDOG=1` at half
//! the unit's `WatchdogSec=`, and `STOPPING=1` on the way out.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every function here does nothing.
//!
//! ```no_run
//! # async fn daemon(home: std::path::PathBuf) {
//! tokio::spawn(meshsync_node::notify::when_serving(home)); // after the control socket is spawned
//! // … run until told to stop …
//! meshsync_node::notify::stopping();
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::control::{self, Request, Status};

/// How often the `STATUS=` line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// How long to wait for the control socket to answer at start before giving up on `READY=1`
/// (systemd then stops the unit at its start timeout and restarts it).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Whether a service manager listens.
fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// Waits until the control socket of `home` answers a status request, then sends `READY=1`
/// and keeps the watchdog and the status line going until the process ends.
pub async fn when_serving(home: PathBuf) {
    if !under_systemd() {
        return;
    }
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    let first = loop {
        if let Some(status) = ask_status(&home).await {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!("the control socket never answered; not telling systemd we are ready");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    send(&[NotifyState::Ready, NotifyState::Status(&summary(&first))]);
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(timeout / 2));
    }
    loop {
        tokio::time::sleep(STATUS_EVERY).await;
        if let Some(status) = ask_status(&home).await {
            send(&[NotifyState::Status(&summary(&status))]);
        }
    }
}

/// `WATCHDOG=1` every `every`: the runtime still runs tasks.
async fn watchdog(every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        ticks.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

/// `STOPPING=1`: the daemon is shutting down.
pub fn stopping() {
    if under_systemd() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

async fn ask_status(home: &Path) -> Option<Status> {
    let call = control::call::<Status>(home, &Request::Status);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(status)) => status,
        _ => None,
    }
}

/// The one-line `STATUS=` text for `systemctl status`.
pub fn summary(status: &Status) -> String {
    match status {
        Status::Device(d) => {
            let connected = d.peers.iter().filter(|p| p.connected).count();
            let in_sync = d.folders.iter().filter(|f| f.in_sync).count();
            let need_files: u64 = d.folders.iter().map(|f| f.need_files).sum();
            let need_bytes: u64 = d.folders.iter().map(|f| f.need_bytes).sum();
            let mut line = format!(
                "{connected} of {} peers connected; {in_sync} of {} folders in sync",
                d.peers.len(),
                d.folders.len()
            );
            if need_files > 0 {
                line.push_str(&format!("; {need_files} files ({need_bytes} B) to fetch"));
            }
            line
        }
        Status::Storage(s) => format!(
            "storage peer: {} of {} members connected; holds {} chunks and {} sealed changes",
            s.peers.iter().filter(|p| p.connected).count(),
            s.peers.len(),
            s.holds.chunks,
            s.holds.sealed_changes
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{DeviceStatus, FolderStatus, PeerStatus};

    #[test]
    fn the_status_line_counts_peers_folders_and_what_is_still_needed() {
        let folder = |id: &str, need_files: u64| FolderStatus {
            id: id.into(),
            path: format!("/f/{id}"),
            in_sync: need_files == 0,
            need_files,
            need_bytes: need_files * 1000,
            local_files: 1,
            conflicts: 0,
            held_deletes: 0,
            unavailable: vec![],
            waiting_for_peers: false,
            not_written: vec![],
        };
        let peer = |connected| PeerStatus {
            id: "X".into(),
            name: "x".into(),
            role: "device".into(),
            connected,
            bytes_in: 0,
            bytes_out: 0,
        };
        let status = Status::Device(DeviceStatus {
            device_id: "D".into(),
            mesh_id: "M".into(),
            listen: vec![],
            peers: vec![peer(true), peer(false)],
            folders: vec![folder("a", 0), folder("b", 3)],
            storage: vec![],
        });
        assert_eq!(
            summary(&status),
            "1 of 2 peers connected; 1 of 2 folders in sync; 3 files (3000 B) to fetch"
        );
    }
}
