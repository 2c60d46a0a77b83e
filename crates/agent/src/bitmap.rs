//! The dirty-block bitmap the agent falls back to when its write log reaches its cap (or its
//! volume fills up): one bit per block of the disk, set before the write is acknowledged, so
//! the blocks to resend are known exactly even though their data is not in the log.
//!
//! File `dirty-<disk>.bitmap` in the log directory, fully allocated when the agent starts (so
//! it never needs space later):
//! ```text
//! 0  8  magic "BMRGDIRT"     8  2  version = 1 (u16 LE)    10  2  reserved, zero
//! 12 4  block size (u32 LE)  16 8  disk size (u64 LE)      24  8  reserved, zero
//! 32 .. one bit per block, block i = byte i/8, bit i%8 (least significant first)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"BMRGDIRT";
const HEADER_LEN: u64 = 32;
/// Granularity of the bitmap.
pub const BLOCK: u64 = 64 * 1024;

pub struct DirtyBitmap {
    file: File,
    path: PathBuf,
    bits: Vec<u8>,
    block: u64,
    /// Bits set, kept as they change: asked for often, and a count walks the whole map.
    set: u64,
}

impl DirtyBitmap {
    /// Opens the bitmap at `path`, creating and allocating it for a disk of `size` bytes.
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        let nbytes = size.div_ceil(BLOCK).div_ceil(8).max(1);
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "dirty-block bitmap {} {what}: move it aside and resync the disk",
                    path.display()
                ),
            )
        };
        let mut bits = vec![0u8; nbytes as usize];
        if !path.exists() {
            // Made under a temporary name and renamed, so a crash never leaves half a bitmap.
            let mut header = [0u8; HEADER_LEN as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..10].copy_from_slice(&1u16.to_le_bytes());
            header[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            header[16..24].copy_from_slice(&size.to_le_bytes());
            let mut tmp_name = path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            tmp_name.push(".tmp");
            let tmp = path.with_file_name(tmp_name);
            let f = File::create(&tmp)?;
            f.write_all_at(&header, 0)?;
            // Real zeros, not a hole: the space is taken now, while there is some.
            f.write_all_at(&bits, HEADER_LEN)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| bad("is truncated"))?;
        if &header[..8] != MAGIC || header[8..10] != 1u16.to_le_bytes() {
            return Err(bad("has no valid header"));
        }
        if header[12..16] != (BLOCK as u32).to_le_bytes() || header[16..24] != size.to_le_bytes() {
            return Err(bad("was made for a disk of another size"));
        }
        file.read_exact_at(&mut bits, HEADER_LEN)
            .map_err(|_| bad("is truncated"))?;
        let set = bits.iter().map(|b| u64::from(b.count_ones())).sum();
        Ok(DirtyBitmap {
            file,
            path: path.to_path_buf(),
            bits,
            block: BLOCK,
            set,
        })
    }

    /// Disk size and dirty blocks of the bitmap at `path`, or `None` if there is none.
    pub fn inspect(path: &Path) -> io::Result<Option<(u64, u64)>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a dirty-block bitmap", path.display()),
            ));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&bytes[16..24]);
        let dirty = bytes[HEADER_LEN as usize..]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum();
        Ok(Some((u64::from_le_bytes(size), dirty)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks every block that `[offset, offset + len)` touches; writes the changed bytes.
    pub fn mark(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.update(offset, len, true)
    }

    /// Clears the blocks that `[offset, offset + len)` touches, once their content is on its
    /// way again (a resync); writes the changed bytes.
    pub fn clear(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.update(offset, len, false)
    }

    fn update(&mut self, offset: u64, len: u64, set: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.block;
        let last = ((offset + len - 1) / self.block).min((self.bits.len() * 8) as u64 - 1);
        if first > last {
            return Ok(());
        }
        let (lo, hi) = ((first / 8) as usize, (last / 8) as usize);
        let mut updated = self.bits[lo..=hi].to_vec();
        for b in first..=last {
            let byte = &mut updated[(b / 8) as usize - lo];
            if set {
                *byte |= 1 << (b % 8);
            } else {
                *byte &= !(1 << (b % 8));
            }
        }
        if updated != self.bits[lo..=hi] {
            // On disk first: a bit changes in memory only once it is written, so a failed
            // write is retried by the next update of that block.
            self.file.write_all_at(&updated, HEADER_LEN + lo as u64)?;
            let ones = |b: &[u8]| b.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
            self.set = self.set - ones(&self.bits[lo..=hi]) + ones(&updated);
            self.bits[lo..=hi].copy_from_slice(&updated);
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Dirty blocks.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Byte ranges of dirty blocks, merged, for a resync.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, byte) in self.bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) == 0 {
                    continue;
                }
                let start = (i as u64 * 8 + bit) * self.block;
                let end = (start + self.block).min(size);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l = end - *o,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_persist_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty-d.bitmap");
        let size = 10 * BLOCK + 100;
        {
            let mut b = DirtyBitmap::open(&p, size).unwrap();
            b.mark(0, 1).unwrap();
            b.mark(BLOCK + 5, BLOCK).unwrap(); // blocks 1 and 2
            b.mark(10 * BLOCK, 50).unwrap(); // the short tail block
            b.sync().unwrap();
        }
        let b = DirtyBitmap::open(&p, size).unwrap();
        assert_eq!(b.count(), 4);
        assert_eq!(b.ranges(size), vec![(0, 3 * BLOCK), (10 * BLOCK, 100)]);
        assert!(
            DirtyBitmap::open(&p, size * 2).is_err(),
            "a bitmap for another size is refused"
        );
        let mut b = b;
        b.clear(BLOCK, 2 * BLOCK).unwrap();
        b.sync().unwrap();
        let b = DirtyBitmap::open(&p, size).unwrap();
        assert_eq!(b.ranges(size), vec![(0, BLOCK), (10 * BLOCK, 100)]);
    }
}
