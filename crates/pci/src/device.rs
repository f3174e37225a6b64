//! The device side of the bus: [`PciDevice`], what a function offers the bus, and
//! [`PciFunction`], a ready-made function for simple devices (host bridge, ISA bridge, a
//! register block behind one BAR).

use std::sync::{Arc, Mutex, MutexGuard};

use keel_accel::BusDevice;

use crate::PciError;
use crate::alloc::BarAllocator;
use crate::config::{BarRegion, PciConfig, PciIds, command, regs};

/// One PCI function as the bus sees it.
///
/// Every method takes `&self`: a function serialises itself (its own lock), since vCPU
/// threads reach it through config cycles and BAR accesses at once. All guest-facing
/// methods accept any width at any offset.
pub trait PciDevice: Send + Sync {
    /// Guest configuration read at `offset` (0..256; bytes past the space read as zero).
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// Guest configuration write at `offset`.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// The BARs that decode now (see [`PciConfig::bar_regions`]); the bus routes window
    /// accesses by them after every configuration write.
    fn bar_regions(&self) -> Vec<BarRegion>;
    /// Guest read at `offset` inside BAR `bar`.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` inside BAR `bar`.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// Places every BAR as firmware would and enables decoding (the firmware-less boot:
    /// Keel plays SeaBIOS's role). `owner` is the function's address, for
    /// [`BarAllocator::release`].
    fn assign_bars(
        &self,
        owner: crate::PciAddress,
        allocator: &mut BarAllocator,
    ) -> Result<(), PciError>;
    /// Device reset (the machine's reset): config space to power-on values, device state
    /// to its reset state.
    fn reset(&self);
    /// Completes what the device took on before a snapshot (the vCPUs are stopped): after
    /// it no request is in flight. The default has nothing to complete.
    fn quiesce(&self) {}
    /// The function's state for a snapshot ([`crate::FunctionState`] for the functions of
    /// this crate). The default: this function cannot be saved, so `migrate` fails naming
    /// it instead of writing a stream that would lose its state.
    fn save_state(&self) -> Result<Vec<u8>, PciError> {
        Err(PciError::NotSaveable)
    }
    /// Checks that a state [`PciDevice::save_state`] wrote fits this function, without
    /// changing anything.
    fn check_state(&self, state: &[u8]) -> Result<(), PciError> {
        let _ = state;
        Err(PciError::NotSaveable)
    }
    /// Puts the function in a state [`PciDevice::check_state`] accepted.
    fn restore_state(&self, state: &[u8]) -> Result<(), PciError> {
        let _ = state;
        Err(PciError::NotSaveable)
    }
}

/// Places every BAR of `config` through `allocator` and turns on I/O and memory decoding
/// for the kinds it has (bus mastering stays off: the driver enables it).
pub fn assign_config_bars(
    config: &mut PciConfig,
    owner: crate::PciAddress,
    allocator: &mut BarAllocator,
) -> Result<(), PciError> {
    // Largest first, as firmware does, so natural alignment wastes least.
    let mut order: Vec<_> = config.bars().collect();
    order.sort_by_key(|b| std::cmp::Reverse(b.1.size));
    let mut cmd = config.command();
    for (i, spec) in order {
        let base = allocator.allocate(owner, spec)?;
        config.set_bar_address(usize::from(i), base);
        cmd |= match spec.kind {
            crate::BarKind::Io => command::IO,
            _ => command::MEMORY,
        };
    }
    config.set_command(cmd);
    Ok(())
}

/// A function made of a [`PciConfig`] and, optionally, one [`BusDevice`] per BAR (offsets
/// relative to the BAR). BARs without a device read as all ones and drop writes.
pub struct PciFunction {
    config: Mutex<PciConfig>,
    bar_devices: [Option<Arc<dyn BusDevice>>; 6],
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciFunction")
            .field("config", &*self.lock())
            .finish()
    }
}

impl PciFunction {
    /// A function with this configuration space.
    pub fn new(config: PciConfig) -> Self {
        Self {
            config: Mutex::new(config),
            bar_devices: Default::default(),
        }
    }

    /// A host bridge as on QEMU's `pc` (i440FX, 8086:1237, class 0x0600): what Linux's
    /// config mechanism #1 sanity check looks for at 00:00.0.
    pub fn host_bridge() -> Self {
        Self::new(PciConfig::new(PciIds {
            vendor: 0x8086,
            device: 0x1237,
            class: 0x06_00_00,
            revision: 2,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }))
    }

    /// Serves BAR `bar` with `device` (the BAR must be declared in the config space).
    pub fn with_bar_device(mut self, bar: u8, device: Arc<dyn BusDevice>) -> Self {
        if let Some(slot) = self.bar_devices.get_mut(usize::from(bar)) {
            *slot = Some(device);
        }
        self
    }

    /// The configuration space.
    pub fn lock(&self) -> MutexGuard<'_, PciConfig> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PciDevice for PciFunction {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.lock().read(u64::from(offset), data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.lock().write(u64::from(offset), data);
    }
    fn bar_regions(&self) -> Vec<BarRegion> {
        self.lock().bar_regions()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        match self
            .bar_devices
            .get(usize::from(bar))
            .and_then(Option::as_ref)
        {
            Some(d) => d.read(offset, data),
            None => data.fill(0xff),
        }
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if let Some(d) = self
            .bar_devices
            .get(usize::from(bar))
            .and_then(Option::as_ref)
        {
            d.write(offset, data);
        }
    }
    fn assign_bars(
        &self,
        owner: crate::PciAddress,
        allocator: &mut BarAllocator,
    ) -> Result<(), PciError> {
        assign_config_bars(&mut self.lock(), owner, allocator)
    }
    fn reset(&self) {
        self.lock().reset();
    }
    fn save_state(&self) -> Result<Vec<u8>, PciError> {
        Ok(crate::snapshot::save_config(&self.lock()))
    }
    fn check_state(&self, state: &[u8]) -> Result<(), PciError> {
        crate::snapshot::decode_config(state).map(|_| ())
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), PciError> {
        let image = crate::snapshot::decode_config(state)?;
        self.lock().restore_image(&image);
        Ok(())
    }
}

/// Whether a function's config space says it is multifunction (header type bit 7).
pub(crate) fn is_multifunction(dev: &dyn PciDevice) -> bool {
    let mut h = [0u8];
    dev.config_read(regs::HEADER_TYPE as u16, &mut h);
    h[0] & 0x80 != 0
}
