//! The guest builders: one per instruction group, plus benchmark loops.

use iced_x86::code_asm::*;

use crate::asm::{Guest, PTE_NX, PTE_P, PTE_RW, PTE_US, R, hash_u32s, hash_u64s, layout};
pub use crate::asm::{Mode, Paging32};
use crate::ops::{self, Op, OpSpec};
use crate::{GuestError, TestGuest};

pub(crate) fn build(
    name: &str,
    mode: Mode,
    body: impl FnOnce(&mut Guest) -> R,
) -> Result<TestGuest, GuestError> {
    let mut g = Guest::new(name, mode).map_err(|source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    })?;
    body(&mut g).map_err(|source| GuestError::Assemble {
        guest: name.to_string(),
        source,
    })?;
    g.finish()
}

/// Prints the quadword at `addr` (masked) and records `expected` as its predicted text.
pub(crate) fn print_known(g: &mut Guest, addr: u64, mask: u64, digits: u32, expected: u64) -> R {
    g.print_hex_mem(addr, mask, digits)?;
    let shown = expected & mask;
    let text = format!("{shown:0width$x}", width = digits as usize);
    let text = text[text.len() - digits as usize..].to_string();
    g.expect.push_str(&text);
    Ok(())
}

/// Prints a banner and exits: the smallest end-to-end check of a backend.
pub fn hello(mode: Mode) -> Result<TestGuest, GuestError> {
    let (name, bits) = match mode {
        Mode::Protected32 => ("hello32", "32-bit protected mode"),
        Mode::Long64 => ("hello64", "64-bit long mode"),
    };
    build(name, mode, |g| {
        g.print(&format!("Hello from keel-testguest ({bits})\n"))?;
        g.exit(crate::EXIT_OK)
    })
}

/// Reads the RTC's date and time from CMOS (after register A's update-in-progress bit
/// clears) and prints them as the registers hold them, BCD by default, so the digits read
/// as a date: `rtc CCYY-MM-DD hh:mm:ss` (century from CMOS 0x32). The output depends on the
/// clock and `-rtc base=`, so it is not predicted; `tests/qemu_doc_lines.rs` checks it.
pub fn rtc_date() -> Result<TestGuest, GuestError> {
    build("rtcdate", Mode::Long64, |g| {
        g.unpredicted();
        let a = &mut g.a;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.mov(al, 0x0a)?;
        a.out(0x70, al)?;
        a.in_(al, 0x71)?;
        a.test(al, 0x80)?;
        a.jnz(wait)?;
        // Century, year, month, day, hours, minutes, seconds into SCRATCH[0..7].
        for (i, reg) in [0x32u8, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00]
            .iter()
            .enumerate()
        {
            a.mov(al, u32::from(*reg))?;
            a.out(0x70, al)?;
            a.in_(al, 0x71)?;
            a.mov(byte_ptr(layout::SCRATCH + i as u64), al)?;
        }
        g.emit_str("rtc ")?;
        for (i, sep) in ["", "", "-", "-", " ", ":", ":"].iter().enumerate() {
            g.emit_str(sep)?;
            g.print_hex_mem(layout::SCRATCH + i as u64, 0xff, 2)?;
        }
        g.emit_str("\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Prints a line and writes `code` to isa-debug-exit: QEMU (and the vmm) then exit with
/// status `(code << 1) | 1`. Checks that the status reaches the process.
pub fn exit_with(code: u8) -> Result<TestGuest, GuestError> {
    let mut t = build("exitcode", Mode::Long64, |g| {
        g.print(&format!("exiting with {code:#04x}\n"))?;
        g.exit(code)
    })?;
    t.expected_exit = code;
    Ok(t)
}

fn specs(ops: &[Op], widths: &[u32]) -> Vec<(OpSpec, Vec<ops::Case>)> {
    let mut out = Vec::new();
    for op in ops {
        for w in widths {
            let s = OpSpec::new(*op, *w);
            if s.is_valid() {
                out.push((s, ops::edge_cases(s)));
            }
        }
    }
    out
}

const WIDTHS: [u32; 4] = [8, 16, 32, 64];

/// add/adc/sub/sbb/and/or/xor/cmp/test/inc/dec/neg/not at all widths, edge operands,
/// several incoming flag states. Expected output comes from the Rust model.
pub fn alu() -> Result<TestGuest, GuestError> {
    ops::ops_guest("alu", &alu_cases())
}

/// The op specs and cases of [`alu`], for comparing its result records with [`ops::model`].
pub fn alu_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    specs(
        &[
            Add, Adc, Sub, Sbb, And, Or, Xor, Cmp, Test, Inc, Dec, Neg, Not,
        ],
        &WIDTHS,
    )
}

/// shl/shr/sar/rol/ror/rcl/rcr by cl with counts 0, 1, width-1, width, >width, plus the
/// by-one encodings.
pub fn shifts() -> Result<TestGuest, GuestError> {
    ops::ops_guest("shifts", &shifts_cases())
}

/// The op specs and cases of [`shifts`], for comparing its result records with [`ops::model`].
pub fn shifts_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    specs(
        &[Shl, Shr, Sar, Rol, Ror, Rcl, Rcr, ShlOne, ShrOne, SarOne],
        &WIDTHS,
    )
}

/// mul/imul (one and two operands)/div/idiv at all widths, including #DE on zero divisors
/// and quotient overflow (the handler resumes after the instruction and records it).
pub fn muldiv() -> Result<TestGuest, GuestError> {
    ops::ops_guest("muldiv", &muldiv_cases())
}

/// The op specs and cases of [`muldiv`], for comparing its result records with [`ops::model`].
pub fn muldiv_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    specs(&[Mul, Imul1, Imul2, Div, Idiv], &WIDTHS)
}

/// bt/bts/btr/btc, bsf/bsr, shld/shrd, cmpxchg, xadd, bswap, setcc, cmovcc, cbw/cwd/cdq/cqo.
pub fn bitops() -> Result<TestGuest, GuestError> {
    ops::ops_guest("bitops", &bitops_cases())
}

/// The op specs and cases of [`bitops`], for comparing its result records with [`ops::model`].
pub fn bitops_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    specs(
        &[
            Bt, Bts, Btr, Btc, Bsf, Bsr, Shld, Shrd, Cmpxchg, Xadd, Bswap, Setcc, Cmovcc, Cwd,
        ],
        &WIDTHS,
    )
}

/// movzx/movsx/movsxd, xchg, three-operand imul, cmc/clc/stc and cmpxchg8b.
pub fn misc() -> Result<TestGuest, GuestError> {
    ops::ops_guest("misc", &misc_cases())
}

/// The op specs and cases of [`misc`].
pub fn misc_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    specs(
        &[
            Movzx8, Movsx8, Movzx16, Movsx16, Movsxd, Xchg, Imul3, Cmc, Clc, Stc, Cmpxchg8b,
        ],
        &WIDTHS,
    )
}

/// The read-modify-write forms: ALU, unary, shift/rotate, `bt*`, `shld`/`shrd` and `xadd`
/// with a memory destination, at all widths (memory writes do not zero-extend).
pub fn alu_mem() -> Result<TestGuest, GuestError> {
    ops::ops_guest("alu-mem", &alu_mem_cases())
}

/// The op specs and cases of [`alu_mem`].
pub fn alu_mem_cases() -> Vec<(OpSpec, Vec<ops::Case>)> {
    use Op::*;
    let mut out = Vec::new();
    for op in [
        Add, Adc, Sub, Sbb, And, Or, Xor, Cmp, Test, Inc, Dec, Neg, Not, Shl, Shr, Sar, Rol, Ror,
        Rcl, Rcr, ShlOne, ShrOne, SarOne, Bt, Bts, Btr, Btc, Shld, Shrd, Xadd,
    ] {
        for w in WIDTHS {
            let s = OpSpec::mem(op, w);
            if s.is_valid() {
                // Every other edge case keeps the guest small.
                let cases = ops::edge_cases(OpSpec::new(op, w))
                    .into_iter()
                    .step_by(2)
                    .map(|c| ops::normalize(s, c))
                    .collect();
                out.push((s, cases));
            }
        }
    }
    out
}

/// The ALU and shift groups of [`alu`] and [`shifts`] (widths 8-32) in 32-bit protected
/// mode, the mode a PVH kernel starts in.
pub fn ops32_alu() -> Result<TestGuest, GuestError> {
    let mut groups = alu_cases();
    groups.extend(shifts_cases());
    ops::ops_guest32("ops32-alu", &groups)
}

/// The groups of [`muldiv`] (without faulting divisions), [`bitops`] (without cmovcc) and
/// [`misc`] (its 8- to 32-bit forms) in 32-bit protected mode.
pub fn ops32_muldiv_bitops() -> Result<TestGuest, GuestError> {
    let mut groups = muldiv_cases();
    groups.extend(bitops_cases());
    groups.extend(misc_cases());
    ops::ops_guest32("ops32-muldiv-bitops", &groups)
}

/// movs/stos/lods/cmps/scas in byte/word/dword/qword forms, with `rep`/`repe`/`repne`,
/// DF clear and set, overlapping copies and zero counts. Prints a hash of the destination
/// buffer and of a log of (rsi, rdi, rcx, rax, flags incl. DF) after each step, then the
/// final registers. Not predicted: compared between backends.
pub fn string_ops() -> Result<TestGuest, GuestError> {
    build("string", Mode::Long64, |g| {
        let src = layout::DATA;
        g.data = (0..512u32)
            .map(|i| (i.wrapping_mul(37) ^ (i >> 3)) as u8)
            .collect();
        let dst = layout::RESULTS;
        let log = layout::RESULTS + 0x2000;
        g.print("keel-testguest string\n")?;
        let mut step = 0u64;
        // Records registers and flags (arithmetic + DF) into the log.
        let record = |a: &mut CodeAssembler, step: &mut u64| -> R {
            let base = log + *step * 40;
            a.pushfq()?;
            a.mov(qword_ptr(base), rsi)?;
            a.mov(qword_ptr(base + 8), rdi)?;
            a.mov(qword_ptr(base + 16), rcx)?;
            a.mov(qword_ptr(base + 24), rax)?;
            a.pop(qword_ptr(base + 32))?;
            a.and(qword_ptr(base + 32), 0xcd5)?;
            *step += 1;
            Ok(())
        };
        let a = &mut g.a;
        // Forward copies of each width.
        a.cld()?;
        a.mov(rsi, src)?;
        a.mov(rdi, dst)?;
        a.mov(ecx, 37)?;
        a.rep().movsb()?;
        record(a, &mut step)?;
        a.mov(ecx, 13)?;
        a.rep().movsw()?;
        record(a, &mut step)?;
        a.mov(ecx, 7)?;
        a.rep().movsd()?;
        record(a, &mut step)?;
        a.mov(ecx, 5)?;
        a.rep().movsq()?;
        record(a, &mut step)?;
        // Backward copy.
        a.std()?;
        a.mov(rsi, src + 255)?;
        a.mov(rdi, dst + 0x200 + 255)?;
        a.mov(ecx, 40)?;
        a.rep().movsb()?;
        record(a, &mut step)?;
        a.mov(rsi, src + 0x100)?;
        a.mov(rdi, dst + 0x280)?;
        a.mov(ecx, 6)?;
        a.rep().movsq()?;
        record(a, &mut step)?;
        a.cld()?;
        // Overlapping forward byte copy propagates a pattern.
        a.mov(rsi, dst)?;
        a.mov(rdi, dst + 1)?;
        a.mov(ecx, 64)?;
        a.rep().movsb()?;
        record(a, &mut step)?;
        // Stores.
        a.mov(rdi, dst + 0x300)?;
        a.mov(eax, 0x5a)?;
        a.mov(ecx, 33)?;
        a.rep().stosb()?;
        record(a, &mut step)?;
        a.mov(eax, 0x1122_3344)?;
        a.mov(ecx, 9)?;
        a.rep().stosd()?;
        record(a, &mut step)?;
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.mov(ecx, 3)?;
        a.rep().stosq()?;
        record(a, &mut step)?;
        a.std()?;
        a.mov(eax, 0xbeef)?;
        a.mov(ecx, 5)?;
        a.rep().stosw()?;
        record(a, &mut step)?;
        a.cld()?;
        // Loads.
        a.mov(rsi, src + 3)?;
        a.lodsb()?;
        a.lodsq()?;
        record(a, &mut step)?;
        a.lodsw()?;
        a.lodsd()?;
        record(a, &mut step)?;
        // Compares: the first 37 bytes of dst equal src... except where the overlap
        // copy rewrote them; repe stops at the first difference.
        a.mov(rsi, src)?;
        a.mov(rdi, dst + 0x300)?;
        a.mov(ecx, 64)?;
        a.repe().cmpsb()?;
        record(a, &mut step)?;
        a.mov(rsi, dst + 0x300)?;
        a.mov(rdi, dst + 0x301)?;
        a.mov(ecx, 64)?;
        a.repe().cmpsb()?;
        record(a, &mut step)?;
        a.mov(rsi, src)?;
        a.mov(rdi, src + 8)?;
        a.mov(ecx, 4)?;
        a.repne().cmpsq()?;
        record(a, &mut step)?;
        // Scans.
        a.mov(rdi, src)?;
        a.mov(al, byte_ptr(src + 50))?;
        a.mov(ecx, 200)?;
        a.repne().scasb()?;
        record(a, &mut step)?;
        a.mov(rdi, dst + 0x300)?;
        a.mov(eax, 0x5a5a)?;
        a.mov(ecx, 40)?;
        a.repe().scasw()?;
        record(a, &mut step)?;
        a.std()?;
        a.mov(rdi, src + 100)?;
        a.mov(eax, u32::MAX)?;
        a.mov(ecx, 10)?;
        a.repne().scasd()?;
        record(a, &mut step)?;
        a.cld()?;
        // Zero counts: nothing moves, flags stay as set here.
        a.mov(eax, 1)?;
        a.cmp(eax, 2)?;
        a.xor(ecx, ecx)?;
        a.rep().movsb()?;
        a.repe().cmpsb()?;
        a.repne().scasq()?;
        record(a, &mut step)?;
        // Single (non-rep) forms.
        a.mov(rsi, src + 16)?;
        a.mov(rdi, dst + 0x400)?;
        a.movsb()?;
        a.movsq()?;
        a.stosd()?;
        a.cmpsw()?;
        a.scasb()?;
        record(a, &mut step)?;
        g.save_regs()?;
        g.print_hash("buffer ", dst, 0x480 / 8, None)?;
        g.print_hash("log ", log, step * 5, None)?;
        g.print_saved_regs(0xcd5)?;
        g.print("end\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Every string instruction form against the Rust model ([`crate::strings`]): one hash
/// per instruction over (rax, rsi, rdi, rcx, flags, buffer hash) of each case.
pub fn string_model() -> Result<TestGuest, GuestError> {
    crate::strings::string_guest("strops", &crate::strings::edge_cases())
}

/// Exceptions with precise RIP and error codes: #DE (zero divisor, idiv overflow), #UD
/// (ud2), #BP (int3, a trap), #GP (non-canonical address; selector 0x58, past the GDT limit,
/// error code = selector), #PF (read and write to a not-present page, write to a read-only
/// page with CR0.WP, fetch from an NX page). Each prints vector, error code, CR2 and the
/// distance from the reported RIP to the resume point (0 for traps).
pub fn exceptions() -> Result<TestGuest, GuestError> {
    exceptions_without(&[])
}

/// [`exceptions`] without the cases named in `skip` (e.g. `"bp"`: KVM-PVM cannot emulate
/// `int3` in guest kernel mode and stops with an internal error).
pub fn exceptions_without(skip: &[&str]) -> Result<TestGuest, GuestError> {
    build("exceptions", Mode::Long64, |g| {
        g.pt_flags[1] = 0; // not present
        g.pt_flags[2] = PTE_P; // read-only
        g.pt_flags[3] = PTE_P | PTE_RW | PTE_NX;
        g.print("keel-testguest exceptions\n")?;
        let page = |i: u64| layout::PF_REGION + 0x1000 * i;
        // (name, vector, error, cr2 or None, distance (u64::MAX: print RIP), argument, body)
        type Body = fn(&mut CodeAssembler, u64) -> R;
        type ExcCase = (&'static str, u64, u64, Option<u64>, u64, u64, Body);
        let cases: Vec<ExcCase> = vec![
            ("de", 0, 0, None, 2, 0, |a, _| {
                a.xor(ecx, ecx)?;
                a.div(ecx)
            }),
            ("de-overflow", 0, 0, None, 2, 0, |a, _| {
                a.mov(eax, 0x8000_0000u32)?;
                a.cdq()?;
                a.mov(ecx, u32::MAX)?;
                a.idiv(ecx)
            }),
            ("ud", 6, 0, None, 2, 0, |a, _| a.ud2()),
            ("bp", 3, 0, None, 0, 0, |a, _| a.int3()),
            ("gp-noncanonical", 13, 0, None, 3, 0, |a, _| {
                a.mov(rax, 0x8000_0000_0000_0000u64)?;
                a.mov(rbx, qword_ptr(rax))
            }),
            ("gp-selector", 13, 0x58, None, 3, 0, |a, _| {
                a.mov(eax, 0x58)?;
                a.mov(ds, ax)
            }),
            (
                "pf-read",
                14,
                0,
                Some(page(1) + 8),
                3,
                page(1) + 8,
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.mov(rbx, qword_ptr(rax))
                },
            ),
            (
                "pf-write",
                14,
                2,
                Some(page(1) + 16),
                3,
                page(1) + 16,
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.mov(qword_ptr(rax), rbx)
                },
            ),
            (
                "pf-write-ro",
                14,
                3,
                Some(page(2) + 24),
                3,
                page(2) + 24,
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.mov(qword_ptr(rax), rbx)
                },
            ),
            (
                "pf-fetch-nx",
                14,
                0x11,
                Some(page(3)),
                u64::MAX,
                page(3),
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.jmp(rax)
                },
            ),
        ];
        let cases: Vec<_> = cases.into_iter().filter(|c| !skip.contains(&c.0)).collect();
        let n = cases.len() as u64;
        for (name, vector, error, want_cr2, dist, arg, body) in cases {
            let a = &mut g.a;
            let mut after = a.create_label();
            a.mov(qword_ptr(layout::LAST_VECTOR), 0xff)?;
            a.mov(qword_ptr(layout::LAST_ERROR), -1)?;
            a.mov(qword_ptr(layout::EXC_MARK), 0)?;
            a.lea(r10, ptr(after))?;
            a.mov(qword_ptr(layout::RESUME), r10)?;
            body(a, arg)?;
            a.set_label(&mut after)?;
            a.mov(eax, u32::from(layout::SEL_DATA))?;
            a.mov(ds, ax)?;
            g.print(&format!("{name} v="))?;
            print_known(g, layout::LAST_VECTOR, 0xff, 2, vector)?;
            g.print(" e=")?;
            print_known(g, layout::LAST_ERROR, 0xffff_ffff, 8, error)?;
            if let Some(c) = want_cr2 {
                g.print(" cr2=")?;
                print_known(g, layout::LAST_CR2, u64::MAX, 16, c)?;
            }
            if dist == u64::MAX {
                g.print(" rip=")?;
                print_known(g, layout::LAST_RIP, u64::MAX, 16, arg)?;
            } else {
                // EXC_MARK >> 16 is resume - rip: the instruction length for faults, 0 for traps.
                g.a.mov(rax, qword_ptr(layout::EXC_MARK))?;
                g.a.shr(rax, 16)?;
                g.a.mov(qword_ptr(layout::SCRATCH), rax)?;
                g.print(" d=")?;
                print_known(g, layout::SCRATCH, 0xff, 2, dist)?;
            }
            g.print("\n")?;
        }
        // A read from the read-only page still works.
        g.a.mov(rax, page(2))?;
        g.a.mov(rbx, qword_ptr(rax))?;
        g.print("count=")?;
        print_known(g, layout::EXC_COUNT, u64::MAX, 4, n)?;
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Demand paging in long mode: eight 4 KiB pages start not present; the #PF handler sets
/// P/RW, `invlpg`s and retries. Checks the data through the faulting mapping and through
/// the 2 MiB identity alias, the fault count, a CR3 reload, and the Accessed/Dirty bits the
/// page walker wrote into every level of the tables; CR0.WP (a supervisor write to a
/// read-only page succeeds with WP clear and faults with WP set).
pub fn paging() -> Result<TestGuest, GuestError> {
    build("paging", Mode::Long64, |g| {
        for i in 4..12 {
            g.pt_flags[i] = 0;
        }
        g.pt_flags[13] = PTE_P; // read-only: CR0.WP decides whether CPL 0 may write
        g.print("keel-testguest paging\n")?;
        let a = &mut g.a;
        a.mov(qword_ptr(layout::PF_FIXUP), 1)?;
        // Write i * 0x1111 at offset i*8 of page i, through the 4 KiB mapping.
        for i in 4..12u64 {
            a.mov(rax, layout::PF_REGION + 0x1000 * i + 8 * i)?;
            a.mov(rbx, 0x1111 * i)?;
            a.mov(qword_ptr(rax), rbx)?;
        }
        // Read back through the identity map (2 MiB pages) and sum.
        a.xor(ecx, ecx)?;
        for i in 4..12u64 {
            a.mov(rax, layout::PF_PHYS + 0x1000 * i + 8 * i)?;
            a.add(rcx, qword_ptr(rax))?;
        }
        a.mov(qword_ptr(layout::SCRATCH), rcx)?;
        // CR3 reload flushes the TLB; reads through the 4 KiB mapping still see the data.
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        a.xor(ecx, ecx)?;
        for i in 4..12u64 {
            a.mov(rax, layout::PF_REGION + 0x1000 * i + 8 * i)?;
            a.add(rcx, qword_ptr(rax))?;
            a.invlpg(byte_ptr(rax))?;
        }
        a.mov(qword_ptr(layout::SCRATCH + 8), rcx)?;
        // Read page 12 (present, never touched so far): sets only Accessed.
        a.mov(rax, layout::PF_REGION + 0x1000 * 12)?;
        a.mov(rbx, qword_ptr(rax))?;
        a.mov(qword_ptr(layout::PF_FIXUP), 0)?;
        // CR0.WP clear: a supervisor write to the read-only page 13 succeeds (and sets
        // Accessed and Dirty); with WP set again the same write faults with error code 3.
        a.mov(rax, cr0)?;
        a.btr(rax, 16)?;
        a.mov(cr0, rax)?;
        a.mov(rax, layout::PF_REGION + 0x1000 * 13)?;
        a.mov(qword_ptr(rax), 0x1313)?;
        a.mov(rax, cr0)?;
        a.bts(rax, 16)?;
        a.mov(cr0, rax)?;
        let mut after_wp = a.create_label();
        a.lea(r10, ptr(after_wp))?;
        a.mov(qword_ptr(layout::RESUME), r10)?;
        a.mov(qword_ptr(layout::LAST_ERROR), -1)?;
        a.mov(rax, layout::PF_REGION + 0x1000 * 13 + 8)?;
        a.mov(qword_ptr(rax), rbx)?;
        a.set_label(&mut after_wp)?;
        a.mov(rax, layout::PF_PHYS + 0x1000 * 13)?;
        a.mov(rax, qword_ptr(rax))?;
        a.mov(qword_ptr(layout::SCRATCH + 16), rax)?;
        let sum: u64 = (4..12u64).map(|i| 0x1111 * i).sum();
        g.print("faults=")?;
        print_known(g, layout::EXC_COUNT, u64::MAX, 4, 9)?;
        g.print(" sum=")?;
        print_known(g, layout::SCRATCH, u64::MAX, 16, sum)?;
        g.print(" sum-after-cr3=")?;
        print_known(g, layout::SCRATCH + 8, u64::MAX, 16, sum)?;
        g.print("\nwp0-write=")?;
        print_known(g, layout::SCRATCH + 16, u64::MAX, 4, 0x1313)?;
        g.print(" wp1-write-error=")?;
        print_known(g, layout::LAST_ERROR, 0xff, 2, 3)?;
        g.print("\n")?;
        // Accessed (0x20) / Dirty (0x40) bits.
        const A: u64 = 0x20;
        const D: u64 = 0x40;
        let entry = |i: usize| -> u64 {
            let flags = match i {
                4..=11 => PTE_P | PTE_RW | A | D,
                12 => PTE_P | PTE_RW | A,
                13 => PTE_P | A | D,
                _ => PTE_P | PTE_RW,
            };
            (layout::PF_PHYS + 0x1000 * i as u64) | flags
        };
        let pt_expected = hash_u64s((0..layout::PF_PAGES).map(entry));
        g.print_hash(
            "pt ",
            layout::PT,
            layout::PF_PAGES as u64,
            Some(pt_expected),
        )?;
        for (name, addr, val) in [
            ("pd1[0]", layout::PD1, layout::PT | PTE_P | PTE_RW | A),
            (
                "pdpt[1]",
                layout::PDPT + 8,
                layout::PD1 | PTE_P | PTE_RW | A,
            ),
            ("pml4[0]", layout::PML4, layout::PDPT | PTE_P | PTE_RW | A),
        ] {
            g.print(&format!("{name}="))?;
            // Mask off bits a CPU may set in non-leaf entries beyond A (none expected).
            print_known(g, addr, 0xfff, 3, val)?;
            g.print(" ")?;
        }
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Paging in 32-bit protected mode, turned on by the guest: two-level 32-bit paging or PAE
/// (with EFER.NXE). #PF error codes and CR2 for reads and writes of a not-present page, a
/// write to a read-only page with CR0.WP and (PAE) a fetch from an NX page; #DE, #UD and
/// #GP(selector) through a 32-bit IDT; demand paging through the #PF handler with
/// `invlpg`, data checked through the identity alias and after a CR3 reload; the
/// Accessed/Dirty bits written into the tables.
///
/// KVM-PVM cannot run this: setting CR0.PG outside long mode raises #GP there.
pub fn paging32(kind: Paging32) -> Result<TestGuest, GuestError> {
    let name = match kind {
        Paging32::TwoLevel => "paging32",
        Paging32::Pae => "paging-pae",
    };
    build(name, Mode::Protected32, |g| {
        g.paging32 = Some(kind);
        g.pt_flags[1] = 0;
        g.pt_flags[2] = PTE_P;
        g.pt_flags[3] = PTE_P | PTE_RW | PTE_NX;
        for i in 4..12 {
            g.pt_flags[i] = 0;
        }
        let pae = kind == Paging32::Pae;
        let d = |addr: u64| dword_ptr(addr as u32);
        g.print(&format!("keel-testguest {name}\n"))?;
        let a = &mut g.a;
        a.mov(d(layout::PF_PTE_SHIFT), if pae { 3 } else { 2 })?;
        if pae {
            a.mov(eax, 0x20u32)?;
            a.mov(cr4, eax)?;
            a.mov(ecx, 0xc000_0080u32)?;
            a.rdmsr()?;
            a.or(eax, 0x800)?;
            a.wrmsr()?;
            a.mov(eax, layout::PDPT as u32)?;
        } else {
            a.mov(eax, layout::PML4 as u32)?;
        }
        a.mov(cr3, eax)?;
        a.mov(eax, 0x8001_0033u32)?;
        a.mov(cr0, eax)?;
        let page = |i: u64| (layout::PF_REGION + 0x1000 * i) as u32;
        type Body = fn(&mut CodeAssembler, u32) -> R;
        // (name, vector, error, cr2 or None, distance (u32::MAX: print EIP), argument, body)
        type Case32 = (&'static str, u64, u64, Option<u64>, u64, u32, Body);
        let mut cases: Vec<Case32> = vec![
            ("de", 0, 0, None, 2, 0, |a, _| {
                a.xor(ecx, ecx)?;
                a.div(ecx)
            }),
            ("ud", 6, 0, None, 2, 0, |a, _| a.ud2()),
            ("gp-selector", 13, 0x58, None, 3, 0, |a, _| {
                a.mov(eax, 0x58)?;
                a.mov(ds, ax)
            }),
            (
                "pf-read",
                14,
                0,
                Some(u64::from(page(1) + 8)),
                2,
                page(1) + 8,
                |a, addr| {
                    a.mov(eax, addr)?;
                    a.mov(ebx, dword_ptr(eax))
                },
            ),
            (
                "pf-write",
                14,
                2,
                Some(u64::from(page(1) + 16)),
                2,
                page(1) + 16,
                |a, addr| {
                    a.mov(eax, addr)?;
                    a.mov(dword_ptr(eax), ebx)
                },
            ),
            (
                "pf-write-ro",
                14,
                3,
                Some(u64::from(page(2) + 24)),
                2,
                page(2) + 24,
                |a, addr| {
                    a.mov(eax, addr)?;
                    a.mov(dword_ptr(eax), ebx)
                },
            ),
        ];
        if pae {
            cases.push((
                "pf-fetch-nx",
                14,
                0x11,
                Some(u64::from(page(3))),
                u64::from(u32::MAX),
                page(3),
                |a, addr| {
                    a.mov(eax, addr)?;
                    a.jmp(eax)
                },
            ));
        }
        let n = cases.len() as u64;
        for (cname, vector, error, want_cr2, dist, arg, body) in cases {
            // RESUME = address right after the body. 32-bit code has no EIP-relative
            // addressing, so: call/pop to learn EIP, plus the (measured) distance.
            let body_len = {
                let mut t = CodeAssembler::new(32)?;
                body(&mut t, arg)?;
                t.assemble(0)?.len()
            };
            // pop edx (1) + add edx, imm8 (3) + mov [abs32], edx (6) + body.
            let dist_to_after = 1 + 3 + 6 + body_len;
            let a = &mut g.a;
            let mut next = a.create_label();
            a.mov(d(layout::LAST_VECTOR), 0xff)?;
            a.mov(d(layout::LAST_ERROR), -1)?;
            a.mov(d(layout::EXC_MARK), 0)?;
            a.call(next)?;
            a.set_label(&mut next)?;
            a.pop(edx)?;
            a.add(edx, dist_to_after.min(127) as i32)?;
            a.mov(d(layout::RESUME), edx)?;
            body(a, arg)?;
            a.mov(eax, u32::from(layout::SEL_DATA))?;
            a.mov(ds, ax)?;
            g.print(&format!("{cname} v="))?;
            print_known(g, layout::LAST_VECTOR, 0xff, 2, vector)?;
            g.print(" e=")?;
            print_known(g, layout::LAST_ERROR, 0xffff_ffff, 8, error)?;
            if let Some(c) = want_cr2 {
                g.print(" cr2=")?;
                print_known(g, layout::LAST_CR2, 0xffff_ffff, 8, c)?;
            }
            if dist == u64::from(u32::MAX) {
                g.print(" eip=")?;
                print_known(g, layout::LAST_RIP, 0xffff_ffff, 8, u64::from(arg))?;
            } else {
                let a = &mut g.a;
                a.mov(eax, d(layout::EXC_MARK))?;
                a.shr(eax, 16)?;
                a.mov(d(layout::SCRATCH), eax)?;
                g.print(" d=")?;
                print_known(g, layout::SCRATCH, 0xff, 2, dist)?;
            }
            g.print("\n")?;
        }
        // Demand paging.
        let a = &mut g.a;
        a.mov(d(layout::PF_FIXUP), 1)?;
        for i in 4..12u64 {
            a.mov(eax, page(i) + 8 * i as u32)?;
            a.mov(dword_ptr(eax), (0x1111 * i) as u32)?;
        }
        a.xor(ecx, ecx)?;
        for i in 4..12u64 {
            a.mov(eax, (layout::PF_PHYS + 0x1000 * i + 8 * i) as u32)?;
            a.add(ecx, dword_ptr(eax))?;
        }
        a.mov(d(layout::SCRATCH), ecx)?;
        a.mov(eax, cr3)?;
        a.mov(cr3, eax)?;
        a.xor(ecx, ecx)?;
        for i in 4..12u64 {
            a.mov(eax, page(i) + 8 * i as u32)?;
            a.add(ecx, dword_ptr(eax))?;
            a.invlpg(byte_ptr(eax))?;
        }
        a.mov(d(layout::SCRATCH + 8), ecx)?;
        a.mov(eax, page(12))?;
        a.mov(ebx, dword_ptr(eax))?;
        a.mov(d(layout::PF_FIXUP), 0)?;
        let sum: u64 = (4..12u64).map(|i| 0x1111 * i).sum();
        g.print("faults=")?;
        print_known(g, layout::EXC_COUNT, 0xffff, 4, n + 8)?;
        g.print(" sum=")?;
        print_known(g, layout::SCRATCH, 0xffff_ffff, 8, sum)?;
        g.print(" sum-after-cr3=")?;
        print_known(g, layout::SCRATCH + 8, 0xffff_ffff, 8, sum)?;
        g.print("\n")?;
        // Accessed/Dirty bits of PTEs 4..16 (pages 1-3 only faulted: not checked).
        const A: u64 = 0x20;
        const D: u64 = 0x40;
        let entry = |i: usize| -> u64 {
            let flags = match i {
                4..=11 => PTE_P | PTE_RW | A | D,
                12 => PTE_P | PTE_RW | A,
                _ => PTE_P | PTE_RW,
            };
            (layout::PF_PHYS + 0x1000 * i as u64) | flags
        };
        let (pte_size, words): (u64, Vec<u32>) = if pae {
            (
                8,
                (4..16)
                    .flat_map(|i| {
                        let e = entry(i);
                        [e as u32, (e >> 32) as u32]
                    })
                    .collect(),
            )
        } else {
            (4, (4..16).map(|i| entry(i) as u32).collect())
        };
        let h = hash_u32s(words.iter().copied());
        g.expect.push_str(&format!("pt {h:08x}\n"));
        g.emit_str("pt ")?;
        let a = &mut g.a;
        a.mov(esi, (layout::PT + 4 * pte_size) as u32)?;
        a.mov(ecx, words.len() as u32)?;
        a.call(g.hash)?;
        a.mov(ecx, 8)?;
        a.call(g.puthex)?;
        g.emit_str("\n")?;
        let upper: Vec<(&str, u64, u64)> = if pae {
            vec![
                ("pd1[0]", layout::PD1, layout::PT | PTE_P | PTE_RW | A),
                ("pd0[0]", layout::PD0, 0x80 | PTE_P | PTE_RW | A | D),
                (
                    "pd0[1]",
                    layout::PD0 + 8,
                    (1 << 21) | 0x80 | PTE_P | PTE_RW | A,
                ),
            ]
        } else {
            vec![
                (
                    "pd[256]",
                    layout::PML4 + 4 * 256,
                    layout::PT | PTE_P | PTE_RW | A,
                ),
                ("pd[0]", layout::PML4, layout::PDPT | PTE_P | PTE_RW | A),
            ]
        };
        for (uname, addr, val) in upper {
            g.print(&format!("{uname}="))?;
            print_known(g, addr, 0xfff, 3, val)?;
            g.print(" ")?;
        }
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Self-modifying and cross-modifying code, which a decoded-block cache must notice:
/// code written into a buffer and called, rewritten and called again (same address,
/// new bytes); code written through one virtual mapping of a physical page and executed
/// through another (the identity alias); and a store that patches the immediate of the
/// very next instruction.
pub fn smc() -> Result<TestGuest, GuestError> {
    build("smc", Mode::Long64, |g| {
        g.print("keel-testguest smc\n")?;
        let buf = layout::DATA + 0x1000;
        let alias_virt = layout::PF_REGION + 0x1000 * 7;
        let alias_phys = layout::PF_PHYS + 0x1000 * 7;
        let out = layout::SCRATCH;
        // `mov eax, imm32; ret` = B8 imm32 C3, written as one qword (low 6 bytes).
        let code = |imm: u32| -> u64 { 0xb8 | (u64::from(imm) << 8) | (0xc3 << 40) };
        g.data = vec![0; 0x2000];
        let a = &mut g.a;
        for (i, imm) in [0x1111_1111u32, 0x2222_2222, 0x3333_3333]
            .iter()
            .enumerate()
        {
            a.mov(rax, code(*imm))?;
            a.mov(rbx, buf)?;
            a.mov(qword_ptr(rbx), rax)?;
            a.call(rbx)?;
            a.mov(qword_ptr(out + 8 * i as u64), rax)?;
        }
        // Write through PF_REGION page 7, execute through the identity map of the same
        // physical page; twice.
        for (i, imm) in [0x4444_4444u32, 0x5555_5555].iter().enumerate() {
            a.mov(rax, code(*imm))?;
            a.mov(rbx, alias_virt)?;
            a.mov(qword_ptr(rbx), rax)?;
            a.mov(rbx, alias_phys)?;
            a.call(rbx)?;
            a.mov(qword_ptr(out + 24 + 8 * i as u64), rax)?;
        }
        // Patch the immediate of the next instruction: `mov al, 0` becomes `mov al, 0x42`.
        let mut target = a.create_label();
        a.xor(eax, eax)?;
        a.lea(rbx, ptr(target))?;
        a.mov(byte_ptr(rbx + 1), 0x42)?;
        a.set_label(&mut target)?;
        a.mov(al, 0u32)?;
        a.mov(qword_ptr(out + 40), rax)?;
        let want = [
            0x1111_1111u64,
            0x2222_2222,
            0x3333_3333,
            0x4444_4444,
            0x5555_5555,
            0x42,
        ];
        for (i, w) in want.iter().enumerate() {
            g.print(&format!("r{i}="))?;
            print_known(g, out + 8 * i as u64, 0xffff_ffff, 8, *w)?;
            g.print(if i % 3 == 2 { "\n" } else { " " })?;
        }
        g.print("end\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Interrupt and exception delivery beyond single faults: `int 0x80` through a DPL 0 gate
/// from CPL 0 and through a DPL 3 trap gate from CPL 3 (stack switch to TSS.RSP0, CS in
/// the frame, return with `iretq`); a double fault (a #GP whose gate is not present gives
/// #NP, and two contributory exceptions make #DF) delivered on the IST1 stack.
pub fn interrupts() -> Result<TestGuest, GuestError> {
    interrupts_variant(false)
}

/// [`interrupts`] with only the double fault: KVM-PVM cannot run `int 0x80` at CPL 0 (the
/// VM stops with an emulation failure, like `int3`) and delivers it as #UD at CPL 3.
pub fn interrupts_pvm_safe() -> Result<TestGuest, GuestError> {
    interrupts_variant(true)
}

fn interrupts_variant(pvm_safe: bool) -> Result<TestGuest, GuestError> {
    build("interrupts", Mode::Long64, |g| {
        g.user_pages = true;
        let log = layout::RESULTS;
        let user_stack = layout::LOAD + 0x7_f000;
        let gate = |v: u64| layout::IDT + 16 * v;
        let mut int80 = g.a.create_label();
        let mut start = g.a.create_label();
        let mut user_entry = g.a.create_label();
        let mut back_in_kernel = g.a.create_label();
        g.a.jmp(start)?;
        {
            // int 0x80 handler: records CS and RSP of its frame, returns rdi + 1 in rax.
            let a = &mut g.a;
            a.set_label(&mut int80)?;
            a.mov(rax, qword_ptr(rsp + 8))?;
            a.mov(qword_ptr(layout::LAST_CS), rax)?;
            a.mov(qword_ptr(layout::LAST_RSP), rsp)?;
            a.lea(rax, qword_ptr(rdi + 1))?;
            a.iretq()?;
            a.set_label(&mut start)?;
        }
        g.gates.push((0x80, int80));
        g.print("keel-testguest interrupts\n")?;
        let a = &mut g.a;
        a.mov(eax, u32::from(layout::SEL_TSS))?;
        a.ltr(ax)?;
        if !pvm_safe {
            // From CPL 0 through the DPL 0 interrupt gate.
            a.mov(edi, 41)?;
            a.int(0x80)?;
            a.mov(qword_ptr(log), rax)?;
            a.mov(rax, qword_ptr(layout::LAST_CS))?;
            a.mov(qword_ptr(log + 8), rax)?;
            // The handler ran on the same stack: frame right below our RSP.
            a.mov(rax, rsp)?;
            a.sub(rax, qword_ptr(layout::LAST_RSP))?;
            a.mov(qword_ptr(log + 16), rax)?;
        }
        if !pvm_safe {
            // Make gate 0x80 a DPL 3 trap gate and go to user mode.
            a.mov(byte_ptr(gate(0x80) + 5), 0xef)?;
            a.push(i32::from(layout::SEL_USER_DATA | 3))?;
            a.mov(rax, user_stack)?;
            a.push(rax)?;
            a.push(0x202)?;
            a.push(i32::from(layout::SEL_USER_CODE64 | 3))?;
            a.lea(rax, ptr(user_entry))?;
            a.push(rax)?;
            a.iretq()?;
            a.set_label(&mut user_entry)?;
            a.mov(edi, 99)?;
            a.int(0x80)?;
            a.mov(qword_ptr(log + 24), rax)?;
            // Back to kernel mode through #UD and FINISH.
            a.lea(rax, ptr(back_in_kernel))?;
            a.mov(qword_ptr(layout::FINISH), rax)?;
            a.ud2()?;
            a.set_label(&mut back_in_kernel)?;
            a.mov(rsp, layout::STACK_TOP)?;
            a.mov(qword_ptr(layout::FINISH), 0)?;
            // The user-mode int 0x80 frame: CS was the user selector, the stack was RSP0.
            a.mov(rax, qword_ptr(layout::LAST_CS))?;
            a.mov(qword_ptr(log + 32), rax)?;
            a.mov(rax, layout::STACK_TOP)?;
            a.sub(rax, qword_ptr(layout::LAST_RSP))?;
            a.mov(qword_ptr(log + 40), rax)?;
        }
        // Double fault on IST1: gate 8 uses IST 1, gate 13 is made not present.
        a.mov(rax, layout::IST1_TOP)?;
        a.mov(qword_ptr(layout::TSS + 0x24), rax)?;
        a.mov(byte_ptr(gate(8) + 4), 1)?;
        a.mov(byte_ptr(gate(13) + 5), 0x0e)?;
        let mut after = a.create_label();
        a.lea(r10, ptr(after))?;
        a.mov(qword_ptr(layout::RESUME), r10)?;
        a.mov(eax, 0x58)?;
        a.mov(ds, ax)?;
        a.set_label(&mut after)?;
        a.mov(byte_ptr(gate(13) + 5), 0x8e)?;
        a.mov(rax, qword_ptr(layout::LAST_VECTOR))?;
        a.mov(qword_ptr(log + 48), rax)?;
        a.mov(rax, qword_ptr(layout::LAST_ERROR))?;
        a.mov(qword_ptr(log + 56), rax)?;
        a.mov(rax, layout::IST1_TOP)?;
        a.sub(rax, qword_ptr(layout::LAST_RSP))?;
        a.mov(qword_ptr(log + 64), rax)?;
        let lines: [(&str, u64, u64, u32, u64); 9] = [
            ("int80-rax", log, 0xff, 2, 42),
            ("cs", log + 8, 0xffff, 4, u64::from(layout::SEL_CODE64)),
            ("frame-below-rsp", log + 16, 0xff, 2, 40),
            ("user-int80-rax", log + 24, 0xff, 2, 100),
            (
                "cs",
                log + 32,
                0xffff,
                4,
                u64::from(layout::SEL_USER_CODE64 | 3),
            ),
            ("frame-below-rsp0", log + 40, 0xff, 2, 40),
            ("df-vector", log + 48, 0xff, 2, 8),
            ("error", log + 56, 0xffff, 4, 0),
            // The saved RIP sits 40 bytes below the IST top (the error code below it).
            ("frame-below-ist1", log + 64, 0xff, 2, 40),
        ];
        let skip = if pvm_safe { 6 } else { 0 };
        for (i, (name, addr, mask, digits, want)) in lines.iter().enumerate().skip(skip) {
            g.print(&format!("{name}="))?;
            print_known(g, *addr, *mask, *digits, *want)?;
            g.print(if i % 3 == 2 { "\n" } else { " " })?;
        }
        g.print("end\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// An exception with no usable IDT (limit 0) escalates to a triple fault: the run must
/// end in a shutdown (KVM_EXIT_SHUTDOWN; QEMU resets or, with `-no-reboot`, exits).
pub fn triple_fault() -> Result<TestGuest, GuestError> {
    let mut t = build("triplefault", Mode::Long64, |g| {
        g.print("keel-testguest triplefault\n")?;
        let a = &mut g.a;
        a.mov(qword_ptr(layout::SCRATCH), 0)?;
        a.mov(qword_ptr(layout::SCRATCH + 8), 0)?;
        a.lidt(ptr(layout::SCRATCH))?;
        a.ud2()?;
        g.print("not reached\n")?;
        g.unpredicted();
        g.exit(crate::EXIT_OK)
    })?;
    t.expected_serial = Some("keel-testguest triplefault\n".to_string());
    t.ends_in_triple_fault = true;
    Ok(t)
}

/// Addressing and the instructions around it that kernels lean on: `lea` with SIB,
/// scale and displacement (64- and 32-bit results), 32-bit address-size wrap-around
/// (`67` prefix), FS/GS bases from MSRs with `fs:`/`gs:` overrides and `swapgs`, bit-string
/// `bt`/`bts` on memory with large positive and negative offsets, `xlat`, stack ops
/// (`push imm`, 16-bit push, `ret imm16`, `enter`/`leave`), `loop`/`loopnz`/`jrcxz`, and
/// locked read-modify-write (`lock xadd`, `lock cmpxchg`, `xchg` with memory).
pub fn addressing() -> Result<TestGuest, GuestError> {
    build("addressing", Mode::Long64, |g| {
        g.print("keel-testguest addressing\n")?;
        let out = layout::RESULTS;
        let bits = layout::DATA; // 64 bytes of bit-string pattern, 64 bytes in
        let pattern: Vec<u8> = (0..192u32).map(|i| (i * 29 + 7) as u8).collect();
        g.data = pattern.clone();
        let fs_area = layout::DATA + 0x1000;
        let gs_area = layout::DATA + 0x2000;
        let kgs_area = layout::DATA + 0x3000;
        g.data.resize(0x3100, 0);
        for (area, v) in [(fs_area, 0xf5u64), (gs_area, 0x65), (kgs_area, 0x6b)] {
            let off = (area - layout::DATA) as usize + 8;
            g.data[off..off + 8].copy_from_slice(&(v * 0x0101_0101).to_le_bytes());
        }
        let mut want: Vec<(&str, u64)> = Vec::new();
        let mut slot = 0u64;
        let a = &mut g.a;
        let mut store =
            |a: &mut CodeAssembler, r: AsmRegister64, name: &'static str, w: u64| -> R {
                a.mov(qword_ptr(out + 8 * slot), r)?;
                want.push((name, w));
                slot += 1;
                Ok(())
            };
        // lea
        a.mov(rbx, 0x1000_0000_0000u64)?;
        a.mov(rcx, 0x123u64)?;
        a.lea(rax, qword_ptr(rbx + rcx * 8 + 0x1234_5678))?;
        store(a, rax, "lea64", 0x1000_0000_0000 + 0x123 * 8 + 0x1234_5678)?;
        a.mov(rbx, 0xffff_ffff_ffff_fff0u64)?;
        a.lea(eax, dword_ptr(rbx + rcx * 2 - 5))?;
        store(
            a,
            rax,
            "lea32",
            (0xffff_ffff_ffff_fff0u64.wrapping_add(0x246).wrapping_sub(5)) & 0xffff_ffff,
        )?;
        a.mov(rax, u64::MAX)?;
        a.lea(ax, word_ptr(rcx + rcx * 4 + 1))?;
        store(a, rax, "lea16", 0xffff_ffff_ffff_0000 | (0x123 * 5 + 1))?;
        // 32-bit address wrap: [ebx + ecx*4] with ebx = 0xfffffff0, ecx = 8 -> 0x10.
        a.mov(qword_ptr(0x10u64), 0x5a5a)?;
        a.mov(ebx, 0xffff_fff0u32)?;
        a.mov(ecx, 8)?;
        a.mov(eax, dword_ptr(ebx + ecx * 4))?;
        store(a, rax, "addr32-wrap", 0x5a5a)?;
        // FS/GS bases and swapgs.
        for (msr, base) in [
            (0xc000_0100u32, fs_area),
            (0xc000_0101, gs_area),
            (0xc000_0102, kgs_area),
        ] {
            a.mov(ecx, msr)?;
            a.mov(eax, base as u32)?;
            a.mov(edx, (base >> 32) as u32)?;
            a.wrmsr()?;
        }
        a.mov(rax, qword_ptr(8).fs())?;
        store(a, rax, "fs:8", 0xf5 * 0x0101_0101)?;
        a.mov(rax, qword_ptr(8).gs())?;
        store(a, rax, "gs:8", 0x65 * 0x0101_0101)?;
        a.swapgs()?;
        a.mov(rax, qword_ptr(8).gs())?;
        store(a, rax, "swapgs-gs:8", 0x6b * 0x0101_0101)?;
        a.mov(ecx, 0xc000_0102u32)?;
        a.rdmsr()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        store(a, rax, "kernel-gs-base", gs_area)?;
        a.swapgs()?;
        // Bit strings: bt with a register offset reaches outside the operand.
        a.mov(rbx, bits + 64)?;
        for (name, off) in [("bt+1000", 1000i64), ("bt-9", -9), ("bt+70", 70)] {
            a.mov(rax, off as u64)?;
            a.xor(edx, edx)?;
            a.bt(qword_ptr(rbx), rax)?;
            a.setc(dl)?;
            let byte = (64 + off.div_euclid(8)) as usize;
            let bit = off.rem_euclid(8);
            let v = pattern.get(byte).copied().unwrap_or(0);
            store(a, rdx, name, u64::from((v >> bit) & 1))?;
        }
        // bts at offset -13: sets bit 3 of byte 62 (relative to `bits`).
        a.mov(rax, -13i64 as u64)?;
        a.bts(dword_ptr(rbx), eax)?;
        a.movzx(eax, byte_ptr(bits + 62))?;
        store(a, rax, "bts-13", u64::from(pattern[62] | 8))?;
        // xlat: al = [rbx + al].
        a.mov(rbx, bits)?;
        a.mov(eax, 0xff05u32)?;
        a.xlatb()?;
        store(a, rax, "xlat", 0xff00 | u64::from(pattern[5]))?;
        // Stack: push imm (sign-extended), 16-bit push, ret imm16, enter/leave.
        a.mov(r12, rsp)?;
        a.push(-2)?;
        a.pop(rax)?;
        store(a, rax, "push-imm", u64::MAX - 1)?;
        a.push(0x1234)?;
        a.pop(rax)?;
        a.mov(rax, rsp)?;
        a.push(ax)?;
        a.mov(rdx, rsp)?;
        a.pop(ax)?;
        a.sub(rax, rdx)?;
        store(a, rax, "push16-delta", 2)?;
        let mut callee = a.create_label();
        let mut after_call = a.create_label();
        a.push(0x11)?;
        a.push(0x22)?;
        a.call(callee)?;
        a.jmp(after_call)?;
        a.set_label(&mut callee)?;
        a.ret_1(16)?;
        a.set_label(&mut after_call)?;
        a.mov(rax, r12)?;
        a.sub(rax, rsp)?;
        store(a, rax, "ret-imm16-delta", 0)?;
        a.mov(rbp, 0x7777u64)?;
        a.enter(32, 0)?;
        a.mov(rax, r12)?;
        a.sub(rax, rsp)?;
        a.mov(rdx, rbp)?;
        a.leave()?;
        store(a, rax, "enter-depth", 40)?;
        a.sub(rdx, r12)?;
        store(a, rdx, "enter-rbp", (-8i64) as u64)?;
        store(a, rbp, "leave-rbp", 0x7777)?;
        a.mov(rax, r12)?;
        a.sub(rax, rsp)?;
        store(a, rax, "leave-delta", 0)?;
        // loop / loopnz / jrcxz
        let mut l1 = a.create_label();
        a.mov(ecx, 5)?;
        a.xor(eax, eax)?;
        a.set_label(&mut l1)?;
        a.add(eax, 3)?;
        a.loop_(l1)?;
        store(a, rax, "loop", 15)?;
        let mut l2 = a.create_label();
        a.mov(ecx, 10)?;
        a.xor(edx, edx)?;
        a.set_label(&mut l2)?;
        a.inc(edx)?;
        a.cmp(edx, 4)?;
        a.loopne(l2)?;
        a.shl(rcx, 8)?;
        a.or(rdx, rcx)?;
        store(a, rdx, "loopnz", (6 << 8) | 4)?;
        let mut zero = a.create_label();
        let mut done = a.create_label();
        a.xor(ecx, ecx)?;
        a.mov(eax, 1)?;
        a.jrcxz(zero)?;
        a.mov(eax, 2)?;
        a.jmp(done)?;
        a.set_label(&mut zero)?;
        a.mov(eax, 3)?;
        a.set_label(&mut done)?;
        store(a, rax, "jrcxz", 3)?;
        // Locked read-modify-write on memory.
        let m = layout::SCRATCH;
        a.mov(qword_ptr(m), 100)?;
        a.mov(eax, 5)?;
        a.lock().xadd(qword_ptr(m), rax)?;
        a.mov(rdx, qword_ptr(m))?;
        a.shl(rdx, 16)?;
        a.or(rax, rdx)?;
        store(a, rax, "lock-xadd", (105 << 16) | 100)?;
        a.mov(eax, 105)?;
        a.mov(ebx, 7)?;
        a.lock().cmpxchg(qword_ptr(m), rbx)?;
        a.setz(dl)?;
        a.movzx(edx, dl)?;
        a.mov(rax, qword_ptr(m))?;
        a.shl(rdx, 16)?;
        a.or(rax, rdx)?;
        store(a, rax, "lock-cmpxchg", (1 << 16) | 7)?;
        a.mov(eax, 9)?;
        a.xchg(qword_ptr(m), rax)?;
        a.mov(rdx, qword_ptr(m))?;
        a.shl(rdx, 16)?;
        a.or(rax, rdx)?;
        store(a, rax, "xchg-mem", (9 << 16) | 7)?;
        for (i, (name, w)) in want.iter().enumerate() {
            g.print(&format!("{name}="))?;
            print_known(g, out + 8 * i as u64, u64::MAX, 16, *w)?;
            g.print(if i % 2 == 1 { "\n" } else { " " })?;
        }
        if want.len() % 2 == 1 {
            g.print("\n")?;
        }
        g.print("end\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Port I/O: byte `out`/`in` on the UART scratch register (0x3ff), the line status register
/// (0x3fd: transmitter empty, 0x60), `rep outsb` of a string to the data port, `insb` and
/// `rep insb` from the scratch register, with DF both ways.
pub fn port_io() -> Result<TestGuest, GuestError> {
    build("portio", Mode::Long64, |g| {
        let msg = b"outsb says hi\n";
        g.data = msg.to_vec();
        g.print("keel-testguest portio\n")?;
        let a = &mut g.a;
        a.mov(edx, 0x3ff)?;
        a.mov(al, 0xa5)?;
        a.out(dx, al)?;
        a.xor(eax, eax)?;
        a.in_(al, dx)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("scratch=")?;
        print_known(g, layout::SCRATCH, 0xff, 2, 0xa5)?;
        g.print("\n")?;
        let a = &mut g.a;
        a.mov(edx, 0x3fd)?;
        a.xor(eax, eax)?;
        a.in_(al, dx)?;
        a.and(al, 0x60)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("lsr=")?;
        print_known(g, layout::SCRATCH, 0xff, 2, 0x60)?;
        g.print("\n")?;
        g.expect.push_str(std::str::from_utf8(msg).unwrap_or(""));
        let a = &mut g.a;
        a.cld()?;
        a.mov(rsi, layout::DATA)?;
        a.mov(edx, u32::from(crate::SERIAL_PORT))?;
        a.mov(ecx, msg.len() as u32)?;
        a.rep().outsb()?;
        // rsi advanced by the length, rcx is zero.
        a.mov(rax, layout::DATA + msg.len() as u64)?;
        a.sub(rax, rsi)?;
        a.or(rax, rcx)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("outs-regs=")?;
        print_known(g, layout::SCRATCH, u64::MAX, 2, 0)?;
        g.print("\n")?;
        let a = &mut g.a;
        a.mov(edx, 0x3ff)?;
        a.mov(al, 0x3c)?;
        a.out(dx, al)?;
        a.mov(rdi, layout::SCRATCH + 8)?;
        a.mov(qword_ptr(rdi), 0)?;
        a.insb()?;
        a.mov(al, 0x7e)?;
        a.out(dx, al)?;
        a.mov(ecx, 3)?;
        a.rep().insb()?;
        a.std()?;
        a.mov(al, 0x11)?;
        a.out(dx, al)?;
        a.mov(rdi, layout::SCRATCH + 8 + 6)?;
        a.insb()?;
        a.cld()?;
        // rdi went down by one from SCRATCH+14.
        a.mov(rax, layout::SCRATCH + 8 + 5)?;
        a.sub(rax, rdi)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("ins=")?;
        print_known(g, layout::SCRATCH + 8, u64::MAX, 16, 0x0011_0000_7e7e_7e3c)?;
        g.print(" rdi-delta=")?;
        print_known(g, layout::SCRATCH, u64::MAX, 2, 0)?;
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

fn outb(a: &mut CodeAssembler, port: u16, value: u8) -> R {
    a.mov(al, value as u32)?;
    if port < 0x100 {
        a.out(i32::from(port), al)
    } else {
        a.mov(edx, u32::from(port))?;
        a.out(dx, al)
    }
}

fn inb_to_scratch(a: &mut CodeAssembler, port: u16) -> R {
    a.xor(eax, eax)?;
    if port < 0x100 {
        a.in_(al, i32::from(port))?;
    } else {
        a.mov(edx, u32::from(port))?;
        a.in_(al, dx)?;
    }
    a.mov(qword_ptr(layout::SCRATCH), rax)
}

/// Timer interrupts through the 8259 PIC and 8254 PIT, as Linux programs them: the PIC
/// init sequence (vectors 0x20/0x28, IRQ 0 unmasked), PIT channel 0 in mode 2 at 1 kHz, `sti`
/// and `hlt` until ten ticks were counted by the IRQ 0 handler (which sends a non-specific
/// EOI); then a counter latch, a read-back status, the ELCR, and the channel 2 / port 0x61
/// OUT2 calibration loop. Needs a machine with a PIC and a PIT ([`TestGuest::uses_pic_pit`]);
/// the entry stub puts a local APIC, if present, in virtual-wire mode (LINT0 = ExtINT).
///
/// Checked against QEMU 7.2 `-M pc` (tcg and kvm): identical output. QEMU's microvm has no
/// port 0x61 device (it reads 0xff), so there the `out2-before` field differs.
pub fn timer() -> Result<TestGuest, GuestError> {
    build("timer", Mode::Long64, |g| {
        g.uses_pic_pit = true;
        let ticks = layout::SCRATCH + 0x40;
        let mut handler = g.a.create_label();
        let mut spurious = g.a.create_label();
        let mut start = g.a.create_label();
        g.a.jmp(start)?;
        {
            let a = &mut g.a;
            a.set_label(&mut handler)?;
            a.push(rax)?;
            a.add(qword_ptr(ticks), 1)?;
            a.mov(al, 0x20u32)?;
            a.out(0x20, al)?;
            a.pop(rax)?;
            a.iretq()?;
            // APIC spurious interrupts need no EOI.
            a.set_label(&mut spurious)?;
            a.iretq()?;
            a.set_label(&mut start)?;
        }
        // The labels are bound now (CodeLabel is a copy: record them after `set_label`).
        g.gates.push((0x20, handler));
        g.gates.push((0xff, spurious));
        g.print("keel-testguest timer\n")?;
        let a = &mut g.a;
        for (port, v) in [
            (0x21, 0xff),
            (0xa1, 0xff),
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfe),
            (0xa1, 0xff),
        ] {
            outb(a, port, v)?;
        }
        inb_to_scratch(a, 0x21)?;
        g.print("imr=")?;
        print_known(g, layout::SCRATCH, 0xff, 2, 0xfe)?;
        g.print("\n")?;
        let a = &mut g.a;
        // PIT channel 0: mode 2, lobyte/hibyte, 1193 ticks (~1 kHz).
        outb(a, 0x43, 0x34)?;
        outb(a, 0x40, 0xa9)?;
        outb(a, 0x40, 0x04)?;
        a.mov(qword_ptr(ticks), 0)?;
        let mut wait = a.create_label();
        a.sti()?;
        a.set_label(&mut wait)?;
        a.hlt()?;
        a.cmp(qword_ptr(ticks), 10)?;
        a.jb(wait)?;
        a.cli()?;
        a.xor(eax, eax)?;
        a.cmp(qword_ptr(ticks), 10)?;
        a.setae(al)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("ticks>=10 ")?;
        print_known(g, layout::SCRATCH, 1, 1, 1)?;
        g.print("\n")?;
        // Counter latch: the value read is within the reload range.
        let a = &mut g.a;
        outb(a, 0x43, 0x00)?;
        a.xor(eax, eax)?;
        a.in_(al, 0x40)?;
        a.mov(ah, al)?;
        a.in_(al, 0x40)?;
        a.xchg(al, ah)?;
        a.cmp(eax, 0x4a9)?;
        a.setbe(al)?;
        a.movzx(eax, al)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("latch<=1193 ")?;
        print_known(g, layout::SCRATCH, 1, 1, 1)?;
        // Read-back status of channel 0: mode 2, lobyte/hibyte, binary (OUT masked).
        let a = &mut g.a;
        outb(a, 0x43, 0xe2)?;
        inb_to_scratch(a, 0x40)?;
        g.print(" status=")?;
        print_known(g, layout::SCRATCH, 0x3f, 2, 0x34)?;
        // No interrupt in service after the handler's EOI.
        let a = &mut g.a;
        outb(a, 0x20, 0x0b)?;
        inb_to_scratch(a, 0x20)?;
        outb(a, 0x20, 0x0a)?;
        g.print(" isr=")?;
        print_known(g, layout::SCRATCH, 0xff, 2, 0)?;
        g.print("\n")?;
        // Calibration as in Linux's pit_calibrate_tsc: gate on, speaker off, channel 2
        // mode 0 with a 10 ms count, then spin until OUT2 (port 0x61 bit 5) rises.
        let a = &mut g.a;
        a.in_(al, 0x61)?;
        a.and(al, 0xfc_u32 as i32)?;
        a.or(al, 1)?;
        a.out(0x61, al)?;
        outb(a, 0x43, 0xb0)?;
        outb(a, 0x42, 0x9c)?;
        outb(a, 0x42, 0x2e)?;
        a.in_(al, 0x61)?;
        a.and(eax, 0x20)?;
        a.mov(qword_ptr(layout::SCRATCH + 8), rax)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.in_(al, 0x61)?;
        a.test(al, 0x20)?;
        a.jz(spin)?;
        a.xor(eax, eax)?;
        a.in_(al, 0x61)?;
        a.and(eax, 0x21)?;
        a.mov(qword_ptr(layout::SCRATCH), rax)?;
        g.print("out2-before=")?;
        print_known(g, layout::SCRATCH + 8, 0xff, 2, 0)?;
        g.print(" out2-after=")?;
        print_known(g, layout::SCRATCH, 0xff, 2, 0x21)?;
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// CPL 3 in long mode: `ltr`, `iretq` to user code, SYSCALL/SYSRET (STAR, LSTAR, SFMASK,
/// EFER.SCE, RCX/R11 contents), and what user mode may not do: `hlt`, `cli`, `in`, `rdmsr`
/// (#GP(0)), `int3` through a DPL 0 gate (#GP with the IDT error code 0x1a), reading and
/// writing a supervisor page (#PF 5 and 7). Exceptions arrive on the TSS RSP0 stack and
/// return to user mode. On KVM-PVM this user code runs natively.
pub fn usermode() -> Result<TestGuest, GuestError> {
    usermode_variant(false)
}

/// [`usermode`] without what KVM-PVM cannot do, to compare kvm with tcg on such hosts:
/// * a guest-kernel `sysretq` raises #GP there: the SYSCALL handler returns with `iretq`;
/// * user mode sees the host's selectors (CS 0x33, SS 0x2b), not the guest's: not printed;
/// * `int3` at CPL 3 arrives as #BP regardless of the gate's DPL: left out.
pub fn usermode_pvm_safe() -> Result<TestGuest, GuestError> {
    usermode_variant(true)
}

fn usermode_variant(pvm_safe: bool) -> Result<TestGuest, GuestError> {
    let sysret = !pvm_safe;
    build("usermode", Mode::Long64, |g| {
        g.user_pages = true;
        g.pt_flags[5] = PTE_P | PTE_RW; // supervisor page
        g.pt_flags[6] = PTE_P | PTE_RW | PTE_US; // user page
        let log = layout::RESULTS;
        let user_stack = layout::LOAD + 0x7_f000;
        let page = |i: u64| layout::PF_REGION + 0x1000 * i;
        let mut syscall_entry = g.a.create_label();
        let mut user_entry = g.a.create_label();
        let mut do_exit = g.a.create_label();
        g.print("keel-testguest usermode\n")?;
        {
            let a = &mut g.a;
            a.mov(eax, u32::from(layout::SEL_TSS))?;
            a.ltr(ax)?;
            // EFER.SCE
            a.mov(ecx, 0xc000_0080u32)?;
            a.rdmsr()?;
            a.or(eax, 1)?;
            a.wrmsr()?;
            // STAR: SYSCALL CS=0x18 SS=0x20; SYSRET CS=0x38|3 SS=0x30|3.
            a.mov(ecx, 0xc000_0081u32)?;
            a.xor(eax, eax)?;
            a.mov(
                edx,
                (u32::from(layout::SEL_USER_CODE32) << 16) | u32::from(layout::SEL_CODE64),
            )?;
            a.wrmsr()?;
            // LSTAR
            a.mov(ecx, 0xc000_0082u32)?;
            a.lea(rax, ptr(syscall_entry))?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 32)?;
            a.wrmsr()?;
            // SFMASK: clear TF, IF, DF on entry.
            a.mov(ecx, 0xc000_0084u32)?;
            a.mov(eax, 0x700)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            // iretq to CPL 3 with IF set (nothing can interrupt: no PIC is programmed).
            a.push(i32::from(layout::SEL_USER_DATA | 3))?;
            a.mov(rax, user_stack)?;
            a.push(rax)?;
            a.push(0x202)?;
            a.push(i32::from(layout::SEL_USER_CODE64 | 3))?;
            a.lea(rax, ptr(user_entry))?;
            a.push(rax)?;
            a.iretq()?;

            // SYSCALL handler: rax = nr, rdi = arg. nr 60 ends the test; others return
            // rax + 2 * rdi.
            a.set_label(&mut syscall_entry)?;
            a.cmp(eax, 60)?;
            a.je(do_exit)?;
            a.lea(rax, qword_ptr(rax + rdi * 2))?;
            if sysret {
                a.sysretq()?;
            } else {
                // The same return through an interrupt frame (SYSCALL left RSP alone).
                a.mov(r10, rsp)?;
                a.push(i32::from(layout::SEL_USER_DATA | 3))?;
                a.push(r10)?;
                a.push(r11)?;
                a.push(i32::from(layout::SEL_USER_CODE64 | 3))?;
                a.push(rcx)?;
                a.iretq()?;
            }
        }

        // ---- user mode ----
        let record = |a: &mut CodeAssembler, slot: u64| -> R {
            let base = log + 0x100 + slot * 32;
            a.mov(rax, qword_ptr(layout::LAST_VECTOR))?;
            a.mov(qword_ptr(base), rax)?;
            a.mov(rax, qword_ptr(layout::LAST_ERROR))?;
            a.mov(qword_ptr(base + 8), rax)?;
            a.mov(rax, qword_ptr(layout::LAST_CR2))?;
            a.mov(qword_ptr(base + 16), rax)?;
            a.mov(rax, qword_ptr(layout::EXC_MARK))?;
            a.shr(rax, 16)?;
            a.mov(qword_ptr(base + 24), rax)
        };
        type Body = fn(&mut CodeAssembler, u64) -> R;
        // (name, vector, error, cr2, instruction length, argument, body)
        type UserCase = (&'static str, u64, u64, Option<u64>, u64, u64, Body);
        let mut cases: Vec<UserCase> = vec![
            ("hlt", 13, 0, None, 1, 0, |a, _| a.hlt()),
            ("cli", 13, 0, None, 1, 0, |a, _| a.cli()),
            ("in", 13, 0, None, 2, 0, |a, _| a.in_(al, 0x80)),
            ("rdmsr", 13, 0, None, 2, 0, |a, _| {
                a.mov(ecx, 0xc000_0080u32)?;
                a.rdmsr()
            }),
            ("int3", 13, 0x1a, None, 1, 0, |a, _| a.int3()),
            (
                "pf-user-read",
                14,
                5,
                Some(page(5) + 8),
                3,
                page(5) + 8,
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.mov(rbx, qword_ptr(rax))
                },
            ),
            (
                "pf-user-write",
                14,
                7,
                Some(page(5) + 16),
                3,
                page(5) + 16,
                |a, addr| {
                    a.mov(rax, addr)?;
                    a.mov(qword_ptr(rax), rbx)
                },
            ),
        ];
        if pvm_safe {
            cases.retain(|c| c.0 != "int3");
        }
        {
            let a = &mut g.a;
            a.set_label(&mut user_entry)?;
            // Selectors as user mode sees them.
            a.mov(eax, cs)?;
            a.mov(qword_ptr(log), rax)?;
            a.mov(eax, ss)?;
            a.mov(qword_ptr(log + 8), rax)?;
            // Plain computation at CPL 3.
            let mut lp = a.create_label();
            a.mov(ecx, 1000)?;
            a.xor(eax, eax)?;
            a.set_label(&mut lp)?;
            a.add(rax, rcx)?;
            a.dec(rcx)?;
            a.jnz(lp)?;
            a.mov(qword_ptr(log + 16), rax)?;
            // A user page is usable.
            a.mov(rax, page(6))?;
            a.mov(qword_ptr(rax), 0x77)?;
            a.mov(rbx, qword_ptr(rax))?;
            a.mov(qword_ptr(log + 24), rbx)?;
            // SYSCALL: rax = 5 + 2 * 19 = 43; rcx = return RIP; r11 = RFLAGS (0x246).
            let mut after = a.create_label();
            a.xor(edx, edx)?;
            a.mov(eax, 5)?;
            a.mov(edi, 19)?;
            a.syscall()?;
            a.set_label(&mut after)?;
            a.mov(qword_ptr(log + 32), rax)?;
            a.lea(rdx, ptr(after))?;
            a.sub(rcx, rdx)?;
            a.mov(qword_ptr(log + 40), rcx)?;
            a.mov(qword_ptr(log + 48), r11)?;
            a.mov(eax, cs)?;
            a.mov(qword_ptr(log + 56), rax)?;
            // popfq at CPL 3 with IOPL 0 leaves IF and IOPL alone (no fault).
            a.pushfq()?;
            a.pop(rax)?;
            a.and(eax, !0x200)?;
            a.or(eax, 0x3000)?;
            a.push(rax)?;
            a.popfq()?;
            a.pushfq()?;
            a.pop(rbx)?;
            a.and(ebx, 0x3200)?;
            a.mov(qword_ptr(log + 64), rbx)?;
        }
        for (slot, (_, _, _, _, _, arg, body)) in cases.iter().enumerate() {
            let a = &mut g.a;
            let mut after = a.create_label();
            a.mov(qword_ptr(layout::LAST_VECTOR), 0xff)?;
            a.mov(qword_ptr(layout::LAST_ERROR), -1)?;
            a.mov(qword_ptr(layout::LAST_CR2), 0)?;
            a.mov(qword_ptr(layout::EXC_MARK), 0)?;
            a.lea(r10, ptr(after))?;
            a.mov(qword_ptr(layout::RESUME), r10)?;
            body(a, *arg)?;
            a.set_label(&mut after)?;
            record(a, slot as u64)?;
        }
        {
            // End through an exception into kernel mode (KVM-PVM faults port I/O in a guest
            // kernel entered by SYSCALL, so the SYSCALL exit path is not used for this).
            let a = &mut g.a;
            a.lea(rax, ptr(do_exit))?;
            a.mov(qword_ptr(layout::FINISH), rax)?;
            a.ud2()?;
            // ---- back in kernel mode for good ----
            a.set_label(&mut do_exit)?;
            a.mov(rsp, layout::STACK_TOP)?;
        }
        if !pvm_safe {
            g.print("cs=")?;
            print_known(g, log, 0xffff, 4, u64::from(layout::SEL_USER_CODE64 | 3))?;
            g.print(" ss=")?;
            print_known(g, log + 8, 0xffff, 4, u64::from(layout::SEL_USER_DATA | 3))?;
            g.print(" ")?;
        }
        g.print("sum=")?;
        print_known(g, log + 16, u64::MAX, 8, 500_500)?;
        g.print(" user-page=")?;
        print_known(g, log + 24, u64::MAX, 2, 0x77)?;
        g.print(" popf-if-iopl=")?;
        print_known(g, log + 64, u64::MAX, 4, 0x200)?;
        g.print("\nsyscall rax=")?;
        print_known(g, log + 32, u64::MAX, 8, 43)?;
        g.print(" rcx-delta=")?;
        print_known(g, log + 40, u64::MAX, 2, 0)?;
        g.print(" r11=")?;
        print_known(g, log + 48, u64::MAX, 8, 0x246)?;
        if !pvm_safe {
            g.print(" cs-after-sysret=")?;
            print_known(
                g,
                log + 56,
                0xffff,
                4,
                u64::from(layout::SEL_USER_CODE64 | 3),
            )?;
        }
        g.print("\n")?;
        for (slot, (name, vector, error, want_cr2, len, _, _)) in cases.iter().enumerate() {
            let base = log + 0x100 + slot as u64 * 32;
            g.print(&format!("{name} v="))?;
            print_known(g, base, 0xff, 2, *vector)?;
            g.print(" e=")?;
            print_known(g, base + 8, 0xffff_ffff, 8, *error)?;
            if let Some(c) = want_cr2 {
                g.print(" cr2=")?;
                print_known(g, base + 16, u64::MAX, 16, *c)?;
            }
            g.print(" d=")?;
            print_known(g, base + 24, 0xff, 2, *len)?;
            g.print("\n")?;
        }
        g.print("count=")?;
        // The user cases plus the final ud2.
        print_known(g, layout::EXC_COUNT, u64::MAX, 4, cases.len() as u64 + 1)?;
        g.print("\nend\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Instructions one iteration of [`reg_loop`] executes.
pub const REG_LOOP_INSNS: u64 = 3;
/// Instructions one iteration of [`mem_loop`] executes.
pub const MEM_LOOP_INSNS: u64 = 5;

/// A register-only loop (`add`, `dec`, `jnz`) of `iterations` rounds, for MIPS benches.
/// Prints the sum 1 + 2 + ... + n (truncated to the mode's width) and exits.
pub fn reg_loop(mode: Mode, iterations: u64) -> Result<TestGuest, GuestError> {
    let name = match mode {
        Mode::Protected32 => "regloop32",
        Mode::Long64 => "regloop64",
    };
    let n = iterations.max(1);
    let mut t = build(name, mode, |g| {
        match mode {
            Mode::Long64 => {
                let a = &mut g.a;
                let mut lp = a.create_label();
                a.mov(rcx, n)?;
                a.xor(eax, eax)?;
                a.set_label(&mut lp)?;
                a.add(rax, rcx)?;
                a.dec(rcx)?;
                a.jnz(lp)?;
                a.mov(qword_ptr(layout::SCRATCH), rax)?;
                let sum = (u128::from(n) * (u128::from(n) + 1) / 2) as u64;
                g.print("sum=")?;
                print_known(g, layout::SCRATCH, u64::MAX, 16, sum)?;
            }
            Mode::Protected32 => {
                let a = &mut g.a;
                let mut lp = a.create_label();
                a.mov(ecx, n as u32)?;
                a.xor(eax, eax)?;
                a.set_label(&mut lp)?;
                a.add(eax, ecx)?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                let sum = (u128::from(n as u32) * (u128::from(n as u32) + 1) / 2) as u32;
                g.expect.push_str(&format!("sum={sum:08x}"));
                g.emit_str("sum=")?;
                g.a.mov(ecx, 8)?;
                g.a.call(g.puthex)?;
            }
        }
        g.print("\n")?;
        g.exit(crate::EXIT_OK)
    })?;
    t.instructions = Some(n * REG_LOOP_INSNS);
    Ok(t)
}

/// A load/add/store loop (`mov`, `add`, `mov`, `dec`, `jnz`) over one memory counter.
pub fn mem_loop(mode: Mode, iterations: u64) -> Result<TestGuest, GuestError> {
    let name = match mode {
        Mode::Protected32 => "memloop32",
        Mode::Long64 => "memloop64",
    };
    let n = iterations.max(1);
    let mut t = build(name, mode, |g| {
        g.data = vec![0; 8];
        match mode {
            Mode::Long64 => {
                let a = &mut g.a;
                let mut lp = a.create_label();
                a.mov(rbx, layout::DATA)?;
                a.mov(rcx, n)?;
                a.set_label(&mut lp)?;
                a.mov(rdx, qword_ptr(rbx))?;
                a.add(rdx, rcx)?;
                a.mov(qword_ptr(rbx), rdx)?;
                a.dec(rcx)?;
                a.jnz(lp)?;
                let sum = (u128::from(n) * (u128::from(n) + 1) / 2) as u64;
                g.print("sum=")?;
                print_known(g, layout::DATA, u64::MAX, 16, sum)?;
            }
            Mode::Protected32 => {
                let a = &mut g.a;
                let mut lp = a.create_label();
                a.mov(ebx, layout::DATA as u32)?;
                a.mov(ecx, n as u32)?;
                a.set_label(&mut lp)?;
                a.mov(edx, dword_ptr(ebx))?;
                a.add(edx, ecx)?;
                a.mov(dword_ptr(ebx), edx)?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                let sum = (u128::from(n as u32) * (u128::from(n as u32) + 1) / 2) as u32;
                g.expect.push_str(&format!("sum={sum:08x}"));
                g.emit_str("sum=")?;
                g.a.mov(eax, dword_ptr(ebx))?;
                g.a.mov(ecx, 8)?;
                g.a.call(g.puthex)?;
            }
        }
        g.print("\n")?;
        g.exit(crate::EXIT_OK)
    })?;
    t.instructions = Some(n * MEM_LOOP_INSNS);
    Ok(t)
}

/// Every guest with default parameters, smallest first.
pub fn all() -> Vec<Result<TestGuest, GuestError>> {
    vec![
        hello(Mode::Protected32),
        hello(Mode::Long64),
        exit_with(0x2a),
        port_io(),
        timer(),
        exceptions(),
        paging(),
        smc(),
        interrupts(),
        triple_fault(),
        addressing(),
        paging32(Paging32::TwoLevel),
        paging32(Paging32::Pae),
        usermode(),
        crate::simd::sse(),
        string_ops(),
        string_model(),
        alu(),
        shifts(),
        muldiv(),
        bitops(),
        misc(),
        alu_mem(),
        ops32_alu(),
        ops32_muldiv_bitops(),
        reg_loop(Mode::Protected32, 1000),
        reg_loop(Mode::Long64, 1000),
        mem_loop(Mode::Protected32, 1000),
        mem_loop(Mode::Long64, 1000),
    ]
}
