//! Transfer rates for the page: each status the page renders is a sample (about one a second
//! while someone looks, none otherwise: an idle daemon does no work for an unwatched page);
//! each member's bytes in and out and each folder's bytes still needed become rates over the
//! last minute.
//!
//! A folder's need shrinks only as whole files land, so while one big file arrives it would
//! show no progress at all. So a folder that starts syncing opens an *episode*: the most it
//! needed, and the bytes received from every member since. Its progress is the bytes received
//! against that need (at most 99 % until the need is gone), its rate the faster of the need
//! shrinking and the bytes arriving.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::control::Status;

/// Samples kept: one a second, one minute.
const KEPT: usize = 60;

#[derive(Default)]
pub struct Rates {
    inner: Mutex<Inner>,
}

/// When, each member's (bytes in, bytes out) and each folder's bytes still needed.
type Sample = (Instant, BTreeMap<String, (u64, u64)>, BTreeMap<String, u64>);

#[derive(Default)]
struct Inner {
    last: Option<Sample>,
    /// Per member: (bytes/s in, bytes/s out), oldest first.
    peers: BTreeMap<String, VecDeque<(f64, f64)>>,
    /// Per folder: bytes/s of need that went away, oldest first.
    folders: BTreeMap<String, VecDeque<f64>>,
    /// Bytes/s received from all members, oldest first.
    inbound: VecDeque<f64>,
    /// Bytes received from all members so far (at the last sample).
    received: u64,
    /// Per folder not in sync: (the most it needed, `received` when it started).
    episodes: BTreeMap<String, (u64, u64)>,
}

/// The average of the last five values of `history`.
fn recent(history: &VecDeque<f64>) -> f64 {
    let recent: Vec<f64> = history.iter().rev().take(5).copied().collect();
    if recent.is_empty() {
        0.0
    } else {
        recent.iter().sum::<f64>() / recent.len() as f64
    }
}

impl Rates {
    /// The last minute of (in, out) rates of `member`, oldest first.
    pub fn peer(&self, member: &str) -> Vec<(f64, f64)> {
        let inner = self.inner.lock().expect("rates lock");
        inner
            .peers
            .get(member)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// A folder's rate over the last five seconds (bytes/s): its need shrinking, or the bytes
    /// arriving, whichever is faster.
    pub fn folder(&self, folder: &str) -> f64 {
        let inner = self.inner.lock().expect("rates lock");
        let shrinking = inner.folders.get(folder).map_or(0.0, recent);
        shrinking.max(recent(&inner.inbound))
    }

    /// A syncing folder's progress: (bytes received since it started, the most it needed).
    pub fn progress(&self, folder: &str) -> Option<(u64, u64)> {
        let inner = self.inner.lock().expect("rates lock");
        let (peak, start) = *inner.episodes.get(folder)?;
        let done = inner.received.saturating_sub(start).min(peak * 99 / 100);
        Some((done, peak))
    }

    /// Takes the status just asked for the page as a sample.
    pub fn add(&self, status: &Status) {
        let now = Instant::now();
        let (peers, folders): (BTreeMap<String, (u64, u64)>, BTreeMap<String, u64>) = match status {
            Status::Device(d) => (
                d.peers
                    .iter()
                    .map(|p| (p.id.clone(), (p.bytes_in, p.bytes_out)))
                    .collect(),
                d.folders
                    .iter()
                    .map(|f| (f.id.clone(), f.need_bytes))
                    .collect(),
            ),
            Status::Storage(s) => (
                s.peers
                    .iter()
                    .map(|p| (p.id.clone(), (p.bytes_in, p.bytes_out)))
                    .collect(),
                BTreeMap::new(),
            ),
        };
        let mut inner = self.inner.lock().expect("rates lock");
        let received: u64 = peers.values().map(|(i, _)| i).sum();
        for (id, need) in &folders {
            if *need == 0 {
                inner.episodes.remove(id);
            } else {
                let since = inner.received;
                let episode = inner.episodes.entry(id.clone()).or_insert((0, since));
                episode.0 = episode.0.max(*need);
            }
        }
        if let Some((then, last_peers, last_folders)) = &inner.last {
            let secs = now.duration_since(*then).as_secs_f64().max(0.001);
            let rate = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
            let peer_rates: Vec<(String, (f64, f64))> = peers
                .iter()
                .map(|(id, (i, o))| {
                    let (li, lo) = last_peers.get(id).copied().unwrap_or((*i, *o));
                    (id.clone(), (rate(*i, li), rate(*o, lo)))
                })
                .collect();
            let folder_rates: Vec<(String, f64)> = folders
                .iter()
                .map(|(id, need)| {
                    let before = last_folders.get(id).copied().unwrap_or(*need);
                    (id.clone(), rate(before, *need))
                })
                .collect();
            for (id, r) in peer_rates {
                push(inner.peers.entry(id).or_default(), r);
            }
            for (id, r) in folder_rates {
                push(inner.folders.entry(id).or_default(), r);
            }
            let arriving = rate(received, inner.received);
            push(&mut inner.inbound, arriving);
        }
        inner.received = received;
        inner.last = Some((now, peers, folders));
    }
}

fn push<T>(history: &mut VecDeque<T>, value: T) {
    if history.len() == KEPT {
        history.pop_front();
    }
    history.push_back(value);
}
