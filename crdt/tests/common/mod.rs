//! What the crdt property tests share.

/// Shuffles `items` in place, reproducibly from `seed` (a linear congruential generator: the
/// order of delivery, not randomness, is what the tests vary).
pub fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        items.swap(i, (seed >> 33) as usize % (i + 1));
    }
}
