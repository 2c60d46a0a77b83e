//! Boomerang's shared vocabulary: identities, and the write-log record format.
//!
//! Apart from reading and writing log segment files, this crate does no I/O (no network, no
//! stores). Everything a protected machine writes travels through
//! Boomerang as [`log::Record`]s in segment files (see `docs/formats.md`): the agent's outbound
//! queue, the process server's cache and the master target's incoming log use the same bytes,
//! so a record is encoded once and forwarded by reference.
//!
//! Identities are newtypes ([`DiskName`], [`PointId`], [`Seq`], [`ChunkHash`]) so that a point id
//! can never be passed where a sequence number is expected.

pub mod ids;
pub mod log;
pub mod sample;

pub use ids::{ChunkHash, DiskName, InvalidName, PointId, Seq};
