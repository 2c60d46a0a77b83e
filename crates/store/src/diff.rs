//! Diff of two points: walks both trees together and skips every subtree whose hash is equal,
//! so its cost follows the changes, not the disk size. Resync, failover and failback all use it.

use boomerang_core::ChunkHash;
use serde::Serialize;

use crate::Store;
use crate::error::Result;
use crate::point::PointManifest;
use crate::tree::{FANOUT, TreeReader};

/// A run of bytes that differs between two points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    pub offset: u64,
    pub len: u64,
}

/// A node's hash on one side; `None` above a tree's real root (a tree is lifted to the depth
/// of the deeper one by virtual nodes whose first child is the real root).
type Side = Option<ChunkHash>;

impl Store {
    /// The byte ranges where `to` differs from `from` (sorted, merged). If the disk grew, the
    /// grown part is reported as changed.
    pub async fn diff(
        &self,
        from: &PointManifest,
        to: &PointManifest,
    ) -> Result<Vec<ChangedRange>> {
        let (sa, sb) = (from.shape(), to.shape());
        let depth = sa.depth.max(sb.depth);
        let leaves = sa.leaves.max(sb.leaves);
        let block = sa.block_size;
        let max_size = sa.size.max(sb.size);
        let min_size = sa.size.min(sb.size);
        let mut a = TreeReader::new(self.clone(), from.tree());
        let mut b = TreeReader::new(self.clone(), to.tree());
        let side = |m: &PointManifest| (m.depth == depth).then_some(m.root);
        let mut stack: Vec<(u32, u64, Side, Side)> = vec![(depth, 0, side(from), side(to))];
        let mut ranges: Vec<ChangedRange> = Vec::new();
        while let Some((level, index, ha, hb)) = stack.pop() {
            if ha.is_some() && ha == hb {
                continue;
            }
            if level == 0 {
                let offset = index * block;
                let end = ((index + 1) * block).min(min_size);
                if offset < end {
                    push(&mut ranges, offset, end - offset);
                }
                continue;
            }
            let ca = children(&mut a, from, level, index, ha).await?;
            let cb = children(&mut b, to, level, index, hb).await?;
            let span = FANOUT.pow(level - 1);
            for k in (0..FANOUT as usize).rev() {
                let child = index * FANOUT + k as u64;
                if child * span >= leaves {
                    continue;
                }
                stack.push((level - 1, child, ca[k], cb[k]));
            }
        }
        if max_size > min_size {
            push(&mut ranges, min_size, max_size - min_size);
        }
        Ok(ranges)
    }
}

fn push(ranges: &mut Vec<ChangedRange>, offset: u64, len: u64) {
    if let Some(last) = ranges.last_mut()
        && last.offset + last.len == offset
    {
        last.len += len;
        return;
    }
    ranges.push(ChangedRange { offset, len });
}

/// The `FANOUT` children of node `(level, index)` of one tree, padded with zeros.
async fn children(
    reader: &mut TreeReader,
    point: &PointManifest,
    level: u32,
    index: u64,
    hash: Side,
) -> Result<Vec<Side>> {
    let mut out = vec![Some(ChunkHash::ZERO); FANOUT as usize];
    if level > point.depth {
        // Virtual node: only its first child leads to the real tree.
        if index == 0 {
            out[0] = if level - 1 == point.depth {
                Some(point.root)
            } else {
                None
            };
        }
        return Ok(out);
    }
    if hash.is_some_and(|h| h.is_zero())
        || index >= point.shape().leaves.div_ceil(FANOUT.pow(level)).max(1)
    {
        return Ok(out);
    }
    let (_, kids) = reader.node(level, index).await?;
    for (slot, kid) in out.iter_mut().zip(kids.iter()) {
        *slot = Some(*kid);
    }
    Ok(out)
}
