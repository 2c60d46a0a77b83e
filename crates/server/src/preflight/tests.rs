//! Each rule: an inventory that violates it, against one where every rule passes.

use super::*;
use crate::inventory::{Controller, Inventory, Os, OsFamily};

/// web01 failed over to site-b; a process server there, a master target at site-a.
fn good() -> Inventory {
    let inv = r#"
[[site]]
name = "site-a"
kind = "local"
[[site]]
name = "site-b"
kind = "local"
[[host]]
name = "esx-a1"
site = "site-a"
[[datastore]]
name = "ds-a1"
host = "esx-a1"
type = "VMFS"
[[datastore]]
name = "nfs-a1"
host = "esx-a1"
type = "NFS"
[[machine]]
name = "web01"
site = "site-b"
os = { family = "linux", version = "9.2" }
tools = "running"
disks = [{ name = "sda", size_bytes = 1024, uuid = "u-1" }, { name = "sdb", size_bytes = 1024, uuid = "u-2" }]
[[machine]]
name = "mt-vm"
site = "site-a"
host = "esx-a1"
os = { family = "linux", version = "9.10" }
tools = "running"
config = { "disk.EnableUUID" = "TRUE" }
controllers = [{ name = "scsi0", kind = "lsi-logic" }]
[[master_target]]
name = "mt1"
site = "site-a"
machine = "mt-vm"
address = "10.0.0.9:9443"
attached_disks = 10
retention = { path = "/mnt/retention", filesystem = "ext4", capacity_bytes = 1000000 }
[[process_server]]
name = "ps1"
site = "site-b"
address = "10.1.0.4:9443"
link_bytes_per_second = 100000000
"#;
    let inv: Inventory = toml::from_str(inv).unwrap();
    crate::inventory::check(&inv).unwrap();
    inv
}

fn preflight(
    inv: &Inventory,
    purpose: Purpose,
    datastore: Option<&str>,
    reachable: bool,
) -> Report {
    let answered: Vec<String> = if reachable {
        vec!["ps1".into()]
    } else {
        vec![]
    };
    run(&Context {
        datastore,
        ..context(inv, "web01", purpose, &answered, &enrolled())
    })
}

/// The context of `machine` in `inv`, with nothing named: no component chosen, the original
/// location, no group.
fn context<'a>(
    inv: &'a Inventory,
    machine: &'a str,
    purpose: Purpose,
    reachable: &'a [String],
    components: &'a [crate::components::ComponentInfo],
) -> Context<'a> {
    Context {
        purpose,
        machine_name: machine,
        machine: inv.machines.iter().find(|m| m.name == machine),
        machines: &inv.machines,
        datastores: &inv.datastores,
        master_targets: &inv.master_targets,
        process_servers: &inv.process_servers,
        master_target: None,
        process_server: None,
        datastore: None,
        reachable,
        group: None,
        components,
        azure: &[],
    }
}

/// ps1, enrolled, heard from, reaching its master target; mt1, heard from, its stores on its
/// volume and making points; web01's agent, reporting 1 MB/s of
/// writes.
fn enrolled() -> Vec<crate::components::ComponentInfo> {
    use crate::components::{ComponentHealth, ComponentInfo, ComponentRole, Heartbeat};
    let agent = ComponentInfo {
        name: "web01".into(),
        role: ComponentRole::Agent,
        site: "site-b".into(),
        health: ComponentHealth::Healthy,
        last_heartbeat_unix_ms: Some(1),
        last: Some(Heartbeat {
            healthy: true,
            version: "0".into(),
            write_bytes_per_second: Some(1_000_000),
            process_server: Some("10.1.0.4:9443".into()),
            process_server_reachable: Some(true),
            ..Heartbeat::default()
        }),
    };
    vec![
        ComponentInfo {
            name: "ps1".into(),
            role: ComponentRole::ProcessServer,
            site: "site-b".into(),
            health: ComponentHealth::Healthy,
            last_heartbeat_unix_ms: Some(1),
            last: Some(Heartbeat {
                healthy: true,
                version: "0".into(),
                master_target_reachable: Some(true),
                ..Heartbeat::default()
            }),
        },
        ComponentInfo {
            name: "mt1".into(),
            role: ComponentRole::MasterTarget,
            site: "site-a".into(),
            health: ComponentHealth::Healthy,
            last_heartbeat_unix_ms: Some(1),
            last: Some(Heartbeat {
                healthy: true,
                version: "0".into(),
                replica_problems: Some(Vec::new()),
                ..Heartbeat::default()
            }),
        },
        agent,
    ]
}

fn failed(report: &Report) -> Vec<&'static str> {
    report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.code)
        .collect()
}

fn mt_vm(inv: &mut Inventory) -> &mut Machine {
    inv.machines.iter_mut().find(|m| m.name == "mt-vm").unwrap()
}

#[test]
fn a_sound_setup_passes_every_rule() {
    for purpose in [Purpose::Reprotect, Purpose::Failback] {
        let report = preflight(&good(), purpose, None, true);
        assert!(report.ok, "{report:#?}");
        assert_eq!(failed(&report), Vec::<&str>::new());
        assert_eq!(report.master_target.as_deref(), Some("mt1"));
        assert_eq!(report.process_server.as_deref(), Some("ps1"));
    }
    let report = preflight(&good(), Purpose::Reprotect, Some("ds-a1"), true);
    assert!(report.ok, "{report:#?}");
}

/// Breaks `good()` with `spoil` and expects exactly `code` to fail, with `severity`.
fn violates(
    code: &str,
    severity: Severity,
    datastore: Option<&str>,
    spoil: impl FnOnce(&mut Inventory),
) {
    let mut inv = good();
    spoil(&mut inv);
    let report = preflight(&inv, Purpose::Failback, datastore, true);
    let bad: Vec<&Check> = report.checks.iter().filter(|c| !c.passed).collect();
    assert_eq!(bad.len(), 1, "only {code} fails: {bad:#?}");
    assert_eq!(bad[0].code, code);
    assert_eq!(bad[0].severity, severity);
    assert_eq!(report.ok, severity != Severity::Error);
    assert!(!bad[0].message.is_empty());
}

#[test]
fn each_rule_catches_its_fault() {
    violates("MT_DISK_LIMIT", Severity::Error, None, |inv| {
        inv.master_targets[0].attached_disks = 59
    });
    violates("MT_HAS_SNAPSHOTS", Severity::Error, None, |inv| {
        mt_vm(inv).snapshots = 2
    });
    violates("MT_CONTROLLER_NOT_LSI", Severity::Error, None, |inv| {
        mt_vm(inv).controllers.push(Controller {
            name: "scsi1".into(),
            kind: ControllerKind::Paravirtual,
        })
    });
    violates("MT_DISK_UUID_DISABLED", Severity::Error, None, |inv| {
        mt_vm(inv)
            .config
            .insert("disk.EnableUUID".into(), "false".into());
    });
    violates("MT_TOOLS_MISSING", Severity::Error, None, |inv| {
        mt_vm(inv).tools = ToolsStatus::NotInstalled
    });
    violates("MT_TOOLS_MISSING", Severity::Warning, None, |inv| {
        mt_vm(inv).tools = ToolsStatus::NotRunning
    });
    violates("MT_NO_VMFS_DATASTORE", Severity::Error, None, |inv| {
        inv.datastores.retain(|d| d.kind != DatastoreKind::Vmfs)
    });
    violates("MT_STORAGE_VMOTIONED", Severity::Error, None, |inv| {
        mt_vm(inv).storage_moved_from = Some("ds-old".into())
    });
    violates("MT_OS_MISMATCH", Severity::Error, None, |inv| {
        mt_vm(inv).os = Os {
            family: OsFamily::Windows,
            version: "2022".into(),
        }
    });
    violates("MT_OS_MISMATCH", Severity::Error, None, |inv| {
        mt_vm(inv).os.version = "9.1".into()
    });
    violates("MT_MACHINE_UNKNOWN", Severity::Error, None, |inv| {
        inv.machines.retain(|m| m.name != "mt-vm")
    });
    violates("RETENTION_VOLUME_FAT", Severity::Error, None, |inv| {
        inv.master_targets[0].retention.filesystem = "FAT32".into()
    });
    violates("RETENTION_VOLUME_EMPTY", Severity::Error, None, |inv| {
        inv.master_targets[0].retention.capacity_bytes = 0
    });
    violates("RETENTION_VOLUME_IS_TARGET", Severity::Error, None, |inv| {
        inv.master_targets[0]
            .retention
            .used_by
            .push("replication-target".into())
    });
    violates("RETENTION_VOLUME_IS_CACHE", Severity::Error, None, |inv| {
        inv.master_targets[0].retention.used_by.push("cache".into())
    });
    violates("RETENTION_VOLUME_LOCKED", Severity::Error, None, |inv| {
        inv.master_targets[0].retention.locked = true
    });
    violates("ORIGINAL_DISK_UUID_MISSING", Severity::Error, None, |inv| {
        inv.machines[0].disks[1].uuid = None
    });
    violates(
        "ALTERNATE_DATASTORE_UNREACHABLE",
        Severity::Error,
        Some("ds-elsewhere"),
        |_| {},
    );
    violates(
        "PHYSICAL_FAILS_BACK_TO_VM",
        Severity::Warning,
        None,
        |inv| inv.machines[0].physical = true,
    );
    violates("PS_MISSING", Severity::Error, None, |inv| {
        inv.process_servers[0].site = "site-a".into()
    });
}

#[test]
fn missing_components_and_machines_are_named() {
    let inv = good();
    let report = preflight(&inv, Purpose::Reprotect, None, false);
    assert_eq!(failed(&report), ["PS_UNREACHABLE"]);
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.code == "PS_UNREACHABLE" && c.message.contains("10.1.0.4:9443"))
    );

    let mut none = good();
    none.master_targets.clear();
    let report = preflight(&none, Purpose::Reprotect, None, true);
    assert_eq!(failed(&report), ["MT_MISSING"]);
    assert!(!report.ok);

    let mut two = good();
    let mut other = two.master_targets[0].clone();
    other.name = "mt2".into();
    two.master_targets.push(other);
    let report = preflight(&two, Purpose::Reprotect, None, true);
    let mt = report
        .checks
        .iter()
        .find(|c| c.code == "MT_MISSING")
        .unwrap();
    assert!(!mt.passed && mt.message.contains("mt1, mt2"), "{mt:?}");

    let report = run(&context(&inv, "ghost", Purpose::Failback, &[], &enrolled()));
    assert_eq!(failed(&report), ["CS_MACHINE_UNKNOWN"]);
}

#[test]
fn versions_compare_part_by_part() {
    assert!(version_at_least("9.10", "9.2"));
    assert!(!version_at_least("9.1", "9.2"));
    assert!(version_at_least("2022", "2019"));
    assert!(version_at_least("22.04", "22.04"));
    assert!(version_at_least("8.4.1", "8.4"));
}

#[test]
fn a_group_goes_back_through_one_master_target_and_one_os_family() {
    let mut inv = good();
    let mut db01 = inv.machines[0].clone();
    db01.name = "db01".into();
    inv.machines.push(db01);
    let answered = vec!["ps1".to_string()];
    let check = |inv: &Inventory, group: &crate::db::Group| {
        run(&Context {
            group: Some(group),
            ..context(inv, "web01", Purpose::Failback, &answered, &enrolled())
        })
    };
    let mut group = crate::db::Group {
        id: 1,
        name: "shop".into(),
        machines: vec!["web01".into(), "db01".into()],
        master_target: Some("mt1".into()),
    };
    assert_eq!(failed(&check(&inv, &group)), Vec::<&str>::new());
    group.master_target = Some("mt9".into());
    assert_eq!(failed(&check(&inv, &group)), ["GROUP_MT_MISMATCH"]);
    group.master_target = None;
    inv.machines[2].os = Os {
        family: OsFamily::Windows,
        version: "2022".into(),
    };
    let report = check(&inv, &group);
    assert_eq!(failed(&report), ["GROUP_OS_MISMATCH"]);
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.code == "GROUP_OS_MISMATCH" && c.message.contains("db01"))
    );
}

#[test]
fn the_process_servers_own_reports_count() {
    use crate::components::ComponentHealth;
    let inv = good();
    let answered = vec!["ps1".to_string()];
    let report = |components: &[crate::components::ComponentInfo]| {
        run(&context(
            &inv,
            "web01",
            Purpose::Reprotect,
            &answered,
            components,
        ))
    };
    let mut silent = enrolled();
    silent[0].health = ComponentHealth::Unhealthy;
    let r = report(&silent);
    assert_eq!(failed(&r), ["PS_CS_UNREACHABLE"]);
    assert!(!r.ok);
    let mut cut = enrolled();
    cut[0].last.as_mut().unwrap().master_target_reachable = Some(false);
    let r = report(&cut);
    assert_eq!(failed(&r), ["PS_MT_UNREACHABLE"]);
    assert!(!r.ok);
    // Not enrolled: nothing to tell from, a warning each.
    let r = report(&[]);
    assert_eq!(
        failed(&r),
        [
            "PS_CS_UNREACHABLE",
            "PS_MT_UNREACHABLE",
            "PS_MACHINE_NETWORK",
            "PS_LINK_BANDWIDTH",
            "MT_STORE"
        ]
    );
    assert!(r.ok, "warnings do not block");
}

#[test]
fn the_site_link_must_carry_what_the_machines_write() {
    use crate::components::StreamReport;
    let run_with = |inv: &Inventory, components: &[crate::components::ComponentInfo]| {
        let answered = vec!["ps1".to_string()];
        let report = run(&context(
            inv,
            "web01",
            Purpose::Failback,
            &answered,
            components,
        ));
        let check = report
            .checks
            .iter()
            .find(|c| c.code == "PS_LINK_BANDWIDTH")
            .cloned()
            .expect("the bandwidth rule ran");
        assert_eq!(check.severity, Severity::Warning, "it never blocks");
        assert!(report.ok, "{report:#?}");
        check
    };
    let good_inv = good();
    let passed = run_with(&good_inv, &enrolled());
    assert!(passed.passed, "{passed:?}");
    assert!(passed.message.contains("full resync"), "{passed:?}");

    // The link is slower than the machine writes.
    let mut slow = good();
    slow.process_servers[0].link_bytes_per_second = Some(500_000);
    let c = run_with(&slow, &enrolled());
    assert!(!c.passed && c.message.contains("site link"), "{c:?}");

    // The link is fast enough for web01 alone, not with the other machine streaming through.
    let mut shared = good();
    shared.process_servers[0].link_bytes_per_second = Some(1_500_000);
    let mut components = enrolled();
    let other = crate::components::ComponentInfo {
        name: "db01".into(),
        ..components
            .iter()
            .find(|c| c.name == "web01")
            .unwrap()
            .clone()
    };
    components.push(other);
    let ps = components.iter_mut().find(|c| c.name == "ps1").unwrap();
    ps.last.as_mut().unwrap().streams = Some(vec![StreamReport {
        machine: "db01".into(),
        backlog_bytes: 0,
        lag_ms: 0,
        last_mark_seq: None,
        last_mark_unix_ms: None,
        connected: None,
    }]);
    assert!(run_with(&shared, &enrolled()).passed);
    let c = run_with(&shared, &components);
    assert!(!c.passed && c.message.contains("2 machine(s)"), "{c:?}");

    // The process server forwards less per machine (--max-rate) than web01 writes.
    let mut components = enrolled();
    let ps = components.iter_mut().find(|c| c.name == "ps1").unwrap();
    ps.last.as_mut().unwrap().max_rate_bytes_per_second = Some(100_000);
    let c = run_with(&good_inv, &components);
    assert!(!c.passed && c.message.contains("--max-rate"), "{c:?}");

    // Unknown: no bandwidth declared and no limit, or no write rate reported.
    let mut unknown = good();
    unknown.process_servers[0].link_bytes_per_second = None;
    let c = run_with(&unknown, &enrolled());
    assert!(!c.passed && c.message.contains("not known"), "{c:?}");
    let mut components = enrolled();
    components.retain(|c| c.name != "web01");
    let c = run_with(&good_inv, &components);
    assert!(!c.passed && c.message.contains("write rate"), "{c:?}");
}

#[test]
fn the_storage_of_an_azure_site_involved_must_answer_with_its_credentials() {
    let inv = good();
    let answered = vec!["ps1".to_string()];
    let components = enrolled();
    let probe = |site: &str, configured: bool, problem: Option<&str>| AzureProbe {
        site: site.into(),
        configured,
        problem: problem.map(str::to_string),
        container: None,
    };
    let with = |probes: &[AzureProbe]| {
        run(&Context {
            azure: probes,
            ..context(&inv, "web01", Purpose::Failback, &answered, &components)
        })
    };
    let azure = |r: &Report| -> Vec<(Severity, bool, String)> {
        r.checks
            .iter()
            .filter(|c| c.code == "AZURE_STORAGE")
            .map(|c| (c.severity, c.passed, c.message.clone()))
            .collect()
    };
    // The machine runs at site-b; its storage answers: a passed check.
    let r = with(&[probe("site-b", true, None)]);
    assert!(r.ok, "{r:?}");
    assert_eq!(azure(&r).len(), 1);
    assert!(azure(&r)[0].1);
    // Its credentials are refused: an error that blocks, with the reason.
    let r = with(&[probe(
        "site-b",
        true,
        Some("the storage account rejected the credentials"),
    )]);
    assert!(!r.ok);
    let (severity, passed, message) = &azure(&r)[0];
    assert_eq!((*severity, *passed), (Severity::Error, false));
    assert!(
        message.contains("site-b") && message.contains("rejected"),
        "{message}"
    );
    // An Azure site with no storage in the inventory: a warning only.
    let r = with(&[probe("site-b", false, None)]);
    assert!(r.ok);
    assert_eq!(azure(&r)[0].0, Severity::Warning);
    // A site the machine neither runs at nor goes back to is not checked.
    let r = with(&[probe("site-z", true, Some("down"))]);
    assert!(r.ok && azure(&r).is_empty());
}

#[test]
fn a_master_target_at_an_azure_site_keeps_its_stores_in_the_sites_container_and_can_write_them() {
    use crate::components::ReplicaProblemReport;
    let inv = good();
    let answered = vec!["ps1".to_string()];
    // The master target (mt1) is at site-a, made an Azure site for this test.
    let azure = [AzureProbe {
        site: "site-a".into(),
        configured: true,
        problem: None,
        container: Some("dr".into()),
    }];
    let with = |root: Option<&str>, problems: Vec<ReplicaProblemReport>| {
        let mut components = enrolled();
        let mt = components.iter_mut().find(|c| c.name == "mt1").unwrap();
        let beat = mt.last.as_mut().unwrap();
        beat.store_root = root.map(str::to_string);
        beat.replica_problems = Some(problems);
        run(&Context {
            azure: &azure,
            ..context(&inv, "web01", Purpose::Reprotect, &answered, &components)
        })
    };
    let code = |r: &Report, code: &str| -> Check {
        r.checks
            .iter()
            .find(|c| c.code == code)
            .unwrap_or_else(|| panic!("no {code}: {r:?}"))
            .clone()
    };
    // In the site's container: passed.
    let r = with(Some("azure://dr/mt1"), Vec::new());
    assert!(r.ok, "{r:?}");
    assert!(code(&r, "MT_STORE").passed);
    assert!(code(&r, "MT_STORE_FAILING").passed);
    // On its retention volume, or in another container: an error naming the fix.
    let r = with(None, Vec::new());
    let c = code(&r, "MT_STORE");
    assert!(!r.ok && !c.passed && c.severity == Severity::Error);
    assert!(c.message.contains("--store-root azure://dr/"), "{c:?}");
    let r = with(Some("azure://other/mt1"), Vec::new());
    let c = code(&r, "MT_STORE");
    assert!(!r.ok && c.message.contains("\"other\""), "{c:?}");
    // Its store refuses its credentials: an error; a store that answers 503 now: a warning.
    let problem = |lasting: bool, whole_store: bool| ReplicaProblemReport {
        machine: "db01".into(),
        error: "the backend rejected the credentials".into(),
        since_unix_ms: 1,
        lasting,
        whole_store,
    };
    let r = with(Some("azure://dr/mt1"), vec![problem(true, true)]);
    let c = code(&r, "MT_STORE_FAILING");
    assert!(!r.ok && !c.passed && c.severity == Severity::Error, "{c:?}");
    assert!(
        c.message.contains("db01") && c.message.contains("credentials"),
        "{c:?}"
    );
    let r = with(Some("azure://dr/mt1"), vec![problem(false, false)]);
    let c = code(&r, "MT_STORE_FAILING");
    assert!(
        r.ok && !c.passed && c.severity == Severity::Warning,
        "{c:?}"
    );
    // Another machine's damaged replica does not block this one.
    let r = with(Some("azure://dr/mt1"), vec![problem(true, false)]);
    let c = code(&r, "MT_STORE_FAILING");
    assert!(r.ok && c.severity == Severity::Warning, "{c:?}");
    // Without the Azure site's probe.
    let local = |components: &[crate::components::ComponentInfo]| {
        run(&context(
            &inv,
            "web01",
            Purpose::Reprotect,
            &answered,
            components,
        ))
    };
    // A master target at a local site may keep its stores on its volume.
    let r = local(&enrolled());
    assert!(
        r.ok && !r.checks.iter().any(|c| c.code == "MT_STORE"),
        "{r:?}"
    );
    // One that never reported cannot be checked: a warning.
    let mut components = enrolled();
    components.retain(|c| c.name != "mt1");
    let r = local(&components);
    assert_eq!(code(&r, "MT_STORE").severity, Severity::Warning);
}

#[test]
fn the_machines_network_must_reach_the_process_server() {
    let inv = good();
    let answered = vec!["ps1".to_string()];
    // The check with web01's agent as `edit` leaves it.
    let with = |edit: &dyn Fn(&mut crate::components::ComponentInfo)| {
        let mut components = enrolled();
        edit(components.iter_mut().find(|c| c.name == "web01").unwrap());
        let r = run(&context(
            &inv,
            "web01",
            Purpose::Failback,
            &answered,
            &components,
        ));
        let c = r
            .checks
            .iter()
            .find(|c| c.code == "PS_MACHINE_NETWORK")
            .unwrap()
            .clone();
        (r.ok, c)
    };
    // The machine's agent reaches ps1's address: passed.
    let (ok, c) = with(&|_| {});
    assert!(ok && c.passed, "{c:?}");
    // It cannot: an error naming the agent, the process server and the fix.
    let (ok, c) = with(&|a| a.last.as_mut().unwrap().process_server_reachable = Some(false));
    assert!(!ok && !c.passed && c.severity == Severity::Error, "{c:?}");
    assert!(
        c.message.contains("ps1")
            && c.message.contains("10.1.0.4:9443")
            && c.message.contains("open the port"),
        "{c:?}"
    );
    // It checks another process server: not known, a warning.
    let (ok, c) = with(&|a| a.last.as_mut().unwrap().process_server = Some("10.9.9.9:9443".into()));
    assert!(ok && !c.passed && c.severity == Severity::Warning, "{c:?}");
    assert!(c.message.contains("10.9.9.9:9443"), "{c:?}");
    // An agent of the machine at another site does not count.
    let (ok, c) = with(&|a| a.site = "site-a".into());
    assert!(
        ok && !c.passed && c.severity == Severity::Warning && c.message.contains("no agent"),
        "{c:?}"
    );
}
