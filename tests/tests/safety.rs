//! Nothing a peer sends may escape the folder or lose a file, even in an honest race: a
//! symlink on one device and a real folder of the same name on the other (which was offline).
//! Variants: a link out of the folder, `..`, `/`, and a dangling link. Real daemons on
//! loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshsync_tests::{alice_and_bob, meshsync_ok, wait_until, Daemon};

const LONG: Duration = Duration::from_secs(60);

/// Every entry under `root` (links not followed): path → "dir", "link -> target" or the
/// file's content.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let kind = entry.file_type().unwrap();
            let what = if kind.is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if kind.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else {
                String::from_utf8_lossy(&std::fs::read(&path).unwrap()).to_string()
            };
            out.insert(rel, what);
        }
    }
    out
}

/// The synced part of a folder's tree (the daemon's own files left out).
fn synced(root: &Path) -> BTreeMap<String, String> {
    tree(root)
        .into_iter()
        .filter(|(rel, _)| !rel.split('/').any(|c| c.starts_with(".meshsync")))
        .collect()
}

struct Two {
    _dir: tempfile::TempDir,
    root: PathBuf,
    a: Daemon,
    hb: PathBuf,
    fa: PathBuf,
    fb: PathBuf,
}

fn two() -> Two {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let joined = alice_and_bob(&root);
    Two {
        _dir: dir,
        root,
        a: joined.a,
        hb: joined.hb,
        fa: joined.fa,
        fb: joined.fb,
    }
}

#[test]
fn a_symlink_here_and_a_folder_there_write_nothing_outside_and_lose_nothing() {
    let t = two();
    let outside = t.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let before_root: Vec<String> = std::fs::read_dir(&t.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    // A: links of every kind; B (not running yet): real folders of the same names, each
    // holding a file.
    let links: [(&str, PathBuf); 4] = [
        ("out", outside.clone()),
        ("up", PathBuf::from("..")),
        ("slash", PathBuf::from("/")),
        ("dangling", t.root.join("nothing-here")),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, t.fa.join(name)).unwrap();
    }
    meshsync_ok(&t.a.home, &["scan"]);
    for (name, _) in &links {
        std::fs::create_dir_all(t.fb.join(name)).unwrap();
        std::fs::write(t.fb.join(name).join("x.txt"), format!("bob's {name}")).unwrap();
    }
    let b = Daemon::start(&t.hb);
    meshsync_ok(
        &b.home,
        &["folder", "add", t.fb.to_str().unwrap(), "--id", "docs"],
    );

    // Both sides converge on the same tree...
    let converged = wait_until(LONG, || {
        let (sa, sb) = (synced(&t.fa), synced(&t.fb));
        sa == sb && sa.values().filter(|v| v.starts_with("bob's")).count() == 4
    });
    let (sa, sb) = (synced(&t.fa), synced(&t.fb));
    assert!(
        converged,
        "A: {sa:#?}\nB: {sb:#?}\nA log:\n{}",
        meshsync_tests::log_of(&t.a.home)
    );
    // ...where every link is still there (as the link or a conflict copy of it) and every one
    // of B's files is still there (in the folder or in a conflict copy of it).
    for (name, target) in &links {
        let link = format!("link -> {}", target.display());
        assert!(
            sa.values().any(|v| *v == link),
            "{name}'s link lost: {sa:#?}"
        );
        let file = format!("bob's {name}");
        let at: Vec<&String> = sa
            .iter()
            .filter(|(_, v)| **v == file)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(at.len(), 1, "{file}: {sa:#?}");
        assert!(at[0].ends_with("/x.txt"), "{at:?}");
    }
    // Conflict copies carry a real date.
    for path in sa.keys().filter(|p| p.contains(".sync-conflict-")) {
        assert!(!path.contains(".sync-conflict-1970"), "{path}");
    }
    // Nothing was written outside either folder, and no temp file is left behind.
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let after_root: Vec<String> = std::fs::read_dir(&t.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(before_root.len(), after_root.len(), "{after_root:?}");
    assert!(!Path::new("/x.txt").exists());
    no_temp_files_in(&[&t.fa, &t.fb]);
}

#[test]
fn a_link_that_replaces_a_folder_while_a_file_is_on_its_way_into_it_writes_nothing_outside() {
    let t = two();
    let outside = t.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let b = Daemon::start(&t.hb);
    meshsync_ok(
        &b.home,
        &["folder", "add", t.fb.to_str().unwrap(), "--id", "docs"],
    );
    std::fs::create_dir_all(t.fa.join("d")).unwrap();
    std::fs::write(t.fa.join("d/small.txt"), "alice's small file").unwrap();
    meshsync_ok(&t.a.home, &["scan"]);
    assert!(wait_until(LONG, || t.fb.join("d/small.txt").exists()));

    // A big file on its way into d on B; once its temp file is there, B's user moves d aside
    // and puts a link out of the folder in its place.
    let big = meshsync_tests::random(192 << 20, 3);
    std::fs::write(t.fa.join("d/big.bin"), &big).unwrap();
    meshsync_ok(&t.a.home, &["scan"]);
    let in_flight = wait_until(LONG, || {
        std::fs::read_dir(t.fb.join("d"))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(".meshsync-tmp-"))
            })
            .unwrap_or(false)
    });
    assert!(
        in_flight,
        "the transfer was never seen in flight; B has {:?}\nA log:\n{}\nB log:\n{}",
        tree(&t.fb).keys().collect::<Vec<_>>(),
        meshsync_tests::log_of(&t.a.home),
        meshsync_tests::log_of(&b.home)
    );
    std::fs::rename(t.fb.join("d"), t.fb.join("d.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, t.fb.join("d")).unwrap();
    meshsync_ok(&b.home, &["scan"]);

    // Both converge; nothing went outside; the big file, the small one and the link are all
    // still there (in place or as conflict copies); no temp file is left anywhere.
    let converged = wait_until(LONG, || {
        let (sa, sb) = (synced(&t.fa), synced(&t.fb));
        sa == sb
            && sa.values().filter(|v| v.starts_with("link -> ")).count() == 1
            && sa.values().any(|v| v == "alice's small file")
            && tree_has(&t.fb, &big)
    });
    let (sa, sb) = (synced(&t.fa), synced(&t.fb));
    let short = |m: &BTreeMap<String, String>| -> Vec<(String, usize)> {
        m.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    };
    assert!(
        converged,
        "A: {:#?}\nB: {:#?}\nB log:\n{}",
        short(&sa),
        short(&sb),
        meshsync_tests::log_of(&b.home)
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // The transfer into the moved folder ends by removing its temp file (it may still be
    // receiving when the folders already agree).
    let temps = || {
        [&t.fa, &t.fb]
            .iter()
            .flat_map(|f| tree(f).into_keys())
            .filter(|p| p.contains(".meshsync-tmp-"))
            .count()
    };
    wait_until(LONG, || temps() == 0);
    no_temp_files_in(&[&t.fa, &t.fb]);
}

/// Asserts no `.meshsync-tmp-*` file is left anywhere under `folders`.
fn no_temp_files_in(folders: &[&Path]) {
    for folder in folders {
        let temps: Vec<String> = tree(folder)
            .into_keys()
            .filter(|p| p.contains(".meshsync-tmp-"))
            .collect();
        assert!(temps.is_empty(), "{temps:?}");
    }
}

/// Whether some file under `root` (links not followed) holds exactly `content`.
fn tree_has(root: &Path, content: &[u8]) -> bool {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if entry
                .file_name()
                .to_string_lossy()
                .contains(".meshsync-tmp-")
            {
                continue; // a file still being assembled is not the file
            } else if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file()
                && entry
                    .metadata()
                    .is_ok_and(|m| m.len() == content.len() as u64)
                && std::fs::read(entry.path()).is_ok_and(|d| d == content)
            {
                return true;
            }
        }
    }
    false
}
