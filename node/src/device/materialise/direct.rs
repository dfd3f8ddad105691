//! Where a fetched file's chunks are written. A big file that takes every chunk from the
//! network is written around the page cache (`O_DIRECT`): its chunks are gathered in aligned
//! memory ahead of the point up to which the file is written, and each run of them that
//! becomes contiguous goes to disk straight from there. Through the page cache every byte is
//! copied once more, into pages the kernel must first find: on this project's virtual machines
//! 1 GiB written so took 2.9 s of system CPU (`dd`, fresh memory), against 0.14 s with
//! `O_DIRECT`.
//!
//! Anything else is written as usual, and a direct file turns ordinary (what it gathered is
//! written as it is, nothing lost) when a chunk arrives too far ahead of the written point,
//! when the file system refuses direct writes, or when the file is put aside.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Direct I/O's alignment (of offsets, lengths and memory) on the disks Linux serves.
const BLOCK: usize = 4096;
/// Gathering memory comes in segments of this many bytes, taken as chunks land in them and
/// given back once written: memory follows how far apart the chunks in flight are.
const SEGMENT: usize = 1 << 20;
/// How far past the written point a chunk may land and still be gathered. A fetch's two
/// streams per peer each keep two 64-chunk batches (about 2 MiB each) in flight from one queue
/// in file order, and one may run several batches ahead of the other (bulk sync bench (f):
/// 8 MiB was too little for every file, 16 MiB for one in four).
const SPAN: u64 = 32 << 20;
/// A contiguous run at least this long is written at once.
const WRITE_AT: u64 = SEGMENT as u64;
/// Segments kept for reuse between files.
const SPARE: usize = 16;

/// One aligned block of memory.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; BLOCK]);

/// [`SEGMENT`] bytes of block-aligned memory.
struct Segment(Box<[Block]>);

impl Segment {
    fn new() -> Self {
        Segment(vec![Block([0; BLOCK]); SEGMENT / BLOCK].into_boxed_slice())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Block` is a `repr(C)` byte array with no padding, so the blocks are
        // `len * BLOCK` initialised, contiguous bytes, borrowed as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * BLOCK) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; any byte value is a valid `Block`, and the borrow is unique.
        unsafe {
            let len = self.0.len() * BLOCK;
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len)
        }
    }
}

/// Segments given back, for the next to gather (shared by the files of one fetch).
#[derive(Default)]
pub(super) struct Spare(Vec<Segment>);

impl Spare {
    fn take(&mut self) -> Segment {
        self.0.pop().unwrap_or_else(Segment::new)
    }

    fn give(&mut self, segment: Segment) {
        if self.0.len() < SPARE {
            self.0.push(segment);
        }
    }
}

/// The gathering half of a direct file.
struct Gather {
    direct: File,
    /// The segments in use, by index (offset / [`SEGMENT`]).
    segments: HashMap<u64, Segment>,
    /// Everything before it is written (a multiple of [`BLOCK`]).
    done: u64,
    /// The runs gathered at or past `done` (start → end), none touching another.
    runs: BTreeMap<u64, u64>,
}

impl Gather {
    /// The file's bytes `start..end` by segment: (offset, segment index, range in it).
    fn pieces(start: u64, end: u64) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
        let seg = SEGMENT as u64;
        let mut at = start;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let pos = at % seg;
                let len = (end - at).min(seg - pos);
                let piece = (at, at / seg, pos as usize..(pos + len) as usize);
                at += len;
                piece
            })
        })
    }

    /// Copies `data` (the file's bytes at `offset`) into the segments; false if it does not
    /// lie between the written point and [`SPAN`] past it.
    fn take(&mut self, data: &[u8], offset: u64, spare: &mut Spare) -> bool {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return false;
        };
        if offset < self.done || end > self.done + SPAN || data.is_empty() {
            return false;
        }
        let mut from = 0;
        for (_, index, range) in Self::pieces(offset, end) {
            let len = range.len();
            let segment = self.segments.entry(index).or_insert_with(|| spare.take());
            segment.bytes_mut()[range].copy_from_slice(&data[from..from + len]);
            from += len;
        }
        // Joined to the runs it touches.
        let (mut start, mut stop) = (offset, end);
        if let Some((&s, &e)) = self.runs.range(..=offset).next_back() {
            if e >= offset {
                start = s;
                stop = stop.max(e);
                self.runs.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.runs.range(start..=stop).next() {
            stop = stop.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(start, stop);
        true
    }

    /// Writes the whole blocks of the run at the written point, if it is `at_least` long,
    /// and gives back the segments it leaves behind.
    fn write_run(&mut self, at_least: u64, spare: &mut Spare) -> io::Result<()> {
        let Some(&end) = self.runs.get(&self.done) else {
            return Ok(());
        };
        let blocks = (end - self.done) / BLOCK as u64 * BLOCK as u64;
        if blocks == 0 || end - self.done < at_least {
            return Ok(());
        }
        let (start, to) = (self.done, self.done + blocks);
        for (at, index, range) in Self::pieces(start, to) {
            let segment = self.segments.get(&index).expect("a gathered run's segment");
            self.direct.write_all_at(&segment.bytes()[range], at)?;
        }
        self.runs.remove(&start);
        if end > to {
            self.runs.insert(to, end);
        }
        self.done = to;
        let behind: Vec<u64> = (self.segments.keys())
            .filter(|&&i| (i + 1) * SEGMENT as u64 <= to)
            .copied()
            .collect();
        for index in behind {
            spare.give(self.segments.remove(&index).expect("listed"));
        }
        Ok(())
    }
}

/// Where one file's received chunks go.
pub(super) struct Sink {
    file: File,
    gather: Option<Gather>,
}

impl Sink {
    /// Ordinary writes to `file`.
    pub(super) fn plain(file: File) -> Self {
        Sink { file, gather: None }
    }

    /// Direct writes through `direct` (the same file opened `O_DIRECT`); `file` for the last
    /// partial block and whatever cannot go direct.
    pub(super) fn direct(file: File, direct: File) -> Self {
        let gather = Gather {
            direct,
            segments: HashMap::new(),
            done: 0,
            runs: BTreeMap::new(),
        };
        Sink {
            file,
            gather: Some(gather),
        }
    }

    pub(super) fn is_direct(&self) -> bool {
        self.gather.is_some()
    }

    /// Writes `data` at `offset`.
    pub(super) fn write_at(
        &mut self,
        data: &[u8],
        offset: u64,
        spare: &mut Spare,
    ) -> io::Result<()> {
        if let Some(g) = &mut self.gather {
            if g.take(data, offset, spare) {
                return match g.write_run(WRITE_AT, spare) {
                    Err(e) if refused(&e) => {
                        tracing::debug!(error = %e, "direct writes refused; writing as usual");
                        self.plain_from_now(spare)
                    }
                    written => written,
                };
            }
            let done = g.done;
            tracing::debug!(offset, done, "a chunk far ahead: writing the file as usual");
            self.plain_from_now(spare)?;
        }
        self.file.write_all_at(data, offset)
    }

    /// Writes everything gathered (the whole blocks of the run at the written point direct,
    /// the rest as usual).
    pub(super) fn finish(mut self, spare: &mut Spare) -> io::Result<()> {
        // A refused direct write leaves the run gathered: it goes as usual below.
        match self.gather.as_mut().map(|g| g.write_run(0, spare)) {
            Some(Err(e)) if !refused(&e) => Err(e),
            _ => self.plain_from_now(spare),
        }
    }

    /// Writes what is gathered as usual and turns ordinary.
    fn plain_from_now(&mut self, spare: &mut Spare) -> io::Result<()> {
        let Some(mut g) = self.gather.take() else {
            return Ok(());
        };
        let written = g.runs.iter().try_for_each(|(&start, &end)| {
            Gather::pieces(start, end).try_for_each(|(at, index, range)| {
                let segment = g.segments.get(&index).expect("a gathered run's segment");
                self.file.write_all_at(&segment.bytes()[range], at)
            })
        });
        for (_, segment) in g.segments.drain() {
            spare.give(segment);
        }
        written
    }
}

/// A direct write the file system or the disk does not take (not an I/O failure).
fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::FolderRoot;
    use proptest::prelude::*;

    /// A file of `size` bytes in a fresh folder, opened both ways when it can be.
    fn sink(size: u64) -> (tempfile::TempDir, FolderRoot, Sink) {
        let dir = tempfile::tempdir().unwrap();
        let root = FolderRoot::open(dir.path()).unwrap();
        root.create_fresh("f").unwrap().set_len(size).unwrap();
        let file = root.open_write("f").unwrap();
        let sink = match root.open_write_direct("f") {
            Ok(direct) => Sink::direct(file, direct),
            Err(_) => Sink::plain(file),
        };
        (dir, root, sink)
    }

    /// `data` cut at `cuts` into chunks: (offset, bytes).
    fn chunks(data: &[u8], cuts: &[usize]) -> Vec<(u64, Vec<u8>)> {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % data.len()).collect();
        bounds.extend([0, data.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        bounds
            .windows(2)
            .map(|w| (w[0] as u64, data[w[0]..w[1]].to_vec()))
            .collect()
    }

    #[test]
    fn chunks_in_order_go_direct_and_the_file_is_whole() {
        let data: Vec<u8> = (0..20_000_017u32).map(|i| (i % 251) as u8).collect();
        let mut spare = Spare::default();
        let (dir, _root, mut sink) = sink(data.len() as u64);
        let direct = sink.is_direct();
        let mut written_direct = 0;
        for (offset, bytes) in chunks(&data, &(1..700).map(|i| i * 28_571).collect::<Vec<_>>()) {
            sink.write_at(&bytes, offset, &mut spare).unwrap();
            if let Some(g) = &sink.gather {
                written_direct = g.done;
                // Memory for what is in flight only: the segment being filled, and the next.
                assert!(g.segments.len() <= 2, "{} segments", g.segments.len());
            }
        }
        sink.finish(&mut spare).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), data);
        if direct {
            // All but the last megabyte or so went straight to disk.
            assert!(written_direct >= data.len() as u64 - (WRITE_AT + BLOCK as u64));
        }
    }

    #[test]
    fn a_chunk_far_ahead_turns_the_file_ordinary_and_loses_nothing() {
        let data: Vec<u8> = (0..40_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut spare = Spare::default();
        let (dir, _root, mut sink) = sink(data.len() as u64);
        let mut parts = chunks(&data, &(1..400).map(|i| i * 99_991).collect::<Vec<_>>());
        // The last chunk first: 39 MB past the written point.
        let last = parts.pop().unwrap();
        sink.write_at(&last.1, last.0, &mut spare).unwrap();
        assert!(!sink.is_direct());
        for (offset, bytes) in parts {
            sink.write_at(&bytes, offset, &mut spare).unwrap();
        }
        sink.finish(&mut spare).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Chunks of any size in any order near the written point: the file ends up whole,
        /// whether they went direct, ordinary, or some of each.
        #[test]
        fn any_order_gives_the_whole_file(
            len in 1usize..3_000_000,
            cuts in proptest::collection::vec(0usize..3_000_000, 0..60),
            order in proptest::collection::vec(any::<u16>(), 60),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let mut spare = Spare::default();
        let (dir, _root, mut sink) = sink(len as u64);
            let mut parts = chunks(&data, &cuts);
            // A shuffle led by `order`.
            for (i, o) in order.iter().enumerate().take(parts.len()) {
                let j = *o as usize % parts.len();
                parts.swap(i, j);
            }
            for (offset, bytes) in &parts {
                sink.write_at(bytes, *offset, &mut spare).unwrap();
            }
            sink.finish(&mut spare).unwrap();
            prop_assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), data);
        }
    }
}
