//! Jobs (DESIGN 4): what an operator asks of the system, run by the configuration server as
//! persisted steps. A step that needs a component gives it a *command*, which the component
//! fetches (`GET /api/commands`, long-polled with its own token: components connect out to the
//! server, as for heartbeats) and answers (`POST /api/commands/{id}`).
//!
//! ```text
//! POST /api/jobs ─▶ jobs row (running, step 0) ─▶ engine: step ─▶ next step ... ─▶ succeeded
//!                                                   └─ command row ─▶ component ─▶ result ─┘
//! ```
//!
//! Every step moves the job forward in one transaction (its command, if any, with it), so a
//! server killed at any moment restarts with each job at a step it can resume: a command
//! given is given again until its component answers, and components carry commands out
//! idempotently (a command id seen again gets the same answer).
//!
//! Kinds so far: `test-failover` (serve the machine's disks at a point from its master
//! target, isolated: writes go to scratch targets, replication goes on),
//! `test-failover-cleanup` (stop that and delete the scratch targets), and `failover` (serve
//! them from the master target's failover targets, hydrated into whole disks; planned: the
//! agent stops the machine at a final mark first, and the job waits for that mark at the
//! master target, so nothing is lost), `change-point` (serve a failed-over machine at another
//! point, dropping what it wrote since), `commit` (make the failover's point final) and
//! `protect` (give the machine its policy and follow its initial sync, with progress, until it
//! is protected).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::components::ComponentHealth;
use crate::db::{Db, DbError};
use crate::status::{MachineStatus, ProtectionState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    TestFailover,
    TestFailoverCleanup,
    Failover,
    ChangePoint,
    Commit,
    Protect,
    Reprotect,
    Failback,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::TestFailover => "test-failover",
            JobKind::TestFailoverCleanup => "test-failover-cleanup",
            JobKind::Failover => "failover",
            JobKind::ChangePoint => "change-point",
            JobKind::Commit => "commit",
            JobKind::Protect => "protect",
            JobKind::Reprotect => "reprotect",
            JobKind::Failback => "failback",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "test-failover" => Some(JobKind::TestFailover),
            "test-failover-cleanup" => Some(JobKind::TestFailoverCleanup),
            "failover" => Some(JobKind::Failover),
            "change-point" => Some(JobKind::ChangePoint),
            "commit" => Some(JobKind::Commit),
            "protect" => Some(JobKind::Protect),
            "reprotect" => Some(JobKind::Reprotect),
            "failback" => Some(JobKind::Failback),
            _ => None,
        }
    }

    /// The steps, by name, in order.
    pub fn steps(self) -> &'static [&'static str] {
        match self {
            JobKind::TestFailover => &["check", "start-recovery", "serve"],
            JobKind::TestFailoverCleanup => &["check", "stop-recovery", "clean"],
            JobKind::Failover => &["check", "drain", "catch-up", "recover"],
            JobKind::ChangePoint => &["check", "stop", "recover"],
            JobKind::Commit => &["check"],
            JobKind::Protect => &["policy", "sync", "retention", "app-marks"],
            JobKind::Reprotect => &[
                "check",
                "release-source",
                "release-failover",
                "adopt",
                "attach",
                "sync",
            ],
            JobKind::Failback => &["check", "drain", "catch-up", "release-replica", "attach"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Running,
        }
    }
}

/// A job to run (what the API takes, by kind).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum JobRequest {
    /// Serve the machine's disks at a point, isolated (writes go to scratch disks).
    TestFailover {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
        /// A sequence number (`master-target points`), `latest` (default),
        /// `latest-processed` or `latest-app-consistent`.
        #[serde(default)]
        #[schema(pattern = "^(latest|latest-processed|latest-app-consistent|[0-9]{1,19})$")]
        point: Option<String>,
    },
    /// Stop the machine's test failover and delete its scratch disks.
    TestFailoverCleanup {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
    },
    /// Fail the machine over to its recovery site.
    Failover {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
        /// `final` (planned: the agent stops the machine at a final mark first, and nothing
        /// is lost); unplanned (the source may be gone): `latest` (default: what the process
        /// server holds reaches the master target first), `latest-processed` (at once),
        /// `latest-app-consistent` or a sequence number.
        #[serde(default)]
        #[schema(pattern = "^(final|latest|latest-processed|latest-app-consistent|[0-9]{1,19})$")]
        point: Option<String>,
        /// Also materialize the disks at the point, as image files of this format at the
        /// master target (`materialized/` on its retention volume): raw, vhd (fixed, as Azure
        /// boots; the default at an Azure site), qcow2 or vmdk.
        #[serde(default)]
        #[schema(pattern = "^(raw|vhd|qcow2|vmdk)$")]
        format: Option<String>,
    },
    /// Serve a failed-over machine's disks at another point instead (before a commit): what
    /// it wrote since the failover is dropped.
    ChangePoint {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
        /// A sequence number (`master-target points`), `latest`, `latest-processed` or
        /// `latest-app-consistent`.
        #[schema(pattern = "^(latest|latest-processed|latest-app-consistent|[0-9]{1,19})$")]
        point: String,
    },
    /// Protect a machine with a replication policy, and follow its initial sync until it is
    /// protected (its agent copies the disks; the job reports how far).
    Protect {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
        /// A replication policy's name.
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        policy: String,
    },
    /// Make a failover final: its point can no longer change.
    Commit {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
    },
    /// Replicate a failed-over (committed) machine back to its original site, into its own
    /// disks there (only the blocks that differ travel); or, after a failback, to the
    /// recovery site again.
    Reprotect {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
        /// The master target that keeps the replica (default: the one at the site of the
        /// disks that become the replica).
        #[serde(default)]
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        master_target: Option<String>,
        /// The agent that serves the failed-over disks (default: the machine's one agent
        /// standing by).
        #[serde(default)]
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        agent: Option<String>,
        /// Drop what the machine wrote at its old site after the failover's point (never
        /// replicated): without it, such writes make the reprotect fail.
        #[serde(default)]
        discard_unreplicated: bool,
        /// Alternate location: new disks in this directory at the old site (an absolute path
        /// on the master target's host), a full copy; the machine's old disks stay as they
        /// are. Only after a failover.
        #[serde(default)]
        #[schema(min_length = 1, max_length = 4096, pattern = "^/")]
        alternate_dir: Option<String>,
        /// Alternate location in this inventory datastore (at its `path`): as
        /// `alternate_dir`, and the preflight checks that the master target's host reaches it.
        #[serde(default)]
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        datastore: Option<String>,
        /// The process server the failed-over disks' writes go through (an inventory process
        /// server at the site the machine runs at; default: the agent's own).
        #[serde(default)]
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        process_server: Option<String>,
    },
    /// Bring a reprotected machine home: a planned failover back to its original site, into
    /// its own disks there (nothing is lost).
    Failback {
        #[schema(
            pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            min_length = 1,
            max_length = 63
        )]
        machine: String,
    },
}

impl JobRequest {
    /// The job, checked: its point is one its kind takes.
    pub fn into_new(self) -> Result<NewJob, String> {
        let check = |p: &Option<String>, planned_ok: bool| -> Result<(), String> {
            match p.as_deref() {
                None | Some("latest" | "latest-processed" | "latest-app-consistent") => Ok(()),
                Some("final") if planned_ok => Ok(()),
                Some(n) if n.parse::<u64>().is_ok() => Ok(()),
                Some(other) => Err(format!(
                    "point {other:?} is not a sequence number: use one from `boomerang master-target points`, or latest, latest-processed, latest-app-consistent{}",
                    if planned_ok {
                        " (or final, for a planned failover)"
                    } else {
                        ""
                    }
                )),
            }
        };
        Ok(match self {
            JobRequest::TestFailover { machine, point } => {
                check(&point, false)?;
                NewJob {
                    kind: JobKind::TestFailover,
                    machine,
                    point,
                    planned: false,
                    policy: None,
                    options: Data::new(),
                }
            }
            JobRequest::TestFailoverCleanup { machine } => NewJob {
                kind: JobKind::TestFailoverCleanup,
                machine,
                point: None,
                planned: false,
                policy: None,
                options: Data::new(),
            },
            JobRequest::Failover {
                machine,
                point,
                format,
            } => {
                check(&point, true)?;
                let planned = point.as_deref() == Some("final");
                let mut options = Data::new();
                if let Some(f) = format {
                    if !["raw", "vhd", "qcow2", "vmdk"].contains(&f.as_str()) {
                        return Err(format!(
                            "format {f:?} is not one a failover writes: use raw, vhd, qcow2 or vmdk"
                        ));
                    }
                    options.insert("format".into(), json!(f));
                }
                NewJob {
                    kind: JobKind::Failover,
                    machine,
                    point: point.filter(|_| !planned),
                    planned,
                    policy: None,
                    options,
                }
            }
            JobRequest::ChangePoint { machine, point } => {
                let point = Some(point);
                check(&point, false)?;
                NewJob {
                    kind: JobKind::ChangePoint,
                    machine,
                    point,
                    planned: false,
                    policy: None,
                    options: Data::new(),
                }
            }
            JobRequest::Commit { machine } => NewJob {
                kind: JobKind::Commit,
                machine,
                point: None,
                planned: false,
                policy: None,
                options: Data::new(),
            },
            JobRequest::Protect { machine, policy } => NewJob {
                kind: JobKind::Protect,
                machine,
                point: None,
                planned: false,
                policy: Some(policy),
                options: Data::new(),
            },
            JobRequest::Reprotect {
                machine,
                master_target,
                agent,
                discard_unreplicated,
                alternate_dir,
                datastore,
                process_server,
            } => {
                let mut options = Data::new();
                if let Some(ds) = datastore {
                    options.insert("datastore".into(), json!(ds));
                }
                if let Some(ps) = process_server {
                    options.insert("process_server".into(), json!(ps));
                }
                if let Some(dir) = alternate_dir {
                    if !dir.starts_with('/') {
                        return Err(format!(
                            "alternate_dir {dir:?} is not an absolute path on the master target's host"
                        ));
                    }
                    options.insert("alternate_dir".into(), json!(dir));
                }
                if let Some(mt) = master_target {
                    options.insert("master_target".into(), json!(mt));
                }
                if let Some(a) = agent {
                    options.insert("agent".into(), json!(a));
                }
                options.insert("discard_unreplicated".into(), json!(discard_unreplicated));
                NewJob {
                    kind: JobKind::Reprotect,
                    machine,
                    point: None,
                    planned: false,
                    policy: None,
                    options,
                }
            }
            JobRequest::Failback { machine } => NewJob {
                kind: JobKind::Failback,
                machine,
                point: None,
                planned: true,
                policy: None,
                options: Data::new(),
            },
        })
    }

    pub fn machine(&self) -> &str {
        match self {
            JobRequest::TestFailover { machine, .. }
            | JobRequest::TestFailoverCleanup { machine }
            | JobRequest::Failover { machine, .. }
            | JobRequest::ChangePoint { machine, .. }
            | JobRequest::Commit { machine }
            | JobRequest::Protect { machine, .. }
            | JobRequest::Reprotect { machine, .. }
            | JobRequest::Failback { machine } => machine,
        }
    }
}

/// A job to run, checked.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub kind: JobKind,
    pub machine: String,
    /// A sequence number, or `latest`; none for the latest.
    pub point: Option<String>,
    /// A planned failover: the source stops at a final mark first.
    pub planned: bool,
    /// The replication policy to protect with.
    pub policy: Option<String>,
    /// What else the job was asked with (a reprotect's master target, ...).
    pub options: Data,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub machine: String,
    pub state: JobState,
    /// The step it is at (or ended at), by name.
    pub step: String,
    pub steps: Vec<String>,
    /// Why it failed or was cancelled, or what it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What it produced (for a test failover: where its disks are served).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub requested_by: String,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
}

/// A component's command, as it fetches it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Command {
    pub id: i64,
    pub job: i64,
    /// `recovery-start` or `recovery-stop`.
    pub kind: String,
    #[schema(value_type = Object)]
    pub params: Value,
}

/// A component's answer to a command.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    pub ok: bool,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Value,
    /// Why it failed.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub error: Option<String>,
}

/// The inner state of a job between steps (not shown).
pub type Data = serde_json::Map<String, Value>;

struct Row {
    job: Job,
    step: usize,
    data: Data,
}

const JOB_COLUMNS: &str =
    "id, kind, machine, state, step, message, result, requested_by, created_ms, updated_ms, data";

fn row_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let kind = JobKind::parse(&r.get::<_, String>(1)?).unwrap_or(JobKind::TestFailover);
    let step: i64 = r.get(4)?;
    let steps = kind.steps();
    let result: String = r.get(6)?;
    let data: String = r.get(10)?;
    Ok(Row {
        job: Job {
            id: r.get(0)?,
            kind,
            machine: r.get(2)?,
            state: JobState::parse(&r.get::<_, String>(3)?),
            step: steps
                .get(step as usize)
                .or(steps.last())
                .copied()
                .unwrap_or("")
                .to_string(),
            steps: steps.iter().map(|s| s.to_string()).collect(),
            message: r.get(5)?,
            result: serde_json::from_str(&result)
                .ok()
                .filter(|v: &Value| !v.is_null()),
            requested_by: r.get(7)?,
            created_unix_ms: r.get(8)?,
            updated_unix_ms: r.get(9)?,
        },
        step: step as usize,
        data: serde_json::from_str(&data).unwrap_or_default(),
    })
}

/// In a protect job's data: started by an edit of its policy (see [`Db::push_policy`]).
const PUSHED: &str = "pushed";

/// A machine an edit of its policy was not sent to, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct LeftOut {
    pub machine: String,
    pub why: String,
}

impl Db {
    /// After an edit of replication policy `name`: a protect job for each machine it protects
    /// that replicates now (protected, resyncing, or in its first copy with no job running),
    /// which sends the policy's retention to the machine's master target and its
    /// app-consistent schedule to its agent once the machine is protected. Such a job gives
    /// way to any job asked for the machine later (it is cancelled then), so it never holds
    /// up a failover, and a later edit replaces it. Returns the jobs started, and the machines
    /// left out: failed over or unprotected (their next protect sends the policy), or running
    /// another job (a protect job in progress reads the policy as it goes).
    pub fn push_policy(
        &self,
        name: &str,
        actor: &str,
        heartbeat_timeout_ms: i64,
    ) -> Result<(Vec<Job>, Vec<LeftOut>), DbError> {
        let statuses = crate::api::statuses(self, heartbeat_timeout_ms)?;
        let (mut started, mut left) = (Vec::new(), Vec::new());
        for (protection, _) in self.protections()? {
            if protection.policy != name {
                continue;
            }
            let state = statuses
                .iter()
                .find(|s| s.name == protection.machine)
                .map(|s| s.state);
            let replicating = matches!(
                state,
                Some(
                    ProtectionState::Protected
                        | ProtectionState::Resync
                        | ProtectionState::InitialSync
                )
            );
            if !replicating {
                let now = match state {
                    Some(ProtectionState::FailedOver) => "failed over",
                    _ => "not replicating (no agent reports its disks)",
                };
                left.push(LeftOut {
                    machine: protection.machine,
                    why: format!("{now}: its next protect sends the policy"),
                });
                continue;
            }
            let mut options = Data::new();
            options.insert(PUSHED.into(), json!(true));
            let job = NewJob {
                kind: JobKind::Protect,
                machine: protection.machine.clone(),
                point: None,
                planned: false,
                policy: Some(name.to_string()),
                options,
            };
            match self.create_job(&job, actor) {
                Ok(job) => started.push(job),
                Err(DbError::Conflict(_)) => left.push(LeftOut {
                    machine: protection.machine,
                    why: "runs another job: a protect job reads the policy as it goes, any other takes it at the next protect".into(),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok((started, left))
    }

    /// Records a job to run, at its first step.
    pub fn create_job(&self, new: &NewJob, actor: &str) -> Result<Job, DbError> {
        let now = crate::db::now();
        let mut data = Data::new();
        if let Some(p) = &new.point {
            data.insert("point".into(), json!(p));
        }
        if new.planned {
            data.insert("planned".into(), json!(true));
        }
        if let Some(p) = &new.policy {
            data.insert("policy".into(), json!(p));
        }
        for (k, v) in &new.options {
            data.insert(k.clone(), v.clone());
        }
        let id = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            // One job at a time per machine: two would act on the same disks.
            let running: Option<(i64, String, String)> = {
                use rusqlite::OptionalExtension;
                tx.query_row(
                    "SELECT id, kind, data FROM jobs WHERE machine = ?1 AND state = 'running' LIMIT 1",
                    [&new.machine],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?
            };
            if let Some((other, kind, other_data)) = running {
                // A policy's edit being sent (see `push_policy`) gives way to any job asked
                // for: safe to stop at any step, and the machine's next protect sends it.
                let pushed = serde_json::from_str::<Data>(&other_data)
                    .is_ok_and(|d| d.get(PUSHED) == Some(&json!(true)));
                if !pushed {
                    return Err(DbError::Conflict(format!(
                        "job {other} ({kind}) of machine {:?} is running: wait for it to end (boomerang job show {other})",
                        new.machine
                    )));
                }
                tx.execute(
                    "UPDATE jobs SET state = 'cancelled', message = ?2, updated_ms = ?3 WHERE id = ?1 AND state = 'running'",
                    rusqlite::params![
                        other,
                        format!(
                            "cancelled for a {} job of the machine: the policy's edit may not have reached its master target and agent; the machine's next protect sends it",
                            new.kind.as_str()
                        ),
                        now
                    ],
                )?;
            }
            tx.execute(
                "INSERT INTO jobs (kind, machine, state, step, result, requested_by, created_ms, updated_ms, data)
                 VALUES (?1, ?2, 'running', 0, 'null', ?3, ?4, ?4, ?5)",
                rusqlite::params![new.kind.as_str(), new.machine, actor, now, Value::Object(data).to_string()],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            id
        };
        self.get_job(id)?
            .ok_or_else(|| DbError::NotFound(format!("job {id} vanished")))
    }

    fn job_row(&self, id: i64) -> Result<Option<Row>, DbError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                row_job,
            )
            .optional()?)
    }

    pub fn get_job(&self, id: i64) -> Result<Option<Job>, DbError> {
        Ok(self.job_row(id)?.map(|r| r.job))
    }

    pub fn list_jobs(&self, after: i64, limit: u32) -> Result<Vec<Job>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(rusqlite::params![after, limit], row_job)?;
        Ok(rows.map(|r| r.map(|r| r.job)).collect::<Result<_, _>>()?)
    }

    fn running_jobs(&self) -> Result<Vec<Row>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'running' ORDER BY id"
        ))?;
        let rows = stmt.query_map([], row_job)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The reprotect and failback jobs waiting at their first step for their preflight (the
    /// server runs it, since it probes the network), with what to check against: the
    /// components the job chose (`preflight_for`).
    pub fn awaiting_preflight(
        &self,
    ) -> Result<Vec<(i64, String, crate::api::PreflightQuery, Value)>, DbError> {
        let text = |v: &Value, k: &str| v[k].as_str().map(str::to_string);
        Ok(self
            .running_jobs()?
            .into_iter()
            .filter(|r| r.step == 0 && !r.data.contains_key("preflight"))
            .filter_map(|r| {
                let purpose = match r.job.kind {
                    JobKind::Reprotect => crate::preflight::Purpose::Reprotect,
                    JobKind::Failback => crate::preflight::Purpose::Failback,
                    _ => return None,
                };
                let asked = r.data.get("preflight_for")?;
                let query = crate::api::PreflightQuery {
                    purpose,
                    master_target: text(asked, "master_target"),
                    process_server: text(asked, "process_server"),
                    datastore: text(asked, "datastore"),
                };
                Some((r.job.id, r.job.machine, query, asked.clone()))
            })
            .collect())
    }

    /// Asks for job `id`'s preflight against `asked` (the master target, process server and
    /// datastore it chose), unless it is asked for already.
    fn ask_preflight(&self, id: i64, asked: &Value) -> Result<(), DbError> {
        let Some(mut row) = self.job_row(id)? else {
            return Ok(());
        };
        if row.step == 0 && row.data.get("preflight_for") != Some(asked) {
            row.data.insert("preflight_for".into(), asked.clone());
            row.data.remove("preflight");
            self.advance(id, 0, 0, &row.data, None)?;
        }
        Ok(())
    }

    /// Gives job `id`, still at its first step and still asking for a preflight against
    /// `asked`, its preflight `report`.
    pub fn record_preflight(&self, id: i64, asked: &Value, report: Value) -> Result<(), DbError> {
        let Some(mut row) = self.job_row(id)? else {
            return Ok(());
        };
        if row.step == 0
            && row.job.state == JobState::Running
            && row.data.get("preflight_for") == Some(asked)
        {
            row.data.insert("preflight".into(), report);
            self.advance(id, 0, 0, &row.data, None)?;
        }
        Ok(())
    }

    /// Moves job `id` from step `from` to `to` (with `data`), giving `command` to its
    /// component in the same transaction; false if the job was not at `from` any more.
    fn advance(
        &self,
        id: i64,
        from: usize,
        to: usize,
        data: &Data,
        command: Option<(&str, &str, Value)>,
    ) -> Result<bool, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = crate::db::now();
        let changed = tx.execute(
            "UPDATE jobs SET step = ?3, data = ?4, updated_ms = ?5 WHERE id = ?1 AND step = ?2 AND state = 'running'",
            rusqlite::params![id, from as i64, to as i64, Value::Object(data.clone()).to_string(), now],
        )?;
        if changed == 1
            && let Some((component, kind, params)) = command
        {
            tx.execute(
                "INSERT INTO commands (job, component, kind, params, state, created_ms) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                rusqlite::params![id, component, kind, params.to_string(), now],
            )?;
        }
        tx.commit()?;
        Ok(changed == 1)
    }

    /// Ends job `id` in `state`, with `message` and `result`.
    fn end_job(
        &self,
        id: i64,
        state: JobState,
        message: &str,
        result: &Value,
    ) -> Result<bool, DbError> {
        let changed = self.conn().execute(
            "UPDATE jobs SET state = ?2, message = ?3, result = ?4, updated_ms = ?5 WHERE id = ?1 AND state = 'running'",
            rusqlite::params![id, state.as_str(), message, result.to_string(), crate::db::now()],
        )?;
        Ok(changed == 1)
    }

    /// Records how far running job `id` is (in its result, until it ends).
    fn set_progress(&self, id: i64, progress: &Value) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE jobs SET result = ?2 WHERE id = ?1 AND state = 'running'",
            rusqlite::params![id, progress.to_string()],
        )?;
        Ok(())
    }

    /// Cancels job `id` if it is at a step where nothing was given to a component yet.
    pub fn cancel_job(&self, id: i64) -> Result<Job, DbError> {
        let row = self.job_row(id)?.ok_or_else(|| {
            DbError::NotFound(format!(
                "there is no job {id}: list them with GET /api/jobs"
            ))
        })?;
        if row.job.state != JobState::Running {
            return Err(DbError::Conflict(format!(
                "job {id} has ended ({}): there is nothing to cancel",
                row.job.state.as_str()
            )));
        }
        // Where a job may stop, and what is left to do then.
        let message = match (row.job.kind, row.step) {
            (_, 0) => "cancelled before it started".to_string(),
            (JobKind::Protect, _) if row.data.get(PUSHED) == Some(&json!(true)) => format!(
                "cancelled: the policy's edit may not have reached the master target and agent of {:?}; its next protect sends it",
                row.job.machine
            ),
            (JobKind::TestFailover, 2) => "cancelled while its master target may be starting it: run test-failover-cleanup, which stops it if it started".to_string(),
            (JobKind::Failover, 2) if row.data.get("planned") == Some(&json!(true)) => format!(
                "cancelled while waiting for the final mark at the master target: the machine is stopped at its source (its agent refuses writes); fail over unplanned, or remove the failed-over marker in its agent's log directory and restart the agent to run it there again ({:?})",
                row.job.machine
            ),
            (JobKind::Failover, 2) => "cancelled while waiting for the process server's backlog; nothing was failed over".to_string(),
            (JobKind::Protect, 1) => format!(
                "cancelled while following the initial sync; machine {:?} keeps its policy and its agent goes on copying (boomerang status follows it)",
                row.job.machine
            ),
            (JobKind::Reprotect, 1) => format!(
                "cancelled while waiting for the agent at the old source to let go of the disks of {:?}, or for the failed-over disks to be whole; that agent may have let go of them already (it stands by then, and what the machine wrote there after the failover's point was refused or dropped as asked), and the failover still serves the disks: run reprotect again to go on",
                row.job.machine
            ),
            (JobKind::Reprotect, 5) => format!(
                "cancelled while following the copy back; machine {:?} is served by the agent that attached its disks, which goes on copying (boomerang status follows it)",
                row.job.machine
            ),
            (JobKind::Failback, 2) => format!(
                "cancelled while waiting for the final mark at the master target: machine {:?} is stopped at the recovery site (its agent there refuses writes); remove the failed-over marker in that agent's log directory and restart it to run the machine there again",
                row.job.machine
            ),
            (JobKind::Protect, 2 | 3) => format!(
                "cancelled while telling the master target or the agent the policy's settings; machine {:?} is protected and keeps its policy: run protect again to send them",
                row.job.machine
            ),
            _ => {
                return Err(DbError::Conflict(format!(
                    "job {id} is at step {:?}, where a component is at work: it cannot be cancelled safely there; wait for it to end",
                    row.job.step
                )));
            }
        };
        // Only while it is still at that step: the engine may move it on meanwhile.
        let cancelled = self.conn().execute(
            "UPDATE jobs SET state = 'cancelled', message = ?3, updated_ms = ?4 WHERE id = ?1 AND state = 'running' AND step = ?2",
            rusqlite::params![id, row.step as i64, message, crate::db::now()],
        )?;
        if cancelled != 1 {
            return Err(DbError::Conflict(format!(
                "job {id} moved on meanwhile: look at it again"
            )));
        }
        self.get_job(id)?
            .ok_or_else(|| DbError::NotFound(format!("job {id} vanished")))
    }

    /// The master target job `id` gave work to, if it did.
    fn job_master_target(&self, id: i64) -> Result<Option<String>, DbError> {
        Ok(self.job_row(id)?.and_then(|r| {
            r.data
                .get("master_target")
                .and_then(Value::as_str)
                .map(str::to_string)
        }))
    }

    /// The machines failed over, with what their last failover serves.
    pub fn failed_over(&self) -> Result<Vec<(String, Value)>, DbError> {
        let conn = self.conn();
        // A change of point that failed after its stop step stopped the failover's serving.
        let mut stmt = conn.prepare(
            "SELECT machine, kind, result, state, step FROM jobs
             WHERE kind IN ('failover', 'change-point', 'commit', 'reprotect')
               AND (state = 'succeeded'
                    OR (kind = 'change-point' AND state = 'failed' AND step >= 2)
                    OR (kind = 'reprotect' AND step >= 3))
             ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out: Vec<(String, Value)> = Vec::new();
        for row in rows {
            let (machine, kind, result, state, step) = row?;
            if kind == "reprotect" {
                // Its agent at the new source serves the failed-over disks (step 5 is the
                // copy back): not failed over any more.
                if state == "succeeded" || step >= 5 {
                    out.retain(|(m, _)| *m != machine);
                } else if let Some((_, r)) = out.iter_mut().find(|(m, _)| *m == machine)
                    && let Value::Object(o) = r
                {
                    // The master target let go of the disks, and no agent serves them yet.
                    o.insert("serving".into(), json!(false));
                    o.insert("released".into(), json!(true));
                    o.remove("address");
                }
                continue;
            }
            if state == "failed" {
                if let Some((_, r)) = out.iter_mut().find(|(m, _)| *m == machine)
                    && let Value::Object(o) = r
                {
                    o.insert("serving".into(), json!(false));
                    o.remove("address");
                }
                continue;
            }
            if kind == "commit" {
                // The failover stays; its point is final now.
                if let Some((_, r)) = out.iter_mut().find(|(m, _)| *m == machine)
                    && let Value::Object(o) = r
                {
                    o.insert("committed".into(), json!(true));
                }
                continue;
            }
            let result = serde_json::from_str(&result).unwrap_or(Value::Null);
            out.retain(|(m, _)| *m != machine);
            out.push((machine, result));
        }
        Ok(out)
    }

    /// The id of the newest command given out (0 before the first).
    pub fn newest_command(&self) -> Result<i64, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(id), 0) FROM commands", [], |r| {
                r.get(0)
            })?)
    }

    /// The next command for `component` not answered yet, of a running job, other than those
    /// in `busy` (the ones it is carrying out).
    pub fn next_command(&self, component: &str, busy: &[i64]) -> Result<Option<Command>, DbError> {
        use rusqlite::OptionalExtension;
        let busy = serde_json::to_string(busy).unwrap_or_else(|_| "[]".into());
        Ok(self
            .conn()
            .query_row(
                "SELECT c.id, c.job, c.kind, c.params FROM commands c JOIN jobs j ON j.id = c.job
                 WHERE c.component = ?1 AND c.state = 'pending' AND j.state = 'running'
                   AND c.id NOT IN (SELECT value FROM json_each(?2))
                 ORDER BY c.id LIMIT 1",
                rusqlite::params![component, busy],
                |r| {
                    let params: String = r.get(3)?;
                    Ok(Command {
                        id: r.get(0)?,
                        job: r.get(1)?,
                        kind: r.get(2)?,
                        params: serde_json::from_str(&params).unwrap_or(Value::Null),
                    })
                },
            )
            .optional()?)
    }

    /// Records `component`'s answer to command `id`; the first answer counts.
    pub fn answer_command(
        &self,
        component: &str,
        id: i64,
        answer: &CommandResult,
    ) -> Result<(), DbError> {
        let body = json!({"ok": answer.ok, "result": answer.result, "error": answer.error});
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE commands SET state = 'done', result = ?3, done_ms = ?4 WHERE id = ?1 AND component = ?2 AND state = 'pending'",
            rusqlite::params![id, component, body.to_string(), crate::db::now()],
        )?;
        if changed == 0 {
            use rusqlite::OptionalExtension;
            let known: Option<String> = conn
                .query_row(
                    "SELECT state FROM commands WHERE id = ?1 AND component = ?2",
                    rusqlite::params![id, component],
                    |r| r.get(0),
                )
                .optional()?;
            if known.is_none() {
                return Err(DbError::NotFound(format!(
                    "there is no command {id} for {component}"
                )));
            }
        }
        Ok(())
    }

    /// The answer to the last command of job `job`, once there is one.
    fn command_answer(&self, job: i64) -> Result<Option<Value>, DbError> {
        use rusqlite::OptionalExtension;
        let answer: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT result FROM commands WHERE job = ?1 ORDER BY id DESC LIMIT 1",
                [job],
                |r| r.get(0),
            )
            .optional()?;
        Ok(answer.flatten().and_then(|a| serde_json::from_str(&a).ok()))
    }
}

/// How long a job waits for the first recovery point of a machine that is protected.
const FIRST_POINT_WAIT_MS: i64 = 10 * 60 * 1000;

/// What the engine needs besides the database.
pub struct Engine<'a> {
    db: &'a Db,
    heartbeat_timeout_ms: i64,
    /// The machines' status, worked out once per pass (each job is about one machine).
    statuses: std::cell::RefCell<Option<Vec<MachineStatus>>>,
    /// The components as this pass sees them.
    components: std::cell::RefCell<Option<Vec<crate::components::ComponentInfo>>>,
}

impl<'a> Engine<'a> {
    pub fn new(db: &'a Db, heartbeat_timeout_ms: i64) -> Self {
        Engine {
            db,
            heartbeat_timeout_ms,
            statuses: Default::default(),
            components: Default::default(),
        }
    }

    /// Every component, with its health and last report, as this pass sees them.
    fn components(&self) -> Result<Vec<crate::components::ComponentInfo>, DbError> {
        let mut cached = self.components.borrow_mut();
        if cached.is_none() {
            let now = crate::db::now();
            *cached = Some(
                self.db
                    .list_components(0, u32::MAX)?
                    .into_iter()
                    .map(|r| crate::api::info(r, now, self.heartbeat_timeout_ms))
                    .collect(),
            );
        }
        Ok(cached.clone().unwrap_or_default())
    }

    /// A master target heard from now that makes no recovery point of `machine`, and what
    /// it reported of why; a problem retrying cannot mend first. (A master target that
    /// cannot open the replica's store lists no replica of it: all are looked at.)
    fn replica_problem(
        &self,
        machine: &str,
    ) -> Result<Option<(String, crate::components::ReplicaProblemReport)>, DbError> {
        let mut found: Vec<(String, crate::components::ReplicaProblemReport)> = self
            .components()?
            .into_iter()
            .filter(|c| {
                c.role == crate::components::ComponentRole::MasterTarget
                    && c.health == crate::components::ComponentHealth::Healthy
            })
            .filter_map(|c| {
                let problem = c
                    .last?
                    .replica_problems?
                    .into_iter()
                    .find(|p| p.machine == machine)?;
                Some((c.name, problem))
            })
            .collect();
        found.sort_by_key(|(_, p)| !p.lasting);
        Ok(found.into_iter().next())
    }

    /// The last failover, reprotect or failback of `machine` that succeeded before job
    /// `before`: where the machine is in its circle.
    fn last_move(&self, machine: &str, before: i64) -> Result<Option<Job>, DbError> {
        Ok(self.db.list_jobs(0, u32::MAX)?.into_iter().rfind(|j| {
            j.machine == machine
                && j.id < before
                && j.state == JobState::Succeeded
                && matches!(
                    j.kind,
                    JobKind::Failover | JobKind::Reprotect | JobKind::Failback
                )
        }))
    }

    /// The status of `machine` as this pass sees it.
    fn status_of(&self, machine: &str) -> Result<Option<MachineStatus>, DbError> {
        let mut cached = self.statuses.borrow_mut();
        if cached.is_none() {
            *cached = Some(crate::api::statuses(self.db, self.heartbeat_timeout_ms)?);
        }
        Ok(cached.iter().flatten().find(|s| s.name == machine).cloned())
    }

    /// Moves every running job as far as it can go now.
    pub fn step_all(&self) -> Result<(), DbError> {
        self.statuses.replace(None);
        self.components.replace(None);
        for row in self.db.running_jobs()? {
            let id = row.job.id;
            if let Err(e) = self.step(row) {
                tracing::error!(job = id, error = %e, "a job step failed; it is tried again");
            }
        }
        Ok(())
    }

    /// The result of job `id`'s last command once it is answered. `None` while it is not, or
    /// when the component could not carry it out: then the job fails, with `could_not` given
    /// the component's reason.
    fn answer(
        &self,
        id: i64,
        could_not: impl FnOnce(&str) -> String,
    ) -> Result<Option<Value>, DbError> {
        match self.db.command_answer(id)? {
            None => Ok(None),
            Some(a) if a["ok"] == true => Ok(Some(a["result"].clone())),
            Some(a) => {
                self.fail(
                    id,
                    could_not(a["error"].as_str().unwrap_or("no reason given")),
                )?;
                Ok(None)
            }
        }
    }

    /// Whether job `id` may go past its first step by its preflight (DESIGN 4): `None` while
    /// the server runs it; `Some(false)` when an error failed (the job fails, naming each
    /// one and its fix).
    fn preflight_passed(
        &self,
        id: i64,
        data: &Data,
        what: &str,
        asked: Value,
    ) -> Result<Option<bool>, DbError> {
        let report = data
            .get("preflight")
            .filter(|_| data.get("preflight_for") == Some(&asked));
        let Some(report) = report else {
            self.db.ask_preflight(id, &asked)?;
            self.db
                .set_progress(id, &json!({"waiting_for": "preflight"}))?;
            return Ok(None);
        };
        if report["ok"] == true {
            return Ok(Some(true));
        }
        let failed: Vec<String> = report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["passed"] == false && c["severity"] == "error")
            .map(|c| {
                format!(
                    "{}: {}",
                    c["code"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        self.fail(
            id,
            format!(
                "the preflight for {what} failed, nothing was changed: {}",
                failed.join("; ")
            ),
        )?;
        Ok(Some(false))
    }

    fn fail(&self, id: i64, message: String) -> Result<(), DbError> {
        tracing::warn!(job = id, %message, "job failed");
        self.db
            .end_job(id, JobState::Failed, &message, &Value::Null)?;
        Ok(())
    }

    /// The status of `job`'s machine and its one master target, if the machine has recovery
    /// points to fail over to; `None` when the job failed for want of them, or waits for the
    /// master target's report (which may trail the process server's, up to a heartbeat
    /// timeout).
    fn source(&self, job: &Job) -> Result<Option<(MachineStatus, String)>, DbError> {
        let id = job.id;
        let Some(status) = self.status_of(&job.machine)? else {
            self.fail(
                id,
                format!("machine {:?} is not in the inventory", job.machine),
            )?;
            return Ok(None);
        };
        if status.state == ProtectionState::FailedOver {
            self.fail(
                id,
                format!(
                    "machine {:?} is failed over already: reprotect it, or fail it back, first",
                    job.machine
                ),
            )?;
            return Ok(None);
        }
        let replicated = matches!(
            status.state,
            ProtectionState::Protected | ProtectionState::Resync
        );
        let has_points = status.disks.iter().any(|d| d.points > 0);
        // The master target's report may trail, and its first point of a large disk (a
        // checkpoint hashes the whole image) may take a while after the copy ended.
        // Once a master target reports the replica, its first point is waited for longer.
        let waited = crate::db::now() - job.created_unix_ms;
        let limit = if status.master_targets.is_empty() {
            self.heartbeat_timeout_ms
        } else {
            FIRST_POINT_WAIT_MS.max(self.heartbeat_timeout_ms)
        };
        if replicated && !has_points && waited < limit {
            self.db.set_progress(
                id,
                &json!({"waiting_for": "the master target's first recovery point"}),
            )?;
            return Ok(None);
        }
        if !(replicated && has_points) {
            self.fail(
                id,
                format!(
                    "machine {:?} is not protected ({}): a {} needs recovery points; protect it and wait for its initial sync",
                    job.machine,
                    serde_json::to_value(status.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    job.kind.as_str()
                ),
            )?;
            return Ok(None);
        }
        let mt = match status.master_targets.as_slice() {
            [mt] => mt.clone(),
            many => {
                self.fail(
                    id,
                    format!(
                        "machine {:?} has replicas at {} master targets ({}): a {} needs exactly one",
                        job.machine,
                        many.len(),
                        many.join(", "),
                        job.kind.as_str()
                    ),
                )?;
                return Ok(None);
            }
        };
        Ok(Some((status, mt)))
    }

    /// Ends `job` with the answer to its last command, once there is one: succeeded with the
    /// answer's result (and the master target), or failed with its reason.
    fn finish(
        &self,
        job: &Job,
        data: &Data,
        done: impl FnOnce(&Value) -> String,
        could_not: &str,
    ) -> Result<(), DbError> {
        let mt = data
            .get("master_target")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let Some(mut result) = self.answer(job.id, |why| {
            format!("master target {mt:?} could not {could_not}: {why}")
        })?
        else {
            return Ok(());
        };
        if let Value::Object(o) = &mut result {
            o.insert("master_target".into(), json!(mt));
            for key in ["planned", "source_agent"] {
                if let Some(v) = data.get(key) {
                    o.insert(key.into(), v.clone());
                }
            }
        }
        let message = done(&result);
        self.db
            .end_job(job.id, JobState::Succeeded, &message, &result)?;
        Ok(())
    }

    fn step(&self, row: Row) -> Result<(), DbError> {
        let Row {
            job,
            step,
            mut data,
        } = row;
        let id = job.id;
        let machine = job.machine.clone();
        match (job.kind, step) {
            (JobKind::TestFailover | JobKind::Failover, 0) => {
                let Some((status, mt)) = self.source(&job)? else {
                    return Ok(());
                };
                let point = match point(&data) {
                    Ok(p) => p,
                    Err(why) => return self.fail(id, why),
                };
                let disks: Vec<String> = status.disks.iter().map(|d| d.name.clone()).collect();
                data.insert("master_target".into(), json!(mt));
                if let Some(agent) = &status.agent {
                    // Where the machine ran: a reprotect takes its disks there back.
                    data.insert("source_agent".into(), json!(agent));
                }
                data.insert("disks".into(), json!(disks));
                if job.kind == JobKind::Failover && !data.contains_key("format") {
                    // A site in Azure boots fixed VHDs: the disks are materialized as such.
                    let site = self
                        .components()?
                        .into_iter()
                        .find(|c| c.name == mt)
                        .map(|c| c.site);
                    let azure = match site {
                        Some(site) => self
                            .db
                            .get_inventory::<crate::inventory::Site>("site", &site)?
                            .is_some_and(|s| s.kind == crate::inventory::SiteKind::Azure),
                        None => false,
                    };
                    if azure {
                        data.insert("format".into(), json!("vhd"));
                    }
                }
                let format = data.get("format").cloned().unwrap_or(Value::Null);
                let start = |kind: &str, at: &Value| {
                    let mut params =
                        json!({"job": id, "machine": machine, "disks": disks, "at": at});
                    if kind == "failover-start" {
                        params["format"] = format.clone();
                    }
                    (mt.clone(), kind.to_string(), params)
                };
                let planned = data.get("planned") == Some(&json!(true));
                let (to, (component, kind, params)) = match job.kind {
                    JobKind::TestFailover => (2, start("recovery-start", &point)),
                    // The source stops first: its final mark is the point, nothing is lost.
                    JobKind::Failover if planned => {
                        if status.agent_health != Some(ComponentHealth::Healthy) {
                            return self.fail(
                                id,
                                format!(
                                    "the agent of {machine:?} is not healthy: a planned failover stops the machine through it; start it, or fail over unplanned to a point"
                                ),
                            );
                        }
                        (1, (machine.clone(), "drain".to_string(), json!({"job": id})))
                    }
                    // `latest`: what the process server holds reaches the master target first.
                    _ if matches!(
                        data.get("point").and_then(Value::as_str),
                        None | Some("latest")
                    ) =>
                    {
                        data.insert("drain_backlog".into(), json!(true));
                        self.db.advance(id, 0, 2, &data, None)?;
                        return Ok(());
                    }
                    _ => (3, start("failover-start", &point)),
                };
                self.db
                    .advance(id, 0, to, &data, Some((&component, &kind, params)))?;
            }
            (JobKind::TestFailover, 2) => self.finish(
                &job,
                &data,
                |r| {
                    format!(
                        "the disks of {machine:?} are served at {} by master target {}, isolated: writes go to scratch targets, replication goes on; run test-failover-cleanup when done",
                        r["address"].as_str().unwrap_or("?"),
                        r["master_target"]
                    )
                },
                "serve the disks",
            )?,
            (JobKind::Failover, 1) => {
                let Some(answer) = self.db.command_answer(id)? else {
                    return Ok(());
                };
                let Some(seq) = answer["result"]["seq"].as_u64().filter(|_| answer["ok"] == true)
                else {
                    let why = if answer["ok"] == true {
                        "its answer names no final mark (upgrade the agent)"
                    } else {
                        answer["error"].as_str().unwrap_or("no reason given")
                    };
                    return self.fail(
                        id,
                        format!(
                            "the planned failover of {machine:?} stopped at the drain: {why}. The agent may refuse writes already (a failed-over marker in its log directory): fail over unplanned to the latest point, or, to run the machine here again, remove the marker and restart the agent"
                        ),
                    );
                };
                data.insert("final_seq".into(), json!(seq));
                self.db.advance(id, 1, 2, &data, None)?;
            }
            (JobKind::Failover, 2) if data.get("drain_backlog") == Some(&json!(true)) => {
                // Until no healthy process server holds records of the machine that the master
                // target lacks, for at most two heartbeat timeouts.
                let backlog = self
                    .status_of(&machine)?
                    .and_then(|s| s.backlog_bytes)
                    .unwrap_or(0);
                let waited = crate::db::now() - job.created_unix_ms;
                if backlog > 0 && waited < 2 * self.heartbeat_timeout_ms {
                    return Ok(());
                }
                if backlog > 0 {
                    tracing::warn!(job = id, backlog, "the process server's backlog did not drain: failing over to the latest point the master target holds");
                }
                let mt = data
                    .get("master_target")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let params = json!({"job": id, "machine": machine, "disks": data.get("disks"), "at": Value::Null, "format": data.get("format")});
                self.db
                    .advance(id, 2, 3, &data, Some((&mt, "failover-start", params)))?;
            }
            (JobKind::Failover, 2) => {
                // Until the final mark is durable at the master target.
                let final_seq = data.get("final_seq").and_then(Value::as_u64).unwrap_or(0);
                // Listed as a point at the master target, for every disk.
                let arrived = self.status_of(&machine)?.is_some_and(|s| {
                    !s.disks.is_empty()
                        && s.disks
                            .iter()
                            .all(|d| d.latest_point_seq.is_some_and(|seq| seq >= final_seq))
                });
                if arrived {
                    let mt = data
                        .get("master_target")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let params = json!({"job": id, "machine": machine, "disks": data.get("disks"), "at": final_seq, "format": data.get("format")});
                    self.db
                        .advance(id, 2, 3, &data, Some((&mt, "failover-start", params)))?;
                }
            }
            (JobKind::Failover, 3) => self.finish(
                &job,
                &data,
                |r| {
                    format!(
                        "machine {machine:?} is failed over: its disks are served at {} by master target {} at seq {}{}, and copied into whole disks there{}",
                        r["address"].as_str().unwrap_or("?"),
                        r["master_target"],
                        r["seq"],
                        if r["planned"] == true {
                            " (its final mark: nothing was lost)"
                        } else {
                            ""
                        },
                        match r["materialized"].as_array() {
                            Some(files) if !files.is_empty() => format!(
                                "; materialized at the point as {}",
                                files
                                    .iter()
                                    .map(|f| f["path"].as_str().unwrap_or("?"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            _ => String::new(),
                        }
                    )
                },
                "serve the disks",
            )?,
            (JobKind::ChangePoint | JobKind::Commit, 0) => {
                let failover = self.status_of(&machine)?.and_then(|s| s.failover);
                let Some(failover) = failover else {
                    return self.fail(
                        id,
                        format!("machine {machine:?} is not failed over: there is nothing to {}", job.kind.as_str()),
                    );
                };
                if failover["serving"] == false && job.kind == JobKind::Commit {
                    return self.fail(
                        id,
                        format!(
                            "the disks of {machine:?} are not served (a change of point failed after stopping them): run change-point again, then commit"
                        ),
                    );
                }
                if failover["committed"] == true {
                    return self.fail(
                        id,
                        format!(
                            "the failover of {machine:?} is committed at seq {}: its point cannot change any more",
                            failover["seq"]
                        ),
                    );
                }
                if job.kind == JobKind::Commit {
                    let message = format!(
                        "the failover of {machine:?} is committed at seq {}: its point is final",
                        failover["seq"]
                    );
                    self.db
                        .end_job(id, JobState::Succeeded, &message, &failover)?;
                    return Ok(());
                }
                let mt = failover["master_target"].as_str().unwrap_or("").to_string();
                data.insert("master_target".into(), json!(mt));
                data.insert("disks".into(), failover["exports"].clone());
                let params = json!({"job": id, "machine": machine});
                self.db
                    .advance(id, 0, 1, &data, Some((&mt, "failover-stop", params)))?;
            }
            (JobKind::ChangePoint, 1) => {
                let stopped = self.answer(id, |why| {
                    format!(
                        "the master target could not stop serving the disks of {machine:?}: {why}"
                    )
                })?;
                if stopped.is_none() {
                    return Ok(());
                }
                let point = match point(&data) {
                    Ok(p) => p,
                    Err(why) => return self.fail(id, why),
                };
                let mt = data
                    .get("master_target")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                // Materialized again at the new point, as the failover was.
                let format = self
                    .status_of(&machine)?
                    .and_then(|s| s.failover)
                    .and_then(|f| f["materialized"][0]["format"].as_str().map(str::to_string));
                let params = json!({"job": id, "machine": machine, "disks": data.get("disks"), "at": point, "format": format});
                self.db
                    .advance(id, 1, 2, &data, Some((&mt, "failover-start", params)))?;
            }
            (JobKind::ChangePoint, 2) => self.finish(
                &job,
                &data,
                |r| {
                    format!(
                        "the disks of {machine:?} are served at seq {} now, at {}; what the machine wrote since the failover was dropped",
                        r["seq"],
                        r["address"].as_str().unwrap_or("?")
                    )
                },
                "serve the disks at that point",
            )?,
            (JobKind::Protect, 0) => {
                let policy = data
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if data.get(PUSHED) == Some(&json!(true)) {
                    // Sends an edit of the machine's policy: only while it is still its policy
                    // (it may have been changed or taken away meanwhile).
                    let still = self
                        .db
                        .protections()?
                        .iter()
                        .any(|(p, _)| p.machine == machine && p.policy == policy);
                    if !still {
                        let message = format!(
                            "machine {machine:?} is no longer protected with policy {policy:?}: the policy's edit is not sent"
                        );
                        self.db
                            .end_job(id, JobState::Cancelled, &message, &Value::Null)?;
                        return Ok(());
                    }
                    data.insert("started_ms".into(), json!(crate::db::now()));
                    self.db.advance(id, 0, 1, &data, None)?;
                    return Ok(());
                }
                match self.db.set_protection(&machine, &policy) {
                    Ok(_) => {
                        data.insert("started_ms".into(), json!(crate::db::now()));
                        self.db.advance(id, 0, 1, &data, None)?;
                    }
                    Err(DbError::NotFound(why) | DbError::Conflict(why)) => {
                        return self.fail(id, why);
                    }
                    Err(e) => return Err(e),
                }
            }
            (JobKind::Protect, 1) => {
                let Some(status) = self.status_of(&machine)? else {
                    return self.fail(id, format!("machine {machine:?} left the inventory"));
                };
                if status.state == ProtectionState::Protected {
                    // The master target keeps the points as long as the policy says.
                    let policy = data
                        .get("policy")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let Some(policy) = self.db.get_policy(&policy)? else {
                        return self.fail(id, format!("policy {policy:?} was deleted meanwhile"));
                    };
                    // The master target's report may trail the process server's: wait for
                    // it, up to a heartbeat timeout from when the machine was seen protected.
                    let seen = data
                        .entry("protected_ms")
                        .or_insert_with(|| json!(crate::db::now()))
                        .as_i64()
                        .unwrap_or(0);
                    // Protected means recovery points: a replica its master target cannot
                    // keep (its store refuses the credentials, say) is not.
                    if let Some((mt, problem)) = self.replica_problem(&machine)? {
                        let waited = crate::db::now() - seen;
                        if problem.lasting || waited >= FIRST_POINT_WAIT_MS {
                            return self.fail(
                                id,
                                format!(
                                    "master target {mt:?} cannot keep the recovery points of {machine:?}: {}; mend that (for a store on Azure Blob: the storage account's credentials, the container, the key file) and run the protect again",
                                    problem.error
                                ),
                            );
                        }
                        self.db.set_progress(
                            id,
                            &json!({"percent": 100.0, "waiting_for": format!("master target {mt:?}, which makes no point now: {}", problem.error)}),
                        )?;
                        self.db.advance(id, 1, 1, &data, None)?;
                        return Ok(());
                    }
                    if status.master_targets.is_empty()
                        && crate::db::now() - seen < self.heartbeat_timeout_ms
                    {
                        self.db.advance(id, 1, 1, &data, None)?;
                        return Ok(());
                    }
                    let [mt] = status.master_targets.as_slice() else {
                        return self.fail(
                            id,
                            format!(
                                "machine {machine:?} has replicas at {} master targets ({}): its retention cannot be set at exactly one",
                                status.master_targets.len(),
                                status.master_targets.join(", ")
                            ),
                        );
                    };
                    data.insert("master_target".into(), json!(mt));
                    data.insert("latest_point_seq".into(), json!(status.latest_point_seq));
                    self.db.set_progress(
                        id,
                        &json!({"percent": 100.0, "copied_bytes": status.disks.iter().map(|d| d.size_bytes).sum::<u64>()}),
                    )?;
                    let params = json!({"job": id, "machine": machine, "retention_seconds": policy.retention_seconds});
                    self.db
                        .advance(id, 1, 2, &data, Some((mt, "replica-policy", params)))?;
                    return Ok(());
                }
                let started = data.get("started_ms").and_then(Value::as_i64).unwrap_or(0);
                let progress = sync_progress(&status, started);
                self.db.set_progress(id, &progress)?;
            }
            (JobKind::Protect, 2) => {
                let kept = self.answer(id, |why| {
                    format!(
                        "the master target could not keep the points of {machine:?} as the policy says: {why}"
                    )
                })?;
                if kept.is_none() {
                    return Ok(());
                }
                // The agent takes app-consistent marks as often as the policy says.
                let policy = data
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let Some(policy) = self.db.get_policy(&policy)? else {
                    return self.fail(id, format!("policy {policy:?} was deleted meanwhile"));
                };
                data.insert("retention_seconds".into(), json!(policy.retention_seconds));
                let params = json!({"job": id, "seconds": policy.app_consistent_seconds});
                self.db.advance(
                    id,
                    2,
                    3,
                    &data,
                    Some((&machine, "app-mark-interval", params)),
                )?;
            }
            (JobKind::Protect, 3) => {
                let Some(taken) = self.answer(id, |why| {
                    format!(
                        "the agent of {machine:?} could not take the policy's app-consistent schedule: {why}"
                    )
                })?
                else {
                    return Ok(());
                };
                let get = |k: &str| data.get(k).cloned().unwrap_or(Value::Null);
                let result = json!({
                    "percent": 100.0,
                    "master_target": get("master_target"),
                    "latest_point_seq": get("latest_point_seq"),
                    "retention_seconds": get("retention_seconds"),
                    "app_consistent_seconds": taken["seconds"],
                });
                let message = format!(
                    "machine {machine:?} is protected with policy {}: its disks are whole at master target {}, the newest point at seq {}; points are kept {} s, app-consistent marks every {} s",
                    get("policy"),
                    get("master_target"),
                    get("latest_point_seq"),
                    get("retention_seconds"),
                    taken["seconds"]
                );
                self.db.end_job(id, JobState::Succeeded, &message, &result)?;
            }
            (JobKind::Reprotect, _) => self.reprotect(&job, step, data)?,
            (JobKind::Failback, _) => self.failback(&job, step, data)?,
            (JobKind::TestFailoverCleanup, 0) => {
                // Every test failover of the machine since its last cleanup that got as far as
                // its master target (succeeded, or failed or cancelled on the way).
                let jobs = self.db.list_jobs(0, u32::MAX)?;
                let since = jobs
                    .iter()
                    .filter(|j| {
                        j.machine == machine
                            && j.id < id
                            && j.kind == JobKind::TestFailoverCleanup
                            && j.state == JobState::Succeeded
                    })
                    .map(|j| j.id)
                    .max()
                    .unwrap_or(0);
                let tests: Vec<&Job> = jobs
                    .iter()
                    .filter(|j| {
                        j.machine == machine
                            && j.id > since
                            && j.id < id
                            && j.kind == JobKind::TestFailover
                            && j.step != "check"
                    })
                    .collect();
                let mt = tests
                    .iter()
                    .rev()
                    .find_map(|j| self.db.job_master_target(j.id).ok().flatten());
                let (Some(mt), false) = (mt, tests.is_empty()) else {
                    return self.fail(
                        id,
                        format!("machine {machine:?} has no test failover to clean up"),
                    );
                };
                let ids: Vec<i64> = tests.iter().map(|j| j.id).collect();
                data.insert("master_target".into(), json!(mt));
                data.insert("tests".into(), json!(ids));
                let params = json!({"job": id, "jobs": ids});
                self.db
                    .advance(id, 0, 2, &data, Some((&mt, "recovery-stop", params)))?;
            }
            (JobKind::TestFailoverCleanup, 2) => self.finish(
                &job,
                &data,
                |_| format!("the test failovers of {machine:?} are stopped and their scratch targets deleted"),
                "stop the test failover",
            )?,
            (_, step) => {
                self.fail(
                    id,
                    format!("job {id} is at step {step}, which its kind does not have"),
                )?;
            }
        }
        Ok(())
    }
}

impl Engine<'_> {
    /// A string `key` of `data` (empty if absent).
    fn text(data: &Data, key: &str) -> String {
        data.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// Reprotect (DESIGN 3.4): after a failover, the failed-over disks become the source and
    /// the machine's own disks at its original site the replica, so only the blocks that
    /// differ travel; after a failback, the same the other way. Steps:
    ///
    /// 1. `release-source`: the agent that served the disks that become the replica lets go
    ///    of them (it refuses if the machine wrote there after the failover's point, unless
    ///    the operator discards that), and says where they are;
    /// 2. `release-failover` (after a failover): the master target that serves the
    ///    failed-over disks stops, once they are whole, and says where they are;
    /// 3. `adopt`: the replica's master target takes the old source's disks as the replica;
    /// 4. `attach`: the agent at the new source serves and replicates the failed-over disks;
    /// 5. `sync`: its copy (blocks that differ) runs until the machine is protected.
    fn reprotect(&self, job: &Job, step: usize, mut data: Data) -> Result<(), DbError> {
        let (id, machine) = (job.id, job.machine.as_str());
        let text = |d: &Data, k: &str| Self::text(d, k);
        match step {
            0 => {
                let Some(last) = self.last_move(machine, id)? else {
                    return self.fail(
                        id,
                        format!("machine {machine:?} is neither failed over nor failed back: there is nothing to reprotect"),
                    );
                };
                let Some(status) = self.status_of(machine)? else {
                    return self.fail(id, format!("machine {machine:?} is not in the inventory"));
                };
                let result = last.result.clone().unwrap_or(Value::Null);
                let components = self.components()?;
                let named = |name: &str| components.iter().find(|c| c.name == name);
                let (old_agent, point, new_agent, failover_mt, new_disks) = match last.kind {
                    JobKind::Failover => {
                        let failover = status.failover.clone().unwrap_or(Value::Null);
                        if failover["committed"] != true {
                            return self.fail(
                                id,
                                format!("the failover of {machine:?} is not committed: commit it first (or change its point, then commit)"),
                            );
                        }
                        let old = result["source_agent"]
                            .as_str()
                            .unwrap_or(machine)
                            .to_string();
                        let new = match data.get("agent").and_then(Value::as_str) {
                            Some(a) => a.to_string(),
                            None => {
                                let standing: Vec<&str> =
                                    crate::status::machine_agents(&components, machine)
                                        .filter(|c| {
                                            c.name != old
                                                && c.last
                                                    .as_ref()
                                                    .is_some_and(|b| b.standby == Some(true))
                                        })
                                        .map(|c| c.name.as_str())
                                        .collect();
                                match standing.as_slice() {
                                    [one] => one.to_string(),
                                    [] => return self.fail(
                                        id,
                                        format!("no agent of {machine:?} stands by to serve its failed-over disks: start one at the recovery site (boomerang agent --standby --name {machine} ...), or name one with --agent"),
                                    ),
                                    many => return self.fail(
                                        id,
                                        format!("several agents of {machine:?} stand by ({}): name one with --agent", many.join(", ")),
                                    ),
                                }
                            }
                        };
                        (
                            old,
                            failover["seq"].clone(),
                            new,
                            failover["master_target"].as_str().map(str::to_string),
                            Value::Null,
                        )
                    }
                    JobKind::Failback => (
                        result["drained_agent"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        result["final_seq"].clone(),
                        result["agent"].as_str().unwrap_or_default().to_string(),
                        None,
                        // The failback left both sites' disks equal at its final mark, and
                        // the home agent has logged every write since: nothing else differs.
                        {
                            let mut disks = result["disks"].clone();
                            for d in disks.as_array_mut().into_iter().flatten() {
                                d["resync"] = json!([]);
                            }
                            disks
                        },
                    ),
                    _ => {
                        return self.fail(
                            id,
                            format!("machine {machine:?} is reprotected already (job {}): fail it back, or fail it over, first", last.id),
                        );
                    }
                };
                let Some(old) = named(&old_agent) else {
                    return self.fail(id, format!("there is no agent {old_agent:?} (where {machine:?} ran before): enrol and start it"));
                };
                let Some(new) = named(&new_agent) else {
                    return self.fail(id, format!("there is no agent {new_agent:?}: enrol it, and start it at the site where {machine:?} runs now"));
                };
                if new.role != crate::components::ComponentRole::Agent {
                    return self.fail(
                        id,
                        format!("{new_agent:?} is a {}, not an agent", new.role.as_str()),
                    );
                }
                // The machine's own agent, and (after a failover) one standing by: another
                // machine's agent would replicate these disks as that machine's.
                let its = crate::status::machine_agents(&components, machine)
                    .any(|c| c.name == new_agent);
                // Standing by, or serving them already (a reprotect run again).
                let free = new.last.as_ref().is_some_and(|b| {
                    b.standby == Some(true) || b.disks.as_ref().is_some_and(|d| !d.is_empty())
                });
                if !its || new_agent == old_agent || (last.kind == JobKind::Failover && !free) {
                    return self.fail(
                        id,
                        format!("agent {new_agent:?} is not an agent of {machine:?} standing by at the recovery site: enrol one with --machine {machine} and start it with --standby, or name another with --agent"),
                    );
                }
                // The replica is kept where the old source's disks are.
                let target = match data.get("master_target").and_then(Value::as_str) {
                    Some(mt) => mt.to_string(),
                    None if last.kind == JobKind::Failback => result["other_master_target"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    None => {
                        let there: Vec<&str> = components
                            .iter()
                            .filter(|c| {
                                c.role == crate::components::ComponentRole::MasterTarget
                                    && c.site == old.site
                            })
                            .map(|c| c.name.as_str())
                            .collect();
                        match there.as_slice() {
                            [one] => one.to_string(),
                            [] => return self.fail(id, format!("site {:?} (where {machine:?} ran before) has no master target: enrol one there, or name one with --master-target", old.site)),
                            many => return self.fail(id, format!("site {:?} has several master targets ({}): name one with --master-target", old.site, many.join(", "))),
                        }
                    }
                };
                match named(&target) {
                    Some(c) if c.role == crate::components::ComponentRole::MasterTarget => {}
                    _ => return self.fail(id, format!("there is no master target {target:?}")),
                }
                // The preflight, against what this job uses, before anything changes.
                let asked = json!({
                    "master_target": target,
                    "process_server": data.get("process_server"),
                    "datastore": data.get("datastore"),
                });
                if self.preflight_passed(id, &data, "reprotect", asked)? != Some(true) {
                    return Ok(());
                }
                if !point.is_u64() {
                    return self.fail(
                        id,
                        format!(
                            "the {} of {machine:?} (job {}) names no point",
                            last.kind.as_str(),
                            last.id
                        ),
                    );
                }
                // The lineage of the new replica: a reprotect after a failover starts one (the
                // failover's number: higher than any before, and the same for a reprotect run
                // again after one cancelled or failed); after a failback, the home agent's log
                // goes on in the one the failback started.
                let lineage = match last.kind {
                    JobKind::Failback => match result["lineage"].as_u64() {
                        Some(l) => l,
                        None => {
                            return self.fail(
                                id,
                                format!("the failback of {machine:?} (job {}) names no lineage: it is from an older server; fail the machine over and reprotect it", last.id),
                            );
                        }
                    },
                    _ => last.id as u64,
                };
                data.insert("lineage".into(), json!(lineage));
                data.insert("old_agent".into(), json!(old_agent));
                data.insert("new_agent".into(), json!(new_agent));
                data.insert("point".into(), point.clone());
                data.insert("master_target".into(), json!(target));
                data.insert("after".into(), json!(last.kind.as_str()));
                if let Some(mt) = &failover_mt {
                    data.insert("failover_master_target".into(), json!(mt));
                }
                data.insert("new_disks".into(), new_disks);
                if data.contains_key("datastore") && data.contains_key("alternate_dir") {
                    return self.fail(
                        id,
                        "give the alternate location once: a datastore (--alternate --datastore) or a directory (--alternate-dir)".into(),
                    );
                }
                if let Some(ds) = data.get("datastore").and_then(Value::as_str) {
                    let found = self
                        .db
                        .get_inventory::<crate::inventory::Datastore>("datastore", ds)?;
                    match found.and_then(|d| d.path) {
                        Some(path) if path.starts_with('/') => {
                            data.insert("alternate_dir".into(), json!(path));
                        }
                        _ => return self.fail(
                            id,
                            format!("datastore {ds:?} has no path in the inventory: declare where its disks are (path = \"/...\", as the master target's host sees it), or give --alternate-dir"),
                        ),
                    }
                }
                if let Some(ps) = data.get("process_server").and_then(Value::as_str) {
                    let found = self
                        .db
                        .get_inventory::<crate::inventory::ProcessServer>("process-server", ps)?;
                    let Some(found) = found else {
                        return self
                            .fail(id, format!("process server {ps:?} is not in the inventory"));
                    };
                    data.insert("process_server_address".into(), json!(found.address));
                }
                let alternate = data.contains_key("alternate_dir");
                if alternate && last.kind != JobKind::Failover {
                    return self.fail(
                        id,
                        format!("machine {machine:?} was failed back: it is reprotected into the disks it ran on at the recovery site; --alternate-dir is for a reprotect after a failover"),
                    );
                }
                // At an alternate location the old disks stay as they are: what the machine
                // wrote there after the point is kept in them, not lost.
                let params = json!({
                    "job": id,
                    "point": point,
                    "discard_unreplicated": alternate || data.get("discard_unreplicated") == Some(&json!(true)),
                });
                self.db
                    .advance(id, 0, 1, &data, Some((&old_agent, "release", params)))?;
            }
            1 => {
                let old = text(&data, "old_agent");
                let Some(released) = self.answer(id, |why| {
                    format!("agent {old:?} could not let go of the disks of {machine:?}: {why}")
                })?
                else {
                    return Ok(());
                };
                if released["disks"].as_array().is_none_or(|d| d.is_empty()) {
                    return self.fail(
                        id,
                        format!("agent {old:?} served no disk of {machine:?}: there is nothing to take as the replica; name the master target and disks by hand, or protect the machine again"),
                    );
                }
                // The failed-over disks must be whole before their master target lets go.
                // (Handed over already by an earlier reprotect that stopped later on: whole.)
                let failover = self.status_of(machine)?.and_then(|s| s.failover);
                let handed_over = failover.as_ref().is_some_and(|f| f["released"] == true);
                if data.contains_key("failover_master_target") && !handed_over {
                    let hydrated = failover.and_then(|f| f["hydrated_percent"].as_f64());
                    if hydrated.is_none_or(|p| p < 100.0) {
                        self.db.set_progress(
                            id,
                            &json!({"waiting_for": "hydration", "hydrated_percent": hydrated}),
                        )?;
                        return Ok(());
                    }
                }
                data.insert("replica_disks".into(), released["disks"].clone());
                if !released["discarded"].is_null() {
                    // Recorded: what the operator chose to drop.
                    data.insert("discarded".into(), released["discarded"].clone());
                }
                if let Some(mt) = data
                    .get("failover_master_target")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                {
                    let params = json!({"job": id, "machine": machine});
                    self.db
                        .advance(id, 1, 2, &data, Some((&mt, "failover-release", params)))?;
                } else {
                    let params = json!({"job": id, "machine": machine, "disks": released["disks"], "lineage": data.get("lineage")});
                    let mt = text(&data, "master_target");
                    self.db
                        .advance(id, 1, 3, &data, Some((&mt, "replica-adopt", params)))?;
                }
            }
            2 => {
                let mt = text(&data, "failover_master_target");
                let Some(released) = self.answer(id, |why| {
                    format!("master target {mt:?} could not hand over the failed-over disks of {machine:?}: {why}")
                })?
                else {
                    return Ok(());
                };
                // What the machine wrote at the recovery site is what differs from the replica,
                // unless the old source also wrote after the point: then its disks are
                // compared whole.
                let mut disks = released["disks"].clone();
                let old_wrote = data.get("discarded").is_some_and(|d| {
                    d["records"].as_u64().is_none_or(|r| r > 0) || d["complete"] != true
                });
                // At an alternate location the replica is new, empty disks: everything is
                // copied (the blocks of zeros excepted).
                let alternate = data
                    .get("alternate_dir")
                    .and_then(Value::as_str)
                    .map(|d| d.trim_end_matches('/').to_string());
                if old_wrote || alternate.is_some() {
                    for d in disks.as_array_mut().into_iter().flatten() {
                        d["resync"] = Value::Null;
                    }
                }
                if let Some(dir) = &alternate {
                    let new: Vec<Value> = disks
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|d| {
                            json!({
                                "name": d["name"],
                                "path": format!("{dir}/{machine}-{}.img", d["name"].as_str().unwrap_or("disk")),
                                "create_size": d["size"],
                            })
                        })
                        .collect();
                    data.insert("replica_disks".into(), json!(new));
                }
                data.insert("new_disks".into(), disks);
                let params = json!({"job": id, "machine": machine, "disks": data.get("replica_disks"), "lineage": data.get("lineage")});
                let target = text(&data, "master_target");
                self.db
                    .advance(id, 2, 3, &data, Some((&target, "replica-adopt", params)))?;
            }
            3 => {
                let mt = text(&data, "master_target");
                if self.answer(id, |why| {
                    format!("master target {mt:?} could not take the disks of {machine:?} as its replica: {why}")
                })?
                .is_none()
                {
                    return Ok(());
                }
                let mut params = json!({"job": id, "disks": data.get("new_disks"), "replicate": true, "lineage": data.get("lineage")});
                if let Some(ps) = data.get("process_server_address") {
                    params["process_server"] = ps.clone();
                }
                let agent = text(&data, "new_agent");
                self.db
                    .advance(id, 3, 4, &data, Some((&agent, "attach", params)))?;
            }
            4 => {
                let agent = text(&data, "new_agent");
                if self
                    .answer(id, |why| {
                        format!("agent {agent:?} could not serve the disks of {machine:?}: {why}")
                    })?
                    .is_none()
                {
                    return Ok(());
                }
                data.insert("started_ms".into(), json!(crate::db::now()));
                self.db.advance(id, 4, 5, &data, None)?;
            }
            5 => {
                let Some(status) = self.status_of(machine)? else {
                    return self.fail(id, format!("machine {machine:?} left the inventory"));
                };
                let target = text(&data, "master_target");
                let agent = text(&data, "new_agent");
                let started = data.get("started_ms").and_then(Value::as_i64).unwrap_or(0);
                // Every process server that carries the machine's log has reported since the
                // attach: a report from before may still show the old source's stream as
                // connected, and its marks as this replica's.
                let fresh = self.components()?.iter().all(|c| {
                    c.role != crate::components::ComponentRole::ProcessServer
                        || c.health != ComponentHealth::Healthy
                        || !c.last.as_ref().is_some_and(|b| {
                            b.streams.iter().flatten().any(|s| s.machine == machine)
                        })
                        || c.last_heartbeat_unix_ms.is_some_and(|t| t > started)
                });
                let whole = fresh
                    && status.state == ProtectionState::Protected
                    && status.agent.as_deref() == Some(agent.as_str())
                    && status.master_targets == [target.clone()];
                // Replicated without points is not reprotected.
                if let Some((mt, problem)) = self.replica_problem(machine)?
                    && mt == target
                    && problem.lasting
                {
                    return self.fail(
                        id,
                        format!(
                            "agent {agent:?} replicates machine {machine:?} to master target {mt:?}, which cannot keep its recovery points: {}; mend that (for a store on Azure Blob: the storage account's credentials, the container, the key file): the records are kept there, and the machine becomes protected once points are made (boomerang status)",
                            problem.error
                        ),
                    );
                }
                if !whole {
                    let progress = sync_progress(&status, started);
                    self.db.set_progress(id, &progress)?;
                    return Ok(());
                }
                let get = |k: &str| data.get(k).cloned().unwrap_or(Value::Null);
                let result = json!({
                    "percent": 100.0,
                    "agent": agent,
                    "released_agent": get("old_agent"),
                    "master_target": target,
                    "other_master_target": get("failover_master_target"),
                    "point": get("point"),
                    "latest_point_seq": status.latest_point_seq,
                    "discarded": if data.contains_key("alternate_dir") { Value::Null } else { get("discarded") },
                    "alternate_dir": get("alternate_dir"),
                    "lineage": get("lineage"),
                });
                let message = format!(
                    "machine {machine:?} is reprotected: agent {agent:?} replicates it to master target {target:?}, into {}; the newest point is at seq {}",
                    match (data.get("alternate_dir"), data.get("discarded")) {
                        (Some(dir), _) => format!(
                            "new disks in {} (an alternate location; the disks it ran on before are kept as they were)",
                            dir.as_str().unwrap_or("?")
                        ),
                        (None, Some(d)) if d["records"].as_u64().is_some_and(|r| r > 0) => format!(
                            "the disks it ran on before ({} change(s), {} byte(s), written there after the failover's point were discarded)",
                            d["records"], d["bytes"]
                        ),
                        _ => "the disks it ran on before".to_string(),
                    },
                    status
                        .latest_point_seq
                        .map_or("-".into(), |s| s.to_string())
                );
                self.db
                    .end_job(id, JobState::Succeeded, &message, &result)?;
            }
            _ => self.fail(
                id,
                format!("job {id} is at step {step}, which a reprotect does not have"),
            )?,
        }
        Ok(())
    }

    /// Failback: a planned failover of a reprotected machine back to its original site, into
    /// its own disks there. The agent at the recovery site stops the machine at a final mark
    /// (`drain`); once that mark is a point at the master target (`catch-up`), the master
    /// target hands the disks back (`release-replica`) and the agent at home serves them
    /// (`attach`), not replicated until the next reprotect.
    fn failback(&self, job: &Job, step: usize, mut data: Data) -> Result<(), DbError> {
        let (id, machine) = (job.id, job.machine.as_str());
        let text = |d: &Data, k: &str| Self::text(d, k);
        match step {
            0 => {
                let last = self.last_move(machine, id)?;
                let Some(reprotect) = last.filter(|j| j.kind == JobKind::Reprotect) else {
                    return self.fail(
                        id,
                        format!("machine {machine:?} is not reprotected: a failback brings a machine home once it replicates back there (fail over, commit, reprotect first)"),
                    );
                };
                let result = reprotect.result.clone().unwrap_or(Value::Null);
                if result["other_master_target"].is_null() {
                    return self.fail(
                        id,
                        format!("machine {machine:?} is home already (it was failed back and reprotected): fail it over to fail it back"),
                    );
                }
                let Some(status) = self.status_of(machine)? else {
                    return self.fail(id, format!("machine {machine:?} is not in the inventory"));
                };
                let agent = result["agent"].as_str().unwrap_or_default().to_string();
                let mt = result["master_target"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let asked = json!({"master_target": mt, "process_server": null, "datastore": null});
                if self.preflight_passed(id, &data, "failback", asked)? != Some(true) {
                    return Ok(());
                }
                if !matches!(
                    status.state,
                    ProtectionState::Protected | ProtectionState::Resync
                ) || status.master_targets != [mt.clone()]
                {
                    return self.fail(
                        id,
                        format!("machine {machine:?} is not protected at master target {mt:?} (its replica at home): wait for its reprotect's copy to finish"),
                    );
                }
                if status.agent.as_deref() != Some(agent.as_str())
                    || status.agent_health != Some(ComponentHealth::Healthy)
                {
                    return self.fail(
                        id,
                        format!("agent {agent:?}, which serves {machine:?} now, is not healthy: a failback stops the machine through it; start it"),
                    );
                }
                data.insert("agent".into(), json!(agent));
                data.insert("master_target".into(), json!(mt));
                // The agent at home takes the disks back at the end: it must be there, before
                // the machine is stopped here.
                let Some(home) = result["released_agent"].as_str().map(str::to_string) else {
                    return self.fail(
                        id,
                        format!(
                            "the reprotect of {machine:?} (job {}) names no agent at home",
                            reprotect.id
                        ),
                    );
                };
                let components = self.components()?;
                let ready = components.iter().any(|c| {
                    c.name == home
                        && c.health == ComponentHealth::Healthy
                        && c.last.as_ref().is_some_and(|b| b.standby == Some(true))
                });
                if !ready {
                    return self.fail(
                        id,
                        format!("agent {home:?} at home is not healthy and standing by: start it (it takes {machine:?}'s disks back at the end of the failback) before the machine is stopped where it runs"),
                    );
                }
                data.insert("home_agent".into(), json!(home));
                data.insert(
                    "other_master_target".into(),
                    result["other_master_target"].clone(),
                );
                self.db
                    .advance(id, 0, 1, &data, Some((&agent, "drain", json!({"job": id}))))?;
            }
            1 => {
                let agent = text(&data, "agent");
                let Some(drained) = self.answer(id, |why| {
                    format!("the failback of {machine:?} stopped at the drain: {why}. Agent {agent:?} may refuse writes already (a failed-over marker in its log directory): to run the machine there again, remove the marker and restart the agent")
                })?
                else {
                    return Ok(());
                };
                let Some(seq) = drained["seq"].as_u64() else {
                    return self.fail(
                        id,
                        format!("agent {agent:?} named no final mark (upgrade it)"),
                    );
                };
                data.insert("final_seq".into(), json!(seq));
                self.db.advance(id, 1, 2, &data, None)?;
            }
            2 => {
                let final_seq = data
                    .get("final_seq")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                // Durable at the master target at home: its replica-release then waits until
                // every record is in the disks (a point, which may take a checkpoint of the
                // whole disk first, is not needed).
                let arrived = self
                    .status_of(machine)?
                    .is_some_and(|s| s.latest_point_seq.is_some_and(|seq| seq >= final_seq));
                if arrived {
                    let mt = text(&data, "master_target");
                    self.db.advance(
                        id,
                        2,
                        3,
                        &data,
                        Some((
                            &mt,
                            "replica-release",
                            json!({"job": id, "machine": machine}),
                        )),
                    )?;
                }
            }
            3 => {
                let mt = text(&data, "master_target");
                let Some(released) = self.answer(id, |why| {
                    format!(
                        "master target {mt:?} could not hand the disks of {machine:?} back: {why}"
                    )
                })?
                else {
                    return Ok(());
                };
                data.insert("disks".into(), released["disks"].clone());
                let home = text(&data, "home_agent");
                // At home the disks start a new lineage (this job's number), which the next
                // reprotect's replica takes.
                let params = json!({"job": id, "disks": released["disks"], "replicate": false, "lineage": id});
                self.db
                    .advance(id, 3, 4, &data, Some((&home, "attach", params)))?;
            }
            4 => {
                let home = text(&data, "home_agent");
                if self
                    .answer(id, |why| {
                        format!("agent {home:?} could not serve the disks of {machine:?}: {why}")
                    })?
                    .is_none()
                {
                    return Ok(());
                }
                let get = |k: &str| data.get(k).cloned().unwrap_or(Value::Null);
                let result = json!({
                    "agent": home,
                    "drained_agent": get("agent"),
                    "final_seq": get("final_seq"),
                    "disks": get("disks"),
                    "master_target": get("master_target"),
                    "other_master_target": get("other_master_target"),
                    "lineage": id,
                });
                let message = format!(
                    "machine {machine:?} is home: agent {home:?} serves its disks at the final mark (seq {}), nothing was lost; it is not replicated until you reprotect it",
                    get("final_seq")
                );
                self.db
                    .end_job(id, JobState::Succeeded, &message, &result)?;
            }
            _ => self.fail(
                id,
                format!("job {id} is at step {step}, which a failback does not have"),
            )?,
        }
        Ok(())
    }
}

/// How far a machine's copy is: disks in sync count whole, a copying one by its percent; with
/// the rate since `started_ms`, an ETA.
fn sync_progress(status: &MachineStatus, started_ms: i64) -> Value {
    let total: u64 = status.disks.iter().map(|d| d.size_bytes).sum();
    let copied: u64 = status
        .disks
        .iter()
        .map(|d| match d.sync_percent {
            Some(p) => (d.size_bytes as f64 * p / 100.0) as u64,
            None if d.sync == crate::components::DiskSync::InSync => d.size_bytes,
            None => 0,
        })
        .sum();
    let elapsed = (crate::db::now() - started_ms).max(1) as f64 / 1000.0;
    let rate = copied as f64 / elapsed;
    let eta =
        (rate > 0.0 && total > copied).then(|| ((total - copied) as f64 / rate).ceil() as u64);
    json!({
        "state": status.state,
        "copied_bytes": copied,
        "total_bytes": total,
        "percent": if total == 0 { 0.0 } else { (copied as f64 * 1000.0 / total as f64).floor() / 10.0 },
        "eta_seconds": eta,
    })
}

/// The point a job asks for, as its master target's command takes it: a sequence number,
/// `latest-app-consistent`, or null for the latest.
fn point(data: &Data) -> Result<Value, String> {
    match data.get("point").and_then(Value::as_str) {
        None | Some("latest") => Ok(Value::Null),
        Some("latest-processed") => Ok(json!("latest-processed")),
        Some("latest-app-consistent") => Ok(json!("latest-app-consistent")),
        Some(p) => p.parse::<u64>().map(|seq| json!(seq)).map_err(|_| {
            format!(
                "point {p:?} is not a sequence number: use one from `boomerang master-target points`, or latest"
            )
        }),
    }
}

#[cfg(test)]
mod tests;
