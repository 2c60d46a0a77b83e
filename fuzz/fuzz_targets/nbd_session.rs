//! Plays arbitrary bytes as an NBD client against the server: the handshake, then requests.
//! The server must never panic, never allocate more than its caps, and always end.
//!
//! Run with `cargo +nightly fuzz run nbd_session` from the repository root.

#![no_main]

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use boomerang_nbd::{Export, MemDevice, Server};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the fuzz input, then end of file; swallows everything written.
struct Client(std::io::Cursor<Vec<u8>>);

impl AsyncRead for Client {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.0.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // Timers: the server bounds the handshake and its stop in time.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let server = Server::new(
        vec![
            Export { name: "a".into(), description: String::new(), device: Arc::new(MemDevice::new(1 << 20)), read_only: false },
            Export { name: "ro".into(), description: String::new(), device: Arc::new(MemDevice::new(4096)), read_only: true },
        ],
        1,
    );
    // The server does not stop while the client talks.
    let (_running, closing) = tokio::sync::watch::channel(false);
    runtime.block_on(server.handle(Client(std::io::Cursor::new(data.to_vec())), closing));
});
