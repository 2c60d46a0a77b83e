//! Keeping the copy downstream whole: the initial copy of protected disks, and the resend of
//! the blocks changed while the log was capped (a long outage, a full log volume, a machine
//! crash). Both go through the write log, while the machine keeps writing, and consistency
//! marks wait until they are done, so no recovery point shows a disk only partly copied.
//!
//! Progress of the initial copy is kept per disk in the log directory: `copy-<disk>.next` (the
//! next offset) while it runs, `copied-<disk>` once it is done. The resend clears the
//! dirty-block bitmap as it goes.

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

/// Holds marks back at once if a disk is not copied yet or its bitmap holds changes: call it
/// before marks start, so that none slips in before [`keep_in_sync`] runs.
pub fn hold_marks(log: &Mutex<LogDir>, disks: &[Arc<CaptureDevice>]) {
    let Ok(mut l) = log.lock() else {
        return;
    };
    let dir = l.dir().to_path_buf();
    let unfinished = disks
        .iter()
        .any(|d| !copied(&dir, d.disk().as_str()) || d.is_dirty().unwrap_or(true));
    if unfinished {
        l.set_syncing(true);
    }
}

/// Runs for the life of the agent: copies the disks not copied yet, and resends what the
/// bitmaps hold once a capped log has drained below half its cap. Marks are held back while
/// either is unfinished.
pub async fn keep_in_sync(log: Arc<Mutex<LogDir>>, disks: Vec<Arc<CaptureDevice>>, cap: u64) {
    let Ok(dir) = log.lock().map(|l| l.dir().to_path_buf()) else {
        return;
    };
    loop {
        match pass(&log, &dir, &disks, cap).await {
            Ok(true) => {
                if let Ok(mut l) = log.lock() {
                    l.set_syncing(false);
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the copy downstream is not whole yet; retrying (RPO alert)")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One pass; `Ok(true)` when every disk is copied and no bitmap holds anything.
async fn pass(
    log: &Arc<Mutex<LogDir>>,
    dir: &Path,
    disks: &[Arc<CaptureDevice>],
    cap: u64,
) -> Result<bool, String> {
    {
        let mut l = log.lock().map_err(|_| "the log lock is poisoned")?;
        if l.is_capped() {
            if l.total_bytes() > cap / 2 {
                // Still draining downstream.
                return Ok(false);
            }
            l.uncap();
        }
    }
    let mut busy = false;
    for device in disks {
        let dirty = device.is_dirty().map_err(|e| e.to_string())?;
        let pending = !copied(dir, device.disk().as_str());
        if !dirty && !pending {
            continue;
        }
        let ranges = device.dirty_ranges().map_err(|e| e.to_string())?;
        if !busy {
            busy = true;
            log.lock()
                .map_err(|_| "the log lock is poisoned")?
                .set_syncing(true);
        }
        for (start, len) in ranges {
            let mut at = start;
            while at < start + len {
                wait_for_room(log, cap).await;
                let n = CHUNK.min(start + len - at);
                let (d, offset) = (device.clone(), at);
                blocking(move || d.resend(offset, n)).await?;
                at += n;
            }
        }
        if pending {
            copy_disk(log, dir, device, cap).await?;
        }
    }
    Ok(!busy
        || disks
            .iter()
            .all(|d| copied(dir, d.disk().as_str()) && d.is_dirty().is_ok_and(|x| !x)))
}

/// The initial copy of one disk, from where it stopped.
async fn copy_disk(
    log: &Arc<Mutex<LogDir>>,
    dir: &Path,
    device: &Arc<CaptureDevice>,
    cap: u64,
) -> Result<(), String> {
    let name = device.disk().to_string();
    let progress = progress_path(dir, &name);
    let mut offset: u64 = std::fs::read_to_string(&progress)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if offset == 0 {
        let d = device.clone();
        blocking(move || d.announce_size()).await?;
    }
    tracing::info!(disk = %name, from = offset, size = device.size(), "initial copy of the disk");
    while offset < device.size() {
        wait_for_room(log, cap).await;
        let (d, at) = (device.clone(), offset);
        blocking(move || d.copy_chunk(at, CHUNK)).await?;
        offset = (offset + CHUNK).min(device.size());
        // A hint for a restart after an agent crash; a machine crash resends every disk whole
        // through its bitmap anyway.
        let _ = std::fs::write(&progress, offset.to_string());
    }
    let _ = std::fs::write(done_path(dir, &name), b"");
    let _ = std::fs::remove_file(&progress);
    tracing::info!(disk = %name, "initial copy done: the disk is protected");
    Ok(())
}

/// Keeps the log under half its cap, so that the copy leaves room for the machine's writes.
async fn wait_for_room(log: &Arc<Mutex<LogDir>>, cap: u64) {
    while log.lock().is_ok_and(|l| l.total_bytes() > cap / 2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> Result<(), String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
