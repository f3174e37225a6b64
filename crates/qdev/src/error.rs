//! The one error type of this crate, with its QMP error class.

use keel_phase::{Phase, PhaseSet};

/// What a machine hook or a hotplug handler returns when it refuses or fails.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the device model. Messages follow QEMU's wording where QEMU
/// has one, and add what is accepted so the user can fix the request.
///
/// Every failing operation of [`crate::DeviceTree`] leaves the tree exactly as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QdevError {
    /// A command came in a phase where it is not valid; the QMP layer formats it as class
    /// `OutOfPhase`.
    #[error("'{command}' is not allowed in phase {current}: it needs {}", needed.describe())]
    OutOfPhase {
        /// The command, e.g. `device_add`.
        command: &'static str,
        /// The phase the machine is in.
        current: Phase,
        /// The phases in which the command is valid.
        needed: PhaseSet,
    },
    /// `driver` was not given.
    #[error("Parameter 'driver' is missing")]
    MissingDriver,
    /// No registered device type has this name.
    #[error("'{driver}' is not a valid device model name (known: {known})")]
    UnknownDriver {
        /// The name asked for.
        driver: String,
        /// The user-creatable types, comma separated.
        known: String,
    },
    /// The type exists but only the board may create it.
    #[error(
        "Parameter 'driver' expects a pluggable device type: '{0}' is created by the board only"
    )]
    NotUserCreatable(String),
    /// A type name given to introspection is abstract.
    #[error("Parameter 'typename' expects a non-abstract device type: '{0}' is abstract")]
    AbstractType(String),
    /// An id that is not an identifier.
    #[error(
        "Parameter 'id' expects an identifier: '{0}' must start with a letter and contain only letters, digits, '-', '.' and '_'"
    )]
    InvalidId(String),
    /// The id is taken by a device that still exists (including one whose unplug is pending).
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    /// A JSON argument has the wrong JSON type.
    #[error("Invalid parameter type for '{param}', expected: {expected}")]
    InvalidType {
        /// The argument name.
        param: String,
        /// The JSON type it needs.
        expected: &'static str,
    },
    /// A `-device` option string that cannot be parsed.
    #[error("Invalid -device option '{text}': {reason}")]
    BadOption {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The device type has no property of this name.
    #[error("Property '{driver}.{property}' not found (accepted: {accepted})")]
    UnknownProperty {
        /// Device type.
        driver: String,
        /// The property asked for.
        property: String,
        /// The properties the type has, comma separated.
        accepted: String,
    },
    /// A property value that does not parse or is out of range.
    #[error("Property '{driver}.{property}' doesn't take value {value}: {expected}")]
    InvalidValue {
        /// Device type.
        driver: String,
        /// Property name.
        property: String,
        /// The value given, quoted as received.
        value: String,
        /// What the property accepts.
        expected: String,
    },
    /// A property without default was not given.
    #[error("Property '{driver}.{property}' is required ({expected})")]
    MissingProperty {
        /// Device type.
        driver: String,
        /// Property name.
        property: String,
        /// What the property accepts.
        expected: String,
    },
    /// `bus=` names no bus.
    #[error("Bus '{bus}' not found (buses: {known})")]
    BusNotFound {
        /// The bus name asked for.
        bus: String,
        /// Existing bus names, comma separated.
        known: String,
    },
    /// The device needs another bus type than the one named.
    #[error(
        "Device '{driver}' can't go on {bus_type} bus '{bus}': it needs a bus of type {needed}"
    )]
    WrongBus {
        /// Device type.
        driver: String,
        /// The bus named with `bus=`.
        bus: String,
        /// That bus's type.
        bus_type: String,
        /// The bus type the device needs.
        needed: String,
    },
    /// The named bus has no free slot.
    #[error("Bus '{0}' is full")]
    BusFull(String),
    /// No bus of the needed type exists, or all are full.
    #[error("No '{bus_type}' bus found for device '{driver}' (none exists or all are full)")]
    NoBus {
        /// Bus type needed.
        bus_type: String,
        /// Device type.
        driver: String,
    },
    /// A bus with this name already exists.
    #[error("Bus '{0}' already exists")]
    DuplicateBus(String),
    /// A bus name that is empty or contains `/`.
    #[error("Invalid bus name '{0}': it must be non-empty and contain no '/'")]
    InvalidBusName(String),
    /// A bus's parent path names nothing.
    #[error("Cannot attach bus '{bus}' to '{parent}': no such object")]
    BadBusParent {
        /// Bus name.
        bus: String,
        /// The parent path given.
        parent: String,
    },
    /// A device type with this name is already registered.
    #[error("device type '{0}' is already registered")]
    DuplicateType(String),
    /// Hot plug or hot unplug on a bus without a hotplug handler.
    #[error("Bus '{0}' does not support hotplugging")]
    BusNoHotplug(String),
    /// Hot plug or hot unplug of a type that is not hotpluggable.
    #[error("Device '{0}' does not support hotplugging")]
    DeviceNoHotplug(String),
    /// The tree holds as many devices as it is allowed to.
    #[error("Too many devices: the limit is {0}")]
    TooManyDevices(usize),
    /// No device (or QOM object) with this id or path; QMP class `DeviceNotFound`.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// `device_del` while an unplug request is still pending.
    #[error("Device {0} is already in the process of unplug")]
    UnplugPending(String),
    /// A guest answer (refusal) for a device that has no pending unplug request.
    #[error("Device '{0}' has no pending unplug request")]
    NoPendingUnplug(String),
    /// `device_del` of a device the board created.
    #[error("Device '{0}' is part of the board and cannot be removed")]
    Onboard(String),
    /// `device_del` of a device that other buses hang off.
    #[error("Device '{0}' has child buses and cannot be removed")]
    HasChildBuses(String),
    /// A `-global` value the device type refuses (QEMU's wording).
    #[error("can't apply global {driver}.{property}={value}: {reason}")]
    Global {
        /// The global's driver.
        driver: String,
        /// The global's property.
        property: String,
        /// The global's value.
        value: String,
        /// Why the type refuses it (part of the message, not a separate source).
        reason: Box<QdevError>,
    },
    /// The machine's realize hook failed.
    #[error("Device '{driver}' could not be realized")]
    Realize {
        /// Device type.
        driver: String,
        /// The hook's error.
        #[source]
        source: HookError,
    },
    /// The bus's hotplug handler refused the plug or the unplug request.
    #[error("Bus '{bus}' refused to {action} device '{device}'")]
    HotplugRefused {
        /// Bus name.
        bus: String,
        /// Device id or path.
        device: String,
        /// `plug` or `unplug`.
        action: &'static str,
        /// The handler's reason.
        #[source]
        source: HookError,
    },
    /// The machine refused the device with a message of its own, given as is (QEMU words
    /// some refusals without a prefix, e.g. PCI's "function 0 already occupied" rule).
    #[error("{0}")]
    MachineRefused(String),
    /// A partial QOM path that matches more than one object.
    #[error("Path '{0}' is ambiguous")]
    AmbiguousPath(String),
    /// A QOM property that does not exist on the object.
    #[error("Property '{path}.{property}' not found")]
    PropertyNotFound {
        /// Object path.
        path: String,
        /// Property name.
        property: String,
    },
}

impl QdevError {
    /// The QMP error class: `OutOfPhase`, `DeviceNotFound`, or `GenericError`.
    pub fn qmp_class(&self) -> &'static str {
        match self {
            QdevError::OutOfPhase { .. } => "OutOfPhase",
            QdevError::DeviceNotFound(_) => "DeviceNotFound",
            _ => "GenericError",
        }
    }

    /// The QMP `desc`: this error's message followed by its sources, joined by `: `.
    pub fn qmp_desc(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}
