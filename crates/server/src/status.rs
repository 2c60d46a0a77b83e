//! A machine's protection at a glance (`GET /api/status`, `boomerang status`), put together
//! from what the components last reported:
//!
//! - its agent (the component named after the machine): the disks, and whether each is in
//!   its initial copy, in a resync, or in sync, with the log position where the last copy
//!   ended;
//! - the process servers: the last consistency mark of the machine durable at the master
//!   target (position and time of creation at the agent), and the backlog;
//! - the master targets: the recovery points of each disk replica.
//!
//! A machine is `protected` only once every disk is in sync *and* a mark made after the last
//! copy ended is durable at the master target: before that, no recovery point holds the whole
//! copy. Its RPO now is the time since the newest mark durable at the master target was made
//! at the agent: what a failover at this moment would lose at most. Marks are made every few
//! seconds whether or not the machine writes, so a healthy machine's RPO stays near that
//! interval plus the replication lag; a stalled link makes it grow, which is what the policy's
//! RPO threshold alerts on.

use serde::Serialize;
use utoipa::ToSchema;

use crate::components::{Alert, ComponentHealth, ComponentInfo, ComponentRole, DiskSync};
use crate::db::Protection;
use crate::inventory::Machine;
use crate::policy::Policy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectionState {
    /// No agent reports disks for it.
    Unprotected,
    /// Its first copy runs, or waits for its first recovery point.
    InitialSync,
    /// Changed blocks are being resent, or wait for a recovery point after the resend.
    Resync,
    /// Every disk is whole at the master target, and changes flow.
    Protected,
    /// Failed over: the machine's disks are served at the recovery site.
    FailedOver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusHealth {
    Healthy,
    /// Something needs a look (an RPO over its threshold, an active alert).
    Warning,
    /// Replication is stopped or cannot be seen (a silent agent, process server or master
    /// target).
    Critical,
}

/// A disk of a protected machine.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct DiskStatus {
    pub name: String,
    pub size_bytes: u64,
    pub sync: DiskSync,
    /// How far the initial copy is, 0 to 100 (while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_percent: Option<f64>,
    /// Recovery points of this disk at the master target.
    pub points: u32,
    /// When the newest one's mark was made (milliseconds since 1970).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_point_unix_ms: Option<i64>,
    /// The newest one's position in the machine's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_point_seq: Option<u64>,
}

/// A machine's protection now.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct MachineStatus {
    /// Its position in the inventory (for paging).
    pub id: i64,
    pub name: String,
    pub site: String,
    pub state: ProtectionState,
    pub health: StatusHealth,
    /// Why the health is not `healthy`, one sentence each.
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo_threshold_seconds: Option<u64>,
    /// Seconds since the newest mark durable at the master target was made at the agent;
    /// absent before the first one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    /// Bytes received by a process server and not yet durable at the master target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog_bytes: Option<u64>,
    /// When the newest recovery point's mark was made (milliseconds since 1970).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_point_unix_ms: Option<i64>,
    /// The newest consistency mark durable at the master target: its position in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_point_seq: Option<u64>,
    /// The components that report about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_health: Option<ComponentHealth>,
    /// Where a failover serves its disks (the failover job's result), when failed over.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub failover: Option<serde_json::Value>,
    pub process_servers: Vec<String>,
    pub master_targets: Vec<String>,
    pub disks: Vec<DiskStatus>,
}

/// What the status of every machine is made from.
pub struct Inputs<'a> {
    /// Inventory machines with their ids.
    pub machines: &'a [(i64, Machine)],
    pub protections: &'a [(Protection, Policy)],
    pub components: &'a [ComponentInfo],
    /// Active alerts.
    pub alerts: &'a [Alert],
    /// The machines failed over, with what their failover serves.
    pub failovers: &'a [(String, serde_json::Value)],
    pub now_ms: i64,
}

/// The agents of machine `name`: the one named after it, and those that say they are its
/// (an agent at the recovery site, for a reprotect).
pub fn machine_agents<'a>(
    components: &'a [ComponentInfo],
    name: &'a str,
) -> impl Iterator<Item = &'a ComponentInfo> + 'a {
    components.iter().filter(move |c| {
        c.role == ComponentRole::Agent
            && match c.last.as_ref().and_then(|b| b.machine.as_deref()) {
                Some(m) => m == name,
                None => c.name == name,
            }
    })
}

/// The agent that serves machine `name`'s disks: of its agents, one that is not standing by
/// (one whose disks still take writes first, then a healthy one), or else any.
pub fn machine_agent<'a>(
    components: &'a [ComponentInfo],
    name: &'a str,
) -> Option<&'a ComponentInfo> {
    let serving = |c: &&ComponentInfo| c.last.as_ref().is_some_and(|b| b.standby != Some(true));
    machine_agents(components, name)
        .filter(serving)
        .min_by_key(|c| {
            let drained = c.last.as_ref().is_some_and(|b| b.drained == Some(true));
            (drained, c.health != ComponentHealth::Healthy)
        })
        .or_else(|| machine_agents(components, name).next())
}

/// The status of machine `machine` (with inventory id `id`).
pub fn of(id: i64, machine: &Machine, inputs: &Inputs<'_>) -> MachineStatus {
    let name = machine.name.as_str();
    let mut notes = Vec::new();
    let mut health = StatusHealth::Healthy;
    let mut worse = |h: StatusHealth, note: String, notes: &mut Vec<String>| {
        health = health.max(h);
        notes.push(note);
    };
    let protection = inputs
        .protections
        .iter()
        .find(|(p, _)| p.machine == name)
        .map(|(_, policy)| policy);
    let agent = machine_agent(inputs.components, name);
    let reported = agent.and_then(|a| a.last.as_ref());
    let reported_disks = reported.and_then(|b| b.disks.clone()).unwrap_or_default();
    let synced_through = reported.and_then(|b| b.synced_through_seq).unwrap_or(0);

    // What the process servers and master targets say of the machine.
    let mut backlog = None;
    let mut last_mark: Option<(u64, Option<i64>)> = None;
    let mut process_servers = Vec::new();
    let mut master_targets = Vec::new();
    let mut replicas = Vec::new();
    for c in inputs.components {
        let Some(beat) = &c.last else { continue };
        let silent = c.health == ComponentHealth::Unhealthy;
        for s in beat.streams.iter().flatten().filter(|s| s.machine == name) {
            process_servers.push(c.name.clone());
            if silent {
                worse(
                    StatusHealth::Critical,
                    format!(
                        "process server {:?} is unhealthy: replication through it cannot be seen; check that it runs",
                        c.name
                    ),
                    &mut notes,
                );
            } else {
                *backlog.get_or_insert(0) += s.backlog_bytes;
            }
            // A silent process server's last word may be from before the machine moved.
            if let Some(seq) = s.last_mark_seq
                && !silent
                && s.connected != Some(false)
                && last_mark.is_none_or(|(l, _)| seq > l)
            {
                last_mark = Some((seq, s.last_mark_unix_ms));
            }
        }
        let mine: Vec<_> = beat
            .replicas
            .iter()
            .flatten()
            .filter(|r| r.machine == name)
            .collect();
        if !mine.is_empty() {
            master_targets.push(c.name.clone());
            if silent {
                worse(
                    StatusHealth::Critical,
                    format!(
                        "master target {:?} is unhealthy: its recovery points cannot be seen; check that it runs",
                        c.name
                    ),
                    &mut notes,
                );
            }
        }
        for r in mine {
            if let Some(seq) = r.latest_point_seq
                && last_mark.is_none_or(|(l, _)| seq > l)
            {
                last_mark = Some((seq, r.latest_point_unix_ms));
            }
            replicas.push(r.clone());
        }
    }

    let disks: Vec<DiskStatus> = reported_disks
        .iter()
        .map(|d| {
            let of_disk: Vec<_> = replicas.iter().filter(|r| r.disk == d.name).collect();
            DiskStatus {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                sync: d.sync,
                sync_percent: d.copied_bytes.map(|c| {
                    if d.size_bytes == 0 {
                        100.0
                    } else {
                        (c.min(d.size_bytes) as f64 * 100.0 / d.size_bytes as f64 * 10.0).floor()
                            / 10.0
                    }
                }),
                points: of_disk.iter().map(|r| r.points).max().unwrap_or(0),
                latest_point_unix_ms: of_disk.iter().filter_map(|r| r.latest_point_unix_ms).max(),
                latest_point_seq: of_disk.iter().filter_map(|r| r.latest_point_seq).max(),
            }
        })
        .collect();

    let whole = last_mark.is_some_and(|(seq, _)| seq > synced_through);
    let mut failover = inputs
        .failovers
        .iter()
        .find(|(m, _)| m == name)
        .map(|(_, r)| r.clone());
    // How far the failed-over disks are copied into whole disks, from the master target.
    if let Some(serde_json::Value::Object(f)) = &mut failover {
        let key = format!("failovers/{name}");
        let reported: Vec<_> = inputs
            .components
            .iter()
            .filter_map(|c| c.last.as_ref())
            .flat_map(|b| b.recoveries.iter().flatten())
            .filter(|r| r.key == key)
            .collect();
        let (copied, size) = reported.iter().fold((0u64, 0u64), |(c, s), r| {
            (c + r.copied_bytes, s + r.size_bytes)
        });
        // Where the master target serves the disks now (after a restart, maybe elsewhere).
        if let Some(address) = reported.iter().find_map(|r| r.address.clone()) {
            f.insert("address".into(), serde_json::json!(address));
        }
        if size > 0 {
            let percent = (copied as f64 * 1000.0 / size as f64).floor() / 10.0;
            f.insert("hydrated_percent".into(), serde_json::json!(percent));
        }
    }
    let state = if failover.is_some() {
        ProtectionState::FailedOver
    } else if disks.is_empty() {
        ProtectionState::Unprotected
    } else if disks.iter().any(|d| d.sync == DiskSync::InitialSync) {
        ProtectionState::InitialSync
    } else if disks.iter().any(|d| d.sync == DiskSync::Resync) {
        ProtectionState::Resync
    } else if whole {
        ProtectionState::Protected
    } else if last_mark.is_some() {
        // Points from before a resend: the resend's records are still on their way.
        ProtectionState::Resync
    } else {
        ProtectionState::InitialSync
    };

    let latest_point_unix_ms = last_mark.and_then(|(_, t)| t);
    let rpo_seconds = latest_point_unix_ms.map(|t| (inputs.now_ms - t).max(0) as f64 / 1000.0);

    if failover
        .as_ref()
        .is_some_and(|f| f["released"] == serde_json::json!(true))
    {
        worse(
            StatusHealth::Critical,
            format!(
                "the failed-over disks of {name:?} are not served: a reprotect took them from the master target and no agent serves them yet; if it ended, run reprotect again"
            ),
            &mut notes,
        );
    } else if failover
        .as_ref()
        .is_some_and(|f| f["serving"] == serde_json::json!(false))
    {
        worse(
            StatusHealth::Critical,
            format!(
                "the failed-over disks of {name:?} are not served: a change of point failed after stopping them; run change-point again"
            ),
            &mut notes,
        );
    }
    match agent {
        // Failed over: the source's agent is expected to be stopped or gone.
        _ if failover.is_some() => {}
        None if protection.is_some() => worse(
            StatusHealth::Warning,
            format!(
                "machine {name:?} has a policy but no agent: enrol an agent named {name:?} and start it"
            ),
            &mut notes,
        ),
        Some(a) if a.health == ComponentHealth::Unhealthy => worse(
            StatusHealth::Critical,
            format!(
                "agent {name:?} is unhealthy: its writes may not be captured or sent; check that it runs and reaches the configuration server"
            ),
            &mut notes,
        ),
        _ => {}
    }
    if let (Some(policy), Some(rpo)) = (protection, rpo_seconds)
        && matches!(state, ProtectionState::Protected | ProtectionState::Resync)
        && rpo > policy.rpo_threshold_seconds as f64
    {
        worse(
            StatusHealth::Warning,
            format!(
                "RPO {rpo:.0} s is over the threshold of policy {:?} ({} s): check the agent, the process server's backlog and the master target",
                policy.name, policy.rpo_threshold_seconds
            ),
            &mut notes,
        );
    }
    let prefix = format!("machine/{name}");
    for a in inputs
        .alerts
        .iter()
        .filter(|a| a.object == prefix || a.object.starts_with(&format!("{prefix}/")))
    {
        if a.kind != crate::api::RPO_THRESHOLD {
            worse(StatusHealth::Warning, a.message.clone(), &mut notes);
        }
    }
    process_servers.sort();
    process_servers.dedup();
    master_targets.sort();
    master_targets.dedup();
    MachineStatus {
        id,
        name: name.to_string(),
        site: machine.site.clone(),
        state,
        health,
        notes,
        policy: protection.map(|p| p.name.clone()),
        rpo_threshold_seconds: protection.map(|p| p.rpo_threshold_seconds),
        rpo_seconds,
        backlog_bytes: backlog,
        latest_point_unix_ms,
        latest_point_seq: last_mark.map(|(seq, _)| seq),
        agent: agent.map(|a| a.name.clone()),
        agent_health: agent.map(|a| a.health),
        failover,
        process_servers,
        master_targets,
        disks,
    }
}

/// The status of every machine of the inventory, in inventory order.
pub fn all(inputs: &Inputs<'_>) -> Vec<MachineStatus> {
    inputs
        .machines
        .iter()
        .map(|(id, m)| of(*id, m, inputs))
        .collect()
}

#[cfg(test)]
mod tests;
