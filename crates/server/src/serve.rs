//! HTTPS: an accept loop that runs TLS (rustls) and HTTP/1.1 (hyper) over the router.

use std::sync::Arc;
use std::time::Duration;

use boomerang_wire::tls::{TlsError, TlsIdentity};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::api::{AppState, router};
use crate::config::ServerConfig;
use crate::db::{Db, DbError};
use crate::inventory::{InventorySource, TomlFile};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error("[backup] in server.toml: {0}")]
    Backup(String),
}

/// A server ready to serve: its certificate loaded, its database open, its inventory read.
pub struct Prepared {
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    backup: Option<crate::backup::Plan>,
}

/// Everything that can fail before the server takes connections, so that it fails before it
/// says it listens.
pub fn prepare(config: &ServerConfig) -> Result<Prepared, ServeError> {
    let tls = TlsIdentity::load(&config.tls)?.https_config()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let sources: Vec<Box<dyn InventorySource>> = config
        .inventory
        .iter()
        .map(|p| Box::new(TomlFile(p.clone())) as Box<dyn InventorySource>)
        .collect();
    let db = Arc::new(Db::open(&config.database)?);
    // A server does not start on an inventory it cannot read: its answers would be wrong.
    db.replace_inventory(&crate::inventory::load_all(&sources)?)?;
    let state = Arc::new(AppState {
        db,
        dir: config.dir.clone(),
        heartbeat_timeout_ms: (config.heartbeat_timeout_seconds.max(1) * 1000) as i64,
        sources: Arc::new(sources),
        jobs_changed: Default::default(),
        preflights_wanted: Default::default(),
        commands_posted: tokio::sync::watch::Sender::new(0),
    });
    // What a backup takes: server.toml, the CA, the server's certificate and the inventory
    // files in the state directory (and the database).
    let backup = match config.backup.clone() {
        None => None,
        Some(backup) => {
            let mut files = vec![
                config.dir.join("server.toml"),
                config.dir.join("ca.crt"),
                config.dir.join("ca.key"),
                config.dir.join("ca.json"),
            ];
            for entry in std::fs::read_dir(&config.tls)
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.path().is_file() {
                    files.push(entry.path());
                }
            }
            files.extend(config.inventory.iter().cloned());
            let plan = crate::backup::Plan {
                config: backup,
                dir: config.dir.clone(),
                database: config.database.clone(),
                files,
            };
            plan.check().map_err(ServeError::Backup)?;
            Some(plan)
        }
    };
    Ok(Prepared {
        acceptor,
        state,
        backup,
    })
}

/// Serves the API on `listener` until `shutdown` turns true.
pub async fn serve(
    prepared: Prepared,
    listener: TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let Prepared {
        acceptor,
        state,
        backup,
    } = prepared;
    if let Some(plan) = backup {
        tokio::spawn(crate::backup::run(plan, state.db.clone()));
    }
    tokio::spawn(crate::api::watch_components(state.clone()));
    tokio::spawn(crate::api::run_jobs(state.clone()));
    tokio::spawn(crate::api::run_preflights(state.clone()));
    let app = router(state);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "could not accept a connection");
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that says nothing must not hold a task for long.
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
