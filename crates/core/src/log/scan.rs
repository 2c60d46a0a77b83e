//! Walking the records of a segment, and telling a torn tail from corruption.
//!
//! One implementation serves [`crate::log::decode_segment`] (bytes in memory),
//! [`crate::log::SegmentReader`] and [`crate::log::SegmentWriter::open_append`] (files, read
//! through a bounded window), so all three apply the same rule.

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::record::{
    FRAME_HEADER_LEN, FRAME_OVERHEAD, FrameError, Record, check_order, decode_frame, frame_len,
    next_min_seq, plausible_header,
};
use super::segment::{Evidence, SEGMENT_HEADER_LEN, SegmentEnd};
use crate::ids::Seq;

/// How many bytes the search for a valid record after a damaged one may hash before it gives up
/// and reports corruption rather than guess (see [`Evidence::ScanGaveUp`]).
pub(crate) const SCAN_HASH_BUDGET: u64 = 256 * 1024 * 1024;

/// Random-access bytes of a known length: a slice, or a file read through a window.
pub(crate) trait Source {
    type Error;
    /// The number of bytes; fixed for the life of the source.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; `Ok(false)` when that range is not within `size()`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<bool, Self::Error>;
}

/// Bytes in memory; reading them cannot fail.
pub(crate) struct SliceSource<'a>(pub(crate) &'a [u8]);

impl Source for SliceSource<'_> {
    type Error = Infallible;

    fn size(&self) -> u64 {
        u64::try_from(self.0.len()).unwrap_or(u64::MAX)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<bool, Infallible> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?));
        match range.and_then(|range| self.0.get(range)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Bytes read from a file through a window of this size, so that walking a segment costs one
/// `read` per window rather than per record, and memory stays bounded.
const WINDOW: usize = 256 * 1024;

/// A file, up to the length it had when the source was made.
pub(crate) struct FileSource {
    file: File,
    size: u64,
    window: Vec<u8>,
    window_start: u64,
}

impl FileSource {
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            window: Vec::new(),
            window_start: 0,
        })
    }

    pub(crate) fn into_file(self) -> File {
        self.file
    }
}

impl Source for FileSource {
    type Error = io::Error;

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => return Ok(false),
        }
        if let Some(bytes) = offset
            .checked_sub(self.window_start)
            .and_then(|rel| usize::try_from(rel).ok())
            .and_then(|rel| self.window.get(rel..rel.checked_add(buf.len())?))
        {
            buf.copy_from_slice(bytes);
            return Ok(true);
        }
        self.file.seek(SeekFrom::Start(offset))?;
        if buf.len() >= WINDOW {
            self.file.read_exact(buf)?;
            return Ok(true);
        }
        // `offset + buf.len() <= size`, so the window holds at least `buf.len()` bytes.
        let fill = usize::try_from(self.size - offset).map_or(WINDOW, |left| left.min(WINDOW));
        self.window.clear();
        self.window.resize(fill, 0);
        if let Err(e) = self.file.read_exact(&mut self.window) {
            self.window.clear();
            return Err(e);
        }
        self.window_start = offset;
        match self.window.get(..buf.len()) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// What one step of a walk found.
pub(crate) enum Step {
    /// The next valid record.
    Record(Record),
    /// No more records; why.
    End(SegmentEnd),
}

/// What the bytes at one offset are.
enum FrameRead {
    /// A valid record of `len` bytes.
    Valid { record: Record, len: u64 },
    /// Not a record, and possibly a torn append: incomplete, an untrusted length, or a CRC that
    /// does not match.
    Suspect(FrameError),
    /// A frame whose CRC matches but that breaks a rule: it was written that way, not torn.
    Intact(FrameError),
}

fn read_frame<S: Source>(
    src: &mut S,
    offset: u64,
    frame: &mut Vec<u8>,
) -> Result<FrameRead, S::Error> {
    let available = src.size().saturating_sub(offset);
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !src.read_at(offset, &mut header)? {
        return Ok(FrameRead::Suspect(FrameError::Incomplete {
            needed: missing(FRAME_HEADER_LEN, available),
        }));
    }
    let len = match frame_len(&header) {
        Ok(len) => len,
        Err(e) => return Ok(FrameRead::Suspect(e)),
    };
    // Allocate only what is both under the cap and actually present.
    if u64::try_from(len).map_or(true, |len| len > available) {
        return Ok(FrameRead::Suspect(FrameError::Incomplete {
            needed: missing(len, available),
        }));
    }
    frame.clear();
    frame.resize(len, 0);
    if !src.read_at(offset, frame)? {
        return Ok(FrameRead::Suspect(FrameError::Incomplete {
            needed: missing(len, available),
        }));
    }
    Ok(match decode_frame(frame) {
        Ok((record, len)) => FrameRead::Valid {
            record,
            len: u64::try_from(len).unwrap_or(u64::MAX),
        },
        Err(
            e @ (FrameError::Crc { .. }
            | FrameError::Incomplete { .. }
            | FrameError::TooLong { .. }),
        ) => FrameRead::Suspect(e),
        Err(e) => FrameRead::Intact(e),
    })
}

fn missing(want: usize, available: u64) -> usize {
    let available = usize::try_from(available).unwrap_or(usize::MAX);
    want.saturating_sub(available).max(1)
}

/// A walk over the records of one segment, from just after its header.
pub(crate) struct Scanner {
    pos: u64,
    first: Seq,
    prev: Option<Seq>,
    frame: Vec<u8>,
    budget: u64,
}

impl Scanner {
    /// Starts after the header of a segment whose first sequence number is `first`.
    pub(crate) fn new(first: Seq) -> Self {
        Self {
            pos: SEGMENT_HEADER_LEN as u64,
            first,
            prev: None,
            frame: Vec::new(),
            budget: SCAN_HASH_BUDGET,
        }
    }

    /// The same walk with a different search budget, to test the give-up path cheaply.
    #[cfg(test)]
    pub(crate) fn with_budget(first: Seq, budget: u64) -> Self {
        Self {
            budget,
            ..Self::new(first)
        }
    }

    /// The sequence number of the last valid record so far.
    pub(crate) fn last_seq(&self) -> Option<Seq> {
        self.prev
    }

    /// The next record, or the end of the records. Once it has returned `End`, the walk is over.
    pub(crate) fn step<S: Source>(&mut self, src: &mut S) -> Result<Step, S::Error> {
        let offset = self.pos;
        if offset >= src.size() {
            return Ok(Step::End(SegmentEnd::Clean { len: offset }));
        }
        let end = match read_frame(src, offset, &mut self.frame)? {
            FrameRead::Valid { record, len } => {
                match check_order(record.seq, self.first, self.prev) {
                    Ok(()) => {
                        self.pos = offset.saturating_add(len);
                        self.prev = Some(record.seq);
                        return Ok(Step::Record(record));
                    }
                    Err(cause) => SegmentEnd::Corrupt {
                        offset,
                        cause,
                        evidence: Evidence::IntactFrame,
                    },
                }
            }
            FrameRead::Intact(cause) => SegmentEnd::Corrupt {
                offset,
                cause,
                evidence: Evidence::IntactFrame,
            },
            FrameRead::Suspect(cause) => {
                let min_seq = next_min_seq(self.first, self.prev);
                classify(src, offset, min_seq, cause, &mut self.frame, self.budget)?
            }
        };
        // Stay at the end: a further step reports nothing new.
        self.pos = src.size();
        Ok(Step::End(end))
    }
}

/// Decides whether the damage at `offset` is a torn tail: it is, unless a valid record (one
/// whose sequence number may follow the last valid one) starts at any later byte.
fn classify<S: Source>(
    src: &mut S,
    offset: u64,
    min_seq: Option<Seq>,
    cause: FrameError,
    frame: &mut Vec<u8>,
    mut budget: u64,
) -> Result<SegmentEnd, S::Error> {
    let size = src.size();
    let torn = SegmentEnd::Torn {
        valid_len: offset,
        cut: size.saturating_sub(offset),
        cause: cause.clone(),
    };
    // After `u64::MAX` no record can follow, so nothing later can be valid.
    let Some(min_seq) = min_seq else {
        return Ok(torn);
    };
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut at = offset.saturating_add(1);
    while at.saturating_add(FRAME_OVERHEAD as u64) <= size {
        if src.read_at(at, &mut header)? {
            if let Some(len) = plausible_header(&header, min_seq) {
                let len = u64::try_from(len).unwrap_or(u64::MAX);
                if at.saturating_add(len) <= size {
                    if len > budget {
                        return Ok(SegmentEnd::Corrupt {
                            offset,
                            cause,
                            evidence: Evidence::ScanGaveUp,
                        });
                    }
                    budget -= len;
                    if let FrameRead::Valid { .. } = read_frame(src, at, frame)? {
                        return Ok(SegmentEnd::Corrupt {
                            offset,
                            cause,
                            evidence: Evidence::ValidRecordAt(at),
                        });
                    }
                }
            }
        }
        at += 1;
    }
    Ok(torn)
}
