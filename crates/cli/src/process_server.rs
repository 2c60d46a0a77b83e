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
    /// The process server's name (default: the certificate directory's name).
    #[arg(long)]
    name: Option<String>,
}

pub async fn run(args: ProcessServerArgs) -> anyhow::Result<i32> {
    let tls = TlsIdentity::load(&args.tls)?;
    let name = match args.name {
        Some(n) => n,
        None => args
            .tls
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .context("give the process server's name with --name")?,
    };
    std::fs::create_dir_all(&args.cache).with_context(|| {
        format!(
            "could not create the cache directory {}: check the path and permissions",
            args.cache.display()
        )
    })?;
    let server = receiver(Config {
        name,
        tls,
        cache: args.cache.clone(),
        master_target: args.master_target.clone(),
    })?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("could not listen on {}: is the port in use?", args.listen))?;
    let shutdown = crate::agent::shutdown_signal()?;
    // The first line of stdout is the address, for scripts and tests.
    println!("listening on {}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server.serve(listener, stopped));
    shutdown.await;
    let _ = stop.send(true);
    let _ = serving.await;
    eprintln!("process server stopped");
    Ok(0)
}
