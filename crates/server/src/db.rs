//! The server's database (SQLite): schema migrations by `PRAGMA user_version`, API tokens
//! (stored as BLAKE3 hashes, never in clear) and the audit log. Every change is one
//! transaction: a failure (a locked database, a full disk) leaves nothing half-written.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::auth::Role;

/// The schema, one step per version; a database is brought up to the last on open.
const MIGRATIONS: &[&str] = &[
    // 1: tokens and the audit log.
    "CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL
    );",
    // 2: inventory objects (sites, hosts, datastores, machines), as JSON.
    "CREATE TABLE inventory (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (kind, name)
    );",
    // 3: policies; a failback policy belongs to a replication policy.
    "CREATE TABLE policies (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        rpo_threshold_s INTEGER NOT NULL,
        retention_s INTEGER NOT NULL,
        app_consistent_s INTEGER NOT NULL,
        failback_of INTEGER REFERENCES policies (id) ON DELETE CASCADE
    );",
    // 4: components (enrolment, heartbeats) and alerts.
    "CREATE TABLE components (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        site TEXT NOT NULL,
        hosts TEXT NOT NULL,
        enroll_hash BLOB UNIQUE,
        enroll_expires_ms INTEGER,
        token_hash BLOB UNIQUE,
        enrolled_ms INTEGER,
        last_heartbeat_ms INTEGER,
        last TEXT
    );
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        raised_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        object TEXT NOT NULL,
        message TEXT NOT NULL,
        resolved_ms INTEGER
    );",
    // 5: replication groups.
    "CREATE TABLE groups (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        master_target TEXT,
        machines TEXT NOT NULL
    );",
    // 6: where an inventory object came from (an inventory file, or an agent's report), and
    // which replication policy protects a machine.
    "ALTER TABLE inventory ADD COLUMN source TEXT NOT NULL DEFAULT 'file';
    CREATE TABLE protections (
        machine TEXT PRIMARY KEY,
        policy INTEGER NOT NULL REFERENCES policies (id),
        since_ms INTEGER NOT NULL
    );",
    // 7: jobs, and the commands their steps give components.
    "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        machine TEXT NOT NULL,
        state TEXT NOT NULL,
        step INTEGER NOT NULL,
        message TEXT,
        result TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY,
        job INTEGER NOT NULL REFERENCES jobs (id),
        component TEXT NOT NULL,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL,
        result TEXT,
        created_ms INTEGER NOT NULL,
        done_ms INTEGER
    );
    CREATE INDEX commands_pending ON commands (component, state);",
    // 8: the machine an agent standing by at a recovery site serves once reprotected.
    "ALTER TABLE components ADD COLUMN machine TEXT;",
    // 9: the active alerts, found without reading the resolved ones (every heartbeat raises or
    // resolves some, and resolved alerts are kept).
    "CREATE INDEX alerts_active ON alerts (kind, object) WHERE resolved_ms IS NULL;",
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("could not open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the database {} has schema version {found}, newer than this Boomerang knows ({known}): run a newer Boomerang",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the database failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

/// A token as listed (never its secret).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_unix_ms: i64,
}

/// A token just made: its secret is shown this once.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The bearer token; the server keeps only its hash.
    pub token: String,
}

/// One audit entry.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub time_unix_ms: i64,
    /// The token's name, or `anonymous`.
    pub actor: String,
    /// The request, as `METHOD /path`.
    pub action: String,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
}

pub struct Db {
    conn: Mutex<Connection>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn hash(token: &str) -> Vec<u8> {
    blake3::hash(token.as_bytes()).as_bytes().to_vec()
}

impl Db {
    /// Opens (or creates) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let open = |source| DbError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        for (k, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(open)?;
            tx.execute_batch(step).map_err(open)?;
            tx.pragma_update(None, "user_version", k as i64 + 1)
                .map_err(open)?;
            tx.commit().map_err(open)?;
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a consistent copy of the database to `path` (a new file), while it is in use.
    pub fn snapshot(&self, path: &std::path::Path) -> Result<(), DbError> {
        self.conn().execute(
            "VACUUM INTO ?1",
            rusqlite::params![path.to_string_lossy().to_string()],
        )?;
        Ok(())
    }

    /// Makes a token named `name` with `role`.
    pub fn create_token(&self, name: &str, role: Role) -> Result<CreatedToken, DbError> {
        let token = secret("bmr");
        let conn = self.conn();
        let taken: bool = conn
            .query_row("SELECT 1 FROM tokens WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some();
        if taken {
            return Err(DbError::Conflict(format!(
                "a token named {name:?} exists: choose another name, or delete that token first"
            )));
        }
        conn.execute(
            "INSERT INTO tokens (name, role, hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), hash(&token), now_ms()],
        )?;
        Ok(CreatedToken {
            id: conn.last_insert_rowid(),
            name: name.to_string(),
            role,
            token,
        })
    }

    /// The token whose secret is `token`, if any.
    pub fn find_token(&self, token: &str) -> Result<Option<TokenInfo>, DbError> {
        let conn = self.conn();
        let found = conn
            .query_row(
                "SELECT id, name, role, created_ms FROM tokens WHERE hash = ?1",
                [hash(token)],
                row_token,
            )
            .optional()?;
        Ok(found)
    }

    /// Tokens with an id above `after`, at most `limit`, by id.
    pub fn list_tokens(&self, after: i64, limit: u32) -> Result<Vec<TokenInfo>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, role, created_ms FROM tokens WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], row_token)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes token `id`; the last admin token stays (the server would be unmanageable).
    pub fn delete_token(&self, id: i64) -> Result<TokenInfo, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let token = tx
            .query_row(
                "SELECT id, name, role, created_ms FROM tokens WHERE id = ?1",
                [id],
                row_token,
            )
            .optional()?
            .ok_or_else(|| {
                DbError::NotFound(format!(
                    "there is no token {id}: list them with GET /api/tokens"
                ))
            })?;
        if token.role == Role::Admin {
            let admins: i64 = tx.query_row(
                "SELECT count(*) FROM tokens WHERE role = 'admin'",
                [],
                |r| r.get(0),
            )?;
            if admins <= 1 {
                return Err(DbError::Conflict(format!(
                    "token {id} ({}) is the last admin token: create another admin token before deleting it",
                    token.name
                )));
            }
        }
        tx.execute("DELETE FROM tokens WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(token)
    }

    /// Adds an entry to the audit log.
    pub fn audit(&self, actor: &str, action: &str, outcome: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO audit (time_ms, actor, action, outcome) VALUES (?1, ?2, ?3, ?4)",
            params![now_ms(), actor, action, outcome],
        )?;
        Ok(())
    }

    /// Audit entries with an id above `after`, at most `limit`, oldest first.
    pub fn list_audit(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, time_ms, actor, action, outcome FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                time_unix_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                outcome: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Db {
    /// Makes the file-sourced inventory exactly `inv`, in one transaction: objects keep their
    /// ids across refreshes, and those no file lists any more go. Machines that agents
    /// reported stay, unless a file now lists one of the same name: then the file's wins.
    pub fn replace_inventory(&self, inv: &crate::inventory::Inventory) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let put = |kind: &str, items: Vec<(String, String)>| -> Result<(), DbError> {
            let names: Vec<String> = items.iter().map(|(n, _)| n.clone()).collect();
            // A file's object wins over what an agent reported of the same name.
            for (name, body) in items {
                tx.execute(
                    "INSERT INTO inventory (kind, name, body, source) VALUES (?1, ?2, ?3, 'file')
                     ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, source = 'file'",
                    params![kind, name, body],
                )?;
            }
            let mut stmt =
                tx.prepare("SELECT name FROM inventory WHERE kind = ?1 AND source = 'file'")?;
            let held: Vec<String> = stmt
                .query_map([kind], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for gone in held.iter().filter(|n| !names.contains(n)) {
                tx.execute(
                    "DELETE FROM inventory WHERE kind = ?1 AND name = ?2",
                    params![kind, gone],
                )?;
            }
            Ok(())
        };
        fn json<T: Serialize>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<(String, String)> {
            items
                .iter()
                .map(|i| {
                    (
                        name(i).to_string(),
                        serde_json::to_string(i).unwrap_or_default(),
                    )
                })
                .collect()
        }
        put("site", json(&inv.sites, |s| &s.name))?;
        put("host", json(&inv.hosts, |h| &h.name))?;
        put("datastore", json(&inv.datastores, |d| &d.name))?;
        put("machine", json(&inv.machines, |m| &m.name))?;
        put("master-target", json(&inv.master_targets, |m| &m.name))?;
        put("process-server", json(&inv.process_servers, |p| &p.name))?;
        tx.commit()?;
        Ok(())
    }

    /// Inventory objects of `kind` with an id above `after`, at most `limit`, by id.
    pub fn list_inventory<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, T)>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, body FROM inventory WHERE kind = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![kind, after, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push((id, parse_body(&body)?));
        }
        Ok(out)
    }

    /// Every inventory object of `kind`.
    pub fn all_inventory<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<T>, DbError> {
        Ok(self
            .list_inventory(kind, 0, u32::MAX)?
            .into_iter()
            .map(|(_, object)| object)
            .collect())
    }

    /// The inventory object of `kind` named `name`.
    pub fn get_inventory<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>, DbError> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT body FROM inventory WHERE kind = ?1 AND name = ?2",
                params![kind, name],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse_body(&b)).transpose()
    }
}

use crate::policy::{Policy, PolicyKind, PolicySettings, failback_name};

const POLICY_COLUMNS: &str =
    "p.id, p.name, p.kind, p.rpo_threshold_s, p.retention_s, p.app_consistent_s, o.name";

fn row_policy(r: &rusqlite::Row<'_>) -> rusqlite::Result<Policy> {
    row_policy_at(r, 0)
}

/// A policy from the columns [`POLICY_COLUMNS`] starting at column `at`.
fn row_policy_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Policy> {
    let kind = if r.get::<_, String>(at + 2)? == "failback" {
        PolicyKind::Failback
    } else {
        PolicyKind::Replication
    };
    let failback = kind == PolicyKind::Failback;
    Ok(Policy {
        id: r.get(at)?,
        name: r.get(at + 1)?,
        kind,
        rpo_threshold_seconds: r.get::<_, i64>(at + 3)? as u64,
        retention_seconds: r.get::<_, i64>(at + 4)? as u64,
        app_consistent_seconds: r.get::<_, i64>(at + 5)? as u64,
        failback_of: r.get(at + 6)?,
        bound_to: failback.then(|| "configuration-server".to_string()),
        editable: !failback,
    })
}

impl Db {
    /// Makes replication policy `name` and its failback policy, together.
    pub fn create_policy(
        &self,
        name: &str,
        settings: &PolicySettings,
    ) -> Result<(Policy, Policy), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let fb_name = failback_name(name);
        for n in [name, fb_name.as_str()] {
            let taken = tx
                .query_row("SELECT 1 FROM policies WHERE name = ?1", [n], |_| Ok(()))
                .optional()?
                .is_some();
            if taken {
                return Err(DbError::Conflict(format!(
                    "a policy named {n:?} exists: choose another name"
                )));
            }
        }
        let insert = |n: &str, kind: PolicyKind, s: &PolicySettings, of: Option<i64>| {
            tx.execute(
                "INSERT INTO policies (name, kind, rpo_threshold_s, retention_s, app_consistent_s, failback_of) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![n, kind.as_str(), s.rpo_threshold_seconds as i64, s.retention_seconds as i64, s.app_consistent_seconds as i64, of],
            )
            .map(|_| tx.last_insert_rowid())
        };
        let id = insert(name, PolicyKind::Replication, settings, None)?;
        insert(
            &fb_name,
            PolicyKind::Failback,
            &PolicySettings::failback(),
            Some(id),
        )?;
        tx.commit()?;
        drop(conn);
        let get = |n: &str| {
            self.get_policy(n)?
                .ok_or_else(|| DbError::NotFound(format!("policy {n:?} vanished")))
        };
        Ok((get(name)?, get(&fb_name)?))
    }

    pub fn get_policy(&self, name: &str) -> Result<Option<Policy>, DbError> {
        get_policy_in(&self.conn(), name)
    }

    pub fn list_policies(&self, after: i64, limit: u32) -> Result<Vec<Policy>, DbError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {POLICY_COLUMNS} FROM policies p LEFT JOIN policies o ON p.failback_of = o.id WHERE p.id > ?1 ORDER BY p.id LIMIT ?2"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![after, limit], row_policy)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A replication policy's new settings; a failback policy is refused. One transaction.
    pub fn update_policy(&self, name: &str, settings: &PolicySettings) -> Result<Policy, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let policy = editable_policy(&tx, name)?;
        tx.execute(
            "UPDATE policies SET rpo_threshold_s = ?2, retention_s = ?3, app_consistent_s = ?4 WHERE id = ?1",
            params![policy.id, settings.rpo_threshold_seconds as i64, settings.retention_seconds as i64, settings.app_consistent_seconds as i64],
        )?;
        let updated = get_policy_in(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("policy {name:?} vanished")))?;
        tx.commit()?;
        Ok(updated)
    }

    /// Deletes a replication policy and its failback policy; a failback policy alone is
    /// refused, as is a policy that protects machines. One transaction.
    pub fn delete_policy(&self, name: &str) -> Result<Policy, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let policy = editable_policy(&tx, name)?;
        let mut stmt = tx.prepare(
            "SELECT machine FROM protections WHERE policy IN (?1, (SELECT id FROM policies WHERE failback_of = ?1)) ORDER BY machine",
        )?;
        let users: Vec<String> = stmt
            .query_map([policy.id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        if !users.is_empty() {
            return Err(DbError::Conflict(format!(
                "policy {name:?} protects machine(s) {}: give them another policy first (PUT /api/machines/{{name}}/policy)",
                users.join(", ")
            )));
        }
        tx.execute("DELETE FROM policies WHERE id = ?1", [policy.id])?;
        tx.commit()?;
        Ok(policy)
    }
}

fn get_policy_in(conn: &Connection, name: &str) -> Result<Option<Policy>, DbError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM policies p LEFT JOIN policies o ON p.failback_of = o.id WHERE p.name = ?1"
    );
    Ok(conn.query_row(&sql, [name], row_policy).optional()?)
}

fn editable_policy(conn: &Connection, name: &str) -> Result<Policy, DbError> {
    let policy = get_policy_in(conn, name)?.ok_or_else(|| {
        DbError::NotFound(format!(
            "there is no policy {name:?}: list them with GET /api/policies"
        ))
    })?;
    if policy.kind == PolicyKind::Failback {
        return Err(DbError::Conflict(format!(
            "{name:?} is the failback policy of {:?}: it is created with its replication policy, bound to the configuration server, and cannot be edited or deleted (RPO threshold 15 min, retention 24 h, app-consistent every 60 min); change or delete the replication policy instead",
            policy.failback_of.as_deref().unwrap_or("?")
        )));
    }
    Ok(policy)
}

use crate::components::{Alert, ComponentRole, Heartbeat};

/// A component's row.
#[derive(Clone, Debug)]
pub struct ComponentRow {
    pub id: i64,
    pub name: String,
    pub role: ComponentRole,
    pub site: String,
    pub hosts: Vec<String>,
    pub enrolled_ms: Option<i64>,
    pub last_heartbeat_ms: Option<i64>,
    pub last: Option<Heartbeat>,
    /// The machine it is the agent of, when not the one it is named after.
    pub machine: Option<String>,
}

const COMPONENT_COLUMNS: &str =
    "id, name, role, site, hosts, enrolled_ms, last_heartbeat_ms, last, machine";

fn row_component(r: &rusqlite::Row<'_>) -> rusqlite::Result<ComponentRow> {
    let hosts: String = r.get(4)?;
    let last: Option<String> = r.get(7)?;
    Ok(ComponentRow {
        id: r.get(0)?,
        name: r.get(1)?,
        role: ComponentRole::parse(&r.get::<_, String>(2)?).unwrap_or(ComponentRole::Agent),
        site: r.get(3)?,
        hosts: serde_json::from_str(&hosts).unwrap_or_default(),
        enrolled_ms: r.get(5)?,
        last_heartbeat_ms: r.get(6)?,
        last: last.and_then(|l| serde_json::from_str(&l).ok()),
        machine: r.get(8)?,
    })
}

/// A fresh secret with a prefix: `bmr_...`, `bme_...`.
pub fn secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

impl Db {
    /// Names a component and makes its one-time enrolment token, valid `valid_ms`; naming an
    /// existing one again starts its enrolment over (its old token stops working).
    pub fn create_component(
        &self,
        name: &str,
        role: ComponentRole,
        site: &str,
        hosts: &[String],
        machine: Option<&str>,
        valid_ms: i64,
    ) -> Result<(String, i64), DbError> {
        let token = secret("bme");
        let expires = now_ms() + valid_ms;
        let hosts = serde_json::to_string(hosts).unwrap_or_else(|_| "[]".into());
        self.conn().execute(
            "INSERT INTO components (name, role, site, hosts, enroll_hash, enroll_expires_ms, machine)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, site = excluded.site,
               hosts = excluded.hosts, machine = excluded.machine, enroll_hash = excluded.enroll_hash,
               enroll_expires_ms = excluded.enroll_expires_ms, token_hash = NULL,
               enrolled_ms = NULL, last_heartbeat_ms = NULL, last = NULL",
            params![name, role.as_str(), site, hosts, hash(&token), expires, machine],
        )?;
        Ok((token, expires))
    }

    /// The component an enrolment token names, if the token is good (unused, unexpired).
    pub fn pending_enrollment(&self, token: &str) -> Result<Option<ComponentRow>, DbError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COMPONENT_COLUMNS} FROM components WHERE enroll_hash = ?1 AND enroll_expires_ms >= ?2"
                ),
                params![hash(token), now_ms()],
                row_component,
            )
            .optional()?)
    }

    /// Uses up enrolment token `token` of component `id`, making `component_token` its
    /// bearer token; false when the token was used or expired meanwhile.
    pub fn complete_enrollment(
        &self,
        id: i64,
        token: &str,
        component_token: &str,
    ) -> Result<bool, DbError> {
        let changed = self.conn().execute(
            "UPDATE components SET enroll_hash = NULL, enroll_expires_ms = NULL, token_hash = ?3, enrolled_ms = ?4
             WHERE id = ?1 AND enroll_hash = ?2 AND enroll_expires_ms >= ?4",
            params![id, hash(token), hash(component_token), now_ms()],
        )?;
        Ok(changed == 1)
    }

    /// The component whose bearer token is `token`.
    pub fn find_component(&self, token: &str) -> Result<Option<ComponentRow>, DbError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COMPONENT_COLUMNS} FROM components WHERE token_hash = ?1"),
                [hash(token)],
                row_component,
            )
            .optional()?)
    }

    pub fn heartbeat(&self, name: &str, beat: &Heartbeat) -> Result<(), DbError> {
        let last = serde_json::to_string(beat).unwrap_or_default();
        self.conn().execute(
            "UPDATE components SET last_heartbeat_ms = ?2, last = ?3 WHERE name = ?1",
            params![name, now_ms(), last],
        )?;
        Ok(())
    }

    pub fn list_components(&self, after: i64, limit: u32) -> Result<Vec<ComponentRow>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COMPONENT_COLUMNS} FROM components WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after, limit], row_component)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Raises an alert about `object`, unless one of that kind is active already.
    pub fn raise(&self, kind: &str, object: &str, message: &str) -> Result<bool, DbError> {
        let conn = self.conn();
        let active = conn
            .query_row(
                "SELECT 1 FROM alerts WHERE kind = ?1 AND object = ?2 AND resolved_ms IS NULL",
                params![kind, object],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !active {
            conn.execute(
                "INSERT INTO alerts (raised_ms, kind, object, message) VALUES (?1, ?2, ?3, ?4)",
                params![now_ms(), kind, object, message],
            )?;
        }
        Ok(!active)
    }

    /// [`Db::raise`]; an active alert takes `message` if it says something else now (the
    /// cause may have changed since it was raised).
    pub fn raise_or_update(
        &self,
        kind: &str,
        object: &str,
        message: &str,
    ) -> Result<bool, DbError> {
        let raised = self.raise(kind, object, message)?;
        if !raised {
            self.conn().execute(
                "UPDATE alerts SET message = ?3 WHERE kind = ?1 AND object = ?2 AND resolved_ms IS NULL AND message != ?3",
                params![kind, object, message],
            )?;
        }
        Ok(raised)
    }

    /// Resolves the active alert of `kind` about `object`, if any.
    pub fn resolve(&self, kind: &str, object: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE alerts SET resolved_ms = ?3 WHERE kind = ?1 AND object = ?2 AND resolved_ms IS NULL",
            params![kind, object, now_ms()],
        )?;
        Ok(())
    }

    pub fn list_alerts(&self, after: i64, limit: u32) -> Result<Vec<Alert>, DbError> {
        self.alerts_where("id > ?1 ORDER BY id LIMIT ?2", params![after, limit])
    }

    /// The alerts not resolved yet.
    pub fn active_alerts(&self) -> Result<Vec<Alert>, DbError> {
        self.alerts_where("resolved_ms IS NULL ORDER BY id", params![])
    }

    /// The active alerts of `kind`.
    pub fn active_alerts_of(&self, kind: &str) -> Result<Vec<Alert>, DbError> {
        self.alerts_where(
            "resolved_ms IS NULL AND kind = ?1 ORDER BY id",
            params![kind],
        )
    }

    fn alerts_where(
        &self,
        condition: &str,
        values: impl rusqlite::Params,
    ) -> Result<Vec<Alert>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, raised_ms, kind, object, message, resolved_ms FROM alerts WHERE {condition}"
        ))?;
        let rows = stmt.query_map(values, |r| {
            Ok(Alert {
                id: r.get(0)?,
                raised_unix_ms: r.get(1)?,
                kind: r.get(2)?,
                object: r.get(3)?,
                message: r.get(4)?,
                resolved_unix_ms: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A replication group as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Group {
    pub id: i64,
    pub name: String,
    pub machines: Vec<String>,
    /// The master target every machine of the group goes back to, once chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_target: Option<String>,
}

fn row_group(r: &rusqlite::Row<'_>) -> rusqlite::Result<Group> {
    let machines: String = r.get(3)?;
    Ok(Group {
        id: r.get(0)?,
        name: r.get(1)?,
        master_target: r.get(2)?,
        machines: serde_json::from_str(&machines).unwrap_or_default(),
    })
}

impl Db {
    /// Makes a group; a machine belongs to one group at most.
    pub fn create_group(
        &self,
        name: &str,
        machines: &[String],
        master_target: Option<&str>,
    ) -> Result<Group, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut stmt = tx.prepare("SELECT id, name, master_target, machines FROM groups")?;
        let groups: Vec<Group> = stmt.query_map([], row_group)?.collect::<Result<_, _>>()?;
        drop(stmt);
        if groups.iter().any(|g| g.name == name) {
            return Err(DbError::Conflict(format!(
                "a group named {name:?} exists: choose another name"
            )));
        }
        for g in &groups {
            if let Some(m) = machines.iter().find(|m| g.machines.contains(m)) {
                return Err(DbError::Conflict(format!(
                    "machine {m:?} is in group {:?} already: a machine belongs to one group at most",
                    g.name
                )));
            }
        }
        let list = serde_json::to_string(machines).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "INSERT INTO groups (name, master_target, machines) VALUES (?1, ?2, ?3)",
            params![name, master_target, list],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Group {
            id,
            name: name.to_string(),
            machines: machines.to_vec(),
            master_target: master_target.map(str::to_string),
        })
    }

    pub fn list_groups(&self, after: i64, limit: u32) -> Result<Vec<Group>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, master_target, machines FROM groups WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], row_group)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The group `machine` belongs to, if any.
    pub fn group_of(&self, machine: &str) -> Result<Option<Group>, DbError> {
        Ok(self
            .list_groups(0, u32::MAX)?
            .into_iter()
            .find(|g| g.machines.iter().any(|m| m == machine)))
    }
}

/// Milliseconds since 1970, as the database keeps time.
pub fn now() -> i64 {
    now_ms()
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, DbError> {
    serde_json::from_str(body).map_err(|e| {
        DbError::Sql(rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            Box::new(e),
        ))
    })
}

fn row_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    let role: String = r.get(2)?;
    Ok(TokenInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        created_unix_ms: r.get(3)?,
    })
}

/// Which policy protects a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Protection {
    pub machine: String,
    pub policy: String,
    pub since_unix_ms: i64,
}

impl Db {
    /// Protects `machine` with replication policy `policy` (replacing its policy, if any).
    /// The machine must be in the inventory; a failback policy is the failback job's to give.
    pub fn set_protection(&self, machine: &str, policy: &str) -> Result<Protection, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let known: Option<i64> = tx
            .query_row(
                "SELECT id FROM inventory WHERE kind = 'machine' AND name = ?1",
                [machine],
                |r| r.get(0),
            )
            .optional()?;
        if known.is_none() {
            return Err(DbError::NotFound(format!(
                "there is no machine {machine:?} in the inventory: add it to an inventory file and refresh, or start its agent"
            )));
        }
        let found = get_policy_in(&tx, policy)?.ok_or_else(|| {
            DbError::NotFound(format!(
                "there is no policy {policy:?}: list them with GET /api/policies"
            ))
        })?;
        if found.kind == PolicyKind::Failback {
            return Err(DbError::Conflict(format!(
                "{policy:?} is a failback policy: it applies during failback on its own; give machine {machine:?} a replication policy"
            )));
        }
        let since = now_ms();
        // The same policy again (its settings sent again) keeps the time it was given.
        tx.execute(
            "INSERT INTO protections (machine, policy, since_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (machine) DO UPDATE SET since_ms = CASE WHEN policy = excluded.policy
                 THEN since_ms ELSE excluded.since_ms END, policy = excluded.policy",
            params![machine, found.id, since],
        )?;
        let since: i64 = tx.query_row(
            "SELECT since_ms FROM protections WHERE machine = ?1",
            [machine],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(Protection {
            machine: machine.to_string(),
            policy: found.name,
            since_unix_ms: since,
        })
    }

    /// Takes `machine`'s policy away.
    pub fn clear_protection(&self, machine: &str) -> Result<Protection, DbError> {
        let found = self
            .protections()?
            .into_iter()
            .find(|(p, _)| p.machine == machine);
        let Some((protection, _)) = found else {
            return Err(DbError::NotFound(format!(
                "machine {machine:?} has no policy: nothing to clear"
            )));
        };
        self.conn()
            .execute("DELETE FROM protections WHERE machine = ?1", [machine])?;
        Ok(protection)
    }

    /// Every machine's protection, with its policy.
    pub fn protections(&self) -> Result<Vec<(Protection, Policy)>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT x.machine, x.since_ms, {POLICY_COLUMNS} FROM protections x
             JOIN policies p ON p.id = x.policy LEFT JOIN policies o ON p.failback_of = o.id
             ORDER BY x.machine"
        ))?;
        let rows = stmt.query_map([], |r| {
            let policy = row_policy_at(r, 2)?;
            Ok((
                Protection {
                    machine: r.get(0)?,
                    policy: policy.name.clone(),
                    since_unix_ms: r.get(1)?,
                },
                policy,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a machine as its agent reports it, unless an inventory file lists a machine
    /// of that name (the file's description is the operator's, and wins).
    pub fn report_machine(&self, machine: &crate::inventory::Machine) -> Result<(), DbError> {
        let body = serde_json::to_string(machine).unwrap_or_default();
        self.conn().execute(
            "INSERT INTO inventory (kind, name, body, source) VALUES ('machine', ?1, ?2, 'agent')
             ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body
             WHERE inventory.source = 'agent'",
            params![machine.name, body],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, Machine, MachineSource};

    #[test]
    fn active_alerts_are_found_by_the_index_not_by_reading_every_alert() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        for k in 0..50 {
            db.raise("kind-a", &format!("object/{k}"), "m").unwrap();
            db.resolve("kind-a", &format!("object/{k}")).unwrap();
        }
        db.raise("kind-a", "object/live", "m").unwrap();
        db.raise("kind-b", "object/other", "m").unwrap();
        let active = db.active_alerts_of("kind-a").unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].object, "object/live");
        for query in [
            "SELECT id FROM alerts WHERE resolved_ms IS NULL AND kind = 'kind-a' ORDER BY id",
            "UPDATE alerts SET resolved_ms = 1 WHERE kind = 'kind-a' AND object = 'x' AND resolved_ms IS NULL",
        ] {
            let plan: Vec<String> = {
                let conn = db.conn();
                let mut stmt = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
                    .unwrap();
                stmt.query_map([], |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            };
            assert!(
                plan.iter().any(|step| step.contains("alerts_active")),
                "{query}: {plan:?}"
            );
        }
    }

    fn machine(name: &str, source: MachineSource, disks: u64) -> Machine {
        let mut m: Machine = toml::from_str(&format!(
            r#"
            name = "{name}"
            site = "site-a"
            os = {{ family = "linux", version = "12" }}
            tools = "not-installed"
            disks = [{{ name = "d0", size_bytes = {disks} }}]
            "#
        ))
        .unwrap();
        m.source = source;
        m
    }

    fn machines(db: &Db) -> Vec<Machine> {
        db.all_inventory("machine").unwrap()
    }

    #[test]
    fn agent_reported_machines_survive_a_refresh_and_an_inventory_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        db.report_machine(&machine("app01", MachineSource::Agent, 1))
            .unwrap();
        // A refresh of files that do not list app01 keeps it.
        let files = Inventory {
            machines: vec![machine("web01", MachineSource::File, 2)],
            ..Inventory::default()
        };
        db.replace_inventory(&files).unwrap();
        let names: Vec<String> = machines(&db).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["app01", "web01"]);
        // A later report updates it...
        db.report_machine(&machine("app01", MachineSource::Agent, 3))
            .unwrap();
        assert_eq!(machines(&db)[0].disks[0].size_bytes, 3);
        // ...but does not overwrite what a file says of a machine.
        db.report_machine(&machine("web01", MachineSource::Agent, 4))
            .unwrap();
        let web01 = machines(&db).remove(1);
        assert_eq!(
            (web01.source, web01.disks[0].size_bytes),
            (MachineSource::File, 2)
        );
        // A file that lists app01 takes it over; once no file lists it, it goes.
        let files = Inventory {
            machines: vec![machine("app01", MachineSource::File, 5)],
            ..Inventory::default()
        };
        db.replace_inventory(&files).unwrap();
        let all = machines(&db);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].source, MachineSource::File);
        db.replace_inventory(&Inventory::default()).unwrap();
        assert!(machines(&db).is_empty());
    }

    #[test]
    fn a_policy_protecting_a_machine_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        db.report_machine(&machine("app01", MachineSource::Agent, 1))
            .unwrap();
        let settings = PolicySettings {
            rpo_threshold_seconds: 30,
            retention_seconds: 3600,
            app_consistent_seconds: 0,
        };
        db.create_policy("gold", &settings).unwrap();
        assert!(matches!(
            db.set_protection("nope", "gold"),
            Err(DbError::NotFound(_))
        ));
        assert!(matches!(
            db.set_protection("app01", "gold-failback"),
            Err(DbError::Conflict(_))
        ));
        db.set_protection("app01", "gold").unwrap();
        let Err(DbError::Conflict(why)) = db.delete_policy("gold") else {
            panic!("a policy in use was deleted");
        };
        assert!(why.contains("app01"), "{why}");
        assert_eq!(db.protections().unwrap()[0].1.name, "gold");
        db.clear_protection("app01").unwrap();
        db.delete_policy("gold").unwrap();
    }
}
