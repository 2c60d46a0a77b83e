//! Segment files: a header, then records, of bounded size; written by one
//! [`SegmentWriter`], read by any number of [`SegmentReader`]s.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::LogError;
use super::record::{
    FRAME_OVERHEAD, FrameError, Record, UnixNanos, check_order, encode_write_head,
};
use super::scan::{FileSource, Scanner, SliceSource, Source, Step};
use crate::ids::{DiskName, Seq};

/// The first 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BMRGWLOG";
/// The segment format this build writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// The length of a segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 48;
/// The smallest segment size limit a writer accepts, so that segments hold more than a few
/// records each.
pub const MIN_SEGMENT_LEN: u64 = 4096;

/// Where the header CRC sits: it covers every header byte before it.
const HEADER_CRC_AT: usize = SEGMENT_HEADER_LEN - 4;

/// The fixed facts of a segment, written once when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// No record in the segment has a lower sequence number (the first may have exactly it).
    pub first_seq: Seq,
    /// When the segment was created.
    pub created: UnixNanos,
    /// The size limit, header included, that the writer keeps the file under.
    pub max_len: u64,
}

/// Why a segment header cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The file is shorter than a header.
    #[error(
        "it is {len} bytes long, shorter than the {SEGMENT_HEADER_LEN}-byte segment header; \
         segments are created whole, so it was not made by a Boomerang writer or was cut short"
    )]
    Short { len: u64 },
    /// The file does not start with [`SEGMENT_MAGIC`].
    #[error(
        "it does not start with the segment magic \"BMRGWLOG\"; check the path: this is not a Boomerang write-log segment"
    )]
    BadMagic,
    /// A format version this build does not read.
    #[error(
        "its format version is {found}, and this build reads version {SEGMENT_VERSION} only; \
         read it with the Boomerang release that wrote it"
    )]
    UnsupportedVersion { found: u16 },
    /// The header bytes are not those that were written.
    #[error(
        "its header CRC32 is {stored:#010x} but the header hashes to {computed:#010x}: the header is damaged"
    )]
    Crc { stored: u32, computed: u32 },
    /// Reserved header bytes are set.
    #[error("reserved bytes of its header are not zero")]
    ReservedNotZero,
    /// A size limit under [`MIN_SEGMENT_LEN`].
    #[error("its size limit of {max_len} bytes is under the minimum of {MIN_SEGMENT_LEN} bytes")]
    SizeLimitTooSmall { max_len: u64 },
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_seq.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.created.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.max_len.to_le_bytes());
        let crc = crc32fast::hash(&out[..HEADER_CRC_AT]);
        out[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the header at the start of `bytes`; safe on untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let magic_seen = bytes.len().min(SEGMENT_MAGIC.len());
        if bytes.get(..magic_seen) != SEGMENT_MAGIC.get(..magic_seen) {
            return Err(HeaderError::BadMagic);
        }
        let Some(header) = bytes.first_chunk::<SEGMENT_HEADER_LEN>() else {
            return Err(HeaderError::Short {
                len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            });
        };
        let u64_at = |at: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(le)
        };
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != SEGMENT_VERSION {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let (content, crc) = header
            .split_last_chunk::<4>()
            .ok_or(HeaderError::Short { len: 0 })?;
        let stored = u32::from_le_bytes(*crc);
        let computed = crc32fast::hash(content);
        if stored != computed {
            return Err(HeaderError::Crc { stored, computed });
        }
        if header[10..16]
            .iter()
            .chain(&header[40..44])
            .any(|&b| b != 0)
        {
            return Err(HeaderError::ReservedNotZero);
        }
        let max_len = u64_at(32);
        if max_len < MIN_SEGMENT_LEN {
            return Err(HeaderError::SizeLimitTooSmall { max_len });
        }
        Ok(Self {
            first_seq: Seq(u64_at(16)),
            created: UnixNanos(u64_at(24)),
            max_len,
        })
    }
}

/// What shows that damage is not a torn tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// The damaged frame's CRC matches: its bytes are as written, so it was written wrong (a bad
    /// kind, layout or sequence order), not torn.
    IntactFrame,
    /// A valid record, in sequence, starts at this later byte offset.
    ValidRecordAt(u64),
    /// The search for a later valid record hashed its budget without finishing, so the reader
    /// refuses to guess.
    ScanGaveUp,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Evidence::IntactFrame => {
                f.write_str("the damaged record's CRC matches, so it was written that way")
            }
            Evidence::ValidRecordAt(at) => write!(f, "a valid record follows at byte offset {at}"),
            Evidence::ScanGaveUp => f.write_str("the search for a valid record after it gave up"),
        }
    }
}

/// How the records of a segment end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentEnd {
    /// The last record ends exactly at the end of the segment, `len` bytes in.
    Clean { len: u64 },
    /// The records end at `valid_len`; the `cut` bytes after them are an interrupted append (or
    /// garbage after one) and may be cut off. `cause` is what is wrong at `valid_len`.
    Torn {
        valid_len: u64,
        cut: u64,
        cause: FrameError,
    },
    /// The bytes at `offset` are damaged and `evidence` shows that records may have been
    /// written after them: not safe to cut.
    Corrupt {
        offset: u64,
        cause: FrameError,
        evidence: Evidence,
    },
}

impl SegmentEnd {
    /// Where the last valid record before this end finishes.
    pub fn valid_len(&self) -> u64 {
        match *self {
            SegmentEnd::Clean { len } => len,
            SegmentEnd::Torn { valid_len, .. } => valid_len,
            SegmentEnd::Corrupt { offset, .. } => offset,
        }
    }
}

/// A segment decoded from bytes in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSegment {
    pub header: SegmentHeader,
    /// Every valid record before [`DecodedSegment::end`].
    pub records: Vec<Record>,
    pub end: SegmentEnd,
}

/// Decodes a whole segment held in memory, applying the same torn-tail rule as
/// [`SegmentReader`] and [`SegmentWriter::open_append`].
///
/// Safe on untrusted bytes: it never panics, and allocates at most the input's size for records
/// plus one frame. Damage after the header is reported in [`DecodedSegment::end`], not as an
/// error, so the caller chooses what to do with it.
pub fn decode_segment(bytes: &[u8]) -> Result<DecodedSegment, HeaderError> {
    let header = SegmentHeader::decode(bytes)?;
    let mut src = SliceSource(bytes);
    let mut scanner = Scanner::new(header.first_seq);
    let mut records = Vec::new();
    loop {
        let Ok(step) = scanner.step(&mut src);
        match step {
            Step::Record(record) => records.push(record),
            Step::End(end) => {
                return Ok(DecodedSegment {
                    header,
                    records,
                    end,
                });
            }
        }
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn read_header(src: &mut FileSource, path: &Path) -> Result<SegmentHeader, LogError> {
    let size = src.size().min(SEGMENT_HEADER_LEN as u64);
    let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(SEGMENT_HEADER_LEN)];
    src.read_at(0, &mut bytes)
        .map_err(io_error("read the header of", path))?;
    SegmentHeader::decode(&bytes).map_err(|source| LogError::Header {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the records of a segment file in order, holding at most one record and a 256 KiB
/// window in memory.
///
/// It reads the file as long as it was when opened. The iteration ends (`None`) at the end of
/// the last valid record; [`SegmentReader::end`] then says whether a torn tail follows. Damage
/// that is not a torn tail is yielded once as [`LogError::Corrupt`], then the iteration ends.
pub struct SegmentReader {
    path: PathBuf,
    src: FileSource,
    header: SegmentHeader,
    scanner: Scanner,
    end: Option<SegmentEnd>,
    failed: bool,
}

impl SegmentReader {
    /// Opens a segment and checks its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_error("open", path))?;
        let mut src = FileSource::new(file).map_err(io_error("inspect", path))?;
        let header = read_header(&mut src, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            src,
            header,
            scanner: Scanner::new(header.first_seq),
            end: None,
            failed: false,
        })
    }

    /// The segment's header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the records ended, once the iteration has reached the end.
    pub fn end(&self) -> Option<&SegmentEnd> {
        self.end.as_ref()
    }
}

impl Iterator for SegmentReader {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.end.is_some() || self.failed {
            return None;
        }
        match self.scanner.step(&mut self.src) {
            Ok(Step::Record(record)) => Some(Ok(record)),
            Ok(Step::End(end)) => {
                let error = match &end {
                    SegmentEnd::Corrupt {
                        offset,
                        cause,
                        evidence,
                    } => Some(LogError::Corrupt {
                        path: self.path.clone(),
                        offset: *offset,
                        evidence: *evidence,
                        cause: cause.clone(),
                    }),
                    SegmentEnd::Clean { .. } | SegmentEnd::Torn { .. } => None,
                };
                self.end = Some(end);
                error.map(Err)
            }
            Err(source) => {
                self.failed = true;
                Some(Err(io_error("read", &self.path)(source)))
            }
        }
    }
}

/// What [`SegmentWriter::open_append`] may cut off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Repair {
    /// Cut a torn tail only; damage followed by valid records is an error.
    #[default]
    TornTailOnly,
    /// Cut from the first damaged byte even if valid records follow: for an operator, or a
    /// caller that knows those records are safe elsewhere (e.g. acknowledged downstream).
    DiscardFromDamage,
}

/// What [`SegmentWriter::open_append`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Valid records kept.
    pub records: u64,
    /// The sequence number of the last record kept.
    pub last_seq: Option<Seq>,
    /// The segment's length now: where the next record goes.
    pub len: u64,
    /// Bytes cut off the end (0 if none).
    pub cut: u64,
    /// How the records ended before anything was cut.
    pub end: SegmentEnd,
}

/// The result of an append that did not fail.
#[must_use = "a full segment did not take the record: roll over to a new segment"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The record's frame now starts at byte `offset` of the segment (not yet durable: see
    /// [`SegmentWriter::sync`]).
    Appended { offset: u64 },
    /// The record would take the segment past its size limit; nothing was written. Create the
    /// next segment and append it there.
    Full,
}

/// Appends records to one segment file; the only writer of that file.
///
/// Records are written straight to the file, one `write` each, so a crash of the process loses
/// nothing that `append` returned; [`SegmentWriter::sync`] makes them durable against a crash
/// of the machine. Nothing stops two writers on one file: the owner of the log directory must.
pub struct SegmentWriter {
    path: PathBuf,
    file: File,
    header: SegmentHeader,
    len: u64,
    last_seq: Option<Seq>,
    buf: Vec<u8>,
    poisoned: bool,
}

impl SegmentWriter {
    /// Creates a new, empty segment at `path` whose records start at `first_seq` and whose size
    /// stays under `max_len` bytes (header included).
    ///
    /// The header is written under a temporary name in the same directory, synced, renamed into
    /// place, and the directory synced: after a crash the segment either exists whole or not at
    /// all (a stale temporary file may remain and is replaced next time).
    pub fn create(path: impl AsRef<Path>, first_seq: Seq, max_len: u64) -> Result<Self, LogError> {
        let path = path.as_ref();
        if max_len < MIN_SEGMENT_LEN {
            return Err(LogError::SizeLimitTooSmall { max_len });
        }
        match fs::symlink_metadata(path) {
            Ok(_) => {
                return Err(LogError::AlreadyExists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect", path)(e)),
        }
        let (dir, tmp) = temp_path(path).ok_or_else(|| {
            io_error("name", path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path has no file name",
            ))
        })?;
        let header = SegmentHeader {
            first_seq,
            created: UnixNanos::now(),
            max_len,
        };
        let file = write_new(&tmp, &header.encode()).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error("create", path)(e)
        })?;
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error("rename into place", path)(e)
        })?;
        sync_dir(&dir).map_err(io_error("sync the directory of", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            len: SEGMENT_HEADER_LEN as u64,
            last_seq: None,
            buf: Vec::new(),
            poisoned: false,
        })
    }

    /// Reopens an existing segment to append to it, cutting off a torn tail.
    ///
    /// Damage followed by a valid record is [`LogError::Corrupt`], and the file is left as it
    /// was; see [`SegmentWriter::open_append_with`] to cut it anyway.
    pub fn open_append(path: impl AsRef<Path>) -> Result<(Self, Recovered), LogError> {
        Self::open_append_with(path, Repair::TornTailOnly)
    }

    /// Reopens an existing segment to append to it, cutting off what `repair` allows.
    ///
    /// It reads every record to find where the valid ones end; a cut is `ftruncate` then
    /// `fsync`, so it is durable before any new record is written after it.
    pub fn open_append_with(
        path: impl AsRef<Path>,
        repair: Repair,
    ) -> Result<(Self, Recovered), LogError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error("open", path))?;
        let mut src = FileSource::new(file).map_err(io_error("inspect", path))?;
        let header = read_header(&mut src, path)?;
        let mut scanner = Scanner::new(header.first_seq);
        let mut records = 0u64;
        let end = loop {
            match scanner.step(&mut src).map_err(io_error("read", path))? {
                Step::Record(_) => records += 1,
                Step::End(end) => break end,
            }
        };
        if let (
            SegmentEnd::Corrupt {
                offset,
                cause,
                evidence,
            },
            Repair::TornTailOnly,
        ) = (&end, repair)
        {
            return Err(LogError::Corrupt {
                path: path.to_path_buf(),
                offset: *offset,
                evidence: *evidence,
                cause: cause.clone(),
            });
        }
        let size = src.size();
        let len = end.valid_len();
        let mut file = src.into_file();
        if len < size {
            file.set_len(len)
                .map_err(io_error("cut the torn tail of", path))?;
            file.sync_all().map_err(io_error("sync", path))?;
        }
        file.seek(SeekFrom::Start(len))
            .map_err(io_error("seek in", path))?;
        let last_seq = scanner.last_seq();
        let recovered = Recovered {
            records,
            last_seq,
            len,
            cut: size.saturating_sub(len),
            end,
        };
        let writer = Self {
            path: path.to_path_buf(),
            file,
            header,
            len,
            last_seq,
            buf: Vec::new(),
            poisoned: false,
        };
        Ok((writer, recovered))
    }

    /// Appends one record, unless the segment is full.
    ///
    /// The record's sequence number must be above the last one (and, for the first record, at
    /// least the header's `first_seq`). A write error is undone by cutting the partial record
    /// off; if even that fails the writer refuses further appends ([`LogError::Poisoned`]).
    pub fn append(&mut self, record: &Record) -> Result<AppendOutcome, LogError> {
        self.check_append(record.seq, record.encoded_len())?;
        if self.len.saturating_add(record.encoded_len() as u64) > self.header.max_len {
            return Ok(AppendOutcome::Full);
        }
        let mut buf = self.take_buf();
        record
            .encode(&mut buf)
            .map_err(|e| self.invalid(record.seq, e))?;
        let outcome = self.write_frame(record.seq, &[&buf]);
        self.buf = buf;
        outcome
    }

    /// Appends a `Write` record whose data is borrowed, without copying the data into a frame
    /// first: the same bytes as [`SegmentWriter::append`] of the equivalent record.
    pub fn append_write(
        &mut self,
        seq: Seq,
        disk: &DiskName,
        offset: u64,
        data: &[u8],
    ) -> Result<AppendOutcome, LogError> {
        let frame_len = FRAME_OVERHEAD + 1 + disk.as_str().len() + 8 + data.len();
        self.check_append(seq, frame_len)?;
        if self.len.saturating_add(frame_len as u64) > self.header.max_len {
            return Ok(AppendOutcome::Full);
        }
        let mut head = self.take_buf();
        let trailer = encode_write_head(seq, disk, offset, data, &mut head)
            .map_err(|e| self.invalid(seq, e))?;
        let outcome = self.write_frame(seq, &[&head, data, &trailer]);
        self.buf = head;
        outcome
    }

    /// Appends a record frame exactly as given (one received from another hop, say): `frame`
    /// must be one whole, valid frame whose sequence number is `seq` (see
    /// [`crate::log::decode_frame`]); only its order and size are checked here.
    pub fn append_frame(&mut self, seq: Seq, frame: &[u8]) -> Result<AppendOutcome, LogError> {
        self.check_append(seq, frame.len())?;
        if self.len.saturating_add(frame.len() as u64) > self.header.max_len {
            return Ok(AppendOutcome::Full);
        }
        self.write_frame(seq, &[frame])
    }

    /// Refuses an append that is out of order, too large for any segment, or after a failure
    /// that could not be undone.
    fn check_append(&self, seq: Seq, frame_len: usize) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned {
                path: self.path.clone(),
            });
        }
        check_order(seq, self.header.first_seq, self.last_seq).map_err(|e| self.invalid(seq, e))?;
        let frame_len = u64::try_from(frame_len).unwrap_or(u64::MAX);
        let max_len = self.header.max_len;
        if frame_len > max_len.saturating_sub(SEGMENT_HEADER_LEN as u64) {
            return Err(LogError::RecordTooLarge {
                path: self.path.clone(),
                seq,
                len: frame_len,
                max_len,
            });
        }
        Ok(())
    }

    fn invalid(&self, seq: Seq, source: FrameError) -> LogError {
        LogError::InvalidRecord {
            path: self.path.clone(),
            seq,
            source,
        }
    }

    /// The scratch buffer, emptied; one that grew past 1 MiB is let go rather than pinned.
    fn take_buf(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > 1024 * 1024 {
            buf = Vec::new();
        }
        buf.clear();
        buf
    }

    /// Writes one frame given in parts with as few system calls as the kernel allows. A write
    /// error is undone by cutting the partial frame off.
    fn write_frame(&mut self, seq: Seq, parts: &[&[u8]]) -> Result<AppendOutcome, LogError> {
        let offset = self.len;
        let frame_len: usize = parts.iter().map(|p| p.len()).sum();
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        let mut written = Ok(());
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => {
                    written = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    written = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = written {
            let undone = self
                .file
                .set_len(offset)
                .and_then(|()| self.file.seek(SeekFrom::Start(offset)));
            self.poisoned = undone.is_err();
            return Err(io_error("append to", &self.path)(e));
        }
        self.len = offset + frame_len as u64;
        self.last_seq = Some(seq);
        Ok(AppendOutcome::Appended { offset })
    }

    /// Makes every appended record durable (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io_error("sync", &self.path))
    }

    /// The segment's header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open segment file, for page-cache advice; write through the writer only.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The segment's length in bytes: where the next record goes.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// The sequence number of the last record in the segment.
    pub fn last_seq(&self) -> Option<Seq> {
        self.last_seq
    }
}

/// The directory of `path`, and a hidden temporary name next to it.
fn temp_path(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    Some((dir.clone(), dir.join(tmp)))
}

fn write_new(tmp: &Path, bytes: &[u8]) -> io::Result<File> {
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(file)
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened as files here; NTFS journals the rename itself.
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::ids::DiskName;
    use crate::log::record::tests::arb_records;
    use crate::log::{MarkId, MarkKind, Op};

    /// A directory removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "boomerang-core-log-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).expect("create a test directory");
            Self(dir)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const FIRST: u64 = 100;
    const LIMIT: u64 = 1 << 20;

    fn header() -> SegmentHeader {
        SegmentHeader {
            first_seq: Seq(FIRST),
            created: UnixNanos(1_700_000_000_000_000_000),
            max_len: LIMIT,
        }
    }

    /// A segment's bytes, and where each record's frame starts and ends.
    fn encode_segment(records: &[Record]) -> (Vec<u8>, Vec<(u64, u64)>) {
        let mut bytes = header().encode().to_vec();
        let mut spans = Vec::new();
        for record in records {
            let start = bytes.len() as u64;
            record.encode(&mut bytes).expect("test records are valid");
            spans.push((start, bytes.len() as u64));
        }
        (bytes, spans)
    }

    fn write(seq: u64, disk: &str, data: &[u8]) -> Record {
        Record {
            seq: Seq(seq),
            op: Op::Write {
                disk: DiskName::new(disk).expect("valid"),
                offset: seq * 4096,
                data: data.to_vec(),
            },
        }
    }

    fn mark(seq: u64) -> Record {
        Record {
            seq: Seq(seq),
            op: Op::Mark {
                kind: MarkKind::Crash,
                id: MarkId(seq),
                time: UnixNanos(seq),
            },
        }
    }

    fn some_records() -> Vec<Record> {
        vec![
            write(FIRST, "sda", b"hello"),
            mark(FIRST + 1),
            write(FIRST + 5, "sdb", &[0x5A; 300]),
            Record {
                seq: Seq(FIRST + 6),
                op: Op::Resize {
                    disk: DiskName::new("sda").expect("valid"),
                    size: 1 << 30,
                },
            },
        ]
    }

    fn write_file(path: &Path, records: &[Record]) -> Vec<(u64, u64)> {
        let mut writer = SegmentWriter::create(path, Seq(FIRST), LIMIT).expect("create");
        let mut spans = Vec::new();
        for record in records {
            match writer.append(record).expect("append") {
                AppendOutcome::Appended { offset } => {
                    spans.push((offset, offset + record.encoded_len() as u64));
                }
                AppendOutcome::Full => panic!("the test segment is full"),
            }
        }
        writer.sync().expect("sync");
        spans
    }

    fn read_all(path: &Path) -> (Vec<Record>, Option<SegmentEnd>) {
        let mut reader = SegmentReader::open(path).expect("open for reading");
        let records = reader
            .by_ref()
            .collect::<Result<Vec<_>, _>>()
            .expect("no corruption");
        (records, reader.end().cloned())
    }

    fn edit_file(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = fs::read(path).expect("read");
        edit(&mut bytes);
        fs::write(path, bytes).expect("write");
    }

    #[test]
    fn a_header_has_the_documented_bytes() {
        let bytes = header().encode();
        let mut expected = b"BMRGWLOG".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // version 1, reserved
        expected.extend_from_slice(&FIRST.to_le_bytes());
        expected.extend_from_slice(&1_700_000_000_000_000_000u64.to_le_bytes());
        expected.extend_from_slice(&LIMIT.to_le_bytes());
        expected.extend_from_slice(&[0; 4]); // reserved
        let crc = crc32fast::hash(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(bytes.to_vec(), expected);
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header()));
    }

    #[test]
    fn bad_headers_are_named() {
        let good = header().encode();
        assert_eq!(
            SegmentHeader::decode(&good[..47]),
            Err(HeaderError::Short { len: 47 })
        );
        assert_eq!(
            SegmentHeader::decode(&good[..3]),
            Err(HeaderError::Short { len: 3 })
        );
        assert_eq!(SegmentHeader::decode(b"BMRX"), Err(HeaderError::BadMagic));
        assert_eq!(
            SegmentHeader::decode(b""),
            Err(HeaderError::Short { len: 0 })
        );

        let mut bad = good;
        bad[8] = 2;
        assert_eq!(
            SegmentHeader::decode(&bad),
            Err(HeaderError::UnsupportedVersion { found: 2 })
        );
        let mut bad = good;
        bad[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(HeaderError::Crc { .. })
        ));

        let reseal = |bytes: &mut [u8; SEGMENT_HEADER_LEN]| {
            let crc = crc32fast::hash(&bytes[..HEADER_CRC_AT]);
            bytes[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        };
        let mut bad = good;
        bad[41] = 1;
        reseal(&mut bad);
        assert_eq!(
            SegmentHeader::decode(&bad),
            Err(HeaderError::ReservedNotZero)
        );
        let small = SegmentHeader {
            max_len: MIN_SEGMENT_LEN - 1,
            ..header()
        };
        assert_eq!(
            SegmentHeader::decode(&small.encode()),
            Err(HeaderError::SizeLimitTooSmall {
                max_len: MIN_SEGMENT_LEN - 1
            })
        );
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let records = some_records();
        let spans = write_file(&path, &records[..2]);
        assert_eq!(spans[0].0, SEGMENT_HEADER_LEN as u64);
        assert!(
            !dir.join(".a.seg.tmp").exists(),
            "the temporary name is gone"
        );

        let (mut writer, recovered) = SegmentWriter::open_append(&path).expect("reopen");
        let len = spans[1].1;
        assert_eq!(
            recovered,
            Recovered {
                records: 2,
                last_seq: Some(Seq(FIRST + 1)),
                len,
                cut: 0,
                end: SegmentEnd::Clean { len },
            }
        );
        assert_eq!(writer.size(), len);
        assert_eq!(writer.last_seq(), Some(Seq(FIRST + 1)));
        assert_eq!(writer.header().first_seq, Seq(FIRST));
        for record in &records[2..] {
            assert!(matches!(
                writer.append(record),
                Ok(AppendOutcome::Appended { .. })
            ));
        }
        writer.sync().expect("sync");
        drop(writer);

        let (read, end) = read_all(&path);
        assert_eq!(read, records);
        let len = fs::metadata(&path).expect("stat").len();
        assert_eq!(end, Some(SegmentEnd::Clean { len }));
    }

    #[test]
    fn a_borrowed_write_is_the_same_bytes_as_its_record() {
        let dir = TempDir::new();
        let (owned, borrowed) = (dir.join("owned.seg"), dir.join("borrowed.seg"));
        let records = [
            write(FIRST, "sda", b"hello"),
            write(FIRST + 1, "a-longer-disk-name", &[0xC3; 70_000]),
            write(FIRST + 9, "sdb", b""),
        ];
        write_file(&owned, &records);
        let mut writer = SegmentWriter::create(&borrowed, Seq(FIRST), LIMIT).expect("create");
        for record in &records {
            let Op::Write { disk, offset, data } = &record.op else {
                unreachable!("test records are writes")
            };
            assert!(matches!(
                writer.append_write(record.seq, disk, *offset, data),
                Ok(AppendOutcome::Appended { .. })
            ));
        }
        assert!(
            matches!(
                writer.append_write(Seq(FIRST), &DiskName::new("sda").expect("valid"), 0, b"x"),
                Err(LogError::InvalidRecord {
                    source: FrameError::SeqNotIncreasing { .. },
                    ..
                })
            ),
            "the order is checked as for append"
        );
        drop(writer);
        // Same header apart from the creation time; the same records byte for byte.
        let (a, b) = (fs::read(&owned).unwrap(), fs::read(&borrowed).unwrap());
        assert_eq!(a[SEGMENT_HEADER_LEN..], b[SEGMENT_HEADER_LEN..]);
        assert_eq!(read_all(&borrowed).0, records);
    }

    #[test]
    fn create_refuses_an_existing_segment() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        write_file(&path, &some_records());
        let before = fs::read(&path).expect("read");
        let err = SegmentWriter::create(&path, Seq(1), LIMIT).err();
        assert!(
            matches!(err, Some(LogError::AlreadyExists { .. })),
            "{err:?}"
        );
        assert_eq!(fs::read(&path).expect("read"), before);
        let err = SegmentWriter::create(dir.join("b.seg"), Seq(1), 100).err();
        assert!(
            matches!(err, Some(LogError::SizeLimitTooSmall { max_len: 100 })),
            "{err:?}"
        );
    }

    #[test]
    fn create_replaces_a_stale_temporary_file() {
        let dir = TempDir::new();
        fs::write(dir.join(".a.seg.tmp"), b"left by a crash").expect("write");
        write_file(&dir.join("a.seg"), &some_records());
        assert!(!dir.join(".a.seg.tmp").exists());
        assert_eq!(read_all(&dir.join("a.seg")).0, some_records());
    }

    #[test]
    fn a_segment_never_grows_past_its_limit() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let mut writer = SegmentWriter::create(&path, Seq(1), MIN_SEGMENT_LEN).expect("create");
        let mut seq = 1;
        let mut appended = 0;
        while let AppendOutcome::Appended { .. } = writer
            .append(&write(seq, "sda", &[1; 1000]))
            .expect("append")
        {
            appended += 1;
            seq += 1;
        }
        // Each frame is 1032 bytes: three fit after the 48-byte header, a fourth would not.
        assert_eq!(appended, 3);
        assert!(writer.size() <= MIN_SEGMENT_LEN);
        assert_eq!(fs::metadata(&path).expect("stat").len(), writer.size());
        // A smaller record still fits, with the same sequence number the full one had.
        assert!(matches!(
            writer.append(&mark(seq)),
            Ok(AppendOutcome::Appended { .. })
        ));

        let err = writer.append(&write(seq + 1, "sda", &[1; 5000])).err();
        assert!(
            matches!(
                err,
                Some(LogError::RecordTooLarge {
                    len: 5032,
                    max_len: MIN_SEGMENT_LEN,
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn appends_keep_the_sequence_order() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let mut writer = SegmentWriter::create(&path, Seq(10), LIMIT).expect("create");
        let err = writer.append(&mark(9)).err();
        assert!(
            matches!(
                err,
                Some(LogError::InvalidRecord {
                    source: FrameError::SeqBeforeSegment { .. },
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(matches!(
            writer.append(&mark(10)),
            Ok(AppendOutcome::Appended { .. })
        ));
        let err = writer.append(&mark(10)).err();
        assert!(
            matches!(
                err,
                Some(LogError::InvalidRecord {
                    source: FrameError::SeqNotIncreasing { .. },
                    ..
                })
            ),
            "{err:?}"
        );
        let past_end = Record {
            seq: Seq(11),
            op: Op::Zero {
                disk: DiskName::new("sda").expect("valid"),
                offset: u64::MAX,
                len: 2,
            },
        };
        let err = writer.append(&past_end).err();
        assert!(
            matches!(
                err,
                Some(LogError::InvalidRecord {
                    source: FrameError::RangeOverflow { .. },
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(
            writer.size(),
            SEGMENT_HEADER_LEN as u64 + mark(10).encoded_len() as u64
        );
    }

    #[test]
    fn trailing_zeros_are_a_torn_tail() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let spans = write_file(&path, &some_records());
        edit_file(&path, |bytes| bytes.extend_from_slice(&[0; 8192]));

        let (read, end) = read_all(&path);
        assert_eq!(read, some_records());
        assert!(
            matches!(end, Some(SegmentEnd::Torn { cut: 8192, .. })),
            "{end:?}"
        );

        let (mut writer, recovered) = SegmentWriter::open_append(&path).expect("reopen");
        let valid = spans[3].1;
        assert_eq!((recovered.len, recovered.cut), (valid, 8192));
        assert_eq!(fs::metadata(&path).expect("stat").len(), valid);
        assert!(
            matches!(writer.append(&mark(FIRST + 7)), Ok(AppendOutcome::Appended { offset }) if offset == valid)
        );
        drop(writer);
        let mut expected = some_records();
        expected.push(mark(FIRST + 7));
        assert_eq!(read_all(&path).0, expected);
    }

    #[test]
    fn damage_before_valid_records_is_an_error_naming_the_offset() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let spans = write_file(&path, &some_records());
        let (start, end) = spans[1];
        edit_file(&path, |bytes| bytes[start as usize + 20] ^= 0xFF);
        let before = fs::read(&path).expect("read");

        let err = SegmentWriter::open_append(&path).err();
        match &err {
            Some(LogError::Corrupt {
                offset,
                evidence: Evidence::ValidRecordAt(next),
                cause: FrameError::Crc { .. },
                ..
            }) => assert_eq!((*offset, *next), (start, end)),
            other => panic!("{other:?}"),
        }
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("byte offset {start}")),
            "{message}"
        );
        assert!(message.contains(&format!("byte offset {end}")), "{message}");
        assert_eq!(fs::read(&path).expect("read"), before, "nothing was cut");

        // The reader yields the records before the damage, then the error, then stops.
        let mut reader = SegmentReader::open(&path).expect("open");
        assert_eq!(
            reader.next().and_then(Result::ok),
            Some(some_records()[0].clone())
        );
        assert!(matches!(reader.next(), Some(Err(LogError::Corrupt { .. }))));
        assert!(reader.next().is_none());

        // Asked to, the writer discards everything from the damage on.
        let (writer, recovered) =
            SegmentWriter::open_append_with(&path, Repair::DiscardFromDamage).expect("repair");
        assert_eq!((recovered.records, recovered.len), (1, start));
        assert_eq!(writer.last_seq(), Some(Seq(FIRST)));
        assert_eq!(
            read_all(&path),
            (
                some_records()[..1].to_vec(),
                Some(SegmentEnd::Clean { len: start })
            )
        );
    }

    #[test]
    fn an_intact_but_invalid_last_frame_is_not_cut() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let spans = write_file(&path, &some_records());
        let (start, end) = spans[3];
        edit_file(&path, |bytes| {
            // An unknown kind, with a CRC that matches: a writer wrote this, it is not torn.
            bytes[start as usize + 4] = 77;
            let crc_at = end as usize - 4;
            let crc = crc32fast::hash(&bytes[start as usize..crc_at]);
            bytes[crc_at..end as usize].copy_from_slice(&crc.to_le_bytes());
        });
        let err = SegmentWriter::open_append(&path).err();
        assert!(
            matches!(
                err,
                Some(LogError::Corrupt {
                    offset,
                    evidence: Evidence::IntactFrame,
                    cause: FrameError::UnknownKind(77),
                    ..
                }) if offset == start
            ),
            "{err:?}"
        );
    }

    #[test]
    fn out_of_order_records_are_corruption() {
        let records = [mark(FIRST + 1), mark(FIRST + 1)];
        let (bytes, spans) = encode_segment(&records);
        let decoded = decode_segment(&bytes).expect("header");
        assert_eq!(decoded.records, records[..1]);
        assert_eq!(
            decoded.end,
            SegmentEnd::Corrupt {
                offset: spans[1].0,
                cause: FrameError::SeqNotIncreasing {
                    seq: Seq(FIRST + 1),
                    prev: Seq(FIRST + 1)
                },
                evidence: Evidence::IntactFrame,
            }
        );
        let (bytes, _) = encode_segment(&[mark(FIRST - 1)]);
        assert!(matches!(
            decode_segment(&bytes).map(|d| d.end),
            Ok(SegmentEnd::Corrupt {
                cause: FrameError::SeqBeforeSegment { .. },
                ..
            })
        ));
    }

    #[test]
    fn the_search_after_damage_gives_up_rather_than_guess() {
        let records = some_records();
        let (mut bytes, spans) = encode_segment(&records);
        let (start, _) = spans[1];
        bytes[start as usize + 10] ^= 1;
        let walk = |budget| {
            let mut src = SliceSource(&bytes);
            let mut scanner = crate::log::scan::Scanner::with_budget(Seq(FIRST), budget);
            loop {
                let Ok(step) = scanner.step(&mut src);
                if let Step::End(end) = step {
                    return end;
                }
            }
        };
        // The record after the damaged one is 332 bytes: more than a budget of 100 may hash.
        let end = walk(100);
        assert!(
            matches!(
                end,
                SegmentEnd::Corrupt {
                    offset,
                    cause: FrameError::Crc { .. },
                    evidence: Evidence::ScanGaveUp,
                } if offset == start
            ),
            "{end:?}"
        );
        assert!(matches!(
            walk(10_000),
            SegmentEnd::Corrupt {
                evidence: Evidence::ValidRecordAt(_),
                ..
            }
        ));
    }

    #[test]
    fn a_short_or_foreign_file_is_refused_with_its_path() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        fs::write(&path, b"BMRGWLOG\x01\x00").expect("write");
        let err = SegmentWriter::open_append(&path).err();
        assert!(
            matches!(
                err,
                Some(LogError::Header {
                    source: HeaderError::Short { len: 10 },
                    ..
                })
            ),
            "{err:?}"
        );
        fs::write(&path, b"#!/bin/sh\n").expect("write");
        let err = SegmentReader::open(&path).err();
        assert!(
            matches!(
                err,
                Some(LogError::Header {
                    source: HeaderError::BadMagic,
                    ..
                })
            ),
            "{err:?}"
        );
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(&path.display().to_string()), "{message}");
        let err = SegmentReader::open(dir.join("missing.seg")).err();
        assert!(matches!(err, Some(LogError::Io { .. })), "{err:?}");
    }

    #[test]
    fn a_reader_crosses_window_boundaries_and_large_records() {
        let dir = TempDir::new();
        let path = dir.join("a.seg");
        let records: Vec<Record> = (0..40u64)
            .map(|i| {
                let len = if i % 7 == 3 {
                    300_000
                } else {
                    10_000 + i as usize
                };
                write(FIRST + i, "sda", &vec![i as u8; len])
            })
            .collect();
        let mut writer = SegmentWriter::create(&path, Seq(FIRST), 64 << 20).expect("create");
        for record in &records {
            assert!(matches!(
                writer.append(record),
                Ok(AppendOutcome::Appended { .. })
            ));
        }
        drop(writer);
        let (read, _) = read_all(&path);
        assert_eq!(read, records);
        // Tear the last large record: the scan for a valid record after it reads many windows.
        let size = fs::metadata(&path).expect("stat").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(size - 5))
            .expect("truncate");
        let (_, recovered) = SegmentWriter::open_append(&path).expect("reopen");
        assert_eq!(recovered.records, 39);
        assert_eq!(read_all(&path).0, records[..39]);
    }

    proptest! {
        #[test]
        fn segments_round_trip(records in arb_records(FIRST, 12)) {
            let (bytes, _) = encode_segment(&records);
            let decoded = decode_segment(&bytes);
            prop_assert_eq!(
                decoded,
                Ok(DecodedSegment {
                    header: header(),
                    records,
                    end: SegmentEnd::Clean { len: bytes.len() as u64 },
                })
            );
        }

        #[test]
        fn any_truncation_keeps_exactly_the_whole_records(
            records in arb_records(FIRST, 8),
            cut in any::<prop::sample::Index>(),
        ) {
            let (bytes, spans) = encode_segment(&records);
            let at = SEGMENT_HEADER_LEN + cut.index(bytes.len() - SEGMENT_HEADER_LEN + 1);
            let whole = spans.iter().filter(|(_, end)| *end <= at as u64).count();
            let valid_len = spans[..whole].last().map_or(SEGMENT_HEADER_LEN as u64, |s| s.1);
            let decoded = decode_segment(&bytes[..at]).expect("header is whole");
            prop_assert_eq!(&decoded.records[..], &records[..whole]);
            prop_assert_eq!(decoded.end.valid_len(), valid_len);
            let torn = matches!(decoded.end, SegmentEnd::Torn { cut, .. } if cut == at as u64 - valid_len);
            let clean = valid_len == at as u64 && decoded.end == SegmentEnd::Clean { len: valid_len };
            prop_assert!(torn || clean, "{:?}", decoded.end);
        }

        #[test]
        fn a_truncated_header_is_an_error(records in arb_records(FIRST, 3), at in 0..SEGMENT_HEADER_LEN) {
            let (bytes, _) = encode_segment(&records);
            prop_assert_eq!(decode_segment(&bytes[..at]), Err(HeaderError::Short { len: at as u64 }));
        }

        #[test]
        fn a_changed_byte_in_the_last_record_is_cut(
            records in arb_records(FIRST, 8).prop_filter("a record", |r| !r.is_empty()),
            which in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, spans) = encode_segment(&records);
            let (start, end) = spans[spans.len() - 1];
            let at = start as usize + which.index((end - start) as usize);
            bytes[at] ^= flip;
            let decoded = decode_segment(&bytes).expect("header");
            prop_assert_eq!(&decoded.records[..], &records[..records.len() - 1]);
            let torn = matches!(decoded.end, SegmentEnd::Torn { valid_len, cut, .. } if valid_len == start && cut == end - start);
            prop_assert!(torn, "{:?}", decoded.end);
        }

        #[test]
        fn a_changed_byte_before_valid_records_is_corruption(
            records in arb_records(FIRST, 8).prop_filter("two records", |r| r.len() >= 2),
            victim in any::<prop::sample::Index>(),
            which in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, spans) = encode_segment(&records);
            let i = victim.index(records.len() - 1);
            let (start, end) = spans[i];
            bytes[start as usize + which.index((end - start) as usize)] ^= flip;
            let decoded = decode_segment(&bytes).expect("header");
            prop_assert_eq!(&decoded.records[..], &records[..i]);
            let corrupt = matches!(
                decoded.end,
                SegmentEnd::Corrupt { offset, evidence: Evidence::ValidRecordAt(next), .. }
                    if offset == start && next == end
            );
            prop_assert!(corrupt, "{:?}", decoded.end);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_segment(&bytes);
            let mut with_header = header().encode().to_vec();
            with_header.extend_from_slice(&bytes);
            let decoded = decode_segment(&with_header);
            prop_assert!(decoded.is_ok());
        }

        #[test]
        fn damaged_segments_never_panic_and_keep_a_canonical_prefix(
            records in arb_records(FIRST, 6),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (mut bytes, _) = encode_segment(&records);
            for (at, value) in edits {
                let at = SEGMENT_HEADER_LEN + at.index(bytes.len() + 1 - SEGMENT_HEADER_LEN);
                match bytes.get_mut(at) {
                    Some(byte) => *byte = value,
                    None => bytes.push(value),
                }
            }
            let decoded = decode_segment(&bytes).expect("header untouched");
            // Whatever was accepted re-encodes to exactly the bytes it came from.
            let mut again = header().encode().to_vec();
            for record in &decoded.records {
                record.encode(&mut again).expect("decoded records are valid");
            }
            prop_assert_eq!(&again[..], &bytes[..decoded.end.valid_len() as usize]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn open_append_cuts_any_truncation_to_the_last_whole_record(
            records in arb_records(FIRST, 8),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = TempDir::new();
            let path = dir.join("a.seg");
            let spans = write_file(&path, &records);
            let size = fs::metadata(&path).expect("stat").len();
            let at = SEGMENT_HEADER_LEN as u64 + cut.index((size - SEGMENT_HEADER_LEN as u64 + 1) as usize) as u64;
            OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(at)).expect("truncate");
            let whole = spans.iter().filter(|(_, end)| *end <= at).count();
            let valid_len = spans[..whole].last().map_or(SEGMENT_HEADER_LEN as u64, |s| s.1);

            let (mut writer, recovered) = SegmentWriter::open_append(&path).expect("reopen");
            prop_assert_eq!(recovered.records, whole as u64);
            prop_assert_eq!((recovered.len, recovered.cut), (valid_len, at - valid_len));
            prop_assert_eq!(fs::metadata(&path).expect("stat").len(), valid_len);
            let next = writer.last_seq().map_or(FIRST, |s| s.0 + 1);
            let appended = matches!(writer.append(&mark(next)), Ok(AppendOutcome::Appended { .. }));
            prop_assert!(appended, "appending after the cut failed");
            drop(writer);

            let (read, end) = read_all(&path);
            let mut expected = records[..whole].to_vec();
            expected.push(mark(next));
            prop_assert_eq!(read, expected);
            let clean = matches!(end, Some(SegmentEnd::Clean { .. }));
            prop_assert!(clean, "{:?}", end);
        }

        #[test]
        fn open_append_cuts_a_damaged_last_record(
            records in arb_records(FIRST, 6).prop_filter("a record", |r| !r.is_empty()),
            which in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let dir = TempDir::new();
            let path = dir.join("a.seg");
            let spans = write_file(&path, &records);
            let (start, end) = spans[spans.len() - 1];
            edit_file(&path, |bytes| bytes[start as usize + which.index((end - start) as usize)] ^= flip);

            let (read, reader_end) = read_all(&path);
            prop_assert_eq!(&read[..], &records[..records.len() - 1]);
            let torn = matches!(reader_end, Some(SegmentEnd::Torn { valid_len, .. }) if valid_len == start);
            prop_assert!(torn, "{:?}", reader_end);

            let (_, recovered) = SegmentWriter::open_append(&path).expect("reopen");
            prop_assert_eq!((recovered.len, recovered.cut), (start, end - start));
            prop_assert_eq!(read_all(&path).0, records[..records.len() - 1].to_vec());
        }
    }
}
