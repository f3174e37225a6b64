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
    QomList => |a, c, _| qapi(c.with_tree(|t| t.qom_list(&a.path)).map_err(|e| qdev_error(&e))?);
    QomGet => |a, c, _| c.with_tree(|t| t.qom_get(&a.path, &a.property)).map_err(|e| qdev_error(&e));
    QomListTypes => |a, c, _| qapi(c.with_tree(|t| {
        t.qom_list_types(a.implements.as_deref(), a.include_abstract.unwrap_or(false))
    }));
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
            _ => Err(CommandError::generic(format!(
                "HMP command '{}' is not supported; Keel's human monitor knows 'info status', \
                 'info version', 'info kvm', 'info cpus' and 'info name' (use the QMP commands \
                 instead)",
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
