//! Where a store lives: a local directory (default), Azure Blob, or memory (tests).
//!
//! Every backend is reached through `object_store`; this module turns a location string into
//! an `ObjectStore`, creates Azure containers on `init` (object_store has no call for that),
//! and makes local commits durable (chunks are written without fsync and flushed with one
//! `syncfs` before the manifest, which is written with fsync).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, RetryConfig};

use crate::error::{Result, StoreError};

/// A parsed store location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local filesystem (the master target's retention volume).
    Local(PathBuf),
    /// `azure://container/prefix`.
    Azure { container: String, prefix: String },
    /// `memory://name`: a fresh in-memory store, for tests.
    Memory,
}

impl Location {
    /// Parses `azure://container[/prefix]`, `memory://`, `file://PATH` or a plain path.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("azure://") {
            let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&container.len())
                && container
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !container.starts_with('-')
                && !container.ends_with('-')
                && !container.contains("--");
            if !valid {
                return Err(StoreError::Invalid(format!(
                    "{s:?} is not a valid Azure store location: the container name must be 3 to 63 lower-case letters, digits and single hyphens, as in azure://boomerang/site-b"
                )));
            }
            return Ok(Location::Azure {
                container: container.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if s.starts_with("memory://") {
            return Ok(Location::Memory);
        }
        if let Some((scheme, _)) = s.split_once("://")
            && scheme != "file"
        {
            return Err(StoreError::Invalid(format!(
                "store location {s:?} has an unknown scheme {scheme:?}: use a directory path or azure://container/prefix"
            )));
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err(StoreError::Invalid(
                "the store location is empty: give a directory or azure://container/prefix".into(),
            ));
        }
        // Absolute (without following links), so that the places above a store are known
        // whatever the working directory.
        let path = std::path::absolute(path)
            .map_err(|e| StoreError::io(format!("could not make {path:?} an absolute path"), e))?;
        Ok(Location::Local(path))
    }

    /// The location `n` levels up (`azure://c/a/b` 1 up is `azure://c/a`); an error past the
    /// top (a container, a filesystem root).
    pub fn up(&self, n: usize) -> Result<Location> {
        let too_far = || {
            StoreError::Invalid(format!(
                "{self} has fewer than {n} levels above it: a store in a group must be under the group's root"
            ))
        };
        match self {
            Location::Local(dir) => {
                let mut dir = dir.clone();
                for _ in 0..n {
                    if !dir.pop() || dir.as_os_str().is_empty() {
                        return Err(too_far());
                    }
                }
                Ok(Location::Local(dir))
            }
            Location::Azure { container, prefix } => {
                let mut parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
                if parts.len() < n {
                    return Err(too_far());
                }
                parts.truncate(parts.len() - n);
                Ok(Location::Azure {
                    container: container.clone(),
                    prefix: parts.join("/"),
                })
            }
            Location::Memory => Err(StoreError::Invalid(
                "a memory:// store has no place above it: stores in a group are directories or on Azure Blob".into(),
            )),
        }
    }

    /// The last `n` names of the location's path, joined by `/` (its path under the place
    /// `n` levels up).
    pub fn tail(&self, n: usize) -> String {
        let parts: Vec<String> = match self {
            Location::Local(dir) => dir
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(p) => Some(p.to_string_lossy().to_string()),
                    _ => None,
                })
                .collect(),
            Location::Azure { prefix, .. } => prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            Location::Memory => Vec::new(),
        };
        parts[parts.len().saturating_sub(n)..].join("/")
    }

    /// The location `rel` (plain names separated by `/`) under this one.
    pub fn join(&self, rel: &str) -> Result<Location> {
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(StoreError::Invalid(format!(
                "{rel:?} is not a path under a store root: use plain names"
            )));
        }
        match self {
            Location::Local(dir) => Ok(Location::Local(
                parts.iter().fold(dir.clone(), |d, p| d.join(p)),
            )),
            Location::Azure { container, prefix } => {
                let mut all: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
                all.extend(parts);
                Ok(Location::Azure {
                    container: container.clone(),
                    prefix: all.join("/"),
                })
            }
            Location::Memory => Err(StoreError::Invalid(
                "a memory:// store has no place under it".into(),
            )),
        }
    }

    /// Opens the backend. With `create`, a missing directory or container is created.
    pub async fn open(&self, create: bool) -> Result<Backend> {
        let mut backend = self.open_here(create).await?;
        backend.location = Some(self.clone());
        Ok(backend)
    }

    async fn open_here(&self, create: bool) -> Result<Backend> {
        match self {
            Location::Local(dir) => {
                if create {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::io(
                            format!("could not create store directory {}", dir.display()),
                            e,
                        )
                    })?;
                } else {
                    // Only a directory that is not there is missing: one that cannot be looked
                    // at (permissions, an I/O error, a dangling link) is an error, never taken
                    // for a store that is gone.
                    match std::fs::metadata(dir) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            return Err(StoreError::Invalid(format!(
                                "{} is not a directory: give a store's directory",
                                dir.display()
                            )));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            if std::fs::symlink_metadata(dir).is_ok() {
                                return Err(StoreError::io(
                                    format!("{} is a link to nothing", dir.display()),
                                    e,
                                ));
                            }
                            return Err(StoreError::Missing {
                                location: dir.display().to_string(),
                            });
                        }
                        Err(e) => {
                            return Err(StoreError::io(
                                format!("could not look at store directory {}", dir.display()),
                                e,
                            ));
                        }
                    }
                }
                let dir = dir.canonicalize().map_err(|e| {
                    StoreError::io(
                        format!("could not open store directory {}", dir.display()),
                        e,
                    )
                })?;
                let open = |fsync| {
                    LocalFileSystem::new_with_prefix(&dir)
                        .map(|fs| Arc::new(fs.with_fsync(fsync)) as Arc<dyn ObjectStore>)
                        .map_err(|e| {
                            StoreError::backend(
                                format!("could not open store directory {}", dir.display()),
                                e,
                            )
                        })
                };
                Ok(Backend {
                    objects: open(false)?,
                    durable: open(true)?,
                    local_dir: Some(dir.clone()),
                    display: dir.display().to_string(),
                    location: None,
                    shared: None,
                })
            }
            Location::Memory => {
                let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
                Ok(Backend {
                    objects: mem.clone(),
                    durable: mem,
                    local_dir: None,
                    display: "memory://".into(),
                    location: None,
                    shared: None,
                })
            }
            Location::Azure { container, prefix } => {
                let display = if prefix.is_empty() {
                    format!("azure://{container}")
                } else {
                    format!("azure://{container}/{prefix}")
                };
                if create {
                    azure::create_container(container).await?;
                }
                let retry = RetryConfig {
                    max_retries: 4,
                    retry_timeout: Duration::from_secs(30),
                    ..RetryConfig::default()
                };
                let azure = MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| {
                        StoreError::backend(
                            format!(
                                "could not configure Azure Blob for {display}: set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_USE_EMULATOR=true for Azurite)"
                            ),
                            e,
                        )
                    })?;
                let objects: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(azure)
                } else {
                    Arc::new(PrefixStore::new(azure, prefix.as_str()))
                };
                Ok(Backend {
                    objects: objects.clone(),
                    durable: objects,
                    local_dir: None,
                    display,
                    location: None,
                    shared: None,
                })
            }
        }
    }
}

/// An opened backend.
#[derive(Clone, Debug)]
pub struct Backend {
    /// For chunks and nodes: content-addressed, idempotent, flushed in bulk before a manifest.
    pub objects: Arc<dyn ObjectStore>,
    /// For manifests, leases and the store config: durable when the put returns.
    pub durable: Arc<dyn ObjectStore>,
    local_dir: Option<PathBuf>,
    display: String,
    /// Where it is, when opened from a location.
    location: Option<Location>,
    /// For a store in a group: the group's shared namespace, which holds the chunks of every
    /// store in the group, and the leases that keep their commits and collections apart.
    shared: Option<Arc<Backend>>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(dir) => write!(f, "{}", dir.display()),
            Location::Azure { container, prefix } if prefix.is_empty() => {
                write!(f, "azure://{container}")
            }
            Location::Azure { container, prefix } => write!(f, "azure://{container}/{prefix}"),
            Location::Memory => write!(f, "memory://"),
        }
    }
}

/// Whether object `path` lives in a group's shared namespace: chunks and leases.
pub(crate) fn is_shared_path(path: &str) -> bool {
    ["chunks", "packs", "leases"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

impl Backend {
    /// Wraps an existing object store (tests, other backends).
    pub fn from_object_store(objects: Arc<dyn ObjectStore>, display: impl Into<String>) -> Self {
        Backend {
            objects: objects.clone(),
            durable: objects,
            local_dir: None,
            display: display.into(),
            location: None,
            shared: None,
        }
    }

    /// Where it is, when it was opened from a location.
    pub fn location(&self) -> Option<&Location> {
        self.location.as_ref()
    }

    /// This backend, with `shared` holding the chunks and leases.
    pub(crate) fn with_shared(mut self, shared: Backend) -> Backend {
        self.shared = Some(Arc::new(shared));
        self
    }

    /// The group's shared namespace, for a store in a group.
    pub(crate) fn shared(&self) -> Option<&Backend> {
        self.shared.as_deref()
    }

    /// Where object `path` is read and written in bulk: the shared namespace for a chunk of
    /// a store in a group, the store's own place otherwise.
    pub fn objects_at(&self, path: &str) -> &Arc<dyn ObjectStore> {
        match &self.shared {
            Some(shared) if is_shared_path(path) => &shared.objects,
            _ => &self.objects,
        }
    }

    /// Where object `path` is written durably: the shared namespace for a lease of a store in
    /// a group, the store's own place otherwise.
    pub fn durable_at(&self, path: &str) -> &Arc<dyn ObjectStore> {
        match &self.shared {
            Some(shared) if is_shared_path(path) => &shared.durable,
            _ => &self.durable,
        }
    }

    /// The location as the user wrote it (for messages).
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The file that holds object `path`, for stores on a local directory: readers on the hot
    /// path read it in one blocking call instead of through the object-store stream.
    pub fn local_file(&self, path: &str) -> Option<PathBuf> {
        match &self.shared {
            Some(shared) if is_shared_path(path) => shared.local_file(path),
            _ => self.local_dir.as_ref().map(|d| d.join(path)),
        }
    }

    /// Makes every object written so far durable. Local stores: one `syncfs`; remote object
    /// stores are durable when a put returns.
    pub async fn flush(&self) -> Result<()> {
        if let Some(shared) = &self.shared {
            Box::pin(shared.flush()).await?;
            // One syncfs flushes the whole filesystem: the store's own directory is done if
            // it is on the same one.
            use std::os::unix::fs::MetadataExt;
            let dev = |d: &Option<PathBuf>| {
                d.as_ref()
                    .and_then(|d| std::fs::metadata(d).ok())
                    .map(|m| m.dev())
            };
            if dev(&self.local_dir).is_some() && dev(&self.local_dir) == dev(&shared.local_dir) {
                return Ok(());
            }
        }
        let Some(dir) = self.local_dir.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&dir)?;
            nix::unistd::syncfs(&f).map_err(std::io::Error::from)
        })
        .await
        .map_err(|e| StoreError::io("the flush task failed", std::io::Error::other(e)))?
        .map_err(|e| {
            StoreError::io(
                format!("could not flush the store to disk ({})", self.display),
                e,
            )
        })
    }
}

/// How to reach an Azure storage account's container, with its secret (never logged).
#[derive(Clone)]
pub struct AzureAccess {
    pub account: String,
    pub container: String,
    /// The Blob endpoint, when not `https://ACCOUNT.blob.core.windows.net` (a sovereign
    /// cloud, Azure Stack, or Azurite at `http://HOST:PORT/ACCOUNT`).
    pub endpoint: Option<String>,
    pub secret: AzureSecret,
}

/// The credential of an [`AzureAccess`].
#[derive(Clone)]
pub enum AzureSecret {
    /// The storage account key (base64).
    Key(String),
    /// A shared access signature (query string, without the leading `?`).
    Sas(String),
    /// Azurite's well-known development account (its address from AZURITE_BLOB_STORAGE_URL).
    Emulator,
}

impl std::fmt::Debug for AzureAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "AzureAccess({}/{})", self.account, self.container)
    }
}

/// Checks that `access` reaches its container: one listing, within 10 s. The error is a
/// sentence for the operator (never the secret).
pub async fn probe_azure(access: &AzureAccess) -> std::result::Result<(), String> {
    use object_store::azure::AzureConfigKey;
    let place = format!(
        "container {:?} of storage account {:?}{}",
        access.container,
        access.account,
        access
            .endpoint
            .as_ref()
            .map_or(String::new(), |e| format!(" at {e}"))
    );
    let retry = RetryConfig {
        max_retries: 1,
        retry_timeout: Duration::from_secs(5),
        ..RetryConfig::default()
    };
    let mut builder = MicrosoftAzureBuilder::new()
        .with_container_name(&access.container)
        .with_retry(retry);
    builder = match &access.secret {
        AzureSecret::Emulator => builder.with_use_emulator(true),
        AzureSecret::Key(key) => builder
            .with_account(&access.account)
            .with_access_key(key.trim()),
        AzureSecret::Sas(sas) => builder
            .with_account(&access.account)
            .with_config(AzureConfigKey::SasKey, sas.trim().trim_start_matches('?')),
    };
    if let (Some(endpoint), false) = (
        &access.endpoint,
        matches!(access.secret, AzureSecret::Emulator),
    ) {
        builder = builder
            .with_endpoint(endpoint.clone())
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let store = builder
        .build()
        .map_err(|e| format!("the settings of {place} are not usable: {e}"))?;
    let listed =
        tokio::time::timeout(Duration::from_secs(10), store.list_with_delimiter(None)).await;
    match listed {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(match crate::error::BackendFailure::of(&e) {
            crate::error::BackendFailure::Credentials => format!(
                "the storage account rejected the credentials for {place}: check the site's key or SAS (key_env or key_file)"
            ),
            crate::error::BackendFailure::NoContainer | crate::error::BackendFailure::NotFound => {
                format!("{place} does not exist: create the container, or fix its name")
            }
            _ => format!("{place} could not be listed ({e}): check the endpoint and the network"),
        }),
        Err(_) => Err(format!(
            "{place} did not answer within 10 s: check the endpoint and the network"
        )),
    }
}

mod azure {
    //! Container creation over the Blob REST API with a SharedKey signature.

    use aws_lc_rs::hmac;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use crate::error::{Result, StoreError};

    const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
    // Azurite's published development key (not a secret).
    const EMULATOR_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    const API_VERSION: &str = "2021-08-06";

    fn env(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    /// Creates `container` if it does not exist yet.
    pub async fn create_container(container: &str) -> Result<()> {
        let emulator = env("AZURE_STORAGE_USE_EMULATOR")
            .or_else(|| env("AZURE_USE_EMULATOR"))
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        // Path-style endpoints (the emulator) sign the whole URL path after the account.
        let (account, key, base) = if emulator {
            let account = env("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or(EMULATOR_ACCOUNT.into());
            let key = env("AZURE_STORAGE_ACCOUNT_KEY").unwrap_or(EMULATOR_KEY.into());
            let url = env("AZURITE_BLOB_STORAGE_URL").unwrap_or("http://127.0.0.1:10000".into());
            let base = format!("{}/{account}", url.trim_end_matches('/'));
            (account, key, base)
        } else {
            let account = env("AZURE_STORAGE_ACCOUNT_NAME").ok_or_else(|| {
                StoreError::Invalid(
                    "AZURE_STORAGE_ACCOUNT_NAME is not set: export the storage account name (and AZURE_STORAGE_ACCOUNT_KEY), or AZURE_STORAGE_USE_EMULATOR=true for Azurite".into(),
                )
            })?;
            let key = env("AZURE_STORAGE_ACCOUNT_KEY").ok_or_else(|| {
                StoreError::Invalid(format!(
                    "AZURE_STORAGE_ACCOUNT_KEY is not set: export the access key of storage account {account}"
                ))
            })?;
            let base = format!("https://{account}.blob.core.windows.net");
            (account, key, base)
        };
        let key_bytes = STANDARD.decode(key.trim()).map_err(|_| {
            StoreError::Invalid(
                "AZURE_STORAGE_ACCOUNT_KEY is not valid base64: copy the key from the storage account's access keys".into(),
            )
        })?;
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let resource = if emulator {
            format!("/{account}/{container}")
        } else {
            format!("/{container}")
        };
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{account}{resource}\nrestype:container"
        );
        let signature = STANDARD.encode(
            hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
                string_to_sign.as_bytes(),
            )
            .as_ref(),
        );
        let url = format!("{base}/{container}?restype=container");
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Invalid(format!("could not start an HTTP client: {e}")))?;
        let mut last_error = String::new();
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(250 << attempt)).await;
            }
            let response = client
                .put(&url)
                .header("x-ms-date", &date)
                .header("x-ms-version", API_VERSION)
                .header("Content-Length", "0")
                .header("Authorization", format!("SharedKey {account}:{signature}"))
                .send()
                .await;
            match response {
                Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => return Ok(()),
                Ok(r) if r.status().as_u16() == 403 => {
                    return Err(StoreError::Invalid(format!(
                        "Azure Blob at {base} rejected the credentials of account {account} (HTTP 403): check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY"
                    )));
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    return Err(StoreError::Invalid(format!(
                        "Azure Blob at {base} refused to create container {container} (HTTP {status}): {}",
                        body.chars().take(300).collect::<String>()
                    )));
                }
                Ok(r) => last_error = format!("HTTP {}", r.status()),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(StoreError::Invalid(format!(
            "could not reach Azure Blob at {base} to create container {container} after 4 attempts ({last_error}): check the endpoint (AZURITE_BLOB_STORAGE_URL for Azurite) and the network"
        )))
    }
}
