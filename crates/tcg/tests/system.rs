//! Paging, exceptions, self-modifying code, mode transitions, flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use iced_x86::code_asm::*;
use keel_accel::{Regs, Vcpu, VcpuExit};

const HANDLER: u64 = 0x18_0000;

/// Installs a handler for `vector` that records error code (r15), CR2 (r14), pushed RIP (r13)
/// and RSP (r12), then halts.
fn record_handler(h: &Harness, vector: u8, has_err: bool, ist: u8) {
    let code = asm(64, HANDLER + 0x100 * u64::from(vector), |a| {
        a.mov(r12, rsp).unwrap();
        if has_err {
            a.mov(r15, qword_ptr(rsp)).unwrap();
            a.mov(r13, qword_ptr(rsp + 8)).unwrap();
        } else {
            a.mov(r15, -1i64).unwrap();
            a.mov(r13, qword_ptr(rsp)).unwrap();
        }
        a.mov(r14, cr2).unwrap();
        a.hlt().unwrap();
    });
    h.write(HANDLER + 0x100 * u64::from(vector), &code);
    h.gate64(vector, HANDLER + 0x100 * u64::from(vector), ist, 0);
}

const PD: u64 = PML4 + 0x2000;
const PDPT: u64 = PML4 + 0x1000;

fn pf_case(setup: impl FnOnce(&Harness), body: impl FnOnce(&mut CodeAssembler)) -> (Regs, u64) {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        body(a);
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    record_handler(&h, 14, true, 0);
    setup(&h);
    assert_eq!(h.run(), VcpuExit::Halted);
    let fault_addr = h.vcpu.sregs().unwrap().cr2;
    (h.regs(), fault_addr)
}

#[test]
fn page_fault_not_present_read() {
    let (r, fault_addr) = pf_case(
        |h| h.w64(PD + 8 * 10, 0),
        |a| {
            a.mov(rax, 0x140_0123u64).unwrap();
            a.mov(rbx, qword_ptr(rax)).unwrap();
        },
    );
    assert_eq!(r.r15, 0, "not present, read, supervisor");
    assert_eq!(fault_addr, 0x140_0123);
    assert_eq!(r.r14, 0x140_0123);
    // Precise RIP: the faulting instruction is the second one (mov rax, imm64 is 10 bytes).
    assert_eq!(r.r13, CODE + 10);
    assert_eq!(r.rbx, 0, "destination untouched");
}

#[test]
fn page_fault_write_protect() {
    let (r, _) = pf_case(
        |h| h.w64(PD + 8 * 11, (11 << 21) | 0x85),
        |a| {
            a.mov(rax, 0x160_0000u64).unwrap();
            a.mov(qword_ptr(rax), rax).unwrap();
        },
    );
    assert_eq!(r.r15, 3, "present + write");
}

#[test]
fn supervisor_write_to_read_only_page_allowed_without_wp() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(rax, cr0).unwrap();
        a.btr(rax, 16).unwrap();
        a.mov(cr0, rax).unwrap();
        a.mov(rax, 0x160_0000u64).unwrap();
        a.mov(qword_ptr(rax), rax).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    record_handler(&h, 14, true, 0);
    h.w64(PD + 8 * 11, (11 << 21) | 0x85);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.r64(0x160_0000), 0x160_0000);
}

#[test]
fn page_fault_nx_fetch() {
    let (r, fault_addr) = pf_case(
        |h| {
            h.w64(PD + 8 * 12, (12 << 21) | 0x87 | (1 << 63));
            h.write(0x180_0000, &[0xf4]);
        },
        |a| {
            a.mov(rax, 0x180_0000u64).unwrap();
            a.jmp(rax).unwrap();
        },
    );
    assert_eq!(r.r15, 0x11, "present + instruction fetch");
    assert_eq!(fault_addr, 0x180_0000);
    assert_eq!(r.r13, 0x180_0000, "RIP of the fetch");
}

#[test]
fn walker_sets_accessed_and_dirty() {
    let pt = 0x3_0000u64;
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(rax, 0x1a0_0000u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
        a.mov(qword_ptr(rax + 0x1000), rbx).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.w64(PD + 8 * 13, pt | 7);
    for k in 0..512u64 {
        h.w64(pt + 8 * k, (0x1a0_0000 + (k << 12)) | 7);
    }
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.r64(pt) & 0x60, 0x20, "read: accessed, not dirty");
    assert_eq!(h.r64(pt + 8) & 0x60, 0x60, "write: accessed and dirty");
    assert_eq!(h.r64(pt + 16) & 0x60, 0, "untouched page");
    assert_ne!(h.r64(PD + 8 * 13) & 0x20, 0, "PDE accessed");
    assert_ne!(h.r64(PML4) & 0x20, 0, "PML4E accessed");
}

#[test]
fn one_gib_page() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(rax, 0x4050_0000u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.w64(PDPT + 8, 0x83); // 1 GiB page at physical 0
    h.w64(0x50_0000, 0xfeed_f00d);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rbx, 0xfeed_f00d);
}

#[test]
fn gp_with_error_code_and_precise_rip() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(eax, 0x1234u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    record_handler(&h, 13, true, 0);
    assert_eq!(h.run(), VcpuExit::Halted);
    let r = h.regs();
    assert_eq!(r.r15, 0x1234, "the LDT selector (TI set; no LDT loaded)");
    assert_eq!(r.r13, CODE + 5);
}

#[test]
fn divide_error_rip_points_at_div() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.xor(ecx, ecx).unwrap();
        a.mov(eax, 7u32).unwrap();
        a.div(rcx).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    record_handler(&h, 0, false, 0);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().r13, CODE + 7);
}

#[test]
fn ist_stack_switch() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.int3().unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.w64(TSS + 0x24, 0x7_0008); // IST1, deliberately misaligned: the CPU aligns to 16
    record_handler(&h, 3, false, 1);
    assert_eq!(h.run(), VcpuExit::Halted);
    let r = h.regs();
    assert_eq!(r.r12, 0x7_0000 - 40, "five qwords pushed on the IST stack");
    assert_eq!(r.r13, CODE + 1, "int3 pushes the address after it");
    assert_eq!(h.r64(0x7_0000 - 8), 0x10, "old SS");
    assert_eq!(h.r64(0x7_0000 - 16), STACK, "old RSP");
}

#[test]
fn double_fault_and_triple_fault() {
    // #GP whose gate is not present -> #NP on delivery -> #DF (contributory pair).
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(eax, 0x1234u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    record_handler(&h, 8, true, 0);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().r15, 0, "#DF pushes zero");

    // Without a #DF handler either: shutdown.
    let mut h = Harness::new(64);
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Shutdown);
}

#[test]
fn self_modifying_code_same_block_and_cached_block() {
    let mut h = Harness::new(64);
    let f = CODE + 0x400;
    let code = asm(64, CODE, |a| {
        let mut patch = a.create_label();
        // Patch an instruction later in this same block.
        a.mov(byte_ptr(patch) + 1, 42).unwrap();
        a.set_label(&mut patch).unwrap();
        a.mov(eax, 1u32).unwrap();
        // Call a function, patch it, call again: the cached translation must be dropped.
        a.mov(rsi, f).unwrap();
        a.call(rsi).unwrap();
        a.mov(ebx, eax).unwrap();
        a.mov(byte_ptr(rsi + 1), 9).unwrap();
        a.call(rsi).unwrap();
        a.hlt().unwrap();
    });
    let func = asm(64, f, |a| {
        a.mov(eax, 5u32).unwrap();
        a.ret().unwrap();
    });
    h.long_mode(&code);
    h.write(f, &func);
    assert_eq!(h.run(), VcpuExit::Halted);
    let r = h.regs();
    assert_eq!(r.rbx, 5);
    assert_eq!(r.rax, 9);
}

#[test]
fn invalidate_range_drops_code_written_by_dma() {
    let mut h = Harness::new(64);
    let code = asm(64, CODE, |a| {
        a.mov(eax, 1u32).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rax, 1);
    // A "device" rewrites the code behind the CPU's back, then says so.
    let code2 = asm(64, CODE, |a| {
        a.mov(eax, 2u32).unwrap();
        a.hlt().unwrap();
    });
    h.write(CODE, &code2);
    h.vm.invalidate_range(CODE, code2.len() as u64);
    let mut r = h.regs();
    r.rip = CODE;
    h.vcpu.set_regs(&r).unwrap();
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rax, 2);
}

#[test]
fn syscall_sysret_and_user_mode_interrupt_uses_rsp0() {
    let mut h = Harness::new(64);
    let user = CODE + 0x1000;
    let entry = CODE + 0x2000;
    // Kernel: set STAR/LSTAR/SFMASK, iretq to user mode.
    let code = asm(64, CODE, |a| {
        a.mov(ecx, 0xc000_0081u32).unwrap(); // STAR: sysret base 0x10 (user cs 0x20|3... see GDT), syscall cs 0x08
        a.mov(edx, 0x0010_0008u32).unwrap();
        a.xor(eax, eax).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0xc000_0082u32).unwrap();
        a.mov(eax, entry as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0xc000_0084u32).unwrap();
        a.mov(eax, 0x200u32).unwrap(); // mask IF
        a.wrmsr().unwrap();
        // iretq frame: SS, RSP, RFLAGS, CS, RIP
        a.push(0x1b).unwrap();
        a.push(0x6_0000).unwrap();
        a.push(0x202).unwrap();
        a.push(0x23).unwrap();
        a.mov(rax, user).unwrap();
        a.push(rax).unwrap();
        a.iretq().unwrap();
    });
    // User: syscall, then int 0x80 (DPL3 gate) which must switch to RSP0.
    let ucode = asm(64, user, |a| {
        a.mov(r8, 0x77u64).unwrap();
        a.syscall().unwrap();
        a.mov(r10, rsp).unwrap();
        a.int(0x80).unwrap();
        a.hlt().unwrap();
    });
    // Syscall entry: record CPL-0 state and sysret.
    let kentry = asm(64, entry, |a| {
        a.mov(r9, rcx).unwrap();
        a.sysretq().unwrap();
    });
    h.long_mode(&code);
    h.write(user, &ucode);
    h.write(entry, &kentry);
    // GDT for sysret with base 0x10: user CS = 0x20|3 (64-bit), user SS = 0x18|3.
    h.w64(GDT + 0x18, 0x00cf_f300_0000_ffff);
    h.w64(GDT + 0x20, 0x00af_fb00_0000_ffff);
    let mut s = h.vcpu.sregs().unwrap();
    // Keep the TSS descriptor at 0x28 (written by long_mode).
    s.gdt.limit = 0x37;
    h.vcpu.set_sregs(&s).unwrap();
    h.w64(TSS + 4, 0x5_0000); // RSP0
    record_handler(&h, 0x80, false, 0);
    h.gate64(0x80, HANDLER + 0x8000, 0, 3);
    let x = h.run();
    assert_eq!(
        x,
        VcpuExit::Halted,
        "last exception {:x?}",
        h.vcpu.last_exception()
    );
    let r = h.regs();
    assert_eq!(
        r.r9,
        user + 12,
        "RCX = return address after syscall (10-byte mov + 2-byte syscall)"
    );
    assert_eq!(r.r10, 0x6_0000, "back on the user stack after sysret");
    assert_eq!(r.r12, 0x5_0000 - 40, "interrupt from CPL3 switched to RSP0");
    let s = h.vcpu.sregs().unwrap();
    assert_eq!(s.cs.selector, 8);
    assert_eq!(h.r64(0x5_0000 - 32), 0x23, "old CS pushed");
    assert_eq!(h.r64(0x5_0000 - 8), 0x1b, "old SS pushed");
}

#[test]
fn real_to_protected_to_long_mode() {
    let mut h = Harness::new(16);
    let pm = 0x8000u64;
    let lm = 0x9000u64;
    let gdt = 0x7000u64;
    let pml4 = 0x1_0000u64;
    let rm = asm(16, 0x7c00, |a| {
        a.cli().unwrap();
        a.lgdt(word_ptr(0x6ff0)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(0x08, pm as u32).unwrap();
    });
    let pmc = asm(32, pm, |a| {
        a.mov(ax, 0x10).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, 0x7c00u32).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, pml4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(0x18, lm as u32).unwrap();
    });
    let lmc = asm(64, lm, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.push(rax).unwrap();
        a.pop(rbx).unwrap();
        a.hlt().unwrap();
    });
    h.write(0x7c00, &rm);
    h.write(pm, &pmc);
    h.write(lm, &lmc);
    // GDTR image at 0x6ff0: limit, base.
    h.write(0x6ff0, &0x1fu16.to_le_bytes());
    h.write(0x6ff2, &(gdt as u32).to_le_bytes());
    h.w64(gdt + 8, 0x00cf_9b00_0000_ffff);
    h.w64(gdt + 0x10, 0x00cf_9300_0000_ffff);
    h.w64(gdt + 0x18, 0x00af_9b00_0000_ffff);
    h.w64(pml4, (pml4 + 0x1000) | 3);
    h.w64(pml4 + 0x1000, 0x83);
    h.vcpu.set_sregs(&common::real_mode_sregs()).unwrap();
    h.vcpu
        .set_regs(&Regs {
            rip: 0x7c00,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rbx, 0x1122_3344_5566_7788);
    assert!(h.vcpu.sregs().unwrap().cs.l);
}

#[test]
fn code_rewritten_without_notification_is_noticed_on_lookup() {
    // A device (or the VMM) rewrites code and does not call invalidate_range.
    let mut h = Harness::new(16);
    let code = asm(64, CODE, |a| {
        a.mov(eax, 1u32).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    assert_eq!(h.run(), VcpuExit::Halted);
    let code2 = asm(64, CODE, |a| {
        a.mov(eax, 3u32).unwrap();
        a.hlt().unwrap();
    });
    h.write(CODE, &code2);
    let mut r = h.regs();
    r.rip = CODE;
    h.vcpu.set_regs(&r).unwrap();
    assert_eq!(h.run(), VcpuExit::Halted);
    assert_eq!(h.regs().rax, 3);
}

/// 32-bit protected mode with 2-level paging: a 4 KiB mapping and a 4 MiB PSE page.
#[test]
fn legacy_two_level_paging_with_pse() {
    let mut h = Harness::new(16);
    let pd = 0x20_0000u32;
    let pt = 0x20_1000u32;
    let code = asm(32, CODE, |a| {
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x10).unwrap(); // PSE
        a.mov(cr4, eax).unwrap();
        a.mov(eax, pd).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        // Linear 0x4000_0000 -> physical 0x30_0000 (4 KiB page); write through it.
        a.mov(dword_ptr(0x4000_0010u32), 0x1234_5678u32).unwrap();
        // Linear 0x8040_0000 -> 4 MiB page at physical 0x40_0000.
        a.mov(ebx, dword_ptr(0x8040_0020u32)).unwrap();
        a.hlt().unwrap();
    });
    h.protected32(&code);
    // Identity map the first 4 MiB (code, stack, tables) with a PSE page.
    h.write(u64::from(pd), &0x0000_0083u32.to_le_bytes());
    // PDE for 0x4000_0000 (index 256) -> page table.
    h.write(u64::from(pd) + 256 * 4, &(pt | 3).to_le_bytes());
    h.write(u64::from(pt), &0x30_0003u32.to_le_bytes());
    // PDE for 0x8040_0000 (index 513) -> 4 MiB page at 0x40_0000.
    h.write(u64::from(pd) + 513 * 4, &0x40_0083u32.to_le_bytes());
    h.write(0x40_0020, &0xabcd_ef01u32.to_le_bytes());
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    assert_eq!(h.r64(0x30_0010) & 0xffff_ffff, 0x1234_5678);
    assert_eq!(h.regs().rbx, 0xabcd_ef01);
    let pte = h.r64(u64::from(pt)) & 0xffff_ffff;
    assert_eq!(pte & 0x60, 0x60, "4 KiB PTE accessed and dirty");
    let pde = h.r64(u64::from(pd) + 513 * 4) & 0xffff_ffff;
    assert_eq!(pde & 0x60, 0x20, "4 MiB PDE accessed only");
}

/// 32-bit protected mode with PAE paging (no long mode): a 2 MiB page above 4 GiB linear
/// is impossible here, so map linear 0xC000_0000 to physical 0x60_0000.
#[test]
fn pae_paging_in_32_bit_mode() {
    let mut h = Harness::new(16);
    let pdpt = 0x20_0000u32;
    let pd0 = 0x20_1000u32;
    let pd3 = 0x20_2000u32;
    let code = asm(32, CODE, |a| {
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap(); // PAE
        a.mov(cr4, eax).unwrap();
        a.mov(eax, pdpt).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.mov(ebx, dword_ptr(0xc000_0040u32)).unwrap();
        a.hlt().unwrap();
    });
    h.protected32(&code);
    h.w64(u64::from(pdpt), u64::from(pd0) | 1);
    h.w64(u64::from(pdpt) + 24, u64::from(pd3) | 1);
    h.w64(u64::from(pd0), 0x83); // identity 2 MiB at 0
    h.w64(u64::from(pd3), 0x60_0083); // 0xC000_0000 -> 0x60_0000
    h.write(0x60_0040, &0x5566_7788u32.to_le_bytes());
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    assert_eq!(h.regs().rbx, 0x5566_7788);
}

/// A PIT interrupt reaches a guest spinning with interrupts enabled (no `hlt`).
#[test]
fn timer_interrupt_preempts_a_busy_loop() {
    let mut h = Harness::new(16);
    let handler = 0x18_0000u64;
    let code = asm(64, CODE, |a| {
        let mut spin = a.create_label();
        // 8259: vectors 0x20/0x28, only IRQ0 unmasked.
        for (port, v) in [
            (0x20u8, 0x11u8),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 2),
            (0xa1, 1),
            (0x21, 0xfe),
            (0xa1, 0xff),
        ] {
            a.mov(al, v as u32).unwrap();
            a.out(port as u32, al).unwrap();
        }
        // PIT channel 0, mode 2, ~1 ms.
        a.mov(al, 0x34u32).unwrap();
        a.out(0x43, al).unwrap();
        a.mov(al, 0xa9u32).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(al, 0x04u32).unwrap();
        a.out(0x40, al).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.sti().unwrap();
        a.set_label(&mut spin).unwrap();
        a.inc(rcx).unwrap();
        a.jmp(spin).unwrap();
    });
    let hcode = asm(64, handler, |a| {
        a.mov(r15, rcx).unwrap();
        a.mov(r14, qword_ptr(rsp)).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.write(handler, &hcode);
    h.gate64(0x20, handler, 0, 0);
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    let r = h.regs();
    assert!(r.r15 > 0, "the loop ran before the tick");
    assert!(
        r.r14 >= CODE && r.r14 < CODE + 0x100,
        "interrupted inside the loop: {:#x}",
        r.r14
    );
}

/// Real mode: `int n` through the IVT, `iret`, a 16-bit string copy and segment arithmetic.
#[test]
fn real_mode_ivt_interrupt_and_iret() {
    let mut h = Harness::new(4);
    let code = asm(16, 0x7c00, |a| {
        a.mov(ax, 0x1000).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(word_ptr(0x10), 0x4142).unwrap(); // 0x10010
        a.xor(ax, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(si, 0x10).unwrap();
        a.mov(di, 0x600).unwrap();
        a.mov(cx, 2).unwrap();
        a.cld().unwrap();
        a.rep().movsb().unwrap(); // ds:si -> es:di
        a.int(0x21).unwrap();
        a.mov(dx, ax).unwrap();
        a.hlt().unwrap();
    });
    let handler = asm(16, 0x8000, |a| {
        a.mov(ax, 0x55aa).unwrap();
        a.iret().unwrap();
    });
    h.write(0x7c00, &code);
    h.write(0x8000, &handler);
    // IVT entry 0x21 -> 0000:8000
    h.write(0x21 * 4, &[0x00, 0x80, 0x00, 0x00]);
    h.vcpu.set_sregs(&common::real_mode_sregs()).unwrap();
    h.vcpu
        .set_regs(&Regs {
            rip: 0x7c00,
            rsp: 0x7000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    let r = h.regs();
    assert_eq!(r.rdx & 0xffff, 0x55aa);
    assert_eq!(r.rsp, 0x7000, "iret popped the frame");
    assert_eq!(h.r64(0x600) & 0xffff, 0x4142);
}
