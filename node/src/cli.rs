//! The `meshsync` command line: parsing ([`Cli`]) and running ([`run`]) each command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshsync_crdt::{DeviceId, Role};

use crate::control;
use crate::home::Home;

/// Keep folders in sync across your own devices, end-to-end encrypted, with nobody in the middle.
#[derive(Debug, Parser)]
#[command(name = "meshsync", version)]
pub struct Cli {
    /// The node's home directory (keys, config, database).
    #[arg(long, global = true, env = "MESHSYNC_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this device's identity: an Ed25519 and an X25519 key pair.
    Init {
        /// The name other devices show for this one (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Make a storage peer: it stores and serves the mesh's data encrypted, and never
        /// receives the key to read it (join with a code from `meshsync invite --role storage`).
        #[arg(long)]
        storage: bool,
    },
    /// Print this device's ID, or check a device ID someone gave you.
    Id {
        /// A device ID to check; prints its libp2p peer ID if it is well-formed.
        device: Option<String>,
        /// Also print the libp2p peer ID.
        #[arg(long)]
        peer_id: bool,
    },
    /// Run the daemon in the foreground: sync this device's folders with the mesh.
    Up {
        /// Addresses to listen on (default: TCP and QUIC on all interfaces, port 22000).
        #[arg(long = "listen", value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// Do not announce or look for devices on the LAN by mDNS (static peers only).
        #[arg(long)]
        no_mdns: bool,
    },
    /// Print a one-time invite code for another device (the last line of output).
    Invite {
        /// device, read-only or storage.
        #[arg(long, default_value = "device")]
        role: String,
        /// How long the code stays valid, e.g. 10m, 1h, 600s.
        #[arg(long, default_value = "1h")]
        expires: String,
    },
    /// Join the mesh of an invite code (with or without this home's daemon running).
    Join { code: String },
    /// Manage synced folders.
    Folder {
        #[command(subcommand)]
        action: FolderAction,
    },
    /// Show this device, its peers and its folders.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to rescan now.
    Scan {
        folder: Option<String>,
        /// Confirm a mass delete that the guard held back (more than half of a folder).
        #[arg(long)]
        allow_deletes: bool,
    },
    /// Show or add ignore patterns (gitignore syntax) of a folder. Shared patterns reach every
    /// device; --local ones apply to this device only (and may re-include with !pattern).
    Ignore {
        folder: String,
        patterns: Vec<String>,
        #[arg(long)]
        local: bool,
    },
    /// List the mesh's devices.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// List concurrent edits kept as conflict copies.
    Conflicts {
        #[arg(long)]
        json: bool,
    },
    /// List the kept old versions of a file (overwritten or deleted, within the retention).
    Versions {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Bring back an old version of a file (1 = the newest kept; see `meshsync versions`).
    Restore {
        path: PathBuf,
        #[arg(long)]
        version: Option<usize>,
    },
    /// Forget versions past the retention now, and free the space nothing references (here
    /// and on the storage peers). The daemon also does this by itself every few minutes.
    Gc,
    /// Manage static peer addresses (dialed besides the devices found on the LAN).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
    },
    /// Show meshsync at work on this machine: two real daemons in temporary homes pair and
    /// keep a folder in sync over loopback.
    Demo {
        /// Where to put the demo's homes and sample folder (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FolderAction {
    /// Sync PATH; with --id, join that existing folder of the mesh.
    Add {
        path: PathBuf,
        #[arg(long)]
        id: Option<String>,
    },
    /// List synced folders.
    List,
    /// Stop syncing a folder on this device (its files stay).
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PeerAction {
    /// Add an address, e.g. /ip4/192.168.1.20/tcp/22000 or /ip4/192.168.1.20/udp/22000/quic-v1.
    Add { addr: String },
    /// List the static addresses.
    List,
    /// Remove an address.
    Remove { addr: String },
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo { dir } = &cli.command {
        return crate::demo::run_demo(dir.as_deref());
    }
    let home = Home::locate(cli.home)?;
    match cli.command {
        Command::Demo { .. } => unreachable!("handled above"),
        Command::Up { listen, no_mdns } => {
            limit_malloc_arenas();
            runtime()?.block_on(up(home, listen, !no_mdns))?
        }
        Command::Invite { role, expires } => {
            let expires_secs = parse_duration(&expires)?;
            let reply = runtime()?.block_on(require_daemon(
                &home,
                &control::Request::Invite { role, expires_secs },
            ))?;
            println!("Give this code to the new device; it works once, for {expires}:");
            println!("{}", reply["code"].as_str().unwrap_or_default());
        }
        Command::Join { code } => runtime()?.block_on(join_mesh(home, code))?,
        Command::Folder { action } => {
            let request = match action {
                FolderAction::Add { path, id } => control::Request::FolderAdd { path, id },
                FolderAction::List => control::Request::FolderList,
                FolderAction::Remove { id } => control::Request::FolderRemove { id },
            };
            let reply = runtime()?.block_on(require_daemon(&home, &request))?;
            match reply {
                serde_json::Value::Array(list) => {
                    for f in list {
                        println!(
                            "{}  {}",
                            f["id"].as_str().unwrap_or(""),
                            f["path"].as_str().unwrap_or("")
                        );
                    }
                }
                other if other.get("path").is_some() => println!(
                    "folder {} removed; its files stay in {}",
                    other["id"].as_str().unwrap_or(""),
                    other["path"].as_str().unwrap_or("")
                ),
                other => println!("folder {} added", other["id"].as_str().unwrap_or("")),
            }
        }
        Command::Status { json } => {
            let status = runtime()?.block_on(require_daemon(&home, &control::Request::Status))?;
            if json {
                println!("{status}");
            } else {
                print_status(&status);
            }
        }
        Command::Ignore {
            folder,
            patterns,
            local,
        } => {
            let rules = runtime()?.block_on(require_daemon(
                &home,
                &control::Request::Ignore {
                    folder,
                    patterns,
                    local,
                },
            ))?;
            for (kind, key) in [("shared", "shared"), ("this device", "local")] {
                for line in rules[key].as_array().into_iter().flatten() {
                    println!("{kind:<12} {}", line.as_str().unwrap_or(""));
                }
            }
        }
        Command::Devices { json } => {
            let list = runtime()?.block_on(require_daemon(&home, &control::Request::Devices))?;
            if json {
                println!("{list}");
            } else {
                for d in list.as_array().into_iter().flatten() {
                    println!(
                        "{} {:<12} {:<9}{}{}",
                        d["id"].as_str().unwrap_or(""),
                        d["name"].as_str().unwrap_or(""),
                        d["role"].as_str().unwrap_or(""),
                        if d["admin"].as_bool() == Some(true) {
                            " admin"
                        } else {
                            ""
                        },
                        if d["this_device"].as_bool() == Some(true) {
                            " (this device)"
                        } else if d["connected"].as_bool() == Some(true) {
                            " connected"
                        } else {
                            " offline"
                        }
                    );
                }
            }
        }
        Command::Conflicts { json } => {
            let list = runtime()?.block_on(require_daemon(&home, &control::Request::Conflicts))?;
            if json {
                println!("{list}");
            } else if list.as_array().is_none_or(|l| l.is_empty()) {
                println!("no conflicts");
            } else {
                for c in list.as_array().into_iter().flatten() {
                    for copy in c["copies"].as_array().into_iter().flatten() {
                        println!(
                            "{}/{}: other version kept as {}",
                            c["folder"].as_str().unwrap_or(""),
                            c["path"].as_str().unwrap_or(""),
                            copy["copy"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
        Command::Versions { path, json } => {
            let path = std::path::absolute(&path)?;
            let list =
                runtime()?.block_on(require_daemon(&home, &control::Request::Versions { path }))?;
            if json {
                println!("{list}");
            } else if list["versions"].as_array().is_none_or(|v| v.is_empty()) {
                println!(
                    "no kept versions of {}",
                    list["path"].as_str().unwrap_or("")
                );
            } else {
                for v in list["versions"].as_array().into_iter().flatten() {
                    println!(
                        "{:>3}  {:>12} bytes  replaced {}s ago{}",
                        v["number"],
                        v["size"],
                        now_secs().saturating_sub(v["replaced_at"].as_u64().unwrap_or(0)),
                        if v["stored_here"] == true {
                            "  (stored on this device)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Restore { path, version } => {
            let path = std::path::absolute(&path)?;
            let done = runtime()?.block_on(require_daemon(
                &home,
                &control::Request::Restore { path, version },
            ))?;
            println!(
                "restored version {} of {} ({} bytes)",
                done["number"],
                done["path"].as_str().unwrap_or(""),
                done["size"]
            );
        }
        Command::Gc => {
            let done = runtime()?.block_on(require_daemon(&home, &control::Request::Gc))?;
            println!("{done}");
        }
        Command::Scan {
            folder,
            allow_deletes,
        } => {
            runtime()?.block_on(require_daemon(
                &home,
                &control::Request::Scan {
                    folder,
                    allow_deletes,
                },
            ))?;
            println!("scanned");
        }
        Command::Peer { action } => match action {
            PeerAction::Add { addr } => {
                let addr = home.add_peer(&addr)?;
                println!("added {addr}");
            }
            PeerAction::Remove { addr } => {
                let addr = home.remove_peer(&addr)?;
                println!("removed {addr}");
            }
            PeerAction::List => {
                home.load_keys()?;
                for peer in home.config()?.peers {
                    println!("{peer}");
                }
            }
        },
        Command::Init { name, storage } => {
            let name = match name {
                Some(name) => name,
                None => host_name(),
            };
            let role = if storage { Role::Storage } else { Role::Device };
            let keys = home.init(&name, role)?;
            if storage {
                println!("Created storage peer {name:?} in {}", home.path().display());
                println!("Join it to a mesh with a code from `meshsync invite --role storage`.");
            } else {
                println!("Created device {name:?} in {}", home.path().display());
            }
            println!("Device ID: {}", keys.device_id());
        }
        Command::Id {
            device: Some(text), ..
        } => {
            let device: DeviceId = text.parse().with_context(|| format!("checking {text:?}"))?;
            println!("{device} is well-formed");
            println!("peer ID: {}", device.to_peer_id());
        }
        Command::Id {
            device: None,
            peer_id,
        } => {
            let keys = home.load_keys()?;
            println!("{}", keys.device_id());
            if peer_id {
                println!("peer ID: {}", keys.device_id().to_peer_id());
            }
        }
    }
    Ok(())
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and freed memory
/// stays in them: with the runtime's and hashing threads, that was 10–15 MB of a daemon's peak
/// RSS in the sync benchmark. Two arenas cost nothing measurable in speed. Called before any
/// thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs `work` with a spinner on the terminal (nothing is drawn when stderr is not one).
async fn with_spinner<T>(message: &str, work: impl std::future::Future<Output = T>) -> T {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(message.to_string());
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let result = work.await;
    spinner.finish_and_clear();
    result
}

async fn require_daemon(
    home: &Home,
    request: &control::Request,
) -> anyhow::Result<serde_json::Value> {
    home.load_keys()?;
    let message = match request {
        control::Request::Scan { .. } => "scanning",
        control::Request::Join { .. } => "pairing with the inviting device",
        control::Request::FolderAdd { .. } => "adding the folder and scanning it",
        _ => "asking the daemon",
    };
    with_spinner(message, control::call(home.path(), request))
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no daemon is running for {}; start it with `meshsync --home {} up`",
                home.path().display(),
                home.path().display()
            )
        })
}

async fn up(home: Home, listen: Vec<String>, mdns: bool) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let listen = listen
        .iter()
        .map(|a| {
            a.parse()
                .with_context(|| format!("{a:?} is not a multiaddr"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = home.path().to_path_buf();
    let role = home.config()?.role().map_err(|e| anyhow::anyhow!(e))?;
    let control = if role == Role::Storage {
        let storage = crate::storage::start(home, listen, mdns).await?;
        {
            let s = storage.lock().await;
            let addrs = s.transport().wait_listening().await;
            println!("meshsync is up: storage peer {}", s.device_id());
            for addr in addrs {
                println!("listening on {addr}");
            }
        }
        tokio::spawn(control::serve_with(path.clone(), move |request| {
            let storage = storage.clone();
            async move { crate::storage::handle_control(&storage, request).await }
        }))
    } else {
        let node = crate::daemon::start(home, listen, mdns).await?;
        {
            let n = node.lock().await;
            let addrs = n.transport().wait_listening().await;
            println!("meshsync is up: device {}", n.keys().device_id());
            for addr in addrs {
                println!("listening on {addr}");
            }
        }
        tokio::spawn(control::serve(node.clone(), path.clone()))
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        result = control => { result??; }
    }
    let _ = std::fs::remove_file(control::socket_path(&path));
    println!("meshsync stopped");
    Ok(())
}

async fn join_mesh(home: Home, code: String) -> anyhow::Result<()> {
    home.load_keys()?;
    let request = control::Request::Join { code: code.clone() };
    let reply = with_spinner(
        "pairing with the inviting device",
        control::call(home.path(), &request),
    )
    .await?;
    if let Some(reply) = reply {
        println!("joined mesh {}", reply["mesh"].as_str().unwrap_or(""));
        return Ok(());
    }
    let keys = home.load_keys()?;
    let state = crate::state::State::open(home.path())?;
    let (mesh, _) = with_spinner(
        "pairing with the inviting device",
        crate::daemon::join(&home, &state, &keys, &code),
    )
    .await?;
    println!("joined mesh {mesh}; start the daemon with `meshsync up`");
    Ok(())
}

fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let secs = crate::home::parse_duration(text).map_err(|e| anyhow::anyhow!(e))?;
    if secs == 0 {
        anyhow::bail!("an invite must be valid for some time");
    }
    Ok(secs)
}

fn print_status(status: &serde_json::Value) {
    if status["role"] == "storage" {
        print_storage_status(status);
        return;
    }
    println!("device {}", status["device_id"].as_str().unwrap_or(""));
    for addr in status["listen"].as_array().into_iter().flatten() {
        println!("  listening on {}", addr.as_str().unwrap_or(""));
    }
    println!("peers:");
    for p in status["peers"].as_array().into_iter().flatten() {
        println!(
            "  {} {:<12} {:<8} {}  in {} B, out {} B",
            p["id"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["role"].as_str().unwrap_or(""),
            if p["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "offline"
            },
            p["bytes_in"],
            p["bytes_out"]
        );
    }
    println!("folders:");
    for f in status["folders"].as_array().into_iter().flatten() {
        println!(
            "  {} {}  {}  {} files, need {} files ({} B), {} conflicts{}",
            f["id"].as_str().unwrap_or(""),
            f["path"].as_str().unwrap_or(""),
            if f["in_sync"].as_bool() == Some(true) {
                "in sync"
            } else {
                "syncing"
            },
            f["local_files"],
            f["need_files"],
            f["need_bytes"],
            f["conflicts"],
            match f["held_deletes"].as_u64() {
                Some(n) if n > 0 => format!(
                    "; {n} deletions held back (run `meshsync scan --allow-deletes {}` if intended)",
                    f["id"].as_str().unwrap_or("")
                ),
                _ => String::new(),
            }
        );
        for path in f["unavailable"].as_array().into_iter().flatten() {
            println!(
                "    unavailable: {} (no source has intact data for it yet; not written)",
                path.as_str().unwrap_or("")
            );
        }
    }
    let storage = status["storage"].as_array().cloned().unwrap_or_default();
    if !storage.is_empty() {
        println!("storage peers:");
    }
    for s in storage {
        println!(
            "  {} {}  holds this device's changes up to {} of {}{}",
            s["id"].as_str().unwrap_or(""),
            if s["connected"] == true {
                "connected"
            } else {
                "offline"
            },
            s["holds_my_changes"],
            s["my_changes"],
            if s["holds_latest"] == true {
                " (up to date)"
            } else {
                ""
            }
        );
        for report in s["stale_reports"].as_array().into_iter().flatten() {
            println!("    WARNING: {}", report.as_str().unwrap_or(""));
        }
    }
}

fn print_storage_status(status: &serde_json::Value) {
    let holds = &status["holds"];
    println!(
        "storage peer {}",
        status["device_id"].as_str().unwrap_or("")
    );
    for addr in status["listen"].as_array().into_iter().flatten() {
        println!("  listening on {}", addr.as_str().unwrap_or(""));
    }
    println!(
        "holds {} chunks ({:.1} MB of ciphertext, {:.1} MB on disk) and {} sealed changes; it has no key to read them",
        holds["chunks"],
        holds["chunk_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        holds["disk_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        holds["sealed_changes"]
    );
    println!("members:");
    for p in status["peers"].as_array().into_iter().flatten() {
        println!(
            "  {} {:<8} {:<9} {}",
            p["id"].as_str().unwrap_or(""),
            p["role"].as_str().unwrap_or(""),
            if p["connected"] == true {
                "connected"
            } else {
                "offline"
            },
            if p["role"] != "device" {
                String::new()
            } else if p["up_to_date"] == true {
                format!("up to date (holds its changes up to {})", p["held_changes"])
            } else if p["device_changes"].is_null() {
                format!(
                    "holds its changes up to {} (not met since this storage peer started)",
                    p["held_changes"]
                )
            } else {
                format!(
                    "holds its changes up to {}, it has {}",
                    p["held_changes"], p["device_changes"]
                )
            }
        );
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meshsync device".to_string())
}
