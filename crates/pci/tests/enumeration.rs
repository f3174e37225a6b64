//! Linux-like enumeration through ports 0xCF8/0xCFC: detection, scan, BAR sizing and
//! placement, enabling, window routing and the multifunction rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use keel_accel::BusDevice;
use keel_pci::*;

/// A register block that echoes the last write (for window routing).
#[derive(Default)]
struct Echo(Mutex<u32>);
impl BusDevice for Echo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = *self.0.lock().unwrap() + offset as u32;
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        *self.0.lock().unwrap() = u32::from_le_bytes(b);
    }
}

fn rng_pci() -> Arc<VirtioPci> {
    let mem = Arc::new(
        keel_accel::GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let dev = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(1),
    ))));
    Arc::new(
        VirtioPci::new(
            dev,
            mem,
            Arc::new(Line::default()),
            Arc::new(Sink::default()),
        )
        .unwrap(),
    )
}

#[test]
fn linux_enumeration_sequence() {
    let mut m = Machine::new();
    m.plug(addr(3, 0), rng_pci());
    m.plug(addr(5, 0), simple(true, true));
    m.plug(addr(5, 2), simple(false, false));
    // Function 1 of slot 6 without function 0: never found.
    m.bus
        .add_function(addr(6, 1), simple(false, false))
        .unwrap();

    // pci_check_type1: a byte write at 0xCFB must not disturb the address register.
    m.outb(0xcfb, 0x01);
    let saved = m.inl(0xcf8);
    m.outl(0xcf8, 0x8000_0000);
    assert_eq!(m.inl(0xcf8), 0x8000_0000);
    m.outl(0xcf8, saved);
    // pci_sanity_check: a host bridge on bus 0.
    assert_eq!(m.cfg_read16(addr(0, 0), 0x0a), 0x0600);

    assert_eq!(
        m.scan(),
        vec![addr(0, 0), addr(3, 0), addr(5, 0), addr(5, 2)]
    );
    // Ids of the virtio function: transitional virtio-rng as on QEMU's pc.
    let v = addr(3, 0);
    assert_eq!(m.cfg_read32(v, 0), 0x1005_1af4);
    assert_eq!(m.cfg_read32(v, 0x2c), 0x0004_1af4);
    assert_eq!(m.cfg_read32(v, 8) >> 8, 0x00ff00);
    assert_eq!(m.cfg_read8(v, 0x3d), 1, "INTA");
    // Disabled address register, other buses, odd widths: all ones.
    m.outl(0xcf8, u32::from(v.devfn()) << 8);
    assert_eq!(m.inl(0xcfc), u32::MAX);
    m.outl(0xcf8, 0x8001_0000);
    assert_eq!(m.inl(0xcfc), u32::MAX);
    m.outl(0xcf8, 0x8000_0000 | u32::from(v.devfn()) << 8);
    let mut three = [0u8; 3];
    m.buses.pio_read(keel_accel::PioAddress(0xcfc), &mut three);
    assert_eq!(three, [0xff; 3]);
    let mut two = [0u8; 2];
    m.buses.pio_read(keel_accel::PioAddress(0xcfe), &mut two);
    assert_eq!(u16::from_le_bytes(two), 0x1005, "device ID through 0xCFE");

    // BAR sizing: a transitional virtio-pci has BAR0 (I/O, the legacy header: 32 bytes for
    // rng), BAR1 (32-bit, 4 KiB) and BAR4/5 (64-bit prefetchable, 16 KiB).
    let bars = m.size_bars(v);
    let masks: Vec<u32> = bars.iter().map(|b| b.1).collect();
    assert_eq!(
        masks,
        vec![0xffff_ffe1, 0xffff_f000, 0, 0, 0xffff_c00c, 0xffff_ffff]
    );
    // Placed by the allocator inside the 32-bit window, naturally aligned, restored after
    // sizing.
    let bar1 = u64::from(bars[1].0 & !0xf);
    let bar4 = u64::from(bars[4].0 & !0xf) | u64::from(bars[5].0) << 32;
    for (base, size) in [(bar1, 0x1000), (bar4, 0x4000)] {
        assert!(base >= MEM32_WINDOW.0 && base + size <= MEM32_WINDOW.0 + MEM32_WINDOW.1);
        assert_eq!(base % size, 0);
    }
    assert_ne!(
        m.cfg_read16(v, 4) & 2,
        0,
        "memory decode on after placement"
    );
    // The I/O BAR of 05.0.
    let io = m.size_bars(addr(5, 0))[1];
    assert_eq!(io.1, 0xffff_ffe1);
    let io_base = u64::from(io.0 & !3);
    assert!(io_base >= IO_WINDOW.0 && io_base < IO_WINDOW.0 + IO_WINDOW.1);

    // Enable and talk to the device through its BAR: num_queues of the common config.
    m.cfg_write16(v, 4, 0x0006);
    let mut nq = [0u8; 2];
    m.mmio_read(bar4 + 0x12, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
    // Memory decode off: the BAR no longer answers.
    m.cfg_write16(v, 4, 0x0004);
    m.mmio_read(bar4 + 0x12, &mut nq);
    assert_eq!(nq, [0xff, 0xff]);
    m.cfg_write16(v, 4, 0x0006);

    // Function 6.1 is there but hidden; the bus knows.
    assert_eq!(m.bus.occupancy(6), 0b10);
    assert!(m.bus.visible(addr(6, 1)).is_none());
    assert_eq!(m.bus.exposed_slots(), 1 << 0 | 1 << 3 | 1 << 5);
}

#[test]
fn guest_moves_a_bar_and_the_observer_learns() {
    let mut m = Machine::new();
    let obs = Arc::new(Observer::default());
    m.bus.set_bar_observer(Some(obs.clone()));
    let mut c = PciConfig::new(PciIds {
        vendor: 0x1234,
        device: 1,
        ..PciIds::default()
    });
    c.add_bar(2, BarSpec::mem32(0x1000, false)).unwrap();
    let echo = Arc::new(Echo::default());
    let f = Arc::new(PciFunction::new(c).with_bar_device(2, echo));
    let a = addr(4, 0);
    m.plug(a, f);
    let events = obs.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    let (fa, old, new) = events[0];
    let placed = new.unwrap();
    assert_eq!((fa, old, placed.bar, placed.size), (a, None, 2, 0x1000));
    m.writel(placed.base, 0x100);
    assert_eq!(m.readl(placed.base + 4), 0x104);

    // The guest moves it.
    let target = 0xf000_0000u32;
    m.cfg_write32(a, 0x18, target);
    let events = obs.0.lock().unwrap().clone();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].1, Some(placed));
    assert_eq!(events[1].2.unwrap().base, u64::from(target));
    assert_eq!(m.readl(placed.base), u32::MAX, "old place is gone");
    assert_eq!(m.readl(u64::from(target) + 8), 0x108);
    // Decode off: unmapped event.
    m.cfg_write16(a, 4, 0);
    assert_eq!(obs.0.lock().unwrap().last().unwrap().2, None);
    // Removal drops the routes.
    m.cfg_write16(a, 4, 2);
    assert_eq!(m.bus.regions().len(), 1);
    m.bus.remove_function(a).unwrap();
    assert!(m.bus.regions().is_empty());
    assert_eq!(m.readl(u64::from(target)), u32::MAX);
    m.allocator.release(a);
}

#[test]
fn multifunction_rules_and_staged_hot_plug() {
    let m = Machine::new();
    let bus = &m.bus;
    // Cold: any order, function 0 decides visibility.
    bus.add_function(addr(2, 1), simple(false, false)).unwrap();
    assert_eq!(m.cfg_read32(addr(2, 1), 0), u32::MAX);
    assert!(matches!(
        bus.add_function(addr(2, 0), simple(false, false)),
        Err(PciError::NotMultifunction(_))
    ));
    bus.add_function(addr(2, 0), simple(true, false)).unwrap();
    assert_eq!(m.cfg_read32(addr(2, 1), 0), 0x5678_1234);
    bus.add_function(addr(2, 3), simple(false, false)).unwrap();
    assert!(matches!(
        bus.add_function(addr(2, 3), simple(false, false)),
        Err(PciError::Occupied(_))
    ));
    // A single-function slot takes no other function.
    bus.add_function(addr(3, 0), simple(false, false)).unwrap();
    assert!(matches!(
        bus.add_function(addr(3, 1), simple(false, false)),
        Err(PciError::NotMultifunction(_))
    ));

    // Staged (machine-ready): functions wait for function 0, then appear at once.
    bus.set_staged(true);
    bus.add_function(addr(6, 2), simple(false, false)).unwrap();
    bus.add_function(addr(6, 1), simple(false, false)).unwrap();
    assert_eq!(m.scan().iter().filter(|a| a.slot() == 6).count(), 0);
    assert_eq!(bus.occupancy(6), 0b110);
    assert_eq!(bus.exposed_slots() & 1 << 6, 0);
    bus.add_function(addr(6, 0), simple(true, false)).unwrap();
    assert_eq!(
        m.scan()
            .into_iter()
            .filter(|a| a.slot() == 6)
            .collect::<Vec<_>>(),
        vec![addr(6, 0), addr(6, 1), addr(6, 2)]
    );
    // Function 0 present: a late function cannot be exposed any more (QEMU refuses too).
    let e = bus
        .add_function(addr(6, 3), simple(false, false))
        .unwrap_err();
    assert!(matches!(e, PciError::SlotExposed(_)));
    assert_eq!(
        e.to_string(),
        "PCI: slot 6 function 0 already occupied, new function 3 cannot be exposed to guest"
    );
    // Eject: the whole slot goes.
    let gone = bus.remove_slot(6);
    assert_eq!(gone.len(), 3);
    assert_eq!(bus.occupancy(6), 0);
    assert_eq!(m.cfg_read32(addr(6, 0), 0), u32::MAX);
    // Removing function 0 hides the others (and their BARs).
    let mut m2 = Machine::new();
    m2.plug(addr(7, 0), simple(true, false));
    m2.plug(addr(7, 1), simple(false, false));
    assert_eq!(m2.bus.regions().len(), 2);
    m2.bus.remove_function(addr(7, 0));
    assert_eq!(m2.cfg_read32(addr(7, 1), 0), u32::MAX);
    assert!(m2.bus.regions().is_empty());
}

#[test]
fn reset_returns_functions_to_power_on() {
    let mut m = Machine::new();
    m.plug(addr(3, 0), rng_pci());
    assert_eq!(m.bus.regions().len(), 3, "BAR0 (I/O), BAR1, BAR4");
    m.bus.reset();
    assert!(m.bus.regions().is_empty(), "BARs unassigned after reset");
    assert_eq!(m.cfg_read16(addr(3, 0), 4), 0);
    assert_eq!(m.cfg_read32(addr(3, 0), 0), 0x1005_1af4);
}
