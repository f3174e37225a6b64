//! Every command the VMM serves: one Rust type per command, used alike by QMP, the
//! command line and embedders (`Vmm::execute(commands::QueryStatus {})`).
//!
//! The types, their QAPI schema and the list of commands are [`keel_qapi`]'s (re-exported
//! here by domain); this module holds what each does on the VMM's state.

use keel_phase::RunState;
use keel_qmp::{CommandError, Handler, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use keel_qapi::block::*;
pub use keel_qapi::char::*;
pub use keel_qapi::machine::*;
pub use keel_qapi::misc::*;
pub use keel_qapi::net::*;
pub use keel_qapi::pci::*;
pub use keel_qapi::qdev::*;
pub use keel_qapi::qom::*;

use crate::core::{ShutdownCause, VmmCore};
use crate::devices::qdev_error;

/// Converts the VMM's own report types (board, qdev) into their QMP shapes in
/// [`keel_qapi`], which serialise the same; a mismatch is a bug reported as an error.
fn qapi<T: Serialize, U: DeserializeOwned>(v: T) -> Result<U, CommandError> {
    serde_json::to_value(v)
        .and_then(serde_json::from_value)
        .map_err(|e| CommandError::generic(format!("internal error: no QMP shape: {e}")))
}

/// `impl Handler<VmmCore>` for each type: `Type => |args, core, registry| body;`.
macro_rules! handlers {
    ($($ty:ty => |$s:pat_param, $c:pat_param, $r:pat_param| $body:expr;)*) => {$(
        impl Handler<VmmCore> for $ty {
            fn handle(
                self,
                $c: &mut VmmCore,
                $r: &Registry<VmmCore>,
            ) -> Result<<$ty as keel_qmp::Command>::Output, CommandError> {
                let $s = self;
                $body
            }
        }
    )*};
}

handlers! {
    QueryVersion => |_, _, _| Ok(VersionInfo::current());
    QueryCommands => |_, _, r| Ok(r.commands());
    QueryQmpSchema => |_, _, r| Ok(r.schema());
    QueryName => |_, c, _| Ok(NameInfo { name: c.name.clone() });
    QueryUuid => |_, c, _| Ok(UuidInfo {
        uuid: c.uuid.clone().unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into()),
    });
    QueryStatus => |_, c, _| {
        let status = c.run_state();
        Ok(StatusInfo { running: status.is_running(), singlestep: false, status })
    };
    QueryPhase => |_, c, _| Ok(PhaseInfo { phase: c.tracker.phase() });
    QueryMachines => |_, c, _| qapi(c.machine_infos());
    QueryAccels => |_, c, _| Ok(c.accel_infos());
    QueryKvm => |_, c, _| Ok(c.kvm_info());
    QueryCpusFast => |_, c, _| qapi(c.board.as_ref().map(|b| b.cpus()).unwrap_or_default());
    QueryPci => |_, c, _| qapi(c.board.as_ref().map(|b| b.pci()).unwrap_or_default());
    MachineSet => |a, c, _| c.machine_set(a);
    BootSet => |a, c, _| c.boot_set(a);
    SerialAdd => |a, c, _| c.serial_add(a.backend);
    AccelSet => |a, c, _| c.accel_set(&match a.accel {
        AccelList::One(a) => vec![a],
        AccelList::Many(v) => v,
    });
    MachineInit => |_, c, _| c.machine_init();
    MachineDone => |_, c, _| c.machine_done();
    DeviceAdd => |a, c, _| c.device_add(a);
    Cont => |_, c, _| c.cont();
    Stop => |_, c, _| c.stop();
    SystemReset => |_, c, _| c.system_reset();
    SystemPowerdown => |_, c, _| c.system_powerdown();
    Quit => |_, c, _| {
        c.shutdown.request(ShutdownCause::HostQmpQuit);
        Ok(())
    };
    QomSet => |a, c, _| c.qom_set(&a.path, &a.property, &a.value);
    DeviceDel => |a, c, _| c.device_del(&a.id);
    QomList => |a, c, _| {
        if c.cpu_path(&a.path) {
            return c.cpu_props();
        }
        qapi(c.with_tree(|t| t.qom_list(&a.path)).map_err(|e| qdev_error(&e))?)
    };
    QomGet => |a, c, _| {
        if c.cpu_path(&a.path) {
            return c.cpu_get(&a.property);
        }
        c.with_tree(|t| t.qom_get(&a.path, &a.property)).map_err(|e| qdev_error(&e))
    };
    QomListTypes => |a, c, _| {
        let include_abstract = a.include_abstract.unwrap_or(false);
        let mut v: Vec<ObjectTypeInfo> = qapi(c.with_tree(|t| {
            t.qom_list_types(a.implements.as_deref(), include_abstract)
        }))?;
        // Accelerators, machine types and CPU models are QOM types too (libvirt looks
        // for `tcg-accel`/`kvm-accel` and `<machine>-machine`).
        let extra = extra_types(c);
        for (name, parent, is_abstract) in &extra {
            if (*is_abstract && !include_abstract)
                || a.implements.as_deref().is_some_and(|i| !implements(&extra, name, i))
                || v.iter().any(|t| t.name == *name)
            {
                continue;
            }
            v.push(ObjectTypeInfo {
                name: name.clone(),
                is_abstract: *is_abstract,
                parent: Some((*parent).to_owned()),
            });
        }
        Ok(v)
    };
    DeviceListProperties => |a, c, _| {
        qapi(c.with_tree(|t| t.device_list_properties(&a.typename)).map_err(|e| qdev_error(&e))?)
    };
    XQueryDeviceTree => |_, c, _| qapi(c.with_tree(|t| t.query_tree()));
}

impl Handler<VmmCore> for HumanMonitorCommand {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<String, CommandError> {
        let words: Vec<&str> = self.command_line.split_whitespace().collect();
        match words.as_slice() {
            ["info", "status"] => {
                let s = c.run_state();
                let mut line = format!(
                    "VM status: {}",
                    if s.is_running() { "running" } else { "paused" }
                );
                if !s.is_running() && s != RunState::Paused {
                    line.push_str(&format!(" ({s})"));
                }
                Ok(line + "\r\n")
            }
            ["info", "version"] => {
                let v = VersionInfo::current();
                Ok(format!(
                    "{}.{}.{} ({})\r\n",
                    v.qemu.major, v.qemu.minor, v.qemu.micro, v.package
                ))
            }
            ["info", "kvm"] => {
                let k = c.kvm_info();
                let state = match (k.present, k.enabled) {
                    (false, _) => "not compiled",
                    (true, true) => "enabled",
                    (true, false) => "disabled",
                };
                Ok(format!("kvm support: {state}\r\n"))
            }
            ["info", "cpus"] => {
                // As QEMU: the monitor's current CPU (the first) is starred.
                let cpus = c.board.as_ref().map(|b| b.cpus()).unwrap_or_default();
                Ok(cpus
                    .iter()
                    .enumerate()
                    .map(|(i, cpu)| {
                        let mark = if i == 0 { '*' } else { ' ' };
                        format!(
                            "{mark} CPU #{}: thread_id={}\r\n",
                            cpu.cpu_index, cpu.thread_id
                        )
                    })
                    .collect())
            }
            ["info", "name"] => Ok(c
                .name
                .as_ref()
                .map(|n| format!("{n}\r\n"))
                .unwrap_or_default()),
            [] => Ok(String::new()),
            ["help" | "?"] => Ok(crate::hmp::help(None)),
            ["help" | "?", topic] => Ok(crate::hmp::help(Some(topic))),
            ["info"] => Ok(crate::hmp::help(Some("info"))),
            ["info", "qtree"] => Ok(c.qtree()),
            ["info", "pci"] => Ok(keel_machine::info_pci(
                &c.board.as_ref().map(|b| b.pci()).unwrap_or_default(),
            )),
            ["info", "mtree"] => Ok(c.mtree()),
            ["info", "registers", rest @ ..] => {
                let cpus = c.board.as_ref().map(|b| b.cpus()).unwrap_or_default();
                if cpus.is_empty() {
                    return Ok("No CPU available\r\n".into());
                }
                let which: Vec<u32> = match rest {
                    [] => vec![self.cpu_index.map_or(0, |i| i as u32)],
                    ["-a"] => cpus.iter().map(|c| c.cpu_index).collect(),
                    [n] => match n.parse::<u32>() {
                        Ok(i) if cpus.iter().any(|c| c.cpu_index == i) => vec![i],
                        _ => return Ok(format!("CPU#{n} not available\r\n")),
                    },
                    _ => {
                        return Ok("registers: extraneous characters at the end of line\r\n".into());
                    }
                };
                let Some(board) = c.board.as_mut() else {
                    return Ok("No CPU available\r\n".into());
                };
                // The registers are read while the vCPUs are parked: stop them briefly if
                // they run (as QEMU synchronises the state from a running vCPU).
                let running = c.tracker.run_state().is_ok_and(|s| s.is_running());
                if running {
                    board
                        .pause()
                        .map_err(|e| CommandError::generic(e.to_string()))?;
                }
                let mut out = String::new();
                for i in which {
                    match board.cpu_registers(i) {
                        Some(r) => out.push_str(&crate::hmp::registers(i, &r.regs, &r.sregs)),
                        None => {
                            out.push_str(&format!("\r\nCPU#{i}\r\n(registers unavailable)\r\n"))
                        }
                    }
                }
                if running {
                    board
                        .resume()
                        .map_err(|e| CommandError::generic(e.to_string()))?;
                }
                Ok(out)
            }
            ["cont" | "c"] => c.cont().map(|()| String::new()),
            ["stop" | "s"] => c.stop().map(|()| String::new()),
            ["system_reset"] => c.system_reset().map(|()| String::new()),
            ["system_powerdown"] => c.system_powerdown().map(|()| String::new()),
            ["quit" | "q"] => {
                c.shutdown.request(ShutdownCause::HostQmpQuit);
                Ok(String::new())
            }
            ["info", sub, ..] if !crate::hmp::INFO.iter().any(|(n, _, _)| n == sub) => {
                Ok(format!("unknown command: 'info {sub}'\r\n"))
            }
            [cmd, ..]
                if !crate::hmp::COMMANDS
                    .iter()
                    .any(|(n, _, _)| n.split('|').any(|a| a == *cmd)) =>
            {
                Ok(format!("unknown command: '{cmd}'\r\n"))
            }
            _ => Err(CommandError::generic(format!(
                "HMP command '{}' is not supported with these arguments (see 'help')",
                self.command_line.trim()
            ))),
        }
    }
}

impl Handler<VmmCore> for BlockdevAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        if self.driver != "file" {
            return Err(CommandError::generic(format!(
                "blockdev driver '{}' is not supported (use driver=file with a raw image)",
                self.driver
            )));
        }
        c.backends
            .add_block(
                &self.node_name,
                crate::backends::BlockBackend {
                    filename: self.filename,
                    read_only: self.read_only.unwrap_or(false),
                },
            )
            .map_err(|e| CommandError::generic(e.to_string()))
    }
}

impl Handler<VmmCore> for NetdevAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        if self.kind != "tap" {
            return Err(CommandError::generic(format!(
                "netdev type '{}' is not supported (use type=tap)",
                self.kind
            )));
        }
        for (k, v) in [("script", &self.script), ("downscript", &self.downscript)] {
            if let Some(v) = v
                && v != "no"
            {
                return Err(CommandError::generic(format!(
                    "Parameter '{k}' must be 'no': Keel does not run network scripts"
                )));
            }
        }
        let ifname = self.ifname.ok_or_else(|| {
            CommandError::generic("Parameter 'ifname' is missing (name the host tap interface)")
        })?;
        c.backends
            .add_net(&self.id, crate::backends::NetBackend { ifname })
            .map_err(|e| CommandError::generic(e.to_string()))
    }
}

impl Handler<VmmCore> for ChardevAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<ChardevReturn, CommandError> {
        use crate::backends::CharBackend;
        let kind = self.backend.get("type").and_then(Value::as_str);
        let data = self.backend.get("data");
        let backend = match kind {
            Some("null") => CharBackend::Null,
            Some("stdio") => CharBackend::Stdio,
            Some("file") => {
                let out = data.and_then(|d| d.get("out")).and_then(Value::as_str);
                match out {
                    Some(p) if !p.is_empty() => CharBackend::File { path: p.into() },
                    _ => {
                        return Err(CommandError::generic(
                            "Parameter 'backend.data.out' is missing (the output file)",
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(CommandError::generic(format!(
                    "chardev backend '{other}' is not supported for devices (use file, null or stdio)"
                )));
            }
            None => {
                return Err(CommandError::generic("Parameter 'backend.type' is missing"));
            }
        };
        c.backends
            .add_chardev(&self.id, backend)
            .map_err(|e| CommandError::generic(e.to_string()))?;
        Ok(ChardevReturn::default())
    }
}

/// Registers every command and event of [`keel_qapi`] on `r`.
pub fn register_all(r: &mut Registry<VmmCore>) {
    macro_rules! register {
        (
            handlers: [$($h:path),* $(,)?],
            aliases: [$($a:path => $n:literal),* $(,)?],
            context_free: [$($f:path),* $(,)?] $(,)?
        ) => {
            $(r.register::<$h>();)*
            $(r.register_as::<$a>($n);)*
            // Out-of-band commands that need no VMM state: answered without its lock.
            $(r.register_context_free::<$f>();)*
        };
    }
    keel_qapi::for_each_command!(register);
    for (name, data) in keel_qapi::events() {
        r.declare_event(name, data);
    }
}

/// The JSON `data` of SHUTDOWN/RESET.
pub fn cause_data(guest: bool, cause: ShutdownCause) -> Value {
    json!({"guest": guest, "reason": cause.as_str()})
}

#[cfg(test)]
mod tests {
    use keel_qmp::Command;

    #[test]
    fn device_del_phases_are_qdevs() {
        assert_eq!(super::DeviceDel::PHASES, keel_qdev::DEVICE_DEL_PHASES);
    }
}

/// The QOM types Keel has besides its device types: (name, parent, abstract).
fn extra_types(c: &VmmCore) -> Vec<(String, &'static str, bool)> {
    let mut v: Vec<(String, &'static str, bool)> = vec![
        ("accel".into(), "object", true),
        ("machine".into(), "object", true),
        ("x86-machine".into(), "machine", true),
        ("cpu".into(), "device", true),
        ("x86_64-cpu".into(), "cpu", true),
        ("max-x86_64-cpu".into(), "x86_64-cpu", false),
        ("base-x86_64-cpu".into(), "x86_64-cpu", false),
    ];
    if c.kvm_info().present {
        v.push(("host-x86_64-cpu".into(), "max-x86_64-cpu", false));
    }
    for a in &c.accels {
        v.push((format!("{}-accel", a.name()), "accel", false));
    }
    for m in c.machines.iter().filter(|m| m.available().is_ok()) {
        let parent = if m.name() == "none" {
            "machine"
        } else {
            "x86-machine"
        };
        v.push((format!("{}-machine", m.name()), parent, false));
    }
    v
}

fn implements(types: &[(String, &'static str, bool)], ty: &str, ancestor: &str) -> bool {
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

fn prop(name: &str, ty: &str, description: Option<&str>) -> ObjectPropertyInfo {
    ObjectPropertyInfo {
        name: name.into(),
        ty: ty.into(),
        description: description.map(str::to_owned),
        default_value: None,
    }
}

impl VmmCore {
    /// The CPUID Keel's vCPUs see under the chosen accelerator.
    fn cpuid(&self) -> Result<Vec<keel_accel::CpuidLeaf>, CommandError> {
        let accel = self.accelerator.as_ref().ok_or_else(|| {
            CommandError::generic("no accelerator is selected yet: the CPU model depends on it")
        })?;
        Ok(accel.cpuid(self.config.as_ref().and_then(|c| c.cpus).unwrap_or(1)))
    }

    fn cpu_props(&self) -> Result<Vec<ObjectPropertyInfo>, CommandError> {
        let mut v = vec![prop("type", "string", None)];
        for (n, _) in crate::cpu_model::features_with_aliases(&self.cpuid()?) {
            v.push(prop(n, "bool", None));
        }
        for (n, t) in [
            ("vendor", "string"),
            ("model-id", "string"),
            ("family", "int"),
            ("model", "int"),
            ("stepping", "int"),
            ("level", "uint32"),
            ("xlevel", "uint32"),
        ] {
            v.push(prop(n, t, None));
        }
        Ok(v)
    }

    fn cpu_path(&self, path: &str) -> bool {
        self.board
            .as_ref()
            .is_some_and(|b| b.cpus().iter().any(|c| c.qom_path == path))
    }

    fn cpu_get(&self, property: &str) -> Result<Value, CommandError> {
        if property == "type" {
            return Ok(json!("max-x86_64-cpu"));
        }
        let cpuid = self.cpuid()?;
        if let Some((_, on)) = crate::cpu_model::features_with_aliases(&cpuid)
            .into_iter()
            .find(|(n, _)| *n == property)
        {
            return Ok(json!(on));
        }
        crate::cpu_model::identity(&cpuid)
            .remove(property)
            .ok_or_else(|| {
                CommandError::generic(format!("Property 'max-x86_64-cpu.{property}' not found"))
            })
    }

    /// Device ids (or paths) of the devices whose property `name` is `value`.
    fn users_of(&self, name: &str, value: &str) -> Vec<String> {
        self.board.as_ref().map_or_else(Vec::new, |b| {
            b.devices()
                .views()
                .filter(|d| {
                    matches!(d.props.get(name), Some(keel_qdev::PropValue::Str(s)) if s == value)
                })
                .map(|d| d.name().to_owned())
                .collect()
        })
    }

    fn block_node(&self, name: &str, b: &keel_machine::backends::BlockBackend) -> Value {
        let file = b.filename.display().to_string();
        let size = std::fs::metadata(&b.filename).map_or(0, |m| m.len());
        json!({
            "file": file, "node-name": name, "ro": b.read_only, "drv": "file",
            "backing_file_depth": 0, "encrypted": false, "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": {"filename": file, "format": "file", "virtual-size": size},
            "write_threshold": 0,
            "cache": {"writeback": true, "direct": false, "no-flush": false},
        })
    }

    fn qtree(&self) -> String {
        use crate::hmp::{QtreeBus, QtreeDev, qtree_value};
        fn bus(t: &keel_qdev::DeviceTree, b: &keel_qdev::BusNode) -> QtreeBus {
            QtreeBus {
                name: b.name.clone(),
                bus_type: b.bus_type.clone(),
                devices: b
                    .devices
                    .iter()
                    .map(|d| {
                        let view = t.find(&d.path).and_then(|k| t.view(k));
                        QtreeDev {
                            driver: d.driver.clone(),
                            id: d.id.clone().unwrap_or_default(),
                            props: view.map_or_else(Vec::new, |v| {
                                v.props
                                    .iter()
                                    .map(|(k, p)| {
                                        let j = serde_json::to_value(p).unwrap_or(Value::Null);
                                        (k.to_owned(), qtree_value(&j))
                                    })
                                    .collect()
                            }),
                            mmio: d
                                .resources
                                .as_ref()
                                .and_then(|r| r.mmio.as_ref())
                                .map(|w| vec![(w.base, w.len)])
                                .unwrap_or_default(),
                            buses: Vec::new(),
                        }
                    })
                    .collect(),
            }
        }
        self.with_tree(|t| {
            let mut root = QtreeBus {
                name: "main-system-bus".into(),
                bus_type: "System".into(),
                devices: Vec::new(),
            };
            for b in t.query_tree() {
                let mut qb = bus(t, &b);
                if b.path == "/machine" || b.name == "main-system-bus" {
                    root.devices.append(&mut qb.devices);
                } else {
                    root.devices.push(QtreeDev {
                        driver: b.bus_type.clone(),
                        buses: vec![qb],
                        ..Default::default()
                    });
                }
            }
            crate::hmp::qtree(&root)
        })
    }

    fn mtree(&self) -> String {
        let (mut io, mut mem) = (Vec::new(), Vec::new());
        self.with_tree(|t| {
            for d in t.views() {
                if let Some(r) = d.resources {
                    if let Some(w) = &r.pio {
                        io.push((w.base, w.len, "i/o", d.driver.to_owned()));
                    }
                    if let Some(w) = &r.mmio {
                        mem.push((w.base, w.len, "i/o", d.driver.to_owned()));
                    }
                }
            }
        });
        crate::hmp::mtree(&io, &mem)
    }
}

handlers! {
    QueryTarget => |_, _, _| Ok(TargetInfo { arch: "x86_64".into() });
    QueryIothreads => |_, _, _| Ok(Vec::new());
    QueryStats => |_, _, _| Ok(Vec::new());
    QueryStatsSchemas => |_, _, _| Ok(Vec::new());
    QueryMigrateCapabilities => |_, _, _| Ok(Vec::new());
    QueryBlockstats => |_, _, _| Ok(Vec::new());
    QueryDirtyRate => |_, _, _| Ok(DirtyRateInfo {
        status: "unstarted".into(), start_time: 0, calc_time: 0, sample_pages: 0,
        mode: "page-sampling".into(),
    });
    QuerySevCapabilities => |_, c, _| Err(CommandError::generic(if c.kvm_info().enabled {
        "SEV is not enabled in KVM"
    } else {
        "KVM not enabled"
    }));
    QuerySgxCapabilities => |_, _, _| Err(CommandError::generic("SGX is not enabled in KVM"));
    MigrateSetCapabilities => |a, _, _| match a.capabilities.first() {
        None => Ok(()),
        Some(cap) => Err(CommandError::generic(format!(
            "Parameter 'capability' does not accept value '{}'", cap.capability
        ))),
    };
    QueryCommandLineOptions => |a, _, _| {
        let p = |name: &str, ty: &str| CommandLineParameterInfo {
            name: name.into(), ty: ty.into(), help: None,
        };
        let all = vec![
            CommandLineOptionInfo { option: "machine".into(), parameters: vec![
                p("type", "string"), p("accel", "string"),
            ]},
            CommandLineOptionInfo { option: "accel".into(), parameters: vec![p("accel", "string")] },
            CommandLineOptionInfo { option: "chardev".into(), parameters: Vec::new() },
            CommandLineOptionInfo { option: "device".into(), parameters: Vec::new() },
            CommandLineOptionInfo { option: "netdev".into(), parameters: Vec::new() },
        ];
        match a.option {
            None => Ok(all),
            Some(o) => {
                let v: Vec<_> = all.into_iter().filter(|i| i.option == o).collect();
                if v.is_empty() {
                    Err(CommandError::generic(format!("invalid option name: {o}")))
                } else {
                    Ok(v)
                }
            }
        }
    };
    SetAction => |a, c, _| {
        let reject = |what: &str, v: &str| Err(CommandError::generic(format!(
            "set-action: Keel cannot take the action '{v}' for '{what}'"
        )));
        let no_reboot = c.config.as_ref().is_some_and(|cfg| cfg.no_reboot);
        if let Some(r) = &a.reboot {
            let want = r == "shutdown";
            if want != no_reboot {
                if c.board.is_some() {
                    return reject("reboot", r);
                }
                match c.config.as_mut() {
                    Some(cfg) => cfg.no_reboot = want,
                    None if want => return reject("reboot", r),
                    None => {}
                }
            }
        }
        if let Some(s) = &a.shutdown && s != "poweroff" {
            return reject("shutdown", s);
        }
        if let Some(p) = &a.panic && p != "pause" {
            return reject("panic", p);
        }
        // Keel has no watchdog device: any watchdog action stays unused.
        Ok(())
    };
    QueryCpuDefinitions => |_, c, _| {
        let def = |name: &str, is_static: bool, unavailable: Vec<String>| CpuDefinitionInfo {
            name: name.into(), typename: format!("{name}-x86_64-cpu"),
            unavailable_features: unavailable, is_static, migration_safe: is_static,
            deprecated: false,
        };
        let mut v = vec![def("max", false, Vec::new()), def("base", true, Vec::new())];
        if c.kvm_info().present {
            let missing = if c.kvm_info().enabled { Vec::new() } else { vec!["kvm".into()] };
            v.insert(1, def("host", false, missing));
        }
        Ok(v)
    };
    QueryCpuModelExpansion => |a, c, _| {
        let name = a.model.name.as_str();
        match name {
            "max" | "base" => {}
            "host" if c.kvm_info().enabled => {}
            "host" => return Err(CommandError::generic("CPU model 'host' requires KVM")),
            other => return Err(CommandError::generic(format!("CPU model '{other}' not found"))),
        }
        let cpuid = c.cpuid()?;
        let features = crate::cpu_model::features_with_aliases(&cpuid);
        // Keel presents the accelerator's CPUID as it is: a property may restate it, not
        // change it.
        for (k, v) in a.model.props.iter().flatten() {
            match features.iter().find(|(n, _)| n == k) {
                None => return Err(CommandError::generic(format!(
                    "Property '{name}-x86_64-cpu.{k}' not found"
                ))),
                Some((_, on)) if Some(*on) != v.as_bool() => {
                    return Err(CommandError::generic(format!(
                        "CPU feature '{k}' cannot be changed: Keel presents the accelerator's \
                         CPUID as it is"
                    )));
                }
                Some(_) => {}
            }
        }
        let mut props = serde_json::Map::new();
        for (n, on) in crate::cpu_model::features(&cpuid) {
            props.insert(n.into(), json!(on));
        }
        let full = a.kind == "full";
        if full {
            props.extend(crate::cpu_model::identity(&cpuid));
        }
        let out = if full && name != "base" { name } else { "base" };
        Ok(CpuModelExpansionInfo { model: CpuModelInfo { name: out.into(), props: Some(props) } })
    };
    QomListProperties => |a, c, _| {
        let t = a.typename.as_str();
        match t {
            // Keel has no memory backend objects (`-object memory-backend-*`): none of
            // their properties would be honoured.
            "memory-backend-file" | "memory-backend-memfd" | "memory-backend-ram" => Ok(Vec::new()),
            "max-x86_64-cpu" | "base-x86_64-cpu" => c.cpu_props(),
            "host-x86_64-cpu" if c.kvm_info().present => c.cpu_props(),
            "none-machine" => Ok(vec![prop("type", "string", None)]),
            "microvm-machine" => {
                let mut v = vec![prop("type", "string", None)];
                for (n, d) in [("kernel", "Linux kernel image file"),
                               ("initrd", "Linux initial ramdisk file"),
                               ("append", "Linux kernel command line")] {
                    v.push(prop(n, "string", Some(d)));
                }
                for n in ["rtc", "pit", "pic", "acpi", "isa-serial", "i8042", "auto-kernel-cmdline"] {
                    v.push(prop(n, "OnOffAuto", None));
                }
                Ok(v)
            }
            _ if extra_types(c).iter().any(|e| e.0 == t) => Ok(vec![prop("type", "string", None)]),
            _ => c.with_tree(|tr| tr.device_list_properties(t))
                .map_err(|_| CommandError::with_class(
                    keel_qmp::ErrorClass::DeviceNotFound,
                    format!("Class '{t}' not found"),
                ))
                .and_then(qapi),
        }
    };
    QueryChardev => |_, c, _| {
        let mut v = Vec::new();
        for (id, b) in c.backends.chardevs() {
            let filename = match b {
                keel_machine::backends::CharBackend::File { path } => format!("file:{}", path.display()),
                keel_machine::backends::CharBackend::Null => "null".into(),
                keel_machine::backends::CharBackend::Stdio => "stdio".into(),
            };
            let open = !c.users_of("chardev", &id).is_empty();
            v.push(ChardevInfo { label: id, filename, frontend_open: open });
        }
        // The serial port's backend (`-serial`), as QEMU's `serial0` (the machine's
        // default is stdio).
        if c.config.as_ref().is_some_and(|cfg| cfg.type_name == "microvm") {
            let s = c.config.as_ref().and_then(|cfg| cfg.serial.first().cloned())
                .unwrap_or_else(|| "stdio".into());
            let filename = match s.as_str() {
                "mon:stdio" => Some("stdio".to_owned()),
                "none" => None,
                other => Some(other.to_owned()),
            };
            if let Some(filename) = filename {
                v.push(ChardevInfo { label: "serial0".into(), filename, frontend_open: true });
            }
        }
        for (label, filename) in &c.monitors {
            v.push(ChardevInfo { label: label.clone(), filename: filename.clone(), frontend_open: true });
        }
        Ok(v)
    };
    QueryNamedBlockNodes => |_, c, _| Ok(c.backends.blocks().iter().map(|(n, b)| c.block_node(n, b)).collect());
    QueryBlock => |_, c, _| {
        let blocks = c.backends.blocks();
        let mut v = Vec::new();
        if let Some(b) = c.board.as_ref() {
            for d in b.devices().views() {
                if let Some(keel_qdev::PropValue::Str(node)) = d.props.get("drive") {
                    let inserted = blocks.iter().find(|(n, _)| n == node).map(|(n, bb)| c.block_node(n, bb));
                    let mut e = json!({
                        "device": "", "qdev": d.id.unwrap_or(d.path), "type": "unknown",
                        "removable": false, "locked": false,
                    });
                    if let Some(i) = inserted {
                        e["inserted"] = i;
                    }
                    v.push(e);
                }
            }
        }
        Ok(v)
    };
    BlockdevDel => |a, c, _| {
        let n = &a.node_name;
        if !c.backends.blocks().iter().any(|(k, _)| k == n) {
            return Err(CommandError::generic(format!("Failed to find node with node-name='{n}'")));
        }
        if !c.users_of("drive", n).is_empty() {
            return Err(CommandError::generic(format!("Node {n} is in use")));
        }
        c.backends.remove_block(n);
        Ok(())
    };
}
