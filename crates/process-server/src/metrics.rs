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
//!   replication lag this hop adds;
//! - `boomerang_rpo_now_seconds`: the time since the agent made the last consistency mark that
//!   the master target holds durable (NaN before the first): what a failover now would lose
//!   at most. Marks are made every few seconds, so it grows when replication stalls anywhere
//!   between the agent and the master target.

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
    /// Marks received, not yet durable at the master target: sequence number and creation
    /// time (nanoseconds since 1970). The oldest go first past [`MAX_PENDING_MARKS`]: the
    /// marks after them are reported durable only once they are.
    marks: VecDeque<(u64, u64)>,
    /// The last mark durable at the master target.
    last_mark: Option<(u64, u64)>,
}

/// The most marks a stream keeps waiting for the master target.
const MAX_PENDING_MARKS: usize = 65536;

/// What a stream's report says (for the configuration server's heartbeats).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamReport {
    /// The machine, whose write log the stream carries.
    pub stream: String,
    pub backlog_bytes: u64,
    pub lag: std::time::Duration,
    /// The last mark durable at the master target: sequence number, creation time at the
    /// agent (nanoseconds since 1970).
    pub last_mark: Option<(u64, u64)>,
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

    /// Takes the marks of records durable in the cache.
    pub fn marks(&self, stream: &str, records: &boomerang_wire::Records) {
        let marks: Vec<(u64, u64)> = records
            .frames()
            .filter_map(|(_, frame)| boomerang_core::log::mark_of(frame))
            .map(|(seq, _, _, time)| (seq.0, time.0))
            .collect();
        if marks.is_empty() {
            return;
        }
        self.with(stream, |s| {
            for mark in marks {
                if s.marks.len() == MAX_PENDING_MARKS {
                    s.marks.pop_front();
                }
                s.marks.push_back(mark);
            }
        });
    }

    /// The stream's records were dropped for a newer lineage, or for the same one starting
    /// again at `since`: what was received, forwarded or waiting of the old records says
    /// nothing about the new ones. The byte counter goes on.
    pub fn reset(&self, stream: &str, since: Seq) {
        self.with(stream, |s| {
            // Nothing before `since` is owed: the backlog starts empty, however high `since`.
            let before = since.0.saturating_sub(1);
            *s = Stream {
                bytes: s.bytes,
                received: before,
                forwarded: before,
                ..Stream::default()
            };
        });
    }

    /// The master target holds records up to `durable`.
    pub fn forwarded(&self, stream: &str, durable: Seq) {
        self.with(stream, |s| {
            s.forwarded = s.forwarded.max(durable.0);
            while let Some(&(seq, time)) = s.marks.front()
                && seq <= s.forwarded
            {
                s.last_mark = Some((seq, time));
                s.marks.pop_front();
            }
            while let Some(&(seq, _, bytes)) = s.waiting.front()
                && seq <= s.forwarded
            {
                s.backlog -= bytes;
                s.waiting.pop_front();
            }
        });
    }

    /// Every stream's backlog, lag and last durable mark.
    pub fn report(&self) -> Vec<StreamReport> {
        let all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .map(|(stream, s)| StreamReport {
                stream: stream.clone(),
                backlog_bytes: s.backlog,
                lag: lag(s),
                last_mark: s.last_mark,
            })
            .collect()
    }

    /// The Prometheus text exposition of every stream.
    pub fn render(&self) -> String {
        let all = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let families: [Family; 7] = [
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
                |s| lag(s).as_secs_f64(),
            ),
            (
                "boomerang_rpo_now_seconds",
                "gauge",
                "Seconds since the agent made the last mark the master target holds durable.",
                |s| {
                    s.last_mark.map_or(f64::NAN, |(_, made)| {
                        boomerang_core::log::UnixNanos::now().0.saturating_sub(made) as f64 / 1e9
                    })
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

/// How long the oldest record not yet at the master target has waited.
fn lag(s: &Stream) -> std::time::Duration {
    s.waiting
        .front()
        .map_or(std::time::Duration::ZERO, |(_, at, _)| at.elapsed())
}
