//! BAR placement in the windows the machine declares (the DSDT's `_CRS`): one I/O window,
//! one 32-bit memory window and, optionally, one 64-bit memory window.
//!
//! Keel boots without firmware, so it places BARs at realize time as SeaBIOS would under
//! QEMU: natural alignment (memory BARs at least 4 KiB, so no two functions share a page),
//! lowest address first. 64-bit BARs go below 4 GiB while they fit, as SeaBIOS does when
//! everything fits, and above 4 GiB otherwise.

use crate::config::{BarKind, BarSpec};
use crate::{PciAddress, PciError};

/// Memory BARs are placed with at least this alignment and size.
pub const MIN_MEMORY_PLACEMENT: u64 = 0x1000;

/// A window `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Window {
    /// A window; `None` when empty or wrapping.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        (len > 0 && base.checked_add(len - 1).is_some()).then_some(Self { base, len })
    }
}

#[derive(Debug, Clone)]
struct Pool {
    window: Window,
    /// (base, size, owner), sorted by base.
    used: Vec<(u64, u64, PciAddress)>,
}

impl Pool {
    fn new(window: Window) -> Self {
        Self {
            window,
            used: Vec::new(),
        }
    }

    fn allocate(&mut self, owner: PciAddress, size: u64, align: u64) -> Option<u64> {
        let end = self.window.base + (self.window.len - 1);
        let mut candidate = align_up(self.window.base, align)?;
        let mut pos = 0;
        loop {
            let last = candidate.checked_add(size - 1)?;
            if last > end {
                return None;
            }
            match self.used.get(pos) {
                Some(&(b, s, _)) if b <= last => {
                    if b + s > candidate {
                        candidate = align_up(b + s, align)?;
                    }
                    pos += 1;
                }
                _ => {
                    self.used.insert(pos, (candidate, size, owner));
                    return Some(candidate);
                }
            }
        }
    }

    fn release(&mut self, owner: PciAddress) {
        self.used.retain(|&(_, _, o)| o != owner);
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

/// Places BARs in the machine's windows; remembers which function holds what.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    io: Pool,
    mem32: Pool,
    mem64: Option<Pool>,
}

impl BarAllocator {
    /// An allocator over these windows (e.g. on `pc`: I/O 0xc000..0x10000, 32-bit memory
    /// from the end of low RAM to 0xfec00000, 64-bit memory above RAM).
    pub fn new(io: Window, mem32: Window, mem64: Option<Window>) -> Self {
        Self {
            io: Pool::new(io),
            mem32: Pool::new(mem32),
            mem64: mem64.map(Pool::new),
        }
    }

    /// Places one BAR of `owner`; returns its base address.
    pub fn allocate(&mut self, owner: PciAddress, spec: BarSpec) -> Result<u64, PciError> {
        let no_room = || PciError::NoRoom {
            size: spec.size,
            kind: spec.kind,
        };
        if !spec.size.is_power_of_two() {
            return Err(no_room());
        }
        match spec.kind {
            BarKind::Io => self
                .io
                .allocate(owner, spec.size, spec.size)
                .ok_or_else(no_room),
            BarKind::Memory32 { .. } => {
                let size = spec.size.max(MIN_MEMORY_PLACEMENT);
                self.mem32.allocate(owner, size, size).ok_or_else(no_room)
            }
            BarKind::Memory64 { .. } => {
                let size = spec.size.max(MIN_MEMORY_PLACEMENT);
                if size <= 1 << 31
                    && let Some(base) = self.mem32.allocate(owner, size, size)
                {
                    return Ok(base);
                }
                self.mem64
                    .as_mut()
                    .and_then(|p| p.allocate(owner, size, size))
                    .ok_or_else(no_room)
            }
        }
    }

    /// Frees everything `owner` holds (when the function goes).
    pub fn release(&mut self, owner: PciAddress) {
        self.io.release(owner);
        self.mem32.release(owner);
        if let Some(p) = &mut self.mem64 {
            p.release(owner);
        }
    }

    /// The windows: I/O, 32-bit memory, 64-bit memory (for the DSDT's `_CRS`).
    pub fn windows(&self) -> (Window, Window, Option<Window>) {
        (
            self.io.window,
            self.mem32.window,
            self.mem64.as_ref().map(|p| p.window),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(slot: u8) -> PciAddress {
        PciAddress::new(slot, 0).unwrap()
    }

    #[test]
    fn natural_alignment_first_fit_and_release() {
        let mut al = BarAllocator::new(
            Window::new(0xc000, 0x4000).unwrap(),
            Window::new(0xe000_0000, 0x1000_0000).unwrap(),
            Window::new(1 << 40, 1 << 36),
        );
        assert_eq!(al.allocate(a(1), BarSpec::io(0x20)).unwrap(), 0xc000);
        assert_eq!(al.allocate(a(1), BarSpec::io(0x40)).unwrap(), 0xc040);
        assert_eq!(al.allocate(a(2), BarSpec::io(0x20)).unwrap(), 0xc020);
        assert_eq!(
            al.allocate(a(2), BarSpec::mem32(0x10, false)).unwrap(),
            0xe000_0000
        );
        assert_eq!(
            al.allocate(a(3), BarSpec::mem64(0x4000, true)).unwrap(),
            0xe000_4000
        );
        assert_eq!(
            al.allocate(a(3), BarSpec::mem32(0x1000, false)).unwrap(),
            0xe000_1000
        );
        // A 64-bit BAR that cannot fit below 4 GiB goes high.
        assert_eq!(
            al.allocate(a(4), BarSpec::mem64(1 << 32, true)).unwrap(),
            1 << 40
        );
        assert!(matches!(
            al.allocate(a(4), BarSpec::mem32(1 << 31, false)),
            Err(PciError::NoRoom { .. })
        ));
        al.release(a(2));
        assert_eq!(al.allocate(a(5), BarSpec::io(0x20)).unwrap(), 0xc020);
        assert_eq!(
            al.allocate(a(5), BarSpec::mem32(0x1000, false)).unwrap(),
            0xe000_0000
        );
        let mut small = BarAllocator::new(
            Window::new(0x1000, 0x10).unwrap(),
            Window::new(0xf000_0000, 0x1000).unwrap(),
            None,
        );
        assert!(small.allocate(a(1), BarSpec::io(0x20)).is_err());
        assert!(small.allocate(a(1), BarSpec::mem64(0x2000, false)).is_err());
    }
}
