//! The exit path without KVM: fabricated [`VcpuExit`]s through [`handle_exit`] and an
//! [`IoBuses`] with eight devices mapped on each bus, so a lookup searches among eight
//! ranges (about what a microvm has on its PIO bus). This is the part of every PIO/MMIO exit
//! that Keel adds on top of the backend's own `KVM_RUN` (measured with KVM in
//! `benches/exit_path.rs`) or the interpreter.
//!
//! Run: `cargo bench --bench exit_dispatch` (add `-- --quick` for a short run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_accel::{BusDevice, ExitAction, IoBuses, MmioAddress, PioAddress, VcpuExit, handle_exit};

/// A register: reads return the last write, as a device's data register would.
#[derive(Default)]
struct Reg(AtomicU64);

impl BusDevice for Reg {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let v = self.0.load(Ordering::Relaxed).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v[..n]);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        self.0.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
}

/// Port ranges like a PC's (serial, RTC, i8042, PIC, PIT, debug exit, ...).
const PIO: [(u64, u64); 8] = [
    (0x20, 2),
    (0x40, 4),
    (0x60, 1),
    (0x70, 2),
    (0xa0, 2),
    (0xf4, 4),
    (0x3f8, 8),
    (0x510, 4),
];
/// MMIO windows like microvm's virtio-mmio transports (0x200 bytes each).
const MMIO_BASE: u64 = 0xfeb0_0000;
const MMIO_STRIDE: u64 = 0x200;

fn buses() -> IoBuses {
    let b = IoBuses::new();
    for (base, len) in PIO {
        b.pio.insert(base, len, Arc::new(Reg::default())).unwrap();
    }
    for i in 0..8 {
        b.mmio
            .insert(
                MMIO_BASE + i * MMIO_STRIDE,
                MMIO_STRIDE,
                Arc::new(Reg::default()),
            )
            .unwrap();
    }
    b
}

fn bench(c: &mut Criterion) {
    let b = buses();
    // The serial port's data register and the sixth virtio-mmio window's QueueNotify.
    let port = PioAddress(0x3f8);
    let addr = MmioAddress(MMIO_BASE + 5 * MMIO_STRIDE + 0x50);
    let exits = [
        ("pio_read", VcpuExit::IoIn { port, size: 1 }),
        (
            "pio_write",
            VcpuExit::IoOut {
                port,
                size: 1,
                data: 0x41,
            },
        ),
        ("mmio_read", VcpuExit::MmioRead { addr, size: 4 }),
        (
            "mmio_write",
            VcpuExit::MmioWrite {
                addr,
                size: 4,
                data: 1,
            },
        ),
        (
            "pio_read_unassigned",
            VcpuExit::IoIn {
                port: PioAddress(0x80),
                size: 1,
            },
        ),
    ];
    // Sanity: the writes land and the reads see them.
    assert_eq!(handle_exit(&exits[1].1, &b), ExitAction::Resume);
    assert_eq!(handle_exit(&exits[0].1, &b), ExitAction::CompleteRead(0x41));
    assert_eq!(handle_exit(&exits[3].1, &b), ExitAction::Resume);
    assert_eq!(handle_exit(&exits[2].1, &b), ExitAction::CompleteRead(1));

    let mut g = c.benchmark_group("exit_dispatch");
    for (name, exit) in &exits {
        g.bench_function(*name, |bench| {
            bench.iter(|| handle_exit(black_box(exit), black_box(&b)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
