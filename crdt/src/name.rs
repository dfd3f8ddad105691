//! [`SealedName`]: a device's name as the membership log holds it — sealed under the mesh key
//! of an epoch, so a storage peer (which reads the log to know whom to serve) cannot read it.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, Epoch, MeshId};
use crate::keys::{DeviceKeys, MeshKey};

/// A device's name as the membership log holds it: sealed under the mesh key of an epoch, so
/// a storage peer (which reads the log to know whom to serve) cannot read it. Padded to 64
/// bytes (longer names to a multiple of 64), so its length says little.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SealedName {
    pub epoch: Epoch,
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
}

fn name_aad(mesh: &MeshId, device: &DeviceId) -> Vec<u8> {
    let mut aad = b"meshsync device name v1".to_vec();
    aad.extend_from_slice(mesh.as_bytes());
    aad.extend_from_slice(device.as_bytes());
    aad
}

impl SealedName {
    pub fn seal(key: &MeshKey, mesh: &MeshId, device: &DeviceId, name: &str) -> Self {
        let mut padded = (name.len() as u32).to_le_bytes().to_vec();
        padded.extend_from_slice(name.as_bytes());
        padded.resize(padded.len().div_ceil(64) * 64, 0);
        let nonce: [u8; 24] = crate::random_bytes();
        let cipher = XChaCha20Poly1305::new(&(*key.name_key().as_bytes()).into());
        let ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &padded,
                    aad: &name_aad(mesh, device),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        SealedName {
            epoch: key.epoch(),
            nonce,
            ciphertext,
        }
    }

    /// A name sealed under a throwaway key, for tests that need a well-formed entry.
    #[doc(hidden)]
    pub fn unreadable(name: &str) -> Self {
        let nobody = DeviceKeys::generate().device_id();
        let mesh = MeshId::for_genesis(&nobody, &[0; 16]);
        SealedName::seal(&MeshKey::generate(Epoch(0)), &mesh, &nobody, name)
    }

    /// The name, if `key` is the key of the epoch it was sealed in.
    pub fn open(&self, key: &MeshKey, mesh: &MeshId, device: &DeviceId) -> Option<String> {
        if key.epoch() != self.epoch {
            return None;
        }
        let cipher = XChaCha20Poly1305::new(&(*key.name_key().as_bytes()).into());
        let padded = cipher
            .decrypt(
                &XNonce::from(self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad: &name_aad(mesh, device),
                },
            )
            .ok()?;
        let (len, rest) = padded.split_first_chunk::<4>()?;
        let name = rest.get(..u32::from_le_bytes(*len) as usize)?;
        String::from_utf8(name.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_open_only_with_the_key_for_their_device_and_hide_their_length() {
        let (key, other) = (MeshKey::generate(Epoch(0)), MeshKey::generate(Epoch(0)));
        let device = DeviceKeys::generate().device_id();
        let someone = DeviceKeys::generate().device_id();
        let mesh = MeshId::for_genesis(&device, &[1; 16]);
        let name = SealedName::seal(&key, &mesh, &device, "kitchen laptop");
        assert_eq!(
            name.open(&key, &mesh, &device).as_deref(),
            Some("kitchen laptop")
        );
        assert_eq!(name.open(&other, &mesh, &device), None);
        assert_eq!(
            name.open(&key, &mesh, &someone),
            None,
            "moved to another entry"
        );
        let encoded = postcard::to_stdvec(&name).unwrap();
        assert!(!encoded.windows(7).any(|w| w == b"kitchen"));
        let short = SealedName::seal(&key, &mesh, &device, "a");
        assert_eq!(short.ciphertext.len(), name.ciphertext.len());
    }
}
