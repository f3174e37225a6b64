//! User-space PC platform devices the interpreter needs because it has no in-kernel irqchip:
//! the 8259A interrupt controller pair ([`pic`]), the 8254 interval timer ([`pit`]), and for
//! VMs with APICs the per-vCPU local APIC ([`lapic`]) and the IOAPIC ([`ioapic`]).
//!
//! # How the interpreter uses them
//!
//! * At every instruction boundary where RFLAGS.IF is set (and no interrupt shadow is active)
//!   the vCPU checks [`pic::Pic::has_interrupt`] (one atomic load). When it is true it calls
//!   [`pic::Pic::acknowledge`] and delivers the returned vector through the IDT.
//! * Time is polled, not threaded: [`pit::Pit::next_deadline_ns`] is an atomic the vCPU compares
//!   against the clock now and then (per block or every N blocks); when the deadline has
//!   passed it calls [`pit::Pit::poll`], which raises IRQ 0 through the PIC as needed.
//! * In `hlt` the vCPU waits on a [`Wakeup`] until an interrupt is pending, it is kicked, or the
//!   PIT deadline passes, whichever comes first; it must never sleep past the deadline.
//!   [`pic::Pic::set_wakeup`] connects the PIC's output to that `Wakeup`, so a device thread
//!   raising a line wakes a halted vCPU.
//! * With a local APIC, the check is [`lapic::Lapic::has_interrupt`] first (acknowledged with
//!   [`lapic::Lapic::acknowledge`]), then the 8259's INTR if [`lapic::Lapic::accepts_pic`]
//!   (APIC disabled or LINT0 in ExtINT mode). The APIC timer is polled like the PIT, and
//!   INIT / start-up / NMI arrive as events the vCPU takes with
//!   [`lapic::Lapic::take_events`].

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A wake-up flag a halted vCPU sleeps on.
///
/// `notify` may be called from any thread, any number of times; a notification that arrives
/// before the vCPU starts waiting is not lost (the flag stays set until a wait consumes it).
#[derive(Debug, Default)]
pub struct Wakeup {
    flag: Mutex<bool>,
    cond: Condvar,
}

impl Wakeup {
    /// A wake-up flag with no pending notification.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes a waiter.
    pub fn notify(&self) {
        let mut f = self.flag.lock().unwrap_or_else(|p| p.into_inner());
        *f = true;
        self.cond.notify_all();
    }

    /// Waits until notified or until `deadline` (if any) passes, then clears the flag.
    /// Returns `true` when woken by a notification, `false` on timeout.
    ///
    /// Callers check their own condition (pending interrupt, kick) before waiting; a notify
    /// racing with that check is kept in the flag, so the wait returns at once.
    pub fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut f = self.flag.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *f {
                *f = false;
                return true;
            }
            match deadline {
                None => {
                    f = self.cond.wait(f).unwrap_or_else(|p| p.into_inner());
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    let (g, _) = self
                        .cond
                        .wait_timeout(f, d - now)
                        .unwrap_or_else(|p| p.into_inner());
                    f = g;
                }
            }
        }
    }

    /// Like [`Wakeup::wait_until`] with a relative timeout.
    #[cfg(test)]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Instant::now().checked_add(timeout))
    }
}

/// A source of monotonic time in nanoseconds; injectable so timer tests are deterministic.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed origin; never decreases.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, counted from the moment this value was created.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// The `Instant` corresponding to `ns` on this clock (for `hlt` deadlines).
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.origin
            .checked_add(Duration::from_nanos(ns))
            .unwrap_or(self.origin)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn early_notify_is_not_lost() {
        let w = Wakeup::new();
        w.notify();
        assert!(w.wait_timeout(Duration::from_secs(5)));
        assert!(!w.wait_timeout(Duration::from_millis(1)));
    }

    #[test]
    fn notify_from_another_thread_wakes_waiter() {
        let w = Arc::new(Wakeup::new());
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            w2.notify();
        });
        assert!(w.wait_until(None));
        t.join().unwrap();
    }

    #[test]
    fn monotonic_clock_advances() {
        let c = MonotonicClock::new();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(1));
        assert!(c.now_ns() > a);
    }
}
