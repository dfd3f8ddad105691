//! `meshsync status --watch`: the daemon's status again every second until Ctrl-C. On a
//! terminal, one live progress bar per folder that is not in sync (bytes still needed, rate,
//! time left; "in sync" otherwise) under a line about peers; to a file or a pipe, one plain
//! line per folder per second.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanDuration, MultiProgress, ProgressBar, ProgressStyle};

use super::print::clean;
use crate::control::{self, FolderStatus, Request, Status};
use crate::home::Home;

const EVERY: Duration = Duration::from_secs(1);

/// Runs the watch until Ctrl-C (or until the daemon stops, which is an error).
pub fn watch(home: &Home) -> anyhow::Result<()> {
    home.load_keys()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut view = if std::io::stdout().is_terminal() {
            View::Bars(Bars::new())
        } else {
            View::Plain(BTreeMap::new())
        };
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let result = loop {
            let status = match control::call::<Status>(home.path(), &Request::Status).await {
                Ok(Some(status)) => status,
                Ok(None) => break Err(no_daemon(home)),
                Err(error) => break Err(error),
            };
            view.show(&status);
            tokio::select! {
                _ = &mut ctrl_c => break Ok(()),
                _ = tokio::time::sleep(EVERY) => {}
            }
        };
        view.finish();
        result
    })
}

fn no_daemon(home: &Home) -> anyhow::Error {
    anyhow::anyhow!(
        "no daemon is running for {home} (or it stopped); start it with `meshsync --home {home} up`",
        home = home.path().display()
    )
}

enum View {
    Bars(Bars),
    /// The need of each folder at the last line printed, for the rate.
    Plain(BTreeMap<String, (Instant, u64)>),
}

impl View {
    fn show(&mut self, status: &Status) {
        match self {
            View::Bars(bars) => bars.show(status),
            View::Plain(last) => print_plain(status, last),
        }
    }

    fn finish(&mut self) {
        if let View::Bars(bars) = self {
            bars.header.abandon();
            for bar in bars.folders.values() {
                bar.abandon();
            }
        }
    }
}

fn folders(status: &Status) -> &[FolderStatus] {
    match status {
        Status::Device(d) => &d.folders,
        Status::Storage(_) => &[],
    }
}

/// One line per folder (or, on a storage peer, the summary).
fn print_plain(status: &Status, last: &mut BTreeMap<String, (Instant, u64)>) {
    if let Status::Storage(_) = status {
        println!("{}", crate::notify::summary(status));
        return;
    }
    let now = Instant::now();
    for f in folders(status) {
        let previous = last.insert(f.id.clone(), (now, f.need_bytes));
        let rate = previous.and_then(|(at, need)| {
            let secs = now.duration_since(at).as_secs_f64();
            (need > f.need_bytes && secs > 0.0).then(|| (need - f.need_bytes) as f64 / secs)
        });
        println!("{}", plain_line(f, rate));
    }
}

/// `folder ID PATH: in sync`, or what it still needs, and how fast that shrinks.
fn plain_line(f: &FolderStatus, bytes_per_sec: Option<f64>) -> String {
    let name = format!("folder {} {}", clean(&f.id), clean(&f.path));
    if f.in_sync {
        return format!("{name}: in sync ({})", files(f.local_files as u64));
    }
    let mut line = format!(
        "{name}: syncing, need {} ({})",
        files(f.need_files),
        HumanBytes(f.need_bytes)
    );
    if let Some(rate) = bytes_per_sec.filter(|r| *r >= 1.0) {
        let left = Duration::from_secs_f64(f.need_bytes as f64 / rate);
        line.push_str(&format!(
            ", {}/s, {} left",
            HumanBytes(rate as u64),
            HumanDuration(left)
        ));
    }
    line
}

/// The live view: a line about peers, and a bar per folder.
struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    folders: BTreeMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout());
        let header = multi.add(ProgressBar::new(0).with_style(style("{msg}")));
        Bars {
            multi,
            header,
            folders: BTreeMap::new(),
        }
    }

    fn show(&mut self, status: &Status) {
        let head = match status {
            Status::Device(d) => format!("device {}", d.device_id),
            Status::Storage(s) => format!("storage peer {}", s.device_id),
        };
        self.header
            .set_message(format!("{head}\n{}", crate::notify::summary(status)));
        let shown = folders(status);
        self.folders.retain(|id, bar| {
            let keep = shown.iter().any(|f| &f.id == id);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for f in shown {
            let bar = self.folders.entry(f.id.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_prefix(clean(&f.id));
                bar
            });
            update(bar, f);
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

const SYNCING: &str =
    "{prefix:.bold} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}";

/// The bar's length is the most the folder needed since it last was in sync; its position,
/// how much of that arrived (indicatif measures the rate and the time left from it).
fn update(bar: &ProgressBar, f: &FolderStatus) {
    if f.in_sync {
        bar.set_style(style("{prefix:.bold} {msg}"));
        bar.set_length(0);
        bar.set_message(format!(
            "in sync ({}) {}",
            files(f.local_files as u64),
            clean(&f.path)
        ));
        return;
    }
    if bar.length() == Some(0) {
        bar.set_style(style(SYNCING));
        bar.reset();
    }
    let total = bar.length().unwrap_or(0).max(f.need_bytes);
    bar.set_length(total);
    bar.set_position(total - f.need_bytes);
    bar.set_message(format!("{} to go", files(f.need_files)));
}

fn files(n: u64) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(need_files: u64, need_bytes: u64) -> FolderStatus {
        FolderStatus {
            id: "docs".into(),
            path: "/home/ann/Documents".into(),
            in_sync: need_files == 0,
            need_files,
            need_bytes,
            local_files: 12,
            conflicts: 0,
            held_deletes: 0,
            unavailable: vec![],
            waiting_for_peers: false,
            not_written: vec![],
        }
    }

    #[test]
    fn plain_lines_name_the_folder_and_what_it_needs() {
        assert_eq!(
            plain_line(&folder(0, 0), None),
            "folder docs /home/ann/Documents: in sync (12 files)"
        );
        assert_eq!(
            plain_line(&folder(3, 2_000_000), None),
            "folder docs /home/ann/Documents: syncing, need 3 files (1.91 MiB)"
        );
        assert_eq!(
            plain_line(&folder(3, 2_000_000), Some(1_000_000.0)),
            "folder docs /home/ann/Documents: syncing, need 3 files (1.91 MiB), 976.56 KiB/s, 2 seconds left"
        );
    }
}
