//! What to do on disk for a set of changed paths, decided from the index and the local state
//! alone (pure: no I/O but the `on_disk` question asked of conflict-copy names).
//!
//! Order matters: conflict copies first (a loser may be the file about to be overwritten),
//! then writes in path order (folders before their files), then deletes deepest first — so a
//! rename's new file is written from the old one's chunks before the old one goes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use meshsync_crdt::{FileKind, FileRecord, FolderIndex};

use crate::device::conflict::conflict_name;
use crate::device::ignore::Rules;
use crate::state::LocalFile;

/// What one step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write a losing concurrent version under its conflict-copy name (a plain new file from
    /// then on: the next scan records it).
    ConflictCopy,
    /// Write the winning version (a file, link or directory) in place.
    Write,
    /// Delete what this device holds at the path.
    Delete,
}

/// One path to bring in line.
#[derive(Clone, Debug)]
pub struct Work {
    /// The path written (for a conflict copy, the copy's name).
    pub path: String,
    pub record: FileRecord,
    pub step: Step,
    /// The (size, mtime) this device last recorded at `path`: a file on disk that no longer
    /// matches was edited here since, concurrently with `record`.
    pub before: Option<(u64, i64)>,
}

impl Work {
    /// Whether this step writes content (a file or link) that needs a chunk list.
    pub fn needs_content(&self) -> bool {
        self.step != Step::Delete && !self.record.deleted && self.record.kind != FileKind::Directory
    }
}

/// The steps, in order, and the regular files they replace or delete (kept restorable).
#[derive(Debug, Default)]
pub struct Plan {
    pub work: Vec<Work>,
    pub olds: HashMap<String, LocalFile>,
}

/// Plans how to bring `paths` in line with `index`, given what this device holds (`local`).
/// `on_disk` says whether a conflict copy's name is already taken on disk.
pub fn plan(
    index: &FolderIndex,
    local: &BTreeMap<String, LocalFile>,
    rules: &Rules,
    paths: BTreeSet<String>,
    on_disk: impl Fn(&str) -> bool,
) -> Plan {
    let mut copies = Vec::new();
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    for path in paths {
        let Some(state) = index.get(&path) else {
            continue;
        };
        if rules.ignores_record(&path, &state.winner) {
            continue;
        }
        for loser in &state.losers {
            if loser.deleted || loser.kind != FileKind::File {
                continue;
            }
            let name = conflict_name(&path, loser);
            if !local.contains_key(&name) && !on_disk(&name) {
                copies.push(work(name, loser.clone(), Step::ConflictCopy, None));
            }
        }
        let winner = state.winner;
        let here = local.get(&path);
        if here.is_some_and(|l| l.is(&winner)) {
            continue;
        }
        let before = here.map(|l| (l.size, l.mtime_ns));
        if !winner.deleted {
            writes.push(work(path, winner, Step::Write, before));
        } else if here.is_some() {
            deletes.push(work(path, winner, Step::Delete, before));
        }
    }
    deletes.reverse();
    // A folder here that becomes a file or link: what it held is deleted first, so the folder
    // is empty (and simply replaced) when the new entry takes its place.
    let replaced_folders: Vec<&str> = writes
        .iter()
        .filter(|w| w.record.kind != FileKind::Directory)
        .filter(|w| {
            local
                .get(&w.path)
                .is_some_and(|l| l.kind == FileKind::Directory)
        })
        .map(|w| w.path.as_str())
        .collect();
    let (first, last): (Vec<Work>, Vec<Work>) = deletes.into_iter().partition(|d| {
        replaced_folders
            .iter()
            .any(|folder| d.path == *folder || d.path.starts_with(&format!("{folder}/")))
    });
    let work: Vec<Work> = copies
        .into_iter()
        .chain(first)
        .chain(writes)
        .chain(last)
        .collect();
    let olds = work
        .iter()
        .filter(|w| w.step != Step::ConflictCopy)
        .filter_map(|w| Some((w.path.clone(), local.get(&w.path)?.clone())))
        .filter(|(_, old)| old.kind == FileKind::File)
        .collect();
    Plan { work, olds }
}

fn work(path: String, record: FileRecord, step: Step, before: Option<(u64, i64)>) -> Work {
    Work {
        path,
        record,
        step,
        before,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use meshsync_crdt::index::FileUpdate;
    use meshsync_crdt::{
        Action, ChunkListHash, DeviceKeys, Epoch, FolderId, MembershipLog, MeshId, MeshKey, Role,
        SealedName,
    };

    pub(crate) fn update(path: &str, content: u8, deleted: bool) -> FileUpdate {
        FileUpdate {
            path: path.into(),
            kind: FileKind::File,
            size: 1,
            mode: 0o644,
            mtime_ns: 1_795_827_723_000_000_000,
            deleted,
            chunks: if deleted {
                ChunkListHash::default()
            } else {
                ChunkListHash([content; 32])
            },
        }
    }

    pub(crate) fn held(record: &FileRecord) -> LocalFile {
        LocalFile {
            kind: record.kind,
            size: 1,
            mtime_ns: 5,
            mode: 0o644,
            chunks: vec![],
            version: record.version,
            list_hash: record.chunks,
        }
    }

    pub(crate) fn no_rules() -> Rules {
        Rules::load_at(std::path::Path::new("/nonexistent-meshsync-test"))
    }

    /// Two writing members of one mesh.
    pub(crate) fn two_devices() -> (DeviceKeys, DeviceKeys, MembershipLog) {
        let (a, b) = (DeviceKeys::generate(), DeviceKeys::generate());
        let (mut log, _) = MembershipLog::create(&a, "a", &MeshKey::generate(Epoch(0)));
        log.append(
            &a,
            Action::Add {
                device: b.device_id(),
                role: Role::Device,
                name: SealedName::unreadable("b"),
                kem: Some(b.kem_public()),
                wrapped: None,
            },
        )
        .unwrap();
        (a, b, log)
    }

    #[test]
    fn copies_first_then_writes_in_path_order_then_deletes_deepest_first() {
        let (a, b, log) = two_devices();
        let folder = FolderId::random();
        let mut index = FolderIndex::new(log.mesh(), folder.clone());
        let first = index
            .write(
                &a,
                Epoch(0),
                vec![update("d/x", 1, false), update("d/y/z", 2, false)],
            )
            .unwrap();
        let mut local: BTreeMap<String, LocalFile> =
            first.iter().map(|r| (r.path.clone(), held(r))).collect();
        // Both paths deleted elsewhere; a new file; and a concurrent edit of "c" by two devices.
        index
            .write(
                &a,
                Epoch(0),
                vec![update("d/x", 0, true), update("d/y/z", 0, true)],
            )
            .unwrap();
        index
            .write(&a, Epoch(0), vec![update("new", 3, false)])
            .unwrap();
        let mut other = FolderIndex::new(log.mesh(), folder);
        other
            .write(&b, Epoch(0), vec![update("c", 4, false)])
            .unwrap();
        index
            .write(&a, Epoch(0), vec![update("c", 5, false)])
            .unwrap();
        index.apply(log.view(), other.take_local_changes()).unwrap();
        let paths = ["c", "d/x", "d/y/z", "new"].map(String::from).into();
        let plan = plan(&index, &local, &no_rules(), paths, |_| false);
        let steps: Vec<(Step, &str)> = plan
            .work
            .iter()
            .map(|w| (w.step, w.path.as_str()))
            .collect();
        assert_eq!(steps.len(), 5, "{steps:?}");
        assert_eq!(steps[0].0, Step::ConflictCopy);
        assert!(
            steps[0].1.starts_with("c.sync-conflict-20261128-"),
            "{steps:?}"
        );
        assert_eq!(steps[1..3], [(Step::Write, "c"), (Step::Write, "new")]);
        assert_eq!(steps[3..], [(Step::Delete, "d/y/z"), (Step::Delete, "d/x")]);
        // The files it deletes stay restorable.
        assert_eq!(plan.olds.len(), 2);

        // In sync: nothing to do. A copy already on disk is not written again.
        for w in &plan.work {
            if w.step != Step::ConflictCopy {
                local.insert(w.path.clone(), held(&w.record));
            }
        }
        local.remove("d/x");
        local.remove("d/y/z");
        let again = ["c", "d/x", "d/y/z", "new"].map(String::from).into();
        assert!(plan_of(&index, &local, again).work.is_empty());
    }

    fn plan_of(
        index: &FolderIndex,
        local: &BTreeMap<String, LocalFile>,
        paths: BTreeSet<String>,
    ) -> Plan {
        plan(index, local, &no_rules(), paths, |_| true)
    }

    #[test]
    fn a_folder_that_becomes_a_file_is_emptied_before_the_file_is_written() {
        let (a, _, log) = two_devices();
        let mut index = FolderIndex::new(log.mesh(), FolderId::random());
        let mut dir = update("x", 0, false);
        dir.kind = FileKind::Directory;
        dir.chunks = ChunkListHash::default();
        let first = index
            .write(
                &a,
                Epoch(0),
                vec![dir, update("x/inner", 1, false), update("y", 2, false)],
            )
            .unwrap();
        let local: BTreeMap<String, LocalFile> =
            first.iter().map(|r| (r.path.clone(), held(r))).collect();
        index
            .write(
                &a,
                Epoch(0),
                vec![update("x/inner", 0, true), update("x", 3, false)],
            )
            .unwrap();
        let paths = ["x", "x/inner"].map(String::from).into();
        let plan = plan(&index, &local, &no_rules(), paths, |_| false);
        let steps: Vec<(Step, &str)> = plan
            .work
            .iter()
            .map(|w| (w.step, w.path.as_str()))
            .collect();
        assert_eq!(steps, [(Step::Delete, "x/inner"), (Step::Write, "x")]);
    }

    #[test]
    fn ignored_paths_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".meshsync")).unwrap();
        std::fs::write(dir.path().join(".meshsync/ignore.local"), "*.log\n").unwrap();
        let keys = DeviceKeys::generate();
        let mut index = FolderIndex::new(MeshId::from_bytes([7; 16]), FolderId::random());
        index
            .write(
                &keys,
                Epoch(0),
                vec![update("a.log", 1, false), update("a.txt", 2, false)],
            )
            .unwrap();
        let paths = ["a.log", "a.txt"].map(String::from).into();
        let plan = plan(
            &index,
            &BTreeMap::new(),
            &Rules::load_at(dir.path()),
            paths,
            |_| false,
        );
        let written: Vec<&str> = plan.work.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(written, ["a.txt"]);
    }
}
