//! Interpreting x86 backend (tcg) for the keel accelerator seam.
//!
//! An x86 interpreter that stands in for KVM: 16-bit real mode, 32-bit protected mode (paging
//! off, 2-level and PAE paging) and 64-bit long mode with 4-level paging, with the system
//! architecture Linux needs (IDT delivery with IST, TSS stacks, SYSCALL/SYSRET, MSRs) and the
//! 8259 PIC / 8254 PIT of [`platform`].
//!
//! Speed comes from the techniques of the research notes (x86-interpreter.md §1): decoded
//! blocks cached per guest-physical page and mode ([`decode`]), invalidated on writes to the
//! page (self-modifying code and DMA, see [`vm::TcgVm::invalidate_range`]); one handler per
//! instruction form chosen at translation time; lazy flags ([`cpu::CcOp`]); a software TLB
//! with host pointers ([`mem`]); chaining between blocks on the same page; bulk `rep movs` /
//! `rep stos`.
//!
//! Entry points: [`TcgAccel`] (the `Accelerator`), [`TcgVm`], [`TcgVcpu`].

#![deny(missing_docs)]

pub mod arith;
pub mod cpu;
pub mod cpuid;
pub mod decode;
pub mod exc;
pub mod exec;
pub mod mem;
pub mod platform;
pub mod sse;
pub mod string;
pub mod system;
pub mod vm;
pub mod x87;

pub use cpuid::CpuidConfig;
pub use vm::{TcgAccel, TcgVcpu, TcgVm};

use std::sync::OnceLock;
use std::time::Instant;

/// Errors of this crate's own operations.
#[derive(Debug, thiserror::Error)]
pub enum TcgError {
    /// A guest-physical address is not backed by RAM.
    #[error("guest-physical address {0:#x} is not RAM")]
    NotRam(u64),
}

/// The host's time-stamp counter (constant-rate on the hosts this runs on), used as the
/// guest's TSC so that `rdtsc` costs a host `rdtsc` rather than a clock read. Falls back to
/// [`clock_ns`] on other architectures.
#[inline]
pub fn host_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        clock_ns()
    }
}

/// The guest TSC frequency in kHz (the host TSC's rate, measured once against the monotonic
/// clock over about 20 ms). A machine can pass it as `tsc_early_khz=` on a Linux command
/// line so that the kernel does not calibrate against the PIT, which a busy host makes
/// unreliable under an interpreter.
pub fn guest_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let t0 = Instant::now();
        let c0 = host_tsc();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c1 = host_tsc();
        let ns = t0.elapsed().as_nanos().max(1);
        u64::try_from(u128::from(c1.wrapping_sub(c0)) * 1_000_000 / ns).unwrap_or(0)
    })
}

/// Nanoseconds since the first call in this process.
pub fn clock_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let o = ORIGIN.get_or_init(Instant::now);
    u64::try_from(o.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
