//! The Kafka side: records, the rdkafka producer, flusher threads that drain
//! the per-partition rings, and the dead-letter records.
//!
//! ```text
//!  rings[p] ──flusher k (p % flushers == k)──► Producer::send ──► librdkafka ──► Kafka
//!                                                   └─ delivery report ──► Delivery ──► relay
//!  exactly-once: ring 0 ──txn flusher──► Kafka transactions (+ checkpoint) ──► Delivery::Committed ──► relay
//! ```
//!
//! The sink does not track LSNs: every record carries an opaque ack token,
//! and the relay maps reports back to positions.
//!
//! The modules, bottom-up (each imports only those before it, and this
//! one's [`SinkError`]): `record` and `security`; `producer`, the pieces
//! they all share; `kafka`, rdkafka behind them; `topics` and `checkpoint`
//! on `kafka`; `flusher` and `txn`, the two ways to drive a producer.
//!
//! **Invariants**
//! - A record is either queued in librdkafka or still held by its flusher;
//!   a full queue makes the flusher wait, which fills the rings, which stops
//!   the WAL reader (backpressure end to end).
//! - Each ring is drained by one flusher thread, in order, so records of one
//!   partition reach librdkafka in commit order.
//! - A record that cannot be sent is reported as [`Delivery::Failed`]; it is
//!   never dropped silently.

pub mod checkpoint;
pub mod flusher;
pub mod kafka;
pub mod producer;
pub mod record;
pub mod security;
pub mod topics;
pub mod txn;

pub use kafka::{Compression, KafkaProducer, SinkSettings, TopicState};
pub use producer::{CreateTopics, Delivery, Producer, SendOutcome};
pub use record::{HeaderSet, Record, RecordShape, ValueMode};
pub use security::{KafkaSecurity, SaslCredentials, SaslMechanism, Secret, SecurityProtocol};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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
    /// The checkpoint topic does not exist and `--create-topics` is off.
    #[error("the checkpoint topic {0:?} does not exist; create it with one partition and cleanup.policy=compact, or run the relay with --create-topics")]
    CheckpointTopicMissing(String),
    /// Reading the checkpoint topic failed.
    #[error(
        "cannot read the checkpoint topic {topic:?}: {source}; is Kafka reachable at --brokers?"
    )]
    Checkpoint {
        /// The checkpoint topic.
        topic: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// A checkpoint of this source does not parse.
    #[error("the checkpoint at offset {offset} of {topic:?} does not parse ({detail}); if the topic holds something else, point --prefix elsewhere, or start over with --reset-checkpoint")]
    CheckpointCorrupt {
        /// The checkpoint topic.
        topic: String,
        /// The record's offset.
        offset: i64,
        /// What is wrong.
        detail: String,
    },
    /// Starting the transactional producer (`init_transactions`) failed.
    #[error("cannot start Kafka transactions (transactional.id {id:?}): {source}")]
    TransactionInit {
        /// The transactional id.
        id: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// A Kafka transaction failed and was aborted; its records are streamed
    /// again from the last checkpoint.
    #[error("a Kafka transaction failed ({op}) and was aborted: {source}; streaming again from the last checkpoint")]
    TransactionAborted {
        /// The call that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// The transactional producer cannot go on: fenced by a newer producer
    /// with the same `transactional.id`, or a fatal error.
    #[error("{}", fatal_message(op, source))]
    TransactionFatal {
        /// The call that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// The brokers refused the client's credentials (SASL authentication
    /// failed). librdkafka would retry for ever; nothing changes until
    /// someone fixes the credentials.
    #[error("Kafka refused the relay's credentials ({0}); check --kafka-sasl-username, --kafka-sasl-password and --kafka-sasl-mechanism (FACTLIB_KAFKA_SASL_USERNAME, …_PASSWORD, …_MECHANISM) against the user on the brokers")]
    Authentication(String),
    /// A bug in the sink.
    #[error("internal error in the Kafka sink: {0}")]
    Internal(&'static str),
}

fn fatal_message(op: &str, source: &KafkaError) -> String {
    let fenced = matches!(
        source.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    if fenced {
        format!(
            "this relay was fenced ({op}: {source}): another relay started with the same \
             --transactional-id and took over; this one stops without confirming anything more. \
             Run one relay per slot"
        )
    } else {
        format!(
            "the Kafka transactional producer failed fatally ({op}: {source}); stopping without \
             confirming anything more. Restarting the relay aborts the open transaction and \
             resumes from the last checkpoint"
        )
    }
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
            SinkError::Checkpoint { source, .. } | SinkError::TransactionInit { source, .. } => {
                let fatal = matches!(source, KafkaError::Transaction(e) if e.is_fatal());
                !fatal
                    && !source
                        .rdkafka_error_code()
                        .is_some_and(|c| DEFINITE.contains(&c))
            }
            SinkError::Flush(_) | SinkError::NotReady(_) | SinkError::TransactionAborted { .. } => {
                true
            }
            SinkError::Config(_)
            | SinkError::TopicMissing(_)
            | SinkError::Produce { .. }
            | SinkError::LookupThread(_)
            | SinkError::CheckpointTopicMissing(_)
            | SinkError::CheckpointCorrupt { .. }
            | SinkError::TransactionFatal { .. }
            | SinkError::Authentication(_)
            | SinkError::Internal(_) => false,
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
const DEFINITE: [RDKafkaErrorCode; 6] = [
    RDKafkaErrorCode::TopicAuthorizationFailed,
    RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
    RDKafkaErrorCode::InvalidTransactionTimeout,
    RDKafkaErrorCode::ClusterAuthorizationFailed,
    RDKafkaErrorCode::InvalidTopic,
    RDKafkaErrorCode::SaslAuthenticationFailed,
];
