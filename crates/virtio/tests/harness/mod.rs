//! Drives a virtio device through its MMIO transport with guest memory and rings built
//! from arbitrary bytes, the way a hostile guest could. Shared by the `random_rings`
//! integration test (stable, in CI) and the cargo-fuzz target in `fuzz/` (nightly).
//! Only the crate's public API is used.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, OnceLock};

use keel_accel::{BusDevice, GuestMemory, IrqLine};
use keel_virtio::{Block, Console, MmioTransport, Net, NetBackend, NetConfig, Rng, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x2_0000;
const QUEUE_STRIDE: u64 = 0x4000;

struct NullLine;
impl IrqLine for NullLine {
    fn set_level(&self, _high: bool) {}
}

/// Frames handed to the device on receive; transmitted frames are dropped.
struct FakeBackend(VecDeque<Vec<u8>>);
impl NetBackend for FakeBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A 64-sector scratch image, unlinked at once so nothing is left behind.
fn disk() -> &'static File {
    static DISK: OnceLock<File> = OnceLock::new();
    DISK.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("keel-virtio-fuzz-{}.img", std::process::id()));
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    })
}

/// Byte source that never runs dry (wraps around, zero when empty).
struct Bytes8<'a> {
    data: &'a [u8],
    pos: usize,
}
impl Bytes8<'_> {
    fn u8(&mut self) -> u8 {
        if self.data.is_empty() {
            return 0;
        }
        let b = self.data[self.pos % self.data.len()];
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

fn w(t: &MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Runs one input. Must return promptly and never panic, whatever `data` holds.
pub fn run(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let mut src = Bytes8 { data, pos: 0 };
    let kind = src.u8() % 4;
    let size_sel = src.u8();
    // Mostly legal sizes, sometimes not (0, 3, too big).
    let qsize: u32 = match size_sel % 8 {
        0 => u32::from(size_sel),
        n => 1 << n,
    };
    let rounds = usize::from(src.u8() % 8) + 1;

    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    // Background: the input repeated over all of RAM (request headers, payloads).
    let mut fill = vec![0u8; MEM_SIZE];
    for chunk in fill.chunks_mut(data.len()) {
        chunk.copy_from_slice(&data[..chunk.len()]);
    }
    mem.write_slice(&fill, GuestAddress(0)).unwrap();

    let mut frames = VecDeque::new();
    for _ in 0..(src.u8() % 4) {
        let len = usize::from(src.u16() % 1600);
        frames.push_back((0..len).map(|_| src.u8()).collect());
    }
    let (device, nqueues): (Arc<Mutex<dyn VirtioDevice>>, usize) = match kind {
        0 => {
            let read_only = src.u8() & 1 == 1;
            let file = disk().try_clone().unwrap();
            let mut block = Block::from_file(file, "fuzz", read_only, Some("fuzz"), 256).unwrap();
            if src.u8() & 1 == 1 {
                block.enable_discard();
            }
            (Arc::new(Mutex::new(block)), 1)
        }
        1 => (
            Arc::new(Mutex::new(Rng::with_source(Box::new(io::repeat(0xab))))),
            1,
        ),
        2 => {
            let console = Console::new(Box::new(io::sink()));
            let n = usize::from(src.u8());
            let input: Vec<u8> = (0..n).map(|_| src.u8()).collect();
            console.input().push(&input);
            (Arc::new(Mutex::new(console)), 2)
        }
        _ => (
            Arc::new(Mutex::new(Net::new(
                Box::new(FakeBackend(frames)),
                NetConfig::default(),
            ))),
            2,
        ),
    };
    let t = MmioTransport::new(Arc::clone(&device), Arc::clone(&mem), Arc::new(NullLine));

    // Structured rings so the walk gets past the first checks most of the time.
    for q in 0..nqueues as u64 {
        let base = q * QUEUE_STRIDE;
        let n = qsize.clamp(1, 256) as u64;
        for i in 0..n {
            let mut d = [0u8; 16];
            let flags = src.u8();
            let mut addr = u64::from(src.u16()) * 2;
            if flags & 0x80 != 0 {
                addr |= 1 << 40;
            }
            let len = u32::from(src.u16()) % 0x3000;
            let next = u16::from(src.u8()) % (n as u16 + 1);
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&u16::from(flags & 7).to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(base + i * 16)).unwrap();
            let head = u16::from(src.u8()) % (n as u16 + 1);
            mem.write_obj(head, GuestAddress(base + 0x1000 + 4 + i * 2))
                .unwrap();
        }
        let idx = u16::from(src.u8()) % (n as u16 + 2);
        mem.write_obj(0u16, GuestAddress(base + 0x1000)).unwrap();
        mem.write_obj(idx, GuestAddress(base + 0x1002)).unwrap();
    }

    // Driver sequence, accepting every offered feature.
    w(&t, 0x70, 1);
    w(&t, 0x70, 3);
    for sel in 0..2 {
        w(&t, 0x14, sel);
        let mut f = [0u8; 4];
        t.read(0x10, &mut f);
        w(&t, 0x24, sel);
        w(&t, 0x20, u32::from_le_bytes(f));
    }
    w(&t, 0x70, 0xb);
    for q in 0..nqueues as u64 {
        let base = q * QUEUE_STRIDE;
        w(&t, 0x30, q as u32);
        w(&t, 0x38, qsize);
        w(&t, 0x80, base as u32);
        w(&t, 0x90, (base + 0x1000) as u32);
        w(&t, 0xa0, (base + 0x2000) as u32);
        w(&t, 0x44, 1);
    }
    w(&t, 0x70, 0xf);

    for _ in 0..rounds {
        let op = src.u8();
        match op % 8 {
            0..=4 => w(&t, 0x50, u32::from(op >> 3) % (nqueues as u32 + 1)),
            5 => {
                let off = u64::from(src.u16() % 0x210);
                let v = u32::from(src.u16()) | u32::from(src.u16()) << 16;
                if off != 0x70 {
                    w(&t, off, v);
                }
            }
            6 => {
                // More driver work: bump the avail index of a queue.
                let q = u64::from(op >> 3) % nqueues as u64;
                let idx = u16::from(src.u8());
                mem.write_obj(idx, GuestAddress(q * QUEUE_STRIDE + 0x1002))
                    .unwrap();
                w(&t, 0x50, q as u32);
            }
            _ => {
                let mut ack = [0u8; 4];
                t.read(0x60, &mut ack);
                t.write(0x64, &ack);
            }
        }
    }
    // Reset always brings the device back to a clean state.
    w(&t, 0x70, 0);
    let mut status = [0u8; 4];
    t.read(0x70, &mut status);
    assert_eq!(u32::from_le_bytes(status), 0);
}
