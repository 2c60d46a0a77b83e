//! The server's state directory: `server.toml`, the database, the CA (`ca.crt`, `ca.key`) and
//! the server's HTTPS certificate (`issued/server/`), all made by [`init`].

use std::path::{Path, PathBuf};

use boomerang_wire::pki::{self, CertRole};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::db::{Db, DbError};

/// `server.toml`. Paths are relative to the file's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the API listens (HTTPS).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The SQLite database.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// The server's certificate directory (`cert.pem`, `key.pem`, `ca.crt`).
    #[serde(default = "default_tls")]
    pub tls: PathBuf,
    /// Inventory TOML files (`docs` of `inventory.rs`), loaded at start and on refresh.
    #[serde(default)]
    pub inventory: Vec<PathBuf>,
    /// A component that sent no heartbeat for this long is unhealthy (and alerted on).
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_seconds: u64,
    /// Backups of the server's state into a store at the other site (`server restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::BackupConfig>,
    /// The state directory (server.toml's own), which is also the CA's.
    #[serde(skip)]
    pub dir: PathBuf,
}

fn default_heartbeat_timeout() -> u64 {
    90
}

fn default_listen() -> String {
    "0.0.0.0:443".into()
}

fn default_database() -> PathBuf {
    "boomerang.db".into()
}

fn default_tls() -> PathBuf {
    "issued/server".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{} already holds a configuration server (server.toml): use it with `boomerang server --config {}`, or choose an empty directory",
        dir.display(), dir.join("server.toml").display()
    )]
    Exists { dir: PathBuf },
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid server configuration: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What [`init`] made.
#[derive(Debug, Serialize)]
pub struct Init {
    pub config: PathBuf,
    pub ca: PathBuf,
    /// The first admin token: shown once, stored only as a hash.
    pub admin_token: String,
}

/// Creates a configuration server's state in `dir`: the CA, the server's certificate for
/// `localhost` and `127.0.0.1`, the database and an admin token.
pub fn init(dir: &Path) -> Result<Init, ConfigError> {
    let path = dir.join("server.toml");
    if path.exists() {
        return Err(ConfigError::Exists {
            dir: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| ConfigError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = pki::init_ca(dir)?;
    pki::issue(
        dir,
        "server",
        CertRole::Server,
        &["localhost".into(), "127.0.0.1".into()],
        825,
    )?;
    let config = ServerConfig {
        listen: default_listen(),
        database: default_database(),
        tls: default_tls(),
        inventory: Vec::new(),
        heartbeat_timeout_seconds: default_heartbeat_timeout(),
        backup: None,
        dir: dir.to_path_buf(),
    };
    let db = Db::open(&dir.join(&config.database))?;
    let admin_token = db.create_token("admin", Role::Admin)?.token;
    let text = toml::to_string_pretty(&config).map_err(|e| ConfigError::Invalid {
        path: path.clone(),
        why: e.to_string(),
    })?;
    // Written last: a directory with server.toml is a whole server.
    std::fs::write(&path, text).map_err(|source| ConfigError::Io {
        action: "write",
        path: path.clone(),
        source,
    })?;
    Ok(Init {
        config: path,
        ca,
        admin_token,
    })
}

impl ServerConfig {
    /// Reads `server.toml`; relative paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.database = base.join(&config.database);
        config.tls = base.join(&config.tls);
        config.inventory = config.inventory.iter().map(|p| base.join(p)).collect();
        if let Some(backup) = &mut config.backup {
            backup.key_file = backup.key_file.as_ref().map(|k| base.join(k));
            // A directory, relative to the state directory as the other paths are.
            if !backup.location.contains("://") && !backup.location.starts_with('/') {
                backup.location = base.join(&backup.location).display().to_string();
            }
        }
        config.dir = base.to_path_buf();
        if !(1..=86400).contains(&config.heartbeat_timeout_seconds) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                why: format!(
                    "heartbeat_timeout_seconds is {}: use 1 to 86400",
                    config.heartbeat_timeout_seconds
                ),
            });
        }
        Ok(config)
    }
}
