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
//! - Once the rings are closed (the relay is exiting, having confirmed
//!   what was acknowledged), a record the producer's full queue keeps
//!   refusing for [`GIVE_UP_AFTER_CLOSE`] is given up, so a stop while
//!   Kafka is away ends the process. It was never acknowledged, so its unit
//!   was not confirmed: it comes again on the next start.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam::channel::Sender;

use super::producer::{Delivery, Producer, SendOutcome, GIVE_UP_AFTER_CLOSE};
use super::record::Record;
use crate::route::Rings;
use crate::telemetry::Beat;

/// Records taken from a ring at a time.
const BATCH: usize = 512;

/// Starts flusher `k` as an OS thread.
pub fn spawn<P: Producer>(
    k: usize,
    rings: Arc<Rings<Record>>,
    producer: P,
    failures: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("factlib-flush-{k}"))
        .spawn(move || {
            Flusher {
                producer,
                failures,
                wake,
                closed_full_since: None,
                given_up: 0,
                beat: Beat::register(format!("flusher-{k}")),
            }
            .run(k, &rings)
        })
}

struct Flusher<P> {
    producer: P,
    failures: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
    /// Since when the queue has been full with the rings closed.
    closed_full_since: Option<std::time::Instant>,
    /// Records given up after the rings closed.
    given_up: u64,
    /// Liveness: ticked on each pass (`/healthz`).
    beat: Beat,
}

impl<P: Producer> Flusher<P> {
    fn run(mut self, k: usize, rings: &Rings<Record>) {
        let mine: Vec<usize> = rings.rings_of(k).collect();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            self.beat.tick();
            let mut took = 0;
            for &ring in &mine {
                took += rings.pop_into(ring, &mut batch, BATCH);
                for rec in batch.drain(..) {
                    self.send(rec, rings);
                }
            }
            if took == 0 {
                if rings.is_closed() && mine.iter().all(|&r| rings.is_empty(r)) {
                    if self.given_up > 0 {
                        tracing::warn!(
                            records = self.given_up,
                            "stopping with records Kafka never took; they were not confirmed and will be sent again on restart"
                        );
                    }
                    return;
                }
                rings.wait_for_work(k, Duration::from_millis(100));
            }
        }
    }

    /// Sends one record, waiting while the producer's queue is full (after
    /// the rings close, for [`GIVE_UP_AFTER_CLOSE`] at most).
    fn send(&mut self, mut rec: Record, rings: &Rings<Record>) {
        let mut wait = Duration::from_micros(100);
        loop {
            match self.producer.send(rec) {
                Ok(SendOutcome::Queued) => {
                    self.closed_full_since = None;
                    return;
                }
                Ok(SendOutcome::Full(back)) => {
                    rec = back;
                    self.beat.tick();
                    if rings.is_closed() {
                        let since = *self
                            .closed_full_since
                            .get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= GIVE_UP_AFTER_CLOSE {
                            self.given_up += 1;
                            return;
                        }
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
                Err((error, back)) => {
                    self.fail(Delivery::Failed {
                        opaque: back.opaque,
                        topic: back.topic.to_string(),
                        bytes: back.value.len() + back.key.as_ref().map_or(0, Bytes::len),
                        error,
                    });
                    return;
                }
            }
        }
    }

    fn fail(&self, d: Delivery) {
        let _ = self.failures.send(d);
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::sink::record::dead_letter;
    use rdkafka::error::KafkaError;
    use std::sync::Mutex;

    /// Records the opaques sent; the first send of `full_once` reports a
    /// full queue.
    #[derive(Clone, Default)]
    struct Recording {
        calls: Arc<Mutex<Vec<usize>>>,
        full_once: Arc<Mutex<Option<usize>>>,
    }

    impl Producer for Recording {
        fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
            let mut full = self.full_once.lock().unwrap();
            if *full == Some(rec.opaque) {
                *full = None;
                return Ok(SendOutcome::Full(rec));
            }
            self.calls.lock().unwrap().push(rec.opaque);
            Ok(SendOutcome::Queued)
        }
    }

    fn rec(opaque: usize, txn_end: Option<u64>) -> Record {
        let mut r = dead_letter(Bytes::from_static(b"x"), "e", Lsn(1), "t".into(), 0, opaque);
        r.txn_end = txn_end.map(Lsn);
        r
    }

    #[test]
    fn records_reach_the_producer_in_ring_order() {
        let rings = Rings::new(1, 16, 1).unwrap();
        for r in [
            rec(1, None),
            rec(2, None),
            rec(3, Some(100)),
            rec(4, Some(120)),
            rec(5, Some(200)),
        ] {
            rings.try_push(0, r).unwrap();
        }
        rings.close();
        let p = Recording::default();
        *p.full_once.lock().unwrap() = Some(2);
        let (tx, rx) = crossbeam::channel::unbounded();
        spawn(
            0,
            Arc::clone(&rings),
            p.clone(),
            tx,
            Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(
            *p.calls.lock().unwrap(),
            vec![1, 2, 3, 4, 5],
            "a full queue retries the same record, in order"
        );
        assert!(rx.try_recv().is_err(), "no failures");
        assert_eq!(
            rings.total_len(),
            0,
            "the flusher drains its rings before exiting"
        );
    }

    /// Kafka away: the producer's queue is full for good.
    #[derive(Clone)]
    struct AlwaysFull;

    impl Producer for AlwaysFull {
        fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
            Ok(SendOutcome::Full(rec))
        }
    }

    /// The hang: a stop while Kafka was away left the flusher retrying a
    /// full queue for ever, so the process never exited.
    #[test]
    fn a_full_queue_after_close_is_given_up_and_the_flusher_exits() {
        let rings = Rings::new(1, 16, 1).unwrap();
        for i in 0..3 {
            rings.try_push(0, rec(i, Some(10))).unwrap();
        }
        rings.close();
        let (tx, rx) = crossbeam::channel::unbounded();
        let flusher = spawn(
            0,
            Arc::clone(&rings),
            AlwaysFull,
            tx,
            Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap();
        let (done, exited) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(flusher.join().is_ok()));
        // Far beyond GIVE_UP_AFTER_CLOSE: not a speed bound, a hang detector.
        assert_eq!(
            exited.recv_timeout(Duration::from_secs(60)),
            Ok(true),
            "the flusher exits"
        );
        assert_eq!(rings.total_len(), 0);
        assert!(rx.try_recv().is_err(), "given up, not reported as failed");
    }
}
