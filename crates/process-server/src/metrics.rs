//! What the process server measures, per stream, for `/metrics` (Prometheus text format,
//! served by `boomerang_wire::http`):
//!
//! - `boomerang_received_seq`: the last record durable in the cache;
//! - `boomerang_forwarded_seq`: the last record the master target holds durable;
//! - `boomerang_received_bytes_total`: record bytes received (throughput is its rate);
//! - `boomerang_backlog_records`: records received but not yet at the master target;
//! - `boomerang_backlog_bytes`: their bytes (of those received since the process server
//!   started);
//! - `boomerang_lag_seconds`: how long the oldest of those has waited (0 when none): the
//!   replication lag this hop adds.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use boomerang_core::Seq;

#[derive(Default)]
struct Stream {
    received: u64,
    forwarded: u64,
    bytes: u64,
    /// When each batch arrived: its last sequence number, the instant and its bytes.
    waiting: VecDeque<(u64, Instant, u64)>,
    /// The bytes of the batches waiting.
    backlog: u64,
}

/// A metric family: name, type, help and how to read it from a stream.
type Family = (&'static str, &'static str, &'static str, fn(&Stream) -> f64);

/// Per-stream counters, shared by the receiver, the senders and the HTTP endpoint.
#[derive(Default)]
pub struct Metrics {
    streams: Mutex<BTreeMap<String, Stream>>,
}

impl Metrics {
    fn with<R>(&self, stream: &str, f: impl FnOnce(&mut Stream) -> R) -> R {
        let mut all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(stream.to_string()).or_default())
    }

    /// Records up to `last`, of `bytes` bytes, are durable in the cache.
    pub fn received(&self, stream: &str, last: Seq, bytes: u64) {
        self.with(stream, |s| {
            s.received = s.received.max(last.0);
            s.bytes += bytes;
            s.backlog += bytes;
            s.waiting.push_back((last.0, Instant::now(), bytes));
        });
    }

    /// The master target holds records up to `durable`.
    pub fn forwarded(&self, stream: &str, durable: Seq) {
        self.with(stream, |s| {
            s.forwarded = s.forwarded.max(durable.0);
            while let Some(&(seq, _, bytes)) = s.waiting.front()
                && seq <= s.forwarded
            {
                s.backlog -= bytes;
                s.waiting.pop_front();
            }
        });
    }

    /// The Prometheus text exposition of every stream.
    pub fn render(&self) -> String {
        let all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let families: [Family; 6] = [
            (
                "boomerang_received_seq",
                "gauge",
                "Last record durable in the process server's cache.",
                |s| s.received as f64,
            ),
            (
                "boomerang_forwarded_seq",
                "gauge",
                "Last record the master target holds durable.",
                |s| s.forwarded as f64,
            ),
            (
                "boomerang_received_bytes_total",
                "counter",
                "Record bytes received from the agent.",
                |s| s.bytes as f64,
            ),
            (
                "boomerang_backlog_records",
                "gauge",
                "Records received and not yet at the master target.",
                |s| s.received.saturating_sub(s.forwarded) as f64,
            ),
            (
                "boomerang_backlog_bytes",
                "gauge",
                "Bytes of those records (received since the process server started).",
                |s| s.backlog as f64,
            ),
            (
                "boomerang_lag_seconds",
                "gauge",
                "How long the oldest record not yet at the master target has waited here.",
                |s| {
                    s.waiting
                        .front()
                        .map_or(0.0, |(_, at, _)| at.elapsed().as_secs_f64())
                },
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (stream, s) in all.iter() {
                let _ = writeln!(out, "{name}{{stream=\"{stream}\"}} {}", value(s));
            }
        }
        out
    }
}
