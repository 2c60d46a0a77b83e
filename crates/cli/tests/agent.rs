//! The mobility agent end to end: `boomerang agent` serves a disk over NBD to real clients
//! (qemu-io, fio's nbd engine), its log replayed onto the starting image gives the live image
//! at the last record and at an earlier sequence number, and fio verifies the replayed image.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn have(tool: &str) -> bool {
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

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn boomerang(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_boomerang"), args)
}

/// A running agent; stopped with SIGTERM (by its own pid) when dropped.
struct Agent {
    child: Child,
    addr: String,
}

impl Agent {
    fn start(disk: &Path, log: &Path, extra: &[&str]) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args([
                "agent",
                "--disk",
                &format!("d0={}", disk.display()),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--log-dir", log.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Agent { child, addr }
    }

    fn uri(&self) -> String {
        format!("nbd://{}/d0", self.addr)
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn last_seq(log: &Path) -> u64 {
    let v: Value = serde_json::from_str(&boomerang(&[
        "agent",
        "log",
        "inspect",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
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
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
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
    ];
    let mut args: Vec<String> = fio.iter().map(|s| s.to_string()).collect();
    args.push("--ioengine=nbd".into());
    args.push(format!("--uri={}", agent.uri()));
    run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(std::time::Duration::from_millis(500));
    agent.stop();

    let inspect: Value = serde_json::from_str(&boomerang(&[
        "agent",
        "log",
        "inspect",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    assert!(
        inspect["segments"].as_array().unwrap().len() > 1,
        "the log rolled over"
    );
    assert!(
        !inspect["marks"].as_array().unwrap().is_empty(),
        "crash-consistent marks were inserted"
    );

    // Replay to the end equals the live image.
    let replayed = dir.path().join("replayed.img");
    boomerang(&[
        "agent",
        "log",
        "replay",
        log.to_str().unwrap(),
        "--disk",
        "d0",
        "--base",
        base.to_str().unwrap(),
        "--out",
        replayed.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&replayed).unwrap() == std::fs::read(&disk).unwrap(),
        "replay to latest differs from the live image"
    );

    // Replay to an earlier sequence number equals the image as it was then.
    let early = dir.path().join("early.img");
    let to = format!("seq:{first}");
    boomerang(&[
        "agent",
        "log",
        "replay",
        log.to_str().unwrap(),
        "--disk",
        "d0",
        "--base",
        base.to_str().unwrap(),
        "--to",
        &to,
        "--out",
        early.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&early).unwrap() == std::fs::read(&at_first).unwrap(),
        "replay to seq {first} differs from the image at that time"
    );

    // fio verifies what it wrote, on the replayed image.
    let mut args: Vec<String> = fio.iter().map(|s| s.to_string()).collect();
    args.push("--ioengine=psync".into());
    args.push(format!("--filename={}", replayed.display()));
    args.push("--verify_only".into());
    run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());

    // A mark that is not in the log is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args([
            "agent",
            "log",
            "replay",
            log.to_str().unwrap(),
            "--disk",
            "d0",
            "--base",
            base.to_str().unwrap(),
            "--to",
            "mark:999999",
            "--out",
            dir.path().join("x.img").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mark 999999 is not in the log"));
}

#[test]
fn one_log_directory_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
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
