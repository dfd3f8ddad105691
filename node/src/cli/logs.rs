//! The daemon's log on stderr: `RUST_LOG` filters it (default `info`), and it is coloured only
//! for a person at a terminal. Written to a file, a pipe or the journal it is plain text, and
//! `NO_COLOR` (<https://no-color.org>) turns colour off everywhere. `MESHSYNC_LOG_SPANS=1`
//! also logs each span (a scan, a materialise, a sync exchange) as it closes, with the time it
//! was busy and idle: where a slow change spends its time.

use std::io::IsTerminal;

/// Starts the daemon's log (once; later calls do nothing).
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_span_events(if std::env::var_os("MESHSYNC_LOG_SPANS").is_some() {
            tracing_subscriber::fmt::format::FmtSpan::CLOSE
        } else {
            tracing_subscriber::fmt::format::FmtSpan::NONE
        })
        .with_writer(std::io::stderr)
        .try_init();
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything but "".
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
