//! Test driver: guest memory, a recording IRQ line, and a driver-side view of a queue
//! (virtio-queue's `MockSplitQueue`) programmed through the MMIO registers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{BusDevice, GuestMemory, IrqLine};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::{MmioTransport, VirtioDevice};

pub(crate) const MEM_SIZE: usize = 16 << 20;
/// Data buffers live from here on; queues below.
pub(crate) const DATA: u64 = 0x10_0000;

pub(crate) fn memory() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

#[derive(Default)]
pub(crate) struct Line {
    pub(crate) level: AtomicBool,
    pub(crate) raises: AtomicUsize,
}

impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        if high {
            self.raises.fetch_add(1, Ordering::SeqCst);
        }
        self.level.store(high, Ordering::SeqCst);
    }
}

pub(crate) fn rd(t: &MmioTransport, off: u32) -> u32 {
    let mut d = [0u8; 4];
    t.read(u64::from(off), &mut d);
    u32::from_le_bytes(d)
}

pub(crate) fn wr(t: &MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

/// Driver-side queue: `MockSplitQueue` layout plus a free-running descriptor index.
pub(crate) struct TestQueue<'a> {
    pub(crate) vq: MockSplitQueue<'a, GuestMemory>,
    size: u16,
    next_desc: u16,
}

/// A buffer of a chain: address, length, device-writable.
pub(crate) type Buf = (u64, u32, bool);

impl<'a> TestQueue<'a> {
    pub(crate) fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
        Self {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            size,
            next_desc: 0,
        }
    }

    /// Writes raw descriptors at `index` (no linking done).
    pub(crate) fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.vq.desc_table().store(index, d).unwrap();
    }

    /// Publishes `head` on the available ring.
    pub(crate) fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Adds a linked chain and publishes it; returns its head.
    pub(crate) fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = (index + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(index, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    pub(crate) fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// (id, len) of used element `i`.
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(i % self.size))
            .unwrap()
            .load();
        (e.id(), e.len())
    }
}

/// Runs the Linux driver sequence: reset, ACK, DRIVER, features, FEATURES_OK, queues,
/// DRIVER_OK. Accepts every offered feature.
pub(crate) fn bring_up(t: &MmioTransport, queues: &[&TestQueue<'_>]) {
    wr(t, reg::VIRTIO_MMIO_STATUS, 0);
    wr(t, reg::VIRTIO_MMIO_STATUS, 1);
    wr(t, reg::VIRTIO_MMIO_STATUS, 3);
    for sel in 0..2 {
        wr(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        let f = rd(t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
        wr(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        wr(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, f);
    }
    wr(t, reg::VIRTIO_MMIO_STATUS, 0xb);
    assert_eq!(rd(t, reg::VIRTIO_MMIO_STATUS), 0xb, "FEATURES_OK refused");
    for (i, q) in queues.iter().enumerate() {
        wr(t, reg::VIRTIO_MMIO_QUEUE_SEL, i as u32);
        assert_eq!(rd(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(rd(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(q.size));
        wr(t, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        let (lo, hi) = split(q.vq.desc_table_addr());
        wr(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, lo);
        wr(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(q.vq.avail_addr());
        wr(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, lo);
        wr(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, hi);
        let (lo, hi) = split(q.vq.used_addr());
        wr(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, lo);
        wr(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, hi);
        wr(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    wr(t, reg::VIRTIO_MMIO_STATUS, 0xf);
}

/// A transport over `device`, with its memory and line.
pub(crate) fn transport<D: VirtioDevice + 'static>(
    device: D,
    mem: &Arc<GuestMemory>,
) -> (Arc<Mutex<D>>, MmioTransport, Arc<Line>) {
    let device = Arc::new(Mutex::new(device));
    let line = Arc::new(Line::default());
    let t = MmioTransport::new(device.clone(), Arc::clone(mem), line.clone());
    (device, t, line)
}

pub(crate) fn notify(t: &MmioTransport, queue: u32) {
    wr(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, queue);
}

pub(crate) fn needs_reset(t: &MmioTransport) -> bool {
    rd(t, reg::VIRTIO_MMIO_STATUS) & 0x40 != 0
}

pub(crate) fn fill(mem: &GuestMemory, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}

pub(crate) fn fetch(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
