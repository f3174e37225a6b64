//! SSE/SSE2 instructions checked against the host CPU: the same instruction runs natively
//! (inline asm) and in the interpreter on the same operands.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(target_arch = "x86_64")]

mod common;

use std::arch::asm;
use std::arch::x86_64::__m128i;

use common::*;
use iced_x86::code_asm::*;
use keel_accel::VcpuExit;

const DATA: u64 = 0x20_0000;

fn to_m(v: u128) -> __m128i {
    // SAFETY: __m128i and u128 are both 16 plain bytes.
    unsafe { std::mem::transmute::<u128, __m128i>(v) }
}
fn from_m(v: __m128i) -> u128 {
    // SAFETY: as above.
    unsafe { std::mem::transmute::<__m128i, u128>(v) }
}

/// Runs `op xmm0, xmm1` in the guest; returns xmm0 and the low 6 status flags.
fn guest(op: &dyn Fn(&mut CodeAssembler), x: u128, y: u128) -> (u128, u64, u64) {
    let mut h = Harness::new(4);
    let code = asm(64, CODE, |a| {
        a.mov(rsi, DATA).unwrap();
        a.movdqu(xmm0, xmmword_ptr(rsi)).unwrap();
        a.movdqu(xmm1, xmmword_ptr(rsi + 16)).unwrap();
        a.xor(eax, eax).unwrap();
        op(a);
        a.movdqu(xmmword_ptr(rsi + 32), xmm0).unwrap();
        a.pushfq().unwrap();
        a.pop(rbx).unwrap();
        a.hlt().unwrap();
    });
    h.long_mode(&code);
    h.write(DATA, &x.to_le_bytes());
    h.write(DATA + 16, &y.to_le_bytes());
    assert_eq!(h.run(), VcpuExit::Halted, "{:x?}", h.vcpu.last_exception());
    let mut b = [0u8; 16];
    for (k, v) in b.iter_mut().enumerate() {
        let q = h.r64(DATA + 32 + (k as u64 & !7));
        *v = (q >> (8 * (k % 8))) as u8;
    }
    let r = h.regs();
    (u128::from_le_bytes(b), r.rax, r.rbx & 0x8d5)
}

macro_rules! xx {
    ($m:ident, $txt:literal) => {
        (
            $txt,
            Box::new(|a: &mut CodeAssembler| {
                a.$m(xmm0, xmm1).unwrap();
            }) as Box<dyn Fn(&mut CodeAssembler)>,
            Box::new(|x: u128, y: u128| -> (u128, u64, u64) {
                let mut r = to_m(x);
                let f: u64;
                // SAFETY: a pure SSE2 register operation on local values.
                unsafe {
                    asm!(concat!($txt, " {0}, {1}"), "pushfq", "pop {2}", inout(xmm_reg) r, in(xmm_reg) to_m(y), out(reg) f)
                };
                (from_m(r), 0, f & 0x8d5)
            }) as Box<dyn Fn(u128, u128) -> (u128, u64, u64)>,
        )
    };
}

macro_rules! xi {
    ($m:ident, $txt:literal, $imm:literal) => {
        (
            concat!($txt, " ", stringify!($imm)),
            Box::new(|a: &mut CodeAssembler| {
                a.$m(xmm0, xmm1, $imm).unwrap();
            }) as Box<dyn Fn(&mut CodeAssembler)>,
            Box::new(|x: u128, y: u128| -> (u128, u64, u64) {
                let mut r = to_m(x);
                // SAFETY: a pure SSE2 register operation on local values.
                unsafe { asm!(concat!($txt, " {0}, {1}, ", stringify!($imm)), inout(xmm_reg) r, in(xmm_reg) to_m(y)) };
                (from_m(r), 0, 0)
            }) as Box<dyn Fn(u128, u128) -> (u128, u64, u64)>,
        )
    };
}

macro_rules! shift_imm {
    ($m:ident, $txt:literal, $imm:literal) => {
        (
            concat!($txt, " ", stringify!($imm)),
            Box::new(|a: &mut CodeAssembler| {
                a.$m(xmm0, $imm).unwrap();
            }) as Box<dyn Fn(&mut CodeAssembler)>,
            Box::new(|x: u128, _y: u128| -> (u128, u64, u64) {
                let mut r = to_m(x);
                // SAFETY: a pure SSE2 register operation on a local value.
                unsafe { asm!(concat!($txt, " {0}, ", stringify!($imm)), inout(xmm_reg) r) };
                (from_m(r), 0, 0)
            }) as Box<dyn Fn(u128, u128) -> (u128, u64, u64)>,
        )
    };
}

macro_rules! to_gpr {
    ($m:ident, $txt:literal) => {
        (
            $txt,
            Box::new(|a: &mut CodeAssembler| {
                a.$m(eax, xmm0).unwrap();
            }) as Box<dyn Fn(&mut CodeAssembler)>,
            Box::new(|x: u128, _y: u128| -> (u128, u64, u64) {
                let g: u64;
                // SAFETY: a pure SSE2 register operation on a local value.
                unsafe { asm!(concat!($txt, " {0:e}, {1}"), out(reg) g, in(xmm_reg) to_m(x)) };
                (x, g, 0)
            }) as Box<dyn Fn(u128, u128) -> (u128, u64, u64)>,
        )
    };
}

type Case = (
    &'static str,
    Box<dyn Fn(&mut CodeAssembler)>,
    Box<dyn Fn(u128, u128) -> (u128, u64, u64)>,
);

fn cases() -> Vec<Case> {
    vec![
        xx!(pxor, "pxor"),
        xx!(por, "por"),
        xx!(pand, "pand"),
        xx!(pandn, "pandn"),
        xx!(paddb, "paddb"),
        xx!(paddw, "paddw"),
        xx!(paddd, "paddd"),
        xx!(paddq, "paddq"),
        xx!(psubb, "psubb"),
        xx!(psubw, "psubw"),
        xx!(psubd, "psubd"),
        xx!(psubq, "psubq"),
        xx!(paddusb, "paddusb"),
        xx!(paddusw, "paddusw"),
        xx!(psubusb, "psubusb"),
        xx!(psubusw, "psubusw"),
        xx!(paddsb, "paddsb"),
        xx!(paddsw, "paddsw"),
        xx!(psubsb, "psubsb"),
        xx!(psubsw, "psubsw"),
        xx!(pmullw, "pmullw"),
        xx!(pmulhw, "pmulhw"),
        xx!(pmulhuw, "pmulhuw"),
        xx!(pmuludq, "pmuludq"),
        xx!(pmaddwd, "pmaddwd"),
        xx!(pavgb, "pavgb"),
        xx!(pavgw, "pavgw"),
        xx!(pminub, "pminub"),
        xx!(pmaxub, "pmaxub"),
        xx!(pminsw, "pminsw"),
        xx!(pmaxsw, "pmaxsw"),
        xx!(psadbw, "psadbw"),
        xx!(pcmpeqb, "pcmpeqb"),
        xx!(pcmpeqw, "pcmpeqw"),
        xx!(pcmpeqd, "pcmpeqd"),
        xx!(pcmpgtb, "pcmpgtb"),
        xx!(pcmpgtw, "pcmpgtw"),
        xx!(pcmpgtd, "pcmpgtd"),
        xx!(psllw, "psllw"),
        xx!(pslld, "pslld"),
        xx!(psllq, "psllq"),
        xx!(psrlw, "psrlw"),
        xx!(psrld, "psrld"),
        xx!(psrlq, "psrlq"),
        xx!(psraw, "psraw"),
        xx!(psrad, "psrad"),
        xx!(punpcklbw, "punpcklbw"),
        xx!(punpcklwd, "punpcklwd"),
        xx!(punpckldq, "punpckldq"),
        xx!(punpcklqdq, "punpcklqdq"),
        xx!(punpckhbw, "punpckhbw"),
        xx!(punpckhwd, "punpckhwd"),
        xx!(punpckhdq, "punpckhdq"),
        xx!(punpckhqdq, "punpckhqdq"),
        xx!(packsswb, "packsswb"),
        xx!(packssdw, "packssdw"),
        xx!(packuswb, "packuswb"),
        xx!(unpcklps, "unpcklps"),
        xx!(unpckhps, "unpckhps"),
        xx!(unpcklpd, "unpcklpd"),
        xx!(unpckhpd, "unpckhpd"),
        xx!(xorps, "xorps"),
        xx!(andps, "andps"),
        xx!(andnps, "andnps"),
        xx!(orps, "orps"),
        xx!(movss, "movss"),
        xx!(movsd_2, "movsd"),
        xx!(movhlps, "movhlps"),
        xx!(movlhps, "movlhps"),
        xx!(addsd, "addsd"),
        xx!(subsd, "subsd"),
        xx!(mulsd, "mulsd"),
        xx!(divsd, "divsd"),
        xx!(addss, "addss"),
        xx!(mulss, "mulss"),
        xx!(addpd, "addpd"),
        xx!(mulps, "mulps"),
        xx!(minsd, "minsd"),
        xx!(maxsd, "maxsd"),
        xx!(ucomisd, "ucomisd"),
        xx!(comiss, "comiss"),
        xx!(cvtsd2ss, "cvtsd2ss"),
        xx!(cvtss2sd, "cvtss2sd"),
        xx!(cvtdq2pd, "cvtdq2pd"),
        xx!(cvttpd2dq, "cvttpd2dq"),
        xx!(cvtdq2ps, "cvtdq2ps"),
        xx!(cvttps2dq, "cvttps2dq"),
        xx!(movq, "movq"),
        xi!(pshufd, "pshufd", 0x1b),
        xi!(pshufd, "pshufd", 0x00),
        xi!(pshuflw, "pshuflw", 0x1b),
        xi!(pshufhw, "pshufhw", 0xe4),
        xi!(shufps, "shufps", 0x4e),
        xi!(shufpd, "shufpd", 0x1),
        xi!(cmpsd_3, "cmpsd", 1),
        xi!(cmpps, "cmpps", 2),
        shift_imm!(pslldq, "pslldq", 3),
        shift_imm!(psrldq, "psrldq", 5),
        shift_imm!(psllw, "psllw", 3),
        shift_imm!(psrld, "psrld", 7),
        shift_imm!(psraw, "psraw", 15),
        shift_imm!(psrad, "psrad", 33),
        shift_imm!(psllq, "psllq", 63),
        to_gpr!(pmovmskb, "pmovmskb"),
        to_gpr!(movmskps, "movmskps"),
        to_gpr!(movmskpd, "movmskpd"),
    ]
}

fn values() -> Vec<(u128, u128)> {
    let mut seed = 0x1234_5678_9abc_def0_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut v = vec![
        (0, 0),
        (u128::MAX, 1),
        (
            0x0000_0000_4000_0000_3ff0_0000_0000_0000,
            0x4008_0000_0000_0000_c000_0000_0000_0000,
        ),
        (
            0x6162_0063_6465_6600_6800_6a6b_6c00_6e6f,
            0x0000_0000_0000_0000_0000_0000_0000_0000,
        ),
        (
            0x8000_7fff_ff80_007f_0102_0304_fffe_8001,
            0x7fff_8000_0080_ff7f_0403_0201_0002_7ffe,
        ),
        (
            0x3f80_0000_4000_0000_c040_0000_0000_0000,
            0x0000_0000_0000_0000_3fc0_0000_3f80_0000,
        ),
    ];
    for _ in 0..6 {
        let a = (u128::from(next()) << 64) | u128::from(next());
        let b = (u128::from(next()) << 64) | u128::from(next());
        v.push((a, b));
    }
    v
}

#[test]
fn sse2_matches_host() {
    let mut bad = Vec::new();
    for (name, g, n) in cases() {
        for (x, y) in values() {
            let want = n(x, y);
            let got = guest(&*g, x, y);
            // Flags only for the compares that set them.
            let flags_matter = name.contains("comis");
            let ok = got.0 == want.0 && got.1 == want.1 && (!flags_matter || got.2 == want.2);
            if !ok {
                bad.push(format!(
                    "{name} x={x:032x} y={y:032x}: got {got:x?} want {want:x?}"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
