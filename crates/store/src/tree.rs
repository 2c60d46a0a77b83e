//! The Merkle block tree: shape math, node objects, a cached reader and a streaming builder.
//!
//! A disk of `n` blocks is a tree of fixed fan-out `F` (256). Level 0 are the blocks' chunk
//! hashes; a node at level `k` lists the hashes of up to `F` nodes (or chunks) of level `k-1`
//! and covers `F^k` blocks from an aligned position. The depth is the smallest `d >= 1` with
//! `F^d >= n`. A node (or chunk) whose whole span is zeros has the hash [`ChunkHash::ZERO`]
//! and is not stored, so sparse disks cost nothing.
//!
//! Node object (named by the BLAKE3 hash of all its bytes):
//! ```text
//! 0  4  magic "BMND"     4  1  version = 1     5  1  level (1..=16)
//! 6  2  count, u16 LE (1..=F)                  8  32*count child hashes
//! ```

use std::sync::Arc;

use boomerang_core::{ChunkHash, DiskName, PointId};
use bytes::Bytes;

use crate::Store;
use crate::error::{Result, StoreError, place};

pub const NODE_MAGIC: &[u8; 4] = b"BMND";
pub const NODE_VERSION: u8 = 1;
pub const NODE_HEADER_LEN: usize = 8;
/// Children per node. Fixed: it is part of every tree's identity.
pub const FANOUT: u64 = 256;

/// The shape of a disk's tree, derived from its size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub size: u64,
    pub block_size: u64,
    pub leaves: u64,
    pub depth: u32,
}

impl Shape {
    pub fn new(size: u64, block_size: u64) -> Self {
        let leaves = size.div_ceil(block_size);
        let mut depth = 1;
        let mut span = FANOUT;
        while span < leaves {
            depth += 1;
            span = span.saturating_mul(FANOUT);
        }
        Shape {
            size,
            block_size,
            leaves,
            depth,
        }
    }

    /// Blocks covered by one node at `level` (level 0 is a block).
    pub fn span(&self, level: u32) -> u64 {
        FANOUT.saturating_pow(level)
    }

    /// How many children the node `(level, index)` has.
    pub fn children(&self, level: u32, index: u64) -> usize {
        let first = index.saturating_mul(self.span(level));
        let covered = self.leaves.saturating_sub(first).min(self.span(level));
        covered.div_ceil(self.span(level - 1)) as usize
    }

    /// Length in bytes of block `i` (the tail block may be short).
    pub fn block_len(&self, i: u64) -> usize {
        let start = i * self.block_size;
        (self.size - start).min(self.block_size) as usize
    }
}

/// Encodes a node's children.
pub fn encode_node(level: u32, children: &[ChunkHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NODE_HEADER_LEN + 32 * children.len());
    out.extend_from_slice(NODE_MAGIC);
    out.push(NODE_VERSION);
    out.push(level as u8);
    out.extend_from_slice(&(children.len() as u16).to_le_bytes());
    for c in children {
        out.extend_from_slice(&c.0);
    }
    out
}

/// Why a node object was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("the node's content does not match its hash")]
    Hash,
    #[error("the node's header is damaged")]
    Header,
    #[error("the node is at level {found} where level {expected} was expected")]
    Level { expected: u32, found: u32 },
    #[error("the node has {found} children where {expected} were expected")]
    Count { expected: usize, found: usize },
}

/// Checks a node object against its name, level and child count, and returns the children.
pub fn decode_node(
    bytes: &[u8],
    expected: &ChunkHash,
    level: u32,
    count: usize,
) -> Result<Vec<ChunkHash>, NodeError> {
    decode_node_with(bytes, expected, level, count, crate::seal::Hasher::Plain)
}

/// [`decode_node`], for a store that names content with `hasher`.
pub fn decode_node_with(
    bytes: &[u8],
    expected: &ChunkHash,
    level: u32,
    count: usize,
    hasher: crate::seal::Hasher,
) -> Result<Vec<ChunkHash>, NodeError> {
    if hasher.hash(bytes) != *expected {
        return Err(NodeError::Hash);
    }
    if bytes.len() < NODE_HEADER_LEN || &bytes[..4] != NODE_MAGIC || bytes[4] != NODE_VERSION {
        return Err(NodeError::Header);
    }
    let found_level = u32::from(bytes[5]);
    if found_level != level {
        return Err(NodeError::Level {
            expected: level,
            found: found_level,
        });
    }
    let found = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
    if found != count || bytes.len() != NODE_HEADER_LEN + 32 * found {
        return Err(NodeError::Count {
            expected: count,
            found,
        });
    }
    Ok(bytes[NODE_HEADER_LEN..]
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            ChunkHash(h)
        })
        .collect())
}

/// A tree to read: a point's root and shape, with the names used in error messages.
#[derive(Clone, Debug)]
pub struct TreeRef {
    pub disk: DiskName,
    pub point: PointId,
    pub shape: Shape,
    pub root: ChunkHash,
}

type Children = Arc<Vec<ChunkHash>>;

/// Reads a tree's nodes on demand, keeping the path to the last node asked for.
///
/// Sequential walks load every node once; memory is `depth` nodes.
pub struct TreeReader {
    store: Store,
    tree: TreeRef,
    /// Per level (index 0 = level 1): the node index, its hash and its children.
    path: Vec<Option<(u64, ChunkHash, Children)>>,
}

impl TreeReader {
    pub fn new(store: Store, tree: TreeRef) -> Self {
        let depth = tree.shape.depth as usize;
        TreeReader {
            store,
            tree,
            path: vec![None; depth],
        }
    }

    pub fn tree(&self) -> &TreeRef {
        &self.tree
    }

    /// The children of node `(level, index)`.
    pub async fn node(&mut self, level: u32, index: u64) -> Result<(ChunkHash, Children)> {
        let shape = self.tree.shape;
        if level == 0 || level > shape.depth {
            return Err(StoreError::Invalid(format!(
                "tree level {level} is outside the tree of depth {}",
                shape.depth
            )));
        }
        for l in (level..=shape.depth).rev() {
            let idx = index / shape.span(l - level);
            let slot = (l - 1) as usize;
            if matches!(&self.path[slot], Some((i, _, _)) if *i == idx) {
                continue;
            }
            let hash = if l == shape.depth {
                self.tree.root
            } else {
                let parent = self.path[l as usize]
                    .as_ref()
                    .map(|(_, _, c)| c.clone())
                    .unwrap_or_default();
                parent
                    .get((idx % FANOUT) as usize)
                    .copied()
                    .unwrap_or(ChunkHash::ZERO)
            };
            let count = shape.children(l, idx);
            let children = if hash.is_zero() {
                Arc::new(vec![ChunkHash::ZERO; count])
            } else {
                Arc::new(self.load(&hash, l, idx, count).await?)
            };
            self.path[slot] = Some((idx, hash, children));
        }
        let (_, hash, children) = self.path[(level - 1) as usize]
            .as_ref()
            .ok_or_else(|| StoreError::Invalid("tree path is empty".into()))?;
        Ok((*hash, children.clone()))
    }

    /// The hash of node `(level, index)` if it is on the cached path.
    pub fn cached_hash(&self, level: u32, index: u64) -> Option<ChunkHash> {
        match self.path.get(level.checked_sub(1)? as usize)? {
            Some((i, h, _)) if *i == index => Some(*h),
            _ => None,
        }
    }

    /// The chunk hashes of the blocks under level-1 node `group`.
    pub async fn group(&mut self, group: u64) -> Result<Children> {
        Ok(self.node(1, group).await?.1)
    }

    async fn load(
        &self,
        hash: &ChunkHash,
        level: u32,
        index: u64,
        count: usize,
    ) -> Result<Vec<ChunkHash>> {
        let bytes = self.store.get_node(hash).await.map_err(|e| match e {
            StoreError::Backend { source: object_store::Error::NotFound { .. }, .. } => {
                StoreError::Corrupt(format!(
                    "tree node {} of {} is missing from the store: the point cannot be read; run `boomerang store verify` and restore the store from a copy",
                    Store::node_path(hash),
                    self.where_(level, index)
                ))
            }
            other => other,
        })?;
        decode_node_with(&bytes, hash, level, count, self.store.hasher()).map_err(|e| {
            StoreError::Corrupt(format!(
                "tree node {} of {} is damaged ({e}): run `boomerang store verify` and restore the store from a copy",
                Store::node_path(hash),
                self.where_(level, index)
            ))
        })
    }

    fn where_(&self, level: u32, index: u64) -> String {
        let offset = index * self.tree.shape.span(level) * self.tree.shape.block_size;
        place(&self.tree.disk, self.tree.point, offset)
    }
}

/// A node produced by [`TreeBuilder`], to be stored unless it is zero or unchanged.
#[derive(Debug)]
pub struct NewNode {
    pub level: u32,
    pub index: u64,
    pub hash: ChunkHash,
    /// `None` for an all-zero node, which is not stored.
    pub bytes: Option<Bytes>,
}

/// Builds a tree bottom-up from block hashes pushed in order; memory is `depth * F` hashes.
pub struct TreeBuilder {
    shape: Shape,
    pending: Vec<Vec<ChunkHash>>,
    emitted: Vec<u64>,
    root: Option<ChunkHash>,
    pushed: u64,
    hasher: crate::seal::Hasher,
}

impl TreeBuilder {
    pub fn new(shape: Shape) -> Self {
        Self::with_hasher(shape, crate::seal::Hasher::Plain)
    }

    /// A builder for a store that names content with `hasher`.
    pub fn with_hasher(shape: Shape, hasher: crate::seal::Hasher) -> Self {
        let depth = shape.depth as usize;
        TreeBuilder {
            shape,
            pending: vec![Vec::new(); depth],
            emitted: vec![0; depth + 1],
            root: None,
            pushed: 0,
            hasher,
        }
    }

    /// Adds the next block's hash; returns the nodes completed by it.
    pub fn push(&mut self, leaf: ChunkHash, out: &mut Vec<NewNode>) {
        debug_assert!(self.pushed < self.shape.leaves);
        self.pushed += 1;
        self.pending[0].push(leaf);
        let mut level = 0;
        while level < self.shape.depth as usize && self.pending[level].len() as u64 == FANOUT {
            self.emit(level, out);
            level += 1;
        }
    }

    /// Completes the tree and returns its root.
    pub fn finish(mut self, out: &mut Vec<NewNode>) -> Result<ChunkHash> {
        if self.pushed != self.shape.leaves {
            return Err(StoreError::Invalid(format!(
                "tree builder got {} blocks where the disk has {}",
                self.pushed, self.shape.leaves
            )));
        }
        for level in 0..self.shape.depth as usize {
            if !self.pending[level].is_empty() {
                self.emit(level, out);
            }
        }
        Ok(self.root.unwrap_or(ChunkHash::ZERO))
    }

    /// Turns the pending children at `level` into a node of `level + 1`.
    fn emit(&mut self, level: usize, out: &mut Vec<NewNode>) {
        let children = std::mem::take(&mut self.pending[level]);
        let node_level = level as u32 + 1;
        let index = self.emitted[node_level as usize];
        self.emitted[node_level as usize] += 1;
        let (hash, bytes) = if children.iter().all(ChunkHash::is_zero) {
            (ChunkHash::ZERO, None)
        } else {
            let bytes = encode_node(node_level, &children);
            (self.hasher.hash(&bytes), Some(Bytes::from(bytes)))
        };
        out.push(NewNode {
            level: node_level,
            index,
            hash,
            bytes,
        });
        if node_level == self.shape.depth {
            self.root = Some(hash);
        } else {
            self.pending[level + 1].push(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(leaves: &[ChunkHash], block: u64) -> (ChunkHash, Vec<NewNode>) {
        let shape = Shape::new(leaves.len() as u64 * block, block);
        let mut b = TreeBuilder::new(shape);
        let mut out = Vec::new();
        for l in leaves {
            b.push(*l, &mut out);
        }
        let root = b.finish(&mut out).unwrap();
        (root, out)
    }

    #[test]
    fn shapes() {
        assert_eq!(Shape::new(0, 4096).depth, 1);
        assert_eq!(Shape::new(256 * 4096, 4096).depth, 1);
        assert_eq!(Shape::new(256 * 4096 + 1, 4096).depth, 2);
        assert_eq!(Shape::new(256 * 4096 + 1, 4096).leaves, 257);
        let s = Shape::new(300 * 65536, 65536);
        assert_eq!(s.children(2, 0), 2);
        assert_eq!(s.children(1, 1), 44);
        assert_eq!(s.block_len(299), 65536);
        let t = Shape::new(1000, 512);
        assert_eq!(t.block_len(1), 488);
    }

    #[test]
    fn builder_makes_one_root_per_level_count() {
        let h = |i: u8| ChunkHash([i; 32]);
        for n in [1usize, 2, 255, 256, 257, 512, 513, 65536 + 3] {
            let leaves: Vec<_> = (0..n).map(|i| h((i % 250) as u8 + 1)).collect();
            let (root, nodes) = build(&leaves, 4096);
            let shape = Shape::new(n as u64 * 4096, 4096);
            let top: Vec<_> = nodes.iter().filter(|x| x.level == shape.depth).collect();
            assert_eq!(top.len(), 1, "n={n}");
            assert_eq!(top[0].hash, root);
            for node in &nodes {
                let bytes = node.bytes.as_ref().unwrap();
                let count = shape.children(node.level, node.index);
                let kids = decode_node(bytes, &node.hash, node.level, count).unwrap();
                assert_eq!(kids.len(), count);
            }
        }
    }

    #[test]
    fn zero_subtrees_are_not_stored() {
        let mut leaves = vec![ChunkHash::ZERO; 600];
        leaves[599] = ChunkHash([7; 32]);
        let (root, nodes) = build(&leaves, 4096);
        assert!(!root.is_zero());
        assert_eq!(nodes.iter().filter(|n| n.bytes.is_some()).count(), 2);
        let (root, _) = build(&[ChunkHash::ZERO; 600], 4096);
        assert!(root.is_zero());
    }

    #[test]
    fn a_changed_leaf_changes_only_its_path() {
        let mut leaves: Vec<_> = (0..70_000u32)
            .map(|i| ChunkHash([(i % 200) as u8 + 1; 32]))
            .collect();
        let (root1, nodes1) = build(&leaves, 4096);
        leaves[1234] = ChunkHash([255; 32]);
        let (root2, nodes2) = build(&leaves, 4096);
        assert_ne!(root1, root2);
        let changed = nodes1
            .iter()
            .zip(&nodes2)
            .filter(|(a, b)| a.hash != b.hash)
            .count();
        assert_eq!(changed, Shape::new(70_000 * 4096, 4096).depth as usize);
    }

    #[test]
    fn damaged_nodes_are_refused() {
        let kids = vec![ChunkHash([1; 32]), ChunkHash([2; 32])];
        let bytes = encode_node(1, &kids);
        let h = crate::chunk::hash(&bytes);
        assert_eq!(decode_node(&bytes, &h, 1, 2).unwrap(), kids);
        assert_eq!(
            decode_node(&bytes, &h, 2, 2),
            Err(NodeError::Level {
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            decode_node(&bytes, &h, 1, 3),
            Err(NodeError::Count {
                expected: 3,
                found: 2
            })
        );
        let mut bad = bytes.clone();
        bad[9] ^= 1;
        assert_eq!(decode_node(&bad, &h, 1, 2), Err(NodeError::Hash));
    }
}
