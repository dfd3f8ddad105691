//! Changing who is in the mesh, as a device signs it: removing a device (or leaving) and
//! rotating keys — each a new epoch whose key is wrapped to the members that stay, older keys
//! chained under it — renaming, the remote-wipe policy; the key ring a device derives from the
//! log; and the removal notice a removed device is handed if it comes back.

use super::*;

/// Change marks per cutoff entry (about 40 bytes each, well inside an entry's size cap).
const MARKS_PER_ENTRY: usize = 1024;

impl MembershipLog {
    /// Removes `device` as `admin` (or as itself, leaving): a new epoch whose fresh key is wrapped to every remaining
    /// member that holds keys, with every key of `ring` sealed under it. Returns the new key.
    pub fn remove(
        &mut self,
        admin: &DeviceKeys,
        device: DeviceId,
        ring: &KeyRing,
    ) -> Result<MeshKey, MembershipError> {
        self.remove_with(admin, device, ring, false)
    }

    /// [`MembershipLog::remove`], asking the device to wipe itself if it comes back (`wipe`).
    pub fn remove_with(
        &mut self,
        admin: &DeviceKeys,
        device: DeviceId,
        ring: &KeyRing,
        wipe: bool,
    ) -> Result<MeshKey, MembershipError> {
        if !self.view.is_member(&device) {
            return Err(MembershipError::Malformed(format!(
                "{device} is not a member of this mesh"
            )));
        }
        let admins = self.view.members.values().filter(|m| m.admin).count();
        if self.view.is_admin(&device) && admins == 1 {
            return Err(MembershipError::Malformed(
                "the last admin cannot be removed (make another device an admin first)".into(),
            ));
        }
        let (key, wraps, chain) = self.next_key(Some(device), ring);
        let action = Action::Remove {
            device,
            wraps,
            chain,
            wipe,
        };
        if device == admin.device_id() {
            self.append_unchecked(admin, action); // leaving: a member may remove itself
        } else {
            self.append(admin, action)?;
        }
        Ok(key)
    }

    /// Names, as `admin`, the last index changes of the removed `device` that count in one
    /// folder (see [`Action::Cutoff`]); large sets are split over several entries.
    pub fn cut_off(
        &mut self,
        admin: &DeviceKeys,
        device: DeviceId,
        folder: FolderTag,
        last: Vec<ChangeMark>,
    ) -> Result<(), MembershipError> {
        // An empty cutoff still counts: nothing the device signed in this folder is kept.
        let parts: Vec<&[ChangeMark]> = if last.is_empty() {
            vec![&[]]
        } else {
            last.chunks(MARKS_PER_ENTRY).collect()
        };
        for part in parts {
            let last = part.to_vec();
            self.append(
                admin,
                Action::Cutoff {
                    device,
                    folder,
                    last,
                },
            )?;
        }
        Ok(())
    }

    /// Starts a new key epoch as `admin` without removing anyone (see [`Action::Rotate`]).
    pub fn rotate(
        &mut self,
        admin: &DeviceKeys,
        ring: &KeyRing,
    ) -> Result<MeshKey, MembershipError> {
        let (key, wraps, chain) = self.next_key(None, ring);
        let epoch = key.epoch();
        self.append(
            admin,
            Action::Rotate {
                epoch,
                wraps,
                chain,
            },
        )?;
        Ok(key)
    }

    /// A fresh key for the next epoch, wrapped to every member that holds keys (but
    /// `leaving`), and every key of `ring` sealed under it.
    fn next_key(
        &self,
        leaving: Option<DeviceId>,
        ring: &KeyRing,
    ) -> (MeshKey, Vec<WrappedKey>, Vec<SealedKey>) {
        let key = MeshKey::generate(Epoch(self.view.epoch.0 + 1));
        let wraps = self
            .view
            .members
            .values()
            .filter(|m| Some(m.device) != leaving && m.role.holds_mesh_key())
            .filter_map(|m| {
                let kem = m.kem.as_ref()?;
                key.wrap_for(&self.mesh, &m.device, kem).ok()
            })
            .collect();
        let chain = ring
            .newest_first()
            .map(|old| old.seal_under(&key, &self.mesh))
            .collect();
        (key, wraps, chain)
    }

    /// Says whether `keys`' device (a member) accepts remote wipe: an entry it signs itself.
    pub fn set_wipe_policy(
        &mut self,
        keys: &DeviceKeys,
        accepts: bool,
    ) -> Result<EntryHash, MembershipError> {
        let device = keys.device_id();
        if !self.view.is_member(&device) {
            return Err(MembershipError::Malformed(format!(
                "{device} is not a member of this mesh"
            )));
        }
        Ok(self.append_unchecked(keys, Action::WipePolicy { device, accepts }))
    }

    /// Renames `device` (this device itself, or any member if `signer` is an admin).
    pub fn rename(
        &mut self,
        signer: &DeviceKeys,
        device: DeviceId,
        name: SealedName,
    ) -> Result<EntryHash, MembershipError> {
        if !self.view.is_member(&device) {
            return Err(MembershipError::Malformed(format!(
                "{device} is not a member of this mesh"
            )));
        }
        let action = Action::SetName { device, name };
        if device == signer.device_id() {
            Ok(self.append_unchecked(signer, action))
        } else {
            self.append(signer, action)
        }
    }

    /// The signed entries (as signed, so they verify on their own) of the counted removals of
    /// `device`: what a member tells a removed device that comes back, and nothing else.
    /// Nothing while `device` is a member (one removed and added back is told nothing of its
    /// old removal).
    pub fn removal_notice(&self, device: &DeviceId) -> Vec<Vec<u8>> {
        if self.view.is_member(device) || !self.view.removed.contains_key(device) {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|(hash, entry)| {
                !self.view.ignored.contains_key(hash)
                    && matches!(&entry.action, Action::Remove { device: d, .. } if d == device)
            })
            .filter_map(|(hash, _)| self.raw_entry(hash))
            .collect()
    }

    /// One entry as signed (for tests of what a forger could send).
    #[doc(hidden)]
    pub fn raw_entry(&self, hash: &EntryHash) -> Option<Vec<u8>> {
        match self.doc.get(ROOT, hash.to_hex()).ok()??.0 {
            automerge::Value::Scalar(s) => match s.as_ref() {
                automerge::ScalarValue::Bytes(bytes) => Some(bytes.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Checks a removal notice against this log (the one a removed device still holds): the
    /// entry must be for this mesh, verify, remove `me`, and be signed by a device this log
    /// says is an admin. Returns whether it asks for a wipe; `None` if it is no such removal
    /// (forged, for another device or mesh, or signed by a non-admin).
    pub fn check_removal(&self, signed: &[u8], me: &DeviceId) -> Option<bool> {
        let entry = SignedEntry::decode_verified(signed, &self.mesh).ok()?;
        if !self.view.is_admin(&entry.signer) {
            return None;
        }
        match entry.action {
            Action::Remove { device, wipe, .. } if device == *me => Some(wipe),
            _ => None,
        }
    }

    /// Every mesh key `keys`' device can open: those wrapped to it, and the older ones sealed
    /// under those in counted removals' chains (so a device that joined after a removal still
    /// reads what was written before it).
    pub fn key_ring(&self, keys: &DeviceKeys) -> KeyRing {
        let mut ring = KeyRing::default();
        for wrap in self.view.wraps_for(&keys.device_id()) {
            if let Ok(key) = wrap.unwrap_with(&self.mesh, keys) {
                ring.keys.entry(key.epoch()).or_insert(key);
            }
        }
        let chains: Vec<&SealedKey> = self
            .entries
            .iter()
            .filter(|(hash, _)| !self.view.ignored.contains_key(hash))
            .filter_map(|(_, entry)| match &entry.action {
                Action::Remove { chain, .. } | Action::Rotate { chain, .. } => Some(chain),
                _ => None,
            })
            .flatten()
            .collect();
        loop {
            let before = ring.keys.len();
            for sealed in &chains {
                if ring.keys.contains_key(&sealed.epoch) {
                    continue;
                }
                let opened = ring
                    .keys
                    .get(&sealed.under)
                    .and_then(|under| sealed.open(under, &self.mesh).ok());
                if let Some(key) = opened {
                    ring.keys.insert(key.epoch(), key);
                }
            }
            if ring.keys.len() == before {
                return ring;
            }
        }
    }
}

/// The mesh keys one device holds, by epoch: the newest seals what it writes now, each older
/// one opens what was written in its epoch.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<Epoch, MeshKey>,
}

impl KeyRing {
    /// The newest key (what new data is sealed with).
    pub fn current(&self) -> Option<&MeshKey> {
        self.keys.values().next_back()
    }

    /// The key of `epoch`, if this device holds it.
    pub fn get(&self, epoch: Epoch) -> Option<&MeshKey> {
        self.keys.get(&epoch)
    }

    /// Every key, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &MeshKey> {
        self.keys.values().rev()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// A ring of exactly these keys (tests, and a fresh mesh's first key).
    pub fn of(keys: impl IntoIterator<Item = MeshKey>) -> KeyRing {
        KeyRing {
            keys: keys.into_iter().map(|k| (k.epoch(), k)).collect(),
        }
    }
}
