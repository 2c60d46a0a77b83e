//! The mobility agent end to end: `boomerang agent` serves a disk over NBD to real clients
//! (qemu-io, fio's nbd engine), its log replayed onto the starting image gives the live image
//! at the last record and at an earlier sequence number, and fio verifies the replayed image.

use std::path::Path;
use std::process::Command;

use boomerang_testkit::{Daemon, RawNbd, SmallVolume, have, run, sparse_file};
use serde_json::Value;

fn boomerang(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_boomerang"), args)
}

/// A running agent serving `d0` (a [`Daemon`]: killed when dropped if still running).
struct Agent(Daemon);

impl std::ops::Deref for Agent {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.0
    }
}

impl Agent {
    fn start(disk: &Path, log: &Path, extra: &[&str]) -> Agent {
        let disk = format!("d0={}", disk.display());
        let mut args = vec![
            "agent",
            "--disk",
            &disk,
            "--listen",
            "127.0.0.1:0",
            "--log-dir",
            log.to_str().unwrap(),
        ];
        args.extend(extra);
        Agent(Daemon::start(env!("CARGO_BIN_EXE_boomerang"), &args))
    }

    fn uri(&self) -> String {
        format!("nbd://{}/d0", self.addr)
    }

    /// Stops the agent with SIGTERM and checks that it stopped cleanly.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let status = self.signal("-TERM");
        assert!(status.success(), "the agent exited with {status}");
    }
}

/// `agent log inspect --output json`.
fn inspect(log: &Path) -> Value {
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

/// `agent log replay` of disk d0 onto a copy of `base`.
fn replay_output(log: &Path, base: &Path, to: &str, out: &Path) -> std::process::Output {
    let (log, base, out) = (
        log.to_str().unwrap(),
        base.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args([
            "agent", "log", "replay", log, "--disk", "d0", "--base", base,
        ])
        .args(["--to", to, "--out", out])
        .output()
        .unwrap()
}

/// Like [`replay_output`], and panics if the replay fails.
fn replay(log: &Path, base: &Path, to: &str, out: &Path) {
    let o = replay_output(log, base, to, out);
    assert!(
        o.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn last_seq(log: &Path) -> u64 {
    let v = inspect(log);
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["last_seq"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn writes_through_the_agent_replay_exactly() {
    if !have("qemu-io") || !have("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let log = dir.path().join("log");
    sparse_file(&disk, 64 << 20);
    let base = dir.path().join("base.img");
    std::fs::copy(&disk, &base).unwrap();

    // Small segments so that the log rolls over; marks every 200 ms.
    let agent = Agent::start(
        &disk,
        &log,
        &["--segment-size", "1MiB", "--mark-interval", "0.2"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 3M",
            "-c",
            "write -z 1M 512k",
            "-c",
            "discard 2M 256k",
            &agent.uri(),
        ],
    );
    let first = last_seq(&log);
    let at_first = dir.path().join("at-first.img");
    std::fs::copy(&disk, &at_first).unwrap();

    let fio = [
        "--name=capture",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--offset=16M",
        "--io_size=8M",
        "--verify=crc32c",
        "--randseed=99",
        "--verify_state_save=0",
    ];
    let mut args: Vec<String> = fio.iter().map(|s| s.to_string()).collect();
    args.push("--ioengine=nbd".into());
    args.push(format!("--uri={}", agent.uri()));
    run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(std::time::Duration::from_millis(500));
    agent.stop();

    let state = inspect(&log);
    assert!(
        state["segments"].as_array().unwrap().len() > 1,
        "the log rolled over"
    );
    assert!(
        !state["marks"].as_array().unwrap().is_empty(),
        "crash-consistent marks were inserted"
    );

    // Replay to the last mark (taken after fio finished) equals the live image, and so does
    // replay to the end of the log.
    let last_mark = state["marks"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let at_mark = dir.path().join("at-last-mark.img");
    let to = format!("mark:{last_mark}");
    replay(&log, &base, &to, &at_mark);
    assert!(
        std::fs::read(&at_mark).unwrap() == std::fs::read(&disk).unwrap(),
        "replay to the last mark differs from the live image"
    );
    let replayed = dir.path().join("replayed.img");
    replay(&log, &base, "latest", &replayed);
    assert!(
        std::fs::read(&replayed).unwrap() == std::fs::read(&disk).unwrap(),
        "replay to latest differs from the live image"
    );

    // Replay to an earlier sequence number equals the image as it was then.
    let early = dir.path().join("early.img");
    let to = format!("seq:{first}");
    replay(&log, &base, &to, &early);
    assert!(
        std::fs::read(&early).unwrap() == std::fs::read(&at_first).unwrap(),
        "replay to seq {first} differs from the image at that time"
    );

    // fio verifies what it wrote, on the replayed image.
    let mut args: Vec<String> = fio.iter().map(|s| s.to_string()).collect();
    args.push("--ioengine=psync".into());
    args.push(format!("--filename={}", at_mark.display()));
    args.push("--verify_only".into());
    run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());

    // A mark that is not in the log is refused.
    let out = replay_output(&log, &base, "mark:999999", &dir.path().join("x.img"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mark 999999 is not in the log"));
}

#[test]
fn one_log_directory_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 1 << 20);
    let log = dir.path().join("log");
    let first = Agent::start(&disk, &log, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args([
            "agent",
            "--disk",
            &format!("d0={}", disk.display()),
            "--listen",
            "127.0.0.1:0",
            "--log-dir",
            log.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first.stop();
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let log = dir.path().join("log");
    const BLOCKS: u64 = 16384;
    sparse_file(&disk, BLOCKS * 4096);
    let base = dir.path().join("base.img");
    std::fs::copy(&disk, &base).unwrap();

    let mut agent = Agent::start(
        &disk,
        &log,
        &["--mark-interval", "0.05", "--segment-size", "1MiB"],
    );
    let mut client = RawNbd::connect(&agent.addr, "d0").unwrap();
    let writer = std::thread::spawn(move || {
        // Block i gets the pattern i, each block written once, one write at a time.
        let mut acked = 0u64;
        for i in 0..BLOCKS {
            let data: Vec<u8> = (0..512).flat_map(|_| (i + 1).to_le_bytes()).collect();
            match client.write(i, i * 4096, &data) {
                Ok(0) => acked = i + 1,
                Ok(err) => panic!("write {i} failed with errno {err}"),
                Err(_) => break,
            }
        }
        acked
    });
    std::thread::sleep(std::time::Duration::from_millis(400));
    agent.signal("-KILL");
    let acked = writer.join().unwrap();
    assert!(
        acked > 100 && acked < BLOCKS,
        "the kill must land mid-run (acked {acked})"
    );

    // The log as it is after the crash, replayed onto the starting image.
    let replayed = dir.path().join("replayed.img");
    replay(&log, &base, "latest", &replayed);
    let live = std::fs::read(&disk).unwrap();
    let again = std::fs::read(&replayed).unwrap();
    for i in 0..BLOCKS {
        let range = (i * 4096) as usize..((i + 1) * 4096) as usize;
        let want: Vec<u8> = (0..512).flat_map(|_| (i + 1).to_le_bytes()).collect();
        if i < acked {
            assert!(
                live[range.clone()] == want[..],
                "acknowledged block {i} is not on the disk"
            );
            assert!(
                again[range] == want[..],
                "acknowledged block {i} is not in the log"
            );
        } else if i > acked {
            assert!(
                live[range.clone()].iter().all(|&b| b == 0) && again[range].iter().all(|&b| b == 0),
                "block {i} was never written"
            );
        }
    }

    // The agent starts again on the same log, cutting a torn tail if there is one and writing
    // the newest segment's changes to the disk again (the write in flight at the kill may be
    // logged but not on the disk). Then the disk is exactly the log replayed.
    let restarted = Agent::start(&disk, &log, &[]);
    restarted.stop();
    replay(&log, &base, "latest", &replayed);
    assert!(
        std::fs::read(&disk).unwrap() == std::fs::read(&replayed).unwrap(),
        "after the restart the disk equals its log replayed"
    );
}

#[test]
fn app_marks_run_the_hooks_and_fall_back_to_crash_marks() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 1 << 20);
    let log = dir.path().join("log");
    let journal = dir.path().join("hooks.txt");
    let record = |word: &str| format!("echo {word} >> {}", journal.display());
    let mark = |app: bool| -> Value {
        let mut args = vec![
            "agent",
            "mark",
            "--log-dir",
            log.to_str().unwrap(),
            "--output",
            "json",
        ];
        if app {
            args.push("--app");
        }
        serde_json::from_str(&boomerang(&args)).unwrap()
    };

    // Hooks that work: an app-consistent mark between freeze and thaw.
    let agent = Agent::start(
        &disk,
        &log,
        &[
            "--mark-interval",
            "0",
            "--freeze-hook",
            &record("frozen"),
            "--thaw-hook",
            &record("thawed"),
        ],
    );
    let m = mark(true);
    assert_eq!(m["kind"], "app", "{m}");
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap(),
        "frozen\nthawed\n"
    );
    let c = mark(false);
    assert_eq!(c["kind"], "crash");
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap(),
        "frozen\nthawed\n",
        "crash marks run no hooks"
    );
    agent.stop();

    // A failing freeze hook: a crash-consistent mark, a warning, and the thaw still runs.
    let agent = Agent::start(
        &disk,
        &log,
        &[
            "--mark-interval",
            "0",
            "--freeze-hook",
            "echo no >&2; exit 3",
            "--thaw-hook",
            &record("thawed-after-failure"),
        ],
    );
    let m = mark(true);
    assert_eq!(m["kind"], "crash", "{m}");
    assert!(m["warnings"][0].as_str().unwrap().contains("failed"), "{m}");
    assert!(
        std::fs::read_to_string(&journal)
            .unwrap()
            .ends_with("thawed-after-failure\n")
    );
    agent.stop();

    // A hanging freeze hook is stopped after the timeout; the mark is not stuck.
    let agent = Agent::start(
        &disk,
        &log,
        &[
            "--mark-interval",
            "0",
            "--freeze-hook",
            "sleep 30",
            "--hook-timeout",
            "0.5",
        ],
    );
    let started = std::time::Instant::now();
    let m = mark(true);
    assert_eq!(m["kind"], "crash", "{m}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "a hanging hook blocked the mark"
    );
    agent.stop();

    // The marks are in the log, ids continuing across restarts, and replay finds them.
    let state = inspect(&log);
    let kinds: Vec<&str> = state["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["app", "crash", "crash", "crash"]);
    let ids: Vec<u64> = state["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    let out = dir.path().join("at-mark.img");
    replay(&log, &disk, "mark:2", &out);

    // No agent: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["agent", "mark", "--log-dir", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn past_its_cap_the_log_hands_over_to_the_bitmap() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 16 << 20);
    let base = dir.path().join("base.img");
    std::fs::copy(&disk, &base).unwrap();
    let log = dir.path().join("log");
    let agent = Agent::start(
        &disk,
        &log,
        &[
            "--log-max",
            "2MiB",
            "--segment-size",
            "1MiB",
            "--mark-interval",
            "0",
        ],
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 1M", &agent.uri()],
    );
    let before_cap = last_seq(&log);
    let at_cap = dir.path().join("at-cap.img");
    std::fs::copy(&disk, &at_cap).unwrap();
    // Past the cap every write still succeeds and reads back.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 1M 6M",
            "-c",
            "read -P 0x22 1M 6M",
            "-c",
            "flush",
            &agent.uri(),
        ],
    );
    agent.stop();

    let state = inspect(&log);
    let dirty = state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap();
    assert!(dirty > 0, "{state}");
    let logged: u64 = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        logged <= 2 << 20,
        "the log grew past its cap: {logged} bytes"
    );

    // Replay to the end would be wrong, so it is refused; up to the cap it is exact.
    let out = replay_output(&log, &base, "latest", &dir.path().join("x.img"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("incomplete"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = dir.path().join("replayed.img");
    let to = format!("seq:{before_cap}");
    replay(&log, &base, &to, &replayed);
    assert!(std::fs::read(&replayed).unwrap() == std::fs::read(&at_cap).unwrap());
}

#[test]
fn a_full_log_volume_switches_to_the_bitmap_and_loses_nothing() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 16 << 20);
    let log = dir.path().join("log");
    let Some(volume) = SmallVolume::mount(&log, "3m") else {
        return;
    };
    let agent = Agent::start(
        &disk,
        &log,
        &["--segment-size", "1MiB", "--mark-interval", "0"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 8M",
            "-c",
            "flush",
            "-c",
            "read -P 0x33 0 8M",
            &agent.uri(),
        ],
    );
    let state = inspect(&log);
    assert!(
        state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap() > 0,
        "{state}"
    );
    agent.stop();
    let data = std::fs::read(&disk).unwrap();
    assert!(
        data[..8 << 20].iter().all(|&b| b == 0x33),
        "every acknowledged write is on the disk"
    );
    drop(volume);
}

#[test]
fn real_clients_against_the_agent() {
    if !have("nbdinfo") || !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 8 << 20);
    let base = dir.path().join("base.img");
    std::fs::copy(&disk, &base).unwrap();
    let log = dir.path().join("log");
    let agent = Agent::start(&disk, &log, &["--mark-interval", "0"]);

    let list = run("nbdinfo", &["--list", &format!("nbd://{}", agent.addr)]);
    assert!(list.contains("d0"), "{list}");
    let info = run("nbdinfo", &["--size", &agent.uri()]);
    assert_eq!(info.trim(), (8u64 << 20).to_string());

    // nbdcopy into the agent, then out again; qemu-img reads it too.
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &agent.uri()]);
    let back = dir.path().join("back.img");
    run("nbdcopy", &[&agent.uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
    let converted = dir.path().join("converted.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &agent.uri(),
            converted.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            src.to_str().unwrap(),
            converted.to_str().unwrap(),
        ],
    );
    let map = run("nbdinfo", &["--map", &agent.uri()]);
    assert!(map.lines().count() >= 1, "{map}");
    agent.stop();

    // What went through the agent is in its log.
    let replayed = dir.path().join("replayed.img");
    replay(&log, &base, "latest", &replayed);
    assert!(std::fs::read(&replayed).unwrap() == data);
}

#[test]
fn a_full_disk_fails_the_write_and_marks_its_range_for_resync() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(volume) = SmallVolume::mount(&small, "1m") else {
        return;
    };
    // A sparse 8 MiB disk on a 1 MiB volume: writes past the free space fail with ENOSPC.
    let disk = small.join("disk.img");
    sparse_file(&disk, 8 << 20);
    let log = dir.path().join("log");
    let agent = Agent::start(&disk, &log, &["--mark-interval", "0"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 0 4M", &agent.uri()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("No space left") || text.contains("failed"),
        "the client must see the error: {text}"
    );
    agent.stop();
    let state = inspect(&log);
    assert!(
        state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap() > 0,
        "the refused range must be marked: {state}"
    );
    drop(volume);
}

#[test]
fn after_a_machine_crash_every_disk_is_marked_for_resync() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, 4 << 20);
    let log = dir.path().join("log");
    // A clean run leaves no mark; the bitmap stays empty.
    Agent::start(&disk, &log, &["--mark-interval", "0"]).stop();
    assert!(
        !log.join("agent.running").exists(),
        "a clean stop removes the running marker"
    );
    // An agent that was running on another boot: the machine went down under it.
    std::fs::write(
        log.join("agent.running"),
        "00000000-0000-0000-0000-000000000000",
    )
    .unwrap();
    Agent::start(&disk, &log, &["--mark-interval", "0"]).stop();
    let state = inspect(&log);
    assert_eq!(
        state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap(),
        64,
        "all 64 blocks of 64 KiB: {state}"
    );
    // And that state outlives the next clean restart, until a resync.
    Agent::start(&disk, &log, &["--mark-interval", "0"]).stop();
    let state = inspect(&log);
    assert_eq!(state["bitmaps"][0]["dirty_blocks"].as_u64().unwrap(), 64);
}
