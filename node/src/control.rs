//! The control socket: how the CLI talks to a running daemon. A Unix socket in the home (mode
//! 0600, never on the network); one JSON request per connection, one JSON reply.
//!
//! Requests ([`Request`]) and every reply are typed structs shared by both ends: the daemon
//! builds them, the CLI prints them (and `--json` prints them as they are), so a renamed field
//! is a compile error, not an empty screen. [`call`] sends a request and decodes the reply as
//! the type the caller expects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A CLI request.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Request {
    Status,
    Invite {
        role: String,
        expires_secs: u64,
    },
    Join {
        code: String,
        #[serde(default)]
        accept_wipe: bool,
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
    /// Remove a member (by device ID, a unique prefix of it, or its name).
    Remove {
        device: String,
        #[serde(default)]
        wipe: bool,
    },
    /// Rename this device, or (admins) another member.
    Name {
        device: Option<String>,
        name: String,
    },
    Role {
        device: String,
        role: String,
    },
    Admin {
        device: String,
        grant: bool,
    },
    Leave,
    /// Settle a conflict: keep the original (the copy goes) or the copy's content at the
    /// original path; what goes stays restorable.
    Resolve {
        folder: String,
        copy: String,
        keep_copy: bool,
    },
    /// The files with kept old versions, most recently replaced first.
    KeptFiles,
}

impl Request {
    /// The command a user typed for this request, for messages.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status => "`status`",
            Request::Invite { .. } => "`invite`",
            Request::Join { .. } => "`join`",
            Request::FolderAdd { .. } | Request::FolderList | Request::FolderRemove { .. } => {
                "`folder`"
            }
            Request::Scan { .. } => "`scan`",
            Request::Devices => "`devices`",
            Request::Conflicts => "`conflicts`",
            Request::Ignore { .. } => "`ignore`",
            Request::Versions { .. } | Request::Restore { .. } => "`versions`/`restore`",
            Request::Gc => "`gc`",
            Request::Remove { .. } => "`remove`",
            Request::Name { .. } => "`name`",
            Request::Role { .. } => "`role`",
            Request::Admin { .. } => "`admin`",
            Request::Leave => "`leave`",
            Request::Resolve { .. } => "the web page's conflict resolution",
            Request::KeptFiles => "the web page's old versions",
        }
    }
}

/// The daemon's answer: the request's reply type as JSON, or why it failed.
#[derive(Serialize, Deserialize, Debug)]
pub enum Reply {
    Ok(serde_json::Value),
    Err(String),
}

/// `meshsync status` on a device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    pub device_id: String,
    pub mesh_id: String,
    pub listen: Vec<String>,
    pub peers: Vec<PeerStatus>,
    pub folders: Vec<FolderStatus>,
    /// This device's view of each storage peer of the mesh.
    pub storage: Vec<StorageReport>,
}

/// Another member, as a device sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub id: String,
    pub name: String,
    pub role: String,
    pub connected: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One synced folder.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FolderStatus {
    pub id: String,
    pub path: String,
    pub in_sync: bool,
    pub need_files: u64,
    pub need_bytes: u64,
    pub local_files: usize,
    pub conflicts: u64,
    /// Deletions the mass-delete guard holds back.
    pub held_deletes: usize,
    /// Paths no source could give intact (not written).
    pub unavailable: Vec<String>,
    /// Nothing here yet and no member has answered for this folder: not "in sync" with
    /// anything yet (a folder just added on a device that joins an existing one).
    #[serde(default)]
    pub waiting_for_peers: bool,
    /// Paths that could not be written on this device, and why (retried; the rest of the
    /// folder syncs on).
    #[serde(default)]
    pub not_written: Vec<NotWritten>,
}

/// A path this device could not write, and why.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NotWritten {
    pub path: String,
    pub why: String,
}

/// Whether a storage peer holds this device's latest changes, and any stale state noticed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StorageReport {
    pub id: String,
    pub connected: bool,
    pub holds_my_changes: u64,
    /// What it holds of each author (device ID → last change number of an unbroken run).
    pub holds: BTreeMap<String, u64>,
    pub my_changes: u64,
    pub holds_latest: bool,
    pub stale_reports: Vec<String>,
}

/// `meshsync status` on a storage peer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StoragePeerStatus {
    pub device_id: String,
    /// Always `"storage"`.
    pub role: String,
    pub mesh_id: Option<String>,
    pub listen: Vec<String>,
    pub peers: Vec<StorageMember>,
    pub holds: Holdings,
}

/// A member, as a storage peer sees it (no names: they are sealed).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StorageMember {
    pub id: String,
    pub role: String,
    pub connected: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub held_changes: u64,
    /// The change number the device last said (signed) it has; `None` if not met since start.
    pub device_changes: Option<u64>,
    pub up_to_date: bool,
}

/// What a storage peer holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Holdings {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub disk_bytes: u64,
    pub sealed_changes: u64,
    pub sealed_bytes: u64,
}

/// `meshsync status` on either kind of node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Status {
    Storage(StoragePeerStatus),
    Device(DeviceStatus),
}

/// One member for `meshsync devices`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub admin: bool,
    pub this_device: bool,
    pub connected: bool,
    /// When it was last connected (Unix seconds), if ever seen.
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// Where it is connected from (for this device: where it listens).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The newest key epoch wrapped to it (none for a storage peer).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// For a removed device: the key epoch its removal started.
    #[serde(default)]
    pub removed_in: Option<u64>,
    /// Whether it accepted remote wipe when it joined.
    #[serde(default)]
    pub remote_wipe: bool,
}

/// One conflict copy for `meshsync conflicts`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ConflictCopy {
    pub folder: String,
    /// The path the concurrent edits were made to.
    pub path: String,
    /// Where the other version is kept.
    pub copy: String,
    /// The device whose version the copy holds, when the index knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    pub on_disk: bool,
}

/// A synced folder for `meshsync folder list` (and the answer to `folder add` / `remove`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FolderInfo {
    pub id: String,
    pub path: String,
}

/// The folder `meshsync folder add` added.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FolderAdded {
    pub id: String,
}

/// The ignore patterns of a folder after `meshsync ignore`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct IgnoreList {
    pub folder: String,
    pub shared: Vec<String>,
    pub local: Vec<String>,
}

/// The code of `meshsync invite`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InviteCode {
    pub code: String,
}

/// A device `meshsync remove` removed, and the key epoch that started.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Removed {
    pub device_id: String,
    pub name: String,
    pub epoch: u64,
    /// Devices the new mesh key is wrapped to.
    pub rekeyed: usize,
    /// Folders in which the removed device's changes after the last one this device holds
    /// are refused by every replica (its cutoff).
    #[serde(default)]
    pub cut_off: usize,
    /// With --wipe: whether the device accepted remote wipe when it joined (if not, it is
    /// only refused).
    #[serde(default)]
    pub wipe: Option<bool>,
}

/// `meshsync leave` is done: how many members heard it at once.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Left {
    pub told: usize,
}

/// A member `meshsync name`, `role` or `admin` changed, and how.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Changed {
    pub device_id: String,
    pub name: String,
    pub what: String,
}

/// The mesh `meshsync join` joined.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Joined {
    pub mesh: String,
}

/// `meshsync scan` is done.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ScanDone {
    pub scanned: bool,
}

/// The kept versions of one file, newest first.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VersionList {
    pub folder: String,
    pub path: String,
    pub versions: Vec<VersionInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VersionInfo {
    /// 1 = the newest kept.
    pub number: usize,
    pub version: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// Unix seconds when a newer version (or a delete) replaced it.
    pub replaced_at: u64,
    /// Every chunk of it is in this device's own store.
    pub stored_here: bool,
}

/// A file with kept old versions (the web page lists the most recently replaced).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KeptFile {
    pub folder: String,
    pub path: String,
    /// The path on this device, for `meshsync versions` / `restore`.
    pub absolute: String,
    pub versions: usize,
    /// Unix seconds when its newest kept version was replaced.
    pub last_replaced_at: u64,
}

/// A conflict settled by hand.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Resolved {
    pub folder: String,
    pub path: String,
    /// "original" or "copy".
    pub kept: String,
}

/// What `meshsync restore` wrote.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Restored {
    pub folder: String,
    pub path: String,
    pub number: usize,
    pub size: u64,
    pub chunks_from_this_device: usize,
    pub chunks_from_peers: usize,
}

/// What `meshsync gc` forgot and freed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GcReport {
    pub expired_versions: usize,
    pub unreferenced_chunks: usize,
    pub freed_here_bytes: u64,
    pub storage_peers: Vec<Released>,
}

/// What one storage peer deleted on a signed release.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Released {
    pub storage_peer: Option<String>,
    pub chunks: usize,
    pub bytes: u64,
}

/// A reply encoded for the socket.
pub fn reply<T: Serialize>(value: T) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(value)?)
}

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("control.sock")
}

/// Serves the control socket of `home` with `handler` answering each request, until the
/// process ends.
pub async fn serve<F, Fut>(home: PathBuf, handler: F) -> anyhow::Result<()>
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
            // Only this user's processes: the home is 0700 and the socket 0600, and the
            // caller's credentials are checked too (a socket briefly looser, or a home made
            // shared by hand, lets no one else in).
            let caller = stream.peer_cred().map(|c| c.uid()).ok();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(1 << 20);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            if caller != Some(own_uid()) {
                tracing::warn!(uid = ?caller, "control request from another user refused");
                let refused = Reply::Err("refused: the daemon answers only its own user".into());
                let mut text = serde_json::to_string(&refused).unwrap_or_default();
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
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

fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends one request to the daemon of `home` and decodes its reply as `T`. `Ok(None)` if no
/// daemon is running there.
pub async fn call<T: DeserializeOwned>(
    home: &Path,
    request: &Request,
) -> anyhow::Result<Option<T>> {
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
    if line.is_empty() {
        anyhow::bail!(
            "the daemon for {} closed the connection without answering {}: it may have stopped \
             (see its log); start it again with `meshsync up`",
            home.display(),
            request.command()
        );
    }
    let reply = serde_json::from_str::<Reply>(&line).map_err(|error| {
        anyhow::anyhow!("the daemon answered {} with something this CLI cannot read ({error}); is it another version? Restart it with this one's `meshsync up`", request.command())
    })?;
    match reply {
        Reply::Ok(value) => Ok(Some(serde_json::from_value(value).map_err(|error| {
            anyhow::anyhow!("the daemon answered {} in a form this CLI does not read ({error}); is it another version?", request.command())
        })?)),
        Reply::Err(error) => anyhow::bail!(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Run as another user by the test below (ignored otherwise): connects and prints the
    /// reply.
    #[test]
    #[ignore = "the client half of another_user_is_refused_even_through_a_loose_socket"]
    fn connect_as_child() {
        let socket = std::env::var("MESHSYNC_TEST_CONNECT").expect("run by the test below");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let home = Path::new(&socket).parent().unwrap().to_path_buf();
        match runtime.block_on(call::<serde_json::Value>(&home, &Request::Status)) {
            Ok(reply) => println!("REPLY {reply:?}"),
            Err(error) => println!("ERROR {error}"),
        }
    }

    #[test]
    fn another_user_is_refused_even_through_a_loose_socket() {
        if own_uid() != 0 {
            return; // needs root to run a client as another user
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        // Loose on purpose: what the credential check must still hold.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let served = home.clone();
        runtime.spawn(serve(served, |_request| async {
            reply(ScanDone { scanned: true })
        }));
        let socket = socket_path(&home);
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        // This user is answered.
        let own: ScanDone = runtime
            .block_on(call(&home, &Request::Status))
            .unwrap()
            .unwrap();
        assert!(own.scanned);
        // Another one is not.
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "control::tests::connect_as_child",
                "--ignored",
                "--nocapture",
            ])
            .env("MESHSYNC_TEST_CONNECT", &socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ERROR refused"), "{text}");
    }
}
