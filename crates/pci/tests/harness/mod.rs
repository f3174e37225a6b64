//! Guest-controlled configuration-space access sequences against a small PCI machine:
//! config mechanism #1 (0xCF8/0xCFC, any port, any width), BAR windows, a virtio-pci
//! function with MSI-X and a multifunction slot, plus machine-side hot plug and reset.
//!
//! Shared by the fuzz target `fuzz/fuzz_targets/pci_config.rs` and the stable
//! `random_config` property test, so a crash found by one replays in the other.
//!
//! Checks: no panic; afterwards the functions still identify themselves, absent functions
//! read all ones, and every decoding BAR lies in the address space its kind allows.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::{Arc, Mutex};

use keel_accel::{GuestMemory, IoBuses, IrqLine, MmioAddress, PioAddress};
use keel_pci::*;

struct NoLine;
impl IrqLine for NoLine {
    fn set_level(&self, _high: bool) {}
}

struct NoSink;
impl MsiSink for NoSink {
    fn deliver(&self, _msg: MsiMessage) {}
}

const MEM32: (u64, u64) = (0xe000_0000, 0x1ec0_0000);
const IO: (u64, u64) = (0xc000, 0x4000);

fn virtio(mem: &Arc<GuestMemory>) -> Arc<VirtioPci> {
    let dev = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(3),
    ))));
    Arc::new(VirtioPci::new(dev, mem.clone(), Arc::new(NoLine), Arc::new(NoSink)).unwrap())
}

fn plain(multifunction: bool) -> Arc<PciFunction> {
    let mut c = PciConfig::new(PciIds {
        vendor: 0x1234,
        device: 0x11,
        ..PciIds::default()
    });
    c.add_bar(0, BarSpec::io(0x20)).unwrap();
    c.add_bar(2, BarSpec::mem64(0x2000, true)).unwrap();
    c.set_multifunction(multifunction);
    let _ = Msi::new(&mut c);
    Arc::new(PciFunction::new(c))
}

fn at(slot: u8, f: u8) -> PciAddress {
    PciAddress::new(slot % 32, f % 8).unwrap()
}

/// Runs one input: a sequence of operations, each an opcode byte and its arguments.
pub fn run(data: &[u8]) {
    let mem = Arc::new(GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap());
    let buses = IoBuses::new();
    let bus = Arc::new(PciBus::new());
    buses
        .pio
        .insert(
            0xcf8,
            CONFIG_IO_LEN,
            Arc::new(PciConfigIo::new(bus.clone())),
        )
        .unwrap();
    buses
        .pio
        .insert(IO.0, IO.1, bus.window(AddressSpace::Io, IO.0))
        .unwrap();
    buses
        .mmio
        .insert(MEM32.0, MEM32.1, bus.window(AddressSpace::Memory, MEM32.0))
        .unwrap();
    let mut alloc = BarAllocator::new(
        Window::new(IO.0, IO.1).unwrap(),
        Window::new(MEM32.0, MEM32.1).unwrap(),
        Window::new(1 << 36, 1 << 30),
    );
    let plug = |a: PciAddress, d: Arc<dyn PciDevice>, alloc: &mut BarAllocator| {
        if bus.add_function(a, d).is_ok() {
            let _ = bus.assign_bars(a, alloc);
        }
    };
    plug(at(0, 0), Arc::new(PciFunction::host_bridge()), &mut alloc);
    plug(at(3, 0), virtio(&mem), &mut alloc);
    plug(at(5, 0), plain(true), &mut alloc);
    plug(at(5, 3), plain(false), &mut alloc);

    let mut i = 0;
    let mut next = |n: usize| -> Option<&[u8]> {
        let s = data.get(i..i + n)?;
        i += n;
        Some(s)
    };
    let mut steps = 0;
    while let Some(&[op]) = next(1) {
        steps += 1;
        if steps > 4096 {
            break;
        }
        let width = |b: u8| [1usize, 2, 4, 8, 3, 0][usize::from(b % 6)];
        match op % 10 {
            // Port write in 0xCF8..0xD00.
            0 | 1 => {
                let Some(&[port, w, a, b, c, d]) = next(6) else {
                    break;
                };
                let v = [a, b, c, d, a, b, c, d];
                buses.pio_write(PioAddress(0xcf8 + u16::from(port % 8)), &v[..width(w)]);
            }
            // Port read.
            2 => {
                let Some(&[port, w]) = next(2) else { break };
                let mut buf = vec![0u8; width(w)];
                buses.pio_read(PioAddress(0xcf8 + u16::from(port % 8)), &mut buf);
            }
            // A whole config write: select then data, any register.
            3 | 4 => {
                let Some(&[devfn, reg, w, a, b, c, d]) = next(7) else {
                    break;
                };
                buses.pio_write(
                    PioAddress(0xcf8),
                    &(0x8000_0000u32 | u32::from(devfn) << 8 | u32::from(reg & 0xfc)).to_le_bytes(),
                );
                let v = [a, b, c, d];
                let n = width(w).min(4);
                let port = 0xcfc + u16::from(reg & 3);
                buses.pio_write(PioAddress(port), &v[..n]);
            }
            // MMIO in the 32-bit window, near where BARs get placed.
            5 | 6 => {
                let Some(&[o0, o1, o2, w, a, b]) = next(6) else {
                    break;
                };
                let off = u64::from(u32::from_le_bytes([o0, o1, o2, 0]) & 0x3_ffff);
                let v = [a, b, a, b, a, b, a, b];
                if op % 10 == 5 {
                    buses.mmio_write(MmioAddress(MEM32.0 + off), &v[..width(w)]);
                } else {
                    let mut buf = vec![0u8; width(w)];
                    buses.mmio_read(MmioAddress(MEM32.0 + off), &mut buf);
                }
            }
            // I/O window.
            7 => {
                let Some(&[o, w, a]) = next(3) else { break };
                buses.pio_write(PioAddress(IO.0 as u16 + u16::from(o)), &vec![a; width(w)]);
            }
            // Machine side: hot plug and unplug in staged mode.
            8 => {
                let Some(&[devfn, kind]) = next(2) else { break };
                bus.set_staged(kind & 0x80 != 0);
                // Slot 0 (the host bridge) stays.
                let a = PciAddress::from_devfn(devfn.max(8));
                if kind & 1 == 0 {
                    let d: Arc<dyn PciDevice> = match kind % 3 {
                        0 => virtio(&mem),
                        1 => plain(true),
                        _ => plain(false),
                    };
                    plug(a, d, &mut alloc);
                } else if kind & 2 == 0 {
                    bus.remove_function(a);
                    alloc.release(a);
                } else {
                    for (a, _) in bus.remove_slot(a.slot()) {
                        alloc.release(a);
                    }
                }
            }
            _ => {
                let Some(&[k]) = next(1) else { break };
                if k == 0 {
                    bus.reset();
                }
            }
        }
    }

    // Invariants.
    let mut id = [0u8; 4];
    buses.pio_write(PioAddress(0xcf8), &0x8000_0000u32.to_le_bytes());
    buses.pio_read(PioAddress(0xcfc), &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1237_8086, "host bridge");
    for devfn in 0..=255u8 {
        let a = PciAddress::from_devfn(devfn);
        let mut v = [0u8; 4];
        bus.config_read(a, 0, &mut v);
        if bus.visible(a).is_none() {
            assert_eq!(v, [0xff; 4], "hidden {a}");
        } else {
            assert_ne!(u16::from_le_bytes([v[0], v[1]]), 0xffff, "present {a}");
        }
    }
    for (_, r) in bus.regions() {
        let last = r.base + (r.size - 1);
        match r.kind {
            BarKind::Io => assert!(last <= 0xffff),
            BarKind::Memory32 { .. } => assert!(last < u64::from(u32::MAX)),
            BarKind::Memory64 { .. } => assert!(last < u64::MAX),
        }
        assert!(r.base != 0 && r.base % r.size == 0);
    }
}
