//! The control socket: how the CLI talks to a running daemon. A Unix socket in the home (mode
//! 0600, never on the network); one JSON request per connection, one JSON reply.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::daemon::{self, Node, Shared};

/// A CLI request.
#[derive(Serialize, Deserialize, Debug)]
pub enum Request {
    Status,
    Invite {
        role: String,
        expires_secs: u64,
    },
    Join {
        code: String,
    },
    FolderAdd {
        path: PathBuf,
        id: Option<String>,
    },
    FolderList,
    FolderRemove {
        id: String,
    },
    Scan {
        folder: Option<String>,
        #[serde(default)]
        allow_deletes: bool,
    },
    Devices,
    Conflicts,
    Ignore {
        folder: String,
        patterns: Vec<String>,
        local: bool,
    },
    Versions {
        path: PathBuf,
    },
    Restore {
        path: PathBuf,
        version: Option<usize>,
    },
    Gc,
}

/// The daemon's answer.
#[derive(Serialize, Deserialize, Debug)]
pub enum Reply {
    Ok(serde_json::Value),
    Err(String),
}

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("control.sock")
}

/// Serves the control socket of a device until the process ends.
pub async fn serve(node: Shared, home: PathBuf) -> anyhow::Result<()> {
    serve_with(home, move |request| {
        let node = node.clone();
        async move { handle(&node, request).await }
    })
    .await
}

/// Serves the control socket with `handler` answering each request.
pub async fn serve_with<F, Fut>(home: PathBuf, handler: F) -> anyhow::Result<()>
where
    F: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<serde_json::Value>> + Send,
{
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(&home);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(1 << 20);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(request) => match handler(request).await {
                    Ok(value) => Reply::Ok(value),
                    Err(error) => Reply::Err(format!("{error:#}")),
                },
                Err(error) => Reply::Err(format!("malformed request: {error}")),
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

use tokio::io::AsyncReadExt as _;

async fn handle(node: &Shared, request: Request) -> anyhow::Result<serde_json::Value> {
    match request {
        Request::Status => Ok(node.lock().await.status().await),
        Request::Invite { role, expires_secs } => {
            let role: meshsync_crdt::Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let code = Node::invite(node, role, Duration::from_secs(expires_secs)).await?;
            Ok(serde_json::json!({ "code": code }))
        }
        Request::Join { code } => {
            let (mesh, addrs) = {
                let n = node.lock().await;
                let home = n.home().clone();
                let keys_seeds = (n.keys().signing_seed(), n.keys().kem_seed());
                let keys = meshsync_crdt::DeviceKeys::from_seeds(keys_seeds.0, keys_seeds.1);
                daemon::join(&home, n.state(), &keys, &code).await?
            };
            Node::joined(node, mesh, addrs).await?;
            Ok(serde_json::json!({ "mesh": mesh.to_string() }))
        }
        Request::FolderAdd { path, id } => {
            let id = id.map(|i| meshsync_crdt::FolderId::new(&i)).transpose()?;
            let id = node.lock().await.add_folder(&path, id)?;
            daemon::scan(node, &id).await?;
            Ok(serde_json::json!({ "id": id.to_string() }))
        }
        Request::FolderList => {
            let list = node.lock().await.folder_list();
            Ok(serde_json::json!(list
                .into_iter()
                .map(|(id, path)| serde_json::json!({"id": id.to_string(), "path": path.display().to_string()}))
                .collect::<Vec<_>>()))
        }
        Request::FolderRemove { id } => {
            let id = meshsync_crdt::FolderId::new(&id)?;
            let path = node.lock().await.remove_folder(&id)?;
            Ok(serde_json::json!({ "id": id.to_string(), "path": path.display().to_string() }))
        }
        Request::Devices => Ok(node.lock().await.devices().await),
        Request::Ignore {
            folder,
            patterns,
            local,
        } => {
            let id = meshsync_crdt::FolderId::new(&folder)?;
            let rules = node.lock().await.add_ignore(&id, &patterns, local)?;
            if !patterns.is_empty() {
                daemon::scan(node, &id).await?;
            }
            Ok(rules)
        }
        Request::Conflicts => Ok(node.lock().await.conflicts()),
        Request::Versions { path } => crate::versions::list(node, &path).await,
        Request::Restore { path, version } => crate::versions::restore(node, &path, version).await,
        Request::Gc => crate::versions::gc(node).await,
        Request::Scan {
            folder,
            allow_deletes,
        } => {
            match folder {
                Some(id) => {
                    let id = meshsync_crdt::FolderId::new(&id)?;
                    let known = node
                        .lock()
                        .await
                        .folder_list()
                        .iter()
                        .any(|(f, _)| *f == id);
                    if !known {
                        anyhow::bail!("no folder {id} on this device (see `meshsync folder list`)");
                    }
                    daemon::scan_with(node, &id, allow_deletes, true).await?;
                }
                None if allow_deletes => {
                    let ids: Vec<_> = node
                        .lock()
                        .await
                        .folder_list()
                        .into_iter()
                        .map(|(f, _)| f)
                        .collect();
                    for id in ids {
                        daemon::scan_with(node, &id, true, true).await?;
                    }
                }
                None => daemon::scan_all_requested(node).await?,
            }
            Ok(serde_json::json!({ "scanned": true }))
        }
    }
}

/// Sends one request to the daemon of `home`. `Ok(None)` if no daemon is running there.
pub async fn call(home: &Path, request: &Request) -> anyhow::Result<Option<serde_json::Value>> {
    let path = socket_path(home);
    let Ok(stream) = tokio::net::UnixStream::connect(&path).await else {
        return Ok(None);
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    match serde_json::from_str::<Reply>(&line)? {
        Reply::Ok(value) => Ok(Some(value)),
        Reply::Err(error) => anyhow::bail!(error),
    }
}
