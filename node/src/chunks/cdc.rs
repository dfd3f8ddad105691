//! FastCDC's cut points, found in four lanes at once.
//!
//! The chunker cuts where FastCDC (2020, normalisation level 1) cuts — [`Cutter::cut`] returns
//! what `fastcdc::v2020::cut` returns for the same window, and the tests hold it to that — but
//! scans differently. FastCDC's gear hash is one chain: each byte's hash is the previous one
//! shifted left by one plus the byte's table entry, so a core waits on every add before the
//! next (about 1.5 cycles a byte however wide the core). The hash at a position depends only
//! on the 64 bytes before it (older ones are shifted out of the 64 bits), so a stretch can be
//! split into four segments, each started 64 bytes early, and their four chains run side by side;
//! the first position that passes the mask, in order, is the cut. The warm-up and the segments
//! scanned past the cut cost some work, less than the waiting saved.
//!
//! Measured on this machine, one core, the same random bytes back to back (the sync bench's
//! reference line, `cargo bench -p meshsync-node --bench sync`): the crate's `cut` 1,355–2,277
//! MB/s, these lanes 1,555–3,307 MB/s: 1.12–1.53× in the same run in all but one of some 40
//! runs, 0.96× in that one (a minute when the host was busy: the lanes live on execution units
//! a single chain leaves idle). Lanes of 1,024–4,096 bytes gained only 1.04–1.15× (more
//! scanned past the cut); the hashes kept in an array instead of four locals, 1.1–1.3×.

use fastcdc::v2020::{get_gear_with_seed, select_masks, Normalization};

/// Lanes scanned side by side (written out as four in [`Cutter::first_hit`]).
const LANES: usize = 4;
/// Bytes each lane scans per round.
const SEG: usize = 512;
/// Bytes a lane's hash is warmed up over before its segment: all a gear hash remembers.
const WARM: usize = 64;

/// Finds FastCDC cut points for one set of chunk sizes.
pub struct Cutter {
    gear: [u64; 256],
    mask_s: u64,
    mask_l: u64,
    min: usize,
    avg: usize,
    max: usize,
}

impl Cutter {
    /// A cutter for chunks of `min`, `avg` and `max` bytes (even numbers, as FastCDC's cut
    /// requires), with FastCDC's own gear table and masks.
    pub fn new(min: usize, avg: usize, max: usize) -> Cutter {
        let (table, _) = get_gear_with_seed(0);
        let mut gear = [0u64; 256];
        gear.copy_from_slice(&table);
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        Cutter {
            gear,
            mask_s,
            mask_l,
            min,
            avg,
            max,
        }
    }

    /// The length of the chunk that starts `window`: the first position from `min` on whose
    /// hash has none of the mask's bits (the strict mask before `avg`, the loose one after),
    /// else the whole window up to `max`.
    pub fn cut(&self, window: &[u8]) -> usize {
        let mut remaining = window.len();
        if remaining <= self.min {
            return remaining;
        }
        let mut center = self.avg;
        if remaining > self.max {
            remaining = self.max;
        } else if remaining < center {
            center = remaining;
        }
        // FastCDC tests positions in pairs: an odd window's last byte is never a cut.
        let end = remaining - remaining % 2;
        let src = &window[..remaining];
        self.first_hit(src, self.min, center.min(end), self.mask_s)
            .or_else(|| self.first_hit(src, center, end, self.mask_l))
            .unwrap_or(remaining)
    }

    /// The first position in `from..to` where the hash started at `self.min` has none of
    /// `mask`'s bits.
    fn first_hit(&self, src: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
        let gear = &self.gear;
        let warm = |at: usize| {
            (src[at.saturating_sub(WARM).max(self.min)..at].iter())
                .fold(0u64, |h, &b| (h << 1).wrapping_add(gear[b as usize]))
        };
        let mut at = from;
        while at + LANES * SEG <= to {
            let block: &[u8; LANES * SEG] = src[at..at + LANES * SEG]
                .try_into()
                .expect("a block of LANES * SEG bytes");
            // Four named hashes, not an array: kept in registers (as an array, 1.1–1.3× the
            // crate's rate instead of ~1.45×).
            let (mut h0, mut h1, mut h2, mut h3) = (
                warm(at),
                warm(at + SEG),
                warm(at + 2 * SEG),
                warm(at + 3 * SEG),
            );
            let mut later: Option<usize> = None;
            for i in 0..SEG {
                h0 = (h0 << 1).wrapping_add(gear[block[i] as usize]);
                h1 = (h1 << 1).wrapping_add(gear[block[i + SEG] as usize]);
                h2 = (h2 << 1).wrapping_add(gear[block[i + 2 * SEG] as usize]);
                h3 = (h3 << 1).wrapping_add(gear[block[i + 3 * SEG] as usize]);
                if h0 & mask == 0 {
                    return Some(at + i);
                }
                if (h1 & mask == 0) | (h2 & mask == 0) | (h3 & mask == 0) {
                    let lane = if h1 & mask == 0 {
                        1
                    } else if h2 & mask == 0 {
                        2
                    } else {
                        3
                    };
                    let hit = at + lane * SEG + i;
                    later = Some(later.map_or(hit, |seen| seen.min(hit)));
                }
            }
            if later.is_some() {
                return later;
            }
            at += LANES * SEG;
        }
        let mut hash = warm(at);
        for (i, &b) in src.get(at..to).unwrap_or_default().iter().enumerate() {
            hash = (hash << 1).wrapping_add(gear[b as usize]);
            if hash & mask == 0 {
                return Some(at + i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::content::test_bytes as noise;
    use proptest::prelude::*;

    const MIN: usize = 16 * 1024;
    const AVG: usize = 32 * 1024;
    const MAX: usize = 128 * 1024;

    fn theirs(window: &[u8]) -> usize {
        let (s, l) = select_masks(AVG, Normalization::Level1);
        fastcdc::v2020::cut(window, MIN, AVG, MAX, s, l, s << 1, l << 1).1
    }

    #[test]
    fn cuts_where_fastcdc_cuts_through_a_long_stream() {
        let cutter = Cutter::new(MIN, AVG, MAX);
        let input = noise(16 << 20, 3);
        let (mut at, mut cuts) = (0, 0);
        while at < input.len() {
            let window = &input[at..input.len().min(at + MAX)];
            let n = cutter.cut(window);
            assert_eq!(n, theirs(window), "at {at}");
            at += n;
            cuts += 1;
        }
        assert!(cuts > 300, "{cuts} chunks in 16 MiB");
    }

    #[test]
    fn windows_of_every_shape_cut_alike() {
        let cutter = Cutter::new(MIN, AVG, MAX);
        let zeros = vec![0u8; MAX + 3];
        let same = vec![7u8; MAX + 3];
        let sparse: Vec<u8> = (noise(MAX + 3, 9).iter().enumerate())
            .map(|(i, &b)| if i % 3 == 0 { b } else { 0 })
            .collect();
        for input in [zeros, same, sparse, noise(MAX + 3, 11)] {
            for len in [
                0,
                1,
                MIN - 1,
                MIN,
                MIN + 1,
                AVG - 1,
                AVG,
                AVG + 1,
                MAX - 1,
                MAX,
                MAX + 3,
            ] {
                assert_eq!(
                    cutter.cut(&input[..len]),
                    theirs(&input[..len]),
                    "length {len}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_window_cuts_where_fastcdc_cuts(
            seed in any::<u8>(),
            len in 0..MAX + 100,
            zero_every in 1usize..5,
        ) {
            // Low-entropy data too: every `zero_every`-th byte kept, the others zero.
            let input: Vec<u8> = (noise(len, seed).iter().enumerate())
                .map(|(i, &b)| if i % zero_every == 0 { b } else { 0 })
                .collect();
            prop_assert_eq!(Cutter::new(MIN, AVG, MAX).cut(&input), theirs(&input));
        }
    }
}
