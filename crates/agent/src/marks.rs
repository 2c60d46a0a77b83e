//! Consistency marks. A crash-consistent mark is one log record. An app-consistent mark is
//! taken between the freeze hook (say `fsfreeze -f /data`, or a database flush) and the thaw
//! hook; each hook runs with a timeout, and a hook that fails or hangs yields a crash-consistent
//! mark and a warning instead, never a machine left frozen or writes left blocked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use boomerang_core::log::{MarkId, MarkKind};
use serde::Serialize;

use crate::logdir::LogDir;

/// Freeze and thaw commands (run with `sh -c`) and how long each may take.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub freeze: Option<String>,
    pub thaw: Option<String>,
    pub timeout: Duration,
    /// One mark at a time: a freeze, its mark and its thaw never interleave with another's.
    /// Shutdown takes it too, so it never stops the agent between a freeze and its thaw.
    pub busy: Arc<tokio::sync::Mutex<()>>,
}

/// What a mark request produced.
#[derive(Clone, Debug, Serialize)]
pub struct MarkOutcome {
    pub id: u64,
    pub seq: u64,
    /// `app` or `crash` (a requested app mark falls back to crash when a hook fails).
    pub kind: String,
    pub warnings: Vec<String>,
}

/// Runs a hook; `Err` says why it did not succeed in time.
async fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(timeout, child).await {
        Err(_) => Err(format!(
            "the {what} hook {cmd:?} did not finish within {} s and was stopped",
            timeout.as_secs_f64()
        )),
        Ok(Err(e)) => Err(format!("the {what} hook {cmd:?} could not start: {e}")),
        Ok(Ok(out)) if !out.status.success() => Err(format!(
            "the {what} hook {cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn append(
    log: &Arc<Mutex<LogDir>>,
    kind: MarkKind,
) -> std::io::Result<(MarkId, boomerang_core::Seq)> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let mut log = log
            .lock()
            .map_err(|_| std::io::Error::other("the write log lock is poisoned"))?;
        let mark = log
            .mark(kind)
            .map_err(|e| std::io::Error::other(boomerang_core::chain(&e)))?;
        log.sync()
            .map_err(|e| std::io::Error::other(boomerang_core::chain(&e)))?;
        Ok(mark)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Inserts a mark of `kind`; for `App`, between the hooks.
pub async fn mark(
    log: &Arc<Mutex<LogDir>>,
    kind: MarkKind,
    hooks: &Hooks,
) -> std::io::Result<MarkOutcome> {
    let _one_at_a_time = hooks.busy.lock().await;
    let mut warnings = Vec::new();
    let requested = kind;
    let mut kind = kind;
    if requested == MarkKind::App
        && let Some(cmd) = &hooks.freeze
        && let Err(w) = run_hook("freeze", cmd, hooks.timeout).await
    {
        warnings.push(format!("{w}; took a crash-consistent mark instead"));
        kind = MarkKind::Crash;
    }
    let result = append(log, kind).await;
    // Thaw after every app mark request, even if the freeze or the mark failed.
    if requested == MarkKind::App {
        if let Some(cmd) = &hooks.thaw {
            if let Err(w) = run_hook("thaw", cmd, hooks.timeout).await {
                warnings.push(w);
            }
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let (id, seq) = result?;
    Ok(MarkOutcome {
        id: id.0,
        seq: seq.0,
        kind: if kind == MarkKind::App {
            "app"
        } else {
            "crash"
        }
        .into(),
        warnings,
    })
}
