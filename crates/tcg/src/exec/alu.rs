//! The ALU core: operation numbers in opcode order and `alu_op`, which computes a result and
//! records its lazy flags.

use iced_x86::Mnemonic as M;

use super::operands::mask;
use crate::cpu::{CcOp, Cpu};

// ALU operation numbers in opcode order.
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

/// Performs ALU `op` and records flags; returns the result.
#[inline(always)]
pub(crate) fn alu_op(cpu: &mut Cpu, op: u8, size: u8, a: u64, b: u64) -> u64 {
    let m = mask(size);
    let a = a & m;
    let b = b & m;
    match op {
        ADD => {
            let r = a.wrapping_add(b) & m;
            cpu.set_cc(CcOp::Add, size, r, a, b);
            r
        }
        OR => {
            let r = a | b;
            cpu.set_cc(CcOp::Logic, size, r, a, b);
            r
        }
        ADC => {
            let c = u64::from(cpu.cf());
            let r = a.wrapping_add(b).wrapping_add(c) & m;
            cpu.set_cc(CcOp::Adc, size, r, a, b);
            cpu.cc.aux = c;
            r
        }
        SBB => {
            let c = u64::from(cpu.cf());
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            cpu.set_cc(CcOp::Sbb, size, r, a, b);
            cpu.cc.aux = c;
            r
        }
        AND | TEST => {
            let r = a & b;
            cpu.set_cc(CcOp::Logic, size, r, a, b);
            r
        }
        XOR => {
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

pub(super) fn alu_mnemonic(m: M) -> Option<u8> {
    Some(match m {
        M::Add => ADD,
        M::Or => OR,
        M::Adc => ADC,
        M::Sbb => SBB,
        M::And => AND,
        M::Sub => SUB,
        M::Xor => XOR,
        M::Cmp => CMP,
        M::Test => TEST,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use keel_accel::IoBuses;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::mem::PhysMem;

    #[test]
    fn alu_flags_match_hand_computed_values() {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut cpu = Cpu::new(
            PhysMem::new(mem, Arc::new(IoBuses::new())),
            Default::default(),
            0,
        );
        let cpu = &mut cpu;
        // (op, size, a, b, result, flags & (CF|PF|AF|ZF|SF|OF))
        let cases: &[(u8, u8, u64, u64, u64, u64)] = &[
            (ADD, 1, 0x7f, 0x01, 0x80, 0x890), // OF SF AF
            (ADD, 1, 0xff, 0x01, 0x00, 0x55),  // CF PF AF ZF
            (ADD, 4, 0xffff_ffff, 1, 0, 0x55),
            (ADD, 8, 1 << 63, 1 << 63, 0, 0x845), // CF PF ZF OF
            (SUB, 1, 0x00, 0x01, 0xff, 0x95),     // CF PF AF SF
            (SUB, 2, 0x8000, 1, 0x7fff, 0x814),   // OF AF PF
            (CMP, 4, 5, 5, 0, 0x44),              // ZF PF
            (AND, 1, 0xf0, 0x0f, 0, 0x44),        // ZF PF; AF cleared
            (XOR, 8, u64::MAX, 1, u64::MAX - 1, 0x80), // SF; PF of 0xfe = odd
            (OR, 2, 0x0100, 0x0003, 0x0103, 0x04),
        ];
        for &(op, size, a, b, res, want) in cases {
            cpu.flush_flags();
            let r = alu_op(cpu, op, size, a, b);
            assert_eq!(r, res, "op {op} size {size} {a:#x},{b:#x}");
            assert_eq!(
                cpu.flags() & 0x8d5,
                want,
                "flags of op {op} size {size} {a:#x},{b:#x}"
            );
        }
        // adc/sbb consume CF.
        cpu.set_flag(1, true);
        assert_eq!(alu_op(cpu, ADC, 1, 0xfe, 0x01), 0x00);
        assert_eq!(cpu.flags() & 0x8d5, 0x55);
        cpu.set_flag(1, true);
        assert_eq!(alu_op(cpu, SBB, 1, 0x00, 0x00), 0xff);
        assert_eq!(cpu.flags() & 0x8d5, 0x95);
    }
}
