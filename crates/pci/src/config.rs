//! The type-0 configuration space header of one PCI function: identification, command and
//! status, BARs with sizing, interrupt line and pin, and the capability list.
//!
//! Every byte has a write mask (bits the guest may change) and a write-1-to-clear mask
//! (status error bits); a guest write of any width at any offset goes through them byte by
//! byte, so garbage in gives a defined result: read-only bits keep their value, bytes past
//! the 256-byte space are dropped (and read as zero). BARs are plain write masks too: the
//! address bits below the BAR's size are read-only zero, so the all-ones write of a sizing
//! probe reads back the size mask with the type bits.

use crate::PciError;

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Offsets of the type-0 header registers.
pub mod regs {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass, class (3 bytes from here).
    pub const CLASS_PROG: usize = 0x09;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// Header type (8 bits; bit 7 is the multifunction bit).
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR (six of 32 bits each).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM base address (not implemented: reads zero).
    pub const ROM_ADDRESS: usize = 0x30;
    /// Capability list pointer (8 bits).
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Interrupt line (8 bits, firmware scratch).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (8 bits: 0 none, 1..4 INTA..INTD).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// I/O space decode.
    pub const IO: u16 = 1 << 0;
    /// Memory space decode.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master (the device may do DMA and send MSIs).
    pub const MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// The bits a guest may change.
    pub const WRITABLE: u16 = IO | MEMORY | MASTER | PARITY | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// INTx is asserted (read-only).
    pub const INTERRUPT: u16 = 1 << 3;
    /// The capability list exists (read-only).
    pub const CAP_LIST: u16 = 1 << 4;
    /// Fast back-to-back transactions capable (read-only).
    pub const FAST_BACK: u16 = 1 << 7;
    /// DEVSEL# timing: medium (read-only).
    pub const DEVSEL_MEDIUM: u16 = 1 << 9;
    /// The error bits, write 1 to clear.
    pub const W1C: u16 = 0xf900;
}

/// Capability IDs used by this crate.
pub mod cap_id {
    /// Message Signalled Interrupts.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific (virtio's structures).
    pub const VENDOR: u8 = 0x09;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Port I/O.
    Io,
    /// 32-bit memory.
    Memory32 {
        /// Prefetchable (no side effects on reads).
        prefetchable: bool,
    },
    /// 64-bit memory: uses this BAR and the next one (the upper half).
    Memory64 {
        /// Prefetchable (no side effects on reads).
        prefetchable: bool,
    },
}

impl BarKind {
    /// The address space it decodes in.
    pub fn space(self) -> AddressSpace {
        match self {
            BarKind::Io => AddressSpace::Io,
            _ => AddressSpace::Memory,
        }
    }

    /// The read-only type bits of the BAR's low dword.
    fn flags(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }
}

/// An address space a BAR decodes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// Port I/O (16-bit on x86).
    Io,
    /// Memory.
    Memory,
}

/// A BAR as the device declares it: kind and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarSpec {
    /// What it decodes.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 4 (I/O, at most 256) or 16 (memory).
    pub size: u64,
}

impl BarSpec {
    /// A 32-bit memory BAR.
    pub fn mem32(size: u64, prefetchable: bool) -> Self {
        Self {
            kind: BarKind::Memory32 { prefetchable },
            size,
        }
    }
    /// A 64-bit memory BAR (takes two BAR registers).
    pub fn mem64(size: u64, prefetchable: bool) -> Self {
        Self {
            kind: BarKind::Memory64 { prefetchable },
            size,
        }
    }
    /// An I/O BAR.
    pub fn io(size: u64) -> Self {
        Self {
            kind: BarKind::Io,
            size,
        }
    }
}

/// A BAR that decodes now: its decode bit in the command register is on and the guest (or
/// the firmware role) placed it at a valid address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarRegion {
    /// BAR index (0..=5).
    pub bar: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Base address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl BarRegion {
    /// Whether `addr` in `space` falls inside.
    pub fn contains(&self, space: AddressSpace, addr: u64) -> bool {
        self.kind.space() == space && addr >= self.base && addr - self.base < self.size
    }
}

/// Identification of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code: base class, subclass, programming interface (`0x010000` is SCSI storage).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The first capability goes here, after the type-0 header.
const FIRST_CAP: usize = 0x40;

/// The configuration space of one type-0 function (see the module documentation).
#[derive(Clone)]
pub struct PciConfig {
    data: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    w1c: [u8; CONFIG_SPACE_SIZE],
    /// Power-on values of every byte, restored by [`PciConfig::reset`].
    initial: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; 6],
    next_cap: usize,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read_u16(regs::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read_u16(regs::DEVICE_ID)),
            )
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    /// A type-0 header with these ids, no BARs, no capabilities, no interrupt pin.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            data: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            w1c: [0; CONFIG_SPACE_SIZE],
            initial: [0; CONFIG_SPACE_SIZE],
            bars: [None; 6],
            next_cap: FIRST_CAP,
        };
        c.set_u16(regs::VENDOR_ID, ids.vendor);
        c.set_u16(regs::DEVICE_ID, ids.device);
        c.set_u8(regs::REVISION, ids.revision);
        let class = ids.class.to_le_bytes();
        c.set_bytes(regs::CLASS_PROG, &class[..3]);
        c.set_u16(regs::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(regs::SUBSYSTEM_ID, ids.subsystem);
        c.set_wmask_u16(regs::COMMAND, command::WRITABLE);
        c.w1c[regs::STATUS..regs::STATUS + 2].copy_from_slice(&status::W1C.to_le_bytes());
        c.wmask[regs::CACHE_LINE_SIZE] = 0xff;
        c.wmask[regs::INTERRUPT_LINE] = 0xff;
        c
    }

    // ---- raw access for the device model (no masks) ----

    /// Sets bytes at `offset` as the device (not the guest): no masks; part of the
    /// power-on image. Bytes past the end are dropped.
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) {
                self.data[o] = *b;
                self.initial[o] = *b;
            }
        }
    }
    /// Sets a byte as the device.
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set_bytes(offset, &[v]);
    }
    /// Sets a 16-bit register as the device.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }
    /// Sets a 32-bit register as the device.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }
    /// Changes live state as the device (e.g. an MSI pending bit) without touching the
    /// power-on image.
    pub fn poke_u32(&mut self, offset: usize, v: u32) {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            if let Some(d) = self.data.get_mut(offset.saturating_add(i)) {
                *d = *b;
            }
        }
    }
    /// Sets the guest-writable bits of bytes at `offset`.
    pub fn set_wmask(&mut self, offset: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.wmask.get_mut(offset.saturating_add(i)) {
                *w = *m;
            }
        }
    }
    fn set_wmask_u16(&mut self, offset: usize, mask: u16) {
        self.set_wmask(offset, &mask.to_le_bytes());
    }

    /// A byte (zero past the end).
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.data.get(offset).copied().unwrap_or(0)
    }
    /// A 16-bit register (zero bytes past the end).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.read_u8(offset), self.read_u8(offset.saturating_add(1))])
    }
    /// A 32-bit register (zero bytes past the end).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.read_u8(offset.saturating_add(i));
        }
        u32::from_le_bytes(b)
    }

    // ---- guest access ----

    /// Guest read of `data.len()` bytes at `offset`: any width, any offset; bytes past the
    /// space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .map_or(0, |o| self.read_u8(o));
        }
    }

    /// Guest write of `data` at `offset`: each byte through its write mask and its
    /// write-1-to-clear mask; bytes past the space are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < CONFIG_SPACE_SIZE)
            else {
                return;
            };
            let w = self.wmask[o];
            let c = self.w1c[o];
            self.data[o] = (self.data[o] & !w) | (v & w);
            self.data[o] &= !(v & c);
        }
    }

    /// Back to power-on values (command 0, BARs unassigned, capabilities as added).
    pub fn reset(&mut self) {
        self.data = self.initial;
    }

    /// Every byte as the guest reads it now (a snapshot of the function's configuration).
    pub fn image(&self) -> [u8; CONFIG_SPACE_SIZE] {
        self.data
    }

    /// Puts back a saved [`PciConfig::image`]: the bits the guest can write (command,
    /// BARs, interrupt line, capability control and message registers) take the saved
    /// values, every read-only bit keeps this function's, so a foreign image can only
    /// produce what guest writes could. Bytes past `saved` are left as they are.
    pub fn restore_image(&mut self, saved: &[u8]) {
        for (o, &v) in saved.iter().enumerate().take(CONFIG_SPACE_SIZE) {
            let w = self.wmask[o];
            self.data[o] = (self.data[o] & !w) | (v & w);
        }
    }

    // ---- header fields ----

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(regs::COMMAND)
    }
    /// Sets the command register as firmware would (only the writable bits).
    pub fn set_command(&mut self, value: u16) {
        self.write(
            regs::COMMAND as u64,
            &(value & command::WRITABLE).to_le_bytes(),
        );
    }
    /// Whether INTx is disabled by the command register.
    pub fn intx_disabled(&self) -> bool {
        self.command() & command::INTX_DISABLE != 0
    }
    /// Whether the function may master the bus (DMA, MSI).
    pub fn bus_master(&self) -> bool {
        self.command() & command::MASTER != 0
    }
    /// Reflects the INTx level in the status register (bit 3).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let s = self.read_u16(regs::STATUS);
        let s = if asserted {
            s | status::INTERRUPT
        } else {
            s & !status::INTERRUPT
        };
        self.data[regs::STATUS..regs::STATUS + 2].copy_from_slice(&s.to_le_bytes());
    }
    /// Sets or clears the multifunction bit (header type bit 7).
    pub fn set_multifunction(&mut self, on: bool) {
        let h = self.read_u8(regs::HEADER_TYPE) & 0x7f;
        self.set_u8(regs::HEADER_TYPE, h | if on { 0x80 } else { 0 });
    }
    /// Whether the multifunction bit is set.
    pub fn is_multifunction(&self) -> bool {
        self.read_u8(regs::HEADER_TYPE) & 0x80 != 0
    }
    /// Sets the interrupt pin (1..=4 for INTA..INTD, 0 for none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(regs::INTERRUPT_PIN, pin.min(4));
    }

    // ---- BARs ----

    /// Declares BAR `index`. A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let bad = |reason: &'static str| PciError::InvalidBar {
            index,
            size: spec.size,
            reason,
        };
        let wide = matches!(spec.kind, BarKind::Memory64 { .. });
        if index >= 6 || (wide && index >= 5) {
            return Err(bad("no such BAR register"));
        }
        if !spec.size.is_power_of_two() {
            return Err(bad("size is not a power of two"));
        }
        match spec.kind {
            BarKind::Io if !(4..=256).contains(&spec.size) => {
                return Err(bad("I/O BARs are 4 to 256 bytes"));
            }
            BarKind::Memory32 { .. } if !(16..=1 << 31).contains(&spec.size) => {
                return Err(bad("32-bit memory BARs are 16 bytes to 2 GiB"));
            }
            BarKind::Memory64 { .. } if spec.size < 16 || spec.size > 1 << 62 => {
                return Err(bad("64-bit memory BARs are 16 bytes to 2^62"));
            }
            _ => {}
        }
        let taken = |i: usize| self.bars[i].is_some() || self.is_upper_half(i);
        if taken(index) || (wide && taken(index + 1)) {
            return Err(bad("BAR register already in use"));
        }
        let off = regs::BAR0 + index * 4;
        let mask = !(spec.size - 1);
        let low_mask = match spec.kind {
            BarKind::Io => (mask as u32) & !0x3,
            _ => (mask as u32) & !0xf,
        };
        self.set_u32(off, spec.kind.flags());
        self.set_wmask(off, &low_mask.to_le_bytes());
        if wide {
            self.set_u32(off + 4, 0);
            self.set_wmask(off + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && matches!(
                self.bars[index - 1],
                Some(BarSpec {
                    kind: BarKind::Memory64 { .. },
                    ..
                })
            )
    }

    /// BAR `index` as declared.
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The declared BARs with their indices.
    pub fn bars(&self) -> impl Iterator<Item = (u8, BarSpec)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i as u8, b)))
    }

    /// The address programmed in BAR `index` (type bits removed), whether it decodes or not.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let off = regs::BAR0 + index * 4;
        let low = u64::from(self.read_u32(off));
        Some(match spec.kind {
            BarKind::Io => low & !0x3,
            BarKind::Memory32 { .. } => low & !0xf,
            BarKind::Memory64 { .. } => (low & !0xf) | u64::from(self.read_u32(off + 4)) << 32,
        })
    }

    /// Programs BAR `index` with `address` (as firmware does; bits below the size drop).
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(spec) = self.bar(index) else {
            return;
        };
        let off = regs::BAR0 + index * 4;
        self.write(off as u64, &(address as u32).to_le_bytes());
        if matches!(spec.kind, BarKind::Memory64 { .. }) {
            self.write(off as u64 + 4, &((address >> 32) as u32).to_le_bytes());
        }
    }

    /// The BARs that decode now: decode enabled in the command register and an address
    /// that neither is zero, nor wraps, nor (for I/O) leaves the 64 KiB port space, nor
    /// (for 32-bit memory) reaches 4 GiB — so a BAR holding a sizing pattern never decodes.
    pub fn bar_regions(&self) -> Vec<BarRegion> {
        let cmd = self.command();
        let mut out = Vec::new();
        for (i, spec) in self.bars() {
            let enabled = match spec.kind {
                BarKind::Io => cmd & command::IO != 0,
                _ => cmd & command::MEMORY != 0,
            };
            let Some(base) = self.bar_address(usize::from(i)) else {
                continue;
            };
            let Some(last) = base.checked_add(spec.size - 1) else {
                continue;
            };
            let limit = match spec.kind {
                BarKind::Io => 0xffff,
                BarKind::Memory32 { .. } => u64::from(u32::MAX) - 1,
                BarKind::Memory64 { .. } => u64::MAX - 1,
            };
            if enabled && base != 0 && last <= limit {
                out.push(BarRegion {
                    bar: i,
                    kind: spec.kind,
                    base,
                    size: spec.size,
                });
            }
        }
        out
    }

    // ---- capabilities ----

    /// Adds a capability at the next free offset, first in the list: `body` is everything
    /// after the ID and next-pointer bytes,
    /// `wmask` the guest-writable bits of `body` (shorter means the rest is read-only).
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<u8, PciError> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::ConfigSpaceFull { id, len });
        }
        // Linked in at the head of the list, as QEMU's `pci_add_capability` does: the list
        // reads newest first (a virtio-pci function's MSI-X capability comes first).
        let head = self.read_u8(regs::CAPABILITY_LIST);
        self.set_u8(offset, id);
        self.set_u8(offset + 1, head);
        self.set_bytes(offset + 2, body);
        self.set_wmask(offset + 2, &wmask[..wmask.len().min(body.len())]);
        self.set_u8(regs::CAPABILITY_LIST, offset as u8);
        let st = self.read_u16(regs::STATUS) | status::CAP_LIST;
        self.set_u16(regs::STATUS, st);
        self.next_cap = (end + 3) & !3;
        Ok(offset as u8)
    }

    /// Offsets of the capabilities with `id`, in list order (the walk stops at a loop or
    /// an out-of-range pointer).
    pub fn find_capabilities(&self, id: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ptr = usize::from(self.read_u8(regs::CAPABILITY_LIST));
        let mut steps = 0;
        while (FIRST_CAP..CONFIG_SPACE_SIZE - 1).contains(&ptr) && steps < 64 {
            if self.read_u8(ptr) == id {
                out.push(ptr as u8);
            }
            ptr = usize::from(self.read_u8(ptr + 1));
            steps += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        let mut c = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1001,
            class: 0x01_00_00,
            revision: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        });
        c.add_bar(0, BarSpec::io(0x40)).unwrap();
        c.add_bar(1, BarSpec::mem32(0x1000, false)).unwrap();
        c.add_bar(4, BarSpec::mem64(0x4000, true)).unwrap();
        c
    }

    fn rd32(c: &PciConfig, off: u64) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn wr32(c: &mut PciConfig, off: u64, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn ids_and_read_only_header() {
        let mut c = cfg();
        assert_eq!(rd32(&c, 0), 0x1001_1af4);
        assert_eq!(rd32(&c, 8), 0x0100_0000);
        assert_eq!(rd32(&c, 0x2c), 0x0002_1af4);
        wr32(&mut c, 0, 0xdead_beef);
        wr32(&mut c, 8, 0xffff_ffff);
        assert_eq!(rd32(&c, 0), 0x1001_1af4);
        assert_eq!(rd32(&c, 8), 0x0100_0000);
        assert_eq!(rd32(&c, 0x30), 0, "no expansion ROM");
        wr32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x30), 0, "ROM sizing reads zero: none");
    }

    #[test]
    fn command_and_status_bits() {
        let mut c = cfg();
        c.write(4, &[0xff, 0xff]);
        assert_eq!(c.command(), command::WRITABLE);
        c.poke_u32(4, u32::from(c.command()) | 0xf900 << 16);
        c.write(6, &0x0100u16.to_le_bytes());
        assert_eq!(c.read_u16(6) & 0xf900, 0xf800, "write 1 clears");
        c.set_interrupt_status(true);
        c.write(6, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(6), status::INTERRUPT, "INTx status is read-only");
    }

    #[test]
    fn bar_sizing_reads_back_mask_and_flags() {
        let mut c = cfg();
        for (bar, expect) in [
            (0u64, 0xffff_ffc1u32),
            (1, 0xffff_f000),
            (4, 0xffff_c00c),
            (5, 0xffff_ffff),
            (2, 0),
            (3, 0),
        ] {
            wr32(&mut c, 0x10 + bar * 4, 0xffff_ffff);
            assert_eq!(rd32(&c, 0x10 + bar * 4), expect, "BAR{bar}");
        }
        // Sizing patterns never decode.
        c.set_command(command::IO | command::MEMORY);
        assert!(c.bar_regions().is_empty());
        c.set_bar_address(0, 0xc040);
        c.set_bar_address(1, 0xfebf_1000);
        c.set_bar_address(4, 0x8_0000_4000);
        assert_eq!(c.bar_address(4), Some(0x8_0000_4000));
        let r = c.bar_regions();
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].base, r[1].base, r[2].base),
            (0xc040, 0xfebf_1000, 0x8_0000_4000)
        );
        c.set_command(command::IO);
        assert_eq!(c.bar_regions().len(), 1, "memory decode off");
        c.reset();
        assert_eq!(c.command(), 0);
        assert_eq!(c.bar_address(1), Some(0));
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut c = cfg();
        assert!(
            c.add_bar(5, BarSpec::mem32(0x1000, false)).is_err(),
            "upper half of BAR4"
        );
        assert!(c.add_bar(2, BarSpec::io(3)).is_err());
        assert!(c.add_bar(2, BarSpec::io(512)).is_err());
        assert!(c.add_bar(5, BarSpec::mem64(0x1000, false)).is_err());
        assert!(c.add_bar(6, BarSpec::mem32(0x1000, false)).is_err());
        assert!(c.add_bar(2, BarSpec::mem64(0x1000, false)).is_ok());
        assert!(c.add_bar(3, BarSpec::io(4)).is_err());
    }

    #[test]
    fn capability_list_links() {
        let mut c = cfg();
        let a = c.add_capability(cap_id::VENDOR, &[0; 14], &[]).unwrap();
        let b = c
            .add_capability(cap_id::MSIX, &[0; 10], &[0, 0xc0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x50));
        // Newest first, as QEMU links them.
        assert_eq!(c.read_u8(0x34), 0x50);
        assert_eq!(c.read_u8(0x51), 0x40);
        assert_eq!(c.read_u8(0x41), 0);
        assert_ne!(c.read_u16(6) & status::CAP_LIST, 0);
        assert_eq!(c.find_capabilities(cap_id::MSIX), vec![0x50]);
        c.write(0x52, &[0xff, 0xff]);
        assert_eq!(c.read_u16(0x52), 0xc000);
        assert!(c.add_capability(1, &[0; 200], &[]).is_err());
    }

    #[test]
    fn any_width_any_offset() {
        let mut c = cfg();
        let mut big = [0u8; 16];
        c.read(250, &mut big);
        assert_eq!(&big[6..], &[0; 10]);
        c.write(u64::MAX, &[1, 2, 3]);
        c.read(u64::MAX - 1, &mut big);
        assert_eq!(big, [0; 16]);
        c.write(0x3b, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(c.read_u8(0x3c), 0xbb, "interrupt line is writable");
        assert_eq!(c.read_u8(0x3d), 0, "pin is not");
    }
}
