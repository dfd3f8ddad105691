//! How many streams of one protocol a peer may have open towards this node at once. A member
//! that opens stream after stream (a bug, or a compromised device) gets the extra ones closed
//! at once instead of a task, a buffer and a timer each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;

/// The most inbound streams of one protocol a peer may hold open (a device uses a handful).
pub const MAX_STREAMS_PER_PEER: usize = 32;

/// Counts open inbound streams per peer for one protocol.
#[derive(Clone, Default)]
pub struct InboundLimit {
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One admitted stream; dropping it frees its place.
pub struct Admitted {
    limit: InboundLimit,
    peer: PeerId,
}

impl InboundLimit {
    /// A place for one more stream from `peer`, unless it has [`MAX_STREAMS_PER_PEER`] open.
    pub fn admit(&self, peer: PeerId) -> Option<Admitted> {
        let mut open = self.open.lock().ok()?;
        let count = open.entry(peer).or_insert(0);
        if *count >= MAX_STREAMS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Admitted {
            limit: self.clone(),
            peer,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut open) = self.limit.open.lock() {
            if let Some(count) = open.get_mut(&self.peer) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_a_bounded_number_of_places_back_as_streams_close() {
        let limit = InboundLimit::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let held: Vec<Admitted> = (0..MAX_STREAMS_PER_PEER)
            .map(|_| limit.admit(a).unwrap())
            .collect();
        assert!(limit.admit(a).is_none());
        assert!(limit.admit(b).is_some(), "another peer is not affected");
        drop(held);
        let again = limit.admit(a);
        assert!(again.is_some());
        assert_eq!(limit.open.lock().unwrap().get(&a), Some(&1));
    }
}
