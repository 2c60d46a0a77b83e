//! Mark and sweep: every chunk and node reachable from a point manifest is kept, the rest is
//! deleted. Holds the GC lease, so no commit runs meanwhile (lease.rs).

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
        let mut report = GcReport {
            points: points.len() as u64,
            live_objects: (live.nodes.len() + live.chunks.len()) as u64,
            ..GcReport::default()
        };
        for prefix in ["chunks", "nodes"] {
            let mut listing = self.backend().objects.list(Some(&Path::from(prefix)));
            let mut doomed = Vec::new();
            while let Some(meta) = listing
                .try_next()
                .await
                .map_err(|e| StoreError::backend(format!("could not list {prefix}/"), e))?
            {
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
            let mut deletes = futures::stream::iter(doomed)
                .map(|p| async move {
                    match self.backend().objects.delete(&p).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(StoreError::backend(format!("could not delete {p}"), e)),
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
