//! A member whose keys are stolen (see `common/mallory.rs`) attacks a real device over the
//! wire. Each attack is refused or contained: nothing is written outside the folder, no signed
//! record rolls a path back or jumps it out of reach, the device stays up, and the rest of
//! the folder keeps syncing. The bombs and floods, which need the process to themselves to
//! measure memory, are in `adversary_memory.rs`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::mallory::{eventually, mesh, requested, Mallory};
use meshsync_crdt::index::ShardChange;
use meshsync_crdt::{FileKind, FileRecord};
use meshsync_node::chunks::ChunkRef;
use meshsync_node::device::scan;
use meshsync_node::state::Batch;

/// Forges one record per entry of `records` into Mallory's index and returns the changes.
fn forged(mallory: &mut Mallory, records: &[FileRecord]) -> Vec<ShardChange> {
    mallory.forge(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_naming_the_daemons_own_files_are_refused() {
    let mesh = mesh().await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let mut records = Vec::new();
    for path in [
        ".meshsync-folder",
        ".meshsync/ignore.local",
        ".meshsync-x/y",
    ] {
        records.push(mallory.record(path, FileKind::File, "seed.txt").await);
    }
    // The shared ignore file as a link (to /dev/zero, say): only a regular file may be there.
    let link = mallory
        .record(".meshsync/ignore", FileKind::Symlink, "seed.txt")
        .await;
    records.push(link);
    let changes = forged(&mut mallory, &records);
    mallory.push(changes).await;

    mesh.still_syncs().await;
    let meshsync = mesh.fv.join(".meshsync");
    assert!(!meshsync.join("ignore.local").exists());
    assert!(!mesh.fv.join(".meshsync-x").exists());
    let ignore = std::fs::symlink_metadata(meshsync.join("ignore"));
    assert!(
        ignore.is_err() || ignore.unwrap().is_file(),
        "the shared ignore file became something else"
    );
    // The folder marker is still the device's own.
    let marker = std::fs::read(mesh.fv.join(".meshsync-folder")).unwrap();
    assert_ne!(marker, b"seed content from m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_under_a_link_is_not_written_through_it() {
    let mesh = mesh().await;
    // An honest link out of the folder, on m, arrives on v as a link.
    std::os::unix::fs::symlink(&mesh.outside, mesh.fm.join("L")).unwrap();
    scan::scan(&mesh.m, &mesh.folder, requested())
        .await
        .unwrap();
    let at = mesh.fv.join("L");
    assert!(eventually(|| std::fs::read_link(&at).is_ok()).await);
    // Then a file "under" it.
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let record = mallory.record("L/x.txt", FileKind::File, "seed.txt").await;
    let changes = forged(&mut mallory, &[record]);
    mallory.push(changes).await;

    mesh.still_syncs().await;
    assert_eq!(std::fs::read_dir(&mesh.outside).unwrap().count(), 0);
    // The link is kept (in place or as a conflict copy) and the file, if written, is in a real
    // folder inside.
    let names: Vec<String> = std::fs::read_dir(&mesh.fv)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let links = names
        .iter()
        .filter(|n| {
            std::fs::symlink_metadata(mesh.fv.join(n)).is_ok_and(|m| m.file_type().is_symlink())
        })
        .count();
    assert_eq!(links, 1, "{names:?}");
    let temps: Vec<&String> = names.iter().filter(|n| n.contains("-tmp-")).collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setuid_and_setgid_bits_from_a_peer_are_dropped() {
    let mesh = mesh().await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let mut record = mallory.record("tool.sh", FileKind::File, "seed.txt").await;
    record.mode = 0o106_755; // setuid, setgid, rwxr-xr-x
    let record = mallory.sign(record).await;
    let changes = forged(&mut mallory, &[record]);
    mallory.push(changes).await;

    let at = mesh.fv.join("tool.sh");
    assert!(eventually(|| at.exists()).await, "the file itself is fine");
    let mode = std::fs::metadata(&at).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755, "{mode:o}");
    mesh.still_syncs().await;
    // The file on disk is the record's file (not a local edit to publish, nor a conflict).
    scan::scan(&mesh.v, &mesh.folder, requested())
        .await
        .unwrap();
    let status = mesh.status().await;
    assert_eq!(status.folders[0].conflicts, 0, "{status:#?}");
    assert!(status.folders[0].in_sync, "{status:#?}");
    let seen = Mallory::new(&mesh.r, &mesh.v, &mesh.folder).await;
    assert_eq!(seen.index.get("tool.sh").unwrap().winner.version, 1);
}

/// A chunk list travels between devices as (ID, length) pieces, whole or against the list of
/// the version it replaces: the receiver works the offsets out itself, so a list whose
/// offsets contradict its order cannot even be sent (`content::valid_list` still refuses one
/// in a sealed copy). What a sender can do is serve a list that is not the one the signed
/// record names: here m keeps big.bin's own list under the hash of its chunks reordered, and
/// signs a record naming that hash. The list built is refused, nothing is written, and the
/// path is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_list_that_is_not_the_one_named_is_refused_and_the_old_content_kept() {
    let mesh = mesh().await;
    let big = common::random(8 << 20, 7);
    mesh.write_on_m("big.bin", &big).await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let list = {
        let d = mesh.m.lock().await;
        d.state()
            .chunk_list(&mallory.chunks_of("big.bin"))
            .unwrap()
            .unwrap()
    };
    assert!(list.len() >= 2, "big.bin has {} chunks", list.len());
    let mut permuted: Vec<ChunkRef> = list.clone();
    permuted.swap(0, 1);
    let named = meshsync_node::chunks::content::chunk_list_hash(&permuted);
    mesh.m
        .lock()
        .await
        .state()
        .commit(Batch {
            lists: vec![(named, list)],
            ..Batch::default()
        })
        .unwrap();
    let mut record = mallory.record("big.bin", FileKind::File, "big.bin").await;
    record.chunks = named;
    let record = mallory.sign(record).await;
    let changes = forged(&mut mallory, &[record]);
    mallory.push(changes).await;

    let status = mesh.reported("big.bin").await;
    assert!(!status.folders[0].in_sync);
    assert_eq!(std::fs::read(mesh.fv.join("big.bin")).unwrap(), big);
    mesh.still_syncs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_and_a_file_under_it_keep_one_and_report_the_other() {
    let mesh = mesh().await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let a = mallory.record("a", FileKind::File, "seed.txt").await;
    let ab = mallory.record("a/b", FileKind::File, "other.txt").await;
    let changes = forged(&mut mallory, &[a, ab]);
    mallory.push(changes).await;

    let status = mesh.reported("a/b").await;
    // "a/b" may be reported unavailable first, while "a"'s content is still on its way (a CI
    // run under load read "a" then and found the folder made for a/b's temp file): "a" is the
    // file once it arrives.
    let at = mesh.fv.join("a");
    assert!(
        eventually(|| std::fs::read(&at).is_ok_and(|d| d == b"seed content from m")).await,
        "{status:#?} {:?}",
        std::fs::symlink_metadata(&at)
    );
    let status = mesh.status().await;
    assert!(
        status.folders[0]
            .not_written
            .iter()
            .any(|n| n.path == "a/b"),
        "{status:#?}"
    );
    mesh.still_syncs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_jump_and_no_replay_moves_a_path_back_or_out_of_reach() {
    let mesh = mesh().await;
    mesh.write_on_m("f.txt", b"f version one").await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let first = mallory.index.get("f.txt").unwrap().winner;

    // A version at the top of the range (no honest write could ever follow it): refused.
    let mut top = mallory.record("f.txt", FileKind::File, "seed.txt").await;
    top.version = u64::MAX;
    let top = mallory.sign(top).await;
    let mut scratch = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;
    let changes = forged(&mut scratch, &[top]);
    mallory.push(changes).await;

    // A new version the victim has not seen, bundled behind a replay of the old one over it:
    // the new one lands, the replay is refused.
    let second = mallory.record("f.txt", FileKind::File, "other.txt").await;
    let newer = forged(&mut mallory, &[second]);
    let replay = forged(&mut mallory, std::slice::from_ref(&first));
    let mut bundle = replay;
    bundle.extend(newer);
    mallory.push(bundle).await;
    let at = mesh.fv.join("f.txt");
    assert!(
        eventually(|| std::fs::read(&at).is_ok_and(|d| d == b"other content from m")).await,
        "{:?}",
        std::fs::read(&at)
    );

    // The read-only member may write nothing, and may not replay m's first version either.
    let mut reader = Mallory::new(&mesh.r, &mesh.v, &mesh.folder).await;
    let own = reader.record("g.txt", FileKind::File, "seed.txt").await;
    let changes = forged(&mut reader, &[own]);
    reader.push(changes).await;
    let changes = forged(&mut reader, &[first]);
    reader.push(changes).await;

    mesh.still_syncs().await;
    assert_eq!(std::fs::read(&at).unwrap(), b"other content from m");
    assert!(!mesh.fv.join("g.txt").exists());
    let status = mesh.status().await;
    assert_eq!(status.folders[0].conflicts, 0, "{status:#?}");
    assert!(status.folders[0].in_sync, "{status:#?}");
    // An honest edit of f.txt on m (once m has the second version) still wins: nothing
    // wedged the path.
    let on_m = mesh.fm.join("f.txt");
    assert!(eventually(|| std::fs::read(&on_m).is_ok_and(|d| d == b"other content from m")).await);
    mesh.write_on_m("f.txt", b"f version three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_changes_made_with_stolen_keys_do_not_split_the_replicas() {
    // Mallory holds m's keys and signs a change under m's own actor with the sequence number
    // m's next change in that shard will take; v gets hers first, then m's genuine one. Every
    // replica keeps the same twin, m's write survives (written again if its twin lost), and
    // later changes in that shard still flow.
    let mesh = mesh().await;
    let mut mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder)
        .await
        .in_incarnation(0);
    let record = mallory.record("twin.txt", FileKind::File, "seed.txt").await;
    let changes = forged(&mut mallory, &[record]);
    assert!(matches!(
        mallory.push(changes).await,
        meshsync_node::protocol::SyncReply::Ok
    ));
    assert!(eventually(|| mesh.fv.join("twin.txt").exists()).await);
    mesh.write_on_m("twin.txt", b"m's own twin.txt").await;
    // Another path in the same shard: its change depends on m's twin.
    let shard = meshsync_crdt::index::shard_of(&mesh.folder, "twin.txt");
    let next = (0..)
        .map(|i| format!("same-shard-{i}.txt"))
        .find(|p| meshsync_crdt::index::shard_of(&mesh.folder, p) == shard)
        .unwrap();
    mesh.write_on_m(&next, b"after the twins").await;
    let same = |name: &str| {
        let (v, m) = (
            std::fs::read(mesh.fv.join(name)),
            std::fs::read(mesh.fm.join(name)),
        );
        v.is_ok() && v.ok() == m.ok()
    };
    assert!(eventually(|| same("twin.txt")).await);
    assert_eq!(
        std::fs::read(mesh.fm.join("twin.txt")).unwrap(),
        b"m's own twin.txt"
    );
    mesh.still_syncs().await;
}
