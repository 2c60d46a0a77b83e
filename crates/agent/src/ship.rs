//! Shipping: the agent streams its write log to a process server over mutual TLS, from where
//! the process server's cache ends, and drops the segments the process server acknowledged as
//! durable. Any failure (a cut link, a restarted process server) ends the session; the next one
//! resumes from the last acknowledged record, with backoff between attempts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_core::log::{FrameCheck, SEGMENT_HEADER_LEN, check_frame};
use boomerang_core::{DiskName, Seq};
use boomerang_wire::pki::CertRole;
use boomerang_wire::tls::{self, TlsIdentity};
use boomerang_wire::{Frame, FrameReader, FrameWriter, Outbound, Records, Role, WireError};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::logdir::{LogDir, first_seq_of, segments};

/// Where and as whom to ship.
#[derive(Clone)]
pub struct ShipConfig {
    /// The process server's `host:port`.
    pub addr: String,
    pub tls: TlsIdentity,
    /// The protected machine's name: the stream's name and the certificate's.
    pub name: String,
    pub disks: Vec<DiskName>,
}

/// Most bytes of records in one frame.
const BATCH: usize = 4 << 20;
/// How often the tail of the log is polled for new records.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("could not reach the process server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the write log in {}: {why}", dir.display())]
    Log { dir: PathBuf, why: String },
    #[error(
        "the process server asks for record {wanted}, but the log in {} starts at {first}: the records between are gone, so the disks need a resync",
        dir.display()
    )]
    Gone {
        dir: PathBuf,
        wanted: Seq,
        first: Seq,
    },
}

/// Ships until `stop` turns true, reconnecting after failures.
pub async fn ship(log: Arc<Mutex<LogDir>>, config: ShipConfig, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = session(&log, &config, stop.clone());
        let ended = tokio::select! {
            r = session => r,
            _ = stop.changed() => return,
        };
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(process_server = %config.addr, error = %e, retry_in = ?backoff, "log shipping stopped; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    log: &Arc<Mutex<LogDir>>,
    config: &ShipConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ShipError> {
    let tcp = tokio::net::TcpStream::connect(&config.addr)
        .await
        .map_err(|source| ShipError::Connect {
            addr: config.addr.clone(),
            source,
        })?;
    let host = config
        .addr
        .rsplit_once(':')
        .map_or(config.addr.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = tls::connect(config.tls.client_config()?, host, tcp).await?;
    let certs: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .to_vec();
    let (r, w) = tokio::io::split(stream);
    let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
    boomerang_wire::connect(
        &mut rd,
        &mut wr,
        Role::Agent,
        &config.name,
        Role::ProcessServer,
        |role, name| tls::vouch(Some(&certs), CertRole::Wire(role), name),
    )
    .await?;
    wr.send(&Frame::Open {
        stream: config.name.clone(),
        disks: config.disks.clone(),
    })
    .await?;
    let (next, credit) = match rd.read().await? {
        Frame::Resume { next_seq, credit } => (next_seq, credit),
        Frame::Error { code, message } => return Err(WireError::Refused { code, message }.into()),
        other => {
            return Err(WireError::Protocol(format!("expected resume, got {other:?}")).into());
        }
    };
    let dir = log
        .lock()
        .map_err(|_| ShipError::Log {
            dir: PathBuf::new(),
            why: "the log lock is poisoned".into(),
        })?
        .dir()
        .to_path_buf();
    tracing::info!(process_server = %config.addr, next_seq = %next, "shipping the write log");
    let mut tail = Tail::open(&dir, next)?;
    let mut out = Outbound::resume(next, credit);
    // Frames are read by a task of their own: a read cut short by `select!` would lose bytes.
    let (acks_tx, mut acks) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let frame = rd.read().await;
            let end = frame.is_err();
            if acks_tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    loop {
        // Send what the credit allows.
        while out.credit() > 0 {
            let budget = usize::try_from(out.credit())
                .unwrap_or(usize::MAX)
                .min(BATCH);
            let Some(records) = tail.next_batch(budget)? else {
                break;
            };
            wr.send(&Frame::Records(records.clone())).await?;
            out.sent(&records)
                .map_err(|v| WireError::Protocol(v.message))?;
        }
        tokio::select! {
            frame = acks.recv() => match frame {
                Some(Ok(Frame::Ack { durable, credit })) => {
                    out.acked(durable, credit).map_err(|v| WireError::Protocol(v.message))?;
                    let mut log = log.lock().map_err(|_| ShipError::Log {
                        dir: dir.clone(),
                        why: "the log lock is poisoned".into(),
                    })?;
                    log.release_through(durable).map_err(|e| ShipError::Log {
                        dir: dir.clone(),
                        why: e.to_string(),
                    })?;
                }
                Some(Ok(Frame::Ping { nonce })) => wr.send(&Frame::Pong { nonce }).await?,
                Some(Ok(Frame::Error { code, message })) => {
                    return Err(WireError::Refused { code, message }.into());
                }
                Some(Ok(other)) => {
                    return Err(WireError::Protocol(format!("unexpected {other:?}")).into());
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(WireError::Closed.into()),
            },
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => {
                let _ = wr.send(&Frame::Bye).await;
                return Ok(());
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whole record frames read from a segment: each one's sequence number and length, and their
/// bytes back to back.
type Frames = (Vec<(Seq, usize)>, Vec<u8>);

/// Reads the log's record frames in order from a sequence number on, following the newest
/// segment as it grows.
struct Tail {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    offset: u64,
    next: Seq,
}

impl Tail {
    fn open(dir: &Path, next: Seq) -> Result<Self, ShipError> {
        let err = |why: String| ShipError::Log {
            dir: dir.to_path_buf(),
            why,
        };
        let all = segments(dir).map_err(|e| err(e.to_string()))?;
        let first = all.first().and_then(|p| first_seq_of(p));
        // The last segment that starts at or before `next`.
        let Some(path) = all
            .iter()
            .rev()
            .find(|p| first_seq_of(p).is_some_and(|f| f <= next))
        else {
            return Err(ShipError::Gone {
                dir: dir.to_path_buf(),
                wanted: next,
                first: first.unwrap_or(Seq(0)),
            });
        };
        let file = File::open(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let mut tail = Tail {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file,
            offset: SEGMENT_HEADER_LEN as u64,
            next,
        };
        // Skip the records before `next` in this segment.
        tail.skip_to(next)?;
        Ok(tail)
    }

    fn err(&self, why: String) -> ShipError {
        ShipError::Log {
            dir: self.dir.clone(),
            why: format!("{}: {why}", self.path.display()),
        }
    }

    /// Advances past the records below `next`.
    fn skip_to(&mut self, next: Seq) -> Result<(), ShipError> {
        loop {
            let (frames, _) = self.read_frames(BATCH)?;
            let below: Vec<_> = frames.iter().take_while(|(seq, _)| *seq < next).collect();
            if below.is_empty() {
                return Ok(());
            }
            self.offset += below.iter().map(|(_, len)| *len as u64).sum::<u64>();
            if below.len() < frames.len() {
                return Ok(());
            }
        }
    }

    /// Whole frames from the current offset, at most `budget` bytes (at least one frame if a
    /// whole one is there): each frame's sequence number and length, and their bytes.
    fn read_frames(&self, budget: usize) -> Result<Frames, ShipError> {
        let size = self
            .file
            .metadata()
            .map_err(|e| self.err(e.to_string()))?
            .len();
        let avail = usize::try_from(size.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        let mut want = avail.min(budget.max(1 << 20));
        let mut buf = Vec::new();
        for _ in 0..2 {
            buf = vec![0u8; want];
            let n = read_full(&self.file, &mut buf, self.offset)
                .map_err(|e| self.err(e.to_string()))?;
            buf.truncate(n);
            // A first record longer than the read: read it whole if it is all there.
            match check_frame(&buf) {
                Ok(FrameCheck::Incomplete { needed })
                    if buf.len() >= boomerang_core::log::FRAME_HEADER_LEN
                        && buf.len() + needed <= avail =>
                {
                    want = buf.len() + needed;
                }
                _ => break,
            }
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let len = match check_frame(&buf[at..]) {
                Ok(FrameCheck::Complete { len }) => len,
                // The writer is mid-append: the rest comes later.
                Ok(FrameCheck::Incomplete { .. }) => break,
                Err(e) => {
                    return Err(self.err(format!(
                        "damaged record at byte {}: {e}",
                        self.offset + at as u64
                    )));
                }
            };
            if at > 0 && at + len > budget {
                break;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&buf[at + 8..at + 16]);
            frames.push((Seq(u64::from_le_bytes(seq)), len));
            at += len;
        }
        buf.truncate(at);
        Ok((frames, buf))
    }

    /// The next records, at most `budget` bytes (or one record larger than that), or `None`
    /// when none is written yet.
    fn next_batch(&mut self, budget: usize) -> Result<Option<Records>, ShipError> {
        loop {
            let (frames, bytes) = self.read_frames(budget)?;
            if let Some(&(first, _)) = frames.first() {
                if first != self.next {
                    return Err(self.err(format!(
                        "record {first} follows where record {} was expected",
                        self.next
                    )));
                }
                let last = frames.last().map_or(first, |f| f.0);
                let records =
                    Records::new(Bytes::from(bytes)).map_err(|e| self.err(e.to_string()))?;
                self.offset += records.bytes().len() as u64;
                self.next = Seq(last.0 + 1);
                return Ok(Some(records));
            }
            // Nothing more here: move on if a newer segment exists, else wait for appends.
            let all = segments(&self.dir).map_err(|e| self.err(e.to_string()))?;
            let Some(newer) = all.iter().find(|p| **p > self.path) else {
                return Ok(None);
            };
            // Re-read this segment's end first: it may have grown before the newer one appeared.
            let (again, _) = self.read_frames(budget)?;
            if !again.is_empty() {
                continue;
            }
            self.file = File::open(newer).map_err(|e| self.err(e.to_string()))?;
            self.path = newer.clone();
            self.offset = SEGMENT_HEADER_LEN as u64;
        }
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
