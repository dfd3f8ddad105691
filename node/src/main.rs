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

/// mimalloc's `mi_option_allow_thp` (its place in `mi_option_t`, `mimalloc.h` v3).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// No transparent huge pages for this process. mimalloc v3 asks for them on every arena it
/// maps (`MADV_HUGEPAGE`), so the kernel backs a touched allocator page with a whole 2 MiB
/// page, which stays while any block in it lives. At a million files the daemon that scanned
/// and then served the first sync held 154–183 MB of live allocations in ~595 MB of memory,
/// growing by ~0.6 MB a second while it served (collecting every thread's heap gave back
/// 6 MB); without huge pages it stayed at ~265 MB all through the sync. mimalloc reads its
/// own `MIMALLOC_ALLOW_THP` before `main`, too early to set from here, so the process's THP
/// flag is turned off instead (the kernel checks it at each fault, so it also covers the
/// arena already mapped) and mimalloc stops asking. `MIMALLOC_ALLOW_THP`, if set, decides.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag of this process; no pointer.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    // SAFETY: sets one of mimalloc's options (an integer), before any thread runs.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
}

fn main() -> ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options (an integer), before any thread runs.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        no_huge_pages();
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
