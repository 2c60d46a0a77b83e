//! Configuration-server recovery (DESIGN 4): the server backs its state up into a store at
//! the other site on a schedule, and `boomerang server restore` rebuilds a working server
//! from the newest backup there.
//!
//! A backup is one object, `server-backups/<unix ms, 20 digits>.backup`, sealed (seal.rs of
//! the store) when a key file is given, which it should be: it holds the CA's key.
//!
//! ```text
//! magic "BMSB" | version u8 = 1 | 3 reserved (0) | file count u32
//! per file: path length u16 | path (UTF-8, relative to the state directory) | length u64 | bytes
//! ```
//! The files: `server.toml`, the database (a consistent copy, `VACUUM INTO`), the CA
//! (`ca.crt`, `ca.key`), the server's certificate directory, and the inventory files that sit
//! in the state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use boomerang_store::{DataKey, seal::Sealer};
use futures::StreamExt as _;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use crate::db::Db;

const MAGIC: &[u8; 4] = b"BMSB";
const VERSION: u8 = 1;
/// Where backups go in the store location.
const PREFIX: &str = "server-backups";

/// `[backup]` in server.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// A store location at the other site: `azure://container/prefix` or a directory.
    pub location: String,
    /// Seals the backups under this key (`boomerang store keygen FILE`); relative to the
    /// state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Seconds between backups.
    #[serde(default = "default_every")]
    pub every_seconds: u64,
    /// How many backups are kept (the newest).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_every() -> u64 {
    3600
}

fn default_keep() -> usize {
    24
}

/// What a running server backs up, and where.
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: BackupConfig,
    /// The state directory, and the files of it to back up (absolute).
    pub dir: PathBuf,
    pub database: PathBuf,
    pub files: Vec<PathBuf>,
}

impl Plan {
    /// What can be wrong before the first backup: the key file, the location, a file it
    /// takes outside the state directory (a restore could not put it back where server.toml
    /// says), and a backup in the clear to another site's object store.
    pub fn check(&self) -> Result<(), String> {
        let location =
            boomerang_store::Location::parse(&self.config.location).map_err(|e| e.to_string())?;
        match &self.config.key_file {
            Some(key) => {
                DataKey::read(key).map_err(|e| e.to_string())?;
            }
            None if matches!(location, boomerang_store::Location::Azure { .. }) => {
                return Err(format!(
                    "backups to {} would hold the CA's key in the clear: give key_file (boomerang store keygen FILE)",
                    self.config.location
                ));
            }
            None => {}
        }
        for path in std::iter::once(&self.database).chain(&self.files) {
            if !path.starts_with(&self.dir) {
                return Err(format!(
                    "{} is outside the state directory {}, so a restore could not put it back: keep the database, certificate and inventory files in the state directory",
                    path.display(),
                    self.dir.display()
                ));
            }
        }
        Ok(())
    }
}

/// Opens the store location `location` as an object store (made, with `create`).
async fn objects(location: &str, create: bool) -> Result<Arc<dyn ObjectStore>, String> {
    let backend = boomerang_store::Location::parse(location)
        .map_err(|e| e.to_string())?
        .open(create)
        .await
        .map_err(|e| e.to_string())?;
    Ok(backend.durable.clone())
}

/// Whether `object` is a backup's name: `server-backups/<20 digits>.backup`.
fn is_backup(object: &ObjPath) -> bool {
    let name = object.as_ref();
    name.strip_prefix(&format!("{PREFIX}/"))
        .and_then(|n| n.strip_suffix(".backup"))
        .is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The backups at `store`, oldest first.
async fn list(store: &Arc<dyn ObjectStore>, location: &str) -> Result<Vec<ObjPath>, String> {
    let mut stream = store.list(Some(&ObjPath::from(PREFIX)));
    let mut out = Vec::new();
    while let Some(meta) = stream.next().await {
        match meta {
            Ok(m) if is_backup(&m.location) => out.push(m.location),
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(format!("could not list the backups at {location}: {e}")),
        }
    }
    out.sort();
    Ok(out)
}

fn encode(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (name, bytes) in files {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The files of a backup, refusing anything malformed (and any path that leaves the state
/// directory).
pub fn decode(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let bad = |why: &str| format!("the backup is damaged: {why}");
    if bytes.len() < 12 || &bytes[..4] != MAGIC || bytes[5..8] != [0, 0, 0] {
        return Err(bad("its header is not a server backup's"));
    }
    if bytes[4] != VERSION {
        return Err(format!(
            "the backup has format version {}, which this Boomerang does not read: upgrade it",
            bytes[4]
        ));
    }
    let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let mut at: usize = 12;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| bad("it ends early"))?;
        let s = &bytes[at..end];
        at = end;
        Ok(s)
    };
    let mut files = Vec::new();
    for _ in 0..count.min(10_000) {
        let len = take(2)?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        let name = std::str::from_utf8(take(len)?)
            .map_err(|_| bad("a file name is not UTF-8"))?
            .to_string();
        let path = Path::new(&name);
        if name.is_empty()
            || path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad("a file name leaves the state directory"));
        }
        let size = take(8)?;
        let size = u64::from_le_bytes(size.try_into().map_err(|_| bad("a length is cut"))?);
        let size = usize::try_from(size).map_err(|_| bad("a file is too large"))?;
        files.push((name, take(size)?.to_vec()));
    }
    if files.len() != count || at != bytes.len() {
        return Err(bad("its length does not match its files"));
    }
    Ok(files)
}

/// The object name of backup `object` as sealed: its name in the store.
fn seal_name(object: &ObjPath) -> String {
    object.to_string()
}

/// Makes one backup of `plan` from `db`; returns its object's name.
pub async fn backup_once(plan: &Plan, db: Arc<Db>) -> Result<String, String> {
    // In a directory only the owner reads: the copy holds the tokens' hashes and the rest.
    let scratch = plan.dir.join(".backup");
    {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&scratch);
    }
    let snapshot = scratch.join("db.tmp");
    let _ = std::fs::remove_file(&snapshot);
    {
        let snapshot = snapshot.clone();
        tokio::task::spawn_blocking(move || db.snapshot(&snapshot))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("could not copy the database for a backup: {e}"))?;
    }
    let mut files = Vec::new();
    let relative = |p: &Path| -> Option<String> {
        p.strip_prefix(&plan.dir)
            .ok()
            .map(|r| r.to_string_lossy().to_string())
    };
    let db_name = relative(&plan.database).unwrap_or_else(|| "boomerang.db".into());
    let db_bytes = std::fs::read(&snapshot).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&snapshot);
    files.push((db_name, db_bytes));
    for path in &plan.files {
        if let Some(name) = relative(path) {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("could not read {} for a backup: {e}", path.display()))?;
            files.push((name, bytes));
        }
    }
    let now = boomerang_core::log::UnixNanos::now().0 / 1_000_000;
    let object = ObjPath::from(format!("{PREFIX}/{now:020}.backup"));
    let mut bytes = encode(&files);
    if let Some(key) = &plan.config.key_file {
        let key = DataKey::read(key).map_err(|e| e.to_string())?;
        bytes = Sealer::new(&key)
            .seal(&seal_name(&object), &bytes)
            .map_err(|e| e.to_string())?;
    }
    let store = objects(&plan.config.location, true).await?;
    store
        .put(&object, bytes.into())
        .await
        .map_err(|e| format!("could not write {object} to {}: {e}", plan.config.location))?;
    // Only the newest are kept.
    let all = list(&store, &plan.config.location).await?;
    let drop = all.len().saturating_sub(plan.config.keep.max(1));
    for old in &all[..drop] {
        let _ = store.delete(old).await;
    }
    Ok(object.to_string())
}

/// Backs the server up every `every_seconds`, for the life of the server. A backup that fails
/// is an alert (`server-backup-failed`) until one succeeds.
pub async fn run(plan: Plan, db: Arc<Db>) {
    const ALERT: &str = "server-backup-failed";
    let every = Duration::from_secs(plan.config.every_seconds.max(1));
    // The first soon after the start: a server restarted more often than every interval
    // still gets backups.
    let mut wait = every.min(Duration::from_secs(5));
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let object = format!("backup/{}", plan.config.location);
        match backup_once(&plan, db.clone()).await {
            Ok(name) => {
                tracing::info!(%name, location = %plan.config.location, "backed the server up");
                let _ = db.resolve(ALERT, &object);
            }
            Err(why) => {
                tracing::warn!(error = %why, "could not back the server up; trying again at the next backup");
                let _ = db.raise(
                    ALERT,
                    &object,
                    &format!(
                        "the server could not back itself up to {}: {why}",
                        plan.config.location
                    ),
                );
            }
        }
    }
}

/// Rebuilds a server's state directory `state` from the newest backup at `from` (opened with
/// `key` when sealed); returns the backup's name.
pub async fn restore(from: &str, key: Option<&DataKey>, state: &Path) -> Result<String, String> {
    if std::fs::read_dir(state).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!(
            "{} is not empty{}: restore into a new or empty directory",
            state.display(),
            if state.join("server.toml").exists() {
                " (it holds a configuration server already)"
            } else {
                ""
            }
        ));
    }
    let store = objects(from, false).await?;
    let all = list(&store, from).await?;
    if all.is_empty() {
        return Err(format!(
            "there is no server backup at {from} (nothing under {PREFIX}/): check the location, and that the server's [backup] writes there"
        ));
    }
    // The newest that opens; a damaged one (or one under another key) is passed over, and
    // said so.
    let mut refused = Vec::new();
    let mut chosen = None;
    for object in all.iter().rev() {
        match open_backup(&store, from, object, key).await {
            Ok(files) => {
                chosen = Some((object.clone(), files));
                break;
            }
            Err(why) => refused.push(why),
        }
    }
    let Some((newest, files)) = chosen else {
        return Err(format!(
            "no backup at {from} could be restored: {}",
            refused.join("; ")
        ));
    };
    for why in &refused {
        tracing::warn!(%why, "a newer backup was passed over");
    }
    for (name, bytes) in &files {
        let path = state.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("could not create {}: {e}", parent.display()))?;
        }
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        // Owner-only from the start: keys and the database among them.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
    }
    Ok(newest.to_string())
}

/// The files of backup `object` at `from`, opened with `key`.
async fn open_backup(
    store: &Arc<dyn ObjectStore>,
    from: &str,
    object: &ObjPath,
    key: Option<&DataKey>,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let bytes = store
        .get(object)
        .await
        .map_err(|e| format!("could not read {object} at {from}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("could not read {object} at {from}: {e}"))?;
    // With a key, only a sealed backup is taken: one in the clear may have been put there by
    // anyone who can write to the location, with a CA key of their own.
    let sealed = bytes.starts_with(boomerang_store::seal::MAGIC);
    let bytes = match (key, sealed) {
        (Some(key), true) => Sealer::new(key)
            .open(&seal_name(object), &bytes)
            .map_err(|e| {
                format!("the backup {object} at {from}: {e} (or the key file is another's)")
            })?,
        (Some(_), false) => {
            return Err(format!(
                "the backup {object} at {from} is not sealed, and a key file was given: it is not taken (anyone who can write there could have made it); restore it without --key-file only if you trust it"
            ));
        }
        (None, true) => {
            return Err(format!(
                "the backup {object} at {from} is sealed: give its key file with --key-file"
            ));
        }
        (None, false) => bytes.to_vec(),
    };
    let files = decode(&bytes).map_err(|e| format!("{object} at {from}: {e}"))?;
    if !files.iter().any(|(n, _)| n == "server.toml") {
        return Err(format!(
            "the backup {object} at {from} holds no server.toml"
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_round_trips_and_refuses_damage_and_escapes() {
        let files = vec![
            (
                "server.toml".to_string(),
                b"listen = \"0.0.0.0:443\"\n".to_vec(),
            ),
            ("issued/server/key.pem".to_string(), vec![7; 100]),
        ];
        let bytes = encode(&files);
        assert_eq!(decode(&bytes).unwrap(), files);
        for cut in [0, 5, 12, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let escape = encode(&[("../etc/passwd".to_string(), vec![1])]);
        assert!(
            decode(&escape)
                .unwrap_err()
                .contains("leaves the state directory")
        );
        let absolute = encode(&[("/etc/passwd".to_string(), vec![1])]);
        assert!(decode(&absolute).is_err());
    }
}
