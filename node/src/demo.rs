//! `meshsync demo`: two real devices and a storage peer on this machine, step by step.
//!
//! It creates homes in a temporary folder, starts a real `meshsync up` daemon for each on
//! loopback (no mDNS: the demo sends nothing beyond this machine), pairs them with invite
//! codes, syncs a sample folder, edits on the other side, adds a storage peer (a NAS that
//! holds only ciphertext), and shows a device that was offline catching up through the storage
//! peer alone. The daemons are stopped at the end; the homes and folders stay to look at.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM for a clean stop, then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the meshsync executable")
}

fn run(home: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe()?)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("MESHSYNC_HOME")
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "meshsync {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start(home: &Path) -> anyhow::Result<Daemon> {
    start_on(home, "/ip4/127.0.0.1/tcp/0")
}

fn start_on(home: &Path, addr: &str) -> anyhow::Result<Daemon> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("daemon.log"))?;
    let child = Command::new(exe()?)
        .arg("--home")
        .arg(home)
        .args(["up", "--listen", addr, "--no-mdns"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let daemon = Daemon(child);
    wait(Duration::from_secs(20), || run(home, &["status"]).is_ok())
        .with_context(|| format!("the daemon in {} did not start", home.display()))?;
    Ok(daemon)
}

fn wait(timeout: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    anyhow::bail!("timed out")
}

/// A one-time invite code for `role` from the daemon of `home` (the last line printed).
fn invite(home: &Path, role: &str) -> anyhow::Result<String> {
    let out = run(home, &["invite", "--role", role, "--expires", "10m"])?;
    Ok(out
        .lines()
        .last()
        .context("an invite code")?
        .trim()
        .to_string())
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// Runs the demo in `dir` (a fresh temporary folder unless given).
pub fn run_demo(dir: Option<&Path>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("meshsync-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let (laptop, desktop) = (dir.join("laptop-home"), dir.join("desktop-home"));
    let (laptop_docs, desktop_docs) = (dir.join("laptop-docs"), dir.join("desktop-docs"));
    std::fs::create_dir_all(&laptop_docs)?;
    std::fs::create_dir_all(&desktop_docs)?;

    step("Two devices, each with its own Ed25519 identity (key files mode 0600)");
    run(&laptop, &["init", "--name", "laptop"])?;
    run(&desktop, &["init", "--name", "desktop"])?;
    println!("  laptop   {}", run(&laptop, &["id"])?.trim());
    println!("  desktop  {}", run(&desktop, &["id"])?.trim());

    step("The laptop starts its daemon and shares a folder");
    let laptop_daemon = start(&laptop)?;
    std::fs::write(laptop_docs.join("notes.txt"), "things to sync\n")?;
    std::fs::create_dir_all(laptop_docs.join("photos/2026"))?;
    let photo: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    std::fs::write(laptop_docs.join("photos/2026/beach.raw"), &photo)?;
    run(
        &laptop,
        &[
            "folder",
            "add",
            laptop_docs.to_str().context("path")?,
            "--id",
            "docs",
        ],
    )?;
    println!("  {} is folder \"docs\"", laptop_docs.display());

    step("The laptop invites the desktop; the desktop joins with the one-time code");
    let code = invite(&laptop, "device")?;
    println!("  code: {}…", &code[..code.len().min(48)]);
    println!("  {}", run(&desktop, &["join", &code])?.trim());

    step("The desktop starts its daemon and joins the folder");
    let desktop_daemon = start(&desktop)?;
    run(
        &desktop,
        &[
            "folder",
            "add",
            desktop_docs.to_str().context("path")?,
            "--id",
            "docs",
        ],
    )?;
    let took = wait(Duration::from_secs(60), || {
        std::fs::read(desktop_docs.join("photos/2026/beach.raw")).is_ok_and(|d| d == photo)
    })?;
    println!(
        "  the desktop has every file after {:.2} s (signed, verified, encrypted in flight)",
        took.as_secs_f64()
    );

    step("An edit on the desktop reaches the laptop");
    std::fs::write(
        desktop_docs.join("notes.txt"),
        "things to sync\nand an edit from the desktop\n",
    )?;
    let took = wait(Duration::from_secs(30), || {
        std::fs::read_to_string(laptop_docs.join("notes.txt")).is_ok_and(|t| t.contains("desktop"))
    })?;
    println!(
        "  seen by the watcher and synced in {:.0} ms",
        took.as_secs_f64() * 1000.0
    );

    step(
        "A NAS joins as a storage peer: it will hold everything, encrypted, and never gets the key",
    );
    let nas = dir.join("nas-home");
    run(&nas, &["init", "--storage", "--name", "nas"])?;
    run(&nas, &["join", &invite(&laptop, "storage")?])?;
    // A fixed address, as a NAS has; both devices are told it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let nas_addr = format!("/ip4/127.0.0.1/tcp/{port}");
    run(&laptop, &["peer", "add", &nas_addr])?;
    run(&desktop, &["peer", "add", &nas_addr])?;
    let _nas_daemon = start_on(&nas, &nas_addr)?;
    let holds_latest = |home: &Path| {
        run(home, &["status", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|s| {
                s["storage"][0]["holds_latest"] == true && s["storage"][0]["my_changes"] != 0
            })
    };
    let took = wait(Duration::from_secs(60), || holds_latest(&laptop))?;
    println!(
        "  the NAS holds the laptop's latest state after {:.2} s; what it knows:",
        took.as_secs_f64()
    );
    for line in run(&nas, &["status"])?.lines() {
        println!("    {line}");
    }

    step("The desktop goes offline; the laptop writes a file and goes offline too");
    drop(desktop_daemon);
    std::fs::write(
        laptop_docs.join("written-while-desktop-slept.txt"),
        "the desktop was off when this was written\n",
    )?;
    run(&laptop, &["scan"])?;
    wait(Duration::from_secs(60), || holds_latest(&laptop))?;
    drop(laptop_daemon);
    println!("  only the NAS is up now");

    step("The desktop comes back and catches up from the NAS alone");
    let _desktop_daemon = start(&desktop)?;
    let took = wait(Duration::from_secs(60), || {
        desktop_docs
            .join("written-while-desktop-slept.txt")
            .exists()
    })?;
    println!(
        "  the desktop has the laptop's new file after {:.2} s, from a peer that cannot read it",
        took.as_secs_f64()
    );

    step("meshsync status on the desktop");
    print!("{}", run(&desktop, &["status"])?);

    println!(
        "\nDone; the daemons are stopped. Homes, folders and daemon logs are in {}.\n\
         Try it for real: `meshsync init`, `meshsync up`, `meshsync folder add PATH` on each device,\n\
         `meshsync invite` on the first and `meshsync join CODE` on the others; on a NAS,\n\
         `meshsync init --storage` and a code from `meshsync invite --role storage`.",
        dir.display()
    );
    Ok(())
}
