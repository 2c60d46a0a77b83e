//! Leases that keep GC and commits apart.
//!
//! A commit writes `leases/commit-*.lease`, then looks for `leases/gc.lease`; a GC writes
//! `leases/gc.lease` (conditional put: one GC at a time), then looks for commit leases. With
//! strongly consistent listing, at least one of two racing parties sees the other and backs
//! off, so a GC never sweeps while a commit may reference objects of an older point.
//! A holder renews its lease every [`RENEW_EVERY`]; a lease left by a crashed process (or one
//! whose host is gone) goes stale [`STALE_AFTER_MS`] after its last renewal, however long the
//! work under it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::{Store, now_ms};

/// A lease not renewed for this long is ignored (its holder is gone). Ten renewals, and room
/// for clocks that differ between hosts by minutes.
pub const STALE_AFTER_MS: u64 = 10 * 60 * 1000;
/// How often a holder renews its lease.
#[cfg(not(test))]
const RENEW_EVERY: Duration = Duration::from_secs(60);
#[cfg(test)]
const RENEW_EVERY: Duration = Duration::from_millis(100);
const GC_LEASE: &str = "leases/gc.lease";
/// How long a GC waits for the commits running when it starts.
const COMMITS_DRAIN: Duration = Duration::from_secs(60);
/// How long a commit waits for a running GC.
const GC_WAIT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseBody {
    kind: String,
    holder: String,
    created_unix_ms: u64,
    /// The holder's last renewal (absent in a lease never renewed).
    #[serde(default)]
    renewed_unix_ms: u64,
}

impl LeaseBody {
    fn stale(&self) -> bool {
        let last = self.created_unix_ms.max(self.renewed_unix_ms);
        now_ms().saturating_sub(last) > STALE_AFTER_MS
    }
}

/// A held lease, renewed by a task of its own; call [`Lease::release`] on every path out (a
/// lease only dropped stops being renewed and goes stale).
pub(crate) struct Lease {
    store: Store,
    path: String,
    /// Set under its lock once released: the renewal never writes the lease back after that.
    released: Arc<tokio::sync::Mutex<bool>>,
    renewal: tokio::task::JoinHandle<()>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Store {
    /// Writes lease `path` if no such lease exists; the lease, renewed from now on, if it did
    /// not.
    async fn put_lease(&self, path: &str, kind: &str) -> Result<Option<Lease>> {
        let body = LeaseBody {
            kind: kind.into(),
            holder: holder(),
            created_unix_ms: now_ms(),
            renewed_unix_ms: 0,
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
            Ok(_) => Ok(Some(Lease::held(self.clone(), path.to_string(), body))),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
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
            if body.stale() {
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
            let Some(lease) = self.put_lease(&path, "commit").await? else {
                continue;
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
        let lease = match self.put_lease(GC_LEASE, "gc").await? {
            Some(lease) => lease,
            None => self.replace_stale_gc_lease().await?,
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

    /// The GC lease, in place of a stale one; an error if another GC holds it.
    async fn replace_stale_gc_lease(&self) -> Result<Lease> {
        let holders = self.live_leases(GC_LEASE).await?;
        if let Some((_, holder)) = holders.first() {
            return Err(StoreError::Conflict(format!(
                "another garbage collection ({holder}) is running on {}: wait for it to finish",
                self.display()
            )));
        }
        let _ = self
            .backend()
            .durable_at(GC_LEASE)
            .delete(&Path::from(GC_LEASE))
            .await;
        self.put_lease(GC_LEASE, "gc").await?.ok_or_else(|| {
            StoreError::Conflict(format!(
                "another garbage collection started on {} meanwhile: wait for it to finish",
                self.display()
            ))
        })
    }
}

impl Lease {
    /// Starts renewing lease `path`, just written with `body`.
    fn held(store: Store, path: String, mut body: LeaseBody) -> Lease {
        let released = Arc::new(tokio::sync::Mutex::new(false));
        let renewal = {
            let (store, path, released) = (store.clone(), path.clone(), released.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    let released = released.lock().await;
                    if *released {
                        return;
                    }
                    body.renewed_unix_ms = now_ms();
                    let bytes = serde_json::to_vec(&body).expect("lease serializes");
                    let put = store
                        .backend()
                        .durable_at("leases/")
                        .put(&Path::from(path.as_str()), PutPayload::from(bytes))
                        .await;
                    if let Err(e) = put {
                        // Tried again at the next renewal; ten in a row make the lease stale.
                        tracing::warn!(lease = %path, error = %boomerang_core::chain(&e), "could not renew a lease");
                    }
                }
            })
        };
        Lease {
            store,
            path,
            released,
            renewal,
        }
    }

    /// Gives the lease back. Failure only leaves a lease that goes stale; it is logged.
    pub(crate) async fn release(self) {
        // No renewal is under way once this holds the lock, and none writes after it.
        *self.released.lock().await = true;
        self.renewal.abort();
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

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(root: &std::path::Path, path: &str) -> Option<LeaseBody> {
        let bytes = std::fs::read(root.join(path)).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_lease_is_renewed_until_released_and_a_lease_not_renewed_goes_stale() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(root.to_str().unwrap(), 64 * 1024)
            .await
            .unwrap();
        let lease = store.commit_lease().await.unwrap();
        let path = lease.path.clone();
        let first = body(&root, &path).await.unwrap();
        assert_eq!(first.renewed_unix_ms, 0);
        tokio::time::sleep(RENEW_EVERY * 5).await;
        let renewed = body(&root, &path).await.unwrap();
        assert!(
            renewed.renewed_unix_ms >= first.created_unix_ms,
            "{first:?} {renewed:?}"
        );
        assert_eq!(store.live_leases("leases/commit-").await.unwrap().len(), 1);
        lease.release().await;
        tokio::time::sleep(RENEW_EVERY * 3).await;
        assert!(
            body(&root, &path).await.is_none(),
            "no renewal writes it back"
        );

        // A lease its holder stopped renewing, created long ago: ignored once its last renewal
        // is older than STALE_AFTER_MS, whatever its age.
        let old = now_ms() - 24 * 3600 * 1000;
        let left = |renewed: u64| LeaseBody {
            kind: "commit".into(),
            holder: "pid 1 on gone".into(),
            created_unix_ms: old,
            renewed_unix_ms: renewed,
        };
        let leases = root.join("leases");
        std::fs::create_dir_all(&leases).unwrap();
        let write = |body: &LeaseBody| {
            std::fs::write(
                leases.join("commit-left.lease"),
                serde_json::to_vec(body).unwrap(),
            )
            .unwrap()
        };
        write(&left(now_ms() - 1000));
        assert_eq!(store.live_leases("leases/commit-").await.unwrap().len(), 1);
        write(&left(now_ms() - STALE_AFTER_MS - 1000));
        assert!(
            store
                .live_leases("leases/commit-")
                .await
                .unwrap()
                .is_empty()
        );
        write(&left(0));
        assert!(
            store
                .live_leases("leases/commit-")
                .await
                .unwrap()
                .is_empty()
        );
    }
}
