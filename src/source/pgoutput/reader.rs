//! A bounds-checked big-endian cursor over one message. Every read names the field it
//! reads, so that a short or malformed message produces a precise [`DecodeError`].

use bytes::Bytes;

use super::DecodeError;
use crate::model::Lsn;

pub(super) struct Reader {
    buf: Bytes,
    /// Invariant: `pos <= buf.len()`.
    pos: usize,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Consumes the next `n` bytes.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        let remaining = self.remaining();
        let taken = self
            .buf
            .get(self.pos..)
            .and_then(|rest| rest.get(..n))
            .ok_or(DecodeError::Truncated {
                what,
                needed: n,
                remaining,
            })?;
        self.pos += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// The message tag; an empty message is its own error.
    pub(super) fn tag(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Empty);
        }
        self.u8("message tag")
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A byte that must be 0 or 1.
    pub(super) fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                what,
                value: other.into(),
            }),
        }
    }

    pub(super) fn expect(
        &mut self,
        byte: u8,
        what: &'static str,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        match self.u8(what)? {
            found if found == byte => Ok(()),
            found => Err(DecodeError::UnexpectedByte {
                what,
                expected,
                found,
            }),
        }
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// An Int16 count; negative is invalid.
    pub(super) fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let v = i16::from_be_bytes(self.array(what)?);
        usize::try_from(v).map_err(|_| DecodeError::InvalidValue {
            what,
            value: v.into(),
        })
    }

    /// An Int32 count or length; negative is invalid.
    pub(super) fn count32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let v = self.i32(what)?;
        usize::try_from(v).map_err(|_| DecodeError::InvalidValue {
            what,
            value: v.into(),
        })
    }

    /// `n` bytes as a zero-copy slice of the message.
    pub(super) fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..self.pos))
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { what })?;
        let s = rest
            .get(..len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or(DecodeError::InvalidUtf8 { what })?
            .to_owned();
        self.pos += len + 1;
        Ok(s)
    }

    /// Succeeds only if the whole message was consumed.
    pub(super) fn finish(self, tag: u8) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { tag, count }),
        }
    }
}
