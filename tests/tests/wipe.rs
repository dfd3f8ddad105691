//! Remote wipe, best effort, with real daemons on loopback: carol joined accepting remote wipe,
//! dave did not. Both are offline (stolen) when alice removes them with `--wipe`. When carol's
//! laptop comes back online it reaches alice, is told of its signed removal (and nothing
//! else), checks it against the log it holds, erases its folder's content, its keys and its
//! state, and stops. Dave's is only refused: his files and keys stay. (A forged or replayed
//! order is refused by `MembershipLog::check_removal`; see the crdt tests.)

use std::time::Duration;

use meshsync_tests::{alice_and_bob, invite, meshsync_ok, path_text, same, wait_until, Daemon};

const LONG: Duration = Duration::from_secs(30);

fn devices(home: &std::path::Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&meshsync_ok(home, &["devices", "--json"])).unwrap()
}

#[test]
fn a_removed_device_that_accepted_wipe_erases_itself_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let joined = alice_and_bob(root);
    let (a, fa) = (joined.a, joined.fa);
    std::fs::write(fa.join("shared.txt"), "everyone had this").unwrap();
    meshsync_ok(&a.home, &["scan"]);

    let mut laptops = Vec::new();
    for (name, accept) in [("carol", true), ("dave", false)] {
        let (home, folder) = (root.join(name), root.join(name.to_uppercase()));
        std::fs::create_dir_all(&folder).unwrap();
        meshsync_ok(&home, &["init", "--name", name]);
        let code = invite(&a.home, "device");
        let mut join = vec!["join", code.as_str()];
        if accept {
            join.push("--accept-remote-wipe");
        }
        meshsync_ok(&home, &join);
        let daemon = Daemon::start(&home);
        meshsync_ok(
            &home,
            &["folder", "add", path_text(&folder), "--id", "docs"],
        );
        std::fs::write(folder.join(format!("{name}-notes.txt")), "mine").unwrap();
        meshsync_ok(&home, &["scan"]);
        assert!(wait_until(LONG, || same(
            &fa.join("shared.txt"),
            &folder.join("shared.txt")
        )));
        let note = fa.join(format!("{name}-notes.txt"));
        assert!(wait_until(LONG, || note.exists()));
        laptops.push((name, home, folder, daemon, accept));
    }
    // Alice knows who accepted remote wipe.
    assert!(wait_until(LONG, || devices(&a.home)
        .iter()
        .any(|d| d["name"] == "carol" && d["remote_wipe"] == true)));
    assert!(devices(&a.home)
        .iter()
        .any(|d| d["name"] == "dave" && d["remote_wipe"] == false));

    // Both laptops are stolen (offline); alice removes them with --wipe.
    for (_, _, _, daemon, _) in laptops.iter_mut() {
        daemon.kill();
    }
    let out = meshsync_ok(&a.home, &["remove", "carol", "--wipe"]);
    assert!(out.contains("wipe ordered: it erases"), "{out}");
    let out = meshsync_ok(&a.home, &["remove", "dave", "--wipe"]);
    assert!(out.contains("did not accept remote wipe"), "{out}");

    // They come back online.
    for (name, home, folder, daemon, accept) in laptops.iter_mut() {
        if *accept {
            // It may wipe and stop before it would answer a status.
            *daemon = Daemon::spawn(home);
            let stopped = wait_until(LONG, || daemon.exited());
            assert!(
                stopped,
                "{name}'s daemon did not wipe and stop:\n{}",
                meshsync_tests::log_of(home)
            );
            let left: Vec<_> = std::fs::read_dir(&*folder).unwrap().collect();
            assert!(left.is_empty(), "{name}'s folder still holds {left:?}");
            assert!(!home.join("keys").exists(), "{name}'s keys are still there");
            assert!(
                !home.join("state.redb").exists(),
                "{name}'s state is still there"
            );
        } else {
            *daemon = Daemon::start(home);
            std::thread::sleep(Duration::from_secs(3));
            assert!(!daemon.exited(), "{name}'s daemon stopped");
            assert!(folder.join(format!("{name}-notes.txt")).exists());
            assert!(folder.join("shared.txt").exists());
            assert!(home.join("keys").exists());
            let status: serde_json::Value =
                serde_json::from_str(&meshsync_ok(home, &["status", "--json"])).unwrap();
            let connected = status["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["connected"] == true));
            assert!(!connected, "{name} is let in: {status}");
        }
    }
    // Alice's folder is untouched by all this.
    assert!(fa.join("shared.txt").exists());
    assert!(fa.join("carol-notes.txt").exists());
}
