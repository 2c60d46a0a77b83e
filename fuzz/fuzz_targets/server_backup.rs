//! Feeds arbitrary bytes to the decoder of configuration-server backups (`server restore`
//! reads them from a store at the other site): it must never panic, and no file it accepts
//! may lead out of the state directory.
//!
//! Run with `cargo +nightly fuzz run server_backup` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(files) = boomerang_server::backup::decode(data) {
        for (name, _) in files {
            let path = std::path::Path::new(&name);
            assert!(!path.is_absolute());
            assert!(
                path.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            );
        }
    }
});
