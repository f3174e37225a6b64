//! Address-range buses for port I/O and MMIO.
//!
//! The map is read-mostly: lookups take a shared lock and binary-search a sorted vector,
//! allocate nothing and never take a global device lock. Each device serialises itself
//! (a lock per device). Removing a device takes the exclusive map lock, so it waits for
//! accesses in flight on that bus to finish.

use std::fmt;
use std::sync::{Arc, RwLock};

/// A port I/O address (16-bit port space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PioAddress(pub u16);

/// A guest-physical MMIO address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmioAddress(pub u64);

/// A half-open range `[base, base + len)` on one bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (never zero).
    pub len: u64,
}

impl BusRange {
    /// Creates a range; `None` when `len` is zero or the range wraps the address space.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return None;
        }
        Some(Self { base, len })
    }

    /// Last address in the range.
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last()
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

/// A device register block on a bus. Offsets are relative to the range it was inserted at.
///
/// Implementations serialise internally (a `Mutex` around the register machine) because
/// several vCPU threads may access different devices, or the same one, at once.
pub trait BusDevice: Send + Sync {
    /// Guest read of `data.len()` bytes (1, 2, 4 or 8) at `offset`; fill `data` little-endian.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors changing a bus map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The new range overlaps one already mapped.
    #[error(
        "range {new_base:#x}+{new_len:#x} overlaps {old_base:#x}+{old_len:#x} already on the bus"
    )]
    Overlap {
        /// Requested base.
        new_base: u64,
        /// Requested length.
        new_len: u64,
        /// Base of the existing range.
        old_base: u64,
        /// Length of the existing range.
        old_len: u64,
    },
    /// Zero length or a range that wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// Nothing is mapped at that base.
    #[error("nothing is mapped at {0:#x}")]
    NotMapped(u64),
}

struct Entry {
    range: BusRange,
    device: Arc<dyn BusDevice>,
}

/// One address space (PIO or MMIO) of devices.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<Vec<Entry>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<BusRange> = match self.entries.read() {
            Ok(e) => e.iter().map(|e| e.range).collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base+len)`.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let range = BusRange::new(base, len).ok_or(BusError::InvalidRange { base, len })?;
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let pos = entries.partition_point(|e| e.range.base < base);
        for neighbour in [pos.checked_sub(1), Some(pos)].into_iter().flatten() {
            if let Some(e) = entries.get(neighbour)
                && e.range.overlaps(&range)
            {
                return Err(BusError::Overlap {
                    new_base: base,
                    new_len: len,
                    old_base: e.range.base,
                    old_len: e.range.len,
                });
            }
        }
        entries.insert(pos, Entry { range, device });
        Ok(())
    }

    /// Unmaps the device at `base`; returns once no access to this bus is in flight.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let pos = entries
            .binary_search_by_key(&base, |e| e.range.base)
            .map_err(|_| BusError::NotMapped(base))?;
        Ok(entries.remove(pos).device)
    }

    /// The mapped ranges, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.iter().map(|e| e.range).collect()
    }

    /// Dispatches a read; returns `false` (and leaves `data` untouched) when nothing is mapped.
    /// An access that starts inside a range goes to that device even if it runs past its end.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match Self::find(&entries, addr) {
            Some(e) => {
                e.device.read(addr - e.range.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns `false` when nothing is mapped (the write is dropped).
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match Self::find(&entries, addr) {
            Some(e) => {
                e.device.write(addr - e.range.base, data);
                true
            }
            None => false,
        }
    }

    #[inline]
    fn find(entries: &[Entry], addr: u64) -> Option<&Entry> {
        let pos = entries.partition_point(|e| e.range.base <= addr);
        let e = entries.get(pos.checked_sub(1)?)?;
        e.range.contains(addr).then_some(e)
    }
}

/// The two buses every x86 machine has.
#[derive(Debug, Default)]
pub struct IoBuses {
    /// Port I/O space (`in`/`out`).
    pub pio: Bus,
    /// Memory-mapped I/O outside guest RAM.
    pub mmio: Bus,
}

impl IoBuses {
    /// Two empty buses.
    pub fn new() -> Self {
        Self::default()
    }

    /// Port read; unassigned ports read as all ones, as on a PC.
    #[inline]
    pub fn pio_read(&self, port: PioAddress, data: &mut [u8]) {
        if !self.pio.read(u64::from(port.0), data) {
            data.fill(0xff);
        }
    }

    /// Port write; writes to unassigned ports are dropped.
    #[inline]
    pub fn pio_write(&self, port: PioAddress, data: &[u8]) {
        self.pio.write(u64::from(port.0), data);
    }

    /// MMIO read; unassigned addresses read as all ones.
    #[inline]
    pub fn mmio_read(&self, addr: MmioAddress, data: &mut [u8]) {
        if !self.mmio.read(addr.0, data) {
            data.fill(0xff);
        }
    }

    /// MMIO write; writes to unassigned addresses are dropped.
    #[inline]
    pub fn mmio_write(&self, addr: MmioAddress, data: &[u8]) {
        self.mmio.write(addr.0, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn lookup_hits_exact_ranges_only() {
        let bus = Bus::new();
        let a = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Recorder::default())).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x3f7, &mut d));
        assert!(!bus.read(0x400, &mut d));
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.0.lock().unwrap().as_slice(), &[(0, vec![0x41])]);
    }

    #[test]
    fn overlap_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Recorder::default()))
            .unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, Arc::new(Recorder::default())),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 0x9, Arc::new(Recorder::default())),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(0xf8, 0x8, Arc::new(Recorder::default())).is_ok());
        assert!(matches!(
            bus.insert(u64::MAX, 2, Arc::new(Recorder::default())),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(5, 0, Arc::new(Recorder::default())),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn remove_unmaps() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Recorder::default()))
            .unwrap();
        assert!(bus.remove(0x101).is_err());
        bus.remove(0x100).unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0x100, &mut d));
    }

    #[test]
    fn unassigned_pio_reads_all_ones() {
        let io = IoBuses::new();
        let mut d = [0u8; 2];
        io.pio_read(PioAddress(0x80), &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    proptest::proptest! {
        #[test]
        fn lookup_matches_linear_scan(ranges in proptest::collection::vec((0u64..4096, 1u64..64), 0..24), probes in proptest::collection::vec(0u64..4200, 64)) {
            let bus = Bus::new();
            let mut model: Vec<BusRange> = Vec::new();
            for (base, len) in ranges {
                let r = BusRange::new(base, len).unwrap();
                let ok = bus.insert(base, len, Arc::new(Recorder::default())).is_ok();
                let expect_ok = !model.iter().any(|m| m.overlaps(&r));
                proptest::prop_assert_eq!(ok, expect_ok);
                if ok { model.push(r); }
            }
            for p in probes {
                let mut d = [0u8; 1];
                let hit = bus.read(p, &mut d);
                let m = model.iter().find(|r| r.contains(p));
                proptest::prop_assert_eq!(hit, m.is_some());
                if let Some(r) = m { proptest::prop_assert_eq!(d[0], (p - r.base) as u8); }
            }
        }
    }
}
