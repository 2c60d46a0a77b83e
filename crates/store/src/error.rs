//! The store's one public error type.

use boomerang_core::{DiskName, PointId};

/// What went wrong in a replica store, with enough context to name the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No store at the location.
    #[error("no Boomerang store at {location}: create it with `boomerang store init {location}`")]
    Missing { location: String },

    /// `init` on a location that already holds a store.
    #[error(
        "a Boomerang store already exists at {location}: use it as it is, or choose another location"
    )]
    AlreadyExists { location: String },

    /// Input from the user that cannot be used.
    #[error("{0}")]
    Invalid(String),

    /// A disk or point that does not exist.
    #[error("{0}")]
    NotFound(String),

    /// Data that fails its checks: the message names disk, point, offset and object.
    #[error("{0}")]
    Corrupt(String),

    /// Another writer got there first (a concurrent commit, a running GC).
    #[error("{0}")]
    Conflict(String),

    /// The backend refused or failed a request.
    #[error("{context}")]
    Backend {
        context: String,
        retryable: bool,
        #[source]
        source: object_store::Error,
    },

    /// The caller stopped a commit before it wrote its point (see [`crate::Progress::stopped`]):
    /// nothing of it is a point, and the objects it wrote are collected as garbage.
    #[error(
        "the commit of disk {disk} was stopped before it wrote its point; the store is as it was"
    )]
    Interrupted { disk: DiskName },

    /// A local file could not be read or written.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Backend { retryable, .. } => *retryable,
            StoreError::Conflict(_) => true,
            _ => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a backend error with a sentence that says which object and what to do.
    pub(crate) fn backend(what: impl std::fmt::Display, source: object_store::Error) -> Self {
        let (hint, retryable) = match BackendFailure::of(&source) {
            BackendFailure::Credentials => (
                "the backend rejected the credentials: check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or the store's permissions)",
                false,
            ),
            BackendFailure::NotFound => ("the object does not exist", false),
            BackendFailure::NoContainer => (
                "the container does not exist: create the store with `boomerang store init`",
                false,
            ),
            BackendFailure::Unreachable => (
                "the backend could not be reached or failed after retries: check the endpoint and network, then retry",
                true,
            ),
            BackendFailure::Other => ("the backend failed the request", true),
        };
        StoreError::Backend {
            context: format!("{what}: {hint}"),
            retryable,
            source,
        }
    }
}

/// What a backend error means for the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendFailure {
    /// The credentials were refused.
    Credentials,
    /// The object does not exist.
    NotFound,
    /// The container does not exist.
    NoContainer,
    /// No answer, or failures after retries.
    Unreachable,
    Other,
}

impl BackendFailure {
    pub fn of(error: &object_store::Error) -> BackendFailure {
        use object_store::Error as E;
        match error {
            E::Unauthenticated { .. } | E::PermissionDenied { .. } => BackendFailure::Credentials,
            E::NotFound { .. } => BackendFailure::NotFound,
            E::Generic { source, .. } => {
                let mut text = source.to_string();
                let mut cause = source.source();
                while let Some(c) = cause {
                    text.push_str(&c.to_string());
                    cause = c.source();
                }
                // By the status the service answered (the text also holds the request's
                // URL, where "403" may be part of an object's name).
                if text.contains("status code: 403")
                    || text.contains("status code: 401")
                    || text.contains("403 Forbidden")
                    || text.contains("AuthenticationFailed")
                    || text.contains("AuthorizationFailure")
                {
                    BackendFailure::Credentials
                } else if text.contains("ContainerNotFound") {
                    BackendFailure::NoContainer
                } else {
                    BackendFailure::Unreachable
                }
            }
            _ => BackendFailure::Other,
        }
    }
}

/// Where a bad block or node sits, for error messages.
pub(crate) fn place(disk: &DiskName, point: PointId, offset: u64) -> String {
    format!("disk {disk}, point {point}, offset {offset}")
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
