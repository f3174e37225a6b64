//! The interpreter's decode-and-execute on random bytes: a fresh 4 MiB TCG VM runs one page
//! of code from the input in the CPU mode the first byte picks (real mode, flat 32-bit
//! protected mode, 64-bit long mode with every vector going to a `hlt`), with the registers
//! pointing into RAM so that memory operands mostly hit it.
//!
//! Bounded: a helper thread kicks the vCPU every 2 ms, the run stops after 4 ms or 64 exits
//! (port and MMIO reads answer 0), whichever comes first; exceptions end in a `hlt` (real
//! and long mode) or a triple fault (protected mode, no IDT), so most inputs stop at once. Checks: no panic, no hang, and
//! `run` never fails with an internal error.
//!
//! Run (nightly): `cargo +nightly fuzz run --fuzz-dir fuzz tcg_exec`.
#![no_main]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keel_accel::{
    DescriptorTable, IoBuses, Regs, Segment, SpecialRegs, SystemEvent, SystemEvents, Vcpu,
    VcpuExit, Vm,
};
use keel_tcg::{TcgVcpu, TcgVm};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 4 << 20;
const CODE: u64 = 0x10_0000;
const REAL_CODE: u64 = 0x7c00;
const REAL_HLT: u64 = 0x500;
const STACK: u64 = 0x8_0000;
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const PML4: u64 = 0x1_0000;
const HLT: u64 = 0x18_0000;

struct NoEvents;
impl SystemEvents for NoEvents {
    fn request(&self, _e: SystemEvent) {}
}

fn w64(mem: &GuestMemoryMmap, gpa: u64, v: u64) {
    mem.write_slice(&v.to_le_bytes(), GuestAddress(gpa))
        .expect("in RAM");
}

fn flat(sel: u16, code: bool, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 3 },
        present: true,
        dpl: 0,
        db: !(code && long),
        s: true,
        l: code && long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Flat 64-bit long mode, the first 1 GiB identity-mapped with 2 MiB pages.
fn long_mode(mem: &GuestMemoryMmap) -> SpecialRegs {
    let gdt = [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        w64(mem, GDT + 8 * k as u64, *d);
    }
    let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40);
    w64(mem, GDT + 0x28, tss_lo);
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    w64(mem, PML4, pdpt | 7);
    w64(mem, pdpt, pd | 7);
    for k in 0..512u64 {
        w64(mem, pd + 8 * k, (k << 21) | 0x87);
    }
    // Every vector: a 64-bit interrupt gate to a `hlt`.
    mem.write_slice(&[0xf4], GuestAddress(HLT)).expect("in RAM");
    for v in 0..256u64 {
        let lo = (HLT & 0xffff) | (8 << 16) | (0x8e << 40) | (((HLT >> 16) & 0xffff) << 48);
        w64(mem, IDT + 16 * v, lo);
        w64(mem, IDT + 16 * v + 8, 0);
    }
    let mut s = SpecialRegs {
        cs: flat(8, true, true),
        ds: flat(0x10, false, true),
        es: flat(0x10, false, true),
        fs: flat(0x10, false, true),
        gs: flat(0x10, false, true),
        ss: flat(0x10, false, true),
        ..Default::default()
    };
    s.tr = Segment {
        base: TSS,
        limit: 0x67,
        selector: 0x28,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    s.gdt = DescriptorTable {
        base: GDT,
        limit: 0x37,
    };
    s.idt = DescriptorTable {
        base: IDT,
        limit: 0xfff,
    };
    s.cr0 = 0x8000_0033 | (1 << 16);
    s.cr3 = PML4;
    s.cr4 = 0x620;
    s.efer = 0xd01;
    s
}

/// Flat 32-bit protected mode, paging off (the PVH entry state).
fn protected32(mem: &GuestMemoryMmap) -> SpecialRegs {
    let gdt = [0u64, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        w64(mem, GDT + 8 * k as u64, *d);
    }
    let mut s = SpecialRegs {
        cs: flat(0x10, true, false),
        ds: flat(0x18, false, false),
        es: flat(0x18, false, false),
        fs: flat(0x18, false, false),
        gs: flat(0x18, false, false),
        ss: flat(0x18, false, false),
        ..Default::default()
    };
    s.tr = Segment {
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    s.gdt = DescriptorTable {
        base: GDT,
        limit: 0x1f,
    };
    s.cr0 = 0x11;
    s
}

/// Real mode, segments 0, the IVT at 0 with every vector going to a `hlt` at 0000:0500.
fn real_mode(mem: &GuestMemoryMmap) -> SpecialRegs {
    mem.write_slice(&[0xf4], GuestAddress(REAL_HLT))
        .expect("in RAM");
    for v in 0..256u64 {
        mem.write_slice(&(REAL_HLT as u32).to_le_bytes(), GuestAddress(4 * v))
            .expect("in RAM");
    }
    let real = |code: bool| Segment {
        limit: 0xffff,
        type_: if code { 0xb } else { 3 },
        present: true,
        s: true,
        ..Default::default()
    };
    SpecialRegs {
        cs: real(true),
        ds: real(false),
        es: real(false),
        fs: real(false),
        gs: real(false),
        ss: real(false),
        cr0: 0x10,
        idt: DescriptorTable {
            base: 0,
            limit: 0x3ff,
        },
        ..Default::default()
    }
}

fn vm() -> (Arc<GuestMemoryMmap>, TcgVm, TcgVcpu) {
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory"),
    );
    let buses = Arc::new(IoBuses::new());
    let vm = TcgVm::new(
        mem.clone(),
        buses.clone(),
        Arc::new(NoEvents),
        Default::default(),
    )
    .expect("TCG VM");
    for (r, d) in vm.platform_devices() {
        buses.pio.insert(r.base, r.len, d).expect("platform device");
    }
    let vcpu = vm.create_tcg_vcpu(0);
    (mem, vm, vcpu)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, code)) = data.split_first() else {
        return;
    };
    let code = &code[..code.len().min(4096)];
    let (mem, _vm, mut vcpu) = vm();
    let (sregs, rip) = match mode % 3 {
        0 => (real_mode(&mem), REAL_CODE),
        1 => (protected32(&mem), CODE),
        _ => (long_mode(&mem), CODE),
    };
    mem.write_slice(code, GuestAddress(rip)).expect("in RAM");
    vcpu.set_sregs(&sregs).expect("sregs");
    vcpu.set_regs(&Regs {
        rip,
        rsp: if mode % 3 == 0 { 0x7000 } else { STACK },
        rflags: 2,
        rax: 0x4000,
        rbx: 0x5000,
        rsi: 0x6000,
        rdi: 0x7000,
        ..Default::default()
    })
    .expect("regs");

    let kick = vcpu.kicker();
    let (stop, stopped) = mpsc::channel::<()>();
    let kicker = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Duration::from_millis(2))
        {
            kick.kick();
        }
    });
    let start = Instant::now();
    for _ in 0..64 {
        match vcpu.run().expect("the interpreter failed internally") {
            VcpuExit::IoIn { .. } | VcpuExit::MmioRead { .. } => vcpu.complete_read(0),
            VcpuExit::IoOut { .. } | VcpuExit::MmioWrite { .. } | VcpuExit::Interrupted => {}
            _ => break,
        }
        if start.elapsed() > Duration::from_millis(4) {
            break;
        }
    }
    drop(stop);
    kicker.join().expect("kicker thread");
});
