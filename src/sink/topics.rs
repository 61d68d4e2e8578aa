//! Kafka topic metadata for routing: a topic's partition count, read from
//! the cluster (and the topic created first when allowed).
//!
//! **Invariants**
//! - Metadata is fetched on a thread of its own, never on the caller's
//!   runtime thread: librdkafka's `fetch_metadata` blocks for up to its
//!   timeout, and the caller is the WAL reader. (Not tokio's blocking pool:
//!   the runtime waits for that at exit, so a stop during a Kafka outage
//!   would wait out the timeout.)
//! - A missing topic is an error unless topic creation is on.
//! - A topic is handed to routing only once every partition has a leader
//!   ([`TopicState::Ready`]) and that leader answers for it: producing to a
//!   partition the broker has not applied yet can lose a batch (see
//!   [`TopicState::of_partitions`]). A broker publishes a new topic's
//!   leaders in its metadata before its replica manager has the
//!   partitions, so the metadata alone is not enough: each leader must
//!   answer a ListOffsets request for its partition (which the replica
//!   manager serves). CI lost the first fact of a just-created topic's
//!   partition that way, with the metadata check alone.

use std::time::Duration;

use super::kafka::TopicState;
use super::producer::CreateTopics;
use super::{KafkaProducer, SinkError};

/// How long a topic may take to have a leader for every partition after
/// it was found or created; past that, [`SinkError::NotReady`] (transient).
const READY_WITHIN: Duration = Duration::from_secs(5);

/// Looks topics up, creating them when allowed.
pub struct Topics {
    producer: KafkaProducer,
    create: Option<CreateTopics>,
    timeout: Duration,
}

impl Topics {
    /// `create` is `Some` when missing topics are to be created.
    pub fn new(producer: KafkaProducer, create: Option<CreateTopics>) -> Self {
        Topics {
            producer,
            create,
            timeout: Duration::from_secs(10),
        }
    }

    /// The partition count of `topic`, once every partition has a leader;
    /// the topic is created first if it is missing and creation is on.
    pub async fn partitions(&self, topic: &str) -> Result<u32, SinkError> {
        self.ready(topic, None).await
    }

    /// Makes sure the checkpoint topic exists and has a leader; with
    /// creation on, a missing one is created with one partition and
    /// `cleanup.policy=compact`.
    pub async fn checkpoints(&self, topic: &str) -> Result<(), SinkError> {
        self.ready(topic, Some(&[("cleanup.policy", "compact")]))
            .await
            .map(|_| ())
            .map_err(|e| match e {
                SinkError::TopicMissing(t) => SinkError::CheckpointTopicMissing(t),
                other => other,
            })
    }

    /// `configs` set: a checkpoint topic (one partition, these configs).
    async fn ready(&self, topic: &str, configs: Option<&[(&str, &str)]>) -> Result<u32, SinkError> {
        let n = self.led(topic, configs).await?;
        self.served(topic, n).await?;
        Ok(n)
    }

    /// The partition count once every partition has a leader in the
    /// metadata (creating the topic first when allowed).
    async fn led(&self, topic: &str, configs: Option<&[(&str, &str)]>) -> Result<u32, SinkError> {
        match self.fetch(topic).await? {
            TopicState::Ready(n) => return Ok(n),
            TopicState::NotReady => {}
            TopicState::Missing => {
                let Some(mut c) = self.create else {
                    return Err(SinkError::TopicMissing(topic.to_owned()));
                };
                if configs.is_some() {
                    c.partitions = 1;
                }
                self.producer
                    .create_topic(topic, c, configs.unwrap_or_default())
                    .await?;
                tracing::info!(
                    topic,
                    partitions = c.partitions,
                    replication = c.replication,
                    "created topic"
                );
            }
        }
        // Metadata lags creation, and leaders are elected after it: usually
        // tens of milliseconds, so look again soon, then less often.
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let mut wait = Duration::from_millis(10);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(wait).await;
            if let TopicState::Ready(n) = self.fetch(topic).await? {
                return Ok(n);
            }
            wait = (wait * 2).min(Duration::from_millis(100));
        }
        Err(SinkError::NotReady(topic.to_owned()))
    }

    /// Waits until each partition's leader answers for it (see the module's
    /// invariants). Should one still not answer after [`READY_WITHIN`], a
    /// warning says so and the topic is used anyway, as before this check.
    async fn served(&self, topic: &str, n: u32) -> Result<(), SinkError> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let mut wait = Duration::from_millis(10);
        loop {
            let producer = self.producer.clone();
            let (name, timeout) = (topic.to_owned(), self.timeout.min(READY_WITHIN));
            let unserved = off_thread("factlib-metadata", move || {
                Ok(producer.unserved_partition(&name, n, timeout))
            })
            .await?;
            let Some((partition, error)) = unserved else {
                return Ok(());
            };
            tracing::debug!(topic, partition, %error, "waiting for the partition's leader to answer for it");
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    topic,
                    partition,
                    %error,
                    "a partition's leader does not answer for it yet; producing anyway"
                );
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    /// One metadata request, on a thread of its own.
    async fn fetch(&self, topic: &str) -> Result<TopicState, SinkError> {
        let producer = self.producer.clone();
        let (name, timeout) = (topic.to_owned(), self.timeout);
        off_thread("factlib-metadata", move || {
            producer.topic_state(&name, timeout)
        })
        .await
    }
}

/// Runs blocking librdkafka work `f` on a thread of its own and awaits its
/// answer (see the module's invariants for why not on the runtime).
pub async fn off_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| SinkError::LookupThread(e.to_string()))?;
    rx.await
        .map_err(|_| SinkError::LookupThread(format!("{name} ended without an answer")))?
}
