//! `meshsync` under systemd, as a user sets it up: `service install` writes a unit that
//! `systemd-analyze verify` accepts, naming every synced folder; `service uninstall` removes
//! it; the real daemon tells a notify socket it is ready and keeps the watchdog; and its log,
//! written to a file, carries no colour codes. Nothing here runs `systemctl`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn meshsync(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshsync"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("MESHSYNC_HOME")
        .output()
        .expect("the meshsync binary runs")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = meshsync(home, args);
    assert!(
        out.status.success(),
        "meshsync {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary directory outside /tmp: a service's private /tmp would hide a home there, so
/// `service install` refuses one (and Unix socket paths must stay short). Cargo's target
/// directory unless the checkout itself is under /tmp (as a CI clone may be); then the user's
/// home directory.
fn workdir() -> tempfile::TempDir {
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let in_tmp = |p: &std::path::Path| p.starts_with("/tmp") || p.starts_with("/var/tmp");
    if !in_tmp(target) {
        return tempfile::tempdir_in(target).unwrap();
    }
    let home = std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    assert!(
        !in_tmp(&home),
        "no directory outside /tmp to make a test home in"
    );
    tempfile::Builder::new()
        .prefix(".meshsync-test-")
        .tempdir_in(home)
        .unwrap()
}

/// `meshsync init` in `dir/name`.
fn init(dir: &Path, name: &str) -> PathBuf {
    let home = dir.join(name);
    ok(&home, &["init", "--name", name]);
    home
}

/// A `meshsync up` on loopback, killed when dropped.
struct Daemon(Child);

impl Daemon {
    fn spawn(home: &Path, env: &[(&str, &Path)], stderr: Stdio) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshsync"));
        command
            .arg("--home")
            .arg(home)
            .args(["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .env_remove("MESHSYNC_HOME")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        Daemon(command.spawn().expect("meshsync up starts"))
    }

    /// Waits until `status` answers.
    fn wait_serving(&mut self, home: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !meshsync(home, &["status"]).status.success() {
            assert!(self.0.try_wait().unwrap().is_none(), "the daemon stopped");
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as systemd stops a service, and waits for the process to end.
    fn terminate(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `systemd-analyze verify` on `unit`: it must pass and print nothing (it reports a bad
/// setting as a warning, with exit code 0). `None` if systemd-analyze is not installed.
fn verify(unit: &Path, user: bool, runtime_dir: &Path) -> Option<Output> {
    let mut command = Command::new("systemd-analyze");
    if user {
        // A user manager needs a runtime directory; tests have no login session.
        command.arg("--user").env("XDG_RUNTIME_DIR", runtime_dir);
    }
    match command.arg("verify").arg(unit).output() {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        other => Some(other.expect("systemd-analyze runs")),
    }
}

fn assert_verified(unit: &Path, user: bool, runtime_dir: &Path) {
    let Some(out) = verify(unit, user, runtime_dir) else {
        eprintln!("systemd-analyze is not installed: the unit is not verified (CI installs it)");
        assert!(std::env::var_os("CI").is_none(), "CI must install systemd");
        return;
    };
    let unit_text = std::fs::read_to_string(unit).unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify {}: {}{}\n{unit_text}",
        unit.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn service_install_writes_a_hardened_unit_that_systemd_accepts() {
    let dir = workdir();
    let home = init(dir.path(), "server");
    let folder = dir.path().join("Documents 100%");
    std::fs::create_dir(&folder).unwrap();
    let units = dir.path().join("units");
    let units_arg = units.to_str().unwrap();

    // With the daemon running, the folders come from it.
    let mut daemon = Daemon::spawn(&home, &[], Stdio::null());
    daemon.wait_serving(&home);
    ok(
        &home,
        &["folder", "add", folder.to_str().unwrap(), "--id", "docs"],
    );
    let out = ok(
        &home,
        &["service", "install", "--user", "--unit-dir", units_arg],
    );
    assert!(out.contains("a daemon runs for this home now"), "{out}");
    let unit = units.join("meshsync.service");
    let from_daemon = std::fs::read_to_string(&unit).unwrap();
    daemon.terminate();

    // Without it, from the home's state: the same unit, now updated in place.
    let out = ok(
        &home,
        &["service", "install", "--user", "--unit-dir", units_arg],
    );
    assert!(out.contains("updated"), "{out}");
    assert!(
        out.lines()
            .any(|l| l == "systemctl --user daemon-reload && systemctl --user restart meshsync"),
        "{out}"
    );
    let written = std::fs::read_to_string(&unit).unwrap();
    assert_eq!(written, from_daemon);

    let home_abs = std::fs::canonicalize(&home).unwrap();
    let folder_abs = std::fs::canonicalize(&folder).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_meshsync")).unwrap();
    for line in [
        format!("Environment=\"MESHSYNC_HOME={}\"", home_abs.display()),
        format!("ExecStart=\"{}\" up", exe.display()),
        format!(
            "ReadWritePaths=\"{}\" \"-{}\"",
            home_abs.display(),
            folder_abs.display().to_string().replace('%', "%%")
        ),
        "Type=notify".into(),
        "ProtectSystem=strict".into(),
        "NoNewPrivileges=yes".into(),
        "PrivateTmp=yes".into(),
        "Restart=on-failure".into(),
        "WatchdogSec=60s".into(),
    ] {
        assert!(
            written.lines().any(|l| l == line),
            "{line} not in\n{written}"
        );
    }
    assert_verified(&unit, true, dir.path());

    // A system unit runs as the invoking user.
    let system = dir.path().join("system");
    let out = ok(
        &home,
        &[
            "service",
            "install",
            "--system",
            "--unit-dir",
            system.to_str().unwrap(),
        ],
    );
    assert!(
        out.lines()
            .any(|l| l == "systemctl daemon-reload && systemctl enable --now meshsync"),
        "{out}"
    );
    let system_unit = system.join("meshsync.service");
    let written = std::fs::read_to_string(&system_unit).unwrap();
    assert!(written.lines().any(|l| l.starts_with("User=")), "{written}");
    assert_verified(&system_unit, false, dir.path());
}

#[test]
fn service_uninstall_removes_the_unit_and_its_enable_link() {
    let dir = workdir();
    let home = init(dir.path(), "laptop");
    let units = dir.path().join("units");
    let units_arg = units.to_str().unwrap();
    let out = ok(&home, &["service", "install", "--unit-dir", units_arg]);
    assert!(
        out.lines().any(
            |l| l == "systemctl --user daemon-reload && systemctl --user enable --now meshsync"
        ),
        "{out}"
    );
    // What `systemctl --user enable` would make.
    let wants = units.join("default.target.wants");
    std::fs::create_dir(&wants).unwrap();
    std::os::unix::fs::symlink(
        units.join("meshsync.service"),
        wants.join("meshsync.service"),
    )
    .unwrap();

    let out = ok(&home, &["service", "uninstall", "--unit-dir", units_arg]);
    assert!(out.contains("systemctl --user stop meshsync"), "{out}");
    assert!(!units.join("meshsync.service").exists());
    assert!(wants.join("meshsync.service").symlink_metadata().is_err());

    let out = meshsync(&home, &["service", "uninstall", "--unit-dir", units_arg]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--system"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_home_in_tmp_is_refused_for_a_service() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let home = init(dir.path(), "t");
    let out = meshsync(
        &home,
        &[
            "service",
            "install",
            "--unit-dir",
            dir.path().join("u").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PrivateTmp"),
        "{}",
        text(&out.stderr)
    );
}

/// Reads datagrams from `socket` until `want` has arrived in one, or `timeout`.
fn receive_until(socket: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
        assert!(
            Instant::now() < deadline,
            "no {want} within {timeout:?}; got {seen:?}"
        );
        if let Ok(n) = socket.recv(&mut buffer) {
            seen.push(text(&buffer[..n]));
        }
    }
}

#[test]
fn under_systemd_the_daemon_says_ready_keeps_the_watchdog_and_says_stopping() {
    let dir = workdir();
    let home = init(dir.path(), "nas");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    // A 1 s watchdog: the daemon must ping every half second.
    let daemon = Daemon::spawn(
        &home,
        &[
            ("NOTIFY_SOCKET", &socket_path),
            ("WATCHDOG_USEC", Path::new("1000000")),
        ],
        log.into(),
    );
    let mut seen = Vec::new();
    receive_until(&socket, "READY=1", Duration::from_secs(30), &mut seen);
    // Ready means the control socket answers.
    ok(&home, &["status"]);
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("folders in sync")),
        "{ready}"
    );
    let pings = |seen: &Vec<String>| seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buffer = [0u8; 4096];
    while pings(&seen) < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 watchdog pings: {seen:?}"
        );
        if let Ok(n) = socket.recv(&mut buffer) {
            seen.push(text(&buffer[..n]));
        }
    }
    daemon.terminate();
    receive_until(&socket, "STOPPING=1", Duration::from_secs(5), &mut seen);
}

#[test]
fn the_daemon_log_in_a_file_has_no_colour_codes() {
    let dir = workdir();
    let home = init(dir.path(), "desk");
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Daemon::spawn(&home, &[], log.into());
    daemon.wait_serving(&home);
    daemon.terminate();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("INFO"), "the daemon logged nothing: {log:?}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in the log file:\n{log}"
    );
}
