//! Whole-guest tests: tiny guests assembled in the test, run on the interpreter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use iced_x86::code_asm::*;
use keel_accel::{Vcpu, VcpuExit};

#[test]
fn long_mode_hello_serial_and_halt() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        let mut msg = a.create_label();
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.lea(rsi, ptr(msg)).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.set_label(&mut lp).unwrap();
        a.lodsb().unwrap();
        a.test(al, al).unwrap();
        a.jz(done).unwrap();
        a.out(dx, al).unwrap();
        a.jmp(lp).unwrap();
        a.set_label(&mut done).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut msg).unwrap();
        a.db(b"Hello from tcg\n\0").unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.serial_text(), "Hello from tcg\n");
}

#[test]
fn loop_sum_and_flags() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        let mut lp = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(ecx, 1000u32).unwrap();
        a.set_label(&mut lp).unwrap();
        a.add(rax, rcx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(lp).unwrap();
        a.mov(rbx, -1i64).unwrap();
        a.add(rbx, 1).unwrap(); // CF=1 ZF=1
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted);
    let r = h.regs();
    assert_eq!(r.rax, 500_500);
    assert_eq!(r.rbx, 0);
    assert_eq!(r.rflags & 0x8d5, 0x55); // CF PF AF ZF set; SF OF clear
}

#[test]
fn isa_debug_exit_port() {
    let mut h = Harness::new(16);
    let code = asm(64, CODE, |a| {
        a.mov(eax, 0x31u32).unwrap();
        a.out(0xf4, eax).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.run();
    assert_eq!(*h.exit.0.lock().unwrap(), Some(0x31));
}

#[test]
fn pvh_style_32bit_entry_enables_long_mode() {
    // Start in flat 32-bit protected mode with paging off (PVH), build page tables,
    // enable PAE + LME + PG, far-jump to 64-bit code and compute there.
    let mut h = Harness::new(64);
    let pml4 = 0x20_0000u64;
    let code64_at = CODE + 0x800;
    let code = asm(32, CODE, |a| {
        // PML4[0] -> PDPT, PDPT[0] -> 1 GiB page (PS)
        a.mov(dword_ptr(pml4 as u32), (pml4 as u32 + 0x1000) | 3)
            .unwrap();
        a.mov(dword_ptr(pml4 as u32 + 4), 0u32).unwrap();
        a.mov(dword_ptr(pml4 as u32 + 0x1000), 0x83u32).unwrap();
        a.mov(dword_ptr(pml4 as u32 + 0x1004), 0u32).unwrap();
        a.mov(eax, pml4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(0x28, code64_at as u32).unwrap();
    });
    let code64 = asm(64, code64_at, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
        a.mov(rbx, rax).unwrap();
        a.shr(rbx, 32).unwrap();
        a.hlt().unwrap();
    });
    h.protected32(&code);
    h.write(code64_at, &code64);
    // GDT entry 0x28: 64-bit code.
    h.w64(GDT + 0x28, 0x00af_9b00_0000_ffff);
    let mut s = h.vcpu.sregs().unwrap();
    s.gdt.limit = 0x2f;
    h.vcpu.set_sregs(&s).unwrap();
    assert_eq!(h.run(), VcpuExit::Halted);
    let r = h.regs();
    assert_eq!(r.rax, 0x1234_5678_9abc_def0);
    assert_eq!(r.rbx, 0x1234_5678);
    let s = h.vcpu.sregs().unwrap();
    assert!(s.cs.l);
    assert_eq!(s.efer & 0x500, 0x500);
}

#[test]
fn amd_fxsave_leak_sequence_runs() {
    // Linux on AMD: fnclex; emms; fildl (scrubs FIP/FDP before fxrstor).
    let mut h = Harness::new(16);
    let code = asm(64, CODE, |a| {
        a.fnclex().unwrap();
        a.emms().unwrap();
        a.fild(dword_ptr(rsp)).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
}

#[test]
fn hlt_with_interrupts_enabled_sleeps_until_kicked() {
    let mut h = Harness::new(16);
    let code = asm(64, CODE, |a| {
        a.sti().unwrap();
        a.hlt().unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    let k = h.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        k.kick();
    });
    let start = std::time::Instant::now();
    assert_eq!(h.vcpu.run().unwrap(), VcpuExit::Interrupted);
    assert!(start.elapsed() >= std::time::Duration::from_millis(40));
    t.join().unwrap();
    // Still halted at the first hlt: the next run sleeps again rather than spinning.
    assert_eq!(h.regs().rip, CODE + 2);
}

#[test]
fn fxsave_fxrstor_round_trip() {
    let mut h = Harness::new(16);
    let code = asm(64, CODE, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.movq(xmm3, rax).unwrap();
        a.fld1().unwrap();
        a.fldpi().unwrap();
        a.fxsave(ptr(0x30_0000u64)).unwrap();
        a.pxor(xmm3, xmm3).unwrap();
        a.fninit().unwrap();
        a.fxrstor(ptr(0x30_0000u64)).unwrap();
        a.movq(rbx, xmm3).unwrap();
        a.fstp(qword_ptr(0x30_1000u64)).unwrap(); // pi
        a.fstp(qword_ptr(0x30_1008u64)).unwrap(); // 1.0
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    assert_eq!(h.regs().rbx, 0x1122_3344_5566_7788);
    assert_eq!(f64::from_bits(h.r64(0x30_1000)), std::f64::consts::PI);
    assert_eq!(f64::from_bits(h.r64(0x30_1008)), 1.0);
    // FCW, MXCSR in the image.
    assert_eq!(h.r64(0x30_0000) & 0xffff, 0x037f);
    assert_eq!(h.r64(0x30_0018) & 0xffff_ffff, 0x1f80);
}

/// A ROM outside RAM: serves bytes of a small program, one access at a time.
struct Rom(Vec<u8>, std::sync::Mutex<usize>);
impl keel_accel::BusDevice for Rom {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut widest = self.1.lock().unwrap();
        *widest = (*widest).max(data.len());
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.0.get(offset as usize + k).copied().unwrap_or(0xf4);
        }
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
}

#[test]
fn code_runs_from_a_device_outside_ram() {
    let mut h = Harness::new(16);
    let rom_at = 0xfff0_0000u64;
    let prog = asm(64, rom_at, |a| {
        a.mov(eax, 7u32).unwrap();
        a.add(eax, 5).unwrap();
        a.hlt().unwrap();
    });
    let rom = std::sync::Arc::new(Rom(prog, std::sync::Mutex::new(0)));
    h.buses.mmio.insert(rom_at, 0x1000, rom.clone()).unwrap();
    let jump = asm(64, CODE, |a| {
        a.mov(rax, rom_at).unwrap();
        a.jmp(rax).unwrap();
    });
    h.long_mode(&jump);
    // Map the ROM's linear address 1:1 (PDPT entry 3 as a 1 GiB page).
    h.w64(PML4 + 0x1000 + 3 * 8, 0xc000_0083);
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    assert_eq!(h.regs().rax, 12);
    assert!(
        *rom.1.lock().unwrap() <= 8,
        "device accesses stay within 8 bytes"
    );
}

/// inc/dec keep CF from whatever set the flags before them: the specialised handler reads
/// it inline after add/sub/inc/dec/logic ops and through the general path otherwise.
#[test]
fn inc_dec_preserve_carry_from_every_flag_kind() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        // Each case leaves CF in bit k of rbx via adc after the inc/dec.
        a.xor(ebx, ebx).unwrap();
        let case = |a: &mut CodeAssembler, k: u32, set: &dyn Fn(&mut CodeAssembler)| {
            set(a);
            a.inc(rcx).unwrap();
            a.dec(rdx).unwrap();
            a.mov(esi, 0u32).unwrap();
            a.adc(esi, 0).unwrap(); // esi = CF
            a.shl(esi, k).unwrap();
            a.or(ebx, esi).unwrap();
        };
        // add with carry out: CF=1 (bit 0).
        case(a, 0, &|a| {
            a.mov(rax, -1i64).unwrap();
            a.add(rax, 2).unwrap();
        });
        // sub with borrow: CF=1 (bit 1).
        case(a, 1, &|a| {
            a.mov(eax, 1u32).unwrap();
            a.sub(eax, 2).unwrap();
        });
        // logic op: CF=0 (bit 2 stays clear).
        case(a, 2, &|a| {
            a.stc().unwrap();
            a.xor(eax, eax).unwrap();
        });
        // stc (eager flags): CF=1 (bit 3).
        case(a, 3, &|a| {
            a.stc().unwrap();
        });
        // adc with carry out (general path): CF=1 (bit 4).
        case(a, 4, &|a| {
            a.stc().unwrap();
            a.mov(rax, -1i64).unwrap();
            a.adc(rax, 0).unwrap();
        });
        // sbb without borrow (general path): CF=0 (bit 5 stays clear).
        case(a, 5, &|a| {
            a.clc().unwrap();
            a.mov(eax, 5u32).unwrap();
            a.sbb(eax, 1).unwrap();
        });
        // inc after inc after add with carry: CF=1 still (bit 6).
        case(a, 6, &|a| {
            a.mov(rax, -1i64).unwrap();
            a.add(rax, 1).unwrap();
            a.inc(rdi).unwrap();
        });
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rbx, 0b101_1011);
}
