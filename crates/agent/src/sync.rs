//! Keeping the copy downstream whole: the initial copy of protected disks, and the resend of
//! the blocks changed while the log was capped (a long outage, a full log volume, a machine
//! crash). Both go through the write log, while the machine keeps writing, and consistency
//! marks wait until they are done, so no recovery point shows a disk only partly copied.
//!
//! Progress of the initial copy is kept per disk in the log directory: `copy-<disk>.next` (the
//! next offset) while it runs, `copied-<disk>` once it is done. The resend clears the
//! dirty-block bitmap as it goes. Both leave out the blocks the replica holds already: before
//! it copies a disk the agent asks the master target, through its process server, for the
//! hashes of the replica's blocks (a digest, `boomerang_wire::digest`), and sends only the
//! blocks whose hash differs or that a change touched since the digest was asked for.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_core::Seq;
use boomerang_nbd::BlockDevice;
use boomerang_wire::tls::TlsIdentity;
use boomerang_wire::{DIGEST_BLOCK, DigestRequest, MAX_DIGEST_BLOCKS, Role, digest};

use crate::capture::{CaptureDevice, Copied, Target};
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

/// Forgets where the copy of `disk` stood, and its changed blocks: its next copy starts from a
/// comparison with its replica (a new generation, see [`crate::LogDir::new_generation`]).
pub fn forget(dir: &Path, disk: &boomerang_core::DiskName) -> std::io::Result<()> {
    for path in [
        progress_path(dir, disk.as_str()),
        done_path(dir, disk.as_str()),
        crate::capture::bitmap_path(dir, disk),
    ] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Copies exactly `ranges` of `device` into the log (a reprotect's resync set: what the
/// machine wrote since the failover's point, while the replica holds the disk as it was at
/// that point), then marks the disk copied: no comparison with the replica is needed. Returns
/// the bytes logged. On an error the disk stays not copied, and [`keep_in_sync`] compares it
/// whole.
pub async fn copy_ranges(
    log: &Arc<Mutex<LogDir>>,
    device: Arc<CaptureDevice>,
    ranges: &[(u64, u64)],
    cap: u64,
) -> Result<u64, String> {
    let dir = log
        .lock()
        .map_err(|_| "the write log lock is poisoned".to_string())?
        .dir()
        .to_path_buf();
    let name = device.disk().to_string();
    let mut total = 0;
    for &(offset, len) in ranges {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(CHUNK);
            wait_for_room(log, cap).await;
            let d = device.clone();
            total += blocking(move || d.copy_chunk(at, n, Target::Unknown))
                .await?
                .logged;
            at += n;
        }
    }
    boomerang_core::write_atomic(&done_path(&dir, &name), b"")
        .map_err(|e| format!("could not mark disk {name} copied: {e}"))?;
    tracing::info!(disk = %name, sent = total, ranges = ranges.len(), "copied what changed since the failover's point: the disk is protected");
    Ok(total)
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

/// Where a disk's copy downstream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Its first copy is not finished.
    InitialSync,
    /// Changed blocks wait in its bitmap, or a copy of the machine's disks runs (no mark,
    /// so no new recovery point, until it ends).
    Resync,
    /// Every change goes through the log.
    InSync,
}

/// A protected disk's state, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskState {
    pub disk: String,
    pub size: u64,
    pub sync: SyncState,
    /// Bytes of the initial copy done, while it runs.
    pub copied_bytes: Option<u64>,
}

/// The state of every disk, and the log position where the last copy or resend ended
/// (0 when none ran since the log was opened): a mark after it that is durable downstream
/// means the replica is whole.
pub fn states(log: &Mutex<LogDir>, disks: &[Arc<CaptureDevice>]) -> (Vec<DiskState>, Seq) {
    let (dir, syncing, through) = match log.lock() {
        Ok(l) => (l.dir().to_path_buf(), l.is_syncing(), l.synced_through()),
        Err(_) => return (Vec::new(), Seq(0)),
    };
    let states = disks
        .iter()
        .map(|d| {
            let name = d.disk().as_str();
            let (sync, copied_bytes) = if !copied(&dir, name) {
                (SyncState::InitialSync, Some(copy_progress(&dir, d)))
            } else if syncing || d.is_dirty().unwrap_or(true) {
                (SyncState::Resync, None)
            } else {
                (SyncState::InSync, None)
            };
            DiskState {
                disk: name.to_string(),
                size: d.size(),
                sync,
                copied_bytes,
            }
        })
        .collect();
    (states, through)
}

/// Where digests come from: the process server the agent ships to, which asks its master
/// target.
pub struct Digests {
    pub tls: TlsIdentity,
    pub addr: String,
    /// The machine's name: its stream.
    pub name: String,
}

/// What the target holds, for the blocks of one digest window.
#[derive(Clone)]
enum Known {
    Empty,
    Unknown,
    Hashes {
        first_block: u64,
        hashes: Arc<Vec<[u8; 32]>>,
    },
}

impl Known {
    fn target(&self) -> Target<'_> {
        match self {
            Known::Empty => Target::Empty,
            Known::Unknown => Target::Unknown,
            Known::Hashes {
                first_block,
                hashes,
            } => Target::Hashes {
                first_block: *first_block,
                hashes,
            },
        }
    }
}

/// Disk bytes one digest covers.
const WINDOW: u64 = MAX_DIGEST_BLOCKS as u64 * DIGEST_BLOCK;

/// The digests of one disk's replica, a window at a time, all taken after `after`.
struct Digester<'a> {
    remote: Option<&'a Digests>,
    device: &'a CaptureDevice,
    after: Seq,
    window: Option<(u64, Known)>,
}

impl Digester<'_> {
    /// What the target holds around `offset`; `otherwise` when there is no one to ask.
    async fn at(&mut self, offset: u64, otherwise: Known) -> Known {
        let window = offset / WINDOW;
        if let Some((w, known)) = &self.window
            && *w == window
        {
            return known.clone();
        }
        let known = match self.remote {
            None => otherwise,
            Some(remote) => self.fetch(remote, window).await,
        };
        self.window = Some((window, known.clone()));
        known
    }

    async fn fetch(&self, remote: &Digests, window: u64) -> Known {
        let first_block = window * MAX_DIGEST_BLOCKS as u64;
        let blocks = self.device.size().div_ceil(DIGEST_BLOCK);
        let request = DigestRequest {
            stream: remote.name.clone(),
            disk: self.device.disk().clone(),
            after: self.after,
            first_block,
            count: blocks
                .saturating_sub(first_block)
                .min(MAX_DIGEST_BLOCKS as u64) as u32,
        };
        let asked = digest::query(
            &remote.tls,
            &remote.addr,
            Role::Agent,
            &remote.name,
            Role::ProcessServer,
            request,
        )
        .await;
        match asked {
            Ok(d) if !d.replica => Known::Empty,
            Ok(d) => Known::Hashes {
                first_block,
                hashes: Arc::new(d.hashes),
            },
            Err(e) => {
                tracing::warn!(disk = %self.device.disk(), error = %boomerang_core::chain(&e), "no digest of the replica: every block of this part of the disk is sent");
                Known::Unknown
            }
        }
    }
}

/// Runs for the life of the agent: copies the disks not copied yet, and resends what the
/// bitmaps hold once a capped log has drained below half its cap, in both cases leaving out
/// the blocks the replica holds already (`digests`). Marks are held back while either is
/// unfinished; with `mark_when_whole`, a mark follows the end of each at once.
pub async fn keep_in_sync(
    log: Arc<Mutex<LogDir>>,
    disks: Vec<Arc<CaptureDevice>>,
    cap: u64,
    digests: Option<Digests>,
    mark_when_whole: bool,
) {
    let Ok(dir) = log.lock().map(|l| l.dir().to_path_buf()) else {
        return;
    };
    loop {
        match pass(&log, &dir, &disks, cap, digests.as_ref()).await {
            Ok(true) => {
                if let Ok(mut l) = log.lock() {
                    let was = l.is_syncing();
                    l.set_syncing(false);
                    // The copy is whole: a mark now makes it a recovery point at once, rather
                    // than at the next mark on the schedule.
                    if was
                        && mark_when_whole
                        && l.failed_over().is_none()
                        && let Err(e) = l.mark(boomerang_core::log::MarkKind::Crash)
                    {
                        tracing::warn!(error = %e, "could not mark the end of the copy");
                    }
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
    digests: Option<&Digests>,
) -> Result<bool, String> {
    {
        let mut l = log.lock().map_err(|_| "the log lock is poisoned")?;
        if l.resync_all_pending() {
            // Under the log lock: no copy runs, changes go to the bitmaps (capped), and no
            // mark is made before the resync (syncing from here on).
            for device in disks {
                device.mark_all_dirty().map_err(|e| e.to_string())?;
            }
            l.set_syncing(true);
            l.resync_all_marked().map_err(|e| e.to_string())?;
        }
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
        if !busy {
            busy = true;
            log.lock()
                .map_err(|_| "the log lock is poisoned")?
                .set_syncing(true);
        }
        let from = copy_progress(dir, device);
        if pending && from == 0 {
            // The size first, so that a digest taken after it covers the whole disk.
            let d = device.clone();
            blocking(move || d.announce_size()).await?;
        }
        let d = device.clone();
        let first = tokio::task::spawn_blocking(move || d.track_changes())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut digester = Digester {
            remote: digests,
            device,
            after: Seq(first.0.saturating_sub(1)),
            window: None,
        };
        let done = resend_and_copy(log, dir, device, cap, pending, from, &mut digester).await;
        device.untrack_changes();
        done?;
    }
    Ok(!busy
        || disks
            .iter()
            .all(|d| copied(dir, d.disk().as_str()) && d.is_dirty().is_ok_and(|x| !x)))
}

/// Resends what the bitmap of `device` holds, then (if `pending`) copies it from `from` on.
async fn resend_and_copy(
    log: &Arc<Mutex<LogDir>>,
    dir: &Path,
    device: &Arc<CaptureDevice>,
    cap: u64,
    pending: bool,
    from: u64,
    digester: &mut Digester<'_>,
) -> Result<(), String> {
    let name = device.disk().to_string();
    let mut total = Copied::default();
    let ranges = device.dirty_ranges().map_err(|e| e.to_string())?;
    for (start, len) in ranges {
        let mut at = start;
        while at < start + len {
            wait_for_room(log, cap).await;
            // The replica holds older data there: what it is, only a digest tells.
            let known = digester.at(at, Known::Unknown).await;
            let n = CHUNK.min(start + len - at);
            let (d, offset) = (device.clone(), at);
            total += blocking(move || d.resend(offset, n, known.target())).await?;
            at += n;
        }
    }
    if total != Copied::default() {
        tracing::info!(disk = %name, sent = total.logged, already_there = total.skipped, "changed blocks resent");
    }
    if !pending {
        return Ok(());
    }
    let progress = progress_path(dir, &name);
    let mut offset = from;
    let mut total = Copied::default();
    tracing::info!(disk = %name, from = offset, size = device.size(), "initial copy of the disk");
    while offset < device.size() {
        wait_for_room(log, cap).await;
        let known = digester.at(offset, Known::Empty).await;
        let (d, at) = (device.clone(), offset);
        total += blocking(move || d.copy_chunk(at, CHUNK, known.target())).await?;
        offset = (offset + CHUNK).min(device.size());
        // A hint for a restart after an agent crash (a machine crash resends every disk whole
        // through its bitmap anyway), every 64 MiB.
        if offset % (64 * CHUNK) == 0 {
            let _ = std::fs::write(&progress, offset.to_string());
        }
    }
    let _ = std::fs::write(done_path(dir, &name), b"");
    let _ = std::fs::remove_file(&progress);
    tracing::info!(disk = %name, sent = total.logged, already_there = total.skipped, "initial copy done: the disk is protected");
    Ok(())
}

/// Where the initial copy of `device` stopped (0: not started).
fn copy_progress(dir: &Path, device: &CaptureDevice) -> u64 {
    std::fs::read_to_string(progress_path(dir, device.disk().as_str()))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Keeps the log under half its cap, so that the copy leaves room for the machine's writes.
async fn wait_for_room(log: &Arc<Mutex<LogDir>>, cap: u64) {
    while log.lock().is_ok_and(|l| l.total_bytes() > cap / 2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
