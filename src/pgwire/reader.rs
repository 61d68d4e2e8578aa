//! A bounds-checked cursor over a `Bytes` message body.
//!
//! **Invariants**
//! - Every read checks the remaining length first and returns
//!   [`DecodeError::Truncated`] instead of panicking.
//! - Slices handed out are zero-copy views of the original `Bytes`.

use bytes::{Buf, Bytes};

use super::DecodeError;

/// Reads big-endian fields from a message body without ever panicking.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    /// Wraps a message body.
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, what: &'static str, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                need: n,
                have: self.buf.len(),
            });
        }
        Ok(())
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(what, 1)?;
        Ok(self.buf.get_u8())
    }

    /// A big-endian `i16`.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(what, 2)?;
        Ok(self.buf.get_i16())
    }

    /// A big-endian `i32`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_i32())
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_u32())
    }

    /// A big-endian `i64`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_i64())
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_u64())
    }

    /// `n` bytes as a zero-copy slice. When they are everything left (a
    /// Message's content is), the buffer's own handle is handed over, which
    /// saves a reference-count increment and decrement.
    pub fn bytes(&mut self, what: &'static str, n: usize) -> Result<Bytes, DecodeError> {
        self.need(what, n)?;
        if n == self.buf.len() {
            return Ok(self.rest());
        }
        Ok(self.buf.split_to(n))
    }

    /// A length-prefixed (`Int32`) byte string as a zero-copy slice. A
    /// negative length is an error unless `allow_null`, when it gives `None`.
    pub fn len_prefixed(
        &mut self,
        what: &'static str,
        allow_null: bool,
    ) -> Result<Option<Bytes>, DecodeError> {
        let len = self.i32(what)?;
        if len < 0 {
            if allow_null && len == -1 {
                return Ok(None);
            }
            return Err(DecodeError::InvalidLength {
                what,
                len: i64::from(len),
            });
        }
        let n = usize::try_from(len).map_err(|_| DecodeError::InvalidLength {
            what,
            len: i64::from(len),
        })?;
        self.bytes(what, n).map(Some)
    }

    /// A NUL-terminated string as a zero-copy slice, without the NUL.
    pub fn cstr_bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::InvalidString {
                what,
                reason: "missing NUL terminator",
            })?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.cstr_bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidString {
            what,
            reason: "not UTF-8",
        })
    }

    /// Everything left, as a zero-copy slice.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Fails if anything is left.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_reports_truncation() {
        let mut r = Reader::new(Bytes::from_static(b"\x00\x00\x00\x02hi\x00abc\x00\x01"));
        assert_eq!(r.len_prefixed("x", false).unwrap().unwrap(), "hi");
        assert_eq!(r.u8("nul").unwrap(), 0);
        assert_eq!(r.cstr("s").unwrap(), "abc");
        assert!(matches!(r.i32("n"), Err(DecodeError::Truncated { .. })));
        assert_eq!(r.remaining(), 1, "a failed read consumes nothing");
        assert_eq!(r.u8("tail").unwrap(), 1);
        assert!(r.finish("msg").is_ok());
    }

    #[test]
    fn the_last_field_is_the_input_itself() {
        let input = Bytes::from(b"\x00\x00\x00\x03abc".to_vec());
        let mut r = Reader::new(input.clone());
        let last = r.len_prefixed("x", false).unwrap().unwrap();
        assert_eq!(last, "abc");
        assert_eq!(last.as_ptr(), input[4..].as_ptr(), "zero-copy");
        assert_eq!(r.remaining(), 0);
        assert!(r.finish("msg").is_ok());
        let mut r = Reader::new(input.clone());
        assert_eq!(r.bytes("x", 2).unwrap(), &b"\x00\x00"[..]);
        assert_eq!(r.remaining(), 5, "a shorter read leaves the rest");
    }

    #[test]
    fn rejects_bad_lengths_and_strings() {
        let mut r = Reader::new(Bytes::from_static(b"\xff\xff\xff\xfe"));
        assert!(matches!(
            r.len_prefixed("x", true),
            Err(DecodeError::InvalidLength { len: -2, .. })
        ));
        let mut r = Reader::new(Bytes::from_static(b"\xff\xff\xff\xff"));
        assert_eq!(r.len_prefixed("x", true).unwrap(), None);
        let mut r = Reader::new(Bytes::from_static(b"\x7f\xff\xff\xff"));
        assert!(matches!(
            r.len_prefixed("x", false),
            Err(DecodeError::Truncated { .. })
        ));
        let mut r = Reader::new(Bytes::from_static(b"abc"));
        assert!(matches!(
            r.cstr("s"),
            Err(DecodeError::InvalidString { .. })
        ));
        let mut r = Reader::new(Bytes::from_static(b"\xff\x00"));
        assert!(matches!(
            r.cstr("s"),
            Err(DecodeError::InvalidString { .. })
        ));
    }
}
