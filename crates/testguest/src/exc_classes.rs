//! Guests for three exception classes, one guest per class: debug exceptions
//! ([`debug_exceptions`]), page-walk faults ([`page_walk_faults`]) and the legacy 32-bit
//! instructions ([`legacy32`]).
//!
//! Each case runs a few instructions (at CPL 3 where it can, so that KVM-PVM runs it
//! natively) and prints one line: the vector taken (`ff`: none), the error code, DR6 as the
//! #DB handler read it, the distance from the pushed RIP to the resume point (the
//! instruction length for a fault, 0 for a trap), RF in the pushed EFLAGS, and for #PF CR2.
//! The predicted text follows the SDM; the differential tests compare it with KVM and QEMU.

use iced_x86::code_asm::*;

use crate::asm::{Guest, Mode, PTE_NX, PTE_P, PTE_RW, PTE_US, R, layout};
use crate::guests::{build, print_known};
use crate::{GuestError, TestGuest};

type Emit = fn(&mut CodeAssembler, &Labels) -> R;

/// Labels a case can refer to: `target` (set by the body on its key instruction) and
/// `after` (the resume point, set by the runner).
pub(crate) struct Labels {
    target: CodeLabel,
}

/// One case: where it runs, what it does, what it must print.
struct Case {
    name: &'static str,
    /// Runs at CPL 3 (64-bit guests only).
    user: bool,
    /// Kernel code before the body (debug registers, page tables).
    setup: Emit,
    /// The body; must `set_label` `target` if `resume_at_target` or the setup uses it.
    body: Emit,
    /// Kernel code after the body.
    teardown: Emit,
    /// The handler resumes at `target` (with RF set for #DB) instead of after the body.
    resume_at_target: bool,
    /// Expected: vector (0xff none), error (u32::MAX none), DR6, distance, RF, CR2 (printed
    /// when Some), extra value in SCRATCH+0x30 (printed when Some).
    want: Want,
}

#[derive(Clone, Copy)]
struct Want {
    v: u64,
    e: u64,
    dr6: u64,
    d: u64,
    rf: bool,
    cr2: Option<u64>,
    x: Option<u64>,
}

const NONE: Want = Want {
    v: 0xff,
    e: 0xffff_ffff,
    dr6: 0,
    d: 0,
    rf: false,
    cr2: None,
    x: None,
};

fn nop(_: &mut CodeAssembler, _: &Labels) -> R {
    Ok(())
}

const DR6_INIT: u64 = 0xffff_0ff0;
const USER_STACK: u64 = layout::LOAD + 0x7_f000;
/// A quadword the data breakpoints watch.
const WATCH: u64 = layout::SCRATCH + 0x60;

/// Emits every case and the final line.
fn run_cases(g: &mut Guest, cases: &[Case]) -> R {
    let l64 = g.mode == Mode::Long64;
    if l64 && cases.iter().any(|c| c.user) {
        g.a.mov(eax, u32::from(layout::SEL_TSS))?;
        g.a.ltr(ax)?;
    }
    for c in cases {
        let mut labels = Labels {
            target: g.a.create_label(),
        };
        let mut after = g.a.create_label();
        let mut body = g.a.create_label();
        let mut cont = g.a.create_label();
        let a = &mut g.a;
        (c.setup)(a, &labels)?;
        if l64 {
            for (var, v) in [
                (layout::LAST_VECTOR, 0xff),
                (layout::LAST_ERROR, -1),
                (layout::EXC_MARK, 0),
                (layout::LAST_DR6, 0),
                (layout::LAST_FLAGS, 0),
                (layout::LAST_CR2, 0),
            ] {
                a.mov(qword_ptr(var), v)?;
            }
            if c.resume_at_target {
                a.lea(r10, ptr(labels.target))?;
            } else {
                a.lea(r10, ptr(after))?;
            }
            a.mov(qword_ptr(layout::RESUME), r10)?;
            if c.user {
                a.lea(rax, ptr(cont))?;
                a.mov(qword_ptr(layout::FINISH), rax)?;
                a.mov(qword_ptr(layout::SAVED_RSP), rsp)?;
                a.push(i32::from(layout::SEL_USER_DATA | 3))?;
                a.mov(rax, USER_STACK)?;
                a.push(rax)?;
                a.push(2)?;
                a.push(i32::from(layout::SEL_USER_CODE64 | 3))?;
                a.lea(rax, ptr(body))?;
                a.push(rax)?;
                a.iretq()?;
            }
        } else {
            let d = |x: u64| dword_ptr(x as u32);
            for (var, v) in [
                (layout::LAST_VECTOR, 0xff),
                (layout::LAST_ERROR, -1),
                (layout::EXC_MARK, 0),
                (layout::LAST_DR6, 0),
                (layout::LAST_FLAGS, 0),
                (layout::LAST_CR2, 0),
            ] {
                a.mov(d(var), v)?;
                a.mov(d(var + 4), 0)?;
            }
            a.mov(d(layout::SCRATCH + 0x30), 0)?;
            // RESUME = the address after the body: 32-bit code has no EIP-relative
            // addressing, so call/pop plus the body's length, measured by assembling it
            // alone: pop edx (1) + add edx, imm8 (3) + mov [abs32], edx (6) + body.
            let body_len = {
                let mut t = CodeAssembler::new(32)?;
                let l = Labels {
                    target: t.create_label(),
                };
                (c.body)(&mut t, &l)?;
                t.assemble(0)?.len()
            };
            let mut next = a.create_label();
            a.call(next)?;
            a.set_label(&mut next)?;
            a.pop(edx)?;
            a.add(edx, (10 + body_len).min(127) as i32)?;
            a.mov(d(layout::RESUME), edx)?;
        }
        a.set_label(&mut body)?;
        if l64 {
            // Keeps `body` and a `target` on the body's first instruction apart.
            a.nop()?;
        }
        (c.body)(a, &labels)?;
        a.set_label(&mut after)?;
        // Snapshot (user-accessible): vector, error, DR6, flags, distance, CR2.
        if l64 {
            let snap = [
                layout::LAST_VECTOR,
                layout::LAST_ERROR,
                layout::LAST_DR6,
                layout::LAST_FLAGS,
            ];
            for (k, var) in snap.iter().enumerate() {
                a.mov(rax, qword_ptr(*var))?;
                a.mov(qword_ptr(layout::SCRATCH + 8 * k as u64), rax)?;
            }
            a.mov(rax, qword_ptr(layout::EXC_MARK))?;
            a.shr(rax, 16)?;
            a.mov(qword_ptr(layout::SCRATCH + 32), rax)?;
            a.mov(rax, qword_ptr(layout::LAST_CR2))?;
            a.mov(qword_ptr(layout::SCRATCH + 40), rax)?;
            a.mov(qword_ptr(layout::RESUME), 0)?;
            if c.user {
                // Back to the kernel: #GP (hlt at CPL 3) goes to FINISH.
                a.hlt()?;
                a.set_label(&mut cont)?;
                a.mov(rsp, qword_ptr(layout::SAVED_RSP))?;
                a.mov(qword_ptr(layout::FINISH), 0)?;
                a.mov(eax, u32::from(layout::SEL_DATA))?;
                a.mov(ds, ax)?;
                a.mov(es, ax)?;
                a.mov(ss, ax)?;
            } else {
                a.set_label(&mut cont)?;
            }
        } else {
            let d = |x: u64| dword_ptr(x as u32);
            let snap = [
                layout::LAST_VECTOR,
                layout::LAST_ERROR,
                layout::LAST_DR6,
                layout::LAST_FLAGS,
            ];
            for (k, var) in snap.iter().enumerate() {
                a.mov(eax, d(*var))?;
                a.mov(d(layout::SCRATCH + 8 * k as u64), eax)?;
            }
            a.mov(eax, d(layout::EXC_MARK))?;
            a.shr(eax, 16)?;
            a.mov(d(layout::SCRATCH + 32), eax)?;
            a.mov(eax, d(layout::LAST_CR2))?;
            a.mov(d(layout::SCRATCH + 40), eax)?;
            a.mov(d(layout::RESUME), 0)?;
            a.set_label(&mut cont)?;
        }
        (c.teardown)(a, &labels)?;
        let _ = &mut labels;
        let w = c.want;
        let s = layout::SCRATCH;
        if w.v == u64::MAX {
            g.print(&format!("{} x=", c.name))?;
            print_known(g, s + 0x30, 1, 1, w.x.unwrap_or(0))?;
            g.print("\n")?;
            continue;
        }
        g.print(&format!("{} v=", c.name))?;
        print_known(g, s, 0xff, 2, w.v)?;
        g.print(" e=")?;
        print_known(g, s + 8, 0xffff_ffff, 8, w.e)?;
        g.print(" dr6=")?;
        print_known(g, s + 16, 0xffff_ffff, 8, w.dr6)?;
        if w.d != u64::MAX {
            g.print(" d=")?;
            print_known(g, s + 32, 0xff, 2, w.d)?;
        }
        g.print(" rf=")?;
        print_known(g, s + 24, 0x1_0000, 5, if w.rf { 0x1_0000 } else { 0 })?;
        if let Some(want_cr2) = w.cr2 {
            g.print(" cr2=")?;
            let digits = if l64 { 16 } else { 8 };
            print_known(g, s + 40, u64::MAX, digits, want_cr2)?;
        }
        if let Some(x) = w.x {
            g.print(" x=")?;
            let digits = if l64 { 16 } else { 8 };
            print_known(g, s + 0x30, u64::MAX, digits, x)?;
        }
        g.print("\n")?;
    }
    g.print("end\n")?;
    g.exit(crate::EXIT_OK)
}

fn set_tf(a: &mut CodeAssembler) -> R {
    a.pushfq()?;
    a.or(qword_ptr(rsp), 0x100)?;
    a.popfq()
}

/// DR7 value enabling breakpoint `i` (L bit) with R/W `rw` and LEN `len`.
const fn dr7_bp(i: u32, rw: u64, len: u64) -> u64 {
    (1 << (2 * i)) | (rw << (16 + 4 * i)) | (len << (18 + 4 * i)) | 0x400
}

fn clear_dr7(a: &mut CodeAssembler, _: &Labels) -> R {
    a.mov(eax, 0x400)?;
    a.mov(dr7, rax)
}

/// Debug exceptions in long mode: single step after `popf` and `iretq` that set TF (and not
/// after the instruction that sets it), the `mov ss` shadow, `int1`, instruction breakpoints
/// (fault, RF suppresses one), data breakpoints (write, read/write, lengths 1/2/4/8, a read
/// against a write-only breakpoint), RF pushed by faults, DR access rules (CPL 3 #GP, DR4
/// aliasing DR6, DR5 with CR4.DE #UD, DR7.GD #DB with DR6.BD, DR6 upper half #GP), and the
/// legacy instructions that change meaning in 64-bit mode (INTO #UD, 63 = MOVSXD).
///
/// `pvm_safe`: only the cases that run at CPL 3 (KVM-PVM emulates guest kernel mode and
/// cannot be trusted with debug state there).
pub fn debug_exceptions(pvm_safe: bool) -> Result<TestGuest, GuestError> {
    debug_exceptions_without(pvm_safe, &[])
}

/// [`debug_exceptions`] without the cases named in `skip`.
pub fn debug_exceptions_without(pvm_safe: bool, skip: &[&str]) -> Result<TestGuest, GuestError> {
    let bs = DR6_INIT | 0x4000;
    let db_trap = |want_dr6: u64| Want {
        v: 1,
        e: 0,
        dr6: want_dr6,
        ..NONE
    };
    let mut cases = vec![
        Case {
            name: "tf-popf",
            user: true,
            setup: nop,
            body: |a, _| {
                set_tf(a)?;
                a.nop()
            },
            teardown: nop,
            resume_at_target: false,
            want: db_trap(bs),
        },
        Case {
            name: "tf-iretq",
            user: true,
            setup: nop,
            body: |a, l| {
                let mut t = l.target;
                a.mov(rax, rsp)?;
                a.mov(ecx, ss)?;
                a.push(rcx)?;
                a.push(rax)?;
                a.pushfq()?;
                a.or(qword_ptr(rsp), 0x100)?;
                a.mov(ecx, cs)?;
                a.push(rcx)?;
                a.lea(rax, ptr(t))?;
                a.push(rax)?;
                a.iretq()?;
                a.set_label(&mut t)?;
                a.nop()
            },
            teardown: nop,
            resume_at_target: false,
            want: db_trap(bs),
        },
        Case {
            name: "tf-mov-ss",
            user: true,
            setup: nop,
            body: |a, _| {
                a.mov(ecx, ss)?;
                set_tf(a)?;
                // The trap after `mov ss` waits for the next instruction.
                a.mov(ss, cx)?;
                a.nop()
            },
            teardown: nop,
            resume_at_target: false,
            want: db_trap(bs),
        },
        Case {
            name: "int1",
            user: true,
            setup: nop,
            body: |a, _| a.int1(),
            teardown: nop,
            resume_at_target: false,
            want: db_trap(DR6_INIT),
        },
        Case {
            name: "ibp",
            user: true,
            setup: |a, l| {
                a.lea(rax, ptr(l.target))?;
                a.mov(dr0, rax)?;
                a.mov(rax, dr7_bp(0, 0, 0))?;
                a.mov(dr7, rax)
            },
            body: |a, l| {
                let mut t = l.target;
                a.set_label(&mut t)?;
                a.inc(ebx)
            },
            teardown: clear_dr7,
            resume_at_target: false,
            want: Want {
                d: 2,
                ..db_trap(DR6_INIT | 1)
            },
        },
        Case {
            name: "ibp-rf",
            user: true,
            setup: |a, l| {
                a.lea(rax, ptr(l.target))?;
                a.mov(dr1, rax)?;
                a.mov(rax, dr7_bp(1, 0, 0))?;
                a.mov(dr7, rax)
            },
            body: |a, l| {
                let mut t = l.target;
                a.xor(ebx, ebx)?;
                a.set_label(&mut t)?;
                a.inc(ebx)?;
                a.mov(qword_ptr(layout::SCRATCH + 0x30), rbx)
            },
            teardown: clear_dr7,
            // The handler returns to the breakpoint with RF set: it runs once.
            resume_at_target: true,
            want: Want {
                d: 0,
                x: Some(1),
                ..db_trap(DR6_INIT | 2)
            },
        },
        Case {
            name: "dbp-write4",
            user: true,
            setup: |a, _| {
                a.mov(rax, WATCH)?;
                a.mov(dr1, rax)?;
                a.mov(rax, dr7_bp(1, 1, 3))?;
                a.mov(dr7, rax)
            },
            body: |a, _| a.mov(dword_ptr(WATCH + 2), eax),
            teardown: clear_dr7,
            resume_at_target: false,
            want: db_trap(DR6_INIT | 2),
        },
        Case {
            name: "dbp-read-rw2",
            user: true,
            setup: |a, _| {
                a.mov(rax, WATCH + 2)?;
                a.mov(dr2, rax)?;
                a.mov(rax, dr7_bp(2, 3, 1))?;
                a.mov(dr7, rax)
            },
            body: |a, _| a.mov(al, byte_ptr(WATCH + 3)),
            teardown: clear_dr7,
            resume_at_target: false,
            want: db_trap(DR6_INIT | 4),
        },
        Case {
            name: "dbp-read-vs-write-only",
            user: true,
            setup: |a, _| {
                a.mov(rax, WATCH)?;
                a.mov(dr3, rax)?;
                a.mov(rax, dr7_bp(3, 1, 3))?;
                a.mov(dr7, rax)
            },
            body: |a, _| a.mov(eax, dword_ptr(WATCH)),
            teardown: clear_dr7,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "dbp-len1-miss",
            user: true,
            setup: |a, _| {
                a.mov(rax, WATCH + 1)?;
                a.mov(dr0, rax)?;
                a.mov(rax, dr7_bp(0, 3, 0))?;
                a.mov(dr7, rax)
            },
            body: |a, _| a.mov(byte_ptr(WATCH), al),
            teardown: clear_dr7,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "dbp-len8-push",
            user: true,
            setup: |a, _| {
                a.mov(rax, USER_STACK - 8)?;
                a.mov(dr0, rax)?;
                a.mov(rax, dr7_bp(0, 1, 2))?;
                a.mov(dr7, rax)
            },
            body: |a, _| {
                a.push(rax)?;
                a.pop(rax)
            },
            teardown: clear_dr7,
            resume_at_target: false,
            // Trap after the push; resumed after the pop: RIP was the pop's (1 byte).
            want: Want {
                d: 1,
                ..db_trap(DR6_INIT | 1)
            },
        },
        Case {
            name: "rf-on-fault",
            user: true,
            setup: nop,
            body: |a, _| a.ud2(),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 6,
                d: 2,
                e: 0,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "dr-at-cpl3",
            user: true,
            setup: nop,
            body: |a, _| a.mov(rax, dr0),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 13,
                e: 0,
                d: 3,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "into-64",
            user: true,
            setup: nop,
            body: |a, _| a.db(&[0xce]),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 6,
                d: 1,
                e: 0,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "63-is-movsxd",
            user: true,
            setup: nop,
            body: |a, _| {
                a.mov(ebx, 0x8000_0001u32)?;
                a.mov(rax, -1i64)?;
                // 48 63 c3: movsxd rax, ebx (ARPL outside 64-bit mode).
                a.db(&[0x48, 0x63, 0xc3])?;
                a.mov(qword_ptr(layout::SCRATCH + 0x30), rax)
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                x: Some(0xffff_ffff_8000_0001),
                ..NONE
            },
        },
    ];
    if !pvm_safe {
        cases.extend([
            Case {
                name: "dr4-is-dr6",
                user: false,
                setup: nop,
                body: |a, _| {
                    a.mov(rax, 0xe00fu64)?;
                    a.mov(dr6, rax)?;
                    // mov rax, dr4 (iced-x86 spells DR4 as a register too).
                    a.db(&[0x0f, 0x21, 0xe0])?;
                    a.mov(qword_ptr(layout::SCRATCH + 0x30), rax)?;
                    a.xor(eax, eax)?;
                    a.mov(dr6, rax)
                },
                teardown: nop,
                resume_at_target: false,
                want: Want {
                    x: Some(DR6_INIT | 0xe00f),
                    ..NONE
                },
            },
            Case {
                name: "dr5-with-cr4-de",
                user: false,
                setup: |a, _| {
                    a.mov(rax, cr4)?;
                    a.or(eax, 8)?;
                    a.mov(cr4, rax)
                },
                body: |a, _| a.db(&[0x0f, 0x21, 0xe8]),
                teardown: |a, _| {
                    a.mov(rax, cr4)?;
                    a.and(eax, !8)?;
                    a.mov(cr4, rax)
                },
                resume_at_target: false,
                want: Want {
                    v: 6,
                    d: 3,
                    e: 0,
                    rf: true,
                    ..NONE
                },
            },
            Case {
                name: "dr7-gd",
                user: false,
                setup: |a, _| {
                    a.mov(eax, 0x2400)?;
                    a.mov(dr7, rax)
                },
                body: |a, _| a.mov(rax, dr0),
                // GD was cleared by the #DB.
                teardown: |a, _| {
                    a.mov(rax, dr7)?;
                    a.mov(qword_ptr(layout::SCRATCH + 0x30), rax)
                },
                resume_at_target: false,
                want: Want {
                    v: 1,
                    e: 0,
                    dr6: DR6_INIT | 0x2000,
                    d: 3,
                    rf: true,
                    x: Some(0x400),
                    ..NONE
                },
            },
            Case {
                name: "dr6-upper-half",
                user: false,
                setup: nop,
                body: |a, _| {
                    a.mov(rax, 1u64 << 32)?;
                    a.mov(dr6, rax)
                },
                teardown: nop,
                resume_at_target: false,
                want: Want {
                    v: 13,
                    e: 0,
                    d: 3,
                    rf: true,
                    ..NONE
                },
            },
            Case {
                name: "tf-kernel",
                user: false,
                setup: nop,
                body: |a, _| {
                    set_tf(a)?;
                    a.nop()
                },
                teardown: nop,
                resume_at_target: false,
                want: db_trap(bs),
            },
        ]);
    }
    if pvm_safe {
        // KVM-PVM does not deliver hardware breakpoints that the guest kernel armed in
        // DR0-DR7 (measured: no #DB at all).
        cases.retain(|c| !c.name.starts_with("ibp") && !c.name.starts_with("dbp"));
    }
    cases.retain(|c| !skip.contains(&c.name));
    let name = if pvm_safe { "debug-user" } else { "debug" };
    build(name, Mode::Long64, |g| {
        g.user_pages = true;
        g.print(&format!("keel-testguest {name}\n"))?;
        run_cases(g, &cases)
    })
}

/// PF_REGION page `i`.
const fn page(i: u64) -> u64 {
    layout::PF_REGION + 0x1000 * i
}

fn pf(e: u64, fault_addr: u64, d: u64) -> Want {
    Want {
        v: 14,
        e,
        d,
        rf: true,
        cr2: Some(fault_addr),
        ..NONE
    }
}

fn reload_cr3(a: &mut CodeAssembler) -> R {
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)
}

/// #PF error codes of 4-level page walks: reserved bits at every level (an address bit above
/// MAXPHYADDR — bit 51, and the bit CPUID leaf 0x8000_0008 names —, PS in a PML4E, bits
/// 20:13 of a 2 MiB PDE, 29:13 of a 1 GiB PDPTE, XD while EFER.NXE is clear), ignored bits
/// that are not reserved, the P/W/U/I/D bits, CR2, RF in the pushed flags; and that CR4.SMEP
/// and CR4.SMAP can be set exactly when CPUID advertises them.
///
/// `pvm_safe`: only the cases whose access runs at CPL 3 (their setup still writes page
/// tables and EFER in the guest kernel).
pub fn page_walk_faults(pvm_safe: bool) -> Result<TestGuest, GuestError> {
    page_walk_faults_without(pvm_safe, &[])
}

/// [`page_walk_faults`] without the cases named in `skip`.
pub fn page_walk_faults_without(pvm_safe: bool, skip: &[&str]) -> Result<TestGuest, GuestError> {
    const US: u64 = PTE_P | PTE_RW | PTE_US;
    let rsvd_u = 0x8 | 0x4 | 0x1;
    let mut cases = vec![
        Case {
            name: "pte-bit51",
            user: true,
            setup: nop,
            body: |a, _| a.mov(rax, qword_ptr(page(8) + 8)),
            teardown: nop,
            resume_at_target: false,
            want: pf(rsvd_u, page(8) + 8, 10),
        },
        Case {
            name: "pte-bit52-ignored",
            user: true,
            setup: nop,
            body: |a, _| a.mov(rax, qword_ptr(page(9) + 8)),
            teardown: nop,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "pte-maxphyaddr",
            user: true,
            setup: |a, _| {
                a.mov(eax, 0x8000_0008u32)?;
                a.cpuid()?;
                a.movzx(ecx, al)?;
                a.mov(rax, layout::PT + 11 * 8)?;
                a.bts(qword_ptr(rax), rcx)?;
                a.mov(rax, page(11))?;
                a.invlpg(byte_ptr(rax))
            },
            body: |a, _| a.mov(rax, qword_ptr(page(11) + 16)),
            teardown: nop,
            resume_at_target: false,
            want: pf(rsvd_u, page(11) + 16, 10),
        },
        Case {
            name: "pte-xd-user-read",
            user: true,
            setup: nop,
            body: |a, _| a.mov(rax, qword_ptr(page(10))),
            teardown: nop,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "pte-xd-user-fetch",
            user: true,
            setup: nop,
            body: |a, _| {
                a.mov(rax, page(10))?;
                a.call(rax)
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                d: u64::MAX,
                ..pf(0x15, page(10), 0)
            },
        },
        Case {
            name: "pde-bit51",
            user: true,
            setup: |a, _| {
                a.mov(rax, layout::PD1)?;
                a.bts(qword_ptr(rax), 51)?;
                reload_cr3(a)
            },
            body: |a, _| a.mov(qword_ptr(page(0)), rax),
            teardown: |a, _| {
                a.mov(rax, layout::PD1)?;
                a.btr(qword_ptr(rax), 51)?;
                reload_cr3(a)
            },
            resume_at_target: false,
            want: pf(rsvd_u | 2, page(0), 10),
        },
        Case {
            name: "pde-2m-bit13",
            user: true,
            setup: |a, _| {
                a.mov(rax, 0x20_2000u64 | 0x80 | US)?;
                a.mov(qword_ptr(layout::PD1 + 8), rax)?;
                reload_cr3(a)
            },
            body: |a, _| a.mov(rax, qword_ptr(layout::PF_REGION + 0x20_0000)),
            teardown: |a, _| {
                a.mov(qword_ptr(layout::PD1 + 8), 0)?;
                reload_cr3(a)
            },
            resume_at_target: false,
            want: pf(rsvd_u, layout::PF_REGION + 0x20_0000, 10),
        },
        Case {
            name: "pdpte-1g-bit13",
            user: true,
            setup: |a, _| {
                a.mov(rax, 0x8000_2000u64 | 0x80 | US)?;
                a.mov(qword_ptr(layout::PDPT + 16), rax)?;
                reload_cr3(a)
            },
            body: |a, _| a.mov(rax, qword_ptr(0x8000_0000u64 + 0x40)),
            teardown: |a, _| {
                a.mov(qword_ptr(layout::PDPT + 16), 0)?;
                reload_cr3(a)
            },
            resume_at_target: false,
            want: pf(rsvd_u, 0x8000_0040, 10),
        },
        Case {
            name: "pml4e-ps",
            user: true,
            setup: |a, _| {
                a.mov(rax, layout::PDPT | 0x80 | US)?;
                a.mov(qword_ptr(layout::PML4 + 8), rax)?;
                reload_cr3(a)
            },
            body: |a, _| {
                a.mov(rcx, 0x80_0000_0000u64)?;
                a.mov(rax, qword_ptr(rcx))
            },
            teardown: |a, _| {
                a.mov(qword_ptr(layout::PML4 + 8), 0)?;
                reload_cr3(a)
            },
            resume_at_target: false,
            want: pf(rsvd_u, 0x80_0000_0000, 3),
        },
        Case {
            name: "user-write-ro",
            user: true,
            setup: nop,
            body: |a, _| a.mov(qword_ptr(page(12)), rax),
            teardown: nop,
            resume_at_target: false,
            want: pf(0x7, page(12), 10),
        },
        Case {
            name: "user-read-supervisor",
            user: true,
            setup: nop,
            body: |a, _| a.mov(rax, qword_ptr(page(13))),
            teardown: nop,
            resume_at_target: false,
            want: pf(0x5, page(13), 10),
        },
        Case {
            name: "user-not-present-rsvd",
            user: true,
            setup: nop,
            body: |a, _| a.mov(qword_ptr(page(14)), rax),
            teardown: nop,
            resume_at_target: false,
            // Reserved bits in a non-present entry are not looked at.
            want: pf(0x6, page(14), 10),
        },
    ];
    if !pvm_safe {
        // KVM-PVM keeps treating XD as valid after the guest clears EFER.NXE.
        cases.push(Case {
            name: "pte-xd-without-nxe",
            user: true,
            setup: |a, _| {
                a.mov(ecx, 0xc000_0080u32)?;
                a.rdmsr()?;
                a.and(eax, !0x800)?;
                a.wrmsr()?;
                reload_cr3(a)
            },
            body: |a, _| a.mov(rax, qword_ptr(page(10) + 24)),
            teardown: |a, _| {
                a.mov(ecx, 0xc000_0080u32)?;
                a.rdmsr()?;
                a.or(eax, 0x800)?;
                a.wrmsr()
            },
            resume_at_target: false,
            want: pf(rsvd_u, page(10) + 24, 10),
        });
        for (name, cr4_bit, cpuid_bit) in [("cr4-smep", 20u32, 7u32), ("cr4-smap", 21, 20)] {
            // The body tries to set the bit; the teardown computes 1 when a #GP came
            // exactly when CPUID leaf 7 does not advertise the feature, and clears it again.
            // Tried only when CPUID does not advertise the feature: with it, SMEP would stop
            // this kernel running on its user-accessible pages.
            let setup: Emit = if cr4_bit == 20 {
                |a, _| try_cr4(a, 7, 20)
            } else {
                |a, _| try_cr4(a, 20, 21)
            };
            let teardown: Emit = if cpuid_bit == 7 {
                |a, _| consistency(a, 7, 20)
            } else {
                |a, _| consistency(a, 20, 21)
            };
            cases.push(Case {
                name,
                user: false,
                setup,
                body: |a, _| a.mov(cr4, rax),
                teardown,
                resume_at_target: false,
                want: Want {
                    v: u64::MAX,
                    x: Some(1),
                    ..NONE
                },
            });
        }
        cases.push(Case {
            name: "kernel-fetch-xd",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(rax, page(10))?;
                a.call(rax)
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                d: u64::MAX,
                ..pf(0x11, page(10), 0)
            },
        });
    }
    cases.retain(|c| !skip.contains(&c.name));
    let name = if pvm_safe {
        "pagewalk-user"
    } else {
        "pagewalk"
    };
    build(name, Mode::Long64, |g| {
        g.user_pages = true;
        g.pt_flags[8] = US | (1 << 51);
        g.pt_flags[9] = US | (1 << 52);
        g.pt_flags[10] = US | PTE_NX;
        g.pt_flags[11] = US;
        g.pt_flags[12] = PTE_P | PTE_US;
        g.pt_flags[13] = PTE_P | PTE_RW;
        g.pt_flags[14] = (1 << 51) | PTE_RW | PTE_US;
        g.print(&format!("keel-testguest {name}\n"))?;
        run_cases(g, &cases)
    })
}

/// Setup of the CR4 feature cases: RAX = CR4, with bit `cr4_bit` set when CPUID.7 EBX bit
/// `cpuid_bit` is clear.
fn try_cr4(a: &mut CodeAssembler, cpuid_bit: u32, cr4_bit: u32) -> R {
    let mut skip = a.create_label();
    a.mov(eax, 7)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.mov(rax, cr4)?;
    a.bt(ebx, cpuid_bit)?;
    a.jc(skip)?;
    a.bts(rax, cr4_bit)?;
    a.set_label(&mut skip)?;
    a.nop()
}

/// Teardown of the CR4 feature cases: SCRATCH+0x30 = 1 when (a #GP was taken) == (CPUID.7
/// EBX bit `cpuid_bit` clear); then CR4 bit `cr4_bit` is cleared.
fn consistency(a: &mut CodeAssembler, cpuid_bit: u32, cr4_bit: u32) -> R {
    a.mov(eax, 7)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.bt(ebx, cpuid_bit)?;
    a.setnc(al)?;
    a.cmp(qword_ptr(layout::SCRATCH), 13)?;
    // (Advertised and no fault, or not advertised and #GP.)
    a.sete(cl)?;
    a.cmp(al, cl)?;
    a.sete(al)?;
    a.movzx(eax, al)?;
    a.mov(qword_ptr(layout::SCRATCH + 0x30), rax)?;
    a.mov(rax, cr4)?;
    a.btr(rax, cr4_bit)?;
    a.mov(cr4, rax)
}

/// The legacy 32-bit instructions in protected mode (CPL 0): BOUND in and out of range
/// (#BR, a fault; 16- and 32-bit forms), INTO with and without OF (#OF, a trap), ARPL, far
/// transfers that fault (#GP with the selector as error code: a data segment, past the GDT
/// limit, the null selector); single step in 32-bit code.
pub fn legacy32() -> Result<TestGuest, GuestError> {
    const BOUNDS: u64 = layout::SCRATCH + 0x60;
    let d32 = |x: u64| dword_ptr(x as u32);
    let _ = d32;
    let cases = vec![
        Case {
            name: "bound-in",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(dword_ptr(BOUNDS as u32), -5)?;
                a.mov(dword_ptr(BOUNDS as u32 + 4), 10)?;
                a.mov(eax, -5)?;
                a.bound(eax, qword_ptr(BOUNDS as u32))
            },
            teardown: nop,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "bound-below",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(dword_ptr(BOUNDS as u32), -5)?;
                a.mov(dword_ptr(BOUNDS as u32 + 4), 10)?;
                a.mov(eax, -6)?;
                a.bound(eax, qword_ptr(BOUNDS as u32))
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 5,
                e: 0,
                d: 6,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "bound-above",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(dword_ptr(BOUNDS as u32), -5)?;
                a.mov(dword_ptr(BOUNDS as u32 + 4), 10)?;
                a.mov(eax, 11)?;
                a.bound(eax, qword_ptr(BOUNDS as u32))
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 5,
                e: 0,
                d: 6,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "bound16-in",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(dword_ptr(BOUNDS as u32), 0x7fff_8000u32 as i32)?;
                a.mov(eax, 0x8000)?;
                a.bound(ax, dword_ptr(BOUNDS as u32))
            },
            teardown: nop,
            resume_at_target: false,
            // Word bounds -32768 (0x8000) .. 32767 (0x7fff): ax = 0x8000 is the lower bound.
            want: NONE,
        },
        Case {
            name: "into-of",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(al, 0x7f)?;
                a.add(al, 1)?;
                a.into()
            },
            teardown: nop,
            resume_at_target: false,
            want: Want { v: 4, e: 0, ..NONE },
        },
        Case {
            name: "into-no-of",
            user: false,
            setup: nop,
            body: |a, _| {
                a.xor(eax, eax)?;
                a.into()
            },
            teardown: nop,
            resume_at_target: false,
            want: NONE,
        },
        Case {
            name: "arpl",
            user: false,
            setup: nop,
            body: |a, _| {
                a.mov(eax, 0x10)?;
                a.mov(ebx, 3)?;
                a.arpl(ax, bx)?;
                a.setz(bl)?;
                a.shl(ebx, 16)?;
                a.mov(bx, ax)?;
                a.mov(dword_ptr(layout::SCRATCH as u32 + 0x30), ebx)
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                x: Some(0x1_0013),
                ..NONE
            },
        },
        Case {
            name: "jmp-far-data-seg",
            user: false,
            setup: nop,
            body: |a, _| a.db(&[0xea, 0, 0, 0, 0, 0x10, 0]),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 13,
                e: 0x10,
                d: 7,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "call-far-past-gdt",
            user: false,
            setup: nop,
            body: |a, _| a.db(&[0x9a, 0, 0, 0, 0, 0x58, 0]),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 13,
                e: 0x58,
                d: 7,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "jmp-far-null",
            user: false,
            setup: nop,
            body: |a, _| a.db(&[0xea, 0, 0, 0, 0, 0, 0]),
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 13,
                e: 0,
                d: 7,
                rf: true,
                ..NONE
            },
        },
        Case {
            name: "tf-popfd",
            user: false,
            setup: nop,
            body: |a, _| {
                a.pushfd()?;
                a.or(dword_ptr(esp), 0x100)?;
                a.popfd()?;
                a.nop()
            },
            teardown: nop,
            resume_at_target: false,
            want: Want {
                v: 1,
                e: 0,
                dr6: DR6_INIT | 0x4000,
                ..NONE
            },
        },
    ];
    build("legacy32", Mode::Protected32, |g| {
        g.print("keel-testguest legacy32\n")?;
        run_cases(g, &cases)
    })
}
