//! Putting assembled files in place: flush (big files one by one, most already while the
//! batch arrived; the many small ones with one `syncfs`), then per step — check that a file
//! about to be replaced was not edited here since (else it is moved aside as a conflict copy),
//! make room (a link, file or folder of another kind already at the path is moved aside as a
//! conflict copy, never written through or lost), rename the temp file into place with the
//! record's mode (`& 0o777`) and mtime, make directories and links, delete — then fsync the
//! touched folders. Every operation goes through the folder's [`FolderRoot`]; a step that
//! fails is reported for its path and the others go on. Blocking throughout: called on a
//! blocking thread.

use std::collections::BTreeSet;
use std::time::Duration;

use meshsync_crdt::{ChunkListHash, DeviceId, FileKind, KeyRing};

use super::fetch::{Assembly, Lists, Pending, OWN_FSYNC};
use super::plan::{Step, Work};
use crate::chunks::{content, ChunkRef};
use crate::device::conflict::conflict_name_for;
use crate::disk::{parent_of, set_mode, DiskError, FolderRoot, Kind};
use crate::state::LocalFile;

/// What installing a plan did, for the device to record.
#[derive(Default)]
pub(super) struct Installed {
    /// What this device now holds at each path written or deleted (`None`: nothing).
    pub(super) updates: Vec<(String, Option<LocalFile>)>,
    /// Paths no source could give intact: not written, reported.
    pub(super) unavailable: Vec<String>,
    /// Paths that could not be written here, and why: reported, retried later.
    pub(super) problems: Vec<(String, String)>,
    /// The chunk lists of what was written, to keep.
    pub(super) lists: Vec<(ChunkListHash, Vec<ChunkRef>)>,
    /// A file edited here was kept in place of a deletion: the folder wants a rescan, which
    /// records the edit over the delete.
    pub(super) kept_edit: bool,
}

/// Before anything is renamed into place, its data must be on disk: the files not `flushed`
/// already (big files flush on their own as they complete). Blocking.
pub(super) fn flush(
    root: &FolderRoot,
    assembly: &Assembly,
    flushed: &BTreeSet<usize>,
) -> anyhow::Result<()> {
    let mut flush_all = false;
    for (i, p) in &assembly.pending {
        if p.left > 0 || p.link.is_some() || flushed.contains(i) {
            continue;
        }
        if p.size >= OWN_FSYNC {
            // One whose folder moved meanwhile fails to install below, and is reported there.
            if let Ok(file) = root.open_read(&p.tmp) {
                file.sync_data()?;
            }
        } else {
            flush_all = true;
        }
    }
    if flush_all {
        root.sync_all()?;
    }
    Ok(())
}

/// What one step leaves at its path.
enum Outcome {
    /// This device now holds this there (`None`: nothing).
    Holds(Option<LocalFile>),
    /// A conflict copy was written: a plain new file from now on (the next scan records it).
    CopyWritten,
    /// Nothing done (an edit here is kept, or the content is not ready).
    Skipped,
    /// No source had intact content: not written.
    Unavailable,
}

/// Carries out every step of `work` whose content is ready. Blocking.
pub(super) fn install(
    root: &FolderRoot,
    work: &[Work],
    mut assembly: Assembly,
    lists: &Lists,
    keys: &KeyRing,
    me: &DeviceId,
) -> Installed {
    let mut installed = Installed::default();
    for (i, why) in std::mem::take(&mut assembly.problems) {
        installed.problems.push((work[i].path.clone(), why));
    }
    let mut touched_dirs: BTreeSet<String> = BTreeSet::new();
    let mut strays = Strays::default();
    let mut start = 0;
    while start < work.len() {
        // A run of files that do not touch each other's paths goes in at once, on every
        // core; anything else (folders, links, deletes, conflict copies) one step at a time,
        // in the plan's order.
        let end = independent_run(work, start);
        let steps: Vec<(usize, Option<Pending>)> = (start..end)
            .map(|i| (i, assembly.pending.remove(&i)))
            .collect();
        let one = |(i, prepared): (usize, Option<Pending>)| {
            let tmp = prepared.as_ref().map(|p| (p.tmp.clone(), p.ino));
            // A broken one is reported with the problems above; only its temp file to remove.
            let outcome = (!assembly.broken.contains(&i)).then(|| {
                let list = lists.get(&work[i].record.chunks);
                install_one(root, &work[i], prepared, list, keys, me)
            });
            (i, tmp, outcome)
        };
        let done: Vec<_> = if steps.len() > 1 {
            use rayon::prelude::*;
            steps.into_par_iter().map(one).collect()
        } else {
            steps.into_iter().map(one).collect()
        };
        for (i, tmp, outcome) in done {
            let w = &work[i];
            let Some(outcome) = outcome else {
                if let Some((tmp, ino)) = tmp {
                    strays.remove(root, &tmp, ino, None);
                }
                continue;
            };
            let list = lists.get(&w.record.chunks);
            // Written: its temp file was renamed into place, nothing of it is left to look for.
            let placed = matches!(outcome, Ok(Outcome::Holds(Some(_)) | Outcome::CopyWritten));
            match outcome {
                Ok(Outcome::Holds(file)) => {
                    if file.as_ref().is_some_and(|f| f.kind != FileKind::Directory) {
                        touched_dirs.insert(parent_of(&w.path).to_string());
                    }
                    if let (Some(file), Some(list)) = (&file, list) {
                        if file.kind != FileKind::Directory {
                            installed.lists.push((w.record.chunks, list.clone()));
                        }
                    }
                    installed.updates.push((w.path.clone(), file));
                }
                Ok(Outcome::CopyWritten) => {
                    touched_dirs.insert(parent_of(&w.path).to_string());
                    if let Some(list) = list {
                        installed.lists.push((w.record.chunks, list.clone()));
                    }
                    tracing::warn!(path = %w.path, "concurrent edit kept as a conflict copy");
                }
                Ok(Outcome::Skipped) => installed.kept_edit |= w.step == Step::Delete,
                Ok(Outcome::Unavailable) => installed.unavailable.push(w.path.clone()),
                Err(error) => {
                    tracing::warn!(path = %w.path, error = format!("{error:#}"), "not written");
                    installed
                        .problems
                        .push((w.path.clone(), format!("{error:#}")));
                }
            }
            if let Some((tmp, ino)) = tmp.filter(|_| !placed) {
                strays.remove(root, &tmp, ino, Some(&w.path));
            }
        }
        start = end;
    }
    for p in assembly.pending.values() {
        strays.remove(root, &p.tmp, p.ino, None);
    }
    strays.find_and_remove(root);
    for dir in touched_dirs {
        if let Err(error) = root.sync_dir(&dir) {
            tracing::warn!(%dir, %error, "flushing a folder failed");
        }
    }
    installed
}

/// The most steps installed at once.
const RUN: usize = 256;

/// Where the run of steps from `start` that may be installed at once ends (at least one step):
/// files written in place, none a folder, link, delete or conflict copy, none at or under
/// another's path — so no step of the run makes room, renames or moves aside anything another
/// one uses.
fn independent_run(work: &[Work], start: usize) -> usize {
    let mut paths: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut parents: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut end = start;
    while let Some(w) = work.get(end).filter(|_| end - start < RUN) {
        let plain_file =
            w.step == Step::Write && !w.record.deleted && w.record.kind == FileKind::File;
        let mut above =
            std::iter::successors(Some(w.path.as_str()), |p| p.rfind('/').map(|i| &p[..i])).skip(1);
        let clash = paths.contains(w.path.as_str())
            || parents.contains(w.path.as_str())
            || above.any(|dir| paths.contains(dir));
        if !plain_file || clash {
            break;
        }
        paths.insert(&w.path);
        let mut dir = w.path.as_str();
        while let Some(i) = dir.rfind('/') {
            dir = &dir[..i];
            if !parents.insert(dir) {
                break; // its own parents are in already
            }
        }
        end += 1;
    }
    end.max(start + 1)
}

/// Removes the temp files a materialise made (path and inode each) when it fails before
/// installing them, wherever their folders are by now.
pub(super) fn remove_temps(root: &FolderRoot, temps: &[(String, u64)]) {
    let mut strays = Strays::default();
    for (tmp, ino) in temps {
        strays.remove(root, tmp, *ino, None);
    }
    strays.find_and_remove(root);
}

/// Temp files not where they were made (their folder was moved, or replaced by a link, while
/// they were filled): by name, with the inode each was made with.
#[derive(Default)]
struct Strays(std::collections::HashMap<String, u64>);

impl Strays {
    /// Removes the temp file `tmp` (made as inode `ino`; 0 for a link, never a stray) unless
    /// it was renamed to `target`; if it is neither there nor where it was made (its folder
    /// moved), notes it to look for.
    fn remove(&mut self, root: &FolderRoot, tmp: &str, ino: u64, target: Option<&str>) {
        let placed =
            || target.is_some_and(|t| root.entry(t).is_ok_and(|e| e.is_some_and(|e| e.ino == ino)));
        match root.entry(tmp) {
            Ok(Some(_)) => {
                let _ = root.remove_file(tmp);
            }
            _ if ino == 0 || placed() => {}
            _ => {
                let name = tmp.rsplit('/').next().unwrap_or(tmp);
                self.0.insert(name.to_string(), ino);
            }
        }
    }

    /// Looks for the strays in one walk of the folder (links not followed) and removes each
    /// found under its name with its inode. Rare: only after a folder moved mid-transfer.
    fn find_and_remove(self, root: &FolderRoot) {
        if self.0.is_empty() {
            return;
        }
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let Ok(names) = root.read_dir_kinds(&dir) else {
                continue;
            };
            for (name, kind) in names {
                let rel = match dir.as_str() {
                    "" => name.clone(),
                    _ => format!("{dir}/{name}"),
                };
                match kind {
                    Kind::Dir => dirs.push(rel),
                    Kind::File
                        if self.0.get(&name).is_some_and(|&ino| {
                            root.entry(&rel)
                                .is_ok_and(|e| e.is_some_and(|e| e.ino == ino))
                        }) =>
                    {
                        tracing::info!(temp = %rel, "removed a temp file whose folder moved while it was filled");
                        let _ = root.remove_file(&rel);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One step; an error is this path's alone.
fn install_one(
    root: &FolderRoot,
    w: &Work,
    prepared: Option<Pending>,
    list: Option<&Vec<ChunkRef>>,
    keys: &KeyRing,
    me: &DeviceId,
) -> anyhow::Result<Outcome> {
    if w.step != Step::ConflictCopy && !keep_local_edit(root, w, keys, me)? {
        return Ok(Outcome::Skipped);
    }
    if w.step == Step::Delete {
        match root.entry(&w.path)? {
            Some(e) if e.kind == Kind::Dir => {
                let _ = root.remove_dir(&w.path); // a folder still holding files stays
            }
            Some(_) => root.remove_file(&w.path)?,
            None => {}
        }
        return Ok(Outcome::Holds(None));
    }
    if w.record.kind == FileKind::Directory {
        make_room(root, &w.path, Kind::Dir, me)?;
        root.create_dir_all(&w.path)?;
        let dir = LocalFile::directory(w.record.mode & 0o777, w.record.version, w.record.chunks);
        return Ok(Outcome::Holds(Some(dir)));
    }
    let (Some(p), Some(list)) = (prepared, list) else {
        return Ok(Outcome::Skipped);
    };
    if p.left > 0 {
        return Ok(Outcome::Unavailable); // never written wrong; retried on a later pull
    }
    let file = if p.link.is_some() {
        install_link(root, &p, w, list, me)?
    } else {
        install_file(root, &p, w, list, me)?
    };
    Ok(match w.step {
        Step::ConflictCopy => Outcome::CopyWritten,
        _ => Outcome::Holds(Some(file)),
    })
}

/// Moves whatever is at `rel` aside as a conflict copy when it is of another kind than
/// `incoming` (a link or file where a folder goes, or a folder where a file or link goes), so
/// the incoming version is never written through it and the local one is never lost. An empty
/// folder is simply removed.
fn make_room(root: &FolderRoot, rel: &str, incoming: Kind, me: &DeviceId) -> anyhow::Result<()> {
    let Some(here) = root.entry(rel)? else {
        return Ok(());
    };
    let same = here.kind == incoming || (incoming != Kind::Dir && here.kind != Kind::Dir); // a file or link is replaced
    if same {
        return Ok(());
    }
    if here.kind == Kind::Dir && root.remove_dir(rel).is_ok() {
        return Ok(()); // it was empty
    }
    let copy = conflict_name_for(rel, here.mtime_ns, me);
    if root.entry(&copy)?.is_some() && same_entry(root, rel, &copy) {
        // Kept already under that name (as the conflict copy of its own record, written for
        // the version that lost): nothing to keep twice.
        root.remove_file(rel)?;
        tracing::info!(path = rel, copy = %copy, "a different kind of entry was here, already kept as its conflict copy");
        return Ok(());
    }
    // A copy of another content under that name: the next free numbered name.
    let mut name = copy.clone();
    for n in 2.. {
        match root.rename_new(rel, &name) {
            Ok(()) => break,
            Err(_) if n <= 20 && root.entry(&name)?.is_some() => {
                name = format!("{copy}-{n}");
            }
            Err(error) => return Err(error.into()),
        }
    }
    tracing::warn!(path = rel, copy = %name, "a different kind of entry was here: kept as a conflict copy");
    Ok(())
}

/// Whether `a` and `b` are the same link (target) or the same file (bytes), neither followed.
fn same_entry(root: &FolderRoot, a: &str, b: &str) -> bool {
    let (Ok(Some(x)), Ok(Some(y))) = (root.entry(a), root.entry(b)) else {
        return false;
    };
    match (x.kind, y.kind) {
        (Kind::Symlink, Kind::Symlink) => {
            matches!((root.read_link(a), root.read_link(b)), (Ok(p), Ok(q)) if p == q)
        }
        (Kind::File, Kind::File) if x.len == y.len => {
            let read = |rel: &str| -> Option<Vec<u8>> {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut root.open_read(rel).ok()?, &mut bytes).ok()?;
                Some(bytes)
            };
            matches!((read(a), read(b)), (Some(p), Some(q)) if p == q)
        }
        _ => false,
    }
}

/// Places the new entry `tmp` at `w.path`: a conflict copy never replaces anything.
fn place(root: &FolderRoot, tmp: &str, w: &Work) -> Result<(), DiskError> {
    match w.step {
        Step::ConflictCopy => root.rename_new(tmp, &w.path),
        _ => root.rename(tmp, &w.path),
    }
}

/// Makes the link `p` assembled and renames it into place.
fn install_link(
    root: &FolderRoot,
    p: &Pending,
    w: &Work,
    list: &[ChunkRef],
    me: &DeviceId,
) -> anyhow::Result<LocalFile> {
    let target = p.link.as_deref().unwrap_or_default();
    root.create_dir_all(parent_of(&w.path))?;
    let _ = root.remove_file(&p.tmp);
    root.symlink(target, &p.tmp)?;
    make_room(root, &w.path, Kind::Symlink, me)?;
    place(root, &p.tmp, w)?;
    let mtime_ns = root.entry(&w.path)?.map_or(0, |e| e.mtime_ns);
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

/// Gives the flushed temp file the record's mode (`& 0o777`) and mtime and renames it into
/// place.
/// Files this big that a new version replaces are closed for the last time off the install
/// (see `install_file`).
const LET_GO_FROM: u64 = 16 << 20;

fn install_file(
    root: &FolderRoot,
    p: &Pending,
    w: &Work,
    list: &[ChunkRef],
    me: &DeviceId,
) -> anyhow::Result<LocalFile> {
    let r = &w.record;
    let file = root.open_write(&p.tmp)?;
    set_mode(&file, r.mode)?;
    file.set_modified(std::time::UNIX_EPOCH + Duration::from_nanos(r.mtime_ns.max(0) as u64))?;
    // What the file system made of that mtime (its granularity), from the file itself: the
    // rename below does not change it.
    let mtime_ns = crate::disk::Entry::of_file(&file).map_or(r.mtime_ns, |e| e.mtime_ns);
    drop(file);
    make_room(root, &w.path, Kind::File, me)?;
    // A big file replaced here is let go of on a thread of its own: the last close of its
    // inode drops its cached pages and frees its blocks (some 100 ms for 256 MiB), which
    // need not hold up the new version being recorded.
    let replaced = w.before.filter(|(size, _)| *size >= LET_GO_FROM);
    let old = replaced.and_then(|_| root.open_read(&w.path).ok());
    place(root, &p.tmp, w)?;
    if let Some(old) = old {
        let _ = std::thread::Builder::new()
            .name("let-go".into())
            .spawn(move || drop(old));
    }
    Ok(LocalFile {
        kind: FileKind::File,
        size: p.size,
        mtime_ns,
        mode: r.mode & 0o777,
        chunks: list.to_vec(),
        version: r.version,
        list_hash: r.chunks,
    })
}

/// Before the index's version replaces or deletes `w.path`, checks that the file on disk is
/// still what this device last scanned or wrote. If it was edited since (and not yet scanned),
/// the edit is concurrent with the incoming version: it is moved aside as a conflict copy, so
/// nothing is lost, or — for a delete — the file is kept. Returns whether to go ahead.
fn keep_local_edit(
    root: &FolderRoot,
    w: &Work,
    keys: &KeyRing,
    me: &DeviceId,
) -> anyhow::Result<bool> {
    let here = match root.entry(&w.path) {
        Ok(Some(here)) if here.kind == Kind::File => here,
        // Nothing there, or another kind (handled by `make_room`), or a parent that is not a
        // folder here (the step itself reports that).
        _ => return Ok(true),
    };
    if w.before == Some((here.len, here.mtime_ns)) {
        return Ok(true);
    }
    let incoming = &w.record;
    // The same edit made here is no conflict: the same content, chunked in any epoch.
    for key in keys.newest_first() {
        if incoming.deleted {
            break;
        }
        let file = root.open_read(&w.path)?;
        let id_key = key.chunk_id_key();
        let refs = content::chunk_stream(std::io::BufReader::new(file), &id_key, |_, _| {})?;
        if content::chunk_list_hash(&refs) == incoming.chunks {
            return Ok(true);
        }
    }
    if incoming.deleted {
        tracing::warn!(path = %w.path, "deleted elsewhere but edited here: keeping it");
        return Ok(false);
    }
    let copy = conflict_name_for(&w.path, here.mtime_ns, me);
    root.rename_new(&w.path, &copy)?;
    tracing::warn!(path = %w.path, copy = %copy, "edited here and elsewhere at once: local version kept as a conflict copy");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::materialise::plan::tests::{two_devices, update};
    use meshsync_crdt::{Epoch, FileRecord, FolderId, FolderIndex};

    #[test]
    fn files_that_do_not_touch_each_others_paths_go_in_together_anything_else_alone() {
        let (a, _, log) = two_devices();
        let mut index = FolderIndex::new(log.mesh(), FolderId::random());
        let record = index
            .write(&a, Epoch(0), vec![update("x", 1, false)])
            .unwrap()
            .remove(0);
        let step = |path: &str, step: Step, kind: FileKind| Work {
            path: path.into(),
            record: FileRecord {
                kind,
                ..record.clone()
            },
            step,
            before: None,
        };
        let file = |path: &str| step(path, Step::Write, FileKind::File);
        let work = vec![
            step("d", Step::Write, FileKind::Directory), // 0: a folder, alone
            file("d/a"),                                 // 1..=3: together
            file("d/b"),
            file("e/f/g"),
            file("e/f"),     // 4: a file where the run has a folder: a new run
            file("e/f/g/h"), // 5: under a file of the run: a new run
            file("other"),   // 6
            step("gone", Step::Delete, FileKind::File), // 7: a delete, alone
            step("link", Step::Write, FileKind::Symlink), // 8: a link, alone
            step("c.sync-conflict", Step::ConflictCopy, FileKind::File), // 9: alone
            file("d/a"),     // 10: the same path again: a run of its own
            file("d/a"),
        ];
        let mut runs = Vec::new();
        let mut start = 0;
        while start < work.len() {
            let end = independent_run(&work, start);
            runs.push(start..end);
            start = end;
        }
        assert_eq!(
            runs,
            vec![0..1, 1..4, 4..5, 5..7, 7..8, 8..9, 9..10, 10..11, 11..12]
        );
    }
}
