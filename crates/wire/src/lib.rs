//! The replication protocol between Boomerang's agent, process server and master target:
//! framed, versioned, length-capped messages that carry write-log records with their sequence
//! numbers, acknowledgements of what is durable downstream, resume after any disconnect, and
//! credit-based flow control. Byte layout and rules: `docs/protocol.md`.
//!
//! ```text
//! client (agent or process server)             server (process server or master target)
//!   "BMRGWIRE" Hello{versions, role, name} ──▶
//!                                          ◀── Welcome{version, role, name} | Error
//!   Open{stream, disks}                    ──▶
//!                                          ◀── Resume{next_seq, credit} | Error
//!   Records{frames from next_seq on}       ──▶   (within credit, contiguous)
//!                                          ◀── Ack{durable, credit}
//!   ...                                          Ping/Pong either way; Error or Bye ends it
//! ```
//!
//! Layers: [`frame`] encodes and decodes (sans-IO, fuzzed), [`io`] moves frames over any
//! async byte stream, [`handshake`] opens a connection, [`stream`] holds the rules of a
//! record stream for each end. [`pki`] is the site's certificate authority and [`tls`] the
//! mutual TLS every connection runs in.

pub mod cache;
pub mod digest;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod io;
pub mod pki;
pub mod receive;
pub mod send;
pub mod stream;
pub mod tls;

pub use frame::{
    DIGEST_BLOCK, DecodeError, Decoded, Digest, DigestRequest, EncodeError, ErrorCode, Frame,
    MAX_DIGEST_BLOCKS, MAX_DISKS, MAX_PAYLOAD, Records, Role, decode,
};
pub use handshake::{Peer, Vouch, accept, connect};
pub use io::{FrameReader, FrameWriter, WireError};
pub use stream::{Inbound, Outbound, Violation};
