//! The process server: takes agents' write-log streams over mutual TLS and persists each record
//! in its cache (the write-log segment format, bytes as received) before acknowledging it.
//! Forwarding to a master target, compression, rate limits and metrics build on this.
//!
//! ```text
//! agent ──TLS──▶ accept: TLS, Hello (cert must name the agent), Open{stream = agent's name}
//!               ◀── Resume{next = cache's last durable + 1, credit}
//! Records ──▶ checked (stream rules) ─▶ cache append ─▶ fdatasync ─▶ Ack{durable, credit}
//! ```
//!
//! Invariants: an acknowledged record is durable in the cache; a stream has at most one
//! connection at a time; an agent writes only its own machine's stream.

pub mod cache;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use boomerang_wire::pki::{self, CertRole};
use boomerang_wire::tls::{self, TlsIdentity};
use boomerang_wire::{
    ErrorCode, Frame, FrameReader, FrameWriter, Inbound, Role, WireError, accept,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::cache::{CacheError, StreamCache};

/// Bytes of records an agent may have in flight, unacknowledged.
pub const CREDIT: u64 = 32 << 20;

/// A process server's settings.
pub struct Config {
    pub name: String,
    pub tls: TlsIdentity,
    pub cache: PathBuf,
}

/// A running process server's shared state.
pub struct ProcessServer {
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    /// Streams with a connection now.
    busy: Mutex<HashSet<String>>,
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

impl ProcessServer {
    pub fn new(config: Config) -> Result<Arc<Self>, ServeError> {
        let tls = config.tls.server_config()?;
        Ok(Arc::new(ProcessServer {
            config,
            tls,
            busy: Mutex::default(),
        }))
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
                                tracing::warn!(peer = %addr, error = %e, "replication connection ended");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "could not accept a connection"),
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
        let stream = tls::accept(self.tls.clone(), tcp).await?;
        let certs: Vec<CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec();
        let (r, w) = tokio::io::split(stream);
        let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
        let peer = accept(
            &mut rd,
            &mut wr,
            Role::ProcessServer,
            &self.config.name,
            &[Role::Agent],
            |role, name| tls::vouch(Some(&certs), CertRole::Wire(role), name),
        )
        .await?;
        self.stream(&mut rd, &mut wr, &peer.name).await
    }

    /// Runs one agent's stream on an opened connection.
    async fn stream<R, W>(
        &self,
        rd: &mut FrameReader<R>,
        wr: &mut FrameWriter<W>,
        agent: &str,
    ) -> Result<(), ServeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (stream, disks) = match rd.read().await? {
            Frame::Open { stream, disks } => (stream, disks),
            other => {
                let why = format!("{agent} sent {other:?} where an open was expected");
                wr.refuse(ErrorCode::BadFrame, &why).await;
                return Err(WireError::Protocol(why).into());
            }
        };
        if stream != agent || !pki::valid_name(&stream) {
            let why = format!(
                "{agent} may stream only its own write log (stream {agent:?}), not {stream:?}"
            );
            wr.refuse(ErrorCode::BadFrame, &why).await;
            return Err(WireError::Protocol(why).into());
        }
        let Some(_busy) = BusyGuard::take(&self.busy, &stream) else {
            let why = format!(
                "stream {stream} already has a connection to this process server; the agent retries once it ends"
            );
            wr.refuse(ErrorCode::StreamBusy, &why).await;
            return Err(WireError::Protocol(why).into());
        };
        let root = self.config.cache.clone();
        let name = stream.clone();
        let cache = tokio::task::spawn_blocking(move || StreamCache::open(&root, &name))
            .await
            .map_err(|e| WireError::Protocol(e.to_string()))?;
        let mut cache = match cache {
            Ok(c) => c,
            Err(e) => {
                wr.refuse(ErrorCode::Unavailable, &e.to_string()).await;
                return Err(e.into());
            }
        };
        let mut inbound = Inbound::new(disks, cache.next_seq(), CREDIT);
        wr.send(&Frame::Resume {
            next_seq: inbound.next_seq(),
            credit: inbound.credit(),
        })
        .await?;
        tracing::info!(%stream, next_seq = %inbound.next_seq(), "stream resumed");
        loop {
            let records = match rd.read().await {
                Ok(Frame::Records(r)) => r,
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
                tracing::error!(%stream, error = %e, "could not persist records in the cache");
                wr.refuse(
                    ErrorCode::Unavailable,
                    &format!("the process server's cache failed: {e}"),
                )
                .await;
                return Err(e.into());
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

/// Marks a stream as connected; the mark goes when the guard drops.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    stream: String,
}

impl<'a> BusyGuard<'a> {
    fn take(set: &'a Mutex<HashSet<String>>, stream: &str) -> Option<Self> {
        let mut busy = set.lock().unwrap_or_else(|e| e.into_inner());
        busy.insert(stream.to_string()).then(|| BusyGuard {
            set,
            stream: stream.to_string(),
        })
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.set.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.stream);
    }
}
