//! Every command the VMM serves: one Rust type per command, used alike by QMP, the
//! command line and embedders (`Vmm::execute(commands::QueryStatus {})`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_phase::{Phase, PhaseSet, RunState};
use keel_qmp::schema::{opt, req};
use keel_qmp::{Builtin, Command, CommandError, CommandInfo, ContextFree, Handler, Registry, Type};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::board::{CpuInfo, MachineTypeInfo};
use crate::core::{ShutdownCause, VmmCore};

/// The QEMU release whose QMP dialect Keel follows; reported in `query-version`.
pub const QEMU_DIALECT: (u32, u32, u32) = (7, 2, 0);

const ANY: PhaseSet = PhaseSet::ANY;
const READY: PhaseSet = PhaseSet::only(Phase::MachineReady);

macro_rules! no_args_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $phases:expr, $out:ty, $ret:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, Deserialize)]
        pub struct $ty {}

        impl Command for $ty {
            const NAME: &'static str = $name;
            const PHASES: PhaseSet = $phases;
            type Output = $out;
            fn returns() -> Option<Type> {
                $ret
            }
        }
    };
}

fn run_state_enum() -> Type {
    Type::Enum {
        name: "RunState",
        values: &[
            "debug",
            "inmigrate",
            "internal-error",
            "io-error",
            "paused",
            "postmigrate",
            "prelaunch",
            "finish-migrate",
            "restore-vm",
            "running",
            "save-vm",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "colo",
        ],
    }
}

fn phase_enum() -> Type {
    Type::Enum {
        name: "MachinePhase",
        values: &[
            "no-machine",
            "machine-created",
            "accel-created",
            "machine-init",
            "machine-ready",
        ],
    }
}

/// SHUTDOWN/RESET `reason` values (QAPI `ShutdownCause`).
pub fn shutdown_cause_enum() -> Type {
    Type::Enum {
        name: "ShutdownCause",
        values: &[
            "none",
            "host-error",
            "host-qmp-quit",
            "host-qmp-system-reset",
            "host-signal",
            "host-ui",
            "guest-shutdown",
            "guest-reset",
            "guest-panic",
            "subsystem-reset",
            "snapshot-load",
        ],
    }
}

/// Data of the SHUTDOWN and RESET events.
pub fn shutdown_event_data(name: &'static str) -> Type {
    Type::object(
        name,
        vec![
            req("guest", Type::bool()),
            req("reason", shutdown_cause_enum()),
        ],
    )
}

// ---------------------------------------------------------------- queries

/// `query-version`'s answer: the QEMU dialect and Keel's own version as `package`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// `{"major", "minor", "micro"}`.
    pub qemu: VersionTriple,
    /// `keel X.Y.Z`.
    pub package: String,
}

/// A three-part version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl VersionInfo {
    /// This build's version.
    pub fn current() -> VersionInfo {
        VersionInfo {
            qemu: VersionTriple {
                major: QEMU_DIALECT.0,
                minor: QEMU_DIALECT.1,
                micro: QEMU_DIALECT.2,
            },
            package: format!("keel {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn schema() -> Type {
        Type::object(
            "VersionInfo",
            vec![
                req(
                    "qemu",
                    Type::object(
                        "VersionTriple",
                        vec![
                            req("major", Type::int()),
                            req("minor", Type::int()),
                            req("micro", Type::int()),
                        ],
                    ),
                ),
                req("package", Type::str()),
            ],
        )
    }
}

no_args_command!(
    /// `query-version`.
    QueryVersion, "query-version", ANY, VersionInfo, Some(VersionInfo::schema())
);
impl Handler<VmmCore> for QueryVersion {
    fn handle(self, _: &mut VmmCore, _: &Registry<VmmCore>) -> Result<VersionInfo, CommandError> {
        Ok(VersionInfo::current())
    }
}

no_args_command!(
    /// `query-commands`: every command with the phases it is valid in.
    QueryCommands, "query-commands", ANY, Vec<CommandInfo>,
    Some(Type::array(Type::object("CommandInfo", vec![
        req("name", Type::str()),
        req("phases", Type::array(phase_enum())),
    ])))
);
impl Handler<VmmCore> for QueryCommands {
    fn handle(
        self,
        _: &mut VmmCore,
        r: &Registry<VmmCore>,
    ) -> Result<Vec<CommandInfo>, CommandError> {
        Ok(r.commands())
    }
}

fn schema_info_type() -> Type {
    Type::object(
        "SchemaInfo",
        vec![
            req("name", Type::str()),
            req(
                "meta-type",
                Type::Enum {
                    name: "SchemaMetaType",
                    values: &[
                        "builtin",
                        "enum",
                        "array",
                        "object",
                        "alternate",
                        "command",
                        "event",
                    ],
                },
            ),
        ],
    )
}

no_args_command!(
    /// `query-qmp-schema`: SchemaInfo for every command, event and type.
    QueryQmpSchema, "query-qmp-schema", ANY, Vec<Value>, Some(Type::array(schema_info_type()))
);
impl Handler<VmmCore> for QueryQmpSchema {
    fn handle(self, _: &mut VmmCore, r: &Registry<VmmCore>) -> Result<Vec<Value>, CommandError> {
        Ok(r.schema())
    }
}

/// `query-name`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInfo {
    /// The `-name` given, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

no_args_command!(
    /// `query-name`.
    QueryName, "query-name", ANY, NameInfo,
    Some(Type::object("NameInfo", vec![opt("name", Type::str())]))
);
impl Handler<VmmCore> for QueryName {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<NameInfo, CommandError> {
        Ok(NameInfo {
            name: c.name.clone(),
        })
    }
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// Always false (QEMU 7.2 still reports it).
    pub singlestep: bool,
    /// The run state; `prelaunch` before machine-ready, as QEMU's preconfig reports.
    pub status: RunState,
}

no_args_command!(
    /// `query-status`.
    QueryStatus, "query-status", ANY, StatusInfo,
    Some(Type::object("StatusInfo", vec![
        req("running", Type::bool()),
        req("singlestep", Type::bool()),
        req("status", run_state_enum()),
    ]))
);
impl Handler<VmmCore> for QueryStatus {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<StatusInfo, CommandError> {
        let status = c.run_state();
        Ok(StatusInfo {
            running: status.is_running(),
            singlestep: false,
            status,
        })
    }
}

/// `query-phase`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseInfo {
    /// The current lifecycle phase.
    pub phase: Phase,
}

no_args_command!(
    /// `query-phase`: where the machine is in its lifecycle.
    QueryPhase, "query-phase", ANY, PhaseInfo,
    Some(Type::object("PhaseInfo", vec![req("phase", phase_enum())]))
);
impl Handler<VmmCore> for QueryPhase {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<PhaseInfo, CommandError> {
        Ok(PhaseInfo {
            phase: c.tracker.phase(),
        })
    }
}

no_args_command!(
    /// `query-machines`: the machine types this build can run.
    QueryMachines, "query-machines", ANY, Vec<MachineTypeInfo>,
    Some(Type::array(Type::object("MachineInfo", vec![
        req("name", Type::str()),
        req("description", Type::str()),
        opt("is-default", Type::bool()),
        req("cpu-max", Type::int()),
        req("hotpluggable-cpus", Type::bool()),
        req("numa-mem-supported", Type::bool()),
        req("deprecated", Type::bool()),
        req("acpi", Type::bool()),
    ])))
);
impl Handler<VmmCore> for QueryMachines {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<MachineTypeInfo>, CommandError> {
        Ok(c.machine_infos())
    }
}

/// One accelerator as `query-accels` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelInfo {
    /// `-accel` name.
    pub name: String,
    /// Whether it can be used on this host.
    pub available: bool,
    /// Why not, if it cannot (or why `accel-set` passed over it for this machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether `accel-set` chose it.
    pub selected: bool,
}

no_args_command!(
    /// `query-accels`: the accelerators, whether they work here and which is selected.
    QueryAccels, "query-accels", ANY, Vec<AccelInfo>,
    Some(Type::array(Type::object("AccelInfo", vec![
        req("name", Type::str()),
        req("available", Type::bool()),
        opt("reason", Type::str()),
        req("selected", Type::bool()),
    ])))
);
impl Handler<VmmCore> for QueryAccels {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<AccelInfo>, CommandError> {
        Ok(c.accel_infos())
    }
}

/// `query-kvm`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    /// KVM is the selected accelerator.
    pub enabled: bool,
    /// `/dev/kvm` can be used on this host.
    pub present: bool,
}

no_args_command!(
    /// `query-kvm`.
    QueryKvm, "query-kvm", ANY, KvmInfo,
    Some(Type::object("KvmInfo", vec![req("enabled", Type::bool()), req("present", Type::bool())]))
);
impl Handler<VmmCore> for QueryKvm {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<KvmInfo, CommandError> {
        Ok(c.kvm_info())
    }
}

no_args_command!(
    /// `query-cpus-fast`: only once the machine is ready, as in QEMU.
    QueryCpusFast, "query-cpus-fast", READY, Vec<CpuInfo>,
    Some(Type::array(Type::object("CpuInfoFast", vec![
        req("cpu-index", Type::int()),
        req("qom-path", Type::str()),
        req("thread-id", Type::int()),
        req("target", Type::str()),
    ])))
);
impl Handler<VmmCore> for QueryCpusFast {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<Vec<CpuInfo>, CommandError> {
        Ok(c.board.as_ref().map(|b| b.cpus()).unwrap_or_default())
    }
}

// ---------------------------------------------------------------- lifecycle

/// `machine-set`: chooses the machine type (no-machine) and sets its properties
/// (no-machine or machine-created). Unset fields keep their value or the default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineSet {
    /// Machine type; the default type if left out in no-machine.
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// RAM in bytes.
    pub memory: Option<u64>,
    /// vCPU count.
    pub cpus: Option<u32>,
    /// Kernel image path.
    pub kernel: Option<PathBuf>,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// A serial port backend, appended to the list (`-serial`).
    pub serial: Option<String>,
    /// Turn guest resets into shutdowns.
    pub no_reboot: Option<bool>,
    /// Machine-specific properties, as strings.
    #[serde(flatten)]
    pub props: BTreeMap<String, String>,
}

impl Command for MachineSet {
    const NAME: &'static str = "machine-set";
    // As QEMU's PHASE_ACCEL_CREATED: the machine's properties are not applied until the board
    // is built, so `-m`, `-kernel`, `-append` may follow `-accel` (QEMU command lines do).
    // The type itself is fixed from machine-created on.
    const PHASES: PhaseSet = PhaseSet::until(Phase::AccelCreated);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_machine-set-arg",
            members: vec![
                opt("type", Type::str()),
                opt("memory", Type::size()),
                opt("cpus", Type::Builtin(Builtin::Size)),
                opt("kernel", Type::str()),
                opt("initrd", Type::str()),
                opt("append", Type::str()),
                opt("serial", Type::str()),
                opt("no-reboot", Type::bool()),
            ],
            extra: Some(Builtin::Str),
        }
    }
}
impl Handler<VmmCore> for MachineSet {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.machine_set(self)
    }
}

/// Accelerators to try, in order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AccelList {
    /// One accelerator.
    One(String),
    /// Several: the first that works with the machine wins.
    Many(Vec<String>),
}

/// `accel-set`: picks the first accelerator that works here and can run the machine.
#[derive(Debug, Clone, Deserialize)]
pub struct AccelSet {
    /// `"kvm"` or `["kvm", "tcg"]`.
    pub accel: AccelList,
}

/// An accelerator that `accel-set` skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelRejection {
    /// Its name.
    pub accel: String,
    /// Why it could not be used.
    pub reason: String,
}

/// `accel-set`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    /// The accelerator in use now.
    pub accel: String,
    /// Those tried before it.
    pub rejected: Vec<AccelRejection>,
}

impl Command for AccelSet {
    const NAME: &'static str = "accel-set";
    const PHASES: PhaseSet = PhaseSet::only(Phase::MachineCreated);
    type Output = AccelChoice;
    fn arguments() -> Type {
        Type::object(
            "q_obj_accel-set-arg",
            vec![req(
                "accel",
                Type::Alternate {
                    name: "AccelList",
                    types: vec![Type::str(), Type::array(Type::str())],
                },
            )],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object(
            "AccelChoice",
            vec![
                req("accel", Type::str()),
                req(
                    "rejected",
                    Type::array(Type::object(
                        "AccelRejection",
                        vec![req("accel", Type::str()), req("reason", Type::str())],
                    )),
                ),
            ],
        ))
    }
}
impl Handler<VmmCore> for AccelSet {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<AccelChoice, CommandError> {
        let list = match self.accel {
            AccelList::One(a) => vec![a],
            AccelList::Many(v) => v,
        };
        c.accel_set(&list)
    }
}

no_args_command!(
    /// `machine-init`: builds the board; devices added from now on are cold-plugged.
    MachineInit, "machine-init", PhaseSet::only(Phase::AccelCreated), (), None
);
impl Handler<VmmCore> for MachineInit {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.machine_init()
    }
}

/// `machine-done` (QEMU: `x-exit-preconfig`): finishes the machine (building it first if
/// needed), enters machine-ready and starts the vCPUs unless `-S`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MachineDone {}

impl Command for MachineDone {
    const NAME: &'static str = "machine-done";
    const PHASES: PhaseSet = PhaseSet::only(Phase::AccelCreated).with(Phase::MachineInit);
    type Output = ();
    fn phase_hint(phase: Phase) -> Option<&'static str> {
        (phase == Phase::MachineReady)
            .then_some("The command is permitted only before machine initialization")
    }
}
impl Handler<VmmCore> for MachineDone {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.machine_done()
    }
}

/// `device_add`: cold plug in machine-init, hot plug in machine-ready.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeviceAdd {
    /// Device model name.
    pub driver: String,
    /// Device id.
    pub id: Option<String>,
    /// Bus to plug into.
    pub bus: Option<String>,
    /// Device properties.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    const PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_device_add-arg",
            members: vec![
                req("driver", Type::str()),
                opt("bus", Type::str()),
                opt("id", Type::str()),
            ],
            extra: Some(Builtin::Any),
        }
    }
}
impl Handler<VmmCore> for DeviceAdd {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.device_add(self)
    }
}

no_args_command!(
    /// `cont`: starts or resumes the vCPUs (RESUME).
    Cont, "cont", READY, (), None
);
impl Handler<VmmCore> for Cont {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.cont()
    }
}

no_args_command!(
    /// `stop`: pauses running vCPUs (STOP).
    Stop, "stop", READY, (), None
);
impl Handler<VmmCore> for Stop {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.stop()
    }
}

no_args_command!(
    /// `system_reset`: resets the machine (RESET).
    SystemReset, "system_reset", READY, (), None
);
impl Handler<VmmCore> for SystemReset {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.system_reset()
    }
}

no_args_command!(
    /// `quit`: ends the process after the reply (SHUTDOWN).
    Quit, "quit", ANY, (), None
);
impl Handler<VmmCore> for Quit {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.shutdown.request(ShutdownCause::HostQmpQuit);
        Ok(())
    }
}

/// `human-monitor-command`: the few HMP commands Keel understands.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The HMP command line.
    pub command_line: String,
    /// Ignored: Keel's HMP commands do not depend on a current CPU.
    pub cpu_index: Option<i64>,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    const PHASES: PhaseSet = ANY;
    type Output = String;
    fn arguments() -> Type {
        Type::object(
            "q_obj_human-monitor-command-arg",
            vec![
                req("command-line", Type::str()),
                opt("cpu-index", Type::int()),
            ],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::str())
    }
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

/// `qom-set`: sets a property of a QOM object. Only `/machine` exists so far, and the
/// `none` machine has no settable property, so this answers QEMU's errors.
#[derive(Debug, Clone, Deserialize)]
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
    const PHASES: PhaseSet = ANY;
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
impl Handler<VmmCore> for QomSet {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.qom_set(&self.path, &self.property, &self.value)
    }
}

// ---------------------------------------------------------------- devices

/// `device_del`: removes a device by id or QOM path (see `keel_qdev::DeviceTree::device_del`).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceDel {
    /// Device id or canonical path.
    pub id: String,
}

impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    const PHASES: PhaseSet = keel_qdev::DEVICE_DEL_PHASES;
    type Output = ();
    fn arguments() -> Type {
        Type::object("q_obj_device_del-arg", vec![req("id", Type::str())])
    }
}
impl Handler<VmmCore> for DeviceDel {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.device_del(&self.id)
    }
}

fn object_property_info() -> Type {
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
#[derive(Debug, Clone, Deserialize)]
pub struct QomList {
    /// Object path, absolute or partial.
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    const PHASES: PhaseSet = ANY;
    type Output = Vec<keel_qdev::ObjectPropertyInfo>;
    fn arguments() -> Type {
        Type::object("q_obj_qom-list-arg", vec![req("path", Type::str())])
    }
    fn returns() -> Option<Type> {
        Some(Type::array(object_property_info()))
    }
}
impl Handler<VmmCore> for QomList {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<keel_qdev::ObjectPropertyInfo>, CommandError> {
        c.with_tree(|t| t.qom_list(&self.path))
            .map_err(|e| crate::devices::qdev_error(&e))
    }
}

/// `qom-get`: one property of a QOM object.
#[derive(Debug, Clone, Deserialize)]
pub struct QomGet {
    /// Object path.
    pub path: String,
    /// Property name.
    pub property: String,
}

impl Command for QomGet {
    const NAME: &'static str = "qom-get";
    const PHASES: PhaseSet = ANY;
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
impl Handler<VmmCore> for QomGet {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<Value, CommandError> {
        c.with_tree(|t| t.qom_get(&self.path, &self.property))
            .map_err(|e| crate::devices::qdev_error(&e))
    }
}

/// `qom-list-types`: the device types (and their abstract parents).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QomListTypes {
    /// Only types that are or derive from this one.
    pub implements: Option<String>,
    /// Include abstract types.
    #[serde(rename = "abstract")]
    pub include_abstract: Option<bool>,
}

impl Command for QomListTypes {
    const NAME: &'static str = "qom-list-types";
    const PHASES: PhaseSet = ANY;
    type Output = Vec<keel_qdev::ObjectTypeInfo>;
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
impl Handler<VmmCore> for QomListTypes {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<keel_qdev::ObjectTypeInfo>, CommandError> {
        Ok(c.with_tree(|t| {
            t.qom_list_types(
                self.implements.as_deref(),
                self.include_abstract.unwrap_or(false),
            )
        }))
    }
}

/// `device-list-properties`: the properties a device type accepts.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceListProperties {
    /// Device type name.
    pub typename: String,
}

impl Command for DeviceListProperties {
    const NAME: &'static str = "device-list-properties";
    const PHASES: PhaseSet = ANY;
    type Output = Vec<keel_qdev::ObjectPropertyInfo>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_device-list-properties-arg",
            vec![req("typename", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(object_property_info()))
    }
}
impl Handler<VmmCore> for DeviceListProperties {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<keel_qdev::ObjectPropertyInfo>, CommandError> {
        c.with_tree(|t| t.device_list_properties(&self.typename))
            .map_err(|e| crate::devices::qdev_error(&e))
    }
}

no_args_command!(
    /// `x-query-device-tree`: every bus with its devices (path, id, bus, hotplugged,
    /// onboard, slot resources, unplug state, properties).
    XQueryDeviceTree, "x-query-device-tree", ANY, Vec<keel_qdev::BusNode>,
    Some(Type::array(Type::Object {
        name: "x-DeviceTreeBus",
        members: vec![
            req("name", Type::str()),
            req("type", Type::str()),
            req("path", Type::str()),
            req("hotpluggable", Type::bool()),
            opt("slots", Type::int()),
            req("devices", Type::array(Type::Object {
                name: "x-DeviceTreeDevice",
                members: vec![
                    opt("id", Type::str()),
                    req("type", Type::str()),
                    req("path", Type::str()),
                    req("bus", Type::str()),
                    req("hotplugged", Type::bool()),
                    req("onboard", Type::bool()),
                    opt("slot", Type::int()),
                    opt("resources", Type::any()),
                    req("unplug-state", Type::str()),
                    req("props", Type::any()),
                ],
                extra: None,
            })),
        ],
        extra: None,
    }))
);
impl Handler<VmmCore> for XQueryDeviceTree {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<keel_qdev::BusNode>, CommandError> {
        Ok(c.with_tree(|t| t.query_tree()))
    }
}

no_args_command!(
    /// `system_powerdown`: presses the ACPI power button (POWERDOWN).
    SystemPowerdown, "system_powerdown", READY, (), None
);
impl Handler<VmmCore> for SystemPowerdown {
    fn handle(self, c: &mut VmmCore, _: &Registry<VmmCore>) -> Result<(), CommandError> {
        c.system_powerdown()
    }
}

// ---------------------------------------------------------------- backends

/// `blockdev-add` with `driver: "file"` (a raw image).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAdd {
    /// Only `file`.
    pub driver: String,
    /// Node name, referenced by a device's `drive=`.
    pub node_name: String,
    /// Image path.
    pub filename: PathBuf,
    /// Open read-only.
    pub read_only: Option<bool>,
}

impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    const PHASES: PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "BlockdevOptions",
            vec![
                req("driver", Type::str()),
                req("node-name", Type::str()),
                req("filename", Type::str()),
                opt("read-only", Type::bool()),
            ],
        )
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

/// `netdev_add` with `type: "tap"`.
#[derive(Debug, Clone, Deserialize)]
pub struct NetdevAdd {
    /// Only `tap`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Netdev id, referenced by a device's `netdev=`.
    pub id: String,
    /// Host tap interface.
    pub ifname: Option<String>,
    /// Must be `no` (Keel runs no scripts).
    pub script: Option<String>,
    /// Must be `no`.
    pub downscript: Option<String>,
}

impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    const PHASES: PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "Netdev",
            vec![
                req("type", Type::str()),
                req("id", Type::str()),
                opt("ifname", Type::str()),
                opt("script", Type::str()),
                opt("downscript", Type::str()),
            ],
        )
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

/// `chardev-add` for the `file`, `null` and `stdio` backends
/// (`{"id": "c0", "backend": {"type": "file", "data": {"out": "PATH"}}}`).
#[derive(Debug, Clone, Deserialize)]
pub struct ChardevAdd {
    /// Chardev id, referenced by a device's `chardev=`.
    pub id: String,
    /// `{"type": ..., "data": {...}}`.
    pub backend: Value,
}

impl Command for ChardevAdd {
    const NAME: &'static str = "chardev-add";
    const PHASES: PhaseSet = ANY;
    type Output = Map<String, Value>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_chardev-add-arg",
            vec![req("id", Type::str()), req("backend", Type::any())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object("ChardevReturn", vec![opt("pty", Type::str())]))
    }
}
impl Handler<VmmCore> for ChardevAdd {
    fn handle(
        self,
        c: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Map<String, Value>, CommandError> {
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
        Ok(Map::new())
    }
}

// ---------------------------------------------------------------- yank (OOB-capable)

fn yank_instance() -> Type {
    let kind = Type::Enum {
        name: "YankInstanceType",
        values: &["block-node", "chardev", "migration"],
    };
    let members = vec![
        req("type", kind),
        opt("node-name", Type::str()),
        opt("id", Type::str()),
    ];
    Type::object("YankInstance", members)
}

/// `query-yank`: the instances `yank` could cut loose. Keel has no yankable connections
/// (no network block devices, socket chardevs or migration), so the list is empty.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueryYank {}
impl Command for QueryYank {
    const NAME: &'static str = "query-yank";
    const PHASES: PhaseSet = ANY;
    const ALLOW_OOB: bool = true;
    type Output = Vec<Value>;
    fn returns() -> Option<Type> {
        Some(Type::array(yank_instance()))
    }
}
impl ContextFree for QueryYank {
    fn handle(self) -> Result<Vec<Value>, CommandError> {
        Ok(Vec::new())
    }
}

/// `yank`: drops the connections of the given instances without waiting for them; an
/// empty list succeeds, any instance fails because none exists (see [`QueryYank`]).
#[derive(Debug, Clone, Deserialize)]
pub struct Yank {
    /// Instances to yank.
    pub instances: Vec<Value>,
}
impl Command for Yank {
    const NAME: &'static str = "yank";
    const PHASES: PhaseSet = ANY;
    const ALLOW_OOB: bool = true;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_yank-arg",
            vec![req("instances", Type::array(yank_instance()))],
        )
    }
}
impl ContextFree for Yank {
    fn handle(self) -> Result<(), CommandError> {
        match self.instances.is_empty() {
            true => Ok(()),
            false => Err(CommandError::with_class(
                keel_qmp::ErrorClass::DeviceNotFound,
                "Instance not found",
            )),
        }
    }
}

/// Registers every command and event on `r`.
pub fn register_all(r: &mut Registry<VmmCore>) {
    r.register::<QueryVersion>();
    r.register::<QueryCommands>();
    r.register::<QueryQmpSchema>();
    r.register::<QueryName>();
    r.register::<QueryStatus>();
    r.register::<QueryPhase>();
    r.register::<QueryMachines>();
    r.register::<QueryAccels>();
    r.register::<QueryKvm>();
    r.register::<QueryCpusFast>();
    r.register::<MachineSet>();
    r.register::<AccelSet>();
    r.register::<MachineInit>();
    r.register::<MachineDone>();
    r.register_as::<MachineDone>("x-exit-preconfig");
    r.register::<DeviceAdd>();
    r.register::<Cont>();
    r.register::<Stop>();
    r.register::<SystemReset>();
    r.register::<Quit>();
    r.register::<HumanMonitorCommand>();
    r.register::<QomSet>();
    r.register::<DeviceDel>();
    r.register::<QomList>();
    r.register::<QomGet>();
    r.register::<QomListTypes>();
    r.register::<DeviceListProperties>();
    r.register::<XQueryDeviceTree>();
    r.register::<SystemPowerdown>();
    r.register::<BlockdevAdd>();
    r.register::<NetdevAdd>();
    r.register::<ChardevAdd>();
    // Out-of-band commands that need no VMM state: answered without its lock.
    r.register_context_free::<QueryYank>();
    r.register_context_free::<Yank>();
    let device_event = || {
        Some(Type::object(
            "q_obj_DEVICE_DELETED-arg",
            vec![opt("device", Type::str()), req("path", Type::str())],
        ))
    };
    r.declare_event("DEVICE_DELETED", device_event());
    r.declare_event(
        "DEVICE_UNPLUG_GUEST_ERROR",
        Some(Type::object(
            "q_obj_DEVICE_UNPLUG_GUEST_ERROR-arg",
            vec![opt("device", Type::str()), req("path", Type::str())],
        )),
    );
    r.declare_event("POWERDOWN", None);
    r.declare_event("RESUME", None);
    r.declare_event("STOP", None);
    r.declare_event("SHUTDOWN", Some(shutdown_event_data("q_obj_SHUTDOWN-arg")));
    r.declare_event("RESET", Some(shutdown_event_data("q_obj_RESET-arg")));
}

/// The JSON `data` of SHUTDOWN/RESET.
pub fn cause_data(guest: bool, cause: ShutdownCause) -> Value {
    json!({"guest": guest, "reason": cause.as_str()})
}
