//! Storage peers, with real daemons on loopback: two devices that are never online at the same
//! time stay in sync through a storage peer, and the storage peer's disk holds nothing it could
//! read — no file or folder name, no 64-byte run of any file's content, no device name, no key
//! material, and no exact file size.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshsync_tests::{
    homes_with_storage, invite, log_of, meshsync_ok, same, storage_holds_latest as holds_latest,
    wait_until, Daemon,
};

/// Deterministic text-like content nobody else would write: a marker and words from a seed.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "quarterly",
        "invoice",
        "meridian",
        "saffron",
        "lantern",
        "orchid",
        "tundra",
        "vellum",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = format!("confidential document {seed}: ").into_bytes();
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
        out.extend_from_slice(format!(" {} ", x % 100_000).as_bytes());
    }
    out.truncate(len);
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files_under(&path));
        } else if kind.is_file() {
            out.push(path);
        }
    }
    out
}

#[test]
fn devices_never_online_together_sync_through_a_storage_peer_that_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (home_a, home_b, home_s) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("s"),
    );
    let (folder_a, folder_b) = (dir.path().join("A"), dir.path().join("B"));
    std::fs::create_dir_all(&folder_a).unwrap();
    std::fs::create_dir_all(&folder_b).unwrap();
    meshsync_ok(&home_a, &["init", "--name", "alice-laptop-7731"]);
    meshsync_ok(&home_b, &["init", "--name", "bob-desktop-4419"]);
    meshsync_ok(&home_s, &["init", "--storage", "--name", "nas"]);

    // A's folder: names and contents the scan below looks for.
    let folder_id = "vault-q7r2";
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("secret-plans-2027.txt".into(), content(1, 5_000)),
        (
            "tax-returns-archive/summary-form.txt".into(),
            content(2, 12_345),
        ),
        (
            "tax-returns-archive/scans/receipt-scan.pdf".into(),
            content(3, 700_000),
        ),
        ("padded-a.bin".into(), content(4, 10_000)),
        ("padded-b.bin".into(), content(5, 10_030)),
        ("tiny-note.md".into(), content(6, 333)),
    ];
    for (name, data) in &files {
        let path = folder_a.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    let mut a = Daemon::start(&home_a);
    meshsync_ok(
        &home_a,
        &[
            "folder",
            "add",
            folder_a.to_str().unwrap(),
            "--id",
            folder_id,
        ],
    );
    meshsync_ok(&home_s, &["join", &invite(&home_a, "storage")]);
    meshsync_ok(&home_b, &["join", &invite(&home_a, "device")]);
    let mut s = Daemon::start(&home_s);
    assert_eq!(s.status()["role"], "storage");
    assert!(
        wait_until(Duration::from_secs(30), || holds_latest(&a.status())),
        "the storage peer never held A's latest state: {}",
        a.status()
    );
    // The NAS has a fixed address, which B is given (on a LAN, mDNS finds it too).
    let s_addr = s.status()["listen"][0].as_str().unwrap().to_string();
    meshsync_ok(&home_b, &["peer", "add", &s_addr]);
    meshsync_ok(&home_a, &["peer", "add", &s_addr]);
    let held = s.status();
    assert!(held["holds"]["chunks"].as_u64().unwrap() > 0, "{held}");
    assert!(
        held["holds"]["sealed_changes"].as_u64().unwrap() > 0,
        "{held}"
    );
    a.kill();

    // B starts after A stopped: everything comes from the storage peer alone.
    let mut b = Daemon::start(&home_b);
    meshsync_ok(
        &home_b,
        &[
            "folder",
            "add",
            folder_b.to_str().unwrap(),
            "--id",
            folder_id,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || files
            .iter()
            .all(|(name, _)| same(&folder_a.join(name), &folder_b.join(name)))),
        "B did not get A's files from the storage peer; B: {}",
        b.status()
    );
    // B edits and stops; A starts later and gets the edit, again from the storage peer alone.
    let edited = content(7, 40_000);
    std::fs::write(folder_b.join("secret-plans-2027.txt"), &edited).unwrap();
    let added = content(8, 2_000);
    std::fs::write(folder_b.join("reply-from-bob.txt"), &added).unwrap();
    meshsync_ok(&home_b, &["scan"]);
    assert!(
        wait_until(Duration::from_secs(30), || holds_latest(&b.status())),
        "the storage peer never held B's latest state: {}",
        b.status()
    );
    b.kill();
    let mut a = Daemon::start(&home_a);
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::read(folder_a.join("secret-plans-2027.txt")).is_ok_and(|d| d == edited)
                && std::fs::read(folder_a.join("reply-from-bob.txt")).is_ok_and(|d| d == added)
        }),
        "A did not get B's edit from the storage peer; A: {}",
        a.status()
    );
    files.push(("secret-plans-2027.txt".into(), edited));
    files.push(("reply-from-bob.txt".into(), added));
    a.kill();
    s.kill();

    // What the storage peer's disk holds: every byte of every file under its home.
    let mut haystack = Vec::new();
    for path in files_under(&home_s) {
        haystack.extend(std::fs::read(&path).unwrap());
        haystack.push(0);
    }
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, _) in &files {
        for part in Path::new(name).iter() {
            needles.push((format!("name {part:?}"), part.as_encoded_bytes().to_vec()));
        }
    }
    needles.push(("folder ID".into(), folder_id.as_bytes().to_vec()));
    for name in ["alice-laptop-7731", "bob-desktop-4419"] {
        needles.push((format!("device name {name}"), name.as_bytes().to_vec()));
    }
    for home in [&home_a, &home_b] {
        for key in ["keys/ed25519.key", "keys/x25519.key"] {
            let text = std::fs::read_to_string(home.join(key)).unwrap();
            let hex = text.lines().last().unwrap().trim().to_string();
            let raw: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            needles.push((format!("{key} of a device (hex)"), hex.into_bytes()));
            needles.push((format!("{key} of a device (raw)"), raw));
        }
    }
    for (what, needle) in &needles {
        assert!(
            !haystack.windows(needle.len()).any(|w| w == &needle[..]),
            "the storage peer's disk holds {what}"
        );
    }
    // 64-byte windows of every file's content, at every 32-byte step (so any run of 96 or more
    // bytes in the clear would be found).
    let windows: HashSet<&[u8]> = files
        .iter()
        .flat_map(|(_, data)| {
            (0..data.len().saturating_sub(64))
                .step_by(32)
                .map(move |i| &data[i..i + 64])
        })
        .collect();
    let leaked = haystack.windows(64).filter(|w| windows.contains(w)).count();
    assert_eq!(
        leaked, 0,
        "64-byte windows of file content found on the storage peer"
    );

    // Exact sizes: every stored chunk is padded, so no file's exact size shows; the files of
    // 10,000 and 10,030 bytes are stored as chunks of the same length.
    let store = meshsync_node::chunks::ChunkStore::open(&home_s.join("chunks")).unwrap();
    let sizes = store.sizes().unwrap();
    for (name, data) in &files {
        if data.len() < 16 * 1024 {
            assert!(
                !sizes.contains(&(data.len() as u32 + 4 + 16)),
                "{name}: its exact size shows on the storage peer"
            );
        }
    }
    let padded = meshsync_crdt::sealed::padme(10_004) as u32 + 16;
    assert!(
        sizes.iter().filter(|s| **s == padded).count() >= 2,
        "files of 10,000 and 10,030 bytes stored as different sizes: {sizes:?}"
    );
}

/// Copies a directory tree (regular files and folders).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_chunk_altered_on_the_storage_peer_is_refused_and_fetched_elsewhere_and_strangers_get_nothing()
{
    let dir = tempfile::tempdir().unwrap();

    let home = |n: &str| dir.path().join(n);
    let (folder_a, folder_b, folder_x) = (home("A"), home("B"), home("X"));
    for f in [&folder_a, &folder_b, &folder_x] {
        std::fs::create_dir_all(f).unwrap();
    }
    let s_addr = homes_with_storage(dir.path(), &["a", "b", "x"]);
    let report = content(11, 50_000);
    std::fs::write(folder_a.join("report.txt"), &report).unwrap();

    let mut a = Daemon::start(&home("a"));
    meshsync_ok(
        &home("a"),
        &["folder", "add", folder_a.to_str().unwrap(), "--id", "docs"],
    );
    meshsync_ok(&home("s"), &["join", &invite(&home("a"), "storage")]);
    meshsync_ok(&home("b"), &["join", &invite(&home("a"), "device")]);
    let mut s = Daemon::start_on(&home("s"), &s_addr);
    assert!(
        wait_until(Duration::from_secs(30), || holds_latest(&a.status())),
        "{}",
        a.status()
    );
    a.kill();
    s.kill();

    // Someone with the NAS's disk alters every stored chunk.
    for pack in files_under(&home("s").join("chunks/packs")) {
        let mut bytes = std::fs::read(&pack).unwrap();
        for i in (0..bytes.len()).step_by(997) {
            bytes[i] ^= 0x55;
        }
        std::fs::write(&pack, bytes).unwrap();
    }
    let _s = Daemon::start_on(&home("s"), &s_addr);
    let b = Daemon::start(&home("b"));
    meshsync_ok(
        &home("b"),
        &["folder", "add", folder_b.to_str().unwrap(), "--id", "docs"],
    );
    assert!(
        wait_until(Duration::from_secs(30), || b.status()["folders"][0]
            ["unavailable"]
            .as_array()
            .is_some_and(|u| u.iter().any(|p| p == "report.txt"))),
        "B did not report the file as unavailable: {}",
        b.status()
    );
    assert!(
        !folder_b.join("report.txt").exists(),
        "a damaged file was written"
    );
    assert!(log_of(&home("b")).contains("bad chunk refused"));

    // A stranger pointed at the storage peer gets nothing.
    let x = Daemon::start(&home("x"));
    meshsync_ok(
        &home("x"),
        &["folder", "add", folder_x.to_str().unwrap(), "--id", "docs"],
    );
    let x_id = x.status()["device_id"].as_str().unwrap().to_string();
    let s_id = _s.status()["device_id"].as_str().unwrap().to_string();
    // The handshake completes (Noise proves who each side is), then the gate refuses: either
    // side may be first to drop it, and says so in its log.
    let refused = |home: &Path, who: &str| {
        log_of(home)
            .lines()
            .any(|l| l.contains("non-member") && l.contains(who))
    };
    assert!(
        wait_until(Duration::from_secs(10), || refused(&home("s"), &x_id)
            || refused(&home("x"), &s_id)),
        "no refusal between the stranger and the storage peer"
    );
    // (That neither gets past the handshake is node/tests/storage_protocol.rs.)
    assert_eq!(
        std::fs::read_dir(&folder_x).unwrap().count(),
        1,
        "only the marker"
    );

    // The author comes back: B gets the file, intact, from it.
    let _a = Daemon::start(&home("a"));
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read(
            folder_b.join("report.txt")
        )
        .is_ok_and(|d| d == report)),
        "B did not get the file from A: {}",
        b.status()
    );
    assert!(
        wait_until(Duration::from_secs(10), || b.status()["folders"][0]
            ["unavailable"]
            .as_array()
            .is_some_and(|u| u.is_empty())),
        "{}",
        b.status()
    );
}

#[test]
fn a_storage_peer_rolled_back_to_an_older_state_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n);
    let (folder_a, folder_b) = (home("A"), home("B"));
    std::fs::create_dir_all(&folder_a).unwrap();
    std::fs::create_dir_all(&folder_b).unwrap();
    let s_addr = homes_with_storage(dir.path(), &["a", "b"]);
    let mut a = Daemon::start(&home("a"));
    meshsync_ok(
        &home("a"),
        &["folder", "add", folder_a.to_str().unwrap(), "--id", "docs"],
    );
    meshsync_ok(&home("s"), &["join", &invite(&home("a"), "storage")]);
    meshsync_ok(&home("b"), &["join", &invite(&home("a"), "device")]);
    let mut s = Daemon::start_on(&home("s"), &s_addr);
    let b = Daemon::start(&home("b"));
    meshsync_ok(
        &home("b"),
        &["folder", "add", folder_b.to_str().unwrap(), "--id", "docs"],
    );

    std::fs::write(folder_a.join("one.txt"), b"first state").unwrap();
    meshsync_ok(&home("a"), &["scan"]);
    assert!(wait_until(Duration::from_secs(30), || holds_latest(
        &a.status()
    )));
    // The storage peer's disk as it is now, to put back later.
    s.kill();
    copy_tree(&home("s"), &home("s-backup"));
    let mut s = Daemon::start_on(&home("s"), &s_addr);

    std::fs::write(folder_a.join("two.txt"), b"second state").unwrap();
    meshsync_ok(&home("a"), &["scan"]);
    let a_id = a.status()["device_id"].as_str().unwrap().to_string();
    let a_seq = |st: &serde_json::Value| st["storage"][0]["my_changes"].as_u64().unwrap_or(0);
    let latest = a_seq(&a.status());
    assert!(
        wait_until(Duration::from_secs(30), || holds_latest(&a.status())
            && std::fs::read(folder_b.join("two.txt"))
                .is_ok_and(|d| d == b"second state")
            && b.status()["storage"][0]["holds"][&a_id].as_u64()
                >= Some(latest)),
        "A: {}\nB: {}",
        a.status(),
        b.status()
    );
    a.kill();

    // Roll the storage peer back to the older disk.
    s.kill();
    std::fs::remove_dir_all(home("s")).unwrap();
    copy_tree(&home("s-backup"), &home("s"));
    let _s = Daemon::start_on(&home("s"), &s_addr);
    let reported = |st: serde_json::Value| {
        st["storage"][0]["stale_reports"]
            .as_array()
            .is_some_and(|r| {
                r.iter()
                    .any(|t| t.as_str().is_some_and(|t| t.contains("rolled back")))
            })
    };
    assert!(
        wait_until(Duration::from_secs(30), || reported(b.status())),
        "B did not notice: {}",
        b.status()
    );
    assert!(log_of(&home("b")).contains("rolled back"));
    // The devices put back what the storage peer lost (B forwards A's sealed changes it holds;
    // A pushes its own when it comes back).
    let a = Daemon::start(&home("a"));
    assert!(
        wait_until(Duration::from_secs(30), || holds_latest(&a.status())),
        "the storage peer was not repaired: {}",
        a.status()
    );
}
