//! The mesh as this device knows it: the membership log and this device's mesh key, who may
//! connect, who is a storage peer, and the inviter's side of pairing.

use std::time::Duration;

use anyhow::Context;
use meshsync_crdt::{
    Action, DeviceKeys, Epoch, KeyRing, MembershipLog, MeshId, MeshKey, Role, SealedName,
};
use meshsync_transport::PeerId;

use super::{Device, Shared};
use crate::home::Home;
use crate::net;
use crate::pairing;
use crate::protocol::{self, JoinPayload, SyncChanges, SyncRequest};
use crate::state::{Batch, State};

/// Opens the home's state, creating a new mesh (this device its first admin) if it has none.
pub fn open_state(home: &Home, keys: &DeviceKeys) -> anyhow::Result<(State, MembershipLog)> {
    let state = State::open(home.path())?;
    let loaded = state.load()?;
    let log = match (loaded.mesh, loaded.membership) {
        (Some(mesh), Some(bytes)) => MembershipLog::load(mesh, &bytes)
            .with_context(|| format!("loading the membership log of mesh {mesh}"))?,
        _ => {
            let name = home.config()?.name;
            let (mut log, mesh) = MembershipLog::create(keys, &name, &MeshKey::generate(Epoch(0)));
            state.commit(Batch {
                mesh: Some(mesh),
                membership: Some(log.save()),
                ..Batch::default()
            })?;
            log
        }
    };
    Ok((state, log))
}

impl Device {
    /// After the log changed: the current key and who may connect. Returns the peers to let
    /// in, for the caller to hand the transport once the device lock is released.
    pub(crate) fn membership_changed(&mut self) -> Vec<PeerId> {
        *self.keys_ring.lock().expect("key lock") = self.log.key_ring(&self.keys);
        *self.readers.lock().expect("readers lock") =
            net::key_holders(&self.log, &self.keys.device_id());
        self.transport
            .allowed()
            .set_notice(net::notice_peers(&self.log));
        net::other_members(&self.log, &self.keys.device_id())
    }

    /// The mesh's storage peers.
    pub(crate) fn storage_peers(&self) -> Vec<PeerId> {
        self.log
            .view()
            .members
            .values()
            .filter(|m| m.role == Role::Storage)
            .map(|m| m.device.to_peer_id())
            .collect()
    }

    /// The current mesh key (a device that joined holds one; a fresh home's is made at start).
    pub(crate) fn mesh_key(&self) -> anyhow::Result<MeshKey> {
        self.keys_ring
            .lock()
            .expect("key lock")
            .current()
            .cloned()
            .context("this device holds no mesh key")
    }

    /// Every mesh key this device holds (to open what older epochs sealed).
    pub(crate) fn key_ring(&self) -> KeyRing {
        self.keys_ring.lock().expect("key lock").clone()
    }

    /// Whether `peer` is a storage peer of the mesh (sent no folder state, ever).
    pub(crate) fn is_storage(&self, peer: &PeerId) -> bool {
        meshsync_crdt::DeviceId::from_peer_id(peer)
            .and_then(|d| self.log.view().members.get(&d).map(|m| m.role))
            == Some(Role::Storage)
    }

    /// A member's name, opened with the mesh key (the log holds it sealed).
    pub(crate) fn member_name(&self, m: &meshsync_crdt::Member) -> String {
        let ring = self.key_ring();
        ring.get(m.name.epoch)
            .and_then(|k| m.name.open(k, &self.log.mesh(), &m.device))
            .unwrap_or_else(|| "(name sealed under another key)".into())
    }

    /// Adds a joiner the pairing handshake vouched for: a signed `Add` entry, the mesh key
    /// wrapped to it (full devices), committed. Returns what to send the joiner and the push
    /// that tells connected members.
    fn admit_joiner(
        &mut self,
        joiner: &meshsync_transport::pair::Joiner,
        addrs: Vec<String>,
    ) -> anyhow::Result<(Vec<u8>, SyncRequest)> {
        let key = self.mesh_key()?;
        let mesh = self.log.mesh();
        let name = SealedName::seal(&key, &mesh, &joiner.device, &capped_name(&joiner.name));
        let wrapped = if joiner.role.holds_mesh_key() {
            Some(key.wrap_for(&mesh, &joiner.device, &joiner.kem)?)
        } else {
            None
        };
        self.log.append(
            &self.keys,
            Action::Add {
                device: joiner.device,
                role: joiner.role,
                name,
                kem: Some(joiner.kem),
                wrapped,
            },
        )?;
        self.state.commit(Batch {
            membership: Some(self.log.save()),
            ..Batch::default()
        })?;
        let everything = self.log.changes_since(&[]);
        let push = SyncRequest::Push(SyncChanges {
            membership: everything.clone(),
            ..SyncChanges::default()
        });
        let payload = postcard::to_stdvec(&JoinPayload {
            mesh,
            membership: everything,
            inviter_addrs: addrs,
        })?;
        Ok((payload, push))
    }
}

/// The longest device name kept (bytes); a joiner's longer name is cut at a character.
pub const MAX_NAME_BYTES: usize = 64;

/// `name` cut to [`MAX_NAME_BYTES`], on a character boundary, control characters dropped.
pub fn capped_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// Starts an invite: a pairing endpoint whose join adds the device to the log (signed by this
/// admin) and wraps the mesh key to it. Returns the code.
pub async fn invite(device: &Shared, role: Role, valid_for: Duration) -> anyhow::Result<String> {
    let (keys, mesh, transport, pair_ip) = {
        let d = device.lock().await;
        if !d.log.view().is_admin(&d.keys.device_id()) {
            anyhow::bail!("only an admin device can invite; this device is not an admin: run `meshsync invite` on an admin device, or have an admin make this one an admin with `meshsync admin grant`");
        }
        (
            d.keys.clone(),
            d.log.mesh(),
            d.transport.clone(),
            d.pair_ip.clone(),
        )
    };
    let addrs: Vec<String> = transport
        .listen_addrs()
        .await
        .iter()
        .map(|a| a.to_string())
        .collect();
    let joined = device.clone();
    let handle = tokio::runtime::Handle::current();
    let inviter = meshsync_transport::pair::Inviter::start(
        &keys,
        mesh,
        role,
        valid_for,
        &pair_ip,
        move |joiner| {
            let device = joined.clone();
            let addrs = addrs.clone();
            // The pairing endpoint calls back synchronously; the device lock is async.
            tokio::task::block_in_place(|| {
                handle.block_on(async move {
                    let (admitted, transport, allowed) = {
                        let mut d = device.lock().await;
                        let admitted = d.admit_joiner(&joiner, addrs);
                        (admitted, d.transport.clone(), d.membership_changed())
                    };
                    let (payload, push) = admitted.map_err(|e| format!("{e:#}"))?;
                    transport.set_allowed(allowed).await;
                    // Tell the connected members now (a new member is let in everywhere).
                    tokio::spawn(async move {
                        for peer in transport.connected_peers().await {
                            let _ = protocol::doc(&transport, peer, &push).await;
                        }
                    });
                    Ok(payload)
                })
            })
        },
    )
    .await?;
    let code = inviter.invite.code();
    // Keep the pairing endpoint alive until it is used or expires.
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + valid_for;
        while !inviter.used() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(inviter);
    });
    Ok(code)
}

/// `meshsync join` through the running daemon: pairs (without holding the device lock),
/// takes the inviter's log, lets the members in and dials the inviter.
pub async fn join(device: &Shared, code: &str) -> anyhow::Result<MeshId> {
    join_with(device, code, false).await
}

/// [`join`], saying whether this device accepts remote wipe should it ever be removed.
pub async fn join_with(device: &Shared, code: &str, accept_wipe: bool) -> anyhow::Result<MeshId> {
    let (home, keys) = {
        let d = device.lock().await;
        if !d.folders.is_empty() {
            anyhow::bail!(pairing::ALREADY_SYNCING);
        }
        (d.home.clone(), d.keys.clone())
    };
    let payload = pairing::handshake(&home, &keys, code).await?;
    let (mesh, addrs, transport, allowed) = {
        let mut d = device.lock().await;
        let (log, addrs) = pairing::commit(&d.state, &keys, payload, accept_wipe)?;
        d.log = log;
        (
            d.log.mesh(),
            addrs,
            d.transport.clone(),
            d.membership_changed(),
        )
    };
    transport.set_allowed(allowed).await;
    net::dial_text(&transport, &addrs).await;
    Ok(mesh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joiner_names_are_capped_and_cleaned() {
        assert_eq!(capped_name("laptop"), "laptop");
        assert_eq!(capped_name("evil\x1b[2Jname\n"), "evil[2Jname");
        let long = "é".repeat(100);
        let capped = capped_name(&long);
        assert!(capped.len() <= MAX_NAME_BYTES && capped.chars().all(|c| c == 'é'));
    }
}
