//! The file index at scale: `cargo bench -p meshsync-crdt --bench index_scale [-- SIZES...]`
//! (default sizes 10000 100000 1000000).
//!
//! For each size it prints:
//! - build: signing and inserting the first index of N files, in batches of 10,000 (files/s);
//! - saved size, and the load time and memory of a fresh process that loads it;
//! - history growth: saved size after each of 10 rounds that change every file;
//! - applying a peer's 1,000-file change to the loaded index: time, and memory before/after,
//!   four times in a row. The first is the peer's first change ever to those shards: Automerge
//!   re-encodes a shard the first time it meets a new actor (a one-off per device and shard).
//!   The rest show the steady state, where memory must stay where it was.
//!
//! Loads and applies run in a child process (this binary re-run with `child`), so their memory
//! figures are not inflated by the build that came before.

use std::path::{Path, PathBuf};
use std::time::Instant;

use meshsync_crdt::index::{actor_for, FileUpdate, ShardChange};
use meshsync_crdt::{
    Action, ChunkListHash, DeviceKeys, Epoch, FileKind, FolderId, FolderIndex, MembershipLog,
    MeshId, MeshKey, Role,
};

const BATCH: usize = 10_000;

fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resident memory, after handing freed heap pages back to the system (so that it counts what
/// is in use, not what the allocator keeps around).
fn rss_mb() -> f64 {
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    status_mb("VmRSS:")
}

/// Bytes the program holds allocated (glibc's count over every arena), in MB.
fn heap_mb() -> f64 {
    // SAFETY: mallinfo2 only reads glibc's allocator statistics.
    unsafe { libc::mallinfo2().uordblks as f64 / 1e6 }
}

fn peak_mb() -> f64 {
    status_mb("VmHWM:")
}

fn path_of(i: usize) -> String {
    format!(
        "projects/p{:03}/src/module{:04}/file-{:07}.rs",
        i % 997,
        i % 5003,
        i
    )
}

fn update(i: usize, round: u64) -> FileUpdate {
    let mut chunks = [0u8; 32];
    chunks
        .copy_from_slice(blake3::hash(&[i.to_le_bytes(), round.to_le_bytes()].concat()).as_bytes());
    FileUpdate {
        path: path_of(i),
        kind: FileKind::File,
        size: 1000 + (i as u64 * 7919) % 1_000_000,
        mode: 0o644,
        mtime_ns: 1_764_000_000_000_000_000 + (i as i64) * 1000 + round as i64,
        deleted: false,
        chunks: ChunkListHash(chunks),
    }
}

fn write_shards(dir: &Path, saved: &[(u16, Vec<u8>)]) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let mut total = 0;
    for (id, bytes) in saved {
        std::fs::write(dir.join(id.to_string()), bytes).unwrap();
        total += bytes.len();
    }
    total
}

fn read_shards(dir: &Path) -> Vec<(u16, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let id: u16 = e.file_name().to_str().unwrap().parse().unwrap();
            (id, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn mesh_from(dir: &Path) -> (MeshId, FolderId) {
    let text = std::fs::read_to_string(dir.join("mesh")).unwrap();
    (
        text.trim().parse().unwrap(),
        FolderId::new("bench").unwrap(),
    )
}

/// Child process: load the saved index, then apply the peer changes found in `dir`.
fn child(dir: &Path) {
    let (mesh, folder) = mesh_from(dir);
    let log = MembershipLog::load(mesh, &std::fs::read(dir.join("membership")).unwrap()).unwrap();
    let saved = read_shards(&dir.join("shards"));
    let saved_bytes: usize = saved.iter().map(|(_, b)| b.len()).sum();
    let before = rss_mb();
    let start = Instant::now();
    let mut index = FolderIndex::load(mesh, folder, saved).unwrap();
    let load = start.elapsed();
    let after = rss_mb();
    println!("  allocated after load: {:.1} MB", heap_mb());
    println!(
        "  load:    {:>8.3} s  resident {:.1} -> {:.1} MB (before: {:.1} MB of saved bytes, freed by the load)  peak {:.1} MB  [{} paths]",
        load.as_secs_f64(),
        before,
        after,
        saved_bytes as f64 / 1e6,
        peak_mb(),
        index.len()
    );
    for round in 0..4 {
        let bytes = std::fs::read(dir.join(format!("peer-change-{round}"))).unwrap();
        let changes: Vec<ShardChange> = postcard::from_bytes(&bytes).unwrap();
        let wire: usize = changes.iter().map(|c| c.change.len()).sum();
        let before = rss_mb();
        let start = Instant::now();
        let report = index.apply(log.view(), changes).unwrap();
        let took = start.elapsed();
        let what = if round == 0 {
            "first change since load"
        } else {
            "steady"
        };
        println!(
            "  apply #{round} ({what}): {:>7.1} ms for {} paths in {} shards, {} bytes of changes; resident {:.1} -> {:.1} MB",
            took.as_secs_f64() * 1000.0,
            report.paths.len(),
            report.shards,
            wire,
            before,
            rss_mb()
        );
    }
    let (before, heap_before) = (rss_mb(), heap_mb());
    let start = Instant::now();
    let loose = index.loose_shards();
    let saved = index.compact(usize::MAX).unwrap();
    println!(
        "  compact: {:>7.1} ms for {loose} changed shards ({:.1} MB saved whole); resident {before:.1} -> {:.1} MB, allocated {heap_before:.1} -> {:.1} MB",
        start.elapsed().as_secs_f64() * 1000.0,
        saved.iter().map(|(_, s)| match s {
            meshsync_crdt::SavedShard::Whole(b) | meshsync_crdt::SavedShard::Piece(_, b) => b.len(),
        }).sum::<usize>() as f64 / 1e6,
        rss_mb(),
        heap_mb()
    );
}

fn run(n: usize, scratch: &Path) {
    println!("== {n} files");
    let dir = scratch.join(format!("n{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let admin = DeviceKeys::generate();
    let peer = DeviceKeys::generate();
    let (mut log, mesh) = MembershipLog::create(&admin, "admin", &MeshKey::generate(Epoch(0)));
    log.append(
        &admin,
        Action::Add {
            device: peer.device_id(),
            role: Role::Device,
            name: meshsync_crdt::SealedName::unreadable("peer"),
            kem: None,
            wrapped: None,
        },
    )
    .unwrap();
    std::fs::write(dir.join("membership"), log.save()).unwrap();
    std::fs::write(dir.join("mesh"), mesh.to_string()).unwrap();
    let folder = FolderId::new("bench").unwrap();

    let mut index =
        FolderIndex::new(mesh, folder.clone()).with_actor(actor_for(&admin.device_id(), 0));
    let start = Instant::now();
    for batch in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let updates = batch.iter().map(|&i| update(i, 0)).collect();
        index.write(&admin, Epoch(0), updates).unwrap();
    }
    let build = start.elapsed();
    let first_change_bytes: usize = index
        .take_local_changes()
        .iter()
        .map(|c| c.change.len())
        .sum();
    println!(
        "  build:   {:>8.3} s  {:>9.0} files/s  ({} bytes of changes, {:.0} B/file)  resident {:.1} MB",
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
        first_change_bytes,
        first_change_bytes as f64 / n as f64,
        rss_mb()
    );
    let start = Instant::now();
    let saved = index.save().unwrap();
    let save_time = start.elapsed();
    let size = write_shards(&dir.join("shards"), &saved);
    println!(
        "  saved:   {:>8.3} s  {:>9.1} MB  ({:.0} B/file, {} shards)",
        save_time.as_secs_f64(),
        size as f64 / 1e6,
        size as f64 / n as f64,
        saved.len()
    );
    drop(saved);

    // A peer (a second replica loaded from the same state) changes 1,000 files, three times.
    let mut other = FolderIndex::load(mesh, folder.clone(), index.save().unwrap())
        .unwrap()
        .with_actor(actor_for(&peer.device_id(), 0));
    for round in 0..4u64 {
        // Change 0 reaches nearly every shard (the peer's first change to them since load);
        // changes 1-3 are the 1,000-file changes the goal is about.
        let count = if round == 0 { 5_000.min(n) } else { 1_000 };
        let updates = (0..count)
            .map(|k| update((k * 7_919 + round as usize * 104_729) % n, 100 + round))
            .collect();
        other.write(&peer, Epoch(0), updates).unwrap();
        let changes = other.take_local_changes();
        std::fs::write(
            dir.join(format!("peer-change-{round}")),
            postcard::to_stdvec(&changes).unwrap(),
        )
        .unwrap();
    }
    drop(other);
    // One-file change on the wire.
    let mut one = FolderIndex::load(mesh, folder.clone(), index.save().unwrap())
        .unwrap()
        .with_actor(actor_for(&peer.device_id(), 1));
    one.write(&peer, Epoch(0), vec![update(n / 2, 999)])
        .unwrap();
    let one_bytes: usize = one
        .take_local_changes()
        .iter()
        .map(|c| c.change.len())
        .sum();
    println!("  one-file change: {one_bytes} bytes of Automerge change");
    drop(one);

    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());

    // History growth: change every file, ROUNDS times (INDEX_BENCH_ROUNDS, default 10).
    let rounds: u64 = std::env::var("INDEX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    if rounds == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut sizes = Vec::new();
    let start = Instant::now();
    for round in 1..=rounds {
        for batch in (0..n).collect::<Vec<_>>().chunks(BATCH) {
            let updates = batch.iter().map(|&i| update(i, round)).collect();
            index.write(&admin, Epoch(0), updates).unwrap();
        }
        index.take_local_changes();
        let size: usize = index.save().unwrap().iter().map(|(_, b)| b.len()).sum();
        sizes.push(size);
    }
    let rounds_time = start.elapsed();
    let growth: Vec<String> = sizes
        .iter()
        .map(|s| format!("{:.1}", *s as f64 / 1e6))
        .collect();
    println!(
        "  history: saved MB after each of {rounds} rounds of changing every file: {}  ({:.0} B/file/round; {:.0} files/s rewritten)",
        growth.join(" "),
        (sizes[sizes.len() - 1] - size) as f64 / (n as f64 * rounds as f64),
        (n as f64 * rounds as f64) / rounds_time.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&PathBuf::from(&args[1]));
        return;
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![10_000, 100_000, 1_000_000]
    } else {
        args.iter().filter_map(|a| a.parse().ok()).collect()
    };
    println!(
        "index_scale: {} shards per folder, {} cores",
        meshsync_crdt::index::SHARDS,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let keys = DeviceKeys::generate();
    let start = Instant::now();
    for i in 0..20_000u32 {
        std::hint::black_box(keys.sign("bench", &i.to_le_bytes()));
    }
    println!(
        "  reference: Ed25519 signing {:.0} signatures/s on one core",
        20_000.0 / start.elapsed().as_secs_f64()
    );
    let message = 7u32.to_le_bytes();
    let signature = keys.sign("bench", &message);
    let start = Instant::now();
    for _ in 0..20_000u32 {
        std::hint::black_box(
            meshsync_crdt::keys::verify(&keys.device_id(), "bench", &message, &signature).is_ok(),
        );
    }
    println!(
        "  reference: Ed25519 strict verification {:.0} signatures/s on one core",
        20_000.0 / start.elapsed().as_secs_f64()
    );
    let scratch = std::env::temp_dir().join(format!("meshsync-index-bench-{}", std::process::id()));
    for n in sizes {
        run(n, &scratch);
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
