//! The root bus: 32 slots of 8 functions, the visibility rules of multifunction slots,
//! config mechanism #1 (ports 0xCF8/0xCFC) and the routing of window accesses to BARs.
//!
//! # Visibility and staged slots
//!
//! A guest finds functions by reading the vendor ID of function 0 of each slot, and looks at
//! functions 1–7 only when function 0 has the multifunction bit. The bus answers the same
//! way: function 0 gates its slot, and functions 1–7 are visible only while function 0 is
//! present with the multifunction bit set. Absent or hidden functions read all ones and
//! drop writes; their BARs do not decode.
//!
//! That rule is what "function 0 last" hot plug relies on: the machine adds functions 1–7
//! first (held invisible), then function 0, which exposes the whole slot at once; then it
//! tells the guest (ACPI: a PCIU bit and a GPE). In **staged** mode
//! ([`PciBus::set_staged`], for machine-ready) the bus also refuses a function 1–7 added to
//! a slot whose function 0 is already present, as QEMU does: the guest would never scan
//! it. In both modes function 0 without the multifunction bit cannot join a slot that has
//! other functions, nor can they join it.
//!
//! # Windows
//!
//! The machine maps [`PciBus::window`] devices on its buses over the I/O and memory
//! windows it declares; the bus sends each access to the BAR that decodes it now, so a
//! guest moving a BAR never changes a bus map (nothing is remapped inside a vCPU's
//! access). A [`BarObserver`] learns of every move (e.g. to move an ioeventfd).

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use keel_accel::BusDevice;

use crate::config::{AddressSpace, BarRegion};
use crate::device::{PciDevice, is_multifunction};
use crate::{FUNCTIONS, PciAddress, PciError, SLOTS};

/// Told when a function's BAR starts or stops decoding, or moves.
pub trait BarObserver: Send + Sync {
    /// `old` stopped decoding and/or `new` started (both set: a move or a resize).
    /// Called without bus locks held, after the change took effect.
    fn bar_changed(&self, function: PciAddress, old: Option<BarRegion>, new: Option<BarRegion>);
}

struct Route {
    function: PciAddress,
    region: BarRegion,
    device: Arc<dyn PciDevice>,
}

/// The root bus (see the module documentation).
pub struct PciBus {
    functions: RwLock<Vec<Option<Arc<dyn PciDevice>>>>,
    routes: RwLock<Vec<Route>>,
    observer: RwLock<Option<Arc<dyn BarObserver>>>,
    staged: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present: Vec<String> = (0..=255u8)
            .map(PciAddress::from_devfn)
            .filter(|a| self.function(*a).is_some())
            .map(|a| a.to_string())
            .collect();
        f.debug_struct("PciBus")
            .field("functions", &present)
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// An empty bus, not staged.
    pub fn new() -> Self {
        Self {
            functions: RwLock::new(vec![None; usize::from(SLOTS) * usize::from(FUNCTIONS)]),
            routes: RwLock::new(Vec::new()),
            observer: RwLock::new(None),
            staged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn read_functions(&self) -> RwLockReadGuard<'_, Vec<Option<Arc<dyn PciDevice>>>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write_functions(&self) -> RwLockWriteGuard<'_, Vec<Option<Arc<dyn PciDevice>>>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Staged mode (see the module documentation): on for hot plug.
    pub fn set_staged(&self, staged: bool) {
        self.staged
            .store(staged, std::sync::atomic::Ordering::Release);
    }

    /// Sets the observer of BAR changes.
    pub fn set_bar_observer(&self, observer: Option<Arc<dyn BarObserver>>) {
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = observer;
    }

    /// Adds `device` at `address`. Fails when the address is taken, or when the
    /// multifunction rules (module documentation) refuse it.
    pub fn add_function(
        &self,
        address: PciAddress,
        device: Arc<dyn PciDevice>,
    ) -> Result<(), PciError> {
        {
            let mut fns = self.write_functions();
            let base = usize::from(address.slot()) * usize::from(FUNCTIONS);
            if fns[usize::from(address.devfn())].is_some() {
                return Err(PciError::Occupied(address));
            }
            let fn0 = fns[base].clone();
            let others = (1..usize::from(FUNCTIONS)).any(|f| fns[base + f].is_some());
            if address.function() == 0 {
                if others && !is_multifunction(&*device) {
                    return Err(PciError::NotMultifunction(address));
                }
            } else if let Some(fn0) = fn0 {
                if !is_multifunction(&*fn0) {
                    return Err(PciError::NotMultifunction(address));
                }
                if self.staged.load(std::sync::atomic::Ordering::Acquire) {
                    return Err(PciError::SlotExposed(address));
                }
            }
            fns[usize::from(address.devfn())] = Some(device);
        }
        self.refresh_routes(address.slot());
        Ok(())
    }

    /// Places the BARs of the function at `address` through `allocator` and enables their
    /// decoding, as firmware does at boot (cold plug). A hot-plugged function can be left
    /// unassigned: Linux's hot plug path assigns BARs itself.
    pub fn assign_bars(
        &self,
        address: PciAddress,
        allocator: &mut crate::BarAllocator,
    ) -> Result<(), PciError> {
        let dev = self.function(address).ok_or(PciError::Absent(address))?;
        dev.assign_bars(address, allocator)?;
        self.refresh_routes(address.slot());
        Ok(())
    }

    /// Removes the function at `address`; its BARs stop decoding.
    pub fn remove_function(&self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        let dev = self.write_functions()[usize::from(address.devfn())].take();
        self.refresh_routes(address.slot());
        dev
    }

    /// Removes every function of `slot` (an ACPI eject), function 0 first.
    pub fn remove_slot(&self, slot: u8) -> Vec<(PciAddress, Arc<dyn PciDevice>)> {
        let mut out = Vec::new();
        {
            let mut fns = self.write_functions();
            for f in 0..FUNCTIONS {
                let Some(a) = PciAddress::new(slot, f) else {
                    continue;
                };
                if let Some(d) = fns[usize::from(a.devfn())].take() {
                    out.push((a, d));
                }
            }
        }
        self.refresh_routes(slot);
        out
    }

    /// The function at `address`, visible or not.
    pub fn function(&self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        self.read_functions()[usize::from(address.devfn())].clone()
    }

    /// Bitmap of the functions present in `slot` (bit N = function N), visible or not.
    pub fn occupancy(&self, slot: u8) -> u8 {
        let fns = self.read_functions();
        (0..FUNCTIONS)
            .filter(|&f| {
                PciAddress::new(slot, f).is_some_and(|a| fns[usize::from(a.devfn())].is_some())
            })
            .fold(0, |m, f| m | 1 << f)
    }

    /// Bitmap of the slots whose function 0 is present (what the guest finds by scanning).
    pub fn exposed_slots(&self) -> u32 {
        let fns = self.read_functions();
        (0..SLOTS)
            .filter(|&s| fns[usize::from(s) * usize::from(FUNCTIONS)].is_some())
            .fold(0, |m, s| m | 1 << s)
    }

    fn visible_in(
        fns: &[Option<Arc<dyn PciDevice>>],
        address: PciAddress,
    ) -> Option<Arc<dyn PciDevice>> {
        let dev = fns[usize::from(address.devfn())].clone()?;
        if address.function() == 0 {
            return Some(dev);
        }
        let fn0 = fns[usize::from(address.slot()) * usize::from(FUNCTIONS)].as_ref()?;
        is_multifunction(&**fn0).then_some(dev)
    }

    /// The function at `address` if the guest can see it.
    pub fn visible(&self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        Self::visible_in(&self.read_functions(), address)
    }

    /// A configuration read of the function at `address`: all ones when it is absent or
    /// hidden.
    pub fn config_read(&self, address: PciAddress, offset: u16, data: &mut [u8]) {
        match self.visible(address) {
            Some(d) => d.config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write to the function at `address` (dropped when absent or hidden);
    /// BAR routing follows.
    pub fn config_write(&self, address: PciAddress, offset: u16, data: &[u8]) {
        let Some(d) = self.visible(address) else {
            return;
        };
        d.config_write(offset, data);
        self.refresh_routes(address.slot());
    }

    /// Recomputes which BARs of `slot` decode and tells the observer what changed.
    pub fn refresh_routes(&self, slot: u8) {
        let mut now: Vec<Route> = Vec::new();
        {
            let fns = self.read_functions();
            for f in 0..FUNCTIONS {
                let Some(a) = PciAddress::new(slot, f) else {
                    continue;
                };
                if let Some(d) = Self::visible_in(&fns, a) {
                    for region in d.bar_regions() {
                        now.push(Route {
                            function: a,
                            region,
                            device: Arc::clone(&d),
                        });
                    }
                }
            }
        }
        let mut changes = Vec::new();
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            let (old, kept): (Vec<Route>, Vec<Route>) =
                routes.drain(..).partition(|r| r.function.slot() == slot);
            *routes = kept;
            for f in 0..FUNCTIONS {
                for bar in 0..6u8 {
                    let find = |v: &[Route]| {
                        v.iter()
                            .find(|r| r.function.function() == f && r.region.bar == bar)
                            .map(|r| r.region)
                    };
                    let (o, n) = (find(&old), find(&now));
                    if o != n
                        && let Some(a) = PciAddress::new(slot, f)
                    {
                        changes.push((a, o, n));
                    }
                }
            }
            routes.extend(now);
        }
        if changes.is_empty() {
            return;
        }
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(obs) = observer {
            for (a, o, n) in changes {
                obs.bar_changed(a, o, n);
            }
        }
    }

    /// The BARs that decode now, with their functions.
    pub fn regions(&self) -> Vec<(PciAddress, BarRegion)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.iter().map(|r| (r.function, r.region)).collect()
    }

    /// Calls `f` with the route that decodes `addr` in `space`, the device called under the
    /// routes' read lock (the bus map before the device, as every bus: no reference count
    /// is taken per access); `false` when no BAR decodes it.
    fn with_route(&self, space: AddressSpace, addr: u64, f: impl FnOnce(&Route)) -> bool {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        match routes.iter().find(|r| r.region.contains(space, addr)) {
            Some(r) => {
                f(r);
                true
            }
            None => false,
        }
    }

    /// A read at absolute address `addr` in `space`; `false` when no BAR decodes it.
    pub fn window_read(&self, space: AddressSpace, addr: u64, data: &mut [u8]) -> bool {
        self.with_route(space, addr, |r| {
            r.device.bar_read(r.region.bar, addr - r.region.base, data)
        })
    }

    /// A write at absolute address `addr` in `space`; `false` when no BAR decodes it.
    pub fn window_write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> bool {
        self.with_route(space, addr, |r| {
            r.device.bar_write(r.region.bar, addr - r.region.base, data)
        })
    }

    /// A [`BusDevice`] for one window: map it at `base` on the PIO bus (for
    /// [`AddressSpace::Io`]) or the MMIO bus (for memory). Unclaimed addresses read all ones.
    pub fn window(self: &Arc<Self>, space: AddressSpace, base: u64) -> Arc<dyn BusDevice> {
        Arc::new(PciWindow {
            bus: Arc::clone(self),
            space,
            base,
        })
    }

    /// Resets every function (config space to power-on values); BAR routing follows.
    pub fn reset(&self) {
        let all: Vec<_> = self.read_functions().iter().flatten().cloned().collect();
        for d in all {
            d.reset();
        }
        for s in 0..SLOTS {
            self.refresh_routes(s);
        }
    }
}

/// One window of the bus on an I/O bus (see [`PciBus::window`]).
struct PciWindow {
    bus: Arc<PciBus>,
    space: AddressSpace,
    base: u64,
}

impl BusDevice for PciWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let ok = self
            .base
            .checked_add(offset)
            .is_some_and(|a| self.bus.window_read(self.space, a, data));
        if !ok {
            data.fill(0xff);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(a) = self.base.checked_add(offset) {
            self.bus.window_write(self.space, a, data);
        }
    }
}

/// The config address register's enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at
/// 0xCFC–0xCFF. Map it at port 0xCF8 with length 8.
///
/// Only a 32-bit access at 0xCF8 reaches the address register (as on the PIIX); a byte
/// access at 0xCF9 goes to the optional reset-control device ([`PciConfigIo::with_cf9`]),
/// other narrow accesses there are dropped and read all ones. Data accesses of 1, 2 or 4
/// bytes inside 0xCFC–0xCFF read or write the function the address register selects;
/// with the enable bit clear, for a bus other than 0, or for an absent or hidden function
/// they read all ones and are dropped.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: Mutex<u32>,
    cf9: Option<Arc<dyn BusDevice>>,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &format_args!("{:#x}", self.address()))
            .finish()
    }
}

/// The port of the address register.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports the mechanism takes (0xCF8..0xD00).
pub const CONFIG_IO_LEN: u64 = 8;

impl PciConfigIo {
    /// Mechanism #1 for `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self {
            bus,
            address: Mutex::new(0),
            cf9: None,
        }
    }

    /// Sends byte accesses at 0xCF9 (the PIIX reset control register) to `device` (offset 0).
    pub fn with_cf9(mut self, device: Arc<dyn BusDevice>) -> Self {
        self.cf9 = Some(device);
        self
    }

    /// The address register.
    pub fn address(&self) -> u32 {
        *self.address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts back a saved address register (a restored snapshot: a guest may have been
    /// stopped between writing 0xCF8 and accessing 0xCFC).
    pub fn set_address(&self, value: u32) {
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }

    /// The function and register the address register plus `byte` (0..4) select.
    fn target(&self, byte: u64) -> Option<(PciAddress, u16)> {
        let a = self.address();
        if a & CONFIG_ENABLE == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let function = PciAddress::from_devfn((a >> 8) as u8);
        Some((function, (a & 0xfc) as u16 + byte as u16))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        match offset {
            0 if len == 4 => data.copy_from_slice(&self.address().to_le_bytes()),
            1 if len == 1 && self.cf9.is_some() => {
                if let Some(d) = &self.cf9 {
                    d.read(0, data);
                }
            }
            4..=7 if matches!(len, 1 | 2 | 4) && offset - 4 + len <= 4 => {
                match self.target(offset - 4) {
                    Some((f, reg)) => self.bus.config_read(f, reg, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match offset {
            0 if len == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                *self.address.lock().unwrap_or_else(|p| p.into_inner()) = u32::from_le_bytes(b);
            }
            1 if len == 1 => {
                if let Some(d) = &self.cf9 {
                    d.write(0, data);
                }
            }
            4..=7 if matches!(len, 1 | 2 | 4) && offset - 4 + len <= 4 => {
                if let Some((f, reg)) = self.target(offset - 4) {
                    self.bus.config_write(f, reg, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PciFunction;

    #[derive(Default)]
    struct Cf9(Mutex<Vec<u8>>);
    impl BusDevice for Cf9 {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0x02);
        }
        fn write(&self, _offset: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    #[test]
    fn address_register_and_reset_control() {
        let bus = Arc::new(PciBus::new());
        bus.add_function(
            PciAddress::new(0, 0).unwrap(),
            Arc::new(PciFunction::host_bridge()),
        )
        .unwrap();
        let cf9 = Arc::new(Cf9::default());
        let io = PciConfigIo::new(bus).with_cf9(cf9.clone());
        io.write(0, &0x8000_0004u32.to_le_bytes());
        // Narrow accesses do not touch the address register.
        io.write(0, &[0]);
        io.write(2, &[0, 0]);
        assert_eq!(io.address(), 0x8000_0004);
        let mut b = [0u8; 1];
        io.read(0, &mut b);
        assert_eq!(b, [0xff]);
        // 0xCF9 goes to the reset control register.
        io.write(1, &[0x06]);
        io.read(1, &mut b);
        assert_eq!((cf9.0.lock().unwrap().as_slice(), b), (&[6u8][..], [2]));
        // Data port at each byte lane; a straddling access reads all ones.
        io.write(4, &0x0007u16.to_le_bytes());
        let mut w = [0u8; 2];
        io.read(4, &mut w);
        assert_eq!(
            u16::from_le_bytes(w),
            0x0007 & crate::config::command::WRITABLE
        );
        io.read(7, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut q = [0u8; 8];
        io.read(4, &mut q);
        assert_eq!(q, [0xff; 8]);
    }
}
