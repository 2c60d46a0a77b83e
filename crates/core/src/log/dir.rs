//! A log directory: segment files named by their first sequence number
//! (`seg-<first seq, 20 digits>.log`), and a reader that follows them as a writer appends.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{FRAME_HEADER_LEN, FrameCheck, check_frame};
use super::segment::SEGMENT_HEADER_LEN;
use crate::ids::Seq;

/// The file name of the segment whose first record is `first`.
pub fn segment_name(first: Seq) -> String {
    format!("seg-{:020}.log", first.0)
}

/// The first sequence number of a segment, from its file name.
pub fn first_seq_of(path: &Path) -> Option<Seq> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
        .map(Seq)
}

/// The segment files of `dir`, in log order.
pub fn segment_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| first_seq_of(p).is_some())
        .collect();
    out.sort();
    Ok(out)
}

/// Why a log directory cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("could not read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the record at byte {offset} of {} is damaged: {why}", path.display())]
    Damaged {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error(
        "record {wanted} is wanted, but the log in {} starts at {first}: the records between are gone",
        dir.display()
    )]
    Gone {
        dir: PathBuf,
        wanted: Seq,
        first: Seq,
    },
    #[error("record {found} follows in {} where record {expected} was expected", path.display())]
    OutOfOrder {
        path: PathBuf,
        expected: Seq,
        found: Seq,
    },
}

/// Whole record frames read from a segment: each one's sequence number and length, and their
/// bytes back to back.
type Frames = (Vec<(Seq, usize)>, Vec<u8>);

/// Record frames read in a batch: their bytes, back to back, and the first and last sequence
/// numbers.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub first: Seq,
    pub last: Seq,
}

/// Reads a log directory's record frames in order from a sequence number on, following the
/// newest segment as a writer appends to it and moving to the next segment when one appears.
/// Frames are checked for length only (a partly written one is left for later); decode them
/// to check their CRC.
pub struct LogTail {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    offset: u64,
    next: Seq,
}

impl LogTail {
    /// Starts at record `next` of the log in `dir`.
    pub fn open(dir: &Path, next: Seq) -> Result<Self, TailError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TailError::Io { path, source }
        };
        let all = segment_files(dir).map_err(io(dir))?;
        // The last segment that starts at or before `next`.
        let Some(path) = all
            .iter()
            .rev()
            .find(|p| first_seq_of(p).is_some_and(|f| f <= next))
        else {
            return Err(TailError::Gone {
                dir: dir.to_path_buf(),
                wanted: next,
                first: all.first().and_then(|p| first_seq_of(p)).unwrap_or(Seq(0)),
            });
        };
        let file = File::open(path).map_err(io(path))?;
        let mut tail = LogTail {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file,
            offset: SEGMENT_HEADER_LEN as u64,
            next,
        };
        tail.skip_to(next)?;
        Ok(tail)
    }

    /// The sequence number of the next record to read.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    fn io(&self, source: std::io::Error) -> TailError {
        TailError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Advances past the records below `next`.
    fn skip_to(&mut self, next: Seq) -> Result<(), TailError> {
        loop {
            let (frames, _) = self.read_frames(usize::MAX)?;
            let below: Vec<_> = frames.iter().take_while(|(seq, _)| *seq < next).collect();
            if below.is_empty() {
                return Ok(());
            }
            self.offset += below.iter().map(|(_, len)| *len as u64).sum::<u64>();
            if below.len() < frames.len() {
                return Ok(());
            }
        }
    }
    /// Whole frames from the current offset, at most `budget` bytes (at least one frame if a
    /// whole one is there): each frame's sequence number and length, and their bytes.
    fn read_frames(&self, budget: usize) -> Result<Frames, TailError> {
        let size = self.file.metadata().map_err(|e| self.io(e))?.len();
        let avail = usize::try_from(size.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        // Reads are bounded whatever the budget; a longer first record is read whole below.
        let mut want = avail.min(budget.clamp(1 << 20, 8 << 20));
        let mut buf = Vec::new();
        for _ in 0..2 {
            buf = vec![0u8; want];
            let n = read_full(&self.file, &mut buf, self.offset).map_err(|e| self.io(e))?;
            buf.truncate(n);
            // A first record longer than the read: read it whole if it is all there.
            match check_frame(&buf) {
                Ok(FrameCheck::Incomplete { needed })
                    if buf.len() >= FRAME_HEADER_LEN && buf.len() + needed <= avail =>
                {
                    want = buf.len() + needed;
                }
                _ => break,
            }
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let len = match check_frame(&buf[at..]) {
                Ok(FrameCheck::Complete { len }) => len,
                // The writer is mid-append: the rest comes later.
                Ok(FrameCheck::Incomplete { .. }) => break,
                Err(e) => {
                    return Err(TailError::Damaged {
                        path: self.path.clone(),
                        offset: self.offset + at as u64,
                        why: e.to_string(),
                    });
                }
            };
            if at + len > budget {
                break;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&buf[at + 8..at + 16]);
            frames.push((Seq(u64::from_le_bytes(seq)), len));
            at += len;
        }
        buf.truncate(at);
        Ok((frames, buf))
    }

    /// The next records, at most `budget` bytes, or `None` when no whole record is written yet
    /// or the next one is larger than `budget` (a larger budget reads it).
    pub fn next_batch(&mut self, budget: usize) -> Result<Option<Batch>, TailError> {
        loop {
            let (frames, bytes) = self.read_frames(budget)?;
            if let (Some(&(first, _)), Some(&(last, _))) = (frames.first(), frames.last()) {
                if first != self.next {
                    return Err(TailError::OutOfOrder {
                        path: self.path.clone(),
                        expected: self.next,
                        found: first,
                    });
                }
                self.offset += bytes.len() as u64;
                self.next = Seq(last.0 + 1);
                return Ok(Some(Batch { bytes, first, last }));
            }
            if self.whole_frame_waiting()? {
                // The next record is larger than the budget: wait for a larger one.
                return Ok(None);
            }
            // Nothing more here: move on if a newer segment exists, else wait for appends.
            let all = segment_files(&self.dir).map_err(|e| self.io(e))?;
            let Some(newer) = all.iter().find(|p| **p > self.path) else {
                return Ok(None);
            };
            // Read this segment's end again: it may have grown before the newer one appeared.
            let (again, _) = self.read_frames(usize::MAX)?;
            if !again.is_empty() {
                continue;
            }
            self.file = File::open(newer).map_err(|e| self.io(e))?;
            self.path = newer.clone();
            self.offset = SEGMENT_HEADER_LEN as u64;
        }
    }
}

impl LogTail {
    /// Whether a whole record is waiting at the current offset (one the budget left out).
    fn whole_frame_waiting(&self) -> Result<bool, TailError> {
        Ok(!self.read_frames(usize::MAX)?.0.is_empty())
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::ids::DiskName;
    use crate::log::{Op, Record, SegmentWriter, decode_frame};

    fn write(seq: u64) -> Record {
        Record {
            seq: Seq(seq),
            op: Op::Write {
                disk: DiskName::new("sda").expect("valid"),
                offset: seq * 512,
                data: vec![seq as u8; 1000],
            },
        }
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < batch.bytes.len() {
            let (r, len) = decode_frame(&batch.bytes[at..]).expect("whole frames");
            out.push(r.seq.0);
            at += len;
        }
        out
    }

    #[test]
    fn a_tail_follows_appends_across_segments_and_waits_for_half_written_frames() {
        let dir = std::env::temp_dir().join(format!("boomerang-core-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a test directory");
        let mut first =
            SegmentWriter::create(dir.join(segment_name(Seq(1))), Seq(1), 1 << 20).expect("create");
        for s in 1..=5 {
            let _ = first.append(&write(s)).expect("append");
        }
        assert!(matches!(
            LogTail::open(&dir, Seq(0)),
            Err(TailError::Gone { .. })
        ));
        let mut tail = LogTail::open(&dir, Seq(3)).expect("open");
        let batch = tail.next_batch(1 << 20).expect("read").expect("records");
        assert_eq!(seqs(&batch), [3, 4, 5]);
        assert!(tail.next_batch(1 << 20).expect("read").is_none());

        // Half a frame: not returned until the rest is there.
        let mut frame = Vec::new();
        write(6).encode(&mut frame).expect("encode");
        let path = dir.join(segment_name(Seq(1)));
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        raw.write_all(&frame[..100]).expect("write");
        assert!(tail.next_batch(1 << 20).expect("read").is_none());
        raw.write_all(&frame[100..]).expect("write");
        let batch = tail.next_batch(1 << 20).expect("read").expect("records");
        assert_eq!(seqs(&batch), [6]);

        // A newer segment: the tail moves on once the older one is read to its end.
        let mut second =
            SegmentWriter::create(dir.join(segment_name(Seq(7))), Seq(7), 1 << 20).expect("create");
        for s in 7..=9 {
            let _ = second.append(&write(s)).expect("append");
        }
        assert!(
            tail.next_batch(500).expect("read").is_none(),
            "a record over the budget waits for a larger one"
        );
        let batch = tail.next_batch(2500).expect("read").expect("records");
        assert_eq!(seqs(&batch), [7, 8], "the budget cuts the batch");
        let batch = tail.next_batch(2500).expect("read").expect("records");
        assert_eq!(seqs(&batch), [9]);
        assert_eq!(tail.next_seq(), Seq(10));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
