//! Boomerang's own certificate authority: every component talks mutual TLS with a certificate
//! this CA issued, and nothing else is trusted.
//!
//! A CA directory holds `ca.crt` (PEM), `ca.key` (PEM, mode 0600) and `ca.json` (the CA's name,
//! needed to sign). `issue` writes `issued/<name>/` with `cert.pem`, `key.pem` (0600) and a copy
//! of `ca.crt`: the directory a component takes as its `--tls` argument.
//!
//! A certificate names its holder's role and name in a DNS subject alternative name,
//! `<name>.<role>.boomerang.internal` (`.internal` is reserved for private use and never
//! resolves), so that a server can check that a peer is who its `Hello` says, with the same
//! name checks TLS uses. Servers also carry the host names and addresses they are reached at.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::frame::Role;

/// In an identity directory: the name its certificate is issued to.
pub const NAME_FILE: &str = "name";

/// The name of the identity in `dir`: its `name` file (written with the certificate).
pub fn identity_name(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(NAME_FILE))
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| valid_name(n))
}

/// The domain under which certificates name roles: `<name>.<role>.boomerang.internal`.
pub const IDENTITY_DOMAIN: &str = "boomerang.internal";

/// What a certificate may be issued for: a replication role, or the configuration server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    Wire(Role),
    Server,
}

impl CertRole {
    /// The role's label in identities and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            CertRole::Wire(Role::Agent) => "agent",
            CertRole::Wire(Role::ProcessServer) => "process-server",
            CertRole::Wire(Role::MasterTarget) => "master-target",
            CertRole::Server => "server",
        }
    }
}

impl std::str::FromStr for CertRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "agent" => CertRole::Wire(Role::Agent),
            "process-server" => CertRole::Wire(Role::ProcessServer),
            "master-target" => CertRole::Wire(Role::MasterTarget),
            "server" => CertRole::Server,
            _ => {
                return Err(format!(
                    "{s:?} is not a role: use agent, process-server, master-target or server"
                ));
            }
        })
    }
}

/// The DNS name that identifies `name` in `role`.
pub fn identity(role: CertRole, name: &str) -> String {
    format!("{name}.{}.{IDENTITY_DOMAIN}", role.label())
}

/// Whether `name` can be a component's name: 1 to 63 characters from a-z, 0-9 and '-', not
/// starting or ending with '-' (one DNS label).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} already holds a CA: use it, or choose another directory (a new CA would orphan every certificate the old one issued)",
        dir.display()
    )]
    CaExists { dir: PathBuf },
    #[error("{} holds no CA: create one with `boomerang pki init {}`", dir.display(), dir.display())]
    NoCa { dir: PathBuf },
    #[error("the CA in {} is unusable: {why}", dir.display())]
    BadCa { dir: PathBuf, why: String },
    #[error(
        "{0:?} is not a valid component name: use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    BadName(String),
    #[error(
        "{0:?} cannot be a --host: give a host name or IP address the component is reached at (no wildcards, nothing under .boomerang.internal)"
    )]
    BadHost(String),
    #[error("could not make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

#[derive(Serialize, Deserialize)]
struct CaInfo {
    common_name: String,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to a new file at `path` with `mode`, synced.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Boomerang");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates a CA in `dir` (created if missing). Refuses to replace an existing one.
pub fn init_ca(dir: &Path) -> Result<PathBuf, PkiError> {
    let cert_path = dir.join("ca.crt");
    if cert_path.exists() || dir.join("ca.key").exists() {
        return Err(PkiError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let key = KeyPair::generate()?;
    // Part of the (random) public key tells this CA from any other in logs and viewers.
    let tag: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let common_name = format!("Boomerang CA {tag}");
    let mut params = ca_params(&common_name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(100 * 365);
    let cert = params.self_signed(&key)?;
    write_new(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
    let info = serde_json::to_vec_pretty(&CaInfo { common_name }).map_err(|e| PkiError::BadCa {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    write_new(&dir.join("ca.json"), &info, 0o644)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// What `issue` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Issued {
    pub dir: PathBuf,
    pub identity: String,
    pub hosts: Vec<String>,
}

/// Issues a certificate for `name` in `role`, valid also for `hosts` (DNS names or IP
/// addresses a server is reached at), into `<ca dir>/issued/<name>/`.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    role: CertRole,
    hosts: &[String],
    days: u32,
) -> Result<Issued, PkiError> {
    issue_also(ca_dir, name, &[], role, hosts, days)
}

/// [`issue`], with a certificate that also names its holder `also` in the same role: an
/// agent standing by at a recovery site for machine M is also M's agent (it streams M's log
/// once M's disks are attached to it).
pub fn issue_also(
    ca_dir: &Path,
    name: &str,
    also: &[String],
    role: CertRole,
    hosts: &[String],
    days: u32,
) -> Result<Issued, PkiError> {
    if let Some(bad) = also.iter().find(|n| !valid_name(n)) {
        return Err(PkiError::BadName(bad.clone()));
    }
    if !valid_name(name) {
        return Err(PkiError::BadName(name.to_string()));
    }
    let key_path = ca_dir.join("ca.key");
    let info_path = ca_dir.join("ca.json");
    if !key_path.exists() {
        return Err(PkiError::NoCa {
            dir: ca_dir.to_path_buf(),
        });
    }
    let bad = |why: String| PkiError::BadCa {
        dir: ca_dir.to_path_buf(),
        why,
    };
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&key_path).map_err(io("read", &key_path))?)
        .map_err(|e| bad(format!("ca.key: {e}")))?;
    let info: CaInfo =
        serde_json::from_slice(&fs::read(&info_path).map_err(io("read", &info_path))?)
            .map_err(|e| bad(format!("ca.json: {e}")))?;
    let issuer = Issuer::new(ca_params(&info.common_name), ca_key);

    let identity = identity(role, name);
    let mut sans = vec![SanType::DnsName(
        identity
            .clone()
            .try_into()
            .map_err(|_| PkiError::BadName(name.to_string()))?,
    )];
    for other in also {
        sans.push(SanType::DnsName(
            self::identity(role, other)
                .try_into()
                .map_err(|_| PkiError::BadName(other.clone()))?,
        ));
    }
    for host in hosts {
        // A host may not pose as another component's identity, nor cover many names.
        if host.contains('*') || host.trim_end_matches('.').ends_with(IDENTITY_DOMAIN) {
            return Err(PkiError::BadHost(host.clone()));
        }
        sans.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .map_err(|_| PkiError::BadHost(host.clone()))?,
            ),
        });
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.clone());
    dn.push(DnType::OrganizationName, "Boomerang");
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // An hour of slack for clocks that differ between machines.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let out = ca_dir.join("issued").join(name);
    fs::create_dir_all(&out).map_err(io("create", &out))?;
    write_new(&out.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    let ca_cert = ca_dir.join("ca.crt");
    let ca_pem = fs::read(&ca_cert).map_err(io("read", &ca_cert))?;
    write_new(&out.join("ca.crt"), &ca_pem, 0o644)?;
    // The name the component is started with, read by `boomerang` when no --name is given.
    write_new(&out.join(NAME_FILE), name.as_bytes(), 0o644)?;
    Ok(Issued {
        dir: out,
        identity,
        hosts: hosts.to_vec(),
    })
}
