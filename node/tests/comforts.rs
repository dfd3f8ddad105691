//! What makes the CLI pleasant, run as a user runs it: shell completions and man pages made
//! from the command definitions, and `status --watch` against a real daemon.

use std::path::Path;
use std::process::{Command, Output, Stdio};
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

#[test]
fn completions_name_the_subcommands_in_each_shell() {
    let nowhere = Path::new("/nonexistent-home");
    let bash = ok(nowhere, &["completions", "bash"]);
    assert!(bash.contains("complete -F _meshsync"), "{bash}");
    for command in ["invite", "status", "service", "folder"] {
        assert!(bash.contains(command), "bash completion lacks {command}");
    }
    assert!(ok(nowhere, &["completions", "zsh"]).starts_with("#compdef meshsync"));
    assert!(ok(nowhere, &["completions", "fish"]).contains("__fish_meshsync"));
    let out = meshsync(nowhere, &["completions", "tcsh"]);
    assert!(!out.status.success());
}

#[test]
fn the_man_page_is_roff_with_every_command() {
    let nowhere = Path::new("/nonexistent-home");
    let page = ok(nowhere, &["man"]);
    assert!(page.contains(".TH meshsync 1"), "{page}");
    for command in ["invite", "status", "service", "completions"] {
        assert!(page.contains(command), "man page lacks {command}");
    }
    let dir = tempfile::tempdir().unwrap();
    ok(nowhere, &["man", "--dir", dir.path().to_str().unwrap()]);
    for file in [
        "meshsync.1",
        "meshsync-status.1",
        "meshsync-service-install.1",
    ] {
        let page = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(page.contains(".TH"), "{file}: {page}");
    }
}

#[test]
fn status_watch_prints_each_folder_every_second_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("laptop");
    ok(&home, &["init", "--name", "laptop"]);
    let folder = dir.path().join("Documents");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.txt"), "hello").unwrap();

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_meshsync"))
        .arg("--home")
        .arg(&home)
        .args(["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .env_remove("MESHSYNC_HOME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !meshsync(&home, &["status"]).status.success() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(
        &home,
        &["folder", "add", folder.to_str().unwrap(), "--id", "docs"],
    );
    // A file written moments before is left to settle (40 ms) and recorded by the rescan
    // after: wait for it, so that every line below has it.
    let recorded = |home: &Path| {
        let status: serde_json::Value =
            serde_json::from_str(&ok(home, &["status", "--json"])).unwrap();
        status["folders"][0]["local_files"] == 1
    };
    while !recorded(&home) {
        assert!(Instant::now() < deadline, "a.txt was never recorded");
        std::thread::sleep(Duration::from_millis(20));
    }

    // stdout is a pipe here: plain lines, one per folder per second.
    let watch = Command::new(env!("CARGO_BIN_EXE_meshsync"))
        .arg("--home")
        .arg(&home)
        .args(["status", "--watch"])
        .env_remove("MESHSYNC_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: kill(2) on our own child's pid; SIGINT is Ctrl-C.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let out = watch.wait_with_output().unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        out.status.success(),
        "Ctrl-C ends the watch cleanly: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("folder docs "))
        .collect();
    assert!(lines.len() >= 2, "a line a second: {stdout}");
    assert!(
        lines.iter().all(|l| l.contains("in sync (1 file)")),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "no terminal codes into a pipe: {stdout:?}"
    );
}

#[test]
fn status_watch_without_a_daemon_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    ok(&home, &["init"]);
    let out = meshsync(&home, &["status", "--watch"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("meshsync --home"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains(" up`"), "{}", text(&out.stderr));
}
