//! A chunk list as the pieces that differ from another: how a changed file's list travels
//! between devices when the receiver holds the list of the version it replaces. A 1 MiB edit
//! in a 256 MiB file changes some thirty of its ~6,000 chunks; the whole list is ~250 KB on
//! the wire, its delta well under 2 KB.
//!
//! [`diff`] names runs of the base by position, in order and never twice, and everything else
//! in full; [`patch`] takes hostile pieces: every run must lie inside the base, after the
//! previous one, so what it builds is never longer than the base plus the chunks sent. The
//! caller then checks the result against the list hash the signed record names
//! ([`super::content::valid_list`]): a delta can only ever produce that list, or be refused.

use std::collections::HashMap;

use meshsync_crdt::ChunkId;
use serde::{Deserialize, Serialize};

use super::ChunkRef;

/// One piece of a chunk list sent against a base list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListPiece {
    /// `count` chunks of the base from position `from`.
    Same { from: u32, count: u32 },
    /// Chunks the base does not have there: ID and length (offsets follow from the lengths).
    New(Vec<(ChunkId, u32)>),
}

/// Why pieces could not be put together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("a run of the base list ({from}+{count}) lies outside it ({len} chunks)")]
    OutOfBase { from: u32, count: u32, len: usize },
    #[error(
        "a run of the base list starts at {from}, before the end of the previous one ({next})"
    )]
    Backwards { from: u32, next: usize },
}

/// Runs shorter than this are sent in full (a run costs about as much as a chunk).
const MIN_RUN: usize = 2;

/// `list` as pieces against `base`: what both start and end with, and between those, runs
/// of the base in order (each base position used at most once) and the rest in full.
pub fn diff(base: &[ChunkRef], list: &[ChunkRef]) -> Vec<ListPiece> {
    let same = |a: &ChunkRef, b: &ChunkRef| a.id == b.id && a.len == b.len;
    let head = (base.iter().zip(list))
        .take_while(|(a, b)| same(a, b))
        .count();
    let tail = (base[head..].iter().rev().zip(list[head..].iter().rev()))
        .take_while(|(a, b)| same(a, b))
        .count();
    let mut pieces = Vec::new();
    if head > 0 {
        pieces.push(ListPiece::Same {
            from: 0,
            count: head as u32,
        });
    }
    let middle = &base[head..base.len() - tail];
    middle_pieces(middle, head, &list[head..list.len() - tail], &mut pieces);
    if tail > 0 {
        pieces.push(ListPiece::Same {
            from: (base.len() - tail) as u32,
            count: tail as u32,
        });
    }
    pieces
}

/// The pieces of `list` against `base`, which starts at position `at` of the whole base:
/// runs found in order, the rest in full.
fn middle_pieces(base: &[ChunkRef], at: usize, list: &[ChunkRef], pieces: &mut Vec<ListPiece>) {
    let same = |a: &ChunkRef, b: &ChunkRef| a.id == b.id && a.len == b.len;
    // The first position of each chunk in the base.
    let mut first: HashMap<(ChunkId, u32), usize> = HashMap::with_capacity(base.len());
    for (i, c) in base.iter().enumerate() {
        first.entry((c.id, c.len)).or_insert(i);
    }
    let mut fresh: Vec<(ChunkId, u32)> = Vec::new();
    let (mut i, mut next) = (0usize, 0usize);
    while i < list.len() {
        // Where a run could start: the chunk's position in the base if it is not behind the
        // previous run, else right after that run (a repeated chunk).
        let start = match first.get(&(list[i].id, list[i].len)) {
            Some(&p) if p >= next => Some(p),
            _ if next < base.len() && same(&base[next], &list[i]) => Some(next),
            _ => None,
        };
        let run = start.map_or(0, |s| {
            (0..)
                .take_while(|k| {
                    s + k < base.len() && i + k < list.len() && same(&base[s + k], &list[i + k])
                })
                .count()
        });
        match start {
            Some(s) if run >= MIN_RUN => {
                if !fresh.is_empty() {
                    pieces.push(ListPiece::New(std::mem::take(&mut fresh)));
                }
                pieces.push(ListPiece::Same {
                    from: (at + s) as u32,
                    count: run as u32,
                });
                i += run;
                next = s + run;
            }
            _ => {
                fresh.push((list[i].id, list[i].len));
                i += 1;
            }
        }
    }
    if !fresh.is_empty() {
        pieces.push(ListPiece::New(fresh));
    }
}

/// The list `pieces` describe against `base`, offsets recomputed. Refuses runs outside the
/// base or not after the previous run; the result is at most `base.len()` plus the chunks the
/// pieces carry. The caller checks it against the expected hash.
pub fn patch(base: &[ChunkRef], pieces: &[ListPiece]) -> Result<Vec<ChunkRef>, DeltaError> {
    let mut list = Vec::new();
    let mut offset = 0u64;
    let mut next = 0usize;
    let mut push = |list: &mut Vec<ChunkRef>, id, len: u32| {
        list.push(ChunkRef { id, offset, len });
        offset += u64::from(len);
    };
    for piece in pieces {
        match piece {
            ListPiece::Same { from, count } => {
                let start = *from as usize;
                let end = start
                    .checked_add(*count as usize)
                    .filter(|end| *end <= base.len())
                    .ok_or(DeltaError::OutOfBase {
                        from: *from,
                        count: *count,
                        len: base.len(),
                    })?;
                if start < next {
                    return Err(DeltaError::Backwards { from: *from, next });
                }
                for c in &base[start..end] {
                    push(&mut list, c.id, c.len);
                }
                next = end;
            }
            ListPiece::New(chunks) => {
                for (id, len) in chunks {
                    push(&mut list, *id, *len);
                }
            }
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn refs(ids: &[u8]) -> Vec<ChunkRef> {
        let mut offset = 0;
        ids.iter()
            .map(|&b| {
                let len = 1000 + u32::from(b);
                let c = ChunkRef {
                    id: ChunkId([b; 32]),
                    offset,
                    len,
                };
                offset += u64::from(len);
                c
            })
            .collect()
    }

    fn wire_size(pieces: &[ListPiece]) -> usize {
        postcard::to_allocvec(pieces).unwrap().len()
    }

    #[test]
    fn an_edit_in_the_middle_of_a_long_list_sends_only_what_changed() {
        let base: Vec<ChunkRef> = refs(&(0..=255).collect::<Vec<u8>>());
        let mut ids: Vec<u8> = (0..=255).collect();
        ids.splice(100..110, [7, 250, 251]); // 7 and 250/251 exist elsewhere: sent in full
        let list = refs(&ids);
        let pieces = diff(&base, &list);
        assert_eq!(patch(&base, &pieces).unwrap(), list);
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        let whole = wire_size(&[ListPiece::New(list.iter().map(|c| (c.id, c.len)).collect())]);
        assert!(
            wire_size(&pieces) * 20 < whole,
            "{} vs {whole}",
            wire_size(&pieces)
        );
    }

    #[test]
    fn hostile_pieces_are_refused_before_they_grow_a_list() {
        let base = refs(&[1, 2, 3, 4]);
        let out = |from, count| ListPiece::Same { from, count };
        assert_eq!(
            patch(&base, &[out(3, 2)]),
            Err(DeltaError::OutOfBase {
                from: 3,
                count: 2,
                len: 4
            })
        );
        assert!(patch(&base, &[out(u32::MAX, u32::MAX)]).is_err());
        // The same run twice would let a few bytes name a list of any length.
        assert_eq!(
            patch(&base, &[out(0, 4), out(0, 4)]),
            Err(DeltaError::Backwards { from: 0, next: 4 })
        );
        assert!(patch(&base, &[out(1, 2), out(2, 1)]).is_err());
        assert_eq!(patch(&base, &[out(0, 2), out(2, 2)]).unwrap(), base);
    }

    proptest! {
        #[test]
        fn any_list_comes_back_from_its_pieces(
            base in proptest::collection::vec(0u8..40, 0..200),
            list in proptest::collection::vec(0u8..40, 0..200),
        ) {
            let (base, list) = (refs(&base), refs(&list));
            let pieces = diff(&base, &list);
            prop_assert_eq!(patch(&base, &pieces).unwrap(), list.clone());
            let sent: usize = pieces.iter().map(|p| match p {
                ListPiece::New(c) => c.len(),
                ListPiece::Same { .. } => 0,
            }).sum();
            prop_assert!(patch(&base, &pieces).unwrap().len() <= base.len() + sent);
        }
    }
}
