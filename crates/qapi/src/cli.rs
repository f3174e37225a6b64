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
use crate::net::{NetdevAdd, StringWrapper};
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

/// Splits an accelerator as `-accel` passes it to `accel-set` (`NAME,PROP=VALUE,...`) into
/// its name and its properties, in order. A property without `=` is `PROP=on`, as QEMU's
/// option syntax reads it.
pub fn accel_props(spec: &str) -> (&str, Vec<(String, String)>) {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let props = parts
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), "on".to_owned()),
        })
        .collect();
    (name, props)
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

/// `-blockdev driver=file,filename=PATH,node-name=N[,read-only=on]` (or `driver=raw` over
/// a file node, `file=NODE`; or either as JSON, as libvirt writes them) or the shorthand
/// `-drive file=PATH,if=none,id=N,format=raw[,readonly=on]`.
pub fn blockdev(name: &str, text: &str) -> Result<BlockdevAdd, OptionError> {
    if name == "blockdev" && text.trim_start().starts_with('{') {
        return blockdev_opts(name, json_pairs(text)?);
    }
    blockdev_opts(name, split_opts(text, None)?)
}

/// A JSON option value as `key=value` pairs: booleans as `on`/`off`, one level of nested
/// objects flattened to `outer.inner` (QEMU's dotted keys).
fn json_pairs(text: &str) -> Result<Vec<(String, String)>, OptionError> {
    let map: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let scalar = |k: &str, val: Value| match val {
        Value::String(s) => Ok(s),
        Value::Bool(b) => Ok(if b { "on" } else { "off" }.to_owned()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(err(format!("Parameter '{k}' expects a scalar value"))),
    };
    let mut v = Vec::new();
    for (k, val) in map {
        if let Value::Object(inner) = val {
            for (ik, ival) in inner {
                let key = format!("{k}.{ik}");
                let text = scalar(&key, ival)?;
                v.push((key, text));
            }
        } else {
            let text = scalar(&k, val)?;
            v.push((k, text));
        }
    }
    Ok(v)
}

/// Checks a `-drive` `rerror=`/`werror=` value as QEMU does (`-drive` takes neither
/// `auto` nor a read action of `enospc`).
fn drive_error_action(key: &str, value: &str) -> Result<(), OptionError> {
    let write = key == "werror";
    match value {
        "ignore" | "report" | "stop" => Ok(()),
        "enospc" if write => Ok(()),
        _ => Err(err(format!(
            "'{value}' invalid {} error action",
            if write { "write" } else { "read" }
        ))),
    }
}

/// The `rerror=` and `werror=` of a `-drive` (checked by [`blockdev`]): the drive's error
/// policy, which a disk on it follows unless its own property says otherwise.
pub fn drive_error_policy(text: &str) -> Result<(Option<String>, Option<String>), OptionError> {
    let mut policy = (None, None);
    for (k, v) in split_opts(text, None)? {
        match k.as_str() {
            "rerror" => policy.0 = Some(v),
            "werror" => policy.1 = Some(v),
            _ => {}
        }
    }
    Ok(policy)
}

/// `-drive ...,if=virtio`: QEMU's shorthand for a drive and the architecture's virtio disk
/// (`virtio-blk`, on x86 the alias of `virtio-blk-pci`) that uses it. The drive's id,
/// when not given, is QEMU's `virtio<N>` with N counting the `if=virtio` drives so far.
/// `None` when the drive is not `if=virtio`.
pub fn virtio_drive(
    text: &str,
    index: usize,
) -> Result<Option<(BlockdevAdd, DeviceAdd)>, OptionError> {
    let mut opts = split_opts(text, None)?;
    let Some(at) = opts.iter().position(|(k, v)| k == "if" && v == "virtio") else {
        return Ok(None);
    };
    // The drive itself is if=none: the disk is the device added with it.
    opts[at].1 = "none".into();
    if !opts.iter().any(|(k, _)| k == "id") {
        opts.push(("id".into(), format!("virtio{index}")));
    }
    let drive = blockdev_opts("drive", opts)?;
    let mut props = Map::new();
    props.insert("drive".into(), Value::String(drive.node_name.clone()));
    let device = DeviceAdd {
        driver: "virtio-blk".into(),
        id: None,
        bus: None,
        props,
    };
    Ok(Some((drive, device)))
}

fn blockdev_opts(name: &str, opts: Vec<(String, String)>) -> Result<BlockdevAdd, OptionError> {
    let mut driver = None;
    let (mut file, mut node, mut ro) = (None, None, false);
    let (mut child, mut auto_ro, mut discard) = (None, None, None);
    let has_if = opts.iter().any(|(k, _)| k == "if");
    for (k, v) in opts {
        match (name, k.as_str()) {
            ("blockdev", "driver") => driver = Some(v),
            ("blockdev", "file") => child = Some(v),
            ("blockdev", "auto-read-only") => auto_ro = Some(on_off(&k, &v)?),
            ("blockdev", "discard") => discard = Some(v),
            ("blockdev", "filename") | ("drive", "file") => file = Some(v),
            ("blockdev", "node-name") | ("drive", "id") => node = Some(v),
            ("blockdev", "read-only") | ("drive", "readonly") => ro = on_off(&k, &v)?,
            ("drive", "if") if v == "none" => {}
            ("drive", "format") if v == "raw" => {}
            ("drive", "if" | "format") => {
                return Err(err(format!(
                    "{k}={v} is not supported (use if=virtio, or if=none and a -device; format=raw)"
                )));
            }
            ("blockdev", "cache.direct" | "cache.no-flush" | "aio")
            | ("drive", "cache" | "aio") => {}
            ("drive", "rerror" | "werror") => drive_error_action(&k, &v)?,
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let driver = match name {
        "drive" => "file".to_owned(),
        _ => driver.ok_or_else(|| err("Parameter 'driver' is missing"))?,
    };
    if name == "drive" && !has_if {
        return Err(err(
            "if=ide (-drive's default) is not supported: Keel's machines have no IDE \
             controller; use if=virtio, or if=none,id=ID with -device virtio-blk-pci,drive=ID",
        ));
    }
    let key = if name == "drive" { "id" } else { "node-name" };
    let node_name = node.ok_or_else(|| err(format!("Parameter '{key}' is missing")))?;
    if driver == "file" && file.is_none() {
        return Err(err("Parameter 'filename' is missing"));
    }
    Ok(BlockdevAdd {
        driver,
        node_name,
        filename: file.map(Into::into),
        file: child,
        read_only: Some(ro),
        auto_read_only: auto_ro,
        discard,
    })
}

/// `-netdev tap,id=N,ifname=IF,script=no,downscript=no` and
/// `-netdev user,id=N[,net=ADDR[/MASK]][,host=][,dhcpstart=][,dns=][,hostname=]
/// [,domainname=][,restrict=on|off][,ipv4=][,ipv6=][,hostfwd=RULE]...`.
pub fn netdev(text: &str) -> Result<NetdevAdd, OptionError> {
    let n = netdev_opts(split_opts(text, Some("type"))?)?;
    if n.id.is_empty() {
        return Err(err("Parameter 'id' is missing"));
    }
    Ok(n)
}

/// The options of one netdev (of `-netdev`, or what `-nic` leaves after its own).
fn netdev_opts(opts: Vec<(String, String)>) -> Result<NetdevAdd, OptionError> {
    let mut n = NetdevAdd::default();
    for (k, v) in opts {
        match k.as_str() {
            "type" => n.kind = v,
            "id" => n.id = v,
            "vhost" if v == "off" => {}
            "ifname" => n.ifname = Some(v),
            "script" => n.script = Some(v),
            "downscript" => n.downscript = Some(v),
            "net" => n.net = Some(v),
            "host" => n.host = Some(v),
            "dhcpstart" => n.dhcpstart = Some(v),
            "dns" => n.dns = Some(v),
            "hostname" => n.hostname = Some(v),
            "domainname" => n.domainname = Some(v),
            "restrict" => n.restrict = Some(on_off(&k, &v)?),
            "ipv4" => n.ipv4 = Some(on_off(&k, &v)?),
            "ipv6" => n.ipv6 = Some(on_off(&k, &v)?),
            // Repeatable: each one is a rule.
            "hostfwd" => n
                .hostfwd
                .get_or_insert_with(Vec::new)
                .push(StringWrapper { str: v }),
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(n)
}

/// `-nic TYPE[,id=ID][,model=M][,mac=MAC][,backend options]` (QEMU's shorthand for a
/// netdev and its NIC): the netdev (named `__org.qemu.nicN` without `id=`) and the
/// device. QEMU's default model is `e1000` on `pc`, which Keel does not have, so a model
/// must be given: `virtio-net-pci` (or `virtio`) on pc; `virtio-net-device` on microvm,
/// where QEMU itself creates no NIC for `-nic`.
pub fn nic(text: &str, index: usize) -> Result<(NetdevAdd, DeviceAdd), OptionError> {
    let mut opts = split_opts(text, Some("type"))?;
    let mut take = |key: &str| {
        opts.iter()
            .position(|(k, _)| k == key)
            .map(|i| opts.remove(i).1)
    };
    let model = take("model");
    let mac = take("mac");
    let kind = take("type").unwrap_or_else(|| "user".into());
    let id = take("id").unwrap_or_else(|| format!("__org.qemu.nic{index}"));
    opts.push(("type".into(), kind));
    opts.push(("id".into(), id.clone()));
    let netdev = netdev_opts(opts)?;
    let driver = match model.as_deref() {
        None => {
            return Err(err(
                "QEMU's default NIC model (e1000 on pc) is not available in Keel: add \
                 model=virtio-net-pci (pc) or model=virtio-net-device (microvm)",
            ));
        }
        Some("virtio") => "virtio-net-pci".to_owned(),
        Some(m @ ("virtio-net-pci" | "virtio-net-device")) => m.to_owned(),
        Some(m) => {
            return Err(err(format!(
                "NIC model '{m}' is not available in Keel (use model=virtio-net-pci, or \
                 virtio-net-device on microvm)"
            )));
        }
    };
    let mut props = Map::new();
    props.insert("netdev".into(), Value::String(id));
    if let Some(mac) = mac {
        props.insert("mac".into(), Value::String(mac));
    }
    Ok((
        netdev,
        DeviceAdd {
            driver,
            id: None,
            bus: None,
            props,
        },
    ))
}

/// `-chardev file,id=ID,path=PATH[,append=on]`, `-chardev pty,id=ID`,
/// `-chardev null,id=ID` (each with `logfile=PATH[,logappend=on]`) as device backends;
/// `None` for the other backends (sockets and stdio, for `-mon`).
pub fn char_backend(text: &str) -> Result<Option<ChardevAdd>, OptionError> {
    let opts = split_opts(text, Some("backend"))?;
    let kind = opts
        .iter()
        .find(|(k, _)| k == "backend")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if !matches!(kind.as_str(), "file" | "null" | "pty") {
        return Ok(None);
    }
    let (mut id, mut data) = (None, Map::new());
    for (k, v) in opts {
        match k.as_str() {
            "backend" => {}
            "id" => id = Some(v),
            "path" if kind == "file" => {
                data.insert("out".into(), Value::String(v));
            }
            "logfile" => {
                data.insert("logfile".into(), Value::String(v));
            }
            "append" if kind == "file" => {
                data.insert("append".into(), Value::Bool(on_off(&k, &v)?));
            }
            "logappend" => {
                data.insert("logappend".into(), Value::Bool(on_off(&k, &v)?));
            }
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| err("Parameter 'id' is missing"))?;
    if kind == "file" && !data.contains_key("out") {
        return Err(err("Parameter 'path' is missing"));
    }
    let backend = serde_json::json!({"type": kind, "data": data});
    Ok(Some(ChardevAdd { id, backend }))
}

/// `-object QOM-TYPE,id=ID,KEY=VALUE...` or its JSON form
/// (`{"qom-type": ..., "id": ..., ...}`, libvirt's): the type, the id and the other
/// properties as text (JSON numbers in decimal, booleans as `on`/`off`). Which types and
/// properties exist is the backend store's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectAdd {
    /// QOM type (`secret`, `memory-backend-ram`).
    pub qom_type: String,
    /// Object id.
    pub id: String,
    /// The other properties, in order.
    pub props: Vec<(String, String)>,
}

/// Reads `-object`'s value (see [`ObjectAdd`]).
pub fn object(text: &str) -> Result<ObjectAdd, OptionError> {
    let pairs: Vec<(String, String)> = if text.trim_start().starts_with('{') {
        let map: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let mut v = Vec::new();
        for (k, val) in map {
            let text = match val {
                Value::String(s) => s,
                Value::Bool(b) => if b { "on" } else { "off" }.to_owned(),
                Value::Number(n) => n.to_string(),
                _ => return Err(err(format!("Parameter '{k}' expects a scalar value"))),
            };
            v.push((k, text));
        }
        v
    } else {
        split_opts(text, Some("qom-type"))?
    };
    let (mut qom_type, mut id, mut props) = (None, None, Vec::new());
    for (k, v) in pairs {
        match k.as_str() {
            "qom-type" => qom_type = Some(v),
            "id" => id = Some(v),
            _ => props.push((k, v)),
        }
    }
    Ok(ObjectAdd {
        qom_type: qom_type.ok_or_else(|| err("Parameter 'qom-type' is missing"))?,
        id: id.ok_or_else(|| err("Parameter 'id' is missing"))?,
        props,
    })
}

/// `-add-fd fd=FD,set=SET[,opaque=TEXT]`: (set, fd, opaque).
pub fn add_fd(text: &str) -> Result<(u64, i32, Option<String>), OptionError> {
    let (mut fd, mut set, mut opaque) = (None, None, None);
    for (k, v) in split_opts(text, None)? {
        let num = |v: &str| -> Result<i64, OptionError> {
            v.parse()
                .map_err(|_| err(format!("Parameter '{k}' expects a number")))
        };
        match k.as_str() {
            "fd" => fd = Some(num(&v)?),
            "set" => set = Some(num(&v)?),
            "opaque" => opaque = Some(v),
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let fd = fd.ok_or_else(|| err("fd option is required and must be non-negative"))?;
    let fd = i32::try_from(fd)
        .ok()
        .filter(|f| *f >= 0)
        .ok_or_else(|| err("fd option is required and must be non-negative"))?;
    let set = set
        .and_then(|s| u64::try_from(s).ok())
        .ok_or_else(|| err("set option is required and must be non-negative"))?;
    Ok((set, fd, opaque))
}

/// `-audiodev DRIVER,id=ID` or its JSON form: (id, driver).
pub fn audiodev(text: &str) -> Result<(String, String), OptionError> {
    let pairs = if text.trim_start().starts_with('{') {
        let map: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        map.into_iter()
            .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect()
    } else {
        split_opts(text, Some("driver"))?
    };
    let (mut id, mut driver) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "id" => id = Some(v),
            "driver" => driver = Some(v),
            // The `none` driver plays nothing: its timer and buffer settings change nothing.
            "timer-period" | "in.mixing-engine" | "out.mixing-engine" => {}
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    let driver = driver.ok_or_else(|| err("Parameter 'driver' is missing"))?;
    if driver != "none" {
        return Err(err(format!(
            "Parameter 'driver' does not accept value '{driver}' (Keel has no sound: only none)"
        )));
    }
    Ok((id.ok_or_else(|| err("Parameter 'id' is missing"))?, driver))
}

/// `-overcommit mem-lock=on|off[,cpu-pm=off]`: whether to lock all memory.
pub fn overcommit(text: &str) -> Result<bool, OptionError> {
    let mut lock = false;
    for (k, v) in split_opts(text, None)? {
        match k.as_str() {
            "mem-lock" => lock = on_off(&k, &v)?,
            "cpu-pm" if !on_off(&k, &v)? => {}
            "cpu-pm" => {
                return Err(err(
                    "cpu-pm=on is not supported: Keel's vCPUs always exit on HLT and MWAIT",
                ));
            }
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(lock)
}

/// `-msg timestamp=on|off[,guest-name=on|off]`: whether error lines carry a timestamp.
pub fn msg(text: &str) -> Result<bool, OptionError> {
    let mut ts = false;
    for (k, v) in split_opts(text, None)? {
        match k.as_str() {
            "timestamp" => ts = on_off(&k, &v)?,
            "guest-name" if !on_off(&k, &v)? => {}
            "guest-name" => return Err(err("guest-name=on is not supported")),
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(ts)
}

/// `-rtc [base=utc|localtime|DATE][,clock=host|rt|vm][,driftfix=none|slew]`: the base, if
/// given (read by `keel_machine::backends::rtc_offset`). The clocks and drift fixes are
/// QEMU's names, accepted: Keel's RTC always advances with the host's time (QEMU's
/// `clock=vm` would stop it while the VM is paused), and it never loses ticks to make up.
pub fn rtc(text: &str) -> Result<Option<String>, OptionError> {
    let mut base = None;
    for (k, v) in split_opts(text, None)? {
        match (k.as_str(), v.as_str()) {
            ("base", _) => base = Some(v),
            ("clock", "host" | "rt" | "vm") | ("driftfix", "none" | "slew") => {}
            ("clock" | "driftfix", _) => {
                return Err(err(format!("invalid option value '{v}'")));
            }
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(base)
}

/// `-action shutdown=..,reboot=..,panic=..,watchdog=..`: `set-action`'s arguments (its
/// handler checks the values, as for QMP).
pub fn action(text: &str) -> Result<crate::misc::SetAction, OptionError> {
    let mut a = crate::misc::SetAction::default();
    for (k, v) in split_opts(text, None)? {
        let slot = match k.as_str() {
            "shutdown" => &mut a.shutdown,
            "reboot" => &mut a.reboot,
            "panic" => &mut a.panic,
            "watchdog" => &mut a.watchdog,
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        };
        *slot = Some(v);
    }
    Ok(a)
}

/// `-boot strict=on|off[,menu=off]`: checked only. Keel boots the `-kernel` directly with
/// no firmware, so there is no boot device list for `strict` to restrict; boot orders and
/// menus (firmware features) are refused.
pub fn boot(text: &str) -> Result<(), OptionError> {
    for (k, v) in split_opts(text, Some("order"))? {
        let b = |v: &str| {
            keyval::parse_bool(v)
                .ok_or_else(|| err(format!("Parameter 'boot.{k}' expects 'on' or 'off'")))
        };
        match k.as_str() {
            "strict" => {
                b(&v)?;
            }
            "menu" if !b(&v)? => {}
            "order" | "once" | "menu" | "splash" | "splash-time" | "reboot-timeout" => {
                return Err(err(format!(
                    "boot.{k} is not supported: Keel has no firmware (it boots -kernel directly)"
                )));
            }
            _ => return Err(err(format!("Parameter 'boot.{k}' is unexpected"))),
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The two `-blockdev` libvirt 9.0 writes for a raw file disk, in JSON, and the same
    /// pair in key=value form.
    #[test]
    fn blockdev_reads_libvirts_file_and_raw_pair() {
        let storage = blockdev(
            "blockdev",
            r#"{"driver":"file","filename":"/d.raw","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
        )
        .unwrap();
        assert_eq!(storage.driver, "file");
        assert_eq!(storage.filename, Some("/d.raw".into()));
        assert_eq!(
            (storage.auto_read_only, storage.discard.as_deref()),
            (Some(true), Some("unmap"))
        );
        let format = blockdev(
            "blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"}"#,
        )
        .unwrap();
        assert_eq!(format.driver, "raw");
        assert_eq!(format.file.as_deref(), Some("libvirt-1-storage"));
        assert_eq!((format.filename, format.read_only), (None, Some(false)));
        let kv = blockdev("blockdev", "driver=raw,node-name=f,file=s,read-only=on").unwrap();
        assert_eq!((kv.file.as_deref(), kv.read_only), (Some("s"), Some(true)));
        let e = blockdev("blockdev", r#"{"driver":"file","node-name":"s"}"#).unwrap_err();
        assert!(e.to_string().contains("'filename' is missing"), "{e}");
        let e = blockdev("blockdev", r#"{"driver":"file","x":[1]}"#).unwrap_err();
        assert!(e.to_string().contains("scalar"), "{e}");
        assert!(blockdev("blockdev", r#"{"driver":"#).is_err());
    }
}
