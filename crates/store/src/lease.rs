//! Leases that keep GC and commits apart.
//!
//! A commit writes `leases/commit-*.lease`, then looks for `leases/gc.lease`; a GC writes
//! `leases/gc.lease` (conditional put: one GC at a time), then looks for commit leases. With
//! strongly consistent listing, at least one of two racing parties sees the other and backs
//! off, so a GC never sweeps while a commit may reference objects of an older point.
//! A lease left by a crashed process goes stale after [`STALE_AFTER_MS`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::{Store, now_ms};

/// A lease older than this is ignored (its holder is gone).
pub const STALE_AFTER_MS: u64 = 12 * 3600 * 1000;
const GC_LEASE: &str = "leases/gc.lease";
/// How long a GC waits for the commits running when it starts.
const COMMITS_DRAIN: Duration = Duration::from_secs(60);
/// How long a commit waits for a running GC.
const GC_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    kind: String,
    holder: String,
    created_unix_ms: u64,
}

/// A held lease; call [`Lease::release`] on every path out.
pub(crate) struct Lease {
    store: Store,
    path: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Store {
    async fn put_lease(&self, path: &str, kind: &str) -> Result<bool> {
        let body = LeaseBody {
            kind: kind.into(),
            holder: holder(),
            created_unix_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&body).expect("lease serializes");
        match self
            .backend()
            .durable_at("leases/")
            .put_opts(
                &Path::from(path),
                PutPayload::from(bytes),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(StoreError::backend(
                format!("could not write lease {path} to {}", self.display()),
                e,
            )),
        }
    }

    /// Live leases whose path starts with `prefix`, with their holders.
    async fn live_leases(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let metas: Vec<_> = self
            .backend()
            .durable_at("leases/")
            .list(Some(&Path::from("leases")))
            .try_collect()
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!(
                        "could not list the leases of the store at {}",
                        self.display()
                    ),
                    e,
                )
            })?;
        let mut out = Vec::new();
        for m in metas {
            let path = m.location.to_string();
            if !path.starts_with(prefix) {
                continue;
            }
            let body = match self.backend().durable_at("leases/").get(&m.location).await {
                Ok(r) => r.bytes().await.ok(),
                Err(_) => None, // released meanwhile
            };
            let Some(body) = body else { continue };
            let Ok(body) = serde_json::from_slice::<LeaseBody>(&body) else {
                continue;
            };
            if now_ms().saturating_sub(body.created_unix_ms) > STALE_AFTER_MS {
                tracing::warn!(lease = %path, holder = %body.holder, "ignoring a stale lease");
                continue;
            }
            out.push((path, body.holder));
        }
        Ok(out)
    }

    /// Takes a commit lease, waiting while a GC runs.
    pub(crate) async fn commit_lease(&self) -> Result<Lease> {
        let started = std::time::Instant::now();
        loop {
            // Unique among the processes of every host that commits to the store (or to its
            // group): a random part besides the process id, which containers repeat.
            let mut nonce = [0u8; 8];
            aws_lc_rs::rand::fill(&mut nonce).map_err(|_| {
                StoreError::Invalid("the system's random number generator failed".into())
            })?;
            let path = format!(
                "leases/commit-{}-{}-{}-{:016x}.lease",
                std::process::id(),
                now_ms(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                u64::from_le_bytes(nonce)
            );
            if !self.put_lease(&path, "commit").await? {
                continue;
            }
            let lease = Lease {
                store: self.clone(),
                path,
            };
            let gc = self.live_leases(GC_LEASE).await?;
            if gc.is_empty() {
                return Ok(lease);
            }
            lease.release().await;
            if started.elapsed() > GC_WAIT {
                return Err(StoreError::Conflict(format!(
                    "a garbage collection ({}) has held {} for over {} s: wait for it to finish, or if that process is gone delete the lease",
                    gc[0].1,
                    GC_LEASE,
                    GC_WAIT.as_secs()
                )));
            }
            tracing::info!("waiting for a running garbage collection to finish");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Takes the GC lease; fails at once if another GC runs, and if commits still run after
    /// [`COMMITS_DRAIN`] (no new one starts once the GC lease is there: a store in a group
    /// whose machines commit every few seconds would otherwise never be collected).
    pub(crate) async fn gc_lease(&self) -> Result<Lease> {
        if !self.put_lease(GC_LEASE, "gc").await? {
            let holders = self.live_leases(GC_LEASE).await?;
            if let Some((_, holder)) = holders.first() {
                return Err(StoreError::Conflict(format!(
                    "another garbage collection ({holder}) is running on {}: wait for it to finish",
                    self.display()
                )));
            }
            // A stale GC lease: replace it.
            let _ = self
                .backend()
                .durable_at(GC_LEASE)
                .delete(&Path::from(GC_LEASE))
                .await;
            if !self.put_lease(GC_LEASE, "gc").await? {
                return Err(StoreError::Conflict(format!(
                    "another garbage collection started on {} meanwhile: wait for it to finish",
                    self.display()
                )));
            }
        }
        let lease = Lease {
            store: self.clone(),
            path: GC_LEASE.into(),
        };
        let started = std::time::Instant::now();
        loop {
            let commits = self.live_leases("leases/commit-").await?;
            let Some((path, holder)) = commits.first() else {
                return Ok(lease);
            };
            if started.elapsed() > COMMITS_DRAIN {
                lease.release().await;
                return Err(StoreError::Conflict(format!(
                    "a commit ({holder}, lease {path}) is running on {}: run gc again when it has finished",
                    self.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Lease {
    /// Gives the lease back. Failure only leaves a lease that goes stale; it is logged.
    pub(crate) async fn release(self) {
        if let Err(e) = self
            .store
            .backend()
            .durable_at("leases/")
            .delete(&Path::from(self.path.as_str()))
            .await
        {
            tracing::warn!(lease = %self.path, error = %boomerang_core::chain(&e), "could not release a lease; it will go stale");
        }
    }
}
