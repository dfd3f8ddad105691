//! Which paths of a folder are synced. Two questions, each answered in one place:
//!
//! - [`is_own_file`]: is this one of the daemon's own files (`.meshsync*`)? Those are never
//!   synced, except the folder's shared ignore rules at [`IGNORE_FILE`].
//! - [`Rules::ignores`]: does the folder's gitignore-syntax rules exclude it? The shared rules
//!   ([`IGNORE_FILE`], synced like a file so every device agrees) then this device's overrides
//!   ([`LOCAL_IGNORE_FILE`], never synced, may re-include with `!pattern`). The shared rules
//!   file itself is never ignored.

use std::path::Path;

use anyhow::Context;
use meshsync_crdt::{FileKind, FileRecord, FolderId};

use super::Device;
use crate::control::IgnoreList;

/// The folder's ignore rules, shared with every device (synced like a file).
pub const IGNORE_FILE: &str = ".meshsync/ignore";
/// Rules for this device only (never synced).
pub const LOCAL_IGNORE_FILE: &str = ".meshsync/ignore.local";

/// Whether `rel` (a path relative to the folder) is one of the daemon's own files, never
/// synced: anything under a `.meshsync*` name, except the shared rules in [`IGNORE_FILE`].
pub fn is_own_file(rel: &str) -> bool {
    rel != IGNORE_FILE
        && rel
            .split('/')
            .any(|component| component.starts_with(".meshsync"))
}

/// A folder's ignore rules as they stand on disk now.
pub struct Rules(ignore::gitignore::Gitignore);

impl Rules {
    /// Reads the shared rules, then this device's overrides. Bad lines are logged and skipped.
    pub fn load(root: &Path) -> Rules {
        let mut builder = ignore::gitignore::GitignoreBuilder::new(root);
        for file in [IGNORE_FILE, LOCAL_IGNORE_FILE] {
            let path = root.join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for line in text.lines() {
                if let Err(error) = builder.add_line(Some(path.clone()), line) {
                    tracing::warn!(file = %path.display(), %error, "ignore rule skipped");
                }
            }
        }
        Rules(builder.build().unwrap_or_else(|error| {
            tracing::warn!(%error, "ignore rules unusable; ignoring nothing");
            ignore::gitignore::Gitignore::empty()
        }))
    }

    /// Whether the rules exclude `rel` (a directory if `is_dir`): neither recorded, written
    /// nor deleted.
    pub fn ignores(&self, rel: &str, is_dir: bool) -> bool {
        rel != IGNORE_FILE && self.0.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }

    /// [`Rules::ignores`] for the path of an index record.
    pub fn ignores_record(&self, rel: &str, record: &FileRecord) -> bool {
        self.ignores(rel, record.kind == FileKind::Directory)
    }
}

impl Device {
    /// Adds ignore patterns to a folder (shared, or this device's overrides) and returns the
    /// folder's rules as they now stand.
    pub fn add_ignore(
        &self,
        id: &FolderId,
        patterns: &[String],
        local: bool,
    ) -> anyhow::Result<IgnoreList> {
        use std::io::Write;
        let f = self.folder(id)?;
        for pattern in patterns {
            ignore::gitignore::GitignoreBuilder::new(&f.path)
                .add_line(None, pattern)
                .with_context(|| format!("{pattern:?} is not a valid ignore pattern"))?;
        }
        let file = f.path.join(if local {
            LOCAL_IGNORE_FILE
        } else {
            IGNORE_FILE
        });
        if !patterns.is_empty() {
            std::fs::create_dir_all(f.path.join(".meshsync"))?;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?;
            for pattern in patterns {
                writeln!(out, "{pattern}")?;
            }
            out.sync_all()?;
        }
        let read = |name: &str| -> Vec<String> {
            std::fs::read_to_string(f.path.join(name))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        };
        Ok(IgnoreList {
            folder: id.to_string(),
            shared: read(IGNORE_FILE),
            local: read(LOCAL_IGNORE_FILE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_files_are_every_meshsync_name_but_the_shared_rules() {
        assert!(is_own_file(".meshsync-folder"));
        assert!(is_own_file(".meshsync/ignore.local"));
        assert!(is_own_file("a/.meshsync-tmp-1-2-x"));
        assert!(is_own_file(".meshsync"));
        assert!(!is_own_file(IGNORE_FILE));
        assert!(!is_own_file("docs/meshsync.txt"));
    }

    #[test]
    fn shared_rules_then_local_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".meshsync")).unwrap();
        std::fs::write(dir.path().join(IGNORE_FILE), "*.log\nbuild/\n").unwrap();
        std::fs::write(dir.path().join(LOCAL_IGNORE_FILE), "!keep.log\n").unwrap();
        let rules = Rules::load(dir.path());
        assert!(rules.ignores("a.log", false));
        assert!(rules.ignores("sub/b.log", false));
        assert!(!rules.ignores("keep.log", false));
        assert!(rules.ignores("build", true));
        assert!(rules.ignores("build/x.o", false));
        assert!(!rules.ignores("a.txt", false));
        // The rules file is always synced, whatever the rules say.
        std::fs::write(dir.path().join(IGNORE_FILE), ".meshsync/\n").unwrap();
        assert!(!Rules::load(dir.path()).ignores(IGNORE_FILE, false));
    }
}
