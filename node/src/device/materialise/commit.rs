//! Putting assembled files in place: flush (big files one by one, most already while the
//! batch arrived; the many small ones with one `syncfs`), then per step — check that a file
//! about to be replaced was not edited here since (else it is moved aside as a conflict copy),
//! rename the temp file into place with the record's mode and mtime, make directories and
//! links, delete — then fsync the touched folders. Blocking throughout: called on a blocking
//! thread.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::{ChunkListHash, DeviceId, FileKind, FileRecord, MeshKey};

use super::fetch::{Assembly, Lists, Pending, OWN_FSYNC};
use super::plan::{Step, Work};
use crate::chunks::{content, ChunkRef};
use crate::device::conflict::conflict_name_for;
use crate::device::serve::unix_nanos;
use crate::state::LocalFile;

/// What installing a plan did, for the device to record.
#[derive(Default)]
pub(super) struct Installed {
    /// What this device now holds at each path written or deleted (`None`: nothing).
    pub(super) updates: Vec<(String, Option<LocalFile>)>,
    /// Paths no source could give intact: not written, reported.
    pub(super) unavailable: Vec<String>,
    /// The chunk lists of what was written, to keep.
    pub(super) lists: Vec<(ChunkListHash, Vec<ChunkRef>)>,
}

/// Before anything is renamed into place, its data must be on disk: the files not `flushed`
/// already (big files flush on their own as they complete). Blocking.
pub(super) fn flush(
    root: &Path,
    assembly: &Assembly,
    flushed: &BTreeSet<usize>,
) -> anyhow::Result<()> {
    let mut flush_all = false;
    for (i, p) in &assembly.pending {
        if p.left > 0 || p.link.is_some() || flushed.contains(i) {
            continue;
        }
        if p.size >= OWN_FSYNC {
            std::fs::File::open(&p.tmp)?
                .sync_data()
                .context("flushing a written file")?;
        } else {
            flush_all = true;
        }
    }
    if flush_all {
        let dir = std::fs::File::open(root)?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(std::io::Error::last_os_error()).context("flushing written files");
        }
    }
    Ok(())
}

/// Carries out every step of `work` whose content is ready. Blocking.
pub(super) fn install(
    root: &Path,
    work: &[Work],
    mut assembly: Assembly,
    lists: &Lists,
    key: &MeshKey,
    me: &DeviceId,
) -> anyhow::Result<Installed> {
    let mut installed = Installed::default();
    let mut touched_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for (i, w) in work.iter().enumerate() {
        let prepared = assembly.pending.remove(&i);
        let target = root.join(&w.path);
        if w.step != Step::ConflictCopy && !keep_local_edit(root, w, key, me)? {
            if let Some(p) = prepared {
                let _ = std::fs::remove_file(&p.tmp);
            }
            continue;
        }
        if w.step == Step::Delete {
            if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir(&target);
            } else {
                let _ = std::fs::remove_file(&target);
            }
            installed.updates.push((w.path.clone(), None));
            continue;
        }
        if w.record.kind == FileKind::Directory {
            std::fs::create_dir_all(&target)?;
            let dir = LocalFile::directory(w.record.mode, w.record.version, w.record.chunks);
            installed.updates.push((w.path.clone(), Some(dir)));
            continue;
        }
        let (Some(p), Some(list)) = (prepared, lists.get(&w.record.chunks)) else {
            continue;
        };
        if p.left > 0 {
            // Never written wrong: reported, and retried on a later pull.
            let _ = std::fs::remove_file(&p.tmp);
            installed.unavailable.push(w.path.clone());
            continue;
        }
        let file = if p.link.is_some() {
            install_link(&p, &target, w, list)?
        } else {
            if let Some(dir) = target.parent() {
                touched_dirs.insert(dir.to_path_buf());
            }
            install_file(&p, &target, w, list)?
        };
        installed.lists.push((w.record.chunks, list.clone()));
        if w.step == Step::ConflictCopy {
            // A plain new file from here on: the next scan records and syncs it.
            tracing::warn!(path = %w.path, "concurrent edit kept as a conflict copy");
        } else {
            installed.updates.push((w.path.clone(), Some(file)));
        }
    }
    for p in assembly.pending.values() {
        let _ = std::fs::remove_file(&p.tmp);
    }
    for dir in touched_dirs {
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(installed)
}

/// Makes the link `p` assembled and renames it into place.
fn install_link(
    p: &Pending,
    target: &Path,
    w: &Work,
    list: &[ChunkRef],
) -> anyhow::Result<LocalFile> {
    use std::os::unix::ffi::OsStrExt;
    let link = p.link.as_deref().unwrap_or_default();
    let _ = std::fs::remove_file(&p.tmp);
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(link), &p.tmp)
        .with_context(|| format!("creating link {}", p.tmp.display()))?;
    std::fs::rename(&p.tmp, target).with_context(|| format!("renaming {}", p.tmp.display()))?;
    let mtime_ns = std::fs::symlink_metadata(target)?
        .modified()
        .map(unix_nanos)
        .unwrap_or(0);
    Ok(LocalFile {
        kind: FileKind::Symlink,
        size: p.size,
        mtime_ns,
        mode: 0o777,
        chunks: list.to_vec(),
        version: w.record.version,
        list_hash: w.record.chunks,
    })
}

/// Gives the flushed temp file the record's mode and mtime and renames it into place.
fn install_file(
    p: &Pending,
    target: &Path,
    w: &Work,
    list: &[ChunkRef],
) -> anyhow::Result<LocalFile> {
    let r = &w.record;
    std::fs::set_permissions(&p.tmp, std::fs::Permissions::from_mode(r.mode & 0o7777))?;
    let mtime = std::time::UNIX_EPOCH + Duration::from_nanos(r.mtime_ns.max(0) as u64);
    std::fs::File::options()
        .write(true)
        .open(&p.tmp)?
        .set_modified(mtime)?;
    std::fs::rename(&p.tmp, target)?;
    let mtime_ns = std::fs::metadata(target)?
        .modified()
        .map(unix_nanos)
        .unwrap_or(r.mtime_ns);
    Ok(LocalFile {
        kind: FileKind::File,
        size: p.size,
        mtime_ns,
        mode: r.mode,
        chunks: list.to_vec(),
        version: r.version,
        list_hash: r.chunks,
    })
}

/// Before the index's version replaces or deletes `w.path`, checks that the file on disk is
/// still what this device last scanned or wrote. If it was edited since (and not yet scanned),
/// the edit is concurrent with the incoming version: it is moved aside as a conflict copy, so
/// nothing is lost, or — for a delete — the file is kept. Returns whether to go ahead.
fn keep_local_edit(root: &Path, w: &Work, key: &MeshKey, me: &DeviceId) -> anyhow::Result<bool> {
    let target = root.join(&w.path);
    let Ok(meta) = std::fs::symlink_metadata(&target) else {
        return Ok(true);
    };
    if !meta.is_file() {
        return Ok(true);
    }
    let mtime_ns = meta.modified().map(unix_nanos).unwrap_or(0);
    if w.before == Some((meta.len(), mtime_ns)) {
        return Ok(true);
    }
    let incoming: &FileRecord = &w.record;
    let file = std::fs::File::open(&target)?;
    let refs = content::chunk_stream(
        std::io::BufReader::new(file),
        &key.chunk_id_key(),
        |_, _| {},
    )?;
    if !incoming.deleted && content::chunk_list_hash(&refs) == incoming.chunks {
        return Ok(true); // the same edit made here: no conflict
    }
    if incoming.deleted {
        tracing::warn!(path = %w.path, "deleted elsewhere but edited here: keeping it");
        return Ok(false);
    }
    let copy = conflict_name_for(&w.path, mtime_ns, me);
    std::fs::rename(&target, root.join(&copy))?;
    tracing::warn!(path = %w.path, copy = %copy, "edited here and elsewhere at once: local version kept as a conflict copy");
    Ok(true)
}
