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
//! A reader looks a chunk up in the packs' indexes as read so far, then for its own object,
//! then in indexes written since (read once each; one reading at a time). What it reads is
//! checked as any chunk: by its name and, in a sealed store, by its seal. A commit packs no
//! chunk the group's packs hold already (it reads the indexes under its lease, so no
//! collection deletes them meanwhile). Packs and indexes are written durably (fsync on a local
//! store), the pack first. Only stores with the `packs` feature (docs/formats.md) get packs: a
//! Boomerang that does not know them refuses such a store rather than miss its chunks.

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

/// The packs' indexes read so far: chunk name to place, and which indexes were read.
#[derive(Default)]
pub(crate) struct PackIndex {
    places: HashMap<ChunkHash, Packed>,
    read: std::collections::HashSet<String>,
}

/// A store's pack indexes, shared by its clones: what was read, and the one reading at a
/// time.
#[derive(Clone, Default)]
pub(crate) struct Packs {
    index: Arc<Mutex<PackIndex>>,
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .index
            .lock()
            .map(|i| i.places.len())
            .unwrap_or_default();
        write!(f, "Packs({n} chunks indexed)")
    }
}

impl Packs {
    fn get(&self, hash: &ChunkHash) -> Option<Packed> {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .places
            .get(hash)
            .cloned()
    }
}

/// The chunks of a commit waiting to be written as a pack, and every chunk the commit packed.
#[derive(Default)]
struct Open {
    data: Vec<u8>,
    entries: Vec<(ChunkHash, u64, u32)>,
    packed: std::collections::HashSet<ChunkHash>,
}

/// A commit's open pack; cheap to clone, shared by its put tasks.
#[derive(Clone, Default)]
pub(crate) struct Packer(Arc<Mutex<Open>>);

impl Packer {
    /// Adds chunk `hash` (its object as stored, `object`) to the open pack; returns a full
    /// pack to write, if this made one.
    /// Whether `hash` is new to this commit's packs, and a full pack to write if adding it
    /// made one.
    fn add(&self, hash: ChunkHash, object: &[u8]) -> (bool, Option<Open>) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !open.packed.insert(hash) {
            return (false, None); // in this commit's packs already
        }
        let offset = open.data.len() as u64;
        open.data.extend_from_slice(object);
        open.entries.push((hash, offset, object.len() as u32));
        let full =
            (open.data.len() >= PACK_BYTES || open.entries.len() >= PACK_CHUNKS).then(|| Open {
                data: std::mem::take(&mut open.data),
                entries: std::mem::take(&mut open.entries),
                packed: Default::default(),
            });
        (true, full)
    }

    /// Puts chunk `hash` (its object as stored: encoded, sealed) into the commit's packs,
    /// unless the store's packs (or this commit's) hold it; writes a pack when one is full.
    /// Whether it was packed now.
    pub(crate) async fn put(&self, store: &Store, hash: ChunkHash, object: &[u8]) -> Result<bool> {
        if store.packs.get(&hash).is_some() {
            return Ok(false);
        }
        let (added, full) = self.add(hash, object);
        if let Some(full) = full {
            write(store, full).await?;
        }
        Ok(added)
    }

    /// Writes what is left in the open pack (before the commit's manifest).
    pub(crate) async fn finish(&self, store: &Store) -> Result<()> {
        let open = {
            let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
            Open {
                data: std::mem::take(&mut open.data),
                entries: std::mem::take(&mut open.entries),
                packed: Default::default(),
            }
        };
        if open.entries.is_empty() {
            return Ok(());
        }
        write(store, open).await
    }
}

/// Writes `open` as a pack, then its index, each durable before the next (a crash leaves no
/// index over a pack cut short).
async fn write(store: &Store, open: Open) -> Result<()> {
    let index = encode_index(&open.entries, store.manifest_key());
    let id = blake3::hash(&index).to_hex();
    let base = format!("packs/{}/{id}", &id[..2]);
    let (pack, idx) = (format!("{base}.pack"), format!("{base}.idx"));
    for (path, bytes) in [(pack, open.data), (idx, index)] {
        store
            .backend()
            .durable_at(&path)
            .put(&Path::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| {
                StoreError::backend(format!("could not write {path} to {}", store.display()), e)
            })?;
    }
    Ok(())
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
    out.extend_from_slice(sum.as_bytes());
    out
}

fn checksum(bytes: &[u8], key: Option<&[u8; 32]>) -> blake3::Hash {
    match key {
        Some(k) => blake3::keyed_hash(k, bytes),
        None => blake3::hash(bytes),
    }
}

/// The largest index object.
pub const MAX_INDEX: usize = HEADER + MAX_ENTRIES * ENTRY + 32;

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
    if bytes[9..12] != [0; 3] {
        return Err("pack index has reserved bytes set".into());
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if count > MAX_ENTRIES || bytes.len() != HEADER + count * ENTRY + 32 {
        return Err(format!(
            "pack index of {} bytes cannot hold {count} entries",
            bytes.len()
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    let sum: [u8; 32] = sum.try_into().expect("32 bytes");
    // (blake3::Hash compares in constant time.)
    if checksum(body, key) != blake3::Hash::from_bytes(sum) {
        return Err(
            "pack index fails its checksum (damaged, or made without the store's key)".into(),
        );
    }
    let mut out = Vec::with_capacity(count);
    for e in body[HEADER..].chunks_exact(ENTRY) {
        let hash = ChunkHash(e[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(e[40..44].try_into().expect("4 bytes"));
        // A packed chunk is small, and in a pack of bounded size.
        if len as usize >= SMALL
            || offset.saturating_add(u64::from(len)) > (PACK_BYTES + SMALL) as u64
        {
            return Err(format!(
                "pack index entry of {len} bytes at {offset} is not a small chunk in a pack"
            ));
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

    /// The entries of index `path`; none if it is not there any more (a collection deleted
    /// it since it was listed).
    pub(crate) async fn read_index(
        &self,
        path: &str,
    ) -> Result<Option<Vec<(ChunkHash, u64, u32)>>> {
        let objects = self.backend().objects_at(path);
        let at = Path::from(path);
        let fetched = match objects.head(&at).await {
            Ok(meta) if meta.size > MAX_INDEX as u64 => {
                return Err(StoreError::Corrupt(format!(
                    "pack index {path} of {} is {} bytes, more than an index can be",
                    self.display(),
                    meta.size
                )));
            }
            Ok(_) => match objects.get(&at).await {
                Ok(r) => r.bytes().await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let bytes = match fetched {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not read pack index {path}"),
                    e,
                ));
            }
        };
        decode_index(&bytes, self.manifest_key())
            .map(Some)
            .map_err(|why| {
                StoreError::Corrupt(format!(
                    "pack index {path} of {}: {why}; the chunks it lists cannot be found until it is restored (boomerang store verify names the points affected)",
                    self.display()
                ))
            })
    }

    /// Brings the indexes read up to date, one reading at a time: those listed and not read
    /// yet are read, and the places of those no longer listed (collected) are forgotten. An
    /// index that cannot be decoded is left out, with a warning (the chunks only it lists are
    /// then missing, which readers and verify say), so that it does not stop every other read.
    pub(crate) async fn load_packs(&self) -> Result<()> {
        let _one = self.packs.reading.lock().await;
        let listed = self.pack_indexes().await?;
        let new: Vec<String> = {
            let mut held = self.packs.index.lock().unwrap_or_else(|e| e.into_inner());
            let now: std::collections::HashSet<&String> = listed.iter().collect();
            let gone: std::collections::HashSet<String> = held
                .read
                .iter()
                .filter(|p| !now.contains(p))
                .map(|p| format!("{}.pack", p.trim_end_matches(".idx")))
                .collect();
            if !gone.is_empty() {
                held.places.retain(|_, p| !gone.contains(&*p.pack));
                held.read.retain(|p| now.contains(p));
            }
            listed
                .iter()
                .filter(|p| !held.read.contains(*p))
                .cloned()
                .collect()
        };
        for path in new {
            let entries = match self.read_index(&path).await {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::warn!(index = %path, error = %e, "a pack index is damaged; the chunks only it lists cannot be read");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let pack: Arc<str> = Arc::from(format!("{}.pack", path.trim_end_matches(".idx")));
            let mut held = self.packs.index.lock().unwrap_or_else(|e| e.into_inner());
            for (hash, offset, len) in entries {
                held.places.entry(hash).or_insert(Packed {
                    pack: pack.clone(),
                    offset,
                    len,
                });
            }
            held.read.insert(path);
        }
        Ok(())
    }

    /// Where packed chunk `hash` is, from the indexes as read so far (no reading: for the
    /// blocking readers of a local store, which read them first).
    pub(crate) fn find_packed_now(&self, hash: &ChunkHash) -> Option<Packed> {
        self.packs.get(hash)
    }

    /// The object of packed chunk `at`, as stored; none if its pack is not there.
    pub(crate) async fn get_packed(&self, at: &Packed) -> Result<Option<Bytes>> {
        let range = at.offset..at.offset + u64::from(at.len);
        match self
            .backend()
            .objects_at(&at.pack)
            .get_range(&Path::from(&*at.pack), range)
            .await
        {
            Ok(b) if b.len() == at.len as usize => Ok(Some(b)),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                self.forget_packed_any(at);
                Ok(None)
            }
            Err(e) => Err(StoreError::backend(
                format!("could not read {} from {}", at.pack, self.display()),
                e,
            )),
        }
    }

    fn forget_packed_any(&self, at: &Packed) {
        let mut held = self.packs.index.lock().unwrap_or_else(|e| e.into_inner());
        held.places.retain(|_, p| p.pack != at.pack);
        let idx = format!("{}.idx", at.pack.trim_end_matches(".pack"));
        held.read.remove(&idx);
    }

    /// The object of chunk `hash` as stored (sealed, in a sealed store): from a pack the
    /// indexes read so far name, its own object, or a pack written since; none if it is in
    /// none of them.
    pub(crate) async fn get_chunk_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>> {
        if let Some(at) = self.find_packed_now(hash)
            && let Some(b) = self.get_packed(&at).await?
        {
            return Ok(Some(b));
        }
        let path = Store::chunk_path(hash);
        match self.get_raw(&path).await {
            Ok(b) => return Ok(Some(b)),
            Err(StoreError::Backend {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        self.load_packs().await?;
        match self.find_packed_now(hash) {
            Some(at) => self.get_packed(&at).await,
            None => Ok(None),
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
