//! Dead arithmetic flags.
//!
//! Most flag results are overwritten before anything reads them (`imul`, `shr`, `add` in a
//! row, then `cmp` before the branch). The translator walks each block backwards and gives
//! an instruction whose six status flags are all overwritten, before any instruction could
//! read them or observe them, a variant that computes only its result.

use iced_x86::{Instruction, Mnemonic as M};

use super::alu;
use super::handlers::{by_size, nop, sized};
use super::operands::{is_gpr, is_imm, sext};
use crate::cpu::Cpu;
use crate::exc::Flow;
use crate::insn::{Handler, Insn, UopOp};

/// How an instruction treats the six status flags, for the dead-flag pass of
/// [`crate::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagUse {
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
pub(super) fn reg_or_imm(rr: bool, reg: UopOp, imm: UopOp) -> UopOp {
    if rr { reg } else { imm }
}

/// Whether the instruction's explicit operands are all general registers or immediates,
/// with a register first.
pub(super) fn regs_only(ins: &Instruction) -> bool {
    let n = ins.op_count();
    n >= 1 && is_gpr(ins, 0) && (1..n).all(|k| is_gpr(ins, k) || is_imm(ins, k))
}

/// Classifies `ins` (prepared as `i`) for the dead-flag pass. Conservative: only forms
/// whose behaviour is fully known here are `Pass` or `Kill`.
pub(crate) fn flag_use(ins: &Instruction, i: &Insn) -> FlagUse {
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
pub(super) fn shift_count(i: &Insn) -> u32 {
    (i.imm as u32) & if i.size == 8 { 0x3f } else { 0x1f }
}

/// The handler that computes only the result of a [`FlagUse::Kill`] instruction, for use
/// where its flags are dead; `None` if there is no such variant.
pub(crate) fn select_noflags(ins: &Instruction, i: &Insn) -> Option<Handler> {
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
