//! Two vCPUs on one interpreter VM, each on its own host thread as the machine runs them: the
//! bootstrap processor starts the application processor with INIT and a start-up IPI through
//! its local APIC, the AP runs real-mode code at `vector << 12`, both then hammer one counter
//! with `lock inc` (exact only because one vCPU interprets at a time), and after switching to
//! protected mode the AP sends a fixed IPI that reaches the BSP's interrupt handler (the BSP
//! waits for it in `hlt`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use iced_x86::code_asm::*;
use keel_accel::{IoBuses, Regs, SpecialRegs, SystemEvent, SystemEvents, Vcpu, VcpuExit, Vm};
use keel_tcg::TcgVm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BSP_CODE: u64 = 0x10_0000;
const AP_CODE: u64 = 0x8000; // SIPI vector 8
use common::{GDT, IDT};
const ISR: u64 = 0x3000;
const FLAG: u64 = 0x7000;
const COUNTER: u64 = 0x7004;
const AP_DONE: u64 = 0x7008;
const IPI_SEEN: u64 = 0x700c;
const ROUNDS: u32 = 20_000;

struct NoEvents;
impl SystemEvents for NoEvents {
    fn request(&self, _e: SystemEvent) {}
}

fn flat32() -> SpecialRegs {
    let mut s = common::flat32_sregs();
    s.idt.base = IDT;
    s.idt.limit = 0x7ff;
    s.apic_base = 0xfee0_0900;
    s
}

/// A 2 MiB VM with local APICs and an IOAPIC (mapped on `buses`), a flat 32-bit GDT at
/// [`GDT`] (code 0x10, data 0x18) and nothing else.
fn apic_vm(buses: Arc<IoBuses>) -> (Arc<GuestMemoryMmap>, TcgVm) {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap());
    let vm = TcgVm::with_apic(
        mem.clone(),
        buses,
        Arc::new(NoEvents),
        Default::default(),
        true,
    )
    .unwrap();
    let gdt = [0u64, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * k as u64)).unwrap();
    }
    (mem, vm)
}

/// A 32-bit interrupt gate (selector 0x10, present, DPL 0) to `isr`, as IDT entry `vector`.
fn set_gate(mem: &GuestMemoryMmap, vector: u64, isr: u64) {
    let gate = (isr & 0xffff) | (0x10 << 16) | (0x8e00u64 << 32) | ((isr >> 16) << 48);
    mem.write_obj(gate, GuestAddress(IDT + 8 * vector)).unwrap();
}

/// vCPU 0 in flat 32-bit mode at [`BSP_CODE`], stack at 0x9_0000.
fn bsp_at_code(vm: &TcgVm) -> Box<dyn Vcpu> {
    let mut bsp = vm.create_vcpu(0).unwrap();
    bsp.set_sregs(&flat32()).unwrap();
    bsp.set_regs(&Regs {
        rip: BSP_CODE,
        rsp: 0x9_0000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    bsp
}

fn bsp_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let lapic = |off: u32| dword_ptr(0xfee0_0000u32 + off);
    a.mov(lapic(0xf0), 0x1ffu32).unwrap(); // SVR: software enable
    a.mov(lapic(0x310), 1u32 << 24).unwrap(); // destination: APIC 1
    a.mov(lapic(0x300), 0x0000_c500u32).unwrap(); // INIT, level assert
    a.mov(lapic(0x300), 0x0000_8500u32).unwrap(); // INIT, level de-assert (ignored)
    a.mov(lapic(0x300), 0x0000_0608u32).unwrap(); // start-up, vector 8
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.cmp(dword_ptr(FLAG as u32), 0x600du32).unwrap();
    a.jne(wait).unwrap();
    a.sti().unwrap();
    a.mov(ecx, ROUNDS).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.lock().inc(dword_ptr(COUNTER as u32)).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    let mut done = a.create_label();
    a.set_label(&mut done).unwrap();
    a.pause().unwrap();
    a.cmp(dword_ptr(AP_DONE as u32), 1u32).unwrap();
    a.jne(done).unwrap();
    // Wait (halted, interrupts on) for the AP's fixed IPI; its handler sets IPI_SEEN.
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.cmp(dword_ptr(IPI_SEEN as u32), 1u32).unwrap();
    let mut out = a.create_label();
    a.je(out).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.set_label(&mut out).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.assemble(BSP_CODE).unwrap()
}

fn isr_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(dword_ptr(IPI_SEEN as u32), 1u32).unwrap();
    a.mov(dword_ptr(0xfee0_00b0u32), 0u32).unwrap(); // EOI
    a.iretd().unwrap();
    a.assemble(ISR).unwrap()
}

const AP_CODE32: u64 = 0x8100;
const GDTR: u64 = 0x7100;

/// Real mode at the SIPI address: flag, counter loop, then into protected mode (as Linux's
/// trampoline does) to reach the local APIC above 1 MiB.
fn ap_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(dword_ptr(FLAG as u32), 0x600du32).unwrap();
    a.mov(ecx, ROUNDS).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.lock().inc(dword_ptr(COUNTER as u32)).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    a.mov(dword_ptr(AP_DONE as u32), 1u32).unwrap();
    a.lgdt(word_ptr(GDTR as u32)).unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 1).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut v = a.assemble(AP_CODE).unwrap();
    // jmp far dword 0x10:AP_CODE32
    v.extend_from_slice(&[0x66, 0xea]);
    v.extend_from_slice(&(AP_CODE32 as u32).to_le_bytes());
    v.extend_from_slice(&0x10u16.to_le_bytes());
    v
}

/// Protected mode: a fixed IPI (vector 0x40) to APIC 0, then halt for good.
fn ap_code32() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(ax, 0x18).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(dword_ptr(0xfee0_0310u32), 0u32).unwrap();
    a.mov(dword_ptr(0xfee0_0300u32), 0x40u32).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.assemble(AP_CODE32).unwrap()
}

#[test]
fn bsp_starts_ap_with_init_sipi_and_lock_inc_is_atomic_across_vcpus() {
    let buses = Arc::new(IoBuses::new());
    let (mem, vm) = apic_vm(buses.clone());
    // Interrupt gate for vector 0x40 -> ISR.
    set_gate(&mem, 0x40, ISR);
    mem.write_slice(&bsp_code(), GuestAddress(BSP_CODE))
        .unwrap();
    mem.write_slice(&isr_code(), GuestAddress(ISR)).unwrap();
    mem.write_slice(&ap_code(), GuestAddress(AP_CODE)).unwrap();
    mem.write_slice(&ap_code32(), GuestAddress(AP_CODE32))
        .unwrap();
    mem.write_obj(0x1fu16, GuestAddress(GDTR)).unwrap();
    mem.write_obj(GDT as u32, GuestAddress(GDTR + 2)).unwrap();

    let bsp = bsp_at_code(&vm);
    let ap = vm.create_vcpu(1).unwrap();
    // The AP gets no entry state: it waits for SIPI.
    let (tx, rx) = mpsc::channel();
    let kick_ap = ap.kicker();
    let kick_bsp = bsp.kicker();
    let spawn = |mut v: Box<dyn Vcpu>, tx: mpsc::Sender<(u32, VcpuExit)>| {
        std::thread::spawn(move || {
            let i = v.index();
            loop {
                let x = v.run().unwrap();
                match x {
                    VcpuExit::Interrupted => {}
                    _ => {
                        let _ = tx.send((i, x));
                        return v;
                    }
                }
            }
        })
    };
    let t_ap = spawn(ap, tx.clone());
    // The AP must stay parked without a SIPI.
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err());
    let t_bsp = spawn(bsp, tx);
    let mut halted = Vec::new();
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(e) => halted.push(e),
            Err(_) => {
                kick_ap.kick();
                kick_bsp.kick();
                panic!("vCPUs did not halt: {halted:?}");
            }
        }
    }
    halted.sort_by_key(|h| h.0);
    assert_eq!(halted, [(0, VcpuExit::Halted), (1, VcpuExit::Halted)]);
    let _ = (t_ap.join().unwrap(), t_bsp.join().unwrap());
    let r = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    assert_eq!(r(FLAG), 0x600d, "the AP ran its real-mode start-up code");
    assert_eq!(r(COUNTER), 2 * ROUNDS, "lock inc lost updates");
    assert_eq!(r(AP_DONE), 1);
    assert_eq!(
        r(IPI_SEEN),
        1,
        "the AP's fixed IPI reached the BSP's handler"
    );
}

const READY: u64 = 0x7200;
const SEEN_PIC: u64 = 0x7204;
const SEEN_IOAPIC: u64 = 0x7208;
const ISR_PIC: u64 = 0x3100;
const ISR_IOAPIC: u64 = 0x3200;

/// With the local APIC enabled, the 8259 still reaches the BSP through LINT0 in ExtINT
/// (virtual-wire) mode, and an IOAPIC pin reaches it as a fixed vector; both from a device
/// thread while the vCPU waits in `hlt`.
#[test]
fn pic_through_lint0_extint_and_ioapic_pin_reach_the_bsp() {
    let buses = Arc::new(IoBuses::new());
    let (mem, vm) = apic_vm(buses.clone());
    for (r, d) in vm.platform_devices() {
        buses.pio.insert(r.base, r.len, d).unwrap();
    }
    set_gate(&mem, 0x21, ISR_PIC);
    set_gate(&mem, 0x50, ISR_IOAPIC);

    let mut a = CodeAssembler::new(32).unwrap();
    // 8259 master: vector base 0x20, only IRQ 1 unmasked.
    for (port, v) in [
        (0x20u16, 0x11u8),
        (0x21, 0x20),
        (0x21, 4),
        (0x21, 1),
        (0x21, 0xfd),
    ] {
        a.mov(al, v as u32).unwrap();
        a.out(port as u32, al).unwrap();
    }
    a.mov(dword_ptr(0xfee0_00f0u32), 0x1ffu32).unwrap();
    // IOAPIC pin 3: vector 0x50, edge, physical destination 0.
    a.mov(dword_ptr(0xfec0_0000u32), 0x10u32 + 2 * 3).unwrap();
    a.mov(dword_ptr(0xfec0_0010u32), 0x50u32).unwrap();
    a.sti().unwrap();
    a.mov(dword_ptr(READY as u32), 1u32).unwrap();
    for flag in [SEEN_PIC, SEEN_IOAPIC] {
        let mut l = a.create_label();
        let mut next = a.create_label();
        a.set_label(&mut l).unwrap();
        a.cmp(dword_ptr(flag as u32), 1u32).unwrap();
        a.je(next).unwrap();
        a.hlt().unwrap();
        a.jmp(l).unwrap();
        a.set_label(&mut next).unwrap();
        a.nop().unwrap();
    }
    a.cli().unwrap();
    a.hlt().unwrap();
    mem.write_slice(&a.assemble(BSP_CODE).unwrap(), GuestAddress(BSP_CODE))
        .unwrap();
    let mut h = CodeAssembler::new(32).unwrap();
    h.mov(dword_ptr(SEEN_PIC as u32), 1u32).unwrap();
    h.mov(al, 0x20u32).unwrap();
    h.out(0x20u32, al).unwrap(); // 8259 EOI
    h.iretd().unwrap();
    mem.write_slice(&h.assemble(ISR_PIC).unwrap(), GuestAddress(ISR_PIC))
        .unwrap();
    let mut h = CodeAssembler::new(32).unwrap();
    h.mov(dword_ptr(SEEN_IOAPIC as u32), 1u32).unwrap();
    h.mov(dword_ptr(0xfee0_00b0u32), 0u32).unwrap(); // LAPIC EOI
    h.iretd().unwrap();
    mem.write_slice(&h.assemble(ISR_IOAPIC).unwrap(), GuestAddress(ISR_IOAPIC))
        .unwrap();

    let mut bsp = bsp_at_code(&vm);
    let kick = bsp.kicker();
    let t = std::thread::spawn(move || {
        loop {
            match bsp.run().unwrap() {
                VcpuExit::Interrupted => {}
                x => return x,
            }
        }
    });
    let r = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    let wait = |a: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while r(a) != 1 {
            if std::time::Instant::now() > deadline {
                kick.kick();
                panic!("guest flag {a:#x} not set");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait(READY);
    std::thread::sleep(Duration::from_millis(20));
    vm.irq_line(1).unwrap().pulse();
    wait(SEEN_PIC);
    assert_eq!(r(SEEN_IOAPIC), 0, "pin 1's redirection entry is masked");
    vm.irq_line(3).unwrap().pulse();
    wait(SEEN_IOAPIC);
    assert_eq!(t.join().unwrap(), VcpuExit::Halted);
}

const FUNC: u64 = 0x9000;
const RESULT: u64 = 0x7300;
const CALLED: u64 = 0x7304;

/// Cross-modifying code: the BSP keeps calling a function only it has executed (so only its
/// block cache holds it, entered through chained links); the AP, in real mode, rewrites an
/// immediate in the middle of it (outside the bytes a block lookup fingerprints). The BSP
/// must see the new code.
#[test]
fn code_written_by_one_vcpu_is_retranslated_by_another() {
    let (mem, vm) = apic_vm(Arc::new(IoBuses::new()));
    // FUNC: 20 nops, mov eax, 1, 20 nops, ret.
    let mut f = vec![0x90u8; 20];
    f.extend_from_slice(&[0xb8, 1, 0, 0, 0]);
    f.extend_from_slice(&[0x90; 20]);
    f.push(0xc3);
    mem.write_slice(&f, GuestAddress(FUNC)).unwrap();

    let mut a = CodeAssembler::new(32).unwrap();
    let lapic = |off: u32| dword_ptr(0xfee0_0000u32 + off);
    a.mov(lapic(0xf0), 0x1ffu32).unwrap();
    a.mov(lapic(0x310), 1u32 << 24).unwrap();
    a.mov(lapic(0x300), 0x0000_c500u32).unwrap();
    a.mov(lapic(0x300), 0x0000_0608u32).unwrap();
    a.mov(esi, FUNC as u32).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.call(esi).unwrap();
    a.mov(dword_ptr(RESULT as u32), eax).unwrap();
    a.mov(dword_ptr(CALLED as u32), 1u32).unwrap();
    a.cmp(eax, 2).unwrap();
    a.jne(l).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    mem.write_slice(&a.assemble(BSP_CODE).unwrap(), GuestAddress(BSP_CODE))
        .unwrap();

    let mut a = CodeAssembler::new(16).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    let mut w = a.create_label();
    a.set_label(&mut w).unwrap();
    a.pause().unwrap();
    a.cmp(dword_ptr(CALLED as u32), 1u32).unwrap();
    a.jne(w).unwrap();
    // Let the BSP run the function many more times from its cache first.
    a.mov(ecx, 200_000u32).unwrap();
    let mut d = a.create_label();
    a.set_label(&mut d).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(d).unwrap();
    a.mov(byte_ptr(FUNC as u32 + 21), 2u32).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    mem.write_slice(&a.assemble(AP_CODE).unwrap(), GuestAddress(AP_CODE))
        .unwrap();

    let bsp = bsp_at_code(&vm);
    let ap = vm.create_vcpu(1).unwrap();
    let (tx, rx) = mpsc::channel();
    let kicks = [bsp.kicker(), ap.kicker()];
    for v in [bsp, ap] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut v = v;
            loop {
                match v.run().unwrap() {
                    VcpuExit::Interrupted => {}
                    x => {
                        let _ = tx.send((v.index(), x));
                        return;
                    }
                }
            }
        });
    }
    for _ in 0..2 {
        if let Err(e) = rx.recv_timeout(Duration::from_secs(30)) {
            for k in &kicks {
                k.kick();
            }
            let r = mem.read_obj::<u32>(GuestAddress(RESULT)).unwrap();
            panic!("a vCPU did not halt ({e}); the BSP's function returned {r}");
        }
    }
    assert_eq!(mem.read_obj::<u32>(GuestAddress(RESULT)).unwrap(), 2);
}

const NMI_COUNT: u64 = 0x7400;
const NMI_SEEN_INSIDE: u64 = 0x7404;
const NMI_ISR: u64 = 0x3300;

/// An NMI is not nested: a self-NMI sent from inside the NMI handler runs only after the
/// handler's IRET.
#[test]
fn nmis_are_blocked_until_iret() {
    let (mem, vm) = apic_vm(Arc::new(IoBuses::new()));
    set_gate(&mem, 2, NMI_ISR);
    let self_nmi = |a: &mut CodeAssembler| {
        a.mov(dword_ptr(0xfee0_0300u32), (1u32 << 18) | 0x400)
            .unwrap();
    };
    let mut h = CodeAssembler::new(32).unwrap();
    h.inc(dword_ptr(NMI_COUNT as u32)).unwrap();
    h.cmp(dword_ptr(NMI_COUNT as u32), 1u32).unwrap();
    let mut done = h.create_label();
    h.jne(done).unwrap();
    self_nmi(&mut h);
    // Give a nested NMI every chance to arrive before IRET.
    h.mov(ecx, 100_000u32).unwrap();
    let mut l = h.create_label();
    h.set_label(&mut l).unwrap();
    h.dec(ecx).unwrap();
    h.jnz(l).unwrap();
    h.mov(eax, dword_ptr(NMI_COUNT as u32)).unwrap();
    h.mov(dword_ptr(NMI_SEEN_INSIDE as u32), eax).unwrap();
    h.set_label(&mut done).unwrap();
    h.iretd().unwrap();
    mem.write_slice(&h.assemble(NMI_ISR).unwrap(), GuestAddress(NMI_ISR))
        .unwrap();
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(dword_ptr(0xfee0_00f0u32), 0x1ffu32).unwrap();
    self_nmi(&mut a);
    let mut w = a.create_label();
    a.set_label(&mut w).unwrap();
    a.cmp(dword_ptr(NMI_COUNT as u32), 2u32).unwrap();
    a.jne(w).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    mem.write_slice(&a.assemble(BSP_CODE).unwrap(), GuestAddress(BSP_CODE))
        .unwrap();
    let mut bsp = bsp_at_code(&vm);
    let mut n = 0;
    let x = loop {
        match bsp.run().unwrap() {
            VcpuExit::Interrupted => n += 1,
            x => break x,
        }
        assert!(n < 1_000_000);
    };
    assert_eq!(x, VcpuExit::Halted);
    let r = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    assert_eq!(
        r(NMI_SEEN_INSIDE),
        1,
        "the second NMI nested inside the first"
    );
    assert_eq!(r(NMI_COUNT), 2, "the latched NMI ran after IRET");
}
