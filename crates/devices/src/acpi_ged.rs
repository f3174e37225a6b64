//! The registers of an ACPI Generic Event Device (GED) as QEMU's microvm maps them, which is
//! how a hardware-reduced ACPI guest powers off and resets.
//!
//! Mechanism (documented choice): microvm's FADT is hardware-reduced (no PM1 blocks), so its
//! `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG` point at byte registers of this device and its
//! `RESET_REG` at a third one. Linux's `poweroff` enters S5 by writing
//! `SLP_EN | (SLP_TYP << 2)` to the sleep control register, with `SLP_TYP` taken from the DSDT's
//! `\_S5` package (5 here, as in QEMU); this device turns that into [`SystemEvent::Shutdown`],
//! which ends the VMM with status 0. Writing [`GED_RESET_VALUE`] to the reset register gives
//! [`SystemEvent::Reset`]. The layout is QEMU's: the 32-bit event selector at offset 0 (read
//! and cleared by the DSDT's `_EVT` method after the GED interrupt), the three registers at
//! [`GED_REGS_OFFSET`]. [`AcpiGed::press_power_button`] sets the power-button event and raises
//! the interrupt; the guest's `_EVT` then notifies the `PWRB` device and an ACPI-aware guest
//! shuts down (QMP `system_powerdown`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use keel_accel::{BusDevice, IrqLine, SystemEvent, SystemEvents};

/// Offset of the 32-bit event selector (`ESEL` in the DSDT).
pub const GED_EVENT_SELECTOR_OFFSET: u64 = 0x0;
/// Event selector bit of the power button (QEMU's `ACPI_GED_PWR_DOWN_EVT`).
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 1;
/// Offset of the sleep/reset register block.
pub const GED_REGS_OFFSET: u64 = 0x200;
/// Sleep control register, relative to [`GED_REGS_OFFSET`].
pub const GED_SLEEP_CTL: u64 = 0;
/// Sleep status register, relative to [`GED_REGS_OFFSET`].
pub const GED_SLEEP_STS: u64 = 1;
/// Reset register, relative to [`GED_REGS_OFFSET`].
pub const GED_RESET: u64 = 2;
/// Value the FADT's reset register takes for a reset.
pub const GED_RESET_VALUE: u8 = 0x42;
/// Bus length covering the selector and the register block.
pub const GED_MMIO_LEN: u64 = GED_REGS_OFFSET + 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The `\_S5` sleep type the DSDT advertises.
pub const SLP_TYP_S5: u8 = 5;

/// GED sleep/reset registers.
pub struct AcpiGed {
    events: Arc<dyn SystemEvents>,
    irq: Option<Arc<dyn IrqLine>>,
    selector: AtomicU32,
}

impl std::fmt::Debug for AcpiGed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcpiGed")
    }
}

impl AcpiGed {
    /// A GED that reports power-off and reset to `events` and signals events on `irq`.
    pub fn new(events: Arc<dyn SystemEvents>, irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            events,
            irq,
            selector: AtomicU32::new(0),
        }
    }

    /// Signals the power-button event to the guest (ACPI `system_powerdown`).
    pub fn press_power_button(&self) {
        self.selector
            .fetch_or(GED_EVENT_POWER_BUTTON, Ordering::SeqCst);
        if let Some(irq) = &self.irq {
            irq.pulse();
        }
    }

    /// Clears pending events (machine reset).
    pub fn reset(&self) {
        self.selector.store(0, Ordering::SeqCst);
    }

    fn write_byte(&self, offset: u64, value: u8) {
        match offset.checked_sub(GED_REGS_OFFSET) {
            Some(GED_SLEEP_CTL)
                if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 =>
            {
                self.events.request(SystemEvent::Shutdown);
            }
            Some(GED_RESET) if value == GED_RESET_VALUE => {
                self.events.request(SystemEvent::Reset);
            }
            _ => {}
        }
    }
}

impl BusDevice for AcpiGed {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GED_EVENT_SELECTOR_OFFSET {
            // Reading the selector returns the pending events and clears them (as QEMU's).
            let sel = self.selector.swap(0, Ordering::SeqCst).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&sel[..n]);
        }
        // Sleep status and reset registers read 0.
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // The registers are byte-wide; a wider write reaches only the first.
        if let Some(&v) = data.first() {
            self.write_byte(offset, v);
        }
    }
}

impl AcpiGed {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "acpi-ged";

    /// The qdev type: onboard (the board creates it, `-device` cannot), no properties.
    pub fn qdev_type() -> keel_qdev::DeviceType {
        keel_qdev::DeviceType::new(Self::QDEV_TYPE, keel_qdev::BusType::System)
            .description("ACPI generic event device (power button, sleep control)")
            .user_creatable(false)
    }
}

/// The GED's pending event selector, for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiGedSnapshot {
    /// Events the guest has not read yet.
    pub selector: u32,
}

impl keel_snapshot::Persist for AcpiGedSnapshot {
    fn encode(&self, e: &mut keel_snapshot::Enc) {
        e.u32(self.selector);
    }
    fn decode(d: &mut keel_snapshot::Dec<'_>) -> Result<Self, keel_snapshot::DecodeError> {
        Ok(Self {
            selector: d.u32("ged selector")?,
        })
    }
}

impl keel_snapshot::Stateful for AcpiGed {
    type State = AcpiGedSnapshot;
    const SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"GED0");
    const VERSION: u32 = 1;

    fn save_state(&self) -> AcpiGedSnapshot {
        AcpiGedSnapshot {
            selector: self.selector.load(Ordering::SeqCst),
        }
    }

    fn restore_state(&self, st: &AcpiGedSnapshot) {
        self.selector.store(st.selector, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::Rec;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let rec = Arc::new(Rec::default());
        let g = AcpiGed::new(rec.clone(), None);
        g.write(GED_REGS_OFFSET + GED_SLEEP_CTL, &[SLP_EN | (5 << 2)]);
        g.write(GED_REGS_OFFSET + GED_SLEEP_CTL, &[5 << 2]); // no SLP_EN
        g.write(GED_REGS_OFFSET + GED_SLEEP_CTL, &[SLP_EN | (3 << 2)]); // S3: ignored
        g.write(GED_REGS_OFFSET + GED_RESET, &[0x41]);
        g.write(GED_REGS_OFFSET + GED_RESET, &[GED_RESET_VALUE]);
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[SystemEvent::Shutdown, SystemEvent::Reset]
        );
    }

    struct CountIrq(AtomicU32);
    impl IrqLine for CountIrq {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn power_button_raises_the_interrupt_and_the_selector_clears_on_read() {
        let irq = Arc::new(CountIrq(AtomicU32::new(0)));
        let g = AcpiGed::new(Arc::new(Rec::default()), Some(irq.clone()));
        g.press_power_button();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut sel = [0u8; 4];
        g.read(GED_EVENT_SELECTOR_OFFSET, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), GED_EVENT_POWER_BUTTON);
        g.read(GED_EVENT_SELECTOR_OFFSET, &mut sel);
        assert_eq!(sel, [0; 4]);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let rec = Arc::new(Rec::default());
        let g = AcpiGed::new(rec, None);
        for off in [0, 1, 0x1ff, 0x200, 0x201, 0x202, 0x203, u64::MAX] {
            for len in 0..=8 {
                let mut d = vec![0xaa; len];
                g.read(off, &mut d);
                assert!(d.iter().all(|&b| b == 0));
                g.press_power_button();
                g.reset();
                g.write(off, &vec![0x00; len]);
            }
        }
    }
}
