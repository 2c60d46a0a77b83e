//! The master target: takes write-log streams from process servers (`boomerang_wire::receive`,
//! records durable in its incoming log before they are acknowledged), applies each stream to
//! replica images of its disks on the retention volume, and at every consistency mark commits
//! the disks that changed into the stream's replica store as a recovery point.
//!
//! ```text
//! process server ──TLS──▶ receiver ─▶ RETENTION/incoming/<stream>/seg-*.log ─▶ Ack
//!                                 └─ on durable ─▶ applier (a thread per stream):
//!        LogTail ─▶ Resize / Write / Zero / Trim ─▶ RETENTION/replicas/<stream>/<disk>.img
//!                └▶ Mark ─▶ fdatasync images ─▶ Store::commit_blocks(changed blocks)
//!                         ─▶ RETENTION/replicas/<stream>/applied = the mark's sequence number
//! ```
//!
//! A recovery point is exactly the disk at its mark: records are applied in log order and the
//! point is committed before any record after the mark is applied. After a crash the applier
//! starts again after the last committed mark; the records after it are applied again (in
//! order, so harmlessly) from the incoming log. Their marks make no checkpoint, though: until
//! the replay has passed every record the earlier run may have applied, an image block can
//! hold a later write. Those marks stay recovery points through the incoming log.

mod apply;
mod digest;
pub mod points;
pub mod recover;
pub mod recoveries;
pub mod retention;
pub mod vhd;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use boomerang_core::log::{UnixNanos, mark_of};
use boomerang_core::{DiskName, Seq};
use boomerang_wire::cache::Lineage;
use boomerang_wire::receive::{Config as ReceiverConfig, Receiver, ServeError};
use boomerang_wire::tls::TlsIdentity;
use boomerang_wire::{MAX_DISKS, Records, Role};
use tokio::sync::watch;

pub use apply::{ApplyError, STORE_ROOT_FILE, StoreRoot, open_replica_store, replica_store};

/// A master target's settings.
pub struct Config {
    pub name: String,
    pub tls: TlsIdentity,
    /// The retention volume: incoming logs, replica images and (by default) replica stores.
    pub retention: PathBuf,
    /// The most disks it attaches, at most [`MAX_DISKS`].
    pub max_disks: usize,
    /// Block size of new replica stores.
    pub block_size: u64,
    /// The least time between two points made at crash-consistent marks; closer marks make
    /// no point of their own (app-consistent marks always do).
    pub point_every: std::time::Duration,
    /// How long the incoming log is kept once applied (DESIGN 3.3's fine-grained window);
    /// then its segments are dropped.
    pub log_window: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "a master target attaches at most {MAX_DISKS} disks; {0} is over that: protect the other machines with a separate master target"
    )]
    TooManyDisks(usize),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// What the master target measures, per machine, for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    streams: Mutex<BTreeMap<String, Rpo>>,
}

/// A metric family: name, help and how to read it.
type RpoFamily = (&'static str, &'static str, fn(&Rpo) -> f64);

#[derive(Default, Clone, Copy)]
struct Rpo {
    /// The last mark durable here, and the seconds from its creation at the agent to then.
    last_mark: u64,
    seconds: f64,
    worst: f64,
}

impl Metrics {
    /// Takes the marks in `records`, durable here now: the RPO is the time from a mark's
    /// creation at the agent (its writes were acknowledged by then) to its durability here.
    fn durable(&self, stream: &str, records: &Records) {
        let now = UnixNanos::now().0;
        let mut all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(stream.to_string()).or_default();
        for (_, frame) in records.frames() {
            if let Some((seq, _, _, time)) = mark_of(frame) {
                let seconds = now.saturating_sub(time.0) as f64 / 1e9;
                entry.last_mark = seq.0;
                entry.seconds = seconds;
                entry.worst = entry.worst.max(seconds);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let families: [RpoFamily; 3] = [
            (
                "boomerang_rpo_seconds",
                "Seconds from the last mark's creation at the agent to its durability here.",
                |r| r.seconds,
            ),
            (
                "boomerang_rpo_worst_seconds",
                "The largest such delay since the master target started.",
                |r| r.worst,
            ),
            (
                "boomerang_last_mark_seq",
                "Sequence number of the last mark durable here.",
                |r| r.last_mark as f64,
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for (stream, r) in all.iter() {
                let _ = writeln!(out, "{name}{{stream=\"{stream}\"}} {}", value(r));
            }
        }
        out
    }
}

/// The streams the incoming log holds records of, and the last record of each.
fn incoming_streams(incoming: &std::path::Path) -> Vec<(String, Seq)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(incoming) else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(stream) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(files) = boomerang_core::log::segment_files(&entry.path()) else {
            continue;
        };
        let Some(newest) = files.last() else { continue };
        let Ok(mut reader) = boomerang_core::log::SegmentReader::open(newest) else {
            continue;
        };
        let mut last = Seq(reader.header().first_seq.0.saturating_sub(1));
        for record in reader.by_ref() {
            match record {
                Ok(r) => last = r.seq,
                Err(_) => break,
            }
        }
        if last.0 > 0 {
            out.push((stream, last));
        }
    }
    out
}

/// Builds the master target's receiver, and the metrics it keeps. Appliers start for the
/// streams the incoming log already holds (what arrived before a restart is applied without
/// waiting for the next record, and digests can be answered), and for new ones as they arrive.
pub fn receiver(config: Config) -> Result<(Arc<Receiver>, Arc<Metrics>), StartError> {
    receiver_with_replicas(config).map(|(r, m, _)| (r, m))
}

/// A master target's receiver, its metrics, and the handle on its replicas.
pub type Started = (Arc<Receiver>, Arc<Metrics>, Arc<Replicas>);

/// [`receiver`], and the handle that changes its replicas from outside their streams.
pub fn receiver_with_replicas(config: Config) -> Result<Started, StartError> {
    if config.max_disks > MAX_DISKS {
        return Err(StartError::TooManyDisks(config.max_disks));
    }
    let appliers: Arc<Mutex<HashMap<String, Applier>>> = Arc::default();
    let retention = config.retention.clone();
    let block_size = config.block_size;
    let every = config.point_every;
    let window = config.log_window;
    let metrics = Arc::new(Metrics::default());
    let seen = metrics.clone();
    let positions: digest::Positions = Arc::default();
    let problems: Problems = Arc::default();
    let settings = ApplierSettings {
        retention: retention.clone(),
        block_size,
        every,
        window,
        positions: positions.clone(),
        problems: problems.clone(),
    };
    for (stream, last) in incoming_streams(&config.retention.join("incoming")) {
        if ended(&config.retention, &stream) {
            continue;
        }
        // Everything the log holds was durable before this process: an earlier one may have
        // applied it.
        let applier = settings.start(&stream, last, last);
        appliers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream, applier);
    }
    let replicas = Arc::new(Replicas {
        retention: config.retention.clone(),
        appliers: appliers.clone(),
        positions: positions.clone(),
        problems: problems.clone(),
        settings: settings.clone(),
    });
    let on_durable = Arc::new(
        move |stream: &str, _disks: &[DiskName], records: &Records| {
            seen.durable(stream, records);
            let seq = records.last_seq();
            let mut all = appliers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(applier) = all.get(stream) {
                let _ = applier.durable.send(seq);
                return;
            }
            // Records of a replica handed back or ended here: kept in the incoming log, not
            // applied to anything. Nor while a reprotect adopts disks as its replica: the
            // next records after it start the applier.
            if ended(&retention, stream) || retention.join("adopting").join(stream).exists() {
                return;
            }
            let before = Seq(records.first_seq().0.saturating_sub(1));
            all.insert(stream.to_string(), settings.start(stream, seq, before));
        },
    );
    // A replica takes the records of its own lineage only: never those of one that ended
    // (a process server's stale cache), nor of a newer one before a reprotect adopted it.
    let replicas_dir = config.retention.join("replicas");
    let on_lineage = Arc::new(move |stream: &str, offered: Lineage| {
        let dir = replicas_dir.join(stream);
        if !dir.exists() {
            // No replica (yet, or any more): the records are kept, applied by none but a new one.
            return Ok(());
        }
        let held = replica_lineage(&dir)?;
        match held {
            Some(id) if id != offered.id => Err(if offered.id < id {
                format!(
                    "the replica of {stream} on this master target is of lineage {id}, and the records sent are of {offered}, which ended: they are not applied (the process server's cache is from before a reprotect or failback; it drops them once the machine's agent sends the new lineage)"
                )
            } else {
                format!(
                    "the replica of {stream} on this master target is of lineage {id}, and the records sent are of {offered}, a newer one: a reprotect must make this master target's disks the replica of that lineage first (boomerang reprotect)"
                )
            }),
            _ => Ok(()),
        }
    });
    let retention = config.retention.clone();
    let on_digest = Arc::new(move |request| {
        Box::pin(digest::answer(
            retention.clone(),
            positions.clone(),
            problems.clone(),
            request,
        )) as boomerang_wire::digest::DigestFuture
    }) as boomerang_wire::digest::OnDigest;
    let receiver = Receiver::new(ReceiverConfig {
        name: config.name,
        role: Role::MasterTarget,
        accepted: vec![Role::ProcessServer],
        own_stream_only: false,
        max_disks: config.max_disks,
        tls: config.tls,
        cache: config.retention.join("incoming"),
        segment_len: boomerang_wire::cache::SEGMENT_LEN,
        on_durable: Some(on_durable),
        on_open: None,
        on_lineage: Some(on_lineage),
        on_reset: None,
        on_digest: Some(on_digest),
    })?;
    Ok((receiver, metrics, replicas))
}

/// What changes a machine's replica from outside its stream: a reprotect makes the machine's
/// own disks at this site its replica images (original location: only the blocks that differ
/// travel), and a failback hands them back.
pub struct Replicas {
    retention: PathBuf,
    appliers: Arc<Mutex<HashMap<String, Applier>>>,
    positions: digest::Positions,
    problems: Problems,
    settings: ApplierSettings,
}

/// Why a replica makes no recovery point now: its applier failed (its store does not
/// answer, its volume is full, ...) and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaProblem {
    pub stream: String,
    /// The last error, as a sentence (it names the object and the store).
    pub error: String,
    /// When the applier first failed, since the last point it made.
    pub since_unix_ms: i64,
    /// Retrying will not mend it: the store refused the credentials or the key, or its
    /// data fails its checks. An operator must act.
    pub lasting: bool,
    /// It is about every store under the master target's store root (credentials, container,
    /// key file), not this replica's alone.
    pub whole_store: bool,
}

/// The problem of each replica that has one.
pub(crate) type Problems = Arc<Mutex<BTreeMap<String, ReplicaProblem>>>;

impl Replicas {
    /// The replicas whose applier fails now, and why.
    pub fn problems(&self) -> Vec<ReplicaProblem> {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stops the applier of `stream`, if one runs, and waits until it has ended: once it has
    /// applied every record received, or at once if `abandon` (what is left to apply is of
    /// no use). The next record of the stream starts a new one. Without `abandon` it is a
    /// release: the applier makes no more points (the replica's store is of no use once the
    /// disks go back), and stops a checkpoint it is making.
    ///
    /// Returns the last record the applier applied and the last one durable here when it was
    /// stopped, if one ran.
    async fn stop_applier(&self, stream: &str, abandon: bool) -> Option<(Seq, Seq)> {
        let (sender, position) = {
            // Both under the appliers lock, as an applier starts (appliers, then positions).
            let mut appliers = self.appliers.lock().unwrap_or_else(|e| e.into_inner());
            let sender = appliers.remove(stream);
            let position = self
                .positions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(stream);
            (sender, position)
        };
        let durable = sender.map(|applier| {
            applier.abandon.store(abandon, Ordering::Relaxed);
            applier.releasing.store(!abandon, Ordering::Relaxed);
            *applier.durable.borrow()
        });
        let mut rx = position?;
        while rx.changed().await.is_ok() {}
        let applied = rx.borrow().applied;
        durable.map(|durable| (applied, durable))
    }

    fn dir(&self, stream: &str) -> PathBuf {
        self.retention.join("replicas").join(stream)
    }

    /// Waits (up to `within`) until the applier of `stream` has applied every record durable
    /// here when called, so that the points listed include every mark received: what a
    /// failover to the latest point serves. False when it did not within `within`.
    pub async fn caught_up(&self, stream: &str, within: std::time::Duration) -> bool {
        let durable = self
            .appliers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .map(|a| *a.durable.borrow());
        let position = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .cloned();
        let (Some(durable), Some(mut position)) = (durable, position) else {
            // No applier: nothing received that is not applied (or nothing to apply to).
            return true;
        };
        matches!(
            tokio::time::timeout(within, position.wait_for(|p| p.applied >= durable)).await,
            Ok(Ok(_))
        )
    }

    /// Makes `disks` (name, path of an existing disk image at this site) the replica images
    /// of `stream`, in place of whatever replica it had here (its points are of a lineage
    /// that ended at a failover). A disk outside the retention volume (the machine's own disk
    /// at its original location) is linked; one on it (a failed-over disk this master target
    /// made) is moved into the replica, so that a later failover makes new targets. The
    /// records of the stream received so far are not applied to them. Called again with the
    /// same disks, after a crash or not, it ends the same.
    pub async fn adopt(
        &self,
        stream: &str,
        disks: &[(DiskName, PathBuf)],
        lineage: u64,
    ) -> Result<(), String> {
        let dir = self.dir(stream);
        let staging = self.retention.join("adopting").join(stream);
        let image = |d: &std::path::Path, disk: &DiskName| d.join(format!("{disk}.img"));
        let done = dir.join(ADOPTED).exists()
            && !staging.exists()
            && replica_lineage(&dir)? == Some(lineage)
            && disks.iter().all(|(disk, path)| {
                let at = image(&dir, disk);
                match std::fs::read_link(&at) {
                    Ok(link) => link == *path,
                    Err(_) => at.is_file() && !path.exists(),
                }
            });
        if done {
            // A crash may have come between the rename and the removal of the tombstones.
            for tombstone in [RELEASED, ENDED] {
                let _ = std::fs::remove_file(dir.with_extension(tombstone));
            }
            return Ok(());
        }
        let io = |what: &str, path: &std::path::Path, e: std::io::Error| {
            format!("could not {what} {}: {e}", path.display())
        };
        let retention = self
            .retention
            .canonicalize()
            .map_err(|e| io("resolve", &self.retention, e))?;
        let mut moves = Vec::new();
        for (disk, path) in disks {
            if !path.is_absolute() {
                return Err(format!(
                    "disk {disk} of {stream} is at a relative path ({}): give an absolute one",
                    path.display()
                ));
            }
            if std::fs::symlink_metadata(image(&staging, disk)).is_ok() {
                continue;
            }
            let real = path.canonicalize().map_err(|e| {
                format!(
                    "disk {disk} of {stream} at {} cannot be the replica here: {e}",
                    path.display()
                )
            })?;
            moves.push((disk.clone(), path.clone(), real.starts_with(&retention)));
        }
        if crate::recover::recovering_machines(&self.retention)
            .iter()
            .any(|m| m == stream || m == crate::recover::ALL)
        {
            return Err(format!(
                "{stream} has a recovery (failover or test failover) on this master target: clean it up or release it first"
            ));
        }
        // Made aside, then put in place of the old replica in one rename. While the staging
        // directory exists no applier starts for the stream (see `on_durable`), so none
        // started after the stop below can see the new replica's images.
        std::fs::create_dir_all(&staging).map_err(|e| io("create", &staging, e))?;
        self.stop_applier(stream, true).await;
        for (disk, path, own) in moves {
            let at = image(&staging, &disk);
            if own {
                std::fs::rename(&path, &at).map_err(|e| io("move", &path, e))?;
            } else {
                std::os::unix::fs::symlink(&path, &at).map_err(|e| io("link", &at, e))?;
            }
        }
        // The replica takes records of `lineage` only: what the incoming log holds of the
        // stream now is of the old one, and is never applied to it. Nothing of the new one is
        // applied yet: the applier starts at the lineage's first record.
        let lineage_file = staging.join(LINEAGE);
        boomerang_core::write_atomic(&lineage_file, lineage.to_string().as_bytes())
            .map_err(|e| io("write", &lineage_file, e))?;
        let applied = staging.join("applied");
        boomerang_core::write_atomic(&applied, b"0").map_err(|e| io("write", &applied, e))?;
        let marker = staging.join(ADOPTED);
        boomerang_core::write_atomic(&marker, b"").map_err(|e| io("write", &marker, e))?;
        // The old replica's store goes once its directory is retired; not when it is of the
        // lineage adopted now (the same store).
        let old_store =
            StoreRoot::store_of(&self.retention, stream, &dir).filter(|(_, old)| *old != lineage);
        retire(&self.retention, &dir).map_err(|e| io("remove the old replica", &dir, e))?;
        StoreRoot::forget(&self.retention, old_store);
        let replicas = self.retention.join("replicas");
        std::fs::create_dir_all(&replicas).map_err(|e| io("create", &replicas, e))?;
        std::fs::rename(&staging, &dir).map_err(|e| io("move", &staging, e))?;
        std::fs::File::open(&replicas)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", &replicas, e))?;
        for tombstone in [RELEASED, ENDED] {
            let _ = std::fs::remove_file(dir.with_extension(tombstone));
        }
        tracing::warn!(%stream, disks = disks.len(), "the machine's own disks here are its replica now");
        Ok(())
    }

    /// Ends the replica of `stream` here (reprotect from this site, once the failed-over
    /// disks are released): its points are of a lineage that ended at the failover, and
    /// would only confuse the machine's recovery points with those of its new replica. Its
    /// applier stops; links to the machine's own disks go, never the disks.
    pub async fn release_lineage(&self, stream: &str) -> Result<(), String> {
        let dir = self.dir(stream);
        // First: no applier starts for the stream again (a restart, a late record).
        let tombstone = dir.with_extension(ENDED);
        boomerang_core::write_atomic(&tombstone, b"")
            .map_err(|e| format!("could not write {}: {e}", tombstone.display()))?;
        self.stop_applier(stream, true).await;
        let old_store = StoreRoot::store_of(&self.retention, stream, &dir);
        retire(&self.retention, &dir)
            .map_err(|e| format!("could not remove {}: {e}", dir.display()))?;
        StoreRoot::forget(&self.retention, old_store);
        Ok(())
    }

    /// Hands the replica images of `stream` back (failback, once its final mark is applied):
    /// its applier stops and its replica here is removed; disks adopted by [`Replicas::adopt`]
    /// stay where they are. Returns the disks and where they are.
    pub async fn release(&self, stream: &str) -> Result<Vec<(String, PathBuf)>, String> {
        let dir = self.dir(stream);
        let released = dir.with_extension(RELEASED);
        if !dir.exists() {
            // Released before: the same answer.
            let text = std::fs::read_to_string(&released)
                .map_err(|_| format!("there is no replica of {stream} here"))?;
            return serde_json::from_str::<Vec<(String, PathBuf)>>(&text)
                .map_err(|e| format!("{} is damaged: {e}", released.display()));
        }
        let mut disks = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| format!("could not list {}: {e}", dir.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(disk) = name.strip_suffix(".img") else {
                continue;
            };
            let path = std::fs::read_link(entry.path()).unwrap_or_else(|_| entry.path());
            disks.push((disk.to_string(), path));
        }
        disks.sort();
        if disks
            .iter()
            .any(|(d, p)| *p == dir.join(format!("{d}.img")))
        {
            return Err(format!(
                "the replica of {stream} here is not the machine's own disks (not adopted at a reprotect): fail over to it instead"
            ));
        }
        if let Some((applied, durable)) = self.stop_applier(stream, false).await
            && applied < durable
        {
            // Records missing from the disks: an applier takes them up again, and the
            // failback is tried again later.
            let why = self
                .problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(stream)
                .map_or_else(|| "its applier stopped".to_string(), |p| p.error.clone());
            let mut appliers = self.appliers.lock().unwrap_or_else(|e| e.into_inner());
            if !appliers.contains_key(stream) {
                // (A record that arrived meanwhile started one already.)
                let applier = self.settings.start(stream, durable, durable);
                appliers.insert(stream.to_string(), applier);
            }
            return Err(format!(
                "the replica of {stream} here applied the records up to {applied} of the {durable} it received ({why}): nothing was handed back; run the failback again once the master target applies the rest"
            ));
        }
        // What was applied is on the disks before they are handed back.
        for (_, path) in &disks {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("could not sync {}: {e}", path.display()))?;
        }
        let text = serde_json::to_string(&disks).map_err(|e| e.to_string())?;
        boomerang_core::write_atomic(&released, text.as_bytes())
            .map_err(|e| format!("could not write {}: {e}", released.display()))?;
        let old_store = StoreRoot::store_of(&self.retention, stream, &dir);
        retire(&self.retention, &dir)
            .map_err(|e| format!("could not remove {}: {e}", dir.display()))?;
        StoreRoot::forget(&self.retention, old_store);
        // Whatever its applier reported is over with the replica.
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(stream);
        tracing::warn!(%stream, "the replica here is handed back to the machine");
        Ok(disks)
    }
}

/// Beside `replicas/<stream>`: the disks a failback handed back (and no applier starts for
/// the stream until a reprotect adopts disks again).
const RELEASED: &str = "released.json";
/// Beside `replicas/<stream>`: the replica's lineage ended here (a reprotect took the machine
/// away); no applier starts for the stream until a reprotect adopts disks again.
const ENDED: &str = "ended";

/// In `replicas/<stream>`: the lineage of the replica (text, the number), which records must
/// be of to be applied to it. Absent: the replica takes the lineage of the first records it
/// gets (a machine protected here from the start).
pub(crate) const LINEAGE: &str = "lineage";

/// The lineage of the replica in `dir`, if it has one yet.
pub(crate) fn replica_lineage(dir: &std::path::Path) -> Result<Option<u64>, String> {
    let path = dir.join(LINEAGE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            format!(
                "{} is damaged ({text:?}): it should hold the replica's lineage, a number; restore it, or reprotect the machine",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("could not read {}: {e}", path.display())),
    }
}

/// Whether the replica of `stream` was handed back or ended here.
fn ended(retention: &std::path::Path, stream: &str) -> bool {
    let dir = retention.join("replicas").join(stream);
    dir.with_extension(RELEASED).exists() || dir.with_extension(ENDED).exists()
}

/// Where directories of the retention volume go to be deleted.
const RETIRED: &str = "retired";

/// Takes `dir` (on the retention volume) out of the way at once and deletes it in the
/// background: deleting a replica's image and store takes seconds per GiB where freed blocks
/// are discarded as they go. Whatever a crash leaves in `RETENTION/retired/` is deleted at the
/// next [`clear_retired`]. A `dir` that does not exist is no error.
pub fn retire(retention: &std::path::Path, dir: &std::path::Path) -> std::io::Result<()> {
    let retired = retention.join(RETIRED);
    std::fs::create_dir_all(&retired)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let to = retired.join(format!("{name}-{}", UnixNanos::now().0));
    match std::fs::rename(dir, &to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    std::fs::File::open(retention.join(RETIRED))?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    std::thread::spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&to) {
            tracing::warn!(dir = %to.display(), error = %e, "could not delete a retired directory; it is tried again at the next start");
        }
    });
    Ok(())
}

/// Deletes, in the background, what [`retire`] left on the retention volume.
pub fn clear_retired(retention: &std::path::Path) {
    let retired = retention.join(RETIRED);
    // Stores of ended replicas under a store root whose deletion a restart cut short.
    for entry in std::fs::read_dir(&retired).into_iter().flatten().flatten() {
        if let Some(location) = apply::forgotten_store(&entry.path()) {
            apply::StoreRoot::destroy_in_background(retention, location, entry.path());
        }
    }
    std::thread::spawn(move || {
        for entry in std::fs::read_dir(&retired).into_iter().flatten().flatten() {
            if entry.path().is_file() {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), error = %e, "could not delete a retired directory");
            }
        }
    });
}

/// A stream's applier, as the receiver and [`Replicas`] reach it.
struct Applier {
    /// The last record durable; the applier ends once this is dropped.
    durable: watch::Sender<Seq>,
    /// Set: the applier ends at once, leaving records unapplied.
    abandon: Arc<AtomicBool>,
    /// Set: the disks are being handed back; the applier applies every record but makes no
    /// more points, and stops a checkpoint it is making.
    releasing: Arc<AtomicBool>,
}

/// What every applier of the master target shares, to start one.
#[derive(Clone)]
struct ApplierSettings {
    retention: PathBuf,
    block_size: u64,
    every: std::time::Duration,
    window: std::time::Duration,
    positions: digest::Positions,
    problems: Problems,
}

impl ApplierSettings {
    /// Starts the applier of `stream` (see [`apply::spawn`]): `durable` is the last record
    /// durable here, `before` the last one an earlier run may have applied.
    fn start(&self, stream: &str, durable: Seq, before: Seq) -> Applier {
        let (tx, rx) = watch::channel(durable);
        let (at, position) = watch::channel(digest::Position::default());
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream.to_string(), position);
        let abandon = Arc::new(AtomicBool::new(false));
        let releasing = Arc::new(AtomicBool::new(false));
        apply::spawn(
            self.retention.clone(),
            stream.to_string(),
            self.block_size,
            self.every,
            self.window,
            rx,
            at,
            before,
            apply::Stops {
                abandon: abandon.clone(),
                releasing: releasing.clone(),
            },
            self.problems.clone(),
        );
        Applier {
            durable: tx,
            abandon,
            releasing,
        }
    }
}

/// In a replica directory: its images are the machine's own disks (links), adopted at a
/// reprotect.
const ADOPTED: &str = "adopted";
