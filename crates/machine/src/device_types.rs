//! The device types Keel's machines offer, as the qdev device model (`keel-qdev`) sees them.
//!
//! Each type is defined once, next to its implementation (`keel-devices`, `keel-virtio`):
//! its name, bus, properties with defaults and ranges, and a typed constructor from the
//! validated properties. This module only lists them for the boards; the device *semantics*
//! (ids, paths, phases, cold/hot plug, unplug) are `keel-qdev`'s, and the realize hooks that
//! put a device into a machine live with the machine (`crate::microvm_board`).
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

use keel_devices::{AcpiGed, DebugExit, I8042, Rtc, Serial};
use keel_qdev::{DeviceTree, NoHooks, TypeRegistry};
use keel_virtio::{Block, Console, MmioTransport, Net, Rng};

/// The device types Keel knows: what `-device help`-like introspection
/// (`qom-list-types`, `device-list-properties`) reports, for every machine. User-creatable
/// types first, then the onboard ones the boards create.
pub fn registry() -> TypeRegistry {
    let mut r = TypeRegistry::new();
    let types = [
        DebugExit::qdev_type(),
        Block::qdev_type(),
        Rng::qdev_type(),
        Net::qdev_type(),
        Console::qdev_type(),
        Console::port_qdev_type(),
        Serial::qdev_type(),
        I8042::qdev_type(),
        Rtc::qdev_type(),
        AcpiGed::qdev_type(),
        MmioTransport::qdev_type(),
    ];
    for t in types {
        // Static, distinct names: registration cannot fail.
        if let Err(e) = r.register(t) {
            log::error!("device type registration failed: {e}");
        }
    }
    r
}

/// Every device type some machine of Keel's offers (the PCI ones come with `pc`): what
/// `-device help` lists, since, as in QEMU, it answers before any machine is chosen.
pub fn offered() -> TypeRegistry {
    let mut r = registry();
    for t in keel_pci::qdev_types() {
        if r.get(t.name()).is_none()
            && let Err(e) = r.register(t)
        {
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
    fn every_type_of_the_device_crates_is_offered() {
        let r = registry();
        for t in keel_devices::qdev_types()
            .into_iter()
            .chain(keel_virtio::qdev_types())
        {
            assert!(r.get(t.name()).is_some(), "{} missing", t.name());
        }
    }

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
            t.qom_list_types(None, false)
                .iter()
                .any(|i| i.name == "virtio-blk-device")
        );
    }
}
