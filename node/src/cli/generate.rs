//! Shell completions and man pages, generated from the clap definitions in [`super::Cli`] so
//! they never fall behind the commands.
//!
//! ```sh
//! meshsync completions bash > ~/.local/share/bash-completion/completions/meshsync
//! meshsync man | man -l -
//! meshsync man --dir /usr/local/share/man/man1   # meshsync.1, meshsync-status.1, …
//! ```

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// `meshsync completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = super::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "meshsync", &mut script);
    to_stdout(&script).context("writing the completion script to stdout")
}

/// `meshsync man`: the roff man page on stdout, or with `dir` one page per command there.
pub fn man(dir: Option<&Path>) -> anyhow::Result<()> {
    let command = super::Cli::command();
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            to_stdout(&page).context("writing the man page to stdout")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is no error.
fn to_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
