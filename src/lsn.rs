//! The `Lsn` newtype: a position in PostgreSQL's write-ahead log.
//!
//! Owns parsing and displaying the `X/Y` form and the arithmetic the relay
//! needs. Does no I/O.
//!
//! **Invariants**
//! - An `Lsn` is a plain `u64` byte position; `Lsn::INVALID` (`0/0`) means
//!   "no position" (the server treats it as "start at the slot").
//! - Arithmetic is checked: nothing here wraps silently.

use std::fmt;
use std::str::FromStr;

/// A WAL position (byte offset into the log), displayed as `X/Y` in hex.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: no position.
    pub const INVALID: Lsn = Lsn(0);

    /// True for `0/0`.
    pub fn is_invalid(self) -> bool {
        self.0 == 0
    }

    /// `self - other`, or `None` if `other` is ahead of `self`.
    pub fn checked_sub(self, other: Lsn) -> Option<u64> {
        self.0.checked_sub(other.0)
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }
}

/// The `X/Y` text of an [`Lsn`], formatted on the stack (no allocation).
#[derive(Clone, Copy)]
pub struct LsnText {
    buf: [u8; 17],
    len: u8,
}

impl LsnText {
    /// The text as bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or_default()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl LsnText {
    fn push(&mut self, c: u8) {
        if let Some(slot) = self.buf.get_mut(usize::from(self.len)) {
            *slot = c;
            self.len += 1;
        }
    }

    /// Appends `half` in upper-case hex without leading zeros.
    fn push_hex(&mut self, half: u32) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let digits = (8 - half.leading_zeros() / 4).max(1);
        for i in (0..digits).rev() {
            let nibble = (half >> (i * 4)) & 0xF;
            self.push(HEX.get(nibble as usize).copied().unwrap_or(b'0'));
        }
    }
}

impl Lsn {
    /// The `X/Y` form (same as `Display`) without allocating.
    pub fn text(self) -> LsnText {
        let mut out = LsnText {
            buf: [0; 17],
            len: 0,
        };
        out.push_hex((self.0 >> 32) as u32);
        out.push(b'/');
        out.push_hex((self.0 & 0xFFFF_FFFF) as u32);
        out
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.text().as_str())
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

/// The text was not an `X/Y` hexadecimal LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected the form X/Y in hexadecimal, e.g. 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_postgres_forms() {
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("0/1a".parse::<Lsn>().unwrap(), Lsn(0x1a));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "x/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(Lsn(10).checked_sub(Lsn(4)), Some(6));
        assert_eq!(Lsn(4).checked_sub(Lsn(10)), None);
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v: u64) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
        }

        #[test]
        fn text_is_postgres_form(v: u64) {
            let want = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
            let text = Lsn(v).text();
            prop_assert_eq!(text.as_str(), want.as_str());
        }

        #[test]
        fn order_matches_u64(a: u64, b: u64) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
        }
    }
}
