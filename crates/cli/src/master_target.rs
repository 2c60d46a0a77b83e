//! `boomerang master-target`: receives write logs from process servers and keeps recovery
//! points of every protected disk in replica stores on its retention volume.

use std::path::PathBuf;

use anyhow::Context;
use boomerang_core::DiskName;
use boomerang_master_target::recoveries::Recoveries;
use boomerang_master_target::{Config, receiver_with_replicas};
use boomerang_wire::MAX_DISKS;
use boomerang_wire::tls::TlsIdentity;
use clap::{Args, Subcommand};

use crate::output::{Output, Table, parse_size, print_json};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MasterTargetArgs {
    #[command(subcommand)]
    command: Option<PointsCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// Recovery points between checkpoints, from the retention volume of a master target.
#[derive(Subcommand, Debug)]
enum PointsCommand {
    /// List a disk's recovery points: checkpoints, and the marks between them that the
    /// incoming log can bring a checkpoint to (within the log window).
    Points {
        /// The master target's retention volume.
        retention: PathBuf,
        /// The protected machine.
        #[arg(long)]
        machine: String,
        #[arg(long)]
        disk: DiskName,
    },
    /// Write a disk as it was at a point (a mark's sequence number, or `latest`) as a raw
    /// image: the checkpoint before it and the incoming log's records up to it.
    Export {
        retention: PathBuf,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        disk: DiskName,
        /// A sequence number from `points`, or `latest` (the newest point listed).
        #[arg(long, default_value = "latest")]
        at: String,
        #[arg(long)]
        out: PathBuf,
        /// raw, or vhd (fixed, as Azure boots: padded to a whole MiB). For qcow2 or vmdk,
        /// serve the point (`recover`) and `qemu-img convert -O qcow2 nbd://ADDR/DISK OUT`.
        #[arg(long, default_value = "raw", value_parser = ["raw", "vhd"])]
        format: String,
    },
    /// Instant recovery: serve a disk at a point over NBD at once (reads from the replica
    /// store until the target holds them, writes into the target), while it is copied into
    /// the target in the background. Run it again with the same target to resume.
    Recover {
        retention: PathBuf,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        disk: DiskName,
        /// A sequence number from `points`, or `latest` (the newest point listed).
        #[arg(long, default_value = "latest")]
        at: String,
        /// The raw image to serve from and copy into (a new path, or one this command made).
        #[arg(long)]
        target: PathBuf,
        /// The NBD address: 127.0.0.1:PORT or unix:PATH; the export is named after the disk.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// At most this many bytes a second of background copy (say 100MiB); unlimited when
        /// absent.
        #[arg(long, value_parser = parse_size)]
        hydrate_rate: Option<u64>,
    },
}

/// `--at`: a sequence number, or `latest` (none).
fn parse_at(at: &str) -> anyhow::Result<Option<u64>> {
    if at == "latest" {
        return Ok(None);
    }
    at.parse().map(Some).with_context(|| {
        format!("--at {at:?} is not a sequence number: use one from `boomerang master-target points`, or latest")
    })
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Address for replication connections from process servers.
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: String,
    /// The master target's certificate directory (`boomerang pki issue ... --role master-target`).
    #[arg(long, required = true)]
    tls: Option<PathBuf>,
    /// The retention volume: incoming logs, replica images and replica stores
    /// (RETENTION/replicas/<machine>/store).
    #[arg(long, required = true)]
    retention: Option<PathBuf>,
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
    /// Seconds between passes that drop the points past each machine's policy retention (a
    /// `protect` job sets it).
    #[arg(long, default_value_t = 300.0)]
    prune_every: f64,
    /// Where test failovers serve their disks over NBD (a port of 0: any free one, which the
    /// job reports).
    #[arg(long, default_value = "127.0.0.1:0")]
    recovery_listen: boomerang_nbd::server::ListenAddr,
    /// Keep the replica stores (the recovery points) under this location instead of on the
    /// retention volume, one per machine: an Azure Blob prefix (`azure://container/prefix`) or
    /// a directory. Recorded on the volume (`store-root.json`): a volume keeps one. The
    /// replica images and incoming logs stay on the volume.
    #[arg(long)]
    store_root: Option<String>,
    /// Seal the stores under --store-root with the key in this file (`boomerang store keygen
    /// FILE` makes one; keep it with the operator, and back it up).
    #[arg(long, requires = "store_root")]
    store_key_file: Option<PathBuf>,
    #[command(flatten)]
    reporting: crate::client::Reporting,
}

pub async fn run(args: MasterTargetArgs, output: Output) -> anyhow::Result<i32> {
    match args.command {
        Some(command) => points(command, output).await,
        None => serve(args.run).await,
    }
}

async fn points(command: PointsCommand, output: Output) -> anyhow::Result<i32> {
    use boomerang_master_target::points;
    match command {
        PointsCommand::Points {
            retention,
            machine,
            disk,
        } => {
            let listed = points::list(&retention, &machine, &disk).await?;
            if output == Output::Json {
                print_json(&listed)?;
            } else {
                let mut t = Table::new(&["SEQ", "KIND", "CHECKPOINT"]);
                for p in &listed {
                    let checkpoint = p.checkpoint.clone().unwrap_or_else(|| "-".into());
                    t.row(vec![p.seq.to_string(), p.kind.clone(), checkpoint]);
                }
                t.print();
            }
        }
        PointsCommand::Export {
            retention,
            machine,
            disk,
            at,
            out,
            format,
        } => {
            let seq = match parse_at(&at)? {
                Some(seq) => seq,
                None => {
                    let listed = points::list(&retention, &machine, &disk).await?;
                    listed.last().map(|p| p.seq).with_context(|| {
                        format!("disk {disk} of {machine} has no recovery point yet")
                    })?
                }
            };
            let (base, records) = points::export_at(&retention, &machine, &disk, seq, &out).await?;
            let vhd_size = if format == "vhd" {
                Some(
                    boomerang_master_target::vhd::finish(&out)
                        .with_context(|| format!("could not make {} a VHD", out.display()))?,
                )
            } else {
                None
            };
            if output == Output::Json {
                print_json(&serde_json::json!({
                    "disk": disk, "seq": seq, "checkpoint": base.to_string(),
                    "records_applied": records, "out": out, "format": format,
                    "vhd_size": vhd_size,
                }))?;
            } else {
                println!(
                    "wrote {} as disk {disk} of {machine} was at seq {seq}: checkpoint {base} and {records} records of the incoming log{}",
                    out.display(),
                    vhd_size.map_or(String::new(), |s| format!("; a fixed VHD of {s} bytes"))
                );
            }
        }
        PointsCommand::Recover {
            retention,
            machine,
            disk,
            at,
            target,
            listen,
            hydrate_rate,
        } => {
            return recover(
                boomerang_master_target::recover::RecoveryConfig {
                    retention,
                    stream: machine,
                    disk,
                    at: parse_at(&at)?,
                    target,
                    hydrate_rate,
                },
                &listen,
            )
            .await;
        }
    }
    Ok(0)
}

/// Serves a recovery over NBD until SIGTERM or SIGINT, hydrating its target meanwhile.
async fn recover(
    config: boomerang_master_target::recover::RecoveryConfig,
    listen: &str,
) -> anyhow::Result<i32> {
    use boomerang_nbd::server::{Export, ListenAddr, Listener, Server};
    use std::sync::atomic::{AtomicBool, Ordering};
    let addr: ListenAddr = listen
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen {listen:?}: {e}"))?;
    let started = std::time::Instant::now();
    let recovery = boomerang_master_target::recover::Recovery::open(&config).await?;
    let export = Export {
        name: config.disk.to_string(),
        description: format!(
            "disk {} of {} at seq {} (instant recovery)",
            config.disk,
            config.stream,
            recovery.seq()
        ),
        device: recovery.clone(),
        read_only: false,
    };
    let listener = Listener::bind(&addr)
        .await
        .with_context(|| format!("could not listen on {listen:?}: is the port in use?"))?;
    let shutdown = crate::agent::shutdown_signal()?;
    println!("listening on {}", listener.local_addr()?);
    // Later lines are for a person watching: a script may have stopped reading.
    let say = |line: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!(
        "serving disk {} of {} at seq {} after {:.3} s; copying it into {}",
        config.disk,
        config.stream,
        recovery.seq(),
        started.elapsed().as_secs_f64(),
        config.target.display()
    ));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let hydrating = {
        let (recovery, stop, rate) = (recovery.clone(), stop.clone(), config.hydrate_rate);
        std::thread::spawn(move || {
            let done = recovery.hydrate(rate, stop);
            match &done {
                Ok(()) if recovery.hydrated() => say(format!(
                    "hydrated: {} holds the whole disk ({} bytes read from the replica store)",
                    recovery.target().display(),
                    recovery.fetched_bytes()
                )),
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(target = %recovery.target().display(), error = %e, "hydration stopped; run the same command again to resume")
                }
            }
            done
        })
    };
    let server = Server::new(vec![export], 64);
    let (stop_serving, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(async move { server.serve(listener, stopped).await });
    shutdown.await;
    let _ = stop_serving.send(true);
    let _ = serving.await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || hydrating.join()).await;
    use boomerang_nbd::BlockDevice;
    recovery.flush().with_context(|| {
        format!(
            "could not save the recovery state of {}",
            config.target.display()
        )
    })?;
    Ok(0)
}

async fn serve(args: RunArgs) -> anyhow::Result<i32> {
    let (Some(tls_dir), Some(retention)) = (args.tls.clone(), args.retention.clone()) else {
        anyhow::bail!("a master target needs --tls DIR and --retention DIR");
    };
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
    let tls = TlsIdentity::load(&tls_dir)?;
    let name = crate::daemon::name_or_dir(args.name, &tls_dir, "master target")?;
    std::fs::create_dir_all(&retention).with_context(|| {
        format!(
            "could not create the retention directory {}: check the path and permissions",
            retention.display()
        )
    })?;
    let root = args
        .store_root
        .map(|root| boomerang_master_target::StoreRoot {
            root,
            key_file: args
                .store_key_file
                .map(|k| std::path::absolute(&k).unwrap_or(k)),
        });
    let kept = boomerang_master_target::StoreRoot::keep(&retention, root.as_ref())
        .map_err(anyhow::Error::msg)?;
    if let Some(root) = &kept {
        tracing::info!(root = %root.root, sealed = root.key_file.is_some(), "the replica stores are under the store root");
    }
    let store_root = kept.map(|r| r.root);
    let retention_dir = retention.clone();
    let (server, metrics, replicas) = receiver_with_replicas(Config {
        name,
        tls,
        retention,
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
    // The configuration server's jobs: test failovers and failovers; those of an earlier run
    // are served again.
    let recoveries = std::sync::Arc::new(Recoveries::new(
        &retention_dir,
        args.recovery_listen.clone(),
    ));
    boomerang_master_target::clear_retired(&retention_dir);
    recoveries.resume().await;
    if !(0.1..=1e6).contains(&args.prune_every) {
        anyhow::bail!(
            "--prune-every {} is not a number of seconds from 0.1: use a value such as 300",
            args.prune_every
        );
    }
    let (pruned, every) = (
        retention_dir.clone(),
        std::time::Duration::from_secs_f64(args.prune_every),
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            boomerang_master_target::retention::prune_all(&pruned).await;
        }
    });
    // Heartbeats: the disks attached (the replica images on the retention volume), the
    // points of each, and how far the disks served at a point are copied.
    // A replica whose store does not answer in time is reported with the points it had at
    // the last listing that worked, rather than held up or left out. (Whether points are
    // made is the appliers' to say: their failures are the problems reported.)
    let (retention, reported, failing) =
        (retention_dir.clone(), recoveries.clone(), replicas.clone());
    let known: std::sync::Arc<std::sync::Mutex<KnownPoints>> = std::sync::Arc::default();
    let manifests = boomerang_store::ManifestCache::default();
    let report: crate::client::Report = Box::new(move || {
        let (retention, reported, failing, known, store_root, manifests) = (
            retention.clone(),
            reported.clone(),
            failing.clone(),
            known.clone(),
            store_root.clone(),
            manifests.clone(),
        );
        Box::pin(async move {
            let progress = serde_json::to_value(reported.progress().await).unwrap_or_default();
            let mut summaries =
                boomerang_master_target::points::summary(&retention, LISTING_TIME, &manifests)
                    .await;
            let problems: Vec<serde_json::Value> = failing
                .problems()
                .into_iter()
                .map(|p| {
                    serde_json::json!({
                        "machine": p.stream,
                        "error": p.error,
                        "since_unix_ms": p.since_unix_ms,
                        "lasting": p.lasting,
                        "whole_store": p.whole_store,
                    })
                })
                .collect();
            {
                let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
                for r in &mut summaries {
                    let key = (r.stream.clone(), r.disk.clone());
                    match &r.error {
                        None => {
                            known.insert(key, (r.points, r.latest));
                        }
                        Some(_) => {
                            if let Some(&(points, latest)) = known.get(&key) {
                                (r.points, r.latest) = (points, latest);
                            }
                        }
                    }
                }
                // Replicas ended or handed back are forgotten.
                known.retain(|(stream, disk), _| {
                    summaries
                        .iter()
                        .any(|r| r.stream == *stream && r.disk == *disk)
                });
            }
            let mut beat = serde_json::Map::new();
            if let Some(root) = &store_root {
                beat.insert("store_root".into(), root.clone().into());
            }
            beat.insert("attached_disks".into(), (summaries.len() as u32).into());
            let replicas: Vec<serde_json::Value> = summaries
                .into_iter()
                .map(|r| {
                    serde_json::json!({
                        "machine": r.stream,
                        "disk": r.disk,
                        "points": r.points as u32,
                        "latest_point_seq": r.latest.map(|(seq, _)| seq),
                        "latest_point_unix_ms": r.latest.and_then(|(_, t)| t).map(|ns| ns / 1_000_000),
                    })
                })
                .collect();
            beat.insert("replicas".into(), replicas.into());
            beat.insert("replica_problems".into(), problems.into());
            beat.insert("recoveries".into(), progress);
            beat
        })
    });
    // (Its report reads every point manifest: not looked at more often than it is sent.)
    crate::client::start_heartbeats(&args.reporting, retention_dir.clone(), report, None)?;
    let handler: crate::client::Handler = std::sync::Arc::new(move |kind, params| {
        let (recoveries, replicas) = (recoveries.clone(), replicas.clone());
        Box::pin(async move { command(&recoveries, &replicas, &kind, &params).await })
    });
    crate::client::start_commands(&args.reporting, handler)?;
    crate::daemon::serve(server, &args.listen, "master target").await
}

/// The points of each replica (machine, disk) at the last listing that worked: their count
/// and the newest.
type KnownPoints = std::collections::HashMap<(String, String), (usize, Option<(u64, Option<u64>)>)>;

/// How long a heartbeat waits for a replica's points to be listed (a store on Azure Blob may
/// not answer): the heartbeat goes out on time, saying so.
const LISTING_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Creates the empty disk image `path` of `size` bytes (sparse), for a machine recovered to
/// an alternate location; one already there of that size is taken as it is (a command given
/// again).
fn new_disk(path: &std::path::Path, size: u64) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "{} is not an absolute path: give the alternate location as one",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.len() == size => return Ok(()),
        Ok(m) => {
            return Err(format!(
                "{} exists already, of {} bytes, not {size}: give an alternate location without it",
                path.display(),
                m.len()
            ));
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("could not create {}: {e}", path.display()))?;
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("could not size {}: {e}", path.display()))
}

/// Writes each of `disks` of `machine` as it was at point `seq` to
/// `RETENTION/materialized/<machine>/<disk>-at-<seq>.<format>`: raw, a fixed VHD (what Azure
/// boots), or, through qemu-img, qcow2 or vmdk. Returns each disk's file.
async fn materialize(
    retention: &std::path::Path,
    machine: &str,
    disks: &[DiskName],
    seq: u64,
    format: &str,
) -> Result<Vec<serde_json::Value>, String> {
    if !["raw", "vhd", "qcow2", "vmdk"].contains(&format) {
        return Err(format!(
            "{format:?} is not a disk format this master target writes: use raw, vhd, qcow2 or vmdk"
        ));
    }
    let dir = retention.join("materialized").join(machine);
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for disk in disks {
        let out = dir.join(format!("{disk}-at-{seq}.{format}"));
        let raw = match format {
            "raw" | "vhd" => out.clone(),
            _ => dir.join(format!("{disk}-at-{seq}.raw.part")),
        };
        let _ = std::fs::remove_file(&raw);
        boomerang_master_target::points::export_at(retention, machine, disk, seq, &raw)
            .await
            .map_err(|e| format!("could not write disk {disk} at seq {seq}: {e}"))?;
        match format {
            "vhd" => {
                boomerang_master_target::vhd::finish(&out)
                    .map_err(|e| format!("could not make {} a VHD: {e}", out.display()))?;
            }
            "qcow2" | "vmdk" => {
                let (from, to, to_format) = (raw.clone(), out.clone(), format.to_string());
                let converted = tokio::task::spawn_blocking(move || {
                    std::process::Command::new("qemu-img")
                        .args(["convert", "-f", "raw", "-O", &to_format])
                        .arg(&from)
                        .arg(&to)
                        .output()
                })
                .await
                .map_err(|e| e.to_string())?;
                let _ = std::fs::remove_file(&raw);
                match converted {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => {
                        return Err(format!(
                            "qemu-img could not convert disk {disk} to {format}: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ));
                    }
                    Err(e) => {
                        return Err(format!(
                            "could not run qemu-img to write disk {disk} as {format} ({e}): install qemu-utils on this master target's host, or fail over with --format raw or vhd"
                        ));
                    }
                }
            }
            _ => {}
        }
        files.push(serde_json::json!({"disk": disk, "path": out, "format": format}));
    }
    Ok(files)
}

/// Carries out one command of the configuration server.
async fn command(
    recoveries: &Recoveries,
    replicas: &boomerang_master_target::Replicas,
    kind: &str,
    params: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    use boomerang_master_target::recoveries::{failover, test_failover};
    let job = params["job"]
        .as_i64()
        .ok_or_else(|| format!("command {kind} names no job"))?;
    let machine = || {
        params["machine"]
            .as_str()
            .ok_or_else(|| format!("command {kind} names no machine"))
    };
    let start = |key: String| async move {
        let machine = machine()?;
        let disks = params["disks"]
            .as_array()
            .ok_or_else(|| format!("command {kind} names no disks"))?
            .iter()
            .map(|d| {
                d.as_str()
                    .and_then(|d| DiskName::new(d).ok())
                    .ok_or_else(|| format!("{d} is not a disk name"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let at = boomerang_master_target::recoveries::At::from_json(&params["at"])?;
        // The latest point: of every record received, once applied (and its marks listed);
        // `latest-processed` takes the newest listed now.
        if !matches!(at, boomerang_master_target::recoveries::At::Seq(_))
            && params["at"] != "latest-processed"
            && !replicas
                .caught_up(machine, std::time::Duration::from_secs(60))
                .await
        {
            tracing::warn!(%machine, "the replica's applier has not applied every record received within 60 s: the newest point it lists now is served");
        }
        let served = recoveries.start(&key, machine, &disks, at).await?;
        let mut answer = serde_json::to_value(served).map_err(|e| e.to_string())?;
        // Materialized too: each disk at the point as an image file of that format.
        if let (Some(format), Some(seq)) = (params["format"].as_str(), answer["seq"].as_u64()) {
            let files = materialize(recoveries.retention(), machine, &disks, seq, format).await?;
            answer["materialized"] = serde_json::json!(files);
        }
        Ok(answer)
    };
    match kind {
        "recovery-start" => start(test_failover(job)).await,
        "recovery-stop" => {
            // The test failovers to stop (one, in older servers' commands).
            let jobs: Vec<i64> = match params["jobs"].as_array() {
                Some(list) => list.iter().filter_map(|j| j.as_i64()).collect(),
                None => vec![job],
            };
            for j in jobs {
                recoveries.stop(&test_failover(j)).await?;
            }
            Ok(serde_json::json!({}))
        }
        "failover-start" => start(failover(machine()?)).await,
        "failover-stop" => {
            recoveries.stop(&failover(machine()?)).await?;
            Ok(serde_json::json!({}))
        }
        // Reprotect, at the failed-over site: the failed-over disks are whole; an agent serves
        // them from now on. The machine's replica here ends with its lineage.
        "failover-release" => {
            let machine = machine()?;
            let disks = recoveries.release(&failover(machine)).await?;
            replicas.release_lineage(machine).await?;
            // With what the machine wrote there since the point: the blocks that differ.
            let disks: Vec<serde_json::Value> = disks
                .iter()
                .map(|d| serde_json::json!({"name": d.disk, "path": d.target, "size": d.size, "resync": d.written}))
                .collect();
            Ok(serde_json::json!({ "disks": disks }))
        }
        // Reprotect, at the original site: the machine's own disks are its replica here.
        "replica-adopt" => {
            let machine = machine()?;
            let disks = params["disks"]
                .as_array()
                .ok_or("replica-adopt names no disks")?
                .iter()
                .map(|d| {
                    let name = DiskName::new(d["name"].as_str().unwrap_or_default())
                        .map_err(|e| e.to_string())?;
                    let path = d["path"]
                        .as_str()
                        .ok_or("replica-adopt names a disk without a path")?;
                    let path = std::path::PathBuf::from(path);
                    // Alternate location: a new disk, empty, of the machine's disk's size.
                    if let Some(size) = d["create_size"].as_u64() {
                        new_disk(&path, size)?;
                    }
                    Ok((name, path))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let lineage = params["lineage"]
                .as_u64()
                .ok_or("replica-adopt names no lineage: upgrade the configuration server")?;
            replicas.adopt(machine, &disks, lineage).await?;
            Ok(serde_json::json!({"disks": params["disks"]}))
        }
        // Failback: the final mark is applied; the machine's own disks go back to it.
        "replica-release" => {
            let disks = replicas.release(machine()?).await?;
            Ok(
                serde_json::json!({"disks": disks.iter().map(|(d, p)| serde_json::json!({"name": d, "path": p})).collect::<Vec<_>>()}),
            )
        }
        "replica-policy" => {
            let machine = machine()?;
            let seconds = params["retention_seconds"]
                .as_u64()
                .ok_or("replica-policy names no retention_seconds")?;
            boomerang_master_target::retention::set(recoveries.retention(), machine, seconds)
                .map_err(|e| format!("could not keep the retention of {machine}: {e}"))?;
            Ok(serde_json::json!({"retention_seconds": seconds}))
        }
        other => Err(format!(
            "this master target does not know command {other:?}: upgrade it"
        )),
    }
}
