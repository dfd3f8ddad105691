//! The checks at the end of a run (and the wait for convergence they start with).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use super::Sim;

/// Every member's folder as a map of path → content.
type Trees = Vec<(usize, BTreeMap<String, Vec<u8>>)>;

impl Sim {
    fn trees(&self) -> Trees {
        self.members
            .iter()
            .map(|&i| (i, synced(&self.nodes[i].folder)))
            .collect()
    }

    /// Whether every member's folder is the same and holds every write not deleted.
    fn converged(&self, trees: &Trees) -> bool {
        let same = trees.windows(2).all(|w| w[0].1 == w[1].1);
        let contents: BTreeSet<&Vec<u8>> = trees[0].1.values().collect();
        same && self
            .written
            .iter()
            .all(|w| w.deleted || contents.contains(&w.content))
    }

    /// Waits (at most `within`) until the members' folders converge.
    pub(super) async fn settle(&self, within: Duration) -> bool {
        let since = Instant::now();
        while since.elapsed() < within {
            if self.converged(&self.trees()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Waits until every folder is the same, holds every write and every member holds the same
    /// replicated state; says why not by `within` after the last heal.
    pub(super) async fn converge(&mut self, within: Duration) {
        let deadline = self.last_heal + within;
        loop {
            let trees = self.trees();
            if self.converged(&trees) && self.same_state().await {
                self.report.convergence = Some(self.last_heal.elapsed());
                return;
            }
            if Instant::now() > deadline {
                let differ = trees.iter().filter(|(_, t)| *t != trees[0].1).count();
                self.report.failures.push(format!(
                    "not converged {within:?} after the last heal: {differ} of {} folders differ from node {}'s",
                    trees.len() - 1,
                    trees[0].0
                ));
                if self.converged(&trees) {
                    self.report
                        .failures
                        .push("folders agree, but the replicated state differs".into());
                }
                self.explain(&trees).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every member holds the same membership log and index (their heads).
    async fn same_state(&self) -> bool {
        let mut digests = BTreeSet::new();
        for &i in &self.members {
            digests.insert(self.nodes[i].device().lock().await.replica_digest());
        }
        digests.len() == 1
    }

    /// What differs from the first member's folder, what each node still needs, which writes
    /// are lost.
    async fn explain(&mut self, trees: &Trees) {
        let shown = |k: &String, v: &Vec<u8>| {
            let text = String::from_utf8_lossy(&v[..v.len().min(120)]).to_string();
            format!("{k} = {text:?}")
        };
        let (first, base) = &trees[0];
        for (i, t) in trees.iter().skip(1) {
            let differ: Vec<String> = t
                .iter()
                .filter(|(k, v)| base.get(*k) != Some(v))
                .map(|(k, v)| shown(k, v))
                .chain(
                    base.iter()
                        .filter(|(k, _)| !t.contains_key(*k))
                        .map(|(k, v)| format!("(only node {first}) {}", shown(k, v))),
                )
                .take(12)
                .collect();
            if !differ.is_empty() {
                self.report
                    .failures
                    .push(format!("node {i} differs: {differ:#?}"));
            }
        }
        for &i in &self.members {
            let status = self.nodes[i].status().await;
            let f = &status.folders[0];
            self.report.failures.push(format!(
                "node {i}: in sync {}, needs {} files, not written {:?}, unavailable {:?}",
                f.in_sync, f.need_files, f.not_written, f.unavailable
            ));
        }
        let contents: BTreeSet<&Vec<u8>> = base.values().collect();
        for w in self.written.iter().filter(|w| !w.deleted) {
            if !contents.contains(&w.content) {
                self.report
                    .failures
                    .push(format!("lost write: {}", shown(&w.name, &w.content)));
            }
        }
    }

    /// Nothing outside any folder, no temp file left (a rewrite in progress may finish first),
    /// and each node's traffic and the process's peak memory into the report.
    pub(super) async fn check_leftovers(&mut self) -> anyhow::Result<()> {
        let temps = |root: &Path| -> Vec<String> {
            tree(root)
                .into_keys()
                .filter(|p| p.contains(".meshsync-tmp-"))
                .collect()
        };
        // The verdict is the last listing itself: listing again after it saw none could catch
        // a rewrite just begun (a catch-up's), not a temp file left behind (CI saw that once).
        let settle = Instant::now();
        let left: BTreeMap<usize, Vec<String>> = loop {
            let left: BTreeMap<usize, Vec<String>> = (self.members.iter())
                .map(|&i| (i, temps(&self.nodes[i].folder)))
                .filter(|(_, left)| !left.is_empty())
                .collect();
            if left.is_empty() || settle.elapsed() >= Duration::from_secs(15) {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if std::fs::read_dir(&self.outside)?.count() != 0 {
            self.report
                .failures
                .push("something was written outside every folder".into());
        }
        for (i, left) in &left {
            self.report
                .failures
                .push(format!("node {i} keeps temp files {left:?}"));
        }
        for n in &self.nodes {
            if !n.is_running() {
                continue;
            }
            let traffic = n.device().lock().await.transport().traffic();
            self.report
                .bytes_in
                .push(traffic.values().map(|t| t.0).sum());
            self.report
                .bytes_out
                .push(traffic.values().map(|t| t.1).sum());
        }
        self.report.peak_rss = peak_rss();
        Ok(())
    }

    /// A removed device holds nothing written after every member knew of its removal.
    pub(super) fn check_removed(&mut self) {
        for &(node, known_at) in &self.removed {
            let held: BTreeSet<Vec<u8>> = synced(&self.nodes[node].folder).into_values().collect();
            for w in &self.written[known_at..] {
                if held.contains(&w.content) {
                    self.report.failures.push(format!(
                        "removed node {node} holds {:?}, written after its removal",
                        w.name
                    ));
                }
            }
        }
    }
}

impl Sim {
    /// The storage peer's disk holds no name and no content of any write (every file under
    /// its home scanned for each; a large file by a slice of its middle).
    pub(super) fn check_storage_plaintext(&mut self) {
        let Some(storage) = &self.storage else { return };
        let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
        for w in &self.written {
            let base = w.name.rsplit('/').next().unwrap_or(&w.name).to_string();
            needles.push((format!("the name {base:?}"), base.into_bytes()));
            let middle = w.content.len() / 2;
            let slice = &w.content[middle.saturating_sub(24)..(middle + 24).min(w.content.len())];
            needles.push((format!("the content of {:?}", w.name), slice.to_vec()));
        }
        for (rel, bytes) in tree(&storage.home) {
            for (what, needle) in &needles {
                if memchr::memmem::find(&bytes, needle).is_some() {
                    self.report.failures.push(format!(
                        "the storage peer's {rel} holds {what} in plaintext"
                    ));
                }
            }
        }
    }
}

/// Every file under `root` (links as "link -> target"), the daemon's own files left out.
pub(super) fn synced(root: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(root)
        .into_iter()
        .filter(|(rel, _)| !rel.split('/').any(|c| c.starts_with(".meshsync")))
        .collect()
}

fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let what = if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                format!("link -> {}", target.display()).into_bytes()
            } else if kind.is_dir() {
                stack.push(path.clone());
                b"dir".to_vec()
            } else {
                std::fs::read(&path).unwrap_or_default()
            };
            out.insert(rel, what);
        }
    }
    out
}

/// The process's peak resident size, bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}
