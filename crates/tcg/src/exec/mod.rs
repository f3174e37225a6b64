//! Instruction semantics, layered (a module uses only modules listed before it):
//!
//! * [`operands`]: the leaf — operand masks, effective addresses, register/memory operand
//!   reads and writes, the stack;
//! * [`alu`]: the ALU core (`alu_op` and its lazy flags);
//! * instruction groups: [`arith`] (multiply/divide, shifts, bit ops, BCD), [`system`]
//!   (segments, control registers, MSRs, interrupt delivery, I/O), [`string`] (`movs`,
//!   `ins`, ... with `rep`), [`x87`], [`sse`];
//! * [`handlers`]: specialised handlers for the hot integer forms; [`generic`]: the
//!   interpreter by mnemonic that runs everything else;
//! * [`select`]: the handler chosen for a form at translation time; [`dead_flags`]:
//!   flag-free variants where the flags are dead;
//! * [`uops`]: runs of register micro-ops; [`cmp_jcc`]: fused compare-and-branch pairs.
//!
//! This module only re-exports what the translator ([`crate::decode`]) and the vCPU loop
//! ([`crate::vm`]) call.

pub(crate) mod alu;
pub(crate) mod arith;
pub(crate) mod cmp_jcc;
pub(crate) mod dead_flags;
pub(crate) mod generic;
pub(crate) mod handlers;
pub(crate) mod operands;
pub(crate) mod select;
pub(crate) mod sse;
pub(crate) mod string;
pub(crate) mod system;
pub(crate) mod uops;
pub(crate) mod x87;

pub(crate) use cmp_jcc::select_cmp_jcc;
pub(crate) use dead_flags::{FlagUse, flag_use, select_noflags};
pub(crate) use generic::generic;
pub(crate) use handlers::raise_ud;
pub(crate) use select::{finish, select};
pub(crate) use uops::{fold_moves, run_uops, uop_of};
