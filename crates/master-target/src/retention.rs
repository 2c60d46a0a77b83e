//! Point retention by policy: a machine's replication policy says how long its recovery points
//! are kept (`retention_seconds`). The configuration server's `protect` job tells the master
//! target (`replica-policy`), which keeps it in `replicas/<machine>/retention` (seconds, text)
//! and, every so often, drops the checkpoints older than that (the newest of each disk always
//! stays) and frees what no point uses any more (GC, kept apart from commits by the store's
//! leases).
//!
//! A machine with a recovery on the volume (a failover or a test failover, until it is cleaned
//! up) is not pruned: its recovery reads, or resumes from, the checkpoint it started at.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boomerang_store::{Keep, NoProgress};

fn retention_path(retention: &Path, machine: &str) -> PathBuf {
    retention.join("replicas").join(machine).join("retention")
}

/// Keeps `machine`'s points `seconds` long from now on.
pub fn set(retention: &Path, machine: &str, seconds: u64) -> std::io::Result<()> {
    let path = retention_path(retention, machine);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    boomerang_core::write_atomic(&path, seconds.to_string().as_bytes())
}

/// How long `machine`'s points are kept, if its policy said.
pub fn get(retention: &Path, machine: &str) -> Option<Duration> {
    std::fs::read_to_string(retention_path(retention, machine))
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// What one pass dropped for a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    pub machine: String,
    pub points_removed: usize,
    pub bytes_freed: u64,
}

/// Prunes every machine whose policy set a retention, except those with a recovery still
/// copying. Failures are logged, and tried again at the next pass.
pub async fn prune_all(retention: &Path) -> Vec<Pruned> {
    let mut out = Vec::new();
    let Ok(machines) = std::fs::read_dir(retention.join("replicas")) else {
        return out;
    };
    let mut names: BTreeSet<String> = BTreeSet::new();
    for m in machines.flatten() {
        if let Some(name) = m.file_name().to_str() {
            names.insert(name.to_string());
        }
    }
    // The stores under a store root are one group: collected once a pass, after the prunes.
    let root = crate::apply::StoreRoot::read(retention).ok().flatten();
    let mut pruned_any = false;
    for machine in names {
        let Some(keep) = get(retention, &machine) else {
            continue;
        };
        // Looked at just before each machine: a recovery may have started meanwhile.
        let busy = crate::recover::recovering_machines(retention);
        if busy.contains(&machine) || busy.contains(crate::recover::ALL) {
            continue;
        }
        let pruned = async {
            let Some(store) = crate::apply::open_replica_store(retention, &machine, None).await?
            else {
                return Ok(None);
            };
            let report = store.prune(Keep::Within(keep)).await?;
            let grouped = store.config().group.is_some();
            let freed = if report.removed.is_empty() || grouped {
                0
            } else {
                store.gc(&NoProgress).await?.deleted_bytes
            };
            Ok::<_, boomerang_store::StoreError>(Some((
                grouped,
                Pruned {
                    machine: machine.clone(),
                    points_removed: report.removed.len(),
                    bytes_freed: freed,
                },
            )))
        }
        .await;
        match pruned {
            Ok(None) => {}
            Ok(Some((grouped, p))) => {
                pruned_any |= grouped && p.points_removed > 0;
                if p.points_removed > 0 {
                    tracing::info!(machine = %p.machine, points = p.points_removed, bytes = p.bytes_freed, "dropped points past the policy's retention");
                }
                out.push(p);
            }
            Err(e) => {
                tracing::warn!(%machine, error = %boomerang_core::chain(&e), "could not drop the points past the policy's retention; trying again later")
            }
        }
    }
    if let Some(root) = root.filter(|_| pruned_any) {
        crate::apply::collect_group(&root).await;
    }
    out
}
