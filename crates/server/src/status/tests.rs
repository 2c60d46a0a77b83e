use super::*;
use crate::components::{DiskReport, Heartbeat, ReplicaReport, StreamReport};
use crate::policy::PolicyKind;

const NOW: i64 = 1_000_000_000;

fn machine() -> Machine {
    toml::from_str(
        r#"
        name = "web01"
        site = "site-a"
        os = { family = "linux", version = "9.2" }
        tools = "running"
        "#,
    )
    .unwrap()
}

fn policy(rpo_threshold_seconds: u64) -> (Protection, Policy) {
    (
        Protection {
            machine: "web01".into(),
            policy: "gold".into(),
            since_unix_ms: 0,
        },
        Policy {
            id: 1,
            name: "gold".into(),
            kind: PolicyKind::Replication,
            rpo_threshold_seconds,
            retention_seconds: 86400,
            app_consistent_seconds: 3600,
            failback_of: None,
            bound_to: None,
            editable: true,
        },
    )
}

fn beat() -> Heartbeat {
    Heartbeat {
        healthy: true,
        version: "0".into(),
        ..Heartbeat::default()
    }
}

fn component(
    name: &str,
    role: ComponentRole,
    health: ComponentHealth,
    last: Heartbeat,
) -> ComponentInfo {
    ComponentInfo {
        name: name.into(),
        role,
        site: "site-a".into(),
        health,
        last_heartbeat_unix_ms: Some(NOW),
        last: Some(last),
    }
}

/// An agent reporting disk `d0` of 1 MiB in state `sync`, its last copy ending at `synced`.
fn agent(
    sync: DiskSync,
    copied: Option<u64>,
    synced: u64,
    health: ComponentHealth,
) -> ComponentInfo {
    component(
        "web01",
        ComponentRole::Agent,
        health,
        Heartbeat {
            disks: Some(vec![DiskReport {
                name: "d0".into(),
                size_bytes: 1 << 20,
                sync,
                copied_bytes: copied,
            }]),
            synced_through_seq: Some(synced),
            ..beat()
        },
    )
}

/// A process server whose stream of web01 has its last mark at `seq`, made at `at`.
fn ps(seq: Option<u64>, at: i64, health: ComponentHealth) -> ComponentInfo {
    component(
        "ps1",
        ComponentRole::ProcessServer,
        health,
        Heartbeat {
            streams: Some(vec![StreamReport {
                machine: "web01".into(),
                backlog_bytes: 4096,
                lag_ms: 10,
                last_mark_seq: seq,
                last_mark_unix_ms: seq.map(|_| at),
                connected: Some(true),
            }]),
            ..beat()
        },
    )
}

fn mt(points: u32, seq: u64, at: i64) -> ComponentInfo {
    component(
        "mt1",
        ComponentRole::MasterTarget,
        ComponentHealth::Healthy,
        Heartbeat {
            replicas: Some(vec![ReplicaReport {
                machine: "web01".into(),
                disk: "d0".into(),
                points,
                latest_point_seq: Some(seq),
                latest_point_unix_ms: Some(at),
            }]),
            ..beat()
        },
    )
}

fn status(
    protections: &[(Protection, Policy)],
    components: &[ComponentInfo],
    alerts: &[Alert],
) -> MachineStatus {
    let machines = [(7, machine())];
    all(&Inputs {
        machines: &machines,
        protections,
        components,
        alerts,
        failovers: &[],
        now_ms: NOW,
    })
    .remove(0)
}

#[test]
fn a_machine_without_an_agent_is_unprotected_and_a_policy_without_one_is_a_warning() {
    let s = status(&[], &[], &[]);
    assert_eq!(s.state, ProtectionState::Unprotected);
    assert_eq!(s.health, StatusHealth::Healthy);
    assert_eq!(s.id, 7);
    let s = status(&[policy(30)], &[], &[]);
    assert_eq!(s.state, ProtectionState::Unprotected);
    assert_eq!(s.health, StatusHealth::Warning);
    assert!(s.notes[0].contains("no agent"), "{:?}", s.notes);
    assert_eq!(s.policy.as_deref(), Some("gold"));
}

#[test]
fn the_initial_copy_shows_its_progress_and_is_not_protected() {
    let s = status(
        &[],
        &[agent(
            DiskSync::InitialSync,
            Some(1 << 19),
            0,
            ComponentHealth::Healthy,
        )],
        &[],
    );
    assert_eq!(s.state, ProtectionState::InitialSync);
    assert_eq!(s.disks[0].sync_percent, Some(50.0));
    assert_eq!(s.rpo_seconds, None);
}

#[test]
fn protected_only_once_a_mark_after_the_copy_is_durable_at_the_master_target() {
    let copied = |mark: Option<u64>| {
        status(
            &[],
            &[
                agent(DiskSync::InSync, None, 100, ComponentHealth::Healthy),
                ps(mark, NOW - 4000, ComponentHealth::Healthy),
            ],
            &[],
        )
    };
    // No mark yet: the copy is still on its way.
    assert_eq!(copied(None).state, ProtectionState::InitialSync);
    // A mark from before the copy ended (an older point, then a resync).
    assert_eq!(copied(Some(90)).state, ProtectionState::Resync);
    let s = copied(Some(101));
    assert_eq!(s.state, ProtectionState::Protected);
    assert_eq!(s.rpo_seconds, Some(4.0));
    assert_eq!(s.backlog_bytes, Some(4096));
    assert_eq!(s.process_servers, ["ps1"]);
    assert_eq!(s.health, StatusHealth::Healthy);
    // A resync in progress is a resync, whatever the marks.
    let s = status(
        &[],
        &[
            agent(DiskSync::Resync, None, 0, ComponentHealth::Healthy),
            ps(Some(200), NOW - 1000, ComponentHealth::Healthy),
        ],
        &[],
    );
    assert_eq!(s.state, ProtectionState::Resync);
}

#[test]
fn the_master_target_gives_the_points_and_the_newest_mark_counts() {
    let s = status(
        &[],
        &[
            agent(DiskSync::InSync, None, 0, ComponentHealth::Healthy),
            ps(Some(50), NOW - 9000, ComponentHealth::Healthy),
            mt(12, 60, NOW - 2500),
        ],
        &[],
    );
    assert_eq!(s.state, ProtectionState::Protected);
    assert_eq!(s.disks[0].points, 12);
    assert_eq!(s.disks[0].latest_point_unix_ms, Some(NOW - 2500));
    assert_eq!(s.latest_point_unix_ms, Some(NOW - 2500));
    assert_eq!(s.rpo_seconds, Some(2.5));
    assert_eq!(s.master_targets, ["mt1"]);
}

#[test]
fn an_rpo_over_the_threshold_is_a_warning_and_a_silent_component_critical() {
    let components = |agent_health, ps_health| {
        [
            agent(DiskSync::InSync, None, 0, agent_health),
            ps(Some(5), NOW - 45_000, ps_health),
        ]
    };
    let healthy = components(ComponentHealth::Healthy, ComponentHealth::Healthy);
    let s = status(&[policy(60)], &healthy, &[]);
    assert_eq!(s.health, StatusHealth::Healthy, "{:?}", s.notes);
    let s = status(&[policy(30)], &healthy, &[]);
    assert_eq!(s.health, StatusHealth::Warning);
    assert!(
        s.notes[0].contains("RPO 45 s") && s.notes[0].contains("gold"),
        "{:?}",
        s.notes
    );
    let s = status(
        &[policy(60)],
        &components(ComponentHealth::Unhealthy, ComponentHealth::Healthy),
        &[],
    );
    assert_eq!(s.health, StatusHealth::Critical);
    assert!(s.notes[0].contains("agent \"web01\""), "{:?}", s.notes);
    let s = status(
        &[policy(60)],
        &components(ComponentHealth::Healthy, ComponentHealth::Unhealthy),
        &[],
    );
    assert_eq!(s.health, StatusHealth::Critical);
    assert!(
        s.notes[0].contains("process server \"ps1\""),
        "{:?}",
        s.notes
    );
}

#[test]
fn an_active_alert_about_the_machine_is_a_warning() {
    let alert = Alert {
        id: 1,
        raised_unix_ms: NOW,
        kind: "preflight-failed".into(),
        object: "machine/web01/failback".into(),
        message: "machine \"web01\" is not ready for failback".into(),
        resolved_unix_ms: None,
    };
    let other = Alert {
        object: "machine/web011/failback".into(),
        ..alert.clone()
    };
    assert_eq!(status(&[], &[], &[other]).health, StatusHealth::Healthy);
    let s = status(&[], &[], &[alert]);
    assert_eq!(s.health, StatusHealth::Warning);
    assert!(s.notes[0].contains("not ready"));
}

#[test]
fn the_agent_whose_disks_take_writes_serves_the_machine_before_a_drained_one() {
    let agent = |name: &str, health: ComponentHealth, drained: bool| ComponentInfo {
        name: name.into(),
        role: ComponentRole::Agent,
        site: "site-a".into(),
        health,
        last_heartbeat_unix_ms: Some(0),
        last: Some(Heartbeat {
            healthy: true,
            version: "0".into(),
            machine: Some("web01".into()),
            standby: Some(false),
            drained: drained.then_some(true),
            ..Heartbeat::default()
        }),
    };
    // After a failback: the recovery site's agent is drained, the one at home restarting.
    let both = [
        agent("web01-b", ComponentHealth::Healthy, true),
        agent("web01", ComponentHealth::Unhealthy, false),
    ];
    assert_eq!(machine_agent(&both, "web01").unwrap().name, "web01");
    // Two that take writes: the healthy one.
    let both = [
        agent("web01-b", ComponentHealth::Unhealthy, false),
        agent("web01", ComponentHealth::Healthy, false),
    ];
    assert_eq!(machine_agent(&both, "web01").unwrap().name, "web01");
    // Another machine's agent is none of web01's.
    assert!(machine_agent(&both, "db01").is_none());
}
