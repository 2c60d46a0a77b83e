//! Exports, listeners and connection handling.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};

use crate::BlockDevice;
use crate::handshake::{Negotiated, handshake};

/// How long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// At a server's stop: how long a connection may take to finish the requests it has read,
/// reply, and close; then it is closed whatever it was doing.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One disk served under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
}

/// An NBD server over a fixed set of exports.
#[derive(Clone)]
pub struct Server {
    exports: Arc<BTreeMap<String, Arc<Export>>>,
    connections: Arc<Semaphore>,
}

/// Where to listen: `127.0.0.1:PORT` (any socket address) or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(p))),
            Some(_) => Err("unix: needs a socket path, as in unix:/run/boomerang/nbd.sock".into()),
            None if s.contains(':') => Ok(ListenAddr::Tcp(s.to_string())),
            None => Err(format!(
                "{s:?} is not a listen address: use HOST:PORT or unix:PATH"
            )),
        }
    }
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => Ok(Listener::Unix(UnixListener::bind(p)?)),
        }
    }

    /// The bound address, as a client would give it (`nbd://` URIs use the TCP port).
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => Ok(l.local_addr()?.to_string()),
            Listener::Unix(l) => Ok(format!(
                "unix:{}",
                l.local_addr()?
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )),
        }
    }
}

impl Server {
    /// Up to `max_connections` clients are served at once; more wait to be accepted.
    pub fn new(exports: Vec<Export>, max_connections: usize) -> Self {
        let exports = exports
            .into_iter()
            .map(|e| (e.name.clone(), Arc::new(e)))
            .collect();
        Server {
            exports: Arc::new(exports),
            connections: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
        }
    }

    pub(crate) fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.get(name).cloned()
    }

    pub(crate) fn exports(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.values()
    }

    /// Accepts clients until `shutdown` turns true (or its sender is dropped); then stops
    /// accepting, closes the connections, and returns once they are closed. Each connection
    /// stops reading between requests, finishes and answers the requests it has read (as the
    /// protocol asks of a server that stops), and closes; one still busy [`SHUTDOWN_GRACE`]
    /// after the stop is closed anyway.
    pub async fn serve(
        &self,
        listener: Listener,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let mut connections = tokio::task::JoinSet::new();
        let accepted = self
            .accept_until(listener, shutdown, &mut connections)
            .await;
        let all_closed = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), all_closed)
            .await
            .is_err()
        {
            // Each connection ends by its own deadline; one still here is held in a device call
            // on an async worker (a read or write served inline), and is aborted once that call
            // returns. Device calls in the blocking pool finish on their own either way.
            tracing::warn!("NBD connections still open after the server's stop: they are dropped");
            connections.abort_all();
        }
        accepted
    }

    async fn accept_until(
        &self,
        listener: Listener,
        mut shutdown: watch::Receiver<bool>,
        connections: &mut tokio::task::JoinSet<()>,
    ) -> io::Result<()> {
        if *shutdown.borrow_and_update() {
            return Ok(());
        }
        loop {
            // Forget the connections that ended.
            while connections.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => p.map_err(io::Error::other)?,
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            };
            let server = self.clone();
            let closing = shutdown.clone();
            tokio::select! {
                accepted = accept(&listener) => {
                    let conn = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not accept an NBD connection");
                            continue;
                        }
                    };
                    connections.spawn(async move {
                        let _permit = permit;
                        match conn {
                            Conn::Tcp(s) => {
                                let _ = s.set_nodelay(true);
                                server.handle(s, closing).await
                            }
                            Conn::Unix(s) => server.handle(s, closing).await,
                        }
                    });
                }
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
        }
    }

    /// Serves one client connection to its end, or until `closing` turns true (or its sender
    /// is dropped): see [`Server::serve`].
    pub async fn handle<S>(&self, mut stream: S, mut closing: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // A client that does not finish the handshake must not hold a connection slot forever;
        // one still negotiating when the server stops is simply disconnected.
        let negotiated = tokio::select! {
            n = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, self)) => {
                n.unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the handshake took too long",
                    ))
                })
            }
            _ = closing.wait_for(|c| *c) => return,
        };
        match negotiated {
            Ok(Negotiated::Transmit(session)) => {
                if let Err(e) = crate::transmission::transmit(stream, session, closing).await {
                    tracing::debug!(error = %e, "NBD connection ended with an error");
                }
            }
            Ok(Negotiated::Closed) => {}
            Err(e) => tracing::debug!(error = %e, "NBD handshake failed"),
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Conn> {
    match l {
        Listener::Tcp(l) => Ok(Conn::Tcp(l.accept().await?.0)),
        Listener::Unix(l) => Ok(Conn::Unix(l.accept().await?.0)),
    }
}
