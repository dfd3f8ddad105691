//! Managing members from the command line, with real daemons on loopback: only an admin may
//! change who is in the mesh (a non-admin is refused with a clear message), a device renames
//! itself, an admin grants and revokes admin and changes roles (the last admin stays one), and
//! `meshsync remove` cuts a device off at once (and `meshsync leave` takes one out by itself): the others and the storage peer drop it, list it as removed, and keep
//! syncing without it.

use std::time::Duration;

use meshsync_tests::{
    alice_and_bob, free_loopback_addr, invite, meshsync, meshsync_ok, path_text, same, wait_until,
    Daemon,
};

const LONG: Duration = Duration::from_secs(30);

fn devices(home: &std::path::Path) -> Vec<serde_json::Value> {
    let out = meshsync_ok(home, &["devices", "--json"]);
    serde_json::from_str(&out).expect("devices --json is JSON")
}

fn member<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|d| d["name"] == name)
}

fn refused(home: &std::path::Path, args: &[&str]) -> String {
    let out = meshsync(home, args);
    assert!(!out.status.success(), "meshsync {args:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn admins_manage_members_and_a_removed_device_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let joined = alice_and_bob(root);
    let (a, fa, fb) = (joined.a, joined.fa, joined.fb);
    let b = Daemon::start(&joined.hb);
    meshsync_ok(&b.home, &["folder", "add", path_text(&fb), "--id", "docs"]);
    // Carol joins too.
    let (hc, fc) = (root.join("c"), root.join("C"));
    std::fs::create_dir_all(&fc).unwrap();
    meshsync_ok(&hc, &["init", "--name", "carol"]);
    meshsync_ok(&hc, &["join", &invite(&a.home, "device")]);
    // A storage peer at a fixed address carol knows.
    let (hs, s_addr) = (root.join("s"), free_loopback_addr());
    meshsync_ok(&hs, &["init", "--storage", "--name", "nas"]);
    meshsync_ok(&hs, &["join", &invite(&a.home, "storage")]);
    let _s = Daemon::start_on(&hs, &s_addr);
    meshsync_ok(&hc, &["peer", "add", &s_addr]);
    let c = Daemon::start(&hc);
    meshsync_ok(&c.home, &["folder", "add", path_text(&fc), "--id", "docs"]);
    let reaches_storage = |home: &std::path::Path| {
        let status: serde_json::Value =
            serde_json::from_str(&meshsync_ok(home, &["status", "--json"])).unwrap();
        status["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["role"] == "storage" && p["connected"] == true)
        })
    };
    assert!(
        wait_until(LONG, || reaches_storage(&c.home)),
        "carol never reached the storage peer"
    );
    std::fs::write(fa.join("first.txt"), "to everyone").unwrap();
    meshsync_ok(&a.home, &["scan"]);
    assert!(wait_until(LONG, || same(
        &fa.join("first.txt"),
        &fc.join("first.txt")
    ) && same(
        &fa.join("first.txt"),
        &fb.join("first.txt")
    )));

    // Bob is no admin: he may not remove, promote or demote anyone.
    let why = refused(&b.home, &["remove", "carol"]);
    assert!(why.contains("not an admin"), "{why}");
    let why = refused(&b.home, &["admin", "grant", "carol"]);
    assert!(why.contains("not an admin"), "{why}");
    // He may rename himself, and everyone sees it.
    meshsync_ok(&b.home, &["name", "bobby"]);
    assert!(wait_until(LONG, || member(&devices(&a.home), "bobby").is_some()));

    // Alice makes bob an admin; bob, now one, makes carol read-only. Alice takes bob's admin
    // back; then she is the last admin and cannot drop her own.
    meshsync_ok(&a.home, &["admin", "grant", "bobby"]);
    assert!(wait_until(LONG, || member(&devices(&b.home), "bobby")
        .is_some_and(|d| d["admin"] == true)));
    meshsync_ok(&b.home, &["role", "carol", "read-only"]);
    assert!(wait_until(LONG, || member(&devices(&a.home), "carol")
        .is_some_and(|d| d["role"] == "read-only")));
    meshsync_ok(&a.home, &["admin", "revoke", "bobby"]);
    let why = refused(&a.home, &["admin", "revoke", "alice"]);
    assert!(why.contains("last admin"), "{why}");
    let why = refused(&a.home, &["remove", "nobody-of-that-name"]);
    assert!(why.contains("no member"), "{why}");

    // Alice removes carol, who is online: dropped by both others, listed as removed.
    let out = meshsync_ok(&a.home, &["remove", "carol"]);
    assert!(out.contains("key epoch 1"), "{out}");
    let carol_peers_gone = wait_until(LONG, || {
        let status: serde_json::Value =
            serde_json::from_str(&meshsync_ok(&c.home, &["status", "--json"])).unwrap();
        status["peers"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["connected"] == false))
    });
    assert!(
        carol_peers_gone,
        "carol is still connected (to a member or the storage peer)"
    );
    // ...and stays out (her daemon keeps dialing the storage peer's address).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !reaches_storage(&c.home),
        "the storage peer let carol back in"
    );
    for home in [&a.home, &b.home] {
        assert!(wait_until(LONG, || devices(home)
            .iter()
            .any(|d| d["role"] == "removed" && d["removed_in"] == 1)));
    }
    // The others keep syncing; carol gets nothing new.
    std::fs::write(fa.join("after.txt"), "not for carol").unwrap();
    meshsync_ok(&a.home, &["scan"]);
    assert!(wait_until(LONG, || same(
        &fa.join("after.txt"),
        &fb.join("after.txt")
    )));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!fc.join("after.txt").exists());
    let listed = devices(&a.home);
    let bobby = member(&listed, "bobby").unwrap();
    assert_eq!(bobby["epoch"], 1, "{bobby}");
    assert!(bobby["connected"] == true, "{bobby}");
    // Where a connected member is reached, and where this device listens (both on loopback).
    let on_loopback = |d: &serde_json::Value| {
        (d["addresses"].as_array()).is_some_and(|a| {
            !a.is_empty()
                && a.iter()
                    .all(|a| a.as_str().unwrap().starts_with("/ip4/127.0.0.1/"))
        })
    };
    assert!(on_loopback(bobby), "{bobby}");
    let me = listed.iter().find(|d| d["this_device"] == true).unwrap();
    assert!(me["connected"] == true && on_loopback(me), "{me}");
    let carol = listed.iter().find(|d| d["role"] == "removed").unwrap();
    assert!(carol["connected"] == false, "{carol}");

    // Bob leaves: alice hears it at once, his daemon stops, his state (and every key the mesh
    // wrapped to him) is gone, his files stay.
    let mut b = b;
    let out = meshsync_ok(&b.home, &["leave"]);
    assert!(out.contains("2 members heard it"), "{out}"); // alice and the storage peer
    assert!(wait_until(LONG, || b.exited()), "bob's daemon did not stop");
    assert!(!b.home.join("state.redb").exists());
    assert!(b.home.join("keys").exists(), "his own identity stays");
    assert!(fb.join("after.txt").exists(), "his files stay");
    let removed = devices(&a.home)
        .iter()
        .filter(|d| d["role"] == "removed")
        .count();
    assert_eq!(removed, 2, "carol and bob");
    // Alice, alone now, is still the last admin and cannot leave without one.
    let why = refused(&a.home, &["leave"]);
    assert!(why.contains("last admin"), "{why}");
}
