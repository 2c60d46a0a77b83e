//! Synchronous replication (`agent --sync`): a write is acknowledged only once the process
//! server holds its log records durable, RPO zero like DRBD's protocol C. When the process
//! server does not confirm in time, the agent follows the configured choice: fail the write,
//! or go on asynchronously with an alert until the process server has caught up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use boomerang_core::Seq;

/// What to do when the process server does not confirm a write in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The write fails (EIO to the machine): nothing is acknowledged that the other site
    /// lacks, at the cost of availability.
    Fail,
    /// The write is acknowledged and replication goes on asynchronously, with an RPO alert,
    /// until the process server has caught up.
    Async,
}

impl std::str::FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(Fallback::Fail),
            "async" => Ok(Fallback::Async),
            _ => Err(format!("{s:?} is not a fallback: use fail or async")),
        }
    }
}

/// What the downstream has confirmed, shared by the sender (which records acks) and the
/// writers (which wait for them).
pub struct SyncLink {
    acked: Mutex<Seq>,
    moved: Condvar,
    /// Tells the sender that records wait to go.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
    timeout: Duration,
    fallback: Fallback,
    /// Gone asynchronous after a timeout, until the downstream catches up.
    degraded: AtomicBool,
    /// The highest record a writer waited for.
    wanted: AtomicU64,
    /// Records below this one were dropped from the log before the downstream had them: an
    /// ack never confirms them.
    lost_below: AtomicU64,
}

impl SyncLink {
    pub fn new(timeout: Duration, fallback: Fallback) -> Self {
        SyncLink {
            acked: Mutex::new(Seq(0)),
            moved: Condvar::new(),
            wake: Default::default(),
            timeout,
            fallback,
            degraded: AtomicBool::new(false),
            wanted: AtomicU64::new(0),
            lost_below: AtomicU64::new(0),
        }
    }

    /// The downstream holds every record up to `durable`.
    pub fn acked(&self, durable: Seq) {
        let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        if durable > *acked {
            *acked = durable;
        }
        if self.degraded.load(Ordering::Relaxed) && acked.0 >= self.wanted.load(Ordering::Relaxed) {
            self.degraded.store(false, Ordering::Relaxed);
            tracing::warn!(seq = %durable, "the process server caught up: writes are synchronous again");
        }
        drop(acked);
        self.moved.notify_all();
    }

    /// The records below `seq` were dropped from the log (see `LogDir::continue_after_crash`):
    /// writers waiting for them stop waiting and take the fallback.
    pub fn lost_below(&self, seq: Seq) {
        self.lost_below.fetch_max(seq.0, Ordering::Relaxed);
        // Under the lock, so that no waiter misses the wake-up between its check and its wait.
        drop(self.acked.lock().unwrap_or_else(|e| e.into_inner()));
        self.moved.notify_all();
    }

    /// Waits until the downstream holds `seq`; on timeout, fails or goes asynchronous.
    pub fn wait(&self, seq: Seq) -> std::io::Result<()> {
        self.wanted.fetch_max(seq.0, Ordering::Relaxed);
        self.wake.notify_one();
        if self.degraded.load(Ordering::Relaxed) {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let lost = |seq: Seq| seq.0 < self.lost_below.load(Ordering::Relaxed);
        while *acked < seq && !lost(seq) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            acked = self
                .moved
                .wait_timeout(acked, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if *acked >= seq && !lost(seq) {
            return Ok(());
        }
        drop(acked);
        match self.fallback {
            Fallback::Fail => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the process server did not confirm record {seq} within {:?}: the write fails (--sync-fallback fail)",
                    self.timeout
                ),
            )),
            Fallback::Async => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(seq = %seq, timeout = ?self.timeout, "the process server did not confirm in time: writes go on asynchronously until it catches up (RPO alert)");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_wait_for_acks_and_follow_the_fallback_on_timeout() {
        let link = std::sync::Arc::new(SyncLink::new(Duration::from_millis(100), Fallback::Async));
        // Confirmed from another thread while waiting.
        let l = link.clone();
        let acker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l.acked(Seq(5));
        });
        link.wait(Seq(5)).unwrap();
        acker.join().unwrap();
        // Not confirmed: asynchronous from then on, at once, until the downstream catches up.
        link.wait(Seq(9)).unwrap();
        let started = Instant::now();
        link.wait(Seq(10)).unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "no waiting while degraded"
        );
        link.acked(Seq(10));
        let started = Instant::now();
        link.wait(Seq(11)).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "synchronous again"
        );

        let strict = SyncLink::new(Duration::from_millis(20), Fallback::Fail);
        let err = strict.wait(Seq(1)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("--sync-fallback fail"));
    }

    #[test]
    fn an_ack_never_confirms_a_record_the_log_dropped() {
        // A long timeout: the wait ends because the record was dropped, not by the clock.
        let link = std::sync::Arc::new(SyncLink::new(Duration::from_secs(600), Fallback::Fail));
        let l = link.clone();
        let waiter = std::thread::spawn(move || l.wait(Seq(5)));
        std::thread::sleep(Duration::from_millis(20));
        link.lost_below(Seq(8));
        link.acked(Seq(9));
        assert!(waiter.join().unwrap().is_err(), "record 5 was dropped");
        assert!(link.wait(Seq(7)).is_err(), "nor later");
        link.wait(Seq(9)).unwrap();
    }
}
