//! Helpers for end-to-end tests: find the `meshsync` binary that `cargo test` built and run it
//! in temporary homes.
//!
//! The binary they run is `meshsync-e2e`, this crate's own build of the `meshsync` binary (the
//! same `main`, see `src/bin/meshsync-e2e.rs`): cargo builds it before this crate's tests, so
//! `cargo test -p meshsync-tests` from a clean checkout works on its own, and never runs a stale
//! binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `meshsync` binary of this build (see the crate docs).
pub fn meshsync_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = profile_dir.join("meshsync-e2e");
    assert!(
        bin.exists(),
        "{} is missing: cargo builds it before the tests of meshsync-tests",
        bin.display()
    );
    bin
}

/// Runs `meshsync --home HOME ARGS...` to completion.
pub fn meshsync(home: &Path, args: &[&str]) -> Output {
    Command::new(meshsync_bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("MESHSYNC_HOME")
        .output()
        .expect("the meshsync binary runs")
}

/// Runs a command that must succeed and returns its standard output.
pub fn meshsync_ok(home: &Path, args: &[&str]) -> String {
    let out = meshsync(home, args);
    assert!(
        out.status.success(),
        "meshsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `meshsync up` process in its own home, on loopback; stopped (SIGKILL) when dropped.
pub struct Daemon {
    pub home: std::path::PathBuf,
    child: std::process::Child,
}

impl Daemon {
    /// Starts the daemon and waits until its control socket answers.
    pub fn start(home: &Path) -> Daemon {
        Daemon::start_on(home, "/ip4/127.0.0.1/tcp/0")
    }

    /// [`Daemon::start`] listening on `addr` (a loopback multiaddr).
    pub fn start_on(home: &Path, addr: &str) -> Daemon {
        let daemon = Daemon::spawn_on(home, addr);
        let ready = wait_until(std::time::Duration::from_secs(20), || {
            meshsync(home, &["status", "--json"]).status.success()
        });
        assert!(ready, "daemon in {} did not come up", home.display());
        daemon
    }

    /// Starts the daemon on loopback without waiting for it to answer (it may stop by itself
    /// before it would).
    pub fn spawn(home: &Path) -> Daemon {
        Daemon::spawn_on(home, "/ip4/127.0.0.1/tcp/0")
    }

    /// [`Daemon::start`] with its web page on, on a free loopback port (`meshsync web`
    /// prints the link).
    pub fn start_with_web(home: &Path) -> Daemon {
        use std::io::Write;
        let config = home.join("config.toml");
        let text = std::fs::read_to_string(&config).expect("config.toml");
        if !text.contains("\nweb_port = 0") {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .expect("config.toml");
            writeln!(file, "\nweb_port = 0").expect("config written");
        }
        let daemon = Daemon::spawn_with(home, "/ip4/127.0.0.1/tcp/0", true);
        let ready = wait_until(std::time::Duration::from_secs(20), || {
            meshsync(home, &["web"]).status.success()
        });
        assert!(ready, "the web page of {} did not come up", home.display());
        daemon
    }

    fn spawn_on(home: &Path, addr: &str) -> Daemon {
        Daemon::spawn_with(home, addr, false)
    }

    fn spawn_with(home: &Path, addr: &str, web: bool) -> Daemon {
        let log = std::fs::File::create(home.join("daemon.log")).expect("daemon log");
        let child = Command::new(meshsync_bin())
            .arg("--home")
            .arg(home)
            // Loopback only, and no mDNS: tests send nothing beyond this machine.
            .args(["up", "--listen", addr, "--no-mdns"])
            // The page only where a test looks at it (each on a port of its own).
            .args(if web { &[][..] } else { &["--no-web"][..] })
            .env_remove("MESHSYNC_HOME")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("meshsync up starts");
        Daemon {
            home: home.to_path_buf(),
            child,
        }
    }

    /// `meshsync status --json` as a value.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&meshsync_ok(&self.home, &["status", "--json"]))
            .expect("status is JSON")
    }

    /// Whether the daemon process has ended (by itself).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP address with a port nothing listens on now (for a daemon that must come
/// back on the same address after a restart).
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("bound").port();
    format!("/ip4/127.0.0.1/tcp/{port}")
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    check()
}

/// Whether two files exist with the same bytes.
pub fn same(a: &Path, b: &Path) -> bool {
    matches!((std::fs::read(a), std::fs::read(b)), (Ok(x), Ok(y)) if x == y)
}

/// `len` deterministic pseudo-random bytes (xorshift from `seed`): incompressible test data.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An invite code for `role` from the daemon of `home` (the last line `meshsync invite` prints).
pub fn invite(home: &Path, role: &str) -> String {
    meshsync_ok(home, &["invite", "--role", role])
        .lines()
        .last()
        .expect("an invite code")
        .trim()
        .to_string()
}

/// Whether a device's status says its storage peer holds its latest sealed change.
pub fn storage_holds_latest(status: &serde_json::Value) -> bool {
    status["storage"][0]["holds_latest"] == true && status["storage"][0]["my_changes"] != 0
}

/// The daemon log of `home`.
pub fn log_of(home: &Path) -> String {
    std::fs::read_to_string(home.join("daemon.log")).unwrap_or_default()
}

/// Homes under `dir` for the devices `names` (each home and device named after its entry) and
/// a storage peer `s`, every device given the storage peer's fixed loopback address (as a NAS
/// has): returns that address, for `Daemon::start_on`.
pub fn homes_with_storage(dir: &Path, names: &[&str]) -> String {
    let addr = free_loopback_addr();
    meshsync_ok(&dir.join("s"), &["init", "--storage", "--name", "s"]);
    for name in names {
        meshsync_ok(&dir.join(name), &["init", "--name", name]);
        meshsync_ok(&dir.join(name), &["peer", "add", &addr]);
    }
    addr
}

/// Alice's daemon running with folder `docs` at `root/A`, and Bob (home `root/b`, folder
/// `root/B`, not started) joined to her mesh: where two-device tests begin.
pub struct Joined {
    pub a: Daemon,
    pub hb: PathBuf,
    pub fa: PathBuf,
    pub fb: PathBuf,
}

/// Sets up [`Joined`] under `root`.
pub fn alice_and_bob(root: &Path) -> Joined {
    let (ha, hb) = (root.join("a"), root.join("b"));
    let (fa, fb) = (root.join("A"), root.join("B"));
    std::fs::create_dir_all(&fa).expect("folder A");
    std::fs::create_dir_all(&fb).expect("folder B");
    meshsync_ok(&ha, &["init", "--name", "alice"]);
    meshsync_ok(&hb, &["init", "--name", "bob"]);
    let a = Daemon::start(&ha);
    meshsync_ok(&ha, &["folder", "add", path_text(&fa), "--id", "docs"]);
    meshsync_ok(&hb, &["join", &invite(&ha, "device")]);
    Joined { a, hb, fa, fb }
}

/// The link `meshsync web` prints for `home`: (address, secret).
pub fn web_link(home: &Path) -> (String, String) {
    let out = meshsync_ok(home, &["web"]);
    let link = out.lines().last().expect("a link").trim().to_string();
    let rest = link.strip_prefix("http://").expect("an http link");
    let (addr, token) = rest.split_once("/?token=").expect("a token in the link");
    (addr.to_string(), token.to_string())
}

/// A path as command-line text.
pub fn path_text(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
