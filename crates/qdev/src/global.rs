//! QEMU's `-global`: default property values for every device of a type created later,
//! whether by the board, `-device` or `device_add`.
//!
//! A global applies to a device of exactly its driver's type, under a property the request
//! does not set itself (a device's own properties win, as in QEMU, where globals are set
//! first and `-device`'s properties over them). Its value is checked as the device's own
//! would be, when a device of that type is created: a cold-plugged or onboard device then
//! fails with QEMU's "can't apply global" message; a hot-plugged one is created without it
//! and the failure is a warning, as QEMU 7.2 does. A global whose driver names no type at
//! all is reported once the machine is ready (QEMU's "has invalid class name" warning).

use crate::error::QdevError;
use crate::request::RawValue;
use crate::types::DeviceType;

/// One `-global DRIVER.PROPERTY=VALUE` (or `-global driver=D,property=P,value=V`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalProp {
    /// The device type it applies to.
    pub driver: String,
    /// The property it sets.
    pub property: String,
    /// The value, in `-device` syntax.
    pub value: String,
}

/// Device classes of QEMU's x86 machines that Keel's machines do not model. QEMU accepts a
/// global for a class that has no device, silently; so does Keel for these, since no device
/// of theirs will ever be created (e.g. libvirt's `-global kvm-pit.lost_tick_policy=delay`:
/// Keel's PIT never loses ticks to catch up on).
pub const QEMU_ONLY_CLASSES: &[&str] = &[
    "kvm-pit",
    "isa-pit",
    "kvm-i8259",
    "isa-i8259",
    "ioapic",
    "kvm-ioapic",
    "kvmclock",
    "kvmvapic",
    "hpet",
    "fw_cfg_io",
    "fw_cfg_mem",
    "cfi.pflash01",
    "ICH9-LPC",
    "isa-fdc",
    "piix3-ide",
    "ide-hd",
    "ide-cd",
    "VGA",
    "cirrus-vga",
    "qxl-vga",
    "usb-tablet",
    "piix3-usb-uhci",
    "e1000",
    "rtl8139",
    "pvpanic",
    "vmport",
];

impl GlobalProp {
    /// Reads QEMU's two spellings: `DRIVER.PROPERTY=VALUE`, where the value is everything
    /// after the first `=` (commas included), or the option form
    /// `driver=D,property=P,value=V`. The error is QEMU's wording.
    pub fn parse(text: &str) -> Result<Self, String> {
        // QEMU: sscanf("%63[^.=].%63[^=]%n") followed by '='.
        if let Some((head, value)) = text.split_once('=')
            && let Some((driver, property)) = head.split_once('.')
            && !driver.is_empty()
            && !property.is_empty()
        {
            return Ok(Self {
                driver: driver.to_owned(),
                property: property.to_owned(),
                value: value.to_owned(),
            });
        }
        let pairs = crate::keyval::parse(text, None)
            .map(crate::keyval::Options::into_vec)
            .map_err(|e| e.to_string())?;
        let (mut driver, mut property, mut value) = (None, None, None);
        for (k, v) in pairs {
            match k.as_str() {
                "driver" => driver = Some(v),
                "property" => property = Some(v),
                "value" => value = Some(v),
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        let missing = |k: &str| format!("Parameter '{k}' is missing");
        Ok(Self {
            driver: driver.ok_or_else(|| missing("driver"))?,
            property: property.ok_or_else(|| missing("property"))?,
            value: value.ok_or_else(|| missing("value"))?,
        })
    }

    /// Whether it applies to devices of `ty` (its name or its alias).
    pub fn applies_to(&self, ty: &DeviceType) -> bool {
        self.driver == ty.name() || ty.alias_name() == Some(self.driver.as_str())
    }
}

/// The globals of a tree, and which of them a device used.
#[derive(Debug, Default, Clone)]
pub(crate) struct Globals {
    list: Vec<GlobalProp>,
}

impl Globals {
    pub(crate) fn set(&mut self, list: Vec<GlobalProp>) {
        self.list = list;
    }

    /// `raw` with the globals for `ty` that it does not set itself added (the last global
    /// for a property wins). A global the type refuses fails the creation, unless `hot`:
    /// then it is left out with a warning (QEMU 7.2's `device_add` does the same).
    pub(crate) fn apply(
        &self,
        ty: &DeviceType,
        raw: &[(String, RawValue)],
        hot: bool,
    ) -> Result<Vec<(String, RawValue)>, QdevError> {
        let mut out: Vec<(String, RawValue)> = Vec::new();
        for g in self.list.iter().filter(|g| g.applies_to(ty)) {
            if raw.iter().any(|(k, _)| *k == g.property) {
                continue;
            }
            let value = RawValue::Str(g.value.clone());
            match ty.check_prop(&g.property, &value) {
                Ok(()) => {
                    out.retain(|(k, _)| *k != g.property);
                    out.push((g.property.clone(), value));
                }
                Err(source) => {
                    let e = QdevError::Global {
                        driver: g.driver.clone(),
                        property: g.property.clone(),
                        value: g.value.clone(),
                        reason: Box::new(source),
                    };
                    if !hot {
                        return Err(e);
                    }
                    log::warn!("warning: {e}");
                }
            }
        }
        out.extend(raw.iter().cloned());
        Ok(out)
    }

    /// QEMU's warnings for globals no device type answers to (known: whether a type of
    /// that name exists).
    pub(crate) fn warnings(&self, known: impl Fn(&str) -> bool) -> Vec<String> {
        self.list
            .iter()
            .filter(|g| !known(&g.driver) && !QEMU_ONLY_CLASSES.contains(&g.driver.as_str()))
            .map(|g| {
                format!(
                    "warning: global {}.{} has invalid class name",
                    g.driver, g.property
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prop::PropSpec;
    use crate::types::BusType;

    fn ty() -> DeviceType {
        DeviceType::new("dev", BusType::System).prop(PropSpec::uint32("n").default_u64(1))
    }

    fn g(text: &str) -> GlobalProp {
        GlobalProp::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn both_spellings_parse_and_the_dotted_value_keeps_its_commas() {
        assert_eq!(
            g("virtio-blk-pci.serial=a,b"),
            GlobalProp {
                driver: "virtio-blk-pci".into(),
                property: "serial".into(),
                value: "a,b".into()
            }
        );
        assert_eq!(
            g("driver=PIIX4_PM,property=disable_s3,value=1"),
            g("PIIX4_PM.disable_s3=1")
        );
        for (bad, want) in [
            ("foo", "Invalid parameter 'foo'"),
            ("driver=a,value=1", "Parameter 'property' is missing"),
            ("a.b", "Invalid parameter 'a.b'"),
        ] {
            let e = GlobalProp::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn globals_fill_unset_properties_and_the_device_wins() {
        let mut gl = Globals::default();
        gl.set(vec![g("dev.n=5"), g("other.n=9")]);
        let t = ty();
        let props = t.validate(&gl.apply(&t, &[], false).unwrap()).unwrap();
        assert_eq!(props.u64("n"), Some(5));
        let own = [("n".to_owned(), RawValue::Str("7".into()))];
        let props = t.validate(&gl.apply(&t, &own, false).unwrap()).unwrap();
        assert_eq!(props.u64("n"), Some(7));
    }

    #[test]
    fn a_bad_global_fails_a_cold_device_and_is_dropped_from_a_hot_one() {
        let mut gl = Globals::default();
        gl.set(vec![g("dev.nope=1"), g("dev.n=x")]);
        let t = ty();
        let e = gl.apply(&t, &[], false).unwrap_err().to_string();
        assert!(
            e.starts_with("can't apply global dev.nope=1: Property 'dev.nope' not found"),
            "{e}"
        );
        let hot = gl.apply(&t, &[], true).unwrap();
        assert!(hot.is_empty(), "{hot:?}");
        assert_eq!(
            gl.warnings(|d| d == "dev"),
            Vec::<String>::new(),
            "a known class"
        );
        gl.set(vec![g("foo.bar=1"), g("kvm-pit.lost_tick_policy=delay")]);
        assert_eq!(
            gl.warnings(|d| d == "dev"),
            vec!["warning: global foo.bar has invalid class name".to_owned()]
        );
    }
}
