//! Retention: drop points by age or count. The newest point of every disk is always kept.
//! Cost is one listing plus one delete per dropped point; space comes back at the next GC.

use std::collections::BTreeMap;
use std::time::Duration;

use boomerang_core::{DiskName, PointId};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::{Store, now_ms};

/// What to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Points younger than this.
    Within(Duration),
    /// The newest N points of each disk.
    Last(u64),
}

impl std::str::FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a retention: use a count such as 24 or an age such as 24h, 90m, 7d"
            )
        };
        let s = s.trim();
        if let Ok(n) = s.parse::<u64>() {
            return if n == 0 {
                Err(bad())
            } else {
                Ok(Keep::Last(n))
            };
        }
        let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            _ => return Err(bad()),
        };
        Ok(Keep::Within(Duration::from_secs(secs)))
    }
}

/// What a prune removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub removed: Vec<(DiskName, PointId)>,
    pub kept: u64,
}

impl Store {
    /// Removes the point manifests that `keep` does not cover.
    pub async fn prune(&self, keep: Keep) -> Result<PruneReport> {
        let points = self.points(None).await?;
        let mut by_disk: BTreeMap<DiskName, Vec<_>> = BTreeMap::new();
        for p in points {
            by_disk.entry(p.disk.clone()).or_default().push(p);
        }
        let now = now_ms();
        let mut report = PruneReport::default();
        for (disk, mut points) in by_disk {
            points.sort_by_key(|p| p.id);
            let n = points.len();
            for (i, p) in points.iter().enumerate() {
                let newest = i + 1 == n;
                let keep_it = newest
                    || match keep {
                        Keep::Last(k) => (n - i) as u64 <= k,
                        Keep::Within(age) => {
                            now.saturating_sub(p.created_unix_ms) <= age.as_millis() as u64
                        }
                    };
                if keep_it {
                    report.kept += 1;
                    continue;
                }
                let path = crate::point::PointManifest::path(&disk, p.id);
                self.backend()
                    .durable
                    .delete(&Path::from(path.as_str()))
                    .await
                    .map_err(|e| {
                        StoreError::backend(format!("could not remove point manifest {path}"), e)
                    })?;
                report.removed.push((disk.clone(), p.id));
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_ages() {
        assert_eq!("24".parse::<Keep>(), Ok(Keep::Last(24)));
        assert_eq!(
            "24h".parse::<Keep>(),
            Ok(Keep::Within(Duration::from_secs(86400)))
        );
        assert_eq!(
            "7d".parse::<Keep>(),
            Ok(Keep::Within(Duration::from_secs(7 * 86400)))
        );
        assert!("0".parse::<Keep>().is_err());
        assert!("h".parse::<Keep>().is_err());
        assert!("3w".parse::<Keep>().is_err());
    }
}
