//! Factlib relays facts (events) that services write into PostgreSQL's WAL,
//! inside their own business transactions, to Kafka — without losing or
//! duplicating any.
//!
//! `docs/ARCHITECTURE.md` maps the pipeline and says where to start
//! reading. Modules, one owner each:
//! - [`lsn`]: the `Lsn` newtype.
//! - [`pgwire`]: the sans-io replication protocol.
//! - [`source`]: the replication connection (io_uring or tokio), and the
//!   connection string and TLS (libpq `sslmode`) every connection uses.
//! - [`fact`]: the protobuf envelope.
//! - [`route`]: topic, key → partition (Java-compatible), per-partition rings.
//! - [`progress`]: the stream's units (CopyData to facts) and the lowest
//!   fully-acked LSN.
//! - [`sink`]: Kafka records, the rdkafka producer, flushers, dead letters.
//! - [`relay`]: wires the stages; lifecycle, reconnects, shutdown.
//! - `backoff`: when to reconnect after a transient failure.
//! - [`telemetry`]: metrics and events (log + metric together).
//! - [`emit`]: the emitter API services use.
//! - [`inbox`]: the consuming service's side: Kafka into its PostgreSQL,
//!   exactly once, and the API that processes the inbox.
//! - `schema`: versioned SQL scripts that `setup` commands install.
//! - [`config`]: the command line.
//! - [`cli`]: the subcommands.

pub(crate) mod backoff;
pub mod cli;
pub mod config;
pub mod emit;
pub mod fact;
pub mod inbox;
pub mod lsn;
pub mod outbox;
pub mod pgwire;
pub mod progress;
pub mod relay;
pub mod route;
pub(crate) mod schema;
pub mod sink;
pub mod source;
pub mod telemetry;

pub use lsn::Lsn;
