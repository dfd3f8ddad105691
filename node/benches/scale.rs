//! The whole daemon at the size of a photo library or a source tree: `cargo bench -p
//! meshsync-node --bench scale [-- N ...]` (default 100000 files; `-- 1000000` for a million).
//!
//! Two real daemons on loopback; a folder of N small files (1–16 KiB, nested like a source tree).
//! For each N it prints: the first scan's rate (files/s, warm: the files were just written, and
//! written back before the scan starts; with how much of the tree the page cache still holds,
//! sampled, before the scan and before the sync), the initial sync to the second device (files/s,
//! MB/s) with `status --json` latency meanwhile, each daemon's peak and steady RSS, the time from
//! `meshsync up` to a first `status` answer and to "in sync" after a restart with nothing changed
//! (stopped as a service manager stops it, SIGTERM; then again after a crash, SIGKILL), a
//! 1,000-file change on A reaching B (repeated, with B's RSS after each and its trend over the
//! second half, in MB per change; timed from the last write, as the watcher sees it; each made
//! once both daemons are quiet; with how long the writes took), and the state database's size
//! per file. Beside the scan, the sync and the changes, the share of the CPU the hypervisor
//! took (a shared VM's noise). `SCALE_BENCH_CHANGES` sets how many changes
//! (default 50); `SCALE_BENCH_DIR` where the folders go (default /tmp; N files need about N × 17
//! KiB there); `BENCH_DAEMON_LOG=debug` (any `RUST_LOG` filter) logs the daemons at that level and
//! keeps their logs in the temp directory. `SCALE_BENCH_KEEP=DIR` keeps the folders and homes in
//! `DIR/N` (listening on fixed loopback ports) instead of a temporary directory; a later run with
//! the same `DIR` starts the kept pair and goes straight to the restart and the changes (at a
//! million files, minutes instead of half an hour); with `SCALE_BENCH_RESYNC=1` as well, it
//! first deletes the kept B and pairs and syncs a new one with the kept A (the initial sync
//! again, without writing and scanning the tree).
//!
//! The initial sync creates N files, so it is printed next to the rate at which this disk
//! creates the same files with no daemon, measured just before it. That rate is not a
//! constant: on ext4 without a journal (this project's CI machines), creating files within
//! minutes of deleting many (a previous run's folders) is several times slower, as the
//! kernel passes over each recently freed inode while it looks for a free one.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{run, start_on, Daemon};

/// A file's path in a tree like a source checkout: 1,000 folders of up to 100 files, two deep.
fn tree_path(i: usize) -> String {
    format!(
        "src/module_{:02}/part_{:02}/file_{i:07}.rs",
        i / 10_000 % 100,
        i / 100 % 100
    )
}

/// File `i`'s length, whatever its version.
fn content_len(i: usize) -> usize {
    1024 + (i * 7919) % (15 * 1024)
}

/// Deterministic incompressible-ish content of 1–16 KiB for file `i`, version `v`.
fn content(i: usize, v: u64) -> Vec<u8> {
    let len = content_len(i);
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ v.wrapping_mul(31) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_tree(root: &Path, n: usize) -> u64 {
    let mut bytes = 0;
    for i in 0..n {
        let path = root.join(tree_path(i));
        if i % 100 == 0 {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        }
        let data = content(i, 0);
        bytes += data.len() as u64;
        std::fs::write(path, data).unwrap();
    }
    bytes
}

/// Files per second this disk creates and fills right now with nothing else running: `count`
/// files of the tree's sizes and layout under `root` (kept until the run ends — deleting many
/// files slows the next creations on some file systems, see the module's note).
fn create_rate(root: &Path, count: usize) -> f64 {
    let t = Instant::now();
    write_tree(root, count);
    count as f64 / t.elapsed().as_secs_f64()
}

fn status(home: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(common::bin())
        .arg("--home")
        .arg(home)
        .args(["status", "--json"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// The share of `root`'s tree (as [`tree_path`] names it) in the page cache, from up to
/// 1,000 files spread over it: a "warm" scan is warm only if the tree stayed there. This
/// project's virtual machines drop file pages with 12–16 GB free (7.5–11.5 GB cached was
/// seen): at a million files (8.7 GB a tree, two trees and two state databases) most of the
/// tree is read from disk.
fn resident_share(root: &Path, n: usize) -> f64 {
    let step = (n / 1000).max(1);
    let (mut resident, mut pages) = (0usize, 0usize);
    for i in (0..n).step_by(step) {
        if let Some((r, p)) = resident_pages(&root.join(tree_path(i))) {
            resident += r;
            pages += p;
        }
    }
    100.0 * resident as f64 / pages.max(1) as f64
}

/// How many of `path`'s pages are in the page cache, of how many (`mincore` on a mapping).
fn resident_pages(path: &Path) -> Option<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len() as usize;
    if len == 0 {
        return None;
    }
    // SAFETY: sysconf only reads a system constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file, never read through, unmapped before
    // return; `vec` has one byte for each of its pages, as mincore writes.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if at == libc::MAP_FAILED {
            return None;
        }
        let ok = libc::mincore(at, len, vec.as_mut_ptr()) == 0;
        libc::munmap(at, len);
        ok.then(|| (vec.iter().filter(|b| *b & 1 == 1).count(), vec.len()))
    }
}

/// Whether `home`'s folder holds `n` files and is in sync.
fn in_sync_with(home: &Path, n: usize) -> bool {
    status(home).is_some_and(|s| {
        s["folders"][0]["in_sync"] == true
            && s["folders"][0]["local_files"].as_u64() == Some(n as u64)
    })
}

fn rss_mb(d: &Daemon) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.0.id())).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The machine's CPU ticks so far: (stolen by the hypervisor, all). On a shared virtual
/// machine a slow stretch shows here: the figures of a run with much stolen are not this
/// code's.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = (stat.lines().next().unwrap_or_default().split_whitespace())
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    (
        fields.get(7).copied().unwrap_or(0),
        fields.iter().take(8).sum(),
    )
}

/// The share of the machine's CPU the hypervisor took since `since` (a [`cpu_ticks`]).
fn stolen_since(since: (u64, u64)) -> f64 {
    let now = cpu_ticks();
    let all = now.1.saturating_sub(since.1).max(1);
    now.0.saturating_sub(since.0) as f64 / all as f64 * 100.0
}

/// CPU time (user + system) the daemon has used so far, in seconds.
fn cpu_secs(d: &Daemon) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.0.id())).unwrap_or_default();
    // The fields after the command name (in parentheses, which may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Waits until both daemons are quiet (under 3 % of a core over 0.5 s: the background work
/// of the last change, and a start-up walk, done), at most `timeout`; returns how long.
fn wait_quiet(daemons: [&Daemon; 2], timeout: Duration) -> Duration {
    let start = Instant::now();
    let used = || daemons.iter().map(|d| cpu_secs(d)).sum::<f64>();
    let mut before = used();
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(500));
        let now = used();
        if now - before < 0.015 {
            break;
        }
        before = now;
    }
    start.elapsed()
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    let changes: usize = std::env::var("SCALE_BENCH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    for n in sizes {
        bench(n, changes);
    }
}

/// Writes the tree into `dir`'s folder A, scans it on a first device, pairs a second and
/// syncs the tree to it, printing the first scan, the initial sync and the memory figures.
fn first_sync(n: usize, dir: &Path, listen: [&str; 2]) -> (Daemon, Daemon) {
    let (ha, fa) = (dir.join("a"), dir.join("A"));
    let bytes = write_tree(&fa, n);
    // Written back before the scan is timed: the tree stays in the page cache (warm), and the
    // kernel's writeback of what the writer just wrote (a GB at a million files) is not
    // counted against the scan, which only reads.
    rustix::fs::sync();
    println!("  tree written: {:.1} MB", bytes as f64 / 1e6);
    run(&ha, &["init", "--name", "a"]);
    let a = start_on(&ha, listen[0]);
    println!(
        "  the tree in the page cache before the scan: {:.0} % (a sample of its files)",
        resident_share(&fa, n)
    );
    let (t, ticks) = (Instant::now(), cpu_ticks());
    run(&ha, &["folder", "add", fa.to_str().unwrap(), "--id", "big"]);
    let scan = t.elapsed().as_secs_f64();
    println!(
        "  first scan (warm):      {:>9.0} files/s  ({scan:.2} s; {:.0} % of the CPU taken by the hypervisor)   goal ≥ 20,000",
        n as f64 / scan,
        stolen_since(ticks)
    );
    let b = join_and_sync(&a, dir, n, bytes, listen[1]);
    (a, b)
}

/// Pairs a second device (a fresh home `dir/b`, an empty folder `dir/B`) with the running `a`
/// and syncs the tree of `n` files (`bytes` in all) to it, printing the initial sync and the
/// memory figures.
fn join_and_sync(a: &Daemon, dir: &Path, n: usize, bytes: u64, listen: &str) -> Daemon {
    let (ha, hb) = (dir.join("a"), dir.join("b"));
    let (fa, fb) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&fb).unwrap();
    run(&hb, &["init", "--name", "b"]);
    let code = run(&ha, &["invite"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    run(&hb, &["join", &code]);
    let reference = create_rate(&dir.join("reference"), n.min(20_000));
    println!(
        "  this disk, same run:    {reference:>9.0} files/s  creating files of these sizes with no daemon (the limit for a sync)"
    );
    let state = resident_pages(&ha.join("state.redb")).unwrap_or_default();
    println!(
        "  A's tree in the page cache before the sync: {:.0} % (what A serves from), its state {:.0} %",
        resident_share(&fa, n),
        100.0 * state.0 as f64 / state.1.max(1) as f64
    );
    let b = start_on(&hb, listen);
    let (t, ticks) = (Instant::now(), cpu_ticks());
    run(&hb, &["folder", "add", fb.to_str().unwrap(), "--id", "big"]);
    let mut latencies = Vec::new();
    let synced = wait_for(Duration::from_secs(3600), || {
        let asked = Instant::now();
        let done = status(&hb).is_some_and(|s| {
            s["folders"][0]["in_sync"] == true
                && s["folders"][0]["local_files"].as_u64() == Some(n as u64)
        });
        latencies.push(asked.elapsed().as_secs_f64() * 1000.0);
        done
    })
    .unwrap_or(t.elapsed());
    let secs = synced.as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    println!(
        "  initial sync:           {:>9.0} files/s  {:.1} MB/s ({secs:.1} s, {:.2}× this disk's rate; {:.0} % of the CPU taken by the hypervisor)   goal ≥ 2,000 files/s",
        n as f64 / secs,
        bytes as f64 / 1e6 / secs,
        n as f64 / secs / reference,
        stolen_since(ticks)
    );
    println!(
        "  status --json meanwhile: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} asks)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        latencies.len()
    );
    println!(
        "  peak RSS:               A {:.0} MB, B {:.0} MB",
        a.peak_rss_mb(),
        b.peak_rss_mb()
    );
    std::thread::sleep(Duration::from_secs(5));
    println!(
        "  RSS idle 5 s:           A {:.0} MB, B {:.0} MB",
        rss_mb(a),
        rss_mb(&b)
    );
    // The index is compacted a few dozen shards a second once quiet (~16 s at a million).
    std::thread::sleep(Duration::from_secs(25));
    println!(
        "  steady RSS (idle 30 s): A {:.0} MB, B {:.0} MB   goal < 500 MB at 1M",
        rss_mb(a),
        rss_mb(&b)
    );
    b
}

/// Where a kept run's daemons listen (a kept pair finds each other again at the same
/// addresses).
const KEPT_LISTEN: [&str; 2] = ["/ip4/127.0.0.1/tcp/47611", "/ip4/127.0.0.1/tcp/47612"];

/// Starts the daemon of `home` and prints how long until it answers and until it is in sync.
fn restart(home: &Path, listen: &str, n: usize, what: &str) -> Daemon {
    let t = Instant::now();
    let daemon = start_on(home, listen);
    let first_answer = t.elapsed().as_secs_f64();
    let in_sync = wait_for(Duration::from_secs(600), || in_sync_with(home, n))
        .map_or(f64::NAN, |d| d.as_secs_f64() + first_answer);
    println!("  {what}: first status {first_answer:.2} s, in sync {in_sync:.2} s   goal < 5 s");
    daemon
}

fn bench(n: usize, changes: usize) {
    let base = PathBuf::from(std::env::var("SCALE_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()));
    let keep = std::env::var_os("SCALE_BENCH_KEEP").map(|k| PathBuf::from(k).join(n.to_string()));
    let temp = keep.is_none().then(|| tempfile::tempdir_in(base).unwrap());
    let dir = keep
        .clone()
        .unwrap_or_else(|| temp.as_ref().unwrap().path().to_path_buf());
    let (ha, hb) = (dir.join("a"), dir.join("b"));
    let (fa, fb) = (dir.join("A"), dir.join("B"));
    let listen = if keep.is_some() {
        KEPT_LISTEN
    } else {
        ["/ip4/127.0.0.1/tcp/0"; 2]
    };
    println!("== {n} files");
    let synced_mark = dir.join("synced");
    let resync = std::env::var_os("SCALE_BENCH_RESYNC").is_some();
    let (a, b) = if synced_mark.exists() && resync {
        println!(
            "  kept from an earlier run in {}; B made again from nothing",
            dir.display()
        );
        let t = Instant::now();
        for gone in [&hb, &fb, &dir.join("reference")] {
            let _ = std::fs::remove_dir_all(gone);
        }
        println!(
            "  B's home and folder deleted in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        let a = start_on(&ha, listen[0]);
        let up = wait_for(Duration::from_secs(600), || status(&ha).is_some());
        up.expect("the kept A answers");
        let bytes = (0..n).map(|i| content_len(i) as u64).sum();
        let b = join_and_sync(&a, &dir, n, bytes, listen[1]);
        (a, b)
    } else if synced_mark.exists() {
        println!("  kept from an earlier run in {}", dir.display());
        let (a, b) = (start_on(&ha, listen[0]), start_on(&hb, listen[1]));
        wait_for(Duration::from_secs(600), || in_sync_with(&hb, n)).expect("the kept pair syncs");
        (a, b)
    } else {
        let pair = first_sync(n, &dir, listen);
        if keep.is_some() {
            std::fs::write(&synced_mark, b"").unwrap();
        }
        pair
    };
    // A restart as a service manager does it (SIGTERM, then start), then one after a crash
    // (SIGKILL: the state database is checked and its free pages rebuilt at open).
    let stopped = b.stop().as_secs_f64();
    let b = restart(&hb, listen[1], n, "restart, nothing changed");
    println!("    (stopping it with SIGTERM took {stopped:.2} s)");
    drop(b);
    let b = restart(&hb, listen[1], n, "restart after a crash (SIGKILL)");
    // Each run's versions are new (a kept tree holds an earlier run's).
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        * 1000;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    // Each change is made on a quiet pair, as a user's edit mostly is: not during B's
    // start-up walk (seconds at a million files) or the last change's background work (its
    // shards compacted about a second later). How long each wait took is printed.
    let mut quiet = Vec::new();
    let mut writes = Vec::new();
    let ticks = cpu_ticks();
    for round in 0..changes {
        quiet.push(wait_quiet([&a, &b], Duration::from_secs(60)).as_secs_f64());
        let version = stamp + round as u64 + 1;
        let first = (round * 1000) % n.saturating_sub(1000).max(1);
        let writing = Instant::now();
        for i in first..first + 1000.min(n) {
            std::fs::write(fa.join(tree_path(i)), content(i, version)).unwrap();
        }
        writes.push(writing.elapsed().as_secs_f64());
        let last = fb.join(tree_path(first + 1000.min(n) - 1));
        let expect = content(first + 1000.min(n) - 1, version);
        // What a user sees: the watcher notices the writes (no `scan`, which walks it all).
        let t = Instant::now();
        let took = wait_for(Duration::from_secs(120), || {
            std::fs::read(&last).is_ok_and(|d| d == expect) && in_sync_with(&hb, n)
        })
        .map_or(f64::NAN, |_| t.elapsed().as_secs_f64());
        times.push(took);
        rss.push(rss_mb(&b));
    }
    if !times.is_empty() {
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  1,000-file change A→B ({changes}×): p50 {:.2} s, max {:.2} s   goal < 1 s",
            percentile(&sorted, 0.5),
            percentile(&sorted, 1.0)
        );
        let each: Vec<String> = times.iter().map(|s| format!("{s:.2}")).collect();
        println!("    each (s): {}", each.join(" "));
        // The first wait is B's start-up walk; the others, the background work each change
        // left (compaction of the shards it touched).
        let each: Vec<String> = quiet.iter().map(|s| format!("{s:.1}")).collect();
        println!(
            "    the pair went quiet before each change after (s): {}",
            each.join(" ")
        );
        // Each change is timed from its last write; writes that take longer than the
        // watcher's longest wait (0.5 s) reach B in more than one scan.
        let each: Vec<String> = writes.iter().map(|s| format!("{s:.2}")).collect();
        println!("    writing the 1,000 files took (s): {}", each.join(" "));
        println!(
            "    CPU taken by the hypervisor meanwhile: {:.0} % (this machine's noise)",
            stolen_since(ticks)
        );
        println!(
            "  B's RSS after each change: first {:.0} MB, last {:.0} MB, max {:.0} MB   goal: flat",
            rss[0],
            rss[rss.len() - 1],
            rss.iter().copied().fold(f64::MIN, f64::max)
        );
        let each: Vec<String> = rss.iter().map(|mb| format!("{mb:.0}")).collect();
        println!("    each (MB): {}", each.join(" "));
        let half = &rss[rss.len() / 2..];
        println!(
            "    trend over the last {} changes: {:+.2} MB per change (least squares)",
            half.len(),
            slope(half)
        );
        std::thread::sleep(Duration::from_secs(30));
        println!(
            "  B's RSS 30 s after the last change: {:.0} MB (given back once quiet)",
            rss_mb(&b)
        );
    }
    if std::env::var("BENCH_DAEMON_LOG").is_ok() {
        for (home, name) in [(&ha, "a"), (&hb, "b")] {
            let kept = std::env::temp_dir().join(format!("meshsync-scale-bench-{name}.log"));
            std::fs::copy(home.join("daemon.log"), &kept).unwrap();
            println!("  daemon {name}'s log: {}", kept.display());
        }
    }
    let state_a = dir_size(&ha) as f64;
    println!(
        "  home on disk per file:  A {:.0} B/file ({:.1} MB), B {:.0} B/file",
        state_a / n as f64,
        state_a / 1e6,
        dir_size(&hb) as f64 / n as f64
    );
}

/// The least-squares slope of `ys` against their index (0 for fewer than two points).
fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        cov += dx * (y - mean_y);
        var += dx * dx;
    }
    cov / var
}
