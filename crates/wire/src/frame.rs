//! Frames: the unit of the replication protocol. Byte layout: `docs/protocol.md`.
//!
//! Sans-IO: [`Frame::encode`] appends bytes to a buffer and [`decode`] reads them back; both are
//! safe on untrusted input (no panic, nothing allocated beyond the announced payload, which is
//! capped before it is read).

use bytes::Bytes;

use boomerang_core::log::{FrameError as RecordError, decode_frame, verify_frame};
use boomerang_core::{DiskName, Seq};

/// The first bytes a client sends, before its first frame.
pub const MAGIC: [u8; 8] = *b"BMRGWIRE";
/// Bytes before a frame's payload: payload length (4), type (1), flags (1), reserved (2).
pub const HEADER_LEN: usize = 8;
/// The largest payload of any frame: one record of the largest size fits in a `Records` frame.
pub const MAX_PAYLOAD: usize = boomerang_core::log::MAX_FRAME_LEN + 4096;
/// The largest payload of any frame but records.
pub const MAX_CONTROL_PAYLOAD: usize = 64 * 1024;
/// The protocol versions this build speaks.
pub const MIN_VERSION: u16 = 2;
pub const MAX_VERSION: u16 = 2;
/// The most disks one stream may carry (the master target's hard limit, DESIGN 2).
pub const MAX_DISKS: usize = 60;
/// The longest peer or stream name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// The longest error message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_OPEN: u8 = 3;
const T_RESUME: u8 = 4;
const T_RECORDS: u8 = 5;
const T_ACK: u8 = 6;
const T_PING: u8 = 7;
const T_PONG: u8 = 8;
const T_ERROR: u8 = 9;
const T_BYE: u8 = 10;
const T_RECORDS_ZSTD: u8 = 11;
const T_DIGEST_REQUEST: u8 = 12;
const T_DIGEST: u8 = 13;

/// The block a digest hashes: the agent's copy block.
pub const DIGEST_BLOCK: u64 = 64 * 1024;
/// The most blocks one digest covers (1 GiB of disk, 512 KiB of hashes).
pub const MAX_DIGEST_BLOCKS: u32 = 16 * 1024;

/// Client → server, in place of an open: the hashes of a disk's replica, for blocks
/// `first_block..first_block + count` of [`DIGEST_BLOCK`] bytes, once every record of `stream`
/// up to `after` is applied to it. A process server relays it to its master target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestRequest {
    pub stream: String,
    pub disk: DiskName,
    pub after: Seq,
    pub first_block: u64,
    pub count: u32,
}

/// Server → client: the answer to a [`DigestRequest`], after which the connection ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// The records applied to the replica when it was hashed: at least the request's `after`.
    pub at: Seq,
    /// Whether the master target holds a replica of the disk at all (none: it is all zeros).
    pub replica: bool,
    /// BLAKE3 of each block from the first asked for, at most `count`; fewer when the replica
    /// ends first (a short last block is hashed as it is).
    pub hashes: Vec<[u8; 32]>,
}

/// What a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    ProcessServer,
    MasterTarget,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::ProcessServer => 2,
            Role::MasterTarget => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Role::Agent),
            2 => Some(Role::ProcessServer),
            3 => Some(Role::MasterTarget),
            _ => None,
        }
    }
}

impl Role {
    /// "an agent", "a process server", "a master target": for messages.
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Agent => "an agent",
            Role::ProcessServer => "a process server",
            Role::MasterTarget => "a master target",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process server",
            Role::MasterTarget => "master target",
        })
    }
}

/// Why a peer ends a connection: sent in an [`Frame::Error`], stable across versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// A frame broke the protocol (layout, limits, type, state).
    BadFrame,
    /// No protocol version both peers speak.
    Version,
    /// The peer's role may not connect here (an agent to a master target, say).
    Role,
    /// Records out of sequence order, or not starting where `Resume` asked.
    OutOfOrder,
    /// A record names a disk the stream did not open.
    UnknownDisk,
    /// The stream has more disks than the receiver may attach.
    TooManyDisks,
    /// More record bytes than the receiver granted.
    Credit,
    /// Another connection holds the stream.
    StreamBusy,
    /// The receiver could not persist or forward: try again later.
    Unavailable,
    /// The stream's records are of another lineage than the receiver takes (an ended one).
    Lineage,
    /// A code this build does not know (kept as sent).
    Other(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::Version => 2,
            ErrorCode::Role => 3,
            ErrorCode::OutOfOrder => 4,
            ErrorCode::UnknownDisk => 5,
            ErrorCode::TooManyDisks => 6,
            ErrorCode::Credit => 7,
            ErrorCode::StreamBusy => 8,
            ErrorCode::Unavailable => 9,
            ErrorCode::Lineage => 10,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::Version,
            3 => ErrorCode::Role,
            4 => ErrorCode::OutOfOrder,
            5 => ErrorCode::UnknownDisk,
            6 => ErrorCode::TooManyDisks,
            7 => ErrorCode::Credit,
            8 => ErrorCode::StreamBusy,
            9 => ErrorCode::Unavailable,
            10 => ErrorCode::Lineage,
            c => ErrorCode::Other(c),
        }
    }
}

/// Write-log records in transit: complete record frames, exactly as in segment files, in
/// increasing sequence order. Checked when decoded (every record's CRC and layout), and kept as
/// the bytes that arrived, so a hop forwards or persists them without re-encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Records {
    bytes: Bytes,
    first: Seq,
    last: Seq,
    count: usize,
    /// The disks the records name, each once.
    disks: Vec<DiskName>,
}

impl Records {
    /// Checks `bytes` as a run of record frames in increasing sequence order.
    pub fn new(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut at = 0;
        let mut first = None;
        let mut last: Option<Seq> = None;
        let mut count = 0;
        let mut disks: Vec<DiskName> = Vec::new();
        while at < bytes.len() {
            // Checked whole (CRC, layout, limits), and the data is not copied.
            let info =
                verify_frame(&bytes[at..]).map_err(|source| DecodeError::Record { at, source })?;
            if let Some(prev) = last
                && info.seq <= prev
            {
                return Err(DecodeError::RecordOrder {
                    seq: info.seq,
                    prev,
                });
            }
            if let Some(disk) = info.disk
                && !disks.contains(&disk)
            {
                disks.push(disk);
            }
            first.get_or_insert(info.seq);
            last = Some(info.seq);
            count += 1;
            at += info.len;
        }
        match (first, last) {
            (Some(first), Some(last)) => Ok(Records {
                bytes,
                first,
                last,
                count,
                disks,
            }),
            _ => Err(DecodeError::NoRecords),
        }
    }

    /// The disks the records name, each once.
    pub fn disks(&self) -> &[DiskName] {
        &self.disks
    }

    /// The record frames, as sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn first_seq(&self) -> Seq {
        self.first
    }

    pub fn last_seq(&self) -> Seq {
        self.last
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true: a `Records` holds at least one record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each record's sequence number and frame bytes, without decoding.
    pub fn frames(&self) -> impl Iterator<Item = (Seq, &[u8])> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let rest = self.bytes.get(at..)?;
            // Checked in `new`: the bytes are whole frames; a frame header holds the sequence
            // number at bytes 8..16.
            let len = match boomerang_core::log::check_frame(rest).ok()? {
                boomerang_core::log::FrameCheck::Complete { len } => len,
                boomerang_core::log::FrameCheck::Incomplete { .. } => return None,
            };
            let mut seq = [0u8; 8];
            seq.copy_from_slice(rest.get(8..16)?);
            at += len;
            Some((Seq(u64::from_le_bytes(seq)), &rest[..len]))
        })
    }

    /// The records, decoded (each decoding copies the record's data).
    pub fn iter(&self) -> impl Iterator<Item = boomerang_core::log::Record> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            // Checked in `new`: every frame decodes.
            let (record, len) = decode_frame(self.bytes.get(at..)?).ok()?;
            at += len;
            Some(record)
        })
    }
}

/// One frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client → server, first: who the client is and which versions it speaks.
    Hello {
        min_version: u16,
        max_version: u16,
        role: Role,
        name: String,
    },
    /// Server → client: the version chosen, and who the server is.
    Welcome {
        version: u16,
        role: Role,
        name: String,
    },
    /// Client → server: the write-log stream this connection carries, its disks, and its
    /// lineage: `lineage` names the replica the records are for (a reprotect or failback
    /// starts a new one, a higher number), and `since` is the lineage's first sequence number
    /// (nothing before it belongs to the lineage).
    Open {
        stream: String,
        disks: Vec<DiskName>,
        lineage: u64,
        since: Seq,
    },
    /// Server → client: send records from `next_seq` on (everything before it is durable
    /// here); `credit` bytes of record frames may be sent before the next grant.
    Resume {
        next_seq: Seq,
        credit: u64,
    },
    /// Client → server: records; their bytes count against the credit.
    Records(Records),
    /// Server → client: every record up to `durable` is durable here (0: none yet); `credit`
    /// more bytes may be sent.
    Ack {
        durable: Seq,
        credit: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Either way: the sender ends the connection for this reason.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Either way: the sender ends the connection cleanly.
    Bye,
    /// Client → server: records, compressed with zstd on the wire (or plain, when that is not
    /// smaller); they count against the credit by their uncompressed bytes.
    RecordsZstd(Records),
    DigestRequest(DigestRequest),
    Digest(Digest),
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "the peer did not start with the Boomerang replication magic \"BMRGWIRE\": it is not a Boomerang component, or not speaking the replication protocol on this port"
    )]
    BadMagic,
    #[error("a frame announces {len} bytes of payload, over the limit of {max} for its type")]
    TooLong { len: u64, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("a {kind} frame's payload is malformed: {why}")]
    Payload {
        kind: &'static str,
        why: &'static str,
    },
    #[error("a records frame carries no record")]
    NoRecords,
    #[error("the record at byte {at} of a records frame is invalid: {source}")]
    Record {
        at: usize,
        #[source]
        source: RecordError,
    },
    #[error(
        "record {seq} follows record {prev} in a records frame: sequence numbers must increase"
    )]
    RecordOrder { seq: Seq, prev: Seq },
}

/// The result of reading bytes that may hold a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// At least `needed` more bytes are needed.
    Incomplete { needed: usize },
    /// A frame, and how many bytes it took.
    Frame(Frame, usize),
}

/// The payload length and type a frame header announces, once the limit is checked: a reader
/// may allocate `len` bytes after this returns.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(usize, u8), DecodeError> {
    let [a, b, c, d, kind, flags, r0, r1] = *header;
    let len = u32::from_le_bytes([a, b, c, d]);
    if !(T_HELLO..=T_DIGEST).contains(&kind) {
        return Err(DecodeError::UnknownType(kind));
    }
    // Only records and digests are large: any other frame fits in a few KiB.
    let max = if kind == T_RECORDS || kind == T_RECORDS_ZSTD || kind == T_DIGEST {
        MAX_PAYLOAD
    } else {
        MAX_CONTROL_PAYLOAD
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= max)
        .ok_or(DecodeError::TooLong {
            len: u64::from(len),
            max,
        })?;
    if flags != 0 || r0 != 0 || r1 != 0 {
        return Err(DecodeError::Reserved);
    }
    Ok((len, kind))
}

/// Decodes the frame at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let (len, kind) = parse_header(header)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN + len - buf.len(),
        });
    };
    let frame = decode_payload(kind, Bytes::copy_from_slice(payload))?;
    Ok(Decoded::Frame(frame, HEADER_LEN + len))
}

/// Decodes a payload of the type `kind` (as [`parse_header`] returned it).
pub fn decode_payload(kind: u8, payload: Bytes) -> Result<Frame, DecodeError> {
    if kind == T_RECORDS {
        return Ok(Frame::Records(Records::new(payload)?));
    }
    if kind == T_RECORDS_ZSTD {
        return decode_zstd(&payload).map(Frame::RecordsZstd);
    }
    let name = kind_name(kind);
    let mut p = Reader {
        buf: &payload,
        kind: name,
    };
    let frame = match kind {
        T_HELLO => Frame::Hello {
            min_version: p.u16()?,
            max_version: p.u16()?,
            role: p.role()?,
            name: p.str8()?,
        },
        T_WELCOME => Frame::Welcome {
            version: p.u16()?,
            role: p.role()?,
            name: p.str8()?,
        },
        T_OPEN => {
            let stream = p.str8()?;
            let n = usize::from(p.u16()?);
            if n > MAX_DISKS {
                return Err(p.bad("more disks than a stream may carry"));
            }
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                let disk = DiskName::new(p.str8()?).map_err(|_| p.bad("invalid disk name"))?;
                if disks.contains(&disk) {
                    return Err(p.bad("a disk is named twice"));
                }
                disks.push(disk);
            }
            let lineage = p.u64()?;
            let since = Seq(p.u64()?);
            if since.0 == 0 {
                return Err(p.bad("a lineage starts at sequence number 1 or later"));
            }
            Frame::Open {
                stream,
                disks,
                lineage,
                since,
            }
        }
        T_RESUME => Frame::Resume {
            next_seq: Seq(p.u64()?),
            credit: p.u64()?,
        },
        T_ACK => Frame::Ack {
            durable: Seq(p.u64()?),
            credit: p.u64()?,
        },
        T_PING => Frame::Ping { nonce: p.u64()? },
        T_PONG => Frame::Pong { nonce: p.u64()? },
        T_ERROR => {
            let code = ErrorCode::from_code(p.u16()?);
            let len = usize::from(p.u16()?);
            if len > MAX_MESSAGE_LEN {
                return Err(p.bad("message too long"));
            }
            Frame::Error {
                code,
                message: p.utf8(len)?,
            }
        }
        T_BYE => Frame::Bye,
        T_DIGEST_REQUEST => {
            let stream = p.str8()?;
            let disk = DiskName::new(p.str8()?).map_err(|_| p.bad("invalid disk name"))?;
            let after = Seq(p.u64()?);
            let first_block = p.u64()?;
            let count = p.u32()?;
            if count > MAX_DIGEST_BLOCKS {
                return Err(p.bad("more blocks than one digest covers"));
            }
            Frame::DigestRequest(DigestRequest {
                stream,
                disk,
                after,
                first_block,
                count,
            })
        }
        T_DIGEST => {
            let at = Seq(p.u64()?);
            let replica = match p.u8()? {
                0 => false,
                1 => true,
                _ => return Err(p.bad("the replica flag is neither 0 nor 1")),
            };
            let n = p.u32()?;
            if n > MAX_DIGEST_BLOCKS || (!replica && n > 0) {
                return Err(p.bad("more hashes than a digest holds"));
            }
            let mut hashes = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let mut h = [0u8; 32];
                h.copy_from_slice(p.take(32)?);
                hashes.push(h);
            }
            Frame::Digest(Digest {
                at,
                replica,
                hashes,
            })
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    if !p.buf.is_empty() {
        return Err(p.bad("bytes after the last field"));
    }
    Ok(frame)
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        T_HELLO => "hello",
        T_WELCOME => "welcome",
        T_OPEN => "open",
        T_RESUME => "resume",
        T_RECORDS => "records",
        T_ACK => "ack",
        T_PING => "ping",
        T_PONG => "pong",
        T_ERROR => "error",
        T_BYE => "bye",
        T_RECORDS_ZSTD => "compressed records",
        T_DIGEST_REQUEST => "digest request",
        T_DIGEST => "digest",
        _ => "unknown",
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl Reader<'_> {
    fn bad(&self, why: &'static str) -> DecodeError {
        DecodeError::Payload {
            kind: self.kind,
            why,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad("it ends early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut le = [0u8; 8];
        le.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(le))
    }

    fn role(&mut self) -> Result<Role, DecodeError> {
        let code = self.u8()?;
        Role::from_code(code).ok_or_else(|| self.bad("unknown role"))
    }

    fn utf8(&mut self, len: usize) -> Result<String, DecodeError> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad("text is not UTF-8"))
    }

    fn str8(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        self.utf8(len)
    }
}

/// Why a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    #[error("{0} disks are more than the {MAX_DISKS} one stream may carry")]
    TooManyDisks(usize),
    #[error(
        "records of {0} bytes are more than one frame may carry ({MAX_PAYLOAD}): send fewer at once"
    )]
    TooLong(usize),
}

impl Frame {
    /// Appends the frame's header and payload to `out`. For [`Frame::Records`] prefer
    /// [`Frame::header`] and the records' bytes, which are not copied.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        let encoded = self.encode_payload(out).and_then(|kind| {
            let len = out.len() - start - HEADER_LEN;
            if len > MAX_PAYLOAD {
                return Err(EncodeError::TooLong(len));
            }
            out[start..start + HEADER_LEN].copy_from_slice(&header(len, kind));
            Ok(())
        });
        if encoded.is_err() {
            out.truncate(start);
        }
        encoded
    }

    /// Appends the payload; returns the frame type.
    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<u8, EncodeError> {
        Ok(match self {
            Frame::Hello {
                min_version,
                max_version,
                role,
                name,
            } => {
                out.extend_from_slice(&min_version.to_le_bytes());
                out.extend_from_slice(&max_version.to_le_bytes());
                out.push(role.code());
                put_str8(out, name)?;
                T_HELLO
            }
            Frame::Welcome {
                version,
                role,
                name,
            } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.push(role.code());
                put_str8(out, name)?;
                T_WELCOME
            }
            Frame::Open {
                stream,
                disks,
                lineage,
                since,
            } => {
                put_str8(out, stream)?;
                if disks.len() > MAX_DISKS {
                    return Err(EncodeError::TooManyDisks(disks.len()));
                }
                out.extend_from_slice(&(disks.len() as u16).to_le_bytes());
                for disk in disks {
                    // A DiskName is at most 64 bytes.
                    put_str8(out, disk.as_str())?;
                }
                out.extend_from_slice(&lineage.to_le_bytes());
                out.extend_from_slice(&since.0.to_le_bytes());
                T_OPEN
            }
            Frame::Resume { next_seq, credit } => {
                out.extend_from_slice(&next_seq.0.to_le_bytes());
                out.extend_from_slice(&credit.to_le_bytes());
                T_RESUME
            }
            Frame::Records(records) => {
                out.extend_from_slice(records.bytes());
                T_RECORDS
            }
            Frame::Ack { durable, credit } => {
                out.extend_from_slice(&durable.0.to_le_bytes());
                out.extend_from_slice(&credit.to_le_bytes());
                T_ACK
            }
            Frame::Ping { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes());
                T_PING
            }
            Frame::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes());
                T_PONG
            }
            Frame::Error { code, message } => {
                // Cut a long message at a character boundary rather than fail to report.
                let mut end = message.len().min(MAX_MESSAGE_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&code.code().to_le_bytes());
                out.extend_from_slice(&(end as u16).to_le_bytes());
                out.extend_from_slice(&message.as_bytes()[..end]);
                T_ERROR
            }
            Frame::Bye => T_BYE,
            Frame::DigestRequest(r) => {
                put_str8(out, &r.stream)?;
                put_str8(out, r.disk.as_str())?;
                out.extend_from_slice(&r.after.0.to_le_bytes());
                out.extend_from_slice(&r.first_block.to_le_bytes());
                out.extend_from_slice(&r.count.min(MAX_DIGEST_BLOCKS).to_le_bytes());
                T_DIGEST_REQUEST
            }
            Frame::Digest(d) => {
                if d.hashes.len() > MAX_DIGEST_BLOCKS as usize {
                    return Err(EncodeError::TooLong(d.hashes.len() * 32));
                }
                out.extend_from_slice(&d.at.0.to_le_bytes());
                out.push(u8::from(d.replica));
                out.extend_from_slice(&(d.hashes.len() as u32).to_le_bytes());
                for h in &d.hashes {
                    out.extend_from_slice(h);
                }
                T_DIGEST
            }
            Frame::RecordsZstd(records) => {
                let raw = records.bytes();
                if let Some(packed) =
                    boomerang_core::pack::compress_within(raw, raw.len().saturating_sub(4))
                {
                    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                    out.extend_from_slice(&packed);
                    T_RECORDS_ZSTD
                } else {
                    // Incompressible: sent as they are, which the receiver takes alike.
                    out.extend_from_slice(records.bytes());
                    T_RECORDS
                }
            }
        })
    }

    /// The header of a records frame carrying `records`.
    pub fn records_header(records: &Records) -> Result<[u8; HEADER_LEN], EncodeError> {
        let len = records.bytes().len();
        if len > MAX_PAYLOAD {
            return Err(EncodeError::TooLong(len));
        }
        Ok(header(len, T_RECORDS))
    }
}

/// A compressed records payload: the uncompressed length (`u32`), then one zstd frame.
fn decode_zstd(payload: &[u8]) -> Result<Records, DecodeError> {
    let bad = |why| DecodeError::Payload {
        kind: "compressed records",
        why,
    };
    let Some((len, packed)) = payload.split_first_chunk::<4>() else {
        return Err(bad("it ends early"));
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad("its uncompressed length is over the limit"));
    }
    // Decompression stops at `len` bytes: a bomb cannot make it allocate more.
    let bytes = zstd::bulk::decompress(packed, len).map_err(|_| bad("its zstd data is damaged"))?;
    if bytes.len() != len {
        return Err(bad("it decompresses to another length than it says"));
    }
    Records::new(Bytes::from(bytes))
}

fn header(len: usize, kind: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    // Checked against MAX_PAYLOAD by the callers.
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = kind;
    h
}

fn put_str8(out: &mut Vec<u8>, s: &str) -> Result<(), EncodeError> {
    let len = u8::try_from(s.len()).map_err(|_| EncodeError::NameTooLong(s.to_string()))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_limit_is_the_documented_one() {
        // docs/protocol.md: 16 MiB + 4,189 bytes, one largest record (16 MiB + 93) plus 4 KiB.
        assert_eq!(boomerang_core::log::MAX_FRAME_LEN, (16 << 20) + 93);
        assert_eq!(MAX_PAYLOAD, (16 << 20) + 4189);
    }

    #[test]
    fn digests_round_trip_and_are_checked() {
        let request = Frame::DigestRequest(DigestRequest {
            stream: "web01".into(),
            disk: DiskName::new("d0").unwrap(),
            after: Seq(41),
            first_block: 16384,
            count: MAX_DIGEST_BLOCKS,
        });
        let digest = Frame::Digest(Digest {
            at: Seq(42),
            replica: true,
            hashes: (0..MAX_DIGEST_BLOCKS).map(|i| [i as u8; 32]).collect(),
        });
        for frame in [request, digest] {
            let mut buf = Vec::new();
            frame.encode(&mut buf).unwrap();
            assert_eq!(decode(&buf).unwrap(), Decoded::Frame(frame, buf.len()));
        }
        // A digest without a replica carries no hash.
        let mut buf = Vec::new();
        Frame::Digest(Digest {
            at: Seq(1),
            replica: false,
            hashes: vec![],
        })
        .encode(&mut buf)
        .unwrap();
        buf[HEADER_LEN + 8] = 0;
        buf[HEADER_LEN + 9] = 1;
        buf.extend_from_slice(&[7; 32]);
        let len = (buf.len() - HEADER_LEN) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode(&buf),
            Err(DecodeError::Payload { kind: "digest", .. })
        ));
        // Nor more than a digest holds.
        let mut buf = Vec::new();
        Frame::DigestRequest(DigestRequest {
            stream: "web01".into(),
            disk: DiskName::new("d0").unwrap(),
            after: Seq(0),
            first_block: 0,
            count: 1,
        })
        .encode(&mut buf)
        .unwrap();
        let at = buf.len() - 4;
        buf[at..].copy_from_slice(&(MAX_DIGEST_BLOCKS + 1).to_le_bytes());
        assert!(matches!(
            decode(&buf),
            Err(DecodeError::Payload {
                kind: "digest request",
                ..
            })
        ));
    }
}
