//! The write log: records, and the segment files that hold them (DESIGN 3.1).
//!
//! A log is a sequence of [`Record`]s, each a sequence number plus one [`Op`]: `Write`, `Zero`,
//! `Trim`, `Mark` or `Resize`. It is stored as segment files of bounded size. The agent's
//! outbound queue, the process server's cache and the master target's incoming log all use this
//! format, and a record's frame holds nothing specific to its position, so a hop forwards the
//! same bytes it received.
//!
//! ```text
//! segment:  | header (48 B) | frame | frame | ... | frame |      <= header.max_len bytes
//! header:   magic "BMRGWLOG" | version u16 = 1 | first_seq | created | max_len | CRC32
//! frame:    | body_len u32 | kind u8 | 0 0 0 | seq u64 | body (body_len B) | CRC32 u32 |
//! ```
//!
//! Integers are little-endian. Disks are named inline by their [`DiskName`](crate::DiskName)
//! (1 + up to 64 bytes per record), so a segment needs no disk table and a record means the same
//! in any segment. Times are nanoseconds since the Unix epoch. The CRC is CRC-32/ISO-HDLC (the
//! zlib/PNG CRC32, via `crc32fast`), not CRC-32C. The byte-by-byte layout is in
//! `docs/formats.md`.
//!
//! Invariants:
//! - sequence numbers strictly increase within a segment, from the header's `first_seq` on;
//! - a body is at most [`MAX_BODY_LEN`] (16 MiB of write data plus its disk and offset): a
//!   longer length read from bytes is refused before anything is allocated;
//! - a writer never lets a segment grow past `max_len`: [`AppendOutcome::Full`] tells the
//!   caller to roll over to a new segment;
//! - a header is written whole (temporary name, fsync, rename, fsync of the directory); records
//!   are appended, and durable once [`SegmentWriter::sync`] returns.
//!
//! **Torn tail or corruption.** A crash during an append leaves a torn tail: a partial frame,
//! a frame whose CRC fails, or garbage such as zeros. Where the records stop being valid, the
//! reader searches every later byte offset for a valid record (its CRC matches and its sequence
//! number may follow the last valid one). None found: a torn tail, which
//! [`SegmentWriter::open_append`] cuts off and a [`SegmentReader`] stops before. One found, or
//! the damaged frame's own CRC matches (it was written wrong, not torn): corruption, an error
//! naming the segment and byte offset, and nothing is cut unless the caller asks
//! ([`Repair::DiscardFromDamage`]). A torn tail is never read as a record (short of a CRC32
//! collision).
//!
//! Concurrency: one [`SegmentWriter`] per segment (the owner of the log directory makes sure);
//! any number of readers, each seeing the file as long as it was when opened.
//!
//! Untrusted bytes: [`check_frame`] (cheap: is a whole frame here, how long) and
//! [`decode_frame`] (parse) for a stream, [`decode_segment`] for a whole segment in memory. They
//! never panic; `fuzz/fuzz_targets/segment_decode.rs` exercises them.

mod dir;
mod error;
mod record;
mod scan;
mod segment;

pub use dir::{Batch, LogTail, TailError, first_seq_of, segment_files, segment_name};
pub use error::LogError;
pub use record::{
    FRAME_HEADER_LEN, FRAME_OVERHEAD, FRAME_TRAILER_LEN, FrameCheck, FrameError, FrameInfo,
    MAX_BODY_LEN, MAX_FRAME_LEN, MAX_WRITE_DATA, MarkId, MarkKind, Op, Record, UnixNanos,
    check_frame, decode_frame, encode_write_head, mark_of, verify_frame,
};
pub use segment::{
    AppendOutcome, DecodedSegment, Evidence, HeaderError, MIN_SEGMENT_LEN, Recovered, Repair,
    SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_VERSION, SegmentEnd, SegmentHeader, SegmentReader,
    SegmentWriter, decode_segment,
};
