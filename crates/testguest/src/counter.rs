//! A guest that counts and prints: the guest the snapshot tests stop mid-run, save, restore
//! (on the same or another backend) and let finish.

use iced_x86::code_asm::*;

use crate::asm::{Mode, layout};
use crate::guests::build;
use crate::{GuestError, TestGuest};

/// Counts from 1 to `count` in 64-bit mode, printing one line per step:
/// `i=<8 hex> s=<16 hex> x=<16 hex>`, where `s` is a running `s = 3s + i` in a register
/// and `x` a running sum of `i` in memory (so the line depends on register, memory and
/// stack state), then exits with [`crate::EXIT_OK`]. Each line is 40 bytes of serial output.
/// No SSE: KVM-PVM cannot emulate SSE instructions in guest kernel mode.
pub fn counter(count: u32) -> Result<TestGuest, GuestError> {
    let n = count.max(1);
    let mut t = build("counter", Mode::Long64, |g| {
        let mut lp = g.a.create_label();
        g.a.mov(r12d, 1u32)?;
        g.a.xor(r13d, r13d)?;
        g.a.mov(qword_ptr(layout::SCRATCH), r13)?;
        g.a.set_label(&mut lp)?;
        g.a.lea(r13, qword_ptr(r13 + r13 * 2))?;
        g.a.add(r13, r12)?;
        g.a.add(qword_ptr(layout::SCRATCH), r12)?;
        g.emit_str("i=")?;
        g.a.mov(rax, r12)?;
        g.a.mov(ecx, 8u32)?;
        g.a.call(g.puthex)?;
        g.emit_str(" s=")?;
        g.a.mov(rax, r13)?;
        g.a.mov(ecx, 16u32)?;
        g.a.call(g.puthex)?;
        g.emit_str(" x=")?;
        g.a.mov(rax, qword_ptr(layout::SCRATCH))?;
        g.a.mov(ecx, 16u32)?;
        g.a.call(g.puthex)?;
        g.emit_str("\n")?;
        g.a.inc(r12)?;
        g.a.cmp(r12, i32::try_from(n).unwrap_or(i32::MAX) + 1)?;
        g.a.jne(lp)?;
        g.exit(crate::EXIT_OK)
    })?;
    let mut s = 0u64;
    let mut x = 0u64;
    let mut out = String::new();
    for i in 1..=u64::from(n) {
        s = s.wrapping_mul(3).wrapping_add(i);
        x = x.wrapping_add(i);
        out.push_str(&format!("i={i:08x} s={s:016x} x={x:016x}\n"));
    }
    t.expected_serial = Some(out);
    Ok(t)
}

/// Pages [`counter_dirty`] keeps rewriting, at [`layout::RESULTS`].
pub const DIRTY_PAGES: u64 = 64;
/// Qwords of a page [`counter_dirty`] fills by `rep stosq` after the first (KVM-PVM
/// emulates string instructions in guest kernel mode one element at a time: keep it short).
const FILL: u64 = 31;
/// Time-stamp counter ticks [`counter_dirty`] waits at each step (about 0.1 ms at the 2 to
/// 3 GHz of current hosts): what keeps a run under the interpreter, which prints fast,
/// seconds long, while under KVM it adds little to the cost of the step's exits. Measured
/// on the TSC rather than counted in iterations, so the guest needs not know which
/// accelerator runs it (its CPUID is the same on both, and stays the one it started with
/// when it moves).
const SPIN_TSC: i32 = 300_000;

/// [`counter`] that also keeps rewriting memory, for live migration: step `i` visits page
/// `k = i mod 64` of a buffer, adds its qword 31 (what the previous visit's `rep stosq`
/// left) to the running `x` in memory, adds `i` to the page's first qword, and fills
/// qwords 1..=31 with that new value by `rep stosq`, then waits [`SPIN_TSC`] TSC ticks. A
/// page whose plain or string store was lost on the way (not sent again after it was
/// written) shows in a later `x`. Prints `i=<8 hex> s=<16 hex> x=<16 hex>` as [`counter`]
/// every `every` steps (a power of two; fewer lines make fewer exits under kvm), then
/// exits with [`crate::EXIT_OK`].
pub fn counter_dirty(count: u32, every: u32) -> Result<TestGuest, GuestError> {
    let n = count.max(1);
    let every = every.max(1).next_power_of_two();
    let mut t = build("counter-dirty", Mode::Long64, |g| {
        let mut lp = g.a.create_label();
        let mut quiet = g.a.create_label();
        g.a.mov(r12d, 1u32)?;
        g.a.xor(r13d, r13d)?;
        g.a.mov(qword_ptr(layout::SCRATCH), r13)?;
        g.a.set_label(&mut lp)?;
        g.a.lea(r13, qword_ptr(r13 + r13 * 2))?;
        g.a.add(r13, r12)?;
        // rbx = the page of this step.
        g.a.mov(rbx, r12)?;
        g.a.and(rbx, (DIRTY_PAGES - 1) as i32)?;
        g.a.shl(rbx, 12)?;
        g.a.add(rbx, layout::RESULTS as i32)?;
        g.a.mov(rax, qword_ptr(rbx + 8 * FILL))?;
        g.a.add(qword_ptr(layout::SCRATCH), rax)?;
        g.a.mov(rax, qword_ptr(rbx))?;
        g.a.add(rax, r12)?;
        g.a.mov(qword_ptr(rbx), rax)?;
        g.a.lea(rdi, qword_ptr(rbx + 8))?;
        g.a.mov(ecx, FILL as u32)?;
        g.a.cld()?;
        g.a.rep().stosq()?;
        // Wait SPIN_TSC ticks (see there why). The distance from the start is compared
        // unsigned, so a TSC that jumps (backwards too: the TSC a KVM-PVM guest reads is
        // not the one KVM saves) ends the wait rather than stretching it.
        let mut spin = g.a.create_label();
        g.a.rdtsc()?;
        g.a.shl(rdx, 32)?;
        g.a.or(rax, rdx)?;
        g.a.mov(r14, rax)?;
        g.a.set_label(&mut spin)?;
        g.a.rdtsc()?;
        g.a.shl(rdx, 32)?;
        g.a.or(rax, rdx)?;
        g.a.sub(rax, r14)?;
        g.a.cmp(rax, SPIN_TSC)?;
        g.a.jb(spin)?;
        g.a.test(r12d, (every - 1) as i32)?;
        g.a.jnz(quiet)?;
        g.emit_str("i=")?;
        g.a.mov(rax, r12)?;
        g.a.mov(ecx, 8u32)?;
        g.a.call(g.puthex)?;
        g.emit_str(" s=")?;
        g.a.mov(rax, r13)?;
        g.a.mov(ecx, 16u32)?;
        g.a.call(g.puthex)?;
        g.emit_str(" x=")?;
        g.a.mov(rax, qword_ptr(layout::SCRATCH))?;
        g.a.mov(ecx, 16u32)?;
        g.a.call(g.puthex)?;
        g.emit_str("\n")?;
        g.a.set_label(&mut quiet)?;
        g.a.inc(r12)?;
        g.a.cmp(r12, i32::try_from(n).unwrap_or(i32::MAX) + 1)?;
        g.a.jne(lp)?;
        g.exit(crate::EXIT_OK)
    })?;
    let mut s = 0u64;
    let mut x = 0u64;
    let mut acc = [0u64; DIRTY_PAGES as usize];
    let mut out = String::new();
    for i in 1..=u64::from(n) {
        s = s.wrapping_mul(3).wrapping_add(i);
        let k = (i % DIRTY_PAGES) as usize;
        x = x.wrapping_add(acc[k]);
        acc[k] = acc[k].wrapping_add(i);
        if i % u64::from(every) != 0 {
            continue;
        }
        out.push_str(&format!("i={i:08x} s={s:016x} x={x:016x}\n"));
    }
    t.expected_serial = Some(out);
    Ok(t)
}

/// The CPUID leaves [`cpuid_report`] prints, (leaf, sub-leaf): identification, the feature
/// words, topology, the hypervisor leaves, the extended leaves up to the address sizes.
pub const REPORTED_LEAVES: &[(u32, u32)] = &[
    (0, 0),
    (1, 0),
    (7, 0),
    (0xb, 0),
    (0xb, 1),
    (0xd, 0),
    (0xd, 1),
    (0x4000_0000, 0),
    (0x4000_0001, 0),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0002, 0),
    (0x8000_0003, 0),
    (0x8000_0004, 0),
    (0x8000_0005, 0),
    (0x8000_0006, 0),
    (0x8000_0007, 0),
    (0x8000_0008, 0),
];

/// Prints CPUID, counts, prints CPUID again: one line per leaf of [`REPORTED_LEAVES`],
/// `cpuid LLLLLLLL.SS a=XXXXXXXX b=XXXXXXXX c=XXXXXXXX d=XXXXXXXX`, then `count` lines as
/// [`counter`], then the leaves again, and exits with [`crate::EXIT_OK`]. The snapshot
/// tests stop it while it counts and restore it elsewhere: the second report must be the
/// first (the guest's CPU does not change under it). The CPUID lines are not predicted
/// (they are the accelerator's); the counting lines are [`counter`]'s.
pub fn cpuid_report(count: u32) -> Result<TestGuest, GuestError> {
    let n = count.max(1);
    build("cpuid-report", Mode::Long64, |g| {
        g.unpredicted();
        report(g)?;
        let mut lp = g.a.create_label();
        g.a.mov(r12d, 1u32)?;
        g.a.xor(r13d, r13d)?;
        g.a.set_label(&mut lp)?;
        g.a.lea(r13, qword_ptr(r13 + r13 * 2))?;
        g.a.add(r13, r12)?;
        g.emit_str("i=")?;
        g.a.mov(rax, r12)?;
        g.a.mov(ecx, 8u32)?;
        g.a.call(g.puthex)?;
        g.emit_str(" s=")?;
        g.a.mov(rax, r13)?;
        g.a.mov(ecx, 16u32)?;
        g.a.call(g.puthex)?;
        g.emit_str("\n")?;
        g.a.inc(r12)?;
        g.a.cmp(r12, i32::try_from(n).unwrap_or(i32::MAX) + 1)?;
        g.a.jne(lp)?;
        report(g)?;
        g.exit(crate::EXIT_OK)
    })
}

/// Emits the CPUID report of [`cpuid_report`].
fn report(g: &mut crate::asm::Guest) -> crate::asm::R {
    for &(leaf, sub) in REPORTED_LEAVES {
        g.a.mov(eax, leaf)?;
        g.a.mov(ecx, sub)?;
        g.a.cpuid()?;
        g.a.mov(r8d, eax)?;
        g.a.mov(r9d, ebx)?;
        g.a.mov(r10d, ecx)?;
        g.a.mov(r11d, edx)?;
        g.emit_str(&format!("cpuid {leaf:08x}.{sub:02x}"))?;
        for (name, r) in [(" a=", r8), (" b=", r9), (" c=", r10), (" d=", r11)] {
            g.emit_str(name)?;
            g.a.mov(rax, r)?;
            g.a.mov(ecx, 8u32)?;
            g.a.call(g.puthex)?;
        }
        g.emit_str("\n")?;
    }
    Ok(())
}
