//! Helpers for end-to-end tests: find the `meshsync` binary that `cargo test` built and run it
//! in temporary homes.
//!
//! The binary is built by `cargo test` because `meshsync-node` has integration tests of its
//! own; it sits next to the test executables' `deps/` directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `meshsync` binary of this build.
pub fn meshsync_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = profile_dir.join("meshsync");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
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
