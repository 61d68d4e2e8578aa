//! Bounds-checked cursors over a message body: [`Cursor`] borrows a byte
//! slice and hands out sub-slices; [`Reader`] owns a `Bytes` and hands out
//! zero-copy `Bytes` slices of it.
//!
//! **Invariants**
//! - Every read checks the remaining length first and returns
//!   [`DecodeError::Truncated`] instead of panicking; a failed read consumes
//!   nothing.
//! - All bounds checks live in [`Cursor`]; [`Reader`] only turns its
//!   borrowed slices into `Bytes` handles of the same memory.

use bytes::{Buf, Bytes};

use super::DecodeError;

/// Reads big-endian fields from a borrowed message body without ever
/// panicking. Slices it hands out borrow the body, so reading makes no
/// `Bytes` handle (no reference count is touched).
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Wraps a message body.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes, consumed.
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(DecodeError::Truncated {
                what,
                need: n,
                have: self.buf.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let head = self.take(what, N)?;
        let mut a = [0; N];
        a.copy_from_slice(head);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    /// A big-endian `i16`.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    /// A big-endian `i32`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// A big-endian `i64`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// `n` bytes.
    pub fn bytes(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        self.take(what, n)
    }

    /// A length-prefixed (`Int32`) byte string. A negative length is an
    /// error unless `allow_null`, when `-1` gives `None`. Consumes nothing
    /// on error.
    pub fn len_prefixed(
        &mut self,
        what: &'static str,
        allow_null: bool,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        let mut c = *self;
        let len = c.i32(what)?;
        if len < 0 {
            if allow_null && len == -1 {
                *self = c;
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
        let s = c.take(what, n)?;
        *self = c;
        Ok(Some(s))
    }

    /// A NUL-terminated string, without the NUL.
    pub fn cstr_bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::InvalidString {
                what,
                reason: "missing NUL terminator",
            })?;
        let (s, tail) = self.buf.split_at(end);
        self.buf = tail.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let mut c = *self;
        let s =
            std::str::from_utf8(c.cstr_bytes(what)?).map_err(|_| DecodeError::InvalidString {
                what,
                reason: "not UTF-8",
            })?;
        *self = c;
        Ok(s.to_owned())
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
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

/// Reads big-endian fields from an owned message body without ever
/// panicking; slices it hands out are `Bytes` handles of the body.
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

    /// Runs one read on a [`Cursor`] over what is left, then consumes what
    /// the cursor consumed.
    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Cursor<'_>) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        let mut c = Cursor::new(&self.buf);
        let v = f(&mut c)?;
        let used = self.buf.len() - c.remaining();
        self.buf.advance(used);
        Ok(v)
    }

    /// A handle for `sub`, which a cursor over `self.buf` just returned,
    /// followed by consuming through its end plus `skip` bytes. When it
    /// reaches the end, the buffer's own handle is handed over instead of a
    /// new one, which saves a reference-count increment and decrement.
    fn cut(&mut self, start: usize, len: usize, skip: usize) -> Bytes {
        if start + len == self.buf.len() {
            let mut b = std::mem::take(&mut self.buf);
            b.advance(start);
            return b;
        }
        let s = self.buf.slice(start..start + len);
        self.buf.advance(start + len + skip);
        s
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.read(|c| c.u8(what))
    }

    /// A big-endian `i16`.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.read(|c| c.i16(what))
    }

    /// A big-endian `i32`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.read(|c| c.i32(what))
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.read(|c| c.u32(what))
    }

    /// A big-endian `i64`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.read(|c| c.i64(what))
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.read(|c| c.u64(what))
    }

    /// Where `sub` (borrowed from a cursor over `self.buf`) starts.
    fn offset(&self, sub: &[u8]) -> usize {
        (sub.as_ptr() as usize).wrapping_sub(self.buf.as_ptr() as usize)
    }

    /// `n` bytes as a zero-copy slice. When they are everything left (a
    /// Message's content is), the buffer's own handle is handed over.
    pub fn bytes(&mut self, what: &'static str, n: usize) -> Result<Bytes, DecodeError> {
        Cursor::new(&self.buf).bytes(what, n)?;
        Ok(self.cut(0, n, 0))
    }

    /// A length-prefixed (`Int32`) byte string as a zero-copy slice. A
    /// negative length is an error unless `allow_null`, when it gives `None`.
    pub fn len_prefixed(
        &mut self,
        what: &'static str,
        allow_null: bool,
    ) -> Result<Option<Bytes>, DecodeError> {
        let mut c = Cursor::new(&self.buf);
        match c.len_prefixed(what, allow_null)? {
            Some(s) => {
                let (start, len) = (self.offset(s), s.len());
                Ok(Some(self.cut(start, len, 0)))
            }
            None => {
                self.buf.advance(4);
                Ok(None)
            }
        }
    }

    /// A NUL-terminated string as a zero-copy slice, without the NUL.
    pub fn cstr_bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = Cursor::new(&self.buf).cstr_bytes(what)?.len();
        Ok(self.cut(0, len, 1))
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        self.read(|c| c.cstr(what))
    }

    /// Everything left, as a zero-copy slice.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Fails if anything is left.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        Cursor::new(&self.buf).finish(what)
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
    fn cursor_reads_borrowed_fields_and_consumes_nothing_on_error() {
        let input = b"\x00\x00\x00\x02hi\x00abc\x00\xff\xfe\x00\x00\x00\x05ab";
        let mut c = Cursor::new(input);
        let hi = c.len_prefixed("x", false).unwrap().unwrap();
        assert_eq!(hi, b"hi");
        assert_eq!(hi.as_ptr(), input[4..].as_ptr(), "borrowed, not copied");
        assert_eq!(c.u8("nul").unwrap(), 0);
        assert_eq!(c.cstr_bytes("s").unwrap(), b"abc");
        let left = c.remaining();
        assert!(matches!(
            c.cstr("bad"),
            Err(DecodeError::InvalidString { .. })
        ));
        assert_eq!(c.remaining(), left, "a failed string read consumes nothing");
        assert_eq!(c.i16("n").unwrap(), -2);
        assert!(matches!(
            c.len_prefixed("short", false),
            Err(DecodeError::Truncated {
                need: 5,
                have: 2,
                ..
            })
        ));
        assert_eq!(c.remaining(), 6, "a failed counted read consumes nothing");
        assert!(c.finish("msg").is_err());
        assert_eq!(c.rest(), b"\x00\x00\x00\x05ab");
        assert!(c.finish("msg").is_ok());
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
