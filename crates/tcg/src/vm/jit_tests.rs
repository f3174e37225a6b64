//! The compiled tier against the interpreter, through the block runner the vCPU loop uses
//! (`run_block`): random blocks give the same registers, flags, memory and instruction count;
//! a write to compiled code is seen; a fault in the middle of a compiled block is precise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use iced_x86::code_asm::*;
use keel_accel::IoBuses;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BlockEnd, run_block};
use crate::cpu::{Cpu, Seg, fl, sr};
use crate::decode::BlockCache;
use crate::exc::{Ex, vec};
use crate::exec::system;
use crate::jit::{Jit, JitConfig};
use crate::mem::PhysMem;
use crate::regs::{cr0, cr4, efer};

const CODE: u64 = 0x1000;
const DATA: u64 = 0x8000;
const STACK: u64 = 0xb000;

/// A 64-bit CPU (paging off) over 2 MiB of RAM with `code` at `CODE`.
fn cpu64(code: &[u8]) -> Cpu {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap());
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let phys = PhysMem::new(mem, Arc::new(IoBuses::new()));
    let mut cpu = Cpu::new(phys, Default::default(), 0);
    cpu.seg[sr::CS] = Seg::real(0);
    cpu.cr0 |= cr0::PE;
    cpu.efer |= efer::LME | efer::LMA;
    cpu.seg[sr::CS].attr |= 1 << 13;
    cpu.refresh_mode();
    cpu.rip = CODE;
    assert_eq!(cpu.bitness(), 64);
    cpu
}

/// A block cache whose compiler is off, or compiles every block at its first run.
fn cache(jit: bool) -> BlockCache {
    let mut c = BlockCache::new();
    c.jit = Jit::new(JitConfig {
        enabled: jit,
        threshold: 0,
    });
    c
}

/// Runs blocks as the vCPU loop does until RIP is `end`; returns the first exception (with
/// the RIP of the instruction that raised it).
fn run_to(cpu: &mut Cpu, cache: &mut BlockCache, end: u64) -> Option<(Ex, u64)> {
    for _ in 0..100_000 {
        if cpu.rip == end {
            return None;
        }
        if cpu.stop_block {
            cpu.stop_block = false;
            cache.process_dirty(cpu);
        }
        let b = cache.lookup(cpu).unwrap();
        let blk = &cache.blocks[b as usize];
        match run_block(cpu, blk, &mut cache.jit) {
            BlockEnd::Normal | BlockEnd::Ex(Ex::EndBlock, _) => {}
            BlockEnd::Stopped => {
                cpu.stop_block = false;
                cache.process_dirty(cpu);
            }
            BlockEnd::Ex(e, ip) => return Some((e, ip)),
        }
    }
    panic!("did not reach {end:#x}");
}

fn assemble(f: impl FnOnce(&mut CodeAssembler, &mut CodeLabel)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut end = a.create_label();
    f(&mut a, &mut end);
    a.set_label(&mut end).unwrap();
    a.nop().unwrap();
    a.assemble(CODE).unwrap()
}

/// The address of the final `nop` of code made by [`assemble`].
fn end_of(code: &[u8]) -> u64 {
    CODE + code.len() as u64 - 1
}

/// Random loops of integer, memory and stack instructions, direct and indirect calls and
/// jumps: compiling every block gives the interpreter's registers, status flags, memory and
/// instruction count.
#[test]
fn compiled_blocks_match_the_interpreter() {
    let regs = [rax, rcx, rdx, rbx, rsi, rdi, r8, r9, r10, r11];
    let regs32 = [eax, ecx, edx, ebx, esi, edi, r8d, r9d, r10d, r11d];
    let regs8 = [al, cl, dl, bl, sil, dil, r8b, r11b];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut compiled = 0;
    for case in 0..2000u64 {
        let len = 1 + rnd(20);
        let mut ops = Vec::new();
        for _ in 0..len {
            ops.push((
                rnd(40),
                rnd(regs.len()),
                rnd(regs.len()),
                (rnd(0x100) * 8) as i32,
                [0i32, 1, -1, 7, 0x7fff_ffff, -0x8000_0000, 0x1234][rnd(7)],
                1 + rnd(63),
            ));
        }
        let code = assemble(|a, end| {
            let mut lp = a.create_label();
            let mut func = a.create_label();
            a.mov(r14d, 3u32).unwrap();
            a.lea(r15, qword_ptr(func)).unwrap();
            a.set_label(&mut lp).unwrap();
            for &(op, x, y, d, imm, sh) in &ops {
                let (rx, ry) = (regs[x], regs[y]);
                let (ex, ey) = (regs32[x], regs32[y]);
                let b8 = regs8[x % regs8.len()];
                let m = qword_ptr(r12 + d);
                let m32 = dword_ptr(r13 + d);
                match op {
                    0 => a.add(rx, ry),
                    1 => a.adc(ex, ey),
                    2 => a.sub(rx, imm),
                    3 => a.sbb(rx, ry),
                    4 => a.and(ex, imm),
                    5 => a.or(rx, ry),
                    6 => a.xor(ex, ey),
                    7 => a.cmp(rx, ry),
                    8 => a.test(ex, ey),
                    9 => a.mov(rx, m),
                    10 => a.mov(m32, ey),
                    11 => a.add(rx, m),
                    12 => a.sub(m, rx),
                    13 => a.adc(m32, imm),
                    14 => a.inc(m32),
                    15 => a.dec(rx),
                    16 => a.neg(ex),
                    17 => a.not(rx),
                    18 => a.mul(ry),
                    19 => a.imul_2(rx, m),
                    20 => a.imul_3(ex, ey, imm),
                    21 => a.shl(rx, sh as u32),
                    22 => a.shr(ex, (sh % 32) as u32),
                    23 => a.sar(rx, 1u32),
                    24 => a.movzx(ex, byte_ptr(r12 + d)),
                    25 => a.movsxd(rx, m32),
                    26 => a.lea(rx, qword_ptr(ry + ry * 4 + imm)),
                    27 => a.push(rx).and_then(|()| a.pop(ry)),
                    28 => a.push(imm).and_then(|()| a.pop(rx)),
                    29 => a.setb(b8),
                    // Flag readers read CF (defined after every op here) or follow a `cmp`: the
                    // interpreter's choices for undefined flags (SF after `imul`, ...) are
                    // not the host's.
                    30 => a.cmp(rx, ry).and_then(|()| a.cmovl(rx, m)),
                    31 => a.xchg(m, rx),
                    32 => a.mov(byte_ptr(r13 + d + 3), b8),
                    33 => a.xadd(m, rx),
                    34 => a.cmpxchg(m32, ey),
                    35 => a.bts(rx, (sh % 64) as u32),
                    36 => a.btr(m32, (sh % 32) as u32),
                    37 => a.bsr(rx, ry).and_then(|()| a.cmp(rx, ry)),
                    38 => a.call(r15),
                    _ => a.cqo(),
                }
                .unwrap();
            }
            let mut next = a.create_label();
            a.lea(rdi, qword_ptr(next)).unwrap();
            a.jmp(rdi).unwrap();
            a.set_label(&mut next).unwrap();
            a.dec(r14d).unwrap();
            a.jnz(lp).unwrap();
            a.jmp(*end).unwrap();
            // Called through r15: returns at once.
            a.set_label(&mut func).unwrap();
            a.ret().unwrap();
        });
        let end = end_of(&code);
        let mut out = Vec::new();
        for jit in [false, true] {
            let mut cpu = cpu64(&code);
            for (k, g) in cpu.gpr[..16].iter_mut().enumerate() {
                *g = (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ case;
            }
            cpu.gpr[12] = DATA;
            cpu.gpr[13] = DATA + 0x800;
            cpu.gpr[4] = STACK;
            let pattern: Vec<u8> = (0..0x1000u32).map(|k| (k * 7 + 3) as u8).collect();
            cpu.mmu.phys.write(DATA, &pattern);
            let mut c = cache(jit);
            assert!(run_to(&mut cpu, &mut c, end).is_none(), "case {case}");
            let mut mem = vec![0u8; 0x1000];
            cpu.mmu.phys.read(DATA, &mut mem);
            let mut stack = vec![0u8; 0x100];
            cpu.mmu.phys.read(STACK - 0x100, &mut stack);
            compiled += c.jit.stats.compiled;
            assert!(
                c.jit.stats.rejected.is_empty(),
                "case {case}: every instruction compiles: {:?}",
                c.jit.stats.rejected
            );
            out.push((cpu.gpr, cpu.flags() & fl::ARITH, cpu.icount, mem, stack));
        }
        let (i, j) = (&out[0], &out[1]);
        let listing = || {
            let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
            d.iter()
                .map(|i| {
                    format!(
                        "{:?} {:?} {:?} {:#x}",
                        i.code(),
                        (0..i.op_count())
                            .map(|k| i.op_register(k))
                            .collect::<Vec<_>>(),
                        i.memory_base(),
                        i.immediate32()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        if i.0 != j.0 {
            eprintln!("{}", listing());
        }
        assert_eq!(i.0, j.0, "case {case}: registers");
        assert_eq!(i.1, j.1, "case {case}: flags");
        assert_eq!(i.2, j.2, "case {case}: instruction count");
        assert!(i.3 == j.3, "case {case}: memory");
        assert!(i.4 == j.4, "case {case}: stack");
    }
    assert!(compiled >= 300, "blocks were compiled: {compiled}");
}

/// A store that rewrites an immediate of a compiled block: the next run of that code sees
/// the new immediate (the block and its compiled code are dropped).
#[test]
fn a_write_to_compiled_code_drops_it() {
    // Block A at CODE: add rax, imm32(=1); jmp B. Block B: dec ecx; jnz A.
    // Then: mov dword [imm of A], 0x100; mov ecx, 2; jmp A (runs A twice more); end.
    let code = assemble(|a, end| {
        let mut blk_a = a.create_label();
        let mut blk_b = a.create_label();
        let mut patch = a.create_label();
        a.set_label(&mut blk_a).unwrap();
        a.add(rax, 0x7fff_0001).unwrap();
        a.jmp(blk_b).unwrap();
        a.set_label(&mut blk_b).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(blk_a).unwrap();
        a.test(edx, edx).unwrap();
        a.jnz(*end).unwrap();
        a.set_label(&mut patch).unwrap();
        a.mov(edx, 1u32).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.mov(dword_ptr(rbx), 0x100u32).unwrap();
        a.jmp(blk_a).unwrap();
    });
    // `add rax, imm32` is 48 05 imm32.
    assert_eq!(&code[..2], &[0x48, 0x05]);
    let imm_at = CODE + 2;
    let mut cpu = cpu64(&code);
    cpu.gpr[2] = 0;
    cpu.gpr[1] = 10; // ecx: block A runs 10 times, compiled from its first run
    cpu.gpr[3] = imm_at;
    let mut c = cache(true);
    assert!(run_to(&mut cpu, &mut c, end_of(&code)).is_none());
    assert!(c.jit.stats.compiled >= 2, "A and B ran compiled");
    assert_eq!(cpu.gpr[0], 10 * 0x7fff_0001 + 2 * 0x100);
}

/// Identity-maps the first 2 MiB with 4 KiB pages (tables at 0x10_0000..), with page
/// `hole` not present, and turns on 4-level paging.
fn page(cpu: &mut Cpu, hole: u64) {
    let (pml4, pdpt, pd, pt) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64, 0x10_3000u64);
    let w = |cpu: &mut Cpu, at: u64, v: u64| cpu.mmu.phys.write(at, &v.to_le_bytes());
    w(cpu, pml4, pdpt | 3);
    w(cpu, pdpt, pd | 3);
    w(cpu, pd, pt | 3);
    for k in 0..512u64 {
        let v = if k * 4096 == hole { 0 } else { (k * 4096) | 3 };
        w(cpu, pt + 8 * k, v);
    }
    cpu.cr3 = pml4;
    cpu.cr4 |= cr4::PAE;
    cpu.cr0 |= cr0::PG;
    system::update_paging(cpu);
}

/// A page fault on a memory access in the middle of a compiled block is precise: RIP at
/// the faulting instruction, CR2 its address, the registers of the instructions before it
/// written, of those after it not, the instruction count exact.
#[test]
fn a_fault_in_a_compiled_block_is_precise() {
    let code = assemble(|a, end| {
        let mut lp = a.create_label();
        a.set_label(&mut lp).unwrap();
        a.add(rax, 1).unwrap();
        a.lea(rbx, qword_ptr(rax + 0x10)).unwrap();
        a.mov(qword_ptr(rsi), rbx).unwrap();
        a.mov(rdx, rax).unwrap();
        a.add(rdi, 1).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(lp).unwrap();
        a.jmp(*end).unwrap();
    });
    let store_ip = iced_x86::Decoder::with_ip(64, &code, CODE, 0)
        .iter()
        .nth(2)
        .unwrap()
        .ip();
    let hole = 0x4000u64;
    let mut cpu = cpu64(&code);
    page(&mut cpu, hole);
    cpu.gpr[1] = 5;
    cpu.gpr[6] = DATA;
    let mut c = cache(true);
    assert!(run_to(&mut cpu, &mut c, end_of(&code)).is_none());
    assert!(c.jit.stats.compiled >= 1);
    assert_eq!(cpu.mmu.phys.read_u64(DATA), 5 + 0x10);
    // The same compiled loop, now storing to the absent page.
    cpu.rip = CODE;
    cpu.gpr[1] = 5;
    cpu.gpr[6] = hole + 8;
    let (old_rdx, old_rdi, icount) = (cpu.gpr[2], cpu.gpr[7], cpu.icount);
    let Some((Ex::Fault { vector, error }, ip)) = run_to(&mut cpu, &mut c, end_of(&code)) else {
        panic!("no fault");
    };
    assert_eq!((vector, ip), (vec::PF, store_ip));
    assert_eq!(error & 3, 2, "not present, write");
    assert_eq!(cpu.cr2, hole + 8);
    assert_eq!(cpu.gpr[0], 6, "add before the store ran");
    assert_eq!(cpu.gpr[3], 6 + 0x10, "lea before the store ran");
    assert_eq!(
        (cpu.gpr[2], cpu.gpr[7]),
        (old_rdx, old_rdi),
        "nothing after the store ran"
    );
    assert_eq!(cpu.icount, icount + 2, "two instructions retired");
    assert!(c.jit.stats.compiled >= 1);
}
