//! Keys: a device's own key pairs ([`DeviceKeys`]), the shared [`MeshKey`] of an epoch and the
//! subkeys derived from it, and [`WrappedKey`], a mesh key sealed to one device with HPKE.
//!
//! - Ed25519 signs (membership entries, file records, sealed blobs) and is the libp2p identity.
//! - X25519 (as the HPKE KEM `DHKEM(X25519, HKDF-SHA256)`) receives wrapped mesh keys.
//! - `MeshKey` is 256 random bits per epoch. Three independent subkeys come from it through
//!   BLAKE3 `derive_key` with distinct contexts: chunk IDs, chunk encryption, index encryption.
//!
//! Secret material is zeroized on drop and has no `Debug` that prints it.
//!
//! ```
//! use meshsync_crdt::{DeviceKeys, Epoch, MeshId, MeshKey};
//! let laptop = DeviceKeys::generate();
//! let mesh = MeshId::random();
//! let key = MeshKey::generate(Epoch(0));
//! let wrapped = key.wrap_for(&mesh, &laptop.device_id(), &laptop.kem_public()).unwrap();
//! let unwrapped = wrapped.unwrap_with(&mesh, &laptop).unwrap();
//! assert_eq!(unwrapped.index_key().as_bytes(), key.index_key().as_bytes());
//! ```

use std::fmt;

use ed25519_dalek::SigningKey;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::id::{DeviceId, Epoch, MeshId};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// A detached Ed25519 signature.
pub type Signature = ed25519_dalek::Signature;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the public key for key wrapping is not a valid X25519 key")]
    BadKemKey,
    #[error("this wrapped mesh key is not addressed to this device, or was altered")]
    Unwrap,
    #[error("a signature does not verify")]
    BadSignature,
    #[error("a device ID does not hold a valid Ed25519 key")]
    BadDeviceKey,
}

/// A device's X25519 public key, published in its membership entry to receive mesh keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KemPublicKey(pub [u8; 32]);

impl fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KemPublicKey({})",
            data_encoding::HEXLOWER.encode(&self.0[..4])
        )
    }
}

/// A device's two key pairs. Built from two 32-byte seeds, which is all that goes to disk.
pub struct DeviceKeys {
    signing: SigningKey,
    /// The same Ed25519 key in AWS-LC, which signs: a scan signs every file record, and
    /// AWS-LC's base-point multiplication takes half the time of dalek's on x86-64 (13.8
    /// against 29.7 µs a signature on the 2-core test machine). Ed25519 signatures are
    /// deterministic (RFC 8032), so both give the same bytes (tested); AWS-LC wipes the key's
    /// memory when it frees it.
    signer: aws_lc_rs::signature::Ed25519KeyPair,
    kem_seed: Zeroizing<[u8; 32]>,
}

impl DeviceKeys {
    pub fn generate() -> Self {
        Self::from_seeds(
            Zeroizing::new(crate::random_bytes()),
            Zeroizing::new(crate::random_bytes()),
        )
    }

    /// Rebuilds the key pairs from the seeds written by [`DeviceKeys::signing_seed`] and
    /// [`DeviceKeys::kem_seed`].
    pub fn from_seeds(signing_seed: Zeroizing<[u8; 32]>, kem_seed: Zeroizing<[u8; 32]>) -> Self {
        DeviceKeys {
            signing: SigningKey::from_bytes(&signing_seed),
            signer: aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&signing_seed[..])
                .expect("any 32 bytes are an Ed25519 seed"),
            kem_seed,
        }
    }

    pub fn signing_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn kem_seed(&self) -> Zeroizing<[u8; 32]> {
        self.kem_seed.clone()
    }

    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_verifying_key(&self.signing.verifying_key())
    }

    pub fn kem_public(&self) -> KemPublicKey {
        let (_, public) = Kem::derive_keypair(&self.kem_seed[..]);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&public.to_bytes());
        KemPublicKey(bytes)
    }

    /// The raw X25519 private key, for the pairing handshake (Noise `XXpsk3`), whose static
    /// key is this same key: pairing proves possession of the key that will receive mesh keys.
    pub fn kem_secret(&self) -> Zeroizing<[u8; 32]> {
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&self.kem_private().to_bytes());
        secret
    }

    fn kem_private(&self) -> <Kem as hpke::Kem>::PrivateKey {
        Kem::derive_keypair(&self.kem_seed[..]).0
    }

    /// Signs `message` under a domain-separating `context` (see [`verify`]).
    pub fn sign(&self, context: &str, message: &[u8]) -> Signature {
        let signature = self.signer.sign(&signed_bytes(context, message));
        Signature::from_slice(signature.as_ref()).expect("an Ed25519 signature is 64 bytes")
    }

    /// The same Ed25519 key as a libp2p identity.
    pub fn libp2p_keypair(&self) -> libp2p_identity::Keypair {
        let secret = libp2p_identity::ed25519::SecretKey::try_from_bytes(self.signing.to_bytes())
            .expect("32 bytes are always an Ed25519 secret key");
        libp2p_identity::Keypair::from(libp2p_identity::ed25519::Keypair::from(secret))
    }
}

impl fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKeys({:?})", self.device_id())
    }
}

fn signed_bytes(context: &str, message: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(context.len() + 1 + message.len());
    bytes.extend_from_slice(context.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(message);
    bytes
}

/// Checks `signature` by `device` over `message` in `context` (strict RFC 8032 verification).
pub fn verify(
    device: &DeviceId,
    context: &str,
    message: &[u8],
    signature: &Signature,
) -> Result<(), KeyError> {
    let key = device.verifying_key().map_err(|_| KeyError::BadDeviceKey)?;
    verify_by(&key, context, message, signature)
}

/// [`verify`] with the device's key already decompressed ([`DeviceId::verifying_key`]): for
/// many signatures of one device, that work is done once.
pub fn verify_by(
    key: &ed25519_dalek::VerifyingKey,
    context: &str,
    message: &[u8],
    signature: &Signature,
) -> Result<(), KeyError> {
    key.verify_strict(&signed_bytes(context, message), signature)
        .map_err(|_| KeyError::BadSignature)
}

macro_rules! secret_key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(…)"))
            }
        }
    };
}

secret_key_type!(
    /// Keys BLAKE3 to name chunks: equal plaintext, equal ID, but only inside the mesh.
    ChunkIdKey
);
secret_key_type!(
    /// Encrypts chunk contents.
    ChunkKey
);
secret_key_type!(
    /// Seals index changes for storage peers.
    IndexKey
);

/// The mesh key of one epoch: 256 random bits, shared by every full device of the mesh.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MeshKey {
    #[zeroize(skip)]
    epoch: Epoch,
    key: [u8; 32],
}

impl MeshKey {
    pub fn generate(epoch: Epoch) -> Self {
        MeshKey {
            epoch,
            key: crate::random_bytes(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn derive(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(purpose, &self.key)
    }

    pub fn chunk_id_key(&self) -> ChunkIdKey {
        ChunkIdKey(self.derive("meshsync 2026-11 chunk id"))
    }

    pub fn chunk_key(&self) -> ChunkKey {
        ChunkKey(self.derive("meshsync 2026-11 chunk encryption"))
    }

    pub fn index_key(&self) -> IndexKey {
        IndexKey(self.derive("meshsync 2026-11 index encryption"))
    }

    /// The key device names are sealed with in the membership log (which storage peers read).
    pub fn name_key(&self) -> IndexKey {
        IndexKey(self.derive("meshsync 2026-11 device name encryption"))
    }

    /// Seals this key to one device's X25519 key with HPKE (base mode). The HPKE info binds
    /// mesh, epoch and recipient, so a wrap cannot be replayed to another mesh, epoch or device.
    pub fn wrap_for(
        &self,
        mesh: &MeshId,
        recipient: &DeviceId,
        recipient_kem: &KemPublicKey,
    ) -> Result<WrappedKey, KeyError> {
        let public = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient_kem.0)
            .map_err(|_| KeyError::BadKemKey)?;
        let info = wrap_info(mesh, self.epoch, recipient);
        let (encapped, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &public,
            &info,
            &self.key,
            &[],
        )
        .map_err(|_| KeyError::BadKemKey)?;
        Ok(WrappedKey {
            epoch: self.epoch,
            recipient: *recipient,
            encapped: encapped.to_bytes().to_vec(),
            ciphertext,
        })
    }
}

impl MeshKey {
    /// Seals this (older) key under `newer`, for the membership log: whoever holds `newer`
    /// can then read what was written before it — a device that joins after a removal, say.
    pub fn seal_under(&self, newer: &MeshKey, mesh: &MeshId) -> SealedKey {
        use chacha20poly1305::aead::{Aead, Payload};
        use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
        let nonce: [u8; 24] = crate::random_bytes();
        let cipher = XChaCha20Poly1305::new(&newer.derive(CHAIN_CONTEXT).into());
        let ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &self.key,
                    aad: &chain_aad(mesh, self.epoch, newer.epoch),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        SealedKey {
            epoch: self.epoch,
            under: newer.epoch,
            nonce,
            ciphertext,
        }
    }
}

const CHAIN_CONTEXT: &str = "meshsync 2026-11 key chain";

fn chain_aad(mesh: &MeshId, epoch: Epoch, under: Epoch) -> Vec<u8> {
    let mut aad = b"meshsync key chain v1".to_vec();
    aad.extend_from_slice(mesh.as_bytes());
    aad.extend_from_slice(&epoch.0.to_be_bytes());
    aad.extend_from_slice(&under.0.to_be_bytes());
    aad
}

/// An older epoch's [`MeshKey`] sealed under a newer one (XChaCha20-Poly1305 under a key
/// derived from the newer key; mesh and both epochs bound as associated data). Public: it sits
/// in the membership log, beside the removal that started the newer epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SealedKey {
    /// The epoch of the key inside.
    pub epoch: Epoch,
    /// The epoch of the key it is sealed under.
    pub under: Epoch,
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
}

impl SealedKey {
    /// Opens the sealed key with `newer` (the key of epoch `under`); fails with any other key
    /// or if a byte changed.
    pub fn open(&self, newer: &MeshKey, mesh: &MeshId) -> Result<MeshKey, KeyError> {
        use chacha20poly1305::aead::{Aead, Payload};
        use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
        if newer.epoch != self.under {
            return Err(KeyError::Unwrap);
        }
        let cipher = XChaCha20Poly1305::new(&newer.derive(CHAIN_CONTEXT).into());
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    &XNonce::from(self.nonce),
                    Payload {
                        msg: &self.ciphertext,
                        aad: &chain_aad(mesh, self.epoch, self.under),
                    },
                )
                .map_err(|_| KeyError::Unwrap)?,
        );
        let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| KeyError::Unwrap)?;
        Ok(MeshKey {
            epoch: self.epoch,
            key,
        })
    }
}

fn wrap_info(mesh: &MeshId, epoch: Epoch, recipient: &DeviceId) -> Vec<u8> {
    let mut info = b"meshsync mesh key wrap v1".to_vec();
    info.extend_from_slice(mesh.as_bytes());
    info.extend_from_slice(&epoch.0.to_be_bytes());
    info.extend_from_slice(recipient.as_bytes());
    info
}

/// A [`MeshKey`] sealed to one device. Public: it may sit in the membership log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct WrappedKey {
    pub epoch: Epoch,
    pub recipient: DeviceId,
    encapped: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl WrappedKey {
    /// Opens the wrap with the recipient's keys; fails for anyone else or if a byte changed.
    pub fn unwrap_with(&self, mesh: &MeshId, keys: &DeviceKeys) -> Result<MeshKey, KeyError> {
        if keys.device_id() != self.recipient {
            return Err(KeyError::Unwrap);
        }
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&self.encapped)
            .map_err(|_| KeyError::Unwrap)?;
        let info = wrap_info(mesh, self.epoch, &self.recipient);
        let plain = Zeroizing::new(
            hpke::single_shot_open::<Aead, Kdf, Kem>(
                &OpModeR::Base,
                &keys.kem_private(),
                &encapped,
                &info,
                &self.ciphertext,
                &[],
            )
            .map_err(|_| KeyError::Unwrap)?,
        );
        let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| KeyError::Unwrap)?;
        Ok(MeshKey {
            epoch: self.epoch,
            key,
        })
    }

    /// For tests of tamper detection: flips one bit of the sealed key.
    #[doc(hidden)]
    pub fn tamper(&mut self) {
        if let Some(byte) = self.ciphertext.first_mut() {
            *byte ^= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_key_sealed_under_a_newer_opens_only_with_it() {
        let mesh = MeshId::random();
        let (old, new) = (MeshKey::generate(Epoch(0)), MeshKey::generate(Epoch(1)));
        let sealed = old.seal_under(&new, &mesh);
        let opened = sealed.open(&new, &mesh).unwrap();
        assert_eq!(opened.epoch(), Epoch(0));
        assert_eq!(opened.chunk_key().as_bytes(), old.chunk_key().as_bytes());
        assert!(sealed.open(&MeshKey::generate(Epoch(1)), &mesh).is_err());
        assert!(sealed.open(&new, &MeshId::random()).is_err());
        let mut altered = sealed.clone();
        altered.epoch = Epoch(5);
        assert!(altered.open(&new, &mesh).is_err());
    }

    #[test]
    fn only_the_recipient_unwraps_and_tampering_is_rejected() {
        let mesh = MeshId::random();
        let alice = DeviceKeys::generate();
        let bob = DeviceKeys::generate();
        let key = MeshKey::generate(Epoch(3));
        let wrapped = key
            .wrap_for(&mesh, &alice.device_id(), &alice.kem_public())
            .unwrap();

        let opened = wrapped.unwrap_with(&mesh, &alice).unwrap();
        assert_eq!(opened.epoch(), Epoch(3));
        assert_eq!(opened.chunk_key().as_bytes(), key.chunk_key().as_bytes());

        assert!(matches!(
            wrapped.unwrap_with(&mesh, &bob),
            Err(KeyError::Unwrap)
        ));
        // Bob relabels the wrap as his own: the HPKE info no longer matches and his key is wrong.
        let mut stolen = wrapped.clone();
        stolen.recipient = bob.device_id();
        assert!(stolen.unwrap_with(&mesh, &bob).is_err());

        let mut tampered = wrapped.clone();
        tampered.tamper();
        assert!(matches!(
            tampered.unwrap_with(&mesh, &alice),
            Err(KeyError::Unwrap)
        ));

        let mut other_epoch = wrapped.clone();
        other_epoch.epoch = Epoch(4);
        assert!(other_epoch.unwrap_with(&mesh, &alice).is_err());
        assert!(wrapped.unwrap_with(&MeshId::random(), &alice).is_err());
    }

    #[test]
    fn subkeys_are_distinct_and_secrets_do_not_print() {
        let key = MeshKey::generate(Epoch(0));
        let a = key.chunk_id_key();
        let b = key.chunk_key();
        let c = key.index_key();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_ne!(b.as_bytes(), c.as_bytes());
        assert_eq!(format!("{c:?}"), "IndexKey(…)");
        let keys = DeviceKeys::generate();
        assert!(!format!("{keys:?}")
            .contains(&data_encoding::HEXLOWER.encode(&keys.signing_seed()[..])));
    }

    #[test]
    fn signatures_are_bound_to_their_context_and_signer() {
        let alice = DeviceKeys::generate();
        let bob = DeviceKeys::generate();
        let sig = alice.sign("ctx-a", b"hello");
        assert!(verify(&alice.device_id(), "ctx-a", b"hello", &sig).is_ok());
        assert!(verify(&alice.device_id(), "ctx-b", b"hello", &sig).is_err());
        assert!(verify(&alice.device_id(), "ctx-a", b"hellO", &sig).is_err());
        assert!(verify(&bob.device_id(), "ctx-a", b"hello", &sig).is_err());
    }

    #[test]
    fn aws_lc_signs_exactly_as_dalek_does() {
        use ed25519_dalek::Signer;
        for i in 0..200usize {
            let keys = DeviceKeys::generate();
            let message: Vec<u8> = (0..i * 37 % 5000).map(|b| (b * i) as u8).collect();
            let ours = keys.sign("ctx", &message);
            let dalek = keys.signing.sign(&signed_bytes("ctx", &message));
            assert_eq!(ours.to_bytes(), dalek.to_bytes(), "key {i}");
            assert!(verify(&keys.device_id(), "ctx", &message, &ours).is_ok());
        }
    }

    #[test]
    fn seeds_rebuild_the_same_keys() {
        let keys = DeviceKeys::generate();
        let again = DeviceKeys::from_seeds(keys.signing_seed(), keys.kem_seed());
        assert_eq!(keys.device_id(), again.device_id());
        assert_eq!(keys.kem_public(), again.kem_public());
    }
}
