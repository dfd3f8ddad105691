//! Two real `meshsync up` daemons on loopback, in separate homes: pairing with an invite code,
//! then files created, modified and deleted on either side arrive on the other, byte for byte.
//! Bad input (garbage code, unknown folder, missing folder) gets a clear error and changes
//! nothing.

use std::path::Path;
use std::time::Duration;

use meshsync_tests::{meshsync, meshsync_ok, same, wait_until, Daemon};

#[test]
fn two_daemons_pair_and_keep_a_folder_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    let (folder_a, folder_b) = (dir.path().join("A"), dir.path().join("B"));
    std::fs::create_dir_all(&folder_a).unwrap();
    std::fs::create_dir_all(&folder_b).unwrap();
    meshsync_ok(&home_a, &["init", "--name", "alice"]);
    meshsync_ok(&home_b, &["init", "--name", "bob"]);

    let a = Daemon::start(&home_a);
    meshsync_ok(
        &home_a,
        &["folder", "add", folder_a.to_str().unwrap(), "--id", "docs"],
    );
    std::fs::write(folder_a.join("hello.txt"), b"hello from a").unwrap();
    std::fs::create_dir_all(folder_a.join("nested/deeper")).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(folder_a.join("nested/deeper/big.bin"), &big).unwrap();
    meshsync_ok(&home_a, &["scan"]);

    // Bad input: a garbage code, an unknown folder, a missing path.
    let out = meshsync(&home_b, &["join", "not-a-code"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a meshsync invite code"));
    let out = meshsync(&home_a, &["scan", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no folder nope"));
    let out = meshsync(
        &home_a,
        &[
            "folder",
            "add",
            dir.path().join("missing").to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // Not writable even for root: a folder of the proc file system.
    let out = meshsync(&home_a, &["folder", "add", "/proc/self"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not writable"), "{err}");
    let folders = meshsync_ok(&home_a, &["folder", "list"]);
    assert_eq!(
        folders.lines().count(),
        1,
        "bad input added nothing: {folders}"
    );

    let invite = meshsync_ok(&home_a, &["invite", "--expires", "10m"]);
    let code = invite.lines().last().unwrap().trim().to_string();
    meshsync_ok(&home_b, &["join", &code]);
    let out = meshsync(&home_b, &["join", &code]);
    assert!(!out.status.success(), "a code works once");

    let b = Daemon::start(&home_b);
    meshsync_ok(
        &home_b,
        &["folder", "add", folder_b.to_str().unwrap(), "--id", "docs"],
    );
    let long = Duration::from_secs(30);
    assert!(wait_until(long, || same(
        &folder_a.join("nested/deeper/big.bin"),
        &folder_b.join("nested/deeper/big.bin")
    )));
    assert!(same(
        &folder_a.join("hello.txt"),
        &folder_b.join("hello.txt")
    ));

    // B edits and adds; A receives.
    std::fs::write(folder_b.join("hello.txt"), b"edited on b").unwrap();
    std::fs::write(folder_b.join("from-b.txt"), b"new on b").unwrap();
    meshsync_ok(&home_b, &["scan"]);
    assert!(wait_until(long, || std::fs::read(
        folder_a.join("hello.txt")
    )
    .ok()
    .as_deref()
        == Some(&b"edited on b"[..])));
    assert!(wait_until(long, || same(
        &folder_a.join("from-b.txt"),
        &folder_b.join("from-b.txt")
    )));

    // A deletes; B follows.
    std::fs::remove_file(folder_a.join("nested/deeper/big.bin")).unwrap();
    meshsync_ok(&home_a, &["scan"]);
    assert!(wait_until(long, || !folder_b
        .join("nested/deeper/big.bin")
        .exists()));

    let status = b.status();
    assert_eq!(status["folders"][0]["id"], "docs");
    assert!(wait_until(long, || b.status()["folders"][0]["in_sync"] == true));
    let peer = &status["peers"][0];
    assert_eq!(peer["name"], "alice");
    assert_eq!(peer["connected"], true);
    assert!(
        peer["bytes_in"].as_u64().unwrap() > 3_000_000,
        "the big file crossed the wire: {peer}"
    );
    // No temp file was left behind.
    let leftovers: Vec<_> = walk(&folder_b)
        .into_iter()
        .filter(|p| p.contains(".meshsync-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(a);
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        out.push(path.display().to_string());
        if path.is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}
