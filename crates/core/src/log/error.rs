//! Errors of segment files: each names the segment's path and, where there is one, the fix.

use std::io;
use std::path::PathBuf;

use super::record::FrameError;
use super::segment::{Evidence, HeaderError, MIN_SEGMENT_LEN};
use crate::ids::Seq;

/// Why a write-log segment could not be created, opened, read or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The operating system refused a file operation.
    #[error("could not {action} write-log segment {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The header is missing, damaged, or of a format this build cannot read.
    #[error("write-log segment {} has an unusable header", path.display())]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    /// Damage that is not a torn tail: cutting it off could drop acknowledged records.
    #[error(
        "write-log segment {} is damaged at byte offset {offset}, and this is not a torn tail \
         ({evidence}), so it was left unchanged: restore the segment from the upstream hop, or, \
         if the records from that offset on are known to be elsewhere, reopen it with \
         Repair::DiscardFromDamage",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        evidence: Evidence,
        #[source]
        cause: FrameError,
    },
    /// `create` found a file at the path already.
    #[error(
        "write-log segment {} already exists; give a new segment a new name, or continue this \
         one with SegmentWriter::open_append",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    /// A size limit too small to be useful.
    #[error(
        "a segment size limit of {max_len} bytes is too small; use at least {MIN_SEGMENT_LEN} bytes"
    )]
    SizeLimitTooSmall { max_len: u64 },
    /// A record that would not fit even in an empty segment, so rolling over cannot help.
    #[error(
        "the record with sequence number {seq} takes {len} bytes, more than write-log segment {} \
         can hold after its header ({max_len} bytes in all); raise the segment size limit",
        path.display()
    )]
    RecordTooLarge {
        path: PathBuf,
        seq: Seq,
        len: u64,
        max_len: u64,
    },
    /// A record that breaks a limit or the sequence order.
    #[error(
        "the record with sequence number {seq} cannot be appended to write-log segment {}",
        path.display()
    )]
    InvalidRecord {
        path: PathBuf,
        seq: Seq,
        #[source]
        source: FrameError,
    },
    /// An append failed half-way and the partial record could not be removed.
    #[error(
        "an earlier append to write-log segment {} failed and its partial record could not be \
         removed; reopen the segment with SegmentWriter::open_append, which cuts it off",
        path.display()
    )]
    Poisoned { path: PathBuf },
}
