//! One request type for `-device DRIVER,id=ID,prop=val` and QMP
//! `device_add {"driver", "id", "bus", ...props}`.

use serde_json::{Map, Value};

use crate::error::QdevError;
use crate::keyval::Syntax;

/// A property value as received, before the device type validates it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RawValue {
    /// From the command line (or any string): parsed with the `-device` syntax.
    Str(String),
    /// From QMP: a JSON value (a JSON string is parsed like [`RawValue::Str`]).
    Json(Value),
}

impl RawValue {
    /// The value as an error message quotes it.
    pub fn quoted(&self) -> String {
        match self {
            RawValue::Str(s) => format!("'{s}'"),
            RawValue::Json(Value::String(s)) => format!("'{s}'"),
            RawValue::Json(v) => v.to_string(),
        }
    }
}

/// A request to create a device, from either front end.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRequest {
    /// Device type name.
    pub driver: String,
    /// Optional id; devices with an id live at `/machine/peripheral/ID`.
    pub id: Option<String>,
    /// Optional bus name; without it the first bus of the right type with a free slot is used.
    pub bus: Option<String>,
    /// Device properties in the order given.
    pub props: Vec<(String, RawValue)>,
}

impl DeviceRequest {
    /// A request for `driver` with no id, bus or properties.
    pub fn new(driver: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            id: None,
            bus: None,
            props: Vec::new(),
        }
    }
    /// Sets the id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Sets the bus.
    pub fn bus(mut self, bus: impl Into<String>) -> Self {
        self.bus = Some(bus.into());
        self
    }
    /// Adds a property in string form.
    pub fn prop(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.props.push((name.into(), RawValue::Str(value.into())));
        self
    }

    /// Parses a `-device` argument with [`Syntax::DEVICE`] (QEMU's QemuOpts dialect):
    /// `DRIVER[,key=value]...`, where `,,` stands for a literal comma, `driver=` may be spelled
    /// out, a bare `key` means `key=on` and `nokey` means `key=off`. When a property repeats,
    /// every occurrence is kept in order and validation takes the last.
    pub fn parse_cli(text: &str) -> Result<Self, QdevError> {
        let opts = Syntax::DEVICE
            .parse(text)
            .map_err(|e| QdevError::BadOption {
                text: text.to_owned(),
                reason: e.reason(),
            })?;
        let mut driver: Option<String> = None;
        let mut req = DeviceRequest::new("");
        for (name, value) in opts {
            match name.as_str() {
                "driver" => driver = Some(value),
                "id" => req.id = Some(value),
                "bus" => req.bus = Some(value),
                _ => req.props.push((name, RawValue::Str(value))),
            }
        }
        req.driver = driver
            .filter(|d| !d.is_empty())
            .ok_or(QdevError::MissingDriver)?;
        Ok(req)
    }

    /// Takes QMP `device_add` arguments: `driver` (string, required), `id` and `bus`
    /// (strings), every other member a property.
    pub fn from_qmp(args: &Map<String, Value>) -> Result<Self, QdevError> {
        let string = |key: &str| -> Result<Option<String>, QdevError> {
            match args.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(QdevError::InvalidType {
                    param: key.to_owned(),
                    expected: "string",
                }),
            }
        };
        let driver = string("driver")?.ok_or(QdevError::MissingDriver)?;
        let mut req = DeviceRequest::new(driver);
        req.id = string("id")?;
        req.bus = string("bus")?;
        req.props = args
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "driver" | "id" | "bus"))
            .map(|(k, v)| (k.clone(), RawValue::Json(v.clone())))
            .collect();
        Ok(req)
    }

    /// [`DeviceRequest::from_qmp`] for a whole JSON value, which must be an object.
    pub fn from_qmp_value(args: &Value) -> Result<Self, QdevError> {
        match args {
            Value::Object(m) => Self::from_qmp(m),
            _ => Err(QdevError::InvalidType {
                param: "arguments".to_owned(),
                expected: "object",
            }),
        }
    }
}

/// Deserializes QMP `device_add` arguments (a JSON object) through
/// [`DeviceRequest::from_qmp`], so a QMP command type can embed the request directly.
impl<'de> serde::Deserialize<'de> for DeviceRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        DeviceRequest::from_qmp(&map).map_err(serde::de::Error::custom)
    }
}

/// Whether `id` is an identifier as QEMU requires (`id_wellformed`): a letter, then letters,
/// digits, `-`, `.` or `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &str) -> RawValue {
        RawValue::Str(v.to_owned())
    }

    #[test]
    fn cli_basic() {
        let r = DeviceRequest::parse_cli("isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x04").unwrap();
        assert_eq!(r.driver, "isa-debug-exit");
        assert_eq!(r.id.as_deref(), Some("dbg"));
        assert_eq!(r.bus, None);
        assert_eq!(
            r.props,
            vec![("iobase".into(), s("0xf4")), ("iosize".into(), s("0x04"))]
        );
    }

    #[test]
    fn cli_escapes_and_forms() {
        let r = DeviceRequest::parse_cli("virtio-blk-device,serial=a,,b,,,bus=vmmio.0,ro").unwrap();
        assert_eq!(
            r.props,
            vec![("serial".into(), s("a,b,")), ("ro".into(), s("on"))]
        );
        assert_eq!(r.bus.as_deref(), Some("vmmio.0"));
        let r = DeviceRequest::parse_cli("driver=foo,x=").unwrap();
        assert_eq!(r.driver, "foo");
        assert_eq!(r.props, vec![("x".into(), s(""))]);
        let r = DeviceRequest::parse_cli("we,,ird").unwrap();
        assert_eq!(r.driver, "we,ird");
        let r = DeviceRequest::parse_cli("foo,x=1,x=2").unwrap();
        assert_eq!(r.props.len(), 2);
        let r = DeviceRequest::parse_cli("foo,x=a=b").unwrap();
        assert_eq!(r.props, vec![("x".into(), s("a=b"))]);
    }

    #[test]
    fn cli_errors() {
        assert!(matches!(
            DeviceRequest::parse_cli(""),
            Err(QdevError::MissingDriver)
        ));
        assert!(matches!(
            DeviceRequest::parse_cli("id=x"),
            Err(QdevError::MissingDriver)
        ));
        assert!(matches!(DeviceRequest::parse_cli("foo,,"), Ok(r) if r.driver == "foo,"));
        assert!(matches!(
            DeviceRequest::parse_cli("foo,=1"),
            Err(QdevError::BadOption { .. })
        ));
        assert!(matches!(
            DeviceRequest::parse_cli("foo,a,,b"),
            Err(QdevError::BadOption { .. })
        ));
        let r = DeviceRequest::parse_cli("foo,x=1,").unwrap();
        assert_eq!(r.props, vec![("x".into(), s("1"))]);
    }

    #[test]
    fn qmp_args() {
        let a = json!({"driver": "isa-debug-exit", "id": "d", "iobase": 244, "bus": "isa.0"});
        let r = DeviceRequest::from_qmp_value(&a).unwrap();
        assert_eq!(r.driver, "isa-debug-exit");
        assert_eq!(r.id.as_deref(), Some("d"));
        assert_eq!(r.bus.as_deref(), Some("isa.0"));
        assert_eq!(r.props, vec![("iobase".into(), RawValue::Json(json!(244)))]);
        let e = DeviceRequest::from_qmp_value(&json!({"driver": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid parameter type for 'driver', expected: string"
        );
        assert!(matches!(
            DeviceRequest::from_qmp_value(&json!({})),
            Err(QdevError::MissingDriver)
        ));
        assert!(DeviceRequest::from_qmp_value(&json!([1])).is_err());
        let r: DeviceRequest =
            serde_json::from_value(json!({"driver": "x", "id": "y", "p": 1})).unwrap();
        assert_eq!(
            r,
            DeviceRequest::from_qmp_value(&json!({"driver": "x", "id": "y", "p": 1})).unwrap()
        );
        let e = serde_json::from_value::<DeviceRequest>(json!({"id": "y"})).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'driver' is missing");
    }

    #[test]
    fn ids() {
        for good in ["a", "net0", "A-b.c_d"] {
            assert!(id_wellformed(good), "{good}");
        }
        for bad in ["", "0a", "-a", "a b", "a/b", "é"] {
            assert!(!id_wellformed(bad), "{bad}");
        }
    }
}
