//! Content: a file becomes FastCDC chunks, each named by a keyed BLAKE3 hash and sealed with
//! AES-256-GCM before it is stored or sent.
//!
//! - **Chunking**: FastCDC (2020), 16 KiB min / 32 KiB average / 128 KiB max (about 43 KiB
//!   apart in practice, as the minimum skips the first cut points), so an edit in the middle of
//!   a file changes only the chunks around it: a 1 MiB overwrite sends some 70 KB more than
//!   1 MiB (with 64/256 KiB it was some 130 KB, up to 345 KB). Every file up to 16 KiB is one
//!   chunk.
//! - **Chunk ID** = BLAKE3 keyed with the epoch's chunk-ID key over the plaintext: equal chunks
//!   dedupe inside the mesh; nobody without the key can test for a known file.
//! - **Sealing**: AES-256-GCM (`ring`, AES-NI: the fastest AEAD measured on this machine) under a
//!   key derived per chunk from the chunk key, the chunk ID and the epoch; the nonce is derived
//!   from the chunk ID; associated data names the chunk ID and the epoch. Deterministic, so a
//!   storage peer dedupes too; every key is used for one plaintext only, so determinism costs
//!   nothing but equality, which the chunk ID reveals anyway. The plaintext is padded to a Padmé
//!   length first, so stored and sent sizes leak little.
//! - **Opening** checks the tag *and* that the plaintext hashes to the claimed ID, so a storage
//!   peer cannot swap one chunk's data for another's.

use std::io::Read;

use meshsync_crdt::keys::{ChunkIdKey, ChunkKey};
use meshsync_crdt::sealed::padme;
use meshsync_crdt::{ChunkId, ChunkListHash, Epoch, KeyRing, MeshKey};
use meshsync_transport::chunks::{Answer, Received};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub const MIN_CHUNK: usize = 16 * 1024;
pub const AVG_CHUNK: usize = 32 * 1024;
pub const MAX_CHUNK: usize = 128 * 1024;
/// The longest chunk a list may name: what this version cuts, or what earlier versions did
/// (64 KiB average, 256 KiB at most), whose lists stay valid.
pub const MAX_LISTED_CHUNK: usize = 256 * 1024;
const TAG: usize = 16;

/// Why content could not be chunked or opened.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("chunk {0:?} failed authentication: altered, or sealed under another key")]
    Tampered(ChunkId),
    #[error("chunk {0:?} holds data with another ID: swapped, or changed at its source")]
    WrongContent(ChunkId),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// One chunk of a file: where it sits and what it is called. Encoded (postcard) exactly as
/// the tuple `(ChunkId, u64, u32)` it replaced, so stored state and the wire are unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
}

impl ChunkRef {
    /// The byte range of the file this chunk covers.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

/// Whether `list` is a well-formed chunk list with the hash `hash`: it hashes to it, every
/// chunk is between 1 byte and [`MAX_LISTED_CHUNK`] long, and each offset is the sum of the lengths
/// before it (so the list describes exactly one byte layout: no gap, no overlap, no reordering
/// that the hash would not see). Lists from peers are admitted only if this holds.
pub fn valid_list(hash: &ChunkListHash, list: &[ChunkRef]) -> bool {
    let mut offset = 0u64;
    for c in list {
        if c.offset != offset || c.len == 0 || c.len as usize > MAX_LISTED_CHUNK {
            return false;
        }
        offset += u64::from(c.len);
    }
    chunk_list_hash(list) == *hash
}

/// The size of the file a chunk list describes (the sum of its lengths).
pub fn list_size(list: &[ChunkRef]) -> u64 {
    list.iter().map(|c| u64::from(c.len)).sum()
}

/// The chunk ID of `plaintext`.
pub fn chunk_id(key: &ChunkIdKey, plaintext: &[u8]) -> ChunkId {
    ChunkId(*blake3::keyed_hash(key.as_bytes(), plaintext).as_bytes())
}

/// The hash of a file's chunk list, as signed in its index record.
pub fn chunk_list_hash(chunks: &[ChunkRef]) -> ChunkListHash {
    let mut hasher = blake3::Hasher::new_derive_key("meshsync 2026-11 chunk list");
    for chunk in chunks {
        hasher.update(&chunk.id.0);
        hasher.update(&chunk.len.to_le_bytes());
    }
    ChunkListHash(*hasher.finalize().as_bytes())
}

/// How much of a file the chunker reads at a time.
const BLOCK: usize = 4 << 20;

/// The cut points of these chunk sizes: made once, not for every file a scan reads.
static CUTTER: std::sync::LazyLock<super::cdc::Cutter> =
    std::sync::LazyLock::new(|| super::cdc::Cutter::new(MIN_CHUNK, AVG_CHUNK, MAX_CHUNK));

/// Splits everything `reader` yields into chunks, calling `each` with the reference and the
/// plaintext of every chunk in order.
pub fn chunk_stream<R: Read>(
    reader: R,
    id_key: &ChunkIdKey,
    each: impl FnMut(ChunkRef, &[u8]),
) -> Result<Vec<ChunkRef>, std::io::Error> {
    chunk_blocks(reader, BLOCK, id_key, each, || true).map(|refs| refs.unwrap_or_default())
}

/// Chunks a file that should not change while it is read: after every block, `settled`
/// is asked whether the file is still as it was (e.g. same size and mtime); if not, chunking
/// stops early and `None` is returned, so a file being written costs one block, not a whole
/// pass.
pub fn chunk_file(
    file: &std::fs::File,
    id_key: &ChunkIdKey,
    settled: impl FnMut() -> bool,
) -> Result<Option<Vec<ChunkRef>>, std::io::Error> {
    // A buffer the size of the file (plus one byte to see its end), up to one block.
    let hint = file.metadata().map_or(BLOCK, |m| m.len() as usize + 1);
    chunk_blocks(file, hint, id_key, |_, _| {}, settled)
}

/// The chunker: reads `BLOCK`s into one buffer, cuts with FastCDC (2020, normalisation level
/// 1 — the same cut points as `fastcdc::v2020::StreamCDC`, without its copy of every chunk and
/// shift of its buffer, and found four lanes at a time: [`super::cdc`]), and hashes the chunks
/// of a block on all cores.
fn chunk_blocks<R: Read>(
    mut reader: R,
    size_hint: usize,
    id_key: &ChunkIdKey,
    mut each: impl FnMut(ChunkRef, &[u8]),
    mut settled: impl FnMut() -> bool,
) -> Result<Option<Vec<ChunkRef>>, std::io::Error> {
    use rayon::prelude::*;
    let cutter = &*CUTTER;
    let mut buf = vec![0u8; size_hint.clamp(MIN_CHUNK, BLOCK)];
    let (mut len, mut base, mut eof) = (0usize, 0u64, false);
    let mut refs = Vec::new();
    loop {
        while !eof && len < buf.len() {
            match reader.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !eof && buf.len() < BLOCK {
            buf.resize(BLOCK, 0); // more than the hint said: read on with a whole block
            continue;
        }
        if !settled() {
            return Ok(None);
        }
        // Cut while a whole maximum-size window is in the buffer (or the file has ended).
        let mut cuts = Vec::new();
        let mut start = 0;
        while start < len && (eof || len - start >= MAX_CHUNK) {
            let window = &buf[start..len.min(start + MAX_CHUNK)];
            let n = cutter.cut(window);
            if n == 0 {
                break;
            }
            cuts.push((start, n));
            start += n;
        }
        let ids: Vec<ChunkId> = cuts
            .par_iter()
            .map(|&(at, n)| chunk_id(id_key, &buf[at..at + n]))
            .collect();
        for (&(at, n), id) in cuts.iter().zip(ids) {
            let reference = ChunkRef {
                id,
                offset: base + at as u64,
                len: n as u32,
            };
            each(reference, &buf[at..at + n]);
            refs.push(reference);
        }
        buf.copy_within(start..len, 0);
        len -= start;
        base += start as u64;
        if eof && len == 0 {
            return Ok(Some(refs));
        }
    }
}

fn chunk_cipher(key: &ChunkKey, epoch: Epoch, id: &ChunkId) -> LessSafeKey {
    let mut hasher = blake3::Hasher::new_keyed(key.as_bytes());
    hasher.update(b"meshsync chunk key v1");
    hasher.update(&id.0);
    hasher.update(&epoch.0.to_le_bytes());
    let derived = hasher.finalize();
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, derived.as_bytes()).expect("32 bytes is an AES-256 key"),
    )
}

fn nonce(id: &ChunkId) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes.copy_from_slice(&id.0[..12]);
    Nonce::assume_unique_for_key(bytes)
}

fn aad(id: &ChunkId, epoch: Epoch) -> Vec<u8> {
    let mut aad = b"meshsync chunk v1".to_vec();
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(&epoch.0.to_le_bytes());
    aad
}

/// Pads and seals one chunk. Deterministic: the same chunk seals to the same bytes.
pub fn seal_chunk(key: &ChunkKey, epoch: Epoch, id: &ChunkId, plaintext: &[u8]) -> Vec<u8> {
    seal_chunk_from(key, epoch, id, plaintext.len(), |slot| {
        slot.copy_from_slice(plaintext);
        Ok(())
    })
    .expect("copying from memory cannot fail")
}

/// [`seal_chunk`] for a plaintext of `len` bytes that `fill` writes straight into the sealing
/// buffer (e.g. read from a file), so it is never copied.
pub fn seal_chunk_from(
    key: &ChunkKey,
    epoch: Epoch,
    id: &ChunkId,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let sealed = seal_if(key, epoch, id, len, |slot| fill(slot).map(|()| true))?;
    Ok(sealed.expect("sealed unconditionally"))
}

/// [`seal_chunk_from`] that first checks the plaintext `fill` wrote really is chunk `id`
/// (`Ok(None)`, nothing sealed, if not): a device serving from a file that changed since it
/// was scanned must never seal other bytes under that chunk's key and nonce.
pub fn seal_chunk_checked(
    key: &ChunkKey,
    id_key: &ChunkIdKey,
    epoch: Epoch,
    id: &ChunkId,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Option<Vec<u8>>> {
    seal_if(key, epoch, id, len, |slot| {
        fill(slot)?;
        Ok(chunk_id(id_key, slot) == *id)
    })
}

/// Pads and seals the `len` bytes `fill` writes, if it answers `true`.
fn seal_if(
    key: &ChunkKey,
    epoch: Epoch,
    id: &ChunkId,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<bool>,
) -> std::io::Result<Option<Vec<u8>>> {
    let padded_len = padme(len + 4);
    let mut buf = vec![0u8; padded_len + TAG];
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    if !fill(&mut buf[4..4 + len])? {
        return Ok(None);
    }
    buf.truncate(padded_len);
    chunk_cipher(key, epoch, id)
        .seal_in_place_append_tag(nonce(id), Aad::from(aad(id, epoch)), &mut buf)
        .expect("sealing an in-memory chunk cannot fail");
    Ok(Some(buf))
}

/// A chunk's checked plaintext, left in the buffer it came in (no copy; a fetched chunk's
/// buffer goes back to its fetch when this is dropped): from `start` on.
#[derive(Debug, PartialEq, Eq)]
pub struct Plain {
    buf: Received,
    start: usize,
}

impl std::ops::Deref for Plain {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Opens a sealed chunk: checks the tag, strips the padding, and checks the plaintext's ID.
pub fn open_chunk(
    key: &ChunkKey,
    id_key: &ChunkIdKey,
    epoch: Epoch,
    id: &ChunkId,
    mut sealed: Vec<u8>,
) -> Result<Plain, ContentError> {
    let plain_len = chunk_cipher(key, epoch, id)
        .open_in_place(nonce(id), Aad::from(aad(id, epoch)), &mut sealed)
        .map_err(|_| ContentError::Tampered(*id))?
        .len();
    sealed.truncate(plain_len);
    let (len, _) = sealed
        .split_first_chunk::<4>()
        .ok_or(ContentError::Tampered(*id))?;
    let len = u32::from_le_bytes(*len) as usize;
    if 4 + len > sealed.len() {
        return Err(ContentError::Tampered(*id));
    }
    sealed.truncate(4 + len);
    let plain = Plain {
        buf: sealed.into(),
        start: 4,
    };
    if chunk_id(id_key, &plain) != *id {
        return Err(ContentError::WrongContent(*id));
    }
    Ok(plain)
}

/// The key of `ring` whose epoch's chunk IDs give `plaintext` the ID `id` (newest first): chunk
/// IDs are keyed per epoch, so this says which epoch a chunk belongs to.
pub fn key_of<'r>(ring: &'r KeyRing, id: &ChunkId, plaintext: &[u8]) -> Option<&'r MeshKey> {
    ring.newest_first()
        .find(|key| chunk_id(&key.chunk_id_key(), plaintext) == *id)
}

/// [`seal_chunk_checked`] over every epoch of `ring`: the plaintext `fill` writes is sealed with
/// the key of the epoch it is chunk `id` in; `Ok(None)`, nothing sealed, if it is that chunk in
/// no epoch (the file changed since it was scanned).
pub fn seal_chunk_in(
    ring: &KeyRing,
    id: &ChunkId,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Option<Vec<u8>>> {
    if let (1, Some(key)) = (ring.len(), ring.current()) {
        // One epoch (the usual case): checked in the sealing buffer, never copied.
        let (chunk_key, id_key) = (key.chunk_key(), key.chunk_id_key());
        return seal_chunk_checked(&chunk_key, &id_key, key.epoch(), id, len, fill);
    }
    let mut plain = vec![0u8; len];
    fill(&mut plain)?;
    Ok(key_of(ring, id, &plain).map(|key| seal_chunk(&key.chunk_key(), key.epoch(), id, &plain)))
}

/// [`open_chunk`] with whichever key of `ring` sealed it: the key of `hint` first (the epoch
/// the chunk is expected in), then the others, newest first.
pub fn open_chunk_in(
    ring: &KeyRing,
    hint: Option<Epoch>,
    id: &ChunkId,
    sealed: Vec<u8>,
) -> Result<Plain, ContentError> {
    let hinted = hint.and_then(|epoch| ring.get(epoch));
    let mut keys: Vec<&MeshKey> = hinted.into_iter().collect();
    keys.extend(ring.newest_first().filter(|k| Some(k.epoch()) != hint));
    let Some((last, first)) = keys.split_last() else {
        return Err(ContentError::Tampered(*id));
    };
    for key in first {
        let opened = open_chunk(
            &key.chunk_key(),
            &key.chunk_id_key(),
            key.epoch(),
            id,
            sealed.clone(),
        );
        if let Ok(plain) = opened {
            return Ok(plain);
        }
    }
    open_chunk(
        &last.chunk_key(),
        &last.chunk_id_key(),
        last.epoch(),
        id,
        sealed,
    )
}

/// A chunk as a peer sent it — sealed, or in the clear (between devices, inside the Noise
/// channel) — checked: opened with `ring` (see [`open_chunk_in`]), or its plaintext hashed to
/// `id` under the chunk-ID key of some epoch of `ring`.
pub fn accept_received(
    ring: &KeyRing,
    id: &ChunkId,
    answer: Answer<Received>,
) -> Result<Plain, ContentError> {
    let data = match answer {
        Answer::Sealed(sealed) => return open_chunk_in(ring, None, id, sealed.into_vec()),
        Answer::Plain(data) => data,
    };
    match key_of(ring, id, &data) {
        Some(_) => Ok(Plain {
            buf: data,
            start: 0,
        }),
        None => Err(ContentError::WrongContent(*id)),
    }
}

/// `len` reproducible incompressible bytes (content-defined cuts fall as in real data), for
/// tests.
#[cfg(test)]
pub(crate) fn test_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chunk_sent_in_the_clear_is_taken_only_if_it_hashes_to_its_id() {
        use super::*;
        use meshsync_crdt::MeshKey;
        let (old, new) = (MeshKey::generate(Epoch(0)), MeshKey::generate(Epoch(1)));
        let ring = KeyRing::of([old.clone(), new.clone()]);
        let plain = test_bytes(40_000, 3);
        let id = chunk_id(&old.chunk_id_key(), &plain);
        // As sent: taken, without a copy, whichever epoch's ID it is.
        let taken = accept_received(&ring, &id, Answer::Plain(plain.clone().into())).unwrap();
        assert_eq!(&*taken, &plain[..]);
        // One byte changed (a hostile member, or a file edited since its sender scanned it).
        let mut altered = plain.clone();
        altered[20_000] ^= 1;
        assert!(matches!(
            accept_received(&ring, &id, Answer::Plain(altered.into())),
            Err(ContentError::WrongContent(_))
        ));
        // Another chunk's bytes under this ID; the right bytes to a ring without their epoch.
        let other = test_bytes(40_000, 4);
        assert!(accept_received(&ring, &id, Answer::Plain(other.into())).is_err());
        let without = KeyRing::of([new.clone()]);
        assert!(accept_received(&without, &id, Answer::Plain(plain.clone().into())).is_err());
        // The sealed form of the same chunk is opened, not taken as plaintext.
        let sealed = seal_chunk(&old.chunk_key(), old.epoch(), &id, &plain);
        assert!(accept_received(&ring, &id, Answer::Plain(sealed.clone().into())).is_err());
        assert_eq!(
            &*accept_received(&ring, &id, Answer::Sealed(sealed.into())).unwrap(),
            &plain[..]
        );
    }

    #[test]
    fn a_ring_seals_a_chunk_in_its_own_epoch_and_opens_it_from_any() {
        use super::*;
        use meshsync_crdt::MeshKey;
        let (old, new) = (MeshKey::generate(Epoch(0)), MeshKey::generate(Epoch(1)));
        let ring = KeyRing::of([old.clone(), new.clone()]);
        let plain = b"written in epoch 0".to_vec();
        let id = chunk_id(&old.chunk_id_key(), &plain);
        let sealed = seal_chunk_in(&ring, &id, plain.len(), |slot| {
            slot.copy_from_slice(&plain);
            Ok(())
        })
        .unwrap()
        .unwrap();
        // Sealed with epoch 0's key: the old key alone opens it, the new one alone does not.
        assert!(open_chunk_in(&KeyRing::of([old.clone()]), None, &id, sealed.clone()).is_ok());
        assert!(open_chunk_in(&KeyRing::of([new.clone()]), None, &id, sealed.clone()).is_err());
        assert_eq!(
            &*open_chunk_in(&ring, Some(Epoch(1)), &id, sealed).unwrap(),
            &plain[..]
        );
        // Bytes that are no chunk of any epoch are not sealed.
        let other = seal_chunk_in(&ring, &id, 3, |slot| {
            slot.copy_from_slice(b"abc");
            Ok(())
        });
        assert!(other.unwrap().is_none());
    }

    #[test]
    fn only_contiguous_lists_with_their_own_hash_are_valid() {
        use super::*;
        let id = |n: u8| ChunkId([n; 32]);
        let list = vec![
            ChunkRef {
                id: id(1),
                offset: 0,
                len: 100,
            },
            ChunkRef {
                id: id(2),
                offset: 100,
                len: 50,
            },
        ];
        let hash = chunk_list_hash(&list);
        assert!(valid_list(&hash, &list));
        assert_eq!(list_size(&list), 150);
        let mut overlapping = list.clone();
        overlapping[1].offset = 60; // same IDs and lengths: the hash alone would pass it
        assert_eq!(chunk_list_hash(&overlapping), hash);
        assert!(!valid_list(&hash, &overlapping));
        let mut gap = list.clone();
        gap[1].offset = 4096;
        assert!(!valid_list(&hash, &gap));
        let reordered = vec![list[1], list[0]];
        assert!(!valid_list(&hash, &reordered));
        let mut huge = list.clone();
        huge[1].len = u32::MAX;
        assert!(!valid_list(&chunk_list_hash(&huge), &huge));
        assert!(valid_list(&chunk_list_hash(&[]), &[]));
        // A list an earlier version cut (chunks up to 256 KiB) stays valid; no longer chunk.
        let mut earlier = list.clone();
        earlier[1].len = MAX_LISTED_CHUNK as u32;
        const { assert!(MAX_LISTED_CHUNK > MAX_CHUNK) };
        assert!(valid_list(&chunk_list_hash(&earlier), &earlier));
        earlier[1].len += 1;
        assert!(!valid_list(&chunk_list_hash(&earlier), &earlier));
    }

    use super::*;
    use meshsync_crdt::MeshKey;

    use super::test_bytes as data;

    #[test]
    fn an_insert_in_the_middle_changes_only_nearby_chunks() {
        let key = MeshKey::generate(Epoch(0)).chunk_id_key();
        let original = data(8 << 20, 1);
        let mut edited = original.clone();
        let middle = edited.len() / 2;
        edited.splice(middle..middle, data(1024, 2));
        let a = chunk_stream(&original[..], &key, |_, _| {}).unwrap();
        let b = chunk_stream(&edited[..], &key, |_, _| {}).unwrap();
        let old: std::collections::HashSet<ChunkId> = a.iter().map(|c| c.id).collect();
        let new_bytes: u64 = b
            .iter()
            .filter(|c| !old.contains(&c.id))
            .map(|c| u64::from(c.len))
            .sum();
        assert!(a.len() > 60, "{} chunks", a.len());
        assert!(
            new_bytes <= 3 * MAX_CHUNK as u64,
            "{new_bytes} new bytes after a 1 KiB insert"
        );
        assert!(a.iter().all(|c| (c.len as usize) <= MAX_CHUNK));
    }

    #[test]
    fn cuts_match_fastcdc_stream_chunking() {
        // Same cut points as the crate's own streaming chunker, across block boundaries.
        let key = MeshKey::generate(Epoch(0)).chunk_id_key();
        for len in [
            0,
            1,
            MIN_CHUNK - 1,
            MAX_CHUNK + 7,
            BLOCK - 3,
            3 * BLOCK + 12_345,
        ] {
            let input = data(len, 5);
            let ours: Vec<(u64, u32)> = chunk_stream(&input[..], &key, |_, _| {})
                .unwrap()
                .iter()
                .map(|c| (c.offset, c.len))
                .collect();
            let theirs: Vec<(u64, u32)> =
                fastcdc::v2020::StreamCDC::new(&input[..], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    .map(|c| c.unwrap())
                    .map(|c| (c.offset, c.length as u32))
                    .collect();
            assert_eq!(ours, theirs, "length {len}");
        }
    }

    #[test]
    fn a_wrong_size_hint_only_changes_the_buffer() {
        let key = MeshKey::generate(Epoch(0)).chunk_id_key();
        let input = data(BLOCK + MAX_CHUNK + 5, 7);
        let cuts = |hint| chunk_blocks(&input[..], hint, &key, |_, _| {}, || true).unwrap();
        assert_eq!(cuts(1), cuts(BLOCK));
        assert_eq!(cuts(100), cuts(input.len() + 1));
    }

    #[test]
    fn a_file_that_changes_while_read_stops_the_chunker() {
        let key = MeshKey::generate(Epoch(0)).chunk_id_key();
        let input = data(3 * BLOCK, 6);
        let mut asked = 0;
        let out = chunk_blocks(
            &input[..],
            BLOCK,
            &key,
            |_, _| {},
            || {
                asked += 1;
                asked < 2
            },
        )
        .unwrap();
        assert!(out.is_none());
        assert_eq!(asked, 2, "stopped after the second block");
    }

    #[test]
    fn sealed_chunks_open_only_intact_and_under_the_right_key() {
        let mesh_key = MeshKey::generate(Epoch(2));
        let (key, id_key) = (mesh_key.chunk_key(), mesh_key.chunk_id_key());
        let plain = data(50_000, 3);
        let id = chunk_id(&id_key, &plain);
        let sealed = seal_chunk(&key, Epoch(2), &id, &plain);
        assert_eq!(
            sealed,
            seal_chunk(&key, Epoch(2), &id, &plain),
            "deterministic"
        );
        assert!(!sealed
            .windows(64)
            .any(|w| plain.windows(64).next() == Some(w)));
        assert_eq!(sealed.len(), padme(50_004) + TAG);
        assert_eq!(
            &*open_chunk(&key, &id_key, Epoch(2), &id, sealed.clone()).unwrap(),
            &plain[..]
        );

        let mut tampered = sealed.clone();
        tampered[100] ^= 1;
        assert!(matches!(
            open_chunk(&key, &id_key, Epoch(2), &id, tampered),
            Err(ContentError::Tampered(_))
        ));
        assert!(open_chunk(&key, &id_key, Epoch(3), &id, sealed.clone()).is_err());
        let other = MeshKey::generate(Epoch(2));
        assert!(open_chunk(&other.chunk_key(), &id_key, Epoch(2), &id, sealed.clone()).is_err());
        // A valid chunk presented under another chunk's ID does not open.
        let other_plain = data(50_000, 4);
        let other_id = chunk_id(&id_key, &other_plain);
        assert!(open_chunk(&key, &id_key, Epoch(2), &other_id, sealed).is_err());
    }
}
