//! `boomerang agent`: serve protected disks over NBD with write capture, and work on its log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use boomerang_agent::replica::{Fallback, SyncLink};
use boomerang_agent::{CaptureDevice, Hooks, LogDir, ReplayTo, control, logdir, marks, sync};
use boomerang_core::DiskName;
use boomerang_core::log::{MarkKind, Op, SegmentReader};
use boomerang_nbd::server::{ListenAddr, Listener};
use boomerang_nbd::{Export, FileDevice, Server};
use boomerang_wire::Role;
use boomerang_wire::send::{self, ShipConfig};
use boomerang_wire::tls::TlsIdentity;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::output::{Output, Table, bytes, parse_size, print_json};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// A protected disk: NAME=PATH (raw image or block device). Repeat for more disks.
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<(DiskName, PathBuf)>,
    /// Where to serve NBD: 127.0.0.1:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: ListenAddr,
    /// The agent's write log.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seconds between crash-consistent marks (0: none).
    #[arg(long, default_value_t = 5.0)]
    mark_interval: f64,
    /// Cap on the write log; past it the agent tracks changed blocks in a bitmap instead.
    #[arg(long, default_value = "8GiB", value_parser = parse_size)]
    log_max: u64,
    /// Size limit of one log segment.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    segment_size: u64,
    /// Seconds between app-consistent marks (0: only on request with `agent mark --app`).
    #[arg(long, default_value_t = 0.0)]
    app_mark_interval: f64,
    /// Command (run with sh -c) that quiesces the application before an app-consistent mark.
    #[arg(long)]
    freeze_hook: Option<String>,
    /// Command that resumes the application after the mark.
    #[arg(long)]
    thaw_hook: Option<String>,
    /// Seconds a hook may run before it is stopped and the mark falls back to crash-consistent.
    #[arg(long, default_value_t = 30.0)]
    hook_timeout: f64,
    /// Ship the write log to this process server (HOST:PORT), over mutual TLS.
    #[arg(long, requires = "tls")]
    process_server: Option<String>,
    /// The agent's certificate directory (`boomerang pki issue ... --role agent`).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// The protected machine's name (default: the certificate directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Synchronous replication: acknowledge a write only once the process server holds it.
    #[arg(long, requires = "process_server")]
    sync: bool,
    /// Seconds a synchronous write waits for the process server.
    #[arg(long, default_value_t = 5.0)]
    sync_timeout: f64,
    /// When the process server does not confirm in time: fail the write, or go on
    /// asynchronously with an alert until it catches up.
    #[arg(long, default_value = "async")]
    sync_fallback: Fallback,
    /// Start with no disk, for a machine failed over to this site: the configuration server
    /// attaches its disks here when it is reprotected (the attachment is kept in the log
    /// directory and takes over --disk from then on).
    #[arg(long)]
    standby: bool,
    #[command(flatten)]
    reporting: crate::client::Reporting,
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Inspect or replay a write log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Ask the running agent for a consistency mark now.
    Mark {
        /// The running agent's log directory.
        #[arg(long)]
        log_dir: PathBuf,
        /// An app-consistent mark, between the freeze and thaw hooks.
        #[arg(long)]
        app: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// List segments, record counts and marks.
    Inspect { dir: PathBuf },
    /// Apply the log to a copy of a disk's starting image.
    Replay {
        dir: PathBuf,
        #[arg(long)]
        disk: DiskName,
        /// The disk's image when the log started.
        #[arg(long)]
        base: PathBuf,
        /// latest, mark:ID or seq:N.
        #[arg(long, default_value = "latest")]
        to: ReplayTo,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_disk(s: &str) -> Result<(DiskName, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or_else(|| {
        format!("{s:?} is not NAME=PATH, as in --disk sda=/var/lib/images/web01.img")
    })?;
    Ok((
        DiskName::new(name).map_err(|e| e.to_string())?,
        PathBuf::from(path),
    ))
}

pub async fn run(args: AgentArgs, output: Output) -> anyhow::Result<i32> {
    match args.command {
        Some(AgentCommand::Log(LogCommand::Inspect { dir })) => inspect(&dir, output),
        Some(AgentCommand::Log(LogCommand::Replay {
            dir,
            disk,
            base,
            to,
            out,
        })) => {
            let r = boomerang_agent::replay(&dir, &disk, &base, to, &out)?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                println!(
                    "replayed {} records ({} written) of disk {disk} onto {}; last seq {}",
                    r.records_applied,
                    bytes(r.bytes_written),
                    out.display(),
                    r.last_seq.map_or("-".into(), |s| s.to_string())
                );
            }
            Ok(0)
        }
        Some(AgentCommand::Mark { log_dir, app }) => {
            let reply =
                control::request(&log_dir, if app { "mark app" } else { "mark crash" }).await?;
            if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
                anyhow::bail!("{e}");
            }
            if output == Output::Json {
                print_json(&reply)?;
            } else {
                println!(
                    "mark {} ({}) at seq {}",
                    reply["id"],
                    reply["kind"].as_str().unwrap_or("?"),
                    reply["seq"]
                );
                for w in reply["warnings"].as_array().into_iter().flatten() {
                    eprintln!("warning: {}", w.as_str().unwrap_or_default());
                }
            }
            Ok(0)
        }
        None => serve(args.run).await,
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<i32> {
    let log_dir = args
        .log_dir
        .clone()
        .context("give the agent a write log directory with --log-dir DIR")?;
    // What the configuration server attached here, if it did, rules over --disk.
    let attachment = Attachment::read(&log_dir)?;
    let (disks, replicate) = match &attachment {
        Some(a) => {
            if !args.disks.is_empty() && a.disks != args.disks {
                tracing::warn!(
                    file = %log_dir.join(ATTACHMENT_FILE).display(),
                    "the disks the configuration server attached (or released) are served, not --disk"
                );
            }
            (a.disks.clone(), a.replicate)
        }
        None => (args.disks.clone(), true),
    };
    if disks.is_empty() && attachment.is_none() && !args.standby {
        anyhow::bail!(
            "give at least one protected disk with --disk NAME=PATH, or start with --standby to wait for the disks of a failed-over machine"
        );
    }
    for (flag, value) in [
        ("--mark-interval", args.mark_interval),
        ("--app-mark-interval", args.app_mark_interval),
        ("--hook-timeout", args.hook_timeout),
        ("--sync-timeout", args.sync_timeout),
    ] {
        if !(0.0..=1e9).contains(&value) {
            anyhow::bail!(
                "{flag} {value} is not a number of seconds: use a value such as 5 or 0.5"
            );
        }
    }
    let log = Arc::new(Mutex::new(
        LogDir::open(&log_dir, args.segment_size)?.with_cap(Some(args.log_max)),
    ));
    if let Some(a) = attachment.as_ref().filter(|a| a.new_generation) {
        // Newly attached: the disks' replica starts again from a comparison with them.
        log.lock()
            .map_err(|_| anyhow::anyhow!("log lock poisoned"))?
            .new_generation()?;
        for (disk, _) in &a.disks {
            boomerang_agent::sync::forget(&log_dir, disk).with_context(|| {
                format!(
                    "could not reset the copy state of disk {disk} in {}",
                    log_dir.display()
                )
            })?;
        }
        // The new lineage starts with the generation's first record.
        let since = log
            .lock()
            .map_err(|_| anyhow::anyhow!("log lock poisoned"))?
            .next_seq();
        Attachment {
            new_generation: false,
            since: Some(since.0),
            ..a.clone()
        }
        .write(&log_dir)?;
    }
    // Read again: the new generation above recorded where the lineage starts.
    let lineage = Attachment::read(&log_dir)?
        .map(|a| a.lineage())
        .unwrap_or(boomerang_wire::cache::Lineage::FIRST);
    let sync_link = args.sync.then(|| {
        Arc::new(SyncLink::new(
            Duration::from_secs_f64(args.sync_timeout.max(0.01)),
            args.sync_fallback,
        ))
    });
    let mut exports = Vec::new();
    let mut devices = Vec::new();
    for (name, path) in &disks {
        let dev = FileDevice::open(path, false).with_context(|| {
            format!(
                "could not open disk {name} at {}: check the path and permissions",
                path.display()
            )
        })?;
        exports.push(Export {
            name: name.to_string(),
            description: format!("protected disk {name}"),
            device: {
                let mut device =
                    CaptureDevice::new(name.clone(), dev, log.clone()).with_context(|| {
                        format!(
                            "could not open the dirty-block bitmap of disk {name} in {}",
                            log_dir.display()
                        )
                    })?;
                if let Some(link) = &sync_link {
                    device = device.with_sync(link.clone());
                }
                let device = Arc::new(device);
                devices.push(device.clone());
                device
            },
            read_only: false,
        });
    }
    let server = Server::new(exports, 64);
    // Restarted with new disks: where the machine reached the agent before (with port 0,
    // the port it got), so that clients reconnect to the same address.
    let listen = match std::env::var(REEXEC_LISTEN)
        .ok()
        .map(|a| a.parse::<ListenAddr>())
    {
        Some(Ok(addr)) => addr,
        _ => args.listen.clone(),
    };
    if let ListenAddr::Unix(path) = &listen {
        // Our own socket from an earlier run: we hold the log directory's lock.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = Listener::bind(&listen)
        .await
        .with_context(|| format!("could not listen on {listen:?}: is the port in use?"))?;
    let hooks = Hooks {
        freeze: args.freeze_hook.clone(),
        thaw: args.thaw_hook.clone(),
        timeout: Duration::from_secs_f64(args.hook_timeout.max(0.1)),
        busy: Default::default(),
    };
    // The control socket: we hold the log directory's lock, so an old socket file is stale.
    let sock = control::socket_path(&log_dir);
    let _ = std::fs::remove_file(&sock);
    let control = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("could not create the control socket {}", sock.display()))?;
    let mut background = vec![tokio::spawn(control::serve(
        control,
        log.clone(),
        hooks.clone(),
    ))];
    let (stop_shipping, shipping_stopped) = tokio::sync::watch::channel(false);
    let process_server = attachment
        .as_ref()
        .and_then(|a| a.process_server.clone())
        .or(args.process_server.clone());
    let shipping = match (&process_server, &args.tls) {
        (Some(addr), Some(tls_dir)) if replicate && !disks.is_empty() => {
            let tls = TlsIdentity::load(tls_dir)?;
            let name = crate::daemon::name_or_dir(args.name.clone(), tls_dir, "protected machine")?;
            let digests = sync::Digests {
                tls: tls.clone(),
                addr: addr.clone(),
                name: name.clone(),
            };
            let config = ShipConfig {
                addr: addr.clone(),
                tls,
                stream: name.clone(),
                name,
                // To the process server, on the same site: as they are, at full speed.
                compress: false,
                max_rate: None,
                role: Role::Agent,
                to: Role::ProcessServer,
                disks: disks.iter().map(|(d, _)| d.clone()).collect(),
            };
            let source = Arc::new(logdir::Shipped {
                log: log.clone(),
                link: sync_link.clone(),
                lineage,
            });
            // Disks not copied downstream yet are copied first; marks wait for it.
            sync::hold_marks(&log, &devices);
            // A reprotect knows what differs from the replica: exactly that is sent; the rest
            // (and a disk whose ranges could not be sent) is compared with the replica.
            let resync = attachment
                .as_ref()
                .map(|a| a.resync.clone())
                .unwrap_or_default();
            let (synced, all, cap, dir) =
                (log.clone(), devices.clone(), args.log_max, log_dir.clone());
            let marks_on_schedule = args.mark_interval > 0.0;
            background.push(tokio::spawn(async move {
                for device in &all {
                    let disk = device.disk().to_string();
                    if let Some(ranges) = resync.get(&disk)
                        && !sync::copied(&dir, &disk)
                        && let Err(e) = sync::copy_ranges(&synced, device.clone(), ranges, cap).await
                    {
                        tracing::warn!(%disk, error = %e, "could not send what changed since the failover's point; the disk is compared with its replica instead");
                    }
                }
                // Marks on a schedule: the end of a copy gets one at once too.
                sync::keep_in_sync(synced, all, cap, Some(digests), marks_on_schedule).await
            }));
            Some(tokio::spawn(send::ship(source, config, shipping_stopped)))
        }
        _ => None,
    };
    // Crash-consistent marks on --mark-interval; app-consistent ones on --app-mark-interval,
    // or on what the machine's policy says once the configuration server told it (kept in the
    // log directory, and taken over the flag at the next start).
    let app_every = match std::fs::read_to_string(log_dir.join(APP_MARK_FILE)) {
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(v) if (0.0..=1e9).contains(&v) => {
                if v != args.app_mark_interval {
                    tracing::warn!(
                        policy = v,
                        flag = args.app_mark_interval,
                        "app-consistent marks follow the machine's policy (from the configuration server), not --app-mark-interval"
                    );
                }
                v
            }
            _ => args.app_mark_interval,
        },
        Err(_) => args.app_mark_interval,
    };
    let (app_schedule, app_changes) = tokio::sync::watch::channel(app_every);
    let app_schedule = Arc::new(app_schedule);
    // None while standing by: there is nothing to mark.
    let schedules = if disks.is_empty() {
        Vec::new()
    } else {
        vec![
            (
                MarkKind::Crash,
                tokio::sync::watch::channel(args.mark_interval).1,
            ),
            (MarkKind::App, app_changes),
        ]
    };
    for (kind, mut every) in schedules {
        let (log, hooks) = (log.clone(), hooks.clone());
        background.push(tokio::spawn(async move {
            loop {
                let seconds = *every.borrow_and_update();
                if seconds <= 0.0 {
                    // None on this schedule, until it changes.
                    if every.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => {}
                    changed = every.changed() => {
                        if changed.is_ok() {
                            continue;
                        }
                        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                    }
                }
                // No marks while a copy runs, nor once the machine was failed over from here.
                if log
                    .lock()
                    .is_ok_and(|l| l.is_syncing() || l.failed_over().is_some())
                {
                    continue;
                }
                if let Err(e) = marks::mark(&log, kind, &hooks).await {
                    tracing::warn!(error = %boomerang_core::chain(&e), "could not insert a {kind:?} mark");
                }
            }
        }));
    }
    // Everything a client or script may use is ready: announce it. The first line of stdout is
    // the address, for scripts and tests.
    // Heartbeats describe the machine: its OS, its disks and how far their copy is.
    // The write rate is the average over the last heartbeat interval (the report is made more
    // often, to send a heartbeat at once when a copy ends).
    let (reported_log, reported_disks) = (log.clone(), devices.clone());
    let machine = match (&args.name, &args.tls) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(dir)) => crate::daemon::name_or_dir(None, dir, "protected machine").ok(),
        _ => None,
    };
    let previous = Mutex::new(None::<(u64, std::time::Instant, Option<u64>)>);
    let window = Duration::from_secs_f64(args.reporting.heartbeat_interval.clamp(0.1, 3600.0));
    // Whether the machine's network reaches its process server (a TCP connection, once a
    // heartbeat interval), for the preflight of the jobs that make it ship there.
    let reaches: Arc<Mutex<Option<bool>>> = Arc::default();
    if let Some(addr) = process_server.clone() {
        let (reaches, every) = (reaches.clone(), window.max(Duration::from_secs(1)));
        tokio::spawn(async move {
            loop {
                let connect = tokio::net::TcpStream::connect(addr.as_str());
                let answered = matches!(
                    tokio::time::timeout(Duration::from_secs(3), connect).await,
                    Ok(Ok(_))
                );
                *reaches.lock().unwrap_or_else(|e| e.into_inner()) = Some(answered);
                tokio::time::sleep(every).await;
            }
        });
    }
    let reported_ps = process_server.clone();
    let report: crate::client::Report = Box::new(move || {
        let (states, through) = boomerang_agent::sync::states(&reported_log, &reported_disks);
        let drained = reported_log.lock().is_ok_and(|l| l.failed_over().is_some());
        let written: u64 = reported_disks.iter().map(|d| d.written_bytes()).sum();
        let now = std::time::Instant::now();
        let rate = match previous.lock() {
            Ok(mut p) => match *p {
                Some((_, at, rate)) if now.duration_since(at) < window => rate,
                _ => {
                    let rate = p.map(|(before, at, _)| {
                        let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                        (written.saturating_sub(before) as f64 / secs) as u64
                    });
                    *p = Some((written, now, rate));
                    rate
                }
            },
            Err(_) => None,
        };
        let machine = machine.clone();
        let reached = *reaches.lock().unwrap_or_else(|e| e.into_inner());
        let ps = reported_ps.clone();
        Box::pin(async move {
            let mut beat = serde_json::Map::new();
            if let Some(m) = machine {
                beat.insert("machine".into(), m.into());
            }
            if let Some(ps) = ps {
                beat.insert("process_server".into(), ps.into());
                if let Some(reached) = reached {
                    beat.insert("process_server_reachable".into(), reached.into());
                }
            }
            beat.insert("standby".into(), states.is_empty().into());
            if drained {
                beat.insert("drained".into(), true.into());
            }
            beat.insert("replicating".into(), replicate.into());
            if let Some(rate) = rate {
                beat.insert("write_bytes_per_second".into(), rate.into());
            }
            beat.insert("attached_disks".into(), (states.len() as u32).into());
            beat.insert("os".into(), os());
            let disks: Vec<serde_json::Value> = states
                .into_iter()
                .map(|d| {
                    serde_json::json!({
                        "name": d.disk,
                        "size_bytes": d.size,
                        "sync": match d.sync {
                            boomerang_agent::sync::SyncState::InitialSync => "initial-sync",
                            boomerang_agent::sync::SyncState::Resync => "resync",
                            boomerang_agent::sync::SyncState::InSync => "in-sync",
                        },
                        "copied_bytes": d.copied_bytes,
                    })
                })
                .collect();
            // Disks not replicated are not protected: the machine shows as such.
            if replicate {
                beat.insert("disks".into(), disks.into());
                beat.insert("synced_through_seq".into(), through.0.into());
            }
            beat
        })
    });
    // A disk's copy that ended, a drain, a new position of the last copy: at once.
    let watched: crate::client::Watched = Arc::new(|beat| {
        let disks = beat.get("disks").and_then(|d| d.as_array()).cloned();
        serde_json::json!([
            disks
                .unwrap_or_default()
                .iter()
                .map(|d| d["sync"].clone())
                .collect::<Vec<_>>(),
            beat.get("synced_through_seq"),
            beat.get("standby"),
            beat.get("drained"),
            beat.get("replicating"),
        ])
    });
    crate::client::start_heartbeats(&args.reporting, log_dir.clone(), report, Some(watched))?;
    // The configuration server's jobs: the drain of a planned failover, the policy's
    // app-consistent schedule.
    let (restart, mut restarting) = tokio::sync::watch::channel(false);
    let here = Arc::new(Here {
        log: log.clone(),
        app_schedule: app_schedule.clone(),
        disks: disks.clone(),
        replicate,
        process_server: process_server.clone(),
        lineage,
        restart,
    });
    let handler: crate::client::Handler = Arc::new(move |kind, params| {
        let here = here.clone();
        Box::pin(async move { command(&here, &kind, &params).await })
    });
    crate::client::start_commands(&args.reporting, handler)?;
    let shutdown = shutdown_signal()?;
    let address = listener.local_addr()?;
    {
        // After a restart with new disks nobody may read stdout any more: not an error.
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {address}").and_then(|()| out.flush());
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(async move { server.serve(listener, stopped).await });
    // A restart only once asked: without a configuration server nobody holds the sender.
    let asked = async move {
        if restarting.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let restart = tokio::select! {
        _ = shutdown => false,
        _ = asked => true,
    };
    let _ = stop.send(true);
    let _ = serving.await;
    let _ = stop_shipping.send(true);
    if let Some(task) = shipping {
        let _ = task.await;
    }
    {
        // Never stop between a freeze and its thaw: wait for a mark in progress.
        let _no_mark_running = hooks.busy.lock().await;
        for task in background {
            task.abort();
        }
    }
    let _ = std::fs::remove_file(&sock);
    if let ListenAddr::Unix(path) = &listen {
        let _ = std::fs::remove_file(path);
    }
    let mut log = log
        .lock()
        .map_err(|_| anyhow::anyhow!("log lock poisoned"))?;
    log.close_clean(|| devices.iter().try_for_each(|d| d.sync_disk()))?;
    if restart {
        drop(log);
        eprintln!("agent restarting: the configuration server attached or released its disks");
        return Err(reexec(&address));
    }
    eprintln!("agent stopped; write log synced in {}", log.dir().display());
    Ok(0)
}

/// Runs this agent again, in place (same process id), with the same arguments: it starts
/// with what the attachment file says now.
fn reexec(address: &str) -> anyhow::Error {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt;
    let _ = std::io::stdout().flush();
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(REEXEC_LISTEN, address)
        .exec();
    anyhow::anyhow!("could not restart the agent with its new disks: {err}; start it again")
}

/// Waits for SIGTERM or SIGINT. Install it before announcing the service, so that a signal
/// sent right after the announcement is handled, not fatal.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("could not handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("could not handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[derive(Serialize)]
struct SegmentInfo {
    path: String,
    first_seq: u64,
    last_seq: Option<u64>,
    records: u64,
    writes: u64,
    bytes_written: u64,
    end: String,
}

#[derive(Serialize)]
struct MarkInfo {
    id: u64,
    kind: String,
    seq: u64,
    time_unix_ns: u64,
}

fn inspect(dir: &std::path::Path, output: Output) -> anyhow::Result<i32> {
    let mut segs = Vec::new();
    let mut marks = Vec::new();
    for path in logdir::segments(dir)
        .with_context(|| format!("could not read log directory {}", dir.display()))?
    {
        let mut reader = SegmentReader::open(&path)?;
        let mut info = SegmentInfo {
            path: path.display().to_string(),
            first_seq: reader.header().first_seq.0,
            last_seq: None,
            records: 0,
            writes: 0,
            bytes_written: 0,
            end: String::new(),
        };
        for record in reader.by_ref() {
            let record = record?;
            info.records += 1;
            info.last_seq = Some(record.seq.0);
            match record.op {
                Op::Write { data, .. } => {
                    info.writes += 1;
                    info.bytes_written += data.len() as u64;
                }
                Op::Mark { kind, id, time } => marks.push(MarkInfo {
                    id: id.0,
                    kind: format!("{kind:?}").to_lowercase(),
                    seq: record.seq.0,
                    time_unix_ns: time.0,
                }),
                _ => {}
            }
        }
        info.end = reader.end().map_or("unknown".into(), |e| format!("{e:?}"));
        segs.push(info);
    }
    let mut bitmaps = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("could not read log directory {}", dir.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if let Some(disk) = name
            .strip_prefix("dirty-")
            .and_then(|n| n.strip_suffix(".bitmap"))
            && let Some((size, dirty)) = boomerang_agent::bitmap::DirtyBitmap::inspect(&path)?
        {
            bitmaps.push(serde_json::json!({ "disk": disk, "path": path, "disk_size": size, "dirty_blocks": dirty }));
        }
    }
    bitmaps.sort_by(|a, b| a["disk"].as_str().cmp(&b["disk"].as_str()));
    if output == Output::Json {
        print_json(&serde_json::json!({ "segments": segs, "marks": marks, "bitmaps": bitmaps }))?;
    } else {
        let mut t = Table::new(&["SEGMENT", "FIRST", "LAST", "RECORDS", "WRITES", "WRITTEN"]);
        for s in &segs {
            t.row(vec![
                s.path.clone(),
                s.first_seq.to_string(),
                s.last_seq.map_or("-".into(), |x| x.to_string()),
                s.records.to_string(),
                s.writes.to_string(),
                bytes(s.bytes_written),
            ]);
        }
        t.print();
        println!(
            "{} marks{}",
            marks.len(),
            marks.last().map_or(String::new(), |m| format!(
                ", last: mark {} ({}) at seq {}",
                m.id, m.kind, m.seq
            ))
        );
    }
    Ok(0)
}

/// The operating system the agent runs on (the protected machine's, as a mobility agent runs
/// inside it): its family, and its version from `/etc/os-release` (`0` when unknown).
fn os() -> serde_json::Value {
    let family = if cfg!(windows) { "windows" } else { "linux" };
    let version = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VERSION_ID="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "0".to_string());
    serde_json::json!({"family": family, "version": version})
}

/// In the log directory: the app-consistent schedule the machine's policy set (seconds).
const APP_MARK_FILE: &str = "app-mark-interval";

/// How long a planned failover's drain waits for the process server to hold the final mark.
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// The disks the configuration server attached to this agent (reprotect, failback), kept in
/// the log directory: they take over --disk. No disk: standing by.
const ATTACHMENT_FILE: &str = "attached.json";

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Attachment {
    #[serde(with = "disk_list")]
    disks: Vec<(DiskName, PathBuf)>,
    /// Whether the disks' writes are shipped to the process server.
    replicate: bool,
    /// Set until the agent started a new generation of its log for them.
    #[serde(default)]
    new_generation: bool,
    /// The disks given back at the last release, and what the machine had changed here after
    /// the failover's point (dropped), for the answer to a repeated release.
    #[serde(default, with = "disk_list")]
    released: Vec<(DiskName, PathBuf)>,
    #[serde(default)]
    discarded: Option<boomerang_agent::logdir::Changes>,
    /// By disk: the byte ranges that differ from its replica (a reprotect's resync set), when
    /// known; a disk left out is compared with its replica whole.
    #[serde(default)]
    resync: std::collections::BTreeMap<String, Vec<(u64, u64)>>,
    /// The process server the disks' writes go to, when the configuration server chose one:
    /// it takes over --process-server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process_server: Option<String>,
    /// The lineage of the disks' replica (the attaching job's number; 0: the first), and its
    /// first sequence number in the log, once the agent has started its new generation.
    #[serde(default)]
    lineage: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<u64>,
}

impl Attachment {
    /// The lineage the disks' records are of.
    fn lineage(&self) -> boomerang_wire::cache::Lineage {
        boomerang_wire::cache::Lineage {
            id: self.lineage,
            since: boomerang_core::Seq(self.since.unwrap_or(1).max(1)),
        }
    }
}

mod disk_list {
    use std::path::PathBuf;

    use boomerang_core::DiskName;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Disk {
        name: String,
        path: PathBuf,
    }

    pub fn serialize<S: Serializer>(v: &[(DiskName, PathBuf)], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|(n, p)| Disk {
                name: n.to_string(),
                path: p.clone(),
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(DiskName, PathBuf)>, D::Error> {
        Vec::<Disk>::deserialize(d)?
            .into_iter()
            .map(|disk| {
                DiskName::new(&disk.name)
                    .map(|n| (n, disk.path))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

impl Attachment {
    fn read(dir: &std::path::Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(ATTACHMENT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
                format!(
                    "the attachment file {} is damaged: it says which disks the configuration server attached here; restore it, or remove it to serve the --disk disks",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("could not read {}", path.display())),
        }
    }

    fn write(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let path = dir.join(ATTACHMENT_FILE);
        let bytes = serde_json::to_vec_pretty(self)?;
        boomerang_core::write_atomic(&path, &bytes)
            .with_context(|| format!("could not write {}", path.display()))
    }
}

/// What a command of the configuration server works on.
struct Here {
    log: Arc<Mutex<LogDir>>,
    app_schedule: Arc<tokio::sync::watch::Sender<f64>>,
    /// The disks served, and whether they are replicated, as this run started.
    disks: Vec<(DiskName, PathBuf)>,
    replicate: bool,
    /// The process server their writes go to.
    process_server: Option<String>,
    /// The lineage their records are of.
    lineage: boomerang_wire::cache::Lineage,
    /// Asks for a restart with the attachment file's disks.
    restart: tokio::sync::watch::Sender<bool>,
}

fn disks_json(disks: &[(DiskName, PathBuf)]) -> serde_json::Value {
    disks
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n.as_str(), "path": p}))
        .collect()
}

/// Set for the agent restarted with new disks: the address it listened on.
const REEXEC_LISTEN: &str = "BOOMERANG_AGENT_LISTEN";

/// Restarts the agent with the attachment file's disks. The command is not answered from
/// here: this process stops serving the disks first, and the agent restarted answers it
/// (given again, as every command not answered) from what it serves then.
async fn restart_then_answer(here: &Here) -> Result<serde_json::Value, String> {
    let _ = here.restart.send(true);
    std::future::pending().await
}

/// Carries out one command of the configuration server.
async fn command(
    here: &Here,
    kind: &str,
    params: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let (log, app_schedule) = (&here.log, &here.app_schedule);
    let dir = log
        .lock()
        .map_err(|_| "the write log lock is poisoned".to_string())?
        .dir()
        .to_path_buf();
    match kind {
        // Reprotect or failback: serve these disks here, captured, and replicate them or not.
        "attach" => {
            let wanted: Vec<(DiskName, PathBuf)> =
                serde_json::from_value::<Vec<serde_json::Value>>(params["disks"].clone())
                    .map_err(|e| format!("attach names no disks: {e}"))?
                    .iter()
                    .map(|d| {
                        let name = d["name"].as_str().unwrap_or_default();
                        let path = d["path"]
                            .as_str()
                            .ok_or("attach names a disk without a path")?;
                        DiskName::new(name)
                            .map(|n| (n, PathBuf::from(path)))
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Result<_, String>>()?;
            if wanted.is_empty() {
                return Err("attach names no disks".into());
            }
            let replicate = params["replicate"].as_bool().unwrap_or(true);
            // What differs from the replica, by disk, where the server knows it.
            let mut resync = std::collections::BTreeMap::new();
            for d in params["disks"].as_array().into_iter().flatten() {
                if let (Some(name), Some(ranges)) = (d["name"].as_str(), d["resync"].as_array()) {
                    let ranges: Option<Vec<(u64, u64)>> = ranges
                        .iter()
                        .map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
                        .collect();
                    let ranges = ranges
                        .ok_or_else(|| format!("attach gives disk {name} bad resync ranges"))?;
                    resync.insert(name.to_string(), ranges);
                }
            }
            let process_server = params["process_server"].as_str().map(str::to_string);
            let lineage = params["lineage"]
                .as_u64()
                .ok_or("attach names no lineage: upgrade the configuration server")?;
            // The disks served here already: their log goes on, in the lineage it is of.
            if here.disks == wanted && lineage != here.lineage.id {
                return Err(format!(
                    "attach names lineage {lineage}, and the disks served here are of {}: their records cannot change lineage without a new generation; release them first",
                    here.lineage
                ));
            }
            if here.disks == wanted
                && here.replicate == replicate
                && (process_server.is_none() || here.process_server == process_server)
            {
                return Ok(
                    serde_json::json!({"disks": disks_json(&wanted), "replicate": replicate}),
                );
            }
            if !here.disks.is_empty() && here.disks != wanted {
                return Err(format!(
                    "this agent serves other disks ({}): release them first",
                    here.disks
                        .iter()
                        .map(|(n, p)| format!("{n}={}", p.display()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            for (name, path) in &wanted {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(format!(
                        "disk {name} at {} cannot be attached: {e}",
                        path.display()
                    ));
                }
            }
            Attachment {
                disks: wanted,
                replicate,
                // The same disks, now replicated: the log goes on.
                new_generation: here.disks.is_empty(),
                resync,
                process_server,
                lineage,
                // Set at the restart, where a new generation starts; else the log goes on.
                since: (!here.disks.is_empty()).then_some(here.lineage.since.0),
                ..Default::default()
            }
            .write(&dir)
            .map_err(|e| format!("{e:#}"))?;
            restart_then_answer(here).await
        }
        // Reprotect: the machine runs elsewhere now, and its disks here are about to take its
        // writes from there. What it changed here after the failover's point is lost then:
        // refused unless the operator said to discard it.
        "release" => {
            if here.disks.is_empty() {
                let a = Attachment::read(&dir)
                    .map_err(|e| format!("{e:#}"))?
                    .unwrap_or_default();
                return Ok(
                    serde_json::json!({"disks": disks_json(&a.released), "discarded": a.discarded}),
                );
            }
            let discard = params["discard_unreplicated"].as_bool().unwrap_or(false);
            let changes = match params["point"].as_u64() {
                Some(point) => {
                    let held = log.clone();
                    let changes = tokio::task::spawn_blocking(move || {
                        let mut log = held
                            .lock()
                            .map_err(|_| "the write log lock is poisoned".to_string())?;
                        // No write is taken from here on: what is counted is all there is.
                        log.fence().map_err(|e| boomerang_core::chain(&e))?;
                        log.wait_applied();
                        log.changes_after(boomerang_core::Seq(point))
                            .map_err(|e| boomerang_core::chain(&e))
                    })
                    .await
                    .map_err(|e| e.to_string())??;
                    Some((point, changes))
                }
                None => None,
            };
            if let Some((point, c)) = changes
                && (c.records > 0 || !c.complete)
                && !discard
            {
                return Err(format!(
                    "the machine wrote here after the failover's point (seq {point}): {} change(s), {} byte(s){}, never replicated; the failed-over copy has written since too, so both sides changed since the split. Reprotecting overwrites these disks with the failed-over copy: to drop what was written here, reprotect with --discard-unreplicated. These disks take no more writes from now on",
                    c.records,
                    c.bytes,
                    if c.complete {
                        ""
                    } else {
                        " at least (older records were released)"
                    }
                ));
            }
            let discarded = changes.map(|(_, c)| c);
            Attachment {
                disks: Vec::new(),
                replicate: false,
                new_generation: false,
                // Absolute, for the master target that takes them.
                released: here
                    .disks
                    .iter()
                    .map(|(n, p)| (n.clone(), p.canonicalize().unwrap_or_else(|_| p.clone())))
                    .collect(),
                discarded,
                resync: Default::default(),
                process_server: None,
                // Not shipped any more; kept, for what the log holds.
                lineage: here.lineage.id,
                since: Some(here.lineage.since.0),
            }
            .write(&dir)
            .map_err(|e| format!("{e:#}"))?;
            restart_then_answer(here).await
        }
        // The policy's app-consistent schedule, kept in the log directory for the next start.
        "app-mark-interval" => {
            let seconds = params["seconds"]
                .as_f64()
                .filter(|s| (0.0..=1e9).contains(s))
                .ok_or("app-mark-interval names no number of seconds")?;
            let path = log
                .lock()
                .map_err(|_| "the write log lock is poisoned".to_string())?
                .dir()
                .join(APP_MARK_FILE);
            boomerang_core::write_atomic(&path, seconds.to_string().as_bytes())
                .map_err(|e| format!("could not keep the schedule in {}: {e}", path.display()))?;
            let _ = app_schedule.send(seconds);
            Ok(serde_json::json!({"seconds": seconds}))
        }
        // A planned failover: a final mark, no write after it, and the final mark durable at
        // the process server before the answer.
        "drain" => {
            let held = log.clone();
            let seq = tokio::task::spawn_blocking(move || {
                held.lock()
                    .map_err(|_| "the write log lock is poisoned".to_string())?
                    .fail_over()
                    .map_err(|e| boomerang_core::chain(&e))
            })
            .await
            .map_err(|e| e.to_string())??;
            let deadline = std::time::Instant::now() + DRAIN_WAIT;
            while log.lock().map(|l| l.acked()).unwrap_or_default() < seq {
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "the process server did not confirm the final mark (seq {}) within {} s: the machine takes no more writes here; check the link, or fail over unplanned to its latest point",
                        seq.0,
                        DRAIN_WAIT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(serde_json::json!({"seq": seq.0}))
        }
        other => Err(format!(
            "this agent does not know command {other:?}: upgrade it"
        )),
    }
}
