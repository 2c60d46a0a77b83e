//! Packs: small chunk objects batched into one object, where one object each would make the
//! requests (and an object store's per-request cost) dominate. A commit puts a chunk whose
//! object is under [`SMALL`] bytes into the commit's open pack instead; a full pack (or the
//! last one, before the manifest) is written as two objects (docs/formats.md):
//!
//! ```text
//! packs/<id[0..2]>/<id>.pack   the chunk objects, one after the other, each exactly as it
//!                              would be stored on its own (sealed under its chunk name)
//! packs/<id[0..2]>/<id>.idx    which chunk is where: written after the pack, so a chunk is
//!                              found only once its bytes are there
//! ```
//!
//! A reader that does not find a chunk's own object looks it up in the packs' indexes (read
//! once, and again when a chunk is not in them). What it reads is checked as any chunk: by
//! its name and, in a sealed store, by its seal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use boomerang_core::ChunkHash;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::Store;
use crate::error::{Result, StoreError};

/// Chunk objects smaller than this go into packs...
pub const SMALL: usize = 16 * 1024;

/// ... or than a quarter of the block size, if less: a store of small blocks keeps its
/// ordinary chunks as objects of their own, and packs only those that compress to little.
pub fn small_for(block_size: u64) -> usize {
    (block_size / 4).min(SMALL as u64) as usize
}
/// A pack is written once it holds this many bytes...
const PACK_BYTES: usize = 4 << 20;
/// ... or this many chunks.
const PACK_CHUNKS: usize = 4096;

const MAGIC: &[u8; 8] = b"BMRGPIDX";
const VERSION: u8 = 1;
/// Magic, version, 3 reserved bytes, count (u32).
const HEADER: usize = 16;
/// Hash (32), offset (u64), length (u32).
const ENTRY: usize = 44;
/// The most entries an index may hold.
pub const MAX_ENTRIES: usize = PACK_CHUNKS;

/// Where a packed chunk is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    /// The pack object's path (shared by the entries of one pack).
    pub pack: Arc<str>,
    pub offset: u64,
    pub len: u32,
}

/// The index of every pack of a store: chunk name to place.
pub(crate) type PackIndex = HashMap<ChunkHash, Packed>;

/// The chunks of a commit waiting to be written as a pack.
#[derive(Default)]
struct Open {
    data: Vec<u8>,
    entries: Vec<(ChunkHash, u64, u32)>,
}

/// A commit's open pack; cheap to clone, shared by its put tasks.
#[derive(Clone, Default)]
pub(crate) struct Packer(Arc<Mutex<Open>>);

impl Packer {
    /// Adds chunk `hash` (its object as stored, `object`) to the open pack; returns a full
    /// pack to write, if this made one.
    fn add(&self, hash: ChunkHash, object: &[u8]) -> Option<Open> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let offset = open.data.len() as u64;
        open.data.extend_from_slice(object);
        open.entries.push((hash, offset, object.len() as u32));
        (open.data.len() >= PACK_BYTES || open.entries.len() >= PACK_CHUNKS)
            .then(|| std::mem::take(&mut *open))
    }

    /// Puts chunk `hash` (its object as stored: encoded, sealed) into the commit's packs;
    /// writes a pack when one is full. Returns the bytes written.
    pub(crate) async fn put(&self, store: &Store, hash: ChunkHash, object: &[u8]) -> Result<u64> {
        match self.add(hash, object) {
            Some(full) => write(store, full).await,
            None => Ok(0),
        }
    }

    /// Writes what is left in the open pack (before the commit's manifest). Returns the
    /// bytes written.
    pub(crate) async fn finish(&self, store: &Store) -> Result<u64> {
        let open = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        if open.entries.is_empty() {
            return Ok(0);
        }
        write(store, open).await
    }
}

/// Writes `open` as a pack, then its index. Returns the bytes written.
async fn write(store: &Store, open: Open) -> Result<u64> {
    let index = encode_index(&open.entries, store.manifest_key());
    let id = blake3::hash(&index).to_hex();
    let base = format!("packs/{}/{id}", &id[..2]);
    let (pack, idx) = (format!("{base}.pack"), format!("{base}.idx"));
    let n = (open.data.len() + index.len()) as u64;
    for (path, bytes) in [(pack, open.data), (idx, index)] {
        store
            .backend()
            .objects_at(&path)
            .put(&Path::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| {
                StoreError::backend(format!("could not write {path} to {}", store.display()), e)
            })?;
    }
    Ok(n)
}

/// An index object: header, entries, and a BLAKE3 checksum of both (keyed in a sealed store).
pub fn encode_index(entries: &[(ChunkHash, u64, u32)], key: Option<&[u8; 32]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + entries.len() * ENTRY + 32);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (hash, offset, len) in entries {
        out.extend_from_slice(&hash.0);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let sum = checksum(&out, key);
    out.extend_from_slice(&sum);
    out
}

fn checksum(bytes: &[u8], key: Option<&[u8; 32]>) -> [u8; 32] {
    match key {
        Some(k) => *blake3::keyed_hash(k, bytes).as_bytes(),
        None => *blake3::hash(bytes).as_bytes(),
    }
}

/// Decodes index object `bytes`: every entry, or why it cannot be used.
pub fn decode_index(
    bytes: &[u8],
    key: Option<&[u8; 32]>,
) -> std::result::Result<Vec<(ChunkHash, u64, u32)>, String> {
    if bytes.len() < HEADER + 32 || &bytes[..8] != MAGIC {
        return Err("not a pack index".into());
    }
    if bytes[8] != VERSION {
        return Err(format!("pack index version {} is unknown", bytes[8]));
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if count > MAX_ENTRIES || bytes.len() != HEADER + count * ENTRY + 32 {
        return Err(format!(
            "pack index of {} bytes cannot hold {count} entries",
            bytes.len()
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if checksum(body, key) != sum {
        return Err(
            "pack index fails its checksum (damaged, or made without the store's key)".into(),
        );
    }
    let mut out = Vec::with_capacity(count);
    for e in body[HEADER..].chunks_exact(ENTRY) {
        let hash = ChunkHash(e[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(e[40..44].try_into().expect("4 bytes"));
        if offset.checked_add(u64::from(len)).is_none() {
            return Err("pack index entry past any pack's end".into());
        }
        out.push((hash, offset, len));
    }
    Ok(out)
}

impl Store {
    /// The paths of the store's pack indexes (for a store in a group, the group's).
    pub(crate) async fn pack_indexes(&self) -> Result<Vec<String>> {
        let listed: Vec<_> = self
            .backend()
            .objects_at("packs/")
            .list(Some(&Path::from("packs")))
            .try_collect()
            .await
            .map_err(|e| {
                StoreError::backend(format!("could not list packs in {}", self.display()), e)
            })?;
        Ok(listed
            .into_iter()
            .map(|m| m.location.to_string())
            .filter(|p| p.ends_with(".idx"))
            .collect())
    }

    /// The entries of index `path`.
    pub(crate) async fn read_index(&self, path: &str) -> Result<Vec<(ChunkHash, u64, u32)>> {
        let bytes = match self.backend().objects_at(path).get(&Path::from(path)).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|e| StoreError::backend(format!("could not read pack index {path}"), e))?;
        decode_index(&bytes, self.manifest_key()).map_err(|why| {
            StoreError::Corrupt(format!(
                "pack index {path} of {}: {why}; the chunks it lists cannot be found until it is restored (boomerang store verify names the points affected)",
                self.display()
            ))
        })
    }

    /// Reads every pack index (again): the place of every packed chunk.
    pub(crate) async fn load_packs(&self) -> Result<Arc<PackIndex>> {
        let mut index = PackIndex::new();
        for path in self.pack_indexes().await? {
            let pack: Arc<str> = Arc::from(format!("{}.pack", path.trim_end_matches(".idx")));
            for (hash, offset, len) in self.read_index(&path).await? {
                index.insert(
                    hash,
                    Packed {
                        pack: pack.clone(),
                        offset,
                        len,
                    },
                );
            }
        }
        let index = Arc::new(index);
        *self.packs.lock().unwrap_or_else(|e| e.into_inner()) = Some(index.clone());
        Ok(index)
    }

    /// Where packed chunk `hash` is, reading the indexes again if they were read before it
    /// was packed.
    pub(crate) async fn find_packed(&self, hash: &ChunkHash) -> Result<Option<Packed>> {
        let held = self.packs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(found) = held.as_ref().and_then(|i| i.get(hash)) {
            return Ok(Some(found.clone()));
        }
        Ok(self.load_packs().await?.get(hash).cloned())
    }

    /// Where packed chunk `hash` is, from the indexes as last read (no reading: for the
    /// blocking readers of a local store, which read them first).
    pub(crate) fn find_packed_now(&self, hash: &ChunkHash) -> Option<Packed> {
        let held = self.packs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        held.and_then(|i| i.get(hash).cloned())
    }

    /// The object of packed chunk `at`, as stored.
    pub(crate) async fn get_packed(&self, at: &Packed) -> Result<Bytes> {
        let range = at.offset..at.offset + u64::from(at.len);
        self.backend()
            .objects_at(&at.pack)
            .get_range(&Path::from(&*at.pack), range)
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("could not read {} from {}", at.pack, self.display()),
                    e,
                )
            })
    }

    /// The object of chunk `hash` as stored (sealed, in a sealed store): its own object, or
    /// its place in a pack; none if it is in neither.
    pub(crate) async fn get_chunk_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>> {
        let path = Store::chunk_path(hash);
        match self.get_raw(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::Backend {
                source: object_store::Error::NotFound { .. },
                ..
            }) => match self.find_packed(hash).await? {
                Some(at) => self.get_packed(&at).await.map(Some),
                None => Ok(None),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_refuses_damage() {
        let entries = vec![(ChunkHash([7; 32]), 0, 100), (ChunkHash([9; 32]), 100, 5)];
        let key = [3u8; 32];
        for key in [None, Some(&key)] {
            let bytes = encode_index(&entries, key);
            assert_eq!(decode_index(&bytes, key).unwrap(), entries);
            let mut bad = bytes.clone();
            bad[HEADER + 33] ^= 1;
            assert!(decode_index(&bad, key).unwrap_err().contains("checksum"));
            assert!(decode_index(&bytes[..bytes.len() - 1], key).is_err());
        }
        // Made without the key: refused by a sealed store.
        let plain = encode_index(&entries, None);
        assert!(decode_index(&plain, Some(&[3u8; 32])).is_err());
    }
}
