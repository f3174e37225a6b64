//! Compare-and-branch pairs.
//!
//! Most blocks end in `cmp`/`test` and a conditional jump. The translator gives such a pair
//! one entry (see `decode`): one dispatch instead of two, and the condition is evaluated on
//! values the handler has just computed instead of being re-derived from the lazy record.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::alu::{self, alu_op};
use super::dead_flags::regs_only;
use super::generic::is_jcc;
use super::operands::is_gpr;
use crate::cpu::Cpu;
use crate::exc::Flow;
use crate::insn::{Handler, Insn};

/// The fused handler for `a` (`cmp`/`test` of registers, or of a register and an immediate)
/// followed by `b` (`jcc` to a direct target), or `None` if the pair has no fused form.
pub(crate) fn select_cmp_jcc(
    a_ins: &Instruction,
    a: &Insn,
    b_ins: &Instruction,
) -> Option<Handler> {
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
