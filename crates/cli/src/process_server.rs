//! `boomerang process-server`: receives agents' write logs over mutual TLS into its cache.

use std::path::PathBuf;

use anyhow::Context;
use boomerang_process_server::{Config, receiver};
use boomerang_wire::tls::TlsIdentity;
use clap::Args;

#[derive(Args, Debug)]
pub struct ProcessServerArgs {
    /// Address for replication connections (ASR's data port is 9443; tests use 127.0.0.1:0).
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: String,
    /// The process server's certificate directory (`boomerang pki issue ... --role process-server`).
    #[arg(long)]
    tls: PathBuf,
    /// The cache volume: one directory of log segments per protected machine.
    #[arg(long)]
    cache: PathBuf,
    /// The master target to forward every machine's log to (HOST:PORT).
    #[arg(long)]
    master_target: Option<String>,
    /// At most this many bytes of records per second toward the master target, per machine
    /// (say 20MiB).
    #[arg(long, value_parser = crate::output::parse_size)]
    max_rate: Option<u64>,
    /// The most bytes of a cache segment. Forwarded records leave the cache a whole segment
    /// at a time: the cache volume must hold a few segments.
    #[arg(long, default_value = "64MiB", value_parser = crate::output::parse_size)]
    cache_segment_size: u64,
    /// Serve /metrics (Prometheus) and /healthz over HTTP on this address (say 127.0.0.1:9090).
    #[arg(long)]
    metrics: Option<String>,
    /// The process server's name (default: the certificate directory's name).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    reporting: crate::client::Reporting,
}

pub async fn run(args: ProcessServerArgs) -> anyhow::Result<i32> {
    let tls = TlsIdentity::load(&args.tls)?;
    let name = crate::daemon::name_or_dir(args.name, &args.tls, "process server")?;
    std::fs::create_dir_all(&args.cache).with_context(|| {
        format!(
            "could not create the cache directory {}: check the path and permissions",
            args.cache.display()
        )
    })?;
    let (server, metrics) = receiver(Config {
        name,
        tls,
        cache: args.cache.clone(),
        master_target: args.master_target.clone(),
        max_rate: args.max_rate,
        cache_segment: args.cache_segment_size,
    })?;
    let shown = metrics.clone();
    crate::daemon::serve_metrics(
        args.metrics.as_deref(),
        std::sync::Arc::new(move || shown.render()),
    )
    .await?;
    // Heartbeats say whether the master target answers, and how each stream stands.
    let (master_target, max_rate) = (args.master_target.clone(), args.max_rate);
    let receiving = server.clone();
    let report: crate::client::Report = Box::new(move || {
        let (metrics, master_target) = (metrics.clone(), master_target.clone());
        let receiving = receiving.clone();
        Box::pin(async move {
            let mut beat = serde_json::Map::new();
            if let Some(rate) = max_rate {
                beat.insert("max_rate_bytes_per_second".into(), rate.into());
            }
            if let Some(addr) = &master_target {
                let reachable = crate::client::answers(addr).await;
                beat.insert("master_target_reachable".into(), reachable.into());
            }
            let streams: Vec<serde_json::Value> = metrics
                .report()
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "machine": s.stream,
                        "backlog_bytes": s.backlog_bytes,
                        "lag_ms": s.lag.as_millis() as u64,
                        "last_mark_seq": s.last_mark.map(|(seq, _)| seq),
                        "last_mark_unix_ms": s.last_mark.map(|(_, ns)| ns / 1_000_000),
                        "connected": receiving.connected(&s.stream),
                    })
                })
                .collect();
            beat.insert("streams".into(), streams.into());
            beat
        })
    });
    // A mark that reached the master target, or a stream that came or went: at once.
    let watched: crate::client::Watched = std::sync::Arc::new(|beat| {
        let streams = beat.get("streams").and_then(|s| s.as_array()).cloned();
        serde_json::json!(
            streams
                .unwrap_or_default()
                .iter()
                .map(|s| { serde_json::json!([s["machine"], s["last_mark_seq"], s["connected"]]) })
                .collect::<Vec<_>>()
        )
    });
    crate::client::start_heartbeats(&args.reporting, args.cache.clone(), report, Some(watched))?;
    crate::daemon::serve(server, &args.listen, "process server").await
}
