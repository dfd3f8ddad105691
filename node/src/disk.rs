//! The one door to a synced folder's files: every read, write, create, rename, delete, chmod
//! and symlink of a synced path goes through a [`FolderRoot`], which cannot leave the folder.
//!
//! Paths are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` from a descriptor of the folder itself: no `..`, no absolute path,
//! and no symlink in any component is followed — a symlink (or a file) where a parent folder
//! should be makes the operation fail with [`DiskError::Blocked`] instead of writing through
//! it. The last component is then handled relative to its parent's descriptor with
//! `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, so a symlink is only ever read as a link. Temp files
//! are created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`).
//!
//! Paths are relative, `/`-separated, as in the index (`docs/a.txt`).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// `len` bytes of `file` from `offset`, read straight into a new buffer (not zeroed first: a
/// chunk served in the clear is read once and sent).
pub fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        if rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    buf.truncate(len); // the allocator may have given more room than asked, and it was read
    Ok(buf)
}

/// Why an operation on a synced path failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0:?} is not a path inside the folder")]
    BadPath(String),
    /// A component that must be a folder is a symlink or a file on this device.
    #[error("{path}: {parent} is a symlink or a file on this device, not a folder; nothing is written through it")]
    Blocked { path: String, parent: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl DiskError {
    /// Whether the path (or a parent) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DiskError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn io(path: &str, source: impl Into<std::io::Error>) -> DiskError {
    DiskError::Io {
        path: path.to_string(),
        source: source.into(),
    }
}

/// What is at a path (not following a link there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A socket, device or fifo: never synced.
    Other,
}

/// The metadata of a path, as `lstat` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub len: u64,
    pub mtime_ns: i64,
    pub ino: u64,
    /// Permission bits only (`0o777`).
    pub mode: u32,
}

impl Entry {
    // `Stat`'s field types differ between targets: the casts are no-ops on some only.
    #[allow(clippy::unnecessary_cast)]
    fn of(stat: &rustix::fs::Stat) -> Entry {
        let kind = match rustix::fs::FileType::from_raw_mode(stat.st_mode as _) {
            rustix::fs::FileType::RegularFile => Kind::File,
            rustix::fs::FileType::Directory => Kind::Dir,
            rustix::fs::FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Entry {
            kind,
            len: stat.st_size as u64,
            mtime_ns: (stat.st_mtime as i64) * 1_000_000_000 + stat.st_mtime_nsec as i64,
            ino: stat.st_ino as u64,
            mode: stat.st_mode as u32 & 0o777,
        }
    }

    /// The metadata of an open file.
    pub fn of_file(file: &File) -> Result<Entry, DiskError> {
        rustix::fs::fstat(file)
            .map(|stat| Entry::of(&stat))
            .map_err(|e| io("an open file", e))
    }
}

/// A synced folder, opened once; every synced-path operation goes through it.
#[derive(Debug)]
pub struct FolderRoot {
    path: PathBuf,
    dir: OwnedFd,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Splits `rel` into its parent (`""` for the root) and its last component, checking that it
/// is a plain relative path.
fn split(rel: &str) -> Result<(&str, &str), DiskError> {
    let valid = !rel.is_empty()
        && !rel.contains('\0')
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !valid {
        return Err(DiskError::BadPath(rel.to_string()));
    }
    Ok(match rel.rfind('/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => ("", rel),
    })
}

impl FolderRoot {
    /// Opens the folder at `path` (which must be a real folder, not a link to one).
    pub fn open(path: &Path) -> Result<FolderRoot, DiskError> {
        let shown = path.display().to_string();
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(&shown, e))?;
        Ok(FolderRoot {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The folder's path (for messages and for what must name it, like a watcher).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the folder `rel` (`""`: the root) without following any symlink.
    fn open_dir(&self, rel: &str, full: &str) -> Result<OwnedFd, DiskError> {
        if rel.is_empty() {
            return rustix::io::dup(&self.dir).map_err(|e| io(full, e));
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::openat2(&self.dir, rel, flags, Mode::empty(), RESOLVE).map_err(|e| {
            match e {
                // A symlink (ELOOP) or a file (ENOTDIR) where a folder should be.
                rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV => {
                    DiskError::Blocked {
                        path: full.to_string(),
                        parent: self.blocking_component(rel),
                    }
                }
                e => io(full, e),
            }
        })
    }

    /// The first component of `rel` that is not a real folder here (for messages).
    fn blocking_component(&self, rel: &str) -> String {
        let mut prefix = String::new();
        for component in rel.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            match self.entry(&prefix) {
                Ok(Some(e)) if e.kind == Kind::Dir => {}
                _ => return prefix,
            }
        }
        rel.to_string()
    }

    /// The parent folder of `rel` (opened, no symlink followed) and `rel`'s last component.
    fn parent<'a>(&self, rel: &'a str) -> Result<(OwnedFd, &'a str), DiskError> {
        let (parent, name) = split(rel)?;
        Ok((self.open_dir(parent, rel)?, name))
    }

    /// What is at `rel`, not following a link there; `None` if nothing is (or a parent is
    /// missing).
    pub fn entry(&self, rel: &str) -> Result<Option<Entry>, DiskError> {
        let (dir, name) = match self.parent(rel) {
            Ok(found) => found,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Entry::of(&stat))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io(rel, e)),
        }
    }

    /// Opens the regular file `rel` for reading (a symlink anywhere on the way is refused).
    pub fn open_read(&self, rel: &str) -> Result<File, DiskError> {
        split(rel)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&self.dir, rel, flags, Mode::empty(), RESOLVE)
            .map_err(|e| io(rel, e))?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `rel` for writing (no link followed, not created).
    pub fn open_write(&self, rel: &str) -> Result<File, DiskError> {
        split(rel)?;
        let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&self.dir, rel, flags, Mode::empty(), RESOLVE)
            .map_err(|e| io(rel, e))?;
        Ok(File::from(fd))
    }

    /// Like [`FolderRoot::open_write`], for writes that bypass the page cache (`O_DIRECT`:
    /// block-aligned offsets, lengths and memory). A file system without it refuses.
    pub fn open_write_direct(&self, rel: &str) -> Result<File, DiskError> {
        split(rel)?;
        let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::DIRECT;
        let fd = rustix::fs::openat2(&self.dir, rel, flags, Mode::empty(), RESOLVE)
            .map_err(|e| io(rel, e))?;
        Ok(File::from(fd))
    }

    /// Creates the new file `rel` for writing, exclusively (fails if anything is there), mode
    /// 0600 until its owner sets the record's mode.
    pub fn create_new(&self, rel: &str) -> Result<File, DiskError> {
        let (dir, name) = self.parent(rel)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| io(rel, e))?;
        Ok(File::from(fd))
    }

    /// Like [`FolderRoot::create_new`], after removing a file already at `rel` (a leftover of
    /// an earlier attempt under the same temp name) and making its missing parents: one
    /// lookup of the parent when it is there.
    pub fn create_fresh(&self, rel: &str) -> Result<File, DiskError> {
        let (dir, name) = match self.parent(rel) {
            Err(e) if e.is_not_found() => {
                self.create_dir_all(parent_of(rel))?;
                self.parent(rel)?
            }
            found => found?,
        };
        let _ = rustix::fs::unlinkat(&dir, name, AtFlags::empty());
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| io(rel, e))?;
        Ok(File::from(fd))
    }

    /// Appends `bytes` to the regular file `rel`, creating it (mode 0644) if missing, and
    /// flushes it.
    pub fn append(&self, rel: &str, bytes: &[u8]) -> Result<(), DiskError> {
        use std::io::Write;
        split(rel)?;
        let flags =
            OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&self.dir, rel, flags, Mode::from_raw_mode(0o644), RESOLVE)
            .map_err(|e| io(rel, e))?;
        let mut file = File::from(fd);
        file.write_all(bytes).map_err(|e| io(rel, e))?;
        file.sync_all().map_err(|e| io(rel, e))
    }

    /// Makes the folder `rel` and every missing parent (mode 0755). A symlink or a file where
    /// a folder should be is [`DiskError::Blocked`], never replaced or followed.
    pub fn create_dir_all(&self, rel: &str) -> Result<(), DiskError> {
        if rel.is_empty() {
            return Ok(());
        }
        split(rel)?;
        match self.open_dir(rel, rel) {
            Ok(_) => return Ok(()), // there already: the usual case, one lookup
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let mut prefix = String::new();
        for component in rel.split('/') {
            let parent = prefix.clone();
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            let dir = self.open_dir(&parent, rel)?;
            match rustix::fs::mkdirat(&dir, component, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io(rel, e)),
            }
        }
        // What is there now must be a real folder.
        self.open_dir(rel, rel).map(drop)
    }

    /// Renames `from` to `to` (both inside the folder), replacing a file at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), DiskError> {
        let (from_dir, from_name) = self.parent(from)?;
        if parent_of(from) == parent_of(to) {
            // A temp file renamed into place: one lookup of the folder they share.
            let (_, to_name) = split(to)?;
            return rustix::fs::renameat(&from_dir, from_name, &from_dir, to_name)
                .map_err(|e| io(to, e));
        }
        let (to_dir, to_name) = self.parent(to)?;
        rustix::fs::renameat(&from_dir, from_name, &to_dir, to_name).map_err(|e| io(to, e))
    }

    /// Renames `from` to `to` only if nothing is at `to` (a conflict copy never replaces).
    pub fn rename_new(&self, from: &str, to: &str) -> Result<(), DiskError> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        rustix::fs::renameat_with(
            &from_dir,
            from_name,
            &to_dir,
            to_name,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| io(to, e))
    }

    /// Removes the file or link `rel`.
    pub fn remove_file(&self, rel: &str) -> Result<(), DiskError> {
        let (dir, name) = self.parent(rel)?;
        rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| io(rel, e))
    }

    /// Removes the empty folder `rel`.
    pub fn remove_dir(&self, rel: &str) -> Result<(), DiskError> {
        let (dir, name) = self.parent(rel)?;
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| io(rel, e))
    }

    /// Creates the symlink `rel` pointing at `target` (which is never followed by meshsync).
    pub fn symlink(&self, target: &[u8], rel: &str) -> Result<(), DiskError> {
        let (dir, name) = self.parent(rel)?;
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::OsStr::from_bytes(target);
        rustix::fs::symlinkat(target, &dir, name).map_err(|e| io(rel, e))
    }

    /// The target of the symlink `rel`.
    pub fn read_link(&self, rel: &str) -> Result<Vec<u8>, DiskError> {
        let (dir, name) = self.parent(rel)?;
        let target = rustix::fs::readlinkat(&dir, name, Vec::new()).map_err(|e| io(rel, e))?;
        Ok(target.into_bytes())
    }

    /// Flushes the folder `rel`'s entries (after renames into it).
    pub fn sync_dir(&self, rel: &str) -> Result<(), DiskError> {
        let dir = self.open_dir(rel, rel)?;
        rustix::fs::fsync(&dir).map_err(|e| io(rel, e))
    }

    /// Flushes the whole file system the folder is on (one `syncfs` for many small files).
    pub fn sync_all(&self) -> Result<(), DiskError> {
        rustix::fs::syncfs(self.dir.as_fd()).map_err(|e| io(&self.path.display().to_string(), e))
    }

    /// The names in the folder `rel` and what kind each is, from the directory listing alone
    /// (no `stat` per entry, unless the file system does not say).
    pub fn read_dir_kinds(&self, rel: &str) -> Result<Vec<(String, Kind)>, DiskError> {
        let dir = self.open_dir(rel, rel)?;
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir).map_err(|e| io(rel, e))? {
            let entry = entry.map_err(|e| io(rel, e))?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                rustix::fs::FileType::RegularFile => Kind::File,
                rustix::fs::FileType::Directory => Kind::Dir,
                rustix::fs::FileType::Symlink => Kind::Symlink,
                rustix::fs::FileType::Unknown => {
                    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(stat) => Entry::of(&stat).kind,
                        Err(_) => continue,
                    }
                }
                _ => Kind::Other,
            };
            out.push((name.to_string(), kind));
        }
        Ok(out)
    }

    /// The names in the folder `rel` (`""`: the root), not following links.
    pub fn read_dir(&self, rel: &str) -> Result<Vec<(String, Entry)>, DiskError> {
        self.open_folder(rel)?.list()
    }

    /// Opens the folder `rel` (`""`: the root) once, no link followed on the way, to look at
    /// and open what it holds by name (see [`OpenFolder`]).
    pub fn open_folder(&self, rel: &str) -> Result<OpenFolder, DiskError> {
        Ok(OpenFolder {
            rel: rel.to_string(),
            dir: self.open_dir(rel, rel)?,
        })
    }
}

/// A folder inside a [`FolderRoot`], opened once: its entries are listed, looked at and
/// opened by name — one component, relative to its descriptor, never following a link — so
/// a walk does not resolve every file's path from the root again (twice per file: to read it
/// and to check it is still the file that was read).
#[derive(Debug)]
pub struct OpenFolder {
    rel: String,
    dir: OwnedFd,
}

impl OpenFolder {
    /// `name`'s path in the folder (for messages); `name` must be one plain component.
    fn path_of(&self, name: &str) -> Result<String, DiskError> {
        let rel = match self.rel.is_empty() {
            true => name.to_string(),
            false => format!("{}/{name}", self.rel),
        };
        match split(name) {
            Ok(("", _)) => Ok(rel),
            _ => Err(DiskError::BadPath(rel)),
        }
    }

    /// The names it holds and what each is, not following links.
    pub fn list(&self) -> Result<Vec<(String, Entry)>, DiskError> {
        let rel = &self.rel;
        let mut out = Vec::new();
        let listing = rustix::fs::Dir::read_from(&self.dir).map_err(|e| io(rel, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io(rel, e))?;
            let Ok(name) = entry.file_name().to_str() else {
                continue; // not UTF-8: cannot be a record's path
            };
            if name == "." || name == ".." {
                continue;
            }
            match rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => out.push((name.to_string(), Entry::of(&stat))),
                Err(rustix::io::Errno::NOENT) => {} // gone meanwhile
                Err(e) => return Err(io(rel, e)),
            }
        }
        Ok(out)
    }

    /// What is at `name` in it, not following a link; `None` if nothing is.
    pub fn entry(&self, name: &str) -> Result<Option<Entry>, DiskError> {
        let path = self.path_of(name)?;
        match rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Entry::of(&stat))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Opens the regular file `name` in it for reading (a link there is refused; a fifo
    /// swapped in does not block).
    pub fn open_read(&self, name: &str) -> Result<File, DiskError> {
        let path = self.path_of(name)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd =
            rustix::fs::openat(&self.dir, name, flags, Mode::empty()).map_err(|e| io(&path, e))?;
        Ok(File::from(fd))
    }

    /// The target of the symlink `name` in it.
    pub fn read_link(&self, name: &str) -> Result<Vec<u8>, DiskError> {
        let path = self.path_of(name)?;
        let target =
            rustix::fs::readlinkat(&self.dir, name, Vec::new()).map_err(|e| io(&path, e))?;
        Ok(target.into_bytes())
    }
}

/// Sets the permission bits of an open file: `mode & 0o777` (never setuid, setgid or sticky
/// from a record).
pub fn set_mode(file: &File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
}

/// Starts writing `len` bytes of `file` from `offset` to disk without waiting (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so a later `fsync` of a big file finds most of
/// it written already. Durability still comes from that `fsync` only; a failure here is
/// ignored (the `fsync` reports what matters).
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor `file` owns for the duration of the call; it
    // reads and writes no memory of this process.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Reserves `len` bytes of disk for `file` (Linux `fallocate`, size unchanged), so the writes
/// that fill it find their blocks allocated. Best effort: a file system that cannot is left to
/// allocate as it writes.
pub fn preallocate(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    let Ok(len) = i64::try_from(len) else { return };
    if len == 0 {
        return;
    }
    // SAFETY: a plain syscall on a descriptor `file` owns for the duration of the call; it
    // reads and writes no memory of this process.
    unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len);
    }
}

/// `rel`'s parent (`""` for the root).
pub fn parent_of(rel: &str) -> &str {
    rel.rfind('/').map_or("", |i| &rel[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, FolderRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("f")).unwrap();
        let root = FolderRoot::open(&dir.path().join("f")).unwrap();
        (dir, root)
    }

    #[test]
    fn read_at_reads_exactly_the_range_and_not_past_the_end() {
        let (_dir, root) = root();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        root.append("x", &bytes).unwrap();
        let file = root.open_read("x").unwrap();
        for (offset, len) in [(0, 0), (0, 1), (7, 65_536), (150_000, 50_000)] {
            let read = read_at(&file, offset as u64, len).unwrap();
            assert_eq!(read, &bytes[offset..offset + len]);
        }
        let past = read_at(&file, 150_000, 50_001).unwrap_err();
        assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_open_folder_takes_one_plain_name_and_reads_a_link_as_a_link() {
        let (dir, root) = root();
        std::fs::create_dir(dir.path().join("f/d")).unwrap();
        std::fs::write(dir.path().join("f/d/a"), b"inside").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), dir.path().join("f/d/L")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("f/up")).unwrap();
        let d = root.open_folder("d").unwrap();
        let mut names: Vec<String> = d.list().unwrap().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, ["L", "a"]);
        assert_eq!(
            std::io::read_to_string(d.open_read("a").unwrap()).unwrap(),
            "inside"
        );
        assert!(d.open_read("L").is_err(), "a link is not followed");
        assert_eq!(d.entry("L").unwrap().unwrap().kind, Kind::Symlink);
        assert_eq!(
            d.read_link("L").unwrap(),
            dir.path().join("secret").as_os_str().as_encoded_bytes()
        );
        for bad in ["..", "../secret", "a/b", "", "."] {
            assert!(
                matches!(d.open_read(bad), Err(DiskError::BadPath(_))),
                "{bad:?}"
            );
            assert!(
                matches!(d.entry(bad), Err(DiskError::BadPath(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            root.open_folder("up"),
            Err(DiskError::Blocked { .. })
        ));
    }

    #[test]
    fn nothing_leaves_the_folder_through_a_symlink_or_dot_dot() {
        let (dir, root) = root();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("f/L")).unwrap();
        std::os::unix::fs::symlink("..", dir.path().join("f/up")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("f/slash")).unwrap();
        for rel in ["L/x.txt", "up/outside/x.txt", "slash/tmp/x.txt"] {
            let refused = root.create_new(rel).unwrap_err();
            assert!(
                matches!(refused, DiskError::Blocked { .. }),
                "{rel}: {refused}"
            );
            assert!(root.create_dir_all(rel).is_err(), "{rel}");
            assert!(root.create_fresh(rel).is_err(), "{rel}");
            assert!(root.open_read(rel).is_err(), "{rel}");
            assert!(root.remove_file(rel).is_err(), "{rel}");
        }
        // A folder that is there already is looked up in one step: a link there is not one.
        for rel in ["L", "up", "slash", "L/x", "up/outside"] {
            assert!(
                matches!(root.create_dir_all(rel), Err(DiskError::Blocked { .. })),
                "{rel}"
            );
        }
        // A rename within one folder onto a link's name replaces the link, never its target.
        std::os::unix::fs::symlink(&outside, dir.path().join("f/L2")).unwrap();
        root.create_new("t").unwrap();
        root.rename("t", "L2").unwrap();
        assert_eq!(root.entry("L2").unwrap().unwrap().kind, Kind::File);
        for rel in ["../x", "/etc/passwd", "a/../b", "", "a//b", "./a"] {
            assert!(
                matches!(root.create_new(rel), Err(DiskError::BadPath(_))),
                "{rel}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
        // A link is read as a link, never followed.
        assert_eq!(root.entry("L").unwrap().unwrap().kind, Kind::Symlink);
        assert!(root.open_read("L").is_err());
        assert_eq!(
            root.read_link("L").unwrap(),
            outside.as_os_str().as_encoded_bytes()
        );
    }

    #[test]
    fn a_file_where_a_folder_should_be_blocks_and_temp_files_are_exclusive() {
        let (_dir, root) = root();
        root.create_new("a").unwrap();
        let blocked = root.create_dir_all("a/b").unwrap_err();
        assert!(
            matches!(&blocked, DiskError::Blocked { parent, .. } if parent == "a"),
            "{blocked}"
        );
        assert!(root.create_new("a").is_err(), "exclusive");
        std::io::Write::write_all(&mut root.open_write("a").unwrap(), b"left over").unwrap();
        root.create_fresh("a").unwrap();
        root.create_fresh("new/deeper/t").unwrap();
        assert_eq!(root.entry("new/deeper").unwrap().unwrap().kind, Kind::Dir);
        assert_eq!(
            root.entry("a").unwrap().unwrap().len,
            0,
            "fresh: the leftover is gone"
        );
        root.create_dir_all("d/e").unwrap();
        let mut f = root.create_new("d/e/t").unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        set_mode(&f, 0o4755).unwrap();
        assert_eq!(
            root.entry("d/e/t").unwrap().unwrap().mode,
            0o755,
            "no setuid from a record"
        );
        root.rename("d/e/t", "d/t").unwrap();
        assert!(
            root.rename_new("a", "d/t").is_err(),
            "a conflict copy never replaces"
        );
        let names: Vec<String> = root
            .read_dir("d")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names.len(), 2);
        let mut kinds = root.read_dir_kinds("d").unwrap();
        kinds.sort();
        assert_eq!(
            kinds,
            [("e".to_string(), Kind::Dir), ("t".to_string(), Kind::File)]
        );
        root.remove_file("d/t").unwrap();
        root.remove_dir("d/e").unwrap();
        assert!(root.entry("d/e").unwrap().is_none());
        assert!(root.entry("missing/x").unwrap().is_none());
    }
}
