//! The initial copy of protected disks: before a disk is protected, its whole content goes
//! downstream (blocks of zeros excepted, since a replica starts as zeros), through the write
//! log, in chunks, while the machine keeps writing. Consistency marks wait until every disk is
//! copied, so no recovery point shows a disk only partly copied.
//!
//! Progress is kept per disk in the log directory: `copy-<disk>.next` (the next offset) while
//! the copy runs, `copied-<disk>` once it is done.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_nbd::BlockDevice;

use crate::capture::CaptureDevice;
use crate::logdir::LogDir;

/// Bytes read and logged at a time.
const CHUNK: u64 = 1 << 20;

fn progress_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("copy-{disk}.next"))
}

fn done_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("copied-{disk}"))
}

/// Whether the initial copy of `disk` has finished.
pub fn copied(dir: &Path, disk: &str) -> bool {
    done_path(dir, disk).exists()
}

/// Copies every disk not copied yet, then lets marks through. The copy keeps the log under
/// half its cap, waiting for the shipper to drain it.
pub async fn initial_copy(log: Arc<Mutex<LogDir>>, disks: Vec<Arc<CaptureDevice>>, cap: u64) {
    let Ok(dir) = log.lock().map(|l| l.dir().to_path_buf()) else {
        return;
    };
    let pending: Vec<_> = disks
        .into_iter()
        .filter(|d| !copied(&dir, d.disk().as_str()))
        .collect();
    if pending.is_empty() {
        return;
    }
    if let Ok(mut l) = log.lock() {
        l.set_syncing(true);
    }
    for device in pending {
        let name = device.disk().to_string();
        let progress = progress_path(&dir, &name);
        let mut offset: u64 = std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if offset == 0 {
            let d = device.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || d.announce_size())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            {
                tracing::warn!(disk = %name, error = %e, "could not log the disk's size; the initial copy stops");
                return;
            }
        }
        tracing::info!(disk = %name, from = offset, size = device.size(), "initial copy of the disk");
        while offset < device.size() {
            let total = log.lock().map(|l| l.total_bytes()).unwrap_or(0);
            if total > cap / 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let d = device.clone();
            let at = offset;
            let copied = tokio::task::spawn_blocking(move || d.copy_chunk(at, CHUNK))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = copied {
                tracing::warn!(disk = %name, offset, error = %e, "the initial copy stopped; marks stay off until the disk is resynced");
                return;
            }
            offset = (offset + CHUNK).min(device.size());
            // Progress is a hint for a restart after an agent crash; a machine crash resyncs
            // every disk from the start anyway.
            let _ = std::fs::write(&progress, offset.to_string());
        }
        let _ = std::fs::write(done_path(&dir, &name), b"");
        let _ = std::fs::remove_file(&progress);
        tracing::info!(disk = %name, "initial copy done: the disk is protected");
    }
    if let Ok(mut l) = log.lock() {
        l.set_syncing(false);
    }
}
