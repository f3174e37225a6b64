//! A guest's view of the machine for the tests: port and memory accesses through
//! `IoBuses`, config mechanism #1 as Linux drives it.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{IoBuses, IrqLine, MmioAddress, PioAddress};
use keel_pci::*;

pub const IO_WINDOW: (u64, u64) = (0xc000, 0x4000);
pub const MEM32_WINDOW: (u64, u64) = (0xe000_0000, 0x1ec0_0000);
pub const MEM64_WINDOW: (u64, u64) = (1 << 36, 1 << 36);

pub struct Machine {
    pub buses: IoBuses,
    pub bus: Arc<PciBus>,
    pub allocator: BarAllocator,
}

impl Machine {
    pub fn new() -> Self {
        let buses = IoBuses::new();
        let bus = Arc::new(PciBus::new());
        buses
            .pio
            .insert(
                u64::from(CONFIG_ADDRESS_PORT),
                CONFIG_IO_LEN,
                Arc::new(PciConfigIo::new(bus.clone())),
            )
            .unwrap();
        buses
            .pio
            .insert(
                IO_WINDOW.0,
                IO_WINDOW.1,
                bus.window(AddressSpace::Io, IO_WINDOW.0),
            )
            .unwrap();
        for w in [MEM32_WINDOW, MEM64_WINDOW] {
            buses
                .mmio
                .insert(w.0, w.1, bus.window(AddressSpace::Memory, w.0))
                .unwrap();
        }
        let allocator = BarAllocator::new(
            Window::new(IO_WINDOW.0, IO_WINDOW.1).unwrap(),
            Window::new(MEM32_WINDOW.0, MEM32_WINDOW.1).unwrap(),
            Window::new(MEM64_WINDOW.0, MEM64_WINDOW.1),
        );
        bus.add_function(addr(0, 0), Arc::new(PciFunction::host_bridge()))
            .unwrap();
        Self {
            buses,
            bus,
            allocator,
        }
    }

    /// Cold plug: add and place BARs as firmware would.
    pub fn plug(&mut self, a: PciAddress, dev: Arc<dyn PciDevice>) {
        self.bus.add_function(a, dev).unwrap();
        self.bus.assign_bars(a, &mut self.allocator).unwrap();
    }

    pub fn outl(&self, port: u16, v: u32) {
        self.buses.pio_write(PioAddress(port), &v.to_le_bytes());
    }
    pub fn outw(&self, port: u16, v: u16) {
        self.buses.pio_write(PioAddress(port), &v.to_le_bytes());
    }
    pub fn outb(&self, port: u16, v: u8) {
        self.buses.pio_write(PioAddress(port), &[v]);
    }
    pub fn inl(&self, port: u16) -> u32 {
        let mut d = [0u8; 4];
        self.buses.pio_read(PioAddress(port), &mut d);
        u32::from_le_bytes(d)
    }
    pub fn inw(&self, port: u16) -> u16 {
        let mut d = [0u8; 2];
        self.buses.pio_read(PioAddress(port), &mut d);
        u16::from_le_bytes(d)
    }
    pub fn inb(&self, port: u16) -> u8 {
        let mut d = [0u8; 1];
        self.buses.pio_read(PioAddress(port), &mut d);
        d[0]
    }

    fn select(&self, a: PciAddress, reg: u16) {
        self.outl(
            0xcf8,
            0x8000_0000 | u32::from(a.devfn()) << 8 | u32::from(reg & 0xfc),
        );
    }
    pub fn cfg_read32(&self, a: PciAddress, reg: u16) -> u32 {
        self.select(a, reg);
        self.inl(0xcfc)
    }
    pub fn cfg_read16(&self, a: PciAddress, reg: u16) -> u16 {
        self.select(a, reg);
        self.inw(0xcfc + (reg & 2))
    }
    pub fn cfg_read8(&self, a: PciAddress, reg: u16) -> u8 {
        self.select(a, reg);
        self.inb(0xcfc + (reg & 3))
    }
    pub fn cfg_write32(&self, a: PciAddress, reg: u16, v: u32) {
        self.select(a, reg);
        self.outl(0xcfc, v);
    }
    pub fn cfg_write16(&self, a: PciAddress, reg: u16, v: u16) {
        self.select(a, reg);
        self.outw(0xcfc + (reg & 2), v);
    }
    pub fn cfg_write8(&self, a: PciAddress, reg: u16, v: u8) {
        self.select(a, reg);
        self.outb(0xcfc + (reg & 3), v);
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.buses.mmio_read(MmioAddress(addr), data);
    }
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.buses.mmio_write(MmioAddress(addr), data);
    }
    pub fn readl(&self, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        self.mmio_read(addr, &mut d);
        u32::from_le_bytes(d)
    }
    pub fn writel(&self, addr: u64, v: u32) {
        self.mmio_write(addr, &v.to_le_bytes());
    }

    /// Linux's scan of bus 0: function 0 of each slot, then 1..7 if it is multifunction.
    pub fn scan(&self) -> Vec<PciAddress> {
        let mut found = Vec::new();
        for slot in 0..32 {
            let f0 = addr(slot, 0);
            if self.cfg_read32(f0, 0) & 0xffff == 0xffff {
                continue;
            }
            found.push(f0);
            if self.cfg_read8(f0, 0x0e) & 0x80 == 0 {
                continue;
            }
            for f in 1..8 {
                let a = addr(slot, f);
                if self.cfg_read32(a, 0) & 0xffff != 0xffff {
                    found.push(a);
                }
            }
        }
        found
    }

    /// Linux's BAR sizing (decode off while probing): (raw value, size mask) per BAR.
    pub fn size_bars(&self, a: PciAddress) -> Vec<(u32, u32)> {
        let cmd = self.cfg_read16(a, 4);
        self.cfg_write16(a, 4, cmd & !3);
        let mut out = Vec::new();
        for i in 0..6 {
            let reg = 0x10 + i * 4;
            let orig = self.cfg_read32(a, reg);
            self.cfg_write32(a, reg, 0xffff_ffff);
            let mask = self.cfg_read32(a, reg);
            self.cfg_write32(a, reg, orig);
            out.push((orig, mask));
        }
        self.cfg_write16(a, 4, cmd);
        out
    }

    /// Capabilities (offset, id) by walking the list.
    pub fn caps(&self, a: PciAddress) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        if self.cfg_read16(a, 6) & 0x10 == 0 {
            return out;
        }
        let mut p = self.cfg_read8(a, 0x34);
        while p != 0 && out.len() < 48 {
            out.push((p, self.cfg_read8(a, u16::from(p))));
            p = self.cfg_read8(a, u16::from(p) + 1);
        }
        out
    }
}

pub fn addr(slot: u8, function: u8) -> PciAddress {
    PciAddress::new(slot, function).unwrap()
}

#[derive(Default)]
pub struct Sink(pub Mutex<Vec<MsiMessage>>);
impl MsiSink for Sink {
    fn deliver(&self, msg: MsiMessage) {
        self.0.lock().unwrap().push(msg);
    }
}

#[derive(Default)]
pub struct Line {
    pub level: AtomicBool,
    pub raises: AtomicUsize,
}
impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        if high {
            self.raises.fetch_add(1, Ordering::SeqCst);
        }
        self.level.store(high, Ordering::SeqCst);
    }
}

/// One observed change: function, old region, new region.
pub type BarChange = (PciAddress, Option<BarRegion>, Option<BarRegion>);

#[derive(Default)]
pub struct Observer(pub Mutex<Vec<BarChange>>);
impl BarObserver for Observer {
    fn bar_changed(&self, f: PciAddress, old: Option<BarRegion>, new: Option<BarRegion>) {
        self.0.lock().unwrap().push((f, old, new));
    }
}

/// A simple function with one 32-bit memory BAR of 4 KiB (and optionally an I/O BAR).
pub fn simple(multifunction: bool, io: bool) -> Arc<PciFunction> {
    let mut c = PciConfig::new(PciIds {
        vendor: 0x1234,
        device: 0x5678,
        class: 0xff_00_00,
        ..PciIds::default()
    });
    c.add_bar(0, BarSpec::mem32(0x1000, false)).unwrap();
    if io {
        c.add_bar(1, BarSpec::io(0x20)).unwrap();
    }
    c.set_multifunction(multifunction);
    Arc::new(PciFunction::new(c))
}
