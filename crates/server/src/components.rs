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
    /// For an agent standing by at a recovery site: the machine whose failed-over disks it
    /// serves once reprotected (its certificate names it that machine's agent too).
    #[serde(default)]
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub machine: Option<String>,
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    /// The operating system of the machine it protects (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<crate::inventory::Os>,
    /// The disks it protects and how far their copy is (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1024)]
    pub disks: Option<Vec<DiskReport>>,
    /// The machine's write-log position where its last copy or resync ended (agent): a mark
    /// after it, durable at the master target, means the replica is whole. 0 when no copy
    /// ran since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub synced_through_seq: Option<u64>,
    /// How many bytes a second the machine wrote since the previous heartbeat (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub write_bytes_per_second: Option<u64>,
    /// The most bytes a second it forwards (process server, `--max-rate`); absent when
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub max_rate_bytes_per_second: Option<u64>,
    /// The machines streaming through it (process server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1024)]
    pub streams: Option<Vec<StreamReport>>,
    /// The disk replicas it keeps (master target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1024)]
    pub replicas: Option<Vec<ReplicaReport>>,
    /// The replicas that make no recovery point now, and why (master target): their store
    /// does not answer, their volume is full, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1024)]
    pub replica_problems: Option<Vec<ReplicaProblemReport>>,
    /// Where it keeps its replica stores, when not on its retention volume (master target):
    /// `azure://container/prefix` or a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub store_root: Option<String>,
    /// The disks it serves at a recovery point, and how far each is copied into its target
    /// (master target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1024)]
    pub recoveries: Option<Vec<RecoveryReport>>,
    /// The machine it is the agent of (agent): an agent at the recovery site, standing by for
    /// a reprotect, is the machine's too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub machine: Option<String>,
    /// It serves no disk: it waits for the configuration server to attach some (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<bool>,
    /// Its disks take no more writes: the machine was failed over (or back) from there
    /// (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<bool>,
    /// The address of the process server it ships to, or would once attached (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub process_server: Option<String>,
    /// Whether a TCP connection from the machine to that process server succeeded, probed
    /// once a heartbeat interval (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server_reachable: Option<bool>,
    /// Whether it ships its disks' writes to a process server (agent); disks served but not
    /// replicated (after a failback, until the reprotect) are not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicating: Option<bool>,
}

/// A disk a master target serves at a recovery point (a failover or a test failover).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryReport {
    /// `failovers/<machine>` or `test-failovers/job-<id>`.
    #[schema(max_length = 128)]
    pub key: String,
    #[schema(min_length = 1, max_length = 63)]
    pub machine: String,
    #[schema(min_length = 1, max_length = 64)]
    pub disk: String,
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub copied_bytes: u64,
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub size_bytes: u64,
    /// Where it is served (NBD, `host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub address: Option<String>,
}

/// The most items a heartbeat's lists may hold.
pub const MAX_REPORTED: usize = 1024;

/// Where a protected disk's copy stands, as its agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSync {
    /// Its first full copy runs.
    InitialSync,
    /// Blocks changed during an outage (or a machine crash) are being resent.
    Resync,
    /// Every change goes through the write log.
    InSync,
}

/// A protected disk, reported by its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub size_bytes: u64,
    pub sync: DiskSync,
    /// Bytes of the initial copy done (while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub copied_bytes: Option<u64>,
}

/// A machine's stream through a process server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamReport {
    #[schema(min_length = 1, max_length = 63)]
    pub machine: String,
    /// Bytes received and not yet durable at the master target.
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub backlog_bytes: u64,
    /// How long the oldest of them has waited, in milliseconds.
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub lag_ms: u64,
    /// The last consistency mark durable at the master target: its log position...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub last_mark_seq: Option<u64>,
    /// ... and when the agent made it (milliseconds since 1970).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub last_mark_unix_ms: Option<i64>,
    /// Whether the machine's agent is connected and streaming now. The marks of a stream
    /// no agent sends any more (the machine moved to another site) say nothing of its
    /// replica now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
}

/// A disk replica at a master target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReport {
    #[schema(min_length = 1, max_length = 63)]
    pub machine: String,
    #[schema(min_length = 1, max_length = 64)]
    pub disk: String,
    /// Recovery points it can restore the disk to.
    #[schema(minimum = 0, maximum = 4294967295_i64)]
    pub points: u32,
    /// The newest one: its log position...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub latest_point_seq: Option<u64>,
    /// ... and when the agent made its mark (milliseconds since 1970).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub latest_point_unix_ms: Option<i64>,
}

/// A replica whose master target cannot make recovery points now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaProblemReport {
    #[schema(min_length = 1, max_length = 63)]
    pub machine: String,
    /// What failed, as a sentence.
    #[schema(max_length = 4096)]
    pub error: String,
    /// Since when (milliseconds since 1970).
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub since_unix_ms: i64,
    /// Retrying will not mend it (refused credentials or key, data failing its checks).
    #[serde(default)]
    pub lasting: bool,
    /// It is about every store the master target keeps (credentials, container, key file),
    /// not this replica's alone.
    #[serde(default)]
    pub whole_store: bool,
}

impl Heartbeat {
    /// Checks what a component of `role` may report: each list belongs to one role, holds at
    /// most [`MAX_REPORTED`] items, and names machines and disks validly.
    pub fn check(&self, role: ComponentRole) -> Result<(), String> {
        let own = |what: &str, present: bool, by: ComponentRole| {
            if present && role != by {
                Err(format!(
                    "a {} reports no {what}: only a {} does",
                    role.as_str(),
                    by.as_str()
                ))
            } else {
                Ok(())
            }
        };
        own("os", self.os.is_some(), ComponentRole::Agent)?;
        own("machine", self.machine.is_some(), ComponentRole::Agent)?;
        own("standby", self.standby.is_some(), ComponentRole::Agent)?;
        own("drained", self.drained.is_some(), ComponentRole::Agent)?;
        own(
            "process_server",
            self.process_server.is_some(),
            ComponentRole::Agent,
        )?;
        own(
            "process_server_reachable",
            self.process_server_reachable.is_some(),
            ComponentRole::Agent,
        )?;
        if self.process_server.as_ref().is_some_and(|a| a.len() > 256) {
            return Err("a process server address is at most 256 bytes".into());
        }
        own(
            "replicating",
            self.replicating.is_some(),
            ComponentRole::Agent,
        )?;
        own("disks", self.disks.is_some(), ComponentRole::Agent)?;
        own(
            "synced_through_seq",
            self.synced_through_seq.is_some(),
            ComponentRole::Agent,
        )?;
        own(
            "write_bytes_per_second",
            self.write_bytes_per_second.is_some(),
            ComponentRole::Agent,
        )?;
        own(
            "streams",
            self.streams.is_some(),
            ComponentRole::ProcessServer,
        )?;
        own(
            "max_rate_bytes_per_second",
            self.max_rate_bytes_per_second.is_some(),
            ComponentRole::ProcessServer,
        )?;
        own(
            "replicas",
            self.replicas.is_some(),
            ComponentRole::MasterTarget,
        )?;
        own(
            "recoveries",
            self.recoveries.is_some(),
            ComponentRole::MasterTarget,
        )?;
        own(
            "replica_problems",
            self.replica_problems.is_some(),
            ComponentRole::MasterTarget,
        )?;
        own(
            "store_root",
            self.store_root.is_some(),
            ComponentRole::MasterTarget,
        )?;
        if self.store_root.as_ref().is_some_and(|r| r.len() > 1024) {
            return Err("a store root is at most 1024 bytes".into());
        }
        let machine = |m: &str| {
            if crate::inventory::valid_name(m) {
                Ok(())
            } else {
                Err(format!("{m:?} is not a machine name"))
            }
        };
        let disk = |d: &str| {
            boomerang_core::DiskName::new(d)
                .map(|_| ())
                .map_err(|_| format!("{d:?} is not a disk name"))
        };
        let lens = [
            self.disks.as_ref().map_or(0, Vec::len),
            self.streams.as_ref().map_or(0, Vec::len),
            self.replicas.as_ref().map_or(0, Vec::len),
            self.recoveries.as_ref().map_or(0, Vec::len),
            self.replica_problems.as_ref().map_or(0, Vec::len),
        ];
        if lens.iter().any(|&n| n > MAX_REPORTED) {
            return Err(format!(
                "a heartbeat lists at most {MAX_REPORTED} disks, streams or replicas"
            ));
        }
        for d in self.disks.iter().flatten() {
            disk(&d.name)?;
        }
        for s in self.streams.iter().flatten() {
            machine(&s.machine)?;
        }
        for r in self.replicas.iter().flatten() {
            machine(&r.machine)?;
            disk(&r.disk)?;
        }
        for r in self.recoveries.iter().flatten() {
            machine(&r.machine)?;
            disk(&r.disk)?;
        }
        for p in self.replica_problems.iter().flatten() {
            machine(&p.machine)?;
            if p.error.len() > 4096 {
                return Err(format!(
                    "the problem reported of {:?} is over 4096 bytes",
                    p.machine
                ));
            }
        }
        Ok(())
    }
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
