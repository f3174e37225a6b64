//! Machine-init-done support: what firmware tables (ACPI DSDT entries, the kernel command
//! line, boot order, e820) describe is gathered from cold-plugged devices only, once, on
//! entering machine-ready.

use std::sync::{Arc, Mutex, OnceLock};

use keel_phase::PhaseTracker;
use serde::Serialize;

use crate::bus::{DeviceKey, SlotResources};
use crate::prop::Props;
use crate::tree::DeviceTree;
use crate::types::BusType;

/// Which devices a collector wants.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceFilter {
    /// Every cold device.
    All,
    /// Devices on buses of this type (e.g. [`BusType::VirtioMmio`]).
    BusType(BusType),
    /// Devices on the bus with this name.
    Bus(String),
    /// Devices of this type.
    Driver(String),
}

/// A cold-plugged device as firmware-table builders need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ColdDevice {
    /// Stable handle.
    pub key: DeviceKey,
    /// User id.
    pub id: Option<String>,
    /// Device type.
    #[serde(rename = "type")]
    pub driver: String,
    /// Canonical path.
    pub path: String,
    /// Bus name.
    pub bus: String,
    /// Slot index on fixed-slot buses.
    pub slot: Option<u32>,
    /// The slot's resources (MMIO window, IRQ) on fixed-slot buses.
    pub resources: Option<SlotResources>,
    /// Created by the board.
    pub onboard: bool,
    /// Validated properties.
    pub props: Props,
}

impl DeviceTree {
    /// The cold-plugged devices matching `filter`, in bus order, then slot order, then creation
    /// order. Hot-plugged devices are never included, whenever this is called.
    pub fn cold_devices(&self, filter: &DeviceFilter) -> Vec<ColdDevice> {
        let mut out = Vec::new();
        for (i, b) in self.buses.iter().enumerate() {
            let bus_ok = match filter {
                DeviceFilter::BusType(t) => &b.bus_type == t,
                DeviceFilter::Bus(n) => &b.name == n,
                DeviceFilter::All | DeviceFilter::Driver(_) => true,
            };
            if !bus_ok {
                continue;
            }
            let mut devs: Vec<_> = self
                .devices
                .values()
                .filter(|d| d.bus == i && !d.hotplugged)
                .filter(|d| match filter {
                    DeviceFilter::Driver(t) => &d.driver == t,
                    _ => true,
                })
                .collect();
            devs.sort_by_key(|d| (d.slot, d.key));
            out.extend(devs.into_iter().map(|d| ColdDevice {
                key: d.key,
                id: d.id.clone(),
                driver: d.driver.clone(),
                path: d.path.clone(),
                bus: b.name.clone(),
                slot: d.slot,
                resources: b.resources(d.slot).copied(),
                onboard: d.onboard,
                props: d.props.clone(),
            }));
        }
        out
    }
}

/// The result of a collection registered with [`collect_on_machine_ready`]: empty until the
/// machine becomes ready, then fixed forever.
#[derive(Debug, Clone, Default)]
pub struct ColdSnapshot(Arc<OnceLock<Vec<ColdDevice>>>);

impl ColdSnapshot {
    /// The devices, once collected.
    pub fn get(&self) -> Option<&[ColdDevice]> {
        self.0.get().map(Vec::as_slice)
    }
}

/// Registers a machine-init-done notifier that collects the cold devices matching `filter`
/// once, on entering machine-ready (or at once if already ready).
///
/// The notifier locks `tree`: do not hold that lock while calling
/// [`PhaseTracker::advance`] to machine-ready.
pub fn collect_on_machine_ready(
    tracker: &PhaseTracker,
    tree: Arc<Mutex<DeviceTree>>,
    filter: DeviceFilter,
) -> ColdSnapshot {
    let snap = ColdSnapshot::default();
    let cell = snap.0.clone();
    tracker.add_init_done_notifier(Box::new(move || {
        let t = tree.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cell.set(t.cold_devices(&filter));
    }));
    snap
}
