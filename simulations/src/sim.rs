//! A seeded simulation of a mesh of real devices (the device engine of `meshsync-node`, each
//! with its own home and folder on disk, over libp2p's in-memory transport) under partitions
//! and concurrent edits, checked at the end: every live device's folder byte-identical, every
//! write made during the run present (as the file or a conflict copy), nothing written outside
//! any folder, no temp file left.
//!
//! The schedule — which device writes what, when the mesh splits and heals — comes from the
//! seed alone, so a failing `--seed` replays the same schedule (thread timing may differ, the
//! events do not).
//!
//! Faults so far: partitions (the mesh split in two groups that cannot reach each other) and
//! heals; concurrent creates and edits of the same paths on both sides of a partition; a
//! symlink out of the folder on one side and a directory of the same name on the other. Not yet
//! (issue 12): crashes and restarts, slow and lossy links, storage peers, joins and removals
//! during the run, deletes and renames.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshsync_crdt::{FolderId, Role};
use meshsync_node::device::{self, mesh, scan, Shared};
use meshsync_node::home::Home;
use meshsync_node::net::Network;
use meshsync_transport::PeerId;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub seed: u64,
    /// Events in the schedule.
    pub events: usize,
    /// How long the mesh may take to converge after the last heal.
    pub converge_within: Duration,
}

/// What a run measured, and what its checks found (empty `failures`: all held).
#[derive(Debug, Default)]
pub struct Report {
    pub nodes: usize,
    pub seed: u64,
    pub writes: usize,
    pub partitions: usize,
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
    /// One CSV line: nodes, seed, writes, partitions, convergence ms, mean bytes in per node,
    /// mean bytes out per node, peak RSS MiB, checks.
    pub fn csv(&self) -> String {
        let mean = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
        format!(
            "{},{},{},{},{},{},{},{},{}",
            self.nodes,
            self.seed,
            self.writes,
            self.partitions,
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
        "nodes,seed,writes,partitions,convergence_ms,bytes_in_per_node,bytes_out_per_node,peak_rss_mib,checks";
}

/// A reproducible stream of choices (xorshift64*).
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One event of the schedule.
#[derive(Clone, Debug)]
enum Event {
    /// Node `node` creates a file no one else writes.
    Create { node: usize, name: String },
    /// Both sides of the current partition (or two nodes, if none) edit the same path.
    ConcurrentEdit { name: String },
    /// A link out of the folder on one side, a directory holding a file on the other.
    LinkAndDirectory { name: String },
    /// The mesh splits in two groups.
    Partition { left: BTreeSet<usize> },
    /// Everyone reaches everyone again.
    Heal,
}

fn schedule(options: &Options) -> Vec<Event> {
    let mut dice = Dice::new(options.seed);
    let mut events = Vec::new();
    let mut partitioned = false;
    for i in 0..options.events {
        let event = match dice.below(10) {
            0..=3 => Event::Create {
                node: dice.below(options.nodes),
                name: format!("dir{}/created-{i}.txt", dice.below(3)),
            },
            4 | 5 => Event::ConcurrentEdit {
                name: format!("shared-{i}.txt"),
            },
            6 => Event::LinkAndDirectory {
                name: format!("race-{i}"),
            },
            7 | 8 if !partitioned => {
                let mut left: BTreeSet<usize> =
                    (0..options.nodes).filter(|_| dice.below(2) == 0).collect();
                if left.is_empty() {
                    left.insert(0);
                }
                if left.len() == options.nodes {
                    left.remove(&(options.nodes - 1));
                }
                Event::Partition { left }
            }
            _ => Event::Heal,
        };
        partitioned = match event {
            Event::Partition { .. } => true,
            Event::Heal => false,
            _ => partitioned,
        };
        events.push(event);
    }
    events.push(Event::Heal);
    events
}

struct Node {
    device: Shared,
    folder: PathBuf,
    peer: PeerId,
}

/// Runs one simulation and checks it.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    let (nodes, folder) = start(dir.path(), options.nodes).await?;
    let mut sim = Sim {
        groups: vec![(0..nodes.len()).collect()],
        nodes,
        folder,
        outside,
        written: Vec::new(),
        last_heal: Instant::now(),
        report: Report {
            nodes: options.nodes,
            seed: options.seed,
            ..Report::default()
        },
    };
    for (step, event) in schedule(&options).into_iter().enumerate() {
        sim.play(step, event).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    sim.report.writes = sim.written.len();
    sim.converge(options.converge_within).await;
    sim.check_leftovers().await?;
    Ok(sim.report)
}

/// One run in progress.
struct Sim {
    nodes: Vec<Node>,
    folder: FolderId,
    /// A folder beside the synced ones that nothing may write into.
    outside: PathBuf,
    /// Every write made (path, content): each must survive somewhere.
    written: Vec<(String, Vec<u8>)>,
    /// Who reaches whom now: one group, or the two sides of a partition.
    groups: Vec<BTreeSet<usize>>,
    last_heal: Instant,
    report: Report,
}

impl Sim {
    /// Carries out one event of the schedule.
    async fn play(&mut self, step: usize, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Create { node, name } => {
                let content = format!("{name} written by node {node} at step {step}");
                self.write(node, &name, content).await?;
            }
            Event::ConcurrentEdit { name } => {
                let firsts: Vec<usize> = self
                    .groups
                    .iter()
                    .map(|g| *g.iter().next().expect("groups are not empty"))
                    .collect();
                for (side, node) in firsts.into_iter().enumerate() {
                    let content = format!("{name}: side {side}, node {node}, step {step}");
                    self.write(node, &name, content).await?;
                }
            }
            Event::LinkAndDirectory { name } => self.link_and_directory(step, &name).await?,
            Event::Partition { left } => {
                let right = (0..self.nodes.len())
                    .filter(|i| !left.contains(i))
                    .collect();
                self.groups = vec![left, right];
                apply_groups(&self.nodes, &self.groups).await;
                self.report.partitions += 1;
            }
            Event::Heal => {
                self.groups = vec![(0..self.nodes.len()).collect()];
                apply_groups(&self.nodes, &self.groups).await;
                self.last_heal = Instant::now();
            }
        }
        Ok(())
    }

    /// Writes `rel` on `node`, has it scanned, and records the write.
    async fn write(&mut self, node: usize, rel: &str, content: String) -> anyhow::Result<()> {
        write(&self.nodes[node], &self.folder, rel, content.as_bytes()).await?;
        self.written.push((rel.to_string(), content.into_bytes()));
        Ok(())
    }

    /// A link out of the folder on one side; on the other, a folder of that name holding a
    /// file, unless the link already reached it (a person would not write through it; this
    /// harness must not either).
    async fn link_and_directory(&mut self, step: usize, name: &str) -> anyhow::Result<()> {
        let first = |g: &BTreeSet<usize>| *g.iter().next().expect("groups are not empty");
        let (a, b) = match self.groups.as_slice() {
            [one] => (
                first(one),
                *one.iter().last().expect("groups are not empty"),
            ),
            [left, right, ..] => (first(left), first(right)),
            [] => unreachable!("there is always a group"),
        };
        std::os::unix::fs::symlink(&self.outside, self.nodes[a].folder.join(name))?;
        scan::scan(&self.nodes[a].device, &self.folder, requested()).await?;
        if b != a && std::fs::symlink_metadata(self.nodes[b].folder.join(name)).is_err() {
            let inner = format!("{name}/inside.txt");
            let content = format!("{inner} written by node {b} at step {step}");
            let _ = self.write(b, &inner, content).await; // not a write if the link won the race
        }
        Ok(())
    }

    /// Waits until every folder is the same and holds every write; says why not by `within`
    /// after the last heal.
    async fn converge(&mut self, within: Duration) {
        let deadline = self.last_heal + within;
        loop {
            let trees: Vec<BTreeMap<String, Vec<u8>>> =
                self.nodes.iter().map(|n| synced(&n.folder)).collect();
            let same = trees.windows(2).all(|w| w[0] == w[1]);
            let contents: BTreeSet<&Vec<u8>> = trees[0].values().collect();
            if same && self.written.iter().all(|(_, c)| contents.contains(c)) {
                self.report.convergence = Some(self.last_heal.elapsed());
                return;
            }
            if Instant::now() > deadline {
                let differ = (1..trees.len()).filter(|i| trees[*i] != trees[0]).count();
                self.report.failures.push(format!(
                    "not converged {within:?} after the last heal: {differ} of {} folders differ from node 0's",
                    trees.len() - 1
                ));
                self.explain(&trees).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What differs from node 0's folder, what each node still needs, which writes are lost.
    async fn explain(&mut self, trees: &[BTreeMap<String, Vec<u8>>]) {
        let shown = |k: &String, v: &Vec<u8>| format!("{k} = {:?}", String::from_utf8_lossy(v));
        for (i, t) in trees.iter().enumerate().skip(1) {
            let differ: Vec<String> = t
                .iter()
                .filter(|(k, v)| trees[0].get(*k) != Some(v))
                .map(|(k, v)| shown(k, v))
                .chain(
                    trees[0]
                        .iter()
                        .filter(|(k, _)| !t.contains_key(*k))
                        .map(|(k, v)| format!("(only node 0) {}", shown(k, v))),
                )
                .take(12)
                .collect();
            if !differ.is_empty() {
                self.report
                    .failures
                    .push(format!("node {i} differs: {differ:#?}"));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let status = device::status::status(&n.device).await;
            let f = &status.folders[0];
            self.report.failures.push(format!(
                "node {i}: in sync {}, needs {} files, not written {:?}, unavailable {:?}",
                f.in_sync, f.need_files, f.not_written, f.unavailable
            ));
        }
        let contents: BTreeSet<&Vec<u8>> = trees[0].values().collect();
        for (name, content) in &self.written {
            if !contents.contains(content) {
                self.report
                    .failures
                    .push(format!("lost write: {}", shown(name, content)));
            }
        }
    }

    /// Nothing outside any folder, no temp file left (a rewrite in progress may finish first),
    /// and each node's traffic and the process's peak memory into the report.
    async fn check_leftovers(&mut self) -> anyhow::Result<()> {
        let temps = |n: &Node| -> Vec<String> {
            tree(&n.folder)
                .into_keys()
                .filter(|p| p.contains(".meshsync-tmp-"))
                .collect()
        };
        let settle = Instant::now();
        while self.nodes.iter().any(|n| !temps(n).is_empty())
            && settle.elapsed() < Duration::from_secs(15)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if std::fs::read_dir(&self.outside)?.count() != 0 {
            self.report
                .failures
                .push("something was written outside every folder".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let left = temps(n);
            if !left.is_empty() {
                self.report
                    .failures
                    .push(format!("node {i} keeps temp files {left:?}"));
            }
            let traffic = n.device.lock().await.transport().traffic();
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
}

/// `n` devices paired by node 0 (the admin), all syncing one folder.
async fn start(dir: &Path, n: usize) -> anyhow::Result<(Vec<Node>, FolderId)> {
    let mut devices = Vec::new();
    for i in 0..n {
        let home = Home::locate(Some(dir.join(format!("home{i}"))))?;
        home.init(&format!("node{i}"), Role::Device)?;
        devices.push(device::start(home, Network::memory()).await?);
    }
    for joiner in &devices[1..] {
        let code = mesh::invite(&devices[0], Role::Device, Duration::from_secs(600)).await?;
        mesh::join(joiner, &code).await?;
    }
    let mut nodes = Vec::new();
    let mut folder = None;
    for (i, device) in devices.into_iter().enumerate() {
        let path = dir.join(format!("folder{i}"));
        std::fs::create_dir_all(&path)?;
        let id = device.lock().await.add_folder(&path, folder.clone())?;
        folder.get_or_insert(id);
        let peer = device.lock().await.transport().local_peer_id();
        nodes.push(Node {
            device,
            folder: path,
            peer,
        });
    }
    Ok((nodes, folder.expect("at least one node")))
}

fn requested() -> scan::ScanOptions {
    scan::ScanOptions {
        requested: true,
        ..Default::default()
    }
}

/// Writes `rel` on `node` and has it scanned.
async fn write(node: &Node, folder: &FolderId, rel: &str, content: &[u8]) -> anyhow::Result<()> {
    let path = node.folder.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, content)?;
    scan::scan(&node.device, folder, requested()).await?;
    Ok(())
}

/// Lets each node reach only the members of its own group.
async fn apply_groups(nodes: &[Node], groups: &[BTreeSet<usize>]) {
    for group in groups {
        for &i in group {
            let allowed: Vec<PeerId> = group
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| nodes[j].peer)
                .collect();
            let transport = nodes[i].device.lock().await.transport().clone();
            transport.set_allowed(allowed).await;
        }
    }
    // Those in a group dial each other again (peer exchange and static addresses would, in
    // seconds; a heal should not wait for that).
    for group in groups {
        for &i in group {
            let transport = nodes[i].device.lock().await.transport().clone();
            for &j in group.iter().filter(|&&j| j != i) {
                let theirs = nodes[j].device.lock().await.transport().clone();
                let addrs = theirs.listen_addrs().await;
                transport.dial_peer(nodes[j].peer, addrs).await;
            }
        }
    }
}

/// Every file under `root` (links as "link -> target"), the daemon's own files left out.
fn synced(root: &Path) -> BTreeMap<String, Vec<u8>> {
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
