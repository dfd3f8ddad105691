//! A device pushing 1 GiB into a storage peer on loopback: `cargo bench -p meshsync-node
//! --bench storage`. Prints the push rate (from the storage peer's start to it holding the
//! device's latest state), the storage peer's peak RSS, and its disk use against the
//! ciphertext it holds; and, measured in the same run, raw loopback TCP and one-core
//! AES-256-GCM rates for comparison. `STORAGE_BENCH_MB=256` pushes less.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshsync"))
}

fn run(home: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshsync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// User + system CPU time the daemon has used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        // Fields after the command name (in parentheses): utime is the 12th, stime the 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
            .sum();
        // SAFETY: sysconf only reads a constant.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    fn peak_rss_mb(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

fn start(home: &Path) -> Daemon {
    let log = std::fs::File::create(home.join("daemon.log")).unwrap();
    let child = Command::new(bin())
        .arg("--home")
        .arg(home)
        .args(["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon(child);
    wait(Duration::from_secs(20), || {
        Command::new(bin())
            .arg("--home")
            .arg(home)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    d
}

fn wait(timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        // Each poll runs the CLI (a process): not so often that it weighs on the figures.
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?}");
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
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
    let data = random(256 << 20, 1);
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).unwrap(),
    );
    let mut buf = data.clone();
    let t = Instant::now();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key([1; 12]),
        ring::aead::Aad::empty(),
        &mut buf,
    )
    .unwrap();
    println!(
        "  reference: AES-256-GCM {:.0} MB/s (one core)",
        256.0 * 1.048576 / t.elapsed().as_secs_f64()
    );
    drop((data, buf));

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
