//! The process server: takes agents' write-log streams over mutual TLS and persists each record
//! in its cache (the write-log segment format, bytes as received) before acknowledging it
//! (`boomerang_wire::receive`), and forwards each stream to its master target
//! (`boomerang_wire::send`), dropping cache segments once the master target holds them.
//!
//! ```text
//! agent ──▶ receiver ─▶ CACHE/<machine>/seg-*.log ─▶ Ack
//!                    └─ on durable ─▶ metrics; sender per machine ──▶ master target
//!                                     (drops cache segments the master target acknowledged)
//! ```

pub mod metrics;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use boomerang_core::{DiskName, Seq};
use boomerang_wire::digest;
use boomerang_wire::{DigestRequest, Records, Role};

use crate::metrics::Metrics;
use boomerang_wire::receive::{Config as ReceiverConfig, Receiver, ServeError};
use boomerang_wire::send::{self, ShipConfig, Source};
use boomerang_wire::tls::TlsIdentity;

pub use boomerang_wire::receive::CREDIT;

/// A process server's settings.
pub struct Config {
    pub name: String,
    pub tls: TlsIdentity,
    pub cache: PathBuf,
    /// The master target to forward every stream to (`host:port`); none keeps the cache only.
    pub master_target: Option<String>,
    /// At most this many bytes per second toward the master target, per machine.
    pub max_rate: Option<u64>,
    /// The most bytes of a cache segment: forwarded records leave the cache a segment at a
    /// time, so the cache volume must hold a few.
    pub cache_segment: u64,
}

/// A process server: a receiver that takes agents, each streaming its own machine's log, and
/// forwards what it holds; and the metrics it keeps.
pub fn receiver(config: Config) -> Result<(Arc<Receiver>, Arc<Metrics>), ServeError> {
    let metrics = Arc::new(Metrics::default());
    let started: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (tls, name, cache) = (
        config.tls.clone(),
        config.name.clone(),
        config.cache.clone(),
    );
    let master_target = config.master_target.clone();
    let max_rate = config.max_rate;
    // Senders run as long as the process server does.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let reset = metrics.clone();
    let seen = metrics.clone();
    let on_durable = Arc::new(move |stream: &str, _: &[DiskName], records: &Records| {
        seen.marks(stream, records);
        seen.received(stream, records.last_seq(), records.bytes().len() as u64);
    }) as boomerang_wire::receive::OnDurable;
    // A stream's sender starts when the stream opens, before its first record: a cache full
    // of records not yet forwarded must be able to drain before it takes any more.
    let seen = metrics.clone();
    let on_open = Arc::new(move |stream: &str, disks: &[DiskName]| {
        let _keep = &stop;
        let Some(addr) = &master_target else {
            return;
        };
        let mut all = started.lock().unwrap_or_else(|e| e.into_inner());
        if !all.insert(stream.to_string()) {
            return;
        }
        let source = Arc::new(Cached {
            dir: cache.join(stream),
            stream: stream.to_string(),
            metrics: seen.clone(),
        });
        let config = ShipConfig {
            addr: addr.clone(),
            tls: tls.clone(),
            name: name.clone(),
            role: Role::ProcessServer,
            to: Role::MasterTarget,
            stream: stream.to_string(),
            // On the way out to the other site: compressed.
            compress: true,
            max_rate,
            disks: disks.to_vec(),
        };
        tokio::spawn(send::ship(source, config, stopped.clone()));
    }) as boomerang_wire::receive::OnOpen;
    // Digests come from the master target, which holds the replicas.
    let relay = config.master_target.clone().map(|addr| {
        let (tls, name) = (config.tls.clone(), config.name.clone());
        Arc::new(move |request: DigestRequest| {
            let (tls, name, addr) = (tls.clone(), name.clone(), addr.clone());
            Box::pin(async move {
                digest::query(
                    &tls,
                    &addr,
                    Role::ProcessServer,
                    &name,
                    Role::MasterTarget,
                    request,
                )
                .await
                .map_err(|e| boomerang_core::chain(&e))
            }) as digest::DigestFuture
        }) as digest::OnDigest
    });
    let receiver = Receiver::new(ReceiverConfig {
        name: config.name,
        role: Role::ProcessServer,
        accepted: vec![Role::Agent],
        own_stream_only: true,
        // A process server holds logs only; the attach limit is the master target's.
        max_disks: usize::MAX,
        tls: config.tls,
        cache: config.cache,
        segment_len: config.cache_segment,
        on_durable: Some(on_durable),
        on_open: Some(on_open),
        // A newer lineage from the agent replaces what the cache holds; an older is refused.
        on_lineage: None,
        on_reset: Some(Arc::new(
            move |stream: &str, lineage: boomerang_wire::cache::Lineage| {
                reset.reset(stream, lineage.since)
            },
        )),
        on_digest: relay,
    })?;
    Ok((receiver, metrics))
}

/// One stream's cache, as the sender to the master target reads it.
struct Cached {
    dir: PathBuf,
    stream: String,
    metrics: Arc<Metrics>,
}

impl Source for Cached {
    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Records are synced here before they are acknowledged, so the master target can never
    /// hold more than the cache did: no divergence to detect.
    fn next_seq(&self) -> Result<Seq, String> {
        Ok(Seq(u64::MAX))
    }

    fn lineage(&self) -> Result<boomerang_wire::cache::Lineage, String> {
        boomerang_wire::cache::Lineage::read(&self.dir).map_err(|e| e.to_string())
    }

    fn release_through(
        &self,
        lineage: boomerang_wire::cache::Lineage,
        durable: Seq,
    ) -> Result<(), String> {
        // A late ack of an ended lineage says nothing about the records held now.
        if boomerang_wire::cache::Lineage::read(&self.dir).ok() != Some(lineage) {
            return Ok(());
        }
        self.metrics.forwarded(&self.stream, durable);
        boomerang_wire::cache::release_lineage_through(&self.dir, lineage, durable)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "could not drop forwarded segments in {}: {e}",
                    self.dir.display()
                )
            })
    }
}
