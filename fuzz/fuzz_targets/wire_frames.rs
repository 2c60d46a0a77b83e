//! Feeds arbitrary bytes to the replication protocol's frame decoder, as a peer could send
//! them: it must never panic, and every frame it accepts must re-encode to exactly the bytes it
//! came from (the encoding is canonical; compressed records must decode again to the same
//! records).
//!
//! Run with `cargo +nightly fuzz run wire_frames` from the repository root.

#![no_main]

use boomerang_wire::{Decoded, Frame, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A stream of frames, as a connection delivers them.
    while let Ok(Decoded::Frame(frame, len)) = decode(rest) {
        let mut again = Vec::new();
        frame.encode(&mut again).expect("a decoded frame re-encodes");
        if let Frame::RecordsZstd(records) = &frame {
            // Another compressor may have made those bytes: what counts is the records.
            let Ok(Decoded::Frame(Frame::RecordsZstd(back) | Frame::Records(back), _)) =
                decode(&again)
            else {
                panic!("re-encoded compressed records decode");
            };
            assert_eq!(&back, records, "compression keeps the records");
        } else {
            assert_eq!(&again[..], &rest[..len], "decoding is canonical");
        }
        if let Frame::Records(records) = &frame {
            assert_eq!(records.iter().count(), records.len(), "every record decodes again");
        }
        rest = &rest[len..];
    }
});
