//! The transmission phase: a reader parses requests and hands each to its own task; a writer
//! sends replies as they complete, matched by cookie. At most [`IN_FLIGHT`] requests and
//! [`BYTES_IN_FLIGHT`] bytes of payload are held per connection, so memory stays bounded
//! whatever the client sends. When the server stops, the reader stops between requests, the
//! requests already read finish and are replied to, and the connection closes; requests the
//! client sent meanwhile go unanswered, so a client that reconnects sends them again (an
//! error reply would fail them for good). Whatever happens, the connection is gone
//! [`crate::server::SHUTDOWN_GRACE`] after the stop.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::handshake::Session;
use crate::proto::*;

/// Requests served concurrently per connection.
pub const IN_FLIGHT: usize = 64;
/// Payload bytes (write data and read buffers) held at once per connection.
pub const BYTES_IN_FLIGHT: u32 = 32 * 1024 * 1024;
/// Requests up to this length (without FUA) run inline in the connection's reader: 1 MiB, the
/// largest request most clients send (qemu, nbdcopy and fio's defaults stay at or under it).
const QUICK_LEN: u32 = 1024 * 1024;
/// At a stop, once the replies are sent: how long the requests the client sent meanwhile are
/// read off (and dropped) before the connection closes. Closing with unread bytes would reset
/// the connection, and a reset can discard replies the client has not read yet.
const DRAIN: std::time::Duration = std::time::Duration::from_millis(250);
/// Accounting unit of the byte budget.
const UNIT: u32 = 64 * 1024;
const UNITS: u32 = BYTES_IN_FLIGHT / UNIT;
/// Permits of the connection's semaphore: one per request slot plus the byte budget's units.
fn permits(len: u32) -> u32 {
    1 + len.div_ceil(UNIT).min(UNITS)
}

/// A reply's bytes and the budget its request holds until they are written.
type Reply = (Vec<u8>, Option<OwnedSemaphorePermit>);

/// What a finished request sends back.
enum Outcome {
    Ok,
    Read(Vec<u8>),
    Status(Vec<(u32, u32)>),
    Err(u32),
}

/// Serves requests until the client disconnects or breaks the protocol, or until `closing`
/// turns true (or its sender is dropped).
pub async fn transmit<S>(
    stream: S,
    session: Session,
    closing: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    // Buffered both ways: a header is 28 bytes and a reply 16, one syscall each would dominate.
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = tokio::io::BufWriter::with_capacity(256 * 1024, wr);
    // A reply travels with its request's permit: the budget is given back once the reply is
    // written, so replies a client does not read cannot pile up.
    let (tx, mut rx) = mpsc::channel::<Reply>(IN_FLIGHT);
    // However the connection ends (a deadline, or this task aborted), the writer goes with it:
    // left alone it could wait for ever on a client that reads nothing.
    let writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some((buf, permit)) = rx.recv().await {
            wr.write_all(&buf).await?;
            drop(permit);
            // Send at once unless more replies are already waiting.
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    }));
    let session = Arc::new(session);
    let total = IN_FLIGHT as u32 + UNITS;
    let slots = Arc::new(Semaphore::new(total as usize));
    let mut stopping = closing.clone();
    let served = async {
        let mut closing = closing;
        let ended = read_requests(&mut rd, &session, &slots, &tx, &mut closing).await;
        // Let the requests in flight finish and reply, then close.
        let _ = slots.acquire_many(total).await;
        drop(tx);
        let written = writer.await.map_err(io::Error::other)?;
        if let Ok(Ended::Closing) = ended {
            let mut sink = tokio::io::sink();
            let _ = tokio::time::timeout(DRAIN, tokio::io::copy(&mut rd, &mut sink)).await;
        }
        ended.map(|_| ()).and(written)
    };
    // A client that stops reading its replies, or stalls in the middle of a request, does not
    // hold the connection open past the server's stop.
    let deadline = async {
        let _ = stopping.wait_for(|c| *c).await;
        tokio::time::sleep(crate::server::SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = served => result,
        _ = deadline => {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection was still busy when the server's stop allowed no more time",
            ))
        }
    }
}

/// Why a connection's reader stopped reading requests.
enum Ended {
    /// The client disconnected.
    Client,
    /// The server is stopping.
    Closing,
}

/// The next request's header, once a whole one has arrived; `None` when the client closed
/// the connection between requests.
async fn read_header<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<Request>> {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Request::parse(&header)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    session: &Arc<Session>,
    slots: &Arc<Semaphore>,
    tx: &mpsc::Sender<Reply>,
    closing: &mut watch::Receiver<bool>,
) -> io::Result<Ended> {
    let size = session.export.device.size();
    loop {
        // Between requests, the server's stop ends the reading; a request begun is read whole.
        // (Waiting for bytes to buffer consumes nothing, so that wait may be abandoned.)
        if rd.buffer().is_empty() {
            tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => return Ok(Ended::Closing),
                more = rd.fill_buf() => {
                    if more?.is_empty() {
                        return Ok(Ended::Client);
                    }
                }
            }
        } else if *closing.borrow() || closing.has_changed().is_err() {
            return Ok(Ended::Closing);
        }
        let Some(req) = read_header(rd).await? else {
            return Ok(Ended::Client);
        };
        if req.kind == CMD_DISC {
            return Ok(Ended::Client);
        }
        // Room for this request, taken before its payload is read or allocated. A READ over the
        // limit holds no buffer (it is refused), so it needs no budget.
        let budget = match req.kind {
            CMD_WRITE | CMD_READ if req.length <= MAX_PAYLOAD => permits(req.length),
            _ => 1,
        };
        let permit = slots
            .clone()
            .acquire_many_owned(budget)
            .await
            .map_err(io::Error::other)?;
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                // The payload cannot be skipped without reading it all: refuse and hang up.
                let _ = tx
                    .send((reply_bytes(session, &req, Outcome::Err(EINVAL)), None))
                    .await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write payload over the limit",
                ));
            }
            payload = read_payload(rd, req.length as usize).await?;
        }
        if let Some(err) = check(session, &req, size) {
            let _ = tx
                .send((reply_bytes(session, &req, Outcome::Err(err)), Some(permit)))
                .await;
            continue;
        }
        // Reads and writes without FUA hit the page cache and take microseconds (a megabyte in
        // well under one millisecond): run them right here, in order, which costs no task
        // switch; measured, the two hops through the blocking pool cost a megabyte write a fifth
        // of its throughput. Syncs and larger transfers go to the blocking pool so that they
        // never hold up the connection.
        let quick = matches!(
            req.kind,
            CMD_READ | CMD_WRITE | CMD_BLOCK_STATUS | CMD_CACHE
        ) && req.flags & CMD_FLAG_FUA == 0
            && req.length <= QUICK_LEN
            && !(req.kind == CMD_WRITE && session.export.device.writes_may_wait())
            && !(req.kind != CMD_WRITE && session.export.device.reads_may_wait());
        if quick {
            let outcome = execute(session, &req, payload);
            let _ = tx
                .send((reply_bytes(session, &req, outcome), Some(permit)))
                .await;
            continue;
        }
        let session = session.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let s = session.clone();
            let outcome = tokio::task::spawn_blocking(move || execute(&s, &req, payload))
                .await
                .unwrap_or(Outcome::Err(EIO));
            let _ = tx
                .send((reply_bytes(&session, &req, outcome), Some(permit)))
                .await;
        });
    }
}

/// Reads a write's payload into a buffer that is not zeroed first: zeroing a fresh megabyte
/// costs as much as receiving it.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut payload).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload)
}

/// The errno for a request that must not run, if any.
fn check(session: &Session, req: &Request, size: u64) -> Option<u32> {
    let known_flags =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known_flags != 0 {
        return Some(EINVAL);
    }
    let end = req.offset.checked_add(u64::from(req.length));
    let in_range = end.is_some_and(|e| e <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match req.kind {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_CACHE
        | CMD_FLUSH => {}
        _ => return Some(EINVAL),
    }
    if writes && session.export.read_only {
        return Some(EPERM);
    }
    if req.kind == CMD_READ && req.length > MAX_PAYLOAD {
        return Some(EINVAL);
    }
    if req.kind == CMD_BLOCK_STATUS
        && (!session.structured || !session.base_allocation || req.length == 0)
    {
        return Some(EINVAL);
    }
    if req.kind != CMD_FLUSH && !in_range {
        // The protocol: ENOSPC for writes past the end, EINVAL for reads and trims.
        return Some(if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    if req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0 {
        // FAST_ZERO is not advertised: devices cannot promise zeroing faster than writing, and
        // the protocol asks to fail such a request quickly with ENOTSUP.
        return Some(ENOTSUP);
    }
    None
}

fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) | Some(122) => ENOSPC, // ENOSPC, EDQUOT
        Some(1) | Some(13) | Some(30) => EPERM,
        Some(12) => ENOMEM,
        _ => EIO,
    }
}

fn execute(session: &Session, req: &Request, payload: Vec<u8>) -> Outcome {
    let dev = &session.export.device;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: io::Result<()>| match r {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(errno(&e)),
    };
    match req.kind {
        CMD_READ => {
            let mut buf = vec![0u8; req.length as usize];
            match dev.read_at(&mut buf, req.offset) {
                Ok(()) => Outcome::Read(buf),
                Err(e) => Outcome::Err(errno(&e)),
            }
        }
        CMD_WRITE => done(dev.write_at(&payload, req.offset, fua)),
        CMD_FLUSH => done(dev.flush()),
        CMD_TRIM => done(
            dev.trim(req.offset, u64::from(req.length))
                .and_then(|()| if fua { dev.flush() } else { Ok(()) }),
        ),
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            done(dev.write_zeroes(req.offset, u64::from(req.length), may_trim, fua))
        }
        CMD_CACHE => Outcome::Ok,
        CMD_BLOCK_STATUS => match dev.block_status(req.offset, u64::from(req.length)) {
            Ok(extents) => {
                let mut out = Vec::new();
                let mut left = u64::from(req.length).min(dev.size() - req.offset);
                for e in extents {
                    if left == 0 {
                        break;
                    }
                    let len = e.len.min(left).min(u64::from(u32::MAX)) as u32;
                    if len == 0 {
                        continue;
                    }
                    let flags =
                        if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
                    match out.last_mut() {
                        Some((l, f))
                            if *f == flags
                                && u64::from(*l) + u64::from(len) <= u64::from(u32::MAX) =>
                        {
                            *l += len
                        }
                        _ => out.push((len, flags)),
                    }
                    left -= u64::from(len);
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        break;
                    }
                }
                if out.is_empty() {
                    Outcome::Err(EIO)
                } else {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        out.truncate(1);
                    }
                    Outcome::Status(out)
                }
            }
            Err(e) => Outcome::Err(errno(&e)),
        },
        _ => Outcome::Err(EINVAL),
    }
}

fn reply_bytes(session: &Session, req: &Request, outcome: Outcome) -> Vec<u8> {
    let structured_read = session.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS);
    match outcome {
        Outcome::Ok => simple_reply(0, req.cookie).to_vec(),
        Outcome::Err(err) if structured_read => {
            let mut b = structured_reply(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req.cookie, 6).to_vec();
            b.extend_from_slice(&err.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b
        }
        Outcome::Err(err) => simple_reply(err, req.cookie).to_vec(),
        Outcome::Read(data) if session.structured && data.is_empty() => {
            // An OFFSET_DATA chunk must carry at least one byte.
            structured_reply(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0).to_vec()
        }
        Outcome::Read(data) if session.structured => {
            let mut b = Vec::with_capacity(28 + data.len());
            b.extend_from_slice(&structured_reply(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + data.len() as u32,
            ));
            b.extend_from_slice(&req.offset.to_be_bytes());
            b.extend_from_slice(&data);
            b
        }
        Outcome::Read(data) => {
            let mut b = Vec::with_capacity(16 + data.len());
            b.extend_from_slice(&simple_reply(0, req.cookie));
            b.extend_from_slice(&data);
            b
        }
        Outcome::Status(extents) => {
            let len = 4 + 8 * extents.len() as u32;
            let mut b = structured_reply(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, req.cookie, len)
                .to_vec();
            b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for (l, f) in extents {
                b.extend_from_slice(&l.to_be_bytes());
                b.extend_from_slice(&f.to_be_bytes());
            }
            b
        }
    }
}
