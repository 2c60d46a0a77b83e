//! The receiving end of record streams, shared by the process server (from agents) and the
//! master target (from process servers): each record is persisted in a cache directory per
//! stream (the write-log segment format, bytes as received) before it is acknowledged.
//!
//! ```text
//! client ──TLS──▶ accept: TLS, Hello (the certificate must back it), Open{stream, disks}
//!                ◀── Resume{next = cache's last durable + 1, credit}
//! Records ──▶ checked (stream rules) ─▶ cache append ─▶ fdatasync ─▶ Ack{durable, credit}
//!                                                                  └▶ on_durable(stream, seq)
//! ```
//!
//! Invariants: an acknowledged record is durable in the cache; a stream has at most one
//! connection at a time; an agent writes only its own machine's stream; the disks of all
//! streams stay within the receiver's limit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use boomerang_core::DiskName;

use crate::pki::{self, CertRole};
use crate::tls::{self, TlsIdentity};
use crate::{ErrorCode, Frame, FrameReader, FrameWriter, Inbound, Role, WireError, accept};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::cache::{CacheError, Lineage, StreamCache};

/// The most a TLS handshake, a hello or an open may take.
pub const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A stream whose sender says nothing for this long is closed (senders ping every 10 s).
pub const SILENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes of records an agent may have in flight, unacknowledged.
pub const CREDIT: u64 = 32 << 20;

/// Called once records are durable in the stream's cache, with the stream's name and disks.
pub type OnDurable = Arc<dyn Fn(&str, &[DiskName], &crate::Records) + Send + Sync>;

/// Called when a stream is opened (its cache ready, before the first record), with its name
/// and disks.
pub type OnOpen = Arc<dyn Fn(&str, &[DiskName]) + Send + Sync>;

/// Asked when a stream opens, with its name and the lineage its records are of: an error
/// refuses the stream (`Lineage`) with that sentence. A master target takes only the lineage
/// of its replica.
pub type OnLineage = Arc<dyn Fn(&str, Lineage) -> Result<(), String> + Send + Sync>;

/// Called when a stream's held records were dropped for a newer lineage (or for the same
/// lineage starting later: its sender lost the records between), with its name and the
/// lineage now.
pub type OnReset = Arc<dyn Fn(&str, Lineage) + Send + Sync>;

/// A receiver's settings.
pub struct Config {
    /// This component's name and role.
    pub name: String,
    pub role: Role,
    /// The roles that may connect.
    pub accepted: Vec<Role>,
    /// Whether a client may stream only the log named after it (an agent sends its own).
    pub own_stream_only: bool,
    /// The most disks all streams together may have.
    pub max_disks: usize,
    pub tls: TlsIdentity,
    /// One directory per stream.
    pub cache: PathBuf,
    /// The most bytes of a cache segment ([`crate::cache::SEGMENT_LEN`] by default).
    pub segment_len: u64,
    pub on_durable: Option<OnDurable>,
    pub on_open: Option<OnOpen>,
    pub on_lineage: Option<OnLineage>,
    pub on_reset: Option<OnReset>,
    /// Answers digest requests; none refuses them.
    pub on_digest: Option<crate::digest::OnDigest>,
}

/// A running receiver's shared state.
pub struct Receiver {
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    /// Streams with a connection now.
    busy: Holders,
    /// The disks of every stream seen, for the disk limit.
    disks: Mutex<HashMap<String, Vec<DiskName>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl Receiver {
    /// Whether a sender's connection holds `stream` now.
    pub fn connected(&self, stream: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(stream)
    }

    pub fn new(config: Config) -> Result<Arc<Self>, ServeError> {
        let tls = config.tls.server_config()?;
        Ok(Arc::new(Receiver {
            config,
            tls,
            busy: Mutex::default(),
            disks: Mutex::default(),
        }))
    }

    /// Whether `client` may send records of `offered` on `stream`: not of a lineage older than
    /// the one held, and what the receiver's own rule (`on_lineage`) allows.
    fn lineage_allowed(&self, stream: &str, client: &str, offered: Lineage) -> Result<(), String> {
        if let Some(veto) = &self.config.on_lineage {
            veto(stream, offered)?;
        }
        let held = Lineage::read(&self.config.cache.join(stream)).map_err(|e| e.to_string())?;
        if offered.id < held.id {
            return Err(format!(
                "stream {stream} is at {held} on this {}, and {client} sends records of {offered}, which ended: they are not taken. The sender is from before a reprotect or failback of {stream}; if its disks are to replicate again, reprotect the machine",
                self.config.role
            ));
        }
        if offered.id == held.id && offered.since < held.since {
            return Err(format!(
                "stream {stream} is at {held} on this {}, and {client} sends records from before it: the stream's agent went on after records this sender still has (they were lost on their way), so they are not taken. The sender is stale: point the machine's agent and the master target's process server at the one process server in use",
                self.config.role
            ));
        }
        Ok(())
    }

    /// Records the disks of `stream`; refuses them if all streams' disks would pass the limit.
    fn attach(&self, stream: &str, disks: &[DiskName]) -> Result<(), String> {
        let mut all = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let others: usize = all
            .iter()
            .filter(|(s, _)| s.as_str() != stream)
            .map(|(_, d)| d.len())
            .sum();
        if others + disks.len() > self.config.max_disks {
            return Err(format!(
                "{} {} has {others} disks attached and takes at most {}; the {} disks of {stream} would pass that: protect {stream} with a separate {}",
                self.config.role,
                self.config.name,
                self.config.max_disks,
                disks.len(),
                self.config.role
            ));
        }
        all.insert(stream.to_string(), disks.to_vec());
        Ok(())
    }

    /// Serves connections from `listener` until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let me = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.connection(tcp).await {
                                tracing::warn!(peer = %addr, error = %boomerang_core::chain(&e), "replication connection ended");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %boomerang_core::chain(&e), "could not accept a connection"),
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream) -> Result<(), ServeError> {
        // A connection closed before its first byte is a probe (a process server checking
        // that its master target answers, for its heartbeats): nothing to warn about.
        let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        let mut first = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            tracing::debug!("a connection closed before its first byte: a reachability probe");
            return Ok(());
        }
        // A client that connects and says nothing must not hold a task and a socket forever.
        let stream = tokio::time::timeout_at(deadline, tls::accept(self.tls.clone(), tcp))
            .await
            .map_err(|_| {
                WireError::Protocol(format!("no TLS handshake within {SETUP_TIMEOUT:?}"))
            })??;
        let certs = tls::peer_certs(stream.get_ref().1);
        let (r, w) = tokio::io::split(stream);
        let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
        let peer = tokio::time::timeout(
            SETUP_TIMEOUT,
            accept(
                &mut rd,
                &mut wr,
                self.config.role,
                &self.config.name,
                &self.config.accepted,
                |role, name| tls::vouch(Some(&certs), CertRole::Wire(role), name),
            ),
        )
        .await
        .map_err(|_| WireError::Protocol(format!("no hello within {SETUP_TIMEOUT:?}")))??;
        self.stream(&mut rd, &mut wr, &peer.name).await
    }

    /// Answers a digest request of `client`, then ends the connection.
    async fn digest<W>(
        &self,
        wr: &mut FrameWriter<W>,
        client: &str,
        request: crate::DigestRequest,
    ) -> Result<(), ServeError>
    where
        W: AsyncWrite + Unpin,
    {
        let stream = request.stream.clone();
        if self.config.own_stream_only && stream != client {
            let why = format!(
                "{client} may ask only for digests of its own disks (stream {client:?}), not {stream:?}"
            );
            wr.refuse(ErrorCode::BadFrame, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        let Some(answer) = &self.config.on_digest else {
            let why = format!("this {} does not serve digests", self.config.role);
            wr.refuse(ErrorCode::Unavailable, &why).await;
            return Err(WireError::Protocol(why).into());
        };
        let disk = request.disk.clone();
        match tokio::time::timeout(crate::digest::DIGEST_TIMEOUT, answer(request)).await {
            Ok(Ok(digest)) => {
                wr.send(&Frame::Digest(digest)).await?;
                Ok(())
            }
            Ok(Err(why)) => {
                let why = format!("no digest of disk {disk} of {stream}: {why}");
                wr.refuse(ErrorCode::Unavailable, &why).await;
                Err(WireError::Protocol(why).into())
            }
            Err(_) => {
                let why = format!(
                    "no digest of disk {disk} of {stream} within {:?}",
                    crate::digest::DIGEST_TIMEOUT
                );
                wr.refuse(ErrorCode::Unavailable, &why).await;
                Err(WireError::Protocol(why).into())
            }
        }
    }

    /// Runs one stream on an opened connection from `client`.
    async fn stream<R, W>(
        &self,
        rd: &mut FrameReader<R>,
        wr: &mut FrameWriter<W>,
        client: &str,
    ) -> Result<(), ServeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let opened = tokio::time::timeout(SETUP_TIMEOUT, rd.read())
            .await
            .map_err(|_| {
                WireError::Protocol(format!(
                    "{client} opened no stream within {SETUP_TIMEOUT:?}"
                ))
            })??;
        let (stream, disks, offered) = match opened {
            Frame::Open {
                stream,
                disks,
                lineage,
                since,
            } => (stream, disks, Lineage { id: lineage, since }),
            Frame::DigestRequest(request) => return self.digest(wr, client, request).await,
            other => {
                let why = format!("{client} sent {other:?} where an open was expected");
                wr.refuse(ErrorCode::BadFrame, &why).await;
                return Err(WireError::Protocol(why).into());
            }
        };
        if !pki::valid_name(&stream) {
            let why = format!("{stream:?} is not a valid stream name (a machine's name)");
            wr.refuse(ErrorCode::BadFrame, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        if self.config.own_stream_only && stream != client {
            let why = format!(
                "{client} may stream only its own write log (stream {client:?}), not {stream:?}"
            );
            wr.refuse(ErrorCode::BadFrame, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        // Records of an ended lineage are never taken, and refused before they take the stream
        // from the connection that carries the live one.
        if let Err(why) = self.lineage_allowed(&stream, client, offered) {
            wr.refuse(ErrorCode::Lineage, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        // A newer connection of the same, authenticated, sender takes the stream over: the older
        // one is stale (its host rebooted with the connection open, say).
        let Some(busy) = BusyGuard::take(&self.busy, &stream).await else {
            let why = format!(
                "stream {stream} already has a connection to this {} that did not let go; the sender retries",
                self.config.role
            );
            wr.refuse(ErrorCode::StreamBusy, &why).await;
            return Err(WireError::Protocol(why).into());
        };
        if let Err(why) = self.attach(&stream, &disks) {
            wr.refuse(ErrorCode::TooManyDisks, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        let root = self.config.cache.clone();
        let name = stream.clone();
        let segment_len = self.config.segment_len;
        let cache =
            tokio::task::spawn_blocking(move || StreamCache::open_with(&root, &name, segment_len))
                .await
                .map_err(|e| WireError::Protocol(e.to_string()))?;
        let mut cache = match cache {
            Ok(c) => c,
            Err(e) => {
                wr.refuse(ErrorCode::Unavailable, &e.to_string()).await;
                return Err(e.into());
            }
        };
        // Checked again now that this connection holds the stream.
        if let Err(why) = self.lineage_allowed(&stream, client, offered) {
            wr.refuse(ErrorCode::Lineage, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        let held = match cache.lineage() {
            Ok(l) => l,
            Err(e) => {
                wr.refuse(ErrorCode::Unavailable, &e.to_string()).await;
                return Err(e.into());
            }
        };
        // A newer lineage, or the same one starting later: the sender's records go on after a
        // gap (it lost records the receiver had, or the receiver lost records it had released),
        // so whatever is held is dropped and the stream starts again at `since`.
        if (offered.id, offered.since) > (held.id, held.since) {
            let (back, reset) = tokio::task::spawn_blocking(move || {
                let reset = cache.reset(offered);
                (cache, reset)
            })
            .await
            .map_err(|e| WireError::Protocol(e.to_string()))?;
            cache = back;
            if let Err(e) = reset {
                wr.refuse(ErrorCode::Unavailable, &e.to_string()).await;
                return Err(e.into());
            }
            tracing::warn!(%stream, %held, new = %offered, "the stream starts again: the records held are dropped");
            if let Some(reset) = &self.config.on_reset {
                reset(&stream, offered);
            }
        }
        if let Some(opened) = &self.config.on_open {
            opened(&stream, &disks);
        }
        let mut inbound = Inbound::new(disks, cache.next_seq(), CREDIT);
        wr.send(&Frame::Resume {
            next_seq: inbound.next_seq(),
            credit: inbound.credit(),
        })
        .await?;
        tracing::info!(%stream, next_seq = %inbound.next_seq(), "stream resumed");
        loop {
            // A sender pings when it has nothing to send: silence this long means it is gone
            // (its host rebooted, or the link is cut), and the stream is freed for its return.
            let frame = tokio::select! {
                read = tokio::time::timeout(SILENCE, rd.read()) => read,
                _ = busy.cancel.notified() => {
                    let why = format!("a newer connection of {client} took stream {stream} over");
                    wr.refuse(ErrorCode::StreamBusy, &why).await;
                    return Err(WireError::Protocol(why).into());
                }
            };
            let Ok(frame) = frame else {
                return Err(WireError::Protocol(format!(
                    "{client} sent nothing on stream {stream} for {SILENCE:?}; closing"
                ))
                .into());
            };
            let records = match frame {
                Ok(Frame::Records(r) | Frame::RecordsZstd(r)) => r,
                Ok(Frame::Ping { nonce }) => {
                    wr.send(&Frame::Pong { nonce }).await?;
                    continue;
                }
                Ok(Frame::Bye) | Err(WireError::Closed) => return Ok(()),
                Ok(Frame::Error { code, message }) => {
                    return Err(WireError::Refused { code, message }.into());
                }
                Ok(other) => {
                    let why = format!("{other:?} has no place in a record stream");
                    wr.refuse(ErrorCode::BadFrame, &why).await;
                    return Err(WireError::Protocol(why).into());
                }
                Err(WireError::Decode(e)) => {
                    wr.refuse(ErrorCode::BadFrame, &e.to_string()).await;
                    return Err(WireError::Decode(e).into());
                }
                Err(e) => return Err(e.into()),
            };
            if let Err(v) = inbound.accept(&records) {
                wr.refuse(v.code, &v.message).await;
                return Err(WireError::Protocol(v.message).into());
            }
            // Durable before acknowledged.
            let batch = records.clone();
            let (back, persisted) = tokio::task::spawn_blocking(move || {
                let done = cache.append(&batch).and_then(|()| cache.sync());
                (cache, done)
            })
            .await
            .map_err(|e| WireError::Protocol(e.to_string()))?;
            cache = back;
            if let Err(e) = persisted {
                let why = if e.is_full() {
                    format!(
                        "the {}'s volume {} is full: records of {stream} wait at the sender and are taken again once space returns (as forwarded records are dropped, or when the volume grows)",
                        self.config.role,
                        self.config.cache.display()
                    )
                } else {
                    format!(
                        "the {} could not persist records of {stream}: {}",
                        self.config.role,
                        boomerang_core::chain(&e)
                    )
                };
                tracing::error!(%stream, error = %boomerang_core::chain(&e), "{why} (alert)");
                wr.refuse(ErrorCode::Unavailable, &why).await;
                return Err(e.into());
            }
            if let Some(notify) = &self.config.on_durable {
                notify(&stream, inbound.disks(), &records);
            }
            let grant = records.bytes().len() as u64;
            inbound.grant(grant);
            wr.send(&Frame::Ack {
                durable: records.last_seq(),
                credit: grant,
            })
            .await?;
        }
    }
}

/// The connection that holds each stream: its generation, and how to ask it to let go.
type Holders = Mutex<HashMap<String, (u64, Arc<tokio::sync::Notify>)>>;

/// Marks a stream as held by this connection; the mark goes when the guard drops.
struct BusyGuard<'a> {
    holders: &'a Holders,
    stream: String,
    generation: u64,
    cancel: Arc<tokio::sync::Notify>,
}

impl<'a> BusyGuard<'a> {
    /// Takes `stream`, asking a connection that holds it to let go and waiting up to 5 s.
    async fn take(holders: &'a Holders, stream: &str) -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            {
                let mut all = holders.lock().unwrap_or_else(|e| e.into_inner());
                match all.get(stream) {
                    None => {
                        let cancel = Arc::new(tokio::sync::Notify::new());
                        all.insert(stream.to_string(), (generation, cancel.clone()));
                        return Some(BusyGuard {
                            holders,
                            stream: stream.to_string(),
                            generation,
                            cancel,
                        });
                    }
                    Some((_, cancel)) => cancel.notify_one(),
                }
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut all = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if all
            .get(&self.stream)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            all.remove(&self.stream);
        }
    }
}
