//! The replication protocol's frames, handshake and stream rules, end to end over in-memory
//! and TCP connections.

use boomerang_core::log::{MarkId, MarkKind, Op, Record, UnixNanos};
use boomerang_core::{DiskName, Seq};
use boomerang_wire::frame::{HEADER_LEN, MAX_PAYLOAD};
use boomerang_wire::*;
use bytes::Bytes;
use proptest::prelude::*;

fn disk(name: &str) -> DiskName {
    DiskName::new(name).unwrap()
}

fn write(seq: u64, d: &str, len: usize) -> Record {
    Record {
        seq: Seq(seq),
        op: Op::Write {
            disk: disk(d),
            offset: seq * 4096,
            data: vec![seq as u8; len],
        },
    }
}

fn mark(seq: u64) -> Record {
    Record {
        seq: Seq(seq),
        op: Op::Mark {
            kind: MarkKind::Crash,
            id: MarkId(seq),
            time: UnixNanos(seq),
        },
    }
}

fn records(list: &[Record]) -> Records {
    let mut bytes = Vec::new();
    for r in list {
        r.encode(&mut bytes).unwrap();
    }
    Records::new(Bytes::from(bytes)).unwrap()
}

/// Plain in-memory and TCP connections carry no credentials: these tests trust the claims.
fn trust(_: Role, _: &str) -> Result<(), String> {
    Ok(())
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(&mut out).unwrap();
    out
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let name = "[a-z0-9.-]{0,40}";
    let role = prop_oneof![
        Just(Role::Agent),
        Just(Role::ProcessServer),
        Just(Role::MasterTarget)
    ];
    prop_oneof![
        (any::<u16>(), any::<u16>(), role.clone(), name).prop_map(|(a, b, role, name)| {
            Frame::Hello {
                min_version: a,
                max_version: b,
                role,
                name,
            }
        }),
        (any::<u16>(), role, name).prop_map(|(version, role, name)| Frame::Welcome {
            version,
            role,
            name
        }),
        (
            name,
            proptest::collection::btree_set("[a-z][a-z0-9]{0,10}", 0..8),
            any::<u64>(),
            1..u64::MAX,
        )
            .prop_map(|(stream, disks, lineage, since)| Frame::Open {
                stream,
                disks: disks.into_iter().map(|d| disk(&d)).collect(),
                lineage,
                since: Seq(since),
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(s, c)| Frame::Resume {
            next_seq: Seq(s),
            credit: c
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(s, c)| Frame::Ack {
            durable: Seq(s),
            credit: c
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (1u16..12, ".{0,200}").prop_map(|(code, message)| Frame::Error {
            code: ErrorCode::from_code(code),
            message
        }),
        Just(Frame::Bye),
        (1u64..1000, 1usize..6, 0usize..3000).prop_map(|(first, n, len)| {
            let list: Vec<Record> = (0..n as u64)
                .map(|k| {
                    if k % 3 == 2 {
                        mark(first + k)
                    } else {
                        write(first + k, "sda", len)
                    }
                })
                .collect();
            Frame::Records(records(&list))
        }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips_and_every_prefix_is_incomplete(frame in arb_frame()) {
        let bytes = encoded(&frame);
        prop_assert_eq!(decode(&bytes).unwrap(), Decoded::Frame(frame.clone(), bytes.len()));
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            if cut < bytes.len() {
                let is_incomplete = matches!(decode(&bytes[..cut]), Ok(Decoded::Incomplete { .. }));
                prop_assert!(is_incomplete);
            }
        }
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }
}

#[test]
fn malformed_frames_are_named() {
    // A length over the limit is refused from the header alone.
    let mut huge = (MAX_PAYLOAD as u32 + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(&[5, 0, 0, 0]);
    assert!(matches!(decode(&huge), Err(DecodeError::TooLong { .. })));
    // Any other frame is small: a hello announcing a megabyte is refused from its header.
    let mut big_hello = (1u32 << 20).to_le_bytes().to_vec();
    big_hello.extend_from_slice(&[1, 0, 0, 0]);
    assert!(matches!(
        decode(&big_hello),
        Err(DecodeError::TooLong { max: 65536, .. })
    ));

    let mut ping = encoded(&Frame::Ping { nonce: 1 });
    ping[4] = 99;
    assert_eq!(decode(&ping), Err(DecodeError::UnknownType(99)));
    let mut ping = encoded(&Frame::Ping { nonce: 1 });
    ping[5] = 1;
    assert_eq!(decode(&ping), Err(DecodeError::Reserved));

    // A payload longer than its fields.
    let mut ping = encoded(&Frame::Ping { nonce: 1 });
    ping[0] += 1;
    ping.push(0);
    assert!(matches!(
        decode(&ping),
        Err(DecodeError::Payload { kind: "ping", .. })
    ));

    // Records: a damaged CRC, a sequence going backwards, an empty frame.
    let good = encoded(&Frame::Records(records(&[write(5, "sda", 100), mark(6)])));
    let mut bad = good.clone();
    bad[HEADER_LEN + 40] ^= 1;
    assert!(matches!(
        decode(&bad),
        Err(DecodeError::Record { at: 0, .. })
    ));
    let mut backwards = Vec::new();
    write(9, "sda", 10).encode(&mut backwards).unwrap();
    write(8, "sda", 10).encode(&mut backwards).unwrap();
    assert!(matches!(
        Records::new(Bytes::from(backwards)),
        Err(DecodeError::RecordOrder { .. })
    ));
    assert_eq!(Records::new(Bytes::new()), Err(DecodeError::NoRecords));

    // The frames of a records payload, as sent, without decoding.
    let batch = records(&[write(5, "sda", 100), mark(6), write(7, "sdb", 3)]);
    let frames: Vec<(Seq, &[u8])> = batch.frames().collect();
    assert_eq!(
        frames.iter().map(|(s, _)| s.0).collect::<Vec<_>>(),
        [5, 6, 7]
    );
    let joined: Vec<u8> = frames.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(joined, batch.bytes()[..]);

    // Open: too many disks, a disk named twice, an invalid disk name.
    let many: Vec<DiskName> = (0..61).map(|i| disk(&format!("d{i}"))).collect();
    assert_eq!(
        Frame::Open {
            stream: "s".into(),
            disks: many,
            lineage: 0,
            since: Seq(1),
        }
        .encode(&mut Vec::new()),
        Err(EncodeError::TooManyDisks(61))
    );
    let mut twice = encoded(&Frame::Open {
        stream: "s".into(),
        disks: vec![disk("aa"), disk("ab")],
        lineage: 0,
        since: Seq(1),
    });
    // The last disk name's last byte, before the lineage and its first sequence number.
    let end = twice.len() - 16;
    twice[end - 1] = b'a';
    assert!(matches!(
        decode(&twice),
        Err(DecodeError::Payload { kind: "open", why }) if why.contains("twice")
    ));
    twice[end - 1] = b'/';
    assert!(matches!(
        decode(&twice),
        Err(DecodeError::Payload { kind: "open", why }) if why.contains("disk name")
    ));

    // An error message is cut, not refused.
    let long = Frame::Error {
        code: ErrorCode::Unavailable,
        message: "é".repeat(5000),
    };
    let Decoded::Frame(Frame::Error { message, .. }, _) = decode(&encoded(&long)).unwrap() else {
        panic!("an error frame")
    };
    assert_eq!(message.chars().count(), 2048);
}

/// One end of an in-memory connection.
type End = (
    FrameReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    FrameWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
);

/// Both ends of an in-memory connection.
fn pipe() -> (End, End) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    (
        (FrameReader::new(ar), FrameWriter::new(aw)),
        (FrameReader::new(br), FrameWriter::new(bw)),
    )
}

#[tokio::test]
async fn handshake_agrees_on_a_version_and_refuses_with_reasons() {
    let ((mut crd, mut cwr), (mut srd, mut swr)) = pipe();
    let server = tokio::spawn(async move {
        accept(
            &mut srd,
            &mut swr,
            Role::ProcessServer,
            "ps1",
            &[Role::Agent],
            trust,
        )
        .await
    });
    let peer = connect(
        &mut crd,
        &mut cwr,
        Role::Agent,
        "web01",
        Role::ProcessServer,
        trust,
    )
    .await
    .unwrap();
    assert_eq!(
        peer,
        Peer {
            version: boomerang_wire::frame::MAX_VERSION,
            role: Role::ProcessServer,
            name: "ps1".into()
        }
    );
    let client = server.await.unwrap().unwrap();
    assert_eq!((client.role, client.name.as_str()), (Role::Agent, "web01"));

    // A master target dialling a process server that takes agents only.
    let ((mut crd, mut cwr), (mut srd, mut swr)) = pipe();
    let server = tokio::spawn(async move {
        accept(
            &mut srd,
            &mut swr,
            Role::ProcessServer,
            "ps1",
            &[Role::Agent],
            trust,
        )
        .await
    });
    let refused = connect(
        &mut crd,
        &mut cwr,
        Role::MasterTarget,
        "mt1",
        Role::ProcessServer,
        trust,
    )
    .await;
    assert!(
        matches!(&refused, Err(WireError::Refused { code: ErrorCode::Role, message }) if message.contains("mt1 is a master target")),
        "{refused:?}"
    );
    assert!(server.await.unwrap().is_err());

    // A client from the future: versions 5 to 7 only.
    let ((mut crd, mut cwr), (mut srd, mut swr)) = pipe();
    let server = tokio::spawn(async move {
        accept(
            &mut srd,
            &mut swr,
            Role::MasterTarget,
            "mt1",
            &[Role::ProcessServer],
            trust,
        )
        .await
    });
    cwr.write_magic().await.unwrap();
    cwr.send(&Frame::Hello {
        min_version: 5,
        max_version: 7,
        role: Role::ProcessServer,
        name: "ps9".into(),
    })
    .await
    .unwrap();
    let reply = crd.read().await.unwrap();
    assert!(
        matches!(&reply, Frame::Error { code: ErrorCode::Version, message } if message.contains("versions 5 to 7") && message.contains("upgrade")),
        "{reply:?}"
    );
    assert!(server.await.unwrap().is_err());

    // Not the protocol at all.
    let ((_crd, cwr), (mut srd, mut swr)) = pipe();
    let server = tokio::spawn(async move {
        accept(
            &mut srd,
            &mut swr,
            Role::MasterTarget,
            "mt1",
            &[Role::ProcessServer],
            trust,
        )
        .await
    });
    use tokio::io::AsyncWriteExt;
    let mut raw = cwr.into_inner();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(matches!(
        server.await.unwrap(),
        Err(WireError::Decode(DecodeError::BadMagic))
    ));
}

#[test]
fn a_receiver_takes_only_the_next_records_within_credit() {
    let mut inbound = Inbound::new(vec![disk("sda")], Seq(10), 10_000);
    let first = records(&[write(10, "sda", 100), mark(11)]);
    inbound.accept(&first).unwrap();
    assert_eq!(inbound.next_seq(), Seq(12));
    assert_eq!(inbound.credit(), 10_000 - first.bytes().len() as u64);

    let check = |inbound: &mut Inbound, r: Records, code: ErrorCode| {
        let before = (inbound.next_seq(), inbound.credit());
        assert_eq!(inbound.accept(&r).unwrap_err().code, code);
        assert_eq!(
            (inbound.next_seq(), inbound.credit()),
            before,
            "nothing moved"
        );
    };
    check(
        &mut inbound,
        records(&[write(11, "sda", 1)]),
        ErrorCode::OutOfOrder,
    );
    check(
        &mut inbound,
        records(&[write(13, "sda", 1)]),
        ErrorCode::OutOfOrder,
    );
    check(
        &mut inbound,
        records(&[write(12, "sda", 1), write(14, "sda", 1)]),
        ErrorCode::OutOfOrder,
    );
    check(
        &mut inbound,
        records(&[write(12, "sdb", 1)]),
        ErrorCode::UnknownDisk,
    );
    check(
        &mut inbound,
        records(&[write(12, "sda", 20_000)]),
        ErrorCode::Credit,
    );
    inbound.grant(20_000);
    inbound
        .accept(&records(&[write(12, "sda", 20_000)]))
        .unwrap();

    let mut outbound = Outbound::resume(Seq(1), 100);
    assert_eq!(outbound.durable(), None);
    let r = records(&[mark(1)]);
    outbound.sent(&r).unwrap();
    assert!(outbound.sent(&records(&[mark(3)])).is_err(), "a gap");
    assert!(
        outbound.acked(Seq(2), 0).is_err(),
        "an ack past what was sent"
    );
    outbound.acked(Seq(1), 50).unwrap();
    assert_eq!(outbound.durable(), Some(Seq(1)));
    assert!(outbound.acked(Seq(0), 0).is_err(), "an ack going backwards");
}

/// A receiver that makes records "durable" in a vector, acknowledging after each frame.
async fn serve_stream(
    listener: tokio::net::TcpListener,
    store: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
    connections: usize,
) {
    for _ in 0..connections {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, w) = sock.into_split();
        let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
        accept(
            &mut rd,
            &mut wr,
            Role::ProcessServer,
            "ps",
            &[Role::Agent],
            trust,
        )
        .await
        .unwrap();
        let Frame::Open { disks, .. } = rd.read().await.unwrap() else {
            panic!("open first")
        };
        let next = Seq(store.lock().unwrap().last().map_or(1, |r| r.seq.0 + 1));
        let mut inbound = Inbound::new(disks, next, 4096);
        wr.send(&Frame::Resume {
            next_seq: next,
            credit: 4096,
        })
        .await
        .unwrap();
        loop {
            match rd.read().await {
                Ok(Frame::Records(r)) => {
                    inbound.accept(&r).unwrap();
                    store.lock().unwrap().extend(r.iter());
                    let grant = r.bytes().len() as u64;
                    inbound.grant(grant);
                    // The client may be gone already: the records stay durable, and the
                    // next connection resumes after them.
                    let ack = Frame::Ack {
                        durable: r.last_seq(),
                        credit: grant,
                    };
                    if wr.send(&ack).await.is_err() {
                        break;
                    }
                }
                Ok(Frame::Bye) | Err(_) => break,
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// Sends `log` (record `s` at index `s - 1`) from where the receiver resumes, one record per
/// frame, and hangs up after `budget` frames; returns what was acknowledged as durable.
async fn send_stream(addr: std::net::SocketAddr, log: &[Record], budget: usize) -> Option<Seq> {
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, w) = sock.into_split();
    let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
    connect(
        &mut rd,
        &mut wr,
        Role::Agent,
        "web01",
        Role::ProcessServer,
        trust,
    )
    .await
    .unwrap();
    wr.send(&Frame::Open {
        stream: "web01".into(),
        disks: vec![disk("sda")],
        lineage: 0,
        since: Seq(1),
    })
    .await
    .unwrap();
    let Frame::Resume { next_seq, credit } = rd.read().await.unwrap() else {
        panic!("resume")
    };
    let mut out = Outbound::resume(next_seq, credit);
    let mut frames = 0;
    while frames < budget {
        let next = out.next_seq().0 as usize;
        let Some(record) = log.get(next - 1) else {
            // Done only once the receiver holds everything durable: until then a record sent
            // may still be lost with the connection (a reset drops what the peer had not read).
            while out.durable() != Some(Seq(log.len() as u64)) {
                let Frame::Ack { durable, credit } = rd.read().await.unwrap() else {
                    panic!("ack")
                };
                out.acked(durable, credit).unwrap();
            }
            wr.send(&Frame::Bye).await.unwrap();
            break;
        };
        let r = records(std::slice::from_ref(record));
        if r.bytes().len() as u64 > out.credit() {
            let Frame::Ack { durable, credit } = rd.read().await.unwrap() else {
                panic!("ack")
            };
            out.acked(durable, credit).unwrap();
            continue;
        }
        wr.send(&Frame::Records(r.clone())).await.unwrap();
        out.sent(&r).unwrap();
        frames += 1;
    }
    // Dropped here without waiting for the last acks: a disconnect mid-stream.
    out.durable()
}

#[tokio::test]
async fn a_stream_resumes_after_disconnects_without_gaps_or_duplicates() {
    let log: Vec<Record> = (1..=60)
        .map(|s| {
            if s % 10 == 0 {
                mark(s)
            } else {
                write(s, "sda", 700)
            }
        })
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(serve_stream(listener, store.clone(), 4));
    // Three connections cut after 17 frames each, then one that finishes.
    for _ in 0..3 {
        send_stream(addr, &log, 17).await;
    }
    send_stream(addr, &log, usize::MAX).await;
    server.await.unwrap();
    let stored = store.lock().unwrap();
    let seqs: Vec<u64> = stored.iter().map(|r| r.seq.0).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<_>>(),
        "every record once, in order"
    );
    assert!(*stored == log, "and each as it was sent");
}

#[test]
fn compressed_records_arrive_as_sent_and_bad_ones_are_named() {
    // Compressible records go as type 11, and decode to the same records.
    let compressible = records(&[write(1, "sda", 60_000), mark(2), write(3, "sda", 9_000)]);
    let bytes = encoded(&Frame::RecordsZstd(compressible.clone()));
    assert_eq!(bytes[4], 11);
    assert!(bytes.len() < compressible.bytes().len() / 10);
    assert_eq!(
        decode(&bytes).unwrap(),
        Decoded::Frame(Frame::RecordsZstd(compressible.clone()), bytes.len())
    );

    // Incompressible ones go as plain records (type 5): not worth the receiver's time.
    let mut noise = vec![0u8; 20_000];
    boomerang_core::sample::XorShift::new(3).fill(&mut noise);
    let mut frame = Vec::new();
    Record {
        seq: Seq(4),
        op: Op::Write {
            disk: disk("sda"),
            offset: 0,
            data: noise,
        },
    }
    .encode(&mut frame)
    .unwrap();
    let incompressible = Records::new(Bytes::from(frame)).unwrap();
    let bytes = encoded(&Frame::RecordsZstd(incompressible.clone()));
    assert_eq!(bytes[4], 5);
    assert_eq!(
        decode(&bytes).unwrap(),
        Decoded::Frame(Frame::Records(incompressible), bytes.len())
    );

    // Damage, a length that lies, and a length over the limit are refused by name.
    let good = encoded(&Frame::RecordsZstd(compressible));
    let mut damaged = good.clone();
    let last = damaged.len() - 3;
    damaged[last] ^= 0xFF;
    let mut lying = good.clone();
    lying[HEADER_LEN] = lying[HEADER_LEN].wrapping_sub(1);
    let mut huge = good.clone();
    huge[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    for bad in [damaged, lying, huge] {
        assert!(
            matches!(
                decode(&bad),
                Err(DecodeError::Payload {
                    kind: "compressed records",
                    ..
                }) | Err(DecodeError::Record { .. })
            ),
            "{:?}",
            decode(&bad)
        );
    }
}
