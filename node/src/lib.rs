//! The meshsync node: the `meshsync` command-line tool and, in later steps, the daemon that
//! wires the replicated state ([`meshsync_crdt`]) and the transport to the file system.
//!
//! - [`home`]: the node's home directory — key files (mode 0600), config.
//! - [`cli`]: the command-line interface.
//! - [`demo`]: `meshsync demo`, two real daemons pairing and syncing on one machine.
//! - [`content`]: FastCDC chunking, keyed-BLAKE3 chunk IDs, AES-256-GCM sealing of chunks.
//! - [`daemon`]: `meshsync up`: scanning, pull/push of signed changes, materialising files.
//! - [`control`]: the Unix control socket between the CLI and the daemon.
//! - [`sealing`]: a device's side of storage peers: seal, push, pull, notice stale storage.
//! - [`state`]: the node's redb state (mesh, membership, folders, index shards, local files).
//! - [`storage`]: the storage peer: stores and serves sealed changes and chunks, reads none.
//! - [`versions`]: old versions kept for the retention period: list, restore, forget.
//! - [`store`]: the chunk store: pack files indexed by redb, one fsync and commit per batch.

pub mod cli;
pub mod content;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod home;
pub mod sealing;
pub mod state;
pub mod storage;
pub mod store;
pub mod versions;
