//! Devices: plug, unplug, introspection (QEMU's `qapi/qdev.json`).

use keel_phase::{Phase, PhaseSet};
use keel_qmp::schema::{opt, req};
use keel_qmp::{Builtin, Command, Type};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ANY;
use crate::qom::{ObjectPropertyInfo, object_property_info};

/// `device_add`: cold plug in machine-init, hot plug in machine-ready.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceAdd {
    /// Device model name.
    pub driver: String,
    /// Device id.
    pub id: Option<String>,
    /// Bus to plug into.
    pub bus: Option<String>,
    /// Device properties.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    const PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_device_add-arg",
            members: vec![
                req("driver", Type::str()),
                opt("bus", Type::str()),
                opt("id", Type::str()),
            ],
            extra: Some(Builtin::Any),
        }
    }
}
/// `device_del`: removes a device by id or QOM path (see `keel_qdev::DeviceTree::device_del`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceDel {
    /// Device id or canonical path.
    pub id: String,
}

impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    const PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
    type Output = ();
    fn arguments() -> Type {
        Type::object("q_obj_device_del-arg", vec![req("id", Type::str())])
    }
}
/// `device-list-properties`: the properties a device type accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceListProperties {
    /// Device type name.
    pub typename: String,
}

impl Command for DeviceListProperties {
    const NAME: &'static str = "device-list-properties";
    const PHASES: PhaseSet = ANY;
    type Output = Vec<ObjectPropertyInfo>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_device-list-properties-arg",
            vec![req("typename", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(object_property_info()))
    }
}

/// A bus as `x-query-device-tree` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTreeBus {
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
    pub devices: Vec<DeviceTreeDevice>,
}

/// A device as `x-query-device-tree` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceTreeDevice {
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
    pub resources: Option<Value>,
    /// Unplug state (`none`, `pending`, ...).
    pub unplug_state: String,
    /// Validated properties.
    pub props: Value,
}

no_args_command!(
    /// `x-query-device-tree`: every bus with its devices (path, id, bus, hotplugged,
    /// onboard, slot resources, unplug state, properties).
    XQueryDeviceTree, "x-query-device-tree", ANY, Vec<DeviceTreeBus>,
    Some(Type::array(Type::Object {
        name: "x-DeviceTreeBus",
        members: vec![
            req("name", Type::str()),
            req("type", Type::str()),
            req("path", Type::str()),
            req("hotpluggable", Type::bool()),
            opt("slots", Type::int()),
            req("devices", Type::array(Type::Object {
                name: "x-DeviceTreeDevice",
                members: vec![
                    opt("id", Type::str()),
                    req("type", Type::str()),
                    req("path", Type::str()),
                    req("bus", Type::str()),
                    req("hotplugged", Type::bool()),
                    req("onboard", Type::bool()),
                    opt("slot", Type::int()),
                    opt("resources", Type::any()),
                    req("unplug-state", Type::str()),
                    req("props", Type::any()),
                ],
                extra: None,
            })),
        ],
        extra: None,
    }))
);

fn device_event_data(name: &'static str) -> Type {
    Type::object(
        name,
        vec![opt("device", Type::str()), req("path", Type::str())],
    )
}

/// Data of the DEVICE_DELETED event.
pub fn device_deleted_data() -> Type {
    device_event_data("q_obj_DEVICE_DELETED-arg")
}

/// Data of the DEVICE_UNPLUG_GUEST_ERROR event.
pub fn device_unplug_guest_error_data() -> Type {
    device_event_data("q_obj_DEVICE_UNPLUG_GUEST_ERROR-arg")
}
