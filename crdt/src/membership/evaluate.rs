//! Evaluating the log: the entries in a deterministic topological order ([`Graph`]), one pass
//! that counts each entry into the view or says why it does not ([`MembershipView::count`]),
//! and the exclusions removals and demotions cause, iterated to a fixed point by
//! [`MembershipView::evaluate`].

use std::collections::{BTreeMap, BTreeSet};

use super::*;

impl MembershipView {
    /// Computes the view from a set of verified entries. Pure: same entries, same view.
    pub fn evaluate(mesh: &MeshId, entries: &BTreeMap<EntryHash, Entry>) -> MembershipView {
        let graph = Graph::new(entries);
        let mut excluded: BTreeMap<usize, Ignored> = BTreeMap::new();
        // Exclusions depend on which removals count, which depends on exclusions: iterate
        // until no new exclusion appears. Exclusions only accumulate, so this ends within one
        // pass per entry. (Recomputing them from scratch each pass can cycle: a removal
        // excludes the grant that let its signer remove, and so stops counting, and so on;
        // a bound on the passes then picked one side of the cycle by the number of entries,
        // so any new entry, even one that changes nothing, flipped the view of the past.)
        let mut view;
        loop {
            let (next_view, revocations) = graph.run(mesh, &excluded);
            view = next_view;
            let before = excluded.len();
            for (i, why) in graph.exclusions(&revocations) {
                excluded.entry(i).or_insert(why);
            }
            if excluded.len() == before {
                break;
            }
        }
        for (i, why) in excluded {
            view.ignored.insert(graph.hashes[i], why);
        }
        for &i in &graph.orphans {
            view.ignored
                .insert(graph.hashes[i], Ignored::MissingParents);
        }
        view
    }
}

/// A counted removal or demotion of `device` by entry `at`.
struct Revocation {
    at: usize,
    device: DeviceId,
}

/// The entries in a deterministic topological order, with ancestor sets.
struct Graph<'a> {
    hashes: Vec<EntryHash>,
    entries: Vec<&'a Entry>,
    /// ancestors[i]: bitset over positions of every entry that `i` causally follows.
    ancestors: Vec<Vec<u64>>,
    /// Entries with a parent that is not in the log (or depends on such): never counted.
    orphans: Vec<usize>,
}

impl<'a> Graph<'a> {
    fn new(all: &'a BTreeMap<EntryHash, Entry>) -> Self {
        // Kahn's algorithm; the ready set is ordered by hash, so the order is deterministic.
        let mut waiting: BTreeMap<EntryHash, usize> = BTreeMap::new();
        let mut children: BTreeMap<EntryHash, Vec<EntryHash>> = BTreeMap::new();
        let mut ready: BTreeSet<EntryHash> = BTreeSet::new();
        for (hash, entry) in all {
            let parents: BTreeSet<&EntryHash> = entry.parents.iter().collect();
            waiting.insert(*hash, parents.len());
            for parent in &parents {
                children.entry(**parent).or_default().push(*hash);
            }
            if parents.is_empty() {
                ready.insert(*hash);
            }
        }
        let mut order = Vec::with_capacity(all.len());
        while let Some(hash) = ready.pop_first() {
            order.push(hash);
            for child in children.get(&hash).into_iter().flatten() {
                let left = waiting.get_mut(child).expect("child was registered");
                *left -= 1;
                if *left == 0 {
                    ready.insert(*child);
                }
            }
        }
        let placed: BTreeSet<EntryHash> = order.iter().copied().collect();
        let mut orphan_hashes: Vec<EntryHash> = all
            .keys()
            .filter(|h| !placed.contains(h))
            .copied()
            .collect();
        let position: BTreeMap<EntryHash, usize> =
            order.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        let words = order.len().div_ceil(64);
        let mut ancestors: Vec<Vec<u64>> = Vec::with_capacity(order.len());
        for hash in &order {
            let mut set = vec![0u64; words];
            for parent in &all[hash].parents {
                let p = position[parent];
                set[p / 64] |= 1 << (p % 64);
                for (word, parent_word) in set.iter_mut().zip(&ancestors[p]) {
                    *word |= parent_word;
                }
            }
            ancestors.push(set);
        }
        let entries: Vec<&Entry> = order.iter().map(|h| &all[h]).collect();
        let mut hashes = order;
        let first_orphan = hashes.len();
        hashes.append(&mut orphan_hashes);
        Graph {
            orphans: (first_orphan..hashes.len()).collect(),
            hashes,
            entries,
            ancestors,
        }
    }

    fn precedes(&self, a: usize, b: usize) -> bool {
        self.ancestors[b][a / 64] & (1 << (a % 64)) != 0
    }

    fn concurrent(&self, a: usize, b: usize) -> bool {
        a != b && !self.precedes(a, b) && !self.precedes(b, a)
    }

    /// Entries that a counted revocation knocks out (rule 3).
    fn exclusions(&self, revocations: &[Revocation]) -> BTreeMap<usize, Ignored> {
        let mut excluded = BTreeMap::new();
        for revocation in revocations {
            for (i, entry) in self.entries.iter().enumerate() {
                if !self.concurrent(i, revocation.at) {
                    continue;
                }
                let re_adds = matches!(entry.action, Action::Add { device, .. } if device == revocation.device)
                    && matches!(self.entries[revocation.at].action, Action::Remove { .. });
                if re_adds {
                    excluded.insert(i, Ignored::RemovalBeatsConcurrentAdd);
                } else if entry.signer == revocation.device {
                    excluded.insert(
                        i,
                        Ignored::SignedConcurrentlyWithOwnRemoval(revocation.device),
                    );
                }
            }
        }
        excluded
    }

    /// One pass in order over the entries not excluded: the view and the counted revocations.
    fn run(
        &self,
        mesh: &MeshId,
        excluded: &BTreeMap<usize, Ignored>,
    ) -> (MembershipView, Vec<Revocation>) {
        let mut view = MembershipView::default();
        let mut revocations = Vec::new();
        let mut have_genesis = false;
        for (i, entry) in self.entries.iter().enumerate() {
            if excluded.contains_key(&i) {
                continue;
            }
            let counted = match &entry.action {
                Action::Genesis { .. } if have_genesis => Err(Ignored::BadGenesis),
                Action::Genesis { .. } => view.genesis(mesh, entry),
                _ => view.count(i, entry, &mut revocations),
            };
            match counted {
                Ok(()) => have_genesis |= matches!(entry.action, Action::Genesis { .. }),
                Err(why) => {
                    view.ignored.insert(self.hashes[i], why);
                }
            }
        }
        (view, revocations)
    }
}

impl MembershipView {
    /// Counts the mesh's first entry: its creator becomes the first admin.
    fn genesis(&mut self, mesh: &MeshId, entry: &Entry) -> Result<(), Ignored> {
        let Action::Genesis {
            nonce,
            name,
            kem,
            wrapped,
        } = &entry.action
        else {
            unreachable!("called for a genesis entry");
        };
        let signer = entry.signer;
        if !entry.parents.is_empty() || MeshId::for_genesis(&signer, nonce) != *mesh {
            return Err(Ignored::BadGenesis);
        }
        self.members.insert(
            signer,
            Member {
                device: signer,
                name: name.clone(),
                role: Role::Device,
                admin: true,
                kem: Some(*kem),
            },
        );
        self.wraps.extend(wrapped.iter().cloned());
        Ok(())
    }

    /// Counts entry `at` (not a genesis) into this view, or says why it does not count. A
    /// removal or demotion that counts is noted in `revocations`.
    fn count(
        &mut self,
        at: usize,
        entry: &Entry,
        revocations: &mut Vec<Revocation>,
    ) -> Result<(), Ignored> {
        let signer = entry.signer;
        // A member may rename itself, say whether it accepts remote wipe, and take itself
        // out; everything else is an admin's.
        let own = match &entry.action {
            Action::SetName { device, .. }
            | Action::Remove { device, .. }
            | Action::WipePolicy { device, .. } => *device == signer && self.is_member(&signer),
            _ => false,
        };
        if !own && !self.is_admin(&signer) {
            return Err(Ignored::NotAdmin(signer));
        }
        let admins = self.members.values().filter(|m| m.admin).count();
        match &entry.action {
            Action::Genesis { .. } => unreachable!("counted by `genesis`"),
            Action::Add {
                device,
                role,
                name,
                kem,
                wrapped,
            } => {
                if self.is_member(device) {
                    return Err(Ignored::AlreadyMember(*device));
                }
                self.removed.remove(device);
                self.cutoffs.retain(|(d, _), _| d != device);
                let member = Member {
                    device: *device,
                    name: name.clone(),
                    role: *role,
                    admin: false,
                    kem: *kem,
                };
                self.members.insert(*device, member);
                self.wraps.extend(wrapped.iter().cloned());
            }
            Action::Remove { device, wraps, .. } => {
                self.remove(at, *device, wraps, admins, revocations)?;
            }
            Action::SetRole { device, role } => {
                let member = self
                    .members
                    .get_mut(device)
                    .ok_or(Ignored::NotAMember(*device))?;
                if member.admin && *role == Role::Storage {
                    return Err(Ignored::StorageCannotBeAdmin);
                }
                member.role = *role;
            }
            Action::Rotate { epoch, wraps, .. } => {
                if *epoch != Epoch(self.epoch.0 + 1) {
                    return Err(Ignored::StaleRotation);
                }
                self.epoch = *epoch;
                self.count_wraps(wraps);
            }
            Action::WipePolicy { device, accepts } => {
                if *accepts {
                    self.accepts_wipe.insert(*device);
                } else {
                    self.accepts_wipe.remove(device);
                }
            }
            Action::Cutoff {
                device,
                folder,
                last,
            } => {
                if !self.removed.contains_key(device) {
                    return Err(Ignored::NotRemoved(*device));
                }
                self.cutoffs
                    .entry((*device, *folder))
                    .or_default()
                    .merge(last);
            }
            Action::SetName { device, name } => {
                let member = self
                    .members
                    .get_mut(device)
                    .ok_or(Ignored::NotAMember(*device))?;
                member.name = name.clone();
            }
            Action::SetAdmin { device, admin } => {
                let member = self
                    .members
                    .get_mut(device)
                    .ok_or(Ignored::NotAMember(*device))?;
                if *admin && member.role == Role::Storage {
                    return Err(Ignored::StorageCannotBeAdmin);
                }
                if !*admin && member.admin && admins == 1 {
                    return Err(Ignored::LastAdmin);
                }
                let demoted = member.admin && !*admin;
                member.admin = *admin;
                if demoted {
                    let device = *device;
                    revocations.push(Revocation { at, device });
                }
            }
        }
        Ok(())
    }

    /// Counts the removal `at` of `device`: a new epoch, with the wraps made for it.
    fn remove(
        &mut self,
        at: usize,
        device: DeviceId,
        wraps: &[WrappedKey],
        admins: usize,
        revocations: &mut Vec<Revocation>,
    ) -> Result<(), Ignored> {
        let Some(member) = self.members.get(&device) else {
            // Already gone, but still an admin's removal: it beats whatever is concurrent with
            // it (rule 3), which keeps the evaluation stable.
            if self.removed.contains_key(&device) {
                revocations.push(Revocation { at, device });
            }
            return Err(Ignored::NotAMember(device));
        };
        if member.admin && admins == 1 {
            return Err(Ignored::LastAdmin);
        }
        self.members.remove(&device);
        self.epoch = Epoch(self.epoch.0 + 1);
        self.removed.insert(device, self.epoch);
        self.count_wraps(wraps);
        revocations.push(Revocation { at, device });
        Ok(())
    }

    /// Counts the wraps of a new epoch's key (an entry that just started [`Self::epoch`]).
    /// An entry concurrent with another that started an epoch wrapped its key for an epoch
    /// that other entry took: those wraps do not count. Nor do any of a key wrapped to a device
    /// that is not a member here (its admin had not heard of that device's removal): the key
    /// may be in the removed device's hands. Either way the mesh then needs a rotation.
    fn count_wraps(&mut self, wraps: &[WrappedKey]) {
        let epoch = self.epoch;
        let fresh = || wraps.iter().filter(|w| w.epoch == epoch);
        if fresh().all(|w| self.members.contains_key(&w.recipient)) {
            self.wraps.extend(fresh().cloned());
        }
    }
}
