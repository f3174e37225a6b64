//! A virtio-pci device driven end to end as Linux's modern driver does, through its
//! capabilities, over fake guest memory: features, a queue, a notify, the used ring and
//! the MSI-X message; then the INTx + ISR fallback with MSI-X off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::*;
use keel_accel::GuestMemory;
use keel_pci::*;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const DATA: u64 = 0x10_0000;

/// What the driver learns from the vendor capabilities: (cfg_type → BAR address).
struct Caps {
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    multiplier: u32,
    msix_cap: u8,
    msix_table: u64,
    msix_pba: u64,
}

fn bar_address(m: &Machine, a: PciAddress, bar: u8) -> u64 {
    let lo = m.cfg_read32(a, 0x10 + u16::from(bar) * 4);
    if lo & 1 == 1 {
        return u64::from(lo & !3);
    }
    let mut base = u64::from(lo & !0xf);
    if lo & 0x6 == 0x4 {
        base |= u64::from(m.cfg_read32(a, 0x10 + u16::from(bar) * 4 + 4)) << 32;
    }
    base
}

fn discover(m: &Machine, a: PciAddress) -> Caps {
    let mut c = Caps {
        common: 0,
        isr: 0,
        device: 0,
        notify: 0,
        multiplier: 0,
        msix_cap: 0,
        msix_table: 0,
        msix_pba: 0,
    };
    let mut types = Vec::new();
    for (off, id) in m.caps(a) {
        let off = u16::from(off);
        match id {
            0x09 => {
                let cfg_type = m.cfg_read8(a, off + 3);
                let bar = m.cfg_read8(a, off + 4);
                let offset = u64::from(m.cfg_read32(a, off + 8));
                let length = m.cfg_read32(a, off + 12);
                types.push(cfg_type);
                if cfg_type == 5 {
                    continue;
                }
                assert!(length >= 1);
                let at = bar_address(m, a, bar) + offset;
                match cfg_type {
                    1 => c.common = at,
                    2 => {
                        c.notify = at;
                        assert_eq!(m.cfg_read8(a, off + 2), 20, "notify cap length");
                        c.multiplier = m.cfg_read32(a, off + 16);
                    }
                    3 => c.isr = at,
                    4 => c.device = at,
                    t => panic!("unknown virtio cap type {t}"),
                }
            }
            0x11 => {
                c.msix_cap = off as u8;
                let table = m.cfg_read32(a, off + 4);
                let pba = m.cfg_read32(a, off + 8);
                c.msix_table = bar_address(m, a, (table & 7) as u8) + u64::from(table & !7);
                c.msix_pba = bar_address(m, a, (pba & 7) as u8) + u64::from(pba & !7);
            }
            id => panic!("unexpected capability {id:#x}"),
        }
    }
    assert_eq!(
        types,
        vec![5, 2, 4, 3, 1],
        "PCI cfg, notify, device, ISR, common: QEMU's order (each added at the head)"
    );
    c
}

fn w8(m: &Machine, a: u64, v: u8) {
    m.mmio_write(a, &[v]);
}
fn r8(m: &Machine, a: u64) -> u8 {
    let mut d = [0u8];
    m.mmio_read(a, &mut d);
    d[0]
}
fn w16(m: &Machine, a: u64, v: u16) {
    m.mmio_write(a, &v.to_le_bytes());
}
fn r16(m: &Machine, a: u64) -> u16 {
    let mut d = [0u8; 2];
    m.mmio_read(a, &mut d);
    u16::from_le_bytes(d)
}

struct Fixture {
    m: Machine,
    a: PciAddress,
    caps: Caps,
    sink: Arc<Sink>,
    line: Arc<Line>,
    mem: Arc<GuestMemory>,
    transport: Arc<VirtioPci>,
}

fn fixture() -> Fixture {
    let mut m = Machine::new();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let sink = Arc::new(Sink::default());
    let line = Arc::new(Line::default());
    let dev = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(7),
    ))));
    let transport = Arc::new(VirtioPci::new(dev, mem.clone(), line.clone(), sink.clone()).unwrap());
    let a = addr(4, 0);
    m.plug(a, transport.clone());
    // pci_enable_device + pci_set_master.
    m.cfg_write16(a, 4, 0x0006);
    let caps = discover(&m, a);
    Fixture {
        m,
        a,
        caps,
        sink,
        line,
        mem,
        transport,
    }
}

/// Linux's vp_modern setup for one queue of `size` using the mock's ring addresses.
fn bring_up(f: &Fixture, vq: &MockSplitQueue<'_, GuestMemory>, size: u16, vector: u16) {
    let (m, c) = (&f.m, f.caps.common);
    w8(m, c + 0x14, 0);
    assert_eq!(r8(m, c + 0x14), 0);
    w8(m, c + 0x14, 1);
    w8(m, c + 0x14, 3);
    m.writel(c, 0);
    let lo = m.readl(c + 4);
    m.writel(c, 1);
    let hi = m.readl(c + 4);
    assert_eq!(hi & 1, 1, "VERSION_1 offered");
    m.writel(c + 8, 0);
    m.writel(c + 0xc, lo);
    m.writel(c + 8, 1);
    m.writel(c + 0xc, hi);
    w8(m, c + 0x14, 0xb);
    assert_eq!(r8(m, c + 0x14), 0xb, "FEATURES_OK accepted");
    // Config vector.
    w16(m, c + 0x10, 0);
    assert_eq!(r16(m, c + 0x10), 0);
    assert_eq!(r16(m, c + 0x12), 1, "num_queues");
    w16(m, c + 0x16, 0);
    assert_eq!(
        r16(m, c + 0x18),
        8,
        "queue_size starts at the maximum (QEMU's rng: 8)"
    );
    w16(m, c + 0x18, size);
    w16(m, c + 0x1a, vector);
    assert_eq!(r16(m, c + 0x1a), vector);
    // 64-bit fields as two 32-bit halves (vp_iowrite64_twopart).
    for (off, a) in [
        (0x20, vq.desc_table_addr()),
        (0x28, vq.avail_addr()),
        (0x30, vq.used_addr()),
    ] {
        m.writel(c + off, a.0 as u32);
        m.writel(c + off + 4, (a.0 >> 32) as u32);
    }
    w16(m, c + 0x1c, 1);
    assert_eq!(r16(m, c + 0x1c), 1);
    assert_eq!(r16(m, c + 0x1e), 0, "queue_notify_off");
    w8(m, c + 0x14, 0xf);
    assert_eq!(r8(m, c + 0x14), 0xf);
}

fn add_buffer(vq: &MockSplitQueue<'_, GuestMemory>, slot: u16, addr: u64, len: u32) {
    let d = RawDescriptor::from(Descriptor::new(addr, len, 2 /* WRITE */, 0));
    vq.desc_table().store(slot, d).unwrap();
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % 8))
        .unwrap()
        .store(slot);
    vq.avail().idx().store(idx.wrapping_add(1));
}

#[test]
fn msix_request_round_trip() {
    let f = fixture();
    let m = &f.m;
    // MSI-X: enable with the function masked, program vectors, unmask (Linux's order).
    let ctrl = u16::from(f.caps.msix_cap) + 2;
    assert_eq!(m.cfg_read16(f.a, ctrl) & 0x7ff, 1, "two vectors");
    m.cfg_write16(f.a, ctrl, 0xc000);
    for (v, data) in [(0u64, 0x30u32), (1, 0x31)] {
        let e = f.caps.msix_table + v * 16;
        m.writel(e, 0xfee0_0000);
        m.writel(e + 4, 0);
        m.writel(e + 8, data);
        m.writel(e + 12, 0);
    }
    m.cfg_write16(f.a, ctrl, 0x8000);

    let vq = MockSplitQueue::create(&*f.mem, GuestAddress(0x1000), 8);
    bring_up(&f, &vq, 8, 1);
    add_buffer(&vq, 0, DATA, 8);
    // Notify queue 0 at notify + 0 * multiplier.
    assert_eq!(f.caps.multiplier, 4);
    w16(m, f.caps.notify, 0);
    assert_eq!(vq.used().idx().load(), 1);
    let e = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 8));
    let mut buf = [0u8; 8];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [7; 8]);
    assert_eq!(
        f.sink.0.lock().unwrap().as_slice(),
        &[MsiMessage {
            address: 0xfee0_0000,
            data: 0x31
        }]
    );
    assert!(!f.line.level.load(Ordering::SeqCst), "no INTx with MSI-X");
    assert_eq!(r8(m, f.caps.isr), 0);

    // Masked vector: pending bit, delivered on unmask.
    m.writel(f.caps.msix_table + 16 + 12, 1);
    add_buffer(&vq, 1, DATA + 8, 8);
    w16(m, f.caps.notify, 0);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(f.sink.0.lock().unwrap().len(), 1);
    assert_eq!(m.readl(f.caps.msix_pba) & 0b10, 0b10);
    m.writel(f.caps.msix_table + 16 + 12, 0);
    assert_eq!(f.sink.0.lock().unwrap().len(), 2);
    assert_eq!(m.readl(f.caps.msix_pba), 0);

    // A notify through the hook instead of inline.
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    f.transport
        .set_notify_hook(Some(Arc::new(move |q| h.lock().unwrap().push(q))));
    w16(m, f.caps.notify, 0);
    assert_eq!(hits.lock().unwrap().as_slice(), &[0]);
    assert_eq!(f.transport.notify_address(0), Some(f.caps.notify));
    assert_eq!(f.transport.notify_address(1), None);

    // Reset through the status byte: vectors back to NO_VECTOR.
    w8(m, f.caps.common + 0x14, 0);
    assert_eq!(r16(m, f.caps.common + 0x10), NO_VECTOR);
    w16(m, f.caps.common + 0x16, 0);
    assert_eq!(r16(m, f.caps.common + 0x1a), NO_VECTOR);
    // Vector numbers past the table are refused.
    w16(m, f.caps.common + 0x10, 9);
    assert_eq!(r16(m, f.caps.common + 0x10), NO_VECTOR);
}

#[test]
fn intx_and_isr_without_msix() {
    let f = fixture();
    let m = &f.m;
    let vq = MockSplitQueue::create(&*f.mem, GuestAddress(0x1000), 8);
    bring_up(&f, &vq, 8, NO_VECTOR);
    add_buffer(&vq, 0, DATA, 4);
    w16(m, f.caps.notify, 0);
    assert_eq!(vq.used().idx().load(), 1);
    assert!(f.line.level.load(Ordering::SeqCst), "INTx asserted");
    assert_ne!(m.cfg_read16(f.a, 6) & 0x8, 0, "status shows the interrupt");
    // INTx disable in the command register lowers the line, keeps the status.
    m.cfg_write16(f.a, 4, 0x0406);
    assert!(!f.line.level.load(Ordering::SeqCst));
    m.cfg_write16(f.a, 4, 0x0006);
    assert!(f.line.level.load(Ordering::SeqCst));
    // Reading the ISR acknowledges.
    assert_eq!(r8(m, f.caps.isr), 1);
    assert!(!f.line.level.load(Ordering::SeqCst));
    assert_eq!(r8(m, f.caps.isr), 0);
    assert!(f.sink.0.lock().unwrap().is_empty());
    // MSI-X enabled but the queue has no vector: nothing at all.
    let ctrl = u16::from(f.caps.msix_cap) + 2;
    m.cfg_write16(f.a, ctrl, 0x8000);
    add_buffer(&vq, 1, DATA, 4);
    w16(m, f.caps.notify, 0);
    assert_eq!(vq.used().idx().load(), 2);
    assert!(!f.line.level.load(Ordering::SeqCst));
    assert!(f.sink.0.lock().unwrap().is_empty());
}

#[test]
fn config_access_capability_reaches_the_bar() {
    let f = fixture();
    let m = &f.m;
    let cap = m
        .caps(f.a)
        .into_iter()
        .find(|&(off, id)| id == 9 && m.cfg_read8(f.a, u16::from(off) + 3) == 5)
        .map(|(off, _)| u16::from(off))
        .unwrap();
    // Read num_queues (common config + 0x12) through the window: bar 4, 2 bytes.
    m.cfg_write8(f.a, cap + 4, 4);
    m.cfg_write32(f.a, cap + 8, 0x12);
    m.cfg_write32(f.a, cap + 12, 2);
    assert_eq!(m.cfg_read32(f.a, cap + 16) & 0xffff, 1);
    // Write the device status through it: ACKNOWLEDGE.
    m.cfg_write32(f.a, cap + 8, 0x14);
    m.cfg_write32(f.a, cap + 12, 1);
    m.cfg_write32(f.a, cap + 16, 1);
    assert_eq!(r8(m, f.caps.common + 0x14), 1);
    assert_eq!(f.transport.status(), 1);
}

#[test]
fn device_config_and_odd_accesses() {
    let f = fixture();
    let m = &f.m;
    // rng has no device config: reads zero at any width.
    assert_eq!(m.readl(f.caps.device), 0);
    let mut odd = [0xaau8; 3];
    m.mmio_read(f.caps.common, &mut odd);
    assert_eq!(odd, [0, 0, 0], "device_feature_select reads 0 byte-wise");
    // Garbage writes anywhere in the BARs leave the device answering.
    for off in (0..0x4000u64).step_by(7) {
        m.mmio_write(f.caps.common + off, &[0xff; 3]);
    }
    for off in (0..0x1000u64).step_by(5) {
        m.mmio_write(f.caps.msix_table + off, &[0x55; 6]);
    }
    assert_eq!(r16(m, f.caps.common + 0x12), 1);
    assert_eq!(m.cfg_read32(f.a, 0), 0x1005_1af4);
}

/// The legacy interface in BAR0 as Linux's virtio_pci_legacy drives it: the header's
/// registers at their virtio 0.9.5 offsets, a queue given by page number with the rings at
/// 4 KiB alignment, a notify, the used ring, the ISR; with MSI-X enabled the vectors at
/// 0x14/0x16 and the device configuration moving from 0x14 to 0x18. Legacy only
/// (`disable-modern=on`): no BAR4 and no virtio capability.
#[test]
fn legacy_interface_register_layout() {
    let mut m = Machine::new();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let sink = Arc::new(Sink::default());
    let line = Arc::new(Line::default());
    let dev = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(7),
    ))));
    let interfaces = Interfaces {
        legacy: true,
        modern: false,
    };
    let t = Arc::new(
        VirtioPci::with_interfaces(dev, mem.clone(), line.clone(), sink.clone(), interfaces)
            .unwrap(),
    );
    let a = addr(5, 0);
    m.plug(a, t.clone());
    m.cfg_write16(a, 4, 0x0005); // I/O decoding, bus master
    assert_eq!(m.cfg_read32(a, 0), 0x1005_1af4, "transitional rng");
    assert_eq!(m.cfg_read8(a, 8), 0, "revision 0: legacy ABI");
    let sizes = m.size_bars(a);
    assert_eq!(sizes[0].1 & 0x1, 1, "BAR0 is I/O");
    assert_eq!(
        !(sizes[0].1 & !0x3) + 1,
        32,
        "24-byte header, no config: 32"
    );
    assert_eq!(sizes[4], (0, 0), "no BAR4");
    assert!(
        m.caps(a).iter().all(|&(_, id)| id != 0x09),
        "no virtio capability"
    );
    let io = u16::try_from(m.cfg_read32(a, 0x10) & !0x3).unwrap();
    assert!(io != 0);

    // The low word of the features only: VERSION_1 (bit 32) is not visible here.
    let features = m.inl(io);
    // Reset, ACKNOWLEDGE, DRIVER, features, queue 0.
    m.outb(io + 0x12, 0);
    m.outb(io + 0x12, 1);
    m.outb(io + 0x12, 3);
    m.outl(io + 0x04, features);
    assert_eq!(m.inl(io + 0x04), features);
    m.outw(io + 0x0e, 0);
    let num = m.inw(io + 0x0c);
    assert_eq!(num, 8, "legacy queue size is the maximum");
    assert_eq!(m.inl(io + 0x08), 0, "queue not active");
    m.outw(io + 0x0e, 1);
    assert_eq!(m.inw(io + 0x0c), 0, "no queue 1");
    m.outw(io + 0x0e, 0);
    // The legacy ring layout: descriptors at the page, the available ring right after
    // them, the used ring at the next 4 KiB boundary.
    let desc = 0x4000u64;
    let avail = desc + 16 * u64::from(num);
    let used = (avail + 6 + 2 * u64::from(num)).next_multiple_of(4096);
    assert_eq!((avail, used), (0x4080, 0x5000));
    m.outl(io + 0x08, (desc >> 12) as u32);
    assert_eq!(m.inl(io + 0x08), 4);
    m.outb(io + 0x12, 7);
    assert_eq!(m.inb(io + 0x12), 7, "DRIVER_OK without FEATURES_OK");
    // One 4-byte device-writable buffer in descriptor 0, made available.
    mem.write_obj(DATA, GuestAddress(desc)).unwrap();
    mem.write_obj(4u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    m.outw(io + 0x10, 0);
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(used_idx, 1);
    let used_len: u32 = mem.read_obj(GuestAddress(used + 8)).unwrap();
    assert_eq!(used_len, 4);
    let mut got = [0u8; 4];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [7; 4]);
    assert!(line.level.load(Ordering::SeqCst), "INTx");
    assert_eq!(m.inb(io + 0x13), 1, "ISR: used buffer");
    assert!(!line.level.load(Ordering::SeqCst));
    assert_eq!(m.inb(io + 0x13), 0);

    // MSI-X on: vectors at 0x14/0x16, read back as Linux checks them.
    let msix = m.caps(a).into_iter().find(|&(_, id)| id == 0x11).unwrap().0;
    m.cfg_write16(a, u16::from(msix) + 2, 0x8000);
    m.outw(io + 0x14, 0);
    assert_eq!(m.inw(io + 0x14), 0);
    m.outw(io + 0x16, 1);
    assert_eq!(m.inw(io + 0x16), 1);
    m.outw(io + 0x16, 7);
    assert_eq!(m.inw(io + 0x16), NO_VECTOR, "no vector 7");
    // PFN 0 resets the device.
    m.outl(io + 0x08, 0);
    assert_eq!(m.inb(io + 0x12), 0);
    assert_eq!(t.status(), 0);
}

/// virtio-blk's legacy BAR holds its 60-byte configuration after the header: 128 bytes;
/// the capacity reads at 0x14 with MSI-X off. Modern only has the virtio 1.0 IDs.
#[test]
fn legacy_config_of_blk_and_modern_only_ids() {
    let mut m = Machine::new();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let img = std::env::temp_dir().join(format!("keel-pci-legacy-{}", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let blk = keel_virtio::Block::new(&keel_virtio::BlockConfig::new(&img)).unwrap();
    std::fs::remove_file(&img).ok();
    let t = Arc::new(
        VirtioPci::new(
            Arc::new(Mutex::new(blk)),
            mem.clone(),
            Arc::new(Line::default()),
            Arc::new(Sink::default()),
        )
        .unwrap(),
    );
    let a = addr(6, 0);
    m.plug(a, t);
    m.cfg_write16(a, 4, 0x0007);
    let sizes = m.size_bars(a);
    assert_eq!(!(sizes[0].1 & !0x3) + 1, 128);
    assert_ne!(sizes[4], (0, 0), "transitional: BAR4 too");
    let io = u16::try_from(m.cfg_read32(a, 0x10) & !0x3).unwrap();
    assert_eq!(m.inl(io + 0x14), 2048, "capacity in sectors");

    let rng = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(1),
    ))));
    let t = VirtioPci::with_interfaces(
        rng.clone(),
        mem.clone(),
        Arc::new(Line::default()),
        Arc::new(Sink::default()),
        Interfaces::MODERN,
    )
    .unwrap();
    let mut id = [0u8; 4];
    t.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
    let mut sub = [0u8; 2];
    t.config_read(0x2e, &mut sub);
    assert_eq!(u16::from_le_bytes(sub), 0x1100);
    let neither = Interfaces {
        legacy: false,
        modern: false,
    };
    let e = VirtioPci::with_interfaces(
        rng,
        mem,
        Arc::new(Line::default()),
        Arc::new(Sink::default()),
        neither,
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("device cannot work as neither"),
        "{e}"
    );
}

/// A function like the fixture's over the same guest memory (what a restored machine has:
/// the RAM was copied), on a fresh bus with its BARs not placed.
fn fresh_destination(f: &Fixture) -> (Machine, Arc<VirtioPci>, Arc<Sink>, Arc<Line>) {
    let m = Machine::new();
    let sink = Arc::new(Sink::default());
    let line = Arc::new(Line::default());
    let dev = Arc::new(Mutex::new(keel_virtio::Rng::with_source(Box::new(
        std::io::repeat(9),
    ))));
    let t = Arc::new(VirtioPci::new(dev, f.mem.clone(), line.clone(), sink.clone()).unwrap());
    m.bus.add_function(f.a, t.clone()).unwrap();
    (m, t, sink, line)
}

/// A snapshot of a running MSI-X device with a masked, pending vector moves into a fresh
/// function: the BARs decode where the guest put them once the bus refreshed its routes,
/// the common configuration reads back the same, the pending message goes out when the
/// guest unmasks it, and the next request continues the ring where it stood.
#[test]
fn snapshot_restores_queues_vectors_and_msix_into_a_fresh_function() {
    let f = fixture();
    let m = &f.m;
    let ctrl = u16::from(f.caps.msix_cap) + 2;
    m.cfg_write16(f.a, ctrl, 0xc000);
    for (v, data) in [(0u64, 0x30u32), (1, 0x31)] {
        let e = f.caps.msix_table + v * 16;
        m.writel(e, 0xfee0_0000);
        m.writel(e + 4, 0);
        m.writel(e + 8, data);
        m.writel(e + 12, 0);
    }
    m.cfg_write16(f.a, ctrl, 0x8000);
    let vq = MockSplitQueue::create(&*f.mem, GuestAddress(0x1000), 8);
    bring_up(&f, &vq, 8, 1);
    add_buffer(&vq, 0, DATA, 8);
    w16(m, f.caps.notify, 0);
    // Vector 1 masked: the second completion leaves its message pending.
    m.writel(f.caps.msix_table + 16 + 12, 1);
    add_buffer(&vq, 1, DATA + 8, 8);
    w16(m, f.caps.notify, 0);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(m.readl(f.caps.msix_pba), 0b10);
    let cfg_before: Vec<u32> = (0..64).map(|r| m.cfg_read32(f.a, r * 4)).collect();
    let common_before: Vec<u32> = (0..14).map(|r| m.readl(f.caps.common + r * 4)).collect();

    f.transport.quiesce();
    let saved = f.transport.save_state().unwrap();
    let (d, t, sink, line) = fresh_destination(&f);
    assert!(
        d.readl(f.caps.common) == u32::MAX,
        "nothing decodes before the restore"
    );
    t.check_state(&saved).unwrap();
    t.restore_state(&saved).unwrap();
    d.bus.refresh_routes(f.a.slot());
    let cfg_after: Vec<u32> = (0..64).map(|r| d.cfg_read32(f.a, r * 4)).collect();
    assert_eq!(cfg_after, cfg_before, "configuration space");
    let common_after: Vec<u32> = (0..14).map(|r| d.readl(f.caps.common + r * 4)).collect();
    assert_eq!(common_after, common_before, "common configuration");
    assert_eq!(d.readl(f.caps.msix_pba), 0b10, "the pending bit");
    assert!(sink.0.lock().unwrap().is_empty());
    d.writel(f.caps.msix_table + 16 + 12, 0);
    assert_eq!(
        sink.0.lock().unwrap().as_slice(),
        &[MsiMessage {
            address: 0xfee0_0000,
            data: 0x31
        }],
        "the pending message goes out on unmask"
    );
    add_buffer(&vq, 2, DATA + 16, 8);
    w16(&d, f.caps.notify, 0);
    assert_eq!(
        vq.used().idx().load(),
        3,
        "the ring continues where it stood"
    );
    let e = vq.used().ring().ref_at(2).unwrap().load();
    assert_eq!((e.id(), e.len()), (2, 8));
    let mut buf = [0u8; 8];
    f.mem.read_slice(&mut buf, GuestAddress(DATA + 16)).unwrap();
    assert_eq!(buf, [9; 8], "served by the destination's device");
    assert_eq!(sink.0.lock().unwrap().len(), 2);
    assert!(!line.level.load(Ordering::SeqCst));

    // States that do not fit are refused before anything changes.
    let plain = PciFunction::host_bridge();
    assert!(matches!(
        plain.check_state(&saved),
        Err(PciError::StateMismatch(_))
    ));
    assert!(matches!(
        t.check_state(&plain.save_state().unwrap()),
        Err(PciError::StateMismatch(_))
    ));
    assert!(matches!(
        t.check_state(&saved[..saved.len() / 2]),
        Err(PciError::StateMismatch(_))
    ));
}

/// Without MSI-X an interrupt the guest has not acknowledged yet is still asserted after a
/// restore (INTx level and ISR), and reading the ISR lowers it as before.
#[test]
fn snapshot_reasserts_intx_with_the_isr() {
    let f = fixture();
    let m = &f.m;
    let vq = MockSplitQueue::create(&*f.mem, GuestAddress(0x1000), 8);
    bring_up(&f, &vq, 8, NO_VECTOR);
    add_buffer(&vq, 0, DATA, 8);
    w16(m, f.caps.notify, 0);
    assert!(f.line.level.load(Ordering::SeqCst));
    let saved = f.transport.save_state().unwrap();
    let (d, t, _sink, line) = fresh_destination(&f);
    t.restore_state(&saved).unwrap();
    d.bus.refresh_routes(f.a.slot());
    assert!(line.level.load(Ordering::SeqCst), "INTx asserted again");
    assert_eq!(d.cfg_read16(f.a, 6) & 0x8, 0x8, "status interrupt bit");
    assert_eq!(r8(&d, f.caps.isr), 1);
    assert!(!line.level.load(Ordering::SeqCst));
}

/// A device that does not implement the snapshot methods says so: `migrate` can then name
/// it instead of writing a stream without its state.
#[test]
fn a_function_without_snapshot_support_cannot_be_saved() {
    struct Opaque;
    impl PciDevice for Opaque {
        fn config_read(&self, _offset: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&self, _offset: u16, _data: &[u8]) {}
        fn bar_regions(&self) -> Vec<BarRegion> {
            Vec::new()
        }
        fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn assign_bars(&self, _owner: PciAddress, _a: &mut BarAllocator) -> Result<(), PciError> {
            Ok(())
        }
        fn reset(&self) {}
    }
    assert_eq!(Opaque.save_state(), Err(PciError::NotSaveable));
    assert_eq!(Opaque.check_state(&[]), Err(PciError::NotSaveable));
}

/// A saved state changed anywhere (every byte flipped in turn, and every truncation) is
/// either refused or restored without a panic, and the function still answers the guest:
/// a stream is hostile input.
#[test]
fn damaged_states_are_refused_or_restored_safely() {
    let f = fixture();
    let vq = MockSplitQueue::create(&*f.mem, GuestAddress(0x1000), 8);
    bring_up(&f, &vq, 8, NO_VECTOR);
    add_buffer(&vq, 0, DATA, 8);
    w16(&f.m, f.caps.notify, 0);
    let saved = f.transport.save_state().unwrap();
    let (d, t, _sink, _line) = fresh_destination(&f);
    let mut refused = 0;
    for at in 0..saved.len() {
        for bit in [0x01u8, 0x80] {
            let mut s = saved.clone();
            s[at] ^= bit;
            match t.check_state(&s) {
                Ok(()) => t.restore_state(&s).unwrap(),
                Err(_) => {
                    refused += 1;
                    assert!(t.restore_state(&s).is_err());
                }
            }
            d.bus.refresh_routes(f.a.slot());
            assert_eq!(d.cfg_read32(f.a, 0), 0x1005_1af4, "flip at {at}");
            let _ = d.readl(f.caps.common + 0x14);
            w16(&d, f.caps.notify, 0);
        }
    }
    for cut in 0..saved.len() {
        assert!(t.check_state(&saved[..cut]).is_err(), "cut at {cut}");
    }
    assert!(refused > 0);
}
