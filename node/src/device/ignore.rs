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
use crate::disk::{FolderRoot, Kind};

/// The text of the rules file `rel`, if it is a regular file; capped.
fn read_rules(root: &FolderRoot, rel: &str) -> Option<String> {
    use std::io::Read;
    match root.entry(rel) {
        Ok(Some(e)) if e.kind == Kind::File => {}
        Ok(None) => return None,
        Ok(Some(_)) | Err(_) => {
            tracing::warn!(
                file = rel,
                "ignore rules are not a regular file here; not read"
            );
            return None;
        }
    }
    let mut text = String::new();
    let file = root.open_read(rel).ok()?;
    if file.metadata().ok()?.len() > MAX_IGNORE_BYTES {
        tracing::warn!(
            file = rel,
            "ignore rules larger than {MAX_IGNORE_BYTES} bytes; the rest is not read"
        );
    }
    file.take(MAX_IGNORE_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

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

/// The largest ignore file read (the rest is ignored, with a warning).
pub const MAX_IGNORE_BYTES: u64 = 256 * 1024;

impl Rules {
    /// Reads the shared rules, then this device's overrides, through the folder's door: only
    /// regular files (not a link, a device or a fifo), at most [`MAX_IGNORE_BYTES`] each. Bad
    /// lines are logged and skipped.
    pub fn load(root: &FolderRoot) -> Rules {
        let mut builder = ignore::gitignore::GitignoreBuilder::new(root.path());
        for file in [IGNORE_FILE, LOCAL_IGNORE_FILE] {
            let Some(text) = read_rules(root, file) else {
                continue;
            };
            let source = root.path().join(file);
            for line in text.lines() {
                if let Err(error) = builder.add_line(Some(source.clone()), line) {
                    tracing::warn!(file = %source.display(), %error, "ignore rule skipped");
                }
            }
        }
        Rules(builder.build().unwrap_or_else(|error| {
            tracing::warn!(%error, "ignore rules unusable; ignoring nothing");
            ignore::gitignore::Gitignore::empty()
        }))
    }

    /// [`Rules::load`] for the folder at `path` (no rules if it cannot be opened).
    pub fn load_at(path: &Path) -> Rules {
        match FolderRoot::open(path) {
            Ok(root) => Rules::load(&root),
            Err(_) => Rules(ignore::gitignore::Gitignore::empty()),
        }
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
        let f = self.folder(id)?;
        for pattern in patterns {
            ignore::gitignore::GitignoreBuilder::new(&f.path)
                .add_line(None, pattern)
                .with_context(|| format!("{pattern:?} is not a valid ignore pattern"))?;
        }
        let root = f.root()?;
        let file = if local {
            LOCAL_IGNORE_FILE
        } else {
            IGNORE_FILE
        };
        if !patterns.is_empty() {
            root.create_dir_all(".meshsync")?;
            let text: String = patterns.iter().map(|p| format!("{p}\n")).collect();
            root.append(file, text.as_bytes())?;
        }
        let read = |name: &str| -> Vec<String> {
            read_rules(&root, name)
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
        let rules = Rules::load_at(dir.path());
        assert!(rules.ignores("a.log", false));
        assert!(rules.ignores("sub/b.log", false));
        assert!(!rules.ignores("keep.log", false));
        assert!(rules.ignores("build", true));
        assert!(rules.ignores("build/x.o", false));
        assert!(!rules.ignores("a.txt", false));
        // The rules file is always synced, whatever the rules say.
        std::fs::write(dir.path().join(IGNORE_FILE), ".meshsync/\n").unwrap();
        assert!(!Rules::load_at(dir.path()).ignores(IGNORE_FILE, false));
        // Rules behind a link are not read (it could name anything, e.g. /dev/zero).
        std::fs::remove_file(dir.path().join(IGNORE_FILE)).unwrap();
        std::fs::write(dir.path().join("elsewhere"), "*.txt\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join(IGNORE_FILE))
            .unwrap();
        assert!(!Rules::load_at(dir.path()).ignores("a.txt", false));
    }
}
