//! perf/visibility: how long after a fact was created does a
//! `read_committed` consumer see it? Reads the given topics from their end
//! while a load runs and records, per record, now minus its Kafka timestamp
//! (the relay sets it to the fact's `created_at`), in an hdrhistogram.
//!
//! Usage: visibility BROKERS TOPIC[,TOPIC…] IDLE_SECS
//! Stops once IDLE_SECS pass without a record (after the first one), then
//! prints `visibility count=… p50_ms=… p99_ms=… p999_ms=… max_ms=…`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, Timestamp, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topics, idle] = args.as_slice() else {
        eprintln!("usage: visibility BROKERS TOPIC[,TOPIC...] IDLE_SECS");
        std::process::exit(2);
    };
    let idle = Duration::from_secs(idle.parse().expect("IDLE_SECS"));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("factlib-visibility-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics.split(',') {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("metadata");
        for p in md.topics().iter().flat_map(|m| m.partitions()) {
            tpl.add_partition_offset(t, p.id(), Offset::End)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut h =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("histogram");
    let mut last: Option<Instant> = None;
    eprintln!("visibility: reading {topics} read_committed from the end");
    while last.is_none_or(|l| l.elapsed() < idle) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            if let Timestamp::CreateTime(ts) = m.timestamp() {
                let _ = h.record(u64::try_from(now - ts).unwrap_or(0).max(1));
            }
            last = Some(Instant::now());
        }
    }
    println!(
        "visibility count={} p50_ms={} p99_ms={} p999_ms={} max_ms={}",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}
