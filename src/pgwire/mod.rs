//! Sans-io PostgreSQL replication protocol.
//!
//! Owns everything between raw bytes and typed messages: the startup and
//! authentication exchange (through `postgres-protocol`), backend message
//! framing, the CopyBoth sub-protocol (XLogData, primary keepalive, standby
//! status update) and pgoutput decoding.
//!
//! ```text
//!  socket bytes ──► backend::parse_run ──► CopyRun (whole CopyData frames, one Bytes)
//!                                            └─ body (&[u8]) ──► replication::ReplicationRef
//!                                                  └─ XLogRef.data ──► pgoutput::PgOutputRef
//!                                                        (Begin / Commit / Message, in place)
//!  owned forms, one Bytes per message: backend::parse ──► CopyData(Bytes)
//!      ──► ReplicationMessage ──► PgOutput (every message type)
//! ```
//!
//! **Invariants**
//! - Nothing here touches sockets, clocks or metrics: callers pass bytes and
//!   times in, and get messages and bytes out.
//! - No input makes a decoder panic. Every length is checked before it is
//!   used; a malformed frame is a [`DecodeError`].
//! - Decoded bodies are zero-copy: borrowed slices of a run in the `…Ref`
//!   forms, `Bytes` slices of the frame in the owned forms. Each owned
//!   decoder is built on its borrowed counterpart where one exists, so the
//!   two cannot disagree.

pub mod backend;
pub mod pgoutput;
pub mod reader;
pub mod replication;
pub mod startup;

pub use reader::{Cursor, Reader};

/// A frame or message from the server that could not be decoded.
///
/// Always *definite*: the same bytes will never decode, so retrying the read
/// is pointless; the connection must be dropped (or, for a single bad fact,
/// the fact sent to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field was complete.
    #[error("truncated {what}: needed {need} more bytes, had {have}")]
    Truncated {
        /// The field or message being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length field was negative or larger than the input allows.
    #[error("invalid length {len} for {what}")]
    InvalidLength {
        /// The field or message whose length is wrong.
        what: &'static str,
        /// The length as read from the wire.
        len: i64,
    },
    /// A message tag that this decoder does not know.
    #[error("unknown {context} message tag {tag:#04x} ({})", printable(*tag))]
    UnknownTag {
        /// Which protocol layer saw the tag.
        context: &'static str,
        /// The tag byte.
        tag: u8,
    },
    /// A string field without its NUL terminator, or not UTF-8.
    #[error("invalid string in {what}: {reason}")]
    InvalidString {
        /// The field being read.
        what: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A field had a value outside its allowed set.
    #[error("invalid value {value} for {what}")]
    InvalidValue {
        /// The field being read.
        what: &'static str,
        /// The offending value.
        value: i64,
    },
    /// Bytes were left over after a message that should have ended.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// The message that should have ended.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        "non-printable".to_owned()
    }
}
