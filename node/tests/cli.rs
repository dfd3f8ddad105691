//! The `meshsync` binary as a user runs it: `init` and `id` from fresh homes, and the errors a
//! user meets (loose key permissions, mistyped IDs, a missing home).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn meshsync(home: &std::path::Path, args: &[&str]) -> Output {
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

#[test]
fn init_then_id_prints_a_checkable_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("laptop");
    let out = meshsync(&home, &["init", "--name", "laptop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = meshsync(&home, &["id"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 63);
    assert!(text(&meshsync(&home, &["init"]).stderr).contains(&id));

    // The ID checks out, and converts to the same peer ID the node reports for itself.
    let own = text(&meshsync(&home, &["id", "--peer-id"]).stdout);
    let checked = meshsync(&home, &["id", &id]);
    assert!(checked.status.success());
    let peer_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("peer ID"))
            .map(str::to_string)
    };
    assert_eq!(peer_line(&own), peer_line(&text(&checked.stdout)));
    assert!(peer_line(&own).unwrap().contains("12D3KooW"));

    // Two homes, two identities.
    let other = dir.path().join("desktop");
    assert!(meshsync(&other, &["init"]).status.success());
    assert_ne!(text(&meshsync(&other, &["id"]).stdout).trim(), id);

    // MESHSYNC_HOME works in place of --home.
    let out = Command::new(env!("CARGO_BIN_EXE_meshsync"))
        .arg("id")
        .env("MESHSYNC_HOME", &home)
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), id);
}

#[test]
fn loose_key_permissions_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(meshsync(&home, &["init"]).status.success());
    let key = home.join("keys/x25519.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let out = meshsync(&home, &["id"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn mistyped_and_malformed_ids_are_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(meshsync(&home, &["init"]).status.success());
    let id = text(&meshsync(&home, &["id"]).stdout).trim().to_string();
    let mut typo: Vec<char> = id.chars().collect();
    typo[10] = if typo[10] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    let out = meshsync(&home, &["id", &typo]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("mistyped"),
        "{}",
        text(&out.stderr)
    );
    let out = meshsync(&home, &["id", "HELLO"]);
    assert!(
        text(&out.stderr).contains("56 letters"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn commands_on_a_missing_home_say_to_run_init() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshsync(&dir.path().join("nothing-here"), &["id"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("meshsync init"));
    assert!(
        !dir.path().join("nothing-here").exists(),
        "a failed command creates nothing"
    );
}
