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
//! * [`keyval`] is the one parser of QEMU's option syntax (`a=b,c=d`, `,,`, sizes, on/off)
//!   for `-device`, `-machine`, `-object`, `-chardev` and the backends.
//!
//! ```
//! use std::sync::Arc;
//! use keel_phase::Phase;
//! use keel_qdev::*;
//!
//! let mut types = TypeRegistry::new();
//! types.register(
//!     DeviceType::new("isa-debug-exit", BusType::Isa)
//!         .prop(PropSpec::uint32("iobase").default_u64(0x501))
//!         .prop(PropSpec::uint32("iosize").default_u64(2).range(1, 4)),
//! )?;
//! types.register(DeviceType::new("virtio-rng-device", BusType::VirtioMmio).hotpluggable(true))?;
//!
//! let events = Arc::new(EventLog::new());
//! let mut tree = DeviceTree::new(types, Box::new(NoHooks), events.clone());
//! tree.add_bus(BusSpec::new("isa.0", BusType::Isa))?;
//! let window = SlotResources { mmio: Some(Window { base: 0xfeb0_0000, len: 0x200 }), pio: None, irq: Some(16) };
//! tree.add_bus(BusSpec::new("virtio-mmio-bus.0", BusType::VirtioMmio).slots(vec![window]))?;
//!
//! // Too early: the error carries the command, the phase and the phases it needs.
//! let e = tree.device_add_cli(Phase::AccelCreated, "isa-debug-exit").unwrap_err();
//! assert_eq!(e.qmp_class(), "OutOfPhase");
//!
//! // machine-init: cold plug, from the command line or from QMP, same result.
//! let dbg = tree.device_add_cli(Phase::MachineInit, "isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x04")?;
//! assert_eq!((dbg.path.as_str(), dbg.hotplugged), ("/machine/peripheral/dbg", false));
//! tree.device_add_json(Phase::MachineInit, &serde_json::json!({"driver": "virtio-rng-device"}))?;
//!
//! // Firmware tables see cold devices only.
//! let cold = tree.cold_devices(&DeviceFilter::BusType(BusType::VirtioMmio));
//! assert_eq!(cold[0].resources.unwrap().irq, Some(16));
//!
//! // machine-ready: this bus has no hotplug handler.
//! let e = tree.device_add_cli(Phase::MachineReady, "isa-debug-exit,id=late").unwrap_err();
//! assert_eq!(e.to_string(), "Bus 'isa.0' does not support hotplugging");
//! assert_eq!(tree.qom_get("/machine/peripheral/dbg", "iobase")?, serde_json::json!(0xf4));
//! # Ok::<(), QdevError>(())
//! ```
//!
//! # Unplug state machine
//!
//! ```text
//!  none ──device_del──► pending ──guest Ejected──► (gone: DEVICE_DELETED)
//!   ▲  (Async request)    │ │
//!   │                     │ └──guest Refused──► guest-error ──device_del──► pending
//!   │                     └──deadline passed──► timed-out  ──device_del──► pending
//!   └ device_del with an Immediate handler, or any device in machine-init: gone at once.
//! ```
//!
//! * Each request ends exactly once while it is pending: removed (`DEVICE_DELETED`), refused
//!   or timed out (`DEVICE_UNPLUG_GUEST_ERROR`). Each removed device yields exactly one
//!   `DEVICE_DELETED`.
//! * A guest may still eject a device after a refusal or a timeout; it then goes.
//! * [`DeviceTree::reset`] removes every device whose request is still outstanding
//!   (`pending` or `timed-out`), as QEMU completes removals on reset; `guest-error` devices
//!   stay, since the guest declined and the request was withdrawn.
//! * The id, path and slot of a device are released only when it is gone.
//!
//! The crate knows nothing of QMP's wire format, accelerators or machines: a custom VMM can
//! use it alone. Errors carry their QMP class ([`QdevError::qmp_class`]).

#![deny(missing_docs)]

mod bus;
mod cold;
mod error;
mod events;
mod global;
mod help;
pub mod keyval;
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
pub use global::{GlobalProp, QEMU_ONLY_CLASSES};
pub use help::Category;
pub use keyval::{parse_bool, parse_int, parse_size};
pub use prop::{PropError, PropKind, PropSpec, PropValue, Props};
pub use request::{DeviceRequest, RawValue, id_wellformed};
pub use tree::{
    Added, BusNode, DEFAULT_MAX_DEVICES, DEFAULT_UNPLUG_TIMEOUT, DEVICE_ADD_PHASES,
    DEVICE_DEL_PHASES, DelOutcome, DeviceHooks, DeviceNode, DeviceTree, GuestAnswer, NoHooks,
    ONBOARD_PHASES, UnplugState,
};
pub use types::{BusType, DeviceType, ObjectPropertyInfo, ObjectTypeInfo, TypeRegistry};
