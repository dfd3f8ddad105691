//! Transfer rates for the page: once a second the status is sampled; each member's bytes in
//! and out and each folder's bytes still needed become rates over the last minute.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Web;
use crate::control::{Request, Status};

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

    /// The rate a folder's need shrank at over the last five seconds (bytes/s).
    pub fn folder(&self, folder: &str) -> f64 {
        let inner = self.inner.lock().expect("rates lock");
        let Some(history) = inner.folders.get(folder) else {
            return 0.0;
        };
        let recent: Vec<f64> = history.iter().rev().take(5).copied().collect();
        if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<f64>() / recent.len() as f64
        }
    }

    fn add(&self, status: &Status) {
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
        }
        inner.last = Some((now, peers, folders));
    }
}

fn push<T>(history: &mut VecDeque<T>, value: T) {
    if history.len() == KEPT {
        history.pop_front();
    }
    history.push_back(value);
}

/// Samples the status once a second for as long as the page serves.
pub async fn sample(web: Arc<Web>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(status) = web.ask::<Status>(Request::Status).await {
            web.rates.add(&status);
        }
    }
}
