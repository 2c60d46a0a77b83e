//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, then
//! one request at a time with simple replies. It is what Boomerang's own tools use to act as a
//! machine writing to its disk (the quickstart's workload), where no `qemu-io` or `fio` may be
//! installed.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::proto::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_EXPORT_NAME,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// A connection to one export.
pub struct Client {
    stream: TcpStream,
    size: u64,
    next_cookie: u64,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Client {
    /// Connects to export `export` of the NBD server at `addr` (`HOST:PORT`).
    pub fn connect(addr: &str, export: &str) -> io::Result<Client> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let magic = u64::from_be_bytes(greeting[..8].try_into().unwrap_or_default());
        let opt = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad(format!("{addr} is not a fixed-newstyle NBD server")));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        let mut out = client_flags.to_be_bytes().to_vec();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        out.extend_from_slice(&(export.len() as u32).to_be_bytes());
        out.extend_from_slice(export.as_bytes());
        stream.write_all(&out)?;
        let mut info = vec![0u8; if no_zeroes { 10 } else { 134 }];
        stream.read_exact(&mut info).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad(format!("{addr} has no export {export:?}"))
            } else {
                e
            }
        })?;
        let size = u64::from_be_bytes(info[..8].try_into().unwrap_or_default());
        Ok(Client {
            stream,
            size,
            next_cookie: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sends one request and waits for its reply; the data of a read.
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Vec<u8>> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.stream.write_all(&b)?;
        if kind == CMD_DISC {
            return Ok(Vec::new());
        }
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap_or_default());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap_or_default());
        let got = u64::from_be_bytes(reply[8..16].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC || got != cookie {
            return Err(bad(format!(
                "unexpected NBD reply (magic {magic:#x}, cookie {got}, wanted {cookie})"
            )));
        }
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error as i32));
        }
        let mut body = Vec::new();
        if kind == CMD_READ {
            body = vec![0u8; len as usize];
            self.stream.read_exact(&mut body)?;
        }
        Ok(body)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`; with `fua`, durable before the reply.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .map(drop)
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[]).map(drop)
    }
}
