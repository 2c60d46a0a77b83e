//! Helpers shared by the integration tests of every crate (dev-dependency only).
//!
//! A test that needs an outside tool calls [`have`]: outside CI a missing tool is a visible
//! skip, in CI (`CI=true`) it is a failure, so nothing passes by skipping there.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

/// Whether the tests run in CI (`CI=true`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` is installed; panics in CI when it is not.
pub fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        assert!(
            !ci(),
            "{tool} is required in CI: run the tests through ./scripts/test"
        );
        eprintln!("SKIPPED: {tool} is not installed; ./scripts/test installs it");
    }
    found
}

/// Whether Azurite is running (`scripts/test` starts it); panics in CI when it is not.
pub fn azurite() -> bool {
    if std::env::var_os("BOOMERANG_TEST_AZURITE").is_some() {
        return true;
    }
    assert!(
        !ci(),
        "Azurite is required in CI: run the tests through ./scripts/test"
    );
    eprintln!("SKIPPED: Azurite is not running; ./scripts/test starts it");
    false
}

/// A name no other test run uses (containers, exports).
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes: an empty disk image.
pub fn sparse_file(path: &std::path::Path, size: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("could not create {}: {e}", path.display()));
}

/// Runs a command and returns its stdout; panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bare NBD client: fixed newstyle handshake with NBD_OPT_EXPORT_NAME, then requests with
/// simple replies, one at a time. For tests that need to send what real clients never would.
pub struct RawNbd(pub TcpStream);

impl RawNbd {
    pub fn connect(addr: &str, export: &str) -> std::io::Result<RawNbd> {
        let mut s = TcpStream::connect(addr)?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        Ok(RawNbd(s))
    }

    /// Sends one request and waits for its reply: the error code and, for a good READ, the data.
    pub fn request(
        &mut self,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b)?;
        let mut reply = [0u8; 16];
        self.0.read_exact(&mut reply)?;
        assert_eq!(
            reply[8..16],
            cookie.to_be_bytes(),
            "reply for another cookie"
        );
        let err = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let mut body = Vec::new();
        if err == 0 && kind == 0 {
            body = vec![0u8; len as usize];
            self.0.read_exact(&mut body)?;
        }
        Ok((err, body))
    }

    /// NBD_CMD_WRITE.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.request(1, cookie, offset, data.len() as u32, data)
            .map(|r| r.0)
    }
}
