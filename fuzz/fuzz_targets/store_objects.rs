//! Feeds arbitrary bytes to the replica store's decoders (chunk objects, tree nodes, point
//! manifests, pack indexes, sealed objects), as a damaged or hostile store would: they must never panic, a
//! chunk or node they accept must match the hash it was asked for, and no forged bytes open
//! as a sealed object.
//!
//! Run with `cargo +nightly fuzz run store_objects` from the repository root.

#![no_main]

use boomerang_core::ChunkHash;
use boomerang_store::chunk;
use boomerang_store::point::PointManifest;
use boomerang_store::seal::{self, DataKey, Hasher};
use boomerang_store::tree::decode_node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Name the object by its own hash half the time, so that decoding gets past the check.
    let named = chunk::hash(data);
    for expected in [named, ChunkHash([0x5a; 32])] {
        if let Ok(block) = chunk::decode_any(data, &expected, Hasher::Plain) {
            assert_eq!(chunk::hash(&block), expected);
        }
        for (level, count) in [(1, 1), (1, 256), (2, 3)] {
            if let Ok(kids) = decode_node(data, &expected, level, count) {
                assert_eq!(kids.len(), count);
            }
        }
    }
    let _ = PointManifest::decode(data, "points/fuzz/00000000000000000001.point");
    // A pack index: every entry it accepts is within a u64 range, and re-encodes to itself.
    for key in [None, Some(&[0x42u8; 32])] {
        if let Ok(entries) = boomerang_store::pack::decode_index(data, key) {
            assert!(entries.len() <= boomerang_store::pack::MAX_ENTRIES);
            assert_eq!(boomerang_store::pack::encode_index(&entries, key), data);
        }
    }
    // A forgery without the key never opens (the AEAD tag).
    let key = DataKey::from_bytes([0x42; 32]);
    assert!(seal::open_with(&key, "chunks/ab/abcd", data).is_err());
});
