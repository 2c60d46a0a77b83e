//! Feeds arbitrary bytes to the write-log decoders: they must never panic, and whatever they
//! accept must re-encode to exactly the bytes it came from (the encoding is canonical).
//!
//! Run with `cargo +nightly fuzz run segment_decode` from the repository root.

#![no_main]

use boomerang_core::log::{
    FrameCheck, SEGMENT_HEADER_LEN, SegmentHeader, check_frame, decode_frame, decode_segment,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A whole segment, as read from a file.
    if let Ok(segment) = decode_segment(data) {
        let mut again = segment.header.encode().to_vec();
        for record in &segment.records {
            assert!(record.encode(&mut again).is_ok(), "a decoded record re-encodes");
        }
        let valid = usize::try_from(segment.end.valid_len()).expect("within the input");
        assert_eq!(&again[..], &data[..valid], "decoding is canonical");
    }

    // The same bytes after a valid header, so that the fuzzer reaches the records quickly.
    let header = SegmentHeader {
        first_seq: boomerang_core::Seq(0),
        created: boomerang_core::log::UnixNanos(0),
        max_len: u64::MAX,
    };
    let mut with_header = header.encode().to_vec();
    with_header.extend_from_slice(data);
    let segment = decode_segment(&with_header).expect("the header is valid");
    assert!(segment.end.valid_len() >= SEGMENT_HEADER_LEN as u64);

    // One frame, as read from a stream: check, then parse.
    match (check_frame(data), decode_frame(data)) {
        (Ok(FrameCheck::Complete { len }), Ok((record, n))) => {
            assert_eq!(len, n);
            let mut again = Vec::new();
            assert!(record.encode(&mut again).is_ok());
            assert_eq!(&again[..], &data[..n]);
        }
        (Ok(FrameCheck::Incomplete { .. }) | Err(_), Ok(_)) => {
            panic!("decode_frame accepted what check_frame did not")
        }
        _ => {}
    }
});
