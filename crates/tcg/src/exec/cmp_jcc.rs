//! Compare-and-branch pairs.
//!
//! Most blocks end in `cmp`/`test` and a conditional jump, and most loops in an update of
//! their counter and a conditional jump (`add`/`sub`/`and`/`or`/`xor` then `jcc`, `dec`
//! then `jnz`). The translator gives such a pair one entry (see `decode`): one dispatch
//! instead of two, and the condition is evaluated on values the handler has just computed
//! instead of being re-derived from the lazy record.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::alu::{self, alu_op};
use super::dead_flags::regs_only;
use super::generic::is_jcc;
use super::handlers::sign_bit_of;
use super::operands::is_gpr;
use crate::cpu::{Cc, CcOp, Cpu};
use crate::exc::Flow;
use crate::insn::{Handler, Insn};

/// The fused handler for `a` (`cmp`/`test` of registers, or of a register and an immediate)
/// followed by `b` (`jcc` to a direct target), or `None` if the pair has no fused form.
pub(crate) fn select_cmp_jcc(
    a_ins: &Instruction,
    a: &Insn,
    b_ins: &Instruction,
) -> Option<Handler> {
    let m = a_ins.mnemonic();
    if !regs_only(a_ins) {
        return None;
    }
    // Counter updates: 32- and 64-bit registers only (writes zero-extend or replace).
    let update = matches!(
        m,
        M::Add | M::Sub | M::And | M::Or | M::Xor | M::Inc | M::Dec
    );
    if update && (!(a.size == 4 || a.size == 8) || a.r0 >= 16) {
        return None;
    }
    let incdec = matches!(m, M::Inc | M::Dec);
    if !(incdec && a_ins.op_count() == 1
        || a_ins.op_count() == 2 && (update || matches!(m, M::Cmp | M::Test)))
    {
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
    if incdec {
        macro_rules! by_cc_id {
            ($dec:expr, $s:expr) => {
                match cc {
                    0 => incdec_jcc::<$dec, $s, 0> as Handler,
                    1 => incdec_jcc::<$dec, $s, 1>,
                    2 => incdec_jcc::<$dec, $s, 2>,
                    3 => incdec_jcc::<$dec, $s, 3>,
                    4 => incdec_jcc::<$dec, $s, 4>,
                    5 => incdec_jcc::<$dec, $s, 5>,
                    6 => incdec_jcc::<$dec, $s, 6>,
                    7 => incdec_jcc::<$dec, $s, 7>,
                    8 => incdec_jcc::<$dec, $s, 8>,
                    9 => incdec_jcc::<$dec, $s, 9>,
                    10 => incdec_jcc::<$dec, $s, 10>,
                    11 => incdec_jcc::<$dec, $s, 11>,
                    12 => incdec_jcc::<$dec, $s, 12>,
                    13 => incdec_jcc::<$dec, $s, 13>,
                    14 => incdec_jcc::<$dec, $s, 14>,
                    _ => incdec_jcc::<$dec, $s, 15>,
                }
            };
        }
        return Some(match (m == M::Dec, a.size) {
            (false, 4) => by_cc_id!(false, 4),
            (false, _) => by_cc_id!(false, 8),
            (true, 4) => by_cc_id!(true, 4),
            (true, _) => by_cc_id!(true, 8),
        });
    }
    let test = m == M::Test;
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
    // Updates come in 32- and 64-bit sizes only (checked above).
    macro_rules! by_wide_cc {
        ($op:expr, $imm:expr) => {
            match a.size {
                4 => by_cc!($op, 4, $imm),
                _ => by_cc!($op, 8, $imm),
            }
        };
    }
    Some(match (m, imm) {
        (M::Add, false) => by_wide_cc!(alu::ADD, false),
        (M::Add, true) => by_wide_cc!(alu::ADD, true),
        (M::Sub, false) => by_wide_cc!(alu::SUB, false),
        (M::Sub, true) => by_wide_cc!(alu::SUB, true),
        (M::And, false) => by_wide_cc!(alu::AND, false),
        (M::And, true) => by_wide_cc!(alu::AND, true),
        (M::Or, false) => by_wide_cc!(alu::OR, false),
        (M::Or, true) => by_wide_cc!(alu::OR, true),
        (M::Xor, false) => by_wide_cc!(alu::XOR, false),
        (M::Xor, true) => by_wide_cc!(alu::XOR, true),
        _ => match (test, imm) {
            (false, false) => by_size_cc!(alu::CMP, false),
            (false, true) => by_size_cc!(alu::CMP, true),
            (true, false) => by_size_cc!(alu::TEST, false),
            (true, true) => by_size_cc!(alu::TEST, true),
        },
    })
}

/// ALU operation `OP` (`cmp`/`test`, or `add`/`sub`/`and`/`or`/`xor`, which write `r0`)
/// of `r0` with `r1` or the immediate in `disp`, then `jcc` (`CC`) to `imm`. The flags are
/// recorded as the operation leaves them (the block ends here, so they are live); `icount`
/// takes the second instruction of the entry.
fn cmp_jcc<const OP: u8, const S: u8, const CC: u8, const IMM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Flow {
    let a = cpu.rreg(i.r0, S);
    let b = if IMM { i.disp } else { cpu.rreg(i.r1, S) };
    let r = alu_op(cpu, OP, S, a, b);
    if OP != alu::CMP && OP != alu::TEST {
        cpu.wreg(i.r0, S, r);
    }
    cpu.icount += 1;
    cpu.rip = if cpu.cond(CC) { i.imm } else { i.next_ip };
    Ok(())
}

/// `inc`/`dec` (`DEC`) of `r0`, then `jcc` (`CC`) to `imm`: CF carries through as the lone
/// instruction keeps it; ZF and SF (`jz`/`jnz`/`js`/`jns`) are taken from the result.
fn incdec_jcc<const DEC: bool, const S: u8, const CC: u8>(cpu: &mut Cpu, i: &Insn) -> Flow {
    let cf = cpu.cf();
    let a = cpu.rreg(i.r0, S);
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & if S == 8 { u64::MAX } else { 0xffff_ffff };
    cpu.cc = Cc {
        op: if DEC { CcOp::Dec } else { CcOp::Inc },
        size: S,
        res: r,
        a,
        b: 1,
        aux: u64::from(cf),
    };
    cpu.wreg(i.r0, S, r);
    cpu.icount += 1;
    let taken = match CC >> 1 {
        2 => (r == 0) ^ (CC & 1 != 0),
        4 => (r & sign_bit_of(S) != 0) ^ (CC & 1 != 0),
        _ => cpu.cond(CC),
    };
    cpu.rip = if taken { i.imm } else { i.next_ip };
    Ok(())
}
