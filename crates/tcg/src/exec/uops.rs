//! Register micro-op runs.
//!
//! A straight run of register-only instructions that neither read flags nor produce live
//! ones (moves, `lea`, extensions, and arithmetic whose flags the dead-flag pass found dead)
//! is given one block entry holding compact micro-ops, which `run_uops` executes in a
//! plain loop over a `match`: no indirect call, result check or spill per instruction.
//! None of them can fault, so an exception never lands in the middle of a run.

use iced_x86::{Instruction, Mnemonic as M};

use super::dead_flags::{FlagUse, flag_use, reg_or_imm, regs_only, shift_count};
use super::operands::{is_gpr, op_size};
use crate::cpu::Cpu;
use crate::exc::Flow;
use crate::insn::{Insn, NOREG, Uop, UopOp};

/// The micro-op for `ins` (prepared as `i`), if it has one; `flags_dead` says whether the
/// dead-flag pass found its flag results dead.
pub(crate) fn uop_of(ins: &Instruction, i: &Insn, flags_dead: bool) -> Option<Uop> {
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
pub(crate) fn run_uops(cpu: &mut Cpu, i: &Insn) -> Flow {
    let Some(ops) = i.uops.as_deref() else {
        return Ok(());
    };
    let g = &mut cpu.gpr;
    for u in ops {
        // Each kind reads only the registers it uses (a `mov` loads one, an immediate none).
        let s = || g[usize::from(u.s)];
        let dv = || g[usize::from(u.a)];
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
                .wrapping_add(g[usize::from(u.x)] << (u.sc & 3)),
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
pub(crate) fn fold_moves(ops: &mut Vec<Uop>) {
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
