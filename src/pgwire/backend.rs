//! Backend (server → client) message framing.
//!
//! The hot path is CopyData (`d`): its body is cut out of the read buffer as
//! a zero-copy `Bytes` slice. Error and notice responses are decoded here so
//! their SQLSTATE reaches the user; the handful of other messages seen during
//! startup and simple queries are handed to `postgres-protocol`.
//!
//! **Invariants**
//! - `parse` consumes nothing while it returns `Ok(None)`; it consumes the
//!   frame when it returns a message, or a `DecodeError` for a malformed body
//!   (after which the connection cannot be trusted and is dropped).
//! - A frame longer than `max_frame` is rejected before any allocation.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;

use super::{DecodeError, Reader};

/// The largest backend message PostgreSQL sends (1 GiB plus headers).
pub const DEFAULT_MAX_FRAME: usize = (1 << 30) + 4096;

/// One backend message.
pub enum Backend {
    /// A CopyData body (inside CopyBoth: XLogData or keepalive).
    CopyData(Bytes),
    /// The server entered CopyBoth mode (START_REPLICATION accepted).
    CopyBothResponse,
    /// The server entered CopyOut mode.
    CopyOutResponse,
    /// The server ended the copy stream.
    CopyDone,
    /// An error; the server will close or abort the command.
    ErrorResponse(ServerError),
    /// A notice, warning or informational message.
    NoticeResponse(ServerError),
    /// Any other message, decoded by `postgres-protocol`.
    Other(Message),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::CopyData(b) => write!(f, "CopyData({} bytes)", b.len()),
            Backend::CopyBothResponse => f.write_str("CopyBothResponse"),
            Backend::CopyOutResponse => f.write_str("CopyOutResponse"),
            Backend::CopyDone => f.write_str("CopyDone"),
            Backend::ErrorResponse(e) => write!(f, "ErrorResponse({e})"),
            Backend::NoticeResponse(e) => write!(f, "NoticeResponse({e})"),
            Backend::Other(_) => f.write_str("Other(..)"),
        }
    }
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `WARNING`, … (non-localized when available).
    pub severity: String,
    /// The SQLSTATE code, e.g. `55006`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl ServerError {
    /// Decodes the body of an ErrorResponse or NoticeResponse.
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let mut e = ServerError::default();
        let mut localized_severity = None;
        loop {
            let field = r.u8("error field type")?;
            if field == 0 {
                break;
            }
            let value = String::from_utf8_lossy(&r.cstr_bytes("error field")?).into_owned();
            match field {
                b'V' => e.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity.unwrap_or_else(|| "ERROR".to_owned());
        }
        Ok(e)
    }
}

/// Cuts one backend message off the front of `buf`.
///
/// Returns `Ok(None)` (consuming nothing) until a whole message is buffered.
pub fn parse(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Backend>, DecodeError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let body_len = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_sub(4))
        .filter(|l| *l <= max_frame)
        .ok_or(DecodeError::InvalidLength {
            what: "backend message",
            len: i64::from(len),
        })?;
    let total = 5 + body_len;
    if buf.len() < total {
        // The caller reads more; nothing is allocated on the header's word.
        return Ok(None);
    }
    let msg = match tag {
        b'd' => {
            let mut frame = buf.split_to(total);
            frame.advance(5);
            Backend::CopyData(frame.freeze())
        }
        b'W' => {
            buf.advance(total);
            Backend::CopyBothResponse
        }
        b'H' => {
            buf.advance(total);
            Backend::CopyOutResponse
        }
        b'c' => {
            buf.advance(total);
            Backend::CopyDone
        }
        b'E' | b'N' => {
            let mut frame = buf.split_to(total);
            frame.advance(5);
            let e = ServerError::decode(frame.freeze())?;
            if tag == b'E' {
                Backend::ErrorResponse(e)
            } else {
                Backend::NoticeResponse(e)
            }
        }
        b'R' | b'S' | b'K' | b'Z' | b'T' | b'D' | b'C' | b'I' | b'1' | b'2' | b'3' | b'n'
        | b't' | b's' | b'v' | b'A' => {
            let mut frame = buf.split_to(total);
            match Message::parse(&mut frame) {
                Ok(Some(m)) => Backend::Other(m),
                _ => {
                    return Err(DecodeError::InvalidValue {
                        what: "backend message body",
                        value: i64::from(tag),
                    })
                }
            }
        }
        _ => {
            return Err(DecodeError::UnknownTag {
                context: "backend",
                tag,
            })
        }
    };
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn cuts_copy_data_zero_copy_and_waits_for_more() {
        let bytes = frame(b'd', b"hello");
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(parse(&mut buf, DEFAULT_MAX_FRAME).unwrap().is_none());
        assert_eq!(buf.len(), bytes.len() - 1, "nothing consumed while waiting");
        buf.extend_from_slice(&bytes[bytes.len() - 1..]);
        buf.extend_from_slice(&frame(b'c', b""));
        match parse(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            Some(Backend::CopyData(b)) => assert_eq!(&b[..], b"hello"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse(&mut buf, DEFAULT_MAX_FRAME).unwrap(),
            Some(Backend::CopyDone)
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn decodes_error_response_fields() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 42\0\0";
        let mut buf = BytesMut::from(&frame(b'E', body)[..]);
        match parse(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            Some(Backend::ErrorResponse(e)) => {
                assert_eq!(e.code, "55006");
                assert_eq!(e.severity, "ERROR");
                assert!(e.to_string().contains("active for PID 42"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_lengths_and_tags() {
        let mut buf = BytesMut::from(&b"d\x00\x00\x00\x03"[..]);
        assert!(parse(&mut buf, DEFAULT_MAX_FRAME).is_err());
        let mut buf = BytesMut::from(&b"d\xff\xff\xff\xff"[..]);
        assert!(parse(&mut buf, DEFAULT_MAX_FRAME).is_err());
        let mut buf = BytesMut::from(&b"d\x00\x01\x00\x00"[..]);
        assert!(parse(&mut buf, 1000).is_err(), "over max_frame");
        let mut buf = BytesMut::from(&frame(b'?', b"")[..]);
        assert!(matches!(
            parse(&mut buf, DEFAULT_MAX_FRAME),
            Err(DecodeError::UnknownTag { tag: b'?', .. })
        ));
        let mut buf = BytesMut::from(&frame(b'E', b"Mno terminator")[..]);
        assert!(parse(&mut buf, DEFAULT_MAX_FRAME).is_err());
    }
}
