//! The process server receiving agents' streams over mutual TLS on loopback: records are in the
//! cache, durable, before they are acknowledged; a stream resumes where the cache ends, across
//! reconnects and restarts; the stream rules are enforced with the protocol's error codes.

use std::path::Path;
use std::sync::Arc;

use boomerang_core::log::{MarkId, MarkKind, Op, Record, SegmentReader, UnixNanos};
use boomerang_core::{DiskName, Seq};
use boomerang_process_server::{Config, receiver};
use boomerang_wire::pki::{self, CertRole};
use boomerang_wire::tls::{self, TlsIdentity};
use boomerang_wire::{ErrorCode, Frame, Records, Role, WireError};
use bytes::Bytes;

fn record(seq: u64) -> Record {
    let op = if seq % 7 == 0 {
        Op::Mark {
            kind: MarkKind::Crash,
            id: MarkId(seq),
            time: UnixNanos(seq),
        }
    } else {
        Op::Write {
            disk: DiskName::new("sda").unwrap(),
            offset: seq * 4096,
            data: vec![seq as u8; 3000],
        }
    };
    Record { seq: Seq(seq), op }
}

fn batch(seqs: impl IntoIterator<Item = u64>) -> Records {
    let mut bytes = Vec::new();
    for s in seqs {
        record(s).encode(&mut bytes).unwrap();
    }
    Records::new(Bytes::from(bytes)).unwrap()
}

struct Client {
    rd: tls::ClientReader,
    wr: tls::ClientWriter,
}

/// Connects as agent `cert` (a directory under the CA) and opens `stream`; returns the
/// client and the server's Resume.
async fn open(addr: &str, ca: &Path, cert: &str, stream: &str) -> Result<(Client, Seq), WireError> {
    open_lineage(addr, ca, cert, stream, 0, Seq(1)).await
}

/// As [`open`], with records of lineage `lineage`, from `since` on.
async fn open_lineage(
    addr: &str,
    ca: &Path,
    cert: &str,
    stream: &str,
    lineage: u64,
    since: Seq,
) -> Result<(Client, Seq), WireError> {
    let id = TlsIdentity::load(&ca.join("issued").join(cert)).unwrap();
    let (rd, mut wr, _) = tls::dial(&id, addr, Role::Agent, cert, Role::ProcessServer)
        .await
        .map_err(|e| match e {
            tls::DialError::Wire(w) => w,
            other => panic!("{other}"),
        })?;
    let mut rd = rd;
    wr.send(&Frame::Open {
        stream: stream.into(),
        disks: vec![DiskName::new("sda").unwrap()],
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
    /// Sends records `from..=to`, three per frame, and waits for the ack of the last.
    async fn send(&mut self, from: u64, to: u64) -> Result<(), WireError> {
        let mut at = from;
        while at <= to {
            let end = (at + 2).min(to);
            self.wr.send(&Frame::Records(batch(at..=end))).await?;
            at = end + 1;
        }
        loop {
            match self.rd.read().await? {
                Frame::Ack { durable, .. } if durable == Seq(to) => return Ok(()),
                Frame::Ack { .. } => {}
                Frame::Error { code, message } => return Err(WireError::Refused { code, message }),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn cached(cache: &Path, stream: &str) -> Vec<Record> {
    boomerang_core::log::segment_files(&cache.join(stream))
        .unwrap()
        .iter()
        .flat_map(|p| SegmentReader::open(p).unwrap().map(|r| r.unwrap()))
        .collect()
}

/// One HTTP GET on the metrics endpoint: the status line and the body.
async fn get(addr: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

async fn start(ca: &Path, cache: &Path) -> (String, tokio::sync::watch::Sender<bool>) {
    start_with_metrics(ca, cache).await.0
}

async fn start_with_metrics(
    ca: &Path,
    cache: &Path,
) -> ((String, tokio::sync::watch::Sender<bool>), String) {
    let (server, metrics) = receiver(Config {
        name: "ps1".into(),
        tls: TlsIdentity::load(&ca.join("issued/ps1")).unwrap(),
        cache: cache.to_path_buf(),
        master_target: None,
        max_rate: None,
        cache_segment: boomerang_wire::cache::SEGMENT_LEN,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&server).serve(listener, stopped));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = http.local_addr().unwrap().to_string();
    tokio::spawn(boomerang_wire::http::serve_metrics(
        http,
        Arc::new(move || metrics.render()),
    ));
    ((addr, stop), metrics_addr)
}

/// A CA under `dir`, with certificates for process server ps1 (at 127.0.0.1) and `agents`.
fn site(dir: &Path, agents: &[&str]) -> std::path::PathBuf {
    let ca = dir.join("ca");
    pki::init_ca(&ca).unwrap();
    pki::issue(
        &ca,
        "ps1",
        CertRole::Wire(Role::ProcessServer),
        &["127.0.0.1".into()],
        30,
    )
    .unwrap();
    for agent in agents {
        pki::issue(&ca, agent, CertRole::Wire(Role::Agent), &[], 30).unwrap();
    }
    ca
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_cached_before_the_ack_and_streams_resume() {
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path(), &["web01", "web02"]);
    let cache = dir.path().join("cache");
    let ((addr, stop), metrics) = start_with_metrics(&ca, &cache).await;

    let (mut client, next) = open(&addr, &ca, "web01", "web01").await.unwrap();
    assert_eq!(next, Seq(1));
    client.send(1, 20).await.unwrap();

    // The metrics say so; with no master target, everything is backlog.
    assert_eq!(
        get(&metrics, "/healthz").await,
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    let (status, body) = get(&metrics, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    for line in [
        "boomerang_received_seq{stream=\"web01\"} 20",
        "boomerang_forwarded_seq{stream=\"web01\"} 0",
        "boomerang_backlog_records{stream=\"web01\"} 20",
        &format!(
            "boomerang_backlog_bytes{{stream=\"web01\"}} {}",
            batch(1..=20).bytes().len()
        ),
        "# TYPE boomerang_received_bytes_total counter",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in\n{body}");
    }
    assert!(get(&metrics, "/nope").await.0.contains("404"));
    // Acknowledged means in the cache.
    assert_eq!(
        cached(&cache, "web01"),
        (1..=20).map(record).collect::<Vec<_>>()
    );

    // One connection per stream: a newer one of the same agent takes the stream over (the
    // older is stale), and resumes where the cache ends.
    let (mut newer, next) = open(&addr, &ca, "web01", "web01").await.unwrap();
    assert_eq!(next, Seq(21));
    let stale = client.send(21, 22).await.unwrap_err();
    assert!(
        matches!(
            &stale,
            WireError::Refused {
                code: ErrorCode::StreamBusy,
                ..
            } | WireError::Closed
                | WireError::Io(_)
        ),
        "{stale}"
    );
    newer.send(21, 22).await.unwrap();
    drop((client, newer));

    // An agent streams only its own log.
    let other = open(&addr, &ca, "web01", "web02").await.err().unwrap();
    assert!(
        other.to_string().contains("only its own write log"),
        "{other}"
    );

    // Digests: an agent asks only about its own disks, and a process server with no master
    // target has no replica to describe.
    let id = TlsIdentity::load(&ca.join("issued/web01")).unwrap();
    let ask = |stream: &str| boomerang_wire::DigestRequest {
        stream: stream.into(),
        disk: DiskName::new("sda").unwrap(),
        after: Seq(0),
        first_block: 0,
        count: 16,
    };
    for (stream, why) in [
        ("web02", "only for digests of its own disks"),
        ("web01", "does not serve digests"),
    ] {
        let refused = boomerang_wire::digest::query(
            &id,
            &addr,
            Role::Agent,
            "web01",
            Role::ProcessServer,
            ask(stream),
        )
        .await
        .unwrap_err();
        assert!(refused.to_string().contains(why), "{refused}");
    }

    // Reconnect: resume after the cached records; a gap is refused.
    let (mut client, next) = open_retrying(&addr, &ca).await;
    assert_eq!(next, Seq(23));
    let gap = client.send(25, 27).await.unwrap_err();
    assert!(
        matches!(
            &gap,
            WireError::Refused {
                code: ErrorCode::OutOfOrder,
                ..
            }
        ),
        "{gap}"
    );

    // A restart of the process server on the same cache.
    stop.send(true).unwrap();
    let (addr, _stop) = start(&ca, &cache).await;
    let (mut client, next) = open_retrying(&addr, &ca).await;
    assert_eq!(next, Seq(23));
    client.send(23, 40).await.unwrap();
    assert_eq!(
        cached(&cache, "web01"),
        (1..=40).map(record).collect::<Vec<_>>()
    );
}

/// Opens web01's stream, waiting out the end of its previous connection on the server.
async fn open_retrying(addr: &str, ca: &Path) -> (Client, Seq) {
    for _ in 0..100 {
        match open(addr, ca, "web01", "web01").await {
            Ok(c) => return c,
            Err(WireError::Refused {
                code: ErrorCode::StreamBusy,
                ..
            }) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the stream stayed busy")
}

#[test]
fn the_last_mark_is_reported_only_once_the_master_target_holds_it() {
    let metrics = boomerang_process_server::metrics::Metrics::default();
    // Marks at 7 and 14 (made at times 7 and 14).
    let records = batch(1..=15);
    metrics.marks("web01", &records);
    metrics.received("web01", records.last_seq(), records.bytes().len() as u64);
    let report = |m: &boomerang_process_server::metrics::Metrics| m.report().remove(0);
    let r = report(&metrics);
    assert_eq!(r.stream, "web01");
    assert_eq!(r.last_mark, None, "nothing is at the master target yet");
    assert_eq!(r.backlog_bytes, records.bytes().len() as u64);
    metrics.forwarded("web01", Seq(13));
    assert_eq!(report(&metrics).last_mark, Some((7, 7)));
    assert!(
        metrics
            .render()
            .contains("boomerang_rpo_now_seconds{stream=\"web01\"}"),
        "{}",
        metrics.render()
    );
    metrics.forwarded("web01", Seq(15));
    let r = report(&metrics);
    assert_eq!(r.last_mark, Some((14, 14)));
    assert_eq!(r.backlog_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_lineage_or_a_later_start_replaces_the_cached_records_and_an_older_one_is_refused()
{
    let dir = tempfile::tempdir().unwrap();
    let ca = site(dir.path(), &["web01"]);
    let cache = dir.path().join("cache");
    let (addr, _stop) = start(&ca, &cache).await;
    // The first lineage: records 1 to 10, never forwarded (no master target).
    let (mut client, next) = open(&addr, &ca, "web01", "web01").await.unwrap();
    assert_eq!(next, Seq(1));
    client.send(1, 10).await.unwrap();
    drop(client);
    // A reprotect gave the machine's disks a new lineage (7), whose log starts at 40 (the
    // agent dropped 11 to 39, never replicated): the cache drops lineage 0 and resumes at 40.
    let (mut client, next) = open_lineage(&addr, &ca, "web01", "web01", 7, Seq(40))
        .await
        .unwrap();
    assert_eq!(next, Seq(40), "the new lineage starts where it says");
    assert!(cached(&cache, "web01").is_empty(), "lineage 0 is dropped");
    client.send(40, 45).await.unwrap();
    assert_eq!(
        cached(&cache, "web01"),
        (40..=45).map(record).collect::<Vec<_>>()
    );
    drop(client);
    // The lineage is kept across a restart of the stream; the old one is refused with its code.
    let refused = open(&addr, &ca, "web01", "web01")
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&refused, WireError::Refused { code: ErrorCode::Lineage, message } if message.contains("lineage 7") && message.contains("ended")),
        "{refused}"
    );
    let (client, next) = open_lineage(&addr, &ca, "web01", "web01", 7, Seq(40))
        .await
        .unwrap();
    assert_eq!(next, Seq(46));
    assert_eq!(
        std::fs::read_to_string(cache.join("web01/lineage")).unwrap(),
        "7 40\n"
    );
    drop(client);
    // The same lineage starting later (the agent went on after records a process server lost):
    // what is held is dropped, and the stream resumes there.
    let (mut client, next) = open_lineage(&addr, &ca, "web01", "web01", 7, Seq(90))
        .await
        .unwrap();
    assert_eq!(next, Seq(90));
    assert!(
        cached(&cache, "web01").is_empty(),
        "records 40 to 45 are dropped"
    );
    client.send(90, 91).await.unwrap();
    drop(client);
    assert_eq!(
        std::fs::read_to_string(cache.join("web01/lineage")).unwrap(),
        "7 90\n"
    );
    // A sender from before that (a stale process server's forwarder) is refused.
    let refused = open_lineage(&addr, &ca, "web01", "web01", 7, Seq(40))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&refused, WireError::Refused { code: ErrorCode::Lineage, message } if message.contains("stale")),
        "{refused}"
    );
    let (_client, next) = open_lineage(&addr, &ca, "web01", "web01", 7, Seq(90))
        .await
        .unwrap();
    assert_eq!(next, Seq(92));
}
