//! Digests of replica images for agents about to copy a disk (`boomerang_wire::digest`).
//!
//! A digest is taken once the stream's applier has applied every record up to the request's
//! `after`. The applier goes on meanwhile: a block it changes during the hashing is changed by
//! a later record, which the agent knows of and does not trust the digest for. An applier that
//! restarts during the hashing (after an error) applies older records again, so such a digest
//! is thrown away. With `after` 0 (a stream with no record before the copy) every record is
//! later than the digest, so the image can be hashed at once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_core::Seq;
use boomerang_wire::{DIGEST_BLOCK, Digest, DigestRequest};
use tokio::sync::watch;

/// Where an applier stands: its run (one more at each restart) and the last record applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Position {
    pub run: u64,
    pub applied: Seq,
}

/// The position of every stream's applier.
pub(crate) type Positions = Arc<Mutex<HashMap<String, watch::Receiver<Position>>>>;

/// How long a request waits for the records before `after` to be applied.
const WAIT: Duration = Duration::from_secs(90);

/// Answers `request` from the replica images under `retention`.
pub(crate) async fn answer(
    retention: PathBuf,
    positions: Positions,
    request: DigestRequest,
) -> Result<Digest, String> {
    let position = reach(&positions, &request).await?;
    let path = crate::apply::image_path(&retention, &request.stream, &request.disk);
    let (first, count) = (request.first_block, request.count);
    let hashed = tokio::task::spawn_blocking(move || hash_image(&path, first, count))
        .await
        .map_err(|e| e.to_string())??;
    // With `after` 0 every record is later than the digest, whatever the applier does.
    if let Some(start) = position.filter(|_| request.after > Seq(0)) {
        let now = current(&positions, &request.stream);
        if now.is_none_or(|p| p.run != start.run) {
            return Err(format!(
                "the applier of {} restarted while the replica was hashed; ask again",
                request.stream
            ));
        }
    }
    let at = position.map_or(Seq(0), |p| p.applied);
    Ok(match hashed {
        Some(hashes) => Digest {
            at,
            replica: true,
            hashes,
        },
        None => Digest {
            at,
            replica: false,
            hashes: Vec::new(),
        },
    })
}

fn current(positions: &Positions, stream: &str) -> Option<Position> {
    let all = positions.lock().unwrap_or_else(|e| e.into_inner());
    all.get(stream).map(|rx| *rx.borrow())
}

/// Waits until the applier of the stream has applied `after`; its position then (none when
/// nothing was asked to be applied and no applier runs).
async fn reach(positions: &Positions, request: &DigestRequest) -> Result<Option<Position>, String> {
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let rx = {
                let all = positions.lock().unwrap_or_else(|e| e.into_inner());
                all.get(&request.stream).cloned()
            };
            match rx {
                Some(mut rx) => {
                    let p = *rx
                        .wait_for(|p| p.applied >= request.after)
                        .await
                        .map_err(|_| format!("the applier of {} stopped", request.stream))?;
                    return Ok(Some(p));
                }
                None if request.after == Seq(0) => return Ok(None),
                // Records are on their way: their applier starts with the first of them.
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    waited.await.unwrap_or_else(|_| {
        Err(format!(
            "the master target has not applied record {} of {} within {WAIT:?}; the replica cannot be compared yet",
            request.after, request.stream
        ))
    })
}

/// BLAKE3 of blocks `first..first + count` of the image at `path`, up to its end; none when
/// there is no image.
fn hash_image(path: &Path, first: u64, count: u32) -> Result<Option<Vec<[u8; 32]>>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("could not open {}: {e}", path.display())),
    };
    let size = file
        .metadata()
        .map_err(|e| format!("could not inspect {}: {e}", path.display()))?
        .len();
    let mut hashes = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; DIGEST_BLOCK as usize];
    for block in first..first.saturating_add(u64::from(count)) {
        let offset = block.saturating_mul(DIGEST_BLOCK);
        if offset >= size {
            break;
        }
        let len = DIGEST_BLOCK.min(size - offset) as usize;
        file.read_exact_at(&mut buf[..len], offset)
            .map_err(|e| format!("could not read {}: {e}", path.display()))?;
        hashes.push(boomerang_store::chunk::hash(&buf[..len]).0);
    }
    Ok(Some(hashes))
}
