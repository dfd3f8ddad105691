use std::process::ExitCode;

use clap::Parser;

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
