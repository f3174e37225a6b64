//! virtio-blk request path through the MMIO transport: 16 reads of 64 KiB per notify from
//! a page-cached image, against plain `pread` of the same bytes into a buffer (the floor).
//! Run: `cargo bench -p keel-virtio --bench blk`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_accel::{BusDevice, GuestMemory, IrqLine};
use keel_virtio::{Block, BlockConfig, MmioTransport};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const REQS: u64 = 16;
const LEN: u32 = 64 * 1024;
const DATA: u64 = 0x10_0000;

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

fn w(t: &MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn bench(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("keel-virtio-bench-{}.img", std::process::id()));
    let image_len = REQS * u64::from(LEN);
    std::fs::write(&path, vec![0x5a; image_len as usize]).unwrap();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap());
    let block = Block::new(&BlockConfig::new(&path)).unwrap();
    let t = MmioTransport::new(
        Arc::new(Mutex::new(block)),
        Arc::clone(&mem),
        Arc::new(NoIrq),
    );
    let vq = MockSplitQueue::create(&*mem, GuestAddress(0), 256);
    // Driver bring-up.
    w(&t, 0x70, 1);
    w(&t, 0x70, 3);
    w(&t, 0x24, 1);
    w(&t, 0x20, 1);
    w(&t, 0x70, 0xb);
    w(&t, 0x38, 256);
    w(&t, 0x80, vq.desc_table_addr().0 as u32);
    w(&t, 0x90, vq.avail_addr().0 as u32);
    w(&t, 0xa0, vq.used_addr().0 as u32);
    w(&t, 0x44, 1);
    w(&t, 0x70, 0xf);
    // 16 chains: header, 64 KiB data, status.
    for r in 0..REQS {
        let hdr = DATA + r * 0x100;
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&(r * u64::from(LEN) / 512).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let i = (r * 3) as u16;
        let d = |idx: u16, addr: u64, len: u32, flags: u16| {
            vq.desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, idx + 1)),
                )
                .unwrap();
        };
        d(i, hdr, 16, 1);
        d(i + 1, DATA + 0x10_0000 + r * u64::from(LEN), LEN, 1 | 2);
        d(i + 2, hdr + 0x80, 1, 2);
    }
    let mut avail: u16 = 0;

    let mut g = c.benchmark_group("virtio_blk_read");
    g.throughput(Throughput::Bytes(image_len));
    g.bench_function("virtio_16x64KiB", |b| {
        b.iter(|| {
            for r in 0..REQS as u16 {
                vq.avail()
                    .ring()
                    .ref_at(usize::from(avail % 256))
                    .unwrap()
                    .store(r * 3);
                avail = avail.wrapping_add(1);
            }
            vq.avail().idx().store(avail);
            w(&t, 0x50, 0);
        })
    });
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; LEN as usize];
    g.bench_function("pread_16x64KiB", |b| {
        b.iter(|| {
            for r in 0..REQS {
                file.read_exact_at(&mut buf, r * u64::from(LEN)).unwrap();
            }
        })
    });
    g.finish();
    assert_eq!(vq.used().idx().load(), avail, "every request completed");
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench);
criterion_main!(benches);
