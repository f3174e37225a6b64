//! The byte codec section payloads are written in: little-endian fixed-width integers,
//! length-prefixed byte strings, nothing implicit. A state type implements [`Persist`]; its
//! `decode` reads exactly what its `encode` wrote and reports anything else as a
//! [`DecodeError`] naming the field, so a malformed payload is refused, never guessed at.

/// A payload that could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended inside a field.
    #[error("payload ends inside '{field}' (needs {need} more bytes, {left} left)")]
    Short {
        /// Which field was being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A field holds a value the state cannot take.
    #[error("field '{field}' has an invalid value: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes are left after the last field: the writer and reader disagree on the layout.
    #[error("{0} bytes left after the last field")]
    Trailing(usize),
}

/// Builds a payload.
#[derive(Debug, Default, Clone)]
pub struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// A boolean as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// Two bytes, little-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Four bytes, little-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Eight bytes, little-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Sixteen bytes, little-endian.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Bytes of a length both sides know (no prefix).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// A byte string with a four-byte length prefix.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        let n = v.len().min(u32::MAX as usize);
        self.buf.extend_from_slice(&v[..n]);
        self
    }
    /// A UTF-8 string with a four-byte length prefix.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// A value that encodes itself.
    pub fn put<T: Persist>(&mut self, v: &T) -> &mut Self {
        v.encode(self);
        self
    }
    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reads a payload field by field.
#[derive(Debug, Clone)]
pub struct Dec<'a> {
    data: &'a [u8],
}

impl<'a> Dec<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    /// Takes `n` bytes for `field`.
    pub fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::Short {
                field,
                need: n,
                left: self.data.len(),
            });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn arr<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>(field)?[0])
    }
    /// A boolean; anything but 0 or 1 is refused.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Invalid {
                field,
                reason: format!("{v} is not a boolean"),
            }),
        }
    }
    /// Two bytes, little-endian.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr(field)?))
    }
    /// Four bytes, little-endian.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr(field)?))
    }
    /// Eight bytes, little-endian.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr(field)?))
    }
    /// Sixteen bytes, little-endian.
    pub fn u128(&mut self, field: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.arr(field)?))
    }
    /// `N` bytes without a prefix.
    pub fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        self.arr(field)
    }
    /// A byte string with a four-byte length prefix.
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.take(field, n)
    }
    /// A UTF-8 string with a four-byte length prefix.
    pub fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(field)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid {
            field,
            reason: "not UTF-8".to_string(),
        })
    }
    /// A count of items that each take at least `min_item` bytes: refused when the rest of
    /// the payload cannot hold that many (so a corrupt count never drives an allocation).
    pub fn count(&mut self, field: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(min_item.max(1)) > self.data.len() {
            return Err(DecodeError::Invalid {
                field,
                reason: format!("{n} items cannot fit in the {} bytes left", self.data.len()),
            });
        }
        Ok(n)
    }
    /// A value that decodes itself.
    pub fn get<T: Persist>(&mut self) -> Result<T, DecodeError> {
        T::decode(self)
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    /// Checks that every byte was read.
    pub fn end(&self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.data.len()))
        }
    }
}

/// A state that can be written to and read back from a section payload.
pub trait Persist: Sized {
    /// Appends the state.
    fn encode(&self, e: &mut Enc);
    /// Reads the state back; refuses anything `encode` could not have written.
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError>;

    /// The state as a whole payload.
    fn to_payload(&self) -> Vec<u8> {
        let mut e = Enc::new();
        self.encode(&mut e);
        e.finish()
    }
    /// Reads a whole payload, refusing trailing bytes.
    fn from_payload(data: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(data);
        let v = Self::decode(&mut d)?;
        d.end()?;
        Ok(v)
    }
}

/// A device whose state Keel saves and restores: the device's crate implements it next to
/// the device. `save` is called with the vCPUs and the device's workers stopped; `restore`
/// receives a state that was fully decoded (and so validated) before anything in the
/// machine changed, and therefore cannot fail.
pub trait Stateful {
    /// The device's state as the stream holds it.
    type State: Persist;
    /// Section id of the state (four ASCII bytes, unique within a machine).
    const SECTION: SectionId;
    /// Layout version of [`Stateful::State`]; bumped when its encoding changes.
    const VERSION: u32;
    /// Captures the state.
    fn save_state(&self) -> Self::State;
    /// Puts the device in `state`.
    fn restore_state(&self, state: &Self::State);
}

use crate::SectionId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips() {
        let mut e = Enc::new();
        e.u8(1)
            .bool(true)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .u128(7 << 100)
            .str("keel")
            .bytes(&[9, 8, 7]);
        let b = e.finish();
        let mut d = Dec::new(&b);
        assert_eq!(d.u8("a").unwrap(), 1);
        assert!(d.bool("b").unwrap());
        assert_eq!(d.u16("c").unwrap(), 0x1234);
        assert_eq!(d.u32("d").unwrap(), 0xdead_beef);
        assert_eq!(d.u64("e").unwrap(), u64::MAX - 1);
        assert_eq!(d.u128("f").unwrap(), 7 << 100);
        assert_eq!(d.str("g").unwrap(), "keel");
        assert_eq!(d.bytes("h").unwrap(), &[9, 8, 7]);
        d.end().unwrap();
    }

    #[test]
    fn short_invalid_and_trailing_are_refused_by_name() {
        let mut d = Dec::new(&[1, 2]);
        assert_eq!(
            d.u32("ioregsel"),
            Err(DecodeError::Short {
                field: "ioregsel",
                need: 4,
                left: 2
            })
        );
        let mut d = Dec::new(&[2]);
        assert!(matches!(
            d.bool("halted"),
            Err(DecodeError::Invalid {
                field: "halted",
                ..
            })
        ));
        let mut d = Dec::new(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert!(matches!(
            d.count("msrs", 12),
            Err(DecodeError::Invalid { field: "msrs", .. })
        ));
        assert_eq!(Dec::new(&[0]).end(), Err(DecodeError::Trailing(1)));
    }
}
