//! The `meshsync` binary, built as part of this crate so that `cargo test -p meshsync-tests`
//! always has a current one to run: the very same `main` (included from `node/src/main.rs`).

include!("../../../node/src/main.rs");
