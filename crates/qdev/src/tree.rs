//! The device tree: buses, device instances, cold and hot plug decided by phase, and the
//! unplug state machine.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use keel_phase::{Phase, PhaseSet};
use serde::Serialize;

use crate::bus::{
    BusSpec, DeviceKey, DeviceView, HotplugHandler, SlotResources, Slots, UnplugMode,
};
use crate::error::{HookError, QdevError};
use crate::events::{Clock, DeviceEvent, EventSink, MonotonicClock};
use crate::prop::Props;
use crate::request::{DeviceRequest, id_wellformed};
use crate::types::{BusType, DeviceType, TypeRegistry};

/// Phases in which `device_add` / `-device` is valid: cold in machine-init, hot in
/// machine-ready.
pub const DEVICE_ADD_PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
/// Phases in which `device_del` is valid: in machine-init it removes a cold-plugged device at
/// once (no guest runs yet); in machine-ready it is a hot unplug.
pub const DEVICE_DEL_PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
/// Phases in which the board may add its onboard devices.
pub const ONBOARD_PHASES: PhaseSet = PhaseSet::until(Phase::MachineInit);
/// How many devices a tree holds by default (a bound on what clients can make it allocate).
pub const DEFAULT_MAX_DEVICES: usize = 4096;
/// How long a guest has to answer an unplug request before `DEVICE_UNPLUG_GUEST_ERROR`
/// reports the silence (QEMU's PCIe hot-unplug retry window).
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(5);

/// What the machine does when a device comes and goes: attach the device model to a real bus
/// (PIO/MMIO ranges, IRQ lines), detach it, reset it. qdev calls these with validated
/// properties; the machine dispatches on `dev.driver`.
pub trait DeviceHooks: Send {
    /// Builds and attaches the device; an error aborts the creation (nothing is created).
    fn realize(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError>;
    /// Detaches and drops the device; called exactly once for every realized device that goes.
    fn unrealize(&mut self, dev: &DeviceView<'_>);
    /// Puts the device in its power-on state (system reset).
    fn reset(&mut self, dev: &DeviceView<'_>) {
        let _ = dev;
    }
}

/// Hooks that accept everything and do nothing: a pure model (tests, dry runs).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl DeviceHooks for NoHooks {
    fn realize(&mut self, _dev: &DeviceView<'_>) -> Result<(), HookError> {
        Ok(())
    }
    fn unrealize(&mut self, _dev: &DeviceView<'_>) {}
}

/// Where a device stands in the unplug state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnplugState {
    /// No unplug requested.
    None,
    /// Requested; waiting for the guest (a second `device_del` is refused, unless the bus's
    /// controller re-sends requests).
    Pending,
    /// The guest refused the last request; `device_del` may be retried.
    GuestError,
    /// The guest did not answer the last request in time; `device_del` may be retried, the
    /// guest may still eject it, and a reset completes the removal.
    TimedOut,
}

/// What the guest-side hotplug controller reports; the VMM feeds it to
/// [`DeviceTree::guest_answer`] (typically from its event loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAnswer {
    /// The guest ejected the device: it goes now.
    Ejected(DeviceKey),
    /// The guest refused the pending unplug request.
    Refused(DeviceKey),
}

/// A device created by `device_add` or [`DeviceTree::add_onboard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// Stable handle.
    pub key: DeviceKey,
    /// Canonical path.
    pub path: String,
    /// Whether it was hot-plugged (decided by the phase).
    pub hotplugged: bool,
    /// Bus name.
    pub bus: String,
    /// Slot index on fixed-slot buses.
    pub slot: Option<u32>,
    /// The device's type name (the request may have named it by its alias).
    pub driver: String,
}

/// How a successful `device_del` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelOutcome {
    /// The device is gone (`DEVICE_DELETED` was emitted).
    Removed,
    /// The guest was asked; the outcome comes later as an event.
    Pending,
}

#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub(crate) key: DeviceKey,
    pub(crate) id: Option<String>,
    pub(crate) driver: String,
    pub(crate) path: String,
    pub(crate) bus: usize,
    pub(crate) slot: Option<u32>,
    pub(crate) hotplugged: bool,
    pub(crate) onboard: bool,
    pub(crate) props: Props,
    pub(crate) unplug: UnplugState,
    pub(crate) deadline: Option<Duration>,
}

pub(crate) struct BusEntry {
    pub(crate) name: String,
    pub(crate) bus_type: BusType,
    pub(crate) parent: String,
    pub(crate) path: String,
    pub(crate) slots: Slots,
    pub(crate) occupied: Vec<Option<DeviceKey>>,
    pub(crate) hotplug: Option<Box<dyn HotplugHandler>>,
}

impl BusEntry {
    fn free_slot(&self) -> Option<Option<u32>> {
        match self.slots {
            Slots::Unlimited => Some(None),
            Slots::Fixed(_) => self
                .occupied
                .iter()
                .position(Option::is_none)
                .and_then(|i| u32::try_from(i).ok())
                .map(Some),
        }
    }
    pub(crate) fn resources(&self, slot: Option<u32>) -> Option<&SlotResources> {
        slot_resources(&self.slots, slot)
    }
    fn capacity(&self) -> Option<u32> {
        match &self.slots {
            Slots::Unlimited => None,
            Slots::Fixed(v) => u32::try_from(v.len()).ok(),
        }
    }
}

fn check_add_phase(phase: Phase) -> Result<(), QdevError> {
    if DEVICE_ADD_PHASES.contains(phase) {
        Ok(())
    } else {
        Err(QdevError::OutOfPhase {
            command: "device_add",
            current: phase,
            needed: DEVICE_ADD_PHASES,
        })
    }
}

fn slot_resources(slots: &Slots, slot: Option<u32>) -> Option<&SlotResources> {
    match (slots, slot) {
        (Slots::Fixed(v), Some(i)) => v.get(i as usize),
        _ => None,
    }
}

/// Builds a view from the bus's name and slots only, so the bus's hotplug handler can be
/// borrowed mutably at the same time.
fn view<'a>(dev: &'a Device, bus: &'a str, slots: &'a Slots) -> DeviceView<'a> {
    DeviceView {
        key: dev.key,
        id: dev.id.as_deref(),
        driver: &dev.driver,
        path: &dev.path,
        bus,
        slot: dev.slot,
        resources: slot_resources(slots, dev.slot),
        hotplugged: dev.hotplugged,
        onboard: dev.onboard,
        props: &dev.props,
    }
}

/// A bus in [`DeviceTree::query_tree`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BusNode {
    /// Bus name.
    pub name: String,
    /// Bus type name.
    #[serde(rename = "type")]
    pub bus_type: String,
    /// QOM path.
    pub path: String,
    /// Whether it has a hotplug handler.
    pub hotpluggable: bool,
    /// Number of slots (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Devices on it, in creation order.
    pub devices: Vec<DeviceNode>,
}

/// A device in [`DeviceTree::query_tree`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceNode {
    /// User id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Device type.
    #[serde(rename = "type")]
    pub driver: String,
    /// Canonical path.
    pub path: String,
    /// Bus name.
    pub bus: String,
    /// Created in machine-ready.
    pub hotplugged: bool,
    /// Created by the board.
    pub onboard: bool,
    /// Slot index on fixed-slot buses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The slot's resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<SlotResources>,
    /// Unplug state.
    pub unplug_state: UnplugState,
    /// Validated properties.
    pub props: Props,
}

/// The device model of one machine. Not thread-safe by itself: the VMM keeps it behind its
/// own lock, and guest-side controllers report through [`GuestAnswer`]s.
pub struct DeviceTree {
    pub(crate) registry: TypeRegistry,
    pub(crate) buses: Vec<BusEntry>,
    pub(crate) devices: BTreeMap<DeviceKey, Device>,
    ids: HashMap<String, DeviceKey>,
    pub(crate) paths: HashMap<String, DeviceKey>,
    next_key: u64,
    hooks: Box<dyn DeviceHooks>,
    events: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    unplug_timeout: Option<Duration>,
    max_devices: usize,
    /// The QOM type of `/machine` (`microvm-machine`); `machine` until a board says.
    pub(crate) machine_type: String,
    /// `-global` defaults for the devices created from now on.
    globals: crate::global::Globals,
}

impl std::fmt::Debug for DeviceTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTree")
            .field(
                "buses",
                &self.buses.iter().map(|b| &b.name).collect::<Vec<_>>(),
            )
            .field("devices", &self.devices.len())
            .field("unplug_timeout", &self.unplug_timeout)
            .finish_non_exhaustive()
    }
}

impl DeviceTree {
    /// An empty tree over `registry`, calling `hooks` to realize devices and sending events to
    /// `events`. Uses the host's monotonic clock and [`DEFAULT_UNPLUG_TIMEOUT`].
    pub fn new(
        registry: TypeRegistry,
        hooks: Box<dyn DeviceHooks>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        Self {
            registry,
            buses: Vec::new(),
            devices: BTreeMap::new(),
            ids: HashMap::new(),
            paths: HashMap::new(),
            next_key: 0,
            hooks,
            events,
            clock: Arc::new(MonotonicClock::default()),
            unplug_timeout: Some(DEFAULT_UNPLUG_TIMEOUT),
            max_devices: DEFAULT_MAX_DEVICES,
            machine_type: "machine".to_owned(),
            globals: crate::global::Globals::default(),
        }
    }

    /// Sets the `-global` defaults applied to every device created from now on (a board
    /// sets them before it adds its onboard devices); see [`crate::GlobalProp`].
    pub fn set_globals(&mut self, globals: Vec<crate::GlobalProp>) {
        self.globals.set(globals);
    }

    /// QEMU's warnings for the globals whose driver names no device type Keel knows (nor a
    /// QEMU class Keel's machines do not model), for the VMM to print once the machine is
    /// ready.
    pub fn global_warnings(&self) -> Vec<String> {
        self.globals.warnings(|d| {
            self.registry
                .iter()
                .any(|t| t.name() == d || t.alias_name() == Some(d))
        })
    }

    /// Takes the hotplug handler off bus `name`, so that hot plug and unplug there fail
    /// with QEMU's "does not support hotplugging" (`pc`'s
    /// `-global PIIX4_PM.acpi-root-pci-hotplug=off`). False if there is no such bus.
    pub fn disable_hotplug(&mut self, name: &str) -> bool {
        match self.buses.iter_mut().find(|b| b.name == name) {
            Some(b) => {
                b.hotplug = None;
                true
            }
            None => false,
        }
    }

    /// Names the QOM type of `/machine` (`qom-get /machine type`), e.g. `microvm-machine`.
    pub fn set_machine_type(&mut self, type_name: impl Into<String>) {
        self.machine_type = type_name.into();
    }

    /// Sets the most devices the tree holds (onboard ones included); further creations fail.
    pub fn set_max_devices(&mut self, max: usize) {
        self.max_devices = max;
    }

    /// Replaces the clock (tests use [`crate::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets how long the guest has to answer an unplug request; `None` waits forever (the
    /// device then stays visibly `pending`).
    pub fn set_unplug_timeout(&mut self, timeout: Option<Duration>) {
        self.unplug_timeout = timeout;
    }

    /// The type registry.
    pub fn registry(&self) -> &TypeRegistry {
        &self.registry
    }

    /// Adds a bus. Its name must be unique and its parent must be `/machine` or an existing
    /// device path.
    pub fn add_bus(&mut self, spec: BusSpec) -> Result<(), QdevError> {
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(QdevError::InvalidBusName(spec.name));
        }
        if self.buses.iter().any(|b| b.name == spec.name) {
            return Err(QdevError::DuplicateBus(spec.name));
        }
        if spec.parent != "/machine" && !self.paths.contains_key(&spec.parent) {
            return Err(QdevError::BadBusParent {
                bus: spec.name,
                parent: spec.parent,
            });
        }
        let path = format!("{}/{}", spec.parent, spec.name);
        let occupied = match &spec.slots {
            Slots::Unlimited => Vec::new(),
            Slots::Fixed(v) => vec![None; v.len()],
        };
        self.buses.push(BusEntry {
            name: spec.name,
            bus_type: spec.bus_type,
            parent: spec.parent,
            path,
            slots: spec.slots,
            occupied,
            hotplug: spec.hotplug,
        });
        Ok(())
    }

    /// `device_add` and `-device`: one path. The phase decides: before machine-init →
    /// `OutOfPhase`; machine-init → cold plug; machine-ready → hot plug if both the device
    /// type and the bus allow it. Nothing is created on any error.
    pub fn device_add(&mut self, phase: Phase, req: &DeviceRequest) -> Result<Added, QdevError> {
        check_add_phase(phase)?;
        let hot = phase == Phase::MachineReady;
        let ty = self.registry.lookup_creatable(&req.driver)?.clone();
        let bus = self.pick_bus(&ty, req.bus.as_deref())?;
        if hot {
            if self.buses[bus].hotplug.is_none() {
                return Err(QdevError::BusNoHotplug(self.buses[bus].name.clone()));
            }
            if !ty.is_hotpluggable() {
                return Err(QdevError::DeviceNoHotplug(ty.name().to_owned()));
            }
        }
        self.check_id(req.id.as_deref())?;
        let props = ty.validate(&self.globals.apply(&ty, &req.props, hot)?)?;
        self.check_bootindex(&props)?;
        self.create(&ty, props, req.id.clone(), bus, hot, false)
    }

    /// A `bootindex` (QEMU's boot order property) is unique among the devices that have one;
    /// -1, the default, means none.
    fn check_bootindex(&self, props: &Props) -> Result<(), QdevError> {
        let Some(n) = props.i64("bootindex").filter(|n| *n >= 0) else {
            return Ok(());
        };
        if self
            .devices
            .values()
            .any(|d| d.props.i64("bootindex") == Some(n))
        {
            return Err(QdevError::MachineRefused(format!(
                "The bootindex {n} has already been used"
            )));
        }
        Ok(())
    }

    /// [`DeviceTree::device_add`] for a `-device` argument.
    pub fn device_add_cli(&mut self, phase: Phase, arg: &str) -> Result<Added, QdevError> {
        check_add_phase(phase)?;
        self.device_add(phase, &DeviceRequest::parse_cli(arg)?)
    }

    /// [`DeviceTree::device_add`] for QMP `device_add` arguments (a JSON object).
    pub fn device_add_json(
        &mut self,
        phase: Phase,
        args: &serde_json::Value,
    ) -> Result<Added, QdevError> {
        check_add_phase(phase)?;
        self.device_add(phase, &DeviceRequest::from_qmp_value(args)?)
    }

    /// Adds an onboard device during board init (phases up to machine-init): always cold,
    /// path `/machine/unattached/device[N]`, board-only types allowed, never removable.
    pub fn add_onboard(&mut self, phase: Phase, req: &DeviceRequest) -> Result<Added, QdevError> {
        if !ONBOARD_PHASES.contains(phase) {
            return Err(QdevError::OutOfPhase {
                command: "add_onboard",
                current: phase,
                needed: ONBOARD_PHASES,
            });
        }
        let ty = self
            .registry
            .get(&req.driver)
            .ok_or_else(|| QdevError::UnknownDriver {
                driver: req.driver.clone(),
                known: self
                    .registry
                    .iter()
                    .map(DeviceType::name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
            .clone();
        let bus = self.pick_bus(&ty, req.bus.as_deref())?;
        self.check_id(req.id.as_deref())?;
        let props = ty.validate(&self.globals.apply(&ty, &req.props, false)?)?;
        self.create(&ty, props, req.id.clone(), bus, false, true)
    }

    fn check_id(&self, id: Option<&str>) -> Result<(), QdevError> {
        if let Some(id) = id {
            if !id_wellformed(id) {
                return Err(QdevError::InvalidId(id.to_owned()));
            }
            if self.ids.contains_key(id) {
                return Err(QdevError::DuplicateId(id.to_owned()));
            }
        }
        Ok(())
    }

    fn pick_bus(&self, ty: &DeviceType, name: Option<&str>) -> Result<usize, QdevError> {
        match name {
            Some(name) => {
                let Some(i) = self.buses.iter().position(|b| b.name == name) else {
                    return Err(QdevError::BusNotFound {
                        bus: name.to_owned(),
                        known: self.bus_names(),
                    });
                };
                let b = &self.buses[i];
                if &b.bus_type != ty.bus_type() {
                    return Err(QdevError::WrongBus {
                        driver: ty.name().to_owned(),
                        bus: b.name.clone(),
                        bus_type: b.bus_type.to_string(),
                        needed: ty.bus_type().to_string(),
                    });
                }
                if b.free_slot().is_none() {
                    return Err(QdevError::BusFull(b.name.clone()));
                }
                Ok(i)
            }
            None => self
                .buses
                .iter()
                .position(|b| &b.bus_type == ty.bus_type() && b.free_slot().is_some())
                .ok_or_else(|| QdevError::NoBus {
                    bus_type: ty.bus_type().to_string(),
                    driver: ty.name().to_owned(),
                }),
        }
    }

    fn bus_names(&self) -> String {
        if self.buses.is_empty() {
            return "none".to_owned();
        }
        self.buses
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn free_index(&self, container: &str) -> String {
        let mut n = 0usize;
        loop {
            let p = format!("{container}/device[{n}]");
            if !self.paths.contains_key(&p) {
                return p;
            }
            n += 1;
        }
    }

    fn create(
        &mut self,
        ty: &DeviceType,
        props: Props,
        id: Option<String>,
        bus: usize,
        hotplugged: bool,
        onboard: bool,
    ) -> Result<Added, QdevError> {
        if self.devices.len() >= self.max_devices {
            return Err(QdevError::TooManyDevices(self.max_devices));
        }
        let slot = self.buses[bus]
            .free_slot()
            .ok_or_else(|| QdevError::BusFull(self.buses[bus].name.clone()))?;
        let path = match (&id, onboard) {
            (_, true) => self.free_index("/machine/unattached"),
            (Some(id), false) => format!("/machine/peripheral/{id}"),
            (None, false) => self.free_index("/machine/peripheral-anon"),
        };
        let dev = Device {
            key: DeviceKey(self.next_key),
            id,
            driver: ty.name().to_owned(),
            path,
            bus,
            slot,
            hotplugged,
            onboard,
            props,
            unplug: UnplugState::None,
            deadline: None,
        };
        let b = &mut self.buses[bus];
        let v = view(&dev, &b.name, &b.slots);
        let name = v.name().to_owned();
        if hotplugged && let Some(h) = b.hotplug.as_mut() {
            h.pre_plug(&v).map_err(|source| QdevError::HotplugRefused {
                bus: b.name.clone(),
                device: name.clone(),
                action: "plug",
                source,
            })?;
        }
        self.hooks
            .realize(&v)
            .map_err(|source| QdevError::Realize {
                driver: dev.driver.clone(),
                source,
            })?;
        if let Some(h) = b.hotplug.as_mut()
            && let Err(source) = h.plug(&v)
        {
            self.hooks.unrealize(&v);
            return Err(QdevError::HotplugRefused {
                bus: b.name.clone(),
                device: name,
                action: "plug",
                source,
            });
        }
        // Commit: nothing below can fail.
        if let Some(s) = slot.and_then(|i| b.occupied.get_mut(i as usize)) {
            *s = Some(dev.key);
        }
        let added = Added {
            key: dev.key,
            path: dev.path.clone(),
            hotplugged,
            bus: b.name.clone(),
            slot,
            driver: ty.name().to_owned(),
        };
        self.next_key += 1;
        if let Some(id) = &dev.id {
            self.ids.insert(id.clone(), dev.key);
        }
        self.paths.insert(dev.path.clone(), dev.key);
        self.devices.insert(dev.key, dev);
        Ok(added)
    }

    /// Finds a device by id, or by canonical path when `target` starts with `/`.
    pub fn find(&self, target: &str) -> Option<DeviceKey> {
        if target.starts_with('/') {
            self.paths.get(target).copied()
        } else {
            self.ids.get(target).copied()
        }
    }

    /// `device_del`: unknown id or path → `DeviceNotFound`; a pending request is re-sent if
    /// the bus's controller does so ([`HotplugHandler::unplug_request_again`], the timeout
    /// restarts), otherwise "already in the process of unplug". In machine-init a user device goes at once. In machine-ready
    /// the device type must be hotpluggable and the bus must have a handler, which asks the
    /// guest (→ [`DelOutcome::Pending`]) or removes at once.
    pub fn device_del(&mut self, phase: Phase, target: &str) -> Result<DelOutcome, QdevError> {
        if !DEVICE_DEL_PHASES.contains(phase) {
            return Err(QdevError::OutOfPhase {
                command: "device_del",
                current: phase,
                needed: DEVICE_DEL_PHASES,
            });
        }
        let key = self
            .find(target)
            .ok_or_else(|| QdevError::DeviceNotFound(target.to_owned()))?;
        let Some(dev) = self.devices.get(&key) else {
            return Err(QdevError::DeviceNotFound(target.to_owned()));
        };
        if dev.unplug == UnplugState::Pending {
            let b = &mut self.buses[dev.bus];
            let again = match b.hotplug.as_mut() {
                Some(h) => h
                    .unplug_request_again(&view(dev, &b.name, &b.slots))
                    .map_err(|source| QdevError::HotplugRefused {
                        bus: b.name.clone(),
                        device: target.to_owned(),
                        action: "unplug",
                        source,
                    })?,
                None => false,
            };
            if !again {
                return Err(QdevError::UnplugPending(target.to_owned()));
            }
            let deadline = self
                .unplug_timeout
                .map(|t| self.clock.now().saturating_add(t));
            if let Some(d) = self.devices.get_mut(&key) {
                d.deadline = deadline;
            }
            return Ok(DelOutcome::Pending);
        }
        if dev.onboard {
            return Err(QdevError::Onboard(target.to_owned()));
        }
        if self.buses.iter().any(|b| b.parent == dev.path) {
            return Err(QdevError::HasChildBuses(target.to_owned()));
        }
        if phase == Phase::MachineInit {
            self.remove(key);
            return Ok(DelOutcome::Removed);
        }
        if !self
            .registry
            .get(&dev.driver)
            .is_some_and(DeviceType::is_hotpluggable)
        {
            return Err(QdevError::DeviceNoHotplug(dev.driver.clone()));
        }
        let b = &mut self.buses[dev.bus];
        let Some(h) = b.hotplug.as_mut() else {
            return Err(QdevError::BusNoHotplug(b.name.clone()));
        };
        let mode = h
            .unplug_request(&view(dev, &b.name, &b.slots))
            .map_err(|source| QdevError::HotplugRefused {
                bus: b.name.clone(),
                device: target.to_owned(),
                action: "unplug",
                source,
            })?;
        match mode {
            UnplugMode::Immediate => {
                self.remove(key);
                Ok(DelOutcome::Removed)
            }
            UnplugMode::Async => {
                let deadline = self
                    .unplug_timeout
                    .map(|t| self.clock.now().saturating_add(t));
                if let Some(d) = self.devices.get_mut(&key) {
                    d.unplug = UnplugState::Pending;
                    d.deadline = deadline;
                }
                Ok(DelOutcome::Pending)
            }
        }
    }

    /// Removes a device for good: handler unplug, machine unrealize, id/path/slot released,
    /// `DEVICE_DELETED` emitted.
    fn remove(&mut self, key: DeviceKey) -> bool {
        let Some(dev) = self.devices.remove(&key) else {
            return false;
        };
        let b = &mut self.buses[dev.bus];
        let v = view(&dev, &b.name, &b.slots);
        if let Some(h) = b.hotplug.as_mut() {
            h.unplug(&v);
        }
        self.hooks.unrealize(&v);
        if let Some(s) = dev.slot.and_then(|i| b.occupied.get_mut(i as usize)) {
            *s = None;
        }
        if let Some(id) = &dev.id {
            self.ids.remove(id);
        }
        self.paths.remove(&dev.path);
        if let Some(t) = self.registry.get(&dev.driver) {
            for child in t.children() {
                self.events.emit(DeviceEvent::DeviceDeleted {
                    device: None,
                    path: format!("{}/{child}", dev.path),
                });
            }
        }
        self.events.emit(DeviceEvent::DeviceDeleted {
            device: dev.id,
            path: dev.path,
        });
        true
    }

    /// Applies what the guest-side controller reported. `Ejected` removes the device (whatever
    /// its unplug state: a guest may eject late, after a timeout or a refusal); `Refused` ends
    /// a pending request with `DEVICE_UNPLUG_GUEST_ERROR`.
    pub fn guest_answer(&mut self, answer: GuestAnswer) -> Result<(), QdevError> {
        match answer {
            GuestAnswer::Ejected(key) => {
                let Some(d) = self.devices.get(&key) else {
                    return Err(QdevError::DeviceNotFound(format!("#{}", key.0)));
                };
                if self.buses[d.bus].hotplug.is_none() {
                    return Err(QdevError::BusNoHotplug(self.buses[d.bus].name.clone()));
                }
                if d.onboard
                    || !self
                        .registry
                        .get(&d.driver)
                        .is_some_and(DeviceType::is_hotpluggable)
                {
                    return Err(QdevError::DeviceNoHotplug(d.driver.clone()));
                }
                self.remove(key);
                Ok(())
            }
            GuestAnswer::Refused(key) => {
                let Some(d) = self.devices.get_mut(&key) else {
                    return Err(QdevError::DeviceNotFound(format!("#{}", key.0)));
                };
                if d.unplug != UnplugState::Pending {
                    return Err(QdevError::NoPendingUnplug(
                        d.id.clone().unwrap_or_else(|| d.path.clone()),
                    ));
                }
                d.unplug = UnplugState::GuestError;
                d.deadline = None;
                self.events.emit(DeviceEvent::UnplugGuestError {
                    device: d.id.clone(),
                    path: d.path.clone(),
                });
                Ok(())
            }
        }
    }

    /// Ends pending requests whose deadline has passed: state `timed-out`,
    /// `DEVICE_UNPLUG_GUEST_ERROR` emitted. Returns how many. Call it from the event loop when
    /// [`DeviceTree::next_deadline`] passes.
    pub fn poll_timeouts(&mut self) -> usize {
        let now = self.clock.now();
        let mut n = 0;
        for d in self.devices.values_mut() {
            if d.unplug == UnplugState::Pending && d.deadline.is_some_and(|t| t <= now) {
                d.unplug = UnplugState::TimedOut;
                d.deadline = None;
                self.events.emit(DeviceEvent::UnplugGuestError {
                    device: d.id.clone(),
                    path: d.path.clone(),
                });
                n += 1;
            }
        }
        n
    }

    /// The earliest pending unplug deadline, on the tree's clock.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.devices.values().filter_map(|d| d.deadline).min()
    }

    /// System reset: completes the unplug of every device whose request is still outstanding
    /// (`pending` or `timed-out`; QEMU: "guest reset will automatically complete removal"),
    /// then resets the remaining devices in creation order. Returns how many were removed.
    pub fn reset(&mut self) -> usize {
        let outstanding: Vec<DeviceKey> = self
            .devices
            .values()
            .filter(|d| matches!(d.unplug, UnplugState::Pending | UnplugState::TimedOut))
            .map(|d| d.key)
            .collect();
        for k in &outstanding {
            self.remove(*k);
        }
        for d in self.devices.values() {
            let b = &self.buses[d.bus];
            self.hooks.reset(&view(d, &b.name, &b.slots));
        }
        outstanding.len()
    }

    /// The device `key` as hooks see it.
    pub fn view(&self, key: DeviceKey) -> Option<DeviceView<'_>> {
        self.devices.get(&key).map(|d| {
            let b = &self.buses[d.bus];
            view(d, &b.name, &b.slots)
        })
    }

    /// Views of all devices, in creation order.
    pub fn views(&self) -> impl Iterator<Item = DeviceView<'_>> {
        self.devices.values().map(|d| {
            let b = &self.buses[d.bus];
            view(d, &b.name, &b.slots)
        })
    }

    /// Number of devices (including those whose unplug is pending).
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are no devices.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The unplug state of `key`.
    pub fn unplug_state(&self, key: DeviceKey) -> Option<UnplugState> {
        self.devices.get(&key).map(|d| d.unplug)
    }

    pub(crate) fn node(&self, d: &Device) -> DeviceNode {
        let b = &self.buses[d.bus];
        DeviceNode {
            id: d.id.clone(),
            driver: d.driver.clone(),
            path: d.path.clone(),
            bus: b.name.clone(),
            hotplugged: d.hotplugged,
            onboard: d.onboard,
            slot: d.slot,
            resources: b.resources(d.slot).copied(),
            unplug_state: d.unplug,
            props: d.props.clone(),
        }
    }

    /// One device's node, by id or path.
    pub fn query_device(&self, target: &str) -> Option<DeviceNode> {
        self.find(target)
            .and_then(|k| self.devices.get(&k))
            .map(|d| self.node(d))
    }

    /// The device tree: every bus with its devices, hotplugged flags and unplug states.
    pub fn query_tree(&self) -> Vec<BusNode> {
        self.buses
            .iter()
            .enumerate()
            .map(|(i, b)| BusNode {
                name: b.name.clone(),
                bus_type: b.bus_type.to_string(),
                path: b.path.clone(),
                hotpluggable: b.hotplug.is_some(),
                slots: b.capacity(),
                devices: self
                    .devices
                    .values()
                    .filter(|d| d.bus == i)
                    .map(|d| self.node(d))
                    .collect(),
            })
            .collect()
    }
}
