//! Instruction semantics: specialised handlers for the hot integer forms and a generic
//! interpreter (by mnemonic) for everything else.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::{CcOp, Cpu, fl, sr};
use crate::decode::{Handler, Insn, NOREG, gpr, sreg, xmm};
use crate::exc::{Ex, Flow};

// ---------------------------------------------------------------------------------------
// Helpers

/// Mask for `size` bytes.
#[inline(always)]
pub fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Sign-extends a `size`-byte value.
#[inline(always)]
pub fn sext(v: u64, size: u8) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Linear address of the memory operand.
#[inline(always)]
pub fn ea(cpu: &Cpu, i: &Insn) -> u64 {
    let off = i
        .disp
        .wrapping_add(cpu.gpr[(i.base & 31) as usize])
        .wrapping_add(cpu.gpr[(i.index & 31) as usize] << (i.scale & 3))
        & i.amask;
    cpu.ebase[(i.seg & 7) as usize].wrapping_add(off) & cpu.lin_mask
}

/// Offset (effective address without segment base) of the memory operand.
#[inline(always)]
pub fn ea_off(cpu: &Cpu, i: &Insn) -> u64 {
    i.disp
        .wrapping_add(cpu.gpr[(i.base & 31) as usize])
        .wrapping_add(cpu.gpr[(i.index & 31) as usize] << (i.scale & 3))
        & i.amask
}

impl Cpu {
    /// Reads `size` bytes at `lin`.
    #[inline(always)]
    pub fn rd_n(&mut self, lin: u64, size: u8) -> Result<u64, Ex> {
        match size {
            1 => self.rd::<1>(lin),
            2 => self.rd::<2>(lin),
            4 => self.rd::<4>(lin),
            _ => self.rd::<8>(lin),
        }
    }
    /// Writes `size` bytes at `lin`.
    #[inline(always)]
    pub fn wr_n(&mut self, lin: u64, size: u8, v: u64) -> Flow {
        match size {
            1 => self.wr::<1>(lin, v),
            2 => self.wr::<2>(lin, v),
            4 => self.wr::<4>(lin, v),
            _ => self.wr::<8>(lin, v),
        }
    }

    /// Pushes `size` bytes.
    #[inline(always)]
    pub fn push(&mut self, size: u8, v: u64) -> Flow {
        let sp = self.gpr[4].wrapping_sub(u64::from(size)) & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        self.wr_n(lin, size, v)?;
        self.gpr[4] = (self.gpr[4] & !self.sp_mask) | sp;
        Ok(())
    }

    /// Pops `size` bytes.
    #[inline(always)]
    pub fn pop(&mut self, size: u8) -> Result<u64, Ex> {
        let sp = self.gpr[4] & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        let v = self.rd_n(lin, size)?;
        self.gpr[4] =
            (self.gpr[4] & !self.sp_mask) | (sp.wrapping_add(u64::from(size)) & self.sp_mask);
        Ok(v)
    }

    /// Reads the stack at offset `off` from RSP without popping.
    pub fn peek(&mut self, off: u64, size: u8) -> Result<u64, Ex> {
        let sp = self.gpr[4].wrapping_add(off) & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        self.rd_n(lin, size)
    }

    /// Adds to RSP within the stack width.
    pub fn add_sp(&mut self, n: u64) {
        let sp = self.gpr[4].wrapping_add(n) & self.sp_mask;
        self.gpr[4] = (self.gpr[4] & !self.sp_mask) | sp;
    }
}

/// Reads operand `k`.
pub fn rd_op(cpu: &mut Cpu, i: &Insn, k: u32, size: u8) -> Result<u64, Ex> {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => {
            let r = ins.op_register(k);
            if let Some((idx, sz)) = gpr(r) {
                Ok(cpu.rreg(idx, sz))
            } else if let Some(s) = sreg(r) {
                Ok(u64::from(cpu.seg[s].selector))
            } else {
                Err(Ex::UD)
            }
        }
        OpKind::Memory => {
            let a = ea(cpu, i);
            cpu.rd_n(a, size)
        }
        OpKind::Immediate8_2nd => Ok(u64::from(ins.immediate8_2nd())),
        _ => Ok(ins.immediate(k) & mask(size)),
    }
}

/// Writes operand `k`.
pub fn wr_op(cpu: &mut Cpu, i: &Insn, k: u32, size: u8, v: u64) -> Flow {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => {
            if let Some((idx, sz)) = gpr(ins.op_register(k)) {
                cpu.wreg(idx, sz, v);
                Ok(())
            } else {
                Err(Ex::UD)
            }
        }
        OpKind::Memory => {
            let a = ea(cpu, i);
            cpu.wr_n(a, size, v)
        }
        _ => Err(Ex::UD),
    }
}

/// Size in bytes of operand `k`.
pub fn op_size(i: &Insn, k: u32) -> u8 {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => gpr(ins.op_register(k)).map_or(i.size, |(_, s)| s),
        OpKind::Memory => ins.memory_size().size().clamp(1, 255) as u8,
        _ => i.size.max(1),
    }
}

// ---------------------------------------------------------------------------------------
// ALU core

/// ALU operation numbers in opcode order.
pub mod alu {
    /// add
    pub const ADD: u8 = 0;
    /// or
    pub const OR: u8 = 1;
    /// adc
    pub const ADC: u8 = 2;
    /// sbb
    pub const SBB: u8 = 3;
    /// and
    pub const AND: u8 = 4;
    /// sub
    pub const SUB: u8 = 5;
    /// xor
    pub const XOR: u8 = 6;
    /// cmp
    pub const CMP: u8 = 7;
    /// test (and without writeback)
    pub const TEST: u8 = 8;
}

/// Performs ALU `op` and records flags; returns the result.
#[inline(always)]
pub fn alu_op(cpu: &mut Cpu, op: u8, size: u8, a: u64, b: u64) -> u64 {
    let m = mask(size);
    let a = a & m;
    let b = b & m;
    match op {
        alu::ADD => {
            let r = a.wrapping_add(b) & m;
            cpu.set_cc(CcOp::Add, size, r, a, b);
            r
        }
        alu::OR => {
            let r = a | b;
            cpu.set_cc(CcOp::Logic, size, r, a, b);
            r
        }
        alu::ADC => {
            let c = u64::from(cpu.cf());
            let r = a.wrapping_add(b).wrapping_add(c) & m;
            cpu.set_cc(CcOp::Adc, size, r, a, b);
            cpu.cc.aux = c;
            r
        }
        alu::SBB => {
            let c = u64::from(cpu.cf());
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            cpu.set_cc(CcOp::Sbb, size, r, a, b);
            cpu.cc.aux = c;
            r
        }
        alu::AND | alu::TEST => {
            let r = a & b;
            cpu.set_cc(CcOp::Logic, size, r, a, b);
            r
        }
        alu::XOR => {
            let r = a ^ b;
            cpu.set_cc(CcOp::Logic, size, r, a, b);
            r
        }
        _ => {
            let r = a.wrapping_sub(b) & m;
            cpu.set_cc(CcOp::Sub, size, r, a, b);
            r
        }
    }
}

fn alu_mnemonic(m: M) -> Option<u8> {
    Some(match m {
        M::Add => alu::ADD,
        M::Or => alu::OR,
        M::Adc => alu::ADC,
        M::Sbb => alu::SBB,
        M::And => alu::AND,
        M::Sub => alu::SUB,
        M::Xor => alu::XOR,
        M::Cmp => alu::CMP,
        M::Test => alu::TEST,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Specialised handlers
//
// A write to a page that holds translated code (only the slow path of a write can do that:
// write-TLB entries never map such pages) sets `Cpu::stop_block`; the block must not run
// another instruction, which may be the one just rewritten. The block loop does not look at
// the flag between instructions: every handler that writes memory ends with
// `end_if_code_written`, which turns it into `Ex::EndBlock` with RIP at the successor.

/// Ends the block after a non-branch instruction that wrote translated code.
#[inline(always)]
fn end_if_code_written(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.stop_block {
        return code_written(cpu, i.next_ip);
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn code_written(cpu: &mut Cpu, next: u64) -> Flow {
    cpu.rip = next;
    Err(Ex::EndBlock)
}

fn alu_rr<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let b = cpu.rreg(i.r1, S);
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

fn alu_ri<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let r = alu_op(cpu, OP, S, a, i.imm);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

fn alu_rm<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let lin = ea(cpu, i);
    let b = cpu.rd_n(lin, S)?;
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    Ok(())
}

fn alu_mr<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    let b = cpu.rreg(i.r0, S);
    alu_m_finish::<OP, S>(cpu, i, lin, a, b)
}

fn alu_mi<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    alu_m_finish::<OP, S>(cpu, i, lin, a, i.imm)
}

/// The ALU step and write-back of a memory destination. `adc`/`sbb` read CF: if the write
/// faults, the flags go back to what they were, so that the instruction runs again with the
/// same carry after the fault is handled.
#[inline(always)]
fn alu_m_finish<const OP: u8, const S: u8>(
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

fn mov_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r1, S);
    cpu.wreg(i.r0, S, v);
    Ok(())
}

fn mov_ri<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.wreg(i.r0, S, i.imm);
    Ok(())
}

// The load/store handlers try the TLB hit inline and leave everything else to a cold
// out-of-line copy, so that the hit path needs no saved registers or stack frame.

/// Linear address of a memory operand that [`is_flat`] accepted: base plus displacement.
#[inline(always)]
fn ea_flat(cpu: &Cpu, i: &Insn) -> u64 {
    i.disp.wrapping_add(cpu.gpr[(i.base & 31) as usize])
}

/// Whether [`ea_flat`] computes the operand's address: 64-bit code (blocks are specialised
/// on it, and there ES/CS/SS/DS have base 0 and linear addresses are not truncated), a
/// segment other than FS/GS, no index register and 64-bit addressing.
fn is_flat(i: &Insn, bitness: u32) -> bool {
    bitness == 64 && i.seg < 4 && i.index == NOREG && i.amask == u64::MAX
}

/// The address of `mov`'s memory operand: [`ea_flat`] for handlers chosen by [`is_flat`].
#[inline(always)]
fn ea_f<const FLAT: bool>(cpu: &Cpu, i: &Insn) -> u64 {
    if FLAT { ea_flat(cpu, i) } else { ea(cpu, i) }
}

fn mov_rm<const S: u8, const FLAT: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
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
fn mov_rm_slow<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rd_n(lin, S)?;
    cpu.wreg(i.r0, S, v);
    Ok(())
}

fn mov_mr<const S: u8, const FLAT: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
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
fn mov_mr_slow<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rreg(i.r0, S);
    cpu.wr_n(lin, S, v)?;
    end_if_code_written(cpu, i)
}

fn mov_mi<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    cpu.wr_n(lin, S, i.imm)?;
    end_if_code_written(cpu, i)
}

fn lea<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = ea_off(cpu, i);
    cpu.wreg(i.r0, S, v);
    Ok(())
}

fn incdec_r<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
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
fn incdec_r_slow<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let cf = cpu.cf();
    incdec_r_with::<DEC, S>(cpu, i, cf)
}

#[inline(always)]
fn incdec_r_with<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn, cf: bool) -> Flow {
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
fn incdec_m<const DEC: bool, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
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

fn jcc(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = if cpu.cond(i.aux) { i.imm } else { i.next_ip };
    Ok(())
}

/// [`jcc`] with the condition fixed at translation time, so that `cond` folds to the few
/// tests that condition needs (e.g. `jnz` after `dec`: one compare of the lazy result).
fn jcc_c<const CC: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = if cpu.cond(CC) { i.imm } else { i.next_ip };
    Ok(())
}

/// The [`jcc_c`] instance for condition `cc` (0..15, Jcc encoding order).
fn jcc_handler(cc: u8) -> Handler {
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

fn jmp_rel(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.rip = i.imm;
    Ok(())
}

fn call_rel(cpu: &mut Cpu, i: &Insn) -> Flow {
    cpu.push(i.aux, i.next_ip)?;
    cpu.rip = i.imm;
    if cpu.stop_block {
        // The return address went to a code page; RIP is already the target.
        return Err(Ex::EndBlock);
    }
    Ok(())
}

fn ret_near(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.pop(i.aux)?;
    cpu.rip = v;
    if i.imm != 0 {
        cpu.add_sp(i.imm);
    }
    Ok(())
}

fn push_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r0, i.size);
    cpu.push(i.size, v)?;
    end_if_code_written(cpu, i)
}

fn pop_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.pop(i.size)?;
    cpu.wreg(i.r0, i.size, v);
    Ok(())
}

// 64-bit stack forms for 64-bit code (blocks are specialised on it): SS has base 0 and
// neither addresses nor RSP are truncated, so the stack slot is RSP itself. The TLB hit
// is inline; everything else goes to the general handler. A write-TLB hit never maps a
// code page, so the fast paths need no check for written code.

fn push64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.gpr[(i.r0 & 15) as usize];
    let sp = cpu.gpr[4].wrapping_sub(8);
    if cpu.wr_fast::<8>(sp, v) {
        cpu.gpr[4] = sp;
        return Ok(());
    }
    push_r(cpu, i)
}

fn pop64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4];
    if let Some(v) = cpu.rd_fast::<8>(sp) {
        // RSP moves first: `pop rsp` loads the value read.
        cpu.gpr[4] = sp.wrapping_add(8);
        cpu.gpr[(i.r0 & 15) as usize] = v;
        return Ok(());
    }
    pop_r(cpu, i)
}

fn call64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4].wrapping_sub(8);
    if cpu.wr_fast::<8>(sp, i.next_ip) {
        cpu.gpr[4] = sp;
        cpu.rip = i.imm;
        return Ok(());
    }
    call_rel(cpu, i)
}

fn ret64(cpu: &mut Cpu, i: &Insn) -> Flow {
    let sp = cpu.gpr[4];
    if let Some(v) = cpu.rd_fast::<8>(sp) {
        cpu.gpr[4] = sp.wrapping_add(8).wrapping_add(i.imm);
        cpu.rip = v;
        return Ok(());
    }
    ret_near(cpu, i)
}

fn movzx_rm<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = cpu.rd_n(lin, S)?;
    cpu.wreg(i.r0, D, v);
    Ok(())
}

fn movzx_rr<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = cpu.rreg(i.r1, S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

/// Shift/rotate of a register by an immediate (`CL == false`) or by CL.
fn shift_r<const OP: u8, const S: u8, const CL: bool>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let raw = if CL { cpu.gpr[1] } else { i.imm };
    let cnt = (raw as u32) & if S == 8 { 0x3f } else { 0x1f };
    let a = cpu.rreg(i.r0, S);
    let r = if cnt == 0 {
        a
    } else {
        crate::arith::shift_core(cpu, OP, S, a, cnt)
    };
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_res(cpu: &mut Cpu, s: u8, a: u64, b: u64) -> u64 {
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

fn imul_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let (a, b) = (cpu.rreg(i.r0, S), cpu.rreg(i.r1, S));
    let r = imul_res(cpu, S, a, b);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_rm<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let b = cpu.rd_n(lin, S)?;
    let a = cpu.rreg(i.r0, S);
    let r = imul_res(cpu, S, a, b);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_rri<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r1, S);
    let r = imul_res(cpu, S, a, i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_rmi<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let a = cpu.rd_n(lin, S)?;
    let r = imul_res(cpu, S, a, i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn movsx_rr<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = sext(cpu.rreg(i.r1, S), S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

fn movsx_rm<const D: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let lin = ea(cpu, i);
    let v = sext(cpu.rd_n(lin, S)?, S);
    cpu.wreg(i.r0, D, v);
    Ok(())
}

fn cmov_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = if cpu.cond(i.aux) {
        cpu.rreg(i.r1, S)
    } else {
        cpu.rreg(i.r0, S)
    };
    cpu.wreg(i.r0, S, v);
    Ok(())
}

fn cmov_rm<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
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

fn setcc_r(cpu: &mut Cpu, i: &Insn) -> Flow {
    let v = u64::from(cpu.cond(i.aux));
    cpu.w8(i.r0, v);
    Ok(())
}

fn neg_r<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let r = alu_op(cpu, alu::SUB, S, 0, a);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn not_r<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = cpu.rreg(i.r0, S);
    cpu.wreg(i.r0, S, !a);
    Ok(())
}

fn xchg_rr<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let (a, b) = (cpu.rreg(i.r0, S), cpu.rreg(i.r1, S));
    cpu.wreg(i.r0, S, b);
    cpu.wreg(i.r1, S, a);
    Ok(())
}

fn nop(_cpu: &mut Cpu, _i: &Insn) -> Flow {
    Ok(())
}

/// Raises #UD.
pub fn raise_ud(_cpu: &mut Cpu, _i: &Insn) -> Flow {
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

fn is_gpr(ins: &Instruction, k: u32) -> bool {
    ins.op_kind(k) == OpKind::Register && gpr(ins.op_register(k)).is_some()
}

fn is_imm(ins: &Instruction, k: u32) -> bool {
    matches!(
        ins.op_kind(k),
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// Picks the handler for a decoded instruction. `i` has its operand fields filled;
/// `bitness` is the code size of the block being translated (16, 32 or 64).
pub fn select(ins: &Instruction, i: &Insn, bitness: u32) -> Handler {
    let m = ins.mnemonic();
    let n = ins.op_count();
    let s = i.size;
    // LOCK needs nothing extra with one vCPU: an instruction is never interleaved with
    // another vCPU's accesses. (iced rejects LOCK on forms that do not allow it.)
    if let Some(op) = alu_mnemonic(m)
        && n == 2
    {
        let (k0, k1) = (ins.op_kind(0), ins.op_kind(1));
        if is_gpr(ins, 0) && is_gpr(ins, 1) {
            return by_op_size!(alu_rr, op, s);
        }
        if is_gpr(ins, 0) && is_imm(ins, 1) {
            return by_op_size!(alu_ri, op, s);
        }
        if is_gpr(ins, 0) && k1 == OpKind::Memory {
            return by_op_size!(alu_rm, op, s);
        }
        if k0 == OpKind::Memory && is_gpr(ins, 1) {
            return by_op_size!(alu_mr, op, s);
        }
        if k0 == OpKind::Memory && is_imm(ins, 1) {
            return by_op_size!(alu_mi, op, s);
        }
    }
    match m {
        M::Mov if n == 2 => {
            let (k0, k1) = (ins.op_kind(0), ins.op_kind(1));
            if is_gpr(ins, 0) && is_gpr(ins, 1) {
                return sized!(mov_rr, s);
            }
            if is_gpr(ins, 0) && is_imm(ins, 1) {
                return sized!(mov_ri, s);
            }
            if is_gpr(ins, 0) && k1 == OpKind::Memory {
                return if is_flat(i, bitness) {
                    sized!(mov_rm, s, true)
                } else {
                    sized!(mov_rm, s, false)
                };
            }
            if k0 == OpKind::Memory && is_gpr(ins, 1) {
                return if is_flat(i, bitness) {
                    sized!(mov_mr, s, true)
                } else {
                    sized!(mov_mr, s, false)
                };
            }
            if k0 == OpKind::Memory && is_imm(ins, 1) {
                return sized!(mov_mi, s);
            }
        }
        M::Lea if is_gpr(ins, 0) => return sized!(lea, s),
        M::Inc if is_gpr(ins, 0) => return by_size!(incdec_r, false, s),
        M::Dec if is_gpr(ins, 0) => return by_size!(incdec_r, true, s),
        M::Inc if ins.op_kind(0) == OpKind::Memory => return by_size!(incdec_m, false, s),
        M::Dec if ins.op_kind(0) == OpKind::Memory => return by_size!(incdec_m, true, s),
        M::Movzx if is_gpr(ins, 0) => {
            let ss = op_size(i, 1);
            let mem = ins.op_kind(1) == OpKind::Memory;
            return match (s, ss, mem) {
                (4, 1, true) => movzx_rm::<4, 1>,
                (4, 2, true) => movzx_rm::<4, 2>,
                (8, 1, true) => movzx_rm::<8, 1>,
                (8, 2, true) => movzx_rm::<8, 2>,
                (4, 1, false) => movzx_rr::<4, 1>,
                (4, 2, false) => movzx_rr::<4, 2>,
                (8, 1, false) => movzx_rr::<8, 1>,
                (8, 2, false) => movzx_rr::<8, 2>,
                _ => generic,
            };
        }
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
        | M::Clflushopt => return nop,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if is_gpr(ins, 0) => {
            let op = crate::arith::shift_kind(m).unwrap_or(0);
            let cl = n == 2 && ins.op_kind(1) == OpKind::Register;
            return shift_handler(op, s, cl);
        }
        M::Imul if n == 2 && is_gpr(ins, 0) => {
            return if is_gpr(ins, 1) {
                sized!(imul_rr, s)
            } else {
                sized!(imul_rm, s)
            };
        }
        M::Imul if n == 3 && is_gpr(ins, 0) => {
            return if is_gpr(ins, 1) {
                sized!(imul_rri, s)
            } else {
                sized!(imul_rmi, s)
            };
        }
        M::Movsx | M::Movsxd if is_gpr(ins, 0) => {
            let ss = op_size(i, 1);
            let mem = ins.op_kind(1) == OpKind::Memory;
            return match (s, ss, mem) {
                (2, 1, false) => movsx_rr::<2, 1>,
                (4, 1, false) => movsx_rr::<4, 1>,
                (4, 2, false) => movsx_rr::<4, 2>,
                (8, 1, false) => movsx_rr::<8, 1>,
                (8, 2, false) => movsx_rr::<8, 2>,
                (8, 4, false) => movsx_rr::<8, 4>,
                (2, 1, true) => movsx_rm::<2, 1>,
                (4, 1, true) => movsx_rm::<4, 1>,
                (4, 2, true) => movsx_rm::<4, 2>,
                (8, 1, true) => movsx_rm::<8, 1>,
                (8, 2, true) => movsx_rm::<8, 2>,
                (8, 4, true) => movsx_rm::<8, 4>,
                _ => generic,
            };
        }
        _ if is_cmov(m) && is_gpr(ins, 0) => {
            return if is_gpr(ins, 1) {
                sized!(cmov_rr, s)
            } else {
                sized!(cmov_rm, s)
            };
        }
        _ if is_setcc(m) && is_gpr(ins, 0) => return setcc_r,
        M::Neg if is_gpr(ins, 0) => return sized!(neg_r, s),
        M::Not if is_gpr(ins, 0) => return sized!(not_r, s),
        M::Xchg if is_gpr(ins, 0) && is_gpr(ins, 1) => return sized!(xchg_rr, s),
        _ => {}
    }
    match ins.code().op_code().mnemonic() {
        _ if m == M::Jmp
            && matches!(
                ins.op_kind(0),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) =>
        {
            jmp_rel
        }
        _ if is_jcc(m)
            && matches!(
                ins.op_kind(0),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) =>
        {
            jcc_handler((ins.condition_code() as u8).wrapping_sub(1))
        }
        _ if m == M::Call
            && matches!(
                ins.op_kind(0),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) =>
        {
            if bitness == 64 && i.aux == 8 {
                call64
            } else {
                call_rel
            }
        }
        _ if m == M::Ret && bitness == 64 && i.aux == 8 => ret64,
        _ if m == M::Ret => ret_near,
        _ if m == M::Push && is_gpr(ins, 0) && bitness == 64 && s == 8 => push64,
        _ if m == M::Push && is_gpr(ins, 0) => push_r,
        _ if m == M::Pop && is_gpr(ins, 0) && bitness == 64 && s == 8 => pop64,
        _ if m == M::Pop && is_gpr(ins, 0) => pop_r,
        _ => generic,
    }
}

// ---------------------------------------------------------------------------------------
// Dead arithmetic flags
//
// Most flag results are overwritten before anything reads them (`imul`, `shr`, `add` in a
// row, then `cmp` before the branch). The translator walks each block backwards and gives
// an instruction whose six status flags are all overwritten, before any instruction could
// read them or observe them, a variant that computes only its result.

/// How an instruction treats the six status flags, for the dead-flag pass of
/// [`crate::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagUse {
    /// Neither reads nor writes them and cannot fault or end the block early: whether an
    /// earlier result is needed is decided by what follows.
    Pass,
    /// Overwrites all six, reads none, cannot fault: an earlier result is dead here.
    Kill,
    /// Anything else: reads a flag, writes only some, may fault (a fault or interrupt frame
    /// holds RFLAGS), or is not known to this pass.
    Use,
}

/// The register-register form when `rr`, else the register-immediate one.
fn reg_or_imm(rr: bool, reg: UopOp, imm: UopOp) -> UopOp {
    if rr { reg } else { imm }
}

/// Whether the instruction's explicit operands are all general registers or immediates,
/// with a register first.
fn regs_only(ins: &Instruction) -> bool {
    let n = ins.op_count();
    n >= 1 && is_gpr(ins, 0) && (1..n).all(|k| is_gpr(ins, k) || is_imm(ins, k))
}

/// Classifies `ins` (prepared as `i`) for the dead-flag pass. Conservative: only forms
/// whose behaviour is fully known here are `Pass` or `Kill`.
pub fn flag_use(ins: &Instruction, i: &Insn) -> FlagUse {
    let m = ins.mnemonic();
    let n = ins.op_count();
    match m {
        M::Nop | M::Endbr64 | M::Endbr32 | M::Pause => FlagUse::Pass,
        M::Mov | M::Xchg | M::Not | M::Movzx | M::Movsx | M::Movsxd if regs_only(ins) => {
            FlagUse::Pass
        }
        // `lea` computes an address without accessing memory.
        M::Lea if is_gpr(ins, 0) => FlagUse::Pass,
        M::Add | M::Or | M::And | M::Sub | M::Xor | M::Cmp | M::Test
            if n == 2 && regs_only(ins) =>
        {
            FlagUse::Kill
        }
        M::Neg if n == 1 && regs_only(ins) => FlagUse::Kill,
        M::Imul if (n == 2 || n == 3) && regs_only(ins) => FlagUse::Kill,
        // By a non-zero immediate count only: a zero count (or CL) leaves the flags alone.
        M::Shl | M::Sal | M::Shr | M::Sar
            if regs_only(ins) && (n == 1 || is_imm(ins, 1)) && shift_count(i) != 0 =>
        {
            FlagUse::Kill
        }
        _ => FlagUse::Use,
    }
}

/// The masked count of a shift by an immediate (`finish` stores 1 for the one-operand form).
fn shift_count(i: &Insn) -> u32 {
    (i.imm as u32) & if i.size == 8 { 0x3f } else { 0x1f }
}

/// The handler that computes only the result of a [`FlagUse::Kill`] instruction, for use
/// where its flags are dead; `None` if there is no such variant.
pub fn select_noflags(ins: &Instruction, i: &Insn) -> Option<Handler> {
    if flag_use(ins, i) != FlagUse::Kill {
        return None;
    }
    let s = i.size;
    let m = ins.mnemonic();
    let rr = ins.op_count() == 2 && is_gpr(ins, 1);
    macro_rules! alu_nf {
        ($op:expr) => {
            if rr {
                by_size!(alu_rr_nf, $op, s)
            } else {
                by_size!(alu_ri_nf, $op, s)
            }
        };
    }
    Some(match m {
        // Only flags: nothing left to do.
        M::Cmp | M::Test => nop,
        M::Add => alu_nf!({ alu::ADD }),
        M::Or => alu_nf!({ alu::OR }),
        M::And => alu_nf!({ alu::AND }),
        M::Sub => alu_nf!({ alu::SUB }),
        M::Xor => alu_nf!({ alu::XOR }),
        M::Neg => sized!(neg_r_nf, s),
        M::Imul if ins.op_count() == 2 => sized!(imul_rr_nf, s),
        M::Imul => sized!(imul_rri_nf, s),
        M::Shl | M::Sal => by_size!(shift_r_nf, 0, s),
        M::Shr => by_size!(shift_r_nf, 1, s),
        M::Sar => by_size!(shift_r_nf, 2, s),
        _ => return None,
    })
}

/// The result of ALU `op` (add, or, and, sub, xor) without flags.
#[inline(always)]
fn alu_res(op: u8, a: u64, b: u64) -> u64 {
    match op {
        alu::ADD => a.wrapping_add(b),
        alu::OR => a | b,
        alu::AND => a & b,
        alu::SUB => a.wrapping_sub(b),
        _ => a ^ b,
    }
}

fn alu_rr_nf<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let r = alu_res(OP, cpu.rreg(i.r0, S), cpu.rreg(i.r1, S));
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn alu_ri_nf<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let r = alu_res(OP, cpu.rreg(i.r0, S), i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn neg_r_nf<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let r = cpu.rreg(i.r0, S).wrapping_neg();
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_rr_nf<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    // The low `S` bytes of a product do not depend on signedness.
    let r = cpu.rreg(i.r0, S).wrapping_mul(cpu.rreg(i.r1, S));
    cpu.wreg(i.r0, S, r);
    Ok(())
}

fn imul_rri_nf<const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let r = cpu.rreg(i.r1, S).wrapping_mul(i.imm);
    cpu.wreg(i.r0, S, r);
    Ok(())
}

/// `shl`/`shr`/`sar` (0, 1, 2) of a register by a non-zero immediate, without flags.
fn shift_r_nf<const OP: u8, const S: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let cnt = shift_count(i);
    let bits = u32::from(S) * 8;
    let a = cpu.rreg(i.r0, S);
    let r = match OP {
        0 => {
            if cnt >= bits {
                0
            } else {
                a << cnt
            }
        }
        1 => {
            if cnt >= bits {
                0
            } else {
                a >> cnt
            }
        }
        _ => ((sext(a, S) as i64) >> cnt.min(bits - 1)) as u64,
    };
    cpu.wreg(i.r0, S, r);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Register micro-op runs
//
// A straight run of register-only instructions that neither read flags nor produce live
// ones (moves, `lea`, extensions, and arithmetic whose flags the dead-flag pass found dead)
// is given one block entry holding compact micro-ops, which `run_uops` executes in a
// plain loop over a `match`: no indirect call, result check or spill per instruction.
// None of them can fault, so an exception never lands in the middle of a run.

/// Micro-op kinds of [`Uop`] (`d`, `s`, `x` registers, `imm` immediate; results are cut to
/// the operand size by [`Uop::mask`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UopOp {
    /// No effect (`nop`, `cmp`/`test` with dead flags).
    Nop,
    /// `d = s`
    Mov,
    /// `d = imm`
    MovI,
    /// `d += s`
    Add,
    /// `d += imm`
    AddI,
    /// `d -= s`
    Sub,
    /// `d -= imm`
    SubI,
    /// `d &= s`
    And,
    /// `d &= imm`
    AndI,
    /// `d |= s`
    Or,
    /// `d |= imm`
    OrI,
    /// `d ^= s`
    Xor,
    /// `d ^= imm`
    XorI,
    /// `d *= s` (low half)
    Imul,
    /// `d = s * imm` (low half)
    ImulI,
    /// `d = -d`
    Neg,
    /// `d = !d`
    Not,
    /// `d <<= imm`
    Shl,
    /// `d >>= imm`, 64-bit logical
    Shr64,
    /// `d >>= imm`, 32-bit logical
    Shr32,
    /// `d >>= imm`, 64-bit arithmetic
    Sar64,
    /// `d >>= imm`, 32-bit arithmetic
    Sar32,
    /// `d = imm + s + (x << sc)`
    Lea,
    /// `d = s & 0xff`
    Zx8,
    /// `d = s & 0xffff`
    Zx16,
    /// `d = sign-extended low byte of s`
    Sx8,
    /// `d = sign-extended low 16 bits of s`
    Sx16,
    /// `d = sign-extended low 32 bits of s`
    Sx32,
}

/// One register micro-op; registers are GPR indices 0..15, 16 reads as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uop {
    /// Kind.
    pub op: UopOp,
    /// Destination register.
    pub d: u8,
    /// Register whose value the kinds that update `d` (`d += s`, `d <<= imm`, ...) take as
    /// their first operand: `d` itself, or the source of a 64-bit `mov d, a` folded into
    /// this micro-op (see [`fold_moves`]).
    pub a: u8,
    /// Source register.
    pub s: u8,
    /// Index register (`lea`).
    pub x: u8,
    /// Index scale as a shift (`lea`).
    pub sc: u8,
    /// Result mask: all ones, or the low 32 bits (32-bit writes zero-extend).
    pub mask: u64,
    /// Immediate, shift count or displacement.
    pub imm: u64,
}

/// The micro-op for `ins` (prepared as `i`), if it has one; `flags_dead` says whether the
/// dead-flag pass found its flag results dead.
pub fn uop_of(ins: &Instruction, i: &Insn, flags_dead: bool) -> Option<Uop> {
    let m = ins.mnemonic();
    let n = ins.op_count();
    let mut u = Uop {
        op: UopOp::Nop,
        d: i.r0 & 15,
        a: i.r0 & 15,
        s: i.r1 & 31,
        x: NOREG,
        sc: 0,
        mask: if i.size == 8 { u64::MAX } else { 0xffff_ffff },
        imm: i.imm,
    };
    if matches!(m, M::Nop | M::Endbr64 | M::Endbr32 | M::Pause)
        || (flags_dead && matches!(m, M::Cmp | M::Test) && n == 2 && regs_only(ins))
    {
        // Writes nothing: the mask and registers do not matter.
        u.d = 0;
        return Some(u);
    }
    // Only 32- and 64-bit operations on the sixteen GPRs (no AH..BH, no merging writes).
    if !(i.size == 4 || i.size == 8) || i.r0 >= 16 {
        return None;
    }
    let rr = n == 2 && is_gpr(ins, 1);
    if rr && i.r1 >= 16 {
        return None;
    }
    u.op = match m {
        M::Mov if n == 2 && regs_only(ins) => {
            if rr {
                UopOp::Mov
            } else {
                UopOp::MovI
            }
        }
        M::Lea if is_gpr(ins, 0) => {
            // 64-bit addressing, or 32-bit addressing into a 32-bit register.
            if !(i.amask == u64::MAX || (i.amask == 0xffff_ffff && i.size == 4)) {
                return None;
            }
            u.s = i.base & 31;
            u.x = i.index & 31;
            u.sc = i.scale & 3;
            u.imm = i.disp;
            UopOp::Lea
        }
        M::Movzx | M::Movsx | M::Movsxd if rr => match (m, op_size(i, 1)) {
            (M::Movzx, 1) => UopOp::Zx8,
            (M::Movzx, 2) => UopOp::Zx16,
            (M::Movsx, 1) => UopOp::Sx8,
            (M::Movsx, 2) => UopOp::Sx16,
            (M::Movsxd, 4) => UopOp::Sx32,
            _ => return None,
        },
        M::Not if n == 1 && regs_only(ins) => UopOp::Not,
        _ if !flags_dead || flag_use(ins, i) != FlagUse::Kill => return None,
        M::Add => reg_or_imm(rr, UopOp::Add, UopOp::AddI),
        M::Sub => reg_or_imm(rr, UopOp::Sub, UopOp::SubI),
        M::And => reg_or_imm(rr, UopOp::And, UopOp::AndI),
        M::Or => reg_or_imm(rr, UopOp::Or, UopOp::OrI),
        M::Xor => reg_or_imm(rr, UopOp::Xor, UopOp::XorI),
        M::Neg => UopOp::Neg,
        M::Imul if n == 2 => UopOp::Imul,
        M::Imul => UopOp::ImulI,
        M::Shl | M::Sal | M::Shr | M::Sar => {
            u.imm = u64::from(shift_count(i));
            match (m, i.size == 8) {
                (M::Shr, true) => UopOp::Shr64,
                (M::Shr, false) => UopOp::Shr32,
                (M::Sar, true) => UopOp::Sar64,
                (M::Sar, false) => UopOp::Sar32,
                _ => UopOp::Shl,
            }
        }
        _ => return None,
    };
    Some(u)
}

/// Runs the micro-ops of a fused entry (see [`uop_of`]); `icount` takes the instructions
/// beyond the first.
pub fn run_uops(cpu: &mut Cpu, i: &Insn) -> Flow {
    let Some(ops) = i.uops.as_deref() else {
        return Ok(());
    };
    let g = &mut cpu.gpr;
    for u in ops {
        // Each kind reads only the registers it uses (a `mov` loads one, an immediate none).
        let s = || g[(u.s & 31) as usize];
        let dv = || g[(u.a & 15) as usize];
        let v = match u.op {
            UopOp::Nop => continue,
            UopOp::Mov => s(),
            UopOp::MovI => u.imm,
            UopOp::Add => dv().wrapping_add(s()),
            UopOp::AddI => dv().wrapping_add(u.imm),
            UopOp::Sub => dv().wrapping_sub(s()),
            UopOp::SubI => dv().wrapping_sub(u.imm),
            UopOp::And => dv() & s(),
            UopOp::AndI => dv() & u.imm,
            UopOp::Or => dv() | s(),
            UopOp::OrI => dv() | u.imm,
            UopOp::Xor => dv() ^ s(),
            UopOp::XorI => dv() ^ u.imm,
            UopOp::Imul => dv().wrapping_mul(s()),
            UopOp::ImulI => s().wrapping_mul(u.imm),
            UopOp::Neg => dv().wrapping_neg(),
            UopOp::Not => !dv(),
            // Counts are non-zero and below the operand width (masked at translation).
            UopOp::Shl => dv() << (u.imm & 63),
            UopOp::Shr64 => dv() >> (u.imm & 63),
            UopOp::Shr32 => (dv() & 0xffff_ffff) >> (u.imm & 31),
            UopOp::Sar64 => ((dv() as i64) >> (u.imm & 63)) as u64,
            UopOp::Sar32 => ((dv() as u32 as i32) >> (u.imm & 31)) as u64,
            UopOp::Lea => u
                .imm
                .wrapping_add(s())
                .wrapping_add(g[(u.x & 31) as usize] << (u.sc & 3)),
            UopOp::Zx8 => s() & 0xff,
            UopOp::Zx16 => s() & 0xffff,
            UopOp::Sx8 => s() as u8 as i8 as i64 as u64,
            UopOp::Sx16 => s() as u16 as i16 as i64 as u64,
            UopOp::Sx32 => s() as u32 as i32 as i64 as u64,
        };
        g[(u.d & 15) as usize] = v & u.mask;
    }
    // The entry's `aux` holds how many instructions the run stands for (folded moves have no
    // micro-op of their own).
    cpu.icount += u64::from(i.aux).saturating_sub(1);
    Ok(())
}

/// Whether `op` computes its result from the old value of its destination (read through
/// [`Uop::a`]).
fn updates_dest(op: UopOp) -> bool {
    use UopOp::*;
    matches!(
        op,
        Add | AddI
            | Sub
            | SubI
            | And
            | AndI
            | Or
            | OrI
            | Xor
            | XorI
            | Imul
            | Neg
            | Not
            | Shl
            | Shr64
            | Shr32
            | Sar64
            | Sar32
    )
}

/// Whether `u` reads register `r`.
fn uop_reads(u: &Uop, r: u8) -> bool {
    use UopOp::*;
    let src = match u.op {
        Nop | MovI => false,
        Neg | Not | AddI | SubI | AndI | OrI | XorI | Shl | Shr64 | Shr32 | Sar64 | Sar32 => false,
        Lea => u.s == r || u.x == r,
        Mov | Add | Sub | And | Or | Xor | Imul | ImulI | Zx8 | Zx16 | Sx8 | Sx16 | Sx32 => {
            u.s == r
        }
    };
    src || (updates_dest(u.op) && u.a == r)
}

/// Folds each 64-bit `mov d, s` of a run into the next micro-op that touches `d`, when that
/// one updates `d` from its old value: `mov rax, rcx; imul rax, r9` becomes `rax = rcx * r9`,
/// one micro-op instead of two (compilers emit this copy-then-operate pair for most
/// three-operand expressions). Nothing between the two may read or write `d` or write `s`.
pub fn fold_moves(ops: &mut Vec<Uop>) {
    let mut k = 0;
    while k < ops.len() {
        let p = ops[k];
        let mut folded = false;
        if p.op == UopOp::Mov && p.mask == u64::MAX && p.s < 16 {
            let (d, s) = (p.d, p.s);
            for j in k + 1..ops.len() {
                let q = ops[j];
                if q.op == UopOp::Nop {
                    continue;
                }
                if q.d == d || uop_reads(&q, d) {
                    // The first micro-op that touches `d`.
                    if q.d == d && updates_dest(q.op) && q.a == d {
                        let mut f = q;
                        f.a = s;
                        if uop_reads(&Uop { a: NOREG, ..q }, d) {
                            // `d` is also the source (`add rax, rax`): it still holds `s`.
                            f.s = s;
                        }
                        ops[j] = f;
                        ops.remove(k);
                        folded = true;
                    }
                    break;
                }
                if q.d == s {
                    break;
                }
            }
        }
        if !folded {
            k += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Compare-and-branch pairs
//
// Most blocks end in `cmp`/`test` and a conditional jump. The translator gives such a pair
// one entry (see `decode`): one dispatch instead of two, and the condition is evaluated on
// values the handler has just computed instead of being re-derived from the lazy record.

/// The fused handler for `a` (`cmp`/`test` of registers, or of a register and an immediate)
/// followed by `b` (`jcc` to a direct target), or `None` if the pair has no fused form.
pub fn select_cmp_jcc(a_ins: &Instruction, a: &Insn, b_ins: &Instruction) -> Option<Handler> {
    if !matches!(a_ins.mnemonic(), M::Cmp | M::Test) || a_ins.op_count() != 2 || !regs_only(a_ins) {
        return None;
    }
    if !is_jcc(b_ins.mnemonic())
        || !matches!(
            b_ins.op_kind(0),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    {
        return None;
    }
    let cc = (b_ins.condition_code() as u8).wrapping_sub(1);
    if cc > 15 {
        return None;
    }
    let test = a_ins.mnemonic() == M::Test;
    let imm = !is_gpr(a_ins, 1);
    macro_rules! by_cc {
        ($op:expr, $s:expr, $imm:expr) => {
            match cc {
                0 => cmp_jcc::<{ $op }, $s, 0, $imm> as Handler,
                1 => cmp_jcc::<{ $op }, $s, 1, $imm>,
                2 => cmp_jcc::<{ $op }, $s, 2, $imm>,
                3 => cmp_jcc::<{ $op }, $s, 3, $imm>,
                4 => cmp_jcc::<{ $op }, $s, 4, $imm>,
                5 => cmp_jcc::<{ $op }, $s, 5, $imm>,
                6 => cmp_jcc::<{ $op }, $s, 6, $imm>,
                7 => cmp_jcc::<{ $op }, $s, 7, $imm>,
                8 => cmp_jcc::<{ $op }, $s, 8, $imm>,
                9 => cmp_jcc::<{ $op }, $s, 9, $imm>,
                10 => cmp_jcc::<{ $op }, $s, 10, $imm>,
                11 => cmp_jcc::<{ $op }, $s, 11, $imm>,
                12 => cmp_jcc::<{ $op }, $s, 12, $imm>,
                13 => cmp_jcc::<{ $op }, $s, 13, $imm>,
                14 => cmp_jcc::<{ $op }, $s, 14, $imm>,
                _ => cmp_jcc::<{ $op }, $s, 15, $imm>,
            }
        };
    }
    macro_rules! by_size_cc {
        ($op:expr, $imm:expr) => {
            match a.size {
                1 => by_cc!($op, 1, $imm),
                2 => by_cc!($op, 2, $imm),
                4 => by_cc!($op, 4, $imm),
                _ => by_cc!($op, 8, $imm),
            }
        };
    }
    Some(match (test, imm) {
        (false, false) => by_size_cc!(alu::CMP, false),
        (false, true) => by_size_cc!(alu::CMP, true),
        (true, false) => by_size_cc!(alu::TEST, false),
        (true, true) => by_size_cc!(alu::TEST, true),
    })
}

/// `cmp`/`test` (`OP`) of `r0` with `r1` or the immediate in `disp`, then `jcc` (`CC`) to
/// `imm`. The flags are recorded as `cmp`/`test` leaves them (the block ends here, so they
/// are live); `icount` takes the second instruction of the entry.
fn cmp_jcc<const OP: u8, const S: u8, const CC: u8, const IMM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let b = if IMM { i.disp } else { cpu.rreg(i.r1, S) };
    alu_op(cpu, OP, S, a, b);
    cpu.icount += 1;
    cpu.rip = if cpu.cond(CC) { i.imm } else { i.next_ip };
    Ok(())
}

fn shift_handler(op: u8, s: u8, cl: bool) -> Handler {
    use crate::arith::sh;
    macro_rules! by_s {
        ($op:expr) => {
            match (s, cl) {
                (1, false) => shift_r::<{ $op }, 1, false> as Handler,
                (2, false) => shift_r::<{ $op }, 2, false>,
                (4, false) => shift_r::<{ $op }, 4, false>,
                (8, false) => shift_r::<{ $op }, 8, false>,
                (1, true) => shift_r::<{ $op }, 1, true>,
                (2, true) => shift_r::<{ $op }, 2, true>,
                (4, true) => shift_r::<{ $op }, 4, true>,
                _ => shift_r::<{ $op }, 8, true>,
            }
        };
    }
    match op {
        sh::SHL => by_s!(sh::SHL),
        sh::SHR => by_s!(sh::SHR),
        sh::SAR => by_s!(sh::SAR),
        sh::ROL => by_s!(sh::ROL),
        _ => by_s!(sh::ROR),
    }
}

fn is_cmov(m: M) -> bool {
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

fn is_setcc(m: M) -> bool {
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

fn is_jcc(m: M) -> bool {
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

/// Fills handler-specific fields that `select` relies on (condition codes, push sizes).
pub fn finish(ins: &Instruction, i: &mut Insn, bitness: u32) {
    let cc = ins.condition_code() as u8;
    if cc != 0 {
        i.aux = cc - 1;
    }
    match ins.mnemonic() {
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if ins.op_count() == 1 => i.imm = 1,
        M::Call | M::Ret => {
            i.aux = stack_size(ins, bitness);
            if ins.mnemonic() == M::Ret && ins.op_count() == 1 {
                i.imm = ins.immediate(0);
            } else if ins.mnemonic() == M::Ret {
                i.imm = 0;
            }
        }
        _ => {}
    }
}

/// Operand size of a near call/ret/push-like instruction from its code's operand size.
fn stack_size(ins: &Instruction, bitness: u32) -> u8 {
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

// ---------------------------------------------------------------------------------------
// Generic interpreter

fn cc_of(ins: &Instruction) -> u8 {
    (ins.condition_code() as u8).wrapping_sub(1)
}

/// Executes any instruction by mnemonic. Slower than the specialised handlers.
pub fn generic(cpu: &mut Cpu, i: &Insn) -> Flow {
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
                    return crate::system::mov_to_sreg(cpu, sg, v as u16);
                }
                if is_cr(r) || is_dr(r) {
                    return crate::system::mov_to_crdr(cpu, i);
                }
            }
            if ins.op_kind(1) == OpKind::Register {
                let r = ins.op_register(1);
                if is_cr(r) || is_dr(r) {
                    return crate::system::mov_from_crdr(cpu, i);
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
                crate::system::mov_to_sreg(cpu, sg, v as u16)?;
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
        M::Pushf | M::Pushfd | M::Pushfq => crate::system::pushf(cpu, i),
        M::Popf | M::Popfd | M::Popfq => crate::system::popf(cpu, i),
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
        M::Mul | M::Imul | M::Div | M::Idiv => crate::arith::muldiv(cpu, i),
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
            crate::arith::shift(cpu, i)
        }
        M::Shld | M::Shrd => crate::arith::shiftd(cpu, i),
        M::Bt | M::Bts | M::Btr | M::Btc => crate::arith::bit_test(cpu, i),
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => crate::arith::bit_scan(cpu, i),
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
        M::Cmpxchg8b | M::Cmpxchg16b => crate::arith::cmpxchg_wide(cpu, i),
        M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => crate::arith::bcd(cpu, i),
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
                crate::system::far_jmp(cpu, sel, off, i)
            }
            OpKind::Memory if ins.memory_size().size() > 8 || is_far(ins) => {
                let (sel, off) = far_ptr(cpu, i)?;
                crate::system::far_jmp(cpu, sel, off, i)
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
                crate::system::far_call(cpu, sel, off, i)
            }
            OpKind::Memory if is_far(ins) => {
                let (sel, off) = far_ptr(cpu, i)?;
                crate::system::far_call(cpu, sel, off, i)
            }
            _ => {
                let v = rd_op(cpu, i, 0, s)?;
                let ps = stack_size(ins, cpu.bitness());
                cpu.push(ps, i.next_ip)?;
                cpu.rip = v & mask(ps);
                Ok(())
            }
        },
        M::Retf => crate::system::far_ret(cpu, i),
        M::Iret | M::Iretd | M::Iretq => crate::system::iret(cpu, i),
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
        M::Int3 => Err(Ex::SoftInt(3)),
        M::Into => {
            if cpu.of() {
                Err(Ex::SoftInt(4))
            } else {
                Ok(())
            }
        }
        M::Int1 => Err(Ex::SoftInt(1)),
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
                return crate::x87::fwait(cpu);
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
            crate::string::string_op(cpu, i)
        }
        M::In | M::Out => crate::system::in_out(cpu, i),
        _ => {
            if let Some(r) = crate::system::exec_system(cpu, i) {
                return r;
            }
            if let Some(r) = crate::sse::exec_sse(cpu, i) {
                return r;
            }
            if let Some(r) = crate::x87::exec_x87(cpu, i) {
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

/// Reads a far pointer operand (offset then selector).
pub fn far_ptr(cpu: &mut Cpu, i: &Insn) -> Result<(u16, u64), Ex> {
    let a = ea(cpu, i);
    let osz = match i.instr.memory_size().size() {
        4 => 2,
        6 => 4,
        _ => 8,
    };
    let off = cpu.rd_n(a, osz)?;
    let sel = cpu.rd::<2>(a.wrapping_add(u64::from(osz)) & cpu.lin_mask)?;
    Ok((sel as u16, off))
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
