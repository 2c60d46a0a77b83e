//! One write-log record, and its frame: the bytes it occupies in a segment.
//!
//! A frame is position-independent (it holds no offset or segment-local field), so the same
//! bytes are valid in every hop's segments. Layout and limits: the [`crate::log`] module docs and
//! `docs/formats.md`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::{DiskName, Seq};

/// Bytes before a record's body: body length (4), kind (1), reserved (3), sequence number (8).
pub const FRAME_HEADER_LEN: usize = 16;
/// Bytes after a record's body: the CRC32 of everything before it in the frame.
pub const FRAME_TRAILER_LEN: usize = 4;
/// Bytes a frame adds to its body.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + FRAME_TRAILER_LEN;
/// The largest `data` one `Write` record may carry (16 MiB); callers split larger writes.
pub const MAX_WRITE_DATA: usize = 16 * 1024 * 1024;
/// The longest disk name, as [`DiskName`] allows.
const MAX_DISK_NAME_LEN: usize = 64;
/// The largest body of any record: a `Write` with a 64-byte disk name and [`MAX_WRITE_DATA`].
///
/// A body length read from bytes is checked against this before anything is allocated.
pub const MAX_BODY_LEN: usize = 1 + MAX_DISK_NAME_LEN + 8 + MAX_WRITE_DATA;
/// The largest frame of any record.
pub const MAX_FRAME_LEN: usize = FRAME_OVERHEAD + MAX_BODY_LEN;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_TRIM: u8 = 3;
const KIND_MARK: u8 = 4;
const KIND_RESIZE: u8 = 5;

const MARK_CRASH: u8 = 1;
const MARK_APP: u8 = 2;
const MARK_GROUP: u8 = 3;

/// The identity of a mark, chosen by whoever inserts it (for a group mark: the coordinator, so
/// every member's log carries the same id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MarkId(pub u64);

impl fmt::Display for MarkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A wall-clock time: nanoseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixNanos(pub u64);

impl UnixNanos {
    /// The current time; a clock before 1970 reads as 0, one past the year 2554 as `u64::MAX`.
    pub fn now() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self(nanos)
    }
}

/// What a mark stands for: which kind of recovery point it makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkKind {
    /// A crash-consistent point, inserted every few seconds.
    Crash,
    /// An application-consistent point, between freeze and thaw hooks.
    App,
    /// A point shared by every machine of a replication group.
    Group,
}

/// What one record records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `data` was written at byte `offset` of `disk`.
    Write {
        disk: DiskName,
        offset: u64,
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` of `disk` now read as zeros.
    Zero {
        disk: DiskName,
        offset: u64,
        len: u64,
    },
    /// `len` bytes at `offset` of `disk` were discarded; they may read as anything.
    Trim {
        disk: DiskName,
        offset: u64,
        len: u64,
    },
    /// A recovery point: every record before it, and none after, is in the point.
    Mark {
        kind: MarkKind,
        id: MarkId,
        time: UnixNanos,
    },
    /// `disk` is now `size` bytes long.
    Resize { disk: DiskName, size: u64 },
}

/// One write-log record: an operation and its place in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Strictly increasing along a log; what every hop acknowledges and resumes from.
    pub seq: Seq,
    /// What happened.
    pub op: Op,
}

/// Why bytes are not a valid record, or a record cannot be encoded. Carries no position: the
/// segment-level [`crate::log::LogError`] adds the path and offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer ends inside the frame.
    #[error("the record frame is incomplete: at least {needed} more bytes are needed")]
    Incomplete { needed: usize },
    /// The length field is over the limit, so it is not trusted and nothing is allocated.
    #[error("the record body claims {len} bytes, more than the limit of {max} bytes")]
    TooLong { len: u64, max: usize },
    /// The frame's bytes are not those that were written.
    #[error("the record's CRC32 is {stored:#010x} but its bytes hash to {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    /// The CRC matches but the kind byte is not one this version knows.
    #[error("the record kind {0} is unknown to this version of Boomerang")]
    UnknownKind(u8),
    /// The CRC matches but the mark kind byte is not one this version knows.
    #[error("the mark kind {0} is unknown to this version of Boomerang")]
    UnknownMarkKind(u8),
    /// The CRC matches but reserved header bytes are set.
    #[error("the reserved bytes of the record header are not zero")]
    ReservedNotZero,
    /// The CRC matches but the body does not have the layout of its kind.
    #[error("the record body is malformed: {0}")]
    BadBody(&'static str),
    /// The CRC matches but the disk name breaks the naming rules.
    #[error("the record names disk {name:?}, which is not a valid disk name")]
    BadDiskName { name: String },
    /// A write larger than one record may carry.
    #[error(
        "write data of {len} bytes is more than the {MAX_WRITE_DATA} bytes one record may carry; split the write"
    )]
    DataTooLong { len: usize },
    /// A byte range that ends past the largest offset a u64 can address.
    #[error("the range of {len} bytes at offset {offset} ends past byte 2^64")]
    RangeOverflow { offset: u64, len: u64 },
    /// A record whose sequence number does not follow the one before it.
    #[error(
        "the record has sequence number {seq}, which does not follow {prev}: sequence numbers must increase"
    )]
    SeqNotIncreasing { seq: Seq, prev: Seq },
    /// A record whose sequence number is below the first one its segment may hold.
    #[error(
        "the record has sequence number {seq}, below the segment's first sequence number {first}"
    )]
    SeqBeforeSegment { seq: Seq, first: Seq },
}

/// The answer of [`check_frame`]: how much of a frame a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCheck {
    /// The buffer ends inside the frame; at least `needed` more bytes are required.
    Incomplete { needed: usize },
    /// The first `len` bytes of the buffer are one whole frame (not yet CRC-checked).
    Complete { len: usize },
}

/// Cheaply tells whether `buf` starts with a whole frame, and how long it is.
///
/// Reads only the length field; it neither hashes nor allocates. A length over
/// [`MAX_BODY_LEN`] is an error, so a caller may allocate `len` bytes after a `Complete`.
pub fn check_frame(buf: &[u8]) -> Result<FrameCheck, FrameError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(FrameCheck::Incomplete {
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    };
    let len = frame_len(header)?;
    Ok(match len.checked_sub(buf.len()) {
        Some(needed) if needed > 0 => FrameCheck::Incomplete { needed },
        _ => FrameCheck::Complete { len },
    })
}

/// The frame length a frame header announces, if within the limit.
pub(crate) fn frame_len(header: &[u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let [a, b, c, d, ..] = *header;
    let body = u32::from_le_bytes([a, b, c, d]);
    match usize::try_from(body) {
        Ok(body) if body <= MAX_BODY_LEN => Ok(FRAME_OVERHEAD + body),
        _ => Err(FrameError::TooLong {
            len: u64::from(body),
            max: MAX_BODY_LEN,
        }),
    }
}

/// Whether a frame header could start a record that may follow `min_seq - 1`: a cheap filter,
/// before hashing, for the search that tells a torn tail from corruption.
pub(crate) fn plausible_header(header: &[u8; FRAME_HEADER_LEN], min_seq: Seq) -> Option<usize> {
    let len = frame_len(header).ok()?;
    let [.., kind, r0, r1, r2, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
    let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let known = (KIND_WRITE..=KIND_RESIZE).contains(&kind);
    (known && [r0, r1, r2] == [0; 3] && seq >= min_seq.0).then_some(len)
}

/// Checks that `seq` may follow `prev` (or, for the first record, start a segment at `first`).
pub(crate) fn check_order(seq: Seq, first: Seq, prev: Option<Seq>) -> Result<(), FrameError> {
    match prev {
        Some(prev) if seq <= prev => Err(FrameError::SeqNotIncreasing { seq, prev }),
        None if seq < first => Err(FrameError::SeqBeforeSegment { seq, first }),
        _ => Ok(()),
    }
}

/// The lowest sequence number that may come next, or `None` when none can.
pub(crate) fn next_min_seq(first: Seq, prev: Option<Seq>) -> Option<Seq> {
    match prev {
        Some(prev) => prev.0.checked_add(1).map(Seq),
        None => Some(first),
    }
}

/// The mark in the frame at the start of `buf`, if it is a valid mark record: a cheap look at
/// a stream for its marks, without decoding (copying) the writes around them.
pub fn mark_of(buf: &[u8]) -> Option<(Seq, MarkKind, MarkId, UnixNanos)> {
    if buf.get(4) != Some(&KIND_MARK) {
        return None;
    }
    match decode_frame(buf).ok()?.0 {
        Record {
            seq,
            op: Op::Mark { kind, id, time },
        } => Some((seq, kind, id, time)),
        _ => None,
    }
}

/// Decodes the frame at the start of `buf` (bytes after it are ignored) and returns the record
/// and the frame's length.
///
/// Safe on untrusted bytes: it never panics and allocates at most the frame's data. The CRC is
/// checked before anything else inside the frame, so any error other than `Incomplete`,
/// `TooLong` and `Crc` means the bytes are exactly as some writer wrote them.
pub fn decode_frame(buf: &[u8]) -> Result<(Record, usize), FrameError> {
    let (kind, seq, body, len) = frame_parts(buf)?;
    let op = decode_body(kind, body, true)?;
    op.validate()?;
    Ok((Record { seq, op }, len))
}

/// What [`verify_frame`] found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub seq: Seq,
    /// The disk the record applies to; `None` for a mark.
    pub disk: Option<DiskName>,
    /// The frame's length.
    pub len: usize,
}

/// Checks the frame at the start of `buf` exactly as [`decode_frame`] does (length, CRC,
/// layout, limits), without copying a write's data: for a hop that keeps the bytes as they
/// came.
pub fn verify_frame(buf: &[u8]) -> Result<FrameInfo, FrameError> {
    let (kind, seq, body, len) = frame_parts(buf)?;
    let op = decode_body(kind, body, false)?;
    op.validate()?;
    if let Op::Write { offset, .. } = &op {
        // The data was left in the frame: check its limits here.
        let data = body.len() - (1 + op.disk().map_or(0, |d| d.as_str().len()) + 8);
        if data > MAX_WRITE_DATA {
            return Err(FrameError::DataTooLong { len: data });
        }
        check_range(*offset, data as u64)?;
    }
    Ok(FrameInfo {
        seq,
        disk: op.disk().cloned(),
        len,
    })
}

/// A whole frame's kind, sequence number, body and length, once its length and CRC hold.
fn frame_parts(buf: &[u8]) -> Result<(u8, Seq, &[u8], usize), FrameError> {
    let len = match check_frame(buf)? {
        FrameCheck::Complete { len } => len,
        FrameCheck::Incomplete { needed } => return Err(FrameError::Incomplete { needed }),
    };
    let frame = buf
        .get(..len)
        .ok_or(FrameError::Incomplete { needed: len })?;
    let (content, trailer) = frame
        .split_last_chunk::<FRAME_TRAILER_LEN>()
        .ok_or(FrameError::Incomplete { needed: len })?;
    let stored = u32::from_le_bytes(*trailer);
    let computed = crc32fast::hash(content);
    if stored != computed {
        return Err(FrameError::Crc { stored, computed });
    }
    let (header, body) = content
        .split_first_chunk::<FRAME_HEADER_LEN>()
        .ok_or(FrameError::Incomplete { needed: len })?;
    let [_, _, _, _, kind, r0, r1, r2, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
    if [r0, r1, r2] != [0; 3] {
        return Err(FrameError::ReservedNotZero);
    }
    let seq = Seq(u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]));
    Ok((kind, seq, body, len))
}

/// Decodes a record body. Without `copy`, a write's data stays in the frame and the `Op`
/// carries none (for [`verify_frame`]).
fn decode_body(kind: u8, body: &[u8], copy: bool) -> Result<Op, FrameError> {
    let mut b = Body(body);
    let op = match kind {
        KIND_WRITE => {
            let disk = b.disk()?;
            let offset = b.u64()?;
            let rest = b.rest();
            Op::Write {
                disk,
                offset,
                data: if copy { rest.to_vec() } else { Vec::new() },
            }
        }
        KIND_ZERO => Op::Zero {
            disk: b.disk()?,
            offset: b.u64()?,
            len: b.u64()?,
        },
        KIND_TRIM => Op::Trim {
            disk: b.disk()?,
            offset: b.u64()?,
            len: b.u64()?,
        },
        KIND_MARK => {
            let kind = match b.u8()? {
                MARK_CRASH => MarkKind::Crash,
                MARK_APP => MarkKind::App,
                MARK_GROUP => MarkKind::Group,
                other => return Err(FrameError::UnknownMarkKind(other)),
            };
            Op::Mark {
                kind,
                id: MarkId(b.u64()?),
                time: UnixNanos(b.u64()?),
            }
        }
        KIND_RESIZE => Op::Resize {
            disk: b.disk()?,
            size: b.u64()?,
        },
        other => return Err(FrameError::UnknownKind(other)),
    };
    b.finish()?;
    Ok(op)
}

/// A cursor over a record body that fails, never panics, when the body ends early.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or(FrameError::BadBody("it ends before its last field"))?;
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        let (&first, tail) = self
            .0
            .split_first()
            .ok_or(FrameError::BadBody("it ends before its last field"))?;
        self.0 = tail;
        Ok(first)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let (head, tail) = self
            .0
            .split_first_chunk::<8>()
            .ok_or(FrameError::BadBody("it ends before its last field"))?;
        self.0 = tail;
        Ok(u64::from_le_bytes(*head))
    }

    fn disk(&mut self) -> Result<DiskName, FrameError> {
        let len = usize::from(self.u8()?);
        if len == 0 || len > MAX_DISK_NAME_LEN {
            return Err(FrameError::BadBody(
                "its disk name is not 1 to 64 bytes long",
            ));
        }
        let raw = self.take(len)?;
        let name = std::str::from_utf8(raw)
            .map_err(|_| FrameError::BadBody("its disk name is not UTF-8"))?;
        DiskName::new(name).map_err(|e| FrameError::BadDiskName { name: e.name })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::BadBody("it has bytes after its last field"))
        }
    }
}

impl Op {
    fn kind_code(&self) -> u8 {
        match self {
            Op::Write { .. } => KIND_WRITE,
            Op::Zero { .. } => KIND_ZERO,
            Op::Trim { .. } => KIND_TRIM,
            Op::Mark { .. } => KIND_MARK,
            Op::Resize { .. } => KIND_RESIZE,
        }
    }

    /// The disk the operation applies to; `None` for a mark, which applies to the whole log.
    pub fn disk(&self) -> Option<&DiskName> {
        match self {
            Op::Write { disk, .. }
            | Op::Zero { disk, .. }
            | Op::Trim { disk, .. }
            | Op::Resize { disk, .. } => Some(disk),
            Op::Mark { .. } => None,
        }
    }

    fn body_len(&self) -> usize {
        let name = |disk: &DiskName| 1 + disk.as_str().len();
        match self {
            Op::Write { disk, data, .. } => name(disk) + 8 + data.len(),
            Op::Zero { disk, .. } | Op::Trim { disk, .. } => name(disk) + 16,
            Op::Mark { .. } => 17,
            Op::Resize { disk, .. } => name(disk) + 8,
        }
    }

    /// Checks the limits that the types alone do not enforce.
    fn validate(&self) -> Result<(), FrameError> {
        if let Some(disk) = self.disk() {
            if disk.as_str().len() > MAX_DISK_NAME_LEN {
                return Err(FrameError::BadDiskName {
                    name: disk.to_string(),
                });
            }
        }
        match self {
            Op::Write { offset, data, .. } => {
                if data.len() > MAX_WRITE_DATA {
                    return Err(FrameError::DataTooLong { len: data.len() });
                }
                let len = u64::try_from(data.len())
                    .map_err(|_| FrameError::DataTooLong { len: data.len() })?;
                check_range(*offset, len)
            }
            Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } => {
                check_range(*offset, *len)
            }
            Op::Mark { .. } | Op::Resize { .. } => Ok(()),
        }
    }
}

fn check_range(offset: u64, len: u64) -> Result<(), FrameError> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(FrameError::RangeOverflow { offset, len }),
    }
}

impl Record {
    /// The length of this record's frame.
    pub fn encoded_len(&self) -> usize {
        FRAME_OVERHEAD + self.op.body_len()
    }

    /// Appends this record's frame to `out` and returns its length.
    ///
    /// Fails, leaving `out` unchanged, if the record breaks a limit (data over
    /// [`MAX_WRITE_DATA`], a range past 2^64).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<usize, FrameError> {
        if let Op::Write { disk, offset, data } = &self.op {
            let start = out.len();
            out.reserve(self.encoded_len());
            let trailer = encode_write_head(self.seq, disk, *offset, data, out)?;
            out.extend_from_slice(data);
            out.extend_from_slice(&trailer);
            return Ok(out.len() - start);
        }
        self.op.validate()?;
        let body_len = self.op.body_len();
        let body_len_le = u32::try_from(body_len)
            .map_err(|_| FrameError::DataTooLong { len: body_len })?
            .to_le_bytes();
        let start = out.len();
        out.reserve(FRAME_OVERHEAD + body_len);
        out.extend_from_slice(&body_len_le);
        out.push(self.op.kind_code());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.seq.0.to_le_bytes());
        match &self.op {
            // Encoded above.
            Op::Write { .. } => {}
            Op::Zero { disk, offset, len } | Op::Trim { disk, offset, len } => {
                put_disk(out, disk);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Op::Mark { kind, id, time } => {
                out.push(match kind {
                    MarkKind::Crash => MARK_CRASH,
                    MarkKind::App => MARK_APP,
                    MarkKind::Group => MARK_GROUP,
                });
                out.extend_from_slice(&id.0.to_le_bytes());
                out.extend_from_slice(&time.0.to_le_bytes());
            }
            Op::Resize { disk, size } => {
                put_disk(out, disk);
                out.extend_from_slice(&size.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out.len() - start)
    }
}

/// Encodes the frame of a `Write` record around data that stays where it is: appends the
/// frame's bytes before the data to `head` and returns the trailer that goes after it. The frame
/// is `head`'s new bytes, then `data`, then the trailer, exactly as [`Record::encode`] writes it.
///
/// Fails, leaving `head` unchanged, on the limits [`Record::encode`] checks.
pub fn encode_write_head(
    seq: Seq,
    disk: &DiskName,
    offset: u64,
    data: &[u8],
    head: &mut Vec<u8>,
) -> Result<[u8; FRAME_TRAILER_LEN], FrameError> {
    if disk.as_str().len() > MAX_DISK_NAME_LEN {
        return Err(FrameError::BadDiskName {
            name: disk.to_string(),
        });
    }
    if data.len() > MAX_WRITE_DATA {
        return Err(FrameError::DataTooLong { len: data.len() });
    }
    check_range(offset, data.len() as u64)?;
    let body_len = 1 + disk.as_str().len() + 8 + data.len();
    // Under MAX_BODY_LEN, checked above.
    let body_len_le = (body_len as u32).to_le_bytes();
    let start = head.len();
    head.extend_from_slice(&body_len_le);
    head.push(KIND_WRITE);
    head.extend_from_slice(&[0; 3]);
    head.extend_from_slice(&seq.0.to_le_bytes());
    put_disk(head, disk);
    head.extend_from_slice(&offset.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[start..]);
    crc.update(data);
    Ok(crc.finalize().to_le_bytes())
}

fn put_disk(out: &mut Vec<u8>, disk: &DiskName) {
    let name = disk.as_str().as_bytes();
    // `validate` has checked the name is at most 64 bytes.
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name);
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn disk(name: &str) -> DiskName {
        DiskName::new(name).expect("test disk names are valid")
    }

    pub(crate) fn arb_disk() -> impl Strategy<Value = DiskName> {
        "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,63}".prop_map(|s| disk(&s))
    }

    pub(crate) fn arb_op() -> impl Strategy<Value = Op> {
        let half = u64::MAX / 2;
        prop_oneof![
            (
                arb_disk(),
                0..=half,
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(disk, offset, data)| Op::Write { disk, offset, data }),
            (arb_disk(), 0..=half, 0..=half).prop_map(|(disk, offset, len)| Op::Zero {
                disk,
                offset,
                len
            }),
            (arb_disk(), 0..=half, 0..=half).prop_map(|(disk, offset, len)| Op::Trim {
                disk,
                offset,
                len
            }),
            (
                prop_oneof![
                    Just(MarkKind::Crash),
                    Just(MarkKind::App),
                    Just(MarkKind::Group)
                ],
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(kind, id, time)| Op::Mark {
                    kind,
                    id: MarkId(id),
                    time: UnixNanos(time)
                }),
            (arb_disk(), any::<u64>()).prop_map(|(disk, size)| Op::Resize { disk, size }),
        ]
    }

    /// Records with strictly increasing sequence numbers starting at `first` or later.
    pub(crate) fn arb_records(first: u64, max: usize) -> impl Strategy<Value = Vec<Record>> {
        proptest::collection::vec((1..1000u64, arb_op()), 0..max).prop_map(move |ops| {
            let mut seq = first;
            ops.into_iter()
                .enumerate()
                .map(|(i, (step, op))| {
                    // The first record may sit exactly at the segment's first sequence number.
                    seq += if i == 0 { step - 1 } else { step };
                    Record { seq: Seq(seq), op }
                })
                .collect()
        })
    }

    fn encode(record: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        record.encode(&mut out).expect("test records are valid");
        out
    }

    /// Re-seals a hand-edited frame so that only the edit, not the CRC, is wrong.
    fn reseal(frame: &mut [u8]) {
        let end = frame.len() - FRAME_TRAILER_LEN;
        let crc = crc32fast::hash(&frame[..end]);
        frame[end..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_write_has_the_documented_bytes() {
        let record = Record {
            seq: Seq(7),
            op: Op::Write {
                disk: disk("sda"),
                offset: 4096,
                data: vec![0xAB, 0xCD],
            },
        };
        let bytes = encode(&record);
        let mut expected = vec![
            14, 0, 0, 0, // body length: 1 + 3 + 8 + 2
            1, 0, 0, 0, // kind Write, reserved
            7, 0, 0, 0, 0, 0, 0, 0, // seq
            3, b's', b'd', b'a', // disk name
            0, 0x10, 0, 0, 0, 0, 0, 0, // offset 4096
            0xAB, 0xCD, // data
        ];
        let crc = crc32fast::hash(&expected);
        assert_eq!(crc, 0xF643_4013, "the example in docs/formats.md");
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(record.encoded_len(), expected.len());
        // crc32fast is CRC-32/ISO-HDLC (zlib's): pin it with its standard check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn every_kind_round_trips() {
        let ops = [
            Op::Write {
                disk: disk("a"),
                offset: 0,
                data: Vec::new(),
            },
            Op::Zero {
                disk: disk("disk-1"),
                offset: 512,
                len: 1 << 20,
            },
            Op::Trim {
                disk: disk("x".repeat(64).as_str()),
                offset: u64::MAX - 1,
                len: 1,
            },
            Op::Mark {
                kind: MarkKind::Group,
                id: MarkId(42),
                time: UnixNanos(1_700_000_000_000_000_000),
            },
            Op::Resize {
                disk: disk("sdb"),
                size: 10 << 30,
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let record = Record {
                seq: Seq(i as u64),
                op,
            };
            let bytes = encode(&record);
            assert_eq!(decode_frame(&bytes), Ok((record.clone(), bytes.len())));
            // Trailing bytes belong to the next frame and are ignored.
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[9; 5]);
            assert_eq!(decode_frame(&longer), Ok((record, bytes.len())));
        }
    }

    #[test]
    fn check_frame_waits_for_every_byte() {
        let bytes = encode(&Record {
            seq: Seq(1),
            op: Op::Resize {
                disk: disk("sda"),
                size: 1,
            },
        });
        for cut in 0..bytes.len() {
            match check_frame(&bytes[..cut]) {
                Ok(FrameCheck::Incomplete { needed }) => {
                    assert!(needed > 0 && needed <= bytes.len() - cut)
                }
                other => panic!("prefix of {cut} bytes: {other:?}"),
            }
            assert!(matches!(
                decode_frame(&bytes[..cut]),
                Err(FrameError::Incomplete { .. })
            ));
        }
        assert_eq!(
            check_frame(&bytes),
            Ok(FrameCheck::Complete { len: bytes.len() })
        );
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            check_frame(&header),
            Err(FrameError::TooLong {
                len: u64::from(u32::MAX),
                max: MAX_BODY_LEN
            })
        );
        let just_over = u32::try_from(MAX_BODY_LEN + 1).expect("fits");
        header[..4].copy_from_slice(&just_over.to_le_bytes());
        assert!(matches!(
            check_frame(&header),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn a_changed_byte_fails_the_crc() {
        let bytes = encode(&Record {
            seq: Seq(3),
            op: Op::Zero {
                disk: disk("sda"),
                offset: 0,
                len: 4096,
            },
        });
        // Skip the length field: changing it changes the frame's extent, tested elsewhere.
        for i in 4..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(
                matches!(decode_frame(&bad), Err(FrameError::Crc { .. })),
                "byte {i}"
            );
        }
    }

    #[test]
    fn intact_but_invalid_frames_are_named() {
        let good = encode(&Record {
            seq: Seq(3),
            op: Op::Resize {
                disk: disk("sda"),
                size: 1,
            },
        });
        let edit = |at: usize, value: u8| {
            let mut bad = good.clone();
            bad[at] = value;
            reseal(&mut bad);
            decode_frame(&bad)
        };
        assert_eq!(edit(4, 9), Err(FrameError::UnknownKind(9)));
        assert_eq!(edit(6, 1), Err(FrameError::ReservedNotZero));
        assert_eq!(
            edit(16, 0),
            Err(FrameError::BadBody(
                "its disk name is not 1 to 64 bytes long"
            ))
        );
        assert_eq!(
            edit(16, 2),
            Err(FrameError::BadBody("it has bytes after its last field"))
        );
        assert_eq!(
            edit(16, 20),
            Err(FrameError::BadBody("it ends before its last field"))
        );
        assert_eq!(
            edit(17, b'/'),
            Err(FrameError::BadDiskName {
                name: "/da".to_string()
            })
        );
        assert_eq!(
            edit(17, 0xFF),
            Err(FrameError::BadBody("its disk name is not UTF-8"))
        );

        let mark = encode(&Record {
            seq: Seq(3),
            op: Op::Mark {
                kind: MarkKind::App,
                id: MarkId(1),
                time: UnixNanos(2),
            },
        });
        let mut bad = mark.clone();
        bad[16] = 0;
        reseal(&mut bad);
        assert_eq!(decode_frame(&bad), Err(FrameError::UnknownMarkKind(0)));
    }

    #[test]
    fn limits_are_enforced_when_encoding() {
        let mut out = vec![1, 2, 3];
        let too_big = Record {
            seq: Seq(1),
            op: Op::Write {
                disk: disk("sda"),
                offset: 0,
                data: vec![0; MAX_WRITE_DATA + 1],
            },
        };
        assert_eq!(
            too_big.encode(&mut out),
            Err(FrameError::DataTooLong {
                len: MAX_WRITE_DATA + 1
            })
        );
        let past_end = Record {
            seq: Seq(1),
            op: Op::Zero {
                disk: disk("sda"),
                offset: u64::MAX,
                len: 1,
            },
        };
        assert_eq!(
            past_end.encode(&mut out),
            Err(FrameError::RangeOverflow {
                offset: u64::MAX,
                len: 1
            })
        );
        assert_eq!(
            out,
            vec![1, 2, 3],
            "a refused record leaves the buffer as it was"
        );

        let largest = Record {
            seq: Seq(1),
            op: Op::Write {
                disk: disk(&"d".repeat(64)),
                offset: 0,
                data: vec![7; MAX_WRITE_DATA],
            },
        };
        let bytes = encode(&largest);
        assert_eq!(bytes.len(), MAX_FRAME_LEN);
        assert_eq!(
            decode_frame(&bytes).map(|(r, n)| (r == largest, n)),
            Ok((true, MAX_FRAME_LEN))
        );
    }

    #[test]
    fn a_range_past_the_end_is_refused_when_decoding() {
        let mut bytes = encode(&Record {
            seq: Seq(1),
            op: Op::Trim {
                disk: disk("s"),
                offset: u64::MAX,
                len: 0,
            },
        });
        // Set len (the last 8 body bytes, before the CRC) to 1.
        let at = bytes.len() - FRAME_TRAILER_LEN - 8;
        bytes[at] = 1;
        reseal(&mut bytes);
        assert_eq!(
            decode_frame(&bytes),
            Err(FrameError::RangeOverflow {
                offset: u64::MAX,
                len: 1
            })
        );
    }

    #[test]
    fn order_rules() {
        assert_eq!(check_order(Seq(5), Seq(5), None), Ok(()));
        assert_eq!(
            check_order(Seq(4), Seq(5), None),
            Err(FrameError::SeqBeforeSegment {
                seq: Seq(4),
                first: Seq(5)
            })
        );
        assert_eq!(check_order(Seq(6), Seq(5), Some(Seq(5))), Ok(()));
        assert_eq!(
            check_order(Seq(5), Seq(0), Some(Seq(5))),
            Err(FrameError::SeqNotIncreasing {
                seq: Seq(5),
                prev: Seq(5)
            })
        );
        assert_eq!(next_min_seq(Seq(3), None), Some(Seq(3)));
        assert_eq!(next_min_seq(Seq(3), Some(Seq(9))), Some(Seq(10)));
        assert_eq!(next_min_seq(Seq(3), Some(Seq(u64::MAX))), None);
    }

    proptest! {
        #[test]
        fn records_round_trip(seq in any::<u64>(), op in arb_op()) {
            let record = Record { seq: Seq(seq), op };
            let bytes = encode(&record);
            prop_assert_eq!(bytes.len(), record.encoded_len());
            prop_assert_eq!(check_frame(&bytes), Ok(FrameCheck::Complete { len: bytes.len() }));
            prop_assert_eq!(decode_frame(&bytes), Ok((record, bytes.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = check_frame(&bytes);
            if let Ok((record, len)) = decode_frame(&bytes) {
                // Whatever decodes re-encodes to the same bytes: the encoding is canonical.
                prop_assert_eq!(&encode(&record)[..], &bytes[..len]);
            }
        }

        #[test]
        fn sealed_frames_with_arbitrary_bodies_never_panic(
            kind in 0u8..7, seq in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let len = u32::try_from(body.len()).expect("small");
            let mut frame = len.to_le_bytes().to_vec();
            frame.extend_from_slice(&[kind, 0, 0, 0]);
            frame.extend_from_slice(&seq.to_le_bytes());
            frame.extend_from_slice(&body);
            frame.extend_from_slice(&[0; 4]);
            reseal(&mut frame);
            if let Ok((record, n)) = decode_frame(&frame) {
                prop_assert_eq!(&encode(&record)[..], &frame[..n]);
            }
            // Verifying without copying takes exactly what decoding takes.
            prop_assert_eq!(
                verify_frame(&frame),
                decode_frame(&frame).map(|(r, len)| FrameInfo {
                    seq: r.seq,
                    disk: r.op.disk().cloned(),
                    len
                })
            );
        }

        #[test]
        fn verifying_agrees_with_decoding(seq in any::<u64>(), op in arb_op()) {
            let record = Record { seq: Seq(seq), op };
            let bytes = encode(&record);
            prop_assert_eq!(
                verify_frame(&bytes),
                Ok(FrameInfo { seq: record.seq, disk: record.op.disk().cloned(), len: bytes.len() })
            );
        }
    }
}
