//! The `BlockDevice` trait the server serves, and its file-backed implementation.
//!
//! Calls are blocking and may run concurrently from several threads: implementations use
//! positioned I/O and no shared cursor. A call that returns `Ok` for a write has put the data
//! where later reads see it; with `fua` (and after `flush`) it is also durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A run of the device with one allocation state, for `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated: reads return zeros and the space costs nothing.
    pub hole: bool,
    /// Reads return zeros.
    pub zero: bool,
}

/// A disk the NBD server can serve.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes `len` bytes read as zeros; `may_trim` allows deallocating them.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// A hint that the range is unused; afterwards its contents are unspecified (this
    /// implementation family reads them back as zeros).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Allocation state from `offset` on, covering at least one byte and at most `len`.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
    /// Whether a write may wait on something other than the local disk (a synchronous
    /// replica): such writes never run inline on the server's async workers.
    fn writes_may_wait(&self) -> bool {
        false
    }
    /// Whether a read may wait on something other than the local disk (a remote store):
    /// such reads never run inline on the server's async workers.
    fn reads_may_wait(&self) -> bool {
        false
    }
}

/// A raw image file or a block device.
pub struct FileDevice {
    file: File,
    size: u64,
    regular: bool,
}

impl FileDevice {
    /// Opens `path` for reading, and for writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            // Block devices report 0 in metadata; seek to the end instead.
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(FileDevice {
            file,
            size,
            regular: meta.is_file(),
        })
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(&self.file, flags, offset as i64, len as i64).map_err(io::Error::from)
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let punched = may_trim && self.regular && self.punch(offset, len).is_ok();
        if !punched {
            self.write_zero_bytes(offset, len)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.regular && self.punch(offset, len).is_ok() {
            return Ok(());
        }
        // Not a hole-capable file: trimming is a hint, so doing nothing is correct.
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        use nix::unistd::{Whence, lseek};
        let end = (offset + len).min(self.size);
        if !self.regular || offset >= end {
            return Ok(vec![Extent {
                len: end.saturating_sub(offset).max(1).min(len),
                hole: false,
                zero: false,
            }]);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 256 {
            let data = match lseek(&self.file, pos as i64, Whence::SeekData) {
                Ok(d) => (d as u64).min(end),
                Err(nix::errno::Errno::ENXIO) => end, // only a hole until the end
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                out.push(Extent {
                    len: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = match lseek(&self.file, pos as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(e) => return Err(e.into()),
            };
            out.push(Extent {
                len: hole.saturating_sub(pos).max(1),
                hole: false,
                zero: false,
            });
            pos = hole.max(pos + 1);
        }
        Ok(out)
    }
}

/// A device in memory, for tests.
pub struct MemDevice {
    data: std::sync::RwLock<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size: usize) -> Self {
        MemDevice {
            data: std::sync::RwLock::new(vec![0; size]),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().map_or(0, |d| d.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut d = self
            .data
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        let mut d = self
            .data
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
