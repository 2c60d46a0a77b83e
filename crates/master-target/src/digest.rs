//! Digests of replica images for agents about to copy a disk (`boomerang_wire::digest`).
//!
//! A digest is taken once the stream's applier has applied every record up to the request's
//! `after`. The applier goes on meanwhile: a block it changes during the hashing is changed by
//! a later record, which the agent knows of and does not trust the digest for. An applier that
//! restarts during the hashing (after an error) applies older records again, so such a digest
//! is thrown away. With `after` 0 (a stream with no record before the copy) every record is
//! later than the digest, so the image can be hashed at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_core::Seq;
use boomerang_nbd::{BlockDevice, FileDevice};
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
    problems: crate::Problems,
    request: DigestRequest,
) -> Result<Digest, String> {
    let position = reach(&positions, &problems, &request).await?;
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
/// nothing was asked to be applied and no applier runs). An applier that fails in a way
/// retrying does not mend (its store refuses the credentials) gets no wait.
async fn reach(
    positions: &Positions,
    problems: &crate::Problems,
    request: &DigestRequest,
) -> Result<Option<Position>, String> {
    let lasting = || {
        let all = problems.lock().unwrap_or_else(|e| e.into_inner());
        all.get(&request.stream).filter(|p| p.lasting).map(|p| {
            format!(
                "the replica of {} cannot be kept: {}",
                request.stream, p.error
            )
        })
    };
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let rx = {
                let all = positions.lock().unwrap_or_else(|e| e.into_inner());
                all.get(&request.stream).cloned()
            };
            if let Some(p) = rx.as_ref().map(|rx| *rx.borrow())
                && p.applied >= request.after
            {
                return Ok(Some(p));
            }
            if let Some(why) = lasting() {
                return Err(why);
            }
            match rx {
                Some(mut rx) => {
                    let reached = tokio::time::timeout(
                        Duration::from_secs(1),
                        rx.wait_for(|p| p.applied >= request.after),
                    )
                    .await;
                    match reached {
                        Ok(Ok(p)) => return Ok(Some(*p)),
                        Ok(Err(_)) => {
                            return Err(format!("the applier of {} stopped", request.stream));
                        }
                        // (Looked at again: the applier may have failed meanwhile.)
                        Err(_) => continue,
                    }
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
/// there is no image. Holes are not read: a block wholly in one hashes as zeros.
fn hash_image(path: &Path, first: u64, count: u32) -> Result<Option<Vec<[u8; 32]>>, String> {
    let image = match FileDevice::open(path, true) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("could not open {}: {e}", path.display())),
    };
    let bad = |e: std::io::Error| format!("could not read {}: {e}", path.display());
    let size = image.size();
    let zeros = boomerang_store::chunk::hash(&[0u8; DIGEST_BLOCK as usize]).0;
    let mut hashes = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; DIGEST_BLOCK as usize];
    // The image's extents from the block being hashed on: (end, hole).
    let mut extents = std::collections::VecDeque::new();
    for block in first..first.saturating_add(u64::from(count)) {
        let offset = block.saturating_mul(DIGEST_BLOCK);
        if offset >= size {
            break;
        }
        let len = DIGEST_BLOCK.min(size - offset);
        while extents.front().is_some_and(|&(end, _)| end <= offset) {
            extents.pop_front();
        }
        if extents.is_empty() {
            let mut at = offset;
            for e in image.block_status(offset, size - offset).map_err(bad)? {
                at += e.len;
                extents.push_back((at, e.hole));
            }
        }
        if len == DIGEST_BLOCK
            && extents
                .front()
                .is_some_and(|&(end, hole)| hole && end >= offset + len)
        {
            hashes.push(zeros);
            continue;
        }
        let data = &mut buf[..len as usize];
        image.read_at(data, offset).map_err(bad)?;
        hashes.push(boomerang_store::chunk::hash(data).0);
    }
    Ok(Some(hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_hash_as_zeros_and_data_as_itself() {
        let dir = std::env::temp_dir().join(format!("boomerang-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d0.img");
        let block = DIGEST_BLOCK as usize;
        // 40 blocks and a short one; data in blocks 3, 17..19 and the short last one; the
        // rest holes (and block 30 written with zeros, which is data to the file system).
        let size = 40 * block + 1000;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size as u64).unwrap();
        let mut want = vec![0u8; size];
        use std::os::unix::fs::FileExt;
        for (at, len, byte) in [
            (3 * block + 7, 100, 1u8),
            (17 * block, 2 * block + 5, 2),
            (30 * block, block, 0),
            (40 * block, 1000, 3),
        ] {
            let data = vec![byte; len];
            file.write_all_at(&data, at as u64).unwrap();
            want[at..at + len].copy_from_slice(&data);
        }
        file.sync_all().unwrap();
        let hashes = hash_image(&path, 2, 100).unwrap().unwrap();
        let expected: Vec<[u8; 32]> = want
            .chunks(block)
            .skip(2)
            .map(|b| boomerang_store::chunk::hash(b).0)
            .collect();
        assert_eq!(hashes.len(), 39);
        assert_eq!(hashes, expected);
        assert_eq!(hash_image(&dir.join("none.img"), 0, 1).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
