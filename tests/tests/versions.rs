//! Old versions with real daemons on loopback: overwritten and deleted files are listed by
//! `meshsync versions` and brought back by `meshsync restore` — from the device's own store, or
//! from another device or the storage peer — and past the retention, the space they took on
//! the storage peer is given back.

use std::path::Path;
use std::time::Duration;

use meshsync_tests::{
    homes_with_storage, invite, meshsync, meshsync_ok, random, storage_holds_latest, wait_until,
    Daemon,
};

fn versions(home: &Path, path: &Path) -> serde_json::Value {
    serde_json::from_str(&meshsync_ok(
        home,
        &["versions", path.to_str().unwrap(), "--json"],
    ))
    .unwrap()
}

#[test]
fn overwritten_and_deleted_files_can_be_listed_restored_and_finally_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n);
    let (fa, fb) = (home("A"), home("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    let s_addr = homes_with_storage(dir.path(), &["a", "b"]);
    let (v1, v2) = (random(300_000, 1), random(300_000, 2));
    let notes = random(50_000, 3);
    let (big1, big2) = (random(3 << 20, 4), random(3 << 20, 5));
    std::fs::write(fa.join("doc.txt"), &v1).unwrap();
    std::fs::write(fa.join("notes.txt"), &notes).unwrap();
    std::fs::write(fa.join("big.bin"), &big1).unwrap();

    let mut a = Daemon::start(&home("a"));
    meshsync_ok(
        &home("a"),
        &["folder", "add", fa.to_str().unwrap(), "--id", "docs"],
    );
    meshsync_ok(&home("s"), &["join", &invite(&home("a"), "storage")]);
    meshsync_ok(&home("b"), &["join", &invite(&home("a"), "device")]);
    let mut s = Daemon::start_on(&home("s"), &s_addr);
    let mut b = Daemon::start(&home("b"));
    meshsync_ok(
        &home("b"),
        &["folder", "add", fb.to_str().unwrap(), "--id", "docs"],
    );
    let arrived = |name: &str, data: &[u8]| {
        let path = fb.join(name);
        wait_until(Duration::from_secs(30), || {
            std::fs::read(&path).is_ok_and(|d| d == data)
        })
    };
    assert!(arrived("doc.txt", &v1) && arrived("big.bin", &big1));
    assert!(wait_until(
        Duration::from_secs(30),
        || storage_holds_latest(&a.status())
    ));

    // A overwrites two files and deletes one; B follows.
    std::fs::write(fa.join("doc.txt"), &v2).unwrap();
    std::fs::write(fa.join("big.bin"), &big2).unwrap();
    std::fs::remove_file(fa.join("notes.txt")).unwrap();
    meshsync_ok(&home("a"), &["scan"]);
    assert!(arrived("doc.txt", &v2) && arrived("big.bin", &big2));
    assert!(wait_until(Duration::from_secs(30), || !fb
        .join("notes.txt")
        .exists()));
    assert!(wait_until(
        Duration::from_secs(30),
        || storage_holds_latest(&a.status())
    ));

    // B kept what it replaced, in its own store; A's own edits are listed too.
    let on_b = versions(&home("b"), &fb.join("doc.txt"));
    assert_eq!(on_b["versions"][0]["number"], 1, "{on_b}");
    assert_eq!(on_b["versions"][0]["size"], 300_000);
    assert_eq!(on_b["versions"][0]["stored_here"], true, "{on_b}");
    let on_a = versions(&home("a"), &fa.join("doc.txt"));
    assert_eq!(on_a["versions"][0]["size"], 300_000, "{on_a}");
    let deleted = versions(&home("b"), &fb.join("notes.txt"));
    assert_eq!(deleted["versions"][0]["size"], 50_000, "{deleted}");

    // A brings doc.txt back (its own bytes are gone: from B's store or the storage peer), and
    // the restored file reaches B as the newest version.
    let restored = meshsync_ok(
        &home("a"),
        &["restore", fa.join("doc.txt").to_str().unwrap()],
    );
    assert!(restored.contains("restored version 1"), "{restored}");
    assert_eq!(std::fs::read(fa.join("doc.txt")).unwrap(), v1);
    assert!(
        arrived("doc.txt", &v1),
        "the restored version did not reach B"
    );

    // With everyone else gone, B restores the deleted file from its own store alone.
    a.kill();
    s.kill();
    let out = meshsync_ok(
        &home("b"),
        &["restore", fb.join("notes.txt").to_str().unwrap()],
    );
    assert!(out.contains("restored"), "{out}");
    assert_eq!(std::fs::read(fb.join("notes.txt")).unwrap(), notes);
    // …and the big file as it was (3 MiB: more chunks than one batch of its store asks for).
    let out = meshsync_ok(
        &home("b"),
        &["restore", fb.join("big.bin").to_str().unwrap()],
    );
    assert!(out.contains("restored"), "{out}");
    assert_eq!(std::fs::read(fb.join("big.bin")).unwrap(), big1);
    let bad = meshsync(
        &home("b"),
        &["restore", fb.join("never-existed.txt").to_str().unwrap()],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no kept versions"));
    b.kill();

    // Past the retention, the old big.bin's chunks leave the storage peer's disk.
    let mut config = std::fs::read_to_string(home("a").join("config.toml")).unwrap();
    config.push_str("retention = \"1s\"\n");
    std::fs::write(home("a").join("config.toml"), config).unwrap();
    let s = Daemon::start_on(&home("s"), &s_addr);
    let a = Daemon::start(&home("a"));
    assert!(wait_until(Duration::from_secs(30), || a.status()
        ["storage"][0]["connected"]
        == true));
    let before = s.status()["holds"]["disk_bytes"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let gc: serde_json::Value =
        serde_json::from_str(meshsync_ok(&home("a"), &["gc", "--json"]).trim()).unwrap();
    assert!(gc["expired_versions"].as_u64().unwrap() >= 3, "{gc}");
    let released = gc["storage_peers"][0]["bytes"].as_u64().unwrap_or(0);
    assert!(released > 2 << 20, "{gc}");
    let after = s.status()["holds"]["disk_bytes"].as_u64().unwrap();
    assert!(
        after + (2 << 20) < before,
        "storage peer disk {before} -> {after} bytes after releasing {released}"
    );
    // What is current is still whole on the storage peer: a new device, with A gone once it
    // has paired, gets it from the storage peer alone.
    meshsync_ok(&home("c"), &["init", "--name", "c"]);
    meshsync_ok(&home("c"), &["peer", "add", &s_addr]);
    meshsync_ok(&home("c"), &["join", &invite(&home("a"), "device")]);
    drop(a);
    let fc = home("C");
    std::fs::create_dir_all(&fc).unwrap();
    let c = Daemon::start(&home("c"));
    meshsync_ok(
        &home("c"),
        &["folder", "add", fc.to_str().unwrap(), "--id", "docs"],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::read(fc.join("big.bin")).is_ok_and(|d| d == big2)
                && std::fs::read(fc.join("doc.txt")).is_ok_and(|d| d == v1)
        }),
        "a new device did not get the current files from the storage peer after the release: {}",
        c.status()
    );
}

/// A version that comes back (here: a file emptied, then written again as it was) is rebuilt
/// from the chunks this device kept of it, not fetched again over the network.
#[test]
fn a_version_that_comes_back_is_rebuilt_from_this_devices_own_store() {
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n);
    let (fa, fb) = (home("A"), home("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    meshsync_ok(&home("a"), &["init", "--name", "a"]);
    meshsync_ok(&home("b"), &["init", "--name", "b"]);
    let big = random(16 << 20, 9);
    std::fs::write(fa.join("video.bin"), &big).unwrap();
    let _a = Daemon::start(&home("a"));
    meshsync_ok(
        &home("a"),
        &["folder", "add", fa.to_str().unwrap(), "--id", "docs"],
    );
    meshsync_ok(&home("b"), &["join", &invite(&home("a"), "device")]);
    let b = Daemon::start(&home("b"));
    meshsync_ok(
        &home("b"),
        &["folder", "add", fb.to_str().unwrap(), "--id", "docs"],
    );
    let holds = |data: &[u8]| {
        wait_until(Duration::from_secs(60), || {
            std::fs::read(fb.join("video.bin")).is_ok_and(|d| d == data)
        })
    };
    assert!(holds(&big));
    // Emptied on A (a torn write, say): B applies it and keeps the old version's chunks.
    std::fs::write(fa.join("video.bin"), b"").unwrap();
    meshsync_ok(&home("a"), &["scan"]);
    assert!(holds(b""));
    let received = |b: &Daemon| b.status()["peers"][0]["bytes_in"].as_u64().unwrap();
    let before = received(&b);
    // Written again as it was: B has every chunk in its own store.
    std::fs::write(fa.join("video.bin"), &big).unwrap();
    meshsync_ok(&home("a"), &["scan"]);
    assert!(holds(&big));
    let fetched = received(&b) - before;
    assert!(
        fetched < 1 << 20,
        "B fetched {fetched} bytes of a 16 MiB version it kept in its own store"
    );
}
