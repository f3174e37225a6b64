//! Multiply/divide, shifts and rotates, bit tests and scans, wide compare-exchange, BCD.

use iced_x86::{Mnemonic as M, OpKind};

use super::operands::{ea, mask, op_size, rd_op, sext, wr_op};
use crate::cpu::{Cpu, fl};
use crate::exc::{Ex, Flow};
use crate::insn::Insn;

/// mul, imul (1/2/3 operands), div, idiv.
pub fn muldiv(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let m = ins.mnemonic();
    if m == M::Imul && ins.op_count() >= 2 {
        let s = op_size(i, 0);
        let (a, b) = if ins.op_count() == 3 {
            (rd_op(cpu, i, 1, s)?, ins.immediate(2))
        } else {
            (rd_op(cpu, i, 0, s)?, rd_op(cpu, i, 1, s)?)
        };
        let p = i128::from(sext(a, s) as i64) * i128::from(sext(b, s) as i64);
        let r = (p as u64) & mask(s);
        let of = p != i128::from(sext(r, s) as i64);
        cpu.set_flags_res(s, r, of, of, false);
        return wr_op(cpu, i, 0, s, r);
    }
    let s = op_size(i, 0);
    let src = rd_op(cpu, i, 0, s)?;
    match (m, s) {
        (M::Mul, 1) => {
            let r = (cpu.gpr[0] & 0xff) * src;
            cpu.wreg(0, 2, r);
            let hi = r >> 8 != 0;
            cpu.set_flags_res(1, r & 0xff, hi, hi, false);
        }
        (M::Imul, 1) => {
            let r = i64::from(cpu.gpr[0] as i8) * i64::from(src as i8);
            cpu.wreg(0, 2, r as u64);
            let of = r != i64::from(r as i8);
            cpu.set_flags_res(1, (r as u64) & 0xff, of, of, false);
        }
        (M::Mul, _) => {
            let a = cpu.rreg(0, s);
            let p = u128::from(a) * u128::from(src);
            let bits = u32::from(s) * 8;
            let lo = (p as u64) & mask(s);
            let hi = ((p >> bits) as u64) & mask(s);
            cpu.wreg(0, s, lo);
            cpu.wreg(2, s, hi);
            cpu.set_flags_res(s, lo, hi != 0, hi != 0, false);
        }
        (M::Imul, _) => {
            let a = sext(cpu.rreg(0, s), s) as i64;
            let p = i128::from(a) * i128::from(sext(src, s) as i64);
            let bits = u32::from(s) * 8;
            let lo = (p as u64) & mask(s);
            let hi = ((p >> bits) as u64) & mask(s);
            let of = p != i128::from(sext(lo, s) as i64);
            cpu.wreg(0, s, lo);
            cpu.wreg(2, s, hi);
            cpu.set_flags_res(s, lo, of, of, false);
        }
        (M::Div, 1) => {
            if src == 0 {
                return Err(Ex::DE);
            }
            let a = cpu.gpr[0] & 0xffff;
            let q = a / src;
            if q > 0xff {
                return Err(Ex::DE);
            }
            cpu.wreg(0, 2, ((a % src) << 8) | q);
        }
        (M::Idiv, 1) => {
            let d = i64::from(src as i8);
            if d == 0 {
                return Err(Ex::DE);
            }
            let a = i64::from(cpu.gpr[0] as i16);
            let q = a / d;
            if q != i64::from(q as i8) {
                return Err(Ex::DE);
            }
            let r = a % d;
            cpu.wreg(0, 2, ((r as u64 & 0xff) << 8) | (q as u64 & 0xff));
        }
        (M::Div, _) => {
            if src == 0 {
                return Err(Ex::DE);
            }
            let bits = u32::from(s) * 8;
            let a = (u128::from(cpu.rreg(2, s)) << bits) | u128::from(cpu.rreg(0, s));
            let q = a / u128::from(src);
            if q > u128::from(mask(s)) {
                return Err(Ex::DE);
            }
            let r = a % u128::from(src);
            cpu.wreg(0, s, q as u64);
            cpu.wreg(2, s, r as u64);
        }
        _ => {
            // idiv 16/32/64
            let d = sext(src, s) as i64;
            if d == 0 {
                return Err(Ex::DE);
            }
            let bits = u32::from(s) * 8;
            let a = ((u128::from(cpu.rreg(2, s)) << bits) | u128::from(cpu.rreg(0, s))) as i128;
            let a = (a << (128 - 2 * bits)) >> (128 - 2 * bits);
            let d = i128::from(d);
            if a == i128::MIN && d == -1 {
                return Err(Ex::DE);
            }
            let q = a / d;
            let lo = -(1i128 << (bits - 1));
            let hi = (1i128 << (bits - 1)) - 1;
            if q < lo || q > hi {
                return Err(Ex::DE);
            }
            let r = a % d;
            cpu.wreg(0, s, q as u64);
            cpu.wreg(2, s, r as u64);
        }
    }
    Ok(())
}

/// Shift/rotate kinds for [`shift_core`].
pub mod sh {
    /// shl/sal
    pub const SHL: u8 = 0;
    /// shr
    pub const SHR: u8 = 1;
    /// sar
    pub const SAR: u8 = 2;
    /// rol
    pub const ROL: u8 = 3;
    /// ror
    pub const ROR: u8 = 4;
    /// rcl
    pub const RCL: u8 = 5;
    /// rcr
    pub const RCR: u8 = 6;
}

/// Shifts/rotates `a` (size `s`) by a count already masked to 5/6 bits and non-zero;
/// sets flags and returns the result.
#[inline(always)]
pub fn shift_core(cpu: &mut Cpu, op: u8, s: u8, a: u64, cnt: u32) -> u64 {
    let bits = u32::from(s) * 8;
    let mk = mask(s);
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    let set_cf_of = |cpu: &mut Cpu, cf: bool, of: bool| {
        cpu.flush_flags();
        cpu.rflags = (cpu.rflags & !(fl::CF | fl::OF))
            | if cf { fl::CF } else { 0 }
            | if of { fl::OF } else { 0 };
    };
    match op {
        sh::SHL => {
            let r = if cnt >= bits { 0 } else { (a << cnt) & mk };
            let cf = if cnt > bits {
                false
            } else {
                (a >> (bits - cnt)) & 1 != 0
            };
            cpu.set_flags_res(s, r, cf, msb(r) ^ cf, false);
            r
        }
        sh::SHR => {
            let r = if cnt >= bits { 0 } else { a >> cnt };
            let cf = if cnt > bits {
                false
            } else {
                (a >> (cnt - 1)) & 1 != 0
            };
            cpu.set_flags_res(s, r, cf, msb(a), false);
            r
        }
        sh::SAR => {
            let sa = sext(a, s) as i64;
            let r = ((sa >> cnt.min(bits - 1)) as u64) & mk;
            let cf = (sa >> (cnt.min(bits) - 1)) & 1 != 0;
            cpu.set_flags_res(s, r, cf, false, false);
            r
        }
        sh::ROL => {
            let c = cnt % bits;
            let r = if c == 0 {
                a
            } else {
                ((a << c) | (a >> (bits - c))) & mk
            };
            let cf = r & 1 != 0;
            set_cf_of(cpu, cf, msb(r) ^ cf);
            r
        }
        sh::ROR => {
            let c = cnt % bits;
            let r = if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & mk
            };
            set_cf_of(cpu, msb(r), msb(r) ^ ((r >> (bits - 2)) & 1 != 0));
            r
        }
        _ => {
            let c = cnt % (bits + 1);
            let mut v = u128::from(a) | (u128::from(cpu.cf()) << bits);
            let w = bits + 1;
            let wm = (1u128 << w) - 1;
            if c != 0 {
                v = if op == sh::RCL {
                    ((v << c) | (v >> (w - c))) & wm
                } else {
                    ((v >> c) | (v << (w - c))) & wm
                };
            }
            let r = (v as u64) & mk;
            let cf = (v >> bits) & 1 != 0;
            let of = if op == sh::RCL {
                msb(r) ^ cf
            } else {
                msb(r) ^ ((r >> (bits - 2)) & 1 != 0)
            };
            set_cf_of(cpu, cf, of);
            r
        }
    }
}

/// The [`sh`] kind of a shift/rotate mnemonic.
pub fn shift_kind(m: M) -> Option<u8> {
    Some(match m {
        M::Shl | M::Sal => sh::SHL,
        M::Shr => sh::SHR,
        M::Sar => sh::SAR,
        M::Rol => sh::ROL,
        M::Ror => sh::ROR,
        M::Rcl => sh::RCL,
        M::Rcr => sh::RCR,
        _ => return None,
    })
}

/// rol ror rcl rcr shl sal shr sar (any operand form).
pub fn shift(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let s = op_size(i, 0);
    let cnt_raw = if ins.op_count() == 1 {
        1
    } else {
        rd_op(cpu, i, 1, 1)? as u32
    };
    let cnt = cnt_raw & if s == 8 { 0x3f } else { 0x1f };
    let a = rd_op(cpu, i, 0, s)?;
    if cnt == 0 {
        // Flags are untouched, but a 32-bit register destination is still written
        // (zero-extended), as on hardware.
        return zero_count_writeback(cpu, i, s, a);
    }
    let op = shift_kind(ins.mnemonic()).ok_or(Ex::UD)?;
    // Compute on a copy of the flags so a faulting write leaves them untouched.
    let saved = (cpu.cc, cpu.rflags);
    let r = shift_core(cpu, op, s, a, cnt);
    if let Err(e) = wr_op(cpu, i, 0, s, r) {
        (cpu.cc, cpu.rflags) = saved;
        return Err(e);
    }
    Ok(())
}

fn zero_count_writeback(cpu: &mut Cpu, i: &Insn, s: u8, a: u64) -> Flow {
    if s == 4 && i.instr.op_kind(0) == OpKind::Register {
        wr_op(cpu, i, 0, s, a)?;
    }
    Ok(())
}

/// shld / shrd.
pub fn shiftd(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let s = op_size(i, 0);
    let bits = u32::from(s) * 8;
    let cnt = (rd_op(cpu, i, 2, 1)? as u32) & if s == 8 { 0x3f } else { 0x1f };
    let a = rd_op(cpu, i, 0, s)?;
    if cnt == 0 {
        return zero_count_writeback(cpu, i, s, a);
    }
    let b = rd_op(cpu, i, 1, s)?;
    let mk = mask(s);
    let (r, cf) = if ins.mnemonic() == M::Shld {
        // Treat as a (2*bits)-wide shift of a:b; counts above bits are undefined for 16-bit.
        let wide = (u128::from(a) << bits) | u128::from(b);
        let r = ((wide << cnt) >> bits) as u64 & mk;
        let cf = (wide >> (2 * bits - cnt)) & 1 != 0;
        (r, cf)
    } else {
        let wide = (u128::from(b) << bits) | u128::from(a);
        let r = (wide >> cnt) as u64 & mk;
        let cf = (wide >> (cnt - 1)) & 1 != 0;
        (r, cf)
    };
    let of = ((r ^ a) >> (bits - 1)) & 1 != 0;
    wr_op(cpu, i, 0, s, r)?;
    cpu.set_flags_res(s, r, cf, of, false);
    Ok(())
}

/// bt bts btr btc (register and memory bit strings).
pub fn bit_test(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let s = op_size(i, 0);
    let bits = u64::from(s) * 8;
    let off = if ins.op_kind(1) == OpKind::Register {
        rd_op(cpu, i, 1, s)?
    } else {
        ins.immediate(1) & 0xff
    };
    let (val, addr) = if ins.op_kind(0) == OpKind::Memory && ins.op_kind(1) == OpKind::Register {
        // Bit string: the register offset is signed and may address outside the operand.
        let so = sext(off, s) as i64;
        let byte_off =
            (so >> (if s == 8 {
                6
            } else if s == 4 {
                5
            } else {
                4
            })) * i64::from(s);
        let a = ea(cpu, i).wrapping_add(byte_off as u64) & cpu.lin_mask;
        (cpu.rd_n(a, s)?, Some(a))
    } else if ins.op_kind(0) == OpKind::Memory {
        let a = ea(cpu, i);
        (cpu.rd_n(a, s)?, Some(a))
    } else {
        (rd_op(cpu, i, 0, s)?, None)
    };
    let bit = off % bits;
    let cf = (val >> bit) & 1 != 0;
    let nv = match ins.mnemonic() {
        M::Bts => Some(val | (1 << bit)),
        M::Btr => Some(val & !(1 << bit)),
        M::Btc => Some(val ^ (1 << bit)),
        _ => None,
    };
    if let Some(v) = nv {
        match addr {
            Some(a) => cpu.wr_n(a, s, v)?,
            None => wr_op(cpu, i, 0, s, v)?,
        }
    }
    cpu.set_flag(fl::CF, cf);
    Ok(())
}

/// bsf bsr tzcnt lzcnt popcnt. Without ABM/BMI1 advertised, tzcnt/lzcnt run as bsf/bsr.
pub fn bit_scan(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let s = op_size(i, 0);
    let bits = u32::from(s) * 8;
    let v = rd_op(cpu, i, 1, s)?;
    let mut m = ins.mnemonic();
    if m == M::Tzcnt {
        m = M::Bsf;
    }
    if m == M::Lzcnt && !cpu.cpuid.has_lzcnt() {
        m = M::Bsr;
    }
    let f = cpu.flags() & !fl::ARITH;
    match m {
        M::Bsf | M::Bsr => {
            if v == 0 {
                cpu.set_arith_flags(f | fl::ZF);
                return Ok(());
            }
            let r = if m == M::Bsf {
                u64::from(v.trailing_zeros())
            } else {
                u64::from(63 - v.leading_zeros())
            };
            cpu.set_arith_flags(f);
            wr_op(cpu, i, 0, s, r)
        }
        M::Lzcnt => {
            let r = u64::from(v.leading_zeros() - (64 - bits));
            let mut nf = f;
            if r == u64::from(bits) {
                nf |= fl::CF;
            }
            if r == 0 {
                nf |= fl::ZF;
            }
            cpu.set_arith_flags(nf);
            wr_op(cpu, i, 0, s, r)
        }
        _ => {
            let r = u64::from(v.count_ones());
            cpu.set_arith_flags(if r == 0 { f | fl::ZF } else { f });
            wr_op(cpu, i, 0, s, r)
        }
    }
}

/// cmpxchg8b / cmpxchg16b.
pub fn cmpxchg_wide(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = ea(cpu, i);
    if i.instr.mnemonic() == M::Cmpxchg16b {
        if a & 15 != 0 {
            return Err(Ex::gp(0));
        }
        let lo = cpu.rd::<8>(a)?;
        let hi = cpu.rd::<8>(a.wrapping_add(8))?;
        if lo == cpu.gpr[0] && hi == cpu.gpr[2] {
            cpu.wr::<8>(a, cpu.gpr[3])?;
            cpu.wr::<8>(a.wrapping_add(8), cpu.gpr[1])?;
            cpu.set_flag(fl::ZF, true);
        } else {
            cpu.wr::<8>(a, lo)?;
            cpu.wr::<8>(a.wrapping_add(8), hi)?;
            cpu.gpr[0] = lo;
            cpu.gpr[2] = hi;
            cpu.set_flag(fl::ZF, false);
        }
        return Ok(());
    }
    let v = cpu.rd::<8>(a)?;
    let cmp = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
    if v == cmp {
        let n = (cpu.gpr[3] & 0xffff_ffff) | (cpu.gpr[1] << 32);
        cpu.wr::<8>(a, n)?;
        cpu.set_flag(fl::ZF, true);
    } else {
        cpu.wr::<8>(a, v)?;
        cpu.wreg(0, 4, v & 0xffff_ffff);
        cpu.wreg(2, 4, v >> 32);
        cpu.set_flag(fl::ZF, false);
    }
    Ok(())
}

/// daa das aaa aas aam aad (legacy modes only; #UD in 64-bit mode by decode).
pub fn bcd(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let al = cpu.gpr[0] & 0xff;
    let cf = cpu.cf();
    let af = cpu.af();
    match ins.mnemonic() {
        M::Daa | M::Das => {
            let mut a = al;
            let mut ncf = false;
            let mut naf = false;
            let sub = ins.mnemonic() == M::Das;
            if (al & 0xf) > 9 || af {
                a = if sub { a.wrapping_sub(6) } else { a + 6 } & 0xff;
                naf = true;
            }
            if al > 0x99 || cf {
                a = if sub { a.wrapping_sub(0x60) } else { a + 0x60 } & 0xff;
                ncf = true;
            }
            cpu.w8(0, a);
            cpu.set_flags_res(1, a, ncf, false, naf);
        }
        M::Aaa | M::Aas => {
            let sub = ins.mnemonic() == M::Aas;
            if (al & 0xf) > 9 || af {
                let ax = cpu.gpr[0] & 0xffff;
                let ax = if sub {
                    ax.wrapping_sub(6).wrapping_sub(0x100)
                } else {
                    ax + 0x106
                };
                cpu.wreg(0, 2, ax & 0xff0f);
                let f = cpu.flags() | fl::AF | fl::CF;
                cpu.set_arith_flags(f);
            } else {
                cpu.wreg(0, 2, cpu.gpr[0] & 0xff0f);
                let f = cpu.flags() & !(fl::AF | fl::CF);
                cpu.set_arith_flags(f);
            }
        }
        M::Aam => {
            let b = ins.immediate8();
            if b == 0 {
                return Err(Ex::DE);
            }
            let ah = al / u64::from(b);
            let nal = al % u64::from(b);
            cpu.wreg(0, 2, (ah << 8) | nal);
            cpu.set_flags_res(1, nal, false, false, false);
        }
        _ => {
            let b = u64::from(ins.immediate8());
            let ah = (cpu.gpr[0] >> 8) & 0xff;
            let nal = (al + ah * b) & 0xff;
            cpu.wreg(0, 2, nal);
            cpu.set_flags_res(1, nal, false, false, false);
        }
    }
    Ok(())
}
