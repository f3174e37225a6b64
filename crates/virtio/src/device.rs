//! The device side of the transport: the [`VirtioDevice`] trait, [`Interrupt`] and the
//! queue-processing loop every device shares.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{GuestMemory, IrqLine};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use crate::Error;
use crate::chain::{self, ParsedChain};

/// The interrupt and error state a device shares with its transport.
///
/// It owns the `InterruptStatus` register and drives a level-triggered [`IrqLine`]: the
/// line is high while any status bit is set and drops when the driver acknowledges the
/// last one. A queue may be processed on a vCPU thread (MMIO notify) or an event-loop
/// thread (ioeventfd, tap readable), so everything here is thread-safe; the status and
/// the line change together under one small lock so an acknowledge racing a new
/// interrupt cannot leave a set bit with the line low.
pub struct Interrupt {
    state: Mutex<IrqState>,
    delivery: Mutex<Option<Arc<dyn MessageDelivery>>>,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
}

struct IrqState {
    status: u32,
    line: Arc<dyn IrqLine>,
}

/// Message-signalled delivery of a transport that has it (virtio-pci with MSI-X): the
/// transport maps the queue or the configuration change to its vector and sends the
/// message.
///
/// Each method returns `true` when the message path took the interrupt (delivered it,
/// marked it pending under a mask, or dropped it because no vector is assigned), and
/// `false` when message delivery is off, so the interrupt goes to the status register
/// and the level line as without a hook (INTx and the ISR for virtio-pci).
pub trait MessageDelivery: Send + Sync {
    /// Queue `index` has new used buffers.
    fn queue(&self, index: u16) -> bool;
    /// The configuration space (or the device status) changed.
    fn config(&self) -> bool;
}

/// The line of a transport that is not wired yet: every level change is dropped.
struct Unconnected;
impl IrqLine for Unconnected {
    fn set_level(&self, _high: bool) {}
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish()
    }
}

impl Interrupt {
    /// An interrupt with no pending bits that drives `line`.
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Self {
            state: Mutex::new(IrqState { status: 0, line }),
            delivery: Mutex::new(None),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
        }
    }

    /// An interrupt whose line is connected later with [`Interrupt::connect`].
    pub fn unconnected() -> Self {
        Self::new(Arc::new(Unconnected))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wires the interrupt to `line` (replacing the previous one, which is lowered);
    /// the new line takes the current level.
    pub fn connect(&self, line: Arc<dyn IrqLine>) {
        let mut st = self.lock();
        st.line.set_level(false);
        st.line = line;
        st.line.set_level(st.status != 0);
    }

    /// Routes interrupts through `delivery` first (see [`MessageDelivery`]); `None` goes
    /// back to the status register and the line only.
    pub fn set_delivery(&self, delivery: Option<Arc<dyn MessageDelivery>>) {
        *self.delivery.lock().unwrap_or_else(|p| p.into_inner()) = delivery;
    }

    fn delivery(&self) -> Option<Arc<dyn MessageDelivery>> {
        self.delivery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn raise(&self, bit: u32) {
        let mut st = self.lock();
        st.status |= bit;
        st.line.set_level(true);
    }

    /// Tells the driver that a queue has new used buffers (the status register and the
    /// line; see [`Interrupt::signal_queue`] for the queue-aware form).
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that queue `index` has new used buffers: through the message
    /// path if one is set and takes it, else as [`Interrupt::signal_used_queue`].
    pub fn signal_queue(&self, index: u16) {
        if self.delivery().is_some_and(|d| d.queue(index)) {
            return;
        }
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that the configuration space (or the device status) changed,
    /// and bumps the config generation so a driver reading a multi-word field retries.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        if self.delivery().is_some_and(|d| d.config()) {
            return;
        }
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Puts the device in its error state: the status register shows
    /// `DEVICE_NEEDS_RESET` until the driver resets the device, and the driver gets a
    /// configuration-change interrupt. Called when the driver broke the protocol in a way
    /// that leaves no request to answer (a looping chain, a ring outside guest memory).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config_change();
        }
    }

    /// Whether the device is in its error state.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.lock().status
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// `InterruptACK`: clears `bits`; the line drops once no bit is left.
    pub fn ack(&self, bits: u32) {
        let mut st = self.lock();
        st.status &= !bits;
        if st.status == 0 {
            st.line.set_level(false);
        }
    }

    /// Puts back a saved `InterruptStatus` and configuration generation, with the line
    /// level they imply (a restored snapshot).
    pub(crate) fn restore(&self, status: u32, config_generation: u32) {
        self.config_generation
            .store(config_generation, Ordering::Release);
        let mut st = self.lock();
        st.status = status;
        st.line.set_level(status != 0);
    }

    /// Device reset: no pending interrupt, line low, error state cleared.
    pub(crate) fn reset(&self) {
        let mut st = self.lock();
        st.status = 0;
        st.line.set_level(false);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
#[derive(Debug)]
pub struct Activation {
    /// Guest RAM, for walking the rings and moving data.
    pub memory: Arc<GuestMemory>,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], as the driver set them up
    /// (a queue the driver did not make ready has `ready() == false`).
    pub queues: Vec<Queue>,
    /// Where to signal used buffers and errors.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
}

/// A virtio device model, independent of the transport that exposes it.
///
/// The transport serialises calls through the device's mutex. A device that also does
/// work outside guest notifications (network receive, console input) is shared with the
/// owner's event loop through the same `Arc<Mutex<_>>`; lock order is transport
/// registers, then device.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 net, 2 block, 3 console, 4 entropy).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver; must include [`crate::features::VERSION_1`].
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific configuration space at `offset` (relative to 0x100);
    /// bytes past the end of the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space; read-only fields ignore the write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts the device with the queues the driver configured.
    fn activate(&mut self, activation: Activation) -> Result<(), Error>;
    /// The driver notified queue `index` (available buffers); process it.
    fn queue_notify(&mut self, index: u16);
    /// Device reset (status 0): forget the queues and return to the pre-activation state.
    fn reset(&mut self);
    /// The machine continues after a stop (`cont`): a device that held requests because
    /// of a host error (virtio-blk under `werror=stop`) runs them again. Nothing by default.
    fn resume(&mut self) {}
}

/// Copies `config[offset..offset + data.len()]` into `data`, zero past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Records the used ring of `queue` as written (live migration; see `keel_accel::dirty`):
/// flags, index, `size` elements and the avail event.
fn mark_used_ring(mem: &GuestMemory, queue: &Queue) {
    let len = 6 + 8 * u64::from(queue.size());
    keel_accel::dirty::mark(mem, queue.used_ring(), len);
}

/// Activated state every device keeps: memory, queues, interrupt.
#[derive(Debug)]
pub(crate) struct Active {
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) queues: Vec<Queue>,
    pub(crate) interrupt: Arc<Interrupt>,
}

/// How a request handler answers one chain.
pub(crate) enum Outcome {
    /// Return the chain to the driver with this many bytes written.
    Used(u32),
    /// The driver broke the protocol; stop and enter the error state.
    Broken(String),
}

impl Active {
    /// Takes over an activation whose queues `required` must all have been made ready.
    pub(crate) fn new(a: Activation, required: &[u16]) -> Result<Self, Error> {
        for &index in required {
            if !a.queues.get(usize::from(index)).is_some_and(|q| q.ready()) {
                return Err(Error::QueueNotReady(index));
            }
        }
        Ok(Self {
            memory: a.memory,
            queues: a.queues,
            interrupt: a.interrupt,
        })
    }

    /// Puts the device in its error state and logs why.
    pub(crate) fn fail(&self, what: &str) {
        log::warn!("virtio: driver error, device needs reset: {what}");
        self.interrupt.set_needs_reset();
    }

    /// Takes the next available chain of queue `index`, validated; `None` when the queue
    /// is empty, not ready, or broken (the error state is then set).
    pub(crate) fn pop(&mut self, index: usize) -> Option<(u16, ParsedChain)> {
        if self.interrupt.needs_reset() {
            return None;
        }
        let memory = Arc::clone(&self.memory);
        let mem: &GuestMemory = &memory;
        let queue = self.queues.get_mut(index)?;
        if !queue.ready() {
            return None;
        }
        let next = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                self.fail(&format!("queue {index}: {e}"));
                return None;
            }
        };
        let desc_chain = next?;
        let head = desc_chain.head_index();
        match chain::parse(mem, desc_chain) {
            Ok(parsed) => Some((head, parsed)),
            Err(e) => {
                self.fail(&format!("queue {index}, chain {head}: {e}"));
                None
            }
        }
    }

    /// Returns chain `head` of queue `index` to the driver with `len` bytes written.
    /// Does not interrupt; call [`Interrupt::signal_used_queue`] after a batch.
    pub(crate) fn put_used(&mut self, index: usize, head: u16, len: u32) -> bool {
        let memory = Arc::clone(&self.memory);
        let Some(queue) = self.queues.get_mut(index) else {
            return false;
        };
        match queue.add_used(&*memory, head, len) {
            Ok(()) => {
                mark_used_ring(&memory, queue);
                true
            }
            Err(e) => {
                self.fail(&format!("queue {index}: add_used({head}): {e}"));
                false
            }
        }
    }

    /// Processes every chain available on queue `index` when the call starts, handing
    /// each validated chain to `handle`; signals the driver once if anything was used.
    ///
    /// Work per call is bounded by the queue size: a driver adding more buffers notifies
    /// again (Keel never suppresses notifications).
    pub(crate) fn process<F>(&mut self, index: usize, mut handle: F)
    where
        F: FnMut(&GuestMemory, &ParsedChain) -> Outcome,
    {
        if self.interrupt.needs_reset() {
            return;
        }
        let memory = Arc::clone(&self.memory);
        let mem: &GuestMemory = &memory;
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                let msg = format!("queue {index}: {e}");
                self.fail(&msg);
                return;
            }
        };
        let mut used = false;
        for desc_chain in chains {
            let head = desc_chain.head_index();
            let outcome = match chain::parse(mem, desc_chain) {
                Ok(parsed) => handle(mem, &parsed),
                Err(e) => Outcome::Broken(format!("queue {index}, chain {head}: {e}")),
            };
            match outcome {
                Outcome::Used(len) => {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        self.fail(&format!("queue {index}: add_used({head}): {e}"));
                        return;
                    }
                    mark_used_ring(mem, queue);
                    used = true;
                }
                Outcome::Broken(msg) => {
                    if used {
                        self.signal_used(index);
                    }
                    self.fail(&msg);
                    return;
                }
            }
        }
        if used {
            self.signal_used(index);
        }
    }

    /// Interrupts for new used buffers on queue `index`, unless the driver set
    /// `VRING_AVAIL_F_NO_INTERRUPT` (Linux does while it polls, e.g. NAPI). The driver
    /// re-checks the used ring after clearing the flag, so a skipped interrupt is not lost.
    pub(crate) fn signal_used(&self, index: usize) {
        let Some(queue) = self.queues.get(index) else {
            return;
        };
        // Order the used-index store before reading the driver's flags.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = self
            .memory
            .load(
                vm_memory::GuestAddress(queue.avail_ring()),
                std::sync::atomic::Ordering::Relaxed,
            )
            .unwrap_or(0);
        if u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0 {
            self.interrupt
                .signal_queue(u16::try_from(index).unwrap_or(u16::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    pub(crate) struct Line(pub(crate) Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    #[test]
    fn level_follows_status_bits() {
        let line = Arc::new(Line::default());
        let irq = Interrupt::new(line.clone());
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), 3);
        irq.ack(1);
        assert!(*line.0.lock().unwrap().last().unwrap());
        irq.ack(2);
        assert_eq!(irq.status(), 0);
        assert!(!*line.0.lock().unwrap().last().unwrap());
        assert_eq!(irq.config_generation(), 1);
    }

    #[test]
    fn needs_reset_signals_once_and_clears_on_reset() {
        let line = Arc::new(Line::default());
        let irq = Interrupt::new(line.clone());
        irq.set_needs_reset();
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.config_generation(), 1);
        irq.reset();
        assert!(!irq.needs_reset());
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn late_connect_takes_current_level() {
        let irq = Interrupt::unconnected();
        irq.signal_used_queue();
        let line = Arc::new(Line::default());
        irq.connect(line.clone());
        assert_eq!(line.0.lock().unwrap().as_slice(), &[true]);
        irq.ack(1);
        assert!(!*line.0.lock().unwrap().last().unwrap());
    }

    #[test]
    fn config_bytes_zero_past_end() {
        let mut d = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
