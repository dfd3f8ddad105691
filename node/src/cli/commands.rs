//! One function per command: parse what the user gave, ask the daemon (typed request, typed
//! reply), print the reply with [`super::print`] or as JSON.

use std::path::PathBuf;

use anyhow::Context;
use meshsync_crdt::{DeviceId, Role};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{print, FolderAction, PeerAction};
use crate::control::{self, Request};
use crate::home::Home;
use crate::net::Network;

pub fn init(home: &Home, name: Option<String>, storage: bool) -> anyhow::Result<()> {
    let name = name.unwrap_or_else(host_name);
    let role = if storage { Role::Storage } else { Role::Device };
    let keys = home.init(&name, role)?;
    if storage {
        println!("Created storage peer {name:?} in {}", home.path().display());
        println!("Join it to a mesh with a code from `meshsync invite --role storage`.");
    } else {
        println!("Created device {name:?} in {}", home.path().display());
    }
    println!("Device ID: {}", keys.device_id());
    Ok(())
}

pub fn id(home: &Home, device: Option<String>, peer_id: bool) -> anyhow::Result<()> {
    match device {
        Some(text) => {
            let device: DeviceId = text.parse().with_context(|| format!("checking {text:?}"))?;
            println!("{device} is well-formed");
            println!("peer ID: {}", device.to_peer_id());
        }
        None => {
            let keys = home.load_keys()?;
            println!("{}", keys.device_id());
            if peer_id {
                println!("peer ID: {}", keys.device_id().to_peer_id());
            }
        }
    }
    Ok(())
}

pub fn peer(home: &Home, action: PeerAction) -> anyhow::Result<()> {
    match action {
        PeerAction::Add { addr } => println!("added {}", home.add_peer(&addr)?),
        PeerAction::Remove { addr } => println!("removed {}", home.remove_peer(&addr)?),
        PeerAction::List => {
            home.load_keys()?;
            for peer in home.config()?.peers {
                println!("{peer}");
            }
        }
    }
    Ok(())
}

pub fn invite(home: &Home, role: String, expires: &str, qr: bool) -> anyhow::Result<()> {
    let expires_secs = parse_duration(expires)?;
    let reply: control::InviteCode = ask(home, &Request::Invite { role, expires_secs })?;
    if qr {
        let code = qrcode::QrCode::new(reply.code.as_bytes())?;
        let picture = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build();
        println!("{picture}");
    }
    println!("Give this code to the new device; it works once, for {expires}:");
    println!("{}", reply.code);
    Ok(())
}

pub fn folder(home: &Home, action: FolderAction) -> anyhow::Result<()> {
    match action {
        FolderAction::Add { path, id } => {
            let added: control::FolderAdded = ask(home, &Request::FolderAdd { path, id })?;
            println!("folder {} added", added.id);
        }
        FolderAction::List { json } => {
            let list: Vec<control::FolderInfo> = ask(home, &Request::FolderList)?;
            show(json, &list, |l| print::folders(l))?;
        }
        FolderAction::Remove { id } => {
            let removed: control::FolderInfo = ask(home, &Request::FolderRemove { id })?;
            println!(
                "folder {} removed; its files stay in {}",
                removed.id, removed.path
            );
        }
    }
    Ok(())
}

pub fn status(home: &Home, json: bool) -> anyhow::Result<()> {
    let status: control::Status = ask(home, &Request::Status)?;
    show(json, &status, print::status)
}

pub fn scan(home: &Home, folder: Option<String>, allow_deletes: bool) -> anyhow::Result<()> {
    let _: control::ScanDone = ask(
        home,
        &Request::Scan {
            folder,
            allow_deletes,
        },
    )?;
    println!("scanned");
    Ok(())
}

pub fn ignore(
    home: &Home,
    folder: String,
    patterns: Vec<String>,
    local: bool,
) -> anyhow::Result<()> {
    let rules: control::IgnoreList = ask(
        home,
        &Request::Ignore {
            folder,
            patterns,
            local,
        },
    )?;
    print!("{}", print::ignore(&rules));
    Ok(())
}

pub fn devices(home: &Home, json: bool) -> anyhow::Result<()> {
    let list: Vec<control::DeviceInfo> = ask(home, &Request::Devices)?;
    show(json, &list, |l| print::devices(l))
}

pub fn conflicts(home: &Home, json: bool) -> anyhow::Result<()> {
    let list: Vec<control::ConflictCopy> = ask(home, &Request::Conflicts)?;
    show(json, &list, |l| print::conflicts(l))
}

pub fn versions(home: &Home, path: PathBuf, json: bool) -> anyhow::Result<()> {
    let path = std::path::absolute(&path)?;
    let list: control::VersionList = ask(home, &Request::Versions { path })?;
    show(json, &list, |l| {
        print::versions(l, crate::versions::now_secs())
    })
}

pub fn restore(home: &Home, path: PathBuf, version: Option<usize>) -> anyhow::Result<()> {
    let path = std::path::absolute(&path)?;
    let done: control::Restored = ask(home, &Request::Restore { path, version })?;
    print!("{}", print::restored(&done));
    Ok(())
}

pub fn gc(home: &Home, json: bool) -> anyhow::Result<()> {
    let report: control::GcReport = ask(home, &Request::Gc)?;
    show(json, &report, print::gc)
}

pub fn remove(home: &Home, device: String, wipe: bool, json: bool) -> anyhow::Result<()> {
    let removed: control::Removed = ask(home, &Request::Remove { device, wipe })?;
    show(json, &removed, print::removed)
}

pub fn leave(home: &Home) -> anyhow::Result<()> {
    let left: control::Left = ask(home, &Request::Leave)?;
    println!(
        "left the mesh ({} member{} heard it at once); its keys and state are forgotten and the daemon stopped; your files stay",
        left.told,
        if left.told == 1 { "" } else { "s" }
    );
    Ok(())
}

pub fn rename(home: &Home, device: Option<String>, name: String) -> anyhow::Result<()> {
    let changed: control::Changed = ask(home, &Request::Name { device, name })?;
    print!("{}", print::changed(&changed));
    Ok(())
}

pub fn set_role(home: &Home, device: String, role: String) -> anyhow::Result<()> {
    let changed: control::Changed = ask(home, &Request::Role { device, role })?;
    print!("{}", print::changed(&changed));
    Ok(())
}

pub fn admin(home: &Home, action: super::AdminAction) -> anyhow::Result<()> {
    let (device, grant) = match action {
        super::AdminAction::Grant { device } => (device, true),
        super::AdminAction::Revoke { device } => (device, false),
    };
    let changed: control::Changed = ask(home, &Request::Admin { device, grant })?;
    print!("{}", print::changed(&changed));
    Ok(())
}

/// Prints `reply` as JSON, or as `human` renders it.
fn show<T: Serialize + ?Sized>(
    json: bool,
    reply: &T,
    human: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(reply)?);
    } else {
        print!("{}", human(reply));
    }
    Ok(())
}

/// `meshsync up`: a device daemon, or for a storage home, the storage peer; both answer the
/// control socket until stopped (Ctrl-C, SIGTERM).
pub fn up(home: Home, listen: Vec<String>, mdns: bool, web: bool) -> anyhow::Result<()> {
    limit_malloc_arenas();
    runtime()?.block_on(run_daemon(home, listen, mdns, web))
}

async fn run_daemon(home: Home, listen: Vec<String>, mdns: bool, web: bool) -> anyhow::Result<()> {
    super::logs::init();
    let listen = listen
        .iter()
        .map(|a| {
            a.parse()
                .with_context(|| format!("{a:?} is not a multiaddr; write it like /ip4/0.0.0.0/tcp/22000 or /ip4/0.0.0.0/udp/22000/quic-v1"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let network = Network::tcp(listen, mdns);
    let path = home.path().to_path_buf();
    let config = home.config()?;
    let role = config.role().map_err(|e| anyhow::anyhow!(e))?;
    let web_port = web.then_some(config.web_port);
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    // Set as the device stops: see `Device::stopping`.
    let mut stopping = None;
    let control = if role == Role::Storage {
        let storage = crate::storage_peer::start(home, network).await?;
        let (transport, id) = {
            let s = storage.lock().await;
            (s.transport().clone(), s.device_id())
        };
        announce(&format!("storage peer {id}"), &transport).await;
        let backend: crate::web::Backend = {
            let storage = storage.clone();
            std::sync::Arc::new(move |request| {
                let storage = storage.clone();
                Box::pin(
                    async move { crate::storage_peer::handle_control(&storage, request).await },
                )
            })
        };
        start_web(&path, web_port, backend, true).await;
        tokio::spawn(control::serve(path.clone(), move |request| {
            let storage = storage.clone();
            async move { crate::storage_peer::handle_control(&storage, request).await }
        }))
    } else {
        let device = crate::device::start(home, network).await?;
        let (transport, id) = {
            let d = device.lock().await;
            stopping = Some(d.stopping());
            let stopped = d.stopped();
            let stop = stop.clone();
            tokio::spawn(async move {
                stopped.notified().await;
                stop.notify_one();
            });
            (d.transport().clone(), d.keys().device_id())
        };
        announce(&format!("device {id}"), &transport).await;
        let backend: crate::web::Backend = {
            let device = device.clone();
            std::sync::Arc::new(move |request| {
                let device = device.clone();
                Box::pin(async move { crate::device::control::handle(&device, request).await })
            })
        };
        start_web(&path, web_port, backend, false).await;
        tokio::spawn(control::serve(path.clone(), move |request| {
            let device = device.clone();
            async move { crate::device::control::handle(&device, request).await }
        }))
    };
    tokio::spawn(crate::notify::when_serving(path.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ended = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        _ = stop.notified() => Ok(()),
        result = control => result.map_err(anyhow::Error::from).and_then(|served| served),
    };
    // Set however it ends: the runtime's shutdown waits for walks still running.
    if let Some(stopping) = stopping {
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    ended?;
    crate::notify::stopping();
    let _ = std::fs::remove_file(control::socket_path(&path));
    println!("meshsync stopped");
    Ok(())
}

/// Starts the web page unless turned off; a page that cannot start (its port taken, say) is
/// reported and the daemon runs on without it.
async fn start_web(
    home: &std::path::Path,
    port: Option<u16>,
    backend: crate::web::Backend,
    read_only: bool,
) {
    let Some(port) = port else {
        let _ = std::fs::remove_file(home.join(crate::web::ADDRESS_FILE));
        return;
    };
    match crate::web::start(home, port, backend, read_only).await {
        Ok(addr) => println!("web page on http://{addr}/ (`meshsync web` prints the link to open)"),
        Err(error) => tracing::warn!("{error:#}"),
    }
}

/// `meshsync web`: the link to this home's running page (its last line).
pub fn web(home: &Home) -> anyhow::Result<()> {
    let link = crate::web::link(home.path())?;
    println!("Open meshsync's page in a browser on this machine (the link carries a secret: keep it to yourself):");
    println!("{link}");
    Ok(())
}

/// Prints that the node is up and where it listens.
async fn announce(what: &str, transport: &meshsync_transport::Transport) {
    let addrs = transport.wait_listening().await;
    println!("meshsync is up: {what}");
    for addr in addrs {
        println!("listening on {addr}");
    }
}

/// `meshsync join CODE`: through the running daemon if there is one, else directly.
pub fn join(home: Home, code: String, accept_wipe: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        home.load_keys()?;
        let message = "pairing with the inviting device";
        let request = Request::Join {
            code: code.clone(),
            accept_wipe,
        };
        let through_daemon: Option<control::Joined> =
            with_spinner(message, control::call(home.path(), &request)).await?;
        if let Some(joined) = through_daemon {
            println!("joined mesh {}", joined.mesh);
            return Ok(());
        }
        let keys = home.load_keys()?;
        let state = crate::state::State::open(home.path())?;
        let (mesh, _) = with_spinner(
            message,
            crate::pairing::join(&home, &state, &keys, &code, accept_wipe),
        )
        .await?;
        println!("joined mesh {mesh}; start the daemon with `meshsync up`");
        Ok(())
    })
}

/// Sends `request` to the home's daemon and decodes its reply, with a spinner while it works.
fn ask<T: DeserializeOwned>(home: &Home, request: &Request) -> anyhow::Result<T> {
    home.load_keys()?;
    let message = match request {
        Request::Scan { .. } => "scanning",
        Request::Join { .. } => "pairing with the inviting device",
        Request::FolderAdd { .. } => "adding the folder and scanning it",
        _ => "asking the daemon",
    };
    runtime()?
        .block_on(with_spinner(message, control::call(home.path(), request)))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no daemon is running for {}; start it with `meshsync --home {} up`",
                home.path().display(),
                home.path().display()
            )
        })
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

fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let secs = crate::home::parse_duration(text).map_err(|e| anyhow::anyhow!(e))?;
    if secs == 0 {
        anyhow::bail!(
            "an invite must be valid for some time; give --expires a duration like 10m or 1h"
        );
    }
    Ok(secs)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meshsync device".to_string())
}
