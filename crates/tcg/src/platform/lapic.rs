//! The local APIC of each vCPU (xAPIC, memory-mapped at `0xfee00000`) and the APIC bus that
//! connects the local APICs with each other and with the IOAPIC.
//!
//! Modelled (Intel SDM vol. 3A ch. 10, as an integrated APIC of version 0x14 with six LVT
//! entries):
//! * ID, version, TPR/PPR (APR reads 0), EOI, ISR/IRR/TMR, LDR/DFR (flat and cluster logical
//!   models), SVR (software enable; clearing it masks every LVT entry), error status (send and
//!   receive illegal vector, latched on the write to ESR as on hardware);
//! * ICR: fixed, lowest priority (delivered as fixed to the lowest-numbered APIC of the
//!   destination set), NMI, INIT (level de-assert ignored), start-up (SIPI), with the
//!   self / all-including-self / all-excluding-self shorthands and physical or logical
//!   destinations; the delivery-status bit always reads idle (delivery is immediate);
//! * LVT timer in one-shot and periodic mode with the divide configuration, counting at a
//!   1 GHz bus clock on the host's monotonic [`Clock`] (so the current count is time-based,
//!   as in QEMU); LVT LINT0 with ExtINT (virtual-wire mode: the 8259's INTR reaches the CPU
//!   through LINT0, set at reset on the bootstrap processor as a BIOS would) and fixed/NMI
//!   modes; LVT LINT1 as NMI; thermal, performance and error LVTs as registers (only the
//!   error LVT ever fires).
//!
//! The periodic timer's period has a floor of 200 µs (as KVM's), and periodic expiries a
//! vCPU could not take in time are re-injected one per EOI from a small backlog (see
//! [`Lapic::poll_timer`]).
//!
//! The TSC-deadline mode (LVT timer mode 2, IA32_TSC_DEADLINE) exists when the APIC is
//! created [`Lapic::with_tsc_deadline`]: the deadline is converted to the host clock at the
//! guest TSC rate when it is written.
//!
//! An NMI is handed to the vCPU as an event; the vCPU blocks further NMIs until the next
//! IRET and latches one meanwhile (`crate::vm`).
//!
//! Not modelled: x2APIC (not advertised), relocating the APIC window through
//! IA32_APIC_BASE, CR8 as an alias of TPR (64-bit Linux uses the MMIO TPR), the remote read
//! register, arbitration priority, SMI, focus processor checking, LINT level-triggered remote
//! IRR.
//!
//! # Concurrency
//! Each [`Lapic`] keeps its registers behind one mutex and publishes what its vCPU must look
//! at in atomics (an interrupt is deliverable; INIT / SIPI / NMI events are pending), so the
//! vCPU's per-check cost is a load. Senders (other vCPUs' ICR writes, the IOAPIC, the timer)
//! change a target's state under its mutex, then call its `signal` callback (outside the
//! mutex), which wakes the vCPU. Lock order: IOAPIC mutex → LAPIC mutex; a LAPIC never calls
//! out while holding its own mutex (IPIs and EOI broadcasts are returned as [`Action`]s and
//! sent by the caller after the register write).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use keel_accel::BusDevice;

use super::Clock;

/// Guest-physical base of the local APIC window (IA32_APIC_BASE default).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the register window.
pub const LAPIC_LEN: u64 = 0x1000;

/// IA32_APIC_BASE: bootstrap processor flag.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: APIC global enable.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Version register: integrated APIC (0x14), max LVT entry 5 (six entries).
const VERSION: u32 = 0x0005_0014;

/// Register offsets.
pub mod reg {
    /// Local APIC ID.
    pub const ID: u64 = 0x20;
    /// Version.
    pub const VERSION: u64 = 0x30;
    /// Task priority.
    pub const TPR: u64 = 0x80;
    /// Processor priority.
    pub const PPR: u64 = 0xa0;
    /// End of interrupt.
    pub const EOI: u64 = 0xb0;
    /// Logical destination.
    pub const LDR: u64 = 0xd0;
    /// Destination format.
    pub const DFR: u64 = 0xe0;
    /// Spurious interrupt vector.
    pub const SVR: u64 = 0xf0;
    /// In-service register (8 words).
    pub const ISR: u64 = 0x100;
    /// Trigger mode register (8 words).
    pub const TMR: u64 = 0x180;
    /// Interrupt request register (8 words).
    pub const IRR: u64 = 0x200;
    /// Error status.
    pub const ESR: u64 = 0x280;
    /// Interrupt command, low half.
    pub const ICR_LO: u64 = 0x300;
    /// Interrupt command, high half (destination).
    pub const ICR_HI: u64 = 0x310;
    /// LVT timer (the six LVT entries follow at 0x10 steps).
    pub const LVT_TIMER: u64 = 0x320;
    /// LVT LINT0.
    #[cfg(test)]
    pub const LVT_LINT0: u64 = 0x350;
    /// LVT LINT1.
    #[cfg(test)]
    pub const LVT_LINT1: u64 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u64 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u64 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u64 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u64 = 0x3e0;
}

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const LVT_TSC_DEADLINE: u32 = 1 << 18;
const LVT_TIMER_MODE: u32 = LVT_PERIODIC | LVT_TSC_DEADLINE;
/// Writable bits per LVT entry: timer, thermal, perf, LINT0, LINT1, error.
const LVT_WRITABLE: [u32; 6] = [0x3_00ff, 0x1_07ff, 0x1_07ff, 0x1_a7ff, 0x1_a7ff, 0x1_00ff];

const SVR_ENABLE: u32 = 1 << 8;

/// Shortest period of the periodic timer (KVM's default floor): a guest cannot make its vCPU
/// thread spin on a nanosecond timer.
const MIN_PERIOD_NS: u64 = 200_000;

/// Most periodic timer expiries kept for late delivery.
const TIMER_BACKLOG_MAX: u32 = 64;

const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECV_ILLEGAL: u32 = 1 << 6;

/// Pending-event bits a vCPU reads with [`Lapic::take_events`].
pub mod event {
    /// INIT was received: the CPU resets and (an application processor) waits for SIPI.
    pub const INIT: u32 = 1 << 0;
    /// A start-up IPI was received (vector in [`super::Lapic::sipi_vector`]).
    pub const SIPI: u32 = 1 << 1;
    /// An NMI was received.
    pub const NMI: u32 = 1 << 2;
}

/// Delivery modes of the ICR and of IOAPIC redirection entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// To the vector, every destination.
    Fixed,
    /// To one destination (here: the lowest-numbered one in the set).
    LowestPriority,
    /// System management interrupt (ignored).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT.
    Init,
    /// Start-up IPI.
    StartUp,
    /// External interrupt (8259 acknowledge cycle); not routed by the APIC bus.
    ExtInt,
    /// Reserved encodings.
    Reserved,
}

impl DeliveryMode {
    /// Decodes bits 10:8 of an ICR or redirection entry.
    pub fn from_bits(v: u32) -> Self {
        match (v >> 8) & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => Self::Reserved,
        }
    }
}

/// Destination shorthand of the ICR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// The sender only.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// An interrupt message on the APIC bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Destination field (APIC ID or logical mask; 0xff is broadcast in physical mode).
    pub dest: u8,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Vector (fixed, lowest priority, start-up).
    pub vector: u8,
    /// Level-triggered (sets the TMR bit, so the EOI is broadcast to the IOAPIC).
    pub level: bool,
    /// Shorthand (only from an ICR).
    pub shorthand: Shorthand,
    /// Index of the sending local APIC (for the shorthands).
    pub source: Option<u32>,
}

/// What a register write asks the caller to do once the LAPIC's lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Send this inter-processor interrupt.
    Ipi(Message),
    /// An EOI retired a level-triggered vector: broadcast it to the IOAPIC.
    EoiBroadcast(u8),
}

#[derive(Debug, Clone)]
struct Regs {
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    irr: [u32; 8],
    tmr: [u32; 8],
    lvt: [u32; 6],
    esr: u32,
    esr_pending: u32,
    icr_lo: u32,
    icr_hi: u32,
    timer_initial: u32,
    timer_divide: u32,
    /// Clock time the current count was last loaded with `timer_initial`.
    timer_start: u64,
    /// Next expiry on the clock (`u64::MAX`: none).
    timer_deadline: u64,
    /// Periodic expiries not yet delivered (see [`Lapic::poll_timer`]).
    timer_backlog: u32,
    /// IA32_TSC_DEADLINE (guest TSC value; 0 = disarmed).
    tsc_deadline: u64,
}

impl Regs {
    fn power_on(bsp: bool) -> Self {
        let mut lvt = [LVT_MASKED; 6];
        if bsp {
            // Virtual-wire mode, as firmware leaves it: the 8259 reaches the BSP via LINT0.
            lvt[LVT_LINT0] = 0x700;
            lvt[LVT_LINT1] = 0x400;
        }
        Self {
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            irr: [0; 8],
            tmr: [0; 8],
            lvt,
            esr: 0,
            esr_pending: 0,
            icr_lo: 0,
            icr_hi: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_start: 0,
            timer_deadline: u64::MAX,
            timer_backlog: 0,
            tsc_deadline: 0,
        }
    }

    fn deadline_mode(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_TIMER_MODE == LVT_TSC_DEADLINE
    }

    /// Bus-clock ticks per timer count, log2 (divide configuration bits 0, 1 and 3).
    fn divide_shift(&self) -> u32 {
        let v = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        (v + 1) & 7
    }

    fn period_ns(&self) -> u64 {
        let p = u64::from(self.timer_initial) << self.divide_shift();
        if self.lvt[LVT_TIMER] & LVT_PERIODIC != 0 && p > 0 {
            p.max(MIN_PERIOD_NS)
        } else {
            p
        }
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.timer_initial == 0 || self.deadline_mode() {
            return 0;
        }
        let period = self.period_ns();
        let elapsed = now.saturating_sub(self.timer_start);
        let periodic = self.lvt[LVT_TIMER] & LVT_PERIODIC != 0;
        if !periodic && elapsed >= period {
            return 0;
        }
        let into = if periodic { elapsed % period } else { elapsed };
        let ticks = into >> self.divide_shift();
        self.timer_initial.saturating_sub(ticks as u32)
    }

    fn highest(bits: &[u32; 8]) -> Option<u8> {
        (0..8)
            .rev()
            .find(|&i| bits[i] != 0)
            .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
    }

    fn ppr(&self) -> u32 {
        let isrv = Self::highest(&self.isr).map_or(0, u32::from);
        if (self.tpr >> 4) >= (isrv >> 4) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The IRR vector the CPU would take now, if any.
    fn deliverable(&self) -> Option<u8> {
        if self.svr & SVR_ENABLE == 0 {
            return None;
        }
        let v = Self::highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    fn set_irr(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.esr_pending |= ESR_RECV_ILLEGAL;
            return;
        }
        let (i, b) = (usize::from(vector >> 5), 1u32 << (vector & 31));
        self.irr[i] |= b;
        if level {
            self.tmr[i] |= b;
        } else {
            self.tmr[i] &= !b;
        }
    }

    fn logical_match(&self, dest: u8) -> bool {
        let ldr = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            // Flat model: a bit mask of up to eight APICs.
            ldr & dest != 0
        } else {
            // Cluster model: high nibble the cluster (15 = broadcast), low nibble a mask.
            let cluster_ok = dest >> 4 == 0xf || dest >> 4 == ldr >> 4;
            cluster_ok && (dest & ldr & 0x0f) != 0
        }
    }
}

/// One vCPU's local APIC.
pub struct Lapic {
    index: u32,
    regs: Mutex<Regs>,
    clock: Arc<dyn Clock>,
    /// IA32_APIC_BASE (the vCPU's MSR; the enable bit gates the whole APIC).
    apic_base: AtomicU64,
    /// An IRR vector is deliverable (above PPR, APIC software-enabled).
    intr: AtomicBool,
    /// LINT0 passes the 8259's INTR (APIC globally disabled, or LINT0 unmasked ExtINT).
    extint: AtomicBool,
    events: AtomicU32,
    sipi_vector: AtomicU32,
    /// Timer deadline mirror for the vCPU's polling (`u64::MAX`: none).
    deadline: AtomicU64,
    /// Guest TSC rate for the TSC-deadline mode (0: the mode does not exist).
    tsc_khz: u64,
    signal: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for Lapic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lapic")
            .field("index", &self.index)
            .field("apic_base", &self.apic_base.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Lapic {
    /// The local APIC of vCPU `index` (APIC ID = index) in its power-on state; `enabled`
    /// sets IA32_APIC_BASE's global enable (a machine without APIC support leaves it off, and
    /// then the 8259 reaches the CPU directly).
    pub fn new(index: u32, enabled: bool, clock: Arc<dyn Clock>) -> Self {
        let bsp = index == 0;
        let base = LAPIC_BASE
            | if bsp { APIC_BASE_BSP } else { 0 }
            | if enabled { APIC_BASE_ENABLE } else { 0 };
        let l = Self {
            index,
            regs: Mutex::new(Regs::power_on(bsp)),
            clock,
            apic_base: AtomicU64::new(base),
            intr: AtomicBool::new(false),
            extint: AtomicBool::new(true),
            events: AtomicU32::new(0),
            sipi_vector: AtomicU32::new(0),
            deadline: AtomicU64::new(u64::MAX),
            tsc_khz: 0,
            signal: OnceLock::new(),
        };
        l.with(|_| {});
        l
    }

    /// Enables the TSC-deadline timer mode (LVT timer mode 2 and IA32_TSC_DEADLINE), with the
    /// guest TSC counting at `tsc_khz`; 0 leaves it out (the mode bit is then reserved).
    pub fn with_tsc_deadline(mut self, tsc_khz: u64) -> Self {
        self.tsc_khz = tsc_khz;
        self
    }

    /// Whether the TSC-deadline mode exists (for CPUID leaf 1 ECX bit 24).
    pub fn has_tsc_deadline(&self) -> bool {
        self.tsc_khz != 0
    }

    /// Reads IA32_TSC_DEADLINE: the armed deadline, 0 once it fired or outside TSC-deadline
    /// mode.
    pub fn tsc_deadline(&self) -> u64 {
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        if r.deadline_mode() { r.tsc_deadline } else { 0 }
    }

    /// Writes IA32_TSC_DEADLINE with the guest TSC at `tsc_now`: arms the timer for when the
    /// TSC reaches `v` (at once if it already has), 0 disarms. Ignored outside TSC-deadline
    /// mode, as on hardware.
    pub fn set_tsc_deadline(&self, v: u64, tsc_now: u64) {
        let now = self.clock.now_ns();
        let khz = self.tsc_khz;
        self.with(|r| {
            if khz == 0 || !r.deadline_mode() {
                return;
            }
            r.tsc_deadline = v;
            r.timer_deadline = if v == 0 {
                u64::MAX
            } else {
                let ticks = u128::from(v.saturating_sub(tsc_now));
                let ns = u64::try_from(ticks * 1_000_000 / u128::from(khz)).unwrap_or(u64::MAX);
                now.saturating_add(ns)
            };
        });
    }

    /// Sets the callback that wakes this APIC's vCPU (called outside the APIC's lock whenever
    /// an interrupt or event arrives). Only the first call has an effect.
    pub fn set_signal(&self, f: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.signal.set(f);
    }

    /// The vCPU index (and APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether this is the bootstrap processor's APIC.
    pub fn is_bsp(&self) -> bool {
        self.apic_base.load(Ordering::Relaxed) & APIC_BASE_BSP != 0
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.apic_base.load(Ordering::Relaxed)
    }

    /// Writes IA32_APIC_BASE. The base address is fixed at 0xfee00000 (relocation is not
    /// modelled); the BSP flag is read-only. Clearing the enable bit resets the APIC's
    /// registers as on hardware (re-enabling needs a new initialisation).
    pub fn set_apic_base(&self, v: u64) {
        let old = self.apic_base.load(Ordering::Relaxed);
        let new = (old & (APIC_BASE_BSP | !0xfff)) | (v & APIC_BASE_ENABLE);
        self.apic_base.store(new, Ordering::Relaxed);
        let disabling = old & APIC_BASE_ENABLE != 0 && new & APIC_BASE_ENABLE == 0;
        self.with(|r| {
            if disabling {
                *r = Regs::power_on(false);
            }
        });
    }

    fn enabled(&self) -> bool {
        self.apic_base.load(Ordering::Relaxed) & APIC_BASE_ENABLE != 0
    }

    /// Runs `f` on the registers, then republishes the atomics; signals the vCPU when an
    /// interrupt became deliverable.
    fn with<R>(&self, f: impl FnOnce(&mut Regs) -> R) -> R {
        let (r, rose) = {
            let mut g = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut g);
            let enabled = self.enabled();
            let intr = enabled && g.deliverable().is_some();
            let lint0 = g.lvt[LVT_LINT0];
            let extint = !enabled
                || (lint0 & LVT_MASKED == 0
                    && DeliveryMode::from_bits(lint0) == DeliveryMode::ExtInt);
            self.extint.store(extint, Ordering::Release);
            self.deadline.store(g.timer_deadline, Ordering::Release);
            let was = self.intr.swap(intr, Ordering::AcqRel);
            (r, intr && !was)
        };
        if rose {
            self.signal();
        }
        r
    }

    fn signal(&self) {
        if let Some(s) = self.signal.get() {
            s();
        }
    }

    /// Whether the APIC has a fixed interrupt for the CPU (one atomic load).
    #[inline]
    pub fn has_interrupt(&self) -> bool {
        self.intr.load(Ordering::Acquire)
    }

    /// Whether the 8259's INTR reaches the CPU (APIC disabled, or LINT0 in ExtINT mode).
    #[inline]
    pub fn accepts_pic(&self) -> bool {
        self.extint.load(Ordering::Acquire)
    }

    /// The interrupt acknowledge cycle: moves the highest deliverable IRR vector to ISR and
    /// returns it; `None` if nothing is deliverable any more.
    pub fn acknowledge(&self) -> Option<u8> {
        self.with(|r| {
            let v = r.deliverable()?;
            let (i, b) = (usize::from(v >> 5), 1u32 << (v & 31));
            r.irr[i] &= !b;
            r.isr[i] |= b;
            let lvt = r.lvt[LVT_TIMER];
            if r.timer_backlog > 0 && lvt as u8 == v && lvt & LVT_MASKED == 0 {
                // The next late periodic tick: pending now, taken after this one's EOI.
                r.timer_backlog -= 1;
                r.irr[i] |= b;
            }
            Some(v)
        })
    }

    /// Takes the pending INIT / SIPI / NMI events (bits of [`event`]).
    pub fn take_events(&self) -> u32 {
        self.events.swap(0, Ordering::AcqRel)
    }

    /// The vector of the last start-up IPI.
    pub fn sipi_vector(&self) -> u8 {
        self.sipi_vector.load(Ordering::Acquire) as u8
    }

    /// INIT: every register but the ID and IA32_APIC_BASE returns to its power-on state.
    pub fn init_reset(&self) {
        let bsp = self.is_bsp();
        self.with(|r| *r = Regs::power_on(bsp));
    }

    /// The timer's next expiry on the clock, for the vCPU's polling and `hlt` deadline.
    #[inline]
    pub fn next_deadline_ns(&self) -> Option<u64> {
        match self.deadline.load(Ordering::Acquire) {
            u64::MAX => None,
            d => Some(d),
        }
    }

    /// Brings the timer up to date with the clock at `now`: an expiry raises the LVT timer
    /// vector (unless masked) and re-arms a periodic timer.
    ///
    /// Periodic expiries the vCPU could not take in time (it waited for the execution lock or
    /// the host did not schedule it; the vector was still pending) are kept in a small backlog
    /// and delivered one after another, each as soon as the previous one was acknowledged, as
    /// KVM's PIT re-injects lost ticks: a guest counting periodic ticks (Linux's jiffies before
    /// it switches to one-shot mode) would otherwise fall behind its TSC and distrust it.
    pub fn poll_timer(&self, now: u64) {
        self.with(|r| {
            if r.timer_deadline > now {
                return;
            }
            let lvt = r.lvt[LVT_TIMER];
            let mut expiries = 1u64;
            if r.deadline_mode() {
                r.tsc_deadline = 0;
                r.timer_deadline = u64::MAX;
            } else if r.lvt[LVT_TIMER] & LVT_PERIODIC != 0 && r.period_ns() > 0 {
                let period = r.period_ns();
                let n = now.saturating_sub(r.timer_start) / period;
                expiries = n.max(1);
                r.timer_start += n * period;
                r.timer_deadline = r.timer_start + period;
            } else {
                r.timer_deadline = u64::MAX;
            }
            if lvt & LVT_MASKED == 0 {
                let v = lvt as u8;
                let (i, b) = (usize::from(v >> 5), 1u32 << (v & 31));
                let lost = if r.irr[i] & b != 0 {
                    expiries
                } else {
                    r.set_irr(v, false);
                    expiries - 1
                };
                if lvt & LVT_PERIODIC != 0 {
                    r.timer_backlog = (u64::from(r.timer_backlog) + lost)
                        .min(u64::from(TIMER_BACKLOG_MAX))
                        as u32;
                }
            }
        });
    }

    /// A message from the APIC bus addressed to this APIC.
    pub fn accept(&self, m: &Message) {
        if !self.enabled() {
            return;
        }
        match m.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.with(|r| r.set_irr(m.vector, m.level));
                // `with` signals on a rising `intr`; signal anyway so a halted vCPU looks
                // again (the interrupt may already have been deliverable).
                self.signal();
            }
            DeliveryMode::Nmi => self.raise_event(event::NMI),
            DeliveryMode::Init => {
                // Level de-assert INIT (trigger level, level 0) only synchronises
                // arbitration IDs on old processors.
                if m.level {
                    return;
                }
                self.raise_event(event::INIT);
            }
            DeliveryMode::StartUp => {
                self.sipi_vector
                    .store(u32::from(m.vector), Ordering::Release);
                self.raise_event(event::SIPI);
            }
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    fn raise_event(&self, e: u32) {
        self.events.fetch_or(e, Ordering::AcqRel);
        self.signal();
    }

    /// Whether `m` (without shorthand) is addressed to this APIC.
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if !logical {
            return dest == 0xff || u32::from(dest) == self.index;
        }
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        dest == 0xff || r.logical_match(dest)
    }

    /// Reads the 32-bit register at `offset` (16-byte aligned; other offsets read 0).
    pub fn read_reg(&self, offset: u64) -> u32 {
        let now = self.clock.now_ns();
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        match offset {
            reg::ID => self.index << 24,
            reg::VERSION => VERSION,
            reg::TPR => r.tpr,
            reg::PPR => r.ppr(),
            reg::LDR => r.ldr,
            reg::DFR => r.dfr,
            reg::SVR => r.svr,
            0x100..=0x170 => r.isr[((offset - reg::ISR) >> 4) as usize],
            0x180..=0x1f0 => r.tmr[((offset - reg::TMR) >> 4) as usize],
            0x200..=0x270 => r.irr[((offset - reg::IRR) >> 4) as usize],
            reg::ESR => r.esr,
            reg::ICR_LO => r.icr_lo,
            reg::ICR_HI => r.icr_hi,
            reg::LVT_TIMER..=reg::LVT_ERROR => r.lvt[((offset - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => r.timer_initial,
            reg::TIMER_CURRENT => r.current_count(now),
            reg::TIMER_DIVIDE => r.timer_divide,
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset`; returns what the caller must send.
    pub fn write_reg(&self, offset: u64, v: u32) -> Action {
        let now = self.clock.now_ns();
        let index = self.index;
        let tsc_deadline_ok = self.tsc_khz != 0;
        self.with(|r| {
            let mut action = Action::None;
            let errors_before = r.esr_pending;
            match offset {
                reg::TPR => r.tpr = v & 0xff,
                reg::EOI => {
                    if let Some(vec) = Regs::highest(&r.isr) {
                        let (i, b) = (usize::from(vec >> 5), 1u32 << (vec & 31));
                        r.isr[i] &= !b;
                        if r.tmr[i] & b != 0 {
                            action = Action::EoiBroadcast(vec);
                        }
                    }
                }
                reg::LDR => r.ldr = v & 0xff00_0000,
                reg::DFR => r.dfr = v | 0x0fff_ffff,
                reg::SVR => {
                    // Vector, software enable, focus checking (EOI-broadcast suppression is
                    // not offered by the version register).
                    r.svr = v & 0x3ff;
                    if v & SVR_ENABLE == 0 {
                        for l in &mut r.lvt {
                            *l |= LVT_MASKED;
                        }
                    }
                }
                reg::ESR => {
                    r.esr = r.esr_pending;
                    r.esr_pending = 0;
                }
                reg::ICR_HI => r.icr_hi = v & 0xff00_0000,
                reg::ICR_LO => {
                    r.icr_lo = v & 0x000c_cfff;
                    let mode = DeliveryMode::from_bits(v);
                    let vector = v as u8;
                    if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
                        && vector < 16
                    {
                        r.esr_pending |= ESR_SEND_ILLEGAL;
                    } else {
                        let shorthand = match (v >> 18) & 3 {
                            0 => Shorthand::None,
                            1 => Shorthand::SelfOnly,
                            2 => Shorthand::AllIncludingSelf,
                            _ => Shorthand::AllExcludingSelf,
                        };
                        action = Action::Ipi(Message {
                            dest: (r.icr_hi >> 24) as u8,
                            logical: v & (1 << 11) != 0,
                            mode,
                            vector,
                            // INIT level de-assert: level-triggered with the level bit clear.
                            level: mode == DeliveryMode::Init
                                && v & (1 << 15) != 0
                                && v & (1 << 14) == 0,
                            shorthand,
                            source: Some(index),
                        });
                    }
                }
                reg::LVT_TIMER..=reg::LVT_ERROR => {
                    let i = ((offset - reg::LVT_TIMER) >> 4) as usize;
                    let mut writable = LVT_WRITABLE[i];
                    if i == LVT_TIMER && tsc_deadline_ok {
                        writable |= LVT_TSC_DEADLINE;
                    }
                    let mut val = v & writable;
                    if r.svr & SVR_ENABLE == 0 {
                        val |= LVT_MASKED;
                    }
                    let was_periodic = r.lvt[LVT_TIMER] & LVT_PERIODIC != 0;
                    let old_mode = r.lvt[LVT_TIMER] & LVT_TIMER_MODE;
                    r.lvt[i] = val;
                    if i == LVT_TIMER
                        && old_mode != val & LVT_TIMER_MODE
                        && (old_mode == LVT_TSC_DEADLINE
                            || val & LVT_TIMER_MODE == LVT_TSC_DEADLINE)
                    {
                        // Entering or leaving TSC-deadline mode disarms the timer.
                        r.tsc_deadline = 0;
                        r.timer_initial = 0;
                        r.timer_deadline = u64::MAX;
                    }
                    if i == LVT_TIMER && val & (LVT_PERIODIC | LVT_MASKED) != LVT_PERIODIC {
                        r.timer_backlog = 0;
                    }
                    if i == LVT_TIMER
                        && !r.deadline_mode()
                        && old_mode != LVT_TSC_DEADLINE
                        && was_periodic != (val & LVT_PERIODIC != 0)
                    {
                        // A mode change keeps counting from where the count is now.
                        let count = r.current_count(now);
                        if count == 0 {
                            r.timer_deadline = u64::MAX;
                        } else {
                            r.timer_deadline =
                                now.saturating_add(u64::from(count) << r.divide_shift());
                            r.timer_start = r.timer_deadline.saturating_sub(r.period_ns());
                        }
                    }
                }
                // The initial count is ignored in TSC-deadline mode.
                reg::TIMER_INITIAL if r.deadline_mode() => {}
                reg::TIMER_INITIAL => {
                    r.timer_backlog = 0;
                    r.timer_initial = v;
                    r.timer_start = now;
                    r.timer_deadline = if v == 0 {
                        u64::MAX
                    } else {
                        now.saturating_add(r.period_ns())
                    };
                }
                reg::TIMER_DIVIDE => {
                    // Keep the current count across a divider change: restart from it.
                    let count = r.current_count(now);
                    r.timer_divide = v & 0xb;
                    if r.timer_deadline != u64::MAX && count > 0 {
                        r.timer_deadline = now.saturating_add(u64::from(count) << r.divide_shift());
                        r.timer_start = r.timer_deadline.saturating_sub(r.period_ns());
                    }
                }
                // ID is read-only here (the APIC ID is the vCPU index); the rest is
                // read-only or reserved.
                _ => {}
            }
            // A new error raises the error LVT's vector.
            if r.esr_pending & !errors_before != 0 && r.lvt[LVT_ERROR] & LVT_MASKED == 0 {
                let vec = r.lvt[LVT_ERROR] as u8;
                r.set_irr(vec, false);
            }
            action
        })
    }
}

/// Connects the local APICs (one per vCPU) and the IOAPIC: routes messages by destination and
/// broadcasts EOIs of level-triggered vectors to the IOAPIC.
#[derive(Default)]
pub struct ApicBus {
    lapics: RwLock<Vec<Arc<Lapic>>>,
    eoi: OnceLock<Weak<dyn EoiListener>>,
}

impl fmt::Debug for ApicBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lapics.read().map(|l| l.len()).unwrap_or(0);
        f.debug_struct("ApicBus").field("lapics", &n).finish()
    }
}

/// Receives EOI broadcasts (the IOAPIC).
pub trait EoiListener: Send + Sync {
    /// A local APIC retired level-triggered `vector`.
    fn eoi(&self, vector: u8);
}

impl ApicBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches a local APIC (in vCPU index order).
    pub fn attach(&self, l: Arc<Lapic>) {
        let mut v = self.lapics.write().unwrap_or_else(|p| p.into_inner());
        v.retain(|x| x.index() != l.index());
        v.push(l);
        v.sort_by_key(|x| x.index());
    }

    /// Sets the receiver of EOI broadcasts.
    pub fn set_eoi_listener(&self, l: Weak<dyn EoiListener>) {
        let _ = self.eoi.set(l);
    }

    /// Delivers `m` to every local APIC it addresses (lowest priority: to the first one).
    pub fn deliver(&self, m: &Message) {
        let list = self.lapics.read().unwrap_or_else(|p| p.into_inner());
        let mut targets = list.iter().filter(|l| match m.shorthand {
            Shorthand::None => l.matches(m.dest, m.logical),
            Shorthand::SelfOnly => Some(l.index()) == m.source,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => Some(l.index()) != m.source,
        });
        if m.mode == DeliveryMode::LowestPriority {
            if let Some(l) = targets.next() {
                l.accept(m);
            }
            return;
        }
        for l in targets {
            l.accept(m);
        }
    }

    /// Carries out what a register write of a local APIC returned.
    pub fn perform(&self, a: Action) {
        match a {
            Action::None => {}
            Action::Ipi(m) => self.deliver(&m),
            Action::EoiBroadcast(v) => {
                if let Some(l) = self.eoi.get().and_then(Weak::upgrade) {
                    l.eoi(v);
                }
            }
        }
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<Lapic>>> = const { std::cell::RefCell::new(None) };
}

/// Makes `l` the local APIC that MMIO accesses from this host thread reach (a vCPU thread
/// sets its own before running guest code, as each CPU sees its own APIC at 0xfee00000).
pub fn set_current(l: Option<Arc<Lapic>>) {
    CURRENT.with(|c| *c.borrow_mut() = l);
}

fn current() -> Option<Arc<Lapic>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The 0xfee00000 window on the MMIO bus: each access goes to the calling vCPU's own APIC.
/// Accesses from threads that are not vCPUs (device DMA) read 0 and are dropped. Registers
/// are 32 bits wide at 16-byte steps; narrower reads return the addressed bytes, other
/// writes than aligned 32-bit (or 64-bit, low half) ones are ignored.
#[derive(Debug)]
pub struct LapicMmio {
    bus: Arc<ApicBus>,
}

impl LapicMmio {
    /// The window, routing IPIs through `bus`.
    pub fn new(bus: Arc<ApicBus>) -> Self {
        Self { bus }
    }
}

impl BusDevice for LapicMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = match current() {
            Some(l) if l.enabled() => l.read_reg(offset & !0xf),
            _ => 0,
        };
        let bytes = u64::from(v).to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset & 0xf != 0 || data.len() < 4 {
            return;
        }
        let Some(l) = current() else { return };
        if !l.enabled() {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let a = l.write_reg(offset, v);
        self.bus.perform(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct ManualClock(AtomicU64);
    impl Clock for ManualClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn rig(
        n: u32,
    ) -> (
        Arc<ApicBus>,
        Vec<Arc<Lapic>>,
        Arc<ManualClock>,
        Arc<AtomicUsize>,
    ) {
        let clock = Arc::new(ManualClock(AtomicU64::new(1000)));
        let bus = Arc::new(ApicBus::new());
        let signals = Arc::new(AtomicUsize::new(0));
        let mut v = Vec::new();
        for i in 0..n {
            let l = Arc::new(Lapic::new(i, true, clock.clone()));
            let s = signals.clone();
            l.set_signal(Arc::new(move || {
                s.fetch_add(1, Ordering::SeqCst);
            }));
            bus.attach(l.clone());
            v.push(l);
        }
        (bus, v, clock, signals)
    }

    fn enable(l: &Lapic) {
        assert_eq!(l.write_reg(reg::SVR, 0x1ff), Action::None);
    }

    #[test]
    fn power_on_registers() {
        let (_b, l, _c, _s) = rig(2);
        assert_eq!(l[1].read_reg(reg::ID), 1 << 24);
        assert_eq!(l[0].read_reg(reg::VERSION), 0x0005_0014);
        assert_eq!(l[0].read_reg(reg::DFR), 0xffff_ffff);
        assert_eq!(l[0].read_reg(reg::SVR), 0xff);
        assert_eq!(
            l[0].read_reg(reg::LVT_LINT0),
            0x700,
            "BSP in virtual-wire mode"
        );
        assert_eq!(l[1].read_reg(reg::LVT_LINT0), LVT_MASKED);
        assert!(l[0].accepts_pic());
        assert!(!l[1].accepts_pic());
        assert!(l[0].is_bsp() && !l[1].is_bsp());
        assert_eq!(l[0].apic_base(), 0xfee0_0900);
    }

    #[test]
    fn disabled_apic_passes_the_pic_and_takes_no_messages() {
        let clock = Arc::new(ManualClock(AtomicU64::new(0)));
        let l = Lapic::new(1, false, clock);
        assert!(l.accepts_pic());
        l.accept(&Message {
            dest: 1,
            logical: false,
            mode: DeliveryMode::Fixed,
            vector: 0x40,
            level: false,
            shorthand: Shorthand::None,
            source: None,
        });
        assert!(!l.has_interrupt());
    }

    #[test]
    fn fixed_ipi_priority_ack_and_eoi() {
        let (bus, l, _c, sig) = rig(2);
        enable(&l[1]);
        l[0].write_reg(reg::ICR_HI, 1 << 24);
        let a = l[0].write_reg(reg::ICR_LO, 0x0000_0031);
        bus.perform(a);
        assert!(l[1].has_interrupt());
        assert!(sig.load(Ordering::SeqCst) > 0);
        assert!(!l[0].has_interrupt(), "physical destination 1 only");
        assert_eq!(l[1].read_reg(reg::IRR + 0x10), 1 << 17);
        // TPR class 3 blocks vector 0x31.
        l[1].write_reg(reg::TPR, 0x30);
        assert!(!l[1].has_interrupt());
        assert_eq!(l[1].read_reg(reg::PPR), 0x30);
        l[1].write_reg(reg::TPR, 0);
        assert_eq!(l[1].acknowledge(), Some(0x31));
        assert_eq!(l[1].read_reg(reg::ISR + 0x10), 1 << 17);
        assert_eq!(l[1].read_reg(reg::PPR), 0x30);
        // A lower-class vector waits for the EOI.
        bus.perform(l[0].write_reg(reg::ICR_LO, 0x0000_0025));
        assert!(!l[1].has_interrupt());
        assert_eq!(
            l[1].write_reg(reg::EOI, 0),
            Action::None,
            "edge: no broadcast"
        );
        assert!(l[1].has_interrupt());
        assert_eq!(l[1].acknowledge(), Some(0x25));
    }

    #[test]
    fn software_disabled_apic_holds_interrupts() {
        let (bus, l, _c, _s) = rig(2);
        l[0].write_reg(reg::ICR_HI, 1 << 24);
        bus.perform(l[0].write_reg(reg::ICR_LO, 0x40));
        assert!(!l[1].has_interrupt(), "SVR enable clear");
        enable(&l[1]);
        assert!(l[1].has_interrupt());
        // Clearing the enable masks the LVTs.
        l[1].write_reg(reg::LVT_LINT1, 0x400);
        l[1].write_reg(reg::SVR, 0xff);
        assert_ne!(l[1].read_reg(reg::LVT_LINT1) & LVT_MASKED, 0);
    }

    #[test]
    fn shorthands_and_logical_destinations() {
        let (bus, l, _c, _s) = rig(3);
        for x in &l {
            enable(x);
        }
        // All excluding self from APIC 1.
        bus.perform(l[1].write_reg(reg::ICR_LO, (3 << 18) | 0x50));
        assert!(l[0].has_interrupt() && !l[1].has_interrupt() && l[2].has_interrupt());
        for x in &l {
            while x.acknowledge().is_some() {}
            x.write_reg(reg::EOI, 0);
        }
        // Self.
        bus.perform(l[2].write_reg(reg::ICR_LO, (1 << 18) | 0x51));
        assert!(!l[0].has_interrupt() && l[2].has_interrupt());
        assert_eq!(l[2].acknowledge(), Some(0x51));
        l[2].write_reg(reg::EOI, 0);
        // Flat logical: LDR bits 1 and 4; destination mask 0x12 hits APIC 0 and 2.
        l[0].write_reg(reg::LDR, 0x01 << 24);
        l[1].write_reg(reg::LDR, 0x02 << 24);
        l[2].write_reg(reg::LDR, 0x10 << 24);
        l[1].write_reg(reg::ICR_HI, 0x11 << 24);
        bus.perform(l[1].write_reg(reg::ICR_LO, (1 << 11) | 0x60));
        assert!(l[0].has_interrupt() && !l[1].has_interrupt() && l[2].has_interrupt());
        for x in &l {
            while x.acknowledge().is_some() {}
        }
        // Cluster model: cluster 1, member bit 0.
        for x in &l {
            x.write_reg(reg::DFR, 0x0fff_ffff);
        }
        l[1].write_reg(reg::LDR, 0x11 << 24);
        l[0].write_reg(reg::ICR_HI, 0x11 << 24);
        bus.perform(l[0].write_reg(reg::ICR_LO, (1 << 11) | 0x70));
        assert!(l[1].has_interrupt());
        assert_eq!(l[1].acknowledge(), Some(0x70));
        assert!(
            !l[2].has_interrupt(),
            "APIC 2 is in cluster 1 but not member 0"
        );
    }

    #[test]
    fn lowest_priority_goes_to_one_apic() {
        let (bus, l, _c, _s) = rig(3);
        for x in &l {
            enable(x);
            x.write_reg(reg::LDR, 0x01 << 24);
        }
        l[0].write_reg(reg::LDR, 0);
        l[0].write_reg(reg::ICR_HI, 0x01 << 24);
        bus.perform(l[0].write_reg(reg::ICR_LO, (1 << 11) | (1 << 8) | 0x41));
        let hits: Vec<bool> = l.iter().map(|x| x.has_interrupt()).collect();
        assert_eq!(hits, [false, true, false]);
    }

    #[test]
    fn init_and_sipi_events() {
        let (bus, l, _c, _s) = rig(2);
        l[0].write_reg(reg::ICR_HI, 1 << 24);
        // INIT, level assert.
        bus.perform(l[0].write_reg(reg::ICR_LO, 0x0000_c500));
        assert_eq!(l[1].take_events(), event::INIT);
        // INIT level de-assert is ignored.
        bus.perform(l[0].write_reg(reg::ICR_LO, 0x0000_8500));
        assert_eq!(l[1].take_events(), 0);
        // SIPI vector 0x9a.
        bus.perform(l[0].write_reg(reg::ICR_LO, 0x0000_069a));
        assert_eq!(l[1].take_events(), event::SIPI);
        assert_eq!(l[1].sipi_vector(), 0x9a);
        // NMI to all excluding self.
        bus.perform(l[0].write_reg(reg::ICR_LO, (3 << 18) | 0x400));
        assert_eq!(l[1].take_events(), event::NMI);
        assert_eq!(l[0].take_events(), 0);
        assert_eq!(l[0].read_reg(reg::ICR_LO) & (1 << 12), 0, "delivery idle");
    }

    #[test]
    fn illegal_vector_sets_esr_on_the_next_write() {
        let (bus, l, _c, _s) = rig(1);
        enable(&l[0]);
        l[0].write_reg(reg::LVT_ERROR, 0xfe);
        bus.perform(l[0].write_reg(reg::ICR_LO, (1 << 18) | 0x05));
        assert_eq!(l[0].read_reg(reg::ESR), 0, "latched only on an ESR write");
        assert!(l[0].has_interrupt(), "error LVT fired");
        assert_eq!(l[0].acknowledge(), Some(0xfe));
        l[0].write_reg(reg::ESR, 0);
        assert_eq!(l[0].read_reg(reg::ESR), ESR_SEND_ILLEGAL);
        l[0].write_reg(reg::ESR, 0);
        assert_eq!(l[0].read_reg(reg::ESR), 0);
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        let (_b, l, clock, _s) = rig(1);
        let a = &l[0];
        enable(a);
        a.write_reg(reg::TIMER_DIVIDE, 0x3); // divide by 16
        a.write_reg(reg::LVT_TIMER, 0xec);
        a.write_reg(reg::TIMER_INITIAL, 1000);
        assert_eq!(a.next_deadline_ns(), Some(1000 + 16_000));
        clock.0.store(1000 + 16 * 250, Ordering::SeqCst);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 750);
        a.poll_timer(clock.now_ns());
        assert!(!a.has_interrupt());
        clock.0.store(1000 + 16_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0xec));
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::EOI, 0);
        clock.0.store(100_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        assert!(!a.has_interrupt());
    }

    #[test]
    fn periodic_timer_rearms_and_divide_1() {
        let (_b, l, clock, _s) = rig(1);
        let a = &l[0];
        enable(a);
        a.write_reg(reg::TIMER_DIVIDE, 0xb); // divide by 1
        a.write_reg(reg::LVT_TIMER, LVT_PERIODIC | 0x30);
        a.write_reg(reg::TIMER_INITIAL, 1_000_000);
        assert_eq!(a.next_deadline_ns(), Some(1000 + 1_000_000));
        // Half a period late: one interrupt, next deadline on the period grid.
        clock.0.store(1000 + 1_500_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0x30));
        assert_eq!(a.next_deadline_ns(), Some(1000 + 2_000_000));
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 500_000);
        // Masked: counts, no interrupt.
        a.write_reg(reg::LVT_TIMER, LVT_PERIODIC | LVT_MASKED | 0x30);
        clock.0.store(1000 + 2_000_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        a.write_reg(reg::EOI, 0);
        assert!(!a.has_interrupt());
        assert_eq!(a.next_deadline_ns(), Some(1000 + 3_000_000));
        // Initial count 0 stops it.
        a.write_reg(reg::TIMER_INITIAL, 0);
        assert_eq!(a.next_deadline_ns(), None);
    }

    #[test]
    fn tsc_deadline_mode_fires_once_and_reads_zero_after() {
        let clock = Arc::new(ManualClock(AtomicU64::new(1000)));
        // 1 MHz TSC: one tick per microsecond.
        let a = Lapic::new(0, true, clock.clone()).with_tsc_deadline(1000);
        enable(&a);
        // Not in deadline mode: the MSR write is ignored.
        a.set_tsc_deadline(500, 100);
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline_ns(), None);
        a.write_reg(reg::LVT_TIMER, LVT_TSC_DEADLINE | 0xef);
        assert_eq!(a.read_reg(reg::LVT_TIMER), LVT_TSC_DEADLINE | 0xef);
        a.set_tsc_deadline(500, 100);
        assert_eq!(a.tsc_deadline(), 500);
        assert_eq!(a.next_deadline_ns(), Some(1000 + 400_000));
        // The initial count is ignored, the current count reads 0.
        a.write_reg(reg::TIMER_INITIAL, 5);
        assert_eq!(a.read_reg(reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_deadline_ns(), Some(1000 + 400_000));
        clock.0.store(1000 + 400_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        assert_eq!(a.acknowledge(), Some(0xef));
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline_ns(), None);
        // A deadline in the past fires at the next poll; 0 disarms; leaving the mode disarms.
        a.set_tsc_deadline(50, 100);
        assert_eq!(a.next_deadline_ns(), Some(1000 + 400_000));
        a.set_tsc_deadline(0, 100);
        assert_eq!(a.next_deadline_ns(), None);
        a.set_tsc_deadline(10_000, 100);
        a.write_reg(reg::LVT_TIMER, 0xef);
        assert_eq!(a.next_deadline_ns(), None);
        assert_eq!(a.tsc_deadline(), 0);
        // Without the feature the mode bit is reserved.
        let b = Lapic::new(1, true, clock);
        enable(&b);
        b.write_reg(reg::LVT_TIMER, LVT_TSC_DEADLINE | 0xef);
        assert_eq!(b.read_reg(reg::LVT_TIMER), 0xef);
    }

    #[test]
    fn periodic_period_has_a_floor() {
        let (_b, l, _clock, _s) = rig(1);
        let a = &l[0];
        enable(a);
        a.write_reg(reg::TIMER_DIVIDE, 0xb);
        a.write_reg(reg::LVT_TIMER, LVT_PERIODIC | 0x30);
        a.write_reg(reg::TIMER_INITIAL, 1);
        assert_eq!(a.next_deadline_ns(), Some(1000 + MIN_PERIOD_NS));
        // One-shot keeps the exact count.
        a.write_reg(reg::LVT_TIMER, 0x30);
        a.write_reg(reg::TIMER_INITIAL, 1);
        assert_eq!(a.next_deadline_ns(), Some(1001));
    }

    #[test]
    fn late_periodic_ticks_are_delivered_one_per_eoi() {
        let (_b, l, clock, _s) = rig(1);
        let a = &l[0];
        enable(a);
        a.write_reg(reg::TIMER_DIVIDE, 0xb);
        a.write_reg(reg::LVT_TIMER, LVT_PERIODIC | 0x30);
        a.write_reg(reg::TIMER_INITIAL, 1_000_000);
        // Polled 3.5 periods late: three expiries, one delivered now, two kept.
        clock.0.store(1000 + 3_500_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        for _ in 0..3 {
            assert_eq!(a.acknowledge(), Some(0x30));
            assert!(!a.has_interrupt(), "the next waits for the EOI");
            a.write_reg(reg::EOI, 0);
        }
        assert!(!a.has_interrupt(), "backlog drained");
        // Reprogramming drops the backlog.
        clock.0.store(1000 + 10_000_000, Ordering::SeqCst);
        a.poll_timer(clock.now_ns());
        a.write_reg(reg::TIMER_INITIAL, 1_000_000);
        assert_eq!(a.acknowledge(), Some(0x30));
        a.write_reg(reg::EOI, 0);
        assert!(!a.has_interrupt());
    }

    #[test]
    fn level_vectors_broadcast_eoi() {
        let (_b, l, _c, _s) = rig(1);
        enable(&l[0]);
        l[0].accept(&Message {
            dest: 0,
            logical: false,
            mode: DeliveryMode::Fixed,
            vector: 0x61,
            level: true,
            shorthand: Shorthand::None,
            source: None,
        });
        assert_eq!(l[0].read_reg(reg::TMR + 0x30), 1 << 1);
        assert_eq!(l[0].acknowledge(), Some(0x61));
        assert_eq!(l[0].write_reg(reg::EOI, 0), Action::EoiBroadcast(0x61));
    }

    #[test]
    fn arbitrary_register_traffic_never_panics() {
        let (bus, l, clock, _s) = rig(2);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let apic = &l[(r & 1) as usize];
            let off = (r >> 8) & 0xff0;
            let v = (next() >> 16) as u32;
            if r & 2 != 0 {
                bus.perform(apic.write_reg(off, v));
            } else {
                let _ = apic.read_reg(off);
            }
            clock.0.fetch_add(r >> 40, Ordering::SeqCst);
            apic.poll_timer(clock.now_ns());
            let _ = apic.acknowledge();
            let _ = apic.take_events();
        }
    }

    #[test]
    fn mmio_window_reaches_the_current_threads_apic() {
        let (bus, l, _c, _s) = rig(2);
        let w = LapicMmio::new(bus);
        let mut d = [0u8; 4];
        set_current(None);
        w.read(reg::ID, &mut d);
        assert_eq!(d, [0; 4], "no vCPU on this thread");
        set_current(Some(l[1].clone()));
        w.read(reg::ID, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 24);
        w.write(reg::TPR, &0x20u32.to_le_bytes());
        assert_eq!(l[1].read_reg(reg::TPR), 0x20);
        let mut b = [0u8; 1];
        w.read(reg::VERSION + 2, &mut b);
        assert_eq!(b[0], 5);
        set_current(None);
    }
}
