//! A function's address on the bus (slot and function) and QEMU's `addr=` syntax.

use std::fmt;

use crate::PciError;

/// Slots on a bus.
pub const SLOTS: u8 = 32;
/// Functions per slot.
pub const FUNCTIONS: u8 = 8;

/// Slot (device number, 0..32) and function (0..8) on the root bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    slot: u8,
    function: u8,
}

impl PciAddress {
    /// `None` when the slot or the function is out of range.
    pub fn new(slot: u8, function: u8) -> Option<Self> {
        (slot < SLOTS && function < FUNCTIONS).then_some(Self { slot, function })
    }
    /// From a devfn byte (`slot << 3 | function`).
    pub fn from_devfn(devfn: u8) -> Self {
        Self {
            slot: devfn >> 3,
            function: devfn & 7,
        }
    }
    /// The slot.
    pub fn slot(self) -> u8 {
        self.slot
    }
    /// The function.
    pub fn function(self) -> u8 {
        self.function
    }
    /// `slot << 3 | function`.
    pub fn devfn(self) -> u8 {
        self.slot << 3 | self.function
    }

    /// Parses QEMU's `addr=` value: `SLOT[.FUNCTION]`, both hexadecimal with an optional
    /// `0x` prefix (`04`, `0x4.1`, `4.0`, `1f.7`); a leading `[DOMAIN:]BUS:` must name
    /// domain and bus 0 (Keel has one root bus).
    pub fn parse(text: &str) -> Result<Self, PciError> {
        let bad = || PciError::BadAddress(text.to_owned());
        let hex = |s: &str| {
            let s = s
                .strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .unwrap_or(s);
            if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(s, 16).ok()
        };
        let mut parts: Vec<&str> = text.split(':').collect();
        let devfn_part = parts.pop().ok_or_else(bad)?;
        if parts.len() > 2 || parts.iter().any(|p| hex(p) != Some(0)) {
            return Err(bad());
        }
        let (slot, function) = match devfn_part.split_once('.') {
            Some((s, f)) => (hex(s).ok_or_else(bad)?, hex(f).ok_or_else(bad)?),
            None => (hex(devfn_part).ok_or_else(bad)?, 0),
        };
        let slot = u8::try_from(slot).map_err(|_| bad())?;
        let function = u8::try_from(function).map_err(|_| bad())?;
        Self::new(slot, function).ok_or_else(bad)
    }
}

impl fmt::Display for PciAddress {
    /// QEMU's form: `SLOT.FUNCTION` in hex, as `info pci` and `query-pci` show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{}", self.slot, self.function)
    }
}

impl std::str::FromStr for PciAddress {
    type Err = PciError;
    fn from_str(s: &str) -> Result<Self, PciError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_forms() {
        let p = |s: &str| PciAddress::parse(s).map(|a| (a.slot(), a.function()));
        assert_eq!(p("04").unwrap(), (4, 0));
        assert_eq!(p("0x4.1").unwrap(), (4, 1));
        assert_eq!(p("4.0").unwrap(), (4, 0));
        assert_eq!(p("10").unwrap(), (16, 0), "hexadecimal like QEMU");
        assert_eq!(p("1f.7").unwrap(), (31, 7));
        assert_eq!(p("0:0:3.2").unwrap(), (3, 2));
        assert_eq!(p("00:05").unwrap(), (5, 0));
        for bad in [
            "",
            "20",
            "4.8",
            "x",
            "4.",
            ".1",
            "1:3",
            "0:0:0:3",
            "4.1.2",
            "-1",
            "0x",
            "100000000",
        ] {
            assert!(PciAddress::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(PciAddress::new(4, 1).unwrap().to_string(), "04.1");
        assert_eq!(PciAddress::from_devfn(0x21).devfn(), 0x21);
        assert_eq!(PciAddress::from_devfn(0x21).slot(), 4);
    }
}
