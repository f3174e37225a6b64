//! QOM-shaped introspection of the tree: `qom-list`, `qom-get`, plus the registry's
//! `qom-list-types` and `device-list-properties` for convenience.

use serde_json::{Value, json};

use crate::error::QdevError;
use crate::tree::{BusEntry, Device, DeviceTree};
use crate::types::{ObjectPropertyInfo, ObjectTypeInfo};

const CONTAINERS: [&str; 3] = ["peripheral", "peripheral-anon", "unattached"];

enum Obj<'a> {
    Machine,
    Container(&'static str),
    Device(&'a Device),
    Bus(&'a BusEntry),
    /// A child device a type declares (`PATH/virtio-backend`): its parent, its type name.
    Child(&'a Device, String),
}

fn prop(name: impl Into<String>, ty: impl Into<String>) -> ObjectPropertyInfo {
    ObjectPropertyInfo {
        name: name.into(),
        ty: ty.into(),
        description: None,
        default_value: None,
    }
}

/// The last path component of a device path (`device[3]`, `net0`).
fn leaf(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl DeviceTree {
    fn resolve(&self, path: &str) -> Result<Obj<'_>, QdevError> {
        let trimmed = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        if trimmed == "/machine" {
            return Ok(Obj::Machine);
        }
        if let Some(c) = trimmed.strip_prefix("/machine/")
            && let Some(name) = CONTAINERS.iter().find(|n| **n == c)
        {
            return Ok(Obj::Container(name));
        }
        if let Some(d) = self.paths.get(trimmed).and_then(|k| self.devices.get(k)) {
            return Ok(Obj::Device(d));
        }
        if let Some(b) = self.buses.iter().find(|b| b.path == trimmed) {
            return Ok(Obj::Bus(b));
        }
        if let Some((parent, name)) = trimmed.rsplit_once('/')
            && let Some(d) = self.paths.get(parent).and_then(|k| self.devices.get(k))
            && let Some(t) = self.registry.get(&d.driver)
            && t.children().iter().any(|c| c == name)
        {
            let ty = t.child_type(name).unwrap_or("device").to_owned();
            return Ok(Obj::Child(d, ty));
        }
        if !trimmed.is_empty() && !trimmed.starts_with('/') {
            return self.resolve_partial(path, trimmed);
        }
        Err(QdevError::DeviceNotFound(path.to_owned()))
    }

    /// A partial path (QEMU's): the unique object whose path ends with `/PARTIAL`.
    fn resolve_partial(&self, path: &str, partial: &str) -> Result<Obj<'_>, QdevError> {
        let suffix = format!("/{partial}");
        let mut found: Option<&str> = None;
        let candidates = CONTAINERS
            .iter()
            .map(|c| (*c, true))
            .chain(self.devices.values().map(|d| (d.path.as_str(), false)))
            .chain(self.buses.iter().map(|b| (b.path.as_str(), false)));
        for (p, container) in candidates {
            let matches = if container {
                format!("/machine/{p}").ends_with(&suffix)
            } else {
                p.ends_with(&suffix)
            };
            if matches {
                if found.is_some() {
                    return Err(QdevError::AmbiguousPath(path.to_owned()));
                }
                found = Some(p);
            }
        }
        match found {
            Some(p) if CONTAINERS.contains(&p) => self.resolve(&format!("/machine/{p}")),
            Some(p) => self.resolve(p),
            None if "/machine".ends_with(&suffix) => Ok(Obj::Machine),
            None => Err(QdevError::DeviceNotFound(path.to_owned())),
        }
    }

    fn child_buses<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a BusEntry> + 'a {
        self.buses.iter().filter(move |b| b.parent == parent)
    }

    fn bus_children(&self, bus: &BusEntry) -> Vec<&Device> {
        let idx = self.buses.iter().position(|b| std::ptr::eq(b, bus));
        self.devices
            .values()
            .filter(|d| Some(d.bus) == idx)
            .collect()
    }

    /// `qom-list PATH`: the properties and children of `/machine`, its `peripheral`,
    /// `peripheral-anon` and `unattached` containers, a device (with the children its type
    /// declares, such as `virtio-backend`), such a child, or a bus. As in QEMU, a path
    /// without a leading `/` is partial (the unique object whose path ends with it), and
    /// unknown paths are `DeviceNotFound`.
    pub fn qom_list(&self, path: &str) -> Result<Vec<ObjectPropertyInfo>, QdevError> {
        Ok(match self.resolve(path)? {
            Obj::Machine => {
                let mut v = vec![prop("type", "string")];
                v.extend(CONTAINERS.iter().map(|c| prop(*c, "child<container>")));
                v.extend(
                    self.child_buses("/machine")
                        .map(|b| prop(&b.name, format!("child<{}>", b.bus_type))),
                );
                v
            }
            Obj::Container(c) => {
                let prefix = format!("/machine/{c}/");
                let mut v = vec![prop("type", "string")];
                v.extend(
                    self.devices
                        .values()
                        .filter(|d| {
                            d.path
                                .strip_prefix(&prefix)
                                .is_some_and(|rest| !rest.contains('/'))
                        })
                        .map(|d| prop(leaf(&d.path), format!("child<{}>", d.driver))),
                );
                v
            }
            Obj::Device(d) => {
                let bus = &self.buses[d.bus];
                let mut v = vec![prop("type", "string")];
                if d.id.is_some() {
                    v.push(prop("id", "string"));
                }
                v.push(prop("realized", "bool"));
                v.push(prop("hotplugged", "bool"));
                v.push(prop("hotpluggable", "bool"));
                v.push(prop("parent_bus", format!("link<{}>", bus.bus_type)));
                v.push(prop("x-unplug-state", "string"));
                if let Some(t) = self.registry.get(&d.driver) {
                    for p in t.props() {
                        let mut info = prop(p.name(), p.kind().type_name());
                        info.description = p.desc().map(str::to_owned);
                        v.push(info);
                    }
                }
                v.extend(
                    self.child_buses(&d.path)
                        .map(|b| prop(&b.name, format!("child<{}>", b.bus_type))),
                );
                if let Some(t) = self.registry.get(&d.driver) {
                    v.extend(t.children().iter().map(|c| {
                        prop(c, format!("child<{}>", t.child_type(c).unwrap_or("device")))
                    }));
                }
                v
            }
            Obj::Child(_, ty) => {
                let mut v = vec![
                    prop("type", "string"),
                    prop("realized", "bool"),
                    prop("hotplugged", "bool"),
                    prop("hotpluggable", "bool"),
                ];
                if let Some(t) = self.registry.get(&ty) {
                    v.extend(t.props().iter().map(|p| {
                        let mut info = prop(p.name(), p.kind().type_name());
                        info.description = p.desc().map(str::to_owned);
                        info
                    }));
                }
                v
            }
            Obj::Bus(b) => {
                let mut v = vec![
                    prop("type", "string"),
                    prop("realized", "bool"),
                    prop("hotpluggable", "bool"),
                ];
                v.extend(
                    self.bus_children(b)
                        .iter()
                        .enumerate()
                        .map(|(i, d)| prop(format!("child[{i}]"), format!("link<{}>", d.driver))),
                );
                v
            }
        })
    }

    /// `qom-get PATH PROPERTY`. Devices have `type`, `id` (when set), `realized`,
    /// `hotplugged`, `hotpluggable`, `parent_bus` (the bus path), `x-unplug-state`, their
    /// typed properties, and their child buses (paths). Children and links read as paths.
    pub fn qom_get(&self, path: &str, property: &str) -> Result<Value, QdevError> {
        let not_found = || QdevError::PropertyNotFound {
            path: path.to_owned(),
            property: property.to_owned(),
        };
        match self.resolve(path)? {
            Obj::Machine => {
                if property == "type" {
                    return Ok(json!(self.machine_type));
                }
                if CONTAINERS.contains(&property) {
                    return Ok(json!(format!("/machine/{property}")));
                }
                self.child_buses("/machine")
                    .find(|b| b.name == property)
                    .map(|b| json!(b.path))
                    .ok_or_else(not_found)
            }
            Obj::Container(c) => {
                if property == "type" {
                    return Ok(json!("container"));
                }
                let p = format!("/machine/{c}/{property}");
                if self.paths.contains_key(&p) {
                    Ok(json!(p))
                } else {
                    Err(not_found())
                }
            }
            Obj::Device(d) => {
                let bus = &self.buses[d.bus];
                let hotpluggable = self
                    .registry
                    .get(&d.driver)
                    .is_some_and(|t| t.is_hotpluggable());
                match property {
                    "type" => Ok(json!(d.driver)),
                    "id" => d.id.as_ref().map(|i| json!(i)).ok_or_else(not_found),
                    "realized" => Ok(json!(true)),
                    "hotplugged" => Ok(json!(d.hotplugged)),
                    "hotpluggable" => Ok(json!(hotpluggable)),
                    "parent_bus" => Ok(json!(bus.path)),
                    "x-unplug-state" => Ok(serde_json::to_value(d.unplug).unwrap_or(Value::Null)),
                    _ => d
                        .props
                        .get(property)
                        .map(|v| v.to_json())
                        .or_else(|| {
                            self.child_buses(&d.path)
                                .find(|b| b.name == property)
                                .map(|b| json!(b.path))
                        })
                        .or_else(|| {
                            self.registry
                                .get(&d.driver)
                                .filter(|t| t.children().iter().any(|c| c == property))
                                .map(|_| json!(format!("{}/{property}", d.path)))
                        })
                        .ok_or_else(not_found),
                }
            }
            Obj::Child(d, ty) => match property {
                "type" => Ok(json!(ty)),
                "realized" => Ok(json!(true)),
                "hotplugged" => Ok(json!(d.hotplugged)),
                "hotpluggable" => Ok(json!(false)),
                _ => Err(not_found()),
            },
            Obj::Bus(b) => match property {
                "type" => Ok(json!(b.bus_type.as_str())),
                "realized" => Ok(json!(true)),
                "hotpluggable" => Ok(json!(b.hotplug.is_some())),
                _ => property
                    .strip_prefix("child[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|n| self.bus_children(b).get(n).map(|d| json!(d.path)))
                    .ok_or_else(not_found),
            },
        }
    }

    /// `qom-list-types` over the registry.
    pub fn qom_list_types(
        &self,
        implements: Option<&str>,
        include_abstract: bool,
    ) -> Vec<ObjectTypeInfo> {
        self.registry.list_types(implements, include_abstract)
    }

    /// `device-list-properties` over the registry.
    pub fn device_list_properties(
        &self,
        typename: &str,
    ) -> Result<Vec<ObjectPropertyInfo>, QdevError> {
        self.registry.device_list_properties(typename)
    }
}
