//! Chunk lists between devices: a changed file's list goes out as the pieces that differ from
//! the list of the version it replaces ([`chunks::delta`](crate::chunks::delta)), with a push
//! ([`to_send`]) or in answer to `ListsSince` or `ListsIn` ([`answer`]); what arrives is put together
//! against the receiver's own copy of that list and kept only if it hashes to the hash asked
//! for or named ([`received`]). A receiver without the base simply asks for the list again,
//! naming no base.

use std::collections::{BTreeMap, HashMap};

use meshsync_crdt::{ChunkListHash, FolderId};

use crate::chunks::delta::{self, ListPiece};
use crate::chunks::{content, ChunkRef};
use crate::protocol::SentList;
use crate::state::State;

/// Lists this short go whole (a piece list would not be smaller).
const WHOLE_BELOW: usize = 16;
/// About how many bytes of chunk lists one push carries (a few thousand small files' lists,
/// or a big file's delta or whole list); lists past it are asked for. A slice of a first scan
/// (50,000 files) would otherwise carry ~2 MB of lists to devices that may not even sync the
/// folder, and hold them in memory until sent.
const PUSH_BUDGET: usize = 256 * 1024;
/// The bytes one chunk takes in a list on the wire, about.
const CHUNK_BYTES: usize = 40;

/// `list` (with hash `hash`) as it goes to a device that most likely holds `base`: pieces
/// against it when this device holds it too, else whole.
fn encode(
    state: &State,
    hash: ChunkListHash,
    list: &[ChunkRef],
    base: Option<ChunkListHash>,
) -> SentList {
    let whole = |list: &[ChunkRef]| SentList {
        hash,
        base: None,
        pieces: vec![ListPiece::New(list.iter().map(|c| (c.id, c.len)).collect())],
    };
    let Some(base) = base.filter(|b| *b != hash && list.len() >= WHOLE_BELOW) else {
        return whole(list);
    };
    match state.chunk_list(&base) {
        Ok(Some(old)) => SentList {
            hash,
            base: Some(base),
            pieces: delta::diff(&old, list),
        },
        _ => whole(list),
    }
}

/// The lists a push carries: each against the list of the version it replaces (`bases`,
/// by new list hash), up to [`PUSH_BUDGET`]; the receiver asks for the rest.
pub(super) fn to_send(
    state: &State,
    lists: &[(ChunkListHash, Vec<ChunkRef>)],
    bases: &HashMap<ChunkListHash, ChunkListHash>,
) -> Vec<SentList> {
    let mut budget = PUSH_BUDGET;
    let mut out = Vec::new();
    for (hash, list) in lists {
        let sent = encode(state, *hash, list, bases.get(hash).copied());
        let size = sent_chunks(&sent) * CHUNK_BYTES;
        if size > budget {
            continue;
        }
        budget -= size;
        out.push(sent);
    }
    out
}

/// The chunks a sent list carries in full.
fn sent_chunks(sent: &SentList) -> usize {
    (sent.pieces.iter())
        .map(|p| match p {
            ListPiece::New(chunks) => chunks.len(),
            ListPiece::Same { .. } => 1,
        })
        .sum()
}

/// The answer to `ListsSince` or `ListsIn`: each list this device holds, against the base
/// named beside it where this device holds that one too. A list is taken from this device's
/// record of the file named beside it (in `folder`) where that record holds it, else looked
/// up by its hash.
pub(super) fn answer(
    state: &State,
    folder: Option<&FolderId>,
    asked: &[(ChunkListHash, Option<ChunkListHash>, String)],
) -> Result<Vec<SentList>, crate::state::StateError> {
    let mut held: BTreeMap<ChunkListHash, Vec<ChunkRef>> = BTreeMap::new();
    if let Some(folder) = folder {
        let records = state.named_records(folder.as_str(), asked.iter().map(|a| a.2.as_str()))?;
        for ((hash, _, _), file) in asked.iter().zip(records) {
            // Checked here: the record's list is sent only if it is the one asked for.
            if let Some(file) = file.filter(|f| content::valid_list(hash, &f.chunks)) {
                held.insert(*hash, file.chunks);
            }
        }
    }
    let rest: Vec<&ChunkListHash> = (asked.iter().map(|a| &a.0))
        .filter(|hash| !held.contains_key(hash))
        .collect();
    held.extend(state.chunk_lists(rest)?);
    let bases: HashMap<ChunkListHash, Option<ChunkListHash>> =
        asked.iter().map(|(hash, base, _)| (*hash, *base)).collect();
    Ok(held
        .into_iter()
        .map(|(hash, list)| encode(state, hash, &list, bases[&hash]))
        .collect())
}

/// The lists in `sent` put together against this device's own copies of their bases (or the
/// lists in `fresh`, arriving alongside), each kept only if well formed and hashing to its
/// hash; the others are logged and left out (they are asked for again, whole).
pub(super) fn received(
    state: &State,
    sent: Vec<SentList>,
    fresh: &[(ChunkListHash, Vec<ChunkRef>)],
) -> Vec<(ChunkListHash, Vec<ChunkRef>)> {
    let mut out: Vec<(ChunkListHash, Vec<ChunkRef>)> = Vec::new();
    for s in sent {
        let base = match s.base {
            None => Some(Vec::new()),
            Some(b) => (fresh.iter().chain(&out))
                .find(|(h, _)| *h == b)
                .map(|(_, l)| l.clone())
                .or_else(|| state.chunk_list(&b).ok().flatten()),
        };
        let Some(base) = base else {
            tracing::debug!(list = ?s.hash, "the base of a sent chunk list is not held here; it will be asked for");
            continue;
        };
        match delta::patch(&base, &s.pieces) {
            Ok(list) if content::valid_list(&s.hash, &list) => out.push((s.hash, list)),
            Ok(_) => {
                tracing::warn!(list = ?s.hash, "a sent chunk list does not match its hash; ignored")
            }
            Err(error) => {
                tracing::warn!(list = ?s.hash, %error, "a sent chunk list is malformed; ignored")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::scan::{scan, ScanOptions};
    use crate::device::{test_pair, Shared};
    use crate::protocol::{self, SyncReply, SyncRequest};
    use crate::state::LocalFile;

    async fn list_at(d: &Shared, folder: &meshsync_crdt::FolderId) -> Option<ChunkListHash> {
        let d = d.lock().await;
        (d.state.local_file(folder, "big.bin").ok().flatten()).map(|f| f.list_hash)
    }

    /// `ListsIn` names a file for each list: the list comes from this device's record of that
    /// file if it is the list asked for, else from the table of lists by hash, else nothing.
    #[test]
    fn a_list_asked_in_a_named_file_comes_from_that_files_record_if_it_is_that_list() {
        use meshsync_crdt::{ChunkId, FileKind};
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let folder = FolderId::new("f").unwrap();
        let chunk = |i: u8, offset: u64, len: u32| ChunkRef {
            id: ChunkId([i; 32]),
            offset,
            len,
        };
        let list = vec![chunk(1, 0, 10), chunk(2, 10, 5)];
        let other = vec![chunk(3, 0, 7)];
        let (hash, other_hash) = (
            content::chunk_list_hash(&list),
            content::chunk_list_hash(&other),
        );
        let file = LocalFile {
            kind: FileKind::File,
            size: 15,
            mtime_ns: 1,
            mode: 0o644,
            chunks: list.clone(),
            version: 1,
            list_hash: hash,
        };
        // The file's record holds `list`; the table of lists only `other`.
        let mut batch = crate::state::Batch::default();
        batch.local.push((folder.clone(), "a".into(), Some(file)));
        batch.lists.push((other_hash, other.clone()));
        state.commit(batch).unwrap();
        let ask = |folder: Option<&FolderId>, hash: ChunkListHash, path: &str| {
            let sent = answer(&state, folder, &[(hash, None, path.into())]).unwrap();
            received(&state, sent, &[])
        };

        assert_eq!(ask(Some(&folder), hash, "a"), vec![(hash, list)]);
        assert_eq!(ask(None, hash, ""), vec![], "by hash alone: not held");
        assert_eq!(
            ask(Some(&folder), other_hash, "a"),
            vec![(other_hash, other)]
        );
        for path in ["b", "../a", ""] {
            assert_eq!(ask(Some(&folder), hash, path), vec![], "{path}");
        }
        let elsewhere = FolderId::new("g").unwrap();
        assert_eq!(ask(Some(&elsewhere), hash, "a"), vec![]);
        assert_eq!(ask(Some(&folder), ChunkListHash([9; 32]), "a"), vec![]);
    }

    /// Two devices, no storage peer: an edit in the middle of a big file reaches the other
    /// with its list as pieces against the last version's; asked for with `ListsSince`, a
    /// device answers the same way, and whole when it does not hold the base. Pieces that do
    /// not build the named list, or name a base the receiver lacks, give nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_files_list_travels_as_the_pieces_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, fa, fb) = test_pair(dir.path()).await;
        let mut data = content::test_bytes(8 << 20, 1);
        std::fs::write(fa.join("big.bin"), &data).unwrap();
        // A folder has no content: no list goes with it (one under the zero hash was sent,
        // and refused as not matching its hash).
        std::fs::create_dir_all(fa.join("sub/deeper")).unwrap();
        let folder = crate::device::folder::add(&a, &fa, None).await.unwrap();
        (crate::device::folder::add(&b, &fb, Some(folder.clone())).await).unwrap();
        let asked = ScanOptions {
            requested: true,
            ..Default::default()
        };
        let arrived = |data: Vec<u8>| {
            let fb = fb.clone();
            async move {
                for _ in 0..600 {
                    if std::fs::read(fb.join("big.bin")).is_ok_and(|d| d == data) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                false
            }
        };
        scan(&a, &folder, asked).await.unwrap();
        assert!(arrived(data.clone()).await, "the first version reached b");
        let old = list_at(&a, &folder).await.unwrap();

        data[4 << 20..(4 << 20) + 100_000].copy_from_slice(&content::test_bytes(100_000, 9));
        std::fs::write(fa.join("big.bin"), &data).unwrap();
        scan(&a, &folder, asked).await.unwrap();
        assert!(arrived(data.clone()).await, "the edit reached b");
        let new = list_at(&a, &folder).await.unwrap();
        assert_ne!(old, new);
        assert_eq!(list_at(&b, &folder).await, Some(new));
        for d in [&a, &b] {
            let state = d.lock().await.state.clone();
            assert_eq!(state.chunk_list(&ChunkListHash::default()).unwrap(), None);
        }

        // Asked for against the old list: a few chunks in full, the rest as runs.
        let (transport, a_peer) = {
            let (a, b) = (a.lock().await, b.lock().await);
            (b.transport.clone(), a.keys.device_id().to_peer_id())
        };
        let ask = |base| SyncRequest::ListsSince(vec![(new, base)]);
        let Ok(SyncReply::Lists(got)) = protocol::doc(&transport, a_peer, &ask(Some(old))).await
        else {
            panic!("a answers ListsSince");
        };
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].base, Some(old));
        let whole = a.lock().await.state.chunk_list(&new).unwrap().unwrap();
        assert!(whole.len() > 64, "{} chunks", whole.len());
        assert!(sent_chunks(&got[0]) < 10, "{:?}", got[0].pieces);
        let b_state = b.lock().await.state.clone();
        assert_eq!(
            received(&b_state, got.clone(), &[]),
            vec![(new, whole.clone())]
        );

        // A base a does not hold: the whole list.
        let unknown = ChunkListHash([7; 32]);
        let Ok(SyncReply::Lists(plain)) =
            protocol::doc(&transport, a_peer, &ask(Some(unknown))).await
        else {
            panic!("a answers ListsSince");
        };
        assert_eq!(plain[0].base, None);
        assert_eq!(sent_chunks(&plain[0]), whole.len());

        // Pieces that build another list, a base b lacks, a run outside the base: nothing.
        let mut forged = got[0].clone();
        forged.pieces.swap(0, 1);
        let mut baseless = got[0].clone();
        baseless.base = Some(unknown);
        let mut outside = got[0].clone();
        outside.pieces.push(ListPiece::Same {
            from: u32::MAX - 1,
            count: 1,
        });
        assert!(received(&b_state, vec![forged, baseless, outside], &[]).is_empty());

        // A push's lists are kept only when it changes a folder this device syncs.
        let list: Vec<ChunkRef> = whole[..3].to_vec();
        let hash = content::chunk_list_hash(&list);
        let pushed = |folder: meshsync_crdt::FolderId| crate::protocol::SyncChanges {
            folders: vec![(folder, Vec::new())],
            lists: vec![SentList {
                hash,
                base: None,
                pieces: vec![ListPiece::New(list.iter().map(|c| (c.id, c.len)).collect())],
            }],
            ..Default::default()
        };
        let elsewhere = meshsync_crdt::FolderId::random();
        crate::device::sync::apply_changes(&b, a_peer, pushed(elsewhere))
            .await
            .unwrap();
        assert_eq!(b_state.chunk_list(&hash).unwrap(), None);
        crate::device::sync::apply_changes(&b, a_peer, pushed(folder.clone()))
            .await
            .unwrap();
        assert_eq!(b_state.chunk_list(&hash).unwrap(), Some(list));
    }

    /// Doc requests to one peer, twice as many at once as it takes streams from one peer
    /// (`MAX_STREAMS_PER_PEER`), all get their answer: a stream closed at once is tried
    /// again by `protocol::doc` (as one libp2p-stream drops while the accept loop is busy,
    /// which a test on an idle machine does not bring about reliably).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn doc_requests_at_once_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, _, _) = test_pair(dir.path()).await;
        let (transport, a_peer) = {
            let (a, b) = (a.lock().await, b.lock().await);
            (b.transport.clone(), a.keys.device_id().to_peer_id())
        };
        assert!(
            transport
                .wait_connected(a_peer, Duration::from_secs(10))
                .await
        );
        for _round in 0..5 {
            let asks = (0..64u8).map(|i| {
                let transport = transport.clone();
                async move {
                    let ask = SyncRequest::ListsSince(vec![(ChunkListHash([i; 32]), None)]);
                    protocol::doc(&transport, a_peer, &ask).await
                }
            });
            for answer in futures::future::join_all(asks).await {
                assert!(matches!(answer, Ok(SyncReply::Lists(_))), "{answer:?}");
            }
        }
    }
}
