//! A qdev-like device model: typed properties, buses, cold and hot plug decided by the
//! machine phase, unplug as a state machine, and QOM-shaped introspection.
//!
//! * [`TypeRegistry`] holds [`DeviceType`]s: name, bus type, typed [`PropSpec`]s with defaults
//!   and validation, description, hotpluggable flag.
//! * [`DeviceTree`] holds buses ([`BusSpec`], each with slots and an optional
//!   [`HotplugHandler`]) and device instances with ids and canonical paths
//!   (`/machine/peripheral/ID`, `/machine/peripheral-anon/device[N]`,
//!   `/machine/unattached/device[N]`). The machine attaches devices to real buses through
//!   [`DeviceHooks`].
//! * `-device` strings and QMP `device_add` arguments become one [`DeviceRequest`];
//!   [`DeviceTree::device_add`] decides cold or hot plug from the [`Phase`](keel_phase::Phase)
//!   alone, and changes nothing when it fails.
//! * [`DeviceTree::device_del`] on a hotplug bus starts an unplug request: the guest's
//!   [`GuestAnswer`], a timeout ([`Clock`]), or a reset ends it, with `DEVICE_DELETED` /
//!   `DEVICE_UNPLUG_GUEST_ERROR` through an [`EventSink`].
//! * [`collect_on_machine_ready`] gathers cold devices once for firmware tables.
//!
//! The crate knows nothing of QMP's wire format, accelerators or machines: a custom VMM can
//! use it alone. Errors carry their QMP class ([`QdevError::qmp_class`]).

#![deny(missing_docs)]

mod bus;
mod cold;
mod error;
mod events;
mod prop;
mod qom;
mod request;
mod tree;
mod types;

pub use bus::{
    BusSpec, DeviceKey, DeviceView, HotplugHandler, SlotResources, Slots, UnplugMode, Window,
};
pub use cold::{ColdDevice, ColdSnapshot, DeviceFilter, collect_on_machine_ready};
pub use error::{HookError, QdevError};
pub use events::{Clock, DeviceEvent, EventLog, EventSink, ManualClock, MonotonicClock, NoEvents};
pub use prop::{PropKind, PropSpec, PropValue, Props, parse_bool, parse_int, parse_size};
pub use request::{DeviceRequest, RawValue, id_wellformed};
pub use tree::{
    Added, BusNode, DEFAULT_MAX_DEVICES, DEFAULT_UNPLUG_TIMEOUT, DEVICE_ADD_PHASES,
    DEVICE_DEL_PHASES, DelOutcome, DeviceHooks, DeviceNode, DeviceTree, GuestAnswer, NoHooks,
    ONBOARD_PHASES, UnplugState,
};
pub use types::{BusType, DeviceType, ObjectPropertyInfo, ObjectTypeInfo, TypeRegistry};
