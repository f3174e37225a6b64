//! The command-line forms of the commands: QEMU's option values (`-chardev`, `-blockdev`,
//! `-drive`, `-netdev`, JSON `-device`, `-uuid`) read into the commands they stand for,
//! with the one option parser (`keel_qdev::keyval`). The `vmm` command line uses these and
//! adds the option's text to an error.

use std::path::PathBuf;

use keel_qdev::keyval;
use keel_qmp::Endpoint;
use serde_json::{Map, Value};

use crate::block::BlockdevAdd;
use crate::char::ChardevAdd;
use crate::net::NetdevAdd;
use crate::qdev::DeviceAdd;

/// An option value that cannot be read; the text says what is wrong (QEMU's words where
/// QEMU has them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

fn err(message: impl Into<String>) -> OptionError {
    OptionError(message.into())
}

/// Splits QEMU option text `a=b,c=d` with the one option parser (`keel_qdev::keyval`,
/// QemuOpts dialect): `,,` is a literal comma, the first item may be a bare value for
/// `implied`, a bare `key` elsewhere means `key=on` (`nokey`: `key=off`).
pub fn split_opts(text: &str, implied: Option<&str>) -> Result<Vec<(String, String)>, OptionError> {
    keyval::parse(text, implied)
        .map(keyval::Options::into_vec)
        .map_err(|e| err(e.to_string()))
}

/// A QEMU boolean option value (`on`/`off` and QEMU's synonyms).
pub fn on_off(key: &str, v: &str) -> Result<bool, OptionError> {
    keyval::parse_bool(v).ok_or_else(|| err(format!("Parameter '{key}' expects 'on' or 'off'")))
}

/// `-chardev socket|stdio,id=ID,...` as a monitor endpoint (`-mon chardev=ID`):
/// `path=`, `host=`/`port=` or an inherited `fd=`.
pub fn chardev_endpoint(text: &str) -> Result<(String, Endpoint), OptionError> {
    let opts = split_opts(text, Some("backend"))?;
    let mut backend = String::new();
    let mut id = None;
    let (mut path, mut host, mut port, mut fd) = (None, None, None, None);
    let (mut server, mut wait) = (false, true);
    for (k, v) in opts {
        match k.as_str() {
            "backend" => backend = v,
            "id" => id = Some(v),
            "path" => path = Some(v),
            "fd" => fd = Some(v),
            "host" => host = Some(v),
            "port" => port = Some(v),
            "server" => server = on_off(&k, &v)?,
            "wait" => wait = on_off(&k, &v)?,
            "nowait" => wait = false,
            "telnet" | "tn3270" | "websocket" if on_off(&k, &v)? => {
                return Err(err(format!("'{k}' is not supported")));
            }
            "telnet" | "tn3270" | "websocket" | "mux" | "logfile" | "logappend" | "signal" => {}
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| err("Parameter 'id' is missing"))?;
    let ep = match backend.as_str() {
        "stdio" => Endpoint::Stdio,
        "socket" => match (path, host, port) {
            (None, None, None) if fd.is_some() => Endpoint::Fd {
                fd: fd
                    .as_deref()
                    .and_then(|f| f.parse().ok())
                    .filter(|&n: &i32| n >= 0)
                    .ok_or_else(|| err("Parameter 'fd' expects a file descriptor number"))?,
                server,
            },
            _ if fd.is_some() => {
                return Err(err("fd= cannot be combined with path= or host=/port="));
            }
            (Some(path), None, None) => Endpoint::Unix {
                path: PathBuf::from(path),
                server,
                wait,
            },
            (None, host, Some(port)) => Endpoint::Tcp {
                host: host
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".into()),
                port: port
                    .parse()
                    .map_err(|_| err(format!("'{port}' is not a TCP port")))?,
                server,
                wait,
            },
            _ => {
                return Err(err("a socket chardev needs path=, host=/port= or fd="));
            }
        },
        other => {
            return Err(err(format!(
                "chardev backend '{other}' is not supported (use socket or stdio)"
            )));
        }
    };
    Ok((id, ep))
}

/// `-blockdev driver=file,filename=PATH,node-name=N[,read-only=on]` or the shorthand
/// `-drive file=PATH,if=none,id=N,format=raw[,readonly=on]`.
pub fn blockdev(name: &str, text: &str) -> Result<BlockdevAdd, OptionError> {
    let mut driver = None;
    let (mut file, mut node, mut ro) = (None, None, false);
    for (k, v) in split_opts(text, None)? {
        match (name, k.as_str()) {
            ("blockdev", "driver") => driver = Some(v),
            ("blockdev", "filename") | ("drive", "file") => file = Some(v),
            ("blockdev", "node-name") | ("drive", "id") => node = Some(v),
            ("blockdev", "read-only") | ("drive", "readonly") => ro = on_off(&k, &v)?,
            ("drive", "if") if v == "none" => {}
            ("drive", "format") if v == "raw" => {}
            ("drive", "if" | "format") => {
                return Err(err(format!(
                    "{k}={v} is not supported (use if=none,format=raw and a -device)"
                )));
            }
            ("blockdev", "discard" | "cache.direct" | "aio") | ("drive", "cache" | "aio") => {}
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let driver = match name {
        "drive" => "file".to_owned(),
        _ => driver.ok_or_else(|| err("Parameter 'driver' is missing"))?,
    };
    let key = if name == "drive" { "id" } else { "node-name" };
    Ok(BlockdevAdd {
        driver,
        node_name: node.ok_or_else(|| err(format!("Parameter '{key}' is missing")))?,
        filename: file
            .ok_or_else(|| err("Parameter 'filename' is missing"))?
            .into(),
        read_only: Some(ro),
    })
}

/// `-netdev tap,id=N,ifname=IF,script=no,downscript=no`.
pub fn netdev(text: &str) -> Result<NetdevAdd, OptionError> {
    let mut n = NetdevAdd {
        kind: String::new(),
        id: String::new(),
        ifname: None,
        script: None,
        downscript: None,
    };
    for (k, v) in split_opts(text, Some("type"))? {
        match k.as_str() {
            "type" => n.kind = v,
            "id" => n.id = v,
            "ifname" => n.ifname = Some(v),
            "script" => n.script = Some(v),
            "downscript" => n.downscript = Some(v),
            "vhost" if v == "off" => {}
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    if n.id.is_empty() {
        return Err(err("Parameter 'id' is missing"));
    }
    Ok(n)
}

/// `-chardev file,id=ID,path=PATH`, `-chardev null,id=ID`, `-chardev stdio,id=ID` as device
/// backends; `None` for the other backends (sockets for `-mon`).
pub fn char_backend(text: &str) -> Result<Option<ChardevAdd>, OptionError> {
    let opts = split_opts(text, Some("backend"))?;
    let kind = opts
        .iter()
        .find(|(k, _)| k == "backend")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if !matches!(kind.as_str(), "file" | "null") {
        return Ok(None);
    }
    let (mut id, mut path) = (None, None);
    for (k, v) in opts {
        match k.as_str() {
            "backend" => {}
            "id" => id = Some(v),
            "path" if kind == "file" => path = Some(v),
            "append" | "logfile" | "logappend" => {}
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| err("Parameter 'id' is missing"))?;
    let backend = match (kind.as_str(), path) {
        ("file", Some(p)) => serde_json::json!({"type": "file", "data": {"out": p}}),
        ("file", None) => return Err(err("Parameter 'path' is missing")),
        _ => serde_json::json!({"type": "null", "data": {}}),
    };
    Ok(Some(ChardevAdd { id, backend }))
}

/// QEMU's `-uuid` form: 8-4-4-4-12 hex digits.
pub fn uuid_ok(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `-device` as JSON (`{"driver": ..., "id": ..., ...}`, libvirt's form).
pub fn device_json(v: &str) -> Result<DeviceAdd, OptionError> {
    let mut map: Map<String, Value> =
        serde_json::from_str(v).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let text = |map: &mut Map<String, Value>, k: &str| -> Result<Option<String>, OptionError> {
        match map.remove(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(err(format!("Parameter '{k}' expects a string"))),
        }
    };
    let driver = text(&mut map, "driver")?.ok_or_else(|| err("Parameter 'driver' is missing"))?;
    Ok(DeviceAdd {
        driver,
        id: text(&mut map, "id")?,
        bus: text(&mut map, "bus")?,
        props: map,
    })
}

/// `query-command-line-options`: the options whose parameters Keel declares (all, or
/// `option` alone; an unknown one is QEMU's error).
pub fn command_line_options(
    option: Option<&str>,
) -> Result<Vec<crate::misc::CommandLineOptionInfo>, OptionError> {
    use crate::misc::{CommandLineOptionInfo as Opt, CommandLineParameterInfo as Param};
    let p = |name: &str, ty: &str| Param {
        name: name.into(),
        ty: ty.into(),
        help: None,
    };
    let opt = |name: &str, parameters| Opt {
        option: name.into(),
        parameters,
    };
    let all = vec![
        opt("machine", vec![p("type", "string"), p("accel", "string")]),
        opt("accel", vec![p("accel", "string")]),
        opt("chardev", Vec::new()),
        opt("device", Vec::new()),
        opt("netdev", Vec::new()),
        // The binary reads it (keel-sandbox); libvirt passes it when it is listed.
        opt(
            "sandbox",
            [
                "enable",
                "obsolete",
                "elevateprivileges",
                "spawn",
                "resourcecontrol",
            ]
            .iter()
            .map(|n| p(n, if *n == "enable" { "boolean" } else { "string" }))
            .collect(),
        ),
    ];
    match option {
        None => Ok(all),
        Some(o) => {
            let v: Vec<Opt> = all.into_iter().filter(|i| i.option == o).collect();
            if v.is_empty() {
                Err(err(format!("invalid option name: {o}")))
            } else {
                Ok(v)
            }
        }
    }
}
