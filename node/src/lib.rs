//! The meshsync node: the device engine, the storage peer, and the `meshsync` command line,
//! wiring the replicated state ([`meshsync_crdt`]) and the transport ([`meshsync_transport`]) to
//! the file system. ARCHITECTURE.md at the repository root is the map; in short:
//!
//! - [`device`]: a device (`meshsync up`): scan, sync, materialise, serve — usable in-process
//!   ([`device::start`] with a home and a [`net::Network`], TCP/QUIC or in-memory).
//! - [`storage_peer`]: a storage peer: stores and serves sealed changes and chunks, reads none.
//! - [`storage_client`]: a device's sealing and bookkeeping for storage peers.
//! - [`protocol`]: every wire message (`/meshsync/doc/2`, `/meshsync/sealed/1`, pairing payload)
//!   and the one typed request helper.
//! - [`net`]: transports, who may connect, static addresses; [`pairing`]: joining by code.
//! - [`disk`]: the one door to a synced folder's files (no `..`, no symlink followed).
//! - [`chunks`]: FastCDC chunking, chunk IDs, sealing ([`chunks::content`]) and the chunk store.
//! - [`state`]: the node's redb state (mesh, membership, folders, index shards, local files).
//! - [`versions`]: old versions kept for the retention period.
//! - [`home`]: the home directory — key files (mode 0600), config.
//! - [`control`]: the Unix control socket and its typed requests and replies.
//! - [`notify`]: readiness, status and watchdog for systemd (`sd_notify`).
//! - [`cli`]: the command line; [`demo`]: `meshsync demo`.
//!
//! Modules depend one way: `cli` → `device`/`storage_peer` → `storage_client`, `versions`,
//! `protocol`, `net`, `pairing`, `control` → `state`, `chunks`, `home`.

pub mod chunks;
pub mod cli;
pub mod control;
pub mod demo;
pub mod device;
pub mod disk;
pub mod home;
pub mod net;
pub mod notify;
pub mod pairing;
pub(crate) mod phases;
pub mod protocol;
pub mod state;
pub mod storage_client;
pub mod storage_peer;
pub mod versions;
pub mod web;
