//! Leases that keep GC and commits apart.
//!
//! A commit writes `leases/commit-*.lease`, then looks for `leases/gc.lease`; a GC writes
//! `leases/gc.lease` (conditional put: one GC at a time), then looks for commit leases. With
//! strongly consistent listing, at least one of two racing parties sees the other and backs
//! off, so a GC never sweeps while a commit may reference objects of an older point.
//! A lease left by a crashed process goes stale after [`STALE_AFTER_MS`]. Sooner, a process
//! that can tell that a lease's holder is gone (a process of the same kernel and namespaces
//! that no longer runs, see [`process_identity`]) ignores it once it has seen it gone for
//! [`GONE_AFTER`] (requests the holder sent before it ended, such as a GC's deletes to an
//! object store, have landed by then): a GC then deletes such a commit lease and goes on, and a
//! commit goes on past such a GC lease. The usual case is a master target (or a `store gc`)
//! that crashed and started again on the same host. A GC lease is replaced only once stale by
//! its age, as before: two GCs replacing one at once could both sweep. A GC releases its lease
//! only while the lease is still its own.
//! Not supported with this shortcut: moving a running holder to another machine
//! (checkpoint/restore) or cloning a running machine while it holds a lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// The holder process (see [`process_identity`]); absent where it cannot be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<String>,
    /// Random, this lease's own: tells it from another one written at the same path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
}

/// A lease whose holder is gone is ignored only once this process has seen it gone for this
/// long: requests the holder sent just before it ended (a GC's deletes, a commit's manifest)
/// have landed by then.
#[cfg(not(test))]
const GONE_AFTER: Duration = Duration::from_secs(120);
#[cfg(test)]
const GONE_AFTER: Duration = Duration::from_millis(300);

/// When this process first saw the holder of a lease gone, by the lease (path and body, whose
/// holder identity and nonce make it unique).
type SeenGone = HashMap<(String, String), Instant>;
static SEEN_GONE: Mutex<Option<SeenGone>> = Mutex::new(None);

fn seen_gone_key(path: &str, body: &LeaseBody) -> (String, String) {
    let who = format!(
        "{}/{}/{}",
        body.created_unix_ms,
        body.process.as_deref().unwrap_or(""),
        body.nonce.as_deref().unwrap_or("")
    );
    (path.to_string(), who)
}

/// How long this process has seen the holder of lease `path` gone.
fn gone_for(path: &str, body: &LeaseBody) -> Duration {
    let mut seen = SEEN_GONE.lock().unwrap_or_else(|e| e.into_inner());
    let map = seen.get_or_insert_with(HashMap::new);
    map.entry(seen_gone_key(path, body))
        .or_insert_with(Instant::now)
        .elapsed()
}

/// Forgets a lease deleted.
fn forget_gone(path: &str, body: &LeaseBody) {
    let mut seen = SEEN_GONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(map) = seen.as_mut() {
        map.remove(&seen_gone_key(path, body));
    }
}

/// Since when every lease in the way has had an ended holder: such leases hold only until they
/// have been seen so for [`GONE_AFTER`], which is worth waiting for past the usual limit.
#[derive(Default)]
struct EndedSince(Option<Instant>);

impl EndedSince {
    fn worth_waiting(&mut self, leases: &[LiveLease]) -> bool {
        if !leases.iter().all(|l| l.ended) {
            self.0 = None;
            return false;
        }
        let since = *self.0.get_or_insert_with(Instant::now);
        since.elapsed() <= GONE_AFTER + Duration::from_secs(5)
    }
}

/// A lease found live, with its holder; `ended`: its holder is gone, but it still holds a
/// while (see [`GONE_AFTER`]).
struct LiveLease {
    path: String,
    holder: String,
    ended: bool,
}

/// A process as this kernel and namespaces know it: the boot id, the pid and time namespaces,
/// the pid, and the process's start time (clock ticks since boot), which tells the process from
/// a later one that reuses its pid.
fn process_identity(pid: u32) -> Option<String> {
    Some(format!("{}{pid}/{}", here()?, start_ticks(pid)?))
}

/// The boot id, pid namespace and time namespace of this process, as the prefix of a
/// [`process_identity`]; `None` where they cannot be told, or where `/proc` is not that of this
/// process's own pid namespace (its pids and start times would be another's).
fn here() -> Option<String> {
    // The same for the life of the process: read once, not at every lease looked at.
    static HERE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HERE.get_or_init(read_here).clone()
}

fn read_here() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pids = std::fs::read_link("/proc/self/ns/pid").ok()?;
    // Start times are shown shifted by the reader's time namespace.
    let time = std::fs::read_link("/proc/self/ns/time").ok()?;
    // One pid in `NSpid`, this process's own: `/proc` is mounted from its pid namespace.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let mut own = nspid.split_whitespace();
    if own.next()? != std::process::id().to_string() || own.next().is_some() {
        return None;
    }
    Some(format!(
        "{}/{}/{}/",
        boot.trim(),
        pids.display(),
        time.display()
    ))
}

/// When process `pid` started, in clock ticks since boot; `None` if it does not run.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields are counted after the command name, which may hold anything.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether a process `pid` exists (whoever owns it), by a null signal.
fn signalled(pid: u32) -> bool {
    use nix::errno::Errno;
    let Ok(pid) = i32::try_from(pid) else {
        return true;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}

impl LeaseBody {
    /// Whether the holder is a process of this kernel and namespaces that no longer runs. A
    /// holder elsewhere (another host, container or boot) is never judged gone here.
    fn holder_gone(&self) -> bool {
        let (Some(theirs), Some(here)) = (&self.process, here()) else {
            return false;
        };
        let Some((pid, start)) = theirs
            .strip_prefix(&here)
            .and_then(|rest| rest.split_once('/'))
        else {
            return false;
        };
        match (pid.parse::<u32>(), start.parse::<u64>()) {
            (Ok(pid), Ok(start)) => match start_ticks(pid) {
                Some(now) => now != start,
                // Not in /proc: gone, unless /proc hides it (`hidepid`) and it still runs.
                None => !signalled(pid),
            },
            _ => false,
        }
    }
}

/// A held lease; call [`Lease::release`] on every path out.
pub(crate) struct Lease {
    store: Store,
    path: String,
    /// The body written, by which a GC lease is known as this holder's own at its release.
    body: LeaseBody,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| StoreError::Invalid("the system's random number generator failed".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Store {
    /// Writes lease `path` if no such lease exists: the lease, or `None` if one exists.
    async fn put_lease(&self, path: &str, kind: &str) -> Result<Option<Lease>> {
        let body = LeaseBody {
            kind: kind.into(),
            holder: holder(),
            created_unix_ms: now_ms(),
            process: process_identity(std::process::id()),
            nonce: Some(format!("{:016x}", random_u64()?)),
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
            Ok(_) => Ok(Some(Lease {
                store: self.clone(),
                path: path.to_string(),
                body,
            })),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // A create retried after its first try landed finds its own lease.
                let lease = Lease {
                    store: self.clone(),
                    path: path.to_string(),
                    body,
                };
                Ok(lease.still_own(false).await.then_some(lease))
            }
            Err(e) => Err(StoreError::backend(
                format!("could not write lease {path} to {}", self.display()),
                e,
            )),
        }
    }

    /// Live leases whose path starts with `prefix`. With `judge_holders`, a lease whose holder
    /// this process has seen gone for [`GONE_AFTER`] is not live either (see the module's
    /// notes); such a commit lease, whose name no other holder takes, is deleted.
    async fn live_leases(&self, prefix: &str, judge_holders: bool) -> Result<Vec<LiveLease>> {
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
            // A lease that cannot be read may be live: only one released meanwhile is not.
            let unreadable = |e| {
                StoreError::backend(
                    format!(
                        "could not read lease {path} of the store at {}",
                        self.display()
                    ),
                    e,
                )
            };
            let bytes = match self.backend().durable_at("leases/").get(&m.location).await {
                Ok(r) => r.bytes().await.map_err(unreadable)?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(unreadable(e)),
            };
            let Ok(body) = serde_json::from_slice::<LeaseBody>(&bytes) else {
                // Not ours to judge: it holds (until someone removes it).
                out.push(LiveLease {
                    path,
                    holder: "an unreadable lease".into(),
                    ended: false,
                });
                continue;
            };
            if now_ms().saturating_sub(body.created_unix_ms) > STALE_AFTER_MS {
                tracing::warn!(lease = %path, holder = %body.holder, "ignoring a stale lease");
                continue;
            }
            let ended = body.holder_gone();
            if ended && judge_holders && gone_for(&path, &body) >= GONE_AFTER {
                tracing::warn!(lease = %path, holder = %body.holder, "ignoring a lease whose holder no longer runs");
                if path.starts_with("leases/commit-") {
                    let deleted = self
                        .backend()
                        .durable_at("leases/")
                        .delete(&m.location)
                        .await;
                    if deleted.is_ok() {
                        forget_gone(&path, &body);
                    }
                }
                continue;
            }
            out.push(LiveLease {
                path,
                holder: body.holder,
                ended,
            });
        }
        Ok(out)
    }

    /// Takes a commit lease, waiting while a GC runs.
    pub(crate) async fn commit_lease(&self) -> Result<Lease> {
        let started = std::time::Instant::now();
        let mut ended = EndedSince::default();
        loop {
            // Unique among the processes of every host that commits to the store (or to its
            // group): a random part besides the process id, which containers repeat.
            let path = format!(
                "leases/commit-{}-{}-{}-{:016x}.lease",
                std::process::id(),
                now_ms(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                random_u64()?
            );
            let Some(lease) = self.put_lease(&path, "commit").await? else {
                continue;
            };
            let gc = match self.live_leases(GC_LEASE, true).await {
                Ok(gc) => gc,
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            };
            if gc.is_empty() {
                return Ok(lease);
            }
            lease.release().await;
            if started.elapsed() > GC_WAIT && !ended.worth_waiting(&gc) {
                return Err(StoreError::Conflict(format!(
                    "a garbage collection ({}) has held {} for over {} s: wait for it to finish, or if that process is gone delete the lease",
                    gc[0].holder,
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
        let mut ended = EndedSince::default();
        loop {
            let commits = match self.live_leases("leases/commit-", true).await {
                Ok(commits) => commits,
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            };
            let Some(LiveLease { path, holder, .. }) = commits.first() else {
                return Ok(lease);
            };
            if started.elapsed() > COMMITS_DRAIN && !ended.worth_waiting(&commits) {
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

impl Store {
    /// The GC lease, in place of one stale by its age; an error if another GC holds it.
    async fn replace_stale_gc_lease(&self) -> Result<Lease> {
        // Only a lease stale by its age is replaced (see the module's notes).
        let holders = self.live_leases(GC_LEASE, false).await?;
        if let Some(LiveLease { holder, ended, .. }) = holders.first() {
            return Err(StoreError::Conflict(if *ended {
                format!(
                    "the garbage collection that holds {GC_LEASE} on {} ({holder}) has ended without releasing it: it is replaced {} hours after it was taken; once no collection runs, delete it to collect sooner",
                    self.display(),
                    STALE_AFTER_MS / 3_600_000
                )
            } else {
                format!(
                    "another garbage collection ({holder}) is running on {}: wait for it to finish",
                    self.display()
                )
            }));
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
    /// Whether the lease at its path is still the one this holder wrote: a GC lease another
    /// GC replaced (after it went stale) is not this holder's to delete. One that cannot be
    /// read after a few tries counts as its own if `unreadable_is_own` (at a release: left in
    /// place, it would hold every commit up while this process lives).
    async fn still_own(&self, unreadable_is_own: bool) -> bool {
        let store = self.store.backend().durable_at("leases/");
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let read = match store.get(&Path::from(self.path.as_str())).await {
                Ok(found) => found.bytes().await,
                Err(object_store::Error::NotFound { .. }) => return false,
                Err(e) => Err(e),
            };
            if let Ok(bytes) = read {
                return serde_json::from_slice::<LeaseBody>(&bytes)
                    .is_ok_and(|b| b.nonce == self.body.nonce);
            }
        }
        unreadable_is_own
    }

    /// Gives the lease back. Failure only leaves a lease that goes stale; it is logged.
    pub(crate) async fn release(self) {
        if self.path == GC_LEASE && !self.still_own(true).await {
            tracing::warn!(lease = %self.path, "the GC lease is no longer this collection's: left in place");
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(process: Option<String>, created_unix_ms: u64) -> LeaseBody {
        LeaseBody {
            kind: "commit".into(),
            holder: "a test".into(),
            created_unix_ms,
            process,
            nonce: None,
        }
    }

    #[tokio::test]
    async fn a_lease_of_a_process_here_that_no_longer_runs_is_ignored_and_no_other() {
        if here().is_none() {
            // The kernel or /proc cannot tell (no time namespaces, /proc of another pid
            // namespace): the shortcut is off. CI's machines can tell.
            assert!(
                std::env::var("CI").is_err(),
                "this machine cannot tell processes apart"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(root.to_str().unwrap(), 64 * 1024)
            .await
            .unwrap();
        let leases = root.join("leases");
        std::fs::create_dir_all(&leases).unwrap();
        let put = |name: &str, body: &LeaseBody| {
            std::fs::write(leases.join(name), serde_json::to_vec(body).unwrap()).unwrap();
        };
        let live = |judge| {
            let store = store.clone();
            async move {
                store
                    .live_leases("leases/commit-", judge)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|l| (l.path, l.ended))
                    .collect::<Vec<_>>()
            }
        };
        let me = process_identity(std::process::id()).unwrap();
        let here = here().unwrap();
        // Taken long ago: only how long the holder has been seen gone counts.
        let long_ago = now_ms() - 3_600_000;
        // A process that ran and ended.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = child.id();
        let gone_start = start_ticks(gone_pid).expect("a child not yet waited for is in /proc");
        child.wait().unwrap();
        let gone = format!("{here}{gone_pid}/{gone_start}");

        put("commit-mine.lease", &lease(Some(me.clone()), long_ago));
        assert_eq!(
            live(true).await,
            [("leases/commit-mine.lease".to_string(), false)],
            "the holder runs: the lease holds"
        );
        std::fs::remove_file(leases.join("commit-mine.lease")).unwrap();

        put("commit-gone.lease", &lease(Some(gone), long_ago));
        assert_eq!(
            live(true).await,
            [("leases/commit-gone.lease".to_string(), true)],
            "its holder has just been seen gone: what it sent may still land"
        );
        tokio::time::sleep(GONE_AFTER).await;
        assert_eq!(
            live(false).await,
            [("leases/commit-gone.lease".to_string(), true)],
            "not judged: it holds"
        );
        assert!(
            live(true).await.is_empty(),
            "seen gone long enough: ignored"
        );
        assert!(
            !leases.join("commit-gone.lease").exists(),
            "and deleted, a name no other holder takes"
        );

        // This process's pid, but another start: a process before it that had the same pid.
        let (pid, start) = me.strip_prefix(&here).unwrap().split_once('/').unwrap();
        let reused = format!("{here}{pid}/{}", start.parse::<u64>().unwrap() + 1);
        put("commit-reused.lease", &lease(Some(reused), long_ago));
        assert_eq!(live(true).await.len(), 1);
        tokio::time::sleep(GONE_AFTER).await;
        assert!(live(true).await.is_empty(), "its pid was reused: ignored");
        assert!(!leases.join("commit-reused.lease").exists());

        // Holders this process cannot judge: another boot or namespace, or a lease without
        // the field. They hold until they are stale.
        put(
            "commit-elsewhere.lease",
            &lease(
                Some(format!("another-boot/pid:[1]/time:[2]/{gone_pid}/1")),
                long_ago,
            ),
        );
        put("commit-older.lease", &lease(None, long_ago));
        tokio::time::sleep(GONE_AFTER).await;
        assert_eq!(live(true).await.len(), 2);
        put(
            "commit-older.lease",
            &lease(None, now_ms() - STALE_AFTER_MS - 1000),
        );
        assert_eq!(live(true).await.len(), 1, "stale after STALE_AFTER_MS");
        // One that cannot be read may be live: it holds.
        std::fs::write(leases.join("commit-garbled.lease"), b"not json").unwrap();
        assert_eq!(live(true).await.len(), 2);
    }

    #[tokio::test]
    async fn a_gc_lease_taken_over_by_another_gc_is_not_released_by_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(root.to_str().unwrap(), 64 * 1024)
            .await
            .unwrap();
        let first = store.put_lease(GC_LEASE, "gc").await.unwrap().unwrap();
        assert!(store.put_lease(GC_LEASE, "gc").await.unwrap().is_none());
        // Another GC replaced it (as it does with a stale one).
        std::fs::remove_file(root.join(GC_LEASE)).unwrap();
        let second = store.put_lease(GC_LEASE, "gc").await.unwrap().unwrap();
        first.release().await;
        assert!(root.join(GC_LEASE).exists(), "the second GC's lease stays");
        second.release().await;
        assert!(!root.join(GC_LEASE).exists());
    }
}
