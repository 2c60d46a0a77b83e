//! The REST API: routes, the error model and the OpenAPI document (`/api/openapi.json`,
//! generated from the handlers below by utoipa).
//!
//! Errors are JSON, `{"code": "...", "message": "..."}`: the code is stable, the message a
//! sentence naming the object and the fix. Lists are pages: `?limit=` (1 to 500, 100 by
//! default) and `?after=` (the last id of the previous page), answered with `items` and
//! `next_after` (absent on the last page).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::auth::{Role, authorize};
use crate::components::{
    self, Alert, ComponentHealth, ComponentInfo, EnrollRequest, Enrolled, Enrollment, Heartbeat,
    NewComponent,
};
use crate::components::{
    DiskReport, DiskSync, RecoveryReport, ReplicaProblemReport, ReplicaReport, StreamReport,
};
use crate::db::{AuditEntry, CreatedToken, Db, DbError, Group, Protection, TokenInfo};
use crate::inventory::{Datastore, Host, InventorySource, Machine, MachineSource, Site};
use crate::inventory::{MasterTarget, ProcessServer};
use crate::jobs::{Command, CommandResult, Job, JobKind, JobRequest, JobState};
use crate::policy::{NewPolicy, Policy, PolicySettings};
use crate::preflight::{Check, Purpose, Report, Severity};
use crate::status::{DiskStatus, MachineStatus, ProtectionState, StatusHealth};
use boomerang_wire::pki::CertRole;

/// What every handler shares.
pub struct AppState {
    pub db: Arc<Db>,
    /// The state directory, which is the CA's (enrolment issues certificates from it).
    pub dir: std::path::PathBuf,
    /// Silence longer than this makes a component unhealthy.
    pub heartbeat_timeout_ms: i64,
    /// Where the inventory comes from.
    pub sources: Arc<Vec<Box<dyn InventorySource>>>,
    /// Woken when a job is made or a command answered, so the engine steps at once.
    pub jobs_changed: tokio::sync::Notify,
    /// Told after each pass of the job engine: a job may be waiting for its preflight.
    pub preflights_wanted: tokio::sync::Notify,
    /// The newest command's id, sent after each pass of the job engine that gave one out:
    /// components waiting for a command look again when it moves.
    pub commands_posted: tokio::sync::watch::Sender<i64>,
}

impl AppState {
    /// Adds an audit entry; a failure to is logged, and does not fail the request.
    pub async fn audit(&self, actor: &str, action: &str, outcome: &str) {
        let (db, actor, action, outcome) = (
            self.db.clone(),
            actor.to_string(),
            action.to_string(),
            outcome.to_string(),
        );
        let done = tokio::task::spawn_blocking(move || db.audit(&actor, &action, &outcome)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::error!("could not write an audit entry (alert)");
        }
    }
}

/// An error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// Stable across versions: `BAD_REQUEST`, `UNAUTHORIZED`, `FORBIDDEN`, `NOT_FOUND`,
    /// `CONFLICT`, `STORAGE_FULL`, `BUSY`, `UNAVAILABLE`, `INTERNAL`.
    pub code: &'static str,
    /// What went wrong and how to fix it.
    pub message: String,
}

impl ApiError {
    /// An error of any status, with its stable code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "this request needs a valid token: send `Authorization: Bearer <token>` (`boomerang server init` printed the first admin token)",
        )
    }

    pub fn forbidden(has: Role, needs: Role) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!(
                "this request needs the {} role and the token has {}: ask an admin for a token with that role",
                needs.as_str(),
                has.as_str()
            ),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// A fault of the server: the detail goes to its log (with a reference), not to the
    /// client, which may not be trusted with paths or SQL.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        let reference: u32 = rand::random();
        tracing::error!(%message, reference = format!("{reference:08x}"), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            format!("the server failed: see its log, reference {reference:08x}"),
        )
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        use rusqlite::ErrorCode as Code;
        let sqlite = match &e {
            DbError::Sql(rusqlite::Error::SqliteFailure(f, _)) => Some(f.code),
            _ => None,
        };
        match (e, sqlite) {
            (DbError::Conflict(m), _) => Self::new(StatusCode::CONFLICT, "CONFLICT", m),
            (DbError::NotFound(m), _) => Self::not_found(m),
            // The transaction was rolled back: nothing of the request was written.
            (_, Some(Code::DiskFull)) => {
                tracing::error!("the database's volume is full (alert)");
                Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "STORAGE_FULL",
                    "the configuration server's database volume is full: nothing of this request was written; free space on it and try again",
                )
            }
            (_, Some(Code::DatabaseBusy | Code::DatabaseLocked)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "BUSY",
                "the configuration server's database is locked by another process: nothing of this request was written; try again, and check that no other program holds the database",
            ),
            (other, _) => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

/// A JSON body whose faults are 400s in the API's error model (naming the field).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Body(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// A query string, likewise.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Which page of a list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most this many items (1 to 500; 100 by default).
    #[param(minimum = 1, maximum = 500)]
    #[serde(default, deserialize_with = "crate::policy::whole_opt")]
    pub limit: Option<u32>,
    /// The items after this id (the previous page's `next_after`).
    #[param(minimum = 0, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::policy::whole_opt")]
    pub after: Option<i64>,
}

/// The largest id a page may start after: 2^53 - 1, exact in every JSON parser.
const MAX_ID: i64 = 9007199254740991;

impl PageQuery {
    fn after(&self) -> Result<i64, ApiError> {
        match self.after {
            None => Ok(0),
            Some(n @ 0..=MAX_ID) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!(
                "after {n} is out of range: use an id from 0 to {MAX_ID}"
            ))),
        }
    }

    fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=500) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!(
                "limit {n} is out of range: ask for 1 to 500 items"
            ))),
        }
    }
}

/// A page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

fn page<T>(items: Vec<T>, limit: u32, id: impl Fn(&T) -> i64) -> Page<T> {
    let next_after = (items.len() == limit as usize)
        .then(|| items.last().map(&id))
        .flatten();
    Page { items, next_after }
}

/// Runs a database call off the async workers.
async fn db<R: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Db) -> Result<R, DbError> + Send + 'static,
) -> Result<R, ApiError> {
    let db = state.db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
    /// This server's Boomerang version.
    pub version: &'static str,
}

/// The server is up and its database answers.
#[utoipa::path(get, path = "/api/health", tag = "server",
    responses((status = 200, body = Health), (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn health(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    db(&state, |db| db.list_tokens(0, 1)).await?;
    Ok(Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    }))
}

/// A token to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 64 characters: letters, digits, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", min_length = 1, max_length = 64)]
    pub name: String,
    pub role: Role,
}

/// Lists tokens (admin).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens", params(PageQuery),
    responses((status = 200, body = Page<TokenInfo>), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = [])))]
async fn list_tokens(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<TokenInfo>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_tokens(after, limit)).await?;
    Ok(Json(page(items, limit, |t| t.id)))
}

/// Makes a token (admin); its secret is in this answer only.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn create_token(
    State(state): State<Arc<AppState>>,
    Body(new): Body<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let valid = (1..=64).contains(&new.name.len())
        && new
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "name {:?} is not a token name: use 1 to 64 letters, digits, '-', '_' or '.'",
            new.name
        )));
    }
    let created = db(&state, move |db| db.create_token(&new.name, new.role)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Deletes a token (admin); the last admin token cannot go.
#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "tokens",
    params(("id" = i64, Path, minimum = 1, maximum = 9007199254740991_i64, description = "The token's id")),
    responses((status = 200, body = TokenInfo), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn delete_token(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{id:?} is not a token id: use a number from GET /api/tokens"
        ))
    })?;
    Ok(Json(db(&state, move |db| db.delete_token(id)).await?))
}

/// The audit log, oldest first (admin): every change, and every denied request.
#[utoipa::path(get, path = "/api/audit", tag = "audit", params(PageQuery),
    responses((status = 200, body = Page<AuditEntry>), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = [])))]
async fn list_audit(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_audit(after, limit)).await?;
    Ok(Json(page(items, limit, |e| e.id)))
}

/// A page of inventory objects; `next_after` is the position of the last one (objects keep
/// their position across refreshes).
async fn list_kind<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &AppState,
    kind: &'static str,
    q: PageQuery,
) -> Result<Json<Page<T>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let rows = db(state, move |db| db.list_inventory::<T>(kind, after, limit)).await?;
    let last = rows.last().map(|(id, _)| *id);
    let full = rows.len() == limit as usize;
    Ok(Json(Page {
        items: rows.into_iter().map(|(_, object)| object).collect(),
        next_after: last.filter(|_| full),
    }))
}

/// Lists sites.
#[utoipa::path(get, path = "/api/sites", tag = "inventory", params(PageQuery),
    responses((status = 200, body = Page<Site>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_sites(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Site>>, ApiError> {
    list_kind(&state, "site", q).await
}

/// Lists hosts.
#[utoipa::path(get, path = "/api/hosts", tag = "inventory", params(PageQuery),
    responses((status = 200, body = Page<Host>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_hosts(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Host>>, ApiError> {
    list_kind(&state, "host", q).await
}

/// Lists datastores.
#[utoipa::path(get, path = "/api/datastores", tag = "inventory", params(PageQuery),
    responses((status = 200, body = Page<Datastore>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_datastores(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Datastore>>, ApiError> {
    list_kind(&state, "datastore", q).await
}

/// Lists machines.
#[utoipa::path(get, path = "/api/machines", tag = "inventory", params(PageQuery),
    responses((status = 200, body = Page<Machine>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_machines(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Machine>>, ApiError> {
    list_kind(&state, "machine", q).await
}

/// One machine, by name.
#[utoipa::path(get, path = "/api/machines/{name}", tag = "inventory",
    params(("name" = String, Path, description = "The machine's name")),
    responses((status = 200, body = Machine), (status = 401, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn get_machine(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Machine>, ApiError> {
    let key = name.clone();
    db(&state, move |db| {
        db.get_inventory::<Machine>("machine", &key)
    })
    .await?
    .map(Json)
    .ok_or_else(|| no_machine(&name))
}

/// The protection of every machine: state, health, RPO now, latest recovery point.
#[utoipa::path(get, path = "/api/status", tag = "status", params(PageQuery),
    responses((status = 200, body = Page<MachineStatus>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_status(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<MachineStatus>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let timeout = state.heartbeat_timeout_ms;
    let all = db(&state, move |db| statuses(db, timeout)).await?;
    let items: Vec<MachineStatus> = all
        .into_iter()
        .filter(|s| s.id > after)
        .take(limit as usize)
        .collect();
    Ok(Json(page(items, limit, |s| s.id)))
}

fn no_machine(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "there is no machine {name:?} in the inventory: list them with GET /api/machines, or add it to an inventory file and refresh"
    ))
}

/// One machine's protection.
#[utoipa::path(get, path = "/api/machines/{name}/status", tag = "status",
    params(("name" = String, Path, description = "The machine's name")),
    responses((status = 200, body = MachineStatus), (status = 401, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn machine_status(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<MachineStatus>, ApiError> {
    let timeout = state.heartbeat_timeout_ms;
    db(&state, move |db| statuses(db, timeout))
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .map(Json)
        .ok_or_else(|| no_machine(&name))
}

/// The replication policy to protect a machine with.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// A replication policy's name.
    pub policy: String,
}

/// Gives a machine its replication policy (admin): its RPO threshold is watched from then on.
#[utoipa::path(put, path = "/api/machines/{name}/policy", tag = "policies", request_body = SetPolicy,
    params(("name" = String, Path, description = "The machine's name")),
    responses((status = 200, body = Protection), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn set_machine_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(set): Body<SetPolicy>,
) -> Result<Json<Protection>, ApiError> {
    Ok(Json(
        db(&state, move |db| db.set_protection(&name, &set.policy)).await?,
    ))
}

/// Takes a machine's replication policy away (admin).
#[utoipa::path(delete, path = "/api/machines/{name}/policy", tag = "policies",
    params(("name" = String, Path, description = "The machine's name")),
    responses((status = 200, body = Protection), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn clear_machine_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Protection>, ApiError> {
    Ok(Json(
        db(&state, move |db| db.clear_protection(&name)).await?,
    ))
}

/// What a refresh loaded.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Refreshed {
    pub sites: usize,
    pub hosts: usize,
    pub datastores: usize,
    pub machines: usize,
}

/// Loads the inventory sources again (operator). A source with an error changes nothing:
/// the answer is 400 naming the file, the line and the column, or the object.
#[utoipa::path(post, path = "/api/inventory/refresh", tag = "inventory",
    responses((status = 200, body = Refreshed), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 503, body = ApiError)),
    security(("bearer" = [])))]
async fn refresh_inventory(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Refreshed>, ApiError> {
    let sources = state.sources.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::inventory::load_all(&sources))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e {
            // The operator's file: 400 naming the file, line and column, or the object.
            crate::inventory::InventoryError::Syntax { .. }
            | crate::inventory::InventoryError::Invalid(_) => ApiError::bad_request(e.to_string()),
            // The server cannot read its own configuration's files.
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                other.to_string(),
            ),
        })?;
    let counts = Refreshed {
        sites: loaded.sites.len(),
        hosts: loaded.hosts.len(),
        datastores: loaded.datastores.len(),
        machines: loaded.machines.len(),
    };
    db(&state, move |db| db.replace_inventory(&loaded)).await?;
    Ok(Json(counts))
}

/// A replication policy just changed, and where the change went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UpdatedPolicy {
    #[serde(flatten)]
    pub policy: Policy,
    /// The protect jobs that send the change, by machine.
    pub sent: Vec<SentPolicy>,
    /// The machines it protects that the change was not sent to now, and why.
    pub left_out: Vec<crate::jobs::LeftOut>,
    /// Why the change could not be sent at all (it stands nonetheless): run protect for each
    /// machine to send it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_error: Option<String>,
}

/// A protect job sending a policy's change to a machine.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SentPolicy {
    pub machine: String,
    pub job: i64,
}

/// A replication policy just made, and the failback policy made with it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedPolicy {
    pub policy: Policy,
    pub failback: Policy,
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if crate::inventory::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} name {name:?} is not valid: use 1 to 63 lowercase letters, digits and '-'"
        )))
    }
}

/// Lists policies, replication and failback.
#[utoipa::path(get, path = "/api/policies", tag = "policies", params(PageQuery),
    responses((status = 200, body = Page<Policy>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_policies(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Policy>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_policies(after, limit)).await?;
    Ok(Json(page(items, limit, |p| p.id)))
}

/// One policy.
#[utoipa::path(get, path = "/api/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 200, body = Policy), (status = 401, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn get_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    let key = name.clone();
    db(&state, move |db| db.get_policy(&key))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "there is no policy {name:?}: list them with GET /api/policies"
            ))
        })
}

/// Makes a replication policy and its failback policy (admin).
#[utoipa::path(post, path = "/api/policies", tag = "policies", request_body = NewPolicy,
    responses((status = 201, body = CreatedPolicy), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn create_policy(
    State(state): State<Arc<AppState>>,
    Body(new): Body<NewPolicy>,
) -> Result<(StatusCode, Json<CreatedPolicy>), ApiError> {
    check_name("policy", &new.name)?;
    let settings = new.settings();
    settings.check().map_err(ApiError::bad_request)?;
    let (policy, failback) = db(&state, move |db| db.create_policy(&new.name, &settings)).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedPolicy { policy, failback }),
    ))
}

/// Changes a replication policy (admin); a failback policy is refused with 409. Each machine
/// the policy protects that replicates now gets a protect job, which sends the new settings
/// to its master target and agent; the answer lists those jobs and the machines left out.
#[utoipa::path(put, path = "/api/policies/{name}", tag = "policies", request_body = PolicySettings,
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 200, body = UpdatedPolicy), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn update_policy(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(name): Path<String>,
    Body(settings): Body<PolicySettings>,
) -> Result<Json<UpdatedPolicy>, ApiError> {
    settings.check().map_err(ApiError::bad_request)?;
    let policy = db(&state, move |db| db.update_policy(&name, &settings)).await?;
    let mut updated = UpdatedPolicy {
        policy,
        sent: Vec::new(),
        left_out: Vec::new(),
        send_error: None,
    };
    let policy = &updated.policy;
    // The machines it protects take the new settings. The edit stands whatever happens here.
    let (timeout, pushed) = (state.heartbeat_timeout_ms, policy.name.clone());
    match db(&state, move |db| {
        db.push_policy(&pushed, &caller.name, timeout)
    })
    .await
    {
        Ok((started, left)) => {
            if !started.is_empty() {
                state.jobs_changed.notify_one();
            }
            let jobs: Vec<i64> = started.iter().map(|j| j.id).collect();
            tracing::info!(policy = %policy.name, ?jobs, left_out = ?left, "policy changed: a protect job sends it to each machine that replicates with it now; those left out take it at their next protect");
            updated.sent = started
                .into_iter()
                .map(|j| SentPolicy {
                    machine: j.machine,
                    job: j.id,
                })
                .collect();
            updated.left_out = left;
        }
        Err(e) => {
            tracing::error!(policy = %policy.name, error = %e.message, "policy changed, but not sent to its machines: run protect for each to send it");
            updated.send_error = Some(e.message);
        }
    }
    Ok(Json(updated))
}

/// Deletes a replication policy and its failback policy (admin); a failback policy alone is
/// refused with 409.
#[utoipa::path(delete, path = "/api/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 200, body = Policy), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn delete_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    Ok(Json(db(&state, move |db| db.delete_policy(&name)).await?))
}

/// How long an enrolment token is good for.
const ENROLL_VALID_MS: i64 = 24 * 3600 * 1000;

pub(crate) fn info(row: crate::db::ComponentRow, now: i64, timeout: i64) -> ComponentInfo {
    let healthy = row.last.as_ref().is_none_or(|l| l.healthy);
    ComponentInfo {
        health: components::health(
            row.enrolled_ms,
            row.last_heartbeat_ms,
            healthy,
            now,
            timeout,
        ),
        name: row.name,
        role: row.role,
        site: row.site,
        last_heartbeat_unix_ms: row.last_heartbeat_ms,
        last: row.last,
    }
}

/// Names a component to enrol (admin): the answer holds its one-time enrolment token, good
/// for 24 hours. Naming it again starts its enrolment over.
#[utoipa::path(post, path = "/api/components", tag = "components", request_body = NewComponent,
    responses((status = 201, body = Enrollment), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn create_component(
    State(state): State<Arc<AppState>>,
    Body(new): Body<NewComponent>,
) -> Result<(StatusCode, Json<Enrollment>), ApiError> {
    check_name("component", &new.name)?;
    if new.name == "server" {
        return Err(ApiError::bad_request(
            "\"server\" is the configuration server's own certificate name: name the component otherwise",
        ));
    }
    let site = new.site.clone();
    let known = db(&state, move |db| db.get_inventory::<Site>("site", &site)).await?;
    if known.is_none() {
        return Err(ApiError::not_found(format!(
            "site {:?} is not in the inventory: add it to an inventory file and refresh",
            new.site
        )));
    }
    if let Some(bad) = new.hosts.iter().find(|h| !h.valid()) {
        return Err(ApiError::bad_request(format!(
            "host {:?} is not a DNS name or IP address a certificate can carry (nor one of Boomerang's own identity names)",
            bad.0
        )));
    }
    if let Some(machine) = &new.machine {
        check_name("machine", machine)?;
        if new.role != components::ComponentRole::Agent {
            return Err(ApiError::bad_request(format!(
                "only an agent serves a machine: a {} takes no machine",
                new.role.as_str()
            )));
        }
    }
    let hosts: Vec<String> = new.hosts.iter().map(|h| h.0.clone()).collect();
    let (name, role) = (new.name.clone(), new.role);
    let (token, expires) = db(&state, move |db| {
        db.create_component(
            &new.name,
            new.role,
            &new.site,
            &hosts,
            new.machine.as_deref(),
            ENROLL_VALID_MS,
        )
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Enrollment {
            name,
            role,
            enrollment_token: token,
            expires_unix_ms: expires,
        }),
    ))
}

/// Lists components and their health.
#[utoipa::path(get, path = "/api/components", tag = "components", params(PageQuery),
    responses((status = 200, body = Page<ComponentInfo>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_components(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<ComponentInfo>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let rows = db(&state, move |db| db.list_components(after, limit)).await?;
    let last = rows.last().map(|r| r.id);
    let full = rows.len() == limit as usize;
    let (now, timeout) = (crate::db::now(), state.heartbeat_timeout_ms);
    Ok(Json(Page {
        items: rows.into_iter().map(|r| info(r, now, timeout)).collect(),
        next_after: last.filter(|_| full),
    }))
}

/// A component enrols with its one-time token (no bearer token): it gets a certificate from
/// the site's CA, its key (kept nowhere else) and a token for heartbeats.
#[utoipa::path(post, path = "/api/enroll", tag = "components", request_body = EnrollRequest,
    responses((status = 200, body = Enrolled), (status = 400, body = ApiError),
        (status = 401, body = ApiError)))]
async fn enroll(
    State(state): State<Arc<AppState>>,
    Body(request): Body<EnrollRequest>,
) -> Result<Json<Enrolled>, ApiError> {
    let denied = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "this enrolment token is unknown, used or expired: ask an admin to name the component again (POST /api/components)",
        )
    };
    let t = request.enrollment_token.clone();
    let Some(row) = db(&state, move |db| db.pending_enrollment(&t)).await? else {
        state.audit("anonymous", "POST /api/enroll", "denied").await;
        return Err(denied());
    };
    // The certificate first, the token used up last: a failure in between leaves the
    // enrolment as it was, for another try.
    let dir = state.dir.clone();
    let (name, role, hosts) = (row.name.clone(), row.role, row.hosts.clone());
    let also: Vec<String> = row.machine.clone().into_iter().collect();
    let issued =
        tokio::task::spawn_blocking(move || -> Result<(String, String, String), String> {
            let out = dir.join("issued").join(&name);
            let _ = std::fs::remove_dir_all(&out);
            boomerang_wire::pki::issue_also(
                &dir,
                &name,
                &also,
                CertRole::Wire(role.wire()),
                &hosts,
                825,
            )
            .map_err(|e| e.to_string())?;
            let read = |f: &str| std::fs::read_to_string(out.join(f)).map_err(|e| e.to_string());
            let files: Result<_, String> =
                (|| Ok((read("cert.pem")?, read("key.pem")?, read("ca.crt")?)))();
            // The key leaves with the component; the server keeps none, whatever happened.
            let removed = std::fs::remove_file(out.join("key.pem"));
            let files = files?;
            removed.map_err(|e| e.to_string())?;
            Ok(files)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::internal)?;
    let component_token = crate::db::secret("bmc");
    let (id, t, c) = (
        row.id,
        request.enrollment_token.clone(),
        component_token.clone(),
    );
    if !db(&state, move |db| db.complete_enrollment(id, &t, &c)).await? {
        state.audit("anonymous", "POST /api/enroll", "denied").await;
        return Err(denied());
    }
    state.audit(&row.name, "POST /api/enroll", "ok").await;
    Ok(Json(Enrolled {
        name: row.name,
        role: row.role,
        certificate: issued.0,
        key: issued.1,
        ca: issued.2,
        component_token,
    }))
}

/// A component's heartbeat (with its component token).
#[utoipa::path(post, path = "/api/heartbeat", tag = "components", request_body = Heartbeat,
    responses((status = 204, description = "Taken"), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn heartbeat(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::ComponentCaller>,
    Body(beat): Body<Heartbeat>,
) -> Result<StatusCode, ApiError> {
    beat.check(caller.role).map_err(ApiError::bad_request)?;
    // An agent speaks for the machine it is named after, or the one it was enrolled for.
    if let Some(m) = &beat.machine
        && *m != caller.name
        && caller.machine.as_deref() != Some(m.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "agent {:?} reports for machine {m:?}, which it was not enrolled for: enrol it with that machine",
            caller.name
        )));
    }
    let name = caller.name.clone();
    let healthy = beat.healthy;
    // A master target says which replicas make no point now: each is an alert on its
    // machine until the master target reports it working again.
    let replica_alerts = (caller.role == components::ComponentRole::MasterTarget).then(|| {
        let failing: Vec<(String, String)> = beat
            .replica_problems
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.machine.clone(),
                    format!(
                        "master target {:?} makes no recovery point of machine {:?}: {}; the records it receives are kept on its retention volume and applied once this is mended",
                        caller.name, p.machine, p.error
                    ),
                )
            })
            .collect();
        failing
    });
    // An agent's report describes its machine: one no inventory file lists joins the
    // inventory from it (at the agent's site, a physical machine as ASR discovers them).
    let reported = match (&beat.disks, &beat.os) {
        // Only from an agent that serves the machine's disks (not one standing by for it).
        (Some(disks), Some(os))
            if caller.role == components::ComponentRole::Agent && !disks.is_empty() =>
        {
            let machine = beat.machine.as_deref().unwrap_or(&caller.name);
            Some(Machine::reported(machine, &caller.site, os, disks))
        }
        _ => None,
    };
    db(&state, move |db| {
        db.heartbeat(&name, &beat)?;
        if let Some(machine) = &reported {
            db.report_machine(machine)?;
        }
        if healthy {
            db.resolve(UNHEALTHY, &format!("component/{name}"))?;
        }
        if let Some(failing) = &replica_alerts {
            // One alert per machine and master target (the object names both), resolved by
            // that master target's next report without it.
            let object = |machine: &str| format!("machine/{machine}/replica-on/{name}");
            for (machine, message) in failing {
                if db.raise_or_update(REPLICA_FAILING, &object(machine), message)? {
                    tracing::warn!(%message, "alert");
                }
            }
            let suffix = format!("/replica-on/{name}");
            for alert in db.active_alerts_of(REPLICA_FAILING)? {
                if alert.object.ends_with(&suffix)
                    && !failing.iter().any(|(m, _)| alert.object == object(m))
                {
                    db.resolve(REPLICA_FAILING, &alert.object)?;
                }
            }
        }
        Ok(())
    })
    .await?;
    // A job may be waiting on what the component reports.
    state.jobs_changed.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// The kind of alert a failed preflight raises.
const PREFLIGHT_FAILED: &str = "preflight-failed";

/// The kind of alert a silent or failing component raises.
const UNHEALTHY: &str = "component-unhealthy";

/// The kind of alert a replica whose master target makes no recovery point raises (its
/// store does not answer, its volume is full, ...).
pub const REPLICA_FAILING: &str = "replica-failing";

/// The kind of alert a machine whose RPO passes its policy's threshold raises.
pub const RPO_THRESHOLD: &str = "rpo-threshold";

/// The status of every machine, from the database and the components' last reports.
pub(crate) fn statuses(db: &Db, timeout: i64) -> Result<Vec<MachineStatus>, DbError> {
    let now = crate::db::now();
    let machines = db.list_inventory::<Machine>("machine", 0, u32::MAX)?;
    let protections = db.protections()?;
    let components: Vec<ComponentInfo> = db
        .list_components(0, u32::MAX)?
        .into_iter()
        .map(|r| info(r, now, timeout))
        .collect();
    let alerts = db.active_alerts()?;
    let failovers = db.failed_over()?;
    Ok(crate::status::all(&crate::status::Inputs {
        machines: &machines,
        protections: &protections,
        components: &components,
        alerts: &alerts,
        failovers: &failovers,
        now_ms: now,
    }))
}

/// Raises an RPO alert for every protected machine whose RPO is over its policy's
/// threshold, and resolves it once the RPO is back under.
fn check_rpo(db: &Db, timeout: i64) -> Result<(), DbError> {
    for s in statuses(db, timeout)? {
        let object = format!("machine/{}", s.name);
        let over = match (s.rpo_seconds, s.rpo_threshold_seconds) {
            (Some(rpo), Some(threshold)) => {
                matches!(
                    s.state,
                    ProtectionState::Protected | ProtectionState::Resync
                ) && rpo > threshold as f64
            }
            _ => false,
        };
        if over {
            let message = format!(
                "machine {:?} has an RPO of {:.0} s, over the {} s threshold of policy {:?}: check its agent, the process server's backlog ({} bytes) and the master target",
                s.name,
                s.rpo_seconds.unwrap_or(0.0),
                s.rpo_threshold_seconds.unwrap_or(0),
                s.policy.as_deref().unwrap_or(""),
                s.backlog_bytes.unwrap_or(0)
            );
            if db.raise(RPO_THRESHOLD, &object, &message)? {
                tracing::warn!(%message, "alert");
            }
        } else {
            db.resolve(RPO_THRESHOLD, &object)?;
        }
    }
    Ok(())
}

/// Runs for the life of the server: raises an alert for every component that turns
/// unhealthy and for every machine whose RPO passes its policy's threshold, and resolves
/// each once the cause is gone.
pub async fn watch_components(state: Arc<AppState>) {
    let every = std::time::Duration::from_millis(
        (state.heartbeat_timeout_ms / 3).clamp(200, 10_000) as u64,
    );
    loop {
        tokio::time::sleep(every).await;
        let timeout = state.heartbeat_timeout_ms;
        let checked = db(&state, move |db| {
            let now = crate::db::now();
            for row in db.list_components(0, u32::MAX)? {
                let object = format!("component/{}", row.name);
                let seen = row
                    .last_heartbeat_ms
                    .map_or("never".to_string(), |t| format!("{} s ago", (now - t) / 1000));
                let (name, role, site) = (row.name.clone(), row.role, row.site.clone());
                match info(row, now, timeout).health {
                    components::ComponentHealth::Unhealthy => {
                        // What a silent master target last said of its replicas is stale: its
                        // own alert says it is silent.
                        if role == components::ComponentRole::MasterTarget {
                            let suffix = format!("/replica-on/{name}");
                            for alert in db.active_alerts_of(REPLICA_FAILING)? {
                                if alert.object.ends_with(&suffix) {
                                    db.resolve(REPLICA_FAILING, &alert.object)?;
                                }
                            }
                        }
                        let message = format!(
                            "{} {name:?} at site {site:?} is unhealthy: last heartbeat {seen} (timeout {} s), or it reported itself unhealthy; check that it runs and reaches the configuration server",
                            role.as_str(),
                            timeout / 1000
                        );
                        if db.raise(UNHEALTHY, &object, &message)? {
                            tracing::warn!(%message, "alert");
                        }
                    }
                    components::ComponentHealth::Healthy => db.resolve(UNHEALTHY, &object)?,
                    components::ComponentHealth::Pending | components::ComponentHealth::NeverSeen => {}
                }
            }
            check_rpo(db, timeout)
        })
        .await;
        if let Err(e) = checked {
            tracing::error!(error = %e.message, "could not check the components' health and the machines' RPO");
        }
    }
}

/// Lists alerts, oldest first: active ones have no `resolved_unix_ms`.
#[utoipa::path(get, path = "/api/alerts", tag = "alerts", params(PageQuery),
    responses((status = 200, body = Page<Alert>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Alert>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_alerts(after, limit)).await?;
    Ok(Json(page(items, limit, |a| a.id)))
}

/// A replication group to make: machines that fail over and back together, with one master
/// target and one OS family.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// 1 to 16 machines of the inventory, each in no other group.
    #[schema(value_type = std::collections::BTreeSet<String>, min_items = 1, max_items = 16)]
    pub machines: Vec<String>,
    /// The master target they all go back through, if chosen already.
    #[serde(default)]
    pub master_target: Option<String>,
}

/// The most machines a replication group holds (as in Azure Site Recovery).
pub const MAX_GROUP_MACHINES: usize = 16;

/// Makes a replication group (admin).
#[utoipa::path(post, path = "/api/groups", tag = "groups", request_body = NewGroup,
    responses((status = 201, body = Group), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn create_group(
    State(state): State<Arc<AppState>>,
    Body(new): Body<NewGroup>,
) -> Result<(StatusCode, Json<Group>), ApiError> {
    check_name("group", &new.name)?;
    if new.machines.is_empty() || new.machines.len() > MAX_GROUP_MACHINES {
        return Err(ApiError::bad_request(format!(
            "a replication group holds 1 to {MAX_GROUP_MACHINES} machines, not {}: split it into several groups",
            new.machines.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = new.machines.iter().find(|m| !seen.insert(m.as_str())) {
        return Err(ApiError::bad_request(format!(
            "machine {twice:?} is listed twice"
        )));
    }
    let (names, mt) = (new.machines.clone(), new.master_target.clone());
    let (machines, mt_known) = db(&state, move |db| {
        let mut found = Vec::new();
        for n in &names {
            found.push((n.clone(), db.get_inventory::<Machine>("machine", n)?));
        }
        let mt_known = match &mt {
            Some(m) => db
                .get_inventory::<MasterTarget>("master-target", m)?
                .is_some(),
            None => true,
        };
        Ok((found, mt_known))
    })
    .await?;
    if let Some((missing, _)) = machines.iter().find(|(_, m)| m.is_none()) {
        return Err(ApiError::not_found(format!(
            "machine {missing:?} is not in the inventory: list machines with GET /api/machines"
        )));
    }
    if !mt_known {
        return Err(ApiError::not_found(format!(
            "master target {:?} is not in the inventory",
            new.master_target.as_deref().unwrap_or("")
        )));
    }
    let families: std::collections::BTreeSet<String> = machines
        .iter()
        .filter_map(|(_, m)| m.as_ref())
        .map(|m| format!("{:?}", m.os.family).to_lowercase())
        .collect();
    if families.len() > 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            format!(
                "the machines run several OS families ({}): a group shares one master target, so its machines share one OS family; make a group per family",
                families.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let group = db(&state, move |db| {
        db.create_group(&new.name, &new.machines, new.master_target.as_deref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// Lists replication groups.
#[utoipa::path(get, path = "/api/groups", tag = "groups", params(PageQuery),
    responses((status = 200, body = Page<Group>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_groups(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Group>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_groups(after, limit)).await?;
    Ok(Json(page(items, limit, |g| g.id)))
}

/// What a preflight asks about.
#[derive(Clone, Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PreflightQuery {
    /// `reprotect` or `failback`.
    #[serde(rename = "for")]
    pub purpose: Purpose,
    /// The master target to check against (default: the only one at another site than the
    /// machine runs at now).
    pub master_target: Option<String>,
    /// The process server to check against (default: the only one at the site the machine
    /// runs at now).
    pub process_server: Option<String>,
    /// Alternate-location recovery into this datastore (default: the original location).
    pub datastore: Option<String>,
}

/// Runs the preflight rules for a machine before reprotect or failback. An unknown machine
/// is a failed check (`CS_MACHINE_UNKNOWN`), not a 404.
#[utoipa::path(get, path = "/api/machines/{name}/preflight", tag = "preflight",
    params(("name" = String, Path, description = "The machine's name"), PreflightQuery),
    responses((status = 200, body = Report), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn preflight(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<PreflightQuery>,
) -> Result<Json<Report>, ApiError> {
    Ok(Json(preflight_report(&state, &name, &q).await?))
}

/// The site where `machine` runs now: while failed over, the site of the master target
/// that serves its disks; otherwise that of the agent that serves them. `None` when no
/// component says (the inventory's site holds then).
pub(crate) fn running_site(
    db: &Db,
    timeout: i64,
    machine: &str,
) -> Result<Option<String>, DbError> {
    let Some(status) = statuses(db, timeout)?
        .into_iter()
        .find(|s| s.name == machine)
    else {
        return Ok(None);
    };
    let serving = status
        .failover
        .as_ref()
        .filter(|f| f["released"] != true)
        .and_then(|f| f["master_target"].as_str().map(str::to_string))
        .or(status.agent);
    let Some(serving) = serving else {
        return Ok(None);
    };
    Ok(db
        .list_components(0, u32::MAX)?
        .into_iter()
        .find(|c| c.name == serving)
        .map(|c| c.site))
}

/// Runs the preflight rules for machine `name`, as it is now (at the site it runs at now,
/// which a failover changes), and keeps its alert: a failed preflight is an alert until one
/// for the same machine and purpose passes. The API's preflight and the reprotect and
/// failback jobs' first step both run it.
pub(crate) async fn preflight_report(
    state: &Arc<AppState>,
    name: &str,
    q: &PreflightQuery,
) -> Result<Report, ApiError> {
    let name = name.to_string();
    let key = name.clone();
    let group_key = name.clone();
    let group = db(state, move |db| db.group_of(&group_key)).await?;
    let (now, timeout) = (crate::db::now(), state.heartbeat_timeout_ms);
    let components: Vec<ComponentInfo> = db(state, |db| db.list_components(0, u32::MAX))
        .await?
        .into_iter()
        .map(|r| info(r, now, timeout))
        .collect();
    let (machine, machines, datastores, master_targets, process_servers) = db(state, move |db| {
        let site = running_site(db, timeout, &key)?;
        let machine = db.get_inventory::<Machine>("machine", &key)?.map(|mut m| {
            if let Some(site) = site {
                m.site = site;
            }
            m
        });
        Ok((
            machine,
            db.all_inventory::<Machine>("machine")?,
            db.all_inventory::<Datastore>("datastore")?,
            db.all_inventory::<MasterTarget>("master-target")?,
            db.all_inventory::<ProcessServer>("process-server")?,
        ))
    })
    .await?;
    // Which process servers answer: a TCP connection within 3 s, all at once.
    let probes = process_servers.iter().map(|p| {
        let (name, addr) = (p.name.clone(), p.address.clone());
        async move {
            let connect = tokio::net::TcpStream::connect(addr);
            let answered = matches!(
                tokio::time::timeout(std::time::Duration::from_secs(3), connect).await,
                Ok(Ok(_))
            );
            answered.then_some(name)
        }
    });
    let reachable: Vec<String> = futures_join(probes).await.into_iter().flatten().collect();
    // The Azure sites' storage: listed with its credentials, all at once.
    // Only the sites the machine runs at or may go back to are probed.
    let sites = db(state, |db| db.all_inventory::<Site>("site")).await?;
    let here = machine.as_ref().map(|m| m.site.clone());
    let relevant = |site: &str| {
        here.as_deref() == Some(site)
            || master_targets.iter().any(|mt| {
                mt.site == site
                    && q.master_target
                        .as_deref()
                        .map_or(here.as_deref() != Some(site), |n| n == mt.name)
            })
    };
    let azure_probes = sites
        .into_iter()
        .filter(|s| s.kind == crate::inventory::SiteKind::Azure && relevant(&s.name))
        .map(|site| async move {
            let (configured, problem) = match &site.azure {
                None => (false, None),
                Some(storage) => match storage.access() {
                    Err(why) => (true, Some(why)),
                    Ok(access) => (
                        true,
                        boomerang_store::backend::probe_azure(&access).await.err(),
                    ),
                },
            };
            crate::preflight::AzureProbe {
                site: site.name,
                configured,
                problem,
                container: site.azure.map(|a| a.container),
            }
        });
    let azure: Vec<crate::preflight::AzureProbe> = futures_join(azure_probes).await;
    let report = crate::preflight::run(&crate::preflight::Context {
        purpose: q.purpose,
        machine_name: &name,
        machine: machine.as_ref(),
        machines: &machines,
        datastores: &datastores,
        master_targets: &master_targets,
        process_servers: &process_servers,
        master_target: q.master_target.as_deref(),
        process_server: q.process_server.as_deref(),
        datastore: q.datastore.as_deref(),
        reachable: &reachable,
        group: group.as_ref(),
        components: &components,
        azure: &azure,
    });
    // Only the default choice of components counts for the alert (another is a what-if).
    let default = q.master_target.is_none() && q.process_server.is_none() && q.datastore.is_none();
    if machine.is_some() && default {
        let object = format!(
            "machine/{name}/{}",
            if q.purpose == Purpose::Failback {
                "failback"
            } else {
                "reprotect"
            }
        );
        let message = format!(
            "machine {name:?} is not ready for {}: {} failed; see its preflight",
            object.rsplit('/').next().unwrap_or(""),
            report
                .failed()
                .map(|c| c.code)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let ok = report.ok;
        db(state, move |db| {
            if ok {
                db.resolve(PREFLIGHT_FAILED, &object)
            } else {
                db.raise(PREFLIGHT_FAILED, &object, &message).map(|_| ())
            }
        })
        .await?;
    }
    Ok(report)
}

/// Runs for the life of the server, beside the job engine (a preflight probes the network
/// for seconds): the preflight of every reprotect and failback job that waits for one at its
/// first step, against the components the job chose. A preflight that cannot run fails the
/// job with the reason, as a failed check.
pub async fn run_preflights(state: Arc<AppState>) {
    loop {
        match db(&state, |db| db.awaiting_preflight()).await {
            Ok(waiting) => {
                for (id, machine, q, asked) in waiting {
                    let report = match preflight_report(&state, &machine, &q).await {
                        Ok(r) => serde_json::to_value(&r).unwrap_or_default(),
                        Err(e) => serde_json::json!({"ok": false, "checks": [{
                            "code": "PREFLIGHT_ERROR", "severity": "error", "passed": false,
                            "message": format!("the preflight could not run: {}", e.message),
                        }]}),
                    };
                    let recorded = db(&state, move |db| db.record_preflight(id, &asked, report));
                    if let Err(e) = recorded.await {
                        tracing::error!(job = id, error = %e.message, "could not record a job's preflight");
                    }
                    state.jobs_changed.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e.message, "could not list the jobs waiting for a preflight")
            }
        }
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            state.preflights_wanted.notified(),
        )
        .await;
    }
}

/// Runs for the life of the server: moves the running jobs along, at once when one is made
/// or a command answered, and at least every half second.
pub async fn run_jobs(state: Arc<AppState>) {
    loop {
        let timeout = state.heartbeat_timeout_ms;
        let stepped = db(&state, move |db| {
            crate::jobs::Engine::new(db, timeout).step_all()?;
            db.newest_command()
        })
        .await;
        match stepped {
            Ok(newest) => {
                state.commands_posted.send_if_modified(|seen| {
                    let moved = *seen != newest;
                    *seen = newest;
                    moved
                });
            }
            Err(e) => tracing::error!(error = %e.message, "could not step the jobs"),
        }
        state.preflights_wanted.notify_one();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            state.jobs_changed.notified(),
        )
        .await;
    }
}

fn parse_id(what: &str, id: &str) -> Result<i64, ApiError> {
    id.parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_ID).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{id:?} is not a {what} id: use a number from the list"
            ))
        })
}

/// Asks for a job (operator): 202, and the job, which runs in the background; follow it
/// with GET /api/jobs/{id}.
#[utoipa::path(post, path = "/api/jobs", tag = "jobs", request_body = JobRequest,
    responses((status = 202, body = Job), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn create_job(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Body(request): Body<JobRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    check_name("machine", request.machine())?;
    let new = request.into_new().map_err(ApiError::bad_request)?;
    let machine = new.machine.clone();
    let known = db(&state, move |db| {
        db.get_inventory::<Machine>("machine", &machine)
    })
    .await?;
    if known.is_none() {
        return Err(no_machine(&new.machine));
    }
    let job = db(&state, move |db| db.create_job(&new, &caller.name)).await?;
    state.jobs_changed.notify_one();
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Lists jobs, oldest first.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(PageQuery),
    responses((status = 200, body = Page<Job>), (status = 400, body = ApiError),
        (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<Job>>, ApiError> {
    let limit = q.limit()?;
    let after = q.after()?;
    let items = db(&state, move |db| db.list_jobs(after, limit)).await?;
    Ok(Json(page(items, limit, |j| j.id)))
}

/// One job: its state, its step and what it produced.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, minimum = 1, maximum = 9007199254740991_i64, description = "The job's id")),
    responses((status = 200, body = Job), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id("job", &id)?;
    db(&state, move |db| db.get_job(id))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "there is no job {id}: list them with GET /api/jobs"
            ))
        })
}

/// Cancels a job (operator), where that is safe: before a component was given work.
#[utoipa::path(post, path = "/api/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path, minimum = 1, maximum = 9007199254740991_i64, description = "The job's id")),
    responses((status = 200, body = Job), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)),
    security(("bearer" = [])))]
async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id("job", &id)?;
    Ok(Json(db(&state, move |db| db.cancel_job(id)).await?))
}

/// How long to wait for a command.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Seconds to wait for one, 0 to 30 (default 0: answer at once).
    #[param(minimum = 0, maximum = 30)]
    #[serde(default, deserialize_with = "crate::policy::whole_opt")]
    pub wait: Option<u32>,
    /// The ids of the commands the component is carrying out, comma-separated: not given
    /// again meanwhile, so that one slow command does not hold up the others.
    #[param(max_length = 2000, pattern = "^[0-9]{1,16}(,[0-9]{1,16})*$")]
    #[serde(default)]
    pub busy: Option<String>,
}

/// How often a component waiting for a command looks again, besides when the job engine gives
/// one out.
const COMMANDS_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// A component fetches its next command (with its component token): 200 and the command, or
/// 204 when none came within `wait` seconds. A command comes again until it is answered.
#[utoipa::path(get, path = "/api/commands", tag = "components", params(WaitQuery),
    responses((status = 200, body = Command), (status = 204, description = "No command"),
        (status = 400, body = ApiError), (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn next_command(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::ComponentCaller>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let wait = match q.wait {
        None => 0,
        Some(w @ 0..=30) => w,
        Some(w) => {
            return Err(ApiError::bad_request(format!(
                "wait {w} is out of range: wait 0 to 30 seconds"
            )));
        }
    };
    let busy: Vec<i64> = match q.busy.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) if list.len() <= 2000 => list
            .split(',')
            .map(|id| id.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "busy {list:?} is not a list of command ids: give them comma-separated"
                ))
            })?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "busy is longer than 2000 characters: a component carries out fewer commands at once",
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait as u64);
    let mut posted = state.commands_posted.subscribe();
    loop {
        // Seen before the query: a command given out after it wakes the wait below.
        posted.borrow_and_update();
        let (name, busy) = (caller.name.clone(), busy.clone());
        if let Some(command) = db(&state, move |db| db.next_command(&name, &busy)).await? {
            return Ok(Json(command).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // Woken by the job engine; a look every few seconds besides, whatever happens.
        let until = deadline.min(now + COMMANDS_RECHECK);
        let _ = tokio::time::timeout_at(until, posted.changed()).await;
    }
}

/// A component answers a command (with its component token); the first answer counts.
#[utoipa::path(post, path = "/api/commands/{id}", tag = "components", request_body = CommandResult,
    params(("id" = i64, Path, minimum = 1, maximum = 9007199254740991_i64, description = "The command's id")),
    responses((status = 204, description = "Taken"), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = [])))]
async fn answer_command(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::ComponentCaller>,
    Path(id): Path<String>,
    Body(answer): Body<CommandResult>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("command", &id)?;
    db(&state, move |db| {
        db.answer_command(&caller.name, id, &answer)
    })
    .await?;
    state.jobs_changed.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// Runs futures at once and collects their outputs in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "server",
    responses((status = 200, description = "The OpenAPI document"), (status = 401, body = ApiError)),
    security(("bearer" = [])))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Marks the variants of the tagged request bodies closed (`additionalProperties: false`),
/// as their `deny_unknown_fields` makes them: utoipa does so for structs, not for variants.
struct ClosedVariants;

impl utoipa::Modify for ClosedVariants {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::{AdditionalProperties, Schema};
        let Some(components) = doc.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::OneOf(one_of))) = components.schemas.get_mut("JobRequest") {
            for item in &mut one_of.items {
                if let RefOr::T(Schema::Object(object)) = item {
                    object.additional_properties =
                        Some(Box::new(AdditionalProperties::FreeForm(false)));
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Boomerang configuration server", description = "The control plane of Boomerang, a disaster-recovery system."),
    paths(health, openapi, list_tokens, create_token, delete_token, list_audit, list_sites,
        list_hosts, list_datastores, list_machines, get_machine, refresh_inventory, list_policies,
        get_policy, create_policy, update_policy, delete_policy, preflight, create_component,
        list_components, enroll, heartbeat, list_alerts, create_group, list_groups, list_status,
        machine_status, set_machine_policy, clear_machine_policy, create_job, list_jobs, get_job,
        cancel_job, next_command, answer_command),
    components(schemas(ApiError, Health, NewToken, TokenInfo, CreatedToken, AuditEntry, Role,
        Site, Host, Datastore, Machine, Refreshed, Policy, NewPolicy, PolicySettings,
        CreatedPolicy, UpdatedPolicy, SentPolicy, crate::jobs::LeftOut, Report, Check, Purpose, Severity, MasterTarget, ProcessServer,
        NewComponent, Enrollment, EnrollRequest, Enrolled, Heartbeat, ComponentInfo, ComponentHealth,
        Alert, Group, NewGroup, DiskReport, DiskSync, StreamReport, ReplicaReport, RecoveryReport,
        ReplicaProblemReport,
        MachineSource,
        MachineStatus, DiskStatus, ProtectionState, StatusHealth, SetPolicy, Protection, JobRequest,
        Job, JobKind, JobState, Command, CommandResult)),
    modifiers(&BearerAuth, &ClosedVariants)
)]
pub struct ApiDoc;

/// The API's routes, all behind [`authorize`].
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/openapi.json", get(openapi))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", delete(delete_token))
        .route("/api/audit", get(list_audit))
        .route("/api/sites", get(list_sites))
        .route("/api/hosts", get(list_hosts))
        .route("/api/datastores", get(list_datastores))
        .route("/api/machines", get(list_machines))
        .route("/api/machines/{name}", get(get_machine))
        .route("/api/machines/{name}/preflight", get(preflight))
        .route("/api/machines/{name}/status", get(machine_status))
        .route(
            "/api/machines/{name}/policy",
            axum::routing::put(set_machine_policy).delete(clear_machine_policy),
        )
        .route("/api/status", get(list_status))
        .route("/api/jobs", get(list_jobs).post(create_job))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/cancel", axum::routing::post(cancel_job))
        .route("/api/commands", get(next_command))
        .route("/api/commands/{id}", axum::routing::post(answer_command))
        .route(
            "/api/components",
            get(list_components).post(create_component),
        )
        .route("/api/enroll", axum::routing::post(enroll))
        .route("/api/heartbeat", axum::routing::post(heartbeat))
        .route("/api/alerts", get(list_alerts))
        .route("/api/groups", get(list_groups).post(create_group))
        .route(
            "/api/inventory/refresh",
            axum::routing::post(refresh_inventory),
        )
        .route("/api/policies", get(list_policies).post(create_policy))
        .route(
            "/api/policies/{name}",
            get(get_policy).put(update_policy).delete(delete_policy),
        )
        .fallback(|| async {
            ApiError::not_found("no such API path: the paths are in /api/openapi.json")
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}
