use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's allocator: a daemon that scanned or received a million files
/// kept about twice the memory it used (glibc held on to the freed pages of every burst),
/// and the many small allocations of a scan are cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = meshsync_node::cli::Cli::parse();
    match meshsync_node::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshsync: {error:#}");
            ExitCode::FAILURE
        }
    }
}
