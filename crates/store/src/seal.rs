//! Sealed stores: encryption at rest for stores kept where others run the disks (an Azure
//! storage account). Every chunk and tree node is sealed with AES-256-GCM-SIV under a key
//! derived from the store's data key, bound to its object name; objects are named by a BLAKE3
//! hash keyed by another derived key, so that a name says nothing about the content. The data
//! key lives with the operator, in a key file, and is never written to the store: the store
//! config keeps only its id, which tells a wrong key from a damaged object.
//!
//! ```text
//! sealed object: magic "BMSL" | version 1 | 3 reserved (0) | nonce (12) | ciphertext | tag (16)
//! associated data: the object's name in the store, as "chunks/ab/abcd…"
//! ```
//!
//! Each seal takes a fresh random nonce; GCM-SIV keeps a repeated one from revealing more than
//! that two objects are the same.

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use boomerang_core::ChunkHash;

use crate::{Result, StoreError};

pub const MAGIC: &[u8; 4] = b"BMSL";
pub const VERSION: u8 = 1;
/// Magic, version, reserved, nonce.
pub const HEADER_LEN: usize = 8 + NONCE_LEN;
/// The AEAD tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// The cipher, as the store config names it.
pub const CIPHER: &str = "aes-256-gcm-siv";

/// A store's data key: 32 random bytes, kept in a key file as 64 hex digits.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "DataKey({})", self.id())
    }
}

impl DataKey {
    /// A new random key.
    pub fn generate() -> Result<DataKey> {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| {
            StoreError::Invalid("the system's random number generator failed".into())
        })?;
        Ok(DataKey(key))
    }

    pub fn from_bytes(key: [u8; 32]) -> DataKey {
        DataKey(key)
    }

    /// Reads the key file at `path`.
    pub fn read(path: &Path) -> Result<DataKey> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            StoreError::io(
                format!(
                    "could not read the key file {}: give the key file made when the store was created",
                    path.display()
                ),
                e,
            )
        })?;
        let hex = text.trim();
        let bad = || {
            StoreError::Invalid(format!(
                "the key file {} does not hold a store key (64 hex digits): restore it from its backup",
                path.display()
            ))
        };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(DataKey(key))
    }

    /// Writes a new random key to a new key file at `path` (readable by its owner only), and
    /// returns it. An existing file is never overwritten: it may be the only copy of a key.
    pub fn create(path: &Path) -> Result<DataKey> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = Self::generate()?;
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        let io = |e| {
            StoreError::io(
                format!("could not create the key file {}", path.display()),
                e,
            )
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    StoreError::Invalid(format!(
                        "the key file {} exists already: it may be the only copy of a store's key, so it is not overwritten; choose another path",
                        path.display()
                    ))
                } else {
                    io(e)
                }
            })?;
        file.write_all(format!("{hex}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        Ok(key)
    }

    /// The key's id: a hash that names it without revealing it.
    pub fn id(&self) -> String {
        let id = blake3::derive_key("boomerang-store key id v1", &self.0);
        id[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// How a store names content: plain BLAKE3, or keyed by a sealed store's address key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hasher {
    Plain,
    Keyed([u8; 32]),
}

impl Hasher {
    pub fn hash(&self, data: &[u8]) -> ChunkHash {
        match self {
            Hasher::Plain => ChunkHash(*blake3::hash(data).as_bytes()),
            Hasher::Keyed(key) => ChunkHash(*blake3::keyed_hash(key, data).as_bytes()),
        }
    }
}

/// A sealed store's keys, derived from its data key.
pub struct Sealer {
    hasher: Hasher,
    aead: LessSafeKey,
    manifest: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

/// Why a sealed object does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("it is not a sealed object (its header is damaged)")]
    Header,
    #[error("it is sealed in format version {0}, which this Boomerang does not know")]
    Version(u8),
    #[error(
        "it does not open with the store's key: it was altered, or put in place of another object"
    )]
    Open,
}

impl Sealer {
    pub fn new(key: &DataKey) -> Sealer {
        let address = blake3::derive_key("boomerang-store address key v1", &key.0);
        let seal = blake3::derive_key("boomerang-store seal key v1", &key.0);
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM_SIV, &seal).expect("a 32-byte key is an AES-256 key"),
        );
        Sealer {
            hasher: Hasher::Keyed(address),
            aead,
            manifest: blake3::derive_key("boomerang-store manifest key v1", &key.0),
        }
    }

    pub fn hasher(&self) -> Hasher {
        self.hasher
    }

    /// The key of point manifests' checksums.
    pub fn manifest_key(&self) -> &[u8; 32] {
        &self.manifest
    }

    /// `plain`, sealed as the object named `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| {
            StoreError::Invalid("the system's random number generator failed".into())
        })?;
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| StoreError::Invalid(format!("could not seal object {name}")))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The content of the sealed object `sealed`, read as the object named `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> std::result::Result<Vec<u8>, SealError> {
        open(&self.aead, name, sealed)
    }
}

fn open(aead: &LessSafeKey, name: &str, sealed: &[u8]) -> std::result::Result<Vec<u8>, SealError> {
    if sealed.len() < HEADER_LEN + TAG_LEN || &sealed[..4] != MAGIC || sealed[5..8] != [0, 0, 0] {
        return Err(SealError::Header);
    }
    if sealed[4] != VERSION {
        return Err(SealError::Version(sealed[4]));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[8..HEADER_LEN]);
    let mut body = sealed[HEADER_LEN..].to_vec();
    let plain = aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut body,
        )
        .map_err(|_| SealError::Open)?;
    let len = plain.len();
    body.truncate(len);
    Ok(body)
}

/// Opens `sealed` as object `name` under the key derived from `key` (for fuzzing the decoder
/// of sealed objects, which come from outside).
pub fn open_with(
    key: &DataKey,
    name: &str,
    sealed: &[u8],
) -> std::result::Result<Vec<u8>, SealError> {
    Sealer::new(key).open(name, sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_anything_else_is_refused() {
        let key = DataKey::from_bytes([7; 32]);
        let sealer = Sealer::new(&key);
        let name = "chunks/ab/abcdef";
        let plain = b"a block of the machine's disk".repeat(100);
        let sealed = sealer.seal(name, &plain).unwrap();
        assert_eq!(sealer.open(name, &sealed).unwrap(), plain);
        // Not the plaintext, and another seal of the same content differs (a fresh nonce).
        assert!(!sealed.windows(16).any(|w| w == &plain[..16]));
        assert_ne!(sealer.seal(name, &plain).unwrap(), sealed);
        // Another name (an object moved in place of another), another key, a flipped bit.
        assert_eq!(
            sealer.open("chunks/ab/other", &sealed),
            Err(SealError::Open)
        );
        let other = Sealer::new(&DataKey::from_bytes([8; 32]));
        assert_eq!(other.open(name, &sealed), Err(SealError::Open));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(sealer.open(name, &bad).is_err(), "byte {i}");
        }
        assert_eq!(sealer.open(name, &sealed[..10]), Err(SealError::Header));
    }

    #[test]
    fn keyed_names_depend_on_the_key_and_the_id_is_not_the_key() {
        let (a, b) = (DataKey::from_bytes([1; 32]), DataKey::from_bytes([2; 32]));
        let data = b"same content";
        let plain = Hasher::Plain.hash(data);
        let (ha, hb) = (
            Sealer::new(&a).hasher().hash(data),
            Sealer::new(&b).hasher().hash(data),
        );
        assert_ne!(ha, plain);
        assert_ne!(ha, hb);
        assert_eq!(ha, Sealer::new(&a).hasher().hash(data));
        assert_ne!(a.id(), b.id());
        assert!(!format!("{a:?}").contains("0101"));
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        let key = DataKey::create(&path).unwrap();
        assert_eq!(DataKey::read(&path).unwrap().id(), key.id());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = DataKey::create(&path).unwrap_err().to_string();
        assert!(again.contains("not overwritten"), "{again}");
        std::fs::write(&path, "not a key\n").unwrap();
        let bad = DataKey::read(&path).unwrap_err().to_string();
        assert!(bad.contains("64 hex digits"), "{bad}");
    }
}
