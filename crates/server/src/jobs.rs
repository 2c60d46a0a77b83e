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
//! target, isolated: writes go to scratch targets, replication goes on) and
//! `test-failover-cleanup` (stop that and delete the scratch targets).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::db::{Db, DbError};
use crate::status::ProtectionState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    TestFailover,
    TestFailoverCleanup,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::TestFailover => "test-failover",
            JobKind::TestFailoverCleanup => "test-failover-cleanup",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "test-failover" => Some(JobKind::TestFailover),
            "test-failover-cleanup" => Some(JobKind::TestFailoverCleanup),
            _ => None,
        }
    }

    /// The steps, by name, in order.
    pub fn steps(self) -> &'static [&'static str] {
        match self {
            JobKind::TestFailover => &["check", "start-recovery", "serve"],
            JobKind::TestFailoverCleanup => &["check", "stop-recovery", "clean"],
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

/// A job to run.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub kind: JobKind,
    /// The machine it is about.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub machine: String,
    /// The recovery point: a sequence number (`master-target points`), or `latest` (default).
    #[serde(default)]
    #[schema(pattern = "^(latest|[0-9]{1,19})$")]
    pub point: Option<String>,
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
type Data = serde_json::Map<String, Value>;

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

impl Db {
    /// Records a job to run, at its first step.
    pub fn create_job(&self, new: &NewJob, actor: &str) -> Result<Job, DbError> {
        let now = crate::db::now();
        let mut data = Data::new();
        if let Some(p) = &new.point {
            data.insert("point".into(), json!(p));
        }
        let id = {
            let conn = self.conn();
            conn.execute(
                "INSERT INTO jobs (kind, machine, state, step, result, requested_by, created_ms, updated_ms, data)
                 VALUES (?1, ?2, 'running', 0, 'null', ?3, ?4, ?4, ?5)",
                rusqlite::params![new.kind.as_str(), new.machine, actor, now, Value::Object(data).to_string()],
            )?;
            conn.last_insert_rowid()
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
        if row.step > 0 {
            return Err(DbError::Conflict(format!(
                "job {id} is at step {:?}, where a component is at work: it cannot be cancelled safely there; wait for it to end{}",
                row.job.step,
                if row.job.kind == JobKind::TestFailover {
                    ", then run test-failover-cleanup"
                } else {
                    ""
                }
            )));
        }
        if !self.end_job(
            id,
            JobState::Cancelled,
            "cancelled before it started",
            &Value::Null,
        )? {
            return Err(DbError::Conflict(format!(
                "job {id} moved on meanwhile: look at it again"
            )));
        }
        self.get_job(id)?
            .ok_or_else(|| DbError::NotFound(format!("job {id} vanished")))
    }

    /// The next command for `component` not answered yet (given again until it is).
    pub fn next_command(&self, component: &str) -> Result<Option<Command>, DbError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn()
            .query_row(
                "SELECT id, job, kind, params FROM commands WHERE component = ?1 AND state = 'pending' ORDER BY id LIMIT 1",
                [component],
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

/// What the engine needs besides the database.
pub struct Engine<'a> {
    pub db: &'a Db,
    pub heartbeat_timeout_ms: i64,
}

impl Engine<'_> {
    /// Moves every running job as far as it can go now.
    pub fn step_all(&self) -> Result<(), DbError> {
        for row in self.db.running_jobs()? {
            let id = row.job.id;
            if let Err(e) = self.step(row) {
                tracing::error!(job = id, error = %e, "a job step failed; it is tried again");
            }
        }
        Ok(())
    }

    fn fail(&self, id: i64, message: String) -> Result<(), DbError> {
        tracing::warn!(job = id, %message, "job failed");
        self.db
            .end_job(id, JobState::Failed, &message, &Value::Null)?;
        Ok(())
    }

    fn step(&self, row: Row) -> Result<(), DbError> {
        let Row {
            job,
            step,
            mut data,
        } = row;
        let id = job.id;
        match (job.kind, step) {
            (JobKind::TestFailover, 0) => {
                let statuses = crate::api::statuses(self.db, self.heartbeat_timeout_ms)?;
                let Some(status) = statuses.into_iter().find(|s| s.name == job.machine) else {
                    return self.fail(
                        id,
                        format!("machine {:?} is not in the inventory", job.machine),
                    );
                };
                let replicated = matches!(
                    status.state,
                    ProtectionState::Protected | ProtectionState::Resync
                );
                let has_points = status.disks.iter().any(|d| d.points > 0);
                // The master target's report may trail the process server's: wait for it, up
                // to a heartbeat timeout.
                let young = crate::db::now() - job.created_unix_ms < self.heartbeat_timeout_ms;
                if replicated && !has_points && young {
                    return Ok(());
                }
                if !(replicated && has_points) {
                    return self.fail(
                        id,
                        format!(
                            "machine {:?} is not protected ({}): a test failover needs recovery points; protect it and wait for its initial sync",
                            job.machine,
                            serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
                        ),
                    );
                }
                let [mt] = status.master_targets.as_slice() else {
                    return self.fail(
                        id,
                        format!(
                            "machine {:?} has replicas at {} master targets ({}): a test failover needs exactly one",
                            job.machine,
                            status.master_targets.len(),
                            status.master_targets.join(", ")
                        ),
                    );
                };
                let point = match data.get("point").and_then(Value::as_str) {
                    None | Some("latest") => Value::Null,
                    Some(p) => match p.parse::<u64>() {
                        Ok(seq) => json!(seq),
                        Err(_) => {
                            return self.fail(
                                id,
                                format!("point {p:?} is not a sequence number: use one from `boomerang master-target points`, or latest"),
                            );
                        }
                    },
                };
                let disks: Vec<String> = status.disks.iter().map(|d| d.name.clone()).collect();
                data.insert("master_target".into(), json!(mt));
                let params =
                    json!({"job": id, "machine": job.machine, "disks": disks, "at": point});
                self.db
                    .advance(id, 0, 1, &data, Some((mt, "recovery-start", params)))?;
                // The command is given: the next step waits for its answer.
                let _ = self.db.advance(id, 1, 2, &data, None)?;
            }
            (JobKind::TestFailover, 1) => {
                // Only reached after a crash between the two updates above: the command exists.
                self.db.advance(id, 1, 2, &data, None)?;
            }
            (JobKind::TestFailover | JobKind::TestFailoverCleanup, 2) => {
                let Some(answer) = self.db.command_answer(id)? else {
                    return Ok(());
                };
                let mt = data
                    .get("master_target")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                if answer["ok"] == true {
                    let mut result = answer["result"].clone();
                    if let Value::Object(o) = &mut result {
                        o.insert("master_target".into(), json!(mt));
                    }
                    let message = match job.kind {
                        JobKind::TestFailover => format!(
                            "the disks of {:?} are served at {} by master target {mt:?}, isolated: writes go to scratch targets, replication goes on; run test-failover-cleanup when done",
                            job.machine,
                            answer["result"]["address"].as_str().unwrap_or("?")
                        ),
                        JobKind::TestFailoverCleanup => format!(
                            "the test failover of {:?} is stopped and its scratch targets deleted",
                            job.machine
                        ),
                    };
                    self.db
                        .end_job(id, JobState::Succeeded, &message, &result)?;
                } else {
                    self.fail(
                        id,
                        format!(
                            "master target {mt:?} could not {}: {}",
                            if job.kind == JobKind::TestFailover {
                                "serve the disks"
                            } else {
                                "stop the test failover"
                            },
                            answer["error"].as_str().unwrap_or("no reason given")
                        ),
                    )?;
                }
            }
            (JobKind::TestFailoverCleanup, 0) => {
                // The last test failover of the machine that succeeded.
                let tests: Vec<Job> = self
                    .db
                    .list_jobs(0, u32::MAX)?
                    .into_iter()
                    .filter(|j| {
                        j.machine == job.machine
                            && j.id < id
                            && matches!(
                                j.kind,
                                JobKind::TestFailover | JobKind::TestFailoverCleanup
                            )
                            && j.state == JobState::Succeeded
                    })
                    .collect();
                let Some(last) = tests.last().filter(|j| j.kind == JobKind::TestFailover) else {
                    return self.fail(
                        id,
                        format!("machine {:?} has no test failover to clean up", job.machine),
                    );
                };
                let mt = last
                    .result
                    .as_ref()
                    .and_then(|r| r["master_target"].as_str())
                    .unwrap_or("")
                    .to_string();
                data.insert("master_target".into(), json!(mt));
                data.insert("test".into(), json!(last.id));
                let params = json!({"job": last.id});
                self.db
                    .advance(id, 0, 1, &data, Some((&mt, "recovery-stop", params)))?;
                let _ = self.db.advance(id, 1, 2, &data, None)?;
            }
            (JobKind::TestFailoverCleanup, 1) => {
                self.db.advance(id, 1, 2, &data, None)?;
            }
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

#[cfg(test)]
mod tests;
