//! Boomerang's replica store: every disk's recovery points as Merkle trees over
//! content-addressed chunks, on a local directory or an object store.
//!
//! ```text
//! <store>/boomerang-store.json          config: format version, block size, fan-out
//!         chunks/<h[0..2]>/<h>          one block, zstd or as is (chunk.rs), h = BLAKE3(block)
//!         nodes/<h[0..2]>/<h>           one tree node (tree.rs), h = BLAKE3(node bytes)
//!         points/<disk>/<id:020>.point  one recovery point's manifest (point.rs)
//!         leases/                       commit and GC leases (lease.rs)
//! ```
//!
//! Invariants:
//! - Objects first, manifest last: a manifest is written (conditional put, durable) only after
//!   every chunk and node it references is durable. A crash leaves at worst unreferenced
//!   objects, which GC removes.
//! - Content-addressed puts are idempotent; a block of zeros (or a subtree of them) is stored as
//!   nothing and named [`ChunkHash::ZERO`].
//! - Every object is checked against its name when read: a flipped byte is an error naming the
//!   disk, point and offset, never wrong data.
//! - GC and commits exclude each other through leases: a commit never references an object that
//!   a GC is deleting. Commits to different disks, exports, diffs and verify run concurrently.

pub mod backend;
pub mod chunk;
mod commit;
mod diff;
pub mod error;
mod gc;
mod group;
mod lease;
pub mod pack;
pub mod point;
mod read;
mod retention;
pub mod seal;
pub mod tree;
mod update;
mod verify;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use boomerang_core::{ChunkHash, DiskName, PointId};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

pub use backend::{Backend, Location};

/// Point manifests already read, by store and path, for callers that list the same stores'
/// points again and again (a master target's heartbeats). Cheap to clone; shared.
#[derive(Clone, Debug, Default)]
pub struct ManifestCache(Arc<std::sync::Mutex<std::collections::HashMap<String, PointManifest>>>);

/// How many point manifests are read at once.
const MANIFEST_READS: usize = 16;
pub use commit::{CommitOptions, CommitReport};
pub use diff::ChangedRange;
pub use error::{Result, StoreError};
pub use gc::{GcReport, Usage};
pub use point::{CommitStats, MarkKind, PointManifest};
pub use read::ExportReport;
pub use retention::{Keep, PruneReport};
pub use seal::{DataKey, Hasher};
pub use verify::{BadObject, VerifyReport};

const CONFIG_PATH: &str = "boomerang-store.json";
/// Smallest and largest block sizes a store accepts.
pub const MIN_BLOCK_SIZE: u64 = 4096;
pub const MAX_BLOCK_SIZE: u64 = chunk::MAX_RAW_LEN as u64;
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;

/// The store's config object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format: String,
    /// 1, or 2 for a sealed store (which a Boomerang that does not seal refuses).
    pub version: u32,
    pub block_size: u64,
    pub fanout: u64,
    pub created_unix_ms: u64,
    /// Set for a sealed store (seal.rs): its cipher and its key's id, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealConfig>,
    /// Set for a store in a group (version 3): its chunks are in the group's shared
    /// namespace, so that blocks two stores of the group hold alike are stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupConfig>,
    /// What of the format the store uses beyond version 3's (version 4): `packs` (small
    /// chunks batched, pack.rs). A Boomerang refuses a store with a feature it does not know.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The features this Boomerang reads and writes.
pub const FEATURES: &[&str] = &["packs"];

/// Where a store in a group finds the group: its root is `up` levels above the store, and the
/// shared namespace is [`GROUP_DIR`] there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupConfig {
    pub up: u32,
}

/// The shared namespace of a group of stores, under the group's root: `chunks/` of every
/// store of the group, `leases/` of their commits and collections, and `members/`, one record
/// per store (`members/<path under the root>.member`).
pub const GROUP_DIR: &str = ".shared";

/// How a sealed store is sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealConfig {
    pub cipher: String,
    pub key_id: String,
}

/// Reports progress of long work (a progress bar in the CLI).
pub trait Progress: Send + Sync {
    /// A new phase of `total` units (bytes unless said otherwise) begins.
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
    /// Whether the work should stop now: a commit then ends with
    /// [`StoreError::Interrupted`], writing no point (asked between blocks).
    fn stopped(&self) -> bool {
        false
    }
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {}

/// An open replica store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    config: Arc<StoreConfig>,
    /// A sealed store's keys.
    sealer: Option<Arc<seal::Sealer>>,
    /// Its data key (a store in a group opens the other stores of the group with it).
    key: Option<DataKey>,
    /// The packs' indexes as read so far (pack.rs), shared by the store's clones.
    packs: pack::Packs,
}

impl Store {
    /// Creates a store at `location` (a directory, `azure://container/prefix` or `memory://`).
    pub async fn init(location: &str, block_size: u64) -> Result<Store> {
        check_block_size(block_size)?;
        let backend = Location::parse(location)?.open(true).await?;
        Self::init_on(backend, block_size).await
    }

    /// Creates a store on an opened backend.
    pub async fn init_on(backend: Backend, block_size: u64) -> Result<Store> {
        Self::init_sealed_on(backend, block_size, None).await
    }

    /// Creates a sealed store at `location`: its chunks and nodes are sealed under `key`,
    /// which the store never holds.
    pub async fn init_sealed(location: &str, block_size: u64, key: &DataKey) -> Result<Store> {
        check_block_size(block_size)?;
        let backend = Location::parse(location)?.open(true).await?;
        Self::init_sealed_on(backend, block_size, Some(key)).await
    }

    /// Creates a store on an opened backend, sealed under `key` if one is given.
    pub async fn init_sealed_on(
        backend: Backend,
        block_size: u64,
        key: Option<&DataKey>,
    ) -> Result<Store> {
        Self::init_configured(backend, block_size, key, None).await
    }

    async fn init_configured(
        backend: Backend,
        block_size: u64,
        key: Option<&DataKey>,
        group: Option<GroupConfig>,
    ) -> Result<Store> {
        check_block_size(block_size)?;
        let config = StoreConfig {
            format: "boomerang-store".into(),
            version: 4,
            block_size,
            fanout: tree::FANOUT,
            created_unix_ms: now_ms(),
            sealed: key.map(|k| SealConfig {
                cipher: seal::CIPHER.into(),
                key_id: k.id(),
            }),
            group,
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("config serializes");
        let put = backend
            .durable
            .put_opts(
                &Path::from(CONFIG_PATH),
                PutPayload::from(bytes),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(StoreError::AlreadyExists {
                    location: backend.display().to_string(),
                });
            }
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not create the store at {}", backend.display()),
                    e,
                ));
            }
        }
        Ok(Store {
            backend,
            config: Arc::new(config),
            sealer: key.map(|k| Arc::new(seal::Sealer::new(k))),
            key: key.cloned(),
            packs: Default::default(),
        })
    }

    /// Opens an existing store.
    pub async fn open(location: &str) -> Result<Store> {
        Self::open_with_key(location, None).await
    }

    /// Opens an existing store, sealed under `key` if it is a sealed one.
    pub async fn open_with_key(location: &str, key: Option<&DataKey>) -> Result<Store> {
        let backend = Location::parse(location)?.open(false).await?;
        Self::open_sealed_on(backend, key).await
    }

    /// Opens the store on an opened backend.
    pub async fn open_on(backend: Backend) -> Result<Store> {
        Self::open_sealed_on(backend, None).await
    }

    /// Opens the store on an opened backend, with `key` if it is a sealed one.
    pub async fn open_sealed_on(backend: Backend, key: Option<&DataKey>) -> Result<Store> {
        let bytes = match backend.durable.get(&Path::from(CONFIG_PATH)).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Missing {
                    location: backend.display().to_string(),
                });
            }
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not open the store at {}", backend.display()),
                    e,
                ));
            }
        };
        let config: StoreConfig = serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::Corrupt(format!(
                "the store config {CONFIG_PATH} at {} does not parse ({e}): restore it from a copy",
                backend.display()
            ))
        })?;
        let cipher_known =
            |c: &Option<SealConfig>| c.as_ref().is_none_or(|s| s.cipher == seal::CIPHER);
        let known = match config.version {
            1 => config.sealed.is_none() && config.group.is_none(),
            2 => config.sealed.is_some() && cipher_known(&config.sealed) && config.group.is_none(),
            3 => config.group.is_some() && cipher_known(&config.sealed),
            4 => {
                cipher_known(&config.sealed)
                    && config
                        .features
                        .iter()
                        .all(|f| FEATURES.contains(&f.as_str()))
            }
            _ => false,
        };
        if config.format != "boomerang-store" || !known {
            return Err(StoreError::Invalid(format!(
                "the store at {} has format {:?} version {}, which this Boomerang does not read: upgrade Boomerang",
                backend.display(),
                config.format,
                config.version
            )));
        }
        if config.fanout != tree::FANOUT || check_block_size(config.block_size).is_err() {
            return Err(StoreError::Corrupt(format!(
                "the store config {CONFIG_PATH} at {} has impossible values (block size {}, fan-out {}): restore it from a copy",
                backend.display(),
                config.block_size,
                config.fanout
            )));
        }
        let sealer = match (&config.sealed, key) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(StoreError::Invalid(format!(
                    "the store at {} is not sealed, but a key file was given: it would be read and written in the clear. Use a sealed store (store init --sealed), or give no key file for this one",
                    backend.display()
                )));
            }
            (Some(sealed), None) => {
                return Err(StoreError::Invalid(format!(
                    "the store at {} is sealed (key {}): give its key file with --key-file",
                    backend.display(),
                    sealed.key_id
                )));
            }
            (Some(sealed), Some(key)) if key.id() != sealed.key_id => {
                return Err(StoreError::Invalid(format!(
                    "the key file given is not the key of the store at {}: the store is sealed with key {}, the file holds key {}; give the key file made when the store was created",
                    backend.display(),
                    sealed.key_id,
                    key.id()
                )));
            }
            (Some(_), Some(key)) => Some(Arc::new(seal::Sealer::new(key))),
        };
        let backend = match &config.group {
            None => backend,
            Some(group) => {
                let shared = Self::group_of(&backend, group)?.join(GROUP_DIR)?;
                let opened = shared.open(false).await.map_err(|e| match e {
                    StoreError::Missing { location } => StoreError::Corrupt(format!(
                        "the store at {} is in a group whose shared namespace {location} is not there (it holds the store's chunks): open the store by its place under the group's root, or restore {location}",
                        backend.display()
                    )),
                    other => other,
                })?;
                backend.with_shared(opened)
            }
        };
        Ok(Store {
            backend,
            config: Arc::new(config),
            sealer,
            key: key.cloned(),
            packs: Default::default(),
        })
    }

    /// The root of the group of the store on `backend`.
    fn group_of(backend: &Backend, group: &GroupConfig) -> Result<Location> {
        if group.up == 0 {
            return Err(StoreError::Corrupt(format!(
                "the store config at {} says the store is in a group, but not where: restore it from a copy",
                backend.display()
            )));
        }
        let location = backend.location().ok_or_else(|| {
            StoreError::Invalid(format!(
                "the store at {} is in a group, and was opened without its location: open it by its location",
                backend.display()
            ))
        })?;
        location.up(group.up as usize)
    }

    /// For a store in a group: the group's root and this store's path under it.
    pub(crate) fn group_place(&self) -> Result<Option<(Location, String)>> {
        let Some(group) = &self.config.group else {
            return Ok(None);
        };
        let root = Self::group_of(&self.backend, group)?;
        let path = self
            .backend
            .location()
            .map(|l| l.tail(group.up as usize))
            .unwrap_or_default();
        Ok(Some((root, path)))
    }

    /// Whether the store batches small chunks into packs (the `packs` feature).
    pub(crate) fn packs_small_chunks(&self) -> bool {
        self.config.features.iter().any(|f| f == "packs")
    }

    /// The data key the store was opened with, if it is sealed.
    pub(crate) fn data_key(&self) -> Option<&DataKey> {
        self.key.as_ref()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn block_size(&self) -> u64 {
        self.config.block_size
    }

    /// The location, for messages.
    pub fn display(&self) -> &str {
        self.backend.display()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn chunk_path(hash: &ChunkHash) -> String {
        let hex = hash.to_hex();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    pub fn node_path(hash: &ChunkHash) -> String {
        let hex = hash.to_hex();
        format!("nodes/{}/{hex}", &hex[..2])
    }

    /// Deletes every object of the store at `location`: its points first, then its config,
    /// then the rest, so that a deletion cut short leaves no store, only objects no point
    /// names. A store in a group leaves its chunks to the group ([`Store::destroy_in_group`]).
    /// Returns the objects deleted.
    pub async fn destroy(location: &str) -> Result<u64> {
        let place = Location::parse(location)?;
        let backend = place.open(false).await?;
        let config = match backend.durable.get(&Path::from(CONFIG_PATH)).await {
            Ok(r) => Some(r.bytes().await.map_err(|e| {
                StoreError::backend(format!("could not read the config of {location}"), e)
            })?),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not read the config of {location}"),
                    e,
                ));
            }
        };
        let group = config
            .as_deref()
            .and_then(|b| serde_json::from_slice::<StoreConfig>(b).ok())
            .and_then(|c| c.group);
        if let Some(group) = group {
            let up = group.up as usize;
            return Self::destroy_in_group(&place.up(up)?.to_string(), &place.tail(up)).await;
        }
        delete_own_objects(&backend, false).await
    }

    /// How the store names content: keyed when it is sealed.
    pub fn hasher(&self) -> Hasher {
        self.sealer.as_ref().map_or(Hasher::Plain, |s| s.hasher())
    }

    /// The name of a block's (or node's) content in this store.
    pub fn hash(&self, data: &[u8]) -> ChunkHash {
        self.hasher().hash(data)
    }

    /// The key of a sealed store's manifest checksums.
    pub(crate) fn manifest_key(&self) -> Option<&[u8; 32]> {
        self.sealer.as_ref().map(|s| s.manifest_key())
    }

    /// Whether the store is sealed.
    pub fn sealed(&self) -> bool {
        self.sealer.is_some()
    }

    pub(crate) async fn get_object(&self, path: &str) -> Result<Bytes> {
        let bytes = self.get_raw(path).await?;
        self.unseal(path, bytes)
    }

    /// Object `path` as stored (sealed, in a sealed store).
    pub(crate) async fn get_raw(&self, path: &str) -> Result<Bytes> {
        let p = Path::from(path);
        let r = match self.backend.objects_at(path).get(&p).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            StoreError::backend(format!("could not read {path} from {}", self.display()), e)
        })
    }

    /// The block in chunk object `path` as stored (`bytes`), opened if the store is sealed,
    /// decoded and checked against its name and length.
    pub(crate) fn open_chunk(
        &self,
        path: &str,
        bytes: &[u8],
        expected: &ChunkHash,
        len: Option<usize>,
    ) -> std::result::Result<Bytes, chunk::ChunkError> {
        let opened;
        let plain = match &self.sealer {
            None => bytes,
            Some(sealer) => {
                opened = sealer.open(path, bytes)?;
                &opened[..]
            }
        };
        match len {
            Some(len) => chunk::decode_with(plain, expected, len, self.hasher()),
            None => chunk::decode_any(plain, expected, self.hasher()),
        }
    }

    /// The content of object `path` as read (`bytes`): opened, in a sealed store.
    pub(crate) fn unseal(&self, path: &str, bytes: Bytes) -> Result<Bytes> {
        match &self.sealer {
            None => Ok(bytes),
            Some(sealer) => sealer.open(path, &bytes).map(Bytes::from).map_err(|why| {
                StoreError::Corrupt(format!(
                    "object {path} of the sealed store at {}: {why}. Nothing of it is used; restore the object from a copy, or run `boomerang store verify` to see what it affects",
                    self.display()
                ))
            }),
        }
    }

    pub(crate) async fn put_object(&self, path: String, bytes: Bytes) -> Result<()> {
        let bytes = self.seal_object(&path, bytes)?;
        self.put_stored(path, bytes).await
    }

    /// Object `path`'s content as stored: sealed under its name, in a sealed store.
    pub(crate) fn seal_object(&self, path: &str, bytes: Bytes) -> Result<Bytes> {
        Ok(match &self.sealer {
            None => bytes,
            Some(sealer) => Bytes::from(sealer.seal(path, &bytes)?),
        })
    }

    /// Puts object `path` as stored (sealed already, in a sealed store).
    pub(crate) async fn put_stored(&self, path: String, bytes: Bytes) -> Result<()> {
        self.backend
            .objects_at(&path)
            .put(&Path::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::backend(format!("could not write {path} to {}", self.display()), e)
            })
    }

    pub(crate) async fn get_node(&self, hash: &ChunkHash) -> Result<Bytes> {
        self.get_object(&Self::node_path(hash)).await
    }

    /// All points of `disk` (or of every disk), oldest first per disk.
    pub async fn points(&self, disk: Option<&DiskName>) -> Result<Vec<PointManifest>> {
        self.points_cached(disk, &ManifestCache::default()).await
    }

    /// [`Store::points`], reading only the manifests `cache` does not hold yet (manifests
    /// never change once written): one listing, and a read per new point, several at once.
    /// Points no longer listed leave the cache.
    pub async fn points_cached(
        &self,
        disk: Option<&DiskName>,
        cache: &ManifestCache,
    ) -> Result<Vec<PointManifest>> {
        let mut paths = self.point_paths(disk).await?;
        paths.sort();
        let key = |path: &str| format!("{}\n{path}", self.display());
        let missing: Vec<String> = {
            let held = cache.0.lock().unwrap_or_else(|e| e.into_inner());
            paths
                .iter()
                .filter(|p| !held.contains_key(&key(p)))
                .cloned()
                .collect()
        };
        let read: Vec<(String, PointManifest)> = futures::stream::iter(missing)
            .map(|path| async move {
                let manifest = self.read_manifest(&path).await?;
                Ok::<_, StoreError>((path, manifest))
            })
            .buffer_unordered(MANIFEST_READS)
            .try_collect()
            .await?;
        let mut held = cache.0.lock().unwrap_or_else(|e| e.into_inner());
        for (path, manifest) in read {
            held.insert(key(&path), manifest);
        }
        let out: Vec<PointManifest> = paths
            .iter()
            .filter_map(|p| held.get(&key(p)).cloned())
            .collect();
        // What this listing covered and did not list was deleted (pruned, collected).
        let scope = key(&match disk {
            Some(d) => format!("points/{d}/"),
            None => "points/".to_string(),
        });
        let listed: std::collections::HashSet<String> = paths.iter().map(|p| key(p)).collect();
        held.retain(|k, _| !k.starts_with(&scope) || listed.contains(k));
        Ok(out)
    }

    /// Manifest paths under `points/` (of one disk, or all).
    pub(crate) async fn point_paths(&self, disk: Option<&DiskName>) -> Result<Vec<String>> {
        let prefix = match disk {
            Some(d) => Path::from(format!("points/{d}")),
            None => Path::from("points"),
        };
        let metas: Vec<_> = self
            .backend
            .durable
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| {
                StoreError::backend(format!("could not list points in {}", self.display()), e)
            })?;
        Ok(metas
            .into_iter()
            .map(|m| m.location.to_string())
            .filter(|p| p.ends_with(".point"))
            .collect())
    }

    pub(crate) async fn read_manifest(&self, path: &str) -> Result<PointManifest> {
        let bytes = match self.backend.durable.get(&Path::from(path)).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = bytes.map_err(|e| {
            StoreError::backend(
                format!("could not read point manifest {path} in {}", self.display()),
                e,
            )
        })?;
        PointManifest::decode_with(&bytes, path, self.manifest_key()).map_err(StoreError::Corrupt)
    }

    /// The newest point of `disk`, if it has any.
    pub async fn latest(&self, disk: &DiskName) -> Result<Option<PointManifest>> {
        let mut paths = self.point_paths(Some(disk)).await?;
        paths.sort();
        match paths.last() {
            Some(p) => Ok(Some(self.read_manifest(p).await?)),
            None => Ok(None),
        }
    }

    /// A point by id, or the latest with `None`.
    pub async fn point(&self, disk: &DiskName, id: Option<PointId>) -> Result<PointManifest> {
        let found = match id {
            None => self.latest(disk).await?,
            Some(id) => {
                let path = PointManifest::path(disk, id);
                match self.backend.durable.head(&Path::from(path.as_str())).await {
                    Ok(_) => Some(self.read_manifest(&path).await?),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => {
                        return Err(StoreError::backend(
                            format!("could not read point manifest {path}"),
                            e,
                        ));
                    }
                }
            }
        };
        found.ok_or_else(|| {
            StoreError::NotFound(match id {
                None => format!(
                    "disk {disk} has no points in {}: commit one with `boomerang store commit`",
                    self.display()
                ),
                Some(id) => format!(
                    "disk {disk} has no point {id} in {}: list them with `boomerang store points {} --disk {disk}`",
                    self.display(),
                    self.display()
                ),
            })
        })
    }
}

fn check_block_size(block_size: u64) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(StoreError::Invalid(format!(
            "block size {block_size} is not valid: use a power of two from 4 KiB to 4 MiB, such as 64KiB"
        )));
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Deletes the objects of the store on `backend`: its points first, then its config, then
/// the rest (with `own_only`, a store in a group: not the chunks and leases, which are the
/// group's). Returns how many.
pub(crate) async fn delete_own_objects(backend: &Backend, own_only: bool) -> Result<u64> {
    let mut deleted = 0;
    let display = backend.display().to_string();
    let delete = async |store: &Arc<dyn object_store::ObjectStore>, path: &Path| match store
        .delete(path)
        .await
    {
        Ok(()) => Ok(1),
        Err(object_store::Error::NotFound { .. }) => Ok(0),
        Err(e) => Err(StoreError::backend(
            format!("could not delete {path} in {display}"),
            e,
        )),
    };
    for (prefix, store) in [
        (Some("points"), &backend.durable),
        (None, &backend.durable),
        (Some("chunks"), &backend.objects),
        (Some("packs"), &backend.objects),
        (Some("nodes"), &backend.objects),
        (Some("leases"), &backend.durable),
    ] {
        if own_only && matches!(prefix, Some("chunks" | "packs" | "leases")) {
            continue;
        }
        let Some(prefix) = prefix else {
            deleted += delete(store, &Path::from(CONFIG_PATH)).await?;
            continue;
        };
        let metas: Vec<_> = match store.list(Some(&Path::from(prefix))).try_collect().await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not list {prefix}/ in {display}"),
                    e,
                ));
            }
        };
        for meta in metas {
            deleted += delete(store, &meta.location).await?;
        }
    }
    Ok(deleted)
}
