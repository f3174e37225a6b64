//! The qdev types of the virtio-pci devices: `virtio-blk-pci`, `virtio-net-pci`,
//! `virtio-rng-pci` and `virtio-serial-pci`, on a bus of type `PCI` (`bus=pci.0`).
//!
//! Each takes the PCI properties `addr=SLOT[.FUNCTION]` (hexadecimal, as QEMU: `addr=04`,
//! `addr=0x4.1`, `addr=4.0`; empty picks the first free slot; from QMP a JSON string — the
//! integer devfn form QEMU also takes is not accepted) and `multifunction=on|off`,
//! plus the properties of its virtio back end, which keep their meaning and their typed
//! constructors ([`keel_virtio::BlockProps::from_props`],
//! [`keel_virtio::NetProps::from_props`] work on these types' properties too). `id=` and
//! `bus=` are the device model's own. The PCI part becomes a [`PciDeviceProps`].

use keel_qdev::{BusType, DeviceType, PropSpec, Props};
use keel_virtio::{Block, Console, Net, Rng};

use crate::{PciAddress, PciError};

/// The validated PCI properties of a device (`addr=`, `multifunction=`,
/// `disable-legacy=`, `disable-modern=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciDeviceProps {
    /// Where the guest sees the function; `None` lets the machine pick a free slot.
    pub addr: Option<PciAddress>,
    /// Sets the multifunction bit of the function's header type.
    pub multifunction: bool,
    /// `disable-legacy`: `Some(true)` on, `Some(false)` off, `None` auto (the legacy
    /// interface on a conventional PCI bus such as `pc`'s, when the device has one).
    pub disable_legacy: Option<bool>,
    /// `disable-modern`.
    pub disable_modern: bool,
    /// `acpi-index` (0: none).
    pub acpi_index: u32,
}

impl PciDeviceProps {
    /// From the properties a type of [`virtio_pci_type`] validated; parses `addr`.
    pub fn from_props(props: &Props) -> Result<Self, PciError> {
        let addr = match props.str("addr").map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(PciAddress::parse(text)?),
        };
        let disable_legacy = match props.str("disable-legacy") {
            Some("on") => Some(true),
            Some("off") => Some(false),
            _ => None,
        };
        Ok(Self {
            addr,
            multifunction: props.bool("multifunction").unwrap_or(false),
            disable_legacy,
            disable_modern: props.bool("disable-modern").unwrap_or(false),
            acpi_index: props
                .u64("acpi-index")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
        })
    }

    /// The interfaces of a device of virtio `device_type` with these properties (QEMU's
    /// defaults on `pc`: both, where Keel's device has a legacy interface).
    pub fn interfaces(&self, device_type: u32) -> crate::Interfaces {
        crate::Interfaces {
            legacy: match self.disable_legacy {
                Some(off) => !off,
                None => crate::legacy_capable(device_type),
            },
            modern: !self.disable_modern,
        }
    }
}

/// The child every virtio-pci device holds, as QEMU's proxies hold their virtio device: its
/// `DEVICE_DELETED` (`PATH/virtio-backend`, no id) precedes the device's own.
pub const VIRTIO_BACKEND: &str = "virtio-backend";

/// A virtio-pci type named `name` for the back end described by `backend` (its
/// properties are copied), with the PCI properties added. Hotpluggable, with a
/// [`VIRTIO_BACKEND`] child.
pub fn virtio_pci_type(name: &str, backend: &DeviceType, description: &str) -> DeviceType {
    let mut t =
        DeviceType::new(name, BusType::Pci)
            .category(backend.category_of())
            .description(description)
            .hotpluggable(true)
            .child(VIRTIO_BACKEND)
            .prop(
                PropSpec::string("addr")
                    .default_str("")
                    .description("Slot and optional function number, example: 06.0 or 06"),
            )
            .prop(
                PropSpec::bool("multifunction")
                    .default_bool(false)
                    .description("on/off (sets the multifunction bit of function 0)"),
            )
            .prop(PropSpec::uint32("acpi-index").default_u64(0).description(
                "the guest's ACPI index of the function (0: none; Linux's acpi_index)",
            ))
            .prop(
                PropSpec::enumeration("disable-legacy", ["on", "off", "auto"])
                    .default_str("auto")
                    .description("on/off/auto (auto: the legacy I/O interface in BAR0 on pc)"),
            )
            .prop(
                PropSpec::bool("disable-modern")
                    .default_bool(false)
                    .description("on/off (no modern interface: BAR4 and its capabilities)"),
            );
    for p in backend.props() {
        t = t.prop(p.clone());
    }
    t
}

/// The virtio-pci qdev types: `virtio-blk-pci`, `virtio-net-pci`, `virtio-rng-pci`,
/// `virtio-serial-pci` (whose `virtconsole` port type stays keel-virtio's), each with
/// QEMU's x86 alias (`virtio-blk`, ...: the name without `-pci`).
pub fn qdev_types() -> Vec<DeviceType> {
    let types = vec![
        virtio_pci_type(
            "virtio-blk-pci",
            &Block::qdev_type(),
            "virtio block device over PCI (raw image)",
        ),
        virtio_pci_type(
            "virtio-net-pci",
            &Net::qdev_type(),
            "virtio network device over PCI (tap or user backend)",
        ),
        virtio_pci_type(
            "virtio-rng-pci",
            &Rng::qdev_type(),
            "virtio entropy device over PCI (host /dev/urandom)",
        ),
        virtio_pci_type(
            "virtio-serial-pci",
            &Console::qdev_type(),
            "virtio console device over PCI; carries one virtconsole port",
        ),
    ];
    types
        .into_iter()
        .map(|t| match t.name().strip_suffix("-pci") {
            Some(short) => {
                let short = short.to_owned();
                t.alias(short)
            }
            None => t,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_qdev::{RawValue, TypeRegistry};
    use keel_virtio::{BlockProps, NetProps};

    fn validate(t: &DeviceType, raw: &[(&str, &str)]) -> Result<Props, keel_qdev::QdevError> {
        let raw: Vec<_> = raw
            .iter()
            .map(|(k, v)| ((*k).to_owned(), RawValue::Str((*v).to_owned())))
            .collect();
        t.validate(&raw)
    }

    fn find(name: &str) -> DeviceType {
        qdev_types().into_iter().find(|t| t.name() == name).unwrap()
    }

    #[test]
    fn types_register_on_the_pci_bus() {
        let mut r = TypeRegistry::new();
        for t in qdev_types() {
            assert_eq!(t.bus_type(), &BusType::Pci);
            assert!(t.is_hotpluggable());
            assert_eq!(t.children(), [VIRTIO_BACKEND]);
            let kind = |n: &str| {
                let p = t.props().iter().find(|p| p.name() == n).unwrap();
                p.kind().type_name().to_owned()
            };
            // QEMU's types, as device-list-properties and -device help show them.
            assert_eq!(kind("disable-legacy"), "OnOffAuto");
            assert_eq!(kind("disable-modern"), "bool");
            assert_eq!(kind("acpi-index"), "uint32");
            r.register(t).unwrap();
        }
    }

    #[test]
    fn addr_forms_and_backend_props() {
        let t = find("virtio-blk-pci");
        for (text, slot, function) in [
            ("04", 4, 0),
            ("0x4.1", 4, 1),
            ("4.0", 4, 0),
            ("1f.7", 31, 7),
        ] {
            let p = validate(&t, &[("drive", "d0"), ("addr", text)]).unwrap();
            let pci = PciDeviceProps::from_props(&p).unwrap();
            assert_eq!(pci.addr, PciAddress::new(slot, function), "{text}");
        }
        let p = validate(
            &t,
            &[("drive", "d0"), ("multifunction", "on"), ("serial", "s1")],
        )
        .unwrap();
        let pci = PciDeviceProps::from_props(&p).unwrap();
        assert_eq!(
            pci,
            PciDeviceProps {
                addr: None,
                multifunction: true,
                disable_legacy: None,
                disable_modern: false,
                acpi_index: 0,
            }
        );
        assert_eq!(pci.interfaces(2), crate::Interfaces::TRANSITIONAL);
        assert_eq!(
            pci.interfaces(1),
            crate::Interfaces::MODERN,
            "net: modern only"
        );
        let legacy_only = validate(
            &t,
            &[
                ("drive", "d0"),
                ("disable-legacy", "off"),
                ("disable-modern", "on"),
            ],
        )
        .unwrap();
        let i = PciDeviceProps::from_props(&legacy_only)
            .unwrap()
            .interfaces(2);
        assert!(i.legacy && !i.modern);
        assert!(validate(&t, &[("drive", "d0"), ("disable-legacy", "maybe")]).is_err());
        let blk = BlockProps::from_props(&p).unwrap();
        assert_eq!(
            (blk.drive.as_str(), blk.serial.as_deref()),
            ("d0", Some("s1"))
        );
        let p = validate(&t, &[("drive", "d0"), ("addr", "20")]).unwrap();
        assert!(matches!(
            PciDeviceProps::from_props(&p),
            Err(PciError::BadAddress(_))
        ));
        assert!(
            validate(&t, &[("addr", "04")]).is_err(),
            "drive is required"
        );
        let t = find("virtio-net-pci");
        let p = validate(&t, &[("netdev", "n0"), ("mac", "52:54:00:00:00:07")]).unwrap();
        assert_eq!(NetProps::from_props(&p).unwrap().mac[5], 7);
        let t = find("virtio-rng-pci");
        assert!(validate(&t, &[("addr", "5"), ("multifunction", "off")]).is_ok());
        assert!(validate(&t, &[("bogus", "1")]).is_err());
    }
}
