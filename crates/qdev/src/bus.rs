//! Buses: their slots (with the resources each slot gives a device) and the optional hotplug
//! handler that tells the guest about hot-plugged devices and asks it to release them.

use serde::Serialize;

use crate::error::HookError;
use crate::prop::Props;
use crate::types::BusType;

/// A guest-physical (or port) window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a slot gives the device plugged into it (e.g. a virtio-mmio slot's MMIO window and
/// IRQ); firmware tables are built from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SlotResources {
    /// MMIO window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmio: Option<Window>,
    /// Port I/O window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pio: Option<Window>,
    /// Interrupt line (GSI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
}

/// How many devices a bus takes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Slots {
    /// Any number (system bus, ISA bus: devices carry their own addresses).
    Unlimited,
    /// Exactly these slots, indexed from 0; a device takes the lowest free one.
    Fixed(Vec<SlotResources>),
}

/// How an accepted unplug request proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnplugMode {
    /// The guest must release the device; it stays until
    /// [`crate::DeviceTree::guest_answer`] reports the outcome, a reset, or forever (with a
    /// timeout event).
    Async,
    /// The device can go at once (e.g. the slot is powered off).
    Immediate,
}

/// Stable handle of a device instance, never reused within one [`crate::DeviceTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DeviceKey(pub u64);

/// A device as hooks and hotplug handlers see it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    /// Stable handle; give it back in [`crate::GuestAnswer`].
    pub key: DeviceKey,
    /// User id, if any.
    pub id: Option<&'a str>,
    /// Device type name.
    pub driver: &'a str,
    /// Canonical QOM path.
    pub path: &'a str,
    /// Name of the bus it sits on.
    pub bus: &'a str,
    /// Slot index on that bus (fixed-slot buses only).
    pub slot: Option<u32>,
    /// The slot's resources (fixed-slot buses only).
    pub resources: Option<&'a SlotResources>,
    /// Whether it was created in machine-ready.
    pub hotplugged: bool,
    /// Whether the board created it ([`crate::DeviceTree::add_onboard`]).
    pub onboard: bool,
    /// Validated properties, every one present.
    pub props: &'a Props,
}

impl DeviceView<'_> {
    /// The id if it has one, else the path: how messages name the device.
    pub fn name(&self) -> &str {
        self.id.unwrap_or(self.path)
    }
}

/// The guest-facing side of hot plug for one bus (QEMU's `HotplugHandler`): e.g. an ACPI
/// hotplug controller that sets a status bit and raises a GPE. A bus without one refuses hot
/// plug and hot unplug.
///
/// Calls happen with the tree's state consistent and the device not yet (plug) or still
/// (unplug) attached; a handler must not block on the guest.
pub trait HotplugHandler: Send {
    /// Called before realize when hot-plugging; an error refuses the plug.
    fn pre_plug(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        let _ = dev;
        Ok(())
    }
    /// Called after realize, for cold (`dev.hotplugged == false`, usually nothing to do) and
    /// hot devices (tell the guest). An error undoes the realize and refuses the plug.
    fn plug(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError>;
    /// `device_del` on a realized device: ask the guest to release it. An error refuses the
    /// request and leaves the device as it was.
    fn unplug_request(&mut self, dev: &DeviceView<'_>) -> Result<UnplugMode, HookError>;
    /// `device_del` on a device whose asynchronous unplug is still pending. A controller that
    /// re-sends the request (QEMU 7.2's ACPI PCI hot plug raises its GPE again) does so and
    /// returns `Ok(true)`; the default `Ok(false)` keeps the request as it is and the command
    /// fails with "already in the process of unplug". An error refuses the command.
    fn unplug_request_again(&mut self, dev: &DeviceView<'_>) -> Result<bool, HookError> {
        let _ = dev;
        Ok(false)
    }
    /// The device is going away (guest ejected it, reset, immediate unplug, or a cold device
    /// removed before the guest ran); detach it from the guest-visible slot. Runs before the
    /// machine's unrealize.
    fn unplug(&mut self, dev: &DeviceView<'_>);
}

/// Everything needed to create a bus with [`crate::DeviceTree::add_bus`].
pub struct BusSpec {
    /// Unique name, e.g. `virtio-mmio-bus.0`, `isa.0`, `main-system-bus`.
    pub name: String,
    /// Bus type.
    pub bus_type: BusType,
    /// QOM path of the parent object (`/machine` or a device path); the bus's own path is
    /// `PARENT/NAME`.
    pub parent: String,
    /// Slot accounting.
    pub slots: Slots,
    /// Hotplug handler; `None` means cold plug only.
    pub hotplug: Option<Box<dyn HotplugHandler>>,
}

impl std::fmt::Debug for BusSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSpec")
            .field("name", &self.name)
            .field("bus_type", &self.bus_type)
            .field("parent", &self.parent)
            .field("slots", &self.slots)
            .field("hotplug", &self.hotplug.is_some())
            .finish()
    }
}

impl BusSpec {
    /// A bus under `/machine` with unlimited slots and no hotplug handler.
    pub fn new(name: impl Into<String>, bus_type: BusType) -> Self {
        Self {
            name: name.into(),
            bus_type,
            parent: "/machine".to_owned(),
            slots: Slots::Unlimited,
            hotplug: None,
        }
    }
    /// Sets the parent object path.
    pub fn parent(mut self, path: impl Into<String>) -> Self {
        self.parent = path.into();
        self
    }
    /// Gives the bus fixed slots.
    pub fn slots(mut self, slots: Vec<SlotResources>) -> Self {
        self.slots = Slots::Fixed(slots);
        self
    }
    /// Gives the bus a hotplug handler.
    pub fn hotplug(mut self, handler: Box<dyn HotplugHandler>) -> Self {
        self.hotplug = Some(handler);
        self
    }
}
