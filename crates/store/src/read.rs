//! Reading a disk at a point: a streaming, ordered block walk with read-ahead, and raw export.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::time::Instant;

use boomerang_core::{ChunkHash, DiskName, PointId};
use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::error::{Result, StoreError, place};
use crate::point::PointManifest;
use crate::tree::{FANOUT, TreeReader};
use crate::{Progress, Store, chunk};

const READ_AHEAD: usize = 64;
/// Threads that read, check and write one group of blocks in a local export.
const EXPORT_THREADS: usize = 4;
/// Groups (of 256 blocks) between background flushes of a local export.
const FLUSH_EVERY: u64 = 8;

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub disk: DiskName,
    pub point: PointId,
    pub size: u64,
    /// Bytes of non-zero blocks written.
    pub bytes_written: u64,
    /// Bytes left as holes (zero blocks).
    pub bytes_sparse: u64,
    pub elapsed_ms: u64,
}

impl Store {
    /// Calls `f(block_index, data)` for every block of the point in order; `data` is `None` for a
    /// block of zeros. Chunks are fetched ahead and each is checked against its hash.
    pub async fn for_each_block<F>(&self, point: &PointManifest, mut f: F) -> Result<()>
    where
        F: FnMut(u64, Option<Bytes>) -> Result<()>,
    {
        let shape = point.shape();
        let mut tree = TreeReader::new(self.clone(), point.tree());
        let mut queue: VecDeque<(u64, Option<JoinHandle<Result<Bytes>>>)> = VecDeque::new();
        for i in 0..shape.leaves {
            let hash = tree.group(i / FANOUT).await?[(i % FANOUT) as usize];
            let fetch = (!hash.is_zero()).then(|| {
                let store = self.clone();
                let disk = point.disk.clone();
                let id = point.id;
                let len = shape.block_len(i);
                let offset = i * shape.block_size;
                tokio::spawn(async move { store.read_chunk(&hash, len, &disk, id, offset).await })
            });
            queue.push_back((i, fetch));
            while queue.len() > READ_AHEAD || queue.front().is_some_and(|(_, h)| h.is_none()) {
                pop(&mut queue, &mut f).await?;
            }
        }
        while !queue.is_empty() {
            pop(&mut queue, &mut f).await?;
        }
        Ok(())
    }

    /// Reads one chunk and checks it; errors name the disk, point and offset.
    pub async fn read_chunk(
        &self,
        hash: &ChunkHash,
        len: usize,
        disk: &DiskName,
        point: PointId,
        offset: u64,
    ) -> Result<Bytes> {
        let path = Store::chunk_path(hash);
        let expected = *hash;
        if self.backend().local_file(&path).is_some() {
            // One blocking hop for read, decompress and hash.
            let (store, at, d) = (self.clone(), *hash, disk.clone());
            let read = tokio::task::spawn_blocking(move || {
                store.read_chunk_local(&at, len, &d, point, offset)
            })
            .await
            .map_err(|e| StoreError::io("chunk reader failed", std::io::Error::other(e)))??;
            // Not found: in a pack made since the indexes were read, if anywhere.
            if let Some(data) = read {
                return Ok(data);
            }
        }
        let decoded = {
            let bytes = self
                .get_chunk_raw(hash)
                .await?
                .ok_or_else(|| missing_chunk(&path, disk, point, offset))?;
            let (store, name) = (self.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                store.open_chunk(&name, &bytes, &expected, Some(len))
            })
            .await
            .map_err(|e| StoreError::io("chunk decoder failed", std::io::Error::other(e)))?
        };
        decoded.map_err(|e| damaged_chunk(&path, e, disk, point, offset))
    }

    /// Export from a local store: per group of 256 blocks, a few threads read, check and write
    /// the chunks with plain blocking calls (far cheaper than a task per chunk).
    async fn export_local(
        &self,
        point: &PointManifest,
        file: &std::sync::Arc<File>,
        partial: &FsPath,
        written: &mut u64,
        progress: &dyn Progress,
    ) -> Result<()> {
        let shape = point.shape();
        let mut tree = TreeReader::new(self.clone(), point.tree());
        // The point is committed: every pack it names is indexed by now.
        self.load_packs().await?;
        // Write-back runs beside the export: every FLUSH_EVERY groups a background fdatasync
        // pushes what is dirty so far, so the final sync has little left to do.
        let mut flushing: Option<JoinHandle<std::io::Result<()>>> = None;
        for group in 0..shape.leaves.div_ceil(FANOUT) {
            if group % FLUSH_EVERY == FLUSH_EVERY - 1
                && flushing.as_ref().is_none_or(|h| h.is_finished())
            {
                if let Some(done) = flushing.take() {
                    done.await
                        .map_err(|e| {
                            StoreError::io("a flush task failed", std::io::Error::other(e))
                        })?
                        .map_err(|e| write_error(partial, e))?;
                }
                let file = file.clone();
                flushing = Some(tokio::task::spawn_blocking(move || file.sync_data()));
            }
            let hashes = tree.group(group).await?;
            let store = self.clone();
            let file = file.clone();
            let partial = partial.to_path_buf();
            let disk = point.disk.clone();
            let id = point.id;
            let first = group * FANOUT;
            let bytes = tokio::task::spawn_blocking(move || -> Result<u64> {
                let work = |part: &[ChunkHash], start: u64| -> Result<u64> {
                    let mut n = 0;
                    for (k, hash) in part.iter().enumerate() {
                        if hash.is_zero() {
                            continue;
                        }
                        let i = start + k as u64;
                        let offset = i * shape.block_size;
                        let data = store.read_chunk_blocking(
                            hash,
                            shape.block_len(i),
                            &disk,
                            id,
                            offset,
                        )?;
                        file.write_all_at(&data, offset)
                            .map_err(|e| write_error(&partial, e))?;
                        n += data.len() as u64;
                    }
                    Ok(n)
                };
                let part = hashes.len().div_ceil(EXPORT_THREADS).max(1);
                std::thread::scope(|s| {
                    let workers: Vec<_> = hashes
                        .chunks(part)
                        .enumerate()
                        .map(|(n, blocks)| {
                            let work = &work;
                            s.spawn(move || work(blocks, first + (n * part) as u64))
                        })
                        .collect();
                    let mut total = 0;
                    for w in workers {
                        total += w.join().map_err(|_| {
                            StoreError::io(
                                "an export thread panicked",
                                std::io::Error::other("panic"),
                            )
                        })??;
                    }
                    Ok(total)
                })
            })
            .await
            .map_err(|e| StoreError::io("an export task failed", std::io::Error::other(e)))??;
            *written += bytes;
            let first_byte = first * shape.block_size;
            let end = ((first + FANOUT) * shape.block_size).min(shape.size);
            progress.advance(end - first_byte);
        }
        if let Some(done) = flushing {
            done.await
                .map_err(|e| StoreError::io("a flush task failed", std::io::Error::other(e)))?
                .map_err(|e| write_error(partial, e))?;
        }
        Ok(())
    }

    /// [`Store::read_chunk`] for local stores, in the calling thread.
    fn read_chunk_blocking(
        &self,
        hash: &ChunkHash,
        len: usize,
        disk: &DiskName,
        point: PointId,
        offset: u64,
    ) -> Result<Bytes> {
        self.read_chunk_local(hash, len, disk, point, offset)?
            .ok_or_else(|| missing_chunk(&Store::chunk_path(hash), disk, point, offset))
    }

    /// [`Store::read_chunk_blocking`]; none when the chunk is neither in its own file nor in a
    /// pack of the indexes as last read.
    fn read_chunk_local(
        &self,
        hash: &ChunkHash,
        len: usize,
        disk: &DiskName,
        point: PointId,
        offset: u64,
    ) -> Result<Option<Bytes>> {
        let path = Store::chunk_path(hash);
        let file = self
            .backend()
            .local_file(&path)
            .ok_or_else(|| StoreError::Invalid("not a local store".into()))?;
        let unreadable = |what: &str, e| {
            StoreError::io(
                format!("could not read {what} of {}", place(disk, point, offset)),
                e,
            )
        };
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Packed: the indexes as last read say where.
                let Some(at) = self.find_packed_now(hash) else {
                    return Ok(None);
                };
                let pack = self
                    .backend()
                    .local_file(&at.pack)
                    .ok_or_else(|| StoreError::Invalid("not a local store".into()))?;
                let mut buf = vec![0u8; at.len as usize];
                match std::fs::File::open(&pack).and_then(|f| f.read_exact_at(&mut buf, at.offset))
                {
                    Ok(()) => buf,
                    // Collected since the indexes were read: looked up again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(unreadable(&format!("chunk {path} in {}", at.pack), e)),
                }
            }
            Err(e) => return Err(unreadable(&format!("chunk {path}"), e)),
        };
        self.open_chunk(&path, &bytes, hash, Some(len))
            .map(Some)
            .map_err(|e| damaged_chunk(&path, e, disk, point, offset))
    }

    /// Writes the point as a sparse raw image at `out` (via `out.partial`, renamed on success).
    pub async fn export_raw(
        &self,
        point: &PointManifest,
        out: &FsPath,
        progress: &dyn Progress,
    ) -> Result<ExportReport> {
        let started = Instant::now();
        let partial = partial_path(out);
        let file = File::create(&partial).map_err(|e| {
            StoreError::io(
                format!(
                    "could not create {}: check the directory exists and is writable",
                    partial.display()
                ),
                e,
            )
        })?;
        let shape = point.shape();
        progress.start("export", shape.size);
        let file = std::sync::Arc::new(file);
        let mut written = 0u64;
        let walk = if self.backend().local_file("").is_some() {
            self.export_local(point, &file, &partial, &mut written, progress)
                .await
        } else {
            self.for_each_block(point, |i, data| {
                let len = shape.block_len(i) as u64;
                if let Some(data) = data {
                    file.write_all_at(&data, i * shape.block_size)
                        .map_err(|e| write_error(&partial, e))?;
                    written += len;
                }
                progress.advance(len);
                Ok(())
            })
            .await
        };
        let finish = walk.and_then(|()| {
            file.set_len(shape.size)
                .and_then(|()| file.sync_all())
                .map_err(|e| {
                    StoreError::io(
                        format!("could not finish {}: check free space", partial.display()),
                        e,
                    )
                })
        });
        if let Err(e) = finish {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, out).map_err(|e| {
            StoreError::io(
                format!(
                    "could not rename {} to {}",
                    partial.display(),
                    out.display()
                ),
                e,
            )
        })?;
        progress.finish();
        Ok(ExportReport {
            disk: point.disk.clone(),
            point: point.id,
            size: shape.size,
            bytes_written: written,
            bytes_sparse: shape.size - written,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

fn missing_chunk(path: &str, disk: &DiskName, point: PointId, offset: u64) -> StoreError {
    StoreError::Corrupt(format!(
        "block at {} is missing: chunk {path} is not in the store; run `boomerang store verify` and restore the store from a copy",
        place(disk, point, offset)
    ))
}

fn damaged_chunk(
    path: &str,
    e: chunk::ChunkError,
    disk: &DiskName,
    point: PointId,
    offset: u64,
) -> StoreError {
    StoreError::Corrupt(format!(
        "block at {} is damaged: chunk {path}: {e}; the point cannot be read correctly; run `boomerang store verify` and restore the store from a copy",
        place(disk, point, offset)
    ))
}

fn write_error(partial: &FsPath, e: std::io::Error) -> StoreError {
    StoreError::io(
        format!("could not write {}: check free space", partial.display()),
        e,
    )
}

/// `FILE.partial` beside `FILE`.
pub fn partial_path(out: &FsPath) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

async fn pop<F>(
    queue: &mut VecDeque<(u64, Option<JoinHandle<Result<Bytes>>>)>,
    f: &mut F,
) -> Result<()>
where
    F: FnMut(u64, Option<Bytes>) -> Result<()>,
{
    let Some((i, fetch)) = queue.pop_front() else {
        return Ok(());
    };
    let data =
        match fetch {
            None => None,
            Some(handle) => Some(handle.await.map_err(|e| {
                StoreError::io("a chunk read task failed", std::io::Error::other(e))
            })??),
        };
    f(i, data)
}
