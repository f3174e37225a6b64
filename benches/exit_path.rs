//! Exit round trip through Keel's vCPU path versus a bare kvm-ioctls loop doing the same exits.
//!
//! Both sides run the same two-instruction real-mode guest on the same kind of VM (in-kernel
//! irqchip, 64 KiB of RAM at 0):
//!
//! ```text
//! pio:   out 0x10, al        ; E6 10      -> one KVM_EXIT_IO per iteration
//!        jmp pio             ; EB FC
//! mmio:  mov es:[0], al      ; 26 A2 00 00 (ES base 0xd0000, outside RAM) -> KVM_EXIT_MMIO
//!        jmp mmio            ; EB FA
//! ```
//!
//! Keel: `Vcpu::run` -> owned `VcpuExit` -> `handle_exit` -> bus lookup -> device.
//! Bare: `VcpuFd::run` -> match on the borrowed exit -> the same device call.
//! Criterion reports each side; afterwards an interleaved A/B run prints the ratios
//! (Keel time / bare time; the target is <= 1.05). The host is shared and noisy: the ratio of
//! the minimums is the least disturbed by other load, and the A/B rounds use the thread's CPU
//! time (which includes the guest's time in `KVM_RUN`) so preemption by other processes drops out. Skips with a message without /dev/kvm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use keel_accel::{
    Accelerator, BusDevice, ExitAction, GuestMemory, IoBuses, IrqChip, MachineRequirements,
    SystemEvent, SystemEvents, Vcpu, Vm, handle_exit,
};
use keel_kvm::KvmAccel;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const RAM: usize = 0x10000;
const CODE: u64 = 0x1000;
const MMIO_BASE: u64 = 0xd0000;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Pio,
    Mmio,
}

impl Kind {
    fn code(self) -> &'static [u8] {
        match self {
            Kind::Pio => &[0xe6, 0x10, 0xeb, 0xfc],
            Kind::Mmio => &[0x26, 0xa2, 0x00, 0x00, 0xeb, 0xfa],
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Pio => "pio_exit",
            Kind::Mmio => "mmio_exit",
        }
    }
}

/// The device both sides call: counts accesses.
#[derive(Default)]
struct Counter(AtomicU64);
impl BusDevice for Counter {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        self.0.fetch_add(u64::from(data[0]) + 1, Ordering::Relaxed);
    }
}

struct NoEvents;
impl SystemEvents for NoEvents {
    fn request(&self, _: SystemEvent) {}
}

fn memory(kind: Kind) -> Arc<GuestMemory> {
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).unwrap());
    mem.write_slice(kind.code(), GuestAddress(CODE)).unwrap();
    mem
}

struct KeelSide {
    _vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    buses: Arc<IoBuses>,
}

fn keel_side(kind: Kind) -> KeelSide {
    let accel = KvmAccel::new().unwrap();
    let req = MachineRequirements {
        machine: "bench".into(),
        vcpus: 1,
        memory: RAM as u64,
        irqchip: IrqChip::PicIoapic,
        pit: false,
    };
    let buses = Arc::new(IoBuses::new());
    buses
        .pio
        .insert(0x10, 1, Arc::new(Counter::default()))
        .unwrap();
    buses
        .mmio
        .insert(MMIO_BASE, 0x10, Arc::new(Counter::default()))
        .unwrap();
    let vm = accel
        .create_vm(&req, memory(kind), buses.clone(), Arc::new(NoEvents))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut s = vcpu.sregs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    s.es.base = MMIO_BASE;
    s.es.selector = (MMIO_BASE >> 4) as u16;
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();
    KeelSide {
        _vm: vm,
        vcpu,
        buses,
    }
}

impl KeelSide {
    fn exits(&mut self, n: u64) {
        for _ in 0..n {
            let exit = self.vcpu.run().unwrap();
            match handle_exit(&exit, &self.buses) {
                ExitAction::Resume => {}
                ExitAction::CompleteRead(v) => self.vcpu.complete_read(v),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

struct BareSide {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    device: Counter,
    _mem: Arc<GuestMemory>,
}

fn bare_side(kind: Kind) -> BareSide {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_identity_map_address(0xfffb_c000).unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    let mem = memory(kind);
    let region = mem.iter().next().unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `mem` outlives the VM (kept in BareSide after the fds).
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: vm_memory::GuestMemoryRegion::len(region),
            userspace_addr: host as u64,
        })
        .unwrap();
    }
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut s = vcpu.get_sregs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    s.es.base = MMIO_BASE;
    s.es.selector = (MMIO_BASE >> 4) as u16;
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.get_regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();
    BareSide {
        _kvm: kvm,
        _vm: vm,
        vcpu,
        device: Counter::default(),
        _mem: mem,
    }
}

impl BareSide {
    fn exits(&mut self, n: u64) {
        for _ in 0..n {
            match self.vcpu.run().unwrap() {
                KvmExit::IoOut(_port, data) => self.device.write(0, data),
                KvmExit::MmioWrite(_addr, data) => self.device.write(0, data),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// CPU time of the calling thread (guest time inside KVM_RUN included), in seconds. Unlike wall
/// time it does not grow while other processes on this shared host hold the CPU.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn cpu_timed(f: impl FnOnce()) -> f64 {
    let t = thread_cpu();
    f();
    thread_cpu() - t
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ab_ratio(kind: Kind, rounds: usize, exits: u64) {
    let mut keel = keel_side(kind);
    let mut bare = bare_side(kind);
    keel.exits(exits);
    bare.exits(exits);
    let mut ratios = Vec::with_capacity(rounds);
    let (mut tk, mut tb) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which side goes first so drift on this shared host hits both alike.
        let (k, b) = if round % 2 == 0 {
            let k = cpu_timed(|| keel.exits(exits));
            (k, cpu_timed(|| bare.exits(exits)))
        } else {
            let b = cpu_timed(|| bare.exits(exits));
            (cpu_timed(|| keel.exits(exits)), b)
        };
        let per_k = k * 1e9 / exits as f64;
        let per_b = b * 1e9 / exits as f64;
        tk.push(per_k);
        tb.push(per_b);
        ratios.push(per_k / per_b);
    }
    let (min_k, min_b) = (
        tk.iter().copied().fold(f64::MAX, f64::min),
        tb.iter().copied().fold(f64::MAX, f64::min),
    );
    let (med_k, med_b) = (median(&mut tk), median(&mut tb));
    println!(
        "{}: keel {med_k:.0} ns/exit, bare kvm-ioctls {med_b:.0} ns/exit (medians, thread CPU time); \
         keel/bare: ratio of medians {:.3}, of minimums {:.3}, median of paired ratios {:.3} \
         ({rounds} interleaved rounds of {exits} exits; target <= 1.05)",
        kind.name(),
        med_k / med_b,
        min_k / min_b,
        median(&mut ratios),
    );
}

fn main() {
    if let Err(e) = KvmAccel::new() {
        println!("skipping exit_path benchmark: {e}");
        return;
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for kind in [Kind::Pio, Kind::Mmio] {
        let mut g = c.benchmark_group(kind.name());
        let mut keel = keel_side(kind);
        g.bench_function("keel", |b| {
            b.iter_custom(|iters| timed(|| keel.exits(black_box(iters))))
        });
        let mut bare = bare_side(kind);
        g.bench_function("bare_kvm_ioctls", |b| {
            b.iter_custom(|iters| timed(|| bare.exits(black_box(iters))))
        });
        g.finish();
    }
    c.final_summary();
    for kind in [Kind::Pio, Kind::Mmio] {
        ab_ratio(kind, 41, 1000);
    }
}
