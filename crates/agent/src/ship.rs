//! Shipping: the agent streams its write log to a process server over mutual TLS, from where
//! the process server's cache ends, and drops the segments the process server acknowledged as
//! durable. Any failure (a cut link, a restarted process server) ends the session; the next one
//! resumes from the last acknowledged record, with backoff between attempts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boomerang_core::log::{LogTail, MAX_FRAME_LEN, TailError};
use boomerang_core::{DiskName, Seq};
use boomerang_wire::pki::CertRole;
use boomerang_wire::tls::{self, TlsIdentity};
use boomerang_wire::{Frame, FrameReader, FrameWriter, Outbound, Records, Role, WireError};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::logdir::LogDir;

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
/// The most a connection, its handshakes and the opening of the stream may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
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
    #[error("could not reach the process server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the write log in {}: {why}", dir.display())]
    Log { dir: PathBuf, why: String },
    #[error("the process server said nothing for {0:?}: its host may be down or the link cut")]
    Stalled(Duration),
    #[error(
        "the process server holds records up to {downstream} but this log ends at {here}: they diverged (a machine crash lost unsynced records here); the disks need a resync"
    )]
    Diverged { downstream: Seq, here: Seq },
    #[error("reading the write log for the process server: {0}")]
    Tail(#[from] TailError),
}

/// Ships until `stop` turns true, reconnecting after failures.
pub async fn ship(log: Arc<Mutex<LogDir>>, config: ShipConfig, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut resumed = false;
        let session = session(&log, &config, stop.clone(), &mut resumed);
        let ended = tokio::select! {
            r = session => r,
            _ = stop.changed() => return,
        };
        if resumed {
            // A session that got going: the next failure starts the backoff afresh.
            backoff = Duration::from_millis(100);
        }
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

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
type Reader = FrameReader<tokio::io::ReadHalf<Tls>>;
type Writer = FrameWriter<tokio::io::WriteHalf<Tls>>;

async fn session(
    log: &Arc<Mutex<LogDir>>,
    config: &ShipConfig,
    stop: watch::Receiver<bool>,
    resumed: &mut bool,
) -> Result<(), ShipError> {
    let (rd, wr, next, credit) = tokio::time::timeout(SETUP_TIMEOUT, open(config))
        .await
        .unwrap_or(Err(ShipError::Stalled(SETUP_TIMEOUT)))?;
    *resumed = true;
    stream(log, config, stop, rd, wr, next, credit).await
}

/// Connects, runs both handshakes and opens the stream: the sequence number and credit the
/// process server resumes with.
async fn open(config: &ShipConfig) -> Result<(Reader, Writer, Seq, u64), ShipError> {
    let tcp = tokio::net::TcpStream::connect(&config.addr)
        .await
        .map_err(|source| ShipError::Connect {
            addr: config.addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
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
    match rd.read().await? {
        Frame::Resume { next_seq, credit } => Ok((rd, wr, next_seq, credit)),
        Frame::Error { code, message } => Err(WireError::Refused { code, message }.into()),
        other => Err(WireError::Protocol(format!("expected resume, got {other:?}")).into()),
    }
}

/// Streams records from `next` on until the connection fails or `stop` turns true.
async fn stream(
    log: &Arc<Mutex<LogDir>>,
    config: &ShipConfig,
    mut stop: watch::Receiver<bool>,
    mut rd: Reader,
    mut wr: Writer,
    next: Seq,
    credit: u64,
) -> Result<(), ShipError> {
    let (dir, log_next) = {
        let log = log.lock().map_err(|_| poisoned())?;
        (log.dir().to_path_buf(), log.next_seq())
    };
    if next > log_next {
        // The process server holds records this log no longer has (the machine crashed
        // before they were synced here): the two have diverged.
        return Err(ShipError::Diverged {
            downstream: Seq(next.0 - 1),
            here: Seq(log_next.0.saturating_sub(1)),
        });
    }
    tracing::info!(process_server = %config.addr, next_seq = %next, "shipping the write log");
    let mut tail = LogTail::open(&dir, next)?;
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
    let _reader = AbortOnDrop(reader);
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
            let records = Records::new(Bytes::from(batch.bytes)).map_err(|e| ShipError::Log {
                dir: dir.clone(),
                why: format!("records {} to {}: {e}", batch.first, batch.last),
            })?;
            out.sent(&records)
                .map_err(|v| WireError::Protocol(v.message))?;
            wr.send(&Frame::Records(records)).await?;
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
        let first = tokio::select! {
            frame = frames.recv() => frame,
            _ = tokio::time::sleep(POLL) => continue,
            _ = stop.changed() => {
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
                    log.lock()
                        .map_err(|_| poisoned())?
                        .release_through(durable)
                        .map_err(|e| ShipError::Log {
                            dir: dir.clone(),
                            why: e.to_string(),
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

fn poisoned() -> ShipError {
    ShipError::Log {
        dir: PathBuf::new(),
        why: "the log lock is poisoned".into(),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
