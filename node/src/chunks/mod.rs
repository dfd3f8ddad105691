//! Chunks: how file content becomes the sealed pieces that travel and are stored. Nothing here
//! knows about the daemon, the network or the index.
//!
//! - [`cdc`]: FastCDC's cut points, found four lanes at a time.
//! - [`content`]: FastCDC chunking, keyed-BLAKE3 chunk IDs, AES-256-GCM sealing and opening of
//!   one chunk, and [`ChunkRef`] — one chunk of a file (ID, offset, length).
//! - [`delta`]: a chunk list as the pieces that differ from another (how a changed file's list
//!   travels).
//! - [`store`]: the chunk store — sealed chunks in pack files indexed by redb (old versions on a
//!   device, everything on a storage peer).

pub mod cdc;
pub mod content;
pub mod delta;
pub mod store;

pub use content::ChunkRef;
pub use store::ChunkStore;
