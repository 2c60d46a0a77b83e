//! Frames over a byte stream (a TLS stream in production, anything in tests).

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{
    DecodeError, EncodeError, ErrorCode, Frame, HEADER_LEN, MAGIC, decode_payload, parse_header,
};

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("could not encode a frame: {0}")]
    Encode(#[from] EncodeError),
    /// The peer ended the connection with an error frame.
    #[error("the peer refused: {message} (code {})", code.code())]
    Refused { code: ErrorCode, message: String },
    /// A valid frame that has no place at this point of the conversation.
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    /// The peer closed the connection where a frame was expected.
    #[error("the peer closed the connection")]
    Closed,
}

/// Reads frames; holds at most one frame's payload.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// Reads the client's magic: the first bytes of a connection.
    pub async fn read_magic(&mut self) -> Result<(), WireError> {
        let mut magic = [0u8; MAGIC.len()];
        match self.inner.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
            Err(e) => return Err(e.into()),
        }
        if magic != MAGIC {
            return Err(DecodeError::BadMagic.into());
        }
        Ok(())
    }

    /// The next frame; [`WireError::Closed`] if the peer closed between frames.
    pub async fn read(&mut self) -> Result<Frame, WireError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut header[got..]).await? {
                0 if got == 0 => return Err(WireError::Closed),
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                n => got += n,
            }
        }
        // The length is checked against the limit before anything is allocated.
        let (len, kind) = parse_header(&header)?;
        let mut payload = BytesMut::with_capacity(len);
        while payload.len() < len {
            let want = (len - payload.len()) as u64;
            if (&mut self.inner).take(want).read_buf(&mut payload).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        Ok(decode_payload(kind, payload.freeze())?)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
        }
    }

    /// Sends the client's magic, first on a connection.
    pub async fn write_magic(&mut self) -> Result<(), WireError> {
        self.inner.write_all(&MAGIC).await?;
        Ok(())
    }

    /// Sends one frame and flushes it. Records are written from their own buffer, not copied.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        if let Frame::Records(records) = frame {
            let header = Frame::records_header(records)?;
            self.inner.write_all(&header).await?;
            self.inner.write_all(records.bytes()).await?;
        } else {
            self.buf.clear();
            frame.encode(&mut self.buf)?;
            self.inner.write_all(&self.buf).await?;
        }
        self.inner.flush().await?;
        Ok(())
    }

    /// Sends an error frame and shuts the stream down; failures to send are ignored (the
    /// connection is ending anyway).
    pub async fn refuse(&mut self, code: ErrorCode, message: &str) {
        let frame = Frame::Error {
            code,
            message: message.to_string(),
        };
        let _ = self.send(&frame).await;
        let _ = self.inner.shutdown().await;
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}
