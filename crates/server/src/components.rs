//! Components (DESIGN 4): agents, process servers and master targets. An admin names one and
//! gets a one-time enrolment token; the component trades it (`POST /api/enroll`) for a
//! certificate from the site's CA and a token of its own, then sends heartbeats (health,
//! version, free space, attached disks). One that falls silent for longer than
//! `heartbeat_timeout_seconds` is unhealthy, and raises an alert until it is heard again.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentRole {
    Agent,
    ProcessServer,
    MasterTarget,
}

impl ComponentRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentRole::Agent => "agent",
            ComponentRole::ProcessServer => "process-server",
            ComponentRole::MasterTarget => "master-target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(ComponentRole::Agent),
            "process-server" => Some(ComponentRole::ProcessServer),
            "master-target" => Some(ComponentRole::MasterTarget),
            _ => None,
        }
    }

    pub fn wire(self) -> boomerang_wire::Role {
        match self {
            ComponentRole::Agent => boomerang_wire::Role::Agent,
            ComponentRole::ProcessServer => boomerang_wire::Role::ProcessServer,
            ComponentRole::MasterTarget => boomerang_wire::Role::MasterTarget,
        }
    }
}

/// A component to enrol.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewComponent {
    /// 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    pub role: ComponentRole,
    /// The site it runs at.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub site: String,
    /// Addresses (DNS names or IPs) its certificate is also good for, for a server.
    #[serde(default)]
    pub hosts: Vec<HostName>,
}

/// A DNS name or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")]
pub struct HostName(pub String);

impl HostName {
    /// Whether the name is one a certificate can carry (what the pattern says).
    pub fn valid(&self) -> bool {
        let s = &self.0;
        !s.is_empty()
            && s.len() <= 253
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-'))
            && !s.trim_end_matches('.').ends_with(".boomerang.internal")
    }
}

/// The answer to [`NewComponent`]: the one-time token to enrol with.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Enrollment {
    pub name: String,
    pub role: ComponentRole,
    /// Give it to the component, once: `POST /api/enroll`.
    pub enrollment_token: String,
    pub expires_unix_ms: i64,
}

/// What a component sends to enrol.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub enrollment_token: String,
}

/// What an enrolled component gets: its certificate and key (PEM), the CA, and its token.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Enrolled {
    pub name: String,
    pub role: ComponentRole,
    pub certificate: String,
    pub key: String,
    pub ca: String,
    /// The bearer token for heartbeats.
    pub component_token: String,
}

/// A heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The component's own verdict.
    pub healthy: bool,
    pub version: String,
    /// Free bytes of its cache (process server) or retention volume (master target).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub free_bytes: Option<u64>,
    /// Disks attached (master target).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 4294967295_i64)]
    pub attached_disks: Option<u32>,
    /// Whether its master target answered (process server), probed for this heartbeat.
    #[serde(default)]
    pub master_target_reachable: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentHealth {
    /// Not enrolled yet.
    Pending,
    /// Enrolled, no heartbeat yet.
    NeverSeen,
    Healthy,
    Unhealthy,
}

/// A component as listed.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ComponentInfo {
    pub name: String,
    pub role: ComponentRole,
    pub site: String,
    pub health: ComponentHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_unix_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Heartbeat>,
}

/// An alert.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Alert {
    pub id: i64,
    pub raised_unix_ms: i64,
    /// `component-unhealthy`, ...
    pub kind: String,
    /// What it is about, such as `component/ps1`.
    pub object: String,
    pub message: String,
    /// When it cleared; absent while it is active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_unix_ms: Option<i64>,
}

/// Health at `now_ms`: from the last heartbeat, or from enrolment when none came yet.
pub fn health(
    enrolled_ms: Option<i64>,
    last_ms: Option<i64>,
    healthy: bool,
    now_ms: i64,
    timeout_ms: i64,
) -> ComponentHealth {
    match (enrolled_ms, last_ms) {
        (None, _) => ComponentHealth::Pending,
        (Some(e), None) if now_ms - e > timeout_ms => ComponentHealth::Unhealthy,
        (Some(_), None) => ComponentHealth::NeverSeen,
        (Some(_), Some(t)) if now_ms - t > timeout_ms || !healthy => ComponentHealth::Unhealthy,
        (Some(_), Some(_)) => ComponentHealth::Healthy,
    }
}
