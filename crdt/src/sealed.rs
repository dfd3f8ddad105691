//! [`SealedChange`]: a state change as a storage peer holds it.
//!
//! The plaintext (an encoded batch of index changes) is padded to a Padmé length, so its size
//! leaks at most about 12 % of precision, then sealed with XChaCha20-Poly1305 under the epoch's
//! index key with a random nonce. The associated data binds mesh, epoch and author. The author
//! signs the whole sealed blob, so a storage peer — which has no key — can still check against
//! the membership log that a current member wrote it, and refuse anything else.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, Epoch, MeshId};
use crate::keys::{verify, DeviceKeys, MeshKey, Signature};
use crate::membership::{MembershipView, Role};

const SIGNING_CONTEXT: &str = "meshsync sealed change v1";
const AAD_PREFIX: &[u8] = b"meshsync sealed change v1";
/// The largest sealed blob accepted from the network or disk.
pub const MAX_SEALED_BYTES: usize = 32 * 1024 * 1024;

/// Why a sealed change was refused.
#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("sealed change could not be decoded: {0}")]
    Malformed(String),
    #[error("sealed change of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("sealed change is for mesh {found}, not {expected}")]
    WrongMesh { expected: MeshId, found: MeshId },
    #[error("sealed change is signed by {0:?}, who is not a writing member of this mesh")]
    NotAWriter(DeviceId),
    #[error("sealed change's signature does not verify")]
    BadSignature,
    #[error("sealed change is for epoch {found} but the key is for epoch {expected}")]
    WrongEpoch { expected: Epoch, found: Epoch },
    #[error("sealed change failed authentication: altered, or sealed under another key")]
    Decrypt,
}

/// An index change sealed for storage: readable only with the mesh key of its epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SealedChange {
    pub mesh: MeshId,
    pub epoch: Epoch,
    pub author: DeviceId,
    /// The author's own count of its sealed changes (1, 2, …): signed, so a storage peer
    /// cannot reorder them, and a device can tell when one withholds the latest.
    pub seq: u64,
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
    signature: Signature,
}

/// Padmé: rounds `len` up so that at most O(log log len) bits of it remain.
pub fn padme(len: usize) -> usize {
    if len < 2 {
        return len;
    }
    let e = usize::BITS - 1 - len.leading_zeros(); // floor(log2 len)
    let s = usize::BITS - (e as usize).leading_zeros(); // floor(log2 e) + 1
    let last_bits = e - s;
    let mask = (1usize << last_bits) - 1;
    (len + mask) & !mask
}

fn aad(mesh: &MeshId, epoch: Epoch, author: &DeviceId) -> Vec<u8> {
    let mut aad = AAD_PREFIX.to_vec();
    aad.extend_from_slice(mesh.as_bytes());
    aad.extend_from_slice(&epoch.0.to_be_bytes());
    aad.extend_from_slice(author.as_bytes());
    aad
}

fn change_signed_bytes(
    mesh: &MeshId,
    epoch: Epoch,
    author: &DeviceId,
    seq: u64,
    nonce: &[u8; 24],
    ciphertext_hash: &[u8; 32],
) -> Vec<u8> {
    postcard::to_stdvec(&(mesh, &epoch, author, &seq, nonce, ciphertext_hash))
        .expect("sealed changes always encode")
}

/// An author's signed statement "my latest sealed change is number `seq`": small enough to
/// pass between devices, checkable by anyone who knows the author's public key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SignedHead {
    pub mesh: MeshId,
    pub author: DeviceId,
    pub seq: u64,
    proof: HeadProof,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
enum HeadProof {
    /// The signature of the sealed change itself (over the hash of its ciphertext).
    Change {
        epoch: Epoch,
        nonce: [u8; 24],
        ciphertext_hash: [u8; 32],
        signature: Signature,
    },
}

impl SignedHead {
    /// Checks the author's signature.
    pub fn verify(&self) -> Result<(), SealedError> {
        let HeadProof::Change {
            epoch,
            nonce,
            ciphertext_hash,
            signature,
        } = &self.proof;
        let bytes = change_signed_bytes(
            &self.mesh,
            *epoch,
            &self.author,
            self.seq,
            nonce,
            ciphertext_hash,
        );
        verify(&self.author, SIGNING_CONTEXT, &bytes, signature)
            .map_err(|_| SealedError::BadSignature)
    }
}

impl SealedChange {
    /// Pads, encrypts and signs `plaintext` as the author's change number `seq`.
    pub fn seal(
        mesh: MeshId,
        key: &MeshKey,
        author: &DeviceKeys,
        seq: u64,
        plaintext: &[u8],
    ) -> Self {
        let epoch = key.epoch();
        let author_id = author.device_id();
        let mut padded = Vec::with_capacity(padme(plaintext.len() + 4));
        padded.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
        padded.extend_from_slice(plaintext);
        padded.resize(padme(padded.len()), 0);
        let nonce: [u8; 24] = crate::random_bytes();
        let cipher = XChaCha20Poly1305::new(&(*key.index_key().as_bytes()).into());
        let ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &padded,
                    aad: &aad(&mesh, epoch, &author_id),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut sealed = SealedChange {
            mesh,
            epoch,
            author: author_id,
            seq,
            nonce,
            ciphertext,
            signature: Signature::from_bytes(&[0; 64]),
        };
        sealed.signature = author.sign(SIGNING_CONTEXT, &sealed.signed_bytes());
        sealed
    }

    fn signed_bytes(&self) -> Vec<u8> {
        change_signed_bytes(
            &self.mesh,
            self.epoch,
            &self.author,
            self.seq,
            &self.nonce,
            blake3::hash(&self.ciphertext).as_bytes(),
        )
    }

    /// What a storage peer checks before storing: right mesh, signed by a member who may write
    /// in this epoch. Needs no key.
    pub fn check_author(&self, mesh: &MeshId, view: &MembershipView) -> Result<(), SealedError> {
        if self.mesh != *mesh {
            return Err(SealedError::WrongMesh {
                expected: *mesh,
                found: self.mesh,
            });
        }
        // Only a current writing member: a removed device's signature is refused even on a
        // change it claims to have made before its removal (it could still make such claims).
        let writer = view
            .members
            .get(&self.author)
            .is_some_and(|member| member.role == Role::Device);
        if !writer {
            return Err(SealedError::NotAWriter(self.author));
        }
        verify(
            &self.author,
            SIGNING_CONTEXT,
            &self.signed_bytes(),
            &self.signature,
        )
        .map_err(|_| SealedError::BadSignature)
    }

    /// Decrypts with the mesh key of the blob's epoch and strips the padding.
    pub fn open(&self, key: &MeshKey) -> Result<Vec<u8>, SealedError> {
        if key.epoch() != self.epoch {
            return Err(SealedError::WrongEpoch {
                expected: key.epoch(),
                found: self.epoch,
            });
        }
        let cipher = XChaCha20Poly1305::new(&(*key.index_key().as_bytes()).into());
        let padded = cipher
            .decrypt(
                &XNonce::from(self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad: &aad(&self.mesh, self.epoch, &self.author),
                },
            )
            .map_err(|_| SealedError::Decrypt)?;
        let (len, rest) = padded
            .split_first_chunk::<4>()
            .ok_or(SealedError::Decrypt)?;
        let len = u32::from_le_bytes(*len) as usize;
        rest.get(..len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| SealedError::Malformed("padding length out of range".into()))
    }

    /// The author's signed statement that this is its change number `seq` (what devices
    /// compare to notice a storage peer serving an older state).
    pub fn head(&self) -> SignedHead {
        SignedHead {
            mesh: self.mesh,
            author: self.author,
            seq: self.seq,
            proof: HeadProof::Change {
                epoch: self.epoch,
                nonce: self.nonce,
                ciphertext_hash: *blake3::hash(&self.ciphertext).as_bytes(),
                signature: self.signature,
            },
        }
    }

    pub fn ciphertext_len(&self) -> usize {
        self.ciphertext.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("sealed changes always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SealedError> {
        if bytes.len() > MAX_SEALED_BYTES {
            return Err(SealedError::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| SealedError::Malformed(e.to_string()))
    }

    #[doc(hidden)]
    pub fn tamper(&mut self) {
        if let Some(byte) = self.ciphertext.last_mut() {
            *byte ^= 0x80;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Action, MembershipLog};
    use crate::name::SealedName;

    #[test]
    fn heads_verify_and_forged_ones_do_not() {
        let author = DeviceKeys::generate();
        let key = MeshKey::generate(Epoch(0));
        let mesh = MeshId::for_genesis(&author.device_id(), &[2; 16]);
        let change = SealedChange::seal(mesh, &key, &author, 7, b"some changes");
        let head = change.head();
        assert_eq!((head.author, head.seq), (author.device_id(), 7));
        head.verify().unwrap();
        let mut inflated = head.clone();
        inflated.seq = 8;
        assert!(inflated.verify().is_err());
        let mut reassigned = head;
        reassigned.author = DeviceKeys::generate().device_id();
        assert!(reassigned.verify().is_err());
        let mut renumbered = change;
        renumbered.seq = 1;
        assert!(renumbered.head().verify().is_err());
    }

    #[test]
    fn padme_hides_low_bits() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(100), 104);
        assert_eq!(padme(1000), 1024);
        assert_eq!(padme(1025), 1088);
        for len in 1..20_000 {
            let p = padme(len);
            assert!(
                p >= len && (p - len) * 100 <= len * 12 + 100,
                "{len} -> {p}"
            );
        }
    }

    #[test]
    fn seal_open_and_reject_tampering_wrong_key_and_strangers() {
        let admin = DeviceKeys::generate();
        let key = MeshKey::generate(Epoch(0));
        let (mut log, mesh) = MembershipLog::create(&admin, "admin", &key);
        let text = b"folder docs: report.pdf changed".to_vec();
        let sealed = SealedChange::seal(mesh, &key, &admin, 1, &text);
        let bytes = sealed.encode();
        assert!(!bytes.windows(6).any(|w| w == b"report"));
        let back = SealedChange::decode(&bytes).unwrap();
        back.check_author(&mesh, log.view()).unwrap();
        assert_eq!(back.open(&key).unwrap(), text);

        let mut tampered = back.clone();
        tampered.tamper();
        assert!(matches!(tampered.open(&key), Err(SealedError::Decrypt)));
        assert!(matches!(
            tampered.check_author(&mesh, log.view()),
            Err(SealedError::BadSignature)
        ));
        assert!(back.open(&MeshKey::generate(Epoch(0))).is_err());
        assert!(matches!(
            back.open(&MeshKey::generate(Epoch(1))),
            Err(SealedError::WrongEpoch { .. })
        ));

        // A stranger's blob, and a removed device's new blob, are refused without any key.
        let stranger = DeviceKeys::generate();
        let theirs = SealedChange::seal(mesh, &key, &stranger, 1, &text);
        assert!(matches!(
            theirs.check_author(&mesh, log.view()),
            Err(SealedError::NotAWriter(_))
        ));
        let laptop = DeviceKeys::generate();
        log.append(
            &admin,
            Action::Add {
                device: laptop.device_id(),
                role: crate::Role::Device,
                name: SealedName::unreadable("laptop"),
                kem: None,
                wrapped: None,
            },
        )
        .unwrap();
        log.append(
            &admin,
            Action::Remove {
                device: laptop.device_id(),
                wraps: vec![],
                chain: vec![],
                wipe: false,
            },
        )
        .unwrap();
        let key1 = MeshKey::generate(Epoch(1));
        let after = SealedChange::seal(mesh, &key1, &laptop, 1, &text);
        assert!(after.check_author(&mesh, log.view()).is_err());
        assert!(SealedChange::decode(&[0xff; 8]).is_err());
    }

    #[test]
    fn exact_sizes_are_hidden() {
        let admin = DeviceKeys::generate();
        let key = MeshKey::generate(Epoch(0));
        let mesh = MeshId::random();
        let a = SealedChange::seal(mesh, &key, &admin, 1, &vec![1; 1000]);
        let b = SealedChange::seal(mesh, &key, &admin, 2, &vec![1; 1010]);
        assert_eq!(a.ciphertext_len(), b.ciphertext_len());
    }
}
