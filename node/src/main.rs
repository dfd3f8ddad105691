use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's allocator: a daemon that scanned or received a million files
/// kept about twice the memory it used (glibc held on to the freed pages of every burst),
/// and the many small allocations of a scan are cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_t`, `mimalloc.h` v3): the
/// Rust bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed pages stay with the daemon before they go back to the system: mimalloc's
/// default (1 s) gave them back between two changes a few seconds apart, and the next change
/// took them again, each zeroed by the kernel. At a million files that was a quarter of the
/// receiving daemon's CPU for each 1,000-file change (1.2–1.4 CPU-s a change with 1.5 s
/// between changes; 0.8 with 5 s). Idle memory goes back all the same, 5 s later
/// (`MIMALLOC_PURGE_DELAY` still overrides it).
const PURGE_DELAY_MS: std::ffi::c_long = 5_000;

fn main() -> ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options (an integer), before any thread runs.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    let cli = meshsync_node::cli::Cli::parse();
    match meshsync_node::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshsync: {error:#}");
            ExitCode::FAILURE
        }
    }
}
