//! The process server's cache: per stream, a directory of segment files in the write-log
//! format, holding the records exactly as the agent sent them. A record is acknowledged only
//! once it is durable here.

use std::path::{Path, PathBuf};

use crate::Records;
use boomerang_core::Seq;
use boomerang_core::log::{AppendOutcome, LogError, SegmentWriter, segment_files, segment_name};

/// Size limit of one cache segment.
pub const SEGMENT_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("could not use cache directory {}: {source}; check that the cache volume is mounted and writable", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

impl CacheError {
    /// Whether the volume is full (ENOSPC), which passes once space returns.
    pub fn is_full(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(28)
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// In a stream's cache directory: the lineage its records are of, as `LINEAGE SINCE` (text;
/// absent: lineage 0 since 1).
pub const LINEAGE_FILE: &str = "lineage";

/// The lineage of a stream's records: which replica they are for, and its first sequence
/// number. A reprotect or failback starts a new one, with a higher number; a receiver never
/// takes records of an older lineage than it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub id: u64,
    pub since: Seq,
}

impl Lineage {
    /// A stream's first lineage: what a machine protected from the start writes.
    pub const FIRST: Lineage = Lineage {
        id: 0,
        since: Seq(1),
    };

    /// The lineage of the records in the stream directory `dir`.
    pub fn read(dir: &Path) -> std::io::Result<Lineage> {
        let path = dir.join(LINEAGE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lineage::FIRST),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(id)), Some(Ok(since)), None) if since > 0 => Ok(Lineage {
                id,
                since: Seq(since),
            }),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is damaged ({text:?}): it should hold the lineage and its first sequence number, as \"3 1201\"",
                    path.display()
                ),
            )),
        }
    }

    /// Records `self` as the lineage of the stream directory `dir`, durably.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        boomerang_core::write_atomic(
            &dir.join(LINEAGE_FILE),
            format!("{} {}\n", self.id, self.since.0).as_bytes(),
        )
    }
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lineage {} (from seq {})", self.id, self.since.0)
    }
}

/// One stream's cached records.
pub struct StreamCache {
    dir: PathBuf,
    writer: Option<SegmentWriter>,
    last: Option<Seq>,
    segment_len: u64,
}

impl StreamCache {
    /// Opens (or creates) the cache of `stream` under `root`, cutting a torn tail left by a
    /// crash: what survives is exactly what was durable, and was acknowledged at most.
    pub fn open(root: &Path, stream: &str) -> Result<Self, CacheError> {
        Self::open_with(root, stream, SEGMENT_LEN)
    }

    /// As [`StreamCache::open`], with new segments of `segment_len` bytes at most. Only whole
    /// segments are dropped once forwarded, so a volume must hold a few of them.
    pub fn open_with(root: &Path, stream: &str, segment_len: u64) -> Result<Self, CacheError> {
        let dir = root.join(stream);
        let io = |source| CacheError::Io {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // The stream's directory entry is durable before anything in it is acknowledged.
        std::fs::File::open(root)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        let existing = segment_files(&dir).map_err(io)?;
        let (writer, last) = match existing.last() {
            None => (None, None),
            Some(path) => {
                let (mut writer, recovered) = SegmentWriter::open_append(path)?;
                // What is reported as durable must be: after a failed sync the page cache may
                // hold records the disk never got, so they are synced (or refused) first.
                writer.sync()?;
                if recovered.cut > 0 {
                    tracing::warn!(segment = %path.display(), bytes = recovered.cut, "cut a torn tail left by a crash");
                }
                let last = recovered
                    .last_seq
                    .or_else(|| writer.header().first_seq.0.checked_sub(1).map(Seq));
                (Some(writer), last.filter(|s| s.0 > 0))
            }
        };
        let mut cache = StreamCache {
            dir,
            writer,
            last,
            segment_len,
        };
        if cache.writer.is_none() {
            // A new stream gets its first (empty) segment now, so that a reader of the cache
            // (the sender to the master target, the applier) can follow it from the start.
            cache.writer = Some(cache.new_segment(Seq(1), 0)?);
            std::fs::File::open(&cache.dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| CacheError::Io {
                    dir: cache.dir.clone(),
                    source,
                })?;
        }
        Ok(cache)
    }

    /// The lineage of the records held.
    pub fn lineage(&self) -> Result<Lineage, CacheError> {
        Lineage::read(&self.dir).map_err(|source| CacheError::Io {
            dir: self.dir.clone(),
            source,
        })
    }

    /// Drops every record held (they are of an ended lineage) and takes `lineage` from its
    /// first sequence number on. Crash-safe: the lineage is recorded last, so a cut reset is
    /// done again by the next open of the new lineage.
    pub fn reset(&mut self, lineage: Lineage) -> Result<(), CacheError> {
        let _held = LINEAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let io = |dir: &Path, source| CacheError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        self.writer = None;
        for old in segment_files(&self.dir).map_err(|e| io(&self.dir, e))? {
            std::fs::remove_file(&old).map_err(|e| io(&self.dir, e))?;
        }
        self.last = lineage.since.0.checked_sub(1).filter(|s| *s > 0).map(Seq);
        self.writer = Some(self.new_segment(lineage.since, 0)?);
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        lineage.write(&self.dir).map_err(|e| io(&self.dir, e))
    }

    /// The sequence number the next record must have: one past the last durable record.
    pub fn next_seq(&self) -> Seq {
        Seq(self.last.map_or(1, |s| s.0 + 1))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` (not yet durable: see [`StreamCache::sync`]).
    pub fn append(&mut self, records: &Records) -> Result<(), CacheError> {
        for (seq, frame) in records.frames() {
            let writer = match &mut self.writer {
                Some(w) => w,
                None => self.writer.insert(self.new_segment(seq, frame.len())?),
            };
            if let AppendOutcome::Full = writer.append_frame(seq, frame)? {
                writer.sync()?;
                let writer = self.writer.insert(self.new_segment(seq, frame.len())?);
                if let AppendOutcome::Full = writer.append_frame(seq, frame)? {
                    // A frame of the largest size (16 MiB) fits in an empty segment.
                    return Err(CacheError::Io {
                        dir: self.dir.clone(),
                        source: std::io::Error::other(format!(
                            "record {seq} does not fit in an empty cache segment"
                        )),
                    });
                }
            }
            self.last = Some(seq);
        }
        Ok(())
    }

    /// A new segment from `first`, with room for a frame of `frame` bytes at least.
    fn new_segment(&self, first: Seq, frame: usize) -> Result<SegmentWriter, CacheError> {
        let path = self.dir.join(segment_name(first));
        let len = self.segment_len.max(frame as u64 + 4096);
        Ok(SegmentWriter::create(&path, first, len)?)
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), CacheError> {
        if let Some(w) = &mut self.writer {
            w.sync()?;
        }
        Ok(())
    }
}

/// Held by a reset and by [`release_lineage_through`]: a release decided for one lineage never
/// deletes records of the next (whose sequence numbers may overlap the old one's).
static LINEAGE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// As [`release_through`], only while `dir` holds records of `lineage` (a sender's late ack
/// of an ended lineage releases nothing).
pub fn release_lineage_through(dir: &Path, lineage: Lineage, durable: Seq) -> std::io::Result<u64> {
    let _held = LINEAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if Lineage::read(dir)? != lineage {
        return Ok(0);
    }
    release_through(dir, durable)
}

/// Deletes the segments of the cache directory `dir` whose every record is at or below
/// `durable` (held durable downstream), never the newest; returns the bytes freed.
pub fn release_through(dir: &Path, durable: Seq) -> std::io::Result<u64> {
    release_older(dir, durable, std::time::Duration::ZERO)
}

/// Like [`release_through`], for segments also last written more than `age` ago (a log kept
/// for a window of time after it is applied).
pub fn release_older(dir: &Path, durable: Seq, age: std::time::Duration) -> std::io::Result<u64> {
    let all = segment_files(dir)?;
    let mut freed = 0;
    for pair in all.windows(2) {
        let [old, next] = pair else { continue };
        let Some(next_first) = boomerang_core::log::first_seq_of(next) else {
            break;
        };
        if next_first.0.saturating_sub(1) > durable.0 {
            break;
        }
        let written = std::fs::metadata(old)?.modified()?;
        if written.elapsed().unwrap_or_default() < age {
            break;
        }
        freed += std::fs::metadata(old)?.len();
        std::fs::remove_file(old)?;
    }
    if freed > 0 {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use boomerang_core::log::{Op, Record};
    use boomerang_core::{DiskName, Seq};

    use super::*;

    fn segment(dir: &Path, first: u64, last: u64) {
        let mut w =
            SegmentWriter::create(dir.join(segment_name(Seq(first))), Seq(first), 1 << 20).unwrap();
        for seq in first..=last {
            let record = Record {
                seq: Seq(seq),
                op: Op::Zero {
                    disk: DiskName::new("d").unwrap(),
                    offset: 0,
                    len: 1,
                },
            };
            let _ = w.append(&record).unwrap();
        }
    }

    #[test]
    fn only_whole_old_segments_go_and_never_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        segment(dir.path(), 1, 10);
        segment(dir.path(), 11, 20);
        segment(dir.path(), 21, 25);
        let count = || segment_files(dir.path()).unwrap().len();
        // Too young for a window of an hour.
        assert_eq!(
            release_older(dir.path(), Seq(25), std::time::Duration::from_secs(3600)).unwrap(),
            0
        );
        assert_eq!(count(), 3);
        // Record 15 is durable downstream: the first segment (1..=10) goes, not the second.
        assert!(release_through(dir.path(), Seq(15)).unwrap() > 0);
        assert_eq!(count(), 2);
        // Everything durable: all but the newest.
        release_through(dir.path(), Seq(u64::MAX)).unwrap();
        assert_eq!(count(), 1);
    }
}
