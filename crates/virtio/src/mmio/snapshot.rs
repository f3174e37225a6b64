//! Snapshot of a virtio-mmio transport: the driver-written registers, each queue's setup
//! and ring positions, and the interrupt status.
//!
//! A snapshot is taken with the vCPUs stopped and after every queue was processed once
//! more ([`MmioTransport::quiesce`]): the devices complete each request they take in the
//! same call, so no request is in flight, and each queue's next available and next used
//! indices are both the used ring's `idx` in guest memory. That is what is saved, and a
//! restore rebuilds the queues at those positions, so nothing is lost or replayed.

use keel_snapshot::{Dec, DecodeError, Enc, Persist};
use vm_memory::{Bytes, GuestAddress};

use super::MmioTransport;
use crate::transport::{DriverState, QueueConfig, TransportCore};

/// One transport's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSnapshot {
    /// virtio device ID of the device behind the transport (checked at restore).
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Each queue: (size, ready, desc, avail, used, next index).
    pub queues: Vec<(u16, bool, u64, u64, u64, u16)>,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
}

impl Persist for TransportSnapshot {
    fn encode(&self, e: &mut Enc) {
        e.u32(self.device_type)
            .u32(self.status)
            .u32(self.device_features_sel)
            .u32(self.driver_features_sel)
            .u64(self.driver_features)
            .u32(self.queue_sel)
            .u32(self.queues.len() as u32);
        for &(size, ready, desc, avail, used, next) in &self.queues {
            e.u16(size)
                .bool(ready)
                .u64(desc)
                .u64(avail)
                .u64(used)
                .u16(next);
        }
        e.u32(self.interrupt_status).u32(self.config_generation);
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let device_type = d.u32("device type")?;
        let status = d.u32("status")?;
        let device_features_sel = d.u32("device features select")?;
        let driver_features_sel = d.u32("driver features select")?;
        let driver_features = d.u64("driver features")?;
        let queue_sel = d.u32("queue select")?;
        let n = d.count("queue count", 29)?;
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push((
                d.u16("queue size")?,
                d.bool("queue ready")?,
                d.u64("queue descriptors")?,
                d.u64("queue available ring")?,
                d.u64("queue used ring")?,
                d.u16("queue index")?,
            ));
        }
        Ok(Self {
            device_type,
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            queues,
            interrupt_status: d.u32("interrupt status")?,
            config_generation: d.u32("config generation")?,
        })
    }
}

impl MmioTransport {
    /// Completes what the driver made available and the device has not taken yet: every
    /// queue is processed once (with the vCPUs stopped, this leaves no request in flight).
    pub fn quiesce(&self) {
        let running = self.lock_regs().driver.running();
        if !running {
            return;
        }
        for i in 0..self.queue_count() {
            self.process_queue(u16::try_from(i).unwrap_or(u16::MAX));
        }
    }

    /// The transport's state; call after [`MmioTransport::quiesce`].
    pub fn save_transport(&self) -> TransportSnapshot {
        self.core.save_driver(&self.lock_regs().driver)
    }

    /// Checks that `s` fits this transport (same device type, same number of queues, sizes
    /// within the maximums) without changing anything.
    pub fn check_transport(&self, s: &TransportSnapshot) -> Result<(), String> {
        self.core.check_driver(&self.lock_regs().driver, s)
    }

    /// Puts the transport in `s` (checked with [`MmioTransport::check_transport`]): a
    /// device the driver had set up is activated again with its queues at the saved ring
    /// positions.
    pub fn restore_transport(&self, s: &TransportSnapshot) {
        let mut regs = self.lock_regs();
        self.core.restore_driver(&mut regs.driver, s);
        drop(regs);
        self.core.restore_interrupt(s);
    }
}

/// The transport-neutral part, shared by virtio-mmio and virtio-pci (`keel-pci`).
impl TransportCore {
    /// The driver-visible state of `st` and the interrupt status; call with no request in
    /// flight (every queue processed once more with the vCPUs stopped).
    pub fn save_driver(&self, st: &DriverState) -> TransportSnapshot {
        let memory = self.memory();
        let queues = st
            .queues
            .iter()
            .map(|q| {
                // The used ring's idx (offset 2): where both indices stand when idle.
                let next = if st.running() && q.ready {
                    memory
                        .read_obj::<u16>(GuestAddress(q.used.wrapping_add(2)))
                        .unwrap_or(0)
                } else {
                    0
                };
                (q.size, q.ready, q.desc, q.avail, q.used, next)
            })
            .collect();
        TransportSnapshot {
            device_type: self.device_type(),
            status: st.status,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            driver_features: st.driver_features,
            queue_sel: st.queue_sel,
            queues,
            interrupt_status: self.interrupt().status(),
            config_generation: self.interrupt().config_generation(),
        }
    }

    /// Checks that `s` fits a transport in state `st` (same device type, same number of
    /// queues, sizes within the maximums) without changing anything.
    pub fn check_driver(&self, st: &DriverState, s: &TransportSnapshot) -> Result<(), String> {
        if s.device_type != self.device_type() {
            return Err(format!(
                "the saved device has virtio type {}, this one {}",
                s.device_type,
                self.device_type()
            ));
        }
        if s.queues.len() != st.queues.len() {
            return Err(format!(
                "the saved device has {} queues, this one {}",
                s.queues.len(),
                st.queues.len()
            ));
        }
        for (i, (q, have)) in s.queues.iter().zip(st.queues.iter()).enumerate() {
            if q.0 > have.max {
                return Err(format!(
                    "queue {i} has {} entries, more than the {} this device takes",
                    q.0, have.max
                ));
            }
        }
        Ok(())
    }

    /// Puts `st` in `s` (checked with [`TransportCore::check_driver`]): the device is reset,
    /// and one the driver had set up is activated again with its queues at the saved ring
    /// positions. The interrupt status follows with [`TransportCore::restore_interrupt`].
    pub fn restore_driver(&self, st: &mut DriverState, s: &TransportSnapshot) {
        self.reset(st);
        st.status = s.status;
        st.device_features_sel = s.device_features_sel;
        st.driver_features_sel = s.driver_features_sel;
        st.driver_features = s.driver_features;
        st.queue_sel = s.queue_sel;
        let mut indices = Vec::with_capacity(s.queues.len());
        for (q, &(size, ready, desc, avail, used, next)) in st.queues.iter_mut().zip(&s.queues) {
            *q = QueueConfig {
                max: q.max,
                size,
                ready,
                desc,
                avail,
                used,
            };
            indices.push((next, next));
        }
        if st.running() {
            self.activate(st, Some(&indices));
        }
    }

    /// Puts back the saved interrupt status and configuration generation, with the line
    /// level they imply (INTx asserted again if it was).
    pub fn restore_interrupt(&self, s: &TransportSnapshot) {
        self.interrupt()
            .restore(s.interrupt_status, s.config_generation);
    }
}
