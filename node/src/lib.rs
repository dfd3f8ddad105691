//! The meshsync node: the `meshsync` command-line tool and, in later steps, the daemon that
//! wires the replicated state ([`meshsync_crdt`]) and the transport to the file system.
//!
//! - [`home`]: the node's home directory — key files (mode 0600), config.
//! - [`cli`]: the command-line interface.
//! - [`demo`]: `meshsync demo`, the foundation at work on one machine.

pub mod cli;
pub mod demo;
pub mod home;
