//! ACPI fixed-hardware power-management registers (PM1a event and control blocks and the PM
//! timer) in the PIIX4/ICH9 style, for a machine that is not hardware-reduced.
//!
//! Why: a guest whose platform has only the 8259 pair (no IOAPIC) cannot use a
//! hardware-reduced FADT, because Linux then assumes there is no legacy PIC. With a full FADT
//! the guest needs these fixed registers: the PM1 status/enable pair (power button and timer
//! carry bits, a set status bit with its enable bit raises the SCI), the PM1 control register
//! (`SLP_EN` with the `\_S5` sleep type powers off) and the 24-bit ACPI PM timer, which also
//! gives Linux a reference clock to calibrate the TSC against.
//!
//! Layout inside the device's port range (the machine chooses the base, the FADT points at
//! it): PM1a event block at [`PM1_EVT_OFFSET`] (status word, then enable word), PM1a control
//! block at [`PM1_CNT_OFFSET`], PM timer at [`PM_TMR_OFFSET`]. There is no SMI: `SCI_EN`
//! always reads as set, as on a platform whose firmware already switched to ACPI mode.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_accel::{BusDevice, IrqLine, SystemEvent, SystemEvents};

use crate::lock;

/// Offset of the PM1a event block (PM1_STS at +0, PM1_EN at +2).
pub const PM1_EVT_OFFSET: u64 = 0x0;
/// Length of the PM1a event block.
pub const PM1_EVT_LEN: u8 = 4;
/// Offset of the PM1a control block.
pub const PM1_CNT_OFFSET: u64 = 0x4;
/// Length of the PM1a control block.
pub const PM1_CNT_LEN: u8 = 2;
/// Offset of the PM timer.
pub const PM_TMR_OFFSET: u64 = 0x8;
/// Length of the PM timer block.
pub const PM_TMR_LEN: u8 = 4;
/// Bus length covering the three blocks.
pub const ACPI_PM_LEN: u64 = 0xc;
/// The PM timer's frequency in Hz (fixed by the ACPI specification).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The `\_S5` sleep type the machine's DSDT must advertise for this device.
pub const PM_SLP_TYP_S5: u8 = 5;

/// PM1_STS / PM1_EN: PM timer carry (bit 23 of the counter toggled).
pub const PM1_TMR: u16 = 1 << 0;
/// PM1_STS / PM1_EN: power button.
pub const PM1_PWRBTN: u16 = 1 << 8;
/// PM1_STS: wake status (set when entering a sleep state, as QEMU does).
const PM1_WAK_STS: u16 = 1 << 15;
/// Status bits this device implements (others read 0 and cannot be set).
const PM1_STS_MASK: u16 = PM1_TMR | PM1_PWRBTN | PM1_WAK_STS;
/// Enable bits that raise the SCI (the events this device can signal).
const PM1_EN_MASK: u16 = PM1_TMR | PM1_PWRBTN;
/// Enable bits that hold what the guest writes: also GBL_EN (5), SLPBTN_EN (9) and
/// RTC_EN (10), whose events never occur here but which Linux enables and reads back to
/// check that the fixed event exists (else it logs "Could not enable ... event").
const PM1_EN_STORED: u16 = PM1_EN_MASK | (1 << 5) | (1 << 9) | (1 << 10);

/// PM1_CNT: SCI enabled (always set: there is no SMI handler to switch from).
const SCI_EN: u16 = 1 << 0;
/// PM1_CNT: sleep enable (write-only, reads 0).
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// Bits of PM1_CNT that hold state (SCI_EN, BM_RLD, GBL_RLS is write-only, SLP_TYP).
const PM1_CNT_RW_MASK: u16 = (1 << 1) | (SLP_TYP_MASK << SLP_TYP_SHIFT);

#[derive(Debug, Default)]
struct Regs {
    sts: u16,
    en: u16,
    cnt: u16,
    /// Bit 23 of the counter when the timer status was last brought up to date.
    last_msb: bool,
    /// Whether the SCI line is currently driven high.
    sci: bool,
}

/// The ACPI PM register block: PM1a event, PM1a control and PM timer.
pub struct AcpiPm {
    events: Arc<dyn SystemEvents>,
    sci: Option<Arc<dyn IrqLine>>,
    start: Instant,
    /// Nanoseconds added to the time since `start` (a restored timer continues its count).
    skew: std::sync::atomic::AtomicU64,
    regs: Mutex<Regs>,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("regs", &*lock(&self.regs))
            .finish_non_exhaustive()
    }
}

impl AcpiPm {
    /// A PM block that reports power-off to `events` and drives the SCI on `sci`
    /// (level-triggered: high while an enabled status bit is set).
    pub fn new(events: Arc<dyn SystemEvents>, sci: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            events,
            sci,
            start: Instant::now(),
            skew: std::sync::atomic::AtomicU64::new(0),
            regs: Mutex::new(Regs::default()),
        }
    }

    /// The PM timer's 24-bit count: ticks of [`PM_TIMER_HZ`] since the device was created.
    pub fn timer(&self) -> u32 {
        let ns = self.elapsed_ns();
        // 128-bit arithmetic: no overflow for any realistic uptime.
        let ticks = ns * u128::from(PM_TIMER_HZ) / 1_000_000_000;
        (ticks & 0x00ff_ffff) as u32
    }

    /// Presses the power button (QMP `system_powerdown`): sets PWRBTN_STS and raises the SCI
    /// if the guest enabled the power-button event.
    pub fn press_power_button(&self) {
        let mut r = lock(&self.regs);
        r.sts |= PM1_PWRBTN;
        self.update_sci(&mut r);
    }

    /// Machine reset: status, enables and control return to their power-on values.
    pub fn reset(&self) {
        let mut r = lock(&self.regs);
        let msb = self.timer() & (1 << 23) != 0;
        *r = Regs {
            last_msb: msb,
            sci: r.sci,
            ..Regs::default()
        };
        self.update_sci(&mut r);
    }

    /// Folds a timer carry (bit 23 changed since last look) into TMR_STS. The guest only
    /// sees the status when it reads PM1_STS, so sampling then is enough for polling; an
    /// interrupt-driven overflow would need a host timer, which no supported guest uses.
    fn sample_timer(&self, r: &mut Regs) {
        let msb = self.timer() & (1 << 23) != 0;
        if msb != r.last_msb {
            r.last_msb = msb;
            r.sts |= PM1_TMR;
        }
    }

    fn update_sci(&self, r: &mut Regs) {
        let level = r.sts & r.en & PM1_EN_MASK != 0;
        if level != r.sci {
            r.sci = level;
            if let Some(irq) = &self.sci {
                irq.set_level(level);
            }
        }
    }

    /// One byte of the register file at `offset` (PM1_STS reads bring TMR_STS up to date).
    fn read_byte(&self, r: &mut Regs, offset: u64) -> u8 {
        let word = |v: u16, o: u64| v.to_le_bytes()[(o & 1) as usize];
        match offset {
            0 | 1 => {
                self.sample_timer(r);
                self.update_sci(r);
                word(r.sts & PM1_STS_MASK, offset)
            }
            2 | 3 => word(r.en, offset),
            4 | 5 => word(r.cnt | SCI_EN, offset - 4),
            8..=11 => self.timer().to_le_bytes()[(offset - 8) as usize],
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut r = lock(&self.regs);
        // The timer is read as one value so a 32-bit read is consistent.
        if offset == PM_TMR_OFFSET && data.len() == 4 {
            data.copy_from_slice(&self.timer().to_le_bytes());
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(o) if o < ACPI_PM_LEN => self.read_byte(&mut r, o),
                _ => 0,
            };
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 4 {
            return;
        }
        let mut r = lock(&self.regs);
        // Assemble the little-endian bytes into the registers they cover; each register is
        // then written once with the bytes of this access (others keep their value).
        let mut sts_clear = 0u16;
        let mut en = r.en.to_le_bytes();
        let mut en_written = false;
        let mut cnt = r.cnt.to_le_bytes();
        let mut cnt_written = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                break;
            };
            match o {
                0 | 1 => sts_clear |= u16::from(b) << (8 * (o & 1)),
                2 | 3 => {
                    en[(o & 1) as usize] = b;
                    en_written = true;
                }
                4 | 5 => {
                    cnt[(o & 1) as usize] = b;
                    cnt_written = true;
                }
                _ => {}
            }
        }
        // PM1_STS is write-1-to-clear.
        r.sts &= !sts_clear;
        if en_written {
            r.en = u16::from_le_bytes(en) & PM1_EN_STORED;
        }
        if cnt_written {
            let v = u16::from_le_bytes(cnt);
            r.cnt = v & PM1_CNT_RW_MASK;
            let typ = ((v >> SLP_TYP_SHIFT) & SLP_TYP_MASK) as u8;
            if v & SLP_EN != 0 {
                r.sts |= PM1_WAK_STS;
                if typ == PM_SLP_TYP_S5 {
                    self.events.request(SystemEvent::Shutdown);
                }
                // Other sleep states (S1-S4) are not supported: the write is ignored, as the
                // DSDT advertises only \_S5.
            }
        }
        self.update_sci(&mut r);
    }
}

impl AcpiPm {
    fn elapsed_ns(&self) -> u128 {
        self.start.elapsed().as_nanos()
            + u128::from(self.skew.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The PM registers and the timer's running time, for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPmSnapshot {
    /// PM1a status.
    pub sts: u16,
    /// PM1a enable.
    pub en: u16,
    /// PM1a control.
    pub cnt: u16,
    /// Nanoseconds the PM timer had counted.
    pub timer_ns: u64,
}

impl keel_snapshot::Persist for AcpiPmSnapshot {
    fn encode(&self, e: &mut keel_snapshot::Enc) {
        e.u16(self.sts)
            .u16(self.en)
            .u16(self.cnt)
            .u64(self.timer_ns);
    }
    fn decode(d: &mut keel_snapshot::Dec<'_>) -> Result<Self, keel_snapshot::DecodeError> {
        Ok(Self {
            sts: d.u16("pm1 status")?,
            en: d.u16("pm1 enable")?,
            cnt: d.u16("pm1 control")?,
            timer_ns: d.u64("pm timer")?,
        })
    }
}

impl keel_snapshot::Stateful for AcpiPm {
    type State = AcpiPmSnapshot;
    const SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"APM0");
    const VERSION: u32 = 1;

    fn save_state(&self) -> AcpiPmSnapshot {
        let r = lock(&self.regs);
        AcpiPmSnapshot {
            sts: r.sts,
            en: r.en,
            cnt: r.cnt,
            timer_ns: u64::try_from(self.elapsed_ns()).unwrap_or(u64::MAX),
        }
    }

    fn restore_state(&self, st: &AcpiPmSnapshot) {
        let here = self.start.elapsed().as_nanos();
        let skew = u128::from(st.timer_ns).saturating_sub(here);
        self.skew.store(
            u64::try_from(skew).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut r = lock(&self.regs);
        r.sts = st.sts;
        r.en = st.en;
        r.cnt = st.cnt;
        let ticks = u128::from(st.timer_ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000;
        r.last_msb = ticks & (1 << 23) != 0;
        let level = r.sts & r.en != 0;
        r.sci = level;
        drop(r);
        if let Some(sci) = &self.sci {
            sci.set_level(level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use crate::test_util::Rec;

    #[derive(Default)]
    struct Level(AtomicBool, AtomicU32);
    impl IrqLine for Level {
        fn set_level(&self, high: bool) {
            self.0.store(high, Ordering::SeqCst);
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn r16(pm: &AcpiPm, off: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn s5_sleep_powers_off_and_sci_en_reads_set() {
        let rec = Arc::new(Rec::default());
        let pm = AcpiPm::new(rec.clone(), None);
        assert_eq!(r16(&pm, PM1_CNT_OFFSET) & SCI_EN, SCI_EN);
        // SLP_TYP=5 without SLP_EN: nothing; S3 with SLP_EN: ignored; S5 with SLP_EN: off.
        pm.write(PM1_CNT_OFFSET, &(5u16 << 10).to_le_bytes());
        pm.write(PM1_CNT_OFFSET, &(SLP_EN | (3 << 10)).to_le_bytes());
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(
            r16(&pm, PM1_CNT_OFFSET),
            SCI_EN | (3 << 10),
            "SLP_EN reads 0"
        );
        pm.write(PM1_CNT_OFFSET, &(SLP_EN | (5 << 10)).to_le_bytes());
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[SystemEvent::Shutdown]);
        // Byte-wise, as some guests write the high byte alone.
        pm.write(PM1_CNT_OFFSET + 1, &[((SLP_EN | (5 << 10)) >> 8) as u8]);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled_and_status_is_write_one_to_clear() {
        let irq = Arc::new(Level::default());
        let pm = AcpiPm::new(Arc::new(Rec::default()), Some(irq.clone()));
        pm.press_power_button();
        assert!(!irq.0.load(Ordering::SeqCst), "not enabled yet");
        assert_eq!(r16(&pm, 0) & PM1_PWRBTN, PM1_PWRBTN);
        pm.write(2, &PM1_PWRBTN.to_le_bytes());
        assert!(
            irq.0.load(Ordering::SeqCst),
            "enable with pending status raises SCI"
        );
        assert_eq!(r16(&pm, 2), PM1_PWRBTN);
        // Writing 0 to status clears nothing; writing the bit clears it and drops the SCI.
        pm.write(0, &0u16.to_le_bytes());
        assert!(irq.0.load(Ordering::SeqCst));
        pm.write(0, &PM1_PWRBTN.to_le_bytes());
        assert!(!irq.0.load(Ordering::SeqCst));
        assert_eq!(r16(&pm, 0) & PM1_PWRBTN, 0);
        // A 32-bit write to the event block sets enables and clears status together.
        pm.press_power_button();
        assert!(irq.0.load(Ordering::SeqCst));
        pm.write(
            0,
            &(u32::from(PM1_PWRBTN) | (u32::from(PM1_PWRBTN) << 16)).to_le_bytes(),
        );
        assert!(!irq.0.load(Ordering::SeqCst));
        pm.reset();
        assert_eq!(r16(&pm, 2), 0);
        // Enables of fixed events that never fire still read back (Linux checks), and
        // unimplemented bits read 0.
        pm.write(2, &0xffffu16.to_le_bytes());
        assert_eq!(
            r16(&pm, 2),
            PM1_TMR | PM1_PWRBTN | (1 << 5) | (1 << 9) | (1 << 10)
        );
    }

    #[test]
    fn timer_is_24_bit_and_advances_at_the_acpi_rate() {
        let pm = AcpiPm::new(Arc::new(Rec::default()), None);
        let mut b = [0u8; 4];
        pm.read(PM_TMR_OFFSET, &mut b);
        let t0 = u32::from_le_bytes(b);
        std::thread::sleep(std::time::Duration::from_millis(20));
        pm.read(PM_TMR_OFFSET, &mut b);
        let t1 = u32::from_le_bytes(b);
        assert!(t0 < 1 << 24 && t1 < 1 << 24);
        let d = t1.wrapping_sub(t0) & 0xff_ffff;
        // At least 20 ms worth of ticks; the upper bound only rules out a wrong unit.
        assert!(d >= 20 * 3579, "{d}");
        assert!(d < 1 << 23, "{d}");
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let rec = Arc::new(Rec::default());
        let irq = Arc::new(Level::default());
        let pm = AcpiPm::new(rec.clone(), Some(irq));
        for off in [
            0,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
            0xfff,
            u64::MAX - 1,
            u64::MAX,
        ] {
            for len in 0..=9 {
                for v in [0x00u8, 0xff, 0x34] {
                    let mut d = vec![0xaa; len];
                    pm.read(off, &mut d);
                    pm.write(off, &vec![v; len]);
                    pm.press_power_button();
                }
            }
            pm.reset();
        }
        // Writes of all-ones to the control block (S7, not S5) never power off.
        pm.write(PM1_CNT_OFFSET, &[0xff, 0xff]);
        assert!(
            rec.0
                .lock()
                .unwrap()
                .iter()
                .all(|e| *e == SystemEvent::Shutdown),
            "only shutdowns may come from this device"
        );
        // Out-of-range offsets read 0.
        let mut d = [0xaa; 4];
        pm.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
