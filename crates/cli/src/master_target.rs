//! `boomerang master-target`: receives write logs from process servers and keeps recovery
//! points of every protected disk in replica stores on its retention volume.

use std::path::PathBuf;

use anyhow::Context;
use boomerang_master_target::{Config, receiver};
use boomerang_wire::MAX_DISKS;
use boomerang_wire::tls::TlsIdentity;
use clap::Args;

use crate::output::parse_size;

#[derive(Args, Debug)]
pub struct MasterTargetArgs {
    /// Address for replication connections from process servers.
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: String,
    /// The master target's certificate directory (`boomerang pki issue ... --role master-target`).
    #[arg(long)]
    tls: PathBuf,
    /// The retention volume: incoming logs, replica images and replica stores
    /// (RETENTION/replicas/<machine>/store).
    #[arg(long)]
    retention: PathBuf,
    /// The most disks to attach (at most 60).
    #[arg(long, default_value_t = MAX_DISKS)]
    max_disks: usize,
    /// Block size of new replica stores.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    block_size: u64,
    /// Seconds between points made at crash-consistent marks (closer marks are thinned; every
    /// app-consistent mark makes a point). 0: a point at every mark.
    #[arg(long, default_value_t = 10.0)]
    point_every: f64,
    /// Hours the incoming log is kept once applied, then dropped.
    #[arg(long, default_value_t = 24.0)]
    log_window_hours: f64,
    /// Serve /metrics (Prometheus: RPO per machine) and /healthz over HTTP on this address.
    #[arg(long)]
    metrics: Option<String>,
    /// The master target's name (default: the certificate directory's name).
    #[arg(long)]
    name: Option<String>,
}

pub async fn run(args: MasterTargetArgs) -> anyhow::Result<i32> {
    if !(0.0..=1e5).contains(&args.log_window_hours) {
        anyhow::bail!(
            "--log-window-hours {} is not a number of hours: use a value such as 24",
            args.log_window_hours
        );
    }
    if !(0.0..=1e7).contains(&args.point_every) {
        anyhow::bail!(
            "--point-every {} is not a number of seconds: use a value such as 10, or 0 for a point at every mark",
            args.point_every
        );
    }
    let tls = TlsIdentity::load(&args.tls)?;
    let name = crate::daemon::name_or_dir(args.name, &args.tls, "master target")?;
    std::fs::create_dir_all(&args.retention).with_context(|| {
        format!(
            "could not create the retention directory {}: check the path and permissions",
            args.retention.display()
        )
    })?;
    let (server, metrics) = receiver(Config {
        name,
        tls,
        retention: args.retention.clone(),
        max_disks: args.max_disks,
        block_size: args.block_size,
        point_every: std::time::Duration::from_secs_f64(args.point_every),
        log_window: std::time::Duration::from_secs_f64(args.log_window_hours * 3600.0),
    })?;
    crate::daemon::serve_metrics(
        args.metrics.as_deref(),
        std::sync::Arc::new(move || metrics.render()),
    )
    .await?;
    crate::daemon::serve(server, &args.listen, "master target").await
}
