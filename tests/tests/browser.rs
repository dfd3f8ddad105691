//! The web page in a real browser (Debian's headless Chromium, driven over WebDriver by
//! chromedriver): two real daemons; on A's page a person makes an invite, B joins with it and
//! B's page shows its folder go to "in sync"; a conflict is settled from A's page, an old
//! version restored from it, and deletions the mass-delete guard held are allowed from it. Screenshots of each page go to `target/web-screenshots/`.
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them and sets
//! `MESHSYNC_REQUIRE_BROWSER=1`, which makes their absence a failure; elsewhere the test says
//! it did not run and how to make it run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use meshsync_tests::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a free loopback port, and a headless Chromium session through it.
async fn browser(profile: &Path) -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Waits until `css` matches and `check` holds for its text (the page's live part is
/// replaced every second, so elements are found afresh each try).
async fn wait_text(client: &Client, css: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if check(&text) {
                    return text;
                }
            }
        }
        if Instant::now() > deadline {
            screenshot(client, "failed").await;
            let source = client.source().await.unwrap_or_default();
            panic!("{css} never came right on the page:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks the first element matching `css` (retrying while the live part is being replaced).
async fn click(client: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if element.click().await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "cannot click {css}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn absent(client: &Client, css: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client.find(Locator::Css(css)).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn screenshot(client: &Client, name: &str) {
    let dir = meshsync_bin()
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("web-screenshots"))
        .unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

fn link(home: &Path) -> String {
    let (addr, token) = web_link(home);
    format!("http://{addr}/?token={token}")
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

fn conflict_copy(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.contains(".sync-conflict-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_pairs_resolves_and_restores_from_the_page() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var_os("MESHSYNC_REQUIRE_BROWSER").is_none(),
            "chromium and chromium-driver are required (apt-get install chromium chromium-driver)"
        );
        eprintln!("NOT RUN: install chromium and chromium-driver to run the browser test");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (ha, hb) = (root.path().join("a"), root.path().join("b"));
    let (fa, fb) = (root.path().join("A"), root.path().join("B"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    std::fs::create_dir_all(fa.join("notes")).unwrap();
    for i in 0..40 {
        std::fs::write(fa.join(format!("notes/{i:02}.txt")), format!("note {i}\n")).unwrap();
    }
    std::fs::write(fa.join("photos.bin"), random(64 << 20, 7)).unwrap();
    std::fs::write(fa.join("notes.txt"), b"the first draft\n").unwrap();
    meshsync_ok(&ha, &["init", "--name", "alice-laptop"]);
    meshsync_ok(&hb, &["init", "--name", "bob-desktop"]);
    let _a = Daemon::start_with_web(&ha);
    meshsync_ok(&ha, &["folder", "add", path_text(&fa), "--id", "docs"]);
    let (_driver, client) = browser(&root.path().join("profile")).await;

    // A's page: make an invite; the code and its QR code are shown.
    client.goto(&link(&ha)).await.unwrap();
    wait_text(&client, "#devices", |t| t.contains("alice-laptop")).await;
    click(&client, "#make-invite").await;
    let code = wait_text(&client, "#invite-code", |t| !t.trim().is_empty()).await;
    assert!(client.find(Locator::Css("#invite .qr svg")).await.is_ok());
    screenshot(&client, "1-invite").await;

    // B joins with the code from the page; its page shows the folder go to "in sync".
    meshsync_ok(&hb, &["join", code.trim()]);
    let mut b = Daemon::start_with_web(&hb);
    meshsync_ok(&hb, &["folder", "add", path_text(&fb), "--id", "docs"]);
    client.goto(&link(&hb)).await.unwrap();
    let mut saw_progress = false;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let state = wait_text(&client, "#folder-docs .state", |_| true).await;
        let detail = wait_text(&client, "#folder-docs .detail", |_| true).await;
        // Before a member answers, B's empty folder waits; it is never "in sync" with nothing.
        assert!(
            !(state == "in sync" && detail == "0 files"),
            "B's page said in sync before it had heard of any file"
        );
        if state == "in sync" && detail == "42 files" {
            break;
        }
        if !saw_progress && state == "syncing" {
            screenshot(&client, "2-syncing").await;
            saw_progress = true;
        }
        assert!(Instant::now() < deadline, "B's folder never in sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(same(&fa.join("photos.bin"), &fb.join("photos.bin")));
    assert!(same(&fa.join("notes/39.txt"), &fb.join("notes/39.txt")));
    screenshot(&client, "3-in-sync").await;

    // Back on A's page: the used invite is no longer shown; B is listed.
    client.goto(&link(&ha)).await.unwrap();
    wait_text(&client, "#devices", |t| t.contains("bob-desktop")).await;
    assert!(
        absent(&client, "#invite-code").await,
        "a used invite code is still shown"
    );
    screenshot(&client, "4-devices").await;

    // A conflict: both edit notes.txt while B is stopped.
    assert!(wait_until(Duration::from_secs(60), || same(
        &fa.join("notes.txt"),
        &fb.join("notes.txt")
    )));
    b.kill();
    std::fs::write(fa.join("notes.txt"), b"alice's edit of the draft\n").unwrap();
    meshsync_ok(&ha, &["scan"]);
    std::fs::write(fb.join("notes.txt"), b"bob's edit of the draft, longer\n").unwrap();
    let _b = Daemon::start_with_web(&hb);
    meshsync_ok(&hb, &["scan"]);
    wait_text(&client, "#conflicts .conflict", |t| t.contains("notes.txt")).await;
    assert!(wait_until(Duration::from_secs(60), || conflict_copy(&fa).is_some()));
    let copy = conflict_copy(&fa).unwrap();
    let (before_original, before_copy) = (read(fa.join("notes.txt")), read(fa.join(&copy)));
    wait_text(&client, "#conflicts .conflict", |t| {
        t.contains("alice's edit") && t.contains("bob's edit")
    })
    .await;
    screenshot(&client, "5-conflict").await;

    // Keep the copy's version: it takes the original's place on both devices.
    click(&client, "#conflicts button.keep-copy").await;
    assert!(
        wait_until(Duration::from_secs(60), || read(fa.join("notes.txt"))
            == before_copy
            && !fa.join(&copy).exists()),
        "keeping the copy from the page did not put it in place"
    );
    assert!(wait_until(Duration::from_secs(60), || read(
        fb.join("notes.txt")
    ) == before_copy
        && !fb.join(&copy).exists()));
    wait_text(&client, "#conflicts", |t| t.contains("None.")).await;

    // The version it replaced is kept: restore it from the page.
    wait_text(&client, r#"#versions .kept[data-path="notes.txt"]"#, |t| {
        t.contains("#1")
    })
    .await;
    screenshot(&client, "6-versions").await;
    click(
        &client,
        r#"#versions .kept[data-path="notes.txt"] button.restore"#,
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(60), || read(fa.join("notes.txt"))
            == before_original),
        "restoring from the page did not bring back the replaced version"
    );
    wait_text(&client, ".notice", |t| t.contains("Restored")).await;
    assert!(wait_until(Duration::from_secs(60), || read(
        fb.join("notes.txt")
    ) == before_original));
    screenshot(&client, "7-restored").await;

    // Most of the folder gone from A at once: the mass-delete guard holds it until allowed on
    // the page.
    std::fs::rename(fa.join("notes"), root.path().join("notes-away")).unwrap();
    let _ = meshsync(&ha, &["scan"]);
    wait_text(&client, "#folder-docs .held", |t| {
        t.contains("41 deletions held") // 40 files and their folder
    })
    .await;
    assert!(fb.join("notes/00.txt").exists(), "a held delete reached B");
    screenshot(&client, "8-held-deletes").await;
    click(&client, "#folder-docs .held button").await;
    assert!(
        wait_until(Duration::from_secs(60), || !fb
            .join("notes/00.txt")
            .exists()
            && !fb.join("notes/39.txt").exists()),
        "allowing the deletions on the page did not carry them out"
    );
    assert!(fb.join("photos.bin").exists() && fb.join("notes.txt").exists());
    client.close().await.unwrap();
}
