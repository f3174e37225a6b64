//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_accel::{BusDevice, GuestMemory, IrqLine};
use virtio_bindings::virtio_mmio as reg;

use crate::device::{Interrupt, VirtioDevice};
use crate::transport::{DriverState, TransportCore};
use crate::{MMIO_MAGIC, MMIO_VENDOR_ID, MMIO_VERSION};

/// Called with the queue index when the driver writes `QueueNotify`, instead of
/// processing the queue on the writing vCPU thread. A KVM setup registers an ioeventfd
/// on the notify register instead (so the write never reaches the transport); a tcg
/// setup that wants its I/O off the vCPU thread signals its event loop from here. Either
/// way the event loop then calls [`MmioTransport::process_queue`].
pub type QueueNotifyHook = Arc<dyn Fn(u16) + Send + Sync>;

mod snapshot;

pub use snapshot::TransportSnapshot;

struct Regs {
    driver: DriverState,
    notify_hook: Option<QueueNotifyHook>,
}

/// A virtio-mmio register block (modern layout) in front of one [`VirtioDevice`].
///
/// Map it on the MMIO bus with [`crate::VirtioMmioSlot::attach`]. Register accesses are
/// 32-bit; other widths below 0x100 read as zero and are ignored on write. The
/// device-specific configuration space starts at 0x100 and accepts any width.
pub struct MmioTransport {
    regs: Mutex<Regs>,
    core: TransportCore,
}

impl fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.core.device_type())
            .field("offered", &format_args!("{:#x}", self.core.offered()))
            .field("status", &self.lock_regs().driver.status)
            .finish()
    }
}

/// Offset of the `QueueNotify` register, for an ioeventfd (4 bytes, data = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

impl MmioTransport {
    /// A transport for `device` over guest `memory`, interrupting on `irq`.
    ///
    /// `VERSION_1` is always offered: Keel has no legacy devices.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: Arc<GuestMemory>,
        irq: Arc<dyn IrqLine>,
    ) -> Self {
        let t = Self::unconnected(device, memory);
        t.core.interrupt().connect(irq);
        t
    }

    /// A transport whose interrupt line is wired later with [`MmioTransport::connect_irq`]
    /// (for machines that pick the slot, and so the GSI, when the device is mapped).
    pub fn unconnected(device: Arc<Mutex<dyn VirtioDevice>>, memory: Arc<GuestMemory>) -> Self {
        let (core, driver) = TransportCore::new("virtio-mmio", device, memory);
        Self {
            regs: Mutex::new(Regs {
                driver,
                notify_hook: None,
            }),
            core,
        }
    }

    /// Wires the interrupt to `irq` (the GSI of the slot the transport was mapped at).
    pub fn connect_irq(&self, irq: Arc<dyn IrqLine>) {
        self.core.interrupt().connect(irq);
    }

    /// The device behind this transport (shared with an event loop for RX work).
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        self.core.device()
    }

    /// Number of queues of the device (the `QueueSel` values that exist).
    pub fn queue_count(&self) -> usize {
        self.lock_regs().driver.queues.len()
    }

    /// The interrupt state (status register, level line, error flag).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }

    /// Routes `QueueNotify` writes to `hook` instead of processing inline; `None` restores
    /// inline processing on the vCPU thread (the default, fine for tcg).
    pub fn set_notify_hook(&self, hook: Option<QueueNotifyHook>) {
        self.lock_regs().notify_hook = hook;
    }

    /// Processes queue `index` now (the event loop's side of an ioeventfd or notify hook).
    /// Does nothing before activation, after reset or in the error state.
    pub fn process_queue(&self, index: u16) {
        self.core.lock_device().queue_notify(index);
    }

    /// The current `Status` register value (including `DEVICE_NEEDS_RESET`).
    pub fn status(&self) -> u32 {
        self.core.status(&self.lock_regs().driver)
    }

    /// The features the driver wrote (meaningful once `FEATURES_OK` is set).
    pub fn driver_features(&self) -> u64 {
        self.lock_regs().driver.driver_features
    }

    fn lock_regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let regs = self.lock_regs();
        let st = &regs.driver;
        let interrupt = self.core.interrupt();
        let sel_queue = st.selected();
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.core.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => st.device_features_word(self.core.offered()),
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => sel_queue.map_or(0, |q| u32::from(q.max)),
            reg::VIRTIO_MMIO_QUEUE_READY => sel_queue.map_or(0, |q| u32::from(q.ready)),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.core.status(st),
            // No shared memory regions: length and base read as all ones.
            reg::VIRTIO_MMIO_SHM_LEN_LOW
            | reg::VIRTIO_MMIO_SHM_LEN_HIGH
            | reg::VIRTIO_MMIO_SHM_BASE_LOW
            | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => interrupt.config_generation(),
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&self, offset: u32, value: u32) {
        let mut regs = self.lock_regs();
        let st = &mut regs.driver;
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => st.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => st.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => st.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => st.queue_sel = value,
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if st.running() {
                    log::warn!("virtio-mmio: QueueReady written after DRIVER_OK");
                    return;
                }
                let sel = st.queue_sel as usize;
                if let Some(q) = st.queues.get_mut(sel) {
                    q.ready = value & 1 == 1;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let Some(q) = st.selected_for_setup("register") else {
                    return;
                };
                let lo = |r: u64| (r & !0xffff_ffff) | u64::from(value);
                let hi = |r: u64| (r & 0xffff_ffff) | (u64::from(value) << 32);
                match offset {
                    // Validated (power of two, <= max) when the device is activated.
                    reg::VIRTIO_MMIO_QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW => q.desc = lo(q.desc),
                    reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => q.desc = hi(q.desc),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.avail = lo(q.avail),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.avail = hi(q.avail),
                    reg::VIRTIO_MMIO_QUEUE_USED_LOW => q.used = lo(q.used),
                    _ => q.used = hi(q.used),
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                let Ok(index) = u16::try_from(value) else {
                    return;
                };
                if !self.core.notify_allowed(st, index) {
                    return;
                }
                let hook = regs.notify_hook.clone();
                drop(regs);
                match hook {
                    Some(hook) => hook(index),
                    None => self.core.lock_device().queue_notify(index),
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.core.interrupt().ack(value),
            reg::VIRTIO_MMIO_STATUS => self.core.write_status(st, value),
            _ => log::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let config_base = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config_base {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.core
                    .lock_device()
                    .read_config(offset - config_base, data);
            } else {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        // offset < 0x100 here.
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let config_base = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config_base {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.core
                    .lock_device()
                    .write_config(offset - config_base, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

impl MmioTransport {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "virtio-mmio";

    /// The qdev type: onboard (one virtio-mmio bus each), on the system bus.
    pub fn qdev_type() -> keel_qdev::DeviceType {
        keel_qdev::DeviceType::new(Self::QDEV_TYPE, keel_qdev::BusType::System)
            .description("virtio-mmio transport (one virtio-mmio bus each)")
            .user_creatable(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Activation;
    use crate::testutil::*;
    use crate::{Error, features};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Dummy {
        notified: Vec<u16>,
        activated: usize,
        resets: usize,
        config: [u8; 8],
        fail_activate: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | 1 << 5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::device::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self
                .config
                .get_mut(offset as usize..offset as usize + data.len())
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), Error> {
            if self.fail_activate {
                return Err(Error::QueueNotReady(0));
            }
            assert_eq!(a.queues.len(), 2);
            self.activated += 1;
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn queues(mem: &GuestMemory) -> (TestQueue<'_>, TestQueue<'_>) {
        (
            TestQueue::new(mem, 0x1000, 16),
            TestQueue::new(mem, 0x4000, 8),
        )
    }

    #[test]
    fn identity_registers() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        assert_eq!(rd(&t, 0x0), 0x7472_6976);
        assert_eq!(rd(&t, 0x4), 2);
        assert_eq!(rd(&t, 0x8), 42);
        assert_eq!(rd(&t, 0xc), MMIO_VENDOR_ID);
        wr(&t, 0x14, 0);
        assert_eq!(rd(&t, 0x10), 1 << 5);
        wr(&t, 0x14, 1);
        assert_eq!(rd(&t, 0x10), 1);
        wr(&t, 0x14, 7);
        assert_eq!(rd(&t, 0x10), 0);
        wr(&t, 0x30, 1);
        assert_eq!(rd(&t, 0x34), 8);
        wr(&t, 0x30, 2);
        assert_eq!(rd(&t, 0x34), 0, "missing queue has NumMax 0");
        assert_eq!(rd(&t, 0xb0), u32::MAX, "no shared memory");
    }

    #[test]
    fn full_bring_up_activates_and_notifies() {
        let mem = memory();
        let (dev, t, _) = transport(Dummy::default(), &mem);
        let (q0, q1) = queues(&mem);
        bring_up(&t, &[&q0, &q1]);
        assert_eq!(rd(&t, 0x70), 0xf);
        assert_eq!(dev.lock().unwrap().activated, 1);
        assert_eq!(t.driver_features(), features::VERSION_1 | 1 << 5);
        notify(&t, 1);
        notify(&t, 5); // no such queue: ignored
        assert_eq!(dev.lock().unwrap().notified, vec![1]);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        wr(&t, 0x70, 1);
        wr(&t, 0x70, 3);
        wr(&t, 0x24, 0);
        wr(&t, 0x20, 1 << 5);
        wr(&t, 0x70, 0xb);
        assert_eq!(
            rd(&t, 0x70),
            3,
            "FEATURES_OK must not stick without VERSION_1"
        );
        // Unoffered bit.
        wr(&t, 0x24, 1);
        wr(&t, 0x20, 1 | 2);
        wr(&t, 0x70, 0xb);
        assert_eq!(rd(&t, 0x70), 3);
        // Bits beyond 64.
        wr(&t, 0x20, 1);
        wr(&t, 0x24, 2);
        wr(&t, 0x20, 1);
        wr(&t, 0x70, 0xb);
        assert_eq!(rd(&t, 0x70), 3);
    }

    #[test]
    fn driver_features_only_during_negotiation() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        wr(&t, 0x24, 1);
        wr(&t, 0x20, 1);
        assert_eq!(t.driver_features(), 0, "before DRIVER");
        wr(&t, 0x70, 1);
        wr(&t, 0x70, 3);
        wr(&t, 0x20, 1);
        wr(&t, 0x70, 0xb);
        assert_eq!(rd(&t, 0x70), 0xb);
        wr(&t, 0x24, 0);
        wr(&t, 0x20, 1 << 5);
        assert_eq!(
            t.driver_features(),
            features::VERSION_1,
            "after FEATURES_OK"
        );
    }

    #[test]
    fn status_state_machine() {
        let mem = memory();
        let (dev, t, _) = transport(Dummy::default(), &mem);
        wr(&t, 0x70, 2);
        assert_eq!(rd(&t, 0x70), 0, "DRIVER before ACKNOWLEDGE");
        wr(&t, 0x70, 1);
        wr(&t, 0x70, 1 | 4);
        assert_eq!(rd(&t, 0x70), 1, "DRIVER_OK skipping steps");
        wr(&t, 0x70, 3);
        wr(&t, 0x70, 2);
        assert_eq!(rd(&t, 0x70), 3, "clearing bits without reset");
        wr(&t, 0x70, 3 | 0x40);
        assert_eq!(rd(&t, 0x70), 3, "driver cannot set NEEDS_RESET");
        wr(&t, 0x70, 3 | 0x80);
        assert_eq!(rd(&t, 0x70), 0x83, "FAILED may be set");
        assert_eq!(dev.lock().unwrap().activated, 0);
        wr(&t, 0x70, 0);
        assert_eq!(rd(&t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn reset_clears_queues_and_stops_device() {
        let mem = memory();
        let (dev, t, line) = transport(Dummy::default(), &mem);
        let (q0, q1) = queues(&mem);
        bring_up(&t, &[&q0, &q1]);
        t.interrupt().signal_used_queue();
        assert!(line.level.load(Ordering::SeqCst));
        wr(&t, 0x70, 0);
        assert!(!line.level.load(Ordering::SeqCst), "reset lowers the line");
        assert_eq!(rd(&t, 0x60), 0);
        for sel in 0..2 {
            wr(&t, 0x30, sel);
            assert_eq!(rd(&t, 0x44), 0, "queue {sel} not ready after reset");
        }
        notify(&t, 0);
        assert!(
            dev.lock().unwrap().notified.is_empty(),
            "no notify before DRIVER_OK"
        );
        // A second bring-up works.
        bring_up(&t, &[&q0, &q1]);
        assert_eq!(dev.lock().unwrap().activated, 2);
    }

    #[test]
    fn queue_registers_frozen_after_driver_ok() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        let (q0, q1) = queues(&mem);
        bring_up(&t, &[&q0, &q1]);
        wr(&t, 0x30, 0);
        wr(&t, 0x44, 0);
        assert_eq!(rd(&t, 0x44), 1);
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let mem = memory();
        let (dev, t, line) = transport(Dummy::default(), &mem);
        wr(&t, 0x70, 1);
        wr(&t, 0x70, 3);
        wr(&t, 0x24, 1);
        wr(&t, 0x20, 1);
        wr(&t, 0x70, 0xb);
        wr(&t, 0x30, 0);
        wr(&t, 0x38, 16);
        wr(&t, 0x80, 0);
        wr(&t, 0x84, 0x10); // far outside 16 MiB
        wr(&t, 0x90, 0x1000);
        wr(&t, 0xa0, 0x2000);
        wr(&t, 0x44, 1);
        let generation = rd(&t, 0xfc);
        wr(&t, 0x70, 0xf);
        assert_eq!(rd(&t, 0x70), 0x4f, "DRIVER_OK plus NEEDS_RESET");
        assert_eq!(dev.lock().unwrap().activated, 0);
        assert_eq!(rd(&t, 0x60) & 2, 2, "config change interrupt");
        assert!(line.level.load(Ordering::SeqCst));
        assert_ne!(rd(&t, 0xfc), generation);
        notify(&t, 0);
        assert!(dev.lock().unwrap().notified.is_empty());
        wr(&t, 0x70, 0);
        assert_eq!(rd(&t, 0x70), 0, "reset clears NEEDS_RESET");
    }

    #[test]
    fn bad_queue_size_needs_reset() {
        for size in [0u32, 3, 32, 0x1_0000] {
            let mem = memory();
            let (dev, t, _) = transport(Dummy::default(), &mem);
            let (q0, q1) = queues(&mem);
            bring_up(&t, &[&q0, &q1]);
            wr(&t, 0x70, 0);
            wr(&t, 0x70, 1);
            wr(&t, 0x70, 3);
            wr(&t, 0x24, 1);
            wr(&t, 0x20, 1);
            wr(&t, 0x70, 0xb);
            wr(&t, 0x30, 0);
            wr(&t, 0x38, size);
            wr(&t, 0x80, 0x1000);
            wr(&t, 0x90, 0x1100);
            wr(&t, 0xa0, 0x1200);
            wr(&t, 0x44, 1);
            wr(&t, 0x70, 0xf);
            assert!(needs_reset(&t), "size {size}");
            assert_eq!(dev.lock().unwrap().activated, 1, "size {size}");
        }
    }

    #[test]
    fn misaligned_ring_needs_reset() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        wr(&t, 0x70, 1);
        wr(&t, 0x70, 3);
        wr(&t, 0x24, 1);
        wr(&t, 0x20, 1);
        wr(&t, 0x70, 0xb);
        wr(&t, 0x38, 16);
        wr(&t, 0x80, 0x1008); // descriptor table must be 16-byte aligned
        wr(&t, 0x90, 0x1100);
        wr(&t, 0xa0, 0x1200);
        wr(&t, 0x44, 1);
        wr(&t, 0x70, 0xf);
        assert!(needs_reset(&t));
    }

    #[test]
    fn activation_failure_needs_reset() {
        let mem = memory();
        let (_, t, _) = transport(
            Dummy {
                fail_activate: true,
                ..Default::default()
            },
            &mem,
        );
        let (q0, q1) = queues(&mem);
        wr(&t, 0x70, 0);
        bring_up(&t, &[&q0, &q1]);
        assert!(needs_reset(&t));
    }

    #[test]
    fn interrupt_ack_lowers_line() {
        let mem = memory();
        let (_, t, line) = transport(Dummy::default(), &mem);
        t.interrupt().signal_used_queue();
        assert_eq!(rd(&t, 0x60), 1);
        assert!(line.level.load(Ordering::SeqCst));
        wr(&t, 0x64, 1);
        assert_eq!(rd(&t, 0x60), 0);
        assert!(!line.level.load(Ordering::SeqCst));
    }

    #[test]
    fn config_space_any_width() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        t.write(0x100, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = [0u8; 2];
        t.read(0x103, &mut b);
        assert_eq!(b, [4, 5]);
        let mut q = [0u8; 8];
        t.read(0x100, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut past = [0xffu8; 4];
        t.read(0x1fc, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn notify_hook_replaces_inline_processing() {
        let mem = memory();
        let (dev, t, _) = transport(Dummy::default(), &mem);
        let (q0, q1) = queues(&mem);
        bring_up(&t, &[&q0, &q1]);
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        t.set_notify_hook(Some(Arc::new(move |q| {
            assert_eq!(q, 1);
            h.fetch_add(1, Ordering::SeqCst);
        })));
        notify(&t, 1);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(dev.lock().unwrap().notified.is_empty());
        t.process_queue(1);
        assert_eq!(dev.lock().unwrap().notified, vec![1]);
        assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);
    }

    #[test]
    fn any_access_at_any_offset_is_harmless() {
        let mem = memory();
        let (_, t, _) = transport(Dummy::default(), &mem);
        let (q0, q1) = queues(&mem);
        bring_up(&t, &[&q0, &q1]);
        let mut seed = 0x1234_5678_9abc_def0u64;
        for offset in 0..0x210u64 {
            for len in [0usize, 1, 2, 3, 4, 5, 8, 16] {
                let mut buf = vec![0u8; len];
                t.read(offset, &mut buf);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let data: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
                // Skip status writes of 0 so the sweep keeps exercising a live device half the time.
                t.write(offset, &data);
            }
        }
        // Still answers its identity.
        assert_eq!(rd(&t, 0), MMIO_MAGIC);
    }
}
