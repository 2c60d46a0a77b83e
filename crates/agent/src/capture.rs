//! The write splitter: a [`BlockDevice`] that records every change in the write log before
//! applying it to the disk, under one lock so both see the same order.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use boomerang_core::log::{FRAME_OVERHEAD, Op, SegmentReader};
use boomerang_core::{DiskName, Seq};
use boomerang_nbd::{BlockDevice, Extent, FileDevice};

use crate::bitmap::DirtyBitmap;
use crate::logdir::{LogDir, LogDirError};
use crate::replica::SyncLink;

/// The largest write record; longer NBD writes are split (segments hold at least 1 MiB).
pub const RECORD_PIECE: usize = 256 * 1024;
/// The granularity of the initial copy and of digests: blocks of all zeros are not sent.
pub const COPY_BLOCK: usize = boomerang_wire::DIGEST_BLOCK as usize;

/// What the copy downstream holds in the blocks a copy is about to send.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// Nothing: all zeros (a new replica).
    Empty,
    /// Not known: every block is sent, blocks of zeros as zero records.
    Unknown,
    /// The hashes of its blocks from `first_block` on (a digest; see
    /// [`CaptureDevice::track_changes`] for when they can be trusted). Blocks past them are
    /// not known.
    Hashes {
        first_block: u64,
        hashes: &'a [[u8; 32]],
    },
}

/// BLAKE3 of `len` zero bytes (a whole copy block's is kept).
fn zero_block_hash(len: usize) -> [u8; 32] {
    static WHOLE: std::sync::LazyLock<[u8; 32]> =
        std::sync::LazyLock::new(|| *blake3::hash(&[0u8; COPY_BLOCK]).as_bytes());
    if len == COPY_BLOCK {
        *WHOLE
    } else {
        *blake3::hash(&vec![0u8; len]).as_bytes()
    }
}

/// Bytes a copy logged, and bytes it left out because the target holds them already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub logged: u64,
    pub skipped: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, other: Copied) {
        self.logged += other.logged;
        self.skipped += other.skipped;
    }
}

/// A protected disk whose changes go to the write log first (or, once the log is capped, to
/// the disk's dirty-block bitmap).
pub struct CaptureDevice {
    disk: DiskName,
    inner: FileDevice,
    log: Arc<Mutex<LogDir>>,
    bitmap: Mutex<DirtyBitmap>,
    /// Synchronous replication: writes wait for the process server.
    sync: Option<Arc<SyncLink>>,
    /// While a copy compares with a digest: the [`COPY_BLOCK`]s that changes logged since
    /// touched (one bit each).
    touched: Mutex<Option<Vec<u64>>>,
    /// Bytes the machine wrote since the agent started (for its write rate).
    written: std::sync::atomic::AtomicU64,
}

impl CaptureDevice {
    /// Wraps `inner`; its bitmap lives beside the log (`dirty-<disk>.bitmap`).
    pub fn new(disk: DiskName, inner: FileDevice, log: Arc<Mutex<LogDir>>) -> io::Result<Self> {
        let (path, crashed, unclean, newest) = {
            let log = log
                .lock()
                .map_err(|_| io::Error::other("the write log lock is poisoned"))?;
            (
                bitmap_path(log.dir(), &disk),
                log.machine_crashed(),
                log.unclean_stop(),
                log.newest_segment().to_path_buf(),
            )
        };
        let mut bitmap = DirtyBitmap::open(&path, inner.size())?;
        if crashed {
            // The log may lack writes the disk kept: the whole disk needs a resync.
            bitmap.mark(0, inner.size())?;
            bitmap.sync()?;
        } else if unclean {
            // The agent died: the disk may lack changes of the newest segment.
            redo_newest_segment(&disk, &inner, &newest, &mut bitmap)?;
        }
        let bitmap = Mutex::new(bitmap);
        Ok(CaptureDevice {
            disk,
            inner,
            log,
            bitmap,
            sync: None,
            touched: Mutex::new(None),
            written: Default::default(),
        })
    }

    /// Bytes the machine wrote to this disk since the agent started (data, not zeroes).
    pub fn written_bytes(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn log(&self) -> io::Result<MutexGuard<'_, LogDir>> {
        self.log
            .lock()
            .map_err(|_| io::Error::other("the write log lock is poisoned"))
    }

    fn bitmap(&self) -> io::Result<MutexGuard<'_, DirtyBitmap>> {
        self.bitmap
            .lock()
            .map_err(|_| io::Error::other("the bitmap lock is poisoned"))
    }

    /// Records a change: in the log, or in the bitmap once the log is capped. Called with the
    /// log lock held, so the order is the disk's.
    fn record(
        &self,
        log: &mut LogDir,
        entry: Change<'_>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> io::Result<Option<Seq>> {
        self.touch(offset, len);
        let appended = match entry {
            Change::Op(op) => log.append(op),
            Change::Write(data) => log.append_write(&self.disk, offset, data),
        };
        match appended {
            Ok(seq) => {
                if fua {
                    log.sync().map_err(log_error)?;
                }
                Ok(Some(seq))
            }
            Err(LogDirError::Capped { .. }) => {
                let mut bitmap = self.bitmap()?;
                bitmap.mark(offset, len)?;
                if fua {
                    bitmap.sync()?;
                }
                Ok(None)
            }
            Err(e) => Err(log_error(e)),
        }
    }

    /// Notes a change of `offset..offset + len` for a copy that compares with a digest.
    fn touch(&self, offset: u64, len: u64) {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bits) = touched.as_mut() {
            let block = COPY_BLOCK as u64;
            let end = offset.saturating_add(len.max(1)).div_ceil(block);
            for b in offset / block..end {
                if let Some(word) = bits.get_mut((b / 64) as usize) {
                    *word |= 1 << (b % 64);
                }
            }
        }
    }

    fn is_touched(&self, block: u64) -> bool {
        let touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.as_ref().is_none_or(|bits| {
            bits.get((block / 64) as usize)
                .is_none_or(|w| w & (1 << (block % 64)) != 0)
        })
    }

    /// With synchronous replication, waits until the process server holds `seq` (a change
    /// not in the log, while it is capped, cannot be confirmed: the fallback decides).
    fn confirm(&self, seq: Option<Seq>) -> io::Result<()> {
        match (&self.sync, seq) {
            (None, _) => Ok(()),
            (Some(link), Some(seq)) => link.wait(seq),
            (Some(link), None) => link.wait(Seq(u64::MAX)),
        }
    }
}

impl CaptureDevice {
    /// Makes the disk and its dirty-block bitmap durable: at a clean stop, once the log takes
    /// no more changes (see [`LogDir::close_clean`]).
    pub fn sync_disk(&self) -> Result<(), String> {
        self.bitmap()
            .and_then(|bitmap| bitmap.sync())
            .and_then(|()| self.inner.flush())
            .map_err(|e| format!("disk {}: {e}", self.disk))
    }

    /// Makes writes wait for the process server (synchronous replication).
    pub fn with_sync(mut self, link: Arc<SyncLink>) -> Self {
        self.sync = Some(link);
        self
    }

    /// Logs the disk's size, so that a replica downstream has it before any write.
    pub fn announce_size(&self) -> io::Result<()> {
        let mut log = self.log()?;
        let op = Op::Resize {
            disk: self.disk.clone(),
            size: self.inner.size(),
        };
        log.append(op).map(|_| ()).map_err(log_error)
    }

    /// Starts noting the blocks that changes touch, for copies that compare with a digest;
    /// returns the sequence number of the first change noted. A digest taken once every
    /// record before it is applied downstream is sound for every block not touched since.
    pub fn track_changes(&self) -> io::Result<Seq> {
        let log = self.log()?;
        let blocks = self.inner.size().div_ceil(COPY_BLOCK as u64);
        *self.touched.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(vec![0; blocks.div_ceil(64) as usize]);
        Ok(log.next_seq())
    }

    /// Stops noting touched blocks.
    pub fn untrack_changes(&self) {
        *self.touched.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Copies `len` bytes of the disk from `offset` into the log, as writes of its
    /// [`COPY_BLOCK`]s, leaving out those that `target` holds already: the initial copy, a
    /// chunk at a time.
    ///
    /// The chunk is read under the log lock, after every change logged before it reached the
    /// disk, so it lands in the log exactly where it was read: a change logged before it is
    /// already in it, one logged after it is applied after it downstream.
    pub fn copy_chunk(&self, offset: u64, len: u64, target: Target<'_>) -> io::Result<Copied> {
        self.relog(offset, len, target, false)
    }

    /// Reads `len` bytes of the disk from `offset` under the log lock, once every change
    /// logged before reached the disk, and logs the blocks that differ from `target`: data,
    /// or a zero record for a run of zero blocks.
    ///
    /// With `clear`, the range leaves the dirty-block bitmap before the log lock is released:
    /// a change to it after that is logged (or, if the log is capped again, marked again),
    /// never lost between the resend and the clear.
    fn relog(&self, offset: u64, len: u64, target: Target<'_>, clear: bool) -> io::Result<Copied> {
        let mut log = self.log()?;
        if log.is_capped() {
            return Err(io::Error::other(
                "the write log is capped: the copy waits for it to drain",
            ));
        }
        log.wait_applied();
        let len = len.min(self.inner.size().saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        self.inner.read_at(&mut buf, offset)?;
        let mut copied = Copied::default();
        // A run of zero blocks to log as one zero record: (offset, length).
        let mut zeros: Option<(u64, u64)> = None;
        for (k, piece) in buf.chunks(COPY_BLOCK).enumerate() {
            let at = offset + (k * COPY_BLOCK) as u64;
            let n = piece.len() as u64;
            let zero = boomerang_core::is_zero(piece);
            let held = match target {
                Target::Empty => zero,
                Target::Unknown => false,
                Target::Hashes {
                    first_block,
                    hashes,
                } => {
                    let block = at / COPY_BLOCK as u64;
                    let known = block
                        .checked_sub(first_block)
                        .and_then(|i| hashes.get(i as usize));
                    known.is_some_and(|h| {
                        // A block of zeros there differs from data here without hashing it.
                        let same = if *h == zero_block_hash(piece.len()) {
                            zero
                        } else {
                            !zero && *blake3::hash(piece).as_bytes() == *h
                        };
                        same && !self.is_touched(block)
                    })
                }
            };
            if held {
                copied.skipped += n;
            } else if zero {
                copied.logged += n;
                zeros = match zeros {
                    Some((start, run)) if start + run == at => Some((start, run + n)),
                    other => {
                        self.log_zeros(&mut log, other)?;
                        Some((at, n))
                    }
                };
                continue;
            } else {
                copied.logged += n;
                log.append_write(&self.disk, at, piece).map_err(log_error)?;
            }
            self.log_zeros(&mut log, zeros.take())?;
        }
        self.log_zeros(&mut log, zeros)?;
        if clear {
            let mut bitmap = self.bitmap()?;
            bitmap.clear(offset, len)?;
            bitmap.sync()?;
        }
        drop(log);
        Ok(copied)
    }

    fn log_zeros(&self, log: &mut LogDir, run: Option<(u64, u64)>) -> io::Result<()> {
        if let Some((offset, len)) = run {
            let op = Op::Zero {
                disk: self.disk.clone(),
                offset,
                len,
            };
            log.append(op).map_err(log_error)?;
        }
        Ok(())
    }

    /// The byte ranges whose changes the log does not hold (the dirty-block bitmap).
    pub fn dirty_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        Ok(self.bitmap()?.ranges(self.inner.size()))
    }

    /// Marks the whole disk for a resync (the log lost changes of it).
    pub fn mark_all_dirty(&self) -> io::Result<()> {
        let mut bitmap = self.bitmap()?;
        bitmap.mark(0, self.inner.size())?;
        bitmap.sync()
    }

    /// Whether the dirty-block bitmap has any block set (without walking it).
    pub fn is_dirty(&self) -> io::Result<bool> {
        Ok(self.bitmap()?.count() > 0)
    }

    /// Sends a dirty range again through the log (as [`CaptureDevice::copy_chunk`]; the
    /// replica holds older data there, so `target` is a digest or unknown) and clears it from
    /// the bitmap. A change to the range meanwhile is logged: the log is no longer capped.
    pub fn resend(&self, offset: u64, len: u64, target: Target<'_>) -> io::Result<Copied> {
        self.relog(offset, len, target, true)
    }

    /// The disk's name.
    pub fn disk(&self) -> &DiskName {
        &self.disk
    }

    /// A change the log recorded but the disk refused leaves the disk's content there unknown:
    /// the range goes into the bitmap, so a resync re-reads it from the disk instead of trusting
    /// the log. The client gets the disk's error either way.
    fn track_failure(&self, applied: io::Result<()>, offset: u64, len: u64) -> io::Result<()> {
        if let Err(e) = applied {
            tracing::error!(disk = %self.disk, offset, len, error = %boomerang_core::chain(&e), "the disk refused a write; its range is marked for resync");
            let mut bitmap = self.bitmap()?;
            bitmap.mark(offset, len)?;
            bitmap.sync()?;
            return Err(e);
        }
        Ok(())
    }
}

/// After a crash of the agent, makes the disk hold every change of `disk` that the newest
/// segment logged: a change is logged before it is written to the disk, and a segment rolls over
/// only once all its changes are on the disk, so only the newest segment's changes may be
/// missing. Applying them again in log order is harmless for those already there.
///
/// A disk whose dirty-block bitmap has blocks set is resynced anyway, and its log stopped
/// before the bitmap took over: the segment's ranges go into the bitmap instead.
fn redo_newest_segment(
    disk: &DiskName,
    inner: &FileDevice,
    segment: &std::path::Path,
    bitmap: &mut DirtyBitmap,
) -> io::Result<()> {
    let bad = |e: boomerang_core::log::LogError| {
        io::Error::other(format!(
            "could not read {} to bring disk {disk} up to date after the agent's crash: {e}",
            segment.display()
        ))
    };
    let to_bitmap = bitmap.count() > 0;
    let mut redone = 0u64;
    for record in SegmentReader::open(segment).map_err(bad)? {
        let record = record.map_err(bad)?;
        if record.op.disk() != Some(disk) {
            continue;
        }
        match &record.op {
            Op::Write { offset, data, .. } if to_bitmap => {
                bitmap.mark(*offset, data.len() as u64)?
            }
            Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } if to_bitmap => {
                bitmap.mark(*offset, *len)?
            }
            Op::Write { offset, data, .. } => inner.write_at(data, *offset, false)?,
            Op::Zero { offset, len, .. } | Op::Trim { offset, len, .. } => {
                inner.write_zeroes(*offset, *len, true, false)?
            }
            Op::Mark { .. } | Op::Resize { .. } => continue,
        }
        redone += 1;
    }
    if to_bitmap {
        bitmap.sync()?;
    } else {
        inner.flush()?;
    }
    if redone > 0 {
        tracing::info!(%disk, changes = redone, segment = %segment.display(), "the agent had crashed: the changes of the newest log segment are on the disk again");
    }
    Ok(())
}

/// A change to record: an operation, or write data of this disk at the given offset.
enum Change<'a> {
    Op(Op),
    Write(&'a [u8]),
}

/// Where the dirty-block bitmap of `disk` lives.
pub fn bitmap_path(log_dir: &std::path::Path, disk: &DiskName) -> std::path::PathBuf {
    log_dir.join(format!("dirty-{disk}.bitmap"))
}

fn log_error(e: LogDirError) -> io::Error {
    // The client gets EIO (ENOSPC for a full log volume); nothing unlogged is acknowledged.
    tracing::error!(error = %boomerang_core::chain(&e), "could not append to the write log; the write is refused");
    match e {
        LogDirError::Log(boomerang_core::log::LogError::Io { source, .. })
            if source.raw_os_error() == Some(28) =>
        {
            io::Error::from_raw_os_error(28)
        }
        other => io::Error::other(boomerang_core::chain(&other)),
    }
}

impl BlockDevice for CaptureDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let mut ticket = {
            let mut log = self.log()?;
            // Large writes become several records; the lock keeps a mark from falling between
            // them. One sync after the last piece is enough for FUA.
            let pieces = data.len().div_ceil(RECORD_PIECE).max(1);
            // The pieces share one segment, so that a crash redo has them all.
            let frames = pieces * (FRAME_OVERHEAD + 1 + self.disk.as_str().len() + 8);
            log.reserve((frames + data.len()) as u64)
                .map_err(log_error)?;
            let mut seq = None;
            for (k, piece) in data.chunks(RECORD_PIECE).enumerate() {
                let at = offset + (k * RECORD_PIECE) as u64;
                let last = k + 1 == pieces;
                let recorded = self.record(
                    &mut log,
                    Change::Write(piece),
                    at,
                    piece.len() as u64,
                    fua && last,
                );
                seq = match recorded {
                    Ok(s) => s,
                    // Earlier pieces are logged; the disk is not written: the whole range goes
                    // to the bitmap so that the log is not trusted there.
                    Err(e) if k > 0 => {
                        return self.track_failure(Err(e), offset, data.len() as u64);
                    }
                    Err(e) => return Err(e),
                };
            }
            (log.ticket(), seq)
        };
        // The next change may be logged while this one goes to the disk, in its turn.
        ticket.0.wait();
        let applied = self.inner.write_at(data, offset, fua);
        self.track_failure(applied, offset, data.len() as u64)?;
        self.written
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        drop(ticket.0);
        self.confirm(ticket.1)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let mut ticket = {
            let mut log = self.log()?;
            let op = Op::Zero {
                disk: self.disk.clone(),
                offset,
                len,
            };
            let seq = self.record(&mut log, Change::Op(op), offset, len, fua)?;
            (log.ticket(), seq)
        };
        ticket.0.wait();
        let applied = self.inner.write_zeroes(offset, len, may_trim, fua);
        self.track_failure(applied, offset, len)?;
        drop(ticket.0);
        self.confirm(ticket.1)
    }

    /// Trimmed ranges read back as zeros, on the disk and in a replay alike.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut ticket = {
            let mut log = self.log()?;
            let op = Op::Trim {
                disk: self.disk.clone(),
                offset,
                len,
            };
            let seq = self.record(&mut log, Change::Op(op), offset, len, false)?;
            (log.ticket(), seq)
        };
        ticket.0.wait();
        let applied = self.inner.write_zeroes(offset, len, true, false);
        self.track_failure(applied, offset, len)?;
        drop(ticket.0);
        self.confirm(ticket.1)
    }

    fn flush(&self) -> io::Result<()> {
        {
            // A capped log took its last sync when it stopped; it takes no more records.
            let mut log = self.log()?;
            if !log.is_capped() {
                log.sync().map_err(log_error)?;
            }
        }
        self.bitmap()?.sync()?;
        self.inner.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }

    fn writes_may_wait(&self) -> bool {
        self.sync.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logdir::MIN_SEGMENT;

    /// The ops a log holds for the copy: (offset, length, whether data).
    fn copied_ops(log_dir: &std::path::Path) -> Vec<(u64, u64, bool)> {
        let mut ops = Vec::new();
        for path in crate::logdir::segments(log_dir).unwrap() {
            for record in SegmentReader::open(&path).unwrap() {
                match record.unwrap().op {
                    Op::Write { offset, data, .. } => ops.push((offset, data.len() as u64, true)),
                    Op::Zero { offset, len, .. } => ops.push((offset, len, false)),
                    _ => {}
                }
            }
        }
        ops
    }

    #[test]
    fn a_copy_leaves_out_blocks_the_digest_holds_unless_a_change_touched_them() {
        let dir = tempfile::tempdir().unwrap();
        let (image, log_dir) = (dir.path().join("disk.img"), dir.path().join("log"));
        let b = COPY_BLOCK;
        // Six blocks: 0..4 hold data, 4 and 5 are zeros.
        let mut content = vec![0u8; 6 * b];
        for (i, block) in content.chunks_mut(b).take(4).enumerate() {
            block.fill(i as u8 + 1);
        }
        std::fs::write(&image, &content).unwrap();
        let log = Arc::new(Mutex::new(LogDir::open(&log_dir, MIN_SEGMENT).unwrap()));
        let disk = DiskName::new("d0").unwrap();
        let dev = CaptureDevice::new(disk, FileDevice::open(&image, false).unwrap(), log.clone())
            .unwrap();
        let hash = |data: &[u8]| *blake3::hash(data).as_bytes();
        // The replica: blocks 0 and 1 as here, 2 differs, 3 is past its digest, 4 holds
        // data where here are zeros, 5 holds zeros as here.
        let hashes = [
            hash(&content[..b]),
            hash(&content[b..2 * b]),
            hash(&[9u8; COPY_BLOCK]),
        ];
        let first = dev.track_changes().unwrap();
        assert_eq!(first, Seq(1));
        // A change to block 1 after the digest was asked for: even rewritten with the same
        // bytes, the digest no longer speaks for it.
        dev.write_at(&content[b..b + 4096], b as u64, false)
            .unwrap();
        let before = copied_ops(&log_dir).len();
        let target = Target::Hashes {
            first_block: 0,
            hashes: &hashes,
        };
        let copied = dev.copy_chunk(0, 4 * b as u64, target).unwrap();
        let mut ops = copied_ops(&log_dir).split_off(before);
        assert_eq!(
            ops,
            [
                (b as u64, b as u64, true),
                (2 * b as u64, b as u64, true),
                (3 * b as u64, b as u64, true)
            ]
        );
        assert_eq!(
            copied,
            Copied {
                logged: 3 * b as u64,
                skipped: b as u64
            }
        );

        // Zero blocks: one zero record for the run the replica may hold data in, nothing for
        // the block it holds as zeros.
        let zero = hash(&[0u8; COPY_BLOCK]);
        let hashes = [hash(&[7u8; COPY_BLOCK]), zero];
        let target = Target::Hashes {
            first_block: 4,
            hashes: &hashes,
        };
        let copied = dev.copy_chunk(4 * b as u64, 2 * b as u64, target).unwrap();
        ops = copied_ops(&log_dir).split_off(before + 3);
        assert_eq!(ops, [(4 * b as u64, b as u64, false)]);
        assert_eq!(
            copied,
            Copied {
                logged: b as u64,
                skipped: b as u64
            }
        );

        // Without a digest every block goes, zeros as one record; untracked, no hash counts.
        dev.untrack_changes();
        let copied = dev.copy_chunk(0, 6 * b as u64, target).unwrap();
        ops = copied_ops(&log_dir).split_off(before + 4);
        assert_eq!(ops.len(), 5, "{ops:?}");
        assert_eq!(ops[4], (4 * b as u64, 2 * b as u64, false));
        assert_eq!(copied.skipped, 0);
    }

    #[test]
    fn the_pieces_of_one_write_share_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (image, log_dir) = (dir.path().join("disk.img"), dir.path().join("log"));
        std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
        let log = Arc::new(Mutex::new(LogDir::open(&log_dir, MIN_SEGMENT).unwrap()));
        let disk = DiskName::new("d0").unwrap();
        let dev = CaptureDevice::new(disk, FileDevice::open(&image, false).unwrap(), log.clone())
            .unwrap();
        // Three pieces each; the second write does not fit in what the first left of 1 MiB.
        // The third, larger than a segment, gets a segment of its own size.
        dev.write_at(&[1u8; 700_000], 0, false).unwrap();
        dev.write_at(&[2u8; 700_000], 2 << 20, false).unwrap();
        dev.write_at(&[3u8; 1_500_000], 1 << 20, false).unwrap();
        let segments = crate::logdir::segments(&log_dir).unwrap();
        assert_eq!(segments.len(), 3);
        let spans = [(0u64, 700_000u64), (2 << 20, 700_000), (1 << 20, 1_500_000)];
        for (path, (want, len)) in segments.iter().zip(spans) {
            for record in SegmentReader::open(path).unwrap() {
                let Op::Write { offset, .. } = record.unwrap().op else {
                    continue;
                };
                assert!(
                    (want..want + len).contains(&offset),
                    "{} holds a piece at {offset}",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn after_an_agent_crash_every_logged_change_is_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (image, log_dir) = (dir.path().join("disk.img"), dir.path().join("log"));
        std::fs::write(&image, vec![9u8; 1 << 20]).unwrap();
        let disk = DiskName::new("d0").unwrap();
        {
            // Logged, then the agent dies before the disk is written: no clean close.
            let mut log = LogDir::open(&log_dir, MIN_SEGMENT).unwrap();
            log.append_write(&disk, 4096, &[7u8; 4096]).unwrap();
            log.append(Op::Zero {
                disk: disk.clone(),
                offset: 0,
                len: 4096,
            })
            .unwrap();
            log.append(Op::Write {
                disk: DiskName::new("other").unwrap(),
                offset: 8192,
                data: vec![5u8; 4096],
            })
            .unwrap();
            log.sync().unwrap();
        }
        let log = Arc::new(Mutex::new(LogDir::open(&log_dir, MIN_SEGMENT).unwrap()));
        assert!(log.lock().unwrap().unclean_stop());
        let dev = CaptureDevice::new(disk, FileDevice::open(&image, false).unwrap(), log.clone())
            .unwrap();
        let mut got = vec![0u8; 3 * 4096];
        dev.read_at(&mut got, 0).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0), "the zeroing is redone");
        assert!(
            got[4096..8192].iter().all(|&b| b == 7),
            "the write is redone"
        );
        assert!(
            got[8192..].iter().all(|&b| b == 9),
            "another disk's change is not applied here"
        );
        log.lock().unwrap().close_clean(|| dev.sync_disk()).unwrap();
        drop((dev, log));
        assert!(!LogDir::open(&log_dir, MIN_SEGMENT).unwrap().unclean_stop());
    }
}
