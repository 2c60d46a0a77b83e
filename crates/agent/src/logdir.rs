//! A write log as a directory of segment files named by their first sequence number:
//! `seg-<first seq, 20 digits>.log`. Appends go to the newest segment; a full segment rolls
//! over to a new one. Reopening cuts a torn tail of the newest segment (a crash mid-append).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use boomerang_core::log::{
    AppendOutcome, FRAME_OVERHEAD, LogError, MarkId, MarkKind, Op, Record, Repair,
    SEGMENT_HEADER_LEN, SegmentReader, SegmentWriter, UnixNanos, first_seq_of, segment_files,
    segment_name,
};
use boomerang_core::{DiskName, Seq};
use boomerang_wire::cache::Lineage;
use nix::fcntl::{Flock, FlockArg};

use crate::order::{Ticket, Turnstile};

/// Default size limit of one segment.
pub const DEFAULT_SEGMENT_LEN: u64 = 64 << 20;
/// Smallest segment size limit: a record piece of the capture device must fit with room to spare.
pub const MIN_SEGMENT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogDirError {
    #[error("could not use log directory {dir}: check that it exists and is writable")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "log directory {dir} is in use by another agent: stop it first, or give this agent its own --log-dir"
    )]
    Locked { dir: PathBuf },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "the write log in {dir} reached its cap of {cap} bytes (--log-max): changes are tracked in dirty-block bitmaps until the disk is resynced"
    )]
    Capped { dir: PathBuf, cap: u64 },
    #[error("the initial copy of a disk is still running: no consistency mark until it ends")]
    Syncing,

    #[error("the write log in {} is closed: the agent is stopping", dir.display())]
    Closed { dir: PathBuf },
    #[error(
        "machine of log directory {} was failed over at seq {seq}: its disks here take no more writes (no split brain); they take writes again once the machine is reprotected back here",
        dir.display()
    )]
    FailedOver { dir: PathBuf, seq: u64 },
    #[error(
        "the agent of log directory {} has not heard from its process server since the machine's crash, which may have cut records from its log that the process server holds: the failover waits until the process server answers (check that it runs and that this machine reaches it)",
        dir.display()
    )]
    AwaitingProcessServer { dir: PathBuf },
    #[error(
        "could not sync the disks at the agent's stop ({0}): the next start resyncs every disk whole; check the disk or volume for errors"
    )]
    DisksNotSynced(String),
    #[error("a segment size of {0} bytes is too small: use at least 1 MiB")]
    SegmentTooSmall(u64),
    #[error(
        "a record of {len} bytes does not fit in a segment of {max} bytes: raise the segment size"
    )]
    TooLarge { len: usize, max: u64 },
}

/// The open, locked write log of one agent.
pub struct LogDir {
    dir: PathBuf,
    max_segment: u64,
    writer: SegmentWriter,
    next_seq: Seq,
    next_mark: u64,
    /// Bytes in all segments.
    total: u64,
    cap: Option<u64>,
    capped: bool,
    /// The machine (not only the agent) went down while the agent ran: unsynced log records
    /// may be gone while the disk kept the writes, so the disks need a full resync.
    machine_crashed: bool,
    /// The agent stopped without [`LogDir::close_clean`] (crash of the agent or the machine).
    unclean_stop: bool,
    behind: WriteBehind,
    /// Closed cleanly: no more appends.
    closed: bool,
    /// A disk's initial copy is running: no marks.
    syncing: bool,
    /// See [`LogDir::synced_through`].
    synced_through: Seq,
    /// The highest sequence number acknowledged as durable downstream.
    acked: Seq,
    /// The last one written to [`ACKED`], and when.
    acked_written: Arc<AtomicU64>,
    acked_behind: AckedBehind,
    /// See [`LogDir::fail_over`].
    failed_over: Option<Seq>,
    /// `release_through` has nothing to delete below this acknowledged sequence number.
    release_floor: Seq,
    /// Disk order of the changes (see `order.rs`): tickets issued, and the turnstile.
    issued: u64,
    turnstile: Arc<Turnstile>,
    /// After a machine crash, until the process server first answers: the first record
    /// written since (see [`LogDir::continue_after_crash`]).
    crash_floor: Option<Seq>,
    /// The log went on past records it lost: every disk is to be resynced whole.
    resync_all: bool,
    /// See [`LogDir::lineage`].
    raised: Option<Seq>,
    _lock: Flock<File>,
}

/// See [`LogDir::changes_after`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    pub records: u64,
    pub bytes: u64,
    pub complete: bool,
}

/// Write-behind of the newest segment: the log is written once and read back rarely, so its
/// pages are handed to write-back early and dropped from the page cache once clean. Without
/// it, each appended byte takes a fresh page-cache page, dirty pages pile up by gigabytes, and
/// the kernel throttles the machine's writes once they pass its dirty limit; with it the log
/// keeps a few dozen MiB of cache and its pages are reused at once.
///
/// `POSIX_FADV_DONTNEED` starts write-back of dirty pages in its range and drops the clean
/// ones, so asking again a little later drops the pages written back in between. The advice
/// takes a millisecond or so and is given by a thread of its own, off the appending path; it is
/// advice only: durability still comes from [`LogDir::sync`].
#[derive(Default)]
struct WriteBehind {
    /// Segment length at the last advice.
    advised: u64,
    /// The advising thread, started at the first advice.
    advisor: Option<std::sync::mpsc::SyncSender<(File, u64, u64)>>,
}

impl WriteBehind {
    /// Advice is given every `STEP` bytes appended.
    const STEP: u64 = 8 << 20;

    fn appended(&mut self, writer: &SegmentWriter) {
        let len = writer.size();
        if len < self.advised + Self::STEP {
            return;
        }
        // The newest STEP stays cached for readers of the tail; the three before it are
        // handed to write-back, or dropped if already written.
        let end = len - Self::STEP;
        self.advise(writer, end.saturating_sub(3 * Self::STEP), end);
        self.advised = len;
    }

    /// Called on a segment that is complete and synced: nothing of it needs to stay cached.
    fn finished(&mut self, writer: &SegmentWriter) {
        self.advise(writer, 0, writer.size());
        self.advised = 0;
    }

    fn advise(&mut self, writer: &SegmentWriter, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let advisor = self.advisor.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(File, u64, u64)>(4);
            // If the thread cannot start, advice is dropped: the kernel's own write-back remains.
            let _ = std::thread::Builder::new()
                .name("log-writeback".into())
                .spawn(move || {
                    for (file, start, end) in rx {
                        drop_range(&file, start, end);
                    }
                });
            tx
        });
        // A busy advisor skips this advice: the next one overlaps it.
        if let Ok(file) = writer.file().try_clone() {
            let _ = advisor.try_send((file, start, end));
        }
    }
}

fn drop_range(file: &File, start: u64, end: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) else {
        return;
    };
    // Advice: a filesystem that ignores it only keeps more pages cached.
    let _ = posix_fadvise(file, start, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Writes [`ACKED`] from a thread of its own, at most every second: the file is synced, which
/// must hold up neither the log's lock nor the sender. The newest acknowledgement is written
/// within a second or so, also when acknowledgements stop coming. An aid only: a failure is
/// said, and tried again a second later.
#[derive(Default)]
struct AckedBehind {
    /// The highest record acknowledged, for the thread to write down.
    newest: Arc<AtomicU64>,
    /// Dropped with the log, which ends the thread.
    wake: Option<std::sync::mpsc::SyncSender<()>>,
}

impl AckedBehind {
    fn acked(&mut self, dir: &Path, acked: Seq, written: &Arc<AtomicU64>) {
        self.newest.fetch_max(acked.0, Ordering::Relaxed);
        let wake = self.wake.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let (path, newest, written) = (dir.join(ACKED), self.newest.clone(), written.clone());
            // If the thread cannot start, nothing is written down (the crash check then takes
            // the process server's word, as before the file existed).
            let _ = std::thread::Builder::new()
                .name("log-acked".into())
                .spawn(move || {
                    let second = std::time::Duration::from_secs(1);
                    while let Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        rx.recv_timeout(second)
                    {
                        let acked = newest.load(Ordering::Relaxed);
                        if acked <= written.load(Ordering::Relaxed) {
                            continue;
                        }
                        match boomerang_core::write_atomic(&path, format!("{acked}\n").as_bytes()) {
                            Ok(()) => {
                                written.fetch_max(acked, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::warn!(path = %path.display(), error = %e, "could not write down what the process server acknowledged; after a machine crash, a process server that lost records may go unnoticed");
                            }
                        }
                        // At most one write a second.
                        std::thread::sleep(second);
                    }
                });
            tx
        });
        // A write under way, or a wake-up pending: the thread sees the newest value anyway.
        let _ = wake.try_send(());
    }
}

/// What [`LogDir::append_entry`] appends: a record, or a write whose data is borrowed.
enum Entry<'a> {
    Record(&'a Record),
    Write {
        disk: &'a DiskName,
        offset: u64,
        data: &'a [u8],
    },
}

impl Entry<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Entry::Record(r) => r.encoded_len(),
            Entry::Write { disk, data, .. } => {
                FRAME_OVERHEAD + 1 + disk.as_str().len() + 8 + data.len()
            }
        }
    }

    /// Appends under `seq` (a record keeps the sequence number it was made with, which is the
    /// log's next one).
    fn append_to(&self, writer: &mut SegmentWriter, seq: Seq) -> Result<AppendOutcome, LogError> {
        match self {
            Entry::Record(r) => writer.append(r),
            Entry::Write { disk, offset, data } => writer.append_write(seq, disk, *offset, data),
        }
    }
}

/// After a machine crash: the first sequence number written since (decimal), until the
/// process server first answers.
const CRASH_FLOOR: &str = "crash.floor";
/// Present while every disk is to be resynced whole and the bitmaps do not say so yet (see
/// [`LogDir::continue_after_crash`]).
const RESYNC_ALL: &str = "resync.all";

/// After the process server lost records it had acknowledged: the sequence number the records
/// start again at (decimal; see [`LogDir::start_again`]).
const LINEAGE_SINCE: &str = "lineage.since";

/// The highest record the process server acknowledged (decimal), written at most every
/// second: a lower bound, which tells after a machine crash whether it lost records.
const ACKED: &str = "acked";

/// How far past its next sequence number the log starts its records again after a gap: past
/// any record a receiver may hold that this log lost in a machine crash (its unsynced end,
/// which the crash floor settles with the process server; one that lost its own records can
/// no longer say). A receiver that applied such a record must never take a new record under
/// its number, nor count it as applied.
const RESTART_GAP: u64 = 1 << 32;

fn write_raised(dir: &Path, since: Seq) -> std::io::Result<()> {
    boomerang_core::write_atomic(
        &dir.join(LINEAGE_SINCE),
        format!("{}\n", since.0).as_bytes(),
    )
}

/// The next mark id, kept when segments are released (`release_through`).
const NEXT_MARK: &str = "marks.next";

/// Marks a running agent; holds the boot id, to tell an agent crash from a machine crash.
const RUNNING: &str = "agent.running";
/// Written by a planned failover: the sequence number of the final mark. While it exists the
/// log takes no record, so the machine here cannot diverge from its failed-over copy.
const FAILED_OVER: &str = "failed-over";

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Removes `path`; one already gone is no error.
fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where [`LogDir::restart_after_gone`] started the records again, if it did: `Err` with the
/// text of a damaged file.
fn read_raised(dir: &Path) -> std::io::Result<Result<Option<Seq>, String>> {
    match std::fs::read_to_string(dir.join(LINEAGE_SINCE)) {
        Ok(text) => Ok(match text.trim().parse::<u64>() {
            Ok(since) if since > 0 => Ok(Some(Seq(since))),
            _ => Err(text),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(None)),
        Err(e) => Err(e),
    }
}

/// Whether any dirty-block bitmap in `dir` has a block set.
fn any_dirty_bitmap(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with("dirty-")
            && name.ends_with(".bitmap")
            && crate::bitmap::DirtyBitmap::inspect(&e.path())
                .is_ok_and(|b| b.is_some_and(|(_, n)| n > 0))
    })
}

/// Segment files of `dir` in log order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    segment_files(dir)
}

fn segment_path(dir: &Path, first: Seq) -> PathBuf {
    dir.join(segment_name(first))
}

/// Creates a segment and reserves its blocks without changing its size: appends then extend
/// the file without allocating, and a crash shows no zeros (the length is the written length).
fn create_segment(dir: &Path, first: Seq, max_segment: u64) -> Result<SegmentWriter, LogError> {
    let path = segment_path(dir, first);
    let writer = SegmentWriter::create(&path, first, max_segment)?;
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
        use nix::fcntl::{FallocateFlags, fallocate};
        // Best effort: a filesystem without fallocate just allocates as it goes.
        let _ = fallocate(
            &f,
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            max_segment as i64,
        );
    }
    Ok(writer)
}

impl LogDir {
    /// Opens (or creates) the log in `dir` and locks it.
    pub fn open(dir: &Path, max_segment: u64) -> Result<Self, LogDirError> {
        let io = |source| LogDirError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        if max_segment < MIN_SEGMENT {
            return Err(LogDirError::SegmentTooSmall(max_segment));
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock_file = File::create(dir.join("agent.lock")).map_err(io)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            LogDirError::Locked {
                dir: dir.to_path_buf(),
            }
        })?;
        // An agent that ran on an earlier boot and did not stop cleanly: the machine crashed.
        let running = dir.join(RUNNING);
        let now = boot_id();
        let previous = std::fs::read_to_string(&running).ok();
        let unclean_stop = previous.is_some();
        // Without a boot id the two cases cannot be told apart: assume the worse.
        let machine_crashed = previous.is_some_and(|b| b.trim() != now || now.is_empty());
        let existing = segments(dir).map_err(io)?;
        let (writer, next_seq, next_mark) = match existing.last() {
            None => {
                let w = create_segment(dir, Seq(1), max_segment)?;
                (w, Seq(1), 1)
            }
            Some(last) => {
                // After a machine crash every disk is resynced anyway, so damage in the
                // unsynced end of the log is cut rather than keeping the agent from starting.
                let repair = if machine_crashed {
                    Repair::DiscardFromDamage
                } else {
                    Repair::TornTailOnly
                };
                let (w, recovered) = SegmentWriter::open_append_with(last, repair)?;
                if recovered.cut > 0 {
                    tracing::warn!(segment = %last.display(), bytes = recovered.cut, "cut a torn tail left by a crash");
                }
                let next = recovered
                    .last_seq
                    .map_or(w.header().first_seq, |s| Seq(s.0 + 1));
                // Segments may have been released after shipping: the file keeps the floor.
                let kept = std::fs::read_to_string(dir.join(NEXT_MARK))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(1);
                let next_mark = last_mark(&existing)?.map_or(1, |m| m.0 + 1).max(kept);
                (w, next, next_mark)
            }
        };
        // A planned failover's marker that cannot be read still means failed over: the log
        // must not take writes the failed-over copy will never have.
        let failed_over = match std::fs::read_to_string(dir.join(FAILED_OVER)) {
            Ok(text) => Some(Seq(text.trim().parse().map_err(|_| LogDirError::Io {
                dir: dir.to_path_buf(),
                source: std::io::Error::other(format!(
                    "the planned-failover marker {} is damaged ({text:?}): the machine was failed over from here; if it was reprotected back, remove the file",
                    dir.join(FAILED_OVER).display()
                )),
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(LogDirError::Io {
                dir: dir.to_path_buf(),
                source,
            }),
        };
        let mut marker = File::create(&running).map_err(io)?;
        std::io::Write::write_all(&mut marker, now.as_bytes()).map_err(io)?;
        marker.sync_all().map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        // Records from here on are written after the crash: a process server holding records
        // from here on holds some this log lost. Kept until it first answers (the lowest, if
        // the machine crashes again before).
        let floor_path = dir.join(CRASH_FLOOR);
        let mut crash_floor = std::fs::read_to_string(&floor_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Seq);
        if machine_crashed && crash_floor.is_none_or(|f| next_seq < f) {
            boomerang_core::write_atomic(&floor_path, next_seq.0.to_string().as_bytes())
                .map_err(io)?;
            crash_floor = Some(next_seq);
        }
        // A skip after a crash whose whole-disk resync was not yet marked in the bitmaps.
        let resync_all = dir.join(RESYNC_ALL).exists();
        let (raised, damaged) = match read_raised(dir).map_err(io)? {
            Ok(raised) => (raised, None),
            Err(text) => (None, Some(text)),
        };
        // A lower bound of what the process server acknowledged (see `continue_after_crash`).
        let acked_written = match std::fs::read_to_string(dir.join(ACKED)) {
            Ok(text) => text.trim().parse::<u64>().map(Seq).unwrap_or_else(|_| {
                tracing::warn!(path = %dir.join(ACKED).display(), ?text, "damaged, so taken as nothing acknowledged: after a machine crash, a process server that lost records may go unnoticed");
                Seq(0)
            }),
            Err(_) => Seq(0),
        };
        let earlier_cap = any_dirty_bitmap(dir);
        if machine_crashed {
            tracing::warn!(dir = %dir.display(), "the machine went down while the agent ran: the log may miss writes the disks kept; every disk is marked for a full resync");
        } else if earlier_cap {
            tracing::warn!(dir = %dir.display(), "the log stopped at its cap before: changes go on into the dirty-block bitmaps until the disks are resynced");
        }
        let total = segments(dir)
            .map_err(io)?
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        let mut log = LogDir {
            dir: dir.to_path_buf(),
            max_segment,
            writer,
            next_seq,
            next_mark,
            total,
            cap: None,
            capped: machine_crashed || earlier_cap || resync_all,
            machine_crashed,
            unclean_stop,
            behind: WriteBehind::default(),
            closed: false,
            syncing: false,
            synced_through: Seq(0),
            acked: Seq(0),
            acked_written: Arc::new(AtomicU64::new(acked_written.0)),
            acked_behind: AckedBehind::default(),
            failed_over,
            release_floor: Seq(0),
            issued: 0,
            turnstile: Arc::default(),
            crash_floor,
            resync_all,
            raised,
            _lock: lock,
        };
        if let Some(text) = damaged {
            if log.failed_over.is_some() {
                // The log takes no record: there is nothing to send from either side of a gap.
                tracing::warn!(dir = %dir.display(), file = LINEAGE_SINCE, ?text, "the record of where the records start again is damaged; the log takes no record (failed over), so it is left as it is");
            } else {
                // Sending from before the gap would have the process server skip it, and
                // where the gap ends is not known: the records start again, as after any gap.
                tracing::warn!(dir = %dir.display(), file = LINEAGE_SINCE, ?text, "the record of where the records start again is damaged");
                log.start_again()?;
            }
        }
        if log.finish_start_again()?.is_some() {
            tracing::warn!(dir = %dir.display(), "a start again of the records was cut short: the records go on where it recorded, and every disk is resynced");
        }
        Ok(log)
    }

    /// Bounds the log: past `cap` bytes, appends fail with [`LogDirError::Capped`] and the
    /// caller tracks changes in a bitmap instead.
    pub fn with_cap(mut self, cap: Option<u64>) -> Self {
        self.cap = cap;
        self
    }

    /// Called with the next record the process server wants, before anything is sent, the
    /// first time after a machine crash. The log may have lost its unsynced end while the
    /// process server, or the master target past it, holds those records: the records written
    /// here since the crash reuse their sequence numbers for other changes, and a receiver
    /// would take them for the ones it holds. So:
    /// - when it wants one it had acknowledged (as far as [`ACKED`] says), it lost records,
    ///   which the master target may hold past those the log lost: which, nobody can say, so
    ///   the records start again past them all ([`LogDir::start_again`]);
    /// - when it wants a record from the first one written since the crash on, it holds
    ///   records the log lost: the log goes on after them (every record here is dropped, the
    ///   next one is `next`), and the replica keeps everything it has;
    /// - otherwise no receiver holds a record the log lost (as far as the process server
    ///   kept what it acknowledged, down to what [`ACKED`] says), and the log goes on as it is.
    ///
    /// Every disk is resynced whole after a machine crash either way (against the replica's
    /// digest; no mark until it is done). Returns the first record kept or written from now
    /// on, when records were dropped. An agent with no process server keeps its records (for a
    /// replay).
    pub fn continue_after_crash(&mut self, next: Seq) -> Result<Option<Seq>, LogDirError> {
        let Some(floor) = self.crash_floor else {
            return Ok(None);
        };
        if self.failed_over.is_some() {
            // The log takes no record, so it cannot resync: it stays as it is (the sender
            // reports the divergence).
            return Ok(None);
        }
        // (Acknowledged first: a process server may hold records the log lost and still have
        // lost later ones it had acknowledged.)
        let acked_written = Seq(self.acked_written.load(Ordering::Relaxed));
        let dropped_below = if next <= acked_written {
            let since = self.start_again()?;
            tracing::warn!(
                dir = %self.dir.display(),
                wanted = next.0,
                acknowledged = acked_written.0,
                since = since.0,
                "after the machine's crash the process server wants records it had acknowledged: it lost them, and the master target may hold records this log lost; the records start again past them, and every disk is resynced against the replica"
            );
            Some(since)
        } else if next > floor {
            self.begin_resync_all()?;
            self.drop_records_continue_at(next)?;
            tracing::warn!(
                dir = %self.dir.display(),
                dropped_from = floor.0,
                next = next.0,
                "the process server holds records this log lost in the machine's crash: the log goes on after them, and every disk is resynced against the replica"
            );
            Some(next)
        } else {
            None
        };
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        remove_if_present(&self.dir.join(CRASH_FLOOR)).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.crash_floor = None;
        Ok(dropped_below)
    }

    /// From here changes go to the bitmaps, no mark is made, and every disk is to be
    /// resynced whole; recorded before any record is dropped, so a restart in between still
    /// does it.
    fn begin_resync_all(&mut self) -> Result<(), LogDirError> {
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        self.turnstile.wait_for(self.issued);
        self.capped = true;
        self.resync_all = true;
        boomerang_core::write_atomic(&self.dir.join(RESYNC_ALL), b"").map_err(io)?;
        self.persist_next_mark().map_err(io)?;
        Ok(self.writer.sync()?)
    }

    /// Drops every record and goes on with `next` as the next one, in a new segment.
    fn drop_records_continue_at(&mut self, next: Seq) -> Result<(), LogDirError> {
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        let old = segments(&self.dir).map_err(io)?;
        // A segment starting at `next` may be there (a roll-over, or a skip cut short): its
        // records are dropped like the others.
        let target = segment_path(&self.dir, next);
        if target.exists() {
            std::fs::remove_file(&target).map_err(io)?;
        }
        self.writer = create_segment(&self.dir, next, self.max_segment)?;
        self.behind = WriteBehind::default();
        for path in old.iter().filter(|p| **p != target) {
            std::fs::remove_file(path).map_err(io)?;
        }
        self.next_seq = next;
        self.total = self.writer.size();
        self.release_floor = Seq(0);
        Ok(())
    }

    /// Called when the process server wants records this log released (it lost the records
    /// it held: its cache was replaced, or the agent now sends to another one). Nothing can
    /// fill the gap from here, so the stream starts again after it (see
    /// [`LogDir::start_again`]). Returns the lineage now: `lineage`, the one the records are
    /// of, from where they start again.
    pub fn restart_after_gone(&mut self, lineage: Lineage) -> Result<Lineage, LogDirError> {
        let since = self.start_again()?;
        let now = Lineage {
            id: lineage.id,
            since,
        };
        tracing::warn!(
            dir = %self.dir.display(),
            lineage = %now,
            "the process server lost records this log released: the records start again, and every disk is resynced against the replica"
        );
        Ok(now)
    }

    /// Starts the records again after a gap: every record held is dropped (no mark of them
    /// may become a point over the gap), every disk is resynced whole against the replica
    /// with no mark until it is done, and the records go on [`RESTART_GAP`] past the next
    /// one, where they start again (persisted). Returns that sequence number.
    fn start_again(&mut self) -> Result<Seq, LogDirError> {
        if let Some(seq) = self.failed_over {
            // The log takes no record, so it cannot resync.
            return Err(LogDirError::FailedOver {
                dir: self.dir.clone(),
                seq: seq.0,
            });
        }
        let since = self
            .next_seq
            .0
            .checked_add(RESTART_GAP)
            .map(Seq)
            .ok_or_else(|| LogDirError::Io {
                dir: self.dir.clone(),
                source: std::io::Error::other(
                    "the sequence numbers of the log are used up: start a new log directory",
                ),
            })?;
        // The resync is recorded first: the new start must never be durable without it, or
        // the gap would go unfilled.
        self.begin_resync_all()?;
        write_raised(&self.dir, since).map_err(|source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        self.raised = Some(since);
        self.drop_records_continue_at(since)?;
        Ok(since)
    }

    /// Ends a start again cut short (by a stop, or a full volume) after its new start was
    /// recorded: the records must go on there, as the receivers will ([`LogDir::lineage`]).
    /// Returns where the records went on, if they were dropped: records logged meanwhile (a
    /// resync may have run and ended) are resent with every disk again.
    fn finish_start_again(&mut self) -> Result<Option<Seq>, LogDirError> {
        match self.raised {
            Some(since) if since > self.next_seq && self.failed_over.is_none() => {
                self.begin_resync_all()?;
                self.drop_records_continue_at(since)?;
                Ok(Some(since))
            }
            _ => Ok(None),
        }
    }

    /// The highest record written to [`ACKED`] (see [`LogDir::release_through`]).
    pub fn acked_written(&self) -> Seq {
        Seq(self.acked_written.load(Ordering::Relaxed))
    }

    /// The lineage the records are of: `lineage` (the attachment's), starting later if the
    /// records started again later (see [`LogDir::restart_after_gone`]). A new lineage starts
    /// at the log's next record then, so later than that anyway.
    pub fn lineage(&self, lineage: Lineage) -> Lineage {
        Lineage {
            id: lineage.id,
            since: lineage.since.max(self.raised.unwrap_or(Seq(0))),
        }
    }

    /// Whether every disk is to be resynced whole and its bitmap does not say so yet (see
    /// [`LogDir::continue_after_crash`]); no mark is made meanwhile.
    pub fn resync_all_pending(&self) -> bool {
        self.resync_all
    }

    /// Every disk's bitmap is set whole: the resync it asked for is under way.
    pub fn resync_all_marked(&mut self) -> Result<(), LogDirError> {
        remove_if_present(&self.dir.join(RESYNC_ALL)).map_err(|source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        self.resync_all = false;
        Ok(())
    }

    /// Whether the process server has not answered since the machine's crash (see
    /// [`LogDir::continue_after_crash`]).
    pub fn awaiting_first_answer(&self) -> bool {
        self.crash_floor.is_some()
    }

    /// Whether the machine crashed while the agent ran (see [`LogDir::open`]).
    pub fn machine_crashed(&self) -> bool {
        self.machine_crashed
    }

    /// Whether the agent stopped without closing the log cleanly: the disks may lack the last
    /// changes of the newest segment (see [`LogDir::newest_segment`]).
    pub fn unclean_stop(&self) -> bool {
        self.unclean_stop
    }

    /// The segment being appended to. Every change logged in older segments is on the disks.
    pub fn newest_segment(&self) -> &Path {
        self.writer.path()
    }

    /// The place on the disks of the change just logged: the caller writes it to the disk when
    /// the ticket's turn comes, and the ticket's drop passes the turn on.
    pub fn ticket(&mut self) -> Ticket {
        let ticket = Ticket::new(self.turnstile.clone(), self.issued);
        self.issued += 1;
        ticket
    }

    /// Syncs the log, has `sync_disks` make the disks durable, and records a clean stop, so
    /// the next start trusts the log and the disks alike. Without the disks' sync, a machine
    /// crash after the stop could lose writes the disks held only in the page cache while the
    /// synced log (and the replica) kept them: the disk would differ from its replica unseen.
    /// If the disks cannot be synced the stop stays unclean, and every disk is to be resynced
    /// whole: after a failed sync the kernel may have dropped dirty pages of any age, more than
    /// an agent crash's redo of the newest segment would put back.
    pub fn close_clean(
        &mut self,
        sync_disks: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), LogDirError> {
        self.turnstile.wait_for(self.issued);
        // A write still in flight after this is refused: the log says it stopped cleanly.
        self.closed = true;
        self.writer.sync()?;
        if let Err(why) = sync_disks() {
            if let Err(e) = self.begin_resync_all() {
                tracing::error!(error = %boomerang_core::chain(&e), "could not mark the disks for a full resync");
            }
            return Err(LogDirError::DisksNotSynced(why));
        }
        std::fs::remove_file(self.dir.join(RUNNING)).map_err(|source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        })
    }

    /// Whether the log stopped taking records (cap reached or volume full).
    pub fn is_capped(&self) -> bool {
        self.capped
    }

    /// Bytes in all segments.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    fn cap_now(&mut self) -> LogDirError {
        if !self.capped {
            self.capped = true;
            // What was appended before the cap must be as durable as the disk will be.
            if let Err(e) = self.writer.sync() {
                tracing::error!(error = %boomerang_core::chain(&e), "could not sync the write log at its cap");
            }
            tracing::warn!(
                dir = %self.dir.display(),
                last_seq = self.next_seq.0.saturating_sub(1),
                "the write log stopped at its cap or a full volume; changed blocks are tracked in dirty-block bitmaps from now on (RPO alert)"
            );
        }
        LogDirError::Capped {
            dir: self.dir.clone(),
            cap: self.cap.unwrap_or(self.total),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Makes room for `len` bytes of records in the newest segment, rolling over now if they
    /// would not fit there, so that the records of one change share a segment (see
    /// [`LogDir::ticket`]). A change larger than `--segment-size` gets a segment of its own
    /// size.
    pub fn reserve(&mut self, len: u64) -> Result<(), LogDirError> {
        if self.capped || self.closed || self.writer.size() + len <= self.writer.header().max_len {
            return Ok(());
        }
        let header = SEGMENT_HEADER_LEN as u64;
        let max_len = self.max_segment.max(header + len);
        // Only the newest segment may hold changes not yet on the disks.
        self.turnstile.wait_for(self.issued);
        if self.writer.size() == header {
            // Empty: replaced by a larger one under the same name.
            let path = self.writer.path().to_path_buf();
            std::fs::remove_file(&path).map_err(|source| LogDirError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            self.total = self.total.saturating_sub(header);
        } else {
            self.writer.sync()?;
            self.behind.finished(&self.writer);
        }
        self.writer = create_segment(&self.dir, self.next_seq, max_len)?;
        self.total += self.writer.size();
        self.release_floor = self
            .release_floor
            .min(Seq(self.next_seq.0.saturating_sub(1)));
        Ok(())
    }

    /// Appends one record (not yet durable; see [`LogDir::sync`]) and returns its sequence.
    pub fn append(&mut self, op: Op) -> Result<Seq, LogDirError> {
        let record = Record {
            seq: self.next_seq,
            op,
        };
        self.append_entry(Entry::Record(&record))
    }

    /// Appends a write record of borrowed data, the same as [`LogDir::append`] of an
    /// [`Op::Write`] without copying the data first.
    pub fn append_write(
        &mut self,
        disk: &DiskName,
        offset: u64,
        data: &[u8],
    ) -> Result<Seq, LogDirError> {
        self.append_entry(Entry::Write { disk, offset, data })
    }

    fn append_entry(&mut self, entry: Entry<'_>) -> Result<Seq, LogDirError> {
        match self.append_inner(entry) {
            // The volume is full: stop logging rather than refuse the machine's writes.
            Err(LogDirError::Log(LogError::Io { source, .. }))
                if source.raw_os_error() == Some(28) =>
            {
                Err(self.cap_now())
            }
            other => other,
        }
    }

    fn append_inner(&mut self, entry: Entry<'_>) -> Result<Seq, LogDirError> {
        if self.closed {
            return Err(LogDirError::Closed {
                dir: self.dir.clone(),
            });
        }
        if let Some(seq) = self.failed_over {
            return Err(LogDirError::FailedOver {
                dir: self.dir.clone(),
                seq: seq.0,
            });
        }
        let seq = self.next_seq;
        let need = entry.encoded_len() as u64 + 64;
        if self.capped || self.cap.is_some_and(|c| self.total + need > c) {
            return Err(self.cap_now());
        }
        let before = self.writer.size();
        let rolled = matches!(entry.append_to(&mut self.writer, seq)?, AppendOutcome::Full);
        if rolled {
            // Only the newest segment may hold changes not yet on the disks: see `ticket`.
            self.turnstile.wait_for(self.issued);
            self.writer.sync()?;
            self.behind.finished(&self.writer);
            self.writer = create_segment(&self.dir, seq, self.max_segment)?;
            self.release_floor = self.release_floor.min(Seq(seq.0.saturating_sub(1)));
            if let AppendOutcome::Full = entry.append_to(&mut self.writer, seq)? {
                return Err(LogDirError::TooLarge {
                    len: entry.encoded_len(),
                    max: self.max_segment,
                });
            }
        }
        self.total += if rolled {
            self.writer.size()
        } else {
            self.writer.size() - before
        };
        self.next_seq = Seq(seq.0 + 1);
        self.behind.appended(&self.writer);
        Ok(seq)
    }

    /// Deletes the segments whose every record is at or below `durable` (acknowledged as
    /// durable downstream), except the one being appended to; returns the bytes freed. A
    /// segment's records end where the next segment's begin, so only whole segments go.
    pub fn release_through(&mut self, durable: Seq) -> Result<u64, LogDirError> {
        self.acked = self.acked.max(durable);
        if self.acked > self.acked_written() {
            self.acked_behind
                .acked(&self.dir, self.acked, &self.acked_written);
        }
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        // Called on every ack: nothing to do until the oldest segment is wholly acknowledged.
        if durable < self.release_floor {
            return Ok(0);
        }
        let all = segments(&self.dir).map_err(io)?;
        let mut freed = 0;
        self.release_floor = Seq(u64::MAX);
        for pair in all.windows(2) {
            let [old, next] = pair else { continue };
            if old == self.writer.path() {
                break;
            }
            let Some(next_first) = first_seq_of(next) else {
                break;
            };
            if next_first.0.saturating_sub(1) > durable.0 {
                self.release_floor = Seq(next_first.0.saturating_sub(1));
                break;
            }
            if freed == 0 {
                // Marks in the segments about to go would no longer tell the next start which
                // mark ids are taken: keep the next id in a file first.
                self.persist_next_mark().map_err(io)?;
            }
            let len = std::fs::metadata(old).map_err(io)?.len();
            std::fs::remove_file(old).map_err(io)?;
            self.total = self.total.saturating_sub(len);
            freed += len;
        }
        if freed > 0 {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(freed)
    }

    fn persist_next_mark(&self) -> std::io::Result<()> {
        boomerang_core::write_atomic(
            &self.dir.join(NEXT_MARK),
            self.next_mark.to_string().as_bytes(),
        )
    }

    /// Appends a consistency mark; returns its id and sequence number.
    pub fn mark(&mut self, kind: MarkKind) -> Result<(MarkId, Seq), LogDirError> {
        if self.syncing || self.resync_all {
            // A point at this mark would hold a half-copied disk.
            return Err(LogDirError::Syncing);
        }
        let id = MarkId(self.next_mark);
        let seq = self.append(Op::Mark {
            kind,
            id,
            time: UnixNanos::now(),
        })?;
        self.next_mark += 1;
        Ok((id, seq))
    }

    /// The highest sequence number acknowledged as durable downstream since the log was
    /// opened.
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// A planned failover: appends a final mark, makes the log durable, and from then on
    /// refuses every record (persisted in `failed-over`, so a restarted agent refuses them
    /// too): the machine's disks here stay exactly as they were at the mark. Returns the
    /// mark's sequence number; called again, the same one.
    pub fn fail_over(&mut self) -> Result<Seq, LogDirError> {
        if let Some(seq) = self.failed_over {
            return Ok(seq);
        }
        if self.crash_floor.is_some() {
            return Err(LogDirError::AwaitingProcessServer {
                dir: self.dir.clone(),
            });
        }
        let (_, seq) = self.mark(MarkKind::Crash)?;
        self.writer.sync()?;
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        boomerang_core::write_atomic(&self.dir.join(FAILED_OVER), seq.0.to_string().as_bytes())
            .map_err(io)?;
        self.failed_over = Some(seq);
        Ok(seq)
    }

    /// The final mark of a planned failover, if the machine was failed over from here.
    pub fn failed_over(&self) -> Option<Seq> {
        self.failed_over
    }

    /// What the machine changed here after `point` (a failover's point elsewhere): the change
    /// records (writes, zeroes, trims) past it, and their bytes. `complete` is false when
    /// records past `point` were already released, so more may have been changed than the
    /// log still shows.
    pub fn changes_after(&self, point: Seq) -> Result<Changes, LogDirError> {
        let mut changes = Changes {
            records: 0,
            bytes: 0,
            complete: true,
        };
        let mut first = true;
        for record in read_all(&self.dir)? {
            let record = record?;
            if first {
                // Records between the point and the oldest one kept are gone.
                changes.complete = record.seq.0 <= point.0.saturating_add(1);
                first = false;
            }
            if record.seq <= point {
                continue;
            }
            let len = match &record.op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Zero { len, .. } | Op::Trim { len, .. } => *len,
                _ => continue,
            };
            changes.records += 1;
            changes.bytes += len;
        }
        if first {
            changes.complete = self.next_seq.0 <= point.0.saturating_add(1);
        }
        // Changes the log did not take (capped, or lost with a machine crash) are in the
        // bitmaps, or nowhere: how many there are is not known.
        if self.capped || self.machine_crashed || any_dirty_bitmap(&self.dir) {
            changes.complete = false;
        }
        Ok(changes)
    }

    /// Refuses every record from now on, as [`LogDir::fail_over`] does, without a mark (a
    /// release after an unplanned failover: the machine runs elsewhere). Persisted.
    pub fn fence(&mut self) -> Result<(), LogDirError> {
        if self.failed_over.is_some() {
            return Ok(());
        }
        let last = Seq(self.next_seq.0.saturating_sub(1));
        self.writer.sync()?;
        boomerang_core::write_atomic(&self.dir.join(FAILED_OVER), last.0.to_string().as_bytes())
            .map_err(|source| LogDirError::Io {
                dir: self.dir.clone(),
                source,
            })?;
        self.failed_over = Some(last);
        Ok(())
    }

    /// A new start for the machine's disks here (the configuration server attached them after
    /// a failover): every record so far is dropped, as their replica starts again from a
    /// comparison of the disks, and a planned failover's marker goes. Sequence numbers and
    /// mark ids go on from where they were, so that a process server that took the old
    /// records takes the new ones too. Call it before anything reads or appends.
    pub fn new_generation(&mut self) -> Result<(), LogDirError> {
        let io = |source| LogDirError::Io {
            dir: self.dir.clone(),
            source,
        };
        self.persist_next_mark().map_err(io)?;
        let old = segments(&self.dir).map_err(io)?;
        if self.writer.size() > SEGMENT_HEADER_LEN as u64 {
            self.writer.sync()?;
            self.writer = create_segment(&self.dir, self.next_seq, self.max_segment)?;
        }
        for path in old.iter().filter(|p| p.as_path() != self.writer.path()) {
            std::fs::remove_file(path).map_err(io)?;
        }
        remove_if_present(&self.dir.join(FAILED_OVER)).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.failed_over = None;
        self.total = self.writer.size();
        self.release_floor = Seq(0);
        // Nothing is owed from before: the disks are copied again from here.
        self.capped = false;
        Ok(())
    }

    /// While a disk's initial copy runs, marks are refused: no recovery point may show a disk
    /// only partly copied.
    pub fn set_syncing(&mut self, syncing: bool) {
        if self.syncing && !syncing {
            self.synced_through = Seq(self.next_seq.0.saturating_sub(1));
        }
        self.syncing = syncing;
    }

    /// The last record of the last copy or resend (see [`LogDir::set_syncing`]); 0 when none
    /// ended since the log was opened.
    pub fn synced_through(&self) -> Seq {
        self.synced_through
    }

    /// Takes records again after a cap: the caller resends what the bitmaps hold.
    pub fn uncap(&mut self) {
        if self.capped {
            tracing::warn!(dir = %self.dir.display(), "the write log takes records again; the blocks changed meanwhile are being resent");
        }
        self.capped = false;
    }

    /// Whether a disk's initial copy is running.
    pub fn is_syncing(&self) -> bool {
        self.syncing
    }

    /// Waits until every change logged so far is on the disks (call with the log locked, so
    /// that no new change comes in meanwhile).
    pub fn wait_applied(&self) {
        self.turnstile.wait_for(self.issued);
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), LogDirError> {
        Ok(self.writer.sync()?)
    }
}

/// The id of the last mark in the log, if any.
/// Marks come every few seconds, so the newest segments hold the last one: segments are read
/// from the newest back, and the first that has a mark ends the search.
fn last_mark(segments: &[PathBuf]) -> Result<Option<MarkId>, LogError> {
    for path in segments.iter().rev() {
        let mut last = None;
        for record in SegmentReader::open(path)? {
            if let Op::Mark { id, .. } = record?.op {
                last = Some(id);
            }
        }
        if last.is_some() {
            return Ok(last);
        }
    }
    Ok(None)
}

/// Every record of the log in `dir`, in order.
pub fn read_all(dir: &Path) -> Result<impl Iterator<Item = Result<Record, LogError>>, LogDirError> {
    let paths = segments(dir).map_err(|source| LogDirError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut readers = Vec::new();
    for p in paths {
        readers.push(SegmentReader::open(&p)?);
    }
    Ok(readers.into_iter().flatten())
}

/// The agent's log, as the sender to the process server reads it; with synchronous
/// replication, the link its writers wait on.
pub struct Shipped {
    pub log: std::sync::Arc<std::sync::Mutex<LogDir>>,
    pub link: Option<std::sync::Arc<crate::replica::SyncLink>>,
    /// The lineage of the disks' replica the records are for (fixed for the agent's run: an
    /// attach restarts it).
    pub lineage: Lineage,
}

impl Shipped {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, LogDir>, String> {
        self.log
            .lock()
            .map_err(|_| "the write log lock is poisoned".to_string())
    }
}

impl boomerang_wire::send::Source for Shipped {
    fn dir(&self) -> PathBuf {
        self.lock()
            .map(|l| l.dir().to_path_buf())
            .unwrap_or_default()
    }

    fn next_seq(&self) -> Result<Seq, String> {
        Ok(self.lock()?.next_seq())
    }

    fn lineage(&self) -> Result<Lineage, String> {
        Ok(self.lock()?.lineage(self.lineage))
    }

    fn release_through(&self, lineage: Lineage, durable: Seq) -> Result<(), String> {
        // An ack from before the lineage started again (see `on_gone`) is of records dropped.
        if lineage != self.lock()?.lineage(self.lineage) {
            return Ok(());
        }
        if let Some(link) = &self.link {
            link.acked(durable);
        }
        self.lock()?
            .release_through(durable)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn continue_after(&self, next: Seq) -> Result<bool, String> {
        let since = {
            let mut log = self.lock()?;
            let finished = log.finish_start_again();
            finished
                .and_then(|finished| Ok(log.continue_after_crash(next)?.or(finished)))
                .map_err(|e| boomerang_core::chain(&e).to_string())?
        };
        if let (Some(since), Some(link)) = (since, &self.link) {
            // Writers waiting for dropped records are not confirmed by later acks.
            link.lost_below(since);
        }
        Ok(since.is_some())
    }

    fn on_gone(&self, wanted: Seq, first: Seq) -> Result<Option<Lineage>, String> {
        let mut log = self.lock()?;
        let lineage = log.lineage(self.lineage);
        if wanted < lineage.since {
            // Not a record of this lineage: the receiver is stale (it refuses the stream).
            return Ok(None);
        }
        tracing::warn!(dir = %log.dir().display(), %wanted, %first, "the process server wants records this log released");
        let now = log
            .restart_after_gone(lineage)
            .map_err(|e| boomerang_core::chain(&e).to_string())?;
        drop(log);
        if let Some(link) = &self.link {
            // Writers waiting for dropped records are not confirmed by later acks.
            link.lost_below(now.since);
        }
        Ok(Some(now))
    }

    fn wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.link.as_ref().map(|l| l.wake.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_whose_disks_could_not_be_synced_counts_as_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
            let refused = log.close_clean(|| Err("disk d: EIO".into()));
            assert!(
                matches!(&refused, Err(LogDirError::DisksNotSynced(why)) if why == "disk d: EIO"),
                "{refused:?}"
            );
        }
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert!(log.unclean_stop(), "the next start checks the disks");
        assert!(log.resync_all_pending(), "every disk is resynced whole");
        log.resync_all_marked().unwrap();
        let mut synced = false;
        log.close_clean(|| {
            synced = true;
            Ok(())
        })
        .unwrap();
        assert!(synced);
        drop(log);
        assert!(
            !LogDir::open(dir.path(), MIN_SEGMENT)
                .unwrap()
                .unclean_stop()
        );
    }

    #[test]
    fn a_failed_over_log_takes_no_record_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskName::new("d").unwrap();
        let write = |log: &mut LogDir| {
            log.append(Op::Write {
                disk: disk.clone(),
                offset: 0,
                data: vec![1; 512],
            })
        };
        let seq = {
            let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
            write(&mut log).unwrap();
            assert_eq!(log.failed_over(), None);
            let seq = log.fail_over().unwrap();
            assert_eq!(seq, Seq(2), "the final mark follows the last write");
            assert_eq!(log.fail_over().unwrap(), seq, "asked again, the same mark");
            assert!(matches!(
                write(&mut log),
                Err(LogDirError::FailedOver { seq: 2, .. })
            ));
            log.close_clean(|| Ok(())).unwrap();
            seq
        };
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert_eq!(log.failed_over(), Some(seq));
        assert!(matches!(
            write(&mut log),
            Err(LogDirError::FailedOver { .. })
        ));
        assert!(log.mark(MarkKind::Crash).is_err());
        // The final mark is in the log, durable.
        let records: Vec<_> = read_all(dir.path()).unwrap().map(|r| r.unwrap()).collect();
        assert!(matches!(
            records.last().map(|r| (&r.op, r.seq)),
            Some((Op::Mark { .. }, s)) if s == seq
        ));
    }

    /// The log in `dir` went on at `at`: it holds no record of before (none of their marks may
    /// become a point), owes a resync of every disk, and makes no mark until it is done.
    fn assert_goes_on_whole_at(log: &mut LogDir, dir: &Path, at: Seq) {
        assert_eq!(log.next_seq(), at);
        assert_eq!(segments(dir).unwrap(), vec![segment_path(dir, at)]);
        assert!(log.is_capped() && log.resync_all_pending());
        assert!(
            matches!(log.mark(MarkKind::Crash), Err(LogDirError::Syncing)),
            "no mark before the resync"
        );
    }

    /// Appends `n` small records to `log`.
    /// A small change to disk `d`.
    fn zero() -> Op {
        Op::Zero {
            disk: DiskName::new("d").unwrap(),
            offset: 0,
            len: 512,
        }
    }

    fn append_zeros(log: &mut LogDir, n: usize) {
        for _ in 0..n {
            log.append(zero()).unwrap();
        }
    }

    /// Opens the log in `dir` as after a crash of the machine (another boot id), with `writes`
    /// more records appended.
    fn crash_and_write(dir: &Path, writes: usize) -> LogDir {
        std::fs::write(dir.join(RUNNING), "another boot\n").unwrap();
        let mut log = LogDir::open(dir, MIN_SEGMENT).unwrap();
        assert!(log.machine_crashed());
        log.uncap();
        append_zeros(&mut log, writes);
        log
    }

    #[test]
    fn after_a_crash_the_first_answer_decides_whether_the_log_goes_on_after_the_receiver() {
        let dir = tempfile::tempdir().unwrap();
        // Records 1..=5, then the machine crashes: the floor is 6, records 6..=8 follow.
        {
            let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
            for _ in 0..5 {
                log.append(zero()).unwrap();
            }
        }
        let mut log = crash_and_write(dir.path(), 3);
        assert_eq!(log.crash_floor, Some(Seq(6)));
        assert!(log.awaiting_first_answer());
        assert!(
            matches!(
                log.fail_over(),
                Err(LogDirError::AwaitingProcessServer { .. })
            ),
            "no failover before the process server answers"
        );
        // A receiver that holds nothing from the floor on: the records stay.
        assert_eq!(log.continue_after_crash(Seq(4)).unwrap(), None);
        assert!(!log.awaiting_first_answer());
        assert!(!dir.path().join(CRASH_FLOOR).exists());
        assert_eq!(log.next_seq(), Seq(9));
        assert_eq!(log.continue_after_crash(Seq(30)).unwrap(), None, "settled");
        drop(log);

        // Another crash: the floor is 9, record 9 follows. A receiver that wants record 11
        // holds records this log lost; a segment already starting there goes too.
        let mut log = crash_and_write(dir.path(), 1);
        assert_eq!(log.crash_floor, Some(Seq(9)));
        SegmentWriter::create(segment_path(dir.path(), Seq(11)), Seq(11), MIN_SEGMENT).unwrap();
        assert_eq!(log.continue_after_crash(Seq(11)).unwrap(), Some(Seq(11)));
        assert_goes_on_whole_at(&mut log, dir.path(), Seq(11));
        // A restart before the bitmaps are marked: the resync is still owed.
        drop(log);
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert!(log.resync_all_pending() && log.is_capped());
        assert!(!log.awaiting_first_answer());
        log.resync_all_marked().unwrap();
        assert!(!dir.path().join(RESYNC_ALL).exists());
        log.uncap();
        assert_eq!(log.append(zero()).unwrap(), Seq(11));
    }

    #[test]
    fn after_a_crash_a_process_server_that_lost_acknowledged_records_starts_them_again() {
        let dir = tempfile::tempdir().unwrap();
        // Records 1..=5, acknowledged through 4 (written down, as the sender does), then the
        // machine crashes: the floor is 6, records 6..=8 follow.
        {
            let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
            append_zeros(&mut log, 5);
            // Written down from a thread of its own, at most once a second; the newest one
            // too once acknowledgements stop.
            log.release_through(Seq(3)).unwrap();
            log.release_through(Seq(4)).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while log.acked_written() < Seq(4) {
                assert!(std::time::Instant::now() < deadline, "acked not written");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert_eq!(
                std::fs::read_to_string(dir.path().join(ACKED)).unwrap(),
                "4\n"
            );
        }
        let mut log = crash_and_write(dir.path(), 3);
        // A process server that wants record 3 lost records it had acknowledged (its cache
        // was replaced): the master target may hold records this log lost, under numbers it
        // gives again. The records start again past them all.
        let since = Seq(9 + RESTART_GAP);
        assert_eq!(log.continue_after_crash(Seq(3)).unwrap(), Some(since));
        assert_eq!(log.lineage(Lineage::FIRST).since, since);
        assert_eq!(log.next_seq(), since);
        assert!(log.is_capped() && log.resync_all_pending());
        assert!(!log.awaiting_first_answer());
    }

    #[test]
    fn a_receiver_that_lost_released_records_makes_the_lineage_start_again_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lineage {
            id: 3,
            since: Seq(1),
        };
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        for _ in 0..7 {
            log.append(zero()).unwrap();
        }
        assert_eq!(log.lineage(first), first);
        let now = log.restart_after_gone(first).unwrap();
        // Past any record a receiver may hold that this log lost in a machine crash.
        let since = Seq(8 + RESTART_GAP);
        assert_eq!(now, Lineage { id: 3, since });
        assert_eq!(log.lineage(first), now);
        assert_goes_on_whole_at(&mut log, dir.path(), since);
        // Kept across a restart; a new lineage starts where it says (later).
        drop(log);
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert_eq!(log.lineage(first), now);
        let newer = Lineage {
            id: 4,
            since: Seq(since.0 + 5),
        };
        assert_eq!(log.lineage(newer), newer);
        assert!(log.resync_all_pending() && log.is_capped());
        log.resync_all_marked().unwrap();
        log.uncap();
        for _ in 0..3 {
            log.append(zero()).unwrap();
        }
        assert_eq!(log.next_seq(), Seq(since.0 + 3));
        // A damaged record of it: where the gap ends is not known, so the records start again,
        // with every disk resynced, rather than from before the gap.
        drop(log);
        std::fs::write(dir.path().join(LINEAGE_SINCE), "3 x\n").unwrap();
        let log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        let again = Seq(since.0 + 3 + RESTART_GAP);
        assert_eq!(log.lineage(first).since, again);
        assert_eq!(log.next_seq(), again);
        assert!(log.resync_all_pending() && log.is_capped());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LINEAGE_SINCE)).unwrap(),
            format!("{}\n", again.0)
        );
    }

    #[test]
    fn a_start_again_cut_short_after_its_start_was_recorded_goes_on_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        append_zeros(&mut log, 3);
        // Stopped after `lineage.since` was written, before the records were dropped, and
        // after a resync had run and ended (`resync.all` gone, records 1..=3 logged since):
        // the receivers start at 1000, so the log must too, and resync every disk again.
        write_raised(dir.path(), Seq(1000)).unwrap();
        drop(log);
        let log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert_eq!(log.next_seq(), Seq(1000));
        assert_eq!(log.lineage(Lineage::FIRST).since, Seq(1000));
        assert!(log.resync_all_pending());
        assert_eq!(
            segments(dir.path()).unwrap(),
            vec![segment_path(dir.path(), Seq(1000))]
        );
    }

    #[test]
    fn repeated_crashes_keep_the_lowest_floor() {
        let dir = tempfile::tempdir().unwrap();
        drop(crash_and_write(dir.path(), 2));
        drop(crash_and_write(dir.path(), 2));
        let log = crash_and_write(dir.path(), 0);
        assert_eq!(log.crash_floor, Some(Seq(1)));
    }

    #[test]
    fn rolls_over_reopens_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskName::new("d").unwrap();
        {
            assert!(matches!(
                LogDir::open(dir.path(), 8192),
                Err(LogDirError::SegmentTooSmall(8192))
            ));
            let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
            assert!(matches!(
                LogDir::open(dir.path(), MIN_SEGMENT),
                Err(LogDirError::Locked { .. })
            ));
            for i in 0..20u64 {
                log.append(Op::Write {
                    disk: disk.clone(),
                    offset: i * 1000,
                    data: vec![i as u8; 300_000],
                })
                .unwrap();
            }
            let (id, _) = log.mark(MarkKind::Crash).unwrap();
            assert_eq!(id, MarkId(1));
            log.sync().unwrap();
        }
        assert!(
            segments(dir.path()).unwrap().len() >= 3,
            "1 MiB segments roll over"
        );
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert_eq!(log.next_seq(), Seq(22));
        assert_eq!(log.mark(MarkKind::App).unwrap().0, MarkId(2));
        drop(log);
        let seqs: Vec<u64> = read_all(dir.path())
            .unwrap()
            .map(|r| r.unwrap().seq.0)
            .collect();
        assert_eq!(seqs, (1..=22).collect::<Vec<_>>());

        // Acknowledged segments go, whole, and never the one being appended to.
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        // Writes after the last mark, enough to start a segment without marks.
        for i in 0..6u64 {
            log.append_write(&disk, i * 1000, &[7u8; 300_000]).unwrap();
        }
        let before = segments(dir.path()).unwrap();
        let second_first = first_seq_of(&before[1]).unwrap();
        assert_eq!(log.release_through(Seq(second_first.0 - 2)).unwrap(), 0);
        let total = log.total_bytes();
        let freed = log.release_through(Seq(second_first.0 - 1)).unwrap();
        assert!(freed > 0 && log.total_bytes() == total - freed);
        assert_eq!(segments(dir.path()).unwrap(), before[1..]);
        log.release_through(Seq(u64::MAX)).unwrap();
        assert_eq!(
            segments(dir.path()).unwrap().last(),
            before.last(),
            "the newest segment stays"
        );
        // The marks went with their segments; their ids are not given again.
        drop(log);
        let mut log = LogDir::open(dir.path(), MIN_SEGMENT).unwrap();
        assert_eq!(log.mark(MarkKind::Crash).unwrap().0, MarkId(3));
    }
}
