//! Device types and the type registry, with the data `qom-list-types` and
//! `device-list-properties` return.

use crate::help::Category;
use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::error::QdevError;
use crate::prop::{PropSpec, PropValue, Props};
use crate::request::RawValue;

/// The kind of bus a device plugs into. The spellings are QEMU's bus type names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusType {
    /// The system bus (memory-mapped platform devices), QEMU's `System`.
    System,
    /// The ISA bus (port I/O devices), QEMU's `ISA`.
    Isa,
    /// A virtio-mmio transport's bus: one slot per MMIO window, QEMU's `virtio-mmio-bus`.
    VirtioMmio,
    /// A PCI bus, QEMU's `PCI`.
    Pci,
    /// Any other bus a custom VMM defines.
    Other(String),
}

impl BusType {
    /// QEMU's type name of the bus.
    pub fn as_str(&self) -> &str {
        match self {
            BusType::System => "System",
            BusType::Isa => "ISA",
            BusType::VirtioMmio => "virtio-mmio-bus",
            BusType::Pci => "PCI",
            BusType::Other(s) => s,
        }
    }

    /// The abstract device type that devices of this bus derive from (`qom-list-types` parent).
    pub fn device_parent(&self) -> &'static str {
        match self {
            BusType::System => "sys-bus-device",
            BusType::Isa => "isa-device",
            BusType::VirtioMmio => "virtio-device",
            BusType::Pci => "pci-device",
            BusType::Other(_) => "device",
        }
    }
}

impl fmt::Display for BusType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device type: what `-device DRIVER` names.
#[derive(Debug, Clone)]
pub struct DeviceType {
    name: String,
    bus_type: BusType,
    parent: String,
    description: Option<String>,
    hotpluggable: bool,
    user_creatable: bool,
    props: Vec<PropSpec>,
    alias: Option<String>,
    category: Category,
    children: Vec<String>,
    /// The QOM type of a child, where known ([`DeviceType::child_of_type`]).
    child_types: Vec<(String, String)>,
}

impl DeviceType {
    /// A user-creatable, not hotpluggable type without properties.
    pub fn new(name: impl Into<String>, bus_type: BusType) -> Self {
        let parent = bus_type.device_parent().to_owned();
        Self {
            name: name.into(),
            bus_type,
            parent,
            description: None,
            hotpluggable: false,
            user_creatable: true,
            props: Vec::new(),
            alias: None,
            category: Category::Uncategorized,
            children: Vec::new(),
            child_types: Vec::new(),
        }
    }
    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }
    /// Whether instances may be hot-plugged and hot-unplugged (the bus must allow it too).
    pub fn hotpluggable(mut self, yes: bool) -> Self {
        self.hotpluggable = yes;
        self
    }
    /// Whether `-device` / `device_add` may create it; board-only types say no.
    pub fn user_creatable(mut self, yes: bool) -> Self {
        self.user_creatable = yes;
        self
    }
    /// Overrides the parent type name shown by `qom-list-types`.
    pub fn parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = parent.into();
        self
    }
    /// A second name `-device`/`device_add` accept for this type, as QEMU's alias table
    /// gives `virtio-blk` for `virtio-blk-pci` on x86: command lines written for any
    /// machine of the architecture use the short name. The device keeps its type name.
    pub fn alias(mut self, alias: impl Into<String>) -> Self {
        self.alias = Some(alias.into());
        self
    }
    /// The heading `-device help` lists the type under.
    pub fn category(mut self, category: Category) -> Self {
        self.category = category;
        self
    }
    /// The type's category.
    pub fn category_of(&self) -> Category {
        self.category
    }
    /// The alias, if the type has one.
    pub fn alias_name(&self) -> Option<&str> {
        self.alias.as_deref()
    }
    /// Names a child device that every instance holds at `PATH/NAME` (QEMU's virtio-pci
    /// proxies hold their virtio device at `virtio-backend`). The child has no id; when the
    /// instance goes, the child's own `DEVICE_DELETED` (path only) comes first, as in QEMU.
    pub fn child(mut self, name: impl Into<String>) -> Self {
        self.children.push(name.into());
        self
    }
    /// [`DeviceType::child`] with the child's QOM type (`qom-list` shows the child as
    /// `child<TYPE>`, as QEMU shows `virtio-backend` as `child<virtio-rng-device>`).
    pub fn child_of_type(mut self, name: impl Into<String>, type_name: impl Into<String>) -> Self {
        let name = name.into();
        self.child_types.push((name.clone(), type_name.into()));
        self.child(name)
    }
    /// Adds a property.
    pub fn prop(mut self, spec: PropSpec) -> Self {
        self.props.push(spec);
        self
    }

    /// Type name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The bus type it plugs into.
    pub fn bus_type(&self) -> &BusType {
        &self.bus_type
    }
    /// Parent type name.
    pub fn parent_name(&self) -> &str {
        &self.parent
    }
    /// Description.
    pub fn desc(&self) -> Option<&str> {
        self.description.as_deref()
    }
    /// Whether it is hotpluggable.
    pub fn is_hotpluggable(&self) -> bool {
        self.hotpluggable
    }
    /// Whether users may create it.
    pub fn is_user_creatable(&self) -> bool {
        self.user_creatable
    }
    /// The child devices each instance holds (see [`DeviceType::child`]).
    pub fn children(&self) -> &[String] {
        &self.children
    }
    /// The QOM type of child `name`, when the type declared it.
    pub fn child_type(&self, name: &str) -> Option<&str> {
        self.child_types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
    /// Its properties.
    pub fn props(&self) -> &[PropSpec] {
        &self.props
    }

    fn accepted(&self) -> String {
        if self.props.is_empty() {
            "none".to_owned()
        } else {
            self.props
                .iter()
                .map(PropSpec::name)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// Checks one property value as [`DeviceType::validate`] would (used for `-global`).
    pub fn check_prop(&self, name: &str, value: &RawValue) -> Result<(), QdevError> {
        self.validate_one(name, value).map(|_| ())
    }

    fn validate_one(&self, name: &str, value: &RawValue) -> Result<(usize, PropValue), QdevError> {
        let Some(idx) = self.props.iter().position(|p| p.name() == name) else {
            return Err(QdevError::UnknownProperty {
                driver: self.name.clone(),
                property: name.to_owned(),
                accepted: self.accepted(),
            });
        };
        let spec = &self.props[idx];
        let parsed = match value {
            RawValue::Str(s) => spec.parse_str(s),
            RawValue::Json(v) => spec.parse_json(v),
        };
        parsed
            .map(|v| (idx, v))
            .map_err(|e| QdevError::InvalidValue {
                driver: self.name.clone(),
                property: name.to_owned(),
                value: value.quoted(),
                expected: e.expected().to_owned(),
            })
    }

    /// Validates raw properties against this type: every name must exist, every value must
    /// parse, every property without default must be given. The result has every property,
    /// in declaration order. When a name is given twice the last one wins (as QEMU's options).
    pub fn validate(&self, raw: &[(String, RawValue)]) -> Result<Props, QdevError> {
        let mut values: Vec<Option<PropValue>> = self
            .props
            .iter()
            .map(|p| p.default_value().cloned())
            .collect();
        for (name, value) in raw {
            let (idx, v) = self.validate_one(name, value)?;
            values[idx] = Some(v);
        }
        let mut out = Vec::with_capacity(self.props.len());
        for (spec, value) in self.props.iter().zip(values) {
            match value {
                Some(v) => out.push((spec.name().to_owned(), v)),
                None => {
                    return Err(QdevError::MissingProperty {
                        driver: self.name.clone(),
                        property: spec.name().to_owned(),
                        expected: spec.kind().expected(),
                    });
                }
            }
        }
        Ok(Props::from_pairs(out))
    }
}

/// One entry of `qom-list-types` (QAPI `ObjectTypeInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectTypeInfo {
    /// Type name.
    pub name: String,
    /// Present and true for abstract types.
    #[serde(rename = "abstract", skip_serializing_if = "std::ops::Not::not")]
    pub is_abstract: bool,
    /// Parent type name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// One entry of `device-list-properties` / `qom-list` (QAPI `ObjectPropertyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectPropertyInfo {
    /// Property name.
    pub name: String,
    /// Type name, e.g. `uint32`, `bool`, `child<isa-debug-exit>`, `link<ISA>`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Default value.
    #[serde(rename = "default-value", skip_serializing_if = "Option::is_none")]
    pub default_value: Option<serde_json::Value>,
}

/// The set of known device types.
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    types: Vec<DeviceType>,
    index: HashMap<String, usize>,
    aliases: HashMap<String, usize>,
}

impl TypeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a type. Refuses a name already registered (device or abstract) and a property
    /// default that is invalid for its own property.
    pub fn register(&mut self, ty: DeviceType) -> Result<(), QdevError> {
        if self.index.contains_key(&ty.name)
            || self.aliases.contains_key(&ty.name)
            || self.is_abstract(&ty.name)
        {
            return Err(QdevError::DuplicateType(ty.name));
        }
        if let Some(a) = &ty.alias
            && (self.index.contains_key(a) || self.aliases.contains_key(a) || *a == ty.name)
        {
            return Err(QdevError::DuplicateType(format!(
                "{a} (alias of {})",
                ty.name
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &ty.props {
            if let Some(bad) = p.bad_default() {
                return Err(QdevError::InvalidValue {
                    driver: ty.name.clone(),
                    property: p.name().to_owned(),
                    value: format!("'{bad}'"),
                    expected: format!("{} (as its default)", p.kind().expected()),
                });
            }
            if !seen.insert(p.name()) || matches!(p.name(), "id" | "bus" | "driver") {
                return Err(QdevError::DuplicateType(format!(
                    "{}.{} (property defined twice or reserved)",
                    ty.name,
                    p.name()
                )));
            }
        }
        self.index.insert(ty.name.clone(), self.types.len());
        if let Some(a) = &ty.alias {
            self.aliases.insert(a.clone(), self.types.len());
        }
        self.types.push(ty);
        Ok(())
    }

    /// Builder form of [`TypeRegistry::register`].
    pub fn with(mut self, ty: DeviceType) -> Result<Self, QdevError> {
        self.register(ty)?;
        Ok(self)
    }

    /// The type called `name`.
    pub fn get(&self, name: &str) -> Option<&DeviceType> {
        self.index.get(name).map(|&i| &self.types[i])
    }

    /// All types in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &DeviceType> {
        self.types.iter()
    }

    /// Looks up a type for `-device` / `device_add` by its name or its alias: unknown and
    /// board-only types are errors listing what users may create.
    pub fn lookup_creatable(&self, driver: &str) -> Result<&DeviceType, QdevError> {
        let found = self
            .get(driver)
            .or_else(|| self.aliases.get(driver).map(|&i| &self.types[i]));
        match found {
            Some(t) if t.user_creatable => Ok(t),
            Some(_) => Err(QdevError::NotUserCreatable(driver.to_owned())),
            None => Err(QdevError::UnknownDriver {
                driver: driver.to_owned(),
                known: self.creatable_names(),
            }),
        }
    }

    fn creatable_names(&self) -> String {
        let names: Vec<&str> = self
            .types
            .iter()
            .filter(|t| t.user_creatable)
            .map(|t| t.name.as_str())
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }

    /// The abstract types: `device` and the parents of registered types.
    fn abstract_types(&self) -> Vec<ObjectTypeInfo> {
        let mut out = vec![ObjectTypeInfo {
            name: "device".to_owned(),
            is_abstract: true,
            parent: None,
        }];
        for t in &self.types {
            if t.parent != "device" && !out.iter().any(|o| o.name == t.parent) {
                out.push(ObjectTypeInfo {
                    name: t.parent.clone(),
                    is_abstract: true,
                    parent: Some("device".to_owned()),
                });
            }
        }
        out
    }

    fn is_abstract(&self, name: &str) -> bool {
        name == "device" || self.types.iter().any(|t| t.parent == name)
    }

    /// `qom-list-types`: concrete types (and abstract ones when `include_abstract`), filtered
    /// by `implements` (the type itself or one of its ancestors).
    pub fn list_types(
        &self,
        implements: Option<&str>,
        include_abstract: bool,
    ) -> Vec<ObjectTypeInfo> {
        let mut out: Vec<ObjectTypeInfo> = Vec::new();
        if include_abstract {
            out.extend(
                self.abstract_types()
                    .into_iter()
                    .filter(|a| match implements {
                        None => true,
                        Some(i) => a.name == i || (i == "device"),
                    }),
            );
        }
        for t in &self.types {
            let matches = match implements {
                None => true,
                Some(i) => i == t.name || i == t.parent || i == "device",
            };
            if matches {
                out.push(ObjectTypeInfo {
                    name: t.name.clone(),
                    is_abstract: false,
                    parent: Some(t.parent.clone()),
                });
            }
        }
        out
    }

    /// `device-list-properties`: unknown types are `DeviceNotFound`, abstract ones an error.
    pub fn device_list_properties(
        &self,
        typename: &str,
    ) -> Result<Vec<ObjectPropertyInfo>, QdevError> {
        let Some(t) = self.get(typename) else {
            if self.is_abstract(typename) {
                return Err(QdevError::AbstractType(typename.to_owned()));
            }
            return Err(QdevError::DeviceNotFound(typename.to_owned()));
        };
        Ok(t.props
            .iter()
            .map(|p| ObjectPropertyInfo {
                name: p.name().to_owned(),
                ty: p.kind().type_name().to_owned(),
                description: p.desc().map(str::to_owned),
                default_value: p.default_value().map(PropValue::to_json),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debug_exit() -> DeviceType {
        DeviceType::new("isa-debug-exit", BusType::Isa)
            .description("ISA debug exit device")
            .prop(PropSpec::uint32("iobase").default_u64(0x501))
            .prop(PropSpec::uint32("iosize").default_u64(2).range(1, 4))
    }

    #[test]
    fn validate_fills_defaults_in_order() {
        let t = debug_exit();
        let p = t
            .validate(&[
                ("iosize".into(), RawValue::Str("4".into())),
                ("iobase".into(), RawValue::Str("0xf4".into())),
            ])
            .unwrap();
        let v: Vec<_> = p.iter().map(|(n, v)| (n.to_owned(), v.clone())).collect();
        assert_eq!(
            v,
            vec![
                ("iobase".to_owned(), PropValue::Uint(0xf4)),
                ("iosize".to_owned(), PropValue::Uint(4))
            ]
        );
    }

    #[test]
    fn unknown_and_invalid_properties_name_what_is_accepted() {
        let t = debug_exit();
        let e = t
            .validate(&[("foo".into(), RawValue::Str("1".into()))])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Property 'isa-debug-exit.foo' not found (accepted: iobase, iosize)"
        );
        let e = t
            .validate(&[("iosize".into(), RawValue::Str("8".into()))])
            .unwrap_err();
        assert!(e.to_string().starts_with("Property 'isa-debug-exit.iosize' doesn't take value '8': expects a uint32 between 1 and 4"), "{e}");
        let e = t
            .validate(&[("iobase".into(), RawValue::Json(serde_json::json!(true)))])
            .unwrap_err();
        assert!(e.to_string().contains("doesn't take value true"), "{e}");
    }

    #[test]
    fn required_property() {
        let t = DeviceType::new("virtio-blk-device", BusType::VirtioMmio)
            .prop(PropSpec::string("drive"));
        let e = t.validate(&[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Property 'virtio-blk-device.drive' is required (expects a string)"
        );
    }

    #[test]
    fn registry_introspection() {
        let mut r = TypeRegistry::new();
        r.register(debug_exit()).unwrap();
        r.register(DeviceType::new("i8042", BusType::Isa).user_creatable(false))
            .unwrap();
        assert!(matches!(
            r.register(debug_exit()),
            Err(QdevError::DuplicateType(_))
        ));
        assert!(matches!(
            r.register(DeviceType::new("isa-device", BusType::Isa)),
            Err(QdevError::DuplicateType(_))
        ));
        assert!(matches!(
            r.register(
                DeviceType::new("x", BusType::Isa).prop(PropSpec::uint8("a").default_u64(256))
            ),
            Err(QdevError::InvalidValue { .. })
        ));
        assert!(
            r.register(DeviceType::new("y", BusType::Isa).prop(PropSpec::uint8("id")))
                .is_err()
        );

        let concrete = serde_json::to_value(r.list_types(None, false)).unwrap();
        assert_eq!(
            concrete,
            serde_json::json!([
                {"name": "isa-debug-exit", "parent": "isa-device"},
                {"name": "i8042", "parent": "isa-device"}
            ])
        );
        let all = r.list_types(Some("device"), true);
        assert!(all.iter().any(|t| t.name == "isa-device" && t.is_abstract));
        assert_eq!(r.list_types(Some("isa-debug-exit"), false).len(), 1);

        let props =
            serde_json::to_value(r.device_list_properties("isa-debug-exit").unwrap()).unwrap();
        assert_eq!(
            props[0],
            serde_json::json!({"name": "iobase", "type": "uint32", "default-value": 0x501})
        );
        let e = r.device_list_properties("nope").unwrap_err();
        assert_eq!(e.qmp_class(), "DeviceNotFound");
        assert_eq!(e.to_string(), "Device 'nope' not found");
        assert!(matches!(
            r.device_list_properties("isa-device"),
            Err(QdevError::AbstractType(_))
        ));

        let e = r.lookup_creatable("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "'nope' is not a valid device model name (known: isa-debug-exit)"
        );
        assert!(matches!(
            r.lookup_creatable("i8042"),
            Err(QdevError::NotUserCreatable(_))
        ));
    }
}
