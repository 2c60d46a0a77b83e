//! The master target: takes write-log streams from process servers (`boomerang_wire::receive`,
//! records durable in its incoming log before they are acknowledged), applies each stream to
//! replica images of its disks on the retention volume, and at every consistency mark commits
//! the disks that changed into the stream's replica store as a recovery point.
//!
//! ```text
//! process server ──TLS──▶ receiver ─▶ RETENTION/incoming/<stream>/seg-*.log ─▶ Ack
//!                                 └─ on durable ─▶ applier (a thread per stream):
//!        LogTail ─▶ Resize / Write / Zero / Trim ─▶ RETENTION/replicas/<stream>/<disk>.img
//!                └▶ Mark ─▶ fdatasync images ─▶ Store::commit_blocks(changed blocks)
//!                         ─▶ RETENTION/replicas/<stream>/applied = the mark's sequence number
//! ```
//!
//! A recovery point is exactly the disk at its mark: records are applied in log order and the
//! point is committed before any record after the mark is applied. After a crash the applier
//! starts again after the last committed mark; the records after it are applied again (in
//! order, so harmlessly) from the incoming log.

mod apply;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use boomerang_core::{DiskName, Seq};
use boomerang_wire::receive::{Config as ReceiverConfig, Receiver, ServeError};
use boomerang_wire::tls::TlsIdentity;
use boomerang_wire::{MAX_DISKS, Records, Role};
use tokio::sync::watch;

pub use apply::{ApplyError, replica_store};

/// A master target's settings.
pub struct Config {
    pub name: String,
    pub tls: TlsIdentity,
    /// The retention volume: incoming logs, replica images and (by default) replica stores.
    pub retention: PathBuf,
    /// The most disks it attaches, at most [`MAX_DISKS`].
    pub max_disks: usize,
    /// Block size of new replica stores.
    pub block_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "a master target attaches at most {MAX_DISKS} disks; {0} is over that: protect the other machines with a separate master target"
    )]
    TooManyDisks(usize),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Builds the master target's receiver; its appliers start as streams arrive.
pub fn receiver(config: Config) -> Result<Arc<Receiver>, StartError> {
    if config.max_disks > MAX_DISKS {
        return Err(StartError::TooManyDisks(config.max_disks));
    }
    let appliers: Arc<Mutex<HashMap<String, watch::Sender<Seq>>>> = Arc::default();
    let retention = config.retention.clone();
    let block_size = config.block_size;
    let on_durable = Arc::new(
        move |stream: &str, _disks: &[DiskName], records: &Records| {
            let seq = records.last_seq();
            let mut all = appliers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = all.get(stream) {
                let _ = tx.send(seq);
                return;
            }
            let (tx, rx) = watch::channel(seq);
            apply::spawn(retention.clone(), stream.to_string(), block_size, rx);
            all.insert(stream.to_string(), tx);
        },
    );
    Ok(Receiver::new(ReceiverConfig {
        name: config.name,
        role: Role::MasterTarget,
        accepted: vec![Role::ProcessServer],
        own_stream_only: false,
        max_disks: config.max_disks,
        tls: config.tls,
        cache: config.retention.join("incoming"),
        on_durable: Some(on_durable),
    })?)
}
