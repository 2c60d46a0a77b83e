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

/// A small tmpfs mounted for one test (a volume that fills up), unmounted when dropped.
pub struct SmallVolume(std::path::PathBuf);

impl SmallVolume {
    /// Mounts a tmpfs of `size` (as `mount -o size=`, say `3m`) at `path`; none where that
    /// is not allowed (not root), which fails in CI.
    pub fn mount(path: &std::path::Path, size: &str) -> Option<SmallVolume> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !ci(),
                "mounting a small tmpfs failed; CI runs these tests as root"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return None;
        }
        Some(SmallVolume(path.to_path_buf()))
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
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

/// A TCP proxy on 127.0.0.1 in front of `target`, for fault injection between two
/// components: cut every connection, delay each chunk, or slow the link. Its threads stop when
/// it is dropped.
pub struct FaultProxy {
    addr: String,
    faults: std::sync::Arc<std::sync::Mutex<Faults>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct Faults {
    delay: std::time::Duration,
    /// Bytes per second, if throttled.
    rate: Option<u64>,
    /// While set, every new connection gets this HTTP status to each request, and is closed.
    http_status: Option<u16>,
    /// The connections open now, both ends, by number: cut at once by [`FaultProxy::cut`].
    conns: std::collections::HashMap<u64, Vec<TcpStream>>,
}

/// Reads one HTTP request (its head and a body of `Content-Length` bytes) from `client`,
/// answers it with `status` and an empty body, and closes the connection.
fn answer_http(mut client: TcpStream, status: u16) {
    let _ = client.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let length = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<u64>().ok())?
        })
        .unwrap_or(0);
    let _ = std::io::copy(&mut (&client).take(length), &mut std::io::sink());
    let _ = write!(
        client,
        "HTTP/1.1 {status} Fault Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = client.shutdown(std::net::Shutdown::Both);
}

impl FaultProxy {
    pub fn start(target: &str) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address").to_string();
        let faults = std::sync::Arc::new(std::sync::Mutex::new(Faults::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, s, target) = (faults.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            let mut next = 0u64;
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                // Faults are looked at and the connection registered under one lock: a fault
                // set meanwhile cuts it.
                let mut faults = f.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(status) = faults.http_status {
                    drop(faults);
                    std::thread::spawn(move || answer_http(client, status));
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue; // the target is down: the client sees a closed connection
                };
                let id = next;
                next += 1;
                let ends = [&client, &server]
                    .iter()
                    .filter_map(|s| s.try_clone().ok())
                    .collect();
                faults.conns.insert(id, ends);
                drop(faults);
                // The last of the two pumps to end forgets the connection.
                let pumps = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(2));
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let (f, pumps) = (f.clone(), pumps.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let (delay, rate) = {
                                let f = f.lock().unwrap_or_else(|e| e.into_inner());
                                (f.delay, f.rate)
                            };
                            let mut pause = delay;
                            if let Some(rate) = rate {
                                pause += std::time::Duration::from_secs_f64(n as f64 / rate as f64);
                            }
                            std::thread::sleep(pause);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        if pumps.fetch_sub(1, Ordering::AcqRel) == 1 {
                            f.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .conns
                                .remove(&id);
                        }
                    });
                }
            }
        });
        FaultProxy { addr, faults, stop }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Cuts every connection open now (new ones go through).
    pub fn cut(&self) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        for (_, ends) in faults.conns.drain() {
            for c in ends {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Delays every chunk forwarded by `delay`.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).delay = delay;
    }

    /// For an HTTP service behind the proxy: while `status` is set, every request gets that
    /// status (such as 503) and nothing reaches the service; connections open now are cut.
    pub fn set_http_status(&self, status: Option<u16>) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .http_status = status;
        self.cut();
    }

    /// Limits each direction of each connection to about `rate` bytes per second.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).rate = rate;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}

/// A server process started for a test that prints `listening on ADDR` as its first line of
/// stdout; killed (by its own pid) when dropped if it still runs.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: String,
}

impl Daemon {
    /// Starts `bin` with `args` and waits for its address.
    pub fn start(bin: &str, args: &[&str]) -> Daemon {
        Self::start_with(bin, args, &[], std::process::Stdio::inherit())
    }

    /// As [`Daemon::start`], with `env` added to the process's environment.
    pub fn start_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_with(bin, args, env, std::process::Stdio::inherit())
    }

    /// As [`Daemon::start`], with the process's log (stderr) in the file `log`.
    pub fn start_logged(bin: &str, args: &[&str], log: &std::path::Path) -> Daemon {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("could not create {}: {e}", log.display()));
        Self::start_with(bin, args, &[], file.into())
    }

    fn start_with(
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> Daemon {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {bin}: {e}"));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?} from {bin} {args:?}"))
            .to_string();
        Daemon { child, addr }
    }

    /// Sends `sig` (such as `-KILL` or `-TERM`) to the process and waits for it to end.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args([sig, &pid]).status();
        self.child.wait().expect("wait for the process")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
