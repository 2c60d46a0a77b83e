//! The mobility agent: it serves each protected disk over NBD and records every write, zero and
//! trim in its write log before the client gets the acknowledgement, so the log replayed onto
//! the disk's starting image gives the disk exactly as it was at any mark.
//!
//! ```text
//! NBD client ─▶ boomerang-nbd ─▶ CaptureDevice::write_at ─┬─▶ LogDir::append (segment files)
//!                                   (one lock: log order  └─▶ disk image
//!                                    = disk order)
//! timers, `agent mark` (control.rs) ─▶ marks.rs ─▶ LogDir::append(Mark{crash|app})
//!                                                 (app: between the freeze and thaw hooks)
//! replay.rs: log + base image ─▶ the disk as it was at a mark
//! ```
//!
//! Invariants:
//! - The log and the disk see writes in the same order: one lock covers the log append and the
//!   disk write, so overlapping writes in flight cannot land in different orders.
//! - FUA and FLUSH make the log durable before the disk, and both before the reply.
//! - The log directory has one writer: `LogDir::open` takes an exclusive lock on it.

pub mod bitmap;
pub mod capture;
pub mod control;
pub mod logdir;
pub mod marks;
pub mod replay;

pub use capture::CaptureDevice;
pub use logdir::{LogDir, LogDirError};
pub use marks::{Hooks, MarkOutcome};
pub use replay::{ReplayReport, ReplayTo, replay};
