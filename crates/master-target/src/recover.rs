//! Instant recovery (DESIGN 3.5): a disk served at a recovery point at once, while it is copied
//! into its target in the background.
//!
//! The target is a raw image on the recovery site's datastore, made sparse at the point's
//! size. A bitmap says which blocks (the replica store's) the target already holds:
//!
//! ```text
//! read  ─▶ block held? ─yes─▶ target
//!                      └no──▶ replica store (the checkpoint's chunk, checked against its hash)
//! write ─▶ block held? ─no──▶ the checkpoint's block into the target first (unless the write
//!                             covers it whole) ─▶ write into the target ─▶ held
//! hydration (a thread): every block not held yet ─▶ from the store into the target ─▶ held
//! ```
//!
//! Opening writes the incoming log's records between the checkpoint and the point into the
//! target first, so the time to the first read depends on the log since the checkpoint, not
//! on the disk's size. Once every block is held the target is the whole disk, and the store is
//! no longer read.
//!
//! Crash safety: the bitmap (`TARGET.held`) is written only after the target is synced, and a
//! flush (or FUA write) syncs both, so a block marked held always has its data on disk. A
//! restart with the same target resumes: the state file (`TARGET.recovery`, JSON) names the
//! machine, disk and point, and says `"hydrated": true` once the target is the whole disk; a
//! different request for the same target is refused. Writes not flushed before a crash may
//! be lost, as on any disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boomerang_core::DiskName;
use boomerang_core::log::Op;
use boomerang_nbd::BlockDevice;
use boomerang_store::tree::{Shape, TreeReader};
use boomerang_store::{PointManifest, Store};
use serde::{Deserialize, Serialize};

use crate::points::{self, PointsError};

/// What a recovery serves, and where it copies it.
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    pub retention: PathBuf,
    pub stream: String,
    pub disk: DiskName,
    /// A listed point's sequence number; `None` for the latest.
    pub at: Option<u64>,
    /// The raw image to serve from and hydrate into.
    pub target: PathBuf,
    /// At most this many bytes a second of hydration (the datastore also serves the machine).
    pub hydrate_rate: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Points(#[from] PointsError),
    #[error(transparent)]
    Store(#[from] boomerang_store::StoreError),
    #[error("disk {disk} of {stream} has no recovery point yet: wait for its first one")]
    NoPoint { stream: String, disk: DiskName },
    #[error(
        "{} exists and is not a recovery target: give a new path (a recovery never overwrites a file it did not make)",
        target.display()
    )]
    TargetExists { target: PathBuf },
    #[error(
        "{} is the recovery of {was}, not of {asked}: give another target (it holds what the machine wrote there; remove it and its .recovery and .held files only if that is not needed)",
        target.display()
    )]
    OtherRecovery {
        target: PathBuf,
        was: String,
        asked: String,
    },
    #[error(
        "the recovery into {} cannot resume: {why}; its target may hold writes made since the failover: keep it, and recover into a new target",
        target.display()
    )]
    BadState { target: PathBuf, why: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RecoverError {
    let path = path.to_path_buf();
    move |source| RecoverError::Io { what, path, source }
}

/// What `TARGET.recovery` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    stream: String,
    disk: String,
    /// The point's sequence number.
    seq: u64,
    /// The checkpoint it starts from.
    base: String,
    size: u64,
    /// Every block is in the target: it is the whole disk, and the store is not read.
    #[serde(default)]
    hydrated: bool,
}

impl State {
    fn what(&self) -> String {
        format!("disk {} of {} at seq {}", self.disk, self.stream, self.seq)
    }
}

/// Which blocks the target holds.
struct Held {
    bits: Vec<u64>,
    count: u64,
    blocks: u64,
}

impl Held {
    fn new(blocks: u64) -> Self {
        Held {
            bits: vec![0; blocks.div_ceil(64) as usize],
            count: 0,
            blocks,
        }
    }

    fn get(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64) {
        if !self.get(i) {
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
            self.count += 1;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn load(bytes: &[u8], blocks: u64) -> Option<Self> {
        let mut held = Held::new(blocks);
        if bytes.len() != held.bits.len() * 8 {
            return None;
        }
        for (w, chunk) in held.bits.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        held.count = (0..blocks).filter(|&i| held.get(i)).count() as u64;
        Some(held)
    }
}

/// A disk served at a recovery point while it hydrates into its target.
pub struct Recovery {
    store: Store,
    base: PointManifest,
    /// The checkpoint's shape (blocks past it are zeros there).
    shape: Shape,
    block: u64,
    size: u64,
    target: File,
    path: PathBuf,
    held: Mutex<Held>,
    groups: Mutex<HashMap<u64, Arc<Vec<boomerang_core::ChunkHash>>>>,
    tree: tokio::sync::Mutex<TreeReader>,
    runtime: tokio::runtime::Handle,
    state: State,
    /// Bytes the store served (reads and hydration).
    fetched: AtomicU64,
    /// One save of the held-block map at a time: a later snapshot must not be overwritten by
    /// an earlier one.
    saving: Mutex<()>,
    /// Stopped: every read and write fails (the target may be deleted).
    closed: AtomicBool,
    /// The [`WRITE_GRAIN`]s the machine wrote since the recovery started: with the point,
    /// exactly what differs from the replica (a reprotect's resync set). `None` when not known
    /// (after a crash of the master target: a write may have reached the target and not the
    /// map). Saved beside the target (`TARGET.written`) only by a clean close.
    written: Mutex<Option<Held>>,
    /// Held (shared) by every read and write from its check that the device is open to its
    /// end, and (exclusively) by [`Recovery::close`]: nothing is written after the close has
    /// saved what was written.
    gate: std::sync::RwLock<()>,
}

/// The unit in which a recovery tracks what the machine wrote.
pub const WRITE_GRAIN: u64 = 4096;

fn written_path(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".written");
    PathBuf::from(p)
}

/// The byte ranges the machine wrote into a recovery's target while it was served, as its
/// last clean close saved them; `None` when not known.
pub fn saved_written(target: &Path, size: u64) -> Option<Vec<(u64, u64)>> {
    let bytes = std::fs::read(written_path(target)).ok()?;
    Some(grain_ranges(
        &Held::load(&bytes, size.div_ceil(WRITE_GRAIN))?,
        size,
    ))
}

/// The ranges of set grains, adjacent ones merged, clipped to `size`.
fn grain_ranges(map: &Held, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in 0..map.blocks {
        if !map.get(i) {
            continue;
        }
        let (at, len) = (i * WRITE_GRAIN, WRITE_GRAIN.min(size - i * WRITE_GRAIN));
        match out.last_mut() {
            Some((start, n)) if *start + *n == at => *n += len,
            _ => out.push((at, len)),
        }
    }
    out
}

/// Makes the whole target of a hydrated recovery a plain disk: its state files go (call it
/// once the recovery is closed).
pub fn finish(target: &Path) -> io::Result<()> {
    for path in [state_path(target), held_path(target)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn held_path(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".held");
    PathBuf::from(p)
}

fn state_path(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".recovery");
    PathBuf::from(p)
}

/// Where a new target is made before it is put in place.
fn creating_path(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".creating");
    PathBuf::from(p)
}

/// The saved state of the recovery into `target`, if there is one.
fn read_state(target: &Path) -> Result<Option<State>, RecoverError> {
    let path = state_path(target);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RecoverError::BadState {
                target: target.to_path_buf(),
                why: format!("its state {} is damaged: {e}", path.display()),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecoverError::Io {
            what: "could not read the recovery state of",
            path: target.to_path_buf(),
            source,
        }),
    }
}

/// The point the recovery into `target` was made at, if it was.
pub fn saved_seq(target: &Path) -> Option<u64> {
    read_state(target).ok().flatten().map(|s| s.seq)
}

/// In [`recovering_machines`]: a recovery being made, or whose state cannot be read: every
/// machine counts.
pub const ALL: &str = "*";

/// The machines with a recovery (failover or test failover) on the retention volume: their
/// checkpoints stay, since a recovery reads, or resumes from, the one it started at.
pub fn recovering_machines(retention: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for kind in ["failovers", "test-failovers"] {
        for dir in std::fs::read_dir(retention.join(kind))
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = file.path();
                let name = path.to_string_lossy().to_string();
                if name.ends_with(".creating") {
                    out.insert(ALL.to_string());
                    continue;
                }
                let Some(target) = name.strip_suffix(".recovery").map(PathBuf::from) else {
                    continue;
                };
                match read_state(&target) {
                    Ok(Some(state)) => {
                        out.insert(state.stream);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(state = %path.display(), error = %boomerang_core::chain(&e), "a recovery's state is unreadable: no checkpoint of any machine is dropped until it is fixed or removed");
                        out.insert(ALL.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The machine the recovery into `target` is of, if there is one.
pub fn saved_machine(target: &Path) -> Option<String> {
    read_state(target).ok().flatten().map(|s| s.stream)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

impl Recovery {
    /// Opens (or resumes) the recovery `config` asks for. Call from a Tokio runtime.
    ///
    /// A target with a saved state is resumed from it (with `at` none, whatever point it was
    /// made at); a new one is made under `TARGET.creating` and renamed once the log's records
    /// are in and the state is saved, so a crash in between leaves nothing half made.
    pub async fn open(config: &RecoveryConfig) -> Result<Arc<Recovery>, RecoverError> {
        let target = &config.target;
        let saved = read_state(target)?;
        if let Some(state) = saved {
            if state.stream != config.stream
                || state.disk != config.disk.as_str()
                || config.at.is_some_and(|s| s != state.seq)
            {
                let asked = format!(
                    "disk {} of {} at seq {}",
                    config.disk,
                    config.stream,
                    config.at.map_or("latest".to_string(), |s| s.to_string())
                );
                return Err(RecoverError::OtherRecovery {
                    target: target.clone(),
                    was: state.what(),
                    asked,
                });
            }
            return Self::resume(config, state).await;
        }
        let creating = creating_path(target);
        if target.exists() {
            return Err(RecoverError::TargetExists {
                target: target.clone(),
            });
        }
        // Left by a crash before the state was saved: made again.
        let _ = std::fs::remove_file(&creating);
        // The file first: while it exists the master target drops no checkpoint (see
        // `recovering_machines`), so the one this recovery starts from stays.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&creating)
            .map_err(io_err("could not create the recovery target", &creating))?;
        let made = Self::create(config, file).await;
        if made.is_err() {
            let _ = std::fs::remove_file(&creating);
        }
        made
    }

    /// Makes a new recovery into `file` (the target's `.creating` file).
    async fn create(config: &RecoveryConfig, file: File) -> Result<Arc<Recovery>, RecoverError> {
        let target = &config.target;
        let creating = creating_path(target);
        let seq = match config.at {
            Some(s) => s,
            None => points::list(&config.retention, &config.stream, &config.disk)
                .await?
                .last()
                .map(|p| p.seq)
                .ok_or_else(|| RecoverError::NoPoint {
                    stream: config.stream.clone(),
                    disk: config.disk.clone(),
                })?,
        };
        let (store, base) =
            points::base_of(&config.retention, &config.stream, &config.disk, seq).await?;
        let state = State {
            stream: config.stream.clone(),
            disk: config.disk.to_string(),
            seq,
            base: base.id.to_string(),
            size: base.size,
            hydrated: false,
        };
        file.set_len(base.size)
            .map_err(io_err("could not size the recovery target", &creating))?;
        let held = Held::new(base.size.div_ceil(base.block_size));
        let recovery = Self::make(store, base, file, target, state, held);
        let recovery = recovery.apply_log(config, seq).await?;
        // From here on, what is written is the machine's.
        *recovery.written.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Held::new(recovery.size.div_ceil(WRITE_GRAIN)));
        recovery
            .persist()
            .map_err(io_err("could not save the held-block map of", target))?;
        // A map an earlier recovery into this target left (a released failover) is not this
        // one's.
        match std::fs::remove_file(written_path(target)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(
                    "could not remove the old written-block map of",
                    target,
                )(e));
            }
            _ => {}
        }
        let state = serde_json::to_vec(&recovery.state).unwrap_or_default();
        boomerang_core::write_atomic(&state_path(target), &state)
            .map_err(io_err("could not write the recovery state of", target))?;
        std::fs::rename(&creating, target)
            .map_err(io_err("could not put in place the recovery target", target))?;
        sync_dir(target).map_err(io_err("could not sync the directory of", target))?;
        Ok(Arc::new(recovery))
    }

    /// Resumes the recovery whose state `state` was saved beside `config.target`.
    async fn resume(config: &RecoveryConfig, state: State) -> Result<Arc<Recovery>, RecoverError> {
        let target = &config.target;
        // A crash between the state's save and the target's rename: finish the rename.
        let creating = creating_path(target);
        if !target.exists() && creating.exists() {
            std::fs::rename(&creating, target)
                .map_err(io_err("could not put in place the recovery target", target))?;
        }
        let store = points::open_store(&config.retention, &config.stream).await?;
        let id = state.base.parse().map_err(|_| RecoverError::BadState {
            target: target.clone(),
            why: format!("{:?} is not a point id", state.base),
        })?;
        let base = store.point(&config.disk, Some(id)).await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(target)
            .map_err(io_err("could not open the recovery target", target))?;
        let blocks = state.size.div_ceil(base.block_size);
        let bytes = std::fs::read(held_path(target))
            .map_err(io_err("could not read the held-block map of", target))?;
        // Without the map, the target's blocks cannot be told from the checkpoint's: copying
        // the checkpoint over them would lose what the machine wrote.
        let held = Held::load(&bytes, blocks).ok_or_else(|| RecoverError::BadState {
            target: target.clone(),
            why: format!(
                "its held-block map {} is damaged",
                held_path(target).display()
            ),
        })?;
        let recovery = Self::make(store, base, file, target, state, held);
        // Known only if saved by a clean close; taken back now, so that a crash from here on
        // leaves it unknown rather than stale.
        let saved = written_path(target);
        if let Ok(bytes) = std::fs::read(&saved) {
            let map = Held::load(&bytes, recovery.size.div_ceil(WRITE_GRAIN));
            std::fs::remove_file(&saved)
                .and_then(|()| sync_dir(target))
                .map_err(io_err(
                    "could not take back the written-block map of",
                    target,
                ))?;
            *recovery.written.lock().unwrap_or_else(|e| e.into_inner()) = map;
        }
        Ok(Arc::new(recovery))
    }

    fn make(
        store: Store,
        base: PointManifest,
        file: File,
        target: &Path,
        state: State,
        held: Held,
    ) -> Recovery {
        Recovery {
            shape: base.shape(),
            block: base.block_size,
            size: state.size,
            target: file,
            path: target.to_path_buf(),
            held: Mutex::new(held),
            groups: Mutex::default(),
            tree: tokio::sync::Mutex::new(TreeReader::new(store.clone(), base.tree())),
            runtime: tokio::runtime::Handle::current(),
            state,
            fetched: AtomicU64::new(0),
            saving: Mutex::new(()),
            closed: AtomicBool::new(false),
            written: Mutex::new(None),
            gate: std::sync::RwLock::new(()),
            store,
            base,
        }
    }

    /// Writes the log's records between the checkpoint and the point into the target.
    async fn apply_log(mut self, config: &RecoveryConfig, seq: u64) -> Result<Self, RecoverError> {
        let from = self.base.seq.map_or(0, |s| s.0) + 1;
        // The log is read on a blocking thread and its changes applied here, a few at a time:
        // a day of log never sits in memory.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Op>(16);
        let (retention, stream, disk) = (
            config.retention.clone(),
            config.stream.clone(),
            config.disk.clone(),
        );
        let reading = tokio::task::spawn_blocking(move || {
            points::each_op(&retention, &stream, &disk, from, seq, |op| {
                // The receiver stopped: it failed, and says why.
                let _ = tx.blocking_send(op.clone());
                Ok(())
            })
        });
        while let Some(op) = rx.recv().await {
            if let Op::Write { offset, data, .. } = &op
                && offset.saturating_add(data.len() as u64) > self.size
            {
                return Err(RecoverError::Points(PointsError::Log {
                    stream: config.stream.clone(),
                    why: format!(
                        "a write of {} bytes at offset {offset} passes the end of disk {} ({} bytes)",
                        data.len(),
                        config.disk,
                        self.size
                    ),
                }));
            }
            match op {
                Op::Resize { size, .. } => {
                    self.target
                        .set_len(size)
                        .map_err(io_err("could not resize the recovery target", &self.path))?;
                    self.size = size;
                    self.state.size = size;
                    let blocks = size.div_ceil(self.block);
                    let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
                    let mut grown = Held::new(blocks);
                    for i in 0..blocks.min(held.blocks) {
                        if held.get(i) {
                            grown.set(i);
                        }
                    }
                    *held = grown;
                }
                Op::Write { offset, data, .. } => {
                    self.write_async(&data, offset).await?;
                }
                Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } => {
                    let mut at = offset;
                    let end = (offset + len).min(self.size);
                    while at < end {
                        let n = (end - at).min(1 << 20);
                        self.write_async(&vec![0; n as usize], at).await?;
                        at += n;
                    }
                }
                Op::Mark { .. } => {}
            }
        }
        reading.await.map_err(|e| {
            RecoverError::Points(PointsError::Log {
                stream: config.stream.clone(),
                why: e.to_string(),
            })
        })??;
        Ok(self)
    }

    /// The checkpoint's bytes of block `i` (zeros past its end).
    async fn base_block(&self, i: u64) -> Result<Vec<u8>, RecoverError> {
        let len = self.block_len(i) as usize;
        let mut out = vec![0u8; len];
        if i >= self.shape.leaves {
            return Ok(out);
        }
        let group = i / boomerang_store::tree::FANOUT;
        let cached = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .cloned();
        let hashes = match cached {
            Some(h) => h,
            None => {
                let h = self.tree.lock().await.group(group).await?;
                self.groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(group, h.clone());
                h
            }
        };
        let hash = hashes[(i % boomerang_store::tree::FANOUT) as usize];
        if hash.is_zero() {
            return Ok(out);
        }
        let chunk_len = self.shape.block_len(i);
        let data = self
            .store
            .read_chunk(
                &hash,
                chunk_len,
                &self.base.disk,
                self.base.id,
                i * self.block,
            )
            .await?;
        let n = data.len().min(len);
        out[..n].copy_from_slice(&data[..n]);
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn block_len(&self, i: u64) -> u64 {
        self.block.min(self.size - i * self.block)
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset`, bringing in the checkpoint's part of partly written blocks
    /// first. The held map's lock is taken per block, and a block's base is fetched before it.
    async fn write_async(&self, data: &[u8], offset: u64) -> Result<(), RecoverError> {
        let end = offset + data.len() as u64;
        if let Some(map) = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            for grain in offset / WRITE_GRAIN..end.div_ceil(WRITE_GRAIN) {
                map.set(grain);
            }
        }
        let mut at = offset;
        while at < end {
            let i = at / self.block;
            let start = i * self.block;
            let stop = (start + self.block_len(i)).min(end);
            let piece = &data[(at - offset) as usize..(stop - offset) as usize];
            let whole = at == start && stop == start + self.block_len(i);
            let base = if whole || self.held().get(i) {
                None
            } else {
                Some(self.base_block(i).await?)
            };
            {
                let mut held = self.held();
                if !held.get(i)
                    && let Some(base) = base
                {
                    self.target
                        .write_all_at(&base, start)
                        .map_err(io_err("could not write the recovery target", &self.path))?;
                }
                self.target
                    .write_all_at(piece, at)
                    .map_err(io_err("could not write the recovery target", &self.path))?;
                held.set(i);
            }
            at = stop;
        }
        Ok(())
    }

    /// Syncs the target, then saves which blocks it holds.
    fn persist(&self) -> io::Result<()> {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.held().bytes();
        self.target.sync_data()?;
        boomerang_core::write_atomic(&held_path(&self.path), &bytes)
    }

    /// Stops the device: every later read and write fails, so that no client writes into a
    /// target about to be deleted. What was written is saved first.
    pub fn close(&self) -> io::Result<()> {
        let _no_io = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Relaxed);
        self.persist()?;
        let written = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Held::bytes);
        if let Some(bytes) = written {
            boomerang_core::write_atomic(&written_path(&self.path), &bytes)?;
        }
        Ok(())
    }

    /// The byte ranges the machine wrote since the recovery started; `None` when not known.
    pub fn written_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let map = self.written.lock().unwrap_or_else(|e| e.into_inner());
        map.as_ref().map(|m| grain_ranges(m, self.size))
    }

    fn open_for_io(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(io::Error::other(format!(
                "the recovery into {} was stopped",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Blocks held, of all.
    pub fn progress(&self) -> (u64, u64) {
        let h = self.held();
        (h.count, h.blocks)
    }

    /// Bytes the target holds, of all.
    pub fn progress_bytes(&self) -> (u64, u64) {
        let (held, all) = self.progress();
        if held == all {
            return (self.size, self.size);
        }
        ((held * self.block).min(self.size), self.size)
    }

    pub fn hydrated(&self) -> bool {
        let (held, all) = self.progress();
        held == all
    }

    /// Bytes the replica store served so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    pub fn target(&self) -> &Path {
        &self.path
    }

    /// The point's sequence number.
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    /// Copies every block not held yet into the target, at most `rate` bytes a second, until
    /// done or `stop`; saves progress every second. Runs on a thread of its own.
    pub fn hydrate(self: &Arc<Self>, rate: Option<u64>, stop: Arc<AtomicBool>) -> io::Result<()> {
        let started = Instant::now();
        let mut copied = 0u64;
        let mut saved = Instant::now();
        let blocks = self.progress().1;
        for i in 0..blocks {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if self.held().get(i) {
                continue;
            }
            // A store that fails for a while (a timeout, a 5xx) is waited for: the copy goes
            // on once it answers.
            let mut wait = Duration::from_millis(500);
            let base = loop {
                match self.runtime.block_on(self.base_block(i)) {
                    Ok(b) => break b,
                    Err(e) if !stop.load(Ordering::Relaxed) => {
                        tracing::warn!(target = %self.path.display(), block = i, error = %boomerang_core::chain(&e), "could not read the replica store; the copy retries");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            };
            {
                let mut held = self.held();
                if !held.get(i) {
                    if !boomerang_core::is_zero(&base) {
                        self.target.write_all_at(&base, i * self.block)?;
                    }
                    held.set(i);
                }
            }
            copied += base.len() as u64;
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(copied as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            if saved.elapsed() >= Duration::from_secs(1) {
                self.persist()?;
                saved = Instant::now();
            }
        }
        self.persist()?;
        if self.hydrated() {
            // Said only once the map that proves it is on disk.
            let state = State {
                hydrated: true,
                ..self.state.clone()
            };
            boomerang_core::write_atomic(
                &state_path(&self.path),
                &serde_json::to_vec(&state).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    fn io<T>(&self, r: Result<T, RecoverError>) -> io::Result<T> {
        r.map_err(|e| {
            tracing::error!(target = %self.path.display(), error = %boomerang_core::chain(&e), "recovery I/O failed");
            io::Error::other(e)
        })
    }
}

impl BlockDevice for Recovery {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _io = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.open_for_io()?;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let i = at / self.block;
            let start = i * self.block;
            let stop = (start + self.block_len(i)).min(end);
            let out = &mut buf[(at - offset) as usize..(stop - offset) as usize];
            if self.held().get(i) {
                self.target.read_exact_at(out, at)?;
            } else {
                let base = self.io(self.runtime.block_on(self.base_block(i)))?;
                out.copy_from_slice(&base[(at - start) as usize..(stop - start) as usize]);
            }
            at = stop;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let _io = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.open_for_io()?;
        self.io(self.runtime.block_on(self.write_async(data, offset)))?;
        if fua {
            self.persist()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> io::Result<()> {
        let _io = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.open_for_io()?;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(1 << 20);
            self.io(self
                .runtime
                .block_on(self.write_async(&vec![0; n as usize], at)))?;
            at += n;
        }
        if fua {
            self.persist()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn flush(&self) -> io::Result<()> {
        let _io = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.open_for_io()?;
        self.persist()
    }

    fn reads_may_wait(&self) -> bool {
        true
    }

    fn writes_may_wait(&self) -> bool {
        true
    }
}
