//! The pieces every part of the sink shares, and so the bottom of the
//! folder: what a flusher drives ([`Producer`], [`Transactional`]), what
//! comes back ([`SendOutcome`], [`Delivery`]), the errors a transactional
//! call classifies, and the settings of topics the relay creates.
//!
//! ```text
//!  security, record, producer            (no sink imports but these)
//!        └──► kafka (rdkafka: KafkaProducer implements Producer, Transactional)
//!               ├──► topics, checkpoint
//!               flusher (generic over Producer) ──┐
//!               txn (generic over Transactional, writes checkpoints) ◄┘ shares GIVE_UP_AFTER_CLOSE
//! ```
//!
//! **Invariants**
//! - Nothing here imports another module of the sink but `record`; every
//!   other module may import this one.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::record::Record;
use super::SinkError;

/// What the at-least-once flushers drive: one `send` per record, in ring
/// order. Delivery reports alone carry progress. (Exactly-once has its own
/// flusher: [`txn`].)
pub trait Producer: Clone + Send + 'static {
    /// Hands one record over without blocking; a full queue returns it.
    #[allow(clippy::result_large_err)]
    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)>;
}

/// What `send` did with a record.
pub enum SendOutcome {
    /// Queued in librdkafka; a delivery report will follow.
    Queued,
    /// The producer queue is full: try again shortly with the same record.
    Full(Record),
}

/// A delivery report.
#[derive(Debug)]
pub enum Delivery {
    /// Kafka acknowledged the record.
    Acked {
        /// Its opaque token.
        opaque: usize,
        /// Key + value bytes.
        bytes: u64,
    },
    /// The sink cannot go on (a Kafka transaction failed); the error says
    /// whether it is transient.
    Broken(SinkError),
    /// Exactly-once: a Kafka transaction committed. Its last fact record
    /// carried `opaque` and ended the unit at `through` (the checkpoint
    /// written with it).
    Committed {
        /// The opaque of the transaction's last fact record.
        opaque: usize,
        /// Fact records in the transaction.
        records: usize,
        /// Their key + value + header bytes.
        bytes: u64,
        /// The checkpoint: the end of the transaction's last unit.
        through: crate::lsn::Lsn,
    },
    /// Exactly-once: the answer to `txn::Command::Reset`.
    Reset,
    /// The record failed for good.
    Failed {
        /// Its opaque token.
        opaque: usize,
        /// Where it was going.
        topic: String,
        /// Its key + value bytes.
        bytes: usize,
        /// Why.
        error: KafkaError,
    },
}

/// How a transactional call failed, as librdkafka classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnErrorKind {
    /// Try the same call again.
    Retriable,
    /// The transaction must be aborted; the producer stays usable.
    Abortable,
    /// The producer is unusable: fenced, or a fatal error.
    Fatal,
}

/// A failed transactional call.
#[derive(Debug)]
pub struct TxnError {
    /// What the caller must do.
    pub kind: TxnErrorKind,
    /// The error.
    pub error: KafkaError,
}

/// A transactional producer, as the flusher drives it.
pub trait Transactional: Send + 'static {
    /// `begin_transaction`.
    fn begin(&mut self) -> Result<(), TxnError>;
    /// Hands one record over without blocking; a full queue returns it.
    #[allow(clippy::result_large_err)]
    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)>;
    /// Waits up to `timeout` for Kafka to acknowledge every record handed
    /// over; true once none is left.
    fn settle(&mut self, timeout: Duration) -> bool;
    /// `commit_transaction`.
    fn commit(&mut self, timeout: Duration) -> Result<(), TxnError>;
    /// `abort_transaction`.
    fn abort(&mut self, timeout: Duration) -> Result<(), TxnError>;
}

/// Settings of topics created by the relay (`--create-topics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateTopics {
    /// Partitions of a new topic.
    pub partitions: i32,
    /// Replication factor of a new topic.
    pub replication: i32,
    /// The new topic's `max.message.bytes`.
    pub max_message_bytes: u64,
}

/// After the rings close, how long a record may wait for room in the
/// producer's queue before the flusher gives it up.
pub const GIVE_UP_AFTER_CLOSE: Duration = Duration::from_secs(5);

/// Errors that refuse a record for good: sending it again fails again.
pub fn refused_for_good(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}
