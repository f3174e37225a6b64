//! x87 basics and FXSAVE/FXRSTOR.
//!
//! Registers are kept as `f64`, so 80-bit values lose precision beyond 53 bits of mantissa
//! (loads and stores of m80 convert). Exceptions are not raised (the default control word
//! masks them all); C0-C3 are set by compares and `fxam`/`ftst`.

use iced_x86::{Mnemonic as M, OpKind, Register};

use super::operands::ea;
use crate::cpu::{Cpu, fl};
use crate::exc::{Ex, Flow};
use crate::insn::{Insn, gpr};
use crate::regs::cr0;

/// Converts an 80-bit extended value to f64.
pub fn f80_to_f64(b: [u8; 10]) -> f64 {
    let mant = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let se = u16::from_le_bytes([b[8], b[9]]);
    let sign = se & 0x8000 != 0;
    let exp = i32::from(se & 0x7fff);
    let v = if exp == 0 && mant == 0 {
        0.0
    } else if exp == 0x7fff {
        if mant << 1 == 0 {
            f64::INFINITY
        } else {
            f64::NAN
        }
    } else {
        (mant as f64) * 2f64.powi(exp - 16383 - 63)
    };
    if sign { -v } else { v }
}

/// Converts f64 to the 80-bit extended format.
pub fn f64_to_f80(v: f64) -> [u8; 10] {
    let bits = v.to_bits();
    let sign = (bits >> 63) as u16;
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1 << 52) - 1);
    let (e, m) = if exp == 0 && frac == 0 {
        (0u16, 0u64)
    } else if exp == 0x7ff {
        (
            0x7fff,
            if frac == 0 {
                1 << 63
            } else {
                (1 << 63) | (1 << 62) | (frac << 11)
            },
        )
    } else if exp == 0 {
        // Subnormal double: normalise.
        let lz = frac.leading_zeros() as i32;
        let m = frac << lz;
        ((-1022 - (lz - 11) + 16383 - 1 + 1) as u16, m)
    } else {
        ((exp - 1023 + 16383) as u16, (1 << 63) | (frac << 11))
    };
    let mut out = [0u8; 10];
    out[..8].copy_from_slice(&m.to_le_bytes());
    out[8..].copy_from_slice(&((sign << 15) | e).to_le_bytes());
    out
}

impl Cpu {
    fn st(&self, i: u8) -> f64 {
        self.fpu.st[usize::from((self.fpu.top + i) & 7)]
    }
    fn set_st(&mut self, i: u8, v: f64) {
        let k = (self.fpu.top + i) & 7;
        self.fpu.st[usize::from(k)] = v;
        self.fpu.tags |= 1 << k;
    }
    fn fpush(&mut self, v: f64) {
        self.fpu.top = (self.fpu.top + 7) & 7;
        self.set_st(0, v);
    }
    fn fpop(&mut self) {
        self.fpu.tags &= !(1 << self.fpu.top);
        self.fpu.top = (self.fpu.top + 1) & 7;
    }
    /// The full FPU status word.
    pub fn fsw(&self) -> u16 {
        (self.fpu.sw & !0x3800) | (u16::from(self.fpu.top) << 11)
    }
    fn set_fcc(&mut self, c0: bool, c2: bool, c3: bool) {
        self.fpu.sw &= !0x4500;
        self.fpu.sw |= u16::from(c0) << 8 | u16::from(c2) << 10 | u16::from(c3) << 14;
    }
}

/// `fwait`: raises #NM when CR0.MP and CR0.TS are both set.
pub fn fwait(cpu: &mut Cpu) -> Flow {
    if cpu.cr0 & (cr0::MP | cr0::TS) == (cr0::MP | cr0::TS) {
        return Err(Ex::NM);
    }
    Ok(())
}

fn sti(r: Register) -> Option<u8> {
    let n = r as u32;
    let b = Register::ST0 as u32;
    (b..b + 8).contains(&n).then(|| (n - b) as u8)
}

fn load_mem(cpu: &mut Cpu, i: &Insn) -> Result<f64, Ex> {
    use iced_x86::MemorySize as Ms;
    let a = ea(cpu, i);
    Ok(match i.instr.memory_size() {
        Ms::Float32 => f64::from(f32::from_bits(cpu.rd::<4>(a)? as u32)),
        Ms::Float64 => f64::from_bits(cpu.rd::<8>(a)?),
        Ms::Float80 => {
            let mut b = [0u8; 10];
            let u = cpu.mmu.user;
            cpu.read_bytes(a, &mut b, u)?;
            f80_to_f64(b)
        }
        Ms::Int16 => f64::from(cpu.rd::<2>(a)? as i16),
        Ms::Int32 => f64::from(cpu.rd::<4>(a)? as i32),
        Ms::Int64 => cpu.rd::<8>(a)? as i64 as f64,
        _ => return Err(Ex::UD),
    })
}

fn round_fpu(cpu: &Cpu, v: f64) -> f64 {
    match (cpu.fpu.cw >> 10) & 3 {
        0 => v.round_ties_even(),
        1 => v.floor(),
        2 => v.ceil(),
        _ => v.trunc(),
    }
}

fn store_mem(cpu: &mut Cpu, i: &Insn, v: f64, trunc: bool) -> Flow {
    use iced_x86::MemorySize as Ms;
    let a = ea(cpu, i);
    let iv = |cpu: &Cpu, lo: f64, hi: f64, indef: i64| -> i64 {
        let r = if trunc { v.trunc() } else { round_fpu(cpu, v) };
        if r.is_nan() || r < lo || r > hi {
            indef
        } else {
            r as i64
        }
    };
    match i.instr.memory_size() {
        Ms::Float32 => cpu.wr::<4>(a, u64::from((v as f32).to_bits())),
        Ms::Float64 => cpu.wr::<8>(a, v.to_bits()),
        Ms::Float80 => {
            let u = cpu.mmu.user;
            cpu.write_bytes(a, &f64_to_f80(v), u)
        }
        Ms::Int16 => {
            let x = iv(cpu, -32768.0, 32767.0, -32768);
            cpu.wr::<2>(a, x as u64)
        }
        Ms::Int32 => {
            let x = iv(cpu, -2_147_483_648.0, 2_147_483_647.0, i64::from(i32::MIN));
            cpu.wr::<4>(a, x as u64)
        }
        Ms::Int64 => {
            let x = iv(
                cpu,
                -9.223_372_036_854_776e18,
                9.223_372_036_854_775e18,
                i64::MIN,
            );
            cpu.wr::<8>(a, x as u64)
        }
        _ => Err(Ex::UD),
    }
}

fn compare(cpu: &mut Cpu, a: f64, b: f64, eflags: bool) {
    let (c0, c2, c3) = if a.is_nan() || b.is_nan() {
        (true, true, true)
    } else if a < b {
        (true, false, false)
    } else if a == b {
        (false, false, true)
    } else {
        (false, false, false)
    };
    if eflags {
        let f = (cpu.flags() & !(fl::ZF | fl::PF | fl::CF | fl::OF | fl::SF | fl::AF))
            | if c0 { fl::CF } else { 0 }
            | if c2 { fl::PF } else { 0 }
            | if c3 { fl::ZF } else { 0 };
        cpu.set_arith_flags(f);
    } else {
        cpu.set_fcc(c0, c2, c3);
    }
}

/// Executes an x87 instruction or FXSAVE/FXRSTOR; `None` when `i` is not one.
pub fn exec_x87(cpu: &mut Cpu, i: &Insn) -> Option<Flow> {
    let ins = &i.instr;
    let m = ins.mnemonic();
    let is_fpu = matches!(
        m,
        M::Fninit
            | M::Finit
            | M::Fnstcw
            | M::Fstcw
            | M::Fldcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnclex
            | M::Fclex
            | M::Fld
            | M::Fst
            | M::Fstp
            | M::Fild
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr
            | M::Fchs
            | M::Fabs
            | M::Fsqrt
            | M::Fxch
            | M::Fld1
            | M::Fldz
            | M::Fldpi
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Ftst
            | M::Fxam
            | M::Frndint
            | M::Ffree
            | M::Fnop
            | M::Fincstp
            | M::Fdecstp
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Fscale
            | M::Fprem
            | M::Fprem1
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
            | M::Fxtract
            | M::F2xm1
            | M::Fyl2x
            | M::Fptan
            | M::Fpatan
            | M::Fsin
            | M::Fcos
            | M::Fsincos
            | M::Emms
    );
    if !is_fpu {
        return None;
    }
    if cpu.cr0 & cr0::EM != 0 && !matches!(m, M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64) {
        return Some(Err(Ex::NM));
    }
    if cpu.cr0 & cr0::TS != 0 {
        return Some(Err(Ex::NM));
    }
    Some(x87(cpu, i, m))
}

fn x87(cpu: &mut Cpu, i: &Insn, m: M) -> Flow {
    let ins = &i.instr;
    let mem = ins.op_count() >= 1 && ins.op_kind(0) == OpKind::Memory;
    let reg = |k: u32| {
        if ins.op_count() > k && ins.op_kind(k) == OpKind::Register {
            sti(ins.op_register(k))
        } else {
            None
        }
    };
    cpu.fpu.fop = 0;
    match m {
        M::Fninit | M::Finit => {
            cpu.fpu = crate::cpu::Fpu::default();
        }
        M::Fnstcw | M::Fstcw => {
            let a = ea(cpu, i);
            cpu.wr::<2>(a, u64::from(cpu.fpu.cw))?;
        }
        M::Fldcw => {
            let a = ea(cpu, i);
            cpu.fpu.cw = cpu.rd::<2>(a)? as u16;
        }
        M::Fnstsw | M::Fstsw => {
            let v = u64::from(cpu.fsw());
            if mem {
                let a = ea(cpu, i);
                cpu.wr::<2>(a, v)?;
            } else {
                cpu.wreg(0, 2, v);
            }
        }
        M::Fnclex | M::Fclex => cpu.fpu.sw &= 0x7f00 & !0x80,
        M::Fld => {
            let v = if mem {
                load_mem(cpu, i)?
            } else {
                cpu.st(reg(0).unwrap_or(0))
            };
            cpu.fpush(v);
        }
        M::Fild => {
            let v = load_mem(cpu, i)?;
            cpu.fpush(v);
        }
        M::Fst | M::Fstp | M::Fist | M::Fistp | M::Fisttp => {
            let v = cpu.st(0);
            if mem {
                store_mem(cpu, i, v, m == M::Fisttp)?;
            } else {
                let r = reg(0).unwrap_or(0);
                cpu.set_st(r, v);
            }
            if matches!(m, M::Fstp | M::Fistp | M::Fisttp) {
                cpu.fpop();
            }
        }
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => {
            let (d, a, b) = if mem {
                let v = load_mem(cpu, i)?;
                (0, cpu.st(0), v)
            } else if ins.op_count() == 2 {
                let d = reg(0).unwrap_or(0);
                let s = reg(1).unwrap_or(0);
                (d, cpu.st(d), cpu.st(s))
            } else {
                (1, cpu.st(1), cpu.st(0))
            };
            let r = match m {
                M::Fadd | M::Faddp | M::Fiadd => a + b,
                M::Fsub | M::Fsubp | M::Fisub => a - b,
                M::Fsubr | M::Fsubrp | M::Fisubr => b - a,
                M::Fmul | M::Fmulp | M::Fimul => a * b,
                M::Fdiv | M::Fdivp | M::Fidiv => a / b,
                _ => b / a,
            };
            cpu.set_st(d, r);
            if matches!(
                m,
                M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
            ) {
                cpu.fpop();
            }
        }
        M::Fchs => cpu.set_st(0, -cpu.st(0)),
        M::Fabs => cpu.set_st(0, cpu.st(0).abs()),
        M::Fsqrt => cpu.set_st(0, cpu.st(0).sqrt()),
        M::Frndint => {
            let v = round_fpu(cpu, cpu.st(0));
            cpu.set_st(0, v);
        }
        M::Fscale => {
            let s = cpu.st(1).trunc();
            cpu.set_st(0, cpu.st(0) * 2f64.powf(s));
        }
        M::Fprem | M::Fprem1 => {
            let (a, b) = (cpu.st(0), cpu.st(1));
            let r = if m == M::Fprem {
                a % b
            } else {
                a - b * (a / b).round_ties_even()
            };
            cpu.set_st(0, r);
            cpu.set_fcc(false, false, false);
        }
        M::Fxch => {
            let r = reg(1).or(reg(0)).unwrap_or(1);
            let (a, b) = (cpu.st(0), cpu.st(r));
            cpu.set_st(0, b);
            cpu.set_st(r, a);
        }
        M::Fld1 => cpu.fpush(1.0),
        M::Fldz => cpu.fpush(0.0),
        M::Fldpi => cpu.fpush(std::f64::consts::PI),
        M::Fldl2e => cpu.fpush(std::f64::consts::LOG2_E),
        M::Fldl2t => cpu.fpush(std::f64::consts::LOG2_10),
        M::Fldlg2 => cpu.fpush(std::f64::consts::LOG10_2),
        M::Fldln2 => cpu.fpush(std::f64::consts::LN_2),
        M::F2xm1 => cpu.set_st(0, cpu.st(0).exp2() - 1.0),
        M::Fyl2x => {
            let r = cpu.st(1) * cpu.st(0).log2();
            cpu.fpop();
            cpu.set_st(0, r);
        }
        M::Fsin => cpu.set_st(0, cpu.st(0).sin()),
        M::Fcos => cpu.set_st(0, cpu.st(0).cos()),
        M::Fptan => {
            cpu.set_st(0, cpu.st(0).tan());
            cpu.fpush(1.0);
        }
        M::Fpatan => {
            let r = cpu.st(1).atan2(cpu.st(0));
            cpu.fpop();
            cpu.set_st(0, r);
        }
        M::Fsincos => {
            let v = cpu.st(0);
            cpu.set_st(0, v.sin());
            cpu.fpush(v.cos());
        }
        M::Fxtract => {
            let v = cpu.st(0);
            let e = if v == 0.0 {
                f64::NEG_INFINITY
            } else {
                v.abs().log2().floor()
            };
            cpu.set_st(0, e);
            cpu.fpush(v / 2f64.powf(e));
        }
        M::Fcom | M::Fcomp | M::Fcompp | M::Fucom | M::Fucomp | M::Fucompp => {
            let b = if mem {
                load_mem(cpu, i)?
            } else {
                cpu.st(reg(1).or(reg(0)).unwrap_or(1))
            };
            let a = cpu.st(0);
            compare(cpu, a, b, false);
            if matches!(m, M::Fcomp | M::Fucomp) {
                cpu.fpop();
            }
            if matches!(m, M::Fcompp | M::Fucompp) {
                cpu.fpop();
                cpu.fpop();
            }
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            let b = cpu.st(reg(1).unwrap_or(1));
            let a = cpu.st(0);
            compare(cpu, a, b, true);
            if matches!(m, M::Fcomip | M::Fucomip) {
                cpu.fpop();
            }
        }
        M::Fcmovb
        | M::Fcmove
        | M::Fcmovbe
        | M::Fcmovu
        | M::Fcmovnb
        | M::Fcmovne
        | M::Fcmovnbe
        | M::Fcmovnu => {
            let c = match m {
                M::Fcmovb => cpu.cf(),
                M::Fcmove => cpu.zf(),
                M::Fcmovbe => cpu.cf() || cpu.zf(),
                M::Fcmovu => cpu.pf(),
                M::Fcmovnb => !cpu.cf(),
                M::Fcmovne => !cpu.zf(),
                M::Fcmovnbe => !(cpu.cf() || cpu.zf()),
                _ => !cpu.pf(),
            };
            if c {
                let v = cpu.st(reg(1).unwrap_or(1));
                cpu.set_st(0, v);
            }
        }
        M::Ftst => {
            let a = cpu.st(0);
            compare(cpu, a, 0.0, false);
        }
        M::Fxam => {
            let v = cpu.st(0);
            let empty = cpu.fpu.tags & (1 << cpu.fpu.top) == 0;
            let (c3, c2, c0) = if empty {
                (true, false, true)
            } else if v.is_nan() {
                (false, false, true)
            } else if v.is_infinite() {
                (false, true, true)
            } else if v == 0.0 {
                (true, false, false)
            } else {
                (false, true, false)
            };
            cpu.set_fcc(c0, c2, c3);
            cpu.fpu.sw = (cpu.fpu.sw & !0x200) | (u16::from(v.is_sign_negative()) << 9);
        }
        M::Ffree => {
            let r = reg(0).unwrap_or(0);
            cpu.fpu.tags &= !(1 << ((cpu.fpu.top + r) & 7));
        }
        M::Fnop => {}
        // EMMS marks every x87 register empty (Linux runs it on AMD to scrub FIP/FDP).
        M::Emms => cpu.fpu.tags = 0,
        M::Fincstp => cpu.fpu.top = (cpu.fpu.top + 1) & 7,
        M::Fdecstp => cpu.fpu.top = (cpu.fpu.top + 7) & 7,
        M::Fnstenv | M::Fstenv => {
            let a = ea(cpu, i);
            let tw = full_tag_word(cpu);
            cpu.wr::<4>(a, u64::from(cpu.fpu.cw))?;
            cpu.wr::<4>(a.wrapping_add(4), u64::from(cpu.fsw()))?;
            cpu.wr::<4>(a.wrapping_add(8), u64::from(tw))?;
            for k in 3..7 {
                cpu.wr::<4>(a.wrapping_add(4 * k), 0)?;
            }
            cpu.fpu.cw |= 0x3f;
        }
        M::Fldenv => {
            let a = ea(cpu, i);
            cpu.fpu.cw = cpu.rd::<2>(a)? as u16;
            let sw = cpu.rd::<2>(a.wrapping_add(4))? as u16;
            let tw = cpu.rd::<2>(a.wrapping_add(8))? as u16;
            cpu.fpu.sw = sw;
            cpu.fpu.top = ((sw >> 11) & 7) as u8;
            cpu.fpu.tags = (0..8).fold(0u8, |t, k| t | (u8::from((tw >> (2 * k)) & 3 != 3) << k));
        }
        M::Fxsave | M::Fxsave64 => fxsave(cpu, i)?,
        M::Fxrstor | M::Fxrstor64 => {
            fxrstor(cpu, i)?;
            return Err(Ex::EndBlock);
        }
        _ => return Err(Ex::UD),
    }
    let _ = gpr;
    Ok(())
}

fn full_tag_word(cpu: &Cpu) -> u16 {
    (0..8).fold(0u16, |t, k| {
        let tag = if cpu.fpu.tags & (1 << k) == 0 {
            3
        } else if cpu.fpu.st[k] == 0.0 {
            1
        } else if cpu.fpu.st[k].is_finite() {
            0
        } else {
            2
        };
        t | (tag << (2 * k))
    })
}

fn fxsave(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = ea(cpu, i);
    if a & 15 != 0 {
        return Err(Ex::gp(0));
    }
    let mut img = [0u8; 512];
    img[0..2].copy_from_slice(&cpu.fpu.cw.to_le_bytes());
    img[2..4].copy_from_slice(&cpu.fsw().to_le_bytes());
    img[4] = cpu.fpu.tags;
    img[6..8].copy_from_slice(&cpu.fpu.fop.to_le_bytes());
    img[24..28].copy_from_slice(&cpu.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for k in 0..8u8 {
        let v = cpu.st(k);
        let o = 32 + 16 * usize::from(k);
        img[o..o + 10].copy_from_slice(&f64_to_f80(v));
    }
    let nx = if cpu.code64() { 16 } else { 8 };
    for k in 0..nx {
        let o = 160 + 16 * k;
        img[o..o + 16].copy_from_slice(&cpu.xmm[k].to_le_bytes());
    }
    // Probe both ends first so a fault leaves memory untouched.
    let u = cpu.mmu.user;
    cpu.translate(a, crate::mem::Access::Write, u)?;
    cpu.translate(a.wrapping_add(511), crate::mem::Access::Write, u)?;
    for (k, c) in img.chunks(16).enumerate() {
        cpu.write_bytes(a.wrapping_add(16 * k as u64), c, u)?;
    }
    Ok(())
}

fn fxrstor(cpu: &mut Cpu, i: &Insn) -> Flow {
    let a = ea(cpu, i);
    if a & 15 != 0 {
        return Err(Ex::gp(0));
    }
    let mut img = [0u8; 512];
    let u = cpu.mmu.user;
    for k in 0..32 {
        cpu.read_bytes(
            a.wrapping_add(16 * k as u64),
            &mut img[16 * k..16 * k + 16],
            u,
        )?;
    }
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    if mxcsr & !0xffff != 0 {
        return Err(Ex::gp(0));
    }
    cpu.mxcsr = mxcsr;
    cpu.fpu.cw = u16::from_le_bytes([img[0], img[1]]);
    let sw = u16::from_le_bytes([img[2], img[3]]);
    cpu.fpu.sw = sw;
    cpu.fpu.top = ((sw >> 11) & 7) as u8;
    cpu.fpu.tags = img[4];
    cpu.fpu.fop = u16::from_le_bytes([img[6], img[7]]);
    for k in 0..8u8 {
        let o = 32 + 16 * usize::from(k);
        let mut b = [0u8; 10];
        b.copy_from_slice(&img[o..o + 10]);
        let idx = usize::from((cpu.fpu.top + k) & 7);
        cpu.fpu.st[idx] = f80_to_f64(b);
    }
    let nx = if cpu.code64() { 16 } else { 8 };
    for k in 0..nx {
        let o = 160 + 16 * k;
        let mut b = [0u8; 16];
        b.copy_from_slice(&img[o..o + 16]);
        cpu.xmm[k] = u128::from_le_bytes(b);
    }
    Ok(())
}
