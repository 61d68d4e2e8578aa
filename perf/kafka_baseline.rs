//! The Kafka side's limit: a plain rdkafka producer pushes records shaped
//! like the relay's (same envelope size, key spread, headers, producer
//! settings) into the same broker, and reports how fast the broker acks.
//!
//! `perf/kafka-baseline [N]` builds and runs it; see perf/README.md.

use std::time::Instant;

use bytes::Bytes;
use factlib::fact::Fact;
use factlib::route::murmur2::partition_for_key;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let payload: usize = std::env::var("PAYLOAD")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(256);
    let brokers = std::env::var("FACTLIB_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let topic = args
        .next()
        .expect("usage: kafka_baseline N TOPIC (the topic must exist)");
    let partitions: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(6);

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "compression.type",
            std::env::var("COMPRESSION").unwrap_or_else(|_| "lz4".into()),
        )
        .set("linger.ms", "1")
        .set("batch.size", "1048576")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "20000")
        .set("queue.buffering.max.kbytes", "16384")
        .set("message.timeout.ms", "0")
        .create()
        .expect("producer");

    // Values shaped exactly like the relay's: an encoded envelope.
    let value = Bytes::from(factlib::fact::encode(&Fact {
        id: "01a21900-0000-7000-8000-000000000000".into(),
        aggregate_type: "order".into(),
        aggregate_id: "order-0".into(),
        event_type: "order.placed".into(),
        payload: Bytes::from(vec![b'x'; payload]),
        created_at: 1_795_000_000_000_000_000,
        ..Default::default()
    }));
    // HEADERS=n sends only the first n of these four headers, to show what
    // they cost. The default, 3, is the relay's `--headers standard` for a
    // fact without metadata or trace info; 4 is `--headers full`.
    let n_headers: usize = std::env::var("HEADERS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(3);
    let keys: Vec<String> = (0..1000).map(|k| format!("order-{k}")).collect();
    let start = Instant::now();
    for i in 0..n {
        let key = &keys[i % keys.len()];
        let partition = i32::try_from(partition_for_key(key.as_bytes(), partitions)).unwrap_or(0);
        let all = [
            ("factlib-lsn", "0/1A2B3C4D"),
            ("factlib-id", "01a21900-0000-7000-8000-000000000000"),
            ("factlib-event-type", "order.placed"),
            ("factlib-aggregate-type", "order"),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(n_headers);
        for (key, value) in &all[..n_headers.min(all.len())] {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let mut rec = BaseRecord::to(&topic)
            .key(key.as_str())
            .payload(&value[..])
            .partition(partition);
        if n_headers > 0 {
            rec = rec.headers(headers);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err((e, _)) => panic!("produce failed: {e}"),
            }
        }
    }
    producer
        .flush(std::time::Duration::from_secs(300))
        .expect("flush");
    let secs = start.elapsed().as_secs_f64();
    let bytes = (value.len() + 7) as f64 * n as f64;
    println!(
        "kafka-baseline: {n} records of {} value bytes in {secs:.2} s: {:.0} records/s, {:.1} MB/s",
        value.len(),
        n as f64 / secs,
        bytes / secs / 1e6
    );
}
