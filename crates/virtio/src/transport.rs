//! What every virtio transport shares, whatever its register layout: the driver's side of
//! the device (status, feature negotiation, queue setup) and what happens at `DRIVER_OK`
//! and at reset.
//!
//! [`crate::MmioTransport`] decodes virtio-mmio registers into calls on a
//! [`TransportCore`] and its [`DriverState`]; a virtio-pci transport (crate `keel-pci`)
//! decodes its common configuration structure into the same calls, so both drive a
//! [`VirtioDevice`] the same way.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_accel::GuestMemory;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::device::{Activation, Interrupt, VirtioDevice};
use crate::{Error, features};

/// One queue as the driver configures it before `DRIVER_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Maximum size the device supports.
    pub max: u16,
    /// Size the driver chose (validated at activation).
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
}

impl QueueConfig {
    /// A queue at reset: size = `max`, not ready, rings at 0.
    pub fn new(max: u16) -> Self {
        Self {
            max,
            size: max,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// The driver-written state of a transport: status, feature negotiation, queue setup.
/// The transport keeps it under its register lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverState {
    /// The device status the driver wrote (without `DEVICE_NEEDS_RESET`).
    pub status: u32,
    /// Which 32-bit word of the device features the driver reads.
    pub device_features_sel: u32,
    /// Which 32-bit word of the driver features the driver writes.
    pub driver_features_sel: u32,
    /// The features the driver accepted so far.
    pub driver_features: u64,
    /// The driver set a feature bit above 63 (refused at `FEATURES_OK`).
    pub unknown_features: bool,
    /// The selected queue.
    pub queue_sel: u32,
    /// Every queue of the device.
    pub queues: Vec<QueueConfig>,
}

impl DriverState {
    /// The state at reset for a device with these maximum queue sizes.
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            unknown_features: false,
            queue_sel: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect(),
        }
    }

    /// Whether the driver set `DRIVER_OK` (queue setup is frozen).
    pub fn running(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    /// The selected queue, if it exists.
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue for a setup write: `None` (and a log line) when the queue does
    /// not exist, the device is running, or the queue is already enabled.
    pub fn selected_for_setup(&mut self, what: &str) -> Option<&mut QueueConfig> {
        if self.running() {
            log::warn!("virtio: queue {what} written after DRIVER_OK");
            return None;
        }
        let sel = self.queue_sel;
        let q = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        match q {
            None => {
                log::warn!("virtio: queue {what} written for missing queue {sel}");
                None
            }
            Some(q) if q.ready => {
                log::warn!("virtio: queue {sel} {what} written while the queue is enabled");
                None
            }
            Some(q) => Some(q),
        }
    }

    /// The selected word of the device features `offered`.
    pub fn device_features_word(&self, offered: u64) -> u32 {
        match self.device_features_sel {
            0 => offered as u32,
            1 => (offered >> 32) as u32,
            _ => 0,
        }
    }

    /// The selected word of the driver features.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes the selected word of its features; ignored outside negotiation
    /// (before `DRIVER` or after `FEATURES_OK`).
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            log::warn!("virtio: driver features written outside feature negotiation");
            return;
        }
        let v = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            // Bits above 63 do not exist; accepting one is refused at FEATURES_OK.
            _ if value != 0 => self.unknown_features = true,
            _ => {}
        }
    }
}

/// The device side of a transport: the device, its interrupt state and guest memory, and
/// the status state machine that activates and resets the device.
pub struct TransportCore {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    memory: Arc<GuestMemory>,
    device_type: u32,
    offered: u64,
    name: &'static str,
}

impl fmt::Debug for TransportCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportCore")
            .field("transport", &self.name)
            .field("device_type", &self.device_type)
            .field("offered", &format_args!("{:#x}", self.offered))
            .finish()
    }
}

impl TransportCore {
    /// The core of transport `name` (used in log lines) for `device` over `memory`, and the
    /// driver state at reset. The interrupt starts unconnected.
    ///
    /// `VERSION_1` is always offered: Keel's devices are modern.
    pub fn new(
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: Arc<GuestMemory>,
    ) -> (Self, DriverState) {
        let (device_type, offered, state) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (
                d.device_type(),
                d.features() | features::VERSION_1,
                DriverState::new(d.queue_max_sizes()),
            )
        };
        let core = Self {
            device,
            interrupt: Arc::new(Interrupt::unconnected()),
            memory,
            device_type,
            offered,
            name,
        };
        (core, state)
    }

    /// The device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Locks the device (a poisoned lock is taken over).
    pub fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The features offered to the driver (always with `VERSION_1`).
    pub fn offered(&self) -> u64 {
        self.offered
    }

    /// The device status the driver reads: what it wrote plus `DEVICE_NEEDS_RESET` when the
    /// device is in its error state.
    pub fn status(&self, st: &DriverState) -> u32 {
        if self.interrupt.needs_reset() {
            st.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            st.status
        }
    }

    /// The driver queue notify for `index`: processes it now unless the device is not
    /// running, is in its error state, or has no such queue. Returns whether it should be
    /// processed (callers with a notify hook use this check and hand the index off).
    pub fn notify_allowed(&self, st: &DriverState, index: u16) -> bool {
        st.running() && !self.interrupt.needs_reset() && usize::from(index) < st.queues.len()
    }

    /// The driver writes the device status: 0 resets; otherwise each bit needs the one
    /// before it in the driver sequence, bits are never cleared without a reset,
    /// `FEATURES_OK` sticks only with acceptable features, and `DRIVER_OK` activates the
    /// device.
    pub fn write_status(&self, st: &mut DriverState, value: u32) {
        if value == 0 {
            self.reset(st);
            return;
        }
        let name = self.name;
        // DEVICE_NEEDS_RESET is the device's bit; the driver cannot set or clear it.
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = st.status;
        if value & old != old {
            log::warn!(
                "{name}: driver cleared status bits ({old:#x} -> {value:#x}) without a reset"
            );
            return;
        }
        let steps = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ];
        for pair in steps.windows(2) {
            if value & pair[1] != 0 && value & pair[0] == 0 {
                log::warn!("{name}: status {value:#x} skips a step of the driver sequence");
                return;
            }
        }
        let new = value & !old;
        let mut value = value;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let acked = st.driver_features;
            if acked & !self.offered != 0 || acked & features::VERSION_1 == 0 || st.unknown_features
            {
                log::warn!(
                    "{name}: refusing driver features {acked:#x} (offered {:#x}, VERSION_1 required)",
                    self.offered
                );
                value &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            }
        }
        st.status = value;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate(st);
        }
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            log::info!("{name}: driver gave up on device type {}", self.device_type);
        }
    }

    /// A legacy (virtio 0.9.5) driver writes the device status: 0 resets; there is no
    /// `FEATURES_OK` step (the features written so far are the negotiated ones, without
    /// `VERSION_1`), and `DRIVER_OK` activates the device. Only for devices whose queues
    /// work the same without `VERSION_1` (virtio-pci's legacy interface decides which).
    pub fn write_status_legacy(&self, st: &mut DriverState, value: u32) {
        if value == 0 {
            self.reset(st);
            return;
        }
        let value = value & !(VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FEATURES_OK);
        let new = value & !st.status;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let acked = st.driver_features;
            if acked & !self.offered != 0 || st.unknown_features {
                log::warn!(
                    "{}: refusing legacy driver features {acked:#x} (offered {:#x})",
                    self.name,
                    self.offered
                );
                st.status |= value & !VIRTIO_CONFIG_S_DRIVER_OK;
                self.interrupt.set_needs_reset();
                return;
            }
        }
        st.status |= value;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate(st);
        }
    }

    fn activate(&self, st: &DriverState) {
        let mut queues = Vec::with_capacity(st.queues.len());
        for (i, q) in st.queues.iter().enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            match self.build_queue(index, q) {
                Ok(queue) => queues.push(queue),
                Err(e) => {
                    log::warn!(
                        "{}: cannot activate device type {}: {e}",
                        self.name,
                        self.device_type
                    );
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            memory: Arc::clone(&self.memory),
            queues,
            interrupt: Arc::clone(&self.interrupt),
            acked_features: st.driver_features,
        };
        if let Err(e) = self.lock_device().activate(activation) {
            log::warn!(
                "{}: activating device type {} failed: {e}",
                self.name,
                self.device_type
            );
            self.interrupt.set_needs_reset();
        }
    }

    fn build_queue(&self, index: u16, q: &QueueConfig) -> Result<Queue, Error> {
        let invalid = |reason: String| Error::InvalidQueue { index, reason };
        if !q.ready {
            return Queue::new(q.max).map_err(|e| invalid(format!("max size {}: {e}", q.max)));
        }
        let state = QueueState {
            max_size: q.max,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            size: q.size,
            ready: true,
            desc_table: q.desc,
            avail_ring: q.avail,
            used_ring: q.used,
        };
        let queue = Queue::try_from(state)
            .map_err(|e| invalid(format!("size {} or ring alignment: {e}", q.size)))?;
        if !queue.is_valid(&*self.memory) {
            return Err(invalid(format!(
                "rings at {:#x}/{:#x}/{:#x} are not in guest memory",
                q.desc, q.avail, q.used
            )));
        }
        Ok(queue)
    }

    /// Device reset: the device forgets its queues, no interrupt is pending, and the
    /// driver state returns to its reset value.
    pub fn reset(&self, st: &mut DriverState) {
        self.lock_device().reset();
        self.interrupt.reset();
        st.status = 0;
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.unknown_features = false;
        st.queue_sel = 0;
        for q in &mut st.queues {
            *q = QueueConfig::new(q.max);
        }
    }
}
