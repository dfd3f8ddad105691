//! Limits checked on a peer's Automerge change before it is decompressed or decoded: its size,
//! its kind (an uncompressed change chunk: honest replicas send nothing else, and a compressed
//! one could inflate a few kilobytes into gigabytes), and how many operations it holds (run-
//! length encoding lets a small change claim millions).

/// The magic bytes every Automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk type byte (after the magic and a 4-byte checksum) of a plain change.
const CHANGE_CHUNK: u8 = 1;

/// Parses `bytes` as one plain (uncompressed) Automerge change of at most `max_bytes` bytes
/// and `max_ops` operations; says why not otherwise.
pub(crate) fn bounded_change(
    bytes: &[u8],
    max_bytes: usize,
    max_ops: usize,
) -> Result<automerge::Change, String> {
    if bytes.len() > max_bytes {
        return Err(format!(
            "change of {} bytes is larger than {max_bytes}",
            bytes.len()
        ));
    }
    if bytes.len() < 9 || bytes[..4] != MAGIC {
        return Err("not an Automerge change".into());
    }
    if bytes[8] != CHANGE_CHUNK {
        return Err(format!(
            "chunk of type {} refused before decompressing: only plain changes are taken",
            bytes[8]
        ));
    }
    let change = automerge::Change::from_bytes(bytes.to_vec()).map_err(|e| e.to_string())?;
    if change.len() > max_ops {
        return Err(format!(
            "change of {} operations is more than {max_ops}",
            change.len()
        ));
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn change_with(puts: usize, value: &[u8]) -> automerge::Change {
        let mut doc = automerge::AutoCommit::new();
        for i in 0..puts {
            doc.put(automerge::ROOT, format!("k{i}"), value.to_vec())
                .unwrap();
        }
        doc.commit();
        doc.get_changes(&[]).into_iter().next().unwrap().clone()
    }

    #[test]
    fn a_compressed_or_oversized_change_is_refused_before_decoding() {
        let mut change = change_with(200, &[0u8; 2000]);
        let plain = change.raw_bytes().to_vec();
        assert!(bounded_change(&plain, 1 << 20, 1000).is_ok());
        // What `bytes()` gives is deflated (it is large and repetitive): refused unopened.
        let compressed = change.bytes().to_vec();
        assert!(compressed.len() < plain.len() / 4);
        let refused = bounded_change(&compressed, 1 << 20, 1000).unwrap_err();
        assert!(refused.contains("decompressing"), "{refused}");
        assert!(
            bounded_change(&plain, 1000, 1000).is_err(),
            "too many bytes"
        );
        assert!(
            bounded_change(&plain, 1 << 20, 199).is_err(),
            "too many operations"
        );
        assert!(bounded_change(b"garbage, not a change", 1 << 20, 1000).is_err());
    }
}
