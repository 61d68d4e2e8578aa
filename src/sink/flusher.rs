//! Flusher threads: each drains its share of the per-partition rings into
//! the producer.
//!
//! ```text
//!  rings_of(k) ──pop_into──► batch ──KafkaProducer::send──► librdkafka
//!                                      └─ queue full: wait, retry the same record
//! ```
//!
//! **Invariants**
//! - Ring `i` is drained only by flusher `i % flushers`, oldest first, and a
//!   record is retried until librdkafka takes it, so per-ring order reaches
//!   librdkafka unchanged.
//! - A record librdkafka refuses for good is reported as
//!   [`Delivery::Failed`], never dropped.
//! - A flusher exits only when the rings are closed *and* its rings are
//!   empty.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::Sender;

use super::kafka::{Delivery, KafkaProducer, SendOutcome};
use super::record::Record;
use crate::route::Rings;

/// Records taken from a ring at a time.
const BATCH: usize = 512;

/// Starts flusher `k` as an OS thread.
pub fn spawn(
    k: usize,
    rings: Arc<Rings<Record>>,
    producer: KafkaProducer,
    failures: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("factlib-flush-{k}"))
        .spawn(move || run(k, &rings, &producer, &failures, &wake))
}

fn run(
    k: usize,
    rings: &Rings<Record>,
    producer: &KafkaProducer,
    failures: &Sender<Delivery>,
    wake: &tokio::sync::Notify,
) {
    let mine: Vec<usize> = rings.rings_of(k).collect();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let mut took = 0;
        for &ring in &mine {
            took += rings.pop_into(ring, &mut batch, BATCH);
            for rec in batch.drain(..) {
                send(producer, rec, failures, wake);
            }
        }
        if took == 0 {
            if rings.is_closed() && mine.iter().all(|&r| rings.is_empty(r)) {
                return;
            }
            rings.wait_for_work(k, Duration::from_millis(100));
        }
    }
}

/// Sends one record, waiting while librdkafka's queue is full.
fn send(
    producer: &KafkaProducer,
    mut rec: Record,
    failures: &Sender<Delivery>,
    wake: &tokio::sync::Notify,
) {
    let mut wait = Duration::from_micros(100);
    loop {
        match producer.send(rec) {
            Ok(SendOutcome::Queued) => return,
            Ok(SendOutcome::Full(back)) => {
                rec = back;
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            Err((error, back)) => {
                let topic = back.topic.to_string();
                let _ = failures.send(Delivery::Failed {
                    opaque: back.opaque,
                    topic,
                    error,
                });
                wake.notify_one();
                return;
            }
        }
    }
}
