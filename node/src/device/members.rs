//! Managing who is in the mesh: removing a device, naming one, its role, who is an admin
//! (admins only; a device may rename itself). Each is a signed entry in the membership log,
//! pushed to the connected members at once (the others pull it). A removal is a signed entry
//! in the membership log that starts a new key epoch: a fresh mesh key, wrapped to every
//! member that stays, with the older keys sealed under it (so what was written before stays
//! readable to them and to devices that join later). From then on this device writes with the
//! new key, lets the removed device in no more, and drops its connection; every other member
//! and storage peer does the same as soon as it learns of the entry (pushed at once, or pulled
//! within the second).

use anyhow::Context;
use meshsync_crdt::{Action, DeviceId, Member, Role, SealedName};
use meshsync_transport::{PeerId, Transport};

use super::{sync, Device, Shared};
use crate::control::{Changed, Left, Removed};
use crate::protocol::{self, ByteBuf};
use crate::protocol::{SyncChanges, SyncRequest};
use crate::state::Batch;

/// `meshsync remove WHO [--wipe]`.
pub async fn remove(device: &Shared, who: &str, wipe: bool) -> anyhow::Result<Removed> {
    let (removed, (allowed, push, transport)) = {
        let mut d = device.lock().await;
        let member = d.member_named(who)?;
        if member.device == d.keys.device_id() {
            anyhow::bail!("this is this device; to take it out of the mesh, run `meshsync leave`");
        }
        let name = d.member_name(&member);
        let ring = d.key_ring();
        let keys = d.keys.clone();
        let accepts = d.log.view().accepts_wipe.contains(&member.device);
        // Its cutoff in each folder: every later change it signs is refused, whatever epoch
        // it claims (read before the removal is written, which it must follow).
        let cutoffs = (d.folders.values_mut())
            .map(|folder| folder.index.last_changes_of(&member.device))
            .collect::<Result<Vec<_>, _>>()?;
        let key = d.log.remove_with(&keys, member.device, &ring, wipe)?;
        for (tag, marks) in cutoffs {
            d.log.cut_off(&keys, member.device, tag, marks)?;
        }
        let rekeyed = d
            .log
            .view()
            .members
            .values()
            .filter(|m| m.role.holds_mesh_key() && m.device != keys.device_id())
            .count();
        let removed = Removed {
            device_id: member.device.to_string(),
            name,
            epoch: key.epoch().0,
            rekeyed,
            cut_off: d.folders.len(),
            wipe: wipe.then_some(accepts),
        };
        (removed, d.publish_membership()?)
    };
    tracing::warn!(device = %removed.device_id, name = %removed.name, epoch = removed.epoch, "device removed; new key epoch");
    transport.set_allowed(allowed).await;
    sync::push_to_devices(transport, Default::default(), push);
    Ok(removed)
}

/// `meshsync leave`: takes this device out of the mesh. It signs its own removal (a new key
/// epoch for the others, which it wraps to them and then forgets), tells the connected members
/// (and waits for their answer, so the news leaves with it), forgets the mesh — its state with
/// the membership log and every key wrapped to it, and its chunk store — and stops. The synced
/// files stay, as plain files; the home keeps its own identity and can join a mesh again.
pub async fn leave(device: &Shared) -> anyhow::Result<Left> {
    let (push, transport, told_to) = {
        let mut d = device.lock().await;
        let me = d.keys.device_id();
        if !d.log.view().is_member(&me) {
            anyhow::bail!(
                "this device is not a member of a mesh; join one with `meshsync join CODE`"
            );
        }
        let (ring, keys) = (d.key_ring(), d.keys.clone());
        let key = d.log.remove(&keys, me, &ring)?;
        drop(key); // the others' new key: this device forgets it at once
        let (_, push, transport) = d.publish_membership()?;
        let told_to = transport.connected_peers().await;
        (push, transport, told_to)
    };
    let mut told = 0;
    for peer in &told_to {
        if protocol::doc(&transport, *peer, &push).await.is_ok() {
            told += 1;
        }
    }
    if told == 0 {
        tracing::warn!("no member was online to hear that this device left; they learn it when they next meet it or another member that heard");
    }
    let d = device.lock().await;
    *d.keys_ring.lock().expect("key lock") = meshsync_crdt::KeyRing::default();
    d.readers.lock().expect("readers lock").clear();
    let home = d.home.path().to_path_buf();
    let _ = std::fs::remove_dir_all(home.join("chunks"));
    std::fs::remove_file(home.join("state.redb"))
        .context("forgetting the mesh (removing the state database)")?;
    tracing::warn!(told, "left the mesh; stopping");
    // Stops once this answer has reached the CLI.
    let stop = d.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stop.notify_one();
    });
    Ok(Left { told })
}

/// Starts a new key epoch if this device is an admin and the log says the mesh needs one
/// (concurrent removals took an epoch without a key, or a member lacks the current key; see
/// `MembershipView::needs_rotation`). Run every few seconds; of two admins rotating at once,
/// one rotation counts and the next look settles the rest.
pub async fn rotate_if_needed(device: &Shared) -> anyhow::Result<bool> {
    let (allowed, push, transport) = {
        let mut d = device.lock().await;
        let me = d.keys.device_id();
        let view = d.log.view();
        if !view.is_admin(&me) || !view.needs_rotation() {
            return Ok(false);
        }
        // At most one a minute from here: a member no key can be wrapped to (a bad public
        // key) must not make this device rotate for ever.
        if d.rotated_at
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(60))
        {
            return Ok(false);
        }
        d.rotated_at = Some(std::time::Instant::now());
        let (ring, keys) = (d.key_ring(), d.keys.clone());
        let key = d.log.rotate(&keys, &ring)?;
        tracing::warn!(
            epoch = key.epoch().0,
            "the mesh needed a new key epoch; started it"
        );
        d.publish_membership()?
    };
    transport.set_allowed(allowed).await;
    sync::push_to_devices(transport, Default::default(), push);
    Ok(true)
}

/// `meshsync name NEW_NAME`: renames this device (`who` = `None`) or, for an admin, a member.
pub async fn rename(device: &Shared, who: Option<&str>, name: &str) -> anyhow::Result<Changed> {
    let name = super::mesh::capped_name(name);
    if name.is_empty() {
        anyhow::bail!("a device name cannot be empty; give one, e.g. `meshsync name laptop`");
    }
    change(device, who, |d, member| {
        let key = d.mesh_key()?;
        let mesh = d.log.mesh();
        let sealed = SealedName::seal(&key, &mesh, &member.device, &name);
        let keys = d.keys.clone();
        d.log.rename(&keys, member.device, sealed)?;
        Ok(format!("now called {name:?}"))
    })
    .await
}

/// `meshsync role DEVICE device|read-only` (admins).
pub async fn set_role(device: &Shared, who: &str, role: Role) -> anyhow::Result<Changed> {
    if !matches!(role, Role::Device | Role::ReadOnly) {
        anyhow::bail!("a member's role can be device or read-only (storage peers join as such)");
    }
    change(device, Some(who), |d, member| {
        if member.role == Role::Storage {
            anyhow::bail!("a storage peer's role cannot change; to replace it, `meshsync remove` it and invite one with `meshsync invite --role storage`");
        }
        let keys = d.keys.clone();
        d.log.append(
            &keys,
            Action::SetRole {
                device: member.device,
                role,
            },
        )?;
        Ok(format!("now {role}"))
    })
    .await
}

/// `meshsync admin grant|revoke DEVICE` (admins; the last admin stays one).
pub async fn set_admin(device: &Shared, who: &str, admin: bool) -> anyhow::Result<Changed> {
    change(device, Some(who), |d, member| {
        let admins = d.log.view().members.values().filter(|m| m.admin).count();
        if !admin && member.admin && admins == 1 {
            anyhow::bail!(
                "{} is the last admin: make another device an admin first",
                d.member_name(member)
            );
        }
        if admin && member.role == Role::Storage {
            anyhow::bail!("a storage peer cannot be an admin; make a device one instead (see `meshsync devices`)");
        }
        let keys = d.keys.clone();
        d.log.append(
            &keys,
            Action::SetAdmin {
                device: member.device,
                admin,
            },
        )?;
        Ok(if admin {
            "now an admin"
        } else {
            "no longer an admin"
        }
        .to_string())
    })
    .await
}

/// Appends what `make` signs for the member `who` names (this device if `None`), commits it
/// and tells the mesh. Refused unless the entry counts.
async fn change(
    device: &Shared,
    who: Option<&str>,
    make: impl FnOnce(&mut Device, &Member) -> anyhow::Result<String>,
) -> anyhow::Result<Changed> {
    let (changed, (allowed, push, transport)) = {
        let mut d = device.lock().await;
        let member = match who {
            Some(who) => d.member_named(who)?,
            None => {
                let me = d.keys.device_id();
                d.log.view().members.get(&me).cloned().context(
                    "this device is not a member of a mesh; join one with `meshsync join CODE`",
                )?
            }
        };
        let ignored_before = d.log.view().ignored.len();
        let what = make(&mut d, &member)?;
        if d.log.view().ignored.len() > ignored_before {
            // Signed, but it does not count (the rules of the log say no): say so plainly.
            anyhow::bail!("the mesh's rules do not allow this change (see `meshsync devices`)");
        }
        let changed = Changed {
            device_id: member.device.to_string(),
            name: d.member_name(d.log.view().members.get(&member.device).unwrap_or(&member)),
            what,
        };
        (changed, d.publish_membership()?)
    };
    transport.set_allowed(allowed).await;
    sync::push_to_devices(transport, Default::default(), push);
    Ok(changed)
}

impl Device {
    /// After this device signed a membership entry: commits the log, takes in what it changed
    /// (keys, who may connect) and returns who may connect, the push that tells the connected
    /// members, and the transport to do both with once the lock is released.
    fn publish_membership(&mut self) -> anyhow::Result<(Vec<PeerId>, SyncRequest, Transport)> {
        let saved = self.log.save();
        self.state.commit(Batch {
            membership: Some(saved),
            ..Batch::default()
        })?;
        let allowed = self.membership_changed();
        let push = SyncRequest::Push(SyncChanges {
            membership: self.log.changes_since(&[]),
            ..SyncChanges::default()
        });
        Ok((allowed, push, self.transport.clone()))
    }

    /// The current member `who` names: its device ID, a unique prefix of it, or its name.
    pub(crate) fn member_named(&self, who: &str) -> anyhow::Result<Member> {
        let who = who.trim();
        let members: Vec<&Member> = self.log.view().members.values().collect();
        if let Ok(id) = who.parse::<DeviceId>() {
            if let Some(m) = members.iter().find(|m| m.device == id) {
                return Ok((*m).clone());
            }
        }
        let by_prefix: Vec<&&Member> = members
            .iter()
            .filter(|m| !who.is_empty() && m.device.to_string().starts_with(&who.to_uppercase()))
            .collect();
        let by_name: Vec<&&Member> = members
            .iter()
            .filter(|m| self.member_name(m) == who)
            .collect();
        match (by_prefix.as_slice(), by_name.as_slice()) {
            ([one], _) | ([], [one]) => Ok((**one).clone()),
            ([], []) => anyhow::bail!("no member of this mesh is called or starts with {who:?} (see `meshsync devices`)"),
            _ => anyhow::bail!("{who:?} names more than one member; give more of the device ID (see `meshsync devices`)"),
        }
    }
}

/// Serves `/meshsync/removed/1`: a removed device that accepted remote wipe is let through the
/// door (`net::notice_peers`) and told of its removal — the signed entries that removed it —
/// and nothing else. A member asking gets nothing.
pub(crate) fn serve_notice(device: &Shared, transport: &Transport) -> anyhow::Result<()> {
    let device = device.clone();
    meshsync_transport::rpc::serve_notice(transport, protocol::REMOVED, move |peer, _| {
        let device = device.clone();
        async move {
            let notice = match DeviceId::from_peer_id(&peer) {
                Some(id) => device.lock().await.log.removal_notice(&id),
                None => Vec::new(),
            };
            let notice: Vec<ByteBuf> = notice.into_iter().map(ByteBuf::from).collect();
            postcard::to_stdvec(&notice).ok()
        }
    })?;
    Ok(())
}

/// Asks `peer` whether this device was removed (after `peer` refused a pull). If a removal
/// signed by an admin of the log this device holds names it, this device stops syncing; if
/// the removal asks for a wipe and this device accepted remote wipe when it joined, it first
/// erases the content of its folders, its keys and its state. Returns whether it was removed.
pub(crate) async fn ask_if_removed(device: &Shared, peer: PeerId) -> anyhow::Result<bool> {
    let transport = device.lock().await.transport.clone();
    let notice: Vec<ByteBuf> = protocol::request(&transport, peer, protocol::REMOVED, &()).await?;
    let order = {
        let d = device.lock().await;
        let me = d.keys.device_id();
        let order = notice
            .iter()
            .take(16)
            .filter_map(|signed| d.log.check_removal(signed, &me))
            .reduce(|a, b| a || b);
        order.map(|wipe| (wipe, d.log.view().accepts_wipe.contains(&me)))
    };
    match order {
        None => Ok(false),
        Some((true, true)) => {
            tracing::error!("this device was removed from the mesh with a wipe order it accepted when it joined: erasing its folders, keys and state");
            wipe(device).await?;
            Ok(true)
        }
        Some(_) => {
            tracing::error!(
                "this device was removed from the mesh: nothing syncs any more (its files stay)"
            );
            Ok(true)
        }
    }
}

/// Erases the content of every synced folder (the folders stay, empty), this device's keys,
/// its state and its chunk store, then stops the device. Holds the device lock to the end, so
/// nothing else runs meanwhile.
async fn wipe(device: &Shared) -> anyhow::Result<()> {
    let d = device.lock().await;
    for (_, path) in d.folder_list() {
        match crate::disk::FolderRoot::open(&path) {
            Ok(root) => empty_folder(&root),
            Err(error) => tracing::warn!(folder = %path.display(), %error, "folder not wiped"),
        }
    }
    let home = d.home.path().to_path_buf();
    for gone in ["keys", "chunks"] {
        if let Err(error) = std::fs::remove_dir_all(home.join(gone)) {
            tracing::warn!(%gone, %error, "not removed");
        }
    }
    if let Err(error) = std::fs::remove_file(home.join("state.redb")) {
        tracing::warn!(%error, "state not removed");
    }
    tracing::error!("wiped; stopping");
    d.stop.notify_one();
    Ok(())
}

/// Removes everything inside `root` (links as links, never followed).
fn empty_folder(root: &crate::disk::FolderRoot) {
    let mut dirs = vec![String::new()];
    let mut emptied = Vec::new();
    while let Some(dir) = dirs.pop() {
        let Ok(names) = root.read_dir_kinds(&dir) else {
            continue;
        };
        for (name, kind) in names {
            let rel = match dir.as_str() {
                "" => name,
                _ => format!("{dir}/{name}"),
            };
            match kind {
                crate::disk::Kind::Dir => dirs.push(rel),
                _ => {
                    let _ = root.remove_file(&rel);
                }
            }
        }
        if !dir.is_empty() {
            emptied.push(dir);
        }
    }
    // Deepest first: each is empty by then.
    emptied.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for dir in emptied {
        let _ = root.remove_dir(&dir);
    }
}
