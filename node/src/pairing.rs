//! The joiner's side of pairing (`meshsync join CODE`), shared by the CLI (daemon stopped), a
//! running device and a storage peer. The handshake itself (Noise `XXpsk3` keyed by the
//! invite's secret) is `meshsync_transport::pair`; the inviter's side is
//! `device::mesh::invite`.

use anyhow::Context;
use meshsync_crdt::{DeviceKeys, MembershipLog, MeshId};

use crate::home::Home;
use crate::protocol::JoinPayload;
use crate::state::{Batch, State, PEER_ADDRS};

/// Joins the mesh of an invite code, writing the result into the state: the CLI's path, with
/// the daemon stopped. Returns the mesh and the inviter's addresses.
pub async fn join(
    home: &Home,
    state: &State,
    keys: &DeviceKeys,
    code: &str,
    accept_wipe: bool,
) -> anyhow::Result<(MeshId, Vec<String>)> {
    if !state.load()?.folders.is_empty() {
        anyhow::bail!(ALREADY_SYNCING);
    }
    let payload = handshake(home, keys, code).await?;
    let (log, addrs) = commit(state, keys, payload, accept_wipe)?;
    Ok((log.mesh(), addrs))
}

/// Why a home that syncs folders cannot join another mesh.
pub const ALREADY_SYNCING: &str =
    "this device already syncs folders in its own mesh; join with a fresh home (--home) instead";

/// The network half of joining: the pairing handshake, and the inviter's answer, checked to
/// be for the invite's mesh. Touches no state, so a running node need not hold its lock.
pub async fn handshake(home: &Home, keys: &DeviceKeys, code: &str) -> anyhow::Result<JoinPayload> {
    let name = home.config()?.name;
    let (invite, payload) = meshsync_transport::pair::join(keys, &name, code).await?;
    let payload: JoinPayload =
        postcard::from_bytes(&payload).context("the inviter sent an unreadable reply")?;
    if payload.mesh != invite.mesh {
        anyhow::bail!(
            "the inviter answered for another mesh; ask for a new code with `meshsync invite`"
        );
    }
    Ok(payload)
}

/// The state half of joining: verifies the inviter's membership log, checks this device is in
/// it, records whether it accepts remote wipe (`accept_wipe`: an entry it signs, which the
/// others learn when they next pull), and commits it with the inviter's addresses. Returns the
/// log and those addresses.
pub fn commit(
    state: &State,
    keys: &DeviceKeys,
    payload: JoinPayload,
    accept_wipe: bool,
) -> anyhow::Result<(MembershipLog, Vec<String>)> {
    let mut log = MembershipLog::empty(payload.mesh);
    log.apply(&payload.membership)
        .context("the inviter's membership log does not verify")?;
    if !log.view().is_member(&keys.device_id()) {
        anyhow::bail!(
            "the inviter did not add this device; ask for a new code with `meshsync invite`"
        );
    }
    if accept_wipe {
        log.set_wipe_policy(keys, true)?;
    }
    let mut batch = Batch {
        mesh: Some(payload.mesh),
        membership: Some(log.save()),
        ..Batch::default()
    };
    batch.put(&PEER_ADDRS, &payload.inviter_addrs);
    state.commit(batch)?;
    Ok((log, payload.inviter_addrs))
}
