//! Disks served at a recovery point, for test failovers and failovers: a machine's disks,
//! each an instant recovery ([`crate::recover`]) into a target under the retention volume,
//! all at the same point (one log position: the machine's disks stay consistent with each
//! other), served by one NBD server with an export per disk.
//!
//! - A test failover (`test-failovers/job-<id>/`) is isolated: the machine's writes go to
//!   scratch targets, never to its replicas, and replication goes on meanwhile.
//! - A failover (`failovers/<machine>/`) is the machine's disks from then on: its targets
//!   are hydrated into whole disks.
//!
//! The configuration server's jobs give the commands; each is idempotent: starting what runs
//! answers with what it serves (and a target left by a restart resumes), and stopping what
//! does not run removes what is left of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use boomerang_core::DiskName;
use boomerang_nbd::server::{Export, ListenAddr, Listener, Server};
use serde::Serialize;

use crate::points;
use crate::recover::{Recovery, RecoveryConfig};

/// How far a disk served is copied into its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// `failovers/<machine>` or `test-failovers/job-<id>`.
    pub key: String,
    pub machine: String,
    pub disk: String,
    pub copied_bytes: u64,
    pub size_bytes: u64,
    /// Where it is served (NBD).
    pub address: String,
}

/// The point to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A listed point's sequence number.
    Seq(u64),
    /// The newest point every disk lists.
    Latest,
    /// The newest app-consistent point every disk lists.
    LatestAppConsistent,
}

impl At {
    /// From a command's `at`: a number, `"latest-app-consistent"`, or null or
    /// `"latest-processed"` (the latest).
    pub fn from_json(v: &serde_json::Value) -> Result<At, String> {
        match v {
            serde_json::Value::Null => Ok(At::Latest),
            serde_json::Value::String(s) if s == "latest-processed" => Ok(At::Latest),
            serde_json::Value::String(s) if s == "latest-app-consistent" => {
                Ok(At::LatestAppConsistent)
            }
            v => v.as_u64().map(At::Seq).ok_or_else(|| {
                format!("{v} is not a point: a sequence number, or latest-app-consistent")
            }),
        }
    }
}

/// What a running test failover serves.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Served {
    /// The NBD server's address; each disk is the export of its name.
    pub address: String,
    pub exports: Vec<String>,
    /// The point: its sequence number in the machine's log.
    pub seq: u64,
}

struct Running {
    served: Served,
    machine: String,
    disks: Vec<Arc<Recovery>>,
    stop_serving: tokio::sync::watch::Sender<bool>,
    /// The NBD server's task, until it is stopped.
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop_copying: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops the NBD server and waits until it has closed its connections: the requests it
    /// read are finished and answered first, so its clients lose no acknowledged write.
    async fn stop_serving(&mut self) {
        let _ = self.stop_serving.send(true);
        if let Some(serving) = self.serving.take() {
            let _ = serving.await;
        }
    }

    /// Stops serving and copying (once its disks are closed), and waits for the copies to
    /// end; its disks.
    async fn halt(self) -> Vec<Arc<Recovery>> {
        let _ = self.stop_serving.send(true);
        self.stop_copying.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        self.disks
    }
}

/// The recoveries one master target serves, by key: the directory of their targets under the
/// retention volume.
pub struct Recoveries {
    retention: PathBuf,
    /// Where their NBD servers listen (a port of 0: any free one).
    listen: ListenAddr,
    running: tokio::sync::Mutex<HashMap<String, Running>>,
}

/// A disk a failover handed over.
#[derive(Clone, Debug, Serialize)]
pub struct Released {
    pub disk: String,
    pub target: PathBuf,
    pub size: u64,
    /// What the machine wrote there since the point, as (offset, length) ranges.
    pub written: Option<Vec<(u64, u64)>>,
}

/// The key of the test failover of job `job`.
pub fn test_failover(job: i64) -> String {
    format!("test-failovers/job-{job}")
}

/// The key of the failover of `machine`.
pub fn failover(machine: &str) -> String {
    format!("failovers/{machine}")
}

impl Recoveries {
    pub fn new(retention: &Path, listen: ListenAddr) -> Self {
        Recoveries {
            retention: retention.to_path_buf(),
            listen,
            running: Default::default(),
        }
    }

    /// The retention volume.
    pub fn retention(&self) -> &Path {
        &self.retention
    }

    fn dir(&self, key: &str) -> PathBuf {
        self.retention.join(key)
    }

    /// The newest point every disk of `machine` lists (an app-consistent one, if `app`).
    async fn latest_common(
        &self,
        machine: &str,
        disks: &[DiskName],
        app: bool,
    ) -> Result<u64, String> {
        let mut common: Option<Vec<u64>> = None;
        for disk in disks {
            let seqs: Vec<u64> = points::list(&self.retention, machine, disk)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|p| !app || p.kind == "app")
                .map(|p| p.seq)
                .collect();
            common = Some(match common {
                None => seqs,
                Some(c) => c.into_iter().filter(|s| seqs.contains(s)).collect(),
            });
        }
        common.and_then(|c| c.into_iter().max()).ok_or_else(|| {
            format!(
                "the disks of {machine} have no {}recovery point in common yet",
                if app { "app-consistent " } else { "" }
            )
        })
    }

    /// Serves `disks` of `machine` at point `at`, as `key`.
    pub async fn start(
        &self,
        key: &str,
        machine: &str,
        disks: &[DiskName],
        at: At,
    ) -> Result<Served, String> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(key) {
            // Asked again: for the same disks, or it is another request.
            if let Some(missing) = disks
                .iter()
                .find(|d| !r.served.exports.contains(&d.to_string()))
            {
                return Err(format!(
                    "{key} serves {} already, not disk {missing}: stop it first",
                    r.served.exports.join(", ")
                ));
            }
            return match at {
                At::Seq(s) if s != r.served.seq => Err(format!(
                    "{key} serves seq {} already, not {s}: stop it first",
                    r.served.seq
                )),
                _ => Ok(r.served.clone()),
            };
        }
        if disks.is_empty() {
            return Err(format!("no disk of {machine} was named"));
        }
        let dir = self.dir(key);
        // Targets made before a restart: resumed at their point, whatever `at` says now.
        let saved = disks
            .iter()
            .find_map(|d| crate::recover::saved_seq(&dir.join(format!("{d}.img"))));
        let seq = match (saved, at) {
            (Some(s), At::Seq(asked)) if s != asked => {
                return Err(format!(
                    "{key} was made at seq {s}, not {asked}: stop it first"
                ));
            }
            (Some(s), _) | (None, At::Seq(s)) => s,
            (None, At::Latest) => self.latest_common(machine, disks, false).await?,
            (None, At::LatestAppConsistent) => self.latest_common(machine, disks, true).await?,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
        let mut exports = Vec::new();
        let mut recoveries = Vec::new();
        for disk in disks {
            let config = RecoveryConfig {
                retention: self.retention.clone(),
                stream: machine.to_string(),
                disk: disk.clone(),
                at: Some(seq),
                target: dir.join(format!("{disk}.img")),
                hydrate_rate: None,
            };
            let recovery = Recovery::open(&config)
                .await
                .map_err(|e| boomerang_core::chain(&e))?;
            exports.push(Export {
                name: disk.to_string(),
                description: format!("disk {disk} of {machine} at seq {seq} ({key})"),
                device: recovery.clone(),
                read_only: false,
            });
            recoveries.push(recovery);
        }
        let listener = Listener::bind(&self.listen)
            .await
            .map_err(|e| format!("could not listen on {:?}: {e}", self.listen))?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let served = Served {
            address,
            exports: disks.iter().map(|d| d.to_string()).collect(),
            seq,
        };
        let server = Server::new(exports, 64);
        let (stop_serving, stopped) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn(async move { server.serve(listener, stopped).await });
        let stop_copying = Arc::new(AtomicBool::new(false));
        let threads = recoveries
            .iter()
            .cloned()
            .map(|r| {
                let stop = stop_copying.clone();
                std::thread::spawn(move || {
                    if let Err(e) = r.hydrate(None, stop) {
                        tracing::warn!(target = %r.target().display(), error = %e, "a recovery's copy stopped");
                    }
                })
            })
            .collect();
        tracing::warn!(key, machine, address = %served.address, seq, "disks served at a recovery point");
        running.insert(
            key.to_string(),
            Running {
                served: served.clone(),
                machine: machine.to_string(),
                disks: recoveries,
                stop_serving,
                serving: Some(serving),
                stop_copying,
                threads,
            },
        );
        Ok(served)
    }

    /// How far each disk served is copied into its target: key, machine, disk, bytes copied,
    /// bytes in all.
    pub async fn progress(&self) -> Vec<Progress> {
        // A start in progress holds the map: the next heartbeat reports.
        let Ok(running) = self.running.try_lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, r) in running.iter() {
            for (disk, recovery) in r.served.exports.iter().zip(&r.disks) {
                let (copied, size) = recovery.progress_bytes();
                out.push(Progress {
                    key: key.clone(),
                    machine: r.machine.clone(),
                    disk: disk.clone(),
                    copied_bytes: copied,
                    size_bytes: size,
                    address: r.served.address.clone(),
                });
            }
        }
        out.sort_by(|a, b| (&a.key, &a.disk).cmp(&(&b.key, &b.disk)));
        out
    }

    /// Serves again the failovers and test failovers whose targets are on the retention
    /// volume (after a restart of the master target): a failed-over machine's disks are its
    /// disks now, and a test machine's scratch disks stay until its cleanup.
    pub async fn resume(&self) {
        for kind in ["failovers", "test-failovers"] {
            let Ok(entries) = std::fs::read_dir(self.retention.join(kind)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let mut disks: Vec<DiskName> = std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|f| {
                        let file = f.file_name().to_str()?.to_string();
                        DiskName::new(file.strip_suffix(".img.recovery")?).ok()
                    })
                    .collect();
                disks.sort();
                // A start cut short (a disk still being made): the command that asked for it
                // comes again and makes it whole.
                let unfinished = std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().ends_with(".creating"));
                if unfinished {
                    continue;
                }
                let Some(machine) = disks.first().and_then(|d| {
                    crate::recover::saved_machine(&entry.path().join(format!("{d}.img")))
                }) else {
                    continue;
                };
                let key = format!("{kind}/{name}");
                match self.start(&key, &machine, &disks, At::Latest).await {
                    Ok(served) => {
                        tracing::warn!(%key, %machine, address = %served.address, "serving recovered disks again")
                    }
                    Err(e) => {
                        tracing::error!(%key, %machine, error = %e, "could not serve recovered disks again")
                    }
                }
            }
        }
    }

    /// Hands the whole disks of `key` over (reprotect: an agent serves them from now on): stops
    /// serving them and leaves the targets as plain disk images, once every disk is hydrated.
    /// Returns each disk's target, and the byte ranges the machine wrote there since the point
    /// (`None` where not known). Called again, the same.
    pub async fn release(&self, key: &str) -> Result<Vec<Released>, String> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(key) {
            for (disk, d) in r.served.exports.iter().zip(&r.disks) {
                if !d.hydrated() {
                    let (copied, size) = d.progress_bytes();
                    return Err(format!(
                        "disk {disk} of {key} is not copied whole yet ({copied} of {size} bytes): wait for its hydration to finish"
                    ));
                }
            }
            let Some(mut r) = running.remove(key) else {
                return Err(format!("{key} vanished"));
            };
            drop(running);
            r.stop_serving().await;
            let closed: Result<Vec<()>, String> = r
                .disks
                .iter()
                .map(|d| {
                    d.close()
                        .map_err(|e| format!("could not save {}: {e}", d.target().display()))
                })
                .collect();
            let disks = r.halt().await;
            closed?;
            for d in &disks {
                crate::recover::finish(d.target())
                    .map_err(|e| format!("could not finish {}: {e}", d.target().display()))?;
            }
        } else {
            drop(running);
        }
        // What is on the volume: plain images only once released.
        let dir = self.dir(key);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| format!("{key} has no disks here ({}): {e}", dir.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".recovery") || name.ends_with(".creating") {
                return Err(format!(
                    "{key} is not served, and its disks are not whole ({name}): fail over again"
                ));
            }
            if let Some(disk) = name.strip_suffix(".img") {
                let size = entry.metadata().map_err(|e| e.to_string())?.len();
                out.push(Released {
                    disk: disk.to_string(),
                    target: entry.path(),
                    size,
                    written: crate::recover::saved_written(&entry.path(), size),
                });
            }
        }
        out.sort_by(|a, b| a.disk.cmp(&b.disk));
        if out.is_empty() {
            return Err(format!("{key} has no disks here ({})", dir.display()));
        }
        Ok(out)
    }

    /// Stops serving `key` and deletes its targets.
    pub async fn stop(&self, key: &str) -> Result<(), String> {
        let gone = self.running.lock().await.remove(key);
        if let Some(mut r) = gone {
            r.stop_serving().await;
            // A client that kept a connection past the stop gets errors, not a deleted file.
            for d in &r.disks {
                if let Err(e) = d.close() {
                    tracing::warn!(target = %d.target().display(), error = %e, "could not save a recovery before stopping it");
                }
            }
            r.halt().await;
        }
        let dir = self.dir(key);
        crate::retire(&self.retention, &dir)
            .map_err(|e| format!("could not delete {}: {e}", dir.display()))
    }
}
