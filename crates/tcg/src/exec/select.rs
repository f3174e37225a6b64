//! Handler selection: picks the specialised handler of an instruction form at translation
//! time, or the generic interpreter.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::alu::{self, alu_mnemonic};
use super::arith::{self, sh};
use super::generic::{generic, is_cmov, is_jcc, is_setcc, stack_size};
use super::handlers::*;
use super::operands::{is_gpr, is_imm, op_size};
use crate::insn::{Handler, Insn};

/// Picks the handler for a decoded instruction. `i` has its operand fields filled;
/// `bitness` is the code size of the block being translated (16, 32 or 64).
pub(crate) fn select(ins: &Instruction, i: &Insn, bitness: u32) -> Handler {
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
            let op = arith::shift_kind(m).unwrap_or(0);
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

fn shift_handler(op: u8, s: u8, cl: bool) -> Handler {
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

/// Fills handler-specific fields that `select` relies on (condition codes, push sizes).
pub(crate) fn finish(ins: &Instruction, i: &mut Insn, bitness: u32) {
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
