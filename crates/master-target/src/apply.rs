//! Applying one stream's incoming log to replica images, and committing recovery points at
//! its marks.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boomerang_core::log::{LogTail, MarkKind as LogMark, Op, Record, decode_frame};
use boomerang_core::{DiskName, Seq};
use boomerang_store::{CommitOptions, MarkKind, Store, StoreError};
use boomerang_wire::cache::Lineage;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

use crate::digest::Position;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tail(#[from] boomerang_core::log::TailError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the incoming log of {stream} holds a damaged record: {why}")]
    Record { stream: String, why: String },
    /// Not a failure: the stream's records start again later (see [`Applier::moved`]).
    #[error("the records of {stream} start again at {now}: applying starts again there")]
    Moved { stream: String, now: Lineage },
}

/// Where the replica store of `stream` lives on the retention volume (when the volume has no
/// store root elsewhere: [`StoreRoot`]).
pub fn replica_store(retention: &Path, stream: &str) -> PathBuf {
    retention.join("replicas").join(stream).join("store")
}

/// On the retention volume: where its replica stores are when not on it (`--store-root`).
pub const STORE_ROOT_FILE: &str = "store-root.json";

/// The replica stores of a retention volume kept elsewhere: under `root` (such as
/// `azure://container/prefix`), one per machine (`root/<machine>`), sealed under the key in
/// `key_file` when there is one. The replica images and incoming logs stay on the volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRoot {
    pub root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl StoreRoot {
    /// Where the store of `stream`'s replica of lineage `lineage` is: a store per lineage, so
    /// that a new replica never sees the points of an ended one, whatever was left of it.
    pub fn location(&self, stream: &str, lineage: u64) -> String {
        format!(
            "{}/{stream}/lineage-{lineage}",
            self.root.trim_end_matches('/')
        )
    }

    /// The store of `stream`'s replica in `dir` (on the volume) under the store root of
    /// `retention`, if it has one and the replica says its lineage (without one, it has no
    /// store: the applier records the lineage before it makes the store).
    pub fn store_of(retention: &Path, stream: &str, dir: &Path) -> Option<(String, u64)> {
        let root = Self::read(retention).ok()??;
        let lineage = crate::replica_lineage(dir).ok()??;
        Some((root.location(stream, lineage), lineage))
    }

    /// Deletes, in the background, the store at `location` (an ended replica's, from
    /// [`StoreRoot::store_of`], once its directory is retired). A record of it in
    /// `RETENTION/retired/` stays until it is gone, so that a restart goes on with it.
    pub fn forget(retention: &Path, location: Option<(String, u64)>) {
        let Some((location, _)) = location else {
            return;
        };
        let retired = retention.join("retired");
        let record = retired.join(format!(
            "store-{}.json",
            boomerang_core::log::UnixNanos::now().0
        ));
        let written = std::fs::create_dir_all(&retired).and_then(|()| {
            boomerang_core::write_atomic(
                &record,
                &serde_json::to_vec(&serde_json::json!({ "location": location }))
                    .unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            tracing::warn!(%location, error = %e, "could not record the deletion of an ended replica's store; it is deleted now, and not again after a restart");
        }
        Self::destroy_in_background(retention, location, record);
    }

    /// Deletes the store at `location`, then its deletion record `record`. A store under the
    /// volume's store root is one of its group: its chunks that no other store names are
    /// collected after it.
    pub(crate) fn destroy_in_background(retention: &Path, location: String, record: PathBuf) {
        let root = Self::read(retention).ok().flatten();
        tokio::spawn(async move {
            let in_group = root.as_ref().and_then(|r| {
                let under = location.strip_prefix(r.root.trim_end_matches('/'))?;
                Some((r, under.strip_prefix('/')?.to_string()))
            });
            let deleted = match &in_group {
                Some((root, path)) => {
                    boomerang_store::Store::destroy_in_group(&root.root, path).await
                }
                None => boomerang_store::Store::destroy(&location).await,
            };
            match deleted {
                Ok(n) => {
                    tracing::info!(%location, objects = n, "deleted the store of an ended replica");
                    let _ = std::fs::remove_file(&record);
                }
                Err(e) => {
                    tracing::warn!(%location, error = %e, "could not delete the store of an ended replica; no point of it is used again, and the next start tries again");
                    return;
                }
            }
            if let Some((root, _)) = in_group {
                collect_group(root).await;
            }
        });
    }

    /// The store root of `retention`, if it has one.
    pub fn read(retention: &Path) -> Result<Option<StoreRoot>, String> {
        let path = retention.join(STORE_ROOT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "{} is damaged ({e}): it says where the volume's replica stores are; restore it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("could not read {}: {e}", path.display())),
        }
    }

    /// Makes `root` the store root of `retention` (none: keeps what the volume has). A
    /// volume keeps one root for good: its points are where it says.
    pub fn keep(retention: &Path, root: Option<&StoreRoot>) -> Result<Option<StoreRoot>, String> {
        let held = Self::read(retention)?;
        // A directory root is kept absolute: offline commands run from elsewhere find it.
        let root = root.map(|r| StoreRoot {
            root: if r.root.contains("://") {
                r.root.clone()
            } else {
                std::path::absolute(&r.root)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| r.root.clone())
            },
            key_file: r.key_file.clone(),
        });
        let root = root.as_ref();
        if let Some(r) = root
            && r.key_file.is_none()
            && r.root.starts_with("azure://")
        {
            tracing::warn!(root = %r.root, "the replica stores go to Azure Blob in the clear: give --store-key-file to seal them");
        }
        match (held, root) {
            (held, None) => Ok(held),
            (Some(held), Some(root)) if held == *root => Ok(Some(held)),
            (Some(held), Some(root)) => Err(format!(
                "the replica stores of retention volume {} are under {}{}, not {}: start the master target with the volume's own store root (a volume keeps one)",
                retention.display(),
                held.root,
                held.key_file
                    .as_ref()
                    .map_or(String::new(), |k| format!(" (key file {})", k.display())),
                root.root
            )),
            (None, Some(root)) => {
                let replicas = retention.join("replicas");
                let used = std::fs::read_dir(&replicas)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                if used {
                    return Err(format!(
                        "retention volume {} keeps replica stores on it already: a store root is for a new volume",
                        retention.display()
                    ));
                }
                if let Some(key) = &root.key_file {
                    boomerang_store::DataKey::read(key).map_err(|e| e.to_string())?;
                }
                let bytes = serde_json::to_vec_pretty(root).map_err(|e| e.to_string())?;
                let path = retention.join(STORE_ROOT_FILE);
                boomerang_core::write_atomic(&path, &bytes)
                    .map_err(|e| format!("could not write {}: {e}", path.display()))?;
                Ok(Some(root.clone()))
            }
        }
    }
}

/// Collects the group of the replica stores under `root`: the chunks no store names any more
/// (an ended replica's, pruned points') are deleted. A collection that cannot run now (a
/// commit holds the group) is left to the next one.
pub(crate) async fn collect_group(root: &StoreRoot) {
    let key = match root
        .key_file
        .as_deref()
        .map(boomerang_store::DataKey::read)
        .transpose()
    {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(root = %root.root, error = %e, "could not read the store key file; the group is not collected");
            return;
        }
    };
    match boomerang_store::Store::collect_group(&root.root, key.as_ref()).await {
        Ok(r) => {
            if r.deleted_objects > 0 {
                tracing::info!(root = %root.root, objects = r.deleted_objects, bytes = r.deleted_bytes, "collected the chunks no replica names");
            }
        }
        Err(e) => {
            tracing::warn!(root = %root.root, error = %boomerang_core::chain(&e), "could not collect the replica stores' group; trying again later")
        }
    }
}

/// The location in a store deletion record (`retired/store-*.json`), if `path` is one.
pub(crate) fn forgotten_store(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if !(name.starts_with("store-") && name.ends_with(".json")) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["location"].as_str().map(str::to_string)
}

/// Opens the replica store of `stream` (on the retention volume, or under its store root),
/// creating it with `create` blocks when it does not exist and `create` is given; `None` when
/// it does not exist and is not to be created.
pub async fn open_replica_store(
    retention: &Path,
    stream: &str,
    create: Option<u64>,
) -> Result<Option<Store>, StoreError> {
    let root = StoreRoot::read(retention).map_err(StoreError::Invalid)?;
    // Under a store root, the replicas' stores are one group: blocks that two machines hold
    // alike (clones of one template) are stored once.
    let mut group = None;
    let (location, key) = match &root {
        None => {
            let path = replica_store(retention, stream);
            if create.is_none() && !path.exists() {
                return Ok(None);
            }
            if create.is_some() {
                std::fs::create_dir_all(&path).map_err(|e| StoreError::Io {
                    context: format!("could not create {}", path.display()),
                    source: e,
                })?;
            }
            (path.to_string_lossy().to_string(), None)
        }
        Some(root) => {
            let key = root
                .key_file
                .as_deref()
                .map(boomerang_store::DataKey::read)
                .transpose()?;
            let dir = retention.join("replicas").join(stream);
            let lineage = match crate::replica_lineage(&dir).map_err(StoreError::Invalid)? {
                Some(l) => l,
                // No lineage yet: no store yet (the applier records it first).
                None if create.is_none() => return Ok(None),
                None => 0,
            };
            group = Some((root.root.clone(), format!("{stream}/lineage-{lineage}")));
            (root.location(stream, lineage), key)
        }
    };
    match Store::open_with_key(&location, key.as_ref()).await {
        Ok(s) => Ok(Some(s)),
        Err(StoreError::Missing { .. }) => match create {
            None => Ok(None),
            Some(block_size) => match (&group, &key) {
                (Some((root, path)), key) => Ok(Some(
                    Store::init_in_group(root, path, block_size, key.as_ref()).await?,
                )),
                (None, Some(key)) => {
                    Ok(Some(Store::init_sealed(&location, block_size, key).await?))
                }
                (None, None) => Ok(Some(Store::init(&location, block_size).await?)),
            },
        },
        Err(e) => Err(e),
    }
}

/// The replica image of `disk` of `stream`.
pub(crate) fn image_path(retention: &Path, stream: &str, disk: &DiskName) -> PathBuf {
    retention
        .join("replicas")
        .join(stream)
        .join(format!("{disk}.img"))
}

/// How an applier is told to stop, besides the end of its records.
pub(crate) struct Stops {
    /// The replica's lineage ended: stop at once, what is left to apply is of no use.
    pub abandon: Arc<AtomicBool>,
    /// The disks are handed back: apply every record, make no more points, and stop a
    /// checkpoint being made (the replica's store goes with the release).
    pub releasing: Arc<AtomicBool>,
}

/// A commit's progress that says stop once the disks are being handed back.
struct UntilReleased<'a>(&'a AtomicBool);

impl boomerang_store::Progress for UntilReleased<'_> {
    fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts the applier of `stream` on a thread of its own; it reports where it stands on
/// `position`. `before` is the last record durable before this process took any: an earlier
/// process may have applied records up to it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    retention: PathBuf,
    stream: String,
    block_size: u64,
    every: Duration,
    log_window: Duration,
    durable: watch::Receiver<Seq>,
    position: watch::Sender<Position>,
    before: Seq,
    stops: Stops,
    problems: crate::Problems,
) {
    let Stops { abandon, releasing } = stops;
    let name = format!("apply-{stream}");
    let started = std::thread::Builder::new().name(name).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%stream, error = %boomerang_core::chain(&e), "could not start the applier");
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        let mut run = 0;
        let mut moved = false;
        let solved = |problems: &crate::Problems| {
            problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream);
        };
        loop {
            run += 1;
            let mut applier = Applier {
                retention: retention.clone(),
                stream: stream.clone(),
                block_size,
                disks: HashMap::new(),
                every,
                log_window,
                last_point: None,
                replay_until: Seq(0),
                problems: problems.clone(),
                releasing: releasing.clone(),
                whole: false,
            };
            // A run after an error may have applied anything durable by now; after the
            // records moved on, none of the new ones.
            let bound = match (run, moved) {
                (1, _) => before,
                (_, true) => Seq(0),
                _ => *durable.borrow(),
            };
            moved = false;
            match runtime.block_on(applier.run(durable.clone(), &position, run, bound, &abandon)) {
                Ok(()) => return solved(&problems),
                // Stopped from outside (an adoption): no retry.
                Err(_) if abandon.load(Ordering::Relaxed) => return solved(&problems),
                Err(e @ ApplyError::Moved { .. }) => {
                    tracing::warn!(%stream, reason = %e, "applying starts again");
                    moved = true;
                }
                Err(e) => {
                    let (lasting, whole_store) = lasting(&e);
                    let error = redact_queries(&boomerang_core::chain(&e).to_string());
                    // Stopped from outside (a release) with records left: the release finds
                    // them missing, says why, and starts an applier again.
                    let stopped = durable.has_changed().is_err();
                    if stopped {
                        tracing::error!(%stream, %error, "applying the incoming log stopped before every record reached the disks being handed back");
                    } else {
                        tracing::error!(%stream, %error, retry_in = ?backoff, "applying the incoming log stopped; retrying");
                    }
                    // Reported (an alert at the configuration server) until a point is made.
                    problems
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(stream.clone())
                        .and_modify(|p| {
                            (p.error, p.lasting, p.whole_store) =
                                (error.clone(), lasting, whole_store)
                        })
                        .or_insert_with(|| crate::ReplicaProblem {
                            stream: stream.clone(),
                            error,
                            since_unix_ms: (boomerang_core::log::UnixNanos::now().0 / 1_000_000) as i64,
                            lasting,
                            whole_store,
                        });
                    if stopped {
                        return;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
    if let Err(e) = started {
        tracing::error!(error = %boomerang_core::chain(&e), "could not start an applier thread");
    }
}

/// Whether retrying cannot mend `e` (an operator must act), and whether it is about every
/// store under the store root rather than this replica's: refused credentials, a missing
/// container, a wrong or missing key file are both; data failing its checks is the replica's.
fn lasting(e: &ApplyError) -> (bool, bool) {
    use boomerang_store::error::BackendFailure;
    match e {
        ApplyError::Store(StoreError::Backend { source, .. }) => match BackendFailure::of(source) {
            BackendFailure::Credentials | BackendFailure::NoContainer => (true, true),
            _ => (false, false),
        },
        // A store that cannot be opened as configured: its key file, its credentials.
        ApplyError::Store(StoreError::Invalid(_)) => (true, true),
        ApplyError::Store(StoreError::Corrupt(_)) => (true, false),
        _ => (false, false),
    }
}

/// `text` with the query string of every URL in it cut out: a store reached with a shared
/// access signature names the request in its errors, signature included.
pub(crate) fn redact_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_url = false;
    let mut in_query = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_url && (rest.starts_with("http://") || rest.starts_with("https://")) {
            in_url = true;
        }
        if c.is_whitespace() {
            in_url = false;
            in_query = false;
        } else if in_url && c == '?' && !in_query {
            in_query = true;
            out.push_str("?...");
        }
        if !in_query {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A replica image and the blocks changed since the last point.
struct Replica {
    path: PathBuf,
    file: File,
    changed: BTreeSet<u64>,
}

struct Applier {
    retention: PathBuf,
    stream: String,
    block_size: u64,
    disks: HashMap<DiskName, Replica>,
    /// Marks closer than this to the last point make no point of their own.
    every: Duration,
    /// How long applied incoming segments are kept.
    log_window: Duration,
    last_point: Option<std::time::Instant>,
    /// Records up to this one may have been applied to the images by an earlier run (the
    /// images are not rolled back to the last checkpoint): their marks make no checkpoint,
    /// since an image block may already hold a later write. They stay points through the log.
    replay_until: Seq,
    /// Where a failed run reported its error; a point made clears it.
    problems: crate::Problems,
    /// Set once the disks are being handed back: no more points (see [`Stops`]).
    releasing: Arc<AtomicBool>,
    /// The next checkpoint reads every disk whole: the images may hold changes of records
    /// this run does not apply, which no point has (the records started again later, see
    /// [`Applier::moved`]).
    whole: bool,
}

impl Applier {
    fn dir(&self) -> PathBuf {
        self.retention.join("replicas").join(&self.stream)
    }

    fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> ApplyError + 'a {
        move |source| ApplyError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// After the incoming log could not be read on: whether it is because the stream's
    /// records start again later in the same lineage (the agent went on after records its
    /// process server lost, and every disk is being resent), which a new run applies from
    /// there.
    fn moved(&self, incoming: &Path, lineage: Lineage) -> Option<ApplyError> {
        let now = Lineage::read(incoming).ok()?;
        (now.id == lineage.id && now.since > lineage.since).then(|| ApplyError::Moved {
            stream: self.stream.clone(),
            now,
        })
    }

    /// Applies records as they become durable, until the sender side of `durable` is gone.
    async fn run(
        &mut self,
        mut durable: watch::Receiver<Seq>,
        position: &watch::Sender<Position>,
        run: u64,
        bound: Seq,
        abandon: &AtomicBool,
    ) -> Result<(), ApplyError> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(Self::io("create", &dir))?;
        // Every disk already replicated takes part in every checkpoint from the start, not
        // only once a write reaches it: a quiet disk keeps getting points.
        for entry in std::fs::read_dir(&dir)
            .map_err(Self::io("list", &dir))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "img")
                && let Some(disk) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| DiskName::new(s).ok())
            {
                self.replica(&disk)?;
            }
        }
        // Only records of the replica's lineage are applied to it: until the incoming log is of
        // it (a process server's stale cache may still send an ended one), nothing is.
        let incoming = self.retention.join("incoming").join(&self.stream);
        let mut waited = false;
        let lineage = loop {
            let offered = Lineage::read(&incoming).map_err(Self::io("read", &incoming))?;
            match crate::replica_lineage(&dir).map_err(|why| ApplyError::Record {
                stream: self.stream.clone(),
                why,
            })? {
                Some(id) if id == offered.id => break offered,
                None => {
                    // A replica made by its first records: of their lineage.
                    let path = dir.join(crate::LINEAGE);
                    boomerang_core::write_atomic(&path, offered.id.to_string().as_bytes())
                        .map_err(Self::io("write", &path))?;
                    break offered;
                }
                Some(id) => {
                    if !waited {
                        tracing::info!(stream = %self.stream, replica = id, incoming = %offered, "the incoming log is of another lineage than the replica: nothing is applied until records of the replica's own arrive");
                        waited = true;
                    }
                    if abandon.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let changed =
                        tokio::time::timeout(Duration::from_secs(1), durable.changed()).await;
                    if let Ok(Err(_)) = changed {
                        return Ok(());
                    }
                }
            }
        };
        // The store of the replica's lineage (under a store root, each lineage has its own).
        let store = open_replica_store(&self.retention, &self.stream, Some(self.block_size))
            .await?
            .ok_or_else(|| ApplyError::Record {
                stream: self.stream.clone(),
                why: "its replica store could not be made".into(),
            })?;
        // A run after a failure: the store answers again (it opened, and each disk's newest
        // point reads), so what was reported is over, even before the next point is made.
        let failed_before = self
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&self.stream);
        if failed_before {
            for disk in self.disks.keys() {
                store.latest(disk).await?;
            }
            self.problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.stream);
        }
        // Nothing before the lineage's first record is of it. Records before it that came after
        // the last point may have changed the images: the next point reads them whole. (Also
        // the first point of every lineage an adoption started, whose store is new: a whole
        // read then, either way.)
        let checkpointed = read_applied(&dir.join("applied"));
        let applied = checkpointed.max(Seq(lineage.since.0 - 1));
        self.whole = checkpointed < applied;
        // An earlier run applied records, perhaps past `applied`, but none past `bound`; not
        // of this lineage if this run had to wait for it (`bound` may then be of the old one).
        let earlier = !waited && (dir.join("applied").exists() || has_images(&dir));
        self.replay_until = if earlier { bound } else { Seq(0) };
        if self.replay_until > applied {
            tracing::info!(stream = %self.stream, from = %Seq(applied.0 + 1), to = %self.replay_until, "applying records again after a restart: their marks are points through the incoming log, checkpoints resume after them");
        }
        let mut tail = match LogTail::open(&incoming, Seq(applied.0 + 1)) {
            Err(e) => return Err(self.moved(&incoming, lineage).unwrap_or_else(|| e.into())),
            Ok(tail) => tail,
        };
        position.send_replace(Position { run, applied });
        loop {
            // The replica's lineage ended (a reprotect took the machine away from it): what is
            // left to apply is of no use.
            if abandon.load(Ordering::Relaxed) {
                return Ok(());
            }
            let batch = match tail.next_batch(4 << 20) {
                Err(e) => return Err(self.moved(&incoming, lineage).unwrap_or_else(|| e.into())),
                Ok(batch) => batch,
            };
            let Some(batch) = batch else {
                // (Checked below for each batch: a reprotect may adopt other disks meanwhile.)
                // Wait for more durable records, or look again in a while.
                let changed = tokio::time::timeout(Duration::from_secs(1), durable.changed()).await;
                if let Ok(Err(_)) = changed {
                    return Ok(());
                }
                // Records that start again later may not come before the agent resends the
                // disks, and it waits for this replica's digest at their start: the move is
                // seen without them.
                if let Some(moved) = self.moved(&incoming, lineage) {
                    return Err(moved);
                }
                continue;
            };
            // The replica is still of the lineage this run applies: an adoption replaces the
            // replica (and its lineage) in one rename, and its records must not reach the new
            // one. A new run waits for the new lineage.
            let now = crate::replica_lineage(&dir).map_err(|why| ApplyError::Record {
                stream: self.stream.clone(),
                why,
            })?;
            if now != Some(lineage.id) {
                return Err(ApplyError::Record {
                    stream: self.stream.clone(),
                    why: format!(
                        "the replica is of lineage {} now, not {}: applying starts again",
                        now.map_or("none".to_string(), |l| l.to_string()),
                        lineage.id
                    ),
                });
            }
            let mut at = 0;
            while at < batch.bytes.len() {
                let (record, len) =
                    decode_frame(&batch.bytes[at..]).map_err(|e| ApplyError::Record {
                        stream: self.stream.clone(),
                        why: e.to_string(),
                    })?;
                at += len;
                let seq = record.seq;
                self.apply(&store, record).await?;
                position.send_replace(Position { run, applied: seq });
            }
        }
    }

    fn replica(&mut self, disk: &DiskName) -> Result<&mut Replica, ApplyError> {
        match self.disks.entry(disk.clone()) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let path = image_path(&self.retention, &self.stream, disk);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(Self::io("open", &path))?;
                Ok(v.insert(Replica {
                    path,
                    file,
                    changed: BTreeSet::new(),
                }))
            }
        }
    }

    async fn apply(&mut self, store: &Store, record: Record) -> Result<(), ApplyError> {
        let block = self.block_size;
        if let Op::Mark { kind, time, .. } = record.op {
            self.note_mark(record.seq, kind, time.0);
            if record.seq <= self.replay_until || self.releasing.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Crash marks come every few seconds; a point costs the blocks changed since
            // the last one, so close ones are thinned (app and group marks always count).
            let due = self.last_point.is_none_or(|at| at.elapsed() >= self.every);
            if due || kind != LogMark::Crash {
                self.checkpoint(store, kind, record.seq).await?;
                self.last_point = Some(std::time::Instant::now());
            }
            return Ok(());
        }
        let Some(disk) = record.op.disk().cloned() else {
            return Ok(());
        };
        let r = self.replica(&disk)?;
        if let Some((offset, end)) = write_op(&r.file, &r.path, &record.op)? {
            mark(r, offset, end, block);
        }
        Ok(())
    }

    /// Adds a mark to the stream's index of marks (`marks`: one line per mark, "seq kind
    /// time_ns"), which lists the points between checkpoints. Lines may repeat after a crash.
    fn note_mark(&self, seq: Seq, kind: LogMark, time_ns: u64) {
        let path = marks_path(&self.retention, &self.stream);
        let line = format!("{} {} {time_ns}\n", seq.0, mark_name(kind));
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(stream = %self.stream, path = %path.display(), error = %e, "could not index a mark; it is still a point if a checkpoint was made at it");
        }
    }

    /// Commits every disk as a point at `seq` (a disk that did not change costs a manifest:
    /// every mark is a point an operator can choose), then records `seq` as applied.
    async fn checkpoint(
        &mut self,
        store: &Store,
        kind: LogMark,
        seq: Seq,
    ) -> Result<(), ApplyError> {
        let mark = match kind {
            LogMark::Crash => MarkKind::Crash,
            LogMark::App => MarkKind::App,
            LogMark::Group => MarkKind::Group,
        };
        let options = CommitOptions {
            mark,
            seq: Some(seq),
        };
        for (disk, r) in &mut self.disks {
            let latest = store.latest(disk).await?;
            if latest.as_ref().is_some_and(|p| p.seq == Some(seq)) {
                // Committed before a crash that came before `applied` was written.
                r.changed.clear();
                continue;
            }
            r.file.sync_data().map_err(Self::io("sync", &r.path))?;
            let changed = std::mem::take(&mut r.changed);
            let until = UntilReleased(&self.releasing);
            let committed = if self.whole {
                store.commit_image(disk, &r.path, options, &until).await
            } else {
                store
                    .commit_blocks_with(disk, &r.path, changed, options, &until)
                    .await
            };
            let report = match committed {
                Ok(report) => report,
                // The disks are being handed back: the point would go with the store, and a
                // store that fails meanwhile must not hold the release up. The records go on
                // being applied; `applied` stays at the last point made.
                Err(e) if self.releasing.load(Ordering::Relaxed) => {
                    tracing::info!(stream = %self.stream, %disk, seq = %seq, reason = %e, "checkpoint stopped: the disks are being handed back");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            tracing::info!(stream = %self.stream, %disk, point = %report.point, seq = %seq, "recovery point");
        }
        let path = self.dir().join("applied");
        write_applied(&path, seq).map_err(Self::io("record the applied mark in", &path))?;
        self.whole = false;
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.stream);
        // Applied and committed: the incoming log is kept for its window, then dropped.
        let incoming = self.retention.join("incoming").join(&self.stream);
        match boomerang_wire::cache::release_older(&incoming, seq, self.log_window) {
            Ok(0) => {}
            Ok(_) => {
                if let Err(e) = crate::points::prune_index(&self.retention, &self.stream) {
                    tracing::warn!(stream = %self.stream, error = %boomerang_core::chain(&e), "could not prune the index of marks");
                }
            }
            Err(e) => {
                tracing::warn!(stream = %self.stream, error = %boomerang_core::chain(&e), "could not drop applied incoming segments")
            }
        }
        Ok(())
    }
}

/// Applies a change of a disk to its image `file` at `path`; the byte range it changed.
pub(crate) fn write_op(
    file: &File,
    path: &Path,
    op: &Op,
) -> Result<Option<(u64, u64)>, ApplyError> {
    match op {
        Op::Resize { size, .. } => {
            file.set_len(*size).map_err(Applier::io("resize", path))?;
            Ok(None)
        }
        Op::Write { offset, data, .. } => {
            let end = offset + data.len() as u64;
            grow(file, path, end)?;
            file.write_all_at(data, *offset)
                .map_err(Applier::io("write", path))?;
            Ok(Some((*offset, end)))
        }
        Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } => {
            let end = offset + len;
            grow(file, path, end)?;
            let zeros = vec![0u8; (*len).min(1 << 20) as usize];
            let mut at = *offset;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)
                    .map_err(Applier::io("write", path))?;
                at += n as u64;
            }
            Ok(Some((*offset, end)))
        }
        Op::Mark { .. } => Ok(None),
    }
}

/// Whether `dir` holds a replica image.
fn has_images(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "img"))
    })
}

/// The index of a stream's marks (see `Applier::note_mark`).
pub(crate) fn marks_path(retention: &Path, stream: &str) -> PathBuf {
    retention.join("replicas").join(stream).join("marks")
}

pub(crate) fn mark_name(kind: LogMark) -> &'static str {
    match kind {
        LogMark::Crash => "crash",
        LogMark::App => "app",
        LogMark::Group => "group",
    }
}

fn grow(file: &File, path: &Path, end: u64) -> Result<(), ApplyError> {
    let len = file.metadata().map_err(Applier::io("inspect", path))?.len();
    if end > len {
        // A disk whose size was not announced grows to what is written.
        file.set_len(end).map_err(Applier::io("resize", path))?;
    }
    Ok(())
}

fn mark(r: &mut Replica, offset: u64, end: u64, block: u64) {
    if end > offset {
        r.changed.extend(offset / block..end.div_ceil(block));
    }
}

fn read_applied(path: &Path) -> Seq {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(Seq(0), Seq)
}

fn write_applied(path: &Path, seq: Seq) -> std::io::Result<()> {
    boomerang_core::write_atomic(path, seq.0.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_urls_query_string_is_cut_out_of_an_error() {
        let text = "Error performing PUT https://acct.blob.core.windows.net/c/chunks/ab?sv=2022&sig=SECRET in 5ms - Server returned 503";
        let redacted = super::redact_queries(text);
        assert!(
            !redacted.contains("SECRET") && !redacted.contains("sv="),
            "{redacted}"
        );
        assert!(
            redacted.contains("https://acct.blob.core.windows.net/c/chunks/ab?... in 5ms"),
            "{redacted}"
        );
        assert_eq!(
            super::redact_queries("why? no URL here"),
            "why? no URL here"
        );
    }
}
