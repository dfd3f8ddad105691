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
        // No web page: the demo's daemons are gone when it ends (and 8385 may be the user's).
        .args(["up", "--listen", addr, "--no-mdns", "--no-web"])
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

/// The demo's folders: two devices' homes and synced folders, in one directory.
struct Demo {
    dir: PathBuf,
    laptop: PathBuf,
    desktop: PathBuf,
    laptop_docs: PathBuf,
    desktop_docs: PathBuf,
}

/// Runs the demo in `dir` (a fresh temporary folder unless given).
pub fn run_demo(dir: Option<&Path>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("meshsync-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let demo = Demo {
        laptop: dir.join("laptop-home"),
        desktop: dir.join("desktop-home"),
        laptop_docs: dir.join("laptop-docs"),
        desktop_docs: dir.join("desktop-docs"),
        dir,
    };
    std::fs::create_dir_all(&demo.laptop_docs)?;
    std::fs::create_dir_all(&demo.desktop_docs)?;
    let laptop_daemon = demo.share_a_folder()?;
    let desktop_daemon = demo.pair_and_sync()?;
    let _nas_daemon = demo.add_a_nas()?;
    demo.catch_up_through_the_nas(laptop_daemon, desktop_daemon)?;
    println!(
        "\nDone; the daemons are stopped. Homes, folders and daemon logs are in {}.\n\
         Try it for real: `meshsync init`, `meshsync up`, `meshsync folder add PATH` on each device,\n\
         `meshsync invite` on the first and `meshsync join CODE` on the others; on a NAS,\n\
         `meshsync init --storage` and a code from `meshsync invite --role storage`.",
        demo.dir.display()
    );
    Ok(())
}

/// The sample photo the laptop shares.
fn photo() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect()
}

impl Demo {
    /// Two identities; the laptop's daemon shares a folder.
    fn share_a_folder(&self) -> anyhow::Result<Daemon> {
        let (laptop, desktop, laptop_docs) = (&self.laptop, &self.desktop, &self.laptop_docs);
        step("Two devices, each with its own Ed25519 identity (key files mode 0600)");
        run(laptop, &["init", "--name", "laptop"])?;
        run(desktop, &["init", "--name", "desktop"])?;
        println!("  laptop   {}", run(laptop, &["id"])?.trim());
        println!("  desktop  {}", run(desktop, &["id"])?.trim());

        step("The laptop starts its daemon and shares a folder");
        let laptop_daemon = start(laptop)?;
        std::fs::write(laptop_docs.join("notes.txt"), "things to sync\n")?;
        std::fs::create_dir_all(laptop_docs.join("photos/2026"))?;
        std::fs::write(laptop_docs.join("photos/2026/beach.raw"), photo())?;
        let path = laptop_docs.to_str().context("path")?;
        run(laptop, &["folder", "add", path, "--id", "docs"])?;
        println!("  {} is folder \"docs\"", laptop_docs.display());
        Ok(laptop_daemon)
    }

    /// The desktop pairs, syncs the folder, and an edit on it reaches the laptop.
    fn pair_and_sync(&self) -> anyhow::Result<Daemon> {
        let (laptop, desktop) = (&self.laptop, &self.desktop);
        let (laptop_docs, desktop_docs) = (&self.laptop_docs, &self.desktop_docs);
        step("The laptop invites the desktop; the desktop joins with the one-time code");
        let code = invite(laptop, "device")?;
        println!("  code: {}…", &code[..code.len().min(48)]);
        println!("  {}", run(desktop, &["join", &code])?.trim());

        step("The desktop starts its daemon and joins the folder");
        let desktop_daemon = start(desktop)?;
        let path = desktop_docs.to_str().context("path")?;
        run(desktop, &["folder", "add", path, "--id", "docs"])?;
        let photo = photo();
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
            std::fs::read_to_string(laptop_docs.join("notes.txt"))
                .is_ok_and(|t| t.contains("desktop"))
        })?;
        println!(
            "  seen by the watcher and synced in {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        Ok(desktop_daemon)
    }

    /// A NAS joins as a storage peer and gets the laptop's latest state.
    fn add_a_nas(&self) -> anyhow::Result<Daemon> {
        let (laptop, desktop) = (&self.laptop, &self.desktop);
        step(
            "A NAS joins as a storage peer: it will hold everything, encrypted, and never gets the key",
        );
        let nas = self.dir.join("nas-home");
        run(&nas, &["init", "--storage", "--name", "nas"])?;
        run(&nas, &["join", &invite(laptop, "storage")?])?;
        // A fixed address, as a NAS has; both devices are told it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let nas_addr = format!("/ip4/127.0.0.1/tcp/{port}");
        run(laptop, &["peer", "add", &nas_addr])?;
        run(desktop, &["peer", "add", &nas_addr])?;
        let nas_daemon = start_on(&nas, &nas_addr)?;
        let took = wait(Duration::from_secs(60), || holds_latest(laptop))?;
        println!(
            "  the NAS holds the laptop's latest state after {:.2} s; what it knows:",
            took.as_secs_f64()
        );
        for line in run(&nas, &["status"])?.lines() {
            println!("    {line}");
        }
        Ok(nas_daemon)
    }

    /// Both devices go offline in turn; the desktop catches up from the NAS alone.
    fn catch_up_through_the_nas(
        &self,
        laptop_daemon: Daemon,
        desktop_daemon: Daemon,
    ) -> anyhow::Result<()> {
        let (laptop, desktop) = (&self.laptop, &self.desktop);
        step("The desktop goes offline; the laptop writes a file and goes offline too");
        drop(desktop_daemon);
        std::fs::write(
            self.laptop_docs.join("written-while-desktop-slept.txt"),
            "the desktop was off when this was written\n",
        )?;
        run(laptop, &["scan"])?;
        wait(Duration::from_secs(60), || holds_latest(laptop))?;
        drop(laptop_daemon);
        println!("  only the NAS is up now");

        step("The desktop comes back and catches up from the NAS alone");
        let _desktop_daemon = start(desktop)?;
        let took = wait(Duration::from_secs(60), || {
            self.desktop_docs
                .join("written-while-desktop-slept.txt")
                .exists()
        })?;
        println!(
            "  the desktop has the laptop's new file after {:.2} s, from a peer that cannot read it",
            took.as_secs_f64()
        );

        step("meshsync status on the desktop");
        print!("{}", run(desktop, &["status"])?);
        Ok(())
    }
}

/// Whether the storage peer holds this device's latest sealed change.
fn holds_latest(home: &Path) -> bool {
    run(home, &["status", "--json"])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|s| {
            s["storage"][0]["holds_latest"] == true && s["storage"][0]["my_changes"] != 0
        })
}
