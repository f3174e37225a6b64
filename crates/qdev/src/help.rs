//! The texts of `-device help` and `-device DRIVER,help`, in QEMU 7.2's format, so a user
//! who asks Keel what it offers reads the answer the way QEMU prints it.

use crate::error::QdevError;
use crate::prop::PropValue;
use crate::types::{DeviceType, TypeRegistry};

/// QEMU's device categories, in the order `-device help` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Category {
    /// Host bridges, PCI bridges, hubs.
    Bridge,
    /// USB devices.
    Usb,
    /// Disks and disk controllers.
    Storage,
    /// Network cards.
    Network,
    /// Keyboards, mice, serial ports and consoles.
    Input,
    /// Display adapters.
    Display,
    /// Sound cards.
    Sound,
    /// Everything else with a category (entropy sources, debug ports).
    Misc,
    /// CPUs.
    Cpu,
    /// Watchdogs.
    Watchdog,
    /// Types that declare no category.
    #[default]
    Uncategorized,
}

impl Category {
    /// The heading QEMU prints for the category, without " devices:".
    pub fn heading(self) -> &'static str {
        match self {
            Category::Bridge => "Controller/Bridge/Hub",
            Category::Usb => "USB",
            Category::Storage => "Storage",
            Category::Network => "Network",
            Category::Input => "Input",
            Category::Display => "Display",
            Category::Sound => "Sound",
            Category::Misc => "Misc",
            Category::Cpu => "CPU",
            Category::Watchdog => "Watchdog",
            Category::Uncategorized => "Uncategorized",
        }
    }
}

fn devinfo(t: &DeviceType) -> String {
    // A virtio device's bus type is QEMU's abstract `virtio-bus`, of which the virtio-mmio
    // transport's bus is one kind.
    let bus = match t.bus_type() {
        crate::BusType::VirtioMmio => "virtio-bus",
        other => other.as_str(),
    };
    let mut s = format!("name \"{}\", bus {bus}", t.name());
    if let Some(a) = t.alias_name() {
        s.push_str(&format!(", alias \"{a}\""));
    }
    if let Some(d) = t.desc() {
        s.push_str(&format!(", desc \"{d}\""));
    }
    s
}

impl TypeRegistry {
    /// `-device help`: the user-creatable types by category, sorted by name within each,
    /// a heading per category that has any (QEMU puts a blank line before every heading
    /// but that of its first category).
    pub fn device_help(&self) -> String {
        let mut types: Vec<&DeviceType> = self.iter().filter(|t| t.is_user_creatable()).collect();
        types.sort_by(|a, b| (a.category_of(), a.name()).cmp(&(b.category_of(), b.name())));
        let mut out = String::new();
        let mut last = None;
        for t in types {
            let cat = t.category_of();
            if last != Some(cat) {
                if cat != Category::Bridge {
                    out.push('\n');
                }
                out.push_str(cat.heading());
                out.push_str(" devices:\n");
                last = Some(cat);
            }
            out.push_str(&devinfo(t));
            out.push('\n');
        }
        out
    }

    /// `-device DRIVER,help` (DRIVER may be an alias): the properties, sorted by name, one
    /// line each as `  name=<type>` padded to 24 columns, then ` - description (default:
    /// JSON)`.
    pub fn device_props_help(&self, driver: &str) -> Result<String, QdevError> {
        let t = self.lookup_creatable(driver)?;
        let mut props: Vec<_> = t.props().iter().collect();
        if props.is_empty() {
            return Ok(format!("There are no options for {}.\n", t.name()));
        }
        props.sort_by_key(|p| p.name());
        let mut out = format!("{} options:\n", t.name());
        for p in props {
            let mut line = format!("  {}=<{}>", p.name(), p.kind().type_name());
            let default = p.default_value().map(PropValue::to_json);
            if p.desc().is_some() || default.is_some() {
                while line.len() < 24 {
                    line.push(' ');
                }
                line.push_str(" - ");
            }
            if let Some(d) = p.desc() {
                line.push_str(d);
            }
            if let Some(v) = default {
                line.push_str(&format!(" (default: {v})"));
            }
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BusType, PropSpec};

    fn registry() -> TypeRegistry {
        let mut r = TypeRegistry::new();
        r.register(
            DeviceType::new("virtio-rng-pci", BusType::Pci)
                .alias("virtio-rng")
                .category(Category::Misc)
                .prop(
                    PropSpec::bool("multifunction")
                        .default_bool(false)
                        .description("on/off"),
                )
                .prop(
                    PropSpec::string("addr")
                        .default_str("")
                        .description("Slot and optional function number, example: 06.0 or 06"),
                ),
        )
        .unwrap();
        r.register(
            DeviceType::new("virtio-blk-device", BusType::VirtioMmio).category(Category::Storage),
        )
        .unwrap();
        r.register(DeviceType::new("isa-debug-exit", BusType::Isa).category(Category::Misc))
            .unwrap();
        r.register(DeviceType::new("board-only", BusType::Isa).user_creatable(false))
            .unwrap();
        r
    }

    #[test]
    fn device_help_lists_by_category_like_qemu() {
        assert_eq!(
            registry().device_help(),
            "\nStorage devices:\nname \"virtio-blk-device\", bus virtio-bus\n\
             \nMisc devices:\nname \"isa-debug-exit\", bus ISA\n\
             name \"virtio-rng-pci\", bus PCI, alias \"virtio-rng\"\n"
        );
    }

    #[test]
    fn props_help_pads_like_qemu_and_resolves_aliases() {
        let r = registry();
        let text = r.device_props_help("virtio-rng").unwrap();
        assert_eq!(
            text,
            "virtio-rng-pci options:\n\
             \x20 addr=<str>             - Slot and optional function number, example: 06.0 or 06 (default: \"\")\n\
             \x20 multifunction=<bool>   - on/off (default: false)\n"
        );
        assert_eq!(
            r.device_props_help("isa-debug-exit").unwrap(),
            "There are no options for isa-debug-exit.\n"
        );
        assert!(r.device_props_help("board-only").is_err());
        assert!(r.device_props_help("nope").is_err());
    }
}
