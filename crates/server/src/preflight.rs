//! Preflight (DESIGN 4): the checks Azure Site Recovery asks for before reprotect and
//! failback, each a rule with a stable code, a severity and a sentence that names the object
//! and the fix. Rules are pure functions of what the server knows ([`Context`]); the one
//! check that needs the network (is the process server reachable?) is measured by the caller.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::inventory::{
    ControllerKind, Datastore, DatastoreKind, Machine, MasterTarget, ProcessServer, ToolsStatus,
};
use boomerang_wire::MAX_DISKS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    Reprotect,
    Failback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Blocks the job.
    Error,
    /// Worth knowing; does not block.
    Warning,
}

/// One rule's verdict.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Check {
    /// Stable across versions, such as `MT_DISK_LIMIT`.
    pub code: &'static str,
    pub severity: Severity,
    pub passed: bool,
    pub message: String,
}

/// Every rule's verdict for one machine.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Report {
    pub machine: String,
    #[serde(rename = "for")]
    pub purpose: Purpose,
    /// The master target and process server checked against, when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    /// No error failed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// The errors that failed: what blocks the job.
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| !c.passed && c.severity == Severity::Error)
    }
}

/// What the rules look at.
pub struct Context<'a> {
    pub purpose: Purpose,
    pub machine_name: &'a str,
    pub machine: Option<&'a Machine>,
    pub machines: &'a [Machine],
    pub datastores: &'a [Datastore],
    pub master_targets: &'a [MasterTarget],
    pub process_servers: &'a [ProcessServer],
    /// Asked for by name; otherwise the only one that fits.
    pub master_target: Option<&'a str>,
    pub process_server: Option<&'a str>,
    /// Alternate-location recovery into this datastore; none for the original location.
    pub datastore: Option<&'a str>,
    /// The process servers that answered on their address (measured by the caller).
    pub reachable: &'a [String],
    /// The replication group of the machine, if it is in one.
    pub group: Option<&'a crate::db::Group>,
    /// The enrolled components, with their health and last heartbeat.
    pub components: &'a [crate::components::ComponentInfo],
    /// The Azure sites' storage, as the server found it (measured by the caller).
    pub azure: &'a [AzureProbe],
}

/// What the server found probing an Azure site's storage account.
#[derive(Clone, Debug)]
pub struct AzureProbe {
    pub site: String,
    /// Whether the inventory gives the site a storage account.
    pub configured: bool,
    /// Why its container could not be listed with its credentials.
    pub problem: Option<String>,
    /// The container the inventory gives it.
    pub container: Option<String>,
}

fn check(code: &'static str, severity: Severity, passed: bool, message: String) -> Check {
    Check {
        code,
        severity,
        passed,
        message,
    }
}

/// Dotted versions compared part by part, numerically where both parts are numbers.
fn version_at_least(have: &str, want: &str) -> bool {
    let parts = |v: &str| -> Vec<String> { v.split('.').map(str::to_string).collect() };
    let (a, b) = (parts(have), parts(want));
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).map_or("0", String::as_str);
        let y = b.get(i).map_or("0", String::as_str);
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord == std::cmp::Ordering::Greater;
        }
    }
    true
}

/// Picks the component asked for by name, or the only one that fits.
fn pick<'a, T>(
    all: &'a [T],
    asked: Option<&str>,
    name: impl Fn(&T) -> &str,
    fits: impl Fn(&T) -> bool,
) -> Result<&'a T, String> {
    match asked {
        Some(n) => all
            .iter()
            .find(|c| name(c) == n)
            .ok_or_else(|| format!("{n:?} is not in the inventory")),
        None => {
            let fitting: Vec<&T> = all.iter().filter(|c| fits(c)).collect();
            match fitting.as_slice() {
                [one] => Ok(one),
                [] => Err("there is none".into()),
                _ => Err(format!(
                    "there are {} that fit: name one ({})",
                    fitting.len(),
                    fitting
                        .iter()
                        .map(|c| name(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
    }
}

/// Runs every rule.
pub fn run(ctx: &Context<'_>) -> Report {
    let mut checks = Vec::new();
    let report = |mt: Option<String>, ps: Option<String>, checks: Vec<Check>| {
        let ok = checks
            .iter()
            .all(|c| c.passed || c.severity != Severity::Error);
        Report {
            machine: ctx.machine_name.to_string(),
            purpose: ctx.purpose,
            master_target: mt,
            process_server: ps,
            ok,
            checks,
        }
    };
    checks.push(check(
        "CS_CONNECTED",
        Severity::Error,
        true,
        "the configuration server is running and answers".into(),
    ));
    let Some(machine) = ctx.machine else {
        checks.push(check(
            "CS_MACHINE_UNKNOWN",
            Severity::Error,
            false,
            format!(
                "machine {:?} is not in the configuration server's database: add it to an inventory source and refresh (POST /api/inventory/refresh)",
                ctx.machine_name
            ),
        ));
        return report(None, None, checks);
    };
    checks.push(check(
        "CS_MACHINE_UNKNOWN",
        Severity::Error,
        true,
        format!("machine {:?} is in the database", machine.name),
    ));

    // The process server at the site the machine runs at now.
    let ps = pick(
        ctx.process_servers,
        ctx.process_server,
        |p| &p.name,
        |p| p.site == machine.site,
    );
    let ps_name = ps.as_ref().ok().map(|p| p.name.clone());
    match &ps {
        Err(why) => checks.push(check(
            "PS_MISSING",
            Severity::Error,
            false,
            format!(
                "no process server for machine {:?} at site {:?}: {why}; deploy one at that site, or name it",
                machine.name, machine.site
            ),
        )),
        Ok(p) => {
            checks.push(check(
                "PS_MISSING",
                Severity::Error,
                p.site == machine.site,
                if p.site == machine.site {
                    format!("process server {:?} is at site {:?}, with the machine", p.name, p.site)
                } else {
                    format!(
                        "process server {:?} is at site {:?}, not at site {:?} where machine {:?} runs: use a process server at the machine's site",
                        p.name, p.site, machine.site, machine.name
                    )
                },
            ));
            ps_reports(ctx, p, &mut checks);
            machine_network_rule(ctx, machine, p, &mut checks);
            bandwidth_rule(ctx, machine, p, &mut checks);
            let reachable = ctx.reachable.contains(&p.name);
            checks.push(check(
                "PS_UNREACHABLE",
                Severity::Error,
                reachable,
                if reachable {
                    format!("process server {:?} answers at {}", p.name, p.address)
                } else {
                    format!(
                        "process server {:?} does not answer at {}: start it, or open the port between the machine's network and it",
                        p.name, p.address
                    )
                },
            ));
        }
    }

    // The master target at the other site, where the copy goes back to.
    let mt = pick(
        ctx.master_targets,
        ctx.master_target,
        |m| &m.name,
        |m| m.site != machine.site,
    );
    let mt = match mt {
        Err(why) => {
            checks.push(check(
                "MT_MISSING",
                Severity::Error,
                false,
                format!(
                    "no master target for machine {:?} outside site {:?}: {why}; deploy one at the site it goes back to, or name it",
                    machine.name, machine.site
                ),
            ));
            return report(None, ps_name, checks);
        }
        Ok(m) => m,
    };
    checks.push(check(
        "MT_MISSING",
        Severity::Error,
        true,
        format!("master target {:?} at site {:?}", mt.name, mt.site),
    ));
    let mt_vm = ctx.machines.iter().find(|m| m.name == mt.machine);
    group_rules(ctx, machine, mt, &mut checks);
    mt_rules(ctx, machine, mt, mt_vm, &mut checks);
    retention_rules(mt, &mut checks);
    location_rules(ctx, machine, mt, mt_vm, &mut checks);
    azure_rules(ctx, machine, mt, &mut checks);
    mt_store_rules(ctx, machine, mt, &mut checks);
    report(Some(mt.name.clone()), ps_name, checks)
}

/// The storage of an Azure site the machine runs at or goes back to: its credentials valid
/// and its container there (the server lists it).
fn azure_rules(ctx: &Context<'_>, machine: &Machine, mt: &MasterTarget, checks: &mut Vec<Check>) {
    for probe in ctx
        .azure
        .iter()
        .filter(|p| p.site == machine.site || p.site == mt.site)
    {
        checks.push(if !probe.configured {
            check(
                "AZURE_STORAGE",
                Severity::Warning,
                false,
                format!(
                    "site {:?} is an Azure site with no storage account in the inventory, so its storage cannot be checked: give it azure = {{ account, container, key_env or key_file }}",
                    probe.site
                ),
            )
        } else {
            match &probe.problem {
                None => check(
                    "AZURE_STORAGE",
                    Severity::Error,
                    true,
                    format!(
                        "the storage of Azure site {:?} answers with its credentials",
                        probe.site
                    ),
                ),
                Some(why) => check(
                    "AZURE_STORAGE",
                    Severity::Error,
                    false,
                    format!("Azure site {:?}: {why}", probe.site),
                ),
            }
        });
    }
}

/// What the master target's own heartbeats say of its replica stores: at an Azure site they
/// are in that site's storage account (an `azure://` store root in its container), and it
/// can write them with its own credentials (the server's probe uses the server's).
fn mt_store_rules(
    ctx: &Context<'_>,
    machine: &Machine,
    mt: &MasterTarget,
    checks: &mut Vec<Check>,
) {
    use crate::components::{ComponentHealth, ComponentRole};
    let heard = ctx
        .components
        .iter()
        .find(|c| c.name == mt.name && c.role == ComponentRole::MasterTarget)
        .filter(|c| c.health == ComponentHealth::Healthy);
    let Some(beat) = heard.and_then(|c| c.last.as_ref()) else {
        checks.push(check(
            "MT_STORE",
            Severity::Warning,
            false,
            format!(
                "master target {:?} is not heard from now (not enrolled, not started with --control-server, or silent), so its replica stores cannot be checked",
                mt.name
            ),
        ));
        return;
    };
    if let Some(site) = ctx.azure.iter().find(|p| p.site == mt.site) {
        let root = beat.store_root.as_deref();
        let container = root
            .and_then(|r| r.strip_prefix("azure://"))
            .map(|r| r.split('/').next().unwrap_or(r));
        let (passed, message) = match (container, site.container.as_deref()) {
            (None, _) => (
                false,
                format!(
                    "master target {:?} at Azure site {:?} keeps its replica stores {}, not in the site's storage account: start it on a new retention volume with --store-root azure://{}/{}",
                    mt.name,
                    mt.site,
                    root.map_or("on its retention volume".to_string(), |r| format!("at {r}")),
                    site.container.as_deref().unwrap_or("CONTAINER"),
                    mt.name
                ),
            ),
            (Some(have), Some(want)) if have != want => (
                false,
                format!(
                    "master target {:?} keeps its replica stores in container {have:?}, not in {want:?}, the container of Azure site {:?}: start it with the site's container, or fix the site's azure settings",
                    mt.name, mt.site
                ),
            ),
            (Some(_), Some(_)) => (
                true,
                format!(
                    "master target {:?} keeps its replica stores at {}, in the storage of Azure site {:?}",
                    mt.name,
                    root.unwrap_or_default(),
                    mt.site
                ),
            ),
            (Some(_), None) => (
                true,
                format!(
                    "master target {:?} keeps its replica stores at {}, on Azure Blob (Azure site {:?} names no container to compare with)",
                    mt.name,
                    root.unwrap_or_default(),
                    mt.site
                ),
            ),
        };
        checks.push(check("MT_STORE", Severity::Error, passed, message));
    }
    let Some(problems) = beat.replica_problems.as_deref() else {
        checks.push(check(
            "MT_STORE_FAILING",
            Severity::Warning,
            false,
            format!(
                "master target {:?} does not report whether it makes its points (an older version?), so that cannot be checked",
                mt.name
            ),
        ));
        return;
    };
    // What blocks: a failure retrying cannot mend, of this machine's replica or of every
    // store there (credentials, container, key file). Others are worth knowing.
    let blocking = |p: &&crate::components::ReplicaProblemReport| {
        p.lasting && (p.whole_store || p.machine == machine.name)
    };
    let worst = problems.iter().find(blocking).or_else(|| problems.first());
    checks.push(match worst {
        None => check(
            "MT_STORE_FAILING",
            Severity::Error,
            true,
            format!(
                "master target {:?} makes recovery points of every replica it keeps",
                mt.name
            ),
        ),
        Some(p) => check(
            "MT_STORE_FAILING",
            if blocking(&p) {
                Severity::Error
            } else {
                Severity::Warning
            },
            false,
            format!(
                "master target {:?} makes no recovery point of machine {:?}: {}; {}",
                mt.name,
                p.machine,
                p.error,
                if p.lasting {
                    "mend its store's credentials, container or key file, or the replica"
                } else {
                    "it retries; check its store's endpoint and the network"
                }
            ),
        ),
    });
}

/// Whether the machine's network reaches the process server, as the machine's agent at the
/// site where it runs measured it (a TCP connection once a heartbeat interval).
fn machine_network_rule(
    ctx: &Context<'_>,
    machine: &Machine,
    ps: &ProcessServer,
    checks: &mut Vec<Check>,
) {
    use crate::components::ComponentRole;
    let agent = ctx.components.iter().find_map(|c| {
        let beat = c.last.as_ref()?;
        let of_machine = beat.machine.as_deref().unwrap_or(&c.name) == machine.name;
        (c.role == ComponentRole::Agent && of_machine && c.site == machine.site)
            .then_some((c, beat))
    });
    let (passed, severity, message) = match agent {
        None => (
            false,
            Severity::Warning,
            format!(
                "no agent of machine {:?} at site {:?} reports to the configuration server, so whether the machine's network reaches process server {:?} is not known: start it with --control-server",
                machine.name, machine.site, ps.name
            ),
        ),
        Some((c, beat)) => match (
            beat.process_server.as_deref(),
            beat.process_server_reachable,
        ) {
            (Some(addr), Some(reached)) if addr == ps.address => (
                reached,
                Severity::Error,
                if reached {
                    format!(
                        "agent {:?} of machine {:?} reaches process server {:?} at {addr}",
                        c.name, machine.name, ps.name
                    )
                } else {
                    format!(
                        "agent {:?} of machine {:?} at site {:?} cannot reach process server {:?} at {addr}: open the port from the machine's network to it, or choose a process server in that network (--process-server)",
                        c.name, machine.name, machine.site, ps.name
                    )
                },
            ),
            (addr, _) => (
                false,
                Severity::Warning,
                format!(
                    "agent {:?} of machine {:?} checks {}, not process server {:?} at {}, so whether the machine's network reaches that one is not known",
                    c.name,
                    machine.name,
                    addr.map_or("no process server".to_string(), |a| format!(
                        "the process server at {a}"
                    )),
                    ps.name,
                    ps.address
                ),
            ),
        },
    };
    checks.push(check("PS_MACHINE_NETWORK", severity, passed, message));
}

/// What the process server's own heartbeats say: that it reaches the configuration server
/// (it is heard), and whether its master target answers it.
fn ps_reports(ctx: &Context<'_>, p: &ProcessServer, checks: &mut Vec<Check>) {
    use crate::components::{ComponentHealth, ComponentRole};
    let enrolled = ctx
        .components
        .iter()
        .find(|c| c.name == p.name && c.role == ComponentRole::ProcessServer);
    let Some(c) = enrolled else {
        let why = format!(
            "process server {:?} is not enrolled with the configuration server, so its links cannot be checked: enrol it (boomerang component create, then component enroll) and start it with --control-server",
            p.name
        );
        checks.push(check(
            "PS_CS_UNREACHABLE",
            Severity::Warning,
            false,
            why.clone(),
        ));
        checks.push(check("PS_MT_UNREACHABLE", Severity::Warning, false, why));
        return;
    };
    let heard = c.health == ComponentHealth::Healthy;
    checks.push(check(
        "PS_CS_UNREACHABLE",
        Severity::Error,
        heard,
        if heard {
            format!("process server {:?} reaches the configuration server", p.name)
        } else {
            format!(
                "process server {:?} does not reach the configuration server (it is {}): check that it runs with --control-server and that the network lets it through",
                p.name,
                match c.health {
                    ComponentHealth::NeverSeen => "enrolled but never heard",
                    ComponentHealth::Pending => "not enrolled yet",
                    _ => "silent",
                }
            )
        },
    ));
    let reach = c.last.as_ref().and_then(|l| l.master_target_reachable);
    checks.push(match reach {
        Some(true) => check(
            "PS_MT_UNREACHABLE",
            Severity::Error,
            true,
            format!("process server {:?} reaches its master target", p.name),
        ),
        Some(false) => check(
            "PS_MT_UNREACHABLE",
            Severity::Error,
            false,
            format!(
                "process server {:?} does not reach its master target (its last heartbeat says so): start the master target, or open the port between them",
                p.name
            ),
        ),
        None => check(
            "PS_MT_UNREACHABLE",
            Severity::Warning,
            false,
            format!(
                "process server {:?} has not said whether it reaches a master target: start it with --master-target",
                p.name
            ),
        ),
    });
}

/// Bytes as "12.3 MiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds as "40 s", "12 min", "3.5 h".
fn duration(s: u64) -> String {
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// Enough bandwidth on the site link: what the machine writes (its agent measures it), and
/// what every machine streaming through the process server writes together, against the
/// process server's per-machine limit (`--max-rate`, from its heartbeats) and the link's
/// bandwidth (`link_bytes_per_second` in the inventory). A link that is too slow does not
/// block the job, but the RPO would grow without bound: a warning.
fn bandwidth_rule(
    ctx: &Context<'_>,
    machine: &Machine,
    p: &ProcessServer,
    checks: &mut Vec<Check>,
) {
    use crate::components::{ComponentRole, Heartbeat};
    const CODE: &str = "PS_LINK_BANDWIDTH";
    let beat = |name: &str, role: ComponentRole| -> Option<&Heartbeat> {
        ctx.components
            .iter()
            .find(|c| c.name == name && c.role == role)
            .and_then(|c| c.last.as_ref())
    };
    let rate_of = |m: &str| beat(m, ComponentRole::Agent).and_then(|b| b.write_bytes_per_second);
    let ps_beat = beat(&p.name, ComponentRole::ProcessServer);
    let per_machine = ps_beat.and_then(|b| b.max_rate_bytes_per_second);
    let link = p.link_bytes_per_second;
    let Some(own) = rate_of(&machine.name) else {
        checks.push(check(
            CODE,
            Severity::Warning,
            false,
            format!(
                "the write rate of machine {:?} is not known (its agent has not reported one), so the site link cannot be checked: start its agent with --control-server, then check again",
                machine.name
            ),
        ));
        return;
    };
    if per_machine.is_none() && link.is_none() {
        checks.push(check(
            CODE,
            Severity::Warning,
            false,
            format!(
                "the bandwidth of the site link behind process server {:?} is not known: declare link_bytes_per_second for it in the inventory, so that preflight can compare it with the {}/s machine {:?} writes",
                p.name,
                bytes(own),
                machine.name
            ),
        ));
        return;
    }
    // The machines sharing the link: those streaming through the process server, and this one.
    let mut sharing: Vec<&str> = ps_beat
        .and_then(|b| b.streams.as_ref())
        .into_iter()
        .flatten()
        .map(|s| s.machine.as_str())
        .collect();
    if !sharing.contains(&machine.name.as_str()) {
        sharing.push(&machine.name);
    }
    let together: u64 = sharing.iter().filter_map(|m| rate_of(m)).sum();
    let mut short = Vec::new();
    if let Some(cap) = per_machine
        && own > cap
    {
        short.push(format!(
            "machine {:?} writes {}/s and process server {:?} forwards at most {}/s per machine (--max-rate)",
            machine.name,
            bytes(own),
            p.name,
            bytes(cap)
        ));
    }
    if let Some(l) = link
        && together > l
    {
        short.push(format!(
            "the {} machine(s) through process server {:?} write {}/s together, more than its site link's {}/s",
            sharing.len(),
            p.name,
            bytes(together),
            bytes(l)
        ));
    }
    let capacity = [per_machine, link].into_iter().flatten().min().unwrap_or(1);
    let size: u64 = machine.disks.iter().map(|d| d.size_bytes).sum();
    let resync = format!(
        "a full resync of its {} would take about {} at {}/s",
        bytes(size),
        duration(size / capacity.max(1)),
        bytes(capacity)
    );
    checks.push(if short.is_empty() {
        check(
            CODE,
            Severity::Warning,
            true,
            format!(
                "the site link behind process server {:?} carries the {}/s machine {:?} writes; {resync}",
                p.name,
                bytes(own),
                machine.name
            ),
        )
    } else {
        check(
            CODE,
            Severity::Warning,
            false,
            format!(
                "{}: raise --max-rate or the link's bandwidth, or the RPO will grow without bound ({resync})",
                short.join("; ")
            ),
        )
    });
}

fn mt_rules(
    ctx: &Context<'_>,
    machine: &Machine,
    mt: &MasterTarget,
    vm: Option<&Machine>,
    checks: &mut Vec<Check>,
) {
    let total = mt.attached_disks as usize + machine.disks.len();
    checks.push(check(
        "MT_DISK_LIMIT",
        Severity::Error,
        total <= MAX_DISKS,
        if total <= MAX_DISKS {
            format!("master target {:?} would have {total} disks attached, within {MAX_DISKS}", mt.name)
        } else {
            format!(
                "master target {:?} has {} disks attached and machine {:?} adds {}: {total} is over the limit of {MAX_DISKS}; use a separate master target",
                mt.name, mt.attached_disks, machine.name, machine.disks.len()
            )
        },
    ));
    let Some(vm) = vm else {
        checks.push(check(
            "MT_MACHINE_UNKNOWN",
            Severity::Error,
            false,
            format!(
                "master target {:?} runs on machine {:?}, which the inventory does not describe: add it, so that its disks, controllers and tools can be checked",
                mt.name, mt.machine
            ),
        ));
        return;
    };
    checks.push(check(
        "MT_HAS_SNAPSHOTS",
        Severity::Error,
        vm.snapshots == 0,
        if vm.snapshots == 0 {
            format!("master target machine {:?} has no snapshots", vm.name)
        } else {
            format!(
                "master target machine {:?} has {} snapshot(s): delete them, since disks cannot be attached to it while they exist",
                vm.name, vm.snapshots
            )
        },
    ));
    let paravirtual: Vec<&str> = vm
        .controllers
        .iter()
        .filter(|c| c.kind == ControllerKind::Paravirtual)
        .map(|c| c.name.as_str())
        .collect();
    checks.push(check(
        "MT_CONTROLLER_NOT_LSI",
        Severity::Error,
        paravirtual.is_empty(),
        if paravirtual.is_empty() {
            format!("master target machine {:?} has no paravirtual SCSI controller", vm.name)
        } else {
            format!(
                "master target machine {:?} has paravirtual SCSI controller(s) {}: change them to LSI Logic",
                vm.name,
                paravirtual.join(", ")
            )
        },
    ));
    let uuid = vm
        .config
        .get("disk.EnableUUID")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    checks.push(check(
        "MT_DISK_UUID_DISABLED",
        Severity::Error,
        uuid,
        if uuid {
            format!("master target machine {:?} has disk.EnableUUID=true", vm.name)
        } else {
            format!(
                "master target machine {:?} does not have disk.EnableUUID=true: set it in the machine's configuration parameters (powered off)",
                vm.name
            )
        },
    ));
    checks.push(match vm.tools {
        ToolsStatus::Running => check(
            "MT_TOOLS_MISSING",
            Severity::Error,
            true,
            format!("VMware tools run on master target machine {:?}", vm.name),
        ),
        ToolsStatus::NotRunning => check(
            "MT_TOOLS_MISSING",
            Severity::Warning,
            false,
            format!("VMware tools are installed on master target machine {:?} but not running: start them", vm.name),
        ),
        ToolsStatus::NotInstalled => check(
            "MT_TOOLS_MISSING",
            Severity::Error,
            false,
            format!("master target machine {:?} has no VMware tools: install VMware tools or open-vm-tools", vm.name),
        ),
    });
    let vmfs = vm.host.as_deref().is_some_and(|h| {
        ctx.datastores
            .iter()
            .any(|d| d.host == h && d.kind == DatastoreKind::Vmfs)
    });
    checks.push(check(
        "MT_NO_VMFS_DATASTORE",
        Severity::Error,
        vmfs,
        if vmfs {
            format!("the host of master target machine {:?} has a VMFS datastore", vm.name)
        } else {
            format!(
                "the host {:?} of master target machine {:?} has no VMFS datastore: add one (NFS and vSAN alone do not do)",
                vm.host.as_deref().unwrap_or("(none)"),
                vm.name
            )
        },
    ));
    let moved = vm.storage_moved_from.as_deref();
    checks.push(check(
        "MT_STORAGE_VMOTIONED",
        Severity::Error,
        moved.is_none(),
        match moved {
            None => format!("master target machine {:?} was not moved by Storage vMotion", vm.name),
            Some(from) => format!(
                "master target machine {:?} was moved by Storage vMotion (from datastore {from:?}): move it back and exclude it from Storage vMotion, or failback cannot find its disks",
                vm.name
            ),
        },
    ));
    let same_family = vm.os.family == machine.os.family;
    let new_enough = same_family && version_at_least(&vm.os.version, &machine.os.version);
    checks.push(check(
        "MT_OS_MISMATCH",
        Severity::Error,
        new_enough,
        if new_enough {
            format!(
                "master target machine {:?} runs {:?} {}, the same family as machine {:?} ({}) and not older",
                vm.name, vm.os.family, vm.os.version, machine.name, machine.os.version
            )
        } else if !same_family {
            format!(
                "master target machine {:?} runs {:?} and machine {:?} {:?}: use a master target of the machine's OS family",
                vm.name, vm.os.family, machine.name, machine.os.family
            )
        } else {
            format!(
                "master target machine {:?} runs version {}, older than machine {:?}'s {}: use a master target with the same version or newer",
                vm.name, vm.os.version, machine.name, machine.os.version
            )
        },
    ));
}

/// DESIGN 4: every machine of a replication group goes back through one master target, and
/// all run one OS family.
fn group_rules(ctx: &Context<'_>, machine: &Machine, mt: &MasterTarget, checks: &mut Vec<Check>) {
    let Some(group) = ctx.group else {
        return;
    };
    let same_mt = group.master_target.as_deref().is_none_or(|m| m == mt.name);
    checks.push(check(
        "GROUP_MT_MISMATCH",
        Severity::Error,
        same_mt,
        if same_mt {
            format!("replication group {:?} goes back through master target {:?}", group.name, mt.name)
        } else {
            format!(
                "machine {:?} is in replication group {:?}, whose machines go back through master target {:?}, not {:?}: use that master target for every machine of the group",
                machine.name,
                group.name,
                group.master_target.as_deref().unwrap_or("?"),
                mt.name
            )
        },
    ));
    let others: Vec<&str> = group
        .machines
        .iter()
        .filter_map(|n| ctx.machines.iter().find(|m| &m.name == n))
        .filter(|m| m.os.family != machine.os.family)
        .map(|m| m.name.as_str())
        .collect();
    checks.push(check(
        "GROUP_OS_MISMATCH",
        Severity::Error,
        others.is_empty(),
        if others.is_empty() {
            format!("every machine of replication group {:?} runs {:?}", group.name, machine.os.family)
        } else {
            format!(
                "replication group {:?} mixes OS families: {} run another than machine {:?}; a group's machines share one master target, so they must share one OS family: split the group",
                group.name,
                others.join(", "),
                machine.name
            )
        },
    ));
}

fn retention_rules(mt: &MasterTarget, checks: &mut Vec<Check>) {
    let r = &mt.retention;
    let fs = r.filesystem.to_ascii_lowercase();
    let fat = matches!(fs.as_str(), "fat" | "fat16" | "fat32" | "vfat");
    let rules: [(&'static str, bool, String, String); 5] = [
        (
            "RETENTION_VOLUME_FAT",
            !fat,
            format!("retention volume {} is {}", r.path, r.filesystem),
            format!(
                "retention volume {} of master target {:?} is {}: use a volume formatted ext4, xfs or NTFS",
                r.path, mt.name, r.filesystem
            ),
        ),
        (
            "RETENTION_VOLUME_EMPTY",
            r.capacity_bytes > 0,
            format!("retention volume {} has {} bytes", r.path, r.capacity_bytes),
            format!(
                "retention volume {} of master target {:?} has no capacity: attach and size the volume",
                r.path, mt.name
            ),
        ),
        (
            "RETENTION_VOLUME_IS_TARGET",
            !r.used_by.iter().any(|u| u == "replication-target"),
            format!("retention volume {} is not a replication target", r.path),
            format!(
                "retention volume {} of master target {:?} is also a replication target: give retention a volume of its own",
                r.path, mt.name
            ),
        ),
        (
            "RETENTION_VOLUME_IS_CACHE",
            !r.used_by.iter().any(|u| u == "cache"),
            format!("retention volume {} is not a cache volume", r.path),
            format!(
                "retention volume {} of master target {:?} is also a process server's cache volume: use separate volumes",
                r.path, mt.name
            ),
        ),
        (
            "RETENTION_VOLUME_LOCKED",
            !r.locked,
            format!("retention volume {} is not locked", r.path),
            format!(
                "retention volume {} of master target {:?} is locked: release it (another process or a snapshot holds it)",
                r.path, mt.name
            ),
        ),
    ];
    for (code, passed, good, bad) in rules {
        checks.push(check(
            code,
            Severity::Error,
            passed,
            if passed { good } else { bad },
        ));
    }
}

fn location_rules(
    ctx: &Context<'_>,
    machine: &Machine,
    mt: &MasterTarget,
    vm: Option<&Machine>,
    checks: &mut Vec<Check>,
) {
    match ctx.datastore {
        None => {
            // Original location: the machine's disks are found by their UUIDs.
            let missing: Vec<&str> = machine
                .disks
                .iter()
                .filter(|d| d.uuid.as_deref().is_none_or(str::is_empty))
                .map(|d| d.name.as_str())
                .collect();
            checks.push(check(
                "ORIGINAL_DISK_UUID_MISSING",
                Severity::Error,
                missing.is_empty(),
                if missing.is_empty() {
                    format!("every disk of machine {:?} has a UUID to be found by", machine.name)
                } else {
                    format!(
                        "disk(s) {} of machine {:?} have no UUID, so the original disks cannot be found: set disk.EnableUUID on the machine, or recover to an alternate location",
                        missing.join(", "),
                        machine.name
                    )
                },
            ));
        }
        Some(ds) => {
            let host = vm.and_then(|v| v.host.as_deref());
            let reachable =
                host.is_some_and(|h| ctx.datastores.iter().any(|d| d.name == ds && d.host == h));
            checks.push(check(
                "ALTERNATE_DATASTORE_UNREACHABLE",
                Severity::Error,
                reachable,
                if reachable {
                    format!("datastore {ds:?} is on the host of master target {:?}", mt.name)
                } else {
                    format!(
                        "datastore {ds:?} is not reachable from the host {:?} of master target {:?}: choose a datastore of that host",
                        host.unwrap_or("(none)"),
                        mt.name
                    )
                },
            ));
        }
    }
    if ctx.purpose == Purpose::Failback {
        checks.push(check(
            "PHYSICAL_FAILS_BACK_TO_VM",
            Severity::Warning,
            !machine.physical,
            if machine.physical {
                format!(
                    "machine {:?} is physical: it fails back to a virtual machine only",
                    machine.name
                )
            } else {
                format!("machine {:?} is virtual", machine.name)
            },
        ));
    }
}

#[cfg(test)]
mod tests;
