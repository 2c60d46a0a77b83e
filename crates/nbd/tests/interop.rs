//! The NBD server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io and fio (its nbd
//! engine), over TCP on 127.0.0.1 and over a Unix socket, plus hostile input from a raw socket.
//! The tools are installed by `scripts/test`; in CI (CI=true) a missing tool is a failure.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use boomerang_nbd::server::{ListenAddr, Listener};
use boomerang_nbd::{Export, FileDevice, Server};
use boomerang_testkit::{RawNbd, have, run, sparse_file};
use tokio::sync::watch;

const MIB: u64 = 1 << 20;

/// A server on a loopback port (or a Unix socket) serving image files; stops when dropped.
struct Running {
    addr: String,
    stop: watch::Sender<bool>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    runtime: tokio::runtime::Runtime,
}

impl Running {
    fn start(exports: Vec<(&str, PathBuf, bool)>, listen: ListenAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let exports = exports
            .into_iter()
            .map(|(name, path, read_only)| Export {
                name: name.into(),
                description: format!("test disk {name}"),
                device: Arc::new(FileDevice::open(&path, read_only).unwrap()),
                read_only,
            })
            .collect();
        let server = Server::new(exports, 16);
        let listener = runtime.block_on(Listener::bind(&listen)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let serving = runtime.spawn(async move { server.serve(listener, rx).await });
        Running {
            addr,
            stop,
            serving: Some(serving),
            runtime,
        }
    }

    /// Waits, at most `limit`, until the server, told to stop, has closed every connection.
    fn stopped(&mut self, limit: std::time::Duration) {
        let serving = self.serving.take().expect("stopped once");
        self.runtime
            .block_on(async { tokio::time::timeout(limit, serving).await })
            .expect("the server closes its connections and returns")
            .unwrap()
            .unwrap();
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A sparse image of `size` (at least 6 MiB): data at 1 MiB..2 MiB and 5 MiB..5 MiB+64 KiB,
/// holes elsewhere.
fn sample_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    assert!(size >= 6 * MIB);
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, MIB).unwrap();
    f.write_all_at(&data[..65536], 5 * MIB).unwrap();
    f.sync_all().unwrap();
    path
}

#[test]
fn nbdinfo_lists_exports_sizes_and_allocation() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = sample_image(dir.path(), "a.img", 8 * MIB);
    let b = sample_image(dir.path(), "b.img", 6 * MIB);
    let srv = Running::start(
        vec![("disk0", a, false), ("disk1", b, true)],
        "127.0.0.1:0".parse().unwrap(),
    );

    let list = run("nbdinfo", &["--list", &format!("nbd://{}", srv.addr)]);
    assert!(list.contains("disk0") && list.contains("disk1"), "{list}");

    let info = run("nbdinfo", &["--json", &srv.uri("disk0")]);
    assert!(info.trim_start().starts_with('{'), "not JSON: {info}");
    assert!(info.contains("\"export-size\": 8388608"), "{info}");
    let ro = run("nbdinfo", &[&srv.uri("disk1")]);
    assert!(ro.contains("is_read_only: true"), "{ro}");

    // base:allocation: data exactly where it was written.
    let map = run("nbdinfo", &["--map", &srv.uri("disk0")]);
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let data: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r.2 & 1 == 0)
        .map(|r| (r.0, r.1))
        .collect();
    assert!(data.contains(&(MIB, MIB)), "{map}");
    assert!(
        data.iter().any(|&(o, l)| o == 5 * MIB && l >= 65536),
        "{map}"
    );
    assert!(
        rows.iter().any(|r| r.0 == 0 && r.2 == 3),
        "the start is a hole: {map}"
    );
    let total: u64 = rows.iter().map(|r| r.1).sum();
    assert_eq!(total, 8 * MIB);
}

#[test]
fn qemu_img_and_qemu_io_read_and_write() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = sample_image(dir.path(), "a.img", 8 * MIB);
    let ro = sample_image(dir.path(), "ro.img", 6 * MIB);
    let srv = Running::start(
        vec![("disk0", a.clone(), false), ("ro", ro.clone(), true)],
        "127.0.0.1:0".parse().unwrap(),
    );

    let info = run("qemu-img", &["info", "--output=json", &srv.uri("disk0")]);
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    let out = dir.path().join("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri("disk0"),
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());

    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            &srv.uri("disk0"),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "discard 6M 1M",
            "-c",
            "flush",
            &srv.uri("disk0"),
        ],
    );
    let data = std::fs::read(&a).unwrap();
    assert!(
        data[..MIB as usize].iter().all(|&b| b == 0xab),
        "the write reached the image"
    );
    assert!(
        data[2 * MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0)
    );

    // A read-only export refuses writes.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &srv.uri("ro")])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("read only"),
        "{text}"
    );
    assert!(
        std::fs::read(&ro).unwrap()[..4096].iter().all(|&b| b == 0),
        "a read-only image was written"
    );
}

#[test]
fn nbdcopy_both_ways_over_tcp_and_unix_socket() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = sample_image(dir.path(), "src.img", 16 * MIB);
    let target = dir.path().join("target.img");
    sparse_file(&target, 16 * MIB);
    let sock = dir.path().join("nbd.sock");
    for listen in [
        ListenAddr::Tcp("127.0.0.1:0".into()),
        ListenAddr::Unix(sock.clone()),
    ] {
        sparse_file(&target, 0);
        sparse_file(&target, 16 * MIB);
        let srv = Running::start(vec![("t", target.clone(), false)], listen.clone());
        let uri = match &listen {
            ListenAddr::Tcp(_) => srv.uri("t"),
            ListenAddr::Unix(p) => format!("nbd+unix:///t?socket={}", p.display()),
        };
        run("nbdcopy", &[src.to_str().unwrap(), &uri]);
        assert!(
            std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap(),
            "copy into the export over {listen:?}"
        );
        let back = dir.path().join("back.img");
        run("nbdcopy", &[&uri, back.to_str().unwrap()]);
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap(),
            "copy out of the export over {listen:?}"
        );
        drop(srv);
        let _ = std::fs::remove_file(&sock);
    }
}

#[test]
fn fio_random_writes_verify() {
    if !have("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fio.img");
    sparse_file(&img, 64 * MIB);
    let srv = Running::start(vec![("fio", img, false)], "127.0.0.1:0".parse().unwrap());
    let uri = srv.uri("fio");
    let common = [
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64M",
        "--io_size=16M",
        "--verify=crc32c",
        "--randseed=1234",
    ];
    let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    args.push(format!("--uri={uri}"));
    let out = run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.contains("verify: bad"), "{out}");
    args.push("--verify_only".into());
    let out = run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.contains("verify: bad"), "{out}");
}

/// The error code of one request.
fn err(c: &mut RawNbd, kind: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> u32 {
    c.request(kind, cookie, offset, len, data).unwrap().0
}

#[test]
fn bad_requests_get_the_errors_the_protocol_names_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(dir.path(), "x.img", 8 * MIB);
    let srv = Running::start(vec![("x", img, false)], "127.0.0.1:0".parse().unwrap());

    let mut c = RawNbd::connect(&srv.addr, "x").unwrap();
    assert_eq!(err(&mut c, 0, 1, 0, 4096, &[]), 0, "a good read");
    assert_eq!(
        err(&mut c, 0, 2, 8 * MIB - 100, 4096, &[]),
        22,
        "read past the end: EINVAL"
    );
    assert_eq!(
        err(&mut c, 1, 3, 8 * MIB, 4, b"abcd"),
        28,
        "write past the end: ENOSPC"
    );
    assert_eq!(err(&mut c, 77, 4, 0, 0, &[]), 22, "unknown command: EINVAL");
    assert_eq!(
        err(&mut c, 0, 5, u64::MAX - 10, 4096, &[]),
        22,
        "offset overflow: EINVAL"
    );
    assert_eq!(
        err(&mut c, 0, 6, 0, 64 << 20, &[]),
        22,
        "oversized read: EINVAL"
    );
    assert_eq!(err(&mut c, 1, 7, 0, 4, b"wxyz"), 0, "still serving");

    assert_eq!(
        err(&mut c, 4, 9, 8 * MIB, 4096, &[]),
        22,
        "trim past the end: EINVAL"
    );

    // Garbage instead of a request: the server hangs up on that client only.
    let mut g = RawNbd::connect(&srv.addr, "x").unwrap().0;
    g.write_all(&[0xde; 64]).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        g.read(&mut buf).unwrap_or(0),
        0,
        "garbage must end the connection"
    );

    // An oversized option length during the handshake: clean disconnect, no allocation.
    let mut h = TcpStream::connect(&srv.addr).unwrap();
    let mut greeting = [0u8; 18];
    h.read_exact(&mut greeting).unwrap();
    h.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    h.write_all(&opt).unwrap();
    assert_eq!(h.read(&mut buf).unwrap_or(0), 0);

    // The first client was not disturbed.
    assert_eq!(err(&mut c, 0, 8, 0, 4, &[]), 0);
}

#[test]
fn a_stopping_server_answers_what_it_read_runs_nothing_more_and_closes_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(dir.path(), "x.img", 8 * MIB);
    let mut srv = Running::start(
        vec![("x", img.clone(), false)],
        "127.0.0.1:0".parse().unwrap(),
    );
    let mut idle = RawNbd::connect(&srv.addr, "x").unwrap();
    assert_eq!(err(&mut idle, 1, 1, 0, 4, b"kept"), 0);
    let mut busy = RawNbd::connect(&srv.addr, "x").unwrap();
    let mut negotiating = TcpStream::connect(&srv.addr).unwrap();
    let mut greeting = [0u8; 18];
    negotiating.read_exact(&mut greeting).unwrap();

    srv.stop.send(true).unwrap();
    // A request sent after the stop is not run: the client gets the connection closed, not a
    // reply, and a client that reconnects would send it again.
    let mut late = Vec::new();
    late.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    late.extend_from_slice(&0u16.to_be_bytes());
    late.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    late.extend_from_slice(&2u64.to_be_bytes());
    late.extend_from_slice(&8192u64.to_be_bytes());
    late.extend_from_slice(&4u32.to_be_bytes());
    late.extend_from_slice(b"late");
    busy.0.write_all(&late).unwrap();
    // Well within SHUTDOWN_GRACE: the server waits for nothing it need not wait for.
    srv.stopped(std::time::Duration::from_secs(3));

    for (name, conn) in [
        ("the client that sent a request after the stop", &mut busy.0),
        ("the idle client", &mut idle.0),
        ("the client in its handshake", &mut negotiating),
    ] {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Closed, not reset: what the client sent after the stop was read off first.
        match conn.read(&mut buf) {
            Ok(0) => {}
            other => panic!("{name} is not closed cleanly after the stop: {other:?}"),
        }
    }
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(
        &disk[..4],
        b"kept",
        "the write before the stop is on the disk"
    );
    assert_ne!(
        &disk[8192..8196],
        b"late",
        "the request after the stop did not run"
    );
}

#[test]
fn a_client_that_reads_no_replies_does_not_hold_up_the_servers_stop() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(dir.path(), "x.img", 8 * MIB);
    let mut srv = Running::start(vec![("x", img, false)], "127.0.0.1:0".parse().unwrap());
    let mut stuck = RawNbd::connect(&srv.addr, "x").unwrap();
    // Reads of 1 MiB, far more than the socket buffers and the connection's payload budget
    // hold, and never a reply read: the server's writer and then its reader wait on the client.
    let mut requests = Vec::new();
    for cookie in 0..200u64 {
        requests.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        requests.extend_from_slice(&0u16.to_be_bytes());
        requests.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        requests.extend_from_slice(&cookie.to_be_bytes());
        requests.extend_from_slice(&((cookie % 7) * MIB).to_be_bytes());
        requests.extend_from_slice(&(MIB as u32).to_be_bytes());
    }
    stuck.0.write_all(&requests).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    srv.stop.send(true).unwrap();
    // SHUTDOWN_GRACE (5 s) and a margin: the stop does not wait for the client.
    srv.stopped(std::time::Duration::from_secs(8));
}
