//! SSE/SSE2 integer and floating-point instructions, x87 basics and `fxsave`, run in user
//! mode (CPL 3, where KVM-PVM executes natively, so kvm is a hardware oracle there) and
//! predicted by Rust: lane-wise integer ops, IEEE double/single arithmetic (Rust's `f64`/
//! `f32` round to nearest even like SSE's default MXCSR), x87 on exact integers.

use iced_x86::code_asm::*;

use crate::asm::{Guest, Mode, R, hash_u64s, layout};
use crate::{GuestError, TestGuest};

const A: [u64; 2] = [0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff];
const B: [u64; 2] = [0x0102_0304_0506_0708, 0xf0e0_d0c0_b0a0_9080];
const FA: f64 = 1.5;
const FB: f64 = -2.25;
const PS_A: [f32; 4] = [1.0, -2.5, 3.25, 1e10];
const PS_B: [f32; 4] = [0.5, 4.0, -1.75, 3.0];

type V = [u64; 2];

fn bytes(v: V) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&v[0].to_le_bytes());
    b[8..].copy_from_slice(&v[1].to_le_bytes());
    b
}

fn from_bytes(b: [u8; 16]) -> V {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

/// Applies `f` to each lane of `bits` width.
fn lanes(a: V, b: V, bits: u32, f: impl Fn(u64, u64) -> u64) -> V {
    let n = 128 / bits as usize;
    let m = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let get = |v: V, i: usize| -> u64 {
        let bit = i * bits as usize;
        (v[bit / 64] >> (bit % 64)) & m
    };
    let mut out = [0u64; 2];
    for i in 0..n {
        let bit = i * bits as usize;
        out[bit / 64] |= (f(get(a, i), get(b, i)) & m) << (bit % 64);
    }
    out
}

fn sx(v: u64, bits: u32) -> i64 {
    let s = 64 - bits;
    ((v << s) as i64) >> s
}

/// One SSE2 integer case: name, the instruction applied to xmm0 (= A) with xmm1 (= B), and
/// the predicted xmm0.
type IntCase = (&'static str, fn(&mut CodeAssembler) -> R, V);

fn int_cases() -> Vec<IntCase> {
    vec![
        (
            "paddb",
            |a| a.paddb(xmm0, xmm1),
            lanes(A, B, 8, |x, y| x + y),
        ),
        (
            "paddd",
            |a| a.paddd(xmm0, xmm1),
            lanes(A, B, 32, |x, y| x + y),
        ),
        (
            "paddq",
            |a| a.paddq(xmm0, xmm1),
            lanes(A, B, 64, |x, y| x.wrapping_add(y)),
        ),
        (
            "psubw",
            |a| a.psubw(xmm0, xmm1),
            lanes(A, B, 16, |x, y| x.wrapping_sub(y)),
        ),
        (
            "pmullw",
            |a| a.pmullw(xmm0, xmm1),
            lanes(A, B, 16, |x, y| x * y),
        ),
        (
            "pmuludq",
            |a| a.pmuludq(xmm0, xmm1),
            lanes(A, B, 64, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        ),
        (
            "pand",
            |a| a.pand(xmm0, xmm1),
            lanes(A, B, 64, |x, y| x & y),
        ),
        (
            "pandn",
            |a| a.pandn(xmm0, xmm1),
            lanes(A, B, 64, |x, y| !x & y),
        ),
        ("por", |a| a.por(xmm0, xmm1), lanes(A, B, 64, |x, y| x | y)),
        (
            "pxor",
            |a| a.pxor(xmm0, xmm1),
            lanes(A, B, 64, |x, y| x ^ y),
        ),
        (
            "pcmpeqb",
            |a| a.pcmpeqb(xmm0, xmm1),
            lanes(A, B, 8, |x, y| if x == y { 0xff } else { 0 }),
        ),
        (
            "pcmpgtd",
            |a| a.pcmpgtd(xmm0, xmm1),
            lanes(A, B, 32, |x, y| {
                if sx(x, 32) > sx(y, 32) {
                    0xffff_ffff
                } else {
                    0
                }
            }),
        ),
        (
            "pmaxub",
            |a| a.pmaxub(xmm0, xmm1),
            lanes(A, B, 8, |x, y| x.max(y)),
        ),
        (
            "pminsw",
            |a| a.pminsw(xmm0, xmm1),
            lanes(A, B, 16, |x, y| sx(x, 16).min(sx(y, 16)) as u64),
        ),
        ("pshufd", |a| a.pshufd(xmm0, xmm1, 0x1b), {
            let d = lanes(B, B, 32, |x, _| x);
            let w = |i: usize| (d[i / 2] >> (32 * (i % 2))) & 0xffff_ffff;
            [w(3) | (w(2) << 32), w(1) | (w(0) << 32)]
        }),
        ("punpcklbw", |a| a.punpcklbw(xmm0, xmm1), {
            let (x, y) = (bytes(A), bytes(B));
            let mut o = [0u8; 16];
            for i in 0..8 {
                o[2 * i] = x[i];
                o[2 * i + 1] = y[i];
            }
            from_bytes(o)
        }),
        (
            "psllq7",
            |a| a.psllq(xmm0, 7),
            lanes(A, A, 64, |x, _| x << 7),
        ),
        (
            "psrlw3",
            |a| a.psrlw(xmm0, 3),
            lanes(A, A, 16, |x, _| x >> 3),
        ),
        (
            "psrad4",
            |a| a.psrad(xmm0, 4),
            lanes(A, A, 32, |x, _| (sx(x, 32) >> 4) as u64),
        ),
        ("pslldq3", |a| a.pslldq(xmm0, 3), {
            let x = bytes(A);
            let mut o = [0u8; 16];
            o[3..].copy_from_slice(&x[..13]);
            from_bytes(o)
        }),
        ("psrldq5", |a| a.psrldq(xmm0, 5), {
            let x = bytes(A);
            let mut o = [0u8; 16];
            o[..11].copy_from_slice(&x[5..]);
            from_bytes(o)
        }),
    ]
}

fn pd(a: f64, b: f64) -> V {
    [a.to_bits(), b.to_bits()]
}

fn ps(v: [f32; 4]) -> V {
    [
        u64::from(v[0].to_bits()) | (u64::from(v[1].to_bits()) << 32),
        u64::from(v[2].to_bits()) | (u64::from(v[3].to_bits()) << 32),
    ]
}

/// Scalar-double cases on xmm0 = (FA, 7.0), xmm1 = (FB, -1.0); the upper lane of xmm0
/// must survive. Packed-single cases on xmm0 = PS_A, xmm1 = PS_B.
fn float_cases() -> Vec<IntCase> {
    let hi = 7.0f64;
    vec![
        ("addsd", |a| a.addsd(xmm0, xmm1), pd(FA + FB, hi)),
        ("subsd", |a| a.subsd(xmm0, xmm1), pd(FA - FB, hi)),
        ("mulsd", |a| a.mulsd(xmm0, xmm1), pd(FA * FB, hi)),
        ("divsd", |a| a.divsd(xmm0, xmm1), pd(FA / FB, hi)),
        ("sqrtsd", |a| a.sqrtsd(xmm0, xmm0), pd(FA.sqrt(), hi)),
        ("minsd", |a| a.minsd(xmm0, xmm1), pd(FA.min(FB), hi)),
        ("maxsd", |a| a.maxsd(xmm0, xmm1), pd(FA.max(FB), hi)),
        ("addpd", |a| a.addpd(xmm0, xmm1), pd(FA + FB, hi - 1.0)),
        ("mulpd", |a| a.mulpd(xmm0, xmm1), pd(FA * FB, -hi)),
    ]
}

fn ps_cases() -> Vec<IntCase> {
    let z = |f: fn(f32, f32) -> f32| {
        ps([
            f(PS_A[0], PS_B[0]),
            f(PS_A[1], PS_B[1]),
            f(PS_A[2], PS_B[2]),
            f(PS_A[3], PS_B[3]),
        ])
    };
    vec![
        ("addps", |a| a.addps(xmm0, xmm1), z(|x, y| x + y)),
        ("mulps", |a| a.mulps(xmm0, xmm1), z(|x, y| x * y)),
        ("divps", |a| a.divps(xmm0, xmm1), z(|x, y| x / y)),
        ("maxps", |a| a.maxps(xmm0, xmm1), z(|x, y| x.max(y))),
        (
            "cvtps2pd",
            |a| a.cvtps2pd(xmm0, xmm1),
            pd(f64::from(PS_B[0]), f64::from(PS_B[1])),
        ),
    ]
}

/// The SSE/x87 user-mode guest.
pub fn sse() -> Result<TestGuest, GuestError> {
    let name = "sse";
    let err = |source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    };
    let mut g = Guest::new(name, Mode::Long64).map_err(err)?;
    build(&mut g).map_err(err)?;
    g.finish()
}

fn build(g: &mut Guest) -> R {
    g.user_pages = true;
    let log = layout::RESULTS;
    let fx = layout::RESULTS + 0x4000; // 16-byte aligned fxsave area
    let consts = layout::DATA;
    let user_stack = layout::LOAD + 0x7_f000;
    // Constants: A, B, (FA, 7.0), (FB, -1.0), PS_A, PS_B, ints 3, 4, 16.
    for q in A
        .iter()
        .chain(B.iter())
        .chain(pd(FA, 7.0).iter())
        .chain(pd(FB, -1.0).iter())
        .chain(ps(PS_A).iter())
        .chain(ps(PS_B).iter())
        .chain([3u64, 4, 16, 0x3ff3_3333_3333_3333, 0].iter())
    {
        g.data.extend_from_slice(&q.to_le_bytes());
    }
    let c_a = consts;
    let c_b = consts + 16;
    let c_fa = consts + 32;
    let c_fb = consts + 48;
    let c_psa = consts + 64;
    let c_psb = consts + 80;
    let c_ints = consts + 96;
    let mut user_entry = g.a.create_label();
    let mut do_exit = g.a.create_label();
    g.print("keel-testguest sse\n")?;
    {
        let a = &mut g.a;
        a.mov(eax, u32::from(layout::SEL_TSS))?;
        a.ltr(ax)?;
        // CR0: MP set, EM and TS clear; CR4: PAE | OSFXSR | OSXMMEXCPT.
        a.mov(rax, cr0)?;
        a.and(eax, !0xcu32 as i32)?;
        a.or(eax, 2)?;
        a.mov(cr0, rax)?;
        a.mov(eax, 0x620u32)?;
        a.mov(cr4, rax)?;
        a.push(i32::from(layout::SEL_USER_DATA | 3))?;
        a.mov(rax, user_stack)?;
        a.push(rax)?;
        a.push(0x202)?;
        a.push(i32::from(layout::SEL_USER_CODE64 | 3))?;
        a.lea(rax, ptr(user_entry))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut user_entry)?;
    }
    // ---- user mode ----
    let mut slot = 0u64;
    let mut expect_lines: Vec<(String, u64, V)> = Vec::new();
    let groups: [(u64, u64, Vec<IntCase>); 3] = [
        (c_a, c_b, int_cases()),
        (c_fa, c_fb, float_cases()),
        (c_psa, c_psb, ps_cases()),
    ];
    for (x, y, cases) in groups {
        for (cname, op, want) in cases {
            let a = &mut g.a;
            a.movdqu(xmm0, xmmword_ptr(x))?;
            a.movdqu(xmm1, xmmword_ptr(y))?;
            op(a)?;
            let at = log + 16 * slot;
            a.movdqu(xmmword_ptr(at), xmm0)?;
            expect_lines.push((cname.to_string(), at, want));
            slot += 1;
        }
    }
    // Conversions and compares with GPR results.
    let gpr = log + 0x800;
    let mut gpr_lines: Vec<(&str, u64, u64)> = Vec::new();
    {
        let a = &mut g.a;
        a.mov(rax, -7i64 as u64)?;
        a.cvtsi2sd(xmm2, rax)?;
        a.movq(rbx, xmm2)?;
        a.mov(qword_ptr(gpr), rbx)?;
        gpr_lines.push(("cvtsi2sd", gpr, (-7.0f64).to_bits()));
        a.mov(rax, 0x400f_eb85_1eb8_51ecu64)?; // 3.99
        a.movq(xmm3, rax)?;
        a.cvttsd2si(rbx, xmm3)?;
        a.mov(qword_ptr(gpr + 8), rbx)?;
        gpr_lines.push(("cvttsd2si", gpr + 8, 3));
        a.mov(rax, 2.5f64.to_bits())?;
        a.movq(xmm3, rax)?;
        a.cvtsd2si(rbx, xmm3)?;
        a.mov(qword_ptr(gpr + 16), rbx)?;
        gpr_lines.push(("cvtsd2si", gpr + 16, 2));
        // ucomisd: FA vs FB (greater: no flags), FA vs NaN (unordered: ZF PF CF).
        a.movsd_2(xmm4, qword_ptr(c_fa))?;
        a.movsd_2(xmm5, qword_ptr(c_fb))?;
        a.ucomisd(xmm4, xmm5)?;
        a.pushfq()?;
        a.pop(rbx)?;
        a.and(ebx, 0x8d5)?;
        a.mov(qword_ptr(gpr + 24), rbx)?;
        gpr_lines.push(("ucomisd-gt", gpr + 24, 0));
        a.mov(rax, f64::NAN.to_bits())?;
        a.movq(xmm5, rax)?;
        a.ucomisd(xmm4, xmm5)?;
        a.pushfq()?;
        a.pop(rbx)?;
        a.and(ebx, 0x8d5)?;
        a.mov(qword_ptr(gpr + 32), rbx)?;
        gpr_lines.push(("ucomisd-nan", gpr + 32, 0x45));
        a.comisd(xmm5, xmm4)?;
        a.pushfq()?;
        a.pop(rbx)?;
        a.and(ebx, 0x8d5)?;
        a.mov(qword_ptr(gpr + 40), rbx)?;
        gpr_lines.push(("comisd-lt", gpr + 40, 0x45));
        // pmovmskb / movmskpd / movd / movq
        a.movdqu(xmm6, xmmword_ptr(c_a))?;
        a.pmovmskb(ebx, xmm6)?;
        a.mov(qword_ptr(gpr + 48), rbx)?;
        let msk = bytes(A)
            .iter()
            .enumerate()
            .fold(0u64, |m, (i, b)| m | (u64::from(b >> 7) << i));
        gpr_lines.push(("pmovmskb", gpr + 48, msk));
        a.movdqu(xmm6, xmmword_ptr(c_fb))?;
        a.movmskpd(ebx, xmm6)?;
        a.mov(qword_ptr(gpr + 56), rbx)?;
        gpr_lines.push(("movmskpd", gpr + 56, 0b11));
        a.mov(eax, 0x89ab_cdefu32)?;
        a.movd(xmm7, eax)?;
        a.movq(rbx, xmm7)?;
        a.mov(qword_ptr(gpr + 64), rbx)?;
        gpr_lines.push(("movd", gpr + 64, 0x89ab_cdef));
        // x87 on exact integers: 3 * 4 = 12, sqrt(16) = 4, 12 + 4 = 16.
        a.fninit()?;
        a.fild(qword_ptr(c_ints))?;
        a.fild(qword_ptr(c_ints + 8))?;
        a.fmulp(st1, st0)?;
        a.fild(qword_ptr(c_ints + 16))?;
        a.fsqrt()?;
        a.faddp(st1, st0)?;
        a.fistp(qword_ptr(gpr + 72))?;
        gpr_lines.push(("x87", gpr + 72, 16));
        a.fnstsw(ax)?;
        a.movzx(ebx, ax)?;
        a.mov(qword_ptr(gpr + 80), rbx)?;
        gpr_lines.push(("fnstsw", gpr + 80, 0));
        a.fnstcw(word_ptr(gpr + 88))?;
        gpr_lines.push(("fnstcw", gpr + 88, 0x037f));
        // fxsave with xmm0 = A and every other XMM register zero.
        for r in [
            xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
            xmm14, xmm15,
        ] {
            a.pxor(r, r)?;
        }
        a.movdqu(xmm0, xmmword_ptr(c_a))?;
        a.fxsave64(memory_operand_512(fx))?;
        // End in kernel mode through #UD (see usermode()).
        a.lea(rax, ptr(do_exit))?;
        a.mov(qword_ptr(layout::FINISH), rax)?;
        a.ud2()?;
        a.set_label(&mut do_exit)?;
        a.mov(rsp, layout::STACK_TOP)?;
    }
    // ---- kernel: print ----
    for (cname, at, want) in expect_lines {
        g.print(&format!("{cname} "))?;
        g.print_hex_mem(at + 8, u64::MAX, 16)?;
        g.print_hex_mem(at, u64::MAX, 16)?;
        g.expect
            .push_str(&format!("{:016x}{:016x}", want[1], want[0]));
        g.print("\n")?;
    }
    for (cname, at, want) in gpr_lines {
        g.print(&format!("{cname} "))?;
        g.print_hex_mem(at, u64::MAX, 16)?;
        g.expect.push_str(&format!("{want:016x}"));
        g.print("\n")?;
    }
    // fxsave: FCW, FSW, abridged FTW, MXCSR (inexact results set PE; comisd on a QNaN
    // sets IE, where ucomisd would not).
    g.print("fcw=")?;
    g.print_hex_mem(fx, 0xffff, 4)?;
    g.expect.push_str("037f");
    g.print(" fsw=")?;
    g.print_hex_mem(fx + 2, 0xffff, 4)?;
    g.expect.push_str("0000");
    g.print(" ftw=")?;
    g.print_hex_mem(fx + 4, 0xff, 2)?;
    g.expect.push_str("00");
    g.print(" mxcsr=")?;
    g.print_hex_mem(fx + 24, 0xffff_ffff, 8)?;
    g.expect.push_str("00001fa1");
    g.print("\n")?;
    // XMM area (bytes 160..416): xmm0 = A, the rest zero.
    let xmm_words: Vec<u64> = A
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, 30))
        .collect();
    g.print_hash("fxsave-xmm ", fx + 160, 32, Some(hash_u64s(xmm_words)))?;
    g.print("end\n")?;
    g.exit(crate::EXIT_OK)
}

fn memory_operand_512(addr: u64) -> AsmMemoryOperand {
    ptr(addr)
}
