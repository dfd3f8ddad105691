//! What both node benchmarks need: the `meshsync` binary, real daemons in temporary homes,
//! their peak RSS and CPU time, and test data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshsync"))
}

pub fn run(home: &Path, args: &[&str]) -> String {
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

pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Stops the daemon as a service manager would (SIGTERM) and waits for it to exit;
    /// returns how long it took.
    #[allow(dead_code)] // not every bench restarts a daemon
    pub fn stop(mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: kill only sends a signal to the child this value owns.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
        t.elapsed()
    }

    /// User + system CPU time the daemon has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let (user, system) = self.cpu_split();
        user + system
    }

    /// User and system CPU time the daemon has used so far, apart.
    pub fn cpu_split(&self) -> (f64, f64) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        // Fields after the command name (in parentheses): utime is the 12th, stime the 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let seconds = |i: usize| {
            let ticks = fields.get(i).and_then(|f| f.parse::<f64>().ok());
            // SAFETY: sysconf only reads a constant.
            ticks.unwrap_or(0.0) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
        };
        (seconds(11), seconds(12))
    }

    pub fn peak_rss_mb(&self) -> f64 {
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

pub fn start(home: &Path) -> Daemon {
    start_on(home, "/ip4/127.0.0.1/tcp/0")
}

/// A daemon on `home` listening on `listen`.
pub fn start_on(home: &Path, listen: &str) -> Daemon {
    // Appended to: a restarted daemon's log follows what it logged before.
    let log = (std::fs::OpenOptions::new().create(true).append(true))
        .open(home.join("daemon.log"))
        .unwrap();
    let child = Command::new(bin())
        .arg("--home")
        .arg(home)
        .args(["up", "--listen", listen, "--no-mdns", "--no-web"])
        .env(
            "RUST_LOG",
            std::env::var("BENCH_DAEMON_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon(child);
    // Generous: a kept million-file home started with a cold page cache reads its state first.
    wait_every(Duration::from_millis(5), Duration::from_secs(120), || {
        Command::new(bin())
            .arg("--home")
            .arg(home)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    d
}

pub fn wait_every(poll: Duration, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(poll);
    }
    panic!("timed out after {timeout:?}");
}

pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Polls `check` every 5 ms (for latency figures) until it holds; panics after `timeout`.
pub fn wait(timeout: Duration, check: impl FnMut() -> bool) -> Duration {
    wait_every(Duration::from_millis(5), timeout, check)
}

/// One core's AES-256-GCM (`ring`) sealing rate over 256 MiB, MB/s: the same-run reference.
pub fn aes_gcm_mb_s() -> f64 {
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).unwrap(),
    );
    let mut buf = random(256 << 20, 1);
    let t = Instant::now();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key([1; 12]),
        ring::aead::Aad::empty(),
        &mut buf,
    )
    .unwrap();
    256.0 * 1.048576 / t.elapsed().as_secs_f64()
}

/// One core's rate finding FastCDC cut points through 256 MiB of random bytes, MB/s: the
/// `fastcdc` crate's `cut` and meshsync's four-lane cutter (the same cut points).
pub fn cdc_mb_s() -> (f64, f64) {
    use meshsync_node::chunks::content::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
    use std::hint::black_box;
    let data = random(256 << 20, 3);
    let through = |cut: &dyn Fn(&[u8]) -> usize| {
        let (t, mut at) = (Instant::now(), 0);
        while at < data.len() {
            at += black_box(cut(&data[at..data.len().min(at + MAX_CHUNK)]));
        }
        256.0 * 1.048576 / t.elapsed().as_secs_f64()
    };
    let (s, l) = fastcdc::v2020::select_masks(AVG_CHUNK, fastcdc::v2020::Normalization::Level1);
    let crate_cut =
        |w: &[u8]| fastcdc::v2020::cut(w, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, s, l, s << 1, l << 1).1;
    let cutter = meshsync_node::chunks::cdc::Cutter::new(MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    (through(&crate_cut), through(&|w: &[u8]| cutter.cut(w)))
}

/// One core's BLAKE3 rate over 256 MiB, MB/s.
pub fn blake3_mb_s() -> f64 {
    let data = random(256 << 20, 2);
    let t = Instant::now();
    std::hint::black_box(blake3::hash(&data));
    256.0 * 1.048576 / t.elapsed().as_secs_f64()
}
