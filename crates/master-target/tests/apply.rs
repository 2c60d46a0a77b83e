//! The master target over mutual TLS on loopback: a stream from a process server becomes
//! recovery points, one per mark, each exactly the disk as it was at that mark; across a
//! restart; and the disk limit is enforced.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boomerang_core::log::{MarkId, MarkKind, Op, Record, UnixNanos};
use boomerang_core::{DiskName, Seq};
use boomerang_master_target::{Config, receiver, replica_store};
use boomerang_store::{NoProgress, Store};
use boomerang_wire::pki::{self, CertRole};
use boomerang_wire::tls::{self, TlsIdentity};
use boomerang_wire::{ErrorCode, Frame, Records, Role, WireError};
use bytes::Bytes;

const SIZE: u64 = 1 << 20;

fn sda() -> DiskName {
    DiskName::new("sda").unwrap()
}

struct Client {
    rd: tls::ClientReader,
    wr: tls::ClientWriter,
}

async fn open(addr: &str, ca: &Path, disks: Vec<DiskName>) -> Result<(Client, Seq), WireError> {
    open_lineage(addr, ca, disks, 0, Seq(1)).await
}

/// As [`open`], for records of lineage `lineage` from `since` on.
async fn open_lineage(
    addr: &str,
    ca: &Path,
    disks: Vec<DiskName>,
    lineage: u64,
    since: Seq,
) -> Result<(Client, Seq), WireError> {
    let id = TlsIdentity::load(&ca.join("issued/ps1")).unwrap();
    let (rd, mut wr, _) = tls::dial(&id, addr, Role::ProcessServer, "ps1", Role::MasterTarget)
        .await
        .map_err(|e| match e {
            tls::DialError::Wire(w) => w,
            other => panic!("{other}"),
        })?;
    let mut rd = rd;
    wr.send(&Frame::Open {
        stream: "web01".into(),
        disks,
        lineage,
        since,
    })
    .await?;
    match rd.read().await? {
        Frame::Resume { next_seq, .. } => Ok((Client { rd, wr }, next_seq)),
        Frame::Error { code, message } => Err(WireError::Refused { code, message }),
        other => panic!("unexpected {other:?}"),
    }
}

impl Client {
    async fn send(&mut self, records: &[Record]) {
        let mut bytes = Vec::new();
        for r in records {
            r.encode(&mut bytes).unwrap();
        }
        let batch = Records::new(Bytes::from(bytes)).unwrap();
        let last = batch.last_seq();
        self.wr.send(&Frame::Records(batch)).await.unwrap();
        loop {
            match self.rd.read().await.unwrap() {
                Frame::Ack { durable, .. } if durable == last => return,
                Frame::Ack { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A site's CA, with certificates for the master target mt1 (at 127.0.0.1) and the process
/// server ps1.
fn site(dir: &Path) -> std::path::PathBuf {
    let ca = dir.join("ca");
    pki::init_ca(&ca).unwrap();
    pki::issue(
        &ca,
        "mt1",
        CertRole::Wire(Role::MasterTarget),
        &["127.0.0.1".into()],
        30,
    )
    .unwrap();
    pki::issue(&ca, "ps1", CertRole::Wire(Role::ProcessServer), &[], 30).unwrap();
    ca
}

/// [`open`] after a restart: the stream may still be busy for a moment.
async fn reopen(addr: &str, ca: &Path, disks: Vec<DiskName>) -> (Client, Seq) {
    loop {
        match open(addr, ca, disks.clone()).await {
            Ok(c) => return c,
            Err(WireError::Refused {
                code: ErrorCode::StreamBusy,
                ..
            }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A workload: writes, zeroes and marks, with the disk as it should be at each mark.
struct Workload {
    seq: u64,
    disk: Vec<u8>,
    at_marks: Vec<(Seq, Vec<u8>)>,
    rng: boomerang_core::sample::XorShift,
}

impl Workload {
    fn next(&mut self) -> Record {
        self.seq += 1;
        let seq = Seq(self.seq);
        let r = self.rng.next_u64();
        let op = if self.seq == 1 {
            Op::Resize {
                disk: sda(),
                size: SIZE,
            }
        } else if r % 10 == 0 {
            self.at_marks.push((seq, self.disk.clone()));
            Op::Mark {
                kind: MarkKind::Crash,
                id: MarkId(self.seq),
                time: UnixNanos(self.seq),
            }
        } else if r % 10 == 1 {
            let offset = ((r >> 8) % SIZE) & !511;
            let len = ((r >> 40) % 200_000).min(SIZE - offset);
            self.disk[offset as usize..(offset + len) as usize].fill(0);
            Op::Zero {
                disk: sda(),
                offset,
                len,
            }
        } else {
            let offset = (r >> 8) % (SIZE - 70_000);
            let len = 1 + (r >> 40) % 70_000;
            let mut data = vec![0u8; len as usize];
            self.rng.fill(&mut data);
            self.disk[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            Op::Write {
                disk: sda(),
                offset,
                data,
            }
        };
        Record { seq, op }
    }
}

async fn start(
    ca: &Path,
    retention: &Path,
    max_disks: usize,
) -> (
    String,
    tokio::sync::watch::Sender<bool>,
    Arc<boomerang_master_target::Metrics>,
) {
    let (addr, stop, metrics, _) = start_with_replicas(ca, retention, max_disks).await;
    (addr, stop, metrics)
}

/// [`start`], and the handle on the replicas.
async fn start_with_replicas(
    ca: &Path,
    retention: &Path,
    max_disks: usize,
) -> (
    String,
    tokio::sync::watch::Sender<bool>,
    Arc<boomerang_master_target::Metrics>,
    Arc<boomerang_master_target::Replicas>,
) {
    let (server, metrics, replicas) = boomerang_master_target::receiver_with_replicas(Config {
        name: "mt1".into(),
        tls: TlsIdentity::load(&ca.join("issued/mt1")).unwrap(),
        retention: retention.to_path_buf(),
        max_disks,
        block_size: 4096,
        point_every: Duration::ZERO,
        log_window: Duration::from_secs(3600),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&server).serve(listener, stopped));
    (addr, stop, metrics, replicas)
}

/// Waits until the replica store has a point at each expected mark, and checks each.
async fn check_points(retention: &Path, marks: &[(Seq, Vec<u8>)], scratch: &Path) {
    let location = replica_store(retention, "web01");
    let deadline = Instant::now() + Duration::from_secs(30);
    let points = loop {
        if let Ok(store) = Store::open(location.to_str().unwrap()).await {
            let points = store.points(Some(&sda())).await.unwrap();
            if points.len() >= marks.len() {
                break (store, points);
            }
        }
        assert!(Instant::now() < deadline, "the points did not come");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (store, points) = points;
    assert_eq!(points.len(), marks.len(), "one point per mark");
    for (point, (seq, want)) in points.iter().zip(marks) {
        assert_eq!(point.seq, Some(*seq));
        let out = scratch.join(format!("point-{}.img", point.id));
        store.export_raw(point, &out, &NoProgress).await.unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "point {} equals the disk at mark seq {seq}",
            point.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mark_becomes_a_point_equal_to_the_disk_at_that_mark() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");

    // The disk limit: two disks at most on this master target.
    let (addr, stop, metrics) = start(&ca, &retention, 2).await;
    let three = vec![
        sda(),
        DiskName::new("sdb").unwrap(),
        DiskName::new("sdc").unwrap(),
    ];
    let refused = open(&addr, &ca, three).await.err().unwrap();
    assert!(
        matches!(&refused, WireError::Refused { code: ErrorCode::TooManyDisks, message } if message.contains("separate master target")),
        "{refused}"
    );

    let mut work = Workload {
        seq: 0,
        disk: vec![0u8; SIZE as usize],
        at_marks: Vec::new(),
        rng: boomerang_core::sample::XorShift::new(11),
    };
    let (mut client, next) = open(&addr, &ca, vec![sda()]).await.unwrap();
    assert_eq!(next, Seq(1));
    for _ in 0..20 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    check_points(&retention, &work.at_marks, dir.path()).await;
    // The RPO metrics follow the marks (their times here are made up, so only the last
    // mark's sequence number is checked).
    let last_mark = work.at_marks.last().unwrap().0;
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l == format!("boomerang_last_mark_seq{{stream=\"web01\"}} {last_mark}")),
        "{text}"
    );
    assert!(text.contains("boomerang_rpo_seconds{stream=\"web01\"}"));

    // A restart of the master target: the stream resumes, and points go on from there. (In
    // one process, the old applier ends with its receiver, within a second; two processes
    // never share a retention volume.)
    drop(client);
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (addr, _stop, _metrics) = start(&ca, &retention, 2).await;
    let (mut client, next) = reopen(&addr, &ca, vec![sda()]).await;
    assert_eq!(next, Seq(work.seq + 1));
    for _ in 0..10 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    check_points(&retention, &work.at_marks, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_describes_the_replica_once_the_records_before_it_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let (addr, _stop, _metrics) = start(&ca, &retention, 2).await;
    let id = TlsIdentity::load(&ca.join("issued/ps1")).unwrap();
    let ask = |stream: &str, after: Seq| {
        boomerang_wire::digest::query(
            &id,
            &addr,
            Role::ProcessServer,
            "ps1",
            Role::MasterTarget,
            boomerang_wire::DigestRequest {
                stream: stream.into(),
                disk: sda(),
                after,
                first_block: 0,
                count: boomerang_wire::MAX_DIGEST_BLOCKS,
            },
        )
    };

    // A machine never seen: no replica, so all zeros.
    let none = ask("web09", Seq(0)).await.unwrap();
    assert!(!none.replica && none.hashes.is_empty(), "{none:?}");

    let mut work = Workload {
        seq: 0,
        disk: vec![0u8; SIZE as usize],
        at_marks: Vec::new(),
        rng: boomerang_core::sample::XorShift::new(5),
    };
    let (mut client, _) = open(&addr, &ca, vec![sda()]).await.unwrap();
    for _ in 0..8 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    // Asked right after the last ack: the answer waits for the applier to reach it.
    let digest = ask("web01", Seq(work.seq)).await.unwrap();
    assert!(digest.replica);
    assert!(digest.at >= Seq(work.seq));
    let want: Vec<[u8; 32]> = work
        .disk
        .chunks(boomerang_wire::DIGEST_BLOCK as usize)
        .map(|b| boomerang_store::chunk::hash(b).0)
        .collect();
    assert_eq!(
        digest.hashes, want,
        "the hashes of the disk after the last record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_replayed_marks_make_no_point_from_a_newer_image() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let mut work = Workload {
        seq: 0,
        disk: vec![0u8; SIZE as usize],
        at_marks: Vec::new(),
        rng: boomerang_core::sample::XorShift::new(23),
    };
    let (addr, stop) = start_thinned(&ca, &retention).await;
    let (mut client, _) = open(&addr, &ca, vec![sda()]).await.unwrap();
    for _ in 0..12 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    // Let the applier catch up, then stop this master target (its applier ends with it).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(client);
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (addr, _stop) = start_thinned(&ca, &retention).await;
    let (mut client, _) = reopen(&addr, &ca, vec![sda()]).await;
    for _ in 0..3 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Every point the store holds is the disk at its mark.
    let store = Store::open(replica_store(&retention, "web01").to_str().unwrap())
        .await
        .unwrap();
    let points = store.points(Some(&sda())).await.unwrap();
    assert!(
        points.len() >= 2,
        "a checkpoint before and one after the restart"
    );
    for point in &points {
        let seq = point.seq.unwrap();
        let (_, want) = work
            .at_marks
            .iter()
            .find(|(s, _)| *s == seq)
            .expect("points are at marks");
        let out = dir.path().join(format!("p{}.img", point.id));
        store.export_raw(point, &out, &NoProgress).await.unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "point {} at mark seq {seq} holds the disk at that mark",
            point.id
        );
    }
}

/// A master target whose checkpoints are an hour apart: after the first mark, marks are
/// thinned, so the image runs ahead of the last checkpoint.
async fn start_thinned(ca: &Path, retention: &Path) -> (String, tokio::sync::watch::Sender<bool>) {
    let (server, _) = receiver(Config {
        name: "mt1".into(),
        tls: TlsIdentity::load(&ca.join("issued/mt1")).unwrap(),
        retention: retention.to_path_buf(),
        max_disks: 2,
        block_size: 4096,
        point_every: Duration::from_secs(3600),
        log_window: Duration::from_secs(3600),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&server).serve(listener, stopped));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_disk_keeps_getting_points_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let sdb = DiskName::new("sdb").unwrap();
    let mark = |seq: u64| Record {
        seq: Seq(seq),
        op: Op::Mark {
            kind: MarkKind::App,
            id: MarkId(seq),
            time: UnixNanos(seq),
        },
    };
    let write = |seq: u64, disk: &DiskName| Record {
        seq: Seq(seq),
        op: Op::Write {
            disk: disk.clone(),
            offset: 0,
            data: vec![seq as u8; 4096],
        },
    };
    let (addr, stop, _) = start(&ca, &retention, 2).await;
    let (mut client, _) = open(&addr, &ca, vec![sda(), sdb.clone()]).await.unwrap();
    client
        .send(&[write(1, &sda()), write(2, &sdb), mark(3)])
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(client);
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // After the restart only sda is written; sdb still gets a point at the next mark.
    let (addr, _stop, _) = start(&ca, &retention, 2).await;
    let (mut client, _) = reopen(&addr, &ca, vec![sda(), sdb.clone()]).await;
    client.send(&[write(4, &sda()), mark(5)]).await;
    let store_path = replica_store(&retention, "web01");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let store = Store::open(store_path.to_str().unwrap()).await.unwrap();
        let seqs = |points: Vec<boomerang_store::PointManifest>| -> Vec<u64> {
            points.iter().filter_map(|p| p.seq.map(|s| s.0)).collect()
        };
        let on_sda = seqs(store.points(Some(&sda())).await.unwrap());
        let on_sdb = seqs(store.points(Some(&sdb)).await.unwrap());
        // A checkpoint commits its disks one after the other: sdb's point may come just after.
        if on_sda == [3, 5] && on_sdb == [3, 5] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the quiet disk has no point at every mark: sda {on_sda:?}, sdb {on_sdb:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_digest_is_answered_without_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let mut work = Workload {
        seq: 0,
        disk: vec![0u8; SIZE as usize],
        at_marks: Vec::new(),
        rng: boomerang_core::sample::XorShift::new(31),
    };
    let (addr, stop, _) = start(&ca, &retention, 2).await;
    let (mut client, _) = open(&addr, &ca, vec![sda()]).await.unwrap();
    for _ in 0..5 {
        let batch: Vec<Record> = (0..10).map(|_| work.next()).collect();
        client.send(&batch).await;
    }
    drop(client);
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Restarted, with no stream open: the applier of web01 runs anyway.
    let (addr, _stop, _) = start(&ca, &retention, 2).await;
    let id = TlsIdentity::load(&ca.join("issued/ps1")).unwrap();
    let asked = Instant::now();
    let digest = boomerang_wire::digest::query(
        &id,
        &addr,
        Role::ProcessServer,
        "ps1",
        Role::MasterTarget,
        boomerang_wire::DigestRequest {
            stream: "web01".into(),
            disk: sda(),
            after: Seq(work.seq),
            first_block: 0,
            count: boomerang_wire::MAX_DIGEST_BLOCKS,
        },
    )
    .await
    .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "answered in {:?}",
        asked.elapsed()
    );
    let want: Vec<[u8; 32]> = work
        .disk
        .chunks(boomerang_wire::DIGEST_BLOCK as usize)
        .map(|b| boomerang_store::chunk::hash(b).0)
        .collect();
    assert_eq!(digest.hashes, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_replica_takes_records_of_its_own_lineage_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let (addr, _stop, _metrics, replicas) = start_with_replicas(&ca, &retention, 60).await;
    let write = |seq: u64, byte: u8| Record {
        seq: Seq(seq),
        op: Op::Write {
            disk: sda(),
            offset: 0,
            data: vec![byte; 4096],
        },
    };
    // The first lineage: a replica made by its records.
    let (mut client, next) = open(&addr, &ca, vec![sda()]).await.unwrap();
    assert_eq!(next, Seq(1));
    client.send(&[write(1, 0x11), write(2, 0x12)]).await;
    drop(client);
    // A reprotect makes the machine's own disk the replica, of lineage 9.
    let own = dir.path().join("own.img");
    std::fs::write(&own, vec![0x55u8; SIZE as usize]).unwrap();
    replicas
        .adopt("web01", &[(sda(), own.clone())], 9)
        .await
        .unwrap();
    // A process server's stale cache (lineage 0) is refused, and nothing reaches the disk.
    let stale = reopen_refused(&addr, &ca).await;
    assert!(
        matches!(&stale, WireError::Refused { code: ErrorCode::Lineage, message } if message.contains("lineage 9") && message.contains("ended")),
        "{stale}"
    );
    // The new lineage starts at 500 in its agent's log: the incoming log drops lineage 0 and
    // resumes there; its records go into the adopted disk.
    let (mut client, next) = open_lineage(&addr, &ca, vec![sda()], 9, Seq(500))
        .await
        .unwrap();
    assert_eq!(next, Seq(500));
    client.send(&[write(500, 0x77)]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let disk = std::fs::read(&own).unwrap();
        if disk[0] == 0x77 {
            assert!(
                disk[4096..].iter().all(|b| *b == 0x55),
                "nothing else changed"
            );
            break;
        }
        assert_eq!(disk[0], 0x55, "no record of lineage 0 is applied");
        assert!(
            Instant::now() < deadline,
            "the record of lineage 9 never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
    // A newer lineage than the replica's is refused too: it needs a reprotect first.
    let newer = open_lineage(&addr, &ca, vec![sda()], 12, Seq(900))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&newer, WireError::Refused { code: ErrorCode::Lineage, message } if message.contains("reprotect")),
        "{newer}"
    );
}

/// Opens lineage 0, waiting while the stream is busy; the refusal.
async fn reopen_refused(addr: &str, ca: &Path) -> WireError {
    loop {
        match open(addr, ca, vec![sda()]).await {
            Ok(_) => panic!("lineage 0 was taken"),
            Err(WireError::Refused {
                code: ErrorCode::StreamBusy,
                ..
            }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return e,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_during_the_first_checkpoint_hands_back_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path());
    let retention = dir.path().join("retention");
    let (addr, _stop, _metrics, replicas) = start_with_replicas(&ca, &retention, 60).await;
    // The machine's own disk, adopted at a reprotect: 256 MiB of data, so that the replica's
    // first checkpoint (a scan of the whole disk) is still running when the release comes.
    std::fs::create_dir_all(&retention).unwrap();
    let own = dir.path().join("own.img");
    let mut content = vec![0u8; 256 << 20];
    boomerang_core::sample::XorShift::new(5).fill(&mut content);
    std::fs::write(&own, &content).unwrap();
    replicas
        .adopt("web01", &[(sda(), own.clone())], 9)
        .await
        .unwrap();
    let (mut client, next) = open_lineage(&addr, &ca, vec![sda()], 9, Seq(500))
        .await
        .unwrap();
    assert_eq!(next, Seq(500));
    // Writes and a mark: the replica's first checkpoint starts. Then more writes and the
    // final mark of a failback, all durable here, and the release at once, as the failback
    // gives it, while that checkpoint runs.
    let mut seq = 500;
    let mark = |seq: u64, id: u64| Record {
        seq: Seq(seq),
        op: Op::Mark {
            kind: MarkKind::Crash,
            id: MarkId(id),
            time: UnixNanos::now(),
        },
    };
    let mut rounds = Vec::new();
    for round in 0..2u64 {
        let mut records = Vec::new();
        for k in 0..8u64 {
            let offset = (round * 8 + k) * (16 << 20) + 4096 * k;
            let data = vec![0xA0 + (round * 8 + k) as u8; 8192];
            content[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            records.push(Record {
                seq: Seq(seq),
                op: Op::Write {
                    disk: sda(),
                    offset,
                    data,
                },
            });
            seq += 1;
        }
        records.push(mark(seq, round + 1));
        seq += 1;
        rounds.push(records);
    }
    client.send(&rounds[0]).await;
    // The checkpoint holds its store's commit lease while it runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !any_lease(&retention) {
        assert!(
            Instant::now() < deadline,
            "the first checkpoint never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let records = &rounds[1];
    client.send(records).await;
    let released = replicas.release("web01").await.unwrap();
    assert_eq!(released, vec![("sda".to_string(), own.clone())]);
    assert!(
        std::fs::read(&own).unwrap() == content,
        "every record received is in the disk handed back"
    );
    // Asked again, the same answer.
    assert_eq!(replicas.release("web01").await.unwrap(), released);
}

/// Whether a store under `dir` holds a commit lease (a commit is running).
fn any_lease(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if e.file_name() == "leases" {
            return std::fs::read_dir(&path).is_ok_and(|mut l| l.next().is_some());
        }
        path.is_dir() && any_lease(&path)
    })
}
