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
pub use keel_qapi::fd::*;
pub use keel_qapi::machine::*;
pub use keel_qapi::migration::*;
pub use keel_qapi::misc::*;
pub use keel_qapi::net::*;
pub use keel_qapi::pci::*;
pub use keel_qapi::qdev::*;
pub use keel_qapi::qom::*;

use crate::core::{ShutdownCause, VmmCore, generic};
use crate::devices::qdev_error;
use keel_machine::backends::{BlockdevSpec, NetdevSpec, UserOptions};
use keel_machine::cpu_model;

/// Converts the VMM's own report types (board, qdev) into their QMP shapes in
/// [`keel_qapi`], which serialise the same; a mismatch is a bug reported as an error.
fn qapi<T: Serialize, U: DeserializeOwned>(v: T) -> Result<U, CommandError> {
    serde_json::to_value(v)
        .and_then(serde_json::from_value)
        .map_err(|e| CommandError::generic(format!("internal error: no QMP shape: {e}")))
}

/// The descriptor passed with the request being run (`getfd`, `add-fd`), or QEMU's error.
fn passed_fd() -> Result<std::os::fd::OwnedFd, CommandError> {
    keel_qmp::passfd::take_received_fd()
        .ok_or_else(|| CommandError::generic("No file descriptor supplied via SCM_RIGHTS"))
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
        let extra = qom_extra_types(c);
        for (name, parent, is_abstract) in &extra {
            if (*is_abstract && !include_abstract)
                || a.implements.as_deref().is_some_and(|i| !keel_qapi::qom::implements(&extra, name, i))
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
        use keel_hmp::{Cpus, Request};
        let done = |r: Result<(), CommandError>| r.map(|()| String::new());
        let cpus = c.board.as_ref().map(|b| b.cpus()).unwrap_or_default();
        Ok(match keel_hmp::parse(&self.command_line) {
            Request::Empty => String::new(),
            Request::Text(t) => t,
            Request::Status => {
                let s = c.run_state();
                keel_hmp::status(s.is_running(), s == RunState::Paused, &s.to_string())
            }
            Request::Version => {
                let v = VersionInfo::current();
                let q = v.qemu;
                format!("{}.{}.{} ({})\r\n", q.major, q.minor, q.micro, v.package)
            }
            Request::Kvm => keel_hmp::kvm(c.kvm_info().present, c.kvm_info().enabled),
            Request::CpuList => {
                let list: Vec<(u32, i64)> =
                    cpus.iter().map(|c| (c.cpu_index, c.thread_id)).collect();
                keel_hmp::cpus(&list)
            }
            Request::Name => c
                .name
                .as_ref()
                .map(|n| format!("{n}\r\n"))
                .unwrap_or_default(),
            Request::Qtree => c.qtree(),
            Request::Mtree => c.mtree(),
            Request::Pci => {
                keel_machine::info_pci(&c.board.as_ref().map(|b| b.pci()).unwrap_or_default())
            }
            Request::Registers(_) if cpus.is_empty() => "No CPU available\r\n".into(),
            Request::Registers(which) => {
                let which: Vec<u32> = match which {
                    Cpus::Current => vec![self.cpu_index.map_or(0, |i| i as u32)],
                    Cpus::All => cpus.iter().map(|c| c.cpu_index).collect(),
                    Cpus::One(i) if cpus.iter().any(|c| c.cpu_index == i) => vec![i],
                    Cpus::One(i) => return Ok(format!("CPU#{i} not available\r\n")),
                };
                c.registers(&which)?
            }
            Request::Cont => done(c.cont())?,
            Request::Stop => done(c.stop())?,
            Request::Reset => done(c.system_reset())?,
            Request::Powerdown => done(c.system_powerdown())?,
            Request::HostfwdAdd { netdev, rule } => {
                c.backends.hostfwd_command(true, netdev.as_deref(), &rule)
            }
            Request::HostfwdRemove { netdev, rule } => {
                c.backends.hostfwd_command(false, netdev.as_deref(), &rule)
            }
            Request::Quit => {
                c.shutdown.request(ShutdownCause::HostQmpQuit);
                String::new()
            }
            _ => {
                return Err(CommandError::generic(format!(
                    "HMP command '{}' is not supported with these arguments (see 'help')",
                    self.command_line.trim()
                )));
            }
        })
    }
}

impl VmmCore {
    /// `info registers` of vCPUs `which`: read while the vCPUs are parked, so running
    /// ones are stopped briefly (as QEMU synchronises the state from a running vCPU).
    fn registers(&mut self, which: &[u32]) -> Result<String, CommandError> {
        let running = self.tracker.run_state().is_ok_and(|s| s.is_running());
        let Some(board) = self.board.as_mut() else {
            return Ok("No CPU available\r\n".into());
        };
        let generic = |e: keel_machine::board::BoardError| CommandError::generic(e.to_string());
        if running {
            board.pause().map_err(generic)?;
        }
        let mut out = String::new();
        for &i in which {
            match board.cpu_registers(i) {
                Some(r) => out.push_str(&keel_hmp::registers(i, &r.regs, &r.sregs)),
                None => out.push_str(&format!("\r\nCPU#{i}\r\n(registers unavailable)\r\n")),
            }
        }
        if running {
            board.resume().map_err(generic)?;
        }
        Ok(out)
    }
}

impl Handler<VmmCore> for NetdevAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        let user = UserOptions {
            net: self.net,
            host: self.host,
            dhcpstart: self.dhcpstart,
            dns: self.dns,
            hostname: self.hostname,
            domainname: self.domainname,
            restrict: self.restrict.unwrap_or(false),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            hostfwd: self.hostfwd.into_iter().flatten().map(|s| s.str).collect(),
        };
        let (kind, ifname, script, downscript) =
            (self.kind, self.ifname, self.script, self.downscript);
        let spec = NetdevSpec {
            kind,
            ifname,
            script,
            downscript,
            user,
        };
        let r = c.backends.add_netdev(&self.id, &spec);
        r.map_err(|e| CommandError::generic(e.to_string()))
    }
}

impl Handler<VmmCore> for ChardevAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<ChardevReturn, CommandError> {
        let generic = |e: crate::backends::BackendError| CommandError::generic(e.to_string());
        use crate::backends::{CharBackend, CharLog};
        let backend = CharBackend::from_qapi(&self.backend).map_err(generic)?;
        let log = CharLog::from_qapi(&self.backend);
        let pty = c
            .backends
            .add_chardev_logged(&self.id, backend, log)
            .map_err(generic)?;
        Ok(ChardevReturn { pty })
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

/// The QOM types Keel has besides its device types (see [`keel_qapi::qom::extra_types`]).
fn qom_extra_types(c: &VmmCore) -> Vec<(String, &'static str, bool)> {
    let accels: Vec<&str> = c.accels.iter().map(|a| a.name()).collect();
    let machines: Vec<&str> = c
        .machines
        .iter()
        .filter(|m| m.available().is_ok())
        .map(|m| m.name())
        .collect();
    keel_qapi::qom::extra_types(&accels, &machines, c.kvm_info().present)
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

    /// The CPUID of the `-cpu` model (qemu64 by default) under the chosen accelerator.
    fn vcpu_cpuid(&self) -> Result<Vec<keel_accel::CpuidLeaf>, CommandError> {
        let (max, kvm) = (self.cpuid()?, self.kvm_info().enabled);
        cpu_model::vcpu_table(self.config.as_ref(), &max, kvm).map_err(CommandError::generic)
    }

    fn cpu_props(&self) -> Result<Vec<ObjectPropertyInfo>, CommandError> {
        Ok(cpu_model::properties(&self.vcpu_cpuid()?)
            .into_iter()
            .map(|(n, t)| prop(n, t, None))
            .collect())
    }

    fn cpu_path(&self, path: &str) -> bool {
        self.board
            .as_ref()
            .is_some_and(|b| b.cpus().iter().any(|c| c.qom_path == path))
    }

    fn cpu_get(&self, property: &str) -> Result<Value, CommandError> {
        cpu_model::property(&self.vcpu_cpuid()?, property).ok_or_else(|| {
            CommandError::generic(format!(
                "Property '{}.{property}' not found",
                cpu_model::CPU_TYPE
            ))
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

    fn qtree(&self) -> String {
        self.with_tree(keel_hmp::qtree_of)
    }

    fn mtree(&self) -> String {
        self.with_tree(keel_hmp::mtree_of)
    }
}

handlers! {
    QueryTarget => |_, _, _| Ok(TargetInfo { arch: "x86_64".into() });
    QueryIothreads => |_, _, _| Ok(Vec::new());
    QueryStats => |_, _, _| Ok(Vec::new());
    QueryStatsSchemas => |_, _, _| Ok(Vec::new());
    QueryMigrateCapabilities => |_, c, _| Ok(c.migration.capabilities());
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
    MigrateSetCapabilities => |a, c, _| c.migration.set_capabilities(&a);
    Migrate => |a, c, _| c.migrate(&a.uri);
    MigrateIncoming => |a, c, _| c.migrate_incoming(&a.uri);
    QueryMigrate => |_, c, _| Ok(c.migration.info());
    MigrateCancel => |_, c, _| c.migration.cancel(&c.events);
    MigrateSetParameters => |a, c, _| c.migration.set_parameters(&a);
    QueryMigrateParameters => |_, c, _| Ok(c.migration.params);
    Getfd => |a, c, _| {
        let fd = passed_fd()?;
        c.backends.keep_named_fd(&a.fdname, fd).map_err(generic)
    };
    Closefd => |a, c, _| c.backends.close_named_fd(&a.fdname).map_err(generic);
    AddFd => |a, c, _| {
        let fd = passed_fd()?;
        let (set, fd) = c.backends.add_passed_fd(a.fdset_id, fd, a.opaque).map_err(generic)?;
        Ok(AddfdInfo { fdset_id: set as i64, fd: i64::from(fd) })
    };
    RemoveFd => |a, c, _| {
        let running = c.run_state().is_running();
        c.backends.remove_fd(a.fdset_id, a.fd, running).map_err(generic)
    };
    QueryFdsets => |_, c, _| Ok(c.backends.fdsets().into_iter().map(|(set, fds)| FdsetInfo {
        fdset_id: set as i64,
        fds: fds.into_iter().map(|(fd, opaque)| FdsetFdInfo { fd: i64::from(fd), opaque }).collect(),
    }).collect());
    QueryCommandLineOptions => |a, _, _| {
        keel_qapi::cli::command_line_options(a.option.as_deref()).map_err(|e| CommandError::generic(e.0))
    };
    SetAction => |a, c, _| {
        let reject = |what: &str, v: &str| Err(CommandError::generic(format!(
            "set-action: Keel cannot take the action '{v}' for '{what}'"
        )));
        let no_reboot = c.config.as_ref().is_some_and(|cfg| cfg.no_reboot);
        if let Some(r) = &a.reboot {
            let want = r == "shutdown";
            // A built machine turns a reset into a power-off itself under -no-reboot;
            // otherwise the VMM does it when the reset request arrives.
            if !want && no_reboot && c.board.is_some() {
                return reject("reboot", r);
            }
            if let (None, Some(cfg)) = (&c.board, c.config.as_mut()) {
                cfg.no_reboot = want;
            }
            c.reboot_shutdown = want;
        }
        match a.shutdown.as_deref() {
            Some("pause") => c.shutdown_pause = true,
            Some("poweroff") => c.shutdown_pause = false,
            Some(s) => return reject("shutdown", s),
            None => {}
        }
        if let Some(p) = &a.panic && p != "pause" {
            return reject("panic", p);
        }
        // Keel has no watchdog device: any watchdog action stays unused.
        Ok(())
    };
    QueryCpuDefinitions => |_, c, _| {
        let k = c.kvm_info();
        Ok(cpu_model::definitions(c.cpuid().ok().as_deref(), k.present, k.enabled)
            .into_iter()
            .map(|(name, is_static, unavailable)| CpuDefinitionInfo {
                name: name.into(), typename: format!("{name}-x86_64-cpu"),
                unavailable_features: unavailable, is_static, migration_safe: is_static,
                deprecated: false,
            })
            .collect())
    };
    QueryCpuModelExpansion => |a, c, _| {
        let full = a.kind == "full";
        let (name, props) = cpu_model::expand(
            &c.cpuid()?, &a.model.name, full, a.model.props.as_ref(), c.kvm_info().enabled,
        )
        .map_err(CommandError::generic)?;
        Ok(CpuModelExpansionInfo { model: CpuModelInfo { name: name.into(), props: Some(props) } })
    };
    QomListProperties => |a, c, _| {
        let t = a.typename.as_str();
        match t {
            // Keel has no memory backend objects (`-object memory-backend-*`): none of
            // their properties would be honoured.
            "memory-backend-file" | "memory-backend-memfd" | "memory-backend-ram" => Ok(Vec::new()),
            "max-x86_64-cpu" | "base-x86_64-cpu" | "qemu64-x86_64-cpu" => c.cpu_props(),
            "host-x86_64-cpu" if c.kvm_info().present => c.cpu_props(),
            _ if let Some(m) = c.machines.iter().find(|m| format!("{}-machine", m.name()) == t) => {
                let mut v = vec![prop("type", "string", None)];
                v.extend(m.properties().into_iter().map(|(n, ty, d)| prop(n, ty, d)));
                Ok(v)
            }
            _ if qom_extra_types(c).iter().any(|e| e.0 == t) => Ok(vec![prop("type", "string", None)]),
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
            let filename = b.filename();
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
    QueryNamedBlockNodes => |_, c, _| Ok(c.backends.node_infos());
    QueryBlock => |_, c, _| Ok(keel_machine::query_block(c.board.as_deref(), &c.backends));
    BlockdevAdd => |a, c, _| {
        let spec = BlockdevSpec { driver: a.driver, filename: a.filename, file: a.file, read_only: a.read_only,
                                  auto_read_only: a.auto_read_only, discard: a.discard };
        c.backends.add_blockdev(&a.node_name, spec).map_err(|e| CommandError::generic(e.to_string()))
    };
    BlockdevDel => |a, c, _| {
        let n = &a.node_name;
        if !c.backends.blocks().iter().any(|(k, _)| k == n) {
            return Err(CommandError::generic(format!("Failed to find node with node-name='{n}'")));
        }
        if !c.users_of("drive", n).is_empty() || c.backends.block_parent(n).is_some() {
            return Err(CommandError::generic(format!("Node {n} is in use")));
        }
        c.backends.remove_block(n);
        Ok(())
    };
}
