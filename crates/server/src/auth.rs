//! Bearer tokens and roles. Every request under `/api` is authorized here, before any handler:
//! no token or an unknown one is 401, too weak a role 403, and both are audited, as is every
//! request that changes something. Heartbeats and commands are the exception: a component's
//! own traffic, every few seconds, opened by its component token and recorded on the
//! component (and its commands) rather than in the audit log.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, AppState};

/// What a token may do; each role may do what the ones before it may.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but tokens and the audit log.
    Viewer,
    /// Also runs jobs and refreshes the inventory.
    Operator,
    /// Everything: configuration (policies, sites, components), tokens and the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The role a request needs: reading takes a viewer (tokens and the audit log an admin),
/// running jobs and refreshing the inventory an operator, any other change an admin.
pub fn required(method: &Method, path: &str) -> Role {
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    if under("/api/tokens") || under("/api/audit") {
        Role::Admin
    } else if method == Method::GET || method == Method::HEAD {
        Role::Viewer
    } else if under("/api/jobs") || path == "/api/inventory/refresh" {
        Role::Operator
    } else {
        Role::Admin
    }
}

/// The request's bearer token.
fn bearer(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// The holder of bearer `token`, by `find` (none without a token, or for an unknown one); a
/// database failure is the answer to give.
async fn lookup<T: Send + 'static>(
    state: &AppState,
    token: Option<String>,
    find: fn(&crate::db::Db, &str) -> Result<Option<T>, crate::db::DbError>,
) -> Result<Option<T>, Response> {
    let Some(token) = token else {
        return Ok(None);
    };
    let db = state.db.clone();
    match tokio::task::spawn_blocking(move || find(&db, &token)).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(e)) => Err(ApiError::from(e).into_response()),
        Err(e) => Err(ApiError::internal(e.to_string()).into_response()),
    }
}

/// The most body bytes read from a denied request before it is answered.
const DRAIN_LIMIT: usize = 2 << 20;

/// Reads a denied request's body (up to [`DRAIN_LIMIT`]) before the answer goes: a client
/// still sending it would otherwise see the connection reset instead of the 401 or 403.
async fn drain(request: Request) {
    let _ = axum::body::to_bytes(request.into_body(), DRAIN_LIMIT).await;
}

/// Heartbeats and commands: only a component's own token opens them; the handler learns which
/// component.
async fn component(
    state: Arc<AppState>,
    mut request: Request,
    next: Next,
    action: &str,
) -> Response {
    let found = match lookup(&state, bearer(&request), |db, t| db.find_component(t)).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Some(component) = found else {
        state.audit("anonymous", action, "denied").await;
        drain(request).await;
        return ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "heartbeats need the component token that enrolment gave (`Authorization: Bearer <component_token>`)",
        )
        .into_response();
    };
    request.extensions_mut().insert(ComponentCaller {
        name: component.name,
        role: component.role,
        site: component.site,
        machine: component.machine,
    });
    next.run(request).await
}

/// The component sending a heartbeat.
#[derive(Clone, Debug)]
pub struct ComponentCaller {
    pub name: String,
    pub role: crate::components::ComponentRole,
    pub site: String,
    /// The machine it was enrolled for (an agent standing by at a recovery site).
    pub machine: Option<String>,
}

/// Who is calling: the token's name and role, for handlers.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The middleware: authenticates, authorizes and audits.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    // The audit keeps at most 200 characters of a path: a denied request must not fill the
    // disk with whatever an anonymous client sends.
    let shown: String = path.chars().take(200).collect();
    let action = format!("{method} {shown}");
    // Enrolment carries its one-time token in the body: the handler checks and audits it.
    if path == "/api/enroll" {
        return next.run(request).await;
    }
    if path == "/api/heartbeat" || path == "/api/commands" || path.starts_with("/api/commands/") {
        return component(state, request, next, &action).await;
    }
    let found = match lookup(&state, bearer(&request), |db, t| db.find_token(t)).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Some(token) = found else {
        state.audit("anonymous", &action, "denied").await;
        drain(request).await;
        return ApiError::unauthorized().into_response();
    };
    let need = required(&method, &path);
    if token.role < need {
        state.audit(&token.name, &action, "denied").await;
        drain(request).await;
        return ApiError::forbidden(token.role, need).into_response();
    }
    request.extensions_mut().insert(Caller {
        name: token.name.clone(),
        role: token.role,
    });
    let response = next.run(request).await;
    if method != Method::GET && method != Method::HEAD {
        let outcome = if response.status().is_success() {
            "ok"
        } else {
            "failed"
        };
        state.audit(&token.name, &action, outcome).await;
    }
    response
}
