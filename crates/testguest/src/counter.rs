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
