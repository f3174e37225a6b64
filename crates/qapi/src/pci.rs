//! The PCI buses as the guest sees them (QEMU's `qapi/pci.json`): `query-pci`.

use keel_qmp::Type;
use keel_qmp::schema::{opt, req};
use serde::{Deserialize, Serialize};

use crate::READY;

/// One PCI bus and its functions (QAPI `PciInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciInfo {
    /// Bus number.
    pub bus: i64,
    /// Its functions, by slot and function.
    pub devices: Vec<PciDeviceInfo>,
}

/// One function (QAPI `PciDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// Bus number.
    pub bus: i64,
    /// Slot.
    pub slot: i64,
    /// Function.
    pub function: i64,
    /// Class code.
    pub class_info: PciDeviceClass,
    /// Identification.
    pub id: PciDeviceId,
    /// The IRQ its interrupt pin is routed to, if it has a pin.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub irq: Option<i64>,
    /// Interrupt pin (0: none, 1: INTA, ...).
    pub irq_pin: i64,
    /// The device's qdev id (empty without one).
    pub qdev_id: String,
    /// The BARs that decode.
    pub regions: Vec<PciMemoryRegion>,
}

/// QAPI `PciDeviceClass`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceClass {
    /// The class's name, where QEMU has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub desc: Option<String>,
    /// Base class and subclass.
    pub class: i64,
}

/// QAPI `PciDeviceId`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceId {
    /// Device ID.
    pub device: i64,
    /// Vendor ID.
    pub vendor: i64,
    /// Subsystem ID.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subsystem: Option<i64>,
    /// Subsystem vendor ID.
    #[serde(
        rename = "subsystem-vendor",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub subsystem_vendor: Option<i64>,
}

/// QAPI `PciMemoryRegion`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciMemoryRegion {
    /// BAR index.
    pub bar: i64,
    /// `io` or `memory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Base address.
    pub address: i64,
    /// Size.
    pub size: i64,
    /// Prefetchable (memory BARs).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prefetch: Option<bool>,
    /// 64-bit (memory BARs).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_type_64: Option<bool>,
}

no_args_command!(
    /// `query-pci`: every function on the machine's PCI buses (empty without PCI), as
    /// QEMU's `PciInfo` list; bridges are not reported (Keel has one root bus).
    QueryPci, "query-pci", READY, Vec<PciInfo>,
    Some(Type::array(Type::object("PciInfo", vec![
        req("bus", Type::int()),
        req("devices", Type::array(Type::object("PciDeviceInfo", vec![
            req("bus", Type::int()),
            req("slot", Type::int()),
            req("function", Type::int()),
            req("class_info", Type::object("PciDeviceClass", vec![
                opt("desc", Type::str()),
                req("class", Type::int()),
            ])),
            req("id", Type::object("PciDeviceId", vec![
                req("device", Type::int()),
                req("vendor", Type::int()),
                opt("subsystem", Type::int()),
                opt("subsystem-vendor", Type::int()),
            ])),
            opt("irq", Type::int()),
            req("irq_pin", Type::int()),
            req("qdev_id", Type::str()),
            req("regions", Type::array(Type::object("PciMemoryRegion", vec![
                req("bar", Type::int()),
                req("type", Type::str()),
                req("address", Type::int()),
                req("size", Type::int()),
                opt("prefetch", Type::bool()),
                opt("mem_type_64", Type::bool()),
            ]))),
        ]))),
    ])))
);
