//! zstd compression shared by the wire (record batches between process server and master
//! target) and the replica store (chunks): one fast level, and one compression context per
//! thread, reused, since creating a context costs more than compressing a small block.

use std::cell::RefCell;

/// zstd's level: the fastest regular level keeps most of the gain on disk data, and
/// compression is on the path of every replicated byte.
pub const LEVEL: i32 = 1;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// `data` compressed into one zstd frame, if that frame is shorter than `within` bytes;
/// `None` when it is not (incompressible data) or compression failed.
pub fn compress_within(data: &[u8], within: usize) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Compressor::new(LEVEL).ok()?);
        }
        let compressor = cell.as_mut()?;
        let mut out = Vec::with_capacity(within.saturating_sub(1));
        // Fails with "destination buffer too small" past `within - 1` bytes, which ends the
        // work on incompressible data early.
        compressor.compress_to_buffer(data, &mut out).ok()?;
        Some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_shrinks_and_comes_back() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let packed = compress_within(&data, data.len()).expect("repetitive data compresses");
        assert!(packed.len() < data.len() / 10);
        assert_eq!(zstd::bulk::decompress(&packed, data.len()).unwrap(), data);
        // The context is reused: a second call gives the same frame.
        assert_eq!(compress_within(&data, data.len()), Some(packed));
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress_within(&data, data.len() - data.len() / 32), None);
    }
}
