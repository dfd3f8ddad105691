//! The `meshsync` command line: parsing ([`Cli`]), running each command ([`commands`]) and
//! printing replies for people ([`print`]). Every command but `init`, `id`, `peer`, `demo`
//! and a `join` without a daemon talks to the daemon over the control socket.

pub mod commands;
pub mod generate;
pub mod logs;
pub mod print;
pub mod service;
pub mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
        /// Do not serve the local web page (on 127.0.0.1, port `web_port` in config.toml).
        #[arg(long)]
        no_web: bool,
    },
    /// Print the link to this device's local web page (the daemon must run).
    Web,
    /// Print a one-time invite code for another device (the last line of output).
    Invite {
        /// device, read-only or storage.
        #[arg(long, default_value = "device")]
        role: String,
        /// How long the code stays valid, e.g. 10m, 1h, 600s.
        #[arg(long, default_value = "1h")]
        expires: String,
        /// Also print the code as a QR code, to scan from the other device.
        #[arg(long)]
        qr: bool,
    },
    /// Join the mesh of an invite code (with or without this home's daemon running).
    Join {
        code: String,
        /// If this device is ever removed from the mesh (stolen, say) and reaches a member
        /// again, let it erase its synced folders' content, its keys and its state when told
        /// to (`meshsync remove --wipe`). Best effort: only if it comes back online.
        #[arg(long)]
        accept_remote_wipe: bool,
    },
    /// Manage synced folders.
    Folder {
        #[command(subcommand)]
        action: FolderAction,
    },
    /// Show this device, its peers and its folders.
    Status {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Show it again every second, with live progress bars for folders not in sync, until
        /// Ctrl-C (one plain line per folder per second when not on a terminal).
        #[arg(long)]
        watch: bool,
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
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Remove a device from the mesh (admins only; it may be offline, as a stolen laptop is):
    /// a new mesh key for every device that stays, and the removed one is let in no more.
    /// DEVICE is its device ID, a unique prefix of it, or its name.
    Remove {
        device: String,
        /// Also order it to erase its folders' content, keys and state should it come back
        /// (best effort; only a device that joined with --accept-remote-wipe obeys).
        #[arg(long)]
        wipe: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rename this device (or, for an admin, another member with --device).
    Name {
        name: String,
        /// The member to rename (device ID, prefix or name); default: this device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Change a member's role (admins only): device (reads and writes) or read-only (reads;
    /// its changes are refused by every other device).
    Role { device: String, role: String },
    /// Make a member an admin, or no longer one (admins only; the last admin stays one).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Take this device out of the mesh (the daemon must run, to tell the others): it signs its
    /// own removal, forgets the mesh's keys and state, and its daemon stops. Files stay.
    Leave,
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
    /// Run the daemon as a systemd service: `service install --user`, then
    /// `systemctl --user enable --now meshsync`.
    Service {
        #[command(subcommand)]
        action: service::ServiceAction,
    },
    /// Print a shell completion script, e.g. `meshsync completions bash >
    /// ~/.local/share/bash-completion/completions/meshsync`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), e.g. `meshsync man | man -l -`; with --dir, write one page
    /// per command there.
    Man {
        #[arg(long, value_name = "DIR")]
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
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop syncing a folder on this device (its files stay).
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Make DEVICE an admin.
    Grant { device: String },
    /// Make DEVICE no longer an admin.
    Revoke { device: String },
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
    use commands::*;
    if let Command::Demo { dir } = &cli.command {
        return crate::demo::run_demo(dir.as_deref());
    }
    match &cli.command {
        Command::Completions { shell } => return generate::completions(*shell),
        Command::Man { dir } => return generate::man(dir.as_deref()),
        _ => {}
    }
    let home = crate::home::Home::locate(cli.home)?;
    match cli.command {
        Command::Demo { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
        Command::Init { name, storage } => init(&home, name, storage),
        Command::Id { device, peer_id } => id(&home, device, peer_id),
        Command::Peer { action } => peer(&home, action),
        Command::Up {
            listen,
            no_mdns,
            no_web,
        } => up(home, listen, !no_mdns, !no_web),
        Command::Web => web(&home),
        Command::Join {
            code,
            accept_remote_wipe,
        } => join(home, code, accept_remote_wipe),
        Command::Invite { role, expires, qr } => invite(&home, role, &expires, qr),
        Command::Folder { action } => folder(&home, action),
        Command::Status { watch: true, .. } => watch::watch(&home),
        Command::Status { json, .. } => status(&home, json),
        Command::Service {
            action: service::ServiceAction::Install(args),
        } => service::install(&home, &args),
        Command::Service {
            action: service::ServiceAction::Uninstall(args),
        } => service::uninstall(&args),
        Command::Scan {
            folder,
            allow_deletes,
        } => scan(&home, folder, allow_deletes),
        Command::Ignore {
            folder,
            patterns,
            local,
        } => ignore(&home, folder, patterns, local),
        Command::Devices { json } => devices(&home, json),
        Command::Conflicts { json } => conflicts(&home, json),
        Command::Versions { path, json } => versions(&home, path, json),
        Command::Restore { path, version } => restore(&home, path, version),
        Command::Gc { json } => gc(&home, json),
        Command::Remove { device, wipe, json } => remove(&home, device, wipe, json),
        Command::Name { name, device } => rename(&home, device, name),
        Command::Role { device, role } => set_role(&home, device, role),
        Command::Admin { action } => admin(&home, action),
        Command::Leave => leave(&home),
    }
}
