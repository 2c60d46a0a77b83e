//! The sending end of a record stream: the agent ships its write log to a process server, and
//! the process server forwards its cache to a master target, both over mutual TLS. A sender
//! streams from where the receiver's durable records end, and drops what the receiver
//! acknowledged. Any failure (a cut link, a restarted receiver) ends the session; the next one
//! resumes from the last acknowledged record, with backoff between attempts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boomerang_core::log::{LogTail, MAX_FRAME_LEN, TailError};
use boomerang_core::{DiskName, Seq};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::tls::{self, TlsIdentity};
use crate::{Frame, Outbound, Records, Role, WireError};

/// The log a sender streams from.
pub trait Source: Send + Sync + 'static {
    /// The directory of segment files.
    fn dir(&self) -> PathBuf;
    /// The sequence number the next record written here will have.
    fn next_seq(&self) -> Result<Seq, String>;
    /// Drops what the receiver holds durable, up to `durable` (whole segments only), of the
    /// records of `lineage` (the one the stream was opened with).
    fn release_through(&self, lineage: crate::cache::Lineage, durable: Seq) -> Result<(), String>;
    /// The lineage of the records: each connection opens the stream with it, and ends when
    /// it changes (records read after the change are of the new one).
    fn lineage(&self) -> Result<crate::cache::Lineage, String>;
    /// Called with the receiver's resume point before anything is sent: a log that may have
    /// lost records the receiver holds (a machine crash cut its unsynced end) may start its
    /// lineage again past them, and says so (it then resends what it must some other way);
    /// the stream then opens again with the lineage now. `false` leaves the usual check: a
    /// receiver ahead of the log has diverged from it.
    fn continue_after(&self, next: Seq) -> Result<bool, String> {
        let _ = next;
        Ok(false)
    }
    /// Called when the receiver wants record `wanted` and the log starts at `first` above it:
    /// the receiver lost records it held (a process server's cache replaced, or another
    /// process server). A log that can go on after the gap starts its lineage again later
    /// (every disk is then resent some other way) and returns the lineage now; `None` leaves
    /// the error, retried until an operator acts.
    fn on_gone(&self, wanted: Seq, first: Seq) -> Result<Option<crate::cache::Lineage>, String> {
        let _ = (wanted, first);
        Ok(None)
    }
    /// Notified when records were appended, to send them at once rather than at the next
    /// poll (synchronous replication).
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

/// Where and as whom to send.
#[derive(Clone)]
pub struct ShipConfig {
    /// The receiver's `host:port`.
    pub addr: String,
    pub tls: TlsIdentity,
    /// This component's name and role, as its certificate says.
    pub name: String,
    pub role: Role,
    /// The receiver's role.
    pub to: Role,
    /// The stream: the protected machine's name.
    pub stream: String,
    /// Compress records with zstd on the wire (worth it across a slow link).
    pub compress: bool,
    /// At most this many bytes of records per second (before compression), if set.
    pub max_rate: Option<u64>,
    pub disks: Vec<DiskName>,
}

/// Most bytes of records in one frame.
const BATCH: usize = 4 << 20;
/// How long a stopping sender waits for the acks of what it sent.
const BYE_WAIT: Duration = Duration::from_secs(3);
/// How often the tail of the log is polled for new records.
const POLL: Duration = Duration::from_millis(10);
/// The most a connection, its handshakes and the opening of the stream may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle session checks that the log's lineage did not change.
const LINEAGE_CHECK: Duration = Duration::from_secs(1);
/// A ping goes out when nothing was sent for this long.
const PING_EVERY: Duration = Duration::from_secs(10);
/// The session ends when the process server says nothing for this long.
const SILENCE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Dial(#[from] tls::DialError),
    #[error("could not read the write log in {}: {why}", dir.display())]
    Log { dir: PathBuf, why: String },
    #[error("the receiver said nothing for {0:?}: its host may be down or the link cut")]
    Stalled(Duration),
    #[error(
        "the receiver holds records up to {downstream} but this log ends at {here}: they diverged (a machine crash lost unsynced records here); the disks need a resync"
    )]
    Diverged { downstream: Seq, here: Seq },
    #[error("reading the log to send: {0}")]
    Tail(#[from] TailError),
    #[error("the log's records are of {now} now, not of {was}: the stream opens again with it")]
    NewLineage {
        was: crate::cache::Lineage,
        now: crate::cache::Lineage,
    },
}

/// Ships until `stop` turns true, reconnecting after failures.
pub async fn ship<S: Source>(log: Arc<S>, config: ShipConfig, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut progressed = false;
        let session = session(&log, &config, stop.clone(), &mut progressed);
        let ended = tokio::select! {
            r = session => r,
            _ = stop.changed() => return,
        };
        if progressed {
            // A session that got records through: the next failure starts the backoff afresh
            // (one refused at its first batch, by a full volume say, backs off further).
            backoff = Duration::from_millis(100);
        }
        match ended {
            Ok(()) => return,
            // Not a failure: the stream opens again at once, with the log's lineage now.
            Err(e @ ShipError::NewLineage { .. }) => {
                tracing::info!(to = %config.addr, stream = %config.stream, reason = %e, "opening the stream again");
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e) => {
                tracing::warn!(to = %config.addr, stream = %config.stream, error = %boomerang_core::chain(&e), retry_in = ?backoff, "log sending stopped; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

type Reader = tls::ClientReader;
type Writer = tls::ClientWriter;

async fn session<S: Source>(
    log: &Arc<S>,
    config: &ShipConfig,
    stop: watch::Receiver<bool>,
    progressed: &mut bool,
) -> Result<(), ShipError> {
    let lineage = log.lineage().map_err(|why| ShipError::Log {
        dir: log.dir(),
        why,
    })?;
    let opened = tokio::time::timeout(SETUP_TIMEOUT, open(config, lineage))
        .await
        .unwrap_or(Err(ShipError::Stalled(SETUP_TIMEOUT)))?;
    stream(log, config, stop, opened, lineage, progressed).await
}

/// Connects, runs both handshakes and opens the stream: the sequence number and credit the
/// process server resumes with.
async fn open(
    config: &ShipConfig,
    lineage: crate::cache::Lineage,
) -> Result<(Reader, Writer, Seq, u64), ShipError> {
    let (mut rd, mut wr, _) = tls::dial(
        &config.tls,
        &config.addr,
        config.role,
        &config.name,
        config.to,
    )
    .await?;
    wr.send(&Frame::Open {
        stream: config.stream.clone(),
        disks: config.disks.clone(),
        lineage: lineage.id,
        since: lineage.since,
    })
    .await?;
    match rd.read().await? {
        Frame::Resume { next_seq, credit } => Ok((rd, wr, next_seq, credit)),
        Frame::Error { code, message } => Err(WireError::Refused { code, message }.into()),
        other => Err(WireError::Protocol(format!("expected resume, got {other:?}")).into()),
    }
}

/// Streams records from the `next` sequence number the receiver opened with, until the
/// connection fails or `stop` turns true; `progressed` turns true at the first ack.
async fn stream<S: Source>(
    log: &Arc<S>,
    config: &ShipConfig,
    mut stop: watch::Receiver<bool>,
    (mut rd, mut wr, next, credit): (Reader, Writer, Seq, u64),
    lineage: crate::cache::Lineage,
    progressed: &mut bool,
) -> Result<(), ShipError> {
    let dir = log.dir();
    // The records sent must be of the lineage the stream was opened with.
    let same_lineage = || -> Result<(), ShipError> {
        let now = log.lineage().map_err(|why| ShipError::Log {
            dir: dir.clone(),
            why,
        })?;
        if now == lineage {
            Ok(())
        } else {
            Err(ShipError::NewLineage { was: lineage, now })
        }
    };
    let mut lineage_checked = Instant::now();
    if log.continue_after(next).map_err(|why| ShipError::Log {
        dir: dir.clone(),
        why,
    })? {
        same_lineage()?;
    }
    let log_next = log.next_seq().map_err(|why| ShipError::Log {
        dir: dir.clone(),
        why,
    })?;
    if next > log_next {
        // The process server holds records this log no longer has (the machine crashed
        // before they were synced here): the two have diverged.
        return Err(ShipError::Diverged {
            downstream: Seq(next.0 - 1),
            here: Seq(log_next.0.saturating_sub(1)),
        });
    }
    // What the receiver resumes after, it holds durable: as good as an ack.
    if next.0 > 1 {
        log.release_through(lineage, Seq(next.0 - 1))
            .map_err(|why| ShipError::Log {
                dir: dir.clone(),
                why,
            })?;
    }
    tracing::info!(to = %config.addr, stream = %config.stream, next_seq = %next, "sending the log");
    let mut tail = match LogTail::open(&dir, next) {
        Err(TailError::Gone { wanted, first, .. }) => {
            let now = log.on_gone(wanted, first).map_err(|why| ShipError::Log {
                dir: dir.clone(),
                why,
            })?;
            return Err(match now {
                // (The same lineage again: the receiver did not start again at its `since`;
                // retried with backoff rather than at once.)
                Some(now) if now != lineage => {
                    tracing::warn!(to = %config.addr, stream = %config.stream, %wanted, %first, %now, "the receiver lost records this log released: the stream starts again after them, and every disk is resent against the replica");
                    ShipError::NewLineage { was: lineage, now }
                }
                _ => TailError::Gone {
                    dir: dir.clone(),
                    wanted,
                    first,
                }
                .into(),
            });
        }
        tail => tail?,
    };
    let wake = log.wake();
    let mut out = Outbound::resume(next, credit);
    // Frames are read by a task of their own: a read cut short by `select!` would lose bytes.
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let frame = rd.read().await;
            let end = frame.is_err();
            if frames_tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    let _reader = tokio_util::task::AbortOnDropHandle::new(reader);
    let mut pace = Pace::default();
    let mut heard = Instant::now();
    let mut said = Instant::now();
    let mut nonce = 0u64;
    loop {
        // Send what the credit allows.
        while out.credit() > 0 {
            // Within the credit, and large enough for any record once the credit allows.
            let budget = usize::try_from(out.credit())
                .unwrap_or(usize::MAX)
                .min(BATCH.max(MAX_FRAME_LEN));
            let Some(batch) = tail.next_batch(budget)? else {
                break;
            };
            same_lineage()?;
            lineage_checked = Instant::now();
            let records = Records::new(Bytes::from(batch.bytes)).map_err(|e| ShipError::Log {
                dir: dir.clone(),
                why: format!("records {} to {}: {e}", batch.first, batch.last),
            })?;
            out.sent(&records)
                .map_err(|v| WireError::Protocol(v.message))?;
            if let Some(rate) = config.max_rate {
                tokio::time::sleep(pace.delay(records.bytes().len() as u64, rate)).await;
            }
            wr.send(&if config.compress {
                Frame::RecordsZstd(records)
            } else {
                Frame::Records(records)
            })
            .await?;
            said = Instant::now();
        }
        // A quiet link is checked: a ping when nothing was sent for a while, and the session
        // ends when the process server says nothing for too long (its host may be gone).
        if said.elapsed() >= PING_EVERY {
            nonce += 1;
            wr.send(&Frame::Ping { nonce }).await?;
            said = Instant::now();
        }
        if heard.elapsed() >= SILENCE {
            return Err(ShipError::Stalled(SILENCE));
        }
        if lineage_checked.elapsed() >= LINEAGE_CHECK {
            same_lineage()?;
            lineage_checked = Instant::now();
        }
        let first = tokio::select! {
            frame = frames.recv() => frame,
            _ = tokio::time::sleep(POLL) => continue,
            _ = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => continue,
            _ = stop.changed() => {
                // Wait a little for the acks of what is in flight, so that the log can drop
                // it and the receiver is not cut off mid-batch; then say goodbye.
                let deadline = tokio::time::Instant::now() + BYE_WAIT;
                while out.durable().map_or(0, |d| d.0) < out.next_seq().0.saturating_sub(1) {
                    match tokio::time::timeout_at(deadline, frames.recv()).await {
                        Ok(Some(Ok(Frame::Ack { durable, credit }))) => {
                            out.acked(durable, credit)
                                .map_err(|v| WireError::Protocol(v.message))?;
                            log.release_through(lineage, durable).map_err(|why| ShipError::Log {
                                dir: dir.clone(),
                                why,
                            })?;
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => break,
                    }
                }
                let _ = wr.send(&Frame::Bye).await;
                return Ok(());
            }
        };
        // Acks are cumulative: take every frame that is already waiting.
        let mut next_frame = first;
        while let Some(frame) = next_frame {
            heard = Instant::now();
            match frame {
                Ok(Frame::Ack { durable, credit }) => {
                    out.acked(durable, credit)
                        .map_err(|v| WireError::Protocol(v.message))?;
                    *progressed = true;
                    log.release_through(lineage, durable)
                        .map_err(|why| ShipError::Log {
                            dir: dir.clone(),
                            why,
                        })?;
                }
                Ok(Frame::Ping { nonce }) => wr.send(&Frame::Pong { nonce }).await?,
                Ok(Frame::Pong { .. }) => {}
                Ok(Frame::Error { code, message }) => {
                    return Err(WireError::Refused { code, message }.into());
                }
                Ok(other) => {
                    return Err(WireError::Protocol(format!("unexpected {other:?}")).into());
                }
                Err(e) => return Err(e.into()),
            }
            next_frame = frames.try_recv().ok();
        }
    }
}

/// Paces sending to a rate: each batch waits until the bytes sent so far fit the rate since
/// the pace started. An idle period earns no burst beyond one second's worth.
#[derive(Default)]
struct Pace {
    since: Option<Instant>,
    sent: u64,
}

impl Pace {
    /// How long to wait before sending `bytes` more at `rate` bytes per second.
    fn delay(&mut self, bytes: u64, rate: u64) -> Duration {
        let rate = rate.max(1);
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        // Forget what lies more than a second behind: no burst after idling.
        let allowed_start = now.checked_sub(Duration::from_secs(1)).unwrap_or(since);
        if since < allowed_start {
            let behind = (allowed_start - since).as_secs_f64();
            let credit = (behind * rate as f64) as u64;
            self.sent = self.sent.saturating_sub(credit);
            self.since = Some(allowed_start);
        }
        self.sent += bytes;
        let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
        let elapsed = now - self.since.unwrap_or(now);
        due.saturating_sub(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_holds_the_rate() {
        let mut pace = Pace::default();
        // 1 MB/s: the first 100 KB go at once-ish, the next ten wait their share.
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited += pace.delay(100_000, 1_000_000);
        }
        assert!(waited >= Duration::from_millis(4_000), "{waited:?}");
        assert!(pace.delay(0, 1_000_000) <= Duration::from_secs(1));
    }
}
