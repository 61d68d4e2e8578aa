//! The Kafka side: records, the rdkafka producer, flusher threads that drain
//! the per-partition rings, and the dead-letter records.
//!
//! ```text
//!  rings[p] ──flusher k (p % flushers == k)──► Producer::send ──► librdkafka ──► Kafka
//!                                                   └─ delivery report ──► Delivery ──► relay
//! ```
//!
//! The sink does not track LSNs: every record carries an opaque ack token,
//! and the relay maps reports back to positions.
//!
//! **Invariants**
//! - A record is either queued in librdkafka or still held by its flusher;
//!   a full queue makes the flusher wait, which fills the rings, which stops
//!   the WAL reader (backpressure end to end).
//! - Each ring is drained by one flusher thread, in order, so records of one
//!   partition reach librdkafka in commit order.
//! - A record that cannot be sent is reported as [`Delivery::Failed`]; it is
//!   never dropped silently.

pub mod flusher;
pub mod kafka;
pub mod record;
pub mod topics;

pub use kafka::{Compression, Delivery, KafkaProducer, SendOutcome, SinkSettings, TopicState};
pub use record::{HeaderSet, Record, RecordShape, ValueMode};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::lsn::Lsn;

/// What the flushers drive. Records arrive in batches cut at PostgreSQL
/// transaction boundaries: `begin`, then `send` for each record, and
/// `commit` after a record whose [`Record::txn_end`] is set.
///
/// The at-least-once producer ([`KafkaProducer`]) needs no batch: its
/// `begin` and `commit` do nothing, and delivery reports alone drive
/// progress. An exactly-once producer would run a Kafka transaction per
/// batch, writing a checkpoint record (the `txn_end` LSN) to a compacted
/// topic before `commit`; it needs one flusher (`--flushers 1 --rings 1`)
/// so that a batch holds whole PostgreSQL transactions in order.
pub trait Producer: Clone + Send + 'static {
    /// Starts a batch.
    fn begin(&mut self) -> Result<(), SinkError>;
    /// Hands one record over without blocking; a full queue returns it.
    #[allow(clippy::result_large_err)]
    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)>;
    /// Ends the batch after the record that closed PostgreSQL unit `through`.
    fn commit(&mut self, through: Lsn) -> Result<(), SinkError>;
}

/// Why the Kafka side failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The producer configuration is invalid.
    #[error("invalid Kafka producer configuration: {0}")]
    Config(#[source] KafkaError),
    /// Could not read topic metadata (broker unreachable?).
    #[error(
        "cannot read metadata for topic {topic:?}: {source}; is Kafka reachable at --brokers?"
    )]
    Metadata {
        /// The topic.
        topic: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// A partition of the topic still has no leader after waiting.
    #[error(
        "Kafka topic {0:?} has a partition without a leader; waiting for the cluster to elect one"
    )]
    NotReady(String),
    /// The topic does not exist and `--create-topics` is off.
    #[error("Kafka topic {0:?} does not exist; create it, or run the relay with --create-topics (and --partitions / --replication-factor)")]
    TopicMissing(String),
    /// Creating a topic failed.
    #[error("cannot create Kafka topic {topic:?}: {source}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// librdkafka refused or failed a record for good.
    #[error("producing to Kafka topic {topic:?} failed permanently: {source}")]
    Produce {
        /// The topic.
        topic: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// Flushing timed out or failed.
    #[error("flushing the Kafka producer failed: {0}")]
    Flush(#[source] KafkaError),
    /// A metadata request's thread did not run or answer.
    #[error("a Kafka metadata request failed to run: {0}")]
    LookupThread(String),
}

impl SinkError {
    /// True if retrying later may succeed: Kafka unreachable or slow while
    /// reading metadata or creating a topic. False for errors that need
    /// someone to change something (configuration, permissions, a missing
    /// topic, a record Kafka refuses).
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Metadata { source, .. } => !source
                .rdkafka_error_code()
                .is_some_and(|c| DEFINITE.contains(&c)),
            SinkError::CreateTopic { source, .. } => source
                .rdkafka_error_code()
                .is_some_and(|c| UNREACHABLE.contains(&c)),
            SinkError::Flush(_) | SinkError::NotReady(_) => true,
            SinkError::Config(_)
            | SinkError::TopicMissing(_)
            | SinkError::Produce { .. }
            | SinkError::LookupThread(_) => false,
        }
    }
}

/// What to do about a record Kafka refused for good, as a line to append to
/// the error; empty when there is nothing specific to say.
pub fn refusal_advice(error: &KafkaError, max_message_bytes: u64) -> String {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge) => {
            format!(
                "\n  the record is over a size limit on its way to Kafka: the producer's \
                 --max-message-bytes (librdkafka message.max.bytes, now {max_message_bytes}), the \
                 topic's max.message.bytes, or the broker's message.max.bytes; raise each one \
                 that is lower than the record (--max-message-bytes also sets max.message.bytes \
                 on topics that --create-topics makes)"
            )
        }
        _ => String::new(),
    }
}

/// Codes that mean the cluster could not be reached or did not answer in
/// time.
const UNREACHABLE: [RDKafkaErrorCode; 8] = [
    RDKafkaErrorCode::OperationTimedOut,
    RDKafkaErrorCode::RequestTimedOut,
    RDKafkaErrorCode::BrokerTransportFailure,
    RDKafkaErrorCode::AllBrokersDown,
    RDKafkaErrorCode::NetworkException,
    RDKafkaErrorCode::NotController,
    RDKafkaErrorCode::LeaderNotAvailable,
    RDKafkaErrorCode::BrokerNotAvailable,
];

/// Metadata answers that retrying does not change.
const DEFINITE: [RDKafkaErrorCode; 4] = [
    RDKafkaErrorCode::TopicAuthorizationFailed,
    RDKafkaErrorCode::ClusterAuthorizationFailed,
    RDKafkaErrorCode::InvalidTopic,
    RDKafkaErrorCode::SaslAuthenticationFailed,
];
