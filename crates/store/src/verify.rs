//! Verify: reads every manifest, node and chunk and checks each against its name.
//!
//! Each object is checked once; a damaged block shared by several points is reported for each
//! of them, with the offset it has there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use boomerang_core::{ChunkHash, DiskName, PointId};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::point::PointManifest;
use crate::tree::{FANOUT, decode_node_with};
use crate::{Progress, Store};

/// One damaged or missing object, and where it is used.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BadObject {
    pub object: String,
    pub disk: Option<DiskName>,
    pub point: Option<PointId>,
    /// Byte offset in the disk of the first block the object holds.
    pub offset: Option<u64>,
    pub problem: String,
}

/// What verify found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub points: u64,
    pub nodes_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub unreferenced_checked: u64,
    pub bad: Vec<BadObject>,
}

/// A problem inside a subtree: leaf index relative to the subtree's first block.
#[derive(Clone, Debug)]
struct Flaw {
    leaf: u64,
    object: String,
    problem: String,
}

#[derive(Default)]
struct Seen {
    nodes: HashMap<ChunkHash, Vec<Flaw>>,
    chunks: HashMap<ChunkHash, Option<String>>,
}

type Walk<'a> = Pin<Box<dyn Future<Output = Result<Vec<Flaw>>> + Send + 'a>>;

impl Store {
    /// Checks the whole store. Problems are collected in the report, not returned as errors;
    /// an error means the store could not be read at all.
    pub async fn verify(&self, progress: &dyn Progress) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut seen = Seen::default();
        let mut paths = self.point_paths(None).await?;
        paths.sort();
        progress.start("verify", paths.len() as u64);
        for path in paths {
            let point = match self.read_manifest(&path).await {
                Ok(p) => p,
                Err(StoreError::Corrupt(problem)) => {
                    report.bad.push(BadObject {
                        object: path.clone(),
                        disk: None,
                        point: None,
                        offset: None,
                        problem,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            report.points += 1;
            let shape = point.shape();
            let flaws = self
                .walk(&mut seen, &mut report, &point, shape.depth, 0, point.root)
                .await?;
            for f in flaws {
                report.bad.push(BadObject {
                    object: f.object,
                    disk: Some(point.disk.clone()),
                    point: Some(point.id),
                    offset: Some(f.leaf * shape.block_size),
                    problem: f.problem,
                });
            }
            progress.advance(1);
        }
        progress.finish();
        self.verify_unreferenced(&seen, &mut report).await?;
        Ok(report)
    }

    fn walk<'a>(
        &'a self,
        seen: &'a mut Seen,
        report: &'a mut VerifyReport,
        point: &'a PointManifest,
        level: u32,
        index: u64,
        hash: ChunkHash,
    ) -> Walk<'a> {
        Box::pin(async move {
            if hash.is_zero() {
                return Ok(Vec::new());
            }
            if let Some(flaws) = seen.nodes.get(&hash) {
                return Ok(flaws.clone());
            }
            let shape = point.shape();
            let path = Store::node_path(&hash);
            let count = shape.children(level, index);
            let kids = match self.get_raw(&path).await {
                Ok(bytes) => {
                    report.nodes_checked += 1;
                    report.bytes_checked += bytes.len() as u64;
                    match self.unseal(&path, bytes) {
                        Ok(bytes) => decode_node_with(&bytes, &hash, level, count, self.hasher())
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(StoreError::Backend {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => Err("the tree node is missing".to_string()),
                Err(e) => return Err(e),
            };
            let kids = match kids {
                Ok(k) => k,
                Err(problem) => {
                    let flaws = vec![Flaw {
                        leaf: 0,
                        object: path,
                        problem,
                    }];
                    seen.nodes.insert(hash, flaws.clone());
                    return Ok(flaws);
                }
            };
            let span = shape.span(level - 1);
            let mut flaws = Vec::new();
            if level == 1 {
                let first = index * FANOUT;
                let todo: Vec<(ChunkHash, usize)> = kids
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| !h.is_zero() && !seen.chunks.contains_key(h))
                    .map(|(k, h)| (*h, shape.block_len(first + k as u64)))
                    .collect();
                let mut checks = futures::stream::iter(todo)
                    .map(|(h, len)| {
                        let store = self.clone();
                        tokio::spawn(async move { (h, store.check_chunk(&h, Some(len)).await) })
                    })
                    .buffer_unordered(16);
                while let Some(done) = checks.next().await {
                    let (h, result) = done.map_err(|e| {
                        StoreError::io("a verify task failed", std::io::Error::other(e))
                    })?;
                    let (size, problem) = result?;
                    report.chunks_checked += 1;
                    report.bytes_checked += size;
                    seen.chunks.insert(h, problem);
                }
                for (k, h) in kids.iter().enumerate() {
                    if let Some(Some(problem)) = seen.chunks.get(h) {
                        flaws.push(Flaw {
                            leaf: k as u64,
                            object: Store::chunk_path(h),
                            problem: problem.clone(),
                        });
                    }
                }
            } else {
                for (k, h) in kids.iter().enumerate() {
                    let child = index * FANOUT + k as u64;
                    let sub = self.walk(seen, report, point, level - 1, child, *h).await?;
                    flaws.extend(sub.into_iter().map(|f| Flaw {
                        leaf: f.leaf + k as u64 * span,
                        ..f
                    }));
                }
            }
            seen.nodes.insert(hash, flaws.clone());
            Ok(flaws)
        })
    }

    /// Reads one chunk and says what is wrong with it, if anything: (object size, problem).
    async fn check_chunk(
        &self,
        hash: &ChunkHash,
        len: Option<usize>,
    ) -> Result<(u64, Option<String>)> {
        let path = Store::chunk_path(hash);
        let bytes = match self.get_chunk_raw(hash).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok((0, Some("the chunk is missing".into()))),
            // A store that does not answer: verify cannot go on. Anything else is this chunk's.
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => return Ok((0, Some(format!("the chunk cannot be read: {e}")))),
        };
        let size = bytes.len() as u64;
        let (expected, store) = (*hash, self.clone());
        let problem = tokio::task::spawn_blocking(move || {
            store.open_chunk(&path, &bytes, &expected, len).err()
        })
        .await
        .map_err(|e| StoreError::io("a verify task failed", std::io::Error::other(e)))?;
        // A packed chunk: where it is, to restore.
        let place = match self.find_packed_now(hash) {
            Some(at) => format!(" (packed in {} at byte {})", at.pack, at.offset),
            None => String::new(),
        };
        Ok((size, problem.map(|p| format!("{p}{place}"))))
    }

    /// Checks objects that no point references (left by a crash, or awaiting GC).
    async fn verify_unreferenced(&self, seen: &Seen, report: &mut VerifyReport) -> Result<()> {
        // A store in a group shares its chunks: those it does not name are other stores'.
        let prefixes: &[&str] = if self.backend().shared().is_some() {
            &["nodes"]
        } else {
            &["chunks", "nodes"]
        };
        for &prefix in prefixes {
            let metas: Vec<_> = self
                .backend()
                .objects_at(prefix)
                .list(Some(&Path::from(prefix)))
                .try_collect()
                .await
                .map_err(|e| {
                    StoreError::backend(
                        format!("could not list {prefix}/ in {}", self.display()),
                        e,
                    )
                })?;
            for meta in metas {
                let object = meta.location.to_string();
                let Some(hash) = meta.location.filename().and_then(ChunkHash::from_hex) else {
                    report.bad.push(BadObject {
                        object,
                        disk: None,
                        point: None,
                        offset: None,
                        problem: "the object's name is not a hash: it does not belong in the store"
                            .into(),
                    });
                    continue;
                };
                let problem = if prefix == "chunks" {
                    if seen.chunks.contains_key(&hash) {
                        continue;
                    }
                    self.check_chunk(&hash, None).await?.1
                } else {
                    if seen.nodes.contains_key(&hash) {
                        continue;
                    }
                    let bytes = self.get_raw(&object).await?;
                    match self.unseal(&object, bytes) {
                        Ok(bytes) => (self.hash(&bytes) != hash)
                            .then(|| "the node's content does not match its hash".to_string()),
                        Err(e) => Some(e.to_string()),
                    }
                };
                report.unreferenced_checked += 1;
                if let Some(problem) = problem {
                    report.bad.push(BadObject {
                        object,
                        disk: None,
                        point: None,
                        offset: None,
                        problem: format!("{problem} (unreferenced object)"),
                    });
                }
            }
        }
        // Every pack index reads (a damaged one hides the chunks it lists).
        for idx in self.pack_indexes().await? {
            report.unreferenced_checked += 1;
            match self.read_index(&idx).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => report.bad.push(BadObject {
                    object: idx,
                    disk: None,
                    point: None,
                    offset: None,
                    problem: e.to_string(),
                }),
            }
        }
        Ok(())
    }
}
