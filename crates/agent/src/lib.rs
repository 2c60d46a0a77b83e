//! The mobility agent: it serves each protected disk over NBD and records every write, zero and
//! trim in its write log before the client gets the acknowledgement, so the log replayed onto
//! the disk's starting image gives the disk exactly as it was at any mark.
//!
//! ```text
//! NBD client ─▶ boomerang-nbd ─▶ CaptureDevice::write_at ─┬─▶ LogDir::append (segment files)
//!                               (log lock, then the turn  └─▶ disk image
//!                                of its ticket: log order
//!                                = disk order)
//! timers, `agent mark` (control.rs) ─▶ marks.rs ─▶ LogDir::append(Mark{crash|app})
//!                                                 (app: between the freeze and thaw hooks)
//! replay.rs: log + base image ─▶ the disk as it was at a mark
//! ```
//!
//! Invariants:
//! - The log and the disk see writes in the same order: a change is logged under the log lock
//!   and takes a ticket there, and reaches the disk in ticket order (order.rs), so overlapping
//!   writes in flight cannot land in different orders. A change is in the log before it is on
//!   the disk; after a crash of the agent, the changes of the newest segment are applied to the
//!   disk again (a segment rolls over only once every change in it is on the disk).
//! - FUA and FLUSH make the log durable before the disk, and both before the reply.
//! - The log directory has one writer: `LogDir::open` takes an exclusive lock on it.

pub mod bitmap;
pub mod capture;
pub mod control;
pub mod logdir;
pub mod marks;
pub mod order;
pub mod replay;
pub mod replica;
pub mod sync;

pub use capture::CaptureDevice;
pub use logdir::{LogDir, LogDirError};
pub use marks::{Hooks, MarkOutcome};
pub use replay::{ReplayReport, ReplayTo, replay};
