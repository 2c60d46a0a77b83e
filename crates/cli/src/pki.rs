//! `boomerang pki`: the site's certificate authority for mutual TLS between components.

use std::path::PathBuf;

use anyhow::Context;
use boomerang_wire::pki::{self, CertRole};
use clap::Subcommand;
use serde_json::json;

use crate::output::{Output, print_json};

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create the site's CA in DIR (ca.crt, and ca.key readable by its owner only).
    Init { dir: PathBuf },
    /// Issue a component's certificate into DIR/issued/NAME (cert.pem, key.pem, ca.crt).
    Issue {
        /// The CA directory.
        dir: PathBuf,
        /// The component's name: a-z, 0-9 and '-' (for an agent, the protected machine's name).
        #[arg(long)]
        name: String,
        /// agent, process-server, master-target or server.
        #[arg(long)]
        role: CertRole,
        /// A host name or IP address the component is reached at (servers); repeat for more.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// For an agent standing by at a recovery site (`agent --standby`): the machine it
        /// serves once reprotected; its certificate names it that machine's agent too.
        #[arg(long, requires = "role")]
        machine: Option<String>,
        /// Days of validity.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

pub fn run(cmd: PkiCommand, output: Output) -> anyhow::Result<i32> {
    match cmd {
        PkiCommand::Init { dir } => {
            let cert = pki::init_ca(&dir)?;
            match output {
                Output::Json => print_json(&json!({ "ca_cert": cert, "dir": dir }))?,
                Output::Human => {
                    println!("created the CA in {}", dir.display());
                    println!(
                        "back up {} and keep it private: it signs every component's certificate",
                        dir.join("ca.key").display()
                    );
                }
            }
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            hosts,
            machine,
            days,
        } => {
            let also: Vec<String> = machine.into_iter().collect();
            let issued = pki::issue_also(&dir, &name, &also, role, &hosts, days)
                .with_context(|| format!("could not issue a certificate for {name}"))?;
            match output {
                Output::Json => print_json(&issued)?,
                Output::Human => println!(
                    "issued {} for {} into {}: pass that directory to the component",
                    role.label(),
                    issued.identity,
                    issued.dir.display()
                ),
            }
        }
    }
    Ok(0)
}
