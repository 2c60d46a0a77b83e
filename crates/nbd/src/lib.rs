//! Boomerang's NBD server: how a protected machine's disk is served, so that every write passes
//! through Boomerang (the agent's write splitter) and how recovery points are served for instant
//! recovery.
//!
//! ```text
//! listener (TCP or Unix) ─▶ connection ─▶ handshake.rs (fixed newstyle options)
//!                                      └▶ transmission.rs: reader ─┬─ small: run inline ──▶ writer
//!                                                                  └─ large/sync: blocking pool ─▶
//!                                                         (≤ 32 MiB in flight; replies by cookie)
//! ```
//!
//! Invariants:
//! - Every length from the client is capped before anything is allocated: options at 64 KiB,
//!   READ/WRITE payloads at 32 MiB. A WRITE longer than that, or a bad request magic, ends the
//!   connection (its payload cannot be skipped safely); other bad requests get the errno the
//!   protocol names (EINVAL, ENOSPC, EPERM, ...) and the connection goes on.
//! - A write is replied to only after the [`BlockDevice`] accepted it; FLUSH is handled after
//!   it arrives, so it covers every write replied to before it.
//! - One connection's failure never touches another's.

pub mod client;
pub mod device;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

pub use device::{BlockDevice, Extent, FileDevice, MemDevice};
pub use server::{Export, Server};
