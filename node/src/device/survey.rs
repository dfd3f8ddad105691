//! What a folder needs and holds ([`Survey`]): the catch-up's work and `status`'s figures.
//!
//! Both ask every second, and a walk of the whole index costs more than a second at a million
//! files, so the survey is kept up to date path by path: after a change, only the paths whose
//! records changed (from the index's own history, [`FolderIndex::paths_changed_since`]) and
//! the paths whose local state changed ([`Touched`]) are looked at again. The whole index is
//! walked only at the first survey, when the ignore rules on disk changed, when the index
//! cannot tell what changed (a shard rebuilt without a revoked device's changes), or when too
//! many local paths changed to list.
//!
//! Once a folder is quiet its survey is saved in the state ([`Folder::save_survey`]), and the
//! next start takes it up from there ([`Folder::resume_survey`]) and counts only what changed
//! since: the first survey of a start no longer reads every shard of the index (at a million
//! files, seconds of a restart). The state drops a saved survey in the same commit as any
//! change to what the device holds in that folder, so one is never read beside local files
//! it did not count; index changes since are found from the heads it names, as above.
//!
//! [`FolderIndex::paths_changed_since`]: meshsync_crdt::FolderIndex::paths_changed_since

use std::collections::{BTreeMap, BTreeSet};

use meshsync_crdt::index::PathState;
use meshsync_crdt::FolderId;
use serde::{Deserialize, Serialize};

use super::folder::Folder;
use super::ignore::{Rules, IGNORE_FILE, LOCAL_IGNORE_FILE};
use crate::state::{in_sync, Batch, LocalFile};

/// More local paths than this changed since the last survey: walked whole instead of listed
/// (a new device's first sync records a million; the list would cost as much as the walk).
const MAX_TOUCHED: usize = 100_000;

/// A survey with more paths needed or conflicted than this is not saved (a first sync's: the
/// next start walks the index, as that sync will read it all anyway).
const MAX_SAVED: usize = 10_000;

/// What a folder needs and holds, ignored paths excepted.
#[derive(Default)]
pub(crate) struct Survey {
    /// Paths whose winning record this device does not hold, with the winner's size.
    pub(crate) needs: BTreeMap<String, u64>,
    /// The size of what `needs` names.
    pub(crate) need_bytes: u64,
    /// Paths with concurrent records.
    pub(crate) conflicted: BTreeSet<String>,
    /// Regular files this device holds.
    pub(crate) files: usize,
}

/// A survey and what it was taken at.
pub(crate) struct Surveyed {
    survey: Survey,
    /// The index heads it counts.
    heads: BTreeMap<u16, Vec<automerge::ChangeHash>>,
    /// The ignore rules files as they were on disk (the local one is never synced, so never
    /// an index change).
    rules: RulesMark,
}

type RulesMark = Vec<Option<(i64, u64, u64)>>;

/// A survey as the state keeps it between runs.
#[derive(Serialize, Deserialize)]
struct SavedSurvey {
    heads: Vec<(u16, Vec<[u8; 32]>)>,
    rules: RulesMark,
    needs: Vec<(String, u64)>,
    conflicted: Vec<String>,
}

/// Paths whose local state changed since the last survey, or "too many to list".
#[derive(Default)]
pub(crate) struct Touched {
    paths: BTreeSet<String>,
    overflowed: bool,
}

impl Touched {
    pub(crate) fn add(&mut self, path: &str) {
        if self.overflowed {
            return;
        }
        if self.paths.len() >= MAX_TOUCHED {
            self.paths.clear();
            self.overflowed = true;
        } else {
            self.paths.insert(path.to_string());
        }
    }
}

impl Survey {
    /// Counts `path` as it is now, in place of what was counted for it before.
    fn count(
        &mut self,
        rules: &Rules,
        path: &str,
        state: Option<PathState>,
        local: Option<&LocalFile>,
    ) {
        if let Some(size) = self.needs.remove(path) {
            self.need_bytes -= size;
        }
        self.conflicted.remove(path);
        let Some(state) = state else {
            return;
        };
        if rules.ignores_record(path, &state.winner) {
            return;
        }
        if !state.losers.is_empty() {
            self.conflicted.insert(path.to_string());
        }
        if !in_sync(local, &state.winner) {
            self.need_bytes += state.winner.size;
            self.needs.insert(path.to_string(), state.winner.size);
        }
    }
}

impl Folder {
    /// Paths whose winning version is not on disk here yet (ignored paths excepted).
    pub(crate) fn needs(&mut self) -> BTreeSet<String> {
        self.survey().needs.keys().cloned().collect()
    }

    /// What the folder needs and holds (see [`Survey`]), brought up to date.
    pub(crate) fn survey(&mut self) -> &Survey {
        let rules_mark = self.rules_mark();
        let heads = self.index.heads();
        let touched = std::mem::take(&mut self.touched);
        let unchanged =
            |s: &Surveyed| s.rules == rules_mark && s.heads == heads && touched.paths.is_empty();
        self.survey_saved &= self.surveyed.as_ref().is_some_and(unchanged) && !touched.overflowed;
        let surveyed = match self.surveyed.take() {
            Some(s) if unchanged(&s) => (!touched.overflowed).then_some(s),
            Some(mut s) if s.rules == rules_mark && !touched.overflowed => {
                // Paths whose shards cannot be read: counted again by a walk.
                self.index
                    .paths_changed_since(&s.heads)
                    .and_then(|mut paths| {
                        paths.extend(touched.paths);
                        self.index.warm(paths.iter().map(String::as_str)).ok()?;
                        let rules = Rules::load_at(&self.path);
                        for path in paths {
                            let state = self.index.get(&path);
                            s.survey.count(&rules, &path, state, self.local.get(&path));
                        }
                        s.heads = heads.clone();
                        Some(s)
                    })
            }
            _ => None,
        };
        let mut surveyed = surveyed.unwrap_or_else(|| Surveyed {
            survey: self.walk(),
            heads,
            rules: rules_mark,
        });
        surveyed.survey.files = self.file_count();
        &self.surveyed.insert(surveyed).survey
    }

    /// The survey as last brought up to date (by [`Folder::survey`]), if any.
    pub(crate) fn last_survey(&self) -> Option<&Survey> {
        self.surveyed.as_ref().map(|s| &s.survey)
    }

    /// Puts the survey, brought up to date, in `batch` to be saved for the next start (see
    /// the module's note), unless it was saved as it is (an idle daemon writes nothing) or it
    /// names too many paths.
    pub(crate) fn save_survey(&mut self, id: &FolderId, batch: &mut Batch) {
        if self.survey_saved {
            return;
        }
        self.survey();
        let Some(s) = &self.surveyed else { return };
        if s.survey.needs.len() + s.survey.conflicted.len() > MAX_SAVED {
            return;
        }
        let saved = SavedSurvey {
            heads: (s.heads.iter())
                .map(|(shard, heads)| (*shard, heads.iter().map(|h| h.0).collect()))
                .collect(),
            rules: s.rules.clone(),
            needs: (s.survey.needs.iter())
                .map(|(path, size)| (path.clone(), *size))
                .collect(),
            conflicted: s.survey.conflicted.iter().cloned().collect(),
        };
        match postcard::to_stdvec(&saved) {
            Ok(bytes) => {
                batch.surveys.push((id.clone(), bytes));
                self.survey_saved = true;
            }
            Err(error) => tracing::warn!(%error, "the survey does not encode; not saved"),
        }
    }

    /// Takes up the survey a previous run saved (see [`Folder::save_survey`]); one that does
    /// not decode is left, and the first survey walks the index.
    pub(crate) fn resume_survey(&mut self, bytes: &[u8]) {
        let saved: SavedSurvey = match postcard::from_bytes(bytes) {
            Ok(saved) => saved,
            Err(error) => {
                tracing::warn!(%error, "the saved survey does not decode; walking the index");
                return;
            }
        };
        let mut survey = Survey::default();
        for (path, size) in saved.needs {
            survey.need_bytes = survey.need_bytes.saturating_add(size);
            survey.needs.insert(path, size);
        }
        survey.conflicted = saved.conflicted.into_iter().collect();
        let heads = (saved.heads.into_iter())
            .map(|(shard, heads)| {
                (
                    shard,
                    heads.into_iter().map(automerge::ChangeHash).collect(),
                )
            })
            .collect();
        self.surveyed = Some(Surveyed {
            survey,
            heads,
            rules: saved.rules,
        });
        self.survey_saved = true;
    }

    fn rules_mark(&self) -> RulesMark {
        let root = self.root().ok();
        [IGNORE_FILE, LOCAL_IGNORE_FILE]
            .map(|file| {
                let entry = root.as_ref()?.entry(file).ok()??;
                Some((entry.mtime_ns, entry.len, entry.ino))
            })
            .to_vec()
    }

    /// Counts every path of the index.
    fn walk(&self) -> Survey {
        let started = std::time::Instant::now();
        let rules = Rules::load_at(&self.path);
        let mut survey = Survey::default();
        for item in self.index.iter() {
            let (path, state) = match item {
                Ok(item) => item,
                Err(error) => {
                    tracing::warn!(%error, "a shard of the index cannot be read; its paths are not counted");
                    continue;
                }
            };
            let local = self.local.get(&path);
            survey.count(&rules, &path, Some(state), local);
        }
        tracing::info!(folder = %self.path.display(), took = ?started.elapsed(), "surveyed the whole index");
        survey
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::materialise::plan::tests::{held, two_devices, update};
    use crate::device::serve::ChunkMap;
    use crate::state::Batch;
    use meshsync_crdt::{Epoch, FolderId, FolderIndex};

    /// A survey's needs (with sizes), bytes needed, conflicted paths and file count.
    type Seen = (Vec<(String, u64)>, u64, Vec<String>, usize);

    /// What the kept survey says, next to what a walk of everything says.
    fn both(folder: &mut Folder) -> [Seen; 2] {
        let view = |s: &Survey| {
            let needs = s.needs.iter().map(|(p, n)| (p.clone(), *n)).collect();
            let conflicted = s.conflicted.iter().cloned().collect();
            (needs, s.need_bytes, conflicted, s.files)
        };
        let kept = view(folder.survey());
        let mut walked = folder.walk();
        walked.files = folder.file_count();
        [kept, view(&walked)]
    }

    #[test]
    fn the_kept_survey_is_what_a_walk_of_everything_finds_after_every_kind_of_change() {
        let (a, b, log) = two_devices();
        let id = FolderId::random();
        let dir = tempfile::tempdir().unwrap();
        let index = FolderIndex::new(log.mesh(), id.clone());
        let mut folder = Folder::new(dir.path().to_path_buf(), index, Default::default());
        let mut other = FolderIndex::new(log.mesh(), id.clone());
        let home = tempfile::tempdir().unwrap();
        let state = crate::state::State::open(home.path()).unwrap();
        let (mut map, mut batch) = (ChunkMap::new(state), Batch::default());
        let paths: Vec<String> = (0..40).map(|i| format!("d{}/f{i}", i % 4)).collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for round in 0..60 {
            let path = &paths[next(paths.len())];
            let content = (round % 250) as u8 + 1;
            match next(5) {
                // This device records a new version (it holds what it wrote).
                0 => {
                    let records = folder
                        .index
                        .write(&a, Epoch(0), vec![update(path, content, next(4) == 0)])
                        .unwrap();
                    for r in records {
                        let local = (!r.deleted).then(|| held(&r));
                        folder.set_local(&id, &mut map, &mut batch, r.path.clone(), local);
                    }
                }
                // Another device's version arrives (concurrent with ours now and then).
                1 | 2 => {
                    other
                        .write(&b, Epoch(0), vec![update(path, content, false)])
                        .unwrap();
                    let changes = other.take_local_changes();
                    folder.index.apply(log.view(), changes).unwrap();
                }
                // What the index wants is written here.
                3 => {
                    if let Some(state) = folder.index.get(path) {
                        let local = (!state.winner.deleted).then(|| held(&state.winner));
                        folder.set_local(&id, &mut map, &mut batch, path.clone(), local);
                    }
                }
                // The file is removed here.
                _ => folder.set_local(&id, &mut map, &mut batch, path.clone(), None),
            }
            // Asked after most changes, not all: the kept survey catches up on several.
            if next(3) > 0 {
                let [kept, walked] = both(&mut folder);
                assert_eq!(kept, walked, "round {round}");
            }
        }
        let [kept, walked] = both(&mut folder);
        assert_eq!(kept, walked);
        assert!(!kept.0.is_empty() && !kept.2.is_empty(), "{kept:?}");
        // The shared ignore rules on disk changed: walked whole, the ignored paths left out.
        std::fs::create_dir(dir.path().join(".meshsync")).unwrap();
        std::fs::write(dir.path().join(IGNORE_FILE), "d1/\n").unwrap();
        let [kept, walked] = both(&mut folder);
        assert_eq!(kept, walked);
        assert!(
            kept.0.iter().all(|(p, _)| !p.starts_with("d1/")),
            "{kept:?}"
        );

        // Saved, and taken up by a start (the folder's survey forgotten): the same figures,
        // and changes of the index and of local files since are counted on top of it.
        let mut saved = Batch::default();
        folder.save_survey(&id, &mut saved);
        let bytes = saved.surveys.pop().expect("saved").1;
        let mut again = Batch::default();
        folder.save_survey(&id, &mut again);
        assert!(again.surveys.is_empty(), "unchanged: not saved again");
        folder.surveyed = None;
        folder.resume_survey(&bytes);
        let [kept, walked] = both(&mut folder);
        assert_eq!(kept, walked);
        folder.surveyed = None;
        folder.resume_survey(&bytes);
        other
            .write(&b, Epoch(0), vec![update("d2/new", 9, false)])
            .unwrap();
        folder
            .index
            .apply(log.view(), other.take_local_changes())
            .unwrap();
        folder.set_local(&id, &mut map, &mut batch, paths[2].clone(), None);
        let [kept, walked] = both(&mut folder);
        assert_eq!(kept, walked);
        assert!(kept.0.iter().any(|(p, _)| p == "d2/new"), "{kept:?}");
        folder.save_survey(&id, &mut again);
        assert_eq!(again.surveys.len(), 1, "changed: saved again");
        // One that does not decode is left: the next survey walks.
        folder.surveyed = None;
        folder.resume_survey(b"\xff\xff not a survey");
        assert!(folder.surveyed.is_none());
    }
}
