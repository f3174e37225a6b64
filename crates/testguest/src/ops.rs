//! Table-driven instruction tests and the Rust reference model of their x86 semantics.
//!
//! A guest built by [`ops_guest`] runs, for every [`OpSpec`], a loop over [`Case`]s: load
//! `rax = a`, `rbx = b`, `rcx = rdx = c`, load the arithmetic flags from `flags_in`, execute
//! the instruction once, capture RFLAGS, and store a [`CaseResult`] (rax, rbx, rdx, flags
//! masked to the bits the architecture defines for that case, exception mark). It prints one
//! hash per spec; [`model`] predicts every record, so the expected text is known without a
//! reference CPU. The same model backs the property tests.
//!
//! Where Intel and AMD documentation disagree or leave a result undefined, the case is either
//! masked (flags) or kept out of the generated operands (documented at [`normalize`]).

use iced_x86::code_asm::*;

use crate::asm::{Guest, Mode, R, hash_u32s, hash_u64s, layout};
use crate::{GuestError, ResultArea, TestGuest};

/// Size of one case record in guest memory.
pub const CASE_SIZE: usize = 48;
/// Size of one result record in guest memory.
pub const RESULT_SIZE: usize = 40;

/// CF, PF, AF, ZF, SF, OF.
pub const ARITH_FLAGS: u64 = 0x8d5;
const CF: u64 = 0x1;
const PF: u64 = 0x4;
const AF: u64 = 0x10;
const ZF: u64 = 0x40;
const SF: u64 = 0x80;
const OF: u64 = 0x800;

/// The instructions the table-driven guests cover.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
    Cmp,
    Test,
    Inc,
    Dec,
    Neg,
    Not,
    /// `shl r, cl` with the count in `c`.
    Shl,
    Shr,
    Sar,
    Rol,
    Ror,
    Rcl,
    Rcr,
    /// `shl r, 1` (the D0/D1 encoding).
    ShlOne,
    ShrOne,
    SarOne,
    /// `mul rbx`: rdx:rax = rax * rbx.
    Mul,
    /// `imul rbx` (one operand).
    Imul1,
    /// `imul rax, rbx`.
    Imul2,
    /// `div rbx` with rdx:rax as dividend (`c` supplies rdx; 8-bit: ax).
    Div,
    Idiv,
    /// `bt rax, rbx` and friends (register forms).
    Bt,
    Bts,
    Btr,
    Btc,
    /// `bsf rax, rbx` (rax keeps `a` when rbx is zero).
    Bsf,
    Bsr,
    /// `shld rax, rbx, cl` (count in `c`).
    Shld,
    Shrd,
    /// `cmpxchg rdx, rbx` with the accumulator in rax.
    Cmpxchg,
    /// `xadd rax, rbx`.
    Xadd,
    Bswap,
    /// All 16 `setcc` into scratch bytes, returned in rbx (cc 0-7) and rdx (cc 8-15).
    Setcc,
    /// All 16 `cmovcc r9, r10` of this width, folded into rbx.
    Cmovcc,
    /// `cbw`/`cwd`/`cdq`/`cqo` by width.
    Cwd,
    /// `movzx rax, bl` (destination width 16/32/64).
    Movzx8,
    /// `movsx rax, bl`.
    Movsx8,
    /// `movzx eax, bx` (destination width 32/64).
    Movzx16,
    /// `movsx eax, bx`.
    Movsx16,
    /// `movsxd rax, ebx` (width 64).
    Movsxd,
    /// `xchg rax, rbx`.
    Xchg,
    /// `imul rax, rbx, imm` (imm -3 for 16-bit, 0x12345 otherwise).
    Imul3,
    /// `cmc` (width 64 only: no operands).
    Cmc,
    /// `clc`.
    Clc,
    /// `stc`.
    Stc,
    /// `cmpxchg8b [mem]`: edx:eax = a, ecx:ebx = b, the quadword in memory = c; the memory
    /// after the instruction is returned in rbx (width 64 only).
    Cmpxchg8b,
}

/// One instruction at one operand width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpSpec {
    /// Instruction.
    pub op: Op,
    /// Operand width in bits: 8, 16, 32 or 64.
    pub width: u32,
    /// The destination (`rax`'s role) is a memory operand instead: the read-modify-write
    /// path. The value starts as `a` and is returned in the record's `rax`.
    pub mem: bool,
}

impl OpSpec {
    /// Creates a register-form spec.
    pub const fn new(op: Op, width: u32) -> Self {
        Self {
            op,
            width,
            mem: false,
        }
    }

    /// Creates a memory-destination spec (see [`OpSpec::mem`]).
    pub const fn mem(op: Op, width: u32) -> Self {
        Self {
            op,
            width,
            mem: true,
        }
    }

    /// Name used in the guest's output, e.g. `add32` or `add32m`.
    pub fn name(&self) -> String {
        format!(
            "{}{}{}",
            format!("{:?}", self.op).to_lowercase(),
            self.width,
            if self.mem { "m" } else { "" }
        )
    }

    /// Whether the instruction exists at this width (and in memory form, if asked).
    pub fn is_valid(&self) -> bool {
        use Op::*;
        let w = self.width;
        if !matches!(w, 8 | 16 | 32 | 64) {
            return false;
        }
        if self.mem
            && !matches!(
                self.op,
                Add | Adc
                    | Sub
                    | Sbb
                    | And
                    | Or
                    | Xor
                    | Cmp
                    | Test
                    | Inc
                    | Dec
                    | Neg
                    | Not
                    | Shl
                    | Shr
                    | Sar
                    | Rol
                    | Ror
                    | Rcl
                    | Rcr
                    | ShlOne
                    | ShrOne
                    | SarOne
                    | Bt
                    | Bts
                    | Btr
                    | Btc
                    | Shld
                    | Shrd
                    | Xadd
            )
        {
            return false;
        }
        match self.op {
            Imul2 | Bt | Bts | Btr | Btc | Bsf | Bsr | Shld | Shrd | Cmovcc => w != 8,
            Bswap => w >= 32,
            Setcc => w == 8,
            Movzx8 | Movsx8 | Imul3 => w >= 16,
            Movzx16 | Movsx16 => w >= 32,
            Movsxd | Cmc | Clc | Stc | Cmpxchg8b => w == 64,
            _ => true,
        }
    }
}

/// Inputs of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Case {
    /// Initial rax.
    pub a: u64,
    /// Initial rbx.
    pub b: u64,
    /// Initial rcx and rdx.
    pub c: u64,
    /// Initial arithmetic flags (only [`ARITH_FLAGS`] bits are used).
    pub flags_in: u64,
}

/// Outputs of one case, as the guest stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaseResult {
    /// Final rax.
    pub rax: u64,
    /// Final rbx.
    pub rbx: u64,
    /// Final rdx.
    pub rdx: u64,
    /// Final RFLAGS masked with [`flags_mask`].
    pub flags: u64,
    /// 0, or `0x100 | vector | instruction_length << 16` when the instruction faulted.
    pub exc: u64,
}

impl CaseResult {
    /// Decodes a record read from guest memory.
    pub fn from_bytes(b: &[u8]) -> Self {
        let q = |i: usize| {
            let mut w = [0u8; 8];
            if let Some(s) = b.get(i * 8..i * 8 + 8) {
                w.copy_from_slice(s);
            }
            u64::from_le_bytes(w)
        };
        Self {
            rax: q(0),
            rbx: q(1),
            rdx: q(2),
            flags: q(3),
            exc: q(4),
        }
    }

    fn words(&self) -> [u64; 5] {
        [self.rax, self.rbx, self.rdx, self.flags, self.exc]
    }
}

fn wmask(w: u32) -> u64 {
    if w >= 64 { u64::MAX } else { (1u64 << w) - 1 }
}

fn sign(w: u32) -> u64 {
    1u64 << (w - 1)
}

fn sext(v: u64, w: u32) -> i64 {
    let s = 64 - w;
    ((v << s) as i64) >> s
}

/// Writes `val` to a register of width `w` the way x86-64 does: 8/16-bit writes keep the
/// upper bits, 32-bit writes zero-extend, 64-bit writes replace.
fn wr(old: u64, val: u64, w: u32) -> u64 {
    match w {
        32 => val & 0xffff_ffff,
        64 => val,
        _ => (old & !wmask(w)) | (val & wmask(w)),
    }
}

fn set(flags: &mut u64, bit: u64, on: bool) {
    if on {
        *flags |= bit;
    } else {
        *flags &= !bit;
    }
}

fn szp(flags: &mut u64, r: u64, w: u32) {
    let r = r & wmask(w);
    set(flags, ZF, r == 0);
    set(flags, SF, r & sign(w) != 0);
    set(flags, PF, (r as u8).count_ones().is_multiple_of(2));
}

fn add_flags(flags: &mut u64, a: u64, b: u64, cin: u64, w: u32) -> u64 {
    let m = wmask(w);
    let (a, b) = (a & m, b & m);
    let full = u128::from(a) + u128::from(b) + u128::from(cin);
    let r = (full as u64) & m;
    set(flags, CF, full > u128::from(m));
    set(flags, OF, (a ^ r) & (b ^ r) & sign(w) != 0);
    set(flags, AF, (a ^ b ^ r) & 0x10 != 0);
    szp(flags, r, w);
    r
}

fn sub_flags(flags: &mut u64, a: u64, b: u64, cin: u64, w: u32) -> u64 {
    let m = wmask(w);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(cin) & m;
    set(flags, CF, u128::from(a) < u128::from(b) + u128::from(cin));
    set(flags, OF, (a ^ b) & (a ^ r) & sign(w) != 0);
    set(flags, AF, (a ^ b ^ r) & 0x10 != 0);
    szp(flags, r, w);
    r
}

fn logic_flags(flags: &mut u64, r: u64, w: u32) {
    set(flags, CF, false);
    set(flags, OF, false);
    szp(flags, r, w);
}

fn count_mask(w: u32) -> u64 {
    if w == 64 { 63 } else { 31 }
}

/// Evaluates condition code `cc` (0-15, in `jcc` order) on `f`.
pub fn condition(cc: u32, f: u64) -> bool {
    let (c, z, s, o, p) = (
        f & CF != 0,
        f & ZF != 0,
        f & SF != 0,
        f & OF != 0,
        f & PF != 0,
    );
    let r = match cc >> 1 {
        0 => o,
        1 => c,
        2 => z,
        3 => c || z,
        4 => s,
        5 => p,
        6 => s != o,
        _ => z || s != o,
    };
    r ^ (cc & 1 == 1)
}

/// The flags the architecture defines for this case (others are masked in the guest).
pub fn flags_mask(spec: OpSpec, case: &Case) -> u64 {
    use Op::*;
    let w = spec.width;
    let cm = case.c & count_mask(w);
    match spec.op {
        Add | Adc | Sub | Sbb | Cmp | Neg | Xadd | Cmpxchg | Inc | Dec => ARITH_FLAGS,
        And | Or | Xor | Test => ARITH_FLAGS & !AF,
        Not | Bswap | Cwd | Setcc | Cmovcc => ARITH_FLAGS,
        Movzx8 | Movsx8 | Movzx16 | Movsx16 | Movsxd | Xchg => ARITH_FLAGS,
        Cmc | Clc | Stc | Cmpxchg8b => ARITH_FLAGS,
        Imul3 => CF | OF,
        Shl | Shr | Sar => {
            if cm == 0 {
                ARITH_FLAGS
            } else {
                let mut m = ARITH_FLAGS & !AF;
                if cm != 1 {
                    m &= !OF;
                }
                if spec.op != Sar && cm >= u64::from(w) {
                    m &= !CF;
                }
                m
            }
        }
        ShlOne | ShrOne | SarOne => ARITH_FLAGS & !AF,
        Rol | Ror | Rcl | Rcr => {
            if cm == 0 || cm == 1 {
                ARITH_FLAGS
            } else {
                ARITH_FLAGS & !OF
            }
        }
        Shld | Shrd => {
            if cm == 0 {
                ARITH_FLAGS
            } else if cm == 1 {
                ARITH_FLAGS & !AF
            } else {
                ARITH_FLAGS & !AF & !OF
            }
        }
        Mul | Imul1 | Imul2 => CF | OF,
        Div | Idiv => 0,
        Bt | Bts | Btr | Btc => CF,
        Bsf | Bsr => ZF,
    }
}

/// Keeps a case inside what the architecture defines, so tcg, kvm and the model must agree:
/// * arithmetic flags only in `flags_in`;
/// * memory-form `bt*` offsets stay inside the operand;
/// * 16-bit `shld`/`shrd` counts above 16 are undefined: the count is reduced to 0..=16;
/// * 32-bit `cmpxchg` and `bsf`/`bsr` with a zero source differ between CPUs in whether the
///   untouched register's upper half is cleared: those registers get zero upper halves.
pub fn normalize(spec: OpSpec, mut case: Case) -> Case {
    case.flags_in &= ARITH_FLAGS;
    // A memory `bt*` with a register offset addresses memory beyond the operand; keep the
    // offset inside it.
    if spec.mem && matches!(spec.op, Op::Bt | Op::Bts | Op::Btr | Op::Btc) {
        case.b &= u64::from(spec.width - 1);
    }
    match (spec.op, spec.width) {
        (Op::Shld | Op::Shrd, 16) if case.c & 31 > 16 => {
            case.c = (case.c & !31) | ((case.c & 31) % 17);
        }
        (Op::Cmpxchg, 32) => {
            case.a &= 0xffff_ffff;
            case.c &= 0xffff_ffff;
        }
        (Op::Bsf | Op::Bsr, 32) => {
            case.a &= 0xffff_ffff;
        }
        _ => {}
    }
    case
}

/// Encoded length of the `div`/`idiv` the guest uses (for the exception mark).
fn div_len(w: u32) -> u64 {
    match w {
        8 | 32 => 2,
        _ => 3,
    }
}

const CMOV_SRC: u64 = 0x0123_4567_89ab_cd00;

/// The immediate of [`Op::Imul3`] at width `w`.
fn imul3_imm(w: u32) -> i64 {
    if w == 16 { -3 } else { 0x12345 }
}

/// What a correct x86-64 CPU leaves in the result record for this case.
pub fn model(spec: OpSpec, case: &Case) -> CaseResult {
    use Op::*;
    let case = normalize(spec, *case);
    let w = spec.width;
    let m = wmask(w);
    let (a, b, c) = (case.a, case.b, case.c);
    let fin = case.flags_in & ARITH_FLAGS;
    let mut f = fin;
    let cin = fin & CF;
    let (mut o_a, mut o_b, mut o_d) = (a, b, c);
    let mut exc = 0;
    let cm = c & count_mask(w);
    // A 32-bit shift, rotate or double shift by a masked count of 0 still writes its
    // destination, which zero-extends it (QEMU and hardware agree).
    if w == 32
        && cm == 0
        && matches!(
            spec.op,
            Shl | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
        )
    {
        o_a = a & 0xffff_ffff;
    }
    match spec.op {
        Add => o_a = wr(a, add_flags(&mut f, a, b, 0, w), w),
        Adc => o_a = wr(a, add_flags(&mut f, a, b, cin, w), w),
        Sub => o_a = wr(a, sub_flags(&mut f, a, b, 0, w), w),
        Sbb => o_a = wr(a, sub_flags(&mut f, a, b, cin, w), w),
        Cmp => {
            sub_flags(&mut f, a, b, 0, w);
        }
        And | Or | Xor | Test => {
            let r = match spec.op {
                And | Test => a & b,
                Or => a | b,
                _ => a ^ b,
            } & m;
            logic_flags(&mut f, r, w);
            if spec.op != Test {
                o_a = wr(a, r, w);
            }
        }
        Inc | Dec => {
            let r = if spec.op == Inc {
                add_flags(&mut f, a, 1, 0, w)
            } else {
                sub_flags(&mut f, a, 1, 0, w)
            };
            set(&mut f, CF, cin != 0);
            o_a = wr(a, r, w);
        }
        Neg => {
            let r = sub_flags(&mut f, 0, a, 0, w);
            set(&mut f, CF, a & m != 0);
            o_a = wr(a, r, w);
        }
        Not => o_a = wr(a, !a, w),
        Shl | Shr | Sar | ShlOne | ShrOne | SarOne => {
            let (kind, n) = match spec.op {
                Shl => (0, cm),
                Shr => (1, cm),
                Sar => (2, cm),
                ShlOne => (0, 1),
                ShrOne => (1, 1),
                _ => (2, 1),
            };
            if n != 0 {
                let v = a & m;
                let wb = u64::from(w);
                let (r, cf) = match kind {
                    0 => {
                        let r = if n >= wb { 0 } else { (v << n) & m };
                        let cf = n <= wb && (v >> (wb - n)) & 1 != 0;
                        (r, cf)
                    }
                    1 => {
                        let r = if n >= wb { 0 } else { v >> n };
                        let cf = n <= wb && (v >> (n - 1)) & 1 != 0;
                        (r, cf)
                    }
                    _ => {
                        let s = sext(v, w);
                        let r = (s >> n.min(wb - 1)) as u64 & m;
                        let cf = (s >> (n - 1).min(wb - 1)) & 1 != 0;
                        (r, cf)
                    }
                };
                set(&mut f, CF, cf);
                szp(&mut f, r, w);
                let of = match kind {
                    0 => (r & sign(w) != 0) != cf,
                    1 => v & sign(w) != 0,
                    _ => false,
                };
                set(&mut f, OF, of);
                o_a = wr(a, r, w);
            }
        }
        Rol | Ror => {
            if cm != 0 {
                let v = a & m;
                let n = (cm % u64::from(w)) as u32;
                let r = if n == 0 {
                    v
                } else if spec.op == Rol {
                    ((v << n) | (v >> (w - n))) & m
                } else {
                    ((v >> n) | (v << (w - n))) & m
                };
                if spec.op == Rol {
                    let cf = r & 1 != 0;
                    set(&mut f, CF, cf);
                    set(&mut f, OF, (r & sign(w) != 0) != cf);
                } else {
                    set(&mut f, CF, r & sign(w) != 0);
                    set(&mut f, OF, ((r >> (w - 1)) ^ (r >> (w - 2))) & 1 != 0);
                }
                o_a = wr(a, r, w);
            }
        }
        Rcl | Rcr => {
            if cm != 0 {
                let n = match w {
                    8 => cm % 9,
                    16 => cm % 17,
                    _ => cm,
                };
                let mut v = a & m;
                let mut cf = cin != 0;
                if spec.op == Rcr {
                    set(&mut f, OF, (v & sign(w) != 0) != cf);
                }
                for _ in 0..n {
                    if spec.op == Rcl {
                        let out = v & sign(w) != 0;
                        v = ((v << 1) | u64::from(cf)) & m;
                        cf = out;
                    } else {
                        let out = v & 1 != 0;
                        v = (v >> 1) | if cf { sign(w) } else { 0 };
                        cf = out;
                    }
                }
                set(&mut f, CF, cf);
                if spec.op == Rcl {
                    set(&mut f, OF, (v & sign(w) != 0) != cf);
                }
                o_a = wr(a, v, w);
            }
        }
        Mul | Imul1 => {
            let (lo, hi, over) = if spec.op == Mul {
                let p = u128::from(a & m) * u128::from(b & m);
                let lo = (p as u64) & m;
                let hi = ((p >> w) as u64) & m;
                (lo, hi, hi != 0)
            } else {
                let p = i128::from(sext(a, w)) * i128::from(sext(b, w));
                let lo = (p as u64) & m;
                let hi = ((p >> w) as u64) & m;
                (lo, hi, i128::from(sext(lo, w)) != p)
            };
            set(&mut f, CF, over);
            set(&mut f, OF, over);
            if w == 8 {
                o_a = wr(a, lo | (hi << 8), 16);
            } else {
                o_a = wr(a, lo, w);
                o_d = wr(c, hi, w);
            }
        }
        Imul2 => {
            let p = i128::from(sext(a, w)) * i128::from(sext(b, w));
            let lo = (p as u64) & m;
            let over = i128::from(sext(lo, w)) != p;
            set(&mut f, CF, over);
            set(&mut f, OF, over);
            o_a = wr(a, lo, w);
        }
        Div | Idiv => {
            let (dividend_lo, dividend_hi) = if w == 8 {
                (a & 0xff, (a >> 8) & 0xff)
            } else {
                (a & m, c & m)
            };
            let divisor = b & m;
            let res: Option<(u64, u64)> = if spec.op == Div {
                let n = (u128::from(dividend_hi) << w) | u128::from(dividend_lo);
                if divisor == 0 {
                    None
                } else {
                    let q = n / u128::from(divisor);
                    let r = n % u128::from(divisor);
                    (q <= u128::from(m)).then_some((q as u64, r as u64))
                }
            } else {
                let n = ((u128::from(dividend_hi) << w) | u128::from(dividend_lo)) as i128;
                let n = (n << (128 - 2 * w)) >> (128 - 2 * w);
                let d = i128::from(sext(divisor, w));
                match (n.checked_div(d), n.checked_rem(d)) {
                    (Some(q), Some(r)) => {
                        let lim = 1i128 << (w - 1);
                        (q >= -lim && q < lim).then_some(((q as u64) & m, (r as u64) & m))
                    }
                    _ => None,
                }
            };
            match res {
                None => exc = 0x100 | (div_len(w) << 16),
                Some((q, r)) => {
                    if w == 8 {
                        o_a = wr(a, q | (r << 8), 16);
                    } else {
                        o_a = wr(a, q, w);
                        o_d = wr(c, r, w);
                    }
                }
            }
        }
        Bt | Bts | Btr | Btc => {
            let bit = b & u64::from(w - 1);
            set(&mut f, CF, (a >> bit) & 1 != 0);
            let r = match spec.op {
                Bts => a | (1 << bit),
                Btr => a & !(1 << bit),
                Btc => a ^ (1 << bit),
                _ => a,
            };
            if spec.op != Bt {
                o_a = wr(a, r, w);
            }
        }
        Bsf | Bsr => {
            let src = b & m;
            set(&mut f, ZF, src == 0);
            if src != 0 {
                let idx = if spec.op == Bsf {
                    src.trailing_zeros()
                } else {
                    63 - src.leading_zeros()
                };
                o_a = wr(a, u64::from(idx), w);
            }
        }
        Shld | Shrd => {
            if cm != 0 {
                let (v, s) = (a & m, b & m);
                let n = cm as u32;
                let r = if spec.op == Shld {
                    ((v << n) | s.checked_shr(w - n).unwrap_or(0)) & m
                } else {
                    (v.checked_shr(n).unwrap_or(0) | (s << (w - n))) & m
                };
                let cf = if spec.op == Shld {
                    (v >> (w - n)) & 1 != 0
                } else {
                    (v >> (n - 1)) & 1 != 0
                };
                set(&mut f, CF, cf);
                szp(&mut f, r, w);
                set(&mut f, OF, (r ^ v) & sign(w) != 0);
                o_a = wr(a, r, w);
            }
        }
        Cmpxchg => {
            sub_flags(&mut f, a, c, 0, w);
            if (a ^ c) & m == 0 {
                o_d = wr(c, b, w);
            } else {
                o_a = wr(a, c, w);
            }
        }
        Xadd => {
            let r = add_flags(&mut f, a, b, 0, w);
            o_b = wr(b, a, w);
            o_a = wr(a, r, w);
        }
        Bswap => {
            o_a = if w == 32 {
                u64::from((a as u32).swap_bytes())
            } else {
                a.swap_bytes()
            };
        }
        Setcc => {
            let mut bytes = [0u8; 16];
            for (cc, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from(condition(cc as u32, fin));
            }
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo.copy_from_slice(&bytes[..8]);
            hi.copy_from_slice(&bytes[8..]);
            o_b = u64::from_le_bytes(lo);
            o_d = u64::from_le_bytes(hi);
        }
        Cmovcc => {
            let mut fold = 0u64;
            for cc in 0..16u32 {
                let src = CMOV_SRC | u64::from(cc);
                let dst = u64::MAX;
                let r = match (w, condition(cc, fin)) {
                    (32, true) => src & 0xffff_ffff,
                    (32, false) => dst & 0xffff_ffff,
                    (_, true) => wr(dst, src, w),
                    (_, false) => dst,
                };
                fold = fold.rotate_left(5) ^ r;
            }
            o_b = fold;
        }
        Cwd => match w {
            8 => o_a = wr(a, sext(a, 8) as u64, 16),
            _ => {
                let s = if a & sign(w) != 0 { m } else { 0 };
                o_d = wr(c, s, w);
            }
        },
        Movzx8 => o_a = wr(a, b & 0xff, w),
        Movsx8 => o_a = wr(a, sext(b, 8) as u64, w),
        Movzx16 => o_a = wr(a, b & 0xffff, w),
        Movsx16 => o_a = wr(a, sext(b, 16) as u64, w),
        Movsxd => o_a = sext(b, 32) as u64,
        Xchg => {
            o_a = wr(a, b, w);
            o_b = wr(b, a, w);
        }
        Imul3 => {
            let p = i128::from(sext(b, w)) * i128::from(imul3_imm(w));
            let lo = (p as u64) & m;
            let over = i128::from(sext(lo, w)) != p;
            set(&mut f, CF, over);
            set(&mut f, OF, over);
            o_a = wr(a, lo, w);
        }
        Cmc => set(&mut f, CF, cin == 0),
        Clc => set(&mut f, CF, false),
        Stc => set(&mut f, CF, true),
        Cmpxchg8b => {
            let mem = c;
            let edx_eax = a;
            set(&mut f, ZF, mem == edx_eax);
            if mem == edx_eax {
                o_b = b;
                o_a = a & 0xffff_ffff;
                o_d = a >> 32;
            } else {
                o_b = mem;
                o_a = mem & 0xffff_ffff;
                o_d = mem >> 32;
            }
        }
    }
    if spec.mem {
        // A memory destination is written (or not) at its width only: no zero-extension.
        o_a = (a & !m) | (o_a & m);
    }
    CaseResult {
        rax: o_a,
        rbx: o_b,
        rdx: o_d,
        flags: if exc != 0 {
            0
        } else {
            f & flags_mask(spec, &case)
        },
        exc,
    }
}

/// Operand values worth testing at width `w`: zero, one, sign boundaries, all ones,
/// alternating bits and an irregular value; upper bits beyond `w` carry garbage so partial
/// register writes are checked.
pub fn edge_values(w: u32) -> Vec<u64> {
    let m = wmask(w);
    let s = sign(w);
    let garbage = 0xdead_beef_cafe_f00d & !m;
    [
        0,
        1,
        2,
        s - 1,
        s,
        s + 1,
        m - 1,
        m,
        0x5555_5555_5555_5555 & m,
        0xaaaa_aaaa_aaaa_aaaa & m,
        0x1234_5678_9abc_def1 & m,
        0x0000_0000_0000_0010 & m,
    ]
    .iter()
    .map(|v| garbage | v)
    .collect()
}

/// Deterministic edge cases for one spec.
pub fn edge_cases(spec: OpSpec) -> Vec<Case> {
    use Op::*;
    let w = spec.width;
    let vals = edge_values(w);
    let mut out = Vec::new();
    let flag_sets = [0u64, ARITH_FLAGS, CF, ZF | SF | PF];
    match spec.op {
        Shl | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd => {
            let counts = [0u64, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 255];
            for (i, a) in vals.iter().enumerate().step_by(2) {
                for (j, c) in counts.iter().enumerate() {
                    let b = vals[(i + j + 3) % vals.len()];
                    out.push(Case {
                        a: *a,
                        b,
                        c: *c | 0x1200,
                        flags_in: flag_sets[(i + j) % 4],
                    });
                }
            }
        }
        Div | Idiv => {
            let highs = [0u64, 1, sign(w) >> 1, wmask(w)];
            for (i, a) in vals.iter().enumerate() {
                for (j, b) in vals.iter().enumerate().step_by(2) {
                    out.push(Case {
                        a: *a,
                        b: *b,
                        c: highs[(i + j) % 4],
                        flags_in: flag_sets[(i * 3 + j) % 4],
                    });
                }
            }
        }
        Setcc | Cmovcc => {
            for f in 0..64u64 {
                // Spread 6 bits over CF, PF, AF, ZF, SF, OF.
                let bits = [CF, PF, AF, ZF, SF, OF];
                let flags = bits
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| f & (1 << i) != 0)
                    .fold(0, |acc, (_, b)| acc | b);
                out.push(Case {
                    a: vals[f as usize % vals.len()],
                    b: 0,
                    c: 0,
                    flags_in: flags,
                });
            }
        }
        _ => {
            for (i, a) in vals.iter().enumerate() {
                for (j, b) in vals.iter().enumerate() {
                    if (i + j) % 2 == 1 && !matches!(spec.op, Adc | Sbb | Cmpxchg | Cmpxchg8b) {
                        continue;
                    }
                    let c = if matches!(spec.op, Cmpxchg | Cmpxchg8b) && j % 3 == 0 {
                        *a
                    } else {
                        vals[(i + 2 * j + 1) % vals.len()]
                    };
                    out.push(Case {
                        a: *a,
                        b: *b,
                        c,
                        flags_in: flag_sets[(i + j) % 4],
                    });
                }
            }
        }
    }
    out.into_iter().map(|c| normalize(spec, c)).collect()
}

macro_rules! by_width {
    ($w:expr, |$ra:ident, $rb:ident, $rc:ident, $rd:ident| $body:expr) => {
        match $w {
            8 => {
                let ($ra, $rb, $rc, $rd) = (al, bl, cl, dl);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
            16 => {
                let ($ra, $rb, $rc, $rd) = (ax, bx, cx, dx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
            32 => {
                let ($ra, $rb, $rc, $rd) = (eax, ebx, ecx, edx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
            _ => {
                let ($ra, $rb, $rc, $rd) = (rax, rbx, rcx, rdx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
        }
    };
}

macro_rules! by_width_nonbyte {
    ($w:expr, |$ra:ident, $rb:ident, $rc:ident, $rd:ident| $body:expr) => {
        match $w {
            16 => {
                let ($ra, $rb, $rc, $rd) = (ax, bx, cx, dx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
            32 => {
                let ($ra, $rb, $rc, $rd) = (eax, ebx, ecx, edx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
            _ => {
                let ($ra, $rb, $rc, $rd) = (rax, rbx, rcx, rdx);
                let _ = ($ra, $rb, $rc, $rd);
                $body
            }
        }
    };
}

fn setcc(a: &mut CodeAssembler, cc: u32, dst: AsmMemoryOperand) -> R {
    match cc {
        0 => a.seto(dst),
        1 => a.setno(dst),
        2 => a.setb(dst),
        3 => a.setae(dst),
        4 => a.sete(dst),
        5 => a.setne(dst),
        6 => a.setbe(dst),
        7 => a.seta(dst),
        8 => a.sets(dst),
        9 => a.setns(dst),
        10 => a.setp(dst),
        11 => a.setnp(dst),
        12 => a.setl(dst),
        13 => a.setge(dst),
        14 => a.setle(dst),
        _ => a.setg(dst),
    }
}

macro_rules! cmov_cc {
    ($a:expr, $cc:expr, $d:expr, $s:expr) => {
        match $cc {
            0 => $a.cmovo($d, $s),
            1 => $a.cmovno($d, $s),
            2 => $a.cmovb($d, $s),
            3 => $a.cmovae($d, $s),
            4 => $a.cmove($d, $s),
            5 => $a.cmovne($d, $s),
            6 => $a.cmovbe($d, $s),
            7 => $a.cmova($d, $s),
            8 => $a.cmovs($d, $s),
            9 => $a.cmovns($d, $s),
            10 => $a.cmovp($d, $s),
            11 => $a.cmovnp($d, $s),
            12 => $a.cmovl($d, $s),
            13 => $a.cmovge($d, $s),
            14 => $a.cmovle($d, $s),
            _ => $a.cmovg($d, $s),
        }
    };
}

macro_rules! by_width_mem {
    ($w:expr, |$m:ident, $rb:ident| $body:expr) => {
        match $w {
            8 => {
                let ($m, $rb) = (byte_ptr(layout::MEMOP), bl);
                let _ = $rb;
                $body
            }
            16 => {
                let ($m, $rb) = (word_ptr(layout::MEMOP), bx);
                let _ = $rb;
                $body
            }
            32 => {
                let ($m, $rb) = (dword_ptr(layout::MEMOP), ebx);
                let _ = $rb;
                $body
            }
            _ => {
                let ($m, $rb) = (qword_ptr(layout::MEMOP), rbx);
                let _ = $rb;
                $body
            }
        }
    };
}

macro_rules! by_width_mem_nb {
    ($w:expr, |$m:ident, $rb:ident| $body:expr) => {
        match $w {
            16 => {
                let ($m, $rb) = (word_ptr(layout::MEMOP), bx);
                $body
            }
            32 => {
                let ($m, $rb) = (dword_ptr(layout::MEMOP), ebx);
                $body
            }
            _ => {
                let ($m, $rb) = (qword_ptr(layout::MEMOP), rbx);
                $body
            }
        }
    };
}

/// Emits the memory-destination form (see [`OpSpec::mem`]).
fn emit_op_mem(a: &mut CodeAssembler, spec: OpSpec) -> R {
    use Op::*;
    let w = spec.width;
    match spec.op {
        Add => by_width_mem!(w, |m, y| a.add(m, y)),
        Adc => by_width_mem!(w, |m, y| a.adc(m, y)),
        Sub => by_width_mem!(w, |m, y| a.sub(m, y)),
        Sbb => by_width_mem!(w, |m, y| a.sbb(m, y)),
        And => by_width_mem!(w, |m, y| a.and(m, y)),
        Or => by_width_mem!(w, |m, y| a.or(m, y)),
        Xor => by_width_mem!(w, |m, y| a.xor(m, y)),
        Cmp => by_width_mem!(w, |m, y| a.cmp(m, y)),
        Test => by_width_mem!(w, |m, y| a.test(m, y)),
        Inc => by_width_mem!(w, |m, y| a.inc(m)),
        Dec => by_width_mem!(w, |m, y| a.dec(m)),
        Neg => by_width_mem!(w, |m, y| a.neg(m)),
        Not => by_width_mem!(w, |m, y| a.not(m)),
        Shl => by_width_mem!(w, |m, y| a.shl(m, cl)),
        Shr => by_width_mem!(w, |m, y| a.shr(m, cl)),
        Sar => by_width_mem!(w, |m, y| a.sar(m, cl)),
        Rol => by_width_mem!(w, |m, y| a.rol(m, cl)),
        Ror => by_width_mem!(w, |m, y| a.ror(m, cl)),
        Rcl => by_width_mem!(w, |m, y| a.rcl(m, cl)),
        Rcr => by_width_mem!(w, |m, y| a.rcr(m, cl)),
        ShlOne => by_width_mem!(w, |m, y| a.shl(m, 1)),
        ShrOne => by_width_mem!(w, |m, y| a.shr(m, 1)),
        SarOne => by_width_mem!(w, |m, y| a.sar(m, 1)),
        Bt => by_width_mem_nb!(w, |m, y| a.bt(m, y)),
        Bts => by_width_mem_nb!(w, |m, y| a.bts(m, y)),
        Btr => by_width_mem_nb!(w, |m, y| a.btr(m, y)),
        Btc => by_width_mem_nb!(w, |m, y| a.btc(m, y)),
        Shld => by_width_mem_nb!(w, |m, y| a.shld(m, y, cl)),
        Shrd => by_width_mem_nb!(w, |m, y| a.shrd(m, y, cl)),
        Xadd => by_width_mem!(w, |m, y| a.xadd(m, y)),
        // Not valid in memory form (`OpSpec::is_valid`).
        _ => Ok(()),
    }
}

/// Emits the instruction under test (between the flags load and the flags capture).
fn emit_op(a: &mut CodeAssembler, spec: OpSpec) -> R {
    if spec.mem {
        return emit_op_mem(a, spec);
    }
    use Op::*;
    let w = spec.width;
    match spec.op {
        Add => by_width!(w, |x, y, c, d| a.add(x, y)),
        Adc => by_width!(w, |x, y, c, d| a.adc(x, y)),
        Sub => by_width!(w, |x, y, c, d| a.sub(x, y)),
        Sbb => by_width!(w, |x, y, c, d| a.sbb(x, y)),
        And => by_width!(w, |x, y, c, d| a.and(x, y)),
        Or => by_width!(w, |x, y, c, d| a.or(x, y)),
        Xor => by_width!(w, |x, y, c, d| a.xor(x, y)),
        Cmp => by_width!(w, |x, y, c, d| a.cmp(x, y)),
        Test => by_width!(w, |x, y, c, d| a.test(x, y)),
        Inc => by_width!(w, |x, y, c, d| a.inc(x)),
        Dec => by_width!(w, |x, y, c, d| a.dec(x)),
        Neg => by_width!(w, |x, y, c, d| a.neg(x)),
        Not => by_width!(w, |x, y, c, d| a.not(x)),
        Shl => by_width!(w, |x, y, c, d| a.shl(x, cl)),
        Shr => by_width!(w, |x, y, c, d| a.shr(x, cl)),
        Sar => by_width!(w, |x, y, c, d| a.sar(x, cl)),
        Rol => by_width!(w, |x, y, c, d| a.rol(x, cl)),
        Ror => by_width!(w, |x, y, c, d| a.ror(x, cl)),
        Rcl => by_width!(w, |x, y, c, d| a.rcl(x, cl)),
        Rcr => by_width!(w, |x, y, c, d| a.rcr(x, cl)),
        ShlOne => by_width!(w, |x, y, c, d| a.shl(x, 1)),
        ShrOne => by_width!(w, |x, y, c, d| a.shr(x, 1)),
        SarOne => by_width!(w, |x, y, c, d| a.sar(x, 1)),
        Mul => by_width!(w, |x, y, c, d| a.mul(y)),
        Imul1 => by_width!(w, |x, y, c, d| a.imul(y)),
        Imul2 => by_width_nonbyte!(w, |x, y, c, d| a.imul_2(x, y)),
        Div | Idiv => {
            let mut after = a.create_label();
            a.lea(r10, ptr(after))?;
            a.mov(qword_ptr(layout::RESUME), r10)?;
            if spec.op == Div {
                by_width!(w, |x, y, c, d| a.div(y))?;
            } else {
                by_width!(w, |x, y, c, d| a.idiv(y))?;
            }
            a.set_label(&mut after)?;
            a.mov(qword_ptr(layout::RESUME), 0)
        }
        Bt => by_width_nonbyte!(w, |x, y, c, d| a.bt(x, y)),
        Bts => by_width_nonbyte!(w, |x, y, c, d| a.bts(x, y)),
        Btr => by_width_nonbyte!(w, |x, y, c, d| a.btr(x, y)),
        Btc => by_width_nonbyte!(w, |x, y, c, d| a.btc(x, y)),
        Bsf => by_width_nonbyte!(w, |x, y, c, d| a.bsf(x, y)),
        Bsr => by_width_nonbyte!(w, |x, y, c, d| a.bsr(x, y)),
        Shld => by_width_nonbyte!(w, |x, y, c, d| a.shld(x, y, cl)),
        Shrd => by_width_nonbyte!(w, |x, y, c, d| a.shrd(x, y, cl)),
        Cmpxchg => by_width!(w, |x, y, c, d| a.cmpxchg(d, y)),
        Xadd => by_width!(w, |x, y, c, d| a.xadd(x, y)),
        Bswap => {
            if w == 32 {
                a.bswap(eax)
            } else {
                a.bswap(rax)
            }
        }
        Cwd => match w {
            8 => a.cbw(),
            16 => a.cwd(),
            32 => a.cdq(),
            _ => a.cqo(),
        },
        Movzx8 => match w {
            16 => a.movzx(ax, bl),
            32 => a.movzx(eax, bl),
            _ => a.movzx(rax, bl),
        },
        Movsx8 => match w {
            16 => a.movsx(ax, bl),
            32 => a.movsx(eax, bl),
            _ => a.movsx(rax, bl),
        },
        Movzx16 => match w {
            32 => a.movzx(eax, bx),
            _ => a.movzx(rax, bx),
        },
        Movsx16 => match w {
            32 => a.movsx(eax, bx),
            _ => a.movsx(rax, bx),
        },
        Movsxd => a.movsxd(rax, ebx),
        Xchg => by_width!(w, |x, y, c, d| a.xchg(x, y)),
        Imul3 => match w {
            16 => a.imul_3(ax, bx, imul3_imm(16) as i32),
            32 => a.imul_3(eax, ebx, imul3_imm(32) as i32),
            _ => a.imul_3(rax, rbx, imul3_imm(64) as i32),
        },
        Cmc => a.cmc(),
        Clc => a.clc(),
        Stc => a.stc(),
        Cmpxchg8b => a.cmpxchg8b(qword_ptr(layout::SCRATCH)),
        Setcc => {
            for cc in 0..16u32 {
                setcc(a, cc, byte_ptr(layout::SCRATCH + u64::from(cc)))?;
            }
            Ok(())
        }
        Cmovcc => {
            for cc in 0..16u32 {
                a.mov(r9, u64::MAX)?;
                a.mov(r10, CMOV_SRC | u64::from(cc))?;
                match w {
                    16 => cmov_cc!(a, cc, r9w, r10w)?,
                    32 => cmov_cc!(a, cc, r9d, r10d)?,
                    _ => cmov_cc!(a, cc, r9, r10)?,
                }
                a.mov(qword_ptr(layout::SCRATCH + 8 * u64::from(cc)), r9)?;
            }
            Ok(())
        }
    }
}

/// Emits what runs after the flags were captured (collecting scratch results).
fn emit_post(a: &mut CodeAssembler, spec: OpSpec) -> R {
    if spec.mem {
        a.mov(rax, qword_ptr(layout::MEMOP))?;
        return Ok(());
    }
    match spec.op {
        Op::Cmpxchg8b => {
            a.mov(rbx, qword_ptr(layout::SCRATCH))?;
        }
        Op::Setcc => {
            a.mov(rbx, qword_ptr(layout::SCRATCH))?;
            a.mov(rdx, qword_ptr(layout::SCRATCH + 8))?;
        }
        Op::Cmovcc => {
            a.xor(ebx, ebx)?;
            for cc in 0..16u64 {
                a.rol(rbx, 5)?;
                a.xor(rbx, qword_ptr(layout::SCRATCH + 8 * cc))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Serialises a case as the guest reads it (a, b, c, flags_in, flags mask, spare).
fn case_bytes(spec: OpSpec, case: &Case, out: &mut Vec<u8>) {
    for q in [
        case.a,
        case.b,
        case.c,
        (case.flags_in & ARITH_FLAGS) | 2,
        flags_mask(spec, case),
        0,
    ] {
        out.extend_from_slice(&q.to_le_bytes());
    }
}

/// Builds a guest that runs `cases` through each spec and prints one hash per spec.
/// Invalid specs (e.g. 8-bit `bsf`) are skipped.
pub fn ops_guest(name: &str, groups: &[(OpSpec, Vec<Case>)]) -> Result<TestGuest, GuestError> {
    let mut g = Guest::new(name, Mode::Long64).map_err(|source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    })?;
    let total = build_ops(&mut g, groups).map_err(|source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    })?;
    if total * RESULT_SIZE > layout::RESULTS_MAX {
        return Err(GuestError::TooBig {
            guest: name.to_string(),
            what: "results",
            size: total * RESULT_SIZE,
            max: layout::RESULTS_MAX,
        });
    }
    let mut t = g.finish()?;
    t.results = Some(ResultArea {
        addr: layout::RESULTS,
        count: total,
        record_size: RESULT_SIZE,
    });
    Ok(t)
}

/// What [`ops_guest`] leaves in its result area, in order, according to [`model`].
pub fn expected_results(groups: &[(OpSpec, Vec<Case>)]) -> Vec<CaseResult> {
    groups
        .iter()
        .filter(|(s, _)| s.is_valid())
        .flat_map(|(s, cases)| cases.iter().map(move |c| model(*s, &normalize(*s, *c))))
        .collect()
}

fn build_ops(g: &mut Guest, groups: &[(OpSpec, Vec<Case>)]) -> R<usize> {
    g.print(&format!("keel-testguest {}\n", g.name))?;
    let mut case_off = 0usize;
    let mut res_off = 0usize;
    for (spec, cases) in groups {
        if !spec.is_valid() || cases.is_empty() {
            continue;
        }
        let cases: Vec<Case> = cases.iter().map(|c| normalize(*spec, *c)).collect();
        let case_addr = layout::DATA + case_off as u64;
        let res_addr = layout::RESULTS + res_off as u64;
        for c in &cases {
            case_bytes(*spec, c, &mut g.data);
        }
        let a = &mut g.a;
        let mut lp = a.create_label();
        a.mov(rsi, case_addr)?;
        a.mov(rdi, res_addr)?;
        a.mov(r15, cases.len() as u64)?;
        a.set_label(&mut lp)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(rbx, qword_ptr(rsi + 8))?;
        a.mov(rcx, qword_ptr(rsi + 16))?;
        a.mov(rdx, qword_ptr(rsi + 16))?;
        a.mov(qword_ptr(layout::EXC_MARK), 0)?;
        if spec.mem {
            a.mov(qword_ptr(layout::MEMOP), rax)?;
        }
        if spec.op == Op::Cmpxchg8b {
            // memory = c, edx:eax = a, ecx:ebx = b.
            a.mov(qword_ptr(layout::SCRATCH), rcx)?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 32)?;
            a.mov(eax, eax)?;
            a.mov(rcx, rbx)?;
            a.shr(rcx, 32)?;
        }
        a.push(qword_ptr(rsi + 24))?;
        a.popfq()?;
        emit_op(a, *spec)?;
        a.pushfq()?;
        a.pop(r8)?;
        a.and(r8, qword_ptr(rsi + 32))?;
        emit_post(a, *spec)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.mov(qword_ptr(rdi + 8), rbx)?;
        a.mov(qword_ptr(rdi + 16), rdx)?;
        a.mov(r9, qword_ptr(layout::EXC_MARK))?;
        // A faulting instruction leaves flags undefined: report none.
        let mut no_fault = a.create_label();
        a.test(r9, r9)?;
        a.jz(no_fault)?;
        a.xor(r8d, r8d)?;
        a.set_label(&mut no_fault)?;
        a.mov(qword_ptr(rdi + 24), r8)?;
        a.mov(qword_ptr(rdi + 32), r9)?;
        a.add(rsi, CASE_SIZE as i32)?;
        a.add(rdi, RESULT_SIZE as i32)?;
        a.dec(r15)?;
        a.jnz(lp)?;
        let expected: Vec<u64> = cases.iter().flat_map(|c| model(*spec, c).words()).collect();
        let label = format!("{} ", spec.name());
        let words = (cases.len() * RESULT_SIZE / 8) as u64;
        g.print_hash(&label, res_addr, words, Some(hash_u64s(expected)))?;
        case_off += cases.len() * CASE_SIZE;
        res_off += cases.len() * RESULT_SIZE;
    }
    g.print("end\n")?;
    g.exit(crate::EXIT_OK)?;
    Ok(res_off / RESULT_SIZE)
}

/// The cases [`ops_guest32`] runs for a spec: 32-bit operands, no faulting divisions
/// (the 32-bit guests have no IDT), and no widths or ops 32-bit mode lacks.
pub fn cases32(spec: OpSpec, cases: &[Case]) -> Vec<Case> {
    if !spec.is_valid() || spec.width > 32 || spec.op == Op::Cmovcc || spec.mem {
        return Vec::new();
    }
    cases
        .iter()
        .map(|c| {
            normalize(
                spec,
                Case {
                    a: c.a & 0xffff_ffff,
                    b: c.b & 0xffff_ffff,
                    c: c.c & 0xffff_ffff,
                    flags_in: c.flags_in,
                },
            )
        })
        .filter(|c| model(spec, c).exc == 0)
        .collect()
}

/// Like [`ops_guest`], in 32-bit protected mode (the PVH entry mode, paging off): widths 8,
/// 16 and 32, records with zero upper halves, one 32-bit hash per spec. Cases are filtered
/// through [`cases32`].
pub fn ops_guest32(name: &str, groups: &[(OpSpec, Vec<Case>)]) -> Result<TestGuest, GuestError> {
    let err = |source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    };
    let mut g = Guest::new(name, Mode::Protected32).map_err(err)?;
    let total = build_ops32(&mut g, groups).map_err(err)?;
    if total * RESULT_SIZE > layout::RESULTS_MAX {
        return Err(GuestError::TooBig {
            guest: name.to_string(),
            what: "results",
            size: total * RESULT_SIZE,
            max: layout::RESULTS_MAX,
        });
    }
    let mut t = g.finish()?;
    t.results = Some(ResultArea {
        addr: layout::RESULTS,
        count: total,
        record_size: RESULT_SIZE,
    });
    Ok(t)
}

/// What [`ops_guest32`] leaves in its result area, according to [`model`].
pub fn expected_results32(groups: &[(OpSpec, Vec<Case>)]) -> Vec<CaseResult> {
    groups
        .iter()
        .flat_map(|(s, cases)| cases32(*s, cases).into_iter().map(move |c| model(*s, &c)))
        .collect()
}

fn emit_op32(a: &mut CodeAssembler, spec: OpSpec) -> R {
    use Op::*;
    let w = spec.width;
    macro_rules! w32 {
        (|$x:ident, $y:ident, $d:ident| $body:expr) => {
            match w {
                8 => {
                    let ($x, $y, $d) = (al, bl, dl);
                    let _ = ($x, $y, $d);
                    $body
                }
                16 => {
                    let ($x, $y, $d) = (ax, bx, dx);
                    let _ = ($x, $y, $d);
                    $body
                }
                _ => {
                    let ($x, $y, $d) = (eax, ebx, edx);
                    let _ = ($x, $y, $d);
                    $body
                }
            }
        };
    }
    macro_rules! w32nb {
        (|$x:ident, $y:ident| $body:expr) => {
            match w {
                16 => {
                    let ($x, $y) = (ax, bx);
                    $body
                }
                _ => {
                    let ($x, $y) = (eax, ebx);
                    $body
                }
            }
        };
    }
    match spec.op {
        Add => w32!(|x, y, d| a.add(x, y)),
        Adc => w32!(|x, y, d| a.adc(x, y)),
        Sub => w32!(|x, y, d| a.sub(x, y)),
        Sbb => w32!(|x, y, d| a.sbb(x, y)),
        And => w32!(|x, y, d| a.and(x, y)),
        Or => w32!(|x, y, d| a.or(x, y)),
        Xor => w32!(|x, y, d| a.xor(x, y)),
        Cmp => w32!(|x, y, d| a.cmp(x, y)),
        Test => w32!(|x, y, d| a.test(x, y)),
        Inc => w32!(|x, y, d| a.inc(x)),
        Dec => w32!(|x, y, d| a.dec(x)),
        Neg => w32!(|x, y, d| a.neg(x)),
        Not => w32!(|x, y, d| a.not(x)),
        Shl => w32!(|x, y, d| a.shl(x, cl)),
        Shr => w32!(|x, y, d| a.shr(x, cl)),
        Sar => w32!(|x, y, d| a.sar(x, cl)),
        Rol => w32!(|x, y, d| a.rol(x, cl)),
        Ror => w32!(|x, y, d| a.ror(x, cl)),
        Rcl => w32!(|x, y, d| a.rcl(x, cl)),
        Rcr => w32!(|x, y, d| a.rcr(x, cl)),
        ShlOne => w32!(|x, y, d| a.shl(x, 1)),
        ShrOne => w32!(|x, y, d| a.shr(x, 1)),
        SarOne => w32!(|x, y, d| a.sar(x, 1)),
        Mul => w32!(|x, y, d| a.mul(y)),
        Imul1 => w32!(|x, y, d| a.imul(y)),
        Imul2 => w32nb!(|x, y| a.imul_2(x, y)),
        Div => w32!(|x, y, d| a.div(y)),
        Idiv => w32!(|x, y, d| a.idiv(y)),
        Bt => w32nb!(|x, y| a.bt(x, y)),
        Bts => w32nb!(|x, y| a.bts(x, y)),
        Btr => w32nb!(|x, y| a.btr(x, y)),
        Btc => w32nb!(|x, y| a.btc(x, y)),
        Bsf => w32nb!(|x, y| a.bsf(x, y)),
        Bsr => w32nb!(|x, y| a.bsr(x, y)),
        Shld => w32nb!(|x, y| a.shld(x, y, cl)),
        Shrd => w32nb!(|x, y| a.shrd(x, y, cl)),
        Cmpxchg => w32!(|x, y, d| a.cmpxchg(d, y)),
        Xadd => w32!(|x, y, d| a.xadd(x, y)),
        Bswap => a.bswap(eax),
        Cwd => match w {
            8 => a.cbw(),
            16 => a.cwd(),
            _ => a.cdq(),
        },
        Movzx8 => match w {
            16 => a.movzx(ax, bl),
            _ => a.movzx(eax, bl),
        },
        Movsx8 => match w {
            16 => a.movsx(ax, bl),
            _ => a.movsx(eax, bl),
        },
        Movzx16 => a.movzx(eax, bx),
        Movsx16 => a.movsx(eax, bx),
        Xchg => w32!(|x, y, d| a.xchg(x, y)),
        Imul3 => match w {
            16 => a.imul_3(ax, bx, imul3_imm(16) as i32),
            _ => a.imul_3(eax, ebx, imul3_imm(32) as i32),
        },
        // Width 64 only: excluded by `cases32`.
        Movsxd | Cmc | Clc | Stc | Cmpxchg8b => Ok(()),
        Setcc => {
            for cc in 0..16u32 {
                setcc(a, cc, byte_ptr(layout::SCRATCH + u64::from(cc)))?;
            }
            Ok(())
        }
        // Excluded by `cases32`.
        Cmovcc => Ok(()),
    }
}

fn build_ops32(g: &mut Guest, groups: &[(OpSpec, Vec<Case>)]) -> R<usize> {
    g.print(&format!("keel-testguest {}\n", g.name))?;
    let mut case_off = 0usize;
    let mut res_off = 0usize;
    for (spec, cases) in groups {
        let cases = cases32(*spec, cases);
        if cases.is_empty() {
            continue;
        }
        let case_addr = (layout::DATA + case_off as u64) as u32;
        let res_addr = (layout::RESULTS + res_off as u64) as u32;
        for c in &cases {
            case_bytes(*spec, c, &mut g.data);
        }
        let scratch = layout::SCRATCH as u32;
        let a = &mut g.a;
        let mut lp = a.create_label();
        a.mov(esi, case_addr)?;
        a.mov(edi, res_addr)?;
        a.mov(ebp, cases.len() as u32)?;
        a.set_label(&mut lp)?;
        a.mov(eax, dword_ptr(esi))?;
        a.mov(ebx, dword_ptr(esi + 8))?;
        a.mov(ecx, dword_ptr(esi + 16))?;
        a.mov(edx, dword_ptr(esi + 16))?;
        a.push(dword_ptr(esi + 24))?;
        a.popfd()?;
        emit_op32(a, *spec)?;
        a.pushfd()?;
        a.pop(ecx)?;
        a.and(ecx, dword_ptr(esi + 32))?;
        a.mov(dword_ptr(edi), eax)?;
        a.mov(dword_ptr(edi + 4), 0)?;
        if spec.op == Op::Setcc {
            for i in 0..4u32 {
                a.mov(eax, dword_ptr(scratch + 4 * i))?;
                a.mov(dword_ptr(edi + 8 + 4 * i), eax)?;
            }
        } else {
            a.mov(dword_ptr(edi + 8), ebx)?;
            a.mov(dword_ptr(edi + 12), 0)?;
            a.mov(dword_ptr(edi + 16), edx)?;
            a.mov(dword_ptr(edi + 20), 0)?;
        }
        a.mov(dword_ptr(edi + 24), ecx)?;
        a.mov(dword_ptr(edi + 28), 0)?;
        a.mov(dword_ptr(edi + 32), 0)?;
        a.mov(dword_ptr(edi + 36), 0)?;
        a.add(esi, CASE_SIZE as i32)?;
        a.add(edi, RESULT_SIZE as i32)?;
        a.dec(ebp)?;
        a.jnz(lp)?;
        let expected = hash_u32s(cases.iter().flat_map(|c| {
            model(*spec, c)
                .words()
                .into_iter()
                .flat_map(|q| [q as u32, (q >> 32) as u32])
        }));
        let label = format!("{} ", spec.name());
        g.expect.push_str(&format!("{label}{expected:08x}\n"));
        g.emit_str(&label)?;
        let a = &mut g.a;
        a.mov(esi, res_addr)?;
        a.mov(ecx, (cases.len() * RESULT_SIZE / 4) as u32)?;
        a.call(g.hash)?;
        a.mov(ecx, 8)?;
        a.call(g.puthex)?;
        g.emit_str("\n")?;
        case_off += cases.len() * CASE_SIZE;
        res_off += cases.len() * RESULT_SIZE;
    }
    g.print("end\n")?;
    g.exit(crate::EXIT_OK)?;
    Ok(res_off / RESULT_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spot_checks_against_known_hardware_results() {
        let r = model(
            OpSpec::new(Op::Add, 8),
            &Case {
                a: 0x7f,
                b: 1,
                ..Case::default()
            },
        );
        assert_eq!(r.rax, 0x80);
        assert_eq!(r.flags, OF | SF | AF);
        let r = model(
            OpSpec::new(Op::Sub, 32),
            &Case {
                a: 0xffff_ffff_0000_0000,
                b: 1,
                ..Case::default()
            },
        );
        assert_eq!(r.rax, 0xffff_ffff, "32-bit writes zero-extend");
        assert_eq!(r.flags, CF | SF | AF | PF);
        let r = model(
            OpSpec::new(Op::Div, 8),
            &Case {
                a: 0x1234,
                b: 0,
                ..Case::default()
            },
        );
        assert_eq!(r.exc, 0x100 | (2 << 16));
        assert_eq!(r.rax, 0x1234);
        let r = model(
            OpSpec::new(Op::Idiv, 16),
            &Case {
                a: 0xfff9, // -7
                b: 2,
                c: 0xffff,
                ..Case::default()
            },
        );
        assert_eq!((r.rax & 0xffff, r.rdx & 0xffff), (0xfffd, 0xffff));
        let r = model(
            OpSpec::new(Op::Rcl, 8),
            &Case {
                a: 0x80,
                c: 1,
                flags_in: CF,
                ..Case::default()
            },
        );
        assert_eq!(r.rax, 0x01);
        assert_eq!(r.flags & (CF | OF), CF | OF);
        let r = model(
            OpSpec::new(Op::Bsr, 64),
            &Case {
                a: 7,
                b: 0x100,
                ..Case::default()
            },
        );
        assert_eq!((r.rax, r.flags), (8, 0));
        assert!(condition(12, SF) && !condition(12, SF | OF));
    }

    #[test]
    fn every_default_guest_assembles() {
        for g in crate::guests::all() {
            let g = g.unwrap();
            assert!(g.image.len() > 0x8000, "{}", g.name);
            // Only the string guest prints values the builder does not predict.
            assert_eq!(
                g.expected_serial.is_some(),
                g.name != "string",
                "{}",
                g.name
            );
        }
    }
}
