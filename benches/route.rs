//! Per-fact routing cost between the decoder and the producer: topic
//! template and murmur2 partition, building the Kafka record (headers
//! included), and moving records through the per-partition rings, on one
//! thread and from a reader thread to a flusher thread.
//!
//! ```text
//!  fact ─► render + partition_for_key ─► fact_record ─► Rings::try_push ─► pop_into
//!          (route/…)                     (record/…)     (ring/…, ring-cross-thread/…)
//! ```
//!
//! Records move through the rings by value (their key and value are
//! `Bytes`); nothing is cloned or copied on the timed path.
//!
//! `cargo bench --bench route`

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use crossbeam::queue::ArrayQueue;
use factlib::fact::view::{decode_view, FactView};
use factlib::fact::{encode, Fact};
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::PgOutput;
use factlib::pgwire::replication::ReplicationMessage;
use factlib::route::{partition_for_key, Rings, TopicTemplate};
use factlib::sink::record::{fact_record, HeaderSet, Record, RecordShape, ValueMode};
use factlib::Lsn;

// The allocator the relay binary uses (`src/main.rs`), so allocation costs
// (topic strings, keys, headers, queue growth) are the ones it pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keys per iteration of the routing benches.
const KEYS: usize = 1024;
/// Partitions of the destination topic.
const PARTITIONS: u32 = 64;
/// Wider than the relay's defaults (`--rings 16`, `--ring-capacity 1024`),
/// so a batch of keys spreads over many rings.
const RINGS: usize = 64;
const RING_CAPACITY: usize = 8192;
/// What a flusher takes from one ring at a time (`sink::flusher::BATCH`).
const FLUSH_BATCH: usize = 512;
const PREFIX: &str = "factlib";
const AGGREGATES: [(&str, &str); 5] = [
    ("order", "order.placed"),
    ("customer", "customer.registered"),
    ("payment", "payment.captured"),
    ("shipment", "shipment.dispatched"),
    ("inventory", "inventory.reserved"),
];

/// A fixed-seed xorshift64, so every run routes the same keys.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// `order-12345`-style keys.
fn order_keys() -> Vec<String> {
    let mut rng = XorShift(0x5eed_0001);
    (0..KEYS)
        .map(|_| format!("order-{}", 10_000 + rng.next() % 90_000))
        .collect()
}

/// Hyphenated UUID strings (36 characters), as most emitters use for ids.
fn uuid_keys() -> Vec<String> {
    let mut rng = XorShift(0x5eed_0002);
    (0..KEYS)
        .map(|_| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&rng.next().to_le_bytes());
            b[8..].copy_from_slice(&rng.next().to_le_bytes());
            uuid::Builder::from_random_bytes(b)
                .into_uuid()
                .hyphenated()
                .to_string()
        })
        .collect()
}

fn bench_route(c: &mut Criterion) {
    let default = TopicTemplate::default();
    let with_event =
        TopicTemplate::parse("{prefix}.{aggregate_type}.{event_type}").expect("a valid template");
    let orders = order_keys();
    let uuids = uuid_keys();

    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(KEYS as u64));
    for (name, keys) in [("order-keys", &orders), ("uuid-keys", &uuids)] {
        g.bench_function(BenchmarkId::new("partition", name), |b| {
            b.iter(|| {
                keys.iter()
                    .map(|k| u64::from(partition_for_key(k.as_bytes(), PARTITIONS)))
                    .sum::<u64>()
            })
        });
    }
    for (name, template) in [("default", &default), ("with-event-type", &with_event)] {
        g.bench_function(BenchmarkId::new("render", name), |b| {
            b.iter(|| {
                let mut len = 0;
                for i in 0..KEYS {
                    let (aggregate, event) = AGGREGATES[i % AGGREGATES.len()];
                    if let Ok(topic) = template.render(PREFIX, aggregate, event) {
                        len += topic.len();
                    }
                }
                len
            })
        });
    }
    for (name, keys) in [("order-keys", &orders), ("uuid-keys", &uuids)] {
        g.bench_function(BenchmarkId::new("render+partition", name), |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for (i, key) in keys.iter().enumerate() {
                    let (aggregate, event) = AGGREGATES[i % AGGREGATES.len()];
                    if let Ok(topic) = default.render(PREFIX, aggregate, event) {
                        acc += topic.len() as u64;
                        acc += u64::from(partition_for_key(key.as_bytes(), PARTITIONS));
                    }
                }
                acc
            })
        });
    }
    g.finish();
}

/// One fact of the fixture, as the relay has it when it builds the record.
#[derive(Clone)]
struct Decoded {
    /// The fact, holding the message content it was decoded from.
    fact: FactView,
    /// The commit LSN for a transactional fact, the message's own otherwise.
    lsn: Lsn,
}

/// Every fact of the `mixed` golden fixture (transactional and lone, one
/// with metadata and a trace context), decoded the way the relay does.
fn fixture_facts() -> Vec<Decoded> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pg15/mixed.stream"
    );
    let bytes = std::fs::read(path).expect("golden fixture tests/fixtures/pg15/mixed.stream");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut commit = None;
    let mut facts = Vec::new();
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyData(body) = m else { continue };
        let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(body) else {
            continue;
        };
        match PgOutput::decode(x.data) {
            Ok(PgOutput::Begin(b)) => commit = Some(b.final_lsn),
            Ok(PgOutput::Commit(_)) => commit = None,
            Ok(PgOutput::Message(m)) if &m.prefix[..] == PREFIX.as_bytes() => {
                let lsn = match commit {
                    Some(c) if m.transactional => c,
                    _ => m.lsn,
                };
                if let Ok(fact) = decode_view(m.content) {
                    facts.push(Decoded { fact, lsn });
                }
            }
            _ => {}
        }
    }
    assert!(!facts.is_empty(), "the mixed fixture holds facts");
    facts
}

fn bench_record(c: &mut Criterion) {
    let facts = fixture_facts();
    let topic: Arc<str> = Arc::from("factlib.order");
    let template = TopicTemplate::default();

    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(facts.len() as u64));
    // `fact_record` takes the fact by value, so each batch gets a fresh copy
    // (setup, untimed). The records are dropped untimed too: in the relay
    // librdkafka takes their headers, the relay never frees them.
    let shape = |value, headers| RecordShape { value, headers };
    for (name, mode) in [
        ("envelope", shape(ValueMode::Envelope, HeaderSet::Standard)),
        ("payload", shape(ValueMode::Payload, HeaderSet::Standard)),
        (
            "envelope-full-headers",
            shape(ValueMode::Envelope, HeaderSet::Full),
        ),
        (
            "envelope-minimal-headers",
            shape(ValueMode::Envelope, HeaderSet::Minimal),
        ),
    ] {
        g.bench_function(BenchmarkId::new("fact_record", name), |b| {
            b.iter_batched(
                || facts.clone(),
                |facts| {
                    facts
                        .into_iter()
                        .enumerate()
                        .map(|(i, d)| {
                            fact_record(
                                d.fact,
                                mode,
                                d.lsn,
                                Arc::clone(&topic),
                                i32::try_from(i % 12).unwrap_or(0),
                                i,
                            )
                        })
                        .collect::<Vec<Record>>()
                },
                BatchSize::SmallInput,
            )
        });
    }
    // What `relay::session` does for a fact whose types differ from the
    // previous fact's (it reuses the previous route otherwise): render the
    // topic, look its shared name up (a plain map here, standing in for the
    // topic-metadata cache, which also holds the partition count), pick the
    // partition, build the record.
    let names: HashMap<String, Arc<str>> = facts
        .iter()
        .map(|d| {
            let f = &d.fact;
            let name = template
                .render(PREFIX, f.aggregate_type(), f.event_type())
                .expect("every fixture fact has a legal topic");
            (name.clone(), Arc::from(name))
        })
        .collect();
    g.bench_function("render+partition+fact_record", |b| {
        b.iter_batched(
            || facts.clone(),
            |facts| {
                facts
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, d)| {
                        let f = d.fact;
                        let name = template
                            .render(PREFIX, f.aggregate_type(), f.event_type())
                            .ok()?;
                        let topic = Arc::clone(names.get(&name)?);
                        let partition = partition_for_key(f.aggregate_id().as_bytes(), PARTITIONS);
                        let partition = i32::try_from(partition).ok()?;
                        Some(fact_record(
                            f,
                            shape(ValueMode::Envelope, HeaderSet::Standard),
                            d.lsn,
                            topic,
                            partition,
                            i,
                        ))
                    })
                    .collect::<Vec<Record>>()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// `n` records as the relay builds them (`fact_record`: shared topic, key
/// and value `Bytes` slicing the envelope, headers). Built once, untimed;
/// the ring benches only move them.
fn records(n: usize) -> Vec<Record> {
    let topic: Arc<str> = Arc::from("factlib.order");
    let payload = Bytes::from((0..=255u8).collect::<Vec<u8>>());
    (0..n)
        .map(|i| {
            let envelope = Bytes::from(encode(&Fact {
                id: format!("0190f0c1-0000-7000-8000-{i:012x}"),
                aggregate_type: "order".to_owned(),
                aggregate_id: format!("order-{}", 10_000 + i),
                event_type: "order.placed".to_owned(),
                payload: payload.clone(),
                ..Fact::default()
            }));
            let fact = decode_view(envelope).expect("a valid envelope");
            fact_record(
                fact,
                RecordShape {
                    value: ValueMode::Envelope,
                    headers: HeaderSet::Standard,
                },
                Lsn(0x100),
                Arc::clone(&topic),
                i32::try_from(i % RINGS).unwrap_or(0),
                i,
            )
        })
        .collect()
}

fn bench_ring(c: &mut Criterion) {
    const N: usize = 4096;
    let rings = Rings::<Record>::new(RINGS, RING_CAPACITY, 1).expect("valid ring sizes");
    // The same records go round and round: pushed out of `pool`, popped back
    // into it. Nothing is allocated or dropped on the timed path.
    let mut pool = records(N);

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("try_push+pop_into/64-rings", |b| {
        b.iter(|| {
            for (i, rec) in pool.drain(..).enumerate() {
                if rings.try_push(i % RINGS, rec).is_err() {
                    unreachable!("{N} records fit in {RINGS} rings of {RING_CAPACITY}");
                }
            }
            for ring in 0..RINGS {
                while rings.pop_into(ring, &mut pool, FLUSH_BATCH) > 0 {}
            }
            pool.len()
        })
    });
    // The same traffic through bare `crossbeam` queues (what each ring is),
    // without the wakeup handshakes `Rings` adds around them.
    let queues: Vec<ArrayQueue<Record>> =
        (0..RINGS).map(|_| ArrayQueue::new(RING_CAPACITY)).collect();
    g.bench_function("arrayqueue-baseline/64-queues", |b| {
        b.iter(|| {
            for (i, rec) in pool.drain(..).enumerate() {
                if queues[i % RINGS].push(rec).is_err() {
                    unreachable!("{N} records fit in {RINGS} queues of {RING_CAPACITY}");
                }
            }
            for q in &queues {
                while let Some(rec) = q.pop() {
                    pool.push(rec);
                }
            }
            pool.len()
        })
    });
    g.finish();
}

/// Moves all of `full` per iteration from a producer thread (the reader:
/// `Rings::try_push`, awaiting `Rings::room` when a ring is full) to a
/// consumer thread (the flusher: `pop_into` over its rings, `wait_for_work`
/// when they are empty), `iters` times. Each iteration is timed from the
/// producer's first push to the consumer's last pop.
///
/// The records are reused: the consumer hands the full vector back to the
/// producer, the producer its emptied one to the consumer, between timed
/// spans. On return `full` holds every record again and `empty` is an empty
/// vector of the same capacity, so nothing is allocated, dropped or touched
/// for the first time on the timed path.
fn cross_thread(
    iters: u64,
    rings: &Rings<Record>,
    full: &mut Vec<Record>,
    empty: &mut Vec<Record>,
) -> Duration {
    let n = full.len();
    let go = &Barrier::new(2);
    let (to_producer, from_consumer) = mpsc::channel::<Vec<Record>>();
    let (to_consumer, from_producer) = mpsc::channel::<Vec<Record>>();
    let mut batch = std::mem::take(full);
    let mut got = std::mem::take(empty);
    let (starts, ends, batch, got) = thread::scope(|s| {
        let producer = s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime");
            let mut starts = Vec::new();
            for i in 0..iters {
                go.wait();
                starts.push(Instant::now());
                rt.block_on(async {
                    for (k, mut rec) in batch.drain(..).enumerate() {
                        while let Err(back) = rings.try_push(k % RINGS, rec) {
                            rec = back;
                            rings.room(k % RINGS).await;
                        }
                    }
                });
                if i + 1 < iters {
                    let emptied = std::mem::take(&mut batch);
                    to_consumer.send(emptied).expect("consumer alive");
                    batch = from_consumer.recv().expect("consumer alive");
                }
            }
            (starts, batch)
        });
        let consumer = s.spawn(move || {
            let mut ends = Vec::new();
            for i in 0..iters {
                go.wait();
                while got.len() < n {
                    let mut took = 0;
                    for ring in rings.rings_of(0) {
                        took += rings.pop_into(ring, &mut got, FLUSH_BATCH);
                    }
                    if took == 0 {
                        rings.wait_for_work(0, Duration::from_millis(100));
                    }
                }
                ends.push(Instant::now());
                if i + 1 < iters {
                    let drained = std::mem::take(&mut got);
                    to_producer.send(drained).expect("producer alive");
                    got = from_producer.recv().expect("producer alive");
                }
            }
            (ends, got)
        });
        let (starts, batch) = producer.join().expect("producer thread");
        let (ends, got) = consumer.join().expect("consumer thread");
        (starts, ends, batch, got)
    });
    // After the last iteration the consumer holds every record.
    *full = got;
    *empty = batch;
    starts
        .iter()
        .zip(&ends)
        .map(|(s, e)| e.saturating_duration_since(*s))
        .sum()
}

fn bench_ring_cross_thread(c: &mut Criterion) {
    const N: usize = 65_536;
    let mut full = records(N);
    let mut empty = Vec::with_capacity(N);
    let mut g = c.benchmark_group("ring-cross-thread");
    g.throughput(Throughput::Elements(N as u64));
    // The default capacity never fills (N spread over 64 rings); 64 makes
    // the producer wait for room over and over.
    for capacity in [RING_CAPACITY, 64] {
        let rings = Rings::<Record>::new(RINGS, capacity, 1).expect("valid ring sizes");
        g.bench_function(BenchmarkId::new("spsc-64-rings/capacity", capacity), |b| {
            b.iter_custom(|iters| cross_thread(iters, &rings, &mut full, &mut empty))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_route,
    bench_record,
    bench_ring,
    bench_ring_cross_thread
);
criterion_main!(benches);
