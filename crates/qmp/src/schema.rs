//! QAPI-style type descriptions: what a command takes and returns.
//!
//! One description serves three purposes: argument validation with QEMU's error texts
//! (`Parameter 'x' is missing`, `... is unexpected`, `Invalid parameter type for 'x',
//! expected: integer`), the `query-qmp-schema` introspection answer, and documentation.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::CommandError;

/// QAPI built-in scalar types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `str`: a JSON string.
    Str,
    /// `int`: a JSON integer that fits `i64`.
    Int,
    /// `size`: a non-negative JSON integer (bytes, counts) that fits `u64`.
    Size,
    /// `number`: any JSON number.
    Number,
    /// `bool`.
    Bool,
    /// `null`.
    Null,
    /// `any`: every JSON value.
    Any,
}

impl Builtin {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int => "int",
            Builtin::Size => "size",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    /// The `json-type` of its SchemaInfo.
    fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }

    /// The word QEMU's input visitor uses in "expected: ..." messages.
    fn expected(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int => "integer",
            Builtin::Size => "size",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            Builtin::Str => v.is_string(),
            Builtin::Int => v.is_i64(),
            Builtin::Size => v.is_u64(),
            Builtin::Number => v.is_number(),
            Builtin::Bool => v.is_boolean(),
            Builtin::Null => v.is_null(),
            Builtin::Any => true,
        }
    }
}

/// One member of an object type.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Wire name.
    pub name: &'static str,
    /// Its type.
    pub ty: Type,
    /// Whether it may be left out.
    pub optional: bool,
}

/// A QAPI type.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    /// A built-in scalar.
    Builtin(Builtin),
    /// A string restricted to some values.
    Enum {
        /// Type name.
        name: &'static str,
        /// Accepted values.
        values: &'static [&'static str],
    },
    /// A list.
    Array(Box<Type>),
    /// A JSON object with declared members.
    Object {
        /// Type name.
        name: &'static str,
        /// Members in declaration order.
        members: Vec<Member>,
        /// Members not declared are accepted if they have this type (machine properties);
        /// `None` rejects them as unexpected.
        extra: Option<Builtin>,
    },
    /// One of several types told apart by their JSON type.
    Alternate {
        /// Type name.
        name: &'static str,
        /// The alternatives.
        types: Vec<Type>,
    },
}

impl Type {
    /// An object type with no members (QEMU's `q_empty`, arguments of most queries).
    pub fn empty() -> Type {
        Type::Object {
            name: "q_empty",
            members: Vec::new(),
            extra: None,
        }
    }

    /// A `str`.
    pub fn str() -> Type {
        Type::Builtin(Builtin::Str)
    }

    /// A `bool`.
    pub fn bool() -> Type {
        Type::Builtin(Builtin::Bool)
    }

    /// An `int`.
    pub fn int() -> Type {
        Type::Builtin(Builtin::Int)
    }

    /// A `size`.
    pub fn size() -> Type {
        Type::Builtin(Builtin::Size)
    }

    /// An `any`.
    pub fn any() -> Type {
        Type::Builtin(Builtin::Any)
    }

    /// A list of `elem`.
    pub fn array(elem: Type) -> Type {
        Type::Array(Box::new(elem))
    }

    /// An object type without extra members.
    pub fn object(name: &'static str, members: Vec<Member>) -> Type {
        Type::Object {
            name,
            members,
            extra: None,
        }
    }

    /// The name used in SchemaInfo (`[str]` for lists).
    pub fn name(&self) -> String {
        match self {
            Type::Builtin(b) => b.name().to_owned(),
            Type::Enum { name, .. } | Type::Object { name, .. } | Type::Alternate { name, .. } => {
                (*name).to_owned()
            }
            Type::Array(e) => format!("[{}]", e.name()),
        }
    }

    fn expected(&self) -> String {
        match self {
            Type::Builtin(b) => b.expected().to_owned(),
            Type::Enum { .. } => "string".to_owned(),
            Type::Array(_) => "array".to_owned(),
            Type::Object { .. } => "object".to_owned(),
            Type::Alternate { types, .. } => {
                let names: Vec<String> = types.iter().map(Type::expected).collect();
                names.join(" or ")
            }
        }
    }

    fn matches_json_type(&self, v: &Value) -> bool {
        match self {
            Type::Builtin(b) => b.accepts(v),
            Type::Enum { .. } => v.is_string(),
            Type::Array(_) => v.is_array(),
            Type::Object { .. } => v.is_object(),
            Type::Alternate { types, .. } => types.iter().any(|t| t.matches_json_type(v)),
        }
    }

    /// Checks `v` against this type; `path` names it in errors (`null` for unnamed list
    /// elements of enum type, as QEMU does).
    pub fn validate(&self, v: &Value, path: &str) -> Result<(), CommandError> {
        let wrong_type = || {
            CommandError::generic(format!(
                "Invalid parameter type for '{path}', expected: {}",
                self.expected()
            ))
        };
        match self {
            Type::Builtin(b) => {
                if b.accepts(v) {
                    Ok(())
                } else {
                    Err(wrong_type())
                }
            }
            Type::Enum { values, .. } => {
                let s = v.as_str().ok_or_else(wrong_type)?;
                if values.contains(&s) {
                    Ok(())
                } else {
                    Err(CommandError::generic(format!(
                        "Parameter '{path}' does not accept value '{s}'"
                    )))
                }
            }
            Type::Array(elem) => {
                let list = v.as_array().ok_or_else(wrong_type)?;
                for (i, e) in list.iter().enumerate() {
                    // QEMU names a list element `path[i]`, except when an enum rejects
                    // the value, where its visitor has no name and says 'null'.
                    let p = match (&**elem, e) {
                        (Type::Enum { .. }, Value::String(_)) => "null".to_owned(),
                        _ => format!("{path}[{i}]"),
                    };
                    elem.validate(e, &p)?;
                }
                Ok(())
            }
            Type::Object { .. } => {
                let map = v.as_object().ok_or_else(wrong_type)?;
                self.validate_members(map, &format!("{path}."))
            }
            Type::Alternate { types, .. } => match types.iter().find(|t| t.matches_json_type(v)) {
                Some(t) => t.validate(v, path),
                None => Err(wrong_type()),
            },
        }
    }

    /// Checks the members of an object type; `prefix` is prepended to member names.
    pub fn validate_members(
        &self,
        map: &Map<String, Value>,
        prefix: &str,
    ) -> Result<(), CommandError> {
        let Type::Object { members, extra, .. } = self else {
            return self.validate(&Value::Object(map.clone()), prefix.trim_end_matches('.'));
        };
        for m in members {
            let path = format!("{prefix}{}", m.name);
            match map.get(m.name) {
                None if m.optional => {}
                None => {
                    return Err(CommandError::generic(format!(
                        "Parameter '{path}' is missing"
                    )));
                }
                Some(v) => m.ty.validate(v, &path)?,
            }
        }
        for (k, v) in map {
            if members.iter().any(|m| m.name == k) {
                continue;
            }
            match extra {
                Some(b) => Type::Builtin(*b).validate(v, &format!("{prefix}{k}"))?,
                None => {
                    return Err(CommandError::generic(format!(
                        "Parameter '{prefix}{k}' is unexpected"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Adds this type and the types it uses to `out` as SchemaInfo objects, by name.
    pub fn collect_schema(&self, out: &mut BTreeMap<String, Value>) {
        let name = self.name();
        if out.contains_key(&name) {
            return;
        }
        match self {
            Type::Builtin(b) => {
                out.insert(
                    name.clone(),
                    json!({"name": name, "meta-type": "builtin", "json-type": b.json_type()}),
                );
            }
            Type::Enum { values, .. } => {
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                out.insert(
                    name.clone(),
                    json!({"name": name, "meta-type": "enum", "values": values, "members": members}),
                );
            }
            Type::Array(elem) => {
                out.insert(
                    name.clone(),
                    json!({"name": name, "meta-type": "array", "element-type": elem.name()}),
                );
                elem.collect_schema(out);
            }
            Type::Object { members, .. } => {
                let ms: Vec<Value> = members
                    .iter()
                    .map(|m| {
                        let mut o = json!({"name": m.name, "type": m.ty.name()});
                        if m.optional {
                            o["default"] = Value::Null;
                        }
                        o
                    })
                    .collect();
                out.insert(
                    name.clone(),
                    json!({"name": name, "meta-type": "object", "members": ms}),
                );
                for m in members {
                    m.ty.collect_schema(out);
                }
            }
            Type::Alternate { types, .. } => {
                let ms: Vec<Value> = types.iter().map(|t| json!({"type": t.name()})).collect();
                out.insert(
                    name.clone(),
                    json!({"name": name, "meta-type": "alternate", "members": ms}),
                );
                for t in types {
                    t.collect_schema(out);
                }
            }
        }
    }
}

/// A required member.
pub fn req(name: &'static str, ty: Type) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub fn opt(name: &'static str, ty: Type) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Type {
        Type::object(
            "q_obj_test-arg",
            vec![
                req("command-line", Type::str()),
                opt("cpu-index", Type::int()),
                opt(
                    "enable",
                    Type::array(Type::Enum {
                        name: "QMPCapability",
                        values: &["oob"],
                    }),
                ),
            ],
        )
    }

    fn check(v: Value) -> Result<(), String> {
        args()
            .validate_members(v.as_object().unwrap(), "")
            .map_err(|e| e.to_string())
    }

    #[test]
    fn qemu_messages() {
        assert_eq!(
            check(json!({})),
            Err("Parameter 'command-line' is missing".into())
        );
        assert_eq!(
            check(json!({"command-line": "x", "bogus": 1})),
            Err("Parameter 'bogus' is unexpected".into())
        );
        assert_eq!(
            check(json!({"command-line": 1})),
            Err("Invalid parameter type for 'command-line', expected: string".into())
        );
        assert_eq!(
            check(json!({"command-line": "x", "enable": ["nope"]})),
            Err("Parameter 'null' does not accept value 'nope'".into())
        );
        assert_eq!(
            check(json!({"command-line": "x", "enable": [1]})),
            Err("Invalid parameter type for 'enable[0]', expected: string".into())
        );
        assert_eq!(check(json!({"command-line": "x", "cpu-index": 3})), Ok(()));
    }

    #[test]
    fn schema_lists_used_types() {
        let mut out = BTreeMap::new();
        args().collect_schema(&mut out);
        assert!(out.contains_key("str"));
        assert!(out.contains_key("[QMPCapability]"));
        assert_eq!(out["QMPCapability"]["meta-type"], "enum");
        assert_eq!(out["q_obj_test-arg"]["members"][1]["default"], Value::Null);
    }
}
