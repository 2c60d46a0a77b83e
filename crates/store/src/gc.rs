//! Mark and sweep: every chunk and node reachable from a point manifest is kept, the rest is
//! deleted. Holds the GC lease, so no commit runs meanwhile (lease.rs). For a store in a
//! group, the lease and the chunks are the group's: the chunks every store of the group
//! names are kept, and no commit of any of them runs meanwhile.

use std::collections::HashSet;

use boomerang_core::ChunkHash;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::tree::{FANOUT, TreeReader};
use crate::{Progress, Store};

/// What a GC did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub points: u64,
    pub live_objects: u64,
    pub deleted_objects: u64,
    pub deleted_bytes: u64,
}

impl Store {
    /// Deletes every chunk and node that no point references.
    pub async fn gc(&self, progress: &dyn Progress) -> Result<GcReport> {
        let lease = self.gc_lease().await?;
        let result = self.gc_locked(progress).await;
        lease.release().await;
        result
    }

    async fn gc_locked(&self, progress: &dyn Progress) -> Result<GcReport> {
        let points = self.points(None).await?;
        let mut live = Live::default();
        progress.start("mark", points.len() as u64);
        for p in &points {
            mark_tree(self, p, &mut live).await?;
            progress.advance(1);
        }
        progress.finish();
        // The chunks the other stores of the group name are live too.
        for other in self.group_members().await? {
            let mut theirs = Live::default();
            for p in other.points(None).await? {
                mark_tree(&other, &p, &mut theirs).await?;
            }
            live.chunks.extend(theirs.chunks);
        }
        let mut report = GcReport {
            points: points.len() as u64,
            live_objects: (live.nodes.len() + live.chunks.len()) as u64,
            ..GcReport::default()
        };
        // Packs no live chunk is in: their index first, then the pack (a pack without an
        // index is found by nothing: left by a commit cut short).
        let mut indexed = std::collections::HashSet::new();
        for idx in self.pack_indexes().await? {
            let pack = format!("{}.pack", idx.trim_end_matches(".idx"));
            let entries = match self.read_index(&idx).await {
                Ok(Some(entries)) => entries,
                Ok(None) => continue,
                // A damaged index: its pack may hold live chunks. Kept, and said.
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::warn!(index = %idx, error = %e, "a pack index is damaged; its pack is kept");
                    indexed.insert(pack);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if entries.iter().any(|(h, _, _)| live.chunks.contains(h)) {
                indexed.insert(pack);
                continue;
            }
            for path in [idx, pack] {
                let freed = self.delete_if_there(&path).await?;
                if freed > 0 {
                    report.deleted_bytes += freed;
                    report.deleted_objects += 1;
                }
            }
        }
        let objects = self.backend().objects_at("packs/");
        let packs: Vec<_> = objects
            .list(Some(&Path::from("packs")))
            .try_collect()
            .await
            .map_err(|e| {
                StoreError::backend(format!("could not list packs/ in {}", self.display()), e)
            })?;
        for meta in packs {
            let path = meta.location.to_string();
            if path.ends_with(".pack") && !indexed.contains(&path) {
                let freed = self.delete_if_there(&path).await?;
                if freed > 0 {
                    report.deleted_bytes += freed;
                    report.deleted_objects += 1;
                }
            } else if path.ends_with(".pack") {
                report.live_objects += 1;
            }
        }
        for prefix in ["chunks", "nodes"] {
            let objects = self.backend().objects_at(prefix);
            let mut listing = objects.list(Some(&Path::from(prefix)));
            let mut doomed = Vec::new();
            while let Some(meta) = listing.try_next().await.map_err(|e| {
                StoreError::backend(format!("could not list {prefix}/ in {}", self.display()), e)
            })? {
                let name = meta.location.filename().and_then(ChunkHash::from_hex);
                let set = if prefix == "nodes" {
                    &live.nodes
                } else {
                    &live.chunks
                };
                if name.is_some_and(|h| set.contains(&h)) {
                    continue;
                }
                report.deleted_bytes += meta.size;
                doomed.push(meta.location);
            }
            report.deleted_objects += doomed.len() as u64;
            let display = self.display();
            let mut deletes = futures::stream::iter(doomed)
                .map(|p| async move {
                    match objects.delete(&p).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(StoreError::backend(
                            format!("could not delete {p} in {display}"),
                            e,
                        )),
                    }
                })
                .buffer_unordered(16);
            while let Some(r) = deletes.next().await {
                r?;
            }
        }
        Ok(report)
    }
}

impl Store {
    /// Deletes object `path` (of the shared namespace for a pack or chunk of a store in a
    /// group); its size, 0 if it was not there.
    async fn delete_if_there(&self, path: &str) -> Result<u64> {
        let objects = self.backend().objects_at(path);
        let p = Path::from(path);
        let size = match objects.head(&p).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Ok(0),
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not look at {path} in {}", self.display()),
                    e,
                ));
            }
        };
        match objects.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(size),
            Err(e) => Err(StoreError::backend(
                format!("could not delete {path} in {}", self.display()),
                e,
            )),
        }
    }
}

/// Reachable objects, nodes and chunks apart (a tail block could hash like a node).
#[derive(Default)]
struct Live {
    nodes: HashSet<ChunkHash>,
    chunks: HashSet<ChunkHash>,
}

/// Adds every non-zero node and chunk of the point's tree to `live`, skipping subtrees seen
/// already (points of one disk share most of their trees).
async fn mark_tree(store: &Store, point: &crate::PointManifest, live: &mut Live) -> Result<()> {
    let shape = point.shape();
    let mut reader = TreeReader::new(store.clone(), point.tree());
    let mut stack = vec![(shape.depth, 0u64, point.root)];
    while let Some((level, index, hash)) = stack.pop() {
        if hash.is_zero() {
            continue;
        }
        if level == 0 {
            live.chunks.insert(hash);
            continue;
        }
        if !live.nodes.insert(hash) {
            continue;
        }
        let (_, kids) = reader.node(level, index).await?;
        for (k, kid) in kids.iter().enumerate().rev() {
            stack.push((level - 1, index * FANOUT + k as u64, *kid));
        }
    }
    Ok(())
}

/// What a store holds, by kind of object: for a store in a group, the chunks are the group's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub chunk_objects: u64,
    pub chunk_bytes: u64,
    pub node_objects: u64,
    pub node_bytes: u64,
    pub point_objects: u64,
    pub point_bytes: u64,
    /// Packs of small chunks (their data and their indexes).
    pub pack_objects: u64,
    pub pack_bytes: u64,
    /// The chunks counted are those of every store of the store's group.
    pub group: bool,
}

impl Store {
    /// Counts the objects the store holds and their bytes, by listing them.
    pub async fn usage(&self) -> Result<Usage> {
        let mut usage = Usage {
            group: self.backend().shared().is_some(),
            ..Usage::default()
        };
        for prefix in ["chunks", "nodes", "points", "packs"] {
            let objects = if prefix == "points" {
                &self.backend().durable
            } else {
                self.backend().objects_at(prefix)
            };
            let mut listing = objects.list(Some(&Path::from(prefix)));
            let (mut n, mut bytes) = (0u64, 0u64);
            while let Some(meta) = listing.try_next().await.map_err(|e| {
                StoreError::backend(format!("could not list {prefix}/ in {}", self.display()), e)
            })? {
                n += 1;
                bytes += meta.size;
            }
            match prefix {
                "chunks" => (usage.chunk_objects, usage.chunk_bytes) = (n, bytes),
                "nodes" => (usage.node_objects, usage.node_bytes) = (n, bytes),
                "packs" => (usage.pack_objects, usage.pack_bytes) = (n, bytes),
                _ => (usage.point_objects, usage.point_bytes) = (n, bytes),
            }
        }
        Ok(usage)
    }
}
