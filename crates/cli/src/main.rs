//! `boomerang`: the one binary. It parses arguments and calls the library crates; the logic
//! lives there.

mod agent;
mod client;
mod daemon;
mod master_target;
mod output;
mod pki;
mod process_server;
mod quickstart;
mod server;
mod store;

use clap::{Parser, Subcommand};

use output::{Output, report_error};

/// Continuous block replication, failover, reprotect and failback.
#[derive(Parser, Debug)]
#[command(name = "boomerang", version, about, propagate_version = true)]
struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work on a replica store directly (offline).
    Store(store::StoreArgs),
    /// Mobility agent: serve protected disks over NBD, capturing every write.
    Agent(Box<agent::AgentArgs>),
    /// Run the sample lifecycle on local directories and verify the data.
    Quickstart(quickstart::QuickstartArgs),
    /// Master target: apply write logs from process servers into replica stores as recovery points.
    MasterTarget(Box<master_target::MasterTargetArgs>),
    /// Process server: receive agents' write logs over mutual TLS into a cache volume.
    ProcessServer(process_server::ProcessServerArgs),
    /// Configuration server: the REST API over HTTPS (`server init DIR` creates one).
    Server(server::ServerArgs),
    /// Check a machine before reprotect or failback (the configuration server's preflight rules).
    Preflight(client::PreflightArgs),
    /// Each machine's protection: state, health, RPO now, latest recovery point.
    Status(client::StatusArgs),
    /// Serve a machine's disks at a point, isolated (its replication goes on); --cleanup ends it.
    TestFailover(client::TestFailoverArgs),
    /// Protect a machine with a replication policy and follow its initial sync.
    Protect(client::ProtectArgs),
    /// Fail a machine over to its recovery site: --planned stops it first and loses nothing.
    Failover(client::FailoverArgs),
    /// Serve a failed-over machine at another point instead (before commit).
    ChangePoint(client::ChangePointArgs),
    /// Make a failover final: its point can no longer change.
    Commit(client::CommitArgs),
    /// Replicate a failed-over machine back into its own disks at its original site (only
    /// the blocks that differ travel); after a failback, to the recovery site again.
    Reprotect(client::ReprotectArgs),
    /// Bring a reprotected machine home (a planned failover back): nothing is lost.
    Failback(client::FailbackArgs),
    /// The configuration server's jobs.
    #[command(subcommand)]
    Job(client::JobCommand),
    /// The configuration server's machines.
    #[command(subcommand)]
    Machine(client::MachineCommand),
    /// The configuration server's sites.
    #[command(subcommand)]
    Site(client::SiteCommand),
    /// Replication policies (each with its failback policy).
    #[command(subcommand)]
    Policy(client::PolicyCommand),
    /// Components (agents, process servers, master targets): enrolment and health.
    #[command(subcommand)]
    Component(client::ComponentCommand),
    /// The configuration server's alerts.
    #[command(subcommand)]
    Alert(client::AlertCommand),
    /// The site's certificate authority: every component talks mutual TLS with its certificates.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOOMERANG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Store(cmd) => store::run(cmd, cli.output).await,
            Command::Quickstart(args) => quickstart::run(args, cli.output).await,
            Command::Agent(args) => agent::run(*args, cli.output).await,
            Command::Pki(cmd) => pki::run(cmd, cli.output),
            Command::ProcessServer(args) => process_server::run(args).await,
            Command::MasterTarget(args) => master_target::run(*args, cli.output).await,
            Command::Server(args) => server::run(args, cli.output).await,
            Command::Preflight(args) => client::preflight(args, cli.output).await,
            Command::Status(args) => client::status(args, cli.output).await,
            Command::TestFailover(args) => client::test_failover(args, cli.output).await,
            Command::Job(cmd) => client::job(cmd, cli.output).await,
            Command::Failover(args) => client::failover(args, cli.output).await,
            Command::Protect(args) => client::protect(args, cli.output).await,
            Command::ChangePoint(args) => client::change_point(args, cli.output).await,
            Command::Commit(args) => client::commit(args, cli.output).await,
            Command::Reprotect(args) => client::reprotect(args, cli.output).await,
            Command::Failback(args) => client::failback(args, cli.output).await,
            Command::Machine(cmd) => client::machine(cmd, cli.output).await,
            Command::Site(cmd) => client::site(cmd, cli.output).await,
            Command::Policy(cmd) => client::policy(cmd, cli.output).await,
            Command::Component(cmd) => client::component(cmd, cli.output).await,
            Command::Alert(cmd) => client::alert(cmd, cli.output).await,
        }
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            report_error(&e, cli.output);
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are well formed (unique names, valid defaults): clap
    /// checks them when a subcommand runs, so a mistake would otherwise show only then.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
