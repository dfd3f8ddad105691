//! Walking a folder: what changed on disk since this device last recorded it. Everything is
//! read through the folder's door ([`FolderRoot`]); a link is recorded as a link, never
//! followed. [`Scope`] says how much of the folder to look at: all of it, or the folders the
//! watcher named.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshsync_crdt::keys::ChunkIdKey;
use meshsync_crdt::{ChunkListHash, FileKind, FolderId};
use rayon::prelude::*;

use super::folder::left_by_a_killed_daemon;
use super::ignore::{is_own_file, Rules, IGNORE_FILE};
use super::serve::unix_nanos;
use crate::chunks::{content, ChunkRef};
use crate::disk::{parent_of, Entry, FolderRoot, Kind, OpenFolder};
use crate::state::{LocalFile, State};

/// Files modified more recently than this are still being written: they wait for a rescan.
pub const SETTLE: Duration = Duration::from_millis(40);

/// A file that was just emptied (a program rewriting it in place truncates it first) waits
/// this long before its empty state is believed: publishing it would give every other device
/// an empty "version" for a moment. Ordinary saves keep the [`SETTLE`] latency.
pub const TRUNCATE_SETTLE: Duration = Duration::from_secs(1);

/// One scanned path's new state (`file: None`: it is gone).
#[derive(Debug)]
pub struct Scanned {
    pub path: String,
    pub file: Option<LocalFile>,
    pub refs: Vec<ChunkRef>,
    /// What this device held there when the walk compared (see [`held_mark`]): if it holds
    /// something else by the time the scan is recorded, this device wrote the path meanwhile
    /// (a peer's version) and what the walk saw is stale.
    pub was: Option<HeldMark>,
}

/// What identifies a version this device holds at a path: its version number, kind and
/// content.
pub type HeldMark = (u64, FileKind, ChunkListHash);

/// The mark of what this device holds at a path.
pub fn held_mark(file: &LocalFile) -> HeldMark {
    (file.version, file.kind, file.list_hash)
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Walked {
    pub changed: Vec<Scanned>,
    /// Some file was left for later because it is still being written: rescan after this.
    pub retry_after: Option<Duration>,
    /// Temp files a killed daemon left, seen on the way (never a final name: removing them
    /// loses nothing).
    pub left_behind: Vec<String>,
}

impl Walked {
    /// Notes what examining `rel` found.
    fn take(&mut self, rel: String, examined: Examined, was: Option<&LocalFile>) {
        match examined {
            Examined::Unchanged => {}
            Examined::Unsettled(after) => {
                self.retry_after = Some(self.retry_after.map_or(after, |a| a.min(after)));
            }
            Examined::Changed(file, refs) => self.changed.push(Scanned {
                path: rel,
                file: Some(file),
                refs,
                was: was.map(held_mark),
            }),
        }
    }
}

/// What this device holds in a folder, as a walk compares against it: the state's table, read
/// a folder at a time ([`HeldInTable`]), so that a walk of a million files holds no copy of a
/// million entries (a map, in tests).
pub trait Held {
    /// Hands `each` the held paths from `from` on, in path order, until it says stop.
    fn each_from(
        &self,
        from: Bound<&str>,
        each: &mut dyn FnMut(&str, LocalFile) -> bool,
    ) -> anyhow::Result<()>;
}

#[cfg(test)]
impl Held for BTreeMap<String, LocalFile> {
    fn each_from(
        &self,
        from: Bound<&str>,
        each: &mut dyn FnMut(&str, LocalFile) -> bool,
    ) -> anyhow::Result<()> {
        for (rel, file) in self.range::<str, _>((from, Bound::Unbounded)) {
            if !each(rel, file.clone()) {
                break;
            }
        }
        Ok(())
    }
}

/// What this device holds in one folder, as the state records it.
pub struct HeldInTable {
    pub state: State,
    pub folder: FolderId,
}

impl Held for HeldInTable {
    fn each_from(
        &self,
        from: Bound<&str>,
        each: &mut dyn FnMut(&str, LocalFile) -> bool,
    ) -> anyhow::Result<()> {
        Ok(self.state.local_from(&self.folder, from, each)?)
    }
}

/// What is held directly in one folder of the walk.
#[derive(Default)]
struct HeldHere {
    /// By path.
    files: BTreeMap<String, LocalFile>,
    /// The children that hold something (paths): each was a folder.
    parents: Vec<String>,
}

/// What `held` holds directly in `dir` ("" is the top): one read from the start, then one
/// past each child folder's contents.
fn held_here(held: &dyn Held, dir: &str) -> anyhow::Result<HeldHere> {
    let prefix = child_prefix(dir);
    let mut here = HeldHere::default();
    let mut from = prefix.clone();
    loop {
        let mut past: Option<String> = None;
        held.each_from(Bound::Included(&from), &mut |rel, file| {
            let Some(rest) = rel.strip_prefix(&prefix) else {
                return false;
            };
            match rest.split_once('/') {
                None => {
                    here.files.insert(rel.to_string(), file);
                    true
                }
                Some((child, _)) => {
                    let child = format!("{prefix}{child}");
                    past = Some(format!("{child}0")); // '0' follows '/': past every "child/…"
                    here.parents.push(child);
                    false
                }
            }
        })?;
        match past {
            Some(next) => from = next,
            None => return Ok(here),
        }
    }
}

/// Everything `held` holds under the folder `dir`.
fn held_under(held: &dyn Held, dir: &str) -> anyhow::Result<Vec<(String, LocalFile)>> {
    let prefix = format!("{dir}/");
    let mut out = Vec::new();
    held.each_from(Bound::Included(&prefix), &mut |rel, file| {
        let under = rel.starts_with(&prefix);
        if under {
            out.push((rel.to_string(), file));
        }
        under
    })?;
    Ok(out)
}

/// What this device held in a folder that its listing (`names`: name → is a folder) no
/// longer shows: children not there, and everything under a child that is no longer a folder.
fn gone_from(
    held: &dyn Held,
    here: &HeldHere,
    dir: &str,
    names: &BTreeMap<String, bool>,
) -> anyhow::Result<Vec<(String, LocalFile)>> {
    let skip = child_prefix(dir).len();
    let mut gone: Vec<(String, LocalFile)> = (here.files.iter())
        .filter(|(rel, _)| !names.contains_key(&rel[skip..]))
        .map(|(rel, file)| (rel.clone(), file.clone()))
        .collect();
    for child in &here.parents {
        if names.get(&child[skip..]) != Some(&true) {
            gone.extend(held_under(held, child)?);
        }
    }
    Ok(gone)
}

/// How the paths of `dir`'s children begin.
fn child_prefix(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
}

/// Walks the folder; returns what changed since what this device holds (`held`), and whether
/// some file was left for later because it is still being written (only when `wait_settle`).
/// Everything is read through the folder's door: a link is recorded as a link, never followed.
pub fn walk(
    root: &FolderRoot,
    held: &dyn Held,
    id_key: &ChunkIdKey,
    wait_settle: bool,
    scope: &Scope,
) -> anyhow::Result<Walked> {
    walk_in_slices(
        root,
        held,
        id_key,
        wait_settle,
        scope,
        Handover {
            slice: usize::MAX,
            stopping: &AtomicBool::new(false),
            take: &mut |_| true,
        },
    )
}

/// [`walk`], handing the files it found changed to `take` whenever `slice` of them have
/// gathered, so that they can be recorded while the walk goes on; what it returns is the rest,
/// with every deletion (those are known only at the end: the mass-delete guard weighs them
/// all at once). Stops with an error when `take` says no, or at the next folder once
/// `stopping` is set (the daemon is stopping).
///
/// Each folder is compared with what is held directly in it, read when the folder is listed:
/// what the walk keeps grows with the changes it finds, not with the folder.
pub fn walk_in_slices(
    root: &FolderRoot,
    held: &dyn Held,
    id_key: &ChunkIdKey,
    wait_settle: bool,
    scope: &Scope,
    handover: Handover,
) -> anyhow::Result<Walked> {
    let Handover {
        slice,
        stopping,
        take,
    } = handover;
    let rules = Rules::load(root);
    let mut walked = Walked::default();
    let mut gone: Vec<(String, LocalFile)> = Vec::new();
    let (mut stack, only) = match scope {
        Scope::All => (vec![String::new()], false),
        Scope::Dirs(dirs) => (dirs.iter().cloned().collect(), true),
    };
    let mut done: BTreeSet<String> = BTreeSet::new();
    while let Some(dir) = stack.pop() {
        if stopping.load(Ordering::Relaxed) {
            anyhow::bail!("scan stopped: the daemon is stopping");
        }
        if !done.insert(dir.clone()) {
            continue;
        }
        let listed_here = root.open_folder(&dir).and_then(|f| Ok((f.list()?, f)));
        let (entries, folder) = match listed_here {
            Ok(found) => found,
            Err(error) if !dir.is_empty() => {
                // What this device had under it is not taken as deleted: only this folder's
                // own listing could show that.
                tracing::warn!(%dir, %error, "cannot read a folder; its files are left as they were");
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let here = held_here(held, &dir)?;
        let names: BTreeMap<String, bool> = (entries.iter())
            .map(|(name, e)| (name.clone(), e.kind == Kind::Dir))
            .collect();
        gone.extend(gone_from(held, &here, &dir, &names)?);
        // What to look at in this folder is decided in order; the looking (open, read, hash:
        // most of a first scan) runs on every core, and its results are taken in order.
        let mut to_examine: Vec<(String, Entry)> = Vec::with_capacity(entries.len());
        for (name, entry) in entries {
            let rel = format!("{}{name}", child_prefix(&dir));
            let rules_not_a_file = rel == IGNORE_FILE && entry.kind != Kind::File;
            if is_own_file(&rel) || rules_not_a_file {
                // The daemon's own files (temp files come and go) are never synced; the
                // `.meshsync/` folder is entered only for the shared ignore rules.
                if rel == ".meshsync" && entry.kind == Kind::Dir {
                    stack.push(rel);
                } else if entry.kind == Kind::File && left_by_a_killed_daemon(&name) {
                    walked.left_behind.push(rel);
                }
                continue;
            }
            let is_dir = entry.kind == Kind::Dir;
            if rules.ignores(&rel, is_dir) {
                continue; // ignored: neither recorded nor deleted
            }
            // A targeted walk enters only folders this device did not know as folders: what
            // is under a known one did not change unless the watcher named it too.
            let known_dir = (here.files.get(&rel)).is_some_and(|l| l.kind == FileKind::Directory);
            if is_dir && !(only && known_dir) {
                stack.push(rel.clone());
            }
            to_examine.push((rel, entry));
        }
        let look = |(rel, entry): &(String, Entry)| {
            examine(
                &folder,
                rel,
                entry,
                here.files.get(rel),
                id_key,
                wait_settle,
            )
        };
        let examined: Vec<anyhow::Result<Examined>> = to_examine.par_iter().map(look).collect();
        for ((rel, _), examined) in to_examine.into_iter().zip(examined) {
            let was = here.files.get(&rel);
            walked.take(rel, examined?, was);
        }
        if walked.changed.len() >= slice && !take(std::mem::take(&mut walked.changed)) {
            anyhow::bail!("scan stopped: what it found could not be recorded");
        }
    }
    for (rel, file) in gone {
        let is_dir = file.kind == FileKind::Directory;
        if !rules.ignores(&rel, is_dir) && !is_own_file(&rel) {
            walked.changed.push(Scanned {
                path: rel,
                file: None,
                refs: vec![],
                was: Some(held_mark(&file)),
            });
        }
    }
    Ok(walked)
}

/// Where [`walk_in_slices`] hands what it finds, and when it gives up.
pub struct Handover<'a> {
    /// How many changed paths make a slice.
    pub slice: usize,
    /// Set when the daemon stops: the walk gives up before its next folder.
    pub stopping: &'a AtomicBool,
    /// Takes each slice; `false` stops the walk.
    pub take: &'a mut dyn FnMut(Vec<Scanned>) -> bool,
}

/// Which part of a folder a scan looks at.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// All of it (the first scan, `meshsync scan`, the periodic safety net).
    #[default]
    All,
    /// These folders, by relative path ("" is the top), as the watcher named them: what each
    /// holds, and all of what is under a folder this device did not know as one. A million-file
    /// folder's change of a few files costs a listing of their folders, not a walk of it all.
    /// A walk lists them as given: see [`Scope::there`].
    Dirs(BTreeSet<String>),
}

impl Scope {
    /// This scope with the folders that are there: one that is gone (or is no longer a folder)
    /// gives way to its nearest ancestor that is, whose listing shows it gone.
    pub fn there(self, root: &FolderRoot) -> Scope {
        match self {
            Scope::All => Scope::All,
            Scope::Dirs(dirs) => Scope::Dirs(nearest_folders(root, &dirs)),
        }
    }
}

fn nearest_folders(root: &FolderRoot, dirs: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in dirs {
        let mut dir = dir.as_str();
        while !dir.is_empty()
            && root
                .entry(dir)
                .ok()
                .flatten()
                .is_none_or(|e| e.kind != Kind::Dir)
        {
            dir = parent_of(dir);
        }
        out.insert(dir.to_string());
    }
    out
}

/// What [`examine`] found at one path.
enum Examined {
    Unchanged,
    /// Still being written: left for a rescan after this long.
    Unsettled(Duration),
    Changed(LocalFile, Vec<ChunkRef>),
}

/// Looks at one entry of `folder` (at `rel`) against what this device last recorded there
/// (`known`).
fn examine(
    folder: &OpenFolder,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
    wait_settle: bool,
) -> anyhow::Result<Examined> {
    match entry.kind {
        Kind::Dir => {
            if known.is_some_and(|l| l.kind == FileKind::Directory) {
                return Ok(Examined::Unchanged);
            }
            // A real mtime, so a conflict copy of this folder is named by a real date.
            let dir = LocalFile {
                mtime_ns: entry.mtime_ns,
                ..LocalFile::directory(entry.mode, 0, ChunkListHash::default())
            };
            Ok(Examined::Changed(dir, vec![]))
        }
        Kind::Symlink => examine_link(folder, rel, entry, known, id_key),
        Kind::File => examine_file(folder, rel, entry, known, id_key, wait_settle),
        Kind::Other => Ok(Examined::Unchanged), // sockets, devices, fifos: not synced
    }
}

fn examine_file(
    folder: &OpenFolder,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
    wait_settle: bool,
) -> anyhow::Result<Examined> {
    let age = unix_nanos(std::time::SystemTime::now()).saturating_sub(entry.mtime_ns);
    if wait_settle && (0..SETTLE.as_nanos() as i64).contains(&age) {
        // Still being written: recording it now would publish a torn version.
        return Ok(Examined::Unsettled(SETTLE));
    }
    let emptied = entry.len == 0 && known.is_some_and(|l| l.kind == FileKind::File && l.size > 0);
    if wait_settle && emptied && (0..TRUNCATE_SETTLE.as_nanos() as i64).contains(&age) {
        // Just truncated: most likely rewritten in place right now.
        let left = TRUNCATE_SETTLE.saturating_sub(Duration::from_nanos(age as u64));
        return Ok(Examined::Unsettled(left.max(SETTLE)));
    }
    let same = known.is_some_and(|l| {
        l.kind == FileKind::File
            && l.size == entry.len
            && l.mtime_ns == entry.mtime_ns
            && l.mode == entry.mode
    });
    if same {
        return Ok(Examined::Unchanged);
    }
    let name = name_of(rel);
    let Ok(file) = folder.open_read(name) else {
        return Ok(Examined::Unsettled(SETTLE)); // replaced meanwhile (by a link, or gone)
    };
    // A write in progress can keep mtime still while the size grows: if the file is not
    // exactly what it was when we started reading, it is not settled yet (checked after every
    // block, so a growing file costs one block, not a whole pass).
    let unchanged = || {
        file.metadata().is_ok_and(|now| {
            now.len() == entry.len && now.modified().map(unix_nanos).ok() == Some(entry.mtime_ns)
        })
    };
    let refs = content::chunk_file(&file, id_key, unchanged)?;
    let size: u64 = refs.iter().flatten().map(|c| u64::from(c.len)).sum();
    // …and the path must still name the file that was read (not one renamed over it).
    let after = folder.entry(name).ok().flatten();
    let replaced = after.is_none_or(|a| a.ino != entry.ino || a.mtime_ns != entry.mtime_ns);
    let Some(refs) = refs.filter(|_| size == entry.len && !replaced) else {
        return Ok(Examined::Unsettled(SETTLE));
    };
    let file = LocalFile {
        kind: FileKind::File,
        size,
        mtime_ns: entry.mtime_ns,
        mode: entry.mode,
        chunks: refs.clone(),
        version: 0,
        list_hash: content::chunk_list_hash(&refs),
    };
    Ok(Examined::Changed(file, refs))
}

/// The last component of `rel`.
fn name_of(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

/// A symlink is synced as a link, never followed: its content is the target path.
fn examine_link(
    folder: &OpenFolder,
    rel: &str,
    entry: &Entry,
    known: Option<&LocalFile>,
    id_key: &ChunkIdKey,
) -> anyhow::Result<Examined> {
    let Ok(target) = folder.read_link(name_of(rel)) else {
        return Ok(Examined::Unsettled(SETTLE)); // replaced meanwhile
    };
    let refs = content::chunk_stream(&target[..], id_key, |_, _| {})?;
    let list_hash = content::chunk_list_hash(&refs);
    if known.is_some_and(|l| l.kind == FileKind::Symlink && l.list_hash == list_hash) {
        return Ok(Examined::Unchanged);
    }
    let link = LocalFile {
        kind: FileKind::Symlink,
        size: target.len() as u64,
        mtime_ns: entry.mtime_ns,
        mode: 0o777,
        chunks: refs.clone(),
        version: 0,
        list_hash,
    };
    Ok(Examined::Changed(link, refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::folder::MARKER;
    use meshsync_crdt::{Epoch, MeshKey};

    fn id_key() -> ChunkIdKey {
        MeshKey::generate(Epoch(0)).chunk_id_key()
    }

    fn nothing() -> BTreeMap<String, LocalFile> {
        BTreeMap::new()
    }

    fn local_of(walked: &Walked) -> BTreeMap<String, LocalFile> {
        walked
            .changed
            .iter()
            .filter_map(|s| Some((s.path.clone(), s.file.clone()?)))
            .collect()
    }

    #[test]
    fn walk_finds_new_changed_and_gone_paths_and_skips_own_and_ignored_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join(MARKER), "m").unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join(".meshsync")).unwrap();
        std::fs::write(root.join(".meshsync/ignore"), "*.tmp\n").unwrap();
        std::fs::write(root.join(".meshsync/ignore.local"), "").unwrap();
        std::fs::write(root.join("sub/a.txt"), "hello").unwrap();
        std::fs::write(root.join("junk.tmp"), "x").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root.join("link")).unwrap();
        let key = id_key();
        let door = FolderRoot::open(root).unwrap();
        let first = walk(&door, &nothing(), &key, false, &Scope::All).unwrap();
        let paths: BTreeSet<&str> = first.changed.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            BTreeSet::from([".meshsync/ignore", "sub", "sub/a.txt", "link"])
        );
        let link = first.changed.iter().find(|s| s.path == "link").unwrap();
        assert_eq!(link.file.as_ref().unwrap().kind, FileKind::Symlink);
        assert_eq!(link.file.as_ref().unwrap().size, "sub/a.txt".len() as u64);

        // Nothing changed: nothing to record.
        let local = local_of(&first);
        assert!(walk(&door, &local, &key, false, &Scope::All)
            .unwrap()
            .changed
            .is_empty());

        // An edit, a deletion.
        std::fs::write(root.join("sub/a.txt"), "hello, world").unwrap();
        std::fs::remove_file(root.join("link")).unwrap();
        let second = walk(&door, &local, &key, false, &Scope::All).unwrap();
        let edited = second
            .changed
            .iter()
            .find(|s| s.path == "sub/a.txt")
            .unwrap();
        assert_eq!(edited.file.as_ref().unwrap().size, 12);
        let gone = second.changed.iter().find(|s| s.path == "link").unwrap();
        assert!(gone.file.is_none());
        assert_eq!(second.changed.len(), 2);
    }

    #[test]
    fn a_walk_in_slices_hands_over_changed_files_as_it_goes_and_keeps_deletions_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..40 {
            std::fs::create_dir_all(root.join(format!("d{}", i % 8))).unwrap();
            std::fs::write(root.join(format!("d{}/{i}", i % 8)), format!("{i}")).unwrap();
        }
        let (key, door) = (id_key(), FolderRoot::open(root).unwrap());
        let local = local_of(&walk(&door, &nothing(), &key, false, &Scope::All).unwrap());
        for i in 0..40 {
            let path = root.join(format!("d{}/{i}", i % 8));
            match i % 4 {
                0 => std::fs::remove_file(path).unwrap(),
                _ => std::fs::write(path, format!("{i} again")).unwrap(),
            }
        }
        let whole = changes(&walk(&door, &local, &key, false, &Scope::All).unwrap());
        let mut slices: Vec<Vec<Scanned>> = Vec::new();
        let no = AtomicBool::new(false);
        let mut take = |slice: Vec<Scanned>| {
            slices.push(slice);
            true
        };
        let rest = in_sevens(&door, &local, &key, &no, &mut take).unwrap();
        assert!(slices.len() >= 3, "{} slices", slices.len());
        assert!(
            slices.iter().flatten().all(|s| s.file.is_some()),
            "no deletion handed over early"
        );
        let mut found = changes(&rest);
        for slice in &slices {
            found.extend(slice.iter().map(|s| (s.path.clone(), s.file.is_some())));
        }
        assert_eq!(found, whole);
        assert_eq!(rest.changed.iter().filter(|s| s.file.is_none()).count(), 10);

        // A taker that says no stops the walk with an error.
        assert!(in_sevens(&door, &local, &key, &no, &mut |_| false).is_err());

        // So does a daemon that is stopping, before it lists another folder.
        let stopping = AtomicBool::new(true);
        assert!(in_sevens(&door, &local, &key, &stopping, &mut |_| true).is_err());
    }

    /// A whole walk handing over 7 changed paths at a time.
    fn in_sevens(
        door: &FolderRoot,
        held: &BTreeMap<String, LocalFile>,
        key: &ChunkIdKey,
        stopping: &AtomicBool,
        take: &mut dyn FnMut(Vec<Scanned>) -> bool,
    ) -> anyhow::Result<Walked> {
        let handover = Handover {
            slice: 7,
            stopping,
            take,
        };
        walk_in_slices(door, held, key, false, &Scope::All, handover)
    }

    /// What a walk reports, as (path, still there) pairs.
    fn changes(walked: &Walked) -> BTreeSet<(String, bool)> {
        walked
            .changed
            .iter()
            .map(|s| (s.path.clone(), s.file.is_some()))
            .collect()
    }

    #[test]
    fn a_walk_of_the_folders_the_watcher_named_finds_what_a_full_walk_finds_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a/deep", "b/deep", "c", "gone/inner", "was_dir"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "top.txt",
            "a/1",
            "a/deep/2",
            "b/3",
            "b/deep/4",
            "c/5",
            "c-x",
            "c.y",
            "c0",
            "gone/6",
            "gone/inner/7",
            "was_dir/8",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let (key, door) = (id_key(), FolderRoot::open(root).unwrap());
        let local = local_of(&walk(&door, &nothing(), &key, false, &Scope::All).unwrap());

        // In "a": an edit, a new file, a new folder with a file; "gone" removed whole; "was_dir"
        // became a file; in "c": a file removed (its siblings c-x, c.y, c0 stay).
        std::fs::write(root.join("a/1"), "edited").unwrap();
        std::fs::write(root.join("a/new"), "n").unwrap();
        std::fs::create_dir_all(root.join("a/fresh/sub")).unwrap();
        std::fs::write(root.join("a/fresh/sub/9"), "9").unwrap();
        std::fs::remove_dir_all(root.join("gone")).unwrap();
        std::fs::remove_dir_all(root.join("was_dir")).unwrap();
        std::fs::write(root.join("was_dir"), "now a file").unwrap();
        std::fs::remove_file(root.join("c/5")).unwrap();
        // Changed too, but not named by the watcher: a targeted walk does not look there.
        std::fs::write(root.join("b/deep/4"), "unnamed").unwrap();

        let full = changes(&walk(&door, &local, &key, false, &Scope::All).unwrap());
        let named = Scope::Dirs(BTreeSet::from([
            "a".to_string(),
            "gone/inner".to_string(), // gone: its nearest ancestor there is listed instead
            "c".to_string(),
        ]))
        .there(&door);
        let targeted = changes(&walk(&door, &local, &key, false, &named).unwrap());
        let mut expected = full.clone();
        expected.remove(&("b/deep/4".to_string(), true));
        assert_eq!(targeted, expected);
        for change in [
            ("a/1", true),
            ("a/new", true),
            ("a/fresh/sub/9", true),
            ("gone", false),
            ("gone/6", false),
            ("gone/inner/7", false),
            ("was_dir", true),
            ("was_dir/8", false),
            ("c/5", false),
        ] {
            assert!(
                targeted.contains(&(change.0.to_string(), change.1)),
                "{change:?}"
            );
        }
        assert!(!targeted
            .iter()
            .any(|(p, _)| p.starts_with("c-") || p.starts_with("c.") || p == "c0"));

        // Compared with the state's table, read a folder at a time, the walks find the same.
        let home = tempfile::tempdir().unwrap();
        let state = State::open(home.path()).unwrap();
        let folder = FolderId::new("docs").unwrap();
        let mut batch = crate::state::Batch::default();
        for (rel, file) in &local {
            batch
                .local
                .push((folder.clone(), rel.clone(), Some(file.clone())));
        }
        // Another folder's files, before and after this one's in the table, are not its.
        for other in ["doc", "docs0"] {
            let other = FolderId::new(other).unwrap();
            batch
                .local
                .push((other, "c/zz".into(), Some(local["c/5"].clone())));
        }
        state.commit(batch).unwrap();
        let table = HeldInTable { state, folder };
        let full_from_table = changes(&walk(&door, &table, &key, false, &Scope::All).unwrap());
        assert_eq!(full_from_table, full);
        let targeted_from_table = changes(&walk(&door, &table, &key, false, &named).unwrap());
        assert_eq!(targeted_from_table, targeted);
    }

    #[test]
    fn walk_leaves_a_file_just_written_for_later_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fresh.txt"), "x").unwrap();
        let key = id_key();
        let door = FolderRoot::open(dir.path()).unwrap();
        let waited = walk(&door, &nothing(), &key, true, &Scope::All).unwrap();
        assert_eq!(waited.retry_after, Some(SETTLE));
        assert!(waited.changed.is_empty());
        let asked = walk(&door, &nothing(), &key, false, &Scope::All).unwrap();
        assert_eq!(asked.retry_after, None);
        assert_eq!(asked.changed.len(), 1);
    }

    #[test]
    fn a_file_just_emptied_is_not_published_until_it_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let key = id_key();
        let door = FolderRoot::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("big.bin"), vec![7u8; 100_000]).unwrap();
        let first = walk(&door, &nothing(), &key, false, &Scope::All).unwrap();
        let local = local_of(&first);
        // Rewritten in place: truncated first (the file is empty for a moment).
        std::fs::File::create(dir.path().join("big.bin")).unwrap();
        std::thread::sleep(SETTLE * 2); // older than an ordinary save's settle time
        let waited = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert!(waited.changed.is_empty(), "{:?}", waited.changed);
        let after = waited.retry_after.unwrap();
        assert!(after > SETTLE && after <= TRUNCATE_SETTLE, "{after:?}");
        // Still empty a second later: it really is empty now.
        std::thread::sleep(TRUNCATE_SETTLE);
        let later = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert_eq!(later.changed.len(), 1);
        assert_eq!(later.changed[0].file.as_ref().unwrap().size, 0);
        // An ordinary save is not held longer than before.
        std::fs::write(dir.path().join("small.txt"), "x").unwrap();
        std::thread::sleep(SETTLE * 2);
        let saved = walk(&door, &local, &key, true, &Scope::All).unwrap();
        assert!(saved.changed.iter().any(|s| s.path == "small.txt"));
    }
}
