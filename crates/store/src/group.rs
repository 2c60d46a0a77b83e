//! Stores in a group: the replica stores under one root share one chunk namespace
//! (`ROOT/.shared`), so that blocks several of them hold alike are stored once
//! (docs/formats.md, "Stores in a group").
//!
//! Each store of the group has a member record, `members/<path>.member`, whose state says
//! what a collection may assume of it: `joining` (its config may not be written yet),
//! `active` (it must be read, or nothing is collected), `leaving` (its deletion runs). A
//! collection passes over a joining or leaving store only when its config is gone; an active
//! store it cannot read stops it before it deletes anything.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Location};
use crate::error::{Result, StoreError};
use crate::gc::GcReport;
use crate::{CONFIG_PATH, DataKey, GROUP_DIR, GroupConfig, NoProgress, Store, StoreConfig};

/// Where a store of the group stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MemberState {
    Joining,
    Active,
    Leaving,
}

/// A member record's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct MemberRecord {
    /// The store's path under the group's root.
    pub path: String,
    pub state: MemberState,
}

/// The group's settings, written once by its first store (`group.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct GroupSettings {
    /// The id of the key every store of the group is sealed under; none: all in the clear.
    sealed_key_id: Option<String>,
}

/// Checks that `path` names a store under a group's root: plain names (letters, digits,
/// `-`, `_`, `.`, not starting with a dot), separated by `/`. Returns how many.
fn member_levels(path: &str) -> Result<u32> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let plain = |p: &str| {
        !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if parts.is_empty() || !parts.iter().all(|p| plain(p)) {
        return Err(StoreError::Invalid(format!(
            "{path:?} is not a path for a store in a group: use plain names under the group's root, such as web01/lineage-0"
        )));
    }
    Ok(parts.len() as u32)
}

fn record_path(path: &str) -> Path {
    Path::from(format!("members/{path}.member"))
}

async fn write_record(shared: &Backend, path: &str, state: MemberState) -> Result<()> {
    let body = serde_json::to_vec(&MemberRecord {
        path: path.to_string(),
        state,
    })
    .expect("record serializes");
    shared
        .durable
        .put(&record_path(path), PutPayload::from(body))
        .await
        .map(|_| ())
        .map_err(|e| {
            StoreError::backend(
                format!(
                    "could not record store {path} in its group at {}",
                    shared.display()
                ),
                e,
            )
        })
}

/// Every member record of the group whose shared namespace is `shared`.
pub(crate) async fn members(shared: &Backend) -> Result<Vec<MemberRecord>> {
    let listed: Vec<_> = shared
        .durable
        .list(Some(&Path::from("members")))
        .try_collect()
        .await
        .map_err(|e| StoreError::backend("could not list the stores of the group", e))?;
    let mut out = Vec::new();
    for meta in listed {
        let bytes = match shared.durable.get(&meta.location).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match bytes {
            Ok(b) => b,
            // Deleted since the listing: its store is gone.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not read the group's record {}", meta.location),
                    e,
                ));
            }
        };
        let record: MemberRecord = serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::Corrupt(format!(
                "the group's record {} does not parse ({e}): nothing is collected until it is mended",
                meta.location
            ))
        })?;
        member_levels(&record.path)?;
        out.push(record);
    }
    Ok(out)
}

/// Checks that a store sealed under `key` (or in the clear) may join the group: every store
/// of a group is sealed under one key, or none is, since they name and seal chunks alike.
async fn check_key(shared: &Backend, key: Option<&DataKey>) -> Result<()> {
    let mine = GroupSettings {
        sealed_key_id: key.map(DataKey::id),
    };
    let path = Path::from("group.json");
    let body = serde_json::to_vec(&mine).expect("settings serialize");
    match shared
        .durable
        .put_opts(
            &path,
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await
    {
        Ok(_) => return Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => {
            return Err(StoreError::backend(
                format!(
                    "could not write the settings of the group at {}",
                    shared.display()
                ),
                e,
            ));
        }
    }
    let held = match shared.durable.get(&path).await {
        Ok(r) => r.bytes().await,
        Err(e) => Err(e),
    }
    .map_err(|e| {
        StoreError::backend(
            format!(
                "could not read the settings of the group at {}",
                shared.display()
            ),
            e,
        )
    })?;
    let held: GroupSettings = serde_json::from_slice(&held).map_err(|e| {
        StoreError::Corrupt(format!(
            "the settings of the group at {} do not parse ({e}): restore group.json",
            shared.display()
        ))
    })?;
    if held != mine {
        let say = |s: &GroupSettings| {
            s.sealed_key_id
                .as_ref()
                .map_or("in the clear".to_string(), |k| {
                    format!("sealed under key {k}")
                })
        };
        return Err(StoreError::Invalid(format!(
            "the stores of the group at {} are {}, and this one would be {}: every store under one root uses the same key file, or none",
            shared.display(),
            say(&held),
            say(&mine)
        )));
    }
    Ok(())
}

impl Store {
    /// Creates a store at `path` under the group root `root` (a directory or
    /// `azure://container/prefix`), sealed under `key` if one is given: its chunks go to the
    /// group's shared namespace (`root/.shared`), where blocks that stores of the group hold
    /// alike (machines cloned from one template) are stored once. Every store of a group is
    /// sealed under the same key, or none is.
    pub async fn init_in_group(
        root: &str,
        path: &str,
        block_size: u64,
        key: Option<&DataKey>,
    ) -> Result<Store> {
        crate::check_block_size(block_size)?;
        let up = member_levels(path)?;
        let root = Location::parse(root)?;
        let location = root.join(path)?;
        let path = location.tail(up as usize);
        let shared = root.join(GROUP_DIR)?.open(true).await?;
        check_key(&shared, key).await?;
        let backend = location.open(true).await?;
        match backend.durable.head(&Path::from(CONFIG_PATH)).await {
            Ok(_) => {
                return Err(StoreError::AlreadyExists {
                    location: location.to_string(),
                });
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not look at {location}"),
                    e,
                ));
            }
        }
        // The record first: a collection that sees the store's chunks sees its points.
        write_record(&shared, &path, MemberState::Joining).await?;
        let store =
            Self::init_configured(backend, block_size, key, Some(GroupConfig { up })).await?;
        write_record(&shared, &path, MemberState::Active).await?;
        Ok(Store {
            backend: store.backend.clone().with_shared(shared),
            ..store
        })
    }

    /// Deletes the store at `path` under the group root `root`: its record says it is
    /// leaving, then its points, config and nodes go, then its record. Its chunks stay for
    /// the other stores of the group until a collection ([`Store::collect_group`]). Safe to
    /// run again after a deletion cut short. Returns the objects deleted.
    pub async fn destroy_in_group(root: &str, path: &str) -> Result<u64> {
        let up = member_levels(path)?;
        let root = Location::parse(root)?;
        let location = root.join(path)?;
        let path = location.tail(up as usize);
        let shared = root.join(GROUP_DIR)?.open(false).await?;
        let known = match shared.durable.head(&record_path(&path)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not look at the record of {location} in its group"),
                    e,
                ));
            }
        };
        if known {
            write_record(&shared, &path, MemberState::Leaving).await?;
        }
        let mut deleted = match location.open(false).await {
            Ok(backend) => crate::delete_own_objects(&backend, true).await?,
            Err(StoreError::Missing { .. }) => 0,
            Err(e) => return Err(e),
        };
        match shared.durable.delete(&record_path(&path)).await {
            Ok(()) => deleted += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(StoreError::backend(
                    format!("could not delete the record of {location} in its group"),
                    e,
                ));
            }
        }
        Ok(deleted)
    }

    /// Collects the group at `root`: deletes the chunks no store of the group names (those
    /// of stores deleted since, and of points pruned), under the group's lease.
    pub async fn collect_group(root: &str, key: Option<&DataKey>) -> Result<GcReport> {
        let root = Location::parse(root)?;
        let at = root.join(GROUP_DIR)?;
        let shared = at.open(false).await?;
        // The shared namespace as a store of the group with no points and no nodes of its
        // own: its collection keeps what every store of the group names.
        let config = StoreConfig {
            format: "boomerang-store".into(),
            version: 3,
            block_size: crate::DEFAULT_BLOCK_SIZE,
            fanout: crate::tree::FANOUT,
            created_unix_ms: 0,
            sealed: None,
            group: Some(GroupConfig { up: 1 }),
            features: Vec::new(),
        };
        let handle = Store {
            backend: shared.clone().with_shared(shared),
            config: std::sync::Arc::new(config),
            sealer: key.map(|k| std::sync::Arc::new(crate::seal::Sealer::new(k))),
            key: key.cloned(),
            packs: Default::default(),
        };
        handle.gc(&NoProgress).await
    }

    /// The other stores of this store's group (none for a store in no group), opened with
    /// its key, to mark what they name.
    pub(crate) async fn group_members(&self) -> Result<Vec<Store>> {
        let Some((root, own)) = self.group_place()? else {
            return Ok(Vec::new());
        };
        let Some(shared) = self.backend().shared() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for record in members(shared).await? {
            if record.path == own {
                continue;
            }
            let location = root.join(&record.path)?;
            let opened = match location.open(false).await {
                Ok(backend) => Store::open_sealed_on(backend, self.data_key()).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(store) => out.push(store),
                // Not there yet, or not any more: it names nothing.
                Err(StoreError::Missing { .. }) if record.state != MemberState::Active => {}
                Err(e) => {
                    return Err(StoreError::Invalid(format!(
                        "the store {location} of this store's group could not be read ({e}): nothing is collected, since its points may name chunks of the group"
                    )));
                }
            }
        }
        Ok(out)
    }
}
