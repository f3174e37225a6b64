//! 8250/16550A UART on vm-superio's `Serial`, interrupt-driven in both directions.
//!
//! Output goes to a [`SerialOutput`] (stdout, a file, nowhere, or an in-memory [`Capture`]).
//! Input comes from [`spawn_input_thread`]: a thread that reads a host stream (stdin) and feeds
//! the receive FIFO with `enqueue_raw_bytes`, which raises the receive interrupt; when the FIFO
//! is full the thread waits until the guest drains it (vm-superio's `in_buffer_empty` event).

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use keel_accel::{BusDevice, IrqLine};
use vm_superio::Trigger;
use vm_superio::serial::{Error as SuperioError, SerialEvents};

use crate::lock;

/// Errors of the serial device and its input thread.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SerialError {
    /// The serial output file could not be opened.
    #[error("cannot open serial output file {path}")]
    OpenOutput {
        /// The path given by the user.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The input thread could not be started.
    #[error("cannot start the serial input thread")]
    SpawnInput(#[source] io::Error),
}

/// Drives a UART's interrupt line: vm-superio raises an edge per interrupt condition.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqTrigger")
    }
}

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// Largest number of bytes a [`Capture`] keeps; later output is dropped (tests never need more,
/// and a guest must not be able to grow host memory without bound).
pub const CAPTURE_LIMIT: usize = 16 << 20;

/// An in-memory serial sink, for tests and embedders that want the guest's output as bytes.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far (up to [`CAPTURE_LIMIT`] bytes).
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.0).clone()
    }

    /// The output so far as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut v = lock(&self.0);
        let room = CAPTURE_LIMIT.saturating_sub(v.len());
        v.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the UART's transmitted bytes go (`-serial stdio|file:PATH|null`).
#[derive(Debug)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(File),
    /// Discard.
    Null,
    /// Keep in memory.
    Capture(Capture),
    /// Any writer the embedder supplies (a chardev: socket, pipe, ...).
    Writer(SharedWriter),
}

/// A writer shared between the embedder and the UART (`Clone`, so configurations stay `Clone`).
#[derive(Clone)]
pub struct SharedWriter(pub Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Wraps `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(w)))
    }
}

impl std::fmt::Debug for SharedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedWriter")
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).flush()
    }
}

impl SerialOutput {
    /// Opens `path` for `-serial file:PATH` (created, truncated).
    pub fn file(path: &str) -> Result<Self, SerialError> {
        File::create(path)
            .map(SerialOutput::File)
            .map_err(|source| SerialError::OpenOutput {
                path: path.to_string(),
                source,
            })
    }

    fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(f) => Box::new(f),
            SerialOutput::Null => Box::new(io::sink()),
            SerialOutput::Capture(c) => Box::new(c),
            SerialOutput::Writer(w) => Box::new(w),
        }
    }
}

/// Wakes the input thread when the guest has emptied the receive FIFO.
#[derive(Debug, Default)]
pub struct SerialInputSignal {
    space: Mutex<bool>,
    cv: Condvar,
}

impl SerialInputSignal {
    fn notify(&self) {
        *lock(&self.space) = true;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for the FIFO to drain; a timed-out wait just retries.
    fn wait(&self, timeout: Duration) {
        let mut space = lock(&self.space);
        if !*space {
            space = match self.cv.wait_timeout(space, timeout) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *space = false;
    }
}

/// The vm-superio event hooks: only "input buffer empty" matters (input flow control).
#[derive(Debug, Clone)]
pub struct InputEvents(Arc<SerialInputSignal>);

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.0.notify();
    }
}

type Uart = vm_superio::Serial<IrqTrigger, InputEvents, Box<dyn Write + Send>>;

const IIR_OFFSET: u8 = 2;
const FCR_FIFO_ENABLE: u8 = 0x01;
const IIR_FIFO_BITS: u8 = 0xc0;

struct Inner {
    uart: Uart,
    /// FCR bit 0 as the guest last wrote it. vm-superio ignores FCR writes and always reports
    /// FIFOs in IIR; a 16550A (and QEMU's model) reports them only once enabled.
    fifo_enabled: bool,
}

/// A 16550A UART with eight byte-wide registers, mapped at e.g. 0x3f8 (COM1) with IRQ 4.
///
/// Power-on state as QEMU's 8250: LCR 0, MCR OUT2, LSR THRE|TEMT, MSR DCD|DSR|CTS, IIR "no
/// interrupt" without FIFO bits until the guest enables the FIFOs through FCR.
pub struct Serial {
    inner: Mutex<Inner>,
    signal: Arc<SerialInputSignal>,
    irq: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

fn power_on_uart(
    irq: &Arc<dyn IrqLine>,
    signal: &Arc<SerialInputSignal>,
    out: Box<dyn Write + Send>,
) -> Uart {
    let state = vm_superio::serial::SerialState {
        line_control: 0,
        ..vm_superio::serial::SerialState::default()
    };
    let trigger = IrqTrigger(irq.clone());
    let events = InputEvents(signal.clone());
    match vm_superio::Serial::from_state(&state, trigger, events, out) {
        Ok(u) => u,
        // Unreachable (the state has an empty FIFO and the trigger cannot fail); keep
        // vm-superio's defaults rather than panic.
        Err(_) => vm_superio::Serial::with_events(
            IrqTrigger(irq.clone()),
            InputEvents(signal.clone()),
            Box::new(io::sink()),
        ),
    }
}

impl Serial {
    /// Number of register bytes (the bus range length).
    pub const LEN: u64 = 8;

    /// A UART that raises `irq` and writes to `output`.
    pub fn new(irq: Arc<dyn IrqLine>, output: SerialOutput) -> Self {
        let signal = Arc::new(SerialInputSignal::default());
        let uart = power_on_uart(&irq, &signal, output.into_writer());
        Self {
            inner: Mutex::new(Inner {
                uart,
                fifo_enabled: false,
            }),
            signal,
            irq,
        }
    }

    /// Reads register `offset` (0..8); other offsets read 0.
    pub fn read_reg(&self, offset: u64) -> u8 {
        match u8::try_from(offset) {
            Ok(o) if u64::from(o) < Self::LEN => {
                let mut inner = lock(&self.inner);
                let v = inner.uart.read(o);
                if o == IIR_OFFSET && !inner.fifo_enabled {
                    v & !IIR_FIFO_BITS
                } else {
                    v
                }
            }
            _ => 0,
        }
    }

    /// Writes register `offset` (0..8); other offsets are ignored. Output errors lose the byte
    /// (a UART cannot push back on the guest), as on real hardware with no cable attached.
    pub fn write_reg(&self, offset: u64, value: u8) {
        if let Ok(o) = u8::try_from(offset)
            && u64::from(o) < Self::LEN
        {
            let mut inner = lock(&self.inner);
            if o == IIR_OFFSET {
                inner.fifo_enabled = value & FCR_FIFO_ENABLE != 0;
            }
            let _lost_on_error = inner.uart.write(o, value);
        }
    }

    /// Queues host bytes for the guest; returns how many fit (0 when the FIFO is full).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        match lock(&self.inner).uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(SuperioError::FullFifo) => 0,
            Err(_) => 0,
        }
    }

    /// Sends the UART's output to `output` from now on, keeping its register state and
    /// interrupt line (a backend connected after the machine was built).
    pub fn set_output(&self, output: SerialOutput) {
        let mut inner = lock(&self.inner);
        let state = inner.uart.state();
        let placeholder = power_on_uart(&self.irq, &self.signal, Box::new(io::sink()));
        let old = std::mem::replace(&mut inner.uart, placeholder);
        // The old writer is dropped (a file it had open is closed).
        drop(old.into_writer());
        inner.uart = match vm_superio::Serial::from_state(
            &state,
            IrqTrigger(self.irq.clone()),
            InputEvents(self.signal.clone()),
            output.into_writer(),
        ) {
            Ok(u) => u,
            // from_state refuses only an over-full FIFO, which a state read back from a
            // UART cannot have; fall back to power-on state rather than panic.
            Err(_) => power_on_uart(&self.irq, &self.signal, Box::new(io::sink())),
        };
    }

    /// Returns the UART to its power-on register state, keeping its output and interrupt line.
    pub fn reset(&self) {
        let mut inner = lock(&self.inner);
        let placeholder = power_on_uart(&self.irq, &self.signal, Box::new(io::sink()));
        let old = std::mem::replace(&mut inner.uart, placeholder);
        inner.uart = power_on_uart(&self.irq, &self.signal, old.into_writer());
        inner.fifo_enabled = false;
    }
}

impl BusDevice for Serial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // Wider accesses are split into byte accesses, as QEMU's 8250 (1-byte implementation).
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(offset.saturating_add(i as u64));
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write_reg(offset.saturating_add(i as u64), *b);
        }
    }
}

/// Starts a thread that copies `input` (e.g. stdin) into `serial`'s receive FIFO until EOF or a
/// read error. The guest is interrupted for each batch; when the FIFO is full the thread waits
/// for the guest to drain it. The thread holds only an `Arc` and ends with the stream.
pub fn spawn_input_thread(
    serial: Arc<Serial>,
    input: Box<dyn Read + Send>,
) -> Result<JoinHandle<()>, SerialError> {
    spawn_mux_input_thread(serial, input, None)
}

/// [`spawn_input_thread`], with QEMU's mux escapes when `escape` is given (`-serial
/// mon:stdio`, see [`crate::mux`]): its help goes to standard output, and its exit command
/// writes QEMU's last words there and ends the process with status 0, as QEMU does.
pub fn spawn_mux_input_thread(
    serial: Arc<Serial>,
    mut input: Box<dyn Read + Send>,
    escape: Option<u8>,
) -> Result<JoinHandle<()>, SerialError> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            let mut mux = escape.map(crate::mux::MuxInput::new);
            let mut buf = [0u8; 64];
            let mut guest = Vec::with_capacity(64);
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                guest.clear();
                match mux.as_mut() {
                    None => guest.extend_from_slice(&buf[..n]),
                    Some(m) => {
                        for &b in &buf[..n] {
                            match m.byte(b) {
                                crate::mux::MuxByte::Send(b) => guest.push(b),
                                crate::mux::MuxByte::Nothing => {}
                                crate::mux::MuxByte::Help => {
                                    let mut out = io::stdout().lock();
                                    let _ = out.write_all(
                                        crate::mux::mux_help(crate::mux::mux_escape()).as_bytes(),
                                    );
                                    let _ = out.flush();
                                }
                                crate::mux::MuxByte::Exit => {
                                    let mut out = io::stdout().lock();
                                    let _ = out.write_all(crate::mux::MUX_TERMINATED.as_bytes());
                                    let _ = out.flush();
                                    std::process::exit(0);
                                }
                            }
                        }
                    }
                }
                let mut off = 0;
                while off < guest.len() {
                    let k = serial.enqueue_input(&guest[off..]);
                    off += k;
                    if k == 0 {
                        serial.signal.wait(Duration::from_millis(20));
                    }
                }
            }
        })
        .map_err(SerialError::SpawnInput)
}

impl Serial {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "isa-serial";

    /// QEMU's ISA serial ports by `index`: (I/O base, IRQ).
    pub const PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

    /// The qdev type, as QEMU's `isa-serial`: the board's COM1, or one a user adds with
    /// `-device isa-serial,chardev=ID[,index=N][,iobase=P,irq=I]` where the machine has
    /// no default serial port there (`-nodefaults`, `-serial none`).
    pub fn qdev_type() -> keel_qdev::DeviceType {
        use keel_qdev::PropSpec;
        keel_qdev::DeviceType::new(Self::QDEV_TYPE, keel_qdev::BusType::Isa)
            .category(keel_qdev::Category::Input)
            .description("16550A UART")
            // As QEMU's: -1 (u32::MAX) means "from the index" / "the next free index".
            .prop(
                PropSpec::uint32("index")
                    .default_u64(u32::MAX.into())
                    .description("COM port number (0 = COM1): picks iobase and irq"),
            )
            .prop(
                PropSpec::uint32("iobase")
                    .default_u64(u32::MAX.into())
                    .description("first I/O port (default: the index's)"),
            )
            .prop(
                PropSpec::uint32("irq")
                    .default_u64(u32::MAX.into())
                    .description("ISA IRQ (default: the index's)"),
            )
            .prop(
                PropSpec::string("chardev")
                    .default_str("")
                    .description("character backend id (chardev-add); none drops the output"),
            )
    }
}

/// A user `isa-serial`'s place and backend, from its validated properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// First of its 8 I/O ports.
    pub iobase: u16,
    /// Its ISA IRQ.
    pub irq: u32,
    /// The character backend it writes to; none drops the output (QEMU's serial without
    /// a chardev).
    pub chardev: Option<String>,
}

impl SerialConfig {
    /// The configuration of `props`; `next` is the index used when none is given (QEMU
    /// numbers serial ports in creation order).
    pub fn from_props(props: &keel_qdev::Props, next: usize) -> Result<Self, String> {
        let unset = u64::from(u32::MAX);
        let index = match props.u64("index") {
            Some(i) if i != unset => usize::try_from(i).unwrap_or(usize::MAX),
            _ => next,
        };
        let (base, irq) = *Serial::PORTS.get(index).ok_or_else(|| {
            format!(
                "Max. supported number of ISA serial ports is {}.",
                Serial::PORTS.len()
            )
        })?;
        let iobase = match props.u64("iobase") {
            Some(b) if b != unset => {
                u16::try_from(b).ok().filter(|b| *b <= 0xfff8).ok_or_else(|| {
                    format!("Property 'isa-serial.iobase' doesn't take value '{b}': the 8 ports must fit below 0x10000")
                })?
            }
            _ => base,
        };
        let irq = match props.u64("irq") {
            Some(i) if i != unset => u32::try_from(i)
                .ok()
                .filter(|i| *i < 16)
                .ok_or_else(|| format!("isa irq {i} invalid"))?,
            _ => irq,
        };
        Ok(Self {
            iobase,
            irq,
            chardev: props
                .str("chardev")
                .filter(|c| !c.is_empty())
                .map(str::to_owned),
        })
    }
}

/// The 8250's registers and receive FIFO, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// Divisor latch, IER, IIR, LCR, LSR, MCR, MSR, scratch (vm-superio's order).
    pub regs: [u8; 9],
    /// Bytes received and not read yet.
    pub fifo: Vec<u8>,
    /// FCR bit 0.
    pub fifo_enabled: bool,
}

impl keel_snapshot::Persist for SerialSnapshot {
    fn encode(&self, e: &mut keel_snapshot::Enc) {
        e.fixed(&self.regs)
            .bytes(&self.fifo)
            .bool(self.fifo_enabled);
    }
    fn decode(d: &mut keel_snapshot::Dec<'_>) -> Result<Self, keel_snapshot::DecodeError> {
        let regs = d.fixed::<9>("uart registers")?;
        let fifo = d.bytes("uart fifo")?.to_vec();
        if fifo.len() > 64 {
            return Err(keel_snapshot::DecodeError::Invalid {
                field: "uart fifo",
                reason: format!("{} bytes, the FIFO holds 64", fifo.len()),
            });
        }
        Ok(Self {
            regs,
            fifo,
            fifo_enabled: d.bool("uart fifo enabled")?,
        })
    }
}

impl keel_snapshot::Stateful for Serial {
    type State = SerialSnapshot;
    const SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"UART");
    const VERSION: u32 = 1;

    fn save_state(&self) -> SerialSnapshot {
        let inner = lock(&self.inner);
        let s = inner.uart.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            fifo_enabled: inner.fifo_enabled,
        }
    }

    fn restore_state(&self, st: &SerialSnapshot) {
        let r = st.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: st.fifo.clone(),
        };
        let mut inner = lock(&self.inner);
        let placeholder = power_on_uart(&self.irq, &self.signal, Box::new(io::sink()));
        let old = std::mem::replace(&mut inner.uart, placeholder);
        let out = old.into_writer();
        inner.uart = match vm_superio::Serial::from_state(
            &state,
            IrqTrigger(self.irq.clone()),
            InputEvents(self.signal.clone()),
            out,
        ) {
            Ok(u) => u,
            // Refused only for an over-full FIFO, which decoding already rejects.
            Err(_) => power_on_uart(&self.irq, &self.signal, Box::new(io::sink())),
        };
        inner.fifo_enabled = st.fifo_enabled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct CountIrq(AtomicU32);
    impl IrqLine for CountIrq {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn uart() -> (Serial, Capture, Arc<CountIrq>) {
        let irq = Arc::new(CountIrq::default());
        let cap = Capture::new();
        (
            Serial::new(irq.clone(), SerialOutput::Capture(cap.clone())),
            cap,
            irq,
        )
    }

    #[test]
    fn transmit_reaches_output() {
        let (s, cap, _) = uart();
        for b in b"hi\n" {
            BusDevice::write(&s, 0, &[*b]);
        }
        assert_eq!(cap.text(), "hi\n");
        let mut lsr = [0u8];
        BusDevice::read(&s, 5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty and idle");
    }

    #[test]
    fn receive_is_interrupt_driven() {
        let (s, _, irq) = uart();
        s.write_reg(1, 0x01); // IER: receive data available
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(s.read_reg(5) & 1, 1, "LSR data ready");
        assert_eq!(s.read_reg(2) & 0x0f, 0x04, "IIR: RDA");
        assert_eq!(s.read_reg(0), b'a');
        assert_eq!(s.read_reg(0), b'b');
        assert_eq!(s.read_reg(5) & 1, 0);
    }

    #[test]
    fn power_on_registers_match_qemu() {
        let (s, _, _) = uart();
        let regs: Vec<u8> = (1..8).map(|o| s.read_reg(o)).collect();
        assert_eq!(regs, [0x00, 0x01, 0x00, 0x08, 0x60, 0xb0, 0x00]);
        s.write_reg(2, 0x07); // FCR: enable and clear FIFOs
        assert_eq!(s.read_reg(2), 0xc1);
        s.write_reg(2, 0x00);
        assert_eq!(s.read_reg(2), 0x01);
    }

    #[test]
    fn transmit_interrupt_when_enabled() {
        let (s, _, irq) = uart();
        s.write_reg(1, 0x02); // IER: THR empty
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn input_thread_feeds_guest_with_backpressure() {
        let (s, _, _) = uart();
        let s = Arc::new(s);
        let data: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        let t = spawn_input_thread(s.clone(), Box::new(io::Cursor::new(data.clone()))).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < data.len() && std::time::Instant::now() < deadline {
            if s.read_reg(5) & 1 == 1 {
                got.push(s.read_reg(0));
            } else {
                std::thread::yield_now();
            }
        }
        t.join().unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn reset_restores_power_on_state() {
        let (s, cap, _) = uart();
        s.write_reg(3, 0x80);
        s.write_reg(7, 0x55);
        s.enqueue_input(b"x");
        s.reset();
        assert_eq!(s.read_reg(3), 0x00);
        assert_eq!(s.read_reg(7), 0);
        assert_eq!(s.read_reg(5) & 1, 0);
        s.write_reg(0, b'z');
        assert_eq!(cap.text(), "z");
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (s, _, _) = uart();
        for off in [0u64, 7, 8, 255, 256, u64::MAX - 1, u64::MAX] {
            for len in [0usize, 1, 2, 4, 8] {
                let mut d = vec![0u8; len];
                BusDevice::read(&s, off, &mut d);
                BusDevice::write(&s, off, &vec![0xffu8; len]);
            }
        }
        for v in 0..=255u8 {
            for off in 0..8 {
                s.write_reg(off, v);
                s.read_reg(off);
            }
        }
    }
}
