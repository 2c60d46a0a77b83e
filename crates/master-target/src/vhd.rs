//! Fixed VHD: what Azure boots. A fixed VHD is the raw disk followed by a 512-byte footer
//! (all fields big-endian; Microsoft's "Virtual Hard Disk Image Format Specification"):
//!
//! | Offset | Bytes | Field |
//! |---|---|---|
//! | 0 | 8 | cookie `conectix` |
//! | 8 | 4 | features: 2 (reserved bit always set) |
//! | 12 | 4 | format version 0x00010000 |
//! | 16 | 8 | data offset: all ones for a fixed disk |
//! | 24 | 4 | time stamp: seconds since 2000-01-01 00:00:00 UTC |
//! | 28 | 4 | creator application `bmrg` |
//! | 32 | 4 | creator version 0x00010000 |
//! | 36 | 4 | creator host OS `Wi2k` |
//! | 40 | 8 | original size |
//! | 48 | 8 | current size |
//! | 56 | 4 | geometry: cylinders (2), heads (1), sectors per track (1) |
//! | 60 | 4 | disk type: 2, fixed |
//! | 64 | 4 | checksum: one's complement of the sum of the footer's bytes, this field as 0 |
//! | 68 | 16 | unique id |
//! | 84 | 1 | saved state: 0 |
//! | 85 | 427 | zeros |
//!
//! Azure takes only virtual sizes that are whole MiB: a disk of another size is padded with
//! zeros to the next MiB.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The footer's length.
pub const FOOTER: u64 = 512;

const MIB: u64 = 1 << 20;

/// The CHS geometry the specification's algorithm gives `size` bytes.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    total = total.min(65535 * 16 * 255);
    let (spt, heads, cylinders_times_heads);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cylinders_times_heads = total / spt;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        spt = s;
        heads = h;
        cylinders_times_heads = cth;
    }
    (
        (cylinders_times_heads / heads) as u16,
        heads as u8,
        spt as u8,
    )
}

/// The footer of a fixed VHD of `size` bytes, made at `now_unix` (seconds), with `id`.
pub fn footer(size: u64, now_unix: u64, id: [u8; 16]) -> [u8; FOOTER as usize] {
    let mut f = [0u8; FOOTER as usize];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    // 2000-01-01 00:00:00 UTC is 946684800 seconds after 1970.
    let stamp = now_unix.saturating_sub(946_684_800) as u32;
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(b"bmrg");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes());
    f[68..84].copy_from_slice(&id);
    let sum: u32 = f.iter().map(|&b| u32::from(b)).sum();
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// Makes the raw disk image at `path` a fixed VHD: pads it with zeros to a whole MiB and
/// appends the footer. Returns the virtual size.
pub fn finish(path: &Path) -> io::Result<u64> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let size = file.metadata()?.len().next_multiple_of(MIB);
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = since.as_secs();
    // Unique enough for an image id: the time to the nanosecond, the process and the size.
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(since.as_nanos() as u64).to_be_bytes());
    id[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    id[12..].copy_from_slice(&(size as u32).to_be_bytes());
    file.set_len(size)?;
    file.write_all_at(&footer(size, now, id), size)?;
    file.sync_all()?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_footer_checks_out_and_gives_the_specifications_geometry() {
        let f = footer(4 << 20, 946_684_800 + 10, [7; 16]);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(u32::from_be_bytes(f[24..28].try_into().unwrap()), 10);
        assert_eq!(u64::from_be_bytes(f[48..56].try_into().unwrap()), 4 << 20);
        assert_eq!(u32::from_be_bytes(f[60..64].try_into().unwrap()), 2);
        let stored = u32::from_be_bytes(f[64..68].try_into().unwrap());
        let mut zeroed = f;
        zeroed[64..68].fill(0);
        let sum: u32 = zeroed.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(stored, !sum);
        // 4 MiB: 8192 sectors, 17 per track, 4 heads: 120 cylinders.
        assert_eq!(geometry(4 << 20), (120, 4, 17));
        // The largest geometry caps at 65535 x 16 x 255.
        assert_eq!(geometry(4 << 40), (65535, 16, 255));
    }
}
