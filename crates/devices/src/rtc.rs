//! MC146818 real-time clock and CMOS memory at ports 0x70 (index) / 0x71 (data).
//!
//! Time is the host's clock (UTC, as QEMU's default `-rtc base=utc`) plus an offset the guest
//! changes by writing the time registers. Register B selects BCD or binary and 12- or 24-hour
//! format (power-on: BCD, 24-hour, as QEMU); register A's update-in-progress bit is set for the
//! last 244 µs of every second, so guests that wait for it behave as on hardware; setting
//! register B's SET bit freezes the clock while the guest writes it. Register C collects the
//! update-ended (once a second), alarm (alarm registers match, with QEMU's "don't care" values
//! 0xC0-0xFF) and periodic (rate from register A) flags; when one is enabled in register B the
//! IRQ line (IRQ 8) goes high until the guest reads register C, as on a PC. A timer thread,
//! started the first time the guest enables one of these interrupts, produces them on time;
//! without interrupts the flags are computed when register C is read.
//! CMOS bytes 0x15-0x18, 0x30-0x31, 0x34-0x35 and 0x5b-0x5d carry the memory size the way
//! QEMU's microvm fills them ([`Rtc::set_memory_layout`]).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_accel::{BusDevice, IrqLine};

use crate::lock;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_PIE: u8 = 0x40;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_PF: u8 = 0x40;
const D_VRT: u8 = 0x80;

const NANOS: i128 = 1_000_000_000;
/// Length of the update cycle at the end of each second, in nanoseconds.
const UIP_NANOS: i128 = 244_000;

/// A calendar time, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcDateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    /// 0-23.
    pub hour: u32,
    /// 0-59.
    pub minute: u32,
    /// 0-59.
    pub second: u32,
    /// 1 (Sunday) - 7 (Saturday), as the RTC counts.
    pub weekday: u32,
}

impl RtcDateTime {
    /// Splits seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            weekday: (days + 4).rem_euclid(7) as u32 + 1,
        }
    }

    /// Seconds since the Unix epoch (fields out of range are clamped first).
    pub fn to_unix(&self) -> i64 {
        let month = self.month.clamp(1, 12);
        let day = self.day.clamp(1, 31);
        let days = days_from_civil(self.year.clamp(0, 9999), month, day);
        days * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// (year, month 1-12, day 1-31) to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Guest RAM sizes the CMOS reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmosMemoryLayout {
    /// RAM below 4 GiB, bytes.
    pub below_4g: u64,
    /// RAM above 4 GiB, bytes.
    pub above_4g: u64,
}

/// Host wall clock in nanoseconds since the Unix epoch.
pub type Clock = Box<dyn Fn() -> i128 + Send + Sync>;

fn host_clock() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

#[derive(Debug)]
struct State {
    index: u8,
    cmos: [u8; 128],
    /// Guest time minus host time, nanoseconds.
    offset: i128,
    /// While register B's SET bit is on: the frozen guest time, seconds.
    frozen: Option<i64>,
    /// Guest second at the last update of the flags (for update-ended and alarm).
    last_tick_second: i64,
    /// Register C: flags collected since the guest last read it.
    c: u8,
    /// Host time of the next periodic flag, while a rate is programmed.
    pf_next: Option<i128>,
    /// Whether the IRQ line is high (until register C is read).
    irq_high: bool,
    /// The timer thread exists.
    thread: bool,
    /// The device is gone: the timer thread must end.
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
    clock: Clock,
    irq: Option<Arc<dyn IrqLine>>,
}

/// The RTC/CMOS device (two ports: index and data).
pub struct Rtc {
    inner: Arc<Inner>,
}

impl Drop for Rtc {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.cv.notify_all();
    }
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc").finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

fn to_bcd(v: u32) -> u8 {
    let v = v % 100;
    ((v / 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
}

impl Rtc {
    /// Number of ports (index, data).
    pub const LEN: u64 = 2;

    /// An RTC on the host's clock without an interrupt line.
    pub fn new() -> Self {
        Self::with_clock(Box::new(host_clock), None)
    }

    /// An RTC on the host's clock raising `irq` (IRQ 8).
    pub fn with_irq(irq: Arc<dyn IrqLine>) -> Self {
        Self::with_clock(Box::new(host_clock), Some(irq))
    }

    /// An RTC on `clock` (tests use a fixed one), raising `irq` if given.
    pub fn with_clock(clock: Clock, irq: Option<Arc<dyn IrqLine>>) -> Self {
        let mut cmos = [0u8; 128];
        cmos[usize::from(REG_A)] = 0x26;
        cmos[usize::from(REG_B)] = B_24H;
        cmos[usize::from(REG_D)] = D_VRT;
        let now = clock();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    index: 0,
                    cmos,
                    offset: 0,
                    frozen: None,
                    last_tick_second: now.div_euclid(NANOS) as i64,
                    c: 0,
                    pf_next: None,
                    irq_high: false,
                    thread: false,
                    stop: false,
                }),
                cv: Condvar::new(),
                clock,
                irq,
            }),
        }
    }

    /// Sets the guest's time to the host's UTC time plus `secs` (QEMU's `-rtc base=`:
    /// `localtime` is the zone's offset, a date is that date minus now); it runs from there.
    pub fn set_offset_secs(&self, secs: i64) {
        let mut s = lock(&self.inner.state);
        s.offset = i128::from(secs) * NANOS;
        s.frozen = None;
    }

    /// Fills the memory-size bytes as QEMU's microvm does.
    pub fn set_memory_layout(&self, mem: CmosMemoryLayout) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let mut s = lock(&self.inner.state);
        let mut set = |i: usize, v: u64| s.cmos[i] = v as u8;
        let base = (mem.below_4g / KIB).min(640);
        set(0x15, base);
        set(0x16, base >> 8);
        let ext = (mem.below_4g.saturating_sub(MIB) / KIB).min(65535);
        set(0x17, ext);
        set(0x18, ext >> 8);
        set(0x30, ext);
        set(0x31, ext >> 8);
        let high = (mem.below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(65535);
        set(0x34, high);
        set(0x35, high >> 8);
        let above = mem.above_4g / (64 * KIB);
        set(0x5b, above);
        set(0x5c, above >> 8);
        set(0x5d, above >> 16);
    }

    /// A CMOS byte as the guest would read it through the data port (for tests and firmware).
    pub fn cmos_byte(&self, index: u8) -> u8 {
        let mut s = lock(&self.inner.state);
        self.inner.read_reg(&mut s, index & 0x7f)
    }

    /// Resets the index and control registers and lowers the IRQ; time and CMOS contents
    /// persist (battery-backed).
    pub fn reset(&self) {
        let inner = &self.inner;
        let mut s = lock(&inner.state);
        s.index = 0;
        s.cmos[usize::from(REG_B)] &= !(B_PIE | B_AIE | B_UIE | B_SET);
        s.c = 0;
        s.pf_next = None;
        if let Some(f) = s.frozen.take() {
            s.offset = i128::from(f) * NANOS - (inner.clock)();
        }
        inner.set_irq(&mut s, false);
        drop(s);
        inner.cv.notify_all();
    }
}

/// Nanoseconds between periodic flags for register A's rate select (0 = off).
fn periodic_nanos(a: u8) -> Option<i128> {
    let rate = a & 0x0f;
    if rate == 0 {
        return None;
    }
    // 32.768 kHz divided by 2^(rate-1); rates 1 and 2 behave as 8 and 9.
    let exp = if rate < 3 { rate + 7 } else { rate } - 1;
    Some((NANOS << exp) / 32_768)
}

impl Inner {
    fn set_irq(&self, s: &mut State, high: bool) {
        if s.irq_high != high {
            s.irq_high = high;
            if let Some(irq) = &self.irq {
                irq.set_level(high);
            }
        }
    }

    fn alarm_matches(&self, s: &State, t: &RtcDateTime) -> bool {
        let hit = |reg: u8, enc: u8| {
            let a = s.cmos[usize::from(reg)];
            a & 0xc0 == 0xc0 || a == enc
        };
        hit(REG_SECONDS_ALARM, self.encode(s, t.second))
            && hit(REG_MINUTES_ALARM, self.encode(s, t.minute))
            && hit(REG_HOURS_ALARM, self.encode_hour(s, t.hour))
    }

    /// Brings register C up to date and drives the IRQ line.
    fn tick(&self, s: &mut State) {
        let now = (self.clock)();
        let guest = self.guest_nanos(s);
        let second = guest.div_euclid(NANOS) as i64;
        if s.frozen.is_none() && second != s.last_tick_second {
            s.c |= C_UF;
            // The alarm repeats at most daily: look at no more than a day of missed seconds.
            let from = (s.last_tick_second + 1).max(second - 86_399);
            if (from..=second).any(|t| self.alarm_matches(s, &RtcDateTime::from_unix(t))) {
                s.c |= C_AF;
            }
            s.last_tick_second = second;
        }
        match periodic_nanos(s.cmos[usize::from(REG_A)]) {
            None => s.pf_next = None,
            Some(period) => match s.pf_next {
                None => s.pf_next = Some(now + period),
                Some(next) if now >= next => {
                    s.c |= C_PF;
                    s.pf_next = Some(next + period * ((now - next) / period + 1));
                }
                Some(_) => {}
            },
        }
        let enabled = s.cmos[usize::from(REG_B)] & (B_PIE | B_AIE | B_UIE);
        if s.c & enabled != 0 {
            s.c |= C_IRQF;
            self.set_irq(s, true);
        }
    }

    /// How long the timer thread may sleep before the next enabled event.
    fn next_wait(&self, s: &State) -> Option<Duration> {
        let b = s.cmos[usize::from(REG_B)];
        let mut wait: Option<i128> = None;
        if b & (B_UIE | B_AIE) != 0 && s.frozen.is_none() {
            let guest = self.guest_nanos(s);
            wait = Some(NANOS - guest.rem_euclid(NANOS));
        }
        if b & B_PIE != 0
            && let Some(next) = s.pf_next
        {
            let d = (next - (self.clock)()).max(0);
            wait = Some(wait.map_or(d, |w| w.min(d)));
        }
        wait.map(|w| Duration::from_nanos(w.clamp(0, NANOS) as u64))
    }

    /// Starts the timer thread the first time an interrupt is enabled (and an IRQ exists).
    fn ensure_thread(self: &Arc<Self>, s: &mut State) {
        let b = s.cmos[usize::from(REG_B)];
        if s.thread || self.irq.is_none() || b & (B_PIE | B_AIE | B_UIE) == 0 {
            return;
        }
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("rtc-timer".into())
            .spawn(move || inner.timer_thread());
        // Without the thread the flags are still computed when register C is read.
        s.thread = spawned.is_ok();
    }

    fn timer_thread(&self) {
        let mut s = lock(&self.state);
        loop {
            if s.stop {
                return;
            }
            self.tick(&mut s);
            s = match self.next_wait(&s) {
                Some(d) => match self.cv.wait_timeout(s, d) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                },
                None => match self.cv.wait(s) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                },
            };
        }
    }

    fn guest_nanos(&self, s: &State) -> i128 {
        match s.frozen {
            Some(f) => i128::from(f) * NANOS,
            None => (self.clock)().saturating_add(s.offset),
        }
    }

    fn encode(&self, s: &State, v: u32) -> u8 {
        if s.cmos[usize::from(REG_B)] & B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, s: &State, v: u8) -> u32 {
        if s.cmos[usize::from(REG_B)] & B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, s: &State, hour: u32) -> u8 {
        if s.cmos[usize::from(REG_B)] & B_24H != 0 {
            return self.encode(s, hour);
        }
        let h12 = if hour.is_multiple_of(12) {
            12
        } else {
            hour % 12
        };
        self.encode(s, h12) | if hour >= 12 { 0x80 } else { 0 }
    }

    fn decode_hour(&self, s: &State, v: u8) -> u32 {
        if s.cmos[usize::from(REG_B)] & B_24H != 0 {
            return self.decode(s, v);
        }
        let h = self.decode(s, v & 0x7f) % 12;
        if v & 0x80 != 0 { h + 12 } else { h }
    }

    fn read_reg(&self, s: &mut State, index: u8) -> u8 {
        let nanos = self.guest_nanos(s);
        let t = RtcDateTime::from_unix(nanos.div_euclid(NANOS) as i64);
        match index {
            REG_SECONDS => self.encode(s, t.second),
            REG_MINUTES => self.encode(s, t.minute),
            REG_HOURS => self.encode_hour(s, t.hour),
            REG_DAY_OF_WEEK => self.encode(s, t.weekday),
            REG_DAY_OF_MONTH => self.encode(s, t.day),
            REG_MONTH => self.encode(s, t.month),
            REG_YEAR => self.encode(s, (t.year % 100) as u32),
            REG_CENTURY => self.encode(s, (t.year / 100) as u32),
            REG_A => {
                let a = s.cmos[usize::from(REG_A)] & !A_UIP;
                let in_update = s.frozen.is_none() && nanos.rem_euclid(NANOS) >= NANOS - UIP_NANOS;
                a | if in_update { A_UIP } else { 0 }
            }
            REG_C => {
                self.tick(s);
                let c = std::mem::take(&mut s.c);
                self.set_irq(s, false);
                c
            }
            REG_D => D_VRT,
            _ => s.cmos[usize::from(index & 0x7f)],
        }
    }

    fn write_reg(&self, s: &mut State, index: u8, v: u8) {
        let time_field = matches!(
            index,
            REG_SECONDS
                | REG_MINUTES
                | REG_HOURS
                | REG_DAY_OF_WEEK
                | REG_DAY_OF_MONTH
                | REG_MONTH
                | REG_YEAR
                | REG_CENTURY
        );
        if time_field {
            let nanos = self.guest_nanos(s);
            let mut t = RtcDateTime::from_unix(nanos.div_euclid(NANOS) as i64);
            match index {
                REG_SECONDS => t.second = self.decode(s, v),
                REG_MINUTES => t.minute = self.decode(s, v),
                REG_HOURS => t.hour = self.decode_hour(s, v),
                REG_DAY_OF_MONTH => t.day = self.decode(s, v),
                REG_MONTH => t.month = self.decode(s, v),
                REG_YEAR => t.year = t.year / 100 * 100 + i64::from(self.decode(s, v) % 100),
                REG_CENTURY => t.year = i64::from(self.decode(s, v)) * 100 + t.year % 100,
                // The weekday follows from the date.
                _ => {}
            }
            let secs = t.to_unix();
            match s.frozen {
                Some(_) => s.frozen = Some(secs),
                None => {
                    let sub = nanos.rem_euclid(NANOS);
                    s.offset = i128::from(secs) * NANOS + sub - (self.clock)();
                }
            }
            return;
        }
        match index {
            REG_A => s.cmos[usize::from(REG_A)] = v & !A_UIP,
            REG_B => {
                let was_set = s.cmos[usize::from(REG_B)] & B_SET != 0;
                let now_set = v & B_SET != 0;
                if now_set && !was_set {
                    s.frozen = Some(self.guest_nanos(s).div_euclid(NANOS) as i64);
                } else if !now_set && let Some(f) = s.frozen.take() {
                    s.offset = i128::from(f) * NANOS - (self.clock)();
                }
                s.cmos[usize::from(REG_B)] = v;
            }
            REG_C | REG_D => {}
            _ => s.cmos[usize::from(index & 0x7f)] = v,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(b) = data.first_mut() else { return };
        let inner = &self.inner;
        let mut s = lock(&inner.state);
        match offset {
            // The index port is write-only on real chips; QEMU reads 0xff.
            0 => *b = 0xff,
            1 => {
                let idx = s.index;
                *b = inner.read_reg(&mut s, idx);
            }
            _ => {}
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let inner = &self.inner;
        let mut s = lock(&inner.state);
        match offset {
            // Bit 7 of the index is the NMI mask on a PC; it is not part of the index.
            0 => s.index = v & 0x7f,
            1 => {
                let idx = s.index;
                inner.write_reg(&mut s, idx, v);
                if matches!(idx, REG_A | REG_B) || idx <= REG_HOURS_ALARM {
                    // Interrupt enables, rate or time changed: new deadlines.
                    inner.tick(&mut s);
                    inner.ensure_thread(&mut s);
                    drop(s);
                    inner.cv.notify_all();
                }
            }
            _ => {}
        }
    }
}

impl Rtc {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "mc146818rtc";

    /// The qdev type: onboard (the board creates it, `-device` cannot), no properties.
    pub fn qdev_type() -> keel_qdev::DeviceType {
        keel_qdev::DeviceType::new(Self::QDEV_TYPE, keel_qdev::BusType::Isa)
            .description("MC146818 real-time clock")
            .user_creatable(false)
    }
}

/// The RTC's CMOS and clock, for a snapshot. The guest's time is kept as its offset from
/// the host's wall clock, so a restored guest's clock shows the real time again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcSnapshot {
    /// Selected CMOS index.
    pub index: u8,
    /// The 128 CMOS bytes (registers A-D included).
    pub cmos: Vec<u8>,
    /// Guest time minus host time, nanoseconds.
    pub offset: i128,
    /// The clock frozen by register B's SET bit, seconds.
    pub frozen: Option<i64>,
    /// Register C.
    pub c: u8,
}

impl keel_snapshot::Persist for RtcSnapshot {
    fn encode(&self, e: &mut keel_snapshot::Enc) {
        e.u8(self.index)
            .bytes(&self.cmos)
            .u128(self.offset as u128)
            .bool(self.frozen.is_some())
            .u64(self.frozen.unwrap_or(0) as u64)
            .u8(self.c);
    }
    fn decode(d: &mut keel_snapshot::Dec<'_>) -> Result<Self, keel_snapshot::DecodeError> {
        let index = d.u8("rtc index")?;
        let cmos = d.bytes("rtc cmos")?.to_vec();
        if cmos.len() != 128 {
            return Err(keel_snapshot::DecodeError::Invalid {
                field: "rtc cmos",
                reason: format!("{} bytes instead of 128", cmos.len()),
            });
        }
        let offset = d.u128("rtc offset")? as i128;
        let has = d.bool("rtc frozen")?;
        let frozen = d.u64("rtc frozen")? as i64;
        Ok(Self {
            index,
            cmos,
            offset,
            frozen: has.then_some(frozen),
            c: d.u8("rtc register c")?,
        })
    }
}

impl keel_snapshot::Stateful for Rtc {
    type State = RtcSnapshot;
    const SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"RTC0");
    const VERSION: u32 = 1;

    fn save_state(&self) -> RtcSnapshot {
        let s = lock(&self.inner.state);
        RtcSnapshot {
            index: s.index,
            cmos: s.cmos.to_vec(),
            offset: s.offset,
            frozen: s.frozen,
            c: s.c,
        }
    }

    fn restore_state(&self, st: &RtcSnapshot) {
        let inner = &self.inner;
        let mut s = lock(&inner.state);
        s.index = st.index & 0x7f;
        s.cmos.copy_from_slice(&st.cmos);
        s.offset = st.offset;
        s.frozen = st.frozen;
        s.c = st.c;
        let now = (inner.clock)();
        s.last_tick_second = inner.guest_nanos(&s).div_euclid(NANOS) as i64;
        s.pf_next = periodic_nanos(s.cmos[usize::from(REG_A)]).map(|p| now + p);
        let high = s.c & 0x80 != 0;
        inner.set_irq(&mut s, high);
        inner.ensure_thread(&mut s);
        drop(s);
        inner.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    // 2026-11-25 19:48:45 UTC, a Wednesday.
    const T0: i64 = 1_795_636_125;

    fn fixed(at: Arc<AtomicI64>) -> Rtc {
        Rtc::with_clock(
            Box::new(move || i128::from(at.load(Ordering::SeqCst))),
            None,
        )
    }

    fn rd(r: &Rtc, idx: u8) -> u8 {
        r.write(0, &[idx]);
        let mut b = [0];
        r.read(1, &mut b);
        b[0]
    }

    fn wr(r: &Rtc, idx: u8, v: u8) {
        r.write(0, &[idx]);
        r.write(1, &[v]);
    }

    #[test]
    fn calendar_round_trips() {
        let t = RtcDateTime::from_unix(T0);
        assert_eq!(
            (
                t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday
            ),
            (2026, 11, 25, 19, 48, 45, 4)
        );
        for s in [0, 951_782_400 /* 2000-02-29 */, T0, 4_102_444_800] {
            assert_eq!(RtcDateTime::from_unix(s).to_unix(), s);
        }
        assert_eq!(RtcDateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn reads_host_time_in_bcd_24h_by_default() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000));
        let r = fixed(now);
        assert_eq!(rd(&r, REG_SECONDS), 0x45);
        assert_eq!(rd(&r, REG_MINUTES), 0x48);
        assert_eq!(rd(&r, REG_HOURS), 0x19);
        assert_eq!(rd(&r, REG_DAY_OF_MONTH), 0x25);
        assert_eq!(rd(&r, REG_MONTH), 0x11);
        assert_eq!(rd(&r, REG_YEAR), 0x26);
        assert_eq!(rd(&r, REG_CENTURY), 0x20);
        assert_eq!(rd(&r, REG_DAY_OF_WEEK), 4);
        assert_eq!(rd(&r, REG_D), 0x80);
    }

    #[test]
    fn binary_and_12h_modes() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000));
        let r = fixed(now);
        wr(&r, REG_B, B_BINARY); // binary, 12h
        assert_eq!(rd(&r, REG_SECONDS), 45);
        assert_eq!(rd(&r, REG_HOURS), 0x80 | 7);
        wr(&r, REG_B, 0); // BCD, 12h
        assert_eq!(rd(&r, REG_HOURS), 0x80 | 0x07);
    }

    #[test]
    fn update_in_progress_near_the_second_boundary() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000 + 500_000_000));
        let r = fixed(now.clone());
        assert_eq!(rd(&r, REG_A) & A_UIP, 0);
        now.store(T0 * 1_000_000_000 + 999_900_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_A) & A_UIP, A_UIP);
        assert_eq!(rd(&r, REG_A) & 0x7f, 0x26);
    }

    #[test]
    fn guest_sets_the_clock_and_it_keeps_running() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000));
        let r = fixed(now.clone());
        wr(&r, REG_B, B_SET | B_24H);
        wr(&r, REG_HOURS, 0x08);
        wr(&r, REG_YEAR, 0x30);
        now.fetch_add(5_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_SECONDS), 0x45, "frozen while SET");
        wr(&r, REG_B, B_24H);
        now.fetch_add(3_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_HOURS), 0x08);
        assert_eq!(rd(&r, REG_YEAR), 0x30);
        assert_eq!(rd(&r, REG_SECONDS), 0x48);
    }

    #[test]
    fn update_flag_in_register_c() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000));
        let r = fixed(now.clone());
        wr(&r, REG_B, B_24H | B_UIE);
        rd(&r, REG_C);
        assert_eq!(rd(&r, REG_C) & C_UF, 0);
        now.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_C) & (C_UF | C_IRQF), C_UF | C_IRQF);
        assert_eq!(rd(&r, REG_C) & C_UF, 0);
    }

    #[test]
    fn alarm_and_periodic_flags_with_a_fixed_clock() {
        let now = Arc::new(AtomicI64::new(T0 * 1_000_000_000));
        let r = fixed(now.clone());
        // Alarm at 19:48:47 (BCD), two seconds ahead; hours "don't care".
        wr(&r, REG_SECONDS_ALARM, 0x47);
        wr(&r, REG_MINUTES_ALARM, 0x48);
        wr(&r, REG_HOURS_ALARM, 0xc0);
        wr(&r, REG_B, B_24H | B_AIE);
        rd(&r, REG_C);
        now.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_C) & C_AF, 0);
        now.fetch_add(2_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_C) & (C_AF | C_IRQF), C_AF | C_IRQF);
        // Periodic: rate 6 is 1024 Hz.
        wr(&r, REG_A, 0x26);
        wr(&r, REG_B, B_24H | B_PIE);
        rd(&r, REG_C);
        now.fetch_add(2_000_000, Ordering::SeqCst);
        assert_eq!(rd(&r, REG_C) & (C_PF | C_IRQF), C_PF | C_IRQF);
        assert_eq!(periodic_nanos(0x23), Some(122_070));
        assert_eq!(periodic_nanos(0x2f), Some(500_000_000));
        assert_eq!(periodic_nanos(0x21), Some(3_906_250));
        assert_eq!(periodic_nanos(0x20), None);
    }

    #[derive(Default)]
    struct Level(Mutex<Vec<bool>>);
    impl IrqLine for Level {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    #[test]
    fn periodic_interrupt_is_raised_by_the_timer_thread_and_lowered_by_reading_c() {
        let irq = Arc::new(Level::default());
        let r = Rtc::with_irq(irq.clone());
        wr(&r, REG_A, 0x26); // 1024 Hz
        wr(&r, REG_B, B_24H | B_PIE);
        let wait_high = || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while irq.0.lock().unwrap().last() != Some(&true) {
                assert!(std::time::Instant::now() < deadline, "no IRQ 8");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_high();
        assert_ne!(rd(&r, REG_C) & C_PF, 0);
        assert_eq!(irq.0.lock().unwrap().last(), Some(&false));
        wait_high();
        wr(&r, REG_B, B_24H);
        rd(&r, REG_C);
        let n = irq.0.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            irq.0.lock().unwrap().len(),
            n,
            "no interrupts once disabled"
        );
        drop(r); // ends the timer thread
    }

    #[test]
    fn cmos_memory_bytes_like_qemu() {
        let r = Rtc::new();
        r.set_memory_layout(CmosMemoryLayout {
            below_4g: 128 << 20,
            above_4g: 1 << 30,
        });
        assert_eq!(r.cmos_byte(0x15), (640 & 0xff) as u8);
        assert_eq!(r.cmos_byte(0x16), (640 >> 8) as u8);
        let ext = 65535u16; // 127 MiB of extended memory saturates
        assert_eq!([r.cmos_byte(0x17), r.cmos_byte(0x18)], ext.to_le_bytes());
        assert_eq!([r.cmos_byte(0x30), r.cmos_byte(0x31)], ext.to_le_bytes());
        let high = (112 * 16) as u16;
        assert_eq!([r.cmos_byte(0x34), r.cmos_byte(0x35)], high.to_le_bytes());
        assert_eq!(
            [r.cmos_byte(0x5b), r.cmos_byte(0x5c), r.cmos_byte(0x5d)],
            [0, 0x40, 0]
        );
    }

    #[test]
    fn plain_cmos_bytes_and_hostile_accesses() {
        let r = Rtc::new();
        wr(&r, 0x80 | 0x40, 0x5a); // NMI-mask bit is not part of the index
        assert_eq!(rd(&r, 0x40), 0x5a);
        for idx in 0..=255u8 {
            for v in [0u8, 0x7f, 0x80, 0x99, 0xff] {
                wr(&r, idx, v);
                rd(&r, idx);
            }
        }
        for off in [0, 1, 2, u64::MAX] {
            for len in 0..=8 {
                let mut b = vec![0; len];
                r.read(off, &mut b);
                r.write(off, &b);
            }
        }
    }
}
