//! The PC's two cascaded Intel 8259A programmable interrupt controllers.
//!
//! The master serves ISA IRQs 0-7 at ports 0x20/0x21, the slave IRQs 8-15 at 0xa0/0xa1, and
//! its output feeds the master's input 2. The edge/level control registers (ELCR, ports
//! 0x4d0/0x4d1, as on PIIX/ICH chipsets) select level triggering per line.
//!
//! The model is a register machine in the spirit of vm-superio: [`Pic`] holds the state
//! behind one mutex and publishes "the INTR output is asserted" in an atomic, so the vCPU's
//! per-instruction check costs one load. Every guest-written value is accepted; nothing here
//! panics on guest input.
//!
//! Behaviour kept from the 8259A data sheet:
//! * ICW1 starts initialisation: IMR, ISR and IRR clear, IRQ 7 lowest priority, special mask
//!   off, reads return IRR; inputs need a new rising edge. ICW2 (vector base), ICW3 (cascade,
//!   skipped in single mode) and ICW4 (only if ICW1.IC4) follow on the data port.
//! * OCW1 sets the mask; OCW2 does non-specific / specific EOI, rotation and priority setting;
//!   OCW3 selects IRR/ISR reads, poll mode and special mask mode.
//! * Edge inputs latch IRR on a rising edge; level inputs (ELCR or ICW1.LTIM) follow the pin.
//! * Auto-EOI, rotate-on-auto-EOI, special fully nested mode on the master.
//! * A request that vanished before the acknowledge cycle yields the spurious IRQ 7 (master)
//!   or IRQ 15 (slave, through the cascade) vector, with no ISR bit set.
//!
//! Not modelled (no PC guest relies on them): MCS-80/85 call-address mode, buffered mode.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{BusDevice, BusRange, IrqLine};

/// Master command/status port.
pub const MASTER_PORT: u16 = 0x20;
/// Slave command/status port.
pub const SLAVE_PORT: u16 = 0xa0;
/// Edge/level control register of the master (the slave's is the next port).
pub const ELCR_PORT: u16 = 0x4d0;
/// The master input the slave is cascaded on.
pub const CASCADE_IRQ: u8 = 2;

/// ELCR bits that may be set: IRQ 0, 1, 2, 8 and 13 are always edge triggered on a PC.
const ELCR_WRITABLE: [u8; 2] = [0xf8, 0xde];

/// Errors of the PIC API (not of guest accesses, which never fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PicError {
    /// Only ISA IRQs 0-15 exist on the 8259 pair.
    #[error("IRQ {0} does not exist on the 8259 pair (valid: 0-15)")]
    NoSuchIrq(u32),
}

/// One 8259A.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register.
    imr: u8,
    /// Current level of each input pin (for edge detection and level inputs).
    pins: u8,
    /// Level-triggered inputs from the ELCR.
    elcr: u8,
    /// ICW1.LTIM: all inputs level triggered.
    ltim: bool,
    /// Vector base from ICW2 (low 3 bits clear).
    vector_base: u8,
    /// The input with the highest priority (0 after ICW1; rotation and OCW2 "set priority"
    /// move it). Priorities descend from it: `highest`, `highest + 1`, ... modulo 8.
    highest: u8,
    /// Next step of the initialisation sequence (0 = operational).
    init_step: u8,
    /// ICW1.IC4: an ICW4 follows.
    expect_icw4: bool,
    /// ICW1.SNGL: no ICW3.
    single: bool,
    /// ICW3 as written (cascade mask on the master, slave id on the slave).
    icw3: u8,
    /// ICW4.AEOI.
    auto_eoi: bool,
    /// OCW2 rotate-in-auto-EOI mode.
    rotate_on_aeoi: bool,
    /// ICW4.SFNM.
    special_fully_nested: bool,
    /// OCW3: reads of the command port return ISR (else IRR).
    read_isr: bool,
    /// OCW3 poll command pending: the next read is a poll.
    poll: bool,
    /// OCW3 special mask mode.
    special_mask: bool,
    /// ICW2 was written at least once: the chip has a vector base.
    initialised: bool,
}

impl Chip {
    fn level_mask(&self) -> u8 {
        if self.ltim { 0xff } else { self.elcr }
    }

    /// Drives input `bit` (0-7) to `high`.
    fn set_pin(&mut self, bit: u8, high: bool) {
        let m = 1u8 << (bit & 7);
        let was = self.pins & m != 0;
        if high {
            self.pins |= m;
            if self.level_mask() & m != 0 || !was {
                self.irr |= m;
            }
        } else {
            self.pins &= !m;
            if self.level_mask() & m != 0 {
                self.irr &= !m;
            }
        }
    }

    /// Priority rank (0 = highest) of the best bit in `mask`, or 8 when empty.
    fn best_rank(&self, mask: u8) -> u8 {
        (0..8)
            .find(|r| mask & (1 << ((r + self.highest) & 7)) != 0)
            .unwrap_or(8)
    }

    fn rank_to_irq(&self, rank: u8) -> u8 {
        (rank + self.highest) & 7
    }

    /// The input this chip would present to the CPU now, honouring masks and in-service
    /// priorities. `is_master` enables the special-fully-nested exception for the cascade.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let req = self.irr & !self.imr;
        let rank = self.best_rank(req);
        if rank == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            // A slave in service must not block higher-priority slave requests.
            in_service &= !self.icw3;
        }
        let cur = self.best_rank(in_service);
        (rank < cur).then(|| self.rank_to_irq(rank))
    }

    /// The acknowledge cycle for input `irq`.
    fn ack(&mut self, irq: u8) {
        let m = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.highest = (irq + 1) & 7;
            }
        } else {
            self.isr |= m;
        }
        // An edge request is consumed; a level request stays while the pin is high.
        if self.level_mask() & m == 0 {
            self.irr &= !m;
        }
    }

    fn non_specific_eoi(&mut self, rotate: bool) {
        let mut mask = self.isr;
        if self.special_mask {
            mask &= !self.imr;
        }
        let rank = self.best_rank(mask);
        if rank < 8 {
            let irq = self.rank_to_irq(rank);
            self.isr &= !(1 << irq);
            if rotate {
                self.highest = (irq + 1) & 7;
            }
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1.
            self.irr = 0;
            self.isr = 0;
            self.imr = 0;
            self.highest = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_aeoi = false;
            self.special_fully_nested = false;
            self.ltim = v & 0x08 != 0;
            self.single = v & 0x02 != 0;
            self.expect_icw4 = v & 0x01 != 0;
            self.init_step = 1;
            // Inputs that are high now must go low and high again to request.
            if self.ltim {
                self.irr = self.pins;
            } else {
                self.irr = self.pins & self.elcr;
            }
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let irq = v & 7;
            match v >> 5 {
                0 => self.rotate_on_aeoi = false,
                4 => self.rotate_on_aeoi = true,
                1 => self.non_specific_eoi(false),
                5 => self.non_specific_eoi(true),
                3 => self.isr &= !(1 << irq),
                7 => {
                    self.isr &= !(1 << irq);
                    self.highest = (irq + 1) & 7;
                }
                6 => self.highest = (irq + 1) & 7,
                _ => {} // 2: no operation.
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            1 => {
                self.vector_base = v & 0xf8;
                self.initialised = true;
                self.init_step = if !self.single {
                    2
                } else if self.expect_icw4 {
                    3
                } else {
                    0
                };
            }
            2 => {
                self.icw3 = v;
                self.init_step = if self.expect_icw4 { 3 } else { 0 };
            }
            3 => {
                self.auto_eoi = v & 0x02 != 0;
                self.special_fully_nested = v & 0x10 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }
}

/// The INTR-side state of the pair, behind the [`Pic`] mutex.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PicState {
    chips: [Chip; 2],
}

impl PicState {
    /// Propagates the slave's output to master input 2; returns the master's INTR output.
    fn update(&mut self) -> bool {
        let slave_out = self.chips[1].pending(false).is_some();
        self.chips[0].set_pin(CASCADE_IRQ, slave_out);
        self.chips[0].pending(true).is_some()
    }

    fn set_irq(&mut self, irq: u8, high: bool) {
        let chip = usize::from(irq >= 8);
        self.chips[chip].set_pin(irq & 7, high);
    }

    /// The interrupt acknowledge cycle. With no request left, an initialised master answers
    /// with its IRQ 7 vector and sets no ISR bit (a spurious interrupt); an uninitialised
    /// one has no vector to give.
    fn acknowledge(&mut self) -> Option<u8> {
        let Some(irq) = self.chips[0].pending(true) else {
            return self.chips[0]
                .initialised
                .then_some(self.chips[0].vector_base | 7);
        };
        self.chips[0].ack(irq);
        let vector = if irq == CASCADE_IRQ {
            match self.chips[1].pending(false) {
                Some(sirq) => {
                    self.chips[1].ack(sirq);
                    self.chips[1].vector_base | sirq
                }
                // The slave's request went away: it answers with its IRQ 7 (IRQ 15).
                None => self.chips[1].vector_base | 7,
            }
        } else {
            self.chips[0].vector_base | irq
        };
        Some(vector)
    }

    /// Poll-mode read of one chip: `0x80 | irq` with the request acknowledged, or 0.
    fn poll_read(&mut self, chip: usize) -> u8 {
        self.chips[chip].poll = false;
        match self.chips[chip].pending(chip == 0) {
            Some(irq) => {
                self.chips[chip].ack(irq);
                if chip == 0 && irq == CASCADE_IRQ {
                    // Keep the master's cascade request in step with the slave.
                    self.update();
                }
                0x80 | irq
            }
            None => 0,
        }
    }

    fn read_port(&mut self, chip: usize, reg: u64) -> u8 {
        if self.chips[chip].poll {
            return self.poll_read(chip);
        }
        let c = &self.chips[chip];
        if reg == 0 {
            if c.read_isr { c.isr } else { c.irr }
        } else {
            c.imr
        }
    }

    fn write_port(&mut self, chip: usize, reg: u64, v: u8) {
        if reg == 0 {
            self.chips[chip].write_command(v);
        } else {
            self.chips[chip].write_data(v);
        }
    }
}

type Notifier = Arc<dyn Fn() + Send + Sync>;

/// The 8259A master/slave pair.
///
/// Thread-safe: device threads call [`Pic::set_irq`] (or an [`IrqLine`] from
/// [`Pic::irq_line`]), the vCPU calls [`Pic::has_interrupt`] / [`Pic::acknowledge`], and the
/// bus calls the port handlers. Lock order: the bus map lock, then this PIC's mutex; the
/// wake-up notifier runs after the mutex is released.
pub struct Pic {
    state: Mutex<PicState>,
    intr: AtomicBool,
    notifier: Mutex<Option<Notifier>>,
}

impl fmt::Debug for Pic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pic")
            .field("intr", &self.intr.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair in its power-on state: uninitialised, nothing masked, no vector base.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(PicState::default()),
            intr: AtomicBool::new(false),
            notifier: Mutex::new(None),
        }
    }

    /// Registers a callback run (outside the PIC lock) whenever the INTR output goes from
    /// deasserted to asserted; the vCPU uses it to leave `hlt` (e.g. [`super::Wakeup::notify`]
    /// plus a kick). Replaces any earlier callback.
    pub fn set_wakeup(&self, notify: impl Fn() + Send + Sync + 'static) {
        let mut n = self.notifier.lock().unwrap_or_else(|p| p.into_inner());
        *n = Some(Arc::new(notify));
    }

    /// Whether INTR is asserted: an unmasked request outranks everything in service.
    /// One atomic load; call at every instruction boundary where RFLAGS.IF = 1.
    #[inline]
    pub fn has_interrupt(&self) -> bool {
        self.intr.load(Ordering::Acquire)
    }

    /// Runs the interrupt acknowledge cycle and returns the vector to deliver.
    ///
    /// Call it only after [`Pic::has_interrupt`] returned true (with RFLAGS.IF set). If the
    /// request was withdrawn in between (a level line dropped on another thread), the
    /// hardware answers the INTA cycle with a spurious IRQ 7 (master) vector and sets no ISR
    /// bit; so does this. When the master selected the cascade but the slave's request
    /// vanished, the slave's spurious IRQ 15 vector comes back. `None` only when the master
    /// was never initialised (no ICW2, so no vector base exists).
    pub fn acknowledge(&self) -> Option<u8> {
        self.with_state(|s| s.acknowledge())
    }

    /// System reset: both chips return to their power-on state (uninitialised, nothing in
    /// service or requested, ELCR clear), but the input pins keep the levels the devices
    /// drive, so a level held across the reset is seen again once the guest programs the pair.
    pub fn reset(&self) {
        self.with_state(|s| {
            let pins = [s.chips[0].pins, s.chips[1].pins];
            *s = PicState::default();
            for (chip, p) in pins.into_iter().enumerate() {
                s.chips[chip].pins = p;
            }
        });
    }

    /// Drives ISA input `irq` (0-15) high or low.
    pub fn set_irq(&self, irq: u8, high: bool) -> Result<(), PicError> {
        if irq > 15 {
            return Err(PicError::NoSuchIrq(u32::from(irq)));
        }
        self.with_state(|s| s.set_irq(irq, high));
        Ok(())
    }

    /// An [`IrqLine`] for ISA input `irq` (0-15), for devices and `Vm::irq_line`.
    pub fn irq_line(self: &Arc<Self>, irq: u32) -> Result<Arc<dyn IrqLine>, PicError> {
        let line = u8::try_from(irq)
            .ok()
            .filter(|l| *l <= 15)
            .ok_or(PicError::NoSuchIrq(irq))?;
        Ok(Arc::new(PicIrqLine {
            pic: Arc::clone(self),
            line,
        }))
    }

    /// The port handlers to map on the PIO bus: master 0x20-0x21, slave 0xa0-0xa1 and the
    /// ELCR pair 0x4d0-0x4d1.
    pub fn bus_devices(self: &Arc<Self>) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        let mk = |port: u16, kind: PortKind| -> (BusRange, Arc<dyn BusDevice>) {
            (
                BusRange {
                    base: u64::from(port),
                    len: 2,
                },
                Arc::new(PicPorts {
                    pic: Arc::clone(self),
                    kind,
                }),
            )
        };
        vec![
            mk(MASTER_PORT, PortKind::Chip(0)),
            mk(SLAVE_PORT, PortKind::Chip(1)),
            mk(ELCR_PORT, PortKind::Elcr),
        ]
    }

    /// Reads one 8-bit register: `chip` 0 (master) or 1 (slave), `reg` 0 (command/status)
    /// or 1 (data/IMR). Out-of-range arguments read 0xff.
    pub fn read_register(&self, chip: usize, reg: u64) -> u8 {
        if chip > 1 || reg > 1 {
            return 0xff;
        }
        self.with_state(|s| s.read_port(chip, reg))
    }

    /// Writes one 8-bit register (see [`Pic::read_register`]); out-of-range writes are ignored.
    pub fn write_register(&self, chip: usize, reg: u64, value: u8) {
        if chip > 1 || reg > 1 {
            return;
        }
        self.with_state(|s| s.write_port(chip, reg, value));
    }

    /// Reads ELCR `index` (0: IRQs 0-7, 1: IRQs 8-15); other indices read 0xff.
    pub fn read_elcr(&self, index: usize) -> u8 {
        if index > 1 {
            return 0xff;
        }
        self.with_state(|s| s.chips[index].elcr)
    }

    /// Writes ELCR `index`; bits of lines that are always edge triggered are ignored.
    pub fn write_elcr(&self, index: usize, value: u8) {
        if index > 1 {
            return;
        }
        self.with_state(|s| {
            let c = &mut s.chips[index];
            c.elcr = value & ELCR_WRITABLE[index];
            // A line switched to level follows its pin from now on.
            c.irr = (c.irr & !c.elcr) | (c.pins & c.elcr);
        });
    }

    /// Runs `f` on the state, recomputes INTR, and wakes the vCPU on a rising INTR.
    fn with_state<R>(&self, f: impl FnOnce(&mut PicState) -> R) -> R {
        let (r, rose) = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut s);
            let out = s.update();
            let was = self.intr.swap(out, Ordering::AcqRel);
            (r, out && !was)
        };
        if rose {
            let n = self
                .notifier
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(n) = n {
                n();
            }
        }
        r
    }
}

/// An ISA input of the [`Pic`] as an [`IrqLine`].
struct PicIrqLine {
    pic: Arc<Pic>,
    line: u8,
}

impl IrqLine for PicIrqLine {
    fn set_level(&self, high: bool) {
        // `line` was validated at creation.
        let _ = self.pic.set_irq(self.line, high);
    }
}

#[derive(Debug, Clone, Copy)]
enum PortKind {
    Chip(usize),
    Elcr,
}

/// Bus adapter for one two-port register block. Wider accesses are split into bytes at
/// consecutive ports; bytes past the block read 0xff and are dropped on write.
struct PicPorts {
    pic: Arc<Pic>,
    kind: PortKind,
}

impl PicPorts {
    fn read_byte(&self, offset: u64) -> u8 {
        match self.kind {
            PortKind::Chip(c) => self.pic.read_register(c, offset),
            PortKind::Elcr => usize::try_from(offset).map_or(0xff, |i| self.pic.read_elcr(i)),
        }
    }

    fn write_byte(&self, offset: u64, v: u8) {
        match self.kind {
            PortKind::Chip(c) => self.pic.write_register(c, offset, v),
            PortKind::Elcr => {
                if let Ok(i) = usize::try_from(offset) {
                    self.pic.write_elcr(i, v);
                }
            }
        }
    }
}

impl BusDevice for PicPorts {
    fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset.saturating_add(i as u64));
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write_byte(offset.saturating_add(i as u64), *b);
        }
    }
}

impl Pic {
    /// The pair's state for a snapshot (master, slave).
    pub fn save_state(&self) -> [keel_accel::PicChipState; 2] {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let one = |c: &Chip| keel_accel::PicChipState {
            irr: c.irr,
            isr: c.isr,
            imr: c.imr,
            pins: c.pins,
            elcr: c.elcr,
            vector_base: c.vector_base,
            highest: c.highest,
            init_step: c.init_step,
            ltim: c.ltim,
            expect_icw4: c.expect_icw4,
            single: c.single,
            icw3: c.icw3,
            auto_eoi: c.auto_eoi,
            rotate_on_aeoi: c.rotate_on_aeoi,
            special_fully_nested: c.special_fully_nested,
            read_isr: c.read_isr,
            poll: c.poll,
            special_mask: c.special_mask,
        };
        [one(&s.chips[0]), one(&s.chips[1])]
    }

    /// Puts the pair in a saved state (from this backend or another) and recomputes INTR.
    pub fn restore_state(&self, chips: &[keel_accel::PicChipState; 2]) {
        self.with_state(|s| {
            for (i, c) in chips.iter().enumerate() {
                s.chips[i] = Chip {
                    irr: c.irr,
                    isr: c.isr,
                    imr: c.imr,
                    pins: c.pins,
                    elcr: c.elcr & ELCR_WRITABLE[i],
                    ltim: c.ltim,
                    vector_base: c.vector_base & !7,
                    highest: c.highest & 7,
                    init_step: c.init_step.min(3),
                    expect_icw4: c.expect_icw4,
                    single: c.single,
                    icw3: c.icw3,
                    auto_eoi: c.auto_eoi,
                    rotate_on_aeoi: c.rotate_on_aeoi,
                    special_fully_nested: c.special_fully_nested,
                    read_isr: c.read_isr,
                    poll: c.poll,
                    special_mask: c.special_mask,
                    // ICW2 was written if the chip went past it.
                    initialised: c.init_step != 1 && (c.vector_base != 0 || c.imr != 0),
                };
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Linux's `init_8259A(0)`: mask all, ICW1-4 on both chips (vectors 0x30/0x38), unmask.
    fn linux_init(pic: &Pic, auto_eoi: bool) {
        pic.write_register(0, 1, 0xff);
        pic.write_register(1, 1, 0xff);
        pic.write_register(0, 0, 0x11);
        pic.write_register(0, 1, 0x30);
        pic.write_register(0, 1, 1 << CASCADE_IRQ);
        pic.write_register(0, 1, if auto_eoi { 0x03 } else { 0x01 });
        pic.write_register(1, 0, 0x11);
        pic.write_register(1, 1, 0x38);
        pic.write_register(1, 1, CASCADE_IRQ);
        pic.write_register(1, 1, 0x01);
        pic.write_register(0, 1, 0xfb); // all masked but the cascade
        pic.write_register(1, 1, 0xff);
    }

    fn unmask(pic: &Pic, irq: u8) {
        let chip = usize::from(irq >= 8);
        let m = pic.read_register(chip, 1);
        pic.write_register(chip, 1, m & !(1 << (irq & 7)));
    }

    #[test]
    fn reset_returns_to_power_on_but_keeps_held_levels() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0xa5);
        pic.write_elcr(0, 1 << 4);
        pic.set_irq(4, true).unwrap();
        pic.reset();
        assert_eq!(pic.read_register(0, 1), 0, "IMR cleared");
        assert_eq!(pic.read_elcr(0), 0, "ELCR cleared");
        assert!(
            !pic.has_interrupt(),
            "nothing requested before the guest programs it"
        );
        assert_eq!(pic.acknowledge(), None, "no vector base until ICW2 again");
        linux_init(&pic, false);
        pic.write_elcr(0, 1 << 4);
        unmask(&pic, 4);
        // The device still holds IRQ 4 high: as a level input it is requested again.
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn imr_reads_back_before_init_like_linux_probe() {
        let pic = Pic::new();
        pic.write_register(0, 1, 0xa5);
        assert_eq!(pic.read_register(0, 1), 0xa5);
        pic.write_register(1, 1, 0x5a);
        assert_eq!(pic.read_register(1, 1), 0x5a);
    }

    #[test]
    fn linux_init_then_timer_edge_delivers_vector_0x30_once() {
        let pic = Pic::new();
        linux_init(&pic, false);
        assert!(!pic.has_interrupt());
        pic.set_irq(0, true).unwrap();
        assert!(!pic.has_interrupt(), "IRQ0 is masked");
        unmask(&pic, 0);
        assert!(
            pic.has_interrupt(),
            "latched edge is delivered after unmask"
        );
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert!(!pic.has_interrupt());
        // ISR bit 0 is set until EOI; read ISR via OCW3.
        pic.write_register(0, 0, 0x0b);
        assert_eq!(pic.read_register(0, 0), 0x01);
        pic.write_register(0, 0, 0x0a);
        // Line still high: no new edge, nothing pending even after EOI.
        pic.write_register(0, 0, 0x20);
        assert!(!pic.has_interrupt());
        pic.set_irq(0, false).unwrap();
        pic.set_irq(0, true).unwrap();
        assert!(pic.has_interrupt());
    }

    #[test]
    fn in_service_blocks_equal_and_lower_priority_until_eoi() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0x00);
        pic.set_irq(3, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x33));
        pic.set_irq(4, true).unwrap();
        assert!(!pic.has_interrupt(), "IRQ4 is below IRQ3 in service");
        pic.set_irq(1, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x31), "IRQ1 nests above IRQ3");
        pic.write_register(0, 0, 0x20); // non-specific EOI clears IRQ1
        assert!(!pic.has_interrupt());
        pic.write_register(0, 0, 0x63); // specific EOI for IRQ3
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn slave_cascade_and_linux_eoi_sequence() {
        let pic = Pic::new();
        linux_init(&pic, false);
        unmask(&pic, 12);
        pic.set_irq(12, true).unwrap();
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x3c));
        // Both chips have the request in service.
        pic.write_register(0, 0, 0x0b);
        pic.write_register(1, 0, 0x0b);
        assert_eq!(pic.read_register(0, 0), 0x04);
        assert_eq!(pic.read_register(1, 0), 0x10);
        // Linux mask_and_ack_8259A for a slave IRQ: specific EOI on both chips.
        pic.write_register(1, 0, 0x60 | 4);
        pic.write_register(0, 0, 0x60 | CASCADE_IRQ);
        assert_eq!(pic.read_register(0, 0), 0);
        assert_eq!(pic.read_register(1, 0), 0);
        pic.set_irq(12, false).unwrap();
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn level_triggered_via_elcr_redelivers_until_line_drops() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_elcr(1, 0xff);
        assert_eq!(pic.read_elcr(1), 0xde, "IRQ 8 and 13 stay edge");
        pic.write_elcr(0, 0xff);
        assert_eq!(pic.read_elcr(0), 0xf8);
        unmask(&pic, 10);
        pic.set_irq(10, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x3a));
        pic.write_register(1, 0, 0x20);
        pic.write_register(0, 0, 0x20);
        assert!(pic.has_interrupt(), "level still high: requested again");
        assert_eq!(pic.acknowledge(), Some(0x3a));
        pic.set_irq(10, false).unwrap();
        pic.write_register(1, 0, 0x20);
        pic.write_register(0, 0, 0x20);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn edge_request_survives_line_drop_level_does_not() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        pic.write_elcr(0, 0x20);
        pic.set_irq(4, true).unwrap();
        pic.set_irq(4, false).unwrap();
        pic.set_irq(5, true).unwrap();
        pic.set_irq(5, false).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write_register(0, 0, 0x20);
        assert!(
            !pic.has_interrupt(),
            "the level request went away with its line"
        );
    }

    #[test]
    fn spurious_irq7_when_master_request_vanishes() {
        let pic = Pic::new();
        assert_eq!(pic.acknowledge(), None, "uninitialised: no vector base");
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        pic.write_elcr(0, 0x10); // IRQ 4 level
        pic.set_irq(4, true).unwrap();
        assert!(pic.has_interrupt());
        // The device drops the line before the CPU's INTA cycle.
        pic.set_irq(4, false).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x37));
        // No ISR bit: Linux's spurious check (read ISR, test bit 7) sees it as spurious.
        pic.write_register(0, 0, 0x0b);
        assert_eq!(pic.read_register(0, 0), 0);
    }

    #[test]
    fn icw1_ltim_makes_every_input_level_triggered_and_needs_new_edges() {
        let pic = Pic::new();
        pic.set_irq(5, true).unwrap();
        // ICW1 with LTIM, single chip, ICW4; vectors at 0x50, then unmask all.
        pic.write_register(0, 0, 0x1b);
        pic.write_register(0, 1, 0x50);
        pic.write_register(0, 1, 0x01);
        pic.write_register(0, 1, 0x00);
        // Level mode: the high line is requested at once.
        assert_eq!(pic.acknowledge(), Some(0x55));
        pic.write_register(0, 0, 0x20);
        assert!(pic.has_interrupt(), "still high: requested again");
        pic.set_irq(5, false).unwrap();
        assert!(!pic.has_interrupt());
        // Re-initialised in edge mode, a line that is already high needs a new edge.
        pic.set_irq(6, true).unwrap();
        pic.write_register(0, 0, 0x13);
        pic.write_register(0, 1, 0x50);
        pic.write_register(0, 1, 0x01);
        pic.write_register(0, 1, 0x00);
        assert!(!pic.has_interrupt());
        pic.set_irq(6, false).unwrap();
        pic.set_irq(6, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x56));
    }

    #[test]
    fn irr_read_shows_masked_requests() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.set_irq(3, true).unwrap();
        pic.set_irq(7, true).unwrap();
        assert!(!pic.has_interrupt(), "masked");
        pic.write_register(0, 0, 0x0a);
        assert_eq!(pic.read_register(0, 0), 0x88);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let pic = Pic::new();
        linux_init(&pic, true);
        unmask(&pic, 1);
        pic.set_irq(1, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x31));
        pic.write_register(0, 0, 0x0b);
        assert_eq!(pic.read_register(0, 0), 0);
        pic.set_irq(1, false).unwrap();
        pic.set_irq(1, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x31), "no EOI needed");
    }

    #[test]
    fn rotation_changes_priority() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        // Set priority: IRQ 4 lowest, so IRQ 5 is highest.
        pic.write_register(0, 0, 0xc0 | 4);
        pic.set_irq(3, true).unwrap();
        pic.set_irq(6, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x36));
        // Rotate on non-specific EOI: IRQ 6 becomes lowest, 7 highest, then 0.. 3.
        pic.write_register(0, 0, 0xa0);
        assert_eq!(pic.acknowledge(), Some(0x33));
    }

    #[test]
    fn poll_mode_returns_and_acknowledges() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        pic.write_register(0, 0, 0x0c); // OCW3 poll
        assert_eq!(pic.read_register(0, 0), 0, "nothing pending");
        pic.set_irq(6, true).unwrap();
        pic.write_register(0, 0, 0x0c);
        assert_eq!(pic.read_register(0, 0), 0x86);
        assert!(!pic.has_interrupt(), "polled request is in service");
        // Next read is a normal IRR read again.
        assert_eq!(pic.read_register(0, 0), 0);
    }

    #[test]
    fn spurious_irq15_when_slave_request_vanishes() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        pic.write_register(1, 1, 0);
        pic.write_elcr(1, 0x02); // IRQ 9 level
        pic.set_irq(9, true).unwrap();
        assert!(pic.has_interrupt());
        // Master's cascade input is edge-latched; the slave's level request goes away.
        pic.set_irq(9, false).unwrap();
        // The master still has IRR2 latched (edge), so INTR stays up.
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x3f));
        pic.write_register(1, 0, 0x0b);
        assert_eq!(pic.read_register(1, 0), 0, "spurious sets no ISR bit");
    }

    #[test]
    fn special_mask_mode_allows_lower_priority() {
        let pic = Pic::new();
        linux_init(&pic, false);
        pic.write_register(0, 1, 0);
        pic.set_irq(3, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x33));
        pic.write_register(0, 1, 0x08); // mask IRQ3 (in service)
        pic.write_register(0, 0, 0x68); // OCW3: set special mask
        pic.set_irq(5, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn wakeup_fires_on_rising_intr_only() {
        let pic = Arc::new(Pic::new());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        pic.set_wakeup(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        linux_init(&pic, false);
        unmask(&pic, 4);
        let line = pic.irq_line(4).unwrap();
        line.set_level(true);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        line.set_level(true);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(pic.irq_line(16).is_err());
    }

    #[test]
    fn bus_adapters_map_ports_and_split_wide_accesses() {
        let pic = Arc::new(Pic::new());
        let devs = pic.bus_devices();
        let bases: Vec<u64> = devs.iter().map(|(r, _)| r.base).collect();
        assert_eq!(bases, vec![0x20, 0xa0, 0x4d0]);
        let (_, master) = &devs[0];
        master.write(1, &[0x12]);
        let mut w = [0u8; 2];
        master.read(0, &mut w);
        assert_eq!(w, [0x00, 0x12]);
        let mut d = [0u8; 4];
        master.read(1, &mut d);
        assert_eq!(d, [0x12, 0xff, 0xff, 0xff]);
        let (_, elcr) = &devs[2];
        elcr.write(0, &[0xff, 0xff]);
        let mut e = [0u8; 2];
        elcr.read(0, &mut e);
        assert_eq!(e, [0xf8, 0xde]);
    }

    #[test]
    fn arbitrary_guest_writes_never_panic() {
        let pic = Arc::new(Pic::new());
        let devs = pic.bus_devices();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let (_, d) = &devs[(x % 3) as usize];
            let off = u64::from((x >> 8) % 3);
            if x & 0x8000_0000 != 0 {
                d.write(off, &[(x >> 16) as u8]);
            } else {
                let mut b = [0u8; 2];
                d.read(off, &mut b);
            }
            if x & 0x7 == 0 {
                let _ = pic.set_irq(((x >> 3) % 16) as u8, x & 0x10 != 0);
            }
            if pic.has_interrupt() {
                let _ = pic.acknowledge();
            }
        }
    }
}
