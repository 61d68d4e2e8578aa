//! Our replication decoder next to other Rust crates, on the same bytes:
//! the `mixed` golden fixture (`tests/fixtures/pg15`) repeated to about
//! 8 MiB, as in `benches/decode.rs`.
//!
//! What can be compared, level by level:
//!
//! | level | factlib | `postgres-protocol` 0.6 | `pgwire-replication` 0.5 |
//! |---|---|---|---|
//! | backend framing (`d` frames) | `backend::parse` | `message::backend::Message::parse` | `protocol::framing::MessageReader::read` |
//! | + XLogData / keepalive | `ReplicationMessage::parse` | (none) | `protocol::parse_copy_data` |
//! | + pgoutput | `PgOutput::decode` | (none) | private, see below |
//!
//! `pgwire-replication` does not expose a pgoutput decoder. Its only
//! pgoutput parsing (`parse_pgoutput_boundary` in `src/client/worker.rs`,
//! which reads Begin, Commit and Message and hands every other message on
//! as raw bytes) is a private function of its replication worker, reachable
//! only through `ReplicationClient::connect` to a live server. So the
//! pgoutput level has no third-party counterpart here; `frames+pgoutput`
//! is ours alone, for reference against the levels below it. What it does
//! expose as pure code is used: `parse_copy_data` (XLogData and keepalive
//! bodies, a `Bytes` in and a zero-copy `Bytes` out, like ours) and
//! `MessageReader`, its cancel-safe framing reader. `MessageReader` reads
//! from an `AsyncRead` (here the stream as a `&[u8]`, always ready) into a
//! buffer of its own, so its figures include copying every byte once (what
//! a socket read costs both designs; `baseline/memcpy` shows that copy
//! alone). Ours and `postgres-protocol` frame a `BytesMut` already filled,
//! the copy into it being untimed setup, as in `benches/decode.rs`.
//!
//! `cargo bench --bench compare`

mod common;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::PgOutput;
use factlib::pgwire::replication::ReplicationMessage;
use pgwire_replication::protocol::framing::MessageReader;
use pgwire_replication::protocol::{parse_copy_data, ReplicationCopyData};
use postgres_protocol::message::backend::Message;

// The allocator the relay binary uses (`src/main.rs`); every contender
// here runs on it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The `mixed` fixture's frames, repeated to about 8 MiB (as in
/// `benches/decode.rs`).
fn stream() -> Bytes {
    let all = common::fixture_stream();
    Bytes::from(all)
}

/// factlib: CopyData frames.
fn factlib_frames(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        if let Backend::CopyData(_) = m {
            n += 1;
        }
    }
    n
}

/// factlib: CopyData frames, then XLogData (`benches/decode.rs`'s `frames`).
fn factlib_xlogdata(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyData(body) = m else { continue };
        if let Ok(ReplicationMessage::XLogData(_)) = ReplicationMessage::parse(body) {
            n += 1;
        }
    }
    n
}

/// factlib: frames, XLogData, pgoutput; counts `factlib` messages
/// (`benches/decode.rs`'s `frames+pgoutput`).
fn factlib_pgoutput(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyData(body) = m else { continue };
        let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(body) else {
            continue;
        };
        if let Ok(PgOutput::Message(msg)) = PgOutput::decode(x.data) {
            if &msg.prefix[..] == b"factlib" {
                n += 1;
            }
        }
    }
    n
}

/// postgres-protocol: CopyData frames (body kept as `Bytes`).
fn pgproto_frames(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = Message::parse(&mut buf) {
        if let Message::CopyData(body) = m {
            n += u64::from(!body.into_bytes().is_empty());
        }
    }
    n
}

/// postgres-protocol framing, then pgwire-replication's XLogData parser.
fn pgproto_pgwire_xlogdata(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = Message::parse(&mut buf) {
        let Message::CopyData(body) = m else { continue };
        if let Ok(ReplicationCopyData::XLogData { .. }) = parse_copy_data(body.into_bytes()) {
            n += 1;
        }
    }
    n
}

/// pgwire-replication: its framing reader over the stream, optionally its
/// XLogData parser on each CopyData body. Ends at EOF.
async fn pgwire_frames(mut rd: &[u8], xlogdata: bool) -> u64 {
    let mut reader = MessageReader::new();
    let mut n = 0;
    while let Ok(m) = reader.read(&mut rd).await {
        if m.tag != b'd' {
            continue;
        }
        if !xlogdata {
            n += 1;
        } else if let Ok(ReplicationCopyData::XLogData { .. }) = parse_copy_data(m.payload) {
            n += 1;
        }
    }
    n
}

/// The CopyData bodies of the stream, cut once, for the XLogData parsers
/// alone.
fn bodies(stream: &Bytes) -> Vec<Bytes> {
    let mut buf = BytesMut::from(&stream[..]);
    let mut out = Vec::new();
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        if let Backend::CopyData(body) = m {
            out.push(body);
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let stream = stream();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let input = || BytesMut::from(&stream[..]);
    let pgwire = |xlogdata| rt.block_on(pgwire_frames(&stream[..], xlogdata));

    // Not timing checks: every contender must see the same frames, or the
    // comparison is meaningless.
    let frames = factlib_frames(input());
    let xlog = factlib_xlogdata(input());
    assert_eq!(pgproto_frames(input()), frames, "postgres-protocol frames");
    assert_eq!(pgwire(false), frames, "pgwire-replication frames");
    assert_eq!(pgproto_pgwire_xlogdata(input()), xlog, "XLogData frames");
    assert_eq!(pgwire(true), xlog, "pgwire-replication XLogData frames");

    let mut g = c.benchmark_group("compare");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("baseline/memcpy", |b| b.iter(input));

    g.bench_function("frames/factlib", |b| {
        b.iter_batched(input, factlib_frames, BatchSize::LargeInput)
    });
    g.bench_function("frames/postgres-protocol", |b| {
        b.iter_batched(input, pgproto_frames, BatchSize::LargeInput)
    });
    g.bench_function("frames/pgwire-replication", |b| b.iter(|| pgwire(false)));

    g.bench_function("frames+xlogdata/factlib", |b| {
        b.iter_batched(input, factlib_xlogdata, BatchSize::LargeInput)
    });
    g.bench_function(
        "frames+xlogdata/postgres-protocol+pgwire-replication",
        |b| b.iter_batched(input, pgproto_pgwire_xlogdata, BatchSize::LargeInput),
    );
    g.bench_function("frames+xlogdata/pgwire-replication", |b| {
        b.iter(|| pgwire(true))
    });

    // pgwire-replication exposes no pgoutput decoder (see the module doc).
    g.bench_function("frames+pgoutput/factlib", |b| {
        b.iter_batched(input, factlib_pgoutput, BatchSize::LargeInput)
    });

    // The XLogData parsers alone, on bodies already cut (cloning a `Bytes`
    // is a reference count, no copy).
    let bodies = bodies(&stream);
    let body_bytes: usize = bodies.iter().map(Bytes::len).sum();
    g.throughput(Throughput::Bytes(body_bytes as u64));
    g.bench_function("xlogdata/factlib", |b| {
        b.iter(|| {
            bodies
                .iter()
                .filter(|body| {
                    matches!(
                        ReplicationMessage::parse(Bytes::clone(body)),
                        Ok(ReplicationMessage::XLogData(_))
                    )
                })
                .count()
        })
    });
    g.bench_function("xlogdata/pgwire-replication", |b| {
        b.iter(|| {
            bodies
                .iter()
                .filter(|body| {
                    matches!(
                        parse_copy_data(Bytes::clone(body)),
                        Ok(ReplicationCopyData::XLogData { .. })
                    )
                })
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
