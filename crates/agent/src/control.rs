//! The agent's control socket, `<log dir>/agent.sock`: one request line, one JSON reply line.
//! Requests: `mark crash`, `mark app`. Only local users with access to the log directory can
//! reach it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use boomerang_core::log::MarkKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::logdir::LogDir;
use crate::marks::{Hooks, mark};

/// The control socket's path for a log directory.
pub fn socket_path(log_dir: &Path) -> PathBuf {
    log_dir.join("agent.sock")
}

/// Serves control requests until the task is dropped.
pub async fn serve(listener: UnixListener, log: Arc<Mutex<LogDir>>, hooks: Hooks) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (log, hooks) = (log.clone(), hooks.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            // One short line; anything longer is not a request.
            let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 256));
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim() {
                "mark crash" => mark(&log, MarkKind::Crash, &hooks).await,
                "mark app" => mark(&log, MarkKind::App, &hooks).await,
                other => {
                    let v = serde_json::json!({ "error": format!("unknown request {other:?}: use `mark crash` or `mark app`") });
                    let _ = wr.write_all(format!("{v}\n").as_bytes()).await;
                    return;
                }
            };
            let v = match reply {
                Ok(outcome) => serde_json::to_value(outcome).unwrap_or_default(),
                Err(e) => {
                    serde_json::json!({ "error": format!("the mark could not be written: {e}") })
                }
            };
            let _ = wr.write_all(format!("{v}\n").as_bytes()).await;
        });
    }
}

/// Sends one request to the agent of `log_dir` and returns its JSON reply.
pub async fn request(log_dir: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    let path = socket_path(log_dir);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "no agent is running for log directory {} ({}): start `boomerang agent` first",
                log_dir.display(),
                path.display()
            ),
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(rd).read_line(&mut reply).await?;
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
