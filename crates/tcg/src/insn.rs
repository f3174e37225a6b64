//! The decoded-instruction record the translator produces and the handlers consume: the
//! handler type, the pre-decoded [`Insn`] with its operand fields, iced register mappings,
//! and the micro-op record a fused entry of register instructions carries.

use iced_x86::{Instruction, Register};

use crate::cpu::Cpu;
use crate::exc::Flow;

/// An instruction handler.
pub type Handler = fn(&mut Cpu, &Insn) -> Flow;

/// Absent base/index register: `Cpu::gpr[16]` is always zero.
pub const NOREG: u8 = 16;

/// A pre-decoded instruction.
#[derive(Clone, Debug)]
pub struct Insn {
    /// Handler for this form.
    pub exec: Handler,
    /// Address of the instruction.
    pub ip: u64,
    /// Address of the next instruction.
    pub next_ip: u64,
    /// Immediate (sign-extended to 64 bits as the form defines) or branch target.
    pub imm: u64,
    /// Memory displacement (absolute address for RIP-relative operands).
    pub disp: u64,
    /// Effective-address mask for the address size.
    pub amask: u64,
    /// Operand size in bytes.
    pub size: u8,
    /// First register operand (GPR index; 16..20 = AH..BH).
    pub r0: u8,
    /// Second register operand.
    pub r1: u8,
    /// Memory base register or `NOREG`.
    pub base: u8,
    /// Memory index register or `NOREG`.
    pub index: u8,
    /// log2 of the index scale.
    pub scale: u8,
    /// Segment register of the memory operand.
    pub seg: u8,
    /// Handler-specific byte (condition code, ALU op; the instructions a micro-op run stands
    /// for).
    pub aux: u8,
    /// Full decoded form for the generic handlers.
    pub instr: Instruction,
    /// Micro-ops of an entry that stands for a run of register instructions (see
    /// `exec::uops::run_uops`).
    pub uops: Option<Box<[Uop]>>,
}

/// Maps an iced general-purpose register to (index, size in bytes).
pub fn gpr(r: Register) -> Option<(u8, u8)> {
    let n = r as u32;
    match n {
        1..=4 => Some(((n - 1) as u8, 1)),
        5..=8 => Some(((n - 5 + 16) as u8, 1)),
        9..=20 => Some(((n - 5) as u8, 1)),
        21..=36 => Some(((n - 21) as u8, 2)),
        37..=52 => Some(((n - 37) as u8, 4)),
        53..=68 => Some(((n - 53) as u8, 8)),
        _ => None,
    }
}

/// Maps an iced segment register to our index (same order: ES CS SS DS FS GS).
pub fn sreg(r: Register) -> Option<usize> {
    let n = r as u32;
    (71..=76).contains(&n).then(|| (n - 71) as usize)
}

/// Maps XMM registers to 0..15.
pub fn xmm(r: Register) -> Option<usize> {
    let n = r as u32;
    (77..=92).contains(&n).then(|| (n - 77) as usize)
}

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
    /// this micro-op (see `exec::uops::fold_moves`).
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
