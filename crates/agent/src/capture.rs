//! The write splitter: a [`BlockDevice`] that records every change in the write log before
//! applying it to the disk, under one lock so both see the same order.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use boomerang_core::DiskName;
use boomerang_core::log::Op;
use boomerang_nbd::{BlockDevice, Extent, FileDevice};

use crate::bitmap::DirtyBitmap;
use crate::logdir::{LogDir, LogDirError};

/// The largest write record; longer NBD writes are split (segments hold at least 1 MiB).
pub const RECORD_PIECE: usize = 256 * 1024;

/// A protected disk whose changes go to the write log first (or, once the log is capped, to
/// the disk's dirty-block bitmap).
pub struct CaptureDevice {
    disk: DiskName,
    inner: FileDevice,
    log: Arc<Mutex<LogDir>>,
    bitmap: Mutex<DirtyBitmap>,
}

impl CaptureDevice {
    /// Wraps `inner`; its bitmap lives beside the log (`dirty-<disk>.bitmap`).
    pub fn new(disk: DiskName, inner: FileDevice, log: Arc<Mutex<LogDir>>) -> io::Result<Self> {
        let (path, crashed) = {
            let log = log
                .lock()
                .map_err(|_| io::Error::other("the write log lock is poisoned"))?;
            (bitmap_path(log.dir(), &disk), log.machine_crashed())
        };
        let mut bitmap = DirtyBitmap::open(&path, inner.size())?;
        if crashed {
            // The log may lack writes the disk kept: the whole disk needs a resync.
            bitmap.mark(0, inner.size())?;
            bitmap.sync()?;
        }
        let bitmap = Mutex::new(bitmap);
        Ok(CaptureDevice {
            disk,
            inner,
            log,
            bitmap,
        })
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
    fn record(&self, log: &mut LogDir, op: Op, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match log.append(op) {
            Ok(_) => {
                if fua {
                    log.sync().map_err(log_error)?;
                }
                Ok(())
            }
            Err(LogDirError::Capped { .. }) => {
                let mut bitmap = self.bitmap()?;
                bitmap.mark(offset, len)?;
                if fua {
                    bitmap.sync()?;
                }
                Ok(())
            }
            Err(e) => Err(log_error(e)),
        }
    }
}

impl CaptureDevice {
    /// A change the log recorded but the disk refused leaves the disk's content there unknown:
    /// the range goes into the bitmap, so a resync re-reads it from the disk instead of trusting
    /// the log. The client gets the disk's error either way.
    fn track_failure(&self, applied: io::Result<()>, offset: u64, len: u64) -> io::Result<()> {
        if let Err(e) = applied {
            tracing::error!(disk = %self.disk, offset, len, error = %e, "the disk refused a write; its range is marked for resync");
            let mut bitmap = self.bitmap()?;
            bitmap.mark(offset, len)?;
            bitmap.sync()?;
            return Err(e);
        }
        Ok(())
    }
}

/// Where the dirty-block bitmap of `disk` lives.
pub fn bitmap_path(log_dir: &std::path::Path, disk: &DiskName) -> std::path::PathBuf {
    log_dir.join(format!("dirty-{disk}.bitmap"))
}

fn log_error(e: LogDirError) -> io::Error {
    // The client gets EIO (ENOSPC for a full log volume); nothing unlogged is acknowledged.
    tracing::error!(error = %e, "could not append to the write log; the write is refused");
    match e {
        LogDirError::Log(boomerang_core::log::LogError::Io { source, .. })
            if source.raw_os_error() == Some(28) =>
        {
            io::Error::from_raw_os_error(28)
        }
        other => io::Error::other(other.to_string()),
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
        let mut log = self.log()?;
        // Large writes become several records; the lock keeps a mark from falling between them.
        // One sync after the last piece is enough for FUA.
        let pieces = data.len().div_ceil(RECORD_PIECE).max(1);
        for (k, piece) in data.chunks(RECORD_PIECE).enumerate() {
            let at = offset + (k * RECORD_PIECE) as u64;
            let op = Op::Write {
                disk: self.disk.clone(),
                offset: at,
                data: piece.to_vec(),
            };
            let recorded =
                self.record(&mut log, op, at, piece.len() as u64, fua && k + 1 == pieces);
            if k > 0 {
                // Earlier pieces are logged; the disk is not written: the whole range goes to
                // the bitmap so that the log is not trusted there.
                self.track_failure(recorded, offset, data.len() as u64)?;
            } else {
                recorded?;
            }
        }
        let applied = self.inner.write_at(data, offset, fua);
        self.track_failure(applied, offset, data.len() as u64)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let mut log = self.log()?;
        let op = Op::Zero {
            disk: self.disk.clone(),
            offset,
            len,
        };
        self.record(&mut log, op, offset, len, fua)?;
        let applied = self.inner.write_zeroes(offset, len, may_trim, fua);
        self.track_failure(applied, offset, len)
    }

    /// Trimmed ranges read back as zeros, on the disk and in a replay alike.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.log()?;
        let op = Op::Trim {
            disk: self.disk.clone(),
            offset,
            len,
        };
        self.record(&mut log, op, offset, len, false)?;
        let applied = self.inner.write_zeroes(offset, len, true, false);
        self.track_failure(applied, offset, len)
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
}
