//! Digests: the hashes of a replica's blocks, asked for by an agent before it copies a disk,
//! so that only the blocks the replica lacks travel (DESIGN 3.1, "scan").
//!
//! ```text
//! agent ── DigestRequest ──▶ process server ── DigestRequest ──▶ master target
//!       ◀───── Digest ──────                ◀───── Digest ──────  (hashes its replica image
//!                                                                  once `after` is applied)
//! ```
//!
//! A digest is a snapshot of the replica after record `after` and maybe some later ones; the
//! agent keeps it sound by never trusting it for a block that any record after `after` touched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{self, DialError, TlsIdentity};
use crate::{Digest, DigestRequest, Frame, Role, WireError};

/// How long a digest may take end to end: waiting for the master target to apply the
/// records before `after`, and hashing up to [`crate::MAX_DIGEST_BLOCKS`] blocks.
pub const DIGEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A digest on its way, or why there is none.
pub type DigestFuture = Pin<Box<dyn Future<Output = Result<Digest, String>> + Send>>;

/// A receiver's answer to digest requests (the master target's, or a process server's relay).
pub type OnDigest = Arc<dyn Fn(DigestRequest) -> DigestFuture + Send + Sync>;

/// Why a digest could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("no digest from {addr} within {DIGEST_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{addr} answered a digest request with {got}")]
    Unexpected { addr: String, got: String },
}

/// Asks the `to` at `addr` for a digest, as `name` in `role`, on a connection of its own.
pub async fn query(
    identity: &TlsIdentity,
    addr: &str,
    role: Role,
    name: &str,
    to: Role,
    request: DigestRequest,
) -> Result<Digest, DigestError> {
    let asked = async {
        let (mut rd, mut wr, _) = tls::dial(identity, addr, role, name, to).await?;
        wr.send(&Frame::DigestRequest(request)).await?;
        match rd.read().await? {
            Frame::Digest(d) => Ok(d),
            Frame::Error { code, message } => Err(WireError::Refused { code, message }.into()),
            other => Err(DigestError::Unexpected {
                addr: addr.to_string(),
                got: format!("{other:?}"),
            }),
        }
    };
    tokio::time::timeout(DIGEST_TIMEOUT, asked)
        .await
        .map_err(|_| DigestError::Timeout {
            addr: addr.to_string(),
        })?
}
