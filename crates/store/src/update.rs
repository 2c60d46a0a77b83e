//! Range commit: the next point of a disk from its latest point and the blocks known to have
//! changed since (a write log says which), without reading the rest of the image.
//!
//! ```text
//! changed blocks ─▶ pread + hash ─▶ differs from the latest point? ─▶ chunk put
//!        │
//!        └─ per level, bottom up: the parents of changed nodes are loaded, patched, re-encoded
//!           and stored ─▶ new root ─▶ all puts done ─▶ flush ─▶ manifest (create-only)
//! ```
//! Cost: the changed blocks, plus one node per level per group of changed blocks, so
//! O(changed · depth); the tree that results is byte for byte the one a full scan of the same
//! image would build.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::time::Instant;

use boomerang_core::{ChunkHash, DiskName};
use bytes::Bytes;
use tokio::task::JoinSet;

use crate::commit::{CommitOptions, CommitReport, join_result, wait_for_room};
use crate::error::{Result, StoreError};
use crate::point::CommitStats;
use crate::tree::{FANOUT, TreeReader, encode_node};
use crate::{NoProgress, Progress, Store, chunk};

impl Store {
    /// Commits the next point of `disk`: its latest point with the blocks in `changed` (block
    /// indices, in any order) read again from `image`. The caller vouches that no other block
    /// of `image` differs from the latest point. With no point yet, or a new disk size, it is a
    /// full scan commit ([`Store::commit_image`]).
    pub async fn commit_blocks(
        &self,
        disk: &DiskName,
        image: &FsPath,
        changed: impl IntoIterator<Item = u64>,
        options: CommitOptions,
    ) -> Result<CommitReport> {
        self.commit_blocks_with(disk, image, changed, options, &NoProgress)
            .await
    }

    /// [`Store::commit_blocks`], reporting to `progress` and stopping when it says so
    /// ([`Progress::stopped`]): then it fails with [`StoreError::Interrupted`] and writes no
    /// point.
    pub async fn commit_blocks_with(
        &self,
        disk: &DiskName,
        image: &FsPath,
        changed: impl IntoIterator<Item = u64>,
        options: CommitOptions,
        progress: &dyn Progress,
    ) -> Result<CommitReport> {
        let started = Instant::now();
        let file = File::open(image).map_err(|e| {
            StoreError::io(
                format!("could not open image {}: check the path", image.display()),
                e,
            )
        })?;
        let size = file
            .metadata()
            .map_err(|e| StoreError::io(format!("could not read image {}", image.display()), e))?
            .len();
        let prev = match self.latest(disk).await? {
            Some(p) if p.size == size => p,
            _ => return self.commit_image(disk, image, options, progress).await,
        };
        let shape = prev.shape();
        let blocks: BTreeSet<u64> = changed.into_iter().filter(|&b| b < shape.leaves).collect();

        if progress.stopped() {
            return Err(StoreError::Interrupted { disk: disk.clone() });
        }
        let lease = self.commit_lease().await?;
        let result = async {
            // Under the lease: the small chunks the packs hold already are not packed again.
            if self.packs_small_chunks() {
                self.load_packs().await?;
            }
            let mut tree = TreeReader::new(self.clone(), prev.tree());
            let mut stats = CommitStats::default();
            let mut puts: JoinSet<Result<u64>> = JoinSet::new();
            let packer = crate::pack::Packer::default();
            let mut stored = 0u64;

            // Level 0: the changed blocks whose content really differs.
            let mut updates: Vec<(u64, ChunkHash)> = Vec::new();
            let mut data = Vec::new();
            for &i in &blocks {
                if progress.stopped() {
                    return Err(StoreError::Interrupted { disk: disk.clone() });
                }
                let len = shape.block_len(i);
                data.resize(len, 0);
                file.read_exact_at(&mut data, i * shape.block_size)
                    .map_err(|e| {
                        StoreError::io(format!("could not read image {}", image.display()), e)
                    })?;
                stats.bytes_read += len as u64;
                let hash = if chunk::is_zero(&data) {
                    ChunkHash::ZERO
                } else {
                    self.hash(&data)
                };
                if tree.group(i / FANOUT).await?[(i % FANOUT) as usize] == hash {
                    continue;
                }
                stats.blocks_changed += 1;
                stats.bytes_changed += len as u64;
                if !hash.is_zero() {
                    wait_for_room(&mut puts, &mut stored).await?;
                    self.spawn_chunk_put(&mut puts, &hash, Bytes::copy_from_slice(&data), &packer);
                }
                updates.push((i, hash));
            }

            // Levels 1..=depth: patch the parents of what changed, bottom up.
            let mut root = prev.root;
            let mut node_bytes = 0u64;
            for level in 1..=shape.depth {
                let mut next: Vec<(u64, ChunkHash)> = Vec::new();
                let mut k = 0;
                while k < updates.len() {
                    let parent = updates[k].0 / FANOUT;
                    let (before, children) = tree.node(level, parent).await?;
                    let mut children = children.as_ref().clone();
                    while k < updates.len() && updates[k].0 / FANOUT == parent {
                        let (idx, hash) = updates[k];
                        children[(idx % FANOUT) as usize] = hash;
                        k += 1;
                    }
                    let hash = if children.iter().all(ChunkHash::is_zero) {
                        ChunkHash::ZERO
                    } else {
                        let bytes = encode_node(level, &children);
                        let hash = self.hash(&bytes);
                        if hash != before {
                            let n = bytes.len() as u64;
                            node_bytes += n;
                            wait_for_room(&mut puts, &mut stored).await?;
                            let store = self.clone();
                            let path = Store::node_path(&hash);
                            let bytes = Bytes::from(bytes);
                            puts.spawn(
                                async move { store.put_object(path, bytes).await.map(|_| n) },
                            );
                        }
                        hash
                    };
                    if hash != before {
                        next.push((parent, hash));
                    }
                }
                if level == shape.depth
                    && let Some(&(_, hash)) = next.first()
                {
                    root = hash;
                }
                updates = next;
            }
            while let Some(done) = puts.join_next().await {
                stored += join_result(done)?;
            }
            packer.finish(self).await?;
            stats.bytes_stored = stored;
            stats.node_bytes_stored = node_bytes;

            // Objects first, manifest last.
            self.backend().flush().await?;
            let id = self
                .write_manifest(disk, Some(&prev), shape, root, stats, options)
                .await?;
            Ok((id, stats))
        }
        .await;
        lease.release().await;
        let (point, stats) = result?;
        Ok(CommitReport {
            disk: disk.clone(),
            point,
            parent: Some(prev.id),
            size,
            block_size: shape.block_size,
            stats,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}
