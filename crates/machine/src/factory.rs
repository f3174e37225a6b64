//! Device types that plug into a machine from outside it: an embedder's own devices, and the
//! built-in ones that only need the machine's buses.
//!
//! A [`DeviceFactory`] is one device type: its qdev description (name, bus, properties with
//! defaults and ranges) and how to realize it from its validated properties. A board adds the
//! type to its device tree, so `-device`/`device_add`, `device-list-properties` and
//! `qom-list-types` treat it like any other; at realize time the factory maps what it built
//! through a [`DeviceHost`], and the board unmaps it when the device goes.

use std::sync::Arc;

use keel_accel::{AccelError, BusDevice, GuestMemory, IoBuses, IrqLine, SystemEvents, Vm};
use keel_qdev::{DeviceType, DeviceView, HookError};

/// One device type a machine can realize without knowing it.
pub trait DeviceFactory: Send + Sync {
    /// The type as qdev describes it. Its properties are validated (defaults filled in,
    /// ranges checked) before [`DeviceFactory::realize`] sees them.
    fn qdev_type(&self) -> DeviceType;
    /// Builds the device for `dev` (its `props` already validated) and maps it through
    /// `host`. On error nothing stays mapped.
    fn realize(&self, dev: &DeviceView<'_>, host: &mut DeviceHost<'_>) -> Result<(), HookError>;
}

/// Which address space a mapping is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// x86 port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// What a factory may use of the machine while it realizes a device. It records every
/// mapping, so the board can undo them when the device is unplugged or its realize fails.
pub struct DeviceHost<'a> {
    buses: &'a IoBuses,
    memory: &'a Arc<GuestMemory>,
    vm: &'a dyn Vm,
    system: Arc<dyn SystemEvents>,
    mapped: Vec<(Space, u64)>,
}

impl std::fmt::Debug for DeviceHost<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHost")
            .field("mapped", &self.mapped)
            .finish_non_exhaustive()
    }
}

impl<'a> DeviceHost<'a> {
    /// A host over a machine's buses, memory, VM and system-event sink.
    pub fn new(
        buses: &'a IoBuses,
        memory: &'a Arc<GuestMemory>,
        vm: &'a dyn Vm,
        system: Arc<dyn SystemEvents>,
    ) -> Self {
        Self {
            buses,
            memory,
            vm,
            system,
            mapped: Vec::new(),
        }
    }

    /// Maps `dev` at I/O ports `base..base+len`.
    pub fn map_pio(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
    ) -> Result<(), HookError> {
        self.buses.pio.insert(base, len, dev)?;
        self.mapped.push((Space::Pio, base));
        Ok(())
    }

    /// Maps `dev` at guest-physical `base..base+len`.
    pub fn map_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
    ) -> Result<(), HookError> {
        self.buses.mmio.insert(base, len, dev)?;
        self.mapped.push((Space::Mmio, base));
        Ok(())
    }

    /// Whether I/O port `port` is taken by a device already.
    pub fn pio_taken(&self, port: u64) -> bool {
        self.buses.pio.ranges().iter().any(|r| r.contains(port))
    }

    /// The interrupt line of `gsi`.
    pub fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        self.vm.irq_line(gsi)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.memory
    }

    /// Where a device raises reset, power-off or exit requests.
    pub fn system_events(&self) -> Arc<dyn SystemEvents> {
        self.system.clone()
    }

    /// The mappings made so far, to undo them later with [`unmap`].
    pub fn into_mappings(self) -> Vec<(Space, u64)> {
        self.mapped
    }
}

/// Removes `mappings` from `buses` (the device is gone, or its realize failed half way).
pub fn unmap(buses: &IoBuses, mappings: &[(Space, u64)]) {
    for &(space, base) in mappings {
        let bus = match space {
            Space::Pio => &buses.pio,
            Space::Mmio => &buses.mmio,
        };
        if let Err(e) = bus.remove(base) {
            log::warn!("unmapping a device at {base:#x}: {e}");
        }
    }
}
