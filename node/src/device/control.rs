//! The control-socket requests a device answers (see [`crate::control`] for the types).

use std::time::Duration;

use meshsync_crdt::{FolderId, Role};

use super::scan::{self, ScanOptions};
use super::{folder, history, members, mesh, resolve, status, Shared};
use crate::control::{self, FolderAdded, FolderInfo, InviteCode, Joined, Request, ScanDone};

/// Answers one CLI request.
pub async fn handle(device: &Shared, request: Request) -> anyhow::Result<serde_json::Value> {
    match request {
        Request::Status => control::reply(control::Status::Device(status::status(device).await)),
        Request::Devices => control::reply(status::devices(device).await),
        Request::Conflicts => control::reply(device.lock().await.conflicts()?),
        Request::Invite { role, expires_secs } => {
            let role: Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let code = mesh::invite(device, role, Duration::from_secs(expires_secs)).await?;
            control::reply(InviteCode { code })
        }
        Request::Join { code, accept_wipe } => {
            let mesh = mesh::join_with(device, &code, accept_wipe).await?;
            control::reply(Joined {
                mesh: mesh.to_string(),
            })
        }
        Request::FolderAdd { path, id } => {
            let id = id.map(|i| FolderId::new(&i)).transpose()?;
            // Its watcher is set up first, without the lock (at a million files that takes
            // seconds), so the scan misses nothing that changes meanwhile.
            let id = folder::add(device, &path, id).await?;
            scan::scan(device, &id, ScanOptions::default()).await?;
            control::reply(FolderAdded { id: id.to_string() })
        }
        Request::FolderList => {
            let list = device.lock().await.folder_list();
            control::reply(
                list.into_iter()
                    .map(|(id, path)| FolderInfo {
                        id: id.to_string(),
                        path: path.display().to_string(),
                    })
                    .collect::<Vec<_>>(),
            )
        }
        Request::FolderRemove { id } => {
            let id = FolderId::new(&id)?;
            let path = device.lock().await.remove_folder(&id)?;
            control::reply(FolderInfo {
                id: id.to_string(),
                path: path.display().to_string(),
            })
        }
        Request::Ignore {
            folder,
            patterns,
            local,
        } => {
            let id = FolderId::new(&folder)?;
            let rules = device.lock().await.add_ignore(&id, &patterns, local)?;
            if !patterns.is_empty() {
                scan::scan(device, &id, ScanOptions::default()).await?;
            }
            control::reply(rules)
        }
        Request::Versions { path } => control::reply(history::list(device, &path).await?),
        Request::Restore { path, version } => {
            control::reply(history::restore(device, &path, version).await?)
        }
        Request::Gc => control::reply(history::gc(device).await?),
        Request::Remove { device: who, wipe } => {
            control::reply(members::remove(device, &who, wipe).await?)
        }
        Request::Name { device: who, name } => {
            control::reply(members::rename(device, who.as_deref(), &name).await?)
        }
        Request::Role { device: who, role } => {
            let role: Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            control::reply(members::set_role(device, &who, role).await?)
        }
        Request::Leave => control::reply(members::leave(device).await?),
        Request::Resolve {
            folder,
            copy,
            keep_copy,
        } => control::reply(resolve::resolve(device, &folder, &copy, keep_copy).await?),
        Request::KeptFiles => control::reply(resolve::kept_files(device).await?),
        Request::Admin { device: who, grant } => {
            control::reply(members::set_admin(device, &who, grant).await?)
        }
        Request::Scan {
            folder,
            allow_deletes,
        } => {
            let options = ScanOptions {
                allow_mass_delete: allow_deletes,
                requested: true,
            };
            match folder {
                Some(id) => {
                    let id = FolderId::new(&id)?;
                    device.lock().await.folder(&id)?;
                    scan::scan(device, &id, options).await?;
                }
                None => scan::scan_all(device, options).await?,
            }
            control::reply(ScanDone { scanned: true })
        }
    }
}
