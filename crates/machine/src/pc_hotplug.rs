//! ACPI PCI hot plug of the `pc` machine, as QEMU 7.2's PIIX4 does it for bus 0: a register
//! block at I/O 0xAE00 that the DSDT's methods read and write, and GPE 1 of the GPE0 block.
//!
//! Registers (32-bit): +0x00 PCIU, slots with a pending insert (cleared when read); +0x04
//! PCID, slots with a pending removal request (kept until the eject); +0x08 B0EJ, the guest
//! writes a slot's bit to eject it (every function of the slot goes); +0x0C PCIRMV, the
//! hot-pluggable slots; +0x10 BNUM, bus select (0: one root bus); +0x14 PIDX: the guest
//! writes a slot's bit, then reads the `acpi-index` of the slot's device (0: none; the
//! read clears it). The DSDT's `_DSM` of each slot reads it for Linux's `acpi_index`.
//!
//! An eject takes the slot's functions off the PCI bus at once (on the vCPU thread, so the
//! guest never finds them again) and reports [`crate::MachineEvent::DeviceEjected`]; the
//! board then completes the removal in its device tree (`Board::guest_ejected`), which
//! emits `DEVICE_DELETED`.

use std::sync::{Arc, Mutex};

use keel_accel::BusDevice;
use keel_pci::PciBus;

use crate::pc::Gpe0;

/// I/O base of the hot plug registers.
pub const PCI_HOTPLUG_BASE: u16 = 0xae00;
/// Their length.
pub const PCI_HOTPLUG_LEN: u64 = 0x18;
/// The GPE the hot plug events raise.
pub const PCI_HOTPLUG_GPE: u8 = 1;
/// Slots that take hot plug: 2 to 31 (0 and 1 hold the host bridge and the PIIX).
pub const HOTPLUG_SLOTS: u32 = !0b11;

#[derive(Debug, Default)]
struct State {
    up: u32,
    down: u32,
    ejected: u32,
    bnum: u32,
    /// The acpi-index the last PIDX write looked up.
    pidx: u32,
    /// (devfn, acpi-index) of the functions with one, oldest first.
    indexes: Vec<(u8, u32)>,
}

/// The hot plug registers a snapshot keeps (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HotplugRegisters {
    /// PCIU: slots with a pending insert.
    pub up: u32,
    /// PCID: slots with a pending removal request.
    pub down: u32,
    /// BNUM: the selected bus.
    pub bnum: u32,
    /// The acpi-index the last PIDX write looked up, not read yet.
    pub pidx: u32,
}

/// The hot plug controller (see the module documentation).
pub struct PciHotplug {
    state: Mutex<State>,
    gpe: Arc<Gpe0>,
    pci: Arc<PciBus>,
    ejected: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for PciHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHotplug")
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl PciHotplug {
    /// A controller for `pci` raising GPE 1 in `gpe`; `ejected` is called (on the vCPU
    /// thread, without locks held) after the guest ejected slots.
    pub fn new(gpe: Arc<Gpe0>, pci: Arc<PciBus>, ejected: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            gpe,
            pci,
            ejected,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device was hot-plugged into `slot` (its function 0 is present): PCIU and the GPE.
    pub fn plugged(&self, slot: u8) {
        let bit = 1u32 << (slot & 31);
        {
            let mut s = self.lock();
            s.up |= bit;
            s.down &= !bit;
        }
        self.gpe.raise(PCI_HOTPLUG_GPE);
    }

    /// `device_del` of a device in `slot`: PCID and the GPE (again, if already pending).
    pub fn unplug_requested(&self, slot: u8) {
        self.lock().down |= 1u32 << (slot & 31);
        self.gpe.raise(PCI_HOTPLUG_GPE);
    }

    /// The slot's devices are gone (ejected, or removed by a reset): nothing is pending.
    pub fn slot_emptied(&self, slot: u8) {
        let mut s = self.lock();
        let bit = 1u32 << (slot & 31);
        s.down &= !bit;
        s.up &= !bit;
    }

    /// The function at `devfn` has `acpi-index` `index` (0: none), until it goes.
    pub fn set_acpi_index(&self, devfn: u8, index: u32) {
        let mut s = self.lock();
        s.indexes.retain(|(d, _)| *d != devfn);
        if index != 0 {
            s.indexes.push((devfn, index));
        }
    }

    /// The slots the guest ejected since the last call.
    pub fn take_ejected(&self) -> u32 {
        std::mem::take(&mut self.lock().ejected)
    }

    /// The guest-visible registers (a snapshot): PCIU, PCID, BNUM and the PIDX answer.
    pub fn registers(&self) -> HotplugRegisters {
        let s = self.lock();
        HotplugRegisters {
            up: s.up,
            down: s.down,
            bnum: s.bnum,
            pidx: s.pidx,
        }
    }

    /// Puts back saved registers (the GPE's status is restored with the GPE block).
    pub fn restore_registers(&self, r: &HotplugRegisters) {
        let mut s = self.lock();
        s.up = r.up & HOTPLUG_SLOTS;
        s.down = r.down & HOTPLUG_SLOTS;
        s.bnum = r.bnum;
        s.pidx = r.pidx;
    }

    /// Machine reset: nothing pending (ejected slots stay to be completed).
    pub fn reset(&self) {
        let mut s = self.lock();
        s.up = 0;
        s.down = 0;
        s.bnum = 0;
    }

    fn read32(&self, reg: u64) -> u32 {
        let mut s = self.lock();
        match reg {
            0x00 => std::mem::take(&mut s.up),
            0x04 => s.down,
            0x0c => HOTPLUG_SLOTS,
            0x10 => s.bnum,
            0x14 => std::mem::take(&mut s.pidx),
            _ => 0,
        }
    }

    fn eject(&self, slots: u32) {
        let slots = slots & HOTPLUG_SLOTS;
        if slots == 0 {
            return;
        }
        {
            let mut s = self.lock();
            if s.bnum != 0 {
                return;
            }
            s.ejected |= slots;
            s.down &= !slots;
        }
        for slot in 0..32u8 {
            if slots & (1 << slot) != 0 {
                // Gone for the guest now; the board releases them in its device tree.
                drop(self.pci.remove_slot(slot));
            }
        }
        (self.ejected)();
    }
}

impl BusDevice for PciHotplug {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let reg = offset & !3;
        let v = self.read32(reg).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get((offset & 3) as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match (offset, data.len()) {
            (0x08, 4) => self.eject(v),
            (0x10, 4) => self.lock().bnum = v,
            (0x14, 4) => {
                // The newest function of the slot (QEMU looks through the bus's children,
                // newest first).
                let mut s = self.lock();
                let slot = v.trailing_zeros();
                s.pidx = match s.bnum {
                    0 => s
                        .indexes
                        .iter()
                        .rev()
                        .find(|(d, _)| u32::from(*d >> 3) == slot)
                        .map_or(0, |(_, i)| *i),
                    _ => 0,
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Line(std::sync::atomic::AtomicBool);
    impl keel_accel::IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.store(high, Ordering::SeqCst);
        }
    }

    #[test]
    fn insert_eject_and_the_sci() {
        let sci = Arc::new(Line::default());
        let gpe = Arc::new(Gpe0::new(sci.clone()));
        let pci = Arc::new(PciBus::new());
        let a = keel_pci::PciAddress::new(3, 0).unwrap();
        pci.add_function(a, Arc::new(keel_pci::PciFunction::host_bridge()))
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let hp = PciHotplug::new(
            gpe.clone(),
            pci.clone(),
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        hp.plugged(3);
        // GPE 1 is pending but not enabled: no SCI until the guest enables it.
        assert!(!sci.0.load(Ordering::SeqCst));
        gpe.write(2, &[0x02]);
        assert!(sci.0.load(Ordering::SeqCst));
        let mut d = [0u8; 4];
        hp.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 3);
        hp.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "PCIU clears when read");
        gpe.write(0, &[0x02]);
        assert!(!sci.0.load(Ordering::SeqCst));
        hp.unplug_requested(3);
        hp.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 3);
        // Slot 1 cannot be ejected; slot 3 can.
        hp.write(8, &(1u32 << 1).to_le_bytes());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        hp.write(8, &(1u32 << 3).to_le_bytes());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(pci.function(a).is_none());
        assert_eq!(hp.take_ejected(), 1 << 3);
        hp.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        // PIDX: a slot's bit in, its acpi-index out, once.
        hp.set_acpi_index(5 << 3, 7);
        hp.write(0x14, &(1u32 << 5).to_le_bytes());
        hp.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        hp.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        hp.write(0x14, &(1u32 << 6).to_le_bytes());
        hp.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "slot 6 has none");
        hp.set_acpi_index(5 << 3, 0);
        hp.write(0x14, &(1u32 << 5).to_le_bytes());
        hp.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "gone");
    }
}
