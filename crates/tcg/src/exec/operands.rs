//! Operand access, the leaf of the instruction semantics: operand masks and sign extension,
//! effective addresses, reading and writing register/memory operands, the stack, and the
//! operand-kind predicates the handler selection uses. Imports nothing from the other
//! `exec` modules.

use iced_x86::{Instruction, OpKind};

use crate::cpu::{Cpu, sr};
use crate::exc::{Ex, Flow};
use crate::insn::{Insn, gpr, sreg};

/// Mask for `size` bytes.
#[inline(always)]
pub(crate) fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Sign-extends a `size`-byte value.
#[inline(always)]
pub(crate) fn sext(v: u64, size: u8) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Linear address of the memory operand.
#[inline(always)]
pub(crate) fn ea(cpu: &Cpu, i: &Insn) -> u64 {
    let off = i
        .disp
        .wrapping_add(cpu.gpr[usize::from(i.base)])
        .wrapping_add(cpu.gpr[usize::from(i.index)] << (i.scale & 3))
        & i.amask;
    cpu.ebase[(i.seg & 7) as usize].wrapping_add(off) & cpu.lin_mask
}

/// Offset (effective address without segment base) of the memory operand.
#[inline(always)]
pub(crate) fn ea_off(cpu: &Cpu, i: &Insn) -> u64 {
    i.disp
        .wrapping_add(cpu.gpr[usize::from(i.base)])
        .wrapping_add(cpu.gpr[usize::from(i.index)] << (i.scale & 3))
        & i.amask
}

impl Cpu {
    /// Reads `size` bytes at `lin`.
    #[inline(always)]
    pub(crate) fn rd_n(&mut self, lin: u64, size: u8) -> Result<u64, Ex> {
        match size {
            1 => self.rd::<1>(lin),
            2 => self.rd::<2>(lin),
            4 => self.rd::<4>(lin),
            _ => self.rd::<8>(lin),
        }
    }
    /// Writes `size` bytes at `lin`.
    #[inline(always)]
    pub(crate) fn wr_n(&mut self, lin: u64, size: u8, v: u64) -> Flow {
        match size {
            1 => self.wr::<1>(lin, v),
            2 => self.wr::<2>(lin, v),
            4 => self.wr::<4>(lin, v),
            _ => self.wr::<8>(lin, v),
        }
    }

    /// Pushes `size` bytes.
    #[inline(always)]
    pub(crate) fn push(&mut self, size: u8, v: u64) -> Flow {
        let sp = self.gpr[4].wrapping_sub(u64::from(size)) & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        self.wr_n(lin, size, v)?;
        self.gpr[4] = (self.gpr[4] & !self.sp_mask) | sp;
        Ok(())
    }

    /// Pops `size` bytes.
    #[inline(always)]
    pub(crate) fn pop(&mut self, size: u8) -> Result<u64, Ex> {
        let sp = self.gpr[4] & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        let v = self.rd_n(lin, size)?;
        self.gpr[4] =
            (self.gpr[4] & !self.sp_mask) | (sp.wrapping_add(u64::from(size)) & self.sp_mask);
        Ok(v)
    }

    /// Reads the stack at offset `off` from RSP without popping.
    pub(crate) fn peek(&mut self, off: u64, size: u8) -> Result<u64, Ex> {
        let sp = self.gpr[4].wrapping_add(off) & self.sp_mask;
        let lin = self.ebase[sr::SS].wrapping_add(sp) & self.lin_mask;
        self.rd_n(lin, size)
    }

    /// Adds to RSP within the stack width.
    pub(crate) fn add_sp(&mut self, n: u64) {
        let sp = self.gpr[4].wrapping_add(n) & self.sp_mask;
        self.gpr[4] = (self.gpr[4] & !self.sp_mask) | sp;
    }
}

/// Reads operand `k`.
pub(crate) fn rd_op(cpu: &mut Cpu, i: &Insn, k: u32, size: u8) -> Result<u64, Ex> {
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
pub(crate) fn wr_op(cpu: &mut Cpu, i: &Insn, k: u32, size: u8, v: u64) -> Flow {
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
pub(crate) fn op_size(i: &Insn, k: u32) -> u8 {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => gpr(ins.op_register(k)).map_or(i.size, |(_, s)| s),
        OpKind::Memory => ins.memory_size().size().clamp(1, 255) as u8,
        _ => i.size.max(1),
    }
}

pub(super) fn is_gpr(ins: &Instruction, k: u32) -> bool {
    ins.op_kind(k) == OpKind::Register && gpr(ins.op_register(k)).is_some()
}

pub(super) fn is_imm(ins: &Instruction, k: u32) -> bool {
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

/// Reads a far pointer operand (offset then selector).
pub(crate) fn far_ptr(cpu: &mut Cpu, i: &Insn) -> Result<(u16, u64), Ex> {
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
