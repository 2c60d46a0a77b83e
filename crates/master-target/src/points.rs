//! Recovery points as log positions (DESIGN 3.3). Checkpoints in the replica store are points
//! of their own; between them, every mark whose records the incoming log still holds is a
//! point too: the disk there is the last checkpoint at or before it, plus the records up to
//! it. So inside the log window (`--log-window-hours`) a machine can be recovered at any
//! mark, not only at the thinned checkpoints.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use boomerang_core::log::{SegmentReader, first_seq_of, segment_files};
use boomerang_core::{DiskName, PointId, Seq};
use boomerang_store::{ManifestCache, NoProgress, Store};
use serde::Serialize;

use crate::apply::{ApplyError, marks_path, write_op};

/// A point of a disk: a checkpoint, or a mark the log can bring a checkpoint to.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ListedPoint {
    /// The mark's sequence number in the machine's write log.
    pub seq: u64,
    /// `crash`, `app` or `group`.
    pub kind: String,
    /// When the mark was made at the agent (nanoseconds since 1970), when known.
    pub time_unix_ns: Option<u64>,
    /// The replica store's point at this mark, if a checkpoint was made there.
    pub checkpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    #[error(
        "no replica store for machine {stream} under {retention}: check --retention and the machine's name"
    )]
    NoStore { stream: String, retention: PathBuf },
    #[error(transparent)]
    Store(#[from] boomerang_store::StoreError),
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the incoming log of {stream}: {why}")]
    Log { stream: String, why: String },
    #[error(
        "disk {disk} of {stream} has no checkpoint at or before seq {seq}: choose a later point (`master-target points`)"
    )]
    TooEarly {
        stream: String,
        disk: DiskName,
        seq: u64,
    },
    #[error(
        "the incoming log of {stream} no longer holds the records from seq {from}: seq {seq} is outside the log window; choose a checkpoint or a later point (`master-target points`)"
    )]
    OutsideWindow { stream: String, from: u64, seq: u64 },
    #[error(
        "the incoming log of {stream} ends at seq {last}, before seq {seq}: that point has not arrived yet"
    )]
    NotYet { stream: String, seq: u64, last: u64 },
    #[error(
        "seq {seq} of disk {disk} of {stream} is not a recovery point (a checkpoint or a mark the log holds): a position between marks may hold a write cut in pieces or a copy half done; choose one from `master-target points`"
    )]
    NotAPoint {
        stream: String,
        disk: DiskName,
        seq: u64,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

fn incoming(retention: &Path, stream: &str) -> PathBuf {
    retention.join("incoming").join(stream)
}

/// The first sequence number the incoming log of `stream` still holds.
fn first_held(retention: &Path, stream: &str) -> Result<Option<Seq>, PointsError> {
    let dir = incoming(retention, stream);
    let files = match segment_files(&dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PointsError::Io { path: dir, source }),
    };
    Ok(files.first().and_then(|f| first_seq_of(f)))
}

/// The marks of the index, by sequence number (repeats after a crash collapse).
fn indexed_marks(
    retention: &Path,
    stream: &str,
) -> Result<BTreeMap<u64, (String, u64)>, PointsError> {
    let path = marks_path(retention, stream);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(PointsError::Io { path, source }),
    };
    let mut marks = BTreeMap::new();
    for line in text.lines() {
        // A line cut short by a crash is skipped: its mark is indexed again when re-applied.
        let mut parts = line.split(' ');
        if let (Some(seq), Some(kind), Some(time), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
            && let (Ok(seq), Ok(time)) = (seq.parse(), time.parse())
        {
            marks.insert(seq, (kind.to_string(), time));
        }
    }
    Ok(marks)
}

/// Drops from the mark index the marks the incoming log no longer holds the records of.
pub(crate) fn prune_index(retention: &Path, stream: &str) -> Result<(), PointsError> {
    let Some(first) = first_held(retention, stream)? else {
        return Ok(());
    };
    let marks = indexed_marks(retention, stream)?;
    let path = marks_path(retention, stream);
    let tmp = path.with_extension("tmp");
    let mut text = String::new();
    for (seq, (kind, time)) in marks.range(first.0..) {
        text.push_str(&format!("{seq} {kind} {time}\n"));
    }
    let io = |source| PointsError::Io {
        path: path.clone(),
        source,
    };
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

pub(crate) async fn open_store(retention: &Path, stream: &str) -> Result<Store, PointsError> {
    crate::apply::open_replica_store(retention, stream, None)
        .await?
        .ok_or_else(|| PointsError::NoStore {
            stream: stream.to_string(),
            retention: retention.to_path_buf(),
        })
}

/// Every point of `disk` of `stream`, oldest first: its checkpoints, and the marks after its
/// first checkpoint whose records the incoming log holds.
pub async fn list(
    retention: &Path,
    stream: &str,
    disk: &DiskName,
) -> Result<Vec<ListedPoint>, PointsError> {
    list_cached(retention, stream, disk, &ManifestCache::default()).await
}

/// [`list`], with the manifests read before kept in `cache`.
pub async fn list_cached(
    retention: &Path,
    stream: &str,
    disk: &DiskName,
    cache: &ManifestCache,
) -> Result<Vec<ListedPoint>, PointsError> {
    let store = open_store(retention, stream).await?;
    let checkpoints = store.points_cached(Some(disk), cache).await?;
    let mut points: BTreeMap<u64, ListedPoint> = BTreeMap::new();
    for p in &checkpoints {
        let Some(seq) = p.seq else { continue };
        points.insert(
            seq.0,
            ListedPoint {
                seq: seq.0,
                kind: format!("{:?}", p.mark).to_lowercase(),
                time_unix_ns: None,
                checkpoint: Some(p.id.to_string()),
            },
        );
    }
    let first_checkpoint = points.keys().next().copied();
    let held = first_held(retention, stream)?;
    for (seq, (kind, time)) in indexed_marks(retention, stream)? {
        let replayable = first_checkpoint.is_some_and(|c| seq > c)
            && held.is_some_and(|h| {
                // The checkpoint before the mark must be within what the log holds.
                let base = points
                    .range(..seq)
                    .rev()
                    .find(|(_, p)| p.checkpoint.is_some());
                base.is_some_and(|(b, _)| b + 1 >= h.0)
            });
        match points.get_mut(&seq) {
            Some(p) => p.time_unix_ns = Some(time),
            None if replayable => {
                points.insert(
                    seq,
                    ListedPoint {
                        seq,
                        kind,
                        time_unix_ns: Some(time),
                        checkpoint: None,
                    },
                );
            }
            None => {}
        }
    }
    Ok(points.into_values().collect())
}

/// Writes `disk` of `stream` as it was at sequence number `seq` to `out` (a raw image): the
/// last checkpoint at or before `seq`, then the incoming log's records of the disk up to
/// `seq`. Returns the checkpoint used and the number of records applied.
pub async fn export_at(
    retention: &Path,
    stream: &str,
    disk: &DiskName,
    seq: u64,
    out: &Path,
) -> Result<(PointId, u64), PointsError> {
    let (store, base) = base_of(retention, stream, disk, seq).await?;
    store.export_raw(&base, out, &NoProgress).await?;
    let file = OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|source| PointsError::Io {
            path: out.to_path_buf(),
            source,
        })?;
    let from = base.seq.map_or(0, |s| s.0) + 1;
    let applied = each_op(retention, stream, disk, from, seq, |op| {
        write_op(&file, out, op)?;
        Ok(())
    })?;
    Ok((base.id, applied))
}

/// The replica store of `stream`, and the checkpoint of `disk` a point at `seq` starts from
/// (the last at or before it); `seq` must be a listed point.
pub(crate) async fn base_of(
    retention: &Path,
    stream: &str,
    disk: &DiskName,
    seq: u64,
) -> Result<(Store, boomerang_store::PointManifest), PointsError> {
    // Only a listed point: anywhere else the disk may be in the middle of a change.
    if !list(retention, stream, disk)
        .await?
        .iter()
        .any(|p| p.seq == seq)
    {
        return Err(PointsError::NotAPoint {
            stream: stream.to_string(),
            disk: disk.clone(),
            seq,
        });
    }
    let store = open_store(retention, stream).await?;
    let base = store
        .points(Some(disk))
        .await?
        .into_iter()
        .filter(|p| p.seq.is_some_and(|s| s.0 <= seq))
        .max_by_key(|p| p.seq)
        .ok_or_else(|| PointsError::TooEarly {
            stream: stream.to_string(),
            disk: disk.clone(),
            seq,
        })?;
    Ok((store, base))
}

/// Calls `f` with every change of `disk` the incoming log of `stream` holds from sequence
/// number `from` through `seq`, in order; returns how many there were.
pub(crate) fn each_op(
    retention: &Path,
    stream: &str,
    disk: &DiskName,
    from: u64,
    seq: u64,
    mut f: impl FnMut(&boomerang_core::log::Op) -> Result<(), PointsError>,
) -> Result<u64, PointsError> {
    if from > seq {
        return Ok(0);
    }
    let held = first_held(retention, stream)?;
    if held.is_none_or(|h| h.0 > from) {
        return Err(PointsError::OutsideWindow {
            stream: stream.to_string(),
            from,
            seq,
        });
    }
    let dir = incoming(retention, stream);
    let bad = |why: String| PointsError::Log {
        stream: stream.to_string(),
        why,
    };
    let files = segment_files(&dir).map_err(|e| bad(e.to_string()))?;
    let mut applied = 0;
    let mut last = 0;
    for (k, path) in files.iter().enumerate() {
        // Segments wholly before `from` are skipped.
        if let Some(next) = files.get(k + 1).and_then(|n| first_seq_of(n))
            && next.0 <= from
        {
            continue;
        }
        for record in SegmentReader::open(path).map_err(|e| bad(e.to_string()))? {
            let record = record.map_err(|e| bad(format!("{}: {e}", path.display())))?;
            last = record.seq.0;
            if record.seq.0 < from {
                continue;
            }
            if record.seq.0 > seq {
                return Ok(applied);
            }
            if record.op.disk() == Some(disk) {
                f(&record.op)?;
                applied += 1;
            }
        }
    }
    if last < seq {
        return Err(PointsError::NotYet {
            stream: stream.to_string(),
            seq,
            last,
        });
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_keeps_the_marks_the_log_still_holds() {
        let dir = std::env::temp_dir().join(format!("boomerang-points-{}", std::process::id()));
        let stream = "web01";
        std::fs::create_dir_all(dir.join("replicas").join(stream)).unwrap();
        let incoming = incoming(&dir, stream);
        std::fs::create_dir_all(&incoming).unwrap();
        let name = boomerang_core::log::segment_name;
        std::fs::write(incoming.join(name(Seq(10))), b"").unwrap();
        std::fs::write(incoming.join(name(Seq(15))), b"").unwrap();
        // Repeats (a re-applied mark) and a line cut short by a crash.
        std::fs::write(
            marks_path(&dir, stream),
            "5 crash 1\n10 app 2\n20 crash 3\n10 app 2\n25 cra",
        )
        .unwrap();
        prune_index(&dir, stream).unwrap();
        let kept = indexed_marks(&dir, stream).unwrap();
        assert_eq!(kept.keys().copied().collect::<Vec<_>>(), [10, 20]);
        assert_eq!(kept[&10], ("app".to_string(), 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// What a master target reports of one disk replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSummary {
    pub stream: String,
    pub disk: String,
    /// Points it can restore the disk to.
    pub points: usize,
    /// The newest: its sequence number, and when its mark was made (nanoseconds since 1970)
    /// when known.
    pub latest: Option<(u64, Option<u64>)>,
    /// Why its points could not be listed now (its store did not answer within the time
    /// given, or failed); `points` and `latest` are then unknown.
    pub error: Option<String>,
}

/// The points of every disk replica on the retention volume, by machine and disk, the
/// manifests read before kept in `cache`. Replicas whose points cannot be read, or not
/// within `within` of the call (all replicas together), say why.
pub async fn summary(
    retention: &Path,
    within: std::time::Duration,
    cache: &ManifestCache,
) -> Vec<ReplicaSummary> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    let Ok(machines) = std::fs::read_dir(retention.join("replicas")) else {
        return out;
    };
    let mut found = Vec::new();
    for machine in machines.flatten() {
        let Some(stream) = machine.file_name().to_str().map(str::to_string) else {
            continue;
        };
        for file in std::fs::read_dir(machine.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "img")
                && let Some(disk) = path.file_stem().and_then(|d| d.to_str())
                && let Ok(disk) = DiskName::new(disk)
            {
                found.push((stream.clone(), disk));
            }
        }
    }
    found.sort();
    for (stream, disk) in found {
        let mut entry = ReplicaSummary {
            stream,
            disk: disk.to_string(),
            points: 0,
            latest: None,
            error: None,
        };
        let listed = list_cached(retention, &entry.stream, &disk, cache);
        match tokio::time::timeout_at(deadline, listed).await {
            Ok(Ok(points)) => {
                entry.latest = points.last().map(|p| (p.seq, p.time_unix_ns));
                entry.points = points.len();
            }
            Ok(Err(PointsError::NoStore { .. })) => {}
            Ok(Err(e)) => {
                let error = boomerang_core::chain(&e).to_string();
                tracing::warn!(stream = %entry.stream, %disk, %error, "could not list the points of a replica");
                entry.error = Some(format!("could not list the points of disk {disk}: {error}"));
            }
            Err(_) => {
                tracing::warn!(stream = %entry.stream, %disk, "listing the points of a replica took too long");
                entry.error = Some(format!(
                    "listing the points of disk {disk} took over {} s: its store answers slowly or not at all",
                    within.as_secs_f64()
                ));
            }
        }
        out.push(entry);
    }
    out
}
