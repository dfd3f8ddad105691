//! Names of things: [`DeviceId`], [`MeshId`], [`FolderId`] and [`Epoch`].
//!
//! A device ID is the device's Ed25519 public key, written for people the way Syncthing writes
//! its device IDs: RFC 4648 base32, cut into four groups of 13 characters, each followed by a
//! Luhn mod-32 check character, and printed as eight dash-separated blocks of seven:
//!
//! ```text
//! MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-OUSGYQT-XMFZWI3
//! ```
//!
//! The check characters catch any single mistyped character and most swaps of neighbours, so a
//! typo is reported as *mistyped* rather than as an unknown device. A device ID converts both
//! ways to the libp2p [`PeerId`] of the same key.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

const GROUP: usize = 13;
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Why a text is not a device ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceIdError {
    #[error("device ID has {0} characters; a device ID has 56 letters and digits (dashes optional), e.g. AAAAAAA-BBBBBBB-…")]
    Length(usize),
    #[error("device ID contains {0:?}, which is not a letter A-Z or a digit 2-7")]
    Character(char),
    #[error("device ID is mistyped: check character {group} of 4 does not match; compare it with `meshsync id` on that device")]
    Mistyped { group: usize },
    #[error("device ID is well-formed but is not a valid Ed25519 public key")]
    NotAKey,
}

/// A device's identity: its Ed25519 public key (also its libp2p identity and signing key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId([u8; 32]);

impl DeviceId {
    /// The device ID of a verified Ed25519 public key.
    pub fn from_verifying_key(key: &ed25519_dalek::VerifyingKey) -> Self {
        DeviceId(key.to_bytes())
    }

    /// Checks that `bytes` are a valid Ed25519 public key and wraps them.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, DeviceIdError> {
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| DeviceIdError::NotAKey)?;
        Ok(DeviceId(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The Ed25519 key that verifies this device's signatures.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, DeviceIdError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| DeviceIdError::NotAKey)
    }

    /// The libp2p peer ID of the same key.
    pub fn to_peer_id(&self) -> PeerId {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .expect("DeviceId always holds a valid Ed25519 key");
        PeerId::from_public_key(&libp2p_identity::PublicKey::from(key))
    }

    /// The device ID behind a libp2p peer ID, if that peer ID inlines an Ed25519 key.
    pub fn from_peer_id(peer: &PeerId) -> Option<Self> {
        let bytes = peer.to_bytes();
        // An inlined key is the identity multihash: code 0x00, length, protobuf-encoded key.
        let (&code, rest) = bytes.split_first()?;
        let (&len, key) = rest.split_first()?;
        if code != 0 || usize::from(len) != key.len() {
            return None;
        }
        let public = libp2p_identity::PublicKey::try_decode_protobuf(key).ok()?;
        let ed = public.try_into_ed25519().ok()?;
        Some(DeviceId(ed.to_bytes()))
    }

    /// The first block of the ID, for short log lines.
    pub fn short(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

fn luhn32(group: &[u8]) -> u8 {
    // Syncthing's Luhn mod N over the base32 alphabet.
    let mut factor = 1;
    let mut sum = 0usize;
    for &c in group {
        let code = ALPHABET.iter().position(|&a| a == c).unwrap_or(0);
        let addend = factor * code;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    ALPHABET[(32 - sum % 32) % 32]
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = BASE32_NOPAD.encode(&self.0);
        let mut checked = Vec::with_capacity(56);
        for group in plain.as_bytes().chunks(GROUP) {
            checked.extend_from_slice(group);
            checked.push(luhn32(group));
        }
        for (i, block) in checked.chunks(7).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(block).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut chars = Vec::with_capacity(56);
        for c in text.trim().chars() {
            let c = match c.to_ascii_uppercase() {
                '-' | ' ' => continue,
                // The usual misreadings of base32 text.
                '0' => 'O',
                '1' => 'I',
                '8' => 'B',
                c => c,
            };
            if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) {
                return Err(DeviceIdError::Character(c));
            }
            chars.push(c as u8);
        }
        if chars.len() != 56 {
            return Err(DeviceIdError::Length(chars.len()));
        }
        let mut plain = Vec::with_capacity(52);
        for (i, group) in chars.chunks(GROUP + 1).enumerate() {
            let (body, check) = group.split_at(GROUP);
            if luhn32(body) != check[0] {
                return Err(DeviceIdError::Mistyped { group: i + 1 });
            }
            plain.extend_from_slice(body);
        }
        let bytes = BASE32_NOPAD
            .decode(&plain)
            .map_err(|_| DeviceIdError::NotAKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| DeviceIdError::NotAKey)?;
        DeviceId::from_bytes(bytes)
    }
}

/// Which mesh something belongs to: 16 random bytes chosen when the mesh is created.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeshId([u8; 16]);

impl MeshId {
    pub fn random() -> Self {
        MeshId(crate::random_bytes())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        MeshId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE32_NOPAD.encode(&self.0).to_lowercase())
    }
}

impl fmt::Debug for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshId({self})")
    }
}

impl FromStr for MeshId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = BASE32_NOPAD
            .decode(text.trim().to_uppercase().as_bytes())
            .map_err(|_| IdError::Mesh(text.to_string()))?;
        Ok(MeshId(
            bytes
                .try_into()
                .map_err(|_| IdError::Mesh(text.to_string()))?,
        ))
    }
}

/// Why a mesh or folder ID was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{0:?} is not a mesh ID (26 base32 characters)")]
    Mesh(String),
    #[error("{0:?} is not a folder ID: use 1 to 64 characters from a-z, 0-9, '.', '_' and '-'")]
    Folder(String),
}

/// A synced folder's ID, the same on every device (its local path may differ).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct FolderId(String);

impl FolderId {
    pub fn new(id: &str) -> Result<Self, IdError> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(FolderId(id.to_string()))
        } else {
            Err(IdError::Folder(id.to_string()))
        }
    }

    /// A fresh random ID such as `k3x9q-7fz2m`.
    pub fn random() -> Self {
        let bytes: [u8; 8] = crate::random_bytes();
        let text = BASE32_NOPAD.encode(&bytes).to_lowercase();
        FolderId(format!("{}-{}", &text[..5], &text[5..10]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for FolderId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        FolderId::new(text)
    }
}

/// A chunk's name: the keyed BLAKE3 hash of its plaintext under the mesh's chunk-ID key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChunkId({})",
            data_encoding::HEXLOWER.encode(&self.0[..6])
        )
    }
}

/// A mesh-key epoch. Epoch 0 starts with the mesh; every removal of a device starts the next.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DeviceKeys;

    #[test]
    fn device_id_round_trips_through_text_and_peer_id() {
        let keys = DeviceKeys::generate();
        let id = keys.device_id();
        let text = id.to_string();
        assert_eq!(text.len(), 63, "8 blocks of 7 with 7 dashes: {text}");
        assert_eq!(text.parse::<DeviceId>().unwrap(), id);
        assert_eq!(
            text.to_lowercase()
                .replace('-', "")
                .parse::<DeviceId>()
                .unwrap(),
            id
        );
        let peer = id.to_peer_id();
        assert_eq!(DeviceId::from_peer_id(&peer), Some(id));
        assert_eq!(keys.libp2p_keypair().public().to_peer_id(), peer);
    }

    #[test]
    fn every_single_character_typo_is_reported_as_mistyped() {
        let id = DeviceKeys::generate().device_id();
        let text: Vec<u8> = id.to_string().replace('-', "").into_bytes();
        for pos in 0..text.len() {
            for &c in ALPHABET {
                if c == text[pos] {
                    continue;
                }
                let mut typo = text.clone();
                typo[pos] = c;
                let typo = String::from_utf8(typo).unwrap();
                match typo.parse::<DeviceId>() {
                    Err(DeviceIdError::Mistyped { .. }) => {}
                    other => panic!("typo at {pos} ({typo}) gave {other:?}"),
                }
            }
        }
    }

    #[test]
    fn malformed_ids_say_what_is_wrong() {
        assert_eq!("ABC".parse::<DeviceId>(), Err(DeviceIdError::Length(3)));
        assert!(matches!(
            "!".repeat(56).parse::<DeviceId>(),
            Err(DeviceIdError::Character('!'))
        ));
        assert!(FolderId::new("Photos/..").is_err());
        assert!(FolderId::new("photos-2026").is_ok());
        let mesh = MeshId::random();
        assert_eq!(mesh.to_string().parse::<MeshId>().unwrap(), mesh);
    }
}
