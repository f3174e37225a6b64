//! The event loop that processes a transport's queues off the vCPU threads.
//!
//! One [`IoWorker`] thread per virtio-mmio device waits (epoll) on one [`EventFd`] per queue,
//! a stop eventfd and, with a level-triggered irqfd, the resample eventfd:
//!
//! * **Notify, kvm**: each queue's eventfd is registered with [`Vm::register_ioevent`] on the
//!   transport's `QueueNotify` register (4 bytes, datamatch = queue index), so a guest notify
//!   signals the eventfd inside the kernel and the vCPU does not exit.
//! * **Notify, tcg** (or any backend without ioeventfds): the transport's
//!   [`QueueNotifyHook`](crate::QueueNotifyHook) signals the same eventfd from the MMIO write;
//!   the vCPU thread only pays for one `write(2)`.
//! * **Interrupt, kvm**: an [`IrqfdLine`] bound with [`Vm::register_irqfd`] *with a resample
//!   eventfd*, so the GSI keeps the level-triggered semantics the DSDT announces (the line
//!   stays asserted until the guest's EOI; after the EOI KVM deasserts it and signals the
//!   resample eventfd, and the worker asserts it again if `InterruptStatus` is still non-zero).
//!   The transport still sets `InterruptStatus` before the line is asserted.
//! * **Interrupt, tcg**: the transport keeps the [`IrqLine`] it was built with
//!   ([`Vm::irq_line`]), driven from the worker thread.
//!
//! For comparison (facts, not code, taken from them): QEMU's virtio-mmio registers
//! ioeventfds for `QueueNotify` but has no irqfd path (its guest notifiers are handled in user
//! space and raise the line with a level change); Firecracker binds each virtio-mmio device's
//! interrupt eventfd with a plain `KVM_IRQFD` (each write is an edge) and no resample.
//! Keel uses the resample form because its DSDT declares the lines level-triggered: with a
//! plain irqfd on a level-triggered IOAPIC pin, an interrupt raised while the previous one is
//! still in service (remote IRR set) is dropped when the pulse ends before the EOI.
//!
//! Stopping ([`IoWorker::stop`], or dropping the worker) signals the stop eventfd and joins the
//! thread, which finishes at most the queue pass it is in (bounded by the queue size).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use keel_accel::{AccelError, IoEventMatch, IrqLine, MmioAddress, Vm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::{MmioTransport, QUEUE_NOTIFY_OFFSET, QueueEvents, VirtioMmioSlot};

/// A level-triggered interrupt line over a KVM irqfd with a resample eventfd.
///
/// `set_level(true)` writes the trigger eventfd (the backend asserts the line until the
/// guest's EOI); `set_level(false)` only records that the device no longer wants the line,
/// so the next resample does not assert it again. [`IrqfdLine::resample`] is the event
/// loop's side of the resample eventfd.
#[derive(Debug)]
pub struct IrqfdLine {
    trigger: EventFd,
    resample: EventFd,
    wanted: AtomicBool,
}

impl IrqfdLine {
    /// Two fresh non-blocking eventfds, not bound to anything yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            trigger: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            resample: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            wanted: AtomicBool::new(false),
        })
    }

    /// The eventfd that asserts the line (for [`Vm::register_irqfd`]).
    pub fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    /// The eventfd the backend signals after the guest's EOI.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// Whether the device currently wants the line asserted.
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Handles a resample notification: clears it and asserts the line again if the device
    /// still has an interrupt pending (the guest acknowledged only part of it, or a new one
    /// arrived while the previous one was in service).
    pub fn resample(&self) {
        let _ = self.resample.read();
        if self.wanted() {
            self.assert_line();
        }
    }

    fn assert_line(&self) {
        if let Err(e) = self.trigger.write(1) {
            log::warn!("virtio: cannot signal irqfd: {e}");
        }
    }
}

impl IrqLine for IrqfdLine {
    fn set_level(&self, high: bool) {
        self.wanted.store(high, Ordering::Release);
        if high {
            self.assert_line();
        }
    }
}

/// Epoll data of the stop eventfd and the resample eventfd; queue `i` uses `i`.
const STOP_TOKEN: u64 = u64::MAX;
const RESAMPLE_TOKEN: u64 = u64::MAX - 1;

/// Processes one virtio-mmio transport's queues on its own thread (see the module docs).
pub struct IoWorker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    events: Arc<QueueEvents>,
    transport: Arc<MmioTransport>,
    notify_addr: MmioAddress,
    ioevents: bool,
    irqfd: Option<(u32, Arc<IrqfdLine>)>,
}

impl std::fmt::Debug for IoWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoWorker")
            .field("notify_addr", &self.notify_addr)
            .field("ioeventfd", &self.ioevents)
            .field("irqfd", &self.irqfd.as_ref().map(|(gsi, _)| *gsi))
            .finish()
    }
}

fn worker_error(what: &'static str) -> impl FnOnce(io::Error) -> crate::Error {
    move |source| crate::Error::Worker { what, source }
}

impl IoWorker {
    /// Starts the event loop for `transport`, mapped at `slot`, on `vm`.
    ///
    /// Uses ioeventfds on the `QueueNotify` register and a resampled irqfd on `slot.irq` where
    /// `vm` offers them (KVM with an in-kernel irqchip), else the transport's notify hook and
    /// the [`IrqLine`] it already has. A backend error other than "unsupported" while
    /// registering is logged and the fallback is used, so a device always works.
    pub fn start(
        vm: &dyn Vm,
        slot: VirtioMmioSlot,
        transport: Arc<MmioTransport>,
    ) -> Result<Self, crate::Error> {
        let queues = transport.queue_count();
        let events =
            Arc::new(QueueEvents::new(queues).map_err(worker_error("creating queue eventfds"))?);
        let notify_addr = MmioAddress(slot.base + QUEUE_NOTIFY_OFFSET);
        let ioevents = register_ioevents(vm, notify_addr, &events);
        // Writes KVM does not match (or every write, under tcg) still reach the transport.
        transport.set_notify_hook(Some(events.hook()));
        let irqfd = match bind_irqfd(vm, slot.irq) {
            Some(line) => {
                transport.connect_irq(line.clone());
                Some((slot.irq, line))
            }
            None => None,
        };
        let stop = Arc::new(
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(worker_error("creating eventfd"))?,
        );
        let mut worker = Self {
            stop: Arc::clone(&stop),
            thread: None,
            events: Arc::clone(&events),
            transport: Arc::clone(&transport),
            notify_addr,
            ioevents,
            irqfd,
        };
        let epoll = Epoll::new().map_err(worker_error("creating epoll"))?;
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(stop.as_raw_fd(), STOP_TOKEN).map_err(worker_error("epoll_ctl"))?;
        for i in 0..events.len() {
            if let Some(fd) = events.raw_fd(i) {
                add(fd, i as u64).map_err(worker_error("epoll_ctl"))?;
            }
        }
        let resample = worker.irqfd.as_ref().map(|(_, l)| Arc::clone(l));
        if let Some(line) = &resample {
            add(line.resample_fd().as_raw_fd(), RESAMPLE_TOKEN)
                .map_err(worker_error("epoll_ctl"))?;
        }
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{:x}", slot.base))
            .spawn(move || {
                keel_sandbox::enter(keel_sandbox::ThreadClass::Worker);
                run(&epoll, &events, &transport, resample.as_deref())
            })
            .map_err(worker_error("spawning the worker thread"))?;
        worker.thread = Some(thread);
        Ok(worker)
    }

    /// Whether guest notifies arrive through ioeventfds (no vCPU exit).
    pub fn uses_ioeventfd(&self) -> bool {
        self.ioevents
    }

    /// Whether the interrupt goes through an irqfd (no vCPU thread involved).
    pub fn uses_irqfd(&self) -> bool {
        self.irqfd.is_some()
    }

    /// The transport this worker serves.
    pub fn transport(&self) -> &Arc<MmioTransport> {
        &self.transport
    }

    /// Stops the thread and removes the ioeventfd and irqfd registrations from `vm` (needed
    /// before another device takes the same window). The transport goes back to processing
    /// notifies inline; its interrupt is left on the irqfd line, which no longer reaches the
    /// guest, so reconnect it (or drop the transport).
    pub fn stop(mut self, vm: &dyn Vm) {
        self.join();
        self.transport.set_notify_hook(None);
        if self.ioevents {
            for i in 0..self.events.len() {
                if let (Some(fd), Ok(index)) = (self.events.eventfd(i), u32::try_from(i))
                    && let Err(e) =
                        vm.unregister_ioevent(self.notify_addr, IoEventMatch::U32(index), fd)
                {
                    log::warn!("virtio: removing the ioeventfd of queue {i}: {e}");
                }
            }
        }
        if let Some((gsi, line)) = self.irqfd.take()
            && let Err(e) = vm.unregister_irqfd(gsi, line.trigger())
        {
            log::warn!("virtio: removing the irqfd of GSI {gsi}: {e}");
        }
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::warn!("virtio: cannot stop the worker thread: {e}");
                return;
            }
            let _ = t.join();
        }
    }
}

impl Drop for IoWorker {
    fn drop(&mut self) {
        self.join();
    }
}

/// Registers one ioeventfd per queue; `false` (and nothing registered) if the backend
/// cannot, so the MMIO path is used for every queue.
fn register_ioevents(vm: &dyn Vm, addr: MmioAddress, events: &QueueEvents) -> bool {
    for i in 0..events.len() {
        let (Some(fd), Ok(index)) = (events.eventfd(i), u32::try_from(i)) else {
            return false;
        };
        if let Err(e) = vm.register_ioevent(addr, IoEventMatch::U32(index), fd) {
            if !matches!(e, AccelError::Unsupported { .. }) {
                log::warn!("virtio: ioeventfd for queue {i} at {:#x}: {e}", addr.0);
            }
            for j in 0..i {
                if let (Some(fd), Ok(index)) = (events.eventfd(j), u32::try_from(j)) {
                    let _ = vm.unregister_ioevent(addr, IoEventMatch::U32(index), fd);
                }
            }
            return false;
        }
    }
    true
}

/// An irqfd with resample on `gsi`, or `None` where the backend has none.
fn bind_irqfd(vm: &dyn Vm, gsi: u32) -> Option<Arc<IrqfdLine>> {
    let line = match IrqfdLine::new() {
        Ok(l) => Arc::new(l),
        Err(e) => {
            log::warn!("virtio: cannot create irqfd eventfds: {e}");
            return None;
        }
    };
    match vm.register_irqfd(gsi, line.trigger(), Some(line.resample_fd())) {
        Ok(()) => Some(line),
        Err(AccelError::Unsupported { .. }) => None,
        Err(e) => {
            log::warn!("virtio: irqfd on GSI {gsi}: {e}; using the IRQ line instead");
            None
        }
    }
}

fn run(
    epoll: &Epoll,
    events: &QueueEvents,
    transport: &MmioTransport,
    resample: Option<&IrqfdLine>,
) {
    let mut ready = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio: worker epoll_wait failed, stopping: {e}");
                return;
            }
        };
        for ev in &ready[..n] {
            match ev.data() {
                STOP_TOKEN => return,
                RESAMPLE_TOKEN => {
                    if let Some(line) = resample {
                        line.resample();
                    }
                }
                q => {
                    let (Ok(i), Ok(index)) = (usize::try_from(q), u16::try_from(q)) else {
                        continue;
                    };
                    if events.drain(i) {
                        transport.process_queue(index);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use crate::testutil::*;
    use keel_accel::{AccelError, Vcpu};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A backend without ioeventfds or irqfds (the trait defaults, as under tcg).
    struct NoFds;
    impl Vm for NoFds {
        fn create_vcpu(&self, _: u32) -> Result<Box<dyn Vcpu>, AccelError> {
            Err(AccelError::Unsupported {
                accel: "test",
                what: "vcpus",
            })
        }
        fn irq_line(&self, _: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
            Err(AccelError::Unsupported {
                accel: "test",
                what: "irq lines",
            })
        }
    }

    /// A backend that records ioeventfd and irqfd (de)registrations.
    #[derive(Default)]
    struct Recording {
        ioevents: Mutex<Vec<(u64, IoEventMatch, i32, bool)>>,
        irqfds: Mutex<Vec<(u32, bool, bool)>>,
    }
    impl Vm for Recording {
        fn create_vcpu(&self, _: u32) -> Result<Box<dyn Vcpu>, AccelError> {
            NoFds.create_vcpu(0)
        }
        fn irq_line(&self, _: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
            NoFds.irq_line(0)
        }
        fn register_ioevent(
            &self,
            addr: MmioAddress,
            m: IoEventMatch,
            fd: &EventFd,
        ) -> Result<(), AccelError> {
            self.ioevents
                .lock()
                .unwrap()
                .push((addr.0, m, fd.as_raw_fd(), true));
            Ok(())
        }
        fn unregister_ioevent(
            &self,
            addr: MmioAddress,
            m: IoEventMatch,
            fd: &EventFd,
        ) -> Result<(), AccelError> {
            self.ioevents
                .lock()
                .unwrap()
                .push((addr.0, m, fd.as_raw_fd(), false));
            Ok(())
        }
        fn register_irqfd(
            &self,
            gsi: u32,
            _: &EventFd,
            resample: Option<&EventFd>,
        ) -> Result<(), AccelError> {
            self.irqfds
                .lock()
                .unwrap()
                .push((gsi, resample.is_some(), true));
            Ok(())
        }
        fn unregister_irqfd(&self, gsi: u32, _: &EventFd) -> Result<(), AccelError> {
            self.irqfds.lock().unwrap().push((gsi, false, false));
            Ok(())
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn tcg_path_processes_notifies_on_the_worker_thread() {
        let mem = memory();
        let (_, t, line) = transport(Rng::with_source(Box::new(std::io::repeat(7))), &mem);
        let t = Arc::new(t);
        let w = IoWorker::start(&NoFds, VirtioMmioSlot::new(0xd000_0000, 5), t.clone()).unwrap();
        assert!(!w.uses_ioeventfd() && !w.uses_irqfd());
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 8, true)]);
        notify(&t, 0);
        wait_for("the used ring", || q.used_idx() == 1);
        assert_eq!(q.used(0), (0, 8));
        // The transport set InterruptStatus and raised its own line (tcg keeps it).
        wait_for("the interrupt", || line.level.load(Ordering::SeqCst));
        assert_eq!(rd(&t, 0x60), 1);
        w.stop(&NoFds);
        // Back to inline processing once the worker is gone.
        q.add(&[(DATA + 8, 8, true)]);
        notify(&t, 0);
        assert_eq!(q.used_idx(), 2);
    }

    #[test]
    fn kvm_path_registers_one_ioeventfd_per_queue_and_a_resampled_irqfd() {
        let mem = memory();
        let (_, t, _) = transport(Rng::with_source(Box::new(std::io::repeat(7))), &mem);
        let t = Arc::new(t);
        let vm = Recording::default();
        let w = IoWorker::start(&vm, VirtioMmioSlot::new(0xd000_0000, 17), t.clone()).unwrap();
        assert!(w.uses_ioeventfd() && w.uses_irqfd());
        assert_eq!(
            vm.ioevents
                .lock()
                .unwrap()
                .iter()
                .map(|e| (e.0, e.1, e.3))
                .collect::<Vec<_>>(),
            vec![(0xd000_0050, IoEventMatch::U32(0), true)]
        );
        assert_eq!(vm.irqfds.lock().unwrap().as_slice(), &[(17, true, true)]);
        // A guest notify that KVM would have turned into the eventfd signal.
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 4, true)]);
        w.events.eventfd(0).unwrap().write(1).unwrap();
        wait_for("the used ring", || q.used_idx() == 1);
        // Level semantics: asserted via the trigger, re-asserted on resample while pending.
        let (_, line) = w.irqfd.as_ref().map(|(g, l)| (*g, l.clone())).unwrap();
        wait_for("the trigger", || line.trigger().read().is_ok());
        assert_eq!(rd(&t, 0x60), 1);
        line.resample_fd().write(1).unwrap();
        wait_for("the re-assertion", || line.trigger().read().is_ok());
        wr(&t, 0x64, 1); // InterruptACK: the device no longer wants the line.
        assert!(!line.wanted());
        line.resample_fd().write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(line.trigger().read().is_err(), "no assertion after the ack");
        w.stop(&vm);
        let io = vm.ioevents.lock().unwrap();
        assert_eq!(io.len(), 2);
        assert_eq!(
            (io[1].0, io[1].1, io[1].3),
            (0xd000_0050, IoEventMatch::U32(0), false)
        );
        assert_eq!(io[0].2, io[1].2, "same eventfd removed");
        assert_eq!(vm.irqfds.lock().unwrap()[1], (17, false, false));
    }

    #[test]
    fn stopping_while_notifies_stream_in_never_hangs() {
        let mem = memory();
        let (_, t, _) = transport(Rng::with_source(Box::new(std::io::repeat(1))), &mem);
        let t = Arc::new(t);
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        for round in 0..20u64 {
            let w =
                IoWorker::start(&NoFds, VirtioMmioSlot::new(0xd000_0000, 5), t.clone()).unwrap();
            for _ in 0..50 {
                notify(&t, 0);
            }
            if round % 2 == 0 {
                w.stop(&NoFds);
            } else {
                drop(w);
            }
        }
        // Device reset with a worker running, then a fresh bring-up still works.
        let w = IoWorker::start(&NoFds, VirtioMmioSlot::new(0xd000_0000, 5), t.clone()).unwrap();
        wr(&t, 0x70, 0);
        notify(&t, 0);
        q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 8, true)]);
        notify(&t, 0);
        wait_for("the used ring after reset", || q.used_idx() == 1);
        drop(w);
    }
}
