//! Boomerang's shared vocabulary: identities, and the write-log record format.
//!
//! Apart from reading and writing log segment files, this crate does no I/O (no network, no
//! stores). Everything a protected machine writes travels through
//! Boomerang as [`log::Record`]s in segment files (see `docs/formats.md`): the agent's outbound
//! queue, the process server's cache and the master target's incoming log use the same bytes,
//! so a record is encoded once and forwarded by reference.
//!
//! Identities are newtypes ([`DiskName`], [`PointId`], [`Seq`], [`ChunkHash`]) so that a point id
//! can never be passed where a sequence number is expected.

pub mod ids;
pub mod log;
pub mod pack;
pub mod sample;

pub use ids::{ChunkHash, DiskName, InvalidName, PointId, Seq};

/// Whether every byte of `data` is zero: run on every block of every scan and copy.
pub fn is_zero(data: &[u8]) -> bool {
    // 16 bytes at a time, which the compiler vectorises.
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| <[u8; 16]>::try_from(w).is_ok_and(|w| u128::from_ne_bytes(w) == 0))
        && words.remainder().iter().all(|&b| b == 0)
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it (`PATH.tmp`),
/// synced, renamed over `path`, then the directory synced. After a crash `path` holds the old
/// bytes or the new, never a part.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// An error and its causes on one line, `outer: cause: root cause`, for logs and messages
/// that would otherwise show only the outermost sentence (and lose, say, the OS error).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // A wrapper that already quotes its cause adds nothing by repeating it.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_shows_the_causes_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = crate::log::LogError::Io {
            action: "append to",
            path: "/log/seg-1.log".into(),
            source: io,
        };
        let text = super::chain(&e);
        assert!(text.starts_with("could not append to write-log segment /log/seg-1.log: "));
        assert!(text.contains("No space left on device"), "{text}");
    }
}
