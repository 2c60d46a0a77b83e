//! `boomerang quickstart`: the whole lifecycle on this machine. Two directories are the two
//! sites; every component is a process of its own on loopback, as in production: the
//! configuration server, at site A the machine's agent, a process server and a master target,
//! at site B the same, with an agent of the machine standing by. A sample machine (one disk)
//! is protected from A to B, written by Boomerang's own verifying writer through its agent,
//! failed over (planned), committed, reprotected back into its own disk at A, failed back,
//! and reprotected to B again. The disk is checked against what the writer wrote at every
//! step, and the summary gives the RPO seen, the RTO of failover and failback, and the bytes
//! each reprotect moved against the disk's size.

use std::fs::File;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use boomerang_core::log::Op;
use boomerang_core::sample::XorShift as Rng;
use boomerang_nbd::client::Client;
use serde::Serialize;
use serde_json::{Value, json};

use crate::client::Api;
use crate::output::{Output, Table, bytes, print_json};

#[derive(clap::Args, Debug)]
pub struct QuickstartArgs {
    /// Work in this directory (kept afterwards, with every component's log in logs/) instead
    /// of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the sample machine's disk.
    #[arg(long, default_value = "64MiB", value_parser = crate::output::parse_size)]
    disk_size: u64,
    /// Seconds the machine writes at site A before its failover.
    #[arg(long, default_value_t = 3.0)]
    workload_seconds: f64,
    /// Percent of the disk's 4 KiB blocks the machine writes at site B before the reprotect
    /// (default: 64 blocks).
    #[arg(long)]
    changed_percent: Option<f64>,
    /// Before the reprotect, copy both sites' disks into DIR/images (a.img, b.img), for a
    /// benchmark to compare another tool's delta transfer on the same pair.
    #[arg(long, requires = "dir", hide = true)]
    keep_images: bool,
    /// Keep site B's recovery points on Azure Blob under this location
    /// (`azure://container/prefix`), sealed under a key made in DIR/site-b.key. Credentials
    /// come from the environment: AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY, or
    /// AZURE_STORAGE_USE_EMULATOR=true (and AZURITE_BLOB_STORAGE_URL) for Azurite.
    #[arg(long)]
    azure: Option<String>,
}

#[derive(Serialize)]
struct StepReport {
    name: String,
    ok: bool,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, Default)]
struct Summary {
    ok: bool,
    dir: PathBuf,
    steps: Vec<StepReport>,
    /// The highest RPO the configuration server showed while the machine wrote at site A.
    rpo_seconds: Option<f64>,
    /// From the failover's request to the first read served at site B.
    failover_rto_seconds: Option<f64>,
    /// From the failback's request to the first read served at site A again.
    failback_rto_seconds: Option<f64>,
    /// Write data the reprotect sent to site A (only blocks that differ should travel).
    reprotect_bytes_moved: Option<u64>,
    /// From the reprotect's request to the machine protected at site A.
    reprotect_seconds: Option<f64>,
    /// What the machine changed at site B before the reprotect (4 KiB blocks, once each).
    reprotect_bytes_changed: Option<u64>,
    /// The same for the reprotect back to site B after the failback.
    reprotect_again_bytes_moved: Option<u64>,
    reprotect_again_bytes_changed: Option<u64>,
    disk_size_bytes: u64,
    bytes_written_by_workload: u64,
    /// Where site B kept its recovery points, when on Azure Blob (`--azure`).
    #[serde(skip_serializing_if = "Option::is_none")]
    site_b_store: Option<String>,
}

const BLOCK: u64 = 4096;
const MACHINE: &str = "web01";

/// The inventory of the quickstart's two sites (`site-a` and `site-b`, each a host with a
/// datastore in its directory): the sample machine with its disk of `size` bytes at site A,
/// and at each site (A, B) a master target (address, on a machine of its own) and a process
/// server (address).
fn sample_inventory(
    dir: &Path,
    size: u64,
    at: [(&str, &str); 2],
    site_b_container: Option<&str>,
) -> anyhow::Result<String> {
    let mut text = String::new();
    for (i, site) in ["a", "b"].into_iter().enumerate() {
        let (mt, ps) = at[i];
        let retention = path(&dir.join(format!("site-{site}/retention")))?.to_string();
        let datastore = path(&dir.join(format!("site-{site}")))?.to_string();
        // Site B on Azure Blob: its storage account, as the environment gives it.
        let kind = match site_b_container.filter(|_| site == "b") {
            None => "kind = \"local\"".to_string(),
            Some(container) => {
                let emulator =
                    std::env::var("AZURE_STORAGE_USE_EMULATOR").is_ok_and(|v| v == "true");
                let account = if emulator {
                    "devstoreaccount1".to_string()
                } else {
                    std::env::var("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or_default()
                };
                format!(
                    "kind = \"azure\"\nazure = {{ account = \"{account}\", container = \"{container}\", {} }}",
                    if emulator {
                        "use_emulator = true"
                    } else {
                        "key_env = \"AZURE_STORAGE_ACCOUNT_KEY\""
                    }
                )
            }
        };
        text.push_str(&format!(
            r#"[[site]]
name = "site-{site}"
{kind}

[[host]]
name = "host-{site}"
site = "site-{site}"

[[datastore]]
name = "ds-{site}"
host = "host-{site}"
type = "VMFS"
path = "{datastore}"

[[machine]]
name = "mt-{site}-vm"
site = "site-{site}"
host = "host-{site}"
os = {{ family = "linux", version = "12" }}
tools = "running"
config = {{ "disk.EnableUUID" = "true" }}
controllers = [{{ name = "scsi0", kind = "lsi-logic" }}]

[[master_target]]
name = "mt-{site}"
site = "site-{site}"
machine = "mt-{site}-vm"
address = "{mt}"
retention = {{ path = "{retention}", filesystem = "ext4", capacity_bytes = 10737418240 }}

[[process_server]]
name = "ps-{site}"
site = "site-{site}"
address = "{ps}"

"#
        ));
    }
    text.push_str(&format!(
        r#"[[machine]]
name = "{MACHINE}"
site = "site-a"
host = "host-a"
datastore = "ds-a"
os = {{ family = "linux", version = "12" }}
tools = "running"
config = {{ "disk.EnableUUID" = "true" }}
controllers = [{{ name = "scsi0", kind = "lsi-logic" }}]
disks = [{{ name = "{DISK}", size_bytes = {size}, uuid = "quickstart-{MACHINE}-{DISK}", controller = "scsi0" }}]
"#
    ));
    Ok(text)
}
const DISK: &str = "d0";

pub async fn run(args: QuickstartArgs, output: Output) -> anyhow::Result<i32> {
    if args.disk_size < 1 << 20 || args.disk_size % (1 << 20) != 0 {
        bail!("--disk-size must be a whole number of MiB, at least 1MiB");
    }
    if !(0.0..=3600.0).contains(&args.workload_seconds) {
        bail!("--workload-seconds must be between 0 and 3600");
    }
    if args
        .changed_percent
        .is_some_and(|p| !(0.0..=100.0).contains(&p))
    {
        bail!("--changed-percent must be between 0 and 100");
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("could not create {}", d.display()))?;
            let used = std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some());
            if used {
                bail!(
                    "{} is not empty: give a new directory to --dir",
                    d.display()
                );
            }
            d.canonicalize()?
        }
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    let mut tour = Tour::new(dir.clone(), args.disk_size, output);
    let mut world = None;
    let outcome = tour.run(&args, &mut world).await;
    drop(world);
    tour.summary.ok = outcome.is_ok() && tour.summary.steps.iter().all(|s| s.ok);
    if let Err(e) = &outcome {
        tour.say(format!("stopped: {e:#}"));
        if args.dir.is_none() {
            tour.say("(run with --dir DIR to keep the components' logs)".into());
        }
    }
    tour.print_summary(output)?;
    Ok(if tour.summary.ok { 0 } else { 3 })
}

/// The components, stopped when dropped.
struct World {
    api: Api,
    agent_a: Proc,
    agent_b_addr: String,
    procs: Vec<Proc>,
}

struct Tour {
    dir: PathBuf,
    human: bool,
    summary: Summary,
    spinner: Option<indicatif::ProgressBar>,
    /// The machine's disk as its writer left it: what every check compares with.
    model: Vec<u8>,
    rng: Rng,
}

const STEPS: usize = 10;

impl Tour {
    fn new(dir: PathBuf, disk_size: u64, output: Output) -> Tour {
        use std::io::IsTerminal;
        let human = output == Output::Human;
        Tour {
            summary: Summary {
                dir: dir.clone(),
                disk_size_bytes: disk_size,
                ..Default::default()
            },
            dir,
            human,
            spinner: (human && std::io::stderr().is_terminal()).then(|| {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            }),
            model: Vec::new(),
            rng: Rng::new(0x2545_f491_4f6c_dd1d),
        }
    }

    fn say(&self, line: String) {
        if !self.human {
            return;
        }
        match &self.spinner {
            Some(s) => s.println(line),
            None => println!("{line}"),
        }
    }

    fn progress(&self, what: String) {
        if let Some(s) = &self.spinner {
            s.set_message(what);
        }
    }

    /// Runs one step: its name, time and outcome go into the summary.
    async fn step<T>(
        &mut self,
        name: &str,
        work: impl AsyncFnOnce(&mut Tour) -> anyhow::Result<(T, String)>,
    ) -> anyhow::Result<T> {
        let n = self.summary.steps.len() + 1;
        self.progress(format!("[{n}/{STEPS}] {name}"));
        let started = Instant::now();
        let outcome = work(self).await;
        let seconds = started.elapsed().as_secs_f64();
        self.progress(String::new());
        match outcome {
            Ok((value, detail)) => {
                self.say(format!("[{n}/{STEPS}] {name} ({seconds:.1} s): {detail}"));
                self.summary.steps.push(StepReport {
                    name: name.into(),
                    ok: true,
                    seconds,
                    error: None,
                });
                Ok(value)
            }
            Err(e) => {
                self.say(format!("[{n}/{STEPS}] {name} FAILED after {seconds:.1} s"));
                self.summary.steps.push(StepReport {
                    name: name.into(),
                    ok: false,
                    seconds,
                    error: Some(format!("{e:#}")),
                });
                Err(e.context(format!("step {name:?}")))
            }
        }
    }

    async fn run(
        &mut self,
        args: &QuickstartArgs,
        world: &mut Option<World>,
    ) -> anyhow::Result<()> {
        self.say(format!("Boomerang quickstart in {}", self.dir.display()));
        self.say(format!(
            "  site A: {}   site B: {}",
            self.dir.join("site-a").display(),
            self.dir.join("site-b").display()
        ));
        let size = args.disk_size;
        let azure = args.azure.clone();
        let w = self
            .step("start the components", async |t: &mut Tour| {
                let w = t.start(size, azure.as_deref()).await?;
                let mut said = "configuration server; agent, process server and master target at each site; an agent of web01 standing by at B".to_string();
                if let Some(root) = &t.summary.site_b_store {
                    said.push_str(&format!(
                        "; site B keeps its recovery points on Azure Blob at {root}, sealed (key in site-b.key)"
                    ));
                }
                Ok((w, said))
            })
            .await?;
        let w = world.insert(w);
        self.step("protect", async |t: &mut Tour| {
            t.job(
                &w.api,
                json!({"kind": "protect", "machine": MACHINE, "policy": "quickstart"}),
            )
            .await?;
            // The master target's first checkpoint hashes the whole disk: a failover before
            // it would wait for it.
            t.progress("protect: the first recovery point".into());
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let s = w
                    .api
                    .call(reqwest::Method::GET, &format!("/api/machines/{MACHINE}/status"), None)
                    .await?;
                let cut = s["disks"]
                    .as_array()
                    .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["points"].as_u64() > Some(0)));
                if cut {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the master target cut no recovery point within 10 minutes: see logs/mt-b.log");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok((
                (),
                format!(
                    "{MACHINE} is protected: its {} disk is whole at site B, with a first recovery point",
                    bytes(size)
                ),
            ))
        })
        .await?;
        let seconds = args.workload_seconds;
        self.step("write at site A", async |t: &mut Tour| {
            let (written, rpo) = t.write_for(&w.api, &w.agent_a.addr, seconds).await?;
            t.summary.bytes_written_by_workload = written;
            t.summary.rpo_seconds = rpo;
            Ok((
                (),
                format!(
                    "{} in random 4 KiB writes through its agent; highest RPO seen {}",
                    bytes(written),
                    rpo.map_or("-".into(), |r| format!("{r:.1} s"))
                ),
            ))
        })
        .await?;
        let served = self
            .step("fail over (planned)", async |t: &mut Tour| {
                let asked = Instant::now();
                let job = t
                    .job(&w.api, json!({"kind": "failover", "machine": MACHINE, "point": "final"}))
                    .await?;
                let address = job["result"]["address"]
                    .as_str()
                    .context("the failover's result names no address")?
                    .to_string();
                let rto = first_read(&address)?.duration_since(asked).as_secs_f64();
                t.summary.failover_rto_seconds = Some(rto);
                t.verify(&address, "the failed-over disk")?;
                Ok((
                    address.clone(),
                    format!("served at site B at {address} {rto:.2} s after the request (instant recovery), equal to the source: nothing lost"),
                ))
            })
            .await?;
        let at_b = match args.changed_percent {
            Some(p) => ((size / BLOCK) as f64 * p / 100.0).round() as u64,
            None => 64,
        };
        let keep = args.keep_images;
        self.step("commit, write at site B", async |t: &mut Tour| {
            t.job(&w.api, json!({"kind": "commit", "machine": MACHINE}))
                .await?;
            let changed = t.write_blocks(&served, at_b)?;
            if keep {
                t.keep_images(&w.api).await?;
            }
            t.summary.reprotect_bytes_changed = Some(changed);
            Ok((
                (),
                format!("committed; the machine wrote {} at site B", bytes(changed)),
            ))
        })
        .await?;
        let mt_a_incoming = self.dir.join("site-a/retention/incoming").join(MACHINE);
        self.step("reprotect to site A", async |t: &mut Tour| {
            let asked = Instant::now();
            let job = t.job(&w.api, json!({"kind": "reprotect", "machine": MACHINE})).await?;
            t.summary.reprotect_seconds = Some(asked.elapsed().as_secs_f64());
            let moved = received_write_bytes(&mt_a_incoming)?;
            t.summary.reprotect_bytes_moved = Some(moved);
            t.same_file(&t.dir.join("site-a/web01-d0.img"), "site A's disk")?;
            Ok((
                (),
                format!(
                    "agent {} at site B replicates into the original disk at site A; {} moved for a {} disk",
                    job["result"]["agent"].as_str().unwrap_or("?"),
                    bytes(moved),
                    bytes(size)
                ),
            ))
        })
        .await?;
        let agent_b = w.agent_b_addr.clone();
        self.step("write at site B, fail back", async |t: &mut Tour| {
            t.write_blocks(&agent_b, 32)?;
            let asked = Instant::now();
            t.job(&w.api, json!({"kind": "failback", "machine": MACHINE}))
                .await?;
            let rto = first_read(&w.agent_a.addr)?
                .duration_since(asked)
                .as_secs_f64();
            t.summary.failback_rto_seconds = Some(rto);
            t.verify(&w.agent_a.addr, "the disk at home")?;
            Ok((
                (),
                format!("home at site A {rto:.2} s after the request, every write made at B there"),
            ))
        })
        .await?;
        let mt_b_incoming = self.dir.join("site-b/retention/incoming").join(MACHINE);
        self.step(
            "write at site A, reprotect to site B",
            async |t: &mut Tour| {
                let changed = t.write_blocks(&w.agent_a.addr, 48)?;
                t.summary.reprotect_again_bytes_changed = Some(changed);
                t.job(&w.api, json!({"kind": "reprotect", "machine": MACHINE}))
                    .await?;
                // Site B's incoming log holds the new lineage only (the failback started it
                // at home): what the reprotect moved.
                let moved = received_write_bytes(&mt_b_incoming)?;
                t.summary.reprotect_again_bytes_moved = Some(moved);
                let replica = t
                    .dir
                    .join("site-b/retention/replicas")
                    .join(MACHINE)
                    .join(format!("{DISK}.img"));
                t.same_file(&replica, "the replica at site B")?;
                Ok((
                    (),
                    format!(
                        "protected to site B again: {} moved; the circle is closed",
                        bytes(moved)
                    ),
                ))
            },
        )
        .await?;
        self.step("check the status", async |t: &mut Tour| {
            let status = w
                .api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/machines/{MACHINE}/status"),
                    None,
                )
                .await?;
            if status["state"] != "protected" {
                bail!(
                    "{MACHINE} is {} at the end, not protected: {status}",
                    status["state"]
                );
            }
            let _ = t;
            Ok((
                (),
                format!(
                    "{MACHINE} is protected, health {}",
                    status["health"].as_str().unwrap_or("?")
                ),
            ))
        })
        .await?;
        self.step("stop the components", async |t: &mut Tour| {
            let w = world.take().context("the components are gone")?;
            let count = w.procs.len() + 1;
            drop(w);
            let _ = t;
            Ok(((), format!("{count} processes stopped")))
        })
        .await?;
        Ok(())
    }

    /// Creates the two sites and the configuration server, enrols every component and starts
    /// them, each a process of its own.
    async fn start(&mut self, size: u64, azure: Option<&str>) -> anyhow::Result<World> {
        let dir = self.dir.clone();
        for sub in ["site-a", "site-b", "logs", "identities"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("could not create {}", dir.join(sub).display()))?;
        }
        let disk = dir.join("site-a/web01-d0.img");
        make_sample_disk(&disk, size, &mut self.rng)?;
        self.model = std::fs::read(&disk)?;
        // The configuration server, with the two sites in its inventory.
        let state = dir.join("cs");
        let made = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || boomerang_server::init(&state)).await??
        };
        std::fs::write(
            state.join("inventory.toml"),
            "[[site]]\nname = \"site-a\"\nkind = \"local\"\n\n[[site]]\nname = \"site-b\"\nkind = \"local\"\n",
        )?;
        let config = std::fs::read_to_string(&made.config)?
            .replace("inventory = []", "inventory = [\"inventory.toml\"]")
            .replace(
                "heartbeat_timeout_seconds = 90",
                "heartbeat_timeout_seconds = 5",
            );
        std::fs::write(&made.config, config)?;
        let logs = dir.join("logs");
        let server = Proc::start(
            &logs,
            "server",
            &[
                "server",
                "--config",
                path(&made.config)?,
                "--listen",
                "127.0.0.1:0",
            ],
        )?;
        let url = format!("https://{}", server.addr);
        let api = Api::open(&url, &made.ca, made.admin_token.clone())?;
        api.call(
            reqwest::Method::POST,
            "/api/policies",
            Some(json!({"name": "quickstart", "rpo_threshold_seconds": 60, "retention_seconds": 86400, "app_consistent_seconds": 0})),
        )
        .await?;
        let mut identities = Vec::new();
        for (name, role, site, machine) in [
            ("mt-b", "master-target", "site-b", None),
            ("ps-a", "process-server", "site-a", None),
            ("mt-a", "master-target", "site-a", None),
            ("ps-b", "process-server", "site-b", None),
            (MACHINE, "agent", "site-a", None),
            ("web01-b", "agent", "site-b", Some(MACHINE)),
        ] {
            identities.push(
                enrol(
                    &api,
                    &url,
                    &made.ca,
                    &dir.join("identities"),
                    name,
                    role,
                    site,
                    machine,
                )
                .await?,
            );
        }
        let control = |identity: &Path| -> anyhow::Result<Vec<String>> {
            Ok(vec![
                "--control-server".into(),
                url.clone(),
                "--control-ca".into(),
                path(&made.ca)?.into(),
                "--component-token-file".into(),
                path(&identity.join("component.token"))?.into(),
                "--heartbeat-interval".into(),
                "0.5".into(),
            ])
        };
        let start = |name: &str, args: Vec<String>, identity: &Path| -> anyhow::Result<Proc> {
            let mut all = args;
            all.extend(["--tls".into(), path(identity)?.into()]);
            all.extend(control(identity)?);
            Proc::start(
                &logs,
                name,
                &all.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        };
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let site = |s: &str, what: &str| -> anyhow::Result<String> {
            Ok(path(&dir.join(s).join(what))?.to_string())
        };
        let mut procs = vec![server];
        let master_target = |name: &str, at: &str, identity: &Path, extra: &[String]| {
            let mut args = s(&[
                "master-target",
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
                "--retention",
                &site(at, "retention")?,
                "--block-size",
                "4KiB",
                "--point-every",
                "0",
                "--prune-every",
                "60",
            ]);
            args.extend(extra.iter().cloned());
            start(name, args, identity)
        };
        // Site B on Azure Blob: its master target keeps the recovery points there, sealed
        // under a key made here (one store root per run).
        let mut mt_b_extra = Vec::new();
        let mut site_b_container = None;
        if let Some(location) = azure {
            let boomerang_store::Location::Azure { container, .. } =
                boomerang_store::Location::parse(location)?
            else {
                bail!(
                    "--azure {location:?} is not an Azure Blob location: give azure://container/prefix"
                );
            };
            let key = dir.join("site-b.key");
            boomerang_store::DataKey::create(&key)?;
            let run = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let root = format!("{}/quickstart-{run}", location.trim_end_matches('/'));
            mt_b_extra = vec![
                "--store-root".to_string(),
                root.clone(),
                "--store-key-file".into(),
                path(&key)?.to_string(),
            ];
            site_b_container = Some(container);
            self.summary.site_b_store = Some(root);
        }
        let mt_b = master_target("mt-b", "site-b", &identities[0], &mt_b_extra)?;
        let ps_a = start(
            "ps-a",
            s(&[
                "process-server",
                "--listen",
                "127.0.0.1:0",
                "--name",
                "ps-a",
                "--cache",
                &site("site-a", "cache")?,
                "--master-target",
                &mt_b.addr,
            ]),
            &identities[1],
        )?;
        let mt_a = master_target("mt-a", "site-a", &identities[2], &[])?;
        let ps_b = start(
            "ps-b",
            s(&[
                "process-server",
                "--listen",
                "127.0.0.1:0",
                "--name",
                "ps-b",
                "--cache",
                &site("site-b", "cache")?,
                "--master-target",
                &mt_a.addr,
            ]),
            &identities[3],
        )?;
        let agent_a = start(
            "agent-a",
            s(&[
                "agent",
                "--name",
                MACHINE,
                "--disk",
                &format!("{DISK}={}", path(&disk)?),
                "--listen",
                "127.0.0.1:0",
                "--log-dir",
                &site("site-a", "agent-log")?,
                "--process-server",
                &ps_a.addr,
                "--mark-interval",
                "0.5",
            ]),
            &identities[4],
        )?;
        let agent_b_addr = free_address()?;
        let agent_b = start(
            "agent-b",
            s(&[
                "agent",
                "--standby",
                "--name",
                MACHINE,
                "--listen",
                &agent_b_addr,
                "--log-dir",
                &site("site-b", "agent-log")?,
                "--process-server",
                &ps_b.addr,
                "--mark-interval",
                "0.5",
            ]),
            &identities[5],
        )?;
        // The two sites as the inventory describes them: the sample machine, the machines the
        // master targets run on, the master targets and the process servers, for the
        // preflight of reprotect and failback.
        let inventory = sample_inventory(
            &dir,
            size,
            [(&mt_a.addr, &ps_a.addr), (&mt_b.addr, &ps_b.addr)],
            site_b_container.as_deref(),
        )?;
        std::fs::write(state.join("inventory.toml"), inventory)?;
        api.call(reqwest::Method::POST, "/api/inventory/refresh", None)
            .await
            .context("the configuration server refused the quickstart's inventory")?;
        procs.extend([mt_b, ps_a, mt_a, ps_b, agent_b]);
        // The machine joins the inventory from its agent's first report.
        let deadline = Instant::now() + Duration::from_secs(30);
        while api
            .call(
                reqwest::Method::GET,
                &format!("/api/machines/{MACHINE}/status"),
                None,
            )
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "{MACHINE}'s agent never reported to the configuration server: see logs/agent-a.log"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(World {
            api,
            agent_a,
            agent_b_addr,
            procs,
        })
    }

    /// Asks for a job and follows it to its end, showing its step and progress.
    async fn job(&self, api: &Api, body: Value) -> anyhow::Result<Value> {
        let kind = body["kind"].as_str().unwrap_or("job").to_string();
        let deadline = Instant::now() + Duration::from_secs(600);
        let job = crate::client::follow_job(api, body, |job| {
            if Instant::now() > deadline {
                bail!(
                    "{kind} job {} did not end within 10 minutes (at step {})",
                    job["id"],
                    job["step"]
                );
            }
            let mut line = format!("{kind}: {}", job["step"].as_str().unwrap_or("?"));
            if let Some(p) = job["result"]["percent"].as_f64() {
                line.push_str(&format!(" {p:.0}%"));
            }
            self.progress(line);
            Ok(())
        })
        .await?;
        if job["state"] != "succeeded" {
            bail!(
                "{kind} job {} {}: {}",
                job["id"],
                job["state"].as_str().unwrap_or("ended"),
                job["message"].as_str().unwrap_or("no reason given")
            );
        }
        Ok(job)
    }

    /// The machine writes random 4 KiB blocks through `addr` for `seconds`, while the RPO the
    /// configuration server shows is sampled; the bytes written, and the highest RPO seen.
    async fn write_for(
        &mut self,
        api: &Api,
        addr: &str,
        seconds: f64,
    ) -> anyhow::Result<(u64, Option<f64>)> {
        let (addr, mut model, mut rng) = (
            addr.to_string(),
            std::mem::take(&mut self.model),
            self.rng.clone(),
        );
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, Rng, u64)> {
            let mut client = Client::connect(&addr, DISK)
                .with_context(|| format!("could not reach the machine's disk at {addr}"))?;
            let blocks = model.len() as u64 / BLOCK;
            let mut buf = vec![0u8; BLOCK as usize];
            let mut written = 0;
            while Instant::now() < until {
                rng.fill(&mut buf);
                let at = (rng.next_u64() % blocks) * BLOCK;
                client
                    .write(at, &buf, false)
                    .context("a write of the workload failed")?;
                model[at as usize..(at + BLOCK) as usize].copy_from_slice(&buf);
                written += BLOCK;
                // A machine's pace, not a benchmark's: about 4 MiB/s.
                std::thread::sleep(Duration::from_micros(900));
            }
            client.flush()?;
            let _ = client.disconnect();
            Ok((model, rng, written))
        });
        let mut rpo: Option<f64> = None;
        while !writer.is_finished() {
            if let Ok(s) = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/machines/{MACHINE}/status"),
                    None,
                )
                .await
                && let Some(r) = s["rpo_seconds"].as_f64()
            {
                rpo = Some(rpo.map_or(r, |m| m.max(r)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (model, rng, written) = writer.await??;
        self.model = model;
        self.rng = rng;
        Ok((written, rpo))
    }

    /// The machine writes `count` distinct random 4 KiB blocks through `addr`; the bytes.
    fn write_blocks(&mut self, addr: &str, count: u64) -> anyhow::Result<u64> {
        let mut client = Client::connect(addr, DISK)
            .with_context(|| format!("could not reach the machine's disk at {addr}"))?;
        let blocks = self.model.len() as u64 / BLOCK;
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < count.min(blocks) {
            chosen.insert(self.rng.next_u64() % blocks);
        }
        let mut buf = vec![0u8; BLOCK as usize];
        for block in &chosen {
            self.rng.fill(&mut buf);
            let at = block * BLOCK;
            client
                .write(at, &buf, false)
                .with_context(|| format!("a write at {addr} failed"))?;
            self.model[at as usize..(at + BLOCK) as usize].copy_from_slice(&buf);
        }
        client.flush()?;
        let _ = client.disconnect();
        Ok(chosen.len() as u64 * BLOCK)
    }

    /// Copies both sites' disks, as they are before the reprotect, into DIR/images (once the
    /// failed-over disk is whole at site B).
    async fn keep_images(&self, api: &Api) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let s = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/machines/{MACHINE}/status"),
                    None,
                )
                .await?;
            if s["failover"]["hydrated_percent"].as_f64() == Some(100.0) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the failed-over disk was not whole within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let images = self.dir.join("images");
        std::fs::create_dir_all(&images)?;
        for (from, to) in [
            (self.dir.join("site-a/web01-d0.img"), images.join("a.img")),
            (
                self.dir
                    .join("site-b/retention/failovers")
                    .join(MACHINE)
                    .join(format!("{DISK}.img")),
                images.join("b.img"),
            ),
        ] {
            let ok = Command::new("cp")
                .arg("--sparse=always")
                .arg(&from)
                .arg(&to)
                .status()
                .with_context(|| format!("could not run cp for {}", from.display()))?
                .success();
            if !ok {
                bail!("cp {} {} failed", from.display(), to.display());
            }
        }
        Ok(())
    }

    /// Reads the whole disk through `addr` and compares it with what the machine wrote.
    fn verify(&self, addr: &str, what: &str) -> anyhow::Result<()> {
        let mut client = Client::connect(addr, DISK)
            .with_context(|| format!("could not reach {what} at {addr}"))?;
        if client.size() != self.model.len() as u64 {
            bail!(
                "{what} is {} bytes, not {}",
                client.size(),
                self.model.len()
            );
        }
        let step = 1u64 << 20;
        for at in (0..client.size()).step_by(step as usize) {
            let data = client.read(at, step as u32)?;
            if data[..] != self.model[at as usize..(at + step) as usize] {
                bail!("{what} differs from what the machine wrote, in the MiB at {at}");
            }
        }
        let _ = client.disconnect();
        Ok(())
    }

    /// Checks that the disk image at `file` is what the machine wrote.
    /// A replica's image takes the records its master target holds as the applier gets to
    /// them (a protected machine's writes are durable there, not yet applied): the check
    /// looks again for up to a minute before it fails.
    fn same_file(&self, file: &Path, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.differs(file, what)? {
                None => return Ok(()),
                Some(at) if Instant::now() > deadline => bail!(
                    "{what} ({}) differs from what the machine wrote, in the MiB at {at}",
                    file.display()
                ),
                Some(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Where the image at `file` first differs from what the machine wrote, by MiB.
    fn differs(&self, file: &Path, what: &str) -> anyhow::Result<Option<usize>> {
        let f = File::open(file)
            .with_context(|| format!("could not open {what} at {}", file.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        for at in (0..self.model.len()).step_by(buf.len()) {
            f.read_exact_at(&mut buf, at as u64)
                .with_context(|| format!("could not read {what} at {}", file.display()))?;
            if buf[..] != self.model[at..at + buf.len()] {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    fn print_summary(&self, output: Output) -> anyhow::Result<()> {
        if let Some(s) = &self.spinner {
            s.finish_and_clear();
        }
        let s = &self.summary;
        if output == Output::Json {
            return print_json(s);
        }
        let mut t = Table::new(&["STEP", "OK", "SECONDS"]);
        for step in &s.steps {
            t.row(vec![
                step.name.clone(),
                if step.ok { "yes".into() } else { "NO".into() },
                format!("{:.1}", step.seconds),
            ]);
        }
        println!();
        t.print();
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} s"));
        let moved = |m: Option<u64>, c: Option<u64>| match (m, c) {
            (Some(m), Some(c)) => format!(
                "{} moved for {} changed, of a {} disk ({:.2}%)",
                bytes(m),
                bytes(c),
                bytes(s.disk_size_bytes),
                m as f64 * 100.0 / s.disk_size_bytes as f64
            ),
            _ => "-".into(),
        };
        println!();
        println!("  RPO seen while writing:  {}", secs(s.rpo_seconds));
        println!(
            "  failover RTO:            {}",
            secs(s.failover_rto_seconds)
        );
        println!(
            "  failback RTO:            {}",
            secs(s.failback_rto_seconds)
        );
        println!(
            "  reprotect to site A:     {}",
            moved(s.reprotect_bytes_moved, s.reprotect_bytes_changed)
        );
        println!(
            "  reprotect to site B:     {}",
            moved(
                s.reprotect_again_bytes_moved,
                s.reprotect_again_bytes_changed
            )
        );
        println!(
            "  result:                  {}",
            if s.ok {
                "every step verified"
            } else {
                "FAILED"
            }
        );
        Ok(())
    }
}

/// A component started for the tour; stopped (SIGTERM, then killed) when dropped.
struct Proc {
    child: Child,
    addr: String,
}

impl Proc {
    /// Starts `boomerang ARGS` with its log in `logs/NAME.log`, and waits for its address.
    fn start(logs: &Path, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
        let log = logs.join(format!("{name}.log"));
        let file =
            File::create(&log).with_context(|| format!("could not create {}", log.display()))?;
        let exe = std::env::current_exe().context("could not find the boomerang executable")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not start: see its log {}", log.display());
        };
        Ok(Proc {
            addr: addr.to_string(),
            child,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Enrols component `name` with the server at `url`; its identity directory.
#[allow(clippy::too_many_arguments)]
async fn enrol(
    api: &Api,
    url: &str,
    ca: &Path,
    identities: &Path,
    name: &str,
    role: &str,
    site: &str,
    machine: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let mut body = json!({"name": name, "role": role, "site": site, "hosts": ["127.0.0.1"]});
    if let Some(m) = machine {
        body["machine"] = json!(m);
    }
    let made = api
        .call(reqwest::Method::POST, "/api/components", Some(body))
        .await?;
    let token = made["enrollment_token"]
        .as_str()
        .context("no enrolment token")?;
    let out = identities.join(name);
    crate::client::enroll_into(url, ca, token, &out).await?;
    Ok(out)
}

/// When the first 4 KiB of the disk at `addr` were read, trying until they can be.
fn first_read(addr: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = Client::connect(addr, DISK).and_then(|mut c| {
            c.read(0, BLOCK as u32)?;
            let _ = c.disconnect();
            Ok(())
        });
        match read {
            Ok(()) => return Ok(Instant::now()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("the disk at {addr} never answered a read"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Write data in the incoming log of one machine at a master target (0 before any).
fn received_write_bytes(incoming: &Path) -> anyhow::Result<u64> {
    if !incoming.exists() {
        return Ok(0);
    }
    let mut total = 0;
    for record in boomerang_agent::logdir::read_all(incoming)? {
        if let Op::Write { data, .. } = record?.op {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8: use another --dir", p.display()))
}

/// A TCP address on loopback that nothing listens on now.
fn free_address() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// A disk that looks used: a third of it data (half compressible), the rest never written.
fn make_sample_disk(path: &Path, size: u64, rng: &mut Rng) -> anyhow::Result<()> {
    let file =
        File::create(path).with_context(|| format!("could not create {}", path.display()))?;
    file.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(buf.len() as u64) as usize;
        match rng.next_u64() % 6 {
            0 => rng.fill(&mut buf[..len]),
            1 => buf[..len]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 512) as u8),
            _ => {
                offset += len as u64;
                continue;
            }
        }
        file.write_all_at(&buf[..len], offset)?;
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base =
            std::env::temp_dir().join(format!("boomerang-quickstart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base)
            .with_context(|| format!("could not create {}", base.display()))?;
        Ok(TempDir(base))
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
