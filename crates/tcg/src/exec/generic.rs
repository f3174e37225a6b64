//! The generic interpreter: executes any instruction by mnemonic (the fallback of
//! [`super::select`]), calling into the instruction groups for the less common ones.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::alu::{self, alu_mnemonic, alu_op};
use super::operands::{ea, ea_off, far_ptr, mask, op_size, rd_op, sext, wr_op};
use super::{arith, sse, string, system, x87};
use crate::cpu::{CcOp, Cpu, fl, sr};
use crate::exc::{Ex, Flow, vec};
use crate::insn::{Insn, gpr, sreg, xmm};

fn cc_of(ins: &Instruction) -> u8 {
    (ins.condition_code() as u8).wrapping_sub(1)
}

/// Executes any instruction by mnemonic. Slower than the specialised handlers.
pub(crate) fn generic(cpu: &mut Cpu, i: &Insn) -> Flow {
    generic_body(cpu, i)?;
    // `generic_body` has set RIP (to the next instruction or a branch target).
    if cpu.stop_block {
        return Err(Ex::EndBlock);
    }
    Ok(())
}

fn generic_body(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = i.next_ip;
    let ins = &i.instr;
    let m = ins.mnemonic();
    let s = i.size;
    if let Some(op) = alu_mnemonic(m) {
        let s0 = op_size(i, 0);
        let a = rd_op(cpu, i, 0, s0)?;
        let b = rd_op(cpu, i, 1, s0)?;
        let r = alu_op(cpu, op, s0, a, b);
        if op != alu::CMP && op != alu::TEST {
            wr_op(cpu, i, 0, s0, r)?;
        }
        return Ok(());
    }
    match m {
        M::Mov => {
            let k0 = ins.op_kind(0);
            if k0 == OpKind::Register {
                let r = ins.op_register(0);
                if let Some(sg) = sreg(r) {
                    let v = rd_op(cpu, i, 1, 2)?;
                    return system::mov_to_sreg(cpu, sg, v as u16);
                }
                if is_cr(r) || is_dr(r) {
                    return system::mov_to_crdr(cpu, i);
                }
            }
            if ins.op_kind(1) == OpKind::Register {
                let r = ins.op_register(1);
                if is_cr(r) || is_dr(r) {
                    return system::mov_from_crdr(cpu, i);
                }
                if let Some(sg) = sreg(r) {
                    let v = u64::from(cpu.seg[sg].selector);
                    let sz = if k0 == OpKind::Memory {
                        2
                    } else {
                        op_size(i, 0)
                    };
                    return wr_op(cpu, i, 0, sz, v);
                }
            }
            let s0 = op_size(i, 0);
            let v = rd_op(cpu, i, 1, s0)?;
            wr_op(cpu, i, 0, s0, v)
        }
        M::Movzx => {
            let v = rd_op(cpu, i, 1, op_size(i, 1))?;
            wr_op(cpu, i, 0, s, v)
        }
        M::Movsx | M::Movsxd => {
            let ss = op_size(i, 1);
            let v = sext(rd_op(cpu, i, 1, ss)?, ss);
            wr_op(cpu, i, 0, s, v)
        }
        M::Lea => {
            let v = ea_off(cpu, i);
            wr_op(cpu, i, 0, s, v)
        }
        M::Xchg => {
            let s0 = op_size(i, 0);
            let a = rd_op(cpu, i, 0, s0)?;
            let b = rd_op(cpu, i, 1, s0)?;
            // Write memory first so a fault leaves registers untouched.
            if ins.op_kind(0) == OpKind::Memory {
                wr_op(cpu, i, 0, s0, b)?;
                wr_op(cpu, i, 1, s0, a)
            } else {
                wr_op(cpu, i, 1, s0, a)?;
                wr_op(cpu, i, 0, s0, b)
            }
        }
        M::Push => {
            let sz = push_size(cpu, i);
            let v = match ins.op_kind(0) {
                OpKind::Register if sreg(ins.op_register(0)).is_some() => {
                    u64::from(cpu.seg[sreg(ins.op_register(0)).unwrap_or(0)].selector)
                }
                OpKind::Memory => {
                    let a = ea(cpu, i);
                    cpu.rd_n(a, sz)?
                }
                OpKind::Register => rd_op(cpu, i, 0, sz)?,
                _ => ins.immediate(0) & mask(sz),
            };
            cpu.push(sz, v)
        }
        M::Pop => {
            let sz = push_size(cpu, i);
            if ins.op_kind(0) == OpKind::Register
                && let Some(sg) = sreg(ins.op_register(0))
            {
                let v = cpu.peek(0, sz)?;
                system::mov_to_sreg(cpu, sg, v as u16)?;
                cpu.add_sp(u64::from(sz));
                return Ok(());
            }
            let v = cpu.pop(sz)?;
            if ins.op_kind(0) == OpKind::Memory {
                // The address is computed after RSP is incremented.
                let a = ea(cpu, i);
                if let Err(e) = cpu.wr_n(a, sz, v) {
                    cpu.add_sp(0u64.wrapping_sub(u64::from(sz)));
                    return Err(e);
                }
                Ok(())
            } else {
                wr_op(cpu, i, 0, sz, v)
            }
        }
        M::Pushf | M::Pushfd | M::Pushfq => system::pushf(cpu, i),
        M::Popf | M::Popfd | M::Popfq => system::popf(cpu, i),
        M::Pusha | M::Pushad => {
            let sz = if m == M::Pushad { 4 } else { 2 };
            let sp = cpu.gpr[4];
            for r in 0..8u8 {
                let v = if r == 4 { sp } else { cpu.gpr[r as usize] };
                cpu.push(sz, v & mask(sz))?;
            }
            Ok(())
        }
        M::Popa | M::Popad => {
            let sz = if m == M::Popad { 4 } else { 2 };
            let mut vals = [0u64; 8];
            for k in 0..8u64 {
                vals[7 - k as usize] = cpu.peek(k * u64::from(sz), sz)?;
            }
            for r in 0..8u8 {
                if r != 4 {
                    cpu.wreg(r, sz, vals[r as usize]);
                }
            }
            cpu.add_sp(8 * u64::from(sz));
            Ok(())
        }
        M::Cbw => {
            let v = sext(cpu.gpr[0] & 0xff, 1);
            cpu.wreg(0, 2, v);
            Ok(())
        }
        M::Cwde => {
            let v = sext(cpu.gpr[0] & 0xffff, 2);
            cpu.wreg(0, 4, v);
            Ok(())
        }
        M::Cdqe => {
            cpu.gpr[0] = sext(cpu.gpr[0], 4);
            Ok(())
        }
        M::Cwd | M::Cdq | M::Cqo => {
            let sz = match m {
                M::Cwd => 2,
                M::Cdq => 4,
                _ => 8,
            };
            let neg = cpu.gpr[0] & (1 << (sz * 8 - 1)) != 0;
            cpu.wreg(2, sz, if neg { u64::MAX } else { 0 });
            Ok(())
        }
        M::Bswap => {
            let v = cpu.rreg(i.r0, s);
            let r = match s {
                4 => u64::from((v as u32).swap_bytes()),
                8 => v.swap_bytes(),
                _ => 0, // 16-bit bswap is undefined; hardware gives zero
            };
            cpu.wreg(i.r0, s, r);
            Ok(())
        }
        M::Movbe => {
            let s0 = op_size(i, 0);
            let v = rd_op(cpu, i, 1, s0)?;
            let r = match s0 {
                2 => u64::from((v as u16).swap_bytes()),
                4 => u64::from((v as u32).swap_bytes()),
                _ => v.swap_bytes(),
            };
            wr_op(cpu, i, 0, s0, r)
        }
        m if is_cmov(m) => {
            let v = rd_op(cpu, i, 1, s)?;
            if cpu.cond(cc_of(ins)) {
                wr_op(cpu, i, 0, s, v)
            } else {
                // A 32-bit cmov zero-extends even when the condition is false.
                if s == 4 {
                    let old = cpu.rreg(i.r0, 4);
                    cpu.wreg(i.r0, 4, old);
                }
                Ok(())
            }
        }
        M::Sete
        | M::Setne
        | M::Setb
        | M::Setae
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg
        | M::Seto
        | M::Setno => {
            let v = u64::from(cpu.cond(cc_of(ins)));
            wr_op(cpu, i, 0, 1, v)
        }
        M::Lahf => {
            let f = cpu.flags() & 0xd5 | 2;
            cpu.w8(16, f);
            Ok(())
        }
        M::Sahf => {
            let ah = cpu.r8(16);
            let f = (cpu.flags() & !0xd5) | (ah & 0xd5);
            cpu.set_arith_flags(f);
            Ok(())
        }
        M::Xlatb => {
            let off = cpu.gpr[3].wrapping_add(cpu.gpr[0] & 0xff) & i.amask;
            let lin = cpu.ebase[i.seg as usize].wrapping_add(off) & cpu.lin_mask;
            let v = cpu.rd::<1>(lin)?;
            cpu.w8(0, v);
            Ok(())
        }
        M::Inc | M::Dec | M::Neg | M::Not => {
            let s0 = op_size(i, 0);
            let a = rd_op(cpu, i, 0, s0)?;
            let mk = mask(s0);
            let r = match m {
                M::Inc | M::Dec => {
                    let c = u64::from(cpu.cf());
                    let r = if m == M::Dec {
                        a.wrapping_sub(1)
                    } else {
                        a.wrapping_add(1)
                    } & mk;
                    cpu.cc = crate::cpu::Cc {
                        op: if m == M::Dec { CcOp::Dec } else { CcOp::Inc },
                        size: s0,
                        res: r,
                        a,
                        b: 1,
                        aux: c,
                    };
                    r
                }
                M::Neg => alu_op(cpu, alu::SUB, s0, 0, a),
                _ => !a & mk,
            };
            wr_op(cpu, i, 0, s0, r)
        }
        M::Mul | M::Imul | M::Div | M::Idiv => arith::muldiv(cpu, i),
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
            arith::shift(cpu, i)
        }
        M::Shld | M::Shrd => arith::shiftd(cpu, i),
        M::Bt | M::Bts | M::Btr | M::Btc => arith::bit_test(cpu, i),
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => arith::bit_scan(cpu, i),
        M::Xadd => {
            let s0 = op_size(i, 0);
            let a = rd_op(cpu, i, 0, s0)?;
            let b = rd_op(cpu, i, 1, s0)?;
            let r = alu_op(cpu, alu::ADD, s0, a, b);
            wr_op(cpu, i, 0, s0, r)?;
            wr_op(cpu, i, 1, s0, a)
        }
        M::Cmpxchg => {
            let s0 = op_size(i, 0);
            let d = rd_op(cpu, i, 0, s0)?;
            let acc = cpu.rreg(0, s0);
            alu_op(cpu, alu::CMP, s0, acc, d);
            if acc == d {
                let src = rd_op(cpu, i, 1, s0)?;
                wr_op(cpu, i, 0, s0, src)
            } else {
                // The destination is written back with its own value (locked cycle).
                if ins.op_kind(0) == OpKind::Memory {
                    wr_op(cpu, i, 0, s0, d)?;
                }
                cpu.wreg(0, s0, d);
                Ok(())
            }
        }
        M::Cmpxchg8b | M::Cmpxchg16b => arith::cmpxchg_wide(cpu, i),
        M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => arith::bcd(cpu, i),
        M::Clc => {
            cpu.set_flag(fl::CF, false);
            Ok(())
        }
        M::Stc => {
            cpu.set_flag(fl::CF, true);
            Ok(())
        }
        M::Cmc => {
            let c = cpu.cf();
            cpu.set_flag(fl::CF, !c);
            Ok(())
        }
        M::Cld => {
            cpu.rflags &= !fl::DF;
            Ok(())
        }
        M::Std => {
            cpu.rflags |= fl::DF;
            Ok(())
        }
        M::Jmp => match ins.op_kind(0) {
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let sel = ins.far_branch_selector();
                let off = if ins.op_kind(0) == OpKind::FarBranch16 {
                    u64::from(ins.far_branch16())
                } else {
                    u64::from(ins.far_branch32())
                };
                system::far_jmp(cpu, sel, off, i)
            }
            OpKind::Memory if ins.memory_size().size() > 8 || is_far(ins) => {
                let (sel, off) = far_ptr(cpu, i)?;
                system::far_jmp(cpu, sel, off, i)
            }
            _ => {
                let v = rd_op(cpu, i, 0, s)?;
                cpu.rip = v;
                Ok(())
            }
        },
        M::Call => match ins.op_kind(0) {
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let sel = ins.far_branch_selector();
                let off = if ins.op_kind(0) == OpKind::FarBranch16 {
                    u64::from(ins.far_branch16())
                } else {
                    u64::from(ins.far_branch32())
                };
                system::far_call(cpu, sel, off, i)
            }
            OpKind::Memory if is_far(ins) => {
                let (sel, off) = far_ptr(cpu, i)?;
                system::far_call(cpu, sel, off, i)
            }
            _ => {
                let v = rd_op(cpu, i, 0, s)?;
                let ps = stack_size(ins, cpu.bitness());
                cpu.push(ps, i.next_ip)?;
                cpu.rip = v & mask(ps);
                Ok(())
            }
        },
        M::Retf => system::far_ret(cpu, i),
        M::Iret | M::Iretd | M::Iretq => system::iret(cpu, i),
        M::Jcxz | M::Jecxz | M::Jrcxz => {
            let sz = match m {
                M::Jcxz => 2,
                M::Jecxz => 4,
                _ => 8,
            };
            if cpu.rreg(1, sz) == 0 {
                cpu.rip = i.imm;
            }
            Ok(())
        }
        M::Loop | M::Loope | M::Loopne => {
            let asz = match ins.code().op_code().address_size() {
                16 => 2,
                32 => 4,
                _ => 8,
            };
            let c = cpu.rreg(1, asz).wrapping_sub(1) & mask(asz);
            cpu.wreg(1, asz, c);
            let take = c != 0
                && match m {
                    M::Loope => cpu.zf(),
                    M::Loopne => !cpu.zf(),
                    _ => true,
                };
            if take {
                cpu.rip = i.imm;
            }
            Ok(())
        }
        M::Enter => {
            let sz = stack_size(ins, cpu.bitness());
            let alloc = u64::from(ins.immediate16());
            let level = ins.immediate8_2nd() & 31;
            let bp = cpu.rreg(5, sz);
            cpu.push(sz, bp)?;
            let frame = cpu.gpr[4] & mask(sz);
            for l in 1..u64::from(level) {
                let off = bp.wrapping_sub(l * u64::from(sz)) & cpu.sp_mask;
                let lin = cpu.ebase[sr::SS].wrapping_add(off) & cpu.lin_mask;
                let v = cpu.rd_n(lin, sz)?;
                cpu.push(sz, v)?;
            }
            if level > 0 {
                cpu.push(sz, frame)?;
            }
            cpu.wreg(5, sz, frame);
            cpu.add_sp(0u64.wrapping_sub(alloc));
            Ok(())
        }
        M::Leave => {
            let sz = match ins.code().op_code().operand_size() {
                16 => 2,
                32 => 4,
                64 => 8,
                _ => {
                    if cpu.bitness() == 64 {
                        8
                    } else if cpu.bitness() == 32 {
                        4
                    } else {
                        2
                    }
                }
            };
            let bp = cpu.gpr[5] & cpu.sp_mask;
            let lin = cpu.ebase[sr::SS].wrapping_add(bp) & cpu.lin_mask;
            let v = cpu.rd_n(lin, sz)?;
            cpu.gpr[4] =
                (cpu.gpr[4] & !cpu.sp_mask) | (bp.wrapping_add(u64::from(sz)) & cpu.sp_mask);
            cpu.wreg(5, sz, v);
            Ok(())
        }
        M::Int => Err(Ex::SoftInt(ins.immediate8())),
        M::Int3 => Err(Ex::SoftInt(vec::BP)),
        M::Into => {
            if cpu.of() {
                Err(Ex::SoftInt(vec::OF))
            } else {
                Ok(())
            }
        }
        M::Int1 => Err(Ex::SoftInt(vec::DB)),
        M::Bound => {
            // Legacy modes only (in 64-bit mode 62 is the EVEX prefix, which iced-x86 does not
            // decode as BOUND); a register second operand is #UD.
            if ins.op_kind(1) != OpKind::Memory {
                return Err(Ex::UD);
            }
            let (r, sz) = gpr(ins.op0_register()).ok_or(Ex::UD)?;
            let a = ea(cpu, i);
            let lo = cpu.rd_n(a, sz)?;
            let hi = cpu.rd_n(a.wrapping_add(u64::from(sz)) & cpu.lin_mask, sz)?;
            let idx = sext(cpu.rreg(r, sz), sz) as i64;
            if idx < sext(lo, sz) as i64 || idx > sext(hi, sz) as i64 {
                // A fault: RIP goes back to the BOUND.
                return Err(Ex::Fault {
                    vector: vec::BR,
                    error: crate::exc::NO_ERR,
                });
            }
            Ok(())
        }
        M::Ud0 | M::Ud1 | M::Ud2 => Err(Ex::UD),
        M::Nop
        | M::Pause
        | M::Endbr64
        | M::Endbr32
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Clflush
        | M::Clflushopt
        | M::Wait => {
            if m == M::Wait {
                return x87::fwait(cpu);
            }
            Ok(())
        }
        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Cmpsq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd
            if is_string(ins) =>
        {
            string::string_op(cpu, i)
        }
        M::In | M::Out => system::in_out(cpu, i),
        _ => {
            if let Some(r) = system::exec_system(cpu, i) {
                return r;
            }
            if let Some(r) = sse::exec_sse(cpu, i) {
                return r;
            }
            if let Some(r) = x87::exec_x87(cpu, i) {
                return r;
            }
            Err(Ex::UD)
        }
    }
}

fn is_string(ins: &Instruction) -> bool {
    // movsd/cmpsd are also SSE2 mnemonics: the string forms have no register operands.
    (0..ins.op_count())
        .all(|k| !matches!(ins.op_kind(k), OpKind::Register) || xmm(ins.op_register(k)).is_none())
}

fn is_cr(r: Register) -> bool {
    (Register::CR0 as u32..Register::CR0 as u32 + 16).contains(&(r as u32))
}

fn is_dr(r: Register) -> bool {
    (Register::DR0 as u32..Register::DR0 as u32 + 16).contains(&(r as u32))
}

fn is_far(ins: &Instruction) -> bool {
    use iced_x86::MemorySize as Ms;
    matches!(
        ins.memory_size(),
        Ms::SegPtr16 | Ms::SegPtr32 | Ms::SegPtr64
    )
}

fn push_size(cpu: &Cpu, i: &Insn) -> u8 {
    let ins = &i.instr;
    match ins.code().op_code().operand_size() {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => {
            if ins.op_kind(0) == OpKind::Register
                && let Some((_, s)) = gpr(ins.op_register(0))
            {
                return s;
            }
            match cpu.bitness() {
                64 => 8,
                32 => 4,
                _ => 2,
            }
        }
    }
}

pub(super) fn is_cmov(m: M) -> bool {
    matches!(
        m,
        M::Cmove
            | M::Cmovne
            | M::Cmovb
            | M::Cmovae
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Cmovo
            | M::Cmovno
    )
}

pub(super) fn is_setcc(m: M) -> bool {
    matches!(
        m,
        M::Sete
            | M::Setne
            | M::Setb
            | M::Setae
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
            | M::Seto
            | M::Setno
    )
}

pub(super) fn is_jcc(m: M) -> bool {
    matches!(
        m,
        M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg
    )
}

/// Operand size of a near call/ret/push-like instruction from its code's operand size.
pub(super) fn stack_size(ins: &Instruction, bitness: u32) -> u8 {
    let os = ins.code().op_code().operand_size();
    match os {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => match bitness {
            64 => 8,
            32 => 4,
            _ => 2,
        },
    }
}
