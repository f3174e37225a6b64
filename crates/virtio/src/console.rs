//! A single-port virtio console (device ID 3, no `VIRTIO_CONSOLE_F_MULTIPORT`).
//!
//! QEMU models a console as `virtio-serial-device` (a multiport bus with a control
//! queue) plus a `virtconsole` port on it. Linux drives a console device without the
//! MULTIPORT feature as exactly one console port, `hvc0`, over two queues (receiveq0,
//! transmitq0) and no control queue, which is all a microVM needs. Keel implements that
//! simpler device; a machine maps QEMU's `-device virtio-serial-device -device
//! virtconsole,chardev=ID` pair onto one [`Console`].

use keel_qdev::{BusType, DeviceType, PropSpec, Props};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_accel::GuestMemory;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

use crate::chain::{self, ParsedChain};
use crate::device::{Activation, Active, Outcome, VirtioDevice, read_config_bytes};
use crate::{Error, features};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 64;
/// Bytes of host input kept while the guest has no receive buffer; more is dropped.
pub const INPUT_CAPACITY: usize = 64 * 1024;
const CONFIG_LEN: usize = 12;

/// The host side of the console's input: bytes pushed here reach the guest's `hvc0`.
///
/// Cloneable and thread-safe; after pushing, the owner calls
/// [`Console::process_input`] (an event loop typically does both when its chardev is
/// readable). Bytes also flow when the guest posts new receive buffers.
#[derive(Debug, Clone, Default)]
pub struct ConsoleInput {
    pending: Arc<Mutex<VecDeque<u8>>>,
}

impl ConsoleInput {
    /// Queues `bytes` for the guest; returns how many were accepted (the rest is dropped
    /// once [`INPUT_CAPACITY`] bytes wait).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut q = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let n = bytes.len().min(INPUT_CAPACITY.saturating_sub(q.len()));
        q.extend(&bytes[..n]);
        n
    }

    /// Bytes waiting for guest receive buffers.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A virtio console with one port: output goes to a [`Write`] sink, input comes from a
/// [`ConsoleInput`] byte queue.
pub struct Console {
    output: Box<dyn Write + Send>,
    input: ConsoleInput,
    queue_sizes: [u16; 2],
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending_input", &self.input.pending())
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Console {
    /// QEMU's driver name of the console port this device stands for.
    pub const DRIVER: &'static str = "virtconsole";
    /// QEMU's driver name of the serial bus device that carries the port.
    pub const BUS_DRIVER: &'static str = "virtio-serial-device";

    /// A console writing guest output to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        // cols, rows (unused without VIRTIO_CONSOLE_F_SIZE), max_nr_ports = 1.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Self {
            output,
            input: ConsoleInput::default(),
            queue_sizes: [QUEUE_SIZE; 2],
            config,
            active: None,
        }
    }

    /// The handle that feeds guest input.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }

    /// Starts a thread that reads `reader` (a chardev: stdin, a socket) and hands every
    /// chunk to the guest. The thread ends at end of input or on a read error; a
    /// thread blocked in `read` cannot be stopped, so it is detached.
    pub fn spawn_input_reader(
        device: Arc<Mutex<Console>>,
        mut reader: Box<dyn std::io::Read + Send>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let input = device.lock().unwrap_or_else(|p| p.into_inner()).input();
        std::thread::Builder::new()
            .name("virtio-console-in".into())
            .spawn(move || {
                keel_sandbox::enter(keel_sandbox::ThreadClass::Worker);
                let mut buf = [0u8; 1024];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::warn!("virtio-console: input closed: {e}");
                            return;
                        }
                    };
                    let mut rest = &buf[..n];
                    loop {
                        let taken = input.push(rest);
                        device
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .process_input();
                        rest = &rest[taken..];
                        if rest.is_empty() {
                            break;
                        }
                        // The guest is not reading: wait rather than drop typed input.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            })
    }

    /// Moves pending input into the guest's receive buffers, as far as they go.
    pub fn process_input(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.input.pending() > 0 {
            let Some((head, req)) = active.pop(RX_QUEUE) else {
                break;
            };
            if !req.readable.is_empty() {
                active.fail("console receive buffer is device-readable");
                return;
            }
            let room = usize::try_from(req.writable_len()).unwrap_or(usize::MAX);
            let chunk: Vec<u8> = {
                let mut q = self.input.pending.lock().unwrap_or_else(|p| p.into_inner());
                let n = room.min(q.len());
                q.drain(..n).collect()
            };
            let written = chain::write_bytes(&active.memory, &req.writable, 0, &chunk);
            if !active.put_used(RX_QUEUE, head, written as u32) {
                return;
            }
            used = true;
        }
        if used {
            active.signal_used(RX_QUEUE);
        }
    }

    fn transmit(output: &mut dyn Write, mem: &GuestMemory, req: &ParsedChain) -> Outcome {
        if !req.writable.is_empty() {
            return Outcome::Broken("console transmit buffer is device-writable".into());
        }
        let mut buf = [0u8; 4096];
        let total = req.readable_len();
        let mut off = 0u64;
        while off < total {
            let n = (total - off).min(buf.len() as u64) as usize;
            let got = chain::read_bytes(mem, &req.readable, off, &mut buf[..n]);
            if got == 0 {
                break;
            }
            if let Err(e) = output.write_all(&buf[..got]) {
                log::warn!("virtio-console: output failed, dropping: {e}");
                break;
            }
            off += got as u64;
        }
        let _ = output.flush();
        Outcome::Used(0)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        self.active = Some(Active::new(activation, &[0, 1])?);
        self.process_input();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match usize::from(index) {
            RX_QUEUE => self.process_input(),
            TX_QUEUE => {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                let output = &mut self.output;
                active.process(TX_QUEUE, |mem, req| {
                    Self::transmit(output.as_mut(), mem, req)
                });
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// The validated `-device virtconsole` properties ([`Console::port_qdev_type`]). The output
/// comes from the character backend `chardev` names, which the caller looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsolePortProps {
    /// Character backend id (`chardev=`).
    pub chardev: String,
}

impl ConsolePortProps {
    /// From the properties [`Console::port_qdev_type`] validated.
    pub fn from_props(props: &Props) -> Result<Self, Error> {
        let chardev = props.str("chardev").ok_or(Error::Property {
            driver: Console::PORT_QDEV_TYPE,
            property: "chardev",
        })?;
        Ok(Self {
            chardev: chardev.to_owned(),
        })
    }
}

/// QEMU's two-step console, as Keel models it: `-device virtio-serial-device[,id=S]` takes a
/// virtio-mmio slot and provides a bus of type `virtio-serial-bus` with room for **one**
/// port, `-device virtconsole,chardev=C` plugs the port (the guest's `hvc0`). The console is
/// a single-port device (no multiport, no control queue); until a port is plugged its
/// output is dropped.
impl Console {
    /// QEMU's type name of the device.
    pub const QDEV_TYPE: &'static str = "virtio-serial-device";
    /// QEMU's type name of the console port.
    pub const PORT_QDEV_TYPE: &'static str = "virtconsole";
    /// The type name of the bus the device provides for its port.
    pub const PORT_BUS_TYPE: &'static str = "virtio-serial-bus";

    /// The qdev type of the device: `virtio-serial-device` on a virtio-mmio bus.
    pub fn qdev_type() -> DeviceType {
        DeviceType::new(Self::QDEV_TYPE, BusType::VirtioMmio)
            .category(keel_qdev::Category::Input)
            .description("virtio console device; carries one virtconsole port")
    }

    /// The qdev type of the port: `virtconsole` on a `virtio-serial-bus`, property
    /// `chardev` (required). See [`ConsolePortProps`].
    pub fn port_qdev_type() -> DeviceType {
        DeviceType::new(Self::PORT_QDEV_TYPE, Self::port_bus_type())
            .category(keel_qdev::Category::Input)
            .description("console port on a virtio-serial-device (hvc0 in Linux)")
            .prop(PropSpec::string("chardev").description("character backend id (chardev-add)"))
    }

    /// The bus type a `virtio-serial-device` provides for its port.
    pub fn port_bus_type() -> BusType {
        BusType::Other(Self::PORT_BUS_TYPE.to_owned())
    }

    /// Name of the port bus of a `virtio-serial-device` with `id` in virtio-mmio window
    /// `window`: QEMU names it after the id (`ID.0`), else after the bus type and a counter;
    /// the window index serves as the counter, so names stay unique.
    pub fn port_bus_name(id: Option<&str>, window: Option<usize>) -> String {
        match id {
            Some(id) => format!("{id}.0"),
            None => format!("{}.{}", Self::PORT_BUS_TYPE, window.unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_sink() {
        let mem = memory();
        let sink = Sink::default();
        let (_, t, _) = transport(Console::new(Box::new(sink.clone())), &mem);
        let rx = TestQueue::new(&mem, 0, 64);
        let mut tx = TestQueue::new(&mem, 0x4000, 64);
        bring_up(&t, &[&rx, &tx]);
        assert_eq!(rd(&t, 0x8), 3);
        assert_eq!(rd(&t, 0x104), 1, "max_nr_ports");
        fill(&mem, DATA, b"hello, ");
        fill(&mem, DATA + 0x100, b"hvc0\n");
        tx.add(&[(DATA, 7, false), (DATA + 0x100, 5, false)]);
        notify(&t, 1);
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello, hvc0\n");
        assert_eq!(tx.used(0), (0, 0));
        assert_eq!(rd(&t, 0x60), 1);
    }

    #[test]
    fn input_waits_for_buffers_and_is_split() {
        let mem = memory();
        let (dev, t, _) = transport(Console::new(Box::new(std::io::sink())), &mem);
        let input = dev.lock().unwrap().input();
        assert_eq!(input.push(b"ls -l\n"), 6);
        let mut rx = TestQueue::new(&mem, 0, 64);
        let tx = TestQueue::new(&mem, 0x4000, 64);
        bring_up(&t, &[&rx, &tx]);
        assert_eq!(input.pending(), 6, "no receive buffer yet");
        rx.add(&[(DATA, 4, true)]);
        rx.add(&[(DATA + 0x100, 64, true)]);
        notify(&t, 0);
        assert_eq!(input.pending(), 0);
        assert_eq!(rx.used(0), (0, 4));
        assert_eq!(rx.used(1), (1, 2));
        assert_eq!(fetch(&mem, DATA, 4), b"ls -");
        assert_eq!(fetch(&mem, DATA + 0x100, 2), b"l\n");
        // Input arriving while a buffer waits goes straight in.
        rx.add(&[(DATA + 0x200, 64, true)]);
        notify(&t, 0);
        input.push(b"x");
        dev.lock().unwrap().process_input();
        assert_eq!(rx.used(2), (2, 1));
        assert_eq!(fetch(&mem, DATA + 0x200, 1), b"x");
    }

    #[test]
    fn input_reader_thread_feeds_the_guest() {
        let mem = memory();
        let (dev, t, _) = transport(Console::new(Box::new(std::io::sink())), &mem);
        let mut rx = TestQueue::new(&mem, 0, 64);
        let tx = TestQueue::new(&mem, 0x4000, 64);
        bring_up(&t, &[&rx, &tx]);
        rx.add(&[(DATA, 64, true)]);
        notify(&t, 0);
        let thread =
            Console::spawn_input_reader(dev, Box::new(std::io::Cursor::new(b"echo hi\n".to_vec())))
                .unwrap();
        thread.join().unwrap();
        assert_eq!(rx.used(0), (0, 8));
        assert_eq!(fetch(&mem, DATA, 8), b"echo hi\n");
    }

    #[test]
    fn input_is_bounded() {
        let input = ConsoleInput::default();
        assert_eq!(input.push(&vec![b'a'; INPUT_CAPACITY + 10]), INPUT_CAPACITY);
        assert_eq!(input.push(b"b"), 0);
    }

    #[test]
    fn wrong_direction_needs_reset() {
        let mem = memory();
        let (_, t, _) = transport(Console::new(Box::new(std::io::sink())), &mem);
        let rx = TestQueue::new(&mem, 0, 64);
        let mut tx = TestQueue::new(&mem, 0x4000, 64);
        bring_up(&t, &[&rx, &tx]);
        tx.add(&[(DATA, 7, true)]);
        notify(&t, 1);
        assert!(needs_reset(&t));
    }
}
