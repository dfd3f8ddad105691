//! The `meshsync` command line: parsing ([`Cli`]) and running ([`run`]) each command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshsync_crdt::{DeviceId, Role};

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
    },
    /// Print this device's ID, or check a device ID someone gave you.
    Id {
        /// A device ID to check; prints its libp2p peer ID if it is well-formed.
        device: Option<String>,
        /// Also print the libp2p peer ID.
        #[arg(long)]
        peer_id: bool,
    },
    /// Manage static peer addresses (dialed besides the devices found on the LAN).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
    },
    /// Show meshsync at work on this machine: two devices in temporary homes form a mesh and
    /// exchange signed, verified index changes.
    Demo {
        /// Where to put the demo's homes and sample folder (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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
        return crate::demo::run(dir.as_deref());
    }
    let home = Home::locate(cli.home)?;
    match cli.command {
        Command::Demo { .. } => unreachable!("handled above"),
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
        Command::Init { name } => {
            let name = match name {
                Some(name) => name,
                None => host_name(),
            };
            let keys = home.init(&name, Role::Device)?;
            println!("Created device {name:?} in {}", home.path().display());
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

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meshsync device".to_string())
}
