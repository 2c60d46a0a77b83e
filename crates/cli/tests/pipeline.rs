//! Replication from the agent through the process server to the master target, as separate
//! processes on loopback over mutual TLS: every write reaches the next hop in order through
//! `kill -9` of any hop, cut links, delays and throttling; recovery points are the source at
//! their marks; a disk's existing content is copied before its first point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use boomerang_testkit::{Daemon, RawNbd, SmallVolume, have, run, sparse_file};

fn boomerang(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_boomerang"), args)
}

/// A `boomerang` server process (see [`boomerang_testkit::Daemon`]).
fn daemon(args: &[&str]) -> Daemon {
    Daemon::start(env!("CARGO_BIN_EXE_boomerang"), args)
}

/// A site: its CA, with certificates for the process server ps1 and the master target mt1
/// (reached at 127.0.0.1) and for the agent of machine web01.
fn site(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let ca_str = ca.to_str().unwrap();
    boomerang(&["pki", "init", ca_str]);
    for (name, role) in [("ps1", "process-server"), ("mt1", "master-target")] {
        boomerang(&[
            "pki",
            "issue",
            ca_str,
            "--name",
            name,
            "--role",
            role,
            "--host",
            "127.0.0.1",
        ]);
    }
    boomerang(&["pki", "issue", ca_str, "--name", "web01", "--role", "agent"]);
    ca
}

fn master_target(ca: &Path, retention: &Path, listen: &str) -> Daemon {
    master_target_every(ca, retention, listen, "0")
}

/// [`master_target`], making points at most every `point_every` seconds.
fn master_target_every(ca: &Path, retention: &Path, listen: &str, point_every: &str) -> Daemon {
    mt_daemon(
        ca,
        "mt1",
        retention,
        &[
            "--listen",
            listen,
            "--block-size",
            "4KiB",
            "--point-every",
            point_every,
        ],
    )
}

/// A master target with the certificate of `identity`, on `retention`, started with `args`.
fn mt_daemon(ca: &Path, identity: &str, retention: &Path, args: &[&str]) -> Daemon {
    let tls = ca.join("issued").join(identity);
    let mut all = vec![
        "master-target",
        "--tls",
        tls.to_str().unwrap(),
        "--retention",
        retention.to_str().unwrap(),
    ];
    all.extend(args);
    daemon(&all)
}

/// A process server; it forwards to `master_target` when given.
fn process_server(
    ca: &Path,
    cache: &Path,
    listen: &str,
    master_target: Option<&str>,
    extra: &[&str],
) -> Daemon {
    let mut args = vec![
        "process-server".to_string(),
        "--listen".into(),
        listen.into(),
        "--tls".into(),
        ca.join("issued/ps1").display().to_string(),
        "--cache".into(),
        cache.display().to_string(),
    ];
    if let Some(mt) = master_target {
        args.extend(["--master-target".into(), mt.into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    daemon(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `agent log inspect --output json`.
fn inspect(log: &Path) -> serde_json::Value {
    serde_json::from_str(&boomerang(&[
        "agent",
        "log",
        "inspect",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap()
}

/// A sparse file of `blocks` 4 KiB blocks of zeros in `dir`.
fn blank(dir: &Path, name: &str, blocks: u64) -> PathBuf {
    let path = dir.join(name);
    sparse_file(&path, blocks * 4096);
    path
}

/// The agent of web01 serving `disk` as d0 and shipping to `process_server`.
fn agent(ca: &Path, disk: &Path, log: &Path, process_server: &str, extra: &[&str]) -> Daemon {
    agent_of("web01", ca, disk, log, process_server, extra)
}

/// The agent of `machine` (its identity issued in `ca`), as [`agent`].
fn agent_of(
    machine: &str,
    ca: &Path,
    disk: &Path,
    log: &Path,
    process_server: &str,
    extra: &[&str],
) -> Daemon {
    let mut args = vec![
        "agent".to_string(),
        "--disk".into(),
        format!("d0={}", disk.display()),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--log-dir".into(),
        log.display().to_string(),
        "--process-server".into(),
        process_server.into(),
        "--tls".into(),
        ca.join("issued").join(machine).display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    daemon(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Waits until `point` of d0 in the replica store exports `want` (or, without one, until it
/// exports at all); returns its bytes.
fn wait_for_point(store: &Path, point: &str, out: &Path, want: Option<&[u8]>) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(["store", "export", store.to_str().unwrap(), "--disk", "d0"])
            .args(["--point", point, "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        if result.status.success() {
            let got = std::fs::read(out).unwrap();
            if want.is_none_or(|w| got == w) {
                return got;
            }
        }
        assert!(
            Instant::now() < deadline,
            "point {point} of {} did not come: {}",
            store.display(),
            String::from_utf8_lossy(&result.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn block(i: u64, round: u64) -> Vec<u8> {
    (0..512)
        .flat_map(|_| (i * 1000 + round).to_le_bytes())
        .collect()
}

/// Writes `round`'s pattern into every `step`-th block of d0, from block `round % step`.
fn write_round(client: &mut RawNbd, cookie: &mut u64, round: u64, step: u64, blocks: u64) {
    for i in (round % step..blocks).step_by(step as usize) {
        *cookie += 1;
        assert_eq!(
            client.write(*cookie, i * 4096, &block(i, round)).unwrap(),
            0
        );
    }
}

const BLOCKS: u64 = 1024;

#[test]
fn the_agent_streams_every_write_to_the_process_server_through_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let base = blank(dir.path(), "base.img", BLOCKS);
    let cache = dir.path().join("cache");
    let log = dir.path().join("log");

    let mut ps = process_server(&ca, &cache, "127.0.0.1:0", None, &[]);
    let ps_addr = ps.addr.clone();
    let agent = agent(
        &ca,
        &disk,
        &log,
        &ps_addr,
        &["--segment-size", "1MiB", "--mark-interval", "0.2"],
    );
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 0, 1, BLOCKS);
    write_round(&mut client, &mut cookie, 1, 3, BLOCKS);

    // The process server dies without warning; writes go on into the agent's log meanwhile.
    ps.signal("-KILL");
    write_round(&mut client, &mut cookie, 2, 2, BLOCKS);
    let mut ps = process_server(&ca, &cache, &ps_addr, None, &[]);
    write_round(&mut client, &mut cookie, 3, 5, BLOCKS);

    // Everything the agent logged arrives: the cache replayed onto the starting image is the
    // live disk.
    let live = std::fs::read(&disk).unwrap();
    let replayed = dir.path().join("replayed.img");
    let cached = cache.join("web01");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args([
                "agent",
                "log",
                "replay",
                cached.to_str().unwrap(),
                "--disk",
                "d0",
            ])
            .args([
                "--base",
                base.to_str().unwrap(),
                "--out",
                replayed.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        if out.status.success() && std::fs::read(&replayed).unwrap() == live {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the process server's cache did not catch up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Acknowledged segments left the agent's log: about 4.5 MiB were logged in 1 MiB segments.
    let segments = std::fs::read_dir(&log)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("seg-")
        })
        .count();
    assert!(segments <= 2, "{segments} segments left in the agent's log");
    drop(agent);
    ps.signal("-TERM");
}

#[test]
fn agent_process_server_and_master_target_make_points_equal_to_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let retention = dir.path().join("retention");
    let mut mt = master_target(&ca, &retention, "127.0.0.1:0");
    let mt_addr = mt.addr.clone();
    let ps = process_server(
        &ca,
        &dir.path().join("cache"),
        "127.0.0.1:0",
        Some(&mt_addr),
        &[],
    );
    let log = dir.path().join("log");
    let agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0.2"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 0, 1, BLOCKS);
    // The master target dies without warning and comes back on the same address.
    mt.signal("-KILL");
    write_round(&mut client, &mut cookie, 1, 3, BLOCKS);
    let _mt = master_target(&ca, &retention, &mt_addr);
    write_round(&mut client, &mut cookie, 2, 2, BLOCKS);

    // The source stays still; marks go on. A point of the master target soon equals it.
    let live = std::fs::read(&disk).unwrap();
    let store = retention.join("replicas/web01/store");
    wait_for_point(&store, "latest", &dir.path().join("point.img"), Some(&live));
    boomerang(&["store", "verify", store.to_str().unwrap()]);
}

#[test]
fn a_disk_with_content_is_copied_before_its_first_point() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    // 8 MiB of data with holes, written before the agent ever saw the disk.
    let disk = blank(dir.path(), "disk.img", 2048);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for i in (0..2048u64).filter(|i| i % 5 != 0) {
            f.write_all_at(&block(i, 7), i * 4096).unwrap();
        }
    }
    let retention = dir.path().join("retention");
    let mt = master_target(&ca, &retention, "127.0.0.1:0");
    let ps = process_server(
        &ca,
        &dir.path().join("cache"),
        "127.0.0.1:0",
        Some(&mt.addr),
        &[],
    );
    let log = dir.path().join("log");
    let _agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0.1"]);

    // The very first point is already the whole disk: marks waited for the copy.
    let store = retention.join("replicas/web01/store");
    let first = wait_for_point(&store, "1", &dir.path().join("point.img"), None);
    assert!(
        first == std::fs::read(&disk).unwrap(),
        "the first point is the disk as it was when the agent started"
    );
    assert!(log.join("copied-d0").exists());
}

#[test]
fn replication_survives_cuts_delays_and_kill_9_of_every_process() {
    use boomerang_testkit::FaultProxy;

    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let base = blank(dir.path(), "base.img", BLOCKS);
    let retention = dir.path().join("retention");
    let cache = dir.path().join("cache");

    let mut mt = master_target(&ca, &retention, "127.0.0.1:0");
    let mt_addr = mt.addr.clone();
    let to_mt = FaultProxy::start(&mt_addr);
    let mut ps = process_server(&ca, &cache, "127.0.0.1:0", Some(to_mt.addr()), &[]);
    let ps_addr = ps.addr.clone();
    let to_ps = FaultProxy::start(&ps_addr);
    let log = dir.path().join("log");
    let start_agent = || {
        agent(
            &ca,
            &disk,
            &log,
            to_ps.addr(),
            &["--segment-size", "1MiB", "--mark-interval", "0.1"],
        )
    };
    let mut agent = start_agent();
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut rng = boomerang_core::sample::XorShift::new(5);
    let mut cookie = 0;
    // Bounded: 14 rounds of writes, each followed by one fault on one hop or one process.
    for round in 0..14u64 {
        let step = 1 + rng.next_u64() % 4;
        write_round(&mut client, &mut cookie, round + 1, step, BLOCKS);
        match round % 7 {
            6 => {
                // The agent itself, between two writes: it starts again on its log.
                agent.signal("-KILL");
                agent = start_agent();
                client = RawNbd::connect(&agent.addr, "d0").unwrap();
            }
            0 => to_ps.cut(),
            1 => to_mt.cut(),
            2 => {
                ps.signal("-KILL");
                ps = process_server(&ca, &cache, &ps_addr, Some(to_mt.addr()), &[]);
            }
            3 => {
                mt.signal("-KILL");
                mt = master_target(&ca, &retention, &mt_addr);
            }
            4 => to_ps.set_delay(Duration::from_millis(20)),
            5 => to_mt.set_rate(Some(2 << 20)),
            _ => unreachable!(),
        }
        std::thread::sleep(Duration::from_millis(150));
        to_ps.set_delay(Duration::ZERO);
        to_mt.set_rate(None);
    }

    // Once the faults stop, the latest point catches up with the source.
    let live = std::fs::read(&disk).unwrap();
    let store = retention.join("replicas/web01/store");
    let store_str = store.to_str().unwrap();
    let exported = dir.path().join("point.img");
    wait_for_point(&store, "latest", &exported, Some(&live));

    // Every point the master target lists is the source at its mark: the stream replayed to
    // the mark's sequence number.
    let points: serde_json::Value = serde_json::from_str(&boomerang(&[
        "store", "points", store_str, "--disk", "d0", "--output", "json",
    ]))
    .unwrap();
    let points = points.as_array().unwrap();
    assert!(points.len() > 5, "{} points", points.len());
    let incoming = retention.join("incoming/web01");
    let replayed = dir.path().join("replayed.img");
    for point in points {
        let (id, seq) = (
            point["id"].as_u64().unwrap(),
            point["seq"].as_u64().unwrap(),
        );
        boomerang(&[
            "store",
            "export",
            store_str,
            "--disk",
            "d0",
            "--point",
            &id.to_string(),
            "--out",
            exported.to_str().unwrap(),
        ]);
        boomerang(&[
            "agent",
            "log",
            "replay",
            incoming.to_str().unwrap(),
            "--disk",
            "d0",
            "--base",
            base.to_str().unwrap(),
            "--to",
            &format!("seq:{seq}"),
            "--out",
            replayed.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&exported).unwrap() == std::fs::read(&replayed).unwrap(),
            "point {id} is the stream at its mark (seq {seq})"
        );
    }
    boomerang(&["store", "verify", store_str]);
    drop(agent);
}

/// Machine web01 with one disk of `blocks` 4 KiB blocks (data where `data(i)`), a process
/// server and a master target on loopback; its agent marks every 0.1 s.
struct Protected {
    ca: PathBuf,
    disk: PathBuf,
    file: std::fs::File,
    retention: PathBuf,
    cache: PathBuf,
    log: PathBuf,
    store: PathBuf,
    point: PathBuf,
    mt: Daemon,
    ps: Daemon,
}

impl Protected {
    fn start(dir: &Path, blocks: u64, data: impl Fn(u64) -> bool) -> Self {
        Self::start_with(dir, blocks, data, "0")
    }

    /// [`Protected::start`], the master target making points at most every `point_every`
    /// seconds (the first mark of a run of its applier always makes one).
    fn start_with(dir: &Path, blocks: u64, data: impl Fn(u64) -> bool, point_every: &str) -> Self {
        use std::os::unix::fs::FileExt;
        let ca = site(dir);
        let disk = blank(dir, "disk.img", blocks);
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for i in (0..blocks).filter(|&i| data(i)) {
            file.write_all_at(&block(i, 1), i * 4096).unwrap();
        }
        let retention = dir.join("retention");
        let cache = dir.join("cache");
        let mt = master_target_every(&ca, &retention, "127.0.0.1:0", point_every);
        let ps = process_server(&ca, &cache, "127.0.0.1:0", Some(&mt.addr), &[]);
        Protected {
            store: retention.join("replicas/web01/store"),
            point: dir.join("point.img"),
            log: dir.join("log"),
            ca,
            disk,
            file,
            retention,
            cache,
            mt,
            ps,
        }
    }

    /// Starts the machine's agent.
    fn agent(&self) -> Daemon {
        self.agent_with(&[])
    }

    /// Starts the machine's agent with `extra` arguments.
    fn agent_with(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--mark-interval", "0.1"];
        args.extend(extra);
        agent(&self.ca, &self.disk, &self.log, &self.ps.addr, &args)
    }

    /// Waits until the newest point is the disk as it is now.
    fn wait_for_disk(&self) {
        let now = std::fs::read(&self.disk).unwrap();
        wait_for_point(&self.store, "latest", &self.point, Some(&now));
    }
}

/// Bytes of write data the master target has received for web01 (its incoming log keeps every
/// record for a day).
fn received_write_bytes(retention: &Path) -> u64 {
    let state = inspect(&retention.join("incoming/web01"));
    state["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes_written"].as_u64().unwrap())
        .sum()
}

#[test]
fn after_a_machine_crash_only_the_blocks_that_differ_from_the_replica_travel() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB, four fifths of it data, protected and replicated.
    let m = Protected::start(dir.path(), 2048, |i| i % 5 != 0);
    use std::os::unix::fs::FileExt;
    let (f, log, retention) = (&m.file, &m.log, &m.retention);
    let mut first = m.agent();
    m.wait_for_disk();
    let copied = received_write_bytes(retention);
    assert!(
        copied >= 2048 * 4096 * 4 / 5,
        "the initial copy sent {copied} bytes"
    );

    // The machine goes down: the agent dies with it, and the disk kept writes the log never
    // saw (two blocks of new data, and a 64 KiB run zeroed).
    first.signal("-KILL");
    std::fs::write(log.join("agent.running"), "another boot\n").unwrap();
    f.write_all_at(&[0xab; 4096], 3 * 4096).unwrap();
    f.write_all_at(&[0xcd; 4096], 1500 * 4096).unwrap();
    f.write_all_at(&[0u8; 65536], 64 * 4096).unwrap();
    f.sync_all().unwrap();

    // Back up: the agent resyncs the whole disk against the replica's digest.
    let _second = m.agent();
    m.wait_for_disk();
    let resent = received_write_bytes(retention) - copied;
    assert_eq!(
        resent,
        2 * 65536,
        "only the two 64 KiB blocks with new data carry data (the zeroed run is one zero record); the disk is {} bytes",
        2048 * 4096
    );
}

/// The last record durable in the process server's cache of web01.
fn cached_last_seq(cache: &Path) -> u64 {
    let files = boomerang_core::log::segment_files(&cache.join("web01")).unwrap();
    // The newest segment may be one just begun, with no record yet.
    files
        .iter()
        .rev()
        .find_map(|f| {
            let reader = boomerang_core::log::SegmentReader::open(f).unwrap();
            reader.map(|r| r.unwrap().seq.0).max()
        })
        .unwrap()
}

/// Cuts the agent's log in `log` before its first record above `keep`: the unsynced end a
/// machine crash loses.
fn cut_log_after(log: &Path, keep: u64) {
    let files = boomerang_core::log::segment_files(log).unwrap();
    for path in files.iter().rev() {
        let bytes = std::fs::read(path).unwrap();
        let mut at = boomerang_core::log::SEGMENT_HEADER_LEN;
        while at < bytes.len() {
            let Ok((record, len)) = boomerang_core::log::decode_frame(&bytes[at..]) else {
                break;
            };
            if record.seq.0 > keep {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .unwrap()
                    .set_len(at as u64)
                    .unwrap();
                return;
            }
            at += len;
        }
    }
    panic!("no record above {keep} in {}", log.display());
}

/// Replicates `m`'s disk, then the machine goes down: the process server holds the last
/// records, which the agent's log had not synced and loses (the log is cut 4 records below
/// them). The disk kept other writes. Returns the last record the process server holds.
fn crash_cutting_records(m: &Protected) -> u64 {
    let mut first = m.agent();
    m.wait_for_disk();
    std::thread::sleep(Duration::from_millis(500));
    first.signal("-KILL");
    let held = cached_last_seq(&m.cache);
    cut_log_after(&m.log, held - 4);
    std::fs::write(m.log.join("agent.running"), "another boot\n").unwrap();
    use std::os::unix::fs::FileExt;
    for i in [5u64, 300, 301, 1000] {
        m.file.write_all_at(&block(i, 2), i * 4096).unwrap();
    }
    m.file.sync_all().unwrap();
    held
}

#[test]
fn after_a_machine_crash_that_cut_records_the_process_server_holds_the_replica_is_made_whole() {
    let dir = tempfile::tempdir().unwrap();
    let m = Protected::start(dir.path(), 1024, |i| i % 3 != 0);
    crash_cutting_records(&m);
    use std::os::unix::fs::FileExt;
    m.file.write_all_at(&[0u8; 8192], 700 * 4096).unwrap();
    m.file.sync_all().unwrap();

    // Back up: the records written since the crash reuse the numbers of those the process
    // server holds. The log goes on after them and the disk is resynced: the newest point is
    // the disk, block for block.
    let _second = m.agent();
    m.wait_for_disk();
    assert!(
        !m.log.join("crash.floor").exists(),
        "the first answer of the process server settled the crash"
    );
}

/// Waits up to a minute for `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first record the agent's log in `log` still holds.
fn first_held(log: &Path) -> u64 {
    let files = boomerang_core::log::segment_files(log).unwrap();
    boomerang_core::log::first_seq_of(&files[0]).unwrap().0
}

#[test]
fn a_process_server_that_lost_its_cache_gets_the_disks_again_and_points_resume_whole() {
    let dir = tempfile::tempdir().unwrap();
    // Points at most hourly, so after the first one the replica image takes writes that no
    // point has (besides the first mark after each start of its applier).
    let mut m = Protected::start_with(dir.path(), 1024, |i| i % 2 == 0, "3600");
    let agent = m.agent_with(&["--segment-size", "1MiB"]);
    m.wait_for_disk();
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    let mut write = |round: u64, blocks: &mut dyn Iterator<Item = u64>| {
        for i in blocks {
            cookie += 1;
            assert_eq!(client.write(cookie, i * 4096, &block(i, round)).unwrap(), 0);
        }
    };
    // In the first quarter of the disk, which nothing writes later: its digest blocks match
    // the replica image after the gap, so the resend leaves them out.
    write(2, &mut (0..256).step_by(3));
    let image = m.retention.join("replicas/web01/d0.img");
    let now = std::fs::read(&m.disk).unwrap();
    wait_until("the replica image takes the writes", || {
        std::fs::read(&image).unwrap() == now
    });
    wait_until(
        "the agent releases what the process server acknowledged",
        || first_held(&m.log) > 1,
    );

    // The process server loses its cache, and comes back empty at its address; the machine
    // goes on writing meanwhile.
    let addr = m.ps.addr.clone();
    m.ps.signal("-KILL");
    std::fs::remove_dir_all(&m.cache).unwrap();
    write(3, &mut (512..1024).step_by(5));
    m.ps = process_server(&m.ca, &m.cache, &addr, Some(&m.mt.addr), &[]);
    write(4, &mut (513..1024).step_by(7));

    // The agent cannot send what the process server lost: its records start again after
    // them, and every disk is resent against the replica. The first point after it is the
    // disk block for block, the writes of round 2, which no point had and which were not
    // resent, included.
    m.wait_for_disk();
    let since = std::fs::read_to_string(m.log.join("lineage.since")).unwrap();
    let first: u64 = since.trim().parse().unwrap();
    assert!(first > 1, "the records start again later: {since:?}");
    for hop in [m.cache.join("web01"), m.retention.join("incoming/web01")] {
        assert_eq!(
            std::fs::read_to_string(hop.join("lineage")).unwrap(),
            format!("0 {first}\n"),
            "{} starts at the same record as the agent",
            hop.display()
        );
    }
    assert!(!m.log.join("resync.all").exists());
    // Two points: the first copy, and the disk after the gap; none in between.
    assert_eq!(store_points(&m.store).len(), 2);
}

#[test]
fn a_machine_crash_and_a_lost_process_server_cache_together_leave_no_record_unapplied() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Protected::start(dir.path(), 1024, |i| i % 3 != 0);
    // (The master target holds the records the crash takes, and made points at some: marks
    // come every 0.1 s.)
    let held = crash_cutting_records(&m);
    // And the process server's cache is lost, once the master target holds every record
    // it had: nothing tells the agent any more what the master target holds.
    wait_until(
        "the master target holds what the process server held",
        || cached_last_seq(&m.retention.join("incoming")) >= held,
    );
    let addr = m.ps.addr.clone();
    m.ps.signal("-KILL");
    std::fs::remove_dir_all(&m.cache).unwrap();
    m.ps = process_server(&m.ca, &m.cache, &addr, Some(&m.mt.addr), &[]);

    // The records start again past any the master target holds: none of the resync's is
    // taken for one applied before, and the newest point is the disk.
    let _second = m.agent();
    m.wait_for_disk();
    let since: u64 = std::fs::read_to_string(m.log.join("lineage.since"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        since > held,
        "the records start again at {since}, past {held}"
    );
    assert_eq!(
        std::fs::read_to_string(m.retention.join("incoming/web01/lineage")).unwrap(),
        format!("0 {since}\n"),
        "the master target starts again there"
    );
}

#[test]
fn an_agent_moved_to_an_empty_process_server_starts_again_there() {
    let dir = tempfile::tempdir().unwrap();
    let m = Protected::start(dir.path(), 1024, |i| i % 2 == 0);
    let mut first = m.agent_with(&["--segment-size", "1MiB"]);
    m.wait_for_disk();
    wait_until(
        "the agent releases what the process server acknowledged",
        || first_held(&m.log) > 1,
    );
    first.signal("-KILL");

    // The machine now sends to another process server, empty, forwarding to the same master
    // target; the first one keeps running, with its cache.
    let cache2 = dir.path().join("cache2");
    let ps2 = process_server(&m.ca, &cache2, "127.0.0.1:0", Some(&m.mt.addr), &[]);
    let second = agent(
        &m.ca,
        &m.disk,
        &m.log,
        &ps2.addr,
        &["--mark-interval", "0.1", "--segment-size", "1MiB"],
    );
    let mut client = RawNbd::connect(&second.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 2, 3, 1024);
    m.wait_for_disk();
    let since = std::fs::read_to_string(m.log.join("lineage.since")).unwrap();
    let first_seq: u64 = since.trim().parse().unwrap();
    for hop in [cache2.join("web01"), m.retention.join("incoming/web01")] {
        assert_eq!(
            std::fs::read_to_string(hop.join("lineage")).unwrap(),
            format!("0 {first_seq}\n"),
            "{} starts at the same record as the agent",
            hop.display()
        );
    }
    // Points go on through the new process server while the old one still runs (the master
    // target refuses its stale stream: see the process server's receive tests).
    write_round(&mut client, &mut cookie, 3, 5, 1024);
    m.wait_for_disk();
}

#[test]
fn marks_between_checkpoints_are_points_the_incoming_log_brings_a_checkpoint_to() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints thinned to one an hour: after the first, marks are points only through the
    // incoming log.
    let (retention, at_marks) = three_points(dir.path());
    let ret = retention.to_str().unwrap();
    let listed: serde_json::Value = serde_json::from_str(&boomerang(&[
        "master-target",
        "points",
        ret,
        "--machine",
        "web01",
        "--disk",
        "d0",
        "--output",
        "json",
    ]))
    .unwrap();
    let seqs: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, at_marks.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    assert!(listed[0]["checkpoint"].is_string(), "{listed}");
    assert!(
        listed[1]["checkpoint"].is_null() && listed[2]["checkpoint"].is_null(),
        "{listed}"
    );
    for (seq, want) in &at_marks {
        let out = dir.path().join(format!("at-{seq}.img"));
        boomerang(&[
            "master-target",
            "export",
            ret,
            "--machine",
            "web01",
            "--disk",
            "d0",
            "--at",
            &seq.to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "disk d0 at seq {seq}"
        );
    }
    // A sequence number before the first checkpoint is refused with the way out.
    let early = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args([
            "master-target",
            "export",
            ret,
            "--machine",
            "web01",
            "--disk",
            "d0",
        ])
        .args([
            "--at",
            "1",
            "--out",
            dir.path().join("early.img").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("not a recovery point"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
}

#[test]
fn a_full_cache_volume_stops_the_acks_until_space_returns_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    const DISK_BLOCKS: u64 = 2048;
    let disk = blank(dir.path(), "disk.img", DISK_BLOCKS);
    let retention = dir.path().join("retention");
    // The master target is away at first: the process server cannot forward, so its 3 MiB
    // cache (1 MiB segments) fills with the first writes.
    let mut mt = master_target(&ca, &retention, "127.0.0.1:0");
    let mt_addr = mt.addr.clone();
    mt.signal("-TERM");
    let cache = dir.path().join("cache");
    let Some(_volume) = SmallVolume::mount(&cache, "3m") else {
        return;
    };
    let ps_log = dir.path().join("ps.log");
    let ps = Daemon::start_logged(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "process-server",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            ca.join("issued/ps1").to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--master-target",
            &mt_addr,
            "--cache-segment-size",
            "1MiB",
        ],
        &ps_log,
    );
    let log = dir.path().join("log");
    let agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0.2"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    // 8 MiB of writes: all acknowledged by the agent, which keeps what the cache refused.
    write_round(&mut client, &mut cookie, 1, 1, DISK_BLOCKS);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&ps_log).unwrap().contains("volume") {
        assert!(
            Instant::now() < deadline,
            "the process server never said its cache is full"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = std::fs::read_to_string(&ps_log).unwrap();
    assert!(
        said.contains("is full") && said.contains(cache.to_str().unwrap()),
        "{said}"
    );

    // Space returns as the master target comes back and takes what the cache holds.
    let _mt = master_target(&ca, &retention, &mt_addr);
    write_round(&mut client, &mut cookie, 2, 5, DISK_BLOCKS);
    let live = std::fs::read(&disk).unwrap();
    let store = retention.join("replicas/web01/store");
    wait_for_point(&store, "latest", &dir.path().join("point.img"), Some(&live));
}

#[test]
fn a_full_retention_volume_stops_the_acks_until_space_returns_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let retention = dir.path().join("retention");
    let Some(_volume) = SmallVolume::mount(&retention, "64m") else {
        return;
    };
    let mt_log = dir.path().join("mt.log");
    let mt = Daemon::start_logged(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "master-target",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            ca.join("issued/mt1").to_str().unwrap(),
            "--retention",
            retention.to_str().unwrap(),
            "--point-every",
            "0",
        ],
        &mt_log,
    );
    let ps = process_server(
        &ca,
        &dir.path().join("cache"),
        "127.0.0.1:0",
        Some(&mt.addr),
        &[],
    );
    let log = dir.path().join("log");
    let agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0.2"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 1, 4, BLOCKS);
    let store = retention.join("replicas/web01/store");
    let point = dir.path().join("point.img");
    wait_for_point(
        &store,
        "latest",
        &point,
        Some(&std::fs::read(&disk).unwrap()),
    );

    // Something else fills the volume: the master target refuses records, and says why.
    let filler = retention.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
    write_round(&mut client, &mut cookie, 2, 1, BLOCKS);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&mt_log)
        .unwrap()
        .contains("is full")
    {
        assert!(
            Instant::now() < deadline,
            "the master target never said its volume is full"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::fs::read_to_string(&mt_log)
            .unwrap()
            .contains(retention.to_str().unwrap())
    );

    // Space returns: every write reaches a point.
    std::fs::remove_file(&filler).unwrap();
    write_round(&mut client, &mut cookie, 3, 3, BLOCKS);
    wait_for_point(
        &store,
        "latest",
        &point,
        Some(&std::fs::read(&disk).unwrap()),
    );
}

#[test]
fn a_long_outage_falls_back_to_the_bitmap_and_resends_only_those_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    const DISK_BLOCKS: u64 = 2048;
    let disk = blank(dir.path(), "disk.img", DISK_BLOCKS);
    let retention = dir.path().join("retention");
    let cache = dir.path().join("cache");
    let mt = master_target(&ca, &retention, "127.0.0.1:0");
    // The process server is down while the machine writes: its address is known, nobody
    // listens there.
    let mut ps = process_server(&ca, &cache, "127.0.0.1:0", Some(&mt.addr), &[]);
    let ps_addr = ps.addr.clone();
    ps.signal("-TERM");
    let log = dir.path().join("log");
    let agent = agent(
        &ca,
        &disk,
        &log,
        &ps_addr,
        &[
            "--log-max",
            "3MiB",
            "--segment-size",
            "1MiB",
            "--mark-interval",
            "0.1",
        ],
    );
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    // About 6 MiB of writes: the log stops at its cap, the rest goes to the bitmap.
    write_round(&mut client, &mut cookie, 1, 1, 1536);
    let state = inspect(&log);
    let dirty = state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap();
    assert!(dirty > 0, "the log reached its cap: {state}");

    // The process server comes back: the log drains, then the dirty blocks are resent.
    let _ps = process_server(&ca, &cache, &ps_addr, Some(&mt.addr), &[]);
    write_round(&mut client, &mut cookie, 2, 7, DISK_BLOCKS);
    let live = std::fs::read(&disk).unwrap();
    let store = retention.join("replicas/web01/store");
    wait_for_point(&store, "latest", &dir.path().join("point.img"), Some(&live));
    let state = inspect(&log);
    assert_eq!(state["bitmaps"][0]["dirty_blocks"], 0, "{state}");
}

#[test]
fn in_sync_mode_an_acknowledged_write_is_already_at_the_process_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let base = blank(dir.path(), "base.img", BLOCKS);
    let cache = dir.path().join("cache");
    let mut ps = process_server(&ca, &cache, "127.0.0.1:0", None, &[]);
    let agent = agent(
        &ca,
        &disk,
        &dir.path().join("log"),
        &ps.addr,
        &["--sync", "--sync-timeout", "1", "--sync-fallback", "fail"],
    );
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 1, 4, BLOCKS);
    // Killed right after the last acknowledgement: every acknowledged write is in its cache.
    ps.signal("-KILL");
    let replayed = dir.path().join("replayed.img");
    boomerang(&[
        "agent",
        "log",
        "replay",
        cache.join("web01").to_str().unwrap(),
        "--disk",
        "d0",
        "--base",
        base.to_str().unwrap(),
        "--out",
        replayed.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&replayed).unwrap() == std::fs::read(&disk).unwrap(),
        "the process server held every acknowledged write"
    );
    // With the process server gone and `--sync-fallback fail`, a write fails (EIO) in about
    // the timeout instead of being acknowledged.
    let started = Instant::now();
    assert_eq!(client.write(99_999, 0, &block(0, 9)).unwrap(), 5);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn the_process_server_holds_its_forwarding_to_max_rate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let retention = dir.path().join("retention");
    let mt = master_target(&ca, &retention, "127.0.0.1:0");
    let ps = process_server(
        &ca,
        &dir.path().join("cache"),
        "127.0.0.1:0",
        Some(&mt.addr),
        &["--max-rate", "1MiB"],
    );
    let agent = agent(
        &ca,
        &disk,
        &dir.path().join("log"),
        &ps.addr,
        &["--mark-interval", "0.2"],
    );
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    // 3 MiB of incompressible writes (compression would defeat the measure).
    let started = Instant::now();
    for i in 0..768u64 {
        cookie += 1;
        let mut data = vec![0u8; 4096];
        boomerang_core::sample::XorShift::new(i + 1).fill(&mut data);
        assert_eq!(client.write(cookie, i * 4096, &data).unwrap(), 0);
    }
    let live = std::fs::read(&disk).unwrap();
    let store = retention.join("replicas/web01/store");
    wait_for_point(&store, "latest", &dir.path().join("point.img"), Some(&live));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "3 MiB at 1 MiB/s took only {took:?}"
    );
}

/// A replica with three points of d0 (the first a checkpoint, the others marks the incoming
/// log holds: `--point-every 3600`), and the disk at each; the processes are stopped after.
/// Inserts a mark in the agent's log at `log` (`agent mark`, retried while the agent starts);
/// its sequence number.
fn mark_now(log: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(["agent", "mark", "--log-dir", log.to_str().unwrap()])
            .args(["--output", "json"])
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            return v["seq"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no mark");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn three_points(dir: &Path) -> (PathBuf, Vec<(u64, Vec<u8>)>) {
    let ca = site(dir);
    let disk = blank(dir, "disk.img", BLOCKS);
    let retention = dir.join("retention");
    let _mt = mt_daemon(
        &ca,
        "mt1",
        &retention,
        &["--listen", "127.0.0.1:0", "--point-every", "3600"],
    );
    let _ps = process_server(&ca, &dir.join("cache"), "127.0.0.1:0", Some(&_mt.addr), &[]);
    let log = dir.join("log");
    let agent = agent(&ca, &disk, &log, &_ps.addr, &["--mark-interval", "0"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    let mut at_marks = Vec::new();
    // Later rounds touch few blocks: the log's records do not cover the disk.
    for (round, step) in [(1, 3), (2, 40), (3, 40)] {
        write_round(&mut client, &mut cookie, round, step, BLOCKS);
        let seq = mark_now(&log);
        at_marks.push((seq, std::fs::read(&disk).unwrap()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = boomerang(&[
            "master-target",
            "points",
            retention.to_str().unwrap(),
            "--machine",
            "web01",
            "--disk",
            "d0",
            "--output",
            "json",
        ]);
        let listed: serde_json::Value = serde_json::from_str(&text).unwrap();
        if listed.as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "points: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (retention, at_marks)
}

/// `master-target recover` for d0 of web01 at `seq` into `target`.
fn recover(retention: &Path, seq: u64, target: &Path, extra: &[&str]) -> Daemon {
    let seq = seq.to_string();
    let mut args = vec![
        "master-target",
        "recover",
        retention.to_str().unwrap(),
        "--machine",
        "web01",
        "--disk",
        "d0",
        "--at",
        &seq,
        "--target",
        target.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    daemon(&args)
}

/// The whole disk as served at `addr`, read with qemu-img.
fn read_served(addr: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd://{addr}/d0"),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(&out).unwrap()
}

fn recovery_state(target: &Path) -> serde_json::Value {
    let path = format!("{}.recovery", target.display());
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn instant_recovery_serves_a_point_at_once_and_hydrates_its_target_across_a_kill_9() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (retention, at_marks) = three_points(dir.path());
    // The second point is a mark between checkpoints: the checkpoint and the log's records.
    let (seq, mut want) = at_marks[1].clone();
    let target = dir.path().join("recovered.img");
    // Hydration held back to 512 KiB/s: the disk (4 MiB) is served long before it is copied.
    let mut recovery = recover(&retention, seq, &target, &["--hydrate-rate", "512KiB"]);
    let size = run(
        "nbdinfo",
        &["--size", &format!("nbd://{}/d0", recovery.addr)],
    );
    assert_eq!(size.trim(), (BLOCKS * 4096).to_string());
    assert!(
        read_served(&recovery.addr, dir.path(), "served-1.img") == want,
        "the served disk is the disk at seq {seq}"
    );
    assert_eq!(recovery_state(&target)["hydrated"], false);
    // The recovered machine writes: pieces of 64 KiB store blocks (one the log's records
    // brought into the target, one only the checkpoint holds), and a run across blocks.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xcd 5000 3000",
            "-c",
            "write -P 0xab 200000 3000",
            "-c",
            "write -P 0xef 61440 131072",
            &format!("nbd://{}/d0", recovery.addr),
        ],
    );
    want[5000..8000].fill(0xcd);
    want[200000..203000].fill(0xab);
    want[61440..61440 + 131072].fill(0xef);
    assert!(read_served(&recovery.addr, dir.path(), "served-2.img") == want);

    // Killed in the middle of the copy, started again: it resumes, and keeps what was
    // written and flushed.
    recovery.signal("-KILL");
    let recovery_again = recover(&retention, seq, &target, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while recovery_state(&target)["hydrated"] != true {
        assert!(Instant::now() < deadline, "hydration never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read_served(&recovery_again.addr, dir.path(), "served-3.img") == want);
    drop(recovery_again);
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the target alone is the disk, with the machine's writes"
    );

    // A damaged held-block map: refused, not resumed as if nothing were held (that would copy
    // the checkpoint over what the machine wrote).
    let held = PathBuf::from(format!("{}.held", target.display()));
    let map = std::fs::read(&held).unwrap();
    std::fs::write(&held, &map[..map.len() / 2]).unwrap();
    let damaged = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "recover", retention.to_str().unwrap()])
        .args(["--machine", "web01", "--disk", "d0", "--target"])
        .arg(&target)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!damaged.status.success());
    let err = String::from_utf8_lossy(&damaged.stderr);
    assert!(
        err.contains("cannot resume") && err.contains("damaged"),
        "{err}"
    );
    std::fs::write(&held, &map).unwrap();
    // A target left half made by a crash (before its state was saved) is made again.
    let fresh = dir.path().join("fresh.img");
    std::fs::write(format!("{}.creating", fresh.display()), b"half made").unwrap();
    let again = recover(&retention, seq, &fresh, &[]);
    assert!(read_served(&again.addr, dir.path(), "served-4.img") == at_marks[1].1);
    drop(again);

    // Materialized as a fixed VHD (what Azure boots): the disk, then its footer; qemu reads
    // it as the same disk.
    let raw = dir.path().join("point.raw");
    let vhd = dir.path().join("point.vhd");
    for (out, format) in [(&raw, "raw"), (&vhd, "vhd")] {
        boomerang(&[
            "master-target",
            "export",
            retention.to_str().unwrap(),
            "--machine",
            "web01",
            "--disk",
            "d0",
            "--at",
            &seq.to_string(),
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let bytes = std::fs::read(&vhd).unwrap();
    assert_eq!(bytes.len() as u64, BLOCKS * 4096 + 512);
    assert_eq!(&bytes[bytes.len() - 512..][..8], b"conectix");
    let info = run(
        "qemu-img",
        &[
            "info",
            "--output",
            "json",
            "--image-opts",
            &format!(
                "driver=vpc,force_size_calc=current_size,file.filename={}",
                vhd.display()
            ),
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (info["format"].as_str(), info["virtual-size"].as_u64()),
        (Some("vpc"), Some(BLOCKS * 4096))
    );
    run(
        "qemu-img",
        &[
            "compare",
            "--image-opts",
            &format!(
                "driver=vpc,force_size_calc=current_size,file.filename={}",
                vhd.display()
            ),
            &format!("driver=raw,file.filename={}", raw.display()),
        ],
    );

    // The same target for another point, and a file a recovery did not make, are refused.
    let other = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "recover", retention.to_str().unwrap()])
        .args(["--machine", "web01", "--disk", "d0", "--at"])
        .arg(at_marks[2].0.to_string())
        .arg("--target")
        .arg(&target)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("is the recovery of"), "{err}");
    let stranger = dir.path().join("disk.img");
    let other = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "recover", retention.to_str().unwrap()])
        .args(["--machine", "web01", "--disk", "d0", "--target"])
        .arg(&stranger)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("not a recovery target"), "{err}");
}

/// Reprotect to the original location, by hand (the job comes next): after a failover, the
/// failed-over disk at site B becomes the source, and site A's master target keeps web01's
/// replica in the machine's original disk. The agent at B copies its disk against the digest
/// of that replica: only the blocks the machine wrote at B travel.
#[test]
fn reprotect_to_the_original_disk_moves_only_the_blocks_the_failed_over_machine_wrote() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = site(d);
    let ca_str = ca.to_str().unwrap();
    // The way back: a master target at site A, a process server at site B.
    for (name, role) in [("mta", "master-target"), ("psb", "process-server")] {
        boomerang(&[
            "pki",
            "issue",
            ca_str,
            "--name",
            name,
            "--role",
            role,
            "--host",
            "127.0.0.1",
        ]);
    }
    // Site A: web01's 8 MiB disk, all data, protected to site B.
    let disk = blank(d, "disk.img", 2048);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..2048u64 {
        f.write_all_at(&block(i, 3), i * 4096).unwrap();
    }
    drop(f);
    let retention_b = d.join("retention-b");
    let point = d.join("point.img");
    {
        let mt = master_target(&ca, &retention_b, "127.0.0.1:0");
        let ps = process_server(&ca, &d.join("cache-a"), "127.0.0.1:0", Some(&mt.addr), &[]);
        let _agent = agent(
            &ca,
            &disk,
            &d.join("log-a"),
            &ps.addr,
            &["--mark-interval", "0.1"],
        );
        wait_for_point(
            &retention_b.join("replicas/web01/store"),
            "latest",
            &point,
            Some(&std::fs::read(&disk).unwrap()),
        );
    }

    // Failover: site A is down; web01's disk is served at site B at its latest point, and the
    // machine writes there: five 64 KiB blocks.
    let failed_over = d.join("failed-over.img");
    let recovery = daemon(&[
        "master-target",
        "recover",
        retention_b.to_str().unwrap(),
        "--machine",
        "web01",
        "--disk",
        "d0",
        "--target",
        failed_over.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let changed_at = [0u64, 1 << 20, (2 << 20) + 65536, 5 << 20, (8 << 20) - 65536];
    let mut io = vec!["-f".to_string(), "raw".into()];
    for (k, at) in changed_at.iter().enumerate() {
        io.extend(["-c".into(), format!("write -P {} {at} 65536", 0x41 + k)]);
    }
    io.push(format!("nbd://{}/d0", recovery.addr));
    run(
        "qemu-io",
        &io.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let state = PathBuf::from(format!("{}.recovery", failed_over.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"hydrated\":true")) {
        assert!(Instant::now() < deadline, "never hydrated");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(recovery);
    let now_at_b = std::fs::read(&failed_over).unwrap();

    // Reprotect: site A's master target keeps web01's replica in the original disk; an agent
    // at site B serves the failed-over disk and ships to the process server at B.
    let retention_a = d.join("retention-a");
    std::fs::create_dir_all(retention_a.join("replicas/web01")).unwrap();
    std::os::unix::fs::symlink(&disk, retention_a.join("replicas/web01/d0.img")).unwrap();
    let mta = mt_daemon(
        &ca,
        "mta",
        &retention_a,
        &[
            "--listen",
            "127.0.0.1:0",
            "--block-size",
            "4KiB",
            "--point-every",
            "0",
        ],
    );
    let psb = daemon(&[
        "process-server",
        "--listen",
        "127.0.0.1:0",
        "--tls",
        ca.join("issued/psb").to_str().unwrap(),
        "--cache",
        d.join("cache-b").to_str().unwrap(),
        "--master-target",
        &mta.addr,
    ]);
    let _agent_b = agent(
        &ca,
        &failed_over,
        &d.join("log-b"),
        &psb.addr,
        &["--mark-interval", "0.1"],
    );
    wait_for_point(
        &retention_a.join("replicas/web01/store"),
        "latest",
        &point,
        Some(&now_at_b),
    );
    assert!(
        std::fs::read(&disk).unwrap() == now_at_b,
        "the original disk is the failed-over one"
    );
    let moved = received_write_bytes(&retention_a);
    let changed = changed_at.len() as u64 * 65536;
    let size = 2048 * 4096;
    assert!(
        (changed..=changed * 11 / 10 + size / 1000).contains(&moved),
        "reprotect moved {moved} bytes for {changed} changed of a {size}-byte disk"
    );
}

/// The points in `store` (`store points --output json`); none before the store exists.
fn store_points(store: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args([
            "store",
            "points",
            store.to_str().unwrap(),
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn the_master_target_drops_points_past_the_policys_retention_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let disk = blank(dir.path(), "disk.img", BLOCKS);
    let retention = dir.path().join("retention");
    let mt = mt_daemon(
        &ca,
        "mt1",
        &retention,
        &[
            "--listen",
            "127.0.0.1:0",
            "--point-every",
            "0",
            "--prune-every",
            "0.2",
        ],
    );
    let ps = process_server(
        &ca,
        &dir.path().join("cache"),
        "127.0.0.1:0",
        Some(&mt.addr),
        &[],
    );
    let log = dir.path().join("log");
    let agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0.1"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    write_round(&mut client, &mut cookie, 1, 3, BLOCKS);
    let store = retention.join("replicas/web01/store");
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_points(&store).len() < 3 {
        assert!(Instant::now() < deadline, "no points");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Until a policy says, nothing is dropped.
    std::thread::sleep(Duration::from_millis(600));
    assert!(store_points(&store).len() >= 3);
    // A retention of 0 s (as a policy would set it through its protect job): only the newest
    // point stays, and it is still the disk.
    drop(agent);
    std::fs::write(retention.join("replicas/web01/retention"), "0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_points(&store).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "points past the retention stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = dir.path().join("newest.img");
    wait_for_point(&store, "latest", &out, Some(&std::fs::read(&disk).unwrap()));
    let verify = boomerang(&[
        "store",
        "verify",
        store.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let verify: serde_json::Value = serde_json::from_str(&verify).unwrap();
    assert_eq!(verify["bad"], serde_json::json!([]), "{verify}");
    assert_eq!(verify["points"], 1);
}

#[test]
fn the_master_target_keeps_sealed_recovery_points_on_azure_blob() {
    if !boomerang_testkit::azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = site(d);
    let key = d.join("site-b.key");
    let made = boomerang(&["store", "keygen", key.to_str().unwrap()]);
    assert!(made.contains("back that file up"), "{made}");
    let root = format!("azure://{}/mt1", boomerang_testkit::unique("pipeline"));
    let retention = d.join("retention");
    let mt_args = [
        "--listen",
        "127.0.0.1:0",
        "--block-size",
        "4KiB",
        "--point-every",
        "0",
        "--store-root",
        &root,
        "--store-key-file",
        key.to_str().unwrap(),
    ];
    let mt = mt_daemon(&ca, "mt1", &retention, &mt_args);
    let ps = process_server(&ca, &d.join("cache"), "127.0.0.1:0", Some(&mt.addr), &[]);
    let disk = blank(d, "disk.img", BLOCKS);
    let log = d.join("log");
    let agent = agent(&ca, &disk, &log, &ps.addr, &["--mark-interval", "0"]);
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let mut cookie = 0;
    let mut at_marks = Vec::new();
    for (round, step) in [(1, 3), (2, 40)] {
        write_round(&mut client, &mut cookie, round, step, BLOCKS);
        let seq = mark_now(&log);
        at_marks.push((seq, std::fs::read(&disk).unwrap()));
    }
    // Every mark is a point, read from the store on Azure Blob (the volume says where it is),
    // and exports exactly the disk as it was then.
    let retention_s = retention.to_str().unwrap();
    for (seq, want) in &at_marks {
        let out = d.join(format!("at-{seq}.img"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = Command::new(env!("CARGO_BIN_EXE_boomerang"))
                .args(["master-target", "export", retention_s, "--machine", "web01"])
                .args(["--disk", "d0", "--at", &seq.to_string()])
                .args(["--out", out.to_str().unwrap()])
                .output()
                .unwrap();
            if result.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "point {seq} never came: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(std::fs::read(&out).unwrap() == *want, "point {seq}");
    }
    assert!(
        !retention.join("replicas/web01/store").exists(),
        "no store on the volume"
    );
    // Instant recovery reads the point from there too.
    if have("qemu-img") {
        let (seq, want) = at_marks.last().unwrap();
        let served = recover(&retention, *seq, &d.join("target.img"), &[]);
        assert!(read_served(&served.addr, d, "served.img") == *want);
    }
    // The store is sealed: it opens with its key only, and then verifies.
    let store = format!("{root}/web01/lineage-0");
    let points = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(["store", "verify", &store])
            .args(extra)
            .output()
            .unwrap()
    };
    let without = points(&[]);
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("sealed"));
    let other = d.join("other.key");
    boomerang(&["store", "keygen", other.to_str().unwrap()]);
    let wrong = points(&["--key-file", other.to_str().unwrap()]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not the key"));
    let right = points(&["--key-file", key.to_str().unwrap()]);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    // The volume keeps its store root: started with another, the master target says so.
    drop((agent, ps, mt));
    let tls = ca.join("issued/mt1");
    let moved = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "--tls", tls.to_str().unwrap()])
        .args(["--retention", retention_s, "--listen", "127.0.0.1:0"])
        .args(["--store-root", "azure://elsewhere/mt1"])
        .output()
        .unwrap();
    assert!(!moved.status.success());
    let said = String::from_utf8_lossy(&moved.stderr);
    assert!(said.contains(&root) && said.contains("keeps one"), "{said}");
}

#[test]
fn two_machines_cloned_from_one_template_store_their_common_blocks_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = site(d);
    boomerang(&[
        "pki",
        "issue",
        ca.to_str().unwrap(),
        "--name",
        "web02",
        "--role",
        "agent",
    ]);
    // The replica stores under one root, as at a site on Azure Blob: one group.
    let stores = d.join("stores");
    let mt = mt_daemon(
        &ca,
        "mt1",
        &d.join("retention"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--block-size",
            "4KiB",
            "--point-every",
            "0",
            "--store-root",
            stores.to_str().unwrap(),
        ],
    );
    let ps = process_server(&ca, &d.join("cache"), "127.0.0.1:0", Some(&mt.addr), &[]);
    // Two machines cloned from one template of random (incompressible) blocks.
    let mut template = vec![0u8; (BLOCKS * 4096) as usize];
    boomerang_core::sample::XorShift::new(3).fill(&mut template);
    let mut agents = Vec::new();
    for machine in ["web01", "web02"] {
        let disk = d.join(format!("{machine}.img"));
        std::fs::write(&disk, &template).unwrap();
        let log = d.join(format!("log-{machine}"));
        agents.push(agent_of(
            machine,
            &ca,
            &disk,
            &log,
            &ps.addr,
            &["--mark-interval", "0.2"],
        ));
        // Its copy made a point holding the whole template.
        let out = d.join(format!("{machine}-point.img"));
        let store = stores.join(machine).join("lineage-0");
        wait_for_point(&store, "latest", &out, Some(&template));
    }
    let bytes = |dir: &Path| -> u64 {
        walk_files(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    let chunks = bytes(&stores.join(".shared/chunks"));
    assert!(
        chunks >= template.len() as u64 && chunks < template.len() as u64 * 5 / 4,
        "{chunks} bytes of chunks for two clones of a {} byte template",
        template.len()
    );
    for machine in ["web01", "web02"] {
        assert!(!stores.join(machine).join("lineage-0/chunks").exists());
    }
    // The store's usage says so: the chunks counted are the group's, once.
    let store = stores.join("web02/lineage-0");
    let usage: serde_json::Value = serde_json::from_str(&boomerang(&[
        "store",
        "usage",
        store.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(usage["group"], true, "{usage}");
    assert_eq!(usage["chunk_bytes"], chunks, "{usage}");
    assert!(usage["point_objects"].as_u64().unwrap() >= 1, "{usage}");
    drop((agents, ps, mt));
}

/// Every file under `dir`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}
