//! Factlib relays facts (events) that services write into PostgreSQL's WAL,
//! inside their own business transactions, to Kafka — without losing or
//! duplicating any.
//!
//! See `DESIGN.md` for the stages. Modules, one owner each:
//! - [`lsn`]: the `Lsn` newtype.
//! - [`pgwire`]: the sans-io replication protocol.
//! - [`source`]: the replication connection (io_uring or tokio).
//! - [`fact`]: the protobuf envelope.
//! - [`emit`]: the emitter API services use.
//! - [`config`]: the command line.
//! - [`cli`]: the subcommands.

pub mod cli;
pub mod config;
pub mod emit;
pub mod fact;
pub mod lsn;
pub mod pgwire;
pub mod source;

pub use lsn::Lsn;
