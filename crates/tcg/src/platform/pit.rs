//! The Intel 8254 programmable interval timer, driven by host monotonic time.
//!
//! Three channels at ports 0x40-0x42 with the mode/command register at 0x43; channel 0's OUT
//! drives ISA IRQ 0, channel 2's gate and OUT are wired to port 0x61 (bit 0 gate, bit 1
//! speaker enable, bit 4 refresh toggle, bit 5 OUT2), which is what Linux's TSC calibration
//! (`pit_calibrate_tsc`, `quick_pit_calibrate`) reads.
//!
//! # Time is polled
//!
//! The timer owns no thread. Counters are computed from the time a count was loaded, so
//! reads are exact whenever they happen. Interrupts need a caller: the vCPU compares the
//! clock with [`Pit::next_deadline_ns`] (an atomic; `None` when no IRQ 0 edge is due) and
//! calls [`Pit::poll`] once it has passed. In `hlt` the vCPU sleeps at most until that
//! deadline. Missed periods are coalesced into one edge, as an edge-triggered PIC would
//! coalesce them anyway; Linux's clocksource code copes with lost ticks.
//!
//! All three channels implement modes 0-5 (6 and 7 alias 2 and 3), binary and BCD counting,
//! lobyte/hibyte/lobyte-then-hibyte access, the counter-latch command and the read-back
//! command (count and/or status). Every guest-written value is accepted without panicking.
//!
//! Simplifications, none visible to PC guests: a count written while a mode 2/3 period is
//! running takes effect at once rather than at the next reload; writing only the first byte
//! of a two-byte count in mode 0 does not stop the counter.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{BusDevice, BusRange, IrqLine};

use super::Clock;

/// Input clock of the 8254 on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// First port of the PIT (channel 0); the block is 4 ports long.
pub const PIT_PORT: u16 = 0x40;
/// NMI status and control port (speaker gate, OUT2).
pub const SPEAKER_PORT: u16 = 0x61;
/// Period of the port 0x61 refresh-request toggle (bit 4), in nanoseconds.
const REFRESH_NS: u64 = 15_085;
const NO_DEADLINE: u64 = u64::MAX;

fn ticks_at(ns: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// The first nanosecond at which `ticks` have elapsed.
fn ns_of(ticks: u64) -> u64 {
    let t = u128::from(ticks) * 1_000_000_000;
    u64::try_from(t.div_ceil(u128::from(PIT_HZ))).unwrap_or(u64::MAX)
}

fn bcd_to_bin(v: u16) -> u32 {
    (0..4).fold(0u32, |acc, i| {
        let digit = u32::from((v >> (12 - 4 * i)) & 0xf);
        acc * 10 + digit
    })
}

fn bin_to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    let mut out = 0u16;
    for (i, div) in [1000u32, 100, 10, 1].iter().enumerate() {
        let digit = ((v / div) % 10) as u16;
        out |= digit << (12 - 4 * i);
    }
    out
}

/// One counter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Channel {
    /// Mode bits as written (0-7), reported by read-back status.
    mode_bits: u8,
    /// Access mode: 1 lobyte, 2 hibyte, 3 lobyte then hibyte. 0 only before programming.
    access: u8,
    bcd: bool,
    /// Count in input ticks (1..=65536, or 1..=10000 in BCD).
    reload: u64,
    /// A count was written since the last control word.
    loaded: bool,
    /// Time (ns) at which counting from `reload` started.
    start_ns: u64,
    /// Counting suspended by the gate, with the ticks elapsed when it stopped.
    frozen: Option<u64>,
    gate: bool,
    null_count: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    /// Lobyte/hibyte flip-flop for reads.
    read_hi: bool,
    /// Lobyte/hibyte flip-flop for writes, with the low byte written so far.
    write_hi: bool,
    write_lo: u8,
    /// Rising OUT edges already signalled to the interrupt line (channel 0).
    edges_done: u64,
}

impl Channel {
    fn mode(&self) -> u8 {
        match self.mode_bits & 7 {
            6 => 2,
            7 => 3,
            m => m,
        }
    }

    fn modulus(&self) -> i128 {
        if self.bcd { 10_000 } else { 65_536 }
    }

    /// Input ticks elapsed since counting started; `None` when not counting yet.
    fn elapsed(&self, now: u64) -> Option<u64> {
        if !self.loaded {
            return None;
        }
        Some(match self.frozen {
            Some(f) => f,
            None => ticks_at(now.saturating_sub(self.start_ns)),
        })
    }

    /// The binary value of the counting element.
    fn counter(&self, now: u64) -> u32 {
        let Some(d) = self.elapsed(now) else {
            return 0;
        };
        let n = self.reload.max(1);
        let v = match self.mode() {
            2 => n - d % n,
            3 => {
                let v = n - (d.wrapping_mul(2)) % n;
                v & !1
            }
            _ => (i128::from(n) - i128::from(d)).rem_euclid(self.modulus()) as u64,
        };
        // 65536 reads as 0 in binary, 10000 as 0 in BCD.
        (v % (self.modulus() as u64)) as u32
    }

    /// The OUT pin.
    fn out(&self, now: u64) -> bool {
        let mode = self.mode();
        let Some(d) = self.elapsed(now) else {
            // After a control word OUT is low in mode 0, high in every other mode.
            return mode != 0;
        };
        let n = self.reload.max(1);
        match mode {
            0 | 1 => d >= n,
            2 => self.frozen.is_some() || n == 1 || d % n != n - 1,
            3 => self.frozen.is_some() || d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    /// Rising OUT edges since counting started, up to elapsed tick `d`.
    fn rising_edges(&self, d: u64) -> u64 {
        let n = self.reload.max(1);
        match self.mode() {
            0 | 1 => u64::from(d >= n),
            2 | 3 => d / n,
            _ => u64::from(d > n),
        }
    }

    /// The elapsed tick at which the next rising edge after `d` happens.
    fn next_edge(&self, d: u64) -> Option<u64> {
        let n = self.reload.max(1);
        match self.mode() {
            0 | 1 => (d < n).then_some(n),
            2 | 3 => (d / n).checked_add(1)?.checked_mul(n),
            _ => (d <= n).then_some(n + 1),
        }
    }

    fn status(&self, now: u64) -> u8 {
        (u8::from(self.out(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | ((self.access & 3) << 4)
            | ((self.mode_bits & 7) << 1)
            | u8::from(self.bcd)
    }

    fn current_count_reg(&self, now: u64) -> u16 {
        let c = self.counter(now);
        if self.bcd { bin_to_bcd(c) } else { c as u16 }
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.current_count_reg(now));
            self.read_hi = false;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }

    fn control(&mut self, v: u8) {
        let access = (v >> 4) & 3;
        self.access = access;
        self.mode_bits = (v >> 1) & 7;
        self.bcd = v & 1 != 0;
        self.loaded = false;
        self.null_count = true;
        self.frozen = None;
        self.latched_count = None;
        self.latched_status = None;
        self.read_hi = false;
        self.write_hi = false;
        self.edges_done = 0;
    }

    fn load(&mut self, raw: u16, now: u64) {
        let n = if self.bcd {
            match bcd_to_bin(raw) {
                0 => 10_000,
                b => u64::from(b),
            }
        } else if raw == 0 {
            65_536
        } else {
            u64::from(raw)
        };
        self.reload = n;
        self.loaded = true;
        self.null_count = false;
        self.start_ns = now;
        self.edges_done = 0;
        // Modes 0, 2, 3 and 4 count only while the gate is high.
        self.frozen = (!self.gate && matches!(self.mode(), 0 | 2 | 3 | 4)).then_some(0);
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        let (value, from_latch) = match self.latched_count {
            Some(v) => (v, true),
            None => (self.current_count_reg(now), false),
        };
        let [lo, hi] = value.to_le_bytes();
        match self.access {
            1 => {
                if from_latch {
                    self.latched_count = None;
                }
                lo
            }
            2 => {
                if from_latch {
                    self.latched_count = None;
                }
                hi
            }
            _ => {
                let byte = if self.read_hi { hi } else { lo };
                if self.read_hi && from_latch {
                    self.latched_count = None;
                }
                self.read_hi = !self.read_hi;
                byte
            }
        }
    }

    fn write(&mut self, v: u8, now: u64) {
        match self.access {
            1 => self.load(u16::from(v), now),
            2 => self.load(u16::from(v) << 8, now),
            3 => {
                if self.write_hi {
                    self.load(u16::from_le_bytes([self.write_lo, v]), now);
                } else {
                    self.write_lo = v;
                }
                self.write_hi = !self.write_hi;
            }
            // Not programmed yet: the write goes nowhere.
            _ => {}
        }
    }

    fn set_gate(&mut self, high: bool, now: u64) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        if !self.loaded {
            return;
        }
        let mode = self.mode();
        if high {
            match mode {
                0 | 4 => {
                    if let Some(f) = self.frozen.take() {
                        self.start_ns = now.saturating_sub(ns_of(f));
                    }
                }
                // A rising gate (re)triggers modes 1, 2, 3 and 5.
                _ => {
                    self.frozen = None;
                    self.start_ns = now;
                    self.edges_done = 0;
                }
            }
        } else if matches!(mode, 0 | 2 | 3 | 4) {
            let d = self.elapsed(now).unwrap_or(0);
            self.frozen = Some(d);
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PitState {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written.
    port61: u8,
}

/// The 8254 with channel 0 wired to an interrupt line.
///
/// Lock order: the bus map lock, then the PIT mutex, then whatever the IRQ line takes
/// (the PIC's mutex). The PIC never calls back into the PIT.
pub struct Pit {
    state: Mutex<PitState>,
    clock: Arc<dyn Clock>,
    irq: Arc<dyn IrqLine>,
    deadline: AtomicU64,
}

impl fmt::Debug for Pit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pit")
            .field("deadline", &self.next_deadline_ns())
            .finish_non_exhaustive()
    }
}

impl Pit {
    /// A PIT in its power-on state (nothing programmed, channel 2 gate low) driving `irq0`,
    /// reading time from `clock`.
    pub fn new(irq0: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Self {
        let mut state = PitState::default();
        // Channels 0 and 1 have their gates tied high on a PC.
        state.channels[0].gate = true;
        state.channels[1].gate = true;
        Self {
            state: Mutex::new(state),
            clock,
            irq: irq0,
            deadline: AtomicU64::new(NO_DEADLINE),
        }
    }

    /// System reset: every channel unprogrammed, channel 2's gate and the speaker bits low,
    /// no IRQ 0 deadline (the power-on state of [`Pit::new`]).
    pub fn reset(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = PitState::default();
        s.channels[0].gate = true;
        s.channels[1].gate = true;
        self.deadline.store(NO_DEADLINE, Ordering::Release);
        drop(s);
        self.irq.set_level(false);
    }

    /// The clock time (ns, on the PIT's [`Clock`]) of the next IRQ 0 edge, or `None`.
    /// One atomic load: cheap enough for the vCPU to read per block.
    #[inline]
    pub fn next_deadline_ns(&self) -> Option<u64> {
        match self.deadline.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            d => Some(d),
        }
    }

    /// Brings IRQ 0 up to date with the clock: signals a rising edge if channel 0's OUT rose
    /// since the last poll (several missed periods give one edge) and refreshes the deadline.
    #[cfg(test)]
    pub fn poll(&self) {
        self.poll_at(self.clock.now_ns());
    }

    /// `Pit::poll` with a time the caller already read from the same [`Clock`] (saves a
    /// clock read when the vCPU has just compared it with [`Pit::next_deadline_ns`]).
    pub fn poll_at(&self, now_ns: u64) {
        self.with_state(now_ns, |_| {});
    }

    /// Reads port `PIT_PORT + offset` (0-2: counters, 3: reads as 0xff like the chip's
    /// write-only control register).
    pub fn read_port(&self, offset: u64) -> u8 {
        let now = self.clock.now_ns();
        self.with_state(now, |s| match offset {
            0..=2 => s.channels[offset as usize].read(now),
            _ => 0xff,
        })
    }

    /// Writes port `PIT_PORT + offset` (0-2: counters, 3: control word).
    pub fn write_port(&self, offset: u64, value: u8) {
        let now = self.clock.now_ns();
        self.with_state(now, |s| match offset {
            0..=2 => s.channels[offset as usize].write(value, now),
            3 => {
                let sel = value >> 6;
                if sel == 3 {
                    // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
                    for (i, ch) in s.channels.iter_mut().enumerate() {
                        if value & (2 << i) == 0 {
                            continue;
                        }
                        if value & 0x20 == 0 {
                            ch.latch_count(now);
                        }
                        if value & 0x10 == 0 {
                            ch.latch_status(now);
                        }
                    }
                } else {
                    let ch = &mut s.channels[usize::from(sel)];
                    if value & 0x30 == 0 {
                        ch.latch_count(now);
                    } else {
                        ch.control(value);
                    }
                }
            }
            _ => {}
        })
    }

    /// Reads port 0x61: gate and speaker bits as written, refresh toggle, OUT2.
    pub fn read_speaker_port(&self) -> u8 {
        let now = self.clock.now_ns();
        self.with_state(now, |s| {
            let refresh = u8::from((now / REFRESH_NS) & 1 == 1);
            (s.port61 & 0x0f) | (refresh << 4) | (u8::from(s.channels[2].out(now)) << 5)
        })
    }

    /// Writes port 0x61: bit 0 is channel 2's gate, bits 1-3 are kept for reads.
    pub fn write_speaker_port(&self, value: u8) {
        let now = self.clock.now_ns();
        self.with_state(now, |s| {
            s.port61 = value & 0x0f;
            s.channels[2].set_gate(value & 1 != 0, now);
        })
    }

    /// The port handlers to map on the PIO bus: 0x40-0x43 and 0x61.
    pub fn bus_devices(self: &Arc<Self>) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        vec![
            (
                BusRange {
                    base: u64::from(PIT_PORT),
                    len: 4,
                },
                Arc::new(PitPorts {
                    pit: Arc::clone(self),
                }),
            ),
            (
                BusRange {
                    base: u64::from(SPEAKER_PORT),
                    len: 1,
                },
                Arc::new(SpeakerPort {
                    pit: Arc::clone(self),
                }),
            ),
        ]
    }

    /// Runs `f`, then updates IRQ 0 and the published deadline.
    fn with_state<R>(&self, now: u64, f: impl FnOnce(&mut PitState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut s);
        let ch = &mut s.channels[0];
        let mut deadline = NO_DEADLINE;
        let mut edge = false;
        if let Some(d) = ch.elapsed(now) {
            let edges = ch.rising_edges(d);
            if edges > ch.edges_done {
                ch.edges_done = edges;
                edge = true;
            }
            if ch.frozen.is_none()
                && let Some(next) = ch.next_edge(d)
            {
                deadline = ch.start_ns.saturating_add(ns_of(next));
            }
        }
        if edge {
            // IRQ 0 is edge triggered on every PC (ELCR bit 0 is read-only), so each rising
            // OUT edge is delivered as a pulse, as KVM's in-kernel PIT does; the line is
            // never left high, so programming a mode does not raise a stray interrupt.
            self.irq.pulse();
        }
        self.deadline.store(deadline, Ordering::Release);
        r
    }
}

struct PitPorts {
    pit: Arc<Pit>,
}

impl BusDevice for PitPorts {
    fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *b = if off < 4 {
                self.pit.read_port(off)
            } else {
                0xff
            };
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset.saturating_add(i as u64);
            if off < 4 {
                self.pit.write_port(off, *b);
            }
        }
    }
}

struct SpeakerPort {
    pit: Arc<Pit>,
}

impl BusDevice for SpeakerPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0
            && let Some(b) = data.first_mut()
        {
            *b = self.pit.read_speaker_port();
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0
            && let Some(b) = data.first()
        {
            self.pit.write_speaker_port(*b);
        }
    }
}

impl Pit {
    /// The three counters and port 0x61 for a snapshot, with times relative to now.
    ///
    /// IRQ 0 edges that are due are signalled first (the vCPUs, which normally poll the
    /// PIT, are stopped), so the interrupt controller's state, saved after this, holds them.
    pub fn save_state(&self) -> ([keel_accel::PitChannelState; 3], u8) {
        let now = self.clock.now_ns();
        self.poll_at(now);
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let one = |c: &Channel| keel_accel::PitChannelState {
            mode: c.mode(),
            access: c.access,
            bcd: c.bcd,
            reload: u32::try_from(c.reload).unwrap_or(0x1_0000),
            loaded: c.loaded,
            elapsed_ns: match c.frozen {
                Some(t) => ns_of(t),
                None => now.saturating_sub(c.start_ns),
            },
            gate: c.gate,
            latched_count: c.latched_count,
            latched_status: c.latched_status,
            read_hi: c.read_hi,
            write_hi: c.write_hi,
            write_lo: c.write_lo,
        };
        (
            [
                one(&s.channels[0]),
                one(&s.channels[1]),
                one(&s.channels[2]),
            ],
            s.port61,
        )
    }

    /// Puts the counters in a saved state: each continues `elapsed_ns` into its count, as
    /// if the time the machine spent saved had not passed; IRQ 0 edges already counted are
    /// not signalled again.
    pub fn restore_state(&self, chans: &[keel_accel::PitChannelState; 3], port61: u8) {
        let now = self.clock.now_ns();
        self.with_state(now, |s| {
            for (ch, c) in s.channels.iter_mut().zip(chans.iter()) {
                let ticks = ticks_at(c.elapsed_ns);
                let mut n = Channel {
                    mode_bits: c.mode & 7,
                    access: c.access & 3,
                    bcd: c.bcd,
                    reload: u64::from(c.reload.clamp(1, 0x1_0000)),
                    loaded: c.loaded,
                    start_ns: now.saturating_sub(c.elapsed_ns),
                    frozen: None,
                    gate: c.gate,
                    null_count: false,
                    latched_count: c.latched_count,
                    latched_status: c.latched_status,
                    read_hi: c.read_hi,
                    write_hi: c.write_hi,
                    write_lo: c.write_lo,
                    edges_done: 0,
                };
                if !c.gate && matches!(n.mode(), 0 | 2 | 3 | 4) && c.loaded {
                    n.frozen = Some(ticks);
                }
                if c.loaded {
                    n.edges_done = n.rising_edges(ticks);
                }
                *ch = n;
            }
            s.port61 = port61 & 0x0f;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::pic::Pic;
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Default)]
    struct ManualClock(AtomicU64);
    impl ManualClock {
        fn set(&self, ns: u64) {
            self.0.store(ns, Ordering::SeqCst);
        }
        fn advance(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }
    impl Clock for ManualClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Records every level driven and counts rising edges.
    #[derive(Default)]
    struct Probe {
        level: AtomicBool,
        rises: AtomicU64,
    }
    impl IrqLine for Probe {
        fn set_level(&self, high: bool) {
            let was = self.level.swap(high, Ordering::SeqCst);
            if high && !was {
                self.rises.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn setup() -> (Arc<Pit>, Arc<ManualClock>, Arc<Probe>) {
        let clock = Arc::new(ManualClock::default());
        clock.set(1_000_000);
        let probe = Arc::new(Probe::default());
        let pit = Arc::new(Pit::new(probe.clone(), clock.clone()));
        (pit, clock, probe)
    }

    fn rises(p: &Probe) -> u64 {
        p.rises.load(Ordering::SeqCst)
    }

    #[test]
    fn reset_stops_the_periodic_tick() {
        let (pit, clock, probe) = setup();
        pit.write_port(3, 0x34);
        pit.write_port(0, 0x00);
        pit.write_port(0, 0x10);
        assert!(pit.next_deadline_ns().is_some());
        pit.reset();
        assert_eq!(pit.next_deadline_ns(), None, "no tick after reset");
        clock.advance(1_000_000_000);
        pit.poll();
        assert_eq!(rises(&probe), 0, "an unprogrammed PIT raises nothing");
    }

    /// Linux `setup_pit_timer` / `init_pit_timer` periodic: mode 2, LATCH for HZ=250.
    #[test]
    fn linux_periodic_mode2_ticks_at_hz() {
        let (pit, clock, probe) = setup();
        let latch: u16 = ((PIT_HZ + 125) / 250) as u16; // 4773
        pit.write_port(3, 0x34);
        pit.write_port(0, latch as u8);
        pit.write_port(0, (latch >> 8) as u8);
        let period_ns = ns_of(u64::from(latch));
        let start = clock.now_ns();
        assert_eq!(pit.next_deadline_ns(), Some(start + period_ns));
        assert_eq!(rises(&probe), 0);
        for k in 1..=10u64 {
            clock.set(pit.next_deadline_ns().unwrap());
            pit.poll();
            assert_eq!(rises(&probe), k, "one edge per period");
        }
        // ~4 ms per tick at HZ=250.
        assert!((3_990_000..4_010_000).contains(&period_ns));
        // Polling late coalesces missed periods into one edge.
        clock.advance(period_ns * 5);
        pit.poll();
        assert_eq!(rises(&probe), 11);
        // The next deadline is in the future, on the period grid.
        let dl = pit.next_deadline_ns().unwrap();
        assert!(dl > clock.now_ns() && dl - clock.now_ns() <= period_ns);
    }

    #[test]
    fn mode3_square_wave_counts_by_two_and_toggles_out() {
        let (pit, clock, probe) = setup();
        pit.write_port(3, 0x36);
        pit.write_port(0, 100);
        pit.write_port(0, 0);
        // Read-back status of channel 0: OUT high, mode 3, lobyte/hibyte.
        pit.write_port(3, 0xe2);
        assert_eq!(pit.read_port(0), 0x80 | 0x30 | (3 << 1));
        clock.advance(ns_of(10));
        let lo = pit.read_port(0);
        let hi = pit.read_port(0);
        let c = u16::from_le_bytes([lo, hi]);
        assert_eq!(c % 2, 0);
        assert!((78..=82).contains(&c), "counter {c}");
        clock.advance(ns_of(45)); // in the low half
        pit.write_port(3, 0xe2);
        assert_eq!(pit.read_port(0) & 0x80, 0);
        clock.advance(ns_of(50));
        pit.poll();
        assert_eq!(rises(&probe), 1);
    }

    #[test]
    fn mode0_one_shot_fires_once_and_out_stays_high() {
        let (pit, clock, probe) = setup();
        pit.write_port(3, 0x30);
        pit.write_port(0, 0xe8);
        pit.write_port(0, 0x03); // 1000 ticks
        let dl = pit.next_deadline_ns().unwrap();
        clock.set(dl - 1);
        pit.poll();
        assert_eq!(rises(&probe), 0);
        clock.set(dl);
        pit.poll();
        assert_eq!(rises(&probe), 1);
        assert_eq!(pit.next_deadline_ns(), None);
        clock.advance(1_000_000_000);
        pit.poll();
        assert_eq!(rises(&probe), 1);
        // Reprogramming arms it again.
        pit.write_port(3, 0x30);
        pit.write_port(3, 0xe2);
        assert_eq!(
            pit.read_port(0) & 0x80,
            0,
            "OUT low after a mode 0 control word"
        );
        pit.write_port(0, 10);
        pit.write_port(0, 0);
        clock.advance(ns_of(10));
        pit.poll();
        assert_eq!(rises(&probe), 2);
    }

    /// Linux's PIT clockevent in one-shot mode: `pit_set_oneshot` writes 0x38 (mode 4) and
    /// `pit_next_event` writes each delta; every programmed delta gives exactly one IRQ 0.
    #[test]
    fn linux_oneshot_mode4_one_irq_per_programmed_delta() {
        let (pit, clock, probe) = setup();
        pit.write_port(3, 0x38);
        for (k, delta) in [1193u16, 100, 30_000].iter().enumerate() {
            pit.write_port(0, *delta as u8);
            pit.write_port(0, (*delta >> 8) as u8);
            let dl = pit.next_deadline_ns().unwrap();
            assert!(dl > clock.now_ns());
            clock.set(dl - 1);
            pit.poll();
            assert_eq!(rises(&probe), k as u64);
            clock.set(dl);
            pit.poll();
            assert_eq!(rises(&probe), k as u64 + 1);
            assert_eq!(pit.next_deadline_ns(), None, "one-shot: nothing more due");
            clock.advance(10_000_000);
            pit.poll();
            assert_eq!(rises(&probe), k as u64 + 1);
        }
    }

    /// Linux `pit_calibrate_tsc`: gate on, speaker off, channel 2 mode 0, then spin on
    /// port 0x61 bit 5.
    #[test]
    fn linux_calibration_via_channel2_and_port61() {
        let (pit, clock, probe) = setup();
        let v = pit.read_speaker_port();
        pit.write_speaker_port((v & !0x02) | 0x01);
        pit.write_port(3, 0xb0);
        let latch: u16 = (PIT_HZ / (1000 / 50)) as u16; // 50 ms
        pit.write_port(2, latch as u8);
        pit.write_port(2, (latch >> 8) as u8);
        assert_eq!(pit.read_speaker_port() & 0x20, 0);
        clock.advance(ns_of(u64::from(latch)) - 1);
        assert_eq!(pit.read_speaker_port() & 0x20, 0);
        clock.advance(1);
        assert_eq!(pit.read_speaker_port() & 0x20, 0x20);
        assert_eq!(pit.read_speaker_port() & 0x03, 0x01);
        assert_eq!(rises(&probe), 0, "channel 2 does not touch IRQ 0");
    }

    /// Linux `quick_pit_calibrate`: mode 0 from 0xffff, reading the MSB as it decreases.
    #[test]
    fn quick_calibrate_msb_decreases_every_256_ticks() {
        let (pit, clock, _) = setup();
        pit.write_speaker_port(0x01);
        pit.write_port(3, 0xb0);
        pit.write_port(2, 0xff);
        pit.write_port(2, 0xff);
        let mut last = 0x100u16;
        for _ in 0..50 {
            let _lo = pit.read_port(2);
            let hi = u16::from(pit.read_port(2));
            assert!(hi < last || (hi == last && hi == 0xff));
            last = hi;
            clock.advance(ns_of(256));
        }
        assert!(last < 0xd0);
    }

    #[test]
    fn gate_low_pauses_mode0_and_rising_gate_retriggers_mode1() {
        let (pit, clock, _) = setup();
        pit.write_speaker_port(0);
        pit.write_port(3, 0xb0);
        pit.write_port(2, 100);
        pit.write_port(2, 0);
        clock.advance(ns_of(500));
        pit.write_port(3, 0x80); // latch channel 2
        assert_eq!(pit.read_port(2), 100, "gate low: not counting");
        assert_eq!(pit.read_port(2), 0);
        pit.write_speaker_port(1);
        clock.advance(ns_of(40));
        pit.write_port(3, 0x80);
        assert_eq!(pit.read_port(2), 60);
        let _ = pit.read_port(2);
        // Mode 1 on channel 2: the gate's rising edge starts the one-shot.
        pit.write_port(3, 0xb2);
        pit.write_port(2, 50);
        pit.write_port(2, 0);
        pit.write_speaker_port(0);
        pit.write_speaker_port(1);
        assert_eq!(pit.read_speaker_port() & 0x20, 0);
        clock.advance(ns_of(50));
        assert_eq!(pit.read_speaker_port() & 0x20, 0x20);
    }

    #[test]
    fn access_modes_latch_readback_and_bcd() {
        let (pit, clock, _) = setup();
        // Channel 1, lobyte only, mode 2.
        pit.write_port(3, 0x54);
        pit.write_port(1, 200);
        clock.advance(ns_of(20));
        assert_eq!(pit.read_port(1), 180);
        // Hibyte only.
        pit.write_port(3, 0x64);
        pit.write_port(1, 0x02); // 0x200
        clock.advance(ns_of(0x100));
        assert_eq!(pit.read_port(1), 0x01);
        // Latch survives time passing and is read once.
        pit.write_port(3, 0x74);
        pit.write_port(1, 0x00);
        pit.write_port(1, 0x10); // 0x1000
        pit.write_port(3, 0x40);
        clock.advance(ns_of(0x100));
        assert_eq!(pit.read_port(1), 0x00);
        assert_eq!(pit.read_port(1), 0x10);
        assert_eq!(
            pit.read_port(1),
            0x00,
            "live value after the latch is consumed"
        );
        assert_eq!(pit.read_port(1), 0x0f);
        // Read-back of count and status together: status first, then count.
        pit.write_port(3, 0xc4);
        let st = pit.read_port(1);
        assert_eq!(st & 0x3f, 0x34);
        let lo = pit.read_port(1);
        let hi = pit.read_port(1);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0x1000 - 0x100);
        // BCD: load 0x1234 means 1234 decimal; after 34 ticks it reads 0x1200.
        pit.write_port(3, 0x71);
        pit.write_port(1, 0x34);
        pit.write_port(1, 0x12);
        clock.advance(ns_of(34));
        let lo = pit.read_port(1);
        let hi = pit.read_port(1);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0x1200);
        // Null count is set after a control word until a count is loaded.
        pit.write_port(3, 0x70);
        pit.write_port(3, 0xe4);
        assert_eq!(pit.read_port(1) & 0x40, 0x40);
    }

    #[test]
    fn drives_pic_irq0_end_to_end() {
        let clock = Arc::new(ManualClock::default());
        let pic = Arc::new(Pic::new());
        let pit = Pit::new(pic.irq_line(0).unwrap(), clock.clone());
        pic.write_register(0, 0, 0x11);
        pic.write_register(0, 1, 0x20);
        pic.write_register(0, 1, 0x04);
        pic.write_register(0, 1, 0x01);
        pic.write_register(0, 1, 0xfe);
        pit.write_port(3, 0x34);
        pit.write_port(0, 0x9c);
        pit.write_port(0, 0x2e);
        for _ in 0..3 {
            assert!(!pic.has_interrupt());
            clock.set(pit.next_deadline_ns().unwrap());
            pit.poll();
            assert!(pic.has_interrupt());
            assert_eq!(pic.acknowledge(), Some(0x20));
            pic.write_register(0, 0, 0x20);
        }
    }

    #[test]
    fn arbitrary_guest_writes_never_panic() {
        let (pit, clock, _) = setup();
        let devs = pit.bus_devices();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (_, d) = &devs[(x % 2) as usize];
            let off = (x >> 8) % 5;
            if x & 0x100_0000 != 0 {
                d.write(off, &[(x >> 16) as u8]);
            } else {
                let mut b = [0u8; 2];
                d.read(off, &mut b);
            }
            clock.advance((x >> 40) % 100_000);
            pit.poll();
        }
    }

    #[test]
    fn bcd_helpers_round_trip() {
        for v in [0u32, 1, 9, 10, 99, 1234, 9999] {
            assert_eq!(bcd_to_bin(bin_to_bcd(v)), v);
        }
        // Invalid BCD digits are accepted without panicking.
        let _ = bcd_to_bin(0xffff);
    }
}
