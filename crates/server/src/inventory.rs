//! Inventory (DESIGN 4): sites, hosts, datastores and machines, as the server knows them. They
//! come from inventory sources behind [`InventorySource`]: TOML files first (`inventory` in
//! server.toml) and what agents report; libvirt and vSphere later. A refresh loads every
//! source, checks the whole (names, references), and only then replaces what the database
//! holds: a bad file changes nothing.
//!
//! ```toml
//! [[site]]
//! name = "site-a"
//! kind = "local"            # or "azure", with its storage account:
//! # azure = { account = "drstore", container = "dr", key_env = "DR_STORAGE_KEY" }
//! #   (or key_file = "/etc/boomerang/dr.key"; sas = true for a SAS token; endpoint = "https://..."
//! #   off the public cloud; use_emulator = true for Azurite). The key itself is never here.
//!
//! [[host]]
//! name = "esx-a1"
//! site = "site-a"
//!
//! [[datastore]]
//! name = "ds-a1"
//! host = "esx-a1"
//! type = "VMFS"             # VMFS, NFS or vSAN
//! path = "/srv/ds-a1"       # where its disks are, as its host sees it (alternate location)
//!
//! [[machine]]
//! name = "web01"
//! site = "site-a"
//! host = "esx-a1"
//! datastore = "ds-a1"
//! os = { family = "linux", version = "9.2" }
//! tools = "running"         # running, not-running or not-installed
//! config = { "disk.EnableUUID" = "true" }
//! controllers = [{ name = "scsi0", kind = "lsi-logic" }]
//! disks = [{ name = "sda", size_bytes = 68719476736, uuid = "6000c29...", controller = "scsi0" }]
//! nics = [{ name = "eth0", ips = ["10.0.0.5"] }]
//!
//! [[master_target]]
//! name = "mt1"
//! site = "site-a"
//! machine = "mt-vm"         # the inventory machine it runs on
//! address = "10.0.0.9:9443"
//! retention = { path = "/mnt/retention", filesystem = "ext4", capacity_bytes = 1099511627776 }
//!
//! [[process_server]]
//! name = "ps1"
//! site = "site-b"
//! address = "10.1.0.4:9443"
//! link_bytes_per_second = 125000000   # the site link behind it (1 Gbit/s), if known
//! ```
//!
//! A machine no file lists joins the inventory when its agent reports (its disks and OS, as a
//! physical machine at the agent's site); a file that lists it later takes it over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    Local,
    Azure,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub kind: SiteKind,
    /// For an Azure site: its storage account and container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureStorage>,
}

/// Where an Azure site keeps its data. The secret itself is never here, in the database or in
/// any answer: only where the server finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AzureStorage {
    pub account: String,
    pub container: String,
    /// The Blob endpoint, when not `https://ACCOUNT.blob.core.windows.net` (a sovereign
    /// cloud, Azure Stack, or Azurite at `http://HOST:PORT/ACCOUNT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Azurite's well-known development account (its address from AZURITE_BLOB_STORAGE_URL).
    #[serde(default)]
    pub use_emulator: bool,
    /// The server's environment variable that holds the account key (or SAS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// A file that holds the account key (or SAS), readable by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// The secret is a shared access signature, not the account key.
    #[serde(default)]
    pub sas: bool,
}

impl AzureStorage {
    /// How to reach the container, with the secret read from where the site says.
    pub fn access(&self) -> Result<boomerang_store::backend::AzureAccess, String> {
        use boomerang_store::backend::{AzureAccess, AzureSecret};
        let secret = if self.use_emulator {
            AzureSecret::Emulator
        } else {
            let text = match (&self.key_env, &self.key_file) {
                (Some(var), None) => std::env::var(var).map_err(|_| {
                    format!("the configuration server has no environment variable {var} (the key of storage account {:?}): set it where the server runs", self.account)
                })?,
                (None, Some(file)) => std::fs::read_to_string(file).map_err(|e| {
                    format!("could not read {file} (the key of storage account {:?}): {e}", self.account)
                })?,
                _ => {
                    return Err(format!(
                        "storage account {:?} needs exactly one of key_env or key_file (or use_emulator)",
                        self.account
                    ));
                }
            };
            let text = text.trim().to_string();
            if self.sas {
                AzureSecret::Sas(text)
            } else {
                AzureSecret::Key(text)
            }
        };
        Ok(AzureAccess {
            account: self.account.clone(),
            container: self.container.clone(),
            endpoint: self.endpoint.clone(),
            secret,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub site: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum DatastoreKind {
    #[serde(rename = "VMFS")]
    Vmfs,
    #[serde(rename = "NFS")]
    Nfs,
    #[serde(rename = "vSAN")]
    Vsan,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Datastore {
    pub name: String,
    pub host: String,
    #[serde(rename = "type")]
    pub kind: DatastoreKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Where its disks are, as its host sees the datastore: a directory (an absolute path).
    /// An alternate-location reprotect into the datastore creates the new disks there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096, pattern = "^/")]
    pub path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OsFamily {
    Linux,
    Windows,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Os {
    pub family: OsFamily,
    /// Dotted numbers, compared part by part ("9.2" < "9.10").
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ToolsStatus {
    Running,
    NotRunning,
    NotInstalled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ControllerKind {
    LsiLogic,
    LsiLogicSas,
    Paravirtual,
    Buslogic,
    Ide,
    Sata,
    Nvme,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    pub name: String,
    pub kind: ControllerKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The controller it hangs on (a name in `controllers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// A physical machine (it fails back to a virtual machine only).
    #[serde(default)]
    pub physical: bool,
    pub os: Os,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub controllers: Vec<Controller>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Configuration parameters, such as `disk.EnableUUID`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Snapshots the machine has now.
    #[serde(default)]
    pub snapshots: u32,
    pub tools: ToolsStatus,
    /// Where the machine's storage was moved by Storage vMotion last (a datastore name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_moved_from: Option<String>,
    /// Where this description comes from: an inventory file, or the machine's agent (a
    /// machine no file lists). Inventory files leave it out.
    #[serde(default)]
    pub source: MachineSource,
}

impl Machine {
    /// A machine as its agent reports it: its OS and disks, at the agent's site, physical (as
    /// ASR discovers a server by its mobility agent); nothing else is known.
    pub fn reported(
        name: &str,
        site: &str,
        os: &Os,
        disks: &[crate::components::DiskReport],
    ) -> Machine {
        Machine {
            name: name.to_string(),
            site: site.to_string(),
            host: None,
            datastore: None,
            physical: true,
            os: os.clone(),
            disks: disks
                .iter()
                .map(|d| Disk {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    uuid: None,
                    controller: None,
                })
                .collect(),
            controllers: Vec::new(),
            nics: Vec::new(),
            config: BTreeMap::new(),
            snapshots: 0,
            tools: ToolsStatus::NotInstalled,
            storage_moved_from: None,
            source: MachineSource::Agent,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MachineSource {
    #[default]
    File,
    Agent,
}

/// What a master target's retention volume is, as preflight needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionVolume {
    /// Default `/mnt/retention` on Linux, `R:` on Windows.
    pub path: String,
    /// The file system, as `ext4`, `xfs`, `ntfs`, `fat32`.
    pub filesystem: String,
    pub capacity_bytes: u64,
    /// What else uses the volume: `replication-target`, `cache`; should be nothing.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Locked by another process or a snapshot.
    #[serde(default)]
    pub locked: bool,
}

/// A master target (a component running on an inventory machine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterTarget {
    pub name: String,
    pub site: String,
    /// The inventory machine it runs on.
    pub machine: String,
    /// Its replication address, `host:port`.
    pub address: String,
    /// Disks attached to it now, for every machine it protects.
    #[serde(default)]
    pub attached_disks: u32,
    pub retention: RetentionVolume,
}

/// A process server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessServer {
    pub name: String,
    pub site: String,
    /// Its replication address, `host:port`.
    pub address: String,
    /// The bandwidth of the site link behind it, bytes a second, when known: preflight
    /// compares it with what the machines write (`PS_LINK_BANDWIDTH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub link_bytes_per_second: Option<u64>,
}

/// One source's inventory, or all of them merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default, rename = "site")]
    pub sites: Vec<Site>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(default, rename = "datastore")]
    pub datastores: Vec<Datastore>,
    #[serde(default, rename = "machine")]
    pub machines: Vec<Machine>,
    #[serde(default, rename = "master_target")]
    pub master_targets: Vec<MasterTarget>,
    #[serde(default, rename = "process_server")]
    pub process_servers: Vec<ProcessServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("could not read inventory file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory file {}: {why}", path.display())]
    Syntax { path: PathBuf, why: String },
    #[error("inventory: {0}")]
    Invalid(String),
}

/// Where inventory comes from.
pub trait InventorySource: Send + Sync {
    /// For messages: the file or endpoint.
    fn describe(&self) -> String;
    fn load(&self) -> Result<Inventory, InventoryError>;
}

/// An inventory TOML file.
pub struct TomlFile(pub PathBuf);

impl InventorySource for TomlFile {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }

    fn load(&self) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(&self.0).map_err(|source| InventoryError::Read {
            path: self.0.clone(),
            source,
        })?;
        // toml's message gives the line and the column.
        toml::from_str(&text).map_err(|e| InventoryError::Syntax {
            path: self.0.clone(),
            why: e.to_string().trim_end().replace('\n', " "),
        })
    }
}

/// Loads every source and checks the whole.
pub fn load_all(sources: &[Box<dyn InventorySource>]) -> Result<Inventory, InventoryError> {
    let mut all = Inventory::default();
    for source in sources {
        let one = source.load()?;
        all.sites.extend(one.sites);
        all.hosts.extend(one.hosts);
        all.datastores.extend(one.datastores);
        all.machines.extend(one.machines);
        all.master_targets.extend(one.master_targets);
        all.process_servers.extend(one.process_servers);
    }
    check(&all)?;
    Ok(all)
}

/// A name that may be used in paths and URLs: lowercase letters, digits and '-'.
pub fn valid_name(name: &str) -> bool {
    boomerang_wire::pki::valid_name(name)
}

fn unique<'a>(
    what: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<BTreeSet<&'a str>, InventoryError> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !valid_name(name) {
            return Err(InventoryError::Invalid(format!(
                "{what} name {name:?} is not valid: use 1 to 63 lowercase letters, digits and '-'"
            )));
        }
        if !seen.insert(name) {
            return Err(InventoryError::Invalid(format!(
                "two {what}s are named {name:?}: names are unique across every inventory source"
            )));
        }
    }
    Ok(seen)
}

fn refer(
    what: &str,
    name: &str,
    field: &str,
    to: &str,
    known: &BTreeSet<&str>,
) -> Result<(), InventoryError> {
    if known.contains(to) {
        Ok(())
    } else {
        Err(InventoryError::Invalid(format!(
            "{what} {name:?} names {field} {to:?}, which no inventory source defines: add it, or fix the name"
        )))
    }
}

/// Names valid and unique, references resolved.
pub fn check(inv: &Inventory) -> Result<(), InventoryError> {
    let sites = unique("site", inv.sites.iter().map(|s| s.name.as_str()))?;
    for site in &inv.sites {
        let Some(azure) = &site.azure else { continue };
        if site.kind != SiteKind::Azure {
            return Err(InventoryError::Invalid(format!(
                "site {:?} has Azure storage settings but is of kind local: make it kind = \"azure\", or drop its azure settings",
                site.name
            )));
        }
        let location = format!("azure://{}", azure.container);
        if boomerang_store::Location::parse(&location).is_err() {
            return Err(InventoryError::Invalid(format!(
                "site {:?} names container {:?}: a container name is 3 to 63 lower-case letters, digits and single hyphens",
                site.name, azure.container
            )));
        }
        if !azure.use_emulator && azure.key_env.is_some() == azure.key_file.is_some() {
            return Err(InventoryError::Invalid(format!(
                "site {:?}: give where the server finds the key of storage account {:?}: exactly one of key_env or key_file (or use_emulator for Azurite)",
                site.name, azure.account
            )));
        }
    }
    let hosts = unique("host", inv.hosts.iter().map(|h| h.name.as_str()))?;
    let datastores = unique("datastore", inv.datastores.iter().map(|d| d.name.as_str()))?;
    let machines = unique("machine", inv.machines.iter().map(|m| m.name.as_str()))?;
    if let Some(m) = inv
        .machines
        .iter()
        .find(|m| m.source != MachineSource::File)
    {
        return Err(InventoryError::Invalid(format!(
            "machine {:?} says source = \"agent\": that is for machines agents report; leave `source` out of inventory files",
            m.name
        )));
    }
    unique(
        "component",
        inv.master_targets
            .iter()
            .map(|m| m.name.as_str())
            .chain(inv.process_servers.iter().map(|p| p.name.as_str())),
    )?;
    for mt in &inv.master_targets {
        refer("master target", &mt.name, "site", &mt.site, &sites)?;
        refer("master target", &mt.name, "machine", &mt.machine, &machines)?;
    }
    for ps in &inv.process_servers {
        refer("process server", &ps.name, "site", &ps.site, &sites)?;
    }
    for h in &inv.hosts {
        refer("host", &h.name, "site", &h.site, &sites)?;
    }
    for d in &inv.datastores {
        refer("datastore", &d.name, "host", &d.host, &hosts)?;
    }
    for m in &inv.machines {
        refer("machine", &m.name, "site", &m.site, &sites)?;
        if let Some(h) = &m.host {
            refer("machine", &m.name, "host", h, &hosts)?;
        }
        if let Some(d) = &m.datastore {
            refer("machine", &m.name, "datastore", d, &datastores)?;
        }
        let controllers = unique(
            &format!("controller of machine {:?}", m.name),
            m.controllers.iter().map(|c| c.name.as_str()),
        )?;
        unique(
            &format!("disk of machine {:?}", m.name),
            m.disks.iter().map(|d| d.name.as_str()),
        )?;
        for d in &m.disks {
            if let Some(c) = &d.controller {
                refer(
                    &format!("disk of machine {:?}", m.name),
                    &d.name,
                    "controller",
                    c,
                    &controllers,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[site]]
name = "site-a"
kind = "local"

[[host]]
name = "esx-a1"
site = "site-a"

[[datastore]]
name = "ds-a1"
host = "esx-a1"
type = "VMFS"

[[machine]]
name = "web01"
site = "site-a"
host = "esx-a1"
datastore = "ds-a1"
os = { family = "linux", version = "9.2" }
tools = "running"
config = { "disk.EnableUUID" = "true" }
controllers = [{ name = "scsi0", kind = "lsi-logic" }]
disks = [{ name = "sda", size_bytes = 1024, uuid = "u-1", controller = "scsi0" }]
nics = [{ name = "eth0", ips = ["10.0.0.5"] }]
"#;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        let inv: Inventory = toml::from_str(text).map_err(|e| InventoryError::Syntax {
            path: "t.toml".into(),
            why: e.to_string(),
        })?;
        check(&inv)?;
        Ok(inv)
    }

    #[test]
    fn a_whole_inventory_loads() {
        let inv = parse(SAMPLE).unwrap();
        assert_eq!(
            inv.machines[0].disks[0].controller.as_deref(),
            Some("scsi0")
        );
        assert_eq!(inv.datastores[0].kind, DatastoreKind::Vmfs);
    }

    #[test]
    fn bad_inventories_are_named() {
        let cases = [
            (
                SAMPLE.replace(
                    "site = \"site-a\"\n\n[[datastore]]",
                    "site = \"site-b\"\n\n[[datastore]]",
                ),
                "site \"site-b\"",
            ),
            (
                SAMPLE.replace("name = \"web01\"", "name = \"Web 01\""),
                "\"Web 01\" is not valid",
            ),
            (
                format!("{SAMPLE}\n[[site]]\nname = \"site-a\"\nkind = \"azure\"\n"),
                "two sites are named \"site-a\"",
            ),
            (
                SAMPLE.replace("controller = \"scsi0\"", "controller = \"scsi9\""),
                "controller \"scsi9\"",
            ),
            (
                SAMPLE.replace("type = \"VMFS\"", "type = \"FAT\""),
                "line 13",
            ),
            (
                SAMPLE.replace(
                    "tools = \"running\"",
                    "tools = \"running\"\ncolour = \"red\"",
                ),
                "colour",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} in {e}");
        }
    }
}
