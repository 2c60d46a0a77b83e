//! What the replication servers (process server, master target) share on the command line:
//! their name, and serving until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use boomerang_wire::receive::Receiver;

/// The component's name: `--name`, or the name its certificate directory says it was issued
/// to (`boomerang pki issue` and `component enroll` write it), or that directory's name.
pub fn name_or_dir(name: Option<String>, tls: &Path, what: &str) -> anyhow::Result<String> {
    match name {
        Some(n) => Ok(n),
        None => boomerang_wire::pki::identity_name(tls)
            .or_else(|| tls.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .with_context(|| format!("give the {what}'s name with --name")),
    }
}

/// Serves `receiver` on `listen` until SIGTERM or SIGINT. The first line of stdout is the
/// address, for scripts and tests.
pub async fn serve(receiver: Arc<Receiver>, listen: &str, what: &str) -> anyhow::Result<i32> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}: is the port in use?"))?;
    let shutdown = crate::agent::shutdown_signal()?;
    println!("listening on {}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(receiver.serve(listener, stopped));
    shutdown.await;
    let _ = stop.send(true);
    let _ = serving.await;
    eprintln!("{what} stopped");
    Ok(0)
}

/// Serves `/healthz` and `/metrics` on `addr`, if given.
pub async fn serve_metrics(
    addr: Option<&str>,
    render: boomerang_wire::http::Render,
) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not serve metrics on {addr}: is the port in use?"))?;
    eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
    tokio::spawn(boomerang_wire::http::serve_metrics(listener, render));
    Ok(())
}
