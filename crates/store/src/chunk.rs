//! Chunk objects: one block's data, named by the BLAKE3 hash of its uncompressed bytes.
//!
//! ```text
//! offset size field
//! 0      4    magic "BMCK"
//! 4      1    version = 1
//! 5      1    codec: 0 = stored as is, 1 = zstd
//! 6      2    reserved, zero
//! 8      4    raw length, u32 LE (<= 4 MiB)
//! 12     ..   payload
//! ```
//! A block whose zstd frame would not save at least 1/32 of its size is stored as is, so
//! incompressible data costs no decompression on read.

use boomerang_core::ChunkHash;
use bytes::Bytes;

pub const MAGIC: &[u8; 4] = b"BMCK";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// The largest block a store accepts (and so the largest raw chunk).
pub const MAX_RAW_LEN: usize = 4 << 20;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// The name of a block's content.
pub fn hash(data: &[u8]) -> ChunkHash {
    ChunkHash(*blake3::hash(data).as_bytes())
}

/// Whether every byte is zero (such blocks are stored as nothing).
pub use boomerang_core::is_zero;

/// Encodes a block as a chunk object.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let raw_len = u32::try_from(data.len()).expect("blocks are at most 4 MiB");
    let compressed = boomerang_core::pack::compress_within(data, data.len() - data.len() / 32);
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (CODEC_ZSTD, c),
        None => (CODEC_RAW, data),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(codec);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Why a chunk object was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("the chunk header is damaged")]
    Header,
    #[error("the chunk has format version {0}, which this Boomerang does not know")]
    Version(u8),
    #[error("the chunk's payload does not decompress")]
    Decompress,
    #[error("the chunk's content does not match its hash")]
    Hash,
    #[error("the chunk holds {found} bytes where the block needs {expected}")]
    Length { expected: usize, found: usize },
    /// A sealed store's object that does not open.
    #[error("the sealed chunk: {0}")]
    Sealed(#[from] crate::seal::SealError),
}

/// Decodes a chunk object and checks it against its name and the expected block length.
pub fn decode(bytes: &[u8], expected: &ChunkHash, block_len: usize) -> Result<Bytes, ChunkError> {
    decode_with(bytes, expected, block_len, crate::seal::Hasher::Plain)
}

/// [`decode`], for a store that names content with `hasher`.
pub fn decode_with(
    bytes: &[u8],
    expected: &ChunkHash,
    block_len: usize,
    hasher: crate::seal::Hasher,
) -> Result<Bytes, ChunkError> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC || bytes[6..8] != [0, 0] {
        return Err(ChunkError::Header);
    }
    if bytes[4] != VERSION {
        return Err(ChunkError::Version(bytes[4]));
    }
    let raw_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if raw_len > MAX_RAW_LEN {
        return Err(ChunkError::Header);
    }
    if raw_len != block_len {
        return Err(ChunkError::Length {
            expected: block_len,
            found: raw_len,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    let data = match bytes[5] {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => {
            zstd::bulk::decompress(payload, raw_len).map_err(|_| ChunkError::Decompress)?
        }
        _ => return Err(ChunkError::Header),
    };
    if data.len() != raw_len {
        return Err(ChunkError::Length {
            expected: raw_len,
            found: data.len(),
        });
    }
    if hasher.hash(&data) != *expected {
        return Err(ChunkError::Hash);
    }
    Ok(Bytes::from(data))
}

/// Decodes a chunk object whose block length is not known (an unreferenced object): the
/// length comes from its header.
pub fn decode_any(
    bytes: &[u8],
    expected: &ChunkHash,
    hasher: crate::seal::Hasher,
) -> Result<Bytes, ChunkError> {
    if bytes.len() < HEADER_LEN {
        return Err(ChunkError::Header);
    }
    let raw_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    decode_with(bytes, expected, raw_len, hasher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_and_random_blocks_round_trip() {
        let text = b"boomerang ".repeat(6554)[..65536].to_vec();
        let mut noise = vec![0u8; 65536];
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for block in [text, noise] {
            let h = hash(&block);
            let obj = encode(&block);
            assert_eq!(decode(&obj, &h, block.len()).unwrap(), block);
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let block = b"abcdefgh".repeat(512);
        let h = hash(&block);
        let obj = encode(&block);
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad, &h, block.len()).is_err(), "byte {i}");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
