//! QOM objects and types (QEMU's `qapi/qom.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ANY;

/// One entry of `device-list-properties` / `qom-list` (QAPI `ObjectPropertyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub default_value: Option<Value>,
}

/// One entry of `qom-list-types` (QAPI `ObjectTypeInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTypeInfo {
    /// Type name.
    pub name: String,
    /// Present and true for abstract types.
    #[serde(
        rename = "abstract",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub is_abstract: bool,
    /// Parent type name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// `qom-set`: sets a property of a QOM object. Only `/machine` exists so far, and the
/// `none` machine has no settable property, so this answers QEMU's errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QomSet {
    /// Object path, e.g. `/machine`.
    pub path: String,
    /// Property name.
    pub property: String,
    /// New value.
    pub value: Value,
}

impl Command for QomSet {
    const NAME: &'static str = "qom-set";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_qom-set-arg",
            vec![
                req("path", Type::str()),
                req("property", Type::str()),
                req("value", Type::any()),
            ],
        )
    }
}
pub(crate) fn object_property_info() -> Type {
    Type::object(
        "ObjectPropertyInfo",
        vec![
            req("name", Type::str()),
            req("type", Type::str()),
            opt("description", Type::str()),
            opt("default-value", Type::any()),
        ],
    )
}
/// `qom-list`: the properties (children, links, values) of a QOM object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QomList {
    /// Object path, absolute or partial.
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<ObjectPropertyInfo>;
    fn arguments() -> Type {
        Type::object("q_obj_qom-list-arg", vec![req("path", Type::str())])
    }
    fn returns() -> Option<Type> {
        Some(Type::array(object_property_info()))
    }
}

/// `qom-get`: one property of a QOM object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QomGet {
    /// Object path.
    pub path: String,
    /// Property name.
    pub property: String,
}

impl Command for QomGet {
    const NAME: &'static str = "qom-get";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Value;
    fn arguments() -> Type {
        Type::object(
            "q_obj_qom-get-arg",
            vec![req("path", Type::str()), req("property", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::any())
    }
}

/// `qom-list-types`: the device types (and their abstract parents).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QomListTypes {
    /// Only types that are or derive from this one.
    pub implements: Option<String>,
    /// Include abstract types.
    #[serde(rename = "abstract")]
    pub include_abstract: Option<bool>,
}

impl Command for QomListTypes {
    const NAME: &'static str = "qom-list-types";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<ObjectTypeInfo>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_qom-list-types-arg",
            vec![
                opt("implements", Type::str()),
                opt("abstract", Type::bool()),
            ],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(Type::object(
            "ObjectTypeInfo",
            vec![
                req("name", Type::str()),
                opt("abstract", Type::bool()),
                opt("parent", Type::str()),
            ],
        )))
    }
}

/// `qom-list-properties`: the properties of a QOM type (devices, machines, CPU models,
/// accelerators, memory backends).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QomListProperties {
    /// Type name.
    pub typename: String,
}

impl Command for QomListProperties {
    const NAME: &'static str = "qom-list-properties";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<ObjectPropertyInfo>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_qom-list-properties-arg",
            vec![req("typename", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(object_property_info()))
    }
}

/// The QOM types Keel has besides its device types, as (name, parent, abstract): the
/// accelerators `accels` as `NAME-accel` (libvirt looks for `tcg-accel`/`kvm-accel`), the
/// machine types `machines` as `NAME-machine`, and the CPU model's types (`host` only where
/// KVM is present).
pub fn extra_types(
    accels: &[&str],
    machines: &[&str],
    kvm_present: bool,
) -> Vec<(String, &'static str, bool)> {
    let mut v: Vec<(String, &'static str, bool)> = vec![
        ("accel".into(), "object", true),
        ("machine".into(), "object", true),
        ("x86-machine".into(), "machine", true),
        ("cpu".into(), "device", true),
        ("x86_64-cpu".into(), "cpu", true),
        ("max-x86_64-cpu".into(), "x86_64-cpu", false),
        ("base-x86_64-cpu".into(), "x86_64-cpu", false),
        ("qemu64-x86_64-cpu".into(), "x86_64-cpu", false),
    ];
    if kvm_present {
        v.push(("host-x86_64-cpu".into(), "max-x86_64-cpu", false));
    }
    v.extend(
        accels
            .iter()
            .map(|a| (format!("{a}-accel"), "accel", false)),
    );
    for m in machines {
        let parent = if *m == "none" {
            "machine"
        } else {
            "x86-machine"
        };
        v.push((format!("{m}-machine"), parent, false));
    }
    v
}

/// Whether type `ty` is `ancestor` or derives from it in `types` (name, parent, abstract).
pub fn implements(types: &[(String, &'static str, bool)], ty: &str, ancestor: &str) -> bool {
    let mut cur = ty.to_owned();
    for _ in 0..8 {
        if cur == ancestor {
            return true;
        }
        match types.iter().find(|t| t.0 == cur) {
            Some(t) => cur = t.1.to_owned(),
            None => return cur == ancestor,
        }
    }
    false
}
