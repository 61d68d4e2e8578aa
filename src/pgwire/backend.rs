//! Backend (server → client) message framing.
//!
//! The hot path is CopyData (`d`): [`parse_run`] cuts every whole CopyData
//! message at the front of the read buffer as one zero-copy [`CopyRun`],
//! whose bodies the caller decodes in place; [`parse`] cuts one message.
//! Error and notice responses become a [`ServerError`] here, so their
//! SQLSTATE reaches the user; their fields, and the handful of other
//! messages seen during startup and simple queries, are read by
//! `postgres-protocol`.
//!
//! **Invariants**
//! - `parse` consumes nothing while it returns `Ok(None)`; it consumes the
//!   frame when it returns a message, or a `DecodeError` for a malformed body
//!   (after which the connection cannot be trusted and is dropped).
//! - A frame longer than `max_frame` is rejected before any allocation.
//! - A [`CopyRun`] holds only whole CopyData frames whose headers were
//!   checked, so walking it cannot fail; [`parse_run`] never returns
//!   `Backend::CopyData`.
//! - No input panics, whatever `postgres-protocol` makes of it: its errors
//!   become a [`DecodeError`], and error field values that are not UTF-8
//!   are converted lossily (U+FFFD) rather than rejected.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{Message, ERROR_RESPONSE_TAG};

use super::DecodeError;

/// The largest backend message PostgreSQL sends (1 GiB plus headers).
pub const DEFAULT_MAX_FRAME: usize = (1 << 30) + 4096;

/// One backend message.
pub enum Backend {
    /// A CopyData body (inside CopyBoth: XLogData or keepalive).
    CopyData(Bytes),
    /// Consecutive whole CopyData messages, cut at once by [`parse_run`].
    CopyRun(CopyRun),
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
            Backend::CopyRun(r) => write!(f, "CopyRun({} bytes)", r.buf.len()),
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
    /// Decodes the body (the frame minus its 5-byte header) of an
    /// ErrorResponse or NoticeResponse; the two share one layout.
    ///
    /// The fields are read by `postgres-protocol`, which wants a whole
    /// frame: the body is copied behind an ErrorResponse header first (an
    /// error path, so the copy does not matter). Unknown field types are
    /// skipped. Values are decoded lossily: a value in a non-UTF-8 server
    /// encoding keeps its ASCII and gets U+FFFD for the rest, so the
    /// SQLSTATE still reaches the user.
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let len = body
            .len()
            .checked_add(4)
            .and_then(|l| i32::try_from(l).ok())
            .ok_or(DecodeError::InvalidLength {
                what: "error response",
                len: i64::try_from(body.len()).unwrap_or(i64::MAX),
            })?;
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        frame.put_u8(ERROR_RESPONSE_TAG);
        frame.put_i32(len);
        frame.extend_from_slice(&body);
        let Ok(Some(Message::ErrorResponse(msg))) = Message::parse(&mut frame) else {
            // Not reached: a whole frame with a valid header always parses
            // as an ErrorResponse (postgres-protocol reads its fields
            // lazily). Reported rather than assumed.
            return Err(DecodeError::InvalidValue {
                what: "error response",
                value: i64::from(ERROR_RESPONSE_TAG),
            });
        };
        let mut e = ServerError::default();
        let mut localized_severity = None;
        // Where the next field starts in `body`: for classifying an error.
        let mut at = 0;
        let mut fields = msg.fields();
        loop {
            let field = match fields.next() {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(_) => return Err(field_error(body.get(at..).unwrap_or_default())),
            };
            // Type byte, value, NUL.
            at += field.value_bytes().len() + 2;
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
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

/// Why `postgres-protocol` refused the error fields, from the bytes left at
/// the field it stopped at: it gives only an `io::Error` without position.
fn field_error(rest: &[u8]) -> DecodeError {
    match rest {
        [] => DecodeError::Truncated {
            what: "error field type",
            need: 1,
            have: 0,
        },
        [0, extra @ ..] => DecodeError::TrailingBytes {
            what: "error response",
            extra: extra.len(),
        },
        _ => DecodeError::InvalidString {
            what: "error field",
            reason: "missing NUL terminator",
        },
    }
}

/// The tag and whole length (header included) of the message at the front
/// of `buf`, or `None` until its header is buffered.
fn header(buf: &[u8], max_frame: usize) -> Result<Option<(u8, usize)>, DecodeError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    let body_len = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_sub(4))
        .filter(|l| *l <= max_frame)
        .ok_or(DecodeError::InvalidLength {
            what: "backend message",
            len: i64::from(len),
        })?;
    Ok(Some((tag, 5 + body_len)))
}

/// Like [`parse`], but when whole CopyData messages lead `buf`, cuts all of
/// them at once as one [`Backend::CopyRun`]: one `Bytes` handle for the
/// lot, not one per message. A run stops before the first message that is
/// not CopyData, not whole, or malformed; the next call returns that one
/// (or its error), as [`parse`] does.
pub fn parse_run(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Backend>, DecodeError> {
    let mut at = 0;
    while let Some(rest) = buf.get(at..) {
        match header(rest, max_frame) {
            Ok(Some((b'd', total))) if total <= rest.len() => at += total,
            _ => break,
        }
    }
    if at == 0 {
        return parse(buf, max_frame);
    }
    Ok(Some(Backend::CopyRun(CopyRun {
        buf: buf.split_to(at).freeze(),
        at: 0,
    })))
}

/// Whole CopyData messages, still framed, cut from the read buffer as one
/// `Bytes`. Only [`parse_run`] builds one, after checking every header, so
/// walking it cannot fail.
#[derive(Clone, Default)]
pub struct CopyRun {
    buf: Bytes,
    at: usize,
}

impl CopyRun {
    /// The next message's body as a range of [`Self::bytes`], consumed;
    /// `None` after the last.
    pub fn next_body(&mut self) -> Option<std::ops::Range<usize>> {
        let (body, next) = frame_at(&self.buf, self.at)?;
        self.at = next;
        Some(body)
    }

    /// The run's framed bytes; bodies index into them.
    pub fn bytes(&self) -> &Bytes {
        &self.buf
    }

    /// The bodies `next_body` has not returned yet, without consuming them.
    pub fn bodies(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut at = self.at;
        std::iter::from_fn(move || {
            let (body, next) = frame_at(&self.buf, at)?;
            at = next;
            self.buf.get(body)
        })
    }
}

/// The body range of the frame at `at` and where the next frame starts.
fn frame_at(buf: &[u8], at: usize) -> Option<(std::ops::Range<usize>, usize)> {
    let &[_, a, b, c, d] = buf.get(at..at.checked_add(5)?)? else {
        return None;
    };
    let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).ok()?;
    let end = at.checked_add(1)?.checked_add(len)?;
    (end <= buf.len() && len >= 4).then_some((at + 5..end, end))
}

/// Cuts one backend message off the front of `buf`.
///
/// Returns `Ok(None)` (consuming nothing) until a whole message is buffered.
pub fn parse(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Backend>, DecodeError> {
    let Some((tag, total)) = header(buf, max_frame)? else {
        return Ok(None);
    };
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
    fn cuts_whole_copy_data_as_one_run() {
        let mut bytes = frame(b'd', b"one");
        bytes.extend_from_slice(&frame(b'd', b""));
        bytes.extend_from_slice(&frame(b'd', b"three"));
        bytes.extend_from_slice(&frame(b'c', b""));
        bytes.extend_from_slice(&frame(b'd', b"four"));
        bytes.extend_from_slice(&frame(b'd', b"fiv"));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        let Some(Backend::CopyRun(mut run)) = parse_run(&mut buf, DEFAULT_MAX_FRAME).unwrap()
        else {
            panic!("a run")
        };
        let whole = run.bytes().clone();
        let mut bodies = Vec::new();
        while let Some(r) = run.next_body() {
            bodies.push(whole[r].to_vec());
        }
        assert_eq!(bodies, [&b"one"[..], b"", b"three"]);
        assert!(matches!(
            parse_run(&mut buf, DEFAULT_MAX_FRAME).unwrap(),
            Some(Backend::CopyDone)
        ));
        let Some(Backend::CopyRun(run)) = parse_run(&mut buf, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("a run")
        };
        assert_eq!(run.bodies().collect::<Vec<_>>(), [b"four"]);
        assert!(parse_run(&mut buf, DEFAULT_MAX_FRAME).unwrap().is_none());
        assert_eq!(buf.len(), 7, "the partial frame waits for more");
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

    #[test]
    fn rejects_malformed_error_and_notice_bodies() {
        let whole: &[u8] = b"SERROR\0VERROR\0C55006\0Mslot is active\0\0";
        // Every strict prefix of a valid body is malformed, in both messages.
        for tag in [b'E', b'N'] {
            for cut in 0..whole.len() {
                let mut buf = BytesMut::from(&frame(tag, &whole[..cut])[..]);
                let got = parse(&mut buf, DEFAULT_MAX_FRAME);
                assert!(
                    got.is_err(),
                    "{} with {cut} body bytes: {got:?}",
                    tag as char
                );
                assert!(buf.is_empty(), "a malformed frame is consumed");
            }
        }
        let cases: [(&[u8], DecodeError); 4] = [
            (
                b"",
                DecodeError::Truncated {
                    what: "error field type",
                    need: 1,
                    have: 0,
                },
            ),
            (
                b"C55006\0",
                DecodeError::Truncated {
                    what: "error field type",
                    need: 1,
                    have: 0,
                },
            ),
            (
                b"C55006\0Mno terminator",
                DecodeError::InvalidString {
                    what: "error field",
                    reason: "missing NUL terminator",
                },
            ),
            (
                b"C55006\0\0xyz",
                DecodeError::TrailingBytes {
                    what: "error response",
                    extra: 3,
                },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(ServerError::decode(Bytes::copy_from_slice(body)), Err(want));
        }
    }

    #[test]
    fn decodes_notice_and_non_utf8_fields_lossily() {
        // A LATIN1 server: "café" with 0xE9, and a localized severity only.
        let body = b"SAVIS\0C01000\0Mcaf\xe9 ferm\xe9\0Dd\0Hh\0Xunknown\0\0";
        let mut buf = BytesMut::from(&frame(b'N', body)[..]);
        match parse(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            Some(Backend::NoticeResponse(e)) => assert_eq!(
                e,
                ServerError {
                    severity: "AVIS".to_owned(),
                    code: "01000".to_owned(),
                    message: "caf\u{fffd} ferm\u{fffd}".to_owned(),
                    detail: Some("d".to_owned()),
                    hint: Some("h".to_owned()),
                }
            ),
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
        // No severity at all: ERROR.
        let e = ServerError::decode(Bytes::from_static(b"C0A000\0\0")).unwrap();
        assert_eq!(e.to_string(), "ERROR  (SQLSTATE 0A000)");
    }
}
