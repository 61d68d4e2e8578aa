//! The CopyBoth sub-protocol of streaming replication.
//!
//! Server → client: XLogData (`w`) and primary keepalive (`k`).
//! Client → server: standby status update (`r`).
//!
//! **Invariants**
//! - `XLogData::data` is a zero-copy slice of the CopyData body, and
//!   [`ReplicationRef`] decodes the same layout from a borrowed body (the
//!   owned form is built from it, so the two cannot disagree).
//! - An encoded status update always has `write >= flush >= apply`: the
//!   positions are clamped on encode, and checked with `debug_assert!`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Cursor, DecodeError};
use crate::lsn::Lsn;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts Unix microseconds to PostgreSQL-epoch microseconds.
pub fn unix_to_pg_micros(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Converts PostgreSQL-epoch microseconds to Unix microseconds.
pub fn pg_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// A WAL data message: one pgoutput message and where it sits in the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// The WAL position the server attaches to this message. For logical
    /// replication it is the position of the change being sent (a Commit
    /// carries its `end_lsn`, a Relation `0/0`); it is not the end of WAL.
    pub wal_start: Lsn,
    /// For logical replication, the same value as `wal_start` (PostgreSQL's
    /// walsender writes it twice); physical replication sends the end of WAL.
    pub wal_end: Lsn,
    /// Server clock at send time, PostgreSQL-epoch microseconds.
    pub server_clock: i64,
    /// The pgoutput message, zero-copy.
    pub data: Bytes,
}

/// A primary keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// The server's current end of WAL.
    pub wal_end: Lsn,
    /// Server clock at send time, PostgreSQL-epoch microseconds.
    pub server_clock: i64,
    /// The server asks for a status update now, or it will time us out.
    pub reply_requested: bool,
}

/// A CopyData body received in CopyBoth mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`
    XLogData(XLogData),
    /// `k`
    Keepalive(Keepalive),
}

impl ReplicationMessage {
    /// Decodes a CopyData body. `XLogData::data` is the body's own handle,
    /// advanced past the header: no reference count is touched.
    pub fn parse(mut body: Bytes) -> Result<Self, DecodeError> {
        let msg = match ReplicationRef::parse(&body)? {
            ReplicationRef::Keepalive(k) => return Ok(ReplicationMessage::Keepalive(k)),
            ReplicationRef::XLogData(x) => (x.wal_start, x.wal_end, x.server_clock),
        };
        body.advance(XLogRef::HEADER_LEN);
        let (wal_start, wal_end, server_clock) = msg;
        Ok(ReplicationMessage::XLogData(XLogData {
            wal_start,
            wal_end,
            server_clock,
            data: body,
        }))
    }
}

/// [`XLogData`] borrowed from its CopyData body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogRef<'a> {
    /// See [`XLogData::wal_start`].
    pub wal_start: Lsn,
    /// See [`XLogData::wal_end`].
    pub wal_end: Lsn,
    /// Server clock at send time, PostgreSQL-epoch microseconds.
    pub server_clock: i64,
    /// The pgoutput message: the rest of the body.
    pub data: &'a [u8],
}

impl XLogRef<'_> {
    /// Bytes before `data`: the tag and three 8-byte fields.
    pub const HEADER_LEN: usize = 1 + 8 * 3;
}

/// [`ReplicationMessage`] borrowed from its CopyData body: decoding it
/// makes no `Bytes` handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationRef<'a> {
    /// `w`
    XLogData(XLogRef<'a>),
    /// `k`
    Keepalive(Keepalive),
}

impl<'a> ReplicationRef<'a> {
    /// Decodes a CopyData body.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(body);
        match r.u8("replication message tag")? {
            b'w' => Ok(ReplicationRef::XLogData(XLogRef {
                wal_start: Lsn(r.u64("XLogData wal_start")?),
                wal_end: Lsn(r.u64("XLogData wal_end")?),
                server_clock: r.i64("XLogData clock")?,
                data: r.rest(),
            })),
            b'k' => {
                let wal_end = Lsn(r.u64("keepalive wal_end")?);
                let server_clock = r.i64("keepalive clock")?;
                let reply = r.u8("keepalive reply flag")?;
                if reply > 1 {
                    return Err(DecodeError::InvalidValue {
                        what: "keepalive reply flag",
                        value: i64::from(reply),
                    });
                }
                r.finish("keepalive")?;
                Ok(ReplicationRef::Keepalive(Keepalive {
                    wal_end,
                    server_clock,
                    reply_requested: reply == 1,
                }))
            }
            tag => Err(DecodeError::UnknownTag {
                context: "replication",
                tag,
            }),
        }
    }
}

/// A standby status update: tells the server how far we have durably got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 received.
    pub write: Lsn,
    /// Last WAL byte + 1 durably handled; the slot's `confirmed_flush_lsn`.
    pub flush: Lsn,
    /// Last WAL byte + 1 applied.
    pub apply: Lsn,
    /// Client clock, PostgreSQL-epoch microseconds.
    pub client_clock: i64,
    /// Ask the server to reply with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Length of an encoded update, CopyData header included.
    pub const FRAME_LEN: usize = 1 + 4 + 1 + 8 * 4 + 1;

    /// Appends the update as a whole CopyData frame.
    pub fn encode(&self, out: &mut BytesMut) {
        let flush = self.flush.min(self.write);
        let apply = self.apply.min(flush);
        debug_assert!(
            self.write >= self.flush,
            "write {} < flush {}",
            self.write,
            self.flush
        );
        out.reserve(Self::FRAME_LEN);
        out.put_u8(b'd');
        out.put_i32(4 + 1 + 8 * 4 + 1);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(flush.0);
        out.put_u64(apply.0);
        out.put_i64(self.client_clock);
        out.put_u8(u8::from(self.reply_requested));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x10u64.to_be_bytes());
        w.extend_from_slice(&0x20u64.to_be_bytes());
        w.extend_from_slice(&7i64.to_be_bytes());
        w.extend_from_slice(b"Bxyz");
        match ReplicationMessage::parse(Bytes::from(w)).unwrap() {
            ReplicationMessage::XLogData(x) => {
                assert_eq!(
                    (x.wal_start, x.wal_end, x.server_clock),
                    (Lsn(0x10), Lsn(0x20), 7)
                );
                assert_eq!(&x.data[..], b"Bxyz");
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x30u64.to_be_bytes());
        k.extend_from_slice(&9i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            ReplicationMessage::parse(Bytes::from(k)).unwrap(),
            ReplicationMessage::Keepalive(Keepalive {
                wal_end: Lsn(0x30),
                server_clock: 9,
                reply_requested: true
            })
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"w\x00",
            b"k\x00\x00\x00\x00\x00\x00\x00\x00",
            b"z",
            b"k\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x02",
        ] {
            assert!(
                ReplicationMessage::parse(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn encodes_status_update() {
        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            write: Lsn(3),
            flush: Lsn(2),
            apply: Lsn(1),
            client_clock: 5,
            reply_requested: false,
        }
        .encode(&mut out);
        assert_eq!(out.len(), StandbyStatusUpdate::FRAME_LEN);
        assert_eq!(&out[..6], b"d\x00\x00\x00\x26r");
        assert_eq!(&out[6..14], &3u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
        assert_eq!(&out[22..30], &1u64.to_be_bytes());
        assert_eq!(&out[30..38], &5i64.to_be_bytes());
        assert_eq!(out[38], 0);
    }

    #[test]
    fn clock_conversion_round_trips() {
        assert_eq!(unix_to_pg_micros(PG_EPOCH_OFFSET_MICROS), 0);
        assert_eq!(
            pg_to_unix_micros(unix_to_pg_micros(1_700_000_000_000_000)),
            1_700_000_000_000_000
        );
    }
}
