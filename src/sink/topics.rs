//! Kafka topic metadata for routing: partition counts, looked up once per
//! topic and cached; missing topics created when allowed.
//!
//! **Invariants**
//! - A topic's partition count is read once per run, so a key maps to the
//!   same partition for the whole run.
//! - A missing topic is an error unless `--create-topics` is on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{KafkaProducer, SinkError};

/// A topic the relay writes to.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    /// Its name, shared by every record.
    pub name: Arc<str>,
    /// Partition count.
    pub partitions: u32,
    /// The ring of its partition 0; partition `p` uses ring
    /// `(ring_base + p) % rings`.
    pub ring_base: usize,
}

/// Creation settings for `--create-topics`.
#[derive(Debug, Clone, Copy)]
pub struct CreateTopics {
    /// Partitions of a new topic.
    pub partitions: i32,
    /// Replication factor of a new topic.
    pub replication: i32,
}

/// The cache of topics seen so far.
pub struct Topics {
    producer: KafkaProducer,
    create: Option<CreateTopics>,
    known: HashMap<String, TopicInfo>,
    next_ring: usize,
    timeout: Duration,
}

impl Topics {
    /// An empty cache. `create` is `Some` with `--create-topics`.
    pub fn new(producer: KafkaProducer, create: Option<CreateTopics>) -> Self {
        Topics {
            producer,
            create,
            known: HashMap::new(),
            next_ring: 0,
            timeout: Duration::from_secs(10),
        }
    }

    /// The topic's info, looking it up (and creating it) on first use.
    pub async fn get(&mut self, topic: &str) -> Result<&TopicInfo, SinkError> {
        if !self.known.contains_key(topic) {
            let info = self.lookup(topic).await?;
            self.known.insert(topic.to_owned(), info);
        }
        self.known
            .get(topic)
            .ok_or_else(|| SinkError::TopicMissing(topic.to_owned()))
    }

    async fn lookup(&mut self, topic: &str) -> Result<TopicInfo, SinkError> {
        let mut partitions = self.producer.partitions(topic, self.timeout)?;
        if partitions.is_none() {
            let Some(c) = self.create else {
                return Err(SinkError::TopicMissing(topic.to_owned()));
            };
            self.producer
                .create_topic(topic, c.partitions, c.replication)
                .await?;
            tracing::info!(
                topic,
                partitions = c.partitions,
                replication = c.replication,
                "created topic"
            );
            // Metadata may lag creation for a moment.
            for _ in 0..50 {
                partitions = self.producer.partitions(topic, self.timeout)?;
                if partitions.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let partitions = partitions.ok_or_else(|| SinkError::TopicMissing(topic.to_owned()))?;
        let ring_base = self.next_ring;
        self.next_ring = self
            .next_ring
            .wrapping_add(usize::try_from(partitions).unwrap_or(1));
        Ok(TopicInfo {
            name: Arc::from(topic),
            partitions,
            ring_base,
        })
    }
}
