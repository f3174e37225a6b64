//! The device types Keel's machines offer, as the qdev device model (`keel-qdev`) sees them.
//!
//! The device *semantics* (ids, paths, phases, cold/hot plug, unplug) are `keel-qdev`'s; the
//! device *behaviour* is `keel-virtio`'s and `keel-devices`'; the machine-specific realize
//! hooks live with the machine (`crate::microvm_board`).
//!
//! # Console
//!
//! QEMU's two-step form is accepted as it is written for QEMU:
//! `-device virtio-serial-device[,id=S] -chardev file,id=c0,path=out.txt
//! -device virtconsole,chardev=c0`. `virtio-serial-device` takes a virtio-mmio slot and
//! gets a child bus of type `virtio-serial-bus` (named `S.0`, or `virtio-serial-bus.N`
//! after its slot without an id) with room for **one** port, because `keel-virtio`'s
//! console is a single-port device (no multiport, no control queue): the guest sees one
//! console, `hvc0`. Until a `virtconsole` is plugged, the device's output is dropped.

use std::sync::Arc;

use keel_qdev::{BusType, DeviceTree, DeviceType, NoHooks, PropSpec, TypeRegistry};

/// Driver name of the single-port virtio console (see the module documentation).
pub const CONSOLE_DRIVER: &str = "virtconsole";

/// Driver name of the virtio console device that carries the `virtconsole` port.
pub const SERIAL_DRIVER: &str = "virtio-serial-device";

/// The bus a `virtio-serial-device` provides for its port.
pub fn serial_bus_type() -> BusType {
    BusType::Other("virtio-serial-bus".to_owned())
}

/// Name of the port bus of a `virtio-serial-device` with `id` in virtio-mmio window
/// `window` (QEMU names it after the id, else after the bus type and a counter; Keel uses
/// the window index as the counter, so names stay unique).
pub fn serial_bus_name(id: Option<&str>, window: Option<usize>) -> String {
    match id {
        Some(id) => format!("{id}.0"),
        None => format!("virtio-serial-bus.{}", window.unwrap_or(0)),
    }
}

/// Type name of the onboard virtio-mmio transports (QEMU's `virtio-mmio`).
pub const VIRTIO_MMIO_TRANSPORT: &str = "virtio-mmio";

/// The device types Keel knows: what `-device help`-like introspection
/// (`qom-list-types`, `device-list-properties`) reports, for every machine.
pub fn registry() -> TypeRegistry {
    let mut r = TypeRegistry::new();
    let types = [
        DeviceType::new("isa-debug-exit", BusType::Isa)
            .description(
                "ISA debug exit device: a guest write of V ends the VMM with status (V<<1)|1",
            )
            .prop(
                PropSpec::uint32("iobase")
                    .default_u64(0x501)
                    .range(0, 0xffff)
                    .description("first I/O port"),
            )
            .prop(
                PropSpec::uint32("iosize")
                    .default_u64(2)
                    .range(1, 4)
                    .description("number of I/O ports (1, 2 or 4)"),
            ),
        DeviceType::new("virtio-blk-device", BusType::VirtioMmio)
            .description("virtio block device (raw image)")
            .prop(PropSpec::string("drive").description("block backend node name (blockdev-add)"))
            .prop(
                PropSpec::string("serial")
                    .default_str("")
                    .description("serial number the guest reads (at most 20 bytes)"),
            )
            .prop(
                PropSpec::bool("read-only")
                    .default_bool(false)
                    .description("expose the disk read-only"),
            )
            .prop(
                PropSpec::uint16("queue-size")
                    .default_u64(256)
                    .range(2, 1024)
                    .description("virtqueue size (a power of two)"),
            ),
        DeviceType::new("virtio-rng-device", BusType::VirtioMmio)
            .description("virtio entropy device (host /dev/urandom)"),
        DeviceType::new("virtio-net-device", BusType::VirtioMmio)
            .description("virtio network device (tap backend)")
            .prop(PropSpec::string("netdev").description("network backend id (netdev_add)"))
            .prop(
                PropSpec::string("mac")
                    .default_str("52:54:00:12:34:56")
                    .description("guest MAC address"),
            ),
        DeviceType::new(SERIAL_DRIVER, BusType::VirtioMmio)
            .description("virtio console device; carries one virtconsole port"),
        DeviceType::new(CONSOLE_DRIVER, serial_bus_type())
            .description("console port on a virtio-serial-device (hvc0 in Linux)")
            .prop(PropSpec::string("chardev").description("character backend id (chardev-add)")),
        // Onboard devices: the board creates them, users cannot.
        DeviceType::new("isa-serial", BusType::Isa)
            .description("16550A UART (COM1)")
            .user_creatable(false),
        DeviceType::new("i8042", BusType::Isa)
            .description("i8042 keyboard controller")
            .user_creatable(false),
        DeviceType::new("mc146818rtc", BusType::Isa)
            .description("MC146818 real-time clock")
            .user_creatable(false),
        DeviceType::new("acpi-ged", BusType::System)
            .description("ACPI generic event device (power button, sleep control)")
            .user_creatable(false),
        DeviceType::new(VIRTIO_MMIO_TRANSPORT, BusType::System)
            .description("virtio-mmio transport (one virtio-mmio bus each)")
            .user_creatable(false),
    ];
    for t in types {
        // Static, distinct names: registration cannot fail.
        if let Err(e) = r.register(t) {
            log::error!("device type registration failed: {e}");
        }
    }
    r
}

/// A tree with Keel's types and no buses: what the `none` machine has, and what
/// introspection answers before any machine exists.
pub fn empty_tree() -> DeviceTree {
    DeviceTree::new(registry(), Box::new(NoHooks), Arc::new(keel_qdev::NoEvents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_phase::Phase;

    #[test]
    fn types_validate_like_qemu() {
        let mut t = empty_tree();
        // No buses (the none machine): nothing can be added, and the message says why.
        let e = t
            .device_add_cli(Phase::MachineInit, "virtio-rng-device")
            .unwrap_err();
        assert!(e.to_string().contains("virtio-mmio"), "{e}");
        let e = t
            .device_add_cli(Phase::MachineInit, "isa-serial")
            .unwrap_err();
        assert_eq!(e.qmp_class(), "GenericError");
        let props = t.device_list_properties("virtio-blk-device").unwrap();
        assert!(props.iter().any(|p| p.name == "drive"));
        assert!(
            t.qom_list_types(Some("virtio-device"), false)
                .iter()
                .any(|i| i.name == "virtio-blk-device")
                || t.qom_list_types(None, false)
                    .iter()
                    .any(|i| i.name == "virtio-blk-device")
        );
    }
}
