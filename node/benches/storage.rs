//! A device pushing 1 GiB into a storage peer on loopback: `cargo bench -p meshsync-node
//! --bench storage`. Prints the push rate (from the storage peer's start to it holding the
//! device's latest state), the storage peer's peak RSS, and its disk use against the
//! ciphertext it holds; and, measured in the same run, raw loopback TCP and one-core
//! AES-256-GCM rates for comparison. `STORAGE_BENCH_MB=256` pushes less.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{random, run, start};

/// Polls every 100 ms: each poll runs the CLI (a process), which must not weigh on the
/// figures.
fn wait(timeout: Duration, check: impl FnMut() -> bool) -> Duration {
    common::wait_every(Duration::from_millis(100), timeout, check)
}

fn status(home: &Path) -> serde_json::Value {
    serde_json::from_str(&run(home, &["status", "--json"])).unwrap()
}

fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += disk_bytes(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Raw loopback TCP, one stream, for comparison: MB/s.
fn raw_tcp(mb: usize) -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    for _ in 0..mb {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    let total = reader.join().unwrap();
    total as f64 / 1e6 / t.elapsed().as_secs_f64()
}

fn main() {
    let mb: usize = std::env::var("STORAGE_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let dir =
        tempfile::tempdir_in(std::env::var("SYNC_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let (ha, hs) = (dir.path().join("a"), dir.path().join("s"));
    let fa = dir.path().join("A");
    std::fs::create_dir_all(&fa).unwrap();
    for i in 0..4 {
        std::fs::write(
            fa.join(format!("big{i}.bin")),
            random((mb << 20) / 4, 200 + i),
        )
        .unwrap();
    }
    run(&ha, &["init", "--name", "a"]);
    run(&hs, &["init", "--storage", "--name", "s"]);
    let a = start(&ha);
    run(
        &ha,
        &["folder", "add", fa.to_str().unwrap(), "--id", "bench"],
    );
    let code = run(&ha, &["invite", "--role", "storage"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    run(&hs, &["join", &code]);

    println!(
        "storage bench: a device pushes {mb} MiB into a storage peer on loopback, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("  reference: raw loopback TCP {:.0} MB/s", raw_tcp(2048));
    println!(
        "  reference: AES-256-GCM {:.0} MB/s (one core)",
        common::aes_gcm_mb_s()
    );

    let cpu_a = a.cpu_seconds();
    let t = Instant::now();
    let s = start(&hs);
    wait(Duration::from_secs(600), || {
        let st = status(&ha);
        st["storage"][0]["holds_latest"] == true && st["storage"][0]["my_changes"] != 0
    });
    let took = t.elapsed();
    let held = status(&hs);
    let chunk_bytes = held["holds"]["chunk_bytes"].as_u64().unwrap_or(0);
    let sealed_bytes = held["holds"]["sealed_bytes"].as_u64().unwrap_or(0);
    let store_disk = disk_bytes(&hs.join("chunks"));
    let home_disk = disk_bytes(&hs);
    println!(
        "  push: {mb} MiB in {:.2} s = {:.0} MB/s of file data (goal >= 300)",
        took.as_secs_f64(),
        (mb << 20) as f64 / 1e6 / took.as_secs_f64()
    );
    println!(
        "  CPU during the push: device {:.2} s, storage peer {:.2} s ({:.1} CPU-s available on 2 cores)",
        a.cpu_seconds() - cpu_a,
        s.cpu_seconds(),
        2.0 * took.as_secs_f64()
    );
    println!(
        "  storage peer peak RSS: {:.0} MB (goal < 100)",
        s.peak_rss_mb()
    );
    println!(
        "  storage peer disk: chunk store {:.1} MB for {:.1} MB of ciphertext = {:.3}x (goal <= 1.10); whole home {:.1} MB for {:.1} MB of ciphertext and sealed changes = {:.3}x",
        store_disk as f64 / 1e6,
        chunk_bytes as f64 / 1e6,
        store_disk as f64 / chunk_bytes.max(1) as f64,
        home_disk as f64 / 1e6,
        (chunk_bytes + sealed_bytes) as f64 / 1e6,
        home_disk as f64 / (chunk_bytes + sealed_bytes).max(1) as f64
    );
}
