//! Two real daemons on loopback: `cargo bench -p meshsync-node --bench sync`.
//!
//! Prints (a) 1 GiB of incompressible data in 4 files, MB/s; (b) 10,000 files of 1–16 KiB,
//! files/s; (c) 1 MiB overwritten, and 1 MiB inserted, near the middle of a 256 MiB file (3
//! rounds each): seconds from the write on A (which takes part of it) and bytes on the wire; (d) latency from a small file's write on A to it being complete on
//! B, p50 and p99; (f) 1 GiB in 4 files already on disk, timed from `folder add` on A until B
//! has every byte, with each daemon's CPU-seconds per GiB; (e) peak RSS of each daemon; and,
//! measured in the same run on one core, raw BLAKE3 and AES-256-GCM rates and the chunker's
//! (the `fastcdc` crate's cut and meshsync's own, same cut points) for comparison.
//! `SYNC_BENCH_SCALE=0.25` shrinks (a)–(c) and (f); `SYNC_BENCH_ONLY=ac` runs only the parts
//! named; `BENCH_DAEMON_LOG=debug` (any `RUST_LOG` filter) logs the daemons at that level and
//! keeps their logs in the temp directory.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{random, run, start, wait};

fn bytes_in(home: &Path) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&run(home, &["status", "--json"])).unwrap();
    status["peers"][0]["bytes_in"].as_u64().unwrap_or(0)
}

fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

fn same_len(path: &Path, len: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == len)
}

fn main() {
    let scale: f64 = std::env::var("SYNC_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let only = std::env::var("SYNC_BENCH_ONLY").unwrap_or_else(|_| "abcdf".into());
    let dir =
        tempfile::tempdir_in(std::env::var("SYNC_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let (fa, fb) = (dir.path().join("A"), dir.path().join("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    run(&ha, &["init", "--name", "a"]);
    run(&hb, &["init", "--name", "b"]);
    let a = start(&ha);
    run(
        &ha,
        &["folder", "add", fa.to_str().unwrap(), "--id", "bench"],
    );
    let code = run(&ha, &["invite"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    run(&hb, &["join", &code]);
    let b = start(&hb);
    run(
        &hb,
        &["folder", "add", fb.to_str().unwrap(), "--id", "bench"],
    );
    wait(Duration::from_secs(30), || {
        bytes_in(&hb) > 0 || run(&hb, &["status"]).contains("connected")
    });

    println!(
        "sync bench: two daemons on loopback, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    // Same-run single-core references.
    let (blake, aead) = (common::blake3_mb_s(), common::aes_gcm_mb_s());
    println!("  reference: BLAKE3 {blake:.0} MB/s, AES-256-GCM {aead:.0} MB/s (one core)");
    let (cdc_crate, cdc_lanes) = common::cdc_mb_s();
    println!(
        "  reference: FastCDC cut points, fastcdc crate {cdc_crate:.0} MB/s, meshsync's four lanes {cdc_lanes:.0} MB/s (one core)"
    );

    // (a) 1 GiB in 4 files.
    if only.contains('a') {
        let each = ((256u64 << 20) as f64 * scale) as usize;
        let files: Vec<Vec<u8>> = (0..4).map(|i| random(each, 100 + i)).collect();
        // The same writes into a folder nobody watches: what the writer alone costs here.
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let t = Instant::now();
        for (i, f) in files.iter().enumerate() {
            std::fs::write(scratch.join(format!("big{i}.bin")), f).unwrap();
        }
        let alone = t.elapsed();
        std::fs::remove_dir_all(&scratch).unwrap();
        println!(
            "  reference: writing the same {} MiB with no daemon watching: {:.2} s, {:.0} MB/s",
            (each * 4) >> 20,
            alone.as_secs_f64(),
            (each * 4) as f64 / 1e6 / alone.as_secs_f64()
        );
        let (cpu_a, cpu_b) = (a.cpu_seconds(), b.cpu_seconds());
        let t = Instant::now();
        for (i, f) in files.iter().enumerate() {
            std::fs::write(fa.join(format!("big{i}.bin")), f).unwrap();
        }
        let written = t.elapsed();
        for i in 0..4 {
            let p = fb.join(format!("big{i}.bin"));
            wait(Duration::from_secs(600), || same_len(&p, each as u64));
        }
        let took = t.elapsed();
        println!(
            "  (a) {} MiB in 4 files: {:.1} s, {:.0} MB/s (goal 400)",
            (each * 4) >> 20,
            took.as_secs_f64(),
            (each * 4) as f64 / 1e6 / took.as_secs_f64()
        );
        println!(
            "      the writes took {:.2} s of that; daemons' CPU: A {:.2} s, B {:.2} s (2 cores give {:.1} CPU-s)",
            written.as_secs_f64(),
            a.cpu_seconds() - cpu_a,
            b.cpu_seconds() - cpu_b,
            2.0 * took.as_secs_f64()
        );
        drop(files);
    }

    // (b) 10,000 files of 1–16 KiB.
    if only.contains('b') {
        let count = ((10_000f64 * scale.max(0.2)) as usize).max(1000);
        let t = Instant::now();
        for i in 0..count {
            let d = fa.join(format!("small/{:03}", i % 100));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join(format!("{i}.dat")),
                random(1024 + (i * 7919) % (15 * 1024), i as u64),
            )
            .unwrap();
        }
        let last = fb.join(format!("small/{:03}/{}.dat", (count - 1) % 100, count - 1));
        wait(Duration::from_secs(600), || {
            last.exists() && {
                let s: serde_json::Value =
                    serde_json::from_str(&run(&hb, &["status", "--json"])).unwrap();
                s["folders"][0]["in_sync"] == true
            }
        });
        let took = t.elapsed();
        println!(
            "  (b) {count} files of 1-16 KiB: {:.1} s, {:.0} files/s (goal 2,000)",
            took.as_secs_f64(),
            count as f64 / took.as_secs_f64()
        );
    }

    // (c) 1 MiB overwritten, then 1 MiB inserted, in the middle of a 256 MiB file.
    if only.contains('c') {
        let size = ((256usize << 20) as f64 * scale) as usize;
        let mut base = random(size, 7);
        std::fs::write(fa.join("huge.bin"), &base).unwrap();
        wait(Duration::from_secs(600), || {
            same_len(&fb.join("huge.bin"), size as u64)
        });
        wait(Duration::from_secs(60), || {
            std::fs::read(fb.join("huge.bin")).is_ok_and(|d| d == base)
        });
        // Three rounds of each, near the middle (where a content-defined cut falls, and so
        // how much around the edit is sent again, varies with the data).
        for (what, edit) in [("overwrite", false), ("insert", true)] {
            let mut rounds = Vec::new();
            for round in 0..3u64 {
                let before = bytes_in(&hb);
                let patch = random(1 << 20, 8 + round + if edit { 10 } else { 0 });
                let at = size / 2 + (round as usize * (size / 16 + 4099)) % (size / 4);
                if edit {
                    base.splice(at..at, patch);
                } else {
                    base[at..at + (1 << 20)].copy_from_slice(&patch);
                }
                let t = Instant::now();
                std::fs::write(fa.join("huge.bin"), &base).unwrap();
                let written = t.elapsed();
                // B replaces the file whole (a new inode, renamed into place complete): the
                // time is when the new inode appears; its content is then compared (reading
                // 256 MiB takes longer than a poll, and is not part of the sync).
                let mut seen = inode(&fb.join("huge.bin"));
                let mut arrived = t;
                wait(Duration::from_secs(600), || {
                    let now = inode(&fb.join("huge.bin"));
                    now != seen && {
                        seen = now;
                        arrived = Instant::now();
                        std::fs::read(fb.join("huge.bin")).is_ok_and(|d| d == base)
                    }
                });
                let took = (arrived - t).as_secs_f64();
                let wire = (bytes_in(&hb) - before) as f64 / 1e6;
                rounds.push((took, wire, written.as_secs_f64()));
            }
            let each: Vec<String> = (rounds.iter())
                .map(|(took, wire, written)| {
                    format!("{took:.2} s ({written:.2} s writing it) {wire:.2} MB")
                })
                .collect();
            let median = |pick: fn(&(f64, f64, f64)) -> f64| {
                let mut v: Vec<f64> = rounds.iter().map(pick).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "  (c) 1 MiB {what} in the middle of {} MiB, median of 3: {:.2} s, {:.2} MB on the wire (goal < 1 s, < 1.2 MB); each: {}",
                size >> 20,
                median(|r| r.0),
                median(|r| r.1),
                each.join(", ")
            );
        }
    }

    // (d) small-file latency.
    if only.contains('d') {
        let mut lat = Vec::new();
        for i in 0..40 {
            let name = format!("lat{i}.txt");
            let body = format!("latency sample {i}");
            let t = Instant::now();
            std::fs::write(fa.join(&name), &body).unwrap();
            let target = fb.join(&name);
            wait(Duration::from_secs(30), || {
                std::fs::read_to_string(&target).is_ok_and(|s| s == body)
            });
            lat.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        lat.sort();
        println!(
        "  (d) write on A -> complete on B, 40 small files: p50 {:.0} ms, p99 {:.0} ms (goal p50 < 250 ms)",
        lat[lat.len() / 2].as_secs_f64() * 1000.0,
        lat[lat.len() - 1].as_secs_f64() * 1000.0
    );
    }
    // (f) 1 GiB in 4 files already on disk, timed from the moment A is told to look at it.
    if only.contains('f') {
        let each = ((256u64 << 20) as f64 * scale) as usize;
        let (da, db) = (dir.path().join("bulk-a"), dir.path().join("bulk-b"));
        std::fs::create_dir_all(&db).unwrap();
        run(
            &hb,
            &["folder", "add", db.to_str().unwrap(), "--id", "bulk"],
        );
        std::fs::create_dir_all(&da).unwrap();
        for i in 0..4 {
            std::fs::write(da.join(format!("big{i}.bin")), random(each, 200 + i)).unwrap();
        }
        let (cpu_a, cpu_b) = (a.cpu_split(), b.cpu_split());
        let t = Instant::now();
        run(
            &ha,
            &["folder", "add", da.to_str().unwrap(), "--id", "bulk"],
        );
        let scanned = t.elapsed();
        for i in 0..4 {
            let p = db.join(format!("big{i}.bin"));
            wait(Duration::from_secs(600), || same_len(&p, each as u64));
        }
        let took = t.elapsed();
        let gib = (each * 4) as f64 / (1u64 << 30) as f64;
        println!(
            "  (f) {} MiB in 4 files on disk, from `folder add` on A to complete on B: {:.1} s, {:.0} MB/s (goal 400); A's scan {:.2} s",
            (each * 4) >> 20,
            took.as_secs_f64(),
            (each * 4) as f64 / 1e6 / took.as_secs_f64(),
            scanned.as_secs_f64()
        );
        let per_gib =
            |now: (f64, f64), then: (f64, f64)| ((now.0 - then.0) / gib, (now.1 - then.1) / gib);
        let (ua, sa) = per_gib(a.cpu_split(), cpu_a);
        let (ub, sb) = per_gib(b.cpu_split(), cpu_b);
        println!(
            "      CPU-seconds per GiB: A {:.2}, B {:.2} (goal ≤ 2.5 each); user + system: A {ua:.2} + {sa:.2}, B {ub:.2} + {sb:.2}",
            ua + sa,
            ub + sb
        );
    }
    if std::env::var("BENCH_DAEMON_LOG").is_ok() {
        for (home, name) in [(&ha, "a"), (&hb, "b")] {
            let kept = std::env::temp_dir().join(format!("meshsync-sync-bench-{name}.log"));
            std::fs::copy(home.join("daemon.log"), &kept).unwrap();
            println!("  daemon {name}'s log: {}", kept.display());
        }
    }
    println!(
        "  (e) peak RSS: A {:.0} MB, B {:.0} MB (goal < 100 MB each)",
        a.peak_rss_mb(),
        b.peak_rss_mb()
    );
}
