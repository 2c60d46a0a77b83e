//! `boomerang server`: the configuration server (`init` makes its state directory; without a
//! verb it serves the REST API over HTTPS).

use std::path::PathBuf;

use anyhow::Context;
use boomerang_server::{ServerConfig, init, prepare, serve};
use clap::{Args, Subcommand};

use crate::output::{Output, print_json};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    /// The server's `server.toml` (made by `boomerang server init`).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Listen here instead of the address in server.toml (default 0.0.0.0:443).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ServerCommand {
    /// Create a server's state directory: server.toml, the database, the CA (DIR/ca.crt), an
    /// HTTPS certificate for localhost and 127.0.0.1, and the first admin token (printed once).
    Init { dir: PathBuf },
    /// Rebuild a server's state directory from the newest backup at a store location (its
    /// `[backup]`): the database, server.toml, the CA and the HTTPS certificate. Start it
    /// with the same address, so that components reach it.
    Restore {
        /// Where the server backed itself up: `azure://container/prefix` or a directory.
        #[arg(long)]
        from: String,
        /// The key file the backups are sealed with.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The new state directory (empty or new).
        #[arg(long)]
        state: PathBuf,
    },
}

pub async fn run(args: ServerArgs, output: Output) -> anyhow::Result<i32> {
    if let Some(ServerCommand::Restore {
        from,
        key_file,
        state,
    }) = args.command
    {
        let key = key_file
            .as_deref()
            .map(boomerang_store::DataKey::read)
            .transpose()?;
        let restored = boomerang_server::backup::restore(&from, key.as_ref(), &state)
            .await
            .map_err(anyhow::Error::msg)?;
        let config = state.join("server.toml");
        if output == Output::Json {
            print_json(&serde_json::json!({"backup": restored, "config": config}))?;
        } else {
            println!("restored {restored} from {from} into {}", state.display());
            println!(
                "start it with: boomerang server --config {} (at the address components know)",
                config.display()
            );
        }
        return Ok(0);
    }
    if let Some(ServerCommand::Init { dir }) = args.command {
        let made = tokio::task::spawn_blocking(move || init(&dir)).await??;
        if output == Output::Json {
            print_json(&serde_json::json!({
                "admin_token": made.admin_token,
                "config": made.config,
                "ca": made.ca,
            }))?;
        } else {
            println!("configuration server created: {}", made.config.display());
            println!("CA certificate (give it to clients): {}", made.ca.display());
            println!(
                "admin token (shown once; keep it safe): {}",
                made.admin_token
            );
            println!(
                "start it with: boomerang server --config {}",
                made.config.display()
            );
        }
        return Ok(0);
    }
    let Some(path) = args.config else {
        anyhow::bail!("give the server's configuration with --config DIR/server.toml");
    };
    let mut config = ServerConfig::load(&path)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let prepared = prepare(&config)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {}: is the port in use, or below 1024 without privilege?",
                config.listen
            )
        })?;
    let shutdown = crate::agent::shutdown_signal()?;
    println!("listening on {}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(serve(prepared, listener, stopped));
    tokio::select! {
        _ = shutdown => {
            let _ = stop.send(true);
            eprintln!("configuration server stopped");
            Ok(0)
        }
        ended = serving => {
            ended??;
            Ok(0)
        }
    }
}
