//! Settling a conflict by hand (the web page's "keep this one"), and the list of files with
//! kept old versions that the page offers to restore.
//!
//! Keeping one side never destroys the other: before a file is removed or overwritten its
//! chunks go into this device's store, and the next scan keeps its record as an old version
//! (restorable with `meshsync restore` or from the page). The scan then records the kept
//! side as a new version of the path, which supersedes every concurrent version in the index
//! — so no device writes the conflict copy again.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use meshsync_crdt::FolderId;

use super::scan::{self, ScanOptions};
use super::Shared;
use crate::control::{KeptFile, Resolved};
use crate::device::conflict::original_of_conflict;
use crate::versions::VersionEntry;

/// How many files the page lists with kept versions (the most recently replaced first).
const KEPT_FILES_SHOWN: usize = 20;

/// Keeps the original of conflict copy `copy` in `folder` (the copy goes) or, with
/// `keep_copy`, the copy's content at the original path.
pub async fn resolve(
    device: &Shared,
    folder: &str,
    copy: &str,
    keep_copy: bool,
) -> anyhow::Result<Resolved> {
    let id = FolderId::new(folder)?;
    meshsync_crdt::index::validate_path(copy).context("not a path inside the folder")?;
    let original = original_of_conflict(copy);
    anyhow::ensure!(
        original != copy,
        "{copy:?} is not a conflict copy (see `meshsync conflicts`)"
    );
    {
        let d = device.lock().await;
        let f = d.folder(&id)?;
        let root = f.root()?;
        let (gone, kept) = if keep_copy {
            (&original, copy)
        } else {
            (&copy.to_string(), original.as_str())
        };
        anyhow::ensure!(
            root.entry(kept)?.is_some(),
            "{kept:?} is not in the folder any more; run `meshsync conflicts` to see what is left"
        );
        // What goes stays restorable: its chunks into this device's store first.
        let mut olds: Vec<_> = f
            .local
            .get(gone.as_str())
            .map(|old| (gone.clone(), old.clone(), HashSet::new()))
            .into_iter()
            .collect();
        super::serve::with_chunks(&d.state, olds.iter_mut().map(|(_, old, _)| old));
        crate::versions::preserve(&d.store, &d.key_ring(), &root, &olds)?;
        if keep_copy {
            root.rename(copy, &original)?;
        } else {
            root.remove_file(copy)?;
            // The original's content is unchanged: a new modification time makes the scan
            // record it again, superseding the concurrent versions.
            let file = root.open_read(&original)?;
            file.set_modified(std::time::SystemTime::now())?;
        }
    }
    let options = ScanOptions {
        requested: true,
        ..ScanOptions::default()
    };
    scan::scan(device, &id, options).await?;
    Ok(Resolved {
        folder: id.to_string(),
        path: original,
        kept: if keep_copy { "copy" } else { "original" }.into(),
    })
}

/// The files of every folder with kept old versions, most recently replaced first.
pub async fn kept_files(device: &Shared) -> anyhow::Result<Vec<KeptFile>> {
    let d = device.lock().await;
    let mut files: Vec<KeptFile> = Vec::new();
    for (id, f) in &d.folders {
        let mut by_path: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (path, _, bytes) in d.state.versions(id)? {
            let Ok(entry) = postcard::from_bytes::<VersionEntry>(&bytes) else {
                continue;
            };
            let seen = by_path.entry(path).or_default();
            seen.0 += 1;
            seen.1 = seen.1.max(entry.replaced_at);
        }
        files.extend(
            by_path
                .into_iter()
                .map(|(path, (versions, last))| KeptFile {
                    folder: id.to_string(),
                    absolute: f.path.join(&path).display().to_string(),
                    path,
                    versions,
                    last_replaced_at: last,
                }),
        );
    }
    files.sort_by_key(|k| std::cmp::Reverse(k.last_replaced_at));
    files.truncate(KEPT_FILES_SHOWN);
    Ok(files)
}
