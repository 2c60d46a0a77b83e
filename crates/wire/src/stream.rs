//! The rules of a write-log stream, for both ends, without I/O.
//!
//! A receiver says where the stream resumes ([`Frame::Resume`]: the next sequence number it
//! wants, everything before being durable there) and how many bytes of records it will take
//! (credit). The sender sends records from exactly that sequence number on, contiguously, never
//! past its credit. The receiver acknowledges what it has made durable and grants more credit
//! as it frees room. After any disconnect, the next connection resumes from the receiver's
//! durable sequence: records sent but not acknowledged are sent again, and nothing is skipped.
//!
//! [`Frame::Resume`]: crate::Frame::Resume

use boomerang_core::{DiskName, Seq};

use crate::frame::{ErrorCode, Records};

/// A stream violation, with the code and sentence to send before hanging up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    pub code: ErrorCode,
    pub message: String,
}

/// The receiving end of one stream.
#[derive(Clone, Debug)]
pub struct Inbound {
    disks: Vec<DiskName>,
    next: Seq,
    credit: u64,
}

impl Inbound {
    /// A stream of `disks` whose records up to `next - 1` are durable here; `credit` bytes may
    /// arrive before the first grant.
    pub fn new(disks: Vec<DiskName>, next: Seq, credit: u64) -> Self {
        Inbound {
            disks,
            next,
            credit,
        }
    }

    /// The sequence number the next record must have.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// The stream's disks.
    pub fn disks(&self) -> &[DiskName] {
        &self.disks
    }

    /// Bytes the sender may still send.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Checks arriving records against the stream: within credit, starting at the next
    /// sequence number, contiguous, and naming only the stream's disks. Accepted records move
    /// the stream on; rejected ones change nothing.
    pub fn accept(&mut self, records: &Records) -> Result<(), Violation> {
        let len = records.bytes().len() as u64;
        if len > self.credit {
            return Err(Violation {
                code: ErrorCode::Credit,
                message: format!(
                    "{len} bytes of records arrived with {} bytes of credit left",
                    self.credit
                ),
            });
        }
        if records.first_seq() != self.next {
            return Err(Violation {
                code: ErrorCode::OutOfOrder,
                message: format!(
                    "records start at sequence {} where {} was expected: a gap would lose writes",
                    records.first_seq(),
                    self.next
                ),
            });
        }
        let span = records.last_seq().0 - records.first_seq().0 + 1;
        if span != records.len() as u64 {
            return Err(Violation {
                code: ErrorCode::OutOfOrder,
                message: format!(
                    "records {} to {} skip sequence numbers: a gap would lose writes",
                    records.first_seq(),
                    records.last_seq()
                ),
            });
        }
        if let Some(disk) = records.disks().iter().find(|d| !self.disks.contains(d)) {
            return Err(Violation {
                code: ErrorCode::UnknownDisk,
                message: format!("a record names disk {disk}, which this stream did not open"),
            });
        }
        self.credit -= len;
        self.next = Seq(records.last_seq().0 + 1);
        Ok(())
    }

    /// Gives the sender `bytes` more credit (the caller sends them in an `Ack`).
    pub fn grant(&mut self, bytes: u64) {
        self.credit = self.credit.saturating_add(bytes);
    }
}

/// The sending end of one stream.
#[derive(Clone, Debug)]
pub struct Outbound {
    next: Seq,
    credit: u64,
    durable: Option<Seq>,
}

impl Outbound {
    /// Starts where the receiver's `Resume` said.
    pub fn resume(next_seq: Seq, credit: u64) -> Self {
        Outbound {
            next: next_seq,
            credit,
            durable: next_seq.0.checked_sub(1).filter(|&s| s > 0).map(Seq),
        }
    }

    /// The sequence number of the next record to send.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// Bytes of records that may be sent now.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// The last sequence number the receiver holds durable: the sender's log may drop
    /// everything up to it.
    pub fn durable(&self) -> Option<Seq> {
        self.durable
    }

    /// Records `records` as sent. They must be the next ones and fit the credit.
    pub fn sent(&mut self, records: &Records) -> Result<(), Violation> {
        let len = records.bytes().len() as u64;
        if len > self.credit || records.first_seq() != self.next {
            return Err(Violation {
                code: ErrorCode::BadFrame,
                message: format!(
                    "records {} to {} ({len} bytes) cannot be sent now: next is {}, credit {}",
                    records.first_seq(),
                    records.last_seq(),
                    self.next,
                    self.credit
                ),
            });
        }
        self.credit -= len;
        self.next = Seq(records.last_seq().0 + 1);
        Ok(())
    }

    /// Takes an acknowledgement: what is durable downstream, and more credit. An ack for a
    /// record not yet sent, or going backwards, is a protocol violation.
    pub fn acked(&mut self, durable: Seq, credit: u64) -> Result<(), Violation> {
        let sent_last = self.next.0.saturating_sub(1);
        let before = self.durable.map_or(0, |s| s.0);
        if durable.0 > sent_last || durable.0 < before {
            return Err(Violation {
                code: ErrorCode::BadFrame,
                message: format!(
                    "an ack for sequence {durable} arrived when {before} was durable and {sent_last} the last sent"
                ),
            });
        }
        if durable.0 > 0 {
            self.durable = Some(durable);
        }
        self.credit = self.credit.saturating_add(credit);
        Ok(())
    }
}
