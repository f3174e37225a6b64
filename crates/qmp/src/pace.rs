//! The monitor's CPU budget while the guest runs.
//!
//! Every reply costs CPU twice: in the monitor threads, and in the client that reads it
//! and sends its next request at once. On a host with few cores, fast answers to busy
//! clients therefore take CPU from the vCPU threads in proportion to how fast they come.
//! While the guest runs, the in-band executor may use at most a share of one CPU (the
//! CPU time of the QMP threads, counted with `CLOCK_THREAD_CPUTIME_ID`); over it, it waits
//! before the next request, which also slows the clients waiting for their replies. A
//! paused or not yet started guest loses nothing to QMP: then no request ever waits.
//!
//! The budget is a token bucket: credit accrues at the share of wall-clock time, up to a
//! burst (so a single command, or a short exchange, is never paced), and each request's
//! CPU time is taken from it. In debt, the executor waits until half the burst is earned
//! back, so it serves requests in batches between few wake-ups.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Share of one CPU, in percent, the QMP threads may use while the guest runs, unless
/// `KEEL_QMP_CPU_SHARE` (1-100) says otherwise.
pub const MONITOR_CPU_SHARE: u32 = 20;
/// CPU time the monitor may spend at once, after an idle while, before it is paced.
pub const MONITOR_CPU_BURST: Duration = Duration::from_millis(20);
/// Longest single wait of the executor: it looks again whether the guest still runs.
pub const MAX_PACING_WAIT: Duration = Duration::from_millis(10);

static PACED_WAITS: AtomicU64 = AtomicU64::new(0);

/// How many times an in-band executor of this process has waited for its budget: a
/// diagnostic (and what tests check instead of timing).
pub fn paced_waits() -> u64 {
    PACED_WAITS.load(Ordering::Relaxed)
}

/// Counts one wait for [`paced_waits`].
pub(crate) fn count_wait() {
    PACED_WAITS.fetch_add(1, Ordering::Relaxed);
}

/// The share configured for this process: `KEEL_QMP_CPU_SHARE` if it is a percentage
/// from 1 to 100, else [`MONITOR_CPU_SHARE`].
pub fn configured_share() -> u32 {
    std::env::var("KEEL_QMP_CPU_SHARE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|p| (1..=100).contains(p))
        .unwrap_or(MONITOR_CPU_SHARE)
}

/// The token bucket of one executor; time is passed in (nanoseconds), so it is testable
/// with a made-up clock.
#[derive(Debug, Clone)]
pub struct Pacer {
    share_percent: u64,
    burst_ns: i64,
    /// CPU nanoseconds the monitor may still use (negative: in debt).
    credit_ns: i64,
    /// Wall-clock and CPU time at the last look.
    last: Option<(u64, u64)>,
}

impl Pacer {
    /// A pacer allowing `share_percent` (clamped to 1-100) of one CPU, with `burst` of
    /// CPU time available at once.
    pub fn new(share_percent: u32, burst: Duration) -> Pacer {
        let burst_ns = i64::try_from(burst.as_nanos()).unwrap_or(i64::MAX);
        Pacer {
            share_percent: u64::from(share_percent.clamp(1, 100)),
            burst_ns,
            credit_ns: burst_ns,
            last: None,
        }
    }

    /// Accounts the CPU time used up to `cpu_ns` (a monotonic total of the monitor's
    /// threads) at wall-clock time `now_ns`, and returns how long the executor should wait
    /// before its next request: zero when the guest does not run or credit is left.
    pub fn delay(&mut self, now_ns: u64, cpu_ns: u64, guest_running: bool) -> Duration {
        let (wall0, cpu0) = self.last.unwrap_or((now_ns, cpu_ns));
        self.last = Some((now_ns, cpu_ns));
        if !guest_running {
            // Nothing is owed for work done while the guest did not need the CPU.
            self.credit_ns = self.burst_ns;
            return Duration::ZERO;
        }
        let earned = now_ns
            .saturating_sub(wall0)
            .saturating_mul(self.share_percent)
            / 100;
        let used = cpu_ns.saturating_sub(cpu0);
        let credit = self
            .credit_ns
            .saturating_add(i64::try_from(earned).unwrap_or(i64::MAX))
            .min(self.burst_ns)
            .saturating_sub(i64::try_from(used).unwrap_or(i64::MAX));
        self.credit_ns = credit;
        if credit >= 0 {
            return Duration::ZERO;
        }
        // Wall-clock time until the debt is repaid and half the burst is earned again:
        // the monitor then works in bursts, not one request per wake-up (a thread woken
        // thousands of times a second waits for the scheduler more than for its budget).
        let target = credit
            .unsigned_abs()
            .saturating_add(self.burst_ns.unsigned_abs() / 2);
        Duration::from_nanos(target.saturating_mul(100) / self.share_percent)
    }
}

/// CPU time of the calling thread, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn within_the_share_nothing_waits() {
        let mut p = Pacer::new(20, Duration::from_millis(20));
        let (mut wall, mut cpu) = (0, 0);
        assert_eq!(p.delay(wall, cpu, true), Duration::ZERO);
        // 1 ms of CPU every 5 ms of wall-clock time is exactly 20%.
        for _ in 0..1000 {
            wall += 5 * MS;
            cpu += MS;
            assert_eq!(p.delay(wall, cpu, true), Duration::ZERO);
        }
    }

    #[test]
    fn a_burst_is_free_then_the_monitor_waits_for_its_debt() {
        let mut p = Pacer::new(20, Duration::from_millis(20));
        assert_eq!(p.delay(0, 0, true), Duration::ZERO);
        // 20 ms of CPU at once is the burst.
        assert_eq!(p.delay(20 * MS, 20 * MS, true), Duration::ZERO);
        // Spending 30 ms more in 1 ms of wall time leaves a debt: 0.2 ms earned (20% of
        // 1 ms) - 30 ms = -29.8 ms; the wait repays it and earns 10 ms (half the burst)
        // at 20%.
        let d = p.delay(21 * MS, 50 * MS, true);
        assert_eq!(
            d,
            Duration::from_nanos((29_800_000 + 10_000_000) * 100 / 20)
        );
        // After that wait, 10 ms of CPU may be spent without a wait, and no more.
        let wall = 21 * MS + d.as_nanos() as u64;
        assert_eq!(p.delay(wall, 50 * MS, true), Duration::ZERO);
        assert_eq!(p.delay(wall, 60 * MS, true), Duration::ZERO);
        assert!(p.delay(wall, 60 * MS + 1, true) > Duration::ZERO);
    }

    #[test]
    fn a_full_speed_monitor_gets_its_share_of_the_wall_clock() {
        // Each request costs 50 us; the executor waits whatever the pacer says.
        let mut p = Pacer::new(25, Duration::from_millis(20));
        let (mut wall, mut cpu, mut served) = (0u64, 0u64, 0u64);
        p.delay(wall, cpu, true);
        while wall < 10_000 * MS {
            wall += 50_000;
            cpu += 50_000;
            served += 1;
            wall += p.delay(wall, cpu, true).as_nanos() as u64;
        }
        // 25% of 10 s is 2.5 s of CPU: 50,000 requests, plus the 20 ms burst (400).
        assert!((49_000..=51_000).contains(&served), "{served}");
    }

    #[test]
    fn a_guest_that_does_not_run_never_delays_a_reply_and_forgives_debt() {
        let mut p = Pacer::new(10, Duration::from_millis(5));
        p.delay(0, 0, true);
        assert!(p.delay(MS, 100 * MS, true) > Duration::ZERO);
        // Paused (or prelaunch): no wait, however much CPU the monitor uses.
        for i in 1..100 {
            assert_eq!(
                p.delay(MS + i, 100 * MS + i * 10 * MS, false),
                Duration::ZERO
            );
        }
        // Running again: the full burst is available, not the old debt.
        let (w, c) = (MS + 100, 100 * MS + 990 * MS);
        assert_eq!(p.delay(w, c, true), Duration::ZERO);
        assert_eq!(p.delay(w, c + 5 * MS, true), Duration::ZERO);
        assert!(p.delay(w, c + 6 * MS, true) > Duration::ZERO);
    }

    #[test]
    fn out_of_range_shares_are_clamped_and_clocks_going_back_cost_nothing() {
        let mut p = Pacer::new(0, Duration::from_millis(1));
        p.delay(10 * MS, 10 * MS, true);
        // 1% share: a 1 ms debt and half the 1 ms burst take 150 ms.
        assert_eq!(p.delay(10 * MS, 12 * MS, true), Duration::from_millis(150));
        let mut p = Pacer::new(500, Duration::from_millis(1));
        p.delay(10 * MS, 10 * MS, true);
        assert_eq!(p.delay(5 * MS, 9 * MS, true), Duration::ZERO);
    }
}
