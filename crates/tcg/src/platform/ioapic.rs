//! An Intel 82093AA I/O APIC at `0xfec00000` with 24 input pins.
//!
//! Registers (indirect, through IOREGSEL at offset 0x00 and IOWIN at 0x10): ID (index 0),
//! version 0x11 with 23 as the highest redirection entry (index 1), arbitration ID (index 2,
//! reads the ID), and the 24 redirection entries at indices 0x10-0x3f (low and high dword).
//!
//! Pins: an edge-triggered pin sends its message on each rising edge while unmasked; a
//! level-triggered pin sends while it is asserted and its remote IRR is clear, sets remote
//! IRR, and sends again when a local APIC's EOI for the vector clears remote IRR with the pin
//! still asserted (the EOI is broadcast by the local APICs through
//! [`super::lapic::ApicBus`]). Unmasking an asserted level pin sends at once. The polarity bit
//! is stored but lines are taken as "asserted when driven high", as devices drive them (QEMU
//! does the same). ExtINT, SMI and reserved delivery modes are not routed.
//!
//! Concurrency: state behind one mutex; messages are delivered to the local APICs while it is
//! held (lock order: IOAPIC → LAPIC; the LAPICs never call the IOAPIC with their lock held).

use std::fmt;
use std::sync::{Arc, Mutex};

use keel_accel::{BusDevice, IrqLine};

use super::lapic::{ApicBus, DeliveryMode, EoiListener, Message, Shorthand};

/// Guest-physical base of the register window.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const IOAPIC_LEN: u64 = 0x1000;
/// Input pins (GSIs 0-23).
pub const PINS: usize = 24;

const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);
const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Guest-writable bits: vector, delivery mode, destination mode, polarity, trigger, mask,
/// destination.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Errors of the IOAPIC API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoapicError {
    /// The pin does not exist.
    #[error("GSI {0} does not exist on the IOAPIC (valid: 0-23)")]
    NoSuchPin(u32),
}

#[derive(Debug, Clone)]
struct State {
    id: u32,
    select: u32,
    rte: [u64; PINS],
    /// Current input levels, one bit per pin.
    pins: u32,
}

impl Default for State {
    fn default() -> Self {
        Self {
            id: 0,
            select: 0,
            rte: [RTE_MASKED; PINS],
            pins: 0,
        }
    }
}

/// The IOAPIC.
pub struct Ioapic {
    state: Mutex<State>,
    bus: Arc<ApicBus>,
}

impl fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ioapic").finish_non_exhaustive()
    }
}

impl Ioapic {
    /// An IOAPIC in its power-on state (every entry masked) delivering through `bus`.
    pub fn new(bus: Arc<ApicBus>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            bus,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// System reset: registers to their power-on state; input levels are kept (devices still
    /// drive them).
    pub fn reset(&self) {
        let mut s = self.lock();
        let pins = s.pins;
        *s = State::default();
        s.pins = pins;
    }

    /// Sends pin `pin`'s message if its state calls for it (called with the lock held).
    fn service(&self, s: &mut State, pin: usize) {
        let rte = s.rte[pin];
        if rte & RTE_MASKED != 0 || s.pins & (1 << pin) == 0 {
            return;
        }
        let level = rte & RTE_LEVEL != 0;
        if level {
            if rte & RTE_REMOTE_IRR != 0 {
                return;
            }
            s.rte[pin] |= RTE_REMOTE_IRR;
        }
        let mode = DeliveryMode::from_bits(rte as u32);
        if matches!(
            mode,
            DeliveryMode::ExtInt | DeliveryMode::Smi | DeliveryMode::Reserved
        ) {
            return;
        }
        self.bus.deliver(&Message {
            dest: (rte >> 56) as u8,
            logical: rte & (1 << 11) != 0,
            mode,
            vector: rte as u8,
            level,
            shorthand: Shorthand::None,
            source: None,
        });
    }

    /// Drives input `pin` (0-23).
    pub fn set_pin(&self, pin: u32, high: bool) -> Result<(), IoapicError> {
        let p = usize::try_from(pin)
            .ok()
            .filter(|p| *p < PINS)
            .ok_or(IoapicError::NoSuchPin(pin))?;
        let mut s = self.lock();
        let bit = 1u32 << p;
        let was = s.pins & bit != 0;
        if high {
            s.pins |= bit;
        } else {
            s.pins &= !bit;
        }
        let level = s.rte[p] & RTE_LEVEL != 0;
        if high && (level || !was) {
            self.service(&mut s, p);
        }
        Ok(())
    }

    /// Reads the register at `offset` (IOREGSEL at 0x00, IOWIN at 0x10; others read 0).
    pub fn read(&self, offset: u64) -> u32 {
        let s = self.lock();
        match offset {
            0x00 => s.select,
            0x10 => match s.select {
                0 | 2 => s.id << 24,
                1 => VERSION,
                i @ 0x10..=0x3f => {
                    let pin = ((i - 0x10) / 2) as usize;
                    let mut rte = s.rte[pin] & !RTE_DELIVERY_STATUS;
                    if i & 1 == 1 {
                        rte >>= 32;
                    }
                    rte as u32
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Writes the register at `offset`.
    pub fn write(&self, offset: u64, v: u32) {
        let mut s = self.lock();
        match offset {
            0x00 => s.select = v & 0xff,
            0x10 => match s.select {
                0 => s.id = (v >> 24) & 0xf,
                i @ 0x10..=0x3f => {
                    let pin = ((i - 0x10) / 2) as usize;
                    let old = s.rte[pin];
                    let new = if i & 1 == 1 {
                        (old & 0xffff_ffff) | (u64::from(v) << 32)
                    } else {
                        (old & !0xffff_ffff) | u64::from(v)
                    };
                    // Remote IRR is read-only; an edge entry never has it set.
                    let mut new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                    if new & RTE_LEVEL == 0 {
                        new &= !RTE_REMOTE_IRR;
                    }
                    s.rte[pin] = new;
                    // An asserted level pin fires when unmasked (or switched to level).
                    if new & RTE_LEVEL != 0 {
                        self.service(&mut s, pin);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// An [`IrqLine`] for pin `pin`.
    pub fn irq_line(self: &Arc<Self>, pin: u32) -> Result<Arc<dyn IrqLine>, IoapicError> {
        if pin as usize >= PINS {
            return Err(IoapicError::NoSuchPin(pin));
        }
        Ok(Arc::new(IoapicLine {
            ioapic: self.clone(),
            pin,
        }))
    }
}

impl EoiListener for Ioapic {
    fn eoi(&self, vector: u8) {
        let mut s = self.lock();
        for pin in 0..PINS {
            let rte = s.rte[pin];
            if rte & RTE_LEVEL != 0 && rte & RTE_REMOTE_IRR != 0 && rte as u8 == vector {
                s.rte[pin] &= !RTE_REMOTE_IRR;
                self.service(&mut s, pin);
            }
        }
    }
}

struct IoapicLine {
    ioapic: Arc<Ioapic>,
    pin: u32,
}

impl IrqLine for IoapicLine {
    fn set_level(&self, high: bool) {
        // The pin was validated at creation.
        let _ = self.ioapic.set_pin(self.pin, high);
    }
}

/// The IOAPIC's register window for the MMIO bus: 32-bit accesses at 0x00 and 0x10 (other
/// sizes are served from the containing dword; writes narrower than 4 bytes are ignored).
#[derive(Debug)]
pub struct IoapicMmio(pub Arc<Ioapic>);

impl BusDevice for IoapicMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self.0.read(offset & !3);
        let bytes = v.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.len() < 4 {
            return;
        }
        self.0.write(
            offset,
            u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        );
    }
}

impl Ioapic {
    /// The IOAPIC's registers for a snapshot.
    pub fn save_state(&self) -> keel_accel::IoapicState {
        let s = self.lock();
        keel_accel::IoapicState {
            id: s.id,
            select: s.select,
            rte: s.rte,
            pins: s.pins,
        }
    }

    /// Puts the IOAPIC in a saved state; pins that are asserted and unmasked are serviced.
    pub fn restore_state(&self, st: &keel_accel::IoapicState) {
        let mut s = self.lock();
        s.id = st.id & 0xf;
        s.select = st.select;
        s.rte = st.rte;
        s.pins = st.pins & ((1u32 << PINS) - 1);
        for pin in 0..PINS {
            self.service(&mut s, pin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Clock;
    use crate::platform::lapic::{Lapic, reg};
    use std::sync::Weak;

    struct Zero;
    impl Clock for Zero {
        fn now_ns(&self) -> u64 {
            0
        }
    }

    fn rig() -> (Arc<Ioapic>, Vec<Arc<Lapic>>) {
        let bus = Arc::new(ApicBus::new());
        let mut v = Vec::new();
        for i in 0..2 {
            let l = Arc::new(Lapic::new(i, true, Arc::new(Zero)));
            l.write_reg(reg::SVR, 0x1ff);
            bus.attach(l.clone());
            v.push(l);
        }
        let io = Arc::new(Ioapic::new(bus.clone()));
        let w: Weak<dyn EoiListener> = Arc::downgrade(&(io.clone() as Arc<dyn EoiListener>));
        bus.set_eoi_listener(w);
        (io, v)
    }

    fn set_rte(io: &Ioapic, pin: u32, lo: u32, hi: u32) {
        io.write(0, 0x10 + 2 * pin + 1);
        io.write(0x10, hi);
        io.write(0, 0x10 + 2 * pin);
        io.write(0x10, lo);
    }

    #[test]
    fn registers() {
        let (io, _l) = rig();
        io.write(0, 1);
        assert_eq!(io.read(0x10), 0x0017_0011);
        io.write(0, 0);
        io.write(0x10, 0x0200_0000);
        assert_eq!(io.read(0x10), 0x0200_0000);
        io.write(0, 0x10 + 2 * 5);
        assert_eq!(io.read(0x10), 1 << 16, "masked at power-on");
        set_rte(&io, 5, 0x0000_a031, 0x0100_0000);
        io.write(0, 0x10 + 2 * 5 + 1);
        assert_eq!(io.read(0x10), 0x0100_0000);
        io.write(0, 0x10 + 2 * 5);
        assert_eq!(io.read(0x10), 0x0000_a031);
        assert_eq!(io.set_pin(24, true), Err(IoapicError::NoSuchPin(24)));
    }

    #[test]
    fn edge_pin_fires_on_rising_edges_only() {
        let (io, l) = rig();
        set_rte(&io, 4, 0x0000_0034, 0x0100_0000);
        io.set_pin(4, true).unwrap();
        assert!(l[1].has_interrupt() && !l[0].has_interrupt());
        assert_eq!(l[1].acknowledge(), Some(0x34));
        io.set_pin(4, true).unwrap();
        assert!(!l[1].has_interrupt(), "no new edge");
        l[1].write_reg(reg::EOI, 0);
        assert!(!l[1].has_interrupt());
        io.set_pin(4, false).unwrap();
        io.set_pin(4, true).unwrap();
        assert!(l[1].has_interrupt());
    }

    #[test]
    fn level_pin_remote_irr_and_eoi_redelivery() {
        let (io, l) = rig();
        // Masked level pin, asserted: nothing until unmasked.
        set_rte(&io, 16, 0x0001_8041, 0);
        io.set_pin(16, true).unwrap();
        assert!(!l[0].has_interrupt());
        set_rte(&io, 16, 0x0000_8041, 0);
        assert!(l[0].has_interrupt());
        io.write(0, 0x10 + 32);
        assert_ne!(io.read(0x10) & (1 << 14), 0, "remote IRR set");
        assert_eq!(l[0].acknowledge(), Some(0x41));
        // Still asserted at EOI: delivered again.
        let a = l[0].write_reg(reg::EOI, 0);
        assert_eq!(a, crate::platform::lapic::Action::EoiBroadcast(0x41));
        io.eoi(0x41);
        assert!(l[0].has_interrupt());
        assert_eq!(l[0].acknowledge(), Some(0x41));
        // Deasserted before EOI: remote IRR clears, nothing new.
        io.set_pin(16, false).unwrap();
        l[0].write_reg(reg::EOI, 0);
        io.eoi(0x41);
        assert!(!l[0].has_interrupt());
        io.write(0, 0x10 + 32);
        assert_eq!(io.read(0x10) & (1 << 14), 0);
    }

    #[test]
    fn arbitrary_register_traffic_never_panics() {
        let (io, l) = rig();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = if x & 1 == 0 { 0 } else { 0x10 };
            if x & 2 != 0 {
                io.write(off, (x >> 16) as u32);
            } else {
                let _ = io.read(off);
            }
            let _ = io.set_pin(((x >> 8) % 30) as u32, x & 4 != 0);
            io.eoi((x >> 24) as u8);
            for a in &l {
                let _ = a.acknowledge();
                let _ = a.write_reg(reg::EOI, 0);
            }
        }
    }

    #[test]
    fn logical_destination_and_reset_keeps_levels() {
        let (io, l) = rig();
        l[0].write_reg(reg::LDR, 0x01 << 24);
        l[1].write_reg(reg::LDR, 0x02 << 24);
        set_rte(&io, 9, 0x0000_0851, 0x0200_0000);
        io.set_pin(9, true).unwrap();
        assert!(l[1].has_interrupt() && !l[0].has_interrupt());
        io.reset();
        io.write(0, 0x10 + 18);
        assert_eq!(io.read(0x10), 1 << 16);
        set_rte(&io, 9, 0x0000_8052, 0);
        assert!(l[0].has_interrupt(), "level still held after reset");
    }
}
