//! Client verbs: they talk to the configuration server's REST API over HTTPS.
//!
//! The server is `--server URL` or `BOOMERANG_SERVER`; the token is `BOOMERANG_TOKEN` (never a
//! command-line argument, where other users could read it) or the file `--token-file`; the
//! CA certificate that verifies the server is `--ca FILE` or `BOOMERANG_CA` (the `ca.crt`
//! that `boomerang server init` wrote).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::output::{Output, Table, print_json};

#[derive(Args, Debug, Clone, Default)]
pub struct Connection {
    /// The configuration server, as https://HOST:PORT (otherwise the client file's).
    #[arg(long, env = "BOOMERANG_SERVER")]
    server: Option<String>,
    /// The CA certificate that verifies the server, the server's ca.crt (otherwise the client
    /// file's).
    #[arg(long, env = "BOOMERANG_CA")]
    ca: Option<PathBuf>,
    /// A file holding the API token (otherwise BOOMERANG_TOKEN, then the client file's).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// The client file, `~/.config/boomerang/client.toml` (or `$BOOMERANG_CLIENT_CONFIG`): what
/// the flags and variables leave out. Relative paths are from the file's directory.
///
/// ```toml
/// server = "https://cs.example.net:443"
/// ca = "ca.crt"
/// token_file = "token"      # or token = "bmr_..."; keep the file to yourself (mode 0600)
/// ```
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
    token: Option<String>,
}

/// The client file, if there is one: `$BOOMERANG_CLIENT_CONFIG` (which must exist), or
/// `client.toml` under `$XDG_CONFIG_HOME/boomerang` or `~/.config/boomerang`.
fn client_file() -> anyhow::Result<Option<(PathBuf, ClientFile)>> {
    let named = std::env::var_os("BOOMERANG_CLIENT_CONFIG").map(PathBuf::from);
    let path = match &named {
        Some(p) => p.clone(),
        None => {
            let base = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
            match base {
                Some(b) => b.join("boomerang").join("client.toml"),
                None => return Ok(None),
            }
        }
    };
    if named.is_none() && !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "could not read the client file {} (BOOMERANG_CLIENT_CONFIG): check the path",
            path.display()
        )
    })?;
    let file: ClientFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "the client file {} is not valid: {}",
            path.display(),
            e.to_string().trim_end().replace('\n', " ")
        )
    })?;
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    let file = ClientFile {
        ca: file.ca.map(|c| dir.join(c)),
        token_file: file.token_file.map(|t| dir.join(t)),
        ..file
    };
    Ok(Some((path, file)))
}

fn read_token(f: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(f)
        .with_context(|| format!("could not read the token file {}", f.display()))?
        .trim()
        .to_string())
}

impl Connection {
    /// The server, its CA and the token: the flags and variables first, then the client file.
    fn resolve(&self, need_token: bool) -> anyhow::Result<(String, PathBuf, String)> {
        let env_token = std::env::var("BOOMERANG_TOKEN").ok();
        let complete = self.server.is_some()
            && self.ca.is_some()
            && (!need_token || self.token_file.is_some() || env_token.is_some());
        let file = if complete {
            ClientFile::default()
        } else {
            client_file()?.map(|(_, f)| f).unwrap_or_default()
        };
        let server = self.server.clone().or(file.server).context(
            "no configuration server: give --server https://HOST:PORT, set BOOMERANG_SERVER, or write server = ... in ~/.config/boomerang/client.toml",
        )?;
        let ca = self.ca.clone().or(file.ca).context(
            "no CA certificate for the configuration server: give --ca (the server's ca.crt), set BOOMERANG_CA, or write ca = ... in ~/.config/boomerang/client.toml",
        )?;
        let token = if !need_token {
            String::new()
        } else if let Some(f) = &self.token_file {
            read_token(f)?
        } else if let Some(t) = env_token {
            t
        } else if let Some(f) = &file.token_file {
            read_token(f)?
        } else {
            file.token.context(
                "no API token: set BOOMERANG_TOKEN, give --token-file, or write token_file = ... in ~/.config/boomerang/client.toml (boomerang server init printed the first admin token)",
            )?
        };
        Ok((server, ca, token))
    }
}

/// A connection to the API.
pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(c: &Connection) -> anyhow::Result<Api> {
        let (server, ca, token) = c.resolve(true)?;
        Self::open(&server, &ca, token)
    }

    pub(crate) fn open(server: &str, ca: &std::path::Path, token: String) -> anyhow::Result<Api> {
        let pem = std::fs::read(ca).with_context(|| {
            format!(
                "could not read the CA certificate {}: give the server's ca.crt with --ca",
                ca.display()
            )
        })?;
        let tls = boomerang_wire::tls::api_client_config(&pem)
            .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
        if !server.starts_with("https://") {
            bail!(
                "{server} is not an https:// address: the configuration server speaks HTTPS only, and a token must not travel in clear"
            );
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("could not set up the HTTPS client")?;
        Ok(Api {
            base: server.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// One request; the JSON answer, or the server's error as a message.
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            request = request
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let response = request.send().await.with_context(|| {
            format!(
                "could not reach the configuration server at {url}: check --server and that it runs"
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("the server's answer was cut short")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            bail!("the configuration server refused ({status}): {message}");
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Every item of a paged list.
    async fn all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let page = self.get(&format!("{path}?limit=500&after={after}")).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_after"].as_i64() {
                Some(n) => after = n,
                None => return Ok(items),
            }
        }
    }
}

/// A path segment or query value, percent-encoded (anything but letters, digits, `-`, `.`,
/// `_`, `~`).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[derive(Args, Debug)]
pub struct PreflightArgs {
    /// The machine to check.
    machine: String,
    /// reprotect or failback.
    #[arg(long = "for", value_parser = ["reprotect", "failback"])]
    purpose: String,
    #[arg(long)]
    master_target: Option<String>,
    #[arg(long)]
    process_server: Option<String>,
    /// Alternate-location recovery into this datastore.
    #[arg(long)]
    datastore: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang preflight`: exits 0 when no error failed, 3 otherwise.
pub async fn preflight(args: PreflightArgs, output: Output) -> anyhow::Result<i32> {
    let api = Api::new(&args.connection)?;
    let mut path = format!(
        "/api/machines/{}/preflight?for={}",
        encode(&args.machine),
        args.purpose
    );
    for (key, value) in [
        ("master_target", &args.master_target),
        ("process_server", &args.process_server),
        ("datastore", &args.datastore),
    ] {
        if let Some(v) = value {
            path.push_str(&format!("&{key}={}", encode(v)));
        }
    }
    let report = api.get(&path).await?;
    if output == Output::Json {
        print_json(&report)?;
    } else {
        let mut t = Table::new(&["CHECK", "SEVERITY", "RESULT", "MESSAGE"]);
        for c in report["checks"].as_array().cloned().unwrap_or_default() {
            let result = if c["passed"] == true {
                "passed"
            } else {
                "FAILED"
            };
            t.row(vec![
                text(&c["code"]),
                text(&c["severity"]),
                result.into(),
                text(&c["message"]),
            ]);
        }
        t.print();
        println!(
            "{} for {}: {}",
            args.machine,
            args.purpose,
            if report["ok"] == true {
                "ready"
            } else {
                "not ready: fix the failed errors above"
            }
        );
    }
    Ok(if report["ok"] == true { 0 } else { 3 })
}

#[derive(Subcommand, Debug)]
pub enum MachineCommand {
    /// List the machines of the inventory.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One machine, whole.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Protect a machine with a replication policy (its RPO threshold is watched from then on).
    SetPolicy {
        name: String,
        policy: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Take a machine's replication policy away.
    ClearPolicy {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn machine(cmd: MachineCommand, output: Output) -> anyhow::Result<i32> {
    match cmd {
        MachineCommand::List { connection } => {
            let items = Api::new(&connection)?.all("/api/machines").await?;
            if output == Output::Json {
                print_json(&items)?;
            } else {
                let mut t = Table::new(&["NAME", "SITE", "OS", "DISKS", "TOOLS"]);
                for m in &items {
                    let os = format!("{} {}", text(&m["os"]["family"]), text(&m["os"]["version"]));
                    let disks = m["disks"].as_array().map_or(0, Vec::len).to_string();
                    t.row(vec![
                        text(&m["name"]),
                        text(&m["site"]),
                        os,
                        disks,
                        text(&m["tools"]),
                    ]);
                }
                t.print();
            }
        }
        MachineCommand::Show { name, connection } => {
            let m = Api::new(&connection)?
                .get(&format!("/api/machines/{}", encode(&name)))
                .await?;
            print_json(&m)?;
        }
        MachineCommand::SetPolicy {
            name,
            policy,
            connection,
        } => {
            let set = Api::new(&connection)?
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/machines/{}/policy", encode(&name)),
                    Some(json!({ "policy": policy })),
                )
                .await?;
            if output == Output::Json {
                print_json(&set)?;
            } else {
                println!("machine {name} is protected with policy {policy}");
            }
        }
        MachineCommand::ClearPolicy { name, connection } => {
            let cleared = Api::new(&connection)?
                .call(
                    reqwest::Method::DELETE,
                    &format!("/api/machines/{}/policy", encode(&name)),
                    None,
                )
                .await?;
            if output == Output::Json {
                print_json(&cleared)?;
            } else {
                println!(
                    "machine {name} has no policy any more (it had {})",
                    text(&cleared["policy"])
                );
            }
        }
    }
    Ok(0)
}

/// Shows the item of `items` named `name` as JSON, or says there is none.
fn show_named(items: &[Value], what: &str, name: &str, list: &str) -> anyhow::Result<i32> {
    match items.iter().find(|i| i["name"] == name) {
        Some(item) => {
            print_json(item)?;
            Ok(0)
        }
        None => bail!("there is no {what} {name:?}: list them with `boomerang {list} list`"),
    }
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// List jobs, oldest first.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One job: its state, step, message and result.
    Show {
        id: i64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a job, where that is safe (before a component was given work).
    Cancel {
        id: i64,
        #[command(flatten)]
        connection: Connection,
    },
}

/// Prints a job: JSON, or a sentence.
fn print_job(job: &Value, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(job);
    }
    println!(
        "job {} ({} of {}): {} at step {}{}",
        text(&job["id"]),
        text(&job["kind"]),
        text(&job["machine"]),
        text(&job["state"]),
        text(&job["step"]),
        job["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// 0 for a job that succeeded, 3 otherwise.
fn job_code(job: &Value) -> i32 {
    if job["state"] == "succeeded" { 0 } else { 3 }
}

pub async fn job(cmd: JobCommand, output: Output) -> anyhow::Result<i32> {
    match cmd {
        JobCommand::List { connection } => {
            let items = Api::new(&connection)?.all("/api/jobs").await?;
            if output == Output::Json {
                print_json(&items)?;
            } else {
                let mut t = Table::new(&["ID", "KIND", "MACHINE", "STATE", "STEP", "BY"]);
                for j in &items {
                    t.row(vec![
                        text(&j["id"]),
                        text(&j["kind"]),
                        text(&j["machine"]),
                        text(&j["state"]),
                        text(&j["step"]),
                        text(&j["requested_by"]),
                    ]);
                }
                t.print();
            }
            Ok(0)
        }
        JobCommand::Show { id, connection } => {
            let job = Api::new(&connection)?
                .get(&format!("/api/jobs/{id}"))
                .await?;
            print_job(&job, output)?;
            Ok(job_code(&job))
        }
        JobCommand::Cancel { id, connection } => {
            let job = Api::new(&connection)?
                .call(
                    reqwest::Method::POST,
                    &format!("/api/jobs/{id}/cancel"),
                    None,
                )
                .await?;
            print_job(&job, output)?;
            Ok(0)
        }
    }
}

#[derive(Args, Debug)]
pub struct TestFailoverArgs {
    /// The machine.
    machine: String,
    /// The recovery point: a sequence number (`master-target points`), latest,
    /// latest-processed or latest-app-consistent.
    #[arg(long, default_value = "latest")]
    at: String,
    /// Stop the machine's test failover and delete its scratch disks instead.
    #[arg(long)]
    cleanup: bool,
    /// Return once the job is asked for, without waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang test-failover`: asks for the job and follows it to its end (exit 0 when it
/// succeeded, 3 otherwise).
pub async fn test_failover(args: TestFailoverArgs, output: Output) -> anyhow::Result<i32> {
    let body = if args.cleanup {
        json!({"kind": "test-failover-cleanup", "machine": args.machine})
    } else {
        json!({"kind": "test-failover", "machine": args.machine, "point": args.at})
    };
    run_job(&args.connection, body, args.no_wait, output).await
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The machine.
    machine: String,
    /// Stop the machine first (through its agent) and fail over to its final mark: nothing
    /// is lost. Without it, the source may be gone and the point is --at.
    #[arg(long, conflicts_with = "at")]
    planned: bool,
    /// The recovery point of an unplanned failover: latest (what the process server holds
    /// reaches the master target first), latest-processed (at once), latest-app-consistent,
    /// or a sequence number.
    #[arg(long)]
    at: Option<String>,
    /// Also materialize the disks at the point as image files at the master target
    /// (`RETENTION/materialized/MACHINE/DISK-at-SEQ.FORMAT`); vhd is fixed, as Azure boots
    /// (the default when the master target's site is an Azure one). qcow2 and vmdk need
    /// qemu-img on its host.
    #[arg(long, value_parser = ["raw", "vhd", "qcow2", "vmdk"])]
    format: Option<String>,
    /// Return once the job is asked for, without waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang failover`: asks for the job and follows it to its end.
pub async fn failover(args: FailoverArgs, output: Output) -> anyhow::Result<i32> {
    let point = if args.planned {
        "final".to_string()
    } else {
        args.at.unwrap_or_else(|| "latest".into())
    };
    let mut body = json!({"kind": "failover", "machine": args.machine, "point": point});
    if let Some(format) = args.format {
        body["format"] = json!(format);
    }
    run_job(&args.connection, body, args.no_wait, output).await
}

#[derive(Args, Debug)]
pub struct ProtectArgs {
    /// The machine.
    machine: String,
    /// The replication policy to protect it with.
    #[arg(long)]
    policy: String,
    /// Return once the job is asked for, without following the initial sync.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang protect`: gives the machine its policy and follows its initial sync.
pub async fn protect(args: ProtectArgs, output: Output) -> anyhow::Result<i32> {
    let body = json!({"kind": "protect", "machine": args.machine, "policy": args.policy});
    run_job(&args.connection, body, args.no_wait, output).await
}

#[derive(Args, Debug)]
pub struct ChangePointArgs {
    /// The failed-over machine.
    machine: String,
    /// The point to serve instead: a sequence number, or latest.
    #[arg(long)]
    at: String,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang change-point`: serves a failed-over machine at another point.
pub async fn change_point(args: ChangePointArgs, output: Output) -> anyhow::Result<i32> {
    let body = json!({"kind": "change-point", "machine": args.machine, "point": args.at});
    run_job(&args.connection, body, false, output).await
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// The failed-over machine.
    machine: String,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang commit`: makes a failover's point final.
pub async fn commit(args: CommitArgs, output: Output) -> anyhow::Result<i32> {
    let body = json!({"kind": "commit", "machine": args.machine});
    run_job(&args.connection, body, false, output).await
}

#[derive(Args, Debug)]
pub struct ReprotectArgs {
    /// The machine: failed over and committed, or failed back.
    machine: String,
    /// The master target that keeps the replica (default: the one at the site of the disks
    /// that become the replica).
    #[arg(long)]
    master_target: Option<String>,
    /// The agent that serves the failed-over disks (default: the machine's one agent
    /// standing by, `boomerang agent --standby --name MACHINE`).
    #[arg(long)]
    agent: Option<String>,
    /// Drop what the machine wrote at its old site after the failover's point (never
    /// replicated, recorded in the job); without it such writes make the reprotect fail.
    #[arg(long)]
    discard_unreplicated: bool,
    /// Alternate location: new disks in this directory at the original site (an absolute path
    /// on its master target's host), a full copy; the disks the machine ran on there stay as
    /// they are.
    #[arg(long, conflicts_with = "alternate")]
    alternate_dir: Option<String>,
    /// Alternate location in an inventory datastore (with `--datastore`): as `--alternate-dir`
    /// in the datastore's directory, and the preflight checks that the master target's host
    /// reaches the datastore.
    #[arg(long, requires = "datastore")]
    alternate: bool,
    /// The datastore of an alternate-location reprotect.
    #[arg(long, requires = "alternate")]
    datastore: Option<String>,
    /// The process server the failed-over disks' writes go through (default: the one the
    /// agent was started with).
    #[arg(long)]
    process_server: Option<String>,
    /// Return once the job is asked for, without following its copy.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang reprotect`: replicates a failed-over machine back, into its own disks.
pub async fn reprotect(args: ReprotectArgs, output: Output) -> anyhow::Result<i32> {
    let mut body = json!({
        "kind": "reprotect",
        "machine": args.machine,
        "discard_unreplicated": args.discard_unreplicated,
    });
    if let Some(mt) = args.master_target {
        body["master_target"] = json!(mt);
    }
    if let Some(agent) = args.agent {
        body["agent"] = json!(agent);
    }
    if let Some(dir) = args.alternate_dir {
        body["alternate_dir"] = json!(dir);
    }
    if let Some(ds) = args.datastore {
        body["datastore"] = json!(ds);
    }
    if let Some(ps) = args.process_server {
        body["process_server"] = json!(ps);
    }
    run_job(&args.connection, body, args.no_wait, output).await
}

#[derive(Args, Debug)]
pub struct FailbackArgs {
    /// The reprotected machine.
    machine: String,
    /// Return once the job is asked for, without waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `boomerang failback`: brings a reprotected machine home, losing nothing.
pub async fn failback(args: FailbackArgs, output: Output) -> anyhow::Result<i32> {
    let body = json!({"kind": "failback", "machine": args.machine});
    run_job(&args.connection, body, args.no_wait, output).await
}

/// Asks for the job `body` describes and, unless `no_wait`, follows it to its end, showing
/// its steps (exit 0 when it succeeded, 3 otherwise).
async fn run_job(
    connection: &Connection,
    body: Value,
    no_wait: bool,
    output: Output,
) -> anyhow::Result<i32> {
    let api = Api::new(connection)?;
    let job = if no_wait {
        api.call(reqwest::Method::POST, "/api/jobs", Some(body))
            .await?
    } else {
        let mut shown = String::new();
        follow_job(&api, body, |job| {
            // The step, and how far it is when the job says (bytes, percent, ETA).
            let mut line = format!("job {}: {}", job["id"], text(&job["step"]));
            if let Some(p) = job["result"]["percent"].as_f64() {
                line.push_str(&format!(" {p:.1}%"));
                if let Some(eta) = job["result"]["eta_seconds"].as_u64() {
                    line.push_str(&format!(" (ETA {})", seconds(eta as f64)));
                }
            }
            if output != Output::Json && line != shown {
                eprintln!("{line}");
                shown = line;
            }
            Ok(())
        })
        .await?
    };
    print_job(&job, output)?;
    Ok(if no_wait { 0 } else { job_code(&job) })
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One machine (default: every machine).
    machine: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

/// "4.2 s", "3 min", "2 h": a duration at a glance.
fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.0} h", s / 3600.0)
    }
}

/// `boomerang status`: each machine's state, health, RPO now and latest point; exits 0
/// when all are healthy, 3 otherwise.
pub async fn status(args: StatusArgs, output: Output) -> anyhow::Result<i32> {
    let api = Api::new(&args.connection)?;
    let items = match &args.machine {
        Some(m) => vec![
            api.get(&format!("/api/machines/{}/status", encode(m)))
                .await?,
        ],
        None => api.all("/api/status").await?,
    };
    let healthy = items.iter().all(|s| s["health"] == "healthy");
    if output == Output::Json {
        match &args.machine {
            Some(_) => print_json(&items[0])?,
            None => print_json(&items)?,
        }
        return Ok(if healthy { 0 } else { 3 });
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut t = Table::new(&[
        "MACHINE",
        "STATE",
        "HEALTH",
        "RPO",
        "POLICY",
        "LATEST POINT",
        "BACKLOG",
    ]);
    for s in &items {
        let mut state = text(&s["state"]);
        let copying: Vec<String> = s["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["sync_percent"].as_f64())
            .map(|p| format!("{p:.1}%"))
            .collect();
        if !copying.is_empty() {
            state = format!("{state} ({})", copying.join(", "));
        }
        if let Some(p) = s["failover"]["hydrated_percent"].as_f64()
            && p < 100.0
        {
            state = format!("{state} (copied {p:.1}%)");
        }
        let rpo =
            s["rpo_seconds"].as_f64().map_or("-".into(), |r| {
                match s["rpo_threshold_seconds"].as_u64() {
                    Some(t) => format!("{} (max {})", seconds(r), seconds(t as f64)),
                    None => seconds(r),
                }
            });
        let latest = s["latest_point_unix_ms"].as_i64().map_or("-".into(), |t| {
            format!("{} ago", seconds((now - t).max(0) as f64 / 1000.0))
        });
        let backlog = s["backlog_bytes"]
            .as_u64()
            .map_or("-".into(), |b| format!("{b} B"));
        t.row(vec![
            text(&s["name"]),
            state,
            text(&s["health"]),
            rpo,
            text(&s["policy"]),
            latest,
            backlog,
        ]);
    }
    t.print();
    for s in &items {
        for note in s["notes"].as_array().into_iter().flatten() {
            println!("{}: {}", text(&s["name"]), text(note));
        }
    }
    Ok(if healthy { 0 } else { 3 })
}

#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// List the sites.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One site, whole.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn site(cmd: SiteCommand, output: Output) -> anyhow::Result<i32> {
    let connection = match cmd {
        SiteCommand::List { connection } => connection,
        SiteCommand::Show { name, connection } => {
            let items = Api::new(&connection)?.all("/api/sites").await?;
            return show_named(&items, "site", &name, "site");
        }
    };
    let items = Api::new(&connection)?.all("/api/sites").await?;
    if output == Output::Json {
        print_json(&items)?;
    } else {
        let mut t = Table::new(&["NAME", "KIND"]);
        for s in &items {
            t.row(vec![text(&s["name"]), text(&s["kind"])]);
        }
        t.print();
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// List the policies, replication and failback.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One policy, whole.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Create a replication policy (and with it, its failback policy).
    Create {
        name: String,
        /// Seconds of RPO past which an alert is raised.
        #[arg(long)]
        rpo_threshold: u64,
        /// Seconds recovery points are kept.
        #[arg(long)]
        retention: u64,
        /// Seconds between app-consistent points; 0 for none.
        #[arg(long, default_value_t = 0)]
        app_consistent: u64,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn policy(cmd: PolicyCommand, output: Output) -> anyhow::Result<i32> {
    match cmd {
        PolicyCommand::List { connection } => {
            let items = Api::new(&connection)?.all("/api/policies").await?;
            if output == Output::Json {
                print_json(&items)?;
            } else {
                let mut t = Table::new(&[
                    "NAME",
                    "KIND",
                    "RPO THRESHOLD",
                    "RETENTION",
                    "APP-CONSISTENT",
                    "EDITABLE",
                ]);
                for p in &items {
                    t.row(vec![
                        text(&p["name"]),
                        text(&p["kind"]),
                        format!("{} s", text(&p["rpo_threshold_seconds"])),
                        format!("{} s", text(&p["retention_seconds"])),
                        format!("{} s", text(&p["app_consistent_seconds"])),
                        text(&p["editable"]),
                    ]);
                }
                t.print();
            }
        }
        PolicyCommand::Show { name, connection } => {
            let p = Api::new(&connection)?
                .get(&format!("/api/policies/{}", encode(&name)))
                .await?;
            print_json(&p)?;
        }
        PolicyCommand::Create {
            name,
            rpo_threshold,
            retention,
            app_consistent,
            connection,
        } => {
            let body = json!({
                "name": name,
                "rpo_threshold_seconds": rpo_threshold,
                "retention_seconds": retention,
                "app_consistent_seconds": app_consistent,
            });
            let made = Api::new(&connection)?
                .call(reqwest::Method::POST, "/api/policies", Some(body))
                .await?;
            if output == Output::Json {
                print_json(&made)?;
            } else {
                println!(
                    "policy {} created, and its failback policy {} (RPO threshold 15 min, retention 24 h, app-consistent every 60 min; not editable)",
                    text(&made["policy"]["name"]),
                    text(&made["failback"]["name"])
                );
            }
        }
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum ComponentCommand {
    /// List components and their health.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One component, with its last heartbeat.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Name a component to enrol; prints its one-time enrolment token.
    Create {
        name: String,
        /// agent, process-server or master-target.
        #[arg(long, value_parser = ["agent", "process-server", "master-target"])]
        role: String,
        #[arg(long)]
        site: String,
        /// An address its certificate is also good for (a server's). Repeat for more.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// For an agent standing by at a recovery site (`agent --standby`): the machine
        /// whose failed-over disks it serves once reprotected.
        #[arg(long)]
        machine: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Enrol this component: trade the one-time token for a certificate, written to DIR as
    /// `--tls DIR` wants it (cert.pem, key.pem, ca.crt), and the component's token
    /// (DIR/component.token).
    Enroll {
        /// A file holding the one-time enrolment token (`component create` printed it);
        /// otherwise BOOMERANG_ENROLLMENT_TOKEN. Never a command-line argument, which other
        /// users of the machine can read.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The configuration server, as https://HOST:PORT (otherwise the client file's).
        #[arg(long, env = "BOOMERANG_SERVER")]
        server: Option<String>,
        /// The CA certificate that verifies the server (otherwise the client file's).
        #[arg(long, env = "BOOMERANG_CA")]
        ca: Option<PathBuf>,
    },
}

pub async fn component(cmd: ComponentCommand, output: Output) -> anyhow::Result<i32> {
    match cmd {
        ComponentCommand::Show { name, connection } => {
            let items = Api::new(&connection)?.all("/api/components").await?;
            return show_named(&items, "component", &name, "component");
        }
        ComponentCommand::List { connection } => {
            let items = Api::new(&connection)?.all("/api/components").await?;
            if output == Output::Json {
                print_json(&items)?;
            } else {
                let mut t = Table::new(&["NAME", "ROLE", "SITE", "HEALTH"]);
                for c in &items {
                    t.row(vec![
                        text(&c["name"]),
                        text(&c["role"]),
                        text(&c["site"]),
                        text(&c["health"]),
                    ]);
                }
                t.print();
            }
        }
        ComponentCommand::Create {
            name,
            role,
            site,
            hosts,
            machine,
            connection,
        } => {
            let mut body = json!({"name": name, "role": role, "site": site, "hosts": hosts});
            if let Some(m) = machine {
                body["machine"] = json!(m);
            }
            let made = Api::new(&connection)?
                .call(reqwest::Method::POST, "/api/components", Some(body))
                .await?;
            if output == Output::Json {
                print_json(&made)?;
            } else {
                println!(
                    "enrolment token for {name} (one use, 24 hours): {}",
                    text(&made["enrollment_token"])
                );
                println!(
                    "on the component: BOOMERANG_ENROLLMENT_TOKEN=<token> boomerang component enroll --out DIR"
                );
            }
        }
        ComponentCommand::Enroll {
            token_file,
            out,
            server,
            ca,
        } => {
            let connection = Connection {
                server,
                ca,
                token_file: None,
            };
            let token = match &token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| {
                        format!("could not read the enrolment token file {}", f.display())
                    })?
                    .trim()
                    .to_string(),
                None => std::env::var("BOOMERANG_ENROLLMENT_TOKEN").context(
                    "no enrolment token: give --token-file, or set BOOMERANG_ENROLLMENT_TOKEN",
                )?,
            };
            let (server, ca, _) = connection.resolve(false)?;
            let got = enroll_into(&server, &ca, &token, &out).await?;
            if output == Output::Json {
                print_json(&json!({"name": got["name"], "role": got["role"], "dir": out}))?;
            } else {
                println!(
                    "enrolled {} as {}: certificate in {}",
                    text(&got["name"]),
                    text(&got["role"]),
                    out.display()
                );
            }
        }
    }
    Ok(0)
}

/// Trades the one-time enrolment `token` with the server at `server` (verified with `ca`) for
/// a certificate, written into the new, empty directory `out` as `--tls` wants it (cert.pem,
/// key.pem, ca.crt, owner-only), with the component token and the name file; the answer.
pub(crate) async fn enroll_into(
    server: &str,
    ca: &std::path::Path,
    token: &str,
    out: &std::path::Path,
) -> anyhow::Result<Value> {
    // The directory first: what the server gives, it gives once.
    let used = out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some());
    if used {
        bail!(
            "{} is not an empty directory: enrol into a new one",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("could not create {}", out.display()))?;
    // Enrolment has no bearer token of its own: the one-time token is in the body.
    let got = Api::open(server, ca, String::new())?
        .call(
            reqwest::Method::POST,
            "/api/enroll",
            Some(json!({"enrollment_token": token})),
        )
        .await?;
    let files = [
        ("cert.pem", "certificate"),
        ("key.pem", "key"),
        ("ca.crt", "ca"),
        ("component.token", "component_token"),
    ];
    if let Some((_, missing)) = files
        .iter()
        .find(|(_, f)| got[*f].as_str().is_none_or(str::is_empty))
    {
        bail!("the configuration server's answer lacks {missing}: enrol again with a new token");
    }
    for (file, field) in files {
        write_private(&out.join(file), got[field].as_str().unwrap_or_default())?;
    }
    // The name the component is started with, when no --name is given.
    std::fs::write(
        out.join(boomerang_wire::pki::NAME_FILE),
        got["name"].as_str().unwrap_or_default(),
    )
    .with_context(|| format!("could not write the name into {}", out.display()))?;
    Ok(got)
}

/// Asks for the job `body` describes and follows it until it ends, calling `each` with the
/// job as it stands every 200 ms while it runs; the job at its end.
pub(crate) async fn follow_job(
    api: &Api,
    body: Value,
    mut each: impl FnMut(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let mut job = api
        .call(reqwest::Method::POST, "/api/jobs", Some(body))
        .await?;
    let id = job["id"]
        .as_i64()
        .context("the server's answer names no job")?;
    while job["state"] == "running" {
        each(&job)?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        job = api.get(&format!("/api/jobs/{id}")).await?;
    }
    Ok(job)
}

/// Writes a file only its owner may read (keys, tokens).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "could not create {} (it must not exist yet)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))
}

#[derive(Subcommand, Debug)]
pub enum AlertCommand {
    /// List alerts: active first, then resolved.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One alert, by its id.
    Show {
        id: i64,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn alert(cmd: AlertCommand, output: Output) -> anyhow::Result<i32> {
    let connection = match cmd {
        AlertCommand::List { connection } => connection,
        AlertCommand::Show { id, connection } => {
            let items = Api::new(&connection)?.all("/api/alerts").await?;
            return match items.iter().find(|a| a["id"] == id) {
                Some(a) => {
                    print_json(a)?;
                    Ok(0)
                }
                None => bail!("there is no alert {id}: list them with `boomerang alert list`"),
            };
        }
    };
    let mut items = Api::new(&connection)?.all("/api/alerts").await?;
    items.sort_by_key(|a| a.get("resolved_unix_ms").is_some());
    if output == Output::Json {
        print_json(&items)?;
    } else {
        let mut t = Table::new(&["STATE", "KIND", "OBJECT", "MESSAGE"]);
        for a in &items {
            let state = if a.get("resolved_unix_ms").is_some() {
                "resolved"
            } else {
                "ACTIVE"
            };
            t.row(vec![
                state.into(),
                text(&a["kind"]),
                text(&a["object"]),
                text(&a["message"]),
            ]);
        }
        t.print();
    }
    Ok(0)
}

/// How a process server, master target or agent reports to the configuration server: its
/// heartbeats, with the token that enrolment gave it.
#[derive(Args, Debug, Clone)]
pub struct Reporting {
    /// The configuration server to send heartbeats to (https://HOST:PORT); none sends none.
    #[arg(long, requires_all = ["control_ca", "component_token_file"])]
    control_server: Option<String>,
    /// The CA certificate that verifies the configuration server.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// The component token file that `boomerang component enroll` wrote.
    #[arg(long)]
    component_token_file: Option<PathBuf>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat_interval: f64,
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// What a component adds to its heartbeats: the fields of its role (see the configuration
/// server's `Heartbeat`), gathered afresh for each one.
pub type Report = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = serde_json::Map<String, Value>> + Send>,
        > + Send
        + Sync,
>;

/// The API as this component (its component token), if `reporting` names a server.
fn component_api(reporting: &Reporting) -> anyhow::Result<Option<Api>> {
    let Some(server) = reporting.control_server.clone() else {
        return Ok(None);
    };
    let ca = reporting
        .control_ca
        .clone()
        .context("--control-ca is needed with --control-server")?;
    let token_file = reporting
        .component_token_file
        .clone()
        .context("--component-token-file is needed with --control-server")?;
    Ok(Some(Api::open(&server, &ca, read_token(&token_file)?)?))
}

/// Carries out a command of the configuration server: its kind and parameters in, its result
/// (or why it failed) out. Called again with a command id seen before only if the process
/// restarted: handlers are idempotent.
pub type Handler = std::sync::Arc<
    dyn Fn(
            String,
            Value,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, String>> + Send>>
        + Send
        + Sync,
>;

/// Fetches the configuration server's commands for this component for the life of the
/// process (long polls), runs each with `handler`, and answers it.
pub fn start_commands(reporting: &Reporting, handler: Handler) -> anyhow::Result<()> {
    let Some(api) = component_api(reporting)? else {
        return Ok(());
    };
    let api = std::sync::Arc::new(api);
    tokio::spawn(async move {
        let working: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>> =
            Default::default();
        let mut failing = false;
        loop {
            let busy: Vec<String> = working
                .lock()
                .map(|w| w.iter().map(|id| id.to_string()).collect())
                .unwrap_or_default();
            let path = if busy.is_empty() {
                "/api/commands?wait=20".to_string()
            } else {
                format!("/api/commands?wait=20&busy={}", busy.join(","))
            };
            let command = match api.get(&path).await {
                Ok(c) => {
                    failing = false;
                    c
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %format!("{e:#}"), "could not fetch commands from the configuration server; retrying");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            // 204: nothing to do.
            let Some(id) = command["id"].as_i64() else {
                continue;
            };
            // Given again while it runs: it is being carried out.
            if !working.lock().map(|mut w| w.insert(id)).unwrap_or(false) {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            let (api, handler, working) = (api.clone(), handler.clone(), working.clone());
            tokio::spawn(async move {
                let kind = command["kind"].as_str().unwrap_or("").to_string();
                let outcome = handler(kind.clone(), command["params"].clone()).await;
                let answer = match outcome {
                    Ok(result) => json!({"ok": true, "result": result}),
                    Err(e) => {
                        tracing::warn!(command = id, %kind, error = %e, "a command failed");
                        json!({"ok": false, "error": e})
                    }
                };
                // Answered until the server has it: the work is done, only the word is due.
                loop {
                    match api
                        .call(
                            reqwest::Method::POST,
                            &format!("/api/commands/{id}"),
                            Some(answer.clone()),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(command = id, error = %format!("{e:#}"), "could not answer a command; retrying");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                }
                if let Ok(mut w) = working.lock() {
                    w.remove(&id);
                }
            });
        }
    });
    Ok(())
}

/// Whether `addr` takes a TCP connection within 3 s.
pub async fn answers(addr: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(addr);
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(3), connect).await,
        Ok(Ok(_))
    )
}

/// What of a heartbeat the configuration server's jobs wait on (a disk's copy ended, a mark
/// reached the master target): when it changes, the heartbeat goes at once.
pub type Watched = std::sync::Arc<dyn Fn(&serde_json::Map<String, Value>) -> Value + Send + Sync>;

/// How often a component with a [`Watched`] part looks at it between heartbeats.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Sends heartbeats for the life of the process, if `reporting` names a server: health,
/// version, the free space of `volume`, and what `report` adds; every heartbeat interval, and
/// also at once (within 0.2 s) when the `watched` part of the report changes.
pub fn start_heartbeats(
    reporting: &Reporting,
    volume: PathBuf,
    report: Report,
    watched: Option<Watched>,
) -> anyhow::Result<()> {
    let Some(api) = component_api(reporting)? else {
        return Ok(());
    };
    if !(0.1..=3600.0).contains(&reporting.heartbeat_interval) {
        bail!(
            "--heartbeat-interval {} is not a number of seconds from 0.1 to 3600",
            reporting.heartbeat_interval
        );
    }
    let every = std::time::Duration::from_secs_f64(reporting.heartbeat_interval);
    tokio::spawn(async move {
        let mut failing = false;
        let mut sent: Option<(std::time::Instant, Value)> = None;
        loop {
            let mut beat = report().await;
            let now_watched = watched.as_ref().map(|w| w(&beat)).unwrap_or(Value::Null);
            let due = match &sent {
                None => true,
                Some((at, before)) => at.elapsed() >= every || *before != now_watched,
            };
            if !due {
                tokio::time::sleep(WATCH_EVERY.min(every)).await;
                continue;
            }
            sent = Some((std::time::Instant::now(), now_watched));
            beat.insert("healthy".into(), json!(true));
            beat.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
            beat.insert("free_bytes".into(), json!(free_bytes(&volume)));
            let beat = Value::Object(beat);
            match api
                .call(reqwest::Method::POST, "/api/heartbeat", Some(beat))
                .await
            {
                Ok(_) if failing => {
                    failing = false;
                    tracing::warn!("heartbeats reach the configuration server again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %format!("{e:#}"), "a heartbeat did not reach the configuration server; retrying");
                }
                Err(_) => {}
            }
            let pause = if watched.is_some() {
                WATCH_EVERY.min(every)
            } else {
                every
            };
            tokio::time::sleep(pause).await;
        }
    });
    Ok(())
}
