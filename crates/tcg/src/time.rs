//! Host time: the TSC the guest sees and a monotonic nanosecond clock (a leaf).

use std::sync::OnceLock;
use std::time::Instant;

/// The host's time-stamp counter (constant-rate on the hosts this runs on), used as the
/// guest's TSC so that `rdtsc` costs a host `rdtsc` rather than a clock read. Falls back to
/// `clock_ns` on other architectures.
#[inline]
pub(crate) fn host_tsc() -> u64 {
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
#[cfg(not(target_arch = "x86_64"))]
fn clock_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let o = ORIGIN.get_or_init(Instant::now);
    u64::try_from(o.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
