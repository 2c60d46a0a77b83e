//! The process server: takes agents' write-log streams over mutual TLS and persists each record
//! in its cache (the write-log segment format, bytes as received) before acknowledging it
//! (`boomerang_wire::receive`). Forwarding to a master target, compression, rate limits and
//! metrics build on this.

use std::path::PathBuf;
use std::sync::Arc;

use boomerang_wire::Role;
use boomerang_wire::receive::{Config as ReceiverConfig, Receiver, ServeError};
use boomerang_wire::tls::TlsIdentity;

pub use boomerang_wire::receive::CREDIT;

/// A process server's settings.
pub struct Config {
    pub name: String,
    pub tls: TlsIdentity,
    pub cache: PathBuf,
}

/// A process server: a receiver that takes agents, each streaming its own machine's log.
pub fn receiver(config: Config) -> Result<Arc<Receiver>, ServeError> {
    Receiver::new(ReceiverConfig {
        name: config.name,
        role: Role::ProcessServer,
        accepted: vec![Role::Agent],
        own_stream_only: true,
        // A process server holds logs only; the attach limit is the master target's.
        max_disks: usize::MAX,
        tls: config.tls,
        cache: config.cache,
        on_durable: None,
    })
}
