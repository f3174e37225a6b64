//! Typed device properties: their kinds, defaults, validation, and the parsers for the string
//! values of `-device` (QEMU's, through [`crate::keyval`]) and the JSON values of `device_add`.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;

pub use crate::keyval::{parse_bool, parse_int, parse_size};

/// The type of a property, with its constraints.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PropKind {
    /// Any string.
    Str,
    /// `on`/`off` (`yes`/`no`, `true`/`false`, `y`/`n` as QEMU accepts), or a JSON bool.
    Bool,
    /// A signed integer in `min..=max`; strings may be decimal, `0x` hex or `0` octal.
    Int {
        /// QEMU type name shown by introspection, e.g. `int32`.
        type_name: &'static str,
        /// Smallest accepted value.
        min: i64,
        /// Largest accepted value.
        max: i64,
    },
    /// An unsigned integer in `min..=max`; strings may be decimal, `0x` hex (`iobase=0xf4`) or
    /// `0` octal.
    Uint {
        /// QEMU type name shown by introspection, e.g. `uint16`.
        type_name: &'static str,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// A byte count (`uint64`); strings take QEMU's suffixes `B K M G T P E` (case-insensitive,
    /// powers of 1024, fractions allowed with a suffix: `1.5G`).
    Size,
    /// One of a fixed list of strings.
    Enum(Vec<String>),
}

/// The QEMU QAPI enumerations Keel's properties use, by their values in QEMU's order:
/// `disable-legacy` is an `OnOffAuto`, `rerror`/`werror` a `BlockdevOnError`.
const QAPI_ENUMS: &[(&str, &[&str])] = &[
    ("OnOffAuto", &["on", "off", "auto"]),
    (
        "BlockdevOnError",
        &["report", "ignore", "enospc", "stop", "auto"],
    ),
];

impl PropKind {
    /// The type name `device-list-properties` shows.
    pub fn type_name(&self) -> &str {
        match self {
            PropKind::Str => "str",
            PropKind::Bool => "bool",
            PropKind::Int { type_name, .. } | PropKind::Uint { type_name, .. } => type_name,
            PropKind::Size => "size",
            // QEMU's QAPI enums, named as its introspection names them.
            PropKind::Enum(v) => QAPI_ENUMS
                .iter()
                .find(|(_, values)| v.iter().map(String::as_str).eq(values.iter().copied()))
                .map_or("enum", |(name, _)| name),
        }
    }

    /// What values the kind accepts, in words (used in error messages).
    pub fn expected(&self) -> String {
        match self {
            PropKind::Str => "expects a string".to_owned(),
            PropKind::Bool => "expects 'on' or 'off'".to_owned(),
            PropKind::Int { type_name, min, max } => format!(
                "expects an {type_name} between {min} and {max} (decimal, 0x hex or 0 octal)"
            ),
            PropKind::Uint { type_name, min, max } => format!(
                "expects a {type_name} between {min} and {max} ({min:#x}..={max:#x}; decimal, 0x hex or 0 octal)"
            ),
            PropKind::Size => "expects a non-negative size below 2^64, optionally with suffix B, K, M, G, T, P or E".to_owned(),
            PropKind::Enum(values) => format!("expects one of: {}", values.join(", ")),
        }
    }
}

/// A validated property value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PropValue {
    /// A `Bool` property.
    Bool(bool),
    /// An `Int` property.
    Int(i64),
    /// A `Uint` or `Size` property.
    Uint(u64),
    /// A `Str` or `Enum` property.
    Str(String),
}

impl PropValue {
    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PropValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The value as an unsigned integer, if it is one (or a non-negative signed one).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            PropValue::Uint(v) => Some(*v),
            PropValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer, if it is one (or an unsigned one that fits).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            PropValue::Int(v) => Some(*v),
            PropValue::Uint(v) => i64::try_from(*v).ok(),
            _ => None,
        }
    }
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PropValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The JSON form, as `qom-get` returns it.
    pub fn to_json(&self) -> Value {
        match self {
            PropValue::Bool(b) => Value::Bool(*b),
            PropValue::Int(v) => Value::from(*v),
            PropValue::Uint(v) => Value::from(*v),
            PropValue::Str(s) => Value::String(s.clone()),
        }
    }
}

impl fmt::Display for PropValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropValue::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
            PropValue::Int(v) => write!(f, "{v}"),
            PropValue::Uint(v) => write!(f, "{v}"),
            PropValue::Str(s) => f.write_str(s),
        }
    }
}

impl Serialize for PropValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PropValue::Bool(b) => s.serialize_bool(*b),
            PropValue::Int(v) => s.serialize_i64(*v),
            PropValue::Uint(v) => s.serialize_u64(*v),
            PropValue::Str(v) => s.serialize_str(v),
        }
    }
}

/// A value a property does not accept. The message says what the property expects
/// ([`PropKind::expected`]), e.g. `expects a uint32 between 1 and 4 (...)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{expected}")]
pub struct PropError {
    expected: String,
}

impl PropError {
    /// What the property accepts, in words.
    pub fn expected(&self) -> &str {
        &self.expected
    }
}

/// One property of a device type: name, kind, default, description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropSpec {
    name: String,
    kind: PropKind,
    default: Option<PropValue>,
    bad_default: Option<String>,
    description: Option<String>,
}

impl PropSpec {
    /// A property of any kind, with no default (so required) and no description.
    pub fn new(name: impl Into<String>, kind: PropKind) -> Self {
        Self {
            name: name.into(),
            kind,
            default: None,
            bad_default: None,
            description: None,
        }
    }
    /// A string property.
    pub fn string(name: impl Into<String>) -> Self {
        Self::new(name, PropKind::Str)
    }
    /// A bool property.
    pub fn bool(name: impl Into<String>) -> Self {
        Self::new(name, PropKind::Bool)
    }
    /// An `int32` property.
    pub fn int32(name: impl Into<String>) -> Self {
        Self::new(
            name,
            PropKind::Int {
                type_name: "int32",
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
        )
    }
    /// An `int64` property.
    pub fn int64(name: impl Into<String>) -> Self {
        Self::new(
            name,
            PropKind::Int {
                type_name: "int64",
                min: i64::MIN,
                max: i64::MAX,
            },
        )
    }
    /// A `uint8` property.
    pub fn uint8(name: impl Into<String>) -> Self {
        Self::uint(name, "uint8", u8::MAX.into())
    }
    /// A `uint16` property.
    pub fn uint16(name: impl Into<String>) -> Self {
        Self::uint(name, "uint16", u16::MAX.into())
    }
    /// A `uint32` property (QEMU's type for `iobase`, `irq`, ...).
    pub fn uint32(name: impl Into<String>) -> Self {
        Self::uint(name, "uint32", u32::MAX.into())
    }
    /// A `uint64` property.
    pub fn uint64(name: impl Into<String>) -> Self {
        Self::uint(name, "uint64", u64::MAX)
    }
    fn uint(name: impl Into<String>, type_name: &'static str, max: u64) -> Self {
        Self::new(
            name,
            PropKind::Uint {
                type_name,
                min: 0,
                max,
            },
        )
    }
    /// A `size` property (bytes, with suffixes).
    pub fn size(name: impl Into<String>) -> Self {
        Self::new(name, PropKind::Size)
    }
    /// An enum property accepting exactly `values`.
    pub fn enumeration<I, S>(name: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(
            name,
            PropKind::Enum(values.into_iter().map(Into::into).collect()),
        )
    }

    /// Narrows an integer property to `min..=max` (intersected with its type's range).
    /// Has no effect on other kinds.
    pub fn range(mut self, min: i128, max: i128) -> Self {
        match &mut self.kind {
            PropKind::Int {
                min: lo, max: hi, ..
            } => {
                *lo = (*lo).max(i64::try_from(min).unwrap_or(if min < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                }));
                *hi = (*hi).min(i64::try_from(max).unwrap_or(if max < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                }));
            }
            PropKind::Uint {
                min: lo, max: hi, ..
            } => {
                *lo = (*lo).max(u64::try_from(min).unwrap_or(if min < 0 { 0 } else { u64::MAX }));
                *hi = (*hi).min(u64::try_from(max).unwrap_or(if max < 0 { 0 } else { u64::MAX }));
            }
            _ => {}
        }
        self
    }

    /// Sets the default from its string form (as `-device` would give it). An invalid default
    /// is a bug in the type definition: [`crate::TypeRegistry::register`] refuses the type.
    pub fn default_str(mut self, value: &str) -> Self {
        match parse_str(&self.kind, value) {
            Ok(v) => {
                self.default = Some(v);
                self.bad_default = None;
            }
            Err(()) => {
                self.default = None;
                self.bad_default = Some(value.to_owned());
            }
        }
        self
    }

    /// The invalid default given to [`PropSpec::default_str`], if any.
    pub(crate) fn bad_default(&self) -> Option<&str> {
        self.bad_default.as_deref()
    }

    /// Sets an unsigned default (`uint*`, `size`, or a non-negative `int*`).
    pub fn default_u64(self, value: u64) -> Self {
        self.default_str(&value.to_string())
    }

    /// Sets a signed default.
    pub fn default_i64(self, value: i64) -> Self {
        self.default_str(&value.to_string())
    }

    /// Sets a bool default.
    pub fn default_bool(self, value: bool) -> Self {
        self.default_str(if value { "on" } else { "off" })
    }

    /// Sets the description `device-list-properties` shows.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Property name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Property kind.
    pub fn kind(&self) -> &PropKind {
        &self.kind
    }
    /// Default value; `None` means the property must be given.
    pub fn default_value(&self) -> Option<&PropValue> {
        self.default.as_ref()
    }
    /// Description, if any.
    pub fn desc(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Parses and validates the string form (`-device`, or a JSON string).
    /// The error says what the property expects.
    pub fn parse_str(&self, text: &str) -> Result<PropValue, PropError> {
        parse_str(&self.kind, text).map_err(|()| PropError {
            expected: self.kind.expected(),
        })
    }

    /// Validates a JSON value: the matching JSON type, or a string in the `-device` syntax (so
    /// that `device_add` and `-device` accept the same things; QEMU's JSON path is stricter).
    pub fn parse_json(&self, value: &Value) -> Result<PropValue, PropError> {
        if let Value::String(s) = value {
            return self.parse_str(s);
        }
        let ok = match (&self.kind, value) {
            (PropKind::Bool, Value::Bool(b)) => Some(PropValue::Bool(*b)),
            (PropKind::Int { min, max, .. }, Value::Number(n)) => n
                .as_i64()
                .filter(|v| (*min..=*max).contains(v))
                .map(PropValue::Int),
            (PropKind::Uint { min, max, .. }, Value::Number(n)) => n
                .as_u64()
                .filter(|v| (*min..=*max).contains(v))
                .map(PropValue::Uint),
            (PropKind::Size, Value::Number(n)) => n.as_u64().map(PropValue::Uint),
            _ => None,
        };
        ok.ok_or_else(|| PropError {
            expected: self.kind.expected(),
        })
    }
}

fn parse_str(kind: &PropKind, text: &str) -> Result<PropValue, ()> {
    match kind {
        PropKind::Str => Ok(PropValue::Str(text.to_owned())),
        PropKind::Bool => parse_bool(text).map(PropValue::Bool).ok_or(()),
        PropKind::Int { min, max, .. } => parse_int(text)
            .and_then(|v| i64::try_from(v).ok())
            .filter(|v| (*min..=*max).contains(v))
            .map(PropValue::Int)
            .ok_or(()),
        PropKind::Uint { min, max, .. } => parse_int(text)
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| (*min..=*max).contains(v))
            .map(PropValue::Uint)
            .ok_or(()),
        PropKind::Size => parse_size(text).map(PropValue::Uint).ok_or(()),
        PropKind::Enum(values) => values
            .iter()
            .find(|v| v.as_str() == text)
            .map(|v| PropValue::Str(v.clone()))
            .ok_or(()),
    }
}

/// The validated properties of one device instance, in the type's declaration order, every
/// property present (given or defaulted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(Vec<(String, PropValue)>);

impl Props {
    /// Builds from pairs (used by the registry after validation).
    pub(crate) fn from_pairs(pairs: Vec<(String, PropValue)>) -> Self {
        Self(pairs)
    }
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&PropValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    /// `name` as an unsigned integer.
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(PropValue::as_u64)
    }
    /// `name` as a signed integer.
    pub fn i64(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(PropValue::as_i64)
    }
    /// `name` as a bool.
    pub fn bool(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(PropValue::as_bool)
    }
    /// `name` as a string.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(PropValue::as_str)
    }
    /// All properties in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PropValue)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }
    /// Number of properties.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Props {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint_ranges() {
        let p = PropSpec::uint16("iobase").default_u64(0x501);
        assert_eq!(p.parse_str("0xf4"), Ok(PropValue::Uint(0xf4)));
        assert_eq!(p.parse_str("65535"), Ok(PropValue::Uint(65535)));
        assert!(p.parse_str("65536").is_err());
        assert!(p.parse_str("-1").is_err());
        let r = PropSpec::uint32("iosize").range(1, 4);
        assert!(r.parse_str("0").is_err());
        assert!(r.parse_str("5").is_err());
        assert_eq!(r.parse_str("4"), Ok(PropValue::Uint(4)));
        assert!(r.parse_str("4").is_ok());
        let e = r.parse_str("9").unwrap_err().to_string();
        assert!(e.contains("between 1 and 4"), "{e}");
        let i = PropSpec::int32("x").range(-5, 5);
        assert_eq!(i.parse_str("-5"), Ok(PropValue::Int(-5)));
        assert!(i.parse_str("-6").is_err());
    }

    #[test]
    fn json_values() {
        let b = PropSpec::bool("x");
        assert_eq!(b.parse_json(&Value::Bool(true)), Ok(PropValue::Bool(true)));
        assert_eq!(
            b.parse_json(&Value::from("off")),
            Ok(PropValue::Bool(false))
        );
        assert!(b.parse_json(&Value::from(1)).is_err());
        let u = PropSpec::uint8("u");
        assert_eq!(u.parse_json(&Value::from(255)), Ok(PropValue::Uint(255)));
        assert!(u.parse_json(&Value::from(256)).is_err());
        assert!(u.parse_json(&Value::from(-1)).is_err());
        assert!(u.parse_json(&Value::from(1.5)).is_err());
        let e = PropSpec::enumeration("mode", ["a", "b"]);
        assert_eq!(
            e.parse_json(&Value::from("b")),
            Ok(PropValue::Str("b".into()))
        );
        let err = e.parse_json(&Value::from("c")).unwrap_err();
        assert_eq!(err.to_string(), "expects one of: a, b");
        assert_eq!(err.expected(), "expects one of: a, b");
        let s = PropSpec::string("s");
        assert!(s.parse_json(&Value::from(3)).is_err());
    }

    #[test]
    fn bad_default_is_remembered() {
        let p = PropSpec::uint8("x").default_u64(300);
        assert_eq!(p.bad_default(), Some("300"));
        assert_eq!(p.default_value(), None);
    }
}
