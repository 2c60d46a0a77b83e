//! Recovery point manifests: what a point is, written last and checked on every read.
//!
//! A manifest is `points/<disk>/<id as 20 digits>.point`:
//! ```text
//! boomerang-point 1 <BLAKE3 of the body, 64 hex>\n
//! <body: one JSON object, see PointManifest>
//! ```
//! Manifests are created with a conditional put, so two commits can never both claim a point id.

use boomerang_core::{ChunkHash, DiskName, PointId, Seq};
use serde::{Deserialize, Serialize};

use crate::tree::{Shape, TreeRef};

const HEADER: &str = "boomerang-point 1 ";

/// The consistency a point promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkKind {
    /// A power cut at that instant.
    Crash,
    /// Taken between the application's freeze and thaw hooks.
    App,
    /// Shared by every machine of a replication group.
    Group,
}

impl std::str::FromStr for MarkKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "crash" => Ok(MarkKind::Crash),
            "app" => Ok(MarkKind::App),
            "group" => Ok(MarkKind::Group),
            _ => Err(format!("{s:?} is not a mark kind: use crash, app or group")),
        }
    }
}

impl std::fmt::Display for MarkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MarkKind::Crash => "crash",
            MarkKind::App => "app",
            MarkKind::Group => "group",
        })
    }
}

/// What one commit cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStats {
    /// Bytes of the image read and hashed.
    pub bytes_read: u64,
    /// Blocks whose content differs from the previous point.
    pub blocks_changed: u64,
    /// Uncompressed bytes of those blocks.
    pub bytes_changed: u64,
    /// Bytes of new objects written (compressed chunks and tree nodes).
    pub bytes_stored: u64,
    /// Of which tree nodes.
    pub node_bytes_stored: u64,
}

/// One recovery point of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointManifest {
    pub disk: DiskName,
    pub id: PointId,
    /// The point this one was committed against, if any.
    pub parent: Option<PointId>,
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    pub mark: MarkKind,
    /// The write-log position this point stands for, when it came from a log.
    pub seq: Option<Seq>,
    pub size: u64,
    pub block_size: u64,
    pub depth: u32,
    pub root: ChunkHash,
    pub stats: CommitStats,
}

impl PointManifest {
    pub fn shape(&self) -> Shape {
        Shape::new(self.size, self.block_size)
    }

    pub fn tree(&self) -> TreeRef {
        TreeRef {
            disk: self.disk.clone(),
            point: self.id,
            shape: self.shape(),
            root: self.root,
        }
    }

    /// The manifest's object path.
    pub fn path(disk: &DiskName, id: PointId) -> String {
        format!("points/{disk}/{:020}.point", id.0)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(None)
    }

    /// The manifest, its checksum keyed by `tag` (a sealed store's manifest key) over its
    /// path and body when given: then only the key's holder makes a manifest that reads.
    pub fn encode_with(&self, tag: Option<&[u8; 32]>) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("manifests always serialize");
        let path = Self::path(&self.disk, self.id);
        let sum = checksum(tag, &path, &body);
        let mut out = format!("{HEADER}{sum}\n").into_bytes();
        out.extend_from_slice(&body);
        out.push(b'\n');
        out
    }

    /// Parses and checks a manifest read from `path`.
    pub fn decode(bytes: &[u8], path: &str) -> Result<Self, String> {
        Self::decode_with(bytes, path, None)
    }

    /// [`PointManifest::decode`], for a store whose manifests are keyed by `tag`; the
    /// manifest must also be the one its path names.
    pub fn decode_with(bytes: &[u8], path: &str, tag: Option<&[u8; 32]>) -> Result<Self, String> {
        let fix = "restore the file from a copy, or remove it to drop the point";
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("point manifest {path} is truncated (no header line): {fix}"))?;
        let header = std::str::from_utf8(&bytes[..newline])
            .ok()
            .and_then(|h| h.strip_prefix(HEADER))
            .ok_or_else(|| format!("point manifest {path} has no valid header: {fix}"))?;
        let mut body = &bytes[newline + 1..];
        if body.last() == Some(&b'\n') {
            body = &body[..body.len() - 1];
        }
        let m: PointManifest = match tag {
            None => {
                if blake3::hash(body).to_hex().as_str() != header {
                    return Err(format!(
                        "point manifest {path} is corrupt or truncated (checksum mismatch): {fix}"
                    ));
                }
                serde_json::from_slice(body)
                    .map_err(|e| format!("point manifest {path} does not parse ({e}): {fix}"))?
            }
            Some(_) => {
                // Keyed over the path the manifest says it is at: a manifest altered, made
                // without the key, or moved to another point's place does not read.
                let m: PointManifest = serde_json::from_slice(body)
                    .map_err(|e| format!("point manifest {path} does not parse ({e}): {fix}"))?;
                let own = Self::path(&m.disk, m.id);
                if own != path || checksum(tag, &own, body) != header {
                    return Err(format!(
                        "point manifest {path} of this sealed store was altered, or made without its key, or is another point's: {fix}"
                    ));
                }
                m
            }
        };
        if !m.block_size.is_power_of_two() || m.shape().depth != m.depth {
            return Err(format!(
                "point manifest {path} describes an impossible tree: {fix}"
            ));
        }
        Ok(m)
    }
}

/// A manifest's checksum: BLAKE3 of its body, or keyed by `tag` over its path and body.
fn checksum(tag: Option<&[u8; 32]>, path: &str, body: &[u8]) -> String {
    match tag {
        None => blake3::hash(body).to_hex().to_string(),
        Some(key) => {
            let mut h = blake3::Hasher::new_keyed(key);
            h.update(path.as_bytes());
            h.update(&[0]);
            h.update(body);
            h.finalize().to_hex().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PointManifest {
        PointManifest {
            disk: DiskName::new("sda").unwrap(),
            id: PointId(3),
            parent: Some(PointId(2)),
            created_unix_ms: 1_700_000_000_000,
            mark: MarkKind::App,
            seq: Some(Seq(42)),
            size: 1 << 30,
            block_size: 65536,
            depth: 2,
            root: ChunkHash([9; 32]),
            stats: CommitStats::default(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(PointManifest::decode(&bytes, "p").unwrap(), m);
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 3] {
            assert!(
                PointManifest::decode(&bytes[..cut], "p").is_err(),
                "cut {cut}"
            );
        }
        let mut flipped = bytes.clone();
        let n = flipped.len() - 20;
        flipped[n] ^= 0x04;
        let err = PointManifest::decode(&flipped, "points/sda/3.point").unwrap_err();
        assert!(err.contains("points/sda/3.point"), "{err}");
    }

    #[test]
    fn a_keyed_manifest_reads_only_with_its_key_at_its_own_path() {
        let (key, other) = ([5u8; 32], [6u8; 32]);
        let m = sample();
        let path = PointManifest::path(&m.disk, m.id);
        let bytes = m.encode_with(Some(&key));
        assert_eq!(
            PointManifest::decode_with(&bytes, &path, Some(&key)).unwrap(),
            m
        );
        // Another key, none, or another point's place: refused.
        assert!(PointManifest::decode_with(&bytes, &path, Some(&other)).is_err());
        assert!(PointManifest::decode(&bytes, &path).is_err());
        let elsewhere = PointManifest::path(&m.disk, PointId(4));
        assert!(PointManifest::decode_with(&bytes, &elsewhere, Some(&key)).is_err());
        // A manifest made without the key (a plain checksum) does not read in a sealed store.
        let forged = m.encode();
        assert!(PointManifest::decode_with(&forged, &path, Some(&key)).is_err());
    }
}
