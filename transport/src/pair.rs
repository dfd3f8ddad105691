//! `/meshsync/pair/1`: joining a mesh with a one-time invite code, no server involved.
//!
//! An [`Invite`] carries the mesh ID, the inviter's device ID and addresses, the role offered,
//! an expiry and a 128-bit secret, as one copy-pasteable line with a checksum. The inviter
//! serves it from a short-lived pairing endpoint of its own ([`Inviter`]), which admits anyone
//! through the libp2p handshake but serves nothing except this protocol, and closes after one
//! successful join, at expiry, or after too many failed attempts.
//!
//! The two sides run Noise `XXpsk3_25519_ChaChaPoly_BLAKE2s` (`snow`) keyed by the secret, with
//! each side's X25519 key-wrapping key as its static key: each proves it knows the code and
//! learns the other's key. The joiner's libp2p peer ID must match the device ID it claims, and
//! the inviter's must match the code. A wrong, expired or reused code is refused and changes
//! nothing; the inviter's `on_join` (which appends the signed "add" entry) runs only after the
//! handshake succeeded.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use meshsync_crdt::{DeviceId, DeviceKeys, KemPublicKey, MeshId, Role};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::frame::{self, FrameError};
use crate::{Allowed, Config, Transport};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshsync/pair/1");
const NOISE: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
const PREFIX: &str = "meshsync-invite:";
const MAX_HANDSHAKE: usize = 64 * 1024;
const MAX_REPLY: usize = 16 * 1024 * 1024;
const STEP: Duration = Duration::from_secs(15);
const MAX_FAILED_ATTEMPTS: u32 = 20;

/// Why pairing failed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("this is not a meshsync invite code (it starts with {PREFIX}); copy the last line `meshsync invite` printed")]
    NotAnInvite,
    #[error("the invite code is damaged or incomplete: copy the whole line again")]
    Damaged,
    #[error("the invite code expired; ask for a new one with `meshsync invite`")]
    Expired,
    #[error("could not reach the inviting device at {0}; is its daemon running on this network?")]
    Unreachable(String),
    #[error("the inviting device refused: {0}")]
    Refused(String),
    #[error("the pairing handshake failed: wrong, used or expired code; ask for a new one with `meshsync invite`")]
    Handshake,
    #[error("the device that answered is not the one that made this invite; ask for a new code with `meshsync invite` and try again")]
    WrongInviter,
    #[error("pairing: {0}")]
    Frame(#[from] FrameError),
    #[error("pairing: {0}")]
    Transport(#[from] crate::TransportError),
}

/// A one-time invitation to join a mesh.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Invite {
    pub mesh: MeshId,
    pub inviter: DeviceId,
    pub addrs: Vec<String>,
    pub role: Role,
    /// Unix seconds after which the code is refused.
    pub expires: u64,
    secret: [u8; 16],
}

impl Invite {
    pub fn new(
        mesh: MeshId,
        inviter: DeviceId,
        addrs: Vec<Multiaddr>,
        role: Role,
        valid_for: Duration,
    ) -> Self {
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).expect("the operating system's random source failed");
        Invite {
            mesh,
            inviter,
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            role,
            expires: unix_now() + valid_for.as_secs(),
            secret,
        }
    }

    /// The code as one line: prefix, then base32 of the invite and a 4-byte checksum.
    pub fn code(&self) -> String {
        let mut bytes = frame::encode(self);
        let check = blake3::hash(&bytes);
        bytes.extend_from_slice(&check.as_bytes()[..4]);
        format!(
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        )
    }

    /// Parses a code (whitespace and case are forgiven). Does not check expiry.
    pub fn parse(code: &str) -> Result<Invite, PairError> {
        let code: String = code.split_whitespace().collect();
        let body = code
            .strip_prefix(PREFIX)
            .ok_or(PairError::NotAnInvite)?
            .to_uppercase();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| PairError::Damaged)?;
        if bytes.len() < 5 {
            return Err(PairError::Damaged);
        }
        let (payload, check) = bytes.split_at(bytes.len() - 4);
        if blake3::hash(payload).as_bytes()[..4] != *check {
            return Err(PairError::Damaged);
        }
        frame::decode(payload).map_err(|_| PairError::Damaged)
    }

    pub fn is_expired(&self) -> bool {
        unix_now() > self.expires
    }

    fn psk(&self) -> Zeroizing<[u8; 32]> {
        let mut material = Zeroizing::new(Vec::with_capacity(32));
        material.extend_from_slice(&self.secret);
        material.extend_from_slice(self.mesh.as_bytes());
        Zeroizing::new(blake3::derive_key("meshsync 2026-11 invite psk", &material))
    }

    fn prologue(&self) -> Vec<u8> {
        let mut prologue = b"meshsync pair v1".to_vec();
        prologue.extend_from_slice(self.mesh.as_bytes());
        prologue.extend_from_slice(self.inviter.as_bytes());
        prologue
    }
}

/// What the joiner says about itself, inside the encrypted handshake.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinRequest {
    pub device: DeviceId,
    pub name: String,
}

/// A join the inviter has authenticated: the device, its name and its X25519 key.
#[derive(Debug, Clone)]
pub struct Joiner {
    pub device: DeviceId,
    pub name: String,
    pub kem: KemPublicKey,
    pub role: Role,
}

#[derive(Serialize, Deserialize, Debug)]
enum JoinReply {
    Accepted(Vec<u8>),
    Refused(String),
}

fn params() -> snow::params::NoiseParams {
    NOISE.parse().expect("a valid Noise pattern")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The inviting side: a pairing endpoint that serves one invite.
pub struct Inviter {
    pub invite: Invite,
    transport: Transport,
    done: Arc<AtomicBool>,
}

impl Inviter {
    /// Starts a pairing endpoint on `ip` and makes the invite for it. `on_join` runs once the
    /// handshake proved the joiner holds the code; what it returns is sent to the joiner.
    pub async fn start<F>(
        keys: &DeviceKeys,
        mesh: MeshId,
        role: Role,
        valid_for: Duration,
        ip: &str,
        on_join: F,
    ) -> Result<Inviter, PairError>
    where
        F: Fn(Joiner) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), ip);
        config.listen.truncate(1); // TCP only
        config.allowed = Allowed::anyone();
        config.max_connections = 16;
        config.peer_exchange = false;
        let transport = Transport::start(config)?;
        let addrs = transport.wait_listening().await;
        let invite = Invite::new(mesh, keys.device_id(), addrs, role, valid_for);
        let done = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU32::new(0));
        let mut incoming = transport
            .control()
            .accept(PROTOCOL)
            .map_err(|_| PairError::Refused("pairing already running".into()))?;
        let static_key = keys.kem_secret();
        let served = invite.clone();
        let done_flag = done.clone();
        let on_join = Arc::new(on_join);
        tokio::spawn(async move {
            while let Some((peer, mut stream)) = incoming.next().await {
                if done_flag.load(Ordering::SeqCst)
                    || served.is_expired()
                    || failures.load(Ordering::SeqCst) >= MAX_FAILED_ATTEMPTS
                {
                    tracing::info!(%peer, "pairing attempt after the invite was used or expired");
                    let _ = stream.close().await;
                    if !done_flag.load(Ordering::SeqCst) {
                        continue;
                    }
                    break;
                }
                match respond(&served, &static_key, peer, &mut stream, on_join.as_ref()).await {
                    Ok(joiner) => {
                        tracing::info!(device = %joiner, "paired");
                        done_flag.store(true, Ordering::SeqCst);
                    }
                    Err(error) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        tracing::warn!(%peer, %error, "pairing attempt refused");
                    }
                }
                let _ = stream.close().await;
            }
        });
        Ok(Inviter {
            invite,
            transport,
            done,
        })
    }

    /// Whether the invite has been used.
    pub fn used(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// The pairing endpoint's transport (to stop it, drop the inviter and this handle).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
}

async fn respond<F>(
    invite: &Invite,
    static_key: &[u8; 32],
    peer: PeerId,
    stream: &mut libp2p::Stream,
    on_join: &F,
) -> Result<DeviceId, PairError>
where
    F: Fn(Joiner) -> Result<Vec<u8>, String>,
{
    let psk = invite.psk();
    let prologue = invite.prologue();
    let mut noise = snow::Builder::new(params())
        .local_private_key(static_key)
        .and_then(|b| b.psk(3, &psk))
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .map_err(|_| PairError::Handshake)?;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    let msg1 = read(stream).await?;
    noise
        .read_message(&msg1, &mut buf)
        .map_err(|_| PairError::Handshake)?;
    let len = noise
        .write_message(&[], &mut buf)
        .map_err(|_| PairError::Handshake)?;
    frame::write_frame(stream, &buf[..len]).await?;
    let msg3 = read(stream).await?;
    let len = noise
        .read_message(&msg3, &mut buf)
        .map_err(|_| PairError::Handshake)?;
    let request: JoinRequest = frame::decode(&buf[..len])?;
    let remote = noise.get_remote_static().ok_or(PairError::Handshake)?;
    let kem = KemPublicKey(remote.try_into().map_err(|_| PairError::Handshake)?);
    let mut noise = noise
        .into_transport_mode()
        .map_err(|_| PairError::Handshake)?;
    let reply = if request.device.to_peer_id() != peer {
        JoinReply::Refused("the joining device's ID does not match its connection".into())
    } else if invite.is_expired() {
        JoinReply::Refused("the invite expired".into())
    } else {
        match on_join(Joiner {
            device: request.device,
            name: request.name.clone(),
            kem,
            role: invite.role,
        }) {
            Ok(payload) => JoinReply::Accepted(payload),
            Err(reason) => JoinReply::Refused(reason),
        }
    };
    let accepted = matches!(reply, JoinReply::Accepted(_));
    let plain = frame::encode(&reply);
    let mut sealed = Vec::new();
    for piece in plain.chunks(60_000) {
        let mut out = vec![0u8; piece.len() + 16];
        let len = noise
            .write_message(piece, &mut out)
            .map_err(|_| PairError::Handshake)?;
        sealed.extend_from_slice(&(len as u32).to_be_bytes());
        sealed.extend_from_slice(&out[..len]);
    }
    frame::write_frame(stream, &sealed).await?;
    if accepted {
        Ok(request.device)
    } else {
        Err(PairError::Refused("join refused".into()))
    }
}

async fn read(stream: &mut libp2p::Stream) -> Result<Vec<u8>, PairError> {
    Ok(frame::read_frame(stream, MAX_HANDSHAKE, STEP)
        .await?
        .ok_or(FrameError::Closed)?)
}

/// The joining side: connects to the inviter named in `code`, runs the handshake, and returns
/// what the inviter sent (the mesh's state and the wrapped key, for the node to apply).
pub async fn join(
    keys: &DeviceKeys,
    name: &str,
    code: &str,
) -> Result<(Invite, Vec<u8>), PairError> {
    let invite = Invite::parse(code)?;
    if invite.is_expired() {
        return Err(PairError::Expired);
    }
    let inviter = invite.inviter.to_peer_id();
    let mut config = Config::tcp_and_quic(keys.libp2p_keypair(), "127.0.0.1");
    config.listen.clear();
    config.peer_exchange = false;
    config.allowed.set([inviter]);
    let transport = Transport::start(config)?;
    let addrs: Vec<Multiaddr> = invite.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if addrs.is_empty() {
        return Err(PairError::Damaged);
    }
    transport.dial_peer(inviter, addrs).await;
    if !transport.wait_connected(inviter, STEP).await {
        return Err(PairError::Unreachable(invite.addrs.join(", ")));
    }
    let mut control = transport.control();
    let mut stream = tokio::time::timeout(STEP, control.open_stream(inviter, PROTOCOL))
        .await
        .map_err(|_| PairError::Unreachable(invite.addrs.join(", ")))?
        .map_err(|_| PairError::WrongInviter)?;
    let psk = invite.psk();
    let prologue = invite.prologue();
    let static_key = keys.kem_secret();
    let mut noise = snow::Builder::new(params())
        .local_private_key(&static_key[..])
        .and_then(|b| b.psk(3, &psk))
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_initiator())
        .map_err(|_| PairError::Handshake)?;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    let len = noise
        .write_message(&[], &mut buf)
        .map_err(|_| PairError::Handshake)?;
    frame::write_frame(&mut stream, &buf[..len]).await?;
    let msg2 = read(&mut stream).await.map_err(|_| PairError::Handshake)?;
    noise
        .read_message(&msg2, &mut buf)
        .map_err(|_| PairError::Handshake)?;
    let request = frame::encode(&JoinRequest {
        device: keys.device_id(),
        name: name.to_string(),
    });
    let len = noise
        .write_message(&request, &mut buf)
        .map_err(|_| PairError::Handshake)?;
    frame::write_frame(&mut stream, &buf[..len]).await?;
    let mut noise = noise
        .into_transport_mode()
        .map_err(|_| PairError::Handshake)?;
    let sealed = frame::read_frame(&mut stream, MAX_REPLY, STEP)
        .await
        .map_err(|_| PairError::Handshake)?
        .ok_or(PairError::Handshake)?;
    let mut plain = Vec::new();
    let mut rest = &sealed[..];
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or(PairError::Handshake)?;
        let len = u32::from_be_bytes(*len) as usize;
        let piece = tail.get(..len).ok_or(PairError::Handshake)?;
        let mut out = vec![0u8; len];
        let n = noise
            .read_message(piece, &mut out)
            .map_err(|_| PairError::Handshake)?;
        plain.extend_from_slice(&out[..n]);
        rest = &tail[len..];
    }
    let _ = stream.close().await;
    match frame::decode::<JoinReply>(&plain)? {
        JoinReply::Accepted(payload) => Ok((invite, payload)),
        JoinReply::Refused(reason) => Err(PairError::Refused(reason)),
    }
}
