use super::*;
use crate::components::{
    ComponentRole, DiskReport, DiskSync, Heartbeat, ReplicaReport, StreamReport,
};
use crate::inventory::{Machine, MachineSource};

/// A database with machine app01 (reported by its agent) and components app01 (agent), ps1
/// and mt1, enrolled.
fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
    let machine: Machine = toml::from_str(
        r#"
        name = "app01"
        site = "site-a"
        os = { family = "linux", version = "12" }
        tools = "not-installed"
        disks = [{ name = "d0", size_bytes = 4096 }]
        "#,
    )
    .unwrap();
    db.report_machine(&Machine {
        source: MachineSource::Agent,
        ..machine
    })
    .unwrap();
    for (name, role) in [
        ("app01", ComponentRole::Agent),
        ("ps1", ComponentRole::ProcessServer),
        ("mt1", ComponentRole::MasterTarget),
    ] {
        let (token, _) = db
            .create_component(name, role, "site-a", &[], None, 60_000)
            .unwrap();
        let row = db.pending_enrollment(&token).unwrap().unwrap();
        assert!(
            db.complete_enrollment(row.id, &token, &format!("c-{name}"))
                .unwrap()
        );
    }
    (dir, db)
}

/// The reports of a protected app01: in sync, a mark durable at mt1, a point there.
fn protect(db: &Db) {
    agent_reports(db, DiskSync::InSync, None);
    ps_backlog(db, 0);
    mt_point(db, 9);
}

/// app01's agent's report of d0 (4 KiB), in state `sync`, `copied` bytes copied.
fn agent_reports(db: &Db, sync: DiskSync, copied: Option<u64>) {
    db.heartbeat(
        "app01",
        &Heartbeat {
            healthy: true,
            version: "0".into(),
            disks: Some(vec![DiskReport {
                name: "d0".into(),
                size_bytes: 4096,
                sync,
                copied_bytes: copied,
            }]),
            synced_through_seq: Some(0),
            ..Heartbeat::default()
        },
    )
    .unwrap();
}

fn engine(db: &Db) -> Engine<'_> {
    Engine::new(db, 60_000)
}

fn new(kind: JobKind, point: Option<&str>) -> NewJob {
    NewJob {
        kind,
        machine: "app01".into(),
        point: point.map(str::to_string),
        planned: false,
        policy: None,
        options: Default::default(),
    }
}

fn answer(db: &Db, component: &str, ok: bool, result: Value) -> Command {
    let command = db.next_command(component, &[]).unwrap().expect("a command");
    db.answer_command(
        component,
        command.id,
        &CommandResult {
            ok,
            result,
            error: (!ok).then(|| "the disk is gone".to_string()),
        },
    )
    .unwrap();
    command
}

#[test]
fn a_test_failover_of_a_machine_that_is_not_protected_fails_and_says_why() {
    let (_dir, db) = db();
    for kind in [JobKind::TestFailover, JobKind::Failover] {
        let job = db.create_job(&new(kind, None), "ops").unwrap();
        engine(&db).step_all().unwrap();
        let job = db.get_job(job.id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed, "{kind:?}");
        assert!(job.message.unwrap().contains("not protected"), "{kind:?}");
        for c in ["mt1", "app01"] {
            assert!(
                db.next_command(c, &[]).unwrap().is_none(),
                "{kind:?}: nothing was given to a component"
            );
        }
    }
}

#[test]
fn a_test_failover_gives_its_master_target_a_command_and_ends_with_its_answer() {
    let (_dir, db) = db();
    protect(&db);
    let job = db
        .create_job(&new(JobKind::TestFailover, Some("9")), "ops")
        .unwrap();
    assert_eq!((job.state, job.step.as_str()), (JobState::Running, "check"));
    engine(&db).step_all().unwrap();
    let waiting = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(waiting.step, "serve");
    // The command comes again until it is answered.
    let first = db.next_command("mt1", &[]).unwrap().unwrap();
    assert_eq!(db.next_command("mt1", &[]).unwrap().unwrap().id, first.id);
    assert_eq!(first.kind, "recovery-start");
    assert_eq!(first.params["machine"], "app01");
    assert_eq!(first.params["disks"], json!(["d0"]));
    assert_eq!(first.params["at"], 9);
    assert!(db.next_command("ps1", &[]).unwrap().is_none());
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(job.id).unwrap().unwrap().state,
        JobState::Running
    );
    answer(&db, "mt1", true, json!({"address": "127.0.0.1:10810"}));
    assert!(db.next_command("mt1", &[]).unwrap().is_none());
    engine(&db).step_all().unwrap();
    let done = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let result = done.result.unwrap();
    assert_eq!(result["address"], "127.0.0.1:10810");
    assert_eq!(result["master_target"], "mt1");
    assert!(done.message.unwrap().contains("127.0.0.1:10810"));

    // The cleanup stops that test failover at its master target.
    let cleanup = db
        .create_job(&new(JobKind::TestFailoverCleanup, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let stop = answer(&db, "mt1", true, json!({}));
    assert_eq!(stop.kind, "recovery-stop");
    assert_eq!(stop.params["jobs"], json!([job.id]));
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(cleanup.id).unwrap().unwrap().state,
        JobState::Succeeded
    );
    // Nothing left to clean up.
    let again = db
        .create_job(&new(JobKind::TestFailoverCleanup, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let again = db.get_job(again.id).unwrap().unwrap();
    assert_eq!(again.state, JobState::Failed);
    assert!(again.message.unwrap().contains("no test failover"));
}

#[test]
fn a_failed_command_fails_its_job_with_the_components_reason() {
    let (_dir, db) = db();
    protect(&db);
    let job = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let command = answer(&db, "mt1", false, Value::Null);
    assert_eq!(command.params["at"], Value::Null, "latest");
    engine(&db).step_all().unwrap();
    let job = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    let message = job.message.unwrap();
    assert!(
        message.contains("mt1") && message.contains("the disk is gone"),
        "{message}"
    );
}

#[test]
fn a_job_is_cancelled_only_before_it_gives_work_and_a_database_reopened_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let db = Db::open(&path).unwrap();
    let cancelled = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    let cancelled = db.cancel_job(cancelled.id).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(matches!(
        db.cancel_job(cancelled.id),
        Err(DbError::Conflict(_))
    ));
    assert!(matches!(db.cancel_job(999), Err(DbError::NotFound(_))));
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(cancelled.id).unwrap().unwrap().state,
        JobState::Cancelled,
        "a cancelled job does not run"
    );
    // A job left running by a server that stopped is still running, at its step, when the
    // database is opened again.
    let running = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    drop(db);
    let db = Db::open(&path).unwrap();
    let again = db.get_job(running.id).unwrap().unwrap();
    assert_eq!(
        (again.state, again.step.as_str()),
        (JobState::Running, "check")
    );
    assert_eq!(db.list_jobs(0, 10).unwrap().len(), 2);
}

#[test]
fn a_test_failover_waits_for_the_master_targets_report_when_the_process_server_says_protected() {
    let (_dir, db) = db();
    protect(&db);
    // mt1 has not reported its replicas yet.
    db.heartbeat(
        "mt1",
        &Heartbeat {
            healthy: true,
            version: "0".into(),
            ..Heartbeat::default()
        },
    )
    .unwrap();
    let job = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let waiting = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(
        (waiting.state, waiting.step.as_str()),
        (JobState::Running, "check")
    );
    // Past a heartbeat timeout without it, the job fails.
    Engine::new(&db, 0).step_all().unwrap();
    let failed = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
}

/// mt1's report of d0 of app01: its newest point at `seq`.
fn mt_point(db: &Db, seq: u64) {
    db.heartbeat(
        "mt1",
        &Heartbeat {
            healthy: true,
            version: "0".into(),
            replicas: Some(vec![ReplicaReport {
                machine: "app01".into(),
                disk: "d0".into(),
                points: 3,
                latest_point_seq: Some(seq),
                latest_point_unix_ms: Some(crate::db::now()),
            }]),
            ..Heartbeat::default()
        },
    )
    .unwrap();
}

#[test]
fn a_planned_failover_stops_the_machine_waits_for_its_final_mark_and_serves_it() {
    let (_dir, db) = db();
    protect(&db);
    let job = db
        .create_job(
            &NewJob {
                planned: true,
                ..new(JobKind::Failover, None)
            },
            "ops",
        )
        .unwrap();
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "drain");
    // The agent stops the machine at its final mark, 12.
    let drain = answer(&db, "app01", true, json!({"seq": 12}));
    assert_eq!(drain.kind, "drain");
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "catch-up");
    // Not at the master target yet (its newest point is 9): the job waits.
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "catch-up");
    assert!(db.next_command("mt1", &[]).unwrap().is_none());
    mt_point(&db, 12);
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "recover");
    let start = answer(
        &db,
        "mt1",
        true,
        json!({"address": "127.0.0.1:10811", "exports": ["d0"], "seq": 12}),
    );
    assert_eq!(start.kind, "failover-start");
    assert_eq!(
        start.params["at"], 12,
        "the final mark, nothing later or earlier"
    );
    engine(&db).step_all().unwrap();
    let done = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert!(done.message.unwrap().contains("nothing was lost"));
    // The machine is failed over now: its status says so, and it cannot fail over again.
    let status = crate::api::statuses(&db, 60_000)
        .unwrap()
        .into_iter()
        .find(|s| s.name == "app01")
        .unwrap();
    assert_eq!(status.state, ProtectionState::FailedOver);
    assert_eq!(status.failover.unwrap()["address"], "127.0.0.1:10811");
    let again = db.create_job(&new(JobKind::Failover, None), "ops").unwrap();
    engine(&db).step_all().unwrap();
    let again = db.get_job(again.id).unwrap().unwrap();
    assert_eq!(again.state, JobState::Failed);
    assert!(again.message.unwrap().contains("failed over already"));
}

#[test]
fn an_unplanned_failover_goes_to_the_point_asked_for_without_the_agent() {
    let (_dir, db) = db();
    protect(&db);
    let job = db
        .create_job(&new(JobKind::Failover, Some("7")), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "recover");
    assert!(
        db.next_command("app01", &[]).unwrap().is_none(),
        "the agent is not asked"
    );
    let start = answer(&db, "mt1", true, json!({"address": "a", "seq": 7}));
    assert_eq!(start.params["at"], 7);
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(job.id).unwrap().unwrap().state,
        JobState::Succeeded
    );
}

#[test]
fn a_planned_failover_needs_a_healthy_agent_and_an_agent_that_cannot_drain_fails_it() {
    let (_dir, db) = db();
    protect(&db);
    let planned = NewJob {
        planned: true,
        ..new(JobKind::Failover, None)
    };
    let job = db.create_job(&planned, "ops").unwrap();
    engine(&db).step_all().unwrap();
    answer(&db, "app01", false, Value::Null);
    engine(&db).step_all().unwrap();
    let failed = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.message.unwrap().contains("the disk is gone"));
    // A silent agent: refused before anything is asked of it.
    let job = db.create_job(&planned, "ops").unwrap();
    Engine::new(&db, -1).step_all().unwrap();
    let failed = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    assert!(failed.message.unwrap().contains("not healthy"));
}

#[test]
fn a_failover_changes_point_until_it_is_committed() {
    let (_dir, db) = db();
    protect(&db);
    let run = |new: NewJob| {
        let job = db.create_job(&new, "ops").unwrap();
        engine(&db).step_all().unwrap();
        job.id
    };
    // Nothing failed over: nothing to change or commit.
    let early = run(NewJob {
        point: Some("5".into()),
        ..new(JobKind::ChangePoint, None)
    });
    assert_eq!(db.get_job(early).unwrap().unwrap().state, JobState::Failed);
    let failover = run(new(JobKind::Failover, Some("9")));
    answer(
        &db,
        "mt1",
        true,
        json!({"address": "a:1", "exports": ["d0"], "seq": 9}),
    );
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(failover).unwrap().unwrap().state,
        JobState::Succeeded
    );

    let change = run(NewJob {
        point: Some("5".into()),
        ..new(JobKind::ChangePoint, None)
    });
    let stop = answer(&db, "mt1", true, json!({}));
    assert_eq!(
        (stop.kind.as_str(), &stop.params["machine"]),
        ("failover-stop", &json!("app01"))
    );
    engine(&db).step_all().unwrap();
    let start = answer(
        &db,
        "mt1",
        true,
        json!({"address": "a:2", "exports": ["d0"], "seq": 5}),
    );
    assert_eq!(start.kind, "failover-start");
    assert_eq!(
        (&start.params["at"], &start.params["disks"]),
        (&json!(5), &json!(["d0"]))
    );
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(change).unwrap().unwrap().state,
        JobState::Succeeded
    );
    let served = |db: &Db| db.failed_over().unwrap().remove(0).1;
    assert_eq!(served(&db)["seq"], 5);
    assert_eq!(served(&db)["address"], "a:2");

    let commit = run(new(JobKind::Commit, None));
    assert_eq!(
        db.get_job(commit).unwrap().unwrap().state,
        JobState::Succeeded
    );
    assert_eq!(served(&db)["committed"], true);
    let twice = run(new(JobKind::Commit, None));
    let twice = db.get_job(twice).unwrap().unwrap();
    assert_eq!(twice.state, JobState::Failed, "committing twice");
    assert!(twice.message.unwrap().contains("committed"));
    let late = run(NewJob {
        point: Some("9".into()),
        ..new(JobKind::ChangePoint, None)
    });
    let late = db.get_job(late).unwrap().unwrap();
    assert_eq!(late.state, JobState::Failed);
    assert!(late.message.unwrap().contains("committed"));
    assert!(db.next_command("mt1", &[]).unwrap().is_none());
}

/// ps1's report of app01's stream with `backlog` bytes not yet at the master target.
fn ps_backlog(db: &Db, backlog: u64) {
    db.heartbeat(
        "ps1",
        &Heartbeat {
            healthy: true,
            version: "0".into(),
            streams: Some(vec![StreamReport {
                machine: "app01".into(),
                backlog_bytes: backlog,
                lag_ms: 0,
                last_mark_seq: Some(9),
                last_mark_unix_ms: Some(crate::db::now()),
                connected: Some(true),
            }]),
            ..Heartbeat::default()
        },
    )
    .unwrap();
}

#[test]
fn an_unplanned_failover_to_latest_waits_for_the_process_servers_backlog_first() {
    let (_dir, db) = db();
    protect(&db);
    ps_backlog(&db, 65536);
    let job = db.create_job(&new(JobKind::Failover, None), "ops").unwrap();
    engine(&db).step_all().unwrap();
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "catch-up");
    assert!(
        db.next_command("mt1", &[]).unwrap().is_none(),
        "not before the backlog is in"
    );
    ps_backlog(&db, 0);
    engine(&db).step_all().unwrap();
    let start = answer(&db, "mt1", true, json!({"address": "a", "seq": 10}));
    assert_eq!(
        (start.kind.as_str(), &start.params["at"]),
        ("failover-start", &Value::Null)
    );

    // latest-processed does not wait; latest-app-consistent is the master target's to find.
    let (_dir, db) = self::db();
    protect(&db);
    ps_backlog(&db, 65536);
    for (point, at) in [
        ("latest-processed", json!("latest-processed")),
        ("latest-app-consistent", json!("latest-app-consistent")),
    ] {
        let job = db
            .create_job(&new(JobKind::Failover, Some(point)), "ops")
            .unwrap();
        engine(&db).step_all().unwrap();
        let start = answer(&db, "mt1", false, Value::Null);
        assert_eq!(start.params["at"], at, "{point}");
        engine(&db).step_all().unwrap();
        assert_eq!(db.get_job(job.id).unwrap().unwrap().state, JobState::Failed);
    }
}

#[test]
fn one_job_at_a_time_per_machine_and_no_command_of_an_ended_job_or_one_at_work() {
    let (_dir, db) = db();
    protect(&db);
    let first = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    assert!(matches!(
        db.create_job(&new(JobKind::Failover, None), "ops"),
        Err(DbError::Conflict(why)) if why.contains(&format!("job {}", first.id))
    ));
    engine(&db).step_all().unwrap();
    let command = db.next_command("mt1", &[]).unwrap().unwrap();
    // At work on it: not given again.
    assert!(db.next_command("mt1", &[command.id]).unwrap().is_none());
    // The job ends another way (here by hand): its command is not given any more.
    db.end_job(first.id, JobState::Failed, "gone", &Value::Null)
        .unwrap();
    assert!(db.next_command("mt1", &[]).unwrap().is_none());
    // The machine is free for the next job.
    db.create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
}

#[test]
fn a_change_of_point_that_fails_after_its_stop_leaves_the_machine_shown_unserved() {
    let (_dir, db) = db();
    protect(&db);
    let failover = db
        .create_job(&new(JobKind::Failover, Some("9")), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    answer(
        &db,
        "mt1",
        true,
        json!({"address": "a:1", "exports": ["d0"], "seq": 9}),
    );
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(failover.id).unwrap().unwrap().state,
        JobState::Succeeded
    );
    let change = db
        .create_job(
            &NewJob {
                point: Some("5".into()),
                ..new(JobKind::ChangePoint, None)
            },
            "ops",
        )
        .unwrap();
    engine(&db).step_all().unwrap();
    answer(&db, "mt1", true, json!({}));
    engine(&db).step_all().unwrap();
    answer(&db, "mt1", false, Value::Null);
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(change.id).unwrap().unwrap().state,
        JobState::Failed
    );
    let status = crate::api::statuses(&db, 60_000)
        .unwrap()
        .into_iter()
        .find(|s| s.name == "app01")
        .unwrap();
    let f = status.failover.clone().unwrap();
    assert_eq!(f["serving"], false);
    assert!(f.get("address").is_none(), "{f}");
    assert_eq!(status.health, crate::status::StatusHealth::Critical);
    // Not committed in that state.
    let commit = db.create_job(&new(JobKind::Commit, None), "ops").unwrap();
    engine(&db).step_all().unwrap();
    let commit = db.get_job(commit.id).unwrap().unwrap();
    assert_eq!(commit.state, JobState::Failed);
    assert!(commit.message.unwrap().contains("change-point again"));
    // Another change of point serves it again.
    let again = db
        .create_job(
            &NewJob {
                point: Some("5".into()),
                ..new(JobKind::ChangePoint, None)
            },
            "ops",
        )
        .unwrap();
    engine(&db).step_all().unwrap();
    answer(&db, "mt1", true, json!({}));
    engine(&db).step_all().unwrap();
    answer(
        &db,
        "mt1",
        true,
        json!({"address": "a:2", "exports": ["d0"], "seq": 5}),
    );
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(again.id).unwrap().unwrap().state,
        JobState::Succeeded
    );
    assert_eq!(db.failed_over().unwrap()[0].1["address"], "a:2");
}

#[test]
fn a_job_waiting_on_a_component_is_cancelled_where_that_is_safe_and_says_what_is_left() {
    let (_dir, db) = db();
    protect(&db);
    // A test failover whose master target does not answer: cancelled, then cleaned up (its
    // master target stops it if it started).
    let test = db
        .create_job(&new(JobKind::TestFailover, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let cancelled = db.cancel_job(test.id).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.message.unwrap().contains("test-failover-cleanup"));
    assert!(
        db.next_command("mt1", &[]).unwrap().is_none(),
        "not given any more"
    );
    let cleanup = db
        .create_job(&new(JobKind::TestFailoverCleanup, None), "ops")
        .unwrap();
    engine(&db).step_all().unwrap();
    let stop = answer(&db, "mt1", true, json!({}));
    assert_eq!(stop.params["jobs"], json!([test.id]));
    engine(&db).step_all().unwrap();
    assert_eq!(
        db.get_job(cleanup.id).unwrap().unwrap().state,
        JobState::Succeeded
    );

    // A planned failover waiting for its final mark: cancelled, saying the source is stopped.
    let planned = db
        .create_job(
            &NewJob {
                planned: true,
                ..new(JobKind::Failover, None)
            },
            "ops",
        )
        .unwrap();
    engine(&db).step_all().unwrap();
    // Draining: a component at work, no cancel.
    assert!(matches!(
        db.cancel_job(planned.id),
        Err(DbError::Conflict(_))
    ));
    answer(&db, "app01", true, json!({"seq": 50}));
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(planned.id).unwrap().unwrap().step, "catch-up");
    let cancelled = db.cancel_job(planned.id).unwrap();
    assert!(cancelled.message.unwrap().contains("refuses writes"));
}

#[test]
fn protect_gives_the_policy_and_follows_the_initial_sync_to_protected() {
    let (_dir, db) = db();
    let protect_job = |policy: &str| NewJob {
        policy: Some(policy.into()),
        ..new(JobKind::Protect, None)
    };
    let job = db.create_job(&protect_job("gold"), "ops").unwrap();
    engine(&db).step_all().unwrap();
    let failed = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.message.unwrap().contains("no policy \"gold\""));

    db.create_policy(
        "gold",
        &crate::policy::PolicySettings {
            rpo_threshold_seconds: 30,
            retention_seconds: 3600,
            app_consistent_seconds: 0,
        },
    )
    .unwrap();
    let job = db.create_job(&protect_job("gold"), "ops").unwrap();
    // Half the disk copied.
    agent_reports(&db, DiskSync::InitialSync, Some(2048));
    engine(&db).step_all().unwrap();
    engine(&db).step_all().unwrap();
    let syncing = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(
        (syncing.state, syncing.step.as_str()),
        (JobState::Running, "sync")
    );
    let progress = syncing.result.unwrap();
    assert_eq!(progress["percent"], 50.0, "{progress}");
    assert_eq!(progress["copied_bytes"], 2048);
    assert_eq!(db.protections().unwrap()[0].1.name, "gold");
    // The copy ends and a mark after it reaches the master target, which is told how long to
    // keep the points.
    protect(&db);
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "retention");
    let told = answer(&db, "mt1", true, json!({"retention_seconds": 3600}));
    assert_eq!(told.kind, "replica-policy");
    assert_eq!(
        (&told.params["machine"], &told.params["retention_seconds"]),
        (&json!("app01"), &json!(3600))
    );
    engine(&db).step_all().unwrap();
    // And the agent, how often to take app-consistent marks.
    let app = answer(&db, "app01", true, json!({"seconds": 0.0}));
    assert_eq!(
        (app.kind.as_str(), &app.params["seconds"]),
        ("app-mark-interval", &json!(0))
    );
    engine(&db).step_all().unwrap();
    let done = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert!(done.message.unwrap().contains("protected with policy"));
    assert_eq!(done.result.unwrap()["retention_seconds"], 3600);
}

#[test]
fn an_edited_policy_goes_to_the_machines_protected_with_it_now() {
    let (_dir, db) = db();
    let settings = |retention_seconds| crate::policy::PolicySettings {
        rpo_threshold_seconds: 30,
        retention_seconds,
        app_consistent_seconds: 600,
    };
    db.create_policy("gold", &settings(3600)).unwrap();
    db.set_protection("app01", "gold").unwrap();
    // Given long ago: a protect job sending an edit keeps that time.
    db.conn()
        .execute("UPDATE protections SET since_ms = 1000", [])
        .unwrap();
    let since = 1000;
    // No agent reports its disks: nothing replicates, and its next protect sends the policy.
    let (started, left) = db.push_policy("gold", "admin", 60_000).unwrap();
    assert!(started.is_empty());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].machine, "app01");
    assert!(left[0].why.starts_with("not replicating"), "{left:?}");

    protect(&db);
    db.update_policy("gold", &settings(7200)).unwrap();
    let (started, left) = db.push_policy("gold", "admin", 60_000).unwrap();
    assert_eq!(started.len(), 1, "{left:?}");
    assert!(left.is_empty());
    let job = started[0].id;
    engine(&db).step_all().unwrap();
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job).unwrap().unwrap().step, "retention");
    let told = answer(&db, "mt1", true, json!({"retention_seconds": 7200}));
    assert_eq!(told.params["retention_seconds"], 7200);
    engine(&db).step_all().unwrap();
    let app = answer(&db, "app01", true, json!({"seconds": 600.0}));
    assert_eq!(
        (app.kind.as_str(), &app.params["seconds"]),
        ("app-mark-interval", &json!(600))
    );
    engine(&db).step_all().unwrap();
    let done = db.get_job(job).unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(
        db.protections().unwrap()[0].0.since_unix_ms,
        since,
        "protected with the policy since it was given, not since the edit"
    );

    // A job sending an edit gives way to any job asked for the machine: it never holds up a
    // failover. A later edit replaces it too.
    let (first, _) = db.push_policy("gold", "admin", 60_000).unwrap();
    let (second, _) = db.push_policy("gold", "admin", 60_000).unwrap();
    let first = db.get_job(first[0].id).unwrap().unwrap();
    assert_eq!(first.state, JobState::Cancelled);
    let other = db.create_job(&new(JobKind::Commit, None), "ops").unwrap();
    let second = db.get_job(second[0].id).unwrap().unwrap();
    assert_eq!(second.state, JobState::Cancelled, "{second:?}");
    assert!(second.message.unwrap().contains("next protect"));
    // A machine running another job is left out: that job is not stopped.
    let (started, left) = db.push_policy("gold", "admin", 60_000).unwrap();
    assert!(started.is_empty());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].machine, "app01");
    assert!(left[0].why.starts_with("runs another job"), "{left:?}");
    assert_eq!(
        db.get_job(other.id).unwrap().unwrap().state,
        JobState::Running
    );
    db.cancel_job(other.id).unwrap();

    // A job sending an edit to a machine whose policy changed meanwhile sends nothing.
    let (started, _) = db.push_policy("gold", "admin", 60_000).unwrap();
    db.create_policy("silver", &settings(60)).unwrap();
    db.set_protection("app01", "silver").unwrap();
    engine(&db).step_all().unwrap();
    let job = db.get_job(started[0].id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    assert!(
        job.message
            .unwrap()
            .contains("no longer protected with policy")
    );
    assert_eq!(db.protections().unwrap()[0].0.policy, "silver");
}

#[test]
fn a_protect_job_waiting_on_its_master_target_is_cancelled_and_says_the_machine_is_protected() {
    let (_dir, db) = db();
    db.create_policy(
        "gold",
        &crate::policy::PolicySettings {
            rpo_threshold_seconds: 30,
            retention_seconds: 3600,
            app_consistent_seconds: 0,
        },
    )
    .unwrap();
    protect(&db);
    let job = db
        .create_job(
            &NewJob {
                policy: Some("gold".into()),
                ..new(JobKind::Protect, None)
            },
            "ops",
        )
        .unwrap();
    engine(&db).step_all().unwrap();
    engine(&db).step_all().unwrap();
    assert_eq!(db.get_job(job.id).unwrap().unwrap().step, "retention");
    let cancelled = db.cancel_job(job.id).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.message.unwrap().contains("run protect again"));
    // The machine is free for another job, such as a failover.
    db.create_job(&new(JobKind::Failover, None), "ops").unwrap();
}

#[test]
fn reprotect_and_failback_are_cancelled_only_where_nothing_is_left_half_done() {
    let (_dir, db) = db();
    for (kind, step, safe, says) in [
        (JobKind::Reprotect, 0, true, "before it started"),
        (JobKind::Reprotect, 1, true, "run reprotect again"),
        (JobKind::Reprotect, 2, false, "cannot be cancelled safely"),
        (JobKind::Reprotect, 3, false, "cannot be cancelled safely"),
        (JobKind::Reprotect, 4, false, "cannot be cancelled safely"),
        (JobKind::Reprotect, 5, true, "goes on copying"),
        (JobKind::Failback, 1, false, "cannot be cancelled safely"),
        (JobKind::Failback, 2, true, "refuses writes"),
        (JobKind::Failback, 3, false, "cannot be cancelled safely"),
        (JobKind::Failback, 4, false, "cannot be cancelled safely"),
    ] {
        let job = db.create_job(&new(kind, None), "ops").unwrap();
        if step > 0 {
            assert!(db.advance(job.id, 0, step, &Data::new(), None).unwrap());
        }
        match db.cancel_job(job.id) {
            Ok(cancelled) => {
                assert!(safe, "{kind:?} at step {step} was cancelled");
                assert!(cancelled.message.unwrap().contains(says), "{kind:?} {step}");
            }
            Err(DbError::Conflict(why)) => {
                assert!(!safe, "{kind:?} at step {step}: {why}");
                assert!(why.contains(says), "{why}");
                db.end_job(job.id, JobState::Failed, "test", &Value::Null)
                    .unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_reprotect_waits_for_its_preflight_and_a_failed_one_fails_it_with_each_error() {
    let (_dir, db) = db();
    let job = db
        .create_job(&new(JobKind::Reprotect, None), "ops")
        .unwrap();
    let engine = Engine::new(&db, 60_000);
    // The job asks for a preflight against the components it chose, and waits for it.
    let asked = json!({"master_target": "mt-other", "process_server": null, "datastore": null});
    let data = db.job_row(job.id).unwrap().unwrap().data;
    assert_eq!(
        engine
            .preflight_passed(job.id, &data, "reprotect", asked.clone())
            .unwrap(),
        None
    );
    let now = db.get_job(job.id).unwrap().unwrap();
    assert_eq!((now.state, now.step.as_str()), (JobState::Running, "check"));
    assert_eq!(now.result.unwrap()["waiting_for"], "preflight");
    let waiting = db.awaiting_preflight().unwrap();
    assert_eq!(waiting.len(), 1);
    let (id, machine, query, _) = &waiting[0];
    assert_eq!((*id, machine.as_str()), (job.id, "app01"));
    assert_eq!(query.purpose, crate::preflight::Purpose::Reprotect);
    assert_eq!(query.master_target.as_deref(), Some("mt-other"));
    // A report against other components than the job asks about now is not taken.
    let failing = json!({"ok": false, "master_target": "mt-other", "checks": [
        {"code": "PS_UNREACHABLE", "severity": "error", "passed": false, "message": "process server \"ps1\" does not answer"},
        {"code": "PS_LINK_BANDWIDTH", "severity": "warning", "passed": false, "message": "slow"},
        {"code": "MT_MISSING", "severity": "error", "passed": true, "message": "fine"},
    ]});
    db.record_preflight(job.id, &json!({"master_target": "mt1"}), failing.clone())
        .unwrap();
    assert_eq!(db.awaiting_preflight().unwrap().len(), 1);
    db.record_preflight(job.id, &asked, failing).unwrap();
    assert!(db.awaiting_preflight().unwrap().is_empty());
    let data = db.job_row(job.id).unwrap().unwrap().data;
    assert_eq!(
        engine
            .preflight_passed(job.id, &data, "reprotect", asked)
            .unwrap(),
        Some(false)
    );
    let failed = db.get_job(job.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    let message = failed.message.unwrap();
    assert!(
        message.contains("preflight for reprotect failed, nothing was changed")
            && message.contains("PS_UNREACHABLE: process server \"ps1\" does not answer")
            && !message.contains("PS_LINK_BANDWIDTH")
            && !message.contains("MT_MISSING"),
        "{message}"
    );
    // Nothing was given to any component.
    for c in ["app01", "ps1", "mt1"] {
        assert!(db.next_command(c, &[]).unwrap().is_none());
    }
}
