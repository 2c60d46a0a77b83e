//! The fixed newstyle handshake: greeting, client flags, then options until the client picks
//! an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::server::{Export, Server};

/// What the handshake settled.
pub struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    pub base_allocation: bool,
}

pub enum Negotiated {
    Transmit(Session),
    Closed,
}

/// The transmission flags of an export.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if structured {
        // DF only means something with structured replies; the protocol asks to leave it clear.
        f |= TFLAG_SEND_DF;
    }
    if export.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await
}

async fn error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    reply(s, option, kind, msg.as_bytes()).await
}

async fn malformed<S: AsyncWrite + Unpin>(s: &mut S, option: u32) -> io::Result<()> {
    error(
        s,
        option,
        REP_ERR_INVALID,
        "the option's payload is malformed",
    )
    .await
}

async fn no_such_export<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    name: &str,
) -> io::Result<()> {
    error(
        s,
        option,
        REP_ERR_UNKNOWN,
        &format!("there is no export named {name:?}"),
    )
    .await
}

/// A cursor over an option's payload that refuses to read past its end.
struct Payload<'a>(&'a [u8]);
impl Payload<'_> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes([h[0], h[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
    }
    fn string(&mut self, len: u32) -> Option<String> {
        let (h, t) = self.0.split_at_checked(usize::try_from(len).ok()?)?;
        self.0 = t;
        String::from_utf8(h.to_vec()).ok()
    }
}

/// Runs the handshake on a fresh connection.
pub async fn handshake<S>(s: &mut S, server: &Server) -> io::Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        || client_flags & FLAG_C_FIXED_NEWSTYLE == 0
    {
        // Unknown flags, or a client that does not speak fixed newstyle: the protocol says close.
        return Ok(Negotiated::Closed);
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // `base:allocation`, when selected, and the export it was selected for.
    let mut meta_export: Option<String> = None;

    loop {
        if s.read_u64().await? != IHAVEOPT {
            return Ok(Negotiated::Closed);
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Reading it would let a client make us buffer gigabytes: end the connection.
            return Ok(Negotiated::Closed);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(Negotiated::Closed);
                };
                let Some(export) = server.export(&name) else {
                    return Ok(Negotiated::Closed);
                };
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.device.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                let base_allocation = meta_export.as_deref() == Some(name.as_str());
                return Ok(Negotiated::Transmit(Session {
                    export,
                    structured,
                    base_allocation,
                }));
            }
            OPT_ABORT => {
                let _ = reply(s, option, REP_ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(Negotiated::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(s, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                } else {
                    for e in server.exports() {
                        let mut d = Vec::with_capacity(4 + e.name.len());
                        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        d.extend_from_slice(e.name.as_bytes());
                        d.extend_from_slice(e.description.as_bytes());
                        reply(s, option, REP_SERVER, &d).await?;
                    }
                    reply(s, option, REP_ACK, &[]).await?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    structured = true;
                    reply(s, option, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name_len = p.u32()?;
                    let name = p.string(name_len)?;
                    let n = p.u16()?;
                    let mut wanted = Vec::new();
                    for _ in 0..n {
                        wanted.push(p.u16()?);
                    }
                    p.0.is_empty().then_some((name, wanted))
                })();
                let Some((name, wanted)) = parsed else {
                    malformed(s, option).await?;
                    continue;
                };
                let Some(export) = server.export(&name) else {
                    no_such_export(s, option, &name).await?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.device.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                reply(s, option, REP_INFO, &info).await?;
                if wanted.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(s, option, REP_INFO, &d).await?;
                }
                if wanted.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(s, option, REP_INFO, &d).await?;
                }
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&4096u32.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(s, option, REP_INFO, &d).await?;
                reply(s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    s.flush().await?;
                    let base_allocation = meta_export.as_deref() == Some(name.as_str());
                    return Ok(Negotiated::Transmit(Session {
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, also when it fails.
                    meta_export = None;
                }
                if set && !structured {
                    error(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY first",
                    )
                    .await?;
                    continue;
                }
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name_len = p.u32()?;
                    let name = p.string(name_len)?;
                    let n = p.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        let l = p.u32()?;
                        queries.push(p.string(l)?);
                    }
                    p.0.is_empty().then_some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    malformed(s, option).await?;
                    continue;
                };
                if server.export(&name).is_none() {
                    no_such_export(s, option, &name).await?;
                    continue;
                }
                let matches = if queries.is_empty() {
                    !set
                } else {
                    queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
                };
                if matches {
                    // LIST replies carry context id 0, as the protocol asks.
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(s, option, REP_META_CONTEXT, &d).await?;
                }
                if set && matches {
                    meta_export = Some(name);
                }
                reply(s, option, REP_ACK, &[]).await?;
            }
            _ => {
                error(s, option, REP_ERR_UNSUP, "this option is not supported").await?;
            }
        }
        s.flush().await?;
    }
}
