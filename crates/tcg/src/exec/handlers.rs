//! Specialised handlers: one function per hot integer instruction form, chosen at
//! translation time by `select`, and the macros that instantiate them by size.
//!
//! A write to a page that holds translated code (only the slow path of a write can do that:
//! write-TLB entries never map such pages) sets `Cpu::stop_block`; the block must not run
//! another instruction, which may be the one just rewritten. The block loop does not look at
//! the flag between instructions: every handler that writes memory ends with
//! `end_if_code_written`, which turns it into `Ex::EndBlock` with RIP at the successor.

use super::alu::{self, alu_op};
use super::arith;
use super::operands::{ea, ea_off, mask, sext};
use crate::cpu::{CcOp, Cpu};
use crate::exc::{Ex, Flow};
use crate::insn::{Handler, Insn, NOREG};

/// Ends the block after a non-branch instruction that wrote translated code.
#[inline(always)]
pub(super) fn end_if_code_written(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.stop_block {
        return code_written(cpu, i.next_ip);
    }
    Ok(())
}

#[cold]
#[inline(never)]
pub(super) fn code_written(cpu: &mut Cpu, next: u64) -> Flow {
    cpu.rip = next;
    Err(Ex::EndBlock)
}

/// The sign bit of a `size`-byte value (1, 2, 4 or 8).
#[inline(always)]
pub(super) const fn sign_bit_of(size: u8) -> u64 {
    1u64 << ((size as u32 * 8 - 1) & 63)
}

pub(super) fn alu_rr<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let b = cpu.rreg(i.r1, S);
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

pub(super) fn alu_ri<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let r = alu_op(cpu, OP, S, a, i.imm);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

pub(super) fn alu_rm<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let lin = ea(cpu, i);
    let b = cpu.rd_n(lin, S)?;
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

pub(super) fn alu_mr<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    let b = cpu.rreg(i.r0, S);
    alu_m_finish::<OP, S>(cpu, i, lin, a, b)
}

pub(super) fn alu_mi<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    alu_m_finish::<OP, S>(cpu, i, lin, a, i.imm)
}

/// The ALU step and write-back of a memory destination. `adc`/`sbb` read CF: if the write
/// faults, the flags go back to what they were, so that the instruction runs again with the
/// same carry after the fault is handled.
#[inline(always)]
pub(super) fn alu_m_finish<const OP: u8, const S: u8>(
    cpu: &mut Cpu,
    i: &Insn,
    lin: u64,
    a: u64,
    b: u64,
) -> Flow {
    let saved = (OP == alu::ADC || OP == alu::SBB).then_some(cpu.cc);
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        if let Err(e) = cpu.wr_n(lin, S, r) {
            if let Some(cc) = saved {
                cpu.cc = cc;
            }
            return Err(e);
        }
        return end_if_code_written(cpu, i);
    }
    Ok(())
}

pub(super) fn mov_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r1, S);
    cpu.wreg(i.r0, S, v);
    Ok(())
}

pub(super) fn mov_ri<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.wreg(i.r0, S, i.imm);
    Ok(())
}

// The load/store handlers try the TLB hit inline and leave everything else to a cold
// out-of-line copy, so that the hit path needs no saved registers or stack frame.

/// Linear address of a memory operand that [`is_flat`] accepted: base plus displacement.
#[inline(always)]
pub(super) fn ea_flat(cpu: &Cpu, i: &Insn) -> u64 {
    i.disp.wrapping_add(cpu.gpr[usize::from(i.base)])
}

/// Whether [`ea_flat`] computes the operand's address: 64-bit code (blocks are specialised
/// on it, and there ES/CS/SS/DS have base 0 and linear addresses are not truncated), a
/// segment other than FS/GS, no index register and 64-bit addressing.
pub(super) fn is_flat(i: &Insn, bitness: u32) -> bool {
    bitness == 64 && i.seg < 4 && i.index == NOREG && i.amask == u64::MAX
}

/// The address of `mov`'s memory operand: [`ea_flat`] for handlers chosen by [`is_flat`].
#[inline(always)]
pub(super) fn ea_f<const FLAT: bool>(cpu: &Cpu, i: &Insn) -> u64 {
    if FLAT { ea_flat(cpu, i) } else { ea(cpu, i) }
}

pub(super) fn mov_rm<const S: u8, const FLAT: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea_f::<FLAT>(cpu, i);
    let hit = match S {
        1 => cpu.rd_fast::<1>(lin),
        2 => cpu.rd_fast::<2>(lin),
        4 => cpu.rd_fast::<4>(lin),
        _ => cpu.rd_fast::<8>(lin),
    };
    match hit {
        Some(v) => {
            cpu.wreg(i.r0, S, v);
            Ok(())
        }
        None => mov_rm_slow::<S>(cpu, i),
    }
}

#[cold]
#[inline(never)]
pub(super) fn mov_rm_slow<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rd_n(lin, S)?;
    cpu.wreg(i.r0, S, v);
    Ok(())
}

pub(super) fn mov_mr<const S: u8, const FLAT: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea_f::<FLAT>(cpu, i);
    let v = cpu.rreg(i.r0, S);
    let hit = match S {
        1 => cpu.wr_fast::<1>(lin, v),
        2 => cpu.wr_fast::<2>(lin, v),
        4 => cpu.wr_fast::<4>(lin, v),
        _ => cpu.wr_fast::<8>(lin, v),
    };
    if hit {
        Ok(())
    } else {
        mov_mr_slow::<S>(cpu, i)
    }
}

#[cold]
#[inline(never)]
pub(super) fn mov_mr_slow<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rreg(i.r0, S);
    cpu.wr_n(lin, S, v)?;
    end_if_code_written(cpu, i)
}

pub(super) fn mov_mi<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    cpu.wr_n(lin, S, i.imm)?;
    end_if_code_written(cpu, i)
}

pub(super) fn lea<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = ea_off(cpu, i);
    cpu.wreg(i.r0, S, v);
    Ok(())
}

pub(super) fn incdec_r<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    // CF survives inc/dec: take it from the lazy record for the usual predecessors here,
    // and leave the others to a cold copy (a jump table here costs every inc/dec).
    let c = &cpu.cc;
    let cf = if c.op == CcOp::Sub {
        c.a < c.b
    } else if c.op == CcOp::Add {
        c.res < c.a
    } else if c.op == CcOp::Inc || c.op == CcOp::Dec || c.op == CcOp::Logic {
        c.op != CcOp::Logic && c.aux != 0
    } else {
        return incdec_r_slow::<DEC, S>(cpu, i);
    };
    incdec_r_with::<DEC, S>(cpu, i, cf)
}

#[cold]
#[inline(never)]
pub(super) fn incdec_r_slow<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let cf = cpu.cf();
    incdec_r_with::<DEC, S>(cpu, i, cf)
}

#[inline(always)]
pub(super) fn incdec_r_with<const DEC: bool, const S: u8>(
    cpu: &mut Cpu,
    i: &Insn,
    cf: bool,
) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & mask(S);
    cpu.cc = crate::cpu::Cc {
        op: if DEC { CcOp::Dec } else { CcOp::Inc },
        size: S,
        res: r,
        a,
        b: 1,
        aux: u64::from(cf),
    };
    cpu.wreg(i.r0, S, r);
    Ok(())
}

/// `inc`/`dec` of memory. The write comes before the flags change, so that a faulting
/// write leaves them (CF is carried through) as they were.
pub(super) fn incdec_m<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & mask(S);
    cpu.wr_n(lin, S, r)?;
    let cf = cpu.cf();
    cpu.cc = crate::cpu::Cc {
        op: if DEC { CcOp::Dec } else { CcOp::Inc },
        size: S,
        res: r,
        a,
        b: 1,
        aux: u64::from(cf),
    };
    end_if_code_written(cpu, i)
}

pub(super) fn jcc(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = if cpu.cond(i.aux) { i.imm } else { i.next_ip };
    Ok(())
}

/// [`jcc`] with the condition fixed at translation time, so that `cond` folds to the few
/// tests that condition needs (e.g. `jnz` after `dec`: one compare of the lazy result).
pub(super) fn jcc_c<const CC: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = if cpu.cond(CC) { i.imm } else { i.next_ip };
    Ok(())
}

/// The [`jcc_c`] instance for condition `cc` (0..15, Jcc encoding order).
pub(super) fn jcc_handler(cc: u8) -> Handler {
    match cc {
        0 => jcc_c::<0>,
        1 => jcc_c::<1>,
        2 => jcc_c::<2>,
        3 => jcc_c::<3>,
        4 => jcc_c::<4>,
        5 => jcc_c::<5>,
        6 => jcc_c::<6>,
        7 => jcc_c::<7>,
        8 => jcc_c::<8>,
        9 => jcc_c::<9>,
        10 => jcc_c::<10>,
        11 => jcc_c::<11>,
        12 => jcc_c::<12>,
        13 => jcc_c::<13>,
        14 => jcc_c::<14>,
        15 => jcc_c::<15>,
        _ => jcc,
    }
}

pub(super) fn jmp_rel(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = i.imm;
    Ok(())
}

pub(super) fn call_rel(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.push(i.aux, i.next_ip)?;
    cpu.rip = i.imm;
    if cpu.stop_block {
        // The return address went to a code page; RIP is already the target.
        return Err(Ex::EndBlock);
    }
    Ok(())
}

pub(super) fn ret_near(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.pop(i.aux)?;
    cpu.rip = v;
    if i.imm != 0 {
        cpu.add_sp(i.imm);
    }
    Ok(())
}

pub(super) fn push_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r0, i.size);
    cpu.push(i.size, v)?;
    end_if_code_written(cpu, i)
}

pub(super) fn pop_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.pop(i.size)?;
    cpu.wreg(i.r0, i.size, v);
    Ok(())
}

// 64-bit stack forms for 64-bit code (blocks are specialised on it): SS has base 0 and
// neither addresses nor RSP are truncated, so the stack slot is RSP itself. The TLB hit
// is inline; everything else goes to the general handler. A write-TLB hit never maps a
// code page, so the fast paths need no check for written code.

pub(super) fn push64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.gpr[(i.r0 & 15) as usize];
    let sp = cpu.gpr[4].wrapping_sub(8);
    if cpu.wr_fast::<8>(sp, v) {
        cpu.gpr[4] = sp;
        return Ok(());
    }
    push_r(cpu, i)
}

pub(super) fn pop64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4];
    if let Some(v) = cpu.rd_fast::<8>(sp) {
        // RSP moves first: `pop rsp` loads the value read.
        cpu.gpr[4] = sp.wrapping_add(8);
        cpu.gpr[(i.r0 & 15) as usize] = v;
        return Ok(());
    }
    pop_r(cpu, i)
}

pub(super) fn call64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4].wrapping_sub(8);
    if cpu.wr_fast::<8>(sp, i.next_ip) {
        cpu.gpr[4] = sp;
        cpu.rip = i.imm;
        return Ok(());
    }
    call_rel(cpu, i)
}

pub(super) fn ret64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4];
    if let Some(v) = cpu.rd_fast::<8>(sp) {
        cpu.gpr[4] = sp.wrapping_add(8).wrapping_add(i.imm);
        cpu.rip = v;
        return Ok(());
    }
    ret_near(cpu, i)
}

pub(super) fn movzx_rm<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rd_n(lin, S)?;
    cpu.wreg(i.r0, D, v);
    Ok(())
}

pub(super) fn movzx_rr<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r1, S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

/// Shift/rotate of a register by an immediate (`CL == false`) or by CL.
pub(super) fn shift_r<const OP: u8, const S: u8, const CL: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let raw = if CL { cpu.gpr[1] } else { i.imm };
    let cnt = (raw as u32) & if S == 8 { 0x3f } else { 0x1f };
    let a = cpu.rreg(i.r0, S);
    let r = if cnt == 0 {
        a
    } else {
        arith::shift_core(cpu, OP, S, a, cnt)
    };
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn imul_res(cpu: &mut Cpu, s: u8, a: u64, b: u64) -> u64 {
    let (r, of) = if s == 8 {
        let (p, of) = (a as i64).overflowing_mul(b as i64);
        (p as u64, of)
    } else {
        // Narrower products fit in i64 exactly.
        let p = (sext(a, s) as i64) * (sext(b, s) as i64);
        let r = (p as u64) & mask(s);
        (r, p != sext(r, s) as i64)
    };
    cpu.set_flags_res(s, r, of, of, false);
    r
}

pub(super) fn imul_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let (a, b) = (cpu.rreg(i.r0, S), cpu.rreg(i.r1, S));
    let r = imul_res(cpu, S, a, b);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn imul_rm<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let b = cpu.rd_n(lin, S)?;
    let a = cpu.rreg(i.r0, S);
    let r = imul_res(cpu, S, a, b);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn imul_rri<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r1, S);
    let r = imul_res(cpu, S, a, i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn imul_rmi<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    let r = imul_res(cpu, S, a, i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn movsx_rr<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = sext(cpu.rreg(i.r1, S), S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

pub(super) fn movsx_rm<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = sext(cpu.rd_n(lin, S)?, S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

pub(super) fn cmov_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = if cpu.cond(i.aux) {
        cpu.rreg(i.r1, S)
    } else {
        cpu.rreg(i.r0, S)
    };
    cpu.wreg(i.r0, S, v);
    Ok(())
}

pub(super) fn cmov_rm<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let m = cpu.rd_n(lin, S)?;
    let v = if cpu.cond(i.aux) {
        m
    } else {
        cpu.rreg(i.r0, S)
    };
    cpu.wreg(i.r0, S, v);
    Ok(())
}

pub(super) fn setcc_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = u64::from(cpu.cond(i.aux));
    cpu.w8(i.r0, v);
    Ok(())
}

pub(super) fn neg_r<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let r = alu_op(cpu, alu::SUB, S, 0, a);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

pub(super) fn not_r<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    cpu.wreg(i.r0, S, !a);
    Ok(())
}

pub(super) fn xchg_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let (a, b) = (cpu.rreg(i.r0, S), cpu.rreg(i.r1, S));
    cpu.wreg(i.r0, S, b);
    cpu.wreg(i.r1, S, a);
    Ok(())
}

pub(super) fn nop(_cpu: &mut Cpu, _i: &Insn) -> Flow {
    Ok(())
}

/// Raises #UD.
pub(crate) fn raise_ud(_cpu: &mut Cpu, _i: &Insn) -> Flow {
    Err(Ex::UD)
}

macro_rules! by_size {
    ($f:ident, $op:expr, $s:expr) => {
        match $s {
            1 => $f::<$op, 1> as Handler,
            2 => $f::<$op, 2> as Handler,
            4 => $f::<$op, 4> as Handler,
            _ => $f::<$op, 8> as Handler,
        }
    };
}

macro_rules! by_op_size {
    ($f:ident, $op:expr, $s:expr) => {
        match $op {
            alu::ADD => by_size!($f, 0, $s),
            alu::OR => by_size!($f, 1, $s),
            alu::ADC => by_size!($f, 2, $s),
            alu::SBB => by_size!($f, 3, $s),
            alu::AND => by_size!($f, 4, $s),
            alu::SUB => by_size!($f, 5, $s),
            alu::XOR => by_size!($f, 6, $s),
            alu::CMP => by_size!($f, 7, $s),
            _ => by_size!($f, 8, $s),
        }
    };
}

macro_rules! sized {
    ($f:ident, $s:expr, $x:expr) => {
        match $s {
            1 => $f::<1, $x> as Handler,
            2 => $f::<2, $x> as Handler,
            4 => $f::<4, $x> as Handler,
            _ => $f::<8, $x> as Handler,
        }
    };
    ($f:ident, $s:expr) => {
        match $s {
            1 => $f::<1> as Handler,
            2 => $f::<2> as Handler,
            4 => $f::<4> as Handler,
            _ => $f::<8> as Handler,
        }
    };
}

pub(super) use {by_op_size, by_size, sized};
