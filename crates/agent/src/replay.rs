//! Replay: applies a write log to a copy of a disk's starting image, up to a mark or a
//! sequence number, giving the disk exactly as it was then.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use boomerang_core::log::{MarkId, Op};
use boomerang_core::{DiskName, Seq};
use serde::Serialize;

use crate::logdir::{LogDirError, read_all};

/// Where a replay stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayTo {
    /// Every record in the log.
    Latest,
    /// Every record before this mark.
    Mark(MarkId),
    /// Every record up to and including this sequence number.
    Seq(Seq),
}

impl std::str::FromStr for ReplayTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a replay target: use latest, mark:ID or seq:N");
        if s == "latest" {
            return Ok(ReplayTo::Latest);
        }
        if let Some(id) = s.strip_prefix("mark:") {
            return id
                .parse()
                .map(|n| ReplayTo::Mark(MarkId(n)))
                .map_err(|_| bad());
        }
        let n = s.strip_prefix("seq:").unwrap_or(s);
        n.parse().map(|n| ReplayTo::Seq(Seq(n))).map_err(|_| bad())
    }
}

/// What a replay applied.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    pub records_applied: u64,
    pub bytes_written: u64,
    pub last_seq: Option<u64>,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogDirError),
    #[error(transparent)]
    Record(#[from] boomerang_core::log::LogError),
    #[error("could not write the replayed image {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("mark {0} is not in the log: list the marks with `boomerang agent log inspect`")]
    NoSuchMark(u64),
    #[error(
        "the log of disk {disk} is incomplete: {blocks} blocks changed after seq {last} are tracked only in {bitmap} (the log reached its cap); replay to an earlier mark or seq:N, or resync the disk"
    )]
    Incomplete {
        disk: String,
        blocks: u64,
        last: u64,
        bitmap: String,
    },
}

/// Copies `base` to `out` and applies the records of `disk` from the log in `log_dir`.
pub fn replay(
    log_dir: &Path,
    disk: &DiskName,
    base: &Path,
    to: ReplayTo,
    out: &Path,
) -> Result<ReplayReport, ReplayError> {
    let io = |source| ReplayError::Io {
        path: out.display().to_string(),
        source,
    };
    std::fs::copy(base, out).map_err(io)?;
    let file = OpenOptions::new().write(true).open(out).map_err(io)?;
    let mut report = ReplayReport {
        size: file.metadata().map_err(io)?.len(),
        ..ReplayReport::default()
    };
    let mut reached = matches!(to, ReplayTo::Latest);
    for record in read_all(log_dir)? {
        let record = record?;
        match to {
            ReplayTo::Seq(s) if record.seq > s => {
                reached = true;
                break;
            }
            ReplayTo::Mark(m) if matches!(record.op, Op::Mark { id, .. } if id == m) => {
                reached = true;
                break;
            }
            _ => {}
        }
        if record.op.disk() != Some(disk) {
            continue;
        }
        match &record.op {
            Op::Write { offset, data, .. } => {
                file.write_all_at(data, *offset).map_err(io)?;
                report.bytes_written += data.len() as u64;
            }
            Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } => {
                let zeros = vec![0u8; (*len).min(1 << 20) as usize];
                let mut at = *offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    file.write_all_at(&zeros[..n], at).map_err(io)?;
                    at += n as u64;
                }
            }
            Op::Resize { size, .. } => {
                file.set_len(*size).map_err(io)?;
                report.size = *size;
            }
            Op::Mark { .. } => {}
        }
        report.records_applied += 1;
        report.last_seq = Some(record.seq.0);
    }
    if let (ReplayTo::Seq(s), false) = (to, reached) {
        tracing::info!(
            seq = s.0,
            "the log ends before the requested sequence number; replayed all of it"
        );
    }
    // Past the end of the log, a dirty bitmap means changes the log does not hold.
    let past_end = to == ReplayTo::Latest || matches!(to, ReplayTo::Seq(_)) && !reached;
    if past_end {
        let bitmap = crate::capture::bitmap_path(log_dir, disk);
        if let Some((_, blocks)) = crate::bitmap::DirtyBitmap::inspect(&bitmap).map_err(io)?
            && blocks > 0
        {
            drop(file);
            let _ = std::fs::remove_file(out);
            return Err(ReplayError::Incomplete {
                disk: disk.to_string(),
                blocks,
                last: report.last_seq.unwrap_or(0),
                bitmap: bitmap.display().to_string(),
            });
        }
    }
    if let (ReplayTo::Mark(m), false) = (to, reached) {
        drop(file);
        let _ = std::fs::remove_file(out);
        return Err(ReplayError::NoSuchMark(m.0));
    }
    file.sync_all().map_err(io)?;
    Ok(report)
}
