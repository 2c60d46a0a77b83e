//! Scan commit: hash an image block by block and store what differs from the disk's latest point.
//!
//! ```text
//! 2 reader threads ──batches of blocks + hashes──▶ commit task ──▶ chunk puts (≤ 32 in flight)
//!  (pread + hash, batches in turn)                 │ compare with the previous tree
//!                                                └─ tree builder ──▶ node puts
//!                                     all puts done ─▶ flush ─▶ manifest (conditional put)
//! ```
//! Memory is bounded by the channel (a few batches of 8 MiB) and the puts in flight, whatever
//! the image size.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::time::Instant;

use boomerang_core::{ChunkHash, DiskName, PointId, Seq};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::error::{Result, StoreError};
use crate::point::{CommitStats, MarkKind, PointManifest};
use crate::tree::{FANOUT, NewNode, Shape, TreeBuilder, TreeReader};
use crate::{Progress, Store, chunk, now_ms};

const BATCH_BYTES: u64 = 8 << 20;
const PUTS_IN_FLIGHT: usize = 32;
/// Batches in each reader's channel; one more is being read and one processed.
const BUFFERS: usize = 2;
/// Threads that read and hash the image.
const READERS: usize = 2;

/// How to label a commit.
#[derive(Clone, Copy, Debug)]
pub struct CommitOptions {
    pub mark: MarkKind,
    pub seq: Option<Seq>,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            mark: MarkKind::Crash,
            seq: None,
        }
    }
}

/// What a commit did.
#[derive(Clone, Debug, Serialize)]
pub struct CommitReport {
    pub disk: DiskName,
    pub point: PointId,
    pub parent: Option<PointId>,
    pub size: u64,
    pub block_size: u64,
    #[serde(flatten)]
    pub stats: CommitStats,
    pub elapsed_ms: u64,
}

struct Batch {
    first_block: u64,
    data: Vec<u8>,
    hashes: Vec<ChunkHash>,
}

impl Store {
    /// Commits the image at `image` as a new point of `disk`.
    pub async fn commit_image(
        &self,
        disk: &DiskName,
        image: &FsPath,
        options: CommitOptions,
        progress: &dyn Progress,
    ) -> Result<CommitReport> {
        let started = Instant::now();
        let mut file = File::open(image).map_err(|e| {
            StoreError::io(
                format!("could not open image {}: check the path", image.display()),
                e,
            )
        })?;
        let size = file.seek(SeekFrom::End(0)).map_err(|e| {
            StoreError::io(
                format!("could not find the size of image {}", image.display()),
                e,
            )
        })?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| StoreError::io(format!("could not read image {}", image.display()), e))?;

        if progress.stopped() {
            return Err(StoreError::Interrupted { disk: disk.clone() });
        }
        let lease = self.commit_lease().await?;
        let result = async {
            // Under the lease (no collection deletes a pack meanwhile): the small chunks the
            // packs hold already are not packed again.
            if self.packs_small_chunks() {
                self.load_packs().await?;
            }
            if progress.stopped() {
                return Err(StoreError::Interrupted { disk: disk.clone() });
            }
            self.commit_locked(disk, file, image, size, options, progress)
                .await
        }
        .await;
        lease.release().await;
        let (point, parent, stats) = result?;
        Ok(CommitReport {
            disk: disk.clone(),
            point,
            parent,
            size,
            block_size: self.block_size(),
            stats,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn commit_locked(
        &self,
        disk: &DiskName,
        file: File,
        image: &FsPath,
        size: u64,
        options: CommitOptions,
        progress: &dyn Progress,
    ) -> Result<(PointId, Option<PointId>, CommitStats)> {
        let block_size = self.block_size();
        let prev = self.latest(disk).await?;
        if let Some(p) = &prev
            && size < p.size
        {
            return Err(StoreError::Invalid(format!(
                "image {} of disk {disk} is {size} bytes, smaller than the {} bytes of point {}: Boomerang does not shrink a protected disk, since that would drop written data; if the disk was replaced on purpose, commit it under a new disk name",
                image.display(),
                p.size,
                p.id
            )));
        }
        let shape = Shape::new(size, block_size);
        let prev_leaves = prev.as_ref().map_or(0, |p| p.shape().leaves);
        let mut prev_tree = prev
            .as_ref()
            .map(|p| TreeReader::new(self.clone(), p.tree()));

        // READERS threads take batches in turn (batch k goes to reader k % READERS), so reading
        // and hashing use every core. Buffers go back to their reader once processed: no page
        // faults on fresh memory per batch.
        let mut batches = Vec::with_capacity(READERS);
        let mut free = Vec::with_capacity(READERS);
        let mut readers = Vec::with_capacity(READERS);
        for n in 0..READERS {
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Batch>>(BUFFERS);
            let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let file = file.try_clone().map_err(|e| {
                StoreError::io(format!("could not read image {}", image.display()), e)
            })?;
            let hasher = self.hasher();
            let reader = std::thread::Builder::new()
                .name(format!("commit-reader-{n}"))
                .spawn(move || read_and_hash(&file, shape, n, hasher, tx, free_rx))
                .map_err(|e| StoreError::io("could not start an image reader thread", e))?;
            batches.push(rx);
            free.push(free_tx);
            readers.push(reader);
        }
        drop(file);

        progress.start("commit", size);
        let mut stats = CommitStats::default();
        let mut builder = TreeBuilder::with_hasher(shape, self.hasher());
        let mut puts: JoinSet<Result<u64>> = JoinSet::new();
        let packer = crate::pack::Packer::default();
        let mut nodes = Vec::new();
        let mut node_bytes = 0u64;
        let mut next_block = 0u64;

        let mut turn = 0;
        while let Some(batch) = batches[turn % READERS].recv().await {
            if progress.stopped() {
                // The readers stop at their next batch, their channels gone.
                return Err(StoreError::Interrupted { disk: disk.clone() });
            }
            let batch = batch.map_err(|e| {
                StoreError::io(format!("could not read image {}", image.display()), e)
            })?;
            debug_assert_eq!(batch.first_block, next_block);
            let mut offset = 0usize;
            for (k, hash) in batch.hashes.iter().enumerate() {
                let i = batch.first_block + k as u64;
                let len = shape.block_len(i);
                let before = match prev_tree.as_mut() {
                    Some(t) if i < prev_leaves => t.group(i / FANOUT).await?[(i % FANOUT) as usize],
                    _ => ChunkHash::ZERO,
                };
                if *hash != before {
                    stats.blocks_changed += 1;
                    stats.bytes_changed += len as u64;
                    if !hash.is_zero() {
                        let data = Bytes::copy_from_slice(&batch.data[offset..offset + len]);
                        wait_for_room(&mut puts, &mut stats.bytes_stored).await?;
                        self.spawn_chunk_put(&mut puts, hash, data, &packer);
                    }
                }
                offset += len;
                builder.push(*hash, &mut nodes);
                for node in nodes.drain(..) {
                    node_bytes += self
                        .put_node_if_new(
                            node,
                            prev_tree.as_ref(),
                            &mut puts,
                            &mut stats.bytes_stored,
                        )
                        .await?;
                }
            }
            next_block += batch.hashes.len() as u64;
            stats.bytes_read += batch.data.len() as u64;
            progress.advance(batch.data.len() as u64);
            let _ = free[turn % READERS].send(batch.data);
            turn += 1;
        }
        drop(batches);
        for reader in readers {
            reader.join().map_err(|_| {
                StoreError::io(
                    "an image reader thread panicked",
                    std::io::Error::other("panic"),
                )
            })?;
        }
        if next_block != shape.leaves {
            return Err(StoreError::Invalid(format!(
                "image {} of disk {disk} changed size while it was read: commit from a stable image or snapshot",
                image.display()
            )));
        }
        let root = builder.finish(&mut nodes)?;
        for node in nodes.drain(..) {
            node_bytes += self
                .put_node_if_new(node, prev_tree.as_ref(), &mut puts, &mut stats.bytes_stored)
                .await?;
        }
        while let Some(done) = puts.join_next().await {
            stats.bytes_stored += join_result(done)?;
        }
        packer.finish(self).await?;
        progress.finish();
        stats.node_bytes_stored = node_bytes;

        // Objects first, manifest last.
        self.backend().flush().await?;
        let id = self
            .write_manifest(disk, prev.as_ref(), shape, root, stats, options)
            .await?;
        Ok((id, prev.map(|p| p.id), stats))
    }

    /// Writes the manifest of the next point of `disk` after `prev`: with a create-only put,
    /// so two commits racing for the same id cannot both win.
    pub(crate) async fn write_manifest(
        &self,
        disk: &DiskName,
        prev: Option<&PointManifest>,
        shape: Shape,
        root: ChunkHash,
        stats: CommitStats,
        options: CommitOptions,
    ) -> Result<PointId> {
        let id = PointId(prev.map_or(1, |p| p.id.0 + 1));
        let manifest = PointManifest {
            disk: disk.clone(),
            id,
            parent: prev.map(|p| p.id),
            created_unix_ms: now_ms(),
            mark: options.mark,
            seq: options.seq,
            size: shape.size,
            block_size: shape.block_size,
            depth: shape.depth,
            root,
            stats,
        };
        let path = PointManifest::path(disk, id);
        match self
            .backend()
            .durable
            .put_opts(
                &Path::from(path.as_str()),
                PutPayload::from(manifest.encode_with(self.manifest_key())),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(id),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::Conflict(format!(
                "another commit to disk {disk} created point {id} meanwhile: run the commit again"
            ))),
            Err(e) => Err(StoreError::backend(
                format!(
                    "could not write point manifest {path} to {}",
                    self.display()
                ),
                e,
            )),
        }
    }

    /// Compresses and stores one block's chunk in the background; the task yields the bytes
    /// stored.
    /// A small chunk object ([`crate::pack::small_for`]) goes into the commit's packs
    /// (`packer`) instead of an object of its own.
    pub(crate) fn spawn_chunk_put(
        &self,
        puts: &mut JoinSet<Result<u64>>,
        hash: &ChunkHash,
        data: Bytes,
        packer: &crate::pack::Packer,
    ) {
        let (store, packer, hash) = (self.clone(), packer.clone(), *hash);
        let path = Store::chunk_path(&hash);
        puts.spawn(async move {
            let (sealing, name) = (store.clone(), path.clone());
            let object = tokio::task::spawn_blocking(move || {
                sealing.seal_object(&name, Bytes::from(chunk::encode(&data)))
            })
            .await
            .map_err(|e| StoreError::io("chunk encoder failed", std::io::Error::other(e)))??;
            let n = object.len() as u64;
            if store.packs_small_chunks()
                && object.len() < crate::pack::small_for(store.block_size())
            {
                // Counted only when packed now (not held already).
                let packed = packer.put(&store, hash, &object).await?;
                return Ok(if packed { n } else { 0 });
            }
            store.put_stored(path, object).await?;
            Ok(n)
        });
    }

    /// Stores a new tree node unless it is all zeros or the previous tree has it at the same place.
    async fn put_node_if_new(
        &self,
        node: NewNode,
        prev: Option<&TreeReader>,
        puts: &mut JoinSet<Result<u64>>,
        stored: &mut u64,
    ) -> Result<u64> {
        let Some(bytes) = node.bytes else {
            return Ok(0);
        };
        if prev.and_then(|t| t.cached_hash(node.level, node.index)) == Some(node.hash) {
            return Ok(0);
        }
        let n = bytes.len() as u64;
        wait_for_room(puts, stored).await?;
        let store = self.clone();
        let path = Store::node_path(&node.hash);
        puts.spawn(async move { store.put_object(path, bytes).await.map(|_| n) });
        Ok(n)
    }
}

pub(crate) async fn wait_for_room(puts: &mut JoinSet<Result<u64>>, stored: &mut u64) -> Result<()> {
    while puts.len() >= PUTS_IN_FLIGHT {
        if let Some(done) = puts.join_next().await {
            *stored += join_result(done)?;
        }
    }
    Ok(())
}

pub(crate) fn join_result(
    r: std::result::Result<Result<u64>, tokio::task::JoinError>,
) -> Result<u64> {
    r.map_err(|e| StoreError::io("a store write task failed", std::io::Error::other(e)))?
}

/// Reads the image in batches, hashes every block (zero blocks get [`ChunkHash::ZERO`]) and
/// sends the batches in order. Stops early if the receiver is gone.
fn read_and_hash(
    file: &File,
    shape: Shape,
    reader: usize,
    hasher: crate::seal::Hasher,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Batch>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let blocks_per_batch = (BATCH_BYTES / shape.block_size).max(1);
    let mut fresh = BUFFERS + 1;
    let mut batch = reader as u64;
    loop {
        let block = batch * blocks_per_batch;
        if block >= shape.leaves {
            return;
        }
        let count = blocks_per_batch.min(shape.leaves - block);
        let start = block * shape.block_size;
        let len = ((block + count) * shape.block_size).min(shape.size) - start;
        let mut data = if fresh > 0 {
            fresh -= 1;
            Vec::new()
        } else {
            match free.recv() {
                Ok(buffer) => buffer,
                Err(_) => return, // the commit ended early
            }
        };
        data.resize(len as usize, 0);
        // Holes are neither read (which would fill the page cache with zeros) nor hashed.
        let extents = data_extents(file, start, start + len);
        let bs = shape.block_size;
        let read = extents.iter().try_for_each(|&(a, b)| {
            let (a, b) = (
                a / bs * bs,
                b.div_ceil(bs).saturating_mul(bs).min(start + len),
            );
            let span = &mut data[(a - start) as usize..(b - start) as usize];
            file.read_exact_at(span, a).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::other("the image shrank while it was read")
                } else {
                    e
                }
            })
        });
        let msg = read.map(|()| Batch {
            first_block: block,
            hashes: hash_blocks(&data, bs as usize, hasher, |k| {
                let (a, b) = (start + k as u64 * bs, start + (k as u64 + 1) * bs);
                extents.iter().any(|&(x, y)| x < b && a < y)
            }),
            data,
        });
        let failed = msg.is_err();
        if tx.blocking_send(msg).is_err() || failed {
            return;
        }
        batch += READERS as u64;
    }
}

/// The ranges of `file` within `start..end` that hold data, in order; holes (never written)
/// are left out. Where the file system cannot tell, the whole range.
fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break, // a hole up to the end of the file
            Err(_) => {
                out.push((pos, end));
                break;
            }
        };
        if data >= end {
            break;
        }
        let hole = lseek(file, data as i64, Whence::SeekHole).map_or(end, |h| (h as u64).min(end));
        out.push((data, hole.max(data + 1)));
        pos = hole.max(data + 1);
    }
    out
}

/// Hashes each block of `data` that `has_data(k)` says may hold data (the others, and zero
/// blocks, get [`ChunkHash::ZERO`]).
pub(crate) fn hash_blocks(
    data: &[u8],
    block_size: usize,
    hasher: crate::seal::Hasher,
    has_data: impl Fn(usize) -> bool,
) -> Vec<ChunkHash> {
    data.chunks(block_size)
        .enumerate()
        .map(|(k, b)| {
            if !has_data(k) || chunk::is_zero(b) {
                ChunkHash::ZERO
            } else {
                hasher.hash(b)
            }
        })
        .collect()
}
