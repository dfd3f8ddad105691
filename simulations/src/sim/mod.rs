//! A seeded simulation of a mesh of real devices (the device engine of `meshsync-node`, each
//! with its own home and folder on disk and its own runtime, over libp2p's in-memory
//! transport) under faults, checked at the end: every member's folder byte-identical and its
//! replicated state (membership and index heads) identical, every write made during the run
//! present (as the file or a conflict copy) unless a device deleted it, nothing written
//! outside any folder, no temp file left, and a removed device holding nothing written after
//! every member knew of its removal.
//!
//! The schedule ([`schedule`]) comes from the seed alone, so a failing `--seed` replays the
//! same events (thread timing may differ, the events do not).
//!
//! Faults: partitions (the mesh split in two groups that cannot reach each other) and heals;
//! concurrent creates and edits of the same paths on both sides of a partition; a symlink out
//! of the folder on one side and a directory of the same name on the other; deletes and
//! renames (with `--versus-edits`, also of a file the other side of a partition is editing); a device crashing (its runtime shut down with every task in flight) while a large
//! file travels, and restarting from its home; a device joining, and one being removed
//! (all on by default; `--no-faults` leaves partitions and edits only); every fourth device
//! on slow, lossy links; a storage peer,
//! sometimes the only meeting point of two groups, whose disk is scanned for plaintext.

mod check;
mod node;
mod schedule;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshsync_crdt::FolderId;
use meshsync_transport::shape::LinkShape;
use meshsync_transport::PeerId;

use node::{Node, StorageNode};
use schedule::{schedule, Dice, Event};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub seed: u64,
    /// Events in the schedule.
    pub events: usize,
    /// How long the mesh may take to converge after the last heal.
    pub converge_within: Duration,
    /// Crashes and restarts, joins and removals too.
    pub faults: bool,
    /// A storage peer in the mesh (sometimes the only meeting point of two groups).
    pub storage: bool,
    /// Every fourth device on slow, lossy links ([`BAD_LINK`]).
    pub bad_links: bool,
    /// Some concurrent edits become a delete or a rename on one side while the other edits
    /// (off by default: it finds failures still open, see the session-5 note).
    pub versus_edits: bool,
}

/// The links of a device with bad ones: 4 MiB/s, and one write in 5,000 breaks the connection.
pub const BAD_LINK: LinkShape = LinkShape {
    bytes_per_sec: 4 << 20,
    breaks_per_million_writes: 200,
};

/// Whether device `node` has bad links.
fn bad_link(bad_links: bool, node: usize) -> Option<LinkShape> {
    (bad_links && node % 4 == 3).then_some(BAD_LINK)
}

/// What a run measured, and what its checks found (empty `failures`: all held).
#[derive(Debug, Default)]
pub struct Report {
    pub nodes: usize,
    pub seed: u64,
    pub writes: usize,
    pub partitions: usize,
    /// Crashes (each while a large file travels), joins and removals played.
    pub crashes: usize,
    pub joins: usize,
    pub removals: usize,
    /// Partitions only the storage peer bridged (writes crossed through it).
    pub bridged: usize,
    /// From the last heal until every folder was identical with every write in it.
    pub convergence: Option<Duration>,
    /// Bytes each node received and sent (over the whole run).
    pub bytes_in: Vec<u64>,
    pub bytes_out: Vec<u64>,
    /// The process's peak resident memory (all nodes), bytes.
    pub peak_rss: u64,
    pub failures: Vec<String>,
}

impl Report {
    /// One CSV line: nodes, seed, writes, partitions, bridged, crashes, joins, removals, convergence ms, mean bytes in per node,
    /// mean bytes out per node, peak RSS MiB, checks.
    pub fn csv(&self) -> String {
        let mean = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.nodes,
            self.seed,
            self.writes,
            self.partitions,
            self.bridged,
            self.crashes,
            self.joins,
            self.removals,
            self.convergence.map_or(-1, |d| d.as_millis() as i64),
            mean(&self.bytes_in),
            mean(&self.bytes_out),
            self.peak_rss >> 20,
            if self.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        )
    }

    pub const CSV_HEADER: &'static str =
        "nodes,seed,writes,partitions,bridged,crashes,joins,removals,convergence_ms,bytes_in_per_node,bytes_out_per_node,peak_rss_mib,checks";
}

/// Runs one simulation and checks it.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.nodes >= 2, "a mesh needs at least two nodes");
    // Peak memory is this run's alone (resets the process's high-water mark; Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let dir = tempfile::tempdir()?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    let shape = |i: usize| bad_link(options.bad_links, i);
    let (nodes, folder) = start(dir.path(), options.nodes, shape).await?;
    let storage = match options.storage {
        true => Some(StorageNode::create(dir.path(), nodes[0].invite_storage().await?).await?),
        false => None,
    };
    let mut sim = Sim {
        storage,
        bridge: false,
        bad_links: options.bad_links,
        dir: dir.path().to_path_buf(),
        members: (0..nodes.len()).collect(),
        groups: vec![(0..nodes.len()).collect()],
        nodes,
        folder,
        outside,
        written: Vec::new(),
        removed: Vec::new(),
        last_heal: Instant::now(),
        report: Report {
            nodes: options.nodes,
            seed: options.seed,
            ..Report::default()
        },
    };
    sim.everyone_knows_the_storage_peer().await?;
    for (step, event) in schedule(&options).into_iter().enumerate() {
        sim.play(step, event).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    sim.report.writes = sim.written.len();
    sim.converge(options.converge_within).await;
    sim.check_leftovers().await?;
    sim.check_removed();
    sim.check_storage_plaintext();
    for node in &mut sim.nodes {
        node.crash().await?; // each device's runtime down before the folders go
    }
    drop(sim.storage.take());
    Ok(sim.report)
}

/// A write made during the run, which must survive somewhere unless a device deleted it.
pub(super) struct Write {
    name: String,
    content: Vec<u8>,
    deleted: bool,
}

/// One run in progress.
pub(super) struct Sim {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Nodes in the mesh (running or crashed); a removed one is not.
    members: BTreeSet<usize>,
    folder: FolderId,
    /// A folder beside the synced ones that nothing may write into.
    outside: PathBuf,
    written: Vec<Write>,
    /// Removed nodes, each with how many writes had been made when every member knew.
    removed: Vec<(usize, usize)>,
    /// Who reaches whom now: one group, or the two sides of a partition (over members).
    groups: Vec<BTreeSet<usize>>,
    storage: Option<StorageNode>,
    /// Whether the storage peer reaches both sides of the partition (else only node 0's).
    bridge: bool,
    bad_links: bool,
    last_heal: Instant,
    report: Report,
}

impl Sim {
    /// Carries out one event of the schedule.
    async fn play(&mut self, step: usize, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Create { node, name } => {
                let content = format!("{name} written by node {node} at step {step}");
                self.write(node, &name, content.into_bytes()).await?;
            }
            Event::ConcurrentEdit { name } => {
                let firsts = self.firsts();
                for (side, node) in firsts.into_iter().enumerate() {
                    let content = format!("{name}: side {side}, node {node}, step {step}");
                    self.write(node, &name, content.into_bytes()).await?;
                }
            }
            Event::DeleteVersusEdit { pick } => self.versus_edit(step, pick, None).await?,
            Event::RenameVersusEdit { pick, to } => self.versus_edit(step, pick, Some(&to)).await?,
            Event::LinkAndDirectory { name } => self.link_and_directory(step, &name).await?,
            Event::Delete { node, pick } => self.delete(node, pick).await?,
            Event::Rename { node, pick, to } => self.rename(node, pick, &to).await?,
            Event::CrashDuringTransfer {
                writer,
                crashed,
                name,
                seed,
            } => {
                let mut dice = Dice::new(seed);
                let content: Vec<u8> = (0..BIG_FILE / 8)
                    .flat_map(|_| dice.next().to_le_bytes())
                    .collect();
                self.write(writer, &name, content).await?;
                tokio::time::sleep(Duration::from_millis(dice.below(150) as u64)).await;
                self.nodes[crashed].crash().await?;
                self.report.crashes += 1;
            }
            Event::Restart { node } => {
                self.nodes[node].start().await?;
                self.apply_groups().await;
            }
            Event::Join { node } => self.join(node).await?,
            Event::Remove { node } => self.remove(node).await?,
            Event::Partition { left } => {
                let right = self.members.difference(&left).copied().collect();
                let left = self.members.intersection(&left).copied().collect();
                self.groups = vec![left, right];
                self.apply_groups().await;
                self.report.partitions += 1;
            }
            Event::BridgedPartition { left } => {
                let right = self.members.difference(&left).copied().collect();
                let left = self.members.intersection(&left).copied().collect();
                self.groups = vec![left, right];
                self.bridge = true;
                self.apply_groups().await;
                self.report.partitions += 1;
                self.report.bridged += 1;
                self.across_the_bridge(step).await?;
            }
            Event::Heal => {
                self.bridge = false;
                self.groups = vec![self.members.clone()];
                self.apply_groups().await;
                self.last_heal = Instant::now();
            }
        }
        Ok(())
    }

    /// Writes `rel` on `node`, has it scanned, and records the write.
    async fn write(&mut self, node: usize, rel: &str, content: Vec<u8>) -> anyhow::Result<()> {
        self.nodes[node].write(&self.folder, rel, &content).await?;
        self.written.push(Write {
            name: rel.to_string(),
            content,
            deleted: false,
        });
        Ok(())
    }

    /// The regular files `node` holds (conflict copies too), in name order.
    fn files_of(&self, node: usize) -> Vec<(String, Vec<u8>)> {
        check::synced(&self.nodes[node].folder)
            .into_iter()
            .filter(|(rel, _)| {
                std::fs::symlink_metadata(self.nodes[node].folder.join(rel))
                    .is_ok_and(|m| m.is_file())
            })
            .collect()
    }

    /// `node` deletes one of its files: that write need not survive (unless written again).
    async fn delete(&mut self, node: usize, pick: usize) -> anyhow::Result<()> {
        let files = self.files_of(node);
        let Some((rel, content)) = files.get(pick % files.len().max(1)).cloned() else {
            return Ok(());
        };
        self.remove_file(node, &rel, &content)?;
        self.nodes[node].scan(&self.folder).await
    }

    /// Removes `rel` (holding `content`) on `node`: that write need not survive any more.
    fn remove_file(&mut self, node: usize, rel: &str, content: &[u8]) -> anyhow::Result<()> {
        std::fs::remove_file(self.nodes[node].folder.join(rel))?;
        for write in self.written.iter_mut().filter(|w| w.content == content) {
            write.deleted = true;
        }
        Ok(())
    }

    /// Renames `rel` to `to` on `node`, unless `to` is taken (a person would not rename over
    /// another file). Returns whether it did.
    fn move_file(&self, node: usize, rel: &str, to: &str) -> anyhow::Result<bool> {
        let root = &self.nodes[node].folder;
        if std::fs::symlink_metadata(root.join(to)).is_ok() {
            return Ok(false);
        }
        std::fs::create_dir_all(root.join(to).parent().expect("a file has a parent"))?;
        std::fs::rename(root.join(rel), root.join(to))?;
        Ok(true)
    }

    /// Running members of each group, in order.
    fn running(&self) -> Vec<Vec<usize>> {
        self.groups
            .iter()
            .map(|g| {
                g.iter()
                    .copied()
                    .filter(|&i| self.nodes[i].is_running())
                    .collect()
            })
            .collect()
    }

    /// The first running node of each group that has one.
    fn firsts(&self) -> Vec<usize> {
        self.running()
            .iter()
            .filter_map(|g| g.first().copied())
            .collect()
    }

    /// Two running nodes to play a race: the first of each side of a partition, or the first
    /// and last of the one group (the same node if only one runs).
    fn two_sides(&self) -> Option<(usize, usize)> {
        match self.running().as_slice() {
            [one] if !one.is_empty() => Some((one[0], *one.last().expect("not empty"))),
            [left, right] if !left.is_empty() && !right.is_empty() => Some((left[0], right[0])),
            _ => None,
        }
    }

    /// `node` renames one of its files to `to` (its content must survive under some name).
    async fn rename(&mut self, node: usize, pick: usize, to: &str) -> anyhow::Result<()> {
        let files = self.files_of(node);
        let Some((rel, _)) = files.get(pick % files.len().max(1)) else {
            return Ok(());
        };
        if !self.move_file(node, &rel.clone(), to)? {
            return Ok(());
        }
        self.nodes[node].scan(&self.folder).await
    }

    /// Two nodes (one on each side of a partition, if there is one) hold the same file: the
    /// first deletes it (`to` = `None`) or renames it to `to`, the second edits it. The edit
    /// must survive (as the file or a conflict copy); a rename keeps the old content too.
    async fn versus_edit(
        &mut self,
        step: usize,
        pick: usize,
        to: Option<&str>,
    ) -> anyhow::Result<()> {
        let Some((a, b)) = self.two_sides().filter(|(a, b)| a != b) else {
            return Ok(());
        };
        let theirs: BTreeMap<String, Vec<u8>> = self.files_of(b).into_iter().collect();
        let both: Vec<(String, Vec<u8>)> = self
            .files_of(a)
            .into_iter()
            .filter(|(rel, content)| theirs.get(rel) == Some(content))
            .collect();
        let Some((rel, content)) = both.get(pick % both.len().max(1)).cloned() else {
            return Ok(());
        };
        let moved = match to {
            None => {
                self.remove_file(a, &rel, &content)?;
                true
            }
            Some(to) => self.move_file(a, &rel, to)?,
        };
        if !moved {
            return Ok(());
        }
        self.nodes[a].scan(&self.folder).await?;
        let edit = format!("{rel} edited by node {b} at step {step} while node {a} moved it");
        self.write(b, &rel, edit.into_bytes()).await
    }

    /// A link out of the folder on one side; on the other, a folder of that name holding a
    /// file, unless the link already reached it (a person would not write through it; this
    /// harness must not either).
    async fn link_and_directory(&mut self, step: usize, name: &str) -> anyhow::Result<()> {
        let Some((a, b)) = self.two_sides() else {
            return Ok(());
        };
        std::os::unix::fs::symlink(&self.outside, self.nodes[a].folder.join(name))?;
        self.nodes[a].scan(&self.folder).await?;
        if b != a && std::fs::symlink_metadata(self.nodes[b].folder.join(name)).is_err() {
            let inner = format!("{name}/inside.txt");
            let content = format!("{inner} written by node {b} at step {step}");
            let _ = self.write(b, &inner, content.into_bytes()).await; // not a write if the link won the race
        }
        Ok(())
    }

    /// A new device, invited by node 0, joins and takes the folder.
    async fn join(&mut self, node: usize) -> anyhow::Result<()> {
        anyhow::ensure!(node == self.nodes.len(), "nodes join in order");
        let code = self.nodes[0].invite().await?;
        let joiner = Node::create(&self.dir, node, bad_link(self.bad_links, node)).await?;
        joiner.join(code, Some(self.folder.clone())).await?;
        self.nodes.push(joiner);
        self.members.insert(node);
        for group in &mut self.groups {
            if group.contains(&0) {
                group.insert(node);
            }
        }
        self.apply_groups().await;
        self.report.joins += 1;
        Ok(())
    }

    /// Node 0 removes `node` once every write so far has reached every member, and waits until
    /// every member knows (from then on, nothing written may reach the removed device).
    async fn remove(&mut self, node: usize) -> anyhow::Result<()> {
        if !self.settle(Duration::from_secs(120)).await {
            self.report.failures.push(format!(
                "the mesh did not settle before node {node}'s removal"
            ));
        }
        self.nodes[0].remove(&self.nodes[node]).await?;
        self.members.remove(&node);
        for group in &mut self.groups {
            group.remove(&node);
        }
        let gone = self.nodes[node].device_id().await;
        let since = Instant::now();
        loop {
            let mut all = true;
            for &i in &self.members {
                let d = self.nodes[i].device().lock().await;
                all &= d.log().view().removed.keys().any(|r| r.to_string() == gone);
            }
            if all {
                break;
            }
            if since.elapsed() > Duration::from_secs(60) {
                self.report.failures.push(format!(
                    "node {node}'s removal did not reach every member in 60 s"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.removed.push((node, self.written.len()));
        self.report.removals += 1;
        Ok(())
    }

    /// Waits until every device's log has the storage peer (a device that never heard of it
    /// would not let it in, so it could be no meeting point).
    async fn everyone_knows_the_storage_peer(&self) -> anyhow::Result<()> {
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        let since = Instant::now();
        for node in &self.nodes {
            loop {
                let known = node
                    .device()
                    .lock()
                    .await
                    .log()
                    .view()
                    .members
                    .keys()
                    .any(|m| m.to_peer_id() == storage.peer);
                if known {
                    break;
                }
                anyhow::ensure!(
                    since.elapsed() < Duration::from_secs(60),
                    "the storage peer's joining never spread"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.apply_groups().await;
        Ok(())
    }

    /// With the two sides of a partition bridged by the storage peer alone, a write on each
    /// side must reach the other (through what the storage peer holds) within a minute.
    async fn across_the_bridge(&mut self, step: usize) -> anyhow::Result<()> {
        let sides = self.firsts();
        let [a, b] = sides[..] else { return Ok(()) };
        let name = |n: usize| format!("bridged-{step}-from-{n}.txt");
        for n in [a, b] {
            let content = format!("{} through the storage peer", name(n));
            self.write(n, &name(n), content.into_bytes()).await?;
        }
        let since = Instant::now();
        let arrived = |from: usize, to: usize| self.nodes[to].folder.join(name(from)).exists();
        while !(arrived(a, b) && arrived(b, a)) {
            if since.elapsed() > Duration::from_secs(60) {
                let (ab, ba) = (arrived(a, b), arrived(b, a));
                let mut why = Vec::new();
                for n in [a, b] {
                    let status = self.nodes[n].status().await;
                    let f = &status.folders[0];
                    why.push(format!(
                        "node {n}: needs {} files, unavailable {:?}, storage {:?}",
                        f.need_files, f.unavailable, status.storage
                    ));
                }
                let (ta, tb) = (
                    check::synced(&self.nodes[a].folder),
                    check::synced(&self.nodes[b].folder),
                );
                let only_a: Vec<&String> = ta.keys().filter(|k| !tb.contains_key(*k)).collect();
                let only_b: Vec<&String> = tb.keys().filter(|k| !ta.contains_key(*k)).collect();
                why.push(format!("only on {a}: {only_a:?}; only on {b}: {only_b:?}"));
                self.report.failures.push(format!(
                    "step {step}: the storage peer did not carry writes between nodes {a} and {b} in 60 s (arrived {a}→{b} {ab}, {b}→{a} {ba}): {why:?}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Lets each running member reach only the members of its own group (and the storage peer
    /// if it reaches that group), and has them dial.
    async fn apply_groups(&self) {
        let storage = self.storage.as_ref().map(|s| s.peer);
        for group in &self.groups {
            let reaches_storage = self.bridge || group.contains(&0);
            for &i in group.iter().filter(|&&i| self.nodes[i].is_running()) {
                let mut allowed: Vec<PeerId> = group
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| self.nodes[j].peer)
                    .collect();
                allowed.extend(storage.filter(|_| reaches_storage));
                let transport = self.nodes[i].device().lock().await.transport().clone();
                transport.set_allowed(allowed).await;
                if let (Some(s), true) = (&self.storage, reaches_storage) {
                    let theirs = s.transport().await;
                    transport
                        .dial_peer(s.peer, theirs.listen_addrs().await)
                        .await;
                }
            }
        }
        // Those in a group dial each other again (peer exchange and static addresses would, in
        // seconds; a heal should not wait for that).
        for running in self.running() {
            for &i in &running {
                let transport = self.nodes[i].device().lock().await.transport().clone();
                for &j in running.iter().filter(|&&j| j != i) {
                    let theirs = self.nodes[j].device().lock().await.transport().clone();
                    let addrs = theirs.listen_addrs().await;
                    transport.dial_peer(self.nodes[j].peer, addrs).await;
                }
            }
        }
    }
}

/// Size of the file that travels while a device crashes.
const BIG_FILE: usize = 8 << 20;

/// `n` devices paired by node 0 (the admin), all syncing one folder.
async fn start(
    dir: &std::path::Path,
    n: usize,
    shape: impl Fn(usize) -> Option<LinkShape>,
) -> anyhow::Result<(Vec<Node>, FolderId)> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(Node::create(dir, i, shape(i)).await?);
    }
    let folder = nodes[0].join(String::new(), None).await?;
    for joiner in &nodes[1..] {
        let code = nodes[0].invite().await?;
        joiner.join(code, Some(folder.clone())).await?;
    }
    Ok((nodes, folder))
}
