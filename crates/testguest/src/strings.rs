//! String instructions against a Rust model: `movs`, `stos`, `lods`, `cmps`, `scas` at
//! every element size, without prefix, with `rep`, `repe` and `repne`, with DF clear or set,
//! zero counts and overlapping buffers.
//!
//! Each case runs in a 512-byte buffer the guest fills from a seed (the host model fills its
//! copy the same way). The guest records rax, rsi and rdi relative to the buffer, rcx,
//! RFLAGS (arithmetic flags and DF) and a hash of the buffer; [`model`] predicts the record.

use iced_x86::code_asm::*;

use crate::asm::{Guest, Mode, R, hash_u64s, layout};
use crate::ops::ARITH_FLAGS;
use crate::{GuestError, ResultArea, TestGuest};

/// Size of one case record in guest memory.
pub const STR_CASE_SIZE: usize = 64;
/// Size of one result record.
pub const STR_RESULT_SIZE: usize = 48;
/// Bytes in the per-case buffer.
pub const BUF_LEN: usize = 512;
const DF: u64 = 0x400;
/// Where the buffer lives (inside the zeroed result region, past any record).
const BUF: u64 = layout::RESULTS + 0x5_0000;
const LCG_MUL: u64 = 6_364_136_223_846_793_005;
const LCG_ADD: u64 = 1_442_695_040_888_963_407;

/// The string instruction.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrOp {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

/// The repeat prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rep {
    /// No prefix: one iteration, rcx untouched.
    None,
    /// `rep` (F3), `repe` for cmps/scas.
    Rep,
    /// `repne` (F2); only for cmps/scas.
    Repne,
}

/// One string-instruction case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrCase {
    /// Instruction.
    pub op: StrOp,
    /// Element size in bytes: 1, 2, 4 or 8.
    pub size: u32,
    /// Prefix.
    pub rep: Rep,
    /// Direction flag.
    pub df: bool,
    /// Initial rcx (counts are kept small: 0..=20 elements).
    pub count: u64,
    /// rsi - buffer start (kept in 160..=352 so every access stays inside the buffer).
    pub src: u64,
    /// rdi - buffer start (same range).
    pub dst: u64,
    /// Initial rax.
    pub rax: u64,
    /// Initial arithmetic flags.
    pub flags_in: u64,
    /// Seed of the buffer contents.
    pub seed: u64,
}

/// What a correct CPU leaves: registers relative to the buffer, flags, buffer hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StrResult {
    /// Final rax.
    pub rax: u64,
    /// Final rsi - buffer start.
    pub rsi: u64,
    /// Final rdi - buffer start.
    pub rdi: u64,
    /// Final rcx.
    pub rcx: u64,
    /// Final RFLAGS & (arithmetic flags | DF).
    pub flags: u64,
    /// [`hash_u64s`] of the buffer's quadwords.
    pub buf_hash: u64,
}

impl StrResult {
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
            rsi: q(1),
            rdi: q(2),
            rcx: q(3),
            flags: q(4),
            buf_hash: q(5),
        }
    }

    fn words(&self) -> [u64; 6] {
        [
            self.rax,
            self.rsi,
            self.rdi,
            self.rcx,
            self.flags,
            self.buf_hash,
        ]
    }
}

impl StrCase {
    /// Keeps the case inside what the guest supports (sizes, ranges, valid prefixes).
    pub fn normalize(mut self) -> Self {
        if !matches!(self.size, 1 | 2 | 4 | 8) {
            self.size = 1 << (self.size % 4);
        }
        self.count %= 21;
        self.src = 160 + self.src % 193;
        self.dst = 160 + self.dst % 193;
        self.flags_in &= ARITH_FLAGS;
        if self.rep == Rep::Repne && !matches!(self.op, StrOp::Cmps | StrOp::Scas) {
            self.rep = Rep::Rep;
        }
        self
    }

    /// Short name for messages, e.g. `repe cmpsw df`.
    pub fn name(&self) -> String {
        let p = match (self.rep, self.op) {
            (Rep::None, _) => "",
            (Rep::Rep, StrOp::Cmps | StrOp::Scas) => "repe ",
            (Rep::Rep, _) => "rep ",
            (Rep::Repne, _) => "repne ",
        };
        let s = match self.size {
            1 => 'b',
            2 => 'w',
            4 => 'd',
            _ => 'q',
        };
        let df = if self.df { " df" } else { "" };
        format!("{p}{}{s}{df}", format!("{:?}", self.op).to_lowercase())
    }
}

/// The buffer contents for `seed`, as quadwords.
fn fill(seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..BUF_LEN / 8)
        .map(|_| {
            x = x.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            x
        })
        .collect()
}

fn sub_flags(f: &mut u64, a: u64, b: u64, bits: u32) {
    let m = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b) & m;
    let sign = 1u64 << (bits - 1);
    let mut set = |bit: u64, on: bool| {
        if on {
            *f |= bit;
        } else {
            *f &= !bit;
        }
    };
    set(0x1, a < b);
    set(0x800, (a ^ b) & (a ^ r) & sign != 0);
    set(0x10, (a ^ b ^ r) & 0x10 != 0);
    set(0x40, r == 0);
    set(0x80, r & sign != 0);
    set(0x4, (r as u8).count_ones().is_multiple_of(2));
}

/// What a correct x86-64 CPU leaves after running `case`.
pub fn model(case: &StrCase) -> StrResult {
    let c = case.normalize();
    let size = c.size as usize;
    let bits = c.size * 8;
    let mut buf: Vec<u8> = fill(c.seed).iter().flat_map(|q| q.to_le_bytes()).collect();
    let (mut p_si, mut p_di, mut p_cx, mut p_ax) = (c.src, c.dst, c.count, c.rax);
    let mut f = c.flags_in | if c.df { DF } else { 0 };
    let step = |p: u64| {
        if c.df {
            p.wrapping_sub(size as u64)
        } else {
            p + size as u64
        }
    };
    let load = |buf: &[u8], p: u64| -> u64 {
        let mut w = [0u8; 8];
        let p = p as usize;
        w[..size].copy_from_slice(&buf[p..p + size]);
        u64::from_le_bytes(w)
    };
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    loop {
        if c.rep != Rep::None && p_cx == 0 {
            break;
        }
        match c.op {
            StrOp::Movs => {
                let v = load(&buf, p_si);
                let p = p_di as usize;
                buf[p..p + size].copy_from_slice(&v.to_le_bytes()[..size]);
                p_si = step(p_si);
                p_di = step(p_di);
            }
            StrOp::Stos => {
                let p = p_di as usize;
                buf[p..p + size].copy_from_slice(&p_ax.to_le_bytes()[..size]);
                p_di = step(p_di);
            }
            StrOp::Lods => {
                let v = load(&buf, p_si);
                p_ax = match bits {
                    32 => v,
                    64 => v,
                    _ => (p_ax & !mask) | v,
                };
                p_si = step(p_si);
            }
            StrOp::Cmps => {
                sub_flags(&mut f, load(&buf, p_si), load(&buf, p_di), bits);
                p_si = step(p_si);
                p_di = step(p_di);
            }
            StrOp::Scas => {
                sub_flags(&mut f, p_ax, load(&buf, p_di), bits);
                p_di = step(p_di);
            }
        }
        if c.rep == Rep::None {
            break;
        }
        p_cx -= 1;
        let zf = f & 0x40 != 0;
        if matches!(c.op, StrOp::Cmps | StrOp::Scas) {
            if c.rep == Rep::Rep && !zf {
                break;
            }
            if c.rep == Rep::Repne && zf {
                break;
            }
        }
    }
    let words: Vec<u64> = buf
        .chunks_exact(8)
        .map(|chunk| {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            u64::from_le_bytes(w)
        })
        .collect();
    StrResult {
        rax: p_ax,
        rsi: p_si,
        rdi: p_di,
        rcx: p_cx,
        flags: f & (ARITH_FLAGS | DF),
        buf_hash: hash_u64s(words),
    }
}

fn emit_string_op(a: &mut CodeAssembler, c: &StrCase) -> R {
    match c.rep {
        Rep::None => {}
        Rep::Rep => {
            if matches!(c.op, StrOp::Cmps | StrOp::Scas) {
                let _ = a.repe();
            } else {
                let _ = a.rep();
            }
        }
        Rep::Repne => {
            let _ = a.repne();
        }
    }
    match (c.op, c.size) {
        (StrOp::Movs, 1) => a.movsb(),
        (StrOp::Movs, 2) => a.movsw(),
        (StrOp::Movs, 4) => a.movsd(),
        (StrOp::Movs, _) => a.movsq(),
        (StrOp::Stos, 1) => a.stosb(),
        (StrOp::Stos, 2) => a.stosw(),
        (StrOp::Stos, 4) => a.stosd(),
        (StrOp::Stos, _) => a.stosq(),
        (StrOp::Lods, 1) => a.lodsb(),
        (StrOp::Lods, 2) => a.lodsw(),
        (StrOp::Lods, 4) => a.lodsd(),
        (StrOp::Lods, _) => a.lodsq(),
        (StrOp::Cmps, 1) => a.cmpsb(),
        (StrOp::Cmps, 2) => a.cmpsw(),
        (StrOp::Cmps, 4) => a.cmpsd(),
        (StrOp::Cmps, _) => a.cmpsq(),
        (StrOp::Scas, 1) => a.scasb(),
        (StrOp::Scas, 2) => a.scasw(),
        (StrOp::Scas, 4) => a.scasd(),
        (StrOp::Scas, _) => a.scasq(),
    }
}

/// Builds a guest that runs every case (one instruction each, emitted per case) and prints
/// one hash over all result records per `group` of cases.
pub fn string_guest(
    name: &str,
    groups: &[(String, Vec<StrCase>)],
) -> Result<TestGuest, GuestError> {
    let err = |source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    };
    let mut g = Guest::new(name, Mode::Long64).map_err(err)?;
    let total = build(&mut g, groups).map_err(err)?;
    if total * STR_RESULT_SIZE > 0x5_0000 {
        return Err(GuestError::TooBig {
            guest: name.to_string(),
            what: "string results",
            size: total * STR_RESULT_SIZE,
            max: 0x5_0000,
        });
    }
    let mut t = g.finish()?;
    t.results = Some(ResultArea {
        addr: layout::RESULTS,
        count: total,
        record_size: STR_RESULT_SIZE,
    });
    Ok(t)
}

fn build(g: &mut Guest, groups: &[(String, Vec<StrCase>)]) -> R<usize> {
    g.print(&format!("keel-testguest {}\n", g.name))?;
    let mut n = 0usize;
    for (label, cases) in groups {
        let first = n;
        for case in cases {
            let c = case.normalize();
            let rec = layout::RESULTS + (n * STR_RESULT_SIZE) as u64;
            let a = &mut g.a;
            // Fill the buffer from the seed (same generator as `fill`).
            let mut lp = a.create_label();
            a.mov(rdi, BUF)?;
            a.mov(ecx, (BUF_LEN / 8) as u32)?;
            a.mov(rax, c.seed)?;
            a.mov(rbx, LCG_MUL)?;
            a.mov(rdx, LCG_ADD)?;
            a.set_label(&mut lp)?;
            a.imul_2(rax, rbx)?;
            a.add(rax, rdx)?;
            a.mov(qword_ptr(rdi), rax)?;
            a.add(rdi, 8)?;
            a.dec(ecx)?;
            a.jnz(lp)?;
            // Registers and flags.
            a.mov(rsi, BUF + c.src)?;
            a.mov(rdi, BUF + c.dst)?;
            a.mov(rcx, c.count)?;
            a.mov(rax, c.rax)?;
            let flags = c.flags_in | 2 | if c.df { DF } else { 0 };
            a.push(flags as i32)?;
            a.popfq()?;
            emit_string_op(a, &c)?;
            a.pushfq()?;
            a.pop(r8)?;
            a.cld()?;
            a.and(r8, (ARITH_FLAGS | DF) as i32)?;
            a.mov(r9, BUF)?;
            a.sub(rsi, r9)?;
            a.sub(rdi, r9)?;
            a.mov(qword_ptr(rec), rax)?;
            a.mov(qword_ptr(rec + 8), rsi)?;
            a.mov(qword_ptr(rec + 16), rdi)?;
            a.mov(qword_ptr(rec + 24), rcx)?;
            a.mov(qword_ptr(rec + 32), r8)?;
            a.mov(rsi, BUF)?;
            a.mov(ecx, (BUF_LEN / 8) as u32)?;
            a.call(g.hash)?;
            a.mov(qword_ptr(rec + 40), rax)?;
            n += 1;
        }
        let expected = hash_u64s(cases.iter().flat_map(|c| model(c).words()));
        let words = ((n - first) * STR_RESULT_SIZE / 8) as u64;
        let addr = layout::RESULTS + (first * STR_RESULT_SIZE) as u64;
        g.print_hash(&format!("{label} "), addr, words, Some(expected))?;
    }
    g.print("end\n")?;
    g.exit(crate::EXIT_OK)?;
    Ok(n)
}

/// Decodes the raw result bytes of a string guest ([`TestGuest::read_result_bytes`]).
pub fn parse_results(bytes: &[u8]) -> Vec<StrResult> {
    bytes
        .chunks_exact(STR_RESULT_SIZE)
        .map(StrResult::from_bytes)
        .collect()
}

/// Deterministic cases: every op, size and prefix, both directions, counts 0, 1 and 7,
/// overlapping and disjoint buffers, equal and different data for the compares.
pub fn edge_cases() -> Vec<(String, Vec<StrCase>)> {
    let mut groups = Vec::new();
    for op in [
        StrOp::Movs,
        StrOp::Stos,
        StrOp::Lods,
        StrOp::Cmps,
        StrOp::Scas,
    ] {
        let mut cases = Vec::new();
        let reps: &[Rep] = if matches!(op, StrOp::Cmps | StrOp::Scas) {
            &[Rep::None, Rep::Rep, Rep::Repne]
        } else {
            &[Rep::None, Rep::Rep]
        };
        for (size_i, size) in [1u32, 2, 4, 8].iter().enumerate() {
            for (ri, rep) in reps.iter().enumerate() {
                for df in [false, true] {
                    for (k, count) in [0u64, 1, 7].iter().enumerate() {
                        let i = size_i * 100 + ri * 10 + k;
                        // Same src and dst makes compares find equal data.
                        let (src, dst) = match i % 3 {
                            0 => (200, 200),
                            1 => (200, 204),
                            _ => (300, 180),
                        };
                        cases.push(StrCase {
                            op,
                            size: *size,
                            rep: *rep,
                            df,
                            count: *count,
                            src,
                            dst,
                            rax: 0x1122_3344_5566_7788 ^ i as u64,
                            flags_in: if i % 2 == 0 { 0 } else { ARITH_FLAGS },
                            seed: 0x5eed ^ (i as u64) << 8,
                        });
                    }
                }
            }
        }
        groups.push((format!("{op:?}").to_lowercase(), cases));
    }
    groups
}
