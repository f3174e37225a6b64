//! SSE and SSE2: the moves, integer and floating-point forms compilers emit.
//!
//! Floating point uses the host's IEEE arithmetic in round-to-nearest; MXCSR is stored and
//! its rounding control is honoured only by the conversions (`cvt*` round per MXCSR.RC,
//! `cvtt*` truncate). SIMD floating-point exceptions are never raised (all masked, as
//! MXCSR's reset value has them) and the MXCSR status flags are not updated.

use iced_x86::{Mnemonic as M, OpKind};

use super::operands::ea;
use crate::cpu::{Cpu, fl};
use crate::exc::{Ex, Flow};
use crate::insn::{Insn, gpr, xmm};
use crate::regs::{cr0, cr4};

fn b16(x: u128) -> [u8; 16] {
    x.to_le_bytes()
}
fn from_b16(b: [u8; 16]) -> u128 {
    u128::from_le_bytes(b)
}
fn w8(x: u128) -> [u16; 8] {
    let b = x.to_le_bytes();
    std::array::from_fn(|i| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
}
fn from_w8(w: [u16; 8]) -> u128 {
    let mut b = [0u8; 16];
    for (i, v) in w.iter().enumerate() {
        b[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    u128::from_le_bytes(b)
}
fn d4(x: u128) -> [u32; 4] {
    std::array::from_fn(|i| (x >> (32 * i)) as u32)
}
fn from_d4(d: [u32; 4]) -> u128 {
    d.iter()
        .enumerate()
        .fold(0u128, |a, (i, &v)| a | (u128::from(v) << (32 * i)))
}
fn q2(x: u128) -> [u64; 2] {
    [x as u64, (x >> 64) as u64]
}
fn from_q2(q: [u64; 2]) -> u128 {
    u128::from(q[0]) | (u128::from(q[1]) << 64)
}

fn check_sse(cpu: &Cpu) -> Flow {
    if cpu.cr0 & cr0::EM != 0 || cpu.cr4 & cr4::OSFXSR == 0 {
        return Err(Ex::UD);
    }
    if cpu.cr0 & cr0::TS != 0 {
        return Err(Ex::NM);
    }
    Ok(())
}

/// Reads a 128-bit operand (register or memory of `bytes` bytes, zero-extended).
fn rd_x(cpu: &mut Cpu, i: &Insn, k: u32, bytes: usize, aligned: bool) -> Result<u128, Ex> {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => {
            let r = ins.op_register(k);
            if let Some(x) = xmm(r) {
                Ok(cpu.xmm[x])
            } else if let Some((g, s)) = gpr(r) {
                Ok(u128::from(cpu.rreg(g, s)))
            } else {
                Err(Ex::UD)
            }
        }
        OpKind::Memory => {
            let a = ea(cpu, i);
            if aligned && bytes == 16 && a & 15 != 0 {
                return Err(Ex::gp(0));
            }
            let mut b = [0u8; 16];
            let user = cpu.mmu.user;
            cpu.read_bytes(a, &mut b[..bytes], user)?;
            Ok(u128::from_le_bytes(b))
        }
        _ => Ok(u128::from(ins.immediate(k))),
    }
}

fn wr_x(cpu: &mut Cpu, i: &Insn, k: u32, bytes: usize, v: u128, aligned: bool) -> Flow {
    let ins = &i.instr;
    match ins.op_kind(k) {
        OpKind::Register => {
            let r = ins.op_register(k);
            if let Some(x) = xmm(r) {
                cpu.xmm[x] = v;
                Ok(())
            } else if let Some((g, s)) = gpr(r) {
                cpu.wreg(g, s, v as u64);
                Ok(())
            } else {
                Err(Ex::UD)
            }
        }
        OpKind::Memory => {
            let a = ea(cpu, i);
            if aligned && bytes == 16 && a & 15 != 0 {
                return Err(Ex::gp(0));
            }
            let b = v.to_le_bytes();
            let user = cpu.mmu.user;
            cpu.write_bytes(a, &b[..bytes], user)
        }
        _ => Err(Ex::UD),
    }
}

fn dst_x(i: &Insn) -> Result<usize, Ex> {
    if i.instr.op_kind(0) == OpKind::Register {
        xmm(i.instr.op_register(0)).ok_or(Ex::UD)
    } else {
        Err(Ex::UD)
    }
}

fn is_mmx(i: &Insn) -> bool {
    let ins = &i.instr;
    (0..ins.op_count()).any(|k| {
        ins.op_kind(k) == OpKind::Register && {
            let r = ins.op_register(k) as u32;
            (iced_x86::Register::MM0 as u32..iced_x86::Register::MM0 as u32 + 8).contains(&r)
        }
    })
}

/// Rounds per MXCSR.RC.
fn round_mxcsr(cpu: &Cpu, v: f64) -> f64 {
    match (cpu.mxcsr >> 13) & 3 {
        0 => v.round_ties_even(),
        1 => v.floor(),
        2 => v.ceil(),
        _ => v.trunc(),
    }
}

fn f2i(v: f64, size: u8) -> u64 {
    // Out-of-range or NaN gives the "integer indefinite" value.
    if size == 8 {
        if v.is_nan() || !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&v) {
            1 << 63
        } else {
            v as i64 as u64
        }
    } else if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        0x8000_0000
    } else {
        u64::from(v as i32 as u32)
    }
}

fn fcmp(pred: u8, a: f64, b: f64) -> bool {
    match pred & 7 {
        0 => a == b,
        1 => a < b,
        2 => a <= b,
        3 => a.is_nan() || b.is_nan(),
        4 => a != b,
        5 => a
            .partial_cmp(&b)
            .is_none_or(|o| o != std::cmp::Ordering::Less),
        6 => a
            .partial_cmp(&b)
            .is_none_or(|o| o == std::cmp::Ordering::Greater),
        _ => !(a.is_nan() || b.is_nan()),
    }
}

/// MXCSR exception flags.
mod mx {
    pub const IE: u32 = 1;
    pub const DE: u32 = 2;
    pub const ZE: u32 = 4;
    pub const OE: u32 = 8;
    pub const UE: u32 = 16;
    pub const PE: u32 = 32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
    MinMax,
    /// Compare with a predicate (signalling for LT/LE/NLT/NLE).
    Cmp(u8),
}

fn is_snan64(v: f64) -> bool {
    v.is_nan() && v.to_bits() & (1 << 51) == 0
}

fn is_snan32(v: f32) -> bool {
    v.is_nan() && v.to_bits() & (1 << 22) == 0
}

/// The MXCSR status flags one arithmetic operation raises. `a`, `b` and `r` are the
/// operands and result (f32 values widened exactly when `single`); `snan` says whether an
/// operand was a signalling NaN in its own format.
fn fp_flags(op: FOp, a: f64, b: f64, r: f64, single: bool, snan: bool) -> u32 {
    let mut f = 0;
    let unary = op == FOp::Sqrt;
    let (min_normal, max) = if single {
        (f64::from(f32::MIN_POSITIVE), f64::from(f32::MAX))
    } else {
        (f64::MIN_POSITIVE, f64::MAX)
    };
    let denormal = |x: f64| x != 0.0 && x.is_finite() && x.abs() < min_normal;
    let any_nan = if unary {
        b.is_nan()
    } else {
        a.is_nan() || b.is_nan()
    };
    if snan {
        return mx::IE;
    }
    match op {
        FOp::MinMax if any_nan => return mx::IE,
        FOp::Cmp(p) if any_nan => {
            return if matches!(p & 7, 1 | 2 | 5 | 6) {
                mx::IE
            } else {
                0
            };
        }
        FOp::MinMax | FOp::Cmp(_) => {
            return if denormal(a) || denormal(b) {
                mx::DE
            } else {
                0
            };
        }
        _ => {}
    }
    if any_nan {
        return 0;
    }
    if r.is_nan() {
        return mx::IE;
    }
    if (!unary && denormal(a)) || denormal(b) {
        f |= mx::DE;
    }
    if op == FOp::Div && b == 0.0 && a.is_finite() {
        return f | mx::ZE;
    }
    let finite_in = (unary || a.is_finite()) && b.is_finite();
    if !finite_in {
        return f;
    }
    if r.is_infinite() || r.abs() > max {
        return f | mx::OE | mx::PE;
    }
    let inexact = match op {
        FOp::Add | FOp::Sub => {
            let b2 = if op == FOp::Sub { -b } else { b };
            let s = a + b2;
            let bb = s - a;
            let err = (a - (s - bb)) + (b2 - bb);
            s != r || err != 0.0
        }
        FOp::Mul => a.mul_add(b, -r) != 0.0,
        FOp::Div => r.mul_add(b, -a) != 0.0,
        FOp::Sqrt => r.mul_add(r, -b) != 0.0,
        _ => false,
    };
    if inexact {
        f |= mx::PE;
        if denormal(r) || r == 0.0 {
            f |= mx::UE;
        }
    }
    f
}

fn minf(a: f64, b: f64) -> f64 {
    // SSE min/max return the second operand when either is NaN or both are zero.
    if a < b { a } else { b }
}
fn maxf(a: f64, b: f64) -> f64 {
    if a > b { a } else { b }
}

/// Executes an SSE/SSE2 instruction; `None` when `i` is not one.
pub fn exec_sse(cpu: &mut Cpu, i: &Insn) -> Option<Flow> {
    let m = i.instr.mnemonic();
    if !is_sse(m) {
        return None;
    }
    if is_mmx(i) {
        // MMX is not advertised.
        return Some(Err(Ex::UD));
    }
    Some(check_sse(cpu).and_then(|_| sse(cpu, i, m)))
}

fn is_sse(m: M) -> bool {
    use M::*;
    matches!(
        m,
        Movaps
            | Movups
            | Movapd
            | Movupd
            | Movdqa
            | Movdqu
            | Movss
            | Movsd
            | Movq
            | Movd
            | Movlps
            | Movhps
            | Movlpd
            | Movhpd
            | Movhlps
            | Movlhps
            | Movntdq
            | Movntps
            | Movntpd
            | Movnti
            | Movmskps
            | Movmskpd
            | Pmovmskb
            | Pxor
            | Por
            | Pand
            | Pandn
            | Xorps
            | Xorpd
            | Andps
            | Andpd
            | Andnps
            | Andnpd
            | Orps
            | Orpd
            | Paddb
            | Paddw
            | Paddd
            | Paddq
            | Psubb
            | Psubw
            | Psubd
            | Psubq
            | Paddusb
            | Paddusw
            | Psubusb
            | Psubusw
            | Paddsb
            | Paddsw
            | Psubsb
            | Psubsw
            | Pmullw
            | Pmulhw
            | Pmulhuw
            | Pmuludq
            | Pmaddwd
            | Pavgb
            | Pavgw
            | Pminub
            | Pmaxub
            | Pminsw
            | Pmaxsw
            | Psadbw
            | Pcmpeqb
            | Pcmpeqw
            | Pcmpeqd
            | Pcmpgtb
            | Pcmpgtw
            | Pcmpgtd
            | Psllw
            | Pslld
            | Psllq
            | Psrlw
            | Psrld
            | Psrlq
            | Psraw
            | Psrad
            | Pslldq
            | Psrldq
            | Pshufd
            | Pshuflw
            | Pshufhw
            | Punpcklbw
            | Punpcklwd
            | Punpckldq
            | Punpcklqdq
            | Punpckhbw
            | Punpckhwd
            | Punpckhdq
            | Punpckhqdq
            | Packsswb
            | Packssdw
            | Packuswb
            | Shufps
            | Shufpd
            | Unpcklps
            | Unpcklpd
            | Unpckhps
            | Unpckhpd
            | Pinsrw
            | Pextrw
            | Addss
            | Addsd
            | Addps
            | Addpd
            | Subss
            | Subsd
            | Subps
            | Subpd
            | Mulss
            | Mulsd
            | Mulps
            | Mulpd
            | Divss
            | Divsd
            | Divps
            | Divpd
            | Sqrtss
            | Sqrtsd
            | Sqrtps
            | Sqrtpd
            | Minss
            | Minsd
            | Minps
            | Minpd
            | Maxss
            | Maxsd
            | Maxps
            | Maxpd
            | Cmpss
            | Cmpsd
            | Cmpps
            | Cmppd
            | Comiss
            | Comisd
            | Ucomiss
            | Ucomisd
            | Cvtsi2ss
            | Cvtsi2sd
            | Cvtss2sd
            | Cvtsd2ss
            | Cvttss2si
            | Cvttsd2si
            | Cvtss2si
            | Cvtsd2si
            | Cvtdq2ps
            | Cvtdq2pd
            | Cvtps2dq
            | Cvttps2dq
            | Cvtpd2dq
            | Cvttpd2dq
            | Cvtps2pd
            | Cvtpd2ps
            | Rcpps
            | Rcpss
            | Rsqrtps
            | Rsqrtss
            | Ldmxcsr
            | Stmxcsr
            | Maskmovdqu
    )
}

fn sse(cpu: &mut Cpu, i: &Insn, m: M) -> Flow {
    use M::*;
    let ins = &i.instr;
    let k0_mem = ins.op_kind(0) == OpKind::Memory;
    let k1_mem = ins.op_count() > 1 && ins.op_kind(1) == OpKind::Memory;
    match m {
        Movaps | Movapd | Movdqa | Movntdq | Movntps | Movntpd => {
            let v = rd_x(cpu, i, 1, 16, true)?;
            wr_x(cpu, i, 0, 16, v, true)
        }
        Movups | Movupd | Movdqu => {
            let v = rd_x(cpu, i, 1, 16, false)?;
            wr_x(cpu, i, 0, 16, v, false)
        }
        Movnti => {
            let s = super::operands::op_size(i, 0);
            let v = super::operands::rd_op(cpu, i, 1, s)?;
            super::operands::wr_op(cpu, i, 0, s, v)
        }
        Movss | Movsd => {
            let n = if m == Movss { 4 } else { 8 };
            let lm: u128 = if n == 4 { 0xffff_ffff } else { u64::MAX.into() };
            if k0_mem {
                let v = rd_x(cpu, i, 1, 16, false)?;
                wr_x(cpu, i, 0, n, v & lm, false)
            } else if k1_mem {
                let v = rd_x(cpu, i, 1, n, false)?;
                cpu.xmm[dst_x(i)?] = v;
                Ok(())
            } else {
                let v = rd_x(cpu, i, 1, 16, false)?;
                let d = dst_x(i)?;
                cpu.xmm[d] = (cpu.xmm[d] & !lm) | (v & lm);
                Ok(())
            }
        }
        Movd | Movq => {
            let n = if m == Movd { 4 } else { 8 };
            let lm: u128 = if n == 4 { 0xffff_ffff } else { u64::MAX.into() };
            let to_xmm = ins.op_kind(0) == OpKind::Register && xmm(ins.op_register(0)).is_some();
            if to_xmm {
                let v = rd_x(cpu, i, 1, n, false)? & lm;
                cpu.xmm[dst_x(i)?] = v;
                Ok(())
            } else {
                let v = rd_x(cpu, i, 1, 16, false)? & lm;
                if k0_mem {
                    wr_x(cpu, i, 0, n, v, false)
                } else {
                    let (g, s) = gpr(ins.op_register(0)).ok_or(Ex::UD)?;
                    cpu.wreg(g, s, v as u64);
                    Ok(())
                }
            }
        }
        Movlps | Movlpd | Movhps | Movhpd => {
            let hi = matches!(m, Movhps | Movhpd);
            if k0_mem {
                let v = rd_x(cpu, i, 1, 16, false)?;
                let q = if hi { (v >> 64) as u64 } else { v as u64 };
                wr_x(cpu, i, 0, 8, u128::from(q), false)
            } else {
                let v = rd_x(cpu, i, 1, 8, false)? as u64;
                let d = dst_x(i)?;
                let mut q = q2(cpu.xmm[d]);
                q[usize::from(hi)] = v;
                cpu.xmm[d] = from_q2(q);
                Ok(())
            }
        }
        Movhlps | Movlhps => {
            let s = q2(rd_x(cpu, i, 1, 16, false)?);
            let d = dst_x(i)?;
            let mut q = q2(cpu.xmm[d]);
            if m == Movhlps {
                q[0] = s[1];
            } else {
                q[1] = s[0];
            }
            cpu.xmm[d] = from_q2(q);
            Ok(())
        }
        Movmskps | Movmskpd | Pmovmskb => {
            let v = rd_x(cpu, i, 1, 16, false)?;
            let r = match m {
                Movmskps => d4(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (k, &x)| a | (u64::from(x >> 31) << k)),
                Movmskpd => q2(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (k, &x)| a | ((x >> 63) << k)),
                _ => b16(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (k, &x)| a | (u64::from(x >> 7) << k)),
            };
            let (g, s) = gpr(ins.op_register(0)).ok_or(Ex::UD)?;
            cpu.wreg(g, s, r);
            Ok(())
        }
        Maskmovdqu => {
            let d = dst_x(i)?;
            let data = b16(cpu.xmm[d]);
            let msk = b16(rd_x(cpu, i, 1, 16, false)?);
            let base = cpu.ebase[crate::cpu::sr::DS].wrapping_add(cpu.gpr[7]) & cpu.lin_mask;
            for k in 0..16 {
                if msk[k] & 0x80 != 0 {
                    cpu.wr::<1>(base.wrapping_add(k as u64), u64::from(data[k]))?;
                }
            }
            Ok(())
        }
        Ldmxcsr => {
            let v = rd_x(cpu, i, 0, 4, false)? as u32;
            if v & !0xffff != 0 {
                return Err(Ex::gp(0));
            }
            cpu.mxcsr = v;
            Ok(())
        }
        Stmxcsr => wr_x(cpu, i, 0, 4, u128::from(cpu.mxcsr), false),
        Pinsrw => {
            let v = rd_x(cpu, i, 1, 2, false)? as u16;
            let d = dst_x(i)?;
            let mut w = w8(cpu.xmm[d]);
            w[usize::from(ins.immediate8() & 7)] = v;
            cpu.xmm[d] = from_w8(w);
            Ok(())
        }
        Pextrw => {
            let v = w8(rd_x(cpu, i, 1, 16, false)?)[usize::from(ins.immediate8() & 7)];
            let (g, s) = gpr(ins.op_register(0)).ok_or(Ex::UD)?;
            cpu.wreg(g, s, u64::from(v));
            Ok(())
        }
        Comiss | Ucomiss | Comisd | Ucomisd => {
            let d = dst_x(i)?;
            let (a, b) = if matches!(m, Comiss | Ucomiss) {
                let s = rd_x(cpu, i, 1, 4, false)?;
                (
                    f64::from(f32::from_bits(cpu.xmm[d] as u32)),
                    f64::from(f32::from_bits(s as u32)),
                )
            } else {
                let s = rd_x(cpu, i, 1, 8, false)?;
                (f64::from_bits(cpu.xmm[d] as u64), f64::from_bits(s as u64))
            };
            let single = matches!(m, Comiss | Ucomiss);
            let snan = if single {
                is_snan32(a as f32) || is_snan32(b as f32)
            } else {
                is_snan64(a) || is_snan64(b)
            };
            let nan = a.is_nan() || b.is_nan();
            if snan || (nan && matches!(m, Comiss | Comisd)) {
                cpu.mxcsr |= mx::IE;
            }
            let f = if a.is_nan() || b.is_nan() {
                fl::ZF | fl::PF | fl::CF
            } else if a < b {
                fl::CF
            } else if a == b {
                fl::ZF
            } else {
                0
            };
            cpu.set_arith_flags(f);
            Ok(())
        }
        Cvtsi2ss | Cvtsi2sd => {
            let s = super::operands::op_size(i, 1);
            let v = super::operands::rd_op(cpu, i, 1, s)?;
            let iv = super::operands::sext(v, s) as i64;
            let d = dst_x(i)?;
            let exact = if m == Cvtsi2ss {
                (iv as f32) as i128 == i128::from(iv)
            } else {
                (iv as f64) as i128 == i128::from(iv)
            };
            if !exact {
                cpu.mxcsr |= mx::PE;
            }
            if m == Cvtsi2ss {
                let f = iv as f32;
                cpu.xmm[d] = (cpu.xmm[d] & !0xffff_ffffu128) | u128::from(f.to_bits());
            } else {
                let f = iv as f64;
                cpu.xmm[d] = (cpu.xmm[d] & !u128::from(u64::MAX)) | u128::from(f.to_bits());
            }
            Ok(())
        }
        Cvttss2si | Cvtss2si | Cvttsd2si | Cvtsd2si => {
            let src = if matches!(m, Cvttss2si | Cvtss2si) {
                f64::from(f32::from_bits(rd_x(cpu, i, 1, 4, false)? as u32))
            } else {
                f64::from_bits(rd_x(cpu, i, 1, 8, false)? as u64)
            };
            let v = if matches!(m, Cvttss2si | Cvttsd2si) {
                src.trunc()
            } else {
                round_mxcsr(cpu, src)
            };
            let (g, s) = gpr(ins.op_register(0)).ok_or(Ex::UD)?;
            let lim = if s == 8 {
                9.223_372_036_854_776e18
            } else {
                2_147_483_648.0
            };
            if v.is_nan() || v >= lim || v < -lim {
                cpu.mxcsr |= mx::IE;
            } else if v != src {
                cpu.mxcsr |= mx::PE;
            }
            cpu.wreg(g, s, f2i(v, s));
            Ok(())
        }
        Cvtss2sd => {
            let v = f64::from(f32::from_bits(rd_x(cpu, i, 1, 4, false)? as u32));
            let d = dst_x(i)?;
            cpu.xmm[d] = (cpu.xmm[d] & !u128::from(u64::MAX)) | u128::from(v.to_bits());
            Ok(())
        }
        Cvtsd2ss => {
            let v = f64::from_bits(rd_x(cpu, i, 1, 8, false)? as u64) as f32;
            let d = dst_x(i)?;
            cpu.xmm[d] = (cpu.xmm[d] & !0xffff_ffffu128) | u128::from(v.to_bits());
            Ok(())
        }
        Cvtdq2ps | Cvtdq2pd | Cvtps2dq | Cvttps2dq | Cvtpd2dq | Cvttpd2dq | Cvtps2pd | Cvtpd2ps => {
            let src_bytes = if matches!(m, Cvtdq2pd | Cvtps2pd) {
                8
            } else {
                16
            };
            let s = rd_x(cpu, i, 1, src_bytes, !k1_mem || src_bytes == 16)?;
            let r = match m {
                Cvtdq2ps => from_d4(d4(s).map(|x| (x as i32 as f32).to_bits())),
                Cvtdq2pd => {
                    let d = d4(s);
                    from_q2([
                        f64::from(d[0] as i32).to_bits(),
                        f64::from(d[1] as i32).to_bits(),
                    ])
                }
                Cvtps2dq | Cvttps2dq => from_d4(d4(s).map(|x| {
                    let f = f64::from(f32::from_bits(x));
                    let f = if m == Cvttps2dq {
                        f.trunc()
                    } else {
                        round_mxcsr(cpu, f)
                    };
                    f2i(f, 4) as u32
                })),
                Cvtpd2dq | Cvttpd2dq => {
                    let q = q2(s);
                    let c = |x: u64| {
                        let f = f64::from_bits(x);
                        let f = if m == Cvttpd2dq {
                            f.trunc()
                        } else {
                            round_mxcsr(cpu, f)
                        };
                        f2i(f, 4) as u32
                    };
                    from_d4([c(q[0]), c(q[1]), 0, 0])
                }
                Cvtps2pd => {
                    let d = d4(s);
                    from_q2([
                        f64::from(f32::from_bits(d[0])).to_bits(),
                        f64::from(f32::from_bits(d[1])).to_bits(),
                    ])
                }
                _ => {
                    let q = q2(s);
                    from_d4([
                        (f64::from_bits(q[0]) as f32).to_bits(),
                        (f64::from_bits(q[1]) as f32).to_bits(),
                        0,
                        0,
                    ])
                }
            };
            cpu.xmm[dst_x(i)?] = r;
            Ok(())
        }
        Addss | Subss | Mulss | Divss | Minss | Maxss | Sqrtss | Cmpss | Rcpss | Rsqrtss => {
            let s = f32::from_bits(rd_x(cpu, i, 1, 4, false)? as u32);
            let d = dst_x(i)?;
            let a = f32::from_bits(cpu.xmm[d] as u32);
            let fop = match m {
                Addss => Some(FOp::Add),
                Subss => Some(FOp::Sub),
                Mulss => Some(FOp::Mul),
                Divss => Some(FOp::Div),
                Sqrtss => Some(FOp::Sqrt),
                Minss | Maxss => Some(FOp::MinMax),
                Cmpss => Some(FOp::Cmp(ins.immediate8())),
                _ => None,
            };
            let r = match m {
                Addss => (a + s).to_bits(),
                Subss => (a - s).to_bits(),
                Mulss => (a * s).to_bits(),
                Divss => (a / s).to_bits(),
                Minss => (minf(f64::from(a), f64::from(s)) as f32).to_bits(),
                Maxss => (maxf(f64::from(a), f64::from(s)) as f32).to_bits(),
                Sqrtss => s.sqrt().to_bits(),
                Rcpss => (1.0 / s).to_bits(),
                Rsqrtss => (1.0 / s.sqrt()).to_bits(),
                _ => {
                    if fcmp(ins.immediate8(), f64::from(a), f64::from(s)) {
                        u32::MAX
                    } else {
                        0
                    }
                }
            };
            if let Some(op) = fop {
                let snan = is_snan32(s) || (op != FOp::Sqrt && is_snan32(a));
                let rf = if matches!(op, FOp::Cmp(_)) {
                    0.0
                } else {
                    f64::from(f32::from_bits(r))
                };
                cpu.mxcsr |= fp_flags(op, f64::from(a), f64::from(s), rf, true, snan);
            }
            cpu.xmm[d] = (cpu.xmm[d] & !0xffff_ffffu128) | u128::from(r);
            Ok(())
        }
        Addsd | Subsd | Mulsd | Divsd | Minsd | Maxsd | Sqrtsd | Cmpsd => {
            let s = f64::from_bits(rd_x(cpu, i, 1, 8, false)? as u64);
            let d = dst_x(i)?;
            let a = f64::from_bits(cpu.xmm[d] as u64);
            let fop = match m {
                Addsd => FOp::Add,
                Subsd => FOp::Sub,
                Mulsd => FOp::Mul,
                Divsd => FOp::Div,
                Sqrtsd => FOp::Sqrt,
                Minsd | Maxsd => FOp::MinMax,
                _ => FOp::Cmp(ins.immediate8()),
            };
            let r = match m {
                Addsd => (a + s).to_bits(),
                Subsd => (a - s).to_bits(),
                Mulsd => (a * s).to_bits(),
                Divsd => (a / s).to_bits(),
                Minsd => minf(a, s).to_bits(),
                Maxsd => maxf(a, s).to_bits(),
                Sqrtsd => s.sqrt().to_bits(),
                _ => {
                    if fcmp(ins.immediate8(), a, s) {
                        u64::MAX
                    } else {
                        0
                    }
                }
            };
            let snan = is_snan64(s) || (fop != FOp::Sqrt && is_snan64(a));
            let rf = if matches!(fop, FOp::Cmp(_)) {
                0.0
            } else {
                f64::from_bits(r)
            };
            cpu.mxcsr |= fp_flags(fop, a, s, rf, false, snan);
            cpu.xmm[d] = (cpu.xmm[d] & !u128::from(u64::MAX)) | u128::from(r);
            Ok(())
        }
        Addps | Subps | Mulps | Divps | Minps | Maxps | Sqrtps | Cmpps | Rcpps | Rsqrtps => {
            let s = d4(rd_x(cpu, i, 1, 16, true)?);
            let d = dst_x(i)?;
            let a = d4(cpu.xmm[d]);
            let imm = if m == Cmpps { ins.immediate8() } else { 0 };
            let r: [u32; 4] = std::array::from_fn(|k| {
                let (x, y) = (f32::from_bits(a[k]), f32::from_bits(s[k]));
                match m {
                    Addps => (x + y).to_bits(),
                    Subps => (x - y).to_bits(),
                    Mulps => (x * y).to_bits(),
                    Divps => (x / y).to_bits(),
                    Minps => (minf(f64::from(x), f64::from(y)) as f32).to_bits(),
                    Maxps => (maxf(f64::from(x), f64::from(y)) as f32).to_bits(),
                    Sqrtps => y.sqrt().to_bits(),
                    Rcpps => (1.0 / y).to_bits(),
                    Rsqrtps => (1.0 / y.sqrt()).to_bits(),
                    _ => {
                        if fcmp(imm, f64::from(x), f64::from(y)) {
                            u32::MAX
                        } else {
                            0
                        }
                    }
                }
            });
            cpu.xmm[d] = from_d4(r);
            Ok(())
        }
        Addpd | Subpd | Mulpd | Divpd | Minpd | Maxpd | Sqrtpd | Cmppd => {
            let s = q2(rd_x(cpu, i, 1, 16, true)?);
            let d = dst_x(i)?;
            let a = q2(cpu.xmm[d]);
            let imm = if m == Cmppd { ins.immediate8() } else { 0 };
            let r: [u64; 2] = std::array::from_fn(|k| {
                let (x, y) = (f64::from_bits(a[k]), f64::from_bits(s[k]));
                match m {
                    Addpd => (x + y).to_bits(),
                    Subpd => (x - y).to_bits(),
                    Mulpd => (x * y).to_bits(),
                    Divpd => (x / y).to_bits(),
                    Minpd => minf(x, y).to_bits(),
                    Maxpd => maxf(x, y).to_bits(),
                    Sqrtpd => y.sqrt().to_bits(),
                    _ => {
                        if fcmp(imm, x, y) {
                            u64::MAX
                        } else {
                            0
                        }
                    }
                }
            });
            cpu.xmm[d] = from_q2(r);
            Ok(())
        }
        _ => packed_int(cpu, i, m),
    }
}

fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}
fn sat_u16(v: i32) -> u16 {
    v.clamp(0, 65535) as u16
}

fn packed_int(cpu: &mut Cpu, i: &Insn, m: M) -> Flow {
    use M::*;
    let ins = &i.instr;
    let d = dst_x(i)?;
    let a = cpu.xmm[d];
    // Shifts by immediate have the immediate as operand 1.
    let imm_form =
        ins.op_count() == 2 && !matches!(ins.op_kind(1), OpKind::Register | OpKind::Memory);
    let s = if imm_form {
        u128::from(ins.immediate(1) & 0xff)
    } else {
        rd_x(cpu, i, 1, 16, true)?
    };
    let (ab, sb) = (b16(a), b16(s));
    let (aw, sw) = (w8(a), w8(s));
    let (ad, sd) = (d4(a), d4(s));
    let (aq, sq) = (q2(a), q2(s));
    let r: u128 = match m {
        Pxor | Xorps | Xorpd => a ^ s,
        Por | Orps | Orpd => a | s,
        Pand | Andps | Andpd => a & s,
        Pandn | Andnps | Andnpd => !a & s,
        Paddb => from_b16(std::array::from_fn(|k| ab[k].wrapping_add(sb[k]))),
        Paddw => from_w8(std::array::from_fn(|k| aw[k].wrapping_add(sw[k]))),
        Paddd => from_d4(std::array::from_fn(|k| ad[k].wrapping_add(sd[k]))),
        Paddq => from_q2(std::array::from_fn(|k| aq[k].wrapping_add(sq[k]))),
        Psubb => from_b16(std::array::from_fn(|k| ab[k].wrapping_sub(sb[k]))),
        Psubw => from_w8(std::array::from_fn(|k| aw[k].wrapping_sub(sw[k]))),
        Psubd => from_d4(std::array::from_fn(|k| ad[k].wrapping_sub(sd[k]))),
        Psubq => from_q2(std::array::from_fn(|k| aq[k].wrapping_sub(sq[k]))),
        Paddusb => from_b16(std::array::from_fn(|k| ab[k].saturating_add(sb[k]))),
        Paddusw => from_w8(std::array::from_fn(|k| aw[k].saturating_add(sw[k]))),
        Psubusb => from_b16(std::array::from_fn(|k| ab[k].saturating_sub(sb[k]))),
        Psubusw => from_w8(std::array::from_fn(|k| aw[k].saturating_sub(sw[k]))),
        Paddsb => from_b16(std::array::from_fn(|k| {
            sat_i8(i32::from(ab[k] as i8) + i32::from(sb[k] as i8))
        })),
        Paddsw => from_w8(std::array::from_fn(|k| {
            sat_i16(i32::from(aw[k] as i16) + i32::from(sw[k] as i16))
        })),
        Psubsb => from_b16(std::array::from_fn(|k| {
            sat_i8(i32::from(ab[k] as i8) - i32::from(sb[k] as i8))
        })),
        Psubsw => from_w8(std::array::from_fn(|k| {
            sat_i16(i32::from(aw[k] as i16) - i32::from(sw[k] as i16))
        })),
        Pmullw => from_w8(std::array::from_fn(|k| aw[k].wrapping_mul(sw[k]))),
        Pmulhw => from_w8(std::array::from_fn(|k| {
            ((i32::from(aw[k] as i16) * i32::from(sw[k] as i16)) >> 16) as u16
        })),
        Pmulhuw => from_w8(std::array::from_fn(|k| {
            ((u32::from(aw[k]) * u32::from(sw[k])) >> 16) as u16
        })),
        Pmuludq => from_q2([
            u64::from(ad[0]) * u64::from(sd[0]),
            u64::from(ad[2]) * u64::from(sd[2]),
        ]),
        Pmaddwd => from_d4(std::array::from_fn(|k| {
            let p = |j: usize| i32::from(aw[j] as i16) * i32::from(sw[j] as i16);
            p(2 * k).wrapping_add(p(2 * k + 1)) as u32
        })),
        Pavgb => from_b16(std::array::from_fn(|k| {
            ((u16::from(ab[k]) + u16::from(sb[k]) + 1) >> 1) as u8
        })),
        Pavgw => from_w8(std::array::from_fn(|k| {
            ((u32::from(aw[k]) + u32::from(sw[k]) + 1) >> 1) as u16
        })),
        Pminub => from_b16(std::array::from_fn(|k| ab[k].min(sb[k]))),
        Pmaxub => from_b16(std::array::from_fn(|k| ab[k].max(sb[k]))),
        Pminsw => from_w8(std::array::from_fn(|k| {
            (aw[k] as i16).min(sw[k] as i16) as u16
        })),
        Pmaxsw => from_w8(std::array::from_fn(|k| {
            (aw[k] as i16).max(sw[k] as i16) as u16
        })),
        Psadbw => {
            let sum = |r: std::ops::Range<usize>| {
                r.map(|k| u64::from(ab[k].abs_diff(sb[k]))).sum::<u64>()
            };
            from_q2([sum(0..8), sum(8..16)])
        }
        Pcmpeqb => from_b16(std::array::from_fn(
            |k| if ab[k] == sb[k] { 0xff } else { 0 },
        )),
        Pcmpeqw => from_w8(std::array::from_fn(
            |k| if aw[k] == sw[k] { 0xffff } else { 0 },
        )),
        Pcmpeqd => from_d4(std::array::from_fn(|k| {
            if ad[k] == sd[k] { u32::MAX } else { 0 }
        })),
        Pcmpgtb => from_b16(std::array::from_fn(|k| {
            if (ab[k] as i8) > (sb[k] as i8) {
                0xff
            } else {
                0
            }
        })),
        Pcmpgtw => from_w8(std::array::from_fn(|k| {
            if (aw[k] as i16) > (sw[k] as i16) {
                0xffff
            } else {
                0
            }
        })),
        Pcmpgtd => from_d4(std::array::from_fn(|k| {
            if (ad[k] as i32) > (sd[k] as i32) {
                u32::MAX
            } else {
                0
            }
        })),
        Psllw | Pslld | Psllq | Psrlw | Psrld | Psrlq | Psraw | Psrad => {
            // The count is the low quadword of the source (or the immediate).
            let cnt = s as u64;
            match m {
                Psllw => from_w8(aw.map(|x| if cnt > 15 { 0 } else { x << cnt })),
                Pslld => from_d4(ad.map(|x| if cnt > 31 { 0 } else { x << cnt })),
                Psllq => from_q2(aq.map(|x| if cnt > 63 { 0 } else { x << cnt })),
                Psrlw => from_w8(aw.map(|x| if cnt > 15 { 0 } else { x >> cnt })),
                Psrld => from_d4(ad.map(|x| if cnt > 31 { 0 } else { x >> cnt })),
                Psrlq => from_q2(aq.map(|x| if cnt > 63 { 0 } else { x >> cnt })),
                Psraw => from_w8(aw.map(|x| ((x as i16) >> cnt.min(15)) as u16)),
                _ => from_d4(ad.map(|x| ((x as i32) >> cnt.min(31)) as u32)),
            }
        }
        Pslldq => {
            let n = (s as u64).min(16) as u32;
            if n >= 16 { 0 } else { a << (n * 8) }
        }
        Psrldq => {
            let n = (s as u64).min(16) as u32;
            if n >= 16 { 0 } else { a >> (n * 8) }
        }
        Pshufd => {
            let imm = ins.immediate8();
            from_d4(std::array::from_fn(|k| {
                sd[usize::from((imm >> (2 * k)) & 3)]
            }))
        }
        Pshuflw | Pshufhw => {
            let imm = ins.immediate8();
            let off = if m == Pshufhw { 4 } else { 0 };
            let mut w = sw;
            for k in 0..4 {
                w[off + k] = sw[off + usize::from((imm >> (2 * k)) & 3)];
            }
            from_w8(w)
        }
        Punpcklbw => from_b16(std::array::from_fn(|k| {
            if k % 2 == 0 { ab[k / 2] } else { sb[k / 2] }
        })),
        Punpckhbw => from_b16(std::array::from_fn(|k| {
            if k % 2 == 0 {
                ab[8 + k / 2]
            } else {
                sb[8 + k / 2]
            }
        })),
        Punpcklwd => from_w8(std::array::from_fn(|k| {
            if k % 2 == 0 { aw[k / 2] } else { sw[k / 2] }
        })),
        Punpckhwd => from_w8(std::array::from_fn(|k| {
            if k % 2 == 0 {
                aw[4 + k / 2]
            } else {
                sw[4 + k / 2]
            }
        })),
        Punpckldq | Unpcklps => from_d4([ad[0], sd[0], ad[1], sd[1]]),
        Punpckhdq | Unpckhps => from_d4([ad[2], sd[2], ad[3], sd[3]]),
        Punpcklqdq | Unpcklpd => from_q2([aq[0], sq[0]]),
        Punpckhqdq | Unpckhpd => from_q2([aq[1], sq[1]]),
        Packsswb => from_b16(std::array::from_fn(|k| {
            let v = if k < 8 { aw[k] } else { sw[k - 8] };
            sat_i8(i32::from(v as i16))
        })),
        Packuswb => from_b16(std::array::from_fn(|k| {
            let v = if k < 8 { aw[k] } else { sw[k - 8] };
            sat_u8(i32::from(v as i16))
        })),
        Packssdw => from_w8(std::array::from_fn(|k| {
            let v = if k < 4 { ad[k] } else { sd[k - 4] };
            sat_i16((v as i32).clamp(-32768, 32767))
        })),
        Shufps => {
            let imm = ins.immediate8();
            let sel = |x: [u32; 4], k: u8| x[usize::from((imm >> (2 * k)) & 3)];
            from_d4([sel(ad, 0), sel(ad, 1), sel(sd, 2), sel(sd, 3)])
        }
        Shufpd => {
            let imm = ins.immediate8();
            from_q2([aq[usize::from(imm & 1)], sq[usize::from((imm >> 1) & 1)]])
        }
        _ => return Err(Ex::UD),
    };
    let _ = sat_u16;
    cpu.xmm[d] = r;
    Ok(())
}
