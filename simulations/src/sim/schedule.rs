//! The schedule of a run: every event comes from the seed alone, so a failing `--seed` replays
//! the same events (thread timing may differ, the events do not). Who may act is tracked here
//! too: a crashed node does nothing until it restarts, a removed one nothing ever again, and a
//! node that joins acts from then on. Node 0 (the admin, who invites and removes) is never
//! crashed or removed.

use std::collections::BTreeSet;

use super::Options;

/// A reproducible stream of choices (xorshift64*).
pub(super) struct Dice(u64);

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick(&mut self, from: &BTreeSet<usize>) -> Option<usize> {
        from.iter().nth(self.below(from.len())).copied()
    }
}

/// One event of the schedule.
#[derive(Clone, Debug)]
pub(super) enum Event {
    /// Node `node` creates a file no one else writes.
    Create { node: usize, name: String },
    /// Both sides of the current partition (or two nodes, if none) edit the same path.
    ConcurrentEdit { name: String },
    /// One side of the partition deletes a file both sides hold while the other edits it.
    DeleteVersusEdit { pick: usize },
    /// One side renames a file both sides hold to `to` while the other edits it.
    RenameVersusEdit { pick: usize, to: String },
    /// A link out of the folder on one side, a directory holding a file on the other.
    LinkAndDirectory { name: String },
    /// Node `node` deletes one of the files it holds (the `pick`-th, in name order).
    Delete { node: usize, pick: usize },
    /// Node `node` renames one of the files it holds to `to`.
    Rename {
        node: usize,
        pick: usize,
        to: String,
    },
    /// `writer` writes a large file and `crashed` stops abruptly while it travels.
    CrashDuringTransfer {
        writer: usize,
        crashed: usize,
        name: String,
        seed: u64,
    },
    /// A crashed node starts again from its home.
    Restart { node: usize },
    /// A new device joins (invited by node 0) and gets the folder.
    Join { node: usize },
    /// Node 0 removes `node`, once every write so far has reached everyone.
    Remove { node: usize },
    /// The mesh splits in two groups (over every member, running or not).
    Partition { left: BTreeSet<usize> },
    /// The mesh splits in two groups that only the storage peer reaches both of.
    BridgedPartition { left: BTreeSet<usize> },
    /// Everyone reaches everyone again.
    Heal,
}

/// Who is in the mesh while the schedule is made.
struct Cast {
    members: BTreeSet<usize>,
    crashed: BTreeSet<usize>,
    next: usize,
    partitioned: bool,
}

impl Cast {
    /// Members that are running.
    fn running(&self) -> BTreeSet<usize> {
        self.members.difference(&self.crashed).copied().collect()
    }

    /// Running members other than node 0.
    fn expendable(&self) -> BTreeSet<usize> {
        let mut out = self.running();
        out.remove(&0);
        out
    }
}

pub(super) fn schedule(options: &Options) -> Vec<Event> {
    let mut dice = Dice::new(options.seed);
    let mut cast = Cast {
        members: (0..options.nodes).collect(),
        crashed: BTreeSet::new(),
        next: options.nodes,
        partitioned: false,
    };
    let mut events = Vec::new();
    for i in 0..options.events {
        if let Some(event) = next_event(options, &mut dice, &mut cast, i) {
            events.push(event);
        }
    }
    for node in std::mem::take(&mut cast.crashed) {
        events.push(Event::Restart { node });
    }
    events.push(Event::Heal);
    events
}

fn next_event(options: &Options, dice: &mut Dice, cast: &mut Cast, i: usize) -> Option<Event> {
    let running = cast.running();
    let event = match dice.below(20) {
        0..=6 => Event::Create {
            node: dice.pick(&running)?,
            name: format!("dir{}/created-{i}.txt", dice.below(3)),
        },
        7 | 8 if !options.versus_edits => Event::ConcurrentEdit {
            name: format!("shared-{i}.txt"),
        },
        7 | 8 => match dice.below(3) {
            0 => Event::ConcurrentEdit {
                name: format!("shared-{i}.txt"),
            },
            1 => Event::DeleteVersusEdit {
                pick: dice.below(1000),
            },
            _ => Event::RenameVersusEdit {
                pick: dice.below(1000),
                to: format!("dir{}/moved-{i}.txt", dice.below(3)),
            },
        },
        9 => Event::LinkAndDirectory {
            name: format!("race-{i}"),
        },
        10 => Event::Delete {
            node: dice.pick(&running)?,
            pick: dice.below(1000),
        },
        11 => Event::Rename {
            node: dice.pick(&running)?,
            pick: dice.below(1000),
            to: format!("dir{}/renamed-{i}.txt", dice.below(3)),
        },
        12 if options.faults && cast.crashed.is_empty() => {
            let crashed = dice.pick(&cast.expendable())?;
            let mut writers = running.clone();
            writers.remove(&crashed);
            let writer = dice.pick(&writers)?;
            cast.crashed.insert(crashed);
            Event::CrashDuringTransfer {
                writer,
                crashed,
                name: format!("big-{i}.bin"),
                seed: dice.next(),
            }
        }
        13 if !cast.crashed.is_empty() => {
            let node = *cast.crashed.iter().next().expect("not empty");
            cast.crashed.remove(&node);
            Event::Restart { node }
        }
        14 if options.faults && !cast.partitioned => {
            let node = cast.next;
            cast.next += 1;
            cast.members.insert(node);
            Event::Join { node }
        }
        15 if options.faults && !cast.partitioned && cast.crashed.is_empty() => {
            let node = dice.pick(&cast.expendable())?;
            if cast.members.len() <= 3 {
                return None; // keep a mesh worth the name
            }
            cast.members.remove(&node);
            Event::Remove { node }
        }
        16 | 17 if !cast.partitioned => {
            cast.partitioned = true;
            Event::Partition {
                left: split(dice, &cast.members),
            }
        }
        18 if options.storage && !cast.partitioned => {
            cast.partitioned = true;
            Event::BridgedPartition {
                left: split(dice, &cast.members),
            }
        }
        16..=19 => {
            cast.partitioned = false;
            Event::Heal
        }
        _ => return None,
    };
    Some(event)
}

/// A random side of `members` holding node 0, and not all of them.
fn split(dice: &mut Dice, members: &BTreeSet<usize>) -> BTreeSet<usize> {
    let mut left: BTreeSet<usize> = members
        .iter()
        .copied()
        .filter(|_| dice.below(2) == 0)
        .collect();
    left.insert(0);
    if left.len() == members.len() {
        let last = *members.iter().last().expect("members");
        left.remove(&last);
    }
    left
}
