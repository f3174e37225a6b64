//! A minimal i8042 keyboard controller: what Linux probes, and the CPU reset line.
//!
//! Ports 0x60 (data) and 0x64 (status on read, command on write). Supported: reading and
//! writing the controller configuration byte (0x20/0x60), the controller and keyboard
//! interface self-tests (0xAA → 0x55, 0xAB → 0x00), enabling/disabling the interfaces, the
//! output port (0xD0/0xD1; clearing bit 0 resets the CPU), 0xD2 (write keyboard output
//! buffer) and the reset pulse 0xFE (any 0xF0-0xFF command with bit 0 clear). A keyboard that
//! acknowledges every command is attached (identify 0xF2 answers `AB 83`, reset 0xFF answers
//! `AA`); there is no auxiliary (mouse) port, and the controller says so at once rather than
//! by silence: the AUX interface test (0xA9) answers 0x02 (clock line stuck high: nothing
//! there) and the AUX loopback (0xD3) returns its byte as keyboard data (without the AUX
//! status bit), which Linux's `i8042_check_aux` reads as "no AUX port" immediately. Without
//! answers each of the two waits out the driver's 500 ms command timeout (1 s of every Linux
//! boot). Output bytes raise IRQ 1 when the configuration byte enables keyboard interrupts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use keel_accel::{BusDevice, IrqLine, SystemEvent, SystemEvents};

use crate::lock;

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status/command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

const STATUS_OBF: u8 = 0x01;
/// AUX interface test result: clock line stuck high (no device, no port).
const AUX_TEST_CLOCK_HIGH: u8 = 0x02;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
/// Status bit 5: the output byte came from the AUX (mouse) port; never set here.
#[cfg(test)]
const STATUS_AUXDATA: u8 = 0x20;

const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;

const OUTPORT_RESET: u8 = 0x01;
/// QEMU's power-on output port: reset line high, A20 enabled, the rest ones.
const OUTPORT_DEFAULT: u8 = 0xcf;
/// QEMU's power-on configuration byte: keyboard and mouse interrupts enabled.
const CTR_DEFAULT: u8 = 0x03;
const OUTBUF_LIMIT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutport,
    WriteKbdOutbuf,
    /// A byte for the absent auxiliary device (0xD4): swallowed.
    AuxByte,
    /// The byte of an AUX loopback (0xD3): comes back as keyboard data.
    AuxLoop,
}

#[derive(Debug)]
struct State {
    status: u8,
    ctr: u8,
    outport: u8,
    pending: Pending,
    outbuf: VecDeque<u8>,
    last: u8,
}

impl State {
    fn new() -> Self {
        Self {
            status: STATUS_CMD | STATUS_UNLOCKED,
            ctr: CTR_DEFAULT,
            outport: OUTPORT_DEFAULT,
            pending: Pending::None,
            outbuf: VecDeque::with_capacity(OUTBUF_LIMIT),
            last: 0,
        }
    }
}

/// The controller. Map it with two [`I8042Port`]s, one per port.
pub struct I8042 {
    state: Mutex<State>,
    events: Arc<dyn SystemEvents>,
    irq: Option<Arc<dyn IrqLine>>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that reports resets to `events` and raises `irq` (IRQ 1) if given.
    pub fn new(events: Arc<dyn SystemEvents>, irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            state: Mutex::new(State::new()),
            events,
            irq,
        }
    }

    /// Returns to the power-on state.
    pub fn reset(&self) {
        *lock(&self.state) = State::new();
    }

    /// Reads the data port (0x60): the next output byte, or the last one again when empty.
    pub fn read_data(&self) -> u8 {
        let mut s = lock(&self.state);
        let v = match s.outbuf.pop_front() {
            Some(v) => {
                s.last = v;
                v
            }
            None => s.last,
        };
        let more = !s.outbuf.is_empty() && s.ctr & CTR_KBD_INT != 0;
        drop(s);
        if more {
            self.pulse();
        }
        v
    }

    /// Reads the status register (0x64).
    pub fn read_status(&self) -> u8 {
        let s = lock(&self.state);
        s.status | if s.outbuf.is_empty() { 0 } else { STATUS_OBF }
    }

    /// Writes a controller command (0x64).
    pub fn write_command(&self, cmd: u8) {
        let mut s = lock(&self.state);
        s.status |= STATUS_CMD;
        s.pending = Pending::None;
        let mut reset = false;
        let mut reply = None;
        match cmd {
            0x20 => reply = Some(s.ctr),
            0x60 => s.pending = Pending::WriteCtr,
            0xa7 => s.ctr |= CTR_AUX_DISABLE,
            0xa8 => s.ctr &= !CTR_AUX_DISABLE,
            0xa9 => reply = Some(AUX_TEST_CLOCK_HIGH),
            0xaa => {
                s.status |= STATUS_SYS;
                reply = Some(0x55);
            }
            0xab => reply = Some(0x00),
            0xad => s.ctr |= CTR_KBD_DISABLE,
            0xae => s.ctr &= !CTR_KBD_DISABLE,
            0xd0 => reply = Some(s.outport),
            0xd1 => s.pending = Pending::WriteOutport,
            0xd2 => s.pending = Pending::WriteKbdOutbuf,
            0xd3 => s.pending = Pending::AuxLoop,
            0xd4 => s.pending = Pending::AuxByte,
            0xf0..=0xff => reset = cmd & 1 == 0,
            _ => {}
        }
        let irq = reply.is_some_and(|v| Self::push(&mut s, v));
        drop(s);
        if irq {
            self.pulse();
        }
        if reset {
            self.events.request(SystemEvent::Reset);
        }
    }

    /// Writes the data port (0x60): a parameter of the pending command, else a keyboard command.
    pub fn write_data(&self, value: u8) {
        let mut s = lock(&self.state);
        s.status &= !STATUS_CMD;
        let pending = std::mem::replace(&mut s.pending, Pending::None);
        let mut reset = false;
        let mut irq = false;
        match pending {
            Pending::WriteCtr => {
                s.ctr = value;
                if value & 0x04 != 0 {
                    s.status |= STATUS_SYS;
                }
            }
            Pending::WriteOutport => {
                s.outport = value;
                reset = value & OUTPORT_RESET == 0;
            }
            Pending::WriteKbdOutbuf => irq = Self::push(&mut s, value),
            Pending::AuxByte => {}
            Pending::AuxLoop => irq = Self::push(&mut s, value),
            Pending::None => {
                let replies: &[u8] = match value {
                    0xff => &[0xfa, 0xaa],
                    0xf2 => &[0xfa, 0xab, 0x83],
                    0xee => &[0xee],
                    _ => &[0xfa],
                };
                for &r in replies {
                    irq |= Self::push(&mut s, r);
                }
            }
        }
        drop(s);
        if irq {
            self.pulse();
        }
        if reset {
            self.events.request(SystemEvent::Reset);
        }
    }

    /// Queues an output byte; returns whether an interrupt should be raised.
    fn push(s: &mut State, v: u8) -> bool {
        let was_empty = s.outbuf.is_empty();
        if s.outbuf.len() < OUTBUF_LIMIT {
            s.outbuf.push_back(v);
        }
        was_empty && s.ctr & CTR_KBD_INT != 0
    }

    fn pulse(&self) {
        if let Some(irq) = &self.irq {
            irq.pulse();
        }
    }
}

/// One of the controller's two ports as a bus device (the bus hands out offsets relative to
/// each mapping, so the data and command ports are mapped separately).
#[derive(Debug, Clone)]
pub struct I8042Port {
    dev: Arc<I8042>,
    command: bool,
}

impl I8042Port {
    /// The data port (0x60) of `dev`.
    pub fn data(dev: Arc<I8042>) -> Self {
        Self {
            dev,
            command: false,
        }
    }

    /// The status/command port (0x64) of `dev`.
    pub fn command(dev: Arc<I8042>) -> Self {
        Self { dev, command: true }
    }
}

impl BusDevice for I8042Port {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0
            && let Some(b) = data.first_mut()
        {
            *b = if self.command {
                self.dev.read_status()
            } else {
                self.dev.read_data()
            };
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if let Some(&v) = data.first() {
            if self.command {
                self.dev.write_command(v);
            } else {
                self.dev.write_data(v);
            }
        }
    }
}

impl I8042 {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "i8042";

    /// The qdev type: onboard (the board creates it, `-device` cannot), no properties.
    pub fn qdev_type() -> keel_qdev::DeviceType {
        keel_qdev::DeviceType::new(Self::QDEV_TYPE, keel_qdev::BusType::Isa)
            .description("i8042 keyboard controller")
            .user_creatable(false)
    }
}

/// The controller's registers and output buffer, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042Snapshot {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub ctr: u8,
    /// Output port.
    pub outport: u8,
    /// The command waiting for its data byte (0 none, 1-5 as the controller's commands).
    pub pending: u8,
    /// Bytes waiting for the guest.
    pub outbuf: Vec<u8>,
    /// The last byte read.
    pub last: u8,
}

impl keel_snapshot::Persist for I8042Snapshot {
    fn encode(&self, e: &mut keel_snapshot::Enc) {
        e.u8(self.status)
            .u8(self.ctr)
            .u8(self.outport)
            .u8(self.pending)
            .bytes(&self.outbuf)
            .u8(self.last);
    }
    fn decode(d: &mut keel_snapshot::Dec<'_>) -> Result<Self, keel_snapshot::DecodeError> {
        let s = Self {
            status: d.u8("i8042 status")?,
            ctr: d.u8("i8042 ctr")?,
            outport: d.u8("i8042 outport")?,
            pending: d.u8("i8042 pending")?,
            outbuf: d.bytes("i8042 buffer")?.to_vec(),
            last: d.u8("i8042 last")?,
        };
        if s.pending > 5 || s.outbuf.len() > OUTBUF_LIMIT {
            return Err(keel_snapshot::DecodeError::Invalid {
                field: "i8042",
                reason: format!(
                    "pending command {} or {} buffered bytes",
                    s.pending,
                    s.outbuf.len()
                ),
            });
        }
        Ok(s)
    }
}

impl keel_snapshot::Stateful for I8042 {
    type State = I8042Snapshot;
    const SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"KBC0");
    const VERSION: u32 = 1;

    fn save_state(&self) -> I8042Snapshot {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        I8042Snapshot {
            status: s.status,
            ctr: s.ctr,
            outport: s.outport,
            pending: match s.pending {
                Pending::None => 0,
                Pending::WriteCtr => 1,
                Pending::WriteOutport => 2,
                Pending::WriteKbdOutbuf => 3,
                Pending::AuxByte => 4,
                Pending::AuxLoop => 5,
            },
            outbuf: s.outbuf.iter().copied().collect(),
            last: s.last,
        }
    }

    fn restore_state(&self, st: &I8042Snapshot) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.status = st.status;
        s.ctr = st.ctr;
        s.outport = st.outport;
        s.pending = match st.pending {
            1 => Pending::WriteCtr,
            2 => Pending::WriteOutport,
            3 => Pending::WriteKbdOutbuf,
            4 => Pending::AuxByte,
            5 => Pending::AuxLoop,
            _ => Pending::None,
        };
        s.outbuf = st.outbuf.iter().copied().collect();
        s.last = st.last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::test_util::Rec;
    #[derive(Default)]
    struct CountIrq(AtomicU32);
    impl IrqLine for CountIrq {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn dev() -> (Arc<I8042>, Arc<Rec>, Arc<CountIrq>) {
        let rec = Arc::new(Rec::default());
        let irq = Arc::new(CountIrq::default());
        (
            Arc::new(I8042::new(rec.clone(), Some(irq.clone()))),
            rec,
            irq,
        )
    }

    #[test]
    fn fe_pulse_resets() {
        let (d, rec, _) = dev();
        let cmd = I8042Port::command(d);
        cmd.write(0, &[0xfe]);
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[SystemEvent::Reset]);
        cmd.write(0, &[0xff]); // pulse nothing
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn output_port_reset_bit() {
        let (d, rec, _) = dev();
        d.write_command(0xd0);
        assert_eq!(d.read_data(), OUTPORT_DEFAULT);
        d.write_command(0xd1);
        d.write_data(0xce);
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[SystemEvent::Reset]);
    }

    #[test]
    fn linux_probe_sequence() {
        let (d, _, irq) = dev();
        // Flush: nothing pending.
        assert_eq!(d.read_status() & STATUS_OBF, 0);
        // Read CTR, write it back with interrupts off, self-test, keyboard test.
        d.write_command(0x20);
        assert_eq!(d.read_status() & STATUS_OBF, STATUS_OBF);
        assert_eq!(d.read_data(), CTR_DEFAULT);
        d.write_command(0x60);
        d.write_data(0x44);
        d.write_command(0xaa);
        assert_eq!(d.read_data(), 0x55);
        assert_eq!(d.read_status() & STATUS_SYS, STATUS_SYS);
        d.write_command(0xab);
        assert_eq!(d.read_data(), 0x00);
        // No mouse port, said at once: the AUX loopback byte comes back as keyboard data
        // (no AUX status bit) and the AUX interface test fails.
        d.write_command(0xd3);
        d.write_data(0x5a);
        assert_eq!(d.read_status() & (STATUS_OBF | STATUS_AUXDATA), STATUS_OBF);
        assert_eq!(d.read_data(), 0x5a);
        d.write_command(0xa9);
        assert_eq!(d.read_data(), AUX_TEST_CLOCK_HIGH);
        assert_eq!(d.read_status() & STATUS_OBF, 0);
        // Interrupts on: keyboard identify answers through IRQ 1.
        d.write_command(0x60);
        d.write_data(0x45);
        let before = irq.0.load(Ordering::SeqCst);
        d.write_data(0xf2);
        assert_eq!(irq.0.load(Ordering::SeqCst), before + 1);
        assert_eq!(
            [d.read_data(), d.read_data(), d.read_data()],
            [0xfa, 0xab, 0x83]
        );
        assert_eq!(d.read_status() & STATUS_OBF, 0);
    }

    #[test]
    fn hostile_accesses_never_panic_or_grow() {
        let (d, _, _) = dev();
        let data = I8042Port::data(d.clone());
        let cmd = I8042Port::command(d.clone());
        for v in 0..=255u8 {
            if v & 0xf1 == 0xf0 || v == 0xd1 {
                continue; // reset requests are fine but keep the log short
            }
            cmd.write(0, &[v]);
            for _ in 0..4 {
                data.write(0, &[0xff]);
            }
        }
        assert!(lock(&d.state).outbuf.len() <= OUTBUF_LIMIT);
        for off in [0, 1, u64::MAX] {
            for len in 0..=8 {
                let mut b = vec![0; len];
                data.read(off, &mut b);
                cmd.read(off, &mut b);
                data.write(off, &b);
            }
        }
    }
}
